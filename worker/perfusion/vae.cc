#include "perfusion/vae.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include "perfusion/json_text.h"
#include "perfusion/safetensors.h"

namespace perfusion {

namespace {

constexpr double kVaeNormEps = 1e-6;  // every VAE GroupNorm (diffusers passes eps=1e-6 throughout)

void ValidateOptions(const AutoencoderKLOptions& o, const std::string& where) {
  const auto& boc = o.block_out_channels();
  TORCH_CHECK_VALUE(!boc.empty(), where, ": block_out_channels must not be empty");
  TORCH_CHECK_VALUE(o.norm_num_groups() > 0, where, ": norm_num_groups must be positive, got ", o.norm_num_groups());
  for (size_t i = 0; i < boc.size(); ++i) {
    TORCH_CHECK_VALUE(boc[i] > 0 && boc[i] % o.norm_num_groups() == 0, where, ": block_out_channels[", i, "] = ",
                      boc[i], " must be a positive multiple of norm_num_groups = ", o.norm_num_groups());
  }
  TORCH_CHECK_VALUE(o.layers_per_block() >= 1, where, ": layers_per_block must be >= 1, got ", o.layers_per_block());
  TORCH_CHECK_VALUE(o.in_channels() > 0 && o.out_channels() > 0 && o.latent_channels() > 0, where,
                    ": in_channels, out_channels and latent_channels must be positive, got ", o.in_channels(), ", ",
                    o.out_channels(), ", ", o.latent_channels());
  TORCH_CHECK_VALUE(o.scaling_factor() > 0, where, ": scaling_factor must be positive, got ", o.scaling_factor());
}

const nlohmann::json* Find(const nlohmann::json& j, const char* key) {
  auto it = j.find(key);
  return it == j.end() || it->is_null() ? nullptr : &*it;
}

int64_t JsonInt(const nlohmann::json& j, const char* key, int64_t fallback, const std::string& where) {
  const auto* v = Find(j, key);
  if (!v) return fallback;
  TORCH_CHECK_VALUE(v->is_number_integer(), where, ": field \"", key, "\" must be an integer, got ", JsonForMessage(*v));
  return v->get<int64_t>();
}

bool JsonBool(const nlohmann::json& j, const char* key, bool fallback, const std::string& where) {
  const auto* v = Find(j, key);
  if (!v) return fallback;
  TORCH_CHECK_VALUE(v->is_boolean(), where, ": field \"", key, "\" must be a boolean, got ", JsonForMessage(*v));
  return v->get<bool>();
}

// Checks that `key`, if present, is a list of `expected` strings of the given length.
void CheckBlockTypes(const nlohmann::json& j, const char* key, const char* expected, size_t count,
                     const std::string& where) {
  const auto* v = Find(j, key);
  if (!v) return;
  TORCH_CHECK_VALUE(v->is_array() && v->size() == count, where, ": field \"", key, "\" must list ", count,
                    " block types (one per block_out_channels entry), got ", JsonForMessage(*v));
  for (size_t i = 0; i < v->size(); ++i) {
    TORCH_CHECK_VALUE((*v)[i].is_string() && (*v)[i].get<std::string>() == expected, where, ": ", key, "[", i,
                      "] = ", JsonForMessage((*v)[i]), " is not supported (only \"", expected, "\")");
  }
}

AutoencoderKLOptions OptionsFromJson(const std::string& json_text, const std::string& where) {
  nlohmann::json j = nlohmann::json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  TORCH_CHECK_VALUE(!j.is_discarded() && j.is_object(), where, ": not a JSON object");
  AutoencoderKLOptions o;
  o.in_channels(JsonInt(j, "in_channels", o.in_channels(), where));
  o.out_channels(JsonInt(j, "out_channels", o.out_channels(), where));
  if (const auto* v = Find(j, "block_out_channels")) {
    TORCH_CHECK_VALUE(v->is_array(), where, ": field \"block_out_channels\" must be a list, got ", JsonForMessage(*v));
    std::vector<int64_t> boc;
    for (const auto& e : *v) {
      TORCH_CHECK_VALUE(e.is_number_integer(), where, ": block_out_channels must hold integers, got ", JsonForMessage(*v));
      boc.push_back(e.get<int64_t>());
    }
    o.block_out_channels(boc);
  }
  o.layers_per_block(JsonInt(j, "layers_per_block", o.layers_per_block(), where));
  o.latent_channels(JsonInt(j, "latent_channels", o.latent_channels(), where));
  o.norm_num_groups(JsonInt(j, "norm_num_groups", o.norm_num_groups(), where));
  if (const auto* v = Find(j, "sample_size")) {
    // An int, or [h, w] in some configs: keep the first.
    if (v->is_array() && !v->empty() && (*v)[0].is_number_integer()) {
      o.sample_size((*v)[0].get<int64_t>());
    } else {
      o.sample_size(JsonInt(j, "sample_size", o.sample_size(), where));
    }
  }
  if (const auto* v = Find(j, "scaling_factor")) {
    TORCH_CHECK_VALUE(v->is_number(), where, ": field \"scaling_factor\" must be a number, got ", JsonForMessage(*v));
    o.scaling_factor(v->get<double>());
  }
  o.use_quant_conv(JsonBool(j, "use_quant_conv", o.use_quant_conv(), where));
  o.use_post_quant_conv(JsonBool(j, "use_post_quant_conv", o.use_post_quant_conv(), where));
  o.mid_block_add_attention(JsonBool(j, "mid_block_add_attention", o.mid_block_add_attention(), where));
  if (const auto* v = Find(j, "act_fn")) {
    TORCH_CHECK_VALUE(v->is_string() && v->get<std::string>() == "silu", where, ": act_fn ", JsonForMessage(*v),
                      " is not supported (only \"silu\")");
  }
  const size_t blocks = o.block_out_channels().size();
  CheckBlockTypes(j, "down_block_types", "DownEncoderBlock2D", blocks, where);
  CheckBlockTypes(j, "up_block_types", "UpDecoderBlock2D", blocks, where);
  ValidateOptions(o, where);
  return o;
}

}  // namespace

AutoencoderKLOptions AutoencoderKLOptionsFromJson(const std::string& json_text) {
  return OptionsFromJson(json_text, "AutoencoderKL config");
}

AutoencoderKLOptions AutoencoderKLOptionsFromConfigFile(const std::string& path) {
  return OptionsFromJson(ReadFileToString(path), path);
}

// --- DiagonalGaussian -------------------------------------------------------------------------

DiagonalGaussian DiagonalGaussian::FromMoments(const at::Tensor& moments) {
  TORCH_CHECK_VALUE(moments.defined() && moments.dim() == 4 && moments.size(1) % 2 == 0,
                    "DiagonalGaussian: moments must be [B, 2L, h, w], got ",
                    moments.defined() ? moments.sizes() : c10::IntArrayRef{});
  DiagonalGaussian d;
  d.moments = moments;
  auto parts = moments.chunk(2, /*dim=*/1);
  d.mean = parts[0];                          // [B, L, h, w]
  d.logvar = at::clamp(parts[1], -30.0, 20.0);  // [B, L, h, w]
  d.std = at::exp(d.logvar * 0.5);
  return d;
}

at::Tensor DiagonalGaussian::var() const { return at::exp(logvar); }

at::Tensor DiagonalGaussian::sample(c10::optional<at::Generator> generator) const {
  at::Tensor noise;
  if (generator.has_value() && generator->defined()) {
    // Drawn in float32 on the generator's device, so a seed gives the same latents on any device/dtype.
    noise = at::randn(mean.sizes(), generator, at::TensorOptions().dtype(at::kFloat).device(generator->device()));
  } else {
    noise = at::randn(mean.sizes(), at::TensorOptions().dtype(at::kFloat).device(mean.device()));
  }
  return mean + std * noise.to(mean.options());
}

at::Tensor DiagonalGaussian::kl() const {
  return (mean.pow(2) + var() - 1.0 - logvar).sum({1, 2, 3}) * 0.5;  // [B]
}

// --- Blocks -----------------------------------------------------------------------------------

VaeAttentionImpl::VaeAttentionImpl(int64_t channels, int64_t groups, double eps) {
  group_norm = register_module("group_norm", MakeGroupNorm(groups, channels, eps));
  to_q = register_module("to_q", torch::nn::Linear(channels, channels));
  to_k = register_module("to_k", torch::nn::Linear(channels, channels));
  to_v = register_module("to_v", torch::nn::Linear(channels, channels));
  out_proj_ = torch::nn::Linear(channels, channels);
  to_out = register_module("to_out", torch::nn::ModuleList(out_proj_));
}

at::Tensor VaeAttentionImpl::forward(const at::Tensor& x) {
  const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  auto t = group_norm(x).view({b, c, h * w}).transpose(1, 2);  // [B, HW, C]
  AttentionOptions attn;
  attn.heads = 1;  // one head of width C, scale C^-0.5
  attn.upcast_softmax = true;
  auto a = MultiHeadAttention(to_q(t), to_k(t), to_v(t), attn);  // [B, HW, C]
  a = out_proj_(a).transpose(1, 2).reshape({b, c, h, w});       // [B, C, H, W]
  return x + a;
}

VaeMidBlock2DImpl::VaeMidBlock2DImpl(int64_t channels, int64_t groups, bool add_attention) {
  resnets = register_module("resnets", torch::nn::ModuleList());
  auto make_resnet = [&] {
    resnet_list_.push_back(ResnetBlock2D(ResnetBlock2DOptions(channels, channels).groups(groups).eps(kVaeNormEps)));
    resnets->push_back(resnet_list_.back());
  };
  make_resnet();
  if (add_attention) {
    attentions = register_module("attentions", torch::nn::ModuleList());
    attention_list_.push_back(VaeAttention(channels, groups, kVaeNormEps));
    attentions->push_back(attention_list_.back());
  }
  make_resnet();
}

at::Tensor VaeMidBlock2DImpl::forward(const at::Tensor& x) {
  auto h = resnet_list_[0](x);  // [B, C, H, W]
  if (!attention_list_.empty()) h = attention_list_[0](h);
  return resnet_list_[1](h);
}

DownEncoderBlock2DImpl::DownEncoderBlock2DImpl(int64_t in_channels, int64_t out_channels, int64_t num_layers,
                                               int64_t groups, bool add_downsample) {
  resnets = register_module("resnets", torch::nn::ModuleList());
  for (int64_t i = 0; i < num_layers; ++i) {
    resnet_list_.push_back(ResnetBlock2D(
        ResnetBlock2DOptions(i == 0 ? in_channels : out_channels, out_channels).groups(groups).eps(kVaeNormEps)));
    resnets->push_back(resnet_list_.back());
  }
  if (add_downsample) {
    downsample_ = Downsample2D(Downsample2DOptions(out_channels, out_channels).padding(0));
    downsamplers = register_module("downsamplers", torch::nn::ModuleList(downsample_));
  }
}

at::Tensor DownEncoderBlock2DImpl::forward(const at::Tensor& x) {
  auto h = x;
  for (auto& r : resnet_list_) h = r(h);  // [B, out, H, W]
  if (downsample_) h = downsample_(h);    // [B, out, ceil(H/2), ceil(W/2)]
  return h;
}

UpDecoderBlock2DImpl::UpDecoderBlock2DImpl(int64_t in_channels, int64_t out_channels, int64_t num_layers,
                                           int64_t groups, bool add_upsample) {
  resnets = register_module("resnets", torch::nn::ModuleList());
  for (int64_t i = 0; i < num_layers; ++i) {
    resnet_list_.push_back(ResnetBlock2D(
        ResnetBlock2DOptions(i == 0 ? in_channels : out_channels, out_channels).groups(groups).eps(kVaeNormEps)));
    resnets->push_back(resnet_list_.back());
  }
  if (add_upsample) {
    upsample_ = Upsample2D(Upsample2DOptions(out_channels, out_channels));
    upsamplers = register_module("upsamplers", torch::nn::ModuleList(upsample_));
  }
}

at::Tensor UpDecoderBlock2DImpl::forward(const at::Tensor& x) {
  auto h = x;
  for (auto& r : resnet_list_) h = r(h);  // [B, out, H, W]
  if (upsample_) h = upsample_(h);        // [B, out, 2H, 2W]
  return h;
}

// --- Encoder / Decoder ------------------------------------------------------------------------

VaeEncoderImpl::VaeEncoderImpl(const AutoencoderKLOptions& o) {
  const auto& boc = o.block_out_channels();
  const int64_t groups = o.norm_num_groups();
  conv_in = register_module(
      "conv_in", torch::nn::Conv2d(torch::nn::Conv2dOptions(o.in_channels(), boc[0], /*kernel_size=*/3).padding(1)));
  down_blocks = register_module("down_blocks", torch::nn::ModuleList());
  int64_t out = boc[0];
  for (size_t i = 0; i < boc.size(); ++i) {
    const int64_t in = out;
    out = boc[i];
    block_list_.push_back(DownEncoderBlock2D(in, out, o.layers_per_block(), groups, /*add_downsample=*/i + 1 < boc.size()));
    down_blocks->push_back(block_list_.back());
  }
  mid_block = register_module("mid_block", VaeMidBlock2D(boc.back(), groups, o.mid_block_add_attention()));
  conv_norm_out = register_module("conv_norm_out", MakeGroupNorm(groups, boc.back(), kVaeNormEps));
  conv_out = register_module(
      "conv_out",
      torch::nn::Conv2d(torch::nn::Conv2dOptions(boc.back(), 2 * o.latent_channels(), /*kernel_size=*/3).padding(1)));
}

at::Tensor VaeEncoderImpl::forward(const at::Tensor& x) {
  auto h = conv_in(x);                     // [B, C0, H, W]
  for (auto& block : block_list_) h = block(h);  // [B, C_last, H/f, W/f]
  h = mid_block(h);
  return conv_out(at::silu(conv_norm_out(h)));  // [B, 2L, H/f, W/f]
}

VaeDecoderImpl::VaeDecoderImpl(const AutoencoderKLOptions& o) {
  const auto& boc = o.block_out_channels();
  const int64_t groups = o.norm_num_groups();
  conv_in = register_module(
      "conv_in",
      torch::nn::Conv2d(torch::nn::Conv2dOptions(o.latent_channels(), boc.back(), /*kernel_size=*/3).padding(1)));
  mid_block = register_module("mid_block", VaeMidBlock2D(boc.back(), groups, o.mid_block_add_attention()));
  up_blocks = register_module("up_blocks", torch::nn::ModuleList());
  const std::vector<int64_t> reversed(boc.rbegin(), boc.rend());
  int64_t out = reversed[0];
  for (size_t i = 0; i < reversed.size(); ++i) {
    const int64_t in = out;
    out = reversed[i];
    block_list_.push_back(
        UpDecoderBlock2D(in, out, o.layers_per_block() + 1, groups, /*add_upsample=*/i + 1 < reversed.size()));
    up_blocks->push_back(block_list_.back());
  }
  conv_norm_out = register_module("conv_norm_out", MakeGroupNorm(groups, boc[0], kVaeNormEps));
  conv_out = register_module(
      "conv_out", torch::nn::Conv2d(torch::nn::Conv2dOptions(boc[0], o.out_channels(), /*kernel_size=*/3).padding(1)));
}

at::Tensor VaeDecoderImpl::forward(const at::Tensor& z) {
  auto h = conv_in(z);  // [B, C_last, h, w]
  h = mid_block(h);
  for (auto& block : block_list_) h = block(h);  // [B, C0, h*f, w*f]
  return conv_out(at::silu(conv_norm_out(h)));   // [B, out, h*f, w*f]
}

// --- AutoencoderKL ----------------------------------------------------------------------------

AutoencoderKLImpl::AutoencoderKLImpl(const AutoencoderKLOptions& options) : options_(options) {
  ValidateOptions(options_, "AutoencoderKL");
  const int64_t l = options_.latent_channels();
  encoder = register_module("encoder", VaeEncoder(options_));
  decoder = register_module("decoder", VaeDecoder(options_));
  if (options_.use_quant_conv()) {
    quant_conv = register_module("quant_conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(2 * l, 2 * l, 1)));
  }
  if (options_.use_post_quant_conv()) {
    post_quant_conv = register_module("post_quant_conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(l, l, 1)));
  }
}

int64_t AutoencoderKLImpl::downsample_factor() const {
  return int64_t{1} << (options_.block_out_channels().size() - 1);
}

at::Tensor AutoencoderKLImpl::PrepareInput(const at::Tensor& x, int64_t channels, const char* what) const {
  const auto& w = encoder->conv_in->weight;
  TORCH_CHECK_VALUE(x.defined(), "AutoencoderKL: ", what, " is undefined");
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(1) == channels && x.size(2) >= 1 && x.size(3) >= 1, "AutoencoderKL: ",
                    what, " must be [B, ", channels, ", H, W], got shape ", x.sizes());
  TORCH_CHECK_VALUE(c10::isFloatingType(x.scalar_type()), "AutoencoderKL: ", what, " must be floating point, got ",
                    x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == w.device(), "AutoencoderKL: ", what, " is on ", x.device(), " but the model is on ",
                    w.device());
  return x.to(w.scalar_type());
}

DiagonalGaussian AutoencoderKLImpl::encode(const at::Tensor& image) {
  auto x = PrepareInput(image, options_.in_channels(), "image");
  auto h = encoder(x);  // [B, 2L, h, w]
  if (quant_conv) h = quant_conv(h);
  return DiagonalGaussian::FromMoments(h);
}

at::Tensor AutoencoderKLImpl::decode(const at::Tensor& latents) {
  auto z = PrepareInput(latents, options_.latent_channels(), "latents");
  if (post_quant_conv) z = post_quant_conv(z);  // [B, L, h, w]
  return decoder(z);                            // [B, out, h*f, w*f]
}

}  // namespace perfusion

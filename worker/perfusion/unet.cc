#include "perfusion/unet.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>
#include <torch/nn/functional/activation.h>
#include <torch/nn/modules/linear.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <utility>

#include "perfusion/json_text.h"
#include "perfusion/safetensors.h"

namespace perfusion {
namespace {

using nlohmann::json;

// --- config.json reading ------------------------------------------------------------------------

// The value of `key`, or nullptr when absent or null (diffusers writes null for unset options).
const json* Find(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return nullptr;
  return &*it;
}

int64_t ReadInt(const json& j, const char* key, int64_t fallback) {
  const json* v = Find(j, key);
  if (v == nullptr) return fallback;
  TORCH_CHECK_VALUE(v->is_number_integer() || (v->is_number_float() && v->get<double>() == std::floor(v->get<double>())),
                    "UNet config: '", key, "' must be an integer, got ", JsonForMessage(*v));
  return v->is_number_integer() ? v->get<int64_t>() : static_cast<int64_t>(v->get<double>());
}

double ReadDouble(const json& j, const char* key, double fallback) {
  const json* v = Find(j, key);
  if (v == nullptr) return fallback;
  TORCH_CHECK_VALUE(v->is_number(), "UNet config: '", key, "' must be a number, got ", JsonForMessage(*v));
  return v->get<double>();
}

bool ReadBool(const json& j, const char* key, bool fallback) {
  const json* v = Find(j, key);
  if (v == nullptr) return fallback;
  TORCH_CHECK_VALUE(v->is_boolean(), "UNet config: '", key, "' must be true or false, got ", JsonForMessage(*v));
  return v->get<bool>();
}

std::string ReadString(const json& j, const char* key, const std::string& fallback) {
  const json* v = Find(j, key);
  if (v == nullptr) return fallback;
  TORCH_CHECK_VALUE(v->is_string(), "UNet config: '", key, "' must be a string, got ", JsonForMessage(*v));
  return v->get<std::string>();
}

// An int or a list of ints (per block).
std::vector<int64_t> ReadIntOrList(const json& j, const char* key, const std::vector<int64_t>& fallback) {
  const json* v = Find(j, key);
  if (v == nullptr) return fallback;
  if (v->is_number_integer()) return {v->get<int64_t>()};
  TORCH_CHECK_VALUE(v->is_array() && !v->empty(), "UNet config: '", key,
                    "' must be an integer or a non-empty list of integers, got ", JsonForMessage(*v));
  std::vector<int64_t> out;
  for (const json& e : *v) {
    TORCH_CHECK_VALUE(e.is_number_integer(), "UNet config: '", key,
                      "' must be an integer or a list of integers (nested lists are not supported), got ", JsonForMessage(*v));
    out.push_back(e.get<int64_t>());
  }
  return out;
}

std::vector<std::string> ReadStringList(const json& j, const char* key, const std::vector<std::string>& fallback) {
  const json* v = Find(j, key);
  if (v == nullptr) return fallback;
  TORCH_CHECK_VALUE(v->is_array(), "UNet config: '", key, "' must be a list of strings, got ", JsonForMessage(*v));
  std::vector<std::string> out;
  for (const json& e : *v) {
    TORCH_CHECK_VALUE(e.is_string(), "UNet config: '", key, "' must be a list of strings, got ", JsonForMessage(*v));
    out.push_back(e.get<std::string>());
  }
  return out;
}

// Keys of features this engine does not implement: they must be absent/null, or equal `allowed`.
void RequireUnset(const json& j, const char* key) {
  const json* v = Find(j, key);
  TORCH_CHECK_VALUE(v == nullptr, "UNet config: '", key, "' = ", v ? JsonForMessage(*v) : "", " is not supported (only null)");
}

void RequireEqual(const json& j, const char* key, const json& allowed) {
  const json* v = Find(j, key);
  if (v == nullptr) return;
  const bool same = (v->is_number() && allowed.is_number()) ? v->get<double>() == allowed.get<double>() : *v == allowed;
  TORCH_CHECK_VALUE(same, "UNet config: '", key, "' = ", JsonForMessage(*v), " is not supported (only ", JsonForMessage(allowed), ")");
}

// `false` or a list of `false` (per block).
void RequireFalseOrFalseList(const json& j, const char* key) {
  const json* v = Find(j, key);
  if (v == nullptr) return;
  bool ok = v->is_boolean() && !v->get<bool>();
  if (v->is_array()) {
    ok = std::all_of(v->begin(), v->end(), [](const json& e) { return e.is_boolean() && !e.get<bool>(); });
  }
  TORCH_CHECK_VALUE(ok, "UNet config: '", key, "' = ", JsonForMessage(*v), " is not supported (only false)");
}

json IntOrList(const std::vector<int64_t>& v) {
  if (v.size() == 1) return v[0];
  return json(v);
}

std::string ShapeOf(const at::Tensor& t) {
  if (!t.defined()) return "undefined";
  std::ostringstream ss;
  ss << t.sizes();
  return ss.str();
}

int64_t PerBlock(const std::vector<int64_t>& v, size_t block, const char* field) {
  TORCH_CHECK_VALUE(!v.empty(), "UNet config: '", field, "' is empty");
  return v.size() == 1 ? v[0] : v.at(block);
}

at::Tensor Silu(const at::Tensor& x) { return torch::nn::functional::silu(x); }

}  // namespace

// --- UNetConfig ---------------------------------------------------------------------------------

UNetConfig UNetConfig::FromJson(const json& j) {
  TORCH_CHECK_VALUE(j.is_object(), "UNet config: expected a JSON object, got ", j.type_name());
  const std::string cls = ReadString(j, "_class_name", "UNet2DConditionModel");
  TORCH_CHECK_VALUE(cls == "UNet2DConditionModel", "UNet config: '_class_name' = \"", cls,
                    "\" is not supported (only \"UNet2DConditionModel\")");
  UNetConfig c;
  c.in_channels = ReadInt(j, "in_channels", c.in_channels);
  c.out_channels = ReadInt(j, "out_channels", c.out_channels);
  if (const json* s = Find(j, "sample_size")) {
    if (s->is_array()) {
      TORCH_CHECK_VALUE(s->size() == 2 && (*s)[0].is_number_integer() && (*s)[0] == (*s)[1],
                        "UNet config: 'sample_size' = ", JsonForMessage(*s), " is not supported (an integer or [n, n])");
      c.sample_size = (*s)[0].get<int64_t>();
    } else {
      c.sample_size = ReadInt(j, "sample_size", c.sample_size);
    }
  }
  c.block_out_channels = ReadIntOrList(j, "block_out_channels", c.block_out_channels);
  c.down_block_types = ReadStringList(j, "down_block_types", c.down_block_types);
  c.mid_block_type = ReadString(j, "mid_block_type", c.mid_block_type);
  TORCH_CHECK_VALUE(Find(j, "mid_block_type") != nullptr || j.find("mid_block_type") == j.end(),
                    "UNet config: 'mid_block_type' = null (no mid block) is not supported (only \"UNetMidBlock2DCrossAttn\")");
  c.up_block_types = ReadStringList(j, "up_block_types", c.up_block_types);
  c.layers_per_block = ReadIntOrList(j, "layers_per_block", c.layers_per_block);
  c.transformer_layers_per_block = ReadIntOrList(j, "transformer_layers_per_block", c.transformer_layers_per_block);
  if (const json* v = Find(j, "cross_attention_dim")) {
    const std::vector<int64_t> dims = ReadIntOrList(j, "cross_attention_dim", {});
    TORCH_CHECK_VALUE(std::all_of(dims.begin(), dims.end(), [&](int64_t d) { return d == dims[0]; }),
                      "UNet config: 'cross_attention_dim' = ", JsonForMessage(*v),
                      " is not supported (one text width for every block)");
    c.cross_attention_dim = dims[0];
  }
  c.attention_head_dim = ReadIntOrList(j, "attention_head_dim", c.attention_head_dim);
  c.num_attention_heads = ReadIntOrList(j, "num_attention_heads", c.num_attention_heads);
  c.use_linear_projection = ReadBool(j, "use_linear_projection", c.use_linear_projection);
  c.upcast_attention = ReadBool(j, "upcast_attention", c.upcast_attention);
  c.norm_num_groups = ReadInt(j, "norm_num_groups", c.norm_num_groups);
  TORCH_CHECK_VALUE(Find(j, "norm_num_groups") != nullptr || j.find("norm_num_groups") == j.end(),
                    "UNet config: 'norm_num_groups' = null (no output norm) is not supported");
  c.norm_eps = ReadDouble(j, "norm_eps", c.norm_eps);
  c.flip_sin_to_cos = ReadBool(j, "flip_sin_to_cos", c.flip_sin_to_cos);
  c.freq_shift = ReadDouble(j, "freq_shift", c.freq_shift);
  c.time_embedding_dim = ReadInt(j, "time_embedding_dim", c.time_embedding_dim);
  c.center_input_sample = ReadBool(j, "center_input_sample", c.center_input_sample);
  c.downsample_padding = ReadInt(j, "downsample_padding", c.downsample_padding);
  c.mid_block_scale_factor = ReadDouble(j, "mid_block_scale_factor", c.mid_block_scale_factor);
  c.conv_in_kernel = ReadInt(j, "conv_in_kernel", c.conv_in_kernel);
  c.conv_out_kernel = ReadInt(j, "conv_out_kernel", c.conv_out_kernel);

  // Features of other UNet2DConditionModel variants (SDXL, unCLIP, LCM, GLIGEN, ...).
  for (const char* key : {"class_embed_type", "addition_embed_type", "addition_time_embed_dim", "num_class_embeds",
                          "encoder_hid_dim", "encoder_hid_dim_type", "time_cond_proj_dim", "time_embedding_act_fn",
                          "timestep_post_act", "projection_class_embeddings_input_dim", "cross_attention_norm",
                          "reverse_transformer_layers_per_block"}) {
    RequireUnset(j, key);
  }
  RequireEqual(j, "act_fn", "silu");
  RequireEqual(j, "time_embedding_type", "positional");
  RequireEqual(j, "resnet_time_scale_shift", "default");
  RequireEqual(j, "attention_type", "default");
  RequireEqual(j, "dropout", 0.0);
  RequireEqual(j, "resnet_out_scale_factor", 1.0);
  RequireEqual(j, "resnet_skip_time_act", false);
  RequireEqual(j, "dual_cross_attention", false);
  RequireEqual(j, "class_embeddings_concat", false);
  RequireEqual(j, "mid_block_only_cross_attention", false);
  RequireFalseOrFalseList(j, "only_cross_attention");
  c.Validate();
  return c;
}

UNetConfig UNetConfig::FromJsonString(const std::string& text) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  TORCH_CHECK_VALUE(!j.is_discarded(), "UNet config: malformed JSON");
  return FromJson(j);
}

UNetConfig UNetConfig::FromFile(const std::string& path) {
  const std::string text = ReadFileToString(path);
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  TORCH_CHECK_VALUE(!j.is_discarded(), "UNet config ", path, ": malformed JSON");
  return FromJson(j);
}

json UNetConfig::ToJson() const {
  json j;
  j["_class_name"] = "UNet2DConditionModel";
  j["in_channels"] = in_channels;
  j["out_channels"] = out_channels;
  j["sample_size"] = sample_size;
  j["block_out_channels"] = block_out_channels;
  j["down_block_types"] = down_block_types;
  j["mid_block_type"] = mid_block_type;
  j["up_block_types"] = up_block_types;
  j["layers_per_block"] = IntOrList(layers_per_block);
  j["transformer_layers_per_block"] = IntOrList(transformer_layers_per_block);
  j["cross_attention_dim"] = cross_attention_dim;
  j["attention_head_dim"] = IntOrList(attention_head_dim);
  j["num_attention_heads"] = num_attention_heads.empty() ? json(nullptr) : IntOrList(num_attention_heads);
  j["use_linear_projection"] = use_linear_projection;
  j["upcast_attention"] = upcast_attention;
  j["norm_num_groups"] = norm_num_groups;
  j["norm_eps"] = norm_eps;
  j["flip_sin_to_cos"] = flip_sin_to_cos;
  j["freq_shift"] = freq_shift;
  j["time_embedding_dim"] = time_embedding_dim > 0 ? json(time_embedding_dim) : json(nullptr);
  j["center_input_sample"] = center_input_sample;
  j["downsample_padding"] = downsample_padding;
  j["mid_block_scale_factor"] = mid_block_scale_factor;
  j["conv_in_kernel"] = conv_in_kernel;
  j["conv_out_kernel"] = conv_out_kernel;
  j["act_fn"] = "silu";
  j["time_embedding_type"] = "positional";
  j["resnet_time_scale_shift"] = "default";
  j["attention_type"] = "default";
  j["dropout"] = 0.0;
  j["only_cross_attention"] = false;
  j["dual_cross_attention"] = false;
  return j;
}

std::string UNetConfig::ToJsonString() const { return ToJson().dump(2); }

int64_t UNetConfig::heads(size_t block) const {
  return PerBlock(num_attention_heads.empty() ? attention_head_dim : num_attention_heads, block,
                  num_attention_heads.empty() ? "attention_head_dim" : "num_attention_heads");
}
int64_t UNetConfig::layers(size_t block) const { return PerBlock(layers_per_block, block, "layers_per_block"); }
int64_t UNetConfig::transformer_layers(size_t block) const {
  return PerBlock(transformer_layers_per_block, block, "transformer_layers_per_block");
}

void UNetConfig::Validate() const {
  const size_t n = block_out_channels.size();
  TORCH_CHECK_VALUE(n >= 1, "UNet config: 'block_out_channels' is empty");
  TORCH_CHECK_VALUE(down_block_types.size() == n, "UNet config: 'down_block_types' has ", down_block_types.size(),
                    " entries but 'block_out_channels' has ", n);
  TORCH_CHECK_VALUE(up_block_types.size() == n, "UNet config: 'up_block_types' has ", up_block_types.size(),
                    " entries but 'block_out_channels' has ", n);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(down_block_types[i] == "CrossAttnDownBlock2D" || down_block_types[i] == "DownBlock2D",
                      "UNet config: 'down_block_types'[", i, "] = \"", down_block_types[i],
                      "\" is not supported (supported: CrossAttnDownBlock2D, DownBlock2D)");
    TORCH_CHECK_VALUE(up_block_types[i] == "CrossAttnUpBlock2D" || up_block_types[i] == "UpBlock2D",
                      "UNet config: 'up_block_types'[", i, "] = \"", up_block_types[i],
                      "\" is not supported (supported: CrossAttnUpBlock2D, UpBlock2D)");
  }
  TORCH_CHECK_VALUE(mid_block_type == "UNetMidBlock2DCrossAttn", "UNet config: 'mid_block_type' = \"", mid_block_type,
                    "\" is not supported (supported: UNetMidBlock2DCrossAttn)");
  auto check_list = [&](const std::vector<int64_t>& v, const char* field, bool allow_empty) {
    if (allow_empty && v.empty()) return;
    TORCH_CHECK_VALUE(v.size() == 1 || v.size() == n, "UNet config: '", field, "' has ", v.size(),
                      " entries; expected 1 or ", n, " (one per down block)");
    for (int64_t x : v) TORCH_CHECK_VALUE(x >= 1, "UNet config: '", field, "' must be positive, got ", x);
  };
  check_list(layers_per_block, "layers_per_block", false);
  check_list(transformer_layers_per_block, "transformer_layers_per_block", false);
  check_list(attention_head_dim, "attention_head_dim", false);
  check_list(num_attention_heads, "num_attention_heads", true);
  for (const auto& [value, field] : {std::make_pair(in_channels, "in_channels"),
                                     std::make_pair(out_channels, "out_channels"),
                                     std::make_pair(cross_attention_dim, "cross_attention_dim"),
                                     std::make_pair(norm_num_groups, "norm_num_groups")}) {
    TORCH_CHECK_VALUE(value >= 1, "UNet config: '", field, "' must be positive, got ", value);
  }
  TORCH_CHECK_VALUE(norm_eps > 0, "UNet config: 'norm_eps' must be positive, got ", norm_eps);
  TORCH_CHECK_VALUE(conv_in_kernel >= 1 && conv_in_kernel % 2 == 1, "UNet config: 'conv_in_kernel' must be odd, got ",
                    conv_in_kernel);
  TORCH_CHECK_VALUE(conv_out_kernel >= 1 && conv_out_kernel % 2 == 1,
                    "UNet config: 'conv_out_kernel' must be odd, got ", conv_out_kernel);
  TORCH_CHECK_VALUE(block_out_channels[0] >= 2, "UNet config: 'block_out_channels'[0] must be >= 2, got ",
                    block_out_channels[0]);
  // The sinusoid divides by (C0/2 - freq_shift).
  TORCH_CHECK_VALUE(static_cast<double>(block_out_channels[0] / 2) != freq_shift, "UNet config: 'freq_shift' = ",
                    freq_shift, " equals block_out_channels[0] / 2 (division by zero in the timestep embedding)");
  for (size_t i = 0; i < n; ++i) {
    const int64_t c = block_out_channels[i];
    TORCH_CHECK_VALUE(c >= 1 && c % norm_num_groups == 0, "UNet config: 'block_out_channels'[", i, "] = ", c,
                      " is not divisible by 'norm_num_groups' = ", norm_num_groups);
    // Attention widths: down/up level i use heads(i) resp. heads reversed; the mid block heads(n-1).
    const bool down_attn = down_block_types[i] == "CrossAttnDownBlock2D";
    const bool up_attn = up_block_types[n - 1 - i] == "CrossAttnUpBlock2D";
    if (down_attn || up_attn || i == n - 1) {
      const int64_t h = heads(i);
      TORCH_CHECK_VALUE(c % h == 0, "UNet config: 'block_out_channels'[", i, "] = ", c, " is not divisible by ",
                        num_attention_heads.empty() ? "'attention_head_dim'" : "'num_attention_heads'",
                        " (the number of heads) = ", h);
    }
  }
}

// --- Timestep embedding -------------------------------------------------------------------------

at::Tensor TimestepSinusoidalEmbedding(const at::Tensor& timesteps, int64_t dim, bool flip_sin_to_cos,
                                       double freq_shift) {
  TORCH_CHECK_VALUE(timesteps.dim() == 1, "timesteps must be 1-D [N], got shape ", ShapeOf(timesteps));
  TORCH_CHECK_VALUE(dim >= 2, "timestep embedding dim must be >= 2, got ", dim);
  const int64_t half = dim / 2;
  // float32 throughout, in diffusers' order of operations (the arguments reach ~1000 rad, so the
  // float32 rounding is part of the reference).
  at::Tensor exponent = at::arange(0, half, timesteps.options().dtype(at::kFloat)) * (-std::log(10000.0));
  exponent = exponent / (static_cast<double>(half) - freq_shift);
  at::Tensor arg = timesteps.unsqueeze(1).to(at::kFloat) * at::exp(exponent).unsqueeze(0);  // [N, half]
  at::Tensor emb = flip_sin_to_cos ? at::cat({at::cos(arg), at::sin(arg)}, -1) : at::cat({at::sin(arg), at::cos(arg)}, -1);
  if (dim % 2 == 1) emb = at::constant_pad_nd(emb, {0, 1, 0, 0});
  return emb;  // [N, dim] float32
}

TimestepEmbeddingImpl::TimestepEmbeddingImpl(int64_t in_channels, int64_t time_embed_dim) {
  linear_1 = register_module("linear_1", torch::nn::Linear(in_channels, time_embed_dim));
  linear_2 = register_module("linear_2", torch::nn::Linear(time_embed_dim, time_embed_dim));
}

at::Tensor TimestepEmbeddingImpl::forward(const at::Tensor& t_emb) {
  return linear_2(Silu(linear_1(t_emb)));  // [B, time_embed_dim]
}

// --- Attention and transformer blocks -----------------------------------------------------------

UNetAttentionImpl::UNetAttentionImpl(const UNetAttentionOptions& options) : options_(options) {
  const int64_t inner = inner_dim();
  const int64_t kv_dim = options.cross_attention_dim() > 0 ? options.cross_attention_dim() : options.query_dim();
  to_q = register_module("to_q", torch::nn::Linear(torch::nn::LinearOptions(options.query_dim(), inner).bias(false)));
  to_k = register_module("to_k", torch::nn::Linear(torch::nn::LinearOptions(kv_dim, inner).bias(false)));
  to_v = register_module("to_v", torch::nn::Linear(torch::nn::LinearOptions(kv_dim, inner).bias(false)));
  to_out_0 = torch::nn::Linear(inner, options.query_dim());
  to_out = register_module("to_out", torch::nn::ModuleList(to_out_0));
}

at::Tensor UNetAttentionImpl::forward(const at::Tensor& x) { return forward_kv(x, to_k(x), to_v(x)); }

at::Tensor UNetAttentionImpl::forward_kv(const at::Tensor& x, const at::Tensor& k, const at::Tensor& v) {
  at::Tensor q = to_q(x);  // [B, N, inner]
  at::Tensor key = k;
  at::Tensor value = v;
  if (key.size(0) != q.size(0)) {  // one prompt broadcast over the batch (checked by the UNet)
    key = key.expand({q.size(0), key.size(1), key.size(2)});
    value = value.expand({q.size(0), value.size(1), value.size(2)});
  }
  AttentionOptions attn;
  attn.heads = options_.heads();
  attn.scale = 1.0 / std::sqrt(static_cast<double>(options_.dim_head()));
  const bool upcast = options_.upcast_attention() && q.scalar_type() != at::kFloat && q.scalar_type() != at::kDouble;
  if (upcast) {
    key = key.to(at::kFloat);
    value = value.to(at::kFloat);
  }
  // Self-attention at SD's 64x64 latents has 4096 queries and keys: the [B, heads, N, S] scores
  // would take 1 GiB at batch 2. Queries are independent, so attend in chunks of rows that keep the
  // scores under kMaxScoreElements (same result; bounded peak memory at inference).
  constexpr int64_t kMaxScoreElements = int64_t{1} << 25;
  const int64_t n = q.size(1);
  const int64_t per_row = std::max<int64_t>(1, q.size(0) * options_.heads() * key.size(1));
  const int64_t chunk = std::max<int64_t>(1, kMaxScoreElements / per_row);
  std::vector<at::Tensor> parts;
  for (int64_t start = 0; start < n; start += chunk) {
    at::Tensor q_part = q.slice(1, start, std::min(n, start + chunk));
    if (upcast) q_part = q_part.to(at::kFloat);
    parts.push_back(MultiHeadAttention(q_part, key, value, attn));  // [B, rows, inner]
  }
  at::Tensor out = parts.size() == 1 ? parts[0] : at::cat(parts, 1);  // [B, N, inner]
  if (upcast) out = out.to(q.scalar_type());
  return to_out_0(out);  // [B, N, query_dim]
}

GEGLUImpl::GEGLUImpl(int64_t dim, int64_t inner_dim) {
  proj = register_module("proj", torch::nn::Linear(dim, 2 * inner_dim));
}

at::Tensor GEGLUImpl::forward(const at::Tensor& x) {
  std::vector<at::Tensor> halves = proj(x).chunk(2, -1);  // 2 x [..., inner]
  return halves[0] * at::gelu(halves[1]);                 // exact (erf) GELU
}

FeedForwardImpl::FeedForwardImpl(int64_t dim) {
  geglu = GEGLU(dim, 4 * dim);
  out = torch::nn::Linear(4 * dim, dim);
  // net.1 is diffusers' Dropout (p = 0 here): no parameters, identity.
  net = register_module("net", torch::nn::ModuleList(geglu, torch::nn::Identity(), out));
}

at::Tensor FeedForwardImpl::forward(const at::Tensor& x) { return out(geglu(x)); }

BasicTransformerBlockImpl::BasicTransformerBlockImpl(int64_t dim, int64_t heads, int64_t dim_head,
                                                     int64_t cross_attention_dim, bool upcast_attention) {
  auto layer_norm = [&] { return torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim}).eps(1e-5)); };
  norm1 = register_module("norm1", layer_norm());
  attn1 = register_module("attn1", UNetAttention(UNetAttentionOptions(dim, heads, dim_head).upcast_attention(upcast_attention)));
  norm2 = register_module("norm2", layer_norm());
  attn2 = register_module("attn2", UNetAttention(UNetAttentionOptions(dim, heads, dim_head)
                                                     .cross_attention_dim(cross_attention_dim)
                                                     .upcast_attention(upcast_attention)));
  norm3 = register_module("norm3", layer_norm());
  ff = register_module("ff", FeedForward(dim));
}

at::Tensor BasicTransformerBlockImpl::forward(const at::Tensor& x, const CrossAttnKV& kv) {
  at::Tensor h = attn1(norm1(x)) + x;               // [B, N, dim] self-attention
  h = attn2->forward_kv(norm2(h), kv.k, kv.v) + h;  // cross-attention on the text K/V
  return ff(norm3(h)) + h;
}

const CrossAttnKV& CrossAttnKVCursor::take() {
  TORCH_CHECK(kv != nullptr && next < kv->size(), "UNet: the K/V list ran out at entry ", next,
              " (internal: check_kv should have caught this)");
  return (*kv)[next++];
}

Transformer2DModelImpl::Transformer2DModelImpl(int64_t channels, int64_t heads, int64_t num_layers, int64_t norm_groups,
                                               int64_t cross_attention_dim, bool use_linear_projection,
                                               bool upcast_attention) {
  TORCH_CHECK_VALUE(heads >= 1 && channels % heads == 0, "Transformer2DModel: channels = ", channels,
                    " is not divisible by heads = ", heads);
  norm = register_module("norm", MakeGroupNorm(norm_groups, channels, 1e-6));
  if (use_linear_projection) {
    proj_in_linear = register_module("proj_in", torch::nn::Linear(channels, channels));
  } else {
    proj_in_conv = register_module("proj_in", torch::nn::Conv2d(torch::nn::Conv2dOptions(channels, channels, 1)));
  }
  transformer_blocks = register_module("transformer_blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < num_layers; ++i) {
    blocks_.push_back(BasicTransformerBlock(channels, heads, channels / heads, cross_attention_dim, upcast_attention));
    transformer_blocks->push_back(blocks_.back());
  }
  if (use_linear_projection) {
    proj_out_linear = register_module("proj_out", torch::nn::Linear(channels, channels));
  } else {
    proj_out_conv = register_module("proj_out", torch::nn::Conv2d(torch::nn::Conv2dOptions(channels, channels, 1)));
  }
}

at::Tensor Transformer2DModelImpl::forward(const at::Tensor& x, CrossAttnKVCursor& kv) {
  const int64_t b = x.size(0), c = x.size(1), height = x.size(2), width = x.size(3);
  at::Tensor h = norm(x);  // [B, C, H, W]
  if (proj_in_conv) {
    h = proj_in_conv(h).permute({0, 2, 3, 1}).reshape({b, height * width, c});  // [B, HW, C]
  } else {
    h = proj_in_linear(h.permute({0, 2, 3, 1}).reshape({b, height * width, c}));  // [B, HW, C]
  }
  for (auto& block : blocks_) h = block(h, kv.take());  // [B, HW, C]
  if (proj_out_conv) {
    h = proj_out_conv(h.reshape({b, height, width, c}).permute({0, 3, 1, 2}).contiguous());  // [B, C, H, W]
  } else {
    h = proj_out_linear(h).reshape({b, height, width, c}).permute({0, 3, 1, 2}).contiguous();  // [B, C, H, W]
  }
  return h + x;
}

void Transformer2DModelImpl::collect_cross_attention(const std::string& prefix,
                                                     std::vector<CrossAttentionRef>* out) const {
  for (size_t i = 0; i < blocks_.size(); ++i) {
    out->push_back({prefix + "transformer_blocks." + std::to_string(i) + ".attn2", blocks_[i]->attn2->to_k,
                    blocks_[i]->attn2->to_v});
  }
}

// --- Down / mid / up blocks ---------------------------------------------------------------------

namespace {

ResnetBlock2D MakeResnet(int64_t in, int64_t out, const UNetBlockOptions& o, double output_scale_factor = 1.0) {
  return ResnetBlock2D(ResnetBlock2DOptions(in, out)
                           .temb_channels(o.temb_channels)
                           .groups(o.norm_groups)
                           .eps(o.norm_eps)
                           .output_scale_factor(output_scale_factor));
}

Transformer2DModel MakeTransformer(int64_t channels, const UNetBlockOptions& o) {
  return Transformer2DModel(channels, o.heads, o.transformer_layers, o.norm_groups, o.cross_attention_dim,
                            o.use_linear_projection, o.upcast_attention);
}

void CollectFrom(const std::vector<Transformer2DModel>& attentions, const std::string& prefix,
                 std::vector<CrossAttentionRef>* out) {
  for (size_t i = 0; i < attentions.size(); ++i) {
    attentions[i]->collect_cross_attention(prefix + "attentions." + std::to_string(i) + ".", out);
  }
}

}  // namespace

UNetDownBlockImpl::UNetDownBlockImpl(int64_t in_channels, int64_t out_channels, int64_t num_layers,
                                     bool with_attention, bool add_downsample, int64_t downsample_padding,
                                     const UNetBlockOptions& options) {
  // diffusers registers attentions before resnets: keep its state-dict order.
  if (with_attention) attentions = register_module("attentions", torch::nn::ModuleList());
  resnets = register_module("resnets", torch::nn::ModuleList());
  for (int64_t i = 0; i < num_layers; ++i) {
    resnets_.push_back(MakeResnet(i == 0 ? in_channels : out_channels, out_channels, options));
    resnets->push_back(resnets_.back());
    if (with_attention) {
      attentions_.push_back(MakeTransformer(out_channels, options));
      attentions->push_back(attentions_.back());
    }
  }
  if (add_downsample) {
    downsampler_ = Downsample2D(Downsample2DOptions(out_channels, out_channels).padding(downsample_padding));
    downsamplers = register_module("downsamplers", torch::nn::ModuleList(downsampler_));
  }
}

at::Tensor UNetDownBlockImpl::forward(const at::Tensor& x, const at::Tensor& temb, CrossAttnKVCursor& kv,
                                      std::vector<at::Tensor>* skips) {
  at::Tensor h = x;
  for (size_t i = 0; i < resnets_.size(); ++i) {
    h = resnets_[i](h, temb);                           // [B, out, H, W]
    if (!attentions_.empty()) h = attentions_[i](h, kv);  // [B, out, H, W]
    skips->push_back(h);
  }
  if (downsampler_) {
    h = downsampler_(h);  // [B, out, ceil(H/2), ceil(W/2)]
    skips->push_back(h);
  }
  return h;
}

void UNetDownBlockImpl::collect_cross_attention(const std::string& prefix, std::vector<CrossAttentionRef>* out) const {
  CollectFrom(attentions_, prefix, out);
}

UNetMidBlockImpl::UNetMidBlockImpl(int64_t channels, int64_t num_layers, double output_scale_factor,
                                   const UNetBlockOptions& options) {
  attentions = register_module("attentions", torch::nn::ModuleList());
  resnets = register_module("resnets", torch::nn::ModuleList());
  resnets_.push_back(MakeResnet(channels, channels, options, output_scale_factor));
  resnets->push_back(resnets_.back());
  for (int64_t i = 0; i < num_layers; ++i) {
    attentions_.push_back(MakeTransformer(channels, options));
    attentions->push_back(attentions_.back());
    resnets_.push_back(MakeResnet(channels, channels, options, output_scale_factor));
    resnets->push_back(resnets_.back());
  }
}

at::Tensor UNetMidBlockImpl::forward(const at::Tensor& x, const at::Tensor& temb, CrossAttnKVCursor& kv) {
  at::Tensor h = resnets_[0](x, temb);  // [B, C, h, w]
  for (size_t i = 0; i < attentions_.size(); ++i) {
    h = attentions_[i](h, kv);
    h = resnets_[i + 1](h, temb);
  }
  return h;
}

void UNetMidBlockImpl::collect_cross_attention(const std::string& prefix, std::vector<CrossAttentionRef>* out) const {
  CollectFrom(attentions_, prefix, out);
}

UNetUpBlockImpl::UNetUpBlockImpl(int64_t in_channels, int64_t prev_output_channels, int64_t out_channels,
                                 int64_t num_layers, bool with_attention, bool add_upsample,
                                 const UNetBlockOptions& options) {
  if (with_attention) attentions = register_module("attentions", torch::nn::ModuleList());
  resnets = register_module("resnets", torch::nn::ModuleList());
  for (int64_t i = 0; i < num_layers; ++i) {
    // Skip widths: the down path's outputs, popped in reverse; the last one comes from one level up.
    const int64_t skip_channels = (i == num_layers - 1) ? in_channels : out_channels;
    const int64_t resnet_in = (i == 0) ? prev_output_channels : out_channels;
    resnets_.push_back(MakeResnet(resnet_in + skip_channels, out_channels, options));
    resnets->push_back(resnets_.back());
    if (with_attention) {
      attentions_.push_back(MakeTransformer(out_channels, options));
      attentions->push_back(attentions_.back());
    }
  }
  if (add_upsample) {
    upsampler_ = Upsample2D(Upsample2DOptions(out_channels, out_channels));
    upsamplers = register_module("upsamplers", torch::nn::ModuleList(upsampler_));
  }
}

at::Tensor UNetUpBlockImpl::forward(const at::Tensor& x, const at::Tensor& temb, CrossAttnKVCursor& kv,
                                    std::vector<at::Tensor>* skips, const std::vector<int64_t>& upsample_size) {
  at::Tensor h = x;
  for (size_t i = 0; i < resnets_.size(); ++i) {
    TORCH_CHECK(!skips->empty(), "UNet up block: no skip connection left (internal error)");
    at::Tensor skip = std::move(skips->back());
    skips->pop_back();
    h = resnets_[i](at::cat({h, skip}, 1), temb);        // [B, out, h, w]
    if (!attentions_.empty()) h = attentions_[i](h, kv);  // [B, out, h, w]
  }
  if (upsampler_) {
    h = upsample_size.empty() ? upsampler_(h) : upsampler_(h, upsample_size);  // [B, out, 2h, 2w]
  }
  return h;
}

void UNetUpBlockImpl::collect_cross_attention(const std::string& prefix, std::vector<CrossAttentionRef>* out) const {
  CollectFrom(attentions_, prefix, out);
}

// --- UNet2DConditionModel -----------------------------------------------------------------------

UNet2DConditionModelImpl::UNet2DConditionModelImpl(const UNetConfig& config) : config_(config) {
  config_.Validate();
  const UNetConfig& c = config_;
  const size_t n = c.block_out_channels.size();
  const int64_t c0 = c.block_out_channels[0];
  conv_in = register_module(
      "conv_in", torch::nn::Conv2d(torch::nn::Conv2dOptions(c.in_channels, c0, c.conv_in_kernel).padding((c.conv_in_kernel - 1) / 2)));
  time_embedding = register_module("time_embedding", TimestepEmbedding(c0, c.time_embed_dim()));

  UNetBlockOptions base;
  base.temb_channels = c.time_embed_dim();
  base.norm_groups = c.norm_num_groups;
  base.norm_eps = c.norm_eps;
  base.cross_attention_dim = c.cross_attention_dim;
  base.use_linear_projection = c.use_linear_projection;
  base.upcast_attention = c.upcast_attention;
  auto block_options = [&](size_t level) {
    UNetBlockOptions o = base;
    o.heads = c.heads(level);
    o.transformer_layers = c.transformer_layers(level);
    return o;
  };

  // Registration order follows diffusers' state dict: down_blocks, up_blocks, mid_block.
  down_blocks = register_module("down_blocks", torch::nn::ModuleList());
  int64_t output_channel = c0;
  for (size_t i = 0; i < n; ++i) {
    const int64_t input_channel = output_channel;
    output_channel = c.block_out_channels[i];
    down_.push_back(UNetDownBlock(input_channel, output_channel, c.layers(i),
                                  c.down_block_types[i] == "CrossAttnDownBlock2D",
                                  /*add_downsample=*/i + 1 < n, c.downsample_padding, block_options(i)));
    down_blocks->push_back(down_.back());
  }

  up_blocks = register_module("up_blocks", torch::nn::ModuleList());
  output_channel = c.block_out_channels[n - 1];
  for (size_t i = 0; i < n; ++i) {
    const size_t level = n - 1 - i;  // the down level this up block mirrors
    const int64_t prev_output_channel = output_channel;
    output_channel = c.block_out_channels[level];
    const int64_t input_channel = c.block_out_channels[level == 0 ? 0 : level - 1];
    up_.push_back(UNetUpBlock(input_channel, prev_output_channel, output_channel, c.layers(level) + 1,
                              c.up_block_types[i] == "CrossAttnUpBlock2D", /*add_upsample=*/i + 1 < n,
                              block_options(level)));
    up_blocks->push_back(up_.back());
  }

  mid_block = register_module("mid_block", UNetMidBlock(c.block_out_channels[n - 1], /*num_layers=*/1,
                                                        c.mid_block_scale_factor, block_options(n - 1)));
  conv_norm_out = register_module("conv_norm_out", MakeGroupNorm(c.norm_num_groups, c0, c.norm_eps));
  conv_out = register_module("conv_out", torch::nn::Conv2d(torch::nn::Conv2dOptions(c0, c.out_channels, c.conv_out_kernel)
                                                                .padding((c.conv_out_kernel - 1) / 2)));

  for (const CrossAttentionRef& ref : cross_attention_layers()) {
    cross_names_.push_back(ref.name);
    cross_widths_.push_back(ref.to_k->options.out_features());
  }
}

std::vector<CrossAttentionRef> UNet2DConditionModelImpl::cross_attention_layers() const {
  std::vector<CrossAttentionRef> out;
  for (size_t i = 0; i < down_.size(); ++i) {
    down_[i]->collect_cross_attention("down_blocks." + std::to_string(i) + ".", &out);
  }
  mid_block->collect_cross_attention("mid_block.", &out);
  for (size_t i = 0; i < up_.size(); ++i) up_[i]->collect_cross_attention("up_blocks." + std::to_string(i) + ".", &out);
  return out;
}

std::vector<CrossAttnKV> UNet2DConditionModelImpl::precompute_kv(const at::Tensor& encoder_hidden_states) const {
  const at::Tensor& text = encoder_hidden_states;
  TORCH_CHECK_VALUE(text.defined() && text.dim() == 3 && text.size(2) == config_.cross_attention_dim,
                    "UNet: encoder_hidden_states must be [B, S, cross_attention_dim = ", config_.cross_attention_dim,
                    "], got shape ", ShapeOf(text));
  std::vector<CrossAttnKV> kv;
  for (CrossAttentionRef ref : cross_attention_layers()) {
    kv.push_back({ref.to_k(text), ref.to_v(text)});  // [B, S, inner] each
  }
  return kv;
}

void UNet2DConditionModelImpl::check_kv(const std::vector<CrossAttnKV>& kv, int64_t batch) const {
  TORCH_CHECK_VALUE(kv.size() == cross_names_.size(), "UNet: kv has ", kv.size(),
                    " entries; expected one per cross-attention layer (", cross_names_.size(),
                    ", see cross_attention_layers())");
  for (size_t i = 0; i < kv.size(); ++i) {
    const at::Tensor& k = kv[i].k;
    const at::Tensor& v = kv[i].v;
    const int64_t w = cross_widths_[i];
    for (const auto& [t, what] : {std::make_pair(&k, ".k"), std::make_pair(&v, ".v")}) {
      TORCH_CHECK_VALUE(t->defined() && t->dim() == 3 && (t->size(0) == batch || t->size(0) == 1) && t->size(2) == w,
                        "UNet: kv[", i, "]", what, " (", cross_names_[i], ") has shape ", ShapeOf(*t), "; expected [",
                        batch, " (or 1), S, ", w, "]");
    }
    TORCH_CHECK_VALUE(k.size(0) == v.size(0) && k.size(1) == v.size(1), "UNet: kv[", i, "] (", cross_names_[i],
                      "): k has shape ", ShapeOf(k), " but v has shape ", ShapeOf(v), " (batch and length must agree)");
  }
}

at::Tensor UNet2DConditionModelImpl::time_embed(const at::Tensor& timesteps, c10::ScalarType dtype) {
  at::Tensor t_emb = TimestepSinusoidalEmbedding(timesteps, config_.block_out_channels[0], config_.flip_sin_to_cos,
                                                 config_.freq_shift);  // [B, C0] float32
  return time_embedding(t_emb.to(dtype));                            // [B, time_embed_dim]
}

at::Tensor UNet2DConditionModelImpl::forward(const at::Tensor& sample, const at::Tensor& timesteps,
                                             const std::vector<CrossAttnKV>& kv) {
  const UNetConfig& c = config_;
  TORCH_CHECK_VALUE(sample.defined() && sample.dim() == 4 && sample.size(1) == c.in_channels,
                    "UNet: sample must be [B, in_channels = ", c.in_channels, ", H, W], got shape ", ShapeOf(sample));
  const int64_t batch = sample.size(0);
  TORCH_CHECK_VALUE(sample.size(2) >= 1 && sample.size(3) >= 1, "UNet: sample has an empty spatial size: ",
                    ShapeOf(sample));
  TORCH_CHECK_VALUE(timesteps.defined() && timesteps.dim() <= 1 && (timesteps.numel() == 1 || timesteps.numel() == batch),
                    "UNet: timesteps must be a scalar, [1] or [B = ", batch, "], got shape ", ShapeOf(timesteps));
  check_kv(kv, batch);

  // Timestep embedding (float32 sinusoid, then the model dtype).
  at::Tensor t = timesteps.reshape({-1}).to(sample.device());
  if (t.numel() != batch) t = t.expand({batch});
  const at::Tensor emb = time_embed(t, sample.scalar_type());  // [B, 4 C0]

  // diffusers passes the skip's size to an upsampler when the input is not a multiple of 2^ups.
  const int64_t up_factor = int64_t{1} << (up_.size() - 1);
  const bool forward_upsample_size = sample.size(2) % up_factor != 0 || sample.size(3) % up_factor != 0;

  at::Tensor h = c.center_input_sample ? sample * 2.0 - 1.0 : sample;
  CrossAttnKVCursor cursor{&kv, 0};
  h = conv_in(h);  // [B, C0, H, W]
  std::vector<at::Tensor> skips{h};
  for (auto& block : down_) h = block(h, emb, cursor, &skips);  // [B, C_last, H/2^(n-1), W/2^(n-1)]
  h = mid_block(h, emb, cursor);
  for (size_t i = 0; i < up_.size(); ++i) {
    std::vector<int64_t> upsample_size;
    const size_t consumed = static_cast<size_t>(up_[i]->num_layers());
    if (forward_upsample_size && i + 1 < up_.size() && skips.size() > consumed) {
      const at::Tensor& next_skip = skips[skips.size() - consumed - 1];
      upsample_size = {next_skip.size(2), next_skip.size(3)};
    }
    h = up_[i](h, emb, cursor, &skips, upsample_size);  // [B, C_level, ...]
  }
  h = conv_out(Silu(conv_norm_out(h)));  // [B, out_channels, H, W]
  return h;
}

at::Tensor UNet2DConditionModelImpl::forward(const at::Tensor& sample, const at::Tensor& timesteps,
                                             const at::Tensor& encoder_hidden_states) {
  return forward(sample, timesteps, precompute_kv(encoder_hidden_states));
}

}  // namespace perfusion

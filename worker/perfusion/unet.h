// unet: the Stable Diffusion 1.x denoiser, diffusers' UNet2DConditionModel, in LibTorch; with the
// cross-attention K/V computed once per prompt (what Perfusion edits) and reused at every step.
//
// Ref: diffusers v0.25.0 `models/unets/unet_2d_condition.py` (UNet2DConditionModel),
//      `models/unets/unet_2d_blocks.py` (CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn,
//      UpBlock2D, CrossAttnUpBlock2D), `models/transformers/transformer_2d.py` (Transformer2DModel,
//      continuous input), `models/attention.py` (BasicTransformerBlock, FeedForward, GEGLU),
//      `models/embeddings.py` (get_timestep_embedding, TimestepEmbedding), `attention_processor.py`
//      (Attention + AttnProcessor). Numerics: ../shared/data/conformance/models/README.md.
// Submodules are registered under the diffusers state-dict names (`down_blocks.0.attentions.0.
// transformer_blocks.0.attn2.to_k.weight`, ...) in diffusers' order, so a diffusers
// `diffusion_pytorch_model.safetensors` loads by lookup (perfusion/module_io.h: LoadStateDict).
//
// Device/dtype: nothing is hard-coded. Move the model with `model->to(device, dtype)`; inputs must be
// on the model's device. The sinusoidal timestep embedding is computed in float32 whatever the
// model dtype (as diffusers does), then cast to the sample's dtype. Every module supports autograd
// (the tiny model is trained with this code); run inference under c10::InferenceMode.
//
// Thread safety: forward() and precompute_kv() do not mutate the module; concurrent calls on one
// instance are safe. Editing weights (e.g. through cross_attention_layers()) while another thread
// runs forward() is a data race: the caller serialises those.
#pragma once

#include <ATen/core/Tensor.h>
#include <nlohmann/json_fwd.hpp>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "perfusion/nn_blocks.h"

namespace perfusion {

// --- Configuration -----------------------------------------------------------------------------

// UNet2DConditionModel hyper-parameters, with diffusers' key names. Defaults are SD 1.5's
// (unet/config.json of runwayml/stable-diffusion-v1-5), so `UNetConfig{}` builds the SD 1.5 UNet.
// Per-block lists (`layers_per_block`, `attention_head_dim`, `num_attention_heads`,
// `transformer_layers_per_block`) hold one value for every down block, or one value per down block
// (the up blocks use them reversed, the mid block uses the last), as diffusers does.
struct UNetConfig {
  int64_t in_channels = 4;
  int64_t out_channels = 4;
  // Latent height/width the model was trained at (informational; any size runs).
  int64_t sample_size = 64;
  // Per-level channel counts; level 0's count is also the timestep-projection width C0.
  std::vector<int64_t> block_out_channels = {320, 640, 1280, 1280};
  // Supported: "CrossAttnDownBlock2D", "DownBlock2D".
  std::vector<std::string> down_block_types = {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                               "CrossAttnDownBlock2D", "DownBlock2D"};
  // Supported: "UNetMidBlock2DCrossAttn".
  std::string mid_block_type = "UNetMidBlock2DCrossAttn";
  // Supported: "UpBlock2D", "CrossAttnUpBlock2D".
  std::vector<std::string> up_block_types = {"UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                             "CrossAttnUpBlock2D"};
  // ResNet layers per down block (up blocks have one more, for the extra skip connection).
  std::vector<int64_t> layers_per_block = {2};
  // Transformer blocks per Transformer2DModel.
  std::vector<int64_t> transformer_layers_per_block = {1};
  // Width of the text encoding (encoder_hidden_states' last dimension). SD 1.x: 768.
  int64_t cross_attention_dim = 768;
  // SD 1.x naming quirk: this is the NUMBER OF HEADS (head width = channels / heads), used when
  // num_attention_heads is empty, exactly as diffusers does.
  std::vector<int64_t> attention_head_dim = {8};
  // Number of heads; empty = attention_head_dim.
  std::vector<int64_t> num_attention_heads = {};
  // Transformer2DModel proj_in/proj_out: Linear when true (SD 2.x), 1x1 Conv2d when false (SD 1.x).
  bool use_linear_projection = false;
  // Compute attention (scores, softmax, weighted sum) in float32 whatever the model dtype (SD 2.1).
  bool upcast_attention = false;
  // ResNet / output GroupNorms (the Transformer2DModel input norm always uses 1e-6).
  int64_t norm_num_groups = 32;
  double norm_eps = 1e-5;
  // Timestep embedding: [cos, sin] when flip_sin_to_cos, frequencies exp(-ln(1e4) i / (C0/2 - shift)).
  bool flip_sin_to_cos = true;
  double freq_shift = 0.0;
  // Width of the time embedding (time_embedding.linear_1's output); 0 = 4 * block_out_channels[0].
  int64_t time_embedding_dim = 0;
  bool center_input_sample = false;  // sample = 2 * sample - 1 before conv_in
  int64_t downsample_padding = 1;
  double mid_block_scale_factor = 1.0;
  int64_t conv_in_kernel = 3;
  int64_t conv_out_kernel = 3;

  // SD 1.5's configuration (the defaults).
  static UNetConfig SD15() { return UNetConfig{}; }
  // Reads a diffusers UNet2DConditionModel config (missing or null keys keep the SD 1.5 defaults;
  // unknown keys are ignored). Keys this engine does not implement (class embeddings, addition
  // embeddings, other block types, ...) must be absent, null or at their default: otherwise throws
  // c10::ValueError naming the key and value. The result is Validate()d.
  static UNetConfig FromJson(const nlohmann::json& config);
  static UNetConfig FromJsonString(const std::string& text);
  // Reads `path` (a config.json). Throws c10::Error naming the path if unreadable or malformed.
  static UNetConfig FromFile(const std::string& path);
  // diffusers-compatible config.json content (round-trips through FromJson).
  nlohmann::json ToJson() const;
  std::string ToJsonString() const;

  // Checks consistency (list lengths, block types, divisibility of channels by heads and groups).
  // Throws c10::ValueError naming the field and the values.
  void Validate() const;

  // Resolved per-down-block values (lists of one value broadcast to every block).
  int64_t heads(size_t block) const;
  int64_t layers(size_t block) const;
  int64_t transformer_layers(size_t block) const;
  int64_t time_embed_dim() const { return time_embedding_dim > 0 ? time_embedding_dim : 4 * block_out_channels.at(0); }
};

// --- Timestep embedding ------------------------------------------------------------------------

// diffusers get_timestep_embedding (Timesteps module, scale 1, max_period 10000):
// timesteps [N] (any integer or floating dtype) -> float32 [N, dim] on timesteps' device:
// arg = t.float() * exp(-ln(10000) * arange(half, float32) / (half - freq_shift)),
// [sin(arg), cos(arg)] ([cos, sin] when flip_sin_to_cos), zero-padded to an odd dim.
at::Tensor TimestepSinusoidalEmbedding(const at::Tensor& timesteps, int64_t dim, bool flip_sin_to_cos,
                                       double freq_shift);

// diffusers TimestepEmbedding: linear_2(silu(linear_1(t_emb))).
class TimestepEmbeddingImpl : public torch::nn::Module {
 public:
  TimestepEmbeddingImpl(int64_t in_channels, int64_t time_embed_dim);
  at::Tensor forward(const at::Tensor& t_emb);  // [B, in_channels] -> [B, time_embed_dim]

  torch::nn::Linear linear_1{nullptr};
  torch::nn::Linear linear_2{nullptr};
};
TORCH_MODULE(TimestepEmbedding);

// --- Cross-attention K/V (what Perfusion edits) --------------------------------------------------

// One cross-attention layer's K and V projections (shared with the model: editing their weights
// edits the model). `name` is the attention module's diffusers path.
struct CrossAttentionRef {
  std::string name;  // e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
  torch::nn::Linear to_k;
  torch::nn::Linear to_v;
};

// K and V of one cross-attention layer for one text encoding: [B, S, inner_dim] each, already
// projected (before the head split).
struct CrossAttnKV {
  at::Tensor k;
  at::Tensor v;
};

// --- Attention and transformer blocks -----------------------------------------------------------

struct UNetAttentionOptions {
  UNetAttentionOptions(int64_t query_dim, int64_t heads, int64_t dim_head)
      : query_dim_(query_dim), heads_(heads), dim_head_(dim_head) {}
  TORCH_ARG(int64_t, query_dim);
  TORCH_ARG(int64_t, heads);
  TORCH_ARG(int64_t, dim_head);
  // Width of the K/V source; 0 = query_dim (self-attention).
  TORCH_ARG(int64_t, cross_attention_dim) = 0;
  TORCH_ARG(bool, upcast_attention) = false;
};

// diffusers Attention as the UNet uses it: to_q/to_k/to_v (no bias), to_out.0 (bias); heads of
// width dim_head, scores scaled by dim_head^-0.5 (perfusion::MultiHeadAttention). Long query
// sequences are processed in row chunks so the score matrix stays under 2^25 elements (128 MiB in
// fp32) per chunk: the same result, with a bounded peak memory at 64x64 latents.
class UNetAttentionImpl : public torch::nn::Module {
 public:
  explicit UNetAttentionImpl(const UNetAttentionOptions& options);
  // Self-attention: x [B, N, query_dim] -> [B, N, query_dim].
  at::Tensor forward(const at::Tensor& x);
  // Attention on projected keys/values: x [B, N, query_dim], k/v [B, S, inner] -> [B, N, query_dim].
  at::Tensor forward_kv(const at::Tensor& x, const at::Tensor& k, const at::Tensor& v);
  int64_t inner_dim() const { return options_.heads() * options_.dim_head(); }
  const UNetAttentionOptions& options() const { return options_; }

  torch::nn::Linear to_q{nullptr};
  torch::nn::Linear to_k{nullptr};
  torch::nn::Linear to_v{nullptr};
  torch::nn::ModuleList to_out{nullptr};  // [0]: Linear(inner, query_dim) with bias
  torch::nn::Linear to_out_0{nullptr};     // the same module as to_out[0]

 private:
  UNetAttentionOptions options_;
};
TORCH_MODULE(UNetAttention);

// diffusers GEGLU: proj (dim -> 2 inner), first half * gelu(second half) with the exact erf GELU.
class GEGLUImpl : public torch::nn::Module {
 public:
  GEGLUImpl(int64_t dim, int64_t inner_dim);
  at::Tensor forward(const at::Tensor& x);  // [..., dim] -> [..., inner_dim]
  torch::nn::Linear proj{nullptr};
};
TORCH_MODULE(GEGLU);

// diffusers FeedForward (activation "geglu", mult 4): net.0 = GEGLU, net.1 = dropout (p = 0,
// identity), net.2 = Linear(4 dim, dim).
class FeedForwardImpl : public torch::nn::Module {
 public:
  explicit FeedForwardImpl(int64_t dim);
  at::Tensor forward(const at::Tensor& x);  // [..., dim] -> [..., dim]
  torch::nn::ModuleList net{nullptr};
  GEGLU geglu{nullptr};           // net[0]
  torch::nn::Linear out{nullptr};  // net[2]
};
TORCH_MODULE(FeedForward);

// diffusers BasicTransformerBlock (layer_norm, GEGLU): x += attn1(norm1(x)); x += attn2(norm2(x), text);
// x += ff(norm3(x)). LayerNorm eps 1e-5.
class BasicTransformerBlockImpl : public torch::nn::Module {
 public:
  BasicTransformerBlockImpl(int64_t dim, int64_t heads, int64_t dim_head, int64_t cross_attention_dim,
                            bool upcast_attention);
  // x [B, N, dim], kv: this block's attn2 K/V ([B or 1, S, dim] each) -> [B, N, dim]
  at::Tensor forward(const at::Tensor& x, const CrossAttnKV& kv);

  torch::nn::LayerNorm norm1{nullptr};
  UNetAttention attn1{nullptr};
  torch::nn::LayerNorm norm2{nullptr};
  UNetAttention attn2{nullptr};
  torch::nn::LayerNorm norm3{nullptr};
  FeedForward ff{nullptr};
};
TORCH_MODULE(BasicTransformerBlock);

// Cursor over the per-layer K/V list during one forward pass (cross-attention layers consume
// entries in forward order).
struct CrossAttnKVCursor {
  const std::vector<CrossAttnKV>* kv = nullptr;
  size_t next = 0;
  const CrossAttnKV& take();
};

// diffusers Transformer2DModel (continuous input): norm (GroupNorm, eps 1e-6), proj_in (1x1 conv or
// Linear), transformer_blocks, proj_out, plus the residual.
class Transformer2DModelImpl : public torch::nn::Module {
 public:
  Transformer2DModelImpl(int64_t channels, int64_t heads, int64_t num_layers, int64_t norm_groups,
                         int64_t cross_attention_dim, bool use_linear_projection, bool upcast_attention);
  // x [B, C, H, W] -> [B, C, H, W]; takes num_layers entries from `kv`.
  at::Tensor forward(const at::Tensor& x, CrossAttnKVCursor& kv);
  // Appends `prefix + "transformer_blocks.N.attn2"` for each block.
  void collect_cross_attention(const std::string& prefix, std::vector<CrossAttentionRef>* out) const;

  torch::nn::GroupNorm norm{nullptr};
  torch::nn::Conv2d proj_in_conv{nullptr};  // registered as proj_in when !use_linear_projection
  torch::nn::Linear proj_in_linear{nullptr};  // registered as proj_in when use_linear_projection
  torch::nn::ModuleList transformer_blocks{nullptr};
  torch::nn::Conv2d proj_out_conv{nullptr};
  torch::nn::Linear proj_out_linear{nullptr};

 private:
  std::vector<BasicTransformerBlock> blocks_;
};
TORCH_MODULE(Transformer2DModel);

// --- Down / mid / up blocks ---------------------------------------------------------------------

// Settings shared by every block of one UNet.
struct UNetBlockOptions {
  int64_t temb_channels = 1280;
  int64_t norm_groups = 32;
  double norm_eps = 1e-5;
  int64_t heads = 8;  // attention heads (when the block has attentions)
  int64_t transformer_layers = 1;
  int64_t cross_attention_dim = 768;
  bool use_linear_projection = false;
  bool upcast_attention = false;
};

// CrossAttnDownBlock2D (with_attention) or DownBlock2D: `num_layers` x (resnet [, attention]), then
// an optional stride-2 downsampler. Names: attentions.N, resnets.N, downsamplers.0.
class UNetDownBlockImpl : public torch::nn::Module {
 public:
  UNetDownBlockImpl(int64_t in_channels, int64_t out_channels, int64_t num_layers, bool with_attention,
                    bool add_downsample, int64_t downsample_padding, const UNetBlockOptions& options);
  // x [B, in, H, W] -> [B, out, H', W'] (H' = ceil(H/2) with a downsampler); appends every
  // intermediate output (the skip connections) to `skips`.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb, CrossAttnKVCursor& kv,
                     std::vector<at::Tensor>* skips);
  void collect_cross_attention(const std::string& prefix, std::vector<CrossAttentionRef>* out) const;

  torch::nn::ModuleList attentions{nullptr};  // null for DownBlock2D
  torch::nn::ModuleList resnets{nullptr};
  torch::nn::ModuleList downsamplers{nullptr};  // null without a downsampler

 private:
  std::vector<ResnetBlock2D> resnets_;
  std::vector<Transformer2DModel> attentions_;
  Downsample2D downsampler_{nullptr};
};
TORCH_MODULE(UNetDownBlock);

// UNetMidBlock2DCrossAttn: resnets.0, then (attentions.i, resnets.i+1) for each layer.
class UNetMidBlockImpl : public torch::nn::Module {
 public:
  UNetMidBlockImpl(int64_t channels, int64_t num_layers, double output_scale_factor,
                   const UNetBlockOptions& options);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb, CrossAttnKVCursor& kv);  // [B, C, h, w]
  void collect_cross_attention(const std::string& prefix, std::vector<CrossAttentionRef>* out) const;

  torch::nn::ModuleList attentions{nullptr};
  torch::nn::ModuleList resnets{nullptr};

 private:
  std::vector<ResnetBlock2D> resnets_;
  std::vector<Transformer2DModel> attentions_;
};
TORCH_MODULE(UNetMidBlock);

// CrossAttnUpBlock2D (with_attention) or UpBlock2D: `num_layers` x (concat a skip, resnet
// [, attention]), then an optional nearest-x2 upsampler with a 3x3 conv. Names: attentions.N,
// resnets.N, upsamplers.0.
class UNetUpBlockImpl : public torch::nn::Module {
 public:
  UNetUpBlockImpl(int64_t in_channels, int64_t prev_output_channels, int64_t out_channels, int64_t num_layers,
                  bool with_attention, bool add_upsample, const UNetBlockOptions& options);
  // x [B, prev, h, w] -> [B, out, 2h, 2w] (or `upsample_size`); pops num_layers skips from the back.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb, CrossAttnKVCursor& kv,
                     std::vector<at::Tensor>* skips, const std::vector<int64_t>& upsample_size);
  void collect_cross_attention(const std::string& prefix, std::vector<CrossAttentionRef>* out) const;
  int64_t num_layers() const { return static_cast<int64_t>(resnets_.size()); }

  torch::nn::ModuleList attentions{nullptr};  // null for UpBlock2D
  torch::nn::ModuleList resnets{nullptr};
  torch::nn::ModuleList upsamplers{nullptr};  // null without an upsampler

 private:
  std::vector<ResnetBlock2D> resnets_;
  std::vector<Transformer2DModel> attentions_;
  Upsample2D upsampler_{nullptr};
};
TORCH_MODULE(UNetUpBlock);

// --- UNet2DConditionModel -----------------------------------------------------------------------

// The denoiser: epsilon = unet(noisy latents, timestep, text K/V).
//
// Usage (one prompt, many steps):
//   UNet2DConditionModel unet(UNetConfig::FromFile(dir + "/config.json"));
//   LoadStateDict(*unet, dir + "/diffusion_pytorch_model.safetensors");
//   c10::InferenceMode guard;
//   auto kv = unet->precompute_kv(text);                  // once per prompt
//   for (t : timesteps) eps = unet->forward(latents, t, kv);
class UNet2DConditionModelImpl : public torch::nn::Module {
 public:
  explicit UNet2DConditionModelImpl(const UNetConfig& config);

  // Every attn2 (cross-attention) layer in forward order (down, mid, up): the projections to edit.
  // (SD 1.5: 16 layers, to_k/to_v output widths summing to 12,480.)
  std::vector<CrossAttentionRef> cross_attention_layers() const;

  // K/V of every attn2 from the text encoding [B, S, cross_attention_dim]: plain to_k / to_v
  // projections, one entry per cross_attention_layers() entry, in the same order.
  // Throws c10::ValueError when encoder_hidden_states is not [B, S, cross_attention_dim].
  std::vector<CrossAttnKV> precompute_kv(const at::Tensor& encoder_hidden_states) const;

  // Denoiser output (epsilon) [B, out_channels, h, w] for sample [B, in_channels, h, w] (any h, w)
  // and timesteps (int64 or floating; a scalar, [1] (shared by the batch) or [B]), with K/V from
  // precompute_kv (or edited equivalents): one entry per cross_attention_layers() entry, in the same
  // order, each k and v [Bkv, S, inner_dim of that layer] with Bkv == B, or Bkv == 1 (one prompt
  // broadcast to the whole batch); S may differ between entries but k and v of one entry agree.
  // Throws c10::ValueError naming the tensor and both shapes when any of this does not hold.
  at::Tensor forward(const at::Tensor& sample, const at::Tensor& timesteps, const std::vector<CrossAttnKV>& kv);
  // Convenience: forward(sample, t, precompute_kv(encoder_hidden_states)).
  at::Tensor forward(const at::Tensor& sample, const at::Tensor& timesteps, const at::Tensor& encoder_hidden_states);

  // The sinusoidal projection followed by time_embedding, for timesteps already shaped [B]:
  // [B, time_embed_dim] in `dtype` (exposed for tests and diagnostics).
  at::Tensor time_embed(const at::Tensor& timesteps, c10::ScalarType dtype);

  const UNetConfig& config() const { return config_; }

  torch::nn::Conv2d conv_in{nullptr};
  TimestepEmbedding time_embedding{nullptr};
  torch::nn::ModuleList down_blocks{nullptr};
  torch::nn::ModuleList up_blocks{nullptr};
  UNetMidBlock mid_block{nullptr};
  torch::nn::GroupNorm conv_norm_out{nullptr};
  torch::nn::Conv2d conv_out{nullptr};

 private:
  void check_kv(const std::vector<CrossAttnKV>& kv, int64_t batch) const;

  UNetConfig config_;
  std::vector<UNetDownBlock> down_;
  std::vector<UNetUpBlock> up_;
  // Cached from cross_attention_layers() at construction, for input checks.
  std::vector<std::string> cross_names_;
  std::vector<int64_t> cross_widths_;
};
TORCH_MODULE(UNet2DConditionModel);

}  // namespace perfusion

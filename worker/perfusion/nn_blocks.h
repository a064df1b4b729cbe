// nn_blocks: building blocks shared by the SD 1.x model parts (UNet, VAE, CLIP text encoder):
// GroupNorm construction, ResnetBlock2D (optional time embedding), Downsample2D, Upsample2D and a
// plain multi-head scaled-dot-product attention on matmul + softmax.
//
// Ref: diffusers v0.25.0 `models/resnet.py` (ResnetBlock2D, time_embedding_norm="default"),
//      `models/downsampling.py` (Downsample2D), `models/upsampling.py` (Upsample2D),
//      `models/attention_processor.py` (Attention + AttnProcessor: scores, softmax, bmm).
// Submodules are registered under the diffusers names (`norm1`, `conv1`, `time_emb_proj`, `norm2`,
// `conv2`, `conv_shortcut`; `conv` for Down/Upsample2D), so a checkpoint loads by lookup.
//
// Device/dtype: nothing is hard-coded; every block runs on the device and in the dtype of its
// parameters and inputs (fp32/fp16/bf16). Attention can upcast the softmax to float32
// (`upcast_softmax`), as diffusers' VAE does. All blocks support autograd.
//
// Thread safety: forward() does not mutate the module; concurrent forward() calls on one instance
// are safe (as for any torch::nn::Module without training-time state).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <vector>

namespace perfusion {

// A GroupNorm over `channels` in `groups` groups with epsilon `eps` and a learnt affine.
// REQUIRES: channels % groups == 0 (otherwise throws c10::ValueError naming both).
torch::nn::GroupNorm MakeGroupNorm(int64_t groups, int64_t channels, double eps);

// --- Attention --------------------------------------------------------------------------------

// Additive attention bias for causal (autoregressive) self-attention: [S, S], 0 on and below the
// diagonal, -inf above it, in `options`' dtype and device. Broadcasts against [B, heads, S, S].
at::Tensor CausalAttentionBias(int64_t seq_len, const at::TensorOptions& options);

// Additive bias from a key-padding mask `keep` [B, Sk] (bool; true = attend to this key, false =
// ignore it): [B, 1, 1, Sk] with 0 where keep and -inf elsewhere, in `options`' dtype/device.
// A query row whose keys are all masked yields NaN: callers keep at least one key per row.
at::Tensor KeyPaddingAttentionBias(const at::Tensor& keep, const at::TensorOptions& options);

struct AttentionOptions {
  // Number of heads; head h uses channels [h*C/heads, (h+1)*C/heads) of q, k and v.
  int64_t heads = 1;
  // Score scale; <= 0 means (C / heads)^-0.5 (C = q's channel count), as diffusers and transformers.
  double scale = 0.0;
  // Compute the softmax in float32 and cast the probabilities back (diffusers `upcast_softmax`).
  bool upcast_softmax = false;
};

// Multi-head scaled-dot-product attention (no projections):
//   q [B, Sq, C], k [B, Sk, C], v [B, Sk, Cv]  ->  [B, Sq, Cv]
// softmax(scale * q_h k_hᵀ + bias) v_h per head, heads concatenated along the channels.
// `bias` (optional, additive) broadcasts against [B, heads, Sq, Sk] (e.g. CausalAttentionBias,
// KeyPaddingAttentionBias, or their sum). Uses matmul (never baddbmm, see README pitfall).
// Throws c10::ValueError naming the shapes when ranks, batch, lengths or head split do not fit.
at::Tensor MultiHeadAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const AttentionOptions& options, const at::Tensor& bias = {});

// --- ResnetBlock2D ----------------------------------------------------------------------------

struct ResnetBlock2DOptions {
  ResnetBlock2DOptions(int64_t in_channels, int64_t out_channels)
      : in_channels_(in_channels), out_channels_(out_channels) {}
  TORCH_ARG(int64_t, in_channels);
  // Output channels; a 1x1 `conv_shortcut` is added when they differ from in_channels.
  TORCH_ARG(int64_t, out_channels);
  // Time-embedding width; 0 = no time embedding (the VAE), else a Linear `time_emb_proj`
  // (temb_channels -> out_channels) whose output is added after conv1 (SD UNet: 4 * C0 = 1280).
  TORCH_ARG(int64_t, temb_channels) = 0;
  // GroupNorm groups (norm1 on in_channels, norm2 on out_channels). SD: 32.
  TORCH_ARG(int64_t, groups) = 32;
  // GroupNorm epsilon: 1e-5 in the SD UNet, 1e-6 in the VAE.
  TORCH_ARG(double, eps) = 1e-6;
  // Output is (shortcut + residual) / output_scale_factor. SD: 1.0.
  TORCH_ARG(double, output_scale_factor) = 1.0;
};

// diffusers ResnetBlock2D (time_embedding_norm "default", SiLU, no dropout at inference):
//   h = conv1(silu(norm1(x))); h += time_emb_proj(silu(temb))[:, :, None, None] (if temb);
//   h = conv2(silu(norm2(h))); out = (shortcut(x) + h) / output_scale_factor.
class ResnetBlock2DImpl : public torch::nn::Module {
 public:
  explicit ResnetBlock2DImpl(const ResnetBlock2DOptions& options);

  // x [B, in_channels, H, W], temb [B, temb_channels] (or undefined)  ->  [B, out_channels, H, W]
  // REQUIRES: temb is defined iff options.temb_channels() > 0.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb = {});

  const ResnetBlock2DOptions& options() const { return options_; }

  torch::nn::GroupNorm norm1{nullptr};
  torch::nn::Conv2d conv1{nullptr};
  torch::nn::Linear time_emb_proj{nullptr};  // null when temb_channels == 0
  torch::nn::GroupNorm norm2{nullptr};
  torch::nn::Conv2d conv2{nullptr};
  torch::nn::Conv2d conv_shortcut{nullptr};  // null when in_channels == out_channels

 private:
  ResnetBlock2DOptions options_;
};
TORCH_MODULE(ResnetBlock2D);

// --- Downsample2D / Upsample2D ----------------------------------------------------------------

struct Downsample2DOptions {
  Downsample2DOptions(int64_t channels, int64_t out_channels)
      : channels_(channels), out_channels_(out_channels) {}
  TORCH_ARG(int64_t, channels);
  TORCH_ARG(int64_t, out_channels);
  // Convolution padding. 1 in the SD UNet. 0 in the VAE encoder, where the input is first padded
  // by (0, 1, 0, 1) (right and bottom) with zeros, as diffusers does for padding == 0.
  TORCH_ARG(int64_t, padding) = 1;
};

// diffusers Downsample2D with use_conv: a 3x3 stride-2 convolution registered as `conv`.
class Downsample2DImpl : public torch::nn::Module {
 public:
  explicit Downsample2DImpl(const Downsample2DOptions& options);
  // x [B, channels, H, W]  ->  [B, out_channels, H', W']: H' = ceil(H/2) with padding 1,
  // floor(H/2) with padding 0 (after the (0, 1, 0, 1) pad).
  at::Tensor forward(const at::Tensor& x);
  const Downsample2DOptions& options() const { return options_; }

  torch::nn::Conv2d conv{nullptr};

 private:
  Downsample2DOptions options_;
};
TORCH_MODULE(Downsample2D);

struct Upsample2DOptions {
  Upsample2DOptions(int64_t channels, int64_t out_channels)
      : channels_(channels), out_channels_(out_channels) {}
  TORCH_ARG(int64_t, channels);
  TORCH_ARG(int64_t, out_channels);
};

// diffusers Upsample2D with use_conv: nearest-neighbour x2 (or to `output_size`), then a 3x3
// convolution (padding 1) registered as `conv`.
class Upsample2DImpl : public torch::nn::Module {
 public:
  explicit Upsample2DImpl(const Upsample2DOptions& options);
  // x [B, channels, H, W]  ->  [B, out_channels, 2H, 2W], or [B, out_channels, oh, ow] when
  // output_size = {oh, ow} is given (the UNet passes the skip connection's size when it is odd).
  at::Tensor forward(const at::Tensor& x, c10::optional<std::vector<int64_t>> output_size = c10::nullopt);
  const Upsample2DOptions& options() const { return options_; }

  torch::nn::Conv2d conv{nullptr};

 private:
  Upsample2DOptions options_;
};
TORCH_MODULE(Upsample2D);

}  // namespace perfusion

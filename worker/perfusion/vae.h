// vae: the SD 1.x autoencoder (AutoencoderKL): an image [-1, 1] <-> latent (8x smaller in SD 1.5)
// mapping. The encoder gives a diagonal Gaussian over latents (its "moments"); the decoder maps a
// latent back to an image. The scaling factor (0.18215) is the caller's business, as in diffusers:
// latents = encode(x).sample() * scaling_factor(), x = decode(latents / scaling_factor()).
//
// Ref: diffusers v0.25.0 `models/autoencoders/autoencoder_kl.py` (AutoencoderKL),
//      `models/autoencoders/vae.py` (Encoder, Decoder, DiagonalGaussianDistribution),
//      `models/unet_2d_blocks.py` (DownEncoderBlock2D, UpDecoderBlock2D, UNetMidBlock2D),
//      `models/attention_processor.py` (Attention with group_norm, residual, upcast softmax).
// Submodules carry the diffusers names (`encoder.down_blocks.0.resnets.0.conv1`,
// `decoder.mid_block.attentions.0.to_out.0`, `quant_conv`, ...). Files with the legacy attention names
// (`query/key/value/proj_attn`) load through VaeLoadOptions() (name_conversion.h).
// Numerics: every GroupNorm uses eps 1e-6; mid-block attention is one head of width C with scale
// C^-0.5 and a float32 softmax; encoder downsampling pads (0, 1, 0, 1) then convolves 3x3 stride 2.
//
// Device/dtype: runs on the device and in the dtype of its parameters (move with ->to(...)); inputs
// must be on that device and are cast to the parameter dtype. Supports autograd and InferenceMode.
// Thread safety: encode/decode do not mutate the module; concurrent calls on one instance are safe.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
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

// AutoencoderKL config (diffusers `config.json`); defaults are SD 1.5's.
struct AutoencoderKLOptions {
  TORCH_ARG(int64_t, in_channels) = 3;
  TORCH_ARG(int64_t, out_channels) = 3;
  // One encoder down block (and one decoder up block) per entry; all but the last resample x2.
  TORCH_ARG(std::vector<int64_t>, block_out_channels) = std::vector<int64_t>{128, 256, 512, 512};
  // Resnets per encoder block (decoder blocks have layers_per_block + 1).
  TORCH_ARG(int64_t, layers_per_block) = 2;
  TORCH_ARG(int64_t, latent_channels) = 4;
  TORCH_ARG(int64_t, norm_num_groups) = 32;
  // Image size the model was trained at (informational).
  TORCH_ARG(int64_t, sample_size) = 512;
  TORCH_ARG(double, scaling_factor) = 0.18215;
  // Whether the 1x1 quant_conv / post_quant_conv exist (diffusers >= 0.28 config keys; SD: true).
  TORCH_ARG(bool, use_quant_conv) = true;
  TORCH_ARG(bool, use_post_quant_conv) = true;
  // Whether the encoder/decoder mid blocks have attention (SD: true).
  TORCH_ARG(bool, mid_block_add_attention) = true;
};

// Reads a diffusers AutoencoderKL `config.json` (text); absent keys keep SD 1.5 defaults. Throws
// c10::ValueError naming the field on malformed JSON, wrong types or values, block types other than
// DownEncoderBlock2D / UpDecoderBlock2D, a block-type count != len(block_out_channels), act_fn other
// than "silu", or norm_num_groups not dividing every block width.
AutoencoderKLOptions AutoencoderKLOptionsFromJson(const std::string& json_text);
AutoencoderKLOptions AutoencoderKLOptionsFromConfigFile(const std::string& path);

// The encoder's latent distribution N(mean, exp(logvar)) per element (diffusers
// DiagonalGaussianDistribution, deterministic = false).
struct DiagonalGaussian {
  // Builds it from quant_conv's output: moments [B, 2L, h, w] -> mean = moments[:, :L],
  // logvar = clamp(moments[:, L:], -30, 20), std = exp(0.5 logvar).
  static DiagonalGaussian FromMoments(const at::Tensor& moments);

  at::Tensor moments;  // [B, 2L, h, w], before the clamp
  at::Tensor mean;     // [B, L, h, w]
  at::Tensor logvar;   // [B, L, h, w], clamped
  at::Tensor std;      // [B, L, h, w]

  at::Tensor var() const;  // exp(logvar)
  // mean + std * N(0, 1), the noise drawn from `generator` (the default generator when absent) on
  // the generator's device, then moved to mean's device and dtype.
  at::Tensor sample(c10::optional<at::Generator> generator = c10::nullopt) const;
  at::Tensor mode() const { return mean; }
  // KL(N(mean, var) || N(0, 1)) summed over [L, h, w]: [B] (for training a VAE).
  at::Tensor kl() const;
};

// Mid-block self-attention (diffusers Attention as built for the VAE): GroupNorm, one head over all
// channels, residual. x [B, C, H, W] -> x + to_out(attn(group_norm(x))) [B, C, H, W].
class VaeAttentionImpl : public torch::nn::Module {
 public:
  VaeAttentionImpl(int64_t channels, int64_t groups, double eps);
  at::Tensor forward(const at::Tensor& x);

  torch::nn::GroupNorm group_norm{nullptr};
  torch::nn::Linear to_q{nullptr}, to_k{nullptr}, to_v{nullptr};
  torch::nn::ModuleList to_out{nullptr};  // "to_out.0" = Linear(C, C) (".1" is dropout: no weights)

 private:
  torch::nn::Linear out_proj_{nullptr};  // = to_out[0]
};
TORCH_MODULE(VaeAttention);

// UNetMidBlock2D without time embedding: resnets.0, then (attentions.i, resnets.i+1) per layer.
class VaeMidBlock2DImpl : public torch::nn::Module {
 public:
  VaeMidBlock2DImpl(int64_t channels, int64_t groups, bool add_attention);
  at::Tensor forward(const at::Tensor& x);  // [B, C, H, W] -> [B, C, H, W]

  torch::nn::ModuleList resnets{nullptr};
  torch::nn::ModuleList attentions{nullptr};  // empty when !add_attention (not registered)

 private:
  std::vector<ResnetBlock2D> resnet_list_;
  std::vector<VaeAttention> attention_list_;
};
TORCH_MODULE(VaeMidBlock2D);

// DownEncoderBlock2D: `num_layers` resnets, then an optional Downsample2D (pad (0,1,0,1), stride 2).
class DownEncoderBlock2DImpl : public torch::nn::Module {
 public:
  DownEncoderBlock2DImpl(int64_t in_channels, int64_t out_channels, int64_t num_layers, int64_t groups,
                         bool add_downsample);
  at::Tensor forward(const at::Tensor& x);  // [B, in, H, W] -> [B, out, H', W']

  torch::nn::ModuleList resnets{nullptr};
  torch::nn::ModuleList downsamplers{nullptr};  // registered only with add_downsample

 private:
  std::vector<ResnetBlock2D> resnet_list_;
  Downsample2D downsample_{nullptr};
};
TORCH_MODULE(DownEncoderBlock2D);

// UpDecoderBlock2D: `num_layers` resnets, then an optional Upsample2D (nearest x2, conv).
class UpDecoderBlock2DImpl : public torch::nn::Module {
 public:
  UpDecoderBlock2DImpl(int64_t in_channels, int64_t out_channels, int64_t num_layers, int64_t groups,
                       bool add_upsample);
  at::Tensor forward(const at::Tensor& x);  // [B, in, H, W] -> [B, out, H', W']

  torch::nn::ModuleList resnets{nullptr};
  torch::nn::ModuleList upsamplers{nullptr};  // registered only with add_upsample

 private:
  std::vector<ResnetBlock2D> resnet_list_;
  Upsample2D upsample_{nullptr};
};
TORCH_MODULE(UpDecoderBlock2D);

// Encoder: conv_in, down_blocks, mid_block, conv_norm_out, SiLU, conv_out (2 * latent channels).
class VaeEncoderImpl : public torch::nn::Module {
 public:
  explicit VaeEncoderImpl(const AutoencoderKLOptions& options);
  at::Tensor forward(const at::Tensor& x);  // [B, in, H, W] -> [B, 2L, H/f, W/f]

  torch::nn::Conv2d conv_in{nullptr};
  torch::nn::ModuleList down_blocks{nullptr};
  VaeMidBlock2D mid_block{nullptr};
  torch::nn::GroupNorm conv_norm_out{nullptr};
  torch::nn::Conv2d conv_out{nullptr};

 private:
  std::vector<DownEncoderBlock2D> block_list_;
};
TORCH_MODULE(VaeEncoder);

// Decoder: conv_in, mid_block, up_blocks, conv_norm_out, SiLU, conv_out.
class VaeDecoderImpl : public torch::nn::Module {
 public:
  explicit VaeDecoderImpl(const AutoencoderKLOptions& options);
  at::Tensor forward(const at::Tensor& z);  // [B, L, h, w] -> [B, out, h*f, w*f]

  torch::nn::Conv2d conv_in{nullptr};
  VaeMidBlock2D mid_block{nullptr};
  torch::nn::ModuleList up_blocks{nullptr};
  torch::nn::GroupNorm conv_norm_out{nullptr};
  torch::nn::Conv2d conv_out{nullptr};

 private:
  std::vector<UpDecoderBlock2D> block_list_;
};
TORCH_MODULE(VaeDecoder);

class AutoencoderKLImpl : public torch::nn::Module {
 public:
  explicit AutoencoderKLImpl(const AutoencoderKLOptions& options = {});

  // image [B, in_channels, H, W] in [-1, 1] -> latent distribution over [B, L, H/f, W/f]
  // (f = 2^(len(block_out_channels) - 1); each downsampling floors an odd size: 15 -> 7).
  // REQUIRES: rank 4, channels == in_channels, H, W >= 1 (else c10::ValueError naming the shapes).
  DiagonalGaussian encode(const at::Tensor& image);
  // latents [B, L, h, w] (already divided by scaling_factor) -> image [B, out_channels, h*f, w*f].
  at::Tensor decode(const at::Tensor& latents);

  double scaling_factor() const { return options_.scaling_factor(); }
  // Spatial factor between image and latent: 2^(len(block_out_channels) - 1) (SD 1.5: 8).
  int64_t downsample_factor() const;
  const AutoencoderKLOptions& options() const { return options_; }

  VaeEncoder encoder{nullptr};
  VaeDecoder decoder{nullptr};
  torch::nn::Conv2d quant_conv{nullptr};       // 2L -> 2L, 1x1 (null if !use_quant_conv)
  torch::nn::Conv2d post_quant_conv{nullptr};  // L -> L, 1x1 (null if !use_post_quant_conv)

 private:
  at::Tensor PrepareInput(const at::Tensor& x, int64_t channels, const char* what) const;
  AutoencoderKLOptions options_;
};
TORCH_MODULE(AutoencoderKL);

}  // namespace perfusion

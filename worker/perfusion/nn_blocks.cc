#include "perfusion/nn_blocks.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>

namespace perfusion {

torch::nn::GroupNorm MakeGroupNorm(int64_t groups, int64_t channels, double eps) {
  TORCH_CHECK_VALUE(groups > 0 && channels > 0 && channels % groups == 0, "GroupNorm: channels (", channels,
                    ") must be a positive multiple of groups (", groups, ")");
  return torch::nn::GroupNorm(torch::nn::GroupNormOptions(groups, channels).eps(eps).affine(true));
}

// --- Attention --------------------------------------------------------------------------------

at::Tensor CausalAttentionBias(int64_t seq_len, const at::TensorOptions& options) {
  TORCH_CHECK_VALUE(seq_len > 0, "CausalAttentionBias: seq_len must be positive, got ", seq_len);
  return at::full({seq_len, seq_len}, -std::numeric_limits<double>::infinity(), options).triu(/*diagonal=*/1);
}

at::Tensor KeyPaddingAttentionBias(const at::Tensor& keep, const at::TensorOptions& options) {
  TORCH_CHECK_VALUE(keep.dim() == 2 && keep.scalar_type() == at::kBool,
                    "KeyPaddingAttentionBias: keep must be a bool [B, Sk] tensor, got ", keep.scalar_type(), " ",
                    keep.sizes());
  const int64_t b = keep.size(0), sk = keep.size(1);
  auto keep4 = keep.to(options.device()).view({b, 1, 1, sk});
  return at::zeros({b, 1, 1, sk}, options).masked_fill(keep4.logical_not(), -std::numeric_limits<double>::infinity());
}

at::Tensor MultiHeadAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const AttentionOptions& options, const at::Tensor& bias) {
  TORCH_CHECK_VALUE(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
                    "MultiHeadAttention: q, k, v must be [B, S, C], got q ", q.sizes(), ", k ", k.sizes(), ", v ",
                    v.sizes());
  const int64_t b = q.size(0), sq = q.size(1), c = q.size(2);
  const int64_t sk = k.size(1), cv = v.size(2);
  const int64_t heads = options.heads;
  TORCH_CHECK_VALUE(k.size(0) == b && v.size(0) == b && k.size(2) == c && v.size(1) == sk,
                    "MultiHeadAttention: shapes do not fit: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(),
                    " (need k [B, Sk, C] and v [B, Sk, Cv] for q [B, Sq, C])");
  TORCH_CHECK_VALUE(heads > 0 && c % heads == 0 && cv % heads == 0, "MultiHeadAttention: heads (", heads,
                    ") must divide the channels of q/k (", c, ") and v (", cv, ")");
  const int64_t d = c / heads, dv = cv / heads;
  const double scale = options.scale > 0 ? options.scale : 1.0 / std::sqrt(static_cast<double>(d));

  // [B, S, C] -> [B, heads, S, C/heads]: head h takes channels [h*d, (h+1)*d).
  auto qh = q.reshape({b, sq, heads, d}).transpose(1, 2);
  auto kh = k.reshape({b, sk, heads, d}).transpose(1, 2);
  auto vh = v.reshape({b, sk, heads, dv}).transpose(1, 2);
  auto scores = at::matmul(qh, kh.transpose(-1, -2)).mul_(scale);  // [B, heads, Sq, Sk]
  if (bias.defined()) {
    TORCH_CHECK_VALUE(bias.dim() <= 4, "MultiHeadAttention: bias ", bias.sizes(),
                      " must broadcast against [B, heads, Sq, Sk] = [", b, ", ", heads, ", ", sq, ", ", sk, "]");
    const int64_t target[4] = {b, heads, sq, sk};
    for (int64_t i = 0; i < bias.dim(); ++i) {
      const int64_t bs = bias.size(bias.dim() - 1 - i), ts = target[3 - i];
      TORCH_CHECK_VALUE(bs == 1 || bs == ts, "MultiHeadAttention: bias ", bias.sizes(),
                        " must broadcast against [B, heads, Sq, Sk] = [", b, ", ", heads, ", ", sq, ", ", sk, "]");
    }
    scores = scores + bias.to(scores.scalar_type());
  }
  at::Tensor probs;
  if (options.upcast_softmax && scores.scalar_type() != at::kFloat && scores.scalar_type() != at::kDouble) {
    probs = at::softmax(scores.to(at::kFloat), -1).to(scores.scalar_type());
  } else {
    probs = at::softmax(scores, -1);
  }
  auto out = at::matmul(probs, vh);               // [B, heads, Sq, dv]
  return out.transpose(1, 2).reshape({b, sq, cv});  // [B, Sq, Cv]
}

// --- ResnetBlock2D ----------------------------------------------------------------------------

ResnetBlock2DImpl::ResnetBlock2DImpl(const ResnetBlock2DOptions& options) : options_(options) {
  const int64_t in = options.in_channels(), out = options.out_channels();
  TORCH_CHECK_VALUE(in > 0 && out > 0, "ResnetBlock2D: channels must be positive, got in ", in, ", out ", out);
  TORCH_CHECK_VALUE(options.temb_channels() >= 0, "ResnetBlock2D: temb_channels must be >= 0, got ",
                    options.temb_channels());
  norm1 = register_module("norm1", MakeGroupNorm(options.groups(), in, options.eps()));
  conv1 = register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, /*kernel_size=*/3).padding(1)));
  if (options.temb_channels() > 0) {
    time_emb_proj = register_module("time_emb_proj", torch::nn::Linear(options.temb_channels(), out));
  }
  norm2 = register_module("norm2", MakeGroupNorm(options.groups(), out, options.eps()));
  conv2 = register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(out, out, /*kernel_size=*/3).padding(1)));
  if (in != out) {
    conv_shortcut = register_module("conv_shortcut", torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, /*kernel_size=*/1)));
  }
}

at::Tensor ResnetBlock2DImpl::forward(const at::Tensor& x, const at::Tensor& temb) {
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(1) == options_.in_channels(), "ResnetBlock2D: x must be [B, ",
                    options_.in_channels(), ", H, W], got ", x.sizes());
  auto h = conv1(at::silu(norm1(x)));  // [B, out, H, W]
  if (time_emb_proj) {
    TORCH_CHECK_VALUE(temb.defined() && temb.dim() == 2 && temb.size(0) == x.size(0) &&
                          temb.size(1) == options_.temb_channels(),
                      "ResnetBlock2D: temb must be [", x.size(0), ", ", options_.temb_channels(), "], got ",
                      temb.defined() ? temb.sizes() : c10::IntArrayRef{});
    auto t = time_emb_proj(at::silu(temb));  // [B, out]
    h = h + t.unsqueeze(-1).unsqueeze(-1);
  } else {
    TORCH_CHECK_VALUE(!temb.defined(), "ResnetBlock2D: got temb ", temb.sizes(),
                      " but the block has no time embedding (temb_channels = 0)");
  }
  h = conv2(at::silu(norm2(h)));  // [B, out, H, W]
  auto shortcut = conv_shortcut ? conv_shortcut(x) : x;
  auto out = shortcut + h;
  if (options_.output_scale_factor() != 1.0) out = out / options_.output_scale_factor();
  return out;
}

// --- Downsample2D / Upsample2D ----------------------------------------------------------------

Downsample2DImpl::Downsample2DImpl(const Downsample2DOptions& options) : options_(options) {
  TORCH_CHECK_VALUE(options.channels() > 0 && options.out_channels() > 0 && options.padding() >= 0,
                    "Downsample2D: bad options: channels ", options.channels(), ", out_channels ",
                    options.out_channels(), ", padding ", options.padding());
  conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(options.channels(), options.out_channels(),
                                                                            /*kernel_size=*/3)
                                                       .stride(2)
                                                       .padding(options.padding())));
}

at::Tensor Downsample2DImpl::forward(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(1) == options_.channels(), "Downsample2D: x must be [B, ",
                    options_.channels(), ", H, W], got ", x.sizes());
  if (options_.padding() == 0) {
    return conv(at::constant_pad_nd(x, {0, 1, 0, 1}, 0));  // pad right and bottom
  }
  return conv(x);
}

Upsample2DImpl::Upsample2DImpl(const Upsample2DOptions& options) : options_(options) {
  TORCH_CHECK_VALUE(options.channels() > 0 && options.out_channels() > 0, "Upsample2D: bad options: channels ",
                    options.channels(), ", out_channels ", options.out_channels());
  conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(options.channels(), options.out_channels(),
                                                                            /*kernel_size=*/3)
                                                       .padding(1)));
}

at::Tensor Upsample2DImpl::forward(const at::Tensor& x, c10::optional<std::vector<int64_t>> output_size) {
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(1) == options_.channels(), "Upsample2D: x must be [B, ",
                    options_.channels(), ", H, W], got ", x.sizes());
  // Nearest-neighbour interpolation has no bfloat16 kernel in older LibTorch: go through float32.
  const auto dtype = x.scalar_type();
  auto h = dtype == at::kBFloat16 ? x.to(at::kFloat) : x;
  if (output_size.has_value()) {
    TORCH_CHECK_VALUE(output_size->size() == 2 && (*output_size)[0] > 0 && (*output_size)[1] > 0,
                      "Upsample2D: output_size must be {height, width}, got ", c10::IntArrayRef(*output_size));
    h = at::upsample_nearest2d(h, c10::IntArrayRef(*output_size), c10::optional<double>(), c10::optional<double>());
  } else {
    const std::vector<int64_t> size = {h.size(2) * 2, h.size(3) * 2};
    h = at::upsample_nearest2d(h, c10::IntArrayRef(size), c10::optional<double>(2.0), c10::optional<double>(2.0));
  }
  if (dtype == at::kBFloat16) h = h.to(dtype);
  return conv(h);  // [B, out_channels, 2H, 2W]
}

}  // namespace perfusion

// covariance: streaming estimate of C = E[x x^T], the uncentred second moment of text-encoder outputs
// over a caption corpus (spec §6). Every concept's gate and erase term need C^-1, so C is computed once
// per base model and shipped with it as `perfusion/covariance.safetensors` (tensor "C", float32).
//
// Ref: ../shared/docs/perfusion-algorithm.md §6 (Appendix C of the paper, via the reference code).
//
// Choices (documented in docs/engine.md too):
// - Accumulated in float64, whatever the encoder's dtype, then divided by the number of vectors
//   accumulated (the scale of C does not matter: the edit is invariant to it, spec §1.9).
// - Padding: by default every one of the 77 positions counts, padding (EOS-padded) positions included,
//   because that is exactly what the UNet's cross-attention sees for SD 1.x (no text padding mask).
//   Pass a mask to Add() to count only some positions.
//
// Thread safety: not thread-safe; one accumulator per thread, then Merge().
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>

namespace perfusion {

class CovarianceAccumulator {
 public:
  explicit CovarianceAccumulator(int64_t dim);

  // Adds every row of X ([..., D], any float dtype and device). `mask` (optional, bool, X's shape
  // without the last dimension) selects the rows to count.
  void Add(const at::Tensor& X, const at::Tensor& mask = at::Tensor());
  // Adds another accumulator's sums (e.g. from another thread or shard).
  void Merge(const CovarianceAccumulator& other);

  int64_t dim() const { return dim_; }
  int64_t count() const { return count_; }
  // C = sum x x^T / count, float64 [D, D]. REQUIRES: count() > 0.
  // ridge > 0 adds ridge * mean(diag C) * I. A real CLIP encoder needs none (SD 1.5's C is well
  // conditioned); a small or young encoder whose final LayerNorm has near-default gain and bias
  // emits vectors close to a hyperplane (LayerNorm removes the mean), so its C is near singular.
  at::Tensor Covariance(double ridge = 0) const;

 private:
  int64_t dim_;
  int64_t count_ = 0;
  at::Tensor sum_;  // [D, D] float64, CPU
};

// Saves C (as float32 tensor "C") with metadata (e.g. {"count", "padding_included", "encoder"}).
void SaveCovariance(const std::string& path, const at::Tensor& C, std::map<std::string, std::string> metadata = {});
// Loads tensor "C" ([D, D]) from a safetensors file; checks it is square and symmetric.
at::Tensor LoadCovariance(const std::string& path);

}  // namespace perfusion

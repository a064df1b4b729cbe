#include "perfusion/covariance.h"

#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <c10/util/Exception.h>

#include "perfusion/safetensors.h"

namespace perfusion {

CovarianceAccumulator::CovarianceAccumulator(int64_t dim) : dim_(dim) {
  TORCH_CHECK_VALUE(dim > 0, "covariance: dimension must be > 0, got ", dim);
  sum_ = at::zeros({dim, dim}, at::TensorOptions().dtype(at::kDouble));
}

void CovarianceAccumulator::Add(const at::Tensor& X, const at::Tensor& mask) {
  TORCH_CHECK_VALUE(X.defined() && X.dim() >= 1 && X.size(-1) == dim_, "covariance: X must be [..., ", dim_,
                    "], got ", X.defined() ? X.sizes() : c10::IntArrayRef{});
  TORCH_CHECK_VALUE(X.is_floating_point(), "covariance: X must be floating point, got ", X.scalar_type());
  at::Tensor rows = X.detach().reshape({-1, dim_});
  if (mask.defined()) {
    TORCH_CHECK_VALUE(mask.numel() == rows.size(0), "covariance: mask has ", mask.numel(), " entries for ",
                      rows.size(0), " rows of X ", X.sizes());
    rows = rows.index({mask.reshape({-1}).to(rows.device(), at::kBool)});
  }
  if (rows.size(0) == 0) return;
  // Accumulate on X's device in float64, then move the [D, D] sum (not the rows) to the CPU.
  const at::Tensor r = rows.to(at::kDouble);
  sum_.add_(at::matmul(r.t(), r).to(at::kCPU));
  count_ += rows.size(0);
  TORCH_CHECK(at::isfinite(sum_).all().item<bool>(), "covariance: non-finite encoder outputs");
}

void CovarianceAccumulator::Merge(const CovarianceAccumulator& other) {
  TORCH_CHECK_VALUE(other.dim_ == dim_, "covariance: cannot merge dimension ", other.dim_, " into ", dim_);
  sum_.add_(other.sum_);
  count_ += other.count_;
}

at::Tensor CovarianceAccumulator::Covariance(double ridge) const {
  TORCH_CHECK_VALUE(count_ > 0, "covariance: no vectors accumulated");
  TORCH_CHECK_VALUE(ridge >= 0, "covariance: ridge must be >= 0, got ", ridge);
  at::Tensor c = sum_ / static_cast<double>(count_);
  c = (c + c.t()) * 0.5;  // exactly symmetric
  if (ridge > 0) c = c + at::eye(dim_, c.options()) * (ridge * c.diagonal().mean().item<double>());
  return c;
}

void SaveCovariance(const std::string& path, const at::Tensor& C, std::map<std::string, std::string> metadata) {
  TORCH_CHECK_VALUE(C.dim() == 2 && C.size(0) == C.size(1), "covariance: C must be square, got ", C.sizes());
  metadata.emplace("format", "pt");
  metadata.emplace("content", "uncentred second moment E[x x^T] of text-encoder outputs (Perfusion C)");
  SaveSafetensors(path, {{"C", C.to(at::kCPU, at::kFloat).contiguous()}}, metadata);
}

at::Tensor LoadCovariance(const std::string& path) {
  auto reader = SafetensorsReader::Open(path);
  TORCH_CHECK_VALUE(reader->contains("C"), "covariance: ", path, " has no tensor 'C'");
  at::Tensor C = reader->get("C").to(at::kFloat);
  TORCH_CHECK_VALUE(C.dim() == 2 && C.size(0) == C.size(1), "covariance: ", path, ": C must be square, got ",
                    C.sizes());
  TORCH_CHECK_VALUE(at::isfinite(C).all().item<bool>(), "covariance: ", path, ": C has non-finite values");
  const double scale = C.abs().max().item<double>();
  TORCH_CHECK_VALUE((C - C.t()).abs().max().item<double>() <= 1e-5 * scale, "covariance: ", path,
                    ": C is not symmetric");
  return C;
}

}  // namespace perfusion

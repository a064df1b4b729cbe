#include "tests/engine/test_util.h"

#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <c10/core/GeneratorImpl.h>
#include <ATen/Utils.h>
#include <ATen/Context.h>
#include <sys/stat.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

namespace perfusion::testing {

std::string SharedDir() { return EnvOr("PERFUSION_SHARED_DIR", PERFUSION_SHARED_DIR); }
std::string SourceDir() { return PERFUSION_SOURCE_DIR; }

std::string EnvOr(const char* var, const std::string& fallback) {
  const char* v = std::getenv(var);
  return (v != nullptr && *v != '\0') ? std::string(v) : fallback;
}

bool FileExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

::testing::AssertionResult AllClose(const at::Tensor& actual, const at::Tensor& expected, double rtol,
                                    double atol, const std::string& what) {
  if (!actual.defined() || !expected.defined()) {
    return ::testing::AssertionFailure() << what << ": undefined tensor";
  }
  if (actual.sizes() != expected.sizes()) {
    return ::testing::AssertionFailure() << what << ": shape " << actual.sizes() << " != expected "
                                         << expected.sizes();
  }
  at::Tensor a = actual.detach().to(at::kCPU, at::kDouble);
  at::Tensor e = expected.detach().to(at::kCPU, at::kDouble);
  if (!at::isfinite(a).all().item<bool>()) {
    return ::testing::AssertionFailure() << what << ": non-finite values in the result";
  }
  at::Tensor diff = (a - e).abs();
  at::Tensor allowed = atol + rtol * e.abs();
  at::Tensor ratio = diff / allowed;
  const int64_t violations = (diff > allowed).sum().item<int64_t>();
  if (violations == 0) return ::testing::AssertionSuccess();
  const int64_t worst = ratio.flatten().argmax().item<int64_t>();
  std::ostringstream ss;
  ss << what << ": " << violations << " of " << a.numel() << " elements outside rtol=" << rtol
     << " atol=" << atol << "; worst at flat index " << worst << ": got " << a.flatten()[worst].item<double>()
     << ", expected " << e.flatten()[worst].item<double>() << " (|d|=" << diff.flatten()[worst].item<double>()
     << ", max |d|=" << diff.max().item<double>() << ")";
  return ::testing::AssertionFailure() << ss.str();
}

std::vector<std::pair<std::string, std::vector<int64_t>>> ReadManifest(const std::string& path) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    const auto tab = line.find('\t');
    std::vector<int64_t> shape;
    std::stringstream ss(line.substr(tab + 1));
    std::string dim;
    while (std::getline(ss, dim, ',')) shape.push_back(std::stoll(dim));
    out.emplace_back(line.substr(0, tab), shape);
  }
  return out;
}

SeededTest::SeededTest() { at::manual_seed(0); }

}  // namespace perfusion::testing

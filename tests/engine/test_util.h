// Helpers shared by the engine tests: where the reference data lives, and tensor comparison with
// a message that says where and by how much a port is off.
#pragma once

#include <ATen/core/Tensor.h>
#include <gtest/gtest.h>

#include <exception>
#include <string>
#include <utility>
#include <vector>

namespace perfusion::testing {

// ../shared beside the source tree (PERFUSION_SHARED_DIR at configure time).
std::string SharedDir();
// The repository root (for models/tiny and other shipped files).
std::string SourceDir();
// Value of environment variable `var` if set and non-empty, else `fallback`.
std::string EnvOr(const char* var, const std::string& fallback);
bool FileExists(const std::string& path);

// Checks |actual - expected| <= atol + rtol * |expected| elementwise (in float64). On failure the
// message names `what`, the worst element, its values and the number of violations.
::testing::AssertionResult AllClose(const at::Tensor& actual, const at::Tensor& expected, double rtol,
                                    double atol, const std::string& what = "tensor");

// (name, shape) in file order from a `name<TAB>shape` manifest (../shared/data/sd15/*.tsv).
std::vector<std::pair<std::string, std::vector<int64_t>>> ReadManifest(const std::string& path);

// The message of the exception of type E that f throws; a marker string if it throws nothing or
// something else (so EXPECT_NE(msg.find(...)) fails with a readable value).
template <typename E, typename F>
std::string ThrownMessage(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what_without_backtrace();
  } catch (const std::exception& e) {
    return std::string("<wrong exception type> ") + e.what();
  }
  return "<no exception>";
}

// Seeds LibTorch's global generator in the constructor (the PyTorch C++ frontend's SeedingFixture).
class SeededTest : public ::testing::Test {
 protected:
  SeededTest();
};

}  // namespace perfusion::testing

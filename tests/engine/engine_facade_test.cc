// RunGuarded, the worker facade's one exception edge: every LibTorch error becomes the Status the
// agent retries or fails on. The errors are real ones, raised by LibTorch itself where it can.
#include "worker/engine.h"

#include <ATen/Functions.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <new>
#include <stdexcept>

#include "perfusion/pipeline.h"

namespace perfusion::worker {
namespace {

TEST(RunGuardedTest, CpuAllocationFailureIsResourceExhausted) {
  // 2^46 floats (256 TiB): more than any address space gives, so LibTorch's CPU allocator fails.
  const absl::Status s = RunGuarded([] { at::Tensor t = at::empty({int64_t{1} << 46}); });
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_NE(s.message().find("allocate"), absl::string_view::npos) << s;
}

TEST(RunGuardedTest, ValueAndIndexErrorsAreInvalidArgument) {
  const absl::Status value = RunGuarded([] { TORCH_CHECK_VALUE(false, "beta must be in (0, 1]"); });
  EXPECT_EQ(value.code(), absl::StatusCode::kInvalidArgument) << value;
  EXPECT_NE(value.message().find("beta must be in (0, 1]"), absl::string_view::npos) << value;
  // A real index error: LibTorch's own bounds check.
  const absl::Status index = RunGuarded([] { at::zeros({3}).select(0, 5); });
  EXPECT_EQ(index.code(), absl::StatusCode::kInvalidArgument) << index;
  const absl::Status type = RunGuarded([] { TORCH_CHECK_TYPE(false, "wrong dtype"); });
  EXPECT_EQ(type.code(), absl::StatusCode::kInvalidArgument) << type;
}

TEST(RunGuardedTest, CancellationIsCancelled) {
  const absl::Status s = RunGuarded([] { throw CancelledError(); });
  EXPECT_EQ(s.code(), absl::StatusCode::kCancelled) << s;
}

TEST(RunGuardedTest, OtherErrorsAreInternalWithoutBacktrace) {
  // A shape mismatch inside LibTorch is a plain c10::Error: a bug, not the request's fault.
  const absl::Status s = RunGuarded([] { at::matmul(at::zeros({2, 3}), at::zeros({4, 5})); });
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal) << s;
  EXPECT_EQ(s.message().find("Exception raised from"), absl::string_view::npos) << s;
  EXPECT_EQ(RunGuarded([] { throw std::runtime_error("boom"); }).code(), absl::StatusCode::kInternal);
  EXPECT_EQ(RunGuarded([] { throw 42; }).code(), absl::StatusCode::kInternal);
}

TEST(RunGuardedTest, BadAllocIsResourceExhaustedAndSuccessIsOk) {
  EXPECT_EQ(RunGuarded([] { throw std::bad_alloc(); }).code(), absl::StatusCode::kResourceExhausted);
  int ran = 0;
  EXPECT_TRUE(RunGuarded([&] { ++ran; }).ok());
  EXPECT_EQ(ran, 1);
}

}  // namespace
}  // namespace perfusion::worker

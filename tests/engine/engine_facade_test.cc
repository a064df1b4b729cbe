// RunGuarded, the worker facade's one exception edge: every LibTorch error becomes the Status the
// agent retries or fails on. The errors are real ones, raised by LibTorch itself where it can.
#include "worker/engine.h"

#include <ATen/Functions.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <new>
#include <stdexcept>

#include "perfusion/concept.h"
#include "perfusion/image_io.h"
#include "perfusion/model_dir.h"
#include "perfusion/pipeline.h"
#include "perfusion/trainer.h"
#include "tests/engine/test_util.h"

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

// The facade cuts each training image to the trainer's side as soon as it is decoded (a whole
// large image held hundreds of MB for the run); the trainer then finds it done, so the concept
// is the one TrainConcept makes from the whole images, bit for bit.
TEST(EngineTrainTest, ImagesCutAtDecodeTrainTheSameConceptAsWholeOnes) {
  const std::string model_dir = testing::EnvOr("PERFUSION_TINY_MODEL", testing::SourceDir() + "/models/tiny");
  if (!testing::FileExists(model_dir + "/model_index.json")) GTEST_SKIP() << "no tiny model at " << model_dir;
  const std::string tokenizer_dir = testing::SharedDir() + "/data/clip";
  EngineOptions eo;
  eo.model_dir = model_dir;
  eo.tokenizer_dir = tokenizer_dir;
  auto engine = Engine::Load(eo);
  ASSERT_TRUE(engine.ok()) << engine.status();

  TrainSpec spec;
  spec.name = "blob";
  spec.superclass = "star";
  spec.steps = 2;
  spec.seed = 7;
  std::vector<at::Tensor> whole;
  for (int i = 0; i < 3; ++i) {
    Image im(80 + 16 * i, 48);  // wider than high, and larger than the model's 32 px
    for (int y = 0; y < im.height; ++y) {
      for (int x = 0; x < im.width; ++x) {
        uint8_t* p = im.at(x, y);
        p[0] = static_cast<uint8_t>(3 * x + 40 * i);
        p[1] = static_cast<uint8_t>(5 * y);
        p[2] = static_cast<uint8_t>((x * y) % 251);
      }
    }
    spec.images.push_back(EncodePng(im));
    whole.push_back(ImageToTensor(im));
  }
  auto result = (*engine)->Train(spec, nullptr);
  ASSERT_TRUE(result.ok()) << result.status();

  ModelDirOptions mo;
  mo.tokenizer_dir = tokenizer_dir;
  auto model = LoadModelDir(model_dir, mo);
  TrainOptions o;
  o.name = spec.name;
  o.superclass = spec.superclass;
  o.steps = spec.steps;
  o.seed = spec.seed;
  const Concept direct = TrainConcept(*model, whole, o);
  const Concept facade = DecodeConcept(result->blob, model->model_id);
  const Concept direct_stored = DecodeConcept(EncodeConcept(direct), model->model_id);
  EXPECT_TRUE(at::equal(facade.i_star, direct_stored.i_star));
  EXPECT_TRUE(at::equal(facade.v_targets, direct_stored.v_targets));
  EXPECT_TRUE(at::equal(facade.embedding, direct_stored.embedding));
}

}  // namespace
}  // namespace perfusion::worker

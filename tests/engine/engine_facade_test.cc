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

// The shipped tiny model (or $PERFUSION_TINY_MODEL) with the shared CLIP tokenizer.
EngineOptions TinyEngineOptions() {
  EngineOptions eo;
  eo.model_dir = testing::EnvOr("PERFUSION_TINY_MODEL", testing::SourceDir() + "/models/tiny");
  eo.tokenizer_dir = testing::SharedDir() + "/data/clip";
  return eo;
}

// The facade cuts each training image to the trainer's side as soon as it is decoded (a whole
// large image held hundreds of MB for the run); the trainer then finds it done, so the concept
// is the one TrainConcept makes from the whole images, bit for bit.
TEST(EngineTrainTest, ImagesCutAtDecodeTrainTheSameConceptAsWholeOnes) {
  const EngineOptions eo = TinyEngineOptions();
  if (!testing::FileExists(eo.model_dir + "/model_index.json")) GTEST_SKIP() << "no tiny model at " << eo.model_dir;
  auto engine = Engine::Load(eo);
  ASSERT_TRUE(engine.ok()) << engine.status();
  const std::string model_dir = eo.model_dir, tokenizer_dir = eo.tokenizer_dir;

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

// What a worker's request turns into: a beta given alone keeps the concept's own temperature, an
// unset key-locking mode is the model's default (global for the tiny model, from
// perfusion/inference.json), and the images are the pipeline's for that request, byte for byte.
TEST(EngineGenerateTest, RequestOptionsMapToThePipelinesRequest) {
  const EngineOptions eo = TinyEngineOptions();
  if (!testing::FileExists(eo.model_dir + "/model_index.json")) GTEST_SKIP() << "no tiny model at " << eo.model_dir;
  auto engine = Engine::Load(eo);
  ASSERT_TRUE(engine.ok()) << engine.status();
  const std::string& model_dir = eo.model_dir;
  ModelDirOptions mo;
  mo.tokenizer_dir = eo.tokenizer_dir;
  auto model = LoadModelDir(model_dir, mo);
  ASSERT_TRUE(model->default_global_key_lock) << "the tiny model's inference.json asks for global locking";

  TrainOptions o;
  o.name = "rex";
  o.superclass = "star";
  o.steps = 2;
  o.seed = 5;
  std::vector<at::Tensor> images;
  for (int i = 0; i < 3; ++i) images.push_back(at::rand({3, 32, 32}) * 2 - 1);
  Concept trained = TrainConcept(*model, images, o);
  trained.default_gate = {0.7, 0.2};  // a concept default unlike the paper's, to see which is used
  const std::string blob = EncodeConcept(trained);

  GenerateSpec spec;
  spec.prompt = "a photo of a <rex> on a blue background";
  spec.steps = 3;
  spec.seed = 11;
  ConceptUse use;
  use.reference = "rex";
  use.blob = blob;
  use.beta = 0.6;  // temperature unset: the concept's 0.2
  spec.concepts.push_back(use);
  auto got = (*engine)->Generate({spec}, nullptr);
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->size(), 1u);
  ASSERT_EQ((*got)[0].pngs.size(), 1u);

  GenerationRequest q;
  q.prompt = spec.prompt;
  q.steps = spec.steps;
  q.seed = spec.seed;
  q.sampler = "ddim";
  q.concepts["rex"] = {std::make_shared<Concept>(DecodeConcept(blob, model->model_id)), {0.6, 0.2}, true};
  Pipeline pipe(model);
  const std::string expected = EncodePng(TensorToImage(pipe.Generate({q})[0].images[0]));
  EXPECT_EQ((*got)[0].pngs[0], expected);
  // Any other reading differs: the paper's temperature, or local locking.
  q.concepts["rex"].gate = {0.6, 0.15};
  EXPECT_NE(EncodePng(TensorToImage(pipe.Generate({q})[0].images[0])), expected);
  q.concepts["rex"].gate = {0.6, 0.2};
  q.concepts["rex"].global_key_lock = false;
  EXPECT_NE(EncodePng(TensorToImage(pipe.Generate({q})[0].images[0])), expected);

  // A blob from before the gate ranges were enforced: refused where its own gate would be used,
  // usable with the request's beta and tau.
  Concept old = trained;
  old.default_gate = {5.0, 2.0};
  spec.concepts[0].blob = EncodeConcept(old);
  spec.concepts[0].digest = "";
  spec.concepts[0].beta = 0;
  auto refused = (*engine)->Generate({spec}, nullptr);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(refused.status().message()).find("concept <rex>: its default gate"), std::string::npos)
      << refused.status();
  spec.concepts[0].beta = 0.7;
  spec.concepts[0].temperature = 0.15;
  EXPECT_TRUE((*engine)->Generate({spec}, nullptr).ok());
}

}  // namespace
}  // namespace perfusion::worker

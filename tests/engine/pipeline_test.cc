// Perfusion training and generation on the shipped tiny model (models/tiny; PERFUSION_TINY_MODEL
// overrides): the fast checks of the training issue.
#include "perfusion/pipeline.h"

#include <ATen/Context.h>
#include <ATen/Functions.h>
#include <c10/util/Exception.h>
#include <atomic>

#include <gtest/gtest.h>

#include "perfusion/concept.h"
#include "perfusion/concept_token.h"
#include "perfusion/image_io.h"
#include "perfusion/scheduler.h"
#include "perfusion/shapes_world.h"
#include "perfusion/trainer.h"
#include "tests/engine/test_util.h"

namespace perfusion {
namespace {

using testing::AllClose;

std::string TinyModelDir() { return testing::EnvOr("PERFUSION_TINY_MODEL", testing::SourceDir() + "/models/tiny"); }

class PipelineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!testing::FileExists(TinyModelDir() + "/model_index.json")) return;
    ModelDirOptions opts;
    opts.tokenizer_dir = testing::SharedDir() + "/data/clip";
    model_ = LoadModelDir(TinyModelDir(), opts);
    // One concept, trained briefly, shared by the tests.
    concept_ = std::make_shared<Concept>(
        TrainConcept(*model_, ConceptImages("checker_star", 6), CheckerOptions("checker", /*steps=*/30, /*seed=*/3)));
  }
  static void TearDownTestSuite() {
    model_.reset();
    concept_.reset();
  }
  void SetUp() override {
    if (!model_) GTEST_SKIP() << "no tiny model at " << TinyModelDir();
  }
  // The tiny model again, in another dtype or on another device than the suite's.
  static std::shared_ptr<StableDiffusion> LoadTiny(at::ScalarType dtype, at::Device device) {
    ModelDirOptions opts;
    opts.tokenizer_dir = testing::SharedDir() + "/data/clip";
    opts.dtype = dtype;
    opts.device = device;
    return LoadModelDir(TinyModelDir(), opts);
  }
  // Training options for a checker_star concept named `name` (superclass "star").
  static TrainOptions CheckerOptions(const std::string& name, int64_t steps, uint64_t seed) {
    TrainOptions t;
    t.name = name;
    t.superclass = FindConcept("checker_star").superclass;
    t.steps = steps;
    t.seed = seed;
    return t;
  }
  // A second concept, trained apart from the suite's: candy_heart images, its own superclass and seed.
  static std::shared_ptr<Concept> CandyConcept(const std::string& name) {
    TrainOptions t;
    t.name = name;
    t.superclass = FindConcept("candy_heart").superclass;
    t.steps = 3;
    t.seed = 4;
    return std::make_shared<Concept>(TrainConcept(*model_, ConceptImages("candy_heart", 2), t));
  }
  // A concept like the suite's, trained for a few steps on two images of `model`.
  static Concept BriefConcept(StableDiffusion& model) {
    return TrainConcept(model, ConceptImages("checker_star", 2), CheckerOptions("checker", /*steps=*/3, /*seed=*/3));
  }
  static std::vector<at::Tensor> ConceptImages(const std::string& name, int n) {
    std::vector<at::Tensor> out;
    for (const auto& s : RenderConcept(FindConcept(name), n, /*seed=*/11, /*size=*/32)) out.push_back(ImageToTensor(s.image));
    return out;
  }
  GenerationRequest Request(const std::string& prompt, uint64_t seed = 5) {
    GenerationRequest r;
    r.prompt = prompt;
    r.steps = 8;
    r.seed = seed;
    r.guidance_scale = 3.0;
    return r;
  }
  // Runs `reqs` in one batch and one by one; the images must agree. Returns the batch's results.
  static std::vector<GenerationResult> ExpectBatchEqualsOneByOne(const Pipeline& pipe,
                                                                 const std::vector<GenerationRequest>& reqs) {
    auto together = pipe.Generate(reqs);
    for (size_t r = 0; r < reqs.size(); ++r) {
      auto alone = pipe.Generate({reqs[r]});
      EXPECT_EQ(together[r].images.size(), static_cast<size_t>(reqs[r].num_images)) << "request " << r;
      EXPECT_EQ(alone[0].images.size(), together[r].images.size());
      for (size_t n = 0; n < std::min(alone[0].images.size(), together[r].images.size()); ++n) {
        EXPECT_TRUE(AllClose(together[r].images[n], alone[0].images[n], 1e-4, 1e-4, "request " + std::to_string(r)));
      }
    }
    return together;
  }
  static std::shared_ptr<StableDiffusion> model_;
  static std::shared_ptr<Concept> concept_;
};
std::shared_ptr<StableDiffusion> PipelineTest::model_;
std::shared_ptr<Concept> PipelineTest::concept_;

TEST_F(PipelineTest, ATrainedConceptExplainsItsImagesBetterThanTheSuperclass) {
  // The same fixed (timestep, noise) draws for both prompts: a deterministic comparison.
  Pipeline pipe(model_);
  auto images = ConceptImages("checker_star", 6);
  std::map<std::string, ConceptRef> c = {{"checker", {concept_, {}, false}}};
  const double with_concept = pipe.DenoisingLoss("a photo of a <checker>", c, images, /*seed=*/21, /*draws=*/6);
  const double superclass = pipe.DenoisingLoss("a photo of a " + concept_->superclass, {}, images, 21, 6);
  EXPECT_LT(with_concept, superclass);
  EXPECT_EQ(pipe.DenoisingLoss("a photo of a <checker>", c, images, 21, 6), with_concept) << "deterministic";
}

// "A few training steps reduce the loss on a concept": the suite's concept (30 steps) against the
// same concept before training (one step at learning rate 0: the superclass's values and
// embedding), on the same images, timesteps and noise.
TEST_F(PipelineTest, TrainingStepsReduceTheLossOnTheConcept) {
  Pipeline pipe(model_);
  auto images = ConceptImages("checker_star", 6);
  TrainOptions untrained_options = CheckerOptions("checker", /*steps=*/1, /*seed=*/3);
  untrained_options.lr_values = 0;
  untrained_options.lr_embedding = 0;
  auto untrained = std::make_shared<Concept>(TrainConcept(*model_, images, untrained_options));
  const std::string prompt = "a photo of a <checker>";
  const double before = pipe.DenoisingLoss(prompt, {{"checker", {untrained, {}, false}}}, images, /*seed=*/21, /*draws=*/6);
  const double after = pipe.DenoisingLoss(prompt, {{"checker", {concept_, {}, false}}}, images, 21, 6);
  EXPECT_LT(after, before) << "30 steps did not lower the concept's denoising loss";
  // And the trained concept draws other images than the untrained one: training changed what it does.
  GenerationRequest a = Request(prompt), b = Request(prompt);
  a.concepts["checker"] = {concept_, {}, false};
  b.concepts["checker"] = {untrained, {}, false};
  EXPECT_GT((pipe.Generate({a})[0].images[0] - pipe.Generate({b})[0].images[0]).abs().mean().item<double>(), 1e-3);
}

TEST_F(PipelineTest, TrainingIsDeterministicForASeedAndCancellable) {
  TrainOptions t = CheckerOptions("det", /*steps=*/3, /*seed=*/9);
  auto images = ConceptImages("checker_star", 3);
  Concept a = TrainConcept(*model_, images, t), b = TrainConcept(*model_, images, t);
  EXPECT_TRUE(at::equal(a.v_targets, b.v_targets));
  EXPECT_TRUE(at::equal(a.embedding, b.embedding));
  t.progress = [](const TrainProgress& p) { return p.step < 2; };
  EXPECT_THROW(TrainConcept(*model_, images, t), CancelledError);
}

TEST_F(PipelineTest, BadTrainingInputGivesClearErrors) {
  TrainOptions t;
  t.name = "x";
  t.superclass = "teddy bear";
  try {
    TrainConcept(*model_, ConceptImages("checker_star", 2), t);
    FAIL();
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("superclass"), std::string::npos);
  }
  t.superclass = "star";
  EXPECT_THROW(TrainConcept(*model_, {}, t), c10::ValueError);
}

TEST(TrainingPromptsTest, TemplatesOrEachImagesCaptionMirroredWithItsImage) {
  TrainOptions t;
  t.superclass = "star";
  const auto all = TrainingPrompts(t, 0, false);
  ASSERT_EQ(all.size(), DefaultTemplates().size());
  EXPECT_EQ(all[0], "a photo of a star");
  EXPECT_EQ(TrainingPrompts(t, 5, true), all) << "templates do not depend on the image or the flip";
  // A superclass that is also a template word ("a photo of a photo"): the concept is found at the
  // word's first token, so those templates would train the template's word. They are left out.
  t.superclass = "photo";
  const auto photo = TrainingPrompts(t, 0, false);
  EXPECT_FALSE(photo.empty());
  EXPECT_LT(photo.size(), DefaultTemplates().size());
  for (const auto& p : photo) EXPECT_EQ(p.find("photo"), p.rfind("photo")) << p;
  EXPECT_EQ(photo[0], "a rendering of a photo");
  t.templates = {"a photo of a {}", "a {} in a photo"};
  EXPECT_THROW(TrainingPrompts(t, 0, false), c10::ValueError) << "no template left";
  t.templates = {"a {} and a {}"};
  t.superclass = "star";
  EXPECT_THROW(TrainingPrompts(t, 0, false), c10::ValueError) << "{} twice";
  t.templates.clear();
  t.captions = {"a small {} in the top left on a blue background", "a {} on the right, Left of nothing; leftover"};
  EXPECT_EQ(TrainingPrompts(t, 0, false), std::vector<std::string>{"a small star in the top left on a blue background"});
  EXPECT_EQ(TrainingPrompts(t, 0, true), std::vector<std::string>{"a small star in the top right on a blue background"});
  EXPECT_EQ(TrainingPrompts(t, 1, true), std::vector<std::string>{"a star on the left, Right of nothing; leftover"});
  EXPECT_THROW(TrainingPrompts(t, 2, false), c10::ValueError);
  t.captions = {"a {} beside a Star"};
  EXPECT_THROW(TrainingPrompts(t, 0, false), c10::ValueError) << "the superclass word besides {}";
  t.captions = {"a {} beside star2"};  // CLIP splits letters from digits, as the server's check does
  EXPECT_THROW(TrainingPrompts(t, 0, false), c10::ValueError);
  t.captions = {"a {} beside stars"};
  EXPECT_EQ(TrainingPrompts(t, 0, false), std::vector<std::string>{"a star beside stars"});
  t.captions = {"a star on the left"};
  try {
    TrainingPrompts(t, 0, false);
    FAIL();
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("captions[0]"), std::string::npos);
  }
}

TEST_F(PipelineTest, TrainingWithCaptionsUsesThemAndChecksTheirCount) {
  TrainOptions t = CheckerOptions("cap", /*steps=*/3, /*seed=*/9);
  std::vector<at::Tensor> images;
  for (const auto& s : RenderConcept(FindConcept("checker_star"), 3, /*seed=*/11, /*size=*/32)) {
    images.push_back(ImageToTensor(s.image));
    std::string c = Caption(s.scene, 0);
    c.replace(c.find(" star"), 5, " {}");
    t.captions.push_back(c);
  }
  const Concept a = TrainConcept(*model_, images, t), b = TrainConcept(*model_, images, t);
  EXPECT_TRUE(at::equal(a.v_targets, b.v_targets)) << "deterministic";
  EXPECT_EQ(a.info.at("captions"), "per image");
  TrainOptions plain = t;
  plain.captions.clear();
  EXPECT_FALSE(at::equal(TrainConcept(*model_, images, plain).v_targets, a.v_targets)) << "the captions were used";
  t.captions.pop_back();
  try {
    TrainConcept(*model_, images, t);
    FAIL();
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("captions: 2 caption(s) for 3 image(s)"), std::string::npos)
        << e.what_without_backtrace();
  }
  // Refused before the first step, whichever image a step would draw: a place glued to letters
  // ("{}s" gives "stars", another token), and a place marked twice.
  t.captions.push_back("two {}s in the top left");
  std::atomic<int> steps{0};
  t.progress = [&](const TrainProgress&) { return ++steps > 0; };
  try {
    TrainConcept(*model_, images, t);
    FAIL();
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("captions[2]: a prompt does not hold the superclass token"),
              std::string::npos)
        << e.what_without_backtrace();
  }
  EXPECT_EQ(steps.load(), 0);
  t.captions.back() = "a {} beside a {}";
  EXPECT_THROW(TrainConcept(*model_, images, t), c10::ValueError);
}

// A GPU worker runs the model in half precision (--dtype fp16). bf16 is the reduced precision a CPU
// runs, so this covers the same paths: a concept trains (float32 edits and embedding on a bf16
// model), its blob holds float data, and generation with it stays close to the float32 model's.
TEST_F(PipelineTest, TrainsAndGeneratesOnAReducedPrecisionModel) {
  auto bf16 = LoadTiny(at::kBFloat16, at::kCPU);
  // The trained embedding is a float32 master copy (in half precision AdamW's eps rounds to 0).
  {
    ConceptToken token(bf16->text_encoder->token_embedding_weight(), *bf16->tokenizer->SingleTokenId("star"));
    EXPECT_EQ(token->embedding().scalar_type(), at::kFloat);
    const auto batch = token->forward(at::full({1, 3}, *bf16->tokenizer->SingleTokenId("star"), at::kLong));
    EXPECT_EQ(batch.concept_embeds.scalar_type(), at::kBFloat16);
  }
  const Concept c = BriefConcept(*bf16);
  EXPECT_EQ(c.v_targets.scalar_type(), at::kFloat);
  EXPECT_TRUE(c.v_targets.isfinite().all().item<bool>());
  // It trained: its targets moved from their start as far as float32's did, and to the same place.
  {
    const Concept full_precision = BriefConcept(*model_);
    TrainOptions frozen = CheckerOptions("checker", /*steps=*/1, /*seed=*/3);
    frozen.lr_values = 0;
    frozen.lr_embedding = 0;
    const Concept start = TrainConcept(*model_, ConceptImages("checker_star", 2), frozen);
    const double moved = (full_precision.v_targets - start.v_targets).norm().item<double>();
    ASSERT_GT(moved, 1e-3) << "three float32 steps moved nothing";
    EXPECT_LT((c.v_targets - full_precision.v_targets).norm().item<double>(), 0.25 * moved)
        << "the bf16-trained targets went elsewhere (or stayed put)";
  }
  Pipeline low(bf16), full(model_);
  GenerationRequest r = Request("a photo of a <checker> on a blue background");
  r.concepts["checker"] = {concept_, {}, false};
  const at::Tensor a = low.Generate({r})[0].images[0], b = full.Generate({r})[0].images[0];
  EXPECT_EQ(a.scalar_type(), at::kFloat);
  EXPECT_TRUE(a.isfinite().all().item<bool>());
  EXPECT_LT((a - b).abs().mean().item<double>(), 0.1) << "bf16 drifted from float32";
}

// The GPU worker's path: a concept trains and generates on a CUDA model (the training noise once
// came from the CPU generator straight into a CUDA tensor, which LibTorch refuses), and its images
// stay close to the CPU's for the same concept and seed. Skips without CUDA.
TEST_F(PipelineTest, TrainsAndGeneratesOnCuda) {
  if (!at::hasCUDA()) GTEST_SKIP() << "CUDA not available";
  auto cuda = LoadTiny(at::kFloat, at::Device(at::kCUDA, 0));
  const Concept c = BriefConcept(*cuda);
  EXPECT_TRUE(c.v_targets.device().is_cpu());
  EXPECT_TRUE(c.v_targets.isfinite().all().item<bool>());
  Pipeline gpu(cuda), cpu(model_);
  GenerationRequest r = Request("a photo of a <checker> on a blue background");
  r.concepts["checker"] = {concept_, {}, false};
  const at::Tensor a = gpu.Generate({r})[0].images[0], b = cpu.Generate({r})[0].images[0];
  EXPECT_TRUE(a.device().is_cpu());
  EXPECT_LT((a - b).abs().mean().item<double>(), 0.02) << "cuda drifted from the cpu";
}

// A GPU worker's --dtype fp16: the float32 master embedding and dynamic loss scaling keep training
// finite (without them AdamW's first fp16 step divided by zero), and generation stays close to
// float32. Runs where CUDA is (CPU LibTorch has no fp16 matmul).
TEST_F(PipelineTest, TrainsAndGeneratesOnAnFp16CudaModel) {
  if (!at::hasCUDA()) GTEST_SKIP() << "CUDA not available";
  auto half = LoadTiny(at::kHalf, at::Device(at::kCUDA, 0));
  const Concept c = BriefConcept(*half);
  EXPECT_TRUE(c.v_targets.isfinite().all().item<bool>());
  EXPECT_TRUE(c.embedding.isfinite().all().item<bool>());
  EXPECT_TRUE(c.info.count("fp16_skipped_steps"));
  Pipeline gpu(half), cpu(model_);
  GenerationRequest r = Request("a photo of a <checker> on a blue background");
  r.concepts["checker"] = {concept_, {}, false};
  const at::Tensor a = gpu.Generate({r})[0].images[0], b = cpu.Generate({r})[0].images[0];
  EXPECT_LT((a - b).abs().mean().item<double>(), 0.05) << "fp16 on cuda drifted from float32 on the cpu";
}

TEST_F(PipelineTest, PromptWithoutTheConceptGivesTheBaseModelImage) {
  Pipeline pipe(model_);
  GenerationRequest with = Request("a red circle on a blue background");
  with.concepts["checker"] = {concept_, {}, false};
  GenerationRequest base = Request("a red circle on a blue background");
  at::Tensor a = pipe.Generate({with})[0].images[0];
  at::Tensor b = pipe.Generate({base})[0].images[0];
  EXPECT_TRUE(at::equal(a, b));
}

TEST_F(PipelineTest, TheConceptChangesImagesWhereItsTokenIsUsed) {
  Pipeline pipe(model_);
  GenerationRequest with = Request("a photo of a <checker>");
  with.concepts["checker"] = {concept_, {}, false};
  GenerationRequest plain = Request("a photo of a " + concept_->superclass);
  at::Tensor a = pipe.Generate({with})[0].images[0];
  at::Tensor b = pipe.Generate({plain})[0].images[0];
  EXPECT_GT((a - b).abs().mean().item<double>(), 1e-3);
}

// GenerationRequest::edit_unconditional (spec 5.5, on by default): the unconditional half also goes
// through the edits of the prompt's locally key-locked concepts. It changes the image only when the
// prompt names such a concept; globally locked concepts leave that half alone (measured worse).
TEST_F(PipelineTest, EditingTheUnconditionalHalfChangesOnlyPromptsWithLocalConcepts) {
  Pipeline pipe(model_);
  GenerationRequest edited = Request("a photo of a <checker>");
  edited.concepts["checker"] = {concept_, {}, false};
  EXPECT_TRUE(edited.edit_unconditional) << "the default";
  GenerationRequest plain = edited;
  plain.edit_unconditional = false;
  const at::Tensor a = pipe.Generate({plain})[0].images[0], b = pipe.Generate({edited})[0].images[0];
  EXPECT_FALSE(at::equal(a, b));
  GenerationRequest global = edited;
  global.concepts["checker"].global_key_lock = true;
  GenerationRequest global_plain = global;
  global_plain.edit_unconditional = false;
  EXPECT_TRUE(at::equal(pipe.Generate({global})[0].images[0], pipe.Generate({global_plain})[0].images[0]));
  const std::vector<CrossAttnKV> uncond = pipe.PromptKV("", plain.concepts, MultiConceptMode::kApproximate, {"checker"});
  const std::vector<CrossAttnKV> base = pipe.PromptKV("", {});
  ASSERT_EQ(uncond.size(), base.size());
  EXPECT_FALSE(at::equal(uncond[0].v, base[0].v)) << "the erase term acts on every token";
  GenerationRequest no_concept = Request("a red circle on a blue background");
  no_concept.concepts["checker"] = {concept_, {}, false};
  no_concept.edit_unconditional = true;
  GenerationRequest base_request = Request("a red circle on a blue background");
  EXPECT_TRUE(at::equal(pipe.Generate({no_concept})[0].images[0], pipe.Generate({base_request})[0].images[0]));
  GenerationRequest unknown = plain;
  EXPECT_THROW(pipe.PromptKV("", unknown.concepts, MultiConceptMode::kApproximate, {"nope"}), c10::ValueError);
}

TEST_F(PipelineTest, GatesShowWhereEachEditActs) {
  Pipeline pipe(model_);
  std::map<std::string, ConceptRef> refs;
  refs["checker"] = {concept_, {0.7, 0.15}, false};
  const PromptGates g = pipe.Gates("a photo of a <checker>", refs);
  ASSERT_TRUE(g.value_gate.defined());
  ASSERT_EQ(g.value_gate.sizes(), (std::vector<int64_t>{77, 1}));
  ASSERT_EQ(g.tokens.positions.size(), 1u);
  const int64_t at = g.tokens.positions[0];
  // The learned embedding is where i* was measured, so the gate opens there, and only there.
  EXPECT_GT(g.value_gate[at][0].item<float>(), 0.5f);
  for (int64_t n = 0; n < 77; ++n) {
    if (n != at) EXPECT_LT(g.value_gate[n][0].item<float>(), 0.1f) << "token " << n;
  }
  // The request's beta and temperature reach the gate: sigmoid((alpha - beta) / tau) is monotone in
  // both, so at the concept's token (alpha above beta) a softer temperature closes it and a lower
  // beta opens it.
  std::map<std::string, ConceptRef> softer = refs, lower = refs;
  softer["checker"].gate = {0.7, 1.0};
  lower["checker"].gate = {0.5, 0.15};
  EXPECT_LT(pipe.Gates("a photo of a <checker>", softer).value_gate[at][0].item<float>(),
            g.value_gate[at][0].item<float>() - 0.1f);
  EXPECT_GT(pipe.Gates("a photo of a <checker>", lower).value_gate[at][0].item<float>(),
            g.value_gate[at][0].item<float>());
  // Local key-locking: K and V see the same encodings. Global: K sees the superclass word there.
  EXPECT_TRUE(at::equal(g.key_gate, g.value_gate));
  refs["checker"].global_key_lock = true;
  EXPECT_FALSE(at::equal(pipe.Gates("a photo of a <checker>", refs).key_gate, g.value_gate));
  // A prompt that does not use the concept has no gates.
  EXPECT_FALSE(pipe.Gates("a photo of a star", refs).value_gate.defined());
}

TEST_F(PipelineTest, SavedAndLoadedConceptGivesIdenticalImages) {
  Pipeline pipe(model_);
  auto loaded = std::make_shared<Concept>(DecodeConcept(EncodeConcept(*concept_, {at::kFloat}), model_->model_id));
  GenerationRequest a = Request("a photo of a <checker> on a green background");
  a.concepts["checker"] = {concept_, {}, false};
  GenerationRequest b = a;
  b.concepts["checker"] = {loaded, {}, false};
  EXPECT_TRUE(at::equal(pipe.Generate({a})[0].images[0], pipe.Generate({b})[0].images[0]));
}

// The service stores the default encoding (fp16 values and embedding): a stored concept loads to
// the same images every time, saving it again gives the same bytes, and its images stay close to
// the trained (float32) concept's.
TEST_F(PipelineTest, AConceptInTheStoredEncodingGivesTheSameImagesOnEveryLoad) {
  Pipeline pipe(model_);
  const std::string blob = EncodeConcept(*concept_);
  auto first = std::make_shared<Concept>(DecodeConcept(blob, model_->model_id));
  auto second = std::make_shared<Concept>(DecodeConcept(blob, model_->model_id));
  EXPECT_EQ(EncodeConcept(*first), blob) << "a stored concept saves to the same bytes";
  GenerationRequest r = Request("a photo of a <checker> on a green background");
  r.concepts["checker"] = {first, {}, false};
  const at::Tensor a = pipe.Generate({r})[0].images[0];
  r.concepts["checker"] = {second, {}, false};
  EXPECT_TRUE(at::equal(a, pipe.Generate({r})[0].images[0]));
  r.concepts["checker"] = {concept_, {}, false};
  const at::Tensor trained = pipe.Generate({r})[0].images[0];
  EXPECT_LT((a - trained).abs().mean().item<double>(), 0.02) << "fp16 storage moved the images";
}

// Two concepts trained apart (other images, superclass and seed): in one prompt each edit opens
// on its own token only, and a concept the request carries but the prompt does not name changes
// nothing.
TEST_F(PipelineTest, TwoConceptsGateOnTheirOwnTokensOnly) {
  Pipeline pipe(model_);
  auto candy = CandyConcept("candy");
  ASSERT_NE(candy->superclass, concept_->superclass);
  std::map<std::string, ConceptRef> refs = {{"checker", {concept_, {0.7, 0.15}, false}},
                                            {"candy", {candy, {0.7, 0.15}, false}}};
  const PromptGates g = pipe.Gates("a <candy> to the left of a <checker>", refs);
  ASSERT_EQ(g.tokens.positions.size(), 2u);
  ASSERT_EQ(g.value_gate.sizes(), (std::vector<int64_t>{77, 2}));
  // Columns follow the prompt's order of concepts: candy first, then checker, each used once.
  ASSERT_EQ(g.tokens.concepts, (std::vector<std::string>{"candy", "checker"}));
  for (int64_t c = 0; c < 2; ++c) {
    for (int64_t n = 0; n < 77; ++n) {
      const float v = g.value_gate[n][c].item<float>();
      if (n == g.tokens.positions[c]) {
        EXPECT_GT(v, 0.5f) << "concept " << c << " at its token " << n;
      } else {
        EXPECT_LT(v, 0.1f) << "concept " << c << " leaks to token " << n;
      }
    }
  }
  // Carried but not named: the request equals one without it.
  GenerationRequest both = Request("a photo of a <candy>");
  both.concepts = {{"checker", refs["checker"]}, {"candy", refs["candy"]}};
  GenerationRequest only = Request("a photo of a <candy>");
  only.concepts = {{"candy", refs["candy"]}};
  EXPECT_TRUE(at::equal(pipe.Generate({both})[0].images[0], pipe.Generate({only})[0].images[0]));
}

TEST_F(PipelineTest, BatchOfDifferentConceptsEqualsRequestsRunOneByOne) {
  Pipeline pipe(model_);
  // A second concept trained apart (not a scaled copy: its embedding, i* and superclass differ, so
  // mixing up which concept's embedding or edit goes where changes the images).
  auto second = CandyConcept("other");
  std::vector<GenerationRequest> reqs = {Request("a photo of a <checker>", 1), Request("a blue square", 2),
                                         Request("a <other> and a <checker>", 3)};
  reqs[0].concepts["checker"] = {concept_, {}, false};
  reqs[2].concepts["checker"] = {concept_, {0.6, 0.15}, true};
  reqs[2].concepts["other"] = {second, {}, false};
  reqs[2].num_images = 2;
  ExpectBatchEqualsOneByOne(pipe, reqs);
}

TEST_F(PipelineTest, ImageNOfARequestEqualsAOneImageRequestWithSeedPlusN) {
  Pipeline pipe(model_);
  GenerationRequest two = Request("a green star", 40);
  two.num_images = 2;
  auto both = pipe.Generate({two})[0].images;
  auto second = pipe.Generate({Request("a green star", 41)})[0].images;
  ASSERT_EQ(both.size(), 2u);
  EXPECT_TRUE(AllClose(both[1], second[0], 1e-4, 1e-4, "image 1 vs seed + 1"));
  EXPECT_GT((both[0] - both[1]).abs().mean().item<double>(), 1e-3) << "images of a request differ";
}

// Requests with different steps run as groups, one after another; progress counts over all of
// them, so it never goes back and reaches its total only at the end.
TEST_F(PipelineTest, ProgressOverGroupsOnlyRisesAndEndsOnce) {
  Pipeline pipe(model_);
  GenerationRequest a = Request("a green star", 1);
  GenerationRequest b = Request("a blue square", 2);
  a.steps = 2;
  b.steps = 3;
  std::vector<std::pair<int64_t, int64_t>> calls;
  pipe.Generate({a, b}, [&](int64_t step, int64_t total) {
    calls.emplace_back(step, total);
    return true;
  });
  ASSERT_FALSE(calls.empty());
  for (size_t i = 0; i < calls.size(); ++i) {
    EXPECT_EQ(calls[i].second, 5) << i;
    if (i > 0) EXPECT_GT(calls[i].first, calls[i - 1].first) << i;
    if (i + 1 < calls.size()) EXPECT_LT(calls[i].first, 5) << i;
  }
  EXPECT_EQ(calls.back().first, 5);
}

TEST(GuidedPredictionTest, RescaleMatchesTheConditionalStdPerImage) {
  at::Tensor uncond = at::randn({3, 4, 8, 8}, MakeGenerator(1));
  at::Tensor cond = at::randn({3, 4, 8, 8}, MakeGenerator(2)) * 0.5;
  const at::Tensor scale = at::tensor({7.5f, 7.5f, 2.0f}).reshape({3, 1, 1, 1});
  const at::Tensor plain = uncond + scale * (cond - uncond);
  EXPECT_TRUE(AllClose(GuidedPrediction(uncond, cond, scale, at::zeros({3, 1, 1, 1})), plain, 1e-6, 1e-6, "phi 0"));
  const at::Tensor full = GuidedPrediction(uncond, cond, scale, at::ones({3, 1, 1, 1}));
  for (int i = 0; i < 3; ++i) {
    EXPECT_NEAR(full[i].std().item<double>(), cond[i].std().item<double>(), 1e-4) << i;
  }
  // phi mixes linearly, image by image.
  const at::Tensor phi = at::tensor({0.7f, 0.0f, 1.0f}).reshape({3, 1, 1, 1});
  const at::Tensor mixed = GuidedPrediction(uncond, cond, scale, phi);
  EXPECT_TRUE(AllClose(mixed, phi * full + (1 - phi) * plain, 1e-5, 1e-5, "mix"));
}

TEST_F(PipelineTest, GuidanceRescaleIsPerRequestInABatch) {
  Pipeline pipe(model_);
  GenerationRequest a = Request("a red circle on a blue background", 3);
  GenerationRequest b = Request("a green square", 4);
  b.guidance_rescale = 0.7;
  const auto together = pipe.Generate({a, b});
  const auto alone = pipe.Generate({b});
  EXPECT_TRUE(AllClose(together[1].images[0], alone[0].images[0], 1e-4, 1e-4, "rescaled request"));
  EXPECT_TRUE(AllClose(together[0].images[0], pipe.Generate({a})[0].images[0], 1e-4, 1e-4, "plain request"));
  GenerationRequest off = b;
  off.guidance_rescale = 0;
  EXPECT_GT((alone[0].images[0] - pipe.Generate({off})[0].images[0]).abs().mean().item<double>(), 1e-4);
  GenerationRequest bad = b;
  bad.guidance_rescale = 1.5;
  EXPECT_THROW(pipe.Generate({bad}), c10::ValueError);
}

TEST(RegionMaskTest, EachCellGetsTheFractionOfItInsideTheBox) {
  const at::Tensor left = RegionMask({"x", 0, 0, 0.5, 1}, 2, 4);
  ASSERT_EQ(left.sizes(), (std::vector<int64_t>{1, 1, 2, 4}));
  EXPECT_TRUE(at::equal(left[0][0], at::tensor({1.f, 1.f, 0.f, 0.f}).repeat({2, 1})));
  // x in [0.3, 1], y in [0, 0.25] on 4x4 cells of width 0.25: column 1 is 80 % inside, row 0 whole.
  const at::Tensor part = RegionMask({"x", 0.3, 0, 1, 0.25}, 4, 4)[0][0];
  EXPECT_NEAR(part[0][0].item<float>(), 0.0f, 1e-6);
  EXPECT_NEAR(part[0][1].item<float>(), 0.8f, 1e-6);
  EXPECT_NEAR(part[0][3].item<float>(), 1.0f, 1e-6);
  EXPECT_NEAR(part[1].sum().item<float>(), 0.0f, 1e-6);
  EXPECT_NEAR(RegionMask({"x", 0, 0, 1, 1}, 3, 5).sum().item<float>(), 15.0f, 1e-5);
  for (const PromptRegion& bad : {PromptRegion{"x", 0.5, 0, 0.5, 1}, PromptRegion{"x", -0.1, 0, 1, 1},
                                  PromptRegion{"x", 0, 0, 1, 1.5}, PromptRegion{"x", 0, 0.6, 1, 0.2}}) {
    EXPECT_THROW(RegionMask(bad, 4, 4), c10::ValueError);
  }
}

TEST_F(PipelineTest, RegionsFollowTheirOwnPromptInsideTheirBox) {
  Pipeline pipe(model_);
  // A region over the whole image replaces the prompt everywhere: the region's prompt's image.
  GenerationRequest whole = Request("a blue square on a yellow background", 6);
  whole.concepts["checker"] = {concept_, {}, true};
  whole.regions = {{"a photo of a <checker>", 0, 0, 1, 1}};
  GenerationRequest direct = Request("a photo of a <checker>", 6);
  direct.concepts["checker"] = {concept_, {}, true};
  EXPECT_TRUE(AllClose(pipe.Generate({whole})[0].images[0], pipe.Generate({direct})[0].images[0], 1e-5, 1e-5,
                       "whole-image region"));
  // A region over the left half draws its own object there: a red circle on the right of a blue
  // image, plus (from the region) a yellow star on the left. Object pixels are the ones whose red
  // channel is well above the blue background's.
  GenerationRequest plain = Request("a small red circle on the right on a blue background", 7);
  plain.num_images = 4;
  GenerationRequest left = plain;
  left.regions = {{"a small yellow star on the left on a blue background", 0, 0, 0.5, 1}};
  const auto a = pipe.Generate({plain})[0].images, b = pipe.Generate({left})[0].images;
  auto object_pixels = [](const at::Tensor& img, int64_t from, int64_t to) {
    return (img[0].slice(1, from, to) > 0).sum().item<int64_t>();
  };
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_LT(object_pixels(a[i], 0, 16), 3) << "image " << i << ": nothing on the left without the region";
    EXPECT_GT(object_pixels(b[i], 0, 16), 12) << "image " << i << ": the region's object on the left";
    EXPECT_GT(object_pixels(b[i], 16, 32), 12) << "image " << i << ": the prompt's object still on the right";
  }
}

TEST_F(PipelineTest, RequestsWithRegionsBatchLikeRequestsRunOneByOne) {
  Pipeline pipe(model_);
  std::vector<GenerationRequest> reqs = {Request("a <checker> and a green circle", 1), Request("a blue square", 2),
                                         Request("a red heart", 3)};
  reqs[0].concepts["checker"] = {concept_, {}, true};
  reqs[0].regions = {{"a small <checker> on the left", 0, 0, 0.5, 1}, {"a small green circle on the right", 0.5, 0, 1, 1}};
  reqs[0].num_images = 2;
  reqs[2].regions = {{"a purple triangle", 0.25, 0.25, 0.75, 0.75}};
  reqs[2].guidance_scale = 1.0;  // no classifier-free guidance: the regions still apply
  const auto together = ExpectBatchEqualsOneByOne(pipe, reqs);
  EXPECT_GT((together[2].images[0] - pipe.Generate({Request("a red heart", 3)})[0].images[0]).abs().mean().item<double>(),
            1e-3);
}

TEST_F(PipelineTest, BadRegionsAreRejected) {
  Pipeline pipe(model_);
  auto expect_error = [&](const GenerationRequest& r, const std::string& words) {
    try {
      pipe.Generate({r});
      ADD_FAILURE() << "no error; expected one with \"" << words << "\"";
    } catch (const c10::ValueError& e) {
      EXPECT_NE(std::string(e.what_without_backtrace()).find(words), std::string::npos) << e.what_without_backtrace();
    }
  };
  GenerationRequest r = Request("a red circle");
  r.regions = {{"a <nobody>", 0, 0, 0.5, 1}};
  expect_error(r, "<nobody>");
  r.regions = {{"", 0, 0, 0.5, 1}};
  expect_error(r, "region's prompt is empty");
  r.regions = {{"a star", 0.5, 0, 0.2, 1}};
  expect_error(r, "region box");
  r.regions.assign(kMaxRegions + 1, {"a star", 0, 0, 1, 1});
  expect_error(r, "at most 8 regions");
}

TEST_F(PipelineTest, BadPromptsAndForeignConceptsAreRejected) {
  Pipeline pipe(model_);
  EXPECT_THROW(pipe.Tokenize("a photo of <nobody>", {}), c10::ValueError);
  auto foreign = std::make_shared<Concept>(*concept_);
  foreign->base_model_id = "another-model";
  std::map<std::string, ConceptRef> c = {{"checker", {foreign, {}, false}}};
  try {
    pipe.Tokenize("a <checker>", c);
    FAIL();
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("another-model"), std::string::npos);
  }
  std::string long_prompt;
  for (int i = 0; i < 80; ++i) long_prompt += "red ";
  c = {{"checker", {concept_, {}, false}}};
  EXPECT_THROW(pipe.Tokenize(long_prompt + "<checker>", c), c10::ValueError);
  PromptTokens t = pipe.Tokenize("a <checker> and a <checker>", c);
  EXPECT_EQ(t.concepts.size(), 1u);
  EXPECT_EQ(t.positions.size(), 2u);
  EXPECT_EQ(t.ids[t.positions[0]], 49408);
  GenerationRequest bad = Request("a red circle");
  bad.width = 30;
  EXPECT_THROW(pipe.Generate({bad}), c10::ValueError);
  // The superclass token the key-lock reads must be the superclass word's own token.
  auto wrong_token = std::make_shared<Concept>(*concept_);
  wrong_token->superclass_token_id = 49408;  // past the vocabulary: a concept's own slot
  c = {{"checker", {wrong_token, {}, false}}};
  try {
    pipe.Tokenize("a <checker>", c);
    FAIL();
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("superclass_token_id 49408"), std::string::npos);
  }
}

// Values that overflow the attention give NaN images; they used to leave as black PNGs reported
// as a success. Now the generation fails with a value error (a worker then retries the batch's
// requests one by one, failing only this one).
TEST_F(PipelineTest, AGenerationThatOverflowsFailsInsteadOfReturningBlackImages) {
  Pipeline pipe(model_);
  auto huge = std::make_shared<Concept>(*concept_);
  huge->v_targets = at::full_like(concept_->v_targets, 1e30);
  GenerationRequest r = Request("a photo of a <checker>");
  r.concepts["checker"] = {huge, {}, false};
  try {
    pipe.Generate({r});
    FAIL() << "no error";
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("overflowed"), std::string::npos);
  }
}

}  // namespace
}  // namespace perfusion

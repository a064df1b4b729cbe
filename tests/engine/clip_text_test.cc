#include "perfusion/clip_text.h"

#include <ATen/Functions.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "perfusion/module_io.h"
#include "perfusion/name_conversion.h"
#include "perfusion/nn_blocks.h"
#include "perfusion/safetensors.h"
#include "tests/engine/test_util.h"

namespace perfusion {
namespace {

using testing::AllClose;
using testing::EnvOr;
using testing::FileExists;
using testing::SharedDir;
using testing::ThrownMessage;

std::string ModelsDir() { return EnvOr("PERFUSION_MODEL_VECTORS_DIR", SharedDir() + "/data/conformance/models"); }

std::string TempPath(const std::string& name) {
  return ::testing::TempDir() + "/" + name + "_" + std::to_string(::getpid());
}

CLIPTextModelOptions TinyOptions() {
  return CLIPTextModelOptions()
      .hidden_size(32)
      .intermediate_size(128)
      .num_attention_heads(4)
      .num_hidden_layers(2)
      .vocab_size(1000);
}

// BOS, `words`, EOS, EOS padding to 77 (SD's tokenizer layout), for the tiny vocabulary.
at::Tensor Prompt(const std::vector<int64_t>& words, int64_t bos = 998, int64_t eos = 999, int64_t len = 77) {
  std::vector<int64_t> ids{bos};
  ids.insert(ids.end(), words.begin(), words.end());
  while (static_cast<int64_t>(ids.size()) < len) ids.push_back(eos);
  return at::tensor(ids, at::kLong).unsqueeze(0);
}

class CLIPTextModelTest : public testing::SeededTest {};

// A conformance fixture: the tiny reference model loaded through config.json + safetensors.
class CLIPTextConformanceTest : public testing::SeededTest {
 protected:
  void SetUp() override {
    const std::string dir = ModelsDir();
    vectors_path_ = dir + "/clip_text_vectors.safetensors";
    if (!FileExists(vectors_path_)) GTEST_SKIP() << "no conformance vectors at " << vectors_path_;
    vectors_ = LoadSafetensors(vectors_path_, &meta_);
    ASSERT_EQ(meta_.count("config"), 1u);
    ASSERT_EQ(meta_.count("weights"), 1u);
    model_ = CLIPTextModel(CLIPTextModelOptionsFromConfigFile(dir + "/" + meta_["config"]));
    LoadStateDict(*model_, dir + "/" + meta_["weights"], ClipTextLoadOptions());
    model_->eval();
    rtol_ = std::stod(meta_.at("rtol"));
    atol_ = std::stod(meta_.at("atol"));
  }

  std::string vectors_path_;
  std::map<std::string, at::Tensor> vectors_;
  std::map<std::string, std::string> meta_;
  CLIPTextModel model_{nullptr};
  double rtol_ = 0, atol_ = 0;
};

TEST_F(CLIPTextModelTest, Sd15ConfigHasExactlyTheTransformersTensorNamesAndShapes) {
  const std::string path = SharedDir() + "/data/sd15/text_encoder.tsv";
  if (!FileExists(path)) GTEST_SKIP() << "no manifest at " << path;
  const auto manifest = testing::ReadManifest(path);
  const std::map<std::string, std::vector<int64_t>> expected(manifest.begin(), manifest.end());
  ASSERT_EQ(expected.size(), 197u);
  CLIPTextModel model;  // SD 1.5 defaults
  std::map<std::string, std::vector<int64_t>> got;
  for (const auto& [name, shape] : Manifest(*model)) {
    EXPECT_TRUE(got.emplace(name, shape).second) << "duplicate " << name;
    auto it = expected.find(name);
    if (it == expected.end()) {
      ADD_FAILURE() << "unexpected tensor " << name;
    } else {
      EXPECT_EQ(shape, it->second) << name;
    }
  }
  for (const auto& [name, shape] : expected) EXPECT_EQ(got.count(name), 1u) << "missing tensor " << name;
  int64_t params = 0;
  for (const auto& p : model->parameters()) params += p.numel();
  EXPECT_EQ(params, 123060480);
  EXPECT_TRUE(at::equal(model->text_model->embeddings->position_ids, at::arange(77, at::kLong).unsqueeze(0)));
}

TEST_F(CLIPTextModelTest, ConfigJsonSetsEveryFieldAndDefaultsToSd15) {
  const auto sd15 = CLIPTextModelOptionsFromJson("{}");
  EXPECT_EQ(sd15.hidden_size(), 768);
  EXPECT_EQ(sd15.intermediate_size(), 3072);
  EXPECT_EQ(sd15.num_attention_heads(), 12);
  EXPECT_EQ(sd15.num_hidden_layers(), 12);
  EXPECT_EQ(sd15.max_position_embeddings(), 77);
  EXPECT_EQ(sd15.vocab_size(), 49408);
  EXPECT_EQ(sd15.hidden_act(), "quick_gelu");
  EXPECT_DOUBLE_EQ(sd15.layer_norm_eps(), 1e-5);

  const auto o = CLIPTextModelOptionsFromJson(
      R"({"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 2, "num_hidden_layers": 3,
          "max_position_embeddings": 40, "vocab_size": 500, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
          "projection_dim": 7, "bos_token_id": 0})");
  EXPECT_EQ(o.hidden_size(), 64);
  EXPECT_EQ(o.intermediate_size(), 96);
  EXPECT_EQ(o.num_attention_heads(), 2);
  EXPECT_EQ(o.num_hidden_layers(), 3);
  EXPECT_EQ(o.max_position_embeddings(), 40);
  EXPECT_EQ(o.vocab_size(), 500);
  EXPECT_EQ(o.hidden_act(), "gelu");
  EXPECT_DOUBLE_EQ(o.layer_norm_eps(), 1e-6);

  EXPECT_THROW(CLIPTextModelOptionsFromJson(R"({"hidden_act": "gelu_new"})"), c10::ValueError);
  EXPECT_THROW(CLIPTextModelOptionsFromJson(R"({"hidden_size": 30, "num_attention_heads": 4})"), c10::ValueError);
  EXPECT_THROW(CLIPTextModelOptionsFromJson(R"({"hidden_size": "768"})"), c10::ValueError);
  EXPECT_THROW(CLIPTextModelOptionsFromJson("not json"), c10::ValueError);
  EXPECT_NE(ThrownMessage<c10::ValueError>([] { CLIPTextModelOptionsFromJson(R"({"vocab_size": 1.5})"); })
                .find("vocab_size"),
            std::string::npos);
}

TEST_F(CLIPTextConformanceTest, IdsPathMatchesReferenceAtEveryLayer) {
  c10::InferenceMode guard;
  const auto& ids = vectors_.at("input_ids");
  std::vector<at::Tensor> hidden;
  auto out = model_->forward_embeds(model_->embed_tokens(ids), &hidden);
  EXPECT_TRUE(AllClose(out, vectors_.at("last_hidden_state"), rtol_, atol_, "last_hidden_state"));
  EXPECT_TRUE(at::equal(model_->forward(ids), out)) << "forward(ids) must equal forward_embeds(embed_tokens(ids))";
  const auto& expected_hidden = vectors_.at("hidden_states");
  ASSERT_EQ(static_cast<int64_t>(hidden.size()), expected_hidden.size(0));
  for (size_t i = 0; i < hidden.size(); ++i) {
    EXPECT_TRUE(AllClose(hidden[i], expected_hidden[i], rtol_, atol_, "hidden_states[" + std::to_string(i) + "]"));
  }
}

TEST_F(CLIPTextConformanceTest, EmbeddingsPathWithSubstitutedVectorMatchesReference) {
  c10::InferenceMode guard;
  const auto& ids = vectors_.at("input_ids");
  const auto& positions = vectors_.at("subst.position");
  const auto& vectors = vectors_.at("subst.vector");
  // Building the substituted embeddings ourselves gives exactly the stored input.
  auto embeds = model_->embed_tokens(ids).clone();
  for (int64_t b = 0; b < embeds.size(0); ++b) embeds[b][positions[b].item<int64_t>()].copy_(vectors[b]);
  EXPECT_TRUE(at::equal(embeds, vectors_.at("subst.inputs_embeds")));

  std::vector<at::Tensor> hidden;
  auto out = model_->forward_embeds(vectors_.at("subst.inputs_embeds"), &hidden);
  EXPECT_TRUE(AllClose(out, vectors_.at("subst.last_hidden_state"), rtol_, atol_, "subst.last_hidden_state"));
  const auto& expected_hidden = vectors_.at("subst.hidden_states");
  ASSERT_EQ(static_cast<int64_t>(hidden.size()), expected_hidden.size(0));
  for (size_t i = 0; i < hidden.size(); ++i) {
    EXPECT_TRUE(
        AllClose(hidden[i], expected_hidden[i], rtol_, atol_, "subst.hidden_states[" + std::to_string(i) + "]"));
  }
}

TEST_F(CLIPTextConformanceTest, DoublePrecisionMatchesReferenceTenTimesTighter) {
  // The expectations were computed in float64: a float64 run of the same graph lands much closer.
  model_->to(at::kDouble);
  c10::InferenceMode guard;
  auto out = model_->forward(vectors_.at("input_ids"));
  EXPECT_EQ(out.scalar_type(), at::kDouble);
  EXPECT_TRUE(AllClose(out, vectors_.at("last_hidden_state"), rtol_ / 10, atol_ / 10, "last_hidden_state (f64)"));
  auto subst = model_->forward_embeds(vectors_.at("subst.inputs_embeds"));  // float input, cast to the model dtype
  EXPECT_TRUE(AllClose(subst, vectors_.at("subst.last_hidden_state"), rtol_ / 10, atol_ / 10, "subst (f64)"));
}

TEST_F(CLIPTextConformanceTest, FileWithoutPositionIdsNeedsTheOptionalNameAndFileWithItLoadsStrictly) {
  const std::string dir = ModelsDir();
  CLIPTextModel fresh(CLIPTextModelOptionsFromConfigFile(dir + "/text_encoder/config.json"));
  const auto msg = ThrownMessage<c10::ValueError>(
      [&] { LoadStateDict(*fresh, dir + "/text_encoder/model.safetensors", LoadOptions{}); });
  EXPECT_NE(msg.find("text_model.embeddings.position_ids"), std::string::npos) << msg;

  // A transformers < 4.31 style file (with position_ids) loads with no options at all.
  const std::string path = TempPath("clip_with_position_ids.safetensors");
  SaveStateDict(*model_, path);
  ASSERT_TRUE(SafetensorsReader::Open(path)->contains("text_model.embeddings.position_ids"));
  LoadStateDict(*fresh, path);
  c10::InferenceMode guard;
  EXPECT_TRUE(at::equal(fresh->forward(vectors_.at("input_ids")), model_->forward(vectors_.at("input_ids"))));
  std::remove(path.c_str());
}

TEST_F(CLIPTextModelTest, SaveThenLoadGivesBitIdenticalOutputs) {
  CLIPTextModel a(TinyOptions());
  const std::string path = TempPath("clip_roundtrip.safetensors");
  SaveStateDict(*a, path);
  at::manual_seed(12345);
  CLIPTextModel b(TinyOptions());
  LoadStateDict(*b, path);
  c10::InferenceMode guard;
  auto ids = at::randint(0, 1000, {3, 77}, at::kLong);
  auto ya = a->forward(ids), yb = b->forward(ids);
  EXPECT_TRUE(at::equal(ya, yb));
  std::remove(path.c_str());
}

// The Perfusion concept path: a learnt vector replaces the token embedding at the concept position.
// With the vector set to the superclass word's embedding the full model must reproduce the
// superclass prompt exactly; an implementation that skips the position embeddings or the causal mask
// on this path (the reference implementation's bug) fails here.
TEST_F(CLIPTextModelTest, SuperclassEmbeddingAtConceptPositionReproducesSuperclassPrompt) {
  CLIPTextModel model(TinyOptions());
  c10::InferenceMode guard;
  const int64_t kConcept = 997, kSuperclass = 42, kPos = 3;  // "a photo of <concept> on grass"
  auto concept_ids = Prompt({5, 17, kConcept, 230, 311});
  auto superclass_ids = Prompt({5, 17, kSuperclass, 230, 311});
  ASSERT_EQ(concept_ids[0][kPos].item<int64_t>(), kConcept);

  auto embeds = model->embed_tokens(concept_ids).clone();  // [1, 77, D]
  embeds[0][kPos].copy_(model->token_embedding_weight()[kSuperclass].clone());
  auto via_embeds = model->forward_embeds(embeds);
  auto via_ids = model->forward(superclass_ids);
  EXPECT_TRUE(at::equal(via_embeds, via_ids));

  // The concept token itself gives a different encoding from the concept position on, and the same before it.
  auto concept = model->forward(concept_ids);
  EXPECT_TRUE(at::equal(concept.narrow(1, 0, kPos), via_ids.narrow(1, 0, kPos)));
  EXPECT_GT((concept.narrow(1, kPos, 77 - kPos) - via_ids.narrow(1, kPos, 77 - kPos)).abs().amin(-1).min().item<float>(),
            0.0f);

  // Skipping the position embeddings is detectable: the encoder without them differs.
  std::vector<at::Tensor> hidden;
  model->forward_embeds(embeds, &hidden);
  EXPECT_TRUE(at::equal(hidden[0], embeds + model->text_model->embeddings->position_embedding->weight.unsqueeze(0)));
}

TEST_F(CLIPTextModelTest, CausalMaskKeepsEarlierPositionsIndependentOfLaterTokens) {
  CLIPTextModel model(TinyOptions());
  c10::InferenceMode guard;
  auto a = Prompt({10, 20, 30, 40, 50, 60});
  auto b = a.clone();
  b[0][5] = 123;  // change the 5th word
  auto ya = model->forward(a), yb = model->forward(b);
  EXPECT_TRUE(at::equal(ya.narrow(1, 0, 5), yb.narrow(1, 0, 5)));
  EXPECT_FALSE(at::allclose(ya.narrow(1, 5, 72), yb.narrow(1, 5, 72)));
}

TEST_F(CLIPTextModelTest, ShorterSequencesMatchThePrefixOfTheFullSequence) {
  CLIPTextModel model(TinyOptions());
  c10::InferenceMode guard;
  auto ids = Prompt({7, 8, 9});
  auto full = model->forward(ids);
  auto prefix = model->forward(ids.narrow(1, 0, 10).contiguous());
  EXPECT_TRUE(AllClose(prefix, full.narrow(1, 0, 10), 1e-6, 1e-6, "prefix"));
}

TEST_F(CLIPTextModelTest, GradientsReachTheConceptVectorAndTheWeights) {
  CLIPTextModel model(TinyOptions());
  auto ids = Prompt({5, 17, 997, 230});
  auto base = model->embed_tokens(ids).detach();
  auto vec = at::randn({32}).requires_grad_(true);
  auto mask = at::zeros({1, 77, 1});
  mask[0][3][0] = 1.0;
  auto embeds = base * (1 - mask) + mask * vec;
  auto out = model->forward_embeds(embeds);
  out.pow(2).sum().backward();
  ASSERT_TRUE(vec.grad().defined());
  EXPECT_GT(vec.grad().abs().sum().item<float>(), 0.0f);
  const auto& wq = model->text_model->encoder->layers->ptr<CLIPEncoderLayerImpl>(0)->self_attn->q_proj->weight;
  ASSERT_TRUE(wq.grad().defined());
  EXPECT_GT(wq.grad().abs().sum().item<float>(), 0.0f);
}

TEST_F(CLIPTextModelTest, GeluConfigUsesTheExactGelu) {
  auto options = TinyOptions();
  CLIPTextModel quick(options);
  CLIPTextModel gelu(options.hidden_act("gelu"));
  const std::string path = TempPath("clip_gelu.safetensors");
  SaveStateDict(*quick, path);
  LoadStateDict(*gelu, path);
  std::remove(path.c_str());
  c10::InferenceMode guard;
  auto* mlp_q = quick->text_model->encoder->layers->ptr<CLIPEncoderLayerImpl>(0)->mlp.get();
  auto* mlp_g = gelu->text_model->encoder->layers->ptr<CLIPEncoderLayerImpl>(0)->mlp.get();
  auto h = at::randn({2, 5, 32});
  auto pre = mlp_q->fc1(h);
  EXPECT_TRUE(AllClose(mlp_q->forward(h), mlp_q->fc2(pre * at::sigmoid(1.702 * pre)), 1e-6, 1e-6, "quick_gelu"));
  EXPECT_TRUE(AllClose(mlp_g->forward(h), mlp_g->fc2(at::gelu(pre)), 1e-6, 1e-6, "gelu"));
}

TEST_F(CLIPTextModelTest, PooledIsTheHiddenStateAtTheFirstEos) {
  CLIPTextModel model(TinyOptions());
  c10::InferenceMode guard;
  auto ids = at::cat({Prompt({1, 2, 3}), Prompt({4, 5, 6, 7, 8})});
  auto out = model->forward(ids);
  auto pooled = CLIPTextModelImpl::Pooled(out, ids);
  ASSERT_EQ(pooled.sizes(), (at::IntArrayRef{2, 32}));
  EXPECT_TRUE(at::equal(pooled[0], out[0][4]));
  EXPECT_TRUE(at::equal(pooled[1], out[1][6]));
}

TEST_F(CLIPTextModelTest, BadInputRaisesClearErrors) {
  CLIPTextModel model(TinyOptions());
  c10::InferenceMode guard;
  auto msg = ThrownMessage<c10::ValueError>([&] { model->forward(at::zeros({77}, at::kLong)); });
  EXPECT_NE(msg.find("input_ids must be [B, S]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[77]"), std::string::npos) << msg;
  EXPECT_THROW(model->forward(at::zeros({1, 2, 77}, at::kLong)), c10::ValueError);
  EXPECT_THROW(model->forward(at::zeros({1, 77}, at::kFloat)), c10::ValueError);

  msg = ThrownMessage<c10::IndexError>([&] { model->forward(Prompt({1000})); });
  EXPECT_NE(msg.find("outside the vocabulary [0, 1000)"), std::string::npos) << msg;
  EXPECT_THROW(model->forward(Prompt({-1})), c10::IndexError);

  msg = ThrownMessage<c10::ValueError>([&] { model->forward(at::zeros({1, 78}, at::kLong)); });
  EXPECT_NE(msg.find("max_position_embeddings = 77"), std::string::npos) << msg;
  EXPECT_THROW(model->forward(at::zeros({1, 0}, at::kLong)), c10::ValueError);

  msg = ThrownMessage<c10::ValueError>([&] { model->forward_embeds(at::zeros({1, 77, 31})); });
  EXPECT_NE(msg.find("token_embeds must be [B, S, 32]"), std::string::npos) << msg;
  EXPECT_THROW(model->forward_embeds(at::zeros({1, 78, 32})), c10::ValueError);
  EXPECT_THROW(model->forward_embeds(at::zeros({77, 32})), c10::ValueError);
  EXPECT_THROW(model->forward_embeds(at::zeros({1, 77, 32}, at::kLong)), c10::ValueError);
  EXPECT_THROW(CLIPTextModel(TinyOptions().num_attention_heads(5)), c10::ValueError);
}

TEST_F(CLIPTextModelTest, AttentionHeadsUseContiguousChannelBlocksAndBiasMasks) {
  c10::InferenceMode guard;
  auto q = at::randn({2, 5, 8}), k = at::randn({2, 6, 8}), v = at::randn({2, 6, 4});
  AttentionOptions opt;
  opt.heads = 2;
  auto keep = at::ones({2, 6}, at::kBool);
  keep[1][4] = false;
  auto bias = KeyPaddingAttentionBias(keep, q.options());
  auto out = MultiHeadAttention(q, k, v, opt, bias);
  ASSERT_EQ(out.sizes(), (at::IntArrayRef{2, 5, 4}));
  for (int64_t h = 0; h < 2; ++h) {
    auto qh = q.narrow(2, 4 * h, 4), kh = k.narrow(2, 4 * h, 4), vh = v.narrow(2, 2 * h, 2);
    auto scores = at::matmul(qh, kh.transpose(1, 2)) / 2.0 + bias.squeeze(1);
    auto ref = at::matmul(at::softmax(scores, -1), vh);
    EXPECT_TRUE(AllClose(out.narrow(2, 2 * h, 2), ref, 1e-6, 1e-6, "head " + std::to_string(h)));
  }
  EXPECT_THROW(MultiHeadAttention(q, k, v, opt, at::zeros({3, 1, 1, 6})), c10::ValueError);
  opt.heads = 3;
  EXPECT_THROW(MultiHeadAttention(q, k, v, opt), c10::ValueError);
  auto causal = CausalAttentionBias(3, q.options());
  EXPECT_TRUE(at::equal(at::isinf(causal), at::ones({3, 3}, at::kBool).triu(1)));
}

}  // namespace
}  // namespace perfusion

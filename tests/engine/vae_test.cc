#include "perfusion/vae.h"

#include <ATen/Functions.h>
#include <ATen/core/Generator.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <set>
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
using testing::ReadManifest;
using testing::ThrownMessage;

std::string ModelsDir() { return EnvOr("PERFUSION_MODEL_VECTORS_DIR", SharedDir() + "/data/conformance/models"); }

std::string TempPath(const std::string& name) {
  return ::testing::TempDir() + "/" + name + "_" + std::to_string(::getpid());
}

AutoencoderKLOptions TinyOptions() {
  return AutoencoderKLOptions().block_out_channels({32, 64}).layers_per_block(1).norm_num_groups(8).sample_size(16);
}

// Compares the module's (name, shape) list with a manifest: same names, same shapes, no duplicates.
void ExpectSameManifest(const std::vector<std::pair<std::string, std::vector<int64_t>>>& got,
                        const std::vector<std::pair<std::string, std::vector<int64_t>>>& expected) {
  std::map<std::string, std::vector<int64_t>> e(expected.begin(), expected.end()), g;
  ASSERT_EQ(e.size(), expected.size()) << "duplicate names in the manifest";
  for (const auto& [name, shape] : got) {
    EXPECT_TRUE(g.emplace(name, shape).second) << "duplicate " << name;
    auto it = e.find(name);
    if (it == e.end()) {
      ADD_FAILURE() << "unexpected tensor " << name;
    } else {
      EXPECT_EQ(shape, it->second) << name;
    }
  }
  for (const auto& [name, shape] : e) EXPECT_EQ(g.count(name), 1u) << "missing tensor " << name;
}

class AutoencoderKLTest : public testing::SeededTest {};

class AutoencoderKLConformanceTest : public testing::SeededTest {
 protected:
  void SetUp() override {
    const std::string dir = ModelsDir();
    const std::string path = dir + "/vae_vectors.safetensors";
    if (!FileExists(path)) GTEST_SKIP() << "no conformance vectors at " << path;
    vectors_ = LoadSafetensors(path, &meta_);
    weights_ = dir + "/" + meta_.at("weights");
    model_ = AutoencoderKL(AutoencoderKLOptionsFromConfigFile(dir + "/" + meta_.at("config")));
    LoadStateDict(*model_, weights_, VaeLoadOptions());
    model_->eval();
    rtol_ = std::stod(meta_.at("rtol"));
    atol_ = std::stod(meta_.at("atol"));
  }

  std::map<std::string, at::Tensor> vectors_;
  std::map<std::string, std::string> meta_;
  std::string weights_;
  AutoencoderKL model_{nullptr};
  double rtol_ = 0, atol_ = 0;
};

TEST_F(AutoencoderKLTest, Sd15ConfigHasExactlyTheDiffusersTensorNamesAndShapes) {
  const std::string path = SharedDir() + "/data/sd15/vae.tsv";
  if (!FileExists(path)) GTEST_SKIP() << "no manifest at " << path;
  const auto expected = ReadManifest(path);
  ASSERT_EQ(expected.size(), 248u);
  AutoencoderKL model;  // SD 1.5 defaults
  const auto got = Manifest(*model);
  ExpectSameManifest(got, expected);
  int64_t params = 0;
  for (const auto& p : model->parameters()) params += p.numel();
  EXPECT_EQ(params, 83653863);
  EXPECT_EQ(model->downsample_factor(), 8);
  EXPECT_DOUBLE_EQ(model->scaling_factor(), 0.18215);

  // The legacy names map one-to-one onto the diffusers 0.14 manifest, and back.
  const std::string legacy_path = SharedDir() + "/data/sd15/vae_legacy_attn_names.tsv";
  ASSERT_TRUE(FileExists(legacy_path));
  std::vector<std::pair<std::string, std::vector<int64_t>>> as_legacy;
  std::set<std::string> distinct;
  for (const auto& [name, shape] : got) {
    const auto legacy = VaeNameToLegacy(name);
    EXPECT_EQ(VaeNameFromLegacy(legacy), name);
    distinct.insert(legacy);
    as_legacy.emplace_back(legacy, shape);
  }
  EXPECT_EQ(distinct.size(), got.size());
  ExpectSameManifest(as_legacy, ReadManifest(legacy_path));

  // A SD 1.5-sized VAE maps a 16x16 image to a 2x2 latent and back.
  c10::InferenceMode guard;
  auto dist = model->encode(at::rand({1, 3, 16, 16}) * 2 - 1);
  EXPECT_EQ(dist.mean.sizes(), (at::IntArrayRef{1, 4, 2, 2}));
  EXPECT_EQ(model->decode(dist.mode()).sizes(), (at::IntArrayRef{1, 3, 16, 16}));
}

TEST(VaeNameConversionTest, MapsOnlyMidBlockAttentionProjections) {
  EXPECT_EQ(VaeNameFromLegacy("encoder.mid_block.attentions.0.query.weight"), "encoder.mid_block.attentions.0.to_q.weight");
  EXPECT_EQ(VaeNameFromLegacy("decoder.mid_block.attentions.0.key.bias"), "decoder.mid_block.attentions.0.to_k.bias");
  EXPECT_EQ(VaeNameFromLegacy("decoder.mid_block.attentions.0.value.weight"), "decoder.mid_block.attentions.0.to_v.weight");
  EXPECT_EQ(VaeNameFromLegacy("decoder.mid_block.attentions.0.proj_attn.bias"),
            "decoder.mid_block.attentions.0.to_out.0.bias");
  EXPECT_EQ(VaeNameToLegacy("encoder.mid_block.attentions.0.to_out.0.weight"),
            "encoder.mid_block.attentions.0.proj_attn.weight");
  for (const char* unchanged :
       {"encoder.mid_block.attentions.0.group_norm.weight", "encoder.mid_block.attentions.0.to_q.weight",
        "encoder.mid_block.resnets.0.conv1.weight", "decoder.up_blocks.0.resnets.0.norm1.weight", "quant_conv.weight",
        "encoder.down_blocks.0.query.weight", "xmid_block.attentions.0.query.weight"}) {
    EXPECT_EQ(VaeNameFromLegacy(unchanged), unchanged);
  }
  EXPECT_EQ(ClipTextLoadOptions().optional.count("text_model.embeddings.position_ids"), 1u);
}

TEST_F(AutoencoderKLTest, ConfigJsonSetsEveryFieldAndRejectsUnsupportedArchitectures) {
  const auto sd15 = AutoencoderKLOptionsFromJson("{}");
  EXPECT_EQ(sd15.block_out_channels(), (std::vector<int64_t>{128, 256, 512, 512}));
  EXPECT_EQ(sd15.layers_per_block(), 2);
  EXPECT_EQ(sd15.latent_channels(), 4);
  EXPECT_EQ(sd15.norm_num_groups(), 32);
  EXPECT_EQ(sd15.in_channels(), 3);
  EXPECT_EQ(sd15.out_channels(), 3);
  EXPECT_DOUBLE_EQ(sd15.scaling_factor(), 0.18215);

  const std::string path = ModelsDir() + "/vae/config.json";
  if (FileExists(path)) {
    const auto tiny = AutoencoderKLOptionsFromConfigFile(path);
    EXPECT_EQ(tiny.block_out_channels(), (std::vector<int64_t>{32, 64}));
    EXPECT_EQ(tiny.layers_per_block(), 1);
    EXPECT_EQ(tiny.norm_num_groups(), 8);
    EXPECT_EQ(tiny.sample_size(), 16);
    EXPECT_EQ(tiny.latent_channels(), 4);
  }
  const auto o = AutoencoderKLOptionsFromJson(
      R"({"block_out_channels": [16, 32, 48], "latent_channels": 8, "in_channels": 1, "out_channels": 2,
          "layers_per_block": 3, "norm_num_groups": 16, "scaling_factor": 0.5, "use_quant_conv": false})");
  EXPECT_EQ(o.block_out_channels(), (std::vector<int64_t>{16, 32, 48}));
  EXPECT_EQ(o.latent_channels(), 8);
  EXPECT_EQ(o.in_channels(), 1);
  EXPECT_EQ(o.out_channels(), 2);
  EXPECT_EQ(o.layers_per_block(), 3);
  EXPECT_DOUBLE_EQ(o.scaling_factor(), 0.5);
  EXPECT_FALSE(o.use_quant_conv());

  auto msg = ThrownMessage<c10::ValueError>([] {
    AutoencoderKLOptionsFromJson(R"({"block_out_channels": [32, 64], "norm_num_groups": 8,
                                    "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]})");
  });
  EXPECT_NE(msg.find("down_block_types[1]"), std::string::npos) << msg;
  msg = ThrownMessage<c10::ValueError>(
      [] { AutoencoderKLOptionsFromJson(R"({"block_out_channels": [32, 60], "norm_num_groups": 8})"); });
  EXPECT_NE(msg.find("block_out_channels[1] = 60"), std::string::npos) << msg;
  EXPECT_THROW(AutoencoderKLOptionsFromJson(R"({"up_block_types": ["UpDecoderBlock2D"]})"), c10::ValueError);
  EXPECT_THROW(AutoencoderKLOptionsFromJson(R"({"act_fn": "gelu"})"), c10::ValueError);
  EXPECT_THROW(AutoencoderKLOptionsFromJson(R"({"layers_per_block": "2"})"), c10::ValueError);
  EXPECT_THROW(AutoencoderKLOptionsFromJson("[1, 2]"), c10::ValueError);
}

TEST_F(AutoencoderKLConformanceTest, EncodeMatchesReferenceMoments) {
  c10::InferenceMode guard;
  const auto& image = vectors_.at("image");
  auto h = model_->encoder(image);
  EXPECT_TRUE(AllClose(h, vectors_.at("diag.encoder"), rtol_, atol_, "diag.encoder"));
  auto dist = model_->encode(image);
  EXPECT_TRUE(AllClose(dist.moments, vectors_.at("encode.moments"), rtol_, atol_, "encode.moments"));
  EXPECT_TRUE(AllClose(dist.mean, vectors_.at("encode.mean"), rtol_, atol_, "encode.mean"));
  EXPECT_TRUE(AllClose(dist.logvar, vectors_.at("encode.logvar"), rtol_, atol_, "encode.logvar"));
  EXPECT_TRUE(AllClose(dist.std, vectors_.at("encode.std"), rtol_, atol_, "encode.std"));
  EXPECT_TRUE(at::equal(dist.mode(), dist.mean));
}

TEST_F(AutoencoderKLConformanceTest, DecodeMatchesReferenceImage) {
  c10::InferenceMode guard;
  const auto& latents = vectors_.at("latents");
  EXPECT_TRUE(AllClose(model_->post_quant_conv(latents), vectors_.at("diag.post_quant_conv"), rtol_, atol_,
                       "diag.post_quant_conv"));
  EXPECT_TRUE(AllClose(model_->decode(latents), vectors_.at("decode.sample"), rtol_, atol_, "decode.sample"));
  EXPECT_DOUBLE_EQ(model_->scaling_factor(), std::stod(meta_.at("scaling_factor")));
}

TEST_F(AutoencoderKLConformanceTest, LegacyAttentionNamesLoadToTheSameModel) {
  // Rewrite the reference weights under the diffusers < 0.15 names and load them back.
  std::vector<std::pair<std::string, at::Tensor>> legacy;
  int renamed = 0;
  auto reader = SafetensorsReader::Open(weights_);
  for (const auto& name : reader->names()) {
    const auto legacy_name = VaeNameToLegacy(name);
    renamed += legacy_name != name;
    legacy.emplace_back(legacy_name, reader->get(name));
  }
  EXPECT_EQ(renamed, 16);  // 4 projections x (weight, bias) x (encoder, decoder)
  const std::string path = TempPath("vae_legacy.safetensors");
  SaveSafetensors(path, legacy, {{"format", "pt"}});
  AutoencoderKL fresh(TinyOptions());
  EXPECT_THROW(LoadStateDict(*fresh, path), c10::ValueError);  // strict without the rename
  LoadStateDict(*fresh, path, VaeLoadOptions());
  std::remove(path.c_str());
  c10::InferenceMode guard;
  EXPECT_TRUE(at::equal(fresh->decode(vectors_.at("latents")), model_->decode(vectors_.at("latents"))));
  EXPECT_TRUE(at::equal(fresh->encode(vectors_.at("image")).moments, model_->encode(vectors_.at("image")).moments));
}

TEST_F(AutoencoderKLTest, SaveThenLoadGivesBitIdenticalOutputs) {
  AutoencoderKL a(TinyOptions());
  const std::string path = TempPath("vae_roundtrip.safetensors");
  SaveStateDict(*a, path);
  at::manual_seed(777);
  AutoencoderKL b(TinyOptions());
  LoadStateDict(*b, path, VaeLoadOptions());
  std::remove(path.c_str());
  c10::InferenceMode guard;
  auto image = at::rand({2, 3, 16, 16}) * 2 - 1;
  EXPECT_TRUE(at::equal(a->encode(image).moments, b->encode(image).moments));
  auto z = at::randn({2, 4, 8, 8});
  EXPECT_TRUE(at::equal(a->decode(z), b->decode(z)));
}

TEST_F(AutoencoderKLTest, SampleIsMeanPlusStdTimesSeededNoise) {
  AutoencoderKL model(TinyOptions());
  c10::InferenceMode guard;
  auto dist = model->encode(at::rand({2, 3, 16, 16}) * 2 - 1);
  auto g1 = at::make_generator<at::CPUGeneratorImpl>(42);
  auto g2 = at::make_generator<at::CPUGeneratorImpl>(42);
  auto s1 = dist.sample(g1), s2 = dist.sample(g2);
  EXPECT_TRUE(at::equal(s1, s2));
  auto g3 = at::make_generator<at::CPUGeneratorImpl>(42);
  auto noise = at::randn(dist.mean.sizes(), g3, at::kFloat);
  EXPECT_TRUE(AllClose(s1, dist.mean + dist.std * noise, 1e-6, 1e-6, "sample"));
  EXPECT_FALSE(at::equal(dist.sample(at::make_generator<at::CPUGeneratorImpl>(43)), s1));
  EXPECT_TRUE(AllClose(dist.var(), dist.std * dist.std, 1e-5, 1e-7, "var"));
  EXPECT_EQ(dist.kl().sizes(), (at::IntArrayRef{2}));
  // Logvar is clamped to [-30, 20]; the raw moments are kept.
  auto extreme = DiagonalGaussian::FromMoments(at::full({1, 8, 1, 1}, 50.0));
  EXPECT_FLOAT_EQ(extreme.logvar.max().item<float>(), 20.0f);
  EXPECT_FLOAT_EQ(extreme.moments.max().item<float>(), 50.0f);
}

TEST_F(AutoencoderKLTest, EncoderDownsamplingPadsRightAndBottomOnly) {
  c10::InferenceMode guard;
  Downsample2D down(Downsample2DOptions(1, 1).padding(0));
  down->conv->weight.fill_(1.0);
  down->conv->bias.zero_();
  auto x = at::arange(16, at::kFloat).reshape({1, 1, 4, 4});
  auto y = down(x);  // window at (0,0): rows 0-2, cols 0-2; at (1,1): rows 2-3 (+ zero pad), cols 2-3 (+ pad)
  ASSERT_EQ(y.sizes(), (at::IntArrayRef{1, 1, 2, 2}));
  EXPECT_FLOAT_EQ(y[0][0][0][0].item<float>(), x.narrow(2, 0, 3).narrow(3, 0, 3).sum().item<float>());
  EXPECT_FLOAT_EQ(y[0][0][1][1].item<float>(), x.narrow(2, 2, 2).narrow(3, 2, 2).sum().item<float>());
  // Odd sizes floor: 15 -> pad 16 -> 7, 17 -> pad 18 -> 8.
  EXPECT_EQ(AutoencoderKL(TinyOptions())->encode(at::zeros({1, 3, 15, 17})).mean.sizes(),
            (at::IntArrayRef{1, 4, 7, 8}));
}

TEST_F(AutoencoderKLTest, DecoderTrainsWithAutograd) {
  AutoencoderKL model(TinyOptions());
  auto z = at::randn({1, 4, 4, 4});
  auto image = model->decode(z);
  auto dist = model->encode(image);
  (image.pow(2).mean() + dist.kl().mean()).backward();
  for (const auto* w : {&model->decoder->conv_in->weight, &model->encoder->conv_in->weight,
                        &model->decoder->mid_block->attentions->ptr<VaeAttentionImpl>(0)->to_q->weight}) {
    ASSERT_TRUE(w->grad().defined());
    EXPECT_GT(w->grad().abs().sum().item<float>(), 0.0f);
  }
}

TEST_F(AutoencoderKLTest, RunsInFloat64) {
  AutoencoderKL model(TinyOptions());
  c10::InferenceMode guard;
  auto z = at::randn({1, 4, 4, 4});
  auto y32 = model->decode(z);
  model->to(at::kDouble);
  auto y64 = model->decode(z);  // float input cast to the model dtype
  EXPECT_EQ(y64.scalar_type(), at::kDouble);
  EXPECT_TRUE(AllClose(y32, y64, 1e-4, 1e-5, "decode f32 vs f64"));
}

TEST_F(AutoencoderKLTest, BadInputRaisesClearErrors) {
  AutoencoderKL model(TinyOptions());
  c10::InferenceMode guard;
  auto msg = ThrownMessage<c10::ValueError>([&] { model->encode(at::zeros({3, 16, 16})); });
  EXPECT_NE(msg.find("image must be [B, 3, H, W], got shape [3, 16, 16]"), std::string::npos) << msg;
  EXPECT_THROW(model->encode(at::zeros({1, 4, 16, 16})), c10::ValueError);
  EXPECT_THROW(model->encode(at::zeros({1, 3, 16, 16}, at::kLong)), c10::ValueError);
  msg = ThrownMessage<c10::ValueError>([&] { model->decode(at::zeros({1, 3, 8, 8})); });
  EXPECT_NE(msg.find("latents must be [B, 4, H, W], got shape [1, 3, 8, 8]"), std::string::npos) << msg;
  EXPECT_THROW(model->decode(at::zeros({4, 8, 8})), c10::ValueError);
  EXPECT_THROW(DiagonalGaussian::FromMoments(at::zeros({1, 7, 2, 2})), c10::ValueError);
  EXPECT_THROW(AutoencoderKL(TinyOptions().norm_num_groups(5)), c10::ValueError);
}

}  // namespace
}  // namespace perfusion

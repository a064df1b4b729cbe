// Diffusers model folders: save -> load round trips bit-exactly; bad folders fail with one clear error.
#include "perfusion/model_dir.h"

#include <ATen/Functions.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <sys/stat.h>

#include <cstdio>
#include <fstream>

#include "perfusion/covariance.h"
#include "perfusion/safetensors.h"
#include "tests/engine/test_util.h"

namespace perfusion {
namespace {

// A tiny random model of the SD 1.x family.
StableDiffusion TinyRandomModel() {
  StableDiffusion m;
  m.text_encoder = CLIPTextModel(
      CLIPTextModelOptions().hidden_size(32).intermediate_size(64).num_attention_heads(2).num_hidden_layers(2));
  UNetConfig u;
  u.sample_size = 8;
  u.block_out_channels = {32, 64};
  u.down_block_types = {"CrossAttnDownBlock2D", "DownBlock2D"};
  u.up_block_types = {"UpBlock2D", "CrossAttnUpBlock2D"};
  u.layers_per_block = {1};
  u.cross_attention_dim = 32;
  u.attention_head_dim = {2};
  u.norm_num_groups = 16;
  m.unet = UNet2DConditionModel(u);
  m.vae = AutoencoderKL(AutoencoderKLOptions().block_out_channels({16, 32}).layers_per_block(1).norm_num_groups(8).scaling_factor(0.5));
  at::Tensor a = at::randn({32, 32});
  m.covariance = at::matmul(a, a.t()) + at::eye(32);
  m.model_id = "tiny-random";
  return m;
}

class ModelDirTest : public testing::SeededTest {
 protected:
  void SetUp() override {
    dir_ = ::testing::TempDir() + "/model_dir_test_" + std::to_string(::getpid()) + "_" +
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    model_ = TinyRandomModel();
    SaveModelDir(model_, dir_);
    opts_.tokenizer_dir = testing::SharedDir() + "/data/clip";
    if (!testing::FileExists(opts_.tokenizer_dir + "/vocab.json")) GTEST_SKIP() << "no CLIP vocabulary";
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string Error() {
    try {
      LoadModelDir(dir_, opts_);
    } catch (const c10::Error& e) {
      return e.what_without_backtrace();
    }
    return "";
  }
  std::string dir_;
  StableDiffusion model_;
  ModelDirOptions opts_;
};

TEST_F(ModelDirTest, SaveThenLoadGivesBitExactOutputs) {
  auto loaded = LoadModelDir(dir_, opts_);
  EXPECT_EQ(loaded->model_id, "tiny-random");
  EXPECT_EQ(loaded->text_dim(), 32);
  EXPECT_EQ(loaded->image_size(), 16);
  c10::InferenceMode guard;
  at::Tensor ids = at::randint(0, 49408, {2, 77}, at::kLong);
  at::Tensor text = model_.text_encoder->forward(ids);
  EXPECT_TRUE(at::equal(loaded->text_encoder->forward(ids), text));
  at::Tensor x = at::randn({2, 4, 8, 8}), t = at::tensor(std::vector<int64_t>{10, 900}, at::kLong);
  EXPECT_TRUE(at::equal(loaded->unet->forward(x, t, text), model_.unet->forward(x, t, text)));
  at::Tensor img = at::rand({1, 3, 16, 16}) * 2 - 1;
  EXPECT_TRUE(at::equal(loaded->vae->decode(loaded->vae->encode(img).mode()), model_.vae->decode(model_.vae->encode(img).mode())));
  EXPECT_DOUBLE_EQ(loaded->vae->scaling_factor(), 0.5);
  EXPECT_TRUE(at::equal(loaded->covariance, model_.covariance.to(at::kFloat)));
  EXPECT_FALSE(loaded->unet->parameters()[0].requires_grad()) << "loaded models are frozen";
}

// A loaded model saves to a folder that loads again (the text encoder's integer position_ids buffer
// stays an integer through the load's dtype conversion).
TEST_F(ModelDirTest, ALoadedModelSavesAndLoadsAgain) {
  auto loaded = LoadModelDir(dir_, opts_);
  const std::string again = dir_ + "-again";
  SaveModelDir(*loaded, again);
  auto reloaded = LoadModelDir(again, opts_);
  std::filesystem::remove_all(again);
  // The same model: same id, covariance and weights, so the same outputs bit for bit.
  EXPECT_EQ(reloaded->model_id, loaded->model_id);
  EXPECT_TRUE(at::equal(reloaded->covariance, loaded->covariance));
  c10::InferenceMode guard;
  at::Tensor ids = at::randint(0, 49408, {1, 77}, at::kLong);
  at::Tensor text = loaded->text_encoder->forward(ids);
  EXPECT_TRUE(at::equal(reloaded->text_encoder->forward(ids), text));
  at::Tensor x = at::randn({1, 4, 8, 8}), t = at::tensor(std::vector<int64_t>{500}, at::kLong);
  EXPECT_TRUE(at::equal(reloaded->unet->forward(x, t, text), loaded->unet->forward(x, t, text)));
  at::Tensor img = at::rand({1, 3, 16, 16}) * 2 - 1;
  EXPECT_TRUE(at::equal(reloaded->vae->decode(reloaded->vae->encode(img).mode()),
                        loaded->vae->decode(loaded->vae->encode(img).mode())));
}

TEST_F(ModelDirTest, DerivedModelIdChangesWithTheWeights) {
  std::remove((dir_ + "/perfusion/model_id").c_str());
  const std::string id1 = LoadModelDir(dir_, opts_)->model_id;
  EXPECT_EQ(LoadModelDir(dir_, opts_)->model_id, id1) << "stable";
  {
    c10::InferenceMode guard;
    model_.unet->named_parameters()["conv_in.weight"].add_(1.0);
  }
  SaveModelDir(model_, dir_);
  std::remove((dir_ + "/perfusion/model_id").c_str());
  const std::string id2 = LoadModelDir(dir_, opts_)->model_id;
  EXPECT_NE(id2, id1);
  // A change to the cross-attention K/V alone (what Custom Diffusion trains), in the middle of the
  // file: the first and last 64 KiB do not see it, the id still must.
  std::string middle_kv;
  for (const auto& item : model_.unet->named_parameters()) {
    if (item.key().find("attn2.to_v") != std::string::npos) middle_kv = item.key();
  }
  ASSERT_FALSE(middle_kv.empty());
  {
    c10::InferenceMode guard;
    model_.unet->named_parameters()[middle_kv].mul_(1.01);
  }
  SaveModelDir(model_, dir_);
  std::remove((dir_ + "/perfusion/model_id").c_str());
  EXPECT_NE(LoadModelDir(dir_, opts_)->model_id, id2) << middle_kv;
}

// Every scheduler field survives the written scheduler_config.json: a zero-terminal-SNR v-prediction
// model (the tiny model's schedule) loaded with SD's epsilon defaults would sample garbage.
TEST(SchedulerConfigJsonTest, EveryFieldRoundTrips) {
  SchedulerConfig c;
  c.num_train_timesteps = 10;
  c.beta_schedule = "linear";
  c.trained_betas = {0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.4};
  c.rescale_betas_zero_snr = true;
  c.prediction_type = "v_prediction";
  c.timestep_spacing = "trailing";
  c.steps_offset = 0;
  c.set_alpha_to_one = true;
  c.clip_sample = true;
  c.clip_sample_range = 2.5;
  c.thresholding = true;
  c.dynamic_thresholding_ratio = 0.9;
  c.sample_max_value = 3.0;
  c.use_karras_sigmas = false;
  c.timestep_type = "discrete";
  const SchedulerConfig r = SchedulerConfig::FromJson(SchedulerConfigJson(c));
  EXPECT_EQ(r.num_train_timesteps, c.num_train_timesteps);
  EXPECT_EQ(r.beta_schedule, c.beta_schedule);
  EXPECT_EQ(r.trained_betas, c.trained_betas);
  EXPECT_EQ(r.rescale_betas_zero_snr, c.rescale_betas_zero_snr);
  EXPECT_EQ(r.prediction_type, c.prediction_type);
  EXPECT_EQ(r.timestep_spacing, c.timestep_spacing);
  EXPECT_EQ(r.steps_offset, c.steps_offset);
  EXPECT_EQ(r.set_alpha_to_one, c.set_alpha_to_one);
  EXPECT_EQ(r.clip_sample, c.clip_sample);
  EXPECT_EQ(r.clip_sample_range, c.clip_sample_range);
  EXPECT_EQ(r.thresholding, c.thresholding);
  EXPECT_EQ(r.dynamic_thresholding_ratio, c.dynamic_thresholding_ratio);
  EXPECT_EQ(r.sample_max_value, c.sample_max_value);
  EXPECT_EQ(r.interpolation_type, c.interpolation_type);
  EXPECT_EQ(r.use_karras_sigmas, c.use_karras_sigmas);
  EXPECT_EQ(r.timestep_type, c.timestep_type);
}

TEST_F(ModelDirTest, MissingFilesAreAllListedInOneError) {
  std::remove((dir_ + "/unet/config.json").c_str());
  std::remove((dir_ + "/perfusion/covariance.safetensors").c_str());
  const std::string e = Error();
  EXPECT_NE(e.find("unet/config.json"), std::string::npos) << e;
  EXPECT_NE(e.find("covariance.safetensors"), std::string::npos) << e;
}

TEST_F(ModelDirTest, TruncatedWeightsAreRejected) {
  const std::string path = dir_ + "/unet/diffusion_pytorch_model.safetensors";
  std::string bytes = ReadFileToString(path);
  WriteFileAtomically(path, bytes.substr(0, bytes.size() - 100));
  const std::string e = Error();
  EXPECT_NE(e.find("diffusion_pytorch_model.safetensors"), std::string::npos) << e;
  EXPECT_NE(e.find("past the end"), std::string::npos) << e;
}

TEST_F(ModelDirTest, HeaderPointingPastTheFileIsRejected) {
  const std::string path = dir_ + "/text_encoder/model.safetensors";
  std::string bytes = ReadFileToString(path);
  bytes[0] = static_cast<char>(0xff);  // header length far larger than the file
  bytes[1] = static_cast<char>(0xff);
  bytes[2] = static_cast<char>(0x0f);
  WriteFileAtomically(path, bytes);
  EXPECT_NE(Error().find("truncated"), std::string::npos);
}

TEST_F(ModelDirTest, WrongDtypeOrShapeIsNamed) {
  // Replace one weight with an integer tensor and another with a mis-shaped one.
  const std::string path = dir_ + "/unet/diffusion_pytorch_model.safetensors";
  auto tensors = LoadSafetensors(path);
  std::vector<std::pair<std::string, at::Tensor>> items;
  for (auto& [name, t] : tensors) {
    if (name == "conv_in.weight") items.emplace_back(name, t.to(at::kInt));
    else if (name == "conv_out.bias") items.emplace_back(name, at::zeros({5}));
    else items.emplace_back(name, t.clone());
  }
  tensors.clear();
  SaveSafetensors(path, items);
  const std::string e = Error();
  EXPECT_NE(e.find("conv_out.bias"), std::string::npos) << e;
  EXPECT_NE(e.find("mis-shaped"), std::string::npos) << e;
  // Both in the one error: the dtype is checked before anything is copied.
  EXPECT_NE(e.find("1 of the wrong dtype [conv_in.weight (file I32"), std::string::npos) << e;
}

// An outdated SD 1.x scheduler config (steps_offset 0, clip_sample true, as many DreamBooth-era
// folders ship) is corrected as diffusers' pipeline does, or its images would differ from diffusers'.
TEST_F(ModelDirTest, OutdatedSchedulerSettingsAreCorrectedAsDiffusersDoes) {
  model_.scheduler.steps_offset = 0;
  model_.scheduler.clip_sample = true;
  SaveModelDir(model_, dir_);
  const auto loaded = LoadModelDir(dir_, opts_);
  EXPECT_EQ(loaded->scheduler.steps_offset, 1);
  EXPECT_FALSE(loaded->scheduler.clip_sample);
}

TEST_F(ModelDirTest, IntegerWeightIsRefused) {
  const std::string path = dir_ + "/vae/diffusion_pytorch_model.safetensors";
  auto tensors = LoadSafetensors(path);
  std::vector<std::pair<std::string, at::Tensor>> items;
  for (auto& [name, t] : tensors) items.emplace_back(name, name == "decoder.conv_out.bias" ? t.to(at::kInt) : t.clone());
  tensors.clear();
  SaveSafetensors(path, items);
  const std::string e = Error();
  EXPECT_NE(e.find("decoder.conv_out.bias"), std::string::npos) << e;
}

TEST_F(ModelDirTest, MalformedConfigIsRejected) {
  WriteFileAtomically(dir_ + "/unet/config.json", "{ not json");
  EXPECT_NE(Error().find("config.json"), std::string::npos);
}

TEST_F(ModelDirTest, InferenceDefaultsChooseTheKeyLocking) {
  EXPECT_FALSE(LoadModelDir(dir_, opts_)->default_global_key_lock) << "no inference.json: local, the paper's default";
  model_.default_global_key_lock = true;
  SaveModelDir(model_, dir_);
  EXPECT_TRUE(LoadModelDir(dir_, opts_)->default_global_key_lock);
  WriteFileAtomically(dir_ + "/perfusion/inference.json", "{\"key_lock\": \"local\"}");
  EXPECT_FALSE(LoadModelDir(dir_, opts_)->default_global_key_lock);
  WriteFileAtomically(dir_ + "/perfusion/inference.json", "{\"key_lock\": \"sideways\"}");
  EXPECT_NE(Error().find("key_lock must be \"global\" or \"local\""), std::string::npos) << Error();
  WriteFileAtomically(dir_ + "/perfusion/inference.json", "{\"beta\": 0.5}");
  EXPECT_NE(Error().find("unknown key \"beta\""), std::string::npos) << Error();
  WriteFileAtomically(dir_ + "/perfusion/inference.json", "[1");
  EXPECT_NE(Error().find("perfusion/inference.json"), std::string::npos) << Error();
}

TEST_F(ModelDirTest, ACovarianceOfTheWrongWidthIsRejected) {
  SaveCovariance(dir_ + "/perfusion/covariance.safetensors", at::eye(16));
  EXPECT_NE(Error().find("covariance"), std::string::npos);
}

}  // namespace
}  // namespace perfusion

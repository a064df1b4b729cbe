// perfusion-train-classifier end to end at toy sizes: it writes the weights, the JSON summary and the
// check sheet where asked (making folders), the same seed gives the same bytes, a model's VAE adds the
// round-trip accuracy, and bad flags or a missing model are refused before any rendering.
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/integration/cluster.h"

namespace perfusion::testing {
namespace {

namespace fs = std::filesystem;

class TrainClassifierToolTest : public ::testing::Test {
 protected:
  void SetUp() override {
    scratch_ = std::make_unique<ScratchDir>("train-classifier");
    dir_ = scratch_->path();
    ASSERT_FALSE(dir_.empty()) << "mkdtemp failed";
  }

  CommandResult Train(const std::string& out, const std::vector<std::string>& extra) {
    std::vector<std::string> argv = {PERFUSION_TRAIN_CLASSIFIER_BIN, "--out", out, "--train", "32", "--test", "8",
                                     "--steps", "3", "--batch", "8", "--width", "8", "--threads", "1"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    return RunCommand(argv, dir_, absl::Minutes(5));
  }

  nlohmann::json Summary(const std::string& path) {
    return nlohmann::json::parse(ReadFileOrEmpty(path), nullptr, false);
  }

  std::unique_ptr<ScratchDir> scratch_;
  std::string dir_;
};

TEST_F(TrainClassifierToolTest, WritesWeightsSummaryAndSheetDeterministically) {
  const std::string out = dir_ + "/nested/eval/clf.safetensors";
  CommandResult r = Train(out, {"--model", "none", "--sheet", dir_ + "/sheets/inputs.png"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("[classifier] step     3/3"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("held-out accuracy (8 scenes"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("through the VAE"), std::string::npos) << "no model, no round trip:\n" << r.out;

  const std::string weights = ReadFileOrEmpty(out);
  ASSERT_FALSE(weights.empty()) << out;
  const nlohmann::json j = Summary(dir_ + "/nested/eval/clf.json");
  ASSERT_TRUE(j.is_object()) << ReadFileOrEmpty(dir_ + "/nested/eval/clf.json");
  EXPECT_EQ(j["train_scenes"], 32);
  EXPECT_EQ(j["test_scenes"], 8);
  EXPECT_EQ(j["steps"], 3);
  EXPECT_EQ(j["vae_model"], "none");
  EXPECT_EQ(j["config"]["width"], 8);
  EXPECT_FALSE(j["concepts"].empty());
  EXPECT_EQ(j["concepts"].size(), j["config"]["num_concepts"].get<size_t>());
  ASSERT_TRUE(j["accuracy"]["clean"].is_object()) << j.dump(2);
  for (const char* head : {"shape", "color", "texture", "background", "presence_tpr", "presence_fpr_near_miss"}) {
    ASSERT_TRUE(j["accuracy"]["clean"][head].is_number()) << head << "\n" << j.dump(2);
    const double v = j["accuracy"]["clean"][head];
    EXPECT_GE(v, 0.0) << head;
    EXPECT_LE(v, 1.0) << head;
  }
  EXPECT_FALSE(j["accuracy"].contains("vae_round_trip"));
  const std::string sheet = ReadFileOrEmpty(dir_ + "/sheets/inputs.png");
  ASSERT_GT(sheet.size(), 8u);
  EXPECT_EQ(sheet.substr(1, 3), "PNG");

  // The same command again gives the same weights, byte for byte (the metadata records the command).
  fs::rename(out, dir_ + "/first.safetensors");
  r = Train(out, {"--model", "none", "--sheet", dir_ + "/sheets/inputs.png"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(ReadFileOrEmpty(out) == weights) << "same seed, different weights";
  // Another seed trains another classifier.
  r = Train(out, {"--model", "none", "--sheet", dir_ + "/sheets/inputs.png", "--seed", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_FALSE(ReadFileOrEmpty(out) == weights) << "another seed, the same weights";
}

TEST_F(TrainClassifierToolTest, ReadsTheModelsVaeRoundTrips) {
  const std::string model = TinyModelDir();
  if (model.empty()) GTEST_SKIP() << "no tiny model";
  const std::string out = dir_ + "/clf.safetensors";
  CommandResult r = Train(out, {"--model", model, "--vae-fraction", "0.5"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("VAE round trip of 16 training and 8 held-out scenes"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("through the VAE:"), std::string::npos) << r.out;
  const nlohmann::json j = Summary(dir_ + "/clf.json");
  ASSERT_TRUE(j.is_object());
  EXPECT_TRUE(j["accuracy"]["vae_round_trip"]["shape"].is_number()) << j.dump(2);
  std::string id = ReadFileOrEmpty(model + "/perfusion/model_id");
  while (!id.empty() && (id.back() == '\n' || id.back() == ' ')) id.pop_back();
  EXPECT_EQ(j["vae_model_id"], id);
}

TEST_F(TrainClassifierToolTest, RefusesBadInputBeforeAnyWork) {
  // A model folder without a VAE is named at once: nothing rendered, nothing written.
  const std::string out = dir_ + "/x/clf.safetensors";
  CommandResult r = Train(out, {"--model", dir_ + "/no-such-model"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("no-such-model: no vae/config.json"), std::string::npos) << r.err;
  EXPECT_EQ(r.out.find("rendering"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(dir_ + "/x"));

  // An output folder that cannot be made (a file is in the way) is named before rendering too.
  std::ofstream(dir_ + "/blocker") << "x";
  ASSERT_TRUE(fs::is_regular_file(dir_ + "/blocker"));
  r = Train(dir_ + "/blocker/clf.safetensors", {"--model", "none"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("cannot create folder"), std::string::npos) << r.err;
  EXPECT_EQ(r.out.find("rendering"), std::string::npos) << r.out;

  ExpectUsageErrors(PERFUSION_TRAIN_CLASSIFIER_BIN,
                    {{{"--stepz", "3"}, "--stepz"},
                     {{"--batch", "0"}, "--batch must be >= 1"},
                     {{"--device", "vulkan"}, "--device: only cpu and cuda are supported"},
                     {{"--train", "4", "--batch", "8"}, "--train must be >= --batch"},
                     {{"--test", "0"}, "--test must be >= 1"},
                     {{"--steps", "0"}, "--steps must be >= 1"},
                     {{"--lr", "0"}, "--lr must be > 0"},
                     {{"--vae-fraction", "1.5"}, "--vae-fraction must be in [0, 1]"},
                     {{"--width", "0"}, "--width must be >= 1"},
                     {{"--threads", "-1"}, "--threads must be >= 0"},
                     {{"--steps", "x"}, "--steps: bad value 'x'"}},
                    dir_);
}

}  // namespace
}  // namespace perfusion::testing

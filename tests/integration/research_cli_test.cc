// The researchers' local CLI on the tiny model: perfusion-train-concept turns a folder of renders
// into a concept blob; perfusion-generate uses it (and --show-gates prints where its edit acts);
// perfusion-evaluate, the quality harness, writes its report.
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "tests/integration/cluster.h"

namespace perfusion::testing {
namespace {

namespace fs = std::filesystem;

class ResearchCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (TinyModelDir().empty()) GTEST_SKIP() << "no tiny model";
    if (TokenizerDir().empty()) GTEST_SKIP() << "no CLIP tokenizer files under the shared data";
    scratch_ = std::make_unique<ScratchDir>("research-cli");
    dir_ = scratch_->path();
    ASSERT_FALSE(dir_.empty()) << "mkdtemp failed";
  }
  CommandResult Run(std::vector<std::string> argv) { return RunCommand(argv, dir_, absl::Minutes(3)); }
  std::unique_ptr<ScratchDir> scratch_;
  std::string dir_;
};

TEST_F(ResearchCliTest, TrainAConceptThenGenerateAndShowItsGates) {
  CommandResult r = Run({PERFUSION_RENDER_SHAPES_BIN, "--out", dir_ + "/imgs", "--n", "4", "--concept", "candy_heart"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = Run({PERFUSION_TRAIN_CONCEPT_BIN, dir_ + "/imgs", "--superclass", "heart", "--name", "candy", "--out",
           dir_ + "/candy.bin", "--model", TinyModelDir(), "--tokenizer-dir", TokenizerDir(), "--steps", "4",
           "--threads", "1", "--quiet"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_TRUE(fs::exists(dir_ + "/candy.bin"));
  EXPECT_NE(r.out.find("<candy>, superclass 'heart'"), std::string::npos) << r.out;

  r = Run({PERFUSION_GENERATE_BIN, "a <candy> on a blue background", "--concept", dir_ + "/candy.bin", "--model",
           TinyModelDir(), "--tokenizer-dir", TokenizerDir(), "-o", dir_ + "/out", "--n", "2", "--steps", "3",
           "--seed", "4", "--show-gates", "--local-lock", "--threads", "1", "--quiet"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("local key-locking"), std::string::npos) << r.err;
  EXPECT_TRUE(fs::exists(dir_ + "/out/4_0.png"));
  EXPECT_TRUE(fs::exists(dir_ + "/out/4_1.png"));
  // One row per token up to the end of text, then the padding summarised.
  EXPECT_NE(r.err.find("gates of the prompt (V) per token"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("<candy>"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("blue</w>"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("padding, max"), std::string::npos) << r.err;

  // The tiny model asks for global key-locking (perfusion/inference.json), so that is the default;
  // under it the K gates are shown too. A regional prompt puts the concept on the left.
  r = Run({PERFUSION_GENERATE_BIN, "a red circle on the right", "--concept", dir_ + "/candy.bin", "--model",
           TinyModelDir(), "--tokenizer-dir", TokenizerDir(), "-o", dir_ + "/out2", "--n", "1", "--steps", "2",
           "--region", "left:a small <candy> on the left", "--show-gates", "--threads", "1", "--quiet"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("gates of the prompt: it uses no concept"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("gates of region 0 (V, K in brackets) per token"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("global key-locking"), std::string::npos) << r.err;
  EXPECT_TRUE(fs::exists(dir_ + "/out2/1_0.png"));
  r = Run({PERFUSION_GENERATE_BIN, "a <candy>", "--concept", dir_ + "/candy.bin", "--model", TinyModelDir(),
           "--tokenizer-dir", TokenizerDir(), "-o", dir_ + "/out2", "--n", "1", "--steps", "2", "--show-gates",
           "--threads", "1", "--quiet"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("K in brackets"), std::string::npos) << r.err;
  // A malformed region is a usage error naming the expected form; a bad box names the box.
  r = Run({PERFUSION_GENERATE_BIN, "a <candy>", "--concept", dir_ + "/candy.bin", "--region", "a <candy>"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("BOX:PROMPT"), std::string::npos) << r.err;
  r = Run({PERFUSION_GENERATE_BIN, "a <candy>", "--concept", dir_ + "/candy.bin", "--model", TinyModelDir(),
           "--tokenizer-dir", TokenizerDir(), "-o", dir_ + "/out4", "--steps", "1", "--region", "0,0,2,1:a star",
           "--threads", "1", "--quiet"});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("region box"), std::string::npos) << r.err;

  // --captions: each image trains with the caption in the .txt file beside it, naming the concept
  // as in prompts. A missing file or a caption without the concept is refused before training.
  for (int i = 0; i < 4; ++i) {
    std::ofstream(dir_ + "/imgs/00000" + std::to_string(i) + ".txt") << "a <candy> on the left\n";
  }
  const std::vector<std::string> train_captioned = {
      PERFUSION_TRAIN_CONCEPT_BIN, dir_ + "/imgs", "--superclass", "heart", "--name", "candy", "--out",
      dir_ + "/candy-cap.bin", "--model", TinyModelDir(), "--tokenizer-dir", TokenizerDir(), "--steps", "4",
      "--threads", "1", "--quiet", "--captions"};
  r = Run(train_captioned);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(ReadFileOrEmpty(dir_ + "/candy-cap.bin"), ReadFileOrEmpty(dir_ + "/candy.bin"));
  std::ofstream(dir_ + "/imgs/000003.txt") << "a heart on the left";
  r = Run(train_captioned);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("000003.txt: the caption must name the concept exactly once as <candy>"), std::string::npos)
      << r.err;
  fs::remove(dir_ + "/imgs/000002.txt");
  r = Run(train_captioned);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--captions: no caption file"), std::string::npos) << r.err;

  // A prompt naming a concept that was not loaded is an error that names it.
  r = Run({PERFUSION_GENERATE_BIN, "a <nope>", "--concept", dir_ + "/candy.bin", "--model", TinyModelDir(),
           "--tokenizer-dir", TokenizerDir(), "-o", dir_ + "/out3", "--threads", "1", "--quiet"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("nope"), std::string::npos) << r.err;
}

// A value that reads as a number but is out of range is a usage error (exit 2), found before the
// model loads, and the message names the option.
TEST_F(ResearchCliTest, OutOfRangeValuesAreUsageErrors) {
  CommandResult r = Run({PERFUSION_RENDER_SHAPES_BIN, "--out", dir_ + "/imgs", "--n", "2", "--concept", "candy_heart"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::vector<std::pair<std::vector<std::string>, std::string>> train_cases = {
      {{"--steps", "0"}, "steps must be >= 1"},
      {{"--beta", "2"}, "default_gate.beta must be in [0, 1]"},
      {{"--tau", "-1"}, "default_gate.temperature must be in (0, 1]"},
      {{"--lr-values", "-0.5"}, "lr_values must be a finite number >= 0"},
      {{"--lr-embedding", "nan"}, "lr_embedding must be a finite number >= 0"},
  };
  for (const auto& [flags, message] : train_cases) {
    std::vector<std::string> argv = {PERFUSION_TRAIN_CONCEPT_BIN, dir_ + "/imgs", "--superclass", "heart", "--name",
                                     "candy", "--out", dir_ + "/candy.bin", "--model", dir_ + "/no-model", "--quiet"};
    argv.insert(argv.end(), flags.begin(), flags.end());
    r = Run(argv);
    EXPECT_EQ(r.exit_code, 2) << flags[0] << ": " << r.err;
    EXPECT_NE(r.err.find(message), std::string::npos) << r.err;
  }
  EXPECT_FALSE(fs::exists(dir_ + "/candy.bin"));
  for (const auto& [flag, value] : std::vector<std::pair<std::string, std::string>>{
           {"--beta", "1.5"}, {"--tau", "0"}, {"--tau", "3"}}) {
    r = Run({PERFUSION_GENERATE_BIN, "a heart", "--model", dir_ + "/no-model", "-o", dir_ + "/out", flag, value});
    EXPECT_EQ(r.exit_code, 2) << flag << " " << value << ": " << r.err;
    EXPECT_NE(r.err.find(flag + " must be in"), std::string::npos) << r.err;
  }
  EXPECT_FALSE(fs::exists(dir_ + "/out"));
}

// The quality harness end to end at toy sizes: two concepts (so the two-concept section runs), the
// gate sweep under both key-locking modes, a repeat with a second seed, and the report with its
// pictures.
TEST_F(ResearchCliTest, EvaluateWritesTheReportWithASweepPerKeyLockingMode) {
  // A toy-sized run into `out`, plus `extra` flags.
  auto evaluate = [&](const std::string& out, const std::vector<std::string>& extra) {
    std::vector<std::string> argv = {PERFUSION_EVALUATE_BIN, "--model", TinyModelDir(), "--tokenizer-dir",
                                     TokenizerDir(), "--out", out, "--concepts", "candy_heart,checker_star",
                                     "--images", "2", "--steps", "2", "--batch", "2", "--per-prompt", "2",
                                     "--gen-steps", "2", "--no-ablations", "--betas", "0.7", "--taus", "0.15",
                                     "--seeds", "1,2", "--threads", "1"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    return RunCommand(argv, dir_, absl::Minutes(5));
  };
  const std::string out = dir_ + "/report";
  CommandResult r = evaluate(out, {});
  ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
  for (const char* f : {"report.md", "sweep.png", "two_concepts.png", "methods_candy_heart.png", "base_model.png"}) {
    EXPECT_TRUE(fs::exists(out + "/" + f)) << f;
  }
  std::ifstream in(out + "/report.md");
  const std::string md((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  for (const char* s : {"## Gate sweep (candy_heart)", "**local key-lock**", "**global key-lock**",
                        "## Two concepts in one prompt", "perfusion-evaluate --model", "## Across seeds",
                        "| seed 1 | seed 2 | pooled |"}) {
    EXPECT_NE(md.find(s), std::string::npos) << s;
  }

  // --finetune adds the full fine-tune and leaves every other method's figures as they were: the
  // tuned UNet weights are swapped in for its own images only, in training and in generation.
  const std::string out_ft = dir_ + "/report-ft";
  r = evaluate(out_ft, {"--finetune", "--finetune-lr", "1e-3"});
  ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
  EXPECT_NE(r.out.find("train candy_heart / full fine-tune: step 2/2"), std::string::npos) << r.out;
  std::ifstream in_ft(out_ft + "/report.md");
  const std::string md_ft((std::istreambuf_iterator<char>(in_ft)), std::istreambuf_iterator<char>());
  EXPECT_NE(md_ft.find("| Full fine-tune: embedding + every UNet weight (DreamBooth-like) | "), std::string::npos);
  EXPECT_EQ(md.find("| Full fine-tune"), std::string::npos);
  // The rows of the other methods across seeds (no timings there), in both reports.
  auto rows = [](const std::string& text) {
    std::vector<std::string> out;
    const size_t from = text.find("## Across seeds");
    size_t at = from == std::string::npos ? text.size() : from;
    while (at < text.size()) {
      const size_t end = text.find('\n', at);
      const std::string line = text.substr(at, end == std::string::npos ? std::string::npos : end - at);
      if (line.rfind("| Perfusion (", 0) == 0 || line.rfind("| Base model", 0) == 0) out.push_back(line);
      if (end == std::string::npos) break;
      at = end + 1;
    }
    return out;
  };
  ASSERT_FALSE(rows(md).empty()) << md;
  EXPECT_EQ(rows(md_ft), rows(md));

  // Bad flags are usage errors that say what is expected.
  ExpectUsageErrors(PERFUSION_EVALUATE_BIN,
                    {{{"--finetune-lr", "0"}, "--finetune-lr > 0"},
                     {{"--sweep-locks", "sideways"}, "--sweep-locks"},
                     {{"--seeds", ","}, "--seeds: expected a comma-separated list"},
                     {{"--seeds", "1,x"}, "--seeds: bad value '1,x'"},
                     {{"--seeds", "1,-2"}, "--seeds: bad value '1,-2'"},
                     {{"--taus", "0,0.15"}, "--taus > 0"},
                     {{"--betas", "0.5,1.5"}, "--betas in (0, 1]"},
                     {{"--per-prompt", "4e2"}, "--per-prompt: bad value '4e2'"},
                     {{"--device", "gpu"}, "--device: 'gpu' is not a device"}},
                    dir_);
  // An --out that cannot be made fails before any training (it once failed after all of it).
  {
    std::ofstream(dir_ + "/a_file") << "x";
    CommandResult r = RunCommand({PERFUSION_EVALUATE_BIN, "--out", dir_ + "/a_file/report", "--model", TinyModelDir(),
                                  "--tokenizer-dir", TokenizerDir()},
                                 dir_, absl::Seconds(60));
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(r.err.find("cannot create folder"), std::string::npos) << r.err;
    EXPECT_EQ(r.out.find("training"), std::string::npos) << "it started working: " << r.out;
  }
  // Every engine tool takes --device the same way.
  for (const char* bin : {PERFUSION_GENERATE_BIN, PERFUSION_TRAIN_CONCEPT_BIN}) {
    ExpectUsageErrors(bin, {{{"--device", "cuda:x"}, "--device: 'cuda:x' is not a device"}}, dir_);
  }
}

}  // namespace
}  // namespace perfusion::testing

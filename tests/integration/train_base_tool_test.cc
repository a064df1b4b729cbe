// perfusion-train-base end to end at toy sizes: every stage runs, the folder it writes loads through
// the same code as SD 1.5, a stopped run resumes, and a finished work folder extends its UNet,
// two-object and decoder stages when asked for more steps (how perfusion-tiny-v3 grew from v2's run),
// optionally with the loss weighted towards the objects.
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

class TrainBaseToolTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (TokenizerDir().empty()) GTEST_SKIP() << "no CLIP tokenizer files under the shared data";
    scratch_ = std::make_unique<ScratchDir>("train-base");
    dir_ = scratch_->path();
    ASSERT_FALSE(dir_.empty()) << "mkdtemp failed";
  }

  // Trains into <dir>/<name> (the model) and <dir>/work (or <name>-work for another name).
  CommandResult Train(const std::vector<std::string>& extra, const std::string& name = "model") {
    const std::string work = name == "model" ? "/work" : "/" + name + "-work";
    std::vector<std::string> argv = {PERFUSION_TRAIN_BASE_BIN, "--out", dir_ + "/" + name, "--work", dir_ + work,
                                     "--tokenizer-dir", TokenizerDir(), "--samples", "48", "--vae-batch", "4",
                                     "--unet-batch", "4", "--cov-captions", "64", "--checkpoint-every", "1",
                                     "--threads", "1", "--model-id", "toy-model"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    return RunCommand(argv, dir_, absl::Minutes(5));
  }

  nlohmann::json State() {
    return nlohmann::json::parse(ReadFileOrEmpty(dir_ + "/work/state.json"), nullptr, false);
  }

  std::unique_ptr<ScratchDir> scratch_;
  std::string dir_;
};

TEST_F(TrainBaseToolTest, RunsEveryStageResumesAndExtends) {
  // A budget of zero minutes stops at the first checkpoint.
  CommandResult r =
      Train({"--vae-steps", "3", "--unet-steps", "2", "--decoder-steps", "0", "--max-minutes", "0.000001"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("time budget reached at vae step 1"), std::string::npos) << r.out;
  EXPECT_EQ(State()["stage"], "vae");
  EXPECT_FALSE(fs::exists(dir_ + "/model/unet/config.json"));
  // Every VAE checkpoint shows what the VAE keeps so far.
  EXPECT_NE(r.out.find("round trip MSE"), std::string::npos) << r.out;
  EXPECT_TRUE(fs::exists(dir_ + "/work/vae_check.png"));

  // Rerunning resumes at step 2 and runs to the end (with a lower VAE rate: a rate is not data).
  r = Train({"--vae-steps", "3", "--unet-steps", "2", "--decoder-steps", "0", "--vae-lr", "3e-4"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out.find("[vae] step      1/"), std::string::npos) << "did not resume:\n" << r.out;
  EXPECT_NE(r.out.find("[vae] step      3/3"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("[unet] step      2/2"), std::string::npos) << r.out;
  EXPECT_EQ(State()["stage"], "done");
  EXPECT_NE(r.out.find("VAE round trip: MSE"), std::string::npos) << r.out;
  EXPECT_TRUE(fs::exists(dir_ + "/work/vae_check.png"));
  for (const char* f : {"unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json",
                        "perfusion/covariance.safetensors", "perfusion/model_id", "model_index.json"}) {
    EXPECT_TRUE(fs::exists(dir_ + "/model/" + f)) << f;
  }
  EXPECT_EQ(ReadFileOrEmpty(dir_ + "/model/perfusion/model_id").rfind("toy-model", 0), 0u);
  const std::string vae_before = ReadFileOrEmpty(dir_ + "/model/vae/diffusion_pytorch_model.safetensors");
  const std::string unet_before = ReadFileOrEmpty(dir_ + "/model/unet/diffusion_pytorch_model.safetensors");
  ASSERT_FALSE(vae_before.empty());

  // Other data settings on the same work folder are refused, naming the flag.
  r = Train({"--vae-steps", "3", "--unet-steps", "4", "--decoder-steps", "0", "--two-object-prob", "0.7"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("--two-object-prob 0.2, not 0.7"), std::string::npos) << r.err;
  EXPECT_EQ(State()["step"], 2);

  // The same command again has nothing to do.
  r = Train({"--vae-steps", "3", "--unet-steps", "2", "--decoder-steps", "0"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("already finished"), std::string::npos) << r.out;

  // More decoder steps: only the decoder trains; the UNet is written unchanged.
  r = Train({"--vae-steps", "3", "--unet-steps", "2", "--decoder-steps", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("extending the finished model's decoder fine-tuning: 0 -> 2"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("[decoder] step      2/2"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("[unet]"), std::string::npos) << r.out;
  EXPECT_EQ(State()["decoder_step"], 2);
  EXPECT_TRUE(fs::exists(dir_ + "/work/decoder_check.png"));
  EXPECT_NE(ReadFileOrEmpty(dir_ + "/model/vae/diffusion_pytorch_model.safetensors"), vae_before);
  EXPECT_EQ(ReadFileOrEmpty(dir_ + "/model/unet/diffusion_pytorch_model.safetensors"), unet_before);

  // More UNet steps on a folder whose decoder is already fine-tuned: the UNet continues from step 2;
  // the decoder keeps its fine-tuned weights.
  const std::string vae_tuned = ReadFileOrEmpty(dir_ + "/model/vae/diffusion_pytorch_model.safetensors");
  // It may weight the loss towards the objects: loss settings are not data settings.
  r = Train({"--vae-steps", "3", "--unet-steps", "3", "--decoder-steps", "2", "--object-weight", "4"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("extending the UNet training: 2 -> 3"), std::string::npos) << r.out;
  // The object cover is measured on the scenes: objects are a small part of each, never none or all.
  const size_t cover_at = r.out.find("objects cover ");
  ASSERT_NE(cover_at, std::string::npos) << r.out;
  const double cover = std::stod(r.out.substr(cover_at + 14));
  EXPECT_GT(cover, 2.0) << r.out;
  EXPECT_LT(cover, 40.0) << r.out;
  EXPECT_NE(r.out.find("[unet] step      3/3"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("[decoder]"), std::string::npos) << r.out;
  EXPECT_EQ(State()["step"], 3);
  EXPECT_NE(ReadFileOrEmpty(dir_ + "/model/unet/diffusion_pytorch_model.safetensors"), unet_before);
  EXPECT_EQ(ReadFileOrEmpty(dir_ + "/model/vae/diffusion_pytorch_model.safetensors"), vae_tuned);

  // The two-object stage on a finished folder: fresh scenes, all with two objects here, half of the
  // textured objects in concept patterns.
  const std::string unet_3 = ReadFileOrEmpty(dir_ + "/model/unet/diffusion_pytorch_model.safetensors");
  r = Train({"--vae-steps", "3", "--unet-steps", "3", "--decoder-steps", "2", "--pair-steps", "2", "--pair-prob", "1",
             "--open-textures", "0.5"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("extending the two-object stage: 0 -> 2"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("100% with two objects, 50% of textured objects in a concept pattern"), std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("[pairs] step      2/2"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("[unet]"), std::string::npos) << r.out;
  EXPECT_EQ(State()["pair_step"], 2);
  EXPECT_EQ(State()["step"], 3);
  EXPECT_NE(ReadFileOrEmpty(dir_ + "/model/unet/diffusion_pytorch_model.safetensors"), unet_3);
  EXPECT_EQ(ReadFileOrEmpty(dir_ + "/model/vae/diffusion_pytorch_model.safetensors"), vae_tuned);
  // Once that stage has run, its scene mix is fixed too.
  r = Train({"--vae-steps", "3", "--unet-steps", "3", "--decoder-steps", "2", "--pair-steps", "3", "--pair-prob", "0.5",
             "--open-textures", "0.5"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("--pair-prob 1.0, not 0.5"), std::string::npos) << r.err;
  r = Train({"--vae-steps", "3", "--unet-steps", "3", "--decoder-steps", "2", "--pair-steps", "3", "--pair-prob", "1"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("--open-textures 0.5, not 0.0"), std::string::npos) << r.err;
}

// --seed fixes the whole run: the initial weights are seeded and every step draws its batch and noise
// from its own step number, so a run stopped and resumed equals one that ran through.
TEST_F(TrainBaseToolTest, SeedFixesTheWeightsAcrossAStop) {
  const std::vector<std::string> steps = {"--vae-steps", "2", "--unet-steps", "2", "--decoder-steps", "1"};
  std::vector<std::string> stop = steps;
  stop.insert(stop.end(), {"--max-minutes", "0.000001"});
  CommandResult r = Train(stop, "a");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("time budget reached at vae step 1"), std::string::npos) << r.out;
  r = Train(stop, "a");  // resumes, and stops again at its next checkpoint
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = Train(steps, "a");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = Train(steps, "b");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::vector<std::string> other_seed = steps;
  other_seed.insert(other_seed.end(), {"--seed", "2"});
  r = Train(other_seed, "c");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  for (const char* f : {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                        "text_encoder/model.safetensors"}) {
    const std::string a = ReadFileOrEmpty(dir_ + "/a/" + f);
    ASSERT_FALSE(a.empty()) << f;
    EXPECT_TRUE(a == ReadFileOrEmpty(dir_ + "/b/" + f)) << f << ": same seed, other weights";
    EXPECT_FALSE(a == ReadFileOrEmpty(dir_ + "/c/" + f)) << f << ": another seed, the same weights";
  }
}

// A kill can land anywhere in a checkpoint. Before its commit (state.json naming the new files as
// pending) the previous checkpoint stands and a half-written .next file is ignored; after it, the
// next run finishes the renames. Either way the resumed run trains the same weights as one that was
// never stopped. (The files were once written in place: a kill left a truncated unet_opt.pt that
// every rerun failed to load.)
TEST_F(TrainBaseToolTest, AKillDuringACheckpointNeitherBreaksNorChangesTheRun) {
  const std::vector<std::string> steps = {"--vae-steps", "1", "--unet-steps", "3", "--decoder-steps", "0"};
  ASSERT_EQ(Train(steps, "whole").exit_code, 0);
  std::vector<std::string> stop = steps;
  stop.insert(stop.end(), {"--max-minutes", "0.000001"});
  // Into the UNet stage: the VAE's checkpoint, then the UNet's first.
  ASSERT_EQ(Train(stop).exit_code, 0);
  ASSERT_EQ(Train(stop).exit_code, 0);
  ASSERT_EQ(State()["stage"], "unet") << State().dump();
  const std::string work = dir_ + "/work";
  // Killed before a commit: a truncated .next beside the good file.
  {
    std::ofstream(work + "/unet_opt.pt.next", std::ios::binary) << "PK\x03\x04 truncated";
  }
  // And killed after another commit: the step's unet.safetensors is still .next, the old file in
  // place is broken, and state.json names it pending.
  const std::string unet = ReadFileOrEmpty(work + "/unet.safetensors");
  ASSERT_FALSE(unet.empty());
  {
    std::ofstream(work + "/unet.safetensors.next", std::ios::binary) << unet;
    std::ofstream(work + "/unet.safetensors", std::ios::binary) << "truncated";
    nlohmann::json st = State();
    st["pending"] = {work + "/unet.safetensors"};
    std::ofstream(work + "/state.json") << st.dump(2);
  }
  CommandResult r = Train(steps);
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_FALSE(State().contains("pending")) << State().dump();
  for (const char* f : {"unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"}) {
    const std::string got = ReadFileOrEmpty(dir_ + "/model/" + f);
    ASSERT_FALSE(got.empty()) << f;
    EXPECT_TRUE(got == ReadFileOrEmpty(dir_ + "/whole/" + f)) << f << ": the resumed run trained other weights";
  }
}

// The training objective is part of the work folder: resuming with or without --sd-schedule would
// switch it halfway without a word.
TEST_F(TrainBaseToolTest, RefusesToResumeWithTheOtherSchedule) {
  const std::vector<std::string> steps = {"--vae-steps", "1", "--unet-steps", "2", "--decoder-steps", "0"};
  ASSERT_EQ(Train(steps).exit_code, 0);
  std::vector<std::string> more = {"--vae-steps", "1", "--unet-steps", "3", "--decoder-steps", "0", "--sd-schedule"};
  CommandResult r = Train(more);
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.err.find("--sd-schedule false, not true"), std::string::npos) << r.err;
}

// --latent-size 16: a VAE with one downsampling less (16x16 latents) and a UNet of that sample size;
// --vae-blocks and --vae-layers set the VAE's width and depth.
TEST_F(TrainBaseToolTest, SixteenBySixteenLatents) {
  CommandResult r = Train({"--vae-steps", "2", "--unet-steps", "1", "--decoder-steps", "0", "--latent-size", "16",
                           "--vae-blocks", "16,48", "--vae-layers", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const nlohmann::json unet = nlohmann::json::parse(ReadFileOrEmpty(dir_ + "/model/unet/config.json"));
  const nlohmann::json vae = nlohmann::json::parse(ReadFileOrEmpty(dir_ + "/model/vae/config.json"));
  EXPECT_EQ(unet["sample_size"], 16);
  EXPECT_EQ(vae["block_out_channels"], nlohmann::json({16, 48})) << vae.dump();
  EXPECT_EQ(vae["layers_per_block"], 2) << vae.dump();
  EXPECT_EQ(vae["sample_size"], 32);
  // Each shape setting is part of what the checkpoints depend on.
  r = Train({"--vae-steps", "2", "--unet-steps", "2", "--decoder-steps", "0", "--latent-size", "16",
             "--vae-blocks", "16,48"});
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.err.find("--vae-layers 2, not 1"), std::string::npos) << r.err;
  r = Train({"--vae-steps", "2", "--unet-steps", "2", "--decoder-steps", "0", "--latent-size", "16",
             "--vae-layers", "2"});
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.err.find("--vae-blocks [16,48], not [32,64]"), std::string::npos) << r.err;
  r = Train({"--vae-steps", "2", "--unet-steps", "2", "--decoder-steps", "0"});
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.err.find("--latent-size 16, not 8"), std::string::npos) << r.err;
}

// Missing parents of --work and --out are made before any work, and --unet-blocks sets the levels.
TEST_F(TrainBaseToolTest, MakesNestedFoldersAndTakesUnetLevels) {
  const std::string work = dir_ + "/runs/a/work", out = dir_ + "/models/b/tiny";
  // A VAE may be trained first and the UNet's levels chosen later: they bind only once the UNet has
  // taken a step.
  CommandResult r = Train({"--vae-steps", "2", "--unet-steps", "1", "--decoder-steps", "0", "--work", work, "--out", out,
                           "--max-minutes", "0.000001"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("time budget reached at vae step 1"), std::string::npos) << r.out;
  r = Train({"--vae-steps", "2", "--unet-steps", "1", "--decoder-steps", "0", "--work", work, "--out", out,
             "--unet-blocks", "32,64,128"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(fs::exists(work + "/state.json"));
  const nlohmann::json unet = nlohmann::json::parse(ReadFileOrEmpty(out + "/unet/config.json"));
  EXPECT_EQ(unet["block_out_channels"], nlohmann::json({32, 64, 128})) << unet.dump();
  EXPECT_EQ(unet["down_block_types"].size(), 3u) << unet.dump();
  // The levels are part of what the checkpoints depend on.
  r = Train({"--vae-steps", "2", "--unet-steps", "2", "--decoder-steps", "0", "--work", work, "--out", out});
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.err.find("--unet-blocks [32,64,128], not [64,128]"), std::string::npos) << r.err;
  // A file where a folder must go is named.
  const std::string blocked = dir_ + "/blocked";
  { std::ofstream(blocked) << "x"; }
  r = Train({"--vae-steps", "1", "--unet-steps", "1", "--decoder-steps", "0", "--work", blocked + "/work"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("cannot create folder " + blocked + "/work"), std::string::npos) << r.err;
}

// --finish: when --max-minutes runs out, the training ends at that step and the folder is written
// anyway (a fixed-time run on a lent machine). The record keeps the steps done, so asking for more
// steps later extends it from there.
TEST_F(TrainBaseToolTest, FinishWritesTheModelWhenTheTimeRunsOut) {
  CommandResult r = Train({"--vae-steps", "2", "--unet-steps", "0", "--decoder-steps", "0"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_EQ(State()["stage"], "done");
  // More UNet and decoder steps, with no time for them: one UNet step, then the model is written.
  r = Train({"--vae-steps", "2", "--unet-steps", "3", "--decoder-steps", "2", "--max-minutes", "0.000001", "--finish"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("time budget reached at unet step 1: ending the training here (--finish)"), std::string::npos)
      << r.out;
  EXPECT_EQ(r.out.find("[decoder]"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("wrote " + dir_ + "/model"), std::string::npos) << r.out;
  EXPECT_EQ(State()["stage"], "done");
  EXPECT_EQ(State()["step"], 1);
  EXPECT_EQ(State()["decoder_step"], 0);
  EXPECT_TRUE(fs::exists(dir_ + "/model/unet/diffusion_pytorch_model.safetensors"));
  // Without the budget the same steps continue where the training ended.
  r = Train({"--vae-steps", "2", "--unet-steps", "3", "--decoder-steps", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("extending the UNet training: 1 -> 3"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("[unet] step      3/3"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("[decoder] step      2/2"), std::string::npos) << r.out;
  EXPECT_EQ(State()["step"], 3);
  EXPECT_EQ(State()["decoder_step"], 2);
}

// --device picks where the models train. This LibTorch decides whether cuda is there: without it
// the flag is refused before any work, naming it; with it a toy run trains on the GPU.
TEST_F(TrainBaseToolTest, DeviceCudaTrainsOrIsRefusedClearly) {
  CommandResult r = Train({"--vae-steps", "1", "--unet-steps", "1", "--decoder-steps", "1", "--device", "cuda"});
  if (r.exit_code == 2) {
    EXPECT_NE(r.err.find("--device cuda: this LibTorch has no CUDA support"), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(dir_ + "/work")) << "refused after starting work";
  } else {
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_TRUE(fs::exists(dir_ + "/model/unet/diffusion_pytorch_model.safetensors"));
  }
}

TEST_F(TrainBaseToolTest, RejectsUnknownFlagsAndBadValues) {
  // Each bad flag exits 2 before any work, with a message naming what is expected.
  ExpectUsageErrors(PERFUSION_TRAIN_BASE_BIN,
                    {{{"--decoder-stepz", "3"}, "--decoder-stepz"},
                     {{"--two-object-prob", "1.5"}, "--two-object-prob, --pair-prob, --open-textures in [0, 1]"},
                     {{"--object-weight", "-1"}, "--object-weight >= 0"},
                     {{"--open-textures", "-0.1"}, "--open-textures in [0, 1]"},
                     {{"--unet-batch", "0"}, "batch sizes >= 1"},
                     {{"--unet-blocks", "64,100"}, "--unet-blocks must list 2 to 4 channel counts"},
                     {{"--latent-size", "12"}, "--latent-size must be 8 or 16"},
                     {{"--vae-blocks", "32,64"}, "--vae-blocks must list 3 channel counts for --latent-size 8"},
                     {{"--latent-size", "16", "--vae-blocks", "32,40"}, "each a multiple of 16"},
                     {{"--vae-blocks", "32,x,64"}, "--vae-blocks: bad value '32,x,64'"},
                     {{"--vae-layers", "0"}, "--vae-layers must be 1 to 4"},
                     {{"--vae-lr", "0"}, "--vae-lr must be > 0"},
                     {{"--finish"}, "--finish needs --max-minutes"},
                     {{"--device", "gpu"}, "--device: 'gpu' is not a device (cpu, cuda, cuda:1, ...)"},
                     {{"--device", "vulkan"}, "--device: only cpu and cuda are supported"}},
                    dir_);
}

}  // namespace
}  // namespace perfusion::testing

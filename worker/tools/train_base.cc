// perfusion-train-base: trains the project's tiny text-to-image model (the embedded default) on the
// procedurally rendered shapes world, and writes it as a diffusers-layout folder (models/tiny).
//
// Stages (each checkpointed under --work; rerunning the same command resumes where it stopped):
//   1. vae:   a small AutoencoderKL, 32x32x3 <-> 8x8x4 (--latent-channels; --latent-size 16 for
//             16x16 latents), reconstruction MSE + L1 + a
//             small KL term (+ an optional edge term). Writes vae_check.png: what it keeps.
//   2. unet:  a CLIP-style text encoder and a UNet with cross-attention, trained together on the VAE's
//             latents (10% empty captions, for classifier-free guidance), with an EMA of the weights.
//             Default schedule: SD's scaled-linear betas rescaled to zero terminal SNR, v-prediction,
//             trailing timesteps (Lin et al. 2023). On 8x8 latents SD's own schedule leaves the global
//             colour and layout readable at t = 999, so a model trained on it learns to read them from
//             the noise instead of the caption, and ignores the text at sampling time (--sd-schedule
//             keeps it, for comparison).
//   2b. pairs: optional (--pair-steps): more of stage 2 on fresh scenes with more two-object ones,
//             so that each noun of "a star to the left of a heart" binds to its own object, and
//             optionally (--open-textures) base objects wearing the concept patterns, so that the
//             UNet can draw a pattern a concept then only has to recombine.
//   3. decoder: the VAE's decoder fine-tuned alone, the encoder frozen (as SD's ft-MSE decoder was).
//             The latent space stays the UNet's, so this stage may run after the UNet (and be
//             extended on a finished work folder); it adds an edge term (L1 of image gradients) to
//             the reconstruction loss, because the joint VAE stage leaves 2-pixel patterns blurred.
//             Writes decoder_check.png.
//   4. final: the text encoder's covariance over fresh captions (perfusion/covariance.safetensors),
//             then the folder (fp16 weights) with model_id.
// Long runs: --max-minutes stops cleanly at a checkpoint; the next run continues. With --finish it
// ends the training there instead and writes the folder (fixed-time runs, e.g. on a lent GPU).
// --device cuda trains on a GPU; data, batches and noise are still drawn on the CPU.
#include <ATen/Context.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/optim/adamw.h>
#include <torch/serialize.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "perfusion/covariance.h"
#include "perfusion/foreach_optim.h"
#include "perfusion/image_io.h"
#include "perfusion/model_dir.h"
#include "perfusion/module_io.h"
#include "perfusion/plot.h"
#include "perfusion/safetensors.h"
#include "perfusion/scheduler.h"
#include "perfusion/shapes_world.h"
#include "tools/tool_args.h"
#include "tools/tool_device.h"
#include "tools/tool_files.h"

using namespace perfusion;
using Clock = std::chrono::steady_clock;

namespace {

struct Args {
  std::string out = "models/tiny";
  std::string work = "build/tiny-train";
  std::string tokenizer_dir = std::string(PERFUSION_DEFAULT_SHARED) + "/data/clip";
  int64_t samples = 30000;
  double two_object_prob = WorldOptions().two_object_prob;
  int64_t vae_steps = 1500, vae_batch = 32;
  int64_t unet_steps = 9000, unet_batch = 64;
  std::vector<int64_t> unet_blocks = {64, 128};  // channels per UNet level (2 levels: 8x8 and 4x4)
  double unet_lr = 5e-4;
  double object_weight = 0;  // the UNet stages' loss weights a latent by 1 + object_weight x its object cover
  int64_t pair_steps = 0;
  double pair_prob = 0.5;
  double open_textures = 0;  // WorldOptions::open_texture_prob of the stage-2b scenes
  int64_t decoder_steps = 4000, decoder_batch = 32;
  double decoder_lr = 5e-4, edge_weight = 1.0;
  int64_t latent_channels = 4;
  int64_t latent_size = 8;  // 8: downsampling 4 (the shipped model); 16: downsampling 2
  double vae_lr = 1e-3;
  std::vector<int64_t> vae_blocks;  // channels per VAE level; empty = 32,64,64 (8x8) or 32,64 (16x16)
  int64_t vae_layers = 1;           // resnets per VAE encoder level (the decoder has one more)
  double vae_edge_weight = 0;
  double ema_decay = 0.999;
  bool sd_schedule = false;
  std::string model_id = "perfusion-tiny-v3";
  int64_t cov_captions = 6000;
  uint64_t seed = 1;
  double max_minutes = 0;  // 0 = no limit
  bool finish = false;     // when max_minutes runs out: end the training there and write the folder
  int64_t checkpoint_every = 250;
  int threads = 0;
  c10::Device device = c10::Device(c10::kCPU);
};

void Usage() {
  std::printf(
      "perfusion-train-base: train the tiny shapes-world model and write it in diffusers layout\n\n"
      "  --out DIR             output model folder (default models/tiny)\n"
      "  --work DIR            checkpoints; rerun to resume (default build/tiny-train)\n"
      "  --tokenizer-dir DIR   folder with CLIP vocab.json + merges.txt (default ../shared/data/clip)\n"
      "  --samples N           rendered training scenes (default 30000)\n"
      "  --two-object-prob X   fraction of scenes with two objects (default 0.2)\n"
      "  --vae-steps N         VAE steps (default 1500); --vae-batch N (default 32)\n"
      "  --vae-lr X            VAE learning rate (default 1e-3); a resumed run may lower it\n"
      "  --vae-edge-weight X   edge term (L1 of image gradients) in the VAE stage's loss (default 0)\n"
      "  --latent-channels N   VAE latent channels = UNet in/out channels (default 4, as SD 1.x)\n"
      "  --latent-size N       8 (default: 32x32 images <-> 8x8 latents, downsampling 4) or 16 (downsampling\n"
      "                        2: keeps 2-pixel patterns, at about 3x the UNet's cost per step)\n"
      "  --vae-blocks LIST     channels of each VAE level, multiples of 16: 3 levels for --latent-size 8,\n"
      "                        2 for 16 (default 32,64,64 or 32,64)\n"
      "  --vae-layers N        resnets per VAE encoder level, the decoder has one more (default 1)\n"
      "  --unet-steps N        text encoder + UNet steps (default 9000); --unet-batch N (default 64)\n"
      "  --unet-lr X           learning rate (default 5e-4)\n"
      "  --unet-blocks LIST    channels of each UNet level, each a multiple of 32, 2 to 4 levels, every\n"
      "                        level with cross-attention (default 64,128). With --latent-size 16,\n"
      "                        32,64,128 puts the narrowest level at 16x16, where a pixel pattern lives\n"
      "  --object-weight X     weight a latent's loss by 1 + X times the part of it an object covers\n"
      "                        (default 0: uniform, as SD). Objects cover a tenth of a scene, so a\n"
      "                        uniform loss spends most of the UNet on backgrounds; may change on resume\n"
      "  --pair-steps N        then N more text encoder + UNet steps on a fresh set of scenes with\n"
      "                        --pair-prob X of them two-object (default 0 steps, X 0.5): teaches each\n"
      "                        noun of 'a star to the left of a heart' to bind to its own object\n"
      "  --open-textures X     in those fresh scenes, X of the textured objects wear a concept pattern\n"
      "                        (angled, ringed, chevron), never in a concept's colour pair (default 0):\n"
      "                        the UNet learns to draw the patterns, concepts stay novel combinations\n"
      "  --decoder-steps N     decoder-only fine-tuning steps, encoder frozen (default 4000); --decoder-batch N\n"
      "                        (default 32); --decoder-lr X (default 5e-4); --edge-weight X (default 1)\n"
      "  --ema-decay X         decay of the weights' EMA that is written out (default 0.999; 0 = none)\n"
      "  --sd-schedule         SD 1.5's epsilon schedule instead of zero-terminal-SNR v-prediction\n"
      "  --model-id ID         written to perfusion/model_id (default perfusion-tiny-v3)\n"
      "  --cov-captions N      captions for the covariance (default 6000)\n"
      "  --seed S              (default 1)\n"
      "  --max-minutes M       stop at the next checkpoint after M minutes (0 = run to the end)\n"
      "  --finish              with --max-minutes: when the time runs out, end the training at that step\n"
      "                        and write --out anyway (the folder records the steps done; a rerun with\n"
      "                        more UNet, --pair-steps or decoder steps extends it, while a VAE stage\n"
      "                        ended early stays as it is). For fixed-time runs, e.g. on a lent GPU\n"
      "  --checkpoint-every N  steps between checkpoints (default 250)\n"
      "  --threads N           LibTorch threads (default: all cores)\n"
      "  --device D            cpu (default), cuda or cuda:N: where the models train. Renders, batches,\n"
      "                        noise and timesteps are drawn on the CPU, so a seed picks the same data on\n"
      "                        any device; a work folder may continue on another device\n\n"
      "A finished --work folder goes back to the UNet, two-object or decoder stage when --unet-steps,\n"
      "--pair-steps or --decoder-steps exceeds the steps it has done, and writes --out again. A rerun\n"
      "must keep --samples, --seed, --two-object-prob, --pair-prob, --open-textures, --latent-channels,\n"
      "--latent-size, --vae-blocks and --vae-layers, and --unet-blocks once the UNet has taken a step\n"
      "(so a VAE may be trained and judged first).\n");
}

// The tiny model's architecture.
CLIPTextModelOptions TextOptions() {
  return CLIPTextModelOptions().hidden_size(64).intermediate_size(256).num_attention_heads(4).num_hidden_layers(3);
}
// `blocks`: the channels of each resolution level, every level with cross-attention.
UNetConfig UnetConfig(int64_t latent_channels, int64_t latent_size, const std::vector<int64_t>& blocks) {
  UNetConfig c;
  c.in_channels = latent_channels;
  c.out_channels = latent_channels;
  c.sample_size = latent_size;
  c.block_out_channels = blocks;
  c.down_block_types.assign(blocks.size(), "CrossAttnDownBlock2D");
  c.up_block_types.assign(blocks.size(), "CrossAttnUpBlock2D");
  c.layers_per_block = {1};
  c.cross_attention_dim = 64;
  c.attention_head_dim = {4};
  c.norm_num_groups = 32;
  return c;
}
// 32x32 images: three levels give 8x8 latents (downsampling 4), two give 16x16 (downsampling 2).
std::vector<int64_t> DefaultVaeBlocks(int64_t latent_size) {
  return latent_size == 16 ? std::vector<int64_t>{32, 64} : std::vector<int64_t>{32, 64, 64};
}
AutoencoderKLOptions VaeOptions(double scaling, const Args& a) {
  return AutoencoderKLOptions()
      .block_out_channels(a.vae_blocks)
      .layers_per_block(a.vae_layers)
      .latent_channels(a.latent_channels)
      .norm_num_groups(16)
      .sample_size(32)
      .scaling_factor(scaling);
}

struct State {
  std::string stage = "vae";
  int64_t step = 0;
  double latent_scale = 1.0;
  int64_t decoder_step = 0;  // decoder fine-tuning steps done (kept after the stage ends)
  int64_t pair_step = 0;     // two-object stage steps done (kept after the stage ends)
  // What the checkpoints depend on: a rerun with other values would train on other data or shapes.
  nlohmann::json data = nlohmann::json::object();
  // Checkpoint files written as <file>.next and not yet renamed over <file> (see SaveCheckpoint).
  std::vector<std::string> pending;
};
void SaveState(const std::string& work, const State& s) {
  nlohmann::json j = {{"stage", s.stage}, {"step", s.step}, {"latent_scale", s.latent_scale},
                    {"decoder_step", s.decoder_step}, {"pair_step", s.pair_step}, {"data", s.data}};
  if (!s.pending.empty()) j["pending"] = s.pending;
  WriteFileAtomically(work + "/state.json", j.dump(2));
}
void RenameOrThrow(const std::string& from, const std::string& to) {
  TORCH_CHECK(std::rename(from.c_str(), to.c_str()) == 0, "cannot rename ", from, " to ", to, ": ",
              std::strerror(errno));
}
State LoadState(const std::string& work) {
  State s;
  if (!Exists(work + "/state.json")) return s;
  auto j = nlohmann::json::parse(ReadFileToString(work + "/state.json"));
  s.stage = j.at("stage");
  s.step = j.at("step");
  s.latent_scale = j.value("latent_scale", 1.0);
  s.decoder_step = j.value("decoder_step", int64_t{0});
  s.pair_step = j.value("pair_step", int64_t{0});
  s.data = j.value("data", nlohmann::json::object());
  s.pending = j.value("pending", std::vector<std::string>{});
  if (!s.pending.empty()) {
    // Killed between a checkpoint's commit and its renames: finish them (roll forward).
    for (const std::string& file : s.pending) {
      if (Exists(file + ".next")) RenameOrThrow(file + ".next", file);
    }
    s.pending.clear();
    SaveState(work, s);
  }
  return s;
}

// Writes one checkpoint so that a kill at any moment leaves either the previous checkpoint or this
// one, whole: each file goes to <file>.next; state.json (written atomically) then records the new
// step with the files as pending, which commits it; the files are renamed into place, and
// state.json is written again without them. A kill before the commit leaves the previous files and
// step (the .next files are overwritten next time); a kill after it is finished by LoadState. (The
// weights used to be written in place before state.json: a kill could leave a truncated optimizer
// file that every rerun failed to load, or weights one checkpoint ahead of the recorded step.)
void SaveCheckpoint(const std::string& work, State& st,
                    const std::vector<std::pair<std::string, std::function<void(const std::string&)>>>& files) {
  for (const auto& [file, write] : files) write(file + ".next");
  for (const auto& f : files) st.pending.push_back(f.first);
  SaveState(work, st);
  for (const auto& f : files) RenameOrThrow(f.first + ".next", f.first);
  st.pending.clear();
  SaveState(work, st);
}

// The rendered dataset: images [N, 3, 32, 32] in [-1, 1] (float16 to halve memory) and scenes.
struct Dataset {
  at::Tensor images;
  std::vector<SceneSpec> scenes;
};
Dataset Render(int64_t n, uint64_t seed, double two_object_prob, double open_texture_prob = 0) {
  Dataset d;
  d.images = at::empty({n, 3, 32, 32}, at::TensorOptions().dtype(at::kHalf));
  d.scenes.reserve(n);
  WorldOptions opts;
  opts.size = 32;
  opts.two_object_prob = two_object_prob;
  opts.open_texture_prob = open_texture_prob;
  for (int64_t i = 0; i < n; ++i) {
    Sample s = RenderRandom(DeriveSeed(seed, static_cast<uint64_t>(i)), opts);
    d.images[i] = ImageToTensor(s.image).to(at::kHalf);
    d.scenes.push_back(s.scene);
  }
  return d;
}

// The part of each latent cell that an object covers, [n, 1, s, s] in [0, 1] for latents of s x s:
// a pixel counts as object in proportion to its colour distance from the scene's background colour
// (the world paints backgrounds flat, and every object contrasts with its background by far more
// than 0.25 in [-1, 1] units).
at::Tensor ObjectCover(const Dataset& d, int64_t latent_size) {
  const int64_t n = d.images.size(0), factor = d.images.size(2) / latent_size;
  std::vector<float> bg(n * 3);
  for (int64_t i = 0; i < n; ++i) {
    const auto rgb = ColorRgb(d.scenes[i].background);
    for (int k = 0; k < 3; ++k) bg[i * 3 + k] = rgb[k] / 127.5f - 1.0f;
  }
  const at::Tensor bg_t = at::from_blob(bg.data(), {n, 3, 1, 1}, at::TensorOptions().dtype(at::kFloat)).clone();
  std::vector<at::Tensor> parts;
  for (int64_t i = 0; i < n; i += 1024) {
    const int64_t m = std::min<int64_t>(1024, n - i);
    const at::Tensor x = d.images.slice(0, i, i + m).to(at::kFloat);
    const at::Tensor dist = (x - bg_t.slice(0, i, i + m)).pow(2).sum(1, /*keepdim=*/true).sqrt();
    parts.push_back(at::avg_pool2d((dist / 0.25).clamp(0, 1), {factor, factor}));
  }
  at::Tensor cover = at::cat(parts);
  std::printf("objects cover %.1f%% of the latents (mean over %lld scenes)\n", 100 * cover.mean().item<double>(),
              (long long)n);
  return cover;
}

// `minutes_left`: the time budget left when --finish will end the stage early (negative: none).
void Log(const char* stage, int64_t step, int64_t total, double loss, double sec_per_step, double minutes_left) {
  const double eta = sec_per_step * (total - step) / 60.0;
  const bool budget = minutes_left >= 0 && minutes_left < eta;
  std::printf("[%s] step %6lld/%lld  loss %.5f  %.3f s/step  ETA %.1f min%s\n", stage, (long long)step, (long long)total,
              loss, sec_per_step, budget ? minutes_left : eta, budget ? " (time budget, --finish)" : "");
  std::fflush(stdout);
}

// Mean L1 distance between the horizontal and vertical pixel differences of two image batches: an
// edge term that MSE and L1 on pixels underweight, and the part of a 2-pixel pattern a VAE loses.
at::Tensor EdgeL1(const at::Tensor& y, const at::Tensor& x) {
  auto dx = [](const at::Tensor& t) { return t.slice(3, 1) - t.slice(3, 0, -1); };
  auto dy = [](const at::Tensor& t) { return t.slice(2, 1) - t.slice(2, 0, -1); };
  return 0.5 * ((dx(y) - dx(x)).abs().mean() + (dy(y) - dy(x)).abs().mean());
}

// The VAE's reconstruction loss: MSE + 0.5 L1 (L1 keeps the thin stripes and checks of the textures
// that MSE alone blurs away), plus the edge term when edge_weight > 0.
at::Tensor ReconstructionLoss(const at::Tensor& recon, const at::Tensor& x, double edge_weight) {
  at::Tensor loss = (recon - x).pow(2).mean() + 0.5 * (recon - x).abs().mean();
  return edge_weight > 0 ? loss + edge_weight * EdgeL1(recon, x) : loss;
}

// What the VAE keeps: 12 fresh base scenes and one render of each builtin concept (which the
// base model never trains on), above their encode-decode round trips, as a PNG. Returns the
// round trips' mean squared error.
double VaeCheck(AutoencoderKL& vae, const std::string& png_path) {
  torch::NoGradGuard ng;
  std::vector<at::Tensor> xs;
  for (int i = 0; i < 12; ++i) xs.push_back(ImageToTensor(Render(SampleScene(DeriveSeed(424242, i)), 32)));
  for (const auto& c : BuiltinConcepts()) xs.push_back(ImageToTensor(RenderConcept(c, 1, 7, 32)[0].image));
  const at::Tensor x = at::stack(xs);
  const at::Tensor y = vae->decode(vae->encode(x.to(vae->parameters()[0].device())).mode()).clamp(-1, 1).cpu();
  std::vector<std::vector<Image>> rows(2);
  for (int64_t i = 0; i < x.size(0); ++i) {
    rows[0].push_back(TensorToImage(x[i]));
    rows[1].push_back(TensorToImage(y[i]));
  }
  GridOptions g;
  g.row_labels = {"render", "vae"};
  WriteFileAtomically(png_path, EncodePng(ImageGrid(rows, g)));
  return (y - x).pow(2).mean().item<double>();
}

// One stage's loop bookkeeping: the loss average and the progress line, checkpoints every
// --checkpoint-every steps and at the end, and the --max-minutes budget.
class StageLoop {
 public:
  // `minutes_left` (with `finish`): the time budget left, for the ETA.
  StageLoop(const char* name, int64_t total, int64_t log_every, double loss_decay, int64_t checkpoint_every,
            std::function<bool()> out_of_time, bool finish = false, std::function<double()> minutes_left = nullptr)
      : finish_(finish),
        minutes_left_(std::move(minutes_left)),
        name_(name),
        total_(total),
        log_every_(log_every),
        decay_(loss_decay),
        checkpoint_every_(checkpoint_every),
        out_of_time_(std::move(out_of_time)) {}

  // After step `step` (1-based) with training loss `loss`: logs, and calls `save` when a checkpoint
  // is due. Returns false when the time budget stopped the run at that checkpoint (with `finish`,
  // the caller then ends the training and writes the model).
  bool AfterStep(int64_t step, double loss, const std::function<void()>& save) {
    ++since_;
    avg_ = since_ == 1 && !logged_ ? loss : decay_ * avg_ + (1 - decay_) * loss;
    if (step % log_every_ == 0 || step == total_) {
      const double sps = std::chrono::duration<double>(Clock::now() - last_).count() / since_;
      last_ = Clock::now();
      since_ = 0;
      logged_ = true;
      Log(name_, step, total_, avg_, sps, finish_ && minutes_left_ ? std::max(0.0, minutes_left_()) : -1.0);
    }
    const bool stop = out_of_time_();
    if (step % checkpoint_every_ == 0 || step == total_ || stop) {
      save();
      if (stop && step < total_) {
        std::printf(finish_ ? "time budget reached at %s step %lld: ending the training here (--finish)\n"
                            : "time budget reached at %s step %lld; rerun to resume\n",
                    name_, (long long)step);
        return false;
      }
    }
    return true;
  }

 private:
  bool finish_;
  std::function<double()> minutes_left_;
  const char* name_;
  int64_t total_, log_every_;
  double decay_;
  int64_t checkpoint_every_;
  std::function<bool()> out_of_time_;
  double avg_ = 0;
  int64_t since_ = 0;
  bool logged_ = false;
  Clock::time_point last_ = Clock::now();
};

}  // namespace

int main(int argc, char** argv) {
  Args a;
  if (auto code = ParseToolArgs(argc, argv, Usage, [&](const std::string& k, const NextValue& v) {
      if (k == "--out") a.out = v();
      else if (k == "--work") a.work = v();
      else if (k == "--tokenizer-dir") a.tokenizer_dir = v();
      else if (k == "--samples") a.samples = ParseInt64(v());
      else if (k == "--two-object-prob") a.two_object_prob = ParseDouble(v());
      else if (k == "--vae-steps") a.vae_steps = ParseInt64(v());
      else if (k == "--vae-batch") a.vae_batch = ParseInt64(v());
      else if (k == "--vae-edge-weight") a.vae_edge_weight = ParseDouble(v());
      else if (k == "--latent-channels") a.latent_channels = ParseInt64(v());
      else if (k == "--latent-size") a.latent_size = ParseInt64(v());
      else if (k == "--vae-blocks") a.vae_blocks = ParseIntList(v());
      else if (k == "--vae-layers") a.vae_layers = ParseInt64(v());
      else if (k == "--vae-lr") a.vae_lr = ParseDouble(v());
      else if (k == "--unet-steps") a.unet_steps = ParseInt64(v());
      else if (k == "--unet-batch") a.unet_batch = ParseInt64(v());
      else if (k == "--unet-lr") a.unet_lr = ParseDouble(v());
      else if (k == "--unet-blocks") a.unet_blocks = ParseIntList(v());
      else if (k == "--object-weight") a.object_weight = ParseDouble(v());
      else if (k == "--decoder-steps") a.decoder_steps = ParseInt64(v());
      else if (k == "--pair-steps") a.pair_steps = ParseInt64(v());
      else if (k == "--pair-prob") a.pair_prob = ParseDouble(v());
      else if (k == "--open-textures") a.open_textures = ParseDouble(v());
      else if (k == "--decoder-batch") a.decoder_batch = ParseInt64(v());
      else if (k == "--decoder-lr") a.decoder_lr = ParseDouble(v());
      else if (k == "--edge-weight") a.edge_weight = ParseDouble(v());
      else if (k == "--ema-decay") a.ema_decay = ParseDouble(v());
      else if (k == "--sd-schedule") a.sd_schedule = true;
      else if (k == "--model-id") a.model_id = v();
      else if (k == "--cov-captions") a.cov_captions = ParseInt64(v());
      else if (k == "--seed") a.seed = ParseUint64(v());
      else if (k == "--max-minutes") a.max_minutes = ParseDouble(v());
      else if (k == "--finish") a.finish = true;
      else if (k == "--checkpoint-every") a.checkpoint_every = ParseInt64(v());
      else if (k == "--threads") a.threads = ParseInt(v());
      else if (k == "--device") a.device = ParseToolDevice(v());
      else return false;
      return true;
    })) {
    return *code;
  }
  const bool blocks_ok = a.unet_blocks.size() >= 2 && a.unet_blocks.size() <= 4 &&
                         std::all_of(a.unet_blocks.begin(), a.unet_blocks.end(), [](int64_t b) { return b >= 32 && b % 32 == 0; });
  if (!blocks_ok) {
    std::fprintf(stderr, "--unet-blocks must list 2 to 4 channel counts, each a multiple of 32 (e.g. 64,128)\n");
    return 2;
  }
  if (a.latent_size != 8 && a.latent_size != 16) {
    std::fprintf(stderr, "--latent-size must be 8 or 16, got %lld\n", (long long)a.latent_size);
    return 2;
  }
  if (a.vae_blocks.empty()) a.vae_blocks = DefaultVaeBlocks(a.latent_size);
  const size_t vae_levels = a.latent_size == 16 ? 2 : 3;
  if (a.vae_blocks.size() != vae_levels ||
      !std::all_of(a.vae_blocks.begin(), a.vae_blocks.end(), [](int64_t b) { return b >= 16 && b % 16 == 0; })) {
    std::fprintf(stderr, "--vae-blocks must list %zu channel counts for --latent-size %lld, each a multiple of 16\n",
                 vae_levels, (long long)a.latent_size);
    return 2;
  }
  if (a.finish && !(a.max_minutes > 0)) {
    std::fprintf(stderr, "--finish needs --max-minutes (the time after which the training ends)\n");
    return 2;
  }
  if (!(a.vae_lr > 0)) {
    std::fprintf(stderr, "--vae-lr must be > 0\n");
    return 2;
  }
  if (a.vae_layers < 1 || a.vae_layers > 4) {
    std::fprintf(stderr, "--vae-layers must be 1 to 4, got %lld\n", (long long)a.vae_layers);
    return 2;
  }
  if (a.samples < 1 || a.vae_batch < 1 || a.unet_batch < 1 || a.decoder_batch < 1 || a.vae_steps < 0 ||
      a.unet_steps < 0 || a.decoder_steps < 0 || a.pair_steps < 0 || a.checkpoint_every < 1 ||
      a.latent_channels < 1 || !(a.two_object_prob >= 0 && a.two_object_prob <= 1) ||
      !(a.pair_prob >= 0 && a.pair_prob <= 1) || !(a.open_textures >= 0 && a.open_textures <= 1) ||
      a.cov_captions < 1 || !(a.object_weight >= 0)) {
    std::fprintf(stderr,
                 "need --samples, --cov-captions, --checkpoint-every, --latent-channels and the batch sizes >= 1, "
                 "step counts and --object-weight >= 0 and --two-object-prob, --pair-prob, --open-textures in [0, 1] (see --help)\n");
    return 2;
  }
  try {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);  // progress lines reach a log file at once
    if (a.threads > 0) at::set_num_threads(a.threads);
    MakeDirs(a.work);  // before any work: a missing parent would otherwise fail the first checkpoint
    const auto t0 = Clock::now();
    auto out_of_time = [&] {
      return a.max_minutes > 0 && std::chrono::duration<double>(Clock::now() - t0).count() > a.max_minutes * 60;
    };
    auto minutes_left = [&] {
      return a.max_minutes - std::chrono::duration<double>(Clock::now() - t0).count() / 60.0;
    };
    // --finish: the time ran out in a training stage; the later stages train no further.
    bool finishing = false;
    State st = LoadState(a.work);
    {
      // Resuming with other data settings would silently mix two runs: refuse, naming the flag.
      // (Work folders from before this check have no record; they take the current values.)
      const nlohmann::json now = {{"--samples", a.samples}, {"--seed", a.seed}, {"--two-object-prob", a.two_object_prob},
                                  {"--pair-prob", a.pair_prob}, {"--open-textures", a.open_textures},
                                  {"--latent-channels", a.latent_channels},
                                  {"--latent-size", a.latent_size}, {"--unet-blocks", a.unet_blocks},
                                  {"--vae-blocks", a.vae_blocks}, {"--vae-layers", a.vae_layers},
                                  {"--sd-schedule", a.sd_schedule}};
      for (const auto& [flag, value] : now.items()) {
        // The stage-2b settings matter only once that stage has taken a step.
        if ((flag == "--pair-prob" || flag == "--open-textures") && st.pair_step == 0) continue;
        // The UNet's levels and objective matter only once the UNet has taken a step: a VAE may be
        // trained first.
        if ((flag == "--unet-blocks" || flag == "--sd-schedule") &&
            (st.stage == "vae" || (st.stage == "unet" && st.step == 0))) {
          continue;
        }
        // Folders recorded before a shape flag existed were made with its default then: latent size 8,
        // UNet 64,128, the latent size's default VAE levels, one resnet per VAE level.
        const int64_t made_size = st.data.value("--latent-size", int64_t{8});
        const nlohmann::json made = st.data.contains(flag) ? st.data[flag]
                                    : st.data.empty()      ? nlohmann::json()
                                    : flag == "--latent-size" ? nlohmann::json(8)
                                    : flag == "--unet-blocks" ? nlohmann::json(std::vector<int64_t>{64, 128})
                                    : flag == "--vae-blocks"  ? nlohmann::json(DefaultVaeBlocks(made_size))
                                    : flag == "--vae-layers"  ? nlohmann::json(1)
                                                              : nlohmann::json();
        if (!made.is_null() && made != value) {
          std::fprintf(stderr, "error: %s was made with %s %s, not %s: rerun with that value or use another --work\n",
                       a.work.c_str(), flag.c_str(), made.dump().c_str(), value.dump().c_str());
          return 2;
        }
      }
      st.data = now;
    }
    // A finished (or later-stage) folder goes back to the UNet when more UNet steps are asked for:
    // past the VAE stage, `step` counts UNet steps, and every step's batch derives from its number.
    if ((st.stage == "decoder" || st.stage == "final" || st.stage == "done") && a.unet_steps > st.step) {
      std::printf("extending the UNet training: %lld -> %lld steps\n", (long long)st.step, (long long)a.unet_steps);
      st.stage = "unet";
    } else if ((st.stage == "decoder" || st.stage == "final" || st.stage == "done") && a.pair_steps > st.pair_step) {
      std::printf("extending the two-object stage: %lld -> %lld steps\n", (long long)st.pair_step,
                  (long long)a.pair_steps);
      st.stage = "pairs";
    }
    if (st.stage == "done" && a.decoder_steps > st.decoder_step) {
      std::printf("extending the finished model's decoder fine-tuning: %lld -> %lld steps\n",
                  (long long)st.decoder_step, (long long)a.decoder_steps);
      st.stage = "decoder";
    }
    if (st.stage == "done") {
      std::printf("already finished: %s\n", a.out.c_str());
      return 0;
    }
    auto tok = ClipTokenizer::Load(a.tokenizer_dir);
    std::printf("rendering %lld scenes...\n", (long long)a.samples);
    std::fflush(stdout);
    Dataset data = Render(a.samples, a.seed, a.two_object_prob);
    std::printf("rendered in %.1f s\n", std::chrono::duration<double>(Clock::now() - t0).count());
    at::Generator gen = MakeGenerator(a.seed * 7919 + 17);

    // ---- Stage 1: VAE --------------------------------------------------------------------------
    // Initial weights come from LibTorch's global generator: seed it before each model is made, so
    // that --seed fixes them (a resumed run loads its checkpoints over them).
    at::manual_seed(DeriveSeed(a.seed, 4000000));
    const c10::Device dev = a.device;
    AutoencoderKL vae(VaeOptions(1.0, a));
    vae->to(dev);
    const std::string vae_path = a.work + "/vae.safetensors", vae_opt_path = a.work + "/vae_opt.pt";
    if (Exists(vae_path)) LoadStateDict(*vae, vae_path);
    if (st.stage == "vae") {
      torch::optim::AdamW opt(vae->parameters(), torch::optim::AdamWOptions(a.vae_lr).weight_decay(0));
      if (Exists(vae_opt_path)) torch::load(opt, vae_opt_path, dev);
      // A resumed run may lower the rate (the saved optimizer state carries the old one).
      for (auto& group : opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(group.options()).lr(a.vae_lr);
      StageLoop loop("vae", a.vae_steps, 100, 0.98, a.checkpoint_every, out_of_time, a.finish, minutes_left);
      while (st.step < a.vae_steps) {
        ++st.step;
        at::Generator g = MakeGenerator(DeriveSeed(a.seed, 1000000 + st.step));
        at::Tensor idx = at::randint(a.samples, {a.vae_batch}, g, at::TensorOptions().dtype(at::kLong));
        at::Tensor x = data.images.index_select(0, idx).to(dev, at::kFloat);
        DiagonalGaussian post = vae->encode(x);
        at::Tensor recon = vae->decode(post.sample(g));
        at::Tensor loss = ReconstructionLoss(recon, x, a.vae_edge_weight) + 1e-5 * post.kl().mean();
        opt.zero_grad();
        loss.backward();
        AdamWStep(opt);  // multi-tensor on a GPU (foreach_optim.h)
        if (!loop.AfterStep(st.step, loss.item<double>(), [&] {
              SaveCheckpoint(a.work, st,
                             {{vae_path, [&](const std::string& f) { SaveStateDict(*vae, f); }},
                              {vae_opt_path, [&](const std::string& f) { torch::save(opt, f); }}});
              // What the VAE keeps so far, to judge a long run before it ends (the stage's last
              // step is checked once, after the loop).
              if (st.step < a.vae_steps)
                std::printf("  round trip MSE %.5f (%s/vae_check.png)\n", VaeCheck(vae, a.work + "/vae_check.png"),
                            a.work.c_str());
            })) {
          if (!a.finish) return 0;
          finishing = true;
          break;
        }
      }
      // Latent scale: 1 / std of the latents (SD's 0.18215 plays this role).
      torch::NoGradGuard ng;
      vae->eval();
      at::Tensor lat = vae->encode(data.images.slice(0, 0, 2048).to(dev, at::kFloat)).mode();
      st.latent_scale = 1.0 / lat.std().item<double>();
      std::printf("latent std %.4f -> scaling_factor %.5f\n", 1.0 / st.latent_scale, st.latent_scale);
      std::printf("VAE round trip: MSE %.5f on fresh scenes and the builtin concepts (%s)\n",
                  VaeCheck(vae, a.work + "/vae_check.png"), (a.work + "/vae_check.png").c_str());
      st.stage = "unet";
      st.step = 0;
      SaveState(a.work, st);
    }
    vae->eval();
    for (auto& p : vae->parameters()) p.set_requires_grad(false);

    // Latents of a dataset (the UNet stages train on them; the encoder never changes after stage 1).
    auto encode_all = [&](const Dataset& d) {
      torch::NoGradGuard ng;
      std::vector<at::Tensor> parts;
      const int64_t n_all = d.images.size(0);
      for (int64_t i = 0; i < n_all; i += 512) {
        int64_t n = std::min<int64_t>(512, n_all - i);
        parts.push_back(vae->encode(d.images.slice(0, i, i + n).to(dev, at::kFloat)).mode() * st.latent_scale);
      }
      at::Tensor latents = at::cat(parts);
      std::printf("encoded %lld latents %s\n", (long long)n_all, c10::str(latents.sizes()).c_str());
      return latents;
    };

    // ---- Stage 2: text encoder + UNet ----------------------------------------------------------
    at::manual_seed(DeriveSeed(a.seed, 4000001));
    CLIPTextModel te(TextOptions());
    UNet2DConditionModel unet(UnetConfig(a.latent_channels, a.latent_size, a.unet_blocks));
    te->to(dev);
    unet->to(dev);
    const std::string te_path = a.work + "/text_encoder.safetensors", unet_path = a.work + "/unet.safetensors";
    const std::string opt_path = a.work + "/unet_opt.pt";
    if (Exists(te_path)) LoadStateDict(*te, te_path);
    if (Exists(unet_path)) LoadStateDict(*unet, unet_path);
    SchedulerConfig sched;  // SD 1.5's DDPM betas
    if (a.sd_schedule) {
      sched.timestep_spacing = "leading";
    } else {
      sched.rescale_betas_zero_snr = true;
      sched.prediction_type = "v_prediction";
      sched.timestep_spacing = "trailing";
    }
    // The weights' EMA (what is written out), kept beside the checkpoint.
    std::vector<at::Tensor> live = te->parameters(), avg;
    for (auto& p : unet->parameters()) live.push_back(p);
    const std::string ema_path = a.work + "/ema.pt";
    if (a.ema_decay > 0) {
      if (Exists(ema_path)) {
        torch::load(avg, ema_path, dev);
        TORCH_CHECK(avg.size() == live.size(), ema_path, " does not match the model");
      } else {
        for (auto& p : live) avg.push_back(p.detach().clone());
      }
    } else if (Exists(ema_path) && (st.stage == "unet" || st.stage == "pairs")) {
      // Training on without an EMA leaves ema.pt behind the weights: a later resume with an EMA
      // would start from that old average. Drop it; such a resume starts a fresh one.
      std::printf("--ema-decay 0: removing %s (it would fall behind the weights)\n", ema_path.c_str());
      std::remove(ema_path.c_str());
    }
    const char* after_pairs = a.decoder_steps > st.decoder_step ? "decoder" : "final";
    const char* after_unet = a.pair_steps > st.pair_step ? "pairs" : after_pairs;
    if (st.stage == "unet" || st.stage == "pairs") {
      std::vector<at::Tensor> params = te->parameters();
      for (auto& p : unet->parameters()) params.push_back(p);
      torch::optim::AdamW opt(params, torch::optim::AdamWOptions(a.unet_lr).weight_decay(0.01));
      if (Exists(opt_path)) torch::load(opt, opt_path, dev);
      DDPMScheduler ddpm(sched);
      auto save = [&] {
        std::vector<std::pair<std::string, std::function<void(const std::string&)>>> files = {
            {te_path, [&](const std::string& f) { SaveStateDict(*te, f); }},
            {unet_path, [&](const std::string& f) { SaveStateDict(*unet, f); }},
            {opt_path, [&](const std::string& f) { torch::save(opt, f); }}};
        if (!avg.empty()) files.push_back({ema_path, [&](const std::string& f) { torch::save(avg, f); }});
        SaveCheckpoint(a.work, st, files);
      };
      // One step on `d`: a batch, captions, noise and timesteps all drawn from `stream`; `total_step`
      // counts every text encoder + UNet step so far (warm-up and the EMA's decay follow it).
      // `cover` is ObjectCover(d), or undefined for a uniform loss.
      auto train_step = [&](const Dataset& d, const at::Tensor& latents, const at::Tensor& cover, uint64_t stream,
                            int64_t total_step) {
        const double warm = std::min(1.0, total_step / 200.0);
        for (auto& group : opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(group.options()).lr(a.unet_lr * warm);
        at::Generator g = MakeGenerator(DeriveSeed(a.seed, stream));
        const int64_t n_data = latents.size(0);
        at::Tensor idx = at::randint(n_data, {a.unet_batch}, g, at::TensorOptions().dtype(at::kLong));
        at::Tensor drop = at::rand({a.unet_batch}, g);
        at::Tensor tmpl = at::randint(1 << 20, {a.unet_batch}, g, at::TensorOptions().dtype(at::kLong));
        std::vector<int64_t> ids;
        for (int64_t b = 0; b < a.unet_batch; ++b) {
          const SceneSpec& scene = d.scenes[idx[b].item<int64_t>()];
          // 10% empty; else the caption naming every attribute (template 0) 30% of the time, as
          // WorldOptions::full_caption_prob, or another template.
          const int64_t r = tmpl[b].item<int64_t>();
          const int n_tmpl = NumCaptionTemplates(scene);
          const int template_id = (r % 10) < 3 || n_tmpl == 1 ? 0 : 1 + static_cast<int>((r / 10) % (n_tmpl - 1));
          std::string caption = drop[b].item<float>() < 0.1f ? "" : Caption(scene, template_id);
          auto p = tok->EncodePadded(caption).ids;
          ids.insert(ids.end(), p.begin(), p.end());
        }
        at::Tensor id_t = at::tensor(ids, at::TensorOptions().dtype(at::kLong)).reshape({a.unet_batch, 77}).to(dev);
        const at::Tensor idx_dev = idx.to(dev);
        at::Tensor x0 = latents.index_select(0, idx_dev);
        at::Tensor noise = ddpm.sample_noise(x0, g);  // drawn on the CPU: the same on any device
        at::Tensor t = ddpm.sample_timesteps(a.unet_batch, g, dev);
        at::Tensor pred = unet->forward(ddpm.add_noise(x0, noise, t), t, te->forward(id_t));
        at::Tensor err = (pred - ddpm.training_target(x0, noise, t)).pow(2);
        at::Tensor loss;
        if (cover.defined()) {
          // Normalised, so the loss keeps the uniform loss's scale and the learning rate its meaning.
          const at::Tensor w = 1.0 + a.object_weight * cover.index_select(0, idx_dev);
          loss = (err * w).mean() / w.mean();
        } else {
          loss = err.mean();
        }
        opt.zero_grad();
        loss.backward();
        AdamWStep(opt);
        if (!avg.empty()) EmaUpdate(avg, live, std::min(a.ema_decay, (1.0 + total_step) / (10.0 + total_step)));
        return loss.item<double>();
      };
      if (st.stage == "unet" && !finishing) {
        const at::Tensor latents = encode_all(data);
        const at::Tensor cover = a.object_weight > 0 ? ObjectCover(data, a.latent_size).to(dev) : at::Tensor();
        StageLoop loop("unet", a.unet_steps, 50, 0.99, a.checkpoint_every, out_of_time, a.finish, minutes_left);
        while (st.step < a.unet_steps && !finishing) {
          ++st.step;
          if (!loop.AfterStep(st.step, train_step(data, latents, cover, 2000000 + st.step, st.step), save)) {
            if (!a.finish) return 0;
            finishing = true;
          }
        }
        st.stage = after_unet;
        SaveState(a.work, st);
      }
      if (st.stage == "pairs" && !finishing) {
        // Stage 2b: the same training on fresh scenes with more two-object ones.
        std::printf("rendering %lld scenes, %.0f%% with two objects, %.0f%% of textured objects in a concept "
                    "pattern...\n", (long long)a.samples, 100 * a.pair_prob, 100 * a.open_textures);
        const Dataset pairs = Render(a.samples, DeriveSeed(a.seed, 0x9a125), a.pair_prob, a.open_textures);
        const at::Tensor latents = encode_all(pairs);
        const at::Tensor cover = a.object_weight > 0 ? ObjectCover(pairs, a.latent_size).to(dev) : at::Tensor();
        StageLoop loop("pairs", a.pair_steps, 50, 0.99, a.checkpoint_every, out_of_time, a.finish, minutes_left);
        while (st.pair_step < a.pair_steps && !finishing) {
          ++st.pair_step;
          const double loss = train_step(pairs, latents, cover, 4000000 + st.pair_step, st.step + st.pair_step);
          if (!loop.AfterStep(st.pair_step, loss, save)) {
            if (!a.finish) return 0;
            finishing = true;
          }
        }
        st.stage = after_pairs;
        SaveState(a.work, st);
      }
    }

    // ---- Stage 3: decoder fine-tuning ----------------------------------------------------------
    const std::string vae_ft_path = a.work + "/vae_ft.safetensors", dec_opt_path = a.work + "/decoder_opt.pt";
    if (st.stage == "decoder" && !finishing) {
      if (Exists(vae_ft_path)) LoadStateDict(*vae, vae_ft_path);
      std::vector<at::Tensor> params = vae->decoder->parameters();
      if (vae->post_quant_conv) {
        for (auto& p : vae->post_quant_conv->parameters()) params.push_back(p);
      }
      for (auto& p : params) p.set_requires_grad(true);
      torch::optim::AdamW opt(params, torch::optim::AdamWOptions(a.decoder_lr).weight_decay(0));
      if (Exists(dec_opt_path)) torch::load(opt, dec_opt_path, dev);
      StageLoop loop("decoder", a.decoder_steps, 100, 0.98, a.checkpoint_every, out_of_time, a.finish, minutes_left);
      while (st.decoder_step < a.decoder_steps) {
        ++st.decoder_step;
        const double warm = std::min(1.0, st.decoder_step / 100.0);
        for (auto& group : opt.param_groups()) {
          static_cast<torch::optim::AdamWOptions&>(group.options()).lr(a.decoder_lr * warm);
        }
        at::Generator g = MakeGenerator(DeriveSeed(a.seed, 3000000 + st.decoder_step));
        at::Tensor idx = at::randint(a.samples, {a.decoder_batch}, g, at::TensorOptions().dtype(at::kLong));
        at::Tensor x = data.images.index_select(0, idx).to(dev, at::kFloat);
        at::Tensor z;
        {
          torch::NoGradGuard ng;
          z = vae->encode(x).sample(g);
        }
        at::Tensor recon = vae->decode(z);
        at::Tensor loss = ReconstructionLoss(recon, x, a.edge_weight);
        opt.zero_grad();
        loss.backward();
        AdamWStep(opt);
        if (!loop.AfterStep(st.decoder_step, loss.item<double>(), [&] {
              SaveCheckpoint(a.work, st,
                             {{vae_ft_path, [&](const std::string& f) { SaveStateDict(*vae, f); }},
                              {dec_opt_path, [&](const std::string& f) { torch::save(opt, f); }}});
            })) {
          if (!a.finish) return 0;
          break;
        }
      }
      std::printf("decoder round trip: MSE %.5f on fresh scenes and the builtin concepts (%s)\n",
                  VaeCheck(vae, a.work + "/decoder_check.png"), (a.work + "/decoder_check.png").c_str());
      st.stage = "final";
      SaveState(a.work, st);
    }

    // ---- Stage 4: covariance and the model folder ----------------------------------------------
    torch::NoGradGuard ng;
    if (!avg.empty()) {
      for (size_t i = 0; i < live.size(); ++i) live[i].detach().copy_(avg[i]);
    }
    te->eval();
    unet->eval();
    CovarianceAccumulator cov(TextOptions().hidden_size());
    WorldOptions wopts;  // the captions the text encoder last trained on
    wopts.open_texture_prob = st.pair_step > 0 ? a.open_textures : 0;
    for (int64_t i = 0; i < a.cov_captions; i += 64) {
      std::vector<int64_t> ids;
      int64_t n = std::min<int64_t>(64, a.cov_captions - i);
      for (int64_t b = 0; b < n; ++b) {
        SceneSpec s = SampleScene(DeriveSeed(a.seed + 99, i + b), wopts);
        auto p = tok->EncodePadded(Caption(s, static_cast<int>((i + b) % NumCaptionTemplates(s)))).ids;
        ids.insert(ids.end(), p.begin(), p.end());
      }
      cov.Add(te->forward(at::tensor(ids, at::TensorOptions().dtype(at::kLong)).reshape({n, 77}).to(dev)));
    }
    StableDiffusion m;
    m.text_encoder = te;
    m.unet = unet;
    AutoencoderKL final_vae(VaeOptions(st.latent_scale, a));
    LoadStateDict(*final_vae, Exists(vae_ft_path) ? vae_ft_path : vae_path);
    m.vae = final_vae;
    m.scheduler = sched;
    // A small ridge: the young encoder's final LayerNorm keeps its outputs near a hyperplane.
    m.covariance = cov.Covariance(/*ridge=*/1e-3).to(at::kFloat);
    m.model_id = a.model_id;
    MakeDirs(a.out);
    SaveModelDir(m, a.out, at::kHalf);
    st.stage = "done";
    SaveState(a.work, st);
    std::printf("wrote %s (covariance over %lld token vectors)\n", a.out.c_str(), (long long)cov.count());
    return 0;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}

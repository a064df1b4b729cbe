// UNet2DConditionModel forward on the CPU (fp32, c10::InferenceMode), random weights (timing does
// not depend on their values):
//
//   OMP_NUM_THREADS=1 build/bench/unet_bench --benchmark_min_time=1
//
//   BM_UNetTinyForward64/batch:B: the conformance model's UNet shape (tests' reference data:
//       block_out_channels [32, 64, 64], cross_attention_dim 32) at 64x64 latents (a 512x512 image).
//   BM_UNetShippedTinyForward/batch:B: the shipped tiny model's UNet (models/tiny/unet/config.json:
//       block_out_channels [64, 128], cross_attention_dim 64) at its native 8x8 latents (what one
//       pipeline_bench step runs); skips itself with the reason if the config cannot be read.
//   BM_UNetSd15Forward64/batch:B: the SD 1.5 config at 64x64 latents.
//   BM_UNetSd15PrecomputeKv: the per-prompt cross-attention K/V of SD 1.5, on its own.
// Batch 1 and 2 (2 = the guided pair). The cross-attention K/V are precomputed once per prompt
// outside the timed loop, as the pipeline does.
//
// SD 1.5 takes seconds per step and 3.4 GB to build: its cases run one iteration each (after one
// untimed warm-up forward), and the model is built once, on first use. Run only the tiny cases with
// --benchmark_filter=Tiny.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>
#include <c10/core/InferenceMode.h>

#include <exception>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "bench_main.h"
#include "perfusion/unet.h"

namespace perfusion {
namespace {

UNetConfig TinyConfig() {
  UNetConfig c;
  c.block_out_channels = {32, 64, 64};
  c.layers_per_block = {1};
  c.down_block_types = {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"};
  c.up_block_types = {"UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"};
  c.cross_attention_dim = 32;
  c.attention_head_dim = {8};
  c.norm_num_groups = 8;
  return c;
}

UNet2DConditionModel& Sd15Model() {
  static UNet2DConditionModel* model = [] {
    at::manual_seed(0);
    auto* m = new UNet2DConditionModel(UNetConfig::SD15());
    (*m)->eval();
    return m;
  }();
  return *model;
}

UNet2DConditionModel& TinyModel() {
  static UNet2DConditionModel* model = [] {
    at::manual_seed(0);
    auto* m = new UNet2DConditionModel(TinyConfig());
    (*m)->eval();
    return m;
  }();
  return *model;
}

// The shipped tiny model's UNet (config only, random weights); null with `error` set if unreadable.
struct ShippedTiny {
  UNet2DConditionModel model{nullptr};
  std::string error;
};

const ShippedTiny& ShippedTinyModel() {
  static const ShippedTiny shipped = [] {
    ShippedTiny s;
    const std::string path = std::string(PERFUSION_SOURCE_DIR) + "/models/tiny/unet/config.json";
    // A missing file skips; a config that is there but fails to build is a regression (the
    // exception ends the run, and the CTest smoke run fails rather than skips).
    if (!std::filesystem::exists(path)) {
      s.error = "no shipped tiny UNet config at " + path;
      return s;
    }
    at::manual_seed(0);
    s.model = UNet2DConditionModel(UNetConfig::FromFile(path));
    s.model->eval();
    return s;
  }();
  return shipped;
}

void RunForward(benchmark::State& state, UNet2DConditionModel& model, int64_t latent, bool warm_up) {
  c10::InferenceMode guard;
  const int64_t batch = state.range(0);
  const UNetConfig& c = model->config();
  const at::Tensor sample = at::randn({batch, c.in_channels, latent, latent});
  const at::Tensor text = at::randn({batch, 77, c.cross_attention_dim});
  const std::vector<CrossAttnKV> kv = model->precompute_kv(text);
  const at::Tensor t = at::full({batch}, 500, at::kLong);
  if (warm_up) benchmark::DoNotOptimize(model->forward(sample, t, kv).data_ptr<float>());
  for (auto _ : state) {
    at::Tensor out = model->forward(sample, t, kv);
    benchmark::DoNotOptimize(out.data_ptr<float>());
  }
  state.SetItemsProcessed(state.iterations() * batch);
  state.counters["threads"] = at::get_num_threads();
}

void BM_UNetTinyForward64(benchmark::State& state) { RunForward(state, TinyModel(), 64, false); }
BENCHMARK(BM_UNetTinyForward64)->ArgName("batch")->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond);

void BM_UNetShippedTinyForward(benchmark::State& state) {
  const ShippedTiny& s = ShippedTinyModel();
  if (!s.model) {
    state.SkipWithError(s.error.c_str());
    return;
  }
  UNet2DConditionModel model = s.model;
  RunForward(state, model, model->config().sample_size, false);
}
BENCHMARK(BM_UNetShippedTinyForward)->ArgName("batch")->Arg(1)->Arg(2)->Unit(benchmark::kMicrosecond);

void BM_UNetSd15Forward64(benchmark::State& state) { RunForward(state, Sd15Model(), 64, true); }
BENCHMARK(BM_UNetSd15Forward64)->ArgName("batch")->Arg(1)->Arg(2)->Unit(benchmark::kSecond)->Iterations(1);

// The per-prompt K/V of all 16 SD 1.5 cross-attention layers (batch 2: uncond + cond).
void BM_UNetSd15PrecomputeKv(benchmark::State& state) {
  c10::InferenceMode guard;
  UNet2DConditionModel& model = Sd15Model();
  const at::Tensor text = at::randn({2, 77, 768});
  for (auto _ : state) {
    std::vector<CrossAttnKV> kv = model->precompute_kv(text);
    benchmark::DoNotOptimize(kv.back().v.data_ptr<float>());
  }
}
BENCHMARK(BM_UNetSd15PrecomputeKv)->Unit(benchmark::kMillisecond)->Iterations(5);

}  // namespace
}  // namespace perfusion

int main(int argc, char** argv) { return perfusion::bench::Main(argc, argv); }

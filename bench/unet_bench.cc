// UNet2DConditionModel forward on the CPU (fp32, c10::InferenceMode), 64x64 latents (a 512x512
// image), batch 1 and 2: a tiny config (the conformance model's shape, what the shipped tiny model
// is sized like) and the SD 1.5 config (random weights; timing does not depend on their values).
// The cross-attention K/V are precomputed once per prompt outside the timed loop, as the pipeline
// does; BM_UNetPrecomputeKv times that step on its own.
//
// SD 1.5 takes seconds per step and 3.4 GB to build: its cases run one iteration each, and the
// model is built once, on first use. Run only the tiny cases with --benchmark_filter=Tiny.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>
#include <c10/core/InferenceMode.h>

#include <memory>
#include <vector>

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

void RunForward(benchmark::State& state, UNet2DConditionModel& model) {
  c10::InferenceMode guard;
  const int64_t batch = state.range(0);
  const int64_t latent = 64;
  const UNetConfig& c = model->config();
  const at::Tensor sample = at::randn({batch, c.in_channels, latent, latent});
  const at::Tensor text = at::randn({batch, 77, c.cross_attention_dim});
  const std::vector<CrossAttnKV> kv = model->precompute_kv(text);
  const at::Tensor t = at::full({batch}, 500, at::kLong);
  for (auto _ : state) {
    at::Tensor out = model->forward(sample, t, kv);
    benchmark::DoNotOptimize(out.data_ptr<float>());
  }
  state.SetItemsProcessed(state.iterations() * batch);
  state.counters["threads"] = at::get_num_threads();
}

void BM_UNetTinyForward64(benchmark::State& state) { RunForward(state, TinyModel()); }
BENCHMARK(BM_UNetTinyForward64)->ArgName("batch")->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->MinTime(1.0);

void BM_UNetSd15Forward64(benchmark::State& state) { RunForward(state, Sd15Model()); }
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

BENCHMARK_MAIN();

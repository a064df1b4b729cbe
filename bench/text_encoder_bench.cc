// Cost of encoding one prompt with the CLIP text encoder (random weights), under InferenceMode:
//
//   OMP_NUM_THREADS=1 build/bench/text_encoder_bench --benchmark_min_time=0.5
//
// BM_Sd15TextEncoder/B: the SD 1.5 config (768 wide, 12 layers, 77 tokens), batch B (1 = one prompt,
// 2 = a prompt and the unconditional prompt for classifier-free guidance).
// BM_Sd15TextEncoderEmbeds: the concept path (forward_embeds on token embeddings with a substituted
// vector), batch 1. BM_TinyTextEncoder: the conformance-size model (32 wide, 2 layers), batch 1.
// Threads: LibTorch's intra-op pool (OMP_NUM_THREADS, or --torch_threads=N); the run's header states
// it (torch_threads). Random weights: no shared data needed.
#include <ATen/Functions.h>
#include <benchmark/benchmark.h>
#include <c10/core/InferenceMode.h>

#include "bench_main.h"
#include "perfusion/clip_text.h"

namespace perfusion {
namespace {

CLIPTextModel& Sd15() {
  static CLIPTextModel model = [] {
    at::manual_seed(0);
    CLIPTextModel m;  // SD 1.5 defaults
    m->eval();
    return m;
  }();
  return model;
}

void BM_Sd15TextEncoder(benchmark::State& state) {
  c10::InferenceMode guard;
  auto& model = Sd15();
  auto ids = at::randint(0, 49406, {state.range(0), 77}, at::kLong);
  for (auto _ : state) benchmark::DoNotOptimize(model->forward(ids));
  state.SetItemsProcessed(state.iterations() * state.range(0));  // prompts
}
BENCHMARK(BM_Sd15TextEncoder)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond);

void BM_Sd15TextEncoderEmbeds(benchmark::State& state) {
  c10::InferenceMode guard;
  auto& model = Sd15();
  auto ids = at::randint(0, 49406, {1, 77}, at::kLong);
  auto embeds = model->embed_tokens(ids).clone();
  embeds[0][4].copy_(at::randn({768}));
  for (auto _ : state) benchmark::DoNotOptimize(model->forward_embeds(embeds));
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Sd15TextEncoderEmbeds)->Unit(benchmark::kMillisecond);

void BM_TinyTextEncoder(benchmark::State& state) {
  c10::InferenceMode guard;
  at::manual_seed(0);
  CLIPTextModel model(CLIPTextModelOptions()
                          .hidden_size(32)
                          .intermediate_size(128)
                          .num_attention_heads(4)
                          .num_hidden_layers(2)
                          .vocab_size(1000));
  model->eval();
  auto ids = at::randint(0, 1000, {1, 77}, at::kLong);
  for (auto _ : state) benchmark::DoNotOptimize(model->forward(ids));
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_TinyTextEncoder)->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace perfusion

int main(int argc, char** argv) { return perfusion::bench::Main(argc, argv); }

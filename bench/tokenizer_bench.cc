// Benchmarks for perfusion/tokenizer.h: prompts per second through ClipTokenizer::EncodePadded
// (cleanup, split, BPE, framing to 77), with the per-word cache warm (a server's steady state)
// and cold (every prompt's words new), and from several threads sharing one tokenizer.
//
//   perfusion-build/tokenizer_bench --benchmark_min_time=0.5
// Reads the vocabulary from $PERFUSION_CLIP_VOCAB_DIR or ../shared/data/clip.
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "perfusion/tokenizer.h"

namespace {

std::string VocabDir() {
  const char* v = std::getenv("PERFUSION_CLIP_VOCAB_DIR");
  if (v != nullptr && *v != '\0') return v;
  return std::string(PERFUSION_SHARED_DIR) + "/data/clip";
}

std::shared_ptr<const perfusion::ClipTokenizer> SharedTokenizer() {
  static const auto tok = perfusion::ClipTokenizer::Load(VocabDir());
  return tok;
}

// A typical SD prompt: 25 words, 33 tokens.
const char kPrompt[] =
    "a photo of a sks dog wearing a red hat, sitting on a wooden bench in a sunny park, "
    "highly detailed, 8k, sharp focus, trending on artstation";

void BM_EncodePaddedWarmCache(benchmark::State& state) {
  const auto tok = SharedTokenizer();
  tok->EncodePadded(kPrompt);  // fill the cache
  for (auto _ : state) {
    benchmark::DoNotOptimize(tok->EncodePadded(kPrompt));
  }
  state.counters["prompts_per_s"] = benchmark::Counter(static_cast<double>(state.iterations()),
                                                       benchmark::Counter::kIsRate);
}
BENCHMARK(BM_EncodePaddedWarmCache)->UseRealTime()->ThreadRange(1, 4);

// Cold: a fresh tokenizer's cache is empty, so every word goes through BPE. Loading is outside
// the timed region; each iteration encodes the prompt once on a new instance.
void BM_EncodePaddedColdCache(benchmark::State& state) {
  const std::string dir = VocabDir();
  for (auto _ : state) {
    state.PauseTiming();
    auto tok = perfusion::ClipTokenizer::Load(dir);
    state.ResumeTiming();
    benchmark::DoNotOptimize(tok->EncodePadded(kPrompt));
    state.PauseTiming();
    tok.reset();
    state.ResumeTiming();
  }
  state.counters["prompts_per_s"] = benchmark::Counter(static_cast<double>(state.iterations()),
                                                       benchmark::Counter::kIsRate);
}
BENCHMARK(BM_EncodePaddedColdCache)->Iterations(20)->Unit(benchmark::kMicrosecond);

void BM_Load(benchmark::State& state) {
  const std::string dir = VocabDir();
  for (auto _ : state) {
    benchmark::DoNotOptimize(perfusion::ClipTokenizer::Load(dir));
  }
}
BENCHMARK(BM_Load)->Iterations(3)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();

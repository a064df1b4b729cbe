// Benchmarks for perfusion/tokenizer.h: prompts per second through ClipTokenizer::EncodePadded
// (cleanup, split, BPE, framing to 77), with the per-word cache warm (a server's steady state)
// and cold (every prompt's words new), and from several threads sharing one tokenizer.
//
//   OMP_NUM_THREADS=1 build/bench/tokenizer_bench --benchmark_min_time=0.5
// Reads the vocabulary from $PERFUSION_CLIP_VOCAB_DIR or $PERFUSION_SHARED_DIR/data/clip (../shared
// beside the clone); without it every benchmark skips itself with the reason (exit status 0).
// The /threads:N cases are benchmark threads sharing one tokenizer, not LibTorch threads.
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "bench_main.h"
#include "perfusion/tokenizer.h"

namespace {

std::string VocabDir() {
  const char* v = std::getenv("PERFUSION_CLIP_VOCAB_DIR");
  if (v != nullptr && *v != '\0') return v;
  return perfusion::bench::SharedDir() + "/data/clip";
}

// Loads a tokenizer from VocabDir(); on failure returns null and sets `error` to the reason.
std::shared_ptr<const perfusion::ClipTokenizer> TryLoad(std::string& error) {
  try {
    return perfusion::ClipTokenizer::Load(VocabDir());
  } catch (const std::exception& e) {
    error = "cannot load the CLIP vocabulary from " + VocabDir() + " (PERFUSION_CLIP_VOCAB_DIR): " +
            perfusion::bench::ErrorText(e);
    return nullptr;
  }
}

// Skips `state` with the reason when the vocabulary cannot be loaded; true if it can.
bool VocabOrSkip(benchmark::State& state) {
  std::string error;
  if (TryLoad(error)) return true;
  state.SkipWithError(error.c_str());
  return false;
}

// One tokenizer shared by all benchmarks and threads, loaded once; null after skipping `state`.
std::shared_ptr<const perfusion::ClipTokenizer> SharedTokenizerOrSkip(benchmark::State& state) {
  static std::string error;
  static const auto tok = TryLoad(error);
  if (!tok) state.SkipWithError(error.c_str());
  return tok;
}

// A typical SD prompt: 25 words, 33 tokens.
const char kPrompt[] =
    "a photo of a sks dog wearing a red hat, sitting on a wooden bench in a sunny park, "
    "highly detailed, 8k, sharp focus, trending on artstation";

void BM_EncodePaddedWarmCache(benchmark::State& state) {
  const auto tok = SharedTokenizerOrSkip(state);
  if (!tok) return;
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
  if (!VocabOrSkip(state)) return;
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
  if (!VocabOrSkip(state)) return;
  for (auto _ : state) {
    benchmark::DoNotOptimize(perfusion::ClipTokenizer::Load(dir));
  }
}
BENCHMARK(BM_Load)->Iterations(3)->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) { return perfusion::bench::Main(argc, argv); }

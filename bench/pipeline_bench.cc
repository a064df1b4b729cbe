// End-to-end engine costs on the shipped tiny model (models/tiny; PERFUSION_TINY_MODEL overrides;
// the tokenizer comes from $PERFUSION_SHARED_DIR/data/clip). One core:
//
//   OMP_NUM_THREADS=1 build/bench/pipeline_bench --benchmark_min_time=2
//
//   BM_Generate/concepts:K/global:G: one 32x32 image, 20 DDIM steps with guidance, a prompt using
//                  K concepts (0, 1, 4) with local (G = 0) or global (G = 1, the shipped tiny model's
//                  default, models/tiny/perfusion/inference.json) key-locking: what concepts add to
//                  generation time (their K/V edits run once per prompt; global locking encodes the
//                  prompt a second time for the keys). K = 0 has no edits, so it runs once (G = 0).
//   BM_PromptKV/concepts:K/global:G: the per-prompt part alone (text encoder(s) + gates + every
//                  attn2 K/V). 1 core (session 13): about 0.9 ms for K = 0, 1.7 ms for K = 4 local,
//                  3.0 ms for K = 4 global: four concepts under the default (global) mode add about
//                  2.0 ms, 1.1% of BM_Generate's ~180 ms at 20 steps and 0.7% at the API's default
//                  30, below its run-to-run noise (175-186 ms for one configuration).
//   BM_GenerateRegions/R: as BM_Generate, with a 2-concept prompt (local key-locking) and R regional
//                  prompts side by side (0, 2, 4): each region adds one UNet pass per image to the
//                  guided pair, so at most (2 + R) / 2 times R = 0 (the larger batch runs more
//                  efficiently; 1 core: about 186 / 305 / 417 ms, as docs/api.md quotes).
//   BM_TrainConcept: Perfusion training of one concept, 400 steps, batch 4, 8 images.
// A benchmark whose model cannot be loaded skips itself with the reason (exit status 0).
#include <ATen/Functions.h>
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <exception>
#include <filesystem>
#include <memory>

#include "bench_main.h"
#include "perfusion/image_io.h"
#include "perfusion/pipeline.h"
#include "perfusion/shapes_world.h"
#include "perfusion/trainer.h"

namespace perfusion {

struct LoadedModel {
  std::shared_ptr<StableDiffusion> model;
  std::string error;  // why `model` is null
};

const LoadedModel& TinyModel() {
  static const LoadedModel loaded = [] {
    LoadedModel l;
    const char* env = std::getenv("PERFUSION_TINY_MODEL");
    const std::string dir = (env != nullptr && *env != '\0') ? env : std::string(PERFUSION_SOURCE_DIR) + "/models/tiny";
    // Missing files skip the benchmarks; files that are there but fail to load are a regression,
    // and the exception ends the run (the CTest smoke run then fails rather than skips).
    const std::string tokenizer = bench::SharedDir() + "/data/clip";
    if (!std::filesystem::exists(dir + "/model_index.json") || !std::filesystem::exists(tokenizer + "/vocab.json")) {
      l.error = "no tiny model at " + dir + " (PERFUSION_TINY_MODEL) or no tokenizer at " + tokenizer;
      return l;
    }
    ModelDirOptions o;
    o.tokenizer_dir = tokenizer;
    l.model = LoadModelDir(dir, o);
    return l;
  }();
  return loaded;
}

// The tiny model, or null after skipping `state` with the load error.
std::shared_ptr<StableDiffusion> ModelOrSkip(benchmark::State& state) {
  const LoadedModel& l = TinyModel();
  if (!l.model) state.SkipWithError(l.error.c_str());
  return l.model;
}

// K concepts shaped for the model (values do not change the cost), local or global key-locking.
std::map<std::string, ConceptRef> Concepts(const StableDiffusion& model, int64_t K, bool global_key_lock) {
  std::map<std::string, ConceptRef> out;
  const auto layers = model.unet->cross_attention_layers();
  at::manual_seed(1);
  for (int64_t k = 0; k < K; ++k) {
    auto c = std::make_shared<Concept>();
    c->name = "c" + std::to_string(k);
    c->superclass = "star";
    c->superclass_token_id = *model.tokenizer->SingleTokenId("star");
    c->base_model_id = model.model_id;
    for (const auto& l : layers) c->layers.push_back({l.name, l.to_v->weight.size(0)});
    const int64_t D = model.text_dim();
    c->embedding = at::randn({D});
    c->i_star = at::randn({D}) * 3;
    c->i_sup = at::randn({D}) * 3;
    c->v_targets = at::randn({c->total_out_dim()});
    out[c->name] = {c, {0.7, 0.15}, global_key_lock};
  }
  return out;
}

std::string Prompt(int64_t K) {
  std::string p = "a photo of";
  for (int64_t k = 0; k < K; ++k) p += (k ? " and a <c" : " a <c") + std::to_string(k) + ">";
  return K == 0 ? p + " a star and a heart and a circle" : p + " on a blue background";
}

void BM_Generate(benchmark::State& state) {
  const auto model = ModelOrSkip(state);
  if (!model) return;
  Pipeline pipe(model);
  GenerationRequest r;
  r.prompt = Prompt(state.range(0));
  r.concepts = Concepts(*model, state.range(0), state.range(1) != 0);
  r.steps = 20;
  for (auto _ : state) benchmark::DoNotOptimize(pipe.Generate({r}));
}

void BM_GenerateRegions(benchmark::State& state) {
  const auto model = ModelOrSkip(state);
  if (!model) return;
  Pipeline pipe(model);
  GenerationRequest r;
  r.prompt = Prompt(2);
  r.concepts = Concepts(*model, 2, false);
  r.steps = 20;
  const int64_t R = state.range(0);
  for (int64_t j = 0; j < R; ++j) {
    r.regions.push_back({"a small <c" + std::to_string(j % 2) + ">", static_cast<double>(j) / R, 0,
                         static_cast<double>(j + 1) / R, 1});
  }
  for (auto _ : state) benchmark::DoNotOptimize(pipe.Generate({r}));
}

void BM_PromptKV(benchmark::State& state) {
  const auto model = ModelOrSkip(state);
  if (!model) return;
  Pipeline pipe(model);
  auto concepts = Concepts(*model, state.range(0), state.range(1) != 0);
  const std::string prompt = Prompt(state.range(0));
  for (auto _ : state) benchmark::DoNotOptimize(pipe.PromptKV(prompt, concepts));
}

void BM_TrainConcept(benchmark::State& state) {
  const auto model = ModelOrSkip(state);
  if (!model) return;
  std::vector<at::Tensor> images;
  for (const auto& s : RenderConcept(FindConcept("checker_star"), 8, 1, 32)) images.push_back(ImageToTensor(s.image));
  TrainOptions o;
  o.name = "bench";
  o.superclass = "star";
  o.steps = 400;
  for (auto _ : state) benchmark::DoNotOptimize(TrainConcept(*model, images, o));
}

// {concepts, global}: 0 concepts once (no edits, so the key-locking mode does not apply), then each
// count under both modes.
void ConceptArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"concepts", "global"})->Args({0, 0});
  for (int64_t k : {1, 4}) b->Args({k, 0})->Args({k, 1});
}

BENCHMARK(BM_Generate)->Apply(ConceptArgs)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_GenerateRegions)->Arg(0)->Arg(2)->Arg(4)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_PromptKV)->Apply(ConceptArgs)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_TrainConcept)->Unit(benchmark::kSecond)->Iterations(1);

}  // namespace perfusion

int main(int argc, char** argv) { return perfusion::bench::Main(argc, argv); }

// End-to-end engine costs on the shipped tiny model (models/tiny; PERFUSION_TINY_MODEL overrides):
//   BM_Generate/K: one 32x32 image, 20 DDIM steps with guidance, a prompt using K concepts (0, 1, 4):
//                  what concepts add to generation time (their K/V edits run once per prompt).
//   BM_PromptKV/K: the per-prompt part alone (text encoder + gates + every attn2 K/V).
//   BM_GenerateRegions/R: BM_Generate/2 with R regional prompts side by side (0, 2, 4): each region
//                  adds one UNet pass per image to the guided pair, so at most (2 + R) / 2 times R = 0
//                  (measured on 1 core: 204 / 330 / 447 ms, the larger batch runs more efficiently).
//   BM_TrainConcept: Perfusion training of one concept, 400 steps, batch 4, 8 images.
#include <ATen/Functions.h>
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <memory>

#include "perfusion/image_io.h"
#include "perfusion/pipeline.h"
#include "perfusion/shapes_world.h"
#include "perfusion/trainer.h"

namespace perfusion {

std::shared_ptr<StableDiffusion>& Model() {
  static std::shared_ptr<StableDiffusion> m = [] {
    const char* env = std::getenv("PERFUSION_TINY_MODEL");
    ModelDirOptions o;
    o.tokenizer_dir = std::string(PERFUSION_SHARED_DIR) + "/data/clip";
    return LoadModelDir(env ? env : std::string(PERFUSION_SOURCE_DIR) + "/models/tiny", o);
  }();
  return m;
}

// K concepts shaped for the model (values do not change the cost).
std::map<std::string, ConceptRef> Concepts(int64_t K) {
  std::map<std::string, ConceptRef> out;
  const auto layers = Model()->unet->cross_attention_layers();
  at::manual_seed(1);
  for (int64_t k = 0; k < K; ++k) {
    auto c = std::make_shared<Concept>();
    c->name = "c" + std::to_string(k);
    c->superclass = "star";
    c->superclass_token_id = *Model()->tokenizer->SingleTokenId("star");
    c->base_model_id = Model()->model_id;
    for (const auto& l : layers) c->layers.push_back({l.name, l.to_v->weight.size(0)});
    const int64_t D = Model()->text_dim();
    c->embedding = at::randn({D});
    c->i_star = at::randn({D}) * 3;
    c->i_sup = at::randn({D}) * 3;
    c->v_targets = at::randn({c->total_out_dim()});
    out[c->name] = {c, {0.7, 0.15}, false};
  }
  return out;
}

std::string Prompt(int64_t K) {
  std::string p = "a photo of";
  for (int64_t k = 0; k < K; ++k) p += (k ? " and a <c" : " a <c") + std::to_string(k) + ">";
  return K == 0 ? p + " a star and a heart and a circle" : p + " on a blue background";
}

void BM_Generate(benchmark::State& state) {
  Pipeline pipe(Model());
  GenerationRequest r;
  r.prompt = Prompt(state.range(0));
  r.concepts = Concepts(state.range(0));
  r.steps = 20;
  for (auto _ : state) benchmark::DoNotOptimize(pipe.Generate({r}));
}

void BM_GenerateRegions(benchmark::State& state) {
  Pipeline pipe(Model());
  GenerationRequest r;
  r.prompt = Prompt(2);
  r.concepts = Concepts(2);
  r.steps = 20;
  const int64_t R = state.range(0);
  for (int64_t j = 0; j < R; ++j) {
    r.regions.push_back({"a small <c" + std::to_string(j % 2) + ">", static_cast<double>(j) / R, 0,
                         static_cast<double>(j + 1) / R, 1});
  }
  for (auto _ : state) benchmark::DoNotOptimize(pipe.Generate({r}));
}

void BM_PromptKV(benchmark::State& state) {
  Pipeline pipe(Model());
  auto concepts = Concepts(state.range(0));
  const std::string prompt = Prompt(state.range(0));
  for (auto _ : state) benchmark::DoNotOptimize(pipe.PromptKV(prompt, concepts));
}

void BM_TrainConcept(benchmark::State& state) {
  std::vector<at::Tensor> images;
  for (const auto& s : RenderConcept(FindConcept("checker_star"), 8, 1, 32)) images.push_back(ImageToTensor(s.image));
  TrainOptions o;
  o.name = "bench";
  o.superclass = "star";
  o.steps = 400;
  for (auto _ : state) benchmark::DoNotOptimize(TrainConcept(*Model(), images, o));
}

BENCHMARK(BM_Generate)->Arg(0)->Arg(1)->Arg(4)->Unit(benchmark::kMillisecond)->MinTime(2);
BENCHMARK(BM_GenerateRegions)->Arg(0)->Arg(2)->Arg(4)->Unit(benchmark::kMillisecond)->MinTime(2);
BENCHMARK(BM_PromptKV)->Arg(0)->Arg(1)->Arg(4)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_TrainConcept)->Unit(benchmark::kSecond)->Iterations(1);

}  // namespace perfusion

BENCHMARK_MAIN();

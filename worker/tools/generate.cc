// perfusion-generate: text-to-image with Perfusion concepts on a local model, for research without
// the server. Writes PNGs.
//
//   perfusion-generate "a photo of <checker> on a red background" --concept checker.concept -o out/
//       [--concept b.concept] [--n 4 --steps 30 --guidance 7.5 --seed 1 --beta 0.7 --tau 0.15
//        --global-lock --sampler ddim|euler --region BOX:PROMPT ...]
//
// A concept is referenced in the prompt by the name stored in its blob (<name>). Files are
// <out>/<seed>_<i>.png (i = 0..n-1), plus <out>/<seed>_grid.png with --grid. Progress: a bar on
// stderr (denoising step / total).
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "client/region_spec.h"
#include "perfusion/concept.h"
#include "perfusion/image_io.h"
#include "perfusion/model_dir.h"
#include "perfusion/pipeline.h"
#include "perfusion/plot.h"
#include "perfusion/safetensors.h"
#include "tools/tool_args.h"
#include "tools/tool_device.h"
#include "tools/tool_files.h"

using namespace perfusion;

namespace {

struct Args {
  std::string prompt;
  std::vector<std::string> concepts;
  std::string out = ".";
  std::string model = "models/tiny";
  std::string tokenizer_dir = std::string(PERFUSION_DEFAULT_SHARED) + "/data/clip";
  std::string negative;
  int64_t n = 4, steps = 30;
  double guidance = 7.5;
  double guidance_rescale = 0.0;
  uint64_t seed = 1;
  std::optional<double> beta, tau;  // unset: each concept's stored default
  std::optional<bool> global_lock;  // unset: the model's default (perfusion/inference.json)
  bool exact = false;
  bool grid = false;
  std::string sampler = "ddim";
  int64_t width = 0, height = 0;
  int threads = 0;
  c10::Device device = c10::Device(c10::kCPU);
  bool quiet = false;
  bool show_gates = false;
  std::vector<PromptRegion> regions;
};

PromptRegion ParseRegion(const std::string& spec) {
  RegionText text;
  if (std::string error = ParseRegionText(spec, &text); !error.empty()) throw ToolUsageError(error);
  return {text.prompt, text.box[0], text.box[1], text.box[2], text.box[3]};
}

void Usage() {
  std::printf(
      "perfusion-generate: generate images with Perfusion concepts\n\n"
      "usage: perfusion-generate \"PROMPT with <name>\" --concept FILE [--concept FILE] -o DIR [options]\n\n"
      "  PROMPT                text; <name> refers to a concept loaded with --concept (by its stored name)\n"
      "  --concept FILE        a concept blob (repeatable)\n"
      "  -o, --out DIR         output folder (default .); files <seed>_<i>.png\n"
      "  --model DIR           base model folder (default models/tiny)\n"
      "  --tokenizer-dir DIR   CLIP vocab.json + merges.txt if the model has none (default ../shared/data/clip)\n"
      "  --n N                 images (default 4)\n"
      "  --steps N             denoising steps (default 30)\n"
      "  --guidance X          classifier-free guidance scale (default 7.5; <= 1 disables)\n"
      "  --guidance-rescale X  rescale the guided prediction to the conditional one's std, weight X in\n"
      "                        [0, 1] (default 0; 0.7 suits zero-terminal-SNR models)\n"
      "  --seed S              noise seed (default 1)\n"
      "  --negative TEXT       negative prompt (default: none)\n"
      "  --beta X --tau X      gate threshold / temperature for every concept (default: each concept's own)\n"
      "  --global-lock         global key-locking (keys of the superclass prompt); --local-lock: local\n"
      "                        (default: the model's perfusion/inference.json; local if it names none)\n"
      "  --exact               exact multi-concept edit (C^-1-orthogonal projection) instead of the sum\n"
      "  --sampler ddim|euler  (default ddim)\n"
      "  --width N --height N  image size (default: the model's)\n"
      "  --grid                also write <seed>_grid.png with all images\n"
      "  --threads N           LibTorch threads (default: all cores)\n"
      "  --device D            cpu (default), cuda or cuda:N (needs a CUDA LibTorch build)\n"
      "  --quiet               no progress bar\n"
      "  --show-gates          print each token's gate per concept (where each edit acts) on stderr, for the\n"
      "                        prompt and each region\n"
      "  --region BOX:PROMPT   regional prompt (repeatable, up to 8): inside BOX the denoiser follows PROMPT\n"
      "                        instead of the main prompt (one more UNet pass per region). BOX: x0,y0,x1,y1\n"
      "                        in fractions of the image, or left|right|top|bottom|top_left|top_right|\n"
      "                        bottom_left|bottom_right. Places concepts: \"a <a> to the left of a <b>\"\n"
      "                        --region \"left:a small <a> on the left\" --region \"right:a small <b> on the right\"\n");
}

// One line per prompt token, then the end-of-text padding summarised: the gate of every concept
// (V projections; K too under global key-locking, where the key input differs).
void PrintGates(const Pipeline& pipe, const GenerationRequest& req, const std::string& prompt,
                const std::string& what) {
  const PromptGates pg = pipe.Gates(prompt, req.concepts, req.multi_concept_mode);
  if (!pg.value_gate.defined()) {
    std::fprintf(stderr, "gates of %s: it uses no concept\n", what.c_str());
    return;
  }
  const auto& names = pg.tokens.concepts;
  const int64_t vocab = pipe.model().text_encoder->options().vocab_size();
  const ClipTokenizer& tok = *pipe.model().tokenizer;
  bool global = false;
  for (const auto& [name, ref] : req.concepts) global = global || ref.global_key_lock;
  std::fprintf(stderr, "gates of %s (V%s) per token:\n  %-4s %-22s", what.c_str(), global ? ", K in brackets" : "",
               "pos", "token");
  for (const auto& n : names) std::fprintf(stderr, " %12s", ("<" + n + ">").substr(0, 12).c_str());
  std::fprintf(stderr, "\n");
  auto row = [&](const std::string& label, const std::string& pos, const at::Tensor& v, const at::Tensor& k) {
    std::fprintf(stderr, "  %-4s %-22s", pos.c_str(), label.substr(0, 22).c_str());
    for (size_t c = 0; c < names.size(); ++c) {
      if (global) {
        std::fprintf(stderr, "  %5.3f[%5.3f]", v[c].item<float>(), k[c].item<float>());
      } else {
        std::fprintf(stderr, " %12.3f", v[c].item<float>());
      }
    }
    std::fprintf(stderr, "\n");
  };
  const int64_t n_tokens = static_cast<int64_t>(pg.tokens.ids.size());
  int64_t first_pad = n_tokens;
  for (int64_t n = 1; n < n_tokens; ++n) {
    if (pg.tokens.ids[n] == tok.eos_id()) {
      first_pad = n;
      break;
    }
  }
  for (int64_t n = 0; n < std::min(first_pad + 1, n_tokens); ++n) {
    const int64_t id = pg.tokens.ids[n];
    const std::string label = id >= vocab ? "<" + names[id - vocab] + ">" : tok.IdToToken(id);
    row(label, std::to_string(n), pg.value_gate[n], pg.key_gate[n]);
  }
  if (first_pad + 1 < n_tokens) {
    const at::Tensor v = pg.value_gate.slice(0, first_pad + 1), k = pg.key_gate.slice(0, first_pad + 1);
    row("padding, max", std::to_string(first_pad + 1) + "+", std::get<0>(v.max(0)), std::get<0>(k.max(0)));
    row("padding, mean", "", v.mean(0), k.mean(0));
  }
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  if (auto code = ParseToolArgs(argc, argv, Usage, [&](const std::string& k, const NextValue& v) {
      if (k == "--concept") a.concepts.push_back(v());
      else if (k == "-o" || k == "--out") a.out = v();
      else if (k == "--model") a.model = v();
      else if (k == "--tokenizer-dir") a.tokenizer_dir = v();
      else if (k == "--n") a.n = ParseInt64(v());
      else if (k == "--steps") a.steps = ParseInt64(v());
      else if (k == "--guidance") a.guidance = ParseDouble(v());
      else if (k == "--guidance-rescale") a.guidance_rescale = ParseDouble(v());
      else if (k == "--seed") a.seed = ParseUint64(v());
      else if (k == "--negative") a.negative = v();
      else if (k == "--beta") a.beta = ParseDouble(v());
      else if (k == "--tau") a.tau = ParseDouble(v());
      else if (k == "--global-lock") a.global_lock = true;
      else if (k == "--local-lock") a.global_lock = false;
      else if (k == "--exact") a.exact = true;
      else if (k == "--sampler") a.sampler = v();
      else if (k == "--width") a.width = ParseInt64(v());
      else if (k == "--height") a.height = ParseInt64(v());
      else if (k == "--grid") a.grid = true;
      else if (k == "--threads") a.threads = ParseInt(v());
      else if (k == "--device") a.device = ParseToolDevice(v());
      else if (k == "--quiet") a.quiet = true;
      else if (k == "--show-gates") a.show_gates = true;
      else if (k == "--region") a.regions.push_back(ParseRegion(v()));
      else if (!k.empty() && k[0] == '-') return false;
      else if (a.prompt.empty()) a.prompt = k;
      else throw ToolUsageError("unexpected argument '" + k + "': quote the prompt (see --help)");
      return true;
    })) {
    return *code;
  }
  if (a.prompt.empty()) {
    std::fprintf(stderr, "need a prompt (see --help)\n");
    return 2;
  }
  try {  // the gate's ranges, as the service's (api.md)
    const GateParams defaults;
    CheckGateRange({a.beta.value_or(defaults.beta), a.tau.value_or(defaults.temperature)}, "--beta", "--tau");
  } catch (const c10::ValueError& e) {
    std::fprintf(stderr, "%s\n", e.what_without_backtrace());
    return 2;
  }
  try {
    if (a.threads > 0) at::set_num_threads(a.threads);
    MakeDirs(a.out);  // before the generation: not a failed write after it
    ModelDirOptions mo;
    mo.tokenizer_dir = a.tokenizer_dir;
    mo.device = a.device;
    auto model = LoadModelDir(a.model, mo);
    Pipeline pipe(model);
    GenerationRequest req;
    req.prompt = a.prompt;
    req.negative_prompt = a.negative;
    req.steps = a.steps;
    req.guidance_scale = a.guidance;
    req.guidance_rescale = a.guidance_rescale;
    req.seed = a.seed;
    req.num_images = a.n;
    req.sampler = a.sampler;
    req.width = a.width;
    req.height = a.height;
    req.multi_concept_mode = a.exact ? MultiConceptMode::kExact : MultiConceptMode::kApproximate;
    req.regions = a.regions;
    for (const auto& path : a.concepts) {
      auto c = std::make_shared<Concept>();
      try {
        *c = DecodeConcept(ReadFileToString(path), model->model_id);
      } catch (const c10::Error& e) {
        TORCH_CHECK_VALUE(false, path, ": ", e.what_without_backtrace());
      }
      TORCH_CHECK_VALUE(!req.concepts.count(c->name), path, ": a concept named '", c->name, "' is already loaded");
      ConceptRef ref;
      ref.concept = c;
      ref.gate = c->default_gate;
      if (a.beta) ref.gate.beta = *a.beta;
      if (a.tau) ref.gate.temperature = *a.tau;
      // A blob's own gate is checked where it is used: a blob from before the ranges were enforced
      // still works with --beta/--tau.
      CheckGateRange(ref.gate, path + ": the concept's default gate beta (give --beta)",
                     path + ": the concept's default gate temperature (give --tau)");
      ref.global_key_lock = a.global_lock.value_or(model->default_global_key_lock);
      std::fprintf(stderr, "concept <%s> (superclass '%s', beta %.2f, tau %.2f, %s key-locking)\n", c->name.c_str(),
                   c->superclass.c_str(), ref.gate.beta, ref.gate.temperature, ref.global_key_lock ? "global" : "local");
      req.concepts[c->name] = ref;
    }
    if (a.show_gates) {
      PrintGates(pipe, req, req.prompt, "the prompt");
      for (size_t j = 0; j < req.regions.size(); ++j) {
        PrintGates(pipe, req, req.regions[j].prompt, "region " + std::to_string(j));
      }
    }
    const bool tty = ::isatty(STDERR_FILENO);
    const auto t0 = std::chrono::steady_clock::now();
    ProgressFn progress = [&](int64_t step, int64_t total) {
      if (a.quiet || !tty) return true;
      constexpr int kWidth = 30;
      const int fill = static_cast<int>(kWidth * step / total);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::fprintf(stderr, "\r[%s%s] step %lld/%lld  %.1fs, ETA %.1fs   ", std::string(fill, '#').c_str(),
                   std::string(kWidth - fill, ' ').c_str(), (long long)step, (long long)total, s,
                   s / step * (total - step));
      if (step == total) std::fprintf(stderr, "\n");
      return true;
    };
    const auto result = pipe.Generate({req}, progress);
    MakeDirs(a.out);
    std::vector<Image> images;
    for (size_t i = 0; i < result[0].images.size(); ++i) {
      images.push_back(TensorToImage(result[0].images[i]));
      const std::string path = a.out + "/" + std::to_string(a.seed) + "_" + std::to_string(i) + ".png";
      WriteFileAtomically(path, EncodePng(images.back()));
      std::printf("%s\n", path.c_str());
    }
    if (a.grid) {
      GridOptions g;
      g.scale = model->image_size() <= 64 ? 4 : 1;
      const std::string path = a.out + "/" + std::to_string(a.seed) + "_grid.png";
      WriteFileAtomically(path, EncodePng(ImageGrid({images}, g)));
      std::printf("%s\n", path.c_str());
    }
    std::fprintf(stderr, "%zu image(s) in %.1f s\n", images.size(),
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    return 0;
  } catch (const CancelledError&) {
    std::fprintf(stderr, "cancelled\n");
    return 1;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}

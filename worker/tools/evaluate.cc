// perfusion-evaluate: the quality harness. Trains builtin shapes-world concepts on a model, generates
// images from held-out prompts that put each concept in a context, and scores them with the shapes
// classifier (shapes_classifier.h): concept fidelity (is it our object?) and prompt alignment (does
// the rest of the prompt hold?), the two axes of the Perfusion paper. Writes a markdown report and
// PNG grids/plots into --out. See docs/quality.md.
//
// Methods compared (same training images, seeds, prompts and noise), after two references that bound
// what any method can reach on the model:
//   render      the prompt rendered by the shapes world (a perfect model)
//   render_vae  that render encoded and decoded by the model's VAE (the best its decoder can show)
//   base        the base model with the superclass word instead of the concept (reference)
//   words       the base model with the concept's look in caption words ("pink and white angled
//               heart", ConceptInWords): what the base model draws of it from language alone, which
//               tells a trainer that misses what the model can draw from a model that cannot draw it
//   perfusion   TrainConcept + Pipeline (local key-lock), the product path
//   global      the same concept with global key-locking at inference
//   ti          embedding only (Textual Inversion): no K/V edits; only the concept embedding trains
//   nolock      Perfusion without key-locking: the K targets are learned like the V targets
//   finetune    (--finetune) the embedding and every UNet weight train, as DreamBooth does without its
//               prior-preservation loss: what this UNet can draw once any weight may change
// This tool carries its own training loop for the last three (TrainAblation, a copy of TrainConcept's
// recipe with what trains changed; TrainOptions::lock_keys alone would cover no-key-lock, not the
// other two) and its own sampling loop on precomputed K/V (SampleWithKV, checked against
// Pipeline::Generate at start), which takes plain projections for embedding-only and a fine-tuned
// UNet for finetune as easily as learned K targets; see docs/quality.md.
// Two concepts in one prompt are scored the same way, with the same two references (both concepts
// rendered where the prompt puts them, and that render through the VAE).
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/optim/adamw.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "client/region_spec.h"
#include "perfusion/concept_token.h"
#include "perfusion/image_io.h"
#include "perfusion/model_dir.h"
#include "perfusion/pipeline.h"
#include "perfusion/plot.h"
#include "perfusion/rank1_edit.h"
#include "perfusion/safetensors.h"
#include "perfusion/scheduler.h"
#include "perfusion/shapes_classifier.h"
#include "perfusion/shapes_world.h"
#include "perfusion/trainer.h"
#include "tools/tool_args.h"
#include "tools/tool_device.h"
#include "tools/tool_files.h"

using namespace perfusion;
using Clock = std::chrono::steady_clock;

namespace {

// ---- Arguments ------------------------------------------------------------------------------------

struct Args {
  std::string model = "models/tiny";
  std::string classifier;  // default <model>/eval/classifier.safetensors
  std::string out = "quality-report";
  std::string tokenizer_dir = std::string(PERFUSION_DEFAULT_SHARED) + "/data/clip";
  std::string concepts = "all";
  int images = 8;
  int64_t steps = 400;
  int64_t batch = 4;
  double ti_lr = 0;  // 0 = the trainer's lr_embedding
  int per_prompt = 6;
  int64_t gen_steps = 30;
  double guidance = 7.5;
  double guidance_rescale = 0.0;
  bool edit_uncond = true;  // GenerationRequest::edit_unconditional for the Pipeline's methods
  bool seen_contexts = false;  // training renders may show a held-out prompt's context (before session 13)
  std::string sampler = "ddim";
  uint64_t seed = 1;
  std::vector<uint64_t> more_seeds;  // --seeds beyond the first: repeat training and scoring
  std::string sweep_concept;  // default: the first concept
  std::vector<double> betas = {0.5, 0.6, 0.7, 0.8, 0.9};
  std::vector<double> taus = {0.05, 0.15, 0.3};
  std::vector<std::string> sweep_locks = {"local", "global"};
  bool ablations = true;
  bool captions = false;  // train with each render's full caption instead of the templates
  bool finetune = false;
  double finetune_lr = 5e-5;
  bool sweep = true;
  int threads = 0;
  c10::Device device = c10::Device(c10::kCPU);
};

void Usage() {
  std::printf(
      "perfusion-evaluate: train builtin concepts, generate from held-out prompts, score with the classifier\n\n"
      "  --model DIR           model folder (default models/tiny)\n"
      "  --classifier PATH     shapes classifier (default <model>/eval/classifier.safetensors)\n"
      "  --out DIR             report folder: report.md + PNGs (default quality-report)\n"
      "  --tokenizer-dir DIR   CLIP vocab.json + merges.txt (default ../shared/data/clip)\n"
      "  --concepts LIST       comma-separated builtin concepts or 'all' (default all: checker_star,\n"
      "                        candy_heart, target_circle, zigzag_square)\n"
      "  --images N            training renders per concept (default 8)\n"
      "  --steps N             training steps per concept and method (default 400); --batch N (default 4)\n"
      "  --ti-lr X             embedding learning rate of the embedding-only ablation (default: the trainer's)\n"
      "  --per-prompt M        images per held-out prompt (default 6)\n"
      "  --gen-steps N         sampling steps (default 30); --guidance X (default 7.5); --sampler ddim|euler\n"
      "  --guidance-rescale X  guidance rescale phi in [0, 1] (default 0)\n"
      "  --seed S              everything derives from it (default 1)\n"
      "  --seeds LIST          several seeds, e.g. 1,2,3: the first makes the detailed report as --seed;\n"
      "                        each further one renders, trains and scores every concept and method\n"
      "                        again (no sweep, no two-concept test), and the report adds the spread\n"
      "                        across seeds. One training run is a noisy measure: compare methods or\n"
      "                        models on 3 seeds or more\n"
      "  --sweep-concept NAME  concept of the beta/tau sweep (default: the first)\n"
      "  --betas LIST          sweep betas (default 0.5,0.6,0.7,0.8,0.9)\n"
      "  --taus LIST           sweep temperatures (default 0.05,0.15,0.3)\n"
      "  --sweep-locks LIST    key-locking modes swept: local, global or both (default local,global)\n"
      "  --no-ablations        skip the embedding-only and no-key-lock methods\n"
      "  --captions            train every method with each training render's full caption (\"a small {}\n"
      "                        in the top left on a blue background\") instead of the templates\n"
      "  --finetune            add a full fine-tune: the concept embedding and every UNet weight train\n"
      "                        (DreamBooth without prior preservation; --finetune-lr X, default 5e-5).\n"
      "                        It shows what this UNet can draw once any weight may change\n"
      "  --no-sweep            skip the beta/tau sweep\n"
      "  --no-edit-uncond      Perfusion, no-key-lock and the sweep leave the unconditional half of guidance\n"
      "                        to the base model (the default edits it with the prompt's locally\n"
      "                        key-locked concepts, GenerationRequest::edit_unconditional, spec 5.5)\n"
      "  --seen-contexts       let training renders show a held-out prompt's context (every attribute it\n"
      "                        states); by default such renders are redrawn, so held-out prompts are\n"
      "                        new contexts. This gives the training renders of the figures published\n"
      "                        before session 13\n"
      "  --threads N           LibTorch threads (default: all cores)\n"
      "  --device D            cpu (default), cuda or cuda:N: where the model and the classifier run. Noise\n"
      "                        and batches are drawn on the CPU, so a seed means the same draws anywhere\n");
}

std::vector<double> ParseDoubles(const std::string& s) {
  std::vector<double> out;
  for (const auto& item : SplitList(s)) out.push_back(ParseDouble(item));
  return out;
}

// ---- Small utilities ------------------------------------------------------------------------------

const auto g_start = Clock::now();
double Elapsed() { return std::chrono::duration<double>(Clock::now() - g_start).count(); }

void Log(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void Log(const char* fmt, ...) {
  const int s = static_cast<int>(Elapsed());
  std::printf("[evaluate %02d:%02d] ", s / 60, s % 60);
  va_list ap;
  va_start(ap, fmt);
  std::vprintf(fmt, ap);
  va_end(ap);
  std::printf("\n");
  std::fflush(stdout);
}

void WritePng(const std::string& path, const Image& im) { WriteFileAtomically(path, EncodePng(im)); }

std::string Pct(double x) {
  char b[32];
  std::snprintf(b, sizeof(b), "%.0f%%", 100 * x);
  return b;
}
std::string Fmt(double x, int decimals = 2) {
  char b[32];
  std::snprintf(b, sizeof(b), "%.*f", decimals, x);
  return b;
}

double ColorDistance(Color a, Color b) {
  const auto x = ColorRgb(a), y = ColorRgb(b);
  double s = 0;
  for (int i = 0; i < 3; ++i) s += (double(x[i]) - y[i]) * (double(x[i]) - y[i]);
  return std::sqrt(s);
}

// Backgrounds that contrast with every listed concept colour (in a fixed order).
std::vector<Color> ContrastingBackgrounds(const std::vector<Color>& colors) {
  const Color order[] = {Color::kBlue,   Color::kGreen, Color::kBlack, Color::kWhite, Color::kPurple, Color::kYellow,
                         Color::kRed,    Color::kOrange, Color::kGray, Color::kPink,  Color::kBrown};
  std::vector<Color> out;
  for (Color c : order) {
    if (std::all_of(colors.begin(), colors.end(), [&](Color x) { return ColorDistance(c, x) >= 110; })) out.push_back(c);
  }
  return out;
}

// ---- Held-out prompts -----------------------------------------------------------------------------

struct EvalPrompt {
  std::string text;  // with <name> for the concept
  std::optional<Color> background;
  std::optional<Position> position;
  std::optional<Size> size;
};

// Prompts that put the concept in a context. The training renders avoid them (TrainingRenders):
// no training image shows every attribute a held-out prompt states. ("small" and "large" also occur
// in two of the trainer's templates, paired with renders of either size.)
std::vector<EvalPrompt> HeldOutPrompts(const ConceptSpec& c) {
  const auto bgs = ContrastingBackgrounds({c.color, c.color2});
  TORCH_CHECK(bgs.size() >= 3, "no three backgrounds contrast with concept ", c.name);
  const std::string ref = "<" + c.name + ">";
  auto on = [](Color bg) { return " on a " + ColorName(bg) + " background"; };
  return {
      {"a " + ref + on(bgs[0]), bgs[0], std::nullopt, std::nullopt},
      {"a small " + ref + " " + PositionPhrase(Position::kTopLeft), std::nullopt, Position::kTopLeft, Size::kSmall},
      {"a large " + ref + " " + PositionPhrase(Position::kBottom), std::nullopt, Position::kBottom, Size::kLarge},
      {"a small " + ref + " " + PositionPhrase(Position::kRight) + on(bgs[1]), bgs[1], Position::kRight, Size::kSmall},
      {"a large " + ref + " " + PositionPhrase(Position::kCenter) + on(bgs[2]), bgs[2], Position::kCenter, Size::kLarge},
  };
}

// Whether `scene` (its first object and background) shows every attribute prompt `p` states.
bool ShowsContext(const SceneSpec& scene, const EvalPrompt& p) {
  const ObjectSpec& o = scene.objects.at(0);
  return (!p.background || scene.background == *p.background) && (!p.position || o.position == *p.position) &&
         (!p.size || o.size == *p.size);
}

// The concept's training renders, as RenderConcept draws them, except that a render showing a
// held-out prompt's context is skipped for the next draw: held-out prompts then ask for contexts
// the training images never had. (Before session 13 they could: 31 % of the renders of seeds 1-3
// sat on a held-out background, and one was a held-out prompt exactly.) keep_out false: RenderConcept.
std::vector<Sample> TrainingRenders(const ConceptSpec& c, int n, uint64_t seed, const std::vector<EvalPrompt>& held_out,
                                    bool keep_out) {
  if (!keep_out) return RenderConcept(c, n, seed, 32);
  std::vector<Sample> out;
  for (uint64_t i = 0; static_cast<int>(out.size()) < n; ++i) {
    TORCH_CHECK(i < 100000, "no training render of ", c.name, " avoids the held-out contexts");
    const uint64_t item_seed = DeriveSeed(seed, i);  // RenderConcept's draw i
    Sample s;
    s.scene = SampleConceptScene(c, item_seed);
    if (std::any_of(held_out.begin(), held_out.end(), [&](const EvalPrompt& p) { return ShowsContext(s.scene, p); })) {
      continue;
    }
    SplitMix64 rng(DeriveSeed(item_seed, 0xca97));
    s.caption = Caption(s.scene, rng.UniformInt(NumCaptionTemplates(s.scene)));
    s.image = Render(s.scene, 32);
    out.push_back(std::move(s));
  }
  return out;
}

std::string ReplaceAll(std::string s, const std::string& from, const std::string& to) {
  for (size_t p = s.find(from); p != std::string::npos; p = s.find(from, p + to.size())) s.replace(p, from.size(), to);
  return s;
}

// ---- Scoring --------------------------------------------------------------------------------------

struct Score {
  int n = 0, fidelity = 0, aligned = 0;
  int both = 0;  // images that are faithful and aligned at once
  int bg_n = 0, bg_ok = 0, pos_n = 0, pos_ok = 0, size_n = 0, size_ok = 0;
  double similarity = 0;  // sum of feature cosine similarities
  void Add(const Score& o) {
    n += o.n, fidelity += o.fidelity, aligned += o.aligned, both += o.both, bg_n += o.bg_n, bg_ok += o.bg_ok, pos_n += o.pos_n;
    pos_ok += o.pos_ok, size_n += o.size_n, size_ok += o.size_ok, similarity += o.similarity;
  }
  double Fidelity() const { return n ? double(fidelity) / n : 0; }
  double Alignment() const { return n ? double(aligned) / n : 0; }
  double Both() const { return n ? double(both) / n : 0; }
  double Similarity() const { return n ? similarity / n : 0; }
  static double Frac(int a, int b) { return b ? double(a) / b : std::nan(""); }
};

Score ScoreImages(const std::vector<AttributePrediction>& preds, const EvalPrompt& p, int concept_index,
                  const at::Tensor& reference) {
  Score s;
  for (const auto& x : preds) {
    ++s.n;
    const bool faithful = ShowsConcept(x, concept_index);
    s.fidelity += faithful;
    s.similarity += FeatureSimilarity(x.features, reference);
    bool ok = true;
    if (p.background) {
      const bool r = x.label[static_cast<int>(Head::kBackground)] == static_cast<int>(*p.background);
      ++s.bg_n, s.bg_ok += r, ok &= r;
    }
    if (p.position) {
      const bool r = x.label[static_cast<int>(Head::kPosition)] == static_cast<int>(*p.position);
      ++s.pos_n, s.pos_ok += r, ok &= r;
    }
    if (p.size) {
      const bool r = x.label[static_cast<int>(Head::kSize)] == static_cast<int>(*p.size);
      ++s.size_n, s.size_ok += r, ok &= r;
    }
    s.aligned += ok;
    s.both += faithful && ok;
  }
  return s;
}

at::Tensor StackImages(const std::vector<at::Tensor>& images) { return at::stack(images); }

// ---- Ablation training and sampling -----------------------------------------------------------------

enum class Ablation { kEmbeddingOnly, kNoKeyLock, kFullFinetune };

struct AblationConcept {
  std::shared_ptr<Concept> concept;      // embedding, i*, V targets (zero without edits)
  std::vector<at::Tensor> k_targets;     // per layer [O] (no-key-lock only)
  std::vector<at::Tensor> unet_weights;  // the fine-tuned UNet's parameters (full fine-tune only)
};

// Keeps a copy of some parameters (values and requires_grad) and puts it back when it goes out of
// scope, however it is left: the full fine-tune trains, and generates with, the model's own UNet.
class ParamsRestorer {
 public:
  explicit ParamsRestorer(std::vector<at::Tensor> params) : params_(std::move(params)) {
    for (const auto& p : params_) {
      saved_.push_back(p.detach().clone());
      requires_grad_.push_back(p.requires_grad());
    }
  }
  ~ParamsRestorer() {
    torch::NoGradGuard ng;
    for (size_t i = 0; i < params_.size(); ++i) {
      params_[i].detach().copy_(saved_[i]);
      params_[i].set_requires_grad(requires_grad_[i]);
    }
  }
  // Overwrites the parameters with `weights` (one tensor per parameter, in order) until then.
  void Load(const std::vector<at::Tensor>& weights) {
    TORCH_CHECK(weights.size() == params_.size(), "ParamsRestorer: ", weights.size(), " tensors for ", params_.size(),
                " parameters");
    torch::NoGradGuard ng;
    for (size_t i = 0; i < params_.size(); ++i) params_[i].detach().copy_(weights[i]);
  }
  ParamsRestorer(const ParamsRestorer&) = delete;
  ParamsRestorer& operator=(const ParamsRestorer&) = delete;

 private:
  std::vector<at::Tensor> params_, saved_;
  std::vector<bool> requires_grad_;
};

// TrainConcept's recipe (templates, flips, masked epsilon loss, AdamW groups, EMA of i*) with the
// edits changed: kEmbeddingOnly runs the plain K/V projections and trains only the embedding;
// kNoKeyLock trains the K targets exactly like the V targets (is_key_proj = false, in the values group);
// kFullFinetune runs the plain projections and trains the embedding and every UNet weight (at
// lr_unet), then puts the UNet's own weights back: the tuned ones are returned in unet_weights.
AblationConcept TrainAblation(StableDiffusion& model, const std::vector<at::Tensor>& images, const TrainOptions& o,
                              Ablation which, double lr_embedding, double lr_unet = 0) {
  const int64_t superclass_id = *model.tokenizer->SingleTokenId(o.superclass);
  const LatentPrompts prompts_of = EncodeLatentPrompts(*model.tokenizer, o, images.size(), /*flips=*/2);
  const int64_t size = model.image_size(), f = model.vae->downsample_factor();
  const auto dev = model.device;
  std::vector<at::Tensor> latents, masks;
  {
    torch::NoGradGuard ng;
    for (const auto& image : images) {
      at::Tensor img = CenterCropResize(image.to(at::kFloat), static_cast<int>(size));
      for (int flip = 0; flip < 2; ++flip) {
        at::Tensor im = flip ? img.flip({2}) : img;
        latents.push_back(model.vae->encode(im.unsqueeze(0).to(dev)).mode().to(at::kFloat) * model.vae->scaling_factor());
        masks.push_back(ForegroundMask(im, f, o.mask_min, o.mask_distance).to(dev));
      }
    }
  }
  ConceptToken token(model.text_encoder->token_embedding_weight(), superclass_id);
  const auto layers = model.unet->cross_attention_layers();
  std::vector<Rank1Edit> k_edits, v_edits;
  std::vector<at::Tensor> target_params;
  if (which == Ablation::kNoKeyLock) {
    for (const auto& layer : layers) {
      k_edits.emplace_back(layer.to_k->weight, model.c_inv, Rank1EditOptions(o.edit).is_key_proj(false));
      v_edits.emplace_back(layer.to_v->weight, model.c_inv, Rank1EditOptions(o.edit).is_key_proj(false));
      target_params.push_back(k_edits.back()->o_star());
      target_params.push_back(v_edits.back()->o_star());
    }
  }
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<at::Tensor>{token->embedding()},
                      std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(lr_embedding).weight_decay(o.weight_decay)));
  if (!target_params.empty()) {
    groups.emplace_back(target_params, std::make_unique<torch::optim::AdamWOptions>(
                                           torch::optim::AdamWOptions(o.lr_values).weight_decay(o.weight_decay)));
  }
  std::vector<at::Tensor> unet_params;
  std::optional<ParamsRestorer> restore_unet;  // the base UNet comes back when this function returns
  if (which == Ablation::kFullFinetune) {
    unet_params = model.unet->parameters();
    restore_unet.emplace(unet_params);
    for (auto& p : unet_params) p.set_requires_grad(true);
    groups.emplace_back(unet_params, std::make_unique<torch::optim::AdamWOptions>(
                                         torch::optim::AdamWOptions(lr_unet).weight_decay(o.weight_decay)));
  }
  torch::optim::AdamW optimizer(std::move(groups));
  DDPMScheduler ddpm(model.scheduler);
  at::Generator gen = MakeGenerator(o.seed);
  const int64_t B = o.batch_size;
  at::Tensor last_X;
  at::Tensor last_index;
  TrainProgress p;
  p.total = o.steps;
  const auto start = Clock::now();
  for (int64_t step = 1; step <= o.steps; ++step) {
    const at::Tensor pick = at::randint(static_cast<int64_t>(latents.size()), {B}, gen, at::TensorOptions().dtype(at::kLong));
    const at::Tensor tmpl = at::randint(static_cast<int64_t>(prompts_of.max_prompts), {B}, gen, at::TensorOptions().dtype(at::kLong));
    std::vector<at::Tensor> lat, msk;
    std::vector<int64_t> ids;
    for (int64_t b = 0; b < B; ++b) {
      lat.push_back(latents[pick[b].item<int64_t>()]);
      msk.push_back(masks[pick[b].item<int64_t>()]);
      const auto& pid = prompts_of.Pick(pick[b].item<int64_t>(), tmpl[b].item<int64_t>());
      ids.insert(ids.end(), pid.begin(), pid.end());
    }
    const at::Tensor x0 = at::cat(lat);
    const at::Tensor mask = at::stack(msk).unsqueeze(1);
    const ConceptPromptBatch prompts = token->forward(at::tensor(ids, at::TensorOptions().dtype(at::kLong)).reshape({B, -1}).to(dev));
    const at::Tensor X = model.text_encoder->forward_embeds(prompts.concept_embeds);
    std::vector<CrossAttnKV> kv;
    if (which != Ablation::kNoKeyLock) {
      kv = model.unet->precompute_kv(X);
    } else {
      at::Tensor X_sup;
      {
        torch::NoGradGuard ng;
        X_sup = model.text_encoder->forward_embeds(prompts.superclass_embeds);
      }
      for (size_t l = 0; l < layers.size(); ++l) {
        kv.push_back({k_edits[l]->training_forward(X, X_sup, prompts.concept_index),
                      v_edits[l]->training_forward(X, X_sup, prompts.concept_index)});
      }
    }
    const at::Tensor noise = ddpm.sample_noise(x0, gen);  // drawn on the CPU generator, as TrainConcept
    const at::Tensor t = ddpm.sample_timesteps(B, gen, dev);
    const at::Tensor pred = model.unet->forward(ddpm.add_noise(x0, noise, t), t, kv);
    const at::Tensor loss = ((pred - ddpm.training_target(x0, noise, t)).pow(2) * mask).mean() / mask.mean();
    optimizer.zero_grad();
    loss.backward();
    optimizer.step();
    last_X = X.detach();
    last_index = prompts.concept_index;
    p.step = step;
    p.loss = loss.item<double>();
    p.loss_ema = step == 1 ? p.loss : 0.95 * p.loss_ema + 0.05 * p.loss;
    p.elapsed_s = std::chrono::duration<double>(Clock::now() - start).count();
    p.eta_s = p.elapsed_s / step * (o.steps - step);
    if (o.progress) o.progress(p);
  }
  AblationConcept out;
  for (const auto& p : unet_params) out.unet_weights.push_back(p.detach().clone());
  auto c = std::make_shared<Concept>();
  c->name = o.name;
  c->superclass = o.superclass;
  c->superclass_token_id = superclass_id;
  c->base_model_id = model.model_id;
  c->default_gate = o.default_gate;
  std::vector<at::Tensor> v;
  for (size_t l = 0; l < layers.size(); ++l) {
    c->layers.push_back({layers[l].name, layers[l].to_v->weight.size(0)});
    if (which == Ablation::kNoKeyLock) {
      v.push_back(v_edits[l]->o_star().detach()[0].clone());
      out.k_targets.push_back(k_edits[l]->o_star().detach()[0].clone());
    } else {
      v.push_back(at::zeros({layers[l].to_v->weight.size(0)}, at::TensorOptions().device(dev)));
    }
  }
  c->v_targets = at::cat(v);
  c->embedding = token->embedding().detach().clone();
  if (which == Ablation::kNoKeyLock) {
    c->i_star = v_edits[0]->i_star()[0].clone();
    c->i_sup = v_edits[0]->i_sup()[0].clone();
  } else {
    // Not used without edits; the concept token's last encoding, so the struct is complete.
    const at::Tensor batch = at::arange(last_X.size(0), at::TensorOptions().dtype(at::kLong).device(dev));
    c->i_star = last_X.index({batch, last_index}).mean(0);
    c->i_sup = c->i_star.clone();
  }
  c->info["method"] = which == Ablation::kNoKeyLock      ? "no-key-lock"
                      : which == Ablation::kFullFinetune ? "full-finetune"
                                                         : "embedding-only";
  c->info["final_loss"] = std::to_string(p.loss_ema);
  out.concept = c;
  return out;
}

// Cross-attention K/V of one prompt for an ablation concept.
std::vector<CrossAttnKV> AblationKV(const Pipeline& pipe, const std::string& prompt, const AblationConcept& ac,
                                    Ablation which, const GateParams& gate, bool edit_without_token = false) {
  c10::InferenceMode guard;
  StableDiffusion& m = pipe.model();
  std::map<std::string, ConceptRef> refs;
  refs[ac.concept->name].concept = ac.concept;
  const PromptTokens t = pipe.Tokenize(prompt, refs);
  const at::Tensor ids = at::tensor(t.ids, at::TensorOptions().dtype(at::kLong)).reshape({1, -1}).to(m.device);
  const at::Tensor X = m.text_encoder->forward_embeds(
      EmbedWithConcepts(m.text_encoder->token_embedding_weight(), ids, ac.concept->embedding.unsqueeze(0)));
  // edit_without_token: the unconditional half of guidance ("" has no concept token), which the
  // pipeline edits with a prompt's locally key-locked concepts (spec 5.5); the gates stay near 0
  // there but the erase term acts on every token.
  if (which != Ablation::kNoKeyLock || (t.concepts.empty() && !edit_without_token)) return m.unet->precompute_kv(X);
  const auto layers = m.unet->cross_attention_layers();
  const at::Tensor I = ac.concept->i_star.unsqueeze(0);
  const ConceptGates g = ComputeConceptGates(X, I, m.c_inv, {gate});
  std::vector<CrossAttnKV> kv;
  for (size_t l = 0; l < layers.size(); ++l) {
    kv.push_back({ApplyRank1Edit(X, layers[l].to_k->weight, I, ac.k_targets[l].unsqueeze(0), g),
                  ApplyRank1Edit(X, layers[l].to_v->weight, I, ac.concept->v_target(l).unsqueeze(0), g)});
  }
  return kv;
}

// The pipeline's sampling loop for precomputed K/V: request r gets counts[r] images from noise drawn
// with its seed exactly as Pipeline::Generate draws it, so methods compare on the same noise.
std::vector<std::vector<at::Tensor>> SampleWithKV(const Pipeline& pipe, const std::vector<std::vector<CrossAttnKV>>& cond,
                                                  const std::vector<uint64_t>& seeds, int64_t n, int64_t steps,
                                                  double guidance, double guidance_rescale,
                                                  const std::string& sampler_name,
                                                  const std::vector<CrossAttnKV>* uncond_kv = nullptr) {
  c10::InferenceMode guard;
  StableDiffusion& m = pipe.model();
  const int64_t f = m.vae->downsample_factor(), H = m.image_size(), C = m.latent_channels();
  // The unconditional half: the base model's, or (uncond_kv) one given for every request.
  const std::vector<CrossAttnKV> uncond = uncond_kv != nullptr ? *uncond_kv : pipe.PromptKV("", {});
  std::vector<at::Tensor> noise;
  for (uint64_t s : seeds) {
    for (int64_t k = 0; k < n; ++k) {  // image k of a request: seed + k, as Pipeline::Generate draws it
      at::Generator gen = MakeGenerator(s + static_cast<uint64_t>(k));
      noise.push_back(at::randn({1, C, H / f, H / f}, gen, at::TensorOptions().dtype(at::kFloat)));
    }
  }
  const bool cfg = guidance > 1.0;
  const size_t R = cond.size();
  std::vector<CrossAttnKV> kv(cond[0].size());
  for (size_t l = 0; l < kv.size(); ++l) {
    std::vector<at::Tensor> ks, vs;
    for (int pass = cfg ? 0 : 1; pass < 2; ++pass) {
      for (size_t r = 0; r < R; ++r) {
        const CrossAttnKV& src = pass == 0 ? uncond[l] : cond[r][l];
        ks.push_back(src.k.expand({n, src.k.size(1), src.k.size(2)}));
        vs.push_back(src.v.expand({n, src.v.size(1), src.v.size(2)}));
      }
    }
    kv[l] = {at::cat(ks), at::cat(vs)};
  }
  auto sampler = MakeSampler(sampler_name, m.scheduler);
  sampler->set_timesteps(steps);
  at::Tensor x = sampler->initial_latents(at::cat(noise).to(m.device));
  for (int64_t i = 0; i < sampler->num_inference_steps(); ++i) {
    at::Tensor xin = sampler->scale_model_input(x, i);
    if (cfg) xin = at::cat({xin, xin});
    at::Tensor eps = m.unet->forward(xin, sampler->timesteps()[i].expand({xin.size(0)}), kv);
    if (cfg) {
      auto parts = eps.chunk(2);
      eps = GuidedPrediction(parts[0], parts[1], at::scalar_tensor(guidance), at::scalar_tensor(guidance_rescale));
    }
    x = sampler->step(eps, i, x).prev_sample;
  }
  const at::Tensor images = m.vae->decode(x / m.vae->scaling_factor()).clamp(-1, 1).cpu();
  std::vector<std::vector<at::Tensor>> out(R);
  for (size_t r = 0; r < R; ++r) {
    for (int64_t k = 0; k < n; ++k) out[r].push_back(images[r * n + k].clone());
  }
  return out;
}

// ---- The evaluation -------------------------------------------------------------------------------

struct Method {
  std::string key, title;
};

const std::vector<Method>& Methods() {
  static const std::vector<Method> m = {
      {"render", "Reference: the prompt rendered by the shapes world"},
      {"render_vae", "Reference: that render through the model's VAE"},
      {"base", "Base model, superclass word"},
      {"words", "Base model, the concept's look in words"},
      {"ti", "Embedding only (Textual Inversion)"},
      {"nolock", "Perfusion without key-lock"},
      {"finetune", "Full fine-tune: embedding + every UNet weight (DreamBooth-like)"},
      {"perfusion", "Perfusion (local key-lock)"},
      {"global", "Perfusion (global key-lock)"},
  };
  return m;
}

struct ConceptRun {
  ConceptSpec spec;
  int index = 0;  // in BuiltinConcepts() (the presence head's order)
  std::vector<Image> train_images;
  std::vector<std::string> captions;  // each training image's full caption, {} for the concept
  at::Tensor reference;  // mean classifier features of the training images
  std::shared_ptr<Concept> perfusion;
  std::optional<AblationConcept> ti, nolock, finetune;
  std::vector<EvalPrompt> prompts;
  std::map<std::string, std::vector<std::vector<at::Tensor>>> images;  // method -> prompt -> images
  std::map<std::string, std::vector<Score>> scores;                    // method -> prompt -> score
  std::map<std::string, double> train_seconds;
};

class Evaluation {
 public:
  Evaluation(const Args& a, std::shared_ptr<StableDiffusion> model, ShapesClassifier classifier)
      : a_(a), model_(std::move(model)), pipe_(model_), clf_(std::move(classifier)) {}

  // Per method, per concept: the scores summed over the held-out prompts.
  using Totals = std::map<std::string, std::map<std::string, Score>>;
  struct SeedTotals {
    uint64_t seed;
    Totals totals;
  };

  // `full`: also the sampler check, the base model checks, the sweep and the two-concept test;
  // otherwise only training and scoring every method (a repeat with another seed).
  void Run(const std::vector<ConceptSpec>& specs, bool full = true) {
    const auto builtin = BuiltinConcepts();
    for (size_t i = 0; i < specs.size(); ++i) {
      ConceptRun r;
      r.spec = specs[i];
      for (size_t k = 0; k < builtin.size(); ++k) {
        if (builtin[k].name == specs[i].name) r.index = static_cast<int>(k);
      }
      r.prompts = HeldOutPrompts(r.spec);
      runs_.push_back(std::move(r));
    }
    if (full) {
      CheckSampler();
      const BaseScenes base = SampleBaseScenes();
      BaseModelCheck(base);
      TextUsageCheck(base);
    }
    for (size_t i = 0; i < runs_.size(); ++i) Train(runs_[i], i);
    for (auto& r : runs_) GenerateAll(r);
    if (!full) return;
    if (a_.sweep) Sweep();
    TwoConcepts();
  }

  Totals PromptTotals() const {
    Totals t;
    for (const auto& r : runs_) {
      for (const auto& [method, scores] : r.scores) {
        for (const auto& sc : scores) t[method][r.spec.name].Add(sc);
      }
    }
    return t;
  }

  // `seeds`: this evaluation's totals first, then those of the repeats (empty: one seed).
  void WriteReport(const std::string& command, const std::vector<SeedTotals>& seeds = {}) const;

 private:
  std::vector<at::Tensor> Generate(const std::string& prompt, const std::map<std::string, ConceptRef>& refs, uint64_t seed,
                                   const std::vector<PromptRegion>& regions = {}) {
    GenerationRequest req;
    req.prompt = prompt;
    req.concepts = refs;
    req.regions = regions;
    req.steps = a_.gen_steps;
    req.guidance_scale = a_.guidance;
    req.guidance_rescale = a_.guidance_rescale;
    req.seed = seed;
    req.num_images = a_.per_prompt;
    req.sampler = a_.sampler;
    req.edit_unconditional = a_.edit_uncond;
    return pipe_.Generate({req})[0].images;
  }

  // The self-checks' request: 2 images of 3 steps with the harness's guidance and sampler.
  GenerationRequest CheckRequest(const std::string& prompt, uint64_t seed) const {
    GenerationRequest req;
    req.prompt = prompt;
    req.steps = 3;
    req.guidance_scale = a_.guidance;
    req.guidance_rescale = a_.guidance_rescale;
    req.seed = seed;
    req.num_images = 2;
    req.sampler = a_.sampler;
    return req;
  }
  // Fails unless SampleWithKV's images (`mine`) equal Pipeline::Generate's (`ref`). On a GPU the
  // same ops may pick other kernels from call to call (TF32 convolutions, cuBLAS heuristics); a
  // logic difference (noise, K/V, guidance) shows as 0.1 or more either way.
  void ExpectSameImages(const std::vector<at::Tensor>& ref, const std::vector<at::Tensor>& mine, const char* what) {
    double diff = 0;
    for (size_t i = 0; i < ref.size(); ++i) diff = std::max(diff, (ref[i] - mine[i]).abs().max().item<double>());
    Log("%s check: the harness's sampling matches Pipeline::Generate to %.2e", what, diff);
    const double tol = pipe_.model().device.is_cpu() ? 1e-4 : 1e-3;
    TORCH_CHECK(diff < tol, what, ": the harness's sampling loop differs from Pipeline::Generate by ", diff);
  }

  // The ablations sample with SampleWithKV; it must agree with Pipeline::Generate on the same K/V,
  // or the methods would not be compared on equal terms.
  void CheckSampler() {
    const std::string prompt = "a small star in the top left on a blue background";
    const auto ref = pipe_.Generate({CheckRequest(prompt, 99)})[0].images;
    const auto mine = SampleWithKV(pipe_, {pipe_.PromptKV(prompt, {})}, {99}, 2, 3, a_.guidance, a_.guidance_rescale, a_.sampler)[0];
    ExpectSameImages(ref, mine, "sampler");
  }

  // How well the base model follows its own training language: one image for each of
  // kBaseCheckScenes one-object base scenes, prompted with the caption that names every attribute,
  // read back by the classifier (and the classifier on the true renders, for reference).
  static constexpr int kBaseCheckScenes = 48;
  struct BaseScenes {
    std::vector<SceneSpec> scenes;
    std::vector<uint64_t> draws;  // the draw each scene came from (seeds its generation)
    std::vector<at::Tensor> renders;
    std::vector<std::string> captions;  // the caption naming every attribute
  };
  BaseScenes SampleBaseScenes() const {
    BaseScenes b;
    for (uint64_t i = 0; b.scenes.size() < kBaseCheckScenes; ++i) {
      SceneSpec s = SampleScene(DeriveSeed(a_.seed, 9000 + i));
      if (s.objects.size() != 1) continue;
      b.draws.push_back(i);
      b.renders.push_back(ImageToTensor(Render(s, static_cast<int>(model_->image_size()))));
      b.captions.push_back(Caption(s, 0));
      b.scenes.push_back(std::move(s));
    }
    return b;
  }
  void BaseModelCheck(const BaseScenes& base) {
    const auto t0 = Clock::now();
    const std::vector<SceneSpec>& scenes = base.scenes;
    const std::vector<at::Tensor>& renders = base.renders;
    std::vector<GenerationRequest> reqs;
    for (size_t k = 0; k < scenes.size(); ++k) {
      GenerationRequest req;
      req.prompt = base.captions[k];
      req.steps = a_.gen_steps;
      req.guidance_scale = a_.guidance;
      req.guidance_rescale = a_.guidance_rescale;
      req.seed = DeriveSeed(a_.seed, 9500 + base.draws[k]);
      req.num_images = 1;
      req.sampler = a_.sampler;
      reqs.push_back(req);
    }
    std::vector<at::Tensor> gen;
    for (auto& r : pipe_.Generate(reqs)) gen.push_back(r.images[0]);
    const auto pg = Predict(clf_, StackImages(gen)), pr = Predict(clf_, StackImages(renders));
    for (size_t i = 0; i < scenes.size(); ++i) {
      const ClassifierLabels l = ClassifierLabelsFor(scenes[i]);
      for (int h = 0; h < kNumHeads; ++h) {
        base_check_generated_[h] += pg[i].label[h] == l.head[h];
        base_check_render_[h] += pr[i].label[h] == l.head[h];
      }
      if (i < 16) {
        base_check_images_[0].push_back(TensorToImage(renders[i]));
        base_check_images_[1].push_back(TensorToImage(gen[i]));
        base_check_prompts_.push_back(reqs[i].prompt);
      }
    }
    std::string line;
    for (int h = 0; h < kNumHeads; ++h) {
      line += " " + HeadName(static_cast<Head>(h)) + " " + Pct(double(base_check_generated_[h]) / scenes.size());
    }
    Log("base model on %zu full captions (classifier agrees with the caption):%s (%.1f s)", scenes.size(),
        line.c_str(), std::chrono::duration<double>(Clock::now() - t0).count());
  }

  // Does the denoiser read its caption, and at which noise levels? The training loss of the
  // base-check scenes at fixed timesteps with the true caption, no caption, and another scene's
  // caption (same noise draws). A model that ignores its text has three equal columns where the
  // layout is decided (high t); one that follows it pays for a wrong caption there.
  void TextUsageCheck(const BaseScenes& base) {
    c10::InferenceMode guard;
    const std::vector<std::string>& captions = base.captions;
    const int64_t n = static_cast<int64_t>(captions.size());
    const at::Tensor x0 =
        model_->vae->encode(StackImages(base.renders).to(model_->device)).mode() * model_->vae->scaling_factor();
    auto encode = [&](const std::vector<std::string>& texts) {
      std::vector<int64_t> ids;
      for (const auto& t : texts) {
        const auto p = model_->tokenizer->EncodePadded(t).ids;
        ids.insert(ids.end(), p.begin(), p.end());
      }
      return model_->text_encoder->forward(
          at::tensor(ids, at::TensorOptions().dtype(at::kLong)).reshape({n, -1}).to(model_->device));
    };
    std::vector<std::string> shuffled(n), empty(n);
    for (int64_t i = 0; i < n; ++i) shuffled[i] = captions[(i + 7) % n];
    const std::array<at::Tensor, 3> text = {encode(captions), encode(empty), encode(shuffled)};
    DDPMScheduler ddpm(model_->scheduler);
    const int64_t T = model_->scheduler.num_train_timesteps;
    for (int64_t t : {T / 10, 3 * T / 10, T / 2, 7 * T / 10, 9 * T / 10, T - 10}) {
      std::array<double, 3> loss{};
      for (int d = 0; d < 4; ++d) {
        const at::Tensor noise = ddpm.sample_noise(x0, MakeGenerator(DeriveSeed(a_.seed, 9900 + d)));
        const at::Tensor ts = at::full({n}, t, at::TensorOptions().dtype(at::kLong).device(model_->device));
        const at::Tensor xt = ddpm.add_noise(x0, noise, ts), target = ddpm.training_target(x0, noise, ts);
        for (int k = 0; k < 3; ++k) loss[k] += (model_->unet->forward(xt, ts, text[k]) - target).pow(2).mean().item<double>() / 4;
      }
      text_usage_.push_back({t, loss});
    }
    std::string line;
    for (const auto& [t, l] : text_usage_) line += " t=" + std::to_string(t) + " " + Fmt(l[0], 4) + "/" + Fmt(l[1], 4) + "/" + Fmt(l[2], 4);
    Log("denoising loss with true/empty/shuffled captions:%s", line.c_str());
  }
  uint64_t PromptSeed(size_t prompt_index) const { return DeriveSeed(a_.seed, 5000 + prompt_index); }

  // The request for held-out prompt `p` (`prompt` its text) with the harness's sampling settings;
  // every method and gate setting gets the same noise for the same prompt.
  GenerationRequest HeldOutRequest(const std::string& prompt, size_t p) const {
    GenerationRequest req;
    req.prompt = prompt;
    req.steps = a_.gen_steps;
    req.guidance_scale = a_.guidance;
    req.guidance_rescale = a_.guidance_rescale;
    req.seed = PromptSeed(p);
    req.num_images = a_.per_prompt;
    req.sampler = a_.sampler;
    req.edit_unconditional = a_.edit_uncond;
    return req;
  }

  TrainOptions Options(const ConceptRun& r, size_t i, const char* method) {
    TrainOptions o;
    o.name = r.spec.name;
    o.superclass = r.spec.superclass;
    o.steps = a_.steps;
    o.batch_size = a_.batch;
    o.seed = DeriveSeed(a_.seed, 200 + i);
    if (a_.captions) o.captions = r.captions;
    const std::string what = r.spec.name + " / " + method;
    const int64_t every = std::max<int64_t>(1, a_.steps / 4);
    o.progress = [what, every](const TrainProgress& p) {
      if (p.step % every == 0 || p.step == p.total) {
        Log("  train %s: step %lld/%lld  loss %.4f  %.1f s, ETA %.0f s", what.c_str(), (long long)p.step,
            (long long)p.total, p.loss_ema, p.elapsed_s, p.eta_s);
      }
      return true;
    };
    return o;
  }

  void Train(ConceptRun& r, size_t i) {
    Log("concept %zu/%zu %s (%s): rendering %d training images", i + 1, runs_.size(), r.spec.name.c_str(),
        r.spec.description.c_str(), a_.images);
    std::vector<at::Tensor> images;
    for (const Sample& s : TrainingRenders(r.spec, a_.images, DeriveSeed(a_.seed, 100 + i), r.prompts, !a_.seen_contexts)) {
      r.train_images.push_back(s.image);
      images.push_back(ImageToTensor(s.image));
      // The caption naming size, position and background, with {} for the superclass word.
      const std::string full = Caption(s.scene, 0);
      const size_t at = (" " + full + " ").find(" " + r.spec.superclass + " ");
      TORCH_CHECK(at != std::string::npos, "caption '", full, "' does not name ", r.spec.superclass);
      r.captions.push_back(full.substr(0, at) + "{}" + full.substr(at + r.spec.superclass.size()));
    }
    at::Tensor feats;
    for (const auto& p : Predict(clf_, StackImages(images))) feats = feats.defined() ? feats + p.features : p.features.clone();
    r.reference = feats / static_cast<double>(images.size());
    auto t0 = Clock::now();
    r.perfusion = std::make_shared<Concept>(TrainConcept(*model_, images, Options(r, i, "perfusion")));
    r.train_seconds["perfusion"] = std::chrono::duration<double>(Clock::now() - t0).count();
    if (a_.finetune) {
      t0 = Clock::now();
      r.finetune = TrainAblation(*model_, images, Options(r, i, "full fine-tune"), Ablation::kFullFinetune,
                                 TrainOptions().lr_embedding, a_.finetune_lr);
      r.train_seconds["finetune"] = std::chrono::duration<double>(Clock::now() - t0).count();
    }
    if (!a_.ablations) return;
    const double ti_lr = a_.ti_lr > 0 ? a_.ti_lr : TrainOptions().lr_embedding;
    t0 = Clock::now();
    r.ti = TrainAblation(*model_, images, Options(r, i, "embedding only"), Ablation::kEmbeddingOnly, ti_lr);
    r.train_seconds["ti"] = std::chrono::duration<double>(Clock::now() - t0).count();
    t0 = Clock::now();
    r.nolock = TrainAblation(*model_, images, Options(r, i, "no key-lock"), Ablation::kNoKeyLock,
                             TrainOptions().lr_embedding);
    r.train_seconds["nolock"] = std::chrono::duration<double>(Clock::now() - t0).count();
    if (i == 0) CheckNoKeyLockSampler(r);
  }

  // The no-key-lock method samples with learned K targets through SampleWithKV; a concept blob can
  // carry the same targets, and Pipeline::Generate then applies them. Both must give the same
  // images, the unconditional half's edits included, or the comparison with Perfusion is unfair.
  void CheckNoKeyLockSampler(const ConceptRun& r) {
    const AblationConcept& ac = *r.nolock;
    auto as_blob = std::make_shared<Concept>(*ac.concept);
    as_blob->k_targets = at::cat(ac.k_targets).to(at::kCPU, at::kFloat);
    const std::string prompt = r.prompts[0].text;
    GenerationRequest req = CheckRequest(prompt, 98);
    req.edit_unconditional = a_.edit_uncond;
    ConceptRef ref;
    ref.concept = as_blob;
    ref.gate.temperature = 0;  // the concept's default gate, as AblationKV uses
    req.concepts[r.spec.name] = ref;
    const auto expected = pipe_.Generate({req})[0].images;
    std::optional<std::vector<CrossAttnKV>> uncond;
    if (a_.edit_uncond) uncond = AblationKV(pipe_, "", ac, Ablation::kNoKeyLock, ac.concept->default_gate, true);
    const auto mine = SampleWithKV(pipe_, {AblationKV(pipe_, prompt, ac, Ablation::kNoKeyLock, ac.concept->default_gate)},
                                   {98}, 2, 3, a_.guidance, a_.guidance_rescale, a_.sampler, uncond ? &*uncond : nullptr)[0];
    ExpectSameImages(expected, mine, "no-key-lock");
  }

  // Generates and scores every prompt of `r` with one method.
  void GenerateMethod(ConceptRun& r, const std::string& method) {
    const auto t0 = Clock::now();
    std::vector<std::vector<at::Tensor>> per_prompt;
    if (method == "render" || method == "render_vae") {
      // What a perfect model would draw: the concept in the prompt's context, rendered by the world
      // (and, for render_vae, encoded and decoded by the model's VAE: the best its decoder can show).
      // render_vae round-trips the renders of "render" (Methods() lists it first).
      const auto rendered = r.images.find("render");
      for (size_t p = 0; p < r.prompts.size(); ++p) {
        if (method == "render_vae" && rendered != r.images.end()) {
          per_prompt.push_back(VaeRoundTrip(rendered->second[p]));
          continue;
        }
        std::vector<at::Tensor> imgs;
        for (int k = 0; k < a_.per_prompt; ++k) {
          SceneSpec scene = SampleConceptScene(r.spec, DeriveSeed(PromptSeed(p), k));
          const EvalPrompt& ep = r.prompts[p];
          if (ep.background) scene.background = *ep.background;
          if (ep.position) scene.objects[0].position = *ep.position;
          if (ep.size) scene.objects[0].size = *ep.size;
          imgs.push_back(ImageToTensor(Render(scene, static_cast<int>(model_->image_size()))));
        }
        if (method == "render_vae") imgs = VaeRoundTrip(imgs);
        per_prompt.push_back(imgs);
      }
    } else if (method == "base" || method == "words" || method == "perfusion" || method == "global") {
      std::vector<GenerationRequest> reqs;
      for (size_t p = 0; p < r.prompts.size(); ++p) {
        GenerationRequest req = HeldOutRequest(r.prompts[p].text, p);
        if (method == "base" || method == "words") {
          req.prompt = ReplaceAll(req.prompt, "<" + r.spec.name + ">",
                                  method == "base" ? r.spec.superclass : ConceptInWords(r.spec));
        } else {
          ConceptRef ref;
          ref.concept = r.perfusion;
          ref.gate.temperature = 0;  // the concept's default gate
          ref.global_key_lock = method == "global";
          req.concepts[r.spec.name] = ref;
        }
        reqs.push_back(req);
      }
      for (auto& res : pipe_.Generate(reqs)) per_prompt.push_back(res.images);
    } else {
      const Ablation which = method == "ti"       ? Ablation::kEmbeddingOnly
                             : method == "nolock" ? Ablation::kNoKeyLock
                                                  : Ablation::kFullFinetune;
      const AblationConcept& ac = method == "ti" ? *r.ti : method == "nolock" ? *r.nolock : *r.finetune;
      std::optional<ParamsRestorer> base_unet;
      if (which == Ablation::kFullFinetune) {
        base_unet.emplace(model_->unet->parameters());
        base_unet->Load(ac.unet_weights);
      }
      std::vector<std::vector<CrossAttnKV>> kv;
      std::vector<uint64_t> seeds;
      for (size_t p = 0; p < r.prompts.size(); ++p) {
        kv.push_back(AblationKV(pipe_, r.prompts[p].text, ac, which, ac.concept->default_gate));
        seeds.push_back(PromptSeed(p));
      }
      // Without key-locking the concept is a local one: the unconditional half goes through its edits
      // too, as the pipeline does for Perfusion's local locking (--no-edit-uncond: neither does).
      std::optional<std::vector<CrossAttnKV>> uncond;
      if (which == Ablation::kNoKeyLock && a_.edit_uncond) {
        uncond = AblationKV(pipe_, "", ac, which, ac.concept->default_gate, /*edit_without_token=*/true);
      }
      per_prompt = SampleWithKV(pipe_, kv, seeds, a_.per_prompt, a_.gen_steps, a_.guidance, a_.guidance_rescale,
                                a_.sampler, uncond ? &*uncond : nullptr);
    }
    std::vector<Score> scores;
    for (size_t p = 0; p < r.prompts.size(); ++p) {
      scores.push_back(ScoreImages(Predict(clf_, StackImages(per_prompt[p])), r.prompts[p], r.index, r.reference));
    }
    Score total;
    for (const auto& s : scores) total.Add(s);
    Log("  %s / %-9s fidelity %4s  alignment %4s  similarity %.3f  (%d images, %.1f s)", r.spec.name.c_str(),
        method.c_str(), Pct(total.Fidelity()).c_str(), Pct(total.Alignment()).c_str(), total.Similarity(), total.n,
        std::chrono::duration<double>(Clock::now() - t0).count());
    r.images[method] = std::move(per_prompt);
    r.scores[method] = std::move(scores);
  }

  void GenerateAll(ConceptRun& r) {
    Log("generating %s: %zu prompts x %d images per method", r.spec.name.c_str(), r.prompts.size(), a_.per_prompt);
    for (const auto& m : Methods()) {
      if (!a_.ablations && (m.key == "ti" || m.key == "nolock")) continue;
      if (!a_.finetune && m.key == "finetune") continue;
      GenerateMethod(r, m.key);
    }
  }

  void Sweep() {
    ConceptRun* r = &runs_[0];
    for (auto& x : runs_) {
      if (x.spec.name == a_.sweep_concept) r = &x;
    }
    sweep_concept_ = r->spec.name;
    Log("beta/tau sweep of %s: %zu betas x %zu temperatures x %zu key-locking modes", r->spec.name.c_str(),
        a_.betas.size(), a_.taus.size(), a_.sweep_locks.size());
    for (const std::string& lock : a_.sweep_locks) {
      for (double tau : a_.taus) {
        for (double beta : a_.betas) {
          std::vector<GenerationRequest> reqs;
          for (size_t p = 0; p < r->prompts.size(); ++p) {
            GenerationRequest req = HeldOutRequest(r->prompts[p].text, p);
            ConceptRef ref;
            ref.concept = r->perfusion;
            ref.gate = GateParams{beta, tau};
            ref.global_key_lock = lock == "global";
            req.concepts[r->spec.name] = ref;
            reqs.push_back(req);
          }
          const auto results = pipe_.Generate(reqs);
          Score total;
          for (size_t p = 0; p < r->prompts.size(); ++p) {
            total.Add(ScoreImages(Predict(clf_, StackImages(results[p].images)), r->prompts[p], r->index, r->reference));
          }
          sweep_.push_back({lock, beta, tau, total});
          Log("  %s lock, beta %.2f tau %.2f: fidelity %4s alignment %4s", lock.c_str(), beta, tau,
              Pct(total.Fidelity()).c_str(), Pct(total.Alignment()).c_str());
        }
      }
    }
  }

  void TwoConcepts() {
    if (runs_.size() < 2) return;
    for (size_t a = 0; a + 1 < runs_.size(); a += 2) {
      const ConceptRun& x = runs_[a];
      const ConceptRun& y = runs_[a + 1];
      const auto bgs = ContrastingBackgrounds({x.spec.color, x.spec.color2, y.spec.color, y.spec.color2});
      const std::string ra = "<" + x.spec.name + ">", rb = "<" + y.spec.name + ">";
      std::vector<std::string> prompts = {"a " + ra + " and a " + rb, "a " + ra + " to the left of a " + rb};
      // Where the shapes world puts each object for each prompt, for the rendered references.
      std::vector<std::pair<Position, Position>> layout = {{Position::kLeft, Position::kRight},
                                                           {Position::kLeft, Position::kRight}};
      std::vector<std::optional<Color>> prompt_bg = {std::nullopt, std::nullopt};
      if (!bgs.empty()) {
        prompts.push_back("a " + ra + " above a " + rb + " on a " + ColorName(bgs[0]) + " background");
        layout.push_back({Position::kTop, Position::kBottom});
        prompt_bg.push_back(bgs[0]);
      }
      for (const std::string method : {"render", "render_vae", "local", "global", "regional"}) {
        PairResult pr;
        pr.a = x.spec.name;
        pr.b = y.spec.name;
        pr.method = method;
        for (size_t p = 0; p < prompts.size(); ++p) {
          const uint64_t seed = DeriveSeed(a_.seed, 7000 + p);
          std::vector<at::Tensor> imgs;
          if (method == "render_vae") {
            TORCH_CHECK(pairs_.back().method == "render", "render_vae must follow render");
            imgs = VaeRoundTrip(pairs_.back().images[p]);
          } else if (method == "render") {
            for (int k = 0; k < a_.per_prompt; ++k) {
              SceneSpec scene;
              ObjectSpec oa = SampleConceptScene(x.spec, DeriveSeed(seed, 2 * k)).objects[0];
              ObjectSpec ob = SampleConceptScene(y.spec, DeriveSeed(seed, 2 * k + 1)).objects[0];
              oa.size = ob.size = Size::kSmall;
              oa.position = layout[p].first;
              ob.position = layout[p].second;
              scene.objects = {oa, ob};
              scene.background = prompt_bg[p] ? *prompt_bg[p] : bgs.empty() ? Color::kPlain : bgs[k % bgs.size()];
              imgs.push_back(ImageToTensor(Render(scene, static_cast<int>(model_->image_size()))));
            }
          } else {
            std::map<std::string, ConceptRef> refs;
            for (const ConceptRun* c : {&x, &y}) {
              ConceptRef ref;
              ref.concept = c->perfusion;
              ref.gate.temperature = 0;
              ref.global_key_lock = method != "local";
              refs[c->spec.name] = ref;
            }
            // "regional": each concept also gets its half of the image with its own prompt, the
            // scene's one-object caption there ("a small <a> on the left").
            std::vector<PromptRegion> regions;
            if (method == "regional") {
              const std::string bg = prompt_bg[p] ? " on a " + ColorName(*prompt_bg[p]) + " background" : "";
              for (const auto& [ref, pos] : {std::make_pair(ra, layout[p].first), std::make_pair(rb, layout[p].second)}) {
                const std::array<double, 4>* box = NamedRegionBox(PositionName(pos));  // "left", "top", ...
                TORCH_CHECK(box != nullptr, "no region box named ", PositionName(pos));
                regions.push_back({"a small " + ref + " " + PositionPhrase(pos) + bg, (*box)[0], (*box)[1], (*box)[2], (*box)[3]});
              }
            }
            imgs = Generate(prompts[p], refs, seed, regions);
          }
          const auto preds = Predict(clf_, StackImages(imgs));
          int both = 0;
          for (const auto& q : preds) {
            const bool ha = ShowsConcept(q, x.index), hb = ShowsConcept(q, y.index);
            ++pr.n, pr.both += ha && hb, pr.only_a += ha && !hb, pr.only_b += hb && !ha;
            both += ha && hb;
          }
          pr.both_per_prompt.push_back(double(both) / preds.size());
          pr.prompts.push_back(prompts[p]);
          pr.images.push_back(imgs);
        }
        Log("two concepts %s + %s (%s): both present %s, only the first %s, only the second %s", pr.a.c_str(),
            pr.b.c_str(), PairMethodName(method).c_str(), Pct(double(pr.both) / pr.n).c_str(),
            Pct(double(pr.only_a) / pr.n).c_str(), Pct(double(pr.only_b) / pr.n).c_str());
        pairs_.push_back(std::move(pr));
      }
    }
  }

  // Images [3, H, W] in [-1, 1] encoded and decoded by the model's VAE.
  std::vector<at::Tensor> VaeRoundTrip(const std::vector<at::Tensor>& imgs) const {
    c10::InferenceMode guard;
    const at::Tensor x = at::stack(imgs).to(model_->device, model_->dtype);
    const at::Tensor y = model_->vae->decode(model_->vae->encode(x).mode()).to(at::kFloat).clamp(-1, 1).cpu();
    std::vector<at::Tensor> out;
    for (int64_t k = 0; k < y.size(0); ++k) out.push_back(y[k].clone());
    return out;
  }

  static std::string PairMethodName(const std::string& method) {
    if (method == "render") return "reference: rendered";
    if (method == "render_vae") return "reference: rendered, through the VAE";
    if (method == "regional") return "Perfusion, global key-lock + regional prompts";
    return "Perfusion, " + method + " key-lock";
  }

  struct SweepPoint {
    std::string lock;  // "local" | "global"
    double beta, tau;
    Score score;
  };
  struct PairResult {
    std::string a, b;
    std::string method;  // render, render_vae, local, global, regional
    int n = 0, both = 0, only_a = 0, only_b = 0;
    std::vector<double> both_per_prompt;
    std::vector<std::string> prompts;
    std::vector<std::vector<at::Tensor>> images;
  };

  const Args& a_;
  std::shared_ptr<StableDiffusion> model_;
  Pipeline pipe_;
  mutable ShapesClassifier clf_;
  std::vector<ConceptRun> runs_;
  std::vector<SweepPoint> sweep_;
  std::string sweep_concept_;
  std::vector<PairResult> pairs_;
  std::array<int, kNumHeads> base_check_generated_{}, base_check_render_{};
  std::array<std::vector<Image>, 2> base_check_images_;
  std::vector<std::string> base_check_prompts_;
  std::vector<std::pair<int64_t, std::array<double, 3>>> text_usage_;  // timestep, loss true/empty/shuffled
};

std::vector<Image> ToImages(const std::vector<at::Tensor>& t) {
  std::vector<Image> out;
  for (const auto& x : t) out.push_back(TensorToImage(x));
  return out;
}

std::string MdEscape(const std::string& s) { return ReplaceAll(ReplaceAll(s, "<", "&lt;"), ">", "&gt;"); }

void Evaluation::WriteReport(const std::string& command, const std::vector<SeedTotals>& seeds) const {
  const std::string& out = a_.out;
  MakeDirs(out);
  std::ostringstream md;
  std::time_t now = std::time(nullptr);
  char date[32];
  std::strftime(date, sizeof(date), "%Y-%m-%d", std::gmtime(&now));
  md << "# Perfusion quality report\n\n"
     << "Reproduce:\n\n```\n" << command << "\n```\n\n"
     << "Model `" << model_->model_id << "` (" << a_.model << "), classifier `" << a_.classifier << "`, " << date
     << ", " << Fmt(Elapsed() / 60, 1) << " min on " << at::get_num_threads() << " thread(s).\n\n"
     << "Each concept: " << a_.images << " training renders, " << a_.steps << " steps of batch " << a_.batch
     << " per method" << (a_.captions ? ", trained with each render's full caption" : "")
     << (a_.edit_uncond ? "" : ", the unconditional half of guidance left unedited")
     << (a_.seen_contexts ? ", training renders allowed to show held-out contexts (--seen-contexts)"
                          : ", no training render showing a held-out prompt's context")
     << "; " << a_.per_prompt << " images per held-out prompt, " << a_.gen_steps << " " << a_.sampler
     << " steps, guidance " << a_.guidance << ". Fidelity: the classifier's presence head says the concept's "
     << "object is in the image. Alignment: every attribute the prompt asks for (background colour, position, size) "
     << "is what the classifier reads. Similarity: cosine of the classifier's features to the mean features of the "
     << "training images. See docs/quality.md for the definitions.\n\n";

  // Summary over concepts.
  md << "## Summary (all concepts)\n\n"
     << "| method | fidelity | alignment | background | position | size | similarity | train s/concept |\n"
     << "|---|---|---|---|---|---|---|---|\n";
  for (const auto& m : Methods()) {
    Score total;
    double secs = 0;
    bool any = false;
    for (const auto& r : runs_) {
      auto it = r.scores.find(m.key);
      if (it == r.scores.end()) continue;
      any = true;
      for (const auto& s : it->second) total.Add(s);
      auto ts = r.train_seconds.find(m.key == "global" ? "perfusion" : m.key);
      if (ts != r.train_seconds.end()) secs += ts->second;
    }
    if (!any) continue;
    md << "| " << m.title << " | " << Pct(total.Fidelity()) << " | " << Pct(total.Alignment()) << " | "
       << Pct(Score::Frac(total.bg_ok, total.bg_n)) << " | " << Pct(Score::Frac(total.pos_ok, total.pos_n)) << " | "
       << Pct(Score::Frac(total.size_ok, total.size_n)) << " | " << Fmt(total.Similarity(), 3) << " | "
       << (secs == 0 ? std::string("-") : Fmt(secs / runs_.size(), 0)) << " |\n";
  }
  md << "\n(" << runs_.size() << " concepts x " << (runs_.empty() ? 0 : runs_[0].prompts.size()) << " prompts x "
     << a_.per_prompt << " images per method.)\n\n";

  if (seeds.size() > 1) {
    // Every seed renders other training images, trains other concepts and draws other noise.
    md << "## Across seeds\n\nThe same evaluation repeated with " << seeds.size() << " seeds (training renders, "
       << "training batches and generation noise all change). Fidelity / alignment over all concepts per seed, "
       << "then pooled. The rest of this report (pictures, sweep, two concepts) is seed " << seeds[0].seed
       << " alone.\n\n| method |";
    for (const auto& sd : seeds) md << " seed " << sd.seed << " |";
    md << " pooled | pooled, faithful and aligned at once |\n|---|";
    for (size_t i = 0; i <= seeds.size() + 1; ++i) md << "---|";
    md << "\n";
    for (const auto& m : Methods()) {
      if (!seeds[0].totals.count(m.key)) continue;
      Score pooled;
      md << "| " << m.title << " |";
      for (const auto& sd : seeds) {
        Score t;
        if (sd.totals.count(m.key)) {
          for (const auto& [name, sc] : sd.totals.at(m.key)) t.Add(sc);
        }
        pooled.Add(t);
        md << " " << Pct(t.Fidelity()) << " / " << Pct(t.Alignment()) << " |";
      }
      md << " **" << Pct(pooled.Fidelity()) << " / " << Pct(pooled.Alignment()) << "** | " << Pct(pooled.Both())
         << " |\n";
    }
    md << "\nBy concept, pooled over the seeds, with the lowest and highest seed's fidelity in brackets:\n\n"
       << "| concept |";
    std::vector<const Method*> shown;
    for (const auto& m : Methods()) {
      if (m.key != "render" && seeds[0].totals.count(m.key)) shown.push_back(&m);
    }
    for (const Method* m : shown) md << " " << m->key << " |";
    md << "\n|---|";
    for (size_t i = 0; i < shown.size(); ++i) md << "---|";
    md << "\n";
    for (const auto& r : runs_) {
      md << "| " << r.spec.name << " |";
      for (const Method* m : shown) {
        Score pooled;
        double lo = 1, hi = 0;
        for (const auto& sd : seeds) {
          auto it = sd.totals.find(m->key);
          if (it == sd.totals.end() || !it->second.count(r.spec.name)) continue;
          const Score& sc = it->second.at(r.spec.name);
          pooled.Add(sc);
          lo = std::min(lo, sc.Fidelity());
          hi = std::max(hi, sc.Fidelity());
        }
        md << " " << Pct(pooled.Fidelity()) << " / " << Pct(pooled.Alignment()) << " (" << Pct(lo) << "-" << Pct(hi)
           << ") |";
      }
      md << "\n";
    }
    md << "\n";
  }

  // The base model's own prompt following.
  md << "## Base model: following its training captions\n\n" << kBaseCheckScenes
     << " one-object base scenes, each prompted with the caption that names every attribute (one image each). "
     << "The table gives how often the classifier reads back what the caption says, on the generated image and, "
     << "for reference, on the true render.\n\n| |";
  for (int h = 0; h < kNumHeads; ++h) md << " " << HeadName(static_cast<Head>(h)) << " |";
  md << "\n|---|";
  for (int h = 0; h < kNumHeads; ++h) md << "---|";
  md << "\n| generated |";
  for (int h = 0; h < kNumHeads; ++h) md << " " << Pct(double(base_check_generated_[h]) / kBaseCheckScenes) << " |";
  md << "\n| true render |";
  for (int h = 0; h < kNumHeads; ++h) md << " " << Pct(double(base_check_render_[h]) / kBaseCheckScenes) << " |";
  md << "\n\nDenoising loss of the same scenes (the model's training objective, "
     << model_->scheduler.prediction_type << ", 4 noise draws) at fixed timesteps with the true caption, no caption, "
     << "and another scene's caption. Where the columns are equal the model ignores its text.\n\n"
     << "| timestep | true caption | empty caption | another scene's caption |\n|---|---|---|---|\n";
  for (const auto& [t, l] : text_usage_) md << "| " << t << " | " << Fmt(l[0], 4) << " | " << Fmt(l[1], 4) << " | " << Fmt(l[2], 4) << " |\n";
  md << "\n![Base model: renders (top) and generations (bottom) for the same captions](base_model.png)\n\n"
     << "Captions of the grid's columns: ";
  for (size_t i = 0; i < base_check_prompts_.size(); ++i) md << (i ? "; " : "") << (i + 1) << ". `" << base_check_prompts_[i] << "`";
  md << ".\n\n";
  {
    GridOptions g;
    g.row_labels = {"render", "generated"};
    std::vector<std::string> cols;
    for (size_t i = 0; i < base_check_prompts_.size(); ++i) cols.push_back(std::to_string(i + 1));
    g.col_labels = cols;
    g.title = "base model: caption -> image";
    WritePng(out + "/base_model.png", ImageGrid({base_check_images_[0], base_check_images_[1]}, g));
  }

  // Per concept.
  md << "## Per concept (fidelity / alignment)\n\n| concept | training images |";
  for (const auto& m : Methods()) md << " " << m.key << " |";
  md << "\n|---|---|";
  for (size_t i = 0; i < Methods().size(); ++i) md << "---|";
  md << "\n";
  for (const auto& r : runs_) {
    md << "| " << r.spec.name << " | ![](train_" << r.spec.name << ".png) |";
    for (const auto& m : Methods()) {
      auto it = r.scores.find(m.key);
      if (it == r.scores.end()) {
        md << " - |";
        continue;
      }
      Score t;
      for (const auto& s : it->second) t.Add(s);
      md << " " << Pct(t.Fidelity()) << " / " << Pct(t.Alignment()) << " |";
    }
    md << "\n";
    GridOptions tg;
    tg.scale = 2;
    tg.pad = 2;
    WritePng(out + "/train_" + r.spec.name + ".png", ImageGrid({r.train_images}, tg));
  }
  md << "\nMethods: ";
  for (size_t i = 0; i < Methods().size(); ++i) md << (i ? ", " : "") << "`" << Methods()[i].key << "` = " << Methods()[i].title;
  md << ".\n\n";

  // Per prompt, and the grids.
  md << "## Generations\n\n";
  for (const auto& r : runs_) {
    md << "### " << r.spec.name << "\n\n" << r.spec.description << ".\n\n| prompt | asks for |";
    for (const auto& m : Methods()) {
      if (r.scores.count(m.key)) md << " " << m.key << " |";
    }
    md << "\n|---|---|";
    for (const auto& m : Methods()) {
      if (r.scores.count(m.key)) md << "---|";
    }
    md << "\n";
    for (size_t p = 0; p < r.prompts.size(); ++p) {
      const auto& ep = r.prompts[p];
      std::string asks;
      auto add = [&](const std::string& x) { asks += (asks.empty() ? "" : ", ") + x; };
      if (ep.background) add("background " + ColorName(*ep.background));
      if (ep.position) add("position " + PositionName(*ep.position));
      if (ep.size) add("size " + SizeName(*ep.size));
      md << "| P" << p + 1 << ": `" << ep.text << "` | " << asks << " |";
      for (const auto& m : Methods()) {
        auto it = r.scores.find(m.key);
        if (it == r.scores.end()) continue;
        md << " " << Pct(it->second[p].Fidelity()) << " / " << Pct(it->second[p].Alignment()) << " |";
      }
      md << "\n";
    }
    // Perfusion: every prompt, every image.
    std::vector<std::vector<Image>> rows;
    std::vector<std::string> labels;
    for (size_t p = 0; p < r.prompts.size(); ++p) {
      rows.push_back(ToImages(r.images.at("perfusion")[p]));
      labels.push_back("P" + std::to_string(p + 1));
    }
    GridOptions g;
    g.row_labels = labels;
    g.title = r.spec.name + ": Perfusion, held-out prompts";
    WritePng(out + "/gen_" + r.spec.name + ".png", ImageGrid(rows, g));
    // Methods side by side: two images of every prompt per method.
    std::vector<std::vector<Image>> mrows;
    std::vector<std::string> mlabels, clabels;
    for (size_t p = 0; p < r.prompts.size(); ++p) {
      for (int k = 0; k < std::min(2, a_.per_prompt); ++k) clabels.push_back(k == 0 ? "P" + std::to_string(p + 1) : "");
    }
    for (const auto& m : Methods()) {
      auto it = r.images.find(m.key);
      if (it == r.images.end()) continue;
      std::vector<Image> row;
      for (size_t p = 0; p < r.prompts.size(); ++p) {
        for (int k = 0; k < std::min(2, a_.per_prompt); ++k) row.push_back(TensorToImage(it->second[p][k]));
      }
      mrows.push_back(row);
      mlabels.push_back(m.key);
    }
    GridOptions gm;
    gm.row_labels = mlabels;
    gm.col_labels = clabels;
    gm.title = r.spec.name + ": methods";
    WritePng(out + "/methods_" + r.spec.name + ".png", ImageGrid(mrows, gm));
    md << "\n![Perfusion generations](gen_" << r.spec.name << ".png)\n\n![Methods compared](methods_" << r.spec.name
       << ".png)\n\n";
  }

  // Sweep.
  if (!sweep_.empty()) {
    md << "## Gate sweep (" << sweep_concept_ << ")\n\nbeta is the gate's threshold on the normalised similarity "
       << "alpha, tau its temperature. Lower beta / higher tau open the gate wider (more of the concept, also on "
       << "tokens that merely resemble it). One table per key-locking mode; in the chart, global locking's "
       << "lines are dashed.\n\n";
    std::vector<Series> series;
    for (const std::string& lock : a_.sweep_locks) {
      md << "**" << lock << " key-lock**\n\n| tau \\ beta |";
      for (double b : a_.betas) md << " " << Fmt(b) << " |";
      md << "\n|---|";
      for (size_t i = 0; i < a_.betas.size(); ++i) md << "---|";
      md << "\n";
      for (size_t t = 0; t < a_.taus.size(); ++t) {
        Series s;
        s.label = lock + " tau=" + Fmt(a_.taus[t]);
        s.color = PaletteColor(static_cast<int>(t));
        s.dashed = lock == "global";
        s.marker = lock == "global" ? Marker::kSquare : Marker::kCircle;
        md << "| " << Fmt(a_.taus[t]) << " |";
        for (const auto& p : sweep_) {
          if (p.lock != lock || p.tau != a_.taus[t]) continue;
          md << " " << Pct(p.score.Fidelity()) << " / " << Pct(p.score.Alignment()) << " |";
          s.x.push_back(p.score.Alignment());
          s.y.push_back(p.score.Fidelity());
          s.point_labels.push_back("b" + Fmt(p.beta, 2).substr(1));
        }
        md << "\n";
        series.push_back(s);
      }
      md << "\n";
    }
    // The other methods on the same concept, as single points.
    const ConceptRun* r = nullptr;
    for (const auto& x : runs_) {
      if (x.spec.name == sweep_concept_) r = &x;
    }
    const Marker markers[] = {Marker::kSquare, Marker::kDiamond, Marker::kTriangle, Marker::kCircle};
    int k = 0;
    for (const auto& m : Methods()) {
      // The swept modes' default-gate methods are points of their own lines already.
      const auto swept = [&](const char* lock) {
        return std::count(a_.sweep_locks.begin(), a_.sweep_locks.end(), lock) > 0;
      };
      if ((m.key == "perfusion" && swept("local")) || (m.key == "global" && swept("global")) ||
          !r->scores.count(m.key)) {
        continue;
      }
      Score t;
      for (const auto& s : r->scores.at(m.key)) t.Add(s);
      Series s;
      s.label = m.key;
      s.x = {t.Alignment()};
      s.y = {t.Fidelity()};
      s.line = false;
      s.marker = markers[k % 4];
      s.color = PaletteColor(4 + k++);
      series.push_back(s);
    }
    ChartOptions co;
    co.title = "Fidelity vs alignment: " + sweep_concept_;
    co.x_label = "prompt alignment";
    co.y_label = "concept fidelity";
    co.x_min = -0.02, co.x_max = 1.02, co.y_min = -0.02, co.y_max = 1.02;
    WritePng(out + "/sweep.png", LineChart(series, co));
    md << "\n(fidelity / alignment per cell.)\n\n![Gate sweep](sweep.png)\n\n";
  }

  // Two concepts.
  if (!pairs_.empty()) {
    md << "## Two concepts in one prompt\n\n"
       << "Two references: both concepts rendered small where the prompt puts them (the first on the left or at "
          "the top), and that render encoded and decoded by the model's VAE, which bounds what generation can "
          "show. Regional prompts: global key-locking, and each concept's half of the image gets its own prompt, "
          "the scene's one-object caption (\"a small <a> on the left\", with the prompt's background if it names "
          "one).\n\n"
       << "| concepts | method | both present | per prompt | only the first | only the second | images |\n"
       << "|---|---|---|---|---|---|---|\n";
    for (const auto& p : pairs_) {
      std::string per;
      for (double f : p.both_per_prompt) per += (per.empty() ? "" : " / ") + Pct(f);
      md << "| " << p.a << " + " << p.b << " | " << PairMethodName(p.method) << " | " << Pct(double(p.both) / p.n)
         << " | " << per << " | " << Pct(double(p.only_a) / p.n) << " | " << Pct(double(p.only_b) / p.n) << " | "
         << p.n << " |\n";
    }
    md << "\nPrompts:";
    std::vector<std::vector<Image>> rows;
    std::vector<std::string> labels;
    for (const auto& p : pairs_) {
      if (p.method == "global") continue;
      const std::string tag = p.method == "render" ? "R " : p.method == "render_vae" ? "V " : p.method == "regional" ? "RG " : "";
      for (size_t i = 0; i < p.prompts.size(); ++i) {
        if (p.method == "local") md << " `" << p.prompts[i] << "`;";
        const bool reference = p.method == "render" || p.method == "render_vae";
        if (reference && i > 0) continue;  // one reference row per pair is enough to see
        rows.push_back(ToImages(p.images[i]));
        labels.push_back(tag + p.a.substr(0, p.a.find('_')) + "+" + p.b.substr(0, p.b.find('_')) + " " +
                         std::to_string(i + 1));
      }
    }
    md << " (grid: local key-lock; rows marked RG: regional prompts; rows marked R and V are the rendered reference "
          "and its VAE round trip for the first prompt).\n\n![Two concepts](two_concepts.png)\n";
    GridOptions g;
    g.row_labels = labels;
    g.title = "two concepts";
    WritePng(out + "/two_concepts.png", ImageGrid(rows, g));
  }
  WriteFileAtomically(out + "/report.md", md.str());
  Log("wrote %s/report.md", out.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  if (auto code = ParseToolArgs(argc, argv, Usage, [&](const std::string& k, const NextValue& v) {
      if (k == "--model") a.model = v();
      else if (k == "--classifier") a.classifier = v();
      else if (k == "--out") a.out = v();
      else if (k == "--tokenizer-dir") a.tokenizer_dir = v();
      else if (k == "--concepts") a.concepts = v();
      else if (k == "--images") a.images = ParseInt(v());
      else if (k == "--steps") a.steps = ParseInt64(v());
      else if (k == "--batch") a.batch = ParseInt64(v());
      else if (k == "--ti-lr") a.ti_lr = ParseDouble(v());
      else if (k == "--per-prompt") a.per_prompt = ParseInt(v());
      else if (k == "--gen-steps") a.gen_steps = ParseInt64(v());
      else if (k == "--guidance") a.guidance = ParseDouble(v());
      else if (k == "--guidance-rescale") a.guidance_rescale = ParseDouble(v());
      else if (k == "--sampler") a.sampler = v();
      else if (k == "--seed") a.seed = ParseUint64(v());
      else if (k == "--seeds") {
        const auto list = SplitList(v());
        if (list.empty()) throw ToolUsageError("--seeds: expected a comma-separated list of seeds, e.g. 1,2,3");
        a.seed = ParseUint64(list[0]);
        a.more_seeds.clear();
        for (size_t i = 1; i < list.size(); ++i) a.more_seeds.push_back(ParseUint64(list[i]));
      }
      else if (k == "--sweep-concept") a.sweep_concept = v();
      else if (k == "--betas") a.betas = ParseDoubles(v());
      else if (k == "--taus") a.taus = ParseDoubles(v());
      else if (k == "--sweep-locks") a.sweep_locks = SplitList(v());
      else if (k == "--no-ablations") a.ablations = false;
      else if (k == "--captions") a.captions = true;
      else if (k == "--finetune") a.finetune = true;
      else if (k == "--finetune-lr") a.finetune_lr = ParseDouble(v());
      else if (k == "--no-sweep") a.sweep = false;
      else if (k == "--no-edit-uncond") a.edit_uncond = false;
      else if (k == "--seen-contexts") a.seen_contexts = true;
      else if (k == "--threads") a.threads = ParseInt(v());
      else if (k == "--device") a.device = ParseToolDevice(v());
      else return false;
      return true;
    })) {
    return *code;
  }
  const bool locks_ok = !a.sweep_locks.empty() && std::all_of(a.sweep_locks.begin(), a.sweep_locks.end(), [](const auto& l) {
    return l == "local" || l == "global";
  });
  // A gate's temperature <= 0 means "unset" to the pipeline, which then takes the concept's whole
  // default gate: such a sweep point would be labelled with one gate and measured at another.
  const bool gates_ok = std::all_of(a.taus.begin(), a.taus.end(), [](double t) { return t > 0; }) &&
                        std::all_of(a.betas.begin(), a.betas.end(), [](double b) { return b > 0 && b <= 1; });
  if (a.images < 1 || a.steps < 1 || a.batch < 1 || a.per_prompt < 2 || a.gen_steps < 1 || a.betas.empty() ||
      a.taus.empty() || !locks_ok || !gates_ok || !(a.finetune_lr > 0)) {
    std::fprintf(stderr, "need --images, --steps, --batch, --gen-steps >= 1, --per-prompt >= 2, --finetune-lr > 0, "
                 "non-empty sweeps with --betas in (0, 1] and --taus > 0, and --sweep-locks from local, global\n");
    return 2;
  }
  if (a.classifier.empty()) a.classifier = a.model + "/eval/classifier.safetensors";
  std::string command = "perfusion-evaluate";
  for (int i = 1; i < argc; ++i) command += std::string(" ") + argv[i];
  try {
    if (a.threads > 0) at::set_num_threads(a.threads);
    MakeDirs(a.out);  // before the run: a bad --out once failed after all the training and scoring
    std::vector<ConceptSpec> specs;
    if (a.concepts == "all") {
      specs = BuiltinConcepts();
    } else {
      for (const auto& name : SplitList(a.concepts)) specs.push_back(FindConcept(name));
    }
    TORCH_CHECK_VALUE(!specs.empty(), "--concepts: no concepts");
    if (a.sweep_concept.empty()) a.sweep_concept = specs[0].name;
    TORCH_CHECK_VALUE(std::any_of(specs.begin(), specs.end(), [&](const ConceptSpec& c) { return c.name == a.sweep_concept; }),
                      "--sweep-concept ", a.sweep_concept, " is not one of the evaluated --concepts");
    ModelDirOptions mo;
    mo.tokenizer_dir = a.tokenizer_dir;
    mo.device = a.device;
    auto model = LoadModelDir(a.model, mo);
    TORCH_CHECK_VALUE(model->image_size() == 32, "the shapes harness expects a 32x32 model; ", a.model, " makes ",
                      model->image_size(), "x", model->image_size(), " images");
    ShapesClassifier clf = LoadShapesClassifier(a.classifier);
    clf->to(a.device);
    Log("model %s (%s), classifier %s, %zu concept(s), %d thread(s)", model->model_id.c_str(), a.model.c_str(),
        a.classifier.c_str(), specs.size(), at::get_num_threads());
    Evaluation eval(a, model, clf);
    eval.Run(specs);
    std::vector<Evaluation::SeedTotals> seeds;
    if (!a.more_seeds.empty()) seeds.push_back({a.seed, eval.PromptTotals()});
    for (uint64_t seed : a.more_seeds) {
      Log("repeat with seed %llu (training and scoring only)", static_cast<unsigned long long>(seed));
      Args again = a;
      again.seed = seed;
      Evaluation repeat(again, model, clf);
      repeat.Run(specs, /*full=*/false);
      seeds.push_back({seed, repeat.PromptTotals()});
    }
    eval.WriteReport(command, seeds);
    Log("done in %.1f min", Elapsed() / 60);
    return 0;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}

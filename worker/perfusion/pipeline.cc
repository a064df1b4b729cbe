#include "perfusion/pipeline.h"

#include <ATen/Functions.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <set>

#include "perfusion/concept_token.h"
#include "perfusion/image_io.h"

namespace perfusion {
namespace {

constexpr int64_t kMaxTokens = 77;

bool IsNameChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-' || c == '@' || c == '.' ||
         (c >= 'A' && c <= 'Z');
}

GateParams EffectiveGate(const ConceptRef& ref) {
  // A zero temperature means "unset": use the concept's own default.
  return ref.gate.temperature > 0 ? ref.gate : ref.concept->default_gate;
}

}  // namespace

at::Tensor RegionMask(const PromptRegion& region, int64_t h, int64_t w) {
  TORCH_CHECK_VALUE(std::isfinite(region.x0) && std::isfinite(region.y0) && std::isfinite(region.x1) &&
                        std::isfinite(region.y1) && region.x0 >= 0 && region.y0 >= 0 && region.x1 <= 1 &&
                        region.y1 <= 1 && region.x0 < region.x1 && region.y0 < region.y1,
                    "region box must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got (", region.x0, ", ",
                    region.y0, ", ", region.x1, ", ", region.y1, ")");
  // Coverage of cell i ([i / n, (i + 1) / n]) by [a, b], as a fraction of the cell.
  auto coverage = [](double a, double b, int64_t n) {
    std::vector<float> c(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const double lo = std::max(a * n, static_cast<double>(i)), hi = std::min(b * n, static_cast<double>(i + 1));
      c[static_cast<size_t>(i)] = static_cast<float>(std::max(0.0, hi - lo));
    }
    return at::tensor(c, at::TensorOptions().dtype(at::kFloat));
  };
  const at::Tensor rows = coverage(region.y0, region.y1, h), cols = coverage(region.x0, region.x1, w);
  return at::outer(rows, cols).reshape({1, 1, h, w});
}

Pipeline::Pipeline(std::shared_ptr<StableDiffusion> model) : model_(std::move(model)) {
  TORCH_CHECK_VALUE(model_ && model_->unet && model_->text_encoder && model_->tokenizer,
                    "Pipeline: the model is not loaded");
  layers_ = model_->unet->cross_attention_layers();
}

void Pipeline::CheckConcept(const Concept& c) const {
  TORCH_CHECK_VALUE(c.base_model_id == model_->model_id, "concept '", c.name, "' was trained on base model '",
                    c.base_model_id, "', not on this model ('", model_->model_id, "')");
  TORCH_CHECK_VALUE(c.layers.size() == layers_.size(), "concept '", c.name, "' has ", c.layers.size(),
                    " layers; this model has ", layers_.size(), " cross-attention layers");
  for (size_t l = 0; l < layers_.size(); ++l) {
    TORCH_CHECK_VALUE(c.layers[l].name == layers_[l].name && c.layers[l].out_dim == layers_[l].to_v->weight.size(0),
                      "concept '", c.name, "': layer ", l, " is ", c.layers[l].name, " (", c.layers[l].out_dim,
                      ") but the model has ", layers_[l].name, " (", layers_[l].to_v->weight.size(0), ")");
  }
  TORCH_CHECK_VALUE(c.i_star.size(0) == model_->text_dim() && c.embedding.size(0) == model_->text_dim(),
                    "concept '", c.name, "' has width ", c.i_star.size(0), "; the text encoder has ", model_->text_dim());
  // The key-lock reads the superclass token's embedding by this id: it must be the superclass
  // word's own token (an id past the vocabulary would read a concept's embedding instead, and
  // another word's id would lock the keys to that word).
  const std::optional<int64_t> superclass_id = model_->tokenizer->SingleTokenId(c.superclass);
  TORCH_CHECK_VALUE(superclass_id.has_value() && *superclass_id == c.superclass_token_id, "concept '", c.name,
                    "': superclass_token_id ", c.superclass_token_id, " is not the token of its superclass '",
                    c.superclass, "'", superclass_id ? " (" + std::to_string(*superclass_id) + ")" : std::string(" (not one token)"));
}

PromptTokens Pipeline::Tokenize(const std::string& prompt, const std::map<std::string, ConceptRef>& concepts) const {
  const ClipTokenizer& tok = *model_->tokenizer;
  const int64_t V = model_->text_encoder->options().vocab_size();
  PromptTokens out;
  std::vector<int64_t> body, body_sup;
  std::vector<std::pair<size_t, std::string>> refs;  // (position in body, name)
  size_t i = 0, text_start = 0;
  auto flush_text = [&](size_t end) {
    if (end <= text_start) return;
    for (int64_t id : tok.Encode(prompt.substr(text_start, end - text_start))) {
      body.push_back(id);
      body_sup.push_back(id);
    }
  };
  while (i < prompt.size()) {
    if (prompt[i] != '<') {
      ++i;
      continue;
    }
    size_t j = i + 1;
    while (j < prompt.size() && IsNameChar(prompt[j])) ++j;
    if (j < prompt.size() && prompt[j] == '>' && j > i + 1) {
      flush_text(i);
      const std::string name = prompt.substr(i + 1, j - i - 1);
      auto it = concepts.find(name);
      TORCH_CHECK_VALUE(it != concepts.end() && it->second.concept, "prompt references unknown concept <", name, ">");
      CheckConcept(*it->second.concept);
      auto k = std::find(out.concepts.begin(), out.concepts.end(), name);
      if (k == out.concepts.end()) {
        out.concepts.push_back(name);
        k = out.concepts.end() - 1;
      }
      refs.emplace_back(body.size(), name);
      body.push_back(V + (k - out.concepts.begin()));
      body_sup.push_back(it->second.concept->superclass_token_id);
      i = j + 1;
      text_start = i;
    } else {
      ++i;  // a literal '<' (e.g. "a < b"): tokenized as text
    }
  }
  flush_text(prompt.size());
  const size_t max_body = kMaxTokens - 2;
  for (const auto& [pos, name] : refs) {
    TORCH_CHECK_VALUE(pos < max_body, "prompt is too long: concept <", name, "> falls after token ", max_body,
                      " and would be cut off");
  }
  body.resize(std::min(body.size(), max_body));
  body_sup.resize(body.size());
  out.ids.push_back(tok.bos_id());
  out.superclass_ids.push_back(tok.bos_id());
  for (size_t n = 0; n < body.size(); ++n) {
    out.ids.push_back(body[n]);
    out.superclass_ids.push_back(body_sup[n]);
  }
  while (static_cast<int64_t>(out.ids.size()) < kMaxTokens) {
    out.ids.push_back(tok.eos_id());
    out.superclass_ids.push_back(tok.eos_id());
  }
  for (const auto& r : refs) out.positions.push_back(static_cast<int64_t>(r.first) + 1);
  return out;
}

Pipeline::EditedPrompt Pipeline::PrepareEdits(const std::string& prompt,
                                               const std::map<std::string, ConceptRef>& concepts,
                                               MultiConceptMode mode, const std::vector<std::string>& also) const {
  EditedPrompt e;
  e.tokens = Tokenize(prompt, concepts);
  // Concepts edited without a token of their own come after the prompt's (token ids V + k refer to
  // the first ones only).
  for (const std::string& name : also) {
    TORCH_CHECK_VALUE(concepts.count(name), "concept <", name, "> is not loaded");
    if (std::find(e.tokens.concepts.begin(), e.tokens.concepts.end(), name) == e.tokens.concepts.end()) {
      e.tokens.concepts.push_back(name);
    }
  }
  const PromptTokens& t = e.tokens;
  const auto dev = model_->device;
  auto ids_tensor = [&](const std::vector<int64_t>& ids) {
    return at::tensor(ids, at::TensorOptions().dtype(at::kLong)).reshape({1, kMaxTokens}).to(dev);
  };
  if (t.concepts.empty()) {
    e.X = model_->text_encoder->forward(ids_tensor(t.ids));
    return e;
  }
  TORCH_CHECK_VALUE(model_->c_inv.defined(), "model has no perfusion/covariance.safetensors: cannot apply concepts");
  std::vector<at::Tensor> vecs, istar, isup;
  std::vector<GateParams> gates;
  bool any_global = false;
  std::vector<int64_t> key_ids = t.ids;  // K input: global concepts replaced by their superclass
  for (const auto& name : t.concepts) {
    const ConceptRef& ref = concepts.at(name);
    e.concepts.push_back(ref.concept.get());
    vecs.push_back(ref.concept->embedding);
    istar.push_back(ref.concept->i_star);
    isup.push_back(ref.concept->i_sup);
    gates.push_back(EffectiveGate(ref));
    if (ref.global_key_lock) any_global = true;
  }
  if (any_global) {
    for (size_t n = 0; n < key_ids.size(); ++n) {
      const int64_t id = key_ids[n];
      if (id >= model_->text_encoder->options().vocab_size() && concepts.at(t.concepts[id - model_->text_encoder->options().vocab_size()]).global_key_lock) {
        key_ids[n] = t.superclass_ids[n];
      }
    }
  }
  const at::Tensor table = model_->text_encoder->token_embedding_weight();
  const at::Tensor concept_vectors = at::stack(vecs).to(table.device(), table.scalar_type());
  e.I = at::stack(istar).to(dev);
  e.Isup = at::stack(isup).to(dev, at::kFloat);
  const at::Tensor embeds = EmbedWithConcepts(table, ids_tensor(t.ids), concept_vectors);
  if (!any_global) {
    e.X = model_->text_encoder->forward_embeds(embeds);
    e.Xk = e.X;
    e.g = ComputeConceptGates(e.X, e.I, model_->c_inv, gates, mode);
    e.gk = e.g;
    return e;
  }
  // Global key-locking encodes the prompt twice (as written, and with the superclass word for the
  // keys): one batch of two through the encoder and the gates, half the fixed cost of two calls.
  const at::Tensor both = model_->text_encoder->forward_embeds(
      at::cat({embeds, EmbedWithConcepts(table, ids_tensor(key_ids), concept_vectors)}));
  e.X = both.slice(0, 0, 1);
  e.Xk = both.slice(0, 1, 2);
  const ConceptGates g2 = ComputeConceptGates(both, e.I, model_->c_inv, gates, mode);
  auto half = [&](int64_t b) {
    return ConceptGates{g2.erase.slice(0, b, b + 1), g2.alpha.slice(0, b, b + 1), g2.gate.slice(0, b, b + 1)};
  };
  e.g = half(0);
  e.gk = half(1);
  return e;
}

PromptGates Pipeline::Gates(const std::string& prompt, const std::map<std::string, ConceptRef>& concepts,
                            MultiConceptMode mode) const {
  c10::InferenceMode guard;
  const EditedPrompt e = PrepareEdits(prompt, concepts, mode);
  PromptGates out;
  out.tokens = e.tokens;
  if (!e.concepts.empty()) {
    out.value_gate = e.g.gate[0].to(at::kCPU, at::kFloat);
    out.key_gate = e.gk.gate[0].to(at::kCPU, at::kFloat);
  }
  return out;
}

std::vector<CrossAttnKV> Pipeline::PromptKV(const std::string& prompt, const std::map<std::string, ConceptRef>& concepts,
                                            MultiConceptMode mode, const std::vector<std::string>& also,
                                            std::vector<std::string>* applied) const {
  c10::InferenceMode guard;
  const EditedPrompt e = PrepareEdits(prompt, concepts, mode, also);
  if (applied) applied->insert(applied->end(), e.tokens.concepts.begin(), e.tokens.concepts.end());
  if (e.concepts.empty()) return model_->unet->precompute_kv(e.X);
  const auto dev = model_->device;
  const std::vector<const Concept*>& cs = e.concepts;
  std::vector<CrossAttnKV> kv;
  kv.reserve(layers_.size());
  for (size_t l = 0; l < layers_.size(); ++l) {
    const at::Tensor& Wk = layers_[l].to_k->weight;
    const at::Tensor& Wv = layers_[l].to_v->weight;
    // Locked keys W_k i_sup (or, for a concept trained without key-locking, its learned K targets).
    at::Tensor Ok = at::matmul(e.Isup, Wk.to(at::kFloat).t());  // [K, O]
    std::vector<at::Tensor> ov;
    for (size_t k = 0; k < cs.size(); ++k) {
      ov.push_back(cs[k]->v_target(l));
      if (cs[k]->k_targets.defined()) Ok[k].copy_(cs[k]->k_target(l).to(Ok.device()));
    }
    const at::Tensor Ov = at::stack(ov).to(dev);
    kv.push_back({ApplyRank1Edit(e.Xk, Wk, e.I, Ok, e.gk), ApplyRank1Edit(e.X, Wv, e.I, Ov, e.g)});
  }
  return kv;
}

double Pipeline::DenoisingLoss(const std::string& prompt, const std::map<std::string, ConceptRef>& concepts,
                               const std::vector<at::Tensor>& images, uint64_t seed, int64_t draws) const {
  c10::InferenceMode guard;
  TORCH_CHECK_VALUE(!images.empty() && draws >= 1, "DenoisingLoss: need images and draws >= 1");
  TORCH_CHECK_VALUE(model_->vae, "the model was loaded without its VAE");
  const auto dev = model_->device;
  const auto dtype = model_->dtype;
  std::vector<at::Tensor> lat;
  for (const auto& img : images) {
    at::Tensor x = CenterCropResize(img.to(at::kFloat), static_cast<int>(model_->image_size())).unsqueeze(0);
    lat.push_back(model_->vae->encode(x.to(dev, dtype)).mode().to(at::kFloat) * model_->vae->scaling_factor());
  }
  const at::Tensor x0 = at::cat(lat);  // [N, C, h, w]
  const std::vector<CrossAttnKV> kv = PromptKV(prompt, concepts);
  DDPMScheduler ddpm(model_->scheduler);
  at::Generator gen = MakeGenerator(seed);
  double total = 0;
  for (int64_t d = 0; d < draws; ++d) {
    const at::Tensor t = ddpm.sample_timesteps(x0.size(0), gen, dev);
    const at::Tensor noise = ddpm.sample_noise(x0, gen);  // on the CPU generator, then moved to x0's device
    const at::Tensor eps = model_->unet->forward(ddpm.add_noise(x0, noise, t).to(dtype), t, kv).to(at::kFloat);
    total += (eps - ddpm.training_target(x0, noise, t)).pow(2).mean().item<double>();
  }
  return total / static_cast<double>(draws);
}

std::vector<GenerationResult> Pipeline::Generate(const std::vector<GenerationRequest>& requests,
                                                 const ProgressFn& progress) const {
  std::vector<GenerationResult> results(requests.size());
  std::vector<bool> done(requests.size(), false);
  std::vector<std::vector<size_t>> groups;
  for (size_t a = 0; a < requests.size(); ++a) {
    if (done[a]) continue;
    std::vector<size_t> index;
    for (size_t b = a; b < requests.size(); ++b) {
      const auto& x = requests[a];
      const auto& y = requests[b];
      if (!done[b] && x.steps == y.steps && x.sampler == y.sampler && x.width == y.width && x.height == y.height) {
        index.push_back(b);
        done[b] = true;
      }
    }
    groups.push_back(std::move(index));
  }
  // Groups run one after another. Progress counts over all of them, each group weighing its steps,
  // so it only rises and reaches the end with the last group (a callback told each group's own
  // (step, total) saw 100 % after the first group, then 0 % again).
  int64_t all_steps = 0;
  for (const auto& index : groups) all_steps += std::max<int64_t>(1, requests[index[0]].steps);
  int64_t steps_before = 0;
  for (const auto& index : groups) {
    std::vector<const GenerationRequest*> group;
    for (size_t b : index) group.push_back(&requests[b]);
    const int64_t group_steps = std::max<int64_t>(1, requests[index[0]].steps);
    ProgressFn group_progress;
    if (progress) {
      group_progress = [&, group_steps](int64_t step, int64_t total) {
        const int64_t within = total > 0 ? step * group_steps / total : 0;
        return progress(steps_before + within, all_steps);
      };
    }
    auto out = GenerateGroup(group, group_progress);
    for (size_t k = 0; k < index.size(); ++k) results[index[k]] = std::move(out[k]);
    steps_before += group_steps;
  }
  return results;
}

at::Tensor GuidedPrediction(const at::Tensor& uncond, const at::Tensor& cond, const at::Tensor& scale,
                            const at::Tensor& phi) {
  const at::Tensor guided = uncond + scale * (cond - uncond);
  // Per image, so a batch still equals its requests run one by one.
  const std::vector<int64_t> dims = {1, 2, 3};
  const at::Tensor ratio = cond.std(dims, /*unbiased=*/true, /*keepdim=*/true) /
                           guided.std(dims, /*unbiased=*/true, /*keepdim=*/true).clamp_min(1e-12);
  return phi * (guided * ratio) + (1 - phi) * guided;
}

std::vector<GenerationResult> Pipeline::GenerateGroup(const std::vector<const GenerationRequest*>& group,
                                                      const ProgressFn& progress) const {
  c10::InferenceMode guard;
  const GenerationRequest& first = *group[0];
  const int64_t f = model_->vae ? model_->vae->downsample_factor() : 8;
  const int64_t native = model_->image_size();
  const int64_t H = first.height > 0 ? first.height : native, W = first.width > 0 ? first.width : native;
  TORCH_CHECK_VALUE(H % f == 0 && W % f == 0, "width and height must be multiples of ", f, ", got ", W, "x", H);
  TORCH_CHECK_VALUE(first.steps >= 1 && first.steps <= model_->scheduler.num_train_timesteps,
                    "steps must be in [1, ", model_->scheduler.num_train_timesteps, "], got ", first.steps);
  TORCH_CHECK_VALUE(model_->vae, "the model was loaded without its VAE: cannot decode images");
  const auto dev = model_->device;
  const auto dtype = model_->dtype;
  const int64_t C = model_->latent_channels(), h = H / f, w = W / f;

  // Per request: noise from its own seed; K/V of the prompt and of the negative prompt.
  std::vector<at::Tensor> noise;
  std::vector<std::vector<CrossAttnKV>> cond_kv, uncond_kv;
  // Regions: one more conditional pass per image and region, on the image's latents with the
  // region's prompt, after the conditional half of the batch. Its prediction replaces the image's
  // own inside the box; region j of every image is blended at once, in order j = 0, 1, ... (a later
  // region wins). Per image, so a batch still equals its requests run one by one.
  struct RegionPass {
    std::vector<CrossAttnKV> kv;  // per layer, [1, S, inner]
    int64_t first_image = 0, count = 0;
    at::Tensor mask;  // [1, 1, h, w]
  };
  std::vector<std::vector<RegionPass>> by_rank(kMaxRegions);  // [j]: region j of each request that has one
  std::vector<int64_t> counts;
  bool any_cfg = false;
  int64_t n_images = 0;
  for (const GenerationRequest* r : group) {
    TORCH_CHECK_VALUE(r->num_images >= 1 && r->num_images <= 64, "num_images must be in [1, 64], got ", r->num_images);
    TORCH_CHECK_VALUE(r->regions.size() <= kMaxRegions, "at most ", kMaxRegions, " regions, got ", r->regions.size());
    std::vector<std::string> used;  // the concepts the prompt and its regions apply
    for (size_t j = 0; j < r->regions.size(); ++j) {
      const PromptRegion& region = r->regions[j];
      TORCH_CHECK_VALUE(!region.prompt.empty(), "a region's prompt is empty");
      at::Tensor mask = RegionMask(region, h, w);
      by_rank[j].push_back(
          {PromptKV(region.prompt, r->concepts, r->multi_concept_mode, {}, &used), n_images, r->num_images, mask});
    }
    n_images += r->num_images;
    TORCH_CHECK_VALUE(r->guidance_scale >= 0, "guidance_scale must be >= 0");
    TORCH_CHECK_VALUE(r->guidance_rescale >= 0 && r->guidance_rescale <= 1,
                      "guidance_rescale must be in [0, 1], got ", r->guidance_rescale);
    // Image n of a request draws its noise from seed + n: it equals a one-image request with that seed.
    for (int64_t n = 0; n < r->num_images; ++n) {
      at::Generator gen = MakeGenerator(r->seed + static_cast<uint64_t>(n));
      noise.push_back(at::randn({1, C, h, w}, gen, at::TensorOptions().dtype(at::kFloat)));
    }
    counts.push_back(r->num_images);
    cond_kv.push_back(PromptKV(r->prompt, r->concepts, r->multi_concept_mode, {}, &used));
    std::vector<std::string> uncond_also;
    if (r->edit_unconditional) {
      for (const std::string& name : used) {
        if (!r->concepts.at(name).global_key_lock) uncond_also.push_back(name);
      }
    }
    uncond_kv.push_back(PromptKV(r->negative_prompt, r->concepts, r->multi_concept_mode, uncond_also));
    if (r->guidance_scale > 1.0) any_cfg = true;
  }
  // Each rank's blend, precomputed: its rows among the region passes (contiguous), the images they
  // belong to (each at most once per rank), and their masks.
  struct RankBlend {
    int64_t first_row = 0;
    at::Tensor images, weight;  // [n] long, [n, 1, h, w]
  };
  std::vector<RankBlend> blends;
  std::vector<int64_t> region_image;  // the image (index in the conditional half) of each region pass row
  for (const auto& passes : by_rank) {
    if (passes.empty()) continue;
    const int64_t first_row = static_cast<int64_t>(region_image.size());
    std::vector<at::Tensor> weights;
    for (const RegionPass& p : passes) {
      for (int64_t n = 0; n < p.count; ++n) region_image.push_back(p.first_image + n);
      weights.push_back(p.mask.expand({p.count, 1, h, w}));
    }
    const std::vector<int64_t> images(region_image.begin() + first_row, region_image.end());
    blends.push_back({first_row, at::tensor(images, at::TensorOptions().dtype(at::kLong)).to(dev), at::cat(weights).to(dev)});
  }
  const at::Tensor region_index = at::tensor(region_image, at::TensorOptions().dtype(at::kLong)).to(dev);
  // The batch: [uncond of every image..., cond of every image..., region passes in rank order]
  // (uncond only if some request guides).
  std::vector<CrossAttnKV> kv(layers_.size());
  for (size_t l = 0; l < layers_.size(); ++l) {
    std::vector<at::Tensor> ks, vs;
    auto add = [&](const CrossAttnKV& src, int64_t count) {
      ks.push_back(src.k.expand({count, src.k.size(1), src.k.size(2)}));
      vs.push_back(src.v.expand({count, src.v.size(1), src.v.size(2)}));
    };
    for (int pass = any_cfg ? 0 : 1; pass < 2; ++pass) {
      for (size_t r = 0; r < group.size(); ++r) add(pass == 0 ? uncond_kv[r][l] : cond_kv[r][l], counts[r]);
    }
    for (const auto& passes : by_rank) {
      for (const RegionPass& p : passes) add(p.kv[l], p.count);
    }
    kv[l] = {at::cat(ks).to(dtype), at::cat(vs).to(dtype)};
  }
  std::vector<double> scale, rescale;
  bool any_rescale = false;
  for (size_t r = 0; r < group.size(); ++r) {
    for (int64_t n = 0; n < counts[r]; ++n) {
      scale.push_back(group[r]->guidance_scale);
      rescale.push_back(group[r]->guidance_rescale);
    }
    any_rescale = any_rescale || group[r]->guidance_rescale > 0;
  }
  const at::Tensor phi = at::tensor(rescale, at::TensorOptions().dtype(at::kDouble)).to(dev, at::kFloat).reshape({-1, 1, 1, 1});
  const at::Tensor guidance = at::tensor(scale, at::TensorOptions().dtype(at::kDouble)).to(dev, at::kFloat).reshape({-1, 1, 1, 1});
  const at::Tensor use_cfg = guidance > 1.0;

  std::unique_ptr<Sampler> sampler = MakeSampler(first.sampler, model_->scheduler);
  sampler->set_timesteps(first.steps);
  at::Tensor x = sampler->initial_latents(at::cat(noise).to(dev));
  const int64_t total = sampler->num_inference_steps();
  const at::Tensor& timesteps = sampler->timesteps();
  for (int64_t i = 0; i < total; ++i) {
    at::Tensor xin = sampler->scale_model_input(x, i);
    at::Tensor xb = any_cfg ? at::cat({xin, xin}) : xin;  // [uncond, cond, regions]
    if (!region_image.empty()) xb = at::cat({xb, xin.index_select(0, region_index)});
    const at::Tensor t = timesteps[i].expand({xb.size(0)}).to(dev);
    at::Tensor eps = model_->unet->forward(xb.to(dtype), t, kv).to(at::kFloat);
    if (!region_image.empty()) {
      const int64_t cond_start = any_cfg ? n_images : 0;
      at::Tensor cond = eps.slice(0, cond_start, cond_start + n_images).clone();
      const at::Tensor regional = eps.slice(0, cond_start + n_images);  // [region passes, C, h, w]
      for (const RankBlend& b : blends) {
        const at::Tensor own = cond.index_select(0, b.images);
        const at::Tensor theirs = regional.slice(0, b.first_row, b.first_row + b.images.size(0));
        cond.index_copy_(0, b.images, own + b.weight * (theirs - own));
      }
      eps = any_cfg ? at::cat({eps.slice(0, 0, n_images), cond}) : cond;
    }
    if (any_cfg) {
      auto parts = eps.chunk(2);
      at::Tensor guided = any_rescale ? GuidedPrediction(parts[0], parts[1], guidance, phi)
                                      : parts[0] + guidance * (parts[1] - parts[0]);
      eps = at::where(use_cfg, guided, parts[1]);
    }
    x = sampler->step(eps, i, x).prev_sample;
    if (progress && !progress(i + 1, total)) throw CancelledError();
  }
  at::Tensor images = model_->vae->decode((x / model_->vae->scaling_factor()).to(dtype)).to(at::kFloat);
  // NaN survives clamp and would leave as a black PNG reported as a success. A value error, so a
  // worker re-runs a failed batch request by request and fails only the one at fault.
  TORCH_CHECK_VALUE(at::isfinite(images).all().item<bool>(),
                    "the generation overflowed (non-finite values in the images): a concept's values, the guidance "
                    "or the model's precision is out of range");
  images = images.clamp(-1, 1).cpu();
  std::vector<GenerationResult> out(group.size());
  int64_t offset = 0;
  for (size_t r = 0; r < group.size(); ++r) {
    for (int64_t n = 0; n < counts[r]; ++n) out[r].images.push_back(images[offset + n].clone());
    offset += counts[r];
  }
  return out;
}

}  // namespace perfusion

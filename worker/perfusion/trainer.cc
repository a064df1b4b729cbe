#include "perfusion/trainer.h"

#include <ATen/Functions.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/optim/adamw.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>

#include "perfusion/concept_token.h"
#include "perfusion/image_io.h"
#include "perfusion/pipeline.h"
#include "perfusion/scheduler.h"

namespace perfusion {
namespace {

std::string Fill(const std::string& tmpl, const std::string& word) {
  std::string out = tmpl;
  auto pos = out.find("{}");
  TORCH_CHECK_VALUE(pos != std::string::npos, "prompt template '", tmpl, "' has no {} for the superclass word");
  out.replace(pos, 2, word);
  return out;
}

// Swaps the whole words "left" and "right" (any case of the first letter kept as written).
std::string MirrorWords(const std::string& text) {
  std::string out;
  size_t i = 0;
  auto is_letter = [](char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); };
  while (i < text.size()) {
    if (!is_letter(text[i])) {
      out += text[i++];
      continue;
    }
    size_t j = i;
    while (j < text.size() && is_letter(text[j])) ++j;
    const std::string word = text.substr(i, j - i);
    if (word == "left") out += "right";
    else if (word == "right") out += "left";
    else if (word == "Left") out += "Right";
    else if (word == "Right") out += "Left";
    else out += word;
    i = j;
  }
  return out;
}

// Whether `text` holds `word` as a whole word (letters only, any case) outside its "{}".
bool UsesWord(const std::string& text, const std::string& word) {
  std::string rest;
  for (char ch : text) rest += std::isalpha(static_cast<unsigned char>(ch)) ? static_cast<char>(std::tolower(ch)) : ' ';
  std::string lower;
  for (char ch : word) lower += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return (" " + rest + " ").find(" " + lower + " ") != std::string::npos;
}

}  // namespace

std::vector<std::string> TrainingPrompts(const TrainOptions& o, size_t index, bool flipped) {
  std::vector<std::string> out;
  if (o.captions.empty()) {
    // The concept is found by its superclass token (its first occurrence), so a template that
    // already holds the word ("a photo of a {}" for the superclass "photo") would train the
    // template's word instead of the concept's place: such templates are left out.
    const auto& templates = o.templates.empty() ? DefaultTemplates() : o.templates;
    for (const auto& t : templates) {
      const size_t mark = t.find("{}");
      TORCH_CHECK_VALUE(mark == std::string::npos || t.find("{}", mark + 2) == std::string::npos,
                        "prompt template '", t, "' has {} more than once");
      if (!UsesWord(t, o.superclass)) out.push_back(Fill(t, o.superclass));
    }
    TORCH_CHECK_VALUE(!out.empty(), "superclass: every prompt template already uses the word '", o.superclass,
                      "' besides {}, so the concept's place cannot be told apart; choose another superclass "
                      "or give captions");
    return out;
  }
  TORCH_CHECK_VALUE(index < o.captions.size(), "captions: ", o.captions.size(), " caption(s) for training image ", index);
  const std::string& c = o.captions[index];
  const size_t mark = c.find("{}");
  TORCH_CHECK_VALUE(mark != std::string::npos, "captions[", index, "]: '", c,
                    "' has no {} marking where the concept goes");
  TORCH_CHECK_VALUE(c.find("{}", mark + 2) == std::string::npos, "captions[", index, "]: '", c,
                    "' has {} more than once; it marks the concept's one place");
  // The concept is found by its superclass token, so the word must not occur anywhere else.
  TORCH_CHECK_VALUE(!UsesWord(c, o.superclass), "captions[", index, "]: '", c, "' uses the superclass word '",
                    o.superclass, "' besides {}; it would train as the concept too");
  out.push_back(Fill(flipped ? MirrorWords(c) : c, o.superclass));
  return out;
}

LatentPrompts EncodeLatentPrompts(const ClipTokenizer& tokenizer, const TrainOptions& o, size_t num_images,
                                  int flips) {
  auto encode = [&](size_t index, bool flipped) {
    std::vector<std::vector<int64_t>> ids;
    for (const auto& text : TrainingPrompts(o, index, flipped)) ids.push_back(tokenizer.EncodePadded(text).ids);
    return ids;
  };
  LatentPrompts out;
  // Templates are the same for every latent: tokenized once.
  const std::vector<std::vector<int64_t>> shared = o.captions.empty() ? encode(0, false) : std::vector<std::vector<int64_t>>{};
  for (size_t i = 0; i < num_images; ++i) {
    for (int flip = 0; flip < flips; ++flip) {
      out.ids.push_back(o.captions.empty() ? shared : encode(i, flip == 1));
      out.max_prompts = std::max(out.max_prompts, out.ids.back().size());
    }
  }
  return out;
}

const std::vector<std::string>& DefaultTemplates() {
  static const std::vector<std::string> t = {
      "a photo of a {}",     "a rendering of a {}",  "a picture of a {}",   "an image of a {}",
      "a photo of the {}",   "a good photo of a {}", "a close photo of a {}", "a {}",
      "a photo of a small {}", "a photo of a large {}", "a {} shown in a photo", "a clean photo of the {}",
  };
  return t;
}

at::Tensor ForegroundMask(const at::Tensor& image, int64_t factor, double mask_min, double mask_distance) {
  TORCH_CHECK_VALUE(image.dim() == 3 && image.size(0) == 3, "ForegroundMask: image must be [3, H, W], got ", image.sizes());
  TORCH_CHECK_VALUE(factor >= 1 && image.size(1) % factor == 0 && image.size(2) % factor == 0,
                    "ForegroundMask: image ", image.sizes(), " is not divisible by ", factor);
  const at::Tensor img = image.to(at::kFloat);
  const int64_t H = img.size(1), W = img.size(2);
  // Border pixels: first/last row and column.
  const at::Tensor border = at::cat({img.select(1, 0), img.select(1, H - 1), img.select(2, 0), img.select(2, W - 1)}, 1);  // [3, 2H+2W]
  const at::Tensor bg = std::get<0>(border.median(1)).reshape({3, 1, 1});
  const at::Tensor dist = (img - bg).pow(2).sum(0).sqrt();  // [H, W]
  at::Tensor m = (dist / mask_distance).clamp(0, 1);
  m = at::avg_pool2d(m.reshape({1, 1, H, W}), {factor, factor}).reshape({H / factor, W / factor});
  const double mx = m.max().item<double>();
  if (mx <= 0) return at::ones_like(m);  // nothing stands out: weight everything
  return (m / mx).clamp_min(mask_min);
}

namespace {

void CheckRate(const char* name, double v) {
  TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0, name, " must be a finite number >= 0, got ", v);
}

}  // namespace

void CheckTrainOptions(const TrainOptions& o) {
  TORCH_CHECK_VALUE(o.steps >= 1, "steps must be >= 1, got ", o.steps);
  TORCH_CHECK_VALUE(o.batch_size >= 1, "batch_size must be >= 1, got ", o.batch_size);
  TORCH_CHECK_VALUE(o.resolution >= 0, "resolution must be >= 0 (0: the model's own), got ", o.resolution);
  CheckRate("lr_embedding", o.lr_embedding);
  CheckRate("lr_values", o.lr_values);
  CheckRate("weight_decay", o.weight_decay);
  TORCH_CHECK_VALUE(o.mask_min >= 0 && o.mask_min <= 1, "mask_min must be in [0, 1], got ", o.mask_min);
  TORCH_CHECK_VALUE(std::isfinite(o.mask_distance) && o.mask_distance > 0, "mask_distance must be > 0, got ",
                    o.mask_distance);
  CheckGateRange(o.default_gate, "default_gate.beta", "default_gate.temperature");
  CheckGateRange({o.edit.train_beta(), o.edit.train_temperature()}, "edit.train_beta", "edit.train_temperature");
  CheckGateRange({o.edit.eval_beta(), o.edit.eval_temperature()}, "edit.eval_beta", "edit.eval_temperature");
  TORCH_CHECK_VALUE(o.edit.input_decay() >= 0 && o.edit.input_decay() < 1, "edit.input_decay must be in [0, 1), got ",
                    o.edit.input_decay());
}

Concept TrainConcept(StableDiffusion& model, const std::vector<at::Tensor>& images, const TrainOptions& o) {
  TORCH_CHECK_VALUE(!o.name.empty(), "name: a concept needs a name");
  TORCH_CHECK_VALUE(!images.empty(), "images: at least one training image is needed");
  CheckTrainOptions(o);
  TORCH_CHECK_VALUE(model.c_inv.defined(), "the model has no perfusion/covariance.safetensors: cannot train concepts");
  TORCH_CHECK_VALUE(model.vae, "the model was loaded without its VAE: cannot encode training images");
  const auto superclass_id = model.tokenizer->SingleTokenId(o.superclass);
  TORCH_CHECK_VALUE(!o.superclass.empty() && superclass_id.has_value(), "superclass: '", o.superclass,
                    "' is not a single token of the vocabulary (", model.tokenizer->Encode(o.superclass).size(),
                    " tokens); choose a one-word superclass such as \"dog\"");
  TORCH_CHECK_VALUE(o.captions.empty() || o.captions.size() == images.size(), "captions: ", o.captions.size(),
                    " caption(s) for ", images.size(), " image(s); give one per image or none");
  const auto dev = model.device;
  const auto dtype = model.dtype;
  const int64_t f = model.vae->downsample_factor();
  const int64_t size = o.resolution > 0 ? o.resolution : model.image_size();
  TORCH_CHECK_VALUE(size % (f * 8) == 0 || size == model.image_size(), "resolution: ", size,
                    " must be a multiple of ", f * 8, " (or the model's native ", model.image_size(), ")");
  const auto start = std::chrono::steady_clock::now();

  // Latents, masks and prompts of every image and its mirror image, computed once.
  const LatentPrompts prompts_of = EncodeLatentPrompts(*model.tokenizer, o, images.size(), o.flip ? 2 : 1);
  // Every prompt must hold the superclass token where the concept goes; a caption such as "two {}s"
  // gives "two dogs", another token. Checked here, before any step, rather than at the first step
  // that happens to draw that image.
  for (size_t k = 0; k < prompts_of.ids.size(); ++k) {
    for (const auto& ids : prompts_of.ids[k]) {
      if (std::find(ids.begin(), ids.end(), *superclass_id) != ids.end()) continue;
      const std::string where =
          o.captions.empty() ? "templates" : "captions[" + std::to_string(k / (o.flip ? 2 : 1)) + "]";
      TORCH_CHECK_VALUE(false, where, ": a prompt does not hold the superclass token '", o.superclass,
                        "' (the concept's place must be a word of its own: '{}s' or 'hot{}' makes another word)");
    }
  }
  std::vector<at::Tensor> latents, masks;
  {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < images.size(); ++i) {
      TORCH_CHECK_VALUE(images[i].dim() == 3 && images[i].size(0) == 3, "images[", i, "]: must be [3, H, W], got ",
                        images[i].sizes());
      at::Tensor img = CenterCropResize(images[i].to(at::kFloat), static_cast<int>(size));
      for (int flip = 0; flip < (o.flip ? 2 : 1); ++flip) {
        at::Tensor im = flip ? img.flip({2}) : img;
        latents.push_back(model.vae->encode(im.unsqueeze(0).to(dev, dtype)).mode().to(at::kFloat) * model.vae->scaling_factor());
        masks.push_back(o.masked_loss ? ForegroundMask(im, f, o.mask_min, o.mask_distance).to(dev)
                                      : at::ones({size / f, size / f}, at::TensorOptions().device(dev)));
      }
    }
  }

  ConceptToken token(model.text_encoder->token_embedding_weight(), *superclass_id);
  const auto layers = model.unet->cross_attention_layers();
  std::vector<Rank1Edit> k_edits, v_edits;
  std::vector<at::Tensor> value_params;
  for (const auto& layer : layers) {
    k_edits.emplace_back(layer.to_k->weight, model.c_inv, Rank1EditOptions(o.edit).is_key_proj(o.lock_keys));
    if (!o.lock_keys) value_params.push_back(k_edits.back()->o_star());
    v_edits.emplace_back(layer.to_v->weight, model.c_inv, Rank1EditOptions(o.edit).is_key_proj(false));
    value_params.push_back(v_edits.back()->o_star());
  }
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<at::Tensor>{token->embedding()},
                      std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(o.lr_embedding).weight_decay(o.weight_decay)));
  groups.emplace_back(value_params,
                      std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(o.lr_values).weight_decay(o.weight_decay)));
  torch::optim::AdamW optimizer(std::move(groups));

  // fp16 models (a GPU worker's --dtype fp16): the masked mean-squared loss's gradients, about 1e-5
  // and below, are subnormal or zero in half precision on their way back through the UNet and the
  // text encoder. Dynamic loss scaling, as torch.cuda.amp.GradScaler: the loss is multiplied by
  // `scale` before backward and the (float32) gradients divided by it; a step whose gradients
  // overflowed is skipped and the scale halved; 200 good steps double it. bf16 and fp32: scale 1.
  const bool scaled = dtype == at::kHalf;
  double scale = scaled ? 65536.0 : 1.0;
  int64_t good_steps = 0, skipped_steps = 0;
  std::vector<at::Tensor> all_params = value_params;
  all_params.push_back(token->embedding());

  DDPMScheduler ddpm(model.scheduler);
  at::Generator gen = MakeGenerator(o.seed);
  const int64_t B = o.batch_size;
  TrainProgress p;
  p.total = o.steps;
  // The ETA counts the steps' pace only: the images' encoding above (for SD 1.5, 40 VAE passes at
  // 512 px) spread over the first steps made the early ETA several times too long.
  const auto steps_start = std::chrono::steady_clock::now();
  for (int64_t step = 1; step <= o.steps; ++step) {
    const at::Tensor pick = at::randint(static_cast<int64_t>(latents.size()), {B}, gen, at::TensorOptions().dtype(at::kLong));
    // One draw per item whatever the prompt lists hold, so runs without captions keep their sequence.
    const at::Tensor tmpl = at::randint(static_cast<int64_t>(prompts_of.max_prompts), {B}, gen, at::TensorOptions().dtype(at::kLong));
    std::vector<at::Tensor> lat, msk;
    std::vector<int64_t> ids;
    for (int64_t b = 0; b < B; ++b) {
      lat.push_back(latents[pick[b].item<int64_t>()]);
      msk.push_back(masks[pick[b].item<int64_t>()]);
      const auto& pid = prompts_of.Pick(pick[b].item<int64_t>(), tmpl[b].item<int64_t>());
      ids.insert(ids.end(), pid.begin(), pid.end());
    }
    const at::Tensor x0 = at::cat(lat);  // [B, C, h, w]
    const at::Tensor mask = at::stack(msk).unsqueeze(1);  // [B, 1, h, w]
    const at::Tensor id_tensor = at::tensor(ids, at::TensorOptions().dtype(at::kLong)).reshape({B, -1}).to(dev);
    const ConceptPromptBatch prompts = token->forward(id_tensor);
    const at::Tensor X = model.text_encoder->forward_embeds(prompts.concept_embeds.to(dtype));
    at::Tensor X_sup;
    {
      torch::NoGradGuard no_grad;
      X_sup = model.text_encoder->forward_embeds(prompts.superclass_embeds.to(dtype));
    }
    std::vector<CrossAttnKV> kv;
    kv.reserve(layers.size());
    for (size_t l = 0; l < layers.size(); ++l) {
      kv.push_back({k_edits[l]->training_forward(X, X_sup, prompts.concept_index),
                    v_edits[l]->training_forward(X, X_sup, prompts.concept_index)});
    }
    // Drawn on the generator's device (the CPU) and moved: a CPU generator cannot fill a CUDA tensor.
    const at::Tensor noise = ddpm.sample_noise(x0, gen);
    const at::Tensor t = ddpm.sample_timesteps(B, gen, dev);
    const at::Tensor noisy = ddpm.add_noise(x0, noise, t);
    const at::Tensor target = ddpm.training_target(x0, noise, t);
    const at::Tensor pred = model.unet->forward(noisy.to(dtype), t, kv).to(at::kFloat);
    const at::Tensor loss = ((pred - target).pow(2) * mask).mean() / mask.mean();
    optimizer.zero_grad();
    if (!scaled) {
      loss.backward();
      optimizer.step();
    } else {
      (loss * scale).backward();
      // One device sync per step for the overflow check, not one per parameter.
      std::vector<at::Tensor> finite_parts;
      for (auto& param : all_params) {
        if (!param.grad().defined()) continue;
        param.mutable_grad().div_(scale);
        finite_parts.push_back(param.grad().isfinite().all());
      }
      const bool finite = finite_parts.empty() || at::stack(finite_parts).all().item<bool>();
      if (finite) {
        optimizer.step();
        if (++good_steps % 200 == 0) scale *= 2;
      } else {
        ++skipped_steps;
        good_steps = 0;  // as GradScaler: growth counts good steps since the last overflow
        scale /= 2;
        TORCH_CHECK_VALUE(scale >= 1.0, "training diverged: the gradients are not finite at any loss scale (step ",
                          step, " of ", o.steps, ")");
      }
    }

    p.step = step;
    p.loss = loss.item<double>();
    // A diverged run only wastes the rest of its steps: its concept would hold non-finite values,
    // which no store accepts.
    TORCH_CHECK_VALUE(std::isfinite(p.loss), "training diverged: the loss is ", p.loss, " at step ", step, " of ",
                      o.steps, "; lower the learning rates (lr_values ", o.lr_values, ", lr_embedding ",
                      o.lr_embedding, ")");
    p.loss_ema = step == 1 ? p.loss : 0.95 * p.loss_ema + 0.05 * p.loss;
    const auto now = std::chrono::steady_clock::now();
    p.elapsed_s = std::chrono::duration<double>(now - start).count();
    p.eta_s = std::chrono::duration<double>(now - steps_start).count() / step * (o.steps - step);
    if (o.progress && !o.progress(p)) throw CancelledError();
  }

  Concept c;
  c.name = o.name;
  c.superclass = o.superclass;
  c.superclass_token_id = *superclass_id;
  c.base_model_id = model.model_id;
  c.default_gate = o.default_gate;
  std::vector<at::Tensor> v;
  for (size_t l = 0; l < layers.size(); ++l) {
    c.layers.push_back({layers[l].name, layers[l].to_v->weight.size(0)});
    v.push_back(v_edits[l]->o_star().detach()[0].to(at::kCPU, at::kFloat));
  }
  c.v_targets = at::cat(v);
  if (!o.lock_keys) {
    std::vector<at::Tensor> k;
    for (size_t l = 0; l < layers.size(); ++l) k.push_back(k_edits[l]->o_star().detach()[0].to(at::kCPU, at::kFloat));
    c.k_targets = at::cat(k);
    c.info["key_lock"] = "false";
  }
  c.embedding = token->embedding().detach().to(at::kCPU, at::kFloat).clone();
  c.i_star = k_edits[0]->i_star()[0].to(at::kCPU, at::kFloat).clone();
  c.i_sup = k_edits[0]->i_sup()[0].to(at::kCPU, at::kFloat).clone();
  c.info["steps"] = std::to_string(o.steps);
  c.info["batch_size"] = std::to_string(B);
  c.info["seed"] = std::to_string(o.seed);
  c.info["images"] = std::to_string(images.size());
  c.info["final_loss"] = std::to_string(p.loss_ema);
  c.info["train_seconds"] = std::to_string(p.elapsed_s);
  c.info["masked_loss"] = o.masked_loss ? "true" : "false";
  if (!o.captions.empty()) c.info["captions"] = "per image";
  if (scaled) c.info["fp16_skipped_steps"] = std::to_string(skipped_steps);
  return c;
}

}  // namespace perfusion

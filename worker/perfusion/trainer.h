// trainer: Perfusion training of one concept on a frozen base model (spec §5).
//
// What trains: the concept's token embedding (lr 0.006) and the V target of every cross-attention
// layer (lr 0.03), with AdamW in two parameter groups (spec §5.3/§5.4: the reference's 0.1 gradient
// trick is a no-op under Adam). K targets are locked to the superclass (EMA of W_k x_sup); i* is an
// EMA of the concept token's encoding (decay 0.99); training gate beta = 0.75, tau = 0.1.
//
// Per step: a batch of training images (random horizontal flips) with prompts from templates
// ("a photo of a {}") or the images' own captions, where {} is the superclass word; the concept token
// replaces it, the concept
// prompt and the superclass prompt run through the COMPLETE text encoder, every attn2 K/V goes through
// its Rank1Edit's training forward, and the loss is the epsilon-prediction MSE at a uniformly drawn
// DDPM timestep.
//
// Masked loss (on by default): the paper weights the loss by a zero-shot foreground mask. Without an
// extra segmentation model we derive it from the image itself: the background colour is estimated
// as the median of the image border, a pixel's foreground weight grows with its colour distance from
// it (soft, saturating at `mask_distance`), the map is average-pooled to latent resolution, divided by
// its max and floored at `mask_min`. This fits object photos on plain or simple backgrounds (the
// shapes world, product shots); on cluttered backgrounds it degrades towards a uniform weight.
//
// Deterministic for a seed on a given device, build and thread count (all randomness from one
// generator): bit for bit on the CPU, where another thread count changes float sums (~4e-5 after 20
// steps). On CUDA, convolution backward passes are not deterministic unless LibTorch is told so.
// The concept's info["final_loss"] is the smoothed loss (TrainProgress::loss_ema, factor 0.95) at
// the last step; on runs of a few dozen steps it still weighs the first steps.
// Thread safety: reads the model only; several trainings may share a model.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "perfusion/concept.h"
#include "perfusion/model_dir.h"
#include "perfusion/rank1_edit.h"

namespace perfusion {

struct TrainProgress {
  int64_t step = 0;
  int64_t total = 0;
  double loss = 0;       // this step's loss
  double loss_ema = 0;   // smoothed loss
  double elapsed_s = 0;
  double eta_s = 0;
};

struct TrainOptions {
  std::string name;        // the concept's name (required)
  std::string superclass;  // one-token superclass word, e.g. "dog" (required)
  int64_t steps = 400;
  int64_t batch_size = 4;
  int64_t resolution = 0;  // training image side in pixels; 0 = the model's native size
  double lr_embedding = 0.006;
  double lr_values = 0.03;
  double weight_decay = 0.01;
  uint64_t seed = 0;
  // Prompt templates; "{}" is replaced by the superclass word. Empty = a built-in list.
  std::vector<std::string> templates;
  // Per-image captions, one per training image, each with "{}" where the concept goes ("a small {}
  // in the top left on a blue background"). When set they replace the templates: image i always
  // trains with captions[i], and its mirror image with "left" and "right" swapped. Saying what else
  // is in a picture (where, how large, on what) lets the other words carry it, so the concept has to
  // learn less of its training images' context; hosted fine-tuning APIs and LoRA trainers take
  // captions for the same reason.
  std::vector<std::string> captions;
  bool flip = true;
  // Key-locking (the method). false trains the K targets like the V targets (the paper's "trained K"
  // ablation); the concept then stores its K targets too.
  bool lock_keys = true;
  bool masked_loss = true;
  double mask_min = 0.05;
  double mask_distance = 0.25;  // colour distance (images in [-1, 1]) at which a pixel is fully foreground
  Rank1EditOptions edit;         // train beta/tau, EMA decay, straight-through
  GateParams default_gate;       // stored in the concept: the inference beta/tau it suggests
  // Called after every step; return false to cancel (TrainConcept then throws CancelledError).
  std::function<bool(const TrainProgress&)> progress;
};

// Throws c10::ValueError naming the first option out of its range: steps and batch_size >= 1,
// resolution >= 0, learning rates and weight decay finite and >= 0, every beta in [0, 1] and every
// temperature in (0, 1] (the gate of spec §3: a beta above 1 never opens it, a temperature <= 0
// turns it around), mask_min in [0, 1], mask_distance > 0, input_decay in [0, 1). TrainConcept
// calls it first; a tool calls it before loading the model, so a bad flag costs no time.
void CheckTrainOptions(const TrainOptions& options);

// The built-in prompt templates (textual-inversion style).
const std::vector<std::string>& DefaultTemplates();

// The prompts (with the superclass word in place of "{}") that training may pair with training image
// `index`, or with its mirror image when `flipped`: every template, or that image's caption with the
// words "left" and "right" swapped when flipped. Throws c10::ValueError naming the template or
// caption that has no "{}".
std::vector<std::string> TrainingPrompts(const TrainOptions& options, size_t index, bool flipped);

// TrainingPrompts of every training latent, tokenized: latent 2i + f (f = 0, or 1 for the mirror image
// when `flips` is 2) is image i. A step draws one index below `max_prompts` per batch item and takes
// it modulo that latent's list (Pick), so runs with templates keep one random sequence.
struct LatentPrompts {
  std::vector<std::vector<std::vector<int64_t>>> ids;  // [latent][prompt] -> padded token ids
  size_t max_prompts = 1;
  const std::vector<int64_t>& Pick(int64_t latent, int64_t draw) const {
    const auto& choices = ids[static_cast<size_t>(latent)];
    return choices[static_cast<size_t>(draw) % choices.size()];
  }
};
LatentPrompts EncodeLatentPrompts(const ClipTokenizer& tokenizer, const TrainOptions& options, size_t num_images,
                                  int flips);

// Trains one concept from `images` ([3, H, W] float in [-1, 1], any size: centre-cropped and resized
// to the model's resolution with image_io's CenterCropResize). Throws c10::ValueError for bad options (no images, empty name, a
// superclass that is not one token, ...), CancelledError when cancelled.
Concept TrainConcept(StableDiffusion& model, const std::vector<at::Tensor>& images, const TrainOptions& options);

// The foreground weight map the masked loss uses, for one image [3, H, W] -> [H/f, W/f] in [mask_min, 1].
at::Tensor ForegroundMask(const at::Tensor& image, int64_t factor, double mask_min, double mask_distance);

}  // namespace perfusion

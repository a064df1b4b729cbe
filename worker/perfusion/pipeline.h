// pipeline: text-to-image with several Perfusion concepts per prompt (classifier-free guidance,
// negative prompt, seeds, DDIM/Euler), and batches of requests with different concepts in one UNet
// batch.
//
// Prompt syntax: `<name>` refers to a concept passed with the request ("a photo of <rex> on a beach");
// names are letters, digits and `_-.@` (the service uses `<rex@2>` for version 2).
// Each reference becomes one token: the concept's learned embedding, at token id V + k (k: the
// concept's place among the prompt's distinct concepts). The text around it is tokenized as usual;
// a reference is a word boundary ("<rex>s" is "<rex> s").
//
// Concepts act only through the cross-attention K/V, which depend only on the text: for each prompt
// the text encoder runs once, the gates are computed once (ComputeConceptGates, shared by every layer),
// and every attn2 K/V is computed once with the edits, then reused at every denoising step. A prompt
// that references no concept gets the plain projections: exactly the base model.
//
// Key-locking (spec §2): local (default) feeds the K projections the concept prompt's encodings;
// global feeds them the encodings of the prompt with that concept's superclass word (an extra text
// encoder pass), so the whole prompt's keys are the superclass prompt's.
//
// Thread safety: a Pipeline only reads the model; Generate() may run concurrently from several threads.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "perfusion/concept.h"
#include "perfusion/model_dir.h"
#include "perfusion/prompt_region.h"
#include "perfusion/rank1_edit.h"
#include "perfusion/unet.h"

namespace perfusion {

// Thrown when a progress callback asks to stop.
class CancelledError : public std::runtime_error {
 public:
  CancelledError() : std::runtime_error("cancelled") {}
};

// Progress callback: (step done, total steps). Return false to cancel (throws CancelledError).
using ProgressFn = std::function<bool(int64_t step, int64_t total)>;

struct ConceptRef {
  std::shared_ptr<const Concept> concept;
  // beta / temperature at inference. A temperature <= 0 means "the concept's default_gate"; note
  // that GateParams{} is the paper's (0.7, 0.15), not unset.
  GateParams gate;
  bool global_key_lock = false;  // spec §2
};

// A region's weight per latent cell: the fraction of the cell inside the box. [1, 1, h, w] float32.
at::Tensor RegionMask(const PromptRegion& region, int64_t h, int64_t w);

struct GenerationRequest {
  std::string prompt;
  std::string negative_prompt;                  // "" = the unconditional prompt
  std::map<std::string, ConceptRef> concepts;   // by the name used in the prompt
  int64_t steps = 30;
  double guidance_scale = 7.5;                  // <= 1: no classifier-free guidance
  // Guidance rescale phi in [0, 1] (Lin et al. 2023, eq. 16): the guided prediction is rescaled to
  // the conditional prediction's standard deviation, mixed phi : 1 - phi with the plain guided one.
  // Counters the over-exposure of strong guidance on zero-terminal-SNR models; 0 = off.
  double guidance_rescale = 0.0;
  uint64_t seed = 0;                            // image n uses seed + n
  int64_t num_images = 1;
  int64_t width = 0, height = 0;                // 0: the model's native size
  std::string sampler = "ddim";                 // "ddim" | "euler"
  MultiConceptMode multi_concept_mode = MultiConceptMode::kApproximate;
  // At most kMaxRegions; where boxes overlap the later region wins. The negative prompt has none.
  std::vector<PromptRegion> regions;
  // Spec §5.5 (the reference's behaviour): the unconditional (negative-prompt) half of guidance
  // also goes through the edits of the locally key-locked concepts the prompt (or a region) uses,
  // with gates computed on its own tokens (near zero, but the erase term is not gated). Globally
  // locked concepts are left out: on the tiny model that lowered their fidelity from 33 % to 23 %,
  // while local locking rose from 27 % / 84 % to 32 % / 87 % (docs/quality.md). false: that half
  // is the base model's unless the negative prompt itself names a concept. A prompt without
  // concepts is the base model's either way.
  bool edit_unconditional = true;
};

// Classifier-free guidance of one UNet batch's two halves: uncond + scale * (cond - uncond), then
// rescaled per image to cond's standard deviation with weight phi (GenerationRequest::
// guidance_rescale; phi = 0 leaves it). scale, phi: scalars or [B, 1, 1, 1].
at::Tensor GuidedPrediction(const at::Tensor& uncond, const at::Tensor& cond, const at::Tensor& scale,
                            const at::Tensor& phi);

struct GenerationResult {
  std::vector<at::Tensor> images;  // [3, H, W] float32 in [-1, 1], on the CPU
};

// A tokenized prompt with its concept positions.
struct PromptTokens {
  std::vector<int64_t> ids;             // 77 ids, concept k at V + k
  std::vector<int64_t> superclass_ids;  // the same with each concept's superclass token
  std::vector<std::string> concepts;    // names of the distinct concepts, in order k
  std::vector<int64_t> positions;       // every concept token's position
};

// Where each concept's edit acts in a prompt: the gate g_c(e) of every token position (1.0: the
// token's output is replaced by the concept's target; 0: left as the base model's).
struct PromptGates {
  PromptTokens tokens;
  at::Tensor value_gate;  // [77, K] float32 on the CPU, concepts in tokens.concepts order (undefined: K = 0)
  at::Tensor key_gate;    // the same for the K projections (differs under global key-locking)
};

class Pipeline {
 public:
  explicit Pipeline(std::shared_ptr<StableDiffusion> model);

  StableDiffusion& model() const { return *model_; }

  // Parses `<name>` references. c10::ValueError naming the problem for an unknown concept, a concept
  // of another base model, an over-long prompt that would cut off a concept, or a malformed reference.
  PromptTokens Tokenize(const std::string& prompt, const std::map<std::string, ConceptRef>& concepts) const;

  // Cross-attention K/V of every attn2 layer for one prompt ([1, 77, O] each), edits applied.
  // `also`: concepts (by name in `concepts`) whose edits apply to this prompt's tokens although it
  // does not name them (the unconditional half under GenerationRequest::edit_unconditional).
  // `applied`, when given, gets the names of the concepts whose edits were applied appended.
  std::vector<CrossAttnKV> PromptKV(const std::string& prompt, const std::map<std::string, ConceptRef>& concepts,
                                    MultiConceptMode mode = MultiConceptMode::kApproximate,
                                    const std::vector<std::string>& also = {},
                                    std::vector<std::string>* applied = nullptr) const;

  // The gates PromptKV applies, per token and concept: to see where a concept's edit acts (the
  // tokens after the prompt included) when concepts leak into each other or into padding.
  PromptGates Gates(const std::string& prompt, const std::map<std::string, ConceptRef>& concepts,
                    MultiConceptMode mode = MultiConceptMode::kApproximate) const;

  // Checks that a concept can be applied to this model (base model id, layer names and widths,
  // embedding and encoder widths). Throws c10::ValueError otherwise.
  void CheckConcept(const Concept& concept) const;

  // Mean epsilon-prediction MSE on `images` ([3, H, W] in [-1, 1]; resized to the model's size) for
  // `prompt` and its concepts, over `draws` (timestep, noise) pairs per image drawn from `seed`: a
  // deterministic measure of how well a prompt explains images (lower is better). The same seed
  // gives the same draws whatever the prompt, so two prompts compare fairly.
  double DenoisingLoss(const std::string& prompt, const std::map<std::string, ConceptRef>& concepts,
                       const std::vector<at::Tensor>& images, uint64_t seed, int64_t draws = 8) const;

  // Runs requests together: all images of all requests in one UNet batch per step. Requests with
  // different steps, sampler or size run as separate groups. Results are in request order and do not
  // depend on how requests were batched: image n of a request draws its noise from seed + n, so it
  // equals a one-image request with that seed. `progress` counts over the whole call: (steps done,
  // steps of all groups), rising to the total once, at the end.
  std::vector<GenerationResult> Generate(const std::vector<GenerationRequest>& requests,
                                         const ProgressFn& progress = {}) const;

 private:
  // A prompt's encodings and gates, shared by PromptKV and Gates.
  struct EditedPrompt {
    PromptTokens tokens;
    std::vector<const Concept*> concepts;  // in tokens.concepts order
    at::Tensor X, Xk;                      // encodings for V and for K ([1, 77, D])
    at::Tensor I, Isup;                    // [K, D]
    ConceptGates g, gk;
  };
  EditedPrompt PrepareEdits(const std::string& prompt, const std::map<std::string, ConceptRef>& concepts,
                            MultiConceptMode mode, const std::vector<std::string>& also = {}) const;
  std::vector<GenerationResult> GenerateGroup(const std::vector<const GenerationRequest*>& group,
                                              const ProgressFn& progress) const;
  std::shared_ptr<StableDiffusion> model_;
  std::vector<CrossAttentionRef> layers_;
};

}  // namespace perfusion

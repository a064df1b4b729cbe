// Engine: the worker's facade over the LibTorch engine (worker/perfusion/). PIMPL with std/absl
// types only, so agent and scheduler code never parse torch headers.
//
// Every call runs the engine under RunGuarded(): no exception escapes; LibTorch errors map to
// absl::Status (ValueError/IndexError/TypeError -> INVALID_ARGUMENT, out of memory ->
// RESOURCE_EXHAUSTED, cancellation -> CANCELLED, anything else -> INTERNAL).
//
// Thread safety: Train() and Generate() may be called concurrently (the model is read-only).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/perfusion/prompt_region.h"

namespace perfusion::worker {

// Runs fn and converts any exception into a Status (STYLE.md: the engine's one edge).
absl::Status RunGuarded(const std::function<void()>& fn);

struct EngineOptions {
  std::string model_dir;      // diffusers-layout folder (models/tiny, or an SD 1.5 folder)
  std::string tokenizer_dir;  // fallback for the CLIP vocab.json + merges.txt
  std::string device = "cpu";  // "cpu", "cuda", "cuda:1"
  std::string dtype = "fp32";  // "fp32", "fp16", "bf16"
  int threads = 0;             // LibTorch intra-op threads; 0 = library default
};

struct TrainSpec {
  std::string name;
  std::string superclass;
  std::vector<std::string> images;  // encoded PNG bytes
  int64_t steps = 0;                // 0 = engine default (400)
  int64_t batch_size = 0;           // 0 = default (4)
  int64_t resolution = 0;           // training image side; 0 = the model's native size
  double lr_values = 0;             // 0 = default (0.03)
  double lr_embedding = 0;          // 0 = default (0.006)
  double train_beta = 0, train_temperature = 0;  // 0 = defaults (0.75, 0.1)
  uint64_t seed = 0;
  // Per-image captions (none or one per image) with "{}" where the concept goes; empty = templates.
  std::vector<std::string> captions;
};

struct TrainUpdate {
  int64_t step = 0, total = 0;
  double loss = 0, eta_seconds = 0;
};

struct TrainResult {
  std::string blob;  // the concept in the engine's format
  double final_loss = 0;
  int64_t steps = 0;
  double seconds = 0;
};

struct ConceptUse {
  std::string reference;  // as in the prompt, without brackets ("rex" or "rex@2")
  std::string blob;       // the concept blob (from the worker's cache)
  std::string digest;     // cache key of the decoded concept (SHA-256 hex); "" = do not cache
  double beta = 0, temperature = 0;  // 0 = the concept's own default
  std::optional<bool> global_key_lock;  // unset: the model's default (perfusion/inference.json)
};

struct GenerateSpec {
  std::string prompt;
  std::string negative_prompt;
  std::vector<ConceptUse> concepts;
  int64_t steps = 30;
  double guidance_scale = 7.5;
  double guidance_rescale = 0.0;  // [0, 1]; see perfusion::GenerationRequest
  uint64_t seed = 0;              // image n uses seed + n
  int64_t num_images = 1;
  int64_t width = 0, height = 0;  // 0 = the model's native size
  std::string sampler = "ddim";
  bool exact_multi_concept = false;
  std::vector<perfusion::PromptRegion> regions;
};

struct GenerateResult {
  std::vector<std::string> pngs;
  std::vector<uint64_t> seeds;  // per image: seed + n (image n equals a one-image request with it)
  int64_t width = 0, height = 0;
};

class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Load(const EngineOptions& options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const std::string& base_model_id() const;
  std::string device() const;
  int64_t native_size() const;

  // Trains a concept. progress is called after every step; returning false cancels (CANCELLED).
  absl::StatusOr<TrainResult> Train(const TrainSpec& spec, const std::function<bool(const TrainUpdate&)>& progress);

  // Generates several requests in one batch (requests may use different concepts). progress gets
  // (denoising step, total); returning false cancels (CANCELLED). Results are in request order.
  absl::StatusOr<std::vector<GenerateResult>> Generate(const std::vector<GenerateSpec>& specs,
                                                       const std::function<bool(int64_t, int64_t)>& progress);

  // Checks a blob (decodes it, and checks it against this base model).
  absl::Status ValidateConcept(const std::string& blob) const;

  // Number of decoded concepts held in the engine's digest cache, and its hits/misses.
  struct CacheStats {
    int64_t entries = 0, hits = 0, misses = 0;
  };
  CacheStats cache_stats() const;

 private:
  struct Impl;
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace perfusion::worker

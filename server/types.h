// Domain types of the control plane: what the services convert protos into, what the scheduler
// and the store work on. No gRPC or protobuf here.
#ifndef PERFUSION_SERVER_TYPES_H_
#define PERFUSION_SERVER_TYPES_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace perfusion::server {

using Labels = std::map<std::string, std::string>;

// Values equal perfusion.v1.JobState.
enum class JobState {
  kQueued = 1,
  kRunning = 2,
  kSucceeded = 3,
  kFailed = 4,
  kCancelling = 5,
  kCancelled = 6,
};
const char* JobStateName(JobState s);

// A fresh random id: `prefix` followed by 16 lowercase hex digits ("job_1f3a...").
std::string NewId(absl::string_view prefix);  // "QUEUED", ...
inline bool IsFinal(JobState s) {
  return s == JobState::kSucceeded || s == JobState::kFailed || s == JobState::kCancelled;
}

// perfusion.v1.TrainingOptions; 0 / unset means default.
struct TrainingOptions {
  std::optional<int> steps;  // set once validated
  float learning_rate = 0;
  float embedding_learning_rate = 0;
  int batch_size = 0;
  int resolution = 0;
  std::optional<uint64_t> seed;
  float train_beta = 0;
  float train_temperature = 0;
  std::vector<std::string> captions;  // per image, "<concept_name>" marks the concept; empty = templates
};
std::string TrainingOptionsToJson(const TrainingOptions& o);
absl::StatusOr<TrainingOptions> TrainingOptionsFromJson(const std::string& json);
std::string LabelsToJson(const Labels& labels);
absl::StatusOr<Labels> LabelsFromJson(const std::string& json);

// The input of CreateTrainingJob / UploadTrainingJob.
struct TrainingRequest {
  std::string concept_name;
  std::string superclass;
  std::vector<std::string> images;
  TrainingOptions options;
  std::string request_id;
  int priority = 0;
  Labels labels;
};

// A training job as stored. Times are absl::InfinitePast() when unset.
struct JobRecord {
  int64_t seq = 0;  // store-assigned insertion order
  std::string id;
  std::string tenant;
  std::string request_id;
  std::string request_hash;  // SHA-256 over the request (idempotency check)
  std::string concept_name;
  std::string superclass;
  TrainingOptions options;
  Labels labels;
  int priority = 0;
  JobState state = JobState::kQueued;
  int attempts = 0;
  int image_count = 0;
  int step = 0;
  int total_steps = 0;
  float loss = 0;
  int error_code = 0;
  std::string error_message;
  std::string concept_id;
  std::string lease_id;
  std::string worker_id;
  absl::Time lease_deadline = absl::InfinitePast();
  absl::Time create_time = absl::InfinitePast();
  absl::Time start_time = absl::InfinitePast();
  absl::Time end_time = absl::InfinitePast();
  absl::Time update_time = absl::InfinitePast();
};

// A stored concept (the blob is kept apart).
struct ConceptRecord {
  int64_t seq = 0;
  std::string id;
  std::string tenant;
  std::string name;
  int version = 0;
  std::string superclass;
  std::string base_model_id;
  std::string digest;  // lowercase hex SHA-256 of the blob
  int64_t size_bytes = 0;
  int format_version = 0;
  std::string dtype;
  Labels labels;
  std::string source_job_id;
  absl::Time create_time = absl::InfinitePast();
};

template <typename T>
struct Page {
  std::vector<T> items;
  std::string next_page_token;  // "" on the last page
};

// Values equal perfusion.v1.KeyLockMode.
enum class KeyLock { kUnspecified = 0, kLocal = 1, kGlobal = 2 };

struct ConceptStrength {
  std::string name;  // as in the prompt, without brackets
  std::optional<float> beta;
  std::optional<float> tau;
  KeyLock key_lock = KeyLock::kUnspecified;
};

// perfusion.v1.PromptRegion.
struct PromptRegion {
  std::string prompt;
  float x0 = 0, y0 = 0, x1 = 0, y1 = 0;
};

// The input of Generate (perfusion.v1.GenerateRequest).
struct GenerationRequest {
  std::string prompt;
  std::string negative_prompt;
  std::vector<ConceptStrength> concepts;
  std::optional<uint64_t> seed;
  // Unset: default (set once validated).
  std::optional<int> steps;
  std::optional<float> guidance_scale;
  std::optional<float> guidance_rescale;
  std::optional<int> width;
  std::optional<int> height;
  std::optional<int> num_images;
  std::string sampler;
  std::optional<float> beta;
  std::optional<float> tau;
  KeyLock key_lock = KeyLock::kUnspecified;
  std::vector<PromptRegion> regions;
};

// A concept resolved for one generation (perfusion.v1.WorkConcept).
struct WorkConcept {
  std::string reference;
  std::string concept_id;
  std::string name;
  int version = 0;
  std::string superclass;
  std::string digest;
  int64_t size_bytes = 0;
  float beta = 0;
  float tau = 0;
  KeyLock key_lock = KeyLock::kLocal;
};

// A validated generation with defaults resolved and its concepts looked up.
struct GenerationSpec {
  GenerationRequest request;
  std::vector<WorkConcept> concepts;
};

struct GeneratedImage {
  std::string png;
  uint64_t seed = 0;
  int width = 0;
  int height = 0;
};

struct GenerationResult {
  std::vector<GeneratedImage> images;
  std::vector<WorkConcept> concepts;
  absl::Duration queue_duration;
  absl::Duration compute_duration;
};

}  // namespace perfusion::server

#endif  // PERFUSION_SERVER_TYPES_H_

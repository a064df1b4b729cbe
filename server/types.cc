#include "server/types.h"

#include <nlohmann/json.hpp>

#include "absl/strings/string_view.h"
#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace perfusion::server {

const char* JobStateName(JobState s) {
  switch (s) {
    case JobState::kQueued: return "QUEUED";
    case JobState::kRunning: return "RUNNING";
    case JobState::kSucceeded: return "SUCCEEDED";
    case JobState::kFailed: return "FAILED";
    case JobState::kCancelling: return "CANCELLING";
    case JobState::kCancelled: return "CANCELLED";
  }
  return "JOB_STATE_UNSPECIFIED";
}

std::string NewId(absl::string_view prefix) {
  thread_local absl::BitGen gen;
  return absl::StrCat(prefix, absl::StrFormat("%016x", absl::Uniform<uint64_t>(gen)));
}

std::string TrainingOptionsToJson(const TrainingOptions& o) {
  nlohmann::json j = {{"steps", o.steps.value_or(0)},
                      {"learning_rate", o.learning_rate},
                      {"embedding_learning_rate", o.embedding_learning_rate},
                      {"batch_size", o.batch_size},
                      {"resolution", o.resolution},
                      {"train_beta", o.train_beta},
                      {"train_temperature", o.train_temperature}};
  // JSON numbers lose uint64 precision in some readers: keep the seed as a string.
  if (o.seed) j["seed"] = std::to_string(*o.seed);
  if (!o.captions.empty()) j["captions"] = o.captions;
  return j.dump();
}

absl::StatusOr<TrainingOptions> TrainingOptionsFromJson(const std::string& json) {
  nlohmann::json j = nlohmann::json::parse(json, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return absl::DataLossError("stored training options are not a JSON object");
  TrainingOptions o;
  try {
  if (int steps = j.value("steps", 0); steps > 0) o.steps = steps;
  o.learning_rate = j.value("learning_rate", 0.0f);
  o.embedding_learning_rate = j.value("embedding_learning_rate", 0.0f);
  o.batch_size = j.value("batch_size", 0);
  o.resolution = j.value("resolution", 0);
  o.train_beta = j.value("train_beta", 0.0f);
  o.train_temperature = j.value("train_temperature", 0.0f);
  if (j.contains("seed") && j["seed"].is_string()) {
    o.seed = std::stoull(j["seed"].get<std::string>());
  }
  if (j.contains("captions")) o.captions = j["captions"].get<std::vector<std::string>>();
  } catch (const std::exception& e) {
    return absl::DataLossError(absl::StrCat("stored training options: ", e.what()));
  }
  return o;
}

std::string LabelsToJson(const Labels& labels) { return nlohmann::json(labels).dump(); }

absl::StatusOr<Labels> LabelsFromJson(const std::string& json) {
  nlohmann::json j = nlohmann::json::parse(json, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return absl::DataLossError("stored labels are not a JSON object");
  Labels out;
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (!it.value().is_string()) return absl::DataLossError("stored label is not a string");
    out[it.key()] = it.value().get<std::string>();
  }
  return out;
}

}  // namespace perfusion::server

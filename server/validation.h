// Validation of untrusted API input, done in the server (the engine is not in this process):
// images by their headers and chunk structure, names, the superclass word, labels, training
// options, prompts and their concept references, generation parameters.
//
// Every error is INVALID_ARGUMENT with a message that starts with the proto field it concerns,
// e.g. `images[3]: not a PNG or JPEG`, `options.steps: 0 ...`, `width: 500 is not a multiple of 8`.
//
// Thread safety: free functions are pure; a loaded Vocab is immutable.
#ifndef PERFUSION_SERVER_VALIDATION_H_
#define PERFUSION_SERVER_VALIDATION_H_

#include <string>
#include <string_view>
#include <optional>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "server/types.h"

namespace perfusion::server {

// What a training lease carries besides the images, at most: names, options, up to 32 labels and
// 20 captions of 300 characters (tens of KiB), with room to spare.
inline constexpr int64_t kLeaseOverheadBytes = 256 << 10;

struct ValidationLimits {
  // Training images per job.
  int min_images = 3;
  int max_images = 20;
  // Per image: encoded size and decoded pixel count (width * height).
  int64_t max_image_bytes = 8 << 20;
  int64_t max_image_pixels = 16'000'000;
  // Per side of a training image: the workers' decoder limit (worker/perfusion/image_io.h).
  int max_image_side_px = 4096;
  // A job's encoded images together; 0: no limit. A worker's lease carries them in one message, so
  // the server sets this to its --max_message_bytes less kLeaseOverheadBytes: a larger set could be
  // queued but never handed to a worker.
  int64_t max_job_image_bytes = 0;
  // Training steps (options.steps) and the default for 0.
  int max_train_steps = 5000;
  int default_train_steps = 400;
  // Generation.
  int max_prompt_chars = 1000;
  int max_generation_steps = 150;
  int default_generation_steps = 30;
  int max_image_side = 1024;
  int default_image_side = 0;  // 0: the worker's native size
  int max_num_images = 8;
  int max_concepts_per_prompt = 8;
  int max_regions = 4;  // PromptRegions per generation (each costs one more UNet pass per image)
  float default_guidance = 7.5f;
  float default_guidance_rescale = 0.0f;
  float default_beta = 0.7f;
  float default_tau = 0.15f;
};

struct ImageInfo {
  enum Format { kPng, kJpeg } format;
  int width = 0;
  int height = 0;
};

// Checks that `bytes` is a well-formed PNG (signature, IHDR first, every chunk's CRC, an IDAT,
// IEND last) or JPEG (SOI, markers up to SOS, a SOFn frame header, EOI at the end) within the
// limits, and returns its format and size. `field` prefixes messages ("images[2]").
absl::StatusOr<ImageInfo> InspectImage(absl::string_view bytes, const ValidationLimits& limits,
                                       absl::string_view field);

// The CLIP BPE vocabulary (tokenizer/vocab.json of the model folder), for the superclass test.
class Vocab {
 public:
  // NOT_FOUND when the file is missing, INVALID_ARGUMENT when it is not a JSON object.
  static absl::StatusOr<Vocab> Load(const std::string& path);
  // True when `word</w>` is one vocabulary entry: then the CLIP tokenizer maps the lowercase
  // ASCII word to exactly one token.
  bool IsSingleToken(absl::string_view word) const;
  // That token's id, when `word</w>` is one vocabulary entry.
  std::optional<int64_t> SingleTokenId(absl::string_view word) const;
  size_t size() const { return entries_.size(); }

 private:
  std::unordered_map<std::string, int64_t> entries_;  // vocab.json: token -> id
};

// `[a-z0-9][a-z0-9_-]{0,62}`.
absl::Status ValidateConceptName(absl::string_view name, absl::string_view field);
// One lowercase ASCII word, 1..32 letters; with a vocabulary, also a single CLIP token.
absl::Status ValidateSuperclass(absl::string_view word, const Vocab* vocab);
// At most 32 labels; keys `[a-z0-9][a-z0-9_./-]{0,62}`; values up to 256 printable characters.
absl::Status ValidateLabels(const Labels& labels, absl::string_view field);
// "" or up to 128 printable ASCII characters.
absl::Status ValidateRequestId(absl::string_view request_id);

// Everything in a training request except the images themselves (their count is checked when
// `check_image_count`). Fills option defaults (steps).
absl::Status ValidateTrainingRequest(TrainingRequest& request, const ValidationLimits& limits,
                                     const Vocab* vocab, bool check_image_count);
// options.captions: none, or one per image (`image_count` of them), each naming the concept exactly
// once as "<concept_name>" and the superclass word nowhere else (the trainer finds the concept by
// the superclass token), printable, at most 300 characters.
absl::Status ValidateCaptions(const std::vector<std::string>& captions, int image_count,
                              absl::string_view concept_name, absl::string_view superclass);
// The image count alone (min..max), naming `field`.
absl::Status ValidateImageCount(int count, const ValidationLimits& limits, absl::string_view field);

// A concept reference in a prompt: `<name>` or `<name@version>`.
struct ConceptRef {
  std::string reference;  // without brackets: "teddy" or "teddy@2"
  std::string name;
  int version = 0;        // 0: newest
};
// The distinct references of `prompt` in order of first appearance. INVALID_ARGUMENT (naming
// `field` and the character offset) for a `<` that does not open a well-formed reference.
absl::StatusOr<std::vector<ConceptRef>> ParsePromptReferences(absl::string_view prompt,
                                                              absl::string_view field);

// Validates a generation request (prompt length and syntax, negative prompt without references,
// steps, size, count, guidance, β/τ, sampler, strengths naming referenced concepts) and fills
// every default. Returns the prompt's references.
absl::StatusOr<std::vector<ConceptRef>> ValidateGenerationRequest(GenerationRequest& request,
                                                                  const ValidationLimits& limits);

}  // namespace perfusion::server

#endif  // PERFUSION_SERVER_VALIDATION_H_

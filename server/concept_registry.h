// The concept registry: tenant-scoped concept operations on top of the store (get, list, label
// updates, delete, export, import) and the resolution of a prompt's concept references for
// generation. Every operation takes the caller's tenant; another tenant's concept is NOT_FOUND.
//
// Thread safety: safe to call concurrently (the store serialises).
#ifndef PERFUSION_SERVER_CONCEPT_REGISTRY_H_
#define PERFUSION_SERVER_CONCEPT_REGISTRY_H_

#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "server/clock.h"
#include "server/store.h"
#include "server/types.h"
#include "server/validation.h"

namespace perfusion::server {

struct ConceptRegistryOptions {
  // Blobs made for another base model are refused.
  std::string base_model_id = "tiny";
  int tenant_max_concepts = 1000;
  // Largest blob accepted by ImportConcept.
  int64_t max_blob_bytes = 4 << 20;
  // The base model's CLIP vocabulary (may be null): an imported blob's superclass must be one
  // token, and its superclass_token_id that token's id, as the worker requires.
  const Vocab* vocab = nullptr;
};

class ConceptRegistry {
 public:
  // `store` and `clock` must outlive the registry.
  ConceptRegistry(Store* store, const Clock* clock, ConceptRegistryOptions options)
      : store_(store), clock_(clock), options_(std::move(options)) {}

  // By id, or by name (newest version) when id is empty. INVALID_ARGUMENT when both or neither
  // are given.
  absl::StatusOr<ConceptRecord> Get(const std::string& tenant, const std::string& id,
                                    const std::string& name);
  absl::StatusOr<Page<ConceptRecord>> List(const std::string& tenant, const std::string& name,
                                           int page_size, const std::string& page_token);
  absl::StatusOr<ConceptRecord> UpdateLabels(const std::string& tenant, const std::string& id,
                                             const Labels& set,
                                             const std::vector<std::string>& remove);
  absl::Status Delete(const std::string& tenant, const std::string& id);
  absl::StatusOr<std::pair<ConceptRecord, std::string>> Export(const std::string& tenant,
                                                               const std::string& id);
  // INVALID_ARGUMENT "blob: ..." for a malformed blob, FAILED_PRECONDITION for another base
  // model, RESOURCE_EXHAUSTED over the tenant's concept quota. The same (name, digest) again
  // returns the stored concept.
  absl::StatusOr<ConceptRecord> Import(const std::string& tenant, const std::string& blob,
                                       const std::string& name, const Labels& labels);
  // Looks up every reference (NOT_FOUND "prompt: concept <x> not found") and resolves its
  // strength from the request's overrides and defaults.
  // REQUIRES: `request` passed ValidateGenerationRequest.
  absl::StatusOr<std::vector<WorkConcept>> Resolve(const std::string& tenant,
                                                   const std::vector<ConceptRef>& refs,
                                                   const GenerationRequest& request);
  // For workers: any tenant's blob by digest.
  absl::StatusOr<std::string> BlobByDigest(const std::string& digest);

 private:
  Store* const store_;
  const Clock* const clock_;
  const ConceptRegistryOptions options_;
};

}  // namespace perfusion::server

#endif  // PERFUSION_SERVER_CONCEPT_REGISTRY_H_

#include "server/concept_registry.h"

#include "absl/strings/str_cat.h"
#include "server/concept_blob.h"
#include "server/log.h"
#include "server/status_util.h"

namespace perfusion::server {

absl::StatusOr<ConceptRecord> ConceptRegistry::Get(const std::string& tenant,
                                                   const std::string& id,
                                                   const std::string& name) {
  if (id.empty() == name.empty()) {
    return absl::InvalidArgumentError("id: give exactly one of id and name");
  }
  if (!id.empty()) return store_->GetConcept(tenant, id);
  RETURN_IF_ERROR(ValidateConceptName(name, "name"));
  return store_->GetConceptByName(tenant, name, 0);
}

absl::StatusOr<Page<ConceptRecord>> ConceptRegistry::List(const std::string& tenant,
                                                          const std::string& name, int page_size,
                                                          const std::string& page_token) {
  if (!name.empty()) RETURN_IF_ERROR(ValidateConceptName(name, "name"));
  return store_->ListConcepts(tenant, name, page_size, page_token);
}

absl::StatusOr<ConceptRecord> ConceptRegistry::UpdateLabels(
    const std::string& tenant, const std::string& id, const Labels& set,
    const std::vector<std::string>& remove) {
  RETURN_IF_ERROR(ValidateLabels(set, "set_labels"));
  // The merge runs inside the store's update, on the labels as they are at that moment.
  return store_->UpdateConceptLabels(tenant, id, [&](const Labels& current) -> absl::StatusOr<Labels> {
    Labels labels = current;
    for (const auto& [k, v] : set) labels[k] = v;
    for (const auto& k : remove) labels.erase(k);
    RETURN_IF_ERROR(ValidateLabels(labels, "set_labels"));
    return labels;
  });
}

absl::Status ConceptRegistry::Delete(const std::string& tenant, const std::string& id) {
  RETURN_IF_ERROR(store_->DeleteConcept(tenant, id));
  LogEvent("concept_deleted", {{"concept", id}, {"tenant", tenant}});
  return absl::OkStatus();
}

absl::StatusOr<std::pair<ConceptRecord, std::string>> ConceptRegistry::Export(
    const std::string& tenant, const std::string& id) {
  ASSIGN_OR_RETURN(ConceptRecord c, store_->GetConcept(tenant, id));
  ASSIGN_OR_RETURN(std::string blob, store_->GetConceptBlob(tenant, id));
  return std::make_pair(std::move(c), std::move(blob));
}

absl::StatusOr<ConceptRecord> ConceptRegistry::Import(const std::string& tenant,
                                                      const std::string& blob,
                                                      const std::string& name,
                                                      const Labels& labels) {
  if (blob.empty()) return absl::InvalidArgumentError("blob: empty");
  if (static_cast<int64_t>(blob.size()) > options_.max_blob_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("blob: ", blob.size(),
                                                   " bytes exceeds the limit of ",
                                                   options_.max_blob_bytes));
  }
  ASSIGN_OR_RETURN(ConceptBlobHeader h, ParseConceptBlob(blob));
  if (h.base_model_id != options_.base_model_id) {
    return absl::FailedPreconditionError(
        absl::StrCat("blob: made for base model \"", h.base_model_id,
                     "\"; this server serves \"", options_.base_model_id, "\""));
  }
  std::string use_name = name.empty() ? h.name : name;
  RETURN_IF_ERROR(ValidateConceptName(use_name, name.empty() ? "blob: header name" : "name"));
  if (!ValidateSuperclass(h.superclass, options_.vocab).ok()) {
    return absl::InvalidArgumentError(absl::StrCat("blob: header superclass \"", h.superclass,
                                                   "\" is not one lowercase word and one CLIP token"));
  }
  if (options_.vocab != nullptr && options_.vocab->SingleTokenId(h.superclass) != h.superclass_token_id) {
    return absl::InvalidArgumentError(absl::StrCat(
        "blob: superclass_token_id ", h.superclass_token_id, " is not the token of its superclass \"",
        h.superclass, "\" (", options_.vocab->SingleTokenId(h.superclass).value_or(-1), ")"));
  }
  RETURN_IF_ERROR(ValidateLabels(labels, "labels"));
  const std::string digest = Sha256Hex(blob);
  ASSIGN_OR_RETURN(std::optional<ConceptRecord> existing,
                   store_->FindConceptByDigest(tenant, use_name, digest));
  if (existing) return *existing;
  ConceptRecord c;
  c.id = NewId("cpt_");
  c.tenant = tenant;
  c.name = use_name;
  c.superclass = h.superclass;
  c.base_model_id = h.base_model_id;
  c.digest = digest;
  c.size_bytes = static_cast<int64_t>(blob.size());
  c.format_version = h.format_version;
  c.dtype = h.dtype;
  c.labels = labels;
  c.create_time = clock_->Now();
  // The quota is checked with the insert, in one step (RESOURCE_EXHAUSTED when it is full).
  ASSIGN_OR_RETURN(c, store_->InsertConceptWithinQuota(c, blob, options_.tenant_max_concepts));
  LogEvent("concept_imported", {{"concept", c.id},
                                {"tenant", tenant},
                                {"name", c.name},
                                {"version", std::to_string(c.version)},
                                {"bytes", std::to_string(c.size_bytes)}});
  return c;
}

absl::StatusOr<std::vector<WorkConcept>> ConceptRegistry::Resolve(
    const std::string& tenant, const std::vector<ConceptRef>& refs,
    const GenerationRequest& request) {
  std::vector<WorkConcept> out;
  for (const ConceptRef& ref : refs) {
    auto c = store_->GetConceptByName(tenant, ref.name, ref.version);
    if (!c.ok()) {
      if (c.status().code() == absl::StatusCode::kNotFound) {
        return absl::NotFoundError(absl::StrCat("prompt: concept <", ref.reference,
                                                "> not found"));
      }
      return c.status();
    }
    if (c->base_model_id != options_.base_model_id) {
      return absl::FailedPreconditionError(
          absl::StrCat("prompt: concept <", ref.reference, "> was trained on base model \"",
                       c->base_model_id, "\"; this server serves \"", options_.base_model_id,
                       "\""));
    }
    WorkConcept w;
    w.reference = ref.reference;
    w.concept_id = c->id;
    w.name = c->name;
    w.version = c->version;
    w.superclass = c->superclass;
    w.digest = c->digest;
    w.size_bytes = c->size_bytes;
    w.beta = request.beta.value_or(0.7f);
    w.tau = request.tau.value_or(0.15f);
    w.key_lock = request.key_lock;  // unspecified: the worker's model decides (perfusion/inference.json)
    for (const ConceptStrength& s : request.concepts) {
      if (s.name != ref.reference) continue;
      if (s.beta) w.beta = *s.beta;
      if (s.tau) w.tau = *s.tau;
      if (s.key_lock != KeyLock::kUnspecified) w.key_lock = s.key_lock;
    }
    out.push_back(std::move(w));
  }
  return out;
}

absl::StatusOr<std::string> ConceptRegistry::BlobByDigest(const std::string& digest) {
  if (digest.size() != 64) return absl::InvalidArgumentError("digest: expected 64 hex digits");
  return store_->GetBlobByDigest(digest);
}

}  // namespace perfusion::server

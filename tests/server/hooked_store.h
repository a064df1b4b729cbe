// HookedStore: a Store that forwards every call to another one, with hooks that let a test put
// something between a scheduler's read and its write (another replica's cancel) or make one call
// fail (a database failover's broken connection). Each hook runs once and is then cleared.
#ifndef PERFUSION_TESTS_SERVER_HOOKED_STORE_H_
#define PERFUSION_TESTS_SERVER_HOOKED_STORE_H_

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "server/store.h"

namespace perfusion::server::testing {

class HookedStore : public Store {
 public:
  explicit HookedStore(Store* base) : base_(base) {}

  // Runs before GetJobImages; an error it returns is GetJobImages' result.
  std::function<absl::Status()> before_get_job_images;
  // Run after ListActiveJobs / GetJobByLease have read (and before the caller writes).
  std::function<void()> after_list_active_jobs;
  std::function<void()> after_get_job_by_lease;
  // Runs before CountJobsByState / ConceptTotals; an error it returns is the call's result.
  std::function<absl::Status()> before_count_jobs;
  std::function<absl::Status()> before_concept_totals;

  absl::StatusOr<std::vector<std::string>> GetJobImages(const std::string& id) override {
    if (auto hook = Take(before_get_job_images)) {
      absl::Status s = hook();
      if (!s.ok()) return s;
    }
    return base_->GetJobImages(id);
  }
  absl::StatusOr<std::vector<JobRecord>> ListActiveJobs() override {
    auto r = base_->ListActiveJobs();
    if (auto hook = Take(after_list_active_jobs)) hook();
    return r;
  }
  absl::StatusOr<JobRecord> GetJobByLease(const std::string& lease_id) override {
    auto r = base_->GetJobByLease(lease_id);
    if (auto hook = Take(after_get_job_by_lease)) hook();
    return r;
  }

  // Everything else: forwarded as is.
  absl::StatusOr<JobRecord> InsertJob(const JobRecord& job, const std::vector<std::string>& images) override {
    return base_->InsertJob(job, images);
  }
  absl::StatusOr<std::optional<JobRecord>> FindJobByRequestId(const std::string& tenant,
                                                              const std::string& request_id) override {
    return base_->FindJobByRequestId(tenant, request_id);
  }
  absl::StatusOr<JobRecord> GetJob(const std::string& id) override { return base_->GetJob(id); }
  absl::Status UpdateJob(const JobRecord& job) override { return base_->UpdateJob(job); }
  absl::StatusOr<Page<JobRecord>> ListJobs(const std::string& tenant, std::optional<JobState> state, int page_size,
                                           const std::string& page_token) override {
    return base_->ListJobs(tenant, state, page_size, page_token);
  }
  absl::StatusOr<std::map<JobState, int64_t>> CountJobsByState() override {
    if (auto hook = Take(before_count_jobs)) {
      if (absl::Status s = hook(); !s.ok()) return s;
    }
    return base_->CountJobsByState();
  }
  absl::StatusOr<ConceptRecord> InsertConceptWithinQuota(const ConceptRecord& c, const std::string& blob,
                                                         int64_t max_concepts) override {
    return base_->InsertConceptWithinQuota(c, blob, max_concepts);
  }
  absl::StatusOr<ConceptRecord> CompleteJobWithConcept(JobRecord job, const ConceptRecord& c, const std::string& blob,
                                                       const std::string& lease_id) override {
    return base_->CompleteJobWithConcept(std::move(job), c, blob, lease_id);
  }
  absl::StatusOr<ConceptRecord> GetConcept(const std::string& tenant, const std::string& id) override {
    return base_->GetConcept(tenant, id);
  }
  absl::StatusOr<ConceptRecord> GetConceptByName(const std::string& tenant, const std::string& name,
                                                 int version) override {
    return base_->GetConceptByName(tenant, name, version);
  }
  absl::StatusOr<std::optional<ConceptRecord>> FindConceptByDigest(const std::string& tenant, const std::string& name,
                                                                   const std::string& digest) override {
    return base_->FindConceptByDigest(tenant, name, digest);
  }
  absl::StatusOr<Page<ConceptRecord>> ListConcepts(const std::string& tenant, const std::string& name, int page_size,
                                                   const std::string& page_token) override {
    return base_->ListConcepts(tenant, name, page_size, page_token);
  }
  absl::StatusOr<ConceptRecord> UpdateConceptLabels(const std::string& tenant, const std::string& id,
                                                    const LabelUpdate& update) override {
    return base_->UpdateConceptLabels(tenant, id, update);
  }
  absl::Status DeleteConcept(const std::string& tenant, const std::string& id) override {
    return base_->DeleteConcept(tenant, id);
  }
  absl::StatusOr<std::string> GetConceptBlob(const std::string& tenant, const std::string& id) override {
    return base_->GetConceptBlob(tenant, id);
  }
  absl::StatusOr<std::string> GetBlobByDigest(const std::string& digest) override {
    return base_->GetBlobByDigest(digest);
  }
  absl::StatusOr<int64_t> CountConcepts(const std::string& tenant) override { return base_->CountConcepts(tenant); }
  absl::StatusOr<Totals> ConceptTotals() override {
    if (auto hook = Take(before_concept_totals)) {
      if (absl::Status s = hook(); !s.ok()) return s;
    }
    return base_->ConceptTotals();
  }
  absl::StatusOr<std::optional<JobRecord>> LeaseNextJob(const LeaseGrant& grant) override {
    return base_->LeaseNextJob(grant);
  }
  absl::Status UpdateJobIfLeased(const JobRecord& job, const std::string& lease_id, JobState read_state) override {
    return base_->UpdateJobIfLeased(job, lease_id, read_state);
  }
  absl::StatusOr<JobRecord> RecordProgress(const std::string& lease_id, int step, int total_steps, float loss,
                                           absl::Time lease_deadline, absl::Time now) override {
    return base_->RecordProgress(lease_id, step, total_steps, loss, lease_deadline, now);
  }

 private:
  template <typename F>
  static F Take(F& hook) {
    F taken = std::move(hook);
    hook = nullptr;
    return taken;
  }
  Store* const base_;
};

}  // namespace perfusion::server::testing

#endif  // PERFUSION_TESTS_SERVER_HOOKED_STORE_H_

// The control plane's durable state: training jobs (with their images until they end) and
// concepts (with their blobs). Abstract so that a PostgreSQL store can be added beside the
// embedded SQLite one (sqlite_store.h) without touching the scheduler or the services.
//
// Every method is atomic (one transaction). Errors: NOT_FOUND for an unknown id or an id of
// another tenant (callers pass the tenant; no cross-tenant read exists except the worker's
// GetBlobByDigest), ALREADY_EXISTS on a unique-key clash, INVALID_ARGUMENT for a malformed
// page token, INTERNAL / DATA_LOSS for storage failures.
//
// Thread safety: implementations are safe to call from any thread.
#ifndef PERFUSION_SERVER_STORE_H_
#define PERFUSION_SERVER_STORE_H_

#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/types.h"

namespace perfusion::server {

class Store {
 public:
  virtual ~Store() = default;

  // ---- training jobs ----
  // Inserts a new job (job.seq is assigned) with its images. ALREADY_EXISTS when the id or the
  // (tenant, request_id) pair exists.
  virtual absl::StatusOr<JobRecord> InsertJob(const JobRecord& job,
                                              const std::vector<std::string>& images) = 0;
  // The job of `tenant` with this request_id, if any.
  virtual absl::StatusOr<std::optional<JobRecord>> FindJobByRequestId(
      const std::string& tenant, const std::string& request_id) = 0;
  // Any tenant's job (the scheduler's view); the services check the tenant.
  virtual absl::StatusOr<JobRecord> GetJob(const std::string& id) = 0;
  // Overwrites the mutable fields (state, attempts, progress, error, concept, lease, times).
  // Deletes the job's images once the state is final.
  virtual absl::Status UpdateJob(const JobRecord& job) = 0;
  // `tenant`'s jobs, newest first; `state` filters when set. page_size >= 1.
  virtual absl::StatusOr<Page<JobRecord>> ListJobs(const std::string& tenant,
                                                   std::optional<JobState> state, int page_size,
                                                   const std::string& page_token) = 0;
  // Every QUEUED, RUNNING and CANCELLING job, oldest first (the scheduler's startup load).
  virtual absl::StatusOr<std::vector<JobRecord>> ListActiveJobs() = 0;
  // The job's images in order. NOT_FOUND once they were deleted.
  virtual absl::StatusOr<std::vector<std::string>> GetJobImages(const std::string& id) = 0;
  virtual absl::StatusOr<std::map<JobState, int64_t>> CountJobsByState() = 0;

  // ---- concepts ----
  // Inserts a concept as the next version of (tenant, name) (concept.version and seq are
  // assigned) with its blob, unless the tenant already has `max_concepts` concepts: then
  // RESOURCE_EXHAUSTED. The count and the insert are one step, so concurrent imports (from any
  // replica) cannot pass the quota together, as a count followed by an insert let them. When the
  // tenant already has a concept of this name with this digest, returns that one and inserts
  // nothing, in the same step: an import retried while the first call still runs stores one
  // version, not two.
  virtual absl::StatusOr<ConceptRecord> InsertConceptWithinQuota(const ConceptRecord& concept,
                                                                 const std::string& blob,
                                                                 int64_t max_concepts) = 0;
  // The same without a quota.
  absl::StatusOr<ConceptRecord> InsertConcept(const ConceptRecord& concept, const std::string& blob) {
    return InsertConceptWithinQuota(concept, blob, std::numeric_limits<int64_t>::max());
  }
  // Atomically inserts the concept (as InsertConcept) and writes `job` (SUCCEEDED, with
  // job.concept_id set to the new concept's id by this call). When `lease_id` is not empty,
  // nothing is written and ABORTED is returned unless the stored job still holds that lease (a
  // worker whose lease was taken over by another replica must not add a second concept).
  virtual absl::StatusOr<ConceptRecord> CompleteJobWithConcept(JobRecord job,
                                                               const ConceptRecord& concept,
                                                               const std::string& blob,
                                                               const std::string& lease_id) = 0;
  virtual absl::StatusOr<ConceptRecord> GetConcept(const std::string& tenant,
                                                   const std::string& id) = 0;
  // version 0: the newest.
  virtual absl::StatusOr<ConceptRecord> GetConceptByName(const std::string& tenant,
                                                         const std::string& name, int version) = 0;
  // The tenant's concept with this name and blob digest, if any (idempotent import).
  virtual absl::StatusOr<std::optional<ConceptRecord>> FindConceptByDigest(
      const std::string& tenant, const std::string& name, const std::string& digest) = 0;
  // Newest first; `name` filters when not empty.
  virtual absl::StatusOr<Page<ConceptRecord>> ListConcepts(const std::string& tenant,
                                                           const std::string& name, int page_size,
                                                           const std::string& page_token) = 0;
  // Reads the concept's labels, applies `update` and writes its result, as one atomic step:
  // concurrent updates of one concept, from any replica, each start from the other's result (a
  // read, merge and write done apart lost one of two racing changes). An error from `update`
  // writes nothing and is returned. NOT_FOUND for an unknown id. Returns the updated concept.
  using LabelUpdate = std::function<absl::StatusOr<Labels>(const Labels& current)>;
  virtual absl::StatusOr<ConceptRecord> UpdateConceptLabels(const std::string& tenant,
                                                            const std::string& id,
                                                            const LabelUpdate& update) = 0;
  virtual absl::Status DeleteConcept(const std::string& tenant, const std::string& id) = 0;
  virtual absl::StatusOr<std::string> GetConceptBlob(const std::string& tenant,
                                                     const std::string& id) = 0;
  // Any tenant's blob with this digest (for workers, which are trusted).
  virtual absl::StatusOr<std::string> GetBlobByDigest(const std::string& digest) = 0;
  virtual absl::StatusOr<int64_t> CountConcepts(const std::string& tenant) = 0;

  struct Totals {
    int64_t concepts = 0;
    int64_t concept_bytes = 0;
  };
  virtual absl::StatusOr<Totals> ConceptTotals() = 0;

  // ---- replica-safe leasing (several servers sharing one database; docs/scaling.md) ----
  struct LeaseGrant {
    std::string lease_id;
    std::string worker_id;
    absl::Time now;
    absl::Time deadline;   // the lease_deadline stored with the job
    int max_attempts = 3;  // an expired lease is taken over only while attempts < max_attempts
  };
  // Atomically takes the first job in queue order (priority high first, then seq) that is
  // QUEUED, or RUNNING with lease_deadline <= grant.now and attempts < max_attempts (its worker
  // went silent), and makes it RUNNING under `grant`: attempts + 1, step and loss 0, start_time
  // set when unset, update_time = now. nullopt when there is none. Callers in one process or in
  // several processes sharing the database never take the same job under live leases.
  virtual absl::StatusOr<std::optional<JobRecord>> LeaseNextJob(const LeaseGrant& grant) = 0;
  // UpdateJob, but only while the stored job still holds `lease_id` and is still in
  // `read_state`, the state the caller read it in (compare-and-set; lease_id "" matches a QUEUED
  // job). ABORTED when another lease (or none) holds it now, or its state changed meanwhile (a
  // replica's cancel between the caller's read and write): read again and decide again.
  // NOT_FOUND for an unknown job.
  virtual absl::Status UpdateJobIfLeased(const JobRecord& job, const std::string& lease_id,
                                         JobState read_state) = 0;
  // The RUNNING or CANCELLING job that `lease_id` holds, whichever replica granted the lease.
  // NOT_FOUND when no active job holds it (finished, re-queued, or taken over). lease_id != "".
  virtual absl::StatusOr<JobRecord> GetJobByLease(const std::string& lease_id) = 0;
  // A heartbeat's write, atomic: sets step, total_steps, loss, lease_deadline and update_time of
  // the RUNNING or CANCELLING job that `lease_id` holds and leaves every other field alone, so a
  // CANCELLING written meanwhile by another replica is kept. Returns the job as stored after the
  // write (the caller reads the cancel request from its state). NOT_FOUND as GetJobByLease.
  virtual absl::StatusOr<JobRecord> RecordProgress(const std::string& lease_id, int step,
                                                   int total_steps, float loss,
                                                   absl::Time lease_deadline, absl::Time now) = 0;
};

}  // namespace perfusion::server

#endif  // PERFUSION_SERVER_STORE_H_

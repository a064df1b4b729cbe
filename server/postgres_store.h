// The shared store: a PostgreSQL database that several perfusion-server replicas use at once.
// Same logical schema as SqliteStore (numbered migrations recorded in `schema_migrations`,
// applied under an advisory lock so replicas starting together migrate once). Training images
// and concept blobs are BYTEA columns: they are small (KB-MB) and keeping them in the database
// keeps one backup, one transaction and no second storage system.
//
//   auto store = PostgresStore::Open("postgres://perfusion@db:5432/perfusion", {});
//
// Replica safety: LeaseNextJob is one UPDATE ... WHERE seq = (SELECT ... FOR UPDATE SKIP LOCKED),
// so concurrent leasers never take the same row; UpdateJobIfLeased is a compare-and-set on
// lease_id; concept versions are assigned under a per-(tenant, name) advisory transaction lock.
//
// Connections: a small pool (PostgresStoreOptions::connections); a call borrows one for its
// transaction. A broken connection is reset on its next use; the call that saw the break
// returns UNAVAILABLE (retry).
//
// Thread safety: safe to call from any thread.
#ifndef PERFUSION_SERVER_POSTGRES_STORE_H_
#define PERFUSION_SERVER_POSTGRES_STORE_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "server/store.h"

typedef struct pg_conn PGconn;

namespace perfusion::server {

struct PostgresStoreOptions {
  // Open connections (each call holds one for its transaction). Default 4: a server's store
  // calls are short and most are serialised by the scheduler's lock anyway.
  int connections = 4;
  // libpq connect_timeout, seconds.
  int connect_timeout_seconds = 10;
};

class PostgresStore final : public Store {
 public:
  // `conninfo`: a libpq URI (postgres://user:pass@host:port/db?sslmode=...) or key=value string.
  // Connects, then migrates. UNAVAILABLE when the server cannot be reached; INTERNAL when the
  // migration fails; FAILED_PRECONDITION when the database has a newer schema than this binary.
  static absl::StatusOr<std::unique_ptr<PostgresStore>> Open(const std::string& conninfo,
                                                             PostgresStoreOptions options = {});
  ~PostgresStore() override;

  int schema_version() const { return schema_version_; }

  absl::StatusOr<JobRecord> InsertJob(const JobRecord& job,
                                      const std::vector<std::string>& images) override;
  absl::StatusOr<std::optional<JobRecord>> FindJobByRequestId(
      const std::string& tenant, const std::string& request_id) override;
  absl::StatusOr<JobRecord> GetJob(const std::string& id) override;
  absl::Status UpdateJob(const JobRecord& job) override;
  absl::StatusOr<Page<JobRecord>> ListJobs(const std::string& tenant,
                                           std::optional<JobState> state, int page_size,
                                           const std::string& page_token) override;
  absl::StatusOr<std::vector<JobRecord>> ListActiveJobs() override;
  absl::StatusOr<std::vector<std::string>> GetJobImages(const std::string& id) override;
  absl::StatusOr<std::map<JobState, int64_t>> CountJobsByState() override;

  absl::StatusOr<ConceptRecord> InsertConceptWithinQuota(const ConceptRecord& concept,
                                                         const std::string& blob,
                                                         int64_t max_concepts) override;
  absl::StatusOr<ConceptRecord> CompleteJobWithConcept(JobRecord job, const ConceptRecord& concept,
                                                       const std::string& blob,
                                                       const std::string& lease_id) override;
  absl::StatusOr<ConceptRecord> GetConcept(const std::string& tenant,
                                           const std::string& id) override;
  absl::StatusOr<ConceptRecord> GetConceptByName(const std::string& tenant,
                                                 const std::string& name, int version) override;
  absl::StatusOr<std::optional<ConceptRecord>> FindConceptByDigest(
      const std::string& tenant, const std::string& name, const std::string& digest) override;
  absl::StatusOr<Page<ConceptRecord>> ListConcepts(const std::string& tenant,
                                                   const std::string& name, int page_size,
                                                   const std::string& page_token) override;
  absl::StatusOr<ConceptRecord> UpdateConceptLabels(const std::string& tenant, const std::string& id,
                                                    const LabelUpdate& update) override;
  absl::Status DeleteConcept(const std::string& tenant, const std::string& id) override;
  absl::StatusOr<std::string> GetConceptBlob(const std::string& tenant,
                                             const std::string& id) override;
  absl::StatusOr<std::string> GetBlobByDigest(const std::string& digest) override;
  absl::StatusOr<int64_t> CountConcepts(const std::string& tenant) override;
  absl::StatusOr<Totals> ConceptTotals() override;

  absl::StatusOr<std::optional<JobRecord>> LeaseNextJob(const LeaseGrant& grant) override;
  absl::Status UpdateJobIfLeased(const JobRecord& job, const std::string& lease_id,
                                 JobState read_state) override;
  absl::StatusOr<JobRecord> GetJobByLease(const std::string& lease_id) override;
  absl::StatusOr<JobRecord> RecordProgress(const std::string& lease_id, int step, int total_steps,
                                           float loss, absl::Time lease_deadline,
                                           absl::Time now) override;

  // Tests only: drops every table of this schema (the next Open migrates from scratch).
  absl::Status TEST_DropAll();

 private:
  class Conn;  // a borrowed connection (returned to the pool on destruction)
  PostgresStore() = default;
  absl::StatusOr<Conn> Borrow();
  void Return(PGconn* c);
  absl::Status Migrate();

  std::string conninfo_;
  absl::Mutex mu_;
  std::vector<PGconn*> idle_ ABSL_GUARDED_BY(mu_);
  std::vector<PGconn*> all_;  // constant after Open
  int schema_version_ = 0;
};

}  // namespace perfusion::server

#endif  // PERFUSION_SERVER_POSTGRES_STORE_H_

// The embedded store: one SQLite database file (WAL journal, foreign keys, a busy timeout),
// its schema created and upgraded by numbered migrations recorded in `schema_migrations`.
//
//   auto store = SqliteStore::Open("/var/lib/perfusion/perfusion.db");  // or ":memory:"
//
// One connection guarded by a mutex: SQLite serialises writers anyway and the control plane's
// write rate is a few per second. Images and blobs are stored as BLOB columns.
//
// Thread safety: safe to call from any thread.
#ifndef PERFUSION_SERVER_SQLITE_STORE_H_
#define PERFUSION_SERVER_SQLITE_STORE_H_

#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "server/store.h"

struct sqlite3;

namespace perfusion::server {

class SqliteStore final : public Store {
 public:
  // Opens (creating when absent) and migrates the database. ":memory:" gives a private
  // in-memory database (tests). INTERNAL when the file cannot be opened or migrated;
  // FAILED_PRECONDITION when the file has a newer schema than this binary knows.
  static absl::StatusOr<std::unique_ptr<SqliteStore>> Open(const std::string& path);
  ~SqliteStore() override;

  // The schema version after migrations.
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

 private:
  explicit SqliteStore(sqlite3* db) : db_(db) {}
  absl::Status Migrate() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Exec(const char* sql) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<JobRecord> GetJobByLeaseLocked(const std::string& lease_id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status UpdateJobLocked(const JobRecord& job) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<ConceptRecord> InsertConceptLocked(const ConceptRecord& concept,
                                                    const std::string& blob)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  absl::Mutex mu_;
  sqlite3* const db_ ABSL_PT_GUARDED_BY(mu_);
  int schema_version_ = 0;
};

}  // namespace perfusion::server

#endif  // PERFUSION_SERVER_SQLITE_STORE_H_

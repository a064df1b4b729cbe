#include "server/sqlite_store.h"

#include <sqlite3.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "server/status_util.h"
#include "server/store_rows.h"

namespace perfusion::server {
namespace {

using store_rows::ParsePageToken;
using store_rows::ReadConcept;
using store_rows::ReadJob;

// Numbered schema migrations: migration i brings the schema to version i + 1. Append only.
constexpr const char* kMigrations[] = {
    // 1: jobs, their images, concepts with blobs.
    R"sql(
CREATE TABLE jobs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  tenant TEXT NOT NULL,
  request_id TEXT,
  request_hash TEXT NOT NULL,
  concept_name TEXT NOT NULL,
  superclass TEXT NOT NULL,
  options_json TEXT NOT NULL,
  labels_json TEXT NOT NULL,
  priority INTEGER NOT NULL,
  state INTEGER NOT NULL,
  attempts INTEGER NOT NULL,
  image_count INTEGER NOT NULL,
  step INTEGER NOT NULL,
  total_steps INTEGER NOT NULL,
  loss REAL NOT NULL,
  error_code INTEGER NOT NULL,
  error_message TEXT NOT NULL,
  concept_id TEXT NOT NULL,
  lease_id TEXT NOT NULL,
  worker_id TEXT NOT NULL,
  lease_deadline_us INTEGER,
  create_us INTEGER,
  start_us INTEGER,
  end_us INTEGER,
  update_us INTEGER
);
CREATE UNIQUE INDEX jobs_request ON jobs(tenant, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX jobs_tenant_seq ON jobs(tenant, seq);
CREATE INDEX jobs_state ON jobs(state);
CREATE TABLE job_images (
  job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
  idx INTEGER NOT NULL,
  data BLOB NOT NULL,
  PRIMARY KEY (job_id, idx)
);
CREATE TABLE concepts (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  tenant TEXT NOT NULL,
  name TEXT NOT NULL,
  version INTEGER NOT NULL,
  superclass TEXT NOT NULL,
  base_model_id TEXT NOT NULL,
  digest TEXT NOT NULL,
  size_bytes INTEGER NOT NULL,
  format_version INTEGER NOT NULL,
  dtype TEXT NOT NULL,
  labels_json TEXT NOT NULL,
  source_job_id TEXT NOT NULL,
  create_us INTEGER,
  blob BLOB NOT NULL,
  UNIQUE (tenant, name, version)
);
CREATE INDEX concepts_tenant_seq ON concepts(tenant, seq);
CREATE INDEX concepts_digest ON concepts(digest);
)sql",
    // 2: heartbeats and completions find the job by its lease from any replica.
    R"sql(
CREATE INDEX jobs_lease ON jobs(lease_id) WHERE lease_id <> '';
)sql",
    // 3: concept_names, the highest version each (tenant, name) was ever given.
    store_rows::kConceptNamesMigration,
};
constexpr int kSchemaVersion = sizeof(kMigrations) / sizeof(kMigrations[0]);

constexpr const char* kJobColumns =
    "seq, id, tenant, request_id, request_hash, concept_name, superclass, options_json, "
    "labels_json, priority, state, attempts, image_count, step, total_steps, loss, error_code, "
    "error_message, concept_id, lease_id, worker_id, lease_deadline_us, create_us, start_us, "
    "end_us, update_us";
constexpr const char* kConceptColumns =
    "seq, id, tenant, name, version, superclass, base_model_id, digest, size_bytes, "
    "format_version, dtype, labels_json, source_job_id, create_us";

// A prepared statement with bind/column helpers; finalised on destruction.
class Stmt {
 public:
  Stmt(sqlite3* db, const std::string& sql) : db_(db) {
    rc_ = sqlite3_prepare_v2(db, sql.c_str(), -1, &stmt_, nullptr);
  }
  ~Stmt() { sqlite3_finalize(stmt_); }
  Stmt(const Stmt&) = delete;
  Stmt& operator=(const Stmt&) = delete;

  absl::Status prepared() const {
    if (rc_ == SQLITE_OK) return absl::OkStatus();
    return absl::InternalError(absl::StrCat("sqlite prepare: ", sqlite3_errmsg(db_)));
  }
  Stmt& Bind(int i, const std::string& v) {
    sqlite3_bind_text(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
    return *this;
  }
  Stmt& BindBlob(int i, const std::string& v) {
    sqlite3_bind_blob64(stmt_, i, v.data(), v.size(), SQLITE_TRANSIENT);
    return *this;
  }
  Stmt& Bind(int i, int64_t v) {
    sqlite3_bind_int64(stmt_, i, v);
    return *this;
  }
  Stmt& Bind(int i, double v) {
    sqlite3_bind_double(stmt_, i, v);
    return *this;
  }
  Stmt& BindNull(int i) {
    sqlite3_bind_null(stmt_, i);
    return *this;
  }
  Stmt& BindTime(int i, absl::Time t) {
    if (t == absl::InfinitePast()) return BindNull(i);
    return Bind(i, absl::ToUnixMicros(t));
  }
  // SQLITE_ROW: true; SQLITE_DONE: false; else an error.
  absl::StatusOr<bool> Step() {
    int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    // Only a unique key taken is ALREADY_EXISTS (a request id, a name and version); a NOT NULL or
    // CHECK failure is a bug here, not the caller's duplicate.
    const int extended = sqlite3_extended_errcode(db_);
    if (extended == SQLITE_CONSTRAINT_UNIQUE || extended == SQLITE_CONSTRAINT_PRIMARYKEY) {
      return absl::AlreadyExistsError(absl::StrCat("sqlite: ", sqlite3_errmsg(db_)));
    }
    return absl::InternalError(absl::StrCat("sqlite step: ", sqlite3_errmsg(db_)));
  }
  absl::Status Run() {
    auto r = Step();
    return r.ok() ? absl::OkStatus() : r.status();
  }
  int64_t Int(int c) const { return sqlite3_column_int64(stmt_, c); }
  double Double(int c) const { return sqlite3_column_double(stmt_, c); }
  bool IsNull(int c) const { return sqlite3_column_type(stmt_, c) == SQLITE_NULL; }
  std::string Text(int c) const {
    const auto* p = sqlite3_column_blob(stmt_, c);
    int n = sqlite3_column_bytes(stmt_, c);
    return p ? std::string(static_cast<const char*>(p), static_cast<size_t>(n)) : std::string();
  }
  absl::Time Time(int c) const {
    return IsNull(c) ? absl::InfinitePast() : absl::FromUnixMicros(Int(c));
  }

 private:
  sqlite3* db_;
  sqlite3_stmt* stmt_ = nullptr;
  int rc_;
};

// BEGIN IMMEDIATE ... COMMIT, rolled back unless Commit() succeeded.
class Txn {
 public:
  explicit Txn(sqlite3* db) : db_(db) {
    char* err = nullptr;
    rc_ = sqlite3_exec(db_, "BEGIN IMMEDIATE", nullptr, nullptr, &err);
    if (err) msg_ = err;
    sqlite3_free(err);
  }
  ~Txn() {
    if (rc_ == SQLITE_OK && !done_) sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
  }
  absl::Status began() const {
    return rc_ == SQLITE_OK ? absl::OkStatus() : absl::InternalError("sqlite begin: " + msg_);
  }
  absl::Status Commit() {
    char* err = nullptr;
    int rc = sqlite3_exec(db_, "COMMIT", nullptr, nullptr, &err);
    std::string m = err ? err : "";
    sqlite3_free(err);
    if (rc != SQLITE_OK) return absl::InternalError("sqlite commit: " + m);
    done_ = true;
    return absl::OkStatus();
  }

 private:
  sqlite3* db_;
  int rc_;
  bool done_ = false;
  std::string msg_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<SqliteStore>> SqliteStore::Open(const std::string& path) {
  sqlite3* db = nullptr;
  int rc = sqlite3_open_v2(path.c_str(), &db,
                           SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX,
                           nullptr);
  if (rc != SQLITE_OK) {
    std::string msg = db ? sqlite3_errmsg(db) : "out of memory";
    sqlite3_close(db);
    return absl::InternalError(absl::StrCat("sqlite: cannot open ", path, ": ", msg));
  }
  std::unique_ptr<SqliteStore> store(new SqliteStore(db));
  absl::MutexLock lock(&store->mu_);
  sqlite3_busy_timeout(db, 5000);
  if (path != ":memory:") RETURN_IF_ERROR(store->Exec("PRAGMA journal_mode=WAL"));
  // FULL: in WAL mode NORMAL keeps a commit through a process crash but not through a power loss
  // or an OS crash, and the API promises that an acknowledged job (or a completed training, whose
  // worker then drops its result) is stored before the RPC returns.
  RETURN_IF_ERROR(store->Exec("PRAGMA synchronous=FULL"));
  RETURN_IF_ERROR(store->Exec("PRAGMA foreign_keys=ON"));
  RETURN_IF_ERROR(store->Migrate());
  return store;
}

SqliteStore::~SqliteStore() { sqlite3_close(db_); }

absl::Status SqliteStore::Exec(const char* sql) {
  char* err = nullptr;
  int rc = sqlite3_exec(db_, sql, nullptr, nullptr, &err);
  std::string msg = err ? err : "";
  sqlite3_free(err);
  if (rc != SQLITE_OK) return absl::InternalError(absl::StrCat("sqlite: ", msg));
  return absl::OkStatus();
}

absl::Status SqliteStore::Migrate() {
  RETURN_IF_ERROR(Exec(
      "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
      "applied_us INTEGER NOT NULL)"));
  int current = 0;
  {
    Stmt s(db_, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations");
    RETURN_IF_ERROR(s.prepared());
    ASSIGN_OR_RETURN(bool row, s.Step());
    if (row) current = static_cast<int>(s.Int(0));
  }
  if (current > kSchemaVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("store: schema version ", current, " is newer than this binary's ",
                     kSchemaVersion));
  }
  for (int v = current; v < kSchemaVersion; ++v) {
    Txn txn(db_);
    RETURN_IF_ERROR(txn.began());
    // Read again under the write lock: another process opening the same file at the same moment
    // may have applied this step since the read above ("table jobs already exists").
    Stmt applied(db_, "SELECT COUNT(*) FROM schema_migrations WHERE version = ?");
    RETURN_IF_ERROR(applied.prepared());
    applied.Bind(1, int64_t{v + 1});
    ASSIGN_OR_RETURN(bool row, applied.Step());
    if (row && applied.Int(0) > 0) continue;  // the Txn rolls back its empty transaction
    RETURN_IF_ERROR(Exec(kMigrations[v]));
    Stmt s(db_, "INSERT INTO schema_migrations (version, applied_us) VALUES (?, ?)");
    RETURN_IF_ERROR(s.prepared());
    RETURN_IF_ERROR(s.Bind(1, int64_t{v + 1}).Bind(2, absl::ToUnixMicros(absl::Now())).Run());
    RETURN_IF_ERROR(txn.Commit());
  }
  schema_version_ = kSchemaVersion;
  return absl::OkStatus();
}

absl::StatusOr<JobRecord> SqliteStore::InsertJob(const JobRecord& job,
                                                 const std::vector<std::string>& images) {
  absl::MutexLock lock(&mu_);
  Txn txn(db_);
  RETURN_IF_ERROR(txn.began());
  Stmt s(db_, absl::StrCat("INSERT INTO jobs (", kJobColumns,
                           ") VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                           "?, ?, ?, ?, ?, ?, ?)"));
  RETURN_IF_ERROR(s.prepared());
  s.Bind(1, job.id).Bind(2, job.tenant);
  if (job.request_id.empty()) {
    s.BindNull(3);
  } else {
    s.Bind(3, job.request_id);
  }
  s.Bind(4, job.request_hash).Bind(5, job.concept_name).Bind(6, job.superclass);
  s.Bind(7, TrainingOptionsToJson(job.options)).Bind(8, LabelsToJson(job.labels));
  s.Bind(9, int64_t{job.priority}).Bind(10, int64_t{static_cast<int>(job.state)});
  s.Bind(11, int64_t{job.attempts}).Bind(12, int64_t{job.image_count});
  s.Bind(13, int64_t{job.step}).Bind(14, int64_t{job.total_steps});
  s.Bind(15, static_cast<double>(job.loss)).Bind(16, int64_t{job.error_code});
  s.Bind(17, job.error_message).Bind(18, job.concept_id).Bind(19, job.lease_id);
  s.Bind(20, job.worker_id).BindTime(21, job.lease_deadline).BindTime(22, job.create_time);
  s.BindTime(23, job.start_time).BindTime(24, job.end_time).BindTime(25, job.update_time);
  RETURN_IF_ERROR(s.Run());
  JobRecord out = job;
  out.seq = sqlite3_last_insert_rowid(db_);
  for (size_t i = 0; i < images.size(); ++i) {
    Stmt img(db_, "INSERT INTO job_images (job_id, idx, data) VALUES (?, ?, ?)");
    RETURN_IF_ERROR(img.prepared());
    RETURN_IF_ERROR(img.Bind(1, job.id).Bind(2, static_cast<int64_t>(i)).BindBlob(3, images[i]).Run());
  }
  RETURN_IF_ERROR(txn.Commit());
  return out;
}

absl::StatusOr<std::optional<JobRecord>> SqliteStore::FindJobByRequestId(
    const std::string& tenant, const std::string& request_id) {
  absl::MutexLock lock(&mu_);
  Stmt s(db_, absl::StrCat("SELECT ", kJobColumns, " FROM jobs WHERE tenant = ? AND request_id = ?"));
  RETURN_IF_ERROR(s.prepared());
  s.Bind(1, tenant).Bind(2, request_id);
  ASSIGN_OR_RETURN(bool row, s.Step());
  if (!row) return std::optional<JobRecord>();
  ASSIGN_OR_RETURN(JobRecord j, ReadJob(s));
  return std::optional<JobRecord>(std::move(j));
}

absl::StatusOr<JobRecord> SqliteStore::GetJob(const std::string& id) {
  absl::MutexLock lock(&mu_);
  Stmt s(db_, absl::StrCat("SELECT ", kJobColumns, " FROM jobs WHERE id = ?"));
  RETURN_IF_ERROR(s.prepared());
  s.Bind(1, id);
  ASSIGN_OR_RETURN(bool row, s.Step());
  if (!row) return absl::NotFoundError(absl::StrCat("job ", id, " not found"));
  return ReadJob(s);
}

absl::Status SqliteStore::UpdateJobLocked(const JobRecord& job) {
  Stmt s(db_,
         "UPDATE jobs SET state = ?, attempts = ?, step = ?, total_steps = ?, loss = ?, "
         "error_code = ?, error_message = ?, concept_id = ?, lease_id = ?, worker_id = ?, "
         "lease_deadline_us = ?, start_us = ?, end_us = ?, update_us = ?, options_json = ? "
         "WHERE id = ?");
  RETURN_IF_ERROR(s.prepared());
  s.Bind(1, int64_t{static_cast<int>(job.state)}).Bind(2, int64_t{job.attempts});
  s.Bind(3, int64_t{job.step}).Bind(4, int64_t{job.total_steps});
  s.Bind(5, static_cast<double>(job.loss)).Bind(6, int64_t{job.error_code});
  s.Bind(7, job.error_message).Bind(8, job.concept_id).Bind(9, job.lease_id);
  s.Bind(10, job.worker_id).BindTime(11, job.lease_deadline).BindTime(12, job.start_time);
  s.BindTime(13, job.end_time).BindTime(14, job.update_time);
  s.Bind(15, TrainingOptionsToJson(job.options)).Bind(16, job.id);
  RETURN_IF_ERROR(s.Run());
  if (sqlite3_changes(db_) != 1) {
    return absl::NotFoundError(absl::StrCat("job ", job.id, " not found"));
  }
  if (IsFinal(job.state)) {
    Stmt d(db_, "DELETE FROM job_images WHERE job_id = ?");
    RETURN_IF_ERROR(d.prepared());
    RETURN_IF_ERROR(d.Bind(1, job.id).Run());
  }
  return absl::OkStatus();
}

absl::Status SqliteStore::UpdateJob(const JobRecord& job) {
  absl::MutexLock lock(&mu_);
  Txn txn(db_);
  RETURN_IF_ERROR(txn.began());
  RETURN_IF_ERROR(UpdateJobLocked(job));
  return txn.Commit();
}

absl::StatusOr<Page<JobRecord>> SqliteStore::ListJobs(const std::string& tenant,
                                                      std::optional<JobState> state,
                                                      int page_size,
                                                      const std::string& page_token) {
  ASSIGN_OR_RETURN(int64_t before, ParsePageToken(page_token));
  absl::MutexLock lock(&mu_);
  std::string sql = absl::StrCat("SELECT ", kJobColumns, " FROM jobs WHERE tenant = ?1");
  if (before > 0) sql += " AND seq < ?2";
  if (state) sql += " AND state = ?3";
  sql += " ORDER BY seq DESC LIMIT ?4";
  Stmt s(db_, sql);
  RETURN_IF_ERROR(s.prepared());
  s.Bind(1, tenant).Bind(2, before).Bind(3, int64_t{state ? static_cast<int>(*state) : 0});
  s.Bind(4, int64_t{page_size} + 1);
  Page<JobRecord> page;
  for (;;) {
    ASSIGN_OR_RETURN(bool row, s.Step());
    if (!row) break;
    ASSIGN_OR_RETURN(JobRecord j, ReadJob(s));
    page.items.push_back(std::move(j));
  }
  if (static_cast<int>(page.items.size()) > page_size) {
    page.items.pop_back();
    page.next_page_token = std::to_string(page.items.back().seq);
  }
  return page;
}

absl::StatusOr<std::vector<JobRecord>> SqliteStore::ListActiveJobs() {
  absl::MutexLock lock(&mu_);
  Stmt s(db_, absl::StrCat("SELECT ", kJobColumns,
                           " FROM jobs WHERE state IN (1, 2, 5) ORDER BY seq ASC"));
  RETURN_IF_ERROR(s.prepared());
  std::vector<JobRecord> out;
  for (;;) {
    ASSIGN_OR_RETURN(bool row, s.Step());
    if (!row) break;
    ASSIGN_OR_RETURN(JobRecord j, ReadJob(s));
    out.push_back(std::move(j));
  }
  return out;
}

absl::StatusOr<std::vector<std::string>> SqliteStore::GetJobImages(const std::string& id) {
  absl::MutexLock lock(&mu_);
  Stmt s(db_, "SELECT data FROM job_images WHERE job_id = ? ORDER BY idx ASC");
  RETURN_IF_ERROR(s.prepared());
  s.Bind(1, id);
  std::vector<std::string> out;
  for (;;) {
    ASSIGN_OR_RETURN(bool row, s.Step());
    if (!row) break;
    out.push_back(s.Text(0));
  }
  if (out.empty()) return absl::NotFoundError(absl::StrCat("job ", id, ": no images stored"));
  return out;
}

absl::StatusOr<std::map<JobState, int64_t>> SqliteStore::CountJobsByState() {
  absl::MutexLock lock(&mu_);
  Stmt s(db_, "SELECT state, COUNT(*) FROM jobs GROUP BY state");
  RETURN_IF_ERROR(s.prepared());
  std::map<JobState, int64_t> out;
  for (int st = 1; st <= 6; ++st) out[static_cast<JobState>(st)] = 0;
  for (;;) {
    ASSIGN_OR_RETURN(bool row, s.Step());
    if (!row) break;
    int st = static_cast<int>(s.Int(0));
    if (st >= 1 && st <= 6) out[static_cast<JobState>(st)] = s.Int(1);
  }
  return out;
}

absl::StatusOr<ConceptRecord> SqliteStore::InsertConceptLocked(const ConceptRecord& c,
                                                               const std::string& blob) {
  // The next version: past every version this name ever had (concept_names keeps the highest
  // given, so deleting the newest does not free its number) and every version still stored.
  Stmt v(db_,
         "SELECT MAX(COALESCE((SELECT last_version FROM concept_names WHERE tenant = ?1 AND name = ?2), 0), "
         "COALESCE((SELECT MAX(version) FROM concepts WHERE tenant = ?1 AND name = ?2), 0))");
  RETURN_IF_ERROR(v.prepared());
  v.Bind(1, c.tenant).Bind(2, c.name);
  ASSIGN_OR_RETURN(bool row, v.Step());
  ConceptRecord out = c;
  out.version = row ? static_cast<int>(v.Int(0)) + 1 : 1;
  Stmt n(db_,
         "INSERT INTO concept_names (tenant, name, last_version) VALUES (?1, ?2, ?3) "
         "ON CONFLICT (tenant, name) DO UPDATE SET last_version = excluded.last_version");
  RETURN_IF_ERROR(n.prepared());
  n.Bind(1, out.tenant).Bind(2, out.name).Bind(3, int64_t{out.version});
  RETURN_IF_ERROR(n.Run());
  Stmt s(db_, absl::StrCat("INSERT INTO concepts (", kConceptColumns,
                           ", blob) VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"));
  RETURN_IF_ERROR(s.prepared());
  s.Bind(1, out.id).Bind(2, out.tenant).Bind(3, out.name).Bind(4, int64_t{out.version});
  s.Bind(5, out.superclass).Bind(6, out.base_model_id).Bind(7, out.digest);
  s.Bind(8, out.size_bytes).Bind(9, int64_t{out.format_version}).Bind(10, out.dtype);
  s.Bind(11, LabelsToJson(out.labels)).Bind(12, out.source_job_id).BindTime(13, out.create_time);
  s.BindBlob(14, blob);
  RETURN_IF_ERROR(s.Run());
  out.seq = sqlite3_last_insert_rowid(db_);
  return out;
}

absl::StatusOr<ConceptRecord> SqliteStore::InsertConceptWithinQuota(const ConceptRecord& concept,
                                                                    const std::string& blob,
                                                                    int64_t max_concepts) {
  absl::MutexLock lock(&mu_);
  Txn txn(db_);  // BEGIN IMMEDIATE: another process's insert waits for this one
  RETURN_IF_ERROR(txn.began());
  {
    Stmt same(db_, absl::StrCat("SELECT ", kConceptColumns,
                                " FROM concepts WHERE tenant = ? AND name = ? AND digest = ? "
                                "ORDER BY version DESC LIMIT 1"));
    RETURN_IF_ERROR(same.prepared());
    same.Bind(1, concept.tenant).Bind(2, concept.name).Bind(3, concept.digest);
    ASSIGN_OR_RETURN(bool found, same.Step());
    if (found) return ReadConcept(same);
  }
  Stmt n(db_, "SELECT COUNT(*) FROM concepts WHERE tenant = ?");
  RETURN_IF_ERROR(n.prepared());
  n.Bind(1, concept.tenant);
  ASSIGN_OR_RETURN(bool row, n.Step());
  const int64_t count = row ? n.Int(0) : 0;
  if (count >= max_concepts) return store_rows::ConceptQuotaExceeded(count, max_concepts);
  ASSIGN_OR_RETURN(ConceptRecord out, InsertConceptLocked(concept, blob));
  RETURN_IF_ERROR(txn.Commit());
  return out;
}

absl::StatusOr<ConceptRecord> SqliteStore::CompleteJobWithConcept(JobRecord job,
                                                                  const ConceptRecord& concept,
                                                                  const std::string& blob,
                                                                  const std::string& lease_id) {
  absl::MutexLock lock(&mu_);
  Txn txn(db_);
  RETURN_IF_ERROR(txn.began());
  if (!lease_id.empty()) {
    Stmt s(db_, "SELECT lease_id FROM jobs WHERE id = ?");
    RETURN_IF_ERROR(s.prepared());
    s.Bind(1, job.id);
    ASSIGN_OR_RETURN(bool row, s.Step());
    if (!row) return absl::NotFoundError(absl::StrCat("job ", job.id, " not found"));
    if (s.Text(0) != lease_id) {
      return absl::AbortedError(absl::StrCat("job ", job.id, ": lease ", lease_id,
                                             " is no longer held (lost to another lease)"));
    }
  }
  ASSIGN_OR_RETURN(ConceptRecord out, InsertConceptLocked(concept, blob));
  job.concept_id = out.id;
  RETURN_IF_ERROR(UpdateJobLocked(job));
  RETURN_IF_ERROR(txn.Commit());
  return out;
}

absl::StatusOr<ConceptRecord> SqliteStore::GetConcept(const std::string& tenant,
                                                      const std::string& id) {
  absl::MutexLock lock(&mu_);
  Stmt s(db_, absl::StrCat("SELECT ", kConceptColumns,
                           " FROM concepts WHERE tenant = ? AND id = ?"));
  RETURN_IF_ERROR(s.prepared());
  s.Bind(1, tenant).Bind(2, id);
  ASSIGN_OR_RETURN(bool row, s.Step());
  if (!row) return absl::NotFoundError(absl::StrCat("concept ", id, " not found"));
  return ReadConcept(s);
}

absl::StatusOr<ConceptRecord> SqliteStore::GetConceptByName(const std::string& tenant,
                                                            const std::string& name,
                                                            int version) {
  absl::MutexLock lock(&mu_);
  std::string sql = absl::StrCat("SELECT ", kConceptColumns,
                                 " FROM concepts WHERE tenant = ?1 AND name = ?2");
  sql += version > 0 ? " AND version = ?3" : " ORDER BY version DESC LIMIT 1";
  Stmt s(db_, sql);
  RETURN_IF_ERROR(s.prepared());
  s.Bind(1, tenant).Bind(2, name);
  if (version > 0) s.Bind(3, int64_t{version});
  ASSIGN_OR_RETURN(bool row, s.Step());
  if (!row) {
    return absl::NotFoundError(version > 0
                                   ? absl::StrCat("concept <", name, "@", version, "> not found")
                                   : absl::StrCat("concept <", name, "> not found"));
  }
  return ReadConcept(s);
}

absl::StatusOr<std::optional<ConceptRecord>> SqliteStore::FindConceptByDigest(
    const std::string& tenant, const std::string& name, const std::string& digest) {
  absl::MutexLock lock(&mu_);
  Stmt s(db_, absl::StrCat("SELECT ", kConceptColumns,
                           " FROM concepts WHERE tenant = ? AND name = ? AND digest = ? "
                           "ORDER BY version DESC LIMIT 1"));
  RETURN_IF_ERROR(s.prepared());
  s.Bind(1, tenant).Bind(2, name).Bind(3, digest);
  ASSIGN_OR_RETURN(bool row, s.Step());
  if (!row) return std::optional<ConceptRecord>();
  ASSIGN_OR_RETURN(ConceptRecord c, ReadConcept(s));
  return std::optional<ConceptRecord>(std::move(c));
}

absl::StatusOr<Page<ConceptRecord>> SqliteStore::ListConcepts(const std::string& tenant,
                                                              const std::string& name,
                                                              int page_size,
                                                              const std::string& page_token) {
  ASSIGN_OR_RETURN(int64_t before, ParsePageToken(page_token));
  absl::MutexLock lock(&mu_);
  std::string sql = absl::StrCat("SELECT ", kConceptColumns, " FROM concepts WHERE tenant = ?1");
  if (before > 0) sql += " AND seq < ?2";
  if (!name.empty()) sql += " AND name = ?3";
  sql += " ORDER BY seq DESC LIMIT ?4";
  Stmt s(db_, sql);
  RETURN_IF_ERROR(s.prepared());
  s.Bind(1, tenant).Bind(2, before).Bind(3, name).Bind(4, int64_t{page_size} + 1);
  Page<ConceptRecord> page;
  for (;;) {
    ASSIGN_OR_RETURN(bool row, s.Step());
    if (!row) break;
    ASSIGN_OR_RETURN(ConceptRecord c, ReadConcept(s));
    page.items.push_back(std::move(c));
  }
  if (static_cast<int>(page.items.size()) > page_size) {
    page.items.pop_back();
    page.next_page_token = std::to_string(page.items.back().seq);
  }
  return page;
}

absl::StatusOr<ConceptRecord> SqliteStore::UpdateConceptLabels(const std::string& tenant,
                                                              const std::string& id,
                                                              const LabelUpdate& update) {
  absl::MutexLock lock(&mu_);
  Txn txn(db_);  // BEGIN IMMEDIATE: also another process's writes wait
  RETURN_IF_ERROR(txn.began());
  ConceptRecord c;
  {
    Stmt s(db_, absl::StrCat("SELECT ", kConceptColumns, " FROM concepts WHERE tenant = ? AND id = ?"));
    RETURN_IF_ERROR(s.prepared());
    s.Bind(1, tenant).Bind(2, id);
    ASSIGN_OR_RETURN(bool row, s.Step());
    if (!row) return absl::NotFoundError(absl::StrCat("concept ", id, " not found"));
    ASSIGN_OR_RETURN(c, ReadConcept(s));
  }
  ASSIGN_OR_RETURN(c.labels, update(c.labels));
  Stmt s(db_, "UPDATE concepts SET labels_json = ? WHERE tenant = ? AND id = ?");
  RETURN_IF_ERROR(s.prepared());
  RETURN_IF_ERROR(s.Bind(1, LabelsToJson(c.labels)).Bind(2, tenant).Bind(3, id).Run());
  RETURN_IF_ERROR(txn.Commit());
  return c;
}

absl::Status SqliteStore::DeleteConcept(const std::string& tenant, const std::string& id) {
  absl::MutexLock lock(&mu_);
  Stmt s(db_, "DELETE FROM concepts WHERE tenant = ? AND id = ?");
  RETURN_IF_ERROR(s.prepared());
  RETURN_IF_ERROR(s.Bind(1, tenant).Bind(2, id).Run());
  if (sqlite3_changes(db_) != 1) {
    return absl::NotFoundError(absl::StrCat("concept ", id, " not found"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> SqliteStore::GetConceptBlob(const std::string& tenant,
                                                        const std::string& id) {
  absl::MutexLock lock(&mu_);
  Stmt s(db_, "SELECT blob FROM concepts WHERE tenant = ? AND id = ?");
  RETURN_IF_ERROR(s.prepared());
  s.Bind(1, tenant).Bind(2, id);
  ASSIGN_OR_RETURN(bool row, s.Step());
  if (!row) return absl::NotFoundError(absl::StrCat("concept ", id, " not found"));
  return s.Text(0);
}

absl::StatusOr<std::string> SqliteStore::GetBlobByDigest(const std::string& digest) {
  absl::MutexLock lock(&mu_);
  Stmt s(db_, "SELECT blob FROM concepts WHERE digest = ? LIMIT 1");
  RETURN_IF_ERROR(s.prepared());
  s.Bind(1, digest);
  ASSIGN_OR_RETURN(bool row, s.Step());
  if (!row) return absl::NotFoundError(absl::StrCat("digest: no concept blob ", digest));
  return s.Text(0);
}

absl::StatusOr<int64_t> SqliteStore::CountConcepts(const std::string& tenant) {
  absl::MutexLock lock(&mu_);
  Stmt s(db_, "SELECT COUNT(*) FROM concepts WHERE tenant = ?");
  RETURN_IF_ERROR(s.prepared());
  s.Bind(1, tenant);
  ASSIGN_OR_RETURN(bool row, s.Step());
  return row ? s.Int(0) : 0;
}

absl::StatusOr<Store::Totals> SqliteStore::ConceptTotals() {
  absl::MutexLock lock(&mu_);
  Stmt s(db_, "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM concepts");
  RETURN_IF_ERROR(s.prepared());
  ASSIGN_OR_RETURN(bool row, s.Step());
  Totals t;
  if (row) {
    t.concepts = s.Int(0);
    t.concept_bytes = s.Int(1);
  }
  return t;
}

// BEGIN IMMEDIATE takes SQLite's write lock, so the SELECT and UPDATE below are atomic against
// every other connection to the file (other processes included).
absl::StatusOr<std::optional<JobRecord>> SqliteStore::LeaseNextJob(const LeaseGrant& g) {
  absl::MutexLock lock(&mu_);
  Txn txn(db_);
  RETURN_IF_ERROR(txn.began());
  Stmt s(db_, absl::StrCat("SELECT ", kJobColumns,
                           " FROM jobs WHERE state = 1 OR (state = 2 AND lease_deadline_us <= ?1 "
                           "AND attempts < ?2) ORDER BY priority DESC, seq ASC LIMIT 1"));
  RETURN_IF_ERROR(s.prepared());
  s.Bind(1, absl::ToUnixMicros(g.now)).Bind(2, int64_t{g.max_attempts});
  ASSIGN_OR_RETURN(bool row, s.Step());
  if (!row) return std::optional<JobRecord>();
  ASSIGN_OR_RETURN(JobRecord j, ReadJob(s));
  j.state = JobState::kRunning;
  ++j.attempts;
  j.lease_id = g.lease_id;
  j.worker_id = g.worker_id;
  j.lease_deadline = g.deadline;
  j.step = 0;
  j.loss = 0;
  if (j.start_time == absl::InfinitePast()) j.start_time = g.now;
  j.update_time = g.now;
  RETURN_IF_ERROR(UpdateJobLocked(j));
  RETURN_IF_ERROR(txn.Commit());
  return std::optional<JobRecord>(std::move(j));
}

absl::Status SqliteStore::UpdateJobIfLeased(const JobRecord& job, const std::string& lease_id,
                                             JobState read_state) {
  absl::MutexLock lock(&mu_);
  Txn txn(db_);
  RETURN_IF_ERROR(txn.began());
  Stmt s(db_, "SELECT lease_id, state FROM jobs WHERE id = ?");
  RETURN_IF_ERROR(s.prepared());
  s.Bind(1, job.id);
  ASSIGN_OR_RETURN(bool row, s.Step());
  if (!row) return absl::NotFoundError(absl::StrCat("job ", job.id, " not found"));
  if (s.Text(0) != lease_id || IsFinal(static_cast<JobState>(s.Int(1)))) {
    return absl::AbortedError(absl::StrCat("job ", job.id, ": lease ", lease_id,
                                           " is no longer held (lost to another lease)"));
  }
  if (static_cast<JobState>(s.Int(1)) != read_state) {
    return absl::AbortedError(absl::StrCat("job ", job.id, " changed state meanwhile (now ",
                                           JobStateName(static_cast<JobState>(s.Int(1))), ")"));
  }
  RETURN_IF_ERROR(UpdateJobLocked(job));
  return txn.Commit();
}

absl::StatusOr<JobRecord> SqliteStore::GetJobByLease(const std::string& lease_id) {
  absl::MutexLock lock(&mu_);
  return GetJobByLeaseLocked(lease_id);
}

absl::StatusOr<JobRecord> SqliteStore::GetJobByLeaseLocked(const std::string& lease_id) {
  Stmt s(db_, absl::StrCat("SELECT ", kJobColumns,
                           " FROM jobs WHERE lease_id = ? AND lease_id <> '' AND state IN (2, 5)"));
  RETURN_IF_ERROR(s.prepared());
  s.Bind(1, lease_id);
  ASSIGN_OR_RETURN(bool row, s.Step());
  if (!row) {
    return absl::NotFoundError(absl::StrCat("no active job holds lease \"", lease_id, "\""));
  }
  return ReadJob(s);
}

absl::StatusOr<JobRecord> SqliteStore::RecordProgress(const std::string& lease_id, int step,
                                                      int total_steps, float loss,
                                                      absl::Time lease_deadline, absl::Time now) {
  absl::MutexLock lock(&mu_);
  Txn txn(db_);
  RETURN_IF_ERROR(txn.began());
  Stmt s(db_,
         "UPDATE jobs SET step = ?, total_steps = ?, loss = ?, lease_deadline_us = ?, "
         "update_us = ? WHERE lease_id = ? AND lease_id <> '' AND state IN (2, 5)");
  RETURN_IF_ERROR(s.prepared());
  s.Bind(1, int64_t{step}).Bind(2, int64_t{total_steps}).Bind(3, static_cast<double>(loss));
  s.BindTime(4, lease_deadline).BindTime(5, now).Bind(6, lease_id);
  RETURN_IF_ERROR(s.Run());
  ASSIGN_OR_RETURN(JobRecord j, GetJobByLeaseLocked(lease_id));
  RETURN_IF_ERROR(txn.Commit());
  return j;
}

}  // namespace perfusion::server

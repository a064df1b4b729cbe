#include "server/postgres_store.h"

#include <libpq-fe.h>

#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "server/status_util.h"
#include "server/store_rows.h"

namespace perfusion::server {
namespace {

using store_rows::ParsePageToken;
using store_rows::ReadConcept;
using store_rows::ReadJob;

// Numbered schema migrations: migration i brings the schema to version i + 1. Append only.
// The same logical schema as SqliteStore's (columns, keys, times as Unix microseconds).
constexpr const char* kMigrations[] = {
    // 1: jobs, their images, concepts with blobs.
    R"sql(
CREATE TABLE jobs (
  seq BIGSERIAL PRIMARY KEY,
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
  loss DOUBLE PRECISION NOT NULL,
  error_code INTEGER NOT NULL,
  error_message TEXT NOT NULL,
  concept_id TEXT NOT NULL,
  lease_id TEXT NOT NULL,
  worker_id TEXT NOT NULL,
  lease_deadline_us BIGINT,
  create_us BIGINT,
  start_us BIGINT,
  end_us BIGINT,
  update_us BIGINT
);
CREATE UNIQUE INDEX jobs_request ON jobs(tenant, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX jobs_tenant_seq ON jobs(tenant, seq);
CREATE INDEX jobs_state ON jobs(state);
CREATE INDEX jobs_leasable ON jobs(priority DESC, seq) WHERE state IN (1, 2);
CREATE TABLE job_images (
  job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
  idx INTEGER NOT NULL,
  data BYTEA NOT NULL,
  PRIMARY KEY (job_id, idx)
);
CREATE TABLE concepts (
  seq BIGSERIAL PRIMARY KEY,
  id TEXT NOT NULL UNIQUE,
  tenant TEXT NOT NULL,
  name TEXT NOT NULL,
  version INTEGER NOT NULL,
  superclass TEXT NOT NULL,
  base_model_id TEXT NOT NULL,
  digest TEXT NOT NULL,
  size_bytes BIGINT NOT NULL,
  format_version INTEGER NOT NULL,
  dtype TEXT NOT NULL,
  labels_json TEXT NOT NULL,
  source_job_id TEXT NOT NULL,
  create_us BIGINT,
  blob BYTEA NOT NULL,
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

// Advisory lock keys (first int of pg_advisory_xact_lock(int, int)).
constexpr int kMigrationLock = 0x7065;  // "pe"
constexpr int kConceptNameLock = 0x7066;
constexpr int kTenantConceptsLock = 0x7067;  // a tenant's concept count, for its quota

constexpr const char* kJobColumns =
    "seq, id, tenant, request_id, request_hash, concept_name, superclass, options_json, "
    "labels_json, priority, state, attempts, image_count, step, total_steps, loss, error_code, "
    "error_message, concept_id, lease_id, worker_id, lease_deadline_us, create_us, start_us, "
    "end_us, update_us";
constexpr const char* kConceptColumns =
    "seq, id, tenant, name, version, superclass, base_model_id, digest, size_bytes, "
    "format_version, dtype, labels_json, source_job_id, create_us";

// Query parameters: text values (or NULL), with binary ones for BYTEA.
class Params {
 public:
  // Appends a value; returns its placeholder ("$3").
  std::string Add(std::string v, bool binary = false) {
    values_.push_back(std::move(v));
    null_.push_back(false);
    binary_.push_back(binary ? 1 : 0);
    return absl::StrCat("$", values_.size());
  }
  std::string Add(int64_t v) { return Add(absl::StrCat(v)); }
  std::string Add(int v) { return Add(absl::StrCat(v)); }
  std::string Add(double v) { return Add(absl::StrFormat("%.17g", v)); }
  std::string AddNull() {
    values_.emplace_back();
    null_.push_back(true);
    binary_.push_back(0);
    return absl::StrCat("$", values_.size());
  }
  std::string AddTime(absl::Time t) {
    return t == absl::InfinitePast() ? AddNull() : Add(absl::ToUnixMicros(t));
  }
  std::string AddBlob(const std::string& v) { return Add(v, /*binary=*/true); }

  int size() const { return static_cast<int>(values_.size()); }
  std::vector<const char*> ptrs() const {
    std::vector<const char*> p;
    for (size_t i = 0; i < values_.size(); ++i) p.push_back(null_[i] ? nullptr : values_[i].data());
    return p;
  }
  std::vector<int> lengths() const {
    std::vector<int> l;
    for (const auto& v : values_) l.push_back(static_cast<int>(v.size()));
    return l;
  }
  const int* formats() const { return binary_.data(); }
  // A text value is passed to libpq as a C string, so a NUL inside would silently cut it
  // ("lease_abc\0zzz" would match lease_abc). The first such value's index, or -1.
  int TextWithNul() const {
    for (size_t i = 0; i < values_.size(); ++i) {
      if (!null_[i] && binary_[i] == 0 && values_[i].find('\0') != std::string::npos) return static_cast<int>(i);
    }
    return -1;
  }

 private:
  std::vector<std::string> values_;
  std::vector<bool> null_;
  std::vector<int> binary_;
};

struct ResultDeleter {
  void operator()(PGresult* r) const { PQclear(r); }
};
using Result = std::unique_ptr<PGresult, ResultDeleter>;

// Per-session settings, after every (re)connection: warnings only, and no statement runs longer
// than 120 s (a hung query would hold the scheduler, which calls the store under its lock).
void ConfigureSession(PGconn* c) {
  PQclear(PQexec(c, "SET client_min_messages = warning"));
  PQclear(PQexec(c, "SET statement_timeout = 120000"));
}

absl::Status PgError(PGconn* c, const PGresult* r, absl::string_view what) {
  const char* state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : nullptr;
  std::string msg = r ? PQresultErrorMessage(r) : "";
  if (msg.empty()) msg = PQerrorMessage(c);
  std::string text = absl::StrCat("postgres ", what, ": ", absl::StripTrailingAsciiWhitespace(msg));
  std::string code = state ? state : "";
  if (code == "23505") return absl::AlreadyExistsError(text);
  if (code == "40001" || code == "40P01") return absl::AbortedError(text);
  if (code == "25006") {
    // A read-only server: a failover demoted the primary this connection reached. The socket is
    // fine, so nothing else would ever reconnect it; reset it now (its transaction is lost
    // anyway) so the next use finds the new primary (target_session_attrs=read-write).
    PQreset(c);
    if (PQstatus(c) == CONNECTION_OK) ConfigureSession(c);
    return absl::UnavailableError(text);
  }
  if (absl::StartsWith(code, "08") || absl::StartsWith(code, "57P") ||
      PQstatus(c) != CONNECTION_OK) {
    return absl::UnavailableError(text);
  }
  return absl::InternalError(text);
}

// Runs one statement. `binary_result`: all result columns in binary (used for BYTEA-only reads).
absl::StatusOr<Result> Exec(PGconn* c, const std::string& sql, const Params& p = Params(),
                            bool binary_result = false) {
  if (const int i = p.TextWithNul(); i >= 0) {
    return absl::InvalidArgumentError(absl::StrCat("postgres: text parameter $", i + 1, " holds a NUL byte"));
  }
  auto ptrs = p.ptrs();
  auto lens = p.lengths();
  Result r(PQexecParams(c, sql.c_str(), p.size(), nullptr, ptrs.data(), lens.data(), p.formats(),
                        binary_result ? 1 : 0));
  ExecStatusType st = r ? PQresultStatus(r.get()) : PGRES_FATAL_ERROR;
  if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) return PgError(c, r.get(), "query");
  return r;
}

// Column accessors on row `i` of a text-format result.
struct Row {
  const PGresult* r;
  int i;
  bool IsNull(int c) const { return PQgetisnull(r, i, c); }
  std::string Text(int c) const {
    return std::string(PQgetvalue(r, i, c), static_cast<size_t>(PQgetlength(r, i, c)));
  }
  int64_t Int(int c) const {
    int64_t v = 0;
    (void)absl::SimpleAtoi(absl::string_view(PQgetvalue(r, i, c)), &v);
    return v;
  }
  double Double(int c) const {
    double v = 0;
    (void)absl::SimpleAtod(absl::string_view(PQgetvalue(r, i, c)), &v);
    return v;
  }
  absl::Time Time(int c) const {
    return IsNull(c) ? absl::InfinitePast() : absl::FromUnixMicros(Int(c));
  }
};

// The SET list of UpdateJob (the mutable fields), its parameters appended to `p`.
std::string JobSetList(const JobRecord& job, Params& p) {
  return absl::StrCat(
      "state = ", p.Add(static_cast<int>(job.state)), ", attempts = ", p.Add(job.attempts),
      ", step = ", p.Add(job.step), ", total_steps = ", p.Add(job.total_steps),
      ", loss = ", p.Add(static_cast<double>(job.loss)), ", error_code = ", p.Add(job.error_code),
      ", error_message = ", p.Add(job.error_message), ", concept_id = ", p.Add(job.concept_id),
      ", lease_id = ", p.Add(job.lease_id), ", worker_id = ", p.Add(job.worker_id),
      ", lease_deadline_us = ", p.AddTime(job.lease_deadline),
      ", start_us = ", p.AddTime(job.start_time), ", end_us = ", p.AddTime(job.end_time),
      ", update_us = ", p.AddTime(job.update_time),
      ", options_json = ", p.Add(TrainingOptionsToJson(job.options)));
}

// A final job keeps no training images (every write that can end a job calls this in its
// transaction).
absl::Status DeleteImagesIfFinal(PGconn* c, const JobRecord& job) {
  if (!IsFinal(job.state)) return absl::OkStatus();
  Params p;
  return Exec(c, absl::StrCat("DELETE FROM job_images WHERE job_id = ", p.Add(job.id)), p).status();
}

}  // namespace

// A connection borrowed from the pool, with transaction helpers. Returned on destruction (a
// transaction left open is rolled back first).
class PostgresStore::Conn {
 public:
  Conn(PostgresStore* store, PGconn* c) : store_(store), c_(c) {}
  Conn(Conn&& o) noexcept : store_(o.store_), c_(std::exchange(o.c_, nullptr)), in_txn_(o.in_txn_) {}
  Conn(const Conn&) = delete;
  ~Conn() {
    if (!c_) return;
    if (in_txn_) PQclear(PQexec(c_, "ROLLBACK"));
    store_->Return(c_);
  }
  PGconn* get() const { return c_; }
  absl::StatusOr<Result> Exec(const std::string& sql, const Params& p = Params(),
                              bool binary_result = false) {
    return server::Exec(c_, sql, p, binary_result);
  }
  absl::Status Begin() {
    // Explicitly: the quota counts and version numbers rely on each statement seeing what
    // committed before it (after the advisory lock), which a server whose
    // default_transaction_isolation is REPEATABLE READ or SERIALIZABLE would not give.
    RETURN_IF_ERROR(Exec("BEGIN ISOLATION LEVEL READ COMMITTED").status());
    in_txn_ = true;
    return absl::OkStatus();
  }
  absl::Status Commit() {
    RETURN_IF_ERROR(Exec("COMMIT").status());
    in_txn_ = false;
    return absl::OkStatus();
  }

 private:
  PostgresStore* store_;
  PGconn* c_;
  bool in_txn_ = false;
};

absl::StatusOr<std::unique_ptr<PostgresStore>> PostgresStore::Open(const std::string& conninfo,
                                                                   PostgresStoreOptions options) {
  std::unique_ptr<PostgresStore> store(new PostgresStore());
  store->conninfo_ = conninfo;
  const int n = std::max(1, options.connections);
  const std::string timeout = std::to_string(std::max(1, options.connect_timeout_seconds));
  for (int i = 0; i < n; ++i) {
    // expand_dbname=1: `conninfo` may be a URI or key=value string. Keys after "dbname" override
    // it; keys before it are defaults it may override. The defaults bound how long a dead peer
    // (a failover without a TCP reset) can hold a call, and keep a connection off a demoted
    // primary: TCP keepalives, tcp_user_timeout and read-write servers. (The statement timeout is
    // a SET after connecting, in ConfigureSession: PgBouncer refuses an `options` startup parameter.)
    const char* keys[] = {"keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
                          "tcp_user_timeout", "target_session_attrs", "dbname", "connect_timeout",
                          "application_name", nullptr};
    const char* vals[] = {"1", "30", "10", "3", "60000", "read-write",
                          conninfo.c_str(), timeout.c_str(), "perfusion-server", nullptr};
    PGconn* c = PQconnectdbParams(keys, vals, /*expand_dbname=*/1);
    if (!c || PQstatus(c) != CONNECTION_OK) {
      std::string msg = c ? PQerrorMessage(c) : "out of memory";
      PQfinish(c);
      return absl::UnavailableError(absl::StrCat("postgres: cannot connect: ",
                                                 absl::StripTrailingAsciiWhitespace(msg)));
    }
    ConfigureSession(c);
    store->all_.push_back(c);
    absl::MutexLock lock(&store->mu_);
    store->idle_.push_back(c);
  }
  RETURN_IF_ERROR(store->Migrate());
  return store;
}

PostgresStore::~PostgresStore() {
  for (PGconn* c : all_) PQfinish(c);
}

absl::StatusOr<PostgresStore::Conn> PostgresStore::Borrow() {
  PGconn* c = nullptr;
  {
    absl::MutexLock lock(&mu_);
    // Bounded: the scheduler calls the store under its own lock, so a pool held by hung calls
    // must not freeze the replica; the caller gets UNAVAILABLE and retries.
    if (!mu_.AwaitWithTimeout(absl::Condition(+[](std::vector<PGconn*>* idle) { return !idle->empty(); }, &idle_),
                              absl::Seconds(30))) {
      return absl::UnavailableError(
          absl::StrCat("postgres: all ", all_.size(), " connections stayed busy for 30 s"));
    }
    c = idle_.back();
    idle_.pop_back();
  }
  Conn conn(this, c);
  if (PQstatus(c) != CONNECTION_OK) {
    PQreset(c);  // the server restarted or the network broke: one reconnect per use
    if (PQstatus(c) != CONNECTION_OK) {
      return absl::UnavailableError(absl::StrCat(
          "postgres: connection lost: ", absl::StripTrailingAsciiWhitespace(PQerrorMessage(c))));
    }
    ConfigureSession(c);  // a new session: its settings are gone
  }
  return conn;
}

void PostgresStore::Return(PGconn* c) {
  absl::MutexLock lock(&mu_);
  idle_.push_back(c);
}

absl::Status PostgresStore::Migrate() {
  ASSIGN_OR_RETURN(Conn c, Borrow());
  RETURN_IF_ERROR(c.Begin());
  // A migration may take long on a big table, and replicas wait for it on the lock below.
  RETURN_IF_ERROR(c.Exec("SET LOCAL statement_timeout = 0").status());
  // Replicas starting together: the first migrates, the others wait here and find it done.
  {
    Params p;
    RETURN_IF_ERROR(
        c.Exec(absl::StrCat("SELECT pg_advisory_xact_lock(", p.Add(kMigrationLock), ", 0)"), p)
            .status());
  }
  RETURN_IF_ERROR(c.Exec("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY "
                         "KEY, applied_us BIGINT NOT NULL)")
                      .status());
  ASSIGN_OR_RETURN(Result r, c.Exec("SELECT COALESCE(MAX(version), 0) FROM schema_migrations"));
  const int current = static_cast<int>(Row{r.get(), 0}.Int(0));
  if (current > kSchemaVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("store: schema version ", current, " is newer than this binary's ",
                     kSchemaVersion));
  }
  for (int v = current; v < kSchemaVersion; ++v) {
    // PQexec (not PQexecParams): a migration is several statements.
    Result m(PQexec(c.get(), kMigrations[v]));
    if (!m || PQresultStatus(m.get()) != PGRES_COMMAND_OK) {
      return absl::InternalError(
          absl::StrCat("migration ", v + 1, ": ", PgError(c.get(), m.get(), "migrate").message()));
    }
    Params p;
    std::string sql = absl::StrCat("INSERT INTO schema_migrations (version, applied_us) VALUES (",
                                   p.Add(v + 1), ", ", p.Add(absl::ToUnixMicros(absl::Now())), ")");
    RETURN_IF_ERROR(c.Exec(sql, p).status());
  }
  RETURN_IF_ERROR(c.Commit());
  schema_version_ = kSchemaVersion;
  return absl::OkStatus();
}

absl::Status PostgresStore::TEST_DropAll() {
  ASSIGN_OR_RETURN(Conn c, Borrow());
  return c.Exec("DROP TABLE IF EXISTS job_images, jobs, concepts, schema_migrations CASCADE")
      .status();
}

// ---------------------------------------------------------------------------------------------
// Jobs

absl::StatusOr<JobRecord> PostgresStore::InsertJob(const JobRecord& job,
                                                   const std::vector<std::string>& images) {
  ASSIGN_OR_RETURN(Conn c, Borrow());
  RETURN_IF_ERROR(c.Begin());
  Params p;
  std::string values = absl::StrCat(
      p.Add(job.id), ", ", p.Add(job.tenant), ", ",
      job.request_id.empty() ? p.AddNull() : p.Add(job.request_id), ", ", p.Add(job.request_hash),
      ", ", p.Add(job.concept_name), ", ", p.Add(job.superclass), ", ",
      p.Add(TrainingOptionsToJson(job.options)), ", ", p.Add(LabelsToJson(job.labels)), ", ",
      p.Add(job.priority), ", ", p.Add(static_cast<int>(job.state)), ", ", p.Add(job.attempts),
      ", ", p.Add(job.image_count), ", ", p.Add(job.step), ", ", p.Add(job.total_steps), ", ",
      p.Add(static_cast<double>(job.loss)), ", ", p.Add(job.error_code), ", ",
      p.Add(job.error_message), ", ", p.Add(job.concept_id), ", ", p.Add(job.lease_id), ", ",
      p.Add(job.worker_id), ", ", p.AddTime(job.lease_deadline), ", ", p.AddTime(job.create_time),
      ", ", p.AddTime(job.start_time), ", ", p.AddTime(job.end_time), ", ",
      p.AddTime(job.update_time));
  const std::string cols = std::string(kJobColumns).substr(5);  // without "seq, "
  ASSIGN_OR_RETURN(Result r, c.Exec(absl::StrCat("INSERT INTO jobs (", cols, ") VALUES (", values,
                                                 ") RETURNING seq"),
                                    p));
  JobRecord out = job;
  out.seq = Row{r.get(), 0}.Int(0);
  for (size_t i = 0; i < images.size(); ++i) {
    Params ip;
    std::string sql =
        absl::StrCat("INSERT INTO job_images (job_id, idx, data) VALUES (", ip.Add(job.id), ", ",
                     ip.Add(static_cast<int64_t>(i)), ", ", ip.AddBlob(images[i]), ")");
    RETURN_IF_ERROR(c.Exec(sql, ip).status());
  }
  RETURN_IF_ERROR(c.Commit());
  return out;
}

absl::StatusOr<std::optional<JobRecord>> PostgresStore::FindJobByRequestId(
    const std::string& tenant, const std::string& request_id) {
  ASSIGN_OR_RETURN(Conn c, Borrow());
  Params p;
  std::string sql = absl::StrCat("SELECT ", kJobColumns, " FROM jobs WHERE tenant = ",
                                 p.Add(tenant), " AND request_id = ", p.Add(request_id));
  ASSIGN_OR_RETURN(Result r, c.Exec(sql, p));
  if (PQntuples(r.get()) == 0) return std::optional<JobRecord>();
  ASSIGN_OR_RETURN(JobRecord j, ReadJob(Row{r.get(), 0}));
  return std::optional<JobRecord>(std::move(j));
}

absl::StatusOr<JobRecord> PostgresStore::GetJob(const std::string& id) {
  ASSIGN_OR_RETURN(Conn c, Borrow());
  Params p;
  ASSIGN_OR_RETURN(Result r, c.Exec(absl::StrCat("SELECT ", kJobColumns, " FROM jobs WHERE id = ",
                                                 p.Add(id)),
                                    p));
  if (PQntuples(r.get()) == 0) return absl::NotFoundError(absl::StrCat("job ", id, " not found"));
  return ReadJob(Row{r.get(), 0});
}

absl::Status PostgresStore::UpdateJob(const JobRecord& job) {
  ASSIGN_OR_RETURN(Conn c, Borrow());
  RETURN_IF_ERROR(c.Begin());
  Params p;
  std::string set = JobSetList(job, p);
  ASSIGN_OR_RETURN(Result r, c.Exec(absl::StrCat("UPDATE jobs SET ", set, " WHERE id = ",
                                                 p.Add(job.id)),
                                    p));
  if (std::string(PQcmdTuples(r.get())) != "1") {
    return absl::NotFoundError(absl::StrCat("job ", job.id, " not found"));
  }
  RETURN_IF_ERROR(DeleteImagesIfFinal(c.get(), job));
  return c.Commit();
}

absl::Status PostgresStore::UpdateJobIfLeased(const JobRecord& job, const std::string& lease_id,
                                               JobState read_state) {
  ASSIGN_OR_RETURN(Conn c, Borrow());
  RETURN_IF_ERROR(c.Begin());
  Params p;
  std::string set = JobSetList(job, p);
  ASSIGN_OR_RETURN(Result r,
                   c.Exec(absl::StrCat("UPDATE jobs SET ", set, " WHERE id = ", p.Add(job.id),
                                       " AND lease_id = ", p.Add(lease_id),
                                       " AND state IN (1, 2, 5) AND state = ",
                                       p.Add(static_cast<int>(read_state))),
                          p));
  if (std::string(PQcmdTuples(r.get())) != "1") {
    Params q;
    ASSIGN_OR_RETURN(Result e,
                     c.Exec(absl::StrCat("SELECT 1 FROM jobs WHERE id = ", q.Add(job.id)), q));
    if (PQntuples(e.get()) == 0) {
      return absl::NotFoundError(absl::StrCat("job ", job.id, " not found"));
    }
    return absl::AbortedError(absl::StrCat("job ", job.id, ": lease ", lease_id,
                                           " is no longer held, or its state changed meanwhile"));
  }
  RETURN_IF_ERROR(DeleteImagesIfFinal(c.get(), job));
  return c.Commit();
}

absl::StatusOr<JobRecord> PostgresStore::GetJobByLease(const std::string& lease_id) {
  ASSIGN_OR_RETURN(Conn c, Borrow());
  Params p;
  ASSIGN_OR_RETURN(Result r, c.Exec(absl::StrCat("SELECT ", kJobColumns, " FROM jobs WHERE lease_id = ",
                                                 p.Add(lease_id),
                                                 " AND lease_id <> '' AND state IN (2, 5)"),
                                    p));
  if (PQntuples(r.get()) == 0) {
    return absl::NotFoundError(absl::StrCat("no active job holds lease \"", lease_id, "\""));
  }
  return ReadJob(Row{r.get(), 0});
}

absl::StatusOr<JobRecord> PostgresStore::RecordProgress(const std::string& lease_id, int step,
                                                        int total_steps, float loss,
                                                        absl::Time lease_deadline,
                                                        absl::Time now) {
  ASSIGN_OR_RETURN(Conn c, Borrow());
  Params p;
  std::string sql = absl::StrCat(
      "UPDATE jobs SET step = ", p.Add(int64_t{step}), ", total_steps = ", p.Add(int64_t{total_steps}),
      ", loss = ", p.Add(static_cast<double>(loss)), ", lease_deadline_us = ", p.AddTime(lease_deadline),
      ", update_us = ", p.AddTime(now), " WHERE lease_id = ", p.Add(lease_id),
      " AND lease_id <> '' AND state IN (2, 5) RETURNING ", kJobColumns);
  ASSIGN_OR_RETURN(Result r, c.Exec(sql, p));
  if (PQntuples(r.get()) == 0) {
    return absl::NotFoundError(absl::StrCat("no active job holds lease \"", lease_id, "\""));
  }
  return ReadJob(Row{r.get(), 0});
}

absl::StatusOr<std::optional<JobRecord>> PostgresStore::LeaseNextJob(const LeaseGrant& g) {
  ASSIGN_OR_RETURN(Conn c, Borrow());
  Params p;
  const std::string now = p.Add(absl::ToUnixMicros(g.now));
  // SKIP LOCKED: a row another transaction is leasing right now is passed over, not waited
  // for; once that transaction commits the row no longer matches (EvalPlanQual re-check).
  std::string sql = absl::StrCat(
      "UPDATE jobs SET state = 2, attempts = attempts + 1, lease_id = ", p.Add(g.lease_id),
      ", worker_id = ", p.Add(g.worker_id), ", lease_deadline_us = ", p.AddTime(g.deadline),
      ", step = 0, loss = 0, start_us = COALESCE(start_us, ", now, "), update_us = ", now,
      " WHERE seq = (SELECT seq FROM jobs WHERE state = 1 OR (state = 2 AND lease_deadline_us <= ",
      now, " AND attempts < ", p.Add(g.max_attempts),
      ") ORDER BY priority DESC, seq ASC LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING ", kJobColumns);
  ASSIGN_OR_RETURN(Result r, c.Exec(sql, p));
  if (PQntuples(r.get()) == 0) return std::optional<JobRecord>();
  ASSIGN_OR_RETURN(JobRecord j, ReadJob(Row{r.get(), 0}));
  return std::optional<JobRecord>(std::move(j));
}

absl::StatusOr<Page<JobRecord>> PostgresStore::ListJobs(const std::string& tenant,
                                                        std::optional<JobState> state,
                                                        int page_size,
                                                        const std::string& page_token) {
  ASSIGN_OR_RETURN(int64_t before, ParsePageToken(page_token));
  ASSIGN_OR_RETURN(Conn c, Borrow());
  Params p;
  std::string sql =
      absl::StrCat("SELECT ", kJobColumns, " FROM jobs WHERE tenant = ", p.Add(tenant));
  if (before > 0) absl::StrAppend(&sql, " AND seq < ", p.Add(before));
  if (state) absl::StrAppend(&sql, " AND state = ", p.Add(static_cast<int>(*state)));
  absl::StrAppend(&sql, " ORDER BY seq DESC LIMIT ", p.Add(int64_t{page_size} + 1));
  ASSIGN_OR_RETURN(Result r, c.Exec(sql, p));
  Page<JobRecord> page;
  for (int i = 0; i < PQntuples(r.get()); ++i) {
    ASSIGN_OR_RETURN(JobRecord j, ReadJob(Row{r.get(), i}));
    page.items.push_back(std::move(j));
  }
  if (static_cast<int>(page.items.size()) > page_size) {
    page.items.pop_back();
    page.next_page_token = std::to_string(page.items.back().seq);
  }
  return page;
}

absl::StatusOr<std::vector<JobRecord>> PostgresStore::ListActiveJobs() {
  ASSIGN_OR_RETURN(Conn c, Borrow());
  ASSIGN_OR_RETURN(Result r, c.Exec(absl::StrCat("SELECT ", kJobColumns,
                                                 " FROM jobs WHERE state IN (1, 2, 5) "
                                                 "ORDER BY seq ASC")));
  std::vector<JobRecord> out;
  for (int i = 0; i < PQntuples(r.get()); ++i) {
    ASSIGN_OR_RETURN(JobRecord j, ReadJob(Row{r.get(), i}));
    out.push_back(std::move(j));
  }
  return out;
}

absl::StatusOr<std::vector<std::string>> PostgresStore::GetJobImages(const std::string& id) {
  ASSIGN_OR_RETURN(Conn c, Borrow());
  Params p;
  ASSIGN_OR_RETURN(Result r,
                   c.Exec(absl::StrCat("SELECT data FROM job_images WHERE job_id = ", p.Add(id),
                                       " ORDER BY idx ASC"),
                          p, /*binary_result=*/true));
  std::vector<std::string> out;
  for (int i = 0; i < PQntuples(r.get()); ++i) out.push_back(Row{r.get(), i}.Text(0));
  if (out.empty()) return absl::NotFoundError(absl::StrCat("job ", id, ": no images stored"));
  return out;
}

absl::StatusOr<std::map<JobState, int64_t>> PostgresStore::CountJobsByState() {
  ASSIGN_OR_RETURN(Conn c, Borrow());
  ASSIGN_OR_RETURN(Result r, c.Exec("SELECT state, COUNT(*) FROM jobs GROUP BY state"));
  std::map<JobState, int64_t> out;
  for (int st = 1; st <= 6; ++st) out[static_cast<JobState>(st)] = 0;
  for (int i = 0; i < PQntuples(r.get()); ++i) {
    Row row{r.get(), i};
    int st = static_cast<int>(row.Int(0));
    if (st >= 1 && st <= 6) out[static_cast<JobState>(st)] = row.Int(1);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Concepts

namespace {

// Inside an open transaction: the next version of (tenant, name), serialised across replicas by
// an advisory lock on the name (released at commit).
absl::StatusOr<ConceptRecord> InsertConceptTxn(PGconn* c, const ConceptRecord& in,
                                               const std::string& blob) {
  {
    Params p;
    std::string sql =
        absl::StrCat("SELECT pg_advisory_xact_lock(", p.Add(kConceptNameLock), ", hashtext(",
                     p.Add(in.tenant), "::text || '/' || ", p.Add(in.name), "::text))");
    RETURN_IF_ERROR(Exec(c, sql, p).status());
  }
  ConceptRecord out = in;
  {
    Params p;
    // Past every version this name ever had (concept_names keeps the highest given, so deleting
    // the newest does not free its number) and every version still stored.
    const std::string tenant = p.Add(in.tenant);
    const std::string name = p.Add(in.name);
    std::string sql = absl::StrCat(
        "SELECT GREATEST(COALESCE((SELECT last_version FROM concept_names WHERE tenant = ", tenant,
        " AND name = ", name, "), 0), COALESCE((SELECT MAX(version) FROM concepts WHERE tenant = ",
        tenant, " AND name = ", name, "), 0))");
    ASSIGN_OR_RETURN(Result r, Exec(c, sql, p));
    out.version = static_cast<int>(Row{r.get(), 0}.Int(0)) + 1;
  }
  {
    Params p;
    std::string sql = absl::StrCat(
        "INSERT INTO concept_names (tenant, name, last_version) VALUES (", p.Add(out.tenant), ", ",
        p.Add(out.name), ", ", p.Add(out.version),
        ") ON CONFLICT (tenant, name) DO UPDATE SET last_version = EXCLUDED.last_version");
    RETURN_IF_ERROR(Exec(c, sql, p).status());
  }
  Params p;
  std::string values = absl::StrCat(
      p.Add(out.id), ", ", p.Add(out.tenant), ", ", p.Add(out.name), ", ", p.Add(out.version),
      ", ", p.Add(out.superclass), ", ", p.Add(out.base_model_id), ", ", p.Add(out.digest), ", ",
      p.Add(out.size_bytes), ", ", p.Add(out.format_version), ", ", p.Add(out.dtype), ", ",
      p.Add(LabelsToJson(out.labels)), ", ", p.Add(out.source_job_id), ", ",
      p.AddTime(out.create_time), ", ", p.AddBlob(blob));
  const std::string cols = std::string(kConceptColumns).substr(5);  // without "seq, "
  ASSIGN_OR_RETURN(Result r, Exec(c, absl::StrCat("INSERT INTO concepts (", cols, ", blob) VALUES (",
                                                  values, ") RETURNING seq"),
                                  p));
  out.seq = Row{r.get(), 0}.Int(0);
  return out;
}

}  // namespace

absl::StatusOr<ConceptRecord> PostgresStore::InsertConceptWithinQuota(const ConceptRecord& concept,
                                                                      const std::string& blob,
                                                                      int64_t max_concepts) {
  ASSIGN_OR_RETURN(Conn c, Borrow());
  RETURN_IF_ERROR(c.Begin());
  {
    // One quota check at a time per tenant, across replicas (released at commit).
    Params p;
    RETURN_IF_ERROR(c.Exec(absl::StrCat("SELECT pg_advisory_xact_lock(", p.Add(kTenantConceptsLock),
                                        ", hashtext(", p.Add(concept.tenant), "::text))"),
                           p)
                        .status());
  }
  {
    // The same blob under the same name, stored meanwhile (a retried import): that one.
    Params q;
    ASSIGN_OR_RETURN(Result same,
                     c.Exec(absl::StrCat("SELECT ", kConceptColumns, " FROM concepts WHERE tenant = ",
                                         q.Add(concept.tenant), " AND name = ", q.Add(concept.name),
                                         " AND digest = ", q.Add(concept.digest), " ORDER BY version DESC LIMIT 1"),
                            q));
    if (PQntuples(same.get()) > 0) {
      ASSIGN_OR_RETURN(ConceptRecord existing, ReadConcept(Row{same.get(), 0}));
      RETURN_IF_ERROR(c.Commit());
      return existing;
    }
  }
  Params p;
  ASSIGN_OR_RETURN(Result r, c.Exec(absl::StrCat("SELECT COUNT(*) FROM concepts WHERE tenant = ",
                                                 p.Add(concept.tenant)),
                                    p));
  const int64_t count = Row{r.get(), 0}.Int(0);
  if (count >= max_concepts) return store_rows::ConceptQuotaExceeded(count, max_concepts);
  ASSIGN_OR_RETURN(ConceptRecord out, InsertConceptTxn(c.get(), concept, blob));
  RETURN_IF_ERROR(c.Commit());
  return out;
}

absl::StatusOr<ConceptRecord> PostgresStore::CompleteJobWithConcept(JobRecord job,
                                                                    const ConceptRecord& concept,
                                                                    const std::string& blob,
                                                                    const std::string& lease_id) {
  ASSIGN_OR_RETURN(Conn c, Borrow());
  RETURN_IF_ERROR(c.Begin());
  if (!lease_id.empty()) {
    // Row lock: a concurrent LeaseNextJob takeover waits for this transaction, or we see its lease.
    Params q;
    ASSIGN_OR_RETURN(Result r, c.Exec(absl::StrCat("SELECT lease_id FROM jobs WHERE id = ",
                                                   q.Add(job.id), " FOR UPDATE"),
                                      q));
    if (PQntuples(r.get()) == 0) return absl::NotFoundError(absl::StrCat("job ", job.id, " not found"));
    if (std::string(PQgetvalue(r.get(), 0, 0)) != lease_id) {
      return absl::AbortedError(absl::StrCat("job ", job.id, ": lease ", lease_id,
                                             " is no longer held (lost to another lease)"));
    }
  }
  ASSIGN_OR_RETURN(ConceptRecord out, InsertConceptTxn(c.get(), concept, blob));
  job.concept_id = out.id;
  Params p;
  std::string set = JobSetList(job, p);
  ASSIGN_OR_RETURN(Result r, c.Exec(absl::StrCat("UPDATE jobs SET ", set, " WHERE id = ",
                                                 p.Add(job.id)),
                                    p));
  if (std::string(PQcmdTuples(r.get())) != "1") {
    return absl::NotFoundError(absl::StrCat("job ", job.id, " not found"));
  }
  RETURN_IF_ERROR(DeleteImagesIfFinal(c.get(), job));
  RETURN_IF_ERROR(c.Commit());
  return out;
}

absl::StatusOr<ConceptRecord> PostgresStore::GetConcept(const std::string& tenant,
                                                        const std::string& id) {
  ASSIGN_OR_RETURN(Conn c, Borrow());
  Params p;
  std::string sql = absl::StrCat("SELECT ", kConceptColumns, " FROM concepts WHERE tenant = ",
                                 p.Add(tenant), " AND id = ", p.Add(id));
  ASSIGN_OR_RETURN(Result r, c.Exec(sql, p));
  if (PQntuples(r.get()) == 0) {
    return absl::NotFoundError(absl::StrCat("concept ", id, " not found"));
  }
  return ReadConcept(Row{r.get(), 0});
}

absl::StatusOr<ConceptRecord> PostgresStore::GetConceptByName(const std::string& tenant,
                                                              const std::string& name,
                                                              int version) {
  ASSIGN_OR_RETURN(Conn c, Borrow());
  Params p;
  std::string sql = absl::StrCat("SELECT ", kConceptColumns, " FROM concepts WHERE tenant = ",
                                 p.Add(tenant), " AND name = ", p.Add(name));
  if (version > 0) {
    absl::StrAppend(&sql, " AND version = ", p.Add(version));
  } else {
    absl::StrAppend(&sql, " ORDER BY version DESC LIMIT 1");
  }
  ASSIGN_OR_RETURN(Result r, c.Exec(sql, p));
  if (PQntuples(r.get()) == 0) {
    return absl::NotFoundError(version > 0
                                   ? absl::StrCat("concept <", name, "@", version, "> not found")
                                   : absl::StrCat("concept <", name, "> not found"));
  }
  return ReadConcept(Row{r.get(), 0});
}

absl::StatusOr<std::optional<ConceptRecord>> PostgresStore::FindConceptByDigest(
    const std::string& tenant, const std::string& name, const std::string& digest) {
  ASSIGN_OR_RETURN(Conn c, Borrow());
  Params p;
  std::string sql = absl::StrCat("SELECT ", kConceptColumns, " FROM concepts WHERE tenant = ",
                                 p.Add(tenant), " AND name = ", p.Add(name), " AND digest = ",
                                 p.Add(digest), " ORDER BY version DESC LIMIT 1");
  ASSIGN_OR_RETURN(Result r, c.Exec(sql, p));
  if (PQntuples(r.get()) == 0) return std::optional<ConceptRecord>();
  ASSIGN_OR_RETURN(ConceptRecord cr, ReadConcept(Row{r.get(), 0}));
  return std::optional<ConceptRecord>(std::move(cr));
}

absl::StatusOr<Page<ConceptRecord>> PostgresStore::ListConcepts(const std::string& tenant,
                                                                const std::string& name,
                                                                int page_size,
                                                                const std::string& page_token) {
  ASSIGN_OR_RETURN(int64_t before, ParsePageToken(page_token));
  ASSIGN_OR_RETURN(Conn c, Borrow());
  Params p;
  std::string sql =
      absl::StrCat("SELECT ", kConceptColumns, " FROM concepts WHERE tenant = ", p.Add(tenant));
  if (before > 0) absl::StrAppend(&sql, " AND seq < ", p.Add(before));
  if (!name.empty()) absl::StrAppend(&sql, " AND name = ", p.Add(name));
  absl::StrAppend(&sql, " ORDER BY seq DESC LIMIT ", p.Add(int64_t{page_size} + 1));
  ASSIGN_OR_RETURN(Result r, c.Exec(sql, p));
  Page<ConceptRecord> page;
  for (int i = 0; i < PQntuples(r.get()); ++i) {
    ASSIGN_OR_RETURN(ConceptRecord cr, ReadConcept(Row{r.get(), i}));
    page.items.push_back(std::move(cr));
  }
  if (static_cast<int>(page.items.size()) > page_size) {
    page.items.pop_back();
    page.next_page_token = std::to_string(page.items.back().seq);
  }
  return page;
}

absl::StatusOr<ConceptRecord> PostgresStore::UpdateConceptLabels(const std::string& tenant,
                                                                const std::string& id,
                                                                const LabelUpdate& update) {
  ASSIGN_OR_RETURN(Conn c, Borrow());
  RETURN_IF_ERROR(c.Begin());
  ConceptRecord concept_record;
  {
    // Row lock: a concurrent update of this concept, from any replica, waits for our commit.
    Params p;
    std::string sql = absl::StrCat("SELECT ", kConceptColumns, " FROM concepts WHERE tenant = ",
                                   p.Add(tenant), " AND id = ", p.Add(id), " FOR UPDATE");
    ASSIGN_OR_RETURN(Result r, c.Exec(sql, p));
    if (PQntuples(r.get()) == 0) return absl::NotFoundError(absl::StrCat("concept ", id, " not found"));
    ASSIGN_OR_RETURN(concept_record, ReadConcept(Row{r.get(), 0}));
  }
  ASSIGN_OR_RETURN(concept_record.labels, update(concept_record.labels));
  Params p;
  std::string sql = absl::StrCat("UPDATE concepts SET labels_json = ", p.Add(LabelsToJson(concept_record.labels)),
                                 " WHERE tenant = ", p.Add(tenant), " AND id = ", p.Add(id));
  RETURN_IF_ERROR(c.Exec(sql, p).status());
  RETURN_IF_ERROR(c.Commit());
  return concept_record;
}

absl::Status PostgresStore::DeleteConcept(const std::string& tenant, const std::string& id) {
  ASSIGN_OR_RETURN(Conn c, Borrow());
  Params p;
  std::string sql = absl::StrCat("DELETE FROM concepts WHERE tenant = ", p.Add(tenant),
                                 " AND id = ", p.Add(id));
  ASSIGN_OR_RETURN(Result r, c.Exec(sql, p));
  if (std::string(PQcmdTuples(r.get())) != "1") {
    return absl::NotFoundError(absl::StrCat("concept ", id, " not found"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> PostgresStore::GetConceptBlob(const std::string& tenant,
                                                          const std::string& id) {
  ASSIGN_OR_RETURN(Conn c, Borrow());
  Params p;
  std::string sql = absl::StrCat("SELECT blob FROM concepts WHERE tenant = ", p.Add(tenant),
                                 " AND id = ", p.Add(id));
  ASSIGN_OR_RETURN(Result r, c.Exec(sql, p, /*binary_result=*/true));
  if (PQntuples(r.get()) == 0) {
    return absl::NotFoundError(absl::StrCat("concept ", id, " not found"));
  }
  return Row{r.get(), 0}.Text(0);
}

absl::StatusOr<std::string> PostgresStore::GetBlobByDigest(const std::string& digest) {
  ASSIGN_OR_RETURN(Conn c, Borrow());
  Params p;
  std::string sql =
      absl::StrCat("SELECT blob FROM concepts WHERE digest = ", p.Add(digest), " LIMIT 1");
  ASSIGN_OR_RETURN(Result r, c.Exec(sql, p, /*binary_result=*/true));
  if (PQntuples(r.get()) == 0) {
    return absl::NotFoundError(absl::StrCat("digest: no concept blob ", digest));
  }
  return Row{r.get(), 0}.Text(0);
}

absl::StatusOr<int64_t> PostgresStore::CountConcepts(const std::string& tenant) {
  ASSIGN_OR_RETURN(Conn c, Borrow());
  Params p;
  ASSIGN_OR_RETURN(Result r, c.Exec(absl::StrCat("SELECT COUNT(*) FROM concepts WHERE tenant = ",
                                                 p.Add(tenant)),
                                    p));
  return Row{r.get(), 0}.Int(0);
}

absl::StatusOr<Store::Totals> PostgresStore::ConceptTotals() {
  ASSIGN_OR_RETURN(Conn c, Borrow());
  ASSIGN_OR_RETURN(Result r,
                   c.Exec("SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM concepts"));
  Totals t;
  t.concepts = Row{r.get(), 0}.Int(0);
  t.concept_bytes = Row{r.get(), 0}.Int(1);
  return t;
}

}  // namespace perfusion::server

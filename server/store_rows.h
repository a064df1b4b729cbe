// store_rows: decoding of job and concept rows and page tokens, shared by the SQLite and PostgreSQL
// stores. Both select the columns in the same order (see each store's column lists); `Row` is the
// store's row accessor with Int(c), Double(c), Text(c), IsNull(c) and Time(c).
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "server/status_util.h"
#include "server/types.h"

namespace perfusion::server::store_rows {

// InsertConceptWithinQuota's refusal, in both stores.
inline absl::Status ConceptQuotaExceeded(int64_t count, int64_t limit) {
  return absl::ResourceExhaustedError(
      absl::StrCat("tenant quota: ", count, " concepts stored (limit ", limit, "); delete some first"));
}

// Schema migration 3 of both stores (the same SQL in both dialects): a version number is never
// given twice to a (tenant, name), even after the newest version is deleted, so a saved prompt's
// <name@n> cannot come to mean another concept. Filled from the concepts stored at migration.
inline constexpr const char* kConceptNamesMigration = R"sql(
CREATE TABLE concept_names (
  tenant TEXT NOT NULL,
  name TEXT NOT NULL,
  last_version INTEGER NOT NULL,
  PRIMARY KEY (tenant, name)
);
INSERT INTO concept_names (tenant, name, last_version)
  SELECT tenant, name, MAX(version) FROM concepts GROUP BY tenant, name;
)sql";

template <typename Row>
absl::StatusOr<JobRecord> ReadJob(const Row& s) {
  JobRecord j;
  j.seq = s.Int(0);
  j.id = s.Text(1);
  j.tenant = s.Text(2);
  j.request_id = s.Text(3);
  j.request_hash = s.Text(4);
  j.concept_name = s.Text(5);
  j.superclass = s.Text(6);
  ASSIGN_OR_RETURN(j.options, TrainingOptionsFromJson(s.Text(7)));
  ASSIGN_OR_RETURN(j.labels, LabelsFromJson(s.Text(8)));
  j.priority = static_cast<int>(s.Int(9));
  int state = static_cast<int>(s.Int(10));
  if (state < 1 || state > 6) return absl::DataLossError(absl::StrCat("job state ", state));
  j.state = static_cast<JobState>(state);
  j.attempts = static_cast<int>(s.Int(11));
  j.image_count = static_cast<int>(s.Int(12));
  j.step = static_cast<int>(s.Int(13));
  j.total_steps = static_cast<int>(s.Int(14));
  j.loss = static_cast<float>(s.Double(15));
  j.error_code = static_cast<int>(s.Int(16));
  j.error_message = s.Text(17);
  j.concept_id = s.Text(18);
  j.lease_id = s.Text(19);
  j.worker_id = s.Text(20);
  j.lease_deadline = s.Time(21);
  j.create_time = s.Time(22);
  j.start_time = s.Time(23);
  j.end_time = s.Time(24);
  j.update_time = s.Time(25);
  return j;
}

template <typename Row>
absl::StatusOr<ConceptRecord> ReadConcept(const Row& s) {
  ConceptRecord c;
  c.seq = s.Int(0);
  c.id = s.Text(1);
  c.tenant = s.Text(2);
  c.name = s.Text(3);
  c.version = static_cast<int>(s.Int(4));
  c.superclass = s.Text(5);
  c.base_model_id = s.Text(6);
  c.digest = s.Text(7);
  c.size_bytes = s.Int(8);
  c.format_version = static_cast<int>(s.Int(9));
  c.dtype = s.Text(10);
  ASSIGN_OR_RETURN(c.labels, LabelsFromJson(s.Text(11)));
  c.source_job_id = s.Text(12);
  c.create_time = s.Time(13);
  return c;
}

inline absl::StatusOr<int64_t> ParsePageToken(const std::string& token) {
  if (token.empty()) return int64_t{0};
  int64_t seq = 0;
  if (!absl::SimpleAtoi(token, &seq) || seq <= 0) {
    return absl::InvalidArgumentError("page_token: malformed (use a next_page_token as returned)");
  }
  return seq;
}

}  // namespace perfusion::server::store_rows

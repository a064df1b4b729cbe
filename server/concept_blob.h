// What the server reads of a concept blob (the engine's format, worker/perfusion/concept.h):
// "PFCN" (4 bytes), a little-endian uint32 header length, a JSON header, the tensor data, and a
// little-endian uint32 CRC-32C of every byte before it. The server checks everything a worker
// checks without the model: the framing and checksum, every header key the engine reads, the
// tensor table (names, dtypes, shapes against the header's widths, offsets inside the data) and
// the values (finite, within half precision's range). What needs the model (its layer names and
// widths) the worker checks when it loads the blob. So ImportConcept refuses, at once, a blob that
// every generation would otherwise fail on later.
//
// Thread safety: pure functions.
#ifndef PERFUSION_SERVER_CONCEPT_BLOB_H_
#define PERFUSION_SERVER_CONCEPT_BLOB_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/strings/string_view.h"
#include "absl/status/statusor.h"

namespace perfusion::server {

// The newest concept format the workers read (worker/perfusion/concept.h kConceptFormatVersion;
// the server does not link the engine, so the two must be raised together).
inline constexpr int kMaxConceptFormatVersion = 1;
// The largest magnitude a concept's values may have (the engine's kMaxConceptValue).
inline constexpr double kMaxConceptValue = 65504.0;

struct ConceptBlobHeader {
  int format_version = 0;
  std::string base_model_id;
  std::string superclass;
  int64_t superclass_token_id = -1;
  std::string name;
  std::string dtype;
};

// Parses and checks the blob (above). INVALID_ARGUMENT "blob: ..." naming what is wrong.
absl::StatusOr<ConceptBlobHeader> ParseConceptBlob(absl::string_view blob);

// CRC-32C (Castagnoli), as the blob trailer uses.
uint32_t Crc32c(absl::string_view data);

// Lowercase hex SHA-256 of `data`.
std::string Sha256Hex(absl::string_view data);

}  // namespace perfusion::server

#endif  // PERFUSION_SERVER_CONCEPT_BLOB_H_

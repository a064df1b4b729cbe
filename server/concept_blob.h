// What the server reads of a concept blob (the engine's format, worker/perfusion/concept.h):
// "PFCN" (4 bytes), a little-endian uint32 header length, a JSON header with at least
// {"format_version", "base_model_id", "superclass", "name", "dtype"}, the tensor data, and a
// little-endian uint32 CRC-32C of every byte before it. The server checks the framing, the header
// and the checksum; the tensors stay opaque (the engine verifies them when it loads the blob).
//
// Thread safety: pure functions.
#ifndef PERFUSION_SERVER_CONCEPT_BLOB_H_
#define PERFUSION_SERVER_CONCEPT_BLOB_H_

#include <string>
#include <string_view>

#include "absl/strings/string_view.h"
#include "absl/status/statusor.h"

namespace perfusion::server {

struct ConceptBlobHeader {
  int format_version = 0;
  std::string base_model_id;
  std::string superclass;
  std::string name;
  std::string dtype;
};

// Parses the header and verifies the CRC-32C trailer. INVALID_ARGUMENT "blob: ..." when the
// magic, the length, the JSON or the checksum is wrong or a required key is missing or mistyped.
absl::StatusOr<ConceptBlobHeader> ParseConceptBlob(absl::string_view blob);

// CRC-32C (Castagnoli), as the blob trailer uses.
uint32_t Crc32c(absl::string_view data);

// Lowercase hex SHA-256 of `data`.
std::string Sha256Hex(absl::string_view data);

}  // namespace perfusion::server

#endif  // PERFUSION_SERVER_CONCEPT_BLOB_H_

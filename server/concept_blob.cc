#include "server/concept_blob.h"

#include <openssl/sha.h>

#include <cstring>

#include <nlohmann/json.hpp>

#include "absl/strings/string_view.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace perfusion::server {
namespace {
constexpr uint32_t kMaxHeaderBytes = 1 << 20;

uint32_t LoadLe32(const char* p) {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  return uint32_t{u[0]} | (uint32_t{u[1]} << 8) | (uint32_t{u[2]} << 16) | (uint32_t{u[3]} << 24);
}
}  // namespace

uint32_t Crc32c(absl::string_view data) {
  static const auto* table = [] {
    auto* t = new uint32_t[256];
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (0x82F63B78u ^ (c >> 1)) : (c >> 1);
      t[i] = c;
    }
    return t;
  }();
  uint32_t crc = ~0u;
  for (unsigned char b : data) crc = table[(crc ^ b) & 0xff] ^ (crc >> 8);
  return ~crc;
}

absl::StatusOr<ConceptBlobHeader> ParseConceptBlob(absl::string_view blob) {
  if (blob.size() < 8 || std::memcmp(blob.data(), "PFCN", 4) != 0) {
    return absl::InvalidArgumentError("blob: not a concept blob (no PFCN magic)");
  }
  const uint32_t len = LoadLe32(blob.data() + 4);
  if (len == 0 || len > kMaxHeaderBytes || blob.size() < 12 || len > blob.size() - 12) {
    return absl::InvalidArgumentError(
        absl::StrCat("blob: header length ", len, " does not fit the blob's ", blob.size(),
                     " bytes"));
  }
  const char* json_begin = blob.data() + 8;
  nlohmann::json j = nlohmann::json::parse(json_begin, json_begin + len, nullptr,
                                           /*allow_exceptions=*/false);
  if (!j.is_object()) return absl::InvalidArgumentError("blob: header is not a JSON object");
  if (Crc32c(blob.substr(0, blob.size() - 4)) != LoadLe32(blob.data() + blob.size() - 4)) {
    return absl::InvalidArgumentError("blob: checksum mismatch (corrupted or truncated)");
  }
  ConceptBlobHeader h;
  auto str = [&](const char* key, std::string* out) -> absl::Status {
    auto it = j.find(key);
    if (it == j.end() || !it->is_string() || it->get<std::string>().empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("blob: header key \"", key, "\" missing or not a non-empty string"));
    }
    *out = it->get<std::string>();
    return absl::OkStatus();
  };
  auto it = j.find("format_version");
  if (it == j.end() || !it->is_number_integer() || it->get<int64_t>() < 1 ||
      it->get<int64_t>() > 1000000) {
    return absl::InvalidArgumentError(
        "blob: header key \"format_version\" missing or not a positive integer");
  }
  h.format_version = it->get<int>();
  for (auto [key, out] : {std::pair{"base_model_id", &h.base_model_id},
                          std::pair{"superclass", &h.superclass}, std::pair{"name", &h.name},
                          std::pair{"dtype", &h.dtype}}) {
    if (auto s = str(key, out); !s.ok()) return s;
  }
  return h;
}

std::string Sha256Hex(absl::string_view data) {
  unsigned char md[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(data.data()), data.size(), md);
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(md), SHA256_DIGEST_LENGTH));
}

}  // namespace perfusion::server

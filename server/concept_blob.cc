#include "server/concept_blob.h"

#include <openssl/sha.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/string_view.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "server/status_util.h"

namespace perfusion::server {
namespace {
constexpr uint32_t kMaxHeaderBytes = 1 << 20;

uint32_t LoadLe32(const char* p) {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  return uint32_t{u[0]} | (uint32_t{u[1]} << 8) | (uint32_t{u[2]} << 16) | (uint32_t{u[3]} << 24);
}

absl::Status Bad(absl::string_view what) { return absl::InvalidArgumentError(absl::StrCat("blob: ", what)); }

// An integer header value in [lo, hi), or an error naming `key`.
absl::StatusOr<int64_t> IntIn(const nlohmann::json& j, const char* key, int64_t lo, int64_t hi) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_number_integer() || it->get<int64_t>() < lo || it->get<int64_t>() >= hi) {
    return Bad(absl::StrCat("header key \"", key, "\" missing or not an integer in [", lo, ", ", hi, ")"));
  }
  return it->get<int64_t>();
}

// One element of a stored tensor as a float: F32, F16 or BF16, little-endian.
float ElementAt(const unsigned char* p, const std::string& dtype) {
  if (dtype == "F32") {
    uint32_t bits = uint32_t{p[0]} | (uint32_t{p[1]} << 8) | (uint32_t{p[2]} << 16) | (uint32_t{p[3]} << 24);
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  const uint32_t h = uint32_t{p[0]} | (uint32_t{p[1]} << 8);
  if (dtype == "BF16") {
    const uint32_t bits = h << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  // F16: only the exponent matters here (infinity and NaN, or a magnitude).
  const int exponent = static_cast<int>((h >> 10) & 0x1f);
  if (exponent == 0x1f) return (h & 0x3ff) ? std::nanf("") : ((h & 0x8000) ? -INFINITY : INFINITY);
  const float mantissa = static_cast<float>(h & 0x3ff) / 1024.0f;
  const float magnitude = exponent == 0 ? std::ldexp(mantissa, -14) : std::ldexp(1.0f + mantissa, exponent - 15);
  return (h & 0x8000) ? -magnitude : magnitude;
}

// The tensor table as the engine reads it: i_star, i_sup ([encoder_dim], F32), embedding
// ([embedding_dim]), v_targets and the optional k_targets ([sum of the layers' widths]), each inside
// the data, with finite values within kMaxConceptValue.
absl::Status CheckTensors(const nlohmann::json& j, absl::string_view data) {
  ASSIGN_OR_RETURN(const int64_t encoder_dim, IntIn(j, "encoder_dim", 1, 1 << 24));
  ASSIGN_OR_RETURN(const int64_t embedding_dim, IntIn(j, "embedding_dim", 1, 1 << 24));
  auto layers = j.find("layers");
  if (layers == j.end() || !layers->is_array() || layers->empty() || layers->size() > 4096) {
    return Bad("header key \"layers\" missing, empty or not an array of at most 4096 layers");
  }
  int64_t out_total = 0;
  for (size_t l = 0; l < layers->size(); ++l) {
    const nlohmann::json& layer = (*layers)[l];
    if (!layer.is_object() || !layer.contains("name") || !layer["name"].is_string() ||
        layer["name"].get<std::string>().empty()) {
      return Bad(absl::StrCat("layers[", l, "]: no name"));
    }
    ASSIGN_OR_RETURN(const int64_t out_dim, IntIn(layer, "out_dim", 1, 1 << 24));
    out_total += out_dim;
  }
  auto tensors = j.find("tensors");
  if (tensors == j.end() || !tensors->is_object()) return Bad("header key \"tensors\" missing or not an object");
  const std::pair<const char*, int64_t> expected[] = {{"i_star", encoder_dim},   {"i_sup", encoder_dim},
                                                     {"embedding", embedding_dim}, {"v_targets", out_total},
                                                     {"k_targets", out_total}};
  std::vector<std::pair<uint64_t, uint64_t>> ranges;  // of the data, one per tensor
  for (const auto& [name, length] : expected) {
    auto t = tensors->find(name);
    if (t == tensors->end()) {
      if (std::string(name) == "k_targets") continue;  // key-locked concepts have none
      return Bad(absl::StrCat("missing tensor '", name, "'"));
    }
    const std::string prefix = absl::StrCat("tensor '", name, "': ");
    if (!t->is_object() || !t->contains("dtype") || !(*t)["dtype"].is_string()) return Bad(prefix + "no dtype");
    const std::string dtype = (*t)["dtype"].get<std::string>();
    const int size = dtype == "F32" ? 4 : (dtype == "F16" || dtype == "BF16") ? 2 : 0;
    if (size == 0) return Bad(absl::StrCat(prefix, "dtype ", dtype, " (expected F32, F16 or BF16)"));
    const nlohmann::json* shape = t->contains("shape") ? &(*t)["shape"] : nullptr;
    if (shape == nullptr || !shape->is_array() || shape->size() != 1 || !(*shape)[0].is_number_integer() ||
        (*shape)[0].get<int64_t>() != length) {
      return Bad(absl::StrCat(prefix, "shape is not [", length, "] (the header's widths)"));
    }
    const nlohmann::json* offsets = t->contains("data_offsets") ? &(*t)["data_offsets"] : nullptr;
    if (offsets == nullptr || !offsets->is_array() || offsets->size() != 2 || !(*offsets)[0].is_number_unsigned() ||
        !(*offsets)[1].is_number_unsigned()) {
      return Bad(prefix + "data_offsets is not [begin, end]");
    }
    const uint64_t begin = (*offsets)[0].get<uint64_t>(), end = (*offsets)[1].get<uint64_t>();
    if (begin > end || end > data.size() || end - begin != static_cast<uint64_t>(length) * size) {
      return Bad(prefix + "points outside the data or has the wrong size");
    }
    ranges.emplace_back(begin, end);
    const auto* p = reinterpret_cast<const unsigned char*>(data.data()) + begin;
    bool nonzero = false;
    for (int64_t k = 0; k < length; ++k) {
      const float v = ElementAt(p + k * size, dtype);
      if (!std::isfinite(v) || std::fabs(v) > kMaxConceptValue) {
        return Bad(absl::StrCat(prefix, "value ", k, " is ", v, "; values must be finite and within +-",
                                kMaxConceptValue));
      }
      nonzero = nonzero || v != 0;
    }
    // A zero i* has no direction to gate on (every generation would fail: i*^T C^-1 i* = 0).
    const std::string tensor = name;
    if (!nonzero && (tensor == "i_star" || tensor == "i_sup")) return Bad(prefix + "all zeros");
  }
  // The engine writes the tensors back to back and nothing else: bytes no tensor uses would be
  // stored (and counted against the tenant) for nothing, and overlapping tensors are not its format.
  std::sort(ranges.begin(), ranges.end());
  uint64_t at = 0;
  for (const auto& [begin, end] : ranges) {
    if (begin != at) {
      return Bad(absl::StrCat("the tensors do not cover the data back to back (", begin < at ? "overlap" : "gap",
                              " at byte ", std::min(begin, at), "; no padding or extra data allowed)"));
    }
    at = end;
  }
  if (at != data.size()) {
    return Bad(absl::StrCat("the tensors do not cover the data back to back (gap at byte ", at,
                            " of ", data.size(), "; no padding or extra data allowed)"));
  }
  return absl::OkStatus();
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
  if (auto f = j.find("format"); f == j.end() || !f->is_string() || f->get<std::string>() != "perfusion-concept") {
    return Bad("header key \"format\" is not \"perfusion-concept\"");
  }
  auto it = j.find("format_version");
  if (it == j.end() || !it->is_number_integer() || it->get<int64_t>() < 1 ||
      it->get<int64_t>() > 1000000) {
    return absl::InvalidArgumentError(
        "blob: header key \"format_version\" missing or not a positive integer");
  }
  h.format_version = it->get<int>();
  if (h.format_version > kMaxConceptFormatVersion) {
    return Bad(absl::StrCat("format version ", h.format_version, " is newer than this service reads (",
                            kMaxConceptFormatVersion, ")"));
  }
  for (auto [key, out] : {std::pair{"base_model_id", &h.base_model_id},
                          std::pair{"superclass", &h.superclass}, std::pair{"name", &h.name},
                          std::pair{"dtype", &h.dtype}}) {
    if (auto s = str(key, out); !s.ok()) return s;
  }
  // Stored with the concept and sent back in every Get/List: only the engine's storage types.
  if (h.dtype != "F32" && h.dtype != "F16" && h.dtype != "BF16") {
    return Bad(absl::StrCat("header key \"dtype\" is \"", h.dtype.substr(0, 32),
                            h.dtype.size() > 32 ? "..." : "", "\" (expected F32, F16 or BF16)"));
  }
  ASSIGN_OR_RETURN(h.superclass_token_id, IntIn(j, "superclass_token_id", 0, int64_t{1} << 31));
  auto gate = j.find("default_gate");
  if (gate == j.end() || !gate->is_object() || !gate->contains("beta") || !(*gate)["beta"].is_number() ||
      !gate->contains("temperature") || !(*gate)["temperature"].is_number()) {
    return Bad("header key \"default_gate\" is not {\"beta\": number, \"temperature\": number}");
  }
  // The ranges a user may set (the engine's CheckGateRange); the worker's tools use these values.
  const double beta = (*gate)["beta"].get<double>(), temperature = (*gate)["temperature"].get<double>();
  if (!(beta >= 0 && beta <= 1) || !(temperature > 0 && temperature <= 1)) {
    return Bad(absl::StrCat("default_gate: beta must be in [0, 1] and temperature in (0, 1], got ", beta, " and ",
                            temperature));
  }
  auto info = j.find("info");
  if (info == j.end() || !info->is_object()) return Bad("header key \"info\" missing or not an object");
  for (auto i = info->begin(); i != info->end(); ++i) {
    if (!i->is_string()) return Bad(absl::StrCat("info[", i.key(), "] is not a string"));
  }
  RETURN_IF_ERROR(CheckTensors(j, blob.substr(8 + len, blob.size() - 12 - len)));
  return h;
}

std::string Sha256Hex(absl::string_view data) {
  unsigned char md[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(data.data()), data.size(), md);
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(md), SHA256_DIGEST_LENGTH));
}

}  // namespace perfusion::server

#include "perfusion/concept.h"

#include <ATen/Functions.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstring>
#include <nlohmann/json.hpp>

#include "perfusion/rank1_edit.h"

namespace perfusion {
namespace {

const std::array<uint32_t, 256>& CrcTable() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (0x82F63B78u ^ (c >> 1)) : (c >> 1);
      t[i] = c;
    }
    return t;
  }();
  return table;
}

void PutU32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint32_t GetU32(const char* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}

const char* DtypeName(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "F32";
    case at::kHalf: return "F16";
    case at::kBFloat16: return "BF16";
    default: return nullptr;
  }
}
at::ScalarType DtypeFromName(const std::string& n) {
  if (n == "F32") return at::kFloat;
  if (n == "F16") return at::kHalf;
  if (n == "BF16") return at::kBFloat16;
  TORCH_CHECK_VALUE(false, "concept blob: unsupported tensor dtype '", n, "'");
}

#define BLOB_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "concept blob: ", __VA_ARGS__)

}  // namespace

uint32_t Crc32c(const void* data, size_t size, uint32_t crc) {
  const auto& t = CrcTable();
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
  for (size_t i = 0; i < size; ++i) crc = t[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return ~crc;
}

namespace {
at::Tensor LayerSlice(const Concept& c, const at::Tensor& all, size_t l) {
  TORCH_CHECK_INDEX(l < c.layers.size(), "concept '", c.name, "': layer ", l, " out of range (", c.layers.size(), " layers)");
  int64_t offset = 0;
  for (size_t i = 0; i < l; ++i) offset += c.layers[i].out_dim;
  return all.narrow(0, offset, c.layers[l].out_dim);
}
}  // namespace

at::Tensor Concept::v_target(size_t l) const { return LayerSlice(*this, v_targets, l); }
at::Tensor Concept::k_target(size_t l) const {
  TORCH_CHECK_VALUE(k_targets.defined(), "concept '", name, "' is key-locked: it has no learned K targets");
  return LayerSlice(*this, k_targets, l);
}

int64_t Concept::total_out_dim() const {
  int64_t total = 0;
  for (const auto& l : layers) total += l.out_dim;
  return total;
}

std::string EncodeConcept(const Concept& c, const ConceptEncodeOptions& options) {
  const char* dtype = DtypeName(options.dtype);
  TORCH_CHECK_VALUE(dtype != nullptr, "EncodeConcept: storage dtype must be F32, F16 or BF16");
  TORCH_CHECK_VALUE(!c.name.empty(), "EncodeConcept: the concept has no name");
  TORCH_CHECK_VALUE(c.embedding.defined() && c.embedding.dim() == 1, "EncodeConcept: embedding must be [d]");
  TORCH_CHECK_VALUE(c.i_star.defined() && c.i_star.dim() == 1, "EncodeConcept: i_star must be [D]");
  TORCH_CHECK_VALUE(c.i_sup.defined() && c.i_sup.sizes() == c.i_star.sizes(), "EncodeConcept: i_sup must be [D] like i_star");
  TORCH_CHECK_VALUE(!c.layers.empty(), "EncodeConcept: the concept has no layers");
  TORCH_CHECK_VALUE(c.v_targets.defined() && c.v_targets.dim() == 1 && c.v_targets.size(0) == c.total_out_dim(),
                    "EncodeConcept: v_targets must be [", c.total_out_dim(), "] (the sum of the layers' widths), got ",
                    c.v_targets.defined() ? c.v_targets.sizes() : c10::IntArrayRef{});
  TORCH_CHECK_VALUE(!c.k_targets.defined() || c.k_targets.sizes() == c.v_targets.sizes(),
                    "EncodeConcept: k_targets must be shaped like v_targets");
  struct Item {
    const char* name;
    at::Tensor t;
  };
  std::vector<Item> items = {{"i_star", c.i_star.detach().to(at::kCPU, at::kFloat).contiguous()},
                             {"i_sup", c.i_sup.detach().to(at::kCPU, at::kFloat).contiguous()},
                             {"embedding", c.embedding.detach().to(at::kCPU, options.dtype).contiguous()},
                             {"v_targets", c.v_targets.detach().to(at::kCPU, options.dtype).contiguous()}};
  if (c.k_targets.defined()) items.push_back({"k_targets", c.k_targets.detach().to(at::kCPU, options.dtype).contiguous()});
  nlohmann::ordered_json h;
  h["format"] = "perfusion-concept";
  h["format_version"] = kConceptFormatVersion;
  h["name"] = c.name;
  h["superclass"] = c.superclass;
  h["superclass_token_id"] = c.superclass_token_id;
  h["base_model_id"] = c.base_model_id;
  h["embedding_dim"] = c.embedding.size(0);
  h["encoder_dim"] = c.i_star.size(0);
  h["dtype"] = dtype;
  h["default_gate"] = {{"beta", c.default_gate.beta}, {"temperature", c.default_gate.temperature}};
  nlohmann::ordered_json layers = nlohmann::ordered_json::array();
  for (const auto& l : c.layers) layers.push_back({{"name", l.name}, {"out_dim", l.out_dim}});
  h["layers"] = layers;
  nlohmann::ordered_json info = nlohmann::ordered_json::object();
  for (const auto& [k, v] : c.info) info[k] = v;
  h["info"] = info;
  nlohmann::ordered_json tensors = nlohmann::ordered_json::object();
  uint64_t offset = 0;
  for (const auto& it : items) {
    const uint64_t n = it.t.numel() * it.t.element_size();
    tensors[it.name] = {{"dtype", DtypeName(it.t.scalar_type())}, {"shape", it.t.sizes().vec()}, {"data_offsets", {offset, offset + n}}};
    offset += n;
  }
  h["tensors"] = tensors;
  std::string json = h.dump();
  while ((8 + json.size()) % 8 != 0) json.push_back(' ');
  std::string out(kConceptMagic, 4);
  PutU32(out, static_cast<uint32_t>(json.size()));
  out += json;
  for (const auto& it : items) out.append(static_cast<const char*>(it.t.data_ptr()), it.t.numel() * it.t.element_size());
  PutU32(out, Crc32c(out.data(), out.size()));
  return out;
}

Concept DecodeConcept(const std::string& bytes, const std::string& expected_base_model_id) {
  BLOB_CHECK(bytes.size() >= 12, "too short (", bytes.size(), " bytes)");
  BLOB_CHECK(std::memcmp(bytes.data(), kConceptMagic, 4) == 0, "not a Perfusion concept (bad magic)");
  const uint32_t header_len = GetU32(bytes.data() + 4);
  BLOB_CHECK(header_len <= bytes.size() - 12, "truncated (header of ", header_len, " bytes in a blob of ", bytes.size(), ")");
  const uint32_t stored_crc = GetU32(bytes.data() + bytes.size() - 4);
  BLOB_CHECK(Crc32c(bytes.data(), bytes.size() - 4) == stored_crc, "checksum mismatch (corrupted or truncated)");
  nlohmann::json h;
  try {
    h = nlohmann::json::parse(bytes.begin() + 8, bytes.begin() + 8 + header_len);
  } catch (const std::exception& e) {
    BLOB_CHECK(false, "header is not valid JSON: ", e.what());
  }
  Concept c;
  try {
    BLOB_CHECK(h.value("format", "") == "perfusion-concept", "not a Perfusion concept (format '", h.value("format", ""), "')");
    const int version = h.at("format_version").get<int>();
    BLOB_CHECK(version >= 1 && version <= kConceptFormatVersion, "format version ", version,
               " is not supported (this build reads up to ", kConceptFormatVersion, ")");
    c.name = h.at("name").get<std::string>();
    c.superclass = h.at("superclass").get<std::string>();
    c.superclass_token_id = h.at("superclass_token_id").get<int64_t>();
    c.base_model_id = h.at("base_model_id").get<std::string>();
    c.default_gate.beta = h.at("default_gate").at("beta").get<double>();
    c.default_gate.temperature = h.at("default_gate").at("temperature").get<double>();
    for (const auto& l : h.at("layers")) {
      c.layers.push_back({l.at("name").get<std::string>(), l.at("out_dim").get<int64_t>()});
      // Bounded, so the layers' total cannot overflow (the tensors are bounded the same way).
      BLOB_CHECK(c.layers.back().out_dim >= 1 && c.layers.back().out_dim < (1 << 24), "layer '",
                 c.layers.back().name, "' has a bad out_dim (", c.layers.back().out_dim, ")");
    }
    BLOB_CHECK(c.layers.size() <= 4096, "too many layers (", c.layers.size(), ")");
    BLOB_CHECK(c.superclass_token_id >= 0, "superclass_token_id ", c.superclass_token_id, " is negative");
    for (auto it = h.at("info").begin(); it != h.at("info").end(); ++it) c.info[it.key()] = it.value().get<std::string>();
  } catch (const nlohmann::json::exception& e) {
    BLOB_CHECK(false, "malformed header: ", e.what());
  }
  BLOB_CHECK(expected_base_model_id.empty() || c.base_model_id == expected_base_model_id, "trained on base model '",
             c.base_model_id, "', but this model is '", expected_base_model_id, "'");
  const uint64_t data_start = 8 + header_len, data_size = bytes.size() - 4 - data_start;
  auto read = [&](const char* name) -> at::Tensor {
    BLOB_CHECK(h.contains("tensors") && h["tensors"].contains(name), "missing tensor '", name, "'");
    const auto& t = h["tensors"][name];
    at::ScalarType type = DtypeFromName(t.at("dtype").get<std::string>());
    std::vector<int64_t> shape = t.at("shape").get<std::vector<int64_t>>();
    BLOB_CHECK(shape.size() == 1 && shape[0] >= 0 && shape[0] < (1 << 24), "tensor '", name, "' has a bad shape");
    const uint64_t b = t.at("data_offsets").at(0).get<uint64_t>(), e = t.at("data_offsets").at(1).get<uint64_t>();
    BLOB_CHECK(b <= e && e <= data_size && e - b == static_cast<uint64_t>(shape[0]) * c10::elementSize(type),
               "tensor '", name, "' points outside the data or has the wrong size");
    at::Tensor out = at::empty(shape, at::TensorOptions().dtype(type));
    std::memcpy(out.data_ptr(), bytes.data() + data_start + b, e - b);
    out = out.to(at::kFloat);
    BLOB_CHECK(at::isfinite(out).all().item<bool>(), "tensor '", name, "' has non-finite values");
    // A worker may run in half precision: a larger value becomes infinite there, and a huge finite
    // one overflows the attention in any precision, giving black images reported as a success.
    BLOB_CHECK(out.numel() == 0 || out.abs().max().item<double>() <= kMaxConceptValue, "tensor '", name,
               "' has values beyond +-", kMaxConceptValue, " (the range of half precision)");
    return out;
  };
  try {
    c.i_star = read("i_star");
    c.i_sup = read("i_sup");
    c.embedding = read("embedding");
    c.v_targets = read("v_targets");
    if (h["tensors"].contains("k_targets")) {
      c.k_targets = read("k_targets");
      BLOB_CHECK(c.k_targets.sizes() == c.v_targets.sizes(), "k_targets and v_targets differ in size");
    }
    BLOB_CHECK(c.i_sup.size(0) == c.i_star.size(0) && c.i_star.size(0) == h.at("encoder_dim").get<int64_t>(),
               "i_star/i_sup do not match encoder_dim");
    BLOB_CHECK(c.embedding.size(0) == h.at("embedding_dim").get<int64_t>(), "embedding does not match embedding_dim");
  } catch (const nlohmann::json::exception& e) {
    BLOB_CHECK(false, "malformed tensor table: ", e.what());
  }
  BLOB_CHECK(!c.layers.empty(), "no layers");
  for (const auto& l : c.layers) BLOB_CHECK(l.out_dim > 0, "layer '", l.name, "' has out_dim ", l.out_dim);
  BLOB_CHECK(c.v_targets.size(0) == c.total_out_dim(), "v_targets has ", c.v_targets.size(0),
             " values but the layers need ", c.total_out_dim());
  BLOB_CHECK(c.default_gate.temperature > 0, "default gate temperature must be > 0");
  // A zero i* has no direction to gate on: every generation would fail on it later.
  BLOB_CHECK(c.i_star.abs().max().item<float>() > 0 && c.i_sup.abs().max().item<float>() > 0,
             "i_star or i_sup is all zeros");
  return c;
}

}  // namespace perfusion

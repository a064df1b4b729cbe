// concept: the learned artifact of one Perfusion concept and its binary format ("concept blob").
//
// What is stored is only what cannot be recomputed from the base model (spec §7):
//   embedding  [d]        the concept's token embedding (textual-inversion part)
//   i_star     [D]        target input: EMA of the concept token's encoding (the gate's key)
//   i_sup      [D]        EMA of the superclass token's encoding; the locked K targets are W_k i_sup
//                         (exactly the reference's EMA of W_k x_sup, by linearity), rebuilt at load
//   v_targets  [sum O_l]  learned V targets of every cross-attention layer, concatenated in layer order
// For SD 1.5 (16 layers, sum O_l = 12,480, d = D = 768) that is 32.6 KB with fp16 embedding/V targets
// (i*/i_sup always fp32: the gate is sensitive to them), against the reference's ~200 KB.
//
// Binary format, version 1 (all integers little-endian):
//   "PFCN" | u32 header_len | JSON header (padded with spaces so the data starts 8-aligned) |
//   tensor data (offsets relative to the data start, as in safetensors) | u32 CRC-32C of all before it
// The JSON header holds format, format_version, name, superclass, superclass_token_id, base_model_id,
// embedding_dim, encoder_dim, dtype, layers [{name, out_dim}], default_gate {beta, temperature},
// info {string: string} and tensors {name: {dtype, shape, data_offsets}}.
// A server can read the header without LibTorch; the engine verifies everything on decode.
//
// Thread safety: plain data; functions are pure.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "perfusion/rank1_edit.h"

namespace perfusion {

inline constexpr char kConceptMagic[4] = {'P', 'F', 'C', 'N'};
inline constexpr int kConceptFormatVersion = 1;
// The largest magnitude DecodeConcept accepts in a concept's tensors: half precision's largest
// finite value, since a worker may run in it.
inline constexpr double kMaxConceptValue = 65504.0;

struct ConceptLayer {
  std::string name;  // the UNet attn2 module path, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
  int64_t out_dim = 0;
};

struct Concept {
  std::string name;
  std::string superclass;
  int64_t superclass_token_id = -1;
  std::string base_model_id;
  std::vector<ConceptLayer> layers;
  at::Tensor embedding;  // [d] float32
  at::Tensor i_star;     // [D] float32
  at::Tensor i_sup;      // [D] float32
  at::Tensor v_targets;  // [sum out_dim] float32, layers concatenated in order
  // Only for concepts trained WITHOUT key-locking (the paper's "trained K" ablation): learned K
  // targets, like v_targets. Undefined (the normal case): K targets are W_k i_sup.
  at::Tensor k_targets;
  GateParams default_gate;
  std::map<std::string, std::string> info;  // training facts: steps, seed, final loss, created, ...

  // V target of layer l ([out_dim]), a view into v_targets.
  at::Tensor v_target(size_t l) const;
  // Learned K target of layer l (REQUIRES: k_targets defined).
  at::Tensor k_target(size_t l) const;
  int64_t total_out_dim() const;
};

struct ConceptEncodeOptions {
  // Storage dtype of embedding and v_targets: kHalf (default), kBFloat16 or kFloat.
  at::ScalarType dtype = at::ScalarType::Half;
};

// Serialises a concept. Throws c10::ValueError if its tensors do not fit its layers.
std::string EncodeConcept(const Concept& concept, const ConceptEncodeOptions& options = {});

// Parses and verifies a blob: magic, header bounds, JSON, version, checksum, tensor bounds and shapes,
// finite values. If expected_base_model_id is non-empty, a concept of another base model is refused.
// Every failure is a c10::ValueError whose message starts with "concept blob: ".
Concept DecodeConcept(const std::string& bytes, const std::string& expected_base_model_id = "");

// CRC-32C (Castagnoli), as used by the blob trailer.
uint32_t Crc32c(const void* data, size_t size, uint32_t crc = 0);

}  // namespace perfusion

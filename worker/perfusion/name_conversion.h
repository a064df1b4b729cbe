// name_conversion: every translation between checkpoint tensor names and the names our modules
// register, in one place. Each function is usable as (or composed into) LoadOptions::rename.
//
// Ref: diffusers v0.25.0 `models/modeling_utils.py` (`_convert_deprecated_attention_blocks`): VAE files
// written by diffusers < 0.15 (most SD 1.5-era files) name the mid-block attention
// `query/key/value/proj_attn`; current diffusers (and our modules) use `to_q/to_k/to_v/to_out.0`.
// transformers `modeling_clip.py`: the `text_model.embeddings.position_ids` buffer is saved by
// transformers < 4.31 and omitted by newer saves.
//
// Thread safety: pure functions.
#pragma once

#include <set>
#include <string>

#include "perfusion/module_io.h"

namespace perfusion {

// VAE: maps a legacy mid-block attention name ("<...>.mid_block.attentions.N.query.weight") to the
// current one ("<...>.mid_block.attentions.N.to_q.weight"); query->to_q, key->to_k, value->to_v,
// proj_attn->to_out.0. Any other name (including already-current ones) is returned unchanged, so a
// file in either naming loads through it.
std::string VaeNameFromLegacy(const std::string& name);

// The inverse of VaeNameFromLegacy: current name -> legacy name (others unchanged). For writing
// files that older tools read, and for checking the mapping is one-to-one.
std::string VaeNameToLegacy(const std::string& name);

// Names a CLIPTextModel checkpoint may lack: {"text_model.embeddings.position_ids"}.
std::set<std::string> ClipTextOptionalNames();

// LoadOptions for a diffusers VAE file (either attention naming).
LoadOptions VaeLoadOptions();
// LoadOptions for a transformers CLIPTextModel file (with or without position_ids).
LoadOptions ClipTextLoadOptions();

}  // namespace perfusion

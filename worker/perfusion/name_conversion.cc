#include "perfusion/name_conversion.h"

#include <array>
#include <utility>

namespace perfusion {

namespace {

// (legacy, current) attention projection names inside `mid_block.attentions.N.`.
constexpr std::array<std::pair<const char*, const char*>, 4> kVaeAttention = {{
    {"query", "to_q"},
    {"key", "to_k"},
    {"value", "to_v"},
    {"proj_attn", "to_out.0"},
}};

// If `name` is "<prefix>.mid_block.attentions.<digits>.<rest>", sets *head to everything up to and
// including "<digits>." and *rest to the remainder.
bool SplitMidBlockAttention(const std::string& name, std::string* head, std::string* rest) {
  static const std::string kMarker = "mid_block.attentions.";
  const auto pos = name.find(kMarker);
  if (pos == std::string::npos || (pos != 0 && name[pos - 1] != '.')) return false;
  size_t i = pos + kMarker.size();
  const size_t digits = i;
  while (i < name.size() && name[i] >= '0' && name[i] <= '9') ++i;
  if (i == digits || i >= name.size() || name[i] != '.') return false;
  *head = name.substr(0, i + 1);
  *rest = name.substr(i + 1);
  return true;
}

std::string MapAttention(const std::string& name, bool to_current) {
  std::string head, rest;
  if (!SplitMidBlockAttention(name, &head, &rest)) return name;
  for (const auto& [legacy, current] : kVaeAttention) {
    const std::string from = std::string(to_current ? legacy : current) + ".";
    if (rest.rfind(from, 0) == 0) return head + (to_current ? current : legacy) + "." + rest.substr(from.size());
  }
  return name;
}

}  // namespace

std::string VaeNameFromLegacy(const std::string& name) { return MapAttention(name, /*to_current=*/true); }

std::string VaeNameToLegacy(const std::string& name) { return MapAttention(name, /*to_current=*/false); }

std::set<std::string> ClipTextOptionalNames() { return {"text_model.embeddings.position_ids"}; }

LoadOptions VaeLoadOptions() {
  LoadOptions options;
  options.rename = VaeNameFromLegacy;
  return options;
}

LoadOptions ClipTextLoadOptions() {
  LoadOptions options;
  options.optional = ClipTextOptionalNames();
  return options;
}

}  // namespace perfusion

// The command-line form of a regional prompt, shared by perfusionctl and perfusion-generate:
//
//   --region BOX:PROMPT
//
// BOX is x0,y0,x1,y1 in fractions of the image ((0, 0) the top left) or one of the names left,
// right, top, bottom, top_left, top_right, bottom_left, bottom_right. Header-only and free of
// dependencies so both the client (no LibTorch) and the engine tools can use it.
#pragma once

#include <array>
#include <cstdlib>
#include <map>
#include <string>

namespace perfusion {

struct RegionText {
  std::string prompt;
  std::array<double, 4> box{0, 0, 1, 1};  // x0, y0, x1, y1
};

// The box of a named region (x0, y0, x1, y1), or nullptr for an unknown name.
inline const std::array<double, 4>* NamedRegionBox(const std::string& name) {
  static const std::map<std::string, std::array<double, 4>> kNamed = {
      {"left", {0, 0, 0.5, 1}},          {"right", {0.5, 0, 1, 1}},         {"top", {0, 0, 1, 0.5}},
      {"bottom", {0, 0.5, 1, 1}},        {"top_left", {0, 0, 0.5, 0.5}},    {"top_right", {0.5, 0, 1, 0.5}},
      {"bottom_left", {0, 0.5, 0.5, 1}}, {"bottom_right", {0.5, 0.5, 1, 1}}};
  const auto it = kNamed.find(name);
  return it == kNamed.end() ? nullptr : &it->second;
}

// Parses BOX:PROMPT. Returns "" and fills *out, or a message naming the problem. The box's bounds
// are checked where it is used (the server or the pipeline), with the same message for every client.
inline std::string ParseRegionText(const std::string& spec, RegionText* out) {
  const std::string usage = "--region \"" + spec + "\": expected BOX:PROMPT, e.g. \"left:a <cat>\"";
  const size_t colon = spec.find(':');
  if (colon == std::string::npos || colon == 0) return usage;
  const size_t first = spec.find_first_not_of(' ', colon + 1);
  out->prompt = first == std::string::npos ? "" : spec.substr(first);
  if (out->prompt.empty()) return usage + " (the prompt is empty)";
  const std::string box = spec.substr(0, colon);
  if (const std::array<double, 4>* named = NamedRegionBox(box)) {
    out->box = *named;
    return "";
  }
  const char* p = box.c_str();
  for (int i = 0; i < 4; ++i) {
    char* end = nullptr;
    out->box[i] = std::strtod(p, &end);
    if (end == p || (i < 3 && *end != ',') || (i == 3 && *end != '\0')) {
      return "--region \"" + spec +
             "\": BOX must be x0,y0,x1,y1 (fractions of the image) or one of left, right, top, bottom, "
             "top_left, top_right, bottom_left, bottom_right";
    }
    p = end + 1;
  }
  return "";
}

}  // namespace perfusion

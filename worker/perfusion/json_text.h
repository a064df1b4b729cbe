#ifndef PERFUSION_JSON_TEXT_H_
#define PERFUSION_JSON_TEXT_H_

// A JSON value quoted in an error message. Config files and safetensors headers are read from
// disk, so the value may be anything: nlohmann's dump() recurses once per nesting level, and a
// value nested 100,000 deep overflows the stack. This never recurses deeper than kMaxDepth and
// keeps the text short.

#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace perfusion {

inline std::string JsonForMessage(const nlohmann::json& v) {
  constexpr int kMaxDepth = 8;
  constexpr size_t kMaxChars = 200;
  if (v.is_structured()) {
    std::vector<std::pair<const nlohmann::json*, int>> stack{{&v, 1}};
    while (!stack.empty()) {
      auto [j, depth] = stack.back();
      stack.pop_back();
      if (depth > kMaxDepth) {
        return std::string("<") + v.type_name() + " nested more than " + std::to_string(kMaxDepth) + " deep>";
      }
      if (j->is_structured()) {
        for (const auto& e : *j) stack.emplace_back(&e, depth + 1);
      }
    }
  }
  std::string text = v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (text.size() > kMaxChars) text = text.substr(0, kMaxChars) + "...";
  return text;
}

}  // namespace perfusion

#endif  // PERFUSION_JSON_TEXT_H_

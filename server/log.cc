#include "server/log.h"

#include <atomic>
#include <cstdio>

#include "absl/strings/string_view.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace perfusion::server {
namespace {
std::atomic<bool> g_enabled{true};

bool Control(char c) { return static_cast<unsigned char>(c) < 0x20 || c == 0x7f; }
}  // namespace

std::string LogValue(absl::string_view v) {
  bool plain = !v.empty();
  for (char c : v) plain = plain && c != ' ' && c != '"' && c != '=' && !Control(c);
  if (plain) return std::string(v);
  std::string out = "\"";
  for (char c : v) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (Control(c)) {
          absl::StrAppend(&out, "\\x", absl::Hex(static_cast<unsigned char>(c), absl::kZeroPad2));
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

void SetLogEnabled(bool enabled) { g_enabled.store(enabled); }

void LogEvent(absl::string_view event,
              std::initializer_list<std::pair<absl::string_view, std::string>> fields) {
  if (!g_enabled.load()) return;
  std::string line = absl::StrCat(
      "ts=", absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::Now(), absl::UTCTimeZone()),
      " event=", event);
  for (const auto& [k, v] : fields) absl::StrAppend(&line, " ", k, "=", LogValue(v));
  line += "\n";
  fwrite(line.data(), 1, line.size(), stderr);  // one write per line: no interleaving
}

}  // namespace perfusion::server

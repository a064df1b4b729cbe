#include "server/log.h"

#include <atomic>
#include <cstdint>
#include <cstdio>

#include "absl/strings/string_view.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace perfusion::server {
namespace {
std::atomic<bool> g_enabled{true};

bool Control(char c) { return static_cast<unsigned char>(c) < 0x20 || c == 0x7f; }

// The length of the well-formed UTF-8 sequence at v[i] that encodes a printable character, or 0
// when the byte must be escaped: a stray or malformed byte (0x9b alone is an 8-bit CSI to some
// terminals), or a C1 control character (U+0080-U+009F).
size_t PrintableUtf8(absl::string_view v, size_t i) {
  const unsigned char b = static_cast<unsigned char>(v[i]);
  const size_t n = b >= 0xf0 && b <= 0xf4 ? 4 : b >= 0xe0 ? 3 : b >= 0xc2 && b <= 0xdf ? 2 : 0;
  if (n == 0 || i + n > v.size()) return 0;
  uint32_t cp = b & (n == 2 ? 0x1f : n == 3 ? 0x0f : 0x07);
  for (size_t k = 1; k < n; ++k) {
    const unsigned char c = static_cast<unsigned char>(v[i + k]);
    if ((c & 0xc0) != 0x80) return 0;
    cp = (cp << 6) | (c & 0x3f);
  }
  const uint32_t min = n == 2 ? 0x80 : n == 3 ? 0x800 : 0x10000;
  if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff) || cp <= 0x9f) return 0;
  return n;
}
}  // namespace

std::string LogValue(absl::string_view v) {
  bool plain = !v.empty();
  for (size_t i = 0; plain && i < v.size();) {
    const char c = v[i];
    if (static_cast<unsigned char>(c) >= 0x80) {
      const size_t n = PrintableUtf8(v, i);
      plain = n > 0;
      i += n;
      continue;
    }
    plain = c != ' ' && c != '"' && c != '=' && !Control(c);
    ++i;
  }
  if (plain) return std::string(v);
  std::string out = "\"";
  for (size_t i = 0; i < v.size();) {
    const char c = v[i];
    if (static_cast<unsigned char>(c) >= 0x80) {
      if (const size_t n = PrintableUtf8(v, i)) {
        out.append(v.data() + i, n);
        i += n;
      } else {
        absl::StrAppend(&out, "\\x", absl::Hex(static_cast<unsigned char>(c), absl::kZeroPad2));
        ++i;
      }
      continue;
    }
    ++i;
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

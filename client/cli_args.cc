#include "client/cli_args.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "client/client.h"

namespace perfusion::client {

absl::StatusOr<ParsedArgs> ParsedArgs::Parse(const std::vector<std::string>& args,
                                             const std::vector<FlagSpec>& specs) {
  ParsedArgs out;
  auto find = [&](const std::string& name) -> const FlagSpec* {
    for (const FlagSpec& s : specs) {
      if (s.name == name || (!s.alias.empty() && s.alias == name)) return &s;
    }
    return nullptr;
  };
  bool flags_done = false;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (flags_done || a.size() < 2 || a[0] != '-' || a == "-") {
      out.positionals_.push_back(a);
      continue;
    }
    if (a == "--") {
      flags_done = true;
      continue;
    }
    std::string body = a[1] == '-' ? a.substr(2) : a.substr(1);
    std::string value;
    bool has_value = false;
    const size_t eq = body.find('=');
    if (eq != std::string::npos) {
      value = body.substr(eq + 1);
      body = body.substr(0, eq);
      has_value = true;
    }
    const std::string name = absl::StrReplaceAll(body, {{"_", "-"}});
    const FlagSpec* spec = find(name);
    if (spec == nullptr) return absl::InvalidArgumentError(absl::StrCat("unknown flag ", a));
    if (spec->takes_value) {
      if (!has_value) {
        if (i + 1 >= args.size()) {
          return absl::InvalidArgumentError(absl::StrCat("--", spec->name, " needs a value"));
        }
        value = args[++i];
      }
    } else if (has_value) {
      if (value == "true" || value == "1") {
        value = "true";
      } else if (value == "false" || value == "0") {
        out.set_false_.insert(spec->name);  // as if absent, but a command may ask (SetFalse)
        out.values_.erase(spec->name);
        continue;
      } else {
        return absl::InvalidArgumentError(absl::StrCat("--", spec->name, " takes no value"));
      }
    } else {
      value = "true";
    }
    out.values_[spec->name].push_back(value);
  }
  return out;
}

std::string ParsedArgs::Get(const std::string& name, const std::string& def) const {
  auto it = values_.find(name);
  return it == values_.end() ? def : it->second.back();
}

std::vector<std::string> ParsedArgs::GetAll(const std::string& name) const {
  auto it = values_.find(name);
  return it == values_.end() ? std::vector<std::string>{} : it->second;
}

std::vector<std::string> ParsedArgs::Names() const {
  std::vector<std::string> n;
  for (const auto& [k, v] : values_) n.push_back(k);
  return n;
}

absl::StatusOr<int64_t> ParsedArgs::GetInt(const std::string& name, int64_t def) const {
  if (!Has(name)) return def;
  int64_t v = 0;
  if (!absl::SimpleAtoi(Get(name), &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, ": \"", Get(name), "\" is not an integer"));
  }
  return v;
}

absl::StatusOr<int32_t> ParsedArgs::GetInt32(const std::string& name, int32_t def) const {
  if (!Has(name)) return def;
  int32_t v = 0;
  if (!absl::SimpleAtoi(Get(name), &v)) {
    int64_t wide = 0;
    return absl::InvalidArgumentError(absl::StrCat(
        "--", name, ": \"", Get(name), "\" is ",
        absl::SimpleAtoi(Get(name), &wide) ? absl::StrCat("out of range (", INT32_MIN, "..", INT32_MAX, ")")
                                           : std::string("not an integer")));
  }
  return v;
}

absl::StatusOr<uint64_t> ParsedArgs::GetUint64(const std::string& name, uint64_t def) const {
  if (!Has(name)) return def;
  const std::string text(absl::StripAsciiWhitespace(Get(name)));
  uint64_t v = 0;
  if (text.empty() || text[0] == '-' || !absl::SimpleAtoi(text, &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, ": \"", Get(name), "\" is not an integer in 0..18446744073709551615"));
  }
  return v;
}

absl::StatusOr<float> ParsedArgs::GetFloat(const std::string& name, float def) const {
  if (!Has(name)) return def;
  double v = 0;
  if (!absl::SimpleAtod(Get(name), &v) || !std::isfinite(v) ||
      std::fabs(v) > static_cast<double>(std::numeric_limits<float>::max())) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, ": \"", Get(name), "\" is not a finite number"));
  }
  return static_cast<float>(v);
}

absl::StatusOr<absl::Duration> ParsedArgs::GetDuration(const std::string& name,
                                                       absl::Duration def) const {
  if (!Has(name)) return def;
  const std::string v = Get(name);
  double secs = 0;
  // A finite, non-negative span: "inf" or 1e300 s would overflow a call's deadline.
  if (absl::SimpleAtod(v, &secs) && secs >= 0 && secs < 1e9) return absl::Seconds(secs);
  absl::Duration d;
  if (absl::ParseDuration(v, &d) && d >= absl::ZeroDuration() && d < absl::Seconds(1e9)) return d;
  return absl::InvalidArgumentError(
      absl::StrCat("--", name, ": \"", v, "\" is not a duration (30s, 5m, 1h, or seconds)"));
}

absl::StatusOr<std::string> TenantTokenFromArgs(const ParsedArgs& args) {
  // A file or variable gives its first non-comment line, so a trailing newline (a Kubernetes
  // secret made from a file) is not part of the token.
  std::string token, source = "--token";
  if (args.Has("token")) {
    token = std::string(absl::StripAsciiWhitespace(args.Get("token")));
  } else if (const char* env = std::getenv("PERFUSION_TOKEN"); env != nullptr) {
    token = TokenFromText(env);
    source = "PERFUSION_TOKEN";
  }
  if (args.Has("token-file")) {
    source = absl::StrCat("--token-file ", args.Get("token-file"));
    std::ifstream in(args.Get("token-file"), std::ios::binary);
    if (!in) return absl::InvalidArgumentError(absl::StrCat(source, ": cannot read it"));
    std::stringstream text;
    text << in.rdbuf();
    token = TokenFromText(text.str());
    if (token.empty()) return absl::InvalidArgumentError(absl::StrCat(source, ": no token in it"));
  }
  if (absl::Status s = CheckToken(token, source); !s.ok()) return s;
  return token;
}

}  // namespace perfusion::client

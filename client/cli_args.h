// Command-line parsing for perfusionctl and perfusion-load: subcommands with flags anywhere
// (`perfusionctl --server h:1 jobs get ID --output json`), `--flag value` or `--flag=value`,
// boolean flags without a value, repeatable flags, one-letter aliases (`-o`), `_` and `-`
// interchangeable in flag names, and `--` ending the flags.
//
// Thread safety: none needed (parsed once in main).
#ifndef PERFUSION_CLIENT_CLI_ARGS_H_
#define PERFUSION_CLIENT_CLI_ARGS_H_

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace perfusion::client {

struct FlagSpec {
  std::string name;       // without dashes, words joined by '-': "no-wait"
  bool takes_value;       // false: a boolean flag (present or not)
  std::string alias = ""; // one letter ("o" for -o), or ""
};

class ParsedArgs {
 public:
  // Parses args (without the program name) against specs. INVALID_ARGUMENT naming the flag for
  // an unknown flag, a missing value or a value given to a boolean flag.
  static absl::StatusOr<ParsedArgs> Parse(const std::vector<std::string>& args,
                                          const std::vector<FlagSpec>& specs);

  const std::vector<std::string>& positionals() const { return positionals_; }
  bool Has(const std::string& name) const { return values_.count(name) > 0; }
  // Whether a boolean flag was given as --flag=false (or =0), which Has() reads as absent.
  bool SetFalse(const std::string& name) const { return set_false_.count(name) > 0; }
  // The last value of a flag, or `def` when absent.
  std::string Get(const std::string& name, const std::string& def = "") const;
  // Every value of a repeatable flag, in order.
  std::vector<std::string> GetAll(const std::string& name) const;
  // The flags given (canonical names), for checking them against a command's allowed set.
  std::vector<std::string> Names() const;

  // Typed accessors: INVALID_ARGUMENT "--name: ..." when the value does not parse, or does not fit
  // the type the request field has (a static_cast would wrap 4294967297 to 1, not refuse it).
  absl::StatusOr<int64_t> GetInt(const std::string& name, int64_t def) const;
  absl::StatusOr<int32_t> GetInt32(const std::string& name, int32_t def) const;
  // 0..2^64-1; a minus sign is refused rather than wrapped.
  absl::StatusOr<uint64_t> GetUint64(const std::string& name, uint64_t def) const;
  // A finite number within float's range (a proto float field): not nan, inf or 1e40.
  absl::StatusOr<float> GetFloat(const std::string& name, float def) const;
  // "30s", "5m", "1h30m", "250ms" or a plain number of seconds.
  absl::StatusOr<absl::Duration> GetDuration(const std::string& name, absl::Duration def) const;

 private:
  std::vector<std::string> positionals_;
  std::map<std::string, std::vector<std::string>> values_;
  std::set<std::string> set_false_;
};

// The tenant token of a CLI: --token, else $PERFUSION_TOKEN (its first non-comment line), and
// --token-file's first non-comment line when that flag is given. INVALID_ARGUMENT naming where it
// came from for a file that cannot be read or holds no token, or a token no request header can
// carry (client.h's CheckToken).
absl::StatusOr<std::string> TenantTokenFromArgs(const ParsedArgs& args);

}  // namespace perfusion::client

#endif  // PERFUSION_CLIENT_CLI_ARGS_H_

// Command-line parsing shared by the engine's tools (perfusion-generate, -train-concept,
// -evaluate, -train-base, -train-classifier): `--flag value` pairs, boolean flags, positional
// arguments, --help, and the same errors everywhere, all with exit code 2:
//   "--steps needs a value (see --help)", "--steps: bad value 'x'", "unknown option --x (see --help)".
//
//   if (auto code = ParseToolArgs(argc, argv, Usage, [&](const std::string& k, const NextValue& v) {
//         if (k == "--steps") a.steps = ParseInt64(v());
//         else if (k == "--quiet") a.quiet = true;
//         else return false;  // unknown
//         return true;
//       })) {
//     return *code;
//   }
//
// A handler may throw ToolUsageError for a message of its own (also exit 2). Header-only: every
// .cc in worker/tools/ is a tool of its own.
#ifndef PERFUSION_WORKER_TOOLS_TOOL_ARGS_H_
#define PERFUSION_WORKER_TOOLS_TOOL_ARGS_H_

#include <cstdint>
#include <cstdio>
#include <functional>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace perfusion {

// Thrown by a flag handler: the message is printed and the tool exits with 2.
class ToolUsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Consumes and returns the argument after the current flag.
using NextValue = std::function<std::string()>;

// Calls `handle(arg, next)` for every argument after argv[0]; `handle` returns false for an
// argument it does not know. --help / -h print `usage()`. Returns nullopt to go on, or the exit
// code main should return (0 after --help, 2 after an error, which is printed on stderr).
inline std::optional<int> ParseToolArgs(int argc, char** argv, void (*usage)(),
                                        const std::function<bool(const std::string&, const NextValue&)>& handle) {
  struct MissingValue {};
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    if (k == "--help" || k == "-h") {
      usage();
      return 0;
    }
    const NextValue next = [&]() -> std::string {
      if (i + 1 >= argc) throw MissingValue{};
      return argv[++i];
    };
    try {
      if (!handle(k, next)) {
        std::fprintf(stderr, "%s %s (see --help)\n",
                     !k.empty() && k[0] == '-' ? "unknown option" : "unexpected argument", k.c_str());
        return 2;
      }
    } catch (const MissingValue&) {
      std::fprintf(stderr, "%s needs a value (see --help)\n", k.c_str());
      return 2;
    } catch (const ToolUsageError& e) {
      std::fprintf(stderr, "%s\n", e.what());
      return 2;
    } catch (const std::logic_error&) {  // std::stoi and friends: invalid_argument, out_of_range
      std::fprintf(stderr, "%s: bad value '%s'\n", k.c_str(), argv[i]);
      return 2;
    }
  }
  return std::nullopt;
}

// The items of a comma-separated list, empty items dropped ("1,,2" -> {"1", "2"}).
inline std::vector<std::string> SplitList(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

// Whole-string number parsing for flag values. std::stoll and friends stop at the first character
// they cannot use, so "4e2" read as 4 and "2x" as 2, and std::stoull wraps "-1" to 2^64 - 1; these
// throw std::invalid_argument (reported by ParseToolArgs as a bad value of the flag) unless the
// whole value is the number.
inline int64_t ParseInt64(const std::string& s) {
  size_t used = 0;
  const long long v = std::stoll(s, &used);
  if (used != s.size()) throw std::invalid_argument(s);
  return v;
}
inline int ParseInt(const std::string& s) {
  const int64_t v = ParseInt64(s);
  if (v < INT32_MIN || v > INT32_MAX) throw std::out_of_range(s);
  return static_cast<int>(v);
}
inline uint64_t ParseUint64(const std::string& s) {
  if (s.empty() || s[0] == '-' || s[0] == ' ') throw std::invalid_argument(s);
  size_t used = 0;
  const unsigned long long v = std::stoull(s, &used);
  if (used != s.size()) throw std::invalid_argument(s);
  return v;
}
inline double ParseDouble(const std::string& s) {
  size_t used = 0;
  const double v = std::stod(s, &used);
  if (used != s.size()) throw std::invalid_argument(s);
  return v;
}

// A comma-separated list of integers; a bad item throws std::invalid_argument, which
// ParseToolArgs reports as a bad value of the flag.
inline std::vector<int64_t> ParseIntList(const std::string& s) {
  std::vector<int64_t> out;
  for (const auto& item : SplitList(s)) out.push_back(ParseInt64(item));
  return out;
}

}  // namespace perfusion

#endif  // PERFUSION_WORKER_TOOLS_TOOL_ARGS_H_

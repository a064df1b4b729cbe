// worker/tools/tool_args.h: the research tools' shared command-line parsing.
#include "tools/tool_args.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace perfusion {
namespace {

int usage_calls = 0;
void CountUsage() { ++usage_calls; }

struct Parsed {
  std::optional<int> code;
  int steps = 0;
  bool quiet = false;
  std::string positional;
  std::string err;
};

Parsed Parse(std::vector<std::string> args) {
  args.insert(args.begin(), "tool");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  Parsed p;
  ::testing::internal::CaptureStderr();
  p.code = ParseToolArgs(static_cast<int>(argv.size()), argv.data(), CountUsage,
                         [&](const std::string& k, const NextValue& v) {
                           if (k == "--steps") p.steps = ParseInt(v());
                           else if (k == "--quiet") p.quiet = true;
                           else if (!k.empty() && k[0] == '-') return false;
                           else if (p.positional.empty()) p.positional = k;
                           else throw ToolUsageError("one folder only");
                           return true;
                         });
  p.err = ::testing::internal::GetCapturedStderr();
  return p;
}

TEST(ToolArgsTest, ParsesFlagsValuesAndPositionals) {
  Parsed p = Parse({"--steps", "12", "dir", "--quiet"});
  EXPECT_FALSE(p.code.has_value());
  EXPECT_EQ(p.steps, 12);
  EXPECT_TRUE(p.quiet);
  EXPECT_EQ(p.positional, "dir");
  EXPECT_EQ(p.err, "");
}

TEST(ToolArgsTest, HelpPrintsUsageAndExitsZero) {
  usage_calls = 0;
  EXPECT_EQ(Parse({"--steps", "3", "-h"}).code, 0);
  EXPECT_EQ(usage_calls, 1);
}

TEST(ToolArgsTest, ErrorsNameTheArgumentAndExitTwo) {
  Parsed p = Parse({"--steps"});
  EXPECT_EQ(p.code, 2);
  EXPECT_EQ(p.err, "--steps needs a value (see --help)\n");
  p = Parse({"--steps", "many"});
  EXPECT_EQ(p.code, 2);
  EXPECT_EQ(p.err, "--steps: bad value 'many'\n");
  p = Parse({"--steps", "99999999999999"});
  EXPECT_EQ(p.code, 2);
  EXPECT_EQ(p.err, "--steps: bad value '99999999999999'\n");
  p = Parse({"--frobnicate"});
  EXPECT_EQ(p.code, 2);
  EXPECT_EQ(p.err, "unknown option --frobnicate (see --help)\n");
  p = Parse({"a", "b"});
  EXPECT_EQ(p.code, 2);
  EXPECT_EQ(p.err, "one folder only\n");
}

// A value is the number or an error: std::stoll read "4e2" as 4, "2x" as 2, and std::stoull read
// "-1" as 2^64 - 1, so a typo changed the run instead of stopping it.
TEST(ToolArgsTest, NumbersMustBeTheWholeValue) {
  for (const char* bad : {"4e2", "2x", "12 ", "", "0x10"}) {
    Parsed p = Parse({"--steps", bad});
    EXPECT_EQ(p.code, 2) << bad;
    EXPECT_EQ(p.err, std::string("--steps: bad value '") + bad + "'\n");
  }
  EXPECT_EQ(ParseInt64("-7"), -7);
  EXPECT_EQ(ParseInt64(" 7"), 7);  // leading blanks, as strtoll takes them
  EXPECT_THROW(ParseUint64("-1"), std::invalid_argument);
  EXPECT_EQ(ParseUint64("18446744073709551615"), UINT64_MAX);
  EXPECT_THROW(ParseInt("3000000000"), std::out_of_range);
  EXPECT_DOUBLE_EQ(ParseDouble("2.5e-4"), 2.5e-4);
  EXPECT_THROW(ParseDouble("0.5.1"), std::invalid_argument);
  EXPECT_EQ(ParseIntList("1,,2"), (std::vector<int64_t>{1, 2}));
  EXPECT_THROW(ParseIntList("1,2x"), std::invalid_argument);
}

}  // namespace
}  // namespace perfusion

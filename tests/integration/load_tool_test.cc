// perfusion-load against a real server and worker: it completes its bounded run and reports
// rates, percentiles and the generation overhead in machine-readable form.
#include <filesystem>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/integration/cluster.h"

namespace perfusion::testing {
namespace {

using LoadToolTest = ClusterTest;

TEST_F(LoadToolTest, ReportsRegistryRatesAndGenerateOverhead) {
  ASSERT_TRUE(cluster_.StartServer());
  ASSERT_GE(cluster_.StartWorker("w1"), 0);
  const std::string dir = cluster_.RenderConcept("checker_star");
  ASSERT_EQ(cluster_.Ctl({"train", dir, "--superclass", "star", "--name", "star", "--steps", "5"})
                .exit_code,
            0);
  CommandResult r = RunCommand(
      {PERFUSION_LOAD_BIN, "--server", cluster_.address(), "--token", kTokenA, "--concurrency",
       "1,4", "--requests", "50", "--duration", "30s", "--generate", "2", "--gen-concurrency",
       "1", "--prompt", "a photo of <star>", "--output", "json"},
      cluster_.dir(), absl::Minutes(5));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  nlohmann::json j = nlohmann::json::parse(r.out, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << r.out;
  // ListConcepts and GetConcept at two levels.
  ASSERT_EQ(j["registry"].size(), 4u) << j.dump(2);
  for (const auto& level : j["registry"]) {
    EXPECT_EQ(level["ok"], 50) << level.dump();
    EXPECT_EQ(level["errors"], 0) << level.dump();
    EXPECT_GT(level["calls_per_second"].get<double>(), 0);
    const auto& lat = level["latency_ms"];
    EXPECT_LE(lat["p50"].get<double>(), lat["p90"].get<double>());
    EXPECT_LE(lat["p90"].get<double>(), lat["p99"].get<double>());
  }
  ASSERT_EQ(j["generation"].size(), 1u);
  const auto& g = j["generation"][0];
  EXPECT_EQ(g["ok"], 2) << g.dump();
  EXPECT_GT(g["compute_ms"]["p50"].get<double>(), 0);
  // End to end includes the engine's time, so the overhead is never negative.
  EXPECT_GE(g["overhead_ms"]["p50"].get<double>(), 0);
  EXPECT_GE(g["e2e_ms"]["p50"].get<double>(), g["compute_ms"]["p50"].get<double>());
}

// Failed calls make a failed run: the exit code is the first failure's (5 for UNAVAILABLE, here:
// no worker for Generate), and levels with no successful call show "-" rather than 0 ms.
TEST_F(LoadToolTest, FailedCallsGiveTheFirstFailuresExitCode) {
  ASSERT_TRUE(cluster_.StartServer());
  CommandResult r = RunCommand(
      {PERFUSION_LOAD_BIN, "--server", cluster_.address(), "--token", kTokenA, "--concurrency", "1", "--requests",
       "3", "--generate", "2", "--gen-concurrency", "1", "--gen-timeout", "20s"},
      cluster_.dir(), absl::Minutes(2));
  EXPECT_EQ(r.exit_code, 5) << r.out << r.err;
  EXPECT_NE(r.out.find("-/-/-"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("first error: UNAVAILABLE"), std::string::npos) << r.out;
  // The registry calls alone succeed: exit 0.
  r = RunCommand({PERFUSION_LOAD_BIN, "--server", cluster_.address(), "--token", kTokenA, "--concurrency", "1",
                  "--requests", "3", "--generate", "0"},
                 cluster_.dir(), absl::Minutes(2));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
}

}  // namespace
// Bad flags stop it before it connects, naming the flag (exit 2).
TEST(LoadToolUsageTest, BadFlagsAreUsageErrors) {
  const std::string tmp = std::filesystem::temp_directory_path().string();
  ExpectUsageErrors(PERFUSION_LOAD_BIN,
                    {{{"--output", "xml"}, "--output must be text or json"},
                     {{"--gen-size", "99999999999"}, "--gen-size must be in 1.."},
                     {{"--gen-steps", "0"}, "--gen-steps must be in 1.."},
                     {{"--requests", "0"}, "--requests must be >= 1"},
                     {{"--generate", "-5"}, "--generate must be >= 0"},
                     {{"--gen-timeout", "0"}, "--gen-timeout must be > 0"},
                     {{"--token-file", "/nonexistent/token"}, "--token-file /nonexistent/token: cannot read it"}},
                    tmp);
}

}  // namespace perfusion::testing

// The server's reflection seen by an independent client, as grpcurl uses it: a Node script
// (reflection_client.js, @grpc/grpc-js + grpc-reflection-js from npm, installed into the build
// folder on first use) lists the services, fetches the descriptors of each (grpc.health.v1.Health
// included), and calls Health, ConceptService and TrainingService with nothing but what
// reflection told it. Skips when node/npm are missing or npm cannot install the packages.
#include <filesystem>
#include <string>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "tests/integration/cluster.h"

namespace perfusion::testing {
namespace {

constexpr char kPackages[] = "@grpc/grpc-js@1.14.7 grpc-reflection-js@0.3.0 @grpc/proto-loader@0.8.1";

using ReflectionJsTest = ClusterTest;

TEST_F(ReflectionJsTest, AnIndependentClientCallsTheApiFromReflectionAlone) {
  const std::string scratch = cluster_.dir();
  if (RunCommand({"/usr/bin/env", "node", "--version"}, scratch, absl::Seconds(20)).exit_code != 0 ||
      RunCommand({"/usr/bin/env", "npm", "--version"}, scratch, absl::Seconds(60)).exit_code != 0) {
    GTEST_SKIP() << "node or npm missing (scripts/install-deps.sh installs them)";
  }
  const std::string npm_dir = PERFUSION_NPM_DIR;
  if (!std::filesystem::exists(npm_dir + "/node_modules/grpc-reflection-js")) {
    std::filesystem::create_directories(npm_dir);
    CommandResult r = RunCommand({"/bin/sh", "-c",
                                  absl::StrCat("npm install --prefix '", npm_dir,
                                               "' --no-audit --no-fund --loglevel=error ",
                                               // Unreachable registry: give up in about a minute.
                                               "--fetch-retries=1 --fetch-timeout=20000 ", kPackages)},
                                 scratch, absl::Minutes(2));
    if (r.exit_code != 0) GTEST_SKIP() << "npm install failed (offline?): " << r.err.substr(0, 300);
  }
  ASSERT_TRUE(cluster_.StartServer());
  CommandResult r = RunCommand(
      {"/usr/bin/env", "node", std::string(PERFUSION_SOURCE_DIR) + "/tests/integration/reflection_client.js",
       cluster_.address(), kTokenA},
      scratch, absl::Minutes(2), {{"NODE_PATH", npm_dir + "/node_modules"}});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("ok Health/Check: SERVING"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("FAIL"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace perfusion::testing

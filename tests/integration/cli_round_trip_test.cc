// The whole product through its command line: a real perfusion-server and perfusion-worker on
// loopback, driven by the perfusionctl binary as a user (or a script) would.
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/integration/cluster.h"

namespace perfusion::testing {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

json ParseJson(const CommandResult& r) {
  json j = json::parse(r.out, nullptr, /*allow_exceptions=*/false);
  EXPECT_FALSE(j.is_discarded()) << "not JSON: " << r.out << "\nstderr: " << r.err;
  return j;
}

bool IsPng(const std::string& path) {
  const std::string data = ReadFileOrEmpty(path);
  return data.size() > 8 && data.compare(0, 8, "\x89PNG\r\n\x1a\n") == 0;
}

using CliRoundTripTest = ClusterTest;

TEST_F(CliRoundTripTest, TrainWatchListGenerateExportImportDelete) {
  ASSERT_TRUE(cluster_.StartServer());
  ASSERT_GE(cluster_.StartWorker("w1"), 0);
  const std::string star = cluster_.RenderConcept("checker_star");
  const std::string heart = cluster_.RenderConcept("candy_heart");
  ASSERT_FALSE(star.empty());
  ASSERT_FALSE(heart.empty());

  // Train with --wait (the default): progress on stderr, the final job on stdout.
  CommandResult r = cluster_.Ctl({"train", star, "--superclass", "star", "--name", "checker-star",
                                  "--steps", "5", "--seed", "11", "--output", "json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json job = ParseJson(r);
  EXPECT_EQ(job["state"], "SUCCEEDED");
  EXPECT_EQ(job["image_count"], 4);
  const std::string star_concept_id = job["concept_id"];
  EXPECT_EQ(star_concept_id.rfind("cpt_", 0), 0u) << star_concept_id;
  EXPECT_NE(r.err.find("5/5"), std::string::npos) << "no progress shown: " << r.err;

  // --captions: a caption file beside each image, naming the concept as in prompts (from the
  // renderer's table: file, caption, ..., background in column 9).
  {
    std::istringstream table(ReadFileOrEmpty(heart + "/captions.tsv"));
    std::string line;
    std::getline(table, line);  // header
    int written = 0;
    while (std::getline(table, line)) {
      std::vector<std::string> cols;
      std::istringstream fields(line);
      for (std::string c; std::getline(fields, c, '\t');) cols.push_back(c);
      ASSERT_GE(cols.size(), 9u) << line;
      std::ofstream(heart + "/" + fs::path(cols[0]).stem().string() + ".txt")
          << "a <candy-heart> on a " << cols[8] << " background\n";
      ++written;
    }
    ASSERT_EQ(written, 4);
  }
  // --no-wait prints the id; `jobs watch` follows it to the end.
  r = cluster_.Ctl({"train", heart, "--superclass", "heart", "--name", "candy-heart", "--steps",
                    "5", "--captions", "--no-wait"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string heart_job = std::string(r.out.substr(0, r.out.find('\n')));
  EXPECT_EQ(heart_job.rfind("job_", 0), 0u) << r.out;
  r = cluster_.Ctl({"jobs", "watch", heart_job});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("SUCCEEDED"), std::string::npos) << r.out;
  r = cluster_.Ctl({"jobs", "get", heart_job, "--output", "json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json heart_captions = ParseJson(r)["options"]["captions"];
  ASSERT_EQ(heart_captions.size(), 4u) << r.out;
  EXPECT_EQ(heart_captions[0].get<std::string>().rfind("a <candy-heart> on a ", 0), 0u) << r.out;
  // A caption that does not name the concept is refused before any training, naming the field.
  std::ofstream(heart + "/000002.txt") << "a heart\n";
  r = cluster_.Ctl({"train", heart, "--superclass", "heart", "--name", "candy-heart", "--captions"});
  EXPECT_EQ(r.exit_code, 4) << r.err;
  EXPECT_NE(r.err.find("options.captions[2]"), std::string::npos) << r.err;
  fs::remove(heart + "/000001.txt");
  r = cluster_.Ctl({"train", heart, "--superclass", "heart", "--name", "candy-heart", "--captions"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("000001.txt"), std::string::npos) << r.err;

  // Listing: both jobs succeeded, both concepts stored.
  r = cluster_.Ctl({"jobs", "list", "--output", "json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json jobs = ParseJson(r)["jobs"];
  ASSERT_EQ(jobs.size(), 2u);
  for (const json& j : jobs) EXPECT_EQ(j["state"], "SUCCEEDED") << j.dump();
  r = cluster_.Ctl({"jobs", "list", "--state", "failed", "--output", "json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(ParseJson(r)["jobs"].empty());
  r = cluster_.Ctl({"concepts", "list", "--output", "json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json concepts = ParseJson(r)["concepts"];
  ASSERT_EQ(concepts.size(), 2u);

  // Generate with both concepts: one PNG per image, image i with seed + i.
  const std::string out = cluster_.dir() + "/out";
  r = cluster_.Ctl({"generate", "a photo of <checker-star> next to <candy-heart>", "-o", out,
                    "--n", "2", "--seed", "7", "--steps", "4", "--width", "32", "--height", "32",
                    "--strength", "checker-star=0.7:0.15", "--output", "json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json gen = ParseJson(r);
  ASSERT_EQ(gen["images"].size(), 2u);
  // Seeds are strings, as every 64-bit integer in --output json (a double would round them).
  EXPECT_EQ(gen["images"][0]["seed"], "7");
  EXPECT_EQ(gen["images"][1]["seed"], "8");
  for (const json& img : gen["images"]) {
    EXPECT_TRUE(IsPng(img["file"])) << img.dump();
    EXPECT_EQ(img["width"], 32);
  }
  EXPECT_EQ(gen["concepts"].size(), 2u);
  EXPECT_GT(gen["compute_seconds"].get<double>(), 0.0);
  // Text mode prints the paths; --global-lock and --guidance-rescale reach the worker.
  r = cluster_.Ctl({"generate", "a photo of <checker-star>", "-o", out + "2", "--seed", "3",
                    "--steps", "4", "--global-lock", "--guidance-rescale", "0.7"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(IsPng(out + "2/img-3.png")) << r.out;
  r = cluster_.Ctl({"generate", "a photo of <checker-star>", "-o", out + "3", "--guidance-rescale", "2"});
  EXPECT_EQ(r.exit_code, 4) << r.out << r.err;  // INVALID_ARGUMENT naming the field
  EXPECT_NE(r.err.find("guidance_rescale"), std::string::npos) << r.err;
  // Regional prompts reach the worker; a concept used only in a region is resolved too.
  r = cluster_.Ctl({"generate", "a photo of <checker-star>", "-o", out + "4", "--seed", "3", "--steps", "4",
                    "--global-lock", "--guidance-rescale", "0.7", "--region",
                    "right:a small <candy-heart> on the right", "--output", "json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  gen = ParseJson(r);
  ASSERT_EQ(gen["images"].size(), 1u);
  EXPECT_EQ(gen["concepts"].size(), 2u) << gen.dump();
  const std::string regional = ReadFileOrEmpty(gen["images"][0]["file"]);
  EXPECT_TRUE(IsPng(gen["images"][0]["file"]));
  EXPECT_NE(regional, ReadFileOrEmpty(out + "2/img-3.png")) << "the region changed the image";
  r = cluster_.Ctl({"generate", "a photo of <checker-star>", "-o", out + "5", "--region", "0.6,0,0.2,1:a star"});
  EXPECT_EQ(r.exit_code, 4) << r.out << r.err;
  EXPECT_NE(r.err.find("regions[0]"), std::string::npos) << r.err;
  r = cluster_.Ctl({"generate", "a photo of <checker-star>", "-o", out + "5", "--region", "middle:a star"});
  EXPECT_EQ(r.exit_code, 2) << r.out << r.err;  // usage: not a box
  EXPECT_NE(r.err.find("x0,y0,x1,y1"), std::string::npos) << r.err;

  // Export, then import into the other tenant's registry under a new name.
  const std::string blob = cluster_.dir() + "/star.pfcn";
  r = cluster_.Ctl({"concepts", "export", "checker-star", "-o", blob});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(ReadFileOrEmpty(blob).substr(0, 4), "PFCN");
  r = cluster_.Ctl({"concepts", "get", "checker-star", "--output", "json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string digest = ParseJson(r)["digest"];
  r = cluster_.Ctl({"concepts", "import", blob, "--name", "star-copy", "--output", "json"},
                   kTokenB);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json imported = ParseJson(r);
  EXPECT_EQ(imported["digest"], digest);
  EXPECT_EQ(imported["name"], "star-copy");
  // Tenants are isolated: B does not see A's concept, and A does not see B's copy.
  EXPECT_EQ(cluster_.Ctl({"concepts", "get", "checker-star"}, kTokenB).exit_code, 3);
  EXPECT_EQ(cluster_.Ctl({"concepts", "get", "star-copy"}).exit_code, 3);
  r = cluster_.Ctl({"generate", "a photo of <star-copy>", "-o", out + "b", "--steps", "4",
                    "--seed", "1"},
                   kTokenB);
  EXPECT_EQ(r.exit_code, 0) << r.err;

  // Delete: gone from the registry and from prompts.
  r = cluster_.Ctl({"concepts", "rm", "candy-heart"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(cluster_.Ctl({"concepts", "get", "candy-heart"}).exit_code, 3);
  r = cluster_.Ctl({"generate", "a photo of <candy-heart>", "-o", out + "3", "--steps", "4"});
  EXPECT_EQ(r.exit_code, 3) << r.err;
  EXPECT_NE(r.err.find("candy-heart"), std::string::npos) << r.err;

  // Exit codes a script relies on.
  EXPECT_EQ(cluster_.Ctl({"jobs", "get", "job_0000000000000000"}).exit_code, 3);
  EXPECT_EQ(cluster_.Ctl({"generate", "a photo", "--steps", "0"}).exit_code, 4);
  EXPECT_EQ(cluster_.Ctl({"jobs", "list"}, "not-a-token").exit_code, 6);
  EXPECT_EQ(cluster_.Ctl({"jobs", "frobnicate"}).exit_code, 2);
  EXPECT_EQ(cluster_.Ctl({"health"}).exit_code, 0);
  EXPECT_EQ(cluster_.Ctl({"health", "--service", "perfusion.v1.NoSuchService"}).exit_code, 3);
}

TEST(CliWithoutServerTest, UsageErrorsExitTwo) {
  const std::string tmp = fs::temp_directory_path().string();
  EXPECT_EQ(RunCommand({PERFUSIONCTL_BIN, "frobnicate"}, tmp, absl::Seconds(30)).exit_code, 2);
  EXPECT_EQ(RunCommand({PERFUSIONCTL_BIN, "train", "/tmp"}, tmp, absl::Seconds(30)).exit_code, 2);
  EXPECT_EQ(RunCommand({PERFUSIONCTL_BIN, "jobs", "get", "--bogus", "x"}, tmp, absl::Seconds(30))
                .exit_code,
            2);
  // A malformed value of a global flag too (it used to exit 4, like a server's INVALID_ARGUMENT).
  EXPECT_EQ(RunCommand({PERFUSIONCTL_BIN, "--rpc-timeout", "abc", "health"}, tmp, absl::Seconds(30)).exit_code, 2);
  EXPECT_EQ(RunCommand({PERFUSIONCTL_BIN, "generate", "a photo", "--timeout", "inf"}, tmp, absl::Seconds(30)).exit_code,
            2);
  CommandResult help = RunCommand({PERFUSIONCTL_BIN, "help"}, tmp, absl::Seconds(30));
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_NE(help.out.find("Exit codes"), std::string::npos);
}

// Values a request field cannot hold are refused before anything is sent or made, naming the flag;
// they used to be cut to int32 (--n 4294967297 asked for 1 image) or wrapped (--seed -1).
TEST(CliWithoutServerTest, ValuesTheRequestCannotHoldAreUsageErrors) {
  ScratchDir scratch("cli-values");
  const std::string out = scratch.path() + "/out";
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--n", "4294967297"}, "--n: \"4294967297\" is out of range"},
      {{"--steps", "4294967326"}, "--steps: \"4294967326\" is out of range"},
      {{"--width", "-4294967296"}, "--width"},
      {{"--seed", "-1"}, "--seed: \"-1\" is not an integer in 0..18446744073709551615"},
      {{"--guidance", "nan"}, "--guidance: \"nan\" is not a finite number"},
      {{"--beta", "1e40"}, "--beta: \"1e40\" is not a finite number"},
      {{"--strength", "rex=inf"}, "is not REF=BETA[:TAU]"},
      {{"--prefix", "a/b"}, "--prefix \"a/b\": use a plain file name"},
      {{"--prefix", ""}, "--prefix \"\""},
      {{"--timeout", "0"}, "--timeout: a generation needs a deadline > 0"},
  };
  for (const auto& [flags, message] : cases) {
    std::vector<std::string> argv = {PERFUSIONCTL_BIN, "--server", "127.0.0.1:1", "generate", "a photo", "-o", out};
    argv.insert(argv.end(), flags.begin(), flags.end());
    CommandResult r = RunCommand(argv, scratch.path(), absl::Seconds(30));
    EXPECT_EQ(r.exit_code, 2) << flags[0] << ": " << r.err;
    EXPECT_NE(r.err.find(message), std::string::npos) << r.err;
  }
  EXPECT_FALSE(fs::exists(out)) << "a usage error made the -o folder";
  CommandResult r = RunCommand({PERFUSIONCTL_BIN, "--server", "127.0.0.1:1", "generate", "a photo", "-o", "-"},
                               scratch.path(), absl::Seconds(30));
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_FALSE(fs::exists(scratch.path() + "/-"));
  // The largest seed is a seed: it gets as far as the (absent) server.
  r = RunCommand({PERFUSIONCTL_BIN, "--server", "127.0.0.1:1", "--rpc-timeout", "2s", "generate", "a photo", "-o",
                  out, "--seed", "18446744073709551615", "--timeout", "3s"},
                 scratch.path(), absl::Seconds(30));
  EXPECT_EQ(r.exit_code, 5) << r.err;
  // train's int32 fields too.
  r = RunCommand({PERFUSIONCTL_BIN, "--server", "127.0.0.1:1", "train", scratch.path(), "--superclass", "dog",
                  "--name", "rex", "--steps", "2147483648"},
                 scratch.path(), absl::Seconds(30));
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("--steps"), std::string::npos) << r.err;
}

TEST(CliWithoutServerTest, UnreachableServerExitsFive) {
  const int port = PickFreePort();  // nothing listens there
  const std::string tmp = fs::temp_directory_path().string();
  CommandResult r = RunCommand({PERFUSIONCTL_BIN, "--server", "127.0.0.1:" + std::to_string(port),
                                "--rpc-timeout", "5s", "jobs", "list"},
                               tmp, absl::Seconds(60));
  EXPECT_EQ(r.exit_code, 5) << r.err;
  EXPECT_NE(r.err.find("UNAVAILABLE"), std::string::npos) << r.err;
}

// A token file or variable with a newline used to reach gRPC's metadata check, which aborts the
// process (SIGABRT) instead of failing the call. Now the first non-comment line is the token, and
// a token no header can carry is a usage error naming where it came from.
TEST(CliWithoutServerTest, TokensWithNewlinesOrControlCharactersNeverAbort) {
  const int port = PickFreePort();
  const std::string server = "127.0.0.1:" + std::to_string(port);
  const std::string tmp = fs::temp_directory_path().string();
  const std::string file = tmp + "/perfusionctl_token_" + std::to_string(port);
  {
    std::ofstream out(file);
    out << "acme-secret\n# the acme tenant\n";
  }
  CommandResult from_file = RunCommand({PERFUSIONCTL_BIN, "--server", server, "--rpc-timeout", "5s",
                                        "--token-file", file, "jobs", "list"},
                                       tmp, absl::Seconds(60));
  EXPECT_EQ(from_file.exit_code, 5) << from_file.err;  // the call was made: nobody listens there
  CommandResult from_env = RunCommand({PERFUSIONCTL_BIN, "--server", server, "--rpc-timeout", "5s", "jobs", "list"},
                                      tmp, absl::Seconds(60), {{"PERFUSION_TOKEN", "acme-secret\n"}});
  EXPECT_EQ(from_env.exit_code, 5) << from_env.err;
  CommandResult bad = RunCommand({PERFUSIONCTL_BIN, "--server", server, "jobs", "list"}, tmp, absl::Seconds(60),
                                 {{"PERFUSION_TOKEN", "acme\x01secret"}});
  EXPECT_EQ(bad.exit_code, 4) << bad.err;
  EXPECT_NE(bad.err.find("PERFUSION_TOKEN"), std::string::npos) << bad.err;
  {
    std::ofstream out(file);
    out << "# nothing but a comment\n";
  }
  CommandResult empty = RunCommand({PERFUSIONCTL_BIN, "--server", server, "--token-file", file, "jobs", "list"},
                                   tmp, absl::Seconds(60));
  EXPECT_EQ(empty.exit_code, 4) << empty.err;
  EXPECT_NE(empty.err.find("no token in it"), std::string::npos) << empty.err;
  fs::remove(file);
}

TEST(WorkerWithoutServerTest, AWorkerTokenNoHeaderCanCarryIsAUsageError) {
  const std::string tmp = fs::temp_directory_path().string();
  CommandResult r = RunCommand({PERFUSION_WORKER_BIN, "--server", "127.0.0.1:1", "--model_dir", "/nonexistent"},
                               tmp, absl::Seconds(60), {{"PERFUSION_WORKER_TOKEN", "worker\x01secret"}});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("PERFUSION_WORKER_TOKEN"), std::string::npos) << r.err;
}

// Out-of-range flags and stray arguments are usage errors before anything loads (a negative cache
// size silently disabled the cache; a stray word was ignored).
TEST(WorkerWithoutServerTest, BadFlagsAndStrayArgumentsAreUsageErrors) {
  const std::string tmp = fs::temp_directory_path().string();
  for (const auto& [args, message] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"bogus_positional"}, "unexpected argument 'bogus_positional'"},
           {{"--max_message_bytes=-5"}, "--max_message_bytes must be >= 1 MiB"},
           {{"--threads=-1"}, "--threads >= 0"},
           {{"--concept_cache_bytes=-1"}, "--concept_cache_bytes >= 0"}}) {
    std::vector<std::string> argv = {PERFUSION_WORKER_BIN, "--server", "127.0.0.1:1", "--model_dir", "/nonexistent"};
    argv.insert(argv.end(), args.begin(), args.end());
    CommandResult r = RunCommand(argv, tmp, absl::Seconds(60), {{"PERFUSION_WORKER_TOKEN", "worker-secret-0123456"}});
    EXPECT_EQ(r.exit_code, 2) << args[0] << ": " << r.err;
    EXPECT_NE(r.err.find(message), std::string::npos) << args[0] << ": " << r.err;
  }
}

}  // namespace
}  // namespace perfusion::testing

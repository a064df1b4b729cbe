// Scale-out on real processes: two perfusion-server replicas on one PostgreSQL database
// (--store=postgres://..., shared-store scheduling) with workers on both. 200 training jobs
// submitted through both replicas complete exactly once each, although one replica is SIGKILLed
// midway (its workers' leases expire and are taken over through the other replica) and a worker
// is SIGKILLed midway (its job is re-leased). Skips when no PostgreSQL server is available
// (scripts/test.sh starts one).
#include <signal.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "tests/integration/cluster.h"
#include "tests/server/pg_test_util.h"

namespace perfusion::testing {
namespace {

namespace v1 = ::perfusion::v1;

std::vector<std::string> ReadImages(const std::string& dir) {
  std::vector<std::string> out;
  std::vector<std::filesystem::path> files;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    if (e.path().extension() == ".png") files.push_back(e.path());
  }
  std::sort(files.begin(), files.end());
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    out.push_back(ss.str());
  }
  return out;
}

// Every job of tenant A, by id (through `c`).
std::map<std::string, v1::TrainingJob> AllJobs(client::Client* c) {
  std::map<std::string, v1::TrainingJob> out;
  auto jobs = c->ListAllTrainingJobs(v1::JOB_STATE_UNSPECIFIED);
  if (jobs.ok()) {
    for (const auto& j : *jobs) out[j.id()] = j;
  }
  return out;
}

int CountIn(const std::map<std::string, v1::TrainingJob>& jobs, v1::JobState state) {
  int n = 0;
  for (const auto& [id, j] : jobs) n += j.state() == state;
  return n;
}

using ReplicasTest = ClusterTest;

TEST_F(ReplicasTest, TwoHundredJobsThroughTwoReplicasCompleteExactlyOnce) {
  auto db = server::testing::TestDatabase::Create();
  if (!db.ok() && server::testing::PostgresRequired()) FAIL() << "PERFUSION_TEST_PG_URL is set but: " << db.status();
  if (!db.ok()) GTEST_SKIP() << "no PostgreSQL server: " << db.status();
  constexpr int kJobs = 200;
  const ServerFlags flags{/*lease_seconds=*/3, /*max_attempts=*/5,
                          {"--store=" + (*db)->url(), "--shared_poll_ms=200", "--tenant_max_jobs=400",
                           "--max_queue=400"}};
  ASSERT_TRUE(cluster_.StartServer(flags));  // replica A
  const int b = cluster_.StartReplica(flags);
  ASSERT_GE(b, 0);
  const std::string b_addr = cluster_.replica_address(b);
  ASSERT_GE(cluster_.StartWorker("a1"), 0);
  const int a2 = cluster_.StartWorker("a2");
  ASSERT_GE(a2, 0);
  ASSERT_GE(cluster_.StartWorker("b1", {"--server=" + b_addr}), 0);
  ASSERT_GE(cluster_.StartWorker("b2", {"--server=" + b_addr}), 0);

  const std::string dir = cluster_.RenderConcept("checker_star", 3);
  ASSERT_FALSE(dir.empty());
  const std::vector<std::string> images = ReadImages(dir);
  ASSERT_EQ(images.size(), 3u);
  auto ca = cluster_.Client();
  auto cb = cluster_.Client(kTokenA, b_addr);
  ASSERT_NE(ca, nullptr);
  ASSERT_NE(cb, nullptr);

  // Submissions alternate between the replicas; every acknowledged id must end SUCCEEDED.
  std::vector<std::string> ids;
  auto request = [&](int i) {
    v1::CreateTrainingJobRequest r;
    r.set_concept_name(absl::StrCat("c", i));
    r.set_superclass("star");
    for (const auto& img : images) r.add_images(img);
    r.mutable_options()->set_steps(3);
    r.set_request_id(absl::StrCat("req-", i));
    return r;
  };
  for (int i = 0; i < kJobs; ++i) {
    auto job = (i % 2 ? cb : ca)->SubmitTrainingJob(request(i));
    ASSERT_TRUE(job.ok()) << i << ": " << job.status();
    ids.push_back(job->id());
  }
  // Idempotent across replicas: the same request_id through the other replica is the same job.
  auto again = cb->SubmitTrainingJob(request(0));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->id(), ids[0]);
  EXPECT_EQ(std::set<std::string>(ids.begin(), ids.end()).size(), static_cast<size_t>(kJobs));

  // Replica B dies midway, with its workers' jobs in flight.
  ASSERT_TRUE(Cluster::WaitFor(
      [&] { return CountIn(AllJobs(ca.get()), v1::SUCCEEDED) >= kJobs / 5; }, absl::Minutes(5)));
  cluster_.replica(b).Signal(SIGKILL);
  ASSERT_TRUE(cluster_.replica(b).Wait(absl::Seconds(30)).has_value());
  // A worker on A dies midway too; another one joins.
  ASSERT_TRUE(Cluster::WaitFor(
      [&] { return CountIn(AllJobs(ca.get()), v1::SUCCEEDED) >= kJobs / 2; }, absl::Minutes(5)));
  cluster_.worker(a2).Signal(SIGKILL);
  ASSERT_TRUE(cluster_.worker(a2).Wait(absl::Seconds(30)).has_value());
  ASSERT_GE(cluster_.StartWorker("a3"), 0);

  ASSERT_TRUE(Cluster::WaitFor(
      [&] {
        auto jobs = AllJobs(ca.get());
        int final = 0;
        for (const auto& [id, j] : jobs) final += client::IsFinal(j.state());
        return final == kJobs;
      },
      absl::Minutes(8)))
      << "succeeded: " << CountIn(AllJobs(ca.get()), v1::SUCCEEDED);

  const auto jobs = AllJobs(ca.get());
  ASSERT_EQ(jobs.size(), static_cast<size_t>(kJobs));
  std::set<std::string> concept_ids;
  int retried = 0;
  for (const std::string& id : ids) {
    auto it = jobs.find(id);
    ASSERT_NE(it, jobs.end()) << "acknowledged job " << id << " was lost";
    EXPECT_EQ(it->second.state(), v1::SUCCEEDED) << it->second.DebugString();
    EXPECT_FALSE(it->second.concept_id().empty()) << id;
    concept_ids.insert(it->second.concept_id());
    retried += it->second.attempts() > 1;
  }
  EXPECT_EQ(concept_ids.size(), static_cast<size_t>(kJobs)) << "one concept per job";
  // Exactly once: no job stored a second concept (a stale worker's completion is refused).
  auto concepts = ca->ListConcepts();
  ASSERT_TRUE(concepts.ok()) << concepts.status();
  EXPECT_EQ(concepts->size(), static_cast<size_t>(kJobs));
  // The killed replica's workers and the killed worker held leases that were taken over.
  EXPECT_GE(retried, 1);
  std::cerr << "replicas: " << kJobs << " jobs, " << retried << " re-leased after a kill\n";
}

}  // namespace
}  // namespace perfusion::testing

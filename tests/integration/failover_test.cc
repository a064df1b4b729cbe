// Failures of real processes: a worker killed mid-job, a worker stopped with SIGTERM, and a server
// restarted on its data folder.
#include <signal.h>

#include <string>

#include <gtest/gtest.h>

#include "absl/time/clock.h"
#include "tests/integration/cluster.h"

namespace perfusion::testing {
namespace {

namespace v1 = ::perfusion::v1;

// Submits a training job of `steps` steps for concept `name` from `dir` without waiting.
std::string Submit(Cluster& c, const std::string& dir, const std::string& name, int steps) {
  CommandResult r = c.Ctl({"train", dir, "--superclass", "star", "--name", name, "--steps",
                           std::to_string(steps), "--no-wait"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.out.substr(0, r.out.find('\n'));
}

// The job, or a default TrainingJob when the call fails.
v1::TrainingJob GetJob(client::Client* c, const std::string& id) {
  auto j = c->GetTrainingJob(id);
  return j.ok() ? *j : v1::TrainingJob();
}

bool RunningWithProgress(client::Client* c, const std::string& id) {
  v1::TrainingJob j = GetJob(c, id);
  return j.state() == v1::RUNNING && j.progress().step() >= 1;
}

using FailoverTest = ClusterTest;

TEST_F(FailoverTest, JobOfAKilledWorkerIsReleasedAndFinishedByAnotherWorker) {
  // A short lease so the lost one expires quickly; attempts to spare, since on a loaded machine a
  // stalled heartbeat of w2 may cost one more.
  ASSERT_TRUE(cluster_.StartServer({/*lease_seconds=*/3, /*max_attempts=*/5, {}}));
  const int w1 = cluster_.StartWorker("w1");
  ASSERT_GE(w1, 0);
  const std::string dir = cluster_.RenderConcept("checker_star");
  ASSERT_FALSE(dir.empty());
  auto client = cluster_.Client();
  ASSERT_NE(client, nullptr);

  const std::string id = Submit(cluster_, dir, "star", 60);
  ASSERT_FALSE(id.empty());
  ASSERT_TRUE(Cluster::WaitFor([&] { return RunningWithProgress(client.get(), id); },
                               absl::Minutes(3)))
      << "job never ran: " << GetJob(client.get(), id).DebugString();
  cluster_.worker(w1).Signal(SIGKILL);
  ASSERT_TRUE(cluster_.worker(w1).Wait(absl::Seconds(30)).has_value());

  const int w2 = cluster_.StartWorker("w2");
  ASSERT_GE(w2, 0);
  ASSERT_TRUE(Cluster::WaitFor(
      [&] { return client::IsFinal(GetJob(client.get(), id).state()); }, absl::Minutes(6)))
      << GetJob(client.get(), id).DebugString();
  const v1::TrainingJob job = GetJob(client.get(), id);
  EXPECT_EQ(job.state(), v1::SUCCEEDED) << job.DebugString();
  EXPECT_GE(job.attempts(), 2) << "the lost lease counts as an attempt";
  EXPECT_NE(cluster_.worker(w2).Log().find("event=training_completed job=" + id),
            std::string::npos);
  client::ConceptRef ref;
  ref.id = job.concept_id();
  auto concept_ = client->GetConcept(ref);
  ASSERT_TRUE(concept_.ok()) << concept_.status();
  EXPECT_EQ(concept_->source_job_id(), id);
}

TEST_F(FailoverTest, RestartedServerKeepsAcknowledgedJobsAndConcepts) {
  ASSERT_TRUE(cluster_.StartServer());
  const int w1 = cluster_.StartWorker("w1");
  ASSERT_GE(w1, 0);
  const std::string dir = cluster_.RenderConcept("checker_star");
  ASSERT_FALSE(dir.empty());
  auto client = cluster_.Client();

  // A: trained before the restart.
  CommandResult r = cluster_.Ctl({"train", dir, "--superclass", "star", "--name", "alpha",
                                  "--steps", "5"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto alpha = client->GetConcept({"", "alpha", 0});
  ASSERT_TRUE(alpha.ok()) << alpha.status();
  auto jobs = client->ListAllTrainingJobs(v1::JOB_STATE_UNSPECIFIED);
  ASSERT_TRUE(jobs.ok() && jobs->size() == 1);
  const std::string job_a = (*jobs)[0].id();

  // B: running when its worker gets SIGTERM: the worker hands the lease back and exits 0, and
  // the job is queued again without counting an attempt.
  const std::string job_b = Submit(cluster_, dir, "beta", 40);
  ASSERT_TRUE(Cluster::WaitFor([&] { return RunningWithProgress(client.get(), job_b); },
                               absl::Minutes(3)))
      << GetJob(client.get(), job_b).DebugString();
  const int attempts_running = GetJob(client.get(), job_b).attempts();
  EXPECT_EQ(attempts_running, 1);
  cluster_.worker(w1).Signal(SIGTERM);
  std::optional<int> code = cluster_.worker(w1).Wait(absl::Seconds(60));
  ASSERT_TRUE(code.has_value()) << "worker did not exit after SIGTERM";
  EXPECT_EQ(*code, 0);
  EXPECT_NE(cluster_.worker(w1).Log().find("event=work_returned job=" + job_b), std::string::npos);
  ASSERT_TRUE(Cluster::WaitFor([&] { return GetJob(client.get(), job_b).state() == v1::QUEUED; },
                               absl::Seconds(20)));
  // A lease handed back by a shutting-down worker does not count as an attempt.
  EXPECT_EQ(GetJob(client.get(), job_b).attempts(), attempts_running - 1);

  // C: cancelled while queued (final).
  const std::string job_c = Submit(cluster_, dir, "gamma", 5);
  r = cluster_.Ctl({"jobs", "cancel", job_c});
  ASSERT_EQ(r.exit_code, 0) << r.err;

  // Restart on the same data folder and address.
  EXPECT_EQ(cluster_.StopServer(), 0);
  ASSERT_TRUE(cluster_.StartServer());
  client = cluster_.Client();

  const v1::TrainingJob a = GetJob(client.get(), job_a);
  EXPECT_EQ(a.state(), v1::SUCCEEDED);
  EXPECT_EQ(a.concept_id(), alpha->id());
  EXPECT_EQ(GetJob(client.get(), job_b).state(), v1::QUEUED);
  EXPECT_EQ(GetJob(client.get(), job_c).state(), v1::CANCELLED);
  auto alpha_after = client->GetConcept({"", "alpha", 0});
  ASSERT_TRUE(alpha_after.ok()) << alpha_after.status();
  EXPECT_EQ(alpha_after->id(), alpha->id());
  EXPECT_EQ(alpha_after->digest(), alpha->digest());
  auto exported = client->ExportConcept(alpha->id());
  ASSERT_TRUE(exported.ok()) << exported.status();
  EXPECT_EQ(static_cast<int64_t>(exported->blob().size()), alpha->size_bytes());

  // A new worker finishes the queued job and generates with the concept from before.
  ASSERT_GE(cluster_.StartWorker("w2"), 0);
  ASSERT_TRUE(Cluster::WaitFor(
      [&] { return client::IsFinal(GetJob(client.get(), job_b).state()); }, absl::Minutes(5)));
  EXPECT_EQ(GetJob(client.get(), job_b).state(), v1::SUCCEEDED);
  EXPECT_EQ(GetJob(client.get(), job_b).attempts(), 1);
  r = cluster_.Ctl({"generate", "a photo of <alpha>", "-o", cluster_.dir() + "/out", "--steps",
                    "4", "--seed", "5"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

}  // namespace
}  // namespace perfusion::testing

// The worker's side of the protocol, observed from outside: cancellation of a running job,
// batching of queued generations, and a worker that keeps working through a server restart.
#include <signal.h>

#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "tests/integration/cluster.h"

namespace perfusion::testing {
namespace {

namespace v1 = ::perfusion::v1;

std::string Submit(Cluster& c, const std::string& dir, const std::string& name, int steps) {
  CommandResult r = c.Ctl({"train", dir, "--superclass", "star", "--name", name, "--steps",
                           std::to_string(steps), "--no-wait"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.out.substr(0, r.out.find('\n'));
}

v1::TrainingJob GetJob(client::Client* c, const std::string& id) {
  auto j = c->GetTrainingJob(id);
  return j.ok() ? *j : v1::TrainingJob();
}

bool RunningWithProgress(client::Client* c, const std::string& id) {
  v1::TrainingJob j = GetJob(c, id);
  return j.state() == v1::RUNNING && j.progress().step() >= 1;
}

int Count(const std::string& text, const std::string& needle) {
  int n = 0;
  for (size_t p = text.find(needle); p != std::string::npos; p = text.find(needle, p + 1)) ++n;
  return n;
}

class WorkerProtocolTest : public ClusterTest {
 protected:
  // Starts the server and worker w1, submits a `steps`-step training job on rendered checker_star
  // images and waits until it runs with progress. Sets worker_, client_ and returns the job id
  // ("" after a failed assertion).
  std::string StartRunningJob(int steps) {
    if (!cluster_.StartServer()) return Fail("server did not start");
    worker_ = cluster_.StartWorker("w1");
    if (worker_ < 0) return Fail("worker did not start");
    const std::string dir = cluster_.RenderConcept("checker_star");
    client_ = cluster_.Client();
    const std::string id = Submit(cluster_, dir, "star", steps);
    if (!Cluster::WaitFor([&] { return RunningWithProgress(client_.get(), id); }, absl::Minutes(3))) {
      return Fail("job " + id + " did not start running");
    }
    return id;
  }
  std::string Fail(const std::string& why) {
    ADD_FAILURE() << why;
    return "";
  }

  int worker_ = -1;
  std::unique_ptr<client::Client> client_;
};

TEST_F(WorkerProtocolTest, RunningTrainingJobStopsWhenCancelled) {
  const std::string id = StartRunningJob(2000);
  ASSERT_FALSE(id.empty());
  const int w = worker_;
  auto& client = client_;
  CommandResult r = cluster_.Ctl({"jobs", "cancel", id});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_TRUE(Cluster::WaitFor([&] { return GetJob(client.get(), id).state() == v1::CANCELLED; },
                               absl::Seconds(60)))
      << GetJob(client.get(), id).DebugString();
  const v1::TrainingJob job = GetJob(client.get(), id);
  EXPECT_LT(job.progress().step(), 2000) << "the worker stopped early";
  EXPECT_NE(cluster_.worker(w).Log().find("event=work_failed job=" + id), std::string::npos);
  // `jobs watch` of a cancelled job exits 1 (not a success, no specific code).
  EXPECT_EQ(cluster_.Ctl({"jobs", "watch", id}).exit_code, 1);
  // The worker takes new work afterwards.
  r = cluster_.Ctl({"generate", "a photo of a red circle", "-o", cluster_.dir() + "/out",
                    "--steps", "4"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

TEST_F(WorkerProtocolTest, QueuedGenerationsWithDifferentConceptsRunAsOneBatch) {
  ASSERT_TRUE(cluster_.StartServer());
  const int w = cluster_.StartWorker("w1", {"--max_batch=4"});
  ASSERT_GE(w, 0);
  const std::string star = cluster_.RenderConcept("checker_star");
  const std::string heart = cluster_.RenderConcept("candy_heart");
  ASSERT_EQ(cluster_.Ctl({"train", star, "--superclass", "star", "--name", "star", "--steps",
                          "5"}).exit_code,
            0);
  ASSERT_EQ(cluster_.Ctl({"train", heart, "--superclass", "heart", "--name", "heart", "--steps",
                          "5"}).exit_code,
            0);
  auto client = cluster_.Client();

  // Keep the worker busy with a training job while three generations queue up behind it.
  const std::string busy = Submit(cluster_, star, "busy", 60);
  ASSERT_TRUE(Cluster::WaitFor([&] { return RunningWithProgress(client.get(), busy); },
                               absl::Minutes(3)));
  struct Call {
    std::string prompt;
    int n;
    uint64_t seed;
    absl::StatusOr<v1::GenerateResponse> result = absl::UnknownError("not run");
  };
  std::vector<Call> calls = {{"a photo of <star>", 1, 10},
                             {"a photo of <heart> on a beach", 2, 20},
                             {"a photo of a red circle", 1, 30}};
  std::vector<std::thread> threads;
  for (Call& c : calls) {
    threads.emplace_back([&c, &client] {
      v1::GenerateRequest req;
      req.set_prompt(c.prompt);
      req.set_num_images(c.n);
      req.set_seed(c.seed);
      req.set_steps(4);
      c.result = client->GenerateUnary(req, absl::Minutes(5));
    });
  }
  for (auto& t : threads) t.join();
  for (const Call& c : calls) {
    ASSERT_TRUE(c.result.ok()) << c.prompt << ": " << c.result.status();
    ASSERT_EQ(c.result->images_size(), c.n);
    for (int i = 0; i < c.n; ++i) EXPECT_EQ(c.result->images(i).seed(), c.seed + i);
  }
  // One engine call for the three requests (four images), after the training job.
  const std::string log = cluster_.worker(w).Log();
  EXPECT_NE(log.find("event=generation_batch_started items=3 images=4"), std::string::npos) << log;
  const std::string metrics = HttpGet(cluster_.worker_metrics_port(w), "/metrics");
  EXPECT_EQ(MetricValue(metrics, "perfusion_worker_generation_batch_size_sum"), 3);
  EXPECT_EQ(GetJob(client.get(), busy).state(), v1::SUCCEEDED);
  // Each completed item's heartbeats stopped with it: no lease reads as lost afterwards.
  absl::SleepFor(absl::Seconds(3));
  EXPECT_EQ(cluster_.worker(w).Log().find("event=lease_lost"), std::string::npos) << cluster_.worker(w).Log();
}

// A result the server refuses (here: larger than its --max_message_bytes) is reported with
// FailWork at once. Before, the worker dropped the lease silently: the server waited it out,
// then ran the request again, to fail the same way, and answered "worker was lost".
TEST_F(WorkerProtocolTest, AResultTheServerRefusesFailsTheRequestAtOnce) {
  ServerFlags flags;
  flags.extra = {"--max_message_bytes=24000", "--max_concept_bytes=4096"};
  ASSERT_TRUE(cluster_.StartServer(flags));
  const int w = cluster_.StartWorker("w1");
  ASSERT_GE(w, 0);
  auto client = cluster_.Client();
  v1::GenerateRequest req;
  req.set_prompt("a photo of a red circle");
  req.set_num_images(2);
  req.set_width(128);
  req.set_height(128);  // two 128x128 PNGs: well over 24,000 bytes in one CompleteGeneration
  req.set_steps(2);
  req.set_seed(5);
  auto r = client->GenerateUnary(req, absl::Minutes(5));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "the server refused the result (CompleteGeneration: "
                                                      "RESOURCE_EXHAUSTED"))
      << r.status();
  // The worker logs its FailWork after the server has answered it (and so the client).
  EXPECT_TRUE(Cluster::WaitFor([&] { return Count(cluster_.worker(w).Log(), "event=work_failed") == 1; },
                               absl::Seconds(10)))
      << cluster_.worker(w).Log();
  EXPECT_EQ(Count(cluster_.worker(w).Log(), "event=generation_batch_started"), 1)
      << "run once, not again after a lease expiry\n" << cluster_.worker(w).Log();
}

// Work that reports no new step for --stall_seconds is taken as hung: the worker stops renewing
// its lease (the server re-queues it when it expires, rather than holding it RUNNING forever) and
// its /healthz turns 503, so the orchestrator restarts it. A 448x448 image on the tiny model spends
// far longer than 2 s in one step (its self-attention runs over 12,544 positions), which stands in
// for a hung kernel here.
TEST_F(WorkerProtocolTest, WorkWithoutProgressForTheStallTimeoutLetsItsLeaseGo) {
  ASSERT_TRUE(cluster_.StartServer());
  const int w = cluster_.StartWorker("w1", {"--stall_seconds=2"});
  ASSERT_GE(w, 0);
  EXPECT_EQ(HttpGet(cluster_.worker_metrics_port(w), "/healthz").substr(0, 2), "ok");
  auto client = cluster_.Client();
  std::thread call([&] {
    v1::GenerateRequest req;
    req.set_prompt("a photo of a red circle");
    req.set_width(448);
    req.set_height(448);
    req.set_steps(3);
    (void)client->GenerateUnary(req, absl::Seconds(12));
  });
  const bool stalled = Cluster::WaitFor(
      [&] { return cluster_.worker(w).Log().find("event=work_stalled") != std::string::npos; }, absl::Seconds(25));
  call.join();
  ASSERT_TRUE(stalled) << cluster_.worker(w).Log();
  EXPECT_EQ(HttpGet(cluster_.worker_metrics_port(w), "/healthz"), "draining\n") << "503, so the orchestrator restarts it";
  EXPECT_EQ(cluster_.worker(w).Log().find("event=heartbeat_error"), std::string::npos) << "stopped, not failing";
  EXPECT_NE(cluster_.worker(w).Log().find("event=stop_requested"), std::string::npos) << "and takes no more work";
}

TEST_F(WorkerProtocolTest, WorkerKeepsItsJobThroughAServerRestartAndRegistersAgain) {
  const std::string id = StartRunningJob(100);
  ASSERT_FALSE(id.empty());
  const int w = worker_;
  auto& client = client_;
  // A user following the job with the CLI keeps following it through the restart.
  Subprocess watch;
  ASSERT_TRUE(watch.Start({PERFUSIONCTL_BIN, "--server=" + cluster_.address(),
                           std::string("--token=") + kTokenA, "jobs", "watch", id},
                          cluster_.dir() + "/watch.log"));
  EXPECT_EQ(cluster_.StopServer(), 0);
  ASSERT_TRUE(cluster_.StartServer());
  client = cluster_.Client();
  ASSERT_TRUE(Cluster::WaitFor([&] { return client::IsFinal(GetJob(client.get(), id).state()); },
                               absl::Minutes(5)))
      << GetJob(client.get(), id).DebugString();
  std::optional<int> watch_code = watch.Wait(absl::Seconds(90));
  ASSERT_TRUE(watch_code.has_value()) << watch.Log();
  EXPECT_EQ(*watch_code, 0) << watch.Log();
  EXPECT_NE(watch.Log().find(id + " SUCCEEDED"), std::string::npos) << watch.Log();
  const v1::TrainingJob job = GetJob(client.get(), id);
  EXPECT_EQ(job.state(), v1::SUCCEEDED) << job.DebugString();
  EXPECT_EQ(job.attempts(), 1) << "the worker kept its lease through the restart";
  // The restarted server forgot the worker: it registered again and serves generations.
  ASSERT_TRUE(Cluster::WaitFor(
      [&] { return Count(cluster_.worker(w).Log(), "event=registered ") >= 2; },
      absl::Seconds(60)));
  CommandResult r = cluster_.Ctl({"generate", "a photo of <star>", "-o", cluster_.dir() + "/out",
                                  "--steps", "4"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(cluster_.worker(w).running());
}

// SIGTERM while the server does not answer: every call after the signal ends within the worker's
// grace period (10 s), however long it had been retrying. A finished training result used to be
// offered for 2 minutes after the signal, past a pod's termination grace (60 s on GPUs).
TEST_F(WorkerProtocolTest, SigtermWithTheServerFrozenExitsWithinTheGracePeriod) {
  const std::string id = StartRunningJob(40);
  ASSERT_FALSE(id.empty());
  const int w = worker_;
  // Frozen, not dead: calls connect and then hang until their deadline.
  cluster_.server().Signal(SIGSTOP);
  // Training ends and CompleteTraining starts, against the frozen server (its call would wait 20 s,
  // and the result be offered for 2 minutes).
  const bool finished = Cluster::WaitFor(
      [&] { return cluster_.worker(w).Log().find("event=training_finished job=" + id) != std::string::npos; },
      absl::Seconds(90));
  if (!finished) cluster_.server().Signal(SIGCONT);
  ASSERT_TRUE(finished) << cluster_.worker(w).Log();
  absl::SleepFor(absl::Milliseconds(500));
  const absl::Time signalled = absl::Now();
  cluster_.worker(w).Signal(SIGTERM);
  std::optional<int> code = cluster_.worker(w).Wait(absl::Seconds(45));
  const absl::Duration took = absl::Now() - signalled;
  cluster_.server().Signal(SIGCONT);
  ASSERT_TRUE(code.has_value()) << "still running 45 s after SIGTERM: " << cluster_.worker(w).Log();
  RecordProperty("exit_ms_after_sigterm", static_cast<int>(absl::ToInt64Milliseconds(took)));
  EXPECT_EQ(*code, 0) << cluster_.worker(w).Log();
  EXPECT_LT(took, absl::Seconds(30)) << cluster_.worker(w).Log();
}

// A worker whose token stops being accepted (the server came back with other worker tokens) used
// to poll forever with backoff while its /healthz said it was fine. It now registers again, is
// refused, and exits 1, so its pod restarts visibly.
TEST_F(WorkerProtocolTest, AWorkerWhoseTokenIsRevokedExits) {
  ASSERT_TRUE(cluster_.StartServer());
  const int w = cluster_.StartWorker("w1");
  ASSERT_GE(w, 0);
  EXPECT_EQ(cluster_.StopServer(), 0);
  const std::string other = cluster_.dir() + "/other_worker_tokens.txt";
  {
    std::ofstream out(other);
    out << "another-worker-token\n";
  }
  ServerFlags flags;
  flags.extra = {"--worker_tokens_file=" + other};
  ASSERT_TRUE(cluster_.StartServer(flags));
  std::optional<int> code = cluster_.worker(w).Wait(absl::Seconds(90));
  ASSERT_TRUE(code.has_value()) << "the worker kept running: " << cluster_.worker(w).Log();
  EXPECT_EQ(*code, 1) << cluster_.worker(w).Log();
  EXPECT_NE(cluster_.worker(w).Log().find("event=register_refused"), std::string::npos)
      << cluster_.worker(w).Log();
}

}  // namespace
}  // namespace perfusion::testing

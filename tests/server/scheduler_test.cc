// server/scheduler.{h,cc}: queue order, leases, expiry, attempts, cancellation, quotas,
// idempotency, events, generation items. No gRPC, no sleeping: a FakeClock and an in-memory
// SQLite store.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "server/scheduler.h"
#include "server/sqlite_store.h"
#include "tests/server/server_test_util.h"
#include "tests/server/status_matchers.h"

namespace perfusion::server {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using testing::IsOk;
using testing::StatusIs;

class SchedulerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    options_.base_model_id = "tiny";
    options_.lease_duration = absl::Seconds(30);
    options_.max_attempts = 2;
    options_.tenant_max_jobs = 5;
    options_.max_queue = 8;
    Reset();
  }
  void Reset() {
    scheduler_.reset();
    auto s = SqliteStore::Open(":memory:");
    ASSERT_THAT(s, IsOk());
    store_ = *std::move(s);
    scheduler_ = std::make_unique<Scheduler>(store_.get(), &clock_, options_, nullptr);
    ASSERT_THAT(scheduler_->Load(), IsOk());
  }

  TrainingRequest Request(const std::string& name, int priority = 0,
                          const std::string& request_id = "") {
    TrainingRequest r;
    r.concept_name = name;
    r.superclass = "toy";
    r.images = {testing::MakePng(8, 8), testing::MakePng(9, 9), testing::MakePng(10, 10)};
    r.options.steps = 50;
    r.priority = priority;
    r.request_id = request_id;
    return r;
  }
  std::string Submit(const std::string& name, int priority = 0, const std::string& tenant = "acme") {
    auto v = scheduler_->SubmitTraining(tenant, Request(name, priority));
    EXPECT_THAT(v, IsOk());
    return v.ok() ? v->job.id : "";
  }
  std::string Worker(bool training = true, bool generation = true, bool regions = true) {
    WorkerCapabilities caps;
    caps.training = training;
    caps.generation = generation;
    caps.regions = regions;
    auto id = scheduler_->RegisterWorker("w", "tiny", caps);
    EXPECT_THAT(id, IsOk());
    return *id;
  }
  // A lease with no waiting; nullopt when there is no work.
  std::optional<WorkItem> Lease(const std::string& worker, bool generation_only = false) {
    std::optional<WorkItem> got;
    bool called = false;
    auto id = scheduler_->LeaseWork(worker, absl::ZeroDuration(), [&](std::optional<WorkItem> w) {
      called = true;
      got = std::move(w);
    }, generation_only);
    EXPECT_THAT(id, IsOk());
    EXPECT_TRUE(called);
    return got;
  }
  JobView Get(const std::string& id, const std::string& tenant = "acme") {
    auto v = scheduler_->GetJob(tenant, id);
    EXPECT_THAT(v, IsOk());
    return *v;
  }
  GenerationSpec Spec(int num_images = 1) {
    GenerationSpec s;
    s.request.prompt = "a photo";
    s.request.num_images = num_images;
    return s;
  }

  FakeClock clock_;
  SchedulerOptions options_;
  std::unique_ptr<SqliteStore> store_;
  std::unique_ptr<Scheduler> scheduler_;
};

TEST_F(SchedulerTest, LeasesByPriorityThenSubmissionOrder) {
  std::string low1 = Submit("a", 0);
  std::string high = Submit("b", 7);
  std::string low2 = Submit("c", 0);
  EXPECT_EQ(Get(high).queue_position, 1);
  EXPECT_EQ(Get(low1).queue_position, 2);
  EXPECT_EQ(Get(low2).queue_position, 3);
  std::string w = Worker();
  EXPECT_EQ(Lease(w)->training->job.id, high);
  EXPECT_EQ(Lease(w)->training->job.id, low1);
  EXPECT_EQ(Lease(w)->training->job.id, low2);
  EXPECT_FALSE(Lease(w).has_value());
}

TEST_F(SchedulerTest, LeaseCarriesImagesOptionsAndAttempt) {
  std::string id = Submit("teddy");
  auto item = Lease(Worker());
  ASSERT_TRUE(item && item->training);
  EXPECT_EQ(item->training->images.size(), 3u);
  EXPECT_EQ(item->training->images[1], testing::MakePng(9, 9));
  EXPECT_EQ(item->training->job.options.steps, 50);
  EXPECT_TRUE(item->training->job.options.seed.has_value());  // fixed at submission
  EXPECT_EQ(item->training->job.attempts, 1);
  EXPECT_EQ(item->lease_deadline, clock_.Now() + absl::Seconds(30));
  EXPECT_EQ(Get(id).job.state, JobState::kRunning);
}

TEST_F(SchedulerTest, ExpiredLeaseRequeuesJob) {
  std::string id = Submit("teddy");
  std::string w = Worker();
  auto item = Lease(w);
  clock_.Advance(absl::Seconds(31));
  scheduler_->Tick();
  JobView v = Get(id);
  EXPECT_EQ(v.job.state, JobState::kQueued);
  EXPECT_EQ(v.job.attempts, 1);
  EXPECT_EQ(v.queue_position, 1);
  EXPECT_THAT(scheduler_->Heartbeat(item->lease_id, 1, 50, 0.5f),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("drop the work")));
  auto again = Lease(Worker());
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->training->job.attempts, 2);
}

TEST_F(SchedulerTest, ExpiryAfterMaxAttemptsFailsJob) {
  std::string id = Submit("teddy");
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(Lease(Worker()).has_value());
    clock_.Advance(absl::Seconds(31));
    scheduler_->Tick();
  }
  JobView v = Get(id);
  EXPECT_EQ(v.job.state, JobState::kFailed);
  EXPECT_EQ(v.job.error_code, static_cast<int>(absl::StatusCode::kUnavailable));
  EXPECT_THAT(v.job.error_message, HasSubstr("stopped heartbeating"));
}

TEST_F(SchedulerTest, HeartbeatExtendsLeaseAndRecordsProgress) {
  std::string id = Submit("teddy");
  auto item = Lease(Worker());
  clock_.Advance(absl::Seconds(20));
  auto hb = scheduler_->Heartbeat(item->lease_id, 10, 50, 0.25f);
  ASSERT_THAT(hb, IsOk());
  EXPECT_FALSE(hb->cancel_requested);
  EXPECT_EQ(hb->lease_deadline, clock_.Now() + absl::Seconds(30));
  clock_.Advance(absl::Seconds(20));  // 40 s after the lease, 20 s after the heartbeat
  scheduler_->Tick();
  JobView v = Get(id);
  EXPECT_EQ(v.job.state, JobState::kRunning);
  EXPECT_EQ(v.job.step, 10);
  EXPECT_FLOAT_EQ(v.job.loss, 0.25f);
  // 10 of 50 steps in 40 s: 160 s to go.
  EXPECT_EQ(v.eta, absl::Seconds(160));
  EXPECT_EQ(store_->GetJob(id)->step, 10);  // persisted
}

TEST_F(SchedulerTest, ReturnLeaseRequeuesWithoutCountingTheAttempt) {
  std::string id = Submit("teddy");
  auto item = Lease(Worker());
  ASSERT_THAT(scheduler_->ReturnLease(item->lease_id), IsOk());
  JobView v = Get(id);
  EXPECT_EQ(v.job.state, JobState::kQueued);
  EXPECT_EQ(v.job.attempts, 0);
}

TEST_F(SchedulerTest, RetryableFailureRequeuesAndFatalFailureFails) {
  std::string id = Submit("teddy");
  std::string w = Worker();
  ASSERT_THAT(scheduler_->FailWork(Lease(w)->lease_id, absl::ResourceExhaustedError("oom"), true),
              IsOk());
  EXPECT_EQ(Get(id).job.state, JobState::kQueued);
  ASSERT_THAT(scheduler_->FailWork(Lease(w)->lease_id,
                                   absl::InvalidArgumentError("images[0]: cannot decode"), false),
              IsOk());
  JobView v = Get(id);
  EXPECT_EQ(v.job.state, JobState::kFailed);
  EXPECT_EQ(v.job.error_code, static_cast<int>(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(v.job.error_message, "images[0]: cannot decode");
}

TEST_F(SchedulerTest, CancelQueuedJobIsImmediate) {
  std::string id = Submit("teddy");
  auto v = scheduler_->CancelJob("acme", id);
  ASSERT_THAT(v, IsOk());
  EXPECT_EQ(v->job.state, JobState::kCancelled);
  EXPECT_FALSE(Lease(Worker()).has_value());
}

TEST_F(SchedulerTest, CancelRunningJobReachesWorkerThroughHeartbeat) {
  std::string id = Submit("teddy");
  auto item = Lease(Worker());
  EXPECT_EQ(scheduler_->CancelJob("acme", id)->job.state, JobState::kCancelling);
  auto hb = scheduler_->Heartbeat(item->lease_id, 3, 50, 1.0f);
  ASSERT_THAT(hb, IsOk());
  EXPECT_TRUE(hb->cancel_requested);
  ASSERT_THAT(scheduler_->FailWork(item->lease_id, absl::CancelledError("stopped"), false), IsOk());
  EXPECT_EQ(Get(id).job.state, JobState::kCancelled);
}

TEST_F(SchedulerTest, CancelFinishedJobFailsPrecondition) {
  std::string id = Submit("teddy");
  ASSERT_THAT(scheduler_->CancelJob("acme", id), IsOk());
  EXPECT_THAT(scheduler_->CancelJob("acme", id),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("already CANCELLED")));
}

TEST_F(SchedulerTest, OtherTenantsJobIsNotFound) {
  std::string id = Submit("teddy");
  EXPECT_THAT(scheduler_->GetJob("globex", id), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(scheduler_->CancelJob("globex", id), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(scheduler_->Watch("globex", id, [](const absl::StatusOr<JobView>&) {}),
              StatusIs(absl::StatusCode::kNotFound));
}

// Each open watch costs work on every job change, whoever's: a tenant's watches are capped.
TEST_F(SchedulerTest, WatchesPerTenantAreCappedAndFreedWhenClosed) {
  options_.tenant_max_watches = 2;
  Reset();
  const std::string id = Submit("teddy");
  auto noop = [](const absl::StatusOr<JobView>&) {};
  auto a = scheduler_->Watch("acme", id, noop);
  auto b = scheduler_->Watch("acme", id, noop);
  ASSERT_THAT(a, IsOk());
  ASSERT_THAT(b, IsOk());
  EXPECT_THAT(scheduler_->Watch("acme", id, noop),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("tenant has 2 open job watches (max 2)")));
  const std::string other = Submit("bear", 0, "globex");
  EXPECT_THAT(scheduler_->Watch("globex", other, noop), IsOk());  // another tenant's own quota
  scheduler_->Unwatch(*a);
  EXPECT_THAT(scheduler_->Watch("acme", id, noop), IsOk());
}

// A worker filling a generation batch asks for generation items only: a queued training job stays
// queued for whichever worker is free first, rather than idling behind the batch.
TEST_F(SchedulerTest, AGenerationOnlyLeaseLeavesTrainingQueued) {
  const std::string id = Submit("teddy");
  const std::string w = Worker();
  EXPECT_FALSE(Lease(w, /*generation_only=*/true).has_value());
  EXPECT_EQ(Get(id).job.state, JobState::kQueued);
  ASSERT_THAT(scheduler_->SubmitGeneration("acme", Spec(), absl::InfiniteFuture(), {}), IsOk());
  auto gen = Lease(w, /*generation_only=*/true);
  ASSERT_TRUE(gen.has_value());
  EXPECT_TRUE(gen->generation.has_value());
  auto train = Lease(w);
  ASSERT_TRUE(train.has_value());
  EXPECT_TRUE(train->training.has_value()) << "a plain lease still takes the training job";
}

TEST_F(SchedulerTest, DuplicateRequestIdReturnsTheSameJob) {
  auto a = scheduler_->SubmitTraining("acme", Request("teddy", 0, "req-1"));
  auto b = scheduler_->SubmitTraining("acme", Request("teddy", 0, "req-1"));
  ASSERT_THAT(b, IsOk());
  EXPECT_EQ(a->job.id, b->job.id);
  EXPECT_THAT(scheduler_->SubmitTraining("acme", Request("other", 0, "req-1")),
              StatusIs(absl::StatusCode::kAlreadyExists, HasSubstr("request_id")));
  // Another tenant may use the same key.
  EXPECT_NE(scheduler_->SubmitTraining("globex", Request("teddy", 0, "req-1"))->job.id, a->job.id);
}

TEST_F(SchedulerTest, TenantQuotaAndQueueBoundAreResourceExhausted) {
  for (int i = 0; i < 5; ++i) Submit("c" + std::to_string(i));
  EXPECT_THAT(scheduler_->SubmitTraining("acme", Request("x")),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("tenant quota")));
  Submit("d1", 0, "globex");
  Submit("d2", 0, "globex");
  Submit("d3", 0, "globex");
  EXPECT_THAT(scheduler_->SubmitTraining("initech", Request("x")),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("queue full")));
}

// Jobs in training count against the concept quota: each stores a concept when it succeeds, and
// a finished training is never thrown away, so without this a tenant at its limit could still
// queue tenant_max_jobs more concepts.
TEST_F(SchedulerTest, JobsInTrainingCountAgainstTheConceptQuota) {
  options_.tenant_max_concepts = 2;
  Reset();
  Submit("a");
  const std::string b = Submit("b");
  EXPECT_THAT(scheduler_->SubmitTraining("acme", Request("c")),
              StatusIs(absl::StatusCode::kResourceExhausted,
                       HasSubstr("tenant quota: 0 concepts stored and 2 in training (limit 2)")));
  // Another tenant has its own quota.
  Submit("c", 0, "globex");
  // A job that ends without a concept frees its place.
  ASSERT_THAT(scheduler_->CancelJob("acme", b), IsOk());
  const std::string w = Worker();
  auto item = Lease(w);
  ASSERT_TRUE(item.has_value() && item->training.has_value());
  ASSERT_THAT(scheduler_->CompleteTraining(item->lease_id, testing::MakeConceptBlob("tiny", "a", "toy"), 0.05f, 50),
              IsOk());
  Submit("d");  // 1 stored + 1 in training = 2
  EXPECT_THAT(scheduler_->SubmitTraining("acme", Request("e")),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("1 concepts stored and 1 in training")));
}

TEST_F(SchedulerTest, WatchDeliversEventsUntilTheFinalOne) {
  std::string id = Submit("teddy");
  std::vector<JobState> states;
  std::vector<int> steps;
  auto watch = scheduler_->Watch("acme", id, [&](const absl::StatusOr<JobView>& v) {
    ASSERT_THAT(v, IsOk());
    states.push_back(v->job.state);
    steps.push_back(v->job.step);
  });
  ASSERT_THAT(watch, IsOk());
  auto item = Lease(Worker());
  ASSERT_THAT(scheduler_->Heartbeat(item->lease_id, 25, 50, 0.1f), IsOk());
  ASSERT_THAT(scheduler_->CompleteTraining(item->lease_id,
                                           testing::MakeConceptBlob("tiny", "teddy", "toy"),
                                           0.05f, 50),
              IsOk());
  EXPECT_THAT(states, ElementsAre(JobState::kQueued, JobState::kRunning, JobState::kRunning,
                                  JobState::kSucceeded));
  EXPECT_EQ(steps.back(), 50);
  size_t n = states.size();
  scheduler_->Unwatch(*watch);  // after the final event: nothing more, no crash
  EXPECT_EQ(states.size(), n);
}

// A job that goes back to the queue (a returned lease, a retryable failure; an expired lease takes
// the same path) is in the queue when its watchers hear QUEUED: every such event has a 1-based
// position (the first once said 0).
TEST_F(SchedulerTest, ARequeuedJobsQueuedEventsHaveItsPosition) {
  std::string id = Submit("teddy");
  std::vector<std::pair<JobState, int>> events;
  auto watch = scheduler_->Watch("acme", id, [&](const absl::StatusOr<JobView>& v) {
    ASSERT_THAT(v, IsOk());
    events.emplace_back(v->job.state, v->queue_position);
  });
  ASSERT_THAT(watch, IsOk());
  const std::string worker = Worker();
  auto item = Lease(worker);
  ASSERT_THAT(scheduler_->ReturnLease(item->lease_id), IsOk());
  item = Lease(worker);
  ASSERT_THAT(scheduler_->FailWork(item->lease_id, absl::UnavailableError("gpu fell off"), /*retryable=*/true), IsOk());
  int queued = 0;
  for (const auto& [state, position] : events) {
    if (state != JobState::kQueued) continue;
    ++queued;
    EXPECT_GE(position, 1) << "a QUEUED event without its position";
  }
  EXPECT_GE(queued, 3);  // submitted, returned, failed (retryable)
  scheduler_->Unwatch(*watch);
}

TEST_F(SchedulerTest, CompleteTrainingStoresConceptAndFinishesJob) {
  std::string id = Submit("teddy");
  auto item = Lease(Worker());
  std::string blob = testing::MakeConceptBlob("tiny", "teddy", "toy");
  auto c = scheduler_->CompleteTraining(item->lease_id, blob, 0.05f, 50);
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->name, "teddy");
  EXPECT_EQ(c->version, 1);
  EXPECT_EQ(c->source_job_id, id);
  EXPECT_EQ(c->size_bytes, static_cast<int64_t>(blob.size()));
  JobView v = Get(id);
  EXPECT_EQ(v.job.state, JobState::kSucceeded);
  EXPECT_EQ(v.job.concept_id, c->id);
  EXPECT_EQ(*store_->GetBlobByDigest(c->digest), blob);
  EXPECT_THAT(store_->GetJobImages(id), StatusIs(absl::StatusCode::kNotFound));
}

TEST_F(SchedulerTest, ConceptForAnotherBaseModelFailsTheJob) {
  std::string id = Submit("teddy");
  auto item = Lease(Worker());
  EXPECT_THAT(scheduler_->CompleteTraining(
                  item->lease_id, testing::MakeConceptBlob("sd15", "teddy", "toy"), 0, 50),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("base_model_id")));
  JobView v = Get(id);
  EXPECT_EQ(v.job.state, JobState::kFailed);
  EXPECT_EQ(v.job.error_code, static_cast<int>(absl::StatusCode::kInternal));
}

TEST_F(SchedulerTest, WorkerWithAnotherBaseModelIsRefused) {
  EXPECT_THAT(scheduler_->RegisterWorker("w", "sd15", WorkerCapabilities{}),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("base_model_id")));
}

TEST_F(SchedulerTest, UnknownWorkerMustRegisterAgain) {
  EXPECT_THAT(scheduler_->LeaseWork("wkr_nope", absl::Seconds(1), [](std::optional<WorkItem>) {}),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("RegisterWorker")));
}

TEST_F(SchedulerTest, LongPollWakesOnSubmitAndTimesOutEmpty) {
  std::string w = Worker();
  int calls = 0;
  std::optional<WorkItem> got;
  ASSERT_THAT(scheduler_->LeaseWork(w, absl::Seconds(10),
                                    [&](std::optional<WorkItem> item) {
                                      ++calls;
                                      got = std::move(item);
                                    }),
              IsOk());
  EXPECT_EQ(calls, 0);
  std::string id = Submit("teddy");
  ASSERT_EQ(calls, 1);
  EXPECT_EQ(got->training->job.id, id);
  EXPECT_EQ(got->training->images.size(), 3u);

  ASSERT_THAT(scheduler_->LeaseWork(w, absl::Seconds(10),
                                    [&](std::optional<WorkItem> item) {
                                      ++calls;
                                      got = std::move(item);
                                    }),
              IsOk());
  clock_.Advance(absl::Seconds(9));
  scheduler_->Tick();
  EXPECT_EQ(calls, 1);
  clock_.Advance(absl::Seconds(2));
  scheduler_->Tick();
  EXPECT_EQ(calls, 2);
  EXPECT_FALSE(got.has_value());
}

TEST_F(SchedulerTest, CancelledLongPollIsNeverAnswered) {
  std::string w = Worker();
  bool called = false;
  auto id = scheduler_->LeaseWork(w, absl::Seconds(10), [&](std::optional<WorkItem>) {
    called = true;
  });
  EXPECT_TRUE(scheduler_->CancelLeaseWait(*id));
  Submit("teddy");
  EXPECT_FALSE(called);
  EXPECT_FALSE(scheduler_->CancelLeaseWait(*id));
}

TEST_F(SchedulerTest, LoadRestoresQueueAndLeasesFromTheStore) {
  std::string queued = Submit("a");
  std::string running = Submit("b", 5);
  auto item = Lease(Worker());
  ASSERT_EQ(item->training->job.id, running);
  // A new scheduler on the same store: the server restarted.
  scheduler_ = std::make_unique<Scheduler>(store_.get(), &clock_, options_, nullptr);
  ASSERT_THAT(scheduler_->Load(), IsOk());
  EXPECT_EQ(Get(queued).queue_position, 1);
  EXPECT_EQ(Get(running).job.state, JobState::kRunning);
  // The worker that held the lease carries on.
  EXPECT_THAT(scheduler_->Heartbeat(item->lease_id, 5, 50, 0.3f), IsOk());
  EXPECT_THAT(scheduler_->CompleteTraining(item->lease_id,
                                           testing::MakeConceptBlob("tiny", "b", "toy"), 0, 50),
              IsOk());
  EXPECT_EQ(Get(running).job.state, JobState::kSucceeded);
}

TEST_F(SchedulerTest, GenerationNeedsAConnectedWorker) {
  EXPECT_THAT(scheduler_->SubmitGeneration("acme", Spec(), absl::InfiniteFuture(), {}),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("no generation worker")));
  Worker(/*training=*/true, /*generation=*/false);
  EXPECT_THAT(scheduler_->SubmitGeneration("acme", Spec(), absl::InfiniteFuture(), {}),
              StatusIs(absl::StatusCode::kUnavailable));
}

// A worker built before regional prompts would drop them: it never gets a request with regions, and
// with no worker that knows them such a request is refused instead of silently losing its regions.
TEST_F(SchedulerTest, RequestsWithRegionsGoOnlyToWorkersThatKnowThem) {
  GenerationSpec regional = Spec();
  regional.request.regions = {{"a star", 0, 0, 0.5f, 1}};
  std::string old_worker = Worker(/*training=*/false, /*generation=*/true, /*regions=*/false);
  EXPECT_THAT(scheduler_->SubmitGeneration("acme", regional, absl::InfiniteFuture(), {}),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("regions: no connected generation worker")));
  std::string new_worker = Worker(/*training=*/false, /*generation=*/true, /*regions=*/true);
  auto r = scheduler_->SubmitGeneration("acme", regional, absl::InfiniteFuture(), {});
  ASSERT_THAT(r, IsOk());
  auto p = scheduler_->SubmitGeneration("acme", Spec(), absl::InfiniteFuture(), {});
  ASSERT_THAT(p, IsOk());
  auto item = Lease(old_worker);  // skips the older regional request for the plain one
  ASSERT_TRUE(item && item->generation);
  EXPECT_TRUE(item->generation->spec.request.regions.empty());
  EXPECT_FALSE(Lease(old_worker).has_value());
  item = Lease(new_worker);
  ASSERT_TRUE(item && item->generation);
  EXPECT_EQ(item->generation->spec.request.regions.size(), 1u);
}

TEST_F(SchedulerTest, GenerationIsLeasedBeforeTrainingAndCompletes) {
  std::string w = Worker();
  Submit("teddy");
  std::optional<absl::StatusOr<GenerationResult>> done;
  std::vector<GenerationProgress> progress;
  GenerationCallbacks cb;
  cb.on_progress = [&](const GenerationProgress& p) { progress.push_back(p); };
  cb.on_done = [&](absl::StatusOr<GenerationResult> r) { done = std::move(r); };
  ASSERT_THAT(scheduler_->SubmitGeneration("acme", Spec(2), absl::InfiniteFuture(), cb), IsOk());
  ASSERT_FALSE(progress.empty());
  EXPECT_EQ(progress[0].queue_position, 1);
  auto item = Lease(w);
  ASSERT_TRUE(item && item->generation);
  clock_.Advance(absl::Seconds(2));
  ASSERT_THAT(scheduler_->Heartbeat(item->lease_id, 10, 60, 0), IsOk());
  EXPECT_EQ(progress.back().step, 10);
  EXPECT_THAT(scheduler_->CompleteGeneration(item->lease_id, {GeneratedImage{"\x89PNG..", 1, 8, 8}},
                                             absl::Seconds(1)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("asked for 2")));
  ASSERT_THAT(scheduler_->CompleteGeneration(
                  item->lease_id,
                  {GeneratedImage{testing::MakePng(8, 8), 1, 8, 8},
                   GeneratedImage{testing::MakePng(8, 8), 2, 8, 8}},
                  absl::Seconds(1)),
              IsOk());
  ASSERT_TRUE(done.has_value());
  ASSERT_THAT(*done, IsOk());
  EXPECT_EQ((*done)->images.size(), 2u);
  EXPECT_EQ(scheduler_->GenerationsInFlight(), 0);
  EXPECT_TRUE(Lease(w)->training.has_value());  // then the training job
}

TEST_F(SchedulerTest, CancelledGenerationTellsTheWorker) {
  std::string w = Worker();
  std::optional<absl::StatusOr<GenerationResult>> done;
  GenerationCallbacks cb;
  cb.on_done = [&](absl::StatusOr<GenerationResult> r) { done = std::move(r); };
  auto id = scheduler_->SubmitGeneration("acme", Spec(), absl::InfiniteFuture(), cb);
  auto item = Lease(w);
  scheduler_->CancelGeneration(*id);
  ASSERT_TRUE(done.has_value());
  EXPECT_THAT(*done, StatusIs(absl::StatusCode::kCancelled));
  auto hb = scheduler_->Heartbeat(item->lease_id, 1, 30, 0);
  ASSERT_THAT(hb, IsOk());
  EXPECT_TRUE(hb->cancel_requested);
  EXPECT_THAT(scheduler_->FailWork(item->lease_id, absl::CancelledError("stopped"), false), IsOk());
}

TEST_F(SchedulerTest, GenerationPastItsDeadlineFails) {
  Worker();
  std::optional<absl::StatusOr<GenerationResult>> done;
  GenerationCallbacks cb;
  cb.on_done = [&](absl::StatusOr<GenerationResult> r) { done = std::move(r); };
  ASSERT_THAT(scheduler_->SubmitGeneration("acme", Spec(), clock_.Now() + absl::Seconds(5), cb),
              IsOk());
  clock_.Advance(absl::Seconds(6));
  scheduler_->Tick();
  ASSERT_TRUE(done.has_value());
  EXPECT_THAT(*done, StatusIs(absl::StatusCode::kDeadlineExceeded));
  EXPECT_EQ(scheduler_->GenerationsInFlight(), 0);
}

TEST_F(SchedulerTest, GenerationQueueIsBounded) {
  options_.max_generation_queue = 2;
  options_.tenant_max_generations = 1;
  Reset();
  Worker();
  ASSERT_THAT(scheduler_->SubmitGeneration("acme", Spec(), absl::InfiniteFuture(), {}), IsOk());
  EXPECT_THAT(scheduler_->SubmitGeneration("acme", Spec(), absl::InfiniteFuture(), {}),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("tenant quota")));
  ASSERT_THAT(scheduler_->SubmitGeneration("globex", Spec(), absl::InfiniteFuture(), {}), IsOk());
  EXPECT_THAT(scheduler_->SubmitGeneration("initech", Spec(), absl::InfiniteFuture(), {}),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("queue full")));
}

TEST_F(SchedulerTest, SilentWorkerIsDisconnected) {
  options_.worker_timeout = absl::Seconds(60);
  Reset();
  Worker();
  EXPECT_EQ(scheduler_->WorkersConnected(), 1);
  clock_.Advance(absl::Seconds(61));
  scheduler_->Tick();
  EXPECT_EQ(scheduler_->WorkersConnected(), 0);
}

TEST_F(SchedulerTest, DrainRefusesNewWorkAndEndsWatches) {
  std::string id = Submit("teddy");
  absl::Status ended;
  ASSERT_THAT(scheduler_->Watch("acme", id,
                                [&](const absl::StatusOr<JobView>& v) {
                                  if (!v.ok()) ended = v.status();
                                }),
              IsOk());
  scheduler_->StartDrain();
  EXPECT_THAT(ended, StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_THAT(scheduler_->SubmitTraining("acme", Request("x")),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("draining")));
  auto item = Lease(Worker());  // no training handed out while draining
  ASSERT_TRUE(item.has_value());
  EXPECT_TRUE(item->lease_id.empty());
  EXPECT_GT(item->retry_after, absl::ZeroDuration());
}

}  // namespace
}  // namespace perfusion::server

// Scheduler with SchedulerOptions::shared_store: two schedulers on one store stand for two server
// replicas on one PostgreSQL database (the store conformance suite proves the store primitives on
// PostgreSQL itself; tests/integration/replicas_test.cc runs real processes). No sleeping: a
// FakeClock and an in-memory SQLite store.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "server/scheduler.h"
#include "server/sqlite_store.h"
#include "tests/server/hooked_store.h"
#include "tests/server/server_test_util.h"
#include "tests/server/status_matchers.h"

namespace perfusion::server {
namespace {

using ::testing::HasSubstr;
using testing::IsOk;
using testing::StatusIs;

class SharedSchedulerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    options_.base_model_id = "tiny";
    options_.lease_duration = absl::Seconds(30);
    options_.max_attempts = 2;
    options_.shared_store = true;
    options_.shared_poll_interval = absl::Seconds(1);
    auto s = SqliteStore::Open(":memory:");
    ASSERT_THAT(s, IsOk());
    store_ = *std::move(s);
    a_ = std::make_unique<Scheduler>(store_.get(), &clock_, options_, nullptr);
    b_ = std::make_unique<Scheduler>(store_.get(), &clock_, options_, nullptr);
    ASSERT_THAT(a_->Load(), IsOk());
    ASSERT_THAT(b_->Load(), IsOk());
  }

  TrainingRequest Request(const std::string& name, const std::string& request_id = "") {
    TrainingRequest r;
    r.concept_name = name;
    r.superclass = "toy";
    r.images = {testing::MakePng(8, 8), testing::MakePng(9, 9)};
    r.options.steps = 50;
    r.request_id = request_id;
    return r;
  }
  std::string Submit(Scheduler& s, const std::string& name) {
    auto v = s.SubmitTraining("acme", Request(name));
    EXPECT_THAT(v, IsOk());
    return v.ok() ? v->job.id : "";
  }
  std::string Worker(Scheduler& s) {
    auto id = s.RegisterWorker("w", "tiny", WorkerCapabilities{});
    EXPECT_THAT(id, IsOk());
    return *id;
  }
  std::optional<WorkItem> Lease(Scheduler& s, const std::string& worker) {
    std::optional<WorkItem> got;
    auto id = s.LeaseWork(worker, absl::ZeroDuration(),
                          [&](std::optional<WorkItem> w) { got = std::move(w); });
    EXPECT_THAT(id, IsOk());
    return got;
  }
  // Both replicas' periodic work after `d`.
  void Advance(absl::Duration d) {
    clock_.Advance(d);
    a_->Tick();
    b_->Tick();
  }
  JobView Get(Scheduler& s, const std::string& id) {
    auto v = s.GetJob("acme", id);
    EXPECT_THAT(v, IsOk());
    return *v;
  }

  FakeClock clock_;
  SchedulerOptions options_;
  std::unique_ptr<SqliteStore> store_;
  std::unique_ptr<Scheduler> a_, b_;
};

TEST_F(SharedSchedulerTest, AJobSubmittedOnOneReplicaIsLeasedOnceThroughTheOther) {
  const std::string wb = Worker(*b_);
  std::optional<WorkItem> got;
  ASSERT_THAT(b_->LeaseWork(wb, absl::Seconds(20), [&](std::optional<WorkItem> w) { got = w; }),
              IsOk());
  EXPECT_FALSE(got.has_value());
  // A job submitted on A wakes B's waiting long poll at B's next sync.
  const std::string id = Submit(*a_, "teddy");
  EXPECT_FALSE(got.has_value());
  Advance(absl::Seconds(1));
  ASSERT_TRUE(got && got->training);
  EXPECT_EQ(got->training->job.id, id);
  EXPECT_EQ(got->training->images.size(), 2u);
  // Nothing left for a worker on A.
  EXPECT_FALSE(Lease(*a_, Worker(*a_)).has_value());
  EXPECT_EQ(Get(*a_, id).job.state, JobState::kRunning);
}

TEST_F(SharedSchedulerTest, HeartbeatCancelAndCompletionWorkThroughEitherReplica) {
  const std::string id = Submit(*a_, "teddy");
  auto item = Lease(*a_, Worker(*a_));
  ASSERT_TRUE(item && item->training);
  // The worker's connection moved to B: B knows the lease from the store.
  auto hb = b_->Heartbeat(item->lease_id, 10, 50, 0.5f);
  ASSERT_THAT(hb, IsOk());
  EXPECT_FALSE(hb->cancel_requested);
  EXPECT_EQ(Get(*a_, id).job.step, 10);
  // A client cancels through A; the worker hears it on B.
  auto c = a_->CancelJob("acme", id);
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->job.state, JobState::kCancelling);
  hb = b_->Heartbeat(item->lease_id, 11, 50, 0.5f);
  ASSERT_THAT(hb, IsOk());
  EXPECT_TRUE(hb->cancel_requested) << "a heartbeat must not overwrite the cancel";
  ASSERT_THAT(b_->FailWork(item->lease_id, absl::CancelledError("cancelled"), false), IsOk());
  EXPECT_EQ(Get(*a_, id).job.state, JobState::kCancelled);

  // Completion through the other replica.
  const std::string id2 = Submit(*b_, "bunny");
  auto item2 = Lease(*b_, Worker(*b_));
  ASSERT_TRUE(item2 && item2->training);
  auto concept = a_->CompleteTraining(item2->lease_id, testing::MakeConceptBlob("tiny", "bunny", "toy"),
                                      0.1f, 50);
  ASSERT_THAT(concept, IsOk());
  EXPECT_EQ(Get(*b_, id2).job.state, JobState::kSucceeded);
  EXPECT_EQ(Get(*b_, id2).job.concept_id, concept->id);
  // The lease is spent on every replica.
  EXPECT_THAT(b_->Heartbeat(item2->lease_id, 1, 1, 0), StatusIs(absl::StatusCode::kNotFound));
}

TEST_F(SharedSchedulerTest, ALeaseLostToSilenceIsTakenOverAndTheStaleWorkerCannotComplete) {
  const std::string id = Submit(*a_, "teddy");
  auto stale = Lease(*a_, Worker(*a_));
  ASSERT_TRUE(stale && stale->training);
  const std::string wb = Worker(*b_);
  // A dies silently; its lease expires; B's sync re-queues the job and B's worker takes it.
  clock_.Advance(absl::Seconds(31));
  b_->Tick();
  EXPECT_EQ(Get(*b_, id).job.state, JobState::kQueued);
  auto fresh = Lease(*b_, wb);
  ASSERT_TRUE(fresh && fresh->training);
  EXPECT_EQ(fresh->training->job.attempts, 2);
  // The first worker comes back: everything it says is refused, and it adds no concept.
  EXPECT_THAT(a_->Heartbeat(stale->lease_id, 5, 50, 0), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(a_->CompleteTraining(stale->lease_id, testing::MakeConceptBlob("tiny", "teddy", "toy"),
                                   0.1f, 50),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("drop the work")));
  ASSERT_THAT(b_->CompleteTraining(fresh->lease_id, testing::MakeConceptBlob("tiny", "teddy", "toy"),
                                   0.1f, 50),
              IsOk());
  EXPECT_EQ(*store_->CountConcepts("acme"), 1);
}

TEST_F(SharedSchedulerTest, AttemptsRunOutAcrossReplicas) {
  const std::string id = Submit(*a_, "teddy");
  ASSERT_TRUE(Lease(*a_, Worker(*a_)).has_value());
  Advance(absl::Seconds(31));
  ASSERT_TRUE(Lease(*b_, Worker(*b_)).has_value());
  Advance(absl::Seconds(31));
  const JobView v = Get(*a_, id);
  EXPECT_EQ(v.job.state, JobState::kFailed);
  EXPECT_THAT(v.job.error_message, HasSubstr("attempts"));
}

TEST_F(SharedSchedulerTest, WatchersSeeChangesMadeThroughAnotherReplica) {
  const std::string id = Submit(*a_, "teddy");
  std::vector<JobView> seen;
  auto watch = a_->Watch("acme", id, [&](const absl::StatusOr<JobView>& v) {
    if (v.ok()) seen.push_back(*v);
  });
  ASSERT_THAT(watch, IsOk());
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_EQ(seen[0].job.state, JobState::kQueued);
  EXPECT_EQ(seen[0].queue_position, 1);
  auto item = Lease(*b_, Worker(*b_));
  ASSERT_TRUE(item && item->training);
  ASSERT_THAT(b_->Heartbeat(item->lease_id, 25, 50, 0.3f), IsOk());
  Advance(absl::Seconds(1));
  ASSERT_GE(seen.size(), 2u);
  EXPECT_EQ(seen.back().job.state, JobState::kRunning);
  EXPECT_EQ(seen.back().job.step, 25);
  ASSERT_THAT(b_->CompleteTraining(item->lease_id, testing::MakeConceptBlob("tiny", "teddy", "toy"),
                                   0.1f, 50),
              IsOk());
  const size_t before = seen.size();
  Advance(absl::Seconds(1));
  ASSERT_EQ(seen.size(), before + 1);
  EXPECT_EQ(seen.back().job.state, JobState::kSucceeded);
  Advance(absl::Seconds(1));
  EXPECT_EQ(seen.size(), before + 1) << "the final view is the last call";
}

TEST_F(SharedSchedulerTest, IdempotentSubmissionAcrossReplicas) {
  auto first = a_->SubmitTraining("acme", Request("teddy", "req-1"));
  ASSERT_THAT(first, IsOk());
  auto again = b_->SubmitTraining("acme", Request("teddy", "req-1"));
  ASSERT_THAT(again, IsOk());
  EXPECT_EQ(again->job.id, first->job.id);
  EXPECT_THAT(b_->SubmitTraining("acme", Request("other", "req-1")),
              StatusIs(absl::StatusCode::kAlreadyExists, HasSubstr("request_id")));
}

TEST_F(SharedSchedulerTest, CancellingAQueuedJobOnOneReplicaKeepsItFromTheOther) {
  const std::string id = Submit(*a_, "teddy");
  Advance(absl::Seconds(1));  // B's snapshot has the job queued
  ASSERT_THAT(a_->CancelJob("acme", id), IsOk());
  EXPECT_FALSE(Lease(*b_, Worker(*b_)).has_value());
  EXPECT_EQ(Get(*b_, id).job.state, JobState::kCancelled);
  EXPECT_THAT(b_->CancelJob("acme", id), StatusIs(absl::StatusCode::kFailedPrecondition));
}

TEST_F(SharedSchedulerTest, ReturnedLeaseIsRequeuedWithoutCountingTheAttempt) {
  const std::string id = Submit(*a_, "teddy");
  auto item = Lease(*a_, Worker(*a_));
  ASSERT_TRUE(item && item->training);
  ASSERT_THAT(b_->ReturnLease(item->lease_id), IsOk());
  const JobView v = Get(*b_, id);
  EXPECT_EQ(v.job.state, JobState::kQueued);
  EXPECT_EQ(v.job.attempts, 0);
  auto again = Lease(*b_, Worker(*b_));
  ASSERT_TRUE(again && again->training);
  EXPECT_EQ(again->training->job.attempts, 1);
}

// Another replica cancels a running job between this replica's read (lease expired: re-queue it)
// and its write. The write used to win: the client was told CANCELLING and the job ran again.
TEST_F(SharedSchedulerTest, ACancelBetweenAnExpirySweepsReadAndWriteIsKept) {
  testing::HookedStore hooked(store_.get());
  Scheduler c(&hooked, &clock_, options_, nullptr);
  ASSERT_THAT(c.Load(), IsOk());
  const std::string id = Submit(*b_, "teddy");
  ASSERT_TRUE(Lease(*b_, Worker(*b_)).has_value());
  clock_.Advance(absl::Seconds(31));  // the worker went silent: its lease expired
  hooked.after_list_active_jobs = [&] {
    auto v = b_->CancelJob("acme", id);
    ASSERT_THAT(v, IsOk());
    EXPECT_EQ(v->job.state, JobState::kCancelling);
  };
  c.Tick();
  EXPECT_NE(Get(*b_, id).job.state, JobState::kQueued) << "the cancel was overwritten by the re-queue";
  // The next sweep reads CANCELLING with the lease expired: the job ends CANCELLED.
  Advance(absl::Seconds(2));
  c.Tick();
  EXPECT_EQ(Get(*b_, id).job.state, JobState::kCancelled);
  EXPECT_FALSE(Lease(c, Worker(c)).has_value()) << "a cancelled job was leased again";
}

// The same between a worker's ReturnLease read and its write (a scale-down's SIGTERM while the
// client cancels): the job ends CANCELLED, not QUEUED.
TEST_F(SharedSchedulerTest, ACancelBetweenAReturnsReadAndWriteEndsTheJobCancelled) {
  testing::HookedStore hooked(store_.get());
  Scheduler c(&hooked, &clock_, options_, nullptr);
  ASSERT_THAT(c.Load(), IsOk());
  const std::string id = Submit(*b_, "teddy");
  auto item = Lease(*b_, Worker(*b_));
  ASSERT_TRUE(item && item->training);
  hooked.after_get_job_by_lease = [&] { ASSERT_THAT(b_->CancelJob("acme", id), IsOk()); };
  ASSERT_THAT(c.ReturnLease(item->lease_id), IsOk());
  EXPECT_EQ(Get(*b_, id).job.state, JobState::kCancelled);
}

// A store error that passes (a database failover's broken connection) while a lease's images are
// read used to fail the job for good as DATA_LOSS, deleting its images. The job goes back to the
// queue, its attempt not counted, and the next lease carries the images.
TEST_F(SharedSchedulerTest, AStoreErrorReadingALeasesImagesRequeuesTheJob) {
  testing::HookedStore hooked(store_.get());
  Scheduler c(&hooked, &clock_, options_, nullptr);
  ASSERT_THAT(c.Load(), IsOk());
  const std::string id = Submit(c, "teddy");
  const std::string worker = Worker(c);
  hooked.before_get_job_images = [] { return absl::UnavailableError("postgres: connection lost"); };
  EXPECT_FALSE(Lease(c, worker).has_value());
  const JobView v = Get(c, id);
  EXPECT_EQ(v.job.state, JobState::kQueued);
  EXPECT_EQ(v.job.attempts, 0);
  auto again = Lease(c, worker);
  ASSERT_TRUE(again && again->training);
  EXPECT_EQ(again->training->images.size(), 2u);
  // Images truly gone (NOT_FOUND) are still data loss: the job fails, not retried forever.
  const std::string lost = Submit(c, "bear");
  hooked.before_get_job_images = [] { return absl::NotFoundError("job: no images stored"); };
  EXPECT_FALSE(Lease(c, Worker(c)).has_value());
  EXPECT_EQ(Get(c, lost).job.state, JobState::kFailed);
  EXPECT_EQ(Get(c, lost).job.error_code, static_cast<int>(absl::StatusCode::kDataLoss));
}

}  // namespace
}  // namespace perfusion::server

// The scheduler: the training queue (durable, in the store), the generation queue (in memory),
// workers, leases, retries, cancellation and progress events. No gRPC here: the services call
// it, and tests drive it with a FakeClock and an in-memory SQLite store.
//
// Training: SubmitTraining stores the job QUEUED. Workers long-poll LeaseWork; a lease hands
// the job (and its images) to one worker until lease_duration passes without a Heartbeat.
// Each lease counts one attempt. An expired lease re-queues the job while attempts remain
// (max_attempts), else the job FAILS (UNAVAILABLE). ReturnLease re-queues without counting the
// attempt. CancelJob: QUEUED -> CANCELLED at once; RUNNING -> CANCELLING, which the worker
// learns from its next Heartbeat (cancel_requested), and FailWork/ReturnLease/expiry then make
// it CANCELLED. A CompleteTraining that arrives while CANCELLING still SUCCEEDS (too late to
// cancel). Leases survive a restart: Load() keeps RUNNING jobs leased, with a fresh deadline.
//
// Generation: SubmitGeneration queues an item in memory (bounded) with a deadline; the
// callbacks report queue position and steps, then the result exactly once. Generation items
// are leased before training jobs.
//
// Queue order: generation FIFO; training by priority (high first), then submission order.
// Capacity: max_queue queued training jobs, tenant_max_jobs active jobs per tenant,
// max_generation_queue generation items (tenant_max_generations per tenant); beyond them
// RESOURCE_EXHAUSTED. Nothing grows without bound: watchers and waiters belong to RPCs that
// gRPC bounds, and both are removed when their RPC ends.
//
// Time: lease and deadline expiry happen in Tick(), which the server calls a few times a second
// and tests call after FakeClock::Advance.
//
// Callbacks (job events, generation progress/results, lease results) are never invoked with
// the scheduler's lock held; they may run on any thread, before the registering call returns.
//
// Shared store (SchedulerOptions::shared_store; PostgreSQL with several server replicas): the
// store, not this process, holds the training queue and every training lease. A lease is
// granted with Store::LeaseNextJob (one job to one worker even when replicas race); heartbeats,
// completions, failures and returns find the job by its lease in the store, so a worker may talk
// to any replica; every write by a lease holder is conditional on still holding the lease; a
// cancel through any replica is seen by the worker's next heartbeat. Every
// shared_poll_interval the replica re-reads the active jobs: the queue snapshot (queue positions,
// quotas, waking long polls for jobs submitted elsewhere), expired leases (re-queued, or failed
// once attempts run out) and the jobs its clients watch. Generation stays in memory per replica
// (docs/scaling.md).
//
// Thread safety: every method is safe to call concurrently.
#ifndef PERFUSION_SERVER_SCHEDULER_H_
#define PERFUSION_SERVER_SCHEDULER_H_

#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/clock.h"
#include "server/server_metrics.h"
#include "server/store.h"
#include "server/types.h"

namespace perfusion::server {

struct SchedulerOptions {
  // The base model this server serves; workers must register with it and concepts must match.
  std::string base_model_id = "tiny";
  // A lease lasts this long past the last heartbeat.
  absl::Duration lease_duration = absl::Seconds(60);
  // LeaseWork waits at most this long.
  absl::Duration max_lease_wait = absl::Seconds(30);
  // A worker unseen (no LeaseWork, Heartbeat or completion) this long is disconnected.
  absl::Duration worker_timeout = absl::Seconds(90);
  // Leases per training job (and per generation item) before it fails.
  int max_attempts = 3;
  // Queued training jobs, all tenants.
  int max_queue = 1000;
  // Active (QUEUED, RUNNING, CANCELLING) training jobs per tenant.
  int tenant_max_jobs = 20;
  // Stored concepts per tenant (checked when a job is submitted and on import).
  int tenant_max_concepts = 1000;
  // Open WatchTrainingJob streams per tenant: each costs work on every job change of any
  // tenant, so one tenant's thousands of watches would slow everyone's submissions.
  int tenant_max_watches = 100;
  // Generation items (queued or running), all tenants / per tenant.
  int max_generation_queue = 64;
  int tenant_max_generations = 16;
  // The longest a generation item may live, whatever the client's deadline.
  absl::Duration max_generation_time = absl::Minutes(10);
  // Several server replicas share the store (see above). Off: this process owns the queue.
  bool shared_store = false;
  // Shared store: how often the queue, expired leases and watched jobs are re-read.
  absl::Duration shared_poll_interval = absl::Milliseconds(500);
};

// A job with what only the scheduler knows.
struct JobView {
  JobRecord job;
  int queue_position = 0;                           // 1-based while QUEUED
  absl::Duration eta = absl::ZeroDuration();        // 0: unknown
  uint64_t event_seq = 0;                           // increases with every event of the server
};

struct GenerationProgress {
  int queue_position = 0;
  int step = 0;
  int total_steps = 0;
  uint64_t event_seq = 0;
};

struct GenerationCallbacks {
  std::function<void(const GenerationProgress&)> on_progress;  // may be empty
  std::function<void(absl::StatusOr<GenerationResult>)> on_done;  // exactly once
};

struct WorkerCapabilities {
  bool training = true;
  bool generation = true;
  bool regions = false;  // understands GenerateRequest.regions (older workers would drop them)
  std::string device;
  int64_t memory_bytes = 0;
};

struct TrainingWorkItem {
  JobRecord job;
  std::vector<std::string> images;
};

struct GenerationWorkItem {
  std::string id;
  std::string tenant;
  GenerationSpec spec;
  absl::Time deadline;
};

// What LeaseWork hands out: exactly one of training / generation, or neither (no work).
struct WorkItem {
  std::string lease_id;
  absl::Time lease_deadline;
  std::optional<TrainingWorkItem> training;
  std::optional<GenerationWorkItem> generation;
  absl::Duration retry_after = absl::ZeroDuration();  // set while draining
};

struct HeartbeatReply {
  bool cancel_requested = false;
  absl::Time lease_deadline;
};

class Scheduler {
 public:
  // `store` and `clock` must outlive the scheduler; `metrics` may be null.
  Scheduler(Store* store, const Clock* clock, SchedulerOptions options, ServerMetrics* metrics);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  const SchedulerOptions& options() const { return options_; }

  // Restores the active jobs from the store (call once, before serving).
  absl::Status Load();

  // ---- training (tenant-scoped: another tenant's job is NOT_FOUND) ----
  // REQUIRES: `request` passed ValidateTrainingRequest (with its images inspected).
  // Same request_id + same request: the original job; different request: ALREADY_EXISTS.
  absl::StatusOr<JobView> SubmitTraining(const std::string& tenant, TrainingRequest request);
  absl::StatusOr<JobView> GetJob(const std::string& tenant, const std::string& id);
  absl::StatusOr<Page<JobView>> ListJobs(const std::string& tenant, std::optional<JobState> state,
                                         int page_size, const std::string& page_token);
  // FAILED_PRECONDITION for a final job.
  absl::StatusOr<JobView> CancelJob(const std::string& tenant, const std::string& id);
  // Calls `fn` with the job's current view, then on every change until the job is final (the
  // final view is the last call), or with UNAVAILABLE when the server drains (also a last
  // call). Returns a watch id for Unwatch (0 when the job was already final: one call only).
  using WatchCallback = std::function<void(const absl::StatusOr<JobView>&)>;
  absl::StatusOr<uint64_t> Watch(const std::string& tenant, const std::string& id,
                                 WatchCallback fn);
  void Unwatch(uint64_t watch_id);

  // ---- generation ----
  // REQUIRES: `spec` validated with defaults resolved and concepts looked up.
  // UNAVAILABLE when no generation worker is connected or the server drains;
  // RESOURCE_EXHAUSTED when the queue or the tenant's share is full. Returns the item id.
  absl::StatusOr<std::string> SubmitGeneration(const std::string& tenant, GenerationSpec spec,
                                               absl::Time deadline, GenerationCallbacks callbacks);
  // The client went away: drop the item (a running one is cancelled through its heartbeat).
  // on_done is called with CANCELLED (DEADLINE_EXCEEDED, outcome "deadline", when the call ended
  // because its deadline passed) unless it was already called.
  void CancelGeneration(const std::string& id, bool deadline_passed = false);

  // ---- workers ----
  // FAILED_PRECONDITION when base_model_id differs from the server's. Returns the worker id.
  absl::StatusOr<std::string> RegisterWorker(const std::string& name,
                                             const std::string& base_model_id,
                                             WorkerCapabilities caps);
  // Long poll: `done` gets a WorkItem (with lease) as soon as work is available, or nullopt
  // when `wait` (cut to max_lease_wait) passes. NOT_FOUND for an unknown worker. Returns a
  // waiter id for CancelLeaseWait.
  using LeaseCallback = std::function<void(std::optional<WorkItem>)>;
  // generation_only: grant generation items only (a worker filling a batch).
  absl::StatusOr<uint64_t> LeaseWork(const std::string& worker_id, absl::Duration wait,
                                     LeaseCallback done, bool generation_only = false);
  // The LeaseWork RPC ended (client gone): drops the waiter. True when it was still waiting
  // (then `done` is never called); false when `done` was or is being called.
  bool CancelLeaseWait(uint64_t waiter_id);
  // NOT_FOUND for an unknown or expired lease.
  absl::StatusOr<HeartbeatReply> Heartbeat(const std::string& lease_id, int step, int total_steps,
                                           float loss);
  // Stores the concept and ends the job SUCCEEDED. INVALID_ARGUMENT / FAILED_PRECONDITION for a
  // blob with a malformed header / another base model (the job then FAILS with INTERNAL).
  absl::StatusOr<ConceptRecord> CompleteTraining(const std::string& lease_id,
                                                 const std::string& blob, float final_loss,
                                                 int steps);
  absl::Status CompleteGeneration(const std::string& lease_id, std::vector<GeneratedImage> images,
                                  absl::Duration compute_duration);
  // `error` must not be OK. Retryable failures re-queue while attempts remain.
  absl::Status FailWork(const std::string& lease_id, const absl::Status& error, bool retryable);
  // Re-queues the item without counting the attempt (worker shutting down).
  absl::Status ReturnLease(const std::string& lease_id);

  // ---- time and lifecycle ----
  // Expires leases, long polls, generation deadlines and silent workers.
  void Tick();
  // Refuses new public work (UNAVAILABLE), ends watches, hands out no training; generation
  // items already queued can still be leased and completed.
  void StartDrain();
  bool draining() const;
  // Generation items queued or running.
  int GenerationsInFlight() const;
  // Fails every generation item (UNAVAILABLE) and answers every long poll with no work.
  void Shutdown();
  // Connected workers (with the capability, when asked).
  int WorkersConnected() const;
  int GenerationWorkersConnected() const;

 private:
  struct Lease {
    std::string id;
    bool training = true;
    std::string item_id;
    std::string worker_id;
    absl::Time deadline;
    absl::Time granted;
    // The generation item is gone (client cancelled, deadline): heartbeats answer
    // cancel_requested and the worker's completion is discarded.
    bool orphaned = false;
  };
  struct ActiveJob {
    JobRecord rec;
    std::set<uint64_t> watchers;
  };
  struct GenItem {
    std::string id;
    std::string tenant;
    GenerationSpec spec;
    GenerationCallbacks callbacks;
    absl::Time submitted;
    absl::Time deadline;
    absl::Time leased = absl::InfinitePast();
    std::string lease_id;
    int attempts = 0;
    int last_position = -1;
    int step = 0;
    int total_steps = 0;
  };
  struct Worker {
    std::string id;
    std::string name;
    WorkerCapabilities caps;
    absl::Time last_seen;
    int waiting = 0;  // open long polls
  };
  struct Waiter {
    uint64_t id;
    std::string worker_id;
    absl::Time deadline;
    LeaseCallback done;
    bool generation_only = false;
  };
  struct Watcher {
    std::string job_id;
    WatchCallback fn;
    std::string tenant;
  };
  // RESOURCE_EXHAUSTED when the tenant already has tenant_max_watches open watches.
  absl::Status CheckWatchQuotaLocked(const std::string& tenant) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Queue key: (-priority, seq) orders high priority first, then submission order.
  using QueueKey = std::tuple<int, int64_t, std::string>;
  // Callbacks collected under the lock and run after it is released.
  using Pending = std::vector<std::function<void()>>;

  static QueueKey KeyOf(const JobRecord& j) { return {-j.priority, j.seq, j.id}; }
  JobView ViewLocked(const JobRecord& j) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int QueuePositionLocked(const JobRecord& j) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  void NotifyJobLocked(const std::string& job_id, Pending& out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void NotifyQueuedLocked(Pending& out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void NotifyGenQueueLocked(Pending& out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Persists `rec` (unless !persist) and updates the active set: watchers get the new view;
  // a final job leaves the active set and its watchers are dropped after the final event.
  absl::Status SaveJobLocked(JobRecord rec, Pending& out, bool persist = true)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // SaveJobLocked for a job that leaves its lease, with `requeue` when it goes back to the queue:
  // it is queued first, so the watchers' QUEUED event carries its position; a failed save leaves
  // the queue as it was.
  absl::Status SaveLeftJobLocked(const JobRecord& rec, bool requeue, Pending& out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FinishJobLocked(JobRecord& rec, JobState state, const absl::Status& error)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RequeueJobLocked(JobRecord& rec) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A training lease ran out: CANCELLING -> CANCELLED, else re-queued while attempts remain,
  // else FAILED (UNAVAILABLE). Returns true when re-queued.
  bool ExpireLeaseLocked(JobRecord& rec) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FinishGenLocked(std::string id, absl::StatusOr<GenerationResult> result,
                       const char* outcome, Pending& out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void DispatchLocked(Pending& out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Grants a lease on the next item `worker` may take; nullopt when there is none.
  // `probe_store`: in shared-store mode, ask the store even when the queue snapshot is empty (a
  // worker's own LeaseWork call; waking waiters relies on the snapshot).
  std::optional<WorkItem> GrantLocked(const Worker& worker, Pending& out, bool probe_store = false,
                                      bool generation_only = false)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Wraps `done(item)` for running after the lock: loads a training item's images first.
  std::function<void()> DeliverLease(LeaseCallback done, std::optional<WorkItem> item);
  bool ConnectedLocked(const Worker& w) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  void UpdateGaugesLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void LogJobFinished(const JobRecord& rec);
  void CountOutcome(JobState state);
  static void Run(Pending& pending);

  // ---- shared store (options_.shared_store) ----
  // Re-reads the active jobs: queue snapshot, per-tenant counts, expired leases, watched jobs.
  // The error of the store read, if it failed (nothing changed then).
  absl::Status SyncSharedLocked(Pending& out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A training lease from the store; nullopt when nothing is leasable.
  std::optional<WorkItem> GrantSharedTrainingLocked(const Worker& worker, Pending& out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // `rec` was written by this replica (or read fresh): its watchers get the view; a final job's
  // watchers are dropped after it.
  void SharedJobChangedLocked(const JobRecord& rec, Pending& out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A final write done by this replica: the tenant's active count, outcome metric and log.
  void SharedFinalLocked(const JobRecord& rec) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<JobView> SharedCancel(const std::string& tenant, const std::string& id);
  absl::StatusOr<uint64_t> SharedWatch(const std::string& tenant, const std::string& id,
                                       WatchCallback fn);
  absl::StatusOr<HeartbeatReply> SharedHeartbeat(const std::string& lease_id, int step,
                                                 int total_steps, float loss);
  absl::StatusOr<ConceptRecord> SharedCompleteTraining(const std::string& lease_id,
                                                       const std::string& blob, float final_loss,
                                                       int steps);
  // FailWork (return_lease = false) or ReturnLease (true) of a training lease.
  absl::Status SharedEndLease(const std::string& lease_id, const absl::Status& error,
                              bool retryable, bool return_lease);
  // Shared-store mode and `lease_id` is not one of this replica's generation leases: the store
  // holds it (any replica's training lease).
  bool IsSharedTrainingLease(const std::string& lease_id);
  bool IsGenerationLeaseLocked(const std::string& lease_id) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    auto l = leases_.find(lease_id);
    return l != leases_.end() && !l->second.training;
  }

  Store* const store_;
  const Clock* const clock_;
  const SchedulerOptions options_;
  ServerMetrics* const metrics_;

  mutable absl::Mutex mu_;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t event_seq_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<std::string, ActiveJob> active_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int> active_per_tenant_ ABSL_GUARDED_BY(mu_);
  std::set<QueueKey> queue_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, Lease> leases_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, GenItem> gen_items_ ABSL_GUARDED_BY(mu_);
  std::deque<std::string> gen_queue_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int> gen_per_tenant_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, Worker> workers_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, Waiter> waiters_ ABSL_GUARDED_BY(mu_);  // FIFO by id
  std::map<uint64_t, Watcher> watchers_ ABSL_GUARDED_BY(mu_);
  // Exponential moving average of training durations, for queue ETAs (0: none yet).
  double avg_training_seconds_ ABSL_GUARDED_BY(mu_) = 0;
  // Shared store: when the next SyncSharedLocked is due, and the last record each watched job
  // was reported with (the poll reports only changes).
  absl::Time next_sync_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  std::map<std::string, JobView> shared_watched_ ABSL_GUARDED_BY(mu_);
};

// A SHA-256 over everything that defines a training request (the idempotency check).
std::string TrainingRequestHash(const TrainingRequest& request);

}  // namespace perfusion::server

#endif  // PERFUSION_SERVER_SCHEDULER_H_

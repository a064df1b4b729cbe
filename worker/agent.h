// Agent: the worker side of the perfusion.v1.WorkerService protocol (proto/perfusion/v1/
// worker.proto, docs/api.md "Worker protocol"). It dials the server, registers with the engine's
// base model id, long-polls LeaseWork, and runs what it gets on the Engine:
//
//  * training: Engine::Train with heartbeats carrying step/total/loss (on progress at most every
//    progress_interval, and at least every heartbeat_interval); cancel_requested stops it and
//    answers FailWork(CANCELLED); then CompleteTraining with the blob.
//  * generation: after leasing one item it leases more generation items without waiting (up to
//    max_batch) and runs them all in ONE Engine::Generate call (different concepts batch
//    together); concept blobs come from the BlobCache or FetchConcept(digest) (checked against
//    the digest); then CompleteGeneration per item, image i made with seed + i.
//  * engine errors: FailWork with the engine's status code; retryable for RESOURCE_EXHAUSTED,
//    INTERNAL, UNAVAILABLE, ABORTED, UNKNOWN and DATA_LOSS, not for INVALID_ARGUMENT and the rest.
//    A batch failing with INVALID_ARGUMENT is rerun item by item so only the bad item fails.
//  * Stop() (SIGTERM): the running work is stopped, every held lease is handed back with
//    ReturnLease (a finished result is still delivered), and Run() returns OK.
//  * the server going away: UNAVAILABLE is retried with exponential backoff (heartbeats and
//    completions until the lease is gone); NOT_FOUND from LeaseWork (a restarted server forgot
//    the worker) registers again; NOT_FOUND on a lease drops that work.
//
// Every event is one log line (server/log.h: `ts=... event=... key=value`).
//
// Thread safety: Run() on one thread; Stop() from any thread (it does not wait for Run()).
// Internally each held lease has a heartbeat thread.
#ifndef PERFUSION_WORKER_AGENT_H_
#define PERFUSION_WORKER_AGENT_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <memory>
#include <set>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "perfusion/v1/worker.grpc.pb.h"
#include "worker/blob_cache.h"
#include "worker/engine.h"
#include "worker/worker_metrics.h"

namespace perfusion::worker {

struct AgentOptions {
  // Worker token, sent as `authorization: Bearer <token>`.
  std::string token;
  // Informational: name (host or pod), device, build version, device memory.
  std::string name;
  std::string device = "cpu";
  std::string version;
  int64_t memory_bytes = 0;
  // Which work to accept (at least one).
  bool training = true;
  bool generation = true;
  // Generation items run together in one Engine::Generate call (>= 1).
  int max_batch = 4;
  // Requested LeaseWork long poll (the server cuts it to its max_lease_wait).
  absl::Duration lease_wait = absl::Seconds(30);
  // Deadline of every other WorkerService call.
  absl::Duration rpc_timeout = absl::Seconds(20);
  // Progress heartbeats are sent at most this often (and a heartbeat at least every
  // heartbeat_interval that the server gives at registration).
  absl::Duration progress_interval = absl::Seconds(1);
  // Reconnect backoff: doubles from min to max (with jitter) while the server is unreachable.
  absl::Duration min_backoff = absl::Milliseconds(200);
  absl::Duration max_backoff = absl::Seconds(10);
  // How long a finished training result is offered to an unreachable server (a restart keeps
  // the lease, so the blob is delivered once the server is back).
  absl::Duration completion_retry = absl::Minutes(2);
  // After Stop(): how long, in all, to keep retrying ReturnLease / completions before exiting.
  // Every call to the server after Stop() ends by Stop() + stop_grace (a call already retrying
  // when Stop() came included), so shutdown fits a pod's termination grace period.
  absl::Duration stop_grace = absl::Seconds(10);
  // A held item whose work reports no new step for this long is taken as hung (a stuck GPU
  // kernel, a deadlock): its heartbeats stop, so the server re-queues it when the lease expires
  // instead of renewing it forever, on_stall runs (main turns /healthz to 503, so the
  // orchestrator restarts the process: the engine thread cannot be got back) and the agent stops
  // taking work. Progress of any item counts (items waiting their turn are not stalled). Zero: never.
  absl::Duration stall_timeout = absl::Minutes(15);
  std::function<void()> on_stall;
};

class Agent {
 public:
  // engine, cache and metrics must outlive the agent; metrics may be null.
  Agent(AgentOptions options, std::shared_ptr<grpc::Channel> channel, Engine* engine,
        BlobCache* cache, WorkerMetrics* metrics);
  ~Agent();
  Agent(const Agent&) = delete;
  Agent& operator=(const Agent&) = delete;

  // Serves until Stop(). OK after Stop(); FAILED_PRECONDITION (the server serves another base
  // model), UNAUTHENTICATED / PERMISSION_DENIED (bad worker token) or INVALID_ARGUMENT when
  // registration can never succeed.
  absl::Status Run();

  // Asks Run() to stop: cancels the long poll and the running work. Idempotent; returns at once.
  void Stop();
  bool stopping() const { return stop_.HasBeenNotified(); }

 private:
  class LeaseKeeper;
  struct HeldItem;

  absl::Status Register();
  // Leases with the given long-poll wait. nullopt when nothing came (or on error; *error set).
  // generation_only: a generation item or nothing (filling a batch).
  std::optional<v1::LeaseWorkResponse> Lease(absl::Duration wait, absl::Status* error, bool generation_only = false);
  std::unique_ptr<HeldItem> Hold(v1::LeaseWorkResponse resp);
  void RunTraining(std::unique_ptr<HeldItem> item);
  void RunGenerations(std::vector<std::unique_ptr<HeldItem>> items);
  // Generates the ready items in one engine call (or one by one after an INVALID_ARGUMENT).
  void GenerateBatch(const std::vector<HeldItem*>& items);
  absl::Status FetchConcepts(HeldItem* item);

  // End-of-lease calls, retried on UNAVAILABLE while the lease may still be alive.
  void FailItem(HeldItem* item, const absl::Status& status);
  void ReturnItem(HeldItem* item, const std::string& reason);
  void CompleteGenerationItem(HeldItem* item, std::vector<v1::GeneratedImage> images,
                              absl::Duration compute);
  // Runs call() until it is not UNAVAILABLE/DEADLINE_EXCEEDED or `until` passes.
  grpc::Status CallWithRetry(const char* method, absl::Time until,
                             const std::function<grpc::Status(grpc::ClientContext*)>& call);

  void PrepareContext(grpc::ClientContext* ctx, absl::Duration timeout) const;
  void CountError(const char* method, const grpc::Status& s);
  void CountItem(const char* kind, const char* outcome);
  // Sleeps up to d, or less when stopping.
  void Backoff(absl::Duration* backoff);
  // `until`, or Stop() + stop_grace when that comes first.
  absl::Time RetryUntil(absl::Time until);

  const AgentOptions options_;
  const std::shared_ptr<grpc::Channel> channel_;
  const std::unique_ptr<v1::WorkerService::Stub> stub_;
  Engine* const engine_;
  BlobCache* const cache_;
  WorkerMetrics* const metrics_;

  absl::Notification stop_;
  absl::Mutex mu_;
  // Stop() + stop_grace, once Stop() was called: the end of every retry after it.
  absl::Time stop_deadline_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  // CallWithRetry's calls begun before Stop(), which Stop() cancels: each may have a deadline past
  // the grace period (a completion retried for minutes); it is retried within the grace instead.
  std::set<grpc::ClientContext*> calls_ ABSL_GUARDED_BY(mu_);
  // The Run() thread's open call (RegisterWorker or the LeaseWork long poll), for Stop().
  grpc::ClientContext* lease_ctx_ ABSL_GUARDED_BY(mu_) = nullptr;

  // Set by Register(); read by the Run() thread and heartbeat threads after it.
  std::string worker_id_;
  absl::Duration lease_duration_ = absl::Seconds(60);
  absl::Duration heartbeat_interval_ = absl::Seconds(20);
  // A training item an older server granted while a generation batch was being filled (it
  // ignores LeaseWorkRequest.generation_only); runs next.
  std::unique_ptr<HeldItem> next_training_;
  // When the engine last reported a step of any item (unix ns): the stall watchdog's liveness.
  std::atomic<int64_t> last_progress_ns_{0};
};

}  // namespace perfusion::worker

#endif  // PERFUSION_WORKER_AGENT_H_

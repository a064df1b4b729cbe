#include "worker/agent.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <thread>
#include <utility>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "server/grpc_code_name.h"
#include "server/log.h"

namespace perfusion::worker {
namespace {

using server::LogEvent;

absl::Duration FromProto(const google::protobuf::Duration& d) {
  return absl::Seconds(d.seconds()) + absl::Nanoseconds(d.nanos());
}

google::protobuf::Duration ToProto(absl::Duration d) {
  google::protobuf::Duration out;
  const int64_t ns = absl::ToInt64Nanoseconds(d);
  out.set_seconds(ns / 1000000000);
  out.set_nanos(static_cast<int32_t>(ns % 1000000000));
  return out;
}

absl::Time FromProto(const google::protobuf::Timestamp& t) {
  if (t.seconds() == 0 && t.nanos() == 0) return absl::InfiniteFuture();
  return absl::FromUnixSeconds(t.seconds()) + absl::Nanoseconds(t.nanos());
}

absl::Status FromGrpc(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

// The code's name in log lines ("UNAVAILABLE"); metrics use GrpcCodeName, as the server's do.
std::string CodeName(grpc::StatusCode code) {
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
}

bool Transient(grpc::StatusCode code) {
  return code == grpc::StatusCode::UNAVAILABLE || code == grpc::StatusCode::DEADLINE_EXCEEDED;
}

// Whether another attempt of the same work may succeed (FailWorkRequest.retryable).
bool Retryable(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kResourceExhausted:
    case absl::StatusCode::kInternal:
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kAborted:
    case absl::StatusCode::kUnknown:
    case absl::StatusCode::kDataLoss:
      return true;
    default:
      return false;
  }
}

std::string Secs(absl::Duration d) { return absl::StrFormat("%.3f", absl::ToDoubleSeconds(d)); }

// A finished result the server answered with an error that is neither "the lease is gone"
// (NOT_FOUND) nor "unreachable" (the lease then expires on its own): the server still holds the
// lease and would wait it out, then run the work again. What FailWork reports instead: a server
// fault (INTERNAL, UNKNOWN, ABORTED) keeps its code, so the work may be retried; a refusal of the
// result itself (too large, invalid) cannot go better next time.
std::optional<absl::Status> RefusedResult(const char* method, const grpc::Status& s) {
  if (s.ok() || s.error_code() == grpc::StatusCode::NOT_FOUND || Transient(s.error_code())) return std::nullopt;
  const std::string what = absl::StrCat("the server refused the result (", method, ": ",
                                        CodeName(s.error_code()), ": ", s.error_message(), ")");
  switch (s.error_code()) {
    case grpc::StatusCode::INTERNAL:
    case grpc::StatusCode::UNKNOWN:
    case grpc::StatusCode::ABORTED:
      return absl::Status(static_cast<absl::StatusCode>(s.error_code()), what);
    default:
      return absl::FailedPreconditionError(what);
  }
}

}  // namespace

// Heartbeats one lease from its own thread: at least every heartbeat_interval, and after
// progress at most every progress_interval. Records cancel_requested and the loss of the lease
// (NOT_FOUND). Transient errors are retried with backoff until the server answers.
class Agent::LeaseKeeper {
 public:
  LeaseKeeper(Agent* agent, std::string lease_id, absl::Time deadline, int total_steps)
      : agent_(agent), lease_id_(std::move(lease_id)), deadline_(deadline), total_(total_steps) {
    last_sent_ = absl::Now();
    last_step_at_ = last_sent_;
    next_due_ = last_sent_ + agent_->heartbeat_interval_;
    thread_ = std::thread([this] { Loop(); });
  }
  ~LeaseKeeper() { Stop(); }

  void Progress(int step, int total, float loss) {
    absl::MutexLock lock(&mu_);
    // Never backwards: a batch split after an error runs each item again from step 0, and the
    // client's progress would drop from 80 % to 3 %. It waits at its high-water mark instead.
    // Liveness is any new step the engine reports, for this item or (agent-wide) another: an item
    // rerun from step 0 after a split stays below its high-water mark for a while, and items
    // waiting their turn in a split get no progress at all.
    const absl::Time now = absl::Now();
    if (step != raw_step_ || total != total_) last_step_at_ = now;
    agent_->last_progress_ns_.store(absl::ToUnixNanos(now));
    raw_step_ = step;
    step_ = total == total_ ? std::max(step_, step) : step;
    total_ = total;
    loss_ = loss;
    dirty_ = true;
    // Progress pulls the next heartbeat forward, but never ahead of a retry backoff.
    next_due_ = std::max(retry_not_before_,
                         std::min(next_due_, last_sent_ + agent_->options_.progress_interval));
    cv_.Signal();
  }

  bool cancel_requested() const { return cancel_.load(); }
  bool lost() const { return lost_.load(); }
  absl::Time deadline() const {
    absl::MutexLock lock(&mu_);
    return deadline_;
  }

  void Stop() {
    {
      absl::MutexLock lock(&mu_);
      done_ = true;
      if (inflight_ != nullptr) inflight_->TryCancel();
      cv_.Signal();
    }
    if (thread_.joinable()) thread_.join();
  }

 private:
  void Loop() {
    absl::MutexLock lock(&mu_);
    // Retries stay well inside the lease: a restarted server renews it for lease_duration.
    const absl::Duration max_backoff =
        std::max(agent_->options_.min_backoff,
                 std::min(agent_->options_.max_backoff, agent_->heartbeat_interval_ / 2));
    absl::Duration backoff = agent_->options_.min_backoff;
    while (!done_) {
      if (absl::Now() < next_due_) {
        cv_.WaitWithDeadline(&mu_, next_due_);
        continue;
      }
      const absl::Duration stall = agent_->options_.stall_timeout;
      const absl::Time alive = std::max(last_step_at_, absl::FromUnixNanos(agent_->last_progress_ns_.load()));
      if (stall > absl::ZeroDuration() && absl::Now() - alive > stall) {
        // No new step for the whole stall timeout: the work is hung. Renewing the lease would
        // hold the job RUNNING forever; letting it expire re-queues it for another worker.
        lost_ = true;
        LogEvent("work_stalled", {{"lease", lease_id_},
                                  {"step", std::to_string(step_)},
                                  {"total", std::to_string(total_)},
                                  {"seconds_without_progress", Secs(absl::Now() - alive)}});
        if (agent_->options_.on_stall) agent_->options_.on_stall();
        // No new work either: the engine runs on the Run() thread, so nothing else would run.
        // Should the engine come back after all, Run() ends and the process exits, to be
        // restarted like a failed liveness probe would.
        agent_->Stop();
        break;
      }
      v1::HeartbeatRequest req;
      req.set_lease_id(lease_id_);
      req.set_step(step_);
      req.set_total_steps(total_);
      req.set_loss(loss_);
      dirty_ = false;
      v1::HeartbeatResponse resp;
      grpc::ClientContext ctx;
      agent_->PrepareContext(&ctx, agent_->options_.rpc_timeout);
      inflight_ = &ctx;
      mu_.Unlock();
      grpc::Status s = agent_->stub_->Heartbeat(&ctx, req, &resp);
      mu_.Lock();
      inflight_ = nullptr;
      const absl::Time now = absl::Now();
      if (s.ok()) {
        backoff = agent_->options_.min_backoff;
        retry_not_before_ = absl::InfinitePast();
        last_sent_ = now;
        deadline_ = FromProto(resp.lease_deadline());
        if (resp.cancel_requested() && !cancel_.exchange(true)) {
          LogEvent("cancel_requested", {{"lease", lease_id_}});
        }
        next_due_ = now + agent_->heartbeat_interval_;
        if (dirty_) next_due_ = std::min(next_due_, now + agent_->options_.progress_interval);
        continue;
      }
      if (done_) break;
      agent_->CountError("Heartbeat", s);
      // NOT_FOUND: the lease is gone. UNAUTHENTICATED / PERMISSION_DENIED: our token no longer
      // is (revoked, or the server restarted with other worker tokens); no retry can complete this
      // lease, so stop working on it, and the agent's next poll re-registers (and exits, refused).
      if (s.error_code() == grpc::StatusCode::NOT_FOUND ||
          s.error_code() == grpc::StatusCode::UNAUTHENTICATED ||
          s.error_code() == grpc::StatusCode::PERMISSION_DENIED) {
        lost_ = true;
        LogEvent("lease_lost", {{"lease", lease_id_},
                                {"code", CodeName(s.error_code())},
                                {"error", s.error_message()}});
        break;
      }
      LogEvent("heartbeat_error", {{"lease", lease_id_},
                                   {"code", CodeName(s.error_code())},
                                   {"error", s.error_message()},
                                   {"retry_in", Secs(backoff)}});
      dirty_ = true;
      retry_not_before_ = now + backoff;
      next_due_ = retry_not_before_;
      backoff = std::min(backoff * 2, max_backoff);
    }
  }

  Agent* const agent_;
  const std::string lease_id_;
  mutable absl::Mutex mu_;
  absl::CondVar cv_;
  absl::Time deadline_ ABSL_GUARDED_BY(mu_);
  absl::Time last_sent_ ABSL_GUARDED_BY(mu_);
  absl::Time next_due_ ABSL_GUARDED_BY(mu_);
  absl::Time retry_not_before_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  absl::Time last_step_at_ ABSL_GUARDED_BY(mu_);  // when the step last changed (or the lease began)
  int raw_step_ ABSL_GUARDED_BY(mu_) = 0;         // the step as last reported (step_ never goes back)
  int step_ ABSL_GUARDED_BY(mu_) = 0;
  int total_ ABSL_GUARDED_BY(mu_) = 0;
  float loss_ ABSL_GUARDED_BY(mu_) = 0;
  bool dirty_ ABSL_GUARDED_BY(mu_) = false;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  grpc::ClientContext* inflight_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::atomic<bool> cancel_{false};
  std::atomic<bool> lost_{false};
  std::thread thread_;
};

// A leased work item and its heartbeats.
struct Agent::HeldItem {
  v1::LeaseWorkResponse work;
  std::unique_ptr<LeaseKeeper> keeper;
  absl::Time leased_at;
  bool ended = false;  // the lease was ended (completed, failed, returned) or lost
  // Generation only.
  std::vector<ConceptUse> concepts;
  absl::Time deadline = absl::InfiniteFuture();
  int total_steps = 0;

  const std::string& lease_id() const { return work.lease_id(); }
  bool training() const { return work.has_training(); }
  std::string id() const {
    return training() ? work.training().job_id() : work.generation().generation_id();
  }
  // The latest lease deadline known, plus a grace for a server restart that renews it.
  absl::Time retry_until(absl::Duration grace) const { return keeper->deadline() + grace; }
  // The lease was ended or lost: stop its heartbeats at once. An item of a batch that failed,
  // completed or was returned early used to go on heartbeating until the whole batch was done,
  // and its NOT_FOUND answers were logged as lost leases and counted as server errors.
  void End() {
    ended = true;
    keeper->Stop();
  }
};

Agent::Agent(AgentOptions options, std::shared_ptr<grpc::Channel> channel, Engine* engine,
             BlobCache* cache, WorkerMetrics* metrics)
    : options_(std::move(options)),
      channel_(std::move(channel)),
      stub_(v1::WorkerService::NewStub(channel_)),
      engine_(engine),
      cache_(cache),
      metrics_(metrics) {}

Agent::~Agent() = default;

void Agent::Stop() {
  absl::MutexLock lock(&mu_);
  if (!stop_.HasBeenNotified()) {
    stop_deadline_ = absl::Now() + options_.stop_grace;
    stop_.Notify();
    LogEvent("stop_requested", {});
    for (grpc::ClientContext* call : calls_) call->TryCancel();
  }
  if (lease_ctx_ != nullptr) lease_ctx_->TryCancel();
}

void Agent::PrepareContext(grpc::ClientContext* ctx, absl::Duration timeout) const {
  ctx->AddMetadata("authorization", absl::StrCat("Bearer ", options_.token));
  // Wait (up to the deadline) for the server instead of failing at once while it is away: the
  // waiting call also drives the reconnection, so a restarted server is reached within
  // milliseconds instead of at gRPC's next idle reconnect attempt (seconds later).
  ctx->set_wait_for_ready(true);
  ctx->set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(timeout));
}

void Agent::CountError(const char* method, const grpc::Status& s) {
  if (metrics_ != nullptr) {
    metrics_->server_errors->WithLabels({method, server::GrpcCodeName(s.error_code())}).Inc();
  }
}

void Agent::CountItem(const char* kind, const char* outcome) {
  if (metrics_ != nullptr) metrics_->work_items->WithLabels({kind, outcome}).Inc();
}

void Agent::Backoff(absl::Duration* backoff) {
  static thread_local absl::BitGen gen;
  const absl::Duration jittered = *backoff * absl::Uniform(gen, 0.5, 1.0);
  stop_.WaitForNotificationWithTimeout(jittered);
  *backoff = std::min(*backoff * 2, options_.max_backoff);
}

absl::Status Agent::Register() {
  v1::RegisterWorkerRequest req;
  req.set_name(options_.name);
  req.set_base_model_id(engine_->base_model_id());
  req.set_version(options_.version);
  auto* caps = req.mutable_capabilities();
  caps->set_training(options_.training);
  caps->set_generation(options_.generation);
  caps->set_regions(true);  // GenerateBatch passes GenerateRequest.regions on to the engine
  caps->set_device(options_.device);
  caps->set_memory_bytes(options_.memory_bytes);
  v1::RegisterWorkerResponse resp;
  grpc::ClientContext ctx;
  PrepareContext(&ctx, options_.rpc_timeout);
  {
    absl::MutexLock lock(&mu_);
    if (stop_.HasBeenNotified()) return absl::CancelledError("stopping");
    lease_ctx_ = &ctx;
  }
  grpc::Status s = stub_->RegisterWorker(&ctx, req, &resp);
  {
    absl::MutexLock lock(&mu_);
    lease_ctx_ = nullptr;
  }
  if (!s.ok()) {
    CountError("RegisterWorker", s);
    return FromGrpc(s);
  }
  worker_id_ = resp.worker_id();
  lease_duration_ = FromProto(resp.lease_duration());
  if (lease_duration_ <= absl::ZeroDuration()) lease_duration_ = absl::Seconds(60);
  heartbeat_interval_ = FromProto(resp.heartbeat_interval());
  if (heartbeat_interval_ <= absl::ZeroDuration()) heartbeat_interval_ = lease_duration_ / 3;
  if (metrics_ != nullptr) metrics_->registered->Set(1);
  LogEvent("registered", {{"worker", worker_id_},
                          {"name", options_.name},
                          {"base_model_id", engine_->base_model_id()},
                          {"lease_seconds", Secs(lease_duration_)},
                          {"heartbeat_seconds", Secs(heartbeat_interval_)}});
  return absl::OkStatus();
}

std::optional<v1::LeaseWorkResponse> Agent::Lease(absl::Duration wait, absl::Status* error, bool generation_only) {
  *error = absl::OkStatus();
  v1::LeaseWorkRequest req;
  req.set_worker_id(worker_id_);
  req.set_generation_only(generation_only);
  *req.mutable_wait() = ToProto(wait);
  v1::LeaseWorkResponse resp;
  grpc::ClientContext ctx;
  PrepareContext(&ctx, wait + options_.rpc_timeout);
  {
    absl::MutexLock lock(&mu_);
    if (stop_.HasBeenNotified()) {
      *error = absl::CancelledError("stopping");
      return std::nullopt;
    }
    lease_ctx_ = &ctx;
  }
  grpc::Status s = stub_->LeaseWork(&ctx, req, &resp);
  {
    absl::MutexLock lock(&mu_);
    lease_ctx_ = nullptr;
  }
  if (!s.ok()) {
    if (!stopping()) CountError("LeaseWork", s);
    *error = FromGrpc(s);
    return std::nullopt;
  }
  return resp;
}

std::unique_ptr<Agent::HeldItem> Agent::Hold(v1::LeaseWorkResponse resp) {
  auto item = std::make_unique<HeldItem>();
  item->work = std::move(resp);
  item->leased_at = absl::Now();
  if (item->training()) {
    const auto& t = item->work.training();
    item->total_steps = t.options().has_steps() ? t.options().steps() : 0;
    LogEvent("job_leased", {{"job", t.job_id()},
                            {"lease", item->lease_id()},
                            {"tenant", t.tenant()},
                            {"concept", t.concept_name()},
                            {"attempt", std::to_string(t.attempt())},
                            {"images", std::to_string(t.images_size())}});
  } else {
    const auto& g = item->work.generation();
    const int n = std::max(1, g.request().has_num_images() ? g.request().num_images() : 1);
    const int steps = g.request().has_steps() ? g.request().steps() : 30;
    item->total_steps = n * steps;
    item->deadline = FromProto(g.deadline());
    LogEvent("generation_leased", {{"generation", g.generation_id()},
                                   {"lease", item->lease_id()},
                                   {"tenant", g.tenant()},
                                   {"concepts", std::to_string(g.concepts_size())},
                                   {"images", std::to_string(n)}});
  }
  item->keeper = std::make_unique<LeaseKeeper>(this, item->lease_id(),
                                               FromProto(item->work.lease_deadline()),
                                               item->total_steps);
  return item;
}

absl::Status Agent::Run() {
  LogEvent("agent_started", {{"name", options_.name},
                             {"base_model_id", engine_->base_model_id()},
                             {"training", options_.training ? "true" : "false"},
                             {"generation", options_.generation ? "true" : "false"},
                             {"max_batch", std::to_string(options_.max_batch)}});
  absl::Duration backoff = options_.min_backoff;
  while (!stopping()) {
    if (next_training_ != nullptr) {
      RunTraining(std::move(next_training_));
      continue;
    }
    if (worker_id_.empty()) {
      absl::Status s = Register();
      if (!s.ok() && stopping()) break;
      if (!s.ok()) {
        const absl::StatusCode c = s.code();
        if (c == absl::StatusCode::kFailedPrecondition || c == absl::StatusCode::kInvalidArgument ||
            c == absl::StatusCode::kUnauthenticated || c == absl::StatusCode::kPermissionDenied) {
          LogEvent("register_refused", {{"code", absl::StatusCodeToString(c)},
                                        {"error", std::string(s.message())}});
          return s;
        }
        LogEvent("register_failed", {{"code", absl::StatusCodeToString(c)},
                                     {"error", std::string(s.message())},
                                     {"retry_in", Secs(backoff)}});
        Backoff(&backoff);
        continue;
      }
      backoff = options_.min_backoff;
    }
    absl::Status err;
    const absl::Time polled = absl::Now();
    std::optional<v1::LeaseWorkResponse> resp = Lease(options_.lease_wait, &err);
    if (!err.ok()) {
      if (stopping()) break;
      // NOT_FOUND: the server forgot us (restart, expiry): register again. UNAUTHENTICATED or
      // PERMISSION_DENIED: the token stopped being accepted; registering again either works (a
      // server that came back with it) or is refused, and then Run returns that error, so the
      // process exits rather than poll forever while its /healthz says it is fine.
      if (err.code() == absl::StatusCode::kNotFound || err.code() == absl::StatusCode::kUnauthenticated ||
          err.code() == absl::StatusCode::kPermissionDenied) {
        LogEvent("worker_unknown", {{"worker", worker_id_},
                                    {"code", absl::StatusCodeToString(err.code())},
                                    {"error", std::string(err.message())}});
        worker_id_.clear();
        if (metrics_ != nullptr) metrics_->registered->Set(0);
        continue;
      }
      LogEvent("lease_error", {{"code", absl::StatusCodeToString(err.code())},
                               {"error", std::string(err.message())},
                               {"retry_in", Secs(backoff)}});
      Backoff(&backoff);
      continue;
    }
    backoff = options_.min_backoff;
    if (resp->has_retry_after()) {
      const absl::Duration d = std::clamp(FromProto(resp->retry_after()), absl::Milliseconds(100),
                                          options_.max_backoff);
      stop_.WaitForNotificationWithTimeout(d);
      continue;
    }
    if (resp->lease_id().empty()) {
      // A server that answers an empty poll at once must not make us spin.
      if (absl::Now() - polled < absl::Milliseconds(50)) {
        stop_.WaitForNotificationWithTimeout(absl::Milliseconds(200));
      }
      continue;
    }
    std::unique_ptr<HeldItem> item = Hold(*std::move(resp));
    if (item->training()) {
      RunTraining(std::move(item));
      continue;
    }
    std::vector<std::unique_ptr<HeldItem>> batch;
    batch.push_back(std::move(item));
    while (static_cast<int>(batch.size()) < options_.max_batch && !stopping()) {
      // Generation items only: a training job leased here would sit idle behind the batch
      // (minutes on a CPU), RUNNING at step 0 while free workers find nothing.
      std::optional<v1::LeaseWorkResponse> more = Lease(absl::ZeroDuration(), &err, /*generation_only=*/true);
      if (!more || more->lease_id().empty()) break;
      std::unique_ptr<HeldItem> h = Hold(*std::move(more));
      if (h->training()) {
        next_training_ = std::move(h);  // an older server ignored generation_only: run it next
        break;
      }
      batch.push_back(std::move(h));
    }
    RunGenerations(std::move(batch));
  }
  if (next_training_ != nullptr) {
    ReturnItem(next_training_.get(), "worker shutting down");
    next_training_.reset();
  }
  if (metrics_ != nullptr) metrics_->registered->Set(0);
  LogEvent("agent_stopped", {{"worker", worker_id_}});
  return absl::OkStatus();
}

// ---- Training ----

void Agent::RunTraining(std::unique_ptr<HeldItem> item) {
  if (metrics_ != nullptr) metrics_->busy->Set(1);
  const v1::TrainingWork& w = item->work.training();
  TrainSpec spec;
  spec.name = w.concept_name();
  spec.superclass = w.superclass();
  spec.images.assign(w.images().begin(), w.images().end());
  spec.steps = w.options().has_steps() ? w.options().steps() : 0;
  spec.batch_size = w.options().batch_size();
  spec.resolution = w.options().resolution();
  spec.lr_values = w.options().learning_rate();
  spec.lr_embedding = w.options().embedding_learning_rate();
  spec.train_beta = w.options().train_beta();
  spec.train_temperature = w.options().train_temperature();
  spec.seed = w.options().has_seed() ? w.options().seed() : 0;
  // The API names the concept as in prompts, "<name>"; the trainer marks its place with "{}".
  for (const std::string& caption : w.options().captions()) {
    spec.captions.push_back(absl::StrReplaceAll(caption, {{"<" + spec.name + ">", "{}"}}));
  }
  LogEvent("training_started", {{"job", w.job_id()},
                                {"lease", item->lease_id()},
                                {"steps", std::to_string(spec.steps)},
                                {"seed", std::to_string(spec.seed)}});
  absl::Time last_step = absl::Now();
  LeaseKeeper* keeper = item->keeper.get();
  auto progress = [&](const TrainUpdate& u) {
    const absl::Time now = absl::Now();
    if (metrics_ != nullptr) metrics_->training_step_seconds->Observe(absl::ToDoubleSeconds(now - last_step));
    last_step = now;
    keeper->Progress(static_cast<int>(u.step), static_cast<int>(u.total), static_cast<float>(u.loss));
    return !stopping() && !keeper->cancel_requested() && !keeper->lost();
  };
  const absl::Time start = absl::Now();
  absl::StatusOr<TrainResult> result = engine_->Train(spec, progress);
  const absl::Duration took = absl::Now() - start;
  if (metrics_ != nullptr) metrics_->training_seconds->Observe(absl::ToDoubleSeconds(took));

  if (keeper->lost()) {
    LogEvent("training_dropped", {{"job", w.job_id()}, {"lease", item->lease_id()}});
    CountItem("training", "lost");
  } else if (result.ok()) {
    // The compute is done; what follows is delivering the result (which may wait for the server).
    LogEvent("training_finished", {{"job", w.job_id()},
                                   {"steps", std::to_string(result->steps)},
                                   {"seconds", Secs(took)}});
    v1::CompleteTrainingRequest req;
    req.set_lease_id(item->lease_id());
    req.set_concept_blob(result->blob);
    req.set_final_loss(static_cast<float>(result->final_loss));
    req.set_steps(static_cast<int32_t>(result->steps));
    *req.mutable_train_duration() = ToProto(took);
    v1::CompleteTrainingResponse resp;
    const absl::Time until =
        stopping() ? absl::Now() + options_.stop_grace
                   : std::max(item->retry_until(lease_duration_),
                              absl::Now() + options_.completion_retry);
    grpc::Status s = CallWithRetry("CompleteTraining", until, [&](grpc::ClientContext* ctx) {
      return stub_->CompleteTraining(ctx, req, &resp);
    });
    if (auto refused = RefusedResult("CompleteTraining", s)) {
      FailItem(item.get(), *refused);
    } else if (item->End(); s.ok()) {
      CountItem("training", "completed");
      LogEvent("training_completed", {{"job", w.job_id()},
                                      {"concept", resp.concept().id()},
                                      {"version", std::to_string(resp.concept().version())},
                                      {"steps", std::to_string(result->steps)},
                                      {"loss", absl::StrFormat("%.5f", result->final_loss)},
                                      {"seconds", Secs(took)},
                                      {"blob_bytes", std::to_string(result->blob.size())}});
    } else {
      CountItem("training", s.error_code() == grpc::StatusCode::NOT_FOUND ? "lost" : "failed");
      LogEvent("training_complete_error", {{"job", w.job_id()},
                                           {"code", CodeName(s.error_code())},
                                           {"error", s.error_message()}});
    }
  } else if (stopping()) {
    ReturnItem(item.get(), "worker shutting down");
  } else if (keeper->cancel_requested()) {
    FailItem(item.get(), absl::CancelledError("cancelled by the client"));
  } else {
    FailItem(item.get(), result.status());
  }
  item->keeper->Stop();
  if (metrics_ != nullptr) metrics_->busy->Set(0);
}

// ---- Generation ----

absl::Status Agent::FetchConcepts(HeldItem* item) {
  const v1::GenerationWork& g = item->work.generation();
  item->concepts.clear();
  for (const v1::WorkConcept& wc : g.concepts()) {
    std::shared_ptr<const std::string> blob = cache_->Get(wc.digest());
    if (blob != nullptr) {
      if (metrics_ != nullptr) metrics_->cache_hits->Inc();
    } else {
      if (metrics_ != nullptr) metrics_->cache_misses->Inc();
      v1::FetchConceptRequest req;
      req.set_digest(wc.digest());
      v1::FetchConceptResponse resp;
      grpc::Status s = CallWithRetry("FetchConcept", absl::Now() + lease_duration_ / 2,
                                     [&](grpc::ClientContext* ctx) {
                                       return stub_->FetchConcept(ctx, req, &resp);
                                     });
      if (!s.ok()) {
        // A server that did not answer in time (wait_for_ready turns "unreachable" into
        // DEADLINE_EXCEEDED) is not the request's deadline: UNAVAILABLE, so the work is retried
        // rather than failed as "deadline".
        const auto code = Transient(s.error_code()) ? absl::StatusCode::kUnavailable
                                                    : static_cast<absl::StatusCode>(s.error_code());
        return absl::Status(code, absl::StrCat("concept <", wc.reference(), "> (", wc.digest(), "): FetchConcept: ",
                                               CodeName(s.error_code()), ": ", s.error_message()));
      }
      const std::string got = Sha256Hex(resp.blob());
      if (got != wc.digest()) {
        return absl::DataLossError(absl::StrCat("concept <", wc.reference(), ">: fetched blob has digest ",
                                                got, ", expected ", wc.digest()));
      }
      LogEvent("concept_fetched", {{"digest", wc.digest()},
                                   {"concept", wc.concept_id()},
                                   {"bytes", std::to_string(resp.blob().size())}});
      blob = cache_->Put(wc.digest(), std::move(*resp.mutable_blob()));
    }
    ConceptUse u;
    u.reference = wc.reference();
    u.blob = *blob;
    u.digest = wc.digest();
    u.beta = wc.beta();
    u.temperature = wc.tau();
    if (wc.key_lock() != v1::KEY_LOCK_MODE_UNSPECIFIED) u.global_key_lock = wc.key_lock() == v1::KEY_LOCK_GLOBAL;
    item->concepts.push_back(std::move(u));
  }
  return absl::OkStatus();
}

void Agent::RunGenerations(std::vector<std::unique_ptr<HeldItem>> items) {
  if (metrics_ != nullptr) metrics_->busy->Set(1);
  std::vector<HeldItem*> ready;
  for (auto& item : items) {
    if (stopping()) {  // fetch nothing more: hand the rest back within the grace period
      ReturnItem(item.get(), "worker shutting down");
      continue;
    }
    if (absl::Now() > item->deadline) {
      FailItem(item.get(), absl::DeadlineExceededError("the request's deadline passed"));
      continue;
    }
    absl::Status s = FetchConcepts(item.get());
    if (!s.ok()) {
      if (item->keeper->lost()) {
        item->End();
        CountItem("generation", "lost");
      } else if (stopping()) {
        ReturnItem(item.get(), "worker shutting down");
      } else {
        FailItem(item.get(), s);
      }
      continue;
    }
    ready.push_back(item.get());
  }
  if (!ready.empty()) GenerateBatch(ready);
  for (auto& item : items) item->keeper->Stop();
  if (metrics_ != nullptr) metrics_->busy->Set(0);
}

void Agent::GenerateBatch(const std::vector<HeldItem*>& items) {
  // One engine request per item, all in one UNet batch. The engine makes image k of a request with
  // seed + k (the API's promise), and encodes each prompt once for all of its images.
  std::vector<GenerateSpec> specs;
  int64_t image_count = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const v1::GenerateRequest& r = items[i]->work.generation().request();
    GenerateSpec spec;
    spec.prompt = r.prompt();
    spec.negative_prompt = r.negative_prompt();
    spec.concepts = items[i]->concepts;
    if (r.has_steps()) spec.steps = r.steps();
    if (r.has_guidance_scale()) spec.guidance_scale = r.guidance_scale();
    if (r.has_guidance_rescale()) spec.guidance_rescale = r.guidance_rescale();
    spec.seed = r.has_seed() ? r.seed() : 0;
    spec.num_images = std::max(1, r.has_num_images() ? r.num_images() : 1);
    spec.width = r.has_width() ? r.width() : 0;
    spec.height = r.has_height() ? r.height() : 0;
    spec.sampler = r.sampler().empty() ? "ddim" : r.sampler();
    for (const auto& g : r.regions()) spec.regions.push_back({g.prompt(), g.x0(), g.y0(), g.x1(), g.y1()});
    image_count += spec.num_images;
    specs.push_back(std::move(spec));
  }
  auto alive = [&](const HeldItem* it) {
    return !it->keeper->cancel_requested() && !it->keeper->lost() && absl::Now() <= it->deadline;
  };
  auto progress = [&](int64_t step, int64_t total) {
    const double frac = total > 0 ? static_cast<double>(step) / static_cast<double>(total) : 0.0;
    bool any = false;
    for (HeldItem* it : items) {
      it->keeper->Progress(static_cast<int>(std::lround(frac * it->total_steps)), it->total_steps, 0);
      any = any || alive(it);
    }
    return any && !stopping();
  };
  LogEvent("generation_batch_started", {{"items", std::to_string(items.size())},
                                        {"images", std::to_string(image_count)}});
  const absl::Time start = absl::Now();
  absl::StatusOr<std::vector<GenerateResult>> results = engine_->Generate(specs, progress);
  const absl::Duration took = absl::Now() - start;
  if (metrics_ != nullptr) {
    metrics_->generation_seconds->Observe(absl::ToDoubleSeconds(took));
    metrics_->generation_batch_size->Observe(static_cast<double>(items.size()));
  }
  LogEvent("generation_batch_done",
           {{"items", std::to_string(items.size())},
            {"images", std::to_string(image_count)},
            {"seconds", Secs(took)},
            {"code", absl::StatusCodeToString(results.status().code())}});

  if (!results.ok()) {
    const absl::StatusCode code = results.status().code();
    if ((code == absl::StatusCode::kInvalidArgument || code == absl::StatusCode::kResourceExhausted) &&
        items.size() > 1 && !stopping()) {
      // Find the item(s) at fault, or run them in less memory: every item alone. Failing them all
      // on an out-of-memory error would requeue them together, lease them together again, and fail
      // small requests that fit alone once their attempts ran out.
      LogEvent("generation_batch_split", {{"error", std::string(results.status().message())}});
      for (HeldItem* it : items) {
        if (alive(it)) {
          GenerateBatch({it});
        } else if (it->keeper->lost()) {
          it->End();
          CountItem("generation", "lost");
        } else {
          FailItem(it, it->keeper->cancel_requested()
                           ? absl::CancelledError("cancelled by the client")
                           : absl::DeadlineExceededError("the request's deadline passed"));
        }
      }
      return;
    }
    for (HeldItem* it : items) {
      if (it->keeper->lost()) {
        it->End();
        CountItem("generation", "lost");
      } else if (stopping()) {
        ReturnItem(it, "worker shutting down");
      } else if (it->keeper->cancel_requested()) {
        FailItem(it, absl::CancelledError("cancelled by the client"));
      } else if (absl::Now() > it->deadline) {
        FailItem(it, absl::DeadlineExceededError("the request's deadline passed"));
      } else {
        FailItem(it, results.status());
      }
    }
    return;
  }
  std::vector<std::vector<v1::GeneratedImage>> images(items.size());
  for (size_t s = 0; s < results->size() && s < items.size(); ++s) {
    const GenerateResult& r = (*results)[s];
    for (size_t k = 0; k < r.pngs.size(); ++k) {
      v1::GeneratedImage img;
      img.set_png(r.pngs[k]);
      img.set_seed(k < r.seeds.size() ? r.seeds[k] : specs[s].seed + k);
      img.set_width(static_cast<int32_t>(r.width));
      img.set_height(static_cast<int32_t>(r.height));
      images[s].push_back(std::move(img));
    }
  }
  for (size_t i = 0; i < items.size(); ++i) {
    HeldItem* it = items[i];
    if (it->keeper->lost()) {
      it->End();
      CountItem("generation", "lost");
    } else if (it->keeper->cancel_requested()) {
      FailItem(it, absl::CancelledError("cancelled by the client"));
    } else if (absl::Now() > it->deadline) {
      FailItem(it, absl::DeadlineExceededError("the request's deadline passed"));
    } else {
      CompleteGenerationItem(it, std::move(images[i]), took);
    }
  }
}

// ---- Ending leases ----

absl::Time Agent::RetryUntil(absl::Time until) {
  absl::MutexLock lock(&mu_);
  return std::min(until, stop_deadline_);
}

grpc::Status Agent::CallWithRetry(const char* method, absl::Time until,
                                  const std::function<grpc::Status(grpc::ClientContext*)>& call) {
  absl::Duration backoff = options_.min_backoff;
  while (true) {
    // Re-read each round: a Stop() meanwhile brings the end forward to its grace period.
    const absl::Time end = RetryUntil(until);
    const absl::Duration left = end - absl::Now();
    // Stopping, every call ends within the grace period: once it is over, the remaining hand-backs
    // are not attempted (their leases expire on the server), rather than getting a second each.
    if (stopping() && left <= absl::ZeroDuration()) {
      return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "the worker's stop grace period is over");
    }
    grpc::ClientContext ctx;
    PrepareContext(&ctx, std::clamp(left, stopping() ? absl::Milliseconds(100) : absl::Seconds(1), options_.rpc_timeout));
    bool before_stop;
    {
      absl::MutexLock lock(&mu_);
      before_stop = !stopping();
      if (before_stop) calls_.insert(&ctx);
    }
    grpc::Status s = call(&ctx);
    if (before_stop) {
      absl::MutexLock lock(&mu_);
      calls_.erase(&ctx);
    }
    if (s.ok()) return s;
    // Cancelled by Stop(): try again, now within the grace period.
    const bool cut = before_stop && stopping() && s.error_code() == grpc::StatusCode::CANCELLED;
    if (cut) continue;
    CountError(method, s);
    if (!Transient(s.error_code()) || absl::Now() + backoff > RetryUntil(until)) return s;
    LogEvent("rpc_retry", {{"method", method},
                           {"code", CodeName(s.error_code())},
                           {"error", s.error_message()},
                           {"retry_in", Secs(backoff)}});
    // Before Stop(), a Stop() ends the wait early, so the call can re-check its end.
    if (stopping()) {
      absl::SleepFor(backoff);
    } else {
      stop_.WaitForNotificationWithTimeout(backoff);
    }
    backoff = std::min(backoff * 2, options_.max_backoff);
  }
}

void Agent::FailItem(HeldItem* item, const absl::Status& status) {
  const char* kind = item->training() ? "training" : "generation";
  v1::FailWorkRequest req;
  req.set_lease_id(item->lease_id());
  req.set_code(static_cast<int32_t>(status.code()));
  req.set_message(std::string(status.message()));
  req.set_retryable(Retryable(status.code()));
  v1::FailWorkResponse resp;
  const absl::Time until =
      stopping() ? absl::Now() + options_.stop_grace
                 : std::max(item->retry_until(lease_duration_),
                            absl::Now() + heartbeat_interval_);
  grpc::Status s = CallWithRetry("FailWork", until, [&](grpc::ClientContext* ctx) {
    return stub_->FailWork(ctx, req, &resp);
  });
  item->End();
  CountItem(kind, status.code() == absl::StatusCode::kCancelled ? "cancelled" : "failed");
  LogEvent("work_failed", {{item->training() ? "job" : "generation", item->id()},
                           {"lease", item->lease_id()},
                           {"code", absl::StatusCodeToString(status.code())},
                           {"retryable", req.retryable() ? "true" : "false"},
                           {"error", std::string(status.message())},
                           {"reported", s.ok() ? "true" : CodeName(s.error_code())}});
}

void Agent::ReturnItem(HeldItem* item, const std::string& reason) {
  v1::ReturnLeaseRequest req;
  req.set_lease_id(item->lease_id());
  req.set_reason(reason);
  v1::ReturnLeaseResponse resp;
  grpc::Status s = CallWithRetry("ReturnLease", absl::Now() + options_.stop_grace,
                                 [&](grpc::ClientContext* ctx) {
                                   return stub_->ReturnLease(ctx, req, &resp);
                                 });
  item->End();
  CountItem(item->training() ? "training" : "generation", "returned");
  LogEvent("work_returned", {{item->training() ? "job" : "generation", item->id()},
                             {"lease", item->lease_id()},
                             {"reason", reason},
                             {"reported", s.ok() ? "true" : CodeName(s.error_code())}});
}

void Agent::CompleteGenerationItem(HeldItem* item, std::vector<v1::GeneratedImage> images,
                                   absl::Duration compute) {
  v1::CompleteGenerationRequest req;
  req.set_lease_id(item->lease_id());
  const size_t n = images.size();
  for (auto& img : images) *req.add_images() = std::move(img);
  *req.mutable_compute_duration() = ToProto(compute);
  v1::CompleteGenerationResponse resp;
  const absl::Time until =
      stopping() ? absl::Now() + options_.stop_grace : item->retry_until(heartbeat_interval_);
  grpc::Status s = CallWithRetry("CompleteGeneration", until, [&](grpc::ClientContext* ctx) {
    return stub_->CompleteGeneration(ctx, req, &resp);
  });
  if (auto refused = RefusedResult("CompleteGeneration", s)) {
    FailItem(item, *refused);
    return;
  }
  item->End();
  CountItem("generation", s.ok() ? "completed"
                                 : s.error_code() == grpc::StatusCode::NOT_FOUND ? "lost" : "failed");
  LogEvent("generation_completed", {{"generation", item->id()},
                                    {"lease", item->lease_id()},
                                    {"images", std::to_string(n)},
                                    {"seconds", Secs(absl::Now() - item->leased_at)},
                                    {"reported", s.ok() ? "true" : CodeName(s.error_code())}});
}

}  // namespace perfusion::worker

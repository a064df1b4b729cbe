#include "server/scheduler.h"

#include <algorithm>
#include <iterator>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "server/concept_blob.h"
#include "server/log.h"
#include "server/status_util.h"

namespace perfusion::server {
namespace {

// Every WorkerService call on a lease the scheduler no longer holds answers this.
absl::Status LeaseNotFound(const std::string& lease_id) {
  return absl::NotFoundError(
      absl::StrCat("lease_id: lease \"", lease_id, "\" is unknown or expired; drop the work"));
}

std::string Secs(absl::Duration d) { return absl::StrCat(absl::ToDoubleSeconds(d)); }

// The concept a successful training lease stores.
ConceptRecord ConceptFor(const JobRecord& rec, const ConceptBlobHeader& header,
                         const std::string& digest, size_t size, absl::Time now) {
  ConceptRecord concept;
  concept.id = NewId("cpt_");
  concept.tenant = rec.tenant;
  concept.name = rec.concept_name;
  concept.superclass = rec.superclass;
  concept.base_model_id = header.base_model_id;
  concept.digest = digest;
  concept.size_bytes = static_cast<int64_t>(size);
  concept.format_version = header.format_version;
  concept.dtype = header.dtype;
  concept.labels = rec.labels;
  concept.source_job_id = rec.id;
  concept.create_time = now;
  return concept;
}

void MarkSucceeded(JobRecord& rec, float final_loss, int steps, absl::Time now) {
  rec.state = JobState::kSucceeded;
  if (steps > 0) rec.step = rec.total_steps = steps;
  rec.loss = final_loss;
  rec.end_time = now;
  rec.update_time = now;
  rec.error_code = 0;
  rec.error_message.clear();
  rec.lease_id.clear();
  rec.lease_deadline = absl::InfinitePast();
}

// A blob a worker returned that this server cannot store (OK when usable).
absl::Status CheckReturnedBlob(const absl::StatusOr<ConceptBlobHeader>& header,
                               const std::string& base_model_id) {
  if (!header.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("concept_blob: ", header.status().message()));
  }
  if (header->base_model_id != base_model_id) {
    return absl::FailedPreconditionError(
        absl::StrCat("concept_blob: base_model_id \"", header->base_model_id,
                     "\" is not the server's \"", base_model_id, "\""));
  }
  return absl::OkStatus();
}

const char* OutcomeOf(JobState s) {
  switch (s) {
    case JobState::kSucceeded: return "succeeded";
    case JobState::kFailed: return "failed";
    default: return "cancelled";
  }
}

}  // namespace

std::string TrainingRequestHash(const TrainingRequest& r) {
  std::string canon = absl::StrCat(r.concept_name, "\n", r.superclass, "\n",
                                   TrainingOptionsToJson(r.options), "\n", r.priority, "\n",
                                   LabelsToJson(r.labels), "\n", r.images.size(), "\n");
  for (const auto& img : r.images) absl::StrAppend(&canon, Sha256Hex(img), "\n");
  return Sha256Hex(canon);
}

Scheduler::Scheduler(Store* store, const Clock* clock, SchedulerOptions options,
                     ServerMetrics* metrics)
    : store_(store), clock_(clock), options_(std::move(options)), metrics_(metrics) {}

Scheduler::~Scheduler() = default;

void Scheduler::Run(Pending& pending) {
  for (auto& fn : pending) fn();
  pending.clear();
}

absl::Status Scheduler::Load() {
  if (options_.shared_store) {
    // Nothing to restore: the store holds the queue and the leases. Take the first snapshot.
    Pending pending;
    {
      absl::MutexLock lock(&mu_);
      RETURN_IF_ERROR(SyncSharedLocked(pending));
      next_sync_ = clock_->Now() + options_.shared_poll_interval;
      UpdateGaugesLocked();
      LogEvent("scheduler_loaded", {{"mode", "shared_store"},
                                    {"queued", std::to_string(queue_.size())}});
    }
    Run(pending);
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(std::vector<JobRecord> jobs, store_->ListActiveJobs());
  absl::MutexLock lock(&mu_);
  const absl::Time now = clock_->Now();
  int restored_leases = 0;
  for (JobRecord& j : jobs) {
    if (j.state != JobState::kQueued && j.lease_id.empty()) {
      // Running without a lease cannot happen; treat it as returned.
      if (j.state == JobState::kCancelling) {
        FinishJobLocked(j, JobState::kCancelled, absl::CancelledError("cancelled by the client"));
      } else {
        RequeueJobLocked(j);
      }
      j.update_time = now;
      RETURN_IF_ERROR(store_->UpdateJob(j));
      if (IsFinal(j.state)) {
        CountOutcome(j.state);  // as every other path that ends a job
        LogJobFinished(j);
        continue;
      }
    }
    if (j.state == JobState::kQueued) {
      queue_.insert(KeyOf(j));
    } else {
      // Keep the lease: its worker may still be training and will heartbeat once we are back.
      Lease l{j.lease_id, true, j.id, j.worker_id, now + options_.lease_duration, now, false};
      j.lease_deadline = l.deadline;
      leases_[l.id] = l;
      RETURN_IF_ERROR(store_->UpdateJob(j));
      ++restored_leases;
    }
    ++active_per_tenant_[j.tenant];
    active_[j.id] = ActiveJob{j, {}};
  }
  UpdateGaugesLocked();
  LogEvent("scheduler_loaded", {{"active_jobs", std::to_string(active_.size())},
                                {"queued", std::to_string(queue_.size())},
                                {"leases", std::to_string(restored_leases)}});
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Views and notifications

int Scheduler::QueuePositionLocked(const JobRecord& j) const {
  auto it = queue_.find(KeyOf(j));
  if (it == queue_.end()) return 0;
  return static_cast<int>(std::distance(queue_.begin(), it)) + 1;
}

JobView Scheduler::ViewLocked(const JobRecord& j) {
  JobView v;
  v.job = j;
  v.event_seq = ++event_seq_;
  const absl::Time now = clock_->Now();
  if (j.state == JobState::kQueued) {
    v.queue_position = QueuePositionLocked(j);
    if (avg_training_seconds_ > 0 && v.queue_position > 0) {
      v.eta = absl::Seconds(avg_training_seconds_ * v.queue_position);
    }
  } else if ((j.state == JobState::kRunning || j.state == JobState::kCancelling) && j.step > 0 &&
             j.total_steps >= j.step) {
    auto l = leases_.find(j.lease_id);
    const absl::Time granted = l != leases_.end() ? l->second.granted
                               : options_.shared_store ? j.start_time
                                                       : absl::InfinitePast();
    if (granted != absl::InfinitePast() && now > granted) {
      v.eta = (now - granted) * (static_cast<double>(j.total_steps - j.step) / j.step);
    }
  }
  return v;
}

void Scheduler::NotifyJobLocked(const std::string& job_id, Pending& out) {
  auto it = active_.find(job_id);
  if (it == active_.end() || it->second.watchers.empty()) return;
  JobView v = ViewLocked(it->second.rec);
  for (uint64_t w : it->second.watchers) {
    auto wit = watchers_.find(w);
    if (wit == watchers_.end()) continue;
    out.push_back([fn = wit->second.fn, v] { fn(v); });
  }
}

void Scheduler::NotifyQueuedLocked(Pending& out) {
  for (const QueueKey& key : queue_) NotifyJobLocked(std::get<2>(key), out);
}

void Scheduler::NotifyGenQueueLocked(Pending& out) {
  int pos = 0;
  for (const std::string& id : gen_queue_) {
    ++pos;
    GenItem& g = gen_items_[id];
    if (g.last_position == pos || !g.callbacks.on_progress) continue;
    g.last_position = pos;
    GenerationProgress p{pos, 0, 0, ++event_seq_};
    out.push_back([fn = g.callbacks.on_progress, p] { fn(p); });
  }
}

void Scheduler::UpdateGaugesLocked() {
  if (!metrics_) return;
  metrics_->training_queue_depth->Set(static_cast<double>(queue_.size()));
  metrics_->generate_queue_depth->Set(static_cast<double>(gen_queue_.size()));
  int connected = 0;
  for (const auto& [id, w] : workers_) connected += ConnectedLocked(w);
  metrics_->workers_connected->Set(connected);
}

void Scheduler::CountOutcome(JobState state) {
  if (metrics_) metrics_->training_jobs_total->WithLabels({OutcomeOf(state)}).Inc();
}

// ---------------------------------------------------------------------------------------------
// Job state changes

void Scheduler::FinishJobLocked(JobRecord& rec, JobState state, const absl::Status& error) {
  rec.state = state;
  rec.end_time = clock_->Now();
  rec.error_code = static_cast<int>(error.code());
  rec.error_message = std::string(error.message());
  rec.lease_id.clear();
  rec.lease_deadline = absl::InfinitePast();
}

bool Scheduler::ExpireLeaseLocked(JobRecord& rec) {
  if (rec.state == JobState::kCancelling) {
    FinishJobLocked(rec, JobState::kCancelled, absl::CancelledError("cancelled by the client"));
    return false;
  }
  if (rec.attempts < options_.max_attempts) {
    RequeueJobLocked(rec);
    return true;
  }
  FinishJobLocked(rec, JobState::kFailed,
                  absl::UnavailableError(absl::StrCat("the worker stopped heartbeating on all ",
                                                      rec.attempts,
                                                      " attempts (lease expired); giving up")));
  return false;
}

void Scheduler::RequeueJobLocked(JobRecord& rec) {
  rec.state = JobState::kQueued;
  rec.lease_id.clear();
  rec.worker_id.clear();
  rec.lease_deadline = absl::InfinitePast();
  rec.step = 0;
  rec.loss = 0;
}

absl::Status Scheduler::SaveLeftJobLocked(const JobRecord& rec, bool requeue, Pending& out) {
  if (requeue) queue_.insert(KeyOf(rec));
  absl::Status saved = SaveJobLocked(rec, out);
  if (!saved.ok() && requeue) queue_.erase(KeyOf(rec));
  return saved;
}

absl::Status Scheduler::SaveJobLocked(JobRecord rec, Pending& out, bool persist) {
  rec.update_time = clock_->Now();
  if (persist) RETURN_IF_ERROR(store_->UpdateJob(rec));
  auto it = active_.find(rec.id);
  if (it == active_.end()) return absl::OkStatus();
  it->second.rec = rec;
  if (!IsFinal(rec.state)) {
    NotifyJobLocked(rec.id, out);
    return absl::OkStatus();
  }
  JobView v = ViewLocked(rec);
  for (uint64_t w : it->second.watchers) {
    auto wit = watchers_.find(w);
    if (wit == watchers_.end()) continue;
    out.push_back([fn = std::move(wit->second.fn), v] { fn(v); });
    watchers_.erase(wit);
  }
  if (--active_per_tenant_[rec.tenant] <= 0) active_per_tenant_.erase(rec.tenant);
  active_.erase(it);
  CountOutcome(rec.state);
  LogJobFinished(rec);
  return absl::OkStatus();
}

void Scheduler::LogJobFinished(const JobRecord& rec) {
  LogEvent("job_finished", {{"job", rec.id},
                            {"tenant", rec.tenant},
                            {"state", JobStateName(rec.state)},
                            {"attempts", std::to_string(rec.attempts)},
                            {"concept", rec.concept_id},
                            {"error", rec.error_message}});
}

// ---------------------------------------------------------------------------------------------
// Training API

absl::StatusOr<JobView> Scheduler::SubmitTraining(const std::string& tenant,
                                                  TrainingRequest request) {
  const std::string hash = TrainingRequestHash(request);
  if (!request.options.seed) {
    // Fixed at submission (after hashing, so retries of the same request still match), so that
    // every attempt of the job trains with the same seed.
    thread_local absl::BitGen gen;
    request.options.seed = absl::Uniform<uint64_t>(gen) >> 1;
  }
  Pending pending;
  JobView view;
  {
    absl::MutexLock lock(&mu_);
    if (draining_) {
      return absl::UnavailableError("server is draining; retry later");
    }
    if (!request.request_id.empty()) {
      ASSIGN_OR_RETURN(std::optional<JobRecord> existing,
                       store_->FindJobByRequestId(tenant, request.request_id));
      if (existing) {
        if (existing->request_hash != hash) {
          return absl::AlreadyExistsError(
              absl::StrCat("request_id: \"", request.request_id,
                           "\" was already used for a different request (job ", existing->id,
                           ")"));
        }
        auto a = active_.find(existing->id);
        return ViewLocked(a != active_.end() ? a->second.rec : *existing);
      }
    }
    auto t = active_per_tenant_.find(tenant);
    int active = t == active_per_tenant_.end() ? 0 : t->second;
    if (active >= options_.tenant_max_jobs) {
      return absl::ResourceExhaustedError(
          absl::StrCat("tenant quota: ", active, " active training jobs (limit ",
                       options_.tenant_max_jobs, "); wait for some to finish or cancel them"));
    }
    if (static_cast<int>(queue_.size()) >= options_.max_queue) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "training queue full (", queue_.size(), " jobs queued); retry later"));
    }
    // Each active job stores one concept when it succeeds, and a completed training is never thrown
    // away for the quota: so the jobs in flight count against it already, or a tenant at its
    // limit could still queue tenant_max_jobs more concepts.
    ASSIGN_OR_RETURN(int64_t concepts, store_->CountConcepts(tenant));
    if (concepts + active >= options_.tenant_max_concepts) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "tenant quota: ", concepts, " concepts stored", active > 0 ? absl::StrCat(" and ", active, " in training") : "",
          " (limit ", options_.tenant_max_concepts, "); delete some first"));
    }
    JobRecord j;
    j.id = NewId("job_");
    j.tenant = tenant;
    j.request_id = request.request_id;
    j.request_hash = hash;
    j.concept_name = request.concept_name;
    j.superclass = request.superclass;
    j.options = request.options;
    j.labels = request.labels;
    j.priority = request.priority;
    j.state = JobState::kQueued;
    j.image_count = static_cast<int>(request.images.size());
    j.total_steps = request.options.steps.value_or(0);
    j.create_time = j.update_time = clock_->Now();
    absl::StatusOr<JobRecord> inserted = store_->InsertJob(j, request.images);
    if (!inserted.ok() && inserted.status().code() == absl::StatusCode::kAlreadyExists &&
        !request.request_id.empty()) {
      // Another replica (or a concurrent call) inserted this request_id a moment ago.
      ASSIGN_OR_RETURN(std::optional<JobRecord> existing,
                       store_->FindJobByRequestId(tenant, request.request_id));
      if (existing && existing->request_hash == hash) {
        auto a = active_.find(existing->id);
        return ViewLocked(a != active_.end() ? a->second.rec : *existing);
      }
    }
    RETURN_IF_ERROR(inserted.status());
    j = *std::move(inserted);
    if (!options_.shared_store) active_[j.id] = ActiveJob{j, {}};
    ++active_per_tenant_[tenant];
    queue_.insert(KeyOf(j));
    LogEvent("job_submitted", {{"job", j.id},
                               {"tenant", tenant},
                               {"request_id", j.request_id},
                               {"concept", j.concept_name},
                               {"images", std::to_string(j.image_count)},
                               {"priority", std::to_string(j.priority)}});
    DispatchLocked(pending);
    NotifyQueuedLocked(pending);
    UpdateGaugesLocked();
    auto a = active_.find(j.id);
    view = ViewLocked(a != active_.end() ? a->second.rec : j);
  }
  Run(pending);
  return view;
}

absl::StatusOr<JobView> Scheduler::GetJob(const std::string& tenant, const std::string& id) {
  {
    absl::MutexLock lock(&mu_);
    auto it = active_.find(id);
    if (it != active_.end()) {
      if (it->second.rec.tenant != tenant) {
        return absl::NotFoundError(absl::StrCat("job ", id, " not found"));
      }
      return ViewLocked(it->second.rec);
    }
  }
  ASSIGN_OR_RETURN(JobRecord rec, store_->GetJob(id));
  if (rec.tenant != tenant) return absl::NotFoundError(absl::StrCat("job ", id, " not found"));
  absl::MutexLock lock(&mu_);
  auto it = active_.find(id);  // it may have been re-activated meanwhile (it cannot; be safe)
  return ViewLocked(it != active_.end() ? it->second.rec : rec);
}

absl::StatusOr<Page<JobView>> Scheduler::ListJobs(const std::string& tenant,
                                                  std::optional<JobState> state, int page_size,
                                                  const std::string& page_token) {
  ASSIGN_OR_RETURN(Page<JobRecord> page, store_->ListJobs(tenant, state, page_size, page_token));
  Page<JobView> out;
  out.next_page_token = page.next_page_token;
  absl::MutexLock lock(&mu_);
  for (const JobRecord& rec : page.items) {
    auto it = active_.find(rec.id);
    out.items.push_back(ViewLocked(it != active_.end() ? it->second.rec : rec));
  }
  return out;
}

absl::StatusOr<JobView> Scheduler::CancelJob(const std::string& tenant, const std::string& id) {
  if (options_.shared_store) return SharedCancel(tenant, id);
  Pending pending;
  JobView view;
  {
    absl::MutexLock lock(&mu_);
    auto it = active_.find(id);
    if (it == active_.end() || it->second.rec.tenant != tenant) {
      if (it != active_.end()) return absl::NotFoundError(absl::StrCat("job ", id, " not found"));
      ASSIGN_OR_RETURN(JobRecord rec, store_->GetJob(id));
      if (rec.tenant != tenant) return absl::NotFoundError(absl::StrCat("job ", id, " not found"));
      return absl::FailedPreconditionError(
          absl::StrCat("job ", id, " is already ", JobStateName(rec.state),
                       "; only QUEUED or RUNNING jobs can be cancelled"));
    }
    JobRecord rec = it->second.rec;
    if (rec.state == JobState::kQueued) {
      FinishJobLocked(rec, JobState::kCancelled, absl::CancelledError("cancelled by the client"));
      RETURN_IF_ERROR(SaveJobLocked(rec, pending));
      queue_.erase(KeyOf(rec));  // `it` is gone: a final job left the active set
      NotifyQueuedLocked(pending);
      UpdateGaugesLocked();
    } else if (rec.state == JobState::kRunning) {
      rec.state = JobState::kCancelling;
      RETURN_IF_ERROR(SaveJobLocked(rec, pending));
      LogEvent("job_cancelling", {{"job", id}, {"tenant", tenant}, {"lease", rec.lease_id}});
    }
    view = ViewLocked(rec);
  }
  Run(pending);
  return view;
}

absl::StatusOr<uint64_t> Scheduler::Watch(const std::string& tenant, const std::string& id,
                                          WatchCallback fn) {
  if (options_.shared_store) return SharedWatch(tenant, id, std::move(fn));
  Pending pending;
  uint64_t watch_id = 0;
  {
    absl::MutexLock lock(&mu_);
    if (draining_) return absl::UnavailableError("server is draining; retry later");
    auto it = active_.find(id);
    if (it != active_.end()) {
      if (it->second.rec.tenant != tenant) {
        return absl::NotFoundError(absl::StrCat("job ", id, " not found"));
      }
      RETURN_IF_ERROR(CheckWatchQuotaLocked(tenant));
      watch_id = next_id_++;
      watchers_[watch_id] = Watcher{id, fn, tenant};
      it->second.watchers.insert(watch_id);
      JobView v = ViewLocked(it->second.rec);
      pending.push_back([fn, v] { fn(v); });
    }
  }
  if (watch_id == 0) {
    ASSIGN_OR_RETURN(JobRecord rec, store_->GetJob(id));
    if (rec.tenant != tenant) return absl::NotFoundError(absl::StrCat("job ", id, " not found"));
    absl::MutexLock lock(&mu_);
    JobView v = ViewLocked(rec);
    pending.push_back([fn, v] { fn(v); });
  }
  Run(pending);
  return watch_id;
}

absl::Status Scheduler::CheckWatchQuotaLocked(const std::string& tenant) const {
  const auto open = std::count_if(watchers_.begin(), watchers_.end(),
                                  [&](const auto& w) { return w.second.tenant == tenant; });
  if (open >= options_.tenant_max_watches) {
    return absl::ResourceExhaustedError(absl::StrCat("tenant has ", open, " open job watches (max ",
                                                     options_.tenant_max_watches, "); close some first"));
  }
  return absl::OkStatus();
}

void Scheduler::Unwatch(uint64_t watch_id) {
  absl::MutexLock lock(&mu_);
  auto it = watchers_.find(watch_id);
  if (it == watchers_.end()) return;
  const std::string job_id = it->second.job_id;
  auto a = active_.find(job_id);
  if (a != active_.end()) a->second.watchers.erase(watch_id);
  watchers_.erase(it);
  if (options_.shared_store &&
      std::none_of(watchers_.begin(), watchers_.end(),
                   [&](const auto& w) { return w.second.job_id == job_id; })) {
    shared_watched_.erase(job_id);
  }
}

// ---------------------------------------------------------------------------------------------
// Generation API

absl::StatusOr<std::string> Scheduler::SubmitGeneration(const std::string& tenant,
                                                        GenerationSpec spec, absl::Time deadline,
                                                        GenerationCallbacks callbacks) {
  Pending pending;
  std::string id = NewId("gen_");
  {
    absl::MutexLock lock(&mu_);
    if (draining_) return absl::UnavailableError("server is draining; retry later");
    int generators = 0, regional = 0;
    for (const auto& [wid, w] : workers_) {
      generators += ConnectedLocked(w) && w.caps.generation;
      regional += ConnectedLocked(w) && w.caps.generation && w.caps.regions;
    }
    if (generators == 0) {
      return absl::UnavailableError(
          absl::StrCat("no generation worker is connected for base model \"",
                       options_.base_model_id, "\"; retry later"));
    }
    if (!spec.request.regions.empty() && regional == 0) {
      return absl::UnavailableError(
          "regions: no connected generation worker supports regional prompts (the workers predate "
          "them; upgrade perfusion-worker, or retry later)");
    }
    if (static_cast<int>(gen_items_.size()) >= options_.max_generation_queue) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "generation queue full (", gen_items_.size(), " requests); retry later"));
    }
    auto t = gen_per_tenant_.find(tenant);
    if (t != gen_per_tenant_.end() && t->second >= options_.tenant_max_generations) {
      return absl::ResourceExhaustedError(
          absl::StrCat("tenant quota: ", t->second, " generation requests in flight (limit ",
                       options_.tenant_max_generations, ")"));
    }
    const absl::Time now = clock_->Now();
    GenItem g;
    g.id = id;
    g.tenant = tenant;
    g.spec = std::move(spec);
    g.callbacks = std::move(callbacks);
    g.submitted = now;
    g.deadline = std::min(deadline, now + options_.max_generation_time);
    if (metrics_) metrics_->generate_concepts->Observe(static_cast<double>(g.spec.concepts.size()));
    gen_items_[id] = std::move(g);
    gen_queue_.push_back(id);
    ++gen_per_tenant_[tenant];
    LogEvent("generation_submitted",
             {{"generation", id}, {"tenant", tenant},
              {"concepts", std::to_string(gen_items_[id].spec.concepts.size())},
              {"images", std::to_string(gen_items_[id].spec.request.num_images.value_or(1))}});
    NotifyGenQueueLocked(pending);
    DispatchLocked(pending);
    UpdateGaugesLocked();
  }
  Run(pending);
  return id;
}

void Scheduler::FinishGenLocked(std::string id, absl::StatusOr<GenerationResult> result,
                                const char* outcome, Pending& out) {
  auto it = gen_items_.find(id);
  if (it == gen_items_.end()) return;
  GenItem g = std::move(it->second);
  gen_items_.erase(it);
  auto q = std::find(gen_queue_.begin(), gen_queue_.end(), id);
  if (q != gen_queue_.end()) gen_queue_.erase(q);
  if (!g.lease_id.empty()) {
    auto l = leases_.find(g.lease_id);
    if (l != leases_.end()) {
      if (result.ok()) {
        leases_.erase(l);
      } else {
        l->second.orphaned = true;  // the worker learns it from its next heartbeat
      }
    }
  }
  if (--gen_per_tenant_[g.tenant] <= 0) gen_per_tenant_.erase(g.tenant);
  const absl::Time now = clock_->Now();
  if (metrics_) {
    metrics_->generate_requests_total->WithLabels({outcome}).Inc();
    if (result.ok()) {
      metrics_->generate_compute_seconds->Observe(
          absl::ToDoubleSeconds(result->compute_duration));
    }
    // Latency counts every request the service ended, failed or late ones too (leaving those out
    // made the latency alert improve just as clients started timing out); a client's own cancel
    // says nothing about the service's speed.
    if (absl::string_view(outcome) != "cancelled") {
      metrics_->generate_seconds->Observe(absl::ToDoubleSeconds(now - g.submitted));
      if (g.leased == absl::InfinitePast()) {  // it never left the queue
        metrics_->generate_queue_seconds->Observe(absl::ToDoubleSeconds(now - g.submitted));
      }
    }
  }
  LogEvent("generation_finished",
           {{"generation", id},
            {"tenant", g.tenant},
            {"outcome", outcome},
            {"seconds", Secs(now - g.submitted)},
            {"error", result.ok() ? "" : std::string(result.status().message())}});
  if (g.callbacks.on_done) {
    out.push_back([fn = std::move(g.callbacks.on_done), r = std::move(result)]() mutable {
      fn(std::move(r));
    });
  }
  NotifyGenQueueLocked(out);
  UpdateGaugesLocked();
}

void Scheduler::CancelGeneration(const std::string& id, bool deadline_passed) {
  Pending pending;
  {
    absl::MutexLock lock(&mu_);
    if (deadline_passed) {
      FinishGenLocked(id, absl::DeadlineExceededError("the call's deadline passed before the generation finished"),
                      "deadline", pending);
    } else {
      FinishGenLocked(id, absl::CancelledError("cancelled by the client"), "cancelled", pending);
    }
  }
  Run(pending);
}

// ---------------------------------------------------------------------------------------------
// Workers and leases

bool Scheduler::ConnectedLocked(const Worker& w) const {
  return w.waiting > 0 || clock_->Now() - w.last_seen <= options_.worker_timeout;
}

absl::StatusOr<std::string> Scheduler::RegisterWorker(const std::string& name,
                                                      const std::string& base_model_id,
                                                      WorkerCapabilities caps) {
  if (base_model_id != options_.base_model_id) {
    return absl::FailedPreconditionError(
        absl::StrCat("base_model_id: the worker has \"", base_model_id,
                     "\" but this server serves \"", options_.base_model_id, "\""));
  }
  if (!caps.training && !caps.generation) {
    return absl::InvalidArgumentError("capabilities: neither training nor generation");
  }
  absl::MutexLock lock(&mu_);
  Worker w;
  w.id = NewId("wkr_");
  w.name = name;
  w.caps = std::move(caps);
  w.last_seen = clock_->Now();
  workers_[w.id] = w;
  UpdateGaugesLocked();
  LogEvent("worker_registered", {{"worker", w.id},
                                 {"name", name},
                                 {"training", w.caps.training ? "true" : "false"},
                                 {"generation", w.caps.generation ? "true" : "false"},
                                 {"device", w.caps.device}});
  return w.id;
}

std::optional<WorkItem> Scheduler::GrantLocked(const Worker& worker, Pending& out,
                                               bool probe_store, bool generation_only) {
  const absl::Time now = clock_->Now();
  // The oldest generation this worker can run: one with regions needs a worker that knows them.
  auto runnable = gen_queue_.end();
  if (worker.caps.generation) {
    runnable = std::find_if(gen_queue_.begin(), gen_queue_.end(), [&](const std::string& id) {
      return worker.caps.regions || gen_items_.at(id).spec.request.regions.empty();
    });
  }
  if (runnable != gen_queue_.end()) {
    std::string id = *runnable;
    gen_queue_.erase(runnable);
    GenItem& g = gen_items_[id];
    Lease l{NewId("lease_"), false, id, worker.id, now + options_.lease_duration, now, false};
    leases_[l.id] = l;
    g.lease_id = l.id;
    // The first lease only: a returned lease gives its attempt back, and attempts == 0 again
    // would count the wait twice.
    if (g.leased == absl::InfinitePast() && metrics_) {
      metrics_->generate_queue_seconds->Observe(absl::ToDoubleSeconds(now - g.submitted));
    }
    if (g.leased == absl::InfinitePast()) g.leased = now;
    ++g.attempts;
    g.last_position = 0;
    if (g.callbacks.on_progress) {
      GenerationProgress p{0, 0, 0, ++event_seq_};
      out.push_back([fn = g.callbacks.on_progress, p] { fn(p); });
    }
    NotifyGenQueueLocked(out);
    UpdateGaugesLocked();
    LogEvent("generation_leased", {{"generation", id}, {"lease", l.id}, {"worker", worker.id}});
    WorkItem w;
    w.lease_id = l.id;
    w.lease_deadline = l.deadline;
    w.generation = GenerationWorkItem{g.id, g.tenant, g.spec, g.deadline};
    return w;
  }
  if (generation_only) return std::nullopt;
  if (options_.shared_store) {
    if (worker.caps.training && !draining_ && (probe_store || !queue_.empty())) {
      return GrantSharedTrainingLocked(worker, out);
    }
    return std::nullopt;
  }
  if (worker.caps.training && !draining_ && !queue_.empty()) {
    QueueKey key = *queue_.begin();
    const std::string id = std::get<2>(key);
    JobRecord rec = active_[id].rec;
    Lease l{NewId("lease_"), true, id, worker.id, now + options_.lease_duration, now, false};
    rec.state = JobState::kRunning;
    ++rec.attempts;
    rec.lease_id = l.id;
    rec.worker_id = worker.id;
    rec.lease_deadline = l.deadline;
    rec.step = 0;
    rec.loss = 0;
    bool first = rec.start_time == absl::InfinitePast();
    if (first) rec.start_time = now;
    leases_[l.id] = l;
    queue_.erase(key);
    if (absl::Status s = SaveJobLocked(rec, out); !s.ok()) {
      leases_.erase(l.id);
      queue_.insert(key);
      LogEvent("lease_store_error", {{"job", id}, {"error", std::string(s.message())}});
      return std::nullopt;
    }
    if (first && metrics_) {
      metrics_->training_queue_wait->Observe(absl::ToDoubleSeconds(now - rec.create_time));
    }
    NotifyQueuedLocked(out);
    UpdateGaugesLocked();
    LogEvent("job_leased", {{"job", id},
                            {"lease", l.id},
                            {"worker", worker.id},
                            {"attempt", std::to_string(rec.attempts)}});
    WorkItem w;
    w.lease_id = l.id;
    w.lease_deadline = l.deadline;
    w.training = TrainingWorkItem{rec, {}};
    return w;
  }
  return std::nullopt;
}

std::function<void()> Scheduler::DeliverLease(LeaseCallback done, std::optional<WorkItem> item) {
  return [this, done = std::move(done), item = std::move(item)]() mutable {
    if (item && item->training) {
      auto images = store_->GetJobImages(item->training->job.id);
      if (!images.ok()) {
        if (images.status().code() == absl::StatusCode::kNotFound) {
          LogEvent("lease_images_lost", {{"job", item->training->job.id},
                                         {"error", std::string(images.status().message())}});
          (void)FailWork(item->lease_id,
                         absl::DataLossError(absl::StrCat("training images lost: ",
                                                          images.status().message())),
                         /*retryable=*/false);
        } else {
          // The store failed for a moment (a database failover's broken connection, a busy
          // SQLite): the images are still there. Hand the job back to the queue, attempts
          // unchanged, rather than fail it for good and delete them.
          LogEvent("lease_images_unavailable", {{"job", item->training->job.id},
                                                {"error", std::string(images.status().message())}});
          (void)ReturnLease(item->lease_id);
        }
        done(std::nullopt);
        return;
      }
      item->training->images = *std::move(images);
    }
    done(std::move(item));
  };
}

void Scheduler::DispatchLocked(Pending& out) {
  for (auto it = waiters_.begin(); it != waiters_.end();) {
    if (gen_queue_.empty() && (queue_.empty() || draining_)) break;
    auto w = workers_.find(it->second.worker_id);
    if (w == workers_.end()) {
      ++it;
      continue;
    }
    std::optional<WorkItem> item = GrantLocked(w->second, out, /*probe_store=*/false, it->second.generation_only);
    if (!item) {
      ++it;
      continue;
    }
    --w->second.waiting;
    w->second.last_seen = clock_->Now();
    out.push_back(DeliverLease(std::move(it->second.done), std::move(item)));
    it = waiters_.erase(it);
  }
}

absl::StatusOr<uint64_t> Scheduler::LeaseWork(const std::string& worker_id, absl::Duration wait,
                                              LeaseCallback done, bool generation_only) {
  Pending pending;
  uint64_t waiter_id = 0;
  {
    absl::MutexLock lock(&mu_);
    auto w = workers_.find(worker_id);
    if (w == workers_.end()) {
      return absl::NotFoundError(absl::StrCat(
          "worker_id: unknown worker \"", worker_id,
          "\"; call RegisterWorker again (the server may have restarted)"));
    }
    const absl::Time now = clock_->Now();
    w->second.last_seen = now;
    std::optional<WorkItem> item;
    if (!shut_down_) item = GrantLocked(w->second, pending, /*probe_store=*/!generation_only, generation_only);
    if (item) {
      pending.push_back(DeliverLease(std::move(done), std::move(item)));
    } else if (draining_ || shut_down_) {
      WorkItem none;
      none.retry_after = absl::Seconds(1);
      pending.push_back([done = std::move(done), none] { done(none); });
    } else if (wait <= absl::ZeroDuration()) {
      pending.push_back([done = std::move(done)] { done(std::nullopt); });
    } else {
      waiter_id = next_id_++;
      waiters_[waiter_id] =
          Waiter{waiter_id, worker_id, now + std::min(wait, options_.max_lease_wait),
                 std::move(done), generation_only};
      ++w->second.waiting;
    }
    UpdateGaugesLocked();
  }
  Run(pending);
  return waiter_id;
}

bool Scheduler::CancelLeaseWait(uint64_t waiter_id) {
  absl::MutexLock lock(&mu_);
  auto it = waiters_.find(waiter_id);
  if (it == waiters_.end()) return false;
  auto w = workers_.find(it->second.worker_id);
  if (w != workers_.end()) {
    --w->second.waiting;
    w->second.last_seen = clock_->Now();
  }
  waiters_.erase(it);
  UpdateGaugesLocked();
  return true;
}

absl::StatusOr<HeartbeatReply> Scheduler::Heartbeat(const std::string& lease_id, int step,
                                                    int total_steps, float loss) {
  if (IsSharedTrainingLease(lease_id)) return SharedHeartbeat(lease_id, step, total_steps, loss);
  Pending pending;
  HeartbeatReply reply;
  {
    absl::MutexLock lock(&mu_);
    auto l = leases_.find(lease_id);
    if (l == leases_.end()) {
      return LeaseNotFound(lease_id);
    }
    const absl::Time now = clock_->Now();
    Lease& lease = l->second;
    lease.deadline = now + options_.lease_duration;
    reply.lease_deadline = lease.deadline;
    auto w = workers_.find(lease.worker_id);
    if (w != workers_.end()) w->second.last_seen = now;
    if (lease.orphaned) {
      reply.cancel_requested = true;
    } else if (lease.training) {
      JobRecord rec = active_[lease.item_id].rec;
      rec.step = std::max(0, step);
      rec.total_steps = std::max(rec.step, total_steps);
      rec.loss = loss;
      rec.lease_deadline = lease.deadline;
      reply.cancel_requested = rec.state == JobState::kCancelling;
      RETURN_IF_ERROR(SaveJobLocked(rec, pending));
    } else {
      GenItem& g = gen_items_[lease.item_id];
      g.step = step;
      g.total_steps = total_steps;
      if (g.callbacks.on_progress) {
        GenerationProgress p{0, step, total_steps, ++event_seq_};
        pending.push_back([fn = g.callbacks.on_progress, p] { fn(p); });
      }
    }
  }
  Run(pending);
  return reply;
}

absl::StatusOr<ConceptRecord> Scheduler::CompleteTraining(const std::string& lease_id,
                                                          const std::string& blob,
                                                          float final_loss, int steps) {
  if (IsSharedTrainingLease(lease_id)) {
    return SharedCompleteTraining(lease_id, blob, final_loss, steps);
  }
  absl::StatusOr<ConceptBlobHeader> header = ParseConceptBlob(blob);
  const std::string digest = Sha256Hex(blob);
  Pending pending;
  ConceptRecord concept;
  const absl::Status bad = CheckReturnedBlob(header, options_.base_model_id);
  {
    absl::MutexLock lock(&mu_);
    auto l = leases_.find(lease_id);
    if (l == leases_.end()) {
      return LeaseNotFound(lease_id);
    }
    if (!l->second.training) {
      return absl::FailedPreconditionError("lease_id: the lease is for a generation item");
    }
    JobRecord rec = active_[l->second.item_id].rec;
    if (!bad.ok()) {
      FinishJobLocked(rec, JobState::kFailed,
                      absl::InternalError(absl::StrCat("the worker returned an unusable concept: ",
                                                       bad.message())));
      RETURN_IF_ERROR(SaveJobLocked(rec, pending));
      leases_.erase(l);
    }
  }
  if (!bad.ok()) {
    Run(pending);
    return bad;
  }
  {
    absl::MutexLock lock(&mu_);
    auto l = leases_.find(lease_id);
    if (l == leases_.end()) {
      return LeaseNotFound(lease_id);
    }
    const absl::Time now = clock_->Now();
    JobRecord rec = active_[l->second.item_id].rec;
    concept = ConceptFor(rec, *header, digest, blob.size(), now);
    MarkSucceeded(rec, final_loss, steps, now);
    ASSIGN_OR_RETURN(concept, store_->CompleteJobWithConcept(rec, concept, blob, /*lease_id=*/""));
    rec.concept_id = concept.id;
    leases_.erase(lease_id);
    RETURN_IF_ERROR(SaveJobLocked(rec, pending, /*persist=*/false));
    double seconds = absl::ToDoubleSeconds(now - rec.start_time);
    if (metrics_) metrics_->training_duration->Observe(seconds);
    avg_training_seconds_ =
        avg_training_seconds_ == 0 ? seconds : 0.8 * avg_training_seconds_ + 0.2 * seconds;
    LogEvent("concept_stored", {{"concept", concept.id},
                                {"job", rec.id},
                                {"tenant", rec.tenant},
                                {"name", concept.name},
                                {"version", std::to_string(concept.version)},
                                {"bytes", std::to_string(concept.size_bytes)}});
    NotifyQueuedLocked(pending);  // ETAs of queued jobs changed
  }
  Run(pending);
  return concept;
}

absl::Status Scheduler::CompleteGeneration(const std::string& lease_id,
                                           std::vector<GeneratedImage> images,
                                           absl::Duration compute_duration) {
  Pending pending;
  {
    absl::MutexLock lock(&mu_);
    auto l = leases_.find(lease_id);
    if (l == leases_.end()) {
      return LeaseNotFound(lease_id);
    }
    if (l->second.training) {
      return absl::FailedPreconditionError("lease_id: the lease is for a training job");
    }
    if (l->second.orphaned) {
      leases_.erase(l);
      return absl::OkStatus();  // the client is gone; nothing to deliver
    }
    auto w = workers_.find(l->second.worker_id);
    if (w != workers_.end()) w->second.last_seen = clock_->Now();
    GenItem& g = gen_items_[l->second.item_id];
    const int wanted = g.spec.request.num_images.value_or(1);
    if (static_cast<int>(images.size()) != wanted) {
      return absl::InvalidArgumentError(absl::StrCat("images: ", images.size(),
                                                     " images; the request asked for ", wanted));
    }
    for (size_t i = 0; i < images.size(); ++i) {
      if (images[i].png.size() < 8 || images[i].png.compare(1, 3, "PNG") != 0) {
        return absl::InvalidArgumentError(absl::StrCat("images[", i, "].png: not a PNG"));
      }
    }
    GenerationResult result;
    result.images = std::move(images);
    result.concepts = g.spec.concepts;
    result.queue_duration = g.leased - g.submitted;
    result.compute_duration = compute_duration;
    FinishGenLocked(g.id, std::move(result), "ok", pending);
  }
  Run(pending);
  return absl::OkStatus();
}

absl::Status Scheduler::FailWork(const std::string& lease_id, const absl::Status& error,
                                 bool retryable) {
  if (IsSharedTrainingLease(lease_id)) {
    return SharedEndLease(lease_id, error, retryable, /*return_lease=*/false);
  }
  Pending pending;
  {
    absl::MutexLock lock(&mu_);
    auto l = leases_.find(lease_id);
    if (l == leases_.end()) {
      return LeaseNotFound(lease_id);
    }
    Lease lease = l->second;
    if (lease.orphaned) {
      leases_.erase(l);
      return absl::OkStatus();
    }
    if (lease.training) {
      JobRecord rec = active_[lease.item_id].rec;
      bool requeue = false;
      if (rec.state == JobState::kCancelling) {
        FinishJobLocked(rec, JobState::kCancelled, absl::CancelledError("cancelled by the client"));
      } else if (retryable && rec.attempts < options_.max_attempts) {
        RequeueJobLocked(rec);
        requeue = true;
      } else {
        FinishJobLocked(rec, JobState::kFailed, error);
      }
      LogEvent("work_failed", {{"job", rec.id},
                               {"lease", lease_id},
                               {"code", absl::StatusCodeToString(error.code())},
                               {"retryable", retryable ? "true" : "false"},
                               {"error", std::string(error.message())}});
      RETURN_IF_ERROR(SaveLeftJobLocked(rec, requeue, pending));
      leases_.erase(lease_id);
      if (requeue) {
        DispatchLocked(pending);
        NotifyQueuedLocked(pending);
      }
    } else {
      GenItem& g = gen_items_[lease.item_id];
      leases_.erase(lease_id);
      g.lease_id.clear();
      if (retryable && g.attempts < options_.max_attempts && clock_->Now() < g.deadline) {
        gen_queue_.push_front(g.id);
        NotifyGenQueueLocked(pending);
        DispatchLocked(pending);
      } else {
        // A worker that saw the deadline pass reports DEADLINE_EXCEEDED: counted as the RPC
        // path counts it, so the failure alert (failed|deadline) sees it.
        const char* outcome = error.code() == absl::StatusCode::kCancelled          ? "cancelled"
                              : error.code() == absl::StatusCode::kDeadlineExceeded ? "deadline"
                                                                                    : "failed";
        FinishGenLocked(g.id, error, outcome, pending);
      }
    }
    UpdateGaugesLocked();
  }
  Run(pending);
  return absl::OkStatus();
}

absl::Status Scheduler::ReturnLease(const std::string& lease_id) {
  if (IsSharedTrainingLease(lease_id)) {
    return SharedEndLease(lease_id, absl::OkStatus(), /*retryable=*/true, /*return_lease=*/true);
  }
  Pending pending;
  {
    absl::MutexLock lock(&mu_);
    auto l = leases_.find(lease_id);
    if (l == leases_.end()) {
      return LeaseNotFound(lease_id);
    }
    Lease lease = l->second;
    if (lease.orphaned) {
      leases_.erase(l);
      return absl::OkStatus();
    }
    if (lease.training) {
      JobRecord rec = active_[lease.item_id].rec;
      bool requeue = rec.state != JobState::kCancelling;
      if (requeue) {
        RequeueJobLocked(rec);
        rec.attempts = std::max(0, rec.attempts - 1);
      } else {
        FinishJobLocked(rec, JobState::kCancelled, absl::CancelledError("cancelled by the client"));
      }
      RETURN_IF_ERROR(SaveLeftJobLocked(rec, requeue, pending));
      leases_.erase(lease_id);
      LogEvent("lease_returned", {{"job", rec.id}, {"lease", lease_id}});
      if (requeue) {
        DispatchLocked(pending);
        NotifyQueuedLocked(pending);
      }
    } else {
      GenItem& g = gen_items_[lease.item_id];
      leases_.erase(lease_id);
      g.lease_id.clear();
      g.attempts = std::max(0, g.attempts - 1);
      gen_queue_.push_front(g.id);
      NotifyGenQueueLocked(pending);
      DispatchLocked(pending);
    }
    UpdateGaugesLocked();
  }
  Run(pending);
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Time and lifecycle

void Scheduler::Tick() {
  Pending pending;
  {
    absl::MutexLock lock(&mu_);
    const absl::Time now = clock_->Now();
    if (options_.shared_store && now >= next_sync_) {
      (void)SyncSharedLocked(pending);  // logged; the next poll retries
      next_sync_ = now + options_.shared_poll_interval;
    }
    // Expired leases (only generation leases in shared-store mode).
    std::vector<Lease> expired;
    for (const auto& [id, l] : leases_) {
      if (l.deadline <= now) expired.push_back(l);
    }
    for (const Lease& l : expired) {
      if (l.orphaned) {
        leases_.erase(l.id);
        continue;
      }
      if (l.training) {
        JobRecord rec = active_[l.item_id].rec;
        const bool requeue = ExpireLeaseLocked(rec);
        LogEvent("lease_expired", {{"job", rec.id},
                                   {"lease", l.id},
                                   {"worker", l.worker_id},
                                   {"attempts", std::to_string(rec.attempts)},
                                   {"requeued", requeue ? "true" : "false"}});
        if (absl::Status s = SaveLeftJobLocked(rec, requeue, pending); !s.ok()) {
          LogEvent("store_error", {{"job", rec.id}, {"error", std::string(s.message())}});
          continue;  // try again on the next tick (and count the expiry then, once)
        }
        if (metrics_) metrics_->lease_expirations->Inc();
        leases_.erase(l.id);
      } else {
        GenItem& g = gen_items_[l.item_id];
        leases_.erase(l.id);
        g.lease_id.clear();
        LogEvent("lease_expired", {{"generation", g.id}, {"lease", l.id}, {"worker", l.worker_id}});
        if (g.attempts < options_.max_attempts && now < g.deadline) {
          gen_queue_.push_front(g.id);
        } else {
          FinishGenLocked(g.id, absl::UnavailableError("the worker was lost (lease expired)"),
                          "failed", pending);
        }
      }
    }
    // Generation deadlines.
    std::vector<std::string> late;
    for (const auto& [id, g] : gen_items_) {
      if (g.deadline <= now) late.push_back(id);
    }
    for (const std::string& id : late) {
      FinishGenLocked(id,
                      absl::DeadlineExceededError("the generation did not finish before its "
                                                  "deadline"),
                      "deadline", pending);
    }
    // Long polls that ran out.
    for (auto it = waiters_.begin(); it != waiters_.end();) {
      if (it->second.deadline > now) {
        ++it;
        continue;
      }
      auto w = workers_.find(it->second.worker_id);
      if (w != workers_.end()) {
        --w->second.waiting;
        w->second.last_seen = now;
      }
      pending.push_back([done = std::move(it->second.done)] { done(std::nullopt); });
      it = waiters_.erase(it);
    }
    // Silent workers.
    for (auto it = workers_.begin(); it != workers_.end();) {
      if (!ConnectedLocked(it->second)) {
        LogEvent("worker_disconnected", {{"worker", it->first}, {"name", it->second.name}});
        it = workers_.erase(it);
      } else {
        ++it;
      }
    }
    if (!expired.empty() || !late.empty()) {
      DispatchLocked(pending);
      NotifyQueuedLocked(pending);
      NotifyGenQueueLocked(pending);
    }
    UpdateGaugesLocked();
  }
  Run(pending);
}

void Scheduler::StartDrain() {
  Pending pending;
  {
    absl::MutexLock lock(&mu_);
    if (draining_) return;
    draining_ = true;
    for (auto& [id, w] : watchers_) {
      auto a = active_.find(w.job_id);
      if (a != active_.end()) a->second.watchers.erase(id);
      pending.push_back([fn = std::move(w.fn)] {
        fn(absl::UnavailableError("server is draining; watch again later"));
      });
    }
    watchers_.clear();
    shared_watched_.clear();
    // Long polls of training-only workers can get nothing now: answer them.
    for (auto it = waiters_.begin(); it != waiters_.end();) {
      auto w = workers_.find(it->second.worker_id);
      if (w != workers_.end() && w->second.caps.generation) {
        ++it;
        continue;
      }
      if (w != workers_.end()) --w->second.waiting;
      WorkItem none;
      none.retry_after = absl::Seconds(1);
      pending.push_back([done = std::move(it->second.done), none] { done(none); });
      it = waiters_.erase(it);
    }
    LogEvent("drain_started", {{"generations_in_flight", std::to_string(gen_items_.size())},
                               {"training_leases", std::to_string(leases_.size())}});
  }
  Run(pending);
}

bool Scheduler::draining() const {
  absl::MutexLock lock(&mu_);
  return draining_;
}

int Scheduler::GenerationsInFlight() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(gen_items_.size());
}

void Scheduler::Shutdown() {
  Pending pending;
  {
    absl::MutexLock lock(&mu_);
    draining_ = true;
    shut_down_ = true;
    std::vector<std::string> ids;
    for (const auto& [id, g] : gen_items_) ids.push_back(id);
    for (const std::string& id : ids) {
      FinishGenLocked(id, absl::UnavailableError("server shutting down"), "failed", pending);
    }
    for (auto& [id, w] : waiters_) {
      auto wk = workers_.find(w.worker_id);
      if (wk != workers_.end()) --wk->second.waiting;
      WorkItem none;
      none.retry_after = absl::Seconds(1);
      pending.push_back([done = std::move(w.done), none] { done(none); });
    }
    waiters_.clear();
    for (auto& [id, w] : watchers_) {
      auto a = active_.find(w.job_id);
      if (a != active_.end()) a->second.watchers.erase(id);
      pending.push_back(
          [fn = std::move(w.fn)] { fn(absl::UnavailableError("server shutting down")); });
    }
    watchers_.clear();
    shared_watched_.clear();
  }
  Run(pending);
}

int Scheduler::WorkersConnected() const {
  absl::MutexLock lock(&mu_);
  int n = 0;
  for (const auto& [id, w] : workers_) n += ConnectedLocked(w);
  return n;
}

int Scheduler::GenerationWorkersConnected() const {
  absl::MutexLock lock(&mu_);
  int n = 0;
  for (const auto& [id, w] : workers_) n += ConnectedLocked(w) && w.caps.generation;
  return n;
}

// ---------------------------------------------------------------------------------------------
// Shared store: several replicas, one database (docs/scaling.md)

absl::Status Scheduler::SyncSharedLocked(Pending& out) {
  absl::StatusOr<std::vector<JobRecord>> jobs = store_->ListActiveJobs();
  if (!jobs.ok()) {
    LogEvent("store_error", {{"op", "sync"}, {"error", std::string(jobs.status().message())}});
    return jobs.status();
  }
  const absl::Time now = clock_->Now();
  queue_.clear();
  active_per_tenant_.clear();
  std::vector<JobRecord> expired;
  for (const JobRecord& j : *jobs) {
    ++active_per_tenant_[j.tenant];
    if (j.state == JobState::kQueued) {
      queue_.insert(KeyOf(j));
    } else if (j.lease_deadline <= now) {
      expired.push_back(j);
    }
  }
  // Leases whose worker (or whose replica) went silent. Every replica may do this: the write is
  // conditional on the lease, so one wins and the others see ABORTED.
  for (const JobRecord& held : expired) {
    JobRecord rec = held;
    const bool requeue = ExpireLeaseLocked(rec);
    rec.update_time = now;
    // Someone was first, or a replica cancelled it meanwhile: the next sweep reads it again.
    if (!store_->UpdateJobIfLeased(rec, held.lease_id, held.state).ok()) continue;
    if (metrics_) metrics_->lease_expirations->Inc();
    LogEvent("lease_expired", {{"job", rec.id},
                               {"lease", held.lease_id},
                               {"worker", held.worker_id},
                               {"attempts", std::to_string(rec.attempts)},
                               {"requeued", requeue ? "true" : "false"}});
    if (requeue) queue_.insert(KeyOf(rec));
    if (IsFinal(rec.state)) SharedFinalLocked(rec);
    SharedJobChangedLocked(rec, out);
  }
  // Watched jobs: whatever replica changed them. Active ones are in the snapshot just read; only
  // those that ended since (no longer active) are read again. Jobs this sweep rewrote were
  // reported above.
  std::map<std::string, const JobRecord*> active;
  for (const JobRecord& j : *jobs) active[j.id] = &j;
  std::set<std::string> rewritten;
  for (const JobRecord& j : expired) rewritten.insert(j.id);
  std::vector<std::string> watched;
  for (const auto& [id, view] : shared_watched_) {
    if (!rewritten.count(id)) watched.push_back(id);
  }
  for (const std::string& id : watched) {
    auto a = active.find(id);
    absl::StatusOr<JobRecord> rec = a != active.end() ? *a->second : store_->GetJob(id);
    auto last = shared_watched_.find(id);
    if (!rec.ok() || last == shared_watched_.end()) continue;
    const int position = rec->state == JobState::kQueued ? QueuePositionLocked(*rec) : 0;
    const JobRecord& was = last->second.job;
    if (rec->update_time != was.update_time || rec->state != was.state ||
        position != last->second.queue_position) {
      SharedJobChangedLocked(*rec, out);
    }
  }
  if (!queue_.empty()) DispatchLocked(out);
  UpdateGaugesLocked();
  return absl::OkStatus();
}

std::optional<WorkItem> Scheduler::GrantSharedTrainingLocked(const Worker& worker, Pending& out) {
  const absl::Time now = clock_->Now();
  Store::LeaseGrant grant;
  grant.lease_id = NewId("lease_");
  grant.worker_id = worker.id;
  grant.now = now;
  grant.deadline = now + options_.lease_duration;
  grant.max_attempts = options_.max_attempts;
  absl::StatusOr<std::optional<JobRecord>> leased = store_->LeaseNextJob(grant);
  if (!leased.ok()) {
    LogEvent("lease_store_error", {{"error", std::string(leased.status().message())}});
    return std::nullopt;
  }
  if (!leased->has_value()) {
    queue_.clear();  // the snapshot was stale (other replicas leased it); the next sync refreshes
    UpdateGaugesLocked();
    return std::nullopt;
  }
  JobRecord rec = **std::move(leased);
  queue_.erase(KeyOf(rec));
  // The wait before the job's first lease only: a returned lease gives its attempt back, so
  // attempts == 1 again would count one job twice (with the first run's time in the wait).
  // (Stores keep microseconds: "started by this grant" allows for the rounding.)
  if (rec.start_time > grant.now - absl::Milliseconds(1) && metrics_) {
    metrics_->training_queue_wait->Observe(absl::ToDoubleSeconds(now - rec.create_time));
  }
  SharedJobChangedLocked(rec, out);
  UpdateGaugesLocked();
  LogEvent("job_leased", {{"job", rec.id},
                          {"lease", grant.lease_id},
                          {"worker", worker.id},
                          {"attempt", std::to_string(rec.attempts)}});
  WorkItem w;
  w.lease_id = grant.lease_id;
  w.lease_deadline = grant.deadline;
  w.training = TrainingWorkItem{rec, {}};
  return w;
}

void Scheduler::SharedJobChangedLocked(const JobRecord& rec, Pending& out) {
  auto sw = shared_watched_.find(rec.id);
  if (sw == shared_watched_.end()) return;
  const JobView v = ViewLocked(rec);
  sw->second = v;
  const bool final = IsFinal(rec.state);
  for (auto it = watchers_.begin(); it != watchers_.end();) {
    if (it->second.job_id != rec.id) {
      ++it;
      continue;
    }
    if (final) {
      out.push_back([fn = std::move(it->second.fn), v] { fn(v); });
      it = watchers_.erase(it);
    } else {
      out.push_back([fn = it->second.fn, v] { fn(v); });
      ++it;
    }
  }
  if (final) shared_watched_.erase(rec.id);
}

bool Scheduler::IsSharedTrainingLease(const std::string& lease_id) {
  if (!options_.shared_store) return false;
  absl::MutexLock lock(&mu_);
  return !IsGenerationLeaseLocked(lease_id);
}

void Scheduler::SharedFinalLocked(const JobRecord& rec) {
  auto t = active_per_tenant_.find(rec.tenant);
  if (t != active_per_tenant_.end() && --t->second <= 0) active_per_tenant_.erase(t);
  CountOutcome(rec.state);
  LogJobFinished(rec);
}

absl::StatusOr<JobView> Scheduler::SharedCancel(const std::string& tenant, const std::string& id) {
  // Conditional writes: if a replica leases or ends the job between our read and our write, the
  // write is refused (ABORTED) and we read again.
  for (int attempt = 0; attempt < 5; ++attempt) {
    ASSIGN_OR_RETURN(JobRecord rec, store_->GetJob(id));
    if (rec.tenant != tenant) return absl::NotFoundError(absl::StrCat("job ", id, " not found"));
    if (IsFinal(rec.state)) {
      return absl::FailedPreconditionError(
          absl::StrCat("job ", id, " is already ", JobStateName(rec.state),
                       "; only QUEUED or RUNNING jobs can be cancelled"));
    }
    Pending pending;
    JobView view;
    {
      absl::MutexLock lock(&mu_);
      if (rec.state == JobState::kCancelling) return ViewLocked(rec);
      JobRecord next = rec;
      if (rec.state == JobState::kQueued) {
        FinishJobLocked(next, JobState::kCancelled, absl::CancelledError("cancelled by the client"));
      } else {
        next.state = JobState::kCancelling;
      }
      next.update_time = clock_->Now();
      absl::Status s = store_->UpdateJobIfLeased(next, rec.lease_id, rec.state);
      if (s.code() == absl::StatusCode::kAborted) continue;
      RETURN_IF_ERROR(s);
      if (IsFinal(next.state)) {
        queue_.erase(KeyOf(rec));
        SharedFinalLocked(next);
      } else {
        LogEvent("job_cancelling", {{"job", id}, {"tenant", tenant}, {"lease", rec.lease_id}});
      }
      SharedJobChangedLocked(next, pending);
      UpdateGaugesLocked();
      view = ViewLocked(next);
    }
    Run(pending);
    return view;
  }
  return absl::AbortedError(absl::StrCat("job ", id, " kept changing while being cancelled; retry"));
}

absl::StatusOr<uint64_t> Scheduler::SharedWatch(const std::string& tenant, const std::string& id,
                                                WatchCallback fn) {
  {
    absl::MutexLock lock(&mu_);
    if (draining_) return absl::UnavailableError("server is draining; retry later");
  }
  ASSIGN_OR_RETURN(JobRecord rec, store_->GetJob(id));
  if (rec.tenant != tenant) return absl::NotFoundError(absl::StrCat("job ", id, " not found"));
  uint64_t watch_id = 0;
  JobView v;
  {
    absl::MutexLock lock(&mu_);
    if (draining_) return absl::UnavailableError("server is draining; retry later");
    v = ViewLocked(rec);
    if (!IsFinal(rec.state)) {
      RETURN_IF_ERROR(CheckWatchQuotaLocked(tenant));
      watch_id = next_id_++;
      watchers_[watch_id] = Watcher{id, fn, tenant};
      shared_watched_.emplace(id, v);  // an older entry stays: the poll compares against it
    }
  }
  fn(v);
  return watch_id;
}

absl::StatusOr<HeartbeatReply> Scheduler::SharedHeartbeat(const std::string& lease_id, int step,
                                                          int total_steps, float loss) {
  const absl::Time now = clock_->Now();
  const int s = std::max(0, step);
  absl::StatusOr<JobRecord> rec = store_->RecordProgress(
      lease_id, s, std::max(s, total_steps), loss, now + options_.lease_duration, now);
  if (!rec.ok()) {
    if (rec.status().code() == absl::StatusCode::kNotFound) return LeaseNotFound(lease_id);
    return rec.status();
  }
  Pending pending;
  HeartbeatReply reply;
  {
    absl::MutexLock lock(&mu_);
    auto w = workers_.find(rec->worker_id);
    if (w != workers_.end()) w->second.last_seen = now;
    reply.cancel_requested = rec->state == JobState::kCancelling;
    reply.lease_deadline = rec->lease_deadline;
    SharedJobChangedLocked(*rec, pending);
  }
  Run(pending);
  return reply;
}

absl::StatusOr<ConceptRecord> Scheduler::SharedCompleteTraining(const std::string& lease_id,
                                                                const std::string& blob,
                                                                float final_loss, int steps) {
  absl::StatusOr<ConceptBlobHeader> header = ParseConceptBlob(blob);
  const std::string digest = Sha256Hex(blob);
  absl::StatusOr<JobRecord> held = store_->GetJobByLease(lease_id);
  if (!held.ok()) {
    if (held.status().code() == absl::StatusCode::kNotFound) return LeaseNotFound(lease_id);
    return held.status();
  }
  JobRecord rec = *std::move(held);
  const absl::Time now = clock_->Now();
  Pending pending;
  if (absl::Status bad = CheckReturnedBlob(header, options_.base_model_id); !bad.ok()) {
    {
      absl::MutexLock lock(&mu_);
      const JobState read_state = rec.state;
      FinishJobLocked(rec, JobState::kFailed,
                      absl::InternalError(absl::StrCat("the worker returned an unusable concept: ",
                                                       bad.message())));
      rec.update_time = now;
      if (store_->UpdateJobIfLeased(rec, lease_id, read_state).ok()) {
        SharedFinalLocked(rec);
        SharedJobChangedLocked(rec, pending);
      }
    }
    Run(pending);
    return bad;
  }
  MarkSucceeded(rec, final_loss, steps, now);
  absl::StatusOr<ConceptRecord> concept = store_->CompleteJobWithConcept(
      rec, ConceptFor(rec, *header, digest, blob.size(), now), blob, lease_id);
  if (!concept.ok()) {
    // ABORTED: the lease was lost (expired and taken over); the other attempt's result counts.
    if (concept.status().code() == absl::StatusCode::kAborted) return LeaseNotFound(lease_id);
    return concept.status();
  }
  rec.concept_id = concept->id;
  {
    absl::MutexLock lock(&mu_);
    SharedFinalLocked(rec);
    SharedJobChangedLocked(rec, pending);
    const double seconds = absl::ToDoubleSeconds(now - rec.start_time);
    if (metrics_) metrics_->training_duration->Observe(seconds);
    avg_training_seconds_ =
        avg_training_seconds_ == 0 ? seconds : 0.8 * avg_training_seconds_ + 0.2 * seconds;
    LogEvent("concept_stored", {{"concept", concept->id},
                                {"job", rec.id},
                                {"tenant", rec.tenant},
                                {"name", concept->name},
                                {"version", std::to_string(concept->version)},
                                {"bytes", std::to_string(concept->size_bytes)}});
    UpdateGaugesLocked();
  }
  Run(pending);
  return concept;
}

absl::Status Scheduler::SharedEndLease(const std::string& lease_id, const absl::Status& error,
                                       bool retryable, bool return_lease) {
  // Read, decide, write if nothing changed; a replica's cancel between the read and the write
  // makes the write ABORTED, and the next round reads CANCELLING and ends the job CANCELLED (once
  // it was overwritten by the re-queue: the client was told CANCELLING and the job ran again).
  for (int attempt = 0; attempt < 5; ++attempt) {
    absl::StatusOr<JobRecord> held = store_->GetJobByLease(lease_id);
    if (!held.ok()) {
      if (held.status().code() == absl::StatusCode::kNotFound) return LeaseNotFound(lease_id);
      return held.status();
    }
    JobRecord rec = *std::move(held);
    const JobState read_state = rec.state;
    Pending pending;
    {
      absl::MutexLock lock(&mu_);
      bool requeue = false;
      if (rec.state == JobState::kCancelling) {
        FinishJobLocked(rec, JobState::kCancelled, absl::CancelledError("cancelled by the client"));
      } else if (return_lease) {
        RequeueJobLocked(rec);
        rec.attempts = std::max(0, rec.attempts - 1);  // a returned lease does not count
        requeue = true;
      } else if (retryable && rec.attempts < options_.max_attempts) {
        RequeueJobLocked(rec);
        requeue = true;
      } else {
        FinishJobLocked(rec, JobState::kFailed, error);
      }
      rec.update_time = clock_->Now();
      absl::Status s = store_->UpdateJobIfLeased(rec, lease_id, read_state);
      if (s.code() == absl::StatusCode::kAborted) continue;  // lost, or changed: read again
      if (s.code() == absl::StatusCode::kNotFound) return LeaseNotFound(lease_id);
      RETURN_IF_ERROR(s);
      if (return_lease) {
        LogEvent("lease_returned", {{"job", rec.id}, {"lease", lease_id}});
      } else {
        LogEvent("work_failed", {{"job", rec.id},
                                 {"lease", lease_id},
                                 {"code", absl::StatusCodeToString(error.code())},
                                 {"retryable", retryable ? "true" : "false"},
                                 {"error", std::string(error.message())}});
      }
      if (requeue) {
        queue_.insert(KeyOf(rec));
        DispatchLocked(pending);
      }
      if (IsFinal(rec.state)) SharedFinalLocked(rec);
      SharedJobChangedLocked(rec, pending);
      UpdateGaugesLocked();
    }
    Run(pending);
    return absl::OkStatus();
  }
  return absl::AbortedError(absl::StrCat("lease ", lease_id, ": the job kept changing; retry"));
}

}  // namespace perfusion::server

// perfusion.v1.WorkerService (internal: worker tokens only).
#include <algorithm>
#include <chrono>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "server/convert.h"
#include "server/reactor_util.h"
#include "server/services.h"
#include "server/status_util.h"

namespace perfusion::server {
namespace {

template <typename F>
grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* ctx, F&& body) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(ToGrpcStatus(body()));
  return reactor;
}

absl::Status RequireLease(const std::string& lease_id) {
  return lease_id.empty() ? absl::InvalidArgumentError("lease_id: empty") : absl::OkStatus();
}

// A loss is shown to clients and stored; SQLite cannot store NaN (it becomes NULL) and a diverged
// run's concept is unusable anyway, so a worker that reports one is refused, naming the field.
absl::Status RequireFinite(absl::string_view field, float v) {
  return std::isfinite(v) ? absl::OkStatus()
                          : absl::InvalidArgumentError(absl::StrCat(field, ": must be a finite number, got ", v));
}

// LeaseWork: answered when the scheduler hands out work or the long poll times out.
class LeaseReactor final : public DeferredUnaryReactor<std::optional<WorkItem>> {
 public:
  LeaseReactor(ServiceContext* c, grpc::CallbackServerContext* ctx,
               const v1::LeaseWorkRequest* req, v1::LeaseWorkResponse* resp)
      : resp_(resp) {
    auto s = shared();
    absl::Status auth = c->auth->Worker(AuthorizationOf(ctx));
    if (!auth.ok()) {
      Fail(s, ToGrpcStatus(auth));
      Ready(nullptr);
      return;
    }
    absl::Duration wait = FromProtoDuration(req->wait());
    // Never wait past the client's own deadline.
    const auto left = ctx->deadline() - std::chrono::system_clock::now();
    if (left < std::chrono::hours(24 * 365)) {
      wait = std::min(wait, absl::FromChrono(left) - absl::Milliseconds(200));
    }
    // The poll can be cancelled (a worker stopping) just as the scheduler grants it an item: then
    // CancelLeaseWait finds no waiter, and the response goes to a call that is gone. The lease
    // granted to it would stay held by nobody until it expired (a training job a minute late, an
    // attempt counted; a generation maybe past its deadline). So a grant that meets a cancelled
    // call is handed back at once, whichever of the two comes second.
    Scheduler* scheduler = c->scheduler;
    auto granted = std::make_shared<Granted>();
    auto id = c->scheduler->LeaseWork(req->worker_id(), wait, [s, scheduler, granted](std::optional<WorkItem> item) {
      if (item) {
        bool cancelled;
        {
          absl::MutexLock lock(&granted->mu);
          cancelled = granted->cancelled;
          if (!cancelled) granted->lease_id = item->lease_id;
        }
        if (cancelled) {
          (void)scheduler->ReturnLease(item->lease_id);
          Deliver(s, std::nullopt);
          return;
        }
      }
      Deliver(s, std::move(item));
    }, req->generation_only());
    if (!id.ok()) {
      Fail(s, ToGrpcStatus(id.status()));
      Ready(nullptr);
      return;
    }
    uint64_t waiter = *id;
    // A weak reference: the shared state must not own itself through its own hook.
    std::weak_ptr<Shared> weak = s;
    Ready([scheduler, waiter, weak, granted] {
      std::string lease_id;
      {
        absl::MutexLock lock(&granted->mu);
        granted->cancelled = true;
        lease_id = granted->lease_id;
      }
      if (!scheduler->CancelLeaseWait(waiter)) {
        // Granted already: a lease delivered to this cancelled call never reaches its worker.
        if (!lease_id.empty()) (void)scheduler->ReturnLease(lease_id);
        return;
      }
      if (auto strong = weak.lock()) {
        Fail(strong, grpc::Status(grpc::StatusCode::CANCELLED, "long poll cancelled"));
      }
    });
  }

 private:
  grpc::Status Fill(std::optional<WorkItem> item) override {
    if (item) ToProto(*item, resp_);
    return grpc::Status::OK;
  }
  v1::LeaseWorkResponse* const resp_;
  // Between the scheduler's grant and the call's cancellation (see the constructor).
  struct Granted {
    absl::Mutex mu;
    bool cancelled = false;  // the call was cancelled
    std::string lease_id;    // the lease granted to the call, once granted
  };
};

}  // namespace

grpc::ServerUnaryReactor* WorkerServiceImpl::RegisterWorker(
    grpc::CallbackServerContext* ctx, const v1::RegisterWorkerRequest* req,
    v1::RegisterWorkerResponse* resp) {
  return FinishUnary(ctx, [&]() -> absl::Status {
    RETURN_IF_ERROR(c_->auth->Worker(AuthorizationOf(ctx)));
    WorkerCapabilities caps;
    caps.training = req->capabilities().training();
    caps.generation = req->capabilities().generation();
    caps.regions = req->capabilities().regions();
    caps.device = req->capabilities().device();
    caps.memory_bytes = req->capabilities().memory_bytes();
    ASSIGN_OR_RETURN(std::string id,
                     c_->scheduler->RegisterWorker(req->name(), req->base_model_id(), caps));
    const SchedulerOptions& o = c_->scheduler->options();
    resp->set_worker_id(id);
    *resp->mutable_lease_duration() = ToProtoDuration(o.lease_duration);
    *resp->mutable_heartbeat_interval() = ToProtoDuration(o.lease_duration / 3);
    *resp->mutable_max_lease_wait() = ToProtoDuration(o.max_lease_wait);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* WorkerServiceImpl::LeaseWork(grpc::CallbackServerContext* ctx,
                                                       const v1::LeaseWorkRequest* req,
                                                       v1::LeaseWorkResponse* resp) {
  return new LeaseReactor(c_, ctx, req, resp);
}

grpc::ServerUnaryReactor* WorkerServiceImpl::Heartbeat(grpc::CallbackServerContext* ctx,
                                                       const v1::HeartbeatRequest* req,
                                                       v1::HeartbeatResponse* resp) {
  return FinishUnary(ctx, [&]() -> absl::Status {
    RETURN_IF_ERROR(c_->auth->Worker(AuthorizationOf(ctx)));
    RETURN_IF_ERROR(RequireLease(req->lease_id()));
    RETURN_IF_ERROR(RequireFinite("loss", req->loss()));
    ASSIGN_OR_RETURN(HeartbeatReply r, c_->scheduler->Heartbeat(req->lease_id(), req->step(),
                                                                req->total_steps(), req->loss()));
    resp->set_cancel_requested(r.cancel_requested);
    *resp->mutable_lease_deadline() = ToProtoTime(r.lease_deadline);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* WorkerServiceImpl::FetchConcept(grpc::CallbackServerContext* ctx,
                                                          const v1::FetchConceptRequest* req,
                                                          v1::FetchConceptResponse* resp) {
  return FinishUnary(ctx, [&]() -> absl::Status {
    RETURN_IF_ERROR(c_->auth->Worker(AuthorizationOf(ctx)));
    ASSIGN_OR_RETURN(std::string blob, c_->registry->BlobByDigest(req->digest()));
    resp->set_digest(req->digest());
    resp->set_blob(std::move(blob));
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* WorkerServiceImpl::CompleteTraining(
    grpc::CallbackServerContext* ctx, const v1::CompleteTrainingRequest* req,
    v1::CompleteTrainingResponse* resp) {
  return FinishUnary(ctx, [&]() -> absl::Status {
    RETURN_IF_ERROR(c_->auth->Worker(AuthorizationOf(ctx)));
    RETURN_IF_ERROR(RequireLease(req->lease_id()));
    RETURN_IF_ERROR(RequireFinite("final_loss", req->final_loss()));
    ASSIGN_OR_RETURN(ConceptRecord c,
                     c_->scheduler->CompleteTraining(req->lease_id(), req->concept_blob(),
                                                     req->final_loss(), req->steps()));
    ToProto(c, resp->mutable_concept());
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* WorkerServiceImpl::CompleteGeneration(
    grpc::CallbackServerContext* ctx, const v1::CompleteGenerationRequest* req,
    v1::CompleteGenerationResponse*) {
  return FinishUnary(ctx, [&]() -> absl::Status {
    RETURN_IF_ERROR(c_->auth->Worker(AuthorizationOf(ctx)));
    RETURN_IF_ERROR(RequireLease(req->lease_id()));
    std::vector<GeneratedImage> images;
    for (const auto& img : req->images()) images.push_back(FromProto(img));
    return c_->scheduler->CompleteGeneration(req->lease_id(), std::move(images),
                                             FromProtoDuration(req->compute_duration()));
  });
}

grpc::ServerUnaryReactor* WorkerServiceImpl::FailWork(grpc::CallbackServerContext* ctx,
                                                      const v1::FailWorkRequest* req,
                                                      v1::FailWorkResponse*) {
  return FinishUnary(ctx, [&]() -> absl::Status {
    RETURN_IF_ERROR(c_->auth->Worker(AuthorizationOf(ctx)));
    RETURN_IF_ERROR(RequireLease(req->lease_id()));
    if (req->code() <= 0 || req->code() > 16) {
      return absl::InvalidArgumentError(
          absl::StrCat("code: ", req->code(), " is not a non-OK google.rpc.Code"));
    }
    // The message is stored and shown to clients: a NUL byte (which PostgreSQL's text cannot hold)
    // becomes a space rather than failing the report.
    std::string message = req->message();
    std::replace(message.begin(), message.end(), '\0', ' ');
    return c_->scheduler->FailWork(req->lease_id(), StatusFromCode(req->code(), message),
                                   req->retryable());
  });
}

grpc::ServerUnaryReactor* WorkerServiceImpl::ReturnLease(grpc::CallbackServerContext* ctx,
                                                         const v1::ReturnLeaseRequest* req,
                                                         v1::ReturnLeaseResponse*) {
  return FinishUnary(ctx, [&]() -> absl::Status {
    RETURN_IF_ERROR(c_->auth->Worker(AuthorizationOf(ctx)));
    RETURN_IF_ERROR(RequireLease(req->lease_id()));
    return c_->scheduler->ReturnLease(req->lease_id());
  });
}

}  // namespace perfusion::server

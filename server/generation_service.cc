// perfusion.v1.GenerationService.
#include <chrono>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/convert.h"
#include "server/reactor_util.h"
#include "server/services.h"
#include "server/status_util.h"

namespace perfusion::server {
namespace {

struct Prepared {
  std::string tenant;
  GenerationSpec spec;
  absl::Time deadline;
};

absl::StatusOr<Prepared> Prepare(ServiceContext* c, grpc::CallbackServerContext* ctx,
                                 const v1::GenerateRequest& req) {
  Prepared p;
  ASSIGN_OR_RETURN(p.tenant, c->auth->Tenant(AuthorizationOf(ctx)));
  GenerationRequest r = FromProto(req);
  ASSIGN_OR_RETURN(std::vector<ConceptRef> refs, ValidateGenerationRequest(r, c->limits));
  if (!r.seed) {
    thread_local absl::BitGen gen;
    r.seed = absl::Uniform<uint64_t>(gen) >> 1;
  }
  ASSIGN_OR_RETURN(p.spec.concepts, c->registry->Resolve(p.tenant, refs, r));
  p.spec.request = std::move(r);
  // The client's deadline (none: the scheduler's maximum applies).
  const auto deadline = ctx->deadline();
  const auto now = std::chrono::system_clock::now();
  p.deadline = deadline - now > std::chrono::hours(24 * 365)
                   ? absl::InfiniteFuture()
                   : absl::Now() + absl::FromChrono(deadline - now);
  return p;
}

GenerationCallbacks MakeCallbacks(
    std::function<void(const GenerationProgress&)> on_progress,
    std::function<void(absl::StatusOr<GenerationResult>)> on_done) {
  GenerationCallbacks cb;
  cb.on_progress = std::move(on_progress);
  cb.on_done = std::move(on_done);
  return cb;
}

// The RPC's cancellation hook: the item leaves the queue (or its worker is told to stop). gRPC
// cancels a call whose deadline passed the same way as one the client abandoned; the two are
// told apart by the clock, so the first is counted as outcome "deadline" (which alerts watch).
std::function<void()> CancelHook(Scheduler* scheduler, std::string gen_id, absl::Time deadline) {
  return [scheduler, gen_id = std::move(gen_id), deadline] {
    // The client's own timer cancels the call at its deadline, which the server (which started its
    // copy of the deadline when it read the headers, later) may see up to a network delay or a
    // scheduling hiccup early: a cancel within a second of the deadline is the deadline's.
    const bool deadline_passed = absl::Now() + absl::Seconds(1) >= deadline;
    scheduler->CancelGeneration(gen_id, deadline_passed);
  };
}

class GenerateReactor final : public DeferredUnaryReactor<GenerationResult> {
 public:
  GenerateReactor(ServiceContext* c, grpc::CallbackServerContext* ctx,
                  const v1::GenerateRequest* req, v1::GenerateResponse* resp)
      : resp_(resp) {
    auto s = shared();
    auto prepared = Prepare(c, ctx, *req);
    if (!prepared.ok()) {
      Fail(s, ToGrpcStatus(prepared.status()));
      Ready(nullptr);
      return;
    }
    auto id = c->scheduler->SubmitGeneration(
        prepared->tenant, std::move(prepared->spec), prepared->deadline,
        MakeCallbacks(nullptr, [s](absl::StatusOr<GenerationResult> r) {
          if (r.ok()) {
            Deliver(s, *std::move(r));
          } else {
            Fail(s, ToGrpcStatus(r.status()));
          }
        }));
    if (!id.ok()) {
      Fail(s, ToGrpcStatus(id.status()));
      Ready(nullptr);
      return;
    }
    Ready(CancelHook(c->scheduler, *id, prepared->deadline));  // last statement
  }

 private:
  grpc::Status Fill(GenerationResult result) override {
    ToProto(result, resp_);
    return grpc::Status::OK;
  }
  v1::GenerateResponse* const resp_;
};

class GenerateStreamReactor final : public StreamWriterReactor<v1::GenerateEvent> {
 public:
  GenerateStreamReactor(ServiceContext* c, grpc::CallbackServerContext* ctx,
                        const v1::GenerateRequest* req) {
    auto s = shared();
    auto prepared = Prepare(c, ctx, *req);
    if (!prepared.ok()) {
      Close(s, ToGrpcStatus(prepared.status()));
      Ready(nullptr, nullptr);
      return;
    }
    auto id = c->scheduler->SubmitGeneration(
        prepared->tenant, std::move(prepared->spec), prepared->deadline,
        MakeCallbacks(
            [s](const GenerationProgress& p) {
              v1::GenerateEvent e;
              auto* prog = e.mutable_progress();
              prog->set_queue_position(p.queue_position);
              prog->set_step(p.step);
              prog->set_total_steps(p.total_steps);
              Send(s, std::move(e), p.event_seq, /*coalescable=*/true);
            },
            [s](absl::StatusOr<GenerationResult> r) {
              if (!r.ok()) {
                Close(s, ToGrpcStatus(r.status()));
                return;
              }
              v1::GenerateEvent e;
              ToProto(*r, e.mutable_result());
              SendLastAndClose(s, std::move(e), 0, grpc::Status::OK);  // nothing after the result
            }));
    if (!id.ok()) {
      Close(s, ToGrpcStatus(id.status()));
      Ready(nullptr, nullptr);
      return;
    }
    Ready(CancelHook(c->scheduler, *id, prepared->deadline), nullptr);
  }
};

}  // namespace

grpc::ServerUnaryReactor* GenerationServiceImpl::Generate(grpc::CallbackServerContext* ctx,
                                                          const v1::GenerateRequest* req,
                                                          v1::GenerateResponse* resp) {
  return new GenerateReactor(c_, ctx, req, resp);
}

grpc::ServerWriteReactor<v1::GenerateEvent>* GenerationServiceImpl::GenerateStream(
    grpc::CallbackServerContext* ctx, const v1::GenerateRequest* req) {
  return new GenerateStreamReactor(c_, ctx, req);
}

}  // namespace perfusion::server

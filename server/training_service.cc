// perfusion.v1.TrainingService.
#include <algorithm>

#include "absl/strings/string_view.h"
#include "absl/strings/str_cat.h"
#include "server/convert.h"
#include "server/log.h"
#include "server/reactor_util.h"
#include "server/services.h"
#include "server/status_util.h"

namespace perfusion::server {

absl::Status ServiceContext::ReserveUpload(const std::string& tenant, int64_t n) {
  absl::MutexLock lock(&upload_mu_);
  int64_t& mine = tenant_upload_bytes_[tenant];
  if (mine + n > tenant_max_upload_bytes_in_flight) {
    if (mine == 0) tenant_upload_bytes_.erase(tenant);
    return absl::ResourceExhaustedError(absl::StrCat(
        "upload: this tenant's uploads in progress hold ", mine, " bytes, and a tenant may hold ",
        tenant_max_upload_bytes_in_flight, "; finish or cancel them, or retry later"));
  }
  if (upload_bytes_ + n > max_upload_bytes_in_flight) {
    if (mine == 0) tenant_upload_bytes_.erase(tenant);
    return absl::ResourceExhaustedError("upload: the server's upload buffer is full; retry later");
  }
  mine += n;
  upload_bytes_ += n;
  return absl::OkStatus();
}

void ServiceContext::ReleaseUpload(const std::string& tenant, int64_t n) {
  if (n == 0) return;
  absl::MutexLock lock(&upload_mu_);
  upload_bytes_ -= n;
  auto it = tenant_upload_bytes_.find(tenant);
  if (it != tenant_upload_bytes_.end() && (it->second -= n) <= 0) tenant_upload_bytes_.erase(it);
}

namespace {

template <typename F>
grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* ctx, F&& body) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(ToGrpcStatus(body()));
  return reactor;
}

// INVALID_ARGUMENT naming `images` when a job's images together exceed what a lease can carry.
absl::Status CheckJobImageBytes(int64_t total, const ValidationLimits& limits) {
  if (limits.max_job_image_bytes > 0 && total > limits.max_job_image_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "images: ", total, " bytes in all; a job's images together may take at most ",
        limits.max_job_image_bytes, " bytes (the server's --max_message_bytes less ",
        kLeaseOverheadBytes, " for the rest of the lease that hands them to a worker)"));
  }
  return absl::OkStatus();
}

absl::Status InspectImages(const std::vector<std::string>& images,
                           const ValidationLimits& limits) {
  int64_t total = 0;
  for (const std::string& image : images) total += static_cast<int64_t>(image.size());
  RETURN_IF_ERROR(CheckJobImageBytes(total, limits));
  for (size_t i = 0; i < images.size(); ++i) {
    RETURN_IF_ERROR(InspectImage(images[i], limits, absl::StrCat("images[", i, "]")).status());
  }
  return absl::OkStatus();
}

absl::StatusOr<int> PageSize(int requested) {
  if (requested < 0) {
    return absl::InvalidArgumentError(absl::StrCat("page_size: ", requested, " is negative"));
  }
  return requested == 0 ? 50 : std::min(requested, 500);
}

// UploadTrainingJob: a header, then image chunks; the stream's end submits the job. Buffered
// bytes count against ServiceContext's caps, the tenant's and the server's.
class UploadReactor final : public grpc::ServerReadReactor<v1::UploadTrainingJobRequest> {
 public:
  UploadReactor(ServiceContext* c, grpc::CallbackServerContext* ctx, v1::TrainingJob* resp)
      : c_(c), ctx_(ctx), resp_(resp) {
    auto tenant = c_->auth->Tenant(AuthorizationOf(ctx));
    if (!tenant.ok()) {
      Finish(ToGrpcStatus(tenant.status()));
      return;
    }
    tenant_ = *tenant;
    StartRead(&msg_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      if (ctx_->IsCancelled()) {
        Finish(grpc::Status(grpc::StatusCode::CANCELLED, "upload cancelled"));
        return;
      }
      Finish(ToGrpcStatus(Submit()));
      return;
    }
    absl::Status s = Handle();
    if (!s.ok()) {
      Finish(ToGrpcStatus(s));
      return;
    }
    msg_.Clear();
    StartRead(&msg_);
  }
  void OnDone() override {
    c_->ReleaseUpload(tenant_, reserved_);
    delete this;
  }

 private:
  absl::Status Handle() {
    if (msg_.has_header()) {
      if (have_header_) return absl::InvalidArgumentError("header: sent twice");
      have_header_ = true;
      auto* job = msg_.mutable_header()->mutable_job();
      if (job->images_size() > 0) {
        return absl::InvalidArgumentError("header.job.images: must be empty; send chunks");
      }
      request_ = FromProto(std::move(*job));
      count_ = msg_.header().image_count();
      RETURN_IF_ERROR(ValidateImageCount(count_, c_->limits, "header.image_count"));
      // Field paths of this stream's message: the job sits in header.job.
      absl::Status s = ValidateTrainingRequest(request_, c_->limits, c_->vocab, /*check_image_count=*/false);
      if (s.ok()) {
        s = ValidateCaptions(request_.options.captions, count_, request_.concept_name, request_.superclass);
      }
      if (s.code() == absl::StatusCode::kInvalidArgument) {
        return absl::InvalidArgumentError(absl::StrCat("header.job.", s.message()));
      }
      return s;
    }
    if (!msg_.has_chunk()) return absl::InvalidArgumentError("part: neither header nor chunk");
    if (!have_header_) return absl::InvalidArgumentError("header: must come first");
    const int idx = msg_.chunk().image_index();
    const int current = static_cast<int>(request_.images.size()) - 1;
    // The next image starts, or the current one goes on; before the first image only index 0 is
    // either (a -1 there once passed as "the current image" and appended to a missing one).
    const bool next = idx == current + 1;
    const bool same = current >= 0 && idx == current;
    if (!next && !same) {
      return absl::InvalidArgumentError(
          current < 0 ? absl::StrCat("chunk.image_index: ", idx, " out of order (expected 0)")
                      : absl::StrCat("chunk.image_index: ", idx, " out of order (expected ", current,
                                     " or ", current + 1, ")"));
    }
    if (idx >= count_) {
      return absl::InvalidArgumentError(absl::StrCat(
          "chunk.image_index: ", idx, " but header.image_count is ", count_));
    }
    const std::string& data = msg_.chunk().data();
    const int64_t n = static_cast<int64_t>(data.size());
    RETURN_IF_ERROR(c_->ReserveUpload(tenant_, n));
    reserved_ += n;
    RETURN_IF_ERROR(CheckJobImageBytes(reserved_, c_->limits));  // fail at once, not at the end
    if (next) request_.images.emplace_back();
    std::string& img = request_.images.back();
    if (static_cast<int64_t>(img.size()) + n > c_->limits.max_image_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("images[", idx, "]: exceeds the limit of ",
                                                     c_->limits.max_image_bytes, " bytes"));
    }
    img.append(data);
    return absl::OkStatus();
  }

  absl::Status Submit() {
    if (!have_header_) return absl::InvalidArgumentError("header: missing");
    if (static_cast<int>(request_.images.size()) != count_) {
      return absl::InvalidArgumentError(absl::StrCat("images: header.image_count is ", count_,
                                                     " but ", request_.images.size(),
                                                     " images arrived"));
    }
    RETURN_IF_ERROR(InspectImages(request_.images, c_->limits));
    ASSIGN_OR_RETURN(JobView v, c_->scheduler->SubmitTraining(tenant_, std::move(request_)));
    ToProto(v, resp_);
    return absl::OkStatus();
  }

  ServiceContext* const c_;
  grpc::CallbackServerContext* const ctx_;
  v1::TrainingJob* const resp_;
  std::string tenant_;
  v1::UploadTrainingJobRequest msg_;
  bool have_header_ = false;
  int count_ = 0;
  TrainingRequest request_;
  int64_t reserved_ = 0;
};

// WatchTrainingJob: scheduler events, coalesced, until the job is final.
class WatchReactor final : public StreamWriterReactor<v1::TrainingJobEvent> {
 public:
  WatchReactor(ServiceContext* c, grpc::CallbackServerContext* ctx,
               const v1::WatchTrainingJobRequest* req) {
    auto s = shared();
    auto tenant = c->auth->Tenant(AuthorizationOf(ctx));
    if (!tenant.ok()) {
      Close(s, ToGrpcStatus(tenant.status()));
      Ready(nullptr, nullptr);
      return;
    }
    if (req->id().empty()) {  // as GetTrainingJob and CancelTrainingJob
      Close(s, ToGrpcStatus(absl::InvalidArgumentError("id: empty")));
      Ready(nullptr, nullptr);
      return;
    }
    auto id = c->scheduler->Watch(*tenant, req->id(), [s](const absl::StatusOr<JobView>& v) {
      if (!v.ok()) {
        Close(s, ToGrpcStatus(v.status()));
        return;
      }
      v1::TrainingJobEvent event;
      ToProto(*v, &event);
      const bool final = IsFinal(v->job.state);
      if (final) {
        SendLastAndClose(s, std::move(event), v->event_seq, grpc::Status::OK);
      } else {
        Send(s, std::move(event), v->event_seq, /*coalescable=*/true);
      }
    });
    if (!id.ok()) {
      Close(s, ToGrpcStatus(id.status()));
      Ready(nullptr, nullptr);
      return;
    }
    Scheduler* scheduler = c->scheduler;
    uint64_t watch_id = *id;
    Ready(nullptr, [scheduler, watch_id] { scheduler->Unwatch(watch_id); });
  }
};

}  // namespace

std::optional<absl::string_view> AuthorizationOf(const grpc::CallbackServerContext* ctx) {
  const auto& md = ctx->client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) return std::nullopt;
  return absl::string_view(it->second.data(), it->second.size());
}

grpc::ServerUnaryReactor* TrainingServiceImpl::CreateTrainingJob(
    grpc::CallbackServerContext* ctx, const v1::CreateTrainingJobRequest* req,
    v1::TrainingJob* resp) {
  return FinishUnary(ctx, [&]() -> absl::Status {
    ASSIGN_OR_RETURN(std::string tenant, c_->auth->Tenant(AuthorizationOf(ctx)));
    // The request is ours until Finish: move the images out instead of copying them.
    TrainingRequest r = FromProto(std::move(*const_cast<v1::CreateTrainingJobRequest*>(req)));
    RETURN_IF_ERROR(ValidateTrainingRequest(r, c_->limits, c_->vocab, /*check_image_count=*/true));
    RETURN_IF_ERROR(InspectImages(r.images, c_->limits));
    ASSIGN_OR_RETURN(JobView v, c_->scheduler->SubmitTraining(tenant, std::move(r)));
    ToProto(v, resp);
    return absl::OkStatus();
  });
}

grpc::ServerReadReactor<v1::UploadTrainingJobRequest>* TrainingServiceImpl::UploadTrainingJob(
    grpc::CallbackServerContext* ctx, v1::TrainingJob* resp) {
  return new UploadReactor(c_, ctx, resp);
}

grpc::ServerUnaryReactor* TrainingServiceImpl::GetTrainingJob(
    grpc::CallbackServerContext* ctx, const v1::GetTrainingJobRequest* req,
    v1::TrainingJob* resp) {
  return FinishUnary(ctx, [&]() -> absl::Status {
    ASSIGN_OR_RETURN(std::string tenant, c_->auth->Tenant(AuthorizationOf(ctx)));
    if (req->id().empty()) return absl::InvalidArgumentError("id: empty");
    ASSIGN_OR_RETURN(JobView v, c_->scheduler->GetJob(tenant, req->id()));
    ToProto(v, resp);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* TrainingServiceImpl::ListTrainingJobs(
    grpc::CallbackServerContext* ctx, const v1::ListTrainingJobsRequest* req,
    v1::ListTrainingJobsResponse* resp) {
  return FinishUnary(ctx, [&]() -> absl::Status {
    ASSIGN_OR_RETURN(std::string tenant, c_->auth->Tenant(AuthorizationOf(ctx)));
    ASSIGN_OR_RETURN(int page_size, PageSize(req->page_size()));
    std::optional<JobState> state;
    if (req->state() != v1::JOB_STATE_UNSPECIFIED) {
      if (req->state() < v1::QUEUED || req->state() > v1::CANCELLED) {
        return absl::InvalidArgumentError(absl::StrCat("state: unknown value ", req->state()));
      }
      state = static_cast<JobState>(static_cast<int>(req->state()));
    }
    ASSIGN_OR_RETURN(Page<JobView> page,
                     c_->scheduler->ListJobs(tenant, state, page_size, req->page_token()));
    for (const JobView& v : page.items) ToProto(v, resp->add_jobs());
    resp->set_next_page_token(page.next_page_token);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* TrainingServiceImpl::CancelTrainingJob(
    grpc::CallbackServerContext* ctx, const v1::CancelTrainingJobRequest* req,
    v1::TrainingJob* resp) {
  return FinishUnary(ctx, [&]() -> absl::Status {
    ASSIGN_OR_RETURN(std::string tenant, c_->auth->Tenant(AuthorizationOf(ctx)));
    if (req->id().empty()) return absl::InvalidArgumentError("id: empty");
    ASSIGN_OR_RETURN(JobView v, c_->scheduler->CancelJob(tenant, req->id()));
    ToProto(v, resp);
    return absl::OkStatus();
  });
}

grpc::ServerWriteReactor<v1::TrainingJobEvent>* TrainingServiceImpl::WatchTrainingJob(
    grpc::CallbackServerContext* ctx, const v1::WatchTrainingJobRequest* req) {
  return new WatchReactor(c_, ctx, req);
}

}  // namespace perfusion::server

// perfusion.v1.ConceptService.
#include "absl/strings/str_cat.h"
#include "server/convert.h"
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

absl::Status RequireId(const std::string& id) {
  return id.empty() ? absl::InvalidArgumentError("id: empty") : absl::OkStatus();
}

}  // namespace

grpc::ServerUnaryReactor* ConceptServiceImpl::GetConcept(grpc::CallbackServerContext* ctx,
                                                         const v1::GetConceptRequest* req,
                                                         v1::Concept* resp) {
  return FinishUnary(ctx, [&]() -> absl::Status {
    ASSIGN_OR_RETURN(std::string tenant, c_->auth->Tenant(AuthorizationOf(ctx)));
    ASSIGN_OR_RETURN(ConceptRecord c, c_->registry->Get(tenant, req->id(), req->name()));
    ToProto(c, resp);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* ConceptServiceImpl::ListConcepts(grpc::CallbackServerContext* ctx,
                                                           const v1::ListConceptsRequest* req,
                                                           v1::ListConceptsResponse* resp) {
  return FinishUnary(ctx, [&]() -> absl::Status {
    ASSIGN_OR_RETURN(std::string tenant, c_->auth->Tenant(AuthorizationOf(ctx)));
    if (req->page_size() < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("page_size: ", req->page_size(), " is negative"));
    }
    int page_size = req->page_size() == 0 ? 50 : std::min(req->page_size(), 500);
    ASSIGN_OR_RETURN(Page<ConceptRecord> page,
                     c_->registry->List(tenant, req->name(), page_size, req->page_token()));
    for (const ConceptRecord& c : page.items) ToProto(c, resp->add_concepts());
    resp->set_next_page_token(page.next_page_token);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* ConceptServiceImpl::UpdateConcept(grpc::CallbackServerContext* ctx,
                                                            const v1::UpdateConceptRequest* req,
                                                            v1::Concept* resp) {
  return FinishUnary(ctx, [&]() -> absl::Status {
    ASSIGN_OR_RETURN(std::string tenant, c_->auth->Tenant(AuthorizationOf(ctx)));
    RETURN_IF_ERROR(RequireId(req->id()));
    Labels set(req->set_labels().begin(), req->set_labels().end());
    std::vector<std::string> remove(req->remove_labels().begin(), req->remove_labels().end());
    ASSIGN_OR_RETURN(ConceptRecord c, c_->registry->UpdateLabels(tenant, req->id(), set, remove));
    ToProto(c, resp);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* ConceptServiceImpl::DeleteConcept(grpc::CallbackServerContext* ctx,
                                                            const v1::DeleteConceptRequest* req,
                                                            v1::DeleteConceptResponse*) {
  return FinishUnary(ctx, [&]() -> absl::Status {
    ASSIGN_OR_RETURN(std::string tenant, c_->auth->Tenant(AuthorizationOf(ctx)));
    RETURN_IF_ERROR(RequireId(req->id()));
    return c_->registry->Delete(tenant, req->id());
  });
}

grpc::ServerUnaryReactor* ConceptServiceImpl::ExportConcept(grpc::CallbackServerContext* ctx,
                                                            const v1::ExportConceptRequest* req,
                                                            v1::ExportConceptResponse* resp) {
  return FinishUnary(ctx, [&]() -> absl::Status {
    ASSIGN_OR_RETURN(std::string tenant, c_->auth->Tenant(AuthorizationOf(ctx)));
    RETURN_IF_ERROR(RequireId(req->id()));
    ASSIGN_OR_RETURN(auto exported, c_->registry->Export(tenant, req->id()));
    ToProto(exported.first, resp->mutable_concept());
    resp->set_blob(std::move(exported.second));
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* ConceptServiceImpl::ImportConcept(grpc::CallbackServerContext* ctx,
                                                            const v1::ImportConceptRequest* req,
                                                            v1::Concept* resp) {
  return FinishUnary(ctx, [&]() -> absl::Status {
    ASSIGN_OR_RETURN(std::string tenant, c_->auth->Tenant(AuthorizationOf(ctx)));
    Labels labels(req->labels().begin(), req->labels().end());
    ASSIGN_OR_RETURN(ConceptRecord c,
                     c_->registry->Import(tenant, req->blob(), req->name(), labels));
    ToProto(c, resp);
    return absl::OkStatus();
  });
}

}  // namespace perfusion::server

// The gRPC services: thin adapters that (1) read the tenant (or worker) from the bearer token,
// (2) validate and convert the request, (3) call the scheduler or the concept registry,
// (4) convert the result and (5) finish with ToGrpcStatus. All use the callback API.
//
// Thread safety: services are stateless beyond the shared, thread-safe ServiceContext.
#ifndef PERFUSION_SERVER_SERVICES_H_
#define PERFUSION_SERVER_SERVICES_H_

#include <grpcpp/grpcpp.h>

#include <map>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

#include "perfusion/v1/concept.grpc.pb.h"
#include "perfusion/v1/generation.grpc.pb.h"
#include "perfusion/v1/training.grpc.pb.h"
#include "perfusion/v1/worker.grpc.pb.h"
#include "server/auth.h"
#include "server/concept_registry.h"
#include "server/scheduler.h"
#include "server/validation.h"

namespace perfusion::server {

// What the services share; everything outlives the gRPC server.
struct ServiceContext {
  Scheduler* scheduler = nullptr;
  ConceptRegistry* registry = nullptr;
  const Authenticator* auth = nullptr;
  ValidationLimits limits;
  const Vocab* vocab = nullptr;  // null: superclass checked as one word only
  // Bytes of streamed uploads buffered right now, and the caps (RESOURCE_EXHAUSTED beyond them):
  // all tenants together, and each tenant, so that one tenant's stalled uploads cannot fill the
  // buffer for everyone.
  int64_t max_upload_bytes_in_flight = int64_t{1} << 30;
  int64_t tenant_max_upload_bytes_in_flight = int64_t{256} << 20;
  // Reserves n more buffered bytes for `tenant`; nothing is reserved when a cap would be passed.
  absl::Status ReserveUpload(const std::string& tenant, int64_t n);
  void ReleaseUpload(const std::string& tenant, int64_t n);

 private:
  absl::Mutex upload_mu_;
  int64_t upload_bytes_ ABSL_GUARDED_BY(upload_mu_) = 0;
  std::map<std::string, int64_t> tenant_upload_bytes_ ABSL_GUARDED_BY(upload_mu_);
};

// The `authorization` metadata value, if present.
std::optional<absl::string_view> AuthorizationOf(const grpc::CallbackServerContext* ctx);

class TrainingServiceImpl final : public v1::TrainingService::CallbackService {
 public:
  explicit TrainingServiceImpl(ServiceContext* c) : c_(c) {}
  grpc::ServerUnaryReactor* CreateTrainingJob(grpc::CallbackServerContext* ctx,
                                              const v1::CreateTrainingJobRequest* req,
                                              v1::TrainingJob* resp) override;
  grpc::ServerReadReactor<v1::UploadTrainingJobRequest>* UploadTrainingJob(
      grpc::CallbackServerContext* ctx, v1::TrainingJob* resp) override;
  grpc::ServerUnaryReactor* GetTrainingJob(grpc::CallbackServerContext* ctx,
                                           const v1::GetTrainingJobRequest* req,
                                           v1::TrainingJob* resp) override;
  grpc::ServerUnaryReactor* ListTrainingJobs(grpc::CallbackServerContext* ctx,
                                             const v1::ListTrainingJobsRequest* req,
                                             v1::ListTrainingJobsResponse* resp) override;
  grpc::ServerUnaryReactor* CancelTrainingJob(grpc::CallbackServerContext* ctx,
                                              const v1::CancelTrainingJobRequest* req,
                                              v1::TrainingJob* resp) override;
  grpc::ServerWriteReactor<v1::TrainingJobEvent>* WatchTrainingJob(
      grpc::CallbackServerContext* ctx, const v1::WatchTrainingJobRequest* req) override;

 private:
  ServiceContext* const c_;
};

class ConceptServiceImpl final : public v1::ConceptService::CallbackService {
 public:
  explicit ConceptServiceImpl(ServiceContext* c) : c_(c) {}
  grpc::ServerUnaryReactor* GetConcept(grpc::CallbackServerContext* ctx,
                                       const v1::GetConceptRequest* req,
                                       v1::Concept* resp) override;
  grpc::ServerUnaryReactor* ListConcepts(grpc::CallbackServerContext* ctx,
                                         const v1::ListConceptsRequest* req,
                                         v1::ListConceptsResponse* resp) override;
  grpc::ServerUnaryReactor* UpdateConcept(grpc::CallbackServerContext* ctx,
                                          const v1::UpdateConceptRequest* req,
                                          v1::Concept* resp) override;
  grpc::ServerUnaryReactor* DeleteConcept(grpc::CallbackServerContext* ctx,
                                          const v1::DeleteConceptRequest* req,
                                          v1::DeleteConceptResponse* resp) override;
  grpc::ServerUnaryReactor* ExportConcept(grpc::CallbackServerContext* ctx,
                                          const v1::ExportConceptRequest* req,
                                          v1::ExportConceptResponse* resp) override;
  grpc::ServerUnaryReactor* ImportConcept(grpc::CallbackServerContext* ctx,
                                          const v1::ImportConceptRequest* req,
                                          v1::Concept* resp) override;

 private:
  ServiceContext* const c_;
};

class GenerationServiceImpl final : public v1::GenerationService::CallbackService {
 public:
  explicit GenerationServiceImpl(ServiceContext* c) : c_(c) {}
  grpc::ServerUnaryReactor* Generate(grpc::CallbackServerContext* ctx,
                                     const v1::GenerateRequest* req,
                                     v1::GenerateResponse* resp) override;
  grpc::ServerWriteReactor<v1::GenerateEvent>* GenerateStream(
      grpc::CallbackServerContext* ctx, const v1::GenerateRequest* req) override;

 private:
  ServiceContext* const c_;
};

class WorkerServiceImpl final : public v1::WorkerService::CallbackService {
 public:
  explicit WorkerServiceImpl(ServiceContext* c) : c_(c) {}
  grpc::ServerUnaryReactor* RegisterWorker(grpc::CallbackServerContext* ctx,
                                           const v1::RegisterWorkerRequest* req,
                                           v1::RegisterWorkerResponse* resp) override;
  grpc::ServerUnaryReactor* LeaseWork(grpc::CallbackServerContext* ctx,
                                      const v1::LeaseWorkRequest* req,
                                      v1::LeaseWorkResponse* resp) override;
  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* ctx,
                                      const v1::HeartbeatRequest* req,
                                      v1::HeartbeatResponse* resp) override;
  grpc::ServerUnaryReactor* FetchConcept(grpc::CallbackServerContext* ctx,
                                         const v1::FetchConceptRequest* req,
                                         v1::FetchConceptResponse* resp) override;
  grpc::ServerUnaryReactor* CompleteTraining(grpc::CallbackServerContext* ctx,
                                             const v1::CompleteTrainingRequest* req,
                                             v1::CompleteTrainingResponse* resp) override;
  grpc::ServerUnaryReactor* CompleteGeneration(grpc::CallbackServerContext* ctx,
                                               const v1::CompleteGenerationRequest* req,
                                               v1::CompleteGenerationResponse* resp) override;
  grpc::ServerUnaryReactor* FailWork(grpc::CallbackServerContext* ctx,
                                     const v1::FailWorkRequest* req,
                                     v1::FailWorkResponse* resp) override;
  grpc::ServerUnaryReactor* ReturnLease(grpc::CallbackServerContext* ctx,
                                        const v1::ReturnLeaseRequest* req,
                                        v1::ReturnLeaseResponse* resp) override;

 private:
  ServiceContext* const c_;
};

}  // namespace perfusion::server

#endif  // PERFUSION_SERVER_SERVICES_H_

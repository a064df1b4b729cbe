// perfusion-server assembled: store, scheduler, concept registry, auth, the four services,
// health and reflection, RED metrics, the /metrics endpoint and a ticker thread.
//
//   ServerOptions o;  o.listen = "127.0.0.1:0";  o.data_dir = "/tmp/pf";  ...
//   auto server = PerfusionServer::Start(o);     // serving when this returns
//   (*server)->port();                           // the bound port (listen port 0 picks one)
//   (*server)->Shutdown();                       // drain, then stop
//
// Health (grpc.health.v1): "" , perfusion.v1.TrainingService and perfusion.v1.ConceptService
// are SERVING while up; perfusion.v1.GenerationService only while a generation worker is
// connected. All go NOT_SERVING when the drain starts.
//
// Shutdown (graceful): health NOT_SERVING and /healthz 503; new public work UNAVAILABLE; watch
// streams end UNAVAILABLE; queued and running generations get up to drain_timeout to finish
// (workers keep completing them); then the rest fail UNAVAILABLE and gRPC stops. Training jobs
// and their leases are durable: a restarted server picks them up.
//
// Thread safety: Start/Shutdown/Wait from the owning thread; the accessors are thread-safe.
#ifndef PERFUSION_SERVER_SERVER_H_
#define PERFUSION_SERVER_SERVER_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/synchronization/notification.h"
#include "server/auth.h"
#include "server/clock.h"
#include "server/concept_registry.h"
#include "server/metrics.h"
#include "server/metrics_http.h"
#include "server/scheduler.h"
#include "server/server_metrics.h"
#include "server/services.h"
#include "server/store.h"
#include "server/validation.h"

namespace perfusion::server {

struct ServerOptions {
  // gRPC address, host:port (port 0: any free port).
  std::string listen = "0.0.0.0:50051";
  // Prometheus /metrics and /healthz address; "" : not served.
  std::string metrics_listen = "127.0.0.1:9090";
  // Folder of the SQLite database (perfusion.db, created with the folder); "" : in memory
  // (nothing survives a restart; tests).
  std::string data_dir;
  // Store URL (store_factory.h: sqlite:///path, postgres://...); when set, replaces data_dir.
  std::string store_url;
  // Token files (see auth.h). With allow_unauthenticated and no tokens_file, every caller is
  // tenant "default" (development only).
  std::string tokens_file;
  std::string worker_tokens_file;
  bool allow_unauthenticated = false;
  // PEM files; both or neither. Neither: plaintext.
  std::string tls_cert;
  std::string tls_key;
  // CLIP vocab.json of the base model (tokenizer/vocab.json) for the single-token superclass
  // check; "" : the superclass is checked as one lowercase word only.
  std::string vocab;
  // Largest gRPC message accepted and sent.
  int max_message_bytes = 64 << 20;
  int64_t max_upload_bytes_in_flight = int64_t{1} << 30;
  int64_t tenant_max_upload_bytes_in_flight = int64_t{256} << 20;
  absl::Duration drain_timeout = absl::Seconds(30);
  // How often leases and deadlines are checked.
  absl::Duration tick_interval = absl::Milliseconds(200);
  SchedulerOptions scheduler;
  ValidationLimits limits;
  int64_t max_concept_bytes = 4 << 20;
  // Injected clock (tests); null: the wall clock.
  const Clock* clock = nullptr;
};

class PerfusionServer {
 public:
  static absl::StatusOr<std::unique_ptr<PerfusionServer>> Start(ServerOptions options);
  ~PerfusionServer();
  PerfusionServer(const PerfusionServer&) = delete;
  PerfusionServer& operator=(const PerfusionServer&) = delete;

  int port() const { return port_; }
  int metrics_port() const { return metrics_port_; }
  // Drains and stops (idempotent).
  void Shutdown();
  // Blocks until Shutdown() has completed.
  void Wait();

  Scheduler* scheduler() { return scheduler_.get(); }
  metrics::Registry* registry() { return &registry_; }
  // Runs one scheduler tick now (tests with a FakeClock).
  void TEST_Tick() { scheduler_->Tick(); }

 private:
  PerfusionServer() = default;
  void TickLoop();
  void UpdateHealth();

  ServerOptions options_;
  metrics::Registry registry_;
  std::unique_ptr<ServerMetrics> metrics_;
  std::unique_ptr<Store> store_;
  std::unique_ptr<Vocab> vocab_;
  std::unique_ptr<Authenticator> auth_;
  std::unique_ptr<Scheduler> scheduler_;
  std::unique_ptr<ConceptRegistry> concepts_;
  std::unique_ptr<ServiceContext> context_;
  std::unique_ptr<TrainingServiceImpl> training_service_;
  std::unique_ptr<ConceptServiceImpl> concept_service_;
  std::unique_ptr<GenerationServiceImpl> generation_service_;
  std::unique_ptr<WorkerServiceImpl> worker_service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<MetricsHttpServer> metrics_http_;
  int port_ = 0;
  int metrics_port_ = 0;
  std::thread ticker_;
  absl::Notification stop_ticker_;
  absl::Notification shut_down_;
  bool shutdown_started_ = false;
  bool generation_serving_ = false;
};

}  // namespace perfusion::server

#endif  // PERFUSION_SERVER_SERVER_H_

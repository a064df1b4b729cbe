#include "server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "grpc/health/v1/health.pb.h"
#include "server/log.h"
#include "server/rpc_metrics.h"
#include "server/sqlite_store.h"
#include "server/status_util.h"
#include "server/store_factory.h"

namespace perfusion::server {
namespace {

constexpr const char* kServices[] = {"perfusion.v1.TrainingService",
                                     "perfusion.v1.ConceptService"};
constexpr const char* kGenerationService = "perfusion.v1.GenerationService";

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

absl::StatusOr<std::unique_ptr<PerfusionServer>> PerfusionServer::Start(ServerOptions options) {
  std::unique_ptr<PerfusionServer> s(new PerfusionServer());
  s->options_ = std::move(options);
  const ServerOptions& o = s->options_;
  const Clock* clock = o.clock ? o.clock : RealClock::Get();

  // Store.
  std::string db = ":memory:";
  if (!o.store_url.empty()) {
    ASSIGN_OR_RETURN(s->store_, OpenStore(o.store_url));
  } else if (!o.data_dir.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(o.data_dir, ec);
    if (ec) {
      return absl::FailedPreconditionError(
          absl::StrCat("data_dir: cannot create ", o.data_dir, ": ", ec.message()));
    }
    db = (std::filesystem::path(o.data_dir) / "perfusion.db").string();
  }
  if (!s->store_) {
    ASSIGN_OR_RETURN(std::unique_ptr<SqliteStore> sqlite, SqliteStore::Open(db));
    s->store_ = std::move(sqlite);
  }

  // Auth.
  if (o.tokens_file.empty() && !o.allow_unauthenticated) {
    return absl::InvalidArgumentError(
        "tokens_file: required (or allow_unauthenticated for development)");
  }
  ASSIGN_OR_RETURN(Authenticator auth, Authenticator::Load(o.tokens_file, o.worker_tokens_file));
  if (o.tokens_file.empty()) {
    auth.AllowAll("default");
    LogEvent("auth_warning", {{"warning", "authentication is off (--allow_unauthenticated): every caller on " +
                                              o.listen + " is tenant \"default\"; for development only"}});
  } else if (o.tls_cert.empty() && !absl::StartsWith(o.listen, "127.0.0.1:") &&
             !absl::StartsWith(o.listen, "localhost:") && !absl::StartsWith(o.listen, "[::1]:")) {
    LogEvent("auth_warning", {{"warning", "tokens travel in plaintext to " + o.listen +
                                              ": use --tls_cert/--tls_key, or a mesh or proxy that terminates TLS"}});
  }
  s->auth_ = std::make_unique<Authenticator>(std::move(auth));

  if (!o.vocab.empty()) {
    ASSIGN_OR_RETURN(Vocab v, Vocab::Load(o.vocab));
    s->vocab_ = std::make_unique<Vocab>(std::move(v));
  }

  // Metrics, scheduler, registry.
  s->metrics_ = ServerMetrics::Create(s->registry_);
  s->scheduler_ =
      std::make_unique<Scheduler>(s->store_.get(), clock, o.scheduler, s->metrics_.get());
  RETURN_IF_ERROR(s->scheduler_->Load());
  ConceptRegistryOptions ro;
  ro.base_model_id = o.scheduler.base_model_id;
  ro.tenant_max_concepts = o.scheduler.tenant_max_concepts;
  ro.max_blob_bytes = o.max_concept_bytes;
  ro.vocab = s->vocab_.get();
  s->concepts_ = std::make_unique<ConceptRegistry>(s->store_.get(), clock, ro);
  {
    Store* store = s->store_.get();
    ServerMetrics* m = s->metrics_.get();
    // At most once per 5 s: each collection scans the jobs table (it keeps finished jobs) and,
    // on SQLite, holds the store's one lock that leases and heartbeats need; several scrapers
    // (Prometheus replicas, KEDA) would otherwise each pay it.
    struct Throttle {
      absl::Mutex mu;
      absl::Time last = absl::InfinitePast();
    };
    auto throttle = std::make_shared<Throttle>();
    s->registry_.AddCollectHook([store, m, throttle] {
      absl::MutexLock lock(&throttle->mu);
      const absl::Time now = absl::Now();
      if (now - throttle->last < absl::Seconds(5)) return;
      throttle->last = now;
      CollectStoreGauges(*store, *m);
    });
  }

  // Services.
  s->context_ = std::make_unique<ServiceContext>();
  s->context_->scheduler = s->scheduler_.get();
  s->context_->registry = s->concepts_.get();
  s->context_->auth = s->auth_.get();
  s->context_->limits = o.limits;
  {
    // A training lease hands a job's images to a worker in one message, which this server sends
    // under max_message_bytes: refuse larger sets at submission rather than queue them forever.
    const int64_t lease_room = std::max<int64_t>(o.max_message_bytes - kLeaseOverheadBytes, 1);
    int64_t& limit = s->context_->limits.max_job_image_bytes;
    limit = limit > 0 ? std::min(limit, lease_room) : lease_room;
  }
  s->context_->vocab = s->vocab_.get();
  s->context_->max_upload_bytes_in_flight = o.max_upload_bytes_in_flight;
  s->context_->tenant_max_upload_bytes_in_flight = o.tenant_max_upload_bytes_in_flight;
  s->training_service_ = std::make_unique<TrainingServiceImpl>(s->context_.get());
  s->concept_service_ = std::make_unique<ConceptServiceImpl>(s->context_.get());
  s->generation_service_ = std::make_unique<GenerationServiceImpl>(s->context_.get());
  s->worker_service_ = std::make_unique<WorkerServiceImpl>(s->context_.get());

  std::shared_ptr<grpc::ServerCredentials> creds;
  if (o.tls_cert.empty() != o.tls_key.empty()) {
    return absl::InvalidArgumentError("tls_cert, tls_key: give both or neither");
  }
  if (!o.tls_cert.empty()) {
    ASSIGN_OR_RETURN(std::string cert, ReadFile(o.tls_cert));
    ASSIGN_OR_RETURN(std::string key, ReadFile(o.tls_key));
    grpc::SslServerCredentialsOptions ssl;
    ssl.pem_key_cert_pairs.push_back({key, cert});
    creds = grpc::SslServerCredentials(ssl);
  } else {
    creds = grpc::InsecureServerCredentials();
  }

  // The built-in health service registers no descriptor; health.proto's generated code does, but
  // nothing referenced it, so the linker dropped it and reflection listed grpc.health.v1.Health
  // without being able to describe it (grpcurl could not call it). Referencing it keeps it.
  (void)grpc::health::v1::HealthCheckRequest::descriptor();
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(o.listen, creds, &s->port_);
  builder.SetMaxReceiveMessageSize(o.max_message_bytes);
  builder.SetMaxSendMessageSize(o.max_message_bytes);
  // Workers ping every 20 s, also while a long poll sends nothing (gRPC's default refuses pings
  // more often than every 5 minutes without data, and closes the connection after two). The
  // server pings too, so a peer that vanished without a reset frees its calls within a minute
  // and a half rather than TCP's quarter of an hour.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 60000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 20000);
  builder.RegisterService(s->training_service_.get());
  builder.RegisterService(s->concept_service_.get());
  builder.RegisterService(s->generation_service_.get());
  builder.RegisterService(s->worker_service_.get());
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> creators;
  creators.push_back(std::make_unique<RpcMetricsInterceptorFactory>(
      s->metrics_.get(), std::vector<std::string>{v1::TrainingService::service_full_name(),
                                                  v1::ConceptService::service_full_name(),
                                                  v1::GenerationService::service_full_name(),
                                                  v1::WorkerService::service_full_name()}));
  builder.experimental().SetInterceptorCreators(std::move(creators));
  s->server_ = builder.BuildAndStart();
  if (!s->server_ || s->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("listen: cannot serve gRPC on ", o.listen));
  }

  if (!o.metrics_listen.empty()) {
    s->metrics_http_ = std::make_unique<MetricsHttpServer>(&s->registry_);
    ASSIGN_OR_RETURN(s->metrics_port_, s->metrics_http_->Start(o.metrics_listen));
  }

  auto* health = s->server_->GetHealthCheckService();
  health->SetServingStatus("", true);
  for (const char* name : kServices) health->SetServingStatus(name, true);
  health->SetServingStatus(kGenerationService, false);
  s->UpdateHealth();

  s->ticker_ = std::thread([p = s.get()] { p->TickLoop(); });
  LogEvent("server_started", {{"port", std::to_string(s->port_)},
                              {"metrics_port", std::to_string(s->metrics_port_)},
                              {"data_dir", o.data_dir.empty() ? ":memory:" : o.data_dir},
                              {"store", o.store_url.empty() ? "sqlite" : RedactStoreUrl(o.store_url)},
                              {"base_model_id", o.scheduler.base_model_id},
                              {"tls", o.tls_cert.empty() ? "false" : "true"},
                              {"tenant_tokens", std::to_string(s->auth_->tenant_tokens())},
                              {"worker_tokens", std::to_string(s->auth_->worker_tokens())}});
  return s;
}

PerfusionServer::~PerfusionServer() { Shutdown(); }

void PerfusionServer::UpdateHealth() {
  bool serving = scheduler_->GenerationWorkersConnected() > 0 && !scheduler_->draining();
  if (serving == generation_serving_) return;
  generation_serving_ = serving;
  server_->GetHealthCheckService()->SetServingStatus(kGenerationService, serving);
}

void PerfusionServer::TickLoop() {
  while (!stop_ticker_.WaitForNotificationWithTimeout(options_.tick_interval)) {
    scheduler_->Tick();
    UpdateHealth();
  }
}

void PerfusionServer::Shutdown() {
  if (shutdown_started_) return;
  shutdown_started_ = true;
  if (!server_) {
    shut_down_.Notify();
    return;
  }
  LogEvent("shutdown_started", {{"generations_in_flight",
                                 std::to_string(scheduler_->GenerationsInFlight())}});
  server_->GetHealthCheckService()->SetServingStatus(false);
  if (metrics_http_) metrics_http_->SetDraining(true);
  scheduler_->StartDrain();
  const absl::Time deadline = absl::Now() + options_.drain_timeout;
  while (scheduler_->GenerationsInFlight() > 0 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  scheduler_->Shutdown();
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  stop_ticker_.Notify();
  if (ticker_.joinable()) ticker_.join();
  if (metrics_http_) metrics_http_->Stop();
  LogEvent("shutdown_done", {});
  shut_down_.Notify();
}

void PerfusionServer::Wait() { shut_down_.WaitForNotification(); }

}  // namespace perfusion::server

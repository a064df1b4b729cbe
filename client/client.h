// perfusion::client: a small synchronous C++ client for the public perfusion.v1 API (training
// jobs, concepts, generation, health), used by perfusionctl, perfusion-load and the integration
// tests.
//
//   ClientOptions o;
//   o.server = "localhost:50051";
//   o.token = "acme-secret";                       // authorization: Bearer <token>
//   auto client = Client::Connect(o);              // no RPC yet; INVALID_ARGUMENT for bad options
//   auto job = (*client)->CreateTrainingJob(req);  // absl::StatusOr<v1::TrainingJob>
//
// Every call returns an absl::Status / StatusOr whose code is the gRPC status code of the RPC
// (the message is the server's). Unary calls get ClientOptions::timeout as their deadline unless
// the method takes its own. No call retries on its own: callers decide (CreateTrainingJob with a
// request_id is idempotent, so it is safe to retry on UNAVAILABLE).
//
// Thread safety: a Client is safe to use from several threads at once (one channel, shared).
#ifndef PERFUSION_CLIENT_CLIENT_H_
#define PERFUSION_CLIENT_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "perfusion/v1/concept.grpc.pb.h"
#include "perfusion/v1/generation.grpc.pb.h"
#include "perfusion/v1/training.grpc.pb.h"

namespace perfusion::client {

namespace v1 = ::perfusion::v1;

struct ClientOptions {
  // host:port of perfusion-server.
  std::string server = "localhost:50051";
  // Tenant token, sent as `authorization: Bearer <token>`; "" sends no authorization header.
  std::string token;
  // TLS: off (plaintext) by default. tls_ca_file: PEM roots ("" : the system roots);
  // tls_server_name: overrides the name checked in the server certificate ("" : from `server`).
  bool tls = false;
  std::string tls_ca_file;
  std::string tls_server_name;
  // Deadline of unary calls.
  absl::Duration timeout = absl::Seconds(30);
  // Largest message sent or received (the server's --max_message_bytes is 64 MiB).
  int max_message_bytes = 64 << 20;
  // Longest wait between the channel's reconnection attempts after the server went away
  // (gRPC's own default grows to 120 s, far past a server restart). Zero: gRPC's default.
  absl::Duration max_reconnect_backoff = absl::Seconds(5);
  // HTTP/2 keepalive pings this often, even between calls, and a connection whose ping goes
  // unanswered for keepalive_timeout is dropped and redialled. Without them a connection that
  // died silently (a node gone, packets dropped, no reset) holds every call until it times out,
  // for as long as TCP keeps retrying (about 15 minutes). Zero: no pings (one-shot CLIs). The
  // server accepts pings every 10 s or slower.
  absl::Duration keepalive = absl::ZeroDuration();
  absl::Duration keepalive_timeout = absl::Seconds(10);
};

// The gRPC status as an absl::Status (same code, same message).
absl::Status FromGrpcStatus(const grpc::Status& s);

// The token a file or an environment variable holds: its first line that is neither blank nor a
// '#' comment, without the surrounding whitespace ("" when there is none). A token file may end in
// a newline or carry comments, as the server's tokens files do.
std::string TokenFromText(absl::string_view text);

// INVALID_ARGUMENT naming `source` (e.g. "--token-file t.txt") when `token` holds a character a
// gRPC header value cannot carry, anything outside printable ASCII: gRPC aborts the process on
// such metadata instead of failing the call.
absl::Status CheckToken(absl::string_view token, absl::string_view source);

// A channel to options.server with the options' TLS settings and message limits.
// INVALID_ARGUMENT when tls_ca_file cannot be read or options.token fails CheckToken.
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const ClientOptions& options);

// Sends `authorization: Bearer <token>` (when token is not empty) and sets the deadline
// (a zero or negative timeout: no deadline).
void PrepareContext(grpc::ClientContext* ctx, const std::string& token, absl::Duration timeout);

// A concept as a user writes it: "cpt_<hex>" (an id), "name" (newest version) or "name@n".
struct ConceptRef {
  std::string id;
  std::string name;
  int version = 0;  // 0: newest
};
// INVALID_ARGUMENT for an empty string, a bad version ("rex@0", "rex@x").
absl::StatusOr<ConceptRef> ParseConceptRef(const std::string& text);

class Client {
 public:
  static absl::StatusOr<std::unique_ptr<Client>> Connect(const ClientOptions& options);
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  const ClientOptions& options() const { return options_; }
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }

  // ---- Training jobs ----
  // CreateTrainingJob for requests whose images fit well under the message limit, else the
  // streamed UploadTrainingJob (1 MiB chunks). Same result and errors either way.
  absl::StatusOr<v1::TrainingJob> SubmitTrainingJob(const v1::CreateTrainingJobRequest& request);
  absl::StatusOr<v1::TrainingJob> CreateTrainingJob(const v1::CreateTrainingJobRequest& request);
  absl::StatusOr<v1::TrainingJob> UploadTrainingJob(const v1::CreateTrainingJobRequest& request,
                                                    size_t chunk_bytes = 1 << 20);
  absl::StatusOr<v1::TrainingJob> GetTrainingJob(const std::string& id);
  // One page (page_size 0: the server's default).
  absl::StatusOr<v1::ListTrainingJobsResponse> ListTrainingJobs(const v1::ListTrainingJobsRequest& r);
  // Every page, newest first, at most `limit` jobs (0: all).
  absl::StatusOr<std::vector<v1::TrainingJob>> ListAllTrainingJobs(v1::JobState state, int limit = 0);
  absl::StatusOr<v1::TrainingJob> CancelTrainingJob(const std::string& id);
  // Streams events to on_event until the job is final (OK), the stream fails (its status), or
  // `timeout` passes (DEADLINE_EXCEEDED; zero: no limit). on_event returning false stops the
  // watch early with OK. wait_for_ready: wait (up to the timeout) for an unreachable server
  // instead of failing with UNAVAILABLE at once (for re-watching after a server restart).
  absl::Status WatchTrainingJob(const std::string& id,
                                const std::function<bool(const v1::TrainingJobEvent&)>& on_event,
                                absl::Duration timeout = absl::ZeroDuration(),
                                bool wait_for_ready = false);

  // ---- Concepts ----
  absl::StatusOr<v1::Concept> GetConcept(const ConceptRef& ref);
  // Every page, newest first; `name` filters by name ("" : all).
  absl::StatusOr<std::vector<v1::Concept>> ListConcepts(const std::string& name = "", int limit = 0);
  absl::Status DeleteConcept(const std::string& id);
  absl::StatusOr<v1::ExportConceptResponse> ExportConcept(const std::string& id);
  absl::StatusOr<v1::Concept> ImportConcept(const v1::ImportConceptRequest& request);

  // ---- Generation ----
  // GenerateStream: progress events go to on_progress (may be null), the result is returned.
  // `timeout` is the call's deadline (the server drops the request past it); zero: 10 minutes.
  absl::StatusOr<v1::GenerateResponse> Generate(
      const v1::GenerateRequest& request,
      const std::function<void(const v1::GenerateProgress&)>& on_progress = nullptr,
      absl::Duration timeout = absl::ZeroDuration());
  // The unary Generate RPC.
  absl::StatusOr<v1::GenerateResponse> GenerateUnary(const v1::GenerateRequest& request,
                                                     absl::Duration timeout = absl::ZeroDuration());

  // ---- Health (no token needed) ----
  // grpc.health.v1.Health/Check of `service` ("" : the server as a whole).
  absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> Health(
      const std::string& service);

 private:
  Client(ClientOptions options, std::shared_ptr<grpc::Channel> channel);
  void Prepare(grpc::ClientContext* ctx, absl::Duration timeout) const;
  void Prepare(grpc::ClientContext* ctx) const { Prepare(ctx, options_.timeout); }

  const ClientOptions options_;
  const std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::TrainingService::Stub> training_;
  std::unique_ptr<v1::ConceptService::Stub> concepts_;
  std::unique_ptr<v1::GenerationService::Stub> generation_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
};

// Exit codes of perfusionctl (docs/cli.md): 0 OK, 3 NOT_FOUND, 4 INVALID_ARGUMENT,
// 5 UNAVAILABLE, 6 UNAUTHENTICATED or PERMISSION_DENIED, 1 anything else. (2 is usage.)
inline constexpr int kExitOk = 0;
inline constexpr int kExitOther = 1;
inline constexpr int kExitUsage = 2;
inline constexpr int kExitNotFound = 3;
inline constexpr int kExitInvalidArgument = 4;
inline constexpr int kExitUnavailable = 5;
inline constexpr int kExitAuth = 6;
int ExitCodeFor(absl::StatusCode code);

// "QUEUED", "RUNNING", ... for a job state; "running" etc. parse back (any case).
std::string JobStateName(v1::JobState state);
absl::StatusOr<v1::JobState> ParseJobState(const std::string& text);
// True for SUCCEEDED, FAILED, CANCELLED.
bool IsFinal(v1::JobState state);

}  // namespace perfusion::client

#endif  // PERFUSION_CLIENT_CLIENT_H_

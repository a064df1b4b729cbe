#include "client/client.h"

#include <algorithm>
#include <chrono>
#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/match.h"

namespace perfusion::client {

absl::Status FromGrpcStatus(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

std::string TokenFromText(absl::string_view text) {
  while (!text.empty()) {
    const size_t end = text.find('\n');
    const absl::string_view line = absl::StripAsciiWhitespace(text.substr(0, end));
    if (!line.empty() && line[0] != '#') return std::string(line);
    if (end == absl::string_view::npos) break;
    text.remove_prefix(end + 1);
  }
  return "";
}

absl::Status CheckToken(absl::string_view token, absl::string_view source) {
  for (size_t i = 0; i < token.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(token[i]);
    if (c < 0x20 || c > 0x7e) {
      return absl::InvalidArgumentError(absl::StrCat(
          source, ": the token has a character a request header cannot carry (byte 0x",
          absl::Hex(c, absl::kZeroPad2), " at offset ", i,
          "); a token is one line of printable ASCII"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const ClientOptions& options) {
  if (options.server.empty()) return absl::InvalidArgumentError("server: empty address");
  if (absl::Status s = CheckToken(options.token, "token"); !s.ok()) return s;
  std::shared_ptr<grpc::ChannelCredentials> creds;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options.max_message_bytes);
  args.SetMaxSendMessageSize(options.max_message_bytes);
  if (options.max_reconnect_backoff > absl::ZeroDuration()) {
    const int max_ms = static_cast<int>(absl::ToInt64Milliseconds(options.max_reconnect_backoff));
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, max_ms);
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, std::min(max_ms, 1000));
  }
  if (options.keepalive > absl::ZeroDuration()) {
    args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, static_cast<int>(absl::ToInt64Milliseconds(options.keepalive)));
    args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
                static_cast<int>(absl::ToInt64Milliseconds(options.keepalive_timeout)));
    args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
    args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);  // a long poll sends no data for 30 s
  }
  if (options.tls) {
    grpc::SslCredentialsOptions ssl;
    if (!options.tls_ca_file.empty()) {
      std::ifstream in(options.tls_ca_file, std::ios::binary);
      if (!in) {
        return absl::InvalidArgumentError(
            absl::StrCat("tls_ca_file: cannot read ", options.tls_ca_file));
      }
      std::stringstream ss;
      ss << in.rdbuf();
      ssl.pem_root_certs = ss.str();
    }
    if (!options.tls_server_name.empty()) {
      args.SetSslTargetNameOverride(options.tls_server_name);
    }
    creds = grpc::SslCredentials(ssl);
  } else {
    creds = grpc::InsecureChannelCredentials();
  }
  return grpc::CreateCustomChannel(options.server, creds, args);
}

void PrepareContext(grpc::ClientContext* ctx, const std::string& token, absl::Duration timeout) {
  if (!token.empty()) ctx->AddMetadata("authorization", absl::StrCat("Bearer ", token));
  if (timeout > absl::ZeroDuration()) {
    ctx->set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(timeout));
  }
}

absl::StatusOr<ConceptRef> ParseConceptRef(const std::string& text) {
  ConceptRef ref;
  if (text.empty()) return absl::InvalidArgumentError("concept: empty name");
  if (absl::StartsWith(text, "cpt_")) {
    ref.id = text;
    return ref;
  }
  const size_t at = text.find('@');
  if (at == std::string::npos) {
    ref.name = text;
    return ref;
  }
  ref.name = text.substr(0, at);
  int v = 0;
  if (ref.name.empty() || !absl::SimpleAtoi(text.substr(at + 1), &v) || v < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("concept: \"", text, "\" is not NAME, NAME@VERSION (version >= 1) or an id"));
  }
  ref.version = v;
  return ref;
}

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(const ClientOptions& options) {
  auto channel = MakeChannel(options);
  if (!channel.ok()) return channel.status();
  return std::unique_ptr<Client>(new Client(options, *std::move(channel)));
}

Client::Client(ClientOptions options, std::shared_ptr<grpc::Channel> channel)
    : options_(std::move(options)),
      channel_(std::move(channel)),
      training_(v1::TrainingService::NewStub(channel_)),
      concepts_(v1::ConceptService::NewStub(channel_)),
      generation_(v1::GenerationService::NewStub(channel_)),
      health_(grpc::health::v1::Health::NewStub(channel_)) {}

void Client::Prepare(grpc::ClientContext* ctx, absl::Duration timeout) const {
  PrepareContext(ctx, options_.token, timeout);
}

// ---- Training ----

absl::StatusOr<v1::TrainingJob> Client::SubmitTrainingJob(
    const v1::CreateTrainingJobRequest& request) {
  // Leave a generous margin for the rest of the message and gRPC framing.
  if (request.ByteSizeLong() + (1 << 20) < static_cast<size_t>(options_.max_message_bytes) / 2) {
    return CreateTrainingJob(request);
  }
  return UploadTrainingJob(request);
}

absl::StatusOr<v1::TrainingJob> Client::CreateTrainingJob(
    const v1::CreateTrainingJobRequest& request) {
  grpc::ClientContext ctx;
  Prepare(&ctx, std::max(options_.timeout, absl::Seconds(60)));
  v1::TrainingJob job;
  grpc::Status s = training_->CreateTrainingJob(&ctx, request, &job);
  if (!s.ok()) return FromGrpcStatus(s);
  return job;
}

absl::StatusOr<v1::TrainingJob> Client::UploadTrainingJob(
    const v1::CreateTrainingJobRequest& request, size_t chunk_bytes) {
  if (chunk_bytes == 0) chunk_bytes = 1 << 20;
  grpc::ClientContext ctx;
  Prepare(&ctx, std::max(options_.timeout, absl::Minutes(5)));
  v1::TrainingJob job;
  auto writer = training_->UploadTrainingJob(&ctx, &job);
  v1::UploadTrainingJobRequest msg;
  auto* header = msg.mutable_header();
  *header->mutable_job() = request;
  header->mutable_job()->clear_images();
  header->set_image_count(request.images_size());
  bool ok = writer->Write(msg);
  for (int i = 0; ok && i < request.images_size(); ++i) {
    const std::string& img = request.images(i);
    // An empty image still sends one (empty) chunk so that the server sees it.
    size_t off = 0;
    do {
      v1::UploadTrainingJobRequest c;
      c.mutable_chunk()->set_image_index(i);
      c.mutable_chunk()->set_data(img.substr(off, chunk_bytes));
      off += chunk_bytes;
      ok = writer->Write(c);
    } while (ok && off < img.size());
  }
  writer->WritesDone();
  grpc::Status s = writer->Finish();
  if (!s.ok()) return FromGrpcStatus(s);
  return job;
}

absl::StatusOr<v1::TrainingJob> Client::GetTrainingJob(const std::string& id) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::GetTrainingJobRequest req;
  req.set_id(id);
  v1::TrainingJob job;
  grpc::Status s = training_->GetTrainingJob(&ctx, req, &job);
  if (!s.ok()) return FromGrpcStatus(s);
  return job;
}

absl::StatusOr<v1::ListTrainingJobsResponse> Client::ListTrainingJobs(
    const v1::ListTrainingJobsRequest& r) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::ListTrainingJobsResponse resp;
  grpc::Status s = training_->ListTrainingJobs(&ctx, r, &resp);
  if (!s.ok()) return FromGrpcStatus(s);
  return resp;
}

absl::StatusOr<std::vector<v1::TrainingJob>> Client::ListAllTrainingJobs(v1::JobState state,
                                                                          int limit) {
  std::vector<v1::TrainingJob> out;
  v1::ListTrainingJobsRequest req;
  req.set_state(state);
  req.set_page_size(limit > 0 ? std::min(limit, 500) : 500);
  while (true) {
    auto page = ListTrainingJobs(req);
    if (!page.ok()) return page.status();
    for (auto& j : *page->mutable_jobs()) {
      if (limit > 0 && static_cast<int>(out.size()) >= limit) return out;
      out.push_back(std::move(j));
    }
    if (page->next_page_token().empty()) return out;
    req.set_page_token(page->next_page_token());
  }
}

absl::StatusOr<v1::TrainingJob> Client::CancelTrainingJob(const std::string& id) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::CancelTrainingJobRequest req;
  req.set_id(id);
  v1::TrainingJob job;
  grpc::Status s = training_->CancelTrainingJob(&ctx, req, &job);
  if (!s.ok()) return FromGrpcStatus(s);
  return job;
}

absl::Status Client::WatchTrainingJob(
    const std::string& id, const std::function<bool(const v1::TrainingJobEvent&)>& on_event,
    absl::Duration timeout, bool wait_for_ready) {
  grpc::ClientContext ctx;
  Prepare(&ctx, timeout);
  ctx.set_wait_for_ready(wait_for_ready);
  v1::WatchTrainingJobRequest req;
  req.set_id(id);
  auto reader = training_->WatchTrainingJob(&ctx, req);
  v1::TrainingJobEvent ev;
  bool stopped = false;
  while (reader->Read(&ev)) {
    if (on_event && !on_event(ev)) {
      stopped = true;
      ctx.TryCancel();
      break;
    }
  }
  grpc::Status s = reader->Finish();
  if (stopped) return absl::OkStatus();
  return FromGrpcStatus(s);
}

// ---- Concepts ----

absl::StatusOr<v1::Concept> Client::GetConcept(const ConceptRef& ref) {
  if (ref.id.empty() && ref.version > 0) {
    auto all = ListConcepts(ref.name);
    if (!all.ok()) return all.status();
    for (const v1::Concept& c : *all) {
      if (c.version() == ref.version) return c;
    }
    return absl::NotFoundError(absl::StrCat("concept ", ref.name, "@", ref.version, " not found"));
  }
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::GetConceptRequest req;
  if (!ref.id.empty()) {
    req.set_id(ref.id);
  } else {
    req.set_name(ref.name);
  }
  v1::Concept c;
  grpc::Status s = concepts_->GetConcept(&ctx, req, &c);
  if (!s.ok()) return FromGrpcStatus(s);
  return c;
}

absl::StatusOr<std::vector<v1::Concept>> Client::ListConcepts(const std::string& name, int limit) {
  std::vector<v1::Concept> out;
  v1::ListConceptsRequest req;
  req.set_name(name);
  req.set_page_size(limit > 0 ? std::min(limit, 500) : 500);
  while (true) {
    grpc::ClientContext ctx;
    Prepare(&ctx);
    v1::ListConceptsResponse page;
    grpc::Status s = concepts_->ListConcepts(&ctx, req, &page);
    if (!s.ok()) return FromGrpcStatus(s);
    for (auto& c : *page.mutable_concepts()) {
      if (limit > 0 && static_cast<int>(out.size()) >= limit) return out;
      out.push_back(std::move(c));
    }
    if (page.next_page_token().empty()) return out;
    req.set_page_token(page.next_page_token());
  }
}

absl::Status Client::DeleteConcept(const std::string& id) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::DeleteConceptRequest req;
  req.set_id(id);
  v1::DeleteConceptResponse resp;
  return FromGrpcStatus(concepts_->DeleteConcept(&ctx, req, &resp));
}

absl::StatusOr<v1::ExportConceptResponse> Client::ExportConcept(const std::string& id) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::ExportConceptRequest req;
  req.set_id(id);
  v1::ExportConceptResponse resp;
  grpc::Status s = concepts_->ExportConcept(&ctx, req, &resp);
  if (!s.ok()) return FromGrpcStatus(s);
  return resp;
}

absl::StatusOr<v1::Concept> Client::ImportConcept(const v1::ImportConceptRequest& request) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::Concept c;
  grpc::Status s = concepts_->ImportConcept(&ctx, request, &c);
  if (!s.ok()) return FromGrpcStatus(s);
  return c;
}

// ---- Generation ----

absl::StatusOr<v1::GenerateResponse> Client::Generate(
    const v1::GenerateRequest& request,
    const std::function<void(const v1::GenerateProgress&)>& on_progress, absl::Duration timeout) {
  grpc::ClientContext ctx;
  Prepare(&ctx, timeout > absl::ZeroDuration() ? timeout : absl::Minutes(10));
  auto reader = generation_->GenerateStream(&ctx, request);
  v1::GenerateEvent ev;
  v1::GenerateResponse result;
  bool have_result = false;
  while (reader->Read(&ev)) {
    if (ev.has_progress()) {
      if (on_progress) on_progress(ev.progress());
    } else if (ev.has_result()) {
      result = std::move(*ev.mutable_result());
      have_result = true;
    }
  }
  grpc::Status s = reader->Finish();
  if (!s.ok()) return FromGrpcStatus(s);
  if (!have_result) return absl::InternalError("GenerateStream ended OK without a result event");
  return result;
}

absl::StatusOr<v1::GenerateResponse> Client::GenerateUnary(const v1::GenerateRequest& request,
                                                           absl::Duration timeout) {
  grpc::ClientContext ctx;
  Prepare(&ctx, timeout > absl::ZeroDuration() ? timeout : absl::Minutes(10));
  v1::GenerateResponse resp;
  grpc::Status s = generation_->Generate(&ctx, request, &resp);
  if (!s.ok()) return FromGrpcStatus(s);
  return resp;
}

// ---- Health ----

absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> Client::Health(
    const std::string& service) {
  grpc::ClientContext ctx;
  PrepareContext(&ctx, "", options_.timeout);
  grpc::health::v1::HealthCheckRequest req;
  req.set_service(service);
  grpc::health::v1::HealthCheckResponse resp;
  grpc::Status s = health_->Check(&ctx, req, &resp);
  if (!s.ok()) return FromGrpcStatus(s);
  return resp.status();
}

// ---- Helpers ----

int ExitCodeFor(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kOk:
      return kExitOk;
    case absl::StatusCode::kNotFound:
      return kExitNotFound;
    case absl::StatusCode::kInvalidArgument:
      return kExitInvalidArgument;
    case absl::StatusCode::kUnavailable:
      return kExitUnavailable;
    case absl::StatusCode::kUnauthenticated:
    case absl::StatusCode::kPermissionDenied:
      return kExitAuth;
    default:
      return kExitOther;
  }
}

std::string JobStateName(v1::JobState state) {
  const std::string& n = v1::JobState_Name(state);
  return n.empty() ? absl::StrCat("STATE_", static_cast<int>(state)) : n;
}

absl::StatusOr<v1::JobState> ParseJobState(const std::string& text) {
  v1::JobState s;
  if (v1::JobState_Parse(absl::AsciiStrToUpper(text), &s)) return s;
  return absl::InvalidArgumentError(absl::StrCat(
      "state: \"", text, "\" is not one of queued, running, succeeded, failed, cancelling, "
      "cancelled"));
}

bool IsFinal(v1::JobState state) {
  return state == v1::SUCCEEDED || state == v1::FAILED || state == v1::CANCELLED;
}

}  // namespace perfusion::client

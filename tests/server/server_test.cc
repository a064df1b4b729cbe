// Integration: the real perfusion-server in-process on 127.0.0.1:0, driven through its public
// gRPC API by a client and through the real WorkerService by the test acting as the worker
// (that is the worker protocol, not a mock). Time is a FakeClock, advanced by the test.
#include <arpa/inet.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <google/protobuf/descriptor.pb.h>
#include <google/protobuf/message.h>

#include <cmath>
#include <future>
#include <limits>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "perfusion/v1/concept.grpc.pb.h"
#include "perfusion/v1/generation.grpc.pb.h"
#include "perfusion/v1/training.grpc.pb.h"
#include "perfusion/v1/worker.grpc.pb.h"
#include "server/log.h"
#include "server/server.h"
#include "server/services.h"
#include "server/status_util.h"
#include "tests/server/server_test_util.h"
#include "tests/server/status_matchers.h"

namespace perfusion::server {
namespace {

using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::Not;
using testing::HttpGet;
using testing::IsOk;
using testing::StatusIs;
using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;
constexpr auto kInvalid = absl::StatusCode::kInvalidArgument;

// Polls `pred` for up to 10 s of real time (for effects of other threads).
template <typename Pred>
bool Eventually(Pred pred) {
  for (int i = 0; i < 1000; ++i) {
    if (pred()) return true;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return pred();
}

class ServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { SetLogEnabled(false); }

  void SetUp() override {
    dir_ = testing::MakeTempDir();
    tokens_ = testing::WriteFile(dir_, "tokens", "acme-token acme\nglobex-token globex\n");
    workers_ = testing::WriteFile(dir_, "workers", "worker-token\n");
    StartServer();
  }
  void TearDown() override {
    if (server_) server_->Shutdown();
  }

  virtual ServerOptions Options() {
    ServerOptions o;
    o.listen = "127.0.0.1:0";
    o.metrics_listen = "127.0.0.1:0";
    o.data_dir = dir_ + "/data";
    o.tokens_file = tokens_;
    o.worker_tokens_file = workers_;
    std::string vocab = testing::SharedDir() + "/data/clip/vocab.json";
    if (testing::FileExists(vocab)) o.vocab = vocab;
    o.limits.max_image_bytes = 64 << 10;
    o.limits.max_prompt_chars = 200;
    o.scheduler.base_model_id = "tiny";
    o.scheduler.lease_duration = absl::Seconds(30);
    o.scheduler.max_attempts = 3;
    o.scheduler.tenant_max_jobs = 4;
    o.drain_timeout = absl::Seconds(10);
    o.clock = &clock_;
    if (max_message_bytes_ > 0) o.max_message_bytes = max_message_bytes_;
    return o;
  }

  int max_message_bytes_ = 0;  // > 0: the server's max_message_bytes (RestartServer to apply)

  void StartServer() {
    auto s = PerfusionServer::Start(Options());
    ASSERT_THAT(s, IsOk());
    server_ = *std::move(s);
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    args.SetMaxSendMessageSize(64 << 20);
    channel_ = grpc::CreateCustomChannel("127.0.0.1:" + std::to_string(server_->port()),
                                         grpc::InsecureChannelCredentials(), args);
    training_ = v1::TrainingService::NewStub(channel_);
    concepts_ = v1::ConceptService::NewStub(channel_);
    generation_ = v1::GenerationService::NewStub(channel_);
    worker_ = v1::WorkerService::NewStub(channel_);
    health_ = grpc::health::v1::Health::NewStub(channel_);
  }
  void RestartServer() {
    server_->Shutdown();
    server_.reset();
    StartServer();
  }

  std::unique_ptr<grpc::ClientContext> Ctx(const std::string& token = "acme-token",
                                           absl::Duration timeout = absl::Seconds(20)) {
    auto ctx = std::make_unique<grpc::ClientContext>();
    if (!token.empty()) ctx->AddMetadata("authorization", "Bearer " + token);
    ctx->set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    return ctx;
  }

  v1::CreateTrainingJobRequest Job(const std::string& name, int images = 3) {
    v1::CreateTrainingJobRequest r;
    r.set_concept_name(name);
    r.set_superclass("toy");
    for (int i = 0; i < images; ++i) r.add_images(testing::MakePng(16 + i, 16));
    r.mutable_options()->set_steps(40);
    return r;
  }
  absl::StatusOr<v1::TrainingJob> Create(const v1::CreateTrainingJobRequest& r,
                                         const std::string& token = "acme-token") {
    v1::TrainingJob job;
    grpc::Status s = training_->CreateTrainingJob(Ctx(token).get(), r, &job);
    if (!s.ok()) return FromGrpcStatus(s);
    return job;
  }
  v1::TrainingJob GetJob(const std::string& id) {
    v1::GetTrainingJobRequest r;
    r.set_id(id);
    v1::TrainingJob job;
    EXPECT_THAT(training_->GetTrainingJob(Ctx().get(), r, &job), IsOk());
    return job;
  }
  absl::StatusOr<v1::GenerateResponse> Generate(const v1::GenerateRequest& r,
                                                const std::string& token = "acme-token",
                                                absl::Duration timeout = absl::Seconds(20)) {
    v1::GenerateResponse resp;
    grpc::Status s = generation_->Generate(Ctx(token, timeout).get(), r, &resp);
    if (!s.ok()) return FromGrpcStatus(s);
    return resp;
  }
  absl::StatusOr<v1::Concept> Import(const std::string& blob, const std::string& token = "acme-token",
                                     const std::string& name = "") {
    v1::ImportConceptRequest r;
    r.set_blob(blob);
    r.set_name(name);
    v1::Concept c;
    grpc::Status s = concepts_->ImportConcept(Ctx(token).get(), r, &c);
    if (!s.ok()) return FromGrpcStatus(s);
    return c;
  }

  // ---- the worker side ----
  std::string RegisterWorker(bool training = true, bool generation = true) {
    v1::RegisterWorkerRequest r;
    r.set_name("test-worker");
    r.set_base_model_id("tiny");
    r.mutable_capabilities()->set_training(training);
    r.mutable_capabilities()->set_generation(generation);
    v1::RegisterWorkerResponse resp;
    EXPECT_THAT(worker_->RegisterWorker(Ctx("worker-token").get(), r, &resp), IsOk());
    EXPECT_EQ(resp.lease_duration().seconds(), 30);
    EXPECT_EQ(resp.heartbeat_interval().seconds(), 10);
    return resp.worker_id();
  }
  v1::LeaseWorkResponse Lease(const std::string& worker_id, int wait_ms = 0) {
    v1::LeaseWorkRequest r;
    r.set_worker_id(worker_id);
    r.mutable_wait()->set_nanos(wait_ms % 1000 * 1000000);
    r.mutable_wait()->set_seconds(wait_ms / 1000);
    v1::LeaseWorkResponse resp;
    EXPECT_THAT(worker_->LeaseWork(Ctx("worker-token").get(), r, &resp), IsOk());
    return resp;
  }
  absl::StatusOr<v1::HeartbeatResponse> Heartbeat(const std::string& lease, int step, int total,
                                                  float loss = 0) {
    v1::HeartbeatRequest r;
    r.set_lease_id(lease);
    r.set_step(step);
    r.set_total_steps(total);
    r.set_loss(loss);
    v1::HeartbeatResponse resp;
    grpc::Status s = worker_->Heartbeat(Ctx("worker-token").get(), r, &resp);
    if (!s.ok()) return FromGrpcStatus(s);
    return resp;
  }
  absl::StatusOr<v1::Concept> CompleteTraining(const std::string& lease, const std::string& blob) {
    v1::CompleteTrainingRequest r;
    r.set_lease_id(lease);
    r.set_concept_blob(blob);
    r.set_final_loss(0.01f);
    r.set_steps(40);
    v1::CompleteTrainingResponse resp;
    grpc::Status s = worker_->CompleteTraining(Ctx("worker-token").get(), r, &resp);
    if (!s.ok()) return FromGrpcStatus(s);
    return resp.concept();
  }
  absl::Status CompleteGeneration(const v1::LeaseWorkResponse& lease) {
    v1::CompleteGenerationRequest r;
    r.set_lease_id(lease.lease_id());
    const auto& req = lease.generation().request();
    for (int i = 0; i < req.num_images(); ++i) {
      auto* img = r.add_images();
      img->set_png(testing::MakePng(req.width(), req.height()));
      img->set_seed(req.seed() + i);
      img->set_width(req.width());
      img->set_height(req.height());
    }
    r.mutable_compute_duration()->set_seconds(1);
    v1::CompleteGenerationResponse resp;
    return FromGrpcStatus(worker_->CompleteGeneration(Ctx("worker-token").get(), r, &resp));
  }

  // The server still answers: health SERVING and an RPC round trip.
  void ExpectHealthy() {
    HealthCheckRequest hr;
    HealthCheckResponse hresp;
    ASSERT_THAT(health_->Check(Ctx("").get(), hr, &hresp), IsOk());
    EXPECT_EQ(hresp.status(), HealthCheckResponse::SERVING);
    v1::ListTrainingJobsRequest lr;
    v1::ListTrainingJobsResponse lresp;
    EXPECT_THAT(training_->ListTrainingJobs(Ctx().get(), lr, &lresp), IsOk());
  }

  FakeClock clock_;
  std::string dir_, tokens_, workers_;
  std::unique_ptr<PerfusionServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::TrainingService::Stub> training_;
  std::unique_ptr<v1::ConceptService::Stub> concepts_;
  std::unique_ptr<v1::GenerationService::Stub> generation_;
  std::unique_ptr<v1::WorkerService::Stub> worker_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
};

// ---- reflection, with descriptors from the process's generated pool (no .proto files) ----

// One request/response exchange on grpc.reflection.v1alpha.ServerReflection.
std::unique_ptr<google::protobuf::Message> Reflect(std::shared_ptr<grpc::Channel> channel,
                                                   const std::string& field,
                                                   const std::string& value) {
  const auto* pool = google::protobuf::DescriptorPool::generated_pool();
  const auto* req_desc = pool->FindMessageTypeByName("grpc.reflection.v1alpha.ServerReflectionRequest");
  const auto* resp_desc =
      pool->FindMessageTypeByName("grpc.reflection.v1alpha.ServerReflectionResponse");
  if (!req_desc || !resp_desc) return nullptr;
  auto* factory = google::protobuf::MessageFactory::generated_factory();
  std::unique_ptr<google::protobuf::Message> req(factory->GetPrototype(req_desc)->New());
  req->GetReflection()->SetString(req.get(), req_desc->FindFieldByName(field), value);
  std::string bytes;
  req->SerializeToString(&bytes);

  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
  grpc::CompletionQueue cq;
  auto call = stub.PrepareCall(&ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                               &cq);
  void* tag;
  bool ok = false;
  auto step = [&](int t) { return cq.Next(&tag, &ok) && tag == reinterpret_cast<void*>(t) && ok; };
  call->StartCall(reinterpret_cast<void*>(1));
  if (!step(1)) return nullptr;
  grpc::Slice slice(bytes);
  grpc::ByteBuffer out(&slice, 1);
  call->Write(out, reinterpret_cast<void*>(2));
  if (!step(2)) return nullptr;
  grpc::ByteBuffer in;
  call->Read(&in, reinterpret_cast<void*>(3));
  if (!step(3)) return nullptr;
  call->WritesDone(reinterpret_cast<void*>(4));
  step(4);
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(5));
  step(5);
  std::vector<grpc::Slice> slices;
  in.Dump(&slices);
  std::string data;
  for (const auto& s : slices) data.append(reinterpret_cast<const char*>(s.begin()), s.size());
  std::unique_ptr<google::protobuf::Message> resp(factory->GetPrototype(resp_desc)->New());
  if (!resp->ParseFromString(data)) return nullptr;
  return resp;
}

TEST_F(ServerTest, HealthAndReflectionWorkWithoutProtoFiles) {
  HealthCheckRequest hr;
  HealthCheckResponse hresp;
  for (const char* service : {"", "perfusion.v1.TrainingService", "perfusion.v1.ConceptService"}) {
    hr.set_service(service);
    ASSERT_THAT(health_->Check(Ctx("").get(), hr, &hresp), IsOk()) << service;
    EXPECT_EQ(hresp.status(), HealthCheckResponse::SERVING) << service;
  }
  hr.set_service("no.such.Service");
  EXPECT_THAT(health_->Check(Ctx("").get(), hr, &hresp), StatusIs(absl::StatusCode::kNotFound));

  auto list = Reflect(channel_, "list_services", "*");
  ASSERT_NE(list, nullptr);
  std::string text = list->DebugString();
  for (const char* s : {"perfusion.v1.TrainingService", "perfusion.v1.ConceptService",
                        "perfusion.v1.GenerationService", "perfusion.v1.WorkerService",
                        "grpc.health.v1.Health"}) {
    EXPECT_THAT(text, HasSubstr(s));
  }
  for (const auto& [symbol, file] :
       std::vector<std::pair<std::string, std::string>>{
           {"grpc.health.v1.Health", "grpc/health/v1/health.proto"},
           {"perfusion.v1.GenerationService", "perfusion/v1/generation.proto"}}) {
    auto resp = Reflect(channel_, "file_containing_symbol", symbol);
    ASSERT_NE(resp, nullptr) << symbol;
    const auto* fdr_field = resp->GetDescriptor()->FindFieldByName("file_descriptor_response");
    const auto& fdr = resp->GetReflection()->GetMessage(*resp, fdr_field);
    const auto* bytes_field = fdr.GetDescriptor()->FindFieldByName("file_descriptor_proto");
    ASSERT_GT(fdr.GetReflection()->FieldSize(fdr, bytes_field), 0) << symbol;
    google::protobuf::FileDescriptorProto fd;
    ASSERT_TRUE(fd.ParseFromString(fdr.GetReflection()->GetRepeatedString(fdr, bytes_field, 0)));
    EXPECT_EQ(fd.name(), file);
  }
}

TEST_F(ServerTest, GenerationServiceServesOnlyWhileAWorkerIsConnected) {
  HealthCheckRequest hr;
  hr.set_service("perfusion.v1.GenerationService");
  HealthCheckResponse hresp;
  ASSERT_THAT(health_->Check(Ctx("").get(), hr, &hresp), IsOk());
  EXPECT_EQ(hresp.status(), HealthCheckResponse::NOT_SERVING);
  RegisterWorker();
  EXPECT_TRUE(Eventually([&] {
    return health_->Check(Ctx("").get(), hr, &hresp).ok() &&
           hresp.status() == HealthCheckResponse::SERVING;
  }));
}

TEST_F(ServerTest, MissingOrWrongTokensAreRefused) {
  EXPECT_THAT(Create(Job("teddy"), ""), StatusIs(absl::StatusCode::kUnauthenticated));
  EXPECT_THAT(Create(Job("teddy"), "wrong"), StatusIs(absl::StatusCode::kUnauthenticated));
  EXPECT_THAT(Create(Job("teddy"), "worker-token"), StatusIs(absl::StatusCode::kPermissionDenied));
  v1::RegisterWorkerRequest r;
  r.set_base_model_id("tiny");
  r.mutable_capabilities()->set_training(true);
  v1::RegisterWorkerResponse resp;
  EXPECT_THAT(worker_->RegisterWorker(Ctx("acme-token").get(), r, &resp),
              StatusIs(absl::StatusCode::kPermissionDenied));
  EXPECT_THAT(worker_->RegisterWorker(Ctx("").get(), r, &resp),
              StatusIs(absl::StatusCode::kUnauthenticated));
  ExpectHealthy();
}

TEST_F(ServerTest, BadImagesAreInvalidArgumentNamingTheField) {
  auto no_images = Job("teddy", 0);
  EXPECT_THAT(Create(no_images), StatusIs(kInvalid, HasSubstr("images: no images")));

  auto undecodable = Job("teddy");
  undecodable.set_images(1, "this is not an image at all");
  EXPECT_THAT(Create(undecodable), StatusIs(kInvalid, HasSubstr("images[1]: not a PNG or JPEG")));

  auto truncated = Job("teddy");
  truncated.set_images(0, truncated.images(0).substr(0, 40));
  EXPECT_THAT(Create(truncated), StatusIs(kInvalid, HasSubstr("images[0]: PNG")));

  auto huge = Job("teddy");
  huge.set_images(2, testing::MakePng(200, 200) + std::string(70 << 10, 'x'));
  EXPECT_THAT(Create(huge), StatusIs(kInvalid, HasSubstr("images[2]: ")));
  EXPECT_THAT(Create(huge), StatusIs(kInvalid, HasSubstr("exceeds the limit of 65536 bytes")));

  EXPECT_THAT(Create(Job("teddy", 21)), StatusIs(kInvalid, HasSubstr("images: 21 images")));
  EXPECT_THAT(Create(Job("teddy", 2)), StatusIs(kInvalid, HasSubstr("images: 2 images")));
  ExpectHealthy();
}

// With the base model's vocabulary, an imported blob's superclass token must be the word's own
// (the worker locks the keys to it).
TEST_F(ServerTest, ImportRefusesABlobLockedToAnotherToken) {
  if (!testing::FileExists(testing::SharedDir() + "/data/clip/vocab.json")) GTEST_SKIP() << "no CLIP vocabulary";
  testing::ConceptBlobSpec spec;
  spec.edit_header = [](nlohmann::json& h) { h["superclass_token_id"] = 49408; };
  EXPECT_THAT(Import(testing::MakeConceptBlob(spec)),
              StatusIs(kInvalid, HasSubstr("superclass_token_id 49408 is not the token of its superclass \"toy\"")));
  ASSERT_THAT(Import(testing::MakeConceptBlob("tiny", "teddy", "toy")), IsOk());
}

TEST_F(ServerTest, InvalidArgumentCarriesAGoogleRpcBadRequestNamingTheField) {
  auto job = Job("teddy");
  job.set_images(1, "this is not an image at all");
  v1::TrainingJob out;
  grpc::Status s = training_->CreateTrainingJob(Ctx("acme-token").get(), job, &out);
  ASSERT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  google::rpc::Status details;
  ASSERT_TRUE(details.ParseFromString(s.error_details())) << "no grpc-status-details-bin";
  EXPECT_EQ(details.code(), 3);
  EXPECT_EQ(details.message(), s.error_message());
  ASSERT_EQ(details.details_size(), 1);
  EXPECT_EQ(details.details(0).type_url(), "type.googleapis.com/google.rpc.BadRequest");
  google::rpc::BadRequest bad;
  ASSERT_TRUE(details.details(0).UnpackTo(&bad));
  ASSERT_EQ(bad.field_violations_size(), 1);
  EXPECT_EQ(bad.field_violations(0).field(), "images[1]");
  EXPECT_THAT(bad.field_violations(0).description(), HasSubstr("not a PNG or JPEG"));
  // A map key may hold '-', '/' and '.': the field is still recognised.
  job = Job("teddy");
  (*job.mutable_labels())["app.kubernetes.io/team-a"] = std::string("bad\x01value");
  s = training_->CreateTrainingJob(Ctx("acme-token").get(), job, &out);
  ASSERT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  ASSERT_TRUE(details.ParseFromString(s.error_details())) << "no details for " << s.error_message();
  ASSERT_EQ(details.details_size(), 1);
  ASSERT_TRUE(details.details(0).UnpackTo(&bad));
  ASSERT_EQ(bad.field_violations_size(), 1);
  EXPECT_EQ(bad.field_violations(0).field(), "labels[app.kubernetes.io/team-a]");
  // A value's limit is 256 characters, not bytes: 256 two-byte letters pass, 257 do not.
  std::string e_acute;
  for (int i = 0; i < 256; ++i) e_acute += "\xc3\xa9";
  job = Job("teddy");
  (*job.mutable_labels())["team"] = e_acute;
  EXPECT_TRUE(training_->CreateTrainingJob(Ctx("acme-token").get(), job, &out).ok());
  job = Job("teddy2");
  (*job.mutable_labels())["team"] = e_acute + "e";
  s = training_->CreateTrainingJob(Ctx("acme-token").get(), job, &out);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("labels[team]"));
  // An empty id is INVALID_ARGUMENT for WatchTrainingJob too, as for Get and Cancel.
  {
    auto ctx = Ctx();
    v1::WatchTrainingJobRequest wr;
    auto reader = training_->WatchTrainingJob(ctx.get(), wr);
    v1::TrainingJobEvent ev;
    while (reader->Read(&ev)) {
    }
    s = reader->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr("id: empty"));
  }
  // Other codes carry no details.
  v1::GetTrainingJobRequest get;
  get.set_id("job_0000000000000000");
  s = training_->GetTrainingJob(Ctx("acme-token").get(), get, &out);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(s.error_details().empty());
}

TEST(ToGrpcStatusTest, OnlyFieldPrefixedArgumentErrorsGetDetails) {
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  EXPECT_TRUE(ToGrpcStatus(absl::InvalidArgumentError("no field prefix here")).error_details().empty());
  EXPECT_TRUE(ToGrpcStatus(absl::InvalidArgumentError("Bad Field: x")).error_details().empty());
  EXPECT_TRUE(ToGrpcStatus(absl::FailedPreconditionError("job: done")).error_details().empty());
  grpc::Status s = ToGrpcStatus(absl::OutOfRangeError("options.learning_rate: 2 is outside [0, 1]"));
  google::rpc::Status d;
  ASSERT_TRUE(d.ParseFromString(s.error_details()));
  google::rpc::BadRequest bad;
  ASSERT_TRUE(d.details(0).UnpackTo(&bad));
  EXPECT_EQ(bad.field_violations(0).field(), "options.learning_rate");
  EXPECT_EQ(bad.field_violations(0).description(), "2 is outside [0, 1]");
}

TEST_F(ServerTest, BadNamesAndSuperclassesAreInvalidArgument) {
  auto multi = Job("teddy");
  multi.set_superclass("teddy bear");
  EXPECT_THAT(Create(multi), StatusIs(kInvalid, HasSubstr("superclass: \"teddy bear\"")));
  auto name = Job("Teddy!");
  EXPECT_THAT(Create(name), StatusIs(kInvalid, HasSubstr("concept_name")));
  auto steps = Job("teddy");
  steps.mutable_options()->set_steps(0);
  EXPECT_THAT(Create(steps), StatusIs(kInvalid, HasSubstr("options.steps: 0")));
  if (!testing::FileExists(testing::SharedDir() + "/data/clip/vocab.json")) {
    GTEST_SKIP() << "no CLIP vocab in the shared folder";
  }
  auto unknown = Job("teddy");
  unknown.set_superclass("plushie");
  EXPECT_THAT(Create(unknown),
              StatusIs(kInvalid, HasSubstr("superclass: \"plushie\" is not a single CLIP token")));
  ExpectHealthy();
}

TEST_F(ServerTest, BadGenerationRequestsGetTheRightStatus) {
  ASSERT_THAT(Import(testing::MakeConceptBlob("tiny", "teddy", "toy")), IsOk());
  ASSERT_THAT(Import(testing::MakeConceptBlob("tiny", "secret", "cat"), "globex-token"), IsOk());
  auto req = [](const std::string& prompt) {
    v1::GenerateRequest r;
    r.set_prompt(prompt);
    return r;
  };
  EXPECT_THAT(Generate(req("a photo of <ghost>")),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("prompt: concept <ghost> not found")));
  EXPECT_THAT(Generate(req("<teddy> with <secret>")),  // globex's concept
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("<secret>")));
  EXPECT_THAT(Generate(req(std::string(201, 'a'))), StatusIs(kInvalid, HasSubstr("prompt: 201")));
  EXPECT_THAT(Generate(req("a <Teddy")), StatusIs(kInvalid, HasSubstr("prompt: malformed")));
  auto r = req("a photo of <teddy>");
  r.set_steps(0);
  EXPECT_THAT(Generate(r), StatusIs(kInvalid, HasSubstr("steps: 0 is outside 1..150")));
  r.set_steps(1000);
  EXPECT_THAT(Generate(r), StatusIs(kInvalid, HasSubstr("steps: 1000")));
  r.clear_steps();
  r.set_width(0);
  EXPECT_THAT(Generate(r), StatusIs(kInvalid, HasSubstr("width: 0")));
  r.set_width(4096);
  EXPECT_THAT(Generate(r), StatusIs(kInvalid, HasSubstr("width: 4096")));
  r.set_width(64);
  r.set_height(60);
  EXPECT_THAT(Generate(r), StatusIs(kInvalid, HasSubstr("height: 60 is not a multiple of 8")));
  r.set_height(64);
  EXPECT_THAT(Generate(r), StatusIs(absl::StatusCode::kUnavailable,
                                    HasSubstr("no generation worker is connected")));
  ExpectHealthy();
}

TEST_F(ServerTest, ImportRejectsCorruptedAndForeignBlobs) {
  std::string blob = testing::MakeConceptBlob("tiny", "teddy", "toy");
  std::string corrupted = blob;
  corrupted[10] = '\x01';  // inside the JSON header
  EXPECT_THAT(Import(corrupted), StatusIs(kInvalid, HasSubstr("blob: ")));
  std::string flipped = blob;
  flipped[blob.size() - 50] ^= 0x10;  // in the tensor bytes
  EXPECT_THAT(Import(flipped), StatusIs(kInvalid, HasSubstr("blob: checksum mismatch")));
  EXPECT_THAT(Import("PFCN"), StatusIs(kInvalid, HasSubstr("blob: ")));
  EXPECT_THAT(Import(""), StatusIs(kInvalid, HasSubstr("blob: empty")));
  EXPECT_THAT(Import(testing::MakeConceptBlob("sd15", "teddy", "toy")),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("base model \"sd15\"")));
  // --max_concept_bytes (4 MiB by default) bounds what a tenant stores per concept.
  EXPECT_THAT(Import(testing::MakeConceptBlob("tiny", "big", "toy", (4 << 20) + 1024)),
              StatusIs(kInvalid, HasSubstr("exceeds the limit of 4194304")));
  EXPECT_THAT(Import(testing::MakeConceptBlob("tiny", "big", "toy", (4 << 20) - 4096)), IsOk());
  ExpectHealthy();
}

TEST_F(ServerTest, ConceptsAreTenantScopedAndExportRoundTrips) {
  std::string blob = testing::MakeConceptBlob("tiny", "teddy", "toy");
  auto c = Import(blob);
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->version(), 1);
  EXPECT_EQ(Import(blob)->id(), c->id());  // same name and digest: the same concept
  EXPECT_EQ(Import(testing::MakeConceptBlob("tiny", "teddy", "toy", 99))->version(), 2);

  v1::ExportConceptRequest er;
  er.set_id(c->id());
  v1::ExportConceptResponse eresp;
  ASSERT_THAT(concepts_->ExportConcept(Ctx().get(), er, &eresp), IsOk());
  EXPECT_EQ(eresp.blob(), blob);
  EXPECT_EQ(eresp.concept().digest(), c->digest());
  EXPECT_THAT(concepts_->ExportConcept(Ctx("globex-token").get(), er, &eresp),
              StatusIs(absl::StatusCode::kNotFound));
  // Import into another tenant under a new name.
  auto other = Import(eresp.blob(), "globex-token", "bear");
  ASSERT_THAT(other, IsOk());
  EXPECT_EQ(other->name(), "bear");

  v1::UpdateConceptRequest ur;
  ur.set_id(c->id());
  (*ur.mutable_set_labels())["team"] = "vision";
  v1::Concept updated;
  ASSERT_THAT(concepts_->UpdateConcept(Ctx().get(), ur, &updated), IsOk());
  EXPECT_EQ(updated.labels().at("team"), "vision");
  v1::GetConceptRequest gr;
  gr.set_name("teddy");
  v1::Concept got;
  ASSERT_THAT(concepts_->GetConcept(Ctx().get(), gr, &got), IsOk());
  EXPECT_EQ(got.version(), 2);
  v1::ListConceptsRequest lr;
  lr.set_page_size(1);
  v1::ListConceptsResponse page1, page2;
  ASSERT_THAT(concepts_->ListConcepts(Ctx().get(), lr, &page1), IsOk());
  ASSERT_EQ(page1.concepts_size(), 1);
  lr.set_page_token(page1.next_page_token());
  ASSERT_THAT(concepts_->ListConcepts(Ctx().get(), lr, &page2), IsOk());
  ASSERT_EQ(page2.concepts_size(), 1);
  EXPECT_EQ(page2.concepts(0).id(), c->id());
  EXPECT_EQ(page2.next_page_token(), "");
  v1::DeleteConceptRequest dr;
  dr.set_id(c->id());
  v1::DeleteConceptResponse dresp;
  EXPECT_THAT(concepts_->DeleteConcept(Ctx("globex-token").get(), dr, &dresp),
              StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(concepts_->DeleteConcept(Ctx().get(), dr, &dresp), IsOk());
  EXPECT_THAT(concepts_->ExportConcept(Ctx().get(), er, &eresp),
              StatusIs(absl::StatusCode::kNotFound));
}

TEST_F(ServerTest, DuplicateRequestIdReturnsTheSameJob) {
  auto r = Job("teddy");
  r.set_request_id("client-req-1");
  auto a = Create(r);
  auto b = Create(r);
  ASSERT_THAT(b, IsOk());
  EXPECT_EQ(a->id(), b->id());
  r.set_superclass("dog");
  EXPECT_THAT(Create(r), StatusIs(absl::StatusCode::kAlreadyExists, HasSubstr("request_id")));
  v1::ListTrainingJobsRequest lr;
  v1::ListTrainingJobsResponse lresp;
  ASSERT_THAT(training_->ListTrainingJobs(Ctx().get(), lr, &lresp), IsOk());
  EXPECT_EQ(lresp.jobs_size(), 1);
  ExpectHealthy();
}

TEST_F(ServerTest, CancellingAFinishedJobIsFailedPrecondition) {
  auto job = Create(Job("teddy"));
  v1::CancelTrainingJobRequest cr;
  cr.set_id(job->id());
  v1::TrainingJob out;
  ASSERT_THAT(training_->CancelTrainingJob(Ctx().get(), cr, &out), IsOk());
  EXPECT_EQ(out.state(), v1::CANCELLED);
  EXPECT_THAT(training_->CancelTrainingJob(Ctx().get(), cr, &out),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("already CANCELLED")));
  EXPECT_THAT(training_->CancelTrainingJob(Ctx("globex-token").get(), cr, &out),
              StatusIs(absl::StatusCode::kNotFound));
  ExpectHealthy();
}

TEST_F(ServerTest, TenantQuotaIsResourceExhausted) {
  for (int i = 0; i < 4; ++i) ASSERT_THAT(Create(Job("c" + std::to_string(i))), IsOk());
  EXPECT_THAT(Create(Job("c4")), StatusIs(absl::StatusCode::kResourceExhausted,
                                          HasSubstr("tenant quota")));
  EXPECT_THAT(Create(Job("c4"), "globex-token"), IsOk());  // another tenant is unaffected
  ExpectHealthy();
}

TEST_F(ServerTest, TrainingRoundTripThroughTheWorkerProtocol) {
  v1::CreateTrainingJobRequest req = Job("teddy");
  for (const char* c : {"a photo of <teddy>", "<teddy> on the left", "a small <teddy> on a beach"}) {
    req.mutable_options()->add_captions(c);
  }
  auto job = Create(req);
  ASSERT_THAT(job, IsOk());
  EXPECT_EQ(job->state(), v1::QUEUED);
  EXPECT_EQ(job->queue_position(), 1);
  EXPECT_TRUE(job->options().has_seed());

  std::string w = RegisterWorker();
  v1::LeaseWorkResponse lease = Lease(w);
  ASSERT_TRUE(lease.has_training());
  EXPECT_EQ(lease.training().job_id(), job->id());
  EXPECT_EQ(lease.training().tenant(), "acme");
  EXPECT_EQ(lease.training().superclass(), "toy");
  ASSERT_EQ(lease.training().images_size(), 3);
  EXPECT_EQ(lease.training().images(2), Job("teddy").images(2));
  EXPECT_EQ(lease.training().options().steps(), 40);
  ASSERT_EQ(lease.training().options().captions_size(), 3);
  EXPECT_EQ(lease.training().options().captions(1), "<teddy> on the left");
  EXPECT_EQ(lease.training().attempt(), 1);

  ASSERT_THAT(Heartbeat(lease.lease_id(), 20, 40, 0.5f), IsOk());
  v1::TrainingJob running = GetJob(job->id());
  EXPECT_EQ(running.state(), v1::RUNNING);
  EXPECT_EQ(running.progress().step(), 20);
  EXPECT_FLOAT_EQ(running.progress().loss(), 0.5f);

  auto concept = CompleteTraining(lease.lease_id(), testing::MakeConceptBlob("tiny", "teddy", "toy"));
  ASSERT_THAT(concept, IsOk());
  v1::TrainingJob done = GetJob(job->id());
  EXPECT_EQ(done.state(), v1::SUCCEEDED);
  EXPECT_EQ(done.concept_id(), concept->id());
  v1::ListConceptsRequest lr;
  v1::ListConceptsResponse lresp;
  ASSERT_THAT(concepts_->ListConcepts(Ctx().get(), lr, &lresp), IsOk());
  ASSERT_EQ(lresp.concepts_size(), 1);
  EXPECT_EQ(lresp.concepts(0).name(), "teddy");
  EXPECT_EQ(lresp.concepts(0).source_job_id(), job->id());
  // The lease is over: a late heartbeat tells the worker to drop it.
  EXPECT_THAT(Heartbeat(lease.lease_id(), 40, 40), StatusIs(absl::StatusCode::kNotFound));
  // Watching a finished job: one final event, then OK.
  v1::WatchTrainingJobRequest wr;
  wr.set_id(job->id());
  auto ctx = Ctx();
  auto reader = training_->WatchTrainingJob(ctx.get(), wr);
  v1::TrainingJobEvent e;
  ASSERT_TRUE(reader->Read(&e));
  EXPECT_EQ(e.state(), v1::SUCCEEDED);
  EXPECT_EQ(e.concept_id(), concept->id());
  EXPECT_FALSE(reader->Read(&e));
  EXPECT_THAT(reader->Finish(), IsOk());
}

TEST_F(ServerTest, WatchStreamsProgressUntilTheJobSucceeds) {
  auto job = Create(Job("teddy"));
  absl::Mutex mu;
  std::vector<v1::TrainingJobEvent> events;
  grpc::Status final_status;
  std::thread watcher([&] {
    v1::WatchTrainingJobRequest wr;
    wr.set_id(job->id());
    auto ctx = Ctx();
    auto reader = training_->WatchTrainingJob(ctx.get(), wr);
    v1::TrainingJobEvent e;
    while (reader->Read(&e)) {
      absl::MutexLock lock(&mu);
      events.push_back(e);
    }
    final_status = reader->Finish();
  });
  auto has_state = [&](v1::JobState s) {
    absl::MutexLock lock(&mu);
    for (const auto& e : events) {
      if (e.state() == s) return true;
    }
    return false;
  };
  EXPECT_TRUE(Eventually([&] { return has_state(v1::QUEUED); }));
  v1::LeaseWorkResponse lease = Lease(RegisterWorker());
  EXPECT_THAT(Heartbeat(lease.lease_id(), 10, 40, 0.7f), IsOk());
  EXPECT_TRUE(Eventually([&] { return has_state(v1::RUNNING); }));
  EXPECT_THAT(CompleteTraining(lease.lease_id(), testing::MakeConceptBlob("tiny", "teddy", "toy")),
              IsOk());
  watcher.join();
  EXPECT_THAT(final_status, IsOk());
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.front().state(), v1::QUEUED);
  EXPECT_EQ(events.front().queue_position(), 1);
  EXPECT_EQ(events.back().state(), v1::SUCCEEDED);
  EXPECT_FALSE(events.back().concept_id().empty());
}

TEST_F(ServerTest, ExpiredLeaseRequeuesTheJob) {
  auto job = Create(Job("teddy"));
  std::string w = RegisterWorker();
  v1::LeaseWorkResponse first = Lease(w);
  ASSERT_TRUE(first.has_training());
  clock_.Advance(absl::Seconds(31));  // the worker stopped heartbeating
  server_->TEST_Tick();
  v1::TrainingJob queued = GetJob(job->id());
  EXPECT_EQ(queued.state(), v1::QUEUED);
  EXPECT_EQ(queued.attempts(), 1);
  EXPECT_THAT(Heartbeat(first.lease_id(), 5, 40), StatusIs(absl::StatusCode::kNotFound));
  v1::LeaseWorkResponse second = Lease(RegisterWorker());
  ASSERT_TRUE(second.has_training());
  EXPECT_EQ(second.training().job_id(), job->id());
  EXPECT_EQ(second.training().attempt(), 2);
}

TEST_F(ServerTest, CancelReachesTheRunningWorker) {
  auto job = Create(Job("teddy"));
  v1::LeaseWorkResponse lease = Lease(RegisterWorker());
  v1::CancelTrainingJobRequest cr;
  cr.set_id(job->id());
  v1::TrainingJob out;
  ASSERT_THAT(training_->CancelTrainingJob(Ctx().get(), cr, &out), IsOk());
  EXPECT_EQ(out.state(), v1::CANCELLING);
  auto hb = Heartbeat(lease.lease_id(), 12, 40);
  ASSERT_THAT(hb, IsOk());
  EXPECT_TRUE(hb->cancel_requested());
  v1::FailWorkRequest fr;
  fr.set_lease_id(lease.lease_id());
  fr.set_code(static_cast<int>(grpc::StatusCode::CANCELLED));
  fr.set_message("stopped at step 12");
  v1::FailWorkResponse fresp;
  ASSERT_THAT(worker_->FailWork(Ctx("worker-token").get(), fr, &fresp), IsOk());
  v1::TrainingJob cancelled = GetJob(job->id());
  EXPECT_EQ(cancelled.state(), v1::CANCELLED);
  EXPECT_EQ(cancelled.error_code(), static_cast<int>(grpc::StatusCode::CANCELLED));
}

TEST_F(ServerTest, ReturnedLeaseGoesBackWithoutAnAttempt) {
  auto job = Create(Job("teddy"));
  v1::LeaseWorkResponse lease = Lease(RegisterWorker());
  v1::ReturnLeaseRequest rr;
  rr.set_lease_id(lease.lease_id());
  rr.set_reason("SIGTERM");
  v1::ReturnLeaseResponse rresp;
  ASSERT_THAT(worker_->ReturnLease(Ctx("worker-token").get(), rr, &rresp), IsOk());
  v1::TrainingJob back = GetJob(job->id());
  EXPECT_EQ(back.state(), v1::QUEUED);
  EXPECT_EQ(back.attempts(), 0);
}

// One tenant's stalled uploads may hold at most its share of the upload buffer; the buffer as a
// whole has its own cap; released bytes are free again.
TEST(UploadBufferTest, EachTenantHasItsShareAndTheServerItsCap) {
  ServiceContext c;
  c.max_upload_bytes_in_flight = 100;
  c.tenant_max_upload_bytes_in_flight = 60;
  EXPECT_THAT(c.ReserveUpload("acme", 50), IsOk());
  EXPECT_THAT(c.ReserveUpload("acme", 20),
              StatusIs(absl::StatusCode::kResourceExhausted,
                       HasSubstr("this tenant's uploads in progress hold 50 bytes, and a tenant may hold 60")));
  EXPECT_THAT(c.ReserveUpload("globex", 40), IsOk());
  EXPECT_THAT(c.ReserveUpload("globex", 20),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("the server's upload buffer is full")));
  EXPECT_THAT(c.ReserveUpload("initech", 20),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("the server's upload buffer is full")));
  EXPECT_THAT(c.ReserveUpload("initech", 10), IsOk());  // exactly at the cap
  c.ReleaseUpload("acme", 50);
  EXPECT_THAT(c.ReserveUpload("acme", 50), IsOk());  // 50 + 40 + 10: the cap again
  EXPECT_THAT(c.ReserveUpload("globex", 1),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("the server's upload buffer is full")));
  c.ReleaseUpload("globex", 40);
  c.ReleaseUpload("initech", 10);
  EXPECT_THAT(c.ReserveUpload("globex", 50), IsOk());
}

TEST_F(ServerTest, UploadTrainingJobStreamsImagesInChunks) {
  v1::TrainingJob job;
  auto ctx = Ctx();
  auto writer = training_->UploadTrainingJob(ctx.get(), &job);
  v1::UploadTrainingJobRequest msg;
  *msg.mutable_header()->mutable_job() = Job("teddy", 0);
  msg.mutable_header()->set_image_count(3);
  ASSERT_TRUE(writer->Write(msg));
  std::vector<std::string> images;
  for (int i = 0; i < 3; ++i) {
    images.push_back(testing::MakePng(40 + i, 30));
    for (size_t off = 0; off < images[i].size(); off += 100) {
      v1::UploadTrainingJobRequest chunk;
      chunk.mutable_chunk()->set_image_index(i);
      chunk.mutable_chunk()->set_data(images[i].substr(off, 100));
      ASSERT_TRUE(writer->Write(chunk));
    }
  }
  writer->WritesDone();
  ASSERT_THAT(writer->Finish(), IsOk());
  EXPECT_EQ(job.image_count(), 3);
  v1::LeaseWorkResponse lease = Lease(RegisterWorker());
  ASSERT_EQ(lease.training().images_size(), 3);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(lease.training().images(i), images[i]);

  // A chunk out of order is refused, naming the field.
  auto ctx2 = Ctx();
  auto bad = training_->UploadTrainingJob(ctx2.get(), &job);
  bad->Write(msg);
  v1::UploadTrainingJobRequest skip;
  skip.mutable_chunk()->set_image_index(2);
  skip.mutable_chunk()->set_data("x");
  bad->Write(skip);
  bad->WritesDone();
  EXPECT_THAT(bad->Finish(), StatusIs(kInvalid, HasSubstr("chunk.image_index: 2 out of order")));

  // A header's job is checked as CreateTrainingJob's request, its fields named where they sit in
  // this stream's message.
  {
    auto ctx4 = Ctx();
    auto header_bad = training_->UploadTrainingJob(ctx4.get(), &job);
    v1::UploadTrainingJobRequest h = msg;
    h.mutable_header()->mutable_job()->mutable_options()->set_steps(0);
    header_bad->Write(h);
    header_bad->WritesDone();
    EXPECT_THAT(header_bad->Finish(), StatusIs(kInvalid, HasSubstr("header.job.options.steps: 0")));
  }

  // A negative index before the first image once passed the order check as "the current image"
  // and appended to an image that did not exist: one message crashed the server.
  for (int index : {-1, -7}) {
    auto ctx3 = Ctx();
    auto neg = training_->UploadTrainingJob(ctx3.get(), &job);
    neg->Write(msg);
    v1::UploadTrainingJobRequest first;
    first.mutable_chunk()->set_image_index(index);
    first.mutable_chunk()->set_data("x");
    neg->Write(first);
    neg->WritesDone();
    EXPECT_THAT(neg->Finish(), StatusIs(kInvalid, HasSubstr(absl::StrCat("chunk.image_index: ", index,
                                                                          " out of order (expected 0)"))));
  }
  ExpectHealthy();
}

// A lease hands a job's images to a worker in one message under the server's max_message_bytes. A
// larger set used to be accepted, leased and lost in sending, again and again, until the job failed
// with "the worker stopped heartbeating"; it is now refused at submission, by both RPCs.
TEST_F(ServerTest, ImageSetsNoLeaseCouldCarryAreRefusedAtSubmission) {
  v1::CreateTrainingJobRequest r = Job("teddy", 3);
  int64_t total = 0;
  for (const std::string& image : r.images()) total += static_cast<int64_t>(image.size());
  max_message_bytes_ = static_cast<int>(kLeaseOverheadBytes + total - 1);
  RestartServer();
  EXPECT_THAT(Create(r), StatusIs(kInvalid, HasSubstr("images: " + std::to_string(total) + " bytes in all")));

  v1::TrainingJob job;
  auto ctx = Ctx();
  auto writer = training_->UploadTrainingJob(ctx.get(), &job);
  v1::UploadTrainingJobRequest header;
  *header.mutable_header()->mutable_job() = Job("teddy", 0);
  header.mutable_header()->set_image_count(3);
  writer->Write(header);
  for (int i = 0; i < 3; ++i) {
    v1::UploadTrainingJobRequest chunk;
    chunk.mutable_chunk()->set_image_index(i);
    chunk.mutable_chunk()->set_data(r.images(i));
    if (!writer->Write(chunk)) break;  // refused on the chunk that crossed the limit
  }
  writer->WritesDone();
  EXPECT_THAT(writer->Finish(), StatusIs(kInvalid, HasSubstr("a job's images together may take at most")));

  // One byte more room and the same set is accepted, and a worker's lease carries it.
  max_message_bytes_ = static_cast<int>(kLeaseOverheadBytes + total);
  RestartServer();
  ASSERT_THAT(Create(r), IsOk());
  v1::LeaseWorkResponse lease = Lease(RegisterWorker());
  ASSERT_TRUE(lease.has_training());
  EXPECT_EQ(lease.training().images_size(), 3);
}

TEST_F(ServerTest, GenerateRoundTripWithSeveralConcepts) {
  auto teddy = Import(testing::MakeConceptBlob("tiny", "teddy", "toy"));
  auto bike = Import(testing::MakeConceptBlob("tiny", "bike", "bicycle"));
  ASSERT_THAT(bike, IsOk());
  std::string w = RegisterWorker();
  v1::GenerateRequest r;
  r.set_prompt("<teddy> riding <bike@1> on a beach");
  r.set_width(64);
  r.set_height(32);
  r.set_num_images(2);
  r.set_seed(7);
  auto* strength = r.add_concepts();
  strength->set_name("bike@1");
  strength->set_beta(0.5f);
  strength->set_key_lock(v1::KEY_LOCK_GLOBAL);
  auto pending = std::async(std::launch::async, [&] { return Generate(r); });

  v1::LeaseWorkResponse lease = Lease(w, 5000);
  ASSERT_TRUE(lease.has_generation());
  const auto& g = lease.generation();
  EXPECT_EQ(g.tenant(), "acme");
  EXPECT_EQ(g.request().prompt(), r.prompt());
  EXPECT_EQ(g.request().steps(), 30);
  EXPECT_EQ(g.request().seed(), 7u);
  ASSERT_EQ(g.concepts_size(), 2);
  EXPECT_EQ(g.concepts(0).reference(), "teddy");
  EXPECT_EQ(g.concepts(0).digest(), teddy->digest());
  EXPECT_FLOAT_EQ(g.concepts(0).beta(), 0.7f);
  EXPECT_EQ(g.concepts(0).key_lock(), v1::KEY_LOCK_MODE_UNSPECIFIED) << "the worker's model decides";
  EXPECT_EQ(g.concepts(1).reference(), "bike@1");
  EXPECT_FLOAT_EQ(g.concepts(1).beta(), 0.5f);
  EXPECT_EQ(g.concepts(1).key_lock(), v1::KEY_LOCK_GLOBAL);

  v1::FetchConceptRequest fr;
  fr.set_digest(g.concepts(1).digest());
  v1::FetchConceptResponse fresp;
  ASSERT_THAT(worker_->FetchConcept(Ctx("worker-token").get(), fr, &fresp), IsOk());
  EXPECT_EQ(fresp.blob(), testing::MakeConceptBlob("tiny", "bike", "bicycle"));

  ASSERT_THAT(Heartbeat(lease.lease_id(), 30, 60), IsOk());
  ASSERT_THAT(CompleteGeneration(lease), IsOk());
  auto resp = pending.get();
  ASSERT_THAT(resp, IsOk());
  ASSERT_EQ(resp->images_size(), 2);
  EXPECT_EQ(resp->images(0).png(), testing::MakePng(64, 32));
  EXPECT_EQ(resp->images(1).seed(), 8u);
  ASSERT_EQ(resp->concepts_size(), 2);
  EXPECT_EQ(resp->concepts(1).concept_id(), bike->id());
}

TEST_F(ServerTest, GenerateStreamReportsProgressThenImages) {
  ASSERT_THAT(Import(testing::MakeConceptBlob("tiny", "teddy", "toy")), IsOk());
  std::string w = RegisterWorker();
  v1::GenerateRequest r;
  r.set_prompt("a photo of <teddy>");
  r.set_width(32);
  r.set_height(32);
  absl::Mutex mu;
  std::vector<v1::GenerateEvent> events;
  grpc::Status status;
  std::thread client([&] {
    auto ctx = Ctx();
    auto reader = generation_->GenerateStream(ctx.get(), r);
    v1::GenerateEvent e;
    while (reader->Read(&e)) {
      absl::MutexLock lock(&mu);
      events.push_back(e);
    }
    status = reader->Finish();
  });
  auto count = [&] {
    absl::MutexLock lock(&mu);
    return events.size();
  };
  EXPECT_TRUE(Eventually([&] { return count() >= 1; }));  // queued at position 1
  v1::LeaseWorkResponse lease = Lease(w);
  EXPECT_TRUE(lease.has_generation());
  bool progressed = true;
  for (int step = 10; step <= 30 && progressed; step += 10) {
    size_t before = count();  // before the heartbeat: its event may arrive before its reply
    EXPECT_THAT(Heartbeat(lease.lease_id(), step, 30), IsOk());
    progressed = Eventually([&] { return count() > before; });
    EXPECT_TRUE(progressed) << "no event after the heartbeat at step " << step;
  }
  EXPECT_THAT(CompleteGeneration(lease), IsOk());
  client.join();
  EXPECT_THAT(status, IsOk());
  ASSERT_GE(events.size(), 3u);
  EXPECT_TRUE(events.front().has_progress());
  EXPECT_EQ(events.front().progress().queue_position(), 1);
  EXPECT_EQ(events[events.size() - 2].progress().step(), 30);
  ASSERT_TRUE(events.back().has_result());
  EXPECT_EQ(events.back().result().images_size(), 1);
}

TEST_F(ServerTest, ClientDeadlineRemovesTheQueuedGeneration) {
  ASSERT_THAT(Import(testing::MakeConceptBlob("tiny", "teddy", "toy")), IsOk());
  std::string w = RegisterWorker(/*training=*/false, /*generation=*/true);
  v1::GenerateRequest r;
  r.set_prompt("<teddy>");
  EXPECT_THAT(Generate(r, "acme-token", absl::Milliseconds(300)),
              StatusIs(absl::StatusCode::kDeadlineExceeded));
  EXPECT_TRUE(Eventually([&] { return server_->scheduler()->GenerationsInFlight() == 0; }));
  EXPECT_FALSE(Lease(w).has_generation());
  // Counted as a missed deadline (which the failure alert watches), not as a client's cancel.
  const std::string body = HttpGet(server_->metrics_port(), "/metrics");
  EXPECT_THAT(body, HasSubstr("perfusion_generate_requests_total{outcome=\"deadline\"} 1"));
  EXPECT_THAT(body, Not(HasSubstr("perfusion_generate_requests_total{outcome=\"cancelled\"} 1")));
}

// The RPC metrics' method labels come from the path the client sends; a path this server does not
// serve is labelled "unknown", so callers cannot create label series without end.
TEST_F(ServerTest, UnknownMethodsShareOneMetricsLabel) {
  grpc::GenericStub stub(channel_);
  for (int i = 0; i < 3; ++i) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
    grpc::Slice empty(std::string{});
    grpc::ByteBuffer request(&empty, 1), response;
    std::promise<grpc::Status> done;
    stub.UnaryCall(&ctx, absl::StrCat("/evil.Service/Method", i), grpc::StubOptions(), &request, &response,
                   [&](grpc::Status s) { done.set_value(s); });
    EXPECT_EQ(done.get_future().get().error_code(), grpc::StatusCode::UNIMPLEMENTED);
  }
  const std::string body = HttpGet(server_->metrics_port(), "/metrics");
  EXPECT_THAT(body, Not(HasSubstr("evil")));
  EXPECT_THAT(body, HasSubstr("grpc_server_handled_total{grpc_service=\"unknown\",grpc_method=\"unknown\","
                              "grpc_type=\"bidi_stream\",grpc_code=\"Unimplemented\"} 3"));
  // (gRPC serves an unknown method as a bidi stream.) Served methods keep their names, gRPC's own
  // health service too.
  ExpectHealthy();
  const std::string after = HttpGet(server_->metrics_port(), "/metrics");
  EXPECT_THAT(after, HasSubstr("grpc_method=\"ListTrainingJobs\""));
  EXPECT_THAT(after, HasSubstr("grpc_service=\"grpc.health.v1.Health\",grpc_method=\"Check\""));
}

// An enum value the server does not know is refused, naming the field: the worker would read it
// as local key-locking, over the model's default.
// A non-finite loss is refused, naming the field: SQLite cannot store NaN (its NOT NULL column once
// turned it into a misleading ALREADY_EXISTS that no heartbeat or completion got past), and a
// diverged run's concept is unusable anyway.
TEST_F(ServerTest, NonFiniteLossesAreInvalidArgument) {
  ASSERT_THAT(Create(Job("teddy")), IsOk());
  v1::LeaseWorkResponse lease = Lease(RegisterWorker());
  ASSERT_TRUE(lease.has_training());
  EXPECT_THAT(Heartbeat(lease.lease_id(), 10, 40, std::nanf("")),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("loss: must be a finite number")));
  v1::CompleteTrainingRequest r;
  r.set_lease_id(lease.lease_id());
  r.set_concept_blob(testing::MakeConceptBlob("tiny", "teddy", "toy"));
  r.set_final_loss(std::numeric_limits<float>::infinity());
  v1::CompleteTrainingResponse resp;
  EXPECT_THAT(FromGrpcStatus(worker_->CompleteTraining(Ctx("worker-token").get(), r, &resp)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("final_loss")));
  // The lease is still held: a finite report goes through.
  EXPECT_THAT(Heartbeat(lease.lease_id(), 11, 40, 0.5f), IsOk());
  EXPECT_THAT(CompleteTraining(lease.lease_id(), testing::MakeConceptBlob("tiny", "teddy", "toy")), IsOk());
}

TEST_F(ServerTest, UnknownKeyLockModesAreInvalidArgument) {
  ASSERT_THAT(Import(testing::MakeConceptBlob("tiny", "teddy", "toy")), IsOk());
  RegisterWorker(/*training=*/false, /*generation=*/true);
  v1::GenerateRequest r;
  r.set_prompt("a <teddy>");
  r.set_key_lock(static_cast<v1::KeyLockMode>(7));
  EXPECT_THAT(Generate(r), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("key_lock: 7 is not one of")));
  r.set_key_lock(v1::KEY_LOCK_GLOBAL);
  auto* c = r.add_concepts();
  c->set_name("teddy");
  c->set_key_lock(static_cast<v1::KeyLockMode>(-1));
  EXPECT_THAT(Generate(r), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("concepts[0].key_lock: -1")));
}

TEST_F(ServerTest, RestartKeepsAcknowledgedJobsAndConcepts) {
  auto job = Create(Job("teddy"));
  auto running = Create(Job("bike"));
  auto concept = Import(testing::MakeConceptBlob("tiny", "kept", "toy"));
  ASSERT_THAT(concept, IsOk());
  std::string w = RegisterWorker();
  v1::LeaseWorkResponse lease = Lease(w);
  ASSERT_EQ(lease.training().job_id(), job->id());

  RestartServer();
  v1::TrainingJob queued = GetJob(running->id());
  EXPECT_EQ(queued.state(), v1::QUEUED);
  EXPECT_EQ(queued.queue_position(), 1);
  EXPECT_EQ(GetJob(job->id()).state(), v1::RUNNING);
  v1::GetConceptRequest gr;
  gr.set_id(concept->id());
  v1::Concept got;
  ASSERT_THAT(concepts_->GetConcept(Ctx().get(), gr, &got), IsOk());
  EXPECT_EQ(got.digest(), concept->digest());
  // The worker that held a lease before the restart finishes its job.
  ASSERT_THAT(Heartbeat(lease.lease_id(), 30, 40), IsOk());
  ASSERT_THAT(CompleteTraining(lease.lease_id(), testing::MakeConceptBlob("tiny", "teddy", "toy")),
              IsOk());
  EXPECT_EQ(GetJob(job->id()).state(), v1::SUCCEEDED);
  // Its worker id is forgotten: it must register again.
  v1::LeaseWorkRequest lr;
  lr.set_worker_id(w);
  v1::LeaseWorkResponse lresp;
  EXPECT_THAT(worker_->LeaseWork(Ctx("worker-token").get(), lr, &lresp),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("RegisterWorker")));
}

TEST_F(ServerTest, MetricsExposeTheDocumentedNamesAfterTraffic) {
  ASSERT_THAT(Create(Job("teddy")), IsOk());
  EXPECT_THAT(Create(Job("teddy", 0)), StatusIs(kInvalid));
  v1::LeaseWorkResponse lease = Lease(RegisterWorker());
  ASSERT_THAT(CompleteTraining(lease.lease_id(), testing::MakeConceptBlob("tiny", "teddy", "toy")),
              IsOk());
  v1::GenerateRequest r;
  r.set_prompt("<teddy>");
  r.set_width(32);
  r.set_height(32);
  auto pending = std::async(std::launch::async, [&] { return Generate(r); });
  v1::LeaseWorkResponse glease = Lease(RegisterWorker(), 5000);
  ASSERT_TRUE(glease.has_generation());
  ASSERT_THAT(CompleteGeneration(glease), IsOk());
  ASSERT_THAT(pending.get(), IsOk());

  std::string body = HttpGet(server_->metrics_port(), "/metrics");
  ASSERT_THAT(body, HasSubstr("200 OK"));
  for (const char* line : {
           "grpc_server_started_total{grpc_service=\"perfusion.v1.TrainingService\","
           "grpc_method=\"CreateTrainingJob\",grpc_type=\"unary\"} 2",
           "grpc_server_handled_total{grpc_service=\"perfusion.v1.TrainingService\","
           "grpc_method=\"CreateTrainingJob\",grpc_type=\"unary\",grpc_code=\"OK\"} 1",
           "grpc_server_handled_total{grpc_service=\"perfusion.v1.TrainingService\","
           "grpc_method=\"CreateTrainingJob\",grpc_type=\"unary\",grpc_code=\"InvalidArgument\"} 1",
           "grpc_server_handling_seconds_bucket{grpc_service=\"perfusion.v1.GenerationService\","
           "grpc_method=\"Generate\",grpc_type=\"unary\",le=\"+Inf\"} 1",
           "perfusion_training_jobs{state=\"SUCCEEDED\"} 1",
           "perfusion_training_jobs_total{outcome=\"succeeded\"} 1",
           "perfusion_training_queue_depth 0",
           "perfusion_training_job_duration_seconds_count 1",
           "perfusion_training_queue_wait_seconds_count 1",
           "perfusion_generate_requests_total{outcome=\"ok\"} 1",
           "perfusion_generate_queue_duration_seconds_count 1",
           "perfusion_generate_compute_duration_seconds_sum 1",
           "perfusion_generate_duration_seconds_count 1",
           "perfusion_generate_queue_depth 0",
           "perfusion_workers_connected 2",
           "perfusion_concepts_stored 1",
       }) {
    EXPECT_THAT(body, HasSubstr(line));
  }
  EXPECT_THAT(HttpGet(server_->metrics_port(), "/healthz"), HasSubstr("200 OK"));
}

TEST_F(ServerTest, ShutdownLetsInFlightGenerationFinish) {
  ASSERT_THAT(Import(testing::MakeConceptBlob("tiny", "teddy", "toy")), IsOk());
  std::string w = RegisterWorker();
  v1::GenerateRequest r;
  r.set_prompt("<teddy>");
  r.set_width(32);
  r.set_height(32);
  auto pending = std::async(std::launch::async, [&] { return Generate(r); });
  ASSERT_TRUE(Eventually([&] { return server_->scheduler()->GenerationsInFlight() == 1; }));
  std::thread stopper([&] { server_->Shutdown(); });
  EXPECT_TRUE(Eventually([&] { return server_->scheduler()->draining(); }));
  EXPECT_THAT(Create(Job("late")), StatusIs(absl::StatusCode::kUnavailable));
  v1::LeaseWorkResponse lease = Lease(w);
  EXPECT_TRUE(lease.has_generation());
  EXPECT_THAT(CompleteGeneration(lease), IsOk());
  EXPECT_THAT(pending.get(), IsOk());
  stopper.join();
  server_.reset();
}

}  // namespace
}  // namespace perfusion::server

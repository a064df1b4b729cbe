#include "server/rpc_metrics.h"

#include <google/protobuf/descriptor.h>

#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace perfusion::server {
namespace {

using grpc::experimental::InterceptionHookPoints;

const char* TypeName(grpc::experimental::ServerRpcInfo::Type t) {
  switch (t) {
    case grpc::experimental::ServerRpcInfo::Type::UNARY: return "unary";
    case grpc::experimental::ServerRpcInfo::Type::CLIENT_STREAMING: return "client_stream";
    case grpc::experimental::ServerRpcInfo::Type::SERVER_STREAMING: return "server_stream";
    case grpc::experimental::ServerRpcInfo::Type::BIDI_STREAMING: return "bidi_stream";
  }
  return "unknown";
}

class RpcMetricsInterceptor final : public grpc::experimental::Interceptor {
 public:
  RpcMetricsInterceptor(grpc::experimental::ServerRpcInfo* info, ServerMetrics* m,
                        const std::set<std::string>& known)
      : start_(absl::Now()) {
    // "/perfusion.v1.TrainingService/CreateTrainingJob". The path is whatever the client sent, and
    // gRPC runs interceptors for unknown methods too: only a method this server serves gets its
    // own labels, or any caller could create label series without end.
    std::string full = info->method() ? info->method() : "";
    std::string service = "unknown", method = "unknown";
    const size_t slash = full.rfind('/');
    if (slash != std::string::npos && slash > 0 && known.count(full)) {
      service = full.substr(1, slash - 1);
      method = full.substr(slash + 1);
    }
    labels_ = {service, method, TypeName(info->type())};
    handled_ = m->rpc_handled;
    seconds_ = &m->rpc_seconds->WithLabels(labels_);
    m->rpc_started->WithLabels(labels_).Inc();
  }

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      grpc::Status status = methods->GetSendStatus();
      std::vector<std::string> labels = labels_;
      labels.push_back(GrpcCodeName(status.error_code()));
      handled_->WithLabels(labels).Inc();
      seconds_->Observe(absl::ToDoubleSeconds(absl::Now() - start_));
    }
    methods->Proceed();
  }

 private:
  const absl::Time start_;
  std::vector<std::string> labels_;
  metrics::CounterFamily* handled_;
  metrics::Histogram* seconds_;
};

}  // namespace

RpcMetricsInterceptorFactory::RpcMetricsInterceptorFactory(ServerMetrics* metrics,
                                                           const std::vector<std::string>& services)
    : metrics_(metrics) {
  for (const std::string& name : services) {
    const google::protobuf::ServiceDescriptor* d =
        google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(name);
    if (d == nullptr) continue;
    for (int i = 0; i < d->method_count(); ++i) known_.insert(absl::StrCat("/", name, "/", d->method(i)->name()));
  }
  // gRPC's own services, whose descriptors may not be in this binary's pool.
  for (const char* m : {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
                        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"}) {
    known_.insert(m);
  }
}

grpc::experimental::Interceptor* RpcMetricsInterceptorFactory::CreateServerInterceptor(
    grpc::experimental::ServerRpcInfo* info) {
  return new RpcMetricsInterceptor(info, metrics_, known_);
}

}  // namespace perfusion::server

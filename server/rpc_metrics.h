// RED metrics for every RPC, from one server interceptor: grpc_server_started_total,
// grpc_server_handled_total (with grpc_code) and grpc_server_handling_seconds, labelled by
// grpc_service ("perfusion.v1.TrainingService"), grpc_method ("CreateTrainingJob") and
// grpc_type (unary | client_stream | server_stream | bidi_stream). grpc_code values are the
// names go-grpc-prometheus uses ("OK", "InvalidArgument", "NotFound", ...), so existing
// dashboards and alerts work unchanged.
#ifndef PERFUSION_SERVER_RPC_METRICS_H_
#define PERFUSION_SERVER_RPC_METRICS_H_

#include <grpcpp/support/server_interceptor.h>

#include "server/server_metrics.h"

namespace perfusion::server {

// go-grpc-prometheus's name for a status code.
const char* GrpcCodeName(grpc::StatusCode code);

class RpcMetricsInterceptorFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  // `metrics` must outlive the server.
  explicit RpcMetricsInterceptorFactory(ServerMetrics* metrics) : metrics_(metrics) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override;

 private:
  ServerMetrics* const metrics_;
};

}  // namespace perfusion::server

#endif  // PERFUSION_SERVER_RPC_METRICS_H_

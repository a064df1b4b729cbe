// RED metrics for every RPC, from one server interceptor: grpc_server_started_total,
// grpc_server_handled_total (with grpc_code) and grpc_server_handling_seconds, labelled by
// grpc_service ("perfusion.v1.TrainingService"), grpc_method ("CreateTrainingJob") and
// grpc_type (unary | client_stream | server_stream | bidi_stream). grpc_code values are the
// names go-grpc-prometheus uses ("OK", "InvalidArgument", "NotFound", ...), so existing
// dashboards and alerts work unchanged.
#ifndef PERFUSION_SERVER_RPC_METRICS_H_
#define PERFUSION_SERVER_RPC_METRICS_H_

#include <grpcpp/support/server_interceptor.h>

#include <set>
#include <string>
#include <vector>

#include "server/grpc_code_name.h"
#include "server/server_metrics.h"

namespace perfusion::server {

class RpcMetricsInterceptorFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  // `metrics` must outlive the server. `services`: the full names of the services the server
  // registers ("perfusion.v1.TrainingService"); their methods, and gRPC's health and reflection,
  // are labelled by name. Any other path (a client may send any) is labelled "unknown".
  RpcMetricsInterceptorFactory(ServerMetrics* metrics, const std::vector<std::string>& services);
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override;

 private:
  ServerMetrics* const metrics_;
  std::set<std::string> known_;  // "/service/Method"
};

}  // namespace perfusion::server

#endif  // PERFUSION_SERVER_RPC_METRICS_H_

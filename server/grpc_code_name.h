// go-grpc-prometheus's names for gRPC status codes ("OK", "InvalidArgument", "Unavailable", ...):
// the grpc_code label of the server's RPC metrics and the code label of the worker's
// perfusion_worker_server_errors_total, so one PromQL matcher fits both. Header-only (the worker
// does not link the server's interceptor).
#ifndef PERFUSION_SERVER_GRPC_CODE_NAME_H_
#define PERFUSION_SERVER_GRPC_CODE_NAME_H_

#include <grpcpp/support/status_code_enum.h>

namespace perfusion::server {

inline const char* GrpcCodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "Canceled";
    case grpc::StatusCode::UNKNOWN: return "Unknown";
    case grpc::StatusCode::INVALID_ARGUMENT: return "InvalidArgument";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DeadlineExceeded";
    case grpc::StatusCode::NOT_FOUND: return "NotFound";
    case grpc::StatusCode::ALREADY_EXISTS: return "AlreadyExists";
    case grpc::StatusCode::PERMISSION_DENIED: return "PermissionDenied";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "ResourceExhausted";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FailedPrecondition";
    case grpc::StatusCode::ABORTED: return "Aborted";
    case grpc::StatusCode::OUT_OF_RANGE: return "OutOfRange";
    case grpc::StatusCode::UNIMPLEMENTED: return "Unimplemented";
    case grpc::StatusCode::INTERNAL: return "Internal";
    case grpc::StatusCode::UNAVAILABLE: return "Unavailable";
    case grpc::StatusCode::DATA_LOSS: return "DataLoss";
    case grpc::StatusCode::UNAUTHENTICATED: return "Unauthenticated";
    default: return "Unknown";
  }
}

}  // namespace perfusion::server

#endif  // PERFUSION_SERVER_GRPC_CODE_NAME_H_

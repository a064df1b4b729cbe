// Status helpers shared by the server: the RETURN_IF_ERROR / ASSIGN_OR_RETURN macros (local
// copies of Abseil's status_macros.h, which our abseil 20220623 lacks) and the one conversion
// between absl::Status and grpc::Status used at every RPC edge.
//
// absl::StatusCode values are google.rpc.Code values, as are grpc::StatusCode values, so the
// conversion keeps the code and the message unchanged (and adds machine-readable details).
#ifndef PERFUSION_SERVER_STATUS_UTIL_H_
#define PERFUSION_SERVER_STATUS_UTIL_H_

#include <grpcpp/support/status.h>

#include <utility>

#include "absl/strings/string_view.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace perfusion::server {

// The gRPC status for `s`: same code, same message. An INVALID_ARGUMENT or OUT_OF_RANGE whose
// message is "<field>: <description>" (the server's convention) also carries a google.rpc.Status
// with a google.rpc.BadRequest naming the field, in the standard grpc-status-details-bin trailer.
grpc::Status ToGrpcStatus(const absl::Status& s);

// The absl::Status for a gRPC status: same code, same message.
inline absl::Status FromGrpcStatus(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

// An absl::Status from a google.rpc.Code number received on the wire; unknown numbers become
// UNKNOWN (and 0 becomes UNKNOWN too: a failure must not read as OK).
inline absl::Status StatusFromCode(int code, absl::string_view message) {
  if (code <= 0 || code > 16) return absl::UnknownError(message);
  return absl::Status(static_cast<absl::StatusCode>(code), message);
}

}  // namespace perfusion::server

#define PERFUSION_STATUS_CONCAT_INNER_(a, b) a##b
#define PERFUSION_STATUS_CONCAT_(a, b) PERFUSION_STATUS_CONCAT_INNER_(a, b)

// RETURN_IF_ERROR(expr): evaluates `expr` (an absl::Status) and returns it when it is not OK.
#ifndef RETURN_IF_ERROR
#define RETURN_IF_ERROR(expr)                                  \
  do {                                                         \
    ::absl::Status _perfusion_status = (expr);                 \
    if (!_perfusion_status.ok()) return _perfusion_status;     \
  } while (0)
#endif

// ASSIGN_OR_RETURN(lhs, expr): evaluates `expr` (an absl::StatusOr<T>); returns its status when
// not OK, else moves its value into `lhs` (which may be a declaration: `auto x`).
#ifndef ASSIGN_OR_RETURN
#define ASSIGN_OR_RETURN(lhs, expr) \
  PERFUSION_ASSIGN_OR_RETURN_IMPL_(PERFUSION_STATUS_CONCAT_(_perfusion_statusor_, __LINE__), lhs, expr)
#define PERFUSION_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                                     \
  if (!statusor.ok()) return std::move(statusor).status();    \
  lhs = *std::move(statusor)
#endif

#endif  // PERFUSION_SERVER_STATUS_UTIL_H_

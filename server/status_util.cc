#include "server/status_util.h"

#include <cctype>
#include <string>

#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"

namespace perfusion::server {
namespace {

// "<field>: <description>" -> field, when the prefix looks like a field path
// (letters, digits, '_', '.', '[', ']'; starting with a letter or '_').
bool SplitField(absl::string_view message, std::string* field, std::string* description) {
  const size_t colon = message.find(": ");
  if (colon == absl::string_view::npos || colon == 0) return false;
  const absl::string_view f = message.substr(0, colon);
  if (!(std::isalpha(static_cast<unsigned char>(f[0])) || f[0] == '_')) return false;
  for (char c : f) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' || c == '[' || c == ']')) {
      return false;
    }
  }
  *field = std::string(f);
  *description = std::string(message.substr(colon + 2));
  return true;
}

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  const auto code = static_cast<grpc::StatusCode>(s.code());
  std::string field, description;
  if ((s.code() == absl::StatusCode::kInvalidArgument || s.code() == absl::StatusCode::kOutOfRange) &&
      SplitField(s.message(), &field, &description)) {
    google::rpc::BadRequest bad;
    auto* v = bad.add_field_violations();
    v->set_field(field);
    v->set_description(description);
    google::rpc::Status details;
    details.set_code(static_cast<int>(s.code()));
    details.set_message(std::string(s.message()));
    details.add_details()->PackFrom(bad);
    return grpc::Status(code, std::string(s.message()), details.SerializeAsString());
  }
  return grpc::Status(code, std::string(s.message()));
}

}  // namespace perfusion::server

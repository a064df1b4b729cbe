#include "server/status_util.h"

#include <cctype>
#include <string>

#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"

namespace perfusion::server {
namespace {

// "<field>: <description>" -> field, when the prefix looks like a field path: names of letters,
// digits and '_' joined by '.', each optionally followed by subscripts in brackets. A subscript may
// hold any printable character but ']' (an index, or a map key such as a label's
// "app.kubernetes.io/name").
bool SplitField(absl::string_view message, std::string* field, std::string* description) {
  const size_t colon = message.find(": ");
  if (colon == absl::string_view::npos || colon == 0) return false;
  const absl::string_view f = message.substr(0, colon);
  if (!(std::isalpha(static_cast<unsigned char>(f[0])) || f[0] == '_')) return false;
  bool in_subscript = false;
  for (char ch : f) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if (in_subscript) {
      if (c == ']') {
        in_subscript = false;
      } else if (c < 0x20 || c > 0x7e) {
        return false;
      }
    } else if (c == '[') {
      in_subscript = true;
    } else if (!(std::isalnum(c) || c == '_' || c == '.')) {
      return false;
    }
  }
  if (in_subscript) return false;
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

// Bearer-token authentication. Tenant tokens come from --tokens_file, one `<token> <tenant>` per
// line; worker tokens from --worker_tokens_file, one token per line. In both, blank lines and
// lines starting with '#' are ignored. Tokens are kept only as SHA-256 digests.
//
// A tenant token on the public API gives its tenant; a worker token there answers
// PERMISSION_DENIED. On WorkerService only worker tokens pass (a tenant token answers
// PERMISSION_DENIED). No `authorization` metadata, a malformed one or an unknown token answers
// UNAUTHENTICATED.
//
// Thread safety: immutable after Load; safe to share.
#ifndef PERFUSION_SERVER_AUTH_H_
#define PERFUSION_SERVER_AUTH_H_

#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>

#include "absl/strings/string_view.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace perfusion::server {

class Authenticator {
 public:
  // Reads both files ("" skips one). INVALID_ARGUMENT naming the file and line for a malformed
  // line or tenant name, NOT_FOUND for a missing file.
  static absl::StatusOr<Authenticator> Load(const std::string& tokens_file,
                                            const std::string& worker_tokens_file);
  // From now on every public call is tenant `tenant`, token or not (development only). Worker
  // tokens are still required on WorkerService.
  void AllowAll(std::string tenant) { allow_all_tenant_ = std::move(tenant); }

  void AddTenantToken(absl::string_view token, std::string tenant);
  void AddWorkerToken(absl::string_view token);

  // `authorization` is the metadata value (nullopt when absent). Returns the tenant.
  absl::StatusOr<std::string> Tenant(std::optional<absl::string_view> authorization) const;
  // OK when it is a worker token.
  absl::Status Worker(std::optional<absl::string_view> authorization) const;

  size_t tenant_tokens() const { return tenants_.size(); }
  size_t worker_tokens() const { return workers_.size(); }

 private:
  absl::StatusOr<std::string> Token(std::optional<absl::string_view> authorization) const;

  std::map<std::string, std::string> tenants_;  // sha256(token) -> tenant
  std::set<std::string> workers_;               // sha256(token)
  std::optional<std::string> allow_all_tenant_;
};

}  // namespace perfusion::server

#endif  // PERFUSION_SERVER_AUTH_H_

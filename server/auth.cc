#include "server/auth.h"

#include <fstream>
#include <functional>

#include "absl/strings/string_view.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "server/concept_blob.h"
#include "server/log.h"
#include "server/validation.h"

namespace perfusion::server {
namespace {

absl::Status ReadLines(const std::string& path,
                       const std::function<absl::Status(int, std::vector<std::string>)>& fn) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    absl::string_view l = absl::StripAsciiWhitespace(line);
    if (l.empty() || l[0] == '#') continue;
    std::vector<std::string> fields = absl::StrSplit(l, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (auto s = fn(n, fields); !s.ok()) return s;
  }
  return absl::OkStatus();
}

// Tokens are bearer secrets: a short one can be guessed. Existing deployments keep working; the
// log says which line to change.
void WarnIfShort(absl::string_view token, const std::string& file, int line) {
  constexpr size_t kMinTokenChars = 16;
  if (token.size() >= kMinTokenChars) return;
  LogEvent("auth_warning", {{"file", file},
                            {"line", std::to_string(line)},
                            {"warning", absl::StrCat("token of ", token.size(), " characters; use at least ",
                                                     kMinTokenChars, " random ones (openssl rand -hex 24)")}});
}

}  // namespace

absl::StatusOr<Authenticator> Authenticator::Load(const std::string& tokens_file,
                                                  const std::string& worker_tokens_file) {
  Authenticator a;
  if (!tokens_file.empty()) {
    auto s = ReadLines(tokens_file, [&](int n, std::vector<std::string> f) -> absl::Status {
      if (f.size() != 2) {
        return absl::InvalidArgumentError(
            absl::StrCat(tokens_file, ":", n, ": expected `<token> <tenant>`"));
      }
      if (!ValidateConceptName(f[1], "tenant").ok()) {
        return absl::InvalidArgumentError(absl::StrCat(
            tokens_file, ":", n, ": tenant \"", f[1], "\" must match [a-z0-9][a-z0-9_-]{0,62}"));
      }
      // One token, one tenant: a second line giving it another tenant is a mistake that would
      // otherwise silently hand that tenant's data to whoever holds the first.
      if (auto it = a.tenants_.find(Sha256Hex(f[0])); it != a.tenants_.end() && it->second != f[1]) {
        return absl::InvalidArgumentError(absl::StrCat(tokens_file, ":", n, ": this token is already tenant \"",
                                                       it->second, "\"'s; a token names one tenant"));
      }
      WarnIfShort(f[0], tokens_file, n);
      a.AddTenantToken(f[0], f[1]);
      return absl::OkStatus();
    });
    if (!s.ok()) return s;
  }
  if (!worker_tokens_file.empty()) {
    auto s = ReadLines(worker_tokens_file, [&](int n, std::vector<std::string> f) -> absl::Status {
      if (f.size() != 1) {
        return absl::InvalidArgumentError(
            absl::StrCat(worker_tokens_file, ":", n, ": expected one token per line"));
      }
      if (a.tenants_.count(Sha256Hex(f[0]))) {
        return absl::InvalidArgumentError(absl::StrCat(
            worker_tokens_file, ":", n, ": this token is also a tenant token in ", tokens_file,
            "; worker and tenant tokens must differ (a worker token may lease any tenant's work)"));
      }
      WarnIfShort(f[0], worker_tokens_file, n);
      a.AddWorkerToken(f[0]);
      return absl::OkStatus();
    });
    if (!s.ok()) return s;
  }
  return a;
}

void Authenticator::AddTenantToken(absl::string_view token, std::string tenant) {
  tenants_[Sha256Hex(token)] = std::move(tenant);
}

void Authenticator::AddWorkerToken(absl::string_view token) { workers_.insert(Sha256Hex(token)); }

absl::StatusOr<std::string> Authenticator::Token(
    std::optional<absl::string_view> authorization) const {
  if (!authorization) {
    return absl::UnauthenticatedError(
        "missing `authorization: Bearer <token>` metadata");
  }
  absl::string_view v = absl::StripAsciiWhitespace(*authorization);
  if (!absl::StartsWithIgnoreCase(v, "bearer ")) {
    return absl::UnauthenticatedError("authorization: expected `Bearer <token>`");
  }
  v = absl::StripAsciiWhitespace(v.substr(7));
  if (v.empty()) return absl::UnauthenticatedError("authorization: empty token");
  return Sha256Hex(v);
}

absl::StatusOr<std::string> Authenticator::Tenant(
    std::optional<absl::string_view> authorization) const {
  if (allow_all_tenant_) return *allow_all_tenant_;
  auto digest = Token(authorization);
  if (!digest.ok()) return digest.status();
  auto it = tenants_.find(*digest);
  if (it != tenants_.end()) return it->second;
  if (workers_.count(*digest)) {
    return absl::PermissionDeniedError("a worker token cannot call the public API");
  }
  return absl::UnauthenticatedError("authorization: unknown token");
}

absl::Status Authenticator::Worker(std::optional<absl::string_view> authorization) const {
  auto digest = Token(authorization);
  if (!digest.ok()) return digest.status();
  if (workers_.count(*digest)) return absl::OkStatus();
  if (tenants_.count(*digest)) {
    return absl::PermissionDeniedError("WorkerService needs a worker token, not a tenant token");
  }
  return absl::UnauthenticatedError("authorization: unknown worker token");
}

}  // namespace perfusion::server

#include "server/store_factory.h"

#include <filesystem>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/sqlite_store.h"
#include "server/status_util.h"
#ifdef PERFUSION_HAVE_POSTGRES
#include "server/postgres_store.h"
#endif

namespace perfusion::server {

absl::StatusOr<StoreUrl> ParseStoreUrl(const std::string& url) {
  StoreUrl out;
  if (absl::StartsWith(url, "sqlite://")) {
    out.kind = StoreUrl::Kind::kSqlite;
    out.target = url.substr(std::string("sqlite://").size());
    if (out.target.empty()) {
      return absl::InvalidArgumentError(
          "store: sqlite:// needs a path (sqlite:///var/lib/perfusion/perfusion.db) or :memory:");
    }
    return out;
  }
  if (absl::StartsWith(url, "postgres://") || absl::StartsWith(url, "postgresql://")) {
    out.kind = StoreUrl::Kind::kPostgres;
    out.target = url;
    return out;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "store: \"", RedactStoreUrl(url),
      "\" is not a store URL (sqlite:///path/perfusion.db or postgres://user@host/db)"));
}

std::string RedactStoreUrl(const std::string& url) {
  // scheme://user:password@host... -> scheme://user:***@host...
  size_t scheme = url.find("://");
  if (scheme == std::string::npos) return url;
  size_t at = url.find('@', scheme + 3);
  if (at == std::string::npos) return url;
  size_t colon = url.find(':', scheme + 3);
  if (colon == std::string::npos || colon > at) return url;
  return absl::StrCat(url.substr(0, colon + 1), "***", url.substr(at));
}

bool PostgresSupported() {
#ifdef PERFUSION_HAVE_POSTGRES
  return true;
#else
  return false;
#endif
}

absl::StatusOr<std::unique_ptr<Store>> OpenStore(const std::string& url) {
  ASSIGN_OR_RETURN(StoreUrl u, ParseStoreUrl(url));
  if (u.kind == StoreUrl::Kind::kSqlite) {
    std::string path = u.target;
    std::error_code ec;
    if (path != ":memory:" && std::filesystem::is_directory(path, ec)) {
      path = (std::filesystem::path(path) / "perfusion.db").string();
    }
    ASSIGN_OR_RETURN(std::unique_ptr<SqliteStore> s, SqliteStore::Open(path));
    return std::unique_ptr<Store>(std::move(s));
  }
#ifdef PERFUSION_HAVE_POSTGRES
  ASSIGN_OR_RETURN(std::unique_ptr<PostgresStore> s, PostgresStore::Open(u.target));
  return std::unique_ptr<Store>(std::move(s));
#else
  return absl::FailedPreconditionError(
      "store: this perfusion-server was built without PostgreSQL support (install libpq-dev and "
      "rebuild)");
#endif
}

}  // namespace perfusion::server

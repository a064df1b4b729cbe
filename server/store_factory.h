// Opens the control plane's store from a URL (perfusion-server --store):
//
//   sqlite:///var/lib/perfusion/perfusion.db   SqliteStore on that file (a folder: its perfusion.db)
//   sqlite://:memory:                          SqliteStore in memory (tests; nothing persists)
//   postgres://user@host:5432/db?sslmode=...   PostgresStore (also postgresql://); libpq reads the
//                                              password from PGPASSWORD or ~/.pgpass when the URL
//                                              has none, so it need not appear on a command line
//
// Several servers may share one postgres:// store (docs/scaling.md); a sqlite:// store belongs to
// one server.
#ifndef PERFUSION_SERVER_STORE_FACTORY_H_
#define PERFUSION_SERVER_STORE_FACTORY_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "server/store.h"

namespace perfusion::server {

struct StoreUrl {
  enum class Kind { kSqlite, kPostgres };
  Kind kind = Kind::kSqlite;
  // kSqlite: the file path (or ":memory:"); kPostgres: the libpq connection URI, unchanged.
  std::string target;
};

// INVALID_ARGUMENT (naming `store`) for an unknown scheme or an empty path.
absl::StatusOr<StoreUrl> ParseStoreUrl(const std::string& url);

// The URL with any password replaced by "***" (for logs).
std::string RedactStoreUrl(const std::string& url);

// Whether this binary was built with PostgreSQL support (libpq found at build time).
bool PostgresSupported();

// Parses `url` and opens (creating, migrating) the store. FAILED_PRECONDITION for postgres://
// in a binary built without libpq; otherwise the errors of SqliteStore::Open /
// PostgresStore::Open.
absl::StatusOr<std::unique_ptr<Store>> OpenStore(const std::string& url);

}  // namespace perfusion::server

#endif  // PERFUSION_SERVER_STORE_FACTORY_H_

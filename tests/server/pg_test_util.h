// A PostgreSQL server for tests: $PERFUSION_TEST_PG_URL when set (CI may start one with
// scripts/pg-test-server.sh and share it), else a throwaway one started by
// scripts/pg-test-server.sh on a free loopback port, once per test process, stopped and deleted
// at exit. Each test takes a fresh database (TestDatabase), dropped when it ends.
#ifndef PERFUSION_TESTS_SERVER_PG_TEST_UTIL_H_
#define PERFUSION_TESTS_SERVER_PG_TEST_UTIL_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace perfusion::server::testing {

// The server's URL (connecting to its maintenance database), or "" with the reason in *why when
// PostgreSQL is not available (tests then GTEST_SKIP with that reason).
std::string TestPostgresServerUrl(std::string* why);

// True when $PERFUSION_TEST_PG_URL names a server (scripts/test.sh, CI): PostgreSQL is then
// promised, and a test that cannot use it must fail, not skip.
bool PostgresRequired();

// `url` with its database name replaced by `dbname`.
std::string WithDatabase(const std::string& url, const std::string& dbname);

class TestDatabase {
 public:
  // A new empty database on the test server. UNAVAILABLE when there is no server.
  static absl::StatusOr<std::unique_ptr<TestDatabase>> Create();
  ~TestDatabase();
  const std::string& url() const { return url_; }

 private:
  TestDatabase() = default;
  std::string server_url_;
  std::string name_;
  std::string url_;
};

}  // namespace perfusion::server::testing

#endif  // PERFUSION_TESTS_SERVER_PG_TEST_UTIL_H_

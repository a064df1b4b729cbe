#include "tests/server/pg_test_util.h"

#include <arpa/inet.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "server/types.h"

namespace perfusion::server::testing {
namespace {

int FreeLoopbackPort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof(a);
  int port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
    port = ntohs(a.sin_port);
  }
  close(fd);
  return port;
}

struct Throwaway {
  std::string dir;
  std::string url;
  std::string why;
};

std::string Script() { return std::string(PERFUSION_SOURCE_DIR) + "/scripts/pg-test-server.sh"; }

void StopThrowaway();

Throwaway& Server() {
  static Throwaway* t = [] {
    auto* t = new Throwaway();
    if (const char* env = std::getenv("PERFUSION_TEST_PG_URL"); env && *env) {
      t->url = env;
      return t;
    }
    char tmpl[] = "/tmp/perfusion-pg-XXXXXX";
    if (!mkdtemp(tmpl)) {
      t->why = "cannot create a temp folder";
      return t;
    }
    t->dir = tmpl;
    std::string cmd = absl::StrCat(Script(), " start ", t->dir, " ", FreeLoopbackPort(),
                                   " 2>", t->dir, "/start.err");
    FILE* p = popen(cmd.c_str(), "r");
    char buf[512] = {0};
    std::string out;
    while (p && fgets(buf, sizeof(buf), p)) out += buf;
    int rc = p ? pclose(p) : -1;
    if (rc != 0) {
      t->why = WEXITSTATUS(rc) == 3
                   ? "PostgreSQL server binaries not installed (apt-get install postgresql), "
                     "and PERFUSION_TEST_PG_URL is not set"
                   : absl::StrCat("scripts/pg-test-server.sh failed (see ", t->dir, "/start.err)");
      return t;
    }
    t->url = std::string(absl::StripTrailingAsciiWhitespace(out));
    std::atexit(StopThrowaway);
    return t;
  }();
  return *t;
}

void StopThrowaway() {
  Throwaway& t = Server();
  if (t.dir.empty()) return;
  std::string cmd = absl::StrCat(Script(), " stop ", t.dir, " >/dev/null 2>&1");
  (void)std::system(cmd.c_str());
  std::error_code ec;
  std::filesystem::remove_all(t.dir, ec);
}

absl::Status Admin(const std::string& server_url, const std::string& sql) {
  PGconn* c = PQconnectdb(server_url.c_str());
  if (PQstatus(c) != CONNECTION_OK) {
    std::string msg = PQerrorMessage(c);
    PQfinish(c);
    return absl::UnavailableError(absl::StrCat("postgres: ", msg));
  }
  PGresult* r = PQexec(c, sql.c_str());
  absl::Status s = PQresultStatus(r) == PGRES_COMMAND_OK
                       ? absl::OkStatus()
                       : absl::InternalError(absl::StrCat("postgres: ", PQresultErrorMessage(r)));
  PQclear(r);
  PQfinish(c);
  return s;
}

}  // namespace

std::string TestPostgresServerUrl(std::string* why) {
  Throwaway& t = Server();
  if (t.url.empty() && why) *why = t.why;
  return t.url;
}

std::string WithDatabase(const std::string& url, const std::string& dbname) {
  size_t scheme = url.find("://");
  size_t slash = url.find('/', scheme == std::string::npos ? 0 : scheme + 3);
  size_t query = url.find('?');
  std::string head = slash == std::string::npos ? url.substr(0, query) : url.substr(0, slash);
  std::string tail = query == std::string::npos ? "" : url.substr(query);
  return absl::StrCat(head, "/", dbname, tail);
}

absl::StatusOr<std::unique_ptr<TestDatabase>> TestDatabase::Create() {
  std::string why;
  std::string server = TestPostgresServerUrl(&why);
  if (server.empty()) return absl::UnavailableError(why);
  std::unique_ptr<TestDatabase> db(new TestDatabase());
  db->server_url_ = server;
  db->name_ = NewId("perfusion_test_");
  if (absl::Status s = Admin(server, absl::StrCat("CREATE DATABASE ", db->name_)); !s.ok()) {
    return s;
  }
  db->url_ = WithDatabase(server, db->name_);
  return db;
}

TestDatabase::~TestDatabase() {
  (void)Admin(server_url_, absl::StrCat("DROP DATABASE IF EXISTS ", name_, " WITH (FORCE)"));
}

bool PostgresRequired() {
  const char* env = std::getenv("PERFUSION_TEST_PG_URL");
  return env != nullptr && *env != '\0';
}

}  // namespace perfusion::server::testing

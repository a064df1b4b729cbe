// server/sqlite_store.{h,cc}: the embedded store (in memory and on disk).
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sqlite3.h>

#include <thread>

#include "server/sqlite_store.h"
#include "tests/server/server_test_util.h"
#include "tests/server/status_matchers.h"

namespace perfusion::server {
namespace {

using testing::IsOk;

JobRecord NewJob(const std::string& id, const std::string& tenant,
                 const std::string& request_id = "") {
  JobRecord j;
  j.id = id;
  j.tenant = tenant;
  j.request_id = request_id;
  j.request_hash = "h-" + id;
  j.concept_name = "teddy";
  j.superclass = "toy";
  j.options.steps = 100;
  j.options.seed = 42;
  j.labels = {{"team", "a"}};
  j.image_count = 2;
  j.create_time = j.update_time = absl::FromUnixSeconds(1700000000);
  return j;
}

// Two processes opening a new file at once both read "version 0" and each ran the first
// migration; the second failed at start ("table jobs already exists"). Each step now checks again
// under the write lock. A third connection holds that lock while both start, so both read first.
TEST(SqliteStoreOpenTest, TwoFirstOpensOfOneFileBothSucceed) {
  const std::string dir = testing::MakeTempDir();
  const std::string path = dir + "/race.db";
  sqlite3* holder = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &holder), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(holder, "PRAGMA journal_mode=WAL", nullptr, nullptr, nullptr), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(holder, "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                                 "applied_us INTEGER NOT NULL)",
                         nullptr, nullptr, nullptr),
            SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(holder, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr), SQLITE_OK);
  absl::StatusOr<std::unique_ptr<SqliteStore>> a, b;
  std::thread ta([&] { a = SqliteStore::Open(path); });
  std::thread tb([&] { b = SqliteStore::Open(path); });
  absl::SleepFor(absl::Milliseconds(300));  // both have read the version and wait for the lock
  ASSERT_EQ(sqlite3_exec(holder, "COMMIT", nullptr, nullptr, nullptr), SQLITE_OK);
  ta.join();
  tb.join();
  sqlite3_close(holder);
  EXPECT_THAT(a, IsOk());
  EXPECT_THAT(b, IsOk());
  if (a.ok() && b.ok()) {
    ASSERT_THAT((*a)->InsertJob(NewJob("job_1", "acme"), {"x"}), IsOk());
    EXPECT_THAT((*b)->GetJob("job_1"), IsOk());
  }
}

class SqliteStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto s = SqliteStore::Open(":memory:");
    ASSERT_THAT(s, IsOk());
    store_ = *std::move(s);
  }
  std::unique_ptr<SqliteStore> store_;
};

TEST_F(SqliteStoreTest, MigratesToTheLatestSchema) { EXPECT_EQ(store_->schema_version(), 3); }

// Job and concept behaviour is the store conformance suite's (store_conformance_test.cc), which
// runs on SQLite and PostgreSQL alike; this file keeps what only SQLite has (schema version, WAL).

TEST(SqliteStoreFileTest, ReopenKeepsDataAndUsesWal) {
  std::string dir = testing::MakeTempDir();
  std::string path = dir + "/perfusion.db";
  {
    auto s = SqliteStore::Open(path);
    ASSERT_THAT(s, IsOk());
    ASSERT_THAT((*s)->InsertJob(NewJob("job_1", "acme"), {"x"}), IsOk());
  }
  auto s = SqliteStore::Open(path);
  ASSERT_THAT(s, IsOk());
  EXPECT_THAT((*s)->GetJob("job_1"), IsOk());
  EXPECT_EQ((*s)->schema_version(), 3);
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  sqlite3_stmt* st = nullptr;
  sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &st, nullptr);
  ASSERT_EQ(sqlite3_step(st), SQLITE_ROW);
  EXPECT_STREQ(reinterpret_cast<const char*>(sqlite3_column_text(st, 0)), "wal");
  sqlite3_finalize(st);
  sqlite3_close(db);
}

// Migration 3 (concept_names) on a database made before it: the counters start from the versions
// stored then, so the next import after deleting the newest still does not reuse its number.
TEST(SqliteStoreFileTest, MigrationThreeContinuesTheVersionsAlreadyStored) {
  const std::string path = testing::MakeTempDir() + "/perfusion.db";
  auto Concept = [](const std::string& id) {
    ConceptRecord c;
    c.id = id;
    c.tenant = "acme";
    c.name = "teddy";
    c.superclass = "toy";
    c.base_model_id = "tiny";
    c.digest = "d-" + id;
    c.size_bytes = 1;
    c.format_version = 1;
    c.dtype = "float16";
    return c;
  };
  {
    auto s = SqliteStore::Open(path);
    ASSERT_THAT(s, IsOk());
    ASSERT_THAT((*s)->InsertConcept(Concept("cpt_1"), "a"), IsOk());
    ASSERT_THAT((*s)->InsertConcept(Concept("cpt_2"), "b"), IsOk());
  }
  {
    // Back to schema 2, as a database written by the previous release.
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
    ASSERT_EQ(sqlite3_exec(db, "DROP TABLE concept_names; DELETE FROM schema_migrations WHERE version = 3;",
                           nullptr, nullptr, nullptr),
              SQLITE_OK);
    sqlite3_close(db);
  }
  auto s = SqliteStore::Open(path);
  ASSERT_THAT(s, IsOk());
  EXPECT_EQ((*s)->schema_version(), 3);
  ASSERT_THAT((*s)->DeleteConcept("acme", "cpt_2"), IsOk());
  auto next = (*s)->InsertConcept(Concept("cpt_3"), "c");
  ASSERT_THAT(next, IsOk());
  EXPECT_EQ(next->version, 3);
}

}  // namespace
}  // namespace perfusion::server

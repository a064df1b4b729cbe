// server/sqlite_store.{h,cc}: the embedded store (in memory and on disk).
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sqlite3.h>

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

class SqliteStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto s = SqliteStore::Open(":memory:");
    ASSERT_THAT(s, IsOk());
    store_ = *std::move(s);
  }
  std::unique_ptr<SqliteStore> store_;
};

TEST_F(SqliteStoreTest, MigratesToTheLatestSchema) { EXPECT_EQ(store_->schema_version(), 2); }

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
  EXPECT_EQ((*s)->schema_version(), 2);
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  sqlite3_stmt* st = nullptr;
  sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &st, nullptr);
  ASSERT_EQ(sqlite3_step(st), SQLITE_ROW);
  EXPECT_STREQ(reinterpret_cast<const char*>(sqlite3_column_text(st, 0)), "wal");
  sqlite3_finalize(st);
  sqlite3_close(db);
}

}  // namespace
}  // namespace perfusion::server

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
using testing::StatusIs;

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

ConceptRecord NewConcept(const std::string& id, const std::string& tenant,
                         const std::string& name) {
  ConceptRecord c;
  c.id = id;
  c.tenant = tenant;
  c.name = name;
  c.superclass = "toy";
  c.base_model_id = "tiny";
  c.digest = "d-" + id;
  c.size_bytes = 5;
  c.format_version = 1;
  c.dtype = "float16";
  c.create_time = absl::FromUnixSeconds(1700000000);
  return c;
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

TEST_F(SqliteStoreTest, JobRoundTripsEveryField) {
  ASSERT_THAT(store_->InsertJob(NewJob("job_1", "acme", "r1"), {"img0", "img1"}), IsOk());
  auto j = store_->GetJob("job_1");
  ASSERT_THAT(j, IsOk());
  EXPECT_EQ(j->tenant, "acme");
  EXPECT_EQ(j->request_id, "r1");
  EXPECT_EQ(j->options.steps, 100);
  EXPECT_EQ(j->options.seed, 42u);
  EXPECT_EQ(j->labels.at("team"), "a");
  EXPECT_EQ(j->state, JobState::kQueued);
  EXPECT_EQ(j->create_time, absl::FromUnixSeconds(1700000000));
  EXPECT_EQ(j->start_time, absl::InfinitePast());
  EXPECT_EQ(*store_->GetJobImages("job_1"), (std::vector<std::string>{"img0", "img1"}));
  EXPECT_THAT(store_->GetJob("job_2"), StatusIs(absl::StatusCode::kNotFound));
}

TEST_F(SqliteStoreTest, RequestIdIsUniquePerTenant) {
  ASSERT_THAT(store_->InsertJob(NewJob("job_1", "acme", "r1"), {"x"}), IsOk());
  EXPECT_THAT(store_->InsertJob(NewJob("job_2", "acme", "r1"), {"x"}),
              StatusIs(absl::StatusCode::kAlreadyExists));
  EXPECT_THAT(store_->InsertJob(NewJob("job_3", "globex", "r1"), {"x"}), IsOk());
  EXPECT_THAT(store_->InsertJob(NewJob("job_4", "acme"), {"x"}), IsOk());
  EXPECT_THAT(store_->InsertJob(NewJob("job_5", "acme"), {"x"}), IsOk());  // "" is not a key
  auto found = store_->FindJobByRequestId("acme", "r1");
  ASSERT_THAT(found, IsOk());
  ASSERT_TRUE(found->has_value());
  EXPECT_EQ((*found)->id, "job_1");
  EXPECT_FALSE(store_->FindJobByRequestId("initech", "r1")->has_value());
}

TEST_F(SqliteStoreTest, FinalStateDeletesImagesAndKeepsResult) {
  ASSERT_THAT(store_->InsertJob(NewJob("job_1", "acme"), {"a", "b"}), IsOk());
  JobRecord j = *store_->GetJob("job_1");
  j.state = JobState::kRunning;
  ASSERT_THAT(store_->UpdateJob(j), IsOk());
  EXPECT_THAT(store_->GetJobImages("job_1"), IsOk());
  j.state = JobState::kFailed;
  j.error_code = 3;
  j.error_message = "images[0]: undecodable";
  ASSERT_THAT(store_->UpdateJob(j), IsOk());
  EXPECT_THAT(store_->GetJobImages("job_1"), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_EQ(store_->GetJob("job_1")->error_message, "images[0]: undecodable");
}

TEST_F(SqliteStoreTest, ListJobsPaginatesNewestFirstAndFilters) {
  for (int i = 0; i < 5; ++i) {
    ASSERT_THAT(store_->InsertJob(NewJob("job_" + std::to_string(i), "acme"), {"x"}), IsOk());
  }
  ASSERT_THAT(store_->InsertJob(NewJob("job_other", "globex"), {"x"}), IsOk());
  JobRecord j = *store_->GetJob("job_3");
  j.state = JobState::kCancelled;
  ASSERT_THAT(store_->UpdateJob(j), IsOk());

  auto p1 = store_->ListJobs("acme", std::nullopt, 2, "");
  ASSERT_THAT(p1, IsOk());
  ASSERT_EQ(p1->items.size(), 2u);
  EXPECT_EQ(p1->items[0].id, "job_4");
  EXPECT_EQ(p1->items[1].id, "job_3");
  auto p2 = store_->ListJobs("acme", std::nullopt, 2, p1->next_page_token);
  auto p3 = store_->ListJobs("acme", std::nullopt, 2, p2->next_page_token);
  EXPECT_EQ(p2->items[0].id, "job_2");
  ASSERT_EQ(p3->items.size(), 1u);
  EXPECT_EQ(p3->items[0].id, "job_0");
  EXPECT_EQ(p3->next_page_token, "");
  auto cancelled = store_->ListJobs("acme", JobState::kCancelled, 10, "");
  ASSERT_EQ(cancelled->items.size(), 1u);
  EXPECT_EQ(cancelled->items[0].id, "job_3");
  EXPECT_THAT(store_->ListJobs("acme", std::nullopt, 2, "garbage"),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(SqliteStoreTest, ConceptVersionsIncreasePerName) {
  auto a = store_->InsertConcept(NewConcept("c1", "acme", "teddy"), "blob1");
  auto b = store_->InsertConcept(NewConcept("c2", "acme", "teddy"), "blob2");
  auto c = store_->InsertConcept(NewConcept("c3", "globex", "teddy"), "blob3");
  ASSERT_THAT(b, IsOk());
  EXPECT_EQ(a->version, 1);
  EXPECT_EQ(b->version, 2);
  EXPECT_EQ(c->version, 1);
  EXPECT_EQ(store_->GetConceptByName("acme", "teddy", 0)->id, "c2");
  EXPECT_EQ(store_->GetConceptByName("acme", "teddy", 1)->id, "c1");
  EXPECT_THAT(store_->GetConceptByName("acme", "teddy", 3),
              StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(store_->GetConcept("globex", "c1"), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_EQ(*store_->GetConceptBlob("acme", "c2"), "blob2");
  EXPECT_EQ(*store_->GetBlobByDigest("d-c3"), "blob3");
  EXPECT_EQ(*store_->CountConcepts("acme"), 2);
  EXPECT_EQ(store_->ConceptTotals()->concepts, 3);
}

TEST_F(SqliteStoreTest, CompleteJobWithConceptIsAtomic) {
  ASSERT_THAT(store_->InsertJob(NewJob("job_1", "acme"), {"x"}), IsOk());
  JobRecord j = *store_->GetJob("job_1");
  j.state = JobState::kSucceeded;
  auto c = store_->CompleteJobWithConcept(j, NewConcept("c1", "acme", "teddy"), "blob", "");
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(store_->GetJob("job_1")->concept_id, "c1");
  // A clash on the concept id rolls the job update back.
  ASSERT_THAT(store_->InsertJob(NewJob("job_2", "acme"), {"x"}), IsOk());
  JobRecord j2 = *store_->GetJob("job_2");
  j2.state = JobState::kSucceeded;
  EXPECT_THAT(store_->CompleteJobWithConcept(j2, NewConcept("c1", "acme", "teddy"), "blob", ""),
              StatusIs(absl::StatusCode::kAlreadyExists));
  EXPECT_EQ(store_->GetJob("job_2")->state, JobState::kQueued);
}

TEST_F(SqliteStoreTest, LabelsUpdateAndDelete) {
  ASSERT_THAT(store_->InsertConcept(NewConcept("c1", "acme", "teddy"), "b"), IsOk());
  ASSERT_THAT(store_->SetConceptLabels("acme", "c1", {{"k", "v"}}), IsOk());
  EXPECT_EQ(store_->GetConcept("acme", "c1")->labels.at("k"), "v");
  EXPECT_THAT(store_->SetConceptLabels("globex", "c1", {}), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(store_->DeleteConcept("globex", "c1"), StatusIs(absl::StatusCode::kNotFound));
  ASSERT_THAT(store_->DeleteConcept("acme", "c1"), IsOk());
  EXPECT_THAT(store_->GetConcept("acme", "c1"), StatusIs(absl::StatusCode::kNotFound));
}

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

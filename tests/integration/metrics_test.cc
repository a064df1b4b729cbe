// /metrics of a real server and worker after real traffic: the documented names are there and
// count what happened.
#include <string>

#include <gtest/gtest.h>

#include "tests/integration/cluster.h"

namespace perfusion::testing {
namespace {

using MetricsTest = ClusterTest;

TEST_F(MetricsTest, ServerAndWorkerExposeDocumentedMetricsAfterTraffic) {
  ASSERT_TRUE(cluster_.StartServer());
  const int w = cluster_.StartWorker("w1", {"--max_batch=1"});
  ASSERT_GE(w, 0);
  const std::string dir = cluster_.RenderConcept("checker_star");
  ASSERT_FALSE(dir.empty());
  CommandResult r = cluster_.Ctl({"train", dir, "--superclass", "star", "--name", "star",
                                  "--steps", "5"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  for (int i = 0; i < 2; ++i) {
    r = cluster_.Ctl({"generate", "a photo of <star>", "-o", cluster_.dir() + "/out", "--steps",
                      "4", "--seed", std::to_string(i)});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }

  const std::string server = HttpGet(cluster_.server_metrics_port(), "/metrics");
  ASSERT_FALSE(server.empty());
  for (const char* name :
       {"grpc_server_started_total", "grpc_server_handled_total", "grpc_server_handling_seconds_bucket",
        "perfusion_training_queue_depth", "perfusion_training_jobs_total",
        "perfusion_training_job_duration_seconds_count", "perfusion_generate_requests_total",
        "perfusion_generate_compute_duration_seconds_count", "perfusion_workers_connected",
        "perfusion_concepts_stored"}) {
    EXPECT_GE(MetricValue(server, name), 0) << name << " missing from the server's /metrics";
  }
  EXPECT_EQ(MetricValue(server, "perfusion_workers_connected"), 1);

  const std::string worker = HttpGet(cluster_.worker_metrics_port(w), "/metrics");
  ASSERT_FALSE(worker.empty());
  // One concept, fetched by the first generation and cached for the second.
  EXPECT_EQ(MetricValue(worker, "perfusion_worker_concept_cache_misses_total"), 1);
  EXPECT_EQ(MetricValue(worker, "perfusion_worker_concept_cache_hits_total"), 1);
  EXPECT_GT(MetricValue(worker, "perfusion_worker_concept_cache_bytes"), 0);
  EXPECT_EQ(MetricValue(worker, "perfusion_worker_training_step_seconds_count"), 5);
  EXPECT_EQ(MetricValue(worker, "perfusion_worker_generation_seconds_count"), 2);
  EXPECT_EQ(MetricValue(worker, "perfusion_worker_busy"), 0);
  EXPECT_EQ(MetricValue(worker, "perfusion_worker_registered"), 1);
  EXPECT_EQ(MetricValue(worker, "perfusion_worker_work_items_total",
                        "kind=\"training\",outcome=\"completed\""),
            1);
  EXPECT_EQ(MetricValue(worker, "perfusion_worker_work_items_total",
                        "kind=\"generation\",outcome=\"completed\""),
            2);
  EXPECT_EQ(HttpGet(cluster_.worker_metrics_port(w), "/healthz").substr(0, 2), "ok");
}

}  // namespace
}  // namespace perfusion::testing

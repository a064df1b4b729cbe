// server/metrics.{h,cc} and server/metrics_http.{h,cc}: the Prometheus text format and the
// /metrics endpoint.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "server/metrics.h"
#include "server/metrics_http.h"
#include "server/server_metrics.h"
#include "server/sqlite_store.h"
#include "tests/server/hooked_store.h"
#include "tests/server/server_test_util.h"
#include "tests/server/status_matchers.h"

namespace perfusion::server {
namespace {

using ::testing::HasSubstr;
using testing::ConnectLocal;
using testing::HttpGet;
using testing::IsOk;
using testing::ReadAll;

// A store that does not answer turns the scrape-time gauges to NaN (not their last values, which an
// autoscaler would go on trusting) and is counted; the next scrape that reaches it restores them.
TEST(MetricsTest, StoreGaugesReadNaNWhileTheStoreFails) {
  auto sqlite = SqliteStore::Open(":memory:");
  ASSERT_THAT(sqlite, IsOk());
  testing::HookedStore store(sqlite->get());
  metrics::Registry r;
  auto m = ServerMetrics::Create(r);
  CollectStoreGauges(store, *m);
  std::string text = r.Render();
  EXPECT_THAT(text, HasSubstr("perfusion_training_jobs{state=\"QUEUED\"} 0\n"));
  EXPECT_THAT(text, HasSubstr("perfusion_concepts_stored 0\n"));
  EXPECT_THAT(text, HasSubstr("perfusion_store_scrape_errors_total 0\n"));
  store.before_count_jobs = [] { return absl::UnavailableError("connection lost"); };
  store.before_concept_totals = [] { return absl::UnavailableError("connection lost"); };
  CollectStoreGauges(store, *m);
  text = r.Render();
  EXPECT_THAT(text, HasSubstr("perfusion_training_jobs{state=\"QUEUED\"} NaN\n"));
  EXPECT_THAT(text, HasSubstr("perfusion_training_jobs{state=\"CANCELLED\"} NaN\n"));
  EXPECT_THAT(text, HasSubstr("perfusion_concepts_stored NaN\n"));
  EXPECT_THAT(text, HasSubstr("perfusion_concept_bytes_stored NaN\n"));
  EXPECT_THAT(text, HasSubstr("perfusion_store_scrape_errors_total 2\n"));
  CollectStoreGauges(store, *m);  // the hooks ran once: the store answers again
  text = r.Render();
  EXPECT_THAT(text, HasSubstr("perfusion_training_jobs{state=\"QUEUED\"} 0\n"));
  EXPECT_THAT(text, HasSubstr("perfusion_concepts_stored 0\n"));
}

TEST(MetricsTest, CounterRendersHelpTypeAndLabelledSamples) {
  metrics::Registry r;
  auto& c = r.AddCounter("requests_total", "Requests.", {"method", "code"});
  c.WithLabels({"Get", "OK"}).Inc();
  c.WithLabels({"Get", "OK"}).Inc(2);
  c.WithLabels({"Put", "NotFound"}).Inc();
  EXPECT_EQ(r.Render(),
            "# HELP requests_total Requests.\n"
            "# TYPE requests_total counter\n"
            "requests_total{method=\"Get\",code=\"OK\"} 3\n"
            "requests_total{method=\"Put\",code=\"NotFound\"} 1\n");
}

TEST(MetricsTest, CounterIgnoresNegativeIncrements) {
  metrics::Registry r;
  auto& c = r.AddCounter("x_total", "X.").WithLabels({});
  c.Inc(5);
  c.Inc(-3);
  EXPECT_EQ(c.Value(), 5);
}

TEST(MetricsTest, GaugeGoesUpAndDown) {
  metrics::Registry r;
  auto& g = r.AddGauge("queue_depth", "Depth.").WithLabels({});
  g.Set(4);
  g.Inc();
  g.Dec(2);
  EXPECT_EQ(r.Render(), "# HELP queue_depth Depth.\n# TYPE queue_depth gauge\nqueue_depth 3\n");
}

TEST(MetricsTest, HistogramBucketsAreCumulativeAndBoundaryInclusive) {
  metrics::Registry r;
  auto& h = r.AddHistogram("latency_seconds", "Latency.", {}, {0.1, 1}).WithLabels({});
  h.Observe(0.1);  // equal to a bound: lands in that bucket
  h.Observe(0.5);
  h.Observe(7);
  EXPECT_EQ(r.Render(),
            "# HELP latency_seconds Latency.\n"
            "# TYPE latency_seconds histogram\n"
            "latency_seconds_bucket{le=\"0.1\"} 1\n"
            "latency_seconds_bucket{le=\"1\"} 2\n"
            "latency_seconds_bucket{le=\"+Inf\"} 3\n"
            "latency_seconds_sum 7.6\n"
            "latency_seconds_count 3\n");
}

TEST(MetricsTest, LabelValuesAreEscaped) {
  metrics::Registry r;
  r.AddGauge("g", "G.", {"l"}).WithLabels({"a\"b\\c\nd"}).Set(1);
  EXPECT_THAT(r.Render(), HasSubstr("g{l=\"a\\\"b\\\\c\\nd\"} 1\n"));
}

TEST(MetricsTest, ValuesUseShortestRoundTripForm) {
  EXPECT_EQ(metrics::FormatValue(0.1), "0.1");
  EXPECT_EQ(metrics::FormatValue(1234567), "1234567");
  EXPECT_EQ(metrics::FormatValue(1.0 / 3), "0.3333333333333333");
  EXPECT_EQ(metrics::FormatValue(1.0 / 0.0), "+Inf");
}

TEST(MetricsTest, CollectHooksRunBeforeRendering) {
  metrics::Registry r;
  auto& g = r.AddGauge("stored", "Stored.").WithLabels({});
  int calls = 0;
  r.AddCollectHook([&] { g.Set(++calls * 10); });
  EXPECT_THAT(r.Render(), HasSubstr("stored 10\n"));
  EXPECT_THAT(r.Render(), HasSubstr("stored 20\n"));
}

TEST(MetricsHttpTest, ServesMetricsAndHealthzOnItsOwnPort) {
  metrics::Registry r;
  r.AddCounter("hits_total", "Hits.").WithLabels({}).Inc();
  MetricsHttpServer http(&r);
  auto port = http.Start("127.0.0.1:0");
  ASSERT_THAT(port, IsOk());
  std::string resp = HttpGet(*port, "/metrics");
  EXPECT_THAT(resp, HasSubstr("HTTP/1.1 200 OK"));
  EXPECT_THAT(resp, HasSubstr("Content-Type: text/plain; version=0.0.4"));
  EXPECT_THAT(resp, HasSubstr("\r\n\r\n# HELP hits_total Hits."));
  EXPECT_THAT(HttpGet(*port, "/healthz"), HasSubstr("200 OK"));
  EXPECT_THAT(HttpGet(*port, "/nope"), HasSubstr("404 Not Found"));
  EXPECT_THAT(HttpGet(*port, "/metrics", "POST"), HasSubstr("405"));
  http.SetDraining(true);
  EXPECT_THAT(HttpGet(*port, "/healthz"), HasSubstr("503"));
  http.Stop();
  EXPECT_EQ(HttpGet(*port, "/metrics"), "");  // nothing listens any more
}

// Probes must answer while other clients hold connections open. A client that trickled one byte
// at a time once held the only serving thread for as long as it kept going (each byte restarted a
// 2 s receive timeout), so /healthz hung and liveness probes failed.
TEST(MetricsHttpTest, SlowClientsDelayNeitherProbesNorStop) {
  metrics::Registry r;
  MetricsHttpServer http(&r);
  auto port = http.Start("127.0.0.1:0");
  ASSERT_THAT(port, IsOk());
  const int silent = ConnectLocal(*port);  // connects and never sends
  const int slow = ConnectLocal(*port);
  ASSERT_GE(silent, 0);
  ASSERT_GE(slow, 0);
  std::atomic<bool> done{false};
  std::thread trickle([&] {
    const std::string partial = "GET /metrics HTTP/1.1\r\nHost: x\r\n";
    for (size_t i = 0; !done.load() && i < 40; ++i) {
      if (send(slow, partial.data() + i % partial.size(), 1, MSG_NOSIGNAL) <= 0) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(150));
    }
  });
  const int probe = ConnectLocal(*port);
  ASSERT_GE(probe, 0);
  const std::string req = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
  send(probe, req.data(), req.size(), 0);
  // Well inside the trickle's 6 s (the property), with room for a loaded CI machine.
  EXPECT_THAT(ReadAll(probe, std::chrono::milliseconds(4000)), HasSubstr("200 OK"));
  close(probe);
  // The trickling client's request never completes within its deadline: it is answered and closed
  // (within kRequestTimeout of connecting) rather than kept for the 6 s it would go on sending.
  EXPECT_THAT(ReadAll(slow, MetricsHttpServer::kRequestTimeout + std::chrono::milliseconds(2000)),
              HasSubstr("408 Request Timeout"));
  EXPECT_THAT(ReadAll(silent, MetricsHttpServer::kRequestTimeout + std::chrono::milliseconds(2000)),
              HasSubstr("408 Request Timeout"));
  done.store(true);
  trickle.join();
  close(slow);
  close(silent);
  http.Stop();
}

TEST(MetricsHttpTest, RejectsMalformedAddress) {
  metrics::Registry r;
  MetricsHttpServer http(&r);
  EXPECT_THAT(http.Start("no-port"), testing::StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(http.Start("example.com:80"), testing::StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace perfusion::server

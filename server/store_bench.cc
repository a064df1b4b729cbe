// perfusion-store-bench: job submissions and lease operations per second through N store
// instances (N server replicas, each with its own connection pool) on one database.
//
//   perfusion-store-bench --store=postgres://perfusion@127.0.0.1:5432/bench --replicas=4
//   perfusion-store-bench --store=sqlite:///tmp/bench.db --replicas=1
//
// Each replica runs --threads client threads. Phase 1 inserts --jobs jobs (3 small images each,
// like a tiny training job); phase 2 leases them all with LeaseNextJob. Prints one line per
// phase. The database should be empty (a fresh one per run).
#include <atomic>
#include <cstdio>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/store_factory.h"

ABSL_FLAG(std::string, store, "", "Store URL (sqlite:///path or postgres://...)");
ABSL_FLAG(int, replicas, 1, "Store instances (simulated server replicas)");
ABSL_FLAG(int, threads, 4, "Client threads per replica");
ABSL_FLAG(int, jobs, 2000, "Jobs to submit, then lease");
ABSL_FLAG(int, image_bytes, 4096, "Bytes per training image (3 per job)");

using perfusion::server::JobRecord;
using perfusion::server::Store;

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int replicas = absl::GetFlag(FLAGS_replicas);
  const int threads = absl::GetFlag(FLAGS_threads);
  const int jobs = absl::GetFlag(FLAGS_jobs);
  std::vector<std::unique_ptr<Store>> stores;
  for (int i = 0; i < replicas; ++i) {
    auto s = perfusion::server::OpenStore(absl::GetFlag(FLAGS_store));
    if (!s.ok()) {
      fprintf(stderr, "store-bench: %s\n", std::string(s.status().message()).c_str());
      return 1;
    }
    stores.push_back(*std::move(s));
  }
  const std::vector<std::string> images(3, std::string(absl::GetFlag(FLAGS_image_bytes), 'x'));
  auto run = [&](const char* phase, auto op) {
    std::atomic<int> next{0}, errors{0}, done{0};
    std::vector<std::thread> ts;
    absl::Time start = absl::Now();
    for (int r = 0; r < replicas; ++r) {
      for (int t = 0; t < threads; ++t) {
        ts.emplace_back([&, r] {
          for (int i = next++; i < jobs; i = next++) {
            if (op(stores[r].get(), i)) {
              ++done;
            } else {
              ++errors;
            }
          }
        });
      }
    }
    for (auto& t : ts) t.join();
    double secs = absl::ToDoubleSeconds(absl::Now() - start);
    printf("%s replicas=%d threads/replica=%d ops=%d errors=%d seconds=%.3f ops_per_second=%.0f\n",
           phase, replicas, threads, done.load(), errors.load(), secs, done.load() / secs);
  };
  const absl::Time now = absl::Now();
  run("submit", [&](Store* s, int i) {
    JobRecord j;
    j.id = perfusion::server::NewId("job_");
    j.tenant = absl::StrCat("tenant", i % 10);
    j.request_id = j.id;
    j.request_hash = "h";
    j.concept_name = "teddy";
    j.superclass = "toy";
    j.options.steps = 10;
    j.image_count = 3;
    j.create_time = j.update_time = now;
    // What SubmitTraining does: the idempotency look-up, then the insert.
    auto found = s->FindJobByRequestId(j.tenant, j.request_id);
    return found.ok() && s->InsertJob(j, images).ok();
  });
  run("lease", [&](Store* s, int i) {
    Store::LeaseGrant g;
    g.lease_id = absl::StrCat("lease_", i);
    g.worker_id = "bench";
    g.now = now;
    g.deadline = now + absl::Seconds(600);
    auto l = s->LeaseNextJob(g);
    return l.ok() && l->has_value();
  });
  return 0;
}

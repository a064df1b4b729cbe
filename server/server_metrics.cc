#include "server/server_metrics.h"

#include <limits>

namespace perfusion::server {

std::unique_ptr<ServerMetrics> ServerMetrics::Create(metrics::Registry& r) {
  auto m = std::make_unique<ServerMetrics>();
  m->rpc_started = &r.AddCounter("grpc_server_started_total", "RPCs started on the server.",
                                 {"grpc_service", "grpc_method", "grpc_type"});
  m->rpc_handled = &r.AddCounter("grpc_server_handled_total",
                                 "RPCs completed on the server, by status code.",
                                 {"grpc_service", "grpc_method", "grpc_type", "grpc_code"});
  m->rpc_seconds = &r.AddHistogram("grpc_server_handling_seconds",
                                   "Time from an RPC's start to its status, in seconds.",
                                   {"grpc_service", "grpc_method", "grpc_type"},
                                   metrics::RpcLatencyBuckets());

  m->training_queue_depth =
      &r.AddGauge("perfusion_training_queue_depth",
                  "Training jobs waiting for a worker (with a shared store: store-wide, the same "
                  "on every replica; aggregate with max).")
           .WithLabels({});
  m->training_jobs = &r.AddGauge("perfusion_training_jobs",
                                 "Training jobs in the store, by state.", {"state"});
  m->training_jobs_total = &r.AddCounter("perfusion_training_jobs_total",
                                         "Training jobs that ended, by outcome.", {"outcome"});
  // Every outcome exists from the start at 0: a series born at 1 by the first failure after a
  // restart is invisible to increase(), and the ratio alerts need both series.
  for (const char* o : {"succeeded", "failed", "cancelled"}) m->training_jobs_total->WithLabels({o});
  m->training_duration =
      &r.AddHistogram("perfusion_training_job_duration_seconds",
                      "Training time of succeeded jobs (first lease to completion), in seconds.",
                      {}, {1, 5, 15, 30, 60, 120, 240, 480, 900, 1800, 3600, 7200})
           .WithLabels({});
  m->training_queue_wait =
      &r.AddHistogram("perfusion_training_queue_wait_seconds",
                      "Time from submission to the first lease, in seconds.", {},
                      {1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200})
           .WithLabels({});
  m->lease_expirations = &r.AddCounter("perfusion_training_lease_expirations_total",
                                       "Training leases that expired (worker lost).")
                              .WithLabels({});

  m->generate_queue_depth =
      &r.AddGauge("perfusion_generate_queue_depth", "Generation requests waiting for a worker.")
           .WithLabels({});
  m->generate_requests_total = &r.AddCounter("perfusion_generate_requests_total",
                                             "Generation requests that ended, by outcome.",
                                             {"outcome"});
  for (const char* o : {"ok", "failed", "cancelled", "deadline"}) m->generate_requests_total->WithLabels({o});
  // Up to --max_generation_seconds' default (600 s) and beyond: a p99 must not stop at the last
  // bucket just when generations are slowest.
  const std::vector<double> gen_buckets = {0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024};
  m->generate_queue_seconds =
      &r.AddHistogram("perfusion_generate_queue_duration_seconds",
                      "Time a generation request waited for a worker (or, never leased, until it ended; "
                      "client cancels left out), in seconds.", {},
                      gen_buckets)
           .WithLabels({});
  m->generate_compute_seconds =
      &r.AddHistogram("perfusion_generate_compute_duration_seconds",
                      "Worker compute time of a generation request, in seconds.", {}, gen_buckets)
           .WithLabels({});
  m->generate_seconds =
      &r.AddHistogram("perfusion_generate_duration_seconds",
                      "Submission to the end of a generation request, any outcome but a client's "
                      "cancel, in seconds.", {},
                      gen_buckets)
           .WithLabels({});
  m->generate_concepts = &r.AddHistogram("perfusion_generate_concepts_per_request",
                                         "Concepts referenced per generation request.", {},
                                         {0, 1, 2, 3, 4, 6, 8})
                              .WithLabels({});

  m->workers_connected =
      &r.AddGauge("perfusion_workers_connected", "Workers seen within the worker timeout.")
           .WithLabels({});
  m->concepts_stored =
      &r.AddGauge("perfusion_concepts_stored", "Concepts in the store, all tenants.")
           .WithLabels({});
  m->concept_bytes_stored =
      &r.AddGauge("perfusion_concept_bytes_stored", "Bytes of concept blobs in the store.")
           .WithLabels({});
  m->store_scrape_errors =
      &r.AddCounter("perfusion_store_scrape_errors_total",
                    "Store queries for the scrape-time gauges that failed (those gauges read NaN "
                    "until the store answers).")
           .WithLabels({});
  return m;
}

void CollectStoreGauges(Store& store, ServerMetrics& m) {
  const double unknown = std::numeric_limits<double>::quiet_NaN();
  if (auto counts = store.CountJobsByState(); counts.ok()) {
    for (const auto& [state, n] : *counts) {
      m.training_jobs->WithLabels({JobStateName(state)}).Set(static_cast<double>(n));
    }
  } else {
    m.store_scrape_errors->Inc();
    for (int st = static_cast<int>(JobState::kQueued); st <= static_cast<int>(JobState::kCancelled); ++st) {
      m.training_jobs->WithLabels({JobStateName(static_cast<JobState>(st))}).Set(unknown);
    }
  }
  if (auto totals = store.ConceptTotals(); totals.ok()) {
    m.concepts_stored->Set(static_cast<double>(totals->concepts));
    m.concept_bytes_stored->Set(static_cast<double>(totals->concept_bytes));
  } else {
    m.store_scrape_errors->Inc();
    m.concepts_stored->Set(unknown);
    m.concept_bytes_stored->Set(unknown);
  }
}

}  // namespace perfusion::server

// The server's Prometheus families, built once (ServerMetrics::Create) and passed to the parts
// that update them. Names follow docs/service-conventions.md: base units, `_total` counters,
// histograms for durations, no id in any label.
//
// RED per RPC (updated by the interceptor in rpc_metrics.h):
//   grpc_server_started_total{grpc_service,grpc_method,grpc_type}
//   grpc_server_handled_total{grpc_service,grpc_method,grpc_type,grpc_code}
//   grpc_server_handling_seconds{grpc_service,grpc_method,grpc_type} (histogram)
// Domain:
//   perfusion_training_queue_depth, perfusion_training_jobs{state},
//   perfusion_training_jobs_total{outcome}, perfusion_training_job_duration_seconds,
//   perfusion_training_queue_wait_seconds, perfusion_training_lease_expirations_total,
//   perfusion_generate_queue_depth, perfusion_generate_requests_total{outcome},
//   perfusion_generate_queue_duration_seconds, perfusion_generate_compute_duration_seconds,
//   perfusion_generate_duration_seconds, perfusion_generate_concepts_per_request,
//   perfusion_workers_connected, perfusion_concepts_stored, perfusion_concept_bytes_stored,
//   perfusion_store_scrape_errors_total.
#ifndef PERFUSION_SERVER_SERVER_METRICS_H_
#define PERFUSION_SERVER_SERVER_METRICS_H_

#include <memory>

#include "server/metrics.h"
#include "server/store.h"

namespace perfusion::server {

struct ServerMetrics {
  metrics::CounterFamily* rpc_started = nullptr;
  metrics::CounterFamily* rpc_handled = nullptr;
  metrics::HistogramFamily* rpc_seconds = nullptr;

  metrics::Gauge* training_queue_depth = nullptr;
  metrics::GaugeFamily* training_jobs = nullptr;        // {state}, counted in the store at scrape
  metrics::CounterFamily* training_jobs_total = nullptr;  // {outcome}
  metrics::Histogram* training_duration = nullptr;
  metrics::Histogram* training_queue_wait = nullptr;
  metrics::Counter* lease_expirations = nullptr;

  metrics::Gauge* generate_queue_depth = nullptr;
  metrics::CounterFamily* generate_requests_total = nullptr;  // {outcome}
  metrics::Histogram* generate_queue_seconds = nullptr;
  metrics::Histogram* generate_compute_seconds = nullptr;
  metrics::Histogram* generate_seconds = nullptr;
  metrics::Histogram* generate_concepts = nullptr;

  metrics::Gauge* workers_connected = nullptr;
  metrics::Gauge* concepts_stored = nullptr;
  metrics::Gauge* concept_bytes_stored = nullptr;
  // Store queries behind the scrape-time gauges (training_jobs, concepts) that failed; those
  // gauges read NaN until the store answers again.
  metrics::Counter* store_scrape_errors = nullptr;

  // Registers every family in `registry` (which must outlive the result).
  static std::unique_ptr<ServerMetrics> Create(metrics::Registry& registry);
};

// The scrape-time gauges counted in the store: perfusion_training_jobs{state},
// perfusion_concepts_stored and perfusion_concept_bytes_stored. A store that does not answer (a
// PostgreSQL failover) turns them to NaN rather than leaving the last values (the postgres
// overlay scales workers on perfusion_training_jobs: a frozen number would keep it scaling on old
// data), and counts perfusion_store_scrape_errors_total.
void CollectStoreGauges(Store& store, ServerMetrics& m);

}  // namespace perfusion::server

#endif  // PERFUSION_SERVER_SERVER_METRICS_H_

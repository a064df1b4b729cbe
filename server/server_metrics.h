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
//   perfusion_workers_connected, perfusion_concepts_stored, perfusion_concept_bytes_stored.
#ifndef PERFUSION_SERVER_SERVER_METRICS_H_
#define PERFUSION_SERVER_SERVER_METRICS_H_

#include <memory>

#include "server/metrics.h"

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

  // Registers every family in `registry` (which must outlive the result).
  static std::unique_ptr<ServerMetrics> Create(metrics::Registry& registry);
};

}  // namespace perfusion::server

#endif  // PERFUSION_SERVER_SERVER_METRICS_H_

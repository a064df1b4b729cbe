// WorkerMetrics: the Prometheus families of perfusion-worker, built once on a registry
// (server/metrics.h) that --metrics_listen serves as GET /metrics.
//
//   perfusion_worker_concept_cache_hits_total     counter    blob cache hits (by digest)
//   perfusion_worker_concept_cache_misses_total   counter    misses (each one a FetchConcept)
//   perfusion_worker_concept_cache_bytes          gauge      bytes of blobs held
//   perfusion_worker_concept_cache_entries        gauge      blobs held
//   perfusion_worker_training_step_seconds        histogram  one training step
//   perfusion_worker_training_seconds             histogram  one training job (engine time)
//   perfusion_worker_generation_seconds           histogram  one Engine::Generate call (a batch)
//   perfusion_worker_generation_batch_size        histogram  work items per Generate call
//   perfusion_worker_work_items_total{kind,outcome} counter  kind: training|generation;
//                                                  outcome: completed|failed|cancelled|returned|lost
//   perfusion_worker_busy                         gauge      1 while running work, else 0
//   perfusion_worker_registered                   gauge      1 while registered with the server
//   perfusion_worker_server_errors_total{method,code} counter  failed WorkerService calls
//   perfusion_worker_info{base_model_id,device,version} gauge  always 1
//
// Thread safety: the pointers are set once in the constructor; the metrics are thread-safe.
#ifndef PERFUSION_WORKER_WORKER_METRICS_H_
#define PERFUSION_WORKER_WORKER_METRICS_H_

#include <string>

#include "server/metrics.h"

namespace perfusion::worker {

class BlobCache;

struct WorkerMetrics {
  // `cache` (may be null) feeds the cache gauges at scrape time; it must outlive the registry.
  WorkerMetrics(server::metrics::Registry* registry, const BlobCache* cache);

  server::metrics::Counter* cache_hits;
  server::metrics::Counter* cache_misses;
  server::metrics::Histogram* training_step_seconds;
  server::metrics::Histogram* training_seconds;
  server::metrics::Histogram* generation_seconds;
  server::metrics::Histogram* generation_batch_size;
  server::metrics::CounterFamily* work_items;
  server::metrics::Gauge* busy;
  server::metrics::Gauge* registered;
  server::metrics::CounterFamily* server_errors;
  server::metrics::GaugeFamily* info;
};

}  // namespace perfusion::worker

#endif  // PERFUSION_WORKER_WORKER_METRICS_H_

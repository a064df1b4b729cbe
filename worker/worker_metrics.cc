#include "worker/worker_metrics.h"

#include "worker/blob_cache.h"

namespace perfusion::worker {

namespace m = server::metrics;

WorkerMetrics::WorkerMetrics(m::Registry* r, const BlobCache* cache) {
  cache_hits = &r->AddCounter("perfusion_worker_concept_cache_hits_total",
                              "Concept blobs found in the worker's cache (by digest).")
                    .WithLabels({});
  cache_misses = &r->AddCounter("perfusion_worker_concept_cache_misses_total",
                                "Concept blobs not in the cache, fetched from the server.")
                      .WithLabels({});
  m::Gauge* cache_bytes =
      &r->AddGauge("perfusion_worker_concept_cache_bytes", "Bytes of concept blobs cached.")
           .WithLabels({});
  m::Gauge* cache_entries =
      &r->AddGauge("perfusion_worker_concept_cache_entries", "Concept blobs cached.")
           .WithLabels({});
  training_step_seconds =
      &r->AddHistogram("perfusion_worker_training_step_seconds",
                       "Duration of one training step.", {},
                       m::ExponentialBuckets(0.005, 2, 16))
           .WithLabels({});
  // Up to 16384 s: SD 1.5 at --max_train_steps (5000) and about a second a step must not land
  // in +Inf.
  training_seconds = &r->AddHistogram("perfusion_worker_training_seconds",
                                      "Engine time of one training job.", {},
                                      m::ExponentialBuckets(0.5, 2, 16))
                          .WithLabels({});
  generation_seconds =
      &r->AddHistogram("perfusion_worker_generation_seconds",
                       "Duration of one Engine::Generate call (a batch of work items).", {},
                       m::ExponentialBuckets(0.01, 2, 16))
           .WithLabels({});
  generation_batch_size =
      &r->AddHistogram("perfusion_worker_generation_batch_size",
                       "Generation work items run in one Engine::Generate call.", {},
                       {1, 2, 4, 8, 16, 32})
           .WithLabels({});
  work_items = &r->AddCounter("perfusion_worker_work_items_total",
                              "Work items ended by this worker, by kind and outcome.",
                              {"kind", "outcome"});
  // Every kind and outcome from the start at 0 (see the server's outcome counters).
  for (const char* kind : {"training", "generation"}) {
    for (const char* outcome : {"completed", "failed", "cancelled", "lost", "returned"}) {
      work_items->WithLabels({kind, outcome});
    }
  }
  busy = &r->AddGauge("perfusion_worker_busy", "1 while the worker runs work, else 0.")
              .WithLabels({});
  registered = &r->AddGauge("perfusion_worker_registered",
                            "1 while the worker is registered with the server, else 0.")
                    .WithLabels({});
  server_errors = &r->AddCounter("perfusion_worker_server_errors_total",
                                 "Failed WorkerService calls, by method and gRPC code.",
                                 {"method", "code"});
  info = &r->AddGauge("perfusion_worker_info", "Always 1; labels describe the worker.",
                      {"base_model_id", "device", "version"});
  if (cache != nullptr) {
    r->AddCollectHook([cache, cache_bytes, cache_entries] {
      const BlobCache::Stats s = cache->stats();
      cache_bytes->Set(static_cast<double>(s.bytes));
      cache_entries->Set(static_cast<double>(s.entries));
    });
  }
}

}  // namespace perfusion::worker

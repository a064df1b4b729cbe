// perfusion-server: the control plane. See docs/api.md; `perfusion-server --help` lists flags.
#include <signal.h>

#include <algorithm>
#include <cstdio>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/log.h"
#include "server/server.h"
#include "server/store_factory.h"
#include "worker/perfusion/prompt_region.h"

ABSL_FLAG(std::string, listen, "0.0.0.0:50051", "gRPC address host:port (port 0: any free port)");
ABSL_FLAG(std::string, metrics_listen, "127.0.0.1:9090",
          "Prometheus /metrics and /healthz address host:port (IPv4; 0.0.0.0 for all "
          "interfaces); empty: disabled");
ABSL_FLAG(std::string, data_dir, "/var/lib/perfusion",
          "Folder of the SQLite database perfusion.db (created if missing)");
ABSL_FLAG(std::string, store, "",
          "Store URL: sqlite:///path/perfusion.db, or postgres://user@host:5432/db (shared by "
          "several replicas; password from PGPASSWORD). Empty: SQLite in --data_dir");
ABSL_FLAG(std::string, shared_store, "auto",
          "on: several replicas share --store (the queue and leases live in the database, not in "
          "this process; docs/scaling.md); off: this server owns the queue; auto: on for "
          "postgres:// stores, off for SQLite");
ABSL_FLAG(int, shared_poll_ms, 500,
          "Shared store: how often the queue, expired leases and watched jobs are re-read (ms)");
ABSL_FLAG(std::string, tokens_file, "",
          "Tenant tokens, one `<token> <tenant>` per line ('#' comments). Required unless "
          "--allow_unauthenticated");
ABSL_FLAG(std::string, worker_tokens_file, "",
          "Worker tokens, one per line; WorkerService accepts only these");
ABSL_FLAG(bool, allow_unauthenticated, false,
          "Development only: without --tokens_file every public call is tenant \"default\"");
ABSL_FLAG(std::string, tls_cert, "", "PEM certificate chain; with --tls_key enables TLS");
ABSL_FLAG(std::string, tls_key, "", "PEM private key for --tls_cert");
ABSL_FLAG(std::string, base_model_id, "perfusion-tiny-v3",
          "Id of the base model served; workers must register with it, and concepts of another "
          "base are refused");
ABSL_FLAG(std::string, vocab, "",
          "CLIP tokenizer vocab.json (the model's tokenizer/vocab.json): enables the "
          "single-token superclass check");
ABSL_FLAG(int, max_queue, 1000, "Queued training jobs, all tenants (RESOURCE_EXHAUSTED beyond)");
ABSL_FLAG(int, tenant_max_jobs, 20, "Active (queued or running) training jobs per tenant");
ABSL_FLAG(int, tenant_max_concepts, 1000, "Stored concepts per tenant");
ABSL_FLAG(int, tenant_max_watches, 100, "Open WatchTrainingJob streams per tenant");
ABSL_FLAG(int64_t, max_concept_bytes, 0,
          "Largest concept blob ImportConcept accepts, bytes (an SD 1.5 concept is about 60 KB; "
          "a tenant stores at most tenant_max_concepts times this); 0: 4 MiB, or less where "
          "--max_message_bytes needs it");
ABSL_FLAG(int, max_generation_queue, 64, "Generation requests queued or running, all tenants");
ABSL_FLAG(int, tenant_max_generations, 16, "Generation requests in flight per tenant");
ABSL_FLAG(int, lease_seconds, 60,
          "A lease expires this long after the worker's last heartbeat; the job is re-queued");
ABSL_FLAG(int, max_lease_wait_seconds, 30, "Longest LeaseWork long poll");
ABSL_FLAG(int, max_attempts, 3, "Leases per training job before it fails");
ABSL_FLAG(int, max_generation_seconds, 600, "Longest life of a generation request");
ABSL_FLAG(int, min_images, 3, "Fewest training images per job");
ABSL_FLAG(int, max_images, 20, "Most training images per job");
ABSL_FLAG(int64_t, max_image_bytes, 8 << 20, "Largest encoded training image, bytes");
ABSL_FLAG(int64_t, max_image_pixels, 16000000, "Largest training image, width*height");
ABSL_FLAG(int, max_train_steps, 5000, "Largest TrainingOptions.steps");
ABSL_FLAG(int, default_train_steps, 400, "TrainingOptions.steps when unset");
ABSL_FLAG(int, max_prompt_chars, 1000, "Longest prompt (and negative prompt), characters");
ABSL_FLAG(int, max_concepts_per_prompt, 8, "Most distinct concepts referenced by one prompt");
ABSL_FLAG(int, max_regions, 4,
          "Most regional prompts per generation, 0..8 (each costs one more UNet pass per image; 0 "
          "refuses regions)");
ABSL_FLAG(int, max_image_side, 1024, "Largest generated width/height (multiple of 8)");
ABSL_FLAG(double, default_guidance_rescale, 0.0,
          "Guidance rescale used when a GenerateRequest leaves guidance_rescale unset, in [0, 1] "
          "(0.7 suits zero-terminal-SNR models; 0: off)");
ABSL_FLAG(int, default_image_side, 0,
          "Generated width/height when unset; 0: the worker's model's native size (512 for SD 1.5, "
          "32 for the tiny model)");
ABSL_FLAG(int, max_message_bytes, 64 << 20, "Largest gRPC message received or sent");
ABSL_FLAG(int64_t, max_upload_bytes_in_flight, int64_t{1} << 30,
          "Bytes of streamed uploads buffered at once (RESOURCE_EXHAUSTED beyond)");
ABSL_FLAG(int64_t, tenant_max_upload_bytes_in_flight, int64_t{256} << 20,
          "Of those, what one tenant's streamed uploads may hold at once, bytes");
ABSL_FLAG(int, drain_seconds, 30,
          "On SIGTERM/SIGINT: how long in-flight generations may take before the server stops");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "perfusion-server: the perfusion-serve control plane (gRPC API, job queue, concept "
      "registry).\n  perfusion-server --data_dir=/var/lib/perfusion --tokens_file=tokens.txt "
      "--worker_tokens_file=workers.txt --base_model_id=perfusion-tiny-v3");
  absl::FlagsUsageConfig usage;
  // --help lists this file's flags (by default absl lists those of a file named after the binary).
  usage.contains_help_flags = [](absl::string_view file) {
    return absl::EndsWith(file, "server/main.cc");
  };
  usage.contains_helpshort_flags = usage.contains_help_flags;
  absl::SetFlagsUsageConfig(usage);
  absl::ParseCommandLine(argc, argv);

  // Block the stop signals in every thread; main waits for them below.
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);

  using perfusion::server::ServerOptions;
  ServerOptions o;
  o.listen = absl::GetFlag(FLAGS_listen);
  o.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  o.data_dir = absl::GetFlag(FLAGS_data_dir);
  o.store_url = absl::GetFlag(FLAGS_store);
  o.tokens_file = absl::GetFlag(FLAGS_tokens_file);
  o.worker_tokens_file = absl::GetFlag(FLAGS_worker_tokens_file);
  o.allow_unauthenticated = absl::GetFlag(FLAGS_allow_unauthenticated);
  o.tls_cert = absl::GetFlag(FLAGS_tls_cert);
  o.tls_key = absl::GetFlag(FLAGS_tls_key);
  o.vocab = absl::GetFlag(FLAGS_vocab);
  o.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  o.max_upload_bytes_in_flight = absl::GetFlag(FLAGS_max_upload_bytes_in_flight);
  o.tenant_max_upload_bytes_in_flight = absl::GetFlag(FLAGS_tenant_max_upload_bytes_in_flight);
  o.max_concept_bytes = absl::GetFlag(FLAGS_max_concept_bytes);
  if (o.max_concept_bytes == 0) {  // the default follows a lowered --max_message_bytes
    o.max_concept_bytes = std::min<int64_t>(4 << 20, std::max<int64_t>(1024, o.max_message_bytes - (16 << 10)));
  }
  o.drain_timeout = absl::Seconds(absl::GetFlag(FLAGS_drain_seconds));
  o.scheduler.base_model_id = absl::GetFlag(FLAGS_base_model_id);
  o.scheduler.max_queue = absl::GetFlag(FLAGS_max_queue);
  o.scheduler.tenant_max_jobs = absl::GetFlag(FLAGS_tenant_max_jobs);
  o.scheduler.tenant_max_concepts = absl::GetFlag(FLAGS_tenant_max_concepts);
  o.scheduler.tenant_max_watches = absl::GetFlag(FLAGS_tenant_max_watches);
  o.scheduler.max_generation_queue = absl::GetFlag(FLAGS_max_generation_queue);
  o.scheduler.tenant_max_generations = absl::GetFlag(FLAGS_tenant_max_generations);
  o.scheduler.lease_duration = absl::Seconds(absl::GetFlag(FLAGS_lease_seconds));
  o.scheduler.max_lease_wait = absl::Seconds(absl::GetFlag(FLAGS_max_lease_wait_seconds));
  o.scheduler.worker_timeout = o.scheduler.lease_duration + o.scheduler.max_lease_wait;
  o.scheduler.max_attempts = absl::GetFlag(FLAGS_max_attempts);
  o.scheduler.max_generation_time = absl::Seconds(absl::GetFlag(FLAGS_max_generation_seconds));
  o.limits.min_images = absl::GetFlag(FLAGS_min_images);
  o.limits.max_images = absl::GetFlag(FLAGS_max_images);
  o.limits.max_image_bytes = absl::GetFlag(FLAGS_max_image_bytes);
  o.limits.max_image_pixels = absl::GetFlag(FLAGS_max_image_pixels);
  o.limits.max_train_steps = absl::GetFlag(FLAGS_max_train_steps);
  o.limits.default_train_steps = absl::GetFlag(FLAGS_default_train_steps);
  o.limits.max_prompt_chars = absl::GetFlag(FLAGS_max_prompt_chars);
  o.limits.max_concepts_per_prompt = absl::GetFlag(FLAGS_max_concepts_per_prompt);
  o.limits.max_regions = absl::GetFlag(FLAGS_max_regions);
  if (o.limits.max_regions < 0 || o.limits.max_regions > static_cast<int>(perfusion::kMaxRegions)) {
    fprintf(stderr, "perfusion-server: --max_regions must be in [0, %zu] (the worker's limit)\n",
            perfusion::kMaxRegions);
    return 2;
  }
  o.limits.max_image_side = absl::GetFlag(FLAGS_max_image_side);
  o.limits.default_image_side = absl::GetFlag(FLAGS_default_image_side);
  o.limits.default_guidance_rescale = static_cast<float>(absl::GetFlag(FLAGS_default_guidance_rescale));
  if (o.limits.default_guidance_rescale < 0 || o.limits.default_guidance_rescale > 1) {
    fprintf(stderr, "perfusion-server: --default_guidance_rescale must be in [0, 1]\n");
    return 2;
  }

  const std::string shared = absl::GetFlag(FLAGS_shared_store);
  if (shared == "auto") {
    auto url = perfusion::server::ParseStoreUrl(o.store_url);
    o.scheduler.shared_store = !o.store_url.empty() && url.ok() &&
                               url->kind == perfusion::server::StoreUrl::Kind::kPostgres;
  } else if (shared == "on" || shared == "off") {
    o.scheduler.shared_store = shared == "on";
  } else {
    fprintf(stderr, "perfusion-server: --shared_store must be auto, on or off, got \"%s\"\n",
            shared.c_str());
    return 2;
  }
  o.scheduler.shared_poll_interval = absl::Milliseconds(absl::GetFlag(FLAGS_shared_poll_ms));
  if (absl::GetFlag(FLAGS_shared_poll_ms) < 10) {
    fprintf(stderr, "perfusion-server: --shared_poll_ms must be >= 10\n");
    return 2;
  }
  if (o.max_concept_bytes < 1024 || o.max_concept_bytes > o.max_message_bytes - (16 << 10)) {
    fprintf(stderr, "perfusion-server: --max_concept_bytes must be in [1024, --max_message_bytes - 16 KiB]\n");
    return 2;
  }
  if (o.scheduler.tenant_max_watches < 1 || o.tenant_max_upload_bytes_in_flight < 1 ||
      o.tenant_max_upload_bytes_in_flight > o.max_upload_bytes_in_flight) {
    fprintf(stderr, "perfusion-server: --tenant_max_watches must be >= 1 and --tenant_max_upload_bytes_in_flight "
                    "in [1, --max_upload_bytes_in_flight]\n");
    return 2;
  }
  if (o.scheduler.lease_duration <= absl::ZeroDuration() || o.scheduler.max_attempts < 1 ||
      o.limits.min_images < 1 || o.limits.max_images < o.limits.min_images) {
    fprintf(stderr, "perfusion-server: --lease_seconds, --max_attempts must be positive and "
                    "1 <= --min_images <= --max_images\n");
    return 2;
  }

  auto server = perfusion::server::PerfusionServer::Start(o);
  if (!server.ok()) {
    fprintf(stderr, "perfusion-server: %s\n", std::string(server.status().ToString()).c_str());
    return 1;
  }
  int sig = 0;
  sigwait(&stop, &sig);
  perfusion::server::LogEvent("signal", {{"signal", sig == SIGTERM ? "SIGTERM" : "SIGINT"}});
  (*server)->Shutdown();
  return 0;
}

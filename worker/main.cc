// perfusion-worker: the data plane. Loads the base model once, dials perfusion-server, and runs
// the training and generation work it leases (worker/agent.h). `perfusion-worker --help` lists
// the flags; docs/api.md ("Worker protocol") describes what it speaks.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "server/log.h"
#include "server/metrics.h"
#include "server/metrics_http.h"
#include "worker/agent.h"
#include "worker/blob_cache.h"
#include "worker/engine.h"
#include "worker/worker_metrics.h"

ABSL_FLAG(std::string, server, "localhost:50051", "perfusion-server gRPC address host:port");
ABSL_FLAG(std::string, worker_token_file, "",
          "File holding the worker token (one of the server's --worker_tokens_file lines); "
          "default: the environment variable PERFUSION_WORKER_TOKEN");
ABSL_FLAG(std::string, model_dir, "models/tiny",
          "Base model folder (diffusers layout: models/tiny, or an SD 1.x folder)");
ABSL_FLAG(std::string, tokenizer_dir, "",
          "Folder with the CLIP vocab.json and merges.txt when the model has no tokenizer/ "
          "(also: env PERFUSION_CLIP_VOCAB_DIR)");
ABSL_FLAG(std::string, device, "cpu", "LibTorch device: cpu, cuda, cuda:1, ...");
ABSL_FLAG(std::string, dtype, "fp32", "Model dtype: fp32, fp16 or bf16");
ABSL_FLAG(int, threads, 0, "LibTorch intra-op threads; 0: the library default");
ABSL_FLAG(std::string, name, "",
          "Worker name shown in the server's logs; default: the host name");
ABSL_FLAG(int64_t, concept_cache_bytes, int64_t{256} << 20,
          "Bytes of concept blobs kept in the LRU cache (by digest)");
ABSL_FLAG(std::string, metrics_listen, "127.0.0.1:9091",
          "Prometheus GET /metrics and /healthz address host:port (IPv4; port 0: any free port; "
          "0.0.0.0 for all interfaces); empty: not served");
ABSL_FLAG(int, max_batch, 4,
          "Generation work items leased together and run in one engine batch (1: no batching)");
ABSL_FLAG(bool, training, true, "Accept training work");
ABSL_FLAG(bool, generation, true, "Accept generation work");
ABSL_FLAG(bool, tls, false, "Dial the server with TLS");
ABSL_FLAG(std::string, tls_ca_file, "", "PEM root certificates for --tls; empty: system roots");
ABSL_FLAG(std::string, tls_server_name, "",
          "Name expected in the server certificate (overrides the host of --server)");
ABSL_FLAG(int, lease_wait_seconds, 30,
          "LeaseWork long-poll time asked of the server (it cuts it to its own maximum)");
ABSL_FLAG(int, progress_interval_ms, 1000,
          "Progress heartbeats are sent at most this often (and at least every heartbeat "
          "interval the server asks for)");
ABSL_FLAG(int, max_message_bytes, 256 << 20, "Largest gRPC message received or sent");
ABSL_FLAG(int, stall_seconds, 900,
          "Work that reports no new step for this long is taken as hung: its lease is let go (the "
          "server re-queues it) and /healthz answers 503 so the orchestrator restarts the worker; "
          "0: never");
ABSL_FLAG(bool, print_base_model_id, false,
          "Load the model, print its base model id (the server's --base_model_id) and exit");

namespace {

// The signal thread stops the agent; g_mu keeps the agent alive while it does.
std::atomic<bool> g_stop{false};
std::mutex g_mu;
perfusion::worker::Agent* g_agent = nullptr;  // guarded by g_mu

std::string ReadToken(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "";
  std::stringstream text;
  text << in.rdbuf();
  return perfusion::client::TokenFromText(text.str());
}

std::string HostName() {
  char buf[256] = {0};
  if (gethostname(buf, sizeof(buf) - 1) != 0) return "worker";
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  using perfusion::server::LogEvent;
  absl::SetProgramUsageMessage(
      "runs Perfusion training and generation for perfusion-server.\n"
      "  PERFUSION_WORKER_TOKEN=... perfusion-worker --server=perfusion:50051 "
      "--model_dir=models/tiny\n"
      "SIGTERM/SIGINT: stops the running work, hands its lease back and exits 0.");
  // --help lists this file's flags (absl's default looks for a file named after the binary).
  absl::FlagsUsageConfig usage;
  usage.contains_help_flags = [](absl::string_view path) {
    return absl::EndsWith(path, "worker/main.cc");
  };
  usage.contains_helpshort_flags = usage.contains_help_flags;
  absl::SetFlagsUsageConfig(usage);
  const std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  if (positional.size() > 1) {
    fprintf(stderr, "perfusion-worker: unexpected argument '%s' (every setting is a --flag; see --help)\n",
            positional[1]);
    return 2;
  }

  // Block the stop signals in every thread (gRPC's and LibTorch's included); one thread waits.
  sigset_t stop_set;
  sigemptyset(&stop_set);
  sigaddset(&stop_set, SIGINT);
  sigaddset(&stop_set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_set, nullptr);
  std::thread([stop_set] {
    int count = 0;
    while (true) {
      int sig = 0;
      if (sigwait(&stop_set, &sig) != 0) continue;
      LogEvent("signal", {{"signal", sig == SIGTERM ? "SIGTERM" : "SIGINT"}});
      if (++count > 1) std::_Exit(1);  // a second signal: leave at once
      g_stop.store(true);
      std::lock_guard<std::mutex> lock(g_mu);
      if (g_agent != nullptr) g_agent->Stop();
    }
  }).detach();

  const bool print_id = absl::GetFlag(FLAGS_print_base_model_id);
  std::string token;
  if (!print_id) {
    const std::string token_file = absl::GetFlag(FLAGS_worker_token_file);
    std::string token_source = "--worker_token_file " + token_file;
    if (!token_file.empty()) {
      token = ReadToken(token_file);
      if (token.empty()) {
        fprintf(stderr, "perfusion-worker: --worker_token_file %s: no token in it\n",
                token_file.c_str());
        return 2;
      }
    } else if (const char* env = std::getenv("PERFUSION_WORKER_TOKEN"); env && *env) {
      token = perfusion::client::TokenFromText(env);
      token_source = "PERFUSION_WORKER_TOKEN";
      if (token.empty()) {
        fprintf(stderr, "perfusion-worker: PERFUSION_WORKER_TOKEN: no token in it\n");
        return 2;
      }
    } else {
      fprintf(stderr, "perfusion-worker: a worker token is required: --worker_token_file or "
                      "PERFUSION_WORKER_TOKEN\n");
      return 2;
    }
    // gRPC aborts the process on a header value it cannot send; refuse such a token here instead.
    if (absl::Status s = perfusion::client::CheckToken(token, token_source); !s.ok()) {
      fprintf(stderr, "perfusion-worker: %s\n", std::string(s.message()).c_str());
      return 2;
    }
  }
  const int max_batch = absl::GetFlag(FLAGS_max_batch);
  if (max_batch < 1 || (!absl::GetFlag(FLAGS_training) && !absl::GetFlag(FLAGS_generation))) {
    fprintf(stderr, "perfusion-worker: --max_batch must be >= 1 and at least one of --training, "
                    "--generation true\n");
    return 2;
  }
  if (absl::GetFlag(FLAGS_max_message_bytes) < (1 << 20) || absl::GetFlag(FLAGS_threads) < 0 ||
      absl::GetFlag(FLAGS_concept_cache_bytes) < 0 || absl::GetFlag(FLAGS_stall_seconds) < 0) {
    fprintf(stderr, "perfusion-worker: --max_message_bytes must be >= 1 MiB, --threads >= 0 (0: the library's "
                    "default), --concept_cache_bytes >= 0 (0: no cache) and --stall_seconds >= 0 (0: never)\n");
    return 2;
  }

  perfusion::worker::EngineOptions eo;
  eo.model_dir = absl::GetFlag(FLAGS_model_dir);
  eo.tokenizer_dir = absl::GetFlag(FLAGS_tokenizer_dir);
  eo.device = absl::GetFlag(FLAGS_device);
  eo.dtype = absl::GetFlag(FLAGS_dtype);
  eo.threads = absl::GetFlag(FLAGS_threads);
  if (!print_id) {
    LogEvent("worker_starting", {{"model_dir", eo.model_dir},
                                 {"device", eo.device},
                                 {"dtype", eo.dtype},
                                 {"server", absl::GetFlag(FLAGS_server)}});
  }
  const absl::Time load_start = absl::Now();
  auto engine = perfusion::worker::Engine::Load(eo);
  if (!engine.ok()) {
    LogEvent("model_load_failed", {{"model_dir", eo.model_dir},
                                   {"code", absl::StatusCodeToString(engine.status().code())},
                                   {"error", std::string(engine.status().message())}});
    fprintf(stderr, "perfusion-worker: cannot load %s: %s\n", eo.model_dir.c_str(),
            std::string(engine.status().message()).c_str());
    return 1;
  }
  if (print_id) {
    printf("%s\n", (*engine)->base_model_id().c_str());
    return 0;
  }
  LogEvent("model_loaded", {{"base_model_id", (*engine)->base_model_id()},
                            {"device", (*engine)->device()},
                            {"native_size", std::to_string((*engine)->native_size())},
                            {"seconds", absl::StrFormat("%.2f", absl::ToDoubleSeconds(
                                                                    absl::Now() - load_start))}});
  if (g_stop.load()) {
    LogEvent("worker_stopped", {{"reason", "signal during model load"}});
    return 0;
  }

  perfusion::worker::BlobCache cache(absl::GetFlag(FLAGS_concept_cache_bytes));
  perfusion::server::metrics::Registry registry;
  perfusion::worker::WorkerMetrics metrics(&registry, &cache);
  const std::string version = "0.1.0";
  metrics.info->WithLabels({(*engine)->base_model_id(), (*engine)->device(), version}).Set(1);
  perfusion::server::MetricsHttpServer metrics_http(&registry);
  const std::string metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  if (!metrics_listen.empty()) {
    auto port = metrics_http.Start(metrics_listen);
    if (!port.ok()) {
      fprintf(stderr, "perfusion-worker: --metrics_listen %s: %s\n", metrics_listen.c_str(),
              std::string(port.status().message()).c_str());
      return 1;
    }
    LogEvent("metrics_listening", {{"address", metrics_listen},
                                   {"metrics_port", std::to_string(*port)}});
  }

  perfusion::client::ClientOptions co;
  co.server = absl::GetFlag(FLAGS_server);
  co.tls = absl::GetFlag(FLAGS_tls);
  co.tls_ca_file = absl::GetFlag(FLAGS_tls_ca_file);
  co.tls_server_name = absl::GetFlag(FLAGS_tls_server_name);
  co.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  // Reconnect quickly after a server restart: leases are short.
  co.max_reconnect_backoff = absl::Seconds(2);
  // A silently dead connection is found in 30 s and redialled, well inside a lease (60 s).
  co.keepalive = absl::Seconds(20);
  co.keepalive_timeout = absl::Seconds(10);
  auto channel = perfusion::client::MakeChannel(co);
  if (!channel.ok()) {
    fprintf(stderr, "perfusion-worker: %s\n", std::string(channel.status().message()).c_str());
    return 2;
  }

  perfusion::worker::AgentOptions ao;
  ao.token = token;
  ao.name = absl::GetFlag(FLAGS_name).empty() ? HostName() : absl::GetFlag(FLAGS_name);
  ao.device = (*engine)->device();
  ao.version = version;
  ao.training = absl::GetFlag(FLAGS_training);
  ao.generation = absl::GetFlag(FLAGS_generation);
  ao.max_batch = max_batch;
  ao.lease_wait = absl::Seconds(std::max(1, absl::GetFlag(FLAGS_lease_wait_seconds)));
  ao.progress_interval = absl::Milliseconds(std::max(50, absl::GetFlag(FLAGS_progress_interval_ms)));
  ao.stall_timeout = absl::Seconds(absl::GetFlag(FLAGS_stall_seconds));
  ao.on_stall = [&metrics_http] { metrics_http.SetDraining(true); };
  perfusion::worker::Agent agent(ao, *channel, engine->get(), &cache, &metrics);
  {
    std::lock_guard<std::mutex> lock(g_mu);
    g_agent = &agent;
  }
  if (g_stop.load()) agent.Stop();
  absl::Status s = agent.Run();
  {
    std::lock_guard<std::mutex> lock(g_mu);
    g_agent = nullptr;
  }
  metrics_http.Stop();
  if (!s.ok()) {
    fprintf(stderr, "perfusion-worker: %s: %s\n", absl::StatusCodeToString(s.code()).c_str(),
            std::string(s.message()).c_str());
    return 1;
  }
  LogEvent("worker_stopped", {{"reason", "signal"}});
  return 0;
}

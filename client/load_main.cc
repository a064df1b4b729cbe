// perfusion-load: a load generator for perfusion-server on loopback (or anywhere).
//
//   perfusion-load --server 127.0.0.1:50051 --token acme-secret
//       [--concurrency 1,4,16] [--requests 2000] [--duration 10s]
//       [--generate 8] [--gen-concurrency 1,4] [--gen-steps 4] [--gen-size 32]
//       [--prompt "a photo of <rex>"] [--output json]
//
// Part 1, registry RPCs: for each concurrency level, that many threads share one channel and
// send ListConcepts (page_size 50) and then GetConcept (the tenant's newest concept) until
// --requests calls are done or --duration passes (whichever is first). Reports calls/s and the
// latency percentiles p50/p90/p99 per RPC and level.
// Part 2, generation overhead: --generate Generate calls (unary) per generation concurrency
// level; for each call the end-to-end time is compared with the worker's compute_duration (the
// engine's own time for the batch) and the queue_duration. Reports the percentiles of each and
// of the overhead (end-to-end minus compute), plus images/s.
// Every count and time is bounded; errors are counted and the first one printed.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/cli_args.h"
#include "client/client.h"

namespace {

namespace pc = perfusion::client;
namespace v1 = perfusion::v1;

constexpr char kUsage[] = R"(perfusion-load: drives the perfusion-serve API and reports rates and latencies.

Usage: perfusion-load [flags]
  --server HOST:PORT       (env PERFUSION_SERVER; default localhost:50051)
  --token TOKEN            tenant token (env PERFUSION_TOKEN)
  --token-file FILE        read the tenant token from FILE (its first non-comment line)
  --concurrency LIST       registry levels, comma-separated (default 1,4,16)
  --requests N             calls per RPC and level, at most (default 2000)
  --duration DUR           time per RPC and level, at most (default 10s)
  --generate N             Generate calls per generation level; 0 skips (default 8)
  --gen-concurrency LIST   generation levels (default 1,4)
  --gen-steps N            denoising steps (default 4)
  --gen-size PX            width and height (default 32)
  --prompt TEXT            generation prompt (default "a photo of a red circle")
  --gen-timeout DUR        each Generate call's deadline (default 10m)
  --output text|json
Exit codes as perfusionctl: 0 every call succeeded; 2 usage; otherwise the code of the first
failed call's status (5 unavailable, 1 other, ...). The report is printed either way.
)";

struct Percentiles {
  size_t n = 0;
  double p50 = 0, p90 = 0, p99 = 0, mean = 0, max = 0;
};

Percentiles Summarize(std::vector<double> v) {
  Percentiles p;
  p.n = v.size();
  if (v.empty()) return p;
  std::sort(v.begin(), v.end());
  auto at = [&](double q) {
    const size_t i = static_cast<size_t>(std::min<double>(v.size() - 1, q * (v.size() - 1) + 0.5));
    return v[i];
  };
  p.p50 = at(0.50);
  p.p90 = at(0.90);
  p.p99 = at(0.99);
  double sum = 0;
  for (double x : v) sum += x;
  p.mean = sum / v.size();
  p.max = v.back();
  return p;
}

nlohmann::json ToJson(const Percentiles& p) {
  return {{"n", p.n}, {"p50", p.p50}, {"p90", p.p90}, {"p99", p.p99}, {"mean", p.mean},
          {"max", p.max}};
}

absl::StatusOr<std::vector<int>> ParseList(const std::string& flag, const std::string& text) {
  std::vector<int> out;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    int v = 0;
    if (!absl::SimpleAtoi(part, &v) || v < 1 || v > 1024) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, ": \"", text,
                                                     "\" is not a list of integers in 1..1024"));
    }
    out.push_back(v);
  }
  if (out.empty()) return absl::InvalidArgumentError(absl::StrCat("--", flag, ": empty"));
  return out;
}

struct LevelResult {
  std::string rpc;
  int concurrency = 0;
  int64_t ok = 0, errors = 0;
  double seconds = 0;
  Percentiles latency_ms;
  std::string first_error;
  absl::StatusCode first_error_code = absl::StatusCode::kOk;
};

// p50/p90/p99 as text, or "-" when no call succeeded (0.0 would read as instant calls).
std::string Trio(const Percentiles& p) {
  if (p.n == 0) return "-/-/-";
  return absl::StrFormat("%.1f/%.1f/%.1f", p.p50, p.p90, p.p99);
}

// Runs `call` from `concurrency` threads until `requests` calls are done or `duration` passes.
LevelResult RunLevel(const std::string& rpc, int concurrency, int64_t requests,
                     absl::Duration duration, const std::function<absl::Status()>& call) {
  LevelResult r;
  r.rpc = rpc;
  r.concurrency = concurrency;
  std::atomic<int64_t> issued{0};
  std::atomic<int64_t> ok{0}, errors{0};
  std::mutex mu;
  std::vector<double> all;
  std::string first_error;
  absl::StatusCode first_error_code = absl::StatusCode::kOk;
  const absl::Time end = absl::Now() + duration;
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> threads;
  for (int t = 0; t < concurrency; ++t) {
    threads.emplace_back([&] {
      std::vector<double> mine;
      while (issued.fetch_add(1) < requests && absl::Now() < end) {
        const auto s0 = std::chrono::steady_clock::now();
        absl::Status s = call();
        const double ms =
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - s0).count();
        if (s.ok()) {
          ++ok;
          mine.push_back(ms);
        } else {
          ++errors;
          std::lock_guard<std::mutex> l(mu);
          if (first_error.empty()) {
            first_error = s.ToString();
            first_error_code = s.code();
          }
        }
      }
      std::lock_guard<std::mutex> l(mu);
      all.insert(all.end(), mine.begin(), mine.end());
    });
  }
  for (auto& th : threads) th.join();
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.ok = ok.load();
  r.errors = errors.load();
  r.latency_ms = Summarize(std::move(all));
  r.first_error = first_error;
  r.first_error_code = first_error_code;
  return r;
}

double Seconds(const google::protobuf::Duration& d) {
  return static_cast<double>(d.seconds()) + d.nanos() * 1e-9;
}

struct GenResult {
  int concurrency = 0;
  int64_t ok = 0, errors = 0, images = 0;
  double seconds = 0;
  Percentiles e2e_ms, compute_ms, queue_ms, overhead_ms;
  std::string first_error;
  absl::StatusCode first_error_code = absl::StatusCode::kOk;
};

GenResult RunGeneration(pc::Client* client, int concurrency, int64_t count,
                        const v1::GenerateRequest& base, absl::Duration timeout) {
  GenResult r;
  r.concurrency = concurrency;
  std::atomic<int64_t> issued{0};
  std::mutex mu;
  std::vector<double> e2e, compute, queue, overhead;
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> threads;
  for (int t = 0; t < concurrency; ++t) {
    threads.emplace_back([&] {
      int64_t i;
      while ((i = issued.fetch_add(1)) < count) {
        v1::GenerateRequest req = base;
        req.set_seed(1000 + static_cast<uint64_t>(i));
        const auto s0 = std::chrono::steady_clock::now();
        auto resp = client->GenerateUnary(req, timeout);
        const double ms =
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - s0).count();
        std::lock_guard<std::mutex> l(mu);
        if (!resp.ok()) {
          ++r.errors;
          if (r.first_error.empty()) {
            r.first_error = resp.status().ToString();
            r.first_error_code = resp.status().code();
          }
          continue;
        }
        ++r.ok;
        r.images += resp->images_size();
        const double c = 1000 * Seconds(resp->compute_duration());
        e2e.push_back(ms);
        compute.push_back(c);
        queue.push_back(1000 * Seconds(resp->queue_duration()));
        overhead.push_back(ms - c);
      }
    });
  }
  for (auto& th : threads) th.join();
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.e2e_ms = Summarize(e2e);
  r.compute_ms = Summarize(compute);
  r.queue_ms = Summarize(queue);
  r.overhead_ms = Summarize(overhead);
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> raw(argv + 1, argv + argc);
  const std::vector<pc::FlagSpec> specs = {
      {"server", true},       {"token", true},           {"token-file", true},
      {"concurrency", true},  {"gen-timeout", true},
      {"requests", true},     {"duration", true},        {"generate", true},
      {"gen-concurrency", true}, {"gen-steps", true},    {"gen-size", true},
      {"prompt", true},       {"output", true},          {"help", false, "h"}};
  auto args = pc::ParsedArgs::Parse(raw, specs);
  if (!args.ok()) {
    std::cerr << "perfusion-load: " << args.status().message() << "\n" << kUsage;
    return pc::kExitUsage;
  }
  if (args->Has("help")) {
    std::cout << kUsage;
    return 0;
  }
  if (!args->positionals().empty()) {
    std::cerr << "perfusion-load: unexpected argument " << args->positionals()[0] << "\n";
    return pc::kExitUsage;
  }
  auto levels = ParseList("concurrency", args->Get("concurrency", "1,4,16"));
  auto gen_levels = ParseList("gen-concurrency", args->Get("gen-concurrency", "1,4"));
  auto requests = args->GetInt("requests", 2000);
  auto duration = args->GetDuration("duration", absl::Seconds(10));
  auto generate = args->GetInt("generate", 8);
  auto gen_steps = args->GetInt("gen-steps", 4);
  auto gen_size = args->GetInt("gen-size", 32);
  auto gen_timeout = args->GetDuration("gen-timeout", absl::Minutes(10));
  for (const absl::Status& s : {levels.status(), gen_levels.status(), requests.status(),
                                duration.status(), generate.status(), gen_steps.status(),
                                gen_size.status(), gen_timeout.status()}) {
    if (!s.ok()) {
      std::cerr << "perfusion-load: " << s.message() << "\n";
      return pc::kExitUsage;
    }
  }
  const std::string output = args->Get("output", "text");
  if (output != "text" && output != "json") {
    std::cerr << "perfusion-load: --output must be text or json, not '" << output << "'\n";
    return pc::kExitUsage;
  }
  // The request fields are int32: a larger value would wrap, not be refused by the server.
  for (const auto& [flag, value] : {std::pair{"--gen-steps", gen_steps}, std::pair{"--gen-size", gen_size}}) {
    if (value.ok() && (*value < 1 || *value > INT32_MAX)) {
      std::cerr << "perfusion-load: " << flag << " must be in 1.." << INT32_MAX << "\n";
      return pc::kExitUsage;
    }
  }
  if (*requests < 1) {
    std::cerr << "perfusion-load: --requests must be >= 1\n";
    return pc::kExitUsage;
  }
  if (*generate < 0) {
    std::cerr << "perfusion-load: --generate must be >= 0 (0 skips generation)\n";
    return pc::kExitUsage;
  }
  if (*generate > 0 && *gen_timeout <= absl::ZeroDuration()) {
    std::cerr << "perfusion-load: --gen-timeout must be > 0\n";
    return pc::kExitUsage;
  }
  const bool json = output == "json";
  pc::ClientOptions o;
  const char* env_server = std::getenv("PERFUSION_SERVER");
  o.server = args->Get("server", env_server && *env_server ? env_server : "localhost:50051");
  absl::StatusOr<std::string> token = pc::TenantTokenFromArgs(*args);
  if (!token.ok()) {
    std::cerr << "perfusion-load: " << token.status().message() << "\n";
    return pc::kExitUsage;
  }
  o.token = *std::move(token);
  auto client = pc::Client::Connect(o);
  if (!client.ok()) {
    std::cerr << "perfusion-load: " << client.status() << "\n";
    return pc::ExitCodeFor(client.status().code());
  }
  pc::Client* c = client->get();

  // Probe: fails fast when the server is not there, and finds a concept for GetConcept.
  auto probe = c->ListConcepts("", 1);
  if (!probe.ok()) {
    std::cerr << "perfusion-load: ListConcepts: " << probe.status() << "\n";
    return pc::ExitCodeFor(probe.status().code());
  }
  nlohmann::json out;
  out["server"] = o.server;
  out["registry"] = nlohmann::json::array();
  std::vector<LevelResult> reg;
  for (int level : *levels) {
    v1::ListConceptsRequest lr;
    reg.push_back(RunLevel("ListConcepts", level, *requests, *duration, [&] {
      return c->ListConcepts("", 50).status();
    }));
    if (!probe->empty()) {
      pc::ConceptRef ref;
      ref.id = (*probe)[0].id();
      reg.push_back(RunLevel("GetConcept", level, *requests, *duration,
                             [&] { return c->GetConcept(ref).status(); }));
    }
  }
  if (!json) {
    std::cout << absl::StrFormat("%-13s %5s %8s %7s %10s %9s %9s %9s\n", "RPC", "CONC", "CALLS",
                                 "ERRORS", "CALLS/S", "P50_MS", "P90_MS", "P99_MS");
  }
  // The first failed call decides the exit code (0 when every call succeeded).
  absl::StatusCode first_failure = absl::StatusCode::kOk;
  auto note_failure = [&](absl::StatusCode code) {
    if (first_failure == absl::StatusCode::kOk) first_failure = code;
  };
  for (const LevelResult& r : reg) {
    if (r.errors > 0) note_failure(r.first_error_code);
    const double rps = r.seconds > 0 ? r.ok / r.seconds : 0;
    if (json) {
      out["registry"].push_back({{"rpc", r.rpc},
                                 {"concurrency", r.concurrency},
                                 {"ok", r.ok},
                                 {"errors", r.errors},
                                 {"seconds", r.seconds},
                                 {"calls_per_second", rps},
                                 {"latency_ms", ToJson(r.latency_ms)},
                                 {"first_error", r.first_error}});
    } else {
      auto ms = [&](double v) { return r.latency_ms.n == 0 ? std::string("-") : absl::StrFormat("%.3f", v); };
      std::cout << absl::StrFormat("%-13s %5d %8d %7d %10.0f %9s %9s %9s\n", r.rpc, r.concurrency, r.ok,
                                   r.errors, rps, ms(r.latency_ms.p50), ms(r.latency_ms.p90),
                                   ms(r.latency_ms.p99));
      if (!r.first_error.empty()) std::cout << "  first error: " << r.first_error << "\n";
    }
  }
  if (probe->empty() && !json) {
    std::cout << "(GetConcept skipped: the tenant has no concept)\n";
  }

  out["generation"] = nlohmann::json::array();
  if (*generate > 0) {
    v1::GenerateRequest req;
    req.set_prompt(args->Get("prompt", "a photo of a red circle"));
    req.set_steps(static_cast<int32_t>(*gen_steps));
    req.set_width(static_cast<int32_t>(*gen_size));
    req.set_height(static_cast<int32_t>(*gen_size));
    req.set_num_images(1);
    if (!json) {
      std::cout << absl::StrFormat(
          "\nGenerate (%d steps, %dx%d, 1 image): times in ms, overhead = end-to-end - compute\n",
          *gen_steps, *gen_size, *gen_size);
      std::cout << absl::StrFormat("%5s %5s %6s %8s %21s %21s %21s %21s\n", "CONC", "OK", "ERRORS",
                                   "IMAGES/S", "E2E p50/p90/p99", "COMPUTE p50/p90/p99",
                                   "QUEUE p50/p90/p99", "OVERHEAD p50/p90/p99");
    }
    for (int level : *gen_levels) {
      GenResult g = RunGeneration(c, level, *generate, req, *gen_timeout);
      if (g.errors > 0) note_failure(g.first_error_code);
      const double ips = g.seconds > 0 ? g.images / g.seconds : 0;
      if (json) {
        out["generation"].push_back({{"concurrency", g.concurrency},
                                     {"ok", g.ok},
                                     {"errors", g.errors},
                                     {"seconds", g.seconds},
                                     {"images_per_second", ips},
                                     {"e2e_ms", ToJson(g.e2e_ms)},
                                     {"compute_ms", ToJson(g.compute_ms)},
                                     {"queue_ms", ToJson(g.queue_ms)},
                                     {"overhead_ms", ToJson(g.overhead_ms)},
                                     {"first_error", g.first_error}});
      } else {
        std::cout << absl::StrFormat("%5d %5d %6d %8.2f %21s %21s %21s %21s\n", g.concurrency,
                                     g.ok, g.errors, ips, Trio(g.e2e_ms), Trio(g.compute_ms),
                                     Trio(g.queue_ms), Trio(g.overhead_ms));
        if (!g.first_error.empty()) std::cout << "  first error: " << g.first_error << "\n";
      }
    }
  }
  if (json) std::cout << out.dump(2) << "\n";
  return first_failure == absl::StatusCode::kOk ? 0 : pc::ExitCodeFor(first_failure);
}

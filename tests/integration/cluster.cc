#include "tests/integration/cluster.h"

#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"

#ifndef PERFUSION_SERVER_BIN
#error "PERFUSION_SERVER_BIN must be defined by the build"
#endif

namespace perfusion::testing {
namespace fs = std::filesystem;

namespace {

bool WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc);
  out << text;
  return static_cast<bool>(out);
}

// The last `lines` lines of text (all of it when shorter).
std::string Tail(const std::string& text, int lines) {
  size_t start = text.size();
  for (int i = 0; i <= lines; ++i) {
    if (start == 0) return text;
    const size_t nl = text.rfind('\n', start - 1);
    if (nl == std::string::npos) return text;
    start = nl;
  }
  return text.substr(start + 1);
}

}  // namespace

std::string TinyModelDir() {
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("PERFUSION_TINY_MODEL"); env && *env) {
    candidates.push_back(env);
  } else {
    candidates.push_back(std::string(PERFUSION_SOURCE_DIR) + "/models/tiny");
  }
  for (const std::string& c : candidates) {
    std::error_code ec;
    if (fs::exists(fs::path(c) / "unet" / "config.json", ec)) return fs::absolute(c).string();
  }
  return "";
}

std::string TokenizerDir() {
  const std::string d = std::string(PERFUSION_SHARED_DIR) + "/data/clip";
  std::error_code ec;
  return fs::exists(fs::path(d) / "vocab.json", ec) ? d : "";
}

int ParseLogInt(const std::string& log, const std::string& event, const std::string& key) {
  for (absl::string_view line : absl::StrSplit(log, '\n')) {
    if (line.find(absl::StrCat("event=", event, " ")) == absl::string_view::npos &&
        !absl::EndsWith(line, absl::StrCat("event=", event))) {
      continue;
    }
    const std::string k = absl::StrCat(" ", key, "=");
    const size_t p = line.find(k);
    if (p == absl::string_view::npos) continue;
    absl::string_view rest = line.substr(p + k.size());
    const size_t end = rest.find(' ');
    int v = 0;
    if (absl::SimpleAtoi(rest.substr(0, end), &v)) return v;
  }
  return 0;
}

double MetricValue(const std::string& page, const std::string& name, const std::string& labels) {
  for (absl::string_view line : absl::StrSplit(page, '\n')) {
    if (line.empty() || line[0] == '#' || !absl::StartsWith(line, name)) continue;
    absl::string_view rest = line.substr(name.size());
    if (rest.empty()) continue;
    if (rest[0] == '{') {
      const size_t close = rest.find('}');
      if (close == absl::string_view::npos) continue;
      if (!labels.empty() && rest.substr(1, close - 1) != labels) continue;
      rest = rest.substr(close + 1);
    } else if (rest[0] != ' ' || !labels.empty()) {
      continue;
    }
    double v = 0;
    if (absl::SimpleAtod(absl::StripAsciiWhitespace(rest), &v)) return v;
  }
  return -1;
}

Cluster::~Cluster() {
  for (auto& w : workers_) w->Kill();
  for (auto& r : replicas_) r->Kill();
  if (server_) server_->Kill();
}

bool Cluster::Init() {
  model_dir_ = TinyModelDir();
  if (model_dir_.empty()) {
    std::cerr << "cluster: no tiny model\n";
    return false;
  }
  scratch_ = std::make_unique<ScratchDir>("perfusion-it");
  if (scratch_->path().empty()) {
    std::cerr << "cluster: mkdtemp failed\n";
    return false;
  }
  dir_ = scratch_->path();
  if (!WriteText(dir_ + "/tokens.txt", absl::StrCat("# test tenants\n", kTokenA, " acme\n",
                                                    kTokenB, " beta\n")) ||
      !WriteText(dir_ + "/worker_tokens.txt", absl::StrCat(kWorkerToken, "\n"))) {
    std::cerr << "cluster: cannot write token files\n";
    return false;
  }
  // The base model id the server must serve: the model's perfusion/model_id, else ask the worker.
  std::string id = ReadFileOrEmpty(model_dir_ + "/perfusion/model_id");
  id = std::string(absl::StripAsciiWhitespace(id));
  if (id.empty()) {
    std::vector<std::string> argv = {PERFUSION_WORKER_BIN, "--print_base_model_id",
                                     "--model_dir=" + model_dir_};
    if (!TokenizerDir().empty()) argv.push_back("--tokenizer_dir=" + TokenizerDir());
    CommandResult r = RunCommand(argv, dir_, absl::Minutes(3));
    if (r.exit_code != 0) {
      std::cerr << "cluster: perfusion-worker --print_base_model_id failed: " << r.err << "\n";
      return false;
    }
    id = std::string(absl::StripAsciiWhitespace(r.out));
  }
  base_model_id_ = id;
  port_ = PickFreePort();
  return port_ > 0 && !base_model_id_.empty();
}

std::string Cluster::address() const { return absl::StrCat("127.0.0.1:", port_); }

bool Cluster::WaitFor(const std::function<bool()>& pred, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    if (pred()) return true;
    if (absl::Now() >= deadline) return false;
    absl::SleepFor(absl::Milliseconds(100));
  }
}

bool Cluster::WaitForLog(Subprocess& proc, const std::string& needle, absl::Duration timeout) {
  bool exited = false;
  const bool ok = WaitFor(
      [&] {
        if (proc.Log().find(needle) != std::string::npos) return true;
        exited = !proc.running();
        return exited;
      },
      timeout);
  return ok && !exited;
}

bool Cluster::StartServer(const ServerFlags& flags) {
  if (server_) server_->Kill();
  server_ = std::make_unique<Subprocess>();
  ++server_starts_;
  if (!LaunchServer(*server_, port_, flags, absl::StrCat(dir_, "/server-", server_starts_, ".log"))) {
    return false;
  }
  server_metrics_port_ = ParseLogInt(server_->Log(), "server_started", "metrics_port");
  return true;
}

bool Cluster::LaunchServer(Subprocess& proc, int port, const ServerFlags& flags,
                           const std::string& log) {
  std::vector<std::string> argv = {
      PERFUSION_SERVER_BIN,
      absl::StrCat("--listen=127.0.0.1:", port),
      "--metrics_listen=127.0.0.1:0",
      "--data_dir=" + dir_ + "/data",
      "--tokens_file=" + dir_ + "/tokens.txt",
      "--worker_tokens_file=" + dir_ + "/worker_tokens.txt",
      "--base_model_id=" + base_model_id_,
      absl::StrCat("--lease_seconds=", flags.lease_seconds),
      absl::StrCat("--max_attempts=", flags.max_attempts),
      "--max_lease_wait_seconds=2",
      "--default_image_side=32",
      "--default_train_steps=5",
      "--drain_seconds=2",
  };
  for (const std::string& e : flags.extra) argv.push_back(e);
  std::string error;
  if (!proc.Start(argv, log, {}, &error)) {
    std::cerr << "cluster: " << error << "\n";
    return false;
  }
  if (!WaitForLog(proc, "event=server_started", absl::Seconds(60))) {
    std::cerr << "cluster: the server did not start:\n" << Tail(proc.Log(), 30) << "\n";
    return false;
  }
  return true;
}

int Cluster::StartReplica(const ServerFlags& flags) {
  const int port = PickFreePort();
  if (port <= 0) return -1;
  auto proc = std::make_unique<Subprocess>();
  const int i = static_cast<int>(replicas_.size());
  if (!LaunchServer(*proc, port, flags, absl::StrCat(dir_, "/replica-", i, ".log"))) return -1;
  replicas_.push_back(std::move(proc));
  replica_ports_.push_back(port);
  return i;
}

std::string Cluster::replica_address(int i) const {
  return absl::StrCat("127.0.0.1:", replica_ports_[i]);
}

int Cluster::StopServer(absl::Duration timeout) {
  if (!server_) return -1;
  server_->Signal(SIGTERM);
  std::optional<int> code = server_->Wait(timeout);
  if (!code) {
    server_->Kill();
    return -1;
  }
  return *code;
}

int Cluster::StartWorker(const std::string& name, const std::vector<std::string>& extra) {
  auto w = std::make_unique<Subprocess>();
  std::vector<std::string> argv = {
      PERFUSION_WORKER_BIN,
      "--server=" + address(),
      "--worker_token_file=" + dir_ + "/worker_tokens.txt",
      "--model_dir=" + model_dir_,
      "--metrics_listen=127.0.0.1:0",
      "--name=" + name,
      "--threads=1",
      "--lease_wait_seconds=2",
      "--progress_interval_ms=200",
  };
  if (!TokenizerDir().empty()) argv.push_back("--tokenizer_dir=" + TokenizerDir());
  for (const std::string& e : extra) argv.push_back(e);
  const std::string log = absl::StrCat(dir_, "/worker-", name, ".log");
  std::string error;
  if (!w->Start(argv, log, {}, &error)) {
    std::cerr << "cluster: " << error << "\n";
    return -1;
  }
  if (!WaitForLog(*w, "event=registered", absl::Minutes(3))) {
    std::cerr << "cluster: worker " << name << " did not register:\n"
              << Tail(w->Log(), 30) << "\n";
    return -1;
  }
  worker_metrics_ports_.push_back(ParseLogInt(w->Log(), "metrics_listening", "metrics_port"));
  workers_.push_back(std::move(w));
  return static_cast<int>(workers_.size()) - 1;
}

CommandResult Cluster::Ctl(const std::vector<std::string>& args, const std::string& token,
                           absl::Duration timeout) {
  std::vector<std::string> argv = {PERFUSIONCTL_BIN, "--server=" + address(), "--token=" + token};
  argv.insert(argv.end(), args.begin(), args.end());
  return RunCommand(argv, dir_, timeout);
}

std::unique_ptr<client::Client> Cluster::Client(const std::string& token,
                                                const std::string& server_address) {
  client::ClientOptions o;
  o.server = server_address.empty() ? address() : server_address;
  o.token = token;
  o.timeout = absl::Seconds(10);
  auto c = client::Client::Connect(o);
  return c.ok() ? *std::move(c) : nullptr;
}

std::string Cluster::RenderConcept(const std::string& concept_name, int n) {
  const std::string out = dir_ + "/" + concept_name;
  CommandResult r = RunCommand({PERFUSION_RENDER_SHAPES_BIN, "--out", out, "--n",
                                std::to_string(n), "--concept", concept_name},
                               dir_, absl::Minutes(2));
  if (r.exit_code != 0) {
    std::cerr << "cluster: perfusion-render-shapes failed: " << r.err << "\n";
    return "";
  }
  // Only the images: the renderer also writes captions.tsv, which `train` ignores anyway.
  return out;
}

void Cluster::DumpLogs() const {
  for (size_t i = 0; i < replicas_.size(); ++i) {
    std::cerr << "---- replica " << i << " log (tail) ----\n" << Tail(replicas_[i]->Log(), 40) << "\n";
  }
  if (server_) {
    std::cerr << "---- server log (tail) ----\n" << Tail(server_->Log(), 60) << "\n";
  }
  for (size_t i = 0; i < workers_.size(); ++i) {
    std::cerr << "---- worker " << i << " log (tail) ----\n"
              << Tail(workers_[i]->Log(), 60) << "\n";
  }
}

void ExpectUsageErrors(const std::string& binary, const std::vector<UsageErrorCase>& cases,
                       const std::string& scratch_dir) {
  for (const auto& c : cases) {
    std::vector<std::string> argv = {binary};
    argv.insert(argv.end(), c.args.begin(), c.args.end());
    const CommandResult r = RunCommand(argv, scratch_dir, absl::Seconds(60));
    const std::string what = c.args.empty() ? binary : c.args[0];
    EXPECT_EQ(r.exit_code, 2) << what << ": " << r.err;
    EXPECT_NE(r.err.find(c.message), std::string::npos) << what << ": " << r.err;
  }
}

}  // namespace perfusion::testing

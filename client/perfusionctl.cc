// perfusionctl: the command-line client of perfusion-serve. docs/cli.md has every command, flag
// and exit code; `perfusionctl help` prints the summary.
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <google/protobuf/util/json_util.h>
#include <nlohmann/json.hpp>

#include "absl/random/random.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/cli_args.h"
#include "client/client.h"
#include "client/region_spec.h"

namespace {

namespace fs = std::filesystem;
using perfusion::client::Client;
using perfusion::client::ClientOptions;
using perfusion::client::ExitCodeFor;
using perfusion::client::FlagSpec;
using perfusion::client::ParsedArgs;
namespace v1 = perfusion::v1;
using perfusion::ParseRegionText;
using perfusion::RegionText;
namespace pc = perfusion::client;

constexpr char kUsage[] = R"(perfusionctl: command-line client of perfusion-serve.

Usage: perfusionctl [global flags] COMMAND [args] [flags]

Commands:
  train DIR --superclass WORD --name NAME [--steps N] [--seed S] [--priority P]
        [--label K=V]... [--request-id ID] [--lr X] [--embedding-lr X] [--batch-size N]
        [--resolution PX] [--captions] [--wait | --no-wait] [--timeout DUR]
      Uploads every PNG/JPEG file in DIR as a training job, then follows it with a progress
      bar until it is final (--wait, the default); --no-wait prints the job id and returns.
      --captions sends each image's caption from the .txt file of the same name beside it
      (rex1.png: rex1.txt), naming the concept as <NAME>: "a photo of <rex> on a beach".
  jobs list [--state STATE] [--limit N]
  jobs get ID
  jobs cancel ID
  jobs watch ID [--timeout DUR]
  concepts list [--name NAME] [--limit N]
  concepts get REF                    REF: NAME (newest version), NAME@N, or an id cpt_...
  concepts rm REF
  concepts export REF -o FILE         (-o - writes the blob to stdout)
  concepts import FILE [--name NAME] [--label K=V]...
  generate PROMPT [-o DIR] [--seed S] [--steps N] [--guidance G] [--guidance-rescale PHI]
        [--n N] [--width W] [--height H] [--negative TEXT] [--sampler ddim|euler] [--beta B] [--tau T]
        [--strength REF=BETA[:TAU]]... [--global-lock] [--region BOX:PROMPT]... [--prefix P]
        [--timeout DUR]
      Writes DIR/<prefix>-<seed>.png per image (DIR is created; default ".").
      --region: inside BOX the image follows PROMPT instead (one more UNet pass per region);
      BOX is x0,y0,x1,y1 in fractions of the image or left, right, top, bottom, top_left,
      top_right, bottom_left, bottom_right. Places concepts side by side:
        generate "a <rex> and a <bike>" --region "left:a <rex>" --region "right:a <bike>"
  health [--service NAME]
  help

Global flags:
  --server HOST:PORT   server address (env PERFUSION_SERVER; default localhost:50051)
  --token TOKEN        tenant token (env PERFUSION_TOKEN); --token-file FILE reads it from a file
  --tls                use TLS; --tls-ca FILE (PEM roots), --tls-server-name NAME
  --rpc-timeout DUR    deadline of each unary call (default 30s)
  --output text|json   output format on stdout (default text)
  --quiet, -q          no progress on stderr

Exit codes: 0 ok, 1 other error, 2 usage, 3 not found, 4 invalid argument,
5 unavailable, 6 unauthenticated or permission denied. Messages go to stderr.
)";

const std::vector<FlagSpec>& AllFlags() {
  static const std::vector<FlagSpec> flags = {
      // global
      {"server", true}, {"token", true}, {"token-file", true}, {"tls", false},
      {"tls-ca", true}, {"tls-server-name", true}, {"rpc-timeout", true}, {"output", true},
      {"quiet", false, "q"}, {"help", false, "h"},
      // train
      {"superclass", true}, {"name", true}, {"steps", true}, {"seed", true}, {"priority", true},
      {"label", true}, {"request-id", true}, {"lr", true}, {"embedding-lr", true},
      {"batch-size", true}, {"resolution", true}, {"wait", false}, {"no-wait", false},
      {"timeout", true}, {"captions", false},
      // jobs / concepts
      {"state", true}, {"limit", true}, {"out", true, "o"},
      // generate
      {"guidance", true}, {"guidance-rescale", true}, {"n", true}, {"width", true}, {"height", true}, {"negative", true},
      {"sampler", true}, {"beta", true}, {"tau", true}, {"strength", true},
      {"global-lock", false}, {"prefix", true}, {"region", true},
      // health
      {"service", true},
  };
  return flags;
}

const std::set<std::string> kGlobalFlags = {"server",      "token",  "token-file", "tls",
                                            "tls-ca",      "tls-server-name", "rpc-timeout",
                                            "output",      "quiet",  "help"};

// Flags each command accepts besides the global ones.
const std::map<std::string, std::set<std::string>>& CommandFlags() {
  static const std::map<std::string, std::set<std::string>> m = {
      {"train",
       {"superclass", "name", "steps", "seed", "priority", "label", "request-id", "lr",
        "embedding-lr", "batch-size", "resolution", "wait", "no-wait", "timeout", "captions"}},
      {"jobs list", {"state", "limit"}},
      {"jobs get", {}},
      {"jobs cancel", {}},
      {"jobs watch", {"timeout"}},
      {"concepts list", {"name", "limit"}},
      {"concepts get", {}},
      {"concepts rm", {}},
      {"concepts export", {"out"}},
      {"concepts import", {"name", "label"}},
      {"generate",
       {"out", "seed", "steps", "guidance", "guidance-rescale", "n", "width", "height", "negative", "sampler", "beta",
        "tau", "strength", "global-lock", "prefix", "timeout", "region"}},
      {"health", {"service"}},
      {"help", {}},
  };
  return m;
}

int UsageError(const std::string& message) {
  std::cerr << "perfusionctl: " << message << "\nRun `perfusionctl help` for usage.\n";
  return pc::kExitUsage;
}

int Fail(const absl::Status& s, const std::string& what = "") {
  std::cerr << "perfusionctl: " << (what.empty() ? "" : what + ": ")
            << absl::StatusCodeToString(s.code()) << ": " << s.message() << "\n";
  return ExitCodeFor(s.code());
}

std::string ProtoJson(const google::protobuf::Message& m) {
  google::protobuf::util::JsonPrintOptions o;
  o.preserve_proto_field_names = true;
  o.always_print_primitive_fields = true;
  o.add_whitespace = true;
  std::string out;
  if (!google::protobuf::util::MessageToJsonString(m, &out, o).ok()) out = "{}";
  while (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

std::string FormatSeconds(double s) {
  if (!(s >= 0) || std::isinf(s)) return "?";
  const int64_t t = static_cast<int64_t>(std::llround(s));
  if (t < 60) return absl::StrCat(t, "s");
  if (t < 3600) return absl::StrFormat("%dm%02ds", t / 60, t % 60);
  return absl::StrFormat("%dh%02dm", t / 3600, (t % 3600) / 60);
}

double Seconds(const google::protobuf::Duration& d) {
  return static_cast<double>(d.seconds()) + d.nanos() * 1e-9;
}

std::string FormatTime(const google::protobuf::Timestamp& t) {
  if (t.seconds() == 0 && t.nanos() == 0) return "-";
  return absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", absl::FromUnixSeconds(t.seconds()),
                          absl::UTCTimeZone());
}

std::string FormatBytes(int64_t b) {
  if (b < 1024) return absl::StrCat(b, " B");
  if (b < (1 << 20)) return absl::StrFormat("%.1f KiB", b / 1024.0);
  return absl::StrFormat("%.1f MiB", b / 1048576.0);
}

std::string CodeName(int code) {
  if (code == 0) return "OK";
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
}

// Parses repeated K=V flags into a map. INVALID_ARGUMENT for a value without '='.
absl::Status ParseLabels(const std::vector<std::string>& values,
                         google::protobuf::Map<std::string, std::string>* out) {
  for (const std::string& kv : values) {
    const size_t eq = kv.find('=');
    if (eq == std::string::npos || eq == 0) {
      return absl::InvalidArgumentError(absl::StrCat("--label: \"", kv, "\" is not KEY=VALUE"));
    }
    (*out)[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat(path, ": cannot read"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Writes `data` to `path` through a temporary file renamed into place: a full disk or a kill
// leaves the old file (an earlier export) whole rather than truncated.
absl::Status WriteFile(const std::string& path, const std::string& data) {
  const std::string tmp = absl::StrCat(path, ".tmp.", getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(data.data(), static_cast<std::streamsize>(data.size()));
    out.close();
    if (!out) {
      std::remove(tmp.c_str());
      return absl::UnknownError(absl::StrCat(path, ": cannot write"));
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    std::remove(tmp.c_str());
    return absl::UnknownError(absl::StrCat(path, ": cannot write: ", why));
  }
  return absl::OkStatus();
}

// Progress on stderr: a redrawn bar on a terminal, a line per change (and per 10% of steps)
// otherwise.
class ProgressPrinter {
 public:
  explicit ProgressPrinter(bool quiet) : quiet_(quiet), tty_(isatty(STDERR_FILENO) == 1) {}
  ~ProgressPrinter() { Done(); }

  void Training(const v1::TrainingJobEvent& ev) {
    if (quiet_) return;
    std::string line;
    const std::string state = pc::JobStateName(ev.state());
    if (ev.state() == v1::QUEUED) {
      line = absl::StrCat(ev.job_id(), " QUEUED");
      if (ev.queue_position() > 0) absl::StrAppend(&line, " position ", ev.queue_position());
      if (ev.has_eta()) absl::StrAppend(&line, " eta ", FormatSeconds(Seconds(ev.eta())));
    } else if (ev.state() == v1::RUNNING || ev.state() == v1::CANCELLING ||
               ev.state() == v1::SUCCEEDED) {
      const int total = ev.total_steps();
      const int step = ev.state() == v1::SUCCEEDED && total > 0 ? total : ev.step();
      line = absl::StrCat(ev.job_id(), " ", Bar(step, total), " ", step, "/", total);
      if (ev.loss() != 0) absl::StrAppend(&line, absl::StrFormat(" loss %.4f", ev.loss()));
      if (ev.has_eta() && ev.state() != v1::SUCCEEDED) {
        absl::StrAppend(&line, " eta ", FormatSeconds(Seconds(ev.eta())));
      }
      absl::StrAppend(&line, " ", state);
      if (ev.attempts() > 1) absl::StrAppend(&line, " attempt ", ev.attempts());
    } else {
      line = absl::StrCat(ev.job_id(), " ", state);
      if (ev.error_code() != 0) {
        absl::StrAppend(&line, " ", CodeName(ev.error_code()), ": ", ev.error_message());
      }
    }
    const int decile =
        ev.total_steps() > 0 ? static_cast<int>(10.0 * ev.step() / ev.total_steps()) : -1;
    Show(line, absl::StrCat(state, "/", decile));
  }

  void Generation(const v1::GenerateProgress& p) {
    if (quiet_) return;
    if (p.total_steps() == 0) {
      Show(p.queue_position() > 0 ? absl::StrCat("queued, position ", p.queue_position())
                                  : std::string("running"),
           absl::StrCat("q", p.queue_position()));
      return;
    }
    const int decile = static_cast<int>(10.0 * p.step() / p.total_steps());
    Show(absl::StrCat(Bar(p.step(), p.total_steps()), " ", p.step(), "/", p.total_steps(),
                      " denoising steps"),
         absl::StrCat("s", decile));
  }

  void Note(const std::string& text) {
    if (quiet_) return;
    Done();
    std::cerr << text << "\n";
  }

  void Done() {
    if (open_line_) std::cerr << "\n";
    open_line_ = false;
  }

 private:
  static std::string Bar(int step, int total) {
    constexpr int kWidth = 24;
    const int filled = total > 0 ? std::clamp(step * kWidth / total, 0, kWidth) : 0;
    return absl::StrCat("[", std::string(filled, '#'), std::string(kWidth - filled, '-'), "]");
  }
  void Show(const std::string& line, const std::string& key) {
    if (tty_) {
      std::cerr << "\r\033[K" << line << std::flush;
      open_line_ = true;
    } else if (key != last_key_) {
      std::cerr << line << "\n";
    }
    last_key_ = key;
  }
  const bool quiet_;
  const bool tty_;
  bool open_line_ = false;
  std::string last_key_;
};

void PrintJobText(const v1::TrainingJob& j) {
  std::cout << "id:          " << j.id() << "\n"
            << "state:       " << pc::JobStateName(j.state()) << "\n"
            << "concept:     " << j.concept_name() << " (superclass " << j.superclass() << ")\n"
            << "images:      " << j.image_count() << "\n"
            << "steps:       " << j.progress().step() << "/"
            << (j.progress().total_steps() > 0 ? j.progress().total_steps() : j.options().steps())
            << "\n";
  if (j.progress().loss() != 0) std::cout << "loss:        " << j.progress().loss() << "\n";
  if (j.progress().has_eta()) {
    std::cout << "eta:         " << FormatSeconds(Seconds(j.progress().eta())) << "\n";
  }
  if (j.queue_position() > 0) std::cout << "queue:       " << j.queue_position() << "\n";
  std::cout << "priority:    " << j.priority() << "\n"
            << "attempts:    " << j.attempts() << "\n";
  if (j.options().has_seed()) std::cout << "seed:        " << j.options().seed() << "\n";
  if (!j.concept_id().empty()) std::cout << "concept_id:  " << j.concept_id() << "\n";
  if (j.error_code() != 0) {
    std::cout << "error:       " << CodeName(j.error_code()) << ": " << j.error_message() << "\n";
  }
  for (const auto& [k, v] : j.labels()) std::cout << "label:       " << k << "=" << v << "\n";
  std::cout << "created:     " << FormatTime(j.create_time()) << "\n";
  if (j.has_start_time()) std::cout << "started:     " << FormatTime(j.start_time()) << "\n";
  if (j.has_end_time()) std::cout << "ended:       " << FormatTime(j.end_time()) << "\n";
}

void PrintConceptText(const v1::Concept& c) {
  std::cout << "id:          " << c.id() << "\n"
            << "name:        " << c.name() << "@" << c.version() << "\n"
            << "superclass:  " << c.superclass() << "\n"
            << "base_model:  " << c.base_model_id() << "\n"
            << "digest:      " << c.digest() << "\n"
            << "size:        " << FormatBytes(c.size_bytes()) << "\n"
            << "format:      v" << c.format_version() << " " << c.dtype() << "\n";
  if (!c.source_job_id().empty()) std::cout << "source_job:  " << c.source_job_id() << "\n";
  for (const auto& [k, v] : c.labels()) std::cout << "label:       " << k << "=" << v << "\n";
  std::cout << "created:     " << FormatTime(c.create_time()) << "\n";
}

// The exit code of a job that ended: 0 when it succeeded, else from its error code (1 when the
// code has no exit code of its own, and for CANCELLED).
int JobExitCode(const v1::TrainingJob& j) {
  if (j.state() == v1::SUCCEEDED) return pc::kExitOk;
  const int code = ExitCodeFor(static_cast<absl::StatusCode>(j.error_code()));
  return code == pc::kExitOk ? pc::kExitOther : code;
}

class Cli {
 public:
  Cli(ParsedArgs args, std::string command) : args_(std::move(args)), command_(std::move(command)) {
    json_ = args_.Get("output", "text") == "json";
    quiet_ = args_.Has("quiet");
  }

  absl::Status Connect() {
    ClientOptions o;
    const char* env_server = std::getenv("PERFUSION_SERVER");
    o.server = args_.Get("server", env_server && *env_server ? env_server : "localhost:50051");
    absl::StatusOr<std::string> token = pc::TenantTokenFromArgs(args_);
    if (!token.ok()) return token.status();
    o.token = *std::move(token);
    o.tls = args_.Has("tls") || args_.Has("tls-ca");
    o.tls_ca_file = args_.Get("tls-ca");
    o.tls_server_name = args_.Get("tls-server-name");
    auto timeout = args_.GetDuration("rpc-timeout", absl::Seconds(30));
    if (!timeout.ok()) return timeout.status();
    o.timeout = *timeout;
    auto c = Client::Connect(o);
    if (!c.ok()) return c.status();
    client_ = *std::move(c);
    return absl::OkStatus();
  }

  int Run() {
    const std::vector<std::string>& p = args_.positionals();
    if (command_ == "train") return Train(p);
    if (command_ == "jobs list") return JobsList();
    if (command_ == "jobs get") return JobsGet(p);
    if (command_ == "jobs cancel") return JobsCancel(p);
    if (command_ == "jobs watch") return JobsWatch(p);
    if (command_ == "concepts list") return ConceptsList();
    if (command_ == "concepts get") return ConceptsGet(p);
    if (command_ == "concepts rm") return ConceptsRm(p);
    if (command_ == "concepts export") return ConceptsExport(p);
    if (command_ == "concepts import") return ConceptsImport(p);
    if (command_ == "generate") return Generate(p);
    if (command_ == "health") return Health();
    return UsageError(absl::StrCat("unknown command \"", command_, "\""));
  }

 private:
  // The one positional argument after the command words, or a usage error.
  bool OneArg(const std::vector<std::string>& p, size_t words, const char* what, std::string* out) {
    if (p.size() != words + 1) {
      usage_ = absl::StrCat(command_, ": expected ", what,
                            p.size() <= words ? "" : " (and nothing else)");
      return false;
    }
    *out = p[words];
    return true;
  }

  int Train(const std::vector<std::string>& p) {
    std::string dir;
    if (!OneArg(p, 1, "the image folder DIR", &dir)) return UsageError(usage_);
    if (!args_.Has("superclass") || !args_.Has("name")) {
      return UsageError("train: --superclass and --name are required");
    }
    if (args_.Has("wait") && args_.Has("no-wait")) {
      return UsageError("train: --wait and --no-wait exclude each other");
    }
    // Flags first: a malformed value is a usage error before any image is read.
    auto steps = args_.GetInt32("steps", 0);
    auto seed = args_.GetUint64("seed", 0);
    auto priority = args_.GetInt32("priority", 0);
    auto batch = args_.GetInt32("batch-size", 0);
    auto resolution = args_.GetInt32("resolution", 0);
    auto lr = args_.GetFloat("lr", 0);
    auto elr = args_.GetFloat("embedding-lr", 0);
    auto timeout = args_.GetDuration("timeout", absl::ZeroDuration());
    for (const absl::Status& s : {steps.status(), seed.status(), priority.status(), batch.status(),
                                  resolution.status(), lr.status(), elr.status(),
                                  timeout.status()}) {
      if (!s.ok()) return UsageError(std::string(s.message()));
    }
    std::error_code ec;
    if (!fs::is_directory(dir, ec)) {
      return Fail(absl::InvalidArgumentError(absl::StrCat(dir, ": not a folder")));
    }
    std::vector<fs::path> files;
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      if (!e.is_regular_file()) continue;
      const std::string ext = absl::AsciiStrToLower(e.path().extension().string());
      if (ext == ".png" || ext == ".jpg" || ext == ".jpeg") files.push_back(e.path());
    }
    std::sort(files.begin(), files.end());
    if (files.empty()) {
      return Fail(absl::InvalidArgumentError(absl::StrCat(dir, ": no .png, .jpg or .jpeg files")));
    }
    v1::CreateTrainingJobRequest req;
    req.set_concept_name(args_.Get("name"));
    req.set_superclass(args_.Get("superclass"));
    for (const fs::path& f : files) {
      auto data = ReadFile(f.string());
      if (!data.ok()) return Fail(data.status());
      req.add_images(*std::move(data));
      if (args_.Has("captions")) {
        fs::path txt = f;
        txt.replace_extension(".txt");
        auto caption = ReadFile(txt.string());
        if (!caption.ok()) {
          return Fail(absl::InvalidArgumentError(
              absl::StrCat("--captions: no caption file ", txt.string(), " for ", f.string())));
        }
        req.mutable_options()->add_captions(std::string(absl::StripTrailingAsciiWhitespace(*caption)));
      }
    }
    auto* o = req.mutable_options();
    if (args_.Has("steps")) o->set_steps(*steps);
    if (args_.Has("seed")) o->set_seed(*seed);
    o->set_batch_size(*batch);
    o->set_resolution(*resolution);
    o->set_learning_rate(*lr);
    o->set_embedding_learning_rate(*elr);
    req.set_priority(*priority);
    if (absl::Status s = ParseLabels(args_.GetAll("label"), req.mutable_labels()); !s.ok()) {
      return UsageError(std::string(s.message()));
    }
    // A request id makes the submission idempotent, so an UNAVAILABLE answer can be retried.
    std::string request_id = args_.Get("request-id");
    if (request_id.empty()) {
      absl::BitGen gen;
      request_id = absl::StrFormat("ctl-%016x", absl::Uniform<uint64_t>(gen));
    }
    req.set_request_id(request_id);

    ProgressPrinter progress(quiet_);
    absl::StatusOr<v1::TrainingJob> job;
    for (int attempt = 0;; ++attempt) {
      job = client_->SubmitTrainingJob(req);
      if (job.ok() || job.status().code() != absl::StatusCode::kUnavailable || attempt >= 4) break;
      progress.Note(absl::StrCat("server unavailable (", job.status().message(), "), retrying"));
      absl::SleepFor(absl::Seconds(1 << attempt));
    }
    if (!job.ok()) return Fail(job.status(), "submit");
    if (args_.Has("no-wait") || args_.SetFalse("wait")) {  // --wait=false means --no-wait
      if (json_) {
        std::cout << ProtoJson(*job) << "\n";
      } else {
        std::cout << job->id() << "\n";
      }
      return pc::kExitOk;
    }
    progress.Note(absl::StrCat("submitted ", job->id(), " (", files.size(), " images, ",
                               job->options().steps(), " steps)"));
    return WaitAndPrint(job->id(), *timeout, &progress);
  }

  // Follows the job until it is final (re-watching through server restarts), then prints it.
  int WaitAndPrint(const std::string& id, absl::Duration timeout, ProgressPrinter* progress) {
    const absl::Time deadline =
        timeout > absl::ZeroDuration() ? absl::Now() + timeout : absl::InfiniteFuture();
    absl::Duration backoff = absl::Milliseconds(500);
    bool final_seen = false;
    bool rewatch = false;  // after an interruption: wait for the server to come back
    while (!final_seen) {
      const absl::Duration left = deadline - absl::Now();
      if (left <= absl::ZeroDuration()) {
        progress->Done();
        return Fail(absl::DeadlineExceededError(
            absl::StrCat("job ", id, " not final after ", absl::FormatDuration(timeout))));
      }
      // A re-watch waits for the server at most a minute per attempt, then tries again.
      const absl::Duration attempt_timeout =
          rewatch ? std::min(left, absl::Minutes(1))
                  : (deadline == absl::InfiniteFuture() ? absl::ZeroDuration() : left);
      absl::Status s = client_->WatchTrainingJob(
          id,
          [&](const v1::TrainingJobEvent& ev) {
            progress->Training(ev);
            backoff = absl::Milliseconds(500);
            if (pc::IsFinal(ev.state())) final_seen = true;
            return true;
          },
          attempt_timeout, /*wait_for_ready=*/rewatch);
      if (final_seen) break;
      if (s.ok()) continue;  // ended without a final event: watch again
      if (s.code() == absl::StatusCode::kDeadlineExceeded && rewatch &&
          absl::Now() < deadline) {
        continue;  // the attempt's own limit, not the caller's
      }
      if (s.code() == absl::StatusCode::kUnavailable) {
        rewatch = true;
        progress->Note(absl::StrCat("watch interrupted (", s.message(), "), retrying in ",
                                    absl::FormatDuration(backoff)));
        absl::SleepFor(std::min(backoff, std::max(deadline - absl::Now(), absl::ZeroDuration())));
        backoff = std::min(backoff * 2, absl::Seconds(10));
        continue;
      }
      progress->Done();
      if (s.code() == absl::StatusCode::kDeadlineExceeded) {
        return Fail(absl::DeadlineExceededError(
            absl::StrCat("job ", id, " not final after ", absl::FormatDuration(timeout))));
      }
      return Fail(s, "watch");
    }
    progress->Done();
    absl::StatusOr<v1::TrainingJob> job;
    for (int attempt = 0;; ++attempt) {
      job = client_->GetTrainingJob(id);
      if (job.ok() || job.status().code() != absl::StatusCode::kUnavailable || attempt >= 5) break;
      absl::SleepFor(absl::Seconds(1));
    }
    if (!job.ok()) return Fail(job.status(), "get");
    if (json_) {
      std::cout << ProtoJson(*job) << "\n";
    } else if (job->state() == v1::SUCCEEDED) {
      std::cout << job->id() << " SUCCEEDED concept " << job->concept_id() << " ("
                << job->concept_name() << ")\n";
    } else {
      std::cout << job->id() << " " << pc::JobStateName(job->state()) << " "
                << CodeName(job->error_code()) << ": " << job->error_message() << "\n";
    }
    const int code = JobExitCode(*job);
    if (code != pc::kExitOk) {
      std::cerr << "perfusionctl: job " << job->id() << " " << pc::JobStateName(job->state())
                << ": " << CodeName(job->error_code()) << ": " << job->error_message() << "\n";
    }
    return code;
  }

  int JobsList() {
    if (args_.positionals().size() != 2) return UsageError("jobs list takes no arguments");
    v1::JobState state = v1::JOB_STATE_UNSPECIFIED;
    if (args_.Has("state")) {
      auto s = pc::ParseJobState(args_.Get("state"));
      if (!s.ok()) return UsageError(std::string(s.status().message()));
      state = *s;
    }
    auto limit = args_.GetInt32("limit", 0);
    if (!limit.ok()) return UsageError(std::string(limit.status().message()));
    auto jobs = client_->ListAllTrainingJobs(state, static_cast<int>(*limit));
    if (!jobs.ok()) return Fail(jobs.status());
    if (json_) {
      v1::ListTrainingJobsResponse r;
      for (auto& j : *jobs) *r.add_jobs() = j;
      std::cout << ProtoJson(r) << "\n";
      return pc::kExitOk;
    }
    std::cout << absl::StrFormat("%-22s %-10s %-20s %-11s %-8s %s\n", "ID", "STATE", "CONCEPT",
                                 "STEPS", "ATTEMPTS", "CREATED");
    for (const auto& j : *jobs) {
      const int total = j.progress().total_steps() > 0 ? j.progress().total_steps()
                                                       : j.options().steps();
      std::cout << absl::StrFormat("%-22s %-10s %-20s %-11s %-8d %s\n", j.id(),
                                   pc::JobStateName(j.state()), j.concept_name(),
                                   absl::StrCat(j.progress().step(), "/", total), j.attempts(),
                                   FormatTime(j.create_time()));
    }
    return pc::kExitOk;
  }

  int JobsGet(const std::vector<std::string>& p) {
    std::string id;
    if (!OneArg(p, 2, "a job ID", &id)) return UsageError(usage_);
    auto job = client_->GetTrainingJob(id);
    if (!job.ok()) return Fail(job.status());
    if (json_) {
      std::cout << ProtoJson(*job) << "\n";
    } else {
      PrintJobText(*job);
    }
    return pc::kExitOk;
  }

  int JobsCancel(const std::vector<std::string>& p) {
    std::string id;
    if (!OneArg(p, 2, "a job ID", &id)) return UsageError(usage_);
    auto job = client_->CancelTrainingJob(id);
    if (!job.ok()) return Fail(job.status());
    if (json_) {
      std::cout << ProtoJson(*job) << "\n";
    } else {
      std::cout << job->id() << " " << pc::JobStateName(job->state()) << "\n";
    }
    return pc::kExitOk;
  }

  int JobsWatch(const std::vector<std::string>& p) {
    std::string id;
    if (!OneArg(p, 2, "a job ID", &id)) return UsageError(usage_);
    auto timeout = args_.GetDuration("timeout", absl::ZeroDuration());
    if (!timeout.ok()) return UsageError(std::string(timeout.status().message()));
    ProgressPrinter progress(quiet_);
    return WaitAndPrint(id, *timeout, &progress);
  }

  int ConceptsList() {
    if (args_.positionals().size() != 2) return UsageError("concepts list takes no arguments");
    auto limit = args_.GetInt32("limit", 0);
    if (!limit.ok()) return UsageError(std::string(limit.status().message()));
    auto list = client_->ListConcepts(args_.Get("name"), static_cast<int>(*limit));
    if (!list.ok()) return Fail(list.status());
    if (json_) {
      v1::ListConceptsResponse r;
      for (auto& c : *list) *r.add_concepts() = c;
      std::cout << ProtoJson(r) << "\n";
      return pc::kExitOk;
    }
    std::cout << absl::StrFormat("%-22s %-24s %-12s %-10s %-14s %s\n", "ID", "NAME", "SUPERCLASS",
                                 "SIZE", "DIGEST", "CREATED");
    for (const auto& c : *list) {
      std::cout << absl::StrFormat("%-22s %-24s %-12s %-10s %-14s %s\n", c.id(),
                                   absl::StrCat(c.name(), "@", c.version()), c.superclass(),
                                   FormatBytes(c.size_bytes()), c.digest().substr(0, 12),
                                   FormatTime(c.create_time()));
    }
    return pc::kExitOk;
  }

  absl::StatusOr<v1::Concept> Resolve(const std::string& text) {
    auto ref = pc::ParseConceptRef(text);
    if (!ref.ok()) return ref.status();
    return client_->GetConcept(*ref);
  }

  int ConceptsGet(const std::vector<std::string>& p) {
    std::string ref;
    if (!OneArg(p, 2, "a concept NAME, NAME@N or id", &ref)) return UsageError(usage_);
    auto c = Resolve(ref);
    if (!c.ok()) return Fail(c.status());
    if (json_) {
      std::cout << ProtoJson(*c) << "\n";
    } else {
      PrintConceptText(*c);
    }
    return pc::kExitOk;
  }

  int ConceptsRm(const std::vector<std::string>& p) {
    std::string ref;
    if (!OneArg(p, 2, "a concept NAME, NAME@N or id", &ref)) return UsageError(usage_);
    auto c = Resolve(ref);
    if (!c.ok()) return Fail(c.status());
    if (absl::Status s = client_->DeleteConcept(c->id()); !s.ok()) return Fail(s);
    if (json_) {
      std::cout << ProtoJson(*c) << "\n";
    } else {
      std::cout << "deleted " << c->id() << " (" << c->name() << "@" << c->version() << ")\n";
    }
    return pc::kExitOk;
  }

  int ConceptsExport(const std::vector<std::string>& p) {
    std::string ref;
    if (!OneArg(p, 2, "a concept NAME, NAME@N or id", &ref)) return UsageError(usage_);
    if (!args_.Has("out")) return UsageError("concepts export: -o FILE is required");
    auto c = Resolve(ref);
    if (!c.ok()) return Fail(c.status());
    auto e = client_->ExportConcept(c->id());
    if (!e.ok()) return Fail(e.status());
    const std::string out = args_.Get("out");
    if (out == "-") {
      std::cout.write(e->blob().data(), static_cast<std::streamsize>(e->blob().size()));
      std::cout.flush();
      return pc::kExitOk;
    }
    if (absl::Status s = WriteFile(out, e->blob()); !s.ok()) return Fail(s);
    if (json_) {
      std::cout << ProtoJson(e->concept()) << "\n";
    } else {
      std::cout << "exported " << e->concept().id() << " (" << e->concept().name() << "@"
                << e->concept().version() << ", " << FormatBytes(e->blob().size()) << ") to "
                << out << "\n";
    }
    return pc::kExitOk;
  }

  int ConceptsImport(const std::vector<std::string>& p) {
    std::string file;
    if (!OneArg(p, 2, "a blob FILE", &file)) return UsageError(usage_);
    auto blob = file == "-" ? ReadStdin() : ReadFile(file);
    if (!blob.ok()) return Fail(blob.status());
    v1::ImportConceptRequest req;
    req.set_blob(*std::move(blob));
    req.set_name(args_.Get("name"));
    if (absl::Status s = ParseLabels(args_.GetAll("label"), req.mutable_labels()); !s.ok()) {
      return UsageError(std::string(s.message()));
    }
    auto c = client_->ImportConcept(req);
    if (!c.ok()) return Fail(c.status());
    if (json_) {
      std::cout << ProtoJson(*c) << "\n";
    } else {
      std::cout << "imported " << c->id() << " (" << c->name() << "@" << c->version() << ")\n";
    }
    return pc::kExitOk;
  }

  static absl::StatusOr<std::string> ReadStdin() {
    std::stringstream ss;
    ss << std::cin.rdbuf();
    return ss.str();
  }

  int Generate(const std::vector<std::string>& p) {
    std::string prompt;
    if (!OneArg(p, 1, "a PROMPT (quote it)", &prompt)) return UsageError(usage_);
    v1::GenerateRequest req;
    req.set_prompt(prompt);
    req.set_negative_prompt(args_.Get("negative"));
    req.set_sampler(args_.Get("sampler"));
    auto seed = args_.GetUint64("seed", 0);
    auto steps = args_.GetInt32("steps", 0);
    auto n = args_.GetInt32("n", 0);
    auto width = args_.GetInt32("width", 0);
    auto height = args_.GetInt32("height", 0);
    auto guidance = args_.GetFloat("guidance", 0);
    auto rescale = args_.GetFloat("guidance-rescale", 0);
    auto beta = args_.GetFloat("beta", 0);
    auto tau = args_.GetFloat("tau", 0);
    auto timeout = args_.GetDuration("timeout", absl::Minutes(10));
    for (const absl::Status& s :
         {seed.status(), steps.status(), n.status(), width.status(), height.status(),
          guidance.status(), rescale.status(), beta.status(), tau.status(), timeout.status()}) {
      if (!s.ok()) return UsageError(std::string(s.message()));
    }
    if (args_.Has("seed")) req.set_seed(*seed);
    if (args_.Has("steps")) req.set_steps(*steps);
    if (args_.Has("n")) req.set_num_images(*n);
    if (args_.Has("width")) req.set_width(*width);
    if (args_.Has("height")) req.set_height(*height);
    if (args_.Has("guidance")) req.set_guidance_scale(*guidance);
    if (args_.Has("guidance-rescale")) req.set_guidance_rescale(*rescale);
    if (args_.Has("beta")) req.set_beta(*beta);
    if (args_.Has("tau")) req.set_tau(*tau);
    if (args_.Has("global-lock")) req.set_key_lock(v1::KEY_LOCK_GLOBAL);
    for (const std::string& s : args_.GetAll("strength")) {
      // REF=BETA[:TAU]
      const size_t eq = s.find('=');
      if (eq == std::string::npos || eq == 0) {
        return UsageError(absl::StrCat("--strength: \"", s, "\" is not REF=BETA[:TAU]"));
      }
      auto* cs = req.add_concepts();
      // REF as written in the prompt; "<rex>" is taken as "rex".
      std::string ref = s.substr(0, eq);
      if (ref.size() > 2 && ref.front() == '<' && ref.back() == '>') ref = ref.substr(1, ref.size() - 2);
      cs->set_name(ref);
      std::vector<std::string> parts = absl::StrSplit(s.substr(eq + 1), ':');
      double b = 0, t = 0;
      if (parts.size() > 2 || !absl::SimpleAtod(parts[0], &b) || !std::isfinite(b) ||
          (parts.size() == 2 && (!absl::SimpleAtod(parts[1], &t) || !std::isfinite(t)))) {
        return UsageError(absl::StrCat("--strength: \"", s, "\" is not REF=BETA[:TAU]"));
      }
      cs->set_beta(static_cast<float>(b));
      if (parts.size() == 2) cs->set_tau(static_cast<float>(t));
    }
    for (const std::string& s : args_.GetAll("region")) {
      RegionText text;
      if (std::string error = ParseRegionText(s, &text); !error.empty()) return UsageError(error);
      auto* region = req.add_regions();
      region->set_prompt(text.prompt);
      region->set_x0(static_cast<float>(text.box[0]));
      region->set_y0(static_cast<float>(text.box[1]));
      region->set_x1(static_cast<float>(text.box[2]));
      region->set_y1(static_cast<float>(text.box[3]));
    }
    // 0 means "no limit" for train and jobs watch; a generation always has a deadline.
    if (*timeout == absl::ZeroDuration()) return UsageError("--timeout: a generation needs a deadline > 0");
    const std::string out_dir = args_.Get("out", ".");
    if (out_dir == "-") return UsageError("-o -: generate writes PNG files into a folder, not to stdout");
    const std::string prefix = args_.Get("prefix", "img");
    // A file name, not a path: "a/b" failed only after the generation, "/etc/x" escaped -o.
    if (prefix.empty() || prefix.find('/') != std::string::npos || prefix == "." || prefix == ".." ||
        prefix[0] == '-') {
      return UsageError(absl::StrCat("--prefix \"", prefix,
                                     "\": use a plain file name (no '/', not empty, not starting with '-')"));
    }
    {
      // Before the generation: a folder that cannot be made once failed after all of it.
      std::error_code ec;
      fs::create_directories(out_dir, ec);
      if (ec || !fs::is_directory(out_dir)) {
        return Fail(absl::InvalidArgumentError(
            absl::StrCat("-o ", out_dir, ": cannot create the folder", ec ? ": " + ec.message() : "")));
      }
    }

    ProgressPrinter progress(quiet_);
    const absl::Time start = absl::Now();
    auto resp = client_->Generate(
        req, [&](const v1::GenerateProgress& p) { progress.Generation(p); }, *timeout);
    const double e2e = absl::ToDoubleSeconds(absl::Now() - start);
    progress.Done();
    if (!resp.ok()) return Fail(resp.status(), "generate");
    nlohmann::json j;
    j["images"] = nlohmann::json::array();
    std::vector<std::string> paths;
    for (int i = 0; i < resp->images_size(); ++i) {
      const v1::GeneratedImage& img = resp->images(i);
      std::string path = (fs::path(out_dir) / absl::StrCat(prefix, "-", img.seed(), ".png")).string();
      // Two images of one response never share a file, whatever seeds the server sent.
      if (std::find(paths.begin(), paths.end(), path) != paths.end()) {
        path = (fs::path(out_dir) / absl::StrCat(prefix, "-", img.seed(), "-", i, ".png")).string();
      }
      if (absl::Status s = WriteFile(path, img.png()); !s.ok()) {
        // The images already written stay; say which they are.
        for (const std::string& written : paths) std::cout << written << "\n";
        return Fail(s);
      }
      paths.push_back(path);
      // A string, as every 64-bit integer in --output json: a double cannot hold a 63-bit seed.
      j["images"].push_back({{"file", path},
                             {"seed", std::to_string(img.seed())},
                             {"width", img.width()},
                             {"height", img.height()}});
    }
    j["concepts"] = nlohmann::json::array();
    for (const auto& c : resp->concepts()) {
      j["concepts"].push_back({{"reference", c.reference()},
                               {"concept_id", c.concept_id()},
                               {"name", c.name()},
                               {"version", c.version()}});
    }
    j["queue_seconds"] = Seconds(resp->queue_duration());
    j["compute_seconds"] = Seconds(resp->compute_duration());
    j["total_seconds"] = e2e;
    if (json_) {
      std::cout << j.dump(2) << "\n";
    } else {
      for (const std::string& path : paths) std::cout << path << "\n";
      if (!quiet_) {
        std::cerr << absl::StrFormat("%d image(s) in %.2fs (queue %.2fs, compute %.2fs)\n",
                                     resp->images_size(), e2e, Seconds(resp->queue_duration()),
                                     Seconds(resp->compute_duration()));
      }
    }
    return pc::kExitOk;
  }

  int Health() {
    if (args_.positionals().size() != 1) return UsageError("health takes no arguments");
    std::vector<std::string> services;
    if (args_.Has("service")) {
      services = {args_.Get("service")};
    } else {
      services = {"", "perfusion.v1.TrainingService", "perfusion.v1.ConceptService",
                  "perfusion.v1.GenerationService"};
    }
    nlohmann::json j = nlohmann::json::object();
    int code = pc::kExitOk;
    for (const std::string& svc : services) {
      auto st = client_->Health(svc);
      std::string text;
      if (st.ok()) {
        text = grpc::health::v1::HealthCheckResponse::ServingStatus_Name(*st);
        // The server as a whole (or the one service asked for) decides the exit code.
        if (*st != grpc::health::v1::HealthCheckResponse::SERVING &&
            (svc.empty() || services.size() == 1)) {
          code = pc::kExitUnavailable;
        }
      } else {
        text = absl::StrCat(absl::StatusCodeToString(st.status().code()), ": ",
                            st.status().message());
        // An unknown --service is NOT_FOUND (3); any other failure (unreachable, too slow) is
        // "not healthy", 5, as a probe script expects.
        if (svc.empty() || services.size() == 1) {
          code = st.status().code() == absl::StatusCode::kNotFound ? pc::kExitNotFound : pc::kExitUnavailable;
        }
      }
      j[svc.empty() ? "server" : svc] = text;
      if (!json_) {
        std::cout << absl::StrFormat("%-32s %s\n", svc.empty() ? "server" : svc, text);
      }
    }
    if (json_) std::cout << j.dump(2) << "\n";
    return code;
  }

  ParsedArgs args_;
  const std::string command_;
  bool json_ = false;
  bool quiet_ = false;
  std::string usage_;
  std::unique_ptr<Client> client_;
};

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> raw(argv + 1, argv + argc);
  auto args = ParsedArgs::Parse(raw, AllFlags());
  if (!args.ok()) return UsageError(std::string(args.status().message()));
  const std::vector<std::string>& p = args->positionals();
  if (args->Has("help") || p.empty() || p[0] == "help") {
    std::cout << kUsage;
    return p.empty() && !args->Has("help") ? pc::kExitUsage : pc::kExitOk;
  }
  std::string command = p[0];
  if (command == "jobs" || command == "concepts") {
    if (p.size() < 2) return UsageError(absl::StrCat(command, ": expected a subcommand"));
    std::string sub = p[1];
    if (sub == "delete") sub = "rm";
    command = absl::StrCat(command, " ", sub);
  }
  auto allowed = CommandFlags().find(command);
  if (allowed == CommandFlags().end()) {
    return UsageError(absl::StrCat("unknown command \"", command, "\""));
  }
  for (const std::string& f : args->Names()) {
    if (!kGlobalFlags.count(f) && !allowed->second.count(f)) {
      return UsageError(absl::StrCat(command, ": unknown flag --", f));
    }
  }
  const std::string output = args->Get("output", "text");
  if (output != "text" && output != "json") {
    return UsageError("--output must be text or json");
  }
  // Malformed flag values are usage errors (exit 2), before anything connects.
  for (const char* duration_flag : {"rpc-timeout", "timeout"}) {
    if (auto d = args->GetDuration(duration_flag, absl::Seconds(30)); !d.ok()) {
      return UsageError(std::string(d.status().message()));
    }
  }
  Cli cli(*std::move(args), command);
  if (absl::Status s = cli.Connect(); !s.ok()) return Fail(s);
  return cli.Run();
}

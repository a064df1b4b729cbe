// Cluster: a real perfusion-server and perfusion-worker(s) as child processes on loopback, with a
// temporary data folder, a tenants token file (tenants "acme" and "beta") and a worker token
// file, using the tiny model. The binaries come from CMake ($<TARGET_FILE:...>, compiled in).
//
//   Cluster c;
//   ASSERT_TRUE(c.Init());           // temp dir, tokens, model (GTEST_SKIP when the model is absent
//                                     // is up to the caller: see TinyModelDir())
//   ASSERT_TRUE(c.StartServer());     // waits for event=server_started
//   ASSERT_TRUE(c.StartWorker("w1")); // waits for event=registered
//   CommandResult r = c.Ctl({"jobs", "list"});   // perfusionctl as tenant acme
//
// Every wait is bounded; the destructor SIGKILLs whatever still runs and removes the temp dir
// (kept when PERFUSION_KEEP_TEST_DIRS is set).
#ifndef PERFUSION_TESTS_INTEGRATION_CLUSTER_H_
#define PERFUSION_TESTS_INTEGRATION_CLUSTER_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "absl/time/time.h"
#include "client/client.h"
#include "tests/integration/subprocess.h"

namespace perfusion::testing {

// The tiny model folder: $PERFUSION_TINY_MODEL, else <source>/models/tiny; "" when neither has a
// unet/config.json.
std::string TinyModelDir();
// A CLIP tokenizer folder for models without tokenizer/: <shared>/data/clip when present.
std::string TokenizerDir();

// A command-line tool's usage error: `args` after the binary, and a piece of the message it must print.
struct UsageErrorCase {
  std::vector<std::string> args;
  std::string message;
};
// Runs `binary` once per case (in `scratch_dir`) and expects exit code 2 with the message on stderr.
void ExpectUsageErrors(const std::string& binary, const std::vector<UsageErrorCase>& cases,
                       const std::string& scratch_dir);

inline constexpr char kTokenA[] = "acme-token-0123";
inline constexpr char kTokenB[] = "beta-token-4567";
inline constexpr char kWorkerToken[] = "worker-token-89ab";

struct ServerFlags {
  int lease_seconds = 6;
  int max_attempts = 3;
  std::vector<std::string> extra;
};

class Cluster {
 public:
  Cluster() = default;
  ~Cluster();
  Cluster(const Cluster&) = delete;
  Cluster& operator=(const Cluster&) = delete;

  // Makes the temp dir and token files and finds the base model id. False (with a message on
  // stderr) on failure.
  bool Init();

  const std::string& dir() const { return dir_; }
  const std::string& model_dir() const { return model_dir_; }
  const std::string& base_model_id() const { return base_model_id_; }
  std::string address() const;
  int port() const { return port_; }
  int server_metrics_port() const { return server_metrics_port_; }

  // Starts the server on `port_` (picked once, so a restart keeps the address) with
  // data_dir()/data. Waits (bounded) for its start line.
  bool StartServer(const ServerFlags& flags = {});
  // SIGTERM, then waits for the exit (SIGKILL after the timeout). Returns the exit code.
  int StopServer(absl::Duration timeout = absl::Seconds(30));
  Subprocess& server() { return *server_; }

  // Another server replica on its own port (for a shared postgres:// store passed in
  // flags.extra). Returns its index for replica_address() / replica(); -1 on failure.
  int StartReplica(const ServerFlags& flags);
  std::string replica_address(int i) const;
  Subprocess& replica(int i) { return *replicas_[i]; }

  // Starts a worker named `name` and waits until it has registered. Returns its index. A
  // "--server=..." in `extra` points it at another replica.
  int StartWorker(const std::string& name, const std::vector<std::string>& extra = {});
  Subprocess& worker(int i) { return *workers_[i]; }
  int worker_metrics_port(int i) const { return worker_metrics_ports_[i]; }

  // perfusionctl with --server and the token of tenant A (or `token`), 10-minute limit.
  CommandResult Ctl(const std::vector<std::string>& args, const std::string& token = kTokenA,
                    absl::Duration timeout = absl::Minutes(10));
  // A client library handle as tenant A (or `token`).
  std::unique_ptr<client::Client> Client(const std::string& token = kTokenA,
                                         const std::string& server_address = "");

  // Renders n images of a builtin shapes-world concept into dir()/<concept>/ with
  // perfusion-render-shapes; returns the folder ("" on failure).
  std::string RenderConcept(const std::string& concept_name, int n = 4);

  // Polls `pred` every 100 ms until it holds or `timeout` passes.
  static bool WaitFor(const std::function<bool()>& pred, absl::Duration timeout);

  // Prints the tail of every process log to stderr (for failing tests).
  void DumpLogs() const;

 private:
  // Waits until `proc`'s log contains `needle` (or the process exits, or the timeout).
  bool WaitForLog(Subprocess& proc, const std::string& needle, absl::Duration timeout);
  // Starts `proc` as a server listening on `port`, logging to `log`; waits for its start line.
  bool LaunchServer(Subprocess& proc, int port, const ServerFlags& flags, const std::string& log);

  std::unique_ptr<ScratchDir> scratch_;  // destroyed after the destructor has killed the processes
  std::string dir_;
  std::string model_dir_;
  std::string base_model_id_;
  int port_ = 0;
  int server_metrics_port_ = 0;
  int server_starts_ = 0;
  std::unique_ptr<Subprocess> server_;
  std::vector<std::unique_ptr<Subprocess>> workers_;
  std::vector<std::unique_ptr<Subprocess>> replicas_;
  std::vector<int> replica_ports_;
  std::vector<int> worker_metrics_ports_;
};

// The fixture of the cluster tests: skips when there is no tiny model, makes the Cluster, and
// prints the process logs when the test failed.
class ClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (TinyModelDir().empty()) {
      GTEST_SKIP() << "no tiny model: build models/tiny or set PERFUSION_TINY_MODEL";
    }
    ASSERT_TRUE(cluster_.Init());
  }
  void TearDown() override {
    if (HasFailure()) cluster_.DumpLogs();
  }
  Cluster cluster_;
};

// The value of the first sample of `name` (exactly that name, any labels unless `labels` is
// given, e.g. `kind="training",outcome="completed"`) in a Prometheus text page; -1 when absent.
double MetricValue(const std::string& page, const std::string& name, const std::string& labels = "");

// Parses `key=<digits>` from the first log line that contains `event` (0 when absent).
int ParseLogInt(const std::string& log, const std::string& event, const std::string& key);

}  // namespace perfusion::testing

#endif  // PERFUSION_TESTS_INTEGRATION_CLUSTER_H_

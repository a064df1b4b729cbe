// Child processes for the integration tests: start a real binary with its stdout and stderr in a
// log file, wait for it with a deadline, signal it, and always reap it (the destructor SIGKILLs
// a child that is still running), so that no test leaves a process behind.
//
// Thread safety: one Subprocess per thread.
#ifndef PERFUSION_TESTS_INTEGRATION_SUBPROCESS_H_
#define PERFUSION_TESTS_INTEGRATION_SUBPROCESS_H_

#include <sys/types.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/time/time.h"

namespace perfusion::testing {

class Subprocess {
 public:
  Subprocess() = default;
  ~Subprocess() { Kill(); }
  Subprocess(const Subprocess&) = delete;
  Subprocess& operator=(const Subprocess&) = delete;

  // Starts argv[0] (a path) with argv, the current environment plus `env`, stdin from /dev/null
  // and stdout+stderr appended to `log_path`. Returns false (with errno's text in *error) when
  // the spawn fails.
  bool Start(const std::vector<std::string>& argv, const std::string& log_path,
             const std::map<std::string, std::string>& env = {}, std::string* error = nullptr);

  pid_t pid() const { return pid_; }
  bool running();
  void Signal(int sig);
  // Waits for the exit up to `timeout`. The exit code (128 + signal when killed by a signal),
  // or nullopt when still running at the deadline.
  std::optional<int> Wait(absl::Duration timeout);
  // SIGKILL and reap (no-op when not running).
  void Kill();
  const std::string& log_path() const { return log_path_; }
  // The log so far.
  std::string Log() const;

 private:
  pid_t pid_ = -1;
  std::optional<int> exit_code_;
  std::string log_path_;
};

struct CommandResult {
  int exit_code = -1;  // -1: timed out (the process was killed)
  std::string out;     // stdout
  std::string err;     // stderr
};

// Runs a command to completion (killed at `timeout`), capturing stdout and stderr through
// temporary files in `scratch_dir`.
CommandResult RunCommand(const std::vector<std::string>& argv, const std::string& scratch_dir,
                         absl::Duration timeout,
                         const std::map<std::string, std::string>& env = {});

// A loopback TCP port that was free a moment ago (bound to 127.0.0.1:0, then closed).
int PickFreePort();

// GET http://127.0.0.1:<port><path>; the response body, or "" on failure.
std::string HttpGet(int port, const std::string& path);

// A fresh directory under /tmp (mkdtemp), removed with its contents on destruction unless
// PERFUSION_KEEP_TEST_DIRS is set. path() is "" when it could not be made.
class ScratchDir {
 public:
  explicit ScratchDir(const std::string& prefix = "perfusion-test");
  ~ScratchDir();
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Reads a whole file ("" when missing).
std::string ReadFileOrEmpty(const std::string& path);

}  // namespace perfusion::testing

#endif  // PERFUSION_TESTS_INTEGRATION_SUBPROCESS_H_

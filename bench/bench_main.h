// The main() every bench/*_bench.cc uses: Google Benchmark's, plus LibTorch's thread count.
//
//   OMP_NUM_THREADS=1 build/bench/pipeline_bench          (or --torch_threads=1: at::set_num_threads)
//
// Every run's header states "torch_threads: N" (and OMP_NUM_THREADS) so a figure can be traced to
// the thread count it was measured with. Exits 1 when --benchmark_filter matches no benchmark (so a
// CTest smoke run with a stale filter fails instead of passing with nothing run), or on an unknown
// flag; a benchmark that cannot load its data skips itself (SkipWithError) and the run exits 0.
#pragma once

#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace perfusion::bench {

// The shared reference-data folder: $PERFUSION_SHARED_DIR, else the one configured at build time
// (../shared beside the clone), as the engine tests find it.
inline std::string SharedDir() {
  const char* v = std::getenv("PERFUSION_SHARED_DIR");
  return (v != nullptr && *v != '\0') ? std::string(v) : std::string(PERFUSION_SHARED_DIR);
}

// An exception's message for SkipWithError: c10::Error's without its C++ backtrace.
inline std::string ErrorText(const std::exception& e) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e)) return c10_error->what_without_backtrace();
  return e.what();
}

// `before_run` runs after the flags are parsed and the thread count is set, before any benchmark.
inline int Main(int argc, char** argv, void (*before_run)() = nullptr) {
  int threads = 0;
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--torch_threads=", 16) == 0) {
      threads = std::atoi(argv[i] + 16);
      if (threads <= 0) {
        std::fprintf(stderr, "%s: --torch_threads must be a positive integer, got '%s'\n", argv[0], argv[i] + 16);
        return 1;
      }
    } else {
      argv[kept++] = argv[i];
    }
  }
  argc = kept;
  argv[argc] = nullptr;
  if (threads > 0) at::set_num_threads(threads);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  if (before_run != nullptr) before_run();
  benchmark::AddCustomContext("torch_threads", std::to_string(at::get_num_threads()));
  const char* omp = std::getenv("OMP_NUM_THREADS");
  benchmark::AddCustomContext("OMP_NUM_THREADS", omp != nullptr ? omp : "(unset)");
  const size_t matched = benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return matched == 0 ? 1 : 0;
}

}  // namespace perfusion::bench

// Cost of the rank-1 edit at SD 1.5 shapes: X [2, 77, 768] -> O in {320, 640, 1280}, with 0, 1, 4, 16
// concepts, against the plain projection X W^T; and one training step (forward + backward).
//
//   OMP_NUM_THREADS=1 build/bench/rank1_bench --benchmark_min_time=0.2
//
// BM_Plain/O: X W^T. BM_Edit/O/K: per-prompt gates + the per-layer edit (what one layer pays when it
// is the only layer), O in {320, 640, 1280}, K in {0, 1, 4, 16}. BM_ApplyOnly/O/K: the per-layer part
// alone (what each of the 32 layers pays once the gates, shared by all layers, are computed), O in
// {320, 1280} only, K in {1, 4, 16}. BM_Gates/K/exact:E: the per-prompt part, paid once, K in {1, 4, 16},
// E = 0 for MultiConceptMode::kApproximate (the default), 1 for kExact. BM_TrainStep/O: one
// training step, O in {320, 1280}.
// C^-1 is the SD 1.5 covariance from $PERFUSION_SHARED_DIR/data/sd15 when present, otherwise a
// random one (timing does not depend on its values); the run's header says which ("c_inv").
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>
#include <c10/core/InferenceMode.h>

#include <sys/stat.h>

#include <exception>
#include <string>

#include "bench_main.h"
#include "perfusion/covariance.h"
#include "perfusion/rank1_edit.h"

namespace perfusion {

constexpr int64_t kB = 2, kN = 77, kD = 768;

// Where CInv() came from: the shared covariance's path, or "random (...)".
std::string& CInvSource() {
  static std::string source;
  return source;
}

const at::Tensor& CInv() {
  static const at::Tensor c_inv = [] {
    const std::string path = bench::SharedDir() + "/data/sd15/clip_vit_l14_covariance.safetensors";
    struct stat st;
    if (::stat(path.c_str(), &st) == 0) {
      try {
        at::Tensor inv = InvertCovariance(LoadCovariance(path));
        CInvSource() = path;
        return inv;
      } catch (const std::exception& e) {
        CInvSource() = std::string("random (") + path + " unreadable: " + bench::ErrorText(e) + ")";
      }
    } else {
      CInvSource() = "random (no " + path + ")";
    }
    at::Tensor a = at::randn({kD, kD});
    return InvertCovariance(at::matmul(a, a.t()) / kD + at::eye(kD));
  }();
  return c_inv;
}

struct Setup {
  Setup(int64_t O, int64_t K) {
    at::manual_seed(0);
    X = at::randn({kB, kN, kD}) * 5;
    W = at::randn({O, kD}) * 0.04;
    if (K > 0) {
      I = at::randn({K, kD}) * 5;
      Os = at::randn({K, O});
    }
  }
  at::Tensor X, W, I, Os;
};

void BM_Plain(benchmark::State& state) {
  c10::InferenceMode guard;
  Setup s(state.range(0), 0);
  for (auto _ : state) benchmark::DoNotOptimize(at::matmul(s.X, s.W.t()));
  state.SetItemsProcessed(state.iterations() * kB * kN);
}

void BM_Edit(benchmark::State& state) {
  c10::InferenceMode guard;
  Setup s(state.range(0), state.range(1));
  const at::Tensor& c_inv = CInv();
  for (auto _ : state) {
    if (state.range(1) == 0) {
      benchmark::DoNotOptimize(ApplyRank1Edit(s.X, s.W, s.I, s.Os, ConceptGates{}));
    } else {
      ConceptGates g = ComputeConceptGates(s.X, s.I, c_inv, {GateParams{}});
      benchmark::DoNotOptimize(ApplyRank1Edit(s.X, s.W, s.I, s.Os, g));
    }
  }
  state.SetItemsProcessed(state.iterations() * kB * kN);
}

void BM_ApplyOnly(benchmark::State& state) {
  c10::InferenceMode guard;
  Setup s(state.range(0), state.range(1));
  ConceptGates g = ComputeConceptGates(s.X, s.I, CInv(), {GateParams{}});
  for (auto _ : state) benchmark::DoNotOptimize(ApplyRank1Edit(s.X, s.W, s.I, s.Os, g));
  state.SetItemsProcessed(state.iterations() * kB * kN);
}

void BM_Gates(benchmark::State& state) {
  c10::InferenceMode guard;
  Setup s(320, state.range(0));
  const MultiConceptMode mode = state.range(1) ? MultiConceptMode::kExact : MultiConceptMode::kApproximate;
  for (auto _ : state) benchmark::DoNotOptimize(ComputeConceptGates(s.X, s.I, CInv(), {GateParams{}}, mode).gate);
  state.SetItemsProcessed(state.iterations() * kB * kN);
}

void BM_TrainStep(benchmark::State& state) {
  const int64_t O = state.range(0);
  Setup s(O, 0);
  Rank1Edit edit(s.W, CInv(), Rank1EditOptions().is_key_proj(false));
  at::Tensor X_sup = at::randn({kB, kN, kD}) * 5;
  at::Tensor idx = at::tensor(std::vector<int64_t>{4, 6}, at::kLong);
  for (auto _ : state) {
    at::Tensor X = s.X.clone().requires_grad_(true);
    at::Tensor y = edit->training_forward(X, X_sup, idx);
    y.pow(2).mean().backward();
    benchmark::DoNotOptimize(X.grad());
  }
  state.SetItemsProcessed(state.iterations() * kB * kN);
}

BENCHMARK(BM_Plain)->Arg(320)->Arg(640)->Arg(1280)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Edit)->ArgsProduct({{320, 640, 1280}, {0, 1, 4, 16}})->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_ApplyOnly)->ArgsProduct({{320, 1280}, {1, 4, 16}})->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Gates)->ArgNames({"", "exact"})->ArgsProduct({{1, 4, 16}, {0, 1}})->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_TrainStep)->Arg(320)->Arg(1280)->Unit(benchmark::kMicrosecond);

}  // namespace perfusion

int main(int argc, char** argv) {
  return perfusion::bench::Main(argc, argv, [] {
    perfusion::CInv();  // build C^-1 outside InferenceMode: the training benchmark needs a normal tensor
    benchmark::AddCustomContext("c_inv", perfusion::CInvSource());
  });
}

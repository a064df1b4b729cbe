// The multi-tensor updates equal the per-tensor ones they replace, bit for bit on the CPU.
#include "perfusion/foreach_optim.h"

#include <ATen/Context.h>
#include <ATen/Functions.h>
#include <gtest/gtest.h>
#include <torch/serialize.h>

#include <unistd.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

namespace perfusion {
namespace {

std::vector<at::Tensor> MakeParams(uint64_t seed) {
  at::manual_seed(seed);
  std::vector<at::Tensor> ps = {at::randn({7, 5}), at::randn({5}), at::randn({3, 4, 2}), at::randn({1})};
  for (auto& p : ps) p.set_requires_grad(true);
  return ps;
}

// A loss that touches every parameter, different at every step.
void Backward(const std::vector<at::Tensor>& ps, int step) {
  at::Tensor loss = at::zeros({});
  for (size_t i = 0; i < ps.size(); ++i) loss = loss + (ps[i] * (0.3 * step + static_cast<double>(i))).sin().sum();
  loss.backward();
}

TEST(ForeachOptimTest, AdamWStepEqualsTorchsStepAcrossGroupsAndASaveLoad) {
  auto a = MakeParams(1), b = MakeParams(1);
  auto make = [](const std::vector<at::Tensor>& ps) {
    std::vector<torch::optim::OptimizerParamGroup> groups;
    groups.emplace_back(std::vector<at::Tensor>{ps[0], ps[1]},
                        std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(3e-3).weight_decay(0.01)));
    groups.emplace_back(std::vector<at::Tensor>{ps[2], ps[3]},
                        std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(1e-2).weight_decay(0)));
    return std::make_unique<torch::optim::AdamW>(std::move(groups));
  };
  auto ref = make(a), mine = make(b);
  const std::string path = ::testing::TempDir() + "/foreach_adamw_" + std::to_string(::getpid()) + ".pt";
  for (int step = 1; step <= 6; ++step) {
    ref->zero_grad();
    mine->zero_grad();
    Backward(a, step);
    Backward(b, step);
    ref->step();
    // The first step creates the state through torch's own step; the others take the foreach path.
    EXPECT_EQ(ForeachAdamWStep(*mine), step > 1) << "step " << step;
    for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(at::equal(a[i], b[i])) << "step " << step << ", param " << i;
    if (step == 3) {  // the state survives a save and load, as a resumed run's does
      torch::save(*mine, path);
      auto again = make(b);
      torch::load(*again, path);
      mine = std::move(again);
    }
  }
  std::remove(path.c_str());
}

// On a GPU the foreach kernels are fused, so the match is close rather than exact. Skips without CUDA.
TEST(ForeachOptimTest, CudaAdamWStepMatchesTorchsStep) {
  if (!at::hasCUDA()) GTEST_SKIP() << "CUDA not available";
  auto a = MakeParams(4), b = MakeParams(4);
  for (auto* ps : {&a, &b}) {
    for (auto& p : *ps) p = p.detach().cuda().set_requires_grad(true);
  }
  torch::optim::AdamW ref(a, torch::optim::AdamWOptions(3e-3).weight_decay(0.01));
  torch::optim::AdamW mine(b, torch::optim::AdamWOptions(3e-3).weight_decay(0.01));
  for (int step = 1; step <= 5; ++step) {
    ref.zero_grad();
    mine.zero_grad();
    Backward(a, step);
    Backward(b, step);
    ref.step();
    EXPECT_EQ(ForeachAdamWStep(mine), step > 1);
  }
  for (size_t i = 0; i < a.size(); ++i) EXPECT_LT((a[i] - b[i]).abs().max().item<double>(), 1e-5) << i;
}

TEST(ForeachOptimTest, EmaUpdateEqualsThePerTensorLoop) {
  auto live = MakeParams(2), avg = MakeParams(3), ref = MakeParams(3);
  for (auto& t : avg) t = t.detach();
  for (auto& t : ref) t = t.detach();
  ForeachEmaUpdate(avg, live, 0.99);
  for (size_t i = 0; i < ref.size(); ++i) {
    ref[i].mul_(0.99).add_(live[i].detach(), 1 - 0.99);
    EXPECT_TRUE(at::equal(avg[i], ref[i])) << i;
  }
  std::vector<at::Tensor> one = {avg[0]};
  EXPECT_THROW(ForeachEmaUpdate(one, live, 0.5), c10::Error);
}

// The trainers' entry points: on the CPU, torch's own loops (the same numbers bit for bit).
TEST(ForeachOptimTest, TheTrainersStepsOnTheCpuAreTorchsOwn) {
  auto a = MakeParams(5), b = MakeParams(5);
  torch::optim::AdamW ref(a, torch::optim::AdamWOptions(3e-3).weight_decay(0.01));
  torch::optim::AdamW mine(b, torch::optim::AdamWOptions(3e-3).weight_decay(0.01));
  for (int step = 1; step <= 3; ++step) {
    for (auto* ps : {&a, &b}) {
      for (auto& p : *ps) p.mutable_grad() = at::full_like(p, 0.1 * step);
    }
    ref.step();
    AdamWStep(mine);
  }
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(at::equal(a[i], b[i])) << i;
  auto live = MakeParams(2), avg = MakeParams(3), expect = MakeParams(3);
  for (auto& t : avg) t = t.detach();
  for (auto& t : expect) t = t.detach();
  EmaUpdate(avg, live, 0.9);
  for (size_t i = 0; i < avg.size(); ++i) EXPECT_TRUE(at::equal(avg[i], expect[i].mul(0.9).add(live[i].detach(), 1.0 - 0.9))) << i;
  std::vector<at::Tensor> one = {avg[0]};
  EXPECT_THROW(EmaUpdate(one, live, 0.5), c10::Error);
}

}  // namespace
}  // namespace perfusion

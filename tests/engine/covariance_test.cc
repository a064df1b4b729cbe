#include "perfusion/covariance.h"

#include <ATen/Functions.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <string>

#include "perfusion/rank1_edit.h"
#include "tests/engine/test_util.h"

namespace perfusion {
namespace {

using testing::AllClose;

class CovarianceTest : public testing::SeededTest {};

TEST_F(CovarianceTest, StreamingEqualsTheBatchSecondMoment) {
  at::Tensor X = at::randn({5, 77, 8});
  CovarianceAccumulator acc(8);
  for (int b = 0; b < 5; ++b) acc.Add(X[b]);
  at::Tensor rows = X.reshape({-1, 8}).to(at::kDouble);
  EXPECT_EQ(acc.count(), 5 * 77);
  EXPECT_TRUE(AllClose(acc.Covariance(), at::matmul(rows.t(), rows) / (5 * 77), 1e-12, 1e-12, "C"));
}

TEST_F(CovarianceTest, MaskSelectsTheCountedPositionsAndMergeAddsShards) {
  at::Tensor X = at::randn({2, 6, 4});
  at::Tensor mask = at::zeros({2, 6}, at::kBool);
  mask.slice(1, 0, 3).fill_(true);
  CovarianceAccumulator masked(4), shard_a(4), shard_b(4);
  masked.Add(X, mask);
  shard_a.Add(X.slice(1, 0, 3)[0]);
  shard_b.Add(X.slice(1, 0, 3)[1]);
  shard_a.Merge(shard_b);
  EXPECT_EQ(masked.count(), 6);
  EXPECT_TRUE(AllClose(masked.Covariance(), shard_a.Covariance(), 1e-12, 1e-12, "masked vs merged"));
}

TEST_F(CovarianceTest, SaveLoadRoundTripAndStableInverse) {
  at::Tensor a = at::randn({16, 16});
  at::Tensor C = at::matmul(a, a.t()) + at::eye(16);
  // Per process: two build trees may run their tests at once.
  const std::string path = ::testing::TempDir() + "/cov_" + std::to_string(::getpid()) + ".safetensors";
  SaveCovariance(path, C, {{"count", "16"}});
  at::Tensor back = LoadCovariance(path);
  EXPECT_TRUE(at::equal(back, C.to(at::kFloat)));
  at::Tensor inv = InvertCovariance(back);
  EXPECT_TRUE(AllClose(at::matmul(inv.to(at::kDouble), back.to(at::kDouble)), at::eye(16, at::kDouble), 1e-4, 1e-4, "C^-1 C"));
}

TEST_F(CovarianceTest, RejectsSingularOrNonSymmetricMatrices) {
  at::Tensor rank1 = at::ones({4, 4});
  EXPECT_THROW(InvertCovariance(rank1), c10::ValueError);
  at::Tensor asym = at::eye(4);
  asym[0][1] = 0.5;
  EXPECT_THROW(InvertCovariance(asym), c10::ValueError);
  CovarianceAccumulator empty(4);
  EXPECT_THROW(empty.Covariance(), c10::ValueError);
  EXPECT_THROW(empty.Add(at::randn({3, 5})), c10::ValueError);
}

TEST_F(CovarianceTest, TheShippedSd15CovarianceIsWellConditioned) {
  const std::string path = testing::SharedDir() + "/data/sd15/clip_vit_l14_covariance.safetensors";
  if (!testing::FileExists(path)) GTEST_SKIP() << "no shared data";
  at::Tensor C = LoadCovariance(path).to(at::kDouble);
  at::Tensor eig = at::linalg_eigvalsh(C);
  EXPECT_NEAR(eig.max().item<double>(), 4.43e3, 0.01e3);
  EXPECT_NEAR(eig.min().item<double>(), 1.13, 0.01);
  at::Tensor inv = InvertCovariance(C);
  EXPECT_TRUE(AllClose(at::matmul(inv.to(at::kDouble), C), at::eye(768, at::kDouble), 1e-3, 1e-3, "C^-1 C"));
}

}  // namespace
}  // namespace perfusion

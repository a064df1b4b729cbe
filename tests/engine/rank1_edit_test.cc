// Properties of the gated rank-1 edit: ../shared/docs/perfusion-algorithm.md §9.1-§9.3 and §9.5.
#include "perfusion/rank1_edit.h"

#include <ATen/Functions.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <cmath>

#include "tests/engine/test_util.h"

namespace perfusion {
namespace {

using testing::AllClose;

double Sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// A random well-conditioned SPD covariance, projection and concepts in float64.
class Rank1EditTest : public testing::SeededTest {
 protected:
  static constexpr int64_t D = 12, O = 7;
  Rank1EditTest() {
    auto opts = at::TensorOptions().dtype(at::kDouble);
    at::Tensor a = at::randn({D, D}, opts);
    C = at::matmul(a, a.t()) / D + at::eye(D, opts) * 0.5;
    C_inv = at::inverse(C);
    W = at::randn({O, D}, opts);
    i_star = at::randn({3, D}, opts);
    o_star = at::randn({3, O}, opts);
    X = at::randn({2, 5, D}, opts);
  }
  at::Tensor Edit(const at::Tensor& x, const at::Tensor& I, const at::Tensor& Os, std::vector<GateParams> p,
                  MultiConceptMode mode = MultiConceptMode::kApproximate) {
    return ApplyRank1Edit(x, W, I, Os, ComputeConceptGates(x, I, C_inv, p, mode));
  }
  at::Tensor One(int64_t c) { return i_star.slice(0, c, c + 1); }
  at::Tensor OneO(int64_t c) { return o_star.slice(0, c, c + 1); }
  at::Tensor Tokens(const at::Tensor& rows) { return rows.reshape({1, -1, D}); }
  at::Tensor C, C_inv, W, i_star, o_star, X;
};

TEST_F(Rank1EditTest, SaturatedGateReproducesTheTarget) {
  at::Tensor x = Tokens(at::stack({i_star[0], i_star[0] * 0.5, i_star[0] * 3.0}));
  at::Tensor y = Edit(x, One(0), OneO(0), {{-1e3, 0.1}});
  for (int n = 0; n < 3; ++n) EXPECT_TRUE(AllClose(y[0][n], o_star[0], 1e-9, 1e-9, "f(lambda i*)"));
}

TEST_F(Rank1EditTest, ClosedGateRemovesTheConceptDirection) {
  at::Tensor y = Edit(X, One(0), OneO(0), {{1e3, 0.1}});
  at::Tensor alpha = at::matmul(X, at::matmul(C_inv, i_star[0])) / at::dot(i_star[0], at::mv(C_inv, i_star[0]));
  at::Tensor expected = at::matmul(X, W.t()) - alpha.unsqueeze(-1) * at::mv(W, i_star[0]);
  EXPECT_TRUE(AllClose(y, expected, 1e-9, 1e-9, "closed gate"));
  at::Tensor at_concept = Edit(Tokens(i_star[0]), One(0), OneO(0), {{1e3, 0.1}});
  EXPECT_TRUE(AllClose(at_concept.flatten(), at::zeros({O}, at::kDouble), 0, 1e-9, "f(i*)"));
}

TEST_F(Rank1EditTest, DefaultGateScalesTheTargetAtTheConcept) {
  at::Tensor x = Tokens(i_star[0]);
  at::Tensor train = Edit(x, One(0), OneO(0), {{0.75, 0.1}}).flatten();
  at::Tensor eval = Edit(x, One(0), OneO(0), {{0.7, 0.15}}).flatten();
  EXPECT_NEAR(Sigmoid(0.25 / 0.1), 0.924141820, 1e-9);
  EXPECT_NEAR(Sigmoid(0.3 / 0.15), 0.880797078, 1e-9);
  EXPECT_TRUE(AllClose(train, o_star[0] * 0.924141820, 1e-8, 1e-9, "train gate"));
  EXPECT_TRUE(AllClose(eval, o_star[0] * 0.880797078, 1e-8, 1e-9, "eval gate"));
}

TEST_F(Rank1EditTest, UngatedFormEqualsExplicitRomeWeight) {
  at::Tensor i = i_star[0], o = o_star[0];
  at::Tensor u = at::mv(C_inv, i) / at::dot(i, at::mv(C_inv, i));
  at::Tensor W_prime = W + at::outer(o - at::mv(W, i), u);
  EXPECT_TRUE(AllClose(ApplyRome(X, W, i, o, C_inv), at::matmul(X, W_prime.t()), 1e-9, 1e-9, "ROME"));
  EXPECT_TRUE(AllClose(at::mv(W_prime, i), o, 1e-9, 1e-9, "W' i* = o*"));
}

TEST_F(Rank1EditTest, CInverseOrthogonalInputsOnlyGetTheGateLeak) {
  at::Tensor i = i_star[0];
  at::Tensor ci = at::mv(C_inv, i);
  at::Tensor e = at::randn({D}, at::kDouble);
  e = e - ci * (at::dot(e, ci) / at::dot(ci, ci));  // e^T C^-1 i* = 0
  ASSERT_NEAR(at::dot(e, ci).item<double>(), 0.0, 1e-10);
  at::Tensor y = Edit(Tokens(e), One(0), OneO(0), {{0.7, 0.15}}).flatten();
  EXPECT_TRUE(AllClose(y, at::mv(W, e) + Sigmoid(-0.7 / 0.15) * o_star[0], 1e-9, 1e-9, "orthogonal input"));
  EXPECT_TRUE(AllClose(ApplyRome(Tokens(e), W, i, o_star[0], C_inv).flatten(), at::mv(W, e), 1e-9, 1e-9, "ROME"));
}

TEST_F(Rank1EditTest, ErasedPartIsCInverseOrthogonalToTheConcept) {
  ConceptGates g = ComputeConceptGates(X, One(0), C_inv, {{0.7, 0.15}});
  at::Tensor e_perp = X - g.alpha * i_star[0];  // [B, N, D]
  at::Tensor r = ApplyRank1Edit(X, W, One(0), OneO(0), g) - g.gate * o_star[0];
  EXPECT_TRUE(AllClose(r, at::matmul(e_perp, W.t()), 1e-9, 1e-9, "r = W e_perp"));
  EXPECT_TRUE(AllClose(at::matmul(e_perp, at::mv(C_inv, i_star[0])), at::zeros({2, 5}, at::kDouble), 0, 1e-9,
                       "i*^T C^-1 e_perp"));
}

TEST_F(Rank1EditTest, ScalingTheCovarianceChangesNothing) {
  at::Tensor a = Edit(X, i_star, o_star, {{0.7, 0.15}});
  at::Tensor b = ApplyRank1Edit(X, W, i_star, o_star, ComputeConceptGates(X, i_star, C_inv / 37.0, {{0.7, 0.15}}));
  EXPECT_TRUE(AllClose(a, b, 1e-9, 1e-12, "C vs 37 C"));
}

TEST_F(Rank1EditTest, FoldedFormEqualsTheUnfoldedFormula) {
  at::Tensor i = i_star[0], o = o_star[0];
  at::Tensor u = at::mv(C_inv, i) / at::dot(i, at::mv(C_inv, i));
  at::Tensor W_eff = W - at::outer(at::mv(W, i), u);
  at::Tensor gate = at::sigmoid((at::matmul(X, u) - 0.7) / 0.15);
  at::Tensor folded = at::matmul(X, W_eff.t()) + gate.unsqueeze(-1) * o;
  EXPECT_TRUE(AllClose(Edit(X, One(0), OneO(0), {{0.7, 0.15}}), folded, 1e-9, 1e-9, "folded"));
}

TEST_F(Rank1EditTest, TokensAndBatchItemsAreEditedIndependently) {
  at::Tensor y = Edit(X, i_star, o_star, {{0.7, 0.15}});
  at::Tensor perm_n = at::randperm(5, at::kLong), perm_b = at::tensor({1, 0}, at::kLong);
  at::Tensor Xp = X.index_select(1, perm_n).index_select(0, perm_b);
  at::Tensor yp = Edit(Xp, i_star, o_star, {{0.7, 0.15}});
  EXPECT_TRUE(AllClose(yp, y.index_select(1, perm_n).index_select(0, perm_b), 1e-12, 1e-12, "permuted"));
  EXPECT_EQ(y.sizes(), (at::IntArrayRef{2, 5, O}));
}

TEST_F(Rank1EditTest, ApproximateFormIsTheSumOfSingleConceptDeltas) {
  at::Tensor base = at::matmul(X, W.t());
  at::Tensor both = Edit(X, i_star.slice(0, 0, 2), o_star.slice(0, 0, 2), {{0.7, 0.15}});
  at::Tensor d0 = Edit(X, One(0), OneO(0), {{0.7, 0.15}}) - base;
  at::Tensor d1 = Edit(X, One(1), OneO(1), {{0.7, 0.15}}) - base;
  EXPECT_TRUE(AllClose(both - base, d0 + d1, 1e-9, 1e-9, "additivity"));
}

TEST_F(Rank1EditTest, ExactFormProjectsInTheCInverseMetric) {
  // P e = I* kappa(e): check P i*_c = i*_c, P^2 = P and (C^-1 P)^T = C^-1 P on the basis.
  at::Tensor basis = at::eye(D, at::kDouble).reshape({1, D, D});
  ConceptGates g = ComputeConceptGates(basis, i_star, C_inv, {{0.7, 0.15}}, MultiConceptMode::kExact);
  at::Tensor P = at::matmul(g.erase[0], i_star).t();  // column j = P e_j
  for (int c = 0; c < 3; ++c) EXPECT_TRUE(AllClose(at::mv(P, i_star[c]), i_star[c], 1e-9, 1e-9, "P i*"));
  EXPECT_TRUE(AllClose(at::matmul(P, P), P, 1e-9, 1e-9, "P^2"));
  at::Tensor CP = at::matmul(C_inv, P);
  EXPECT_TRUE(AllClose(CP.t(), CP, 1e-9, 1e-9, "C^-1 P self-adjoint"));
}

TEST_F(Rank1EditTest, ExactFormWithOpenGatesSumsTheTargets) {
  at::Tensor x = Tokens(i_star);
  at::Tensor y = Edit(x, i_star, o_star, {{-1e3, 0.1}}, MultiConceptMode::kExact);
  for (int c = 0; c < 3; ++c) EXPECT_TRUE(AllClose(y[0][c], o_star.sum(0), 1e-9, 1e-9, "sum of targets"));
  // Each gate is computed separately: at a high bias only the concept itself opens its gate.
  ConceptGates g = ComputeConceptGates(x, i_star, C_inv, {{0.9, 1e-4}}, MultiConceptMode::kExact);
  EXPECT_TRUE(AllClose(g.gate[0], at::eye(3, at::kDouble), 0, 1e-6, "separate gates"));
}

TEST_F(Rank1EditTest, ExactAndApproximateFormsAgreeForOrthogonalConcepts) {
  // Make i*_1 C^-1-orthogonal to i*_0.
  at::Tensor i0 = i_star[0], i1 = i_star[1];
  i1 = i1 - i0 * (at::dot(i1, at::mv(C_inv, i0)) / at::dot(i0, at::mv(C_inv, i0)));
  at::Tensor I = at::stack({i0, i1});
  at::Tensor a = Edit(X, I, o_star.slice(0, 0, 2), {{0.7, 0.15}}, MultiConceptMode::kApproximate);
  at::Tensor e = Edit(X, I, o_star.slice(0, 0, 2), {{0.7, 0.15}}, MultiConceptMode::kExact);
  EXPECT_TRUE(AllClose(e, a, 1e-9, 1e-9, "exact vs approximate"));
}

TEST_F(Rank1EditTest, ExactFormRejectsDuplicateConcepts) {
  at::Tensor I = at::stack({i_star[0], i_star[0]});
  EXPECT_THROW(ComputeConceptGates(X, I, C_inv, {{0.7, 0.15}}, MultiConceptMode::kExact), c10::ValueError);
}

// Parallel to within rounding: Cholesky may still succeed, but the coefficients would be noise.
TEST_F(Rank1EditTest, ExactFormRejectsConceptsParallelToWithinRounding) {
  for (double eps : {1e-8, 1e-10}) {
    const at::Tensor I = at::stack({i_star[0], i_star[0] + eps * i_star[1]});
    EXPECT_THROW(ComputeConceptGates(X, I, C_inv, {{0.7, 0.15}}, MultiConceptMode::kExact), c10::ValueError)
        << "eps " << eps;
    EXPECT_NO_THROW(ComputeConceptGates(X, I, C_inv, {{0.7, 0.15}}, MultiConceptMode::kApproximate));
  }
}

// Two concepts of one superclass have nearly parallel i*: their exact-form coefficients are large
// with opposite signs. From float32 inputs the erase term still matches the float64 computation,
// because the exact form runs in float64 (in float32 it cancelled to noise).
TEST_F(Rank1EditTest, ExactFormKeepsItsPrecisionForNearlyParallelConcepts) {
  const at::Tensor I = at::stack({i_star[0], i_star[0] + 1e-3 * i_star[1]});
  const ConceptGates g64 = ComputeConceptGates(X, I, C_inv, {{0.7, 0.15}}, MultiConceptMode::kExact);
  const ConceptGates g32 = ComputeConceptGates(X.to(at::kFloat), I.to(at::kFloat), C_inv.to(at::kFloat),
                                               {{0.7, 0.15}}, MultiConceptMode::kExact);
  EXPECT_EQ(g32.erase.scalar_type(), at::kFloat);
  const double scale = g64.erase.abs().max().item<double>();
  ASSERT_GT(scale, 10.0) << "the coefficients are large for nearly parallel concepts";
  // Only the inputs' float32 rounding remains: relative error well under 1e-2 (float32 arithmetic
  // on these coefficients lost it all).
  EXPECT_LT((g32.erase.to(at::kDouble) - g64.erase).abs().max().item<double>() / scale, 1e-2);
}

TEST_F(Rank1EditTest, GoldenToyNumbersFromTheSpec) {
  auto d = at::TensorOptions().dtype(at::kDouble);
  at::Tensor w = at::tensor({1., 2., 0., 0., 1., -1.}, d).reshape({2, 3});
  at::Tensor c = at::tensor({2., 0.5, 0., 0.5, 1., 0.2, 0., 0.2, 1.5}, d).reshape({3, 3});
  at::Tensor ci = InvertCovariance(c).to(at::kDouble);  // float32 C^-1: compare at float32 precision
  at::Tensor ci64 = at::inverse(c);
  EXPECT_TRUE(AllClose(ci, ci64, 1e-6, 1e-7, "C^-1"));
  EXPECT_NEAR(ci64[0][1].item<double>(), -0.294695481, 1e-9);
  at::Tensor I = at::tensor({1., 0., 1., 0., 1., 1.}, d).reshape({2, 3});
  at::Tensor Os = at::tensor({3., -1., -2., 4.}, d).reshape({2, 2});
  at::Tensor x = at::tensor({1., 0., 1., 0., 1., 0., 2., 1., -1.}, d).reshape({1, 3, 3});  // i1, e2, e3
  auto one = [&](double beta, double tau) {
    return ApplyRank1Edit(x, w, I.slice(0, 0, 1), Os.slice(0, 0, 1),
                          ComputeConceptGates(x, I.slice(0, 0, 1), ci64, {{beta, tau}}))[0];
  };
  EXPECT_TRUE(AllClose(one(0.75, 0.1), at::tensor({2.772425460, -0.924141820, 2.337300323, 0.662737624,
                                                   3.967166615, 2.034404872}, d).reshape({3, 2}), 1e-8, 1e-9, "(0.75,0.1)"));
  EXPECT_TRUE(AllClose(one(0.7, 0.15), at::tensor({2.642391234, -0.880797078, 2.340218923, 0.661764758,
                                                   4.000060077, 2.023440385}, d).reshape({3, 2}), 1e-8, 1e-9, "(0.7,0.15)"));
  at::Tensor e3 = x.slice(1, 2, 3);
  auto two = [&](MultiConceptMode m) {
    return ApplyRank1Edit(e3, w, I, Os, ComputeConceptGates(e3, I, ci64, {{0.7, 0.15}}, m)).flatten();
  };
  EXPECT_TRUE(AllClose(two(MultiConceptMode::kApproximate), at::tensor({4.008239494, 2.057714464}, d), 1e-8, 1e-9, "approx"));
  EXPECT_TRUE(AllClose(two(MultiConceptMode::kExact), at::tensor({4.018113654, 2.061739534}, d), 1e-8, 1e-9, "exact"));
  EXPECT_TRUE(AllClose(ApplyRome(e3, w, I[0], Os[0], ci64).flatten(), at::tensor({4.070381232, 2.}, d), 1e-8, 1e-9, "ROME"));
}

TEST_F(Rank1EditTest, HalfPrecisionInputsComputeTheGateInFloat32) {
  at::Tensor x32 = X.to(at::kFloat), I = i_star.to(at::kFloat), Os = o_star.to(at::kFloat);
  at::Tensor ci = C_inv.to(at::kFloat), w = W.to(at::kFloat);
  for (auto type : {at::kHalf, at::kBFloat16}) {
    at::Tensor xh = x32.to(type);
    ConceptGates g = ComputeConceptGates(xh, I, ci, {{0.7, 0.15}});
    EXPECT_EQ(g.gate.scalar_type(), at::kFloat);
    ConceptGates g32 = ComputeConceptGates(xh.to(at::kFloat), I, ci, {{0.7, 0.15}});
    EXPECT_TRUE(at::equal(g.gate, g32.gate)) << "gates from the same rounded inputs must match exactly";
    if (type == at::kHalf) continue;  // CPU LibTorch 1.13 has no fp16 matmul (GPUs do)
    at::Tensor y = ApplyRank1Edit(xh, w.to(type), I, Os, g);
    EXPECT_EQ(y.scalar_type(), type);
    EXPECT_TRUE(AllClose(y.to(at::kFloat), ApplyRank1Edit(x32, w, I, Os, g32), 0.05, 0.1, "bf16 vs fp32"));
  }
}

TEST_F(Rank1EditTest, BadShapesGiveClearErrors) {
  try {
    ApplyRank1Edit(at::randn({2, 5, D + 1}, at::kDouble), W, One(0), OneO(0),
                   ComputeConceptGates(X, One(0), C_inv, {{0.7, 0.15}}));
    FAIL();
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("width"), std::string::npos) << e.what_without_backtrace();
  }
  EXPECT_THROW(ComputeConceptGates(X, One(0), C_inv, {{0.7, 0.0}}), c10::ValueError);
  EXPECT_THROW(ComputeConceptGates(X, at::zeros({1, D}, at::kDouble), C_inv, {{0.7, 0.15}}), c10::ValueError);
  EXPECT_THROW(Rank1Edit(W, at::eye(D + 1), Rank1EditOptions()), c10::ValueError);
}

// --- The module: state, training behaviour and merging (§9.2 #10, #13; §9.3) ---------------------

class Rank1EditModuleTest : public testing::SeededTest {
 protected:
  static constexpr int64_t D = 16, O = 8, B = 3, N = 6;
  Rank1EditModuleTest() {
    at::Tensor a = at::randn({D, D});
    C_inv = InvertCovariance(at::matmul(a, a.t()) / D + at::eye(D));
    W = at::randn({O, D});
  }
  at::Tensor C_inv, W;
};

TEST_F(Rank1EditModuleTest, EvalBeforeTrainingRaises) {
  Rank1Edit edit(W, C_inv, Rank1EditOptions());
  edit->eval();
  EXPECT_THROW(edit->forward(at::randn({1, N, D})), c10::ValueError);
}

TEST_F(Rank1EditModuleTest, InputEmaAndTargetsFollowTheSpec) {
  Rank1Edit key(W, C_inv, Rank1EditOptions().is_key_proj(true));
  Rank1Edit value(W, C_inv, Rank1EditOptions().is_key_proj(false));
  at::Tensor idx = at::tensor({1, 2, 3}, at::kLong);
  std::vector<at::Tensor> xbar, sbar;
  for (int step = 0; step < 3; ++step) {
    at::Tensor X = at::randn({B, N, D}), Xs = at::randn({B, N, D});
    key->training_forward(X, Xs, idx);
    value->training_forward(X, Xs, idx);
    at::Tensor b = at::arange(B, at::kLong);
    xbar.push_back(X.index({b, idx}).mean(0));
    sbar.push_back(Xs.index({b, idx}).mean(0));
    at::Tensor i_exp = xbar[0], s_exp = sbar[0];
    for (int t = 1; t <= step; ++t) {
      i_exp = 0.99 * i_exp + 0.01 * xbar[t];
      s_exp = 0.99 * s_exp + 0.01 * sbar[t];
    }
    EXPECT_TRUE(AllClose(key->i_star()[0], i_exp, 1e-5, 1e-6, "i* EMA"));
    EXPECT_TRUE(AllClose(key->o_star()[0], at::mv(W, s_exp), 1e-5, 1e-5, "K target = W EMA(x_sup)"));
    EXPECT_TRUE(AllClose(key->i_sup()[0], s_exp, 1e-5, 1e-6, "i_sup EMA"));
    EXPECT_TRUE(AllClose(value->o_star()[0], at::mv(W, sbar[0]), 1e-5, 1e-5, "V target keeps its first value"));
  }
}

TEST_F(Rank1EditModuleTest, GradientsReachOnlyTheValueTargetAndTheEncodings) {
  Rank1Edit key(W, C_inv, Rank1EditOptions().is_key_proj(true));
  Rank1Edit value(W, C_inv, Rank1EditOptions().is_key_proj(false));
  at::Tensor X = at::randn({B, N, D}).requires_grad_(true);
  at::Tensor Xs = at::randn({B, N, D});
  at::Tensor idx = at::tensor({0, 2, 4}, at::kLong);
  // Frozen W is a buffer, not a parameter; the K target is not trainable.
  EXPECT_EQ(key->parameters().size(), 1u);
  EXPECT_FALSE(key->o_star().requires_grad());
  EXPECT_TRUE(value->o_star().requires_grad());
  at::Tensor yv = value->training_forward(X, Xs, idx);
  at::Tensor yk = key->training_forward(X, Xs, idx);
  (yv.sum() + yk.sum()).backward();
  // dL/do*_v = sum over tokens of the gate.
  ConceptGates g = ComputeConceptGates(X.detach(), value->i_star().detach(), C_inv, {{0.75, 0.1}});
  EXPECT_TRUE(AllClose(value->o_star().grad()[0], g.gate.sum().expand({O}), 1e-5, 1e-5, "grad o*_v"));
  EXPECT_FALSE(W.requires_grad());
  ASSERT_TRUE(X.grad().defined());
  EXPECT_GT(X.grad().abs().sum().item<float>(), 0.0f);
}

TEST_F(Rank1EditModuleTest, FractionalGradientScalesOnlyTheGradient) {
  at::Tensor X0 = at::randn({B, N, D}), Xs = at::randn({B, N, D});
  at::Tensor idx = at::tensor({0, 2, 4}, at::kLong);
  std::vector<at::Tensor> outs, grads;
  for (double frac : {1.0, 0.1}) {
    Rank1Edit v(W, C_inv, Rank1EditOptions().frac_gradient(frac));
    at::Tensor X = X0.clone().requires_grad_(true);
    at::Tensor y = v->training_forward(X, Xs, idx);
    y.sum().backward();
    outs.push_back(y.detach());
    grads.push_back(X.grad());
  }
  EXPECT_TRUE(at::equal(outs[0], outs[1])) << "forward must not change with frac (bit for bit)";
  EXPECT_TRUE(AllClose(grads[1], grads[0] * 0.1, 1e-4, 1e-6, "grad scaled by frac"));
}

TEST_F(Rank1EditModuleTest, StraightThroughGradientFlowsAsIfIStarWereTheBatchMean) {
  // With straight-through, dL/dX at the concept positions includes the path through i*; without it
  // that path is cut. The difference is exactly the gradient of the loss w.r.t. i* spread over the batch.
  at::Tensor X0 = at::randn({B, N, D}), Xs = at::randn({B, N, D});
  at::Tensor idx = at::tensor({1, 1, 1}, at::kLong);
  std::vector<at::Tensor> grads;
  at::Tensor i_grad;
  for (bool st : {true, false}) {
    Rank1Edit v(W, C_inv, Rank1EditOptions().straight_through(st));
    at::Tensor X = X0.clone().requires_grad_(true);
    v->training_forward(X, Xs, idx).pow(2).sum().backward();
    grads.push_back(X.grad());
    if (!st) {
      // dL/di at the EMA value, by autograd on the functional form.
      at::Tensor i = v->i_star()[0].detach().clone().requires_grad_(true);
      at::Tensor y = ApplyRank1Edit(X0, W, i.unsqueeze(0), v->o_star().detach().slice(0, 0, 1),
                                    ComputeConceptGates(X0, i.unsqueeze(0), C_inv, {{0.75, 0.1}}));
      y.pow(2).sum().backward();
      i_grad = i.grad();
    }
  }
  at::Tensor diff = (grads[0] - grads[1]).select(1, 1);  // [B, D] at the concept position
  for (int b = 0; b < B; ++b) EXPECT_TRUE(AllClose(diff[b], i_grad / B, 1e-3, 1e-4, "straight-through"));
}

TEST_F(Rank1EditModuleTest, MergedEditWithOneIdEqualsTheOriginal) {
  std::vector<Rank1Edit> edits;
  for (int k = 0; k < 3; ++k) {
    Rank1Edit e(W, C_inv, Rank1EditOptions());
    e->training_forward(at::randn({B, N, D}), at::randn({B, N, D}), at::tensor({0, 1, 2}, at::kLong));
    e->eval();
    edits.push_back(e);
  }
  Rank1Edit merged = MergeRank1Edits(edits);
  EXPECT_EQ(merged->num_concepts(), 3);
  at::Tensor X = at::randn({2, N, D});
  for (int64_t k = 0; k < 3; ++k) {
    EXPECT_TRUE(AllClose(merged->forward(X, {k}), edits[k]->forward(X), 1e-6, 1e-6, "merged id " + std::to_string(k)));
  }
  // Order follows the arguments.
  Rank1Edit reversed = MergeRank1Edits({edits[2], edits[1], edits[0]});
  EXPECT_TRUE(at::equal(reversed->i_star()[0], merged->i_star()[2]));
  // A K edit cannot merge with a V edit.
  Rank1Edit key(W, C_inv, Rank1EditOptions().is_key_proj(true));
  key->set_concept(0, at::randn({D}), at::Tensor(), at::randn({D}));
  EXPECT_THROW(MergeRank1Edits({edits[0], key}), c10::ValueError);
}

TEST_F(Rank1EditModuleTest, KeyTargetRebuildsFromTheSuperclassEncoding) {
  Rank1Edit key(W, C_inv, Rank1EditOptions().is_key_proj(true));
  for (int s = 0; s < 4; ++s) key->training_forward(at::randn({B, N, D}), at::randn({B, N, D}), at::tensor({0, 1, 2}, at::kLong));
  Rank1Edit rebuilt(W, C_inv, Rank1EditOptions().is_key_proj(true));
  rebuilt->set_concept(0, key->i_star()[0], at::Tensor(), key->i_sup()[0]);
  EXPECT_TRUE(AllClose(rebuilt->o_star()[0], key->o_star()[0], 1e-5, 1e-5, "W_k i_sup"));
}

}  // namespace
}  // namespace perfusion

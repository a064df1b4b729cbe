#include "perfusion/rank1_edit.h"

#include <ATen/Functions.h>
#include <ATen/TensorIndexing.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/generated/variable_factories.h>
#include <torch/csrc/autograd/grad_mode.h>

namespace perfusion {
namespace {

// beta and tau as [K] float32 tensors on `device`.
// The dtype the gate math runs in: float64 for float64 inputs, float32 for everything else.
at::ScalarType ComputeType(const at::Tensor& X) { return X.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::pair<at::Tensor, at::Tensor> GateTensors(const std::vector<GateParams>& params, int64_t K, at::Device device,
                                              at::ScalarType type) {
  TORCH_CHECK_VALUE(params.size() == static_cast<size_t>(K) || params.size() == 1,
                    "rank1_edit: got ", params.size(), " gate parameter sets for ", K, " concepts (need ", K,
                    " or 1)");
  std::vector<double> beta(K), tau(K);
  for (int64_t c = 0; c < K; ++c) {
    const GateParams& p = params.size() == 1 ? params[0] : params[c];
    TORCH_CHECK_VALUE(p.temperature > 0, "rank1_edit: gate temperature of concept ", c, " must be > 0, got ",
                      p.temperature);
    beta[c] = p.beta;
    tau[c] = p.temperature;
  }
  auto opts = at::TensorOptions().dtype(at::kDouble);
  return {at::tensor(beta, opts).to(device, type), at::tensor(tau, opts).to(device, type)};
}

void CheckEncodings(const at::Tensor& X, int64_t D, const char* what) {
  TORCH_CHECK_VALUE(X.defined() && X.dim() == 3, "rank1_edit: ", what, " must be [B, N, D], got ",
                    X.defined() ? X.sizes() : c10::IntArrayRef{});
  TORCH_CHECK_VALUE(X.size(2) == D, "rank1_edit: ", what, " has width ", X.size(2), " but the projection takes ",
                    D, " (", what, " ", X.sizes(), ")");
  TORCH_CHECK_VALUE(X.is_floating_point(), "rank1_edit: ", what, " must be floating point, got ", X.scalar_type());
}

}  // namespace

void CheckGateRange(const GateParams& gate, const std::string& beta_name, const std::string& temperature_name) {
  TORCH_CHECK_VALUE(gate.beta >= 0 && gate.beta <= 1, beta_name, " must be in [0, 1], got ", gate.beta);
  TORCH_CHECK_VALUE(gate.temperature > 0 && gate.temperature <= 1, temperature_name, " must be in (0, 1], got ",
                    gate.temperature);
}

ConceptGates ComputeConceptGates(const at::Tensor& X, const at::Tensor& i_star, const at::Tensor& c_inv,
                                 const std::vector<GateParams>& params, MultiConceptMode mode) {
  TORCH_CHECK_VALUE(i_star.defined() && i_star.dim() == 2 && i_star.size(0) >= 1,
                    "rank1_edit: i_star must be [K, D] with K >= 1, got ",
                    i_star.defined() ? i_star.sizes() : c10::IntArrayRef{});
  const int64_t K = i_star.size(0), D = i_star.size(1);
  CheckEncodings(X, D, "X");
  TORCH_CHECK_VALUE(c_inv.dim() == 2 && c_inv.size(0) == D && c_inv.size(1) == D, "rank1_edit: c_inv must be [",
                    D, ", ", D, "], got ", c_inv.sizes());
  const at::ScalarType type = ComputeType(X);
  auto [beta, tau] = GateTensors(params, K, X.device(), type);
  const at::Tensor x = X.to(type);
  const at::Tensor I = i_star.to(X.device(), type);
  const at::Tensor A = at::matmul(I, c_inv.to(X.device(), type));  // [K, D] rows C^-1 i*_c (C symmetric)
  const at::Tensor energy = (A * I).sum(-1);                                // [K]
  TORCH_CHECK_VALUE((energy > 0).all().item<bool>(),
                    "rank1_edit: a concept has i*^T C^-1 i* <= 0 (untrained or zero i*)");
  const at::Tensor sim = at::matmul(x, A.t());  // [B, N, K]
  ConceptGates g;
  g.alpha = sim / energy;
  g.gate = at::sigmoid((g.alpha - beta) / tau);
  if (mode == MultiConceptMode::kApproximate || K == 1) {
    g.erase = g.alpha;
  } else {
    // kappa(e) = (I*^T C^-1 I*)^-1 I*^T C^-1 e, so that P e = sum_c kappa_c(e) i*_c. All in
    // float64: two concepts of one superclass have nearly parallel i*, their kappas are large with
    // opposite signs, and in float32 the erase term would cancel to noise.
    const at::Tensor I64 = I.to(at::kDouble);
    const at::Tensor A64 = at::matmul(I64, c_inv.to(X.device(), at::kDouble));  // [K, D]
    const at::Tensor gram = at::matmul(I64, A64.t());                             // [K, K]
    auto [L, info] = at::linalg_cholesky_ex(gram);
    TORCH_CHECK_VALUE(info.item<int64_t>() == 0,
                      "rank1_edit: the exact multi-concept form needs linearly independent i* vectors; the ", K,
                      " concepts' Gram matrix is singular (the same concept twice?)");
    // Nearly singular is refused too: Cholesky can succeed on a Gram whose smallest pivot is
    // rounding noise, and the coefficients are then ~1/pivot with no correct digit left. Scaled to
    // unit diagonal, a pivot^2 of 1e-12 is two i* at 1 - 5e-13 cosine in the C^-1 metric; at that
    // distance float64 still keeps about four digits of the erase term.
    const at::Tensor d = L.diagonal();
    const at::Tensor scale = gram.diagonal().sqrt();
    const double min_pivot2 = (d / scale).square().min().item<double>();
    TORCH_CHECK_VALUE(min_pivot2 >= 1e-12,
                      "rank1_edit: the exact multi-concept form needs linearly independent i* vectors; two of the ",
                      K, " concepts are parallel to within rounding (relative pivot ", min_pivot2,
                      "; the same concept twice?). Use the approximate form for them.");
    g.erase = at::matmul(at::matmul(X.to(at::kDouble), A64.t()), at::cholesky_inverse(L)).to(type);
  }
  return g;
}

at::Tensor ApplyRank1Edit(const at::Tensor& X, const at::Tensor& weight, const at::Tensor& i_star,
                          const at::Tensor& o_star, const ConceptGates& gates) {
  TORCH_CHECK_VALUE(weight.defined() && weight.dim() == 2, "rank1_edit: weight must be [O, D], got ",
                    weight.defined() ? weight.sizes() : c10::IntArrayRef{});
  CheckEncodings(X, weight.size(1), "X");
  if (!gates.erase.defined()) return at::matmul(X, weight.to(X.dtype()).t());  // [B, N, O]
  const int64_t K = i_star.size(0);
  TORCH_CHECK_VALUE(i_star.dim() == 2 && i_star.size(1) == weight.size(1), "rank1_edit: i_star ", i_star.sizes(),
                    " does not fit weight ", weight.sizes());
  TORCH_CHECK_VALUE(o_star.dim() == 2 && o_star.size(0) == K && o_star.size(1) == weight.size(0),
                    "rank1_edit: o_star must be [", K, ", ", weight.size(0), "], got ", o_star.sizes());
  TORCH_CHECK_VALUE(gates.erase.dim() == 3 && gates.erase.size(2) == K &&
                        gates.erase.size(0) == X.size(0) && gates.erase.size(1) == X.size(1),
                    "rank1_edit: gates ", gates.erase.sizes(), " were not computed for X ", X.sizes(), " and ", K,
                    " concepts");
  const at::ScalarType type = ComputeType(X);
  const at::Tensor w = weight.to(X.device(), type);
  const at::Tensor w_istar = at::matmul(i_star.to(X.device(), type), w.t());  // [K, O]
  const at::Tensor correction =
      at::matmul(gates.gate.to(type), o_star.to(X.device(), type)) - at::matmul(gates.erase.to(type), w_istar);
  if (X.scalar_type() == type) return at::matmul(X, w.t()) + correction;  // [B, N, O]
  // Half-precision input: at the concept token X W^T and the erase term nearly cancel, so both
  // are summed in float32 (the edit runs once per prompt at inference) and rounded once.
  return (at::matmul(X.to(type), w.t()) + correction).to(X.dtype());
}

at::Tensor ApplyRome(const at::Tensor& X, const at::Tensor& weight, const at::Tensor& i_star_row,
                     const at::Tensor& o_star_row, const at::Tensor& c_inv) {
  const at::Tensor I = i_star_row.reshape({1, -1});
  ConceptGates g = ComputeConceptGates(X, I, c_inv, {GateParams{}});
  g.gate = g.alpha;  // ROME: the write term uses the linear coefficient too
  return ApplyRank1Edit(X, weight, I, o_star_row.reshape({1, -1}), g);
}

at::Tensor InvertCovariance(const at::Tensor& C) {
  TORCH_CHECK_VALUE(C.dim() == 2 && C.size(0) == C.size(1), "covariance: C must be square, got ", C.sizes());
  const at::Tensor c = C.to(at::kCPU, at::kDouble);
  const double scale = c.abs().max().item<double>();
  TORCH_CHECK_VALUE(scale > 0 && std::isfinite(scale), "covariance: C is zero or not finite");
  TORCH_CHECK_VALUE((c - c.t()).abs().max().item<double>() <= 1e-6 * scale, "covariance: C is not symmetric");
  auto [L, info] = at::linalg_cholesky_ex(c);
  TORCH_CHECK_VALUE(info.item<int64_t>() == 0, "covariance: C is not positive definite (Cholesky failed at column ",
                    info.item<int64_t>(), "); estimate it from more text");
  return at::cholesky_inverse(L).to(C.device(), at::kFloat);
}

// ---------------------------------------------------------------------------------------------------
// Rank1EditImpl

Rank1EditImpl::Rank1EditImpl(const at::Tensor& weight, const at::Tensor& c_inv, Rank1EditOptions options,
                             int64_t num_concepts)
    : options_(options) {
  TORCH_CHECK_VALUE(weight.defined() && weight.dim() == 2, "Rank1Edit: weight must be [O, D], got ",
                    weight.defined() ? weight.sizes() : c10::IntArrayRef{});
  const int64_t O = weight.size(0), D = weight.size(1);
  TORCH_CHECK_VALUE(c_inv.defined() && c_inv.dim() == 2 && c_inv.size(0) == D && c_inv.size(1) == D,
                    "Rank1Edit: c_inv must be [", D, ", ", D, "] for weight ", weight.sizes(), ", got ",
                    c_inv.defined() ? c_inv.sizes() : c10::IntArrayRef{});
  TORCH_CHECK_VALUE(num_concepts >= 1, "Rank1Edit: num_concepts must be >= 1, got ", num_concepts);
  TORCH_CHECK_VALUE(options.input_decay() >= 0 && options.input_decay() < 1, "Rank1Edit: input_decay must be in [0, 1)");
  auto f32 = weight.options().dtype(at::kFloat);
  weight_ = register_buffer("weight", weight.detach());
  c_inv_ = register_buffer("c_inv", c_inv.detach().to(weight.device(), at::kFloat));
  i_star_ = register_buffer("i_star", at::zeros({num_concepts, D}, f32));
  i_sup_ = register_buffer("i_sup", at::zeros({num_concepts, D}, f32));
  initted_ = register_buffer("initted", at::zeros({num_concepts}, f32.dtype(at::kBool)));
  o_star_ = register_parameter("o_star", at::zeros({num_concepts, O}, f32), /*requires_grad=*/!options.is_key_proj());
}

bool Rank1EditImpl::initted(int64_t c) const {
  TORCH_CHECK_INDEX(c >= 0 && c < num_concepts(), "Rank1Edit: concept ", c, " out of range [0, ", num_concepts(), ")");
  return initted_[c].item<bool>();
}

at::Tensor Rank1EditImpl::training_forward(const at::Tensor& X, const at::Tensor& X_sup,
                                           const at::Tensor& concept_index, int64_t concept) {
  using at::indexing::Slice;
  const int64_t D = in_features();
  CheckEncodings(X, D, "X");
  CheckEncodings(X_sup, D, "X_sup");
  TORCH_CHECK_VALUE(X_sup.sizes() == X.sizes(), "Rank1Edit: X_sup ", X_sup.sizes(), " must match X ", X.sizes());
  TORCH_CHECK_VALUE(concept_index.dim() == 1 && concept_index.size(0) == X.size(0),
                    "Rank1Edit: concept_index must be [B] = [", X.size(0), "], got ", concept_index.sizes());
  TORCH_CHECK_VALUE(!concept_index.is_floating_point(), "Rank1Edit: concept_index must be an integer tensor");
  const at::Tensor idx = concept_index.to(X.device(), at::kLong);
  TORCH_CHECK_INDEX((idx >= 0).all().item<bool>() && (idx < X.size(1)).all().item<bool>(),
                    "Rank1Edit: concept_index out of range [0, ", X.size(1), ")");
  TORCH_CHECK_INDEX(concept >= 0 && concept < num_concepts(), "Rank1Edit: concept ", concept, " out of range");
  const double frac = options_.frac_gradient();
  // Forward value exactly X (X - X.detach() is exactly 0); gradient scaled by frac (spec §9.3 #16).
  const at::Tensor x = frac == 1.0 ? X : X.detach() + (X - X.detach()) * frac;
  const at::Tensor batch = at::arange(X.size(0), idx.options());
  const at::Tensor x_bar = x.index({batch, idx}).to(at::kFloat).mean(0);                      // [D]
  const at::Tensor x_sup_bar = X_sup.detach().index({batch, idx}).to(at::kFloat).mean(0);      // [D]
  const double d = options_.input_decay();
  {
    torch::NoGradGuard no_grad;
    const at::Tensor y_sup = at::matmul(weight_.to(at::kFloat), x_sup_bar);  // [O]
    const at::Tensor xb = x_bar.detach();
    if (!initted_[concept].item<bool>()) {
      o_star_[concept].copy_(y_sup);
      i_star_[concept].copy_(xb);
      i_sup_[concept].copy_(x_sup_bar);
      initted_[concept].fill_(true);
    } else {
      if (options_.is_key_proj()) o_star_[concept].mul_(d).add_(y_sup, 1.0 - d);
      i_star_[concept].mul_(d).add_(xb, 1.0 - d);
      i_sup_[concept].mul_(d).add_(x_sup_bar, 1.0 - d);
    }
  }
  at::Tensor i = i_star_[concept];
  if (options_.straight_through()) i = i + x_bar - x_bar.detach();
  const at::Tensor o = o_star_.index({Slice(concept, concept + 1)});
  const ConceptGates g = ComputeConceptGates(
      x, i.unsqueeze(0), c_inv_, {GateParams{options_.train_beta(), options_.train_temperature()}});
  return ApplyRank1Edit(x, weight_, i.unsqueeze(0), o, g);
}

at::Tensor Rank1EditImpl::forward(const at::Tensor& X, const std::vector<int64_t>& concepts,
                                  const std::vector<GateParams>& params) const {
  std::vector<int64_t> ids = concepts;
  if (ids.empty()) {
    for (int64_t c = 0; c < num_concepts(); ++c) ids.push_back(c);
  }
  for (size_t a = 0; a < ids.size(); ++a) {
    TORCH_CHECK_INDEX(ids[a] >= 0 && ids[a] < num_concepts(), "Rank1Edit: concept ", ids[a], " out of range [0, ",
                      num_concepts(), ")");
    TORCH_CHECK_VALUE(initted_[ids[a]].item<bool>(), "Rank1Edit: concept ", ids[a],
                      " is not trained or loaded; run training_forward or set_concept first");
    for (size_t b = 0; b < a; ++b) {
      TORCH_CHECK_VALUE(ids[a] != ids[b], "Rank1Edit: concept ", ids[a], " requested twice");
    }
  }
  std::vector<GateParams> p = params;
  if (p.empty()) p.push_back(GateParams{options_.eval_beta(), options_.eval_temperature()});
  const at::Tensor sel = at::tensor(ids, at::TensorOptions().dtype(at::kLong)).to(i_star_.device());
  const at::Tensor I = i_star_.index_select(0, sel);
  const at::Tensor O = o_star_.index_select(0, sel);
  const ConceptGates g = ComputeConceptGates(X, I, c_inv_, p, options_.multi_concept_mode());
  return ApplyRank1Edit(X, weight_, I, O, g);
}

void Rank1EditImpl::set_concept(int64_t c, const at::Tensor& i_star, const at::Tensor& o_star,
                                const at::Tensor& i_sup) {
  TORCH_CHECK_INDEX(c >= 0 && c < num_concepts(), "Rank1Edit: concept ", c, " out of range [0, ", num_concepts(), ")");
  const int64_t D = in_features(), O = out_features();
  TORCH_CHECK_VALUE(i_star.numel() == D, "Rank1Edit: i_star must have ", D, " values, got ", i_star.sizes());
  TORCH_CHECK_VALUE(!i_sup.defined() || i_sup.numel() == D, "Rank1Edit: i_sup must have ", D, " values, got ",
                    i_sup.sizes());
  TORCH_CHECK_VALUE(i_sup.defined() || o_star.defined(), "Rank1Edit: set_concept needs o_star or i_sup");
  torch::NoGradGuard no_grad;
  i_star_[c].copy_(i_star.reshape({D}));
  if (i_sup.defined()) i_sup_[c].copy_(i_sup.reshape({D}));
  if (o_star.defined()) {
    TORCH_CHECK_VALUE(o_star.numel() == O, "Rank1Edit: o_star must have ", O, " values, got ", o_star.sizes());
    o_star_[c].copy_(o_star.reshape({O}));
  } else {
    TORCH_CHECK_VALUE(options_.is_key_proj(), "Rank1Edit: a value projection needs its learned o_star");
    o_star_[c].copy_(at::matmul(weight_.to(at::kFloat), i_sup_[c]));
  }
  initted_[c].fill_(true);
}

Rank1Edit MergeRank1Edits(const std::vector<Rank1Edit>& edits) {
  TORCH_CHECK_VALUE(!edits.empty(), "MergeRank1Edits: nothing to merge");
  const auto& first = *edits[0];
  int64_t total = 0;
  for (size_t k = 0; k < edits.size(); ++k) {
    const auto& e = *edits[k];
    for (int64_t c = 0; c < e.num_concepts(); ++c) {
      TORCH_CHECK_VALUE(e.initted(c), "MergeRank1Edits: edit ", k, " concept ", c, " is not initialised");
    }
    TORCH_CHECK_VALUE(e.options().is_key_proj() == first.options().is_key_proj(),
                      "MergeRank1Edits: cannot merge key and value projections (edit ", k, ")");
    TORCH_CHECK_VALUE(e.weight().sizes() == first.weight().sizes() && at::equal(e.weight(), first.weight()),
                      "MergeRank1Edits: edit ", k, " wraps a different projection weight");
    TORCH_CHECK_VALUE(at::equal(e.c_inv(), first.c_inv()), "MergeRank1Edits: edit ", k, " uses a different C^-1");
    total += e.num_concepts();
  }
  Rank1Edit merged(first.weight(), first.c_inv(), first.options(), total);
  int64_t c = 0;
  for (const auto& e : edits) {
    for (int64_t j = 0; j < e->num_concepts(); ++j, ++c) {
      merged->set_concept(c, e->i_star()[j], e->o_star()[j].detach(), e->i_sup()[j]);
    }
  }
  return merged;
}

}  // namespace perfusion

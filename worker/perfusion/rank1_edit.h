// rank1_edit: Perfusion's key-locked, gated rank-1 edit of one cross-attention K or V projection.
//
// Ref: Tewel et al., "Key-Locked Rank One Editing for Text-to-Image Personalization" (SIGGRAPH 2023),
// Eq. (3) and Appendix B; ../shared/docs/perfusion-algorithm.md §1-§3 (the formulas below, and the
// reference implementation's bugs this port avoids: §8).
//
// For a frozen, bias-free projection W (O x D), covariance inverse C^-1 (D x D) and concepts c with
// target input i*_c (D) and target output o*_c (O):
//
//   alpha_c(e) = e^T C^-1 i*_c / (i*_c^T C^-1 i*_c)             (normalised similarity, alpha_c(i*_c) = 1)
//   g_c(e)     = sigmoid((alpha_c(e) - beta_c) / tau_c)          (the gate; beta/tau per concept)
//   one concept:   f(e) = W e - alpha(e) W i* + g(e) o*           (only the write term is gated)
//   approximate:   f(e) = W e - sum_c alpha_c(e) W i*_c + sum_c g_c(e) o*_c
//   exact:         f(e) = W (e - P e) + sum_c g_c(e) o*_c,  P = I* (I*^T C^-1 I*)^-1 I*^T C^-1
//
// Every token is edited independently. alpha, the gates and the exact projection coefficients do not
// depend on the layer (they use only C^-1 and i*), so ComputeConceptGates() runs once per prompt and
// ApplyRank1Edit() once per layer; the extra cost per layer is a rank-K correction of X W^T.
//
// Device/dtype: inputs may be fp32/fp16/bf16 (or fp64) on any device. The gate math (alpha, the
// projection coefficients, sigmoid) runs in float32 even for fp16/bf16 inputs (float64 for float64
// inputs; the exact multi-concept form runs wholly in float64), then the correction is cast to the input's
// dtype. A module holds C^-1 in float32.
//
// Thread safety: the free functions are pure. A Rank1Edit module's inference forward only reads its
// state and may run concurrently; training_forward() mutates it (one thread).
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <string>
#include <vector>

namespace perfusion {

// Gate parameters of one concept at inference.
struct GateParams {
  double beta = 0.7;
  double temperature = 0.15;
};

// The range a user may set (the service's API, the tools, a trained concept's default gate): beta in
// [0, 1], temperature in (0, 1]; a beta above 1 never opens the gate. The math itself takes any beta
// and any positive temperature (tests saturate the gate with beta = ±1e3). c10::ValueError naming
// `beta_name` or `temperature_name` otherwise.
void CheckGateRange(const GateParams& gate, const std::string& beta_name, const std::string& temperature_name);

enum class MultiConceptMode {
  kApproximate,  // sum of the per-concept edits (the reference's default); exact when the i* are
                 // pairwise C^-1-orthogonal
  kExact,        // C^-1-orthogonal projection onto span{i*_c} (Appendix B)
};

// Layer-independent, per-prompt quantities of a set of K concepts.
struct ConceptGates {
  at::Tensor erase;  // [B, N, K]: coefficient of W i*_c removed from each token's output
  at::Tensor alpha;  // [B, N, K]: alpha_c(e)
  at::Tensor gate;   // [B, N, K]: g_c(e)
  // (float32, or float64 for float64 inputs)
};

// Computes alpha, the gates and the erase coefficients of every token of X for concepts i_star.
// X: [B, N, D] (any float dtype); i_star: [K, D]; c_inv: [D, D]; params: K entries (or 1, shared).
// REQUIRES: K >= 1, every i*_c non-zero (E_c > 0); for kExact the i*_c linearly independent.
ConceptGates ComputeConceptGates(const at::Tensor& X, const at::Tensor& i_star, const at::Tensor& c_inv,
                                 const std::vector<GateParams>& params,
                                 MultiConceptMode mode = MultiConceptMode::kApproximate);

// Applies the edit of one projection:  Y = X W^T - erase (W I*^T)^T + gate O*.
// X: [B, N, D]; weight W: [O, D]; i_star: [K, D]; o_star: [K, O]; gates from ComputeConceptGates(X, ...)
// with the same concepts in the same order. Returns [B, N, O] in X's dtype. With K = 0 concepts
// (gates.erase undefined) returns X W^T.
at::Tensor ApplyRank1Edit(const at::Tensor& X, const at::Tensor& weight, const at::Tensor& i_star,
                          const at::Tensor& o_star, const ConceptGates& gates);

// Ungated ROME (spec §1.3) for one concept: W e + alpha(e) (o* - W i*). For tests and comparisons.
at::Tensor ApplyRome(const at::Tensor& X, const at::Tensor& weight, const at::Tensor& i_star_row,
                     const at::Tensor& o_star_row, const at::Tensor& c_inv);

// C^-1 from C: inverted in float64 (Cholesky), returned as float32. Throws if C is not symmetric
// positive definite (message gives the failing condition).
at::Tensor InvertCovariance(const at::Tensor& C);

struct Rank1EditOptions {
  // True for a K projection: its target output is locked to the superclass key W i_sup (an EMA over
  // training steps) and never receives a gradient. False for V: the target is learned.
  TORCH_ARG(bool, is_key_proj) = false;
  TORCH_ARG(double, train_beta) = 0.75;
  TORCH_ARG(double, train_temperature) = 0.1;
  TORCH_ARG(double, eval_beta) = 0.7;
  TORCH_ARG(double, eval_temperature) = 0.15;
  // EMA decay of i* (and of the superclass encoding that defines the K target).
  TORCH_ARG(double, input_decay) = 0.99;
  // Straight-through gradient for i*: the forward uses the EMA, the gradient flows as if i* were the
  // current batch mean (the reference's choice; marked "check with author" there).
  TORCH_ARG(bool, straight_through) = true;
  // Scales the gradient flowing back into the text encodings (the reference's 0.1 trick). Under Adam it
  // is a no-op; the recipe uses two learning rates instead, so the default is 1 (off).
  TORCH_ARG(double, frac_gradient) = 1.0;
  TORCH_ARG(MultiConceptMode, multi_concept_mode) = MultiConceptMode::kApproximate;
};

// A frozen bias-free projection W (registered as buffer "weight", never trained) with K concepts.
// State (registered names): buffers "weight" [O, D], "c_inv" [D, D], "i_star" [K, D], "i_sup" [K, D],
// "initted" [K] bool; "o_star" [K, O] is a parameter (requires_grad only for V projections).
//
//   Rank1Edit edit(weight, c_inv, Rank1EditOptions().is_key_proj(false));   // K = 1 concept
//   auto y = edit->training_forward(X, X_sup, idx);                          // training step
//   edit->eval();  auto y2 = edit->forward(X);                               // inference, eval beta/tau
class Rank1EditImpl : public torch::nn::Module {
 public:
  // REQUIRES: weight [O, D], c_inv [D, D], num_concepts >= 1.
  Rank1EditImpl(const at::Tensor& weight, const at::Tensor& c_inv, Rank1EditOptions options = {},
                int64_t num_concepts = 1);

  // Training forward (spec §1.7) for concept `concept` (default 0): updates i* and the superclass EMA
  // from the batch means at the concept indices, copies (first step) or EMAs (K) the target, then
  // returns the gated edit of every token with the training beta/tau.
  // X, X_sup: [B, N, D] encodings of the concept prompts and of the same prompts with the superclass
  // word; concept_index: [B] int64, position of the (first) concept token in each prompt.
  at::Tensor training_forward(const at::Tensor& X, const at::Tensor& X_sup, const at::Tensor& concept_index,
                              int64_t concept = 0);

  // Inference forward: all concepts (or `concepts`, in that order), each with the eval beta/tau unless
  // `params` is given (one entry per concept, or one shared). X: [B, N, D] -> [B, N, O].
  // REQUIRES: every requested concept initialised (trained or loaded), else c10::Error.
  at::Tensor forward(const at::Tensor& X, const std::vector<int64_t>& concepts = {},
                     const std::vector<GateParams>& params = {}) const;

  // Sets concept `c`'s state (e.g. when loading a trained concept) and marks it initialised.
  // i_star, i_sup: [D]; o_star: [O]. For a K projection o_star may be undefined: then W i_sup.
  // i_sup may be undefined when o_star is given (it is then left as it was).
  void set_concept(int64_t c, const at::Tensor& i_star, const at::Tensor& o_star, const at::Tensor& i_sup);

  int64_t num_concepts() const { return i_star_.size(0); }
  int64_t in_features() const { return weight_.size(1); }
  int64_t out_features() const { return weight_.size(0); }
  bool initted(int64_t c) const;
  const Rank1EditOptions& options() const { return options_; }
  const at::Tensor& weight() const { return weight_; }
  const at::Tensor& c_inv() const { return c_inv_; }
  const at::Tensor& i_star() const { return i_star_; }
  const at::Tensor& i_sup() const { return i_sup_; }
  const at::Tensor& o_star() const { return o_star_; }
  at::Tensor& o_star() { return o_star_; }

 private:
  Rank1EditOptions options_;
  at::Tensor weight_, c_inv_, i_star_, i_sup_, initted_, o_star_;
};
TORCH_MODULE(Rank1Edit);

// Merges separately trained edits of the same projection into one multi-concept edit. Concept k of the
// result is the k-th concept in argument order (the same order the embedding merge uses). Checks that
// every edit is initialised, that all are K or all V, and that they share W and C^-1 (same values).
Rank1Edit MergeRank1Edits(const std::vector<Rank1Edit>& edits);

}  // namespace perfusion

// perfusion-rank1-demo: trains one key-locked rank-1 edit (a V projection at SD 1.5 width) on
// synthetic text encodings and prints what it learned: that the concept's tokens now produce the
// learned value, and that every other token is left (almost) untouched.
//
//   perfusion-rank1-demo [--steps 200] [--out-dim 320] [--seed 0] [--covariance FILE]
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/optim/adam.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <sys/stat.h>

#include "perfusion/concept.h"
#include "perfusion/covariance.h"
#include "perfusion/rank1_edit.h"
#include "tools/tool_args.h"

using namespace perfusion;

namespace {

void Usage() {
  std::printf(
      "perfusion-rank1-demo: train one gated rank-1 edit on synthetic encodings\n\n"
      "  --steps N         optimiser steps (default 200)\n"
      "  --out-dim O       projection output width (default 320)\n"
      "  --seed S          random seed (default 0)\n"
      "  --covariance F    safetensors file with tensor C [768,768] (default: the shipped SD 1.5 one if\n"
      "                    ../shared is present, else a random well-conditioned C)\n");
}

}  // namespace

int main(int argc, char** argv) {
  int steps = 200;
  int64_t O = 320, seed = 0;
  std::string cov_path = std::string(PERFUSION_DEFAULT_SHARED) + "/data/sd15/clip_vit_l14_covariance.safetensors";
  if (auto code = ParseToolArgs(argc, argv, Usage, [&](const std::string& k, const NextValue& v) {
        if (k == "--steps") steps = ParseInt(v());
        else if (k == "--out-dim") O = ParseInt64(v());
        else if (k == "--seed") seed = ParseInt64(v());
        else if (k == "--covariance") cov_path = v();
        else return false;
        return true;
      })) {
    return *code;
  }
  if (steps <= 0 || O <= 0) {
    std::fprintf(stderr, "--steps and --out-dim must be > 0\n");
    return 2;
  }
  try {
    at::manual_seed(seed);
    const int64_t D = 768;
    at::Tensor C;
    struct stat st;
    if (::stat(cov_path.c_str(), &st) == 0) {
      C = LoadCovariance(cov_path);
      std::printf("covariance: %s\n", cov_path.c_str());
    } else {
      at::Tensor a = at::randn({D, D});
      C = at::matmul(a, a.t()) / D + at::eye(D);
      std::printf("covariance: random (no file at %s)\n", cov_path.c_str());
    }
    const at::Tensor c_inv = InvertCovariance(C);
    // Encodings e ~ N(0, C/20), like CLIP outputs for ~20-token captions.
    const at::Tensor L = at::linalg_cholesky(C.to(at::kDouble) / 20).to(at::kFloat);
    auto sample = [&](int64_t b, int64_t n) { return at::matmul(at::randn({b, n, D}), L.t()); };
    const at::Tensor W = at::randn({O, D}) * 0.04;
    const at::Tensor concept_dir = sample(1, 1).reshape({D}) * 1.5;  // where the concept token lands
    const at::Tensor superclass_dir = concept_dir + sample(1, 1).reshape({D}) * 0.3;
    const at::Tensor target_value = at::randn({O});                    // what the concept should look like
    Rank1Edit edit(W, c_inv, Rank1EditOptions().is_key_proj(false));
    torch::optim::Adam opt({edit->o_star()}, torch::optim::AdamOptions(0.03));
    const int64_t B = 4, N = 16, idx_pos = 5;
    at::Tensor idx = at::full({B}, idx_pos, at::kLong);
    std::printf("training a V edit %lldx%lld for %d steps (gate beta=0.75 tau=0.1)\n", (long long)O, (long long)D, steps);
    for (int s = 1; s <= steps; ++s) {
      at::Tensor X = sample(B, N);
      at::Tensor X_sup = X.clone();
      X.select(1, idx_pos).copy_(concept_dir + sample(B, 1).squeeze(1) * 0.05);
      X_sup.select(1, idx_pos).copy_(superclass_dir.expand({B, D}));
      at::Tensor y = edit->training_forward(X, X_sup, idx);
      // Concept tokens should produce the target value; the rest the original projection.
      at::Tensor want = at::matmul(X, W.t());
      want.select(1, idx_pos).copy_(target_value.expand({B, O}));
      at::Tensor loss = (y - want).pow(2).mean();
      opt.zero_grad();
      loss.backward();
      opt.step();
      if (s == 1 || s % 50 == 0 || s == steps) std::printf("  step %4d  loss %.5f\n", s, loss.item<float>());
    }
    edit->eval();
    torch::NoGradGuard ng;
    at::Tensor X = sample(64, N);
    X.select(1, idx_pos).copy_(concept_dir + sample(64, 1).squeeze(1) * 0.05);
    at::Tensor y = edit->forward(X);
    at::Tensor plain = at::matmul(X, W.t());
    ConceptGates g = ComputeConceptGates(X, edit->i_star(), c_inv, {GateParams{0.7, 0.15}});
    at::Tensor mask = at::zeros({N}, at::kBool);
    mask[idx_pos] = true;
    const double gate_concept = g.gate.select(1, idx_pos).mean().item<double>();
    const double gate_other = g.gate.index({at::indexing::Slice(), ~mask}).mean().item<double>();
    const double cos = at::cosine_similarity(y.select(1, idx_pos), target_value.expand({64, O}), 1).mean().item<double>();
    const double rel_change_other = ((y - plain).index({at::indexing::Slice(), ~mask}).norm() /
                                     plain.index({at::indexing::Slice(), ~mask}).norm()).item<double>();
    std::printf("\nwhat it learned (eval gate beta=0.7 tau=0.15, 64 fresh prompts x %lld tokens):\n", (long long)N);
    std::printf("  mean gate at the concept token     %.3f\n", gate_concept);
    std::printf("  mean gate at other tokens          %.5f\n", gate_other);
    std::printf("  cosine(output, learned value) at the concept token  %.3f\n", cos);
    std::printf("  relative change of other tokens' outputs            %.4f\n", rel_change_other);
    // The learned state in the concept blob's terms: what a concept costs to store.
    Concept c;
    c.name = "demo";
    c.superclass = "dog";
    c.base_model_id = "synthetic";
    c.layers = {{"demo.attn2", O}};
    c.embedding = at::zeros({D});
    c.i_star = edit->i_star()[0];
    c.i_sup = edit->i_sup()[0];
    c.v_targets = edit->o_star().detach()[0];
    std::printf("  concept blob for this one layer: %zu bytes (fp16)\n", EncodeConcept(c).size());
    return 0;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what_without_backtrace());
    return 1;
   } catch (const std::exception& e) {
    std::fprintf(stderr, "\nerror: %s\n", e.what());
    return 1;
  }

}

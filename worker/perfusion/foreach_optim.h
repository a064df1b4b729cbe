// Multi-tensor ("foreach") forms of two per-step updates of the trainers: AdamW's step and a
// weights' EMA. Each runs one ATen call per operation over all the tensors of a parameter group
// instead of one per tensor. On a GPU a small model's step is bound by kernel launches, not
// arithmetic: the tiny UNet has a few hundred parameter tensors, so torch::optim::AdamW::step alone
// issues thousands of launches per step. On the CPU ATen runs the same per-tensor kernels, so the
// results are bit for bit those of the plain loops (a test checks).
#ifndef PERFUSION_WORKER_PERFUSION_FOREACH_OPTIM_H_
#define PERFUSION_WORKER_PERFUSION_FOREACH_OPTIM_H_

#include <ATen/core/Tensor.h>
#include <torch/optim/adamw.h>

#include <vector>

namespace perfusion {

// Performs `opt.step()`, updating the optimizer's own state (its step counts and moments), so
// torch::save / torch::load of `opt` are unchanged. Falls back to `opt.step()` itself when the
// state is not there yet (the first step), uses amsgrad, or has unequal step counts within a
// group; returns whether the multi-tensor path ran.
bool ForeachAdamWStep(torch::optim::AdamW& opt);

// avg[i] = decay * avg[i] + (1 - decay) * live[i], for every i (live detached).
void ForeachEmaUpdate(std::vector<at::Tensor>& avg, const std::vector<at::Tensor>& live, double decay);

// The trainers' steps: the multi-tensor forms above where the tensors live off the CPU (a GPU,
// where a small model's step is bound by kernel launches; PyTorch's optimizers default to the same
// on CUDA), torch's own per-tensor loops on the CPU, which are faster there. The same numbers either
// way. The device is the first parameter's (the first average's).
void AdamWStep(torch::optim::AdamW& opt);
void EmaUpdate(std::vector<at::Tensor>& avg, const std::vector<at::Tensor>& live, double decay);

}  // namespace perfusion

#endif  // PERFUSION_WORKER_PERFUSION_FOREACH_OPTIM_H_

#include "perfusion/foreach_optim.h"

#include <ATen/Functions.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <cmath>
#include <sstream>
#include <string>
#include <type_traits>

namespace perfusion {
namespace {

// The key of a parameter's state in torch::optim::Optimizer::state(): the TensorImpl's address as a
// string in LibTorch 1.x, the address itself in 2.x.
template <typename Map>
typename Map::key_type StateKey(const Map&, const at::Tensor& p) {
  using Key = typename Map::key_type;
  if constexpr (std::is_same_v<Key, std::string>) {
    std::ostringstream os;
    os << static_cast<const void*>(p.unsafeGetTensorImpl());
    return os.str();
  } else {
    return reinterpret_cast<Key>(p.unsafeGetTensorImpl());
  }
}

struct GroupLists {
  torch::optim::AdamWOptions* options = nullptr;
  std::vector<torch::optim::AdamWParamState*> states;
  std::vector<at::Tensor> params, grads, exp_avg, exp_avg_sq;
};

}  // namespace

bool ForeachAdamWStep(torch::optim::AdamW& opt) {
  auto& state = opt.state();
  std::vector<GroupLists> groups;
  for (auto& group : opt.param_groups()) {
    GroupLists g;
    g.options = &static_cast<torch::optim::AdamWOptions&>(group.options());
    if (g.options->amsgrad()) {
      opt.step();
      return false;
    }
    for (const auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      TORCH_CHECK(!p.grad().is_sparse(), "ForeachAdamWStep: sparse gradients are not supported");
      const auto it = state.find(StateKey(state, p));
      if (it == state.end()) {
        opt.step();
        return false;
      }
      auto* s = static_cast<torch::optim::AdamWParamState*>(it->second.get());
      if (!g.states.empty() && s->step() != g.states[0]->step()) {
        opt.step();
        return false;
      }
      g.states.push_back(s);
      g.params.push_back(p);
      g.grads.push_back(p.grad());
      g.exp_avg.push_back(s->exp_avg());
      g.exp_avg_sq.push_back(s->exp_avg_sq());
    }
    groups.push_back(std::move(g));
  }
  torch::NoGradGuard no_grad;
  for (auto& g : groups) {
    if (g.params.empty()) continue;
    for (auto* s : g.states) s->step(s->step() + 1);
    const auto& o = *g.options;
    const double lr = o.lr(), beta1 = std::get<0>(o.betas()), beta2 = std::get<1>(o.betas());
    const double step = static_cast<double>(g.states[0]->step());
    // torch::optim::AdamW::step's order of operations, one tensor list at a time.
    if (o.weight_decay() != 0) at::_foreach_mul_(g.params, 1 - lr * o.weight_decay());
    const double bias_correction1 = 1 - std::pow(beta1, step);
    const double bias_correction2 = 1 - std::pow(beta2, step);
    at::_foreach_mul_(g.exp_avg, beta1);
    at::_foreach_add_(g.exp_avg, g.grads, 1 - beta1);
    at::_foreach_mul_(g.exp_avg_sq, beta2);
    at::_foreach_addcmul_(g.exp_avg_sq, g.grads, g.grads, 1 - beta2);
    std::vector<at::Tensor> denom = at::_foreach_sqrt(g.exp_avg_sq);
    at::_foreach_div_(denom, std::sqrt(bias_correction2));
    at::_foreach_add_(denom, o.eps());
    at::_foreach_addcdiv_(g.params, g.exp_avg, denom, -lr / bias_correction1);
  }
  return true;
}

void ForeachEmaUpdate(std::vector<at::Tensor>& avg, const std::vector<at::Tensor>& live, double decay) {
  TORCH_CHECK(avg.size() == live.size(), "ForeachEmaUpdate: ", avg.size(), " averages for ", live.size(), " tensors");
  if (avg.empty()) return;
  torch::NoGradGuard no_grad;
  std::vector<at::Tensor> detached;
  detached.reserve(live.size());
  for (const auto& t : live) detached.push_back(t.detach());
  at::_foreach_mul_(avg, decay);
  at::_foreach_add_(avg, detached, 1 - decay);
}

void AdamWStep(torch::optim::AdamW& opt) {
  const auto& groups = opt.param_groups();
  const bool on_cpu = groups.empty() || groups[0].params().empty() || groups[0].params()[0].device().is_cpu();
  if (on_cpu) {
    opt.step();
  } else {
    ForeachAdamWStep(opt);
  }
}

void EmaUpdate(std::vector<at::Tensor>& avg, const std::vector<at::Tensor>& live, double decay) {
  if (!avg.empty() && !avg[0].device().is_cpu()) return ForeachEmaUpdate(avg, live, decay);
  TORCH_CHECK(avg.size() == live.size(), "EmaUpdate: ", avg.size(), " averages for ", live.size(), " tensors");
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < live.size(); ++i) avg[i].mul_(decay).add_(live[i].detach(), 1.0 - decay);
}

}  // namespace perfusion

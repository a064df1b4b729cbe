#include "perfusion/module_io.h"

#include <c10/util/Exception.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <map>
#include <sstream>

#include "perfusion/safetensors.h"

namespace perfusion {

std::vector<std::pair<std::string, at::Tensor>> StateDict(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& p : module.named_parameters(/*recurse=*/true)) out.emplace_back(p.key(), p.value());
  for (const auto& b : module.named_buffers(/*recurse=*/true)) out.emplace_back(b.key(), b.value());
  return out;
}

std::vector<std::pair<std::string, std::vector<int64_t>>> Manifest(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> out;
  for (const auto& [name, t] : StateDict(module)) out.emplace_back(name, t.sizes().vec());
  return out;
}

namespace {
std::string ShapeStr(c10::IntArrayRef s) {
  std::ostringstream ss;
  ss << s;
  return ss.str();
}
}  // namespace

void LoadStateDict(torch::nn::Module& module, const SafetensorsReader& file, const LoadOptions& options) {
  auto state = StateDict(module);
  std::map<std::string, at::Tensor> targets(state.begin(), state.end());
  std::map<std::string, std::string> source_of;  // module name -> file name
  std::vector<std::string> unexpected, misshaped, missing, wrong_dtype;
  for (const auto& file_name : file.names()) {
    std::string name = file_name;
    if (!options.strip_prefix.empty()) {
      if (name.rfind(options.strip_prefix, 0) != 0) {
        unexpected.push_back(file_name);
        continue;
      }
      name = name.substr(options.strip_prefix.size());
    }
    if (options.rename) name = options.rename(name);
    if (name.empty()) continue;
    auto it = targets.find(name);
    if (it == targets.end()) {
      unexpected.push_back(file_name);
      continue;
    }
    const auto& info = file.info(file_name);
    if (c10::IntArrayRef(info.shape) != it->second.sizes()) {
      misshaped.push_back(file_name + " (file " + ShapeStr(info.shape) + ", model " + ShapeStr(it->second.sizes()) + ")");
      continue;
    }
    // Floating weights into floating tensors (any precision), anything else only into its own dtype:
    // checked here, with the rest, so nothing is modified unless the whole file fits.
    const bool file_float = info.dtype == "F16" || info.dtype == "BF16" || info.dtype == "F32" || info.dtype == "F64";
    if (file_float != it->second.is_floating_point()) {
      wrong_dtype.push_back(file_name + " (file " + info.dtype + ", model " + std::string(c10::toString(it->second.scalar_type())) + ")");
      continue;
    }
    if (!source_of.emplace(name, file_name).second) unexpected.push_back(file_name + " (duplicate of " + source_of[name] + ")");
  }
  for (const auto& [name, t] : state) {
    if (!source_of.count(name) && !options.optional.count(name)) missing.push_back(name);
  }
  if (!missing.empty() || !unexpected.empty() || !misshaped.empty() || !wrong_dtype.empty()) {
    std::ostringstream ss;
    ss << file.path() << " does not fit the model:";
    auto list = [&ss](const char* what, const std::vector<std::string>& v) {
      if (v.empty()) return;
      ss << " " << v.size() << " " << what << " [";
      for (size_t i = 0; i < v.size(); ++i) {
        if (i == 20) {
          ss << ", ... " << (v.size() - 20) << " more";
          break;
        }
        ss << (i ? ", " : "") << v[i];
      }
      ss << "];";
    };
    list("missing", missing);
    list("unexpected", unexpected);
    list("mis-shaped", misshaped);
    list("of the wrong dtype", wrong_dtype);
    TORCH_CHECK_VALUE(false, ss.str());
  }
  torch::NoGradGuard no_grad;
  for (const auto& [name, file_name] : source_of) {
    at::Tensor& dst = targets.at(name);
    dst.copy_(file.get(file_name));
  }
}

void LoadStateDict(torch::nn::Module& module, const std::string& path, const LoadOptions& options) {
  auto reader = SafetensorsReader::Open(path);
  LoadStateDict(module, *reader, options);
}

void SaveStateDict(const torch::nn::Module& module, const std::string& path,
                   const std::map<std::string, std::string>& metadata) {
  SaveSafetensors(path, StateDict(module), metadata);
}

}  // namespace perfusion

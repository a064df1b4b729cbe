// module_io: a torch::nn::Module's state dict (parameters + buffers, by dotted name) read from and
// written to safetensors, with one clear error for a folder whose tensors do not fit the model.
//
// Names are the module tree's registered names, which the model parts choose to equal the
// checkpoint's (diffusers) names, so loading is a lookup. Name translation (e.g. the legacy VAE
// attention names) is done by a `rename` callback, in one place (see name_conversion.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <functional>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace perfusion {

class SafetensorsReader;

// (name, tensor) of every parameter and buffer, in registration order.
std::vector<std::pair<std::string, at::Tensor>> StateDict(const torch::nn::Module& module);

// (name, shape) of every parameter and buffer: what a checkpoint for this module must contain.
std::vector<std::pair<std::string, std::vector<int64_t>>> Manifest(const torch::nn::Module& module);

struct LoadOptions {
  // Names the module has but a file may lack (e.g. "text_model.embeddings.position_ids").
  std::set<std::string> optional;
  // Maps a name in the file to the module's name; return "" to ignore that tensor.
  std::function<std::string(const std::string&)> rename;
  // Prefix stripped from file names before matching ("" = none); names without it are unexpected.
  std::string strip_prefix;
};

// Copies the file's tensors into the module (converted to each parameter's dtype and device), under
// NoGradGuard. Strict: throws c10::ValueError listing, in one message, every missing, unexpected and
// mis-shaped tensor (and the file's path). Nothing is modified unless the whole file fits.
void LoadStateDict(torch::nn::Module& module, const SafetensorsReader& file, const LoadOptions& options = {});
void LoadStateDict(torch::nn::Module& module, const std::string& path, const LoadOptions& options = {});

// Writes the module's state dict to a safetensors file (atomically), with `metadata`.
void SaveStateDict(const torch::nn::Module& module, const std::string& path,
                   const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

}  // namespace perfusion

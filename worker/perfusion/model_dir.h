// model_dir: a Stable Diffusion 1.x model folder in diffusers layout, loaded into the engine's parts.
//
//   <dir>/model_index.json
//   <dir>/text_encoder/{config.json, model.safetensors}
//   <dir>/unet/{config.json, diffusion_pytorch_model.safetensors}
//   <dir>/vae/{config.json, diffusion_pytorch_model.safetensors}     (legacy attention names accepted)
//   <dir>/scheduler/scheduler_config.json
//   <dir>/tokenizer/{vocab.json, merges.txt}
//   <dir>/perfusion/covariance.safetensors     (C of the text encoder; needed to train or apply concepts)
//   <dir>/perfusion/model_id                   (optional: the id concepts record; else derived, see below)
//   <dir>/perfusion/inference.json             (optional: {"key_lock": "global" | "local"}, the key-locking
//                                               a request gets when it names none; absent: local, the
//                                               paper's default for SD; the tiny model ships "global",
//                                               chosen by its own evaluation, docs/quality.md)
// Weight files may also be named "*.fp16.safetensors" (diffusers' fp16 variant).
//
// A folder with missing files, or tensors that are missing, unexpected or mis-shaped, fails with one
// c10::ValueError listing every problem. The tokenizer files are looked up in <dir>/tokenizer, then
// options.tokenizer_dir, then $PERFUSION_CLIP_VOCAB_DIR (the CLIP vocabulary is the same for every
// SD 1.x model; the shipped tiny model does not duplicate it).
//
// Model id: the content of perfusion/model_id if present, else "<folder name>-<crc32c>" over the
// configs, the safetensors headers, the first and last 64 KiB of each weight file and its attn2 K/V and token-embedding tensors: cheap, stable,
// and different for a fine-tune with the same shapes.
//
// Thread safety: a loaded model is read-only during inference and may be shared by threads.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <memory>
#include <string>

#include "perfusion/clip_text.h"
#include "perfusion/scheduler.h"
#include "perfusion/tokenizer.h"
#include "perfusion/unet.h"
#include "perfusion/vae.h"

namespace perfusion {

struct ModelDirOptions {
  c10::Device device = c10::Device(c10::kCPU);
  at::ScalarType dtype = at::ScalarType::Float;
  std::string tokenizer_dir;    // fallback folder with vocab.json + merges.txt
  // false: the covariance is not loaded (for tools that compute it); concepts cannot be used.
  bool require_covariance = true;
  bool load_vae = true;
};

struct StableDiffusion {
  std::string dir;
  std::string model_id;
  std::shared_ptr<const ClipTokenizer> tokenizer;
  CLIPTextModel text_encoder{nullptr};
  UNet2DConditionModel unet{nullptr};
  AutoencoderKL vae{nullptr};
  SchedulerConfig scheduler;
  at::Tensor covariance;  // [D, D] float32 (undefined if absent and not required)
  at::Tensor c_inv;       // [D, D] float32 on the model's device
  bool default_global_key_lock = false;  // perfusion/inference.json "key_lock"
  c10::Device device = c10::Device(c10::kCPU);
  at::ScalarType dtype = at::ScalarType::Float;

  int64_t text_dim() const;        // D: the text encoder's hidden size (= the UNet's cross-attention width)
  int64_t latent_channels() const;
  int64_t image_size() const;      // the UNet's sample_size times the VAE's downsampling factor
};

// Loads a model folder. All modules are put in eval mode with requires_grad off.
std::shared_ptr<StableDiffusion> LoadModelDir(const std::string& dir, const ModelDirOptions& options = {});

// Writes `model` in the layout above (configs, safetensors weights in `dtype`, scheduler config,
// covariance and model_id if set). The tokenizer files are not written.
void SaveModelDir(const StableDiffusion& model, const std::string& dir, at::ScalarType dtype = at::ScalarType::Float);

// Configs as JSON text (diffusers / transformers key names).
std::string ClipTextConfigJson(const CLIPTextModelOptions& options);
std::string VaeConfigJson(const AutoencoderKLOptions& options);
std::string SchedulerConfigJson(const SchedulerConfig& config);

}  // namespace perfusion

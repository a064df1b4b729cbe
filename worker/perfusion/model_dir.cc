#include "perfusion/model_dir.h"

#include <ATen/Functions.h>
#include <c10/util/Exception.h>
#include <sys/stat.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <vector>

#include "perfusion/concept.h"
#include "perfusion/covariance.h"
#include "perfusion/json_text.h"
#include "perfusion/module_io.h"
#include "perfusion/name_conversion.h"
#include "perfusion/rank1_edit.h"
#include "perfusion/safetensors.h"

namespace perfusion {
namespace {

bool Exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

// The weight file of a part: the plain name, else the fp16 variant; "" if neither exists.
std::string WeightFile(const std::string& part_dir, const std::string& stem) {
  for (const std::string& name : {stem + ".safetensors", stem + ".fp16.safetensors"}) {
    if (Exists(part_dir + "/" + name)) return part_dir + "/" + name;
  }
  return "";
}

std::string Basename(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  auto pos = path.rfind('/');
  return pos == std::string::npos ? path : path.substr(pos + 1);
}

// CRC-32C over the configs and, for each weight file: its whole safetensors header (names, shapes,
// offsets), its first and last 64 KiB, and every byte of the tensors Perfusion depends on directly
// (the cross-attention K/V projections it edits, and the token embedding table). A fine-tune that
// changes only those (Custom Diffusion trains exactly attn2 K/V; a merged attention LoRA) gets its
// own id, so a concept trained on the base is not silently accepted on it. A fine-tune of other
// weights alone may still share the base's id: such a folder should write perfusion/model_id.
std::string DerivedModelId(const std::string& dir, const std::vector<std::string>& files) {
  uint32_t crc = 0;
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    if (!in) continue;
    in.seekg(0, std::ios::end);
    const std::streamoff size = in.tellg();
    std::string buf;
    auto read_at = [&](std::streamoff off, std::streamoff n) {
      buf.resize(static_cast<size_t>(n));
      in.seekg(off);
      in.read(buf.data(), n);
      crc = Crc32c(buf.data(), static_cast<size_t>(in.gcount()), crc);
    };
    const std::streamoff chunk = 64 << 10;
    if (size <= 2 * chunk) {
      read_at(0, size);
      continue;
    }
    read_at(0, chunk);
    read_at(size - chunk, chunk);
    if (f.size() < 12 || f.compare(f.size() - 12, 12, ".safetensors") != 0) continue;
    const auto reader = SafetensorsReader::Open(f);  // validates the header
    const std::streamoff data_start = static_cast<std::streamoff>(reader->data_start());
    read_at(0, data_start);
    for (const std::string& name : reader->names()) {
      if (name.find("attn2.to_k") == std::string::npos && name.find("attn2.to_v") == std::string::npos &&
          name.find("token_embedding") == std::string::npos) {
        continue;
      }
      const SafetensorInfo& info = reader->info(name);
      read_at(data_start + static_cast<std::streamoff>(info.begin), static_cast<std::streamoff>(info.end - info.begin));
    }
  }
  char hex[16];
  std::snprintf(hex, sizeof(hex), "%08x", crc);
  return Basename(dir) + "-" + hex;
}

void Freeze(torch::nn::Module& m) {
  for (auto& p : m.parameters()) p.set_requires_grad(false);
  m.eval();
}

std::string ReadText(const std::string& path) {
  std::string s = ReadFileToString(path);
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ' || s.back() == '\r')) s.pop_back();
  return s;
}

}  // namespace

int64_t StableDiffusion::text_dim() const { return text_encoder->options().hidden_size(); }
int64_t StableDiffusion::latent_channels() const { return unet->config().in_channels; }
int64_t StableDiffusion::image_size() const {
  const int64_t f = vae ? vae->downsample_factor() : 8;
  return unet->config().sample_size * f;
}

std::shared_ptr<StableDiffusion> LoadModelDir(const std::string& dir, const ModelDirOptions& options) {
  auto model = std::make_shared<StableDiffusion>();
  model->dir = dir;
  model->device = options.device;
  model->dtype = options.dtype;
  TORCH_CHECK_VALUE(Exists(dir), "model folder ", dir, " does not exist");

  // Collect every missing file first, so one error lists them all.
  std::vector<std::string> missing;
  auto need = [&](const std::string& path) {
    if (!Exists(path)) missing.push_back(path);
    return path;
  };
  const std::string te_config = need(dir + "/text_encoder/config.json");
  const std::string unet_config = need(dir + "/unet/config.json");
  const std::string sched_config = need(dir + "/scheduler/scheduler_config.json");
  std::string te_weights = WeightFile(dir + "/text_encoder", "model");
  if (te_weights.empty()) missing.push_back(dir + "/text_encoder/model.safetensors");
  std::string unet_weights = WeightFile(dir + "/unet", "diffusion_pytorch_model");
  if (unet_weights.empty()) missing.push_back(dir + "/unet/diffusion_pytorch_model.safetensors");
  std::string vae_config, vae_weights;
  if (options.load_vae) {
    vae_config = need(dir + "/vae/config.json");
    vae_weights = WeightFile(dir + "/vae", "diffusion_pytorch_model");
    if (vae_weights.empty()) missing.push_back(dir + "/vae/diffusion_pytorch_model.safetensors");
  }
  const std::string cov_path = dir + "/perfusion/covariance.safetensors";
  if (options.require_covariance) need(cov_path);
  std::string tok_dir;
  for (const std::string& cand : {dir + "/tokenizer", options.tokenizer_dir,
                                  std::string(std::getenv("PERFUSION_CLIP_VOCAB_DIR") ? std::getenv("PERFUSION_CLIP_VOCAB_DIR") : "")}) {
    if (!cand.empty() && Exists(cand + "/vocab.json") && Exists(cand + "/merges.txt")) {
      tok_dir = cand;
      break;
    }
  }
  if (tok_dir.empty()) {
    missing.push_back(dir + "/tokenizer/{vocab.json,merges.txt} (or set tokenizer_dir / PERFUSION_CLIP_VOCAB_DIR)");
  }
  if (!missing.empty()) {
    std::ostringstream ss;
    ss << "model folder " << dir << " is incomplete; missing:";
    for (const auto& m : missing) ss << "\n  " << m;
    TORCH_CHECK_VALUE(false, ss.str());
  }

  model->tokenizer = ClipTokenizer::Load(tok_dir);
  model->scheduler = SchedulerConfig::FromJsonFile(sched_config);
  // As diffusers' StableDiffusionPipeline does for outdated scheduler configs (many DreamBooth-era
  // SD 1.x folders ship them): steps_offset must be 1 and clip_sample false, or the folder samples
  // other timesteps (980...0) or clamps its latents, and its images differ from diffusers'.
  if (model->scheduler.steps_offset != 1) {
    std::fprintf(stderr, "model folder %s: scheduler steps_offset %lld is outdated; using 1, as diffusers does\n",
                 dir.c_str(), static_cast<long long>(model->scheduler.steps_offset));
    model->scheduler.steps_offset = 1;
  }
  if (model->scheduler.clip_sample) {
    std::fprintf(stderr, "model folder %s: scheduler clip_sample true is outdated; using false, as diffusers does\n",
                 dir.c_str());
    model->scheduler.clip_sample = false;
  }
  torch::NoGradGuard no_grad;
  model->text_encoder = CLIPTextModel(CLIPTextModelOptionsFromConfigFile(te_config));
  LoadStateDict(*model->text_encoder, te_weights, ClipTextLoadOptions());
  model->unet = UNet2DConditionModel(UNetConfig::FromFile(unet_config));
  LoadStateDict(*model->unet, unet_weights);
  if (options.load_vae) {
    model->vae = AutoencoderKL(AutoencoderKLOptionsFromConfigFile(vae_config));
    LoadStateDict(*model->vae, vae_weights, VaeLoadOptions());
  }
  TORCH_CHECK_VALUE(model->unet->config().cross_attention_dim == model->text_dim(), "model folder ", dir,
                    ": the UNet's cross_attention_dim (", model->unet->config().cross_attention_dim,
                    ") differs from the text encoder's hidden_size (", model->text_dim(), ")");
  if (options.require_covariance) {
    model->covariance = LoadCovariance(cov_path);
    TORCH_CHECK_VALUE(model->covariance.size(0) == model->text_dim(), "model folder ", dir,
                      ": perfusion/covariance.safetensors is ", model->covariance.sizes(),
                      " but the text encoder's width is ", model->text_dim());
    model->c_inv = InvertCovariance(model->covariance).to(options.device);
  }
  for (torch::nn::Module* m : {static_cast<torch::nn::Module*>(model->text_encoder.get()),
                               static_cast<torch::nn::Module*>(model->unet.get())}) {
    m->to(options.device, options.dtype);
    Freeze(*m);
  }
  // Module::to(dtype) converts every buffer, the text encoder's integer position_ids too: it would
  // be saved as floats, which LoadStateDict (rightly) refuses for an integer buffer.
  for (auto& item : model->text_encoder->named_buffers()) {
    if (item.key().size() >= 12 && item.key().compare(item.key().size() - 12, 12, "position_ids") == 0) {
      item.value().set_data(item.value().to(at::kLong));
    }
  }
  if (model->vae) {
    model->vae->to(options.device, options.dtype);
    Freeze(*model->vae);
  }
  if (Exists(dir + "/perfusion/model_id")) {
    model->model_id = ReadText(dir + "/perfusion/model_id");
    TORCH_CHECK_VALUE(!model->model_id.empty(), "model folder ", dir, ": perfusion/model_id is empty");
  } else {
    model->model_id = DerivedModelId(dir, {te_config, unet_config, te_weights, unet_weights});
  }
  if (Exists(dir + "/perfusion/inference.json")) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(ReadText(dir + "/perfusion/inference.json"));
    } catch (const nlohmann::json::exception& e) {
      TORCH_CHECK_VALUE(false, "model folder ", dir, ": perfusion/inference.json: ", e.what());
    }
    TORCH_CHECK_VALUE(j.is_object(), "model folder ", dir, ": perfusion/inference.json must be an object");
    for (const auto& [key, value] : j.items()) {
      TORCH_CHECK_VALUE(key == "key_lock", "model folder ", dir, ": perfusion/inference.json: unknown key \"", key,
                        "\" (known: key_lock)");
      TORCH_CHECK_VALUE(value.is_string() && (value == "global" || value == "local"), "model folder ", dir,
                        ": perfusion/inference.json: key_lock must be \"global\" or \"local\", got ", JsonForMessage(value));
      model->default_global_key_lock = value == "global";
    }
  }
  return model;
}

std::string ClipTextConfigJson(const CLIPTextModelOptions& o) {
  nlohmann::ordered_json j;
  j["architectures"] = {"CLIPTextModel"};
  j["model_type"] = "clip_text_model";
  j["hidden_size"] = o.hidden_size();
  j["intermediate_size"] = o.intermediate_size();
  j["num_attention_heads"] = o.num_attention_heads();
  j["num_hidden_layers"] = o.num_hidden_layers();
  j["max_position_embeddings"] = o.max_position_embeddings();
  j["vocab_size"] = o.vocab_size();
  j["hidden_act"] = o.hidden_act();
  j["layer_norm_eps"] = o.layer_norm_eps();
  j["bos_token_id"] = 49406;
  j["eos_token_id"] = 49407;
  j["pad_token_id"] = 1;
  return j.dump(2);
}

std::string VaeConfigJson(const AutoencoderKLOptions& o) {
  nlohmann::ordered_json j;
  j["_class_name"] = "AutoencoderKL";
  j["act_fn"] = "silu";
  j["in_channels"] = o.in_channels();
  j["out_channels"] = o.out_channels();
  j["block_out_channels"] = o.block_out_channels();
  j["down_block_types"] = std::vector<std::string>(o.block_out_channels().size(), "DownEncoderBlock2D");
  j["up_block_types"] = std::vector<std::string>(o.block_out_channels().size(), "UpDecoderBlock2D");
  j["layers_per_block"] = o.layers_per_block();
  j["latent_channels"] = o.latent_channels();
  j["norm_num_groups"] = o.norm_num_groups();
  j["sample_size"] = o.sample_size();
  j["scaling_factor"] = o.scaling_factor();
  j["use_quant_conv"] = o.use_quant_conv();
  j["use_post_quant_conv"] = o.use_post_quant_conv();
  j["mid_block_add_attention"] = o.mid_block_add_attention();
  return j.dump(2);
}

std::string SchedulerConfigJson(const SchedulerConfig& c) {
  nlohmann::ordered_json j;
  j["_class_name"] = "DDIMScheduler";
  j["num_train_timesteps"] = c.num_train_timesteps;
  j["beta_start"] = c.beta_start;
  j["beta_end"] = c.beta_end;
  j["beta_schedule"] = c.beta_schedule;
  if (!c.trained_betas.empty()) j["trained_betas"] = c.trained_betas;
  j["rescale_betas_zero_snr"] = c.rescale_betas_zero_snr;
  j["prediction_type"] = c.prediction_type;
  if (!c.timestep_spacing.empty()) j["timestep_spacing"] = c.timestep_spacing;
  j["steps_offset"] = c.steps_offset;
  j["set_alpha_to_one"] = c.set_alpha_to_one;
  j["clip_sample"] = c.clip_sample;
  j["clip_sample_range"] = c.clip_sample_range;
  j["thresholding"] = c.thresholding;
  j["dynamic_thresholding_ratio"] = c.dynamic_thresholding_ratio;
  j["sample_max_value"] = c.sample_max_value;
  j["interpolation_type"] = c.interpolation_type;
  j["use_karras_sigmas"] = c.use_karras_sigmas;
  j["timestep_type"] = c.timestep_type;
  return j.dump(2);
}

void SaveModelDir(const StableDiffusion& model, const std::string& dir, at::ScalarType dtype) {
  for (const char* sub : {"", "/text_encoder", "/unet", "/vae", "/scheduler", "/perfusion"}) {
    ::mkdir((dir + sub).c_str(), 0755);
  }
  auto save = [&](const torch::nn::Module& m, const std::string& path) {
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    for (auto& [name, t] : StateDict(m)) tensors.emplace_back(name, t.is_floating_point() ? t.to(dtype) : t);
    SaveSafetensors(path, tensors, {{"format", "pt"}});
  };
  nlohmann::ordered_json index;
  index["_class_name"] = "StableDiffusionPipeline";
  index["_diffusers_version"] = "0.25.0";
  index["text_encoder"] = {"transformers", "CLIPTextModel"};
  index["tokenizer"] = {"transformers", "CLIPTokenizer"};
  index["unet"] = {"diffusers", "UNet2DConditionModel"};
  index["vae"] = {"diffusers", "AutoencoderKL"};
  index["scheduler"] = {"diffusers", "DDIMScheduler"};
  WriteFileAtomically(dir + "/model_index.json", index.dump(2) + "\n");
  WriteFileAtomically(dir + "/text_encoder/config.json", ClipTextConfigJson(model.text_encoder->options()) + "\n");
  save(*model.text_encoder, dir + "/text_encoder/model.safetensors");
  WriteFileAtomically(dir + "/unet/config.json", model.unet->config().ToJsonString() + "\n");
  save(*model.unet, dir + "/unet/diffusion_pytorch_model.safetensors");
  if (model.vae) {
    WriteFileAtomically(dir + "/vae/config.json", VaeConfigJson(model.vae->options()) + "\n");
    save(*model.vae, dir + "/vae/diffusion_pytorch_model.safetensors");
  }
  WriteFileAtomically(dir + "/scheduler/scheduler_config.json", SchedulerConfigJson(model.scheduler) + "\n");
  if (model.covariance.defined()) SaveCovariance(dir + "/perfusion/covariance.safetensors", model.covariance);
  if (!model.model_id.empty()) WriteFileAtomically(dir + "/perfusion/model_id", model.model_id + "\n");
  if (model.default_global_key_lock) WriteFileAtomically(dir + "/perfusion/inference.json", "{\"key_lock\": \"global\"}\n");
}

}  // namespace perfusion

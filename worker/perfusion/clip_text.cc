#include "perfusion/clip_text.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include "perfusion/json_text.h"
#include "perfusion/nn_blocks.h"
#include "perfusion/safetensors.h"

namespace perfusion {

namespace {

void ValidateOptions(const CLIPTextModelOptions& o) {
  TORCH_CHECK_VALUE(o.hidden_size() > 0, "CLIPTextModel: hidden_size must be positive, got ", o.hidden_size());
  TORCH_CHECK_VALUE(o.intermediate_size() > 0, "CLIPTextModel: intermediate_size must be positive, got ",
                    o.intermediate_size());
  TORCH_CHECK_VALUE(o.num_attention_heads() > 0 && o.hidden_size() % o.num_attention_heads() == 0,
                    "CLIPTextModel: num_attention_heads (", o.num_attention_heads(), ") must divide hidden_size (",
                    o.hidden_size(), ")");
  TORCH_CHECK_VALUE(o.num_hidden_layers() >= 0, "CLIPTextModel: num_hidden_layers must be >= 0, got ",
                    o.num_hidden_layers());
  TORCH_CHECK_VALUE(o.max_position_embeddings() > 0, "CLIPTextModel: max_position_embeddings must be positive, got ",
                    o.max_position_embeddings());
  TORCH_CHECK_VALUE(o.vocab_size() > 0, "CLIPTextModel: vocab_size must be positive, got ", o.vocab_size());
  TORCH_CHECK_VALUE(o.hidden_act() == "quick_gelu" || o.hidden_act() == "gelu",
                    "CLIPTextModel: hidden_act must be \"quick_gelu\" or \"gelu\", got \"", o.hidden_act(), "\"");
  TORCH_CHECK_VALUE(o.layer_norm_eps() > 0, "CLIPTextModel: layer_norm_eps must be positive, got ",
                    o.layer_norm_eps());
}

int64_t JsonInt(const nlohmann::json& j, const char* key, int64_t fallback, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  TORCH_CHECK_VALUE(it->is_number_integer(), where, ": field \"", key, "\" must be an integer, got ", JsonForMessage(*it));
  return it->get<int64_t>();
}

CLIPTextModelOptions OptionsFromJson(const std::string& json_text, const std::string& where) {
  nlohmann::json j = nlohmann::json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  TORCH_CHECK_VALUE(!j.is_discarded() && j.is_object(), where, ": not a JSON object");
  CLIPTextModelOptions o;
  o.hidden_size(JsonInt(j, "hidden_size", o.hidden_size(), where));
  o.intermediate_size(JsonInt(j, "intermediate_size", o.intermediate_size(), where));
  o.num_attention_heads(JsonInt(j, "num_attention_heads", o.num_attention_heads(), where));
  o.num_hidden_layers(JsonInt(j, "num_hidden_layers", o.num_hidden_layers(), where));
  o.max_position_embeddings(JsonInt(j, "max_position_embeddings", o.max_position_embeddings(), where));
  o.vocab_size(JsonInt(j, "vocab_size", o.vocab_size(), where));
  if (auto it = j.find("hidden_act"); it != j.end() && !it->is_null()) {
    TORCH_CHECK_VALUE(it->is_string(), where, ": field \"hidden_act\" must be a string, got ", JsonForMessage(*it));
    o.hidden_act(it->get<std::string>());
  }
  if (auto it = j.find("layer_norm_eps"); it != j.end() && !it->is_null()) {
    TORCH_CHECK_VALUE(it->is_number(), where, ": field \"layer_norm_eps\" must be a number, got ", JsonForMessage(*it));
    o.layer_norm_eps(it->get<double>());
  }
  try {
    ValidateOptions(o);
  } catch (const c10::ValueError& e) {
    TORCH_CHECK_VALUE(false, where, ": ", e.what_without_backtrace());
  }
  return o;
}

}  // namespace

CLIPTextModelOptions CLIPTextModelOptionsFromJson(const std::string& json_text) {
  return OptionsFromJson(json_text, "CLIPTextConfig");
}

CLIPTextModelOptions CLIPTextModelOptionsFromConfigFile(const std::string& path) {
  return OptionsFromJson(ReadFileToString(path), path);
}

// --- Embeddings -------------------------------------------------------------------------------

CLIPTextEmbeddingsImpl::CLIPTextEmbeddingsImpl(const CLIPTextModelOptions& o) {
  token_embedding = register_module("token_embedding", torch::nn::Embedding(o.vocab_size(), o.hidden_size()));
  position_embedding =
      register_module("position_embedding", torch::nn::Embedding(o.max_position_embeddings(), o.hidden_size()));
  position_ids = register_buffer("position_ids", at::arange(o.max_position_embeddings(), at::kLong).unsqueeze(0));
}

at::Tensor CLIPTextEmbeddingsImpl::forward(const at::Tensor& token_embeds) {
  const int64_t s = token_embeds.size(1);
  // to(kLong): Module::to(dtype) converts every buffer, this integer one included.
  auto pos = position_embedding(position_ids.narrow(1, 0, s).to(at::kLong));  // [1, S, D]
  return token_embeds + pos;                                    // [B, S, D]
}

// --- Attention, MLP, layers -------------------------------------------------------------------

CLIPAttentionImpl::CLIPAttentionImpl(const CLIPTextModelOptions& o) : heads_(o.num_attention_heads()) {
  const int64_t d = o.hidden_size();
  q_proj = register_module("q_proj", torch::nn::Linear(d, d));
  k_proj = register_module("k_proj", torch::nn::Linear(d, d));
  v_proj = register_module("v_proj", torch::nn::Linear(d, d));
  out_proj = register_module("out_proj", torch::nn::Linear(d, d));
}

at::Tensor CLIPAttentionImpl::forward(const at::Tensor& x, const at::Tensor& bias) {
  AttentionOptions attn;
  attn.heads = heads_;  // scale (D/heads)^-0.5
  auto h = MultiHeadAttention(q_proj(x), k_proj(x), v_proj(x), attn, bias);  // [B, S, D]
  return out_proj(h);
}

CLIPMLPImpl::CLIPMLPImpl(const CLIPTextModelOptions& o) : quick_gelu_(o.hidden_act() == "quick_gelu") {
  fc1 = register_module("fc1", torch::nn::Linear(o.hidden_size(), o.intermediate_size()));
  fc2 = register_module("fc2", torch::nn::Linear(o.intermediate_size(), o.hidden_size()));
}

at::Tensor CLIPMLPImpl::forward(const at::Tensor& x) {
  auto h = fc1(x);  // [B, S, I]
  h = quick_gelu_ ? h * at::sigmoid(h * 1.702) : at::gelu(h);
  return fc2(h);  // [B, S, D]
}

CLIPEncoderLayerImpl::CLIPEncoderLayerImpl(const CLIPTextModelOptions& o) {
  const auto ln = torch::nn::LayerNormOptions({o.hidden_size()}).eps(o.layer_norm_eps());
  self_attn = register_module("self_attn", CLIPAttention(o));
  layer_norm1 = register_module("layer_norm1", torch::nn::LayerNorm(ln));
  mlp = register_module("mlp", CLIPMLP(o));
  layer_norm2 = register_module("layer_norm2", torch::nn::LayerNorm(ln));
}

at::Tensor CLIPEncoderLayerImpl::forward(const at::Tensor& x, const at::Tensor& bias) {
  auto h = x + self_attn(layer_norm1(x), bias);  // [B, S, D]
  return h + mlp(layer_norm2(h));                 // [B, S, D]
}

CLIPEncoderImpl::CLIPEncoderImpl(const CLIPTextModelOptions& o) {
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < o.num_hidden_layers(); ++i) {
    layer_list_.push_back(CLIPEncoderLayer(o));
    layers->push_back(layer_list_.back());
  }
}

at::Tensor CLIPEncoderImpl::forward(const at::Tensor& x, const at::Tensor& bias, std::vector<at::Tensor>* hidden_states) {
  auto h = x;
  for (auto& layer : layer_list_) {
    h = layer(h, bias);  // [B, S, D]
    if (hidden_states) hidden_states->push_back(h);
  }
  return h;
}

CLIPTextTransformerImpl::CLIPTextTransformerImpl(const CLIPTextModelOptions& o) {
  embeddings = register_module("embeddings", CLIPTextEmbeddings(o));
  encoder = register_module("encoder", CLIPEncoder(o));
  final_layer_norm = register_module(
      "final_layer_norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({o.hidden_size()}).eps(o.layer_norm_eps())));
}

// --- CLIPTextModel ----------------------------------------------------------------------------

CLIPTextModelImpl::CLIPTextModelImpl(const CLIPTextModelOptions& options) : options_(options) {
  ValidateOptions(options_);
  text_model = register_module("text_model", CLIPTextTransformer(options_));
}

void CLIPTextModelImpl::CheckIds(const at::Tensor& input_ids) const {
  TORCH_CHECK_VALUE(input_ids.defined(), "CLIPTextModel: input_ids is undefined");
  TORCH_CHECK_VALUE(input_ids.dim() == 2, "CLIPTextModel: input_ids must be [B, S], got shape ", input_ids.sizes());
  TORCH_CHECK_VALUE(input_ids.scalar_type() == at::kLong || input_ids.scalar_type() == at::kInt,
                    "CLIPTextModel: input_ids must be int64 (or int32), got ", input_ids.scalar_type());
  TORCH_CHECK_VALUE(input_ids.size(1) >= 1 && input_ids.size(1) <= options_.max_position_embeddings(),
                    "CLIPTextModel: input_ids ", input_ids.sizes(), " has sequence length ", input_ids.size(1),
                    ", must be in [1, max_position_embeddings = ", options_.max_position_embeddings(), "]");
  if (input_ids.numel() == 0) return;
  const int64_t lo = input_ids.min().item<int64_t>(), hi = input_ids.max().item<int64_t>();
  TORCH_CHECK_INDEX(lo >= 0 && hi < options_.vocab_size(), "CLIPTextModel: input_ids ", input_ids.sizes(),
                    " holds ids in [", lo, ", ", hi, "], outside the vocabulary [0, ", options_.vocab_size(), ")");
}

at::Tensor CLIPTextModelImpl::embed_tokens(const at::Tensor& input_ids) {
  CheckIds(input_ids);
  return text_model->embeddings->token_embedding(input_ids.to(at::kLong));  // [B, S, D]
}

at::Tensor CLIPTextModelImpl::forward(const at::Tensor& input_ids) {
  return forward_embeds(embed_tokens(input_ids));
}

at::Tensor CLIPTextModelImpl::forward_embeds(const at::Tensor& token_embeds, std::vector<at::Tensor>* hidden_states) {
  const auto& w = text_model->embeddings->token_embedding->weight;
  TORCH_CHECK_VALUE(token_embeds.defined(), "CLIPTextModel: token_embeds is undefined");
  TORCH_CHECK_VALUE(token_embeds.dim() == 3 && token_embeds.size(2) == options_.hidden_size(),
                    "CLIPTextModel: token_embeds must be [B, S, ", options_.hidden_size(), "], got shape ",
                    token_embeds.sizes());
  TORCH_CHECK_VALUE(token_embeds.size(1) >= 1 && token_embeds.size(1) <= options_.max_position_embeddings(),
                    "CLIPTextModel: token_embeds ", token_embeds.sizes(), " has sequence length ",
                    token_embeds.size(1), ", must be in [1, max_position_embeddings = ",
                    options_.max_position_embeddings(), "]");
  TORCH_CHECK_VALUE(c10::isFloatingType(token_embeds.scalar_type()),
                    "CLIPTextModel: token_embeds must be floating point, got ", token_embeds.scalar_type());
  TORCH_CHECK_VALUE(token_embeds.device() == w.device(), "CLIPTextModel: token_embeds is on ", token_embeds.device(),
                    " but the model is on ", w.device());
  auto x = text_model->embeddings(token_embeds.to(w.scalar_type()));  // [B, S, D]
  if (hidden_states) hidden_states->push_back(x);
  auto bias = CausalAttentionBias(x.size(1), x.options());  // [S, S]
  x = text_model->encoder(x, bias, hidden_states);            // [B, S, D]
  return text_model->final_layer_norm(x);                     // [B, S, D]
}

at::Tensor CLIPTextModelImpl::Pooled(const at::Tensor& last_hidden_state, const at::Tensor& input_ids) {
  TORCH_CHECK_VALUE(last_hidden_state.dim() == 3 && input_ids.dim() == 2 &&
                        input_ids.size(0) == last_hidden_state.size(0) && input_ids.size(1) == last_hidden_state.size(1),
                    "CLIPTextModel::Pooled: last_hidden_state ", last_hidden_state.sizes(), " and input_ids ",
                    input_ids.sizes(), " must be [B, S, D] and [B, S]");
  auto pos = input_ids.to(last_hidden_state.device()).argmax(-1);  // [B]
  auto rows = at::arange(last_hidden_state.size(0), pos.options());
  return last_hidden_state.index({rows, pos});  // [B, D]
}

}  // namespace perfusion

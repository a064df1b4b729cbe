// clip_text: the CLIP text encoder of the SD 1.x family (CLIPTextModel: token + position embeddings,
// pre-LN causal transformer, final LayerNorm). Its last_hidden_state is what SD feeds the UNet's
// cross-attention, and the input of Perfusion's rank-1 edits.
//
// Ref: transformers `models/clip/modeling_clip.py` (CLIPTextModel, CLIPTextTransformer,
//      CLIPTextEmbeddings, CLIPEncoderLayer, CLIPAttention, CLIPMLP); open_clip TextTransformer
//      (the conformance reference). Submodules carry the transformers names
//      (`text_model.embeddings.token_embedding`, `text_model.encoder.layers.N.self_attn.q_proj`, ...).
// SD 1.x passes no attention mask: every position attends to itself and earlier positions (causal),
// padding included.
//
// Concept embeddings: forward_embeds() takes token embeddings (e.g. embed_tokens(ids) with a learnt
// vector written at the concept position) and runs the COMPLETE model on them: position embeddings
// are added, then the causal encoder and the final LayerNorm. forward(ids) == forward_embeds(
// embed_tokens(ids)) exactly.
//
// Device/dtype: runs on the device and in the dtype of its parameters (move with ->to(...)). Inputs
// must be on that device; forward_embeds casts floating inputs to the parameter dtype. Supports
// autograd (training) and c10::InferenceMode (serving).
// Thread safety: forward calls do not mutate the module; concurrent calls on one instance are safe.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <string>
#include <vector>

namespace perfusion {

// CLIPTextConfig fields used by the model; defaults are SD 1.5's (CLIP ViT-L/14 text tower).
struct CLIPTextModelOptions {
  TORCH_ARG(int64_t, hidden_size) = 768;
  TORCH_ARG(int64_t, intermediate_size) = 3072;
  TORCH_ARG(int64_t, num_attention_heads) = 12;
  TORCH_ARG(int64_t, num_hidden_layers) = 12;
  // Longest accepted sequence (and the position table's rows).
  TORCH_ARG(int64_t, max_position_embeddings) = 77;
  TORCH_ARG(int64_t, vocab_size) = 49408;
  // MLP activation: "quick_gelu" (x * sigmoid(1.702 x), SD 1.x) or "gelu" (exact, erf).
  TORCH_ARG(std::string, hidden_act) = "quick_gelu";
  TORCH_ARG(double, layer_norm_eps) = 1e-5;
};

// Reads the fields above from a transformers CLIPTextConfig `config.json` (text); absent keys keep
// their SD 1.5 defaults, other keys are ignored. Throws c10::ValueError (naming the field) on
// malformed JSON, a wrong type, a non-positive size, hidden_size % num_attention_heads != 0 or an
// unsupported hidden_act.
CLIPTextModelOptions CLIPTextModelOptionsFromJson(const std::string& json_text);
// The same from a file path (e.g. "<model>/text_encoder/config.json"); the error names the path.
CLIPTextModelOptions CLIPTextModelOptionsFromConfigFile(const std::string& path);

class CLIPTextEmbeddingsImpl : public torch::nn::Module {
 public:
  explicit CLIPTextEmbeddingsImpl(const CLIPTextModelOptions& options);
  // token_embeds [B, S, D] -> token_embeds + position_embedding(position_ids[:, :S])  [B, S, D]
  at::Tensor forward(const at::Tensor& token_embeds);

  torch::nn::Embedding token_embedding{nullptr};     // [vocab_size, D]
  torch::nn::Embedding position_embedding{nullptr};  // [max_position_embeddings, D]
  // Buffer int64 [1, max_position_embeddings] = 0..P-1 (Module::to(dtype) converts it too; forward
  // casts it back to int64).
  at::Tensor position_ids;
};
TORCH_MODULE(CLIPTextEmbeddings);

class CLIPAttentionImpl : public torch::nn::Module {
 public:
  explicit CLIPAttentionImpl(const CLIPTextModelOptions& options);
  // x [B, S, D], bias additive (broadcasts to [B, heads, S, S]) -> [B, S, D]
  at::Tensor forward(const at::Tensor& x, const at::Tensor& bias);

  torch::nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, out_proj{nullptr};

 private:
  int64_t heads_;
};
TORCH_MODULE(CLIPAttention);

class CLIPMLPImpl : public torch::nn::Module {
 public:
  explicit CLIPMLPImpl(const CLIPTextModelOptions& options);
  at::Tensor forward(const at::Tensor& x);  // [B, S, D] -> fc2(act(fc1(x))) [B, S, D]

  torch::nn::Linear fc1{nullptr}, fc2{nullptr};

 private:
  bool quick_gelu_;
};
TORCH_MODULE(CLIPMLP);

// Pre-LN residual block: x += self_attn(layer_norm1(x)); x += mlp(layer_norm2(x)).
class CLIPEncoderLayerImpl : public torch::nn::Module {
 public:
  explicit CLIPEncoderLayerImpl(const CLIPTextModelOptions& options);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& bias);  // [B, S, D] -> [B, S, D]

  CLIPAttention self_attn{nullptr};
  torch::nn::LayerNorm layer_norm1{nullptr};
  CLIPMLP mlp{nullptr};
  torch::nn::LayerNorm layer_norm2{nullptr};
};
TORCH_MODULE(CLIPEncoderLayer);

class CLIPEncoderImpl : public torch::nn::Module {
 public:
  explicit CLIPEncoderImpl(const CLIPTextModelOptions& options);
  // x [B, S, D] -> [B, S, D]; if `hidden_states`, appends each layer's output to it.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& bias, std::vector<at::Tensor>* hidden_states = nullptr);

  torch::nn::ModuleList layers{nullptr};  // "layers.N"

 private:
  std::vector<CLIPEncoderLayer> layer_list_;
};
TORCH_MODULE(CLIPEncoder);

class CLIPTextTransformerImpl : public torch::nn::Module {
 public:
  explicit CLIPTextTransformerImpl(const CLIPTextModelOptions& options);

  CLIPTextEmbeddings embeddings{nullptr};
  CLIPEncoder encoder{nullptr};
  torch::nn::LayerNorm final_layer_norm{nullptr};
};
TORCH_MODULE(CLIPTextTransformer);

// CLIPTextModel: the root module; its state dict names start with "text_model.".
class CLIPTextModelImpl : public torch::nn::Module {
 public:
  explicit CLIPTextModelImpl(const CLIPTextModelOptions& options = {});

  // input_ids [B, S] int64 (int32 accepted) -> last_hidden_state [B, S, D]
  // REQUIRES: 1 <= S <= max_position_embeddings; 0 <= ids < vocab_size (else c10::ValueError /
  // c10::IndexError naming the tensor, its shape and the offending value).
  at::Tensor forward(const at::Tensor& input_ids);

  // token_embeds [B, S, D] (token embeddings WITHOUT positions) -> last_hidden_state [B, S, D]:
  // adds the position embeddings, runs the causal encoder and the final LayerNorm. If
  // `hidden_states` is given it receives L+1 tensors as transformers' output_hidden_states:
  // [0] = token + position embeddings, [i] = output of layer i (before the final LayerNorm).
  // REQUIRES: 1 <= S <= max_position_embeddings, D == hidden_size, floating point, on the
  // module's device.
  at::Tensor forward_embeds(const at::Tensor& token_embeds, std::vector<at::Tensor>* hidden_states = nullptr);

  // token_embedding(input_ids): [B, S] -> [B, S, D] (checked like forward()).
  at::Tensor embed_tokens(const at::Tensor& input_ids);

  // The token embedding table, [vocab_size, D] (a Parameter: writes change the model).
  at::Tensor& token_embedding_weight() { return text_model->embeddings->token_embedding->weight; }

  // Pooled output as transformers computes it for SD's tokenizer (EOS = the largest id): the
  // hidden state at each row's first argmax(input_ids) position. [B, S, D], [B, S] -> [B, D]
  static at::Tensor Pooled(const at::Tensor& last_hidden_state, const at::Tensor& input_ids);

  const CLIPTextModelOptions& options() const { return options_; }

  CLIPTextTransformer text_model{nullptr};

 private:
  void CheckIds(const at::Tensor& input_ids) const;
  CLIPTextModelOptions options_;
};
TORCH_MODULE(CLIPTextModel);

}  // namespace perfusion

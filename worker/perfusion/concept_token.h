// concept_token: the concept-embedding wrapper (spec §4, the reference's EmbeddingWrapper, without its
// bugs §8.6-§8.8). A new concept gets token id V + k past the CLIP vocabulary (V = 49408 for SD 1.x);
// the vocabulary and the frozen embedding table are not changed. Only the concept vector trains.
//
// Training prompts are tokenized WITH THE SUPERCLASS WORD ("a photo of a dog"); forward() replaces
// every occurrence of the superclass token by the concept token, returns the token embeddings of the
// concept prompt (concept vector substituted) and of the original superclass prompt, and the index of
// the first occurrence (which feeds i* and the superclass target, spec §1.7). Those embeddings must go
// through the COMPLETE text encoder (position embeddings, causal mask, final LayerNorm):
// CLIPTextModel::forward_embeds.
//
// Ref: ../shared/docs/perfusion-algorithm.md §4; §9.4 (test properties).
// Device/dtype: follows the frozen table's. Thread safety: forward() is const on the module state.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>

namespace perfusion {

struct ConceptPromptBatch {
  at::Tensor concept_ids;        // [B, N] int64: ids with the concept token V in place of the superclass
  at::Tensor concept_embeds;     // [B, N, d]: token embeddings, concept vector at the concept positions
  at::Tensor superclass_embeds;  // [B, N, d]: token embeddings of the superclass prompts (frozen)
  at::Tensor concept_index;      // [B] int64: first concept position in each prompt
};

class ConceptTokenImpl : public torch::nn::Module {
 public:
  // token_embedding: the frozen table [V, d] (not copied; kept as buffer "token_embedding").
  // superclass_id: the superclass word's single token id (see ClipTokenizer::SingleTokenId).
  // init: initial concept vector [d]; undefined = the superclass word's embedding (the author's advice).
  ConceptTokenImpl(const at::Tensor& token_embedding, int64_t superclass_id, const at::Tensor& init = at::Tensor());

  // ids: [B, N] int64 prompts tokenized with the superclass word. Every prompt must contain it
  // (c10::ValueError naming the prompt otherwise; e.g. when truncation cut it off).
  ConceptPromptBatch forward(const at::Tensor& ids) const;

  int64_t concept_token_id() const { return vocab_size_; }
  int64_t superclass_id() const { return superclass_id_; }
  const at::Tensor& embedding() const { return embedding_; }  // parameter "embedding" [d]
  at::Tensor& embedding() { return embedding_; }

 private:
  int64_t vocab_size_;
  int64_t superclass_id_;
  at::Tensor table_;      // buffer [V, d], frozen
  at::Tensor embedding_;  // parameter [d]
};
TORCH_MODULE(ConceptToken);

// Inference with several concepts (merged in order): ids >= V are concept tokens, id V + k takes
// concept_vectors[k]; other ids look up the frozen table. ids [B, N] -> [B, N, d].
// REQUIRES: every id < V + K (c10::IndexError otherwise).
at::Tensor EmbedWithConcepts(const at::Tensor& token_embedding, const at::Tensor& ids,
                             const at::Tensor& concept_vectors);

}  // namespace perfusion

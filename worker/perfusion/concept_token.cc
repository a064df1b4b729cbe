#include "perfusion/concept_token.h"

#include <ATen/Functions.h>
#include <c10/util/Exception.h>

namespace perfusion {

ConceptTokenImpl::ConceptTokenImpl(const at::Tensor& token_embedding, int64_t superclass_id, const at::Tensor& init) {
  TORCH_CHECK_VALUE(token_embedding.defined() && token_embedding.dim() == 2,
                    "ConceptToken: token_embedding must be [V, d], got ",
                    token_embedding.defined() ? token_embedding.sizes() : c10::IntArrayRef{});
  vocab_size_ = token_embedding.size(0);
  TORCH_CHECK_INDEX(superclass_id >= 0 && superclass_id < vocab_size_, "ConceptToken: superclass id ", superclass_id,
                    " is outside the vocabulary [0, ", vocab_size_, ")");
  superclass_id_ = superclass_id;
  table_ = register_buffer("token_embedding", token_embedding.detach());
  at::Tensor v = init.defined() ? init.detach().reshape({-1}) : table_[superclass_id].detach();
  TORCH_CHECK_VALUE(v.numel() == table_.size(1), "ConceptToken: init has ", v.numel(), " values, the embedding width is ",
                    table_.size(1));
  // The trained vector is float32 whatever the model's dtype: in fp16, AdamW's eps (1e-8) and most
  // squared gradients round to 0, and its first step divides by zero. forward() casts it.
  embedding_ = register_parameter("embedding", v.to(table_.device(), at::kFloat).clone());
}

ConceptPromptBatch ConceptTokenImpl::forward(const at::Tensor& ids) const {
  TORCH_CHECK_VALUE(ids.defined() && ids.dim() == 2 && !ids.is_floating_point(),
                    "ConceptToken: ids must be an integer tensor [B, N], got ",
                    ids.defined() ? ids.sizes() : c10::IntArrayRef{});
  const at::Tensor x = ids.to(table_.device(), at::kLong);
  TORCH_CHECK_INDEX(x.numel() == 0 || ((x >= 0).all().item<bool>() && (x < vocab_size_).all().item<bool>()),
                    "ConceptToken: ids outside the vocabulary [0, ", vocab_size_, ")");
  const at::Tensor is_concept = x == superclass_id_;  // [B, N]
  const at::Tensor present = is_concept.any(1);
  for (int64_t b = 0; b < x.size(0); ++b) {
    TORCH_CHECK_VALUE(present[b].item<bool>(), "ConceptToken: prompt ", b,
                      " does not contain the superclass token (id ", superclass_id_,
                      "); every training prompt must name the superclass (was it truncated?)");
  }
  ConceptPromptBatch out;
  out.concept_ids = at::where(is_concept, at::full_like(x, vocab_size_), x);
  out.superclass_embeds = at::embedding(table_, x);                                       // [B, N, d]
  out.concept_embeds = at::where(is_concept.unsqueeze(-1),
                                 embedding_.to(table_.scalar_type()).expand_as(out.superclass_embeds),
                                 out.superclass_embeds);                                   // grad only to embedding_
  out.concept_index = is_concept.to(at::kByte).argmax(1);                                  // first occurrence
  return out;
}

at::Tensor EmbedWithConcepts(const at::Tensor& token_embedding, const at::Tensor& ids, const at::Tensor& concept_vectors) {
  TORCH_CHECK_VALUE(token_embedding.dim() == 2, "EmbedWithConcepts: token_embedding must be [V, d]");
  TORCH_CHECK_VALUE(ids.dim() == 2 && !ids.is_floating_point(), "EmbedWithConcepts: ids must be integer [B, N], got ",
                    ids.sizes());
  const int64_t V = token_embedding.size(0), d = token_embedding.size(1);
  const int64_t K = concept_vectors.defined() ? concept_vectors.size(0) : 0;
  if (K > 0) {
    TORCH_CHECK_VALUE(concept_vectors.dim() == 2 && concept_vectors.size(1) == d, "EmbedWithConcepts: concept vectors ",
                      concept_vectors.sizes(), " do not match the embedding width ", d);
  }
  const at::Tensor x = ids.to(token_embedding.device(), at::kLong);
  TORCH_CHECK_INDEX(x.numel() == 0 || ((x >= 0).all().item<bool>() && (x < V + K).all().item<bool>()),
                    "EmbedWithConcepts: token id out of range [0, ", V + K, ") (", K, " concepts)");
  if (K == 0) return at::embedding(token_embedding, x);
  const at::Tensor table = at::cat({token_embedding, concept_vectors.to(token_embedding.options())}, 0);
  return at::embedding(table, x);
}

}  // namespace perfusion

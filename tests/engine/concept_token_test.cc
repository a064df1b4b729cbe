// The concept-embedding wrapper: spec §9.4 #20-#21.
#include "perfusion/concept_token.h"

#include <ATen/Functions.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include "tests/engine/test_util.h"

namespace perfusion {
namespace {

constexpr int64_t kSos = 49406, kEos = 49407;

class ConceptTokenTest : public testing::SeededTest {
 protected:
  ConceptTokenTest() : table(at::randn({49408, 8})) {}
  // "a photo of dog": [SOS, a, photo, of, dog, EOS, pad...] with SD's EOS padding.
  at::Tensor Prompt(std::vector<int64_t> words, int64_t n = 10) {
    std::vector<int64_t> ids = {kSos};
    ids.insert(ids.end(), words.begin(), words.end());
    while (static_cast<int64_t>(ids.size()) < n) ids.push_back(kEos);
    return at::tensor(ids, at::kLong).reshape({1, n});
  }
  at::Tensor table;
  const int64_t a = 320, photo = 1125, of = 539, dog = 1929;
};

TEST_F(ConceptTokenTest, SubstitutesTheConceptVectorOnlyAtTheConceptPosition) {
  ConceptToken tok(table, dog, at::randn({8}));
  ConceptPromptBatch out = tok->forward(Prompt({a, photo, of, dog}));
  EXPECT_EQ(out.concept_index[0].item<int64_t>(), 4);
  EXPECT_EQ(out.concept_ids[0][4].item<int64_t>(), 49408);
  EXPECT_TRUE(at::equal(out.concept_embeds[0][4], tok->embedding()));
  at::Tensor ids = Prompt({a, photo, of, dog})[0];
  for (int64_t n = 0; n < 10; ++n) {
    EXPECT_TRUE(at::equal(out.superclass_embeds[0][n], table[ids[n].item<int64_t>()]));
    if (n != 4) EXPECT_TRUE(at::equal(out.concept_embeds[0][n], table[ids[n].item<int64_t>()]));
  }
}

TEST_F(ConceptTokenTest, GradientReachesOnlyTheConceptVector) {
  ConceptToken tok(table, dog);
  EXPECT_TRUE(at::equal(tok->embedding(), table[dog])) << "initialised from the superclass embedding";
  ASSERT_EQ(tok->parameters().size(), 1u);
  ConceptPromptBatch out = tok->forward(Prompt({a, dog, of, dog}));
  out.concept_embeds.pow(2).sum().backward();
  ASSERT_TRUE(tok->embedding().grad().defined());
  // Both occurrences are replaced; the gradient is the sum over them: 2 * 2 * v.
  EXPECT_TRUE(at::allclose(tok->embedding().grad(), 4 * tok->embedding().detach()));
  EXPECT_FALSE(table.requires_grad());
}

TEST_F(ConceptTokenTest, RepeatedSuperclassReplacesAllAndIndexesTheFirst) {
  ConceptToken tok(table, dog);
  ConceptPromptBatch out = tok->forward(at::cat({Prompt({a, dog, of, dog}), Prompt({photo, of, a, dog})}));
  EXPECT_EQ(out.concept_index[0].item<int64_t>(), 2);
  EXPECT_EQ(out.concept_index[1].item<int64_t>(), 4);
  EXPECT_EQ((out.concept_ids[0] == 49408).sum().item<int64_t>(), 2);
}

TEST_F(ConceptTokenTest, PromptWithoutTheSuperclassIsAnError) {
  ConceptToken tok(table, dog);
  try {
    tok->forward(at::cat({Prompt({a, dog}), Prompt({a, photo})}));
    FAIL();
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("prompt 1"), std::string::npos);
  }
  EXPECT_THROW(ConceptToken(table, 49408), c10::IndexError);
}

TEST_F(ConceptTokenTest, SeveralConceptsTakeIdsPastTheVocabulary) {
  at::Tensor vecs = at::randn({2, 8});
  at::Tensor ids = at::tensor(std::vector<int64_t>{kSos, a, 49408, of, 49409, kEos}, at::kLong).reshape({1, 6});
  at::Tensor e = EmbedWithConcepts(table, ids, vecs);
  EXPECT_TRUE(at::equal(e[0][2], vecs[0]));
  EXPECT_TRUE(at::equal(e[0][4], vecs[1]));
  EXPECT_TRUE(at::equal(e[0][1], table[a]));
  at::Tensor bad = at::tensor(std::vector<int64_t>{kSos, 49410}, at::kLong).reshape({1, 2});
  EXPECT_THROW(EmbedWithConcepts(table, bad, vecs), c10::IndexError);
}

}  // namespace
}  // namespace perfusion

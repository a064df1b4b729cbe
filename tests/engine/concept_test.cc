#include "perfusion/concept.h"

#include <ATen/Functions.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include "tests/engine/test_util.h"

namespace perfusion {
namespace {

// A concept shaped like an SD 1.5 one: 16 layers, sum O = 12,480, d = D = 768.
Concept Sd15ShapedConcept() {
  Concept c;
  c.name = "rex";
  c.superclass = "dog";
  c.superclass_token_id = 1929;
  c.base_model_id = "sd15-test";
  const int64_t widths[16] = {320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320};
  for (int l = 0; l < 16; ++l) c.layers.push_back({"layer" + std::to_string(l) + ".attn2", widths[l]});
  c.embedding = at::randn({768});
  c.i_star = at::randn({768}) * 20;
  c.i_sup = at::randn({768}) * 20;
  c.v_targets = at::randn({c.total_out_dim()});
  c.info["steps"] = "400";
  return c;
}

class ConceptTest : public testing::SeededTest {
 protected:
  Concept c = Sd15ShapedConcept();
};

TEST_F(ConceptTest, Sd15ConceptIsAbout32KilobytesInFp16) {
  EXPECT_EQ(c.total_out_dim(), 12480);
  std::string blob = EncodeConcept(c);
  EXPECT_LT(blob.size(), 34000u);
  EXPECT_GT(blob.size(), 32000u);  // 768*4*2 + (768 + 12480)*2 = 32,640 payload bytes + header
}

TEST_F(ConceptTest, RoundTripIsExactInFloat32AndFp16RoundedOtherwise) {
  Concept back = DecodeConcept(EncodeConcept(c, {at::kFloat}), "sd15-test");
  EXPECT_EQ(back.name, "rex");
  EXPECT_EQ(back.superclass_token_id, 1929);
  EXPECT_EQ(back.layers.size(), 16u);
  EXPECT_EQ(back.info["steps"], "400");
  EXPECT_TRUE(at::equal(back.v_targets, c.v_targets));
  EXPECT_TRUE(at::equal(back.i_star, c.i_star));
  Concept half = DecodeConcept(EncodeConcept(c));
  EXPECT_TRUE(at::equal(half.i_star, c.i_star)) << "i* is always stored in float32";
  EXPECT_TRUE(at::equal(half.v_targets, c.v_targets.to(at::kHalf).to(at::kFloat)));
  EXPECT_TRUE(at::equal(half.v_target(2), half.v_targets.narrow(0, 640, 640)));
  // Deterministic bytes.
  EXPECT_EQ(EncodeConcept(c), EncodeConcept(c));
}

// `blob` with the first `from` in its JSON header replaced by `to`: the header's length, padding and
// the checksum are made right again, so only the edit is wrong.
std::string WithHeaderEdited(const std::string& blob, const std::string& from, const std::string& to) {
  auto u32 = [](const char* p) {
    return static_cast<uint32_t>(static_cast<uint8_t>(p[0])) | static_cast<uint32_t>(static_cast<uint8_t>(p[1])) << 8 |
           static_cast<uint32_t>(static_cast<uint8_t>(p[2])) << 16 | static_cast<uint32_t>(static_cast<uint8_t>(p[3])) << 24;
  };
  auto put = [](std::string& out, uint32_t v) {
    for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  };
  const uint32_t header_len = u32(blob.data() + 4);
  std::string json = blob.substr(8, header_len);
  while (!json.empty() && json.back() == ' ') json.pop_back();
  const size_t at = json.find(from);
  if (at == std::string::npos) return blob;
  json.replace(at, from.size(), to);
  while ((8 + json.size()) % 8 != 0) json.push_back(' ');
  std::string out = blob.substr(0, 4);
  put(out, static_cast<uint32_t>(json.size()));
  out += json;
  out += blob.substr(8 + header_len, blob.size() - 4 - 8 - header_len);
  put(out, Crc32c(out.data(), out.size()));
  return out;
}

std::string ErrorOf(const std::string& blob, const std::string& base = "") {
  try {
    DecodeConcept(blob, base);
  } catch (const c10::ValueError& e) {
    return e.what_without_backtrace();
  }
  return "";
}

TEST_F(ConceptTest, CorruptTruncatedOrForeignBlobsAreRejected) {
  const std::string blob = EncodeConcept(c);
  EXPECT_NE(ErrorOf(blob.substr(0, blob.size() / 2)).find("concept blob: "), std::string::npos);
  EXPECT_NE(ErrorOf("").find("too short"), std::string::npos);
  EXPECT_NE(ErrorOf("PNG\x0d not a concept at all").find("magic"), std::string::npos);
  std::string flipped = blob;
  flipped[blob.size() / 2] ^= 0x40;
  EXPECT_NE(ErrorOf(flipped).find("checksum"), std::string::npos);
  EXPECT_NE(ErrorOf(blob, "another-model").find("another-model"), std::string::npos);
  EXPECT_EQ(ErrorOf(blob, "sd15-test"), "");
  // Every single-byte truncation point fails cleanly (never a crash).
  for (size_t n = 0; n < blob.size(); n += 97) EXPECT_NE(ErrorOf(blob.substr(0, n)), "") << n;
}

// Hostile but well-formed blobs: values that overflow half precision (or the attention in any
// precision: once they gave black images reported as a success), layer widths whose sum would
// overflow, and a negative superclass token.
TEST_F(ConceptTest, OutOfRangeValuesWidthsAndTokenIdsAreRejected) {
  Concept huge = c;
  huge.v_targets = at::full({c.total_out_dim()}, 1e30);
  EXPECT_NE(ErrorOf(EncodeConcept(huge, {at::kFloat})).find("tensor 'v_targets' has values beyond"), std::string::npos);
  Concept big_embedding = c;  // copies share tensors: clone before writing
  big_embedding.embedding = c.embedding.clone();
  big_embedding.embedding[3] = -7e4;
  EXPECT_NE(ErrorOf(EncodeConcept(big_embedding, {at::kFloat})).find("tensor 'embedding' has values beyond"),
            std::string::npos);
  Concept at_the_limit = c;
  at_the_limit.v_targets = c.v_targets.clone();
  at_the_limit.v_targets[0] = kMaxConceptValue;
  EXPECT_EQ(ErrorOf(EncodeConcept(at_the_limit, {at::kFloat})), "");
  // Widths as a hostile header would give them (EncodeConcept refuses to write such a concept).
  const std::string blob = EncodeConcept(c, {at::kFloat});
  const std::string layer0 = "\"name\":\"layer0.attn2\",\"out_dim\":320";
  ASSERT_NE(blob.find(layer0), std::string::npos);
  EXPECT_NE(ErrorOf(WithHeaderEdited(blob, layer0, "\"name\":\"layer0.attn2\",\"out_dim\":4611686018427387904"))
                .find("layer 'layer0.attn2' has a bad out_dim"),
            std::string::npos);
  EXPECT_NE(ErrorOf(WithHeaderEdited(blob, layer0, "\"name\":\"layer0.attn2\",\"out_dim\":0")).find("bad out_dim"),
            std::string::npos);
  Concept negative = c;
  negative.superclass_token_id = -7;
  EXPECT_NE(ErrorOf(EncodeConcept(negative)).find("superclass_token_id -7 is negative"), std::string::npos);
}

// A zero i* has no direction to gate on. A default gate outside the user ranges still decodes
// (blobs from before the ranges were enforced); the worker and perfusion-generate check it where
// they use it (EngineGenerateTest). A non-positive temperature never decodes.
TEST_F(ConceptTest, ZeroDirectionsAndNonPositiveTemperaturesAreRejected) {
  Concept old = c;
  old.default_gate = {5.0, 2.0};
  EXPECT_EQ(ErrorOf(EncodeConcept(old)), "");
  Concept bad = c;
  bad.default_gate = {0.7, 0.0};
  EXPECT_NE(ErrorOf(EncodeConcept(bad)).find("default gate temperature must be > 0"), std::string::npos);
  Concept zero = c;
  zero.i_star = at::zeros_like(c.i_star);
  EXPECT_NE(ErrorOf(EncodeConcept(zero)).find("i_star or i_sup is all zeros"), std::string::npos);
  EXPECT_EQ(ErrorOf(EncodeConcept(c)), "");
}

TEST_F(ConceptTest, TrainedKeyTargetsRoundTripWhenPresent) {
  EXPECT_FALSE(DecodeConcept(EncodeConcept(c)).k_targets.defined());
  Concept trained_k = c;
  trained_k.k_targets = at::randn({c.total_out_dim()});
  Concept back = DecodeConcept(EncodeConcept(trained_k, {at::kFloat}));
  ASSERT_TRUE(back.k_targets.defined());
  EXPECT_TRUE(at::equal(back.k_target(3), trained_k.k_targets.narrow(0, 1280, 640)));
  EXPECT_THROW(c.k_target(0), c10::ValueError);
}

TEST_F(ConceptTest, EncodeRefusesInconsistentConcepts) {
  Concept bad = c;
  bad.v_targets = at::randn({100});
  EXPECT_THROW(EncodeConcept(bad), c10::ValueError);
  bad = c;
  bad.name = "";
  EXPECT_THROW(EncodeConcept(bad), c10::ValueError);
}

TEST(Crc32cTest, MatchesTheStandardCheckValue) {
  EXPECT_EQ(Crc32c("123456789", 9), 0xE3069283u);
}

}  // namespace
}  // namespace perfusion

#include "perfusion/safetensors.h"

#include <ATen/Functions.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <string>

#include "perfusion/json_text.h"
#include "tests/engine/test_util.h"

namespace perfusion {
namespace {

std::string TempPath(const std::string& name) {
  return ::testing::TempDir() + "/" + name + "_" + std::to_string(::getpid());
}

TEST(SafetensorsTest, RoundTripKeepsValuesDtypesShapesAndMetadata) {
  auto f32 = at::randn({3, 5});
  auto f16 = at::randn({7}).to(at::kHalf);
  auto bf16 = at::randn({2, 2}).to(at::kBFloat16);
  auto i64 = at::arange(10, at::kLong).reshape({2, 5});
  auto f64 = at::randn({4}, at::kDouble);
  auto u8 = at::arange(3, at::kByte);
  const std::string path = TempPath("rt.safetensors");
  SaveSafetensors(path, {{"a", f32}, {"b", f16}, {"c", bf16}, {"d", i64}, {"e", f64}, {"u", u8}},
                  {{"format", "pt"}, {"k", "v"}});
  std::map<std::string, std::string> meta;
  auto t = LoadSafetensors(path, &meta);
  ASSERT_EQ(t.size(), 6u);
  EXPECT_TRUE(at::equal(t["a"], f32));
  EXPECT_TRUE(at::equal(t["b"], f16));
  EXPECT_TRUE(at::equal(t["c"], bf16));
  EXPECT_TRUE(at::equal(t["d"], i64));
  EXPECT_TRUE(at::equal(t["e"], f64));
  EXPECT_TRUE(at::equal(t["u"], u8));
  EXPECT_EQ(meta["k"], "v");
  std::remove(path.c_str());
}

TEST(SafetensorsTest, WritingToALoadedTensorDoesNotChangeTheFile) {
  const std::string path = TempPath("cow.safetensors");
  SaveSafetensors(path, {{"x", at::zeros({4})}});
  {
    auto t = LoadSafetensors(path);
    t["x"].fill_(3.0);
  }
  EXPECT_EQ(LoadSafetensors(path)["x"].sum().item<float>(), 0.0f);
  std::remove(path.c_str());
}

TEST(SafetensorsTest, ReadsTheSharedCovarianceFile) {
  const std::string path = testing::SharedDir() + "/data/sd15/clip_vit_l14_covariance.safetensors";
  if (!testing::FileExists(path)) GTEST_SKIP() << "no shared data at " << path;
  auto r = SafetensorsReader::Open(path);
  ASSERT_TRUE(r->contains("C"));
  auto c = r->get("C");
  EXPECT_EQ(c.sizes(), (at::IntArrayRef{768, 768}));
  EXPECT_TRUE(at::equal(c, c.t()));  // exactly symmetric
  EXPECT_NEAR(c.diagonal().max().item<float>(), 4035.8f, 0.1f);
}

class SafetensorsCorruptionTest : public ::testing::Test {
 protected:
  void WriteRaw(const std::string& bytes) { WriteFileAtomically(path_, bytes); }
  void ExpectRejected(const std::string& fragment) {
    try {
      auto r = SafetensorsReader::Open(path_);
      for (const auto& n : r->names()) r->get(n);
      FAIL() << "expected an error mentioning '" << fragment << "'";
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what_without_backtrace()).find(fragment), std::string::npos)
          << e.what_without_backtrace();
    }
  }
  std::string Valid() { return SerializeSafetensors({{"w", at::ones({4, 4})}}); }
  void TearDown() override { std::remove(path_.c_str()); }
  std::string path_ = TempPath("bad.safetensors");
};

TEST_F(SafetensorsCorruptionTest, EmptyFile) {
  WriteRaw("");
  ExpectRejected("truncated");
}
TEST_F(SafetensorsCorruptionTest, HeaderLongerThanFile) {
  std::string b = Valid();
  WriteRaw(b.substr(0, 20));
  ExpectRejected("truncated");
}
TEST_F(SafetensorsCorruptionTest, DataTruncated) {
  std::string b = Valid();
  WriteRaw(b.substr(0, b.size() - 4));
  ExpectRejected("past the end");
}
TEST_F(SafetensorsCorruptionTest, NotJson) {
  std::string b = Valid();
  b[9] = '!';
  WriteRaw(b);
  ExpectRejected("JSON");
}
TEST_F(SafetensorsCorruptionTest, UnsupportedDtype) {
  std::string b = Valid();
  auto pos = b.find("\"F32\"");
  b.replace(pos, 5, "\"X32\"");
  WriteRaw(b);
  ExpectRejected("unsupported dtype");
}
TEST_F(SafetensorsCorruptionTest, SizeMismatch) {
  std::string b = Valid();
  auto pos = b.find("[4,4]");
  b.replace(pos, 5, "[4,3]");
  WriteRaw(b);
  ExpectRejected("bytes of data");
}
TEST_F(SafetensorsCorruptionTest, HugeHeaderLength) {
  std::string b = Valid();
  b[7] = '\x7f';
  WriteRaw(b);
  ExpectRejected("header length");
}

// A shape whose byte size overflows 64 bits (2 x (2^60 + 1) F64 = 16 bytes after the wrap-around) was
// accepted over 16 bytes of data; so was any dimension after a 0. Both are refused now.
std::string RawFile(const std::string& header, size_t data_bytes) {
  std::string len(8, '\0');
  for (int i = 0; i < 8; ++i) len[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  return len + header + std::string(data_bytes, '\0');
}
TEST_F(SafetensorsCorruptionTest, ByteSizeOverflowIsRejected) {
  WriteRaw(RawFile(R"({"C":{"dtype":"F64","shape":[2,1152921504606846977],"data_offsets":[0,16]}})", 16));
  ExpectRejected("shape overflows");
}
TEST_F(SafetensorsCorruptionTest, HugeDimensionAfterAZeroIsRejected) {
  WriteRaw(RawFile(R"({"C":{"dtype":"F32","shape":[0,18446744073709551615],"data_offsets":[0,0]}})", 0));
  ExpectRejected("shape overflows");
}

// The error message quotes the bad dimension; quoting a value nested 200,000 deep with nlohmann's
// recursive dump() overflowed the stack (SIGSEGV) instead of raising.
TEST_F(SafetensorsCorruptionTest, DeeplyNestedDimensionIsAnErrorNotACrash) {
  const int depth = 200000;
  WriteRaw(RawFile(R"({"C":{"dtype":"F32","shape":[)" + std::string(depth, '[') + std::string(depth, ']') +
                       R"(],"data_offsets":[0,0]}})",
                   0));
  ExpectRejected("bad dimension <array nested more than 8 deep>");
}

TEST(JsonForMessageTest, QuotesShallowValuesAndSummarisesDeepOnes) {
  EXPECT_EQ(JsonForMessage(nlohmann::json::parse(R"([1, "a", {"b": null}])")), R"([1,"a",{"b":null}])");
  EXPECT_EQ(JsonForMessage(nlohmann::json::parse(std::string(9, '[') + std::string(9, ']'))),
            "<array nested more than 8 deep>");
  EXPECT_EQ(JsonForMessage(nlohmann::json::parse(std::string(8, '[') + std::string(8, ']'))), "[[[[[[[[]]]]]]]]");
  EXPECT_EQ(JsonForMessage(std::string(500, 'x')), "\"" + std::string(199, 'x') + "...");
}

}  // namespace
}  // namespace perfusion

// Tests for perfusion/tokenizer.h: the CLIP BPE tokenizer against the reference ids in
// ../shared/data/clip (SOURCE.md there), plus cleanup, framing, errors and thread safety.
#include "perfusion/tokenizer.h"

#include <c10/util/Exception.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tests/engine/test_util.h"

namespace perfusion {
namespace {

using testing::EnvOr;
using testing::FileExists;
using testing::SharedDir;

std::string VocabDir() { return EnvOr("PERFUSION_CLIP_VOCAB_DIR", SharedDir() + "/data/clip/"); }
std::string VectorsPath() {
  return EnvOr("PERFUSION_TOKENIZER_VECTORS",
               SharedDir() + "/data/clip/tokenizer_vectors_public.jsonl");
}
bool HaveVocab() {
  return FileExists(VocabDir() + "/vocab.json") && FileExists(VocabDir() + "/merges.txt");
}

// A scratch folder under /tmp, removed with its files at the end of the test.
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/perfusion_tokenizer_test_XXXXXX";
    const char* made = ::mkdtemp(tmpl);
    EXPECT_NE(made, nullptr);
    path_ = made != nullptr ? made : "/tmp";
  }
  ~TempDir() {
    for (const std::string& f : files_) std::remove(f.c_str());
    ::rmdir(path_.c_str());
  }
  std::string Write(const std::string& name, const std::string& content) {
    const std::string file = path_ + "/" + name;
    std::ofstream(file, std::ios::binary) << content;
    files_.push_back(file);
    return file;
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::vector<std::string> files_;
};

// The error message of `fn`, which must throw c10::Error ("" and a failure otherwise).
template <typename Fn>
std::string ErrorOf(Fn fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  ADD_FAILURE() << "expected a c10::Error";
  return "";
}

class ClipTokenizerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (HaveVocab()) tok_ = ClipTokenizer::Load(VocabDir());
  }
  static void TearDownTestSuite() { tok_.reset(); }
  void SetUp() override {
    if (!tok_) GTEST_SKIP() << "no CLIP vocabulary (vocab.json + merges.txt) in " << VocabDir();
  }
  static std::shared_ptr<const ClipTokenizer> tok_;
};
std::shared_ptr<const ClipTokenizer> ClipTokenizerTest::tok_;

TEST_F(ClipTokenizerTest, ReproducesEveryReferenceVector) {
  const std::string path = VectorsPath();
  if (!FileExists(path)) GTEST_SKIP() << "no tokenizer vectors at " << path;
  std::ifstream in(path);
  std::string line;
  int checked = 0;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    const nlohmann::json v = nlohmann::json::parse(line);
    const std::string text = v.at("text").get<std::string>();
    const auto expected = v.at("ids").get<std::vector<int64_t>>();
    const int expected_length = v.at("length").get<int>();
    ASSERT_EQ(expected.size(), 77u) << "vector file " << path << " line " << checked + 1;
    const ClipTokenizer::Padded got = tok_->EncodePadded(text, 77);
    EXPECT_EQ(got.ids, expected) << "text: \"" << text << "\"";
    EXPECT_EQ(got.length, expected_length) << "text: \"" << text << "\"";
    // Unpadded, the same text has length - 2 tokens unless the reference had to cut it.
    const auto ids = tok_->Encode(text);
    EXPECT_EQ(got.truncated, ids.size() > 75) << "text: \"" << text << "\"";
    if (!got.truncated) EXPECT_EQ(static_cast<int>(ids.size()) + 2, expected_length);
    ++checked;
  }
  EXPECT_GT(checked, 0) << "no vectors in " << path;
}

TEST_F(ClipTokenizerTest, VocabularyMatchesSourceSpotChecks) {
  EXPECT_EQ(tok_->vocab_size(), 49408);
  EXPECT_EQ(tok_->num_merges(), 48894);
  EXPECT_EQ(tok_->bos_id(), 49406);
  EXPECT_EQ(tok_->eos_id(), 49407);
  EXPECT_EQ(tok_->pad_id(), 49407);
  EXPECT_EQ(tok_->IdToToken(320), "a</w>");
  EXPECT_EQ(tok_->IdToToken(539), "of</w>");
  EXPECT_EQ(tok_->IdToToken(1125), "photo</w>");
  EXPECT_EQ(tok_->IdToToken(1929), "dog</w>");
  EXPECT_EQ(tok_->IdToToken(0), "!");
  EXPECT_EQ(tok_->IdToToken(64), "a");
  EXPECT_EQ(tok_->IdToToken(49406), "<|startoftext|>");
  EXPECT_EQ(tok_->IdToToken(49407), "<|endoftext|>");
}

TEST_F(ClipTokenizerTest, EncodesWordsWithWordEndTokens) {
  EXPECT_EQ(tok_->Encode("a photo of a dog"), (std::vector<int64_t>{320, 1125, 539, 320, 1929}));
  EXPECT_TRUE(tok_->Encode("").empty());
  EXPECT_TRUE(tok_->Encode(" \t\n ").empty());
  // A literal special token in the text is the special token, as in CLIP's SimpleTokenizer.
  EXPECT_EQ(tok_->Encode("dog<|endoftext|>"), (std::vector<int64_t>{1929, 49407}));
}

TEST_F(ClipTokenizerTest, PadsWithEndTokenAfterTheText) {
  const auto p = tok_->EncodePadded("a photo of a dog");
  ASSERT_EQ(p.ids.size(), 77u);
  EXPECT_EQ(p.length, 7);
  EXPECT_FALSE(p.truncated);
  EXPECT_EQ(std::vector<int64_t>(p.ids.begin(), p.ids.begin() + 7),
            (std::vector<int64_t>{49406, 320, 1125, 539, 320, 1929, 49407}));
  for (size_t i = 7; i < 77; ++i) EXPECT_EQ(p.ids[i], 49407) << "position " << i;

  const auto empty = tok_->EncodePadded("");
  EXPECT_EQ(empty.length, 2);
  EXPECT_EQ(empty.ids[0], 49406);
  EXPECT_EQ(empty.ids[1], 49407);
}

TEST_F(ClipTokenizerTest, TruncationKeepsEndTokenInLastPosition) {
  std::string long_text;
  for (int i = 0; i < 200; ++i) long_text += "dog ";
  const auto p = tok_->EncodePadded(long_text);
  ASSERT_EQ(p.ids.size(), 77u);
  EXPECT_TRUE(p.truncated);
  EXPECT_EQ(p.length, 77);
  EXPECT_EQ(p.ids[0], 49406);
  for (size_t i = 1; i < 76; ++i) EXPECT_EQ(p.ids[i], 1929) << "position " << i;
  EXPECT_EQ(p.ids[76], 49407);

  // Exactly 75 text tokens fit; 76 do not.
  std::string fits, over;
  for (int i = 0; i < 75; ++i) fits += "dog ";
  over = fits + "dog";
  EXPECT_FALSE(tok_->EncodePadded(fits).truncated);
  EXPECT_EQ(tok_->EncodePadded(fits).length, 77);
  EXPECT_TRUE(tok_->EncodePadded(over).truncated);

  // Other lengths frame the same way.
  const auto short_frame = tok_->EncodePadded("a photo of a dog", 4);
  EXPECT_EQ(short_frame.ids, (std::vector<int64_t>{49406, 320, 1125, 49407}));
  EXPECT_TRUE(short_frame.truncated);
}

TEST_F(ClipTokenizerTest, EncodePaddedRejectsLengthWithoutRoomForStartAndEnd) {
  EXPECT_THROW(tok_->EncodePadded("dog", 1), c10::ValueError);
  const auto p = tok_->EncodePadded("dog", 2);
  EXPECT_EQ(p.ids, (std::vector<int64_t>{49406, 49407}));
  EXPECT_TRUE(p.truncated);
}

TEST_F(ClipTokenizerTest, SingleTokenIdAcceptsOnlyOneTokenWords) {
  EXPECT_EQ(tok_->SingleTokenId("dog"), std::optional<int64_t>(1929));
  EXPECT_EQ(tok_->SingleTokenId("Dog "), std::optional<int64_t>(1929));  // cleaned like a prompt
  EXPECT_EQ(tok_->SingleTokenId("teddy bear"), std::nullopt);
  EXPECT_EQ(tok_->SingleTokenId(""), std::nullopt);
  EXPECT_EQ(tok_->SingleTokenId("<|endoftext|>"), std::nullopt);
  EXPECT_EQ(tok_->SingleTokenId("<|startoftext|>"), std::nullopt);
  // A rare string splits into several pieces.
  EXPECT_GT(tok_->Encode("qxzvkj").size(), 1u);
  EXPECT_EQ(tok_->SingleTokenId("qxzvkj"), std::nullopt);
}

TEST_F(ClipTokenizerTest, DecodeInvertsEncodeForLowerCaseAscii) {
  for (const std::string text : {"a photo of a dog", "sks teapot on a wooden table", "hello",
                                 "an astronaut riding a horse on the moon"}) {
    EXPECT_EQ(tok_->Decode(tok_->Encode(text)), text);
  }
  std::mt19937 rng(1234);
  std::uniform_int_distribution<int> letter('a', 'z'), word_len(1, 12), words(1, 10);
  for (int trial = 0; trial < 200; ++trial) {
    std::string text;
    const int n = words(rng);
    for (int w = 0; w < n; ++w) {
      if (w > 0) text += ' ';
      const int len = word_len(rng);
      for (int k = 0; k < len; ++k) text += static_cast<char>(letter(rng));
    }
    EXPECT_EQ(tok_->Decode(tok_->Encode(text)), text);
  }
  // Punctuation becomes its own word; non-ASCII bytes come back whole.
  EXPECT_EQ(tok_->Decode(tok_->Encode("Hello, World!")), "hello , world !");
  EXPECT_EQ(tok_->Decode(tok_->Encode("café 🐶")), "café 🐶");
}

TEST_F(ClipTokenizerTest, RejectsIdsOutsideTheVocabulary) {
  EXPECT_THROW(tok_->Decode({320, 49408}), c10::IndexError);
  EXPECT_THROW(tok_->Decode({-1}), c10::IndexError);
  EXPECT_THROW(tok_->IdToToken(49408), c10::IndexError);
  EXPECT_NE(ErrorOf([&] { tok_->Decode({1, 2, 99999}); }).find("ids[2]"), std::string::npos);
}

TEST_F(ClipTokenizerTest, ConcurrentEncodingGivesIdenticalIds) {
  // A fresh tokenizer, so the four threads fill its (empty) cache concurrently.
  const auto fresh = ClipTokenizer::Load(VocabDir());
  std::vector<std::string> prompts;
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> letter('a', 'z'), len(1, 14);
  for (int i = 0; i < 300; ++i) {
    std::string p = "a photo of ";
    for (int w = 0; w < 6; ++w) {
      const int n = len(rng);
      for (int k = 0; k < n; ++k) p += static_cast<char>(letter(rng));
      p += w % 2 ? ", " : " ";
    }
    prompts.push_back(p);
  }
  std::vector<std::vector<int64_t>> expected;
  for (const auto& p : prompts) expected.push_back(tok_->EncodePadded(p).ids);

  constexpr int kThreads = 4;
  std::vector<std::vector<std::vector<int64_t>>> got(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 3; ++round) {
        got[t].clear();
        // Each thread walks the prompts from a different start, so threads race on new words.
        for (size_t i = 0; i < prompts.size(); ++i) {
          const size_t k = (i + t * prompts.size() / kThreads) % prompts.size();
          got[t].push_back(fresh->EncodePadded(prompts[k]).ids);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) {
    ASSERT_EQ(got[t].size(), prompts.size());
    for (size_t i = 0; i < prompts.size(); ++i) {
      const size_t k = (i + t * prompts.size() / kThreads) % prompts.size();
      EXPECT_EQ(got[t][i], expected[k]) << "thread " << t << ", prompt \"" << prompts[k] << "\"";
    }
  }
}

// ---- Cleanup and split (CLIP's basic_clean, whitespace_clean, lower, regex). ----
using Pieces = std::vector<std::string>;

TEST(ClipPreTokenizeTest, CollapsesWhitespaceAndLowerCases) {
  EXPECT_EQ(ClipTokenizer::PreTokenize("  A\tDOG\n\r\n  Runs\u00a0Fast\u3000 "),
            (Pieces{"a", "dog", "runs", "fast"}));
  EXPECT_EQ(ClipTokenizer::PreTokenize(""), Pieces{});
}

TEST(ClipPreTokenizeTest, SplitsContractionsLettersDigitsAndPunctuation) {
  EXPECT_EQ(ClipTokenizer::PreTokenize("A dog's toy!"), (Pieces{"a", "dog", "'s", "toy", "!"}));
  EXPECT_EQ(ClipTokenizer::PreTokenize("they're WE'LL i'd"),
            (Pieces{"they", "'re", "we", "'ll", "i", "'d"}));
  EXPECT_EQ(ClipTokenizer::PreTokenize("1024px,  8k"),
            (Pieces{"1", "0", "2", "4", "px", ",", "8", "k"}));
  // A punctuation run swallows an apostrophe that no contraction claims.
  EXPECT_EQ(ClipTokenizer::PreTokenize("...'s (x)"), (Pieces{"...'", "s", "(", "x", ")"}));
  EXPECT_EQ(ClipTokenizer::PreTokenize("<new1>"), (Pieces{"<", "new", "1", ">"}));
}

TEST(ClipPreTokenizeTest, ClassifiesUnicodeLettersAndNumbers) {
  EXPECT_EQ(ClipTokenizer::PreTokenize("Café Ωμέγα ПРИВЕТ 日本語"),
            (Pieces{"café", "ωμέγα", "привет", "日本語"}));
  EXPECT_EQ(ClipTokenizer::PreTokenize("½²Ⅻ٣"), (Pieces{"½", "²", "ⅻ", "٣"}));
  EXPECT_EQ(ClipTokenizer::PreTokenize("a 🐶🎩!"), (Pieces{"a", "🐶🎩!"}));
  // Python's lower(): final sigma and dotted capital I.
  EXPECT_EQ(ClipTokenizer::PreTokenize("ΟΔΟΣ ΣΑ"), (Pieces{"οδος", "σα"}));
  EXPECT_EQ(ClipTokenizer::PreTokenize("İ"), (Pieces{"i", "\u0307"}));
  // No NFC: a decomposed accent stays a separate piece.
  EXPECT_EQ(ClipTokenizer::PreTokenize("cafe\u0301"), (Pieces{"cafe", "\u0301"}));
}

TEST(ClipPreTokenizeTest, UnescapesHtmlTwice) {
  EXPECT_EQ(ClipTokenizer::PreTokenize("fish &amp; chips"), (Pieces{"fish", "&", "chips"}));
  EXPECT_EQ(ClipTokenizer::PreTokenize("fish &amp;amp; chips"), (Pieces{"fish", "&", "chips"}));
  EXPECT_EQ(ClipTokenizer::PreTokenize("dog&#39;s &#x41;&lt;"), (Pieces{"dog", "'s", "a", "<"}));
  EXPECT_EQ(ClipTokenizer::PreTokenize("&ampx &#128; &hellip;"), (Pieces{"&", "x", "€", "…"}));
  EXPECT_EQ(ClipTokenizer::PreTokenize("&#0;&#1;"), (Pieces{"\uFFFD"}));
  EXPECT_EQ(ClipTokenizer::PreTokenize("a&b &unknownname; &#"),
            (Pieces{"a", "&", "b", "&", "unknownname", ";", "&#"}));
}

TEST(ClipPreTokenizeTest, AppliesFtfyCharacterFixes) {
  EXPECT_EQ(ClipTokenizer::PreTokenize("don\u2019t \u201Cstop\u201D"),
            (Pieces{"don", "'t", "\"", "stop", "\""}));
  EXPECT_EQ(ClipTokenizer::PreTokenize("\uFF43\uFF41\uFF54\uFF01 \uFB01sh"),
            (Pieces{"cat", "!", "fish"}));
  EXPECT_EQ(ClipTokenizer::PreTokenize("\x1b[31mred\x1b[0m a\x01" "b\x7f"), (Pieces{"red", "ab"}));
  EXPECT_EQ(ClipTokenizer::PreTokenize("it\u0092s"), (Pieces{"it", "'s"}));  // C1 as Windows-1252
}

TEST(ClipPreTokenizeTest, ReplacesInvalidUtf8) {
  EXPECT_EQ(ClipTokenizer::PreTokenize("a\xff" "b"), (Pieces{"a", "\uFFFD", "b"}));
  EXPECT_EQ(ClipTokenizer::PreTokenize("a\xe2\x82" "b"), (Pieces{"a", "\uFFFD", "b"}));
  EXPECT_EQ(ClipTokenizer::PreTokenize("\xed\xa0\x80"), (Pieces{"\uFFFD\uFFFD\uFFFD"}));
}

// ---- Loading. ----
// The byte symbols of CLIP's bytes_to_unicode(), as UTF-8.
std::vector<std::string> ByteSymbolsForTest() {
  std::vector<std::string> out;
  int next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    const int cp = printable ? b : next++;
    std::string s;
    if (cp < 0x80) {
      s.push_back(static_cast<char>(cp));
    } else {
      s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
    out.push_back(s);
  }
  return out;
}

// A tiny vocabulary: the 512 byte symbols, the given merges, and the two special tokens.
std::string TinyVocab(const std::vector<std::pair<std::string, std::string>>& merges) {
  nlohmann::json v = nlohmann::json::object();
  int id = 0;
  for (const auto& s : ByteSymbolsForTest()) v[s] = id++;
  for (const auto& s : ByteSymbolsForTest()) v[s + "</w>"] = id++;
  for (const auto& m : merges) v[m.first + m.second] = id++;
  v["<|startoftext|>"] = id++;
  v["<|endoftext|>"] = id++;
  return v.dump();
}

TEST(ClipTokenizerLoadTest, LowerRankMergeAppliesFirst) {
  TempDir dir;
  // "abc": (b, c</w>) has rank 0 and wins over (a, b) at rank 1.
  const auto vocab = dir.Write("vocab.json", TinyVocab({{"b", "c</w>"}, {"a", "b"}}));
  auto tok = ClipTokenizer::FromFiles(vocab, dir.Write("m1.txt", "#version: 0.2\nb c</w>\na b\n"));
  EXPECT_EQ(tok->num_merges(), 2);
  auto pieces = [&](const std::string& text) {
    std::vector<std::string> out;
    for (int64_t id : tok->Encode(text)) out.push_back(tok->IdToToken(id));
    return out;
  };
  EXPECT_EQ(pieces("abc"), (Pieces{"a", "bc</w>"}));
  // Swapped ranks: (a, b) first, and then no merge joins "ab" with "c</w>".
  tok = ClipTokenizer::FromFiles(vocab, dir.Write("m2.txt", "#version: 0.2\na b\nb c</w>\n"));
  EXPECT_EQ(pieces("abc"), (Pieces{"ab", "c</w>"}));
  // Every occurrence of the best pair merges, left to right.
  EXPECT_EQ(pieces("ababx"), (Pieces{"ab", "ab", "x</w>"}));
  EXPECT_EQ(pieces("a"), (Pieces{"a</w>"}));
}

TEST(ClipTokenizerLoadTest, MissingVocabFileErrorNamesTheFile) {
  TempDir dir;
  dir.Write("merges.txt", "#version: 0.2\n");
  const std::string msg = ErrorOf([&] { ClipTokenizer::Load(dir.path()); });
  EXPECT_NE(msg.find(dir.path() + "/vocab.json"), std::string::npos) << msg;
  EXPECT_NE(msg.find("does not exist"), std::string::npos) << msg;
}

TEST(ClipTokenizerLoadTest, CorruptVocabFileErrorNamesTheFile) {
  TempDir dir;
  const auto merges = dir.Write("merges.txt", "#version: 0.2\na b\n");
  const auto truncated = dir.Write("truncated.json", "{\"a\": 0, \"b\": ");
  std::string msg = ErrorOf([&] { ClipTokenizer::FromFiles(truncated, merges); });
  EXPECT_NE(msg.find(truncated), std::string::npos) << msg;
  EXPECT_NE(msg.find("not valid JSON"), std::string::npos) << msg;

  const auto gap = dir.Write("gap.json", "{\"a\": 0, \"b\": 5}");
  msg = ErrorOf([&] { ClipTokenizer::FromFiles(gap, merges); });
  EXPECT_NE(msg.find(gap), std::string::npos) << msg;
  EXPECT_NE(msg.find("dense"), std::string::npos) << msg;

  const auto no_bytes = dir.Write("no_bytes.json", "{\"a\": 0, \"b\": 1}");
  msg = ErrorOf([&] { ClipTokenizer::FromFiles(no_bytes, merges); });
  EXPECT_NE(msg.find(no_bytes), std::string::npos) << msg;
  EXPECT_NE(msg.find("lacks the token"), std::string::npos) << msg;
}

TEST(ClipTokenizerLoadTest, CorruptMergesFileErrorNamesFileAndLine) {
  TempDir dir;
  const auto vocab = dir.Write("vocab.json", TinyVocab({{"a", "b"}}));
  const auto bad_token = dir.Write("bad_token.txt", "#version: 0.2\na b\nzz q\n");
  std::string msg = ErrorOf([&] { ClipTokenizer::FromFiles(vocab, bad_token); });
  EXPECT_NE(msg.find(bad_token), std::string::npos) << msg;
  EXPECT_NE(msg.find("line 3"), std::string::npos) << msg;

  const auto bad_shape = dir.Write("bad_shape.txt", "#version: 0.2\nab\n");
  msg = ErrorOf([&] { ClipTokenizer::FromFiles(vocab, bad_shape); });
  EXPECT_NE(msg.find(bad_shape), std::string::npos) << msg;
  EXPECT_NE(msg.find("line 2"), std::string::npos) << msg;

  const auto missing = dir.path() + "/none.txt";
  msg = ErrorOf([&] { ClipTokenizer::FromFiles(vocab, missing); });
  EXPECT_NE(msg.find(missing), std::string::npos) << msg;
}

}  // namespace
}  // namespace perfusion

// tokenizer: the CLIP byte-level BPE tokenizer (vocab.json + merges.txt, Hugging Face layout as in
// an SD 1.x diffusers `tokenizer/` folder).
//
// Ref: openai/CLIP `clip/simple_tokenizer.py` (SimpleTokenizer) and transformers
// `models/clip/tokenization_clip.py` (CLIPTokenizer). For text that ftfy leaves alone the ids
// equal SimpleTokenizer's, framed as Stable Diffusion frames them: <|startoftext|> + ids +
// <|endoftext|>, padded with <|endoftext|> to 77 (../shared/data/clip/SOURCE.md).
//
// Text pipeline (CLIP's basic_clean + whitespace_clean + lower + regex split):
//  1. UTF-8 decode. Invalid UTF-8 (a Python str cannot hold it) becomes U+FFFD, one per maximal
//     invalid subsequence, as Python's errors="replace" does.
//  2. The character-level part of ftfy.fix_text, in ftfy's order: fix_c1_controls (U+0080..U+009F
//     read as Windows-1252), fix_latin_ligatures, fix_character_width (full-/half-width forms and
//     U+3000), uncurl_quotes, remove_terminal_escapes (ESC [ ASCII digits/; letter),
//     remove_control_chars.
//     NOT done: fix_encoding (mojibake repair, heuristic), ftfy's own HTML unescaping, and NFC
//     normalization: decomposed text (e + U+0301) stays decomposed, so its combining mark is a
//     separate pre-token where CLIP would see a precomposed letter.
//  3. html.unescape twice (as CLIP does): numeric references (&#NNN; &#xHH;, semicolon optional)
//     exactly as Python's html.unescape (Windows-1252 for 0x80..0x9F, U+FFFD for 0, surrogates and
//     > U+10FFFF, dropped for the other invalid code points); named references for the HTML 4
//     Latin-1 set (also without ';', with Python's longest-prefix rule) plus ~50 common ones
//     (&apos; &hellip; &mdash; &rsquo; &euro; ...). Other HTML5 names are left as written.
//  4. Whitespace runs (Python str.isspace: Unicode White_Space plus U+001C..U+001F) become one
//     space; leading/trailing whitespace is removed.
//  5. Lower-casing as Python str.lower() (Unicode 14 tables; U+0130 -> "i" + U+0307; final sigma
//     with an approximate case-ignorable set covering Latin/Greek/Cyrillic punctuation and marks).
//  6. The CLIP split, a hand-written scanner equivalent to the regex
//       <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
//     (IGNORECASE, so "'ſ" also matches 's, and U+0345 matches no alternative and is dropped),
//     with \p{L} / \p{N} tables for every script (Unicode 15.0, as Python's `regex` module has
//     them). Checked against SimpleTokenizer (Python, `regex`, ftfy limited to the fixes above)
//     on ~30k random mixed-script strings: identical ids except the documented gaps.
//  7. Each pre-token's UTF-8 bytes are mapped through CLIP's bytes_to_unicode, the last symbol gets
//     "</w>", and merges are applied lowest rank first (all occurrences of the best pair, left to
//     right, as SimpleTokenizer.bpe). A literal "<|startoftext|>" / "<|endoftext|>" in the text
//     becomes the special token, as in SimpleTokenizer.
//
// Cost: a typical 30-token prompt takes ~3 us with a warm cache, ~85 us cold (2-core dev box).
// Cleanup and split are linear in the text; BPE is O(n^2) in the byte length n of one pre-token
// (a single 4 KB "word" takes ~0.1 s), so callers bound prompt size at the API edge. EncodePadded
// stops running BPE once the text has more tokens than fit.
//
// Thread safety: a ClipTokenizer is shared (shared_ptr<const>) and every method is safe to call
// from many threads. The vocabulary is immutable after loading; the per-word BPE cache is guarded
// by a shared mutex and holds at most kMaxCacheEntries words of at most kMaxCachedWordBytes bytes
// (cleared when full), so untrusted prompts cannot grow it without bound.
//
// Errors: Load/FromFiles throw c10::Error naming the file (and line or token) for a missing,
// unreadable or corrupt file. Bad ids raise c10::IndexError; bad arguments c10::ValueError.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace perfusion {

class ClipTokenizer {
 public:
  // Words cached before the cache is cleared (bounds memory under untrusted prompts).
  static constexpr size_t kMaxCacheEntries = 1 << 16;
  // Longer pre-tokens are not cached.
  static constexpr size_t kMaxCachedWordBytes = 128;

  // Loads `dir`/vocab.json and `dir`/merges.txt.
  static std::shared_ptr<const ClipTokenizer> Load(const std::string& dir);
  // vocab.json: one JSON object {token: id}, ids dense 0..N-1, holding the 512 byte symbols (with
  // and without "</w>"), every merge result, "<|startoftext|>" and "<|endoftext|>".
  // merges.txt: optional "#version" first line, then one "left right" merge per line in rank order
  // (both sides and their concatenation must be in the vocabulary; blank lines are skipped).
  static std::shared_ptr<const ClipTokenizer> FromFiles(const std::string& vocab_json,
                                                        const std::string& merges_txt);

  ClipTokenizer(const ClipTokenizer&) = delete;
  ClipTokenizer& operator=(const ClipTokenizer&) = delete;
  ~ClipTokenizer();

  // The BPE ids of `text` (steps 1-7 above): no start/end token, no truncation.
  std::vector<int64_t> Encode(const std::string& text) const;

  struct Padded {
    std::vector<int64_t> ids;  // exactly max_length ids
    int length = 0;            // real tokens including start and end (<= max_length)
    bool truncated = false;    // the text had more than max_length - 2 tokens
  };
  // <|startoftext|> + Encode(text) + <|endoftext|>, truncated to max_length with the end token kept
  // in the last position, then padded with pad_id() (= <|endoftext|>) to max_length.
  // REQUIRES: max_length >= 2 (else c10::ValueError).
  Padded EncodePadded(const std::string& text, int max_length = 77) const;

  // Concatenates the tokens, maps symbols back to bytes, decodes UTF-8 (invalid bytes -> U+FFFD),
  // turns each "</w>" into a space and trims (transformers' CLIPTokenizer.decode). Special tokens
  // are kept as text ("<|startoftext|>"). Decode(Encode(x)) == x for lower-case words separated by
  // single spaces. Throws c10::IndexError naming the position for an id outside [0, vocab_size()).
  std::string Decode(const std::vector<int64_t>& ids) const;

  // The id when `word` (after the same cleanup as Encode) is exactly one BPE token and not a
  // special token; nullopt otherwise ("dog" -> 1929, "teddy bear" -> nullopt, "" -> nullopt).
  std::optional<int64_t> SingleTokenId(const std::string& word) const;

  // The pre-tokens BPE sees (steps 1-6): cleaned, lower-cased, split. PreTokenize("A dog's toy!")
  // == {"a", "dog", "'s", "toy", "!"}. Encode(text) is the concatenation of their BPE ids.
  static std::vector<std::string> PreTokenize(const std::string& text);

  int64_t bos_id() const { return bos_id_; }
  int64_t eos_id() const { return eos_id_; }
  int64_t pad_id() const { return eos_id_; }
  int64_t vocab_size() const { return static_cast<int64_t>(id_to_token_.size()); }
  // The vocabulary string of `id` ("dog</w>"; byte symbols as in vocab.json).
  // Throws c10::IndexError for an id outside [0, vocab_size()).
  std::string IdToToken(int64_t id) const;
  // Number of merges (ranks) loaded from merges.txt.
  int64_t num_merges() const { return num_merges_; }

 private:
  struct Merge {
    int32_t rank;
    int32_t id;  // vocabulary id of the merged symbol
  };

  ClipTokenizer() = default;
  // Appends the ids of one pre-token (raw UTF-8) to `out`, through the cache.
  void AppendWordIds(const std::string& word, std::vector<int64_t>* out) const;
  // Uncached byte-level BPE of one pre-token.
  std::vector<int32_t> Bpe(const std::string& word) const;

  // Constant after construction.
  std::vector<std::string> id_to_token_;
  std::unordered_map<std::string, int32_t> token_to_id_;
  std::unordered_map<uint64_t, Merge> merges_;  // key: (left id << 32) | right id
  int32_t byte_id_[256] = {};                   // id of the symbol of byte b
  int32_t byte_end_id_[256] = {};               // id of the symbol of byte b + "</w>"
  int64_t bos_id_ = -1;
  int64_t eos_id_ = -1;
  int64_t num_merges_ = 0;

  // Per-word BPE cache, keyed by the pre-token's UTF-8. Protected by cache_mu_.
  mutable std::shared_mutex cache_mu_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
};

}  // namespace perfusion

#include "server/validation.h"

#include <zlib.h>

#include <cmath>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "absl/strings/string_view.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace perfusion::server {
namespace {

absl::Status Invalid(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

uint32_t Be32(const unsigned char* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | p[3];
}
uint16_t Be16(const unsigned char* p) { return static_cast<uint16_t>((p[0] << 8) | p[1]); }

absl::StatusOr<ImageInfo> InspectPng(absl::string_view bytes, absl::string_view field) {
  const auto* d = reinterpret_cast<const unsigned char*>(bytes.data());
  const size_t n = bytes.size();
  size_t pos = 8;
  ImageInfo info{ImageInfo::kPng, 0, 0};
  bool seen_ihdr = false, seen_idat = false, seen_iend = false;
  while (pos < n) {
    if (n - pos < 12) return Invalid(field, absl::StrCat("PNG truncated at byte ", pos));
    uint32_t len = Be32(d + pos);
    if (len > n - pos - 12) {
      return Invalid(field, absl::StrCat("PNG chunk at byte ", pos, " runs past the end"));
    }
    std::string type(reinterpret_cast<const char*>(d + pos + 4), 4);
    uint32_t crc = static_cast<uint32_t>(crc32(0L, d + pos + 4, len + 4));
    if (crc != Be32(d + pos + 8 + len)) {
      return Invalid(field, absl::StrCat("PNG chunk ", type, " at byte ", pos, " has a bad CRC"));
    }
    if (!seen_ihdr) {
      if (type != "IHDR" || len != 13) return Invalid(field, "PNG does not start with IHDR");
      seen_ihdr = true;
      uint32_t w = Be32(d + pos + 8), h = Be32(d + pos + 12);
      if (w == 0 || h == 0 || w > (1u << 24) || h > (1u << 24)) {
        return Invalid(field, absl::StrCat("PNG size ", w, "x", h, " is invalid"));
      }
      info.width = static_cast<int>(w);
      info.height = static_cast<int>(h);
    } else if (type == "IDAT") {
      seen_idat = true;
    } else if (type == "IEND") {
      seen_iend = true;
      pos += 12 + len;
      break;
    }
    pos += 12 + len;
  }
  if (!seen_ihdr) return Invalid(field, "PNG has no IHDR");
  if (!seen_idat) return Invalid(field, "PNG has no image data (IDAT)");
  if (!seen_iend) return Invalid(field, "PNG truncated (no IEND)");
  return info;
}

bool IsSof(unsigned char m) {
  return m >= 0xC0 && m <= 0xCF && m != 0xC4 && m != 0xC8 && m != 0xCC;
}

absl::StatusOr<ImageInfo> InspectJpeg(absl::string_view bytes, absl::string_view field) {
  const auto* d = reinterpret_cast<const unsigned char*>(bytes.data());
  const size_t n = bytes.size();
  size_t pos = 2;
  ImageInfo info{ImageInfo::kJpeg, 0, 0};
  bool seen_sof = false;
  for (;;) {
    if (pos >= n || d[pos] != 0xFF) {
      return Invalid(field, absl::StrCat("JPEG marker expected at byte ", pos));
    }
    while (pos < n && d[pos] == 0xFF) ++pos;  // fill bytes
    if (pos >= n) return Invalid(field, "JPEG truncated");
    unsigned char m = d[pos++];
    if (m == 0x01 || (m >= 0xD0 && m <= 0xD7)) continue;  // standalone markers
    if (m == 0xD9) return Invalid(field, "JPEG ends before any scan");
    if (n - pos < 2) return Invalid(field, "JPEG truncated");
    uint16_t len = Be16(d + pos);
    if (len < 2 || len > n - pos) {
      return Invalid(field, absl::StrCat("JPEG segment at byte ", pos, " runs past the end"));
    }
    if (IsSof(m)) {
      if (len < 8) return Invalid(field, "JPEG frame header too short");
      info.height = Be16(d + pos + 3);
      info.width = Be16(d + pos + 5);
      if (info.width == 0 || info.height == 0) {
        return Invalid(field, "JPEG frame header has a zero dimension");
      }
      // Four components are CMYK (or YCCK), which the workers do not decode.
      if (d[pos + 7] == 4) return Invalid(field, "CMYK JPEG is not supported; send an RGB or greyscale image");
      seen_sof = true;
    }
    pos += len;
    if (m == 0xDA) break;  // start of scan: entropy-coded data follows
  }
  if (!seen_sof) return Invalid(field, "JPEG has no frame header (SOF) before its scan");
  size_t end = n;
  while (end > pos && d[end - 1] == 0x00) --end;  // tolerate zero padding
  if (end < pos + 2 || d[end - 2] != 0xFF || d[end - 1] != 0xD9) {
    return Invalid(field, "JPEG truncated (no end-of-image marker)");
  }
  return info;
}

bool IsNameChar(char c, bool first) {
  bool alnum = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
  return first ? alnum : (alnum || c == '_' || c == '-');
}

bool ValidName(absl::string_view name) {
  if (name.empty() || name.size() > 63) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    if (!IsNameChar(name[i], i == 0)) return false;
  }
  return true;
}

bool Printable(absl::string_view s) {
  for (unsigned char c : s) {
    if (c < 0x20 || c == 0x7F) return false;
  }
  return true;
}

size_t Utf8Chars(absl::string_view s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

absl::Status CheckRange(absl::string_view field, double v, double lo, double hi, bool lo_open) {
  if (!std::isfinite(v) || v > hi || (lo_open ? v <= lo : v < lo)) {
    return Invalid(field, absl::StrCat(v, " is outside ", lo_open ? "(" : "[", lo, ", ", hi, "]"));
  }
  return absl::OkStatus();
}

absl::Status CheckSide(absl::string_view field, int v, const ValidationLimits& limits) {
  if (v < 8 || v > limits.max_image_side) {
    return Invalid(field, absl::StrCat(v, " is outside 8..", limits.max_image_side));
  }
  if (v % 8 != 0) return Invalid(field, absl::StrCat(v, " is not a multiple of 8"));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ImageInfo> InspectImage(absl::string_view bytes, const ValidationLimits& limits,
                                       absl::string_view field) {
  if (bytes.empty()) return Invalid(field, "empty");
  if (static_cast<int64_t>(bytes.size()) > limits.max_image_bytes) {
    return Invalid(field, absl::StrCat(bytes.size(), " bytes exceeds the limit of ",
                                       limits.max_image_bytes, " bytes"));
  }
  static constexpr unsigned char kPngSig[8] = {0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A};
  absl::StatusOr<ImageInfo> info;
  if (bytes.size() >= 8 && memcmp(bytes.data(), kPngSig, 8) == 0) {
    info = InspectPng(bytes, field);
  } else if (bytes.size() >= 3 && static_cast<unsigned char>(bytes[0]) == 0xFF &&
             static_cast<unsigned char>(bytes[1]) == 0xD8 &&
             static_cast<unsigned char>(bytes[2]) == 0xFF) {
    info = InspectJpeg(bytes, field);
  } else {
    return Invalid(field, "not a PNG or JPEG file");
  }
  if (!info.ok()) return info.status();
  if (info->width > limits.max_image_side_px || info->height > limits.max_image_side_px) {
    return Invalid(field, absl::StrCat(info->width, "x", info->height, " exceeds ", limits.max_image_side_px,
                                       " pixels on a side"));
  }
  int64_t pixels = int64_t{info->width} * info->height;
  if (pixels > limits.max_image_pixels) {
    return Invalid(field, absl::StrCat(info->width, "x", info->height, " = ", pixels,
                                       " pixels exceeds the limit of ", limits.max_image_pixels));
  }
  return info;
}

absl::StatusOr<Vocab> Vocab::Load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("vocab: cannot open ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || j.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("vocab: ", path, " is not a JSON object"));
  }
  Vocab v;
  v.entries_.reserve(j.size());
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (!it->is_number_integer()) {
      return absl::InvalidArgumentError(absl::StrCat("vocab: ", path, ": the id of \"", it.key(), "\" is not an integer"));
    }
    v.entries_.emplace(it.key(), it->get<int64_t>());
  }
  return v;
}

bool Vocab::IsSingleToken(absl::string_view word) const {
  return entries_.count(absl::StrCat(word, "</w>")) > 0;
}

std::optional<int64_t> Vocab::SingleTokenId(absl::string_view word) const {
  auto it = entries_.find(absl::StrCat(word, "</w>"));
  if (it == entries_.end()) return std::nullopt;
  return it->second;
}

absl::Status ValidateConceptName(absl::string_view name, absl::string_view field) {
  if (name.empty()) return Invalid(field, "empty");
  if (!ValidName(name)) {
    return Invalid(field, absl::StrCat("\"", name,
                                       "\" must match [a-z0-9][a-z0-9_-]{0,62} (lowercase)"));
  }
  return absl::OkStatus();
}

absl::Status ValidateSuperclass(absl::string_view word, const Vocab* vocab) {
  if (word.empty()) return Invalid("superclass", "empty");
  if (word.size() > 32) return Invalid("superclass", "longer than 32 characters");
  for (char c : word) {
    if (c < 'a' || c > 'z') {
      return Invalid("superclass", absl::StrCat("\"", word,
                                                "\" must be one lowercase word (letters a-z)"));
    }
  }
  if (vocab != nullptr && !vocab->IsSingleToken(word)) {
    return Invalid("superclass", absl::StrCat("\"", word,
                                              "\" is not a single CLIP token; use a common word"));
  }
  return absl::OkStatus();
}

absl::Status ValidateLabels(const Labels& labels, absl::string_view field) {
  if (labels.size() > 32) return Invalid(field, absl::StrCat(labels.size(), " labels (max 32)"));
  for (const auto& [k, v] : labels) {
    bool ok = !k.empty() && k.size() <= 63 && IsNameChar(k[0], true);
    for (char c : k) ok = ok && (IsNameChar(c, false) || c == '.' || c == '/');
    if (!ok) {
      return Invalid(field, absl::StrCat("key \"", k, "\" must match [a-z0-9][a-z0-9_./-]{0,62}"));
    }
    if (Utf8Chars(v) > 256 || !Printable(v)) {
      return Invalid(absl::StrCat(field, "[", k, "]"),
                     "value must be up to 256 printable characters");
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateRequestId(absl::string_view request_id) {
  if (request_id.size() > 128) return Invalid("request_id", "longer than 128 characters");
  for (unsigned char c : request_id) {
    if (c < 0x21 || c > 0x7E) return Invalid("request_id", "must be printable ASCII, no spaces");
  }
  return absl::OkStatus();
}

absl::Status ValidateImageCount(int count, const ValidationLimits& limits,
                                absl::string_view field) {
  if (count == 0) {
    return Invalid(field, absl::StrCat("no images (need ", limits.min_images, " to ",
                                       limits.max_images, ")"));
  }
  if (count < limits.min_images || count > limits.max_images) {
    return Invalid(field, absl::StrCat(count, " images; need ", limits.min_images, " to ",
                                       limits.max_images));
  }
  return absl::OkStatus();
}

absl::Status ValidateCaptions(const std::vector<std::string>& captions, int image_count,
                              absl::string_view concept_name, absl::string_view superclass) {
  if (captions.empty()) return absl::OkStatus();
  if (static_cast<int>(captions.size()) != image_count) {
    return Invalid("options.captions", absl::StrCat(captions.size(), " caption(s) for ", image_count,
                                                    " image(s); give one per image, in order, or none"));
  }
  const std::string token = absl::StrCat("<", concept_name, ">");
  const std::string lower_superclass = absl::AsciiStrToLower(superclass);
  for (size_t i = 0; i < captions.size(); ++i) {
    const std::string field = absl::StrCat("options.captions[", i, "]");
    const std::string& c = captions[i];
    if (Utf8Chars(c) > 300 || !Printable(c)) {
      return Invalid(field, "must be printable text of at most 300 characters");
    }
    const size_t at = c.find(token);
    if (at == std::string::npos || c.find(token, at + 1) != std::string::npos) {
      return Invalid(field, absl::StrCat("must name the concept exactly once as ", token, ": '", c, "'"));
    }
    // The trainer puts the superclass word where the token is: glued to letters it would make
    // another word ("<rex>s" -> "dogs"), and the trainer marks the place with "{}".
    const bool letter_before = at > 0 && absl::ascii_isalpha(static_cast<unsigned char>(c[at - 1]));
    const size_t after = at + token.size();
    const bool letter_after = after < c.size() && absl::ascii_isalpha(static_cast<unsigned char>(c[after]));
    if (letter_before || letter_after) {
      return Invalid(field, absl::StrCat(token, " must be a word of its own, not joined to letters: '", c, "'"));
    }
    if (c.find("{}") != std::string::npos) {
      return Invalid(field, absl::StrCat("must not contain \"{}\" (the trainer's mark for the concept): '", c, "'"));
    }
    // Whole words, case-insensitive, outside the concept's token. A word is a run of letters, as
    // the CLIP tokenizer splits text (and the trainer checks): "toy2" holds the token "toy".
    std::string rest = absl::StrCat(c.substr(0, at), " ", c.substr(at + token.size()));
    for (char& ch : rest) ch = absl::ascii_isalpha(static_cast<unsigned char>(ch)) ? absl::ascii_tolower(ch) : ' ';
    for (absl::string_view word : absl::StrSplit(rest, ' ', absl::SkipEmpty())) {
      if (word == lower_superclass) {
        return Invalid(field, absl::StrCat("uses the superclass word '", superclass, "' besides ", token,
                                           "; the trainer would train it as the concept too: '", c, "'"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateTrainingRequest(TrainingRequest& r, const ValidationLimits& limits,
                                     const Vocab* vocab, bool check_image_count) {
  if (check_image_count) {
    auto s = ValidateImageCount(static_cast<int>(r.images.size()), limits, "images");
    if (!s.ok()) return s;
  }
  if (auto s = ValidateConceptName(r.concept_name, "concept_name"); !s.ok()) return s;
  if (auto s = ValidateSuperclass(r.superclass, vocab); !s.ok()) return s;
  if (auto s = ValidateRequestId(r.request_id); !s.ok()) return s;
  if (auto s = ValidateLabels(r.labels, "labels"); !s.ok()) return s;
  if (r.priority < 0 || r.priority > 9) {
    return Invalid("priority", absl::StrCat(r.priority, " is outside 0..9"));
  }
  TrainingOptions& o = r.options;
  if (!o.steps) o.steps = limits.default_train_steps;
  if (*o.steps < 1 || *o.steps > limits.max_train_steps) {
    return Invalid("options.steps",
                   absl::StrCat(*o.steps, " is outside 1..", limits.max_train_steps));
  }
  if (auto s = CheckRange("options.learning_rate", o.learning_rate, 0, 1, false); !s.ok()) return s;
  if (auto s = CheckRange("options.embedding_learning_rate", o.embedding_learning_rate, 0, 1, false);
      !s.ok()) {
    return s;
  }
  if (o.batch_size < 0 || o.batch_size > 64) {
    return Invalid("options.batch_size", absl::StrCat(o.batch_size, " is outside 0..64"));
  }
  if (o.resolution != 0) {
    if (auto s = CheckSide("options.resolution", o.resolution, limits); !s.ok()) return s;
  }
  if (auto s = CheckRange("options.train_beta", o.train_beta, 0, 1, false); !s.ok()) return s;
  if (auto s = CheckRange("options.train_temperature", o.train_temperature, 0, 1, false); !s.ok()) {
    return s;
  }
  if (check_image_count) {
    if (auto s = ValidateCaptions(o.captions, static_cast<int>(r.images.size()), r.concept_name, r.superclass);
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

namespace {

// Appends `ref` unless a reference written the same way is already there.
void AddDistinct(std::vector<ConceptRef>* refs, ConceptRef ref) {
  for (const auto& r : *refs) {
    if (r.reference == ref.reference) return;
  }
  refs->push_back(std::move(ref));
}

}  // namespace

absl::StatusOr<std::vector<ConceptRef>> ParsePromptReferences(absl::string_view prompt,
                                                              absl::string_view field) {
  std::vector<ConceptRef> refs;
  for (size_t i = 0; i < prompt.size(); ++i) {
    if (prompt[i] != '<') continue;
    size_t close = prompt.find('>', i + 1);
    auto malformed = [&](absl::string_view why) {
      return Invalid(field, absl::StrCat("malformed concept reference at offset ", i, " (", why,
                                         "); write <name> or <name@version>"));
    };
    if (close == absl::string_view::npos) return malformed("no closing '>'");
    absl::string_view inner = prompt.substr(i + 1, close - i - 1);
    ConceptRef ref;
    ref.reference = std::string(inner);
    size_t at = inner.find('@');
    ref.name = std::string(inner.substr(0, at));
    if (!ValidName(ref.name)) return malformed("bad concept name");
    if (at != absl::string_view::npos) {
      absl::string_view ver = inner.substr(at + 1);
      if (ver.empty() || ver.size() > 9 || !absl::SimpleAtoi(ver, &ref.version) ||
          ref.version < 1 || !absl::ascii_isdigit(static_cast<unsigned char>(ver[0]))) {
        return malformed("bad version");
      }
    }
    AddDistinct(&refs, std::move(ref));
    i = close;
  }
  return refs;
}

namespace {

// An enum value this server does not know (a typo, a newer client's mode) is refused: the worker
// would otherwise read it as local key-locking, over the model's own default.
absl::Status CheckKeyLock(absl::string_view field, KeyLock mode) {
  const int v = static_cast<int>(mode);
  if (v < 0 || v > 2) {
    return Invalid(field, absl::StrCat(v, " is not one of KEY_LOCK_UNSPECIFIED (0), KEY_LOCK_LOCAL (1), "
                                          "KEY_LOCK_GLOBAL (2)"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<ConceptRef>> ValidateGenerationRequest(GenerationRequest& r,
                                                                  const ValidationLimits& limits) {
  if (r.prompt.empty()) return Invalid("prompt", "empty");
  size_t chars = Utf8Chars(r.prompt);
  if (chars > static_cast<size_t>(limits.max_prompt_chars)) {
    return Invalid("prompt", absl::StrCat(chars, " characters exceeds the limit of ",
                                          limits.max_prompt_chars));
  }
  auto refs = ParsePromptReferences(r.prompt, "prompt");
  if (!refs.ok()) return refs.status();
  if (r.regions.size() > static_cast<size_t>(limits.max_regions)) {
    return Invalid("regions", absl::StrCat(r.regions.size(), " regions (max ", limits.max_regions, ")"));
  }
  for (size_t i = 0; i < r.regions.size(); ++i) {
    const PromptRegion& g = r.regions[i];
    const std::string field = absl::StrCat("regions[", i, "]");
    if (g.prompt.empty()) return Invalid(field + ".prompt", "empty");
    if (Utf8Chars(g.prompt) > static_cast<size_t>(limits.max_prompt_chars)) {
      return Invalid(field + ".prompt",
                     absl::StrCat("exceeds the limit of ", limits.max_prompt_chars, " characters"));
    }
    auto more = ParsePromptReferences(g.prompt, field + ".prompt");
    if (!more.ok()) return more.status();
    for (auto& ref : *more) AddDistinct(&*refs, std::move(ref));
    const bool box_ok = std::isfinite(g.x0) && std::isfinite(g.y0) && std::isfinite(g.x1) &&
                        std::isfinite(g.y1) && g.x0 >= 0 && g.y0 >= 0 && g.x1 <= 1 && g.y1 <= 1 &&
                        g.x0 < g.x1 && g.y0 < g.y1;
    if (!box_ok) {
      return Invalid(field, absl::StrCat("box (x0, y0, x1, y1) = (", g.x0, ", ", g.y0, ", ", g.x1, ", ",
                                         g.y1, ") must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1"));
    }
  }
  if (refs->size() > static_cast<size_t>(limits.max_concepts_per_prompt)) {
    return Invalid(r.regions.empty() ? "prompt" : "regions",
                   absl::StrCat(refs->size(), " concepts referenced (max ", limits.max_concepts_per_prompt,
                                r.regions.empty() ? ")" : ", the prompt's and its regions' together)"));
  }
  if (Utf8Chars(r.negative_prompt) > static_cast<size_t>(limits.max_prompt_chars)) {
    return Invalid("negative_prompt",
                   absl::StrCat("exceeds the limit of ", limits.max_prompt_chars, " characters"));
  }
  if (r.negative_prompt.find('<') != std::string::npos) {
    return Invalid("negative_prompt", "concept references are not supported");
  }
  if (!r.steps) r.steps = limits.default_generation_steps;
  if (*r.steps < 1 || *r.steps > limits.max_generation_steps) {
    return Invalid("steps",
                   absl::StrCat(*r.steps, " is outside 1..", limits.max_generation_steps));
  }
  // default_image_side 0 leaves an unset size unset: the worker uses its model's native size.
  if (!r.width && limits.default_image_side > 0) r.width = limits.default_image_side;
  if (!r.height && limits.default_image_side > 0) r.height = limits.default_image_side;
  if (r.width) {
    if (auto s = CheckSide("width", *r.width, limits); !s.ok()) return s;
  }
  if (r.height) {
    if (auto s = CheckSide("height", *r.height, limits); !s.ok()) return s;
  }
  if (!r.num_images) r.num_images = 1;
  if (*r.num_images < 1 || *r.num_images > limits.max_num_images) {
    return Invalid("num_images",
                   absl::StrCat(*r.num_images, " is outside 1..", limits.max_num_images));
  }
  if (!r.guidance_scale) r.guidance_scale = limits.default_guidance;
  if (auto s = CheckRange("guidance_scale", *r.guidance_scale, 0, 30, false); !s.ok()) return s;
  if (!r.guidance_rescale) r.guidance_rescale = limits.default_guidance_rescale;
  if (auto s = CheckRange("guidance_rescale", *r.guidance_rescale, 0, 1, false); !s.ok()) return s;
  if (!r.sampler.empty() && r.sampler != "ddim" && r.sampler != "euler") {
    return Invalid("sampler", absl::StrCat("\"", r.sampler, "\" is not one of ddim, euler"));
  }
  if (auto st = CheckKeyLock("key_lock", r.key_lock); !st.ok()) return st;
  if (!r.beta) r.beta = limits.default_beta;
  if (!r.tau) r.tau = limits.default_tau;
  if (auto s = CheckRange("beta", *r.beta, 0, 1, false); !s.ok()) return s;
  if (auto s = CheckRange("tau", *r.tau, 0, 1, true); !s.ok()) return s;
  for (size_t i = 0; i < r.concepts.size(); ++i) {
    const ConceptStrength& c = r.concepts[i];
    std::string field = absl::StrCat("concepts[", i, "]");
    bool referenced = false;
    for (const auto& ref : *refs) referenced = referenced || ref.reference == c.name;
    if (!referenced) {
      return Invalid(absl::StrCat(field, ".name"),
                     absl::StrCat("\"", c.name, "\" is not referenced in the prompt",
                                  r.regions.empty() ? "" : " or its regions", " as <", c.name, ">"));
    }
    for (size_t j = 0; j < i; ++j) {
      if (r.concepts[j].name == c.name) {
        return Invalid(absl::StrCat(field, ".name"), absl::StrCat("\"", c.name, "\" repeated"));
      }
    }
    if (c.beta) {
      if (auto s = CheckRange(absl::StrCat(field, ".beta"), *c.beta, 0, 1, false); !s.ok()) {
        return s;
      }
    }
    if (c.tau) {
      if (auto s = CheckRange(absl::StrCat(field, ".tau"), *c.tau, 0, 1, true); !s.ok()) return s;
    }
    if (auto s = CheckKeyLock(absl::StrCat(field, ".key_lock"), c.key_lock); !s.ok()) return s;
  }
  return refs;
}

}  // namespace perfusion::server

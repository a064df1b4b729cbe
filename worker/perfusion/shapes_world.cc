#include "perfusion/shapes_world.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <sstream>
#include <iterator>
#include <utility>

namespace perfusion {

// ---- Random numbers ----

uint64_t SplitMix64::Next() {
  uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

double SplitMix64::Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }

double SplitMix64::Uniform(double lo, double hi) { return lo + (hi - lo) * Uniform(); }

int SplitMix64::UniformInt(int n) {
  TORCH_CHECK_VALUE(n >= 1, "SplitMix64::UniformInt: n must be >= 1, got ", n);
  const uint64_t un = static_cast<uint64_t>(n);
  const uint64_t limit = std::numeric_limits<uint64_t>::max() - std::numeric_limits<uint64_t>::max() % un;
  uint64_t x;
  do {
    x = Next();
  } while (x >= limit);
  return static_cast<int>(x % un);
}

uint64_t DeriveSeed(uint64_t seed, uint64_t index) {
  SplitMix64 a(index ^ 0x6a09e667f3bcc909ULL);
  SplitMix64 b(seed ^ a.Next());
  return b.Next();
}

// ---- Vocabulary ----
namespace {

template <typename E>
int Index(E e) {
  return static_cast<int>(e);
}

const std::vector<std::string>& ShapeNames() {
  static const std::vector<std::string> v = {"circle", "square", "triangle", "star",     "heart",
                                             "ring",   "cross",  "diamond",  "pentagon", "moon"};
  return v;
}
const std::vector<std::string>& ColorNames() {
  static const std::vector<std::string> v = {"red",  "green", "blue",  "yellow", "purple", "orange",
                                             "pink", "brown", "white", "black",  "gray",   "plain"};
  return v;
}
// The concept patterns' caption words (single CLIP tokens) are used only when
// WorldOptions::open_texture_prob lets base objects wear them.
const std::vector<std::string>& TextureNames() {
  static const std::vector<std::string> v = {"solid", "striped", "dotted", "checked", "angled", "ringed", "chevron"};
  return v;
}
const std::vector<std::string>& TextureIds() {
  static const std::vector<std::string> v = {"solid",    "striped",  "dotted", "checked",
                                             "diagonal", "bullseye", "zigzag"};
  return v;
}
const std::vector<std::string>& SizeNames() {
  static const std::vector<std::string> v = {"small", "large"};
  return v;
}
const std::vector<std::string>& PositionPhrases() {
  static const std::vector<std::string> v = {"in the center",     "in the top left", "in the top right",
                                             "in the bottom left", "in the bottom right", "on the left",
                                             "on the right",      "at the top",          "at the bottom"};
  return v;
}
const std::vector<std::string>& PositionNames() {
  static const std::vector<std::string> v = {"center",       "top_left", "top_right", "bottom_left", "bottom_right",
                                             "left",         "right",    "top",       "bottom"};
  return v;
}

constexpr std::array<std::array<uint8_t, 3>, kNumColors> kPalette = {{
    {220, 40, 40},    // red
    {40, 170, 60},    // green
    {40, 80, 220},    // blue
    {240, 210, 40},   // yellow
    {130, 50, 170},   // purple
    {245, 140, 30},   // orange
    {245, 140, 190},  // pink
    {130, 80, 40},    // brown
    {245, 245, 245},  // white
    {25, 25, 25},     // black
    {128, 128, 128},  // gray
    {214, 208, 196},  // plain (paper)
}};

template <typename E>
E ParseEnum(const std::string& name, const std::vector<std::string>& names, const char* what) {
  std::string key = name;
  std::replace(key.begin(), key.end(), '_', ' ');
  for (size_t i = 0; i < names.size(); ++i) {
    std::string n = names[i];
    std::replace(n.begin(), n.end(), '_', ' ');
    if (!n.empty() && n == key) return static_cast<E>(i);
  }
  std::ostringstream all;
  for (const auto& n : names) all << (all.tellp() > 0 ? ", " : "") << n;
  TORCH_CHECK_VALUE(false, "unknown ", what, " '", name, "'; expected one of: ", all.str());
}

}  // namespace

const std::string& ShapeName(Shape s) { return ShapeNames().at(Index(s)); }
const std::string& ColorName(Color c) { return ColorNames().at(Index(c)); }
const std::string& TextureName(Texture t) { return TextureNames().at(Index(t)); }
const std::string& SizeName(Size s) { return SizeNames().at(Index(s)); }
const std::string& PositionPhrase(Position p) { return PositionPhrases().at(Index(p)); }
const std::string& PositionName(Position p) { return PositionNames().at(Index(p)); }
bool IsBaseTexture(Texture t) { return Index(t) < kNumBaseTextures; }
std::array<uint8_t, 3> ColorRgb(Color c) { return kPalette.at(Index(c)); }

std::array<uint8_t, 3> ShadeRgb(Color c) {
  const auto rgb = ColorRgb(c);
  const double luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2];
  std::array<uint8_t, 3> out;
  for (int i = 0; i < 3; ++i) {
    out[i] = luma > 100 ? static_cast<uint8_t>(rgb[i] / 2) : static_cast<uint8_t>(rgb[i] + (255 - rgb[i]) / 2);
  }
  return out;
}

std::array<float, 2> PositionAnchor(Position p) {
  constexpr float kLo = 0.3f, kMid = 0.5f, kHi = 0.7f;
  switch (p) {
    case Position::kCenter: return {kMid, kMid};
    case Position::kTopLeft: return {kLo, kLo};
    case Position::kTopRight: return {kHi, kLo};
    case Position::kBottomLeft: return {kLo, kHi};
    case Position::kBottomRight: return {kHi, kHi};
    case Position::kLeft: return {kLo, kMid};
    case Position::kRight: return {kHi, kMid};
    case Position::kTop: return {kMid, kLo};
    case Position::kBottom: return {kMid, kHi};
    case Position::kCount: break;
  }
  TORCH_CHECK_VALUE(false, "PositionAnchor: invalid position ", Index(p));
}

Shape ParseShape(const std::string& name) { return ParseEnum<Shape>(name, ShapeNames(), "shape"); }
Color ParseColor(const std::string& name) { return ParseEnum<Color>(name, ColorNames(), "color"); }
Texture ParseTexture(const std::string& name) { return ParseEnum<Texture>(name, TextureIds(), "texture"); }

AttributeLabels Labels(const SceneSpec& scene) {
  TORCH_CHECK_VALUE(!scene.objects.empty(), "Labels: scene has no objects");
  const ObjectSpec& o = scene.objects[0];
  AttributeLabels l;
  l.shape = Index(o.shape);
  l.color = Index(o.color);
  l.texture = Index(o.texture);
  l.size = Index(o.size);
  l.position = Index(o.position);
  l.background = Index(scene.background);
  l.num_objects = static_cast<int>(scene.objects.size());
  l.two_colour = o.color2.has_value();
  return l;
}

// ---- Concepts ----

std::vector<ConceptSpec> BuiltinConcepts() {
  return {
      {"checker_star", "star", Shape::kStar, Texture::kChecked, Color::kRed, Color::kYellow,
       "a star with a red and yellow checkerboard (no base object is red and yellow)"},
      {"candy_heart", "heart", Shape::kHeart, Texture::kDiagonal, Color::kPink, Color::kWhite,
       "a heart with pink and white diagonal stripes (no base object has diagonal stripes)"},
      {"target_circle", "circle", Shape::kCircle, Texture::kBullseye, Color::kBlue, Color::kOrange,
       "a circle with blue and orange concentric rings (no base object has a bullseye)"},
      {"zigzag_square", "square", Shape::kSquare, Texture::kZigzag, Color::kGreen, Color::kPurple,
       "a square with green and purple zigzag bands (no base object has zigzags)"},
  };
}

ConceptSpec FindConcept(const std::string& name) {
  std::string names;
  for (const auto& c : BuiltinConcepts()) {
    if (c.name == name) return c;
    names += (names.empty() ? "" : ", ") + c.name;
  }
  TORCH_CHECK_VALUE(false, "unknown concept '", name, "'; builtin concepts: ", names);
}

bool ShowsConceptLook(const ObjectSpec& object, const ConceptSpec& c, bool patterns_open) {
  if (!patterns_open && !IsBaseTexture(c.texture) && object.texture == c.texture) return true;
  if (!object.color2.has_value()) return false;
  return (object.color == c.color && *object.color2 == c.color2) ||
         (object.color == c.color2 && *object.color2 == c.color);
}

// ---- Sampling ----
namespace {

constexpr double kMinContrast = 90;        // RGB distance between an object colour and the background
constexpr double kMinShadeContrast = 60;   // ... between a texture's shade and the background
constexpr float kHalfExtent[kNumSizes] = {0.16f, 0.26f};
// Concepts turn further than base objects (poses vary), but a square never turns into a diamond.
constexpr double kConceptMaxRotationDeg = 25;  // fraction of the image side

double Distance(const std::array<uint8_t, 3>& a, const std::array<uint8_t, 3>& b) {
  double s = 0;
  for (int i = 0; i < 3; ++i) s += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
  return std::sqrt(s);
}

std::array<uint8_t, 3> SecondRgb(const ObjectSpec& o) { return o.color2 ? ColorRgb(*o.color2) : ShadeRgb(o.color); }

bool Contrasts(const ObjectSpec& o, Color background) {
  const auto bg = ColorRgb(background);
  if (Distance(ColorRgb(o.color), bg) < kMinContrast) return false;
  if (o.texture == Texture::kSolid) return true;
  return Distance(SecondRgb(o), bg) >= (o.color2 ? kMinContrast : kMinShadeContrast);
}

Color SampleBackground(SplitMix64& rng, const std::vector<ObjectSpec>& objects) {
  auto ok = [&](Color c) {
    return std::all_of(objects.begin(), objects.end(), [&](const ObjectSpec& o) { return Contrasts(o, c); });
  };
  if (rng.Bernoulli(0.25) && ok(Color::kPlain)) return Color::kPlain;
  std::vector<Color> allowed;
  for (int i = 0; i < kNumObjectColors; ++i) {
    if (ok(static_cast<Color>(i))) allowed.push_back(static_cast<Color>(i));
  }
  if (allowed.empty()) return Color::kPlain;  // unreachable with this palette; plain is neutral
  return allowed[rng.UniformInt(static_cast<int>(allowed.size()))];
}

void SampleJitter(SplitMix64& rng, double max_offset, double max_rotation, ObjectSpec* o) {
  o->offset_x = static_cast<float>(rng.Uniform(-max_offset, max_offset));
  o->offset_y = static_cast<float>(rng.Uniform(-max_offset, max_offset));
  o->scale = static_cast<float>(rng.Uniform(0.9, 1.08));
  o->rotation_deg = static_cast<float>(rng.Uniform(-max_rotation, max_rotation));
}

ObjectSpec SampleBaseObject(SplitMix64& rng, const WorldOptions& options) {
  for (int attempt = 0;; ++attempt) {
    ObjectSpec o;
    o.shape = static_cast<Shape>(rng.UniformInt(kNumShapes));
    o.color = static_cast<Color>(rng.UniformInt(kNumObjectColors));
    // With open patterns, a textured object wears one of the concept patterns with probability
    // open_texture_prob. At 0 no extra draw is taken, so v1-v3's scenes stay bit-identical.
    const bool open = options.open_texture_prob > 0;
    auto pattern = [&] {
      if (open && rng.Bernoulli(options.open_texture_prob)) {
        return static_cast<Texture>(kNumBaseTextures + rng.UniformInt(kNumTextures - kNumBaseTextures));
      }
      return static_cast<Texture>(1 + rng.UniformInt(kNumBaseTextures - 1));
    };
    if (rng.Bernoulli(options.two_colour_prob)) {
      o.texture = pattern();
      Color c2;
      do {
        c2 = static_cast<Color>(rng.UniformInt(kNumObjectColors));
      } while (Distance(ColorRgb(c2), ColorRgb(o.color)) < kMinContrast);
      o.color2 = c2;
    } else if (rng.Bernoulli(options.textured_prob)) {
      o.texture = pattern();
    }
    const bool excluded = std::any_of(options.exclude.begin(), options.exclude.end(),
                                      [&](const ConceptSpec& c) { return ShowsConceptLook(o, c, open); });
    if (!excluded) return o;
    TORCH_CHECK(attempt < 10000, "SampleScene: options.exclude rules out every object");
  }
}

// Pairs of positions far enough apart for two small objects.
constexpr std::pair<Position, Position> kPairs[] = {
    {Position::kLeft, Position::kRight},         {Position::kTop, Position::kBottom},
    {Position::kTopLeft, Position::kBottomRight}, {Position::kTopRight, Position::kBottomLeft},
    {Position::kTopLeft, Position::kTopRight},    {Position::kBottomLeft, Position::kBottomRight},
    {Position::kTopLeft, Position::kBottomLeft},  {Position::kTopRight, Position::kBottomRight},
};

}  // namespace

SceneSpec SampleScene(uint64_t seed, const WorldOptions& options) {
  TORCH_CHECK_VALUE(options.size >= 8 && options.size <= 1024, "WorldOptions.size must be in [8, 1024], got ",
                    options.size);
  TORCH_CHECK_VALUE(options.open_texture_prob >= 0 && options.open_texture_prob <= 1,
                    "WorldOptions.open_texture_prob must be in [0, 1], got ", options.open_texture_prob);
  SplitMix64 rng(DeriveSeed(seed, 0x5ce7e));
  SceneSpec scene;
  if (rng.Bernoulli(options.two_object_prob)) {
    const auto pair = kPairs[rng.UniformInt(static_cast<int>(std::size(kPairs)))];
    const bool swap = rng.Bernoulli(0.5);
    ObjectSpec a = SampleBaseObject(rng, options);
    ObjectSpec b;
    do {
      b = SampleBaseObject(rng, options);
    } while (b.shape == a.shape);
    a.position = swap ? pair.second : pair.first;
    b.position = swap ? pair.first : pair.second;
    for (ObjectSpec* o : {&a, &b}) {
      o->size = Size::kSmall;
      SampleJitter(rng, 0.02, options.max_rotation_deg, o);
    }
    scene.objects = {a, b};
  } else {
    ObjectSpec a = SampleBaseObject(rng, options);
    a.size = static_cast<Size>(rng.UniformInt(kNumSizes));
    a.position = static_cast<Position>(rng.UniformInt(kNumPositions));
    SampleJitter(rng, 0.03, options.max_rotation_deg, &a);
    scene.objects = {a};
  }
  scene.background = SampleBackground(rng, scene.objects);
  return scene;
}

namespace {
// An object with the concept's look (shape, pattern, colours) and nothing else set.
ObjectSpec ConceptLook(const ConceptSpec& c) {
  ObjectSpec o;
  o.shape = c.shape;
  o.color = c.color;
  o.color2 = c.color2;
  o.texture = c.texture;
  return o;
}
}  // namespace

SceneSpec SampleConceptScene(const ConceptSpec& c, uint64_t seed) {
  uint64_t name_hash = 0xcbf29ce484222325ULL;  // FNV-1a: each concept gets its own poses
  for (unsigned char ch : c.name) name_hash = (name_hash ^ ch) * 0x100000001b3ULL;
  SplitMix64 rng(DeriveSeed(seed, name_hash));
  ObjectSpec o = ConceptLook(c);
  o.concept_name = c.name;
  o.superclass = c.superclass;
  o.size = static_cast<Size>(rng.UniformInt(kNumSizes));
  o.position = static_cast<Position>(rng.UniformInt(kNumPositions));
  SampleJitter(rng, 0.03, kConceptMaxRotationDeg, &o);
  SceneSpec scene;
  scene.objects = {o};
  scene.background = SampleBackground(rng, scene.objects);
  return scene;
}

// ---- Captions ----
namespace {

// Placeholders: {size} {look} (texture and colour) {color} {texture} {shape} {pos} {bg};
// two objects: {a} {b} (look + shape), {ac} {bc} (colour + shape), {rel}.
const std::vector<std::string>& SingleTemplates() {
  static const std::vector<std::string> v = {
      "a {size} {look} {shape} {pos} on a {bg} background",
      "a {color} {shape}",
      "a photo of a {color} {shape}",
      "a {color} {shape} on a {bg} background",
      "a {size} {texture} {shape} {pos}",
      "a {look} {shape} on a {bg} background",
      "a picture of a {size} {color} {shape} {pos}",
      "a {size} {color} {shape} {pos}",
      "a {look} {shape}",
  };
  return v;
}
// A concept's look is the concept itself: its captions never name colour or texture.
const std::vector<std::string>& ConceptTemplates() {
  static const std::vector<std::string> v = {
      "a {size} {shape} {pos} on a {bg} background",
      "a photo of a {shape}",
      "a {shape}",
      "a {shape} on a {bg} background",
      "a {size} {shape} {pos}",
      "a picture of a {shape}",
      "a photo of a {size} {shape}",
  };
  return v;
}
const std::vector<std::string>& PairTemplates() {
  static const std::vector<std::string> v = {
      "a {a} {rel} a {b} on a {bg} background",
      "a {ac} and a {bc}",
      "a {ac} {rel} a {bc}",
      "a photo of a {ac} and a {bc}",
      "a {a} and a {b} on a {bg} background",
  };
  return v;
}
const std::vector<std::string>& RelationPhrases() {
  static const std::vector<std::string> v = {"to the left of", "to the right of", "above", "below"};
  return v;
}

std::string ColorPhrase(const ObjectSpec& o) {
  return o.color2 ? ColorName(o.color) + " and " + ColorName(*o.color2) : ColorName(o.color);
}

// "striped red", "red and yellow checked"; for two objects the word "solid" is left out.
std::string LookPhrase(const ObjectSpec& o, bool say_solid) {
  const std::string& t = TextureName(o.texture);
  if (o.color2) return ColorPhrase(o) + " " + t;
  if (o.texture == Texture::kSolid && !say_solid) return ColorPhrase(o);
  return t + " " + ColorPhrase(o);
}

std::string Noun(const ObjectSpec& o) { return o.concept_name.empty() ? ShapeName(o.shape) : o.superclass; }

// "a is {rel} b": vertical when the rows differ, else horizontal.
const std::string& Relation(const ObjectSpec& a, const ObjectSpec& b) {
  const auto pa = PositionAnchor(a.position), pb = PositionAnchor(b.position);
  if (pa[1] != pb[1]) return RelationPhrases()[pa[1] < pb[1] ? 2 : 3];
  return RelationPhrases()[pa[0] < pb[0] ? 0 : 1];
}

std::string Fill(std::string text, const std::vector<std::pair<std::string, std::string>>& values) {
  for (const auto& [key, value] : values) {
    const std::string token = "{" + key + "}";
    for (size_t at = text.find(token); at != std::string::npos; at = text.find(token, at + value.size())) {
      text.replace(at, token.size(), value);
    }
  }
  return text;
}

const std::vector<std::string>& TemplatesFor(const SceneSpec& scene) {
  TORCH_CHECK_VALUE(scene.objects.size() == 1 || scene.objects.size() == 2,
                    "Caption: a scene has 1 or 2 objects, got ", scene.objects.size());
  if (scene.objects.size() == 2) return PairTemplates();
  return scene.objects[0].concept_name.empty() ? SingleTemplates() : ConceptTemplates();
}

// "a orange" -> "an orange".
std::string FixArticles(const std::string& text) {
  std::istringstream in(text);
  std::vector<std::string> words;
  for (std::string w; in >> w;) words.push_back(w);
  std::string out;
  for (size_t i = 0; i < words.size(); ++i) {
    const bool vowel_next = i + 1 < words.size() && std::string("aeiou").find(words[i + 1][0]) != std::string::npos;
    out += (i ? " " : "") + (words[i] == "a" && vowel_next ? std::string("an") : words[i]);
  }
  return out;
}

void SplitWords(const std::string& text, std::set<std::string>* out) {
  std::istringstream in(text);
  std::string w;
  while (in >> w) {
    if (w.front() != '{') out->insert(w);
  }
}

}  // namespace

int NumCaptionTemplates(const SceneSpec& scene) { return static_cast<int>(TemplatesFor(scene).size()); }

std::string ConceptInWords(const ConceptSpec& c) {
  const ObjectSpec o = ConceptLook(c);
  return LookPhrase(o, false) + " " + Noun(o);  // as a two-object caption names a base object
}

std::string Caption(const SceneSpec& scene, int template_id) {
  const auto& templates = TemplatesFor(scene);
  const int n = static_cast<int>(templates.size());
  const std::string& t = templates[((template_id % n) + n) % n];
  const ObjectSpec& a = scene.objects[0];
  for (const ObjectSpec& o : scene.objects) {
    TORCH_CHECK_VALUE(o.concept_name.empty() || !o.superclass.empty(), "Caption: concept '", o.concept_name,
                      "' has no superclass word");
  }
  const std::string bg = ColorName(scene.background);
  if (scene.objects.size() == 1) {
    return FixArticles(Fill(t, {{"size", SizeName(a.size)},
                    {"look", a.concept_name.empty() ? LookPhrase(a, true) : ""},
                    {"color", a.concept_name.empty() ? ColorPhrase(a) : ""},
                    {"texture", a.concept_name.empty() ? TextureName(a.texture) : ""},
                    {"shape", Noun(a)},
                    {"pos", PositionPhrase(a.position)},
                    {"bg", bg}}));
  }
  const ObjectSpec& b = scene.objects[1];
  auto full = [](const ObjectSpec& o) { return o.concept_name.empty() ? LookPhrase(o, false) + " " + Noun(o) : Noun(o); };
  auto short_phrase = [](const ObjectSpec& o) {
    return o.concept_name.empty() ? ColorPhrase(o) + " " + Noun(o) : Noun(o);
  };
  return FixArticles(Fill(t, {{"a", full(a)},
                  {"b", full(b)},
                  {"ac", short_phrase(a)},
                  {"bc", short_phrase(b)},
                  {"rel", Relation(a, b)},
                  {"bg", bg}}));
}

std::vector<std::string> CaptionWords() {
  std::set<std::string> words;
  for (const auto* list : {&SingleTemplates(), &ConceptTemplates(), &PairTemplates(), &RelationPhrases(),
                           &PositionPhrases(), &ShapeNames(), &ColorNames(), &TextureNames(), &SizeNames()}) {
    for (const auto& text : *list) SplitWords(text, &words);
  }
  words.insert("and");  // two-colour looks: "red and yellow"
  words.insert("an");   // "an orange ..."
  for (const auto& c : BuiltinConcepts()) words.insert(c.superclass);
  return {words.begin(), words.end()};
}

// ---- Rendering ----
namespace {

constexpr double kPi = 3.14159265358979323846;
constexpr double kSqrt2 = 1.41421356237309504880;

struct Vec2 {
  double x, y;
};

std::vector<Vec2> RegularPolygon(int n, double radius, double inner_radius, double shift_y) {
  // n points (star: 2n alternating radii), the first pointing up.
  std::vector<Vec2> v;
  const int count = inner_radius > 0 ? 2 * n : n;
  for (int i = 0; i < count; ++i) {
    const double angle = -kPi / 2 + 2 * kPi * i / count;
    const double r = (inner_radius > 0 && i % 2 == 1) ? inner_radius : radius;
    v.push_back({r * std::cos(angle), r * std::sin(angle) + shift_y});
  }
  return v;
}

bool InPolygon(const std::vector<Vec2>& poly, double x, double y) {
  bool inside = false;
  for (size_t i = 0, j = poly.size() - 1; i < poly.size(); j = i++) {
    const Vec2 &a = poly[i], &b = poly[j];
    if ((a.y > y) != (b.y > y) && x < (b.x - a.x) * (y - a.y) / (b.y - a.y) + a.x) inside = !inside;
  }
  return inside;
}

// Two lobes (circles) and the polygon from the tip through the lobes' tangent points and centres.
bool InHeart(double u, double v) {
  constexpr double kLobeX = 0.46, kLobeY = -0.36, kLobeR = 0.5, kTipY = 0.86;
  static const std::vector<Vec2> body = [] {
    // Tangent point on the right lobe of the line from the tip, outside the lobe.
    const double px = -kLobeX, py = kTipY - kLobeY;  // tip relative to the lobe centre
    const double d = std::sqrt(px * px + py * py), a = -std::acos(kLobeR / d);
    const double ux = px / d, uy = py / d;
    const double tx = kLobeX + kLobeR * (ux * std::cos(a) - uy * std::sin(a));
    const double ty = kLobeY + kLobeR * (ux * std::sin(a) + uy * std::cos(a));
    return std::vector<Vec2>{{0, kTipY}, {tx, ty}, {kLobeX, kLobeY}, {-kLobeX, kLobeY}, {-tx, ty}};
  }();
  const double dl = (u + kLobeX) * (u + kLobeX) + (v - kLobeY) * (v - kLobeY);
  const double dr = (u - kLobeX) * (u - kLobeX) + (v - kLobeY) * (v - kLobeY);
  return dl <= kLobeR * kLobeR || dr <= kLobeR * kLobeR || InPolygon(body, u, v);
}

// Shapes in a unit frame: x right, y down, the object fills about [-0.95, 0.95]^2. Lopsided shapes
// (triangle, star, pentagon, heart, moon) sit between their bounding-box centre and their centroid,
// so the centroid stays within 0.17 of the origin and positions read true.
bool InShape(Shape shape, double u, double v) {
  static const std::vector<Vec2> triangle = {{0, -0.97}, {0.98, 0.73}, {-0.98, 0.73}};
  static const std::vector<Vec2> star = RegularPolygon(5, 1.0, 0.42, 0.05);
  static const std::vector<Vec2> pentagon = RegularPolygon(5, 0.98, 0, 0.045);
  const double r2 = u * u + v * v;
  switch (shape) {
    case Shape::kCircle: return r2 <= 0.92 * 0.92;
    case Shape::kSquare: return std::abs(u) <= 0.8 && std::abs(v) <= 0.8;
    case Shape::kTriangle: return InPolygon(triangle, u, v);
    case Shape::kStar: return InPolygon(star, u, v);
    case Shape::kHeart: return InHeart(u, v - 0.08);
    case Shape::kRing: return r2 <= 0.95 * 0.95 && r2 >= 0.52 * 0.52;
    case Shape::kCross:
      return (std::abs(u) <= 0.3 && std::abs(v) <= 0.92) || (std::abs(v) <= 0.3 && std::abs(u) <= 0.92);
    case Shape::kDiamond: return std::abs(u) / 0.68 + std::abs(v) / 0.98 <= 1;
    case Shape::kPentagon: return InPolygon(pentagon, u, v);
    case Shape::kMoon: {
      const double mu = u - 0.15, mv = v + 0.08;  // shifted towards its hollow side
      const double du = mu - 0.42, dv = mv + 0.22;
      return mu * mu + mv * mv <= 0.93 * 0.93 && du * du + dv * dv > 0.74 * 0.74;
    }
    case Shape::kCount: break;
  }
  return false;
}

bool Odd(double x) { return (static_cast<int64_t>(std::floor(x)) & 1) != 0; }

// True where the texture shows its second colour; (x, y) in pixels in the object's frame, s the
// image side (periods scale with it).
bool SecondColourAt(Texture texture, double x, double y, double s) {
  const double stripe = s / 12;  // 2.7 px at 32
  switch (texture) {
    case Texture::kSolid: return false;
    case Texture::kStriped: return Odd(y / stripe + 0.5);
    case Texture::kDotted: {
      const double g = s / 5.5;
      const double fx = x / g - std::floor(x / g) - 0.5, fy = y / g - std::floor(y / g) - 0.5;
      return fx * fx + fy * fy <= 0.32 * 0.32;
    }
    case Texture::kChecked: {
      const double cell = s / 10;
      return Odd(std::floor(x / cell + 0.5) + std::floor(y / cell + 0.5));
    }
    case Texture::kDiagonal: return Odd((x + y) / (stripe * kSqrt2));
    case Texture::kBullseye: return Odd(std::sqrt(x * x + y * y) / stripe + 0.5);
    case Texture::kZigzag: {
      const double wavelength = s / 8, amplitude = s / 24;
      const double phase = x / wavelength - std::floor(x / wavelength);  // [0, 1)
      const double tri = 4 * std::abs(phase - 0.5) - 1;                  // [-1, 1]
      return Odd((y + amplitude * tri) / stripe);
    }
    case Texture::kCount: break;
  }
  return false;
}

struct PreparedObject {
  double cx, cy, half, cos_t, sin_t;
  Shape shape;
  Texture texture;
  std::array<double, 3> first, second;
};

}  // namespace

Image Render(const SceneSpec& scene, int size, std::vector<std::vector<float>>* coverage) {
  TORCH_CHECK_VALUE(size >= 8 && size <= 1024, "Render: size must be in [8, 1024], got ", size);
  TORCH_CHECK_VALUE(Index(scene.background) < kNumColors, "Render: invalid background ", Index(scene.background));
  std::vector<PreparedObject> objects;
  for (const ObjectSpec& o : scene.objects) {
    TORCH_CHECK_VALUE(Index(o.shape) < kNumShapes && Index(o.color) < kNumObjectColors &&
                          Index(o.texture) < kNumTextures && Index(o.size) < kNumSizes &&
                          Index(o.position) < kNumPositions && (!o.color2 || Index(*o.color2) < kNumObjectColors),
                      "Render: object with an out-of-range attribute");
    TORCH_CHECK_VALUE(o.scale > 0 && o.scale < 4, "Render: object scale must be in (0, 4), got ", o.scale);
    const auto anchor = PositionAnchor(o.position);
    const double theta = o.rotation_deg * kPi / 180;
    const auto c1 = ColorRgb(o.color), c2 = SecondRgb(o);
    objects.push_back({(anchor[0] + o.offset_x) * size, (anchor[1] + o.offset_y) * size,
                       kHalfExtent[Index(o.size)] * o.scale * size, std::cos(theta), std::sin(theta), o.shape,
                       o.texture, {double(c1[0]), double(c1[1]), double(c1[2])},
                       {double(c2[0]), double(c2[1]), double(c2[2])}});
  }
  if (coverage != nullptr) {
    coverage->assign(objects.size(), std::vector<float>(static_cast<size_t>(size) * size, 0.f));
  }
  const auto bg_rgb = ColorRgb(scene.background);
  const std::array<double, 3> bg = {double(bg_rgb[0]), double(bg_rgb[1]), double(bg_rgb[2])};
  constexpr int kSuper = 4;
  constexpr double kSampleWeight = 1.0 / (kSuper * kSuper);
  Image image(size, size);
  for (int py = 0; py < size; ++py) {
    for (int px = 0; px < size; ++px) {
      double sum[3] = {0, 0, 0};
      for (int sy = 0; sy < kSuper; ++sy) {
        for (int sx = 0; sx < kSuper; ++sx) {
          const double x = px + (sx + 0.5) / kSuper, y = py + (sy + 0.5) / kSuper;
          const std::array<double, 3>* colour = &bg;
          int top = -1;
          for (size_t i = 0; i < objects.size(); ++i) {
            const PreparedObject& o = objects[i];
            const double dx = x - o.cx, dy = y - o.cy;
            const double lx = o.cos_t * dx + o.sin_t * dy, ly = -o.sin_t * dx + o.cos_t * dy;  // object frame
            if (!InShape(o.shape, lx / o.half, ly / o.half)) continue;
            colour = SecondColourAt(o.texture, lx, ly, size) ? &o.second : &o.first;
            top = static_cast<int>(i);
          }
          for (int c = 0; c < 3; ++c) sum[c] += (*colour)[c];
          if (coverage != nullptr && top >= 0) {
            (*coverage)[top][static_cast<size_t>(py) * size + px] += static_cast<float>(kSampleWeight);
          }
        }
      }
      uint8_t* out = image.at(px, py);
      for (int c = 0; c < 3; ++c) out[c] = static_cast<uint8_t>(std::lround(sum[c] * kSampleWeight));
    }
  }
  return image;
}

Sample RenderRandom(uint64_t seed, const WorldOptions& options) {
  Sample sample;
  sample.scene = SampleScene(seed, options);
  SplitMix64 rng(DeriveSeed(seed, 0xca97));
  const int n = NumCaptionTemplates(sample.scene);
  const int template_id = rng.Bernoulli(options.full_caption_prob) ? 0 : 1 + rng.UniformInt(n - 1);
  sample.caption = Caption(sample.scene, template_id);
  sample.image = Render(sample.scene, options.size);
  return sample;
}

std::vector<Sample> RenderConcept(const ConceptSpec& c, int n, uint64_t seed, int size) {
  TORCH_CHECK_VALUE(n >= 0, "RenderConcept: n must be >= 0, got ", n);
  TORCH_CHECK_VALUE(!c.name.empty() && !c.superclass.empty(), "RenderConcept: concept needs a name and a superclass");
  std::vector<Sample> out;
  out.reserve(n);
  for (int i = 0; i < n; ++i) {
    const uint64_t item_seed = DeriveSeed(seed, static_cast<uint64_t>(i));
    Sample s;
    s.scene = SampleConceptScene(c, item_seed);
    SplitMix64 rng(DeriveSeed(item_seed, 0xca97));
    s.caption = Caption(s.scene, rng.UniformInt(NumCaptionTemplates(s.scene)));
    s.image = Render(s.scene, size);
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace perfusion

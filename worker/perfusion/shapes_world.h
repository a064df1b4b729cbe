// shapes_world: a deterministic procedural world of small captioned RGB images, for training the
// tiny text-to-image model (no pretrained weights can be downloaded) and for personalising it.
//
// A scene is a flat background and one object (sometimes two), each with a shape, a colour, a fill
// texture, a size and a position (plus small continuous jitter: offset, scale, rotation). Captions
// follow a small grammar ("a red circle on a blue background", "a small striped square in the top
// left", "a photo of a green star"); every word a caption can contain is one CLIP BPE token
// (CaptionWords(), checked against vocab.json by a test).
//
// Concepts (ConceptSpec, BuiltinConcepts()) are looks the base world never shows: a pair of colours
// on one object (e.g. a red-and-yellow checked star) and, for three of them, a pattern only concepts
// use (bullseye, diagonal, zigzag). The base sampler never emits a concept's look (WorldOptions::exclude), so a
// model trained on base samples has never seen it; RenderConcept() renders a concept in varied
// poses (position, size, rotation) and contexts (backgrounds), captioned with its superclass word.
//
// Rendering: 4x4 supersampling per pixel (antialiased edges and textures), textures drawn in the
// object's rotated frame with periods proportional to the image size (a 64px image looks like the
// 32px one, sharper). Determinism: everything is a function of the 64-bit seed through the
// SplitMix64 generator below (no std:: distributions); the same seed gives the same bytes on every
// standard library (up to libm's sin/cos in the last ulp, which a 4x4 supersample hides).
//
// Thread safety: all functions are pure; call them from any thread.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "perfusion/image_io.h"

namespace perfusion {

// SplitMix64 (Steele, Lea, Flood 2014): small, fast, and bit-identical everywhere.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t Next();
  double Uniform();                      // [0, 1), 53 random bits
  double Uniform(double lo, double hi);  // [lo, hi)
  int UniformInt(int n);                 // [0, n), n >= 1 (unbiased)
  bool Bernoulli(double p) { return Uniform() < p; }

 private:
  uint64_t state_;
};

// An independent stream for item `index` of a run with seed `seed`.
uint64_t DeriveSeed(uint64_t seed, uint64_t index);

// ---- Attributes. Enum values are class indices for a classifier; k*Count is the class count. ----
enum class Shape : uint8_t {
  kCircle, kSquare, kTriangle, kStar, kHeart, kRing, kCross, kDiamond, kPentagon, kMoon, kCount
};
// kPlain is a background only (a neutral paper tone); objects use the other colours.
enum class Color : uint8_t {
  kRed, kGreen, kBlue, kYellow, kPurple, kOrange, kPink, kBrown, kWhite, kBlack, kGray, kPlain, kCount
};
// The first four are base textures. The last three are the concept patterns: by default only
// concepts wear them; WorldOptions::open_texture_prob lets base objects wear them too.
enum class Texture : uint8_t { kSolid, kStriped, kDotted, kChecked, kDiagonal, kBullseye, kZigzag, kCount };
enum class Size : uint8_t { kSmall, kLarge, kCount };
enum class Position : uint8_t {
  kCenter, kTopLeft, kTopRight, kBottomLeft, kBottomRight, kLeft, kRight, kTop, kBottom, kCount
};

constexpr int kNumShapes = static_cast<int>(Shape::kCount);
constexpr int kNumColors = static_cast<int>(Color::kCount);  // including kPlain
constexpr int kNumObjectColors = kNumColors - 1;
constexpr int kNumTextures = static_cast<int>(Texture::kCount);
constexpr int kNumBaseTextures = 4;
constexpr int kNumSizes = static_cast<int>(Size::kCount);
constexpr int kNumPositions = static_cast<int>(Position::kCount);

// Caption words: "circle", "red", "plain", "striped" (concept patterns: "angled", "ringed",
// "chevron"), "small".
const std::string& ShapeName(Shape s);
const std::string& ColorName(Color c);
const std::string& TextureName(Texture t);
const std::string& SizeName(Size s);
// The caption phrase: "in the center", "in the top left", "on the left", "at the top", ...
const std::string& PositionPhrase(Position p);
// A one-word identifier for files and logs: "center", "top_left", ... (not a caption word).
const std::string& PositionName(Position p);
bool IsBaseTexture(Texture t);
std::array<uint8_t, 3> ColorRgb(Color c);
// The second colour of a single-colour texture: the colour darkened (light colours) or lightened
// (dark colours) by half.
std::array<uint8_t, 3> ShadeRgb(Color c);
// The centre of `p` as a fraction of the image side, {x, y} with y down.
std::array<float, 2> PositionAnchor(Position p);

// Parses names as printed above ("red", "top_left" or "top left", ...); throws c10::ValueError.
Shape ParseShape(const std::string& name);
Color ParseColor(const std::string& name);
Texture ParseTexture(const std::string& name);

struct ObjectSpec {
  Shape shape = Shape::kCircle;
  Color color = Color::kRed;
  // Second texture colour. nullopt: a shade of `color` (ShadeRgb); set: a two-colour texture.
  std::optional<Color> color2;
  Texture texture = Texture::kSolid;
  Size size = Size::kLarge;
  Position position = Position::kCenter;
  float offset_x = 0, offset_y = 0;  // from the position's anchor, fraction of the image side
  float scale = 1;                   // multiplies the size's half-extent
  float rotation_deg = 0;            // clockwise, texture rotates with the object
  // Non-empty for a concept's object: captions name it by `superclass` and omit colour and texture.
  std::string concept_name;
  std::string superclass;
};

struct SceneSpec {
  Color background = Color::kPlain;
  std::vector<ObjectSpec> objects;  // 1 or 2, drawn in order
};

// Class labels of a scene's first object and the background, for training and scoring a classifier.
struct AttributeLabels {
  int shape = 0, color = 0, texture = 0, size = 0, position = 0, background = 0;
  int num_objects = 1;
  bool two_colour = false;
};
AttributeLabels Labels(const SceneSpec& scene);

// A look the base world never shows, to personalise the model with.
struct ConceptSpec {
  std::string name;        // "checker_star"
  std::string superclass;  // one caption word (and CLIP token) naming its class: "star"
  Shape shape = Shape::kStar;
  Texture texture = Texture::kChecked;
  Color color = Color::kRed;
  Color color2 = Color::kYellow;
  std::string description;  // for humans
};

// Four concepts: checker_star (star, checked red/yellow), candy_heart (heart, diagonal stripes
// pink/white), target_circle (circle, bullseye blue/orange), zigzag_square (square, zigzag
// green/purple). Each superclass is the base shape's caption word.
std::vector<ConceptSpec> BuiltinConcepts();
// REQUIRES: `name` is a builtin concept's name; otherwise throws c10::ValueError listing them.
ConceptSpec FindConcept(const std::string& name);
// The concept's look in the base world's caption words, as a base caption names such an object:
// "red and yellow checked star", "pink and white angled heart". A base model can only follow it as
// far as it learnt each word: the concept patterns' words ("angled", "ringed", "chevron") occur in
// its captions only when WorldOptions::open_texture_prob > 0, and the colour pair never does.
std::string ConceptInWords(const ConceptSpec& concept_spec);

// True when `object` shows `concept_spec`'s look: a two-colour texture (any pattern, any shape) in
// the concept's two colours (either order), or, unless `patterns_open`, the concept's pattern when
// that is a concept pattern. Broader than the concept itself on purpose: a base model never sees the
// two colours together on one object. With `patterns_open` every concept is held out the way
// checker_star always was: its pattern and its shape occur, never its colour pair.
bool ShowsConceptLook(const ObjectSpec& object, const ConceptSpec& concept_spec, bool patterns_open = false);

struct WorldOptions {
  int size = 32;                   // image side in pixels, 8..1024
  double two_object_prob = 0.2;    // scenes with two (small) objects
  double two_colour_prob = 0.15;   // base objects with a two-colour striped/dotted/checked texture
  double textured_prob = 0.5;      // otherwise: a shaded base texture rather than solid
  double max_rotation_deg = 15;    // base objects are rotated in [-max, max]
  double full_caption_prob = 0.3;  // the caption naming every attribute; else a random template
  // Fraction of textured base objects (shaded or two-colour) that wear a concept pattern (angled,
  // ringed or chevron) instead of a base one. 0 keeps those patterns for concepts only (v1-v3). Above
  // 0, `exclude` still removes each concept's colour pair (ShowsConceptLook with patterns_open).
  double open_texture_prob = 0;
  // Looks the sampler never emits (resampled). Default: every builtin concept.
  std::vector<ConceptSpec> exclude = BuiltinConcepts();
};

// A random base scene. Never contains any look in options.exclude, nor, unless
// options.open_texture_prob > 0, a concept pattern.
SceneSpec SampleScene(uint64_t seed, const WorldOptions& options = {});

// Number of caption templates for this scene (they depend on the object count and concept-ness).
int NumCaptionTemplates(const SceneSpec& scene);
// Caption template `template_id` (taken modulo NumCaptionTemplates) for `scene`; template 0 names
// every attribute ("a small striped red circle in the top left on a blue background").
std::string Caption(const SceneSpec& scene, int template_id);
// Every word any Caption() can produce (sorted, unique), including concept superclass words.
std::vector<std::string> CaptionWords();

// Renders `scene` at size x size. If `coverage` is non-null it receives, per object, size*size
// values in [0, 1]: the fraction of the pixel's 16 samples where that object is visible.
Image Render(const SceneSpec& scene, int size, std::vector<std::vector<float>>* coverage = nullptr);

struct Sample {
  Image image;
  std::string caption;
  SceneSpec scene;
};

// SampleScene + a caption chosen from the seed + Render.
Sample RenderRandom(uint64_t seed, const WorldOptions& options = {});

// A random scene with `concept_spec`'s object alone: any position, either size, rotation within
// +-25 degrees, scale jitter, and a background that contrasts with both concept colours.
SceneSpec SampleConceptScene(const ConceptSpec& concept_spec, uint64_t seed);
// n training images of a concept (item i uses DeriveSeed(seed, i)), captioned with its superclass
// word ("a photo of a star", "a small star in the top left on a blue background").
std::vector<Sample> RenderConcept(const ConceptSpec& concept_spec, int n, uint64_t seed, int size = 32);

}  // namespace perfusion

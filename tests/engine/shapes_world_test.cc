#include "perfusion/shapes_world.h"

#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "tests/engine/test_util.h"

namespace perfusion {
namespace {

std::vector<std::string> Words(const std::string& text) {
  std::istringstream in(text);
  std::vector<std::string> out;
  for (std::string w; in >> w;) out.push_back(w);
  return out;
}

double Distance(const uint8_t* px, const std::array<uint8_t, 3>& c) {
  double s = 0;
  for (int i = 0; i < 3; ++i) s += (double(px[i]) - c[i]) * (double(px[i]) - c[i]);
  return std::sqrt(s);
}

// Pixels whose 16 samples all show the object.
std::vector<int> FullPixels(const std::vector<float>& coverage) {
  std::vector<int> out;
  for (size_t i = 0; i < coverage.size(); ++i) {
    if (coverage[i] > 0.999f) out.push_back(static_cast<int>(i));
  }
  return out;
}

// Fraction of `pixels` of `im` within `radius` of colour `c`.
double FractionNear(const Image& im, const std::vector<int>& pixels, const std::array<uint8_t, 3>& c,
                    double radius = 40) {
  if (pixels.empty()) return 0;
  int n = 0;
  for (int p : pixels) n += Distance(im.rgb.data() + 3 * p, c) <= radius;
  return double(n) / pixels.size();
}

// Shares of `pixels` that are mostly (>= 70%) colour a and mostly colour b: pixels within 10 of the
// a-b blend segment, by their position t along it.
std::array<double, 2> MostlyShares(const Image& im, const std::vector<int>& pixels, const std::array<uint8_t, 3>& a,
                                   const std::array<uint8_t, 3>& b) {
  if (pixels.empty()) return {0, 0};
  double len2 = 0;
  for (int c = 0; c < 3; ++c) len2 += (double(b[c]) - a[c]) * (double(b[c]) - a[c]);
  int near_a = 0, near_b = 0;
  for (int p : pixels) {
    const uint8_t* px = im.rgb.data() + 3 * p;
    double dot = 0;
    for (int c = 0; c < 3; ++c) dot += (double(px[c]) - a[c]) * (double(b[c]) - a[c]);
    const double t = std::clamp(dot / len2, 0.0, 1.0);
    double d2 = 0;
    for (int c = 0; c < 3; ++c) {
      const double on = a[c] + t * (double(b[c]) - a[c]);
      d2 += (px[c] - on) * (px[c] - on);
    }
    if (d2 > 100) continue;
    near_a += t <= 0.3;
    near_b += t >= 0.7;
  }
  return {double(near_a) / pixels.size(), double(near_b) / pixels.size()};
}

std::array<double, 2> Centroid(const std::vector<float>& coverage, int size) {
  double sx = 0, sy = 0, sw = 0;
  for (int y = 0; y < size; ++y) {
    for (int x = 0; x < size; ++x) {
      const double w = coverage[y * size + x];
      sx += w * (x + 0.5);
      sy += w * (y + 0.5);
      sw += w;
    }
  }
  return {sx / sw / size, sy / sw / size};
}

TEST(ShapesWorldTest, SplitMix64MatchesTheReferenceSequence) {
  // Vigna's splitmix64.c with x = 0: the stream every platform must reproduce.
  SplitMix64 rng(0);
  EXPECT_EQ(rng.Next(), 0xe220a8397b1dcdafULL);
  EXPECT_EQ(rng.Next(), 0x6e789e6aa1b965f4ULL);
  EXPECT_EQ(rng.Next(), 0x06c45d188009454fULL);
  SplitMix64 u(7);
  std::vector<int> counts(5, 0);
  for (int i = 0; i < 5000; ++i) {
    const int k = u.UniformInt(5);
    ASSERT_GE(k, 0);
    ASSERT_LT(k, 5);
    ++counts[k];
  }
  for (int c : counts) EXPECT_NEAR(c, 1000, 150);
  EXPECT_NE(DeriveSeed(1, 0), DeriveSeed(1, 1));
  EXPECT_NE(DeriveSeed(1, 0), DeriveSeed(2, 0));
}

TEST(ShapesWorldTest, SameSeedGivesIdenticalBytesAndDifferentSeedsDiffer) {
  std::set<std::vector<uint8_t>> distinct;
  for (uint64_t seed = 0; seed < 40; ++seed) {
    const Sample a = RenderRandom(seed), b = RenderRandom(seed);
    EXPECT_TRUE(a.image == b.image) << "seed " << seed;
    EXPECT_EQ(a.caption, b.caption);
    if (PngSupported()) EXPECT_EQ(EncodePng(a.image), EncodePng(b.image));
    distinct.insert(a.image.rgb);
  }
  EXPECT_EQ(distinct.size(), 40u);
  const auto c1 = RenderConcept(BuiltinConcepts()[0], 3, 9), c2 = RenderConcept(BuiltinConcepts()[0], 3, 9);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(c1[i].image == c2[i].image);
  EXPECT_TRUE(RenderConcept(BuiltinConcepts()[0], 1, 10)[0].image != c1[0].image);
}

// Applies CLIP's BPE merges (merges.txt, rank order) to one lower-case ASCII word.
std::vector<std::string> Bpe(const std::string& word, const std::map<std::pair<std::string, std::string>, int>& ranks) {
  std::vector<std::string> parts;
  for (char ch : word) parts.emplace_back(1, ch);
  parts.back() += "</w>";
  while (parts.size() > 1) {
    int best = -1, best_rank = INT32_MAX;
    for (size_t i = 0; i + 1 < parts.size(); ++i) {
      auto it = ranks.find({parts[i], parts[i + 1]});
      if (it != ranks.end() && it->second < best_rank) {
        best_rank = it->second;
        best = static_cast<int>(i);
      }
    }
    if (best < 0) break;
    const std::pair<std::string, std::string> pair = {parts[best], parts[best + 1]};
    std::vector<std::string> merged;
    for (size_t i = 0; i < parts.size(); ++i) {
      if (i + 1 < parts.size() && parts[i] == pair.first && parts[i + 1] == pair.second) {
        merged.push_back(parts[i] + parts[i + 1]);
        ++i;
      } else {
        merged.push_back(parts[i]);
      }
    }
    parts = merged;
  }
  return parts;
}

TEST(ShapesWorldTest, EveryCaptionWordIsOneClipToken) {
  const std::string dir = testing::SharedDir() + "/data/clip/";
  ASSERT_TRUE(testing::FileExists(dir + "vocab.json")) << dir;
  std::ifstream vf(dir + "vocab.json");
  const nlohmann::json vocab = nlohmann::json::parse(vf);
  std::ifstream mf(dir + "merges.txt");
  std::map<std::pair<std::string, std::string>, int> ranks;
  std::string line;
  std::getline(mf, line);  // "#version: 0.2"
  for (int rank = 0; std::getline(mf, line); ++rank) {
    const size_t sp = line.find(' ');
    ranks[{line.substr(0, sp), line.substr(sp + 1)}] = rank;
  }
  ASSERT_EQ(ranks.size(), 48894u);
  const auto words = CaptionWords();
  EXPECT_GE(words.size(), 40u);
  for (const std::string& w : words) {
    EXPECT_TRUE(vocab.contains(w + "</w>")) << "'" << w << "' is not a CLIP vocabulary word";
    const auto tokens = Bpe(w, ranks);
    EXPECT_EQ(tokens.size(), 1u) << "'" << w << "' splits into " << tokens.size() << " BPE tokens";
  }
  for (const auto& c : BuiltinConcepts()) {
    EXPECT_TRUE(std::count(words.begin(), words.end(), c.superclass)) << c.superclass;
  }
}

TEST(ShapesWorldTest, CaptionWordsCoverEveryGeneratedCaption) {
  const auto list = CaptionWords();
  const std::set<std::string> words(list.begin(), list.end());
  std::set<std::string> seen;
  WorldOptions open;  // a third of the scenes with open concept patterns, whose words are captioned too
  open.open_texture_prob = 0.5;
  for (uint64_t seed = 0; seed < 3000; ++seed) {
    const SceneSpec scene = SampleScene(seed, seed % 3 == 0 ? open : WorldOptions{});
    for (int t = 0; t < NumCaptionTemplates(scene); ++t) {
      for (const auto& w : Words(Caption(scene, t))) {
        EXPECT_TRUE(words.count(w)) << "'" << w << "' in '" << Caption(scene, t) << "'";
        seen.insert(w);
      }
    }
  }
  for (const auto& c : BuiltinConcepts()) {
    for (const auto& s : RenderConcept(c, 20, 1)) {
      for (const auto& w : Words(s.caption)) EXPECT_TRUE(words.count(w)) << s.caption;
    }
  }
  // The grammar uses its whole vocabulary (no dead words a model would never see).
  for (const auto& w : words) EXPECT_TRUE(seen.count(w)) << "'" << w << "' never appears in a caption";
}

TEST(ShapesWorldTest, ConceptInWordsNamesTheLookAsABaseCaptionWould) {
  EXPECT_EQ(ConceptInWords(FindConcept("checker_star")), "red and yellow checked star");
  EXPECT_EQ(ConceptInWords(FindConcept("candy_heart")), "pink and white angled heart");
  const auto list = CaptionWords();
  const std::set<std::string> words(list.begin(), list.end());
  for (const auto& c : BuiltinConcepts()) {
    const std::string phrase = ConceptInWords(c);
    for (const auto& w : Words(phrase)) EXPECT_TRUE(words.count(w)) << "'" << w << "' in '" << phrase << "'";
    // A base object of that look, captioned in full, is named with the same words.
    SceneSpec scene;
    ObjectSpec o;
    o.shape = c.shape;
    o.texture = c.texture;
    o.color = c.color;
    o.color2 = c.color2;
    scene.objects.push_back(o);
    const std::string caption = Caption(scene, 0);
    EXPECT_NE(caption.find(" " + phrase + " "), std::string::npos) << caption << " / " << phrase;
  }
}

TEST(ShapesWorldTest, CaptionsFollowTheGrammar) {
  SceneSpec scene;
  scene.background = Color::kBlue;
  ObjectSpec o;
  o.shape = Shape::kSquare;
  o.color = Color::kRed;
  o.texture = Texture::kStriped;
  o.size = Size::kSmall;
  o.position = Position::kTopLeft;
  scene.objects = {o};
  EXPECT_EQ(Caption(scene, 0), "a small striped red square in the top left on a blue background");
  EXPECT_EQ(Caption(scene, 3), "a red square on a blue background");
  EXPECT_EQ(Caption(scene, 4), "a small striped square in the top left");
  EXPECT_EQ(Caption(scene, 2), "a photo of a red square");
  EXPECT_EQ(Caption(scene, 2 + NumCaptionTemplates(scene)), Caption(scene, 2));
  scene.background = Color::kOrange;
  EXPECT_EQ(Caption(scene, 3), "a red square on an orange background");
  scene.objects[0].color2 = Color::kYellow;
  scene.background = Color::kPlain;
  EXPECT_EQ(Caption(scene, 0), "a small red and yellow striped square in the top left on a plain background");

  ObjectSpec b;
  b.shape = Shape::kCircle;
  b.color = Color::kGreen;
  b.position = Position::kTopRight;
  scene.objects = {o, b};
  EXPECT_EQ(Caption(scene, 0), "a striped red square to the left of a green circle on a plain background");
  scene.objects[1].position = Position::kBottomLeft;
  EXPECT_EQ(Caption(scene, 2), "a red square above a green circle");

  // A concept's object is named by its superclass, never by its colours or texture.
  const ConceptSpec star = FindConcept("checker_star");
  const SceneSpec cs = SampleConceptScene(star, 4);
  for (int t = 0; t < NumCaptionTemplates(cs); ++t) {
    const auto w = Words(Caption(cs, t));
    EXPECT_TRUE(std::count(w.begin(), w.end(), "star")) << Caption(cs, t);
    for (const char* banned : {"red", "yellow", "checked", "and"}) {
      EXPECT_FALSE(std::count(w.begin(), w.end(), banned)) << Caption(cs, t);
    }
  }
}

TEST(ShapesWorldTest, ObjectColourDominatesItsMask) {
  std::vector<double> textured_shares;  // share of the object's own colour, textured objects
  int solid_objects = 0;
  for (uint64_t seed = 0; seed < 400; ++seed) {
    const SceneSpec scene = SampleScene(seed);
    std::vector<std::vector<float>> coverage;
    const Image im = Render(scene, 32, &coverage);
    ASSERT_EQ(coverage.size(), scene.objects.size());
    for (size_t i = 0; i < scene.objects.size(); ++i) {
      const ObjectSpec& o = scene.objects[i];
      const auto full = FullPixels(coverage[i]);
      ASSERT_GE(full.size(), 10u) << "seed " << seed << ": object " << i << " is barely visible";
      const auto c1 = ColorRgb(o.color), c2 = o.color2 ? ColorRgb(*o.color2) : ShadeRgb(o.color);
      if (o.texture == Texture::kSolid) {
        EXPECT_EQ(FractionNear(im, full, c1, 0), 1.0) << "seed " << seed;
        ++solid_objects;
        continue;
      }
      // Textured: every pixel is a blend of the object's two colours (t = 0: its colour, 1: the
      // second), never the background or another colour, and its own colour holds a fair share.
      double len2 = 0;
      for (int c = 0; c < 3; ++c) len2 += (double(c2[c]) - c1[c]) * (double(c2[c]) - c1[c]);
      double t_sum = 0;
      for (int p : full) {
        const uint8_t* px = im.rgb.data() + 3 * p;
        double dot = 0;
        for (int c = 0; c < 3; ++c) dot += (double(px[c]) - c1[c]) * (double(c2[c]) - c1[c]);
        const double t = std::clamp(dot / len2, 0.0, 1.0);
        std::array<uint8_t, 3> on_segment;
        for (int c = 0; c < 3; ++c) on_segment[c] = static_cast<uint8_t>(std::lround(c1[c] + t * (c2[c] - c1[c])));
        ASSERT_LE(Distance(px, on_segment), 3.0) << "seed " << seed << ": pixel off the blend of its colours";
        t_sum += t;
      }
      const double share = 1 - t_sum / full.size();
      EXPECT_GE(share, 0.2) << "seed " << seed << ": " << Caption(scene, 0);
      textured_shares.push_back(share);
    }
    // Pixels no object touches are exactly the background.
    for (size_t p = 0; p < coverage[0].size(); ++p) {
      bool touched = false;
      for (const auto& cov : coverage) touched |= cov[p] > 0;
      if (!touched) ASSERT_EQ(Distance(im.rgb.data() + 3 * p, ColorRgb(scene.background)), 0) << "seed " << seed;
    }
  }
  EXPECT_GT(solid_objects, 100);
  ASSERT_GT(textured_shares.size(), 100u);
  std::sort(textured_shares.begin(), textured_shares.end());
  EXPECT_GE(textured_shares[textured_shares.size() / 2], 0.5);  // the median object is mostly its colour
}

TEST(ShapesWorldTest, PositionsLandInTheirRegion) {
  // Columns and rows in thirds at 0.4 / 0.6 of the side: left, centre, right; top, middle, bottom.
  auto column = [](Position p) {
    switch (p) {
      case Position::kTopLeft: case Position::kBottomLeft: case Position::kLeft: return 0;
      case Position::kTopRight: case Position::kBottomRight: case Position::kRight: return 2;
      default: return 1;
    }
  };
  auto row = [](Position p) {
    switch (p) {
      case Position::kTopLeft: case Position::kTopRight: case Position::kTop: return 0;
      case Position::kBottomLeft: case Position::kBottomRight: case Position::kBottom: return 2;
      default: return 1;
    }
  };
  auto third = [](double f) { return f < 0.4 ? 0 : (f < 0.6 ? 1 : 2); };
  for (int size : {32, 64}) {
    for (uint64_t seed = 0; seed < 300; ++seed) {
      SceneSpec scene = seed % 2 ? SampleScene(seed) : SampleConceptScene(BuiltinConcepts()[seed % 8 / 2], seed);
      std::vector<std::vector<float>> coverage;
      Render(scene, size, &coverage);
      for (size_t i = 0; i < scene.objects.size(); ++i) {
        const auto c = Centroid(coverage[i], size);
        const Position p = scene.objects[i].position;
        EXPECT_EQ(third(c[0]), column(p)) << PositionName(p) << " centroid x " << c[0] << " seed " << seed;
        EXPECT_EQ(third(c[1]), row(p)) << PositionName(p) << " centroid y " << c[1] << " seed " << seed;
      }
    }
  }
}

TEST(ShapesWorldTest, LargeObjectsAreMuchLargerThanSmallOnes) {
  for (int s = 0; s < kNumShapes; ++s) {
    double area[2];
    for (int z = 0; z < 2; ++z) {
      SceneSpec scene;
      ObjectSpec o;
      o.shape = static_cast<Shape>(s);
      o.size = static_cast<Size>(z);
      scene.objects = {o};
      std::vector<std::vector<float>> coverage;
      Render(scene, 32, &coverage);
      area[z] = 0;
      for (float v : coverage[0]) area[z] += v;
    }
    EXPECT_GT(area[1], 2.2 * area[0]) << ShapeName(static_cast<Shape>(s));
    EXPECT_GT(area[0], 25) << ShapeName(static_cast<Shape>(s)) << " small is too small to learn";
  }
}

TEST(ShapesWorldTest, TwoObjectsNeverOverlap) {
  int pairs = 0;
  for (uint64_t seed = 0; seed < 1500 && pairs < 200; ++seed) {
    const SceneSpec scene = SampleScene(seed);
    if (scene.objects.size() != 2) continue;
    ++pairs;
    EXPECT_NE(scene.objects[0].shape, scene.objects[1].shape);
    std::vector<std::vector<float>> alone[2];
    for (int i = 0; i < 2; ++i) {
      SceneSpec one = scene;
      one.objects = {scene.objects[i]};
      Render(one, 32, &alone[i]);
    }
    double overlap = 0;
    for (size_t p = 0; p < alone[0][0].size(); ++p) overlap += alone[0][0][p] * alone[1][0][p];
    EXPECT_LT(overlap, 0.5) << "seed " << seed << ": " << Caption(scene, 0);
  }
  EXPECT_EQ(pairs, 200);
}

TEST(ShapesWorldTest, BaseSamplerNeverEmitsAConceptLook) {
  const auto concepts = BuiltinConcepts();
  WorldOptions unrestricted;
  unrestricted.exclude.clear();
  int unrestricted_hits = 0;
  for (uint64_t seed = 0; seed < 20000; ++seed) {
    for (const ObjectSpec& o : SampleScene(seed).objects) {
      EXPECT_TRUE(IsBaseTexture(o.texture)) << "seed " << seed;
      EXPECT_TRUE(o.concept_name.empty());
      for (const auto& c : concepts) EXPECT_FALSE(ShowsConceptLook(o, c)) << c.name << " seed " << seed;
    }
    for (const ObjectSpec& o : SampleScene(seed, unrestricted).objects) {
      for (const auto& c : concepts) unrestricted_hits += ShowsConceptLook(o, c);
    }
  }
  // Without the exclusion the world does produce these colour pairs: the exclusion is what keeps
  // them out.
  EXPECT_GT(unrestricted_hits, 20);
}

TEST(ShapesWorldTest, OpenPatternsReachBaseObjectsButNeverAConceptsColourPair) {
  WorldOptions open;
  open.open_texture_prob = 0.4;
  std::map<Texture, int> patterns;
  int two_colour_patterns = 0;
  bool changed = false;
  for (uint64_t seed = 0; seed < 5000; ++seed) {
    const SceneSpec scene = SampleScene(seed, open);
    changed |= Caption(scene, 0) != Caption(SampleScene(seed), 0);
    for (const ObjectSpec& o : scene.objects) {
      for (const auto& c : BuiltinConcepts()) {
        EXPECT_FALSE(ShowsConceptLook(o, c, /*patterns_open=*/true)) << c.name << " seed " << seed;
      }
      if (IsBaseTexture(o.texture)) continue;
      ++patterns[o.texture];
      two_colour_patterns += o.color2.has_value();
      // The caption names the pattern: "a small ringed blue circle ...".
      EXPECT_NE(Caption(scene, 0).find(TextureName(o.texture)), std::string::npos) << Caption(scene, 0);
    }
  }
  EXPECT_TRUE(changed);
  ASSERT_EQ(patterns.size(), 3u);
  // About 5000 objects x 57 % textured x 0.4 / 3 per pattern.
  for (const auto& [t, n] : patterns) EXPECT_GT(n, 200) << TextureName(t);
  EXPECT_GT(two_colour_patterns, 50);
  EXPECT_EQ(TextureName(Texture::kBullseye), "ringed");
  WorldOptions bad;
  bad.open_texture_prob = 1.5;
  EXPECT_THROW(SampleScene(1, bad), c10::ValueError);
}

TEST(ShapesWorldTest, ConceptRendersDifferFromEveryBaseRenderInTexture) {
  const auto concepts = BuiltinConcepts();
  // Every concept image shows both concept colours, together over a substantial share of the object.
  for (const auto& c : concepts) {
    for (const Sample& s : RenderConcept(c, 24, 5)) {
      std::vector<std::vector<float>> coverage;
      const Image im = Render(s.scene, 32, &coverage);
      ASSERT_TRUE(im == s.image);
      const auto full = FullPixels(coverage[0]);
      const auto shares = MostlyShares(im, full, ColorRgb(c.color), ColorRgb(c.color2));
      EXPECT_GE(shares[0], 0.05) << c.name << ": " << s.caption;  // a small bullseye is mostly orange
      EXPECT_GE(shares[1], 0.05) << c.name << ": " << s.caption;
      EXPECT_GE(shares[0] + shares[1], 0.4) << c.name << ": " << s.caption;
    }
  }
  // No base object ever does: its pixels never carry both colours of any concept.
  WorldOptions open;  // a third of the scenes with open concept patterns, whose words are captioned too
  open.open_texture_prob = 0.5;
  for (uint64_t seed = 0; seed < 3000; ++seed) {
    const SceneSpec scene = SampleScene(seed, seed % 3 == 0 ? open : WorldOptions{});
    std::vector<std::vector<float>> coverage;
    const Image im = Render(scene, 32, &coverage);
    for (size_t i = 0; i < scene.objects.size(); ++i) {
      const auto full = FullPixels(coverage[i]);
      for (const auto& c : concepts) {
        const auto shares = MostlyShares(im, full, ColorRgb(c.color), ColorRgb(c.color2));
        const bool both = shares[0] >= 0.05 && shares[1] >= 0.05;
        EXPECT_FALSE(both) << "seed " << seed << " looks like " << c.name << ": " << Caption(scene, 0);
      }
    }
  }
}

TEST(ShapesWorldTest, ConceptSamplesVaryPoseAndContext) {
  for (const auto& c : BuiltinConcepts()) {
    std::set<int> positions, sizes, backgrounds;
    float min_rot = 1e9, max_rot = -1e9;
    for (const Sample& s : RenderConcept(c, 48, 77, 32)) {
      ASSERT_EQ(s.scene.objects.size(), 1u);
      const ObjectSpec& o = s.scene.objects[0];
      EXPECT_EQ(o.shape, c.shape);
      EXPECT_EQ(o.texture, c.texture);
      EXPECT_EQ(o.concept_name, c.name);
      positions.insert(static_cast<int>(o.position));
      sizes.insert(static_cast<int>(o.size));
      backgrounds.insert(static_cast<int>(s.scene.background));
      min_rot = std::min(min_rot, o.rotation_deg);
      max_rot = std::max(max_rot, o.rotation_deg);
      EXPECT_EQ(s.image.width, 32);
    }
    EXPECT_GE(positions.size(), 7u) << c.name;
    EXPECT_EQ(sizes.size(), 2u) << c.name;
    EXPECT_GE(backgrounds.size(), 5u) << c.name;
    EXPECT_GT(max_rot - min_rot, 30) << c.name;
  }
}

TEST(ShapesWorldTest, SixtyFourPixelRenderIsASharperThirtyTwo) {
  double total = 0;
  int n = 0;
  for (uint64_t seed = 0; seed < 30; ++seed) {
    const SceneSpec scene = SampleScene(seed);
    const Image small = Render(scene, 32), big = Render(scene, 64);
    ASSERT_EQ(big.width, 64);
    for (int y = 0; y < 32; ++y) {
      for (int x = 0; x < 32; ++x) {
        for (int c = 0; c < 3; ++c) {
          const double box = (big.at(2 * x, 2 * y)[c] + big.at(2 * x + 1, 2 * y)[c] + big.at(2 * x, 2 * y + 1)[c] +
                              big.at(2 * x + 1, 2 * y + 1)[c]) / 4.0;
          total += std::abs(box - small.at(x, y)[c]);
          ++n;
        }
      }
    }
  }
  EXPECT_LT(total / n, 2.0);  // same scene, only edge samples differ
}

TEST(ShapesWorldTest, SamplerCoversEveryAttributeValue) {
  std::vector<int> shapes(kNumShapes), colors(kNumObjectColors), textures(kNumBaseTextures), sizes(kNumSizes),
      positions(kNumPositions), backgrounds(kNumColors);
  int two_objects = 0, two_colour = 0;
  const int n = 5000;
  for (uint64_t seed = 0; seed < n; ++seed) {
    const SceneSpec scene = SampleScene(seed);
    const AttributeLabels l = Labels(scene);
    EXPECT_EQ(l.shape, static_cast<int>(scene.objects[0].shape));
    ++shapes.at(l.shape);
    ++colors.at(l.color);
    ++textures.at(l.texture);
    ++sizes.at(l.size);
    ++positions.at(l.position);
    ++backgrounds.at(l.background);
    two_objects += l.num_objects == 2;
    two_colour += l.two_colour;
  }
  for (auto* v : {&shapes, &colors, &textures, &sizes, &positions, &backgrounds}) {
    for (size_t i = 0; i < v->size(); ++i) EXPECT_GT((*v)[i], n / (4 * static_cast<int>(v->size()))) << i;
  }
  EXPECT_NEAR(two_objects, 0.2 * n, 0.03 * n);
  EXPECT_NEAR(two_colour, 0.15 * n, 0.03 * n);
}

TEST(ShapesWorldTest, BadNamesAndScenesRaiseValueErrors) {
  EXPECT_EQ(ParseColor("red"), Color::kRed);
  EXPECT_EQ(ParseShape("star"), Shape::kStar);
  EXPECT_EQ(ParseTexture("zigzag"), Texture::kZigzag);
  EXPECT_THROW(ParseColor("mauve"), c10::ValueError);
  try {
    FindConcept("nope");
    ADD_FAILURE() << "expected c10::ValueError";
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("checker_star"), std::string::npos);
  }
  SceneSpec empty;
  EXPECT_THROW(Caption(empty, 0), c10::ValueError);
  EXPECT_THROW(Render(SampleScene(1), 4), c10::ValueError);
  SceneSpec bad = SampleScene(1);
  bad.objects[0].concept_name = "mine";  // a concept without a superclass word
  EXPECT_THROW(Caption(bad, 0), c10::ValueError);
}

}  // namespace
}  // namespace perfusion

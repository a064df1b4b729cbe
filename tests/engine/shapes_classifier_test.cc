#include "perfusion/shapes_classifier.h"

#include <ATen/Functions.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <cstdio>
#include <string>
#include <unistd.h>
#include <vector>

#include "perfusion/safetensors.h"
#include "tests/engine/test_util.h"

namespace perfusion {
namespace {

using testing::SeededTest;

class ShapesClassifierTest : public SeededTest {};

std::string TempPath(const std::string& name) {
  return ::testing::TempDir() + "/" + name + "_" + std::to_string(::getpid()) + ".safetensors";
}

at::Tensor Renders(int n, uint64_t seed) {
  std::vector<at::Tensor> v;
  for (int i = 0; i < n; ++i) v.push_back(ImageToTensor(Render(SampleClassifierScene(DeriveSeed(seed, i)), 32)));
  return at::stack(v);
}

TEST_F(ShapesClassifierTest, ForwardGivesOneRowPerImageForEveryHead) {
  ShapesClassifier net(ShapesClassifierOptions().width(8).feature_dim(32));
  net->eval();
  torch::NoGradGuard ng;
  const auto out = net->forward(Renders(5, 1));
  for (int h = 0; h < kNumHeads; ++h) {
    EXPECT_EQ(out.logits[h].sizes(), (std::vector<int64_t>{5, HeadClasses(static_cast<Head>(h))}))
        << HeadName(static_cast<Head>(h));
  }
  EXPECT_EQ(out.concepts.sizes(), (std::vector<int64_t>{5, 4}));
  EXPECT_EQ(out.features.sizes(), (std::vector<int64_t>{5, 32}));
  EXPECT_GE(out.features.min().item<float>(), 0.0f);
}

TEST_F(ShapesClassifierTest, HeadsHaveTheWorldsClassCounts) {
  EXPECT_EQ(HeadClasses(Head::kShape), kNumShapes);
  EXPECT_EQ(HeadClasses(Head::kTexture), kNumTextures);
  EXPECT_EQ(HeadClasses(Head::kPosition), kNumPositions);
  EXPECT_EQ(HeadClasses(Head::kBackground), kNumColors);
  EXPECT_EQ(ClassName(Head::kColor2, static_cast<int>(Color::kPlain)), "none");
  EXPECT_EQ(ClassName(Head::kTexture, static_cast<int>(Texture::kBullseye)), "bullseye");
  EXPECT_EQ(ClassName(Head::kPosition, static_cast<int>(Position::kTopLeft)), "top_left");
  EXPECT_THROW(ClassName(Head::kSize, 2), c10::IndexError);
}

TEST_F(ShapesClassifierTest, RejectsImagesOfTheWrongShape) {
  ShapesClassifier net(ShapesClassifierOptions().width(4).feature_dim(8));
  torch::NoGradGuard ng;
  EXPECT_THROW(net->forward(at::zeros({2, 3, 16, 16})), c10::ValueError);
  EXPECT_THROW(net->forward(at::zeros({2, 1, 32, 32})), c10::ValueError);
}

TEST_F(ShapesClassifierTest, SaveAndLoadReproduceOutputsAndOptions) {
  ShapesClassifier net(ShapesClassifierOptions().width(6).feature_dim(20));
  {
    // One training-mode pass so BatchNorm's running statistics are not the defaults.
    torch::NoGradGuard ng;
    net->train();
    net->forward(Renders(16, 2));
  }
  net->eval();
  const std::string path = TempPath("classifier");
  SaveShapesClassifier(net, path, {{"note", "test"}});
  ShapesClassifier back = LoadShapesClassifier(path);
  EXPECT_EQ(back->options().width(), 6);
  EXPECT_EQ(back->options().feature_dim(), 20);
  EXPECT_FALSE(back->is_training());
  EXPECT_EQ(SafetensorsReader::Open(path)->metadata().at("note"), "test");
  torch::NoGradGuard ng;
  const at::Tensor x = Renders(6, 3);
  const auto a = net->forward(x);
  const auto b = back->forward(x);
  for (int h = 0; h < kNumHeads; ++h) EXPECT_TRUE(at::equal(a.logits[h], b.logits[h])) << HeadName(static_cast<Head>(h));
  EXPECT_TRUE(at::equal(a.concepts, b.concepts));
  EXPECT_TRUE(at::equal(a.features, b.features));
  std::remove(path.c_str());
}

TEST_F(ShapesClassifierTest, LoadingAMissingFileNamesIt) {
  try {
    LoadShapesClassifier("/nonexistent/classifier.safetensors");
    FAIL() << "expected c10::ValueError";
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/classifier.safetensors"), std::string::npos);
  }
}

TEST_F(ShapesClassifierTest, PredictResizesAndReturnsProbabilities) {
  ShapesClassifier net(ShapesClassifierOptions().width(4).feature_dim(8));
  const at::Tensor big = at::rand({3, 3, 64, 64}) * 2 - 1;
  const auto preds = Predict(net, big);
  ASSERT_EQ(preds.size(), 3u);
  for (const auto& p : preds) {
    ASSERT_EQ(p.concept_prob.size(), 4u);
    for (float q : p.concept_prob) EXPECT_TRUE(q >= 0 && q <= 1);
    for (int h = 0; h < kNumHeads; ++h) {
      EXPECT_GE(p.label[h], 0);
      EXPECT_LT(p.label[h], HeadClasses(static_cast<Head>(h)));
      EXPECT_GE(p.confidence[h], 1.0f / HeadClasses(static_cast<Head>(h)) - 1e-6f);
    }
    EXPECT_EQ(p.features.numel(), 8);
  }
}

TEST_F(ShapesClassifierTest, LabelsMarkExactlyTheConceptsObjects) {
  const auto concepts = BuiltinConcepts();
  for (size_t c = 0; c < concepts.size(); ++c) {
    const ClassifierLabels l = ClassifierLabelsFor(SampleConceptScene(concepts[c], 7));
    for (size_t k = 0; k < concepts.size(); ++k) EXPECT_EQ(l.concepts[k], k == c ? 1.0f : 0.0f) << concepts[c].name;
    EXPECT_EQ(l.head[static_cast<int>(Head::kColor2)], static_cast<int>(concepts[c].color2));
    EXPECT_TRUE(l.valid[static_cast<int>(Head::kShape)]);
  }
  // A checked red/yellow heart is the look of checker_star on another shape: not the concept.
  ObjectSpec o;
  o.shape = Shape::kHeart;
  o.texture = Texture::kChecked;
  o.color = Color::kYellow;
  o.color2 = Color::kRed;
  EXPECT_FALSE(IsConceptObject(o, FindConcept("checker_star")));
  o.shape = Shape::kStar;
  EXPECT_TRUE(IsConceptObject(o, FindConcept("checker_star")));  // colours in either order
}

TEST_F(ShapesClassifierTest, TrainingMixIsDeterministicAndContainsEveryKind) {
  int concept_scenes = 0, two_objects = 0, near_misses = 0, base = 0;
  const auto concepts = BuiltinConcepts();
  for (uint64_t s = 0; s < 400; ++s) {
    const SceneSpec a = SampleClassifierScene(s);
    ASSERT_EQ(Render(a, 32), Render(SampleClassifierScene(s), 32)) << "seed " << s;
    const ClassifierLabels l = ClassifierLabelsFor(a);
    float present = 0;
    for (float x : l.concepts) present += x;
    if (a.objects.size() == 2) {
      ++two_objects;
      EXPECT_FALSE(l.valid[static_cast<int>(Head::kShape)]);
      EXPECT_TRUE(l.valid[static_cast<int>(Head::kBackground)]);
    } else if (present > 0) {
      ++concept_scenes;
    } else {
      bool looks = !IsBaseTexture(a.objects[0].texture);
      for (const auto& c : concepts) looks |= ShowsConceptLook(a.objects[0], c);
      (looks ? near_misses : base) += 1;
    }
  }
  // 45% base (some two-object), 25% concepts, 15% near misses (some look like base objects), 15% pairs.
  EXPECT_GT(base, 100);
  EXPECT_GT(concept_scenes, 70);
  EXPECT_GT(near_misses, 20);
  EXPECT_GT(two_objects, 60);
}

TEST_F(ShapesClassifierTest, BackgroundsContrastWithEveryObject) {
  for (uint64_t s = 0; s < 300; ++s) {
    const SceneSpec scene = SampleClassifierScene(s);
    for (const auto& o : scene.objects) {
      EXPECT_NE(o.color, scene.background) << "seed " << s;
      if (o.color2) EXPECT_NE(*o.color2, scene.background) << "seed " << s;
    }
  }
}

TEST_F(ShapesClassifierTest, FeatureSimilarityIsCosine) {
  EXPECT_NEAR(FeatureSimilarity(at::tensor({1.0f, 0.0f}), at::tensor({2.0f, 0.0f})), 1.0, 1e-12);
  EXPECT_NEAR(FeatureSimilarity(at::tensor({1.0f, 0.0f}), at::tensor({0.0f, 3.0f})), 0.0, 1e-12);
  EXPECT_EQ(FeatureSimilarity(at::zeros({2}), at::tensor({1.0f, 1.0f})), 0.0);
  EXPECT_THROW(FeatureSimilarity(at::zeros({2}), at::zeros({3})), c10::ValueError);
}

TEST_F(ShapesClassifierTest, ShippedClassifierFitsItsConfig) {
  const std::string path = testing::SourceDir() + "/models/tiny/eval/classifier.safetensors";
  if (!testing::FileExists(path)) GTEST_SKIP() << path << " not trained yet";
  ShapesClassifier net = LoadShapesClassifier(path);
  const auto preds = Predict(net, Renders(4, 11));
  EXPECT_EQ(preds.size(), 4u);
}

}  // namespace
}  // namespace perfusion

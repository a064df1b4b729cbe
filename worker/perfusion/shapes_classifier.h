// shapes_classifier: a small CNN that reads a shapes-world image back into its attributes, the
// quality harness's judge (docs/quality.md). One softmax head per attribute of the first object
// (shape, colour, second colour, texture, size, position) and of the scene (background), plus one
// sigmoid per builtin concept: "this concept's object is in the picture" (concept presence).
//
// Concept identity ("is it our object?") is the presence head: P(concept c present) > 0.5. It is
// trained on exact renders of each concept (alone, in any pose and context, or beside another
// object) as positives, and as negatives on base scenes and on near misses (the concept's look on
// another shape, the concept's shape and colours with another texture, the concept's shape and
// texture in other colours), so it answers "this object", not "something checked" or "a star".
// The penultimate features (`features`) also give a continuous identity score: the cosine
// similarity of a generated image's features to the mean features of the concept's training images.
//
// Architecture (width w = 24 by default): conv3x3(3->w) BN ReLU, maxpool 2 (16x16);
// conv3x3(w->2w) BN ReLU, maxpool 2 (8x8); conv3x3(2w->4w) BN ReLU; conv3x3(4w->4w) BN ReLU,
// maxpool 2 (4x4); flatten -> linear(16*4w -> feature_dim) ReLU -> heads. The flatten keeps the
// layout, which the position head needs. About 0.4 M parameters, ~11 M multiply-adds per image.
//
// Ref: the heads' classes are shapes_world.h's enums (AttributeLabels); presence follows
// BuiltinConcepts() order.
// Device/dtype: follows its parameters (float32 on the CPU by default); images are cast to them.
// Thread safety: forward() in eval mode reads the module only (BatchNorm uses its running stats);
// training mode updates those statistics (one thread).
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "perfusion/image_io.h"
#include "perfusion/shapes_world.h"

namespace perfusion {

// The classification heads, in output order.
enum class Head : uint8_t { kShape, kColor, kColor2, kTexture, kSize, kPosition, kBackground, kCount };
constexpr int kNumHeads = static_cast<int>(Head::kCount);

// "shape", "color", "color2", "texture", "size", "position", "background".
const std::string& HeadName(Head h);
// Classes of each head: kNumShapes, kNumColors (colour: the object colours, never kPlain), kNumColors
// (color2: kPlain = "no second colour", i.e. solid or shaded), kNumTextures, kNumSizes, kNumPositions,
// kNumColors (background).
int HeadClasses(Head h);
// The name of class `label` of head `h` ("star", "top_left", "none" for color2 = kPlain, ...).
std::string ClassName(Head h, int label);

struct ShapesClassifierOptions {
  // Input side; images of another size are resized bilinearly by Predict().
  TORCH_ARG(int64_t, image_size) = 32;
  // Channels of the first convolution; the next stages have 2x and 4x.
  TORCH_ARG(int64_t, width) = 24;
  // Width of the penultimate features.
  TORCH_ARG(int64_t, feature_dim) = 192;
  // Presence outputs (BuiltinConcepts() order).
  TORCH_ARG(int64_t, num_concepts) = 4;
};

struct ShapesClassifierOutput {
  std::array<at::Tensor, kNumHeads> logits;  // [B, HeadClasses(h)] each, in Head order
  at::Tensor concepts;                       // [B, num_concepts] presence logits
  at::Tensor features;                       // [B, feature_dim] penultimate activations (>= 0)
};

class ShapesClassifierImpl : public torch::nn::Module {
 public:
  explicit ShapesClassifierImpl(ShapesClassifierOptions options = {});

  // images: [B, 3, image_size, image_size] in [-1, 1] (ImageToTensor's range).
  // REQUIRES: that shape (else c10::ValueError naming both shapes).
  ShapesClassifierOutput forward(const at::Tensor& images);

  const ShapesClassifierOptions& options() const { return options_; }

 private:
  ShapesClassifierOptions options_;
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr}, conv3{nullptr}, conv4{nullptr};
  torch::nn::BatchNorm2d norm1{nullptr}, norm2{nullptr}, norm3{nullptr}, norm4{nullptr};
  torch::nn::Linear fc{nullptr};
  std::array<torch::nn::Linear, kNumHeads> heads_{nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  torch::nn::Linear concept_head{nullptr};
};
TORCH_MODULE(ShapesClassifier);

// ---- Labels and training data -------------------------------------------------------------------

// What the classifier is trained to output for a scene.
struct ClassifierLabels {
  std::array<int, kNumHeads> head{};   // class per head (see HeadClasses)
  // Which heads are defined: the object heads only for one-object scenes (with two objects "the
  // first object" is not visible in the image); background always.
  std::array<bool, kNumHeads> valid{};
  std::vector<float> concepts;         // 1 where that builtin concept's object is in the scene
};

// Exactly `concept_spec`'s object: its shape, texture and its two colours (either order).
bool IsConceptObject(const ObjectSpec& object, const ConceptSpec& concept_spec);

ClassifierLabels ClassifierLabelsFor(const SceneSpec& scene);

// One training scene of the classifier's mix (item `seed`): 45% base scenes (SampleScene), 25% a
// builtin concept alone (SampleConceptScene), 15% near misses of a concept (one of shape, texture or
// a colour changed), 15% two small objects with one or both replaced by concepts. Backgrounds always
// contrast with the objects. Deterministic in the seed.
SceneSpec SampleClassifierScene(uint64_t seed);

// ---- Inference -----------------------------------------------------------------------------------

struct AttributePrediction {
  std::array<int, kNumHeads> label{};        // argmax per head
  std::array<float, kNumHeads> confidence{};  // its softmax probability
  std::vector<float> concept_prob;            // sigmoid of each presence logit
  at::Tensor features;                        // [feature_dim] float32, CPU
};

// Runs the classifier in eval mode under InferenceMode on images [N, 3, H, W] in [-1, 1] (any size:
// resized to image_size), in batches of 256. Leaves the module in eval mode.
std::vector<AttributePrediction> Predict(ShapesClassifier& classifier, const at::Tensor& images);

// The identity decision for builtin concept `concept_index`: presence probability > threshold.
bool ShowsConcept(const AttributePrediction& p, int concept_index, double threshold = 0.5);

// Cosine similarity of `features` [F] to `reference` [F] (e.g. the mean features of a concept's
// training images); 0 if either is zero.
double FeatureSimilarity(const at::Tensor& features, const at::Tensor& reference);

// ---- Files ----------------------------------------------------------------------------------------

// Writes the weights (float32 safetensors) with the options as JSON in metadata "config", plus
// `metadata` (e.g. accuracy figures).
void SaveShapesClassifier(const ShapesClassifier& classifier, const std::string& path,
                          const std::map<std::string, std::string>& metadata = {});

// Loads a file written by SaveShapesClassifier (options from its "config" metadata); eval mode.
// Throws c10::ValueError naming the path for a missing file or mismatched tensors.
ShapesClassifier LoadShapesClassifier(const std::string& path);

}  // namespace perfusion

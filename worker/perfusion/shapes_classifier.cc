#include "perfusion/shapes_classifier.h"

#include <ATen/Functions.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <torch/nn/functional/activation.h>
#include <torch/nn/functional/pooling.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "perfusion/module_io.h"
#include "perfusion/safetensors.h"

namespace perfusion {
namespace {

constexpr int kNone = static_cast<int>(Color::kPlain);  // color2 class "no second colour"

double Distance(const std::array<uint8_t, 3>& a, const std::array<uint8_t, 3>& b) {
  double s = 0;
  for (int i = 0; i < 3; ++i) s += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
  return std::sqrt(s);
}

// The same contrast rule the world's sampler uses: both of an object's colours stand out.
bool Contrasts(const ObjectSpec& o, Color background) {
  const auto bg = ColorRgb(background);
  if (Distance(ColorRgb(o.color), bg) < 90) return false;
  if (o.texture == Texture::kSolid) return true;
  const auto second = o.color2 ? ColorRgb(*o.color2) : ShadeRgb(o.color);
  return Distance(second, bg) >= (o.color2 ? 90 : 60);
}

Color PickBackground(SplitMix64& rng, const std::vector<ObjectSpec>& objects) {
  std::vector<Color> allowed;
  for (int i = 0; i < kNumColors; ++i) {
    const Color c = static_cast<Color>(i);
    if (std::all_of(objects.begin(), objects.end(), [&](const ObjectSpec& o) { return Contrasts(o, c); })) {
      allowed.push_back(c);
    }
  }
  if (allowed.empty()) return Color::kPlain;
  return allowed[rng.UniformInt(static_cast<int>(allowed.size()))];
}

// Gives `o` the look (shape, texture, colours) of `c`, keeping its pose.
void ApplyLook(const ConceptSpec& c, ObjectSpec* o) {
  o->shape = c.shape;
  o->texture = c.texture;
  o->color = c.color;
  o->color2 = c.color2;
  o->concept_name = c.name;
  o->superclass = c.superclass;
}

int Idx(Color c) { return static_cast<int>(c); }

}  // namespace

const std::string& HeadName(Head h) {
  static const std::vector<std::string> names = {"shape", "color", "color2", "texture", "size", "position", "background"};
  return names.at(static_cast<size_t>(h));
}

int HeadClasses(Head h) {
  switch (h) {
    case Head::kShape: return kNumShapes;
    case Head::kColor: return kNumColors;
    case Head::kColor2: return kNumColors;
    case Head::kTexture: return kNumTextures;
    case Head::kSize: return kNumSizes;
    case Head::kPosition: return kNumPositions;
    case Head::kBackground: return kNumColors;
    case Head::kCount: break;
  }
  TORCH_CHECK_VALUE(false, "HeadClasses: invalid head ", static_cast<int>(h));
}

std::string ClassName(Head h, int label) {
  TORCH_CHECK_INDEX(label >= 0 && label < HeadClasses(h), "ClassName: label ", label, " out of range for head ",
                    HeadName(h), " (", HeadClasses(h), " classes)");
  static const std::vector<std::string> textures = {"solid",    "striped",  "dotted", "checked",
                                                    "diagonal", "bullseye", "zigzag"};
  switch (h) {
    case Head::kShape: return ShapeName(static_cast<Shape>(label));
    case Head::kColor:
    case Head::kBackground: return ColorName(static_cast<Color>(label));
    case Head::kColor2: return label == kNone ? "none" : ColorName(static_cast<Color>(label));
    case Head::kTexture: return textures.at(label);
    case Head::kSize: return SizeName(static_cast<Size>(label));
    case Head::kPosition: return PositionName(static_cast<Position>(label));
    case Head::kCount: break;
  }
  return "?";
}

ShapesClassifierImpl::ShapesClassifierImpl(ShapesClassifierOptions o) : options_(o) {
  TORCH_CHECK_VALUE(o.image_size() >= 8 && o.image_size() % 8 == 0, "ShapesClassifier: image_size must be a multiple of 8, got ",
                    o.image_size());
  TORCH_CHECK_VALUE(o.width() >= 1 && o.feature_dim() >= 1 && o.num_concepts() >= 0,
                    "ShapesClassifier: width and feature_dim must be positive");
  const int64_t w = o.width();
  auto conv = [](int64_t in, int64_t out) {
    return torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, /*kernel_size=*/3).padding(1).bias(false));
  };
  conv1 = register_module("conv1", conv(3, w));
  norm1 = register_module("norm1", torch::nn::BatchNorm2d(w));
  conv2 = register_module("conv2", conv(w, 2 * w));
  norm2 = register_module("norm2", torch::nn::BatchNorm2d(2 * w));
  conv3 = register_module("conv3", conv(2 * w, 4 * w));
  norm3 = register_module("norm3", torch::nn::BatchNorm2d(4 * w));
  conv4 = register_module("conv4", conv(4 * w, 4 * w));
  norm4 = register_module("norm4", torch::nn::BatchNorm2d(4 * w));
  const int64_t side = o.image_size() / 8;
  fc = register_module("fc", torch::nn::Linear(4 * w * side * side, o.feature_dim()));
  for (int h = 0; h < kNumHeads; ++h) {
    heads_[h] = register_module("head_" + HeadName(static_cast<Head>(h)),
                                torch::nn::Linear(o.feature_dim(), HeadClasses(static_cast<Head>(h))));
  }
  concept_head = register_module("head_concepts", torch::nn::Linear(o.feature_dim(), std::max<int64_t>(1, o.num_concepts())));
}

ShapesClassifierOutput ShapesClassifierImpl::forward(const at::Tensor& images) {
  const int64_t S = options_.image_size();
  TORCH_CHECK_VALUE(images.dim() == 4 && images.size(1) == 3 && images.size(2) == S && images.size(3) == S,
                    "ShapesClassifier: images must be [B, 3, ", S, ", ", S, "], got ", images.sizes());
  at::Tensor x = images.to(fc->weight.scalar_type());
  x = at::max_pool2d(at::relu(norm1->forward(conv1->forward(x))), {2, 2});  // [B, w, S/2, S/2]
  x = at::max_pool2d(at::relu(norm2->forward(conv2->forward(x))), {2, 2});  // [B, 2w, S/4, S/4]
  x = at::relu(norm3->forward(conv3->forward(x)));                          // [B, 4w, S/4, S/4]
  x = at::max_pool2d(at::relu(norm4->forward(conv4->forward(x))), {2, 2});  // [B, 4w, S/8, S/8]
  ShapesClassifierOutput out;
  out.features = at::relu(fc->forward(x.flatten(1)));  // [B, F]
  for (int h = 0; h < kNumHeads; ++h) out.logits[h] = heads_[h]->forward(out.features);  // [B, classes]
  out.concepts = concept_head->forward(out.features).slice(1, 0, options_.num_concepts());  // [B, K]
  return out;
}

// ---- Labels and data ------------------------------------------------------------------------------

bool IsConceptObject(const ObjectSpec& o, const ConceptSpec& c) {
  if (o.shape != c.shape || o.texture != c.texture || !o.color2) return false;
  return (o.color == c.color && *o.color2 == c.color2) || (o.color == c.color2 && *o.color2 == c.color);
}

ClassifierLabels ClassifierLabelsFor(const SceneSpec& scene) {
  const AttributeLabels a = Labels(scene);
  ClassifierLabels l;
  const ObjectSpec& o = scene.objects[0];
  l.head[static_cast<int>(Head::kShape)] = a.shape;
  l.head[static_cast<int>(Head::kColor)] = a.color;
  l.head[static_cast<int>(Head::kColor2)] = o.color2 ? Idx(*o.color2) : kNone;
  l.head[static_cast<int>(Head::kTexture)] = a.texture;
  l.head[static_cast<int>(Head::kSize)] = a.size;
  l.head[static_cast<int>(Head::kPosition)] = a.position;
  l.head[static_cast<int>(Head::kBackground)] = a.background;
  const bool single = scene.objects.size() == 1;
  for (int h = 0; h < kNumHeads; ++h) l.valid[h] = single || h == static_cast<int>(Head::kBackground);
  for (const ConceptSpec& c : BuiltinConcepts()) {
    const bool present = std::any_of(scene.objects.begin(), scene.objects.end(),
                                     [&](const ObjectSpec& obj) { return IsConceptObject(obj, c); });
    l.concepts.push_back(present ? 1.0f : 0.0f);
  }
  return l;
}

SceneSpec SampleClassifierScene(uint64_t seed) {
  static const std::vector<ConceptSpec> concepts = BuiltinConcepts();
  const int nc = static_cast<int>(concepts.size());
  SplitMix64 rng(DeriveSeed(seed, 0xc1a55));
  const double u = rng.Uniform();
  if (u < 0.45) return SampleScene(rng.Next());
  const ConceptSpec& c = concepts[rng.UniformInt(nc)];
  if (u < 0.70) return SampleConceptScene(c, rng.Next());
  if (u < 0.85) {
    // A near miss: the concept with one thing changed. Not a concept object (and, by construction,
    // never another builtin concept: they differ from each other in more than one attribute).
    SceneSpec s = SampleConceptScene(c, rng.Next());
    ObjectSpec& o = s.objects[0];
    o.concept_name.clear();
    o.superclass.clear();
    switch (rng.UniformInt(3)) {
      case 0:
        do o.shape = static_cast<Shape>(rng.UniformInt(kNumShapes));
        while (o.shape == c.shape);
        break;
      case 1:
        do o.texture = static_cast<Texture>(1 + rng.UniformInt(kNumTextures - 1));  // a two-colour pattern
        while (o.texture == c.texture);
        break;
      default: {
        Color& which = rng.Bernoulli(0.5) ? o.color : *o.color2;
        const Color other = &which == &o.color ? *o.color2 : o.color;
        do which = static_cast<Color>(rng.UniformInt(kNumObjectColors));
        while (which == c.color || which == c.color2 || Distance(ColorRgb(which), ColorRgb(other)) < 90);
        break;
      }
    }
    s.background = PickBackground(rng, s.objects);
    return s;
  }
  // Two small objects, one or both of them concepts.
  WorldOptions two;
  two.two_object_prob = 1.0;
  SceneSpec s = SampleScene(rng.Next(), two);
  const int which = rng.UniformInt(3);  // 0: first, 1: second, 2: both
  if (which != 1) ApplyLook(c, &s.objects[0]);
  if (which != 0) {
    const ConceptSpec& d = which == 2 ? concepts[(&c - concepts.data() + 1 + rng.UniformInt(nc - 1)) % nc] : c;
    ApplyLook(d, &s.objects[1]);
  }
  s.background = PickBackground(rng, s.objects);
  return s;
}

// ---- Inference ------------------------------------------------------------------------------------

std::vector<AttributePrediction> Predict(ShapesClassifier& classifier, const at::Tensor& images) {
  TORCH_CHECK_VALUE(images.dim() == 4 && images.size(1) == 3, "Predict: images must be [N, 3, H, W], got ",
                    images.sizes());
  c10::InferenceMode guard;
  classifier->eval();
  const int64_t S = classifier->options().image_size();
  std::vector<AttributePrediction> out;
  out.reserve(images.size(0));
  for (int64_t start = 0; start < images.size(0); start += 256) {
    at::Tensor x = images.slice(0, start, std::min(images.size(0), start + 256)).to(at::kFloat);
    if (x.size(2) != S || x.size(3) != S) x = ResizeBilinear(x, static_cast<int>(S), static_cast<int>(S));
    const ShapesClassifierOutput y = classifier->forward(x.to(classifier->parameters()[0].device()));
    std::array<at::Tensor, kNumHeads> prob, arg;
    for (int h = 0; h < kNumHeads; ++h) {
      auto [p, a] = at::softmax(y.logits[h].to(at::kFloat), 1).max(1);
      prob[h] = p.cpu();
      arg[h] = a.cpu();
    }
    const at::Tensor cp = at::sigmoid(y.concepts.to(at::kFloat)).cpu().contiguous();
    const at::Tensor feats = y.features.to(at::kFloat).cpu();
    for (int64_t i = 0; i < x.size(0); ++i) {
      AttributePrediction p;
      for (int h = 0; h < kNumHeads; ++h) {
        p.label[h] = static_cast<int>(arg[h][i].item<int64_t>());
        p.confidence[h] = prob[h][i].item<float>();
      }
      const float* c = cp.data_ptr<float>() + i * cp.size(1);
      p.concept_prob.assign(c, c + cp.size(1));
      p.features = feats[i].clone();
      out.push_back(std::move(p));
    }
  }
  return out;
}

bool ShowsConcept(const AttributePrediction& p, int concept_index, double threshold) {
  TORCH_CHECK_INDEX(concept_index >= 0 && concept_index < static_cast<int>(p.concept_prob.size()),
                    "ShowsConcept: concept ", concept_index, " out of range [0, ", p.concept_prob.size(), ")");
  return p.concept_prob[concept_index] > threshold;
}

double FeatureSimilarity(const at::Tensor& features, const at::Tensor& reference) {
  TORCH_CHECK_VALUE(features.numel() == reference.numel(), "FeatureSimilarity: features ", features.sizes(),
                    " and reference ", reference.sizes(), " differ in size");
  const at::Tensor a = features.reshape({-1}).to(at::kDouble), b = reference.reshape({-1}).to(at::kDouble);
  const double na = a.norm().item<double>(), nb = b.norm().item<double>();
  if (na == 0 || nb == 0) return 0;
  return a.dot(b).item<double>() / (na * nb);
}

// ---- Files ----------------------------------------------------------------------------------------

void SaveShapesClassifier(const ShapesClassifier& classifier, const std::string& path,
                          const std::map<std::string, std::string>& metadata) {
  const auto& o = classifier->options();
  nlohmann::json config = {{"image_size", o.image_size()},
                           {"width", o.width()},
                           {"feature_dim", o.feature_dim()},
                           {"num_concepts", o.num_concepts()}};
  std::map<std::string, std::string> meta = metadata;
  meta["format"] = "pt";
  meta["config"] = config.dump();
  SaveStateDict(*classifier, path, meta);
}

ShapesClassifier LoadShapesClassifier(const std::string& path) {
  std::shared_ptr<const SafetensorsReader> file;
  try {
    file = SafetensorsReader::Open(path);
  } catch (const c10::Error& e) {
    TORCH_CHECK_VALUE(false, "shapes classifier '", path, "': ", e.what_without_backtrace(),
                      " (train one with perfusion-train-classifier)");
  }
  auto it = file->metadata().find("config");
  TORCH_CHECK_VALUE(it != file->metadata().end(), "shapes classifier '", path, "': no \"config\" metadata");
  ShapesClassifierOptions o;
  try {
    const auto j = nlohmann::json::parse(it->second);
    o.image_size(j.at("image_size").get<int64_t>())
        .width(j.at("width").get<int64_t>())
        .feature_dim(j.at("feature_dim").get<int64_t>())
        .num_concepts(j.at("num_concepts").get<int64_t>());
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK_VALUE(false, "shapes classifier '", path, "': bad config metadata: ", e.what());
  }
  ShapesClassifier classifier(o);
  LoadStateDict(*classifier, *file);
  classifier->eval();
  for (auto& p : classifier->parameters()) p.set_requires_grad(false);
  return classifier;
}

}  // namespace perfusion

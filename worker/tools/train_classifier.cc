// perfusion-train-classifier: trains the quality harness's shapes-world classifier
// (shapes_classifier.h) on fresh renders and reports its accuracy on held-out renders.
//
//   perfusion-train-classifier --out models/tiny/eval/classifier.safetensors [--model models/tiny]
//
// Data: --train scenes of SampleClassifierScene's mix (base scenes, builtin concepts alone, near misses,
// two objects with concepts), rendered once; a fraction of them also goes through the model's VAE
// (encode + decode), so the classifier has seen the decoder's blur and colour shifts that generated
// images show. Held-out scenes use other seeds; accuracy is printed for the clean renders and for the
// same renders through the VAE. Writes the weights (config and accuracy in the safetensors metadata)
// and a JSON summary beside them (<out without .safetensors>.json). Deterministic for a seed and
// thread count.
#include <ATen/Context.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Reduction.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/functional/loss.h>
#include <torch/optim/adamw.h>

#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <optional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "perfusion/foreach_optim.h"
#include "perfusion/image_io.h"
#include "perfusion/module_io.h"
#include "perfusion/name_conversion.h"
#include "perfusion/plot.h"
#include "perfusion/vae.h"
#include "perfusion/safetensors.h"
#include "perfusion/scheduler.h"
#include "perfusion/shapes_classifier.h"
#include "perfusion/shapes_world.h"
#include "tools/tool_args.h"
#include "tools/tool_device.h"
#include "tools/tool_files.h"

using namespace perfusion;
using Clock = std::chrono::steady_clock;

namespace {

struct Args {
  std::string out = "models/tiny/eval/classifier.safetensors";
  std::string model = "models/tiny";  // for the VAE round trip; "none" to skip
  int64_t train = 64000, test = 2000;
  int64_t steps = 4000, batch = 64;
  double lr = 2e-3;
  double vae_fraction = 0.15;
  int64_t width = 24;
  uint64_t seed = 1;
  int threads = 0;
  std::string sheet;  // PNG: held-out scenes, clean and through the VAE
  c10::Device device = c10::Device(c10::kCPU);
};

void Usage() {
  std::printf(
      "perfusion-train-classifier: train the shapes-world classifier of the quality harness\n\n"
      "  --out PATH            weights (default models/tiny/eval/classifier.safetensors); a .json summary beside\n"
      "  --model DIR           model whose VAE round-trips part of the data (default models/tiny; 'none' = skip)\n"
      "  --train N             training scenes (default 64000)\n"
      "  --test N              held-out scenes (default 2000)\n"
      "  --steps N             optimizer steps (default 4000); --batch N (default 64)\n"
      "  --lr X                peak AdamW learning rate, cosine decay (default 2e-3)\n"
      "  --vae-fraction X      fraction of training scenes also used through the VAE (default 0.15)\n"
      "  --width N             first conv width (default 24)\n"
      "  --seed S              (default 1)\n"
      "  --threads N           LibTorch threads (default: all cores)\n"
      "  --device D            cpu (default), cuda or cuda:N: where the VAE and the classifier run (batches\n"
      "                        and noise are drawn on the CPU, so a seed picks the same data anywhere)\n"
      "  --sheet PATH          also write a PNG of 16 held-out scenes: clean, and through the VAE\n");
}

struct Data {
  at::Tensor images;  // [N, 3, 32, 32] uint8
  std::vector<ClassifierLabels> labels;
  std::vector<int> kind;  // 0 base, 1 concept alone, 2 near miss, 3 two objects (for the report)
};

// Near misses are recognised by what base scenes never show: a concept-only texture or a concept's
// colour pair (near misses that change a colour and keep a base texture look like base objects).
int Kind(const SceneSpec& s) {
  if (s.objects.size() == 2) return 3;
  const ObjectSpec& o = s.objects[0];
  if (!o.concept_name.empty()) return 1;
  for (const auto& c : BuiltinConcepts()) {
    if (ShowsConceptLook(o, c)) return 2;
  }
  return 0;
}

Data RenderData(int64_t n, uint64_t seed, int64_t size) {
  Data d;
  d.images = at::empty({n, 3, size, size}, at::TensorOptions().dtype(at::kByte));
  auto acc = d.images.accessor<uint8_t, 4>();
  for (int64_t i = 0; i < n; ++i) {
    const SceneSpec scene = SampleClassifierScene(DeriveSeed(seed, static_cast<uint64_t>(i)));
    const Image im = Render(scene, static_cast<int>(size));
    for (int y = 0; y < im.height; ++y) {
      for (int x = 0; x < im.width; ++x) {
        const uint8_t* p = im.at(x, y);
        for (int c = 0; c < 3; ++c) acc[i][c][y][x] = p[c];
      }
    }
    d.labels.push_back(ClassifierLabelsFor(scene));
    d.kind.push_back(Kind(scene));
    if ((i + 1) % 4000 == 0) {
      std::printf("  rendered %lld/%lld\n", (long long)(i + 1), (long long)n);
      std::fflush(stdout);
    }
  }
  return d;
}

// The training labels as tensors on the training device, made once: a step gathers its batch's rows
// with one index_select each instead of building them from C++ vectors (host work per step, and a
// copy to the device per head on a GPU).
struct LabelTensors {
  at::Tensor head;      // [N, kNumHeads] int64: the class per head
  at::Tensor valid;     // [N, kNumHeads] float: 1 where that head is defined
  at::Tensor presence;  // [N, concepts] float: 1 where that builtin concept is in the scene
};

LabelTensors MakeLabelTensors(const std::vector<ClassifierLabels>& labels, c10::Device device) {
  const int64_t n = static_cast<int64_t>(labels.size());
  const int64_t concepts = labels.empty() ? 0 : static_cast<int64_t>(labels[0].concepts.size());
  LabelTensors t;
  t.head = at::empty({n, kNumHeads}, at::TensorOptions().dtype(at::kLong));
  t.valid = at::empty({n, kNumHeads}, at::TensorOptions().dtype(at::kFloat));
  t.presence = at::empty({n, concepts}, at::TensorOptions().dtype(at::kFloat));
  auto head = t.head.accessor<int64_t, 2>();
  auto valid = t.valid.accessor<float, 2>();
  auto presence = t.presence.accessor<float, 2>();
  for (int64_t i = 0; i < n; ++i) {
    const ClassifierLabels& l = labels[i];
    TORCH_CHECK(static_cast<int64_t>(l.concepts.size()) == concepts, "scene ", i, ": ", l.concepts.size(),
                " concept labels, expected ", concepts);
    for (int h = 0; h < kNumHeads; ++h) {
      head[i][h] = l.head[h];
      valid[i][h] = l.valid[h] ? 1.0f : 0.0f;
    }
    for (int64_t c = 0; c < concepts; ++c) presence[i][c] = l.concepts[c];
  }
  t.head = t.head.to(device);
  t.valid = t.valid.to(device);
  t.presence = t.presence.to(device);
  return t;
}

at::Tensor ToFloat(const at::Tensor& u8) { return u8.to(at::kFloat) / 127.5 - 1.0; }
at::Tensor ToByte(const at::Tensor& f) { return ((f.clamp(-1, 1) + 1) * 127.5).round().to(at::kByte); }

// The model folder's VAE alone (vae/config.json + weights, fp32 or the fp16 variant), float32 on the CPU.
AutoencoderKL LoadVae(const std::string& dir) {
  const std::string config = dir + "/vae/config.json";
  TORCH_CHECK_VALUE(Exists(config), "--model ", dir, ": no vae/config.json");
  std::string weights = dir + "/vae/diffusion_pytorch_model.safetensors";
  if (!Exists(weights)) weights = dir + "/vae/diffusion_pytorch_model.fp16.safetensors";
  AutoencoderKL vae(AutoencoderKLOptionsFromJson(ReadFileToString(config)));
  LoadStateDict(*vae, weights, VaeLoadOptions());
  vae->eval();
  return vae;
}

// Encodes and decodes images through the VAE (the posterior mode), in batches, on the VAE's device;
// the result is on the CPU.
at::Tensor RoundTrip(AutoencoderKL& vae, const at::Tensor& u8) {
  torch::NoGradGuard ng;
  const c10::Device dev = vae->parameters()[0].device();
  std::vector<at::Tensor> out;
  for (int64_t s = 0; s < u8.size(0); s += 128) {
    at::Tensor x = ToFloat(u8.slice(0, s, std::min(u8.size(0), s + 128))).to(dev);
    out.push_back(ToByte(vae->decode(vae->encode(x).mode()).to(at::kFloat)).cpu());
  }
  return at::cat(out);
}

struct Report {
  std::array<double, kNumHeads> head_acc{};
  double presence_tpr = 0;       // concept present (alone or with another object): detected
  double presence_fpr_base = 0;  // base scenes: any concept detected
  double presence_fpr_near = 0;  // near misses: any concept detected
  double presence_acc = 0;       // every presence output right, all scenes
};

Report Evaluate(ShapesClassifier& net, const at::Tensor& images_u8, const Data& d) {
  const auto preds = Predict(net, ToFloat(images_u8));
  Report r;
  std::array<int64_t, kNumHeads> ok{}, n{};
  int64_t tp = 0, pos = 0, fp_base = 0, n_base = 0, fp_near = 0, n_near = 0, all_ok = 0;
  for (size_t i = 0; i < preds.size(); ++i) {
    const auto& l = d.labels[i];
    for (int h = 0; h < kNumHeads; ++h) {
      if (!l.valid[h]) continue;
      ++n[h];
      ok[h] += preds[i].label[h] == l.head[h];
    }
    bool any = false, right = true;
    for (size_t c = 0; c < l.concepts.size(); ++c) {
      const bool said = ShowsConcept(preds[i], static_cast<int>(c));
      any |= said;
      right &= said == (l.concepts[c] > 0.5f);
      if (l.concepts[c] > 0.5f) {
        ++pos;
        tp += said;
      }
    }
    all_ok += right;
    if (d.kind[i] == 0) n_base++, fp_base += any;
    if (d.kind[i] == 2) n_near++, fp_near += any;
  }
  for (int h = 0; h < kNumHeads; ++h) r.head_acc[h] = n[h] ? double(ok[h]) / n[h] : 0;
  r.presence_tpr = pos ? double(tp) / pos : 0;
  r.presence_fpr_base = n_base ? double(fp_base) / n_base : 0;
  r.presence_fpr_near = n_near ? double(fp_near) / n_near : 0;
  r.presence_acc = preds.empty() ? 0 : double(all_ok) / preds.size();
  return r;
}

nlohmann::json ToJson(const Report& r) {
  nlohmann::json j;
  for (int h = 0; h < kNumHeads; ++h) j[HeadName(static_cast<Head>(h))] = r.head_acc[h];
  j["presence_tpr"] = r.presence_tpr;
  j["presence_fpr_base"] = r.presence_fpr_base;
  j["presence_fpr_near_miss"] = r.presence_fpr_near;
  j["presence_all_correct"] = r.presence_acc;
  return j;
}

void PrintReport(const char* what, const Report& r) {
  std::printf("%s\n", what);
  for (int h = 0; h < kNumHeads; ++h) {
    std::printf("  %-11s %6.2f%%\n", HeadName(static_cast<Head>(h)).c_str(), 100 * r.head_acc[h]);
  }
  std::printf("  presence: detected %.2f%% of concept objects; false alarms %.2f%% on base scenes, %.2f%% on near misses;"
              " all outputs right on %.2f%% of scenes\n",
              100 * r.presence_tpr, 100 * r.presence_fpr_base, 100 * r.presence_fpr_near, 100 * r.presence_acc);
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  std::string command = "perfusion-train-classifier";
  if (auto code = ParseToolArgs(argc, argv, Usage, [&](const std::string& k, const NextValue& v) {
      if (k == "--out") a.out = v();
      else if (k == "--model") a.model = v();
      else if (k == "--train") a.train = ParseInt64(v());
      else if (k == "--test") a.test = ParseInt64(v());
      else if (k == "--steps") a.steps = ParseInt64(v());
      else if (k == "--batch") a.batch = ParseInt64(v());
      else if (k == "--lr") a.lr = ParseDouble(v());
      else if (k == "--vae-fraction") a.vae_fraction = ParseDouble(v());
      else if (k == "--width") a.width = ParseInt64(v());
      else if (k == "--seed") a.seed = ParseUint64(v());
      else if (k == "--threads") a.threads = ParseInt(v());
      else if (k == "--sheet") a.sheet = v();
      else if (k == "--device") a.device = ParseToolDevice(v());
      else return false;
      return true;
    })) {
    return *code;
  }
  for (int i = 1; i < argc; ++i) command += std::string(" ") + argv[i];
  // Each refusal names its flag (exit 2), before any work starts.
  const char* bad = nullptr;
  if (a.batch < 1) bad = "--batch must be >= 1";
  else if (a.train < a.batch) bad = "--train must be >= --batch";
  else if (a.test < 1) bad = "--test must be >= 1";
  else if (a.steps < 1) bad = "--steps must be >= 1";
  else if (!(a.lr > 0)) bad = "--lr must be > 0";
  else if (!(a.vae_fraction >= 0 && a.vae_fraction <= 1)) bad = "--vae-fraction must be in [0, 1]";
  else if (a.width < 1) bad = "--width must be >= 1";
  else if (a.threads < 0) bad = "--threads must be >= 0";
  else if (a.out.empty()) bad = "--out must name a file";
  if (bad != nullptr) {
    std::fprintf(stderr, "%s (see --help)\n", bad);
    return 2;
  }
  try {
    if (a.threads > 0) at::set_num_threads(a.threads);
    const auto t0 = Clock::now();
    auto seconds = [&] { return std::chrono::duration<double>(Clock::now() - t0).count(); };
    const int64_t S = 32;
    // A missing model or an unwritable output folder fails now, not after minutes of rendering and training.
    std::optional<AutoencoderKL> vae;
    std::string model_id;
    if (a.model != "none") {
      vae.emplace(LoadVae(a.model));
      (*vae)->to(a.device);
      if (Exists(a.model + "/perfusion/model_id")) {
        model_id = ReadFileToString(a.model + "/perfusion/model_id");
        while (!model_id.empty() && std::isspace(static_cast<unsigned char>(model_id.back()))) model_id.pop_back();
      }
    }
    MakeParentDirs(a.out);
    if (!a.sheet.empty()) MakeParentDirs(a.sheet);
    std::printf("rendering %lld training and %lld held-out scenes...\n", (long long)a.train, (long long)a.test);
    std::fflush(stdout);
    Data train = RenderData(a.train, DeriveSeed(a.seed, 1), S);
    Data test = RenderData(a.test, DeriveSeed(a.seed, 2), S);
    std::printf("rendered in %.1f s\n", seconds());

    // The VAE round trip: training scenes [0, n_vae) get a second, decoded version; every held-out scene too.
    at::Tensor train_vae, test_vae;
    const int64_t n_vae = vae ? static_cast<int64_t>(std::llround(a.vae_fraction * a.train)) : 0;
    if (vae) {
      std::printf("VAE round trip of %lld training and %lld held-out scenes (%s)...\n", (long long)n_vae,
                  (long long)a.test, a.model.c_str());
      std::fflush(stdout);
      if (n_vae > 0) train_vae = RoundTrip(*vae, train.images.slice(0, 0, n_vae));
      test_vae = RoundTrip(*vae, test.images);
      std::printf("  done at %.1f s\n", seconds());
    }

    // The initial weights come from the global generator: seed it, so that --seed fixes the whole run.
    at::manual_seed(DeriveSeed(a.seed, 4));
    ShapesClassifier net(ShapesClassifierOptions().width(a.width));
    net->to(a.device);
    torch::optim::AdamW opt(net->parameters(), torch::optim::AdamWOptions(a.lr).weight_decay(1e-4));
    at::Generator gen = MakeGenerator(DeriveSeed(a.seed, 3));
    const LabelTensors train_targets = MakeLabelTensors(train.labels, a.device);
    net->train();
    double ema = 0;
    auto last = Clock::now();
    const int64_t warmup = std::min<int64_t>(100, a.steps / 10 + 1);
    for (int64_t step = 1; step <= a.steps; ++step) {
      const double lr = step <= warmup ? a.lr * step / warmup
                                       : a.lr * 0.5 * (1 + std::cos(M_PI * double(step - warmup) / double(a.steps - warmup + 1)));
      for (auto& g : opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
      const at::Tensor idx = at::randint(a.train, {a.batch}, gen, at::TensorOptions().dtype(at::kLong));
      const at::Tensor use_vae = at::rand({a.batch}, gen) < 0.5;
      const at::Tensor noise_scale = at::rand({a.batch, 1, 1, 1}, gen) * 0.06;
      at::Tensor x = ToFloat(train.images.index_select(0, idx));
      if (n_vae > 0) {
        const at::Tensor alt = ToFloat(train_vae.index_select(0, idx.clamp_max(n_vae - 1)));
        const at::Tensor pick = (use_vae & (idx < n_vae)).reshape({-1, 1, 1, 1});
        x = at::where(pick, alt, x);
      }
      x = x + noise_scale * at::randn(x.sizes(), gen);
      const ShapesClassifierOutput y = net->forward(x.to(a.device));
      const at::Tensor idx_dev = idx.to(a.device);
      const at::Tensor targets = train_targets.head.index_select(0, idx_dev);
      const at::Tensor valid = train_targets.valid.index_select(0, idx_dev);
      at::Tensor loss = at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(a.device));
      for (int h = 0; h < kNumHeads; ++h) {
        const at::Tensor m = valid.select(1, h);
        const at::Tensor ce =
            at::cross_entropy_loss(y.logits[h], targets.select(1, h).contiguous(), {}, at::Reduction::None);
        loss = loss + (ce * m).sum() / m.sum().clamp_min(1);
      }
      const at::Tensor pt = train_targets.presence.index_select(0, idx_dev);
      loss = loss + 2.0 * at::binary_cross_entropy_with_logits(y.concepts, pt);
      opt.zero_grad();
      loss.backward();
      AdamWStep(opt);  // multi-tensor on a GPU (foreach_optim.h)
      ema = step == 1 ? loss.item<double>() : 0.98 * ema + 0.02 * loss.item<double>();
      if (step % 100 == 0 || step == a.steps) {
        const double sps = std::chrono::duration<double>(Clock::now() - last).count() / (step % 100 == 0 ? 100 : step % 100);
        last = Clock::now();
        std::printf("[classifier] step %5lld/%lld  loss %.4f  lr %.2e  %.3f s/step  ETA %.1f min\n", (long long)step,
                    (long long)a.steps, ema, lr, sps, sps * (a.steps - step) / 60);
        std::fflush(stdout);
      }
    }
    net->eval();

    const Report clean = Evaluate(net, test.images, test);
    std::printf("\nheld-out accuracy (%lld scenes; object heads on one-object scenes):\n", (long long)a.test);
    PrintReport("clean renders:", clean);
    nlohmann::json acc = {{"clean", ToJson(clean)}};
    if (test_vae.defined()) {
      const Report vae = Evaluate(net, test_vae, test);
      PrintReport("through the VAE:", vae);
      acc["vae_round_trip"] = ToJson(vae);
    }
    if (!a.sheet.empty()) {
      std::vector<std::vector<Image>> rows(test_vae.defined() ? 2 : 1);
      for (int64_t i = 0; i < std::min<int64_t>(16, a.test); ++i) {
        rows[0].push_back(TensorToImage(ToFloat(test.images[i])));
        if (test_vae.defined()) rows[1].push_back(TensorToImage(ToFloat(test_vae[i])));
      }
      GridOptions g;
      g.row_labels = test_vae.defined() ? std::vector<std::string>{"render", "VAE"} : std::vector<std::string>{"render"};
      WriteFileAtomically(a.sheet, EncodePng(ImageGrid(rows, g)));
    }
    nlohmann::json summary = {
        {"command", command},
        {"train_scenes", a.train},
        {"test_scenes", a.test},
        {"steps", a.steps},
        {"batch", a.batch},
        {"seed", a.seed},
        {"vae_model", a.model},
        {"vae_model_id", model_id},
        {"config",
         {{"image_size", net->options().image_size()},
          {"width", net->options().width()},
          {"feature_dim", net->options().feature_dim()},
          {"num_concepts", net->options().num_concepts()}}},
        {"concepts", nlohmann::json::array()},
        {"accuracy", acc},
        {"train_seconds", seconds()},
    };
    for (const auto& c : BuiltinConcepts()) summary["concepts"].push_back(c.name);
    SaveShapesClassifier(net, a.out, {{"accuracy", acc.dump()}, {"command", command}});
    std::string json_path = a.out;
    if (json_path.size() > 12 && json_path.substr(json_path.size() - 12) == ".safetensors") {
      json_path.resize(json_path.size() - 12);
    }
    json_path += ".json";
    WriteFileAtomically(json_path, summary.dump(2) + "\n");
    std::printf("\nwrote %s and %s (%.1f s)\n", a.out.c_str(), json_path.c_str(), seconds());
    return 0;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}

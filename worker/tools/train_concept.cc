// perfusion-train-concept: trains one Perfusion concept from a folder of PNG images on a local model
// and writes the concept blob (concept.h), for research without the server.
//
//   perfusion-train-concept DIR --superclass star --name checker --out checker.concept
//       [--model models/tiny] [--steps N] [--seed S] [--batch N] ...
//
// Progress: a bar on stderr (step/total, loss, ETA), redrawn in place on a terminal, one line per
// 10% otherwise.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <dirent.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <string>
#include <vector>

#include "perfusion/concept.h"
#include "perfusion/image_io.h"
#include "perfusion/model_dir.h"
#include "perfusion/pipeline.h"
#include "perfusion/safetensors.h"
#include "perfusion/trainer.h"
#include "tools/tool_args.h"
#include "tools/tool_files.h"
#include "tools/tool_device.h"

using namespace perfusion;

namespace {

struct Args {
  std::string dir;
  std::string name, superclass, out;
  std::string model = "models/tiny";
  std::string tokenizer_dir = std::string(PERFUSION_DEFAULT_SHARED) + "/data/clip";
  TrainOptions train;
  std::string dtype = "fp16";
  int threads = 0;
  c10::Device device = c10::Device(c10::kCPU);
  bool quiet = false;
  bool captions = false;
};

void Usage() {
  std::printf(
      "perfusion-train-concept: train a Perfusion concept from a folder of PNG images\n\n"
      "usage: perfusion-train-concept DIR --superclass WORD --name NAME --out FILE [options]\n\n"
      "  DIR                   folder with the training images (*.png, *.jpg, *.jpeg; 3 to 20 are typical)\n"
      "  --superclass WORD     one-token class word, e.g. star, dog (required)\n"
      "  --name NAME           concept name used as <NAME> in prompts: letters, digits, _-. (required)\n"
      "  --out FILE            concept blob to write (required)\n"
      "  --model DIR           base model folder (default models/tiny)\n"
      "  --tokenizer-dir DIR   CLIP vocab.json + merges.txt if the model has none (default ../shared/data/clip)\n"
      "  --steps N             training steps (default 400)\n"
      "  --batch N             batch size (default 4)\n"
      "  --seed S              (default 0)\n"
      "  --lr-embedding X      (default 0.006); --lr-values X (default 0.03)\n"
      "  --no-mask             plain loss instead of the foreground-weighted one\n"
      "  --no-flip             no horizontal flips\n"
      "  --captions            train each image with its own caption, read from the .txt file of the same\n"
      "                        name beside it (dog1.png: dog1.txt), naming the concept as <NAME>:\n"
      "                        \"a photo of <rex> on a beach, on the left\". The other words carry the\n"
      "                        context, so the concept learns less of it (mirror images swap left/right)\n"
      "  --beta X --tau X      inference gate stored in the concept (default 0.7 / 0.15)\n"
      "  --dtype fp16|bf16|fp32  storage of embedding and V targets (default fp16)\n"
      "  --threads N           LibTorch threads (default: all cores)\n"
      "  --device D            cpu (default), cuda or cuda:N (needs a CUDA LibTorch build)\n"
      "  --quiet               no progress bar\n");
}

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && std::equal(suffix.rbegin(), suffix.rend(), s.rbegin(),
                                                 [](char a, char b) { return std::tolower(a) == std::tolower(b); });
}

std::vector<std::string> ListImages(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  TORCH_CHECK_VALUE(d != nullptr, "cannot open image folder '", dir, "'");
  while (dirent* e = ::readdir(d)) {
    const std::string n = e->d_name;
    std::string lower = n;
    for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (n[0] != '.' && (EndsWith(lower, ".png") || EndsWith(lower, ".jpg") || EndsWith(lower, ".jpeg"))) {
      out.push_back(dir + "/" + n);
    }
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

std::string Duration(double s) {
  char b[32];
  if (s >= 3600) {
    std::snprintf(b, sizeof(b), "%dh%02dm", int(s / 3600), int(s / 60) % 60);
  } else if (s >= 60) {
    std::snprintf(b, sizeof(b), "%dm%02ds", int(s / 60), int(s) % 60);
  } else {
    std::snprintf(b, sizeof(b), "%.0fs", s);
  }
  return b;
}

bool ValidName(const std::string& n) {
  if (n.empty() || n.size() > 64) return false;
  return std::all_of(n.begin(), n.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.';
  });
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  if (auto code = ParseToolArgs(argc, argv, Usage, [&](const std::string& k, const NextValue& v) {
      if (k == "--superclass") a.superclass = v();
      else if (k == "--name") a.name = v();
      else if (k == "--out" || k == "-o") a.out = v();
      else if (k == "--model") a.model = v();
      else if (k == "--tokenizer-dir") a.tokenizer_dir = v();
      else if (k == "--steps") a.train.steps = ParseInt64(v());
      else if (k == "--batch") a.train.batch_size = ParseInt64(v());
      else if (k == "--seed") a.train.seed = ParseUint64(v());
      else if (k == "--lr-embedding") a.train.lr_embedding = ParseDouble(v());
      else if (k == "--lr-values") a.train.lr_values = ParseDouble(v());
      else if (k == "--no-mask") a.train.masked_loss = false;
      else if (k == "--no-flip") a.train.flip = false;
      else if (k == "--captions") a.captions = true;
      else if (k == "--beta") a.train.default_gate.beta = ParseDouble(v());
      else if (k == "--tau") a.train.default_gate.temperature = ParseDouble(v());
      else if (k == "--dtype") a.dtype = v();
      else if (k == "--threads") a.threads = ParseInt(v());
      else if (k == "--device") a.device = ParseToolDevice(v());
      else if (k == "--quiet") a.quiet = true;
      else if (!k.empty() && k[0] == '-') return false;
      else if (a.dir.empty()) a.dir = k;
      else throw ToolUsageError("unexpected argument '" + k + "': one image folder only (see --help)");
      return true;
    })) {
    return *code;
  }
  if (a.dir.empty() || a.superclass.empty() || a.name.empty() || a.out.empty()) {
    std::fprintf(stderr, "need DIR, --superclass, --name and --out (see --help)\n");
    return 2;
  }
  if (!ValidName(a.name)) {
    std::fprintf(stderr, "--name '%s': use 1-64 letters, digits, '_', '-' or '.'\n", a.name.c_str());
    return 2;
  }
  try {
    CheckTrainOptions(a.train);  // a value out of range is a usage error: before the model loads
  } catch (const c10::ValueError& e) {
    std::fprintf(stderr, "%s (see --help)\n", e.what_without_backtrace());
    return 2;
  }
  ConceptEncodeOptions enc;
  if (a.dtype == "fp16") enc.dtype = at::kHalf;
  else if (a.dtype == "bf16") enc.dtype = at::kBFloat16;
  else if (a.dtype == "fp32") enc.dtype = at::kFloat;
  else {
    std::fprintf(stderr, "--dtype must be fp16, bf16 or fp32\n");
    return 2;
  }
  try {
    if (a.threads > 0) at::set_num_threads(a.threads);
    MakeParentDirs(a.out);  // before the training: not a failed write after it
    const auto files = ListImages(a.dir);
    TORCH_CHECK_VALUE(!files.empty(), "no .png, .jpg or .jpeg images in '", a.dir, "'");
    std::vector<at::Tensor> images;
    for (const auto& f : files) {
      try {
        images.push_back(ImageToTensor(DecodeImage(ReadFileToString(f))));
      } catch (const c10::Error& e) {
        TORCH_CHECK_VALUE(false, f, ": ", e.what_without_backtrace());
      }
    }
    if (a.captions) {
      const std::string token = "<" + a.name + ">";
      for (const auto& f : files) {
        const std::string txt = f.substr(0, f.rfind('.')) + ".txt";
        std::string caption;
        try {
          caption = ReadFileToString(txt);
        } catch (const c10::Error&) {
          TORCH_CHECK_VALUE(false, "--captions: no caption file ", txt, " for ", f);
        }
        while (!caption.empty() && std::isspace(static_cast<unsigned char>(caption.back()))) caption.pop_back();
        const size_t at = caption.find(token);
        TORCH_CHECK_VALUE(at != std::string::npos && caption.find(token, at + 1) == std::string::npos, txt,
                          ": the caption must name the concept exactly once as ", token, ": '", caption, "'");
        a.train.captions.push_back(caption.replace(at, token.size(), "{}"));
      }
    }
    ModelDirOptions mo;
    mo.tokenizer_dir = a.tokenizer_dir;
    mo.device = a.device;
    auto model = LoadModelDir(a.model, mo);
    std::fprintf(stderr, "training <%s> (superclass '%s') on %zu image(s) with %s (%lld steps, batch %lld)\n",
                 a.name.c_str(), a.superclass.c_str(), images.size(), model->model_id.c_str(),
                 (long long)a.train.steps, (long long)a.train.batch_size);
    a.train.name = a.name;
    a.train.superclass = a.superclass;
    const bool tty = ::isatty(STDERR_FILENO);
    int64_t last_decile = -1;
    a.train.progress = [&](const TrainProgress& p) {
      if (a.quiet) return true;
      const double frac = double(p.step) / p.total;
      if (tty) {
        constexpr int kWidth = 30;
        const int fill = static_cast<int>(frac * kWidth);
        std::fprintf(stderr, "\r[%s%s] %lld/%lld  loss %.4f  %s elapsed, ETA %s   ", std::string(fill, '#').c_str(),
                     std::string(kWidth - fill, ' ').c_str(), (long long)p.step, (long long)p.total, p.loss_ema,
                     Duration(p.elapsed_s).c_str(), Duration(p.eta_s).c_str());
        if (p.step == p.total) std::fprintf(stderr, "\n");
      } else if (static_cast<int64_t>(frac * 10) != last_decile) {
        last_decile = static_cast<int64_t>(frac * 10);
        std::fprintf(stderr, "step %lld/%lld  loss %.4f  ETA %s\n", (long long)p.step, (long long)p.total, p.loss_ema,
                     Duration(p.eta_s).c_str());
      }
      return true;
    };
    const Concept c = TrainConcept(*model, images, a.train);
    const std::string blob = EncodeConcept(c, enc);
    WriteFileAtomically(a.out, blob);
    auto info = [&](const char* key) { return c.info.count(key) ? std::stod(c.info.at(key)) : 0.0; };
    std::printf("wrote %s (%zu bytes): <%s>, superclass '%s', base model %s, final loss %.4f, %.1f s\n", a.out.c_str(),
                blob.size(), c.name.c_str(), c.superclass.c_str(), c.base_model_id.c_str(), info("final_loss"),
                info("train_seconds"));
    return 0;
  } catch (const CancelledError&) {
    std::fprintf(stderr, "cancelled\n");
    return 1;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}

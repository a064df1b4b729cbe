// perfusion-covariance: computes C = E[x x^T] of a model's text-encoder outputs over a caption file
// (one caption per line), streaming, and writes it as <model>/perfusion/covariance.safetensors (or
// --out). Every concept trained or applied on the model needs it (spec §6).
//
//   perfusion-covariance --model models/tiny --captions captions.txt [--out FILE] [--batch 32]
//                        [--exclude-padding] [--max-captions N] [--tokenizer-dir DIR]
#include <ATen/Functions.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "perfusion/covariance.h"
#include "perfusion/model_dir.h"
#include "tools/tool_args.h"

using namespace perfusion;

namespace {
void Usage() {
  std::printf(
      "perfusion-covariance: the text-encoder covariance C of a model folder, from a caption file\n\n"
      "  --model DIR          diffusers-layout model folder (required)\n"
      "  --captions FILE      UTF-8 text, one caption per line (required; blank lines skipped)\n"
      "  --out FILE           output (default DIR/perfusion/covariance.safetensors)\n"
      "  --batch N            captions per encoder batch (default 32)\n"
      "  --exclude-padding    count only positions up to the first end token (default: all 77,\n"
      "                       padding included, as the UNet sees them)\n"
      "  --max-captions N     stop after N captions (default: all)\n"
      "  --ridge X            add X * mean(diag C) * I (default 0; small encoders may need 1e-3)\n"
      "  --tokenizer-dir DIR  CLIP vocab.json + merges.txt if the model folder lacks tokenizer/\n");
}
}  // namespace

int main(int argc, char** argv) {
  std::string model_dir, captions, out, tok_dir;
  int64_t batch = 32, max_captions = -1;
  bool exclude_padding = false;
  double ridge = 0;
  if (auto code = ParseToolArgs(argc, argv, Usage, [&](const std::string& k, const NextValue& v) {
        if (k == "--model") model_dir = v();
        else if (k == "--captions") captions = v();
        else if (k == "--out") out = v();
        else if (k == "--batch") batch = ParseInt64(v());
        else if (k == "--max-captions") max_captions = ParseInt64(v());
        else if (k == "--exclude-padding") exclude_padding = true;
        else if (k == "--tokenizer-dir") tok_dir = v();
        else if (k == "--ridge") ridge = ParseDouble(v());
        else return false;
        return true;
      })) {
    return *code;
  }
  if (model_dir.empty() || captions.empty() || batch < 1) {
    std::fprintf(stderr, "--model and --captions are required, --batch must be >= 1 (see --help)\n");
    return 2;
  }
  if (out.empty()) out = model_dir + "/perfusion/covariance.safetensors";
  try {
    ModelDirOptions mo;
    mo.require_covariance = false;
    mo.load_vae = false;
    mo.tokenizer_dir = tok_dir;
    auto model = LoadModelDir(model_dir, mo);
    std::ifstream in(captions);
    TORCH_CHECK_VALUE(in.good(), "cannot read captions file ", captions);
    // Count lines first for the progress bar (cheap next to encoding).
    int64_t total = 0;
    for (std::string line; std::getline(in, line);) total += line.find_first_not_of(" \t\r") != std::string::npos;
    if (max_captions >= 0) total = std::min(total, max_captions);
    in.clear();
    in.seekg(0);
    CovarianceAccumulator acc(model->text_dim());
    c10::InferenceMode guard;
    std::vector<int64_t> ids, lengths;
    int64_t done = 0;
    const auto start = std::chrono::steady_clock::now();
    auto flush = [&] {
      if (lengths.empty()) return;
      const int64_t n = static_cast<int64_t>(lengths.size());
      at::Tensor x = model->text_encoder->forward(at::tensor(ids, at::kLong).reshape({n, 77}).to(model->device));
      at::Tensor mask;
      if (exclude_padding) {
        mask = at::arange(77, at::kLong).unsqueeze(0) < at::tensor(lengths, at::kLong).unsqueeze(1);
      }
      acc.Add(x, mask);
      done += n;
      ids.clear();
      lengths.clear();
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      const int width = 30;
      const int filled = total > 0 ? static_cast<int>(width * done / total) : width;
      std::fprintf(stderr, "\r[%s%s] %lld/%lld captions  %.0f/s", std::string(filled, '#').c_str(),
                   std::string(width - filled, '.').c_str(), (long long)done, (long long)total, done / std::max(secs, 1e-9));
      std::fflush(stderr);
    };
    for (std::string line; std::getline(in, line);) {
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      if (max_captions >= 0 && done + static_cast<int64_t>(lengths.size()) >= max_captions) break;
      auto p = model->tokenizer->EncodePadded(line);
      ids.insert(ids.end(), p.ids.begin(), p.ids.end());
      lengths.push_back(p.length);
      if (static_cast<int64_t>(lengths.size()) == batch) flush();
    }
    flush();
    std::fprintf(stderr, "\n");
    TORCH_CHECK_VALUE(acc.count() > 0, "no captions in ", captions);
    SaveCovariance(out, acc.Covariance(ridge),
                   {{"count", std::to_string(acc.count())}, {"captions", std::to_string(done)},
                    {"padding_included", exclude_padding ? "false" : "true"}, {"model_id", model->model_id},
                    {"ridge", std::to_string(ridge)}});
    std::printf("wrote %s: C over %lld token vectors from %lld captions\n", out.c_str(), (long long)acc.count(),
                (long long)done);
    return 0;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "\nerror: %s\n", e.what_without_backtrace());
    return 1;
   } catch (const std::exception& e) {
    std::fprintf(stderr, "\nerror: %s\n", e.what());
    return 1;
  }

}

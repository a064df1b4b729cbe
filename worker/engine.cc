#include "worker/engine.h"

#include <ATen/Parallel.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <chrono>
#include <list>
#include <map>
#include <mutex>
#include <new>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "perfusion/concept.h"
#include "perfusion/image_io.h"
#include "perfusion/model_dir.h"
#include "perfusion/pipeline.h"
#include "perfusion/rank1_edit.h"
#include "perfusion/trainer.h"

namespace perfusion::worker {

absl::Status RunGuarded(const std::function<void()>& fn) {
  try {
    fn();
    return absl::OkStatus();
  } catch (const CancelledError&) {
    return absl::CancelledError("cancelled");
  } catch (const c10::OutOfMemoryError& e) {
    return absl::ResourceExhaustedError(e.what_without_backtrace());
  } catch (const c10::ValueError& e) {
    return absl::InvalidArgumentError(e.what_without_backtrace());
  } catch (const c10::IndexError& e) {
    return absl::InvalidArgumentError(e.what_without_backtrace());
  } catch (const c10::TypeError& e) {
    return absl::InvalidArgumentError(e.what_without_backtrace());
  } catch (const c10::Error& e) {
    // LibTorch's CPU allocator reports an allocation it cannot make as a plain c10::Error.
    const std::string what = e.what_without_backtrace();
    if (what.find("DefaultCPUAllocator: can't allocate memory") != std::string::npos ||
        what.find("DefaultCPUAllocator: not enough memory") != std::string::npos) {
      return absl::ResourceExhaustedError(what);
    }
    return absl::InternalError(what);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("out of memory");
  } catch (const std::exception& e) {
    return absl::InternalError(e.what());
  } catch (...) {
    return absl::InternalError("unknown exception in the engine");
  }
}

struct Engine::Impl {
  std::shared_ptr<StableDiffusion> model;
  std::unique_ptr<Pipeline> pipeline;
  // Decoded concepts by digest, LRU.
  mutable std::mutex mu;
  mutable std::list<std::string> lru;
  mutable std::unordered_map<std::string, std::pair<std::shared_ptr<const Concept>, std::list<std::string>::iterator>> cache;
  mutable int64_t hits = 0, misses = 0;
  static constexpr size_t kMaxConcepts = 512;

  std::shared_ptr<const Concept> Decode(const ConceptUse& use) const {
    if (!use.digest.empty()) {
      std::lock_guard<std::mutex> l(mu);
      auto it = cache.find(use.digest);
      if (it != cache.end()) {
        ++hits;
        lru.splice(lru.begin(), lru, it->second.second);
        return it->second.first;
      }
      ++misses;
    }
    auto c = std::make_shared<const Concept>(DecodeConcept(use.blob, model->model_id));
    if (!use.digest.empty()) {
      std::lock_guard<std::mutex> l(mu);
      if (!cache.count(use.digest)) {
        lru.push_front(use.digest);
        cache[use.digest] = {c, lru.begin()};
        if (cache.size() > kMaxConcepts) {
          cache.erase(lru.back());
          lru.pop_back();
        }
      }
    }
    return c;
  }
};

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Engine::~Engine() = default;

absl::StatusOr<std::unique_ptr<Engine>> Engine::Load(const EngineOptions& options) {
  auto impl = std::make_unique<Impl>();
  absl::Status s = RunGuarded([&] {
    if (options.threads > 0) at::set_num_threads(options.threads);
    ModelDirOptions mo;
    mo.device = c10::Device(options.device);
    TORCH_CHECK_VALUE(options.dtype == "fp32" || options.dtype == "fp16" || options.dtype == "bf16",
                      "dtype must be fp32, fp16 or bf16, got '", options.dtype, "'");
    mo.dtype = options.dtype == "fp16" ? at::kHalf : options.dtype == "bf16" ? at::kBFloat16 : at::kFloat;
    mo.tokenizer_dir = options.tokenizer_dir;
    impl->model = LoadModelDir(options.model_dir, mo);
    impl->pipeline = std::make_unique<Pipeline>(impl->model);
  });
  if (!s.ok()) return s;
  return std::unique_ptr<Engine>(new Engine(std::move(impl)));
}

const std::string& Engine::base_model_id() const { return impl_->model->model_id; }
std::string Engine::device() const { return impl_->model->device.str(); }
int64_t Engine::native_size() const { return impl_->model->image_size(); }

absl::StatusOr<TrainResult> Engine::Train(const TrainSpec& spec, const std::function<bool(const TrainUpdate&)>& progress) {
  TrainResult result;
  absl::Status s = RunGuarded([&] {
    const auto start = std::chrono::steady_clock::now();
    // Each image is cut to what the trainer uses (CenterCropResize to the training side, which the
    // trainer then finds done: the same result bit for bit) as soon as it is decoded. Kept whole,
    // a 49 KB one-colour 4096x4096 PNG held 200 MB of floats for the whole run: 20 of them took
    // 4 GB from a 1 MB upload.
    const int64_t side = spec.resolution > 0 ? spec.resolution : impl_->model->image_size();
    TORCH_CHECK_VALUE(side >= 1 && side <= 4096, "resolution: ", side, " is outside [1, 4096]");
    std::vector<at::Tensor> images;
    for (size_t i = 0; i < spec.images.size(); ++i) {
      try {
        images.push_back(CenterCropResize(ImageToTensor(DecodeImage(spec.images[i])), static_cast<int>(side)));
      } catch (const c10::Error& e) {
        TORCH_CHECK_VALUE(false, "images[", i, "]: ", e.what_without_backtrace());
      }
    }
    TrainOptions o;
    o.name = spec.name;
    o.superclass = spec.superclass;
    if (spec.steps > 0) o.steps = spec.steps;
    if (spec.batch_size > 0) o.batch_size = spec.batch_size;
    if (spec.resolution > 0) o.resolution = spec.resolution;
    if (spec.lr_values > 0) o.lr_values = spec.lr_values;
    if (spec.lr_embedding > 0) o.lr_embedding = spec.lr_embedding;
    if (spec.train_beta > 0) o.edit.train_beta(spec.train_beta);
    if (spec.train_temperature > 0) o.edit.train_temperature(spec.train_temperature);
    o.seed = spec.seed;
    o.captions = spec.captions;
    o.progress = [&](const TrainProgress& p) {
      if (!progress) return true;
      return progress(TrainUpdate{p.step, p.total, p.loss_ema, p.eta_s});
    };
    Concept c = TrainConcept(*impl_->model, images, o);
    result.blob = EncodeConcept(c);
    result.final_loss = std::stod(c.info.at("final_loss"));
    result.steps = o.steps;
    result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  });
  if (!s.ok()) return s;
  return result;
}

absl::StatusOr<std::vector<GenerateResult>> Engine::Generate(const std::vector<GenerateSpec>& specs,
                                                             const std::function<bool(int64_t, int64_t)>& progress) {
  std::vector<GenerateResult> out;
  absl::Status s = RunGuarded([&] {
    std::vector<GenerationRequest> reqs;
    for (size_t r = 0; r < specs.size(); ++r) {
      const GenerateSpec& g = specs[r];
      GenerationRequest q;
      q.prompt = g.prompt;
      q.negative_prompt = g.negative_prompt;
      q.steps = g.steps;
      q.guidance_scale = g.guidance_scale;
      q.guidance_rescale = g.guidance_rescale;
      q.seed = g.seed;
      q.num_images = g.num_images;
      q.width = g.width;
      q.height = g.height;
      q.sampler = g.sampler.empty() ? "ddim" : g.sampler;
      q.multi_concept_mode = g.exact_multi_concept ? MultiConceptMode::kExact : MultiConceptMode::kApproximate;
      q.regions = g.regions;
      for (const ConceptUse& u : g.concepts) {
        ConceptRef ref;
        try {
          ref.concept = impl_->Decode(u);
        } catch (const c10::Error& e) {
          TORCH_CHECK_VALUE(false, "concept <", u.reference, ">: ", e.what_without_backtrace());
        }
        ref.gate = GateParams{u.beta, u.temperature};
        if (u.temperature <= 0) ref.gate = ref.concept->default_gate;
        if (u.beta > 0 && u.temperature <= 0) ref.gate.beta = u.beta;
        // A stored blob's own gate is checked only where it is used (blobs from before the ranges
        // were enforced keep working with a request's beta and tau).
        CheckGateRange(ref.gate, "concept <" + u.reference + ">: its default gate beta (set beta in the request)",
                       "concept <" + u.reference + ">: its default gate temperature (set tau in the request)");
        ref.global_key_lock = u.global_key_lock.value_or(impl_->model->default_global_key_lock);
        q.concepts[u.reference] = ref;
      }
      reqs.push_back(std::move(q));
    }
    auto results = impl_->pipeline->Generate(reqs, progress ? ProgressFn(progress) : ProgressFn());
    for (size_t r = 0; r < results.size(); ++r) {
      GenerateResult g;
      for (size_t n = 0; n < results[r].images.size(); ++n) {
        const at::Tensor& img = results[r].images[n];
        g.pngs.push_back(EncodePng(TensorToImage(img)));
        g.seeds.push_back(specs[r].seed + n);
        g.height = img.size(1);
        g.width = img.size(2);
      }
      out.push_back(std::move(g));
    }
  });
  if (!s.ok()) return s;
  return out;
}

absl::Status Engine::ValidateConcept(const std::string& blob) const {
  return RunGuarded([&] { impl_->pipeline->CheckConcept(DecodeConcept(blob, impl_->model->model_id)); });
}

Engine::CacheStats Engine::cache_stats() const {
  std::lock_guard<std::mutex> l(impl_->mu);
  return CacheStats{static_cast<int64_t>(impl_->cache.size()), impl_->hits, impl_->misses};
}

}  // namespace perfusion::worker

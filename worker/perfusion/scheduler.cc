#include "perfusion/scheduler.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <c10/util/Exception.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <set>
#include <sstream>
#include <utility>

#include "perfusion/json_text.h"
#include "perfusion/safetensors.h"

namespace perfusion {
namespace {

using nlohmann::json;

// ---------------------------------------------------------------------------------------------
// Config parsing

std::string Quoted(const std::string& s) { return "\"" + s + "\""; }

std::string OneOf(const std::set<std::string>& valid) {
  std::ostringstream ss;
  bool first = true;
  for (const auto& v : valid) {
    ss << (first ? "" : ", ") << Quoted(v);
    first = false;
  }
  return ss.str();
}

const json* Find(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return nullptr;  // missing or null: keep the default
  return &*it;
}

void Read(const json& j, const char* key, const std::string& src, int64_t* out) {
  const json* v = Find(j, key);
  if (v == nullptr) return;
  TORCH_CHECK_VALUE(v->is_number_integer(), src, ": key \"", key, "\" must be an integer, got ", JsonForMessage(*v));
  *out = v->get<int64_t>();
}

void Read(const json& j, const char* key, const std::string& src, double* out) {
  const json* v = Find(j, key);
  if (v == nullptr) return;
  TORCH_CHECK_VALUE(v->is_number(), src, ": key \"", key, "\" must be a number, got ", JsonForMessage(*v));
  *out = v->get<double>();
}

void Read(const json& j, const char* key, const std::string& src, bool* out) {
  const json* v = Find(j, key);
  if (v == nullptr) return;
  TORCH_CHECK_VALUE(v->is_boolean(), src, ": key \"", key, "\" must be true or false, got ", JsonForMessage(*v));
  *out = v->get<bool>();
}

void Read(const json& j, const char* key, const std::string& src, std::string* out) {
  const json* v = Find(j, key);
  if (v == nullptr) return;
  TORCH_CHECK_VALUE(v->is_string(), src, ": key \"", key, "\" must be a string, got ", JsonForMessage(*v));
  *out = v->get<std::string>();
}

void Read(const json& j, const char* key, const std::string& src, std::vector<double>* out) {
  const json* v = Find(j, key);
  if (v == nullptr) return;
  TORCH_CHECK_VALUE(v->is_array(), src, ": key \"", key, "\" must be an array of numbers or null, got ",
                    v->type_name());
  out->clear();
  for (size_t i = 0; i < v->size(); ++i) {
    const json& e = (*v)[i];
    TORCH_CHECK_VALUE(e.is_number(), src, ": key \"", key, "\"[", i, "] must be a number, got ", JsonForMessage(e));
    out->push_back(e.get<double>());
  }
}

void CheckIn(const std::string& value, const std::set<std::string>& valid, const char* key,
             const std::string& src) {
  TORCH_CHECK_VALUE(valid.count(value) != 0, src, ": unknown ", key, " ", Quoted(value), "; valid: ", OneOf(valid));
}

// ---------------------------------------------------------------------------------------------
// Tables

// numpy.linspace(start, stop, n) in float64: i * step + start, the last element set to stop.
std::vector<double> NpLinspace(double start, double stop, int64_t n) {
  std::vector<double> y(static_cast<size_t>(n));
  if (n == 1) {
    y[0] = start;
    return y;
  }
  const double step = (stop - start) / static_cast<double>(n - 1);
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<double>(i) * step + start;
  y[n - 1] = stop;
  return y;
}

// numpy.interp(x, arange(len), fp) in float64 (fp holds float32 values).
double NpInterpOnGrid(double x, const float* fp, int64_t len) {
  if (x <= 0.0) return fp[0];
  if (x >= static_cast<double>(len - 1)) return fp[len - 1];
  const int64_t j = static_cast<int64_t>(std::floor(x));
  if (static_cast<double>(j) == x) return fp[j];
  const double slope = (static_cast<double>(fp[j + 1]) - static_cast<double>(fp[j])) /
                       (static_cast<double>(j + 1) - static_cast<double>(j));
  return slope * (x - static_cast<double>(j)) + static_cast<double>(fp[j]);
}

// Nichol & Dhariwal's cosine alpha-bar, discretised (diffusers betas_for_alpha_bar, in float64).
at::Tensor CosineBetas(int64_t n) {
  auto alpha_bar = [](double t) {
    constexpr double kPi = 3.141592653589793;  // Python's math.pi
    const double c = std::cos((t + 0.008) / 1.008 * kPi / 2);
    return c * c;
  };
  std::vector<float> betas(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const double t1 = static_cast<double>(i) / static_cast<double>(n);
    const double t2 = static_cast<double>(i + 1) / static_cast<double>(n);
    betas[i] = static_cast<float>(std::min(1 - alpha_bar(t2) / alpha_bar(t1), 0.999));
  }
  return at::from_blob(betas.data(), {n}, at::kFloat).clone();
}

// Lin et al. 2023, Algorithm 1, in float32 as diffusers' rescale_zero_terminal_snr.
at::Tensor RescaleZeroTerminalSnr(const at::Tensor& betas) {
  at::Tensor alphas = 1.0 - betas;
  at::Tensor alphas_bar_sqrt = at::cumprod(alphas, 0).sqrt();
  at::Tensor first = alphas_bar_sqrt[0].clone();
  at::Tensor last = alphas_bar_sqrt[-1].clone();
  alphas_bar_sqrt -= last;
  alphas_bar_sqrt *= first / (first - last);
  at::Tensor alphas_bar = alphas_bar_sqrt.pow(2);
  const int64_t n = alphas_bar.size(0);
  at::Tensor ratios = alphas_bar.slice(0, 1, n) / alphas_bar.slice(0, 0, n - 1);
  return 1 - at::cat({alphas_bar.slice(0, 0, 1), ratios});
}

at::Tensor AlphasCumprod(const at::Tensor& betas) { return at::cumprod(1.0 - betas, 0); }

at::Tensor LongVector(const std::vector<int64_t>& v) {
  return at::from_blob(const_cast<int64_t*>(v.data()), {static_cast<int64_t>(v.size())}, at::kLong).clone();
}

at::Tensor FloatVector(const std::vector<float>& v) {
  return at::from_blob(const_cast<float*>(v.data()), {static_cast<int64_t>(v.size())}, at::kFloat).clone();
}

// ---------------------------------------------------------------------------------------------
// DDPM argument checks and per-sample coefficients

void CheckNoiseArgs(const char* what, const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& timesteps,
                    int64_t num_train_timesteps) {
  TORCH_CHECK_VALUE(x0.defined() && noise.defined() && timesteps.defined(), what,
                    ": x0, noise and timesteps must be defined");
  TORCH_CHECK_VALUE(x0.dim() >= 1, what, ": x0 must have a batch dimension, got shape ", x0.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(x0.scalar_type()), what, ": x0 must be floating point, got ",
                    x0.scalar_type());
  TORCH_CHECK_VALUE(noise.sizes() == x0.sizes(), what, ": noise shape ", noise.sizes(), " != x0 shape ",
                    x0.sizes());
  TORCH_CHECK_VALUE(at::isIntegralType(timesteps.scalar_type(), /*includeBool=*/false), what,
                    ": timesteps must be an integer tensor, got ", timesteps.scalar_type());
  TORCH_CHECK_VALUE(timesteps.dim() == 1 && (timesteps.size(0) == x0.size(0) || timesteps.size(0) == 1), what,
                    ": timesteps shape ", timesteps.sizes(), " must be [B] or [1] for x0 shape ", x0.sizes());
  const int64_t lo = timesteps.min().item<int64_t>();
  const int64_t hi = timesteps.max().item<int64_t>();
  TORCH_CHECK_INDEX(lo >= 0 && hi < num_train_timesteps, what, ": timesteps must lie in [0, ", num_train_timesteps,
                    "), got values in [", lo, ", ", hi, "]");
}

// (sqrt(alpha-bar_t), sqrt(1 - alpha-bar_t)), each [B, 1, ...] in x0's dtype and device.
std::pair<at::Tensor, at::Tensor> NoiseCoefficients(const at::Tensor& alphas_cumprod, const at::Tensor& x0,
                                                    const at::Tensor& timesteps) {
  at::Tensor table = alphas_cumprod.to(x0.device(), x0.scalar_type());
  at::Tensor a = table.index_select(0, timesteps.to(x0.device(), at::kLong));
  std::vector<int64_t> shape(static_cast<size_t>(x0.dim()), 1);
  shape[0] = -1;
  return {a.pow(0.5).reshape(shape), (1 - a).pow(0.5).reshape(shape)};
}

// Dynamic thresholding (Saharia et al. 2022): per sample, s = clamp(quantile(|x|, ratio), 1, max),
// x -> clamp(x, -s, s) / s.
at::Tensor ThresholdSample(const at::Tensor& sample, double ratio, double max_value) {
  const auto dtype = sample.scalar_type();
  at::Tensor x = sample;
  if (dtype != at::kFloat && dtype != at::kDouble) x = x.to(at::kFloat);
  x = x.reshape({sample.size(0), -1});
  at::Tensor s = at::quantile(x.abs(), ratio, /*dim=*/1);
  s = at::clamp(s, /*min=*/1.0, /*max=*/max_value).unsqueeze(1);
  x = at::clamp(x, -s, s) / s;
  return x.reshape(sample.sizes()).to(dtype);
}

at::Tensor DrawNormal(at::IntArrayRef shape, const at::Generator& gen, const at::TensorOptions& like) {
  at::Tensor z = at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat).device(gen.device()));
  return z.to(like);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// SchedulerConfig

namespace {

// Throws c10::ValueError naming `src`, the first bad key and its value.
void ValidateConfig(const SchedulerConfig& c, const std::string& src) {
  TORCH_CHECK_VALUE(c.num_train_timesteps > 0, src, ": num_train_timesteps must be > 0, got ", c.num_train_timesteps);
  CheckIn(c.beta_schedule, {"linear", "scaled_linear", "squaredcos_cap_v2"}, "beta_schedule", src);
  if (c.trained_betas.empty() && c.beta_schedule != "squaredcos_cap_v2") {
    TORCH_CHECK_VALUE(std::isfinite(c.beta_start) && c.beta_start >= 0 && c.beta_start < 1, src,
                      ": beta_start must lie in [0, 1), got ", c.beta_start);
    TORCH_CHECK_VALUE(std::isfinite(c.beta_end) && c.beta_end >= 0 && c.beta_end < 1, src,
                      ": beta_end must lie in [0, 1), got ", c.beta_end);
  }
  if (!c.trained_betas.empty()) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(c.trained_betas.size()) == c.num_train_timesteps, src, ": trained_betas has ",
                      c.trained_betas.size(), " values but num_train_timesteps is ", c.num_train_timesteps);
    for (size_t i = 0; i < c.trained_betas.size(); ++i) {
      TORCH_CHECK_VALUE(c.trained_betas[i] >= 0 && c.trained_betas[i] < 1, src, ": trained_betas[", i,
                        "] must lie in [0, 1), got ", c.trained_betas[i]);
    }
  }
  CheckIn(c.prediction_type, {"epsilon", "v_prediction", "sample"}, "prediction_type", src);
  if (!c.timestep_spacing.empty()) CheckIn(c.timestep_spacing, {"leading", "trailing", "linspace"}, "timestep_spacing", src);
  TORCH_CHECK_VALUE(c.steps_offset >= 0, src, ": steps_offset must be >= 0, got ", c.steps_offset);
  TORCH_CHECK_VALUE(c.clip_sample_range > 0, src, ": clip_sample_range must be > 0, got ", c.clip_sample_range);
  TORCH_CHECK_VALUE(c.dynamic_thresholding_ratio > 0 && c.dynamic_thresholding_ratio <= 1, src,
                    ": dynamic_thresholding_ratio must lie in (0, 1], got ", c.dynamic_thresholding_ratio);
  TORCH_CHECK_VALUE(c.sample_max_value > 0, src, ": sample_max_value must be > 0, got ", c.sample_max_value);
  TORCH_CHECK_VALUE(c.interpolation_type == "linear", src, ": interpolation_type ", Quoted(c.interpolation_type),
                    " is not supported; valid: \"linear\"");
  TORCH_CHECK_VALUE(!c.use_karras_sigmas, src, ": use_karras_sigmas = true is not supported");
  CheckIn(c.timestep_type, {"discrete", "continuous"}, "timestep_type", src);
}

}  // namespace

void SchedulerConfig::Validate() const { ValidateConfig(*this, "scheduler config"); }

SchedulerConfig SchedulerConfig::FromJson(const std::string& text, const std::string& source) {
  const std::string src = source.empty() ? "scheduler config" : source;
  json j = json::parse(text, /*cb=*/nullptr, /*allow_exceptions=*/false);
  TORCH_CHECK_VALUE(!j.is_discarded(), src, ": not valid JSON");
  TORCH_CHECK_VALUE(j.is_object(), src, ": expected a JSON object, got ", j.type_name());
  SchedulerConfig c;
  Read(j, "num_train_timesteps", src, &c.num_train_timesteps);
  Read(j, "beta_start", src, &c.beta_start);
  Read(j, "beta_end", src, &c.beta_end);
  Read(j, "beta_schedule", src, &c.beta_schedule);
  Read(j, "trained_betas", src, &c.trained_betas);
  Read(j, "rescale_betas_zero_snr", src, &c.rescale_betas_zero_snr);
  Read(j, "prediction_type", src, &c.prediction_type);
  Read(j, "timestep_spacing", src, &c.timestep_spacing);
  Read(j, "steps_offset", src, &c.steps_offset);
  Read(j, "set_alpha_to_one", src, &c.set_alpha_to_one);
  Read(j, "clip_sample", src, &c.clip_sample);
  Read(j, "clip_sample_range", src, &c.clip_sample_range);
  Read(j, "thresholding", src, &c.thresholding);
  Read(j, "dynamic_thresholding_ratio", src, &c.dynamic_thresholding_ratio);
  Read(j, "sample_max_value", src, &c.sample_max_value);
  Read(j, "interpolation_type", src, &c.interpolation_type);
  Read(j, "use_karras_sigmas", src, &c.use_karras_sigmas);
  Read(j, "timestep_type", src, &c.timestep_type);
  ValidateConfig(c, src);
  return c;
}

SchedulerConfig SchedulerConfig::FromJsonFile(const std::string& path) {
  return FromJson(ReadFileToString(path), path);
}

at::Tensor MakeBetas(const SchedulerConfig& config) {
  config.Validate();
  const int64_t n = config.num_train_timesteps;
  at::Tensor betas;
  if (!config.trained_betas.empty()) {
    std::vector<float> b(config.trained_betas.begin(), config.trained_betas.end());
    betas = FloatVector(b);
  } else if (config.beta_schedule == "linear") {
    betas = at::linspace(config.beta_start, config.beta_end, n, at::kFloat);
  } else if (config.beta_schedule == "scaled_linear") {
    // Python's beta**0.5 is C pow(), not sqrt(); the square is taken in float32.
    betas = at::linspace(std::pow(config.beta_start, 0.5), std::pow(config.beta_end, 0.5), n, at::kFloat).pow(2);
  } else {  // squaredcos_cap_v2 (Validate() admits nothing else)
    betas = CosineBetas(n);
  }
  if (config.rescale_betas_zero_snr) betas = RescaleZeroTerminalSnr(betas);
  return betas;
}

at::Generator MakeGenerator(uint64_t seed, c10::Device device) {
  if (device.is_cpu()) return at::detail::createCPUGenerator(seed);
  at::Generator def = at::globalContext().defaultGenerator(device);
  at::Generator gen;
  {
    std::lock_guard<std::mutex> lock(def.mutex());
    gen = def.clone();
  }
  gen.set_current_seed(seed);
  return gen;
}

// ---------------------------------------------------------------------------------------------
// DDPMScheduler

DDPMScheduler::DDPMScheduler(SchedulerConfig config) : config_(std::move(config)) {
  betas_ = MakeBetas(config_);
  alphas_cumprod_ = AlphasCumprod(betas_);
}

at::Tensor DDPMScheduler::add_noise(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& timesteps) const {
  CheckNoiseArgs("add_noise", x0, noise, timesteps, num_train_timesteps());
  auto [sqrt_a, sqrt_one_minus_a] = NoiseCoefficients(alphas_cumprod_, x0, timesteps);
  return sqrt_a * x0 + sqrt_one_minus_a * noise.to(x0.device());
}

at::Tensor DDPMScheduler::velocity(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& timesteps) const {
  CheckNoiseArgs("velocity", x0, noise, timesteps, num_train_timesteps());
  auto [sqrt_a, sqrt_one_minus_a] = NoiseCoefficients(alphas_cumprod_, x0, timesteps);
  return sqrt_a * noise.to(x0.device()) - sqrt_one_minus_a * x0;
}

at::Tensor DDPMScheduler::training_target(const at::Tensor& x0, const at::Tensor& noise,
                                          const at::Tensor& timesteps) const {
  if (config_.prediction_type == "v_prediction") return velocity(x0, noise, timesteps);
  CheckNoiseArgs("training_target", x0, noise, timesteps, num_train_timesteps());
  if (config_.prediction_type == "sample") return x0;
  return noise;  // epsilon
}

at::Tensor DDPMScheduler::sample_timesteps(int64_t batch, at::Generator gen, c10::Device device) const {
  TORCH_CHECK_VALUE(batch > 0, "sample_timesteps: batch must be > 0, got ", batch);
  TORCH_CHECK_VALUE(gen.defined(), "sample_timesteps: needs a generator (see MakeGenerator)");
  at::Tensor t = at::randint(0, num_train_timesteps(), {batch}, gen,
                             at::TensorOptions().dtype(at::kLong).device(gen.device()));
  return t.to(device);
}

at::Tensor DDPMScheduler::sample_noise(const at::Tensor& like, at::Generator gen) const {
  TORCH_CHECK_VALUE(like.defined(), "sample_noise: `like` must be defined");
  TORCH_CHECK_VALUE(gen.defined(), "sample_noise: needs a generator (see MakeGenerator)");
  return DrawNormal(like.sizes(), gen, like.options());
}

// ---------------------------------------------------------------------------------------------
// Sampler

Sampler::Sampler(SchedulerConfig config) : config_(std::move(config)) {
  alphas_cumprod_ = AlphasCumprod(MakeBetas(config_));
}

void Sampler::CheckNumSteps(int64_t n) const {
  TORCH_CHECK_VALUE(n > 0 && n <= config_.num_train_timesteps, "set_timesteps: num_inference_steps must lie in [1, ",
                    config_.num_train_timesteps, "] (num_train_timesteps), got ", n);
}

const at::Tensor& Sampler::timesteps() const {
  TORCH_CHECK(num_inference_steps_ > 0, "Sampler: call set_timesteps() before using the timesteps");
  return timesteps_;
}

at::Tensor Sampler::initial_latents(const at::Tensor& noise) const {
  TORCH_CHECK_VALUE(noise.defined(), "initial_latents: noise must be defined");
  return noise * init_noise_sigma();
}

at::Tensor Sampler::scale_model_input(const at::Tensor& sample, int64_t step_index) const {
  TORCH_CHECK(num_inference_steps_ > 0, "scale_model_input: call set_timesteps() first");
  TORCH_CHECK_INDEX(step_index >= 0 && step_index < num_inference_steps_, "scale_model_input: step_index ", step_index,
                    " is outside [0, ", num_inference_steps_, ")");
  TORCH_CHECK_VALUE(sample.defined(), "scale_model_input: sample must be defined");
  return DoScaleModelInput(sample, step_index);
}

StepOutput Sampler::step(const at::Tensor& model_output, int64_t step_index, const at::Tensor& sample,
                         at::Generator gen) const {
  TORCH_CHECK(num_inference_steps_ > 0, "step: call set_timesteps() first");
  TORCH_CHECK_INDEX(step_index >= 0 && step_index < num_inference_steps_, "step: step_index ", step_index,
                    " is outside [0, ", num_inference_steps_, ")");
  TORCH_CHECK_VALUE(model_output.defined() && sample.defined(), "step: model_output and sample must be defined");
  TORCH_CHECK_VALUE(model_output.sizes() == sample.sizes(), "step: model_output shape ", model_output.sizes(),
                    " != sample shape ", sample.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(model_output.scalar_type()) && at::isFloatingType(sample.scalar_type()),
                    "step: model_output (", model_output.scalar_type(), ") and sample (", sample.scalar_type(),
                    ") must be floating point");
  return DoStep(model_output, step_index, sample, gen);
}

// ---------------------------------------------------------------------------------------------
// DDIMScheduler

DDIMScheduler::DDIMScheduler(SchedulerConfig config, double eta) : Sampler(std::move(config)), eta_(eta) {
  TORCH_CHECK_VALUE(std::isfinite(eta) && eta >= 0, "DDIMScheduler: eta must be >= 0, got ", eta);
  final_alpha_cumprod_ =
      config_.set_alpha_to_one ? at::ones({}, at::kFloat) : alphas_cumprod_[0].clone();
}

void DDIMScheduler::set_timesteps(int64_t n) {
  CheckNumSteps(n);
  const int64_t T = config_.num_train_timesteps;
  const std::string spacing = config_.timestep_spacing.empty() ? "leading" : config_.timestep_spacing;
  std::vector<int64_t> ts(static_cast<size_t>(n));
  if (spacing == "linspace") {
    std::vector<double> lin = NpLinspace(0, static_cast<double>(T - 1), n);
    for (int64_t i = 0; i < n; ++i) ts[i] = static_cast<int64_t>(std::nearbyint(lin[n - 1 - i]));
  } else if (spacing == "leading") {
    const int64_t ratio = T / n;
    for (int64_t i = 0; i < n; ++i) ts[i] = (n - 1 - i) * ratio + config_.steps_offset;
  } else {  // trailing
    const double ratio = static_cast<double>(T) / static_cast<double>(n);
    for (int64_t i = 0; i < n; ++i) {
      ts[i] = static_cast<int64_t>(std::nearbyint(static_cast<double>(T) - static_cast<double>(i) * ratio)) - 1;
    }
  }
  for (int64_t t : ts) {
    TORCH_CHECK_VALUE(t >= 0 && t < T, "set_timesteps(", n, "): timestep ", t, " (timestep_spacing ", Quoted(spacing),
                      ", steps_offset ", config_.steps_offset, ") is outside [0, ", T, ")");
  }
  timesteps_ = LongVector(ts);
  num_inference_steps_ = n;
}

at::Tensor DDIMScheduler::DoScaleModelInput(const at::Tensor& sample, int64_t) const { return sample; }

StepOutput DDIMScheduler::DoStep(const at::Tensor& model_output, int64_t i, const at::Tensor& sample,
                                 const at::Generator& gen) const {
  const int64_t t = timesteps_.data_ptr<int64_t>()[i];
  const int64_t prev_t = t - config_.num_train_timesteps / num_inference_steps_;
  // 0-dim float32 table entries, so every product below is float32 exactly as in diffusers.
  const at::Tensor alpha_prod_t = alphas_cumprod_[t];
  const at::Tensor alpha_prod_t_prev = prev_t >= 0 ? alphas_cumprod_[prev_t] : final_alpha_cumprod_;
  const at::Tensor beta_prod_t = 1 - alpha_prod_t;

  at::Tensor pred_original_sample, pred_epsilon;
  const std::string& type = config_.prediction_type;
  if (type == "epsilon") {
    pred_original_sample = (sample - beta_prod_t.pow(0.5) * model_output) / alpha_prod_t.pow(0.5);
    pred_epsilon = model_output;
  } else if (type == "sample") {
    pred_original_sample = model_output;
    pred_epsilon = (sample - alpha_prod_t.pow(0.5) * pred_original_sample) / beta_prod_t.pow(0.5);
  } else {  // v_prediction
    pred_original_sample = alpha_prod_t.pow(0.5) * sample - beta_prod_t.pow(0.5) * model_output;
    pred_epsilon = alpha_prod_t.pow(0.5) * model_output + beta_prod_t.pow(0.5) * sample;
  }

  if (config_.thresholding) {
    pred_original_sample =
        ThresholdSample(pred_original_sample, config_.dynamic_thresholding_ratio, config_.sample_max_value);
  } else if (config_.clip_sample) {
    pred_original_sample = pred_original_sample.clamp(-config_.clip_sample_range, config_.clip_sample_range);
  }

  // sigma_t(eta) of DDIM eq. (16).
  const at::Tensor beta_prod_t_prev = 1 - alpha_prod_t_prev;
  const at::Tensor variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev);
  const at::Tensor std_dev_t = eta_ * variance.pow(0.5);

  const at::Tensor pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t.pow(2)).pow(0.5) * pred_epsilon;
  at::Tensor prev_sample = alpha_prod_t_prev.pow(0.5) * pred_original_sample + pred_sample_direction;

  if (eta_ > 0) {
    TORCH_CHECK_VALUE(gen.defined(), "DDIM step with eta = ", eta_, " > 0 needs a generator (see MakeGenerator)");
    prev_sample = prev_sample + std_dev_t * DrawNormal(model_output.sizes(), gen, model_output.options());
  }
  return {prev_sample, pred_original_sample};
}

// ---------------------------------------------------------------------------------------------
// EulerDiscreteScheduler

EulerDiscreteScheduler::EulerDiscreteScheduler(SchedulerConfig config) : Sampler(std::move(config)) {
  TORCH_CHECK_VALUE(!(config_.timestep_type == "continuous" && config_.prediction_type == "v_prediction"),
                    "EulerDiscreteScheduler: timestep_type \"continuous\" with prediction_type \"v_prediction\" "
                    "is not supported");
  if (config_.rescale_betas_zero_snr) {
    // As diffusers: close to 0 without being 0, so the first sigma is finite.
    alphas_cumprod_ = alphas_cumprod_.clone();
    alphas_cumprod_[-1].fill_(std::ldexp(1.0, -24));
  }
  train_sigmas_ = ((1 - alphas_cumprod_) / alphas_cumprod_).pow(0.5);
}

void EulerDiscreteScheduler::set_timesteps(int64_t n) {
  CheckNumSteps(n);
  const int64_t T = config_.num_train_timesteps;
  const std::string spacing = config_.timestep_spacing.empty() ? "linspace" : config_.timestep_spacing;
  std::vector<float> ts(static_cast<size_t>(n));
  if (spacing == "linspace") {
    std::vector<double> lin = NpLinspace(0, static_cast<double>(T - 1), n);
    for (int64_t i = 0; i < n; ++i) ts[i] = static_cast<float>(lin[n - 1 - i]);
  } else if (spacing == "leading") {
    const int64_t ratio = T / n;
    for (int64_t i = 0; i < n; ++i) {
      ts[i] = static_cast<float>((n - 1 - i) * ratio) + static_cast<float>(config_.steps_offset);
    }
  } else {  // trailing
    const double ratio = static_cast<double>(T) / static_cast<double>(n);
    for (int64_t i = 0; i < n; ++i) {
      ts[i] = static_cast<float>(std::nearbyint(static_cast<double>(T) - static_cast<double>(i) * ratio)) - 1.0f;
    }
  }
  for (float t : ts) {
    TORCH_CHECK_VALUE(t >= 0 && t <= static_cast<float>(T - 1), "set_timesteps(", n, "): timestep ", t,
                      " (timestep_spacing ", Quoted(spacing), ", steps_offset ", config_.steps_offset,
                      ") is outside [0, ", T - 1, "]");
  }
  // numpy.interp of the float32 sigma table, in float64, rounded to float32; then a final 0.
  at::Tensor table = train_sigmas_.contiguous();
  const float* fp = table.data_ptr<float>();
  std::vector<float> sigmas(static_cast<size_t>(n + 1), 0.0f);
  for (int64_t i = 0; i < n; ++i) sigmas[i] = static_cast<float>(NpInterpOnGrid(ts[i], fp, T));
  timesteps_ = FloatVector(ts);
  sigmas_ = FloatVector(sigmas);
  num_inference_steps_ = n;
}

const at::Tensor& EulerDiscreteScheduler::sigmas() const {
  TORCH_CHECK(num_inference_steps_ > 0, "EulerDiscreteScheduler: call set_timesteps() before sigmas()");
  return sigmas_;
}

double EulerDiscreteScheduler::init_noise_sigma() const {
  TORCH_CHECK(num_inference_steps_ > 0, "EulerDiscreteScheduler: call set_timesteps() before init_noise_sigma()");
  const at::Tensor max_sigma = sigmas_.max();
  const std::string& spacing = config_.timestep_spacing;
  if (spacing.empty() || spacing == "linspace" || spacing == "trailing") return max_sigma.item<double>();
  return (max_sigma.pow(2) + 1).pow(0.5).item<double>();
}

at::Tensor EulerDiscreteScheduler::DoScaleModelInput(const at::Tensor& sample, int64_t i) const {
  const at::Tensor sigma = sigmas_[i];
  return sample / (sigma.pow(2) + 1).pow(0.5);
}

StepOutput EulerDiscreteScheduler::DoStep(const at::Tensor& model_output, int64_t i, const at::Tensor& sample_in,
                                          const at::Generator&) const {
  // Upcast as diffusers does; s_churn = 0, so sigma_hat = sigma and no noise is drawn.
  const at::Tensor sample = sample_in.to(at::kFloat);
  const at::Tensor sigma = sigmas_[i];

  at::Tensor pred_original_sample;
  const std::string& type = config_.prediction_type;
  if (type == "epsilon") {
    pred_original_sample = sample - sigma * model_output;
  } else if (type == "sample") {
    pred_original_sample = model_output;
  } else {  // v_prediction: denoised = model_output * c_out + input * c_skip
    pred_original_sample =
        model_output * (-sigma / (sigma.pow(2) + 1).pow(0.5)) + (sample / (sigma.pow(2) + 1));
  }
  // The ODE derivative d = (x - x0) / sigma and one Euler step to the next sigma.
  const at::Tensor derivative = (sample - pred_original_sample) / sigma;
  const at::Tensor dt = sigmas_[i + 1] - sigma;
  at::Tensor prev_sample = sample + derivative * dt;
  return {prev_sample.to(model_output.scalar_type()), pred_original_sample};
}

// ---------------------------------------------------------------------------------------------

std::unique_ptr<Sampler> MakeSampler(const std::string& name, const SchedulerConfig& config) {
  if (name == "ddim") return std::make_unique<DDIMScheduler>(config);
  TORCH_CHECK_VALUE(name == "euler", "unknown sampler \"", name, "\"; valid names: \"ddim\", \"euler\"");
  return std::make_unique<EulerDiscreteScheduler>(config);
}

}  // namespace perfusion

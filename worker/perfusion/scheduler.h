// scheduler: the diffusion noise schedules of the engine. DDPM training noise (forward process,
// timestep sampling, the training target) and two samplers for generation, DDIM and Euler.
//
// Ref: huggingface/diffusers v0.25.0 src/diffusers/schedulers/scheduling_ddpm.py (DDPMScheduler
// add_noise / get_velocity), scheduling_ddim.py (DDIMScheduler), scheduling_euler_discrete.py
// (EulerDiscreteScheduler); DDIM: Song et al. 2020, eq. (12) and (16); Euler: Karras et al. 2022,
// Algorithm 2 with s_churn = 0. Conformance: ../shared/data/conformance/models/README.md.
//
// Numerics follow diffusers op by op: betas and alphas_cumprod are float32 tables computed with the
// same LibTorch ops; the Euler sigmas are interpolated in float64 (numpy.interp) from the float32
// table and rounded to float32; DDIM/Euler steps use 0-dim float32 table entries, so a float32 port
// lands within rtol 1e-4 / atol 1e-5 of diffusers' own float32 results.
//
// Device/dtype: tables live on the CPU (float32). add_noise / training_target compute in the dtype
// and on the device of the samples (the table is converted first, as diffusers does); DDIM steps in
// the model output's dtype; Euler upcasts to float32 and returns prev_sample in the model output's
// dtype. Randomness only comes from an explicit at::Generator; draws happen on the generator's
// device (float32) and are then moved, so a CPU generator gives the same numbers on every device.
//
// Thread safety: DDPMScheduler is immutable after construction. A Sampler's const methods may run
// concurrently; set_timesteps() must not run concurrently with anything else on the same sampler.
// Tensors returned by reference are shared tables: do not modify them in place.
//
// Pipeline loop:
//   auto sampler = MakeSampler("euler", SchedulerConfig::FromJsonFile(dir + "/scheduler_config.json"));
//   sampler->set_timesteps(30);
//   at::Tensor x = sampler->initial_latents(at::randn(shape, gen));
//   for (int64_t i = 0; i < sampler->num_inference_steps(); ++i) {
//     at::Tensor eps = unet(sampler->scale_model_input(x, i), sampler->timesteps()[i], text);
//     x = sampler->step(eps, i, x).prev_sample;
//   }
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace perfusion {

// A diffusers scheduler_config.json. Every key a JSON file lacks (or sets to null) keeps the SD 1.5
// value below, so SD 1.5's own file, the conformance folders and the tiny model all read the same way.
// Keys the engine does not use (_class_name, skip_prk_steps, variance_type, ...) are ignored.
struct SchedulerConfig {
  // T: the number of training timesteps; t runs over 0..T-1.
  int64_t num_train_timesteps = 1000;
  double beta_start = 0.00085;
  double beta_end = 0.012;
  // "linear" (linspace(beta_start, beta_end)), "scaled_linear" (linspace of the square roots,
  // squared; SD 1.x) or "squaredcos_cap_v2" (Nichol & Dhariwal cosine, beta_start/end unused).
  std::string beta_schedule = "scaled_linear";
  // Non-empty: these betas (T of them) replace the schedule above.
  std::vector<double> trained_betas;
  // Rescale the betas to zero terminal SNR (Lin et al. 2023, Algorithm 1).
  bool rescale_betas_zero_snr = false;
  // What the UNet predicts: "epsilon" (the noise), "v_prediction" (v = sqrt(a) eps - sqrt(1-a) x0)
  // or "sample" (x0).
  std::string prediction_type = "epsilon";
  // Sampler timesteps: "leading" (DDIM/DDPM default), "trailing" or "linspace" (Euler default).
  // Empty = the sampler's diffusers default.
  std::string timestep_spacing;
  // Added to "leading" timesteps (SD 1.5: 1).
  int64_t steps_offset = 1;
  // DDIM: alpha-bar after the last step is 1 (true) or alphas_cumprod[0] (false, SD 1.5).
  bool set_alpha_to_one = false;
  // DDIM: clamp the predicted x0 to [-clip_sample_range, clip_sample_range].
  bool clip_sample = false;
  double clip_sample_range = 1.0;
  // DDIM: dynamic thresholding of the predicted x0 (Imagen); wins over clip_sample.
  bool thresholding = false;
  double dynamic_thresholding_ratio = 0.995;
  double sample_max_value = 1.0;
  // Euler: only "linear" interpolation of the sigmas, no Karras sigmas (others raise).
  std::string interpolation_type = "linear";
  bool use_karras_sigmas = false;
  // Euler: "discrete" or "continuous" (the latter only changes v_prediction, which then raises).
  std::string timestep_type = "discrete";

  // Throws c10::ValueError naming the first bad key and its value.
  void Validate() const;
  // Parses a scheduler_config.json text and validates it. Throws c10::ValueError for malformed JSON,
  // a key of the wrong type or a bad value, naming the key (and `source` when given).
  static SchedulerConfig FromJson(const std::string& text, const std::string& source = "");
  // FromJson of a file's contents; the path is named in every error.
  static SchedulerConfig FromJsonFile(const std::string& path);
};

// beta_t, t = 0..T-1, float32 on the CPU, as diffusers computes them (then zero-SNR rescaled if set).
at::Tensor MakeBetas(const SchedulerConfig& config);

// A seeded generator for `device` (a clone of that device's default generator type).
at::Generator MakeGenerator(uint64_t seed, c10::Device device = c10::Device(c10::kCPU));

// DDPM forward (noising) process, what training needs: q(x_t | x0) and the loss target.
class DDPMScheduler {
 public:
  explicit DDPMScheduler(SchedulerConfig config = {});

  const SchedulerConfig& config() const { return config_; }
  int64_t num_train_timesteps() const { return config_.num_train_timesteps; }
  // float32 [T], CPU.
  const at::Tensor& betas() const { return betas_; }
  // alpha-bar_t = cumprod(1 - beta), float32 [T], CPU.
  const at::Tensor& alphas_cumprod() const { return alphas_cumprod_; }

  // x_t = sqrt(alpha-bar_t) x0 + sqrt(1 - alpha-bar_t) noise.
  // x0, noise: [B, ...] same shape; timesteps: integer [B] (or [1], shared), values in [0, T).
  // Returns [B, ...] in x0's dtype and device. Throws ValueError/IndexError naming the bad argument.
  at::Tensor add_noise(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& timesteps) const;
  // v = sqrt(alpha-bar_t) noise - sqrt(1 - alpha-bar_t) x0 (same arguments as add_noise).
  at::Tensor velocity(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& timesteps) const;
  // What the UNet is trained to output at x_t = add_noise(x0, noise, t): noise (epsilon),
  // velocity(x0, noise, t) (v_prediction) or x0 (sample).
  at::Tensor training_target(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& timesteps) const;

  // t ~ U{0..T-1}, int64 [batch] on `device`, drawn with `gen` (REQUIRES: gen.defined(), batch > 0).
  at::Tensor sample_timesteps(int64_t batch, at::Generator gen, c10::Device device = c10::Device(c10::kCPU)) const;
  // N(0, 1) noise shaped, typed and placed like `like`, drawn with `gen` (on the generator's device).
  at::Tensor sample_noise(const at::Tensor& like, at::Generator gen) const;

 private:
  SchedulerConfig config_;
  at::Tensor betas_;
  at::Tensor alphas_cumprod_;
};

struct StepOutput {
  at::Tensor prev_sample;           // the next x (the sample at the following, less noisy step)
  at::Tensor pred_original_sample;  // the model's estimate of x0 at this step
};

// A sampler: a fixed sequence of num_inference_steps() timesteps walked by step index.
// Usage: set_timesteps(n), then the loop in the file comment. Not copyable (use MakeSampler).
class Sampler {
 public:
  virtual ~Sampler() = default;
  Sampler(const Sampler&) = delete;
  Sampler& operator=(const Sampler&) = delete;

  // Chooses the n timesteps. Throws c10::ValueError (naming num_inference_steps) unless
  // 0 < n <= num_train_timesteps and every timestep lies in [0, T).
  virtual void set_timesteps(int64_t num_inference_steps) = 0;
  // [n] on the CPU: int64 (DDIM) or float32 (Euler, fractional): the UNet's timestep at step i.
  // REQUIRES: set_timesteps() was called (else throws).
  const at::Tensor& timesteps() const;
  int64_t num_inference_steps() const { return num_inference_steps_; }
  // The standard deviation of the initial noise x_T.
  virtual double init_noise_sigma() const = 0;
  // noise * init_noise_sigma(): the first x of the loop, from N(0, 1) noise.
  at::Tensor initial_latents(const at::Tensor& noise) const;

  // The UNet input at step i (x / sqrt(sigma^2 + 1) for Euler; x itself for DDIM).
  // REQUIRES: 0 <= step_index < num_inference_steps() (else c10::IndexError).
  at::Tensor scale_model_input(const at::Tensor& sample, int64_t step_index) const;
  // One denoising step from x = `sample` at step i with the UNet's `model_output` ([B, ...] both,
  // same shape). `gen` is needed only by stochastic settings (DDIM eta > 0); deterministic ones
  // ignore it. Throws c10::IndexError for a bad step index, c10::ValueError for mismatched shapes.
  StepOutput step(const at::Tensor& model_output, int64_t step_index, const at::Tensor& sample,
                  at::Generator gen = at::Generator()) const;

  const SchedulerConfig& config() const { return config_; }
  // float32 [T], CPU.
  const at::Tensor& alphas_cumprod() const { return alphas_cumprod_; }

 protected:
  explicit Sampler(SchedulerConfig config);
  // Throws c10::ValueError unless 0 < n <= T.
  void CheckNumSteps(int64_t num_inference_steps) const;
  virtual at::Tensor DoScaleModelInput(const at::Tensor& sample, int64_t step_index) const = 0;
  virtual StepOutput DoStep(const at::Tensor& model_output, int64_t step_index, const at::Tensor& sample,
                            const at::Generator& gen) const = 0;

  SchedulerConfig config_;
  at::Tensor alphas_cumprod_;  // float32 [T]
  at::Tensor timesteps_;       // [n]
  int64_t num_inference_steps_ = 0;
};

// DDIM (eta = 0: deterministic; eta > 0: adds eta-scaled posterior noise drawn with step()'s gen).
// prev_t = t - T // n; alpha-bar at prev_t < 0 is final_alpha_cumprod().
class DDIMScheduler : public Sampler {
 public:
  // REQUIRES: eta >= 0 (else c10::ValueError).
  explicit DDIMScheduler(SchedulerConfig config = {}, double eta = 0.0);
  void set_timesteps(int64_t num_inference_steps) override;
  double init_noise_sigma() const override { return 1.0; }
  double eta() const { return eta_; }
  // 1 (set_alpha_to_one) or alphas_cumprod[0]; float32 0-dim, CPU.
  const at::Tensor& final_alpha_cumprod() const { return final_alpha_cumprod_; }

 private:
  at::Tensor DoScaleModelInput(const at::Tensor& sample, int64_t step_index) const override;
  StepOutput DoStep(const at::Tensor& model_output, int64_t step_index, const at::Tensor& sample,
                    const at::Generator& gen) const override;
  double eta_;
  at::Tensor final_alpha_cumprod_;
};

// Euler (EulerDiscreteScheduler, s_churn = 0: deterministic): sigma_t = sqrt((1 - a_t) / a_t),
// x0 = x - sigma eps, x_next = x + (x - x0) / sigma * (sigma_next - sigma).
class EulerDiscreteScheduler : public Sampler {
 public:
  explicit EulerDiscreteScheduler(SchedulerConfig config = {});
  void set_timesteps(int64_t num_inference_steps) override;
  // max(sigmas) for linspace/trailing spacing, sqrt(max^2 + 1) for leading (as diffusers).
  double init_noise_sigma() const override;
  // [n + 1] float32 on the CPU, decreasing, last = 0. REQUIRES: set_timesteps() was called.
  const at::Tensor& sigmas() const;

 private:
  at::Tensor DoScaleModelInput(const at::Tensor& sample, int64_t step_index) const override;
  StepOutput DoStep(const at::Tensor& model_output, int64_t step_index, const at::Tensor& sample,
                    const at::Generator& gen) const override;
  at::Tensor train_sigmas_;  // float32 [T]: sqrt((1 - a_t) / a_t), t = 0..T-1
  at::Tensor sigmas_;        // float32 [n + 1]
};

// "ddim" or "euler" (case-sensitive) built from `config`; anything else throws c10::ValueError
// listing the valid names.
std::unique_ptr<Sampler> MakeSampler(const std::string& name, const SchedulerConfig& config);

}  // namespace perfusion

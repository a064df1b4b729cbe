#include "perfusion/scheduler.h"

#include <ATen/Context.h>
#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "perfusion/safetensors.h"
#include "tests/engine/test_util.h"

namespace perfusion {
namespace {

// ---------------------------------------------------------------------------------------------
// Conformance vectors (../shared/data/conformance/models/README.md, "Schedulers")

std::string VectorsDir() {
  return testing::EnvOr("PERFUSION_MODEL_VECTORS_DIR", testing::SharedDir() + "/data/conformance/models");
}

struct Vectors {
  std::string path;
  std::map<std::string, at::Tensor> tensors;
  std::map<std::string, std::string> meta;
  std::map<std::string, std::string> roles;  // name -> input / expected / diagnostic
  double rtol = 0;
  double atol = 0;

  const at::Tensor& at(const std::string& name) const {
    auto it = tensors.find(name);
    TORCH_CHECK_INDEX(it != tensors.end(), path, " has no tensor ", name);
    return it->second;
  }
  std::vector<int64_t> steps() const {  // metadata "steps" = "50,20"
    std::vector<int64_t> out;
    std::stringstream ss(meta.at("steps"));
    std::string item;
    while (std::getline(ss, item, ',')) out.push_back(std::stoll(item));
    return out;
  }
  SchedulerConfig config() const { return SchedulerConfig::FromJsonFile(VectorsDir() + "/" + meta.at("config")); }
};

std::optional<Vectors> LoadVectors(const std::string& file) {
  Vectors v;
  v.path = VectorsDir() + "/" + file;
  if (!testing::FileExists(v.path)) return std::nullopt;
  v.tensors = LoadSafetensors(v.path, &v.meta);
  const nlohmann::json roles = nlohmann::json::parse(v.meta.at("roles"));
  for (auto it = roles.begin(); it != roles.end(); ++it) v.roles[it.key()] = it.value().get<std::string>();
  v.rtol = std::stod(v.meta.at("rtol"));
  v.atol = std::stod(v.meta.at("atol"));
  return v;
}

// (max |d|, worst |d| / (atol + rtol |y|)) of one comparison, for the log.
std::pair<double, double> Deviation(const at::Tensor& got, const at::Tensor& want, double rtol, double atol) {
  at::Tensor g = got.to(at::kDouble), w = want.to(at::kDouble);
  at::Tensor d = (g - w).abs();
  return {d.max().item<double>(), (d / (atol + rtol * w.abs())).max().item<double>()};
}

// Every tensor whose role is `expected` must have been computed and be within tolerance; computed
// diagnostics are compared too (they locate a failure). Logs the worst ratio per file.
void CompareEveryExpected(const Vectors& v, const std::map<std::string, at::Tensor>& got) {
  double worst = 0, max_abs = 0;
  std::string worst_name = "-";
  int compared = 0;
  for (const auto& [name, role] : v.roles) {
    if (role == "input") continue;
    auto it = got.find(name);
    if (role == "expected") {
      EXPECT_TRUE(it != got.end()) << v.path << ": expected tensor " << name << " was not computed";
    }
    if (it == got.end()) continue;
    EXPECT_TRUE(testing::AllClose(it->second, v.at(name), v.rtol, v.atol, name + " (" + role + ")"));
    if (role != "expected") continue;
    ++compared;
    const auto [d, r] = Deviation(it->second, v.at(name), v.rtol, v.atol);
    max_abs = std::max(max_abs, d);
    if (r > worst) worst = r, worst_name = name;
  }
  std::cout << "[ conformance ] " << v.meta.at("case") << ": " << compared << " expected tensors, max |d| = " << max_abs
            << ", worst |d| / (atol + rtol |y|) = " << worst << " (" << worst_name << ")\n";
}

// The README's stand-in UNet: eps = 0.1 * model_input + (t / 1000) * c, t the scheduler's timestep.
at::Tensor StandInModel(const at::Tensor& model_input, const at::Tensor& t, const at::Tensor& c) {
  return 0.1 * model_input + (t / 1000) * c;
}

TEST(SchedulerConformanceTest, DdpmTablesAndAddNoiseMatchDiffusers) {
  auto v = LoadVectors("ddpm_vectors.safetensors");
  if (!v) GTEST_SKIP() << "no conformance vectors in " << VectorsDir();
  DDPMScheduler sched(v->config());
  std::map<std::string, at::Tensor> got;
  got["betas"] = sched.betas();
  got["alphas_cumprod"] = sched.alphas_cumprod();
  got["add_noise.noisy_samples"] =
      sched.add_noise(v->at("add_noise.original_samples"), v->at("add_noise.noise"), v->at("add_noise.timesteps"));
  CompareEveryExpected(*v, got);
  // The float32 table stays within tolerance of the exact (float64) product.
  EXPECT_TRUE(testing::AllClose(sched.alphas_cumprod(), v->at("alphas_cumprod_f64"), v->rtol, v->atol,
                                "alphas_cumprod vs float64"));
}

TEST(SchedulerConformanceTest, DdimTrajectoriesMatchDiffusers) {
  auto v = LoadVectors("ddim_vectors.safetensors");
  if (!v) GTEST_SKIP() << "no conformance vectors in " << VectorsDir();
  ASSERT_EQ(v->meta.at("eta"), "0");
  const at::Tensor& c = v->at("model_c");
  std::map<std::string, at::Tensor> got;
  for (int64_t n : v->steps()) {
    DDIMScheduler sched(v->config());
    sched.set_timesteps(n);
    const std::string p = "n" + std::to_string(n) + ".";
    got[p + "timesteps"] = sched.timesteps();
    EXPECT_TRUE(at::equal(sched.timesteps(), v->at(p + "timesteps"))) << p << "timesteps must match exactly";
    std::vector<at::Tensor> prev, pred, eps_rows, a_t, a_prev, prev_t;
    at::Tensor x = sched.initial_latents(v->at(p + "init_noise"));
    for (int64_t i = 0; i < n; ++i) {
      const at::Tensor t = sched.timesteps()[i];
      at::Tensor eps = StandInModel(sched.scale_model_input(x, i), t, c);
      StepOutput out = sched.step(eps, i, x);
      eps_rows.push_back(eps);
      prev.push_back(out.prev_sample);
      pred.push_back(out.pred_original_sample);
      const int64_t tp = t.item<int64_t>() - 1000 / n;
      prev_t.push_back(at::full({}, tp, at::kLong));
      a_t.push_back(sched.alphas_cumprod()[t.item<int64_t>()]);
      a_prev.push_back(tp >= 0 ? sched.alphas_cumprod()[tp] : sched.final_alpha_cumprod());
      x = out.prev_sample;
    }
    got[p + "prev_sample"] = at::stack(prev);
    got[p + "pred_original_sample"] = at::stack(pred);
    got[p + "model_output"] = at::stack(eps_rows);
    got[p + "alpha_prod_t"] = at::stack(a_t);
    got[p + "alpha_prod_t_prev"] = at::stack(a_prev);
    got[p + "prev_timesteps"] = at::stack(prev_t);
    got["final_alpha_cumprod"] = sched.final_alpha_cumprod().reshape({1});
  }
  CompareEveryExpected(*v, got);
}

TEST(SchedulerConformanceTest, EachDdimStepFromTheReferenceStateMatches) {
  auto v = LoadVectors("ddim_vectors.safetensors");
  if (!v) GTEST_SKIP() << "no conformance vectors in " << VectorsDir();
  for (int64_t n : v->steps()) {
    DDIMScheduler sched(v->config());
    sched.set_timesteps(n);
    const std::string p = "n" + std::to_string(n) + ".";
    for (int64_t i = 0; i < n; ++i) {
      const at::Tensor x = i == 0 ? v->at(p + "init_noise") : v->at(p + "prev_sample")[i - 1];
      StepOutput out = sched.step(v->at(p + "model_output")[i], i, x);
      const std::string row = p + "[" + std::to_string(i) + "]";
      EXPECT_TRUE(testing::AllClose(out.prev_sample, v->at(p + "prev_sample")[i], v->rtol, v->atol,
                                    row + " prev_sample"));
      EXPECT_TRUE(testing::AllClose(out.pred_original_sample, v->at(p + "pred_original_sample")[i], v->rtol,
                                    v->atol, row + " pred_original_sample"));
    }
  }
}

TEST(SchedulerConformanceTest, EulerTrajectoriesMatchDiffusers) {
  auto v = LoadVectors("euler_vectors.safetensors");
  if (!v) GTEST_SKIP() << "no conformance vectors in " << VectorsDir();
  ASSERT_EQ(v->meta.at("s_churn"), "0");
  const at::Tensor& c = v->at("model_c");
  std::map<std::string, at::Tensor> got;
  for (int64_t n : v->steps()) {
    EulerDiscreteScheduler sched(v->config());
    sched.set_timesteps(n);
    const std::string p = "n" + std::to_string(n) + ".";
    got[p + "timesteps"] = sched.timesteps();
    got[p + "sigmas"] = sched.sigmas();
    got[p + "init_noise_sigma"] = at::full({1}, sched.init_noise_sigma(), at::kFloat);
    at::Tensor x = sched.initial_latents(v->at(p + "noise"));
    got[p + "init_latents"] = x;
    std::vector<at::Tensor> inputs, eps_rows, prev, pred;
    for (int64_t i = 0; i < n; ++i) {
      at::Tensor x_in = sched.scale_model_input(x, i);
      at::Tensor eps = StandInModel(x_in, sched.timesteps()[i], c);
      StepOutput out = sched.step(eps, i, x);
      inputs.push_back(x_in);
      eps_rows.push_back(eps);
      prev.push_back(out.prev_sample);
      pred.push_back(out.pred_original_sample);
      x = out.prev_sample;
    }
    got[p + "model_input"] = at::stack(inputs);
    got[p + "model_output"] = at::stack(eps_rows);
    got[p + "prev_sample"] = at::stack(prev);
    got[p + "pred_original_sample"] = at::stack(pred);
  }
  CompareEveryExpected(*v, got);
}

TEST(SchedulerConformanceTest, EachEulerStepFromTheReferenceStateMatches) {
  auto v = LoadVectors("euler_vectors.safetensors");
  if (!v) GTEST_SKIP() << "no conformance vectors in " << VectorsDir();
  for (int64_t n : v->steps()) {
    EulerDiscreteScheduler sched(v->config());
    sched.set_timesteps(n);
    const std::string p = "n" + std::to_string(n) + ".";
    for (int64_t i = 0; i < n; ++i) {
      const at::Tensor x = i == 0 ? v->at(p + "init_latents") : v->at(p + "prev_sample")[i - 1];
      const std::string row = p + "[" + std::to_string(i) + "]";
      EXPECT_TRUE(testing::AllClose(sched.scale_model_input(x, i), v->at(p + "model_input")[i], v->rtol, v->atol,
                                    row + " model_input"));
      StepOutput out = sched.step(v->at(p + "model_output")[i], i, x);
      EXPECT_TRUE(testing::AllClose(out.prev_sample, v->at(p + "prev_sample")[i], v->rtol, v->atol,
                                    row + " prev_sample"));
      EXPECT_TRUE(testing::AllClose(out.pred_original_sample, v->at(p + "pred_original_sample")[i], v->rtol,
                                    v->atol, row + " pred_original_sample"));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Config

// Runs `fn`, which must throw c10::ValueError whose message contains every one of `needles`.
template <class Fn>
void ExpectValueError(Fn fn, const std::vector<std::string>& needles) {
  try {
    fn();
    ADD_FAILURE() << "no c10::ValueError thrown; wanted one mentioning " << needles.front();
  } catch (const c10::ValueError& e) {
    const std::string msg = e.what_without_backtrace();
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "message lacks \"" << n << "\": " << msg;
  }
}

TEST(SchedulerConfigTest, MissingKeysGetStableDiffusion15Defaults) {
  SchedulerConfig c = SchedulerConfig::FromJson(R"({"_class_name": "PNDMScheduler", "skip_prk_steps": true})");
  EXPECT_EQ(c.num_train_timesteps, 1000);
  EXPECT_DOUBLE_EQ(c.beta_start, 0.00085);
  EXPECT_DOUBLE_EQ(c.beta_end, 0.012);
  EXPECT_EQ(c.beta_schedule, "scaled_linear");
  EXPECT_EQ(c.prediction_type, "epsilon");
  EXPECT_EQ(c.steps_offset, 1);
  EXPECT_FALSE(c.set_alpha_to_one);
  EXPECT_FALSE(c.clip_sample);
  EXPECT_TRUE(c.timestep_spacing.empty());  // each sampler's own diffusers default
  EXPECT_TRUE(c.trained_betas.empty());
}

TEST(SchedulerConfigTest, NullValuesKeepTheDefault) {
  SchedulerConfig c = SchedulerConfig::FromJson(R"({"trained_betas": null, "timestep_spacing": null, "sigma_min": null})");
  EXPECT_TRUE(c.trained_betas.empty());
  EXPECT_TRUE(c.timestep_spacing.empty());
}

TEST(SchedulerConfigTest, ReadsTheConformanceConfigs) {
  const std::string dir = VectorsDir();
  if (!testing::FileExists(dir + "/scheduler_ddim/scheduler_config.json")) GTEST_SKIP() << "no data in " << dir;
  SchedulerConfig ddim = SchedulerConfig::FromJsonFile(dir + "/scheduler_ddim/scheduler_config.json");
  SchedulerConfig ddpm = SchedulerConfig::FromJsonFile(dir + "/scheduler_ddpm/scheduler_config.json");
  SchedulerConfig euler = SchedulerConfig::FromJsonFile(dir + "/scheduler_euler/scheduler_config.json");
  EXPECT_EQ(ddim.timestep_spacing, "leading");
  EXPECT_EQ(ddpm.timestep_spacing, "leading");
  EXPECT_EQ(euler.timestep_spacing, "linspace");
  for (const SchedulerConfig* c : {&ddim, &ddpm, &euler}) {
    EXPECT_EQ(c->beta_schedule, "scaled_linear");
    EXPECT_DOUBLE_EQ(c->beta_start, 0.00085);
    EXPECT_EQ(c->steps_offset, 1);
    EXPECT_FALSE(c->set_alpha_to_one);
  }
}

TEST(SchedulerConfigTest, UnknownScheduleOrPredictionTypeNamesTheKey) {
  ExpectValueError([] { SchedulerConfig::FromJson(R"({"beta_schedule": "cosine"})"); },
                   {"beta_schedule", "cosine", "scaled_linear"});
  ExpectValueError([] { SchedulerConfig::FromJson(R"({"prediction_type": "x0"})"); }, {"prediction_type", "x0"});
  ExpectValueError([] { SchedulerConfig::FromJson(R"({"timestep_spacing": "uniform"})"); },
                   {"timestep_spacing", "uniform"});
  ExpectValueError([] { SchedulerConfig::FromJson(R"({"use_karras_sigmas": true})"); }, {"use_karras_sigmas"});
  ExpectValueError([] { SchedulerConfig::FromJson(R"({"beta_schedule": "foo"})", "dir/scheduler_config.json"); },
                   {"dir/scheduler_config.json", "beta_schedule"});
  SchedulerConfig c;
  c.prediction_type = "noise";
  ExpectValueError([&] { DDPMScheduler{c}; }, {"prediction_type", "noise"});
}

TEST(SchedulerConfigTest, WrongTypesAndBadValuesNameTheKey) {
  ExpectValueError([] { SchedulerConfig::FromJson(R"({"num_train_timesteps": "1000"})"); }, {"num_train_timesteps"});
  ExpectValueError([] { SchedulerConfig::FromJson(R"({"clip_sample": 1})"); }, {"clip_sample"});
  ExpectValueError([] { SchedulerConfig::FromJson(R"({"num_train_timesteps": -5})"); }, {"num_train_timesteps", "-5"});
  ExpectValueError([] { SchedulerConfig::FromJson(R"({"steps_offset": -1})"); }, {"steps_offset"});
  ExpectValueError([] { SchedulerConfig::FromJson(R"({"beta_end": 1.5})"); }, {"beta_end"});
  ExpectValueError([] { SchedulerConfig::FromJson(R"({"trained_betas": [0.1, 0.2]})"); },
                   {"trained_betas", "num_train_timesteps"});
  ExpectValueError([] { SchedulerConfig::FromJson("{\"beta_start\": 0.1,"); }, {"JSON"});
  ExpectValueError([] { SchedulerConfig::FromJson("[1, 2]"); }, {"object"});
  EXPECT_THROW(SchedulerConfig::FromJsonFile("/nonexistent/scheduler_config.json"), c10::Error);
}

// ---------------------------------------------------------------------------------------------
// DDPM (training noise)

TEST(DdpmSchedulerTest, AlphasCumprodDecreasesFromNearlyOneToNearlyZero) {
  DDPMScheduler sched;
  const at::Tensor a = sched.alphas_cumprod();
  ASSERT_EQ(a.sizes(), (at::IntArrayRef{1000}));
  EXPECT_EQ(a.scalar_type(), at::kFloat);
  EXPECT_TRUE((a.slice(0, 1) < a.slice(0, 0, 999)).all().item<bool>());
  EXPECT_NEAR(a[0].item<double>(), 1 - 0.00085, 1e-7);
  EXPECT_LT(a[999].item<double>(), 0.005);
  EXPECT_GT(a[999].item<double>(), 0.0);
}

TEST(DdpmSchedulerTest, SameSeedGivesSameTimestepsAndNoise) {
  DDPMScheduler sched;
  const at::Tensor x0 = at::zeros({4, 4, 8, 8});
  at::Generator g1 = MakeGenerator(1234), g2 = MakeGenerator(1234), g3 = MakeGenerator(1235);
  at::Tensor t1 = sched.sample_timesteps(4, g1), n1 = sched.sample_noise(x0, g1);
  at::Tensor t2 = sched.sample_timesteps(4, g2), n2 = sched.sample_noise(x0, g2);
  at::Tensor t3 = sched.sample_timesteps(4, g3), n3 = sched.sample_noise(x0, g3);
  EXPECT_TRUE(at::equal(t1, t2));
  EXPECT_TRUE(at::equal(n1, n2));
  EXPECT_TRUE(at::equal(sched.add_noise(x0, n1, t1), sched.add_noise(x0, n2, t2)));
  EXPECT_FALSE(at::equal(n1, n3));
  EXPECT_EQ(t1.scalar_type(), at::kLong);
  EXPECT_EQ(n1.sizes(), x0.sizes());
  // Draws cover the whole range [0, T).
  at::Tensor many = sched.sample_timesteps(8192, g1);
  EXPECT_GE(many.min().item<int64_t>(), 0);
  EXPECT_LT(many.max().item<int64_t>(), 1000);
  EXPECT_LT(many.min().item<int64_t>(), 10);
  EXPECT_GT(many.max().item<int64_t>(), 990);
  EXPECT_THROW(sched.sample_timesteps(0, g1), c10::ValueError);
  EXPECT_THROW(sched.sample_timesteps(2, at::Generator()), c10::ValueError);
}

TEST(DdpmSchedulerTest, TrainingTargetFollowsThePredictionType) {
  const at::Tensor x0 = at::randn({3, 4, 2, 2}), noise = at::randn({3, 4, 2, 2});
  const at::Tensor t = at::tensor({0, 500, 999}, at::kLong);
  SchedulerConfig eps_cfg;
  DDPMScheduler eps(eps_cfg);
  EXPECT_TRUE(at::equal(eps.training_target(x0, noise, t), noise));
  SchedulerConfig x0_cfg;
  x0_cfg.prediction_type = "sample";
  EXPECT_TRUE(at::equal(DDPMScheduler(x0_cfg).training_target(x0, noise, t), x0));
  SchedulerConfig v_cfg;
  v_cfg.prediction_type = "v_prediction";
  DDPMScheduler v(v_cfg);
  const at::Tensor target = v.training_target(x0, noise, t);
  const at::Tensor a = v.alphas_cumprod().index_select(0, t).view({3, 1, 1, 1});
  EXPECT_TRUE(testing::AllClose(target, a.sqrt() * noise - (1 - a).sqrt() * x0, 1e-6, 1e-6, "v target"));
  // v-parameterisation identity: x0 = sqrt(a) x_t - sqrt(1 - a) v.
  const at::Tensor xt = v.add_noise(x0, noise, t);
  EXPECT_TRUE(testing::AllClose(a.sqrt() * xt - (1 - a).sqrt() * target, x0, 1e-5, 1e-5, "x0 from v"));
}

TEST(DdpmSchedulerTest, AddNoiseRejectsBadArguments) {
  DDPMScheduler sched;
  const at::Tensor x0 = at::randn({2, 4, 8, 8});
  const at::Tensor t = at::tensor({1, 2}, at::kLong);
  ExpectValueError([&] { sched.add_noise(x0, at::randn({2, 4, 8, 7}), t); }, {"noise shape", "x0 shape"});
  ExpectValueError([&] { sched.add_noise(x0, x0, at::tensor({1.0f, 2.0f})); }, {"timesteps", "integer"});
  ExpectValueError([&] { sched.add_noise(x0, x0, at::tensor({1, 2, 3}, at::kLong)); }, {"timesteps shape"});
  EXPECT_THROW(sched.add_noise(x0, x0, at::tensor({1, 1000}, at::kLong)), c10::IndexError);
  EXPECT_THROW(sched.add_noise(x0, x0, at::tensor({-1, 3}, at::kLong)), c10::IndexError);
  // One shared timestep broadcasts over the batch.
  EXPECT_TRUE(at::equal(sched.add_noise(x0, x0, at::tensor({7}, at::kLong)),
                        sched.add_noise(x0, x0, at::tensor({7, 7}, at::kLong))));
}

// ---------------------------------------------------------------------------------------------
// Samplers

TEST(SamplerTest, MakeSamplerRejectsUnknownNamesListingTheValidOnes) {
  EXPECT_NE(dynamic_cast<DDIMScheduler*>(MakeSampler("ddim", {}).get()), nullptr);
  EXPECT_NE(dynamic_cast<EulerDiscreteScheduler*>(MakeSampler("euler", {}).get()), nullptr);
  ExpectValueError([] { MakeSampler("pndm", {}); }, {"pndm", "ddim", "euler"});
}

TEST(SamplerTest, StepCountsOutsideOneToNumTrainTimestepsAreRejected) {
  for (const char* name : {"ddim", "euler"}) {
    SCOPED_TRACE(name);
    auto s = MakeSampler(name, {});
    ExpectValueError([&] { s->set_timesteps(0); }, {"num_inference_steps", "got 0"});
    ExpectValueError([&] { s->set_timesteps(-3); }, {"num_inference_steps", "got -3"});
    ExpectValueError([&] { s->set_timesteps(1001); }, {"num_inference_steps", "1000", "got 1001"});
    EXPECT_THROW(s->timesteps(), c10::Error);  // nothing set yet
  }
  // Leading spacing with steps_offset 1 would ask for t = 1000 at 1000 steps.
  DDIMScheduler ddim;
  ExpectValueError([&] { ddim.set_timesteps(1000); }, {"timestep 1000", "steps_offset"});
  SchedulerConfig no_offset;
  no_offset.steps_offset = 0;
  DDIMScheduler all(no_offset);
  all.set_timesteps(1000);
  EXPECT_EQ(all.timesteps()[0].item<int64_t>(), 999);
  EXPECT_EQ(all.timesteps()[999].item<int64_t>(), 0);
}

TEST(SamplerTest, BadStepIndexOrShapesAreErrors) {
  for (const char* name : {"ddim", "euler"}) {
    SCOPED_TRACE(name);
    auto s = MakeSampler(name, {});
    const at::Tensor x = at::randn({1, 4, 8, 8});
    EXPECT_THROW(s->step(x, 0, x), c10::Error);  // set_timesteps() not called
    s->set_timesteps(10);
    EXPECT_THROW(s->step(x, -1, x), c10::IndexError);
    EXPECT_THROW(s->step(x, 10, x), c10::IndexError);
    EXPECT_THROW(s->scale_model_input(x, 10), c10::IndexError);
    ExpectValueError([&] { s->step(at::randn({1, 4, 8, 9}), 0, x); }, {"model_output shape", "sample shape"});
  }
}

TEST(SamplerTest, TimestepSpacingsFollowDiffusers) {
  SchedulerConfig cfg;
  DDIMScheduler leading(cfg);
  leading.set_timesteps(10);
  EXPECT_TRUE(at::equal(leading.timesteps(), at::arange(901, 0, -100, at::kLong)));
  cfg.timestep_spacing = "trailing";
  DDIMScheduler trailing(cfg);
  trailing.set_timesteps(10);
  EXPECT_TRUE(at::equal(trailing.timesteps(), at::arange(999, 0, -100, at::kLong)));
  cfg.timestep_spacing = "linspace";
  DDIMScheduler linspace(cfg);
  linspace.set_timesteps(10);
  EXPECT_TRUE(at::equal(linspace.timesteps(), at::arange(999, -1, -111, at::kLong)));

  // Euler: linspace (its default) keeps fractions; leading adds the offset; init sigma differs.
  EulerDiscreteScheduler euler_default{SchedulerConfig{}};
  euler_default.set_timesteps(4);
  EXPECT_TRUE(at::equal(euler_default.timesteps(), at::tensor({999.0f, 666.0f, 333.0f, 0.0f})));
  cfg.timestep_spacing = "leading";
  EulerDiscreteScheduler euler_leading(cfg);
  euler_leading.set_timesteps(10);
  EXPECT_TRUE(at::equal(euler_leading.timesteps(), at::arange(901, 0, -100, at::kFloat)));
  const double max_sigma = euler_leading.sigmas().max().item<double>();
  EXPECT_NEAR(euler_leading.init_noise_sigma(), std::sqrt(max_sigma * max_sigma + 1), 1e-5);
  EXPECT_DOUBLE_EQ(euler_default.init_noise_sigma(), euler_default.sigmas()[0].item<double>());
  // Sigmas decrease to a final 0, and at an integer timestep equal the training table.
  const at::Tensor s = euler_default.sigmas();
  ASSERT_EQ(s.size(0), 5);
  EXPECT_TRUE((s.slice(0, 1) < s.slice(0, 0, 4)).all().item<bool>());
  EXPECT_EQ(s[4].item<float>(), 0.0f);
  const double a999 = euler_default.alphas_cumprod()[999].item<double>();
  EXPECT_NEAR(s[0].item<double>(), std::sqrt((1 - a999) / a999), 1e-4);
}

// Runs a sampler loop whose model knows the clean sample x0 exactly (an oracle denoiser, in the
// configured prediction type). Every step must recover x0, and the loop must end on it.
void ExpectOracleRecoversX0(const std::string& name, const std::string& prediction_type) {
  SCOPED_TRACE(name + " / " + prediction_type);
  SchedulerConfig cfg;
  cfg.prediction_type = prediction_type;
  cfg.set_alpha_to_one = true;  // DDIM's last step lands on alpha-bar = 1, i.e. on x0 itself
  auto s = MakeSampler(name, cfg);
  s->set_timesteps(12);
  const at::Tensor x0 = at::randn({2, 4, 8, 8});
  at::Tensor x = s->initial_latents(at::randn({2, 4, 8, 8}));
  for (int64_t i = 0; i < s->num_inference_steps(); ++i) {
    // Noise level of x: alpha-bar for DDIM, 1 / (1 + sigma^2) for Euler (x = x0 + sigma eps).
    at::Tensor a, eps;
    if (name == "ddim") {
      a = s->alphas_cumprod()[s->timesteps()[i].item<int64_t>()];
      eps = (x - a.sqrt() * x0) / (1 - a).sqrt();
    } else {
      const at::Tensor sigma = dynamic_cast<EulerDiscreteScheduler&>(*s).sigmas()[i];
      a = 1 / (1 + sigma * sigma);
      eps = (x - x0) / sigma;
    }
    at::Tensor out = prediction_type == "epsilon" ? eps
                     : prediction_type == "sample" ? x0
                                                   : a.sqrt() * eps - (1 - a).sqrt() * x0;
    (void)s->scale_model_input(x, i);
    StepOutput step = s->step(out, i, x);
    EXPECT_TRUE(testing::AllClose(step.pred_original_sample, x0, 1e-3, 1e-4, "pred_original_sample at " +
                                                                              std::to_string(i)));
    x = step.prev_sample;
  }
  EXPECT_TRUE(testing::AllClose(x, x0, 1e-3, 1e-4, "final sample"));
}

TEST(SamplerTest, OracleDenoiserEndsOnTheCleanSampleForEveryPredictionType) {
  for (const char* name : {"ddim", "euler"}) {
    for (const char* type : {"epsilon", "v_prediction", "sample"}) ExpectOracleRecoversX0(name, type);
  }
}

at::Tensor RunDdim(DDIMScheduler& s, const at::Tensor& x_T, const at::Generator& gen) {
  s.set_timesteps(10);
  at::Tensor x = x_T;
  for (int64_t i = 0; i < 10; ++i) {
    at::Tensor eps = 0.1 * x + (s.timesteps()[i] / 1000) * at::ones_like(x);
    x = s.step(eps, i, x, gen).prev_sample;
  }
  return x;
}

TEST(DdimSchedulerTest, EtaZeroIsDeterministicWhateverTheGenerator) {
  const at::Tensor x_T = at::randn({2, 4, 8, 8});
  DDIMScheduler a, b;
  const at::Tensor ra = RunDdim(a, x_T, MakeGenerator(1));
  const at::Tensor rb = RunDdim(b, x_T, MakeGenerator(2));
  const at::Tensor rc = RunDdim(b, x_T, at::Generator());
  EXPECT_TRUE(at::equal(ra, rb));
  EXPECT_TRUE(at::equal(ra, rc));
}

TEST(DdimSchedulerTest, EtaAboveZeroIsReproducibleWithTheSameSeed) {
  const at::Tensor x_T = at::randn({2, 4, 8, 8});
  DDIMScheduler s(SchedulerConfig{}, /*eta=*/1.0);
  const at::Tensor r1 = RunDdim(s, x_T, MakeGenerator(77));
  const at::Tensor r2 = RunDdim(s, x_T, MakeGenerator(77));
  const at::Tensor r3 = RunDdim(s, x_T, MakeGenerator(78));
  EXPECT_TRUE(at::equal(r1, r2));
  EXPECT_FALSE(at::equal(r1, r3));
  DDIMScheduler deterministic;
  EXPECT_FALSE(at::allclose(r1, RunDdim(deterministic, x_T, at::Generator())));
  ExpectValueError([&] { RunDdim(s, x_T, at::Generator()); }, {"eta", "generator"});
  ExpectValueError([] { DDIMScheduler(SchedulerConfig{}, -0.5); }, {"eta"});
}

TEST(DdimSchedulerTest, ClippingAndThresholdingBoundThePredictedX0) {
  const at::Tensor x = 3 * at::randn({2, 4, 8, 8});
  const at::Tensor eps = at::randn({2, 4, 8, 8});
  SchedulerConfig clip;
  clip.clip_sample = true;
  clip.clip_sample_range = 0.5;
  DDIMScheduler clipped(clip);
  clipped.set_timesteps(10);
  EXPECT_LE(clipped.step(eps, 5, x).pred_original_sample.abs().max().item<float>(), 0.5f);
  SchedulerConfig thr;
  thr.thresholding = true;
  thr.sample_max_value = 2.0;
  DDIMScheduler thresholded(thr);
  thresholded.set_timesteps(10);
  const at::Tensor p = thresholded.step(eps, 5, x).pred_original_sample;
  EXPECT_LE(p.abs().max().item<float>(), 1.0f + 1e-6f);
  DDIMScheduler plain;
  plain.set_timesteps(10);
  EXPECT_GT(plain.step(eps, 5, x).pred_original_sample.abs().max().item<float>(), 1.0f);
}

TEST(EulerSchedulerTest, ReturnsPrevSampleInTheModelOutputDtype) {
  EulerDiscreteScheduler s;
  s.set_timesteps(5);
  const at::Tensor x = at::randn({1, 4, 4, 4}).to(at::kBFloat16);
  StepOutput out = s.step(at::randn({1, 4, 4, 4}).to(at::kBFloat16), 0, x);
  EXPECT_EQ(out.prev_sample.scalar_type(), at::kBFloat16);
  EXPECT_EQ(out.pred_original_sample.scalar_type(), at::kFloat);
}

TEST(SchedulerDeviceTest, CudaMatchesCpu) {
  if (!at::hasCUDA()) GTEST_SKIP() << "CUDA not available";
  const at::Device cuda(at::kCUDA, 0);
  DDPMScheduler ddpm;
  const at::Tensor x0 = at::randn({2, 4, 8, 8}), noise = at::randn({2, 4, 8, 8});
  const at::Tensor t = at::tensor({3, 900}, at::kLong);
  EXPECT_TRUE(testing::AllClose(ddpm.add_noise(x0.to(cuda), noise.to(cuda), t.to(cuda)).cpu(),
                                ddpm.add_noise(x0, noise, t), 1e-5, 1e-6, "add_noise on cuda"));
  // A CPU generator gives the same draws whatever the target device.
  EXPECT_TRUE(at::equal(ddpm.sample_noise(x0.to(cuda), MakeGenerator(5)).cpu(), ddpm.sample_noise(x0, MakeGenerator(5))));
  EXPECT_TRUE(at::equal(ddpm.sample_timesteps(3, MakeGenerator(5), cuda).cpu(), ddpm.sample_timesteps(3, MakeGenerator(5))));
  // A CUDA generator is reproducible too.
  EXPECT_TRUE(at::equal(ddpm.sample_noise(x0.to(cuda), MakeGenerator(9, cuda)),
                        ddpm.sample_noise(x0.to(cuda), MakeGenerator(9, cuda))));
  for (const char* name : {"ddim", "euler"}) {
    SCOPED_TRACE(name);
    auto s = MakeSampler(name, {});
    s->set_timesteps(8);
    at::Tensor x_cpu = s->initial_latents(noise), x_gpu = x_cpu.to(cuda);
    for (int64_t i = 0; i < 8; ++i) {
      x_cpu = s->step(0.1 * s->scale_model_input(x_cpu, i), i, x_cpu).prev_sample;
      x_gpu = s->step(0.1 * s->scale_model_input(x_gpu, i), i, x_gpu).prev_sample;
    }
    EXPECT_TRUE(x_gpu.is_cuda());
    EXPECT_TRUE(testing::AllClose(x_gpu.cpu(), x_cpu, 1e-4, 1e-5, "sampler loop on cuda"));
  }
}

}  // namespace
}  // namespace perfusion

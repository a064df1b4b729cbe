// Conformance of the rank-1 edit against vectors computed by the reference implementation
// (lucidrains/perfusion-pytorch) and an independent float64 implementation. Every *.safetensors
// case file in PERFUSION_CONFORMANCE_DIR (default ../shared/data/conformance/rank1/) is checked within
// the tolerance its metadata states; the folder's README describes the tensors.
#include <ATen/Functions.h>
#include <dirent.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <map>
#include <set>
#include <string>

#include "perfusion/rank1_edit.h"
#include "perfusion/safetensors.h"
#include "tests/engine/test_util.h"

namespace perfusion {
namespace {

using testing::AllClose;

std::string ConformanceDir() {
  return testing::EnvOr("PERFUSION_CONFORMANCE_DIR", testing::SharedDir() + "/data/conformance/rank1");
}

const std::set<std::string> kCases = {"eval_single", "multi_approx", "multi_exact", "train_sequence_key",
                                      "train_sequence_value", "toy_golden"};

std::vector<std::string> CaseFiles() {
  std::vector<std::string> out;
  const std::string dir = ConformanceDir();
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return out;
  while (dirent* e = readdir(d)) {
    std::string name = e->d_name;
    if (name.size() > 12 && name.substr(name.size() - 12) == ".safetensors") {
      auto meta = SafetensorsReader::Open(dir + "/" + name)->metadata();
      if (kCases.count(meta["case"])) out.push_back(name);
    }
  }
  closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

// One case: its own tensors, its external tensors and C, all as float64 or as stored.
struct Case {
  std::map<std::string, std::string> meta;
  std::map<std::string, at::Tensor> t;
  double rtol = 0, atol = 0;
  at::Tensor Get(const std::string& name) const {
    auto it = t.find(name);
    TORCH_CHECK(it != t.end(), "conformance case lacks tensor ", name);
    return it->second;
  }
  double Scalar(const std::string& name) const { return Get(name).to(at::kDouble).item<double>(); }
  std::vector<int64_t> Ids(const std::string& name) const {
    at::Tensor ids = Get(name).to(at::kLong).contiguous();
    return std::vector<int64_t>(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + ids.numel());
  }
};

Case LoadCase(const std::string& file) {
  Case c;
  const std::string dir = ConformanceDir();
  c.t = LoadSafetensors(dir + "/" + file, &c.meta);
  c.rtol = std::stod(c.meta.at("rtol"));
  c.atol = std::stod(c.meta.at("atol"));
  if (c.meta.count("external_tensors")) {
    auto ext = nlohmann::json::parse(c.meta["external_tensors"]);
    std::map<std::string, std::shared_ptr<const SafetensorsReader>> readers;
    for (auto it = ext.begin(); it != ext.end(); ++it) {
      const std::string f = it.value().get<std::string>();
      if (!readers.count(f)) readers[f] = SafetensorsReader::Open(dir + "/" + f);
      c.t[it.key()] = readers[f]->get(it.key());
    }
  }
  if (c.meta.count("covariance")) {
    c.t["C"] = SafetensorsReader::Open(testing::SharedDir() + "/data/" + c.meta["covariance"])->get("C");
  }
  return c;
}

class Rank1ConformanceTest : public ::testing::TestWithParam<std::string> {};

void RunEval(const Case& c, MultiConceptMode mode) {
  const at::Tensor W = c.Get("W").to(at::kFloat);
  const at::Tensor X = c.Get("X").to(at::kFloat);
  const at::Tensor i_star = c.Get("i_star").to(at::kFloat), o_star = c.Get("o_star").to(at::kFloat);
  const int64_t K = i_star.size(0);
  Rank1Edit edit(W, InvertCovariance(c.Get("C")), Rank1EditOptions().multi_concept_mode(mode), K);
  for (int64_t k = 0; k < K; ++k) edit->set_concept(k, i_star[k], o_star[k], at::Tensor());
  edit->eval();
  const int variants = c.meta.count("num_variants") ? std::stoi(c.meta.at("num_variants")) : 2;
  for (int v = 0; v < variants; ++v) {
    const std::string p = "v" + std::to_string(v) + ".";
    const GateParams gp{c.Scalar(p + "beta"), c.Scalar(p + "temperature")};
    at::Tensor y = edit->forward(X, c.Ids(p + "concept_ids"), {gp});
    EXPECT_TRUE(AllClose(y, c.Get(p + "Y"), c.rtol, c.atol, p + "Y"));
  }
  if (c.t.count("rome.Y")) {
    at::Tensor y = ApplyRome(X, W, i_star[0], o_star[0], edit->c_inv());
    EXPECT_TRUE(AllClose(y, c.Get("rome.Y"), c.rtol, c.atol, "rome.Y"));
  }
}

void RunTraining(const Case& c) {
  const bool is_key = c.meta.at("is_key_proj") == "true";
  Rank1Edit edit(c.Get("W").to(at::kFloat), InvertCovariance(c.Get("C")),
                 Rank1EditOptions()
                     .is_key_proj(is_key)
                     .input_decay(c.Scalar("decay"))
                     .train_beta(c.Scalar("beta"))
                     .train_temperature(c.Scalar("temperature")));
  edit->train();
  const int steps = std::stoi(c.meta.at("num_steps"));
  for (int s = 1; s <= steps; ++s) {
    const std::string p = "step" + std::to_string(s) + ".";
    if (edit->o_star().grad().defined()) edit->o_star().mutable_grad().zero_();
    at::Tensor y = edit->training_forward(c.Get(p + "X").to(at::kFloat), c.Get(p + "X_sup").to(at::kFloat),
                                          c.Get(p + "idx"), c.Ids("concept_ids")[0]);
    EXPECT_TRUE(AllClose(y, c.Get(p + "Y"), c.rtol, c.atol, p + "Y"));
    EXPECT_TRUE(AllClose(edit->i_star(), c.Get(p + "i_star"), c.rtol, c.atol, p + "i_star"));
    EXPECT_TRUE(AllClose(edit->o_star().detach(), c.Get(p + "o_star"), c.rtol, c.atol, p + "o_star"));
    if (!is_key) {
      y.sum().backward();
      EXPECT_TRUE(AllClose(edit->o_star().grad(), c.Get(p + "grad_o_star"), c.rtol, c.atol, p + "grad_o_star"));
    }
  }
}

void RunToy(const Case& c) {
  const at::Tensor W = c.Get("W"), X = c.Get("X"), I = c.Get("i_star"), O = c.Get("o_star");
  const at::Tensor C_inv = at::inverse(c.Get("C"));  // float64 throughout
  EXPECT_TRUE(AllClose(C_inv, c.Get("C_inv"), c.rtol, c.atol, "C_inv"));
  for (int v = 0; v < 2; ++v) {
    const std::string p = "v" + std::to_string(v) + ".";
    auto ids = c.Ids(p + "concept_ids");
    at::Tensor sel = at::tensor(ids, at::kLong);
    at::Tensor Iv = I.index_select(0, sel), Ov = O.index_select(0, sel);
    ConceptGates g = ComputeConceptGates(X, Iv, C_inv, {{c.Scalar(p + "beta"), c.Scalar(p + "temperature")}});
    EXPECT_TRUE(AllClose(g.alpha.permute({2, 0, 1}), c.Get(p + "alpha"), c.rtol, c.atol, p + "alpha"));
    EXPECT_TRUE(AllClose(g.gate.permute({2, 0, 1}), c.Get(p + "gate"), c.rtol, c.atol, p + "gate"));
    EXPECT_TRUE(AllClose(ApplyRank1Edit(X, W, Iv, Ov, g), c.Get(p + "Y"), c.rtol, c.atol, p + "Y"));
  }
  const GateParams mp{c.Scalar("multi.beta"), c.Scalar("multi.temperature")};
  ConceptGates ga = ComputeConceptGates(X, I, C_inv, {mp}, MultiConceptMode::kApproximate);
  ConceptGates ge = ComputeConceptGates(X, I, C_inv, {mp}, MultiConceptMode::kExact);
  EXPECT_TRUE(AllClose(ga.gate.permute({2, 0, 1}), c.Get("multi.gate"), c.rtol, c.atol, "multi.gate"));
  EXPECT_TRUE(AllClose(ApplyRank1Edit(X, W, I, O, ga), c.Get("multi_approx.Y"), c.rtol, c.atol, "multi_approx.Y"));
  EXPECT_TRUE(AllClose(ge.erase.permute({2, 0, 1}), c.Get("multi_exact.proj_coef"), c.rtol, c.atol, "proj_coef"));
  EXPECT_TRUE(AllClose(ApplyRank1Edit(X, W, I, O, ge), c.Get("multi_exact.Y"), c.rtol, c.atol, "multi_exact.Y"));
  EXPECT_TRUE(AllClose(ApplyRome(X, W, I[0], O[0], C_inv), c.Get("rome.Y"), c.rtol, c.atol, "rome.Y"));
}

TEST_P(Rank1ConformanceTest, MatchesReferenceVectors) {
  const Case c = LoadCase(GetParam());
  const std::string kind = c.meta.at("case");
  if (kind == "eval_single") RunEval(c, MultiConceptMode::kApproximate);
  if (kind == "multi_approx") RunEval(c, MultiConceptMode::kApproximate);
  if (kind == "multi_exact") RunEval(c, MultiConceptMode::kExact);
  if (kind == "train_sequence_key" || kind == "train_sequence_value") RunTraining(c);
  if (kind == "toy_golden") RunToy(c);
}

INSTANTIATE_TEST_SUITE_P(Files, Rank1ConformanceTest, ::testing::ValuesIn(CaseFiles()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           std::string n = info.param.substr(0, info.param.size() - 12);
                           std::replace(n.begin(), n.end(), '.', '_');
                           return n;
                         });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(Rank1ConformanceTest);

TEST(Rank1ConformanceDirTest, TheConformanceFolderHasCases) {
  if (!testing::FileExists(ConformanceDir())) GTEST_SKIP() << "no conformance folder at " << ConformanceDir();
  EXPECT_GE(CaseFiles().size(), 1u) << "no case files in " << ConformanceDir();
}

}  // namespace
}  // namespace perfusion

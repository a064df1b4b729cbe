// server/validation.{h,cc}, server/concept_blob.{h,cc}, server/auth.{h,cc}: untrusted input.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "server/auth.h"
#include "server/concept_blob.h"
#include "server/log.h"
#include "server/validation.h"
#include "tests/server/server_test_util.h"
#include "tests/server/status_matchers.h"

namespace perfusion::server {
namespace {

using ::testing::HasSubstr;
using testing::IsOk;
using testing::MakeJpeg;
using testing::MakePng;
using testing::StatusIs;
constexpr auto kInvalid = absl::StatusCode::kInvalidArgument;

TEST(InspectImageTest, ReadsPngAndJpegSizesFromHeaders) {
  ValidationLimits limits;
  auto png = InspectImage(MakePng(33, 17), limits, "images[0]");
  ASSERT_THAT(png, IsOk());
  EXPECT_EQ(png->format, ImageInfo::kPng);
  EXPECT_EQ(png->width, 33);
  EXPECT_EQ(png->height, 17);
  auto jpg = InspectImage(MakeJpeg(640, 480), limits, "images[1]");
  ASSERT_THAT(jpg, IsOk());
  EXPECT_EQ(jpg->format, ImageInfo::kJpeg);
  EXPECT_EQ(jpg->width, 640);
  EXPECT_EQ(jpg->height, 480);
}

// What the workers cannot decode is refused before the job is queued: a side over their 4096-pixel
// limit (the pixel count alone allowed 8192x1024), and CMYK JPEGs.
TEST(InspectImageTest, RefusesWhatWorkersCannotDecode) {
  ValidationLimits limits;
  EXPECT_THAT(InspectImage(MakeJpeg(8192, 1024), limits, "images[2]"),
              StatusIs(kInvalid, HasSubstr("images[2]: 8192x1024 exceeds 4096 pixels on a side")));
  EXPECT_THAT(InspectImage(MakeJpeg(4096, 1024), limits, "images[2]"), IsOk());
  std::string cmyk = MakeJpeg(64, 64);
  const size_t sof = cmyk.find("\xFF\xC0");
  ASSERT_NE(sof, std::string::npos);
  ASSERT_EQ(cmyk[sof + 9], 3);  // FF C0, length (2), precision, height (2), width (2), components
  cmyk[sof + 9] = 4;
  EXPECT_THAT(InspectImage(cmyk, limits, "images[0]"),
              StatusIs(kInvalid, HasSubstr("images[0]: CMYK JPEG is not supported")));
}

TEST(InspectImageTest, RejectsNonImagesNamingTheField) {
  ValidationLimits limits;
  EXPECT_THAT(InspectImage("GIF89a....", limits, "images[4]"),
              StatusIs(kInvalid, HasSubstr("images[4]: not a PNG or JPEG")));
  EXPECT_THAT(InspectImage("", limits, "images[0]"),
              StatusIs(kInvalid, HasSubstr("images[0]: empty")));
}

TEST(InspectImageTest, RejectsTruncatedOrCorruptedPng) {
  ValidationLimits limits;
  std::string png = MakePng(16, 16);
  EXPECT_THAT(InspectImage(png.substr(0, png.size() - 12), limits, "images[2]"),
              StatusIs(kInvalid, HasSubstr("images[2]: PNG truncated")));
  std::string flipped = png;
  flipped[45] ^= 0x40;  // inside IDAT: the chunk CRC no longer matches
  EXPECT_THAT(InspectImage(flipped, limits, "images[2]"),
              StatusIs(kInvalid, HasSubstr("bad CRC")));
}

TEST(InspectImageTest, RejectsTruncatedJpeg) {
  ValidationLimits limits;
  std::string jpg = MakeJpeg(64, 64);
  EXPECT_THAT(InspectImage(jpg.substr(0, jpg.size() - 2), limits, "images[1]"),
              StatusIs(kInvalid, HasSubstr("images[1]: JPEG truncated")));
  EXPECT_THAT(InspectImage(jpg.substr(0, 30), limits, "images[1]"),
              StatusIs(kInvalid, HasSubstr("images[1]")));
}

TEST(InspectImageTest, EnforcesByteAndPixelLimits) {
  ValidationLimits limits;
  limits.max_image_bytes = 1000;
  EXPECT_THAT(InspectImage(MakePng(64, 64), limits, "images[3]"),
              StatusIs(kInvalid, HasSubstr("images[3]: ")));
  limits.max_image_bytes = 1 << 20;
  limits.max_image_pixels = 100 * 100;
  EXPECT_THAT(InspectImage(MakeJpeg(101, 100), limits, "images[0]"),
              StatusIs(kInvalid, HasSubstr("pixels exceeds the limit")));
  EXPECT_THAT(InspectImage(MakeJpeg(100, 100), limits, "images[0]"), IsOk());
}

TEST(ValidateTest, ConceptNamesAreLowercaseSlugs) {
  EXPECT_THAT(ValidateConceptName("teddy-2_b", "concept_name"), IsOk());
  EXPECT_THAT(ValidateConceptName("Teddy", "concept_name"),
              StatusIs(kInvalid, HasSubstr("concept_name")));
  EXPECT_THAT(ValidateConceptName("-x", "concept_name"), StatusIs(kInvalid));
  EXPECT_THAT(ValidateConceptName(std::string(64, 'a'), "concept_name"), StatusIs(kInvalid));
  EXPECT_THAT(ValidateConceptName("", "concept_name"), StatusIs(kInvalid, HasSubstr("empty")));
}

TEST(ValidateTest, SuperclassMustBeOneWord) {
  EXPECT_THAT(ValidateSuperclass("dog", nullptr), IsOk());
  EXPECT_THAT(ValidateSuperclass("teddy bear", nullptr),
              StatusIs(kInvalid, HasSubstr("superclass: \"teddy bear\" must be one lowercase word")));
  EXPECT_THAT(ValidateSuperclass("", nullptr), StatusIs(kInvalid, HasSubstr("superclass")));
}

TEST(ValidateTest, SuperclassMustBeOneClipTokenWithVocab) {
  const std::string path = testing::SharedDir() + "/data/clip/vocab.json";
  if (!testing::FileExists(path)) GTEST_SKIP() << "no " << path;
  auto vocab = Vocab::Load(path);
  ASSERT_THAT(vocab, IsOk());
  EXPECT_GT(vocab->size(), 40000u);
  EXPECT_THAT(ValidateSuperclass("teapot", &*vocab), IsOk());
  EXPECT_THAT(ValidateSuperclass("plushie", &*vocab),
              StatusIs(kInvalid, HasSubstr("superclass: \"plushie\" is not a single CLIP token")));
}

TEST(ValidateTest, TrainingRequestChecksCountOptionsAndFillsDefaults) {
  ValidationLimits limits;
  TrainingRequest r;
  r.concept_name = "teddy";
  r.superclass = "toy";
  EXPECT_THAT(ValidateTrainingRequest(r, limits, nullptr, true),
              StatusIs(kInvalid, HasSubstr("images: no images")));
  r.images.assign(21, MakePng(8, 8));
  EXPECT_THAT(ValidateTrainingRequest(r, limits, nullptr, true),
              StatusIs(kInvalid, HasSubstr("images: 21 images; need 3 to 20")));
  r.images.resize(3);
  ASSERT_THAT(ValidateTrainingRequest(r, limits, nullptr, true), IsOk());
  EXPECT_EQ(r.options.steps, limits.default_train_steps);
  r.options.steps = 0;
  EXPECT_THAT(ValidateTrainingRequest(r, limits, nullptr, true),
              StatusIs(kInvalid, HasSubstr("options.steps: 0 is outside 1..5000")));
  r.options.steps = 100;
  r.priority = 10;
  EXPECT_THAT(ValidateTrainingRequest(r, limits, nullptr, true),
              StatusIs(kInvalid, HasSubstr("priority")));
  r.priority = 0;
  r.request_id = "has space";
  EXPECT_THAT(ValidateTrainingRequest(r, limits, nullptr, true),
              StatusIs(kInvalid, HasSubstr("request_id")));
}

TEST(ValidateTest, CaptionsAreOnePerImageAndNameTheConceptOnce) {
  ValidationLimits limits;
  TrainingRequest r;
  r.concept_name = "teddy";
  r.superclass = "toy";
  r.images.assign(3, MakePng(8, 8));
  r.options.captions = {"a photo of <teddy> on a beach", "<teddy> on the left", "a small <teddy>"};
  EXPECT_THAT(ValidateTrainingRequest(r, limits, nullptr, true), IsOk());
  r.options.captions.pop_back();
  EXPECT_THAT(ValidateTrainingRequest(r, limits, nullptr, true),
              StatusIs(kInvalid, HasSubstr("options.captions: 2 caption(s) for 3 image(s)")));
  // The upload stream knows the count from its header before any image arrives.
  EXPECT_THAT(ValidateCaptions(r.options.captions, 2, "teddy", "toy"), IsOk());
  r.options.captions = {"a photo of <teddy>", "a photo of a toy", "a small <teddy>"};
  EXPECT_THAT(ValidateTrainingRequest(r, limits, nullptr, true),
              StatusIs(kInvalid, HasSubstr("options.captions[1]: must name the concept exactly once as <teddy>")));
  r.options.captions[1] = "<teddy> beside <teddy>";
  EXPECT_THAT(ValidateTrainingRequest(r, limits, nullptr, true), StatusIs(kInvalid, HasSubstr("options.captions[1]")));
  r.options.captions[1] = "<teddy>" + std::string(300, 'x');
  EXPECT_THAT(ValidateTrainingRequest(r, limits, nullptr, true),
              StatusIs(kInvalid, HasSubstr("options.captions[1]: must be printable text of at most 300")));
  r.options.captions[1] = "<teddy>, a Toy, beside another";
  EXPECT_THAT(ValidateTrainingRequest(r, limits, nullptr, true),
              StatusIs(kInvalid, HasSubstr("options.captions[1]: uses the superclass word 'toy' besides <teddy>")));
  r.options.captions[1] = "<teddy> beside toy2";  // CLIP splits letters from digits: "toy" is a token here
  EXPECT_THAT(ValidateTrainingRequest(r, limits, nullptr, true),
              StatusIs(kInvalid, HasSubstr("options.captions[1]: uses the superclass word 'toy' besides <teddy>")));
  r.options.captions[1] = "<teddy> beside toys and a toyshop";  // other words are fine
  EXPECT_THAT(ValidateTrainingRequest(r, limits, nullptr, true), IsOk());
  // The superclass word takes the token's place: joined to letters it would be another word.
  for (const char* glued : {"two <teddy>s on a bed", "a hot<teddy>"}) {
    r.options.captions[1] = glued;
    EXPECT_THAT(ValidateTrainingRequest(r, limits, nullptr, true),
                StatusIs(kInvalid, HasSubstr("options.captions[1]: <teddy> must be a word of its own")))
        << glued;
  }
  r.options.captions[1] = "<teddy>'s ball, <teddy>-shaped";  // twice: refused for that, not for the joins
  EXPECT_THAT(ValidateTrainingRequest(r, limits, nullptr, true), StatusIs(kInvalid, HasSubstr("exactly once")));
  r.options.captions[1] = "<teddy>'s ball (2nd)";
  EXPECT_THAT(ValidateTrainingRequest(r, limits, nullptr, true), IsOk());
  r.options.captions[1] = "a {} photo of <teddy>";
  EXPECT_THAT(ValidateTrainingRequest(r, limits, nullptr, true),
              StatusIs(kInvalid, HasSubstr("options.captions[1]: must not contain \"{}\"")));
  r.options.captions[1] = "<teddy>\nline two";
  EXPECT_THAT(ValidateTrainingRequest(r, limits, nullptr, true), StatusIs(kInvalid, HasSubstr("options.captions[1]")));
}

TEST(PromptTest, ParsesDistinctConceptReferencesInOrder) {
  auto refs = ParsePromptReferences("<teddy> and <bike@2> with <teddy> on a beach", "prompt");
  ASSERT_THAT(refs, IsOk());
  ASSERT_EQ(refs->size(), 2u);
  EXPECT_EQ((*refs)[0].name, "teddy");
  EXPECT_EQ((*refs)[0].version, 0);
  EXPECT_EQ((*refs)[1].reference, "bike@2");
  EXPECT_EQ((*refs)[1].name, "bike");
  EXPECT_EQ((*refs)[1].version, 2);
}

TEST(PromptTest, RejectsMalformedReferencesWithOffset) {
  EXPECT_THAT(ParsePromptReferences("a <Teddy> toy", "prompt"),
              StatusIs(kInvalid, HasSubstr("prompt: malformed concept reference at offset 2")));
  EXPECT_THAT(ParsePromptReferences("a <teddy toy", "prompt"),
              StatusIs(kInvalid, HasSubstr("no closing")));
  EXPECT_THAT(ParsePromptReferences("a <teddy@0>", "prompt"), StatusIs(kInvalid));
  EXPECT_THAT(ParsePromptReferences("a <teddy@x>", "prompt"), StatusIs(kInvalid));
}

TEST(GenerationValidationTest, ConfiguredDefaultSideFillsAnUnsetSize) {
  ValidationLimits limits;
  limits.default_image_side = 512;
  GenerationRequest r;
  r.prompt = "a photo";
  ASSERT_THAT(ValidateGenerationRequest(r, limits), IsOk());
  EXPECT_EQ(r.width, 512);
  EXPECT_EQ(r.height, 512);
}

TEST(GenerationValidationTest, FillsDefaultsAndChecksRanges) {
  ValidationLimits limits;
  GenerationRequest r;
  r.prompt = "a photo of <teddy>";
  auto refs = ValidateGenerationRequest(r, limits);
  ASSERT_THAT(refs, IsOk());
  EXPECT_EQ(r.steps, 30);
  EXPECT_FALSE(r.width.has_value()) << "unset size: the worker's native size";
  EXPECT_EQ(r.num_images, 1);
  EXPECT_FLOAT_EQ(*r.guidance_scale, 7.5f);
  EXPECT_FLOAT_EQ(*r.guidance_rescale, 0.0f);
  EXPECT_EQ(r.key_lock, KeyLock::kUnspecified) << "left to the worker's model (perfusion/inference.json)";

  auto check = [&](auto mutate, const std::string& field) {
    GenerationRequest g;
    g.prompt = "a photo of <teddy>";
    mutate(g);
    EXPECT_THAT(ValidateGenerationRequest(g, limits),
                StatusIs(kInvalid, HasSubstr(field + ": ")))
        << field;
  };
  check([](GenerationRequest& g) { g.steps = 0; }, "steps");
  check([](GenerationRequest& g) { g.steps = 151; }, "steps");
  check([](GenerationRequest& g) { g.width = 0; }, "width");
  check([](GenerationRequest& g) { g.height = 2048; }, "height");
  check([](GenerationRequest& g) { g.width = 500; }, "width");
  check([](GenerationRequest& g) { g.num_images = 9; }, "num_images");
  check([](GenerationRequest& g) { g.guidance_scale = 31; }, "guidance_scale");
  check([](GenerationRequest& g) { g.guidance_rescale = 1.5f; }, "guidance_rescale");
  check([](GenerationRequest& g) { g.guidance_rescale = -0.1f; }, "guidance_rescale");
  check([](GenerationRequest& g) { g.tau = 0; }, "tau");
  check([](GenerationRequest& g) { g.beta = 1.5f; }, "beta");
  check([](GenerationRequest& g) { g.sampler = "plms"; }, "sampler");
  check([](GenerationRequest& g) { g.prompt = std::string(1001, 'a'); }, "prompt");
  check([](GenerationRequest& g) { g.prompt = ""; }, "prompt");
  check([](GenerationRequest& g) { g.negative_prompt = "<teddy>"; }, "negative_prompt");
  check([](GenerationRequest& g) { g.concepts.push_back({"bike", 0.5f, {}, KeyLock::kGlobal}); },
        "concepts[0].name");
  check([](GenerationRequest& g) { g.concepts.push_back({"teddy", {}, 2.0f, KeyLock::kGlobal}); },
        "concepts[0].tau");
}

TEST(GenerationValidationTest, RegionsAddTheirConceptsAndCheckTheirBoxes) {
  ValidationLimits limits;
  GenerationRequest r;
  r.prompt = "a <teddy> and a <bike@2>";
  r.regions = {{"a small <teddy> on the left", 0, 0, 0.5f, 1}, {"a <cup> on the right", 0.5f, 0, 1, 1}};
  r.concepts.push_back({"cup", 0.6f, {}, KeyLock::kGlobal});  // referenced by a region only
  auto refs = ValidateGenerationRequest(r, limits);
  ASSERT_THAT(refs, IsOk());
  std::vector<std::string> names;
  for (const auto& ref : *refs) names.push_back(ref.reference);
  EXPECT_EQ(names, (std::vector<std::string>{"teddy", "bike@2", "cup"})) << "the union, each once, in order";

  auto check = [&](auto mutate, const std::string& field, const std::string& words = "") {
    GenerationRequest g = r;
    mutate(g);
    EXPECT_THAT(ValidateGenerationRequest(g, limits), StatusIs(kInvalid, HasSubstr(field + ": " + words)))
        << field;
  };
  check([](GenerationRequest& g) { g.regions[1].prompt = ""; }, "regions[1].prompt", "empty");
  check([](GenerationRequest& g) { g.regions[0].prompt = "a <Bad>"; }, "regions[0].prompt",
        "malformed concept reference");
  check([](GenerationRequest& g) { g.regions[0].prompt = std::string(1001, 'a'); }, "regions[0].prompt");
  check([](GenerationRequest& g) { g.regions[1].x1 = 0.5f; }, "regions[1]", "box (x0, y0, x1, y1) = (0.5, 0, 0.5, 1)");
  check([](GenerationRequest& g) { g.regions[0].y1 = 1.5f; }, "regions[0]", "box");
  check([](GenerationRequest& g) { g.regions[0].x0 = -0.25f; }, "regions[0]", "box");
  check([](GenerationRequest& g) { g.regions[0].x1 = std::nanf(""); }, "regions[0]", "box");
  check([](GenerationRequest& g) { g.regions[0] = {"a star", 0, 0, 0, 0}; }, "regions[0]", "box");  // unset box
  check([](GenerationRequest& g) { g.regions.resize(5, {"a star", 0, 0, 1, 1}); }, "regions", "5 regions (max 4)");
  check([](GenerationRequest& g) { g.concepts.push_back({"mug", 0.5f, {}, KeyLock::kLocal}); }, "concepts[1].name",
        "\"mug\" is not referenced in the prompt or its regions");
  limits.max_concepts_per_prompt = 2;
  check([](GenerationRequest&) {}, "regions", "3 concepts referenced (max 2, the prompt's and its regions' together)");
  limits.max_concepts_per_prompt = 8;
  limits.max_regions = 0;
  check([](GenerationRequest&) {}, "regions", "2 regions (max 0)");
}

TEST(ConceptBlobTest, ParsesHeaderOfAValidBlob) {
  std::string blob = testing::MakeConceptBlob("tiny", "teddy", "toy");
  auto h = ParseConceptBlob(blob);
  ASSERT_THAT(h, IsOk());
  EXPECT_EQ(h->base_model_id, "tiny");
  EXPECT_EQ(h->name, "teddy");
  EXPECT_EQ(h->superclass, "toy");
  EXPECT_EQ(h->dtype, "F32");
  EXPECT_EQ(h->format_version, 1);
}

TEST(ConceptBlobTest, RejectsCorruptedBlobs) {
  std::string blob = testing::MakeConceptBlob("tiny", "teddy", "toy");
  EXPECT_THAT(ParseConceptBlob("PFCX" + blob.substr(4)), StatusIs(kInvalid, HasSubstr("blob: ")));
  std::string bad_len = blob;
  bad_len[7] = '\x7f';  // header length beyond the blob
  EXPECT_THAT(ParseConceptBlob(bad_len), StatusIs(kInvalid, HasSubstr("header length")));
  std::string bad_json = blob;
  bad_json[8] = '[';
  EXPECT_THAT(ParseConceptBlob(bad_json), StatusIs(kInvalid, HasSubstr("blob: ")));
  EXPECT_THAT(ParseConceptBlob(blob.substr(0, 20)), StatusIs(kInvalid));
}

TEST(ConceptBlobTest, DetectsCorruptionInTheOpaqueTensorBytes) {
  std::string blob = testing::MakeConceptBlob("tiny", "teddy", "toy");
  blob[blob.size() - 100] ^= 0x01;  // a tensor byte: only the CRC-32C trailer can tell
  EXPECT_THAT(ParseConceptBlob(blob), StatusIs(kInvalid, HasSubstr("blob: checksum mismatch")));
  blob = testing::MakeConceptBlob("tiny", "teddy", "toy");
  EXPECT_THAT(ParseConceptBlob(blob.substr(0, blob.size() - 1)), StatusIs(kInvalid));
}

// ImportConcept refuses at once what every generation would fail on later in the worker.
TEST(ConceptBlobTest, RefusesBlobsTheWorkerCouldNotUse) {
  auto Edited = [](std::function<void(nlohmann::json&)> edit) {
    testing::ConceptBlobSpec spec;
    spec.edit_header = std::move(edit);
    return ParseConceptBlob(testing::MakeConceptBlob(spec));
  };
  EXPECT_THAT(Edited([](nlohmann::json& h) { h["format_version"] = 2; }),
              StatusIs(kInvalid, HasSubstr("format version 2 is newer than this service reads (1)")));
  EXPECT_THAT(Edited([](nlohmann::json& h) { h["tensors"].erase("v_targets"); }),
              StatusIs(kInvalid, HasSubstr("missing tensor 'v_targets'")));
  EXPECT_THAT(Edited([](nlohmann::json& h) { h["layers"][0]["out_dim"] = 7; }),
              StatusIs(kInvalid, HasSubstr("tensor 'v_targets': shape is not [7]")));
  EXPECT_THAT(Edited([](nlohmann::json& h) { h["layers"][0]["out_dim"] = int64_t{1} << 62; }),
              StatusIs(kInvalid, HasSubstr("\"out_dim\" missing or not an integer")));
  EXPECT_THAT(Edited([](nlohmann::json& h) { h["tensors"]["i_star"]["data_offsets"][1] = 1 << 30; }),
              StatusIs(kInvalid, HasSubstr("tensor 'i_star': points outside the data")));
  EXPECT_THAT(Edited([](nlohmann::json& h) { h["tensors"]["embedding"]["dtype"] = "I64"; }),
              StatusIs(kInvalid, HasSubstr("dtype I64")));
  EXPECT_THAT(Edited([](nlohmann::json& h) { h.erase("format"); }),
              StatusIs(kInvalid, HasSubstr("header key \"format\" is not \"perfusion-concept\"")));
  EXPECT_THAT(Edited([](nlohmann::json& h) { h["format"] = "safetensors"; }),
              StatusIs(kInvalid, HasSubstr("\"format\"")));
  for (auto [beta, temperature] : {std::pair{0.7, 0.0}, std::pair{0.7, -1.0}, std::pair{0.7, 1e308},
                                   std::pair{5.0, 0.15}, std::pair{-0.1, 0.15}}) {
    EXPECT_THAT(Edited([&](nlohmann::json& h) { h["default_gate"] = {{"beta", beta}, {"temperature", temperature}}; }),
                StatusIs(kInvalid, HasSubstr("default_gate: beta must be in [0, 1] and temperature in (0, 1]")))
        << beta << " " << temperature;
  }
  // Stored and listed with the concept: only the engine's storage types, never a megabyte string.
  EXPECT_THAT(Edited([](nlohmann::json& h) { h["dtype"] = std::string(100000, 'x'); }),
              StatusIs(kInvalid, HasSubstr("header key \"dtype\" is \"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...\"")));
  EXPECT_THAT(Edited([](nlohmann::json& h) { h["dtype"] = "float16"; }),
              StatusIs(kInvalid, HasSubstr("(expected F32, F16 or BF16)")));
  // Bytes no tensor uses, or tensors sharing bytes: not the engine's back-to-back layout.
  EXPECT_THAT(Edited([](nlohmann::json& h) {
                auto& o = h["tensors"]["v_targets"]["data_offsets"];
                o[0] = o[0].get<uint64_t>() - 4;  // over the embedding's last value, and 4 bytes unused at the end
                o[1] = o[1].get<uint64_t>() - 4;
              }),
              StatusIs(kInvalid, HasSubstr("do not cover the data back to back (overlap")));
  EXPECT_THAT(Edited([](nlohmann::json& h) {
                // v_targets one value shorter, the layer too: the data's last 4 bytes belong to nothing.
                h["layers"][0]["out_dim"] = h["layers"][0]["out_dim"].get<int64_t>() - 1;
                h["tensors"]["v_targets"]["shape"][0] = h["layers"][0]["out_dim"];
                auto& o = h["tensors"]["v_targets"]["data_offsets"];
                o[1] = o[1].get<uint64_t>() - 4;
              }),
              StatusIs(kInvalid, HasSubstr("do not cover the data back to back (gap at byte")));
  EXPECT_THAT(Edited([](nlohmann::json& h) { h["info"]["steps"] = 400; }),
              StatusIs(kInvalid, HasSubstr("info[steps] is not a string")));
  EXPECT_THAT(Edited([](nlohmann::json& h) { h["superclass_token_id"] = -7; }),
              StatusIs(kInvalid, HasSubstr("superclass_token_id")));
  EXPECT_THAT(Edited([](nlohmann::json& h) { h.erase("default_gate"); }),
              StatusIs(kInvalid, HasSubstr("default_gate")));
  for (float value : {1e30f, -7e4f, std::nanf(""), INFINITY}) {
    testing::ConceptBlobSpec spec;
    spec.value = value;
    EXPECT_THAT(ParseConceptBlob(testing::MakeConceptBlob(spec)),
                StatusIs(kInvalid, HasSubstr("values must be finite and within +-65504")))
        << value;
  }
  {
    testing::ConceptBlobSpec zero;
    zero.value = 0.0f;  // every tensor, i_star first
    EXPECT_THAT(ParseConceptBlob(testing::MakeConceptBlob(zero)), StatusIs(kInvalid, HasSubstr("tensor 'i_star': all zeros")));
  }
  testing::ConceptBlobSpec in_range;
  in_range.value = -65504.0f;
  EXPECT_THAT(ParseConceptBlob(testing::MakeConceptBlob(in_range)), IsOk());
}

TEST(ConceptBlobTest, Crc32cMatchesTheCastagnoliCheckValue) {
  EXPECT_EQ(Crc32c("123456789"), 0xE3069283u);
}

TEST(ConceptBlobTest, Sha256MatchesKnownVector) {
  EXPECT_EQ(Sha256Hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(AuthTest, TokensMapToTenantsAndWorkersAreSeparate) {
  std::string dir = testing::MakeTempDir();
  auto tokens = testing::WriteFile(dir, "tokens", "# comment\nsecret-a acme\n\nsecret-b globex\n");
  auto workers = testing::WriteFile(dir, "workers", "worker-secret\n");
  auto auth = Authenticator::Load(tokens, workers);
  ASSERT_THAT(auth, IsOk());
  EXPECT_EQ(*auth->Tenant("Bearer secret-a"), "acme");
  EXPECT_EQ(*auth->Tenant("bearer  secret-b "), "globex");
  EXPECT_THAT(auth->Tenant(std::nullopt), StatusIs(absl::StatusCode::kUnauthenticated));
  EXPECT_THAT(auth->Tenant("Bearer nope"), StatusIs(absl::StatusCode::kUnauthenticated));
  EXPECT_THAT(auth->Tenant("Basic secret-a"), StatusIs(absl::StatusCode::kUnauthenticated));
  EXPECT_THAT(auth->Tenant("Bearer worker-secret"),
              StatusIs(absl::StatusCode::kPermissionDenied));
  EXPECT_THAT(auth->Worker("Bearer worker-secret"), IsOk());
  EXPECT_THAT(auth->Worker("Bearer secret-a"), StatusIs(absl::StatusCode::kPermissionDenied));
}

// Values come from workers (names, error messages) and clients: none may break a log line or send
// a terminal escape sequence.
TEST(LogTest, ValuesAreQuotedAndControlCharactersEscaped) {
  EXPECT_EQ(LogValue("job_1a2b"), "job_1a2b");
  EXPECT_EQ(LogValue("caf\xc3\xa9"), "caf\xc3\xa9");  // UTF-8 stays as it is
  EXPECT_EQ(LogValue(""), "\"\"");
  EXPECT_EQ(LogValue("a b"), "\"a b\"");
  EXPECT_EQ(LogValue("k=v"), "\"k=v\"");
  EXPECT_EQ(LogValue("say \"hi\" \\o/"), "\"say \\\"hi\\\" \\\\o/\"");
  EXPECT_EQ(LogValue("two\nlines\r\tx"), "\"two\\nlines\\r\\tx\"");
  EXPECT_EQ(LogValue("\x1b[31mred"), "\"\\x1b[31mred\"");
  EXPECT_EQ(LogValue(std::string("nul\0del\x7f", 8)), "\"nul\\x00del\\x7f\"");
  // C1 controls and bytes that are not UTF-8: 0x9b alone is CSI to 8-bit terminals, U+009B too.
  EXPECT_EQ(LogValue("a\x9b" "31m"), "\"a\\x9b31m\"");
  EXPECT_EQ(LogValue("a\xc2\x9b" "31m"), "\"a\\xc2\\x9b31m\"");
  EXPECT_EQ(LogValue("\xe2\x82\xac 5"), "\"\xe2\x82\xac 5\"");  // the euro sign stays
  EXPECT_EQ(LogValue("cut\xe2\x82"), "\"cut\\xe2\\x82\"");
}

TEST(AuthTest, MalformedTokenFileNamesTheLine) {
  std::string dir = testing::MakeTempDir();
  auto tokens = testing::WriteFile(dir, "tokens", "ok acme\nlonely\n");
  EXPECT_THAT(Authenticator::Load(tokens, ""),
              StatusIs(kInvalid, HasSubstr("tokens:2")));
  EXPECT_THAT(Authenticator::Load(dir + "/missing", ""),
              StatusIs(absl::StatusCode::kNotFound));
}

TEST(AuthTest, ATokenNamesOneTenantAndIsNeverAlsoAWorkerToken) {
  std::string dir = testing::MakeTempDir();
  auto tokens = testing::WriteFile(dir, "tokens", "secret-a acme\nsecret-a acme\nsecret-a globex\n");
  EXPECT_THAT(Authenticator::Load(tokens, ""),
              StatusIs(kInvalid, HasSubstr("tokens:3: this token is already tenant \"acme\"'s")));
  tokens = testing::WriteFile(dir, "tokens", "secret-a acme\nsecret-b globex\n");
  auto workers = testing::WriteFile(dir, "workers", "worker-secret\nsecret-b\n");
  EXPECT_THAT(Authenticator::Load(tokens, workers),
              StatusIs(kInvalid, HasSubstr("workers:2: this token is also a tenant token")));
  workers = testing::WriteFile(dir, "workers", "worker-secret\n");
  EXPECT_THAT(Authenticator::Load(tokens, workers), IsOk());  // a repeated line with the same tenant is fine
}

}  // namespace
}  // namespace perfusion::server

// prompt_region: a regional prompt, without LibTorch, so that the worker's engine facade
// (worker/engine.h) carries the pipeline's own type. RegionMask and the blending are in pipeline.h.
#pragma once

#include <cstddef>
#include <string>

namespace perfusion {

// A part of the image with its own prompt (regional prompting, as in MultiDiffusion and Latent
// Couple): at every denoising step the UNet also predicts the noise for this prompt, and inside
// the box that prediction replaces the request prompt's (a cell partly inside is mixed by the
// fraction inside). Every prediction is made on the same latents, so the parts stay one picture.
// It places concepts where a base model does not bind each noun to its own object:
// "a <a> to the left of a <b>" with region "a small <a> on the left" over the left half and
// "a small <b> on the right" over the right half. Each region costs one more UNet pass per image.
// (Blending the cross-attention outputs by region instead, at each attention layer, was tried on the
// tiny model and drew one object; see docs/quality.md.)
struct PromptRegion {
  std::string prompt;                     // may reference the request's concepts
  double x0 = 0, y0 = 0, x1 = 1, y1 = 1;  // the box, in fractions of width and height (0, 0: top left)
};

// Regions per request.
constexpr size_t kMaxRegions = 8;

}  // namespace perfusion

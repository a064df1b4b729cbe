// image_io: decoding untrusted image uploads, encoding PNG, and image <-> tensor conversion.
//
// Ref: PNG (ISO/IEC 15948, https://www.w3.org/TR/png/), decoded and encoded with libpng 1.6.
//
// Decoding treats its input as hostile: the size of the input and the image dimensions are checked
// against ImageLimits (the dimensions straight from IHDR, before any pixel buffer is allocated),
// libpng's errors are caught with png_set_error_fn + setjmp inside one C-style function that owns no
// C++ objects (so a longjmp never skips a destructor), and every failure raises c10::ValueError
// (TORCH_CHECK_VALUE) with a message saying why: "not a PNG", "truncated", "image of 9000x9000
// exceeds the 4096x4096 limit", a CRC error, ... Nothing is printed.
//
// Formats: PNG, and JPEG through image_jpeg.h (libjpeg-turbo; Exif orientation applied, CMYK
// refused). Other formats are named from their magic bytes and refused. Without libpng (or
// libjpeg) at configure time, DecodeImage and EncodePng raise c10::Error saying so;
// PngSupported() and JpegSupported() tell which.
//
// Colour: every PNG colour type and bit depth decodes to 8-bit RGB: palette and grey are expanded,
// 16-bit samples are scaled to 8 bits with rounding (v * 255 / 65535), and alpha (an alpha channel
// or a tRNS chunk) is composited onto WHITE: out = round((c * a + 255 * (255 - a)) / 255). gAMA,
// cHRM, sRGB and iCCP are ignored (the samples are taken as sRGB). Interlaced images are supported.
//
// Tensors: ImageToTensor gives [3, H, W] float32 in [-1, 1] on the CPU (x / 127.5 - 1);
// TensorToImage takes [3, H, W] of any float dtype on any device, clamps to [-1, 1] and rounds.
//
// Thread safety: every function is reentrant (no shared state).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace perfusion {

// Limits for decoding untrusted input. A request that needs larger images raises the limits.
struct ImageLimits {
  int64_t max_bytes = int64_t{20} << 20;   // encoded size (20 MiB)
  int max_width = 4096;                    // pixels
  int max_height = 4096;                   // pixels
  int64_t max_pixels = int64_t{16} << 20;  // width * height (16 Mi pixels = 48 MiB of RGB)
};

// An 8-bit RGB image, row-major, rgb.size() == width * height * 3.
struct Image {
  int width = 0;
  int height = 0;
  std::vector<uint8_t> rgb;

  Image() = default;
  Image(int w, int h) : width(w), height(h), rgb(static_cast<size_t>(w) * h * 3, 0) {}  // black
  Image(int w, int h, std::vector<uint8_t> bytes) : width(w), height(h), rgb(std::move(bytes)) {}
  uint8_t* at(int x, int y) { return rgb.data() + (static_cast<size_t>(y) * width + x) * 3; }
  const uint8_t* at(int x, int y) const { return rgb.data() + (static_cast<size_t>(y) * width + x) * 3; }
  bool operator==(const Image& o) const { return width == o.width && height == o.height && rgb == o.rgb; }
  bool operator!=(const Image& o) const { return !(*this == o); }
};

// True when this build can decode and encode PNG (libpng was found at configure time).
bool PngSupported();

// Decodes an encoded image (PNG or JPEG) to 8-bit RGB; see the file comment for colour handling.
// Throws c10::ValueError naming the reason for: empty input, input over limits.max_bytes, any other
// signature, dimensions over the limits (checked before allocation), truncation, CRC or zlib errors,
// corrupt JPEG data, and any other libpng or libjpeg error. Never crashes on any input.
Image DecodeImage(const std::string& bytes, const ImageLimits& limits = {});

// Encodes `image` as an 8-bit RGB, non-interlaced PNG with no ancillary chunks (no time stamp), so
// the bytes depend only on the pixels (and on the zlib version). REQUIRES: width, height >= 1 and
// rgb.size() == width * height * 3; otherwise throws c10::ValueError.
std::string EncodePng(const Image& image);

// [3, H, W] float32 on the CPU, values x / 127.5 - 1 in [-1, 1]. REQUIRES: a well-formed image.
at::Tensor ImageToTensor(const Image& image);

// Inverse of ImageToTensor: `chw` is [3, H, W] (any floating dtype, any device); values are clamped
// to [-1, 1] and mapped with round((x + 1) * 127.5). Throws c10::ValueError for another shape.
Image TensorToImage(const at::Tensor& chw);

// Resizes [C, H, W] (or [N, C, H, W]) float to [.., height, width] with bilinear interpolation
// (align_corners = false). With antialias (the default) downscaling averages over the source
// footprint (PIL-style), so a large upload does not alias. Returns the input's dtype.
at::Tensor ResizeBilinear(const at::Tensor& image, int height, int width, bool antialias = true);

// Crops the largest centred square from [C, H, W] (or [N, C, H, W]) and resizes it to size x size
// with ResizeBilinear: how an upload of any aspect ratio becomes the model's resolution.
at::Tensor CenterCropResize(const at::Tensor& image, int size);

}  // namespace perfusion

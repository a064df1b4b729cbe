#include "perfusion/image_io.h"

#include <ATen/Functions.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "perfusion/image_jpeg.h"

#ifdef PERFUSION_HAVE_PNG
#include <png.h>

#include <csetjmp>
#endif

namespace perfusion {
namespace {

constexpr uint8_t kPngSignature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};

bool StartsWith(const std::string& bytes, const char* magic, size_t n, size_t at = 0) {
  return bytes.size() >= at + n && std::memcmp(bytes.data() + at, magic, n) == 0;
}

// Names a known non-PNG format from its magic bytes, or returns nullptr.
const char* OtherFormatName(const std::string& b) {
  if (StartsWith(b, "GIF87a", 6) || StartsWith(b, "GIF89a", 6)) return "GIF";
  if (StartsWith(b, "RIFF", 4) && StartsWith(b, "WEBP", 4, 8)) return "WebP";
  if (StartsWith(b, "BM", 2)) return "BMP";
  if (StartsWith(b, "II*\0", 4) || StartsWith(b, "MM\0*", 4)) return "TIFF";
  return nullptr;
}

std::string HexPrefix(const std::string& b) {
  std::string out;
  char buf[4];
  for (size_t i = 0; i < std::min<size_t>(b.size(), 8); ++i) {
    std::snprintf(buf, sizeof buf, i ? " %02x" : "%02x", static_cast<uint8_t>(b[i]));
    out += buf;
  }
  return out;
}

uint32_t ReadBigEndian32(const std::string& b, size_t at) {
  return (uint32_t{static_cast<uint8_t>(b[at])} << 24) | (uint32_t{static_cast<uint8_t>(b[at + 1])} << 16) |
         (uint32_t{static_cast<uint8_t>(b[at + 2])} << 8) | uint32_t{static_cast<uint8_t>(b[at + 3])};
}

// Samples per pixel of a PNG colour type (0 for an invalid type: libpng rejects it later).
int64_t ChannelsOf(uint8_t color_type) {
  switch (color_type) {
    case 0: return 1;  // grey
    case 2: return 3;  // RGB
    case 3: return 1;  // palette index
    case 4: return 2;  // grey + alpha
    case 6: return 4;  // RGBA
    default: return 0;
  }
}

// Sum of the declared lengths of the IDAT chunks (CRCs are libpng's job), walking the chunk list
// until IEND or the end of the input.
int64_t IdatBytes(const std::string& b) {
  int64_t total = 0;
  for (size_t at = 8; at + 8 <= b.size();) {
    const uint32_t length = ReadBigEndian32(b, at);
    if (StartsWith(b, "IDAT", 4, at + 4)) total += length;
    if (StartsWith(b, "IEND", 4, at + 4)) break;
    at += uint64_t{length} + 12;
  }
  return total;
}

void CheckDimensions(int64_t width, int64_t height, const ImageLimits& limits) {
  TORCH_CHECK_VALUE(width >= 1 && height >= 1, "DecodeImage: invalid PNG: image of ", width, "x", height,
                    " has a zero dimension");
  TORCH_CHECK_VALUE(width <= limits.max_width && height <= limits.max_height, "DecodeImage: image of ", width,
                    "x", height, " exceeds the ", limits.max_width, "x", limits.max_height, " limit");
  TORCH_CHECK_VALUE(width * height <= limits.max_pixels, "DecodeImage: image of ", width, "x", height, " has ",
                    width * height, " pixels, over the limit of ", limits.max_pixels);
}

#ifdef PERFUSION_HAVE_PNG

// Everything the guarded libpng calls touch. Trivially destructible apart from the containers it
// points to, which the caller owns (they live in a frame a longjmp never unwinds).
struct PngReadState {
  png_structp png = nullptr;
  png_infop info = nullptr;
  const uint8_t* data = nullptr;
  size_t size = 0;
  size_t offset = 0;
  const ImageLimits* limits = nullptr;
  bool truncated = false;
  bool limit_exceeded = false;
  png_uint_32 width = 0;
  png_uint_32 height = 0;
  std::vector<uint8_t>* rgba = nullptr;
  std::vector<png_bytep>* rows = nullptr;
  char error[256] = {0};
};

struct PngWriteState {
  png_structp png = nullptr;
  png_infop info = nullptr;
  const Image* image = nullptr;
  std::string* out = nullptr;
  char error[256] = {0};
};

template <typename State>
void PngErrorFn(png_structp png, png_const_charp message) {
  auto* state = static_cast<State*>(png_get_error_ptr(png));
  if (state->error[0] == '\0') std::snprintf(state->error, sizeof state->error, "%s", message ? message : "?");
  png_longjmp(png, 1);
}

void PngWarningFn(png_structp, png_const_charp) {}  // warnings are not errors; never print

void PngReadFn(png_structp png, png_bytep out, png_size_t n) {
  auto* state = static_cast<PngReadState*>(png_get_io_ptr(png));
  if (n > state->size - state->offset) {
    state->truncated = true;
    png_error(png, "unexpected end of data");
  }
  std::memcpy(out, state->data + state->offset, n);
  state->offset += n;
}

void PngWriteFn(png_structp png, png_bytep data, png_size_t n) {
  auto* state = static_cast<PngWriteState*>(png_get_io_ptr(png));
  bool ok = true;
  try {
    state->out->append(reinterpret_cast<const char*>(data), n);
  } catch (...) {
    ok = false;
  }
  if (!ok) png_error(png, "out of memory while writing");
}

void PngFlushFn(png_structp) {}

// The only function with a setjmp for reading. It has no automatic objects with destructors, so a
// longjmp from a libpng error skips nothing (C++ [csetjmp.syn]). Returns false on a libpng error or a
// limit violation (message in state->error); a std::bad_alloc from resize() propagates normally.
bool ReadPngGuarded(PngReadState* state) {
  if (setjmp(png_jmpbuf(state->png))) return false;
  png_structp png = state->png;
  png_infop info = state->info;
  png_set_read_fn(png, state, PngReadFn);
  png_set_user_limits(png, static_cast<png_uint_32>(state->limits->max_width),
                      static_cast<png_uint_32>(state->limits->max_height));
  png_set_chunk_malloc_max(png, 8u << 20);  // ancillary chunks (text, iCCP): 8 MiB each at most
  png_set_chunk_cache_max(png, 1000);       // at most 1000 ancillary chunks
  png_read_info(png, info);

  int bit_depth = 0, color_type = 0, interlace = 0;
  png_get_IHDR(png, info, &state->width, &state->height, &bit_depth, &color_type, &interlace, nullptr, nullptr);
  const int64_t w = state->width, h = state->height;
  if (w < 1 || h < 1 || w > state->limits->max_width || h > state->limits->max_height ||
      w * h > state->limits->max_pixels) {
    state->limit_exceeded = true;
    return false;
  }
  // Any colour type and depth -> 8-bit RGBA (filler 255 when there is no alpha).
  png_set_expand(png);  // palette -> RGB, grey < 8 bits -> 8 bits, tRNS -> alpha
#ifdef PNG_READ_SCALE_16_TO_8_SUPPORTED
  png_set_scale_16(png);  // rounds: v * 255 / 65535
#else
  png_set_strip_16(png);
#endif
  png_set_gray_to_rgb(png);
  png_set_add_alpha(png, 0xff, PNG_FILLER_AFTER);
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  if (png_get_rowbytes(png, info) != static_cast<size_t>(w) * 4 || png_get_channels(png, info) != 4) {
    std::snprintf(state->error, sizeof state->error, "unsupported pixel layout after conversion");
    return false;
  }
  state->rgba->resize(static_cast<size_t>(w) * h * 4);
  state->rows->resize(h);
  for (int64_t y = 0; y < h; ++y) (*state->rows)[y] = state->rgba->data() + y * w * 4;
  png_read_image(png, state->rows->data());
  png_read_end(png, nullptr);  // checks the chunks after the image data, up to IEND
  return true;
}

bool WritePngGuarded(PngWriteState* state) {
  if (setjmp(png_jmpbuf(state->png))) return false;
  png_structp png = state->png;
  const Image& image = *state->image;
  png_set_write_fn(png, state, PngWriteFn, PngFlushFn);
  png_set_IHDR(png, state->info, static_cast<png_uint_32>(image.width), static_cast<png_uint_32>(image.height), 8,
               PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_set_compression_level(png, 6);
  png_write_info(png, state->info);
  for (int y = 0; y < image.height; ++y) png_write_row(png, image.at(0, y));
  png_write_end(png, nullptr);
  return true;
}

struct ReadStructs {
  png_structp png = nullptr;
  png_infop info = nullptr;
  ~ReadStructs() {
    if (png != nullptr) png_destroy_read_struct(&png, info ? &info : nullptr, nullptr);
  }
};

struct WriteStructs {
  png_structp png = nullptr;
  png_infop info = nullptr;
  ~WriteStructs() {
    if (png != nullptr) png_destroy_write_struct(&png, info ? &info : nullptr);
  }
};

#endif  // PERFUSION_HAVE_PNG

}  // namespace

bool PngSupported() {
#ifdef PERFUSION_HAVE_PNG
  return true;
#else
  return false;
#endif
}

Image DecodeImage(const std::string& bytes, const ImageLimits& limits) {
  TORCH_CHECK_VALUE(!bytes.empty(), "DecodeImage: empty input (0 bytes); send a PNG or JPEG");
  TORCH_CHECK_VALUE(static_cast<int64_t>(bytes.size()) <= limits.max_bytes, "DecodeImage: input of ",
                    bytes.size(), " bytes exceeds the limit of ", limits.max_bytes, " bytes");
  if (StartsWith(bytes, "\xff\xd8\xff", 3)) return DecodeJpeg(bytes, limits);
  if (!StartsWith(bytes, reinterpret_cast<const char*>(kPngSignature), 8)) {
    const char* other = OtherFormatName(bytes);
    TORCH_CHECK_VALUE(other == nullptr, "DecodeImage: not a PNG or JPEG (", other, " is not supported); send PNG or JPEG");
    TORCH_CHECK_VALUE(bytes.size() >= 8 || !StartsWith(bytes, reinterpret_cast<const char*>(kPngSignature),
                                                       bytes.size()),
                      "DecodeImage: truncated PNG (", bytes.size(), " bytes, shorter than the signature)");
    TORCH_CHECK_VALUE(false, "DecodeImage: not a PNG or JPEG (signature ", HexPrefix(bytes), ")");
  }
  // IHDR is always the first chunk: check the dimensions before libpng sees (or allocates) anything.
  TORCH_CHECK_VALUE(bytes.size() >= 33, "DecodeImage: truncated PNG (", bytes.size(),
                    " bytes, too short for the IHDR chunk)");
  TORCH_CHECK_VALUE(ReadBigEndian32(bytes, 8) == 13 && StartsWith(bytes, "IHDR", 4, 12),
                    "DecodeImage: invalid PNG: the first chunk is not a 13-byte IHDR");
  const int64_t width = ReadBigEndian32(bytes, 16), height = ReadBigEndian32(bytes, 20);
  CheckDimensions(width, height, limits);
  // Deflate expands at most 1032:1, so the IDAT chunks must hold at least 1/1032 of the pixel bytes.
  // This stops a 100-byte upload from making us allocate for a 4096x4096 image it cannot contain.
  const int64_t bits_per_pixel = int64_t{static_cast<uint8_t>(bytes[24])} * ChannelsOf(static_cast<uint8_t>(bytes[25]));
  const int64_t pixel_bytes = (width * height * bits_per_pixel + 7) / 8;
  const int64_t idat_bytes = IdatBytes(bytes);
  TORCH_CHECK_VALUE(idat_bytes * 1032 + 1024 >= pixel_bytes, "DecodeImage: truncated or corrupt PNG: ", idat_bytes,
                    " bytes of image data cannot hold a ", width, "x", height, " image");

#ifdef PERFUSION_HAVE_PNG
  std::vector<uint8_t> rgba;
  std::vector<png_bytep> rows;
  PngReadState state;
  state.data = reinterpret_cast<const uint8_t*>(bytes.data());
  state.size = bytes.size();
  state.limits = &limits;
  state.rgba = &rgba;
  state.rows = &rows;
  ReadStructs structs;
  structs.png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &state, PngErrorFn<PngReadState>, PngWarningFn);
  TORCH_CHECK(structs.png != nullptr, "DecodeImage: png_create_read_struct failed");
  structs.info = png_create_info_struct(structs.png);
  TORCH_CHECK(structs.info != nullptr, "DecodeImage: png_create_info_struct failed");
  state.png = structs.png;
  state.info = structs.info;
  if (!ReadPngGuarded(&state)) {
    if (state.limit_exceeded) CheckDimensions(state.width, state.height, limits);
    TORCH_CHECK_VALUE(!state.truncated, "DecodeImage: truncated PNG (input ended after ", bytes.size(),
                      " bytes)");
    TORCH_CHECK_VALUE(false, "DecodeImage: invalid PNG: ", state.error);
  }
  // RGBA -> RGB, alpha composited onto white.
  Image image(static_cast<int>(state.width), static_cast<int>(state.height));
  const size_t n = static_cast<size_t>(image.width) * image.height;
  for (size_t i = 0; i < n; ++i) {
    const uint32_t a = rgba[i * 4 + 3];
    for (int c = 0; c < 3; ++c) {
      const uint32_t v = rgba[i * 4 + c];
      image.rgb[i * 3 + c] = a == 255 ? static_cast<uint8_t>(v)
                                      : static_cast<uint8_t>((v * a + 255u * (255u - a) + 127u) / 255u);
    }
  }
  return image;
#else
  TORCH_CHECK(false, "DecodeImage: PNG is not supported by this build (libpng was not found at configure time)");
#endif
}

std::string EncodePng(const Image& image) {
  TORCH_CHECK_VALUE(image.width >= 1 && image.height >= 1, "EncodePng: image of ", image.width, "x",
                    image.height, " has a zero or negative dimension");
  TORCH_CHECK_VALUE(image.rgb.size() == static_cast<size_t>(image.width) * image.height * 3,
                    "EncodePng: image of ", image.width, "x", image.height, " needs ",
                    static_cast<size_t>(image.width) * image.height * 3, " RGB bytes, got ", image.rgb.size());
#ifdef PERFUSION_HAVE_PNG
  std::string out;
  PngWriteState state;
  state.image = &image;
  state.out = &out;
  WriteStructs structs;
  structs.png = png_create_write_struct(PNG_LIBPNG_VER_STRING, &state, PngErrorFn<PngWriteState>, PngWarningFn);
  TORCH_CHECK(structs.png != nullptr, "EncodePng: png_create_write_struct failed");
  structs.info = png_create_info_struct(structs.png);
  TORCH_CHECK(structs.info != nullptr, "EncodePng: png_create_info_struct failed");
  state.png = structs.png;
  state.info = structs.info;
  TORCH_CHECK(WritePngGuarded(&state), "EncodePng: libpng error: ", state.error);
  return out;
#else
  TORCH_CHECK(false, "EncodePng: PNG is not supported by this build (libpng was not found at configure time)");
#endif
}

at::Tensor ImageToTensor(const Image& image) {
  TORCH_CHECK_VALUE(image.width >= 1 && image.height >= 1 &&
                        image.rgb.size() == static_cast<size_t>(image.width) * image.height * 3,
                    "ImageToTensor: malformed image ", image.width, "x", image.height, " with ", image.rgb.size(),
                    " bytes");
  auto hwc = at::from_blob(const_cast<uint8_t*>(image.rgb.data()), {image.height, image.width, 3}, at::kByte);
  return hwc.permute({2, 0, 1}).to(at::kFloat).div_(127.5).sub_(1.0).contiguous();  // [3, H, W]
}

Image TensorToImage(const at::Tensor& chw) {
  TORCH_CHECK_VALUE(chw.defined() && chw.dim() == 3 && chw.size(0) == 3,
                    "TensorToImage: expected a [3, H, W] tensor, got ", chw.defined() ? chw.sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(at::isFloatingType(chw.scalar_type()), "TensorToImage: expected a floating tensor, got ",
                    chw.scalar_type());
  TORCH_CHECK_VALUE(chw.size(1) >= 1 && chw.size(2) >= 1, "TensorToImage: empty image ", chw.sizes());
  auto hwc = chw.detach()
                 .to(at::kCPU, at::kFloat)
                 .clamp(-1.0, 1.0)
                 .add(1.0)
                 .mul(127.5)
                 .round()
                 .to(at::kByte)
                 .permute({1, 2, 0})
                 .contiguous();  // [H, W, 3]
  Image image(static_cast<int>(chw.size(2)), static_cast<int>(chw.size(1)));
  std::memcpy(image.rgb.data(), hwc.data_ptr<uint8_t>(), image.rgb.size());
  return image;
}

at::Tensor ResizeBilinear(const at::Tensor& image, int height, int width, bool antialias) {
  TORCH_CHECK_VALUE(image.defined() && (image.dim() == 3 || image.dim() == 4),
                    "ResizeBilinear: expected [C, H, W] or [N, C, H, W], got ",
                    image.defined() ? image.sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(at::isFloatingType(image.scalar_type()), "ResizeBilinear: expected a floating tensor, got ",
                    image.scalar_type());
  TORCH_CHECK_VALUE(height >= 1 && width >= 1, "ResizeBilinear: target ", height, "x", width, " is empty");
  const auto dtype = image.scalar_type();
  const bool batched = image.dim() == 4;
  auto x = batched ? image : image.unsqueeze(0);  // [N, C, H, W]
  if (dtype != at::kFloat && dtype != at::kDouble) x = x.to(at::kFloat);
  if (x.size(2) == height && x.size(3) == width) return image.clone();
  const bool downscale = height < x.size(2) || width < x.size(3);
  auto y = (antialias && downscale) ? at::_upsample_bilinear2d_aa(x, {height, width}, /*align_corners=*/false)
                                    : at::upsample_bilinear2d(x, {height, width}, /*align_corners=*/false);
  if (y.scalar_type() != dtype) y = y.to(dtype);
  return batched ? y : y.squeeze(0);
}

at::Tensor CenterCropResize(const at::Tensor& image, int size) {
  TORCH_CHECK_VALUE(image.defined() && (image.dim() == 3 || image.dim() == 4),
                    "CenterCropResize: expected [C, H, W] or [N, C, H, W], got ",
                    image.defined() ? image.sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(size >= 1, "CenterCropResize: size must be >= 1, got ", size);
  const int64_t h = image.size(-2), w = image.size(-1);
  TORCH_CHECK_VALUE(h >= 1 && w >= 1, "CenterCropResize: empty image ", image.sizes());
  const int64_t side = std::min(h, w);
  auto square = image.narrow(-2, (h - side) / 2, side).narrow(-1, (w - side) / 2, side);
  return ResizeBilinear(square, size, size);
}

}  // namespace perfusion

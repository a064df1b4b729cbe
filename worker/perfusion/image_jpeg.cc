#include "perfusion/image_jpeg.h"

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#ifdef PERFUSION_HAVE_JPEG
// jpeglib.h needs size_t and FILE declared before it.
#include <csetjmp>
#include <cstddef>

#include <jpeglib.h>
#include <jerror.h>
#endif

namespace perfusion {
namespace {

#ifdef PERFUSION_HAVE_JPEG

// The orientation of an Exif APP1 payload ("Exif\0\0" + TIFF): 1..8, or 1 when absent or malformed.
int ExifOrientation(const uint8_t* p, size_t n) {
  if (n < 14 || std::memcmp(p, "Exif\0\0", 6) != 0) return 1;
  const uint8_t* t = p + 6;
  const size_t size = n - 6;
  const bool little = t[0] == 'I' && t[1] == 'I';
  if (!little && !(t[0] == 'M' && t[1] == 'M')) return 1;
  auto u16 = [&](size_t at) -> uint32_t {
    return little ? (t[at] | (uint32_t{t[at + 1]} << 8)) : ((uint32_t{t[at]} << 8) | t[at + 1]);
  };
  auto u32 = [&](size_t at) -> uint32_t {
    return little ? (u16(at) | (u16(at + 2) << 16)) : ((u16(at) << 16) | u16(at + 2));
  };
  if (u16(2) != 42) return 1;
  const uint32_t ifd = u32(4);
  if (ifd > size || size - ifd < 2) return 1;
  const uint32_t entries = u16(ifd);
  for (uint32_t e = 0; e < entries; ++e) {
    const size_t at = ifd + 2 + size_t{e} * 12;
    if (at + 12 > size) return 1;
    if (u16(at) == 0x0112 && u16(at + 2) == 3) {  // Orientation, SHORT
      const uint32_t v = u16(at + 8);
      return v >= 1 && v <= 8 ? static_cast<int>(v) : 1;
    }
  }
  return 1;
}

// `image` turned upright from Exif orientation `o` (2: mirrored, 3: 180 degrees, 4: flipped,
// 5: transposed, 6: stored 90 degrees counter-clockwise, 7: transversed, 8: stored 90 clockwise).
Image Orient(const Image& image, int o) {
  if (o <= 1 || o > 8) return image;
  const bool swap = o >= 5;
  const int w = image.width, h = image.height;
  Image out(swap ? h : w, swap ? w : h);
  for (int y = 0; y < out.height; ++y) {
    for (int x = 0; x < out.width; ++x) {
      int sx = x, sy = y;  // the stored pixel shown at (x, y)
      switch (o) {
        case 2: sx = w - 1 - x; break;
        case 3: sx = w - 1 - x; sy = h - 1 - y; break;
        case 4: sy = h - 1 - y; break;
        case 5: sx = y; sy = x; break;
        case 6: sx = y; sy = h - 1 - x; break;
        case 7: sx = w - 1 - y; sy = h - 1 - x; break;
        case 8: sx = w - 1 - y; sy = x; break;
      }
      std::memcpy(out.at(x, y), image.at(sx, sy), 3);
    }
  }
  return out;
}

constexpr int kMaxScans = 500;

// Everything the guarded libjpeg calls touch. Trivially destructible apart from the vector it
// points to, which the caller owns (it lives in a frame a longjmp never unwinds).
struct JpegState {
  jpeg_decompress_struct cinfo;
  jpeg_error_mgr err;  // libjpeg reaches the state through cinfo.client_data
  jpeg_progress_mgr progress;
  std::jmp_buf jump;
  const uint8_t* data = nullptr;
  size_t size = 0;
  const ImageLimits* limits = nullptr;
  std::vector<uint8_t>* rgb = nullptr;
  bool created = false;
  bool limit_exceeded = false;
  bool cmyk = false;
  int64_t width = 0;
  int64_t height = 0;
  int orientation = 1;
  char error[JMSG_LENGTH_MAX] = {0};
};

JpegState* StateOf(j_common_ptr cinfo) { return static_cast<JpegState*>(cinfo->client_data); }

void JpegErrorExit(j_common_ptr cinfo) {
  JpegState* s = StateOf(cinfo);
  if (s->error[0] == '\0') (*cinfo->err->format_message)(cinfo, s->error);
  std::longjmp(s->jump, 1);
}

// Warnings (level -1) mostly mean corrupt or missing data, which libjpeg would fill with grey: an
// error for a training image. A few lose nothing and are common in cameras' and editors' files:
// stray bytes between segments (often two before EOI), a JFIF header of a newer revision, an ICC
// profile marker it cannot read (colours are then taken as sRGB), scanlines past the end. Those are ignored, as every viewer does.
// Trace messages (level >= 0) are ignored. Nothing is printed.
void JpegEmitMessage(j_common_ptr cinfo, int level) {
  if (level >= 0) return;
  switch (cinfo->err->msg_code) {
    case JWRN_EXTRANEOUS_DATA:
    case JWRN_JFIF_MAJOR:
    case JWRN_TOO_MUCH_DATA:
    case JWRN_BOGUS_ICC:
      return;
    default:
      JpegErrorExit(cinfo);
  }
}

void JpegOutputMessage(j_common_ptr) {}

void JpegProgress(j_common_ptr cinfo) {
  auto* d = reinterpret_cast<j_decompress_ptr>(cinfo);
  if (d->is_decompressor && d->input_scan_number > kMaxScans) {
    std::snprintf(StateOf(cinfo)->error, JMSG_LENGTH_MAX, "progressive JPEG with more than %d scans", kMaxScans);
    std::longjmp(StateOf(cinfo)->jump, 1);
  }
}

// The only function with a setjmp. It has no automatic objects with destructors, so a longjmp from
// a libjpeg error skips nothing. Returns false on an error, a limit, or CMYK (see the flags).
bool ReadJpegGuarded(JpegState* s) {
  s->cinfo.err = jpeg_std_error(&s->err);
  s->err.error_exit = JpegErrorExit;
  s->err.emit_message = JpegEmitMessage;
  s->err.output_message = JpegOutputMessage;
  s->cinfo.client_data = s;
  if (setjmp(s->jump)) return false;
  jpeg_create_decompress(&s->cinfo);
  s->created = true;
  s->progress.progress_monitor = JpegProgress;
  s->cinfo.progress = &s->progress;
  s->cinfo.mem->max_memory_to_use = 512L << 20;
  jpeg_mem_src(&s->cinfo, s->data, static_cast<unsigned long>(s->size));
  jpeg_save_markers(&s->cinfo, JPEG_APP0 + 1, 0xffff);
  jpeg_read_header(&s->cinfo, TRUE);
  s->width = s->cinfo.image_width;
  s->height = s->cinfo.image_height;
  if (s->width < 1 || s->height < 1 || s->width > s->limits->max_width || s->height > s->limits->max_height ||
      s->width * s->height > s->limits->max_pixels) {
    s->limit_exceeded = true;
    return false;
  }
  if (s->cinfo.jpeg_color_space == JCS_CMYK || s->cinfo.jpeg_color_space == JCS_YCCK) {
    s->cmyk = true;
    return false;
  }
  for (jpeg_saved_marker_ptr m = s->cinfo.marker_list; m != nullptr; m = m->next) {
    if (m->marker == JPEG_APP0 + 1) {
      const int o = ExifOrientation(m->data, m->data_length);
      if (o != 1) s->orientation = o;
    }
  }
  s->cinfo.out_color_space = JCS_RGB;
  jpeg_start_decompress(&s->cinfo);
  if (s->cinfo.output_components != 3 || s->cinfo.output_width != s->width || s->cinfo.output_height != s->height) {
    std::snprintf(s->error, JMSG_LENGTH_MAX, "unsupported pixel layout after conversion");
    return false;
  }
  s->rgb->resize(static_cast<size_t>(s->width) * s->height * 3);
  while (s->cinfo.output_scanline < s->cinfo.output_height) {
    JSAMPROW row = s->rgb->data() + static_cast<size_t>(s->cinfo.output_scanline) * s->width * 3;
    jpeg_read_scanlines(&s->cinfo, &row, 1);
  }
  jpeg_finish_decompress(&s->cinfo);
  return true;
}

#endif  // PERFUSION_HAVE_JPEG

}  // namespace

bool JpegSupported() {
#ifdef PERFUSION_HAVE_JPEG
  return true;
#else
  return false;
#endif
}

Image DecodeJpeg(const std::string& bytes, const ImageLimits& limits) {
#ifdef PERFUSION_HAVE_JPEG
  std::vector<uint8_t> rgb;
  JpegState state;
  state.data = reinterpret_cast<const uint8_t*>(bytes.data());
  state.size = bytes.size();
  state.limits = &limits;
  state.rgb = &rgb;
  const bool ok = ReadJpegGuarded(&state);
  if (state.created) jpeg_destroy_decompress(&state.cinfo);
  if (!ok) {
    TORCH_CHECK_VALUE(!state.limit_exceeded, "DecodeImage: image of ", state.width, "x", state.height,
                      " exceeds the ", limits.max_width, "x", limits.max_height, " limit of ", limits.max_pixels,
                      " pixels, or has a zero dimension");
    TORCH_CHECK_VALUE(!state.cmyk, "DecodeImage: CMYK JPEG is not supported; send an RGB or greyscale image");
    TORCH_CHECK_VALUE(false, "DecodeImage: invalid JPEG: ", state.error);
  }
  return Orient(Image(static_cast<int>(state.width), static_cast<int>(state.height), std::move(rgb)),
                state.orientation);
#else
  (void)bytes;
  (void)limits;
  TORCH_CHECK(false, "DecodeImage: JPEG is not supported by this build (libjpeg was not found at configure time); "
                     "send PNG");
#endif
}

}  // namespace perfusion

#include "perfusion/image_io.h"

#include <ATen/Functions.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "perfusion/shapes_world.h"  // SplitMix64
#include "tests/engine/test_util.h"

#ifdef PERFUSION_HAVE_PNG
#include <png.h>
#endif
#ifdef PERFUSION_HAVE_JPEG
#include <cstdio>
#include <cstdlib>

#include <jpeglib.h>

#include "perfusion/image_jpeg.h"
#endif

namespace perfusion {
namespace {

#define SKIP_WITHOUT_PNG() \
  if (!PngSupported()) GTEST_SKIP() << "libpng not found at configure time"

Image RandomImage(int w, int h, uint64_t seed) {
  SplitMix64 rng(seed);
  Image im(w, h);
  for (auto& b : im.rgb) b = static_cast<uint8_t>(rng.Next() >> 56);
  return im;
}

// Expects `fn` to throw c10::ValueError whose message contains `needle`.
template <typename Fn>
void ExpectValueError(Fn fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "expected c10::ValueError containing '" << needle << "'";
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find(needle), std::string::npos)
        << "message: " << e.what_without_backtrace();
  }
}

uint32_t Crc32(const uint8_t* data, size_t n) {
  uint32_t crc = 0xffffffffu;
  for (size_t i = 0; i < n; ++i) {
    crc ^= data[i];
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1u)));
  }
  return crc ^ 0xffffffffu;
}

void PutBigEndian32(std::string* s, size_t at, uint32_t v) {
  (*s)[at] = static_cast<char>(v >> 24);
  (*s)[at + 1] = static_cast<char>(v >> 16);
  (*s)[at + 2] = static_cast<char>(v >> 8);
  (*s)[at + 3] = static_cast<char>(v);
}

uint32_t GetBigEndian32(const std::string& s, size_t at) {
  return (uint32_t(uint8_t(s[at])) << 24) | (uint32_t(uint8_t(s[at + 1])) << 16) |
         (uint32_t(uint8_t(s[at + 2])) << 8) | uint32_t(uint8_t(s[at + 3]));
}

struct Chunk {
  size_t offset;  // of the length field
  uint32_t length;
  std::string type;
};

std::vector<Chunk> Chunks(const std::string& png) {
  std::vector<Chunk> out;
  for (size_t at = 8; at + 12 <= png.size();) {
    const uint32_t len = GetBigEndian32(png, at);
    out.push_back({at, len, png.substr(at + 4, 4)});
    at += 12 + len;
  }
  return out;
}

// Recomputes the CRC of the chunk at `c` (after editing its type or data).
void FixCrc(std::string* png, const Chunk& c) {
  if (c.offset + 12 + c.length > png->size()) return;
  const uint32_t crc = Crc32(reinterpret_cast<const uint8_t*>(png->data()) + c.offset + 4, 4 + c.length);
  PutBigEndian32(png, c.offset + 8 + c.length, crc);
}

// A PNG whose IHDR claims width x height, with a tiny (wrong-sized) IDAT and valid CRCs.
std::string ForgedPng(uint32_t width, uint32_t height) {
  std::string png("\x89PNG\r\n\x1a\n", 8);
  std::string ihdr("\0\0\0\x0dIHDR", 8);
  ihdr += std::string(13, '\0');
  PutBigEndian32(&ihdr, 8, width);
  PutBigEndian32(&ihdr, 12, height);
  ihdr[16] = 8;  // bit depth
  ihdr[17] = 2;  // RGB
  ihdr += std::string(4, '\0');
  png += ihdr;
  FixCrc(&png, {8, 13, "IHDR"});
  // IDAT: a zlib stream of a few zero bytes (not enough for the image).
  const std::string idat_data("\x78\x9c\x63\x00\x00\x00\x01\x00\x01", 9);
  std::string idat(4, '\0');
  PutBigEndian32(&idat, 0, static_cast<uint32_t>(idat_data.size()));
  idat += "IDAT" + idat_data + std::string(4, '\0');
  const size_t idat_at = png.size();
  png += idat;
  FixCrc(&png, {idat_at, static_cast<uint32_t>(idat_data.size()), "IDAT"});
  png += std::string("\0\0\0\0IEND\xae\x42\x60\x82", 12);
  return png;
}

#ifdef PERFUSION_HAVE_PNG
// Writes a PNG with libpng directly, for colour types and depths EncodePng never produces.
// `rows` holds packed rows in the PNG's own format (16-bit samples big-endian).
struct RawPng {
  int width = 0, height = 0, bit_depth = 8, color_type = PNG_COLOR_TYPE_RGB;
  bool interlace = false;
  std::vector<png_color> palette;
  std::vector<uint8_t> trns;  // palette alpha
  std::vector<std::vector<uint8_t>> rows;
};

void AppendFn(png_structp png, png_bytep data, png_size_t n) {
  static_cast<std::string*>(png_get_io_ptr(png))->append(reinterpret_cast<const char*>(data), n);
}

std::string WriteRawPng(const RawPng& raw) {
  std::string out;
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png_create_info_struct(png);
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    ADD_FAILURE() << "libpng failed to write the test image";
    return "";
  }
  png_set_write_fn(png, &out, AppendFn, nullptr);
  png_set_IHDR(png, info, raw.width, raw.height, raw.bit_depth, raw.color_type,
               raw.interlace ? PNG_INTERLACE_ADAM7 : PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT,
               PNG_FILTER_TYPE_DEFAULT);
  if (!raw.palette.empty()) png_set_PLTE(png, info, raw.palette.data(), static_cast<int>(raw.palette.size()));
  if (!raw.trns.empty()) png_set_tRNS(png, info, raw.trns.data(), static_cast<int>(raw.trns.size()), nullptr);
  png_write_info(png, info);
  std::vector<png_bytep> rows;
  for (const auto& r : raw.rows) rows.push_back(const_cast<png_bytep>(r.data()));
  png_write_image(png, rows.data());
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  return out;
}
#endif

TEST(ImageIoTest, PngRoundTripIsBitExact) {
  SKIP_WITHOUT_PNG();
  for (auto [w, h] : {std::pair{1, 1}, std::pair{37, 23}, std::pair{64, 64}, std::pair{5, 300}}) {
    const Image im = RandomImage(w, h, 17 + w);
    const Image back = DecodeImage(EncodePng(im));
    EXPECT_EQ(back.width, w);
    EXPECT_EQ(back.height, h);
    EXPECT_TRUE(back == im) << w << "x" << h;
  }
}

TEST(ImageIoTest, EncodeIsDeterministicWithoutTimestamps) {
  SKIP_WITHOUT_PNG();
  const Image im = RandomImage(20, 10, 3);
  const std::string a = EncodePng(im), b = EncodePng(im);
  EXPECT_EQ(a, b);
  std::vector<std::string> types;
  for (const auto& c : Chunks(a)) types.push_back(c.type);
  ASSERT_GE(types.size(), 3u);
  EXPECT_EQ(types.front(), "IHDR");
  EXPECT_EQ(types.back(), "IEND");
  for (size_t i = 1; i + 1 < types.size(); ++i) EXPECT_EQ(types[i], "IDAT");
}

TEST(ImageIoTest, EncodeRejectsMalformedImages) {
  Image empty;
  ExpectValueError([&] { EncodePng(empty); }, "zero or negative dimension");
  Image short_buffer(4, 4);
  short_buffer.rgb.resize(10);
  ExpectValueError([&] { EncodePng(short_buffer); }, "needs 48 RGB bytes, got 10");
}

#ifdef PERFUSION_HAVE_PNG
TEST(ImageIoTest, DecodesEightBitGrayscale) {
  RawPng raw;
  raw.width = 16;
  raw.height = 2;
  raw.color_type = PNG_COLOR_TYPE_GRAY;
  for (int y = 0; y < 2; ++y) {
    std::vector<uint8_t> row;
    for (int x = 0; x < 16; ++x) row.push_back(static_cast<uint8_t>(x * 16 + y));
    raw.rows.push_back(row);
  }
  const Image im = DecodeImage(WriteRawPng(raw));
  ASSERT_EQ(im.width, 16);
  for (int y = 0; y < 2; ++y) {
    for (int x = 0; x < 16; ++x) {
      for (int c = 0; c < 3; ++c) EXPECT_EQ(im.at(x, y)[c], x * 16 + y);
    }
  }
}

TEST(ImageIoTest, DecodesOneBitGrayscale) {
  RawPng raw;
  raw.width = 9;
  raw.height = 1;
  raw.bit_depth = 1;
  raw.color_type = PNG_COLOR_TYPE_GRAY;
  raw.rows = {{0b10100000, 0b10000000}};  // pixels 1 0 1 0 0 0 0 0 1
  const Image im = DecodeImage(WriteRawPng(raw));
  const int expected[9] = {255, 0, 255, 0, 0, 0, 0, 0, 255};
  for (int x = 0; x < 9; ++x) EXPECT_EQ(im.at(x, 0)[1], expected[x]) << x;
}

TEST(ImageIoTest, DecodesSixteenBitGrayscaleWithRounding) {
  RawPng raw;
  raw.width = 5;
  raw.height = 1;
  raw.bit_depth = 16;
  raw.color_type = PNG_COLOR_TYPE_GRAY;
  const uint16_t values[5] = {0, 65535, 257 * 100, 128, 129};
  std::vector<uint8_t> row;
  for (uint16_t v : values) {
    row.push_back(static_cast<uint8_t>(v >> 8));
    row.push_back(static_cast<uint8_t>(v & 0xff));
  }
  raw.rows = {row};
  const Image im = DecodeImage(WriteRawPng(raw));
  for (int x = 0; x < 5; ++x) {
    const int expected = static_cast<int>((values[x] * 255.0 / 65535.0) + 0.5);
    EXPECT_EQ(im.at(x, 0)[0], expected) << "16-bit value " << values[x];
  }
}

TEST(ImageIoTest, DecodesSixteenBitRgb) {
  RawPng raw;
  raw.width = 2;
  raw.height = 1;
  raw.bit_depth = 16;
  raw.rows = {{0xff, 0xff, 0x00, 0x00, 0x80, 0x80, /**/ 0x12, 0x12, 0x34, 0x34, 0x56, 0x56}};
  const Image im = DecodeImage(WriteRawPng(raw));
  const uint8_t expected[6] = {0xff, 0x00, 0x80, 0x12, 0x34, 0x56};  // 0xXXXX = 257 * 0xXX exactly
  EXPECT_EQ(std::vector<uint8_t>(im.rgb.begin(), im.rgb.end()), std::vector<uint8_t>(expected, expected + 6));
}

TEST(ImageIoTest, DecodesPaletteWithTransparencyOnWhite) {
  RawPng raw;
  raw.width = 4;
  raw.height = 1;
  raw.bit_depth = 2;
  raw.color_type = PNG_COLOR_TYPE_PALETTE;
  raw.palette = {{10, 20, 30}, {200, 100, 50}, {0, 0, 0}, {255, 0, 0}};
  raw.trns = {255, 255, 0, 128};       // entry 2 transparent, entry 3 half
  raw.rows = {{0b00011011}};           // indices 0 1 2 3
  const Image im = DecodeImage(WriteRawPng(raw));
  auto px = [&](int x) { return std::vector<int>{im.at(x, 0)[0], im.at(x, 0)[1], im.at(x, 0)[2]}; };
  EXPECT_EQ(px(0), (std::vector<int>{10, 20, 30}));
  EXPECT_EQ(px(1), (std::vector<int>{200, 100, 50}));
  EXPECT_EQ(px(2), (std::vector<int>{255, 255, 255}));  // transparent -> white
  // (255*128 + 255*127) / 255 = 255; (0*128 + 255*127 + 127) / 255 = 127.
  EXPECT_EQ(px(3), (std::vector<int>{255, 127, 127}));
}

TEST(ImageIoTest, CompositesRgbaAndGrayAlphaOntoWhite) {
  RawPng rgba;
  rgba.width = 3;
  rgba.height = 1;
  rgba.color_type = PNG_COLOR_TYPE_RGB_ALPHA;
  rgba.rows = {{0, 0, 0, 0, /**/ 40, 80, 120, 255, /**/ 0, 100, 200, 51}};
  Image im = DecodeImage(WriteRawPng(rgba));
  EXPECT_EQ(im.at(0, 0)[0], 255);
  EXPECT_EQ(im.at(0, 0)[2], 255);
  EXPECT_EQ(im.at(1, 0)[0], 40);
  EXPECT_EQ(im.at(1, 0)[1], 80);
  EXPECT_EQ(im.at(1, 0)[2], 120);
  for (int c = 0; c < 3; ++c) {
    const int v = rgba.rows[0][8 + c];
    EXPECT_EQ(im.at(2, 0)[c], (v * 51 + 255 * 204 + 127) / 255) << c;
  }
  RawPng ga;
  ga.width = 1;
  ga.height = 1;
  ga.color_type = PNG_COLOR_TYPE_GRAY_ALPHA;
  ga.rows = {{0, 0}};
  im = DecodeImage(WriteRawPng(ga));
  EXPECT_EQ(im.at(0, 0)[1], 255);
}

TEST(ImageIoTest, DecodesInterlacedLikeNonInterlaced) {
  RawPng raw;
  raw.width = 13;
  raw.height = 11;
  const Image src = RandomImage(13, 11, 5);
  for (int y = 0; y < 11; ++y) raw.rows.emplace_back(src.at(0, y), src.at(0, y) + 13 * 3);
  raw.interlace = true;
  EXPECT_TRUE(DecodeImage(WriteRawPng(raw)) == src);
}
#endif  // PERFUSION_HAVE_PNG

#ifdef PERFUSION_HAVE_JPEG
// A JPEG of `image` made with libjpeg: quality 95, 4:4:4, `components` 3 (YCbCr), 1 (the
// image's red channel as grey) or 4 (CMYK, K = 0), progressive or not, with `app1` (an Exif payload) when not empty.
std::string EncodeJpeg(const Image& image, int components = 3, bool progressive = false,
                       const std::string& app1 = "") {
  jpeg_compress_struct c;
  jpeg_error_mgr err;
  c.err = jpeg_std_error(&err);
  jpeg_create_compress(&c);
  unsigned char* buffer = nullptr;
  unsigned long size = 0;
  jpeg_mem_dest(&c, &buffer, &size);
  c.image_width = image.width;
  c.image_height = image.height;
  c.input_components = components;
  c.in_color_space = components == 3 ? JCS_RGB : components == 4 ? JCS_CMYK : JCS_GRAYSCALE;
  jpeg_set_defaults(&c);
  jpeg_set_quality(&c, 95, TRUE);
  for (int i = 0; i < c.num_components; ++i) c.comp_info[i].h_samp_factor = c.comp_info[i].v_samp_factor = 1;
  if (progressive) jpeg_simple_progression(&c);
  jpeg_start_compress(&c, TRUE);
  if (!app1.empty()) {
    jpeg_write_marker(&c, JPEG_APP0 + 1, reinterpret_cast<const JOCTET*>(app1.data()), app1.size());
  }
  std::vector<uint8_t> row(static_cast<size_t>(image.width) * components);
  while (c.next_scanline < c.image_height) {
    const int y = static_cast<int>(c.next_scanline);
    for (int x = 0; x < image.width; ++x) {
      for (int k = 0; k < components; ++k) {
        row[static_cast<size_t>(x) * components + k] = k < 3 ? image.at(x, y)[k] : 0;
      }
    }
    JSAMPROW r = row.data();
    jpeg_write_scanlines(&c, &r, 1);
  }
  jpeg_finish_compress(&c);
  jpeg_destroy_compress(&c);
  std::string out(reinterpret_cast<const char*>(buffer), size);
  free(buffer);
  return out;
}

// A smooth image (JPEG keeps it within a few levels): red ramps with x, green with y.
Image Gradient(int w, int h) {
  Image im(w, h);
  for (int y = 0; y < h; ++y) {
    for (int x = 0; x < w; ++x) {
      im.at(x, y)[0] = static_cast<uint8_t>(x * 255 / (w - 1));
      im.at(x, y)[1] = static_cast<uint8_t>(y * 255 / (h - 1));
      im.at(x, y)[2] = 96;
    }
  }
  return im;
}

double MeanAbsDiff(const Image& a, const Image& b) {
  EXPECT_EQ(a.width, b.width);
  EXPECT_EQ(a.height, b.height);
  if (a.rgb.size() != b.rgb.size()) return 1e9;
  double total = 0;
  for (size_t i = 0; i < a.rgb.size(); ++i) total += std::abs(int{a.rgb[i]} - int{b.rgb[i]});
  return total / static_cast<double>(a.rgb.size());
}

// An Exif APP1 payload whose IFD0 holds only the orientation tag (big-endian TIFF).
std::string ExifWithOrientation(int orientation) {
  const unsigned char tiff[] = {'M', 'M', 0, 42, 0, 0, 0, 8,  // header, IFD0 at 8
                                0, 1,                          // one entry
                                0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, static_cast<unsigned char>(orientation), 0, 0,
                                0, 0, 0, 0};                   // no next IFD
  return std::string("Exif\0\0", 6) + std::string(reinterpret_cast<const char*>(tiff), sizeof tiff);
}

TEST(ImageIoJpegTest, DecodesBaselineProgressiveAndGreyscaleToRgb) {
  ASSERT_TRUE(JpegSupported());
  const Image src = Gradient(24, 16);
  EXPECT_LT(MeanAbsDiff(DecodeImage(EncodeJpeg(src)), src), 2.0);
  EXPECT_LT(MeanAbsDiff(DecodeImage(EncodeJpeg(src, 3, /*progressive=*/true)), src), 2.0);
  const Image grey = DecodeImage(EncodeJpeg(src, 1));
  ASSERT_EQ(grey.width, 24);
  for (int x = 0; x < 24; x += 5) {
    EXPECT_EQ(grey.at(x, 3)[0], grey.at(x, 3)[1]);
    EXPECT_EQ(grey.at(x, 3)[1], grey.at(x, 3)[2]);
    EXPECT_NEAR(grey.at(x, 3)[0], src.at(x, 3)[0], 3);
  }
}

// Phones store photos sideways and say so in Exif: the decoded image is upright.
TEST(ImageIoJpegTest, AppliesTheExifOrientation) {
  const Image upright = Gradient(24, 16);
  // Stored 90 degrees counter-clockwise (orientation 6: "rotate 90 CW to display").
  Image stored(16, 24);
  for (int y = 0; y < 24; ++y) {
    for (int x = 0; x < 16; ++x) std::memcpy(stored.at(x, y), upright.at(23 - y, x), 3);
  }
  EXPECT_LT(MeanAbsDiff(DecodeImage(EncodeJpeg(stored, 3, false, ExifWithOrientation(6))), upright), 2.0);
  // Mirrored (2), and 180 degrees (3).
  Image mirrored(24, 16), turned(24, 16);
  for (int y = 0; y < 16; ++y) {
    for (int x = 0; x < 24; ++x) {
      std::memcpy(mirrored.at(x, y), upright.at(23 - x, y), 3);
      std::memcpy(turned.at(x, y), upright.at(23 - x, 15 - y), 3);
    }
  }
  EXPECT_LT(MeanAbsDiff(DecodeImage(EncodeJpeg(mirrored, 3, false, ExifWithOrientation(2))), upright), 2.0);
  EXPECT_LT(MeanAbsDiff(DecodeImage(EncodeJpeg(turned, 3, false, ExifWithOrientation(3))), upright), 2.0);
  // A malformed Exif block is ignored, not an error.
  EXPECT_LT(MeanAbsDiff(DecodeImage(EncodeJpeg(upright, 3, false, std::string("Exif\0\0MM\0", 9))), upright), 2.0);
}

// Hostile or broken JPEGs: a clear error, never a crash, and never a half-grey "success".
TEST(ImageIoJpegTest, RejectsTruncatedCorruptOversizedAndCmyk) {
  const std::string good = EncodeJpeg(Gradient(64, 48));
  ExpectValueError([&] { DecodeImage(good.substr(0, good.size() / 2)); }, "invalid JPEG");
  ExpectValueError([&] { DecodeImage(good.substr(0, 40)); }, "invalid JPEG");
  std::string corrupt = good;
  for (size_t i = good.size() / 2; i < good.size() / 2 + 64; ++i) corrupt[i] = static_cast<char>(0xff);
  ExpectValueError([&] { DecodeImage(corrupt); }, "invalid JPEG");
  ImageLimits small;
  small.max_width = small.max_height = 32;
  ExpectValueError([&] { DecodeImage(good, small); }, "exceeds the 32x32 limit");
  ExpectValueError([&] { DecodeImage(EncodeJpeg(Gradient(8, 8), 4)); }, "CMYK JPEG is not supported");
  // Every truncation point fails cleanly.
  for (size_t n = 3; n < good.size(); n += 37) {
    try {
      DecodeImage(good.substr(0, n));
      ADD_FAILURE() << "a JPEG cut at " << n << " bytes decoded";
    } catch (const c10::ValueError&) {
    }
  }
}

// Warnings that lose no data, common in real files, do not refuse the image: two stray bytes
// before EOI ("extraneous bytes before marker 0xd9"), a JFIF header of revision 2.01.
TEST(ImageIoJpegTest, HarmlessWarningsDecode) {
  const Image src = Gradient(64, 48);
  const std::string good = EncodeJpeg(src);
  ASSERT_EQ(good.substr(good.size() - 2), std::string("\xff\xd9", 2));
  const std::string stray = good.substr(0, good.size() - 2) + std::string("\0\0\xff\xd9", 4);
  EXPECT_LT(MeanAbsDiff(DecodeImage(stray), src), 2.0);
  std::string jfif2 = good;
  const size_t jfif = jfif2.find(std::string("JFIF\0", 5));
  ASSERT_NE(jfif, std::string::npos);
  jfif2[jfif + 5] = 2;  // major version
  EXPECT_LT(MeanAbsDiff(DecodeImage(jfif2), src), 2.0);
}
#else
TEST(ImageIoJpegTest, RejectsJpegWithClearMessageWithoutLibjpeg) {
  const std::string jpeg("\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00", 20);
  EXPECT_THROW(DecodeImage(jpeg), c10::Error);
}
#endif  // PERFUSION_HAVE_JPEG

TEST(ImageIoTest, RejectsEmptyRandomAndOtherFormats) {
  ExpectValueError([] { DecodeImage(""); }, "empty input");
  ExpectValueError([] { DecodeImage("GIF89a\x01\x00\x01\x00"); }, "GIF is not supported");
  ExpectValueError([] { DecodeImage("hello world, not an image"); }, "not a PNG or JPEG");
  ExpectValueError([] { DecodeImage(std::string("\x89PN", 3)); }, "truncated PNG");
  SplitMix64 rng(11);
  for (int i = 0; i < 200; ++i) {
    std::string junk(1 + rng.UniformInt(300), '\0');
    for (auto& ch : junk) ch = static_cast<char>(rng.Next());
    EXPECT_THROW(DecodeImage(junk), c10::ValueError);
  }
}

TEST(ImageIoTest, RejectsInputOverTheByteLimit) {
  ImageLimits limits;
  limits.max_bytes = 100;
  ExpectValueError([&] { DecodeImage(std::string(101, 'x'), limits); }, "exceeds the limit of 100 bytes");
}

TEST(ImageIoTest, RejectsEveryTruncation) {
  SKIP_WITHOUT_PNG();
  const std::string png = EncodePng(RandomImage(12, 9, 8));
  for (size_t n = 1; n < png.size(); ++n) {
    EXPECT_THROW(DecodeImage(png.substr(0, n)), c10::ValueError) << "cut at " << n << " of " << png.size();
  }
  ExpectValueError([&] { DecodeImage(png.substr(0, png.size() - 20)); }, "truncated");
}

TEST(ImageIoTest, RejectsCorruptedCrcs) {
  SKIP_WITHOUT_PNG();
  const std::string png = EncodePng(RandomImage(8, 8, 9));
  for (const Chunk& c : Chunks(png)) {
    std::string bad = png;
    bad[c.offset + 8 + c.length] ^= 0x01;  // first CRC byte
    ExpectValueError([&] { DecodeImage(bad); }, "CRC");
    if (c.length > 0) {
      bad = png;
      bad[c.offset + 8 + c.length - 1] ^= 0x40;  // last data byte, CRC left stale
      EXPECT_THROW(DecodeImage(bad), c10::ValueError) << c.type;
    }
  }
}

TEST(ImageIoTest, RejectsHugeDimensionsBeforeAllocating) {
  // 100000 x 100000 RGB would need 30 GB: the IHDR check must fire before libpng allocates anything.
  ExpectValueError([] { DecodeImage(ForgedPng(100000, 100000)); },
                   "image of 100000x100000 exceeds the 4096x4096 limit");
  ExpectValueError([] { DecodeImage(ForgedPng(0x7fffffff, 1)); }, "exceeds");
  ExpectValueError([] { DecodeImage(ForgedPng(0xffffffffu, 0xffffffffu)); }, "exceeds");
  ImageLimits limits;
  limits.max_pixels = 1000;
  ExpectValueError([&] { DecodeImage(ForgedPng(100, 100), limits); }, "10000 pixels, over the limit of 1000");
}

TEST(ImageIoTest, RejectsZeroSizeAndShortImageData) {
  ExpectValueError([] { DecodeImage(ForgedPng(0, 0)); }, "zero dimension");
  ExpectValueError([] { DecodeImage(ForgedPng(5, 0)); }, "zero dimension");
  SKIP_WITHOUT_PNG();
  // Dimensions within limits but far less pixel data than the IHDR promises: rejected before the
  // 64 MiB pixel buffer a 4096x4096 image needs is allocated.
  ExpectValueError([] { DecodeImage(ForgedPng(4096, 4096)); },
                   "9 bytes of image data cannot hold a 4096x4096 image");
  EXPECT_THROW(DecodeImage(ForgedPng(64, 64)), c10::ValueError);
  EXPECT_THROW(DecodeImage(ForgedPng(8, 8)), c10::ValueError);  // plausible size, too little data
}

TEST(ImageIoTest, RandomMutationsOfAValidPngNeverCrash) {
  SKIP_WITHOUT_PNG();
  Image base(24, 16);
  for (int y = 0; y < 16; ++y) {
    for (int x = 0; x < 24; ++x) {
      uint8_t* p = base.at(x, y);
      p[0] = static_cast<uint8_t>(x * 10);
      p[1] = static_cast<uint8_t>(y * 15);
      p[2] = static_cast<uint8_t>((x ^ y) * 7);
    }
  }
  const std::string png = EncodePng(base);
  SplitMix64 rng(2024);
  int decoded = 0, rejected = 0;
  for (int i = 0; i < 500; ++i) {
    std::string m = png;
    const int edits = 1 + rng.UniformInt(4);
    for (int e = 0; e < edits; ++e) {
      const size_t at = static_cast<size_t>(rng.UniformInt(static_cast<int>(m.size())));
      switch (rng.UniformInt(4)) {
        case 0: m[at] = static_cast<char>(rng.Next()); break;
        case 1: m[at] ^= static_cast<char>(1 << rng.UniformInt(8)); break;
        case 2: m.insert(at, 1, static_cast<char>(rng.Next())); break;
        default: m.erase(at, 1 + rng.UniformInt(8)); break;
      }
    }
    // Half the time, repair every CRC so the mutation reaches zlib and the filters.
    if (rng.Bernoulli(0.5)) {
      for (const Chunk& c : Chunks(m)) FixCrc(&m, c);
    }
    try {
      const Image im = DecodeImage(m);
      EXPECT_EQ(im.rgb.size(), static_cast<size_t>(im.width) * im.height * 3);
      ++decoded;
    } catch (const c10::ValueError&) {
      ++rejected;
    }
  }
  EXPECT_EQ(decoded + rejected, 500);
  EXPECT_GT(rejected, 250);  // most mutations are caught
}

TEST(ImageIoTest, TensorConversionIsExactAndInRange) {
  const Image im = RandomImage(7, 5, 21);
  const at::Tensor t = ImageToTensor(im);
  ASSERT_EQ(t.sizes(), (at::IntArrayRef{3, 5, 7}));
  EXPECT_EQ(t.scalar_type(), at::kFloat);
  EXPECT_GE(t.min().item<float>(), -1.f);
  EXPECT_LE(t.max().item<float>(), 1.f);
  EXPECT_FLOAT_EQ(t[2][4][6].item<float>(), im.at(6, 4)[2] / 127.5f - 1.f);
  EXPECT_TRUE(TensorToImage(t) == im);
  EXPECT_TRUE(TensorToImage(t.to(at::kDouble)) == im);
  Image extremes(2, 1);
  extremes.rgb = {0, 0, 0, 255, 255, 255};
  const at::Tensor e = ImageToTensor(extremes);
  EXPECT_EQ(e.min().item<float>(), -1.f);
  EXPECT_EQ(e.max().item<float>(), 1.f);
}

TEST(ImageIoTest, TensorToImageClampsAndChecksShape) {
  const at::Tensor t = at::tensor({-3.f, 2.f, 0.f}).reshape({3, 1, 1});
  const Image im = TensorToImage(t);
  EXPECT_EQ(im.rgb, (std::vector<uint8_t>{0, 255, 128}));  // 0 -> 127.5 -> rounds to even (128)
  ExpectValueError([] { TensorToImage(at::zeros({4, 2, 2})); }, "expected a [3, H, W] tensor, got [4, 2, 2]");
  ExpectValueError([] { TensorToImage(at::zeros({1, 3, 2, 2})); }, "[1, 3, 2, 2]");
  ExpectValueError([] { TensorToImage(at::zeros({3, 2, 2}, at::kInt)); }, "floating");
}

TEST(ImageIoTest, ResizeKeepsConstantsAndShapes) {
  const at::Tensor c = at::full({3, 40, 30}, 0.25f);
  const at::Tensor r = ResizeBilinear(c, 17, 23);
  ASSERT_EQ(r.sizes(), (at::IntArrayRef{3, 17, 23}));
  EXPECT_TRUE(testing::AllClose(r, at::full({3, 17, 23}, 0.25f), 0, 1e-6, "resized constant"));
  EXPECT_EQ(ResizeBilinear(at::zeros({2, 3, 8, 8}), 16, 4).sizes(), (at::IntArrayRef{2, 3, 16, 4}));
  EXPECT_EQ(ResizeBilinear(at::zeros({3, 8, 8}, at::kHalf), 4, 4).scalar_type(), at::kHalf);
  ExpectValueError([] { ResizeBilinear(at::zeros({8, 8}), 4, 4); }, "[8, 8]");
  ExpectValueError([] { ResizeBilinear(at::zeros({3, 8, 8}), 0, 4); }, "empty");
}

TEST(ImageIoTest, AntialiasedDownscaleAveragesFineDetail) {
  // A 1-pixel checkerboard of +-1 has mean 0: an antialiased 8x downscale is close to 0 everywhere.
  const at::Tensor ramp = at::arange(64);
  const at::Tensor checker = ((ramp.unsqueeze(0) + ramp.unsqueeze(1)) % 2).to(at::kFloat).mul(2).sub(1);
  const at::Tensor r = ResizeBilinear(checker.expand({3, 64, 64}).contiguous(), 8, 8);
  EXPECT_LT(r.abs().max().item<float>(), 0.05f);
}

TEST(ImageIoTest, CenterCropResizeTakesTheMiddleSquare) {
  // 3 x 40 x 20 (portrait): rows 10..29 are the centred square; they are -1, the rest +1.
  at::Tensor t = at::ones({3, 40, 20});
  t.narrow(1, 10, 20).fill_(-1);
  const at::Tensor out = CenterCropResize(t, 16);
  ASSERT_EQ(out.sizes(), (at::IntArrayRef{3, 16, 16}));
  EXPECT_TRUE(testing::AllClose(out, at::full({3, 16, 16}, -1.f), 0, 1e-6, "centre crop"));
  // Landscape and batched inputs too.
  at::Tensor wide = at::ones({2, 3, 10, 30});
  wide.narrow(3, 10, 10).fill_(-1);
  const at::Tensor out2 = CenterCropResize(wide, 5);
  ASSERT_EQ(out2.sizes(), (at::IntArrayRef{2, 3, 5, 5}));
  EXPECT_TRUE(testing::AllClose(out2, at::full({2, 3, 5, 5}, -1.f), 0, 1e-6, "landscape crop"));
}

}  // namespace
}  // namespace perfusion

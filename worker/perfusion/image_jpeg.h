// image_jpeg: JPEG decoding for image_io's DecodeImage (internal to the engine).
//
// Ref: JPEG (ITU-T T.81) through libjpeg-turbo's libjpeg API; Exif 2.32 (CIPA DC-008) for the
// orientation tag. Untrusted input, as in image_io: the dimensions are checked against
// ImageLimits right after the header (before any pixel buffer), libjpeg's errors *and warnings*
// (corrupt or truncated data, which libjpeg would otherwise paint grey) become c10::ValueError with
// libjpeg's message, progressive images may have at most 500 scans (libjpeg-turbo's own limit for
// its TurboJPEG API; many scans are a known way to make a small file cost minutes), and libjpeg's
// setjmp error path lives in one C-style function that owns no C++ objects. Nothing is printed.
//
// Colour: greyscale and YCbCr decode to 8-bit RGB; CMYK/YCCK are refused with a clear message. The
// Exif orientation (APP1) is applied, so a phone photo stored sideways trains upright.
//
// Thread safety: reentrant (no shared state).
#pragma once

#include <string>

#include "perfusion/image_io.h"

namespace perfusion {

// True when this build decodes JPEG (libjpeg was found at configure time).
bool JpegSupported();

// Decodes a JPEG (the caller has seen the FF D8 FF magic) to 8-bit RGB, upright per its Exif
// orientation. Throws c10::ValueError naming the reason; c10::Error when JPEG is not built in.
Image DecodeJpeg(const std::string& bytes, const ImageLimits& limits);

}  // namespace perfusion

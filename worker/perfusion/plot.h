// plot: a tiny raster renderer for evaluation reports: labelled image grids and line/scatter charts,
// drawn into an 8-bit RGB Image (image_io.h) and saved with EncodePng. No fonts or libraries: text
// uses a built-in 5x7 bitmap font (upper case; lower case is drawn as upper case; characters outside
// the font draw as '?'), lines are Bresenham with square pens, markers are filled squares, circles,
// diamonds or triangles.
//
// Determinism: every function is a pure function of its arguments (integer rasterisation; the only
// floating point is the data-to-pixel mapping, rounded once), so the same chart gives the same PNG
// bytes everywhere.
//
// Thread safety: plain data and pure functions.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "perfusion/image_io.h"

namespace perfusion {

struct Rgb {
  uint8_t r = 0, g = 0, b = 0;
};

enum class Marker { kNone, kSquare, kCircle, kDiamond, kTriangle };

// Width and height in pixels of `text` drawn at `scale` (each glyph is 5x7, advance 6, line height 9).
int TextWidth(const std::string& text, int scale = 1);
int TextHeight(const std::string& text, int scale = 1);

// A drawing surface over an Image. Coordinates are pixels, x right, y down; drawing is clipped.
class Canvas {
 public:
  // REQUIRES: width, height >= 1 (else c10::ValueError).
  Canvas(int width, int height, Rgb background = {255, 255, 255});

  int width() const { return image_.width; }
  int height() const { return image_.height; }
  const Image& image() const { return image_; }
  Image& image() { return image_; }

  void SetPixel(int x, int y, Rgb c);
  void FillRect(int x, int y, int w, int h, Rgb c);
  void StrokeRect(int x, int y, int w, int h, Rgb c, int thickness = 1);
  // A line with a square pen of `thickness` pixels; dashed draws `dash` pixels on, `dash` off.
  void Line(int x0, int y0, int x1, int y1, Rgb c, int thickness = 1, int dash = 0);
  // A marker centred on (x, y), `size` pixels across.
  void DrawMarker(int x, int y, Marker m, Rgb c, int size);
  // Text with its top-left corner at (x, y); '\n' starts a new line.
  void Text(int x, int y, const std::string& text, Rgb c, int scale = 1);
  // Text rotated 90 degrees counter-clockwise (reads bottom to top), its bounding box's top-left at (x, y).
  void TextVertical(int x, int y, const std::string& text, Rgb c, int scale = 1);
  // Copies `src` with its top-left at (x, y), each pixel enlarged to scale x scale (nearest neighbour).
  void Blit(const Image& src, int x, int y, int scale = 1);

 private:
  Image image_;
};

// ---- Image grids -------------------------------------------------------------------------------

struct GridOptions {
  int scale = 3;                       // each image pixel becomes scale x scale
  int pad = 4;                         // pixels between cells
  int text_scale = 1;                  // label font scale
  Rgb background = {255, 255, 255};
  Rgb text_color = {20, 20, 20};
  std::string title;                   // above the grid ("" = none)
  std::vector<std::string> row_labels; // left of each row (empty or one per row)
  std::vector<std::string> col_labels; // above each column (empty or one per column)
};

// Lays out rows of images (rows may differ in length; cells are as large as the largest image).
// REQUIRES: at least one image; label vectors empty or sized to the rows / the longest row.
Image ImageGrid(const std::vector<std::vector<Image>>& rows, const GridOptions& options = {});

// ---- Charts ------------------------------------------------------------------------------------

struct Series {
  std::string label;                      // legend entry ("" = not in the legend)
  std::vector<double> x, y;               // same length
  std::vector<std::string> point_labels;  // optional, one per point, drawn beside it
  Rgb color = {31, 119, 180};
  Marker marker = Marker::kCircle;
  bool line = true;                       // join the points in order
  bool dashed = false;
};

struct ChartOptions {
  int width = 640, height = 480;
  std::string title, x_label, y_label;
  // Axis ranges; when min == max the range is taken from the data (padded by 5%).
  double x_min = 0, x_max = 0, y_min = 0, y_max = 0;
  int x_ticks = 5, y_ticks = 5;  // intervals between tick labels
  bool grid = true;
  bool legend = true;
};

// A line/scatter chart. Throws c10::ValueError if a series has x and y (or labels) of different lengths.
Image LineChart(const std::vector<Series>& series, const ChartOptions& options = {});

// A qualitative palette (Tableau 10): colour i % 10.
Rgb PaletteColor(int i);

}  // namespace perfusion

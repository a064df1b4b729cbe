#include "perfusion/plot.h"

#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "perfusion/image_io.h"

namespace perfusion {
namespace {

std::vector<Series> SweepLikeSeries() {
  Series a;
  a.label = "tau=0.15";
  a.x = {0.2, 0.4, 0.6, 0.8};
  a.y = {0.9, 0.7, 0.5, 0.2};
  a.point_labels = {"b.5", "b.6", "b.7", "b.8"};
  Series b;
  b.label = "ti";
  b.x = {0.7};
  b.y = {0.1};
  b.line = false;
  b.marker = Marker::kDiamond;
  b.color = PaletteColor(3);
  return {a, b};
}

// A solid-colour test image whose pixel (x, y) encodes its coordinates.
Image Pattern(int w, int h, uint8_t tag) {
  Image im(w, h);
  for (int y = 0; y < h; ++y) {
    for (int x = 0; x < w; ++x) {
      uint8_t* p = im.at(x, y);
      p[0] = static_cast<uint8_t>(x * 7);
      p[1] = static_cast<uint8_t>(y * 7);
      p[2] = tag;
    }
  }
  return im;
}

int InkPixels(const Image& im, int x0, int y0, int x1, int y1, const Rgb& bg) {
  int n = 0;
  for (int y = std::max(0, y0); y < std::min(im.height, y1); ++y) {
    for (int x = std::max(0, x0); x < std::min(im.width, x1); ++x) {
      const uint8_t* p = im.at(x, y);
      n += p[0] != bg.r || p[1] != bg.g || p[2] != bg.b;
    }
  }
  return n;
}

TEST(PlotTest, LineChartIsAValidPngOfTheRequestedSize) {
  if (!PngSupported()) GTEST_SKIP() << "built without libpng";
  ChartOptions o;
  o.width = 400;
  o.height = 300;
  o.title = "Fidelity vs alignment";
  o.x_label = "prompt alignment";
  o.y_label = "concept fidelity";
  o.x_min = 0, o.x_max = 1, o.y_min = 0, o.y_max = 1;
  const std::string png = EncodePng(LineChart(SweepLikeSeries(), o));
  const Image back = DecodeImage(png);
  EXPECT_EQ(back.width, 400);
  EXPECT_EQ(back.height, 300);
  // Something was drawn: far more than a frame's worth of non-white pixels.
  EXPECT_GT(InkPixels(back, 0, 0, 400, 300, {255, 255, 255}), 2000);
}

TEST(PlotTest, SameChartGivesIdenticalPngBytes) {
  if (!PngSupported()) GTEST_SKIP() << "built without libpng";
  ChartOptions o;
  o.title = "sweep";
  const std::string a = EncodePng(LineChart(SweepLikeSeries(), o));
  const std::string b = EncodePng(LineChart(SweepLikeSeries(), o));
  EXPECT_EQ(a, b);
}

TEST(PlotTest, DataPointsLandWhereTheAxesSayTheyAre) {
  // A single red marker at (0.5, 0.5) on [0, 1] x [0, 1] must sit in the middle of the plot area,
  // not near a corner.
  Series s;
  s.x = {0.5};
  s.y = {0.5};
  s.line = false;
  s.marker = Marker::kSquare;
  s.color = {255, 0, 0};
  ChartOptions o;
  o.width = 300, o.height = 300, o.grid = false, o.legend = false;
  o.x_min = 0, o.x_max = 1, o.y_min = 0, o.y_max = 1;
  const Image im = LineChart({s}, o);
  double sx = 0, sy = 0;
  int n = 0;
  for (int y = 0; y < im.height; ++y) {
    for (int x = 0; x < im.width; ++x) {
      const uint8_t* p = im.at(x, y);
      if (p[0] == 255 && p[1] == 0 && p[2] == 0) sx += x, sy += y, ++n;
    }
  }
  ASSERT_GT(n, 0);
  // Plot area: x in [58, 284], y in [14, 254] (margins of LineChart without a title).
  EXPECT_NEAR(sx / n, 58 + 226 / 2.0, 2.0);
  EXPECT_NEAR(sy / n, 14 + 240 / 2.0, 2.0);
}

TEST(PlotTest, LineChartRejectsSeriesWithMismatchedLengths) {
  Series s;
  s.x = {0, 1, 2};
  s.y = {0, 1};
  EXPECT_THROW(LineChart({s}), c10::ValueError);
}

TEST(PlotTest, ImageGridSizeFollowsTheLayout) {
  GridOptions o;
  o.scale = 2;
  o.pad = 4;
  const std::vector<std::vector<Image>> rows = {{Pattern(32, 32, 1), Pattern(32, 32, 2), Pattern(32, 32, 3)},
                                                {Pattern(32, 32, 4)}};
  const Image g = ImageGrid(rows, o);
  EXPECT_EQ(g.width, 4 + 3 * (64 + 4));
  EXPECT_EQ(g.height, 4 + 2 * (64 + 4));
}

TEST(PlotTest, ImageGridCopiesEveryPixelScaled) {
  GridOptions o;
  o.scale = 3;
  o.pad = 2;
  const Image src = Pattern(8, 6, 9);
  const Image g = ImageGrid({{Pattern(8, 6, 1), src}}, o);
  // Second cell of the first row starts at x = pad + (8 * 3 + pad), y = pad.
  const int x0 = 2 + 8 * 3 + 2, y0 = 2;
  for (int y = 0; y < 6 * 3; ++y) {
    for (int x = 0; x < 8 * 3; ++x) {
      const uint8_t* p = g.at(x0 + x, y0 + y);
      const uint8_t* q = src.at(x / 3, y / 3);
      ASSERT_EQ(p[0], q[0]) << "at " << x << "," << y;
      ASSERT_EQ(p[1], q[1]);
      ASSERT_EQ(p[2], q[2]);
    }
  }
}

TEST(PlotTest, ImageGridLabelsMakeRoomAndDrawText) {
  GridOptions o;
  o.scale = 1;
  o.pad = 4;
  o.row_labels = {"P1", "P2"};
  o.col_labels = {"A", "B"};
  o.title = "grid";
  GridOptions bare;
  bare.scale = 1;
  bare.pad = 4;
  const Image plain =
      ImageGrid({{Pattern(16, 16, 1), Pattern(16, 16, 2)}, {Pattern(16, 16, 3), Pattern(16, 16, 4)}}, bare);
  const Image labelled =
      ImageGrid({{Pattern(16, 16, 1), Pattern(16, 16, 2)}, {Pattern(16, 16, 3), Pattern(16, 16, 4)}}, o);
  EXPECT_GT(labelled.width, plain.width);
  EXPECT_GT(labelled.height, plain.height);
  // The row-label column (left of the first image) carries ink.
  EXPECT_GT(InkPixels(labelled, 0, 0, TextWidth("P1") + 4, labelled.height, o.background), 10);
}

TEST(PlotTest, ImageGridRejectsWrongLabelCounts) {
  GridOptions o;
  o.row_labels = {"only one"};
  EXPECT_THROW(ImageGrid({{Pattern(4, 4, 1)}, {Pattern(4, 4, 2)}}, o), c10::ValueError);
  EXPECT_THROW(ImageGrid({}), c10::ValueError);
}

TEST(PlotTest, TextStaysInsideItsMeasuredBox) {
  Canvas c(200, 60, {255, 255, 255});
  const std::string text = "beta=0.7 tau:0.15\n<checker_star> 95%";
  c.Text(10, 10, text, {0, 0, 0}, 2);
  const int w = TextWidth(text, 2), h = TextHeight(text, 2);
  const int inside = InkPixels(c.image(), 10, 10, 10 + w, 10 + h, {255, 255, 255});
  const int all = InkPixels(c.image(), 0, 0, 200, 60, {255, 255, 255});
  EXPECT_GT(inside, 100);
  EXPECT_EQ(inside, all);
}

TEST(PlotTest, LowerCaseDrawsAsUpperCaseAndUnknownAsQuestionMark) {
  Canvas lower(20, 10), upper(20, 10), unknown(20, 10), question(20, 10);
  lower.Text(0, 0, "a", {0, 0, 0});
  upper.Text(0, 0, "A", {0, 0, 0});
  unknown.Text(0, 0, "~", {0, 0, 0});
  question.Text(0, 0, "?", {0, 0, 0});
  EXPECT_EQ(lower.image(), upper.image());
  EXPECT_EQ(unknown.image(), question.image());
}

TEST(PlotTest, VerticalTextIsTheHorizontalTextRotated) {
  const std::string t = "fidelity";
  Canvas h(TextWidth(t), TextHeight(t)), v(TextHeight(t), TextWidth(t));
  h.Text(0, 0, t, {0, 0, 0});
  v.TextVertical(0, 0, t, {0, 0, 0});
  for (int y = 0; y < h.height(); ++y) {
    for (int x = 0; x < h.width(); ++x) {
      ASSERT_EQ(h.image().at(x, y)[0], v.image().at(y, h.width() - 1 - x)[0]) << x << "," << y;
    }
  }
}

}  // namespace
}  // namespace perfusion

#include "perfusion/plot.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace perfusion {
namespace {

constexpr int kGlyphW = 5, kGlyphH = 7, kAdvance = 6, kLineHeight = 9;

struct Glyph {
  char c;
  const char* rows[kGlyphH];
};

// A classic 5x7 font; '#' is ink.
const Glyph kFont[] = {
    {' ', {"     ", "     ", "     ", "     ", "     ", "     ", "     "}},
    {'0', {" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "}},
    {'1', {"  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "}},
    {'2', {" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"}},
    {'3', {"#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "}},
    {'4', {"   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "}},
    {'5', {"#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "}},
    {'6', {"  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "}},
    {'7', {"#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "}},
    {'8', {" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "}},
    {'9', {" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "}},
    {'A', {" ### ", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"}},
    {'B', {"#### ", "#   #", "#   #", "#### ", "#   #", "#   #", "#### "}},
    {'C', {" ### ", "#   #", "#    ", "#    ", "#    ", "#   #", " ### "}},
    {'D', {"###  ", "#  # ", "#   #", "#   #", "#   #", "#  # ", "###  "}},
    {'E', {"#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#####"}},
    {'F', {"#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#    "}},
    {'G', {" ### ", "#   #", "#    ", "# ###", "#   #", "#   #", " ####"}},
    {'H', {"#   #", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"}},
    {'I', {" ### ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "}},
    {'J', {"  ###", "   # ", "   # ", "   # ", "   # ", "#  # ", " ##  "}},
    {'K', {"#   #", "#  # ", "# #  ", "##   ", "# #  ", "#  # ", "#   #"}},
    {'L', {"#    ", "#    ", "#    ", "#    ", "#    ", "#    ", "#####"}},
    {'M', {"#   #", "## ##", "# # #", "# # #", "#   #", "#   #", "#   #"}},
    {'N', {"#   #", "#   #", "##  #", "# # #", "#  ##", "#   #", "#   #"}},
    {'O', {" ### ", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "}},
    {'P', {"#### ", "#   #", "#   #", "#### ", "#    ", "#    ", "#    "}},
    {'Q', {" ### ", "#   #", "#   #", "#   #", "# # #", "#  # ", " ## #"}},
    {'R', {"#### ", "#   #", "#   #", "#### ", "# #  ", "#  # ", "#   #"}},
    {'S', {" ####", "#    ", "#    ", " ### ", "    #", "    #", "#### "}},
    {'T', {"#####", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  "}},
    {'U', {"#   #", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "}},
    {'V', {"#   #", "#   #", "#   #", "#   #", "#   #", " # # ", "  #  "}},
    {'W', {"#   #", "#   #", "#   #", "# # #", "# # #", "# # #", " # # "}},
    {'X', {"#   #", "#   #", " # # ", "  #  ", " # # ", "#   #", "#   #"}},
    {'Y', {"#   #", "#   #", " # # ", "  #  ", "  #  ", "  #  ", "  #  "}},
    {'Z', {"#####", "    #", "   # ", "  #  ", " #   ", "#    ", "#####"}},
    {'.', {"     ", "     ", "     ", "     ", "     ", " ##  ", " ##  "}},
    {',', {"     ", "     ", "     ", "     ", " ##  ", "  #  ", " #   "}},
    {':', {"     ", " ##  ", " ##  ", "     ", " ##  ", " ##  ", "     "}},
    {';', {"     ", " ##  ", " ##  ", "     ", " ##  ", "  #  ", " #   "}},
    {'-', {"     ", "     ", "     ", "#####", "     ", "     ", "     "}},
    {'+', {"     ", "  #  ", "  #  ", "#####", "  #  ", "  #  ", "     "}},
    {'=', {"     ", "     ", "#####", "     ", "#####", "     ", "     "}},
    {'/', {"     ", "    #", "   # ", "  #  ", " #   ", "#    ", "     "}},
    {'%', {"##   ", "##  #", "   # ", "  #  ", " #   ", "#  ##", "   ##"}},
    {'(', {"   # ", "  #  ", " #   ", " #   ", " #   ", "  #  ", "   # "}},
    {')', {" #   ", "  #  ", "   # ", "   # ", "   # ", "  #  ", " #   "}},
    {'[', {" ### ", " #   ", " #   ", " #   ", " #   ", " #   ", " ### "}},
    {']', {" ### ", "   # ", "   # ", "   # ", "   # ", "   # ", " ### "}},
    {'<', {"   # ", "  #  ", " #   ", "#    ", " #   ", "  #  ", "   # "}},
    {'>', {" #   ", "  #  ", "   # ", "    #", "   # ", "  #  ", " #   "}},
    {'_', {"     ", "     ", "     ", "     ", "     ", "     ", "#####"}},
    {'\'', {"  #  ", "  #  ", " #   ", "     ", "     ", "     ", "     "}},
    {'"', {" # # ", " # # ", "     ", "     ", "     ", "     ", "     "}},
    {'#', {" # # ", " # # ", "#####", " # # ", "#####", " # # ", " # # "}},
    {'*', {"     ", "  #  ", "# # #", " ### ", "# # #", "  #  ", "     "}},
    {'!', {"  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "     ", "  #  "}},
    {'?', {" ### ", "#   #", "    #", "   # ", "  #  ", "     ", "  #  "}},
    {'@', {" ### ", "#   #", "# ###", "# # #", "# ###", "#    ", " ####"}},
    {'&', {" ##  ", "#  # ", "# #  ", " #   ", "# # #", "#  # ", " ## #"}},
    {'|', {"  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  "}},
};

const Glyph& FindGlyph(char c) {
  if (c >= 'a' && c <= 'z') c = static_cast<char>(c - 'a' + 'A');
  static const std::array<const Glyph*, 128> table = [] {
    std::array<const Glyph*, 128> t{};
    for (const Glyph& g : kFont) t[static_cast<unsigned char>(g.c)] = &g;
    return t;
  }();
  const unsigned char u = static_cast<unsigned char>(c);
  if (u < 128 && table[u]) return *table[u];
  return *table['?'];
}

std::vector<std::string> SplitLines(const std::string& text) {
  std::vector<std::string> lines(1);
  for (char c : text) {
    if (c == '\n') {
      lines.emplace_back();
    } else {
      lines.back().push_back(c);
    }
  }
  return lines;
}

std::string FormatTick(double v, double step) {
  char buf[32];
  const int decimals = step >= 1 ? 0 : step >= 0.1 ? 1 : step >= 0.01 ? 2 : 3;
  std::snprintf(buf, sizeof(buf), "%.*f", decimals, v);
  std::string s = buf;
  if (s == "-0" || s == "-0.0" || s == "-0.00" || s == "-0.000") s = s.substr(1);
  return s;
}

// A "nice" tick step (1, 2 or 5 times a power of ten) for `intervals` intervals over `range`.
double NiceStep(double range, int intervals) {
  const double raw = range / std::max(1, intervals);
  const double p = std::pow(10.0, std::floor(std::log10(raw)));
  const double m = raw / p;
  return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
}

}  // namespace

int TextWidth(const std::string& text, int scale) {
  size_t longest = 0;
  for (const auto& line : SplitLines(text)) longest = std::max(longest, line.size());
  return longest == 0 ? 0 : static_cast<int>((longest * kAdvance - 1) * scale);
}

int TextHeight(const std::string& text, int scale) {
  const int lines = static_cast<int>(SplitLines(text).size());
  return ((lines - 1) * kLineHeight + kGlyphH) * scale;
}

Canvas::Canvas(int width, int height, Rgb bg) {
  TORCH_CHECK_VALUE(width >= 1 && height >= 1, "Canvas: size must be at least 1x1, got ", width, "x", height);
  image_ = Image(width, height);
  FillRect(0, 0, width, height, bg);
}

void Canvas::SetPixel(int x, int y, Rgb c) {
  if (x < 0 || y < 0 || x >= image_.width || y >= image_.height) return;
  uint8_t* p = image_.at(x, y);
  p[0] = c.r;
  p[1] = c.g;
  p[2] = c.b;
}

void Canvas::FillRect(int x, int y, int w, int h, Rgb c) {
  const int x0 = std::max(0, x), y0 = std::max(0, y);
  const int x1 = std::min(image_.width, x + w), y1 = std::min(image_.height, y + h);
  for (int yy = y0; yy < y1; ++yy) {
    for (int xx = x0; xx < x1; ++xx) SetPixel(xx, yy, c);
  }
}

void Canvas::StrokeRect(int x, int y, int w, int h, Rgb c, int t) {
  FillRect(x, y, w, t, c);
  FillRect(x, y + h - t, w, t, c);
  FillRect(x, y, t, h, c);
  FillRect(x + w - t, y, t, h, c);
}

void Canvas::Line(int x0, int y0, int x1, int y1, Rgb c, int thickness, int dash) {
  const int dx = std::abs(x1 - x0), sx = x0 < x1 ? 1 : -1;
  const int dy = -std::abs(y1 - y0), sy = y0 < y1 ? 1 : -1;
  int err = dx + dy;
  const int half = (thickness - 1) / 2;
  for (int n = 0;; ++n) {
    if (dash <= 0 || (n / dash) % 2 == 0) FillRect(x0 - half, y0 - half, thickness, thickness, c);
    if (x0 == x1 && y0 == y1) break;
    const int e2 = 2 * err;
    if (e2 >= dy) {
      err += dy;
      x0 += sx;
    }
    if (e2 <= dx) {
      err += dx;
      y0 += sy;
    }
  }
}

void Canvas::DrawMarker(int x, int y, Marker m, Rgb c, int size) {
  const int r = std::max(1, size / 2);
  switch (m) {
    case Marker::kNone:
      return;
    case Marker::kSquare:
      FillRect(x - r, y - r, 2 * r + 1, 2 * r + 1, c);
      return;
    case Marker::kCircle:
      for (int yy = -r; yy <= r; ++yy) {
        for (int xx = -r; xx <= r; ++xx) {
          if (xx * xx + yy * yy <= r * r + r) SetPixel(x + xx, y + yy, c);
        }
      }
      return;
    case Marker::kDiamond:
      for (int yy = -r; yy <= r; ++yy) {
        for (int xx = -r; xx <= r; ++xx) {
          if (std::abs(xx) + std::abs(yy) <= r) SetPixel(x + xx, y + yy, c);
        }
      }
      return;
    case Marker::kTriangle:
      for (int yy = -r; yy <= r; ++yy) {
        const int half = (yy + r) / 2;  // widens downwards
        for (int xx = -half; xx <= half; ++xx) SetPixel(x + xx, y + yy, c);
      }
      return;
  }
}

void Canvas::Text(int x, int y, const std::string& text, Rgb c, int scale) {
  const auto lines = SplitLines(text);
  for (size_t l = 0; l < lines.size(); ++l) {
    for (size_t i = 0; i < lines[l].size(); ++i) {
      const Glyph& g = FindGlyph(lines[l][i]);
      const int gx = x + static_cast<int>(i) * kAdvance * scale, gy = y + static_cast<int>(l) * kLineHeight * scale;
      for (int row = 0; row < kGlyphH; ++row) {
        for (int col = 0; col < kGlyphW; ++col) {
          if (g.rows[row][col] == '#') FillRect(gx + col * scale, gy + row * scale, scale, scale, c);
        }
      }
    }
  }
}

void Canvas::TextVertical(int x, int y, const std::string& text, Rgb c, int scale) {
  // Draw horizontally into a scratch canvas, then rotate 90 degrees counter-clockwise.
  const int w = TextWidth(text, scale), h = TextHeight(text, scale);
  if (w == 0) return;
  Canvas scratch(w, h, {0, 0, 0});
  scratch.Text(0, 0, text, {255, 255, 255}, scale);
  for (int sy = 0; sy < h; ++sy) {
    for (int sx = 0; sx < w; ++sx) {
      if (scratch.image().at(sx, sy)[0] != 0) SetPixel(x + sy, y + (w - 1 - sx), c);
    }
  }
}

void Canvas::Blit(const Image& src, int x, int y, int scale) {
  TORCH_CHECK_VALUE(scale >= 1, "Canvas::Blit: scale must be >= 1, got ", scale);
  for (int sy = 0; sy < src.height; ++sy) {
    for (int sx = 0; sx < src.width; ++sx) {
      const uint8_t* p = src.at(sx, sy);
      FillRect(x + sx * scale, y + sy * scale, scale, scale, Rgb{p[0], p[1], p[2]});
    }
  }
}

Image ImageGrid(const std::vector<std::vector<Image>>& rows, const GridOptions& o) {
  TORCH_CHECK_VALUE(o.scale >= 1 && o.pad >= 0 && o.text_scale >= 1, "ImageGrid: scale and text_scale must be >= 1 and pad >= 0");
  size_t cols = 0;
  int cell_w = 0, cell_h = 0;
  for (const auto& row : rows) {
    cols = std::max(cols, row.size());
    for (const Image& im : row) {
      cell_w = std::max(cell_w, im.width * o.scale);
      cell_h = std::max(cell_h, im.height * o.scale);
    }
  }
  TORCH_CHECK_VALUE(cols > 0 && cell_w > 0, "ImageGrid: no images");
  TORCH_CHECK_VALUE(o.row_labels.empty() || o.row_labels.size() == rows.size(), "ImageGrid: ", o.row_labels.size(),
                    " row labels for ", rows.size(), " rows");
  TORCH_CHECK_VALUE(o.col_labels.empty() || o.col_labels.size() == cols, "ImageGrid: ", o.col_labels.size(),
                    " column labels for ", cols, " columns");
  const int ts = o.text_scale;
  int label_w = 0;
  for (const auto& l : o.row_labels) label_w = std::max(label_w, TextWidth(l, ts));
  if (label_w > 0) label_w += o.pad + 2;
  int col_label_h = 0;
  for (const auto& l : o.col_labels) col_label_h = std::max(col_label_h, TextHeight(l, ts));
  if (col_label_h > 0) col_label_h += 3;
  const int title_h = o.title.empty() ? 0 : TextHeight(o.title, ts + 1) + o.pad + 2;
  const int W = o.pad + label_w + static_cast<int>(cols) * (cell_w + o.pad);
  const int H = o.pad + title_h + col_label_h + static_cast<int>(rows.size()) * (cell_h + o.pad);
  Canvas canvas(std::max(W, o.pad * 2 + TextWidth(o.title, ts + 1)), H, o.background);
  if (!o.title.empty()) canvas.Text(o.pad, o.pad, o.title, o.text_color, ts + 1);
  const int top = o.pad + title_h;
  for (size_t c = 0; c < o.col_labels.size(); ++c) {
    const int x = o.pad + label_w + static_cast<int>(c) * (cell_w + o.pad);
    canvas.Text(x + std::max(0, (cell_w - TextWidth(o.col_labels[c], ts)) / 2), top, o.col_labels[c], o.text_color, ts);
  }
  for (size_t r = 0; r < rows.size(); ++r) {
    const int y = top + col_label_h + static_cast<int>(r) * (cell_h + o.pad);
    if (!o.row_labels.empty()) {
      canvas.Text(o.pad, y + std::max(0, (cell_h - TextHeight(o.row_labels[r], ts)) / 2), o.row_labels[r],
                  o.text_color, ts);
    }
    for (size_t c = 0; c < rows[r].size(); ++c) {
      const int x = o.pad + label_w + static_cast<int>(c) * (cell_w + o.pad);
      canvas.Blit(rows[r][c], x, y, o.scale);
    }
  }
  return canvas.image();
}

Rgb PaletteColor(int i) {
  static const Rgb kTableau[10] = {{31, 119, 180}, {255, 127, 14}, {44, 160, 44},  {214, 39, 40},  {148, 103, 189},
                                   {140, 86, 75},  {227, 119, 194}, {127, 127, 127}, {188, 189, 34}, {23, 190, 207}};
  return kTableau[((i % 10) + 10) % 10];
}

Image LineChart(const std::vector<Series>& series, const ChartOptions& o) {
  TORCH_CHECK_VALUE(o.width >= 120 && o.height >= 100, "LineChart: size must be at least 120x100, got ", o.width, "x",
                    o.height);
  double xmin = o.x_min, xmax = o.x_max, ymin = o.y_min, ymax = o.y_max;
  const bool auto_x = xmin == xmax, auto_y = ymin == ymax;
  if (auto_x) xmin = 1e300, xmax = -1e300;
  if (auto_y) ymin = 1e300, ymax = -1e300;
  for (size_t s = 0; s < series.size(); ++s) {
    const Series& se = series[s];
    TORCH_CHECK_VALUE(se.x.size() == se.y.size(), "LineChart: series ", s, " ('", se.label, "') has ", se.x.size(),
                      " x values and ", se.y.size(), " y values");
    TORCH_CHECK_VALUE(se.point_labels.empty() || se.point_labels.size() == se.x.size(), "LineChart: series ", s,
                      " has ", se.point_labels.size(), " point labels for ", se.x.size(), " points");
    for (size_t i = 0; i < se.x.size(); ++i) {
      if (auto_x) xmin = std::min(xmin, se.x[i]), xmax = std::max(xmax, se.x[i]);
      if (auto_y) ymin = std::min(ymin, se.y[i]), ymax = std::max(ymax, se.y[i]);
    }
  }
  auto pad_range = [](double& lo, double& hi) {
    if (lo > hi) lo = 0, hi = 1;
    if (hi - lo < 1e-12) lo -= 0.5, hi += 0.5;
    const double m = 0.05 * (hi - lo);
    lo -= m;
    hi += m;
  };
  if (auto_x) pad_range(xmin, xmax);
  if (auto_y) pad_range(ymin, ymax);

  const Rgb ink{30, 30, 30}, grid{225, 225, 225};
  Canvas c(o.width, o.height);
  const int left = 58, right = 16, top = o.title.empty() ? 14 : 34, bottom = 46;
  const int pw = o.width - left - right, ph = o.height - top - bottom;
  auto px = [&](double x) { return left + static_cast<int>(std::lround((x - xmin) / (xmax - xmin) * pw)); };
  auto py = [&](double y) { return top + ph - static_cast<int>(std::lround((y - ymin) / (ymax - ymin) * ph)); };
  if (!o.title.empty()) c.Text((o.width - TextWidth(o.title, 2)) / 2, 8, o.title, ink, 2);

  // Ticks, tick labels and grid lines.
  const double xs = NiceStep(xmax - xmin, o.x_ticks), ys = NiceStep(ymax - ymin, o.y_ticks);
  for (double v = std::ceil(xmin / xs - 1e-9) * xs; v <= xmax + 1e-9 * xs; v += xs) {
    const int x = px(v);
    if (o.grid) c.Line(x, top, x, top + ph, grid);
    c.Line(x, top + ph, x, top + ph + 4, ink);
    const std::string t = FormatTick(v, xs);
    c.Text(x - TextWidth(t) / 2, top + ph + 7, t, ink);
  }
  for (double v = std::ceil(ymin / ys - 1e-9) * ys; v <= ymax + 1e-9 * ys; v += ys) {
    const int y = py(v);
    if (o.grid) c.Line(left, y, left + pw, y, grid);
    c.Line(left - 4, y, left, y, ink);
    const std::string t = FormatTick(v, ys);
    c.Text(left - 7 - TextWidth(t), y - 3, t, ink);
  }
  c.StrokeRect(left, top, pw + 1, ph + 1, ink);
  if (!o.x_label.empty()) c.Text(left + (pw - TextWidth(o.x_label)) / 2, o.height - 14, o.x_label, ink);
  if (!o.y_label.empty()) c.TextVertical(6, top + (ph - TextWidth(o.y_label)) / 2, o.y_label, ink);

  // Data: lines first, then markers and point labels on top.
  for (const Series& s : series) {
    if (!s.line) continue;
    for (size_t i = 1; i < s.x.size(); ++i) {
      c.Line(px(s.x[i - 1]), py(s.y[i - 1]), px(s.x[i]), py(s.y[i]), s.color, 2, s.dashed ? 5 : 0);
    }
  }
  // Point labels go above-right of their point; a label that would overlap one already drawn is
  // moved up in steps, and left out if it still collides (coincident points).
  struct Box {
    int x, y, w, h;
  };
  std::vector<Box> labels;
  auto overlaps = [&](const Box& b) {
    return std::any_of(labels.begin(), labels.end(), [&](const Box& o) {
      return b.x < o.x + o.w && o.x < b.x + b.w && b.y < o.y + o.h && o.y < b.y + b.h;
    });
  };
  for (const Series& s : series) {
    for (size_t i = 0; i < s.x.size(); ++i) {
      c.DrawMarker(px(s.x[i]), py(s.y[i]), s.marker, s.color, 8);
      if (s.point_labels.empty() || s.point_labels[i].empty()) continue;
      for (int attempt = 0; attempt < 4; ++attempt) {
        const Box b{px(s.x[i]) + 6, py(s.y[i]) - 10 - attempt * 9, TextWidth(s.point_labels[i]) + 1, 8};
        if (overlaps(b)) continue;
        c.Text(b.x, b.y, s.point_labels[i], s.color);
        labels.push_back(b);
        break;
      }
    }
  }
  // Legend: inside the plot area, in the corner that hides the fewest data points (top right on
  // a tie).
  if (o.legend) {
    int n = 0, w = 0;
    for (const Series& s : series) {
      if (s.label.empty()) continue;
      ++n;
      w = std::max(w, TextWidth(s.label));
    }
    if (n > 0) {
      const int lw = w + 34, lh = n * 12 + 6;
      const int corners[4][2] = {{left + pw - lw - 6, top + 6},
                                 {left + 6, top + 6},
                                 {left + pw - lw - 6, top + ph - lh - 6},
                                 {left + 6, top + ph - lh - 6}};
      int lx = corners[0][0], ly = corners[0][1], fewest = -1;
      for (const auto& corner : corners) {
        int hidden = 0;
        for (const Series& s : series) {
          for (size_t i = 0; i < s.x.size(); ++i) {
            const int x = px(s.x[i]), y = py(s.y[i]);
            hidden += x >= corner[0] - 8 && x <= corner[0] + lw + 8 && y >= corner[1] - 8 &&
                      y <= corner[1] + lh + 8;
          }
        }
        if (fewest < 0 || hidden < fewest) {
          fewest = hidden;
          lx = corner[0];
          ly = corner[1];
        }
      }
      c.FillRect(lx, ly, lw, lh, {255, 255, 255});
      c.StrokeRect(lx, ly, lw, lh, {160, 160, 160});
      int row = 0;
      for (const Series& s : series) {
        if (s.label.empty()) continue;
        const int y = ly + 6 + row * 12 + 3;
        if (s.line) c.Line(lx + 4, y, lx + 22, y, s.color, 2, s.dashed ? 4 : 0);
        c.DrawMarker(lx + 13, y, s.marker, s.color, 6);
        c.Text(lx + 28, y - 3, s.label, ink);
        ++row;
      }
    }
  }
  return c.image();
}

}  // namespace perfusion

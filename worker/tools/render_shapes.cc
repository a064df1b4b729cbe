// perfusion-render-shapes: writes shapes-world images (PNG) and their captions, for looking at the
// world the tiny model is trained on and for making concept upload sets.
//
//   perfusion-render-shapes --out DIR [--n 16] [--seed 1] [--size 32] [--concept NAME]
//                           [--open-textures X] [--sheet]
//
// Writes DIR/000000.png ... and DIR/captions.tsv (file, caption and the labels of the first object).
#include <c10/util/Exception.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "perfusion/image_io.h"
#include "perfusion/shapes_world.h"

namespace {

constexpr char kUsage[] =
    "Usage: perfusion-render-shapes --out DIR [options]\n"
    "\n"
    "Renders shapes-world images as PNG files DIR/000000.png ... and writes DIR/captions.tsv\n"
    "(file, caption, shape, color, color2, texture, size, position, background, objects, concept).\n"
    "\n"
    "Options:\n"
    "  --out DIR          output folder, created if missing (required)\n"
    "  --n N              number of images (default 16)\n"
    "  --seed S           64-bit seed; image i uses DeriveSeed(S, i) (default 1)\n"
    "  --size PX          image side in pixels, 8..1024 (default 32)\n"
    "  --concept NAME     render a builtin concept instead of base scenes\n"
    "  --open-textures X  fraction of textured base objects in a concept pattern (angled, ringed,\n"
    "                     chevron), as perfusion-train-base --open-textures (default 0)\n"
    "  --sheet            also write DIR/sheet.png, all images in a grid, 4x enlarged\n"
    "  --list-concepts    print the builtin concepts and exit\n"
    "  --help             print this help and exit\n";

struct Args {
  std::string out;
  int n = 16;
  uint64_t seed = 1;
  int size = 32;
  std::string concept_name;
  double open_textures = 0;
  bool sheet = false;
  bool list_concepts = false;
};

[[noreturn]] void UsageError(const std::string& message) {
  std::cerr << "perfusion-render-shapes: " << message << "\n\n" << kUsage;
  std::exit(2);
}

uint64_t ParseUnsigned(const std::string& flag, const std::string& value, uint64_t max) {
  errno = 0;
  char* end = nullptr;
  const unsigned long long v = std::strtoull(value.c_str(), &end, 10);
  if (value.empty() || value[0] == '-' || *end != '\0' || errno != 0 || v > max) {
    UsageError(flag + ": expected an integer in [0, " + std::to_string(max) + "], got '" + value + "'");
  }
  return v;
}

Args ParseArgs(int argc, char** argv) {
  Args args;
  const std::map<std::string, bool> takes_value = {{"--out", true},    {"--n", true},     {"--seed", true},
                                                   {"--size", true},   {"--concept", true}, {"--sheet", false}, {"--open-textures", true},
                                                   {"--list-concepts", false}, {"--help", false}};
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i], value;
    const size_t eq = flag.find('=');
    const bool inline_value = flag.rfind("--", 0) == 0 && eq != std::string::npos;
    if (inline_value) {
      value = flag.substr(eq + 1);
      flag = flag.substr(0, eq);
    }
    auto it = takes_value.find(flag);
    if (it == takes_value.end()) UsageError("unknown argument '" + std::string(argv[i]) + "'");
    if (it->second && !inline_value) {
      if (i + 1 >= argc) UsageError(flag + " needs a value");
      value = argv[++i];
    } else if (!it->second && inline_value) {
      UsageError(flag + " takes no value");
    }
    if (flag == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (flag == "--out") {
      args.out = value;
    } else if (flag == "--n") {
      args.n = static_cast<int>(ParseUnsigned(flag, value, 1000000));
    } else if (flag == "--seed") {
      args.seed = ParseUnsigned(flag, value, UINT64_MAX);
    } else if (flag == "--size") {
      args.size = static_cast<int>(ParseUnsigned(flag, value, 1024));
      if (args.size < 8) UsageError("--size must be in [8, 1024], got " + value);
    } else if (flag == "--concept") {
      args.concept_name = value;
    } else if (flag == "--open-textures") {
      char* end = nullptr;
      args.open_textures = std::strtod(value.c_str(), &end);
      if (value.empty() || *end != '\0' || !(args.open_textures >= 0 && args.open_textures <= 1)) {
        UsageError("--open-textures: expected a number in [0, 1], got '" + value + "'");
      }
    } else if (flag == "--sheet") {
      args.sheet = true;
    } else if (flag == "--list-concepts") {
      args.list_concepts = true;
    }
  }
  if (!args.list_concepts && args.out.empty()) UsageError("--out is required");
  return args;
}

// All images in a grid of up to 8 columns, each enlarged `zoom` times, 2 px apart on dark gray.
perfusion::Image ContactSheet(const std::vector<perfusion::Image>& images, int zoom) {
  const int cols = std::min<int>(8, static_cast<int>(images.size()));
  const int rows = (static_cast<int>(images.size()) + cols - 1) / cols;
  const int cell = images[0].width * zoom + 2;
  perfusion::Image sheet(cols * cell + 2, rows * cell + 2);
  std::fill(sheet.rgb.begin(), sheet.rgb.end(), 48);
  for (size_t k = 0; k < images.size(); ++k) {
    const int ox = 2 + static_cast<int>(k % cols) * cell, oy = 2 + static_cast<int>(k / cols) * cell;
    const auto& im = images[k];
    for (int y = 0; y < im.height * zoom; ++y) {
      for (int x = 0; x < im.width * zoom; ++x) {
        const uint8_t* src = im.at(x / zoom, y / zoom);
        std::copy(src, src + 3, sheet.at(ox + x, oy + y));
      }
    }
  }
  return sheet;
}

void WriteFile(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  TORCH_CHECK(f.good(), "cannot write ", path.string());
}

int Run(const Args& args) {
  using namespace perfusion;
  if (args.list_concepts) {
    for (const auto& c : BuiltinConcepts()) {
      std::cout << c.name << "\tsuperclass=" << c.superclass << "\t" << c.description << "\n";
    }
    return 0;
  }
  std::vector<Sample> samples;
  if (!args.concept_name.empty()) {
    samples = RenderConcept(FindConcept(args.concept_name), args.n, args.seed, args.size);
  } else {
    WorldOptions options;
    options.size = args.size;
    options.open_texture_prob = args.open_textures;
    for (int i = 0; i < args.n; ++i) samples.push_back(RenderRandom(DeriveSeed(args.seed, i), options));
  }
  std::filesystem::create_directories(args.out);
  const std::filesystem::path dir(args.out);
  std::ofstream tsv(dir / "captions.tsv");
  tsv << "file\tcaption\tshape\tcolor\tcolor2\ttexture\tsize\tposition\tbackground\tobjects\tconcept\n";
  std::vector<Image> images;
  for (size_t i = 0; i < samples.size(); ++i) {
    char name[32];
    std::snprintf(name, sizeof name, "%06zu.png", i);
    WriteFile(dir / name, EncodePng(samples[i].image));
    const ObjectSpec& o = samples[i].scene.objects[0];
    tsv << name << '\t' << samples[i].caption << '\t' << ShapeName(o.shape) << '\t' << ColorName(o.color) << '\t'
        << (o.color2 ? ColorName(*o.color2) : "-") << '\t'
        << TextureName(o.texture) << '\t' << SizeName(o.size) << '\t'
        << PositionName(o.position) << '\t' << ColorName(samples[i].scene.background) << '\t'
        << samples[i].scene.objects.size() << '\t' << (o.concept_name.empty() ? "-" : o.concept_name) << '\n';
    images.push_back(samples[i].image);
  }
  TORCH_CHECK(tsv.good(), "cannot write ", (dir / "captions.tsv").string());
  if (args.sheet && !images.empty()) WriteFile(dir / "sheet.png", EncodePng(ContactSheet(images, 4)));
  std::cout << "wrote " << samples.size() << " images and captions.tsv to " << args.out << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = ParseArgs(argc, argv);
  try {
    return Run(args);
  } catch (const c10::Error& e) {
    std::cerr << "perfusion-render-shapes: " << e.what_without_backtrace() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "perfusion-render-shapes: " << e.what() << "\n";
  }
  return 1;
}

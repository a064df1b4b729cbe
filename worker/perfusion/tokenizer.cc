// tokenizer: the CLIP byte-level BPE tokenizer. See tokenizer.h for the pipeline and its limits.
#include "perfusion/tokenizer.h"

#include <c10/util/Exception.h>
#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <climits>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string_view>
#include <utility>

namespace perfusion {
namespace {

// ---------------------------------------------------------------------------------------------
// Unicode data, generated once and kept as data, not code. \p{L} / \p{N} come from the Python
// `regex` module that SimpleTokenizer's pattern runs on (2022.10.31, Unicode 15.0); the rest from
// Python 3.11's str methods and unicodedata (Unicode 14.0), which is what CLIP's cleanup calls:
//   kLetterRanges  regex [\p{L}] (general category Lu Ll Lt Lm Lo)
//   kNumberRanges  regex [\p{N}] (Nd Nl No)
//   kCasedRanges   Unicode "Cased" (c.islower() or c.isupper() or c.istitle())     -> final sigma
//   kSpaceChars    chr(c).isspace(): what Python's \s and str.strip() treat as whitespace
//   kLowerRuns     chr(c).lower() for the one-character mappings, as runs {first, last, stride,
//                  delta}: c in [first, last] with (c - first) % stride == 0 maps to c + delta
//                  (U+0130 -> "i\u0307" and final sigma are handled in code)
//   kWidthRuns     ftfy's WIDTH_MAP (NFKC of U+FF01..U+FFEF, and U+3000 -> ' ') in the same form
//                  (U+FFE3 -> " \u0304" is handled in code)
//   kCp1252C1      U+0080..U+009F read as Windows-1252 (undefined bytes map to themselves), as
//                  ftfy's fix_c1_controls and Python's html._invalid_charrefs both do
//   kNamedEntities html.entities.html5 values: the no-semicolon (HTML 4 Latin-1) names, which
//                  also match without ';' (legacy = true), and common typographic names (';' only)
// Each table is sorted by its first field; lookups are binary searches.
// ---------------------------------------------------------------------------------------------
struct CodeRange {
  char32_t lo;
  char32_t hi;
};
struct CharRun {
  char32_t first;
  char32_t last;
  int32_t stride;
  int32_t delta;
};
struct NamedEntity {
  const char* name;   // without ';'
  const char* value;  // UTF-8
  bool legacy;        // also recognised without a trailing ';'
};

constexpr CodeRange kLetterRanges[] = {
    {0x41, 0x5A}, {0x61, 0x7A}, {0xAA, 0xAA}, {0xB5, 0xB5}, {0xBA, 0xBA}, {0xC0, 0xD6},
    {0xD8, 0xF6}, {0xF8, 0x2C1}, {0x2C6, 0x2D1}, {0x2E0, 0x2E4}, {0x2EC, 0x2EC}, {0x2EE, 0x2EE},
    {0x370, 0x374}, {0x376, 0x377}, {0x37A, 0x37D}, {0x37F, 0x37F}, {0x386, 0x386}, {0x388, 0x38A},
    {0x38C, 0x38C}, {0x38E, 0x3A1}, {0x3A3, 0x3F5}, {0x3F7, 0x481}, {0x48A, 0x52F}, {0x531, 0x556},
    {0x559, 0x559}, {0x560, 0x588}, {0x5D0, 0x5EA}, {0x5EF, 0x5F2}, {0x620, 0x64A}, {0x66E, 0x66F},
    {0x671, 0x6D3}, {0x6D5, 0x6D5}, {0x6E5, 0x6E6}, {0x6EE, 0x6EF}, {0x6FA, 0x6FC}, {0x6FF, 0x6FF},
    {0x710, 0x710}, {0x712, 0x72F}, {0x74D, 0x7A5}, {0x7B1, 0x7B1}, {0x7CA, 0x7EA}, {0x7F4, 0x7F5},
    {0x7FA, 0x7FA}, {0x800, 0x815}, {0x81A, 0x81A}, {0x824, 0x824}, {0x828, 0x828}, {0x840, 0x858},
    {0x860, 0x86A}, {0x870, 0x887}, {0x889, 0x88E}, {0x8A0, 0x8C9}, {0x904, 0x939}, {0x93D, 0x93D},
    {0x950, 0x950}, {0x958, 0x961}, {0x971, 0x980}, {0x985, 0x98C}, {0x98F, 0x990}, {0x993, 0x9A8},
    {0x9AA, 0x9B0}, {0x9B2, 0x9B2}, {0x9B6, 0x9B9}, {0x9BD, 0x9BD}, {0x9CE, 0x9CE}, {0x9DC, 0x9DD},
    {0x9DF, 0x9E1}, {0x9F0, 0x9F1}, {0x9FC, 0x9FC}, {0xA05, 0xA0A}, {0xA0F, 0xA10}, {0xA13, 0xA28},
    {0xA2A, 0xA30}, {0xA32, 0xA33}, {0xA35, 0xA36}, {0xA38, 0xA39}, {0xA59, 0xA5C}, {0xA5E, 0xA5E},
    {0xA72, 0xA74}, {0xA85, 0xA8D}, {0xA8F, 0xA91}, {0xA93, 0xAA8}, {0xAAA, 0xAB0}, {0xAB2, 0xAB3},
    {0xAB5, 0xAB9}, {0xABD, 0xABD}, {0xAD0, 0xAD0}, {0xAE0, 0xAE1}, {0xAF9, 0xAF9}, {0xB05, 0xB0C},
    {0xB0F, 0xB10}, {0xB13, 0xB28}, {0xB2A, 0xB30}, {0xB32, 0xB33}, {0xB35, 0xB39}, {0xB3D, 0xB3D},
    {0xB5C, 0xB5D}, {0xB5F, 0xB61}, {0xB71, 0xB71}, {0xB83, 0xB83}, {0xB85, 0xB8A}, {0xB8E, 0xB90},
    {0xB92, 0xB95}, {0xB99, 0xB9A}, {0xB9C, 0xB9C}, {0xB9E, 0xB9F}, {0xBA3, 0xBA4}, {0xBA8, 0xBAA},
    {0xBAE, 0xBB9}, {0xBD0, 0xBD0}, {0xC05, 0xC0C}, {0xC0E, 0xC10}, {0xC12, 0xC28}, {0xC2A, 0xC39},
    {0xC3D, 0xC3D}, {0xC58, 0xC5A}, {0xC5D, 0xC5D}, {0xC60, 0xC61}, {0xC80, 0xC80}, {0xC85, 0xC8C},
    {0xC8E, 0xC90}, {0xC92, 0xCA8}, {0xCAA, 0xCB3}, {0xCB5, 0xCB9}, {0xCBD, 0xCBD}, {0xCDD, 0xCDE},
    {0xCE0, 0xCE1}, {0xCF1, 0xCF2}, {0xD04, 0xD0C}, {0xD0E, 0xD10}, {0xD12, 0xD3A}, {0xD3D, 0xD3D},
    {0xD4E, 0xD4E}, {0xD54, 0xD56}, {0xD5F, 0xD61}, {0xD7A, 0xD7F}, {0xD85, 0xD96}, {0xD9A, 0xDB1},
    {0xDB3, 0xDBB}, {0xDBD, 0xDBD}, {0xDC0, 0xDC6}, {0xE01, 0xE30}, {0xE32, 0xE33}, {0xE40, 0xE46},
    {0xE81, 0xE82}, {0xE84, 0xE84}, {0xE86, 0xE8A}, {0xE8C, 0xEA3}, {0xEA5, 0xEA5}, {0xEA7, 0xEB0},
    {0xEB2, 0xEB3}, {0xEBD, 0xEBD}, {0xEC0, 0xEC4}, {0xEC6, 0xEC6}, {0xEDC, 0xEDF}, {0xF00, 0xF00},
    {0xF40, 0xF47}, {0xF49, 0xF6C}, {0xF88, 0xF8C}, {0x1000, 0x102A}, {0x103F, 0x103F},
    {0x1050, 0x1055}, {0x105A, 0x105D}, {0x1061, 0x1061}, {0x1065, 0x1066}, {0x106E, 0x1070},
    {0x1075, 0x1081}, {0x108E, 0x108E}, {0x10A0, 0x10C5}, {0x10C7, 0x10C7}, {0x10CD, 0x10CD},
    {0x10D0, 0x10FA}, {0x10FC, 0x1248}, {0x124A, 0x124D}, {0x1250, 0x1256}, {0x1258, 0x1258},
    {0x125A, 0x125D}, {0x1260, 0x1288}, {0x128A, 0x128D}, {0x1290, 0x12B0}, {0x12B2, 0x12B5},
    {0x12B8, 0x12BE}, {0x12C0, 0x12C0}, {0x12C2, 0x12C5}, {0x12C8, 0x12D6}, {0x12D8, 0x1310},
    {0x1312, 0x1315}, {0x1318, 0x135A}, {0x1380, 0x138F}, {0x13A0, 0x13F5}, {0x13F8, 0x13FD},
    {0x1401, 0x166C}, {0x166F, 0x167F}, {0x1681, 0x169A}, {0x16A0, 0x16EA}, {0x16F1, 0x16F8},
    {0x1700, 0x1711}, {0x171F, 0x1731}, {0x1740, 0x1751}, {0x1760, 0x176C}, {0x176E, 0x1770},
    {0x1780, 0x17B3}, {0x17D7, 0x17D7}, {0x17DC, 0x17DC}, {0x1820, 0x1878}, {0x1880, 0x1884},
    {0x1887, 0x18A8}, {0x18AA, 0x18AA}, {0x18B0, 0x18F5}, {0x1900, 0x191E}, {0x1950, 0x196D},
    {0x1970, 0x1974}, {0x1980, 0x19AB}, {0x19B0, 0x19C9}, {0x1A00, 0x1A16}, {0x1A20, 0x1A54},
    {0x1AA7, 0x1AA7}, {0x1B05, 0x1B33}, {0x1B45, 0x1B4C}, {0x1B83, 0x1BA0}, {0x1BAE, 0x1BAF},
    {0x1BBA, 0x1BE5}, {0x1C00, 0x1C23}, {0x1C4D, 0x1C4F}, {0x1C5A, 0x1C7D}, {0x1C80, 0x1C88},
    {0x1C90, 0x1CBA}, {0x1CBD, 0x1CBF}, {0x1CE9, 0x1CEC}, {0x1CEE, 0x1CF3}, {0x1CF5, 0x1CF6},
    {0x1CFA, 0x1CFA}, {0x1D00, 0x1DBF}, {0x1E00, 0x1F15}, {0x1F18, 0x1F1D}, {0x1F20, 0x1F45},
    {0x1F48, 0x1F4D}, {0x1F50, 0x1F57}, {0x1F59, 0x1F59}, {0x1F5B, 0x1F5B}, {0x1F5D, 0x1F5D},
    {0x1F5F, 0x1F7D}, {0x1F80, 0x1FB4}, {0x1FB6, 0x1FBC}, {0x1FBE, 0x1FBE}, {0x1FC2, 0x1FC4},
    {0x1FC6, 0x1FCC}, {0x1FD0, 0x1FD3}, {0x1FD6, 0x1FDB}, {0x1FE0, 0x1FEC}, {0x1FF2, 0x1FF4},
    {0x1FF6, 0x1FFC}, {0x2071, 0x2071}, {0x207F, 0x207F}, {0x2090, 0x209C}, {0x2102, 0x2102},
    {0x2107, 0x2107}, {0x210A, 0x2113}, {0x2115, 0x2115}, {0x2119, 0x211D}, {0x2124, 0x2124},
    {0x2126, 0x2126}, {0x2128, 0x2128}, {0x212A, 0x212D}, {0x212F, 0x2139}, {0x213C, 0x213F},
    {0x2145, 0x2149}, {0x214E, 0x214E}, {0x2183, 0x2184}, {0x2C00, 0x2CE4}, {0x2CEB, 0x2CEE},
    {0x2CF2, 0x2CF3}, {0x2D00, 0x2D25}, {0x2D27, 0x2D27}, {0x2D2D, 0x2D2D}, {0x2D30, 0x2D67},
    {0x2D6F, 0x2D6F}, {0x2D80, 0x2D96}, {0x2DA0, 0x2DA6}, {0x2DA8, 0x2DAE}, {0x2DB0, 0x2DB6},
    {0x2DB8, 0x2DBE}, {0x2DC0, 0x2DC6}, {0x2DC8, 0x2DCE}, {0x2DD0, 0x2DD6}, {0x2DD8, 0x2DDE},
    {0x2E2F, 0x2E2F}, {0x3005, 0x3006}, {0x3031, 0x3035}, {0x303B, 0x303C}, {0x3041, 0x3096},
    {0x309D, 0x309F}, {0x30A1, 0x30FA}, {0x30FC, 0x30FF}, {0x3105, 0x312F}, {0x3131, 0x318E},
    {0x31A0, 0x31BF}, {0x31F0, 0x31FF}, {0x3400, 0x4DBF}, {0x4E00, 0xA48C}, {0xA4D0, 0xA4FD},
    {0xA500, 0xA60C}, {0xA610, 0xA61F}, {0xA62A, 0xA62B}, {0xA640, 0xA66E}, {0xA67F, 0xA69D},
    {0xA6A0, 0xA6E5}, {0xA717, 0xA71F}, {0xA722, 0xA788}, {0xA78B, 0xA7CA}, {0xA7D0, 0xA7D1},
    {0xA7D3, 0xA7D3}, {0xA7D5, 0xA7D9}, {0xA7F2, 0xA801}, {0xA803, 0xA805}, {0xA807, 0xA80A},
    {0xA80C, 0xA822}, {0xA840, 0xA873}, {0xA882, 0xA8B3}, {0xA8F2, 0xA8F7}, {0xA8FB, 0xA8FB},
    {0xA8FD, 0xA8FE}, {0xA90A, 0xA925}, {0xA930, 0xA946}, {0xA960, 0xA97C}, {0xA984, 0xA9B2},
    {0xA9CF, 0xA9CF}, {0xA9E0, 0xA9E4}, {0xA9E6, 0xA9EF}, {0xA9FA, 0xA9FE}, {0xAA00, 0xAA28},
    {0xAA40, 0xAA42}, {0xAA44, 0xAA4B}, {0xAA60, 0xAA76}, {0xAA7A, 0xAA7A}, {0xAA7E, 0xAAAF},
    {0xAAB1, 0xAAB1}, {0xAAB5, 0xAAB6}, {0xAAB9, 0xAABD}, {0xAAC0, 0xAAC0}, {0xAAC2, 0xAAC2},
    {0xAADB, 0xAADD}, {0xAAE0, 0xAAEA}, {0xAAF2, 0xAAF4}, {0xAB01, 0xAB06}, {0xAB09, 0xAB0E},
    {0xAB11, 0xAB16}, {0xAB20, 0xAB26}, {0xAB28, 0xAB2E}, {0xAB30, 0xAB5A}, {0xAB5C, 0xAB69},
    {0xAB70, 0xABE2}, {0xAC00, 0xD7A3}, {0xD7B0, 0xD7C6}, {0xD7CB, 0xD7FB}, {0xF900, 0xFA6D},
    {0xFA70, 0xFAD9}, {0xFB00, 0xFB06}, {0xFB13, 0xFB17}, {0xFB1D, 0xFB1D}, {0xFB1F, 0xFB28},
    {0xFB2A, 0xFB36}, {0xFB38, 0xFB3C}, {0xFB3E, 0xFB3E}, {0xFB40, 0xFB41}, {0xFB43, 0xFB44},
    {0xFB46, 0xFBB1}, {0xFBD3, 0xFD3D}, {0xFD50, 0xFD8F}, {0xFD92, 0xFDC7}, {0xFDF0, 0xFDFB},
    {0xFE70, 0xFE74}, {0xFE76, 0xFEFC}, {0xFF21, 0xFF3A}, {0xFF41, 0xFF5A}, {0xFF66, 0xFFBE},
    {0xFFC2, 0xFFC7}, {0xFFCA, 0xFFCF}, {0xFFD2, 0xFFD7}, {0xFFDA, 0xFFDC}, {0x10000, 0x1000B},
    {0x1000D, 0x10026}, {0x10028, 0x1003A}, {0x1003C, 0x1003D}, {0x1003F, 0x1004D},
    {0x10050, 0x1005D}, {0x10080, 0x100FA}, {0x10280, 0x1029C}, {0x102A0, 0x102D0},
    {0x10300, 0x1031F}, {0x1032D, 0x10340}, {0x10342, 0x10349}, {0x10350, 0x10375},
    {0x10380, 0x1039D}, {0x103A0, 0x103C3}, {0x103C8, 0x103CF}, {0x10400, 0x1049D},
    {0x104B0, 0x104D3}, {0x104D8, 0x104FB}, {0x10500, 0x10527}, {0x10530, 0x10563},
    {0x10570, 0x1057A}, {0x1057C, 0x1058A}, {0x1058C, 0x10592}, {0x10594, 0x10595},
    {0x10597, 0x105A1}, {0x105A3, 0x105B1}, {0x105B3, 0x105B9}, {0x105BB, 0x105BC},
    {0x10600, 0x10736}, {0x10740, 0x10755}, {0x10760, 0x10767}, {0x10780, 0x10785},
    {0x10787, 0x107B0}, {0x107B2, 0x107BA}, {0x10800, 0x10805}, {0x10808, 0x10808},
    {0x1080A, 0x10835}, {0x10837, 0x10838}, {0x1083C, 0x1083C}, {0x1083F, 0x10855},
    {0x10860, 0x10876}, {0x10880, 0x1089E}, {0x108E0, 0x108F2}, {0x108F4, 0x108F5},
    {0x10900, 0x10915}, {0x10920, 0x10939}, {0x10980, 0x109B7}, {0x109BE, 0x109BF},
    {0x10A00, 0x10A00}, {0x10A10, 0x10A13}, {0x10A15, 0x10A17}, {0x10A19, 0x10A35},
    {0x10A60, 0x10A7C}, {0x10A80, 0x10A9C}, {0x10AC0, 0x10AC7}, {0x10AC9, 0x10AE4},
    {0x10B00, 0x10B35}, {0x10B40, 0x10B55}, {0x10B60, 0x10B72}, {0x10B80, 0x10B91},
    {0x10C00, 0x10C48}, {0x10C80, 0x10CB2}, {0x10CC0, 0x10CF2}, {0x10D00, 0x10D23},
    {0x10E80, 0x10EA9}, {0x10EB0, 0x10EB1}, {0x10F00, 0x10F1C}, {0x10F27, 0x10F27},
    {0x10F30, 0x10F45}, {0x10F70, 0x10F81}, {0x10FB0, 0x10FC4}, {0x10FE0, 0x10FF6},
    {0x11003, 0x11037}, {0x11071, 0x11072}, {0x11075, 0x11075}, {0x11083, 0x110AF},
    {0x110D0, 0x110E8}, {0x11103, 0x11126}, {0x11144, 0x11144}, {0x11147, 0x11147},
    {0x11150, 0x11172}, {0x11176, 0x11176}, {0x11183, 0x111B2}, {0x111C1, 0x111C4},
    {0x111DA, 0x111DA}, {0x111DC, 0x111DC}, {0x11200, 0x11211}, {0x11213, 0x1122B},
    {0x1123F, 0x11240}, {0x11280, 0x11286}, {0x11288, 0x11288}, {0x1128A, 0x1128D},
    {0x1128F, 0x1129D}, {0x1129F, 0x112A8}, {0x112B0, 0x112DE}, {0x11305, 0x1130C},
    {0x1130F, 0x11310}, {0x11313, 0x11328}, {0x1132A, 0x11330}, {0x11332, 0x11333},
    {0x11335, 0x11339}, {0x1133D, 0x1133D}, {0x11350, 0x11350}, {0x1135D, 0x11361},
    {0x11400, 0x11434}, {0x11447, 0x1144A}, {0x1145F, 0x11461}, {0x11480, 0x114AF},
    {0x114C4, 0x114C5}, {0x114C7, 0x114C7}, {0x11580, 0x115AE}, {0x115D8, 0x115DB},
    {0x11600, 0x1162F}, {0x11644, 0x11644}, {0x11680, 0x116AA}, {0x116B8, 0x116B8},
    {0x11700, 0x1171A}, {0x11740, 0x11746}, {0x11800, 0x1182B}, {0x118A0, 0x118DF},
    {0x118FF, 0x11906}, {0x11909, 0x11909}, {0x1190C, 0x11913}, {0x11915, 0x11916},
    {0x11918, 0x1192F}, {0x1193F, 0x1193F}, {0x11941, 0x11941}, {0x119A0, 0x119A7},
    {0x119AA, 0x119D0}, {0x119E1, 0x119E1}, {0x119E3, 0x119E3}, {0x11A00, 0x11A00},
    {0x11A0B, 0x11A32}, {0x11A3A, 0x11A3A}, {0x11A50, 0x11A50}, {0x11A5C, 0x11A89},
    {0x11A9D, 0x11A9D}, {0x11AB0, 0x11AF8}, {0x11C00, 0x11C08}, {0x11C0A, 0x11C2E},
    {0x11C40, 0x11C40}, {0x11C72, 0x11C8F}, {0x11D00, 0x11D06}, {0x11D08, 0x11D09},
    {0x11D0B, 0x11D30}, {0x11D46, 0x11D46}, {0x11D60, 0x11D65}, {0x11D67, 0x11D68},
    {0x11D6A, 0x11D89}, {0x11D98, 0x11D98}, {0x11EE0, 0x11EF2}, {0x11F02, 0x11F02},
    {0x11F04, 0x11F10}, {0x11F12, 0x11F33}, {0x11FB0, 0x11FB0}, {0x12000, 0x12399},
    {0x12480, 0x12543}, {0x12F90, 0x12FF0}, {0x13000, 0x1342F}, {0x13441, 0x13446},
    {0x14400, 0x14646}, {0x16800, 0x16A38}, {0x16A40, 0x16A5E}, {0x16A70, 0x16ABE},
    {0x16AD0, 0x16AED}, {0x16B00, 0x16B2F}, {0x16B40, 0x16B43}, {0x16B63, 0x16B77},
    {0x16B7D, 0x16B8F}, {0x16E40, 0x16E7F}, {0x16F00, 0x16F4A}, {0x16F50, 0x16F50},
    {0x16F93, 0x16F9F}, {0x16FE0, 0x16FE1}, {0x16FE3, 0x16FE3}, {0x17000, 0x187F7},
    {0x18800, 0x18CD5}, {0x18D00, 0x18D08}, {0x1AFF0, 0x1AFF3}, {0x1AFF5, 0x1AFFB},
    {0x1AFFD, 0x1AFFE}, {0x1B000, 0x1B122}, {0x1B132, 0x1B132}, {0x1B150, 0x1B152},
    {0x1B155, 0x1B155}, {0x1B164, 0x1B167}, {0x1B170, 0x1B2FB}, {0x1BC00, 0x1BC6A},
    {0x1BC70, 0x1BC7C}, {0x1BC80, 0x1BC88}, {0x1BC90, 0x1BC99}, {0x1D400, 0x1D454},
    {0x1D456, 0x1D49C}, {0x1D49E, 0x1D49F}, {0x1D4A2, 0x1D4A2}, {0x1D4A5, 0x1D4A6},
    {0x1D4A9, 0x1D4AC}, {0x1D4AE, 0x1D4B9}, {0x1D4BB, 0x1D4BB}, {0x1D4BD, 0x1D4C3},
    {0x1D4C5, 0x1D505}, {0x1D507, 0x1D50A}, {0x1D50D, 0x1D514}, {0x1D516, 0x1D51C},
    {0x1D51E, 0x1D539}, {0x1D53B, 0x1D53E}, {0x1D540, 0x1D544}, {0x1D546, 0x1D546},
    {0x1D54A, 0x1D550}, {0x1D552, 0x1D6A5}, {0x1D6A8, 0x1D6C0}, {0x1D6C2, 0x1D6DA},
    {0x1D6DC, 0x1D6FA}, {0x1D6FC, 0x1D714}, {0x1D716, 0x1D734}, {0x1D736, 0x1D74E},
    {0x1D750, 0x1D76E}, {0x1D770, 0x1D788}, {0x1D78A, 0x1D7A8}, {0x1D7AA, 0x1D7C2},
    {0x1D7C4, 0x1D7CB}, {0x1DF00, 0x1DF1E}, {0x1DF25, 0x1DF2A}, {0x1E030, 0x1E06D},
    {0x1E100, 0x1E12C}, {0x1E137, 0x1E13D}, {0x1E14E, 0x1E14E}, {0x1E290, 0x1E2AD},
    {0x1E2C0, 0x1E2EB}, {0x1E4D0, 0x1E4EB}, {0x1E7E0, 0x1E7E6}, {0x1E7E8, 0x1E7EB},
    {0x1E7ED, 0x1E7EE}, {0x1E7F0, 0x1E7FE}, {0x1E800, 0x1E8C4}, {0x1E900, 0x1E943},
    {0x1E94B, 0x1E94B}, {0x1EE00, 0x1EE03}, {0x1EE05, 0x1EE1F}, {0x1EE21, 0x1EE22},
    {0x1EE24, 0x1EE24}, {0x1EE27, 0x1EE27}, {0x1EE29, 0x1EE32}, {0x1EE34, 0x1EE37},
    {0x1EE39, 0x1EE39}, {0x1EE3B, 0x1EE3B}, {0x1EE42, 0x1EE42}, {0x1EE47, 0x1EE47},
    {0x1EE49, 0x1EE49}, {0x1EE4B, 0x1EE4B}, {0x1EE4D, 0x1EE4F}, {0x1EE51, 0x1EE52},
    {0x1EE54, 0x1EE54}, {0x1EE57, 0x1EE57}, {0x1EE59, 0x1EE59}, {0x1EE5B, 0x1EE5B},
    {0x1EE5D, 0x1EE5D}, {0x1EE5F, 0x1EE5F}, {0x1EE61, 0x1EE62}, {0x1EE64, 0x1EE64},
    {0x1EE67, 0x1EE6A}, {0x1EE6C, 0x1EE72}, {0x1EE74, 0x1EE77}, {0x1EE79, 0x1EE7C},
    {0x1EE7E, 0x1EE7E}, {0x1EE80, 0x1EE89}, {0x1EE8B, 0x1EE9B}, {0x1EEA1, 0x1EEA3},
    {0x1EEA5, 0x1EEA9}, {0x1EEAB, 0x1EEBB}, {0x20000, 0x2A6DF}, {0x2A700, 0x2B739},
    {0x2B740, 0x2B81D}, {0x2B820, 0x2CEA1}, {0x2CEB0, 0x2EBE0}, {0x2F800, 0x2FA1D},
    {0x30000, 0x3134A}, {0x31350, 0x323AF},
};

constexpr CodeRange kNumberRanges[] = {
    {0x30, 0x39}, {0xB2, 0xB3}, {0xB9, 0xB9}, {0xBC, 0xBE}, {0x660, 0x669}, {0x6F0, 0x6F9},
    {0x7C0, 0x7C9}, {0x966, 0x96F}, {0x9E6, 0x9EF}, {0x9F4, 0x9F9}, {0xA66, 0xA6F}, {0xAE6, 0xAEF},
    {0xB66, 0xB6F}, {0xB72, 0xB77}, {0xBE6, 0xBF2}, {0xC66, 0xC6F}, {0xC78, 0xC7E}, {0xCE6, 0xCEF},
    {0xD58, 0xD5E}, {0xD66, 0xD78}, {0xDE6, 0xDEF}, {0xE50, 0xE59}, {0xED0, 0xED9}, {0xF20, 0xF33},
    {0x1040, 0x1049}, {0x1090, 0x1099}, {0x1369, 0x137C}, {0x16EE, 0x16F0}, {0x17E0, 0x17E9},
    {0x17F0, 0x17F9}, {0x1810, 0x1819}, {0x1946, 0x194F}, {0x19D0, 0x19DA}, {0x1A80, 0x1A89},
    {0x1A90, 0x1A99}, {0x1B50, 0x1B59}, {0x1BB0, 0x1BB9}, {0x1C40, 0x1C49}, {0x1C50, 0x1C59},
    {0x2070, 0x2070}, {0x2074, 0x2079}, {0x2080, 0x2089}, {0x2150, 0x2182}, {0x2185, 0x2189},
    {0x2460, 0x249B}, {0x24EA, 0x24FF}, {0x2776, 0x2793}, {0x2CFD, 0x2CFD}, {0x3007, 0x3007},
    {0x3021, 0x3029}, {0x3038, 0x303A}, {0x3192, 0x3195}, {0x3220, 0x3229}, {0x3248, 0x324F},
    {0x3251, 0x325F}, {0x3280, 0x3289}, {0x32B1, 0x32BF}, {0xA620, 0xA629}, {0xA6E6, 0xA6EF},
    {0xA830, 0xA835}, {0xA8D0, 0xA8D9}, {0xA900, 0xA909}, {0xA9D0, 0xA9D9}, {0xA9F0, 0xA9F9},
    {0xAA50, 0xAA59}, {0xABF0, 0xABF9}, {0xFF10, 0xFF19}, {0x10107, 0x10133}, {0x10140, 0x10178},
    {0x1018A, 0x1018B}, {0x102E1, 0x102FB}, {0x10320, 0x10323}, {0x10341, 0x10341},
    {0x1034A, 0x1034A}, {0x103D1, 0x103D5}, {0x104A0, 0x104A9}, {0x10858, 0x1085F},
    {0x10879, 0x1087F}, {0x108A7, 0x108AF}, {0x108FB, 0x108FF}, {0x10916, 0x1091B},
    {0x109BC, 0x109BD}, {0x109C0, 0x109CF}, {0x109D2, 0x109FF}, {0x10A40, 0x10A48},
    {0x10A7D, 0x10A7E}, {0x10A9D, 0x10A9F}, {0x10AEB, 0x10AEF}, {0x10B58, 0x10B5F},
    {0x10B78, 0x10B7F}, {0x10BA9, 0x10BAF}, {0x10CFA, 0x10CFF}, {0x10D30, 0x10D39},
    {0x10E60, 0x10E7E}, {0x10F1D, 0x10F26}, {0x10F51, 0x10F54}, {0x10FC5, 0x10FCB},
    {0x11052, 0x1106F}, {0x110F0, 0x110F9}, {0x11136, 0x1113F}, {0x111D0, 0x111D9},
    {0x111E1, 0x111F4}, {0x112F0, 0x112F9}, {0x11450, 0x11459}, {0x114D0, 0x114D9},
    {0x11650, 0x11659}, {0x116C0, 0x116C9}, {0x11730, 0x1173B}, {0x118E0, 0x118F2},
    {0x11950, 0x11959}, {0x11C50, 0x11C6C}, {0x11D50, 0x11D59}, {0x11DA0, 0x11DA9},
    {0x11F50, 0x11F59}, {0x11FC0, 0x11FD4}, {0x12400, 0x1246E}, {0x16A60, 0x16A69},
    {0x16AC0, 0x16AC9}, {0x16B50, 0x16B59}, {0x16B5B, 0x16B61}, {0x16E80, 0x16E96},
    {0x1D2C0, 0x1D2D3}, {0x1D2E0, 0x1D2F3}, {0x1D360, 0x1D378}, {0x1D7CE, 0x1D7FF},
    {0x1E140, 0x1E149}, {0x1E2F0, 0x1E2F9}, {0x1E4F0, 0x1E4F9}, {0x1E8C7, 0x1E8CF},
    {0x1E950, 0x1E959}, {0x1EC71, 0x1ECAB}, {0x1ECAD, 0x1ECAF}, {0x1ECB1, 0x1ECB4},
    {0x1ED01, 0x1ED2D}, {0x1ED2F, 0x1ED3D}, {0x1F100, 0x1F10C}, {0x1FBF0, 0x1FBF9},
};

constexpr CodeRange kCasedRanges[] = {
    {0x41, 0x5A}, {0x61, 0x7A}, {0xAA, 0xAA}, {0xB5, 0xB5}, {0xBA, 0xBA}, {0xC0, 0xD6},
    {0xD8, 0xF6}, {0xF8, 0x1BA}, {0x1BC, 0x1BF}, {0x1C4, 0x293}, {0x295, 0x2B8}, {0x2C0, 0x2C1},
    {0x2E0, 0x2E4}, {0x345, 0x345}, {0x370, 0x373}, {0x376, 0x377}, {0x37A, 0x37D}, {0x37F, 0x37F},
    {0x386, 0x386}, {0x388, 0x38A}, {0x38C, 0x38C}, {0x38E, 0x3A1}, {0x3A3, 0x3F5}, {0x3F7, 0x481},
    {0x48A, 0x52F}, {0x531, 0x556}, {0x560, 0x588}, {0x10A0, 0x10C5}, {0x10C7, 0x10C7},
    {0x10CD, 0x10CD}, {0x10D0, 0x10FA}, {0x10FD, 0x10FF}, {0x13A0, 0x13F5}, {0x13F8, 0x13FD},
    {0x1C80, 0x1C88}, {0x1C90, 0x1CBA}, {0x1CBD, 0x1CBF}, {0x1D00, 0x1DBF}, {0x1E00, 0x1F15},
    {0x1F18, 0x1F1D}, {0x1F20, 0x1F45}, {0x1F48, 0x1F4D}, {0x1F50, 0x1F57}, {0x1F59, 0x1F59},
    {0x1F5B, 0x1F5B}, {0x1F5D, 0x1F5D}, {0x1F5F, 0x1F7D}, {0x1F80, 0x1FB4}, {0x1FB6, 0x1FBC},
    {0x1FBE, 0x1FBE}, {0x1FC2, 0x1FC4}, {0x1FC6, 0x1FCC}, {0x1FD0, 0x1FD3}, {0x1FD6, 0x1FDB},
    {0x1FE0, 0x1FEC}, {0x1FF2, 0x1FF4}, {0x1FF6, 0x1FFC}, {0x2071, 0x2071}, {0x207F, 0x207F},
    {0x2090, 0x209C}, {0x2102, 0x2102}, {0x2107, 0x2107}, {0x210A, 0x2113}, {0x2115, 0x2115},
    {0x2119, 0x211D}, {0x2124, 0x2124}, {0x2126, 0x2126}, {0x2128, 0x2128}, {0x212A, 0x212D},
    {0x212F, 0x2134}, {0x2139, 0x2139}, {0x213C, 0x213F}, {0x2145, 0x2149}, {0x214E, 0x214E},
    {0x2160, 0x217F}, {0x2183, 0x2184}, {0x24B6, 0x24E9}, {0x2C00, 0x2CE4}, {0x2CEB, 0x2CEE},
    {0x2CF2, 0x2CF3}, {0x2D00, 0x2D25}, {0x2D27, 0x2D27}, {0x2D2D, 0x2D2D}, {0xA640, 0xA66D},
    {0xA680, 0xA69D}, {0xA722, 0xA787}, {0xA78B, 0xA78E}, {0xA790, 0xA7CA}, {0xA7D0, 0xA7D1},
    {0xA7D3, 0xA7D3}, {0xA7D5, 0xA7D9}, {0xA7F5, 0xA7F6}, {0xA7F8, 0xA7FA}, {0xAB30, 0xAB5A},
    {0xAB5C, 0xAB68}, {0xAB70, 0xABBF}, {0xFB00, 0xFB06}, {0xFB13, 0xFB17}, {0xFF21, 0xFF3A},
    {0xFF41, 0xFF5A}, {0x10400, 0x1044F}, {0x104B0, 0x104D3}, {0x104D8, 0x104FB},
    {0x10570, 0x1057A}, {0x1057C, 0x1058A}, {0x1058C, 0x10592}, {0x10594, 0x10595},
    {0x10597, 0x105A1}, {0x105A3, 0x105B1}, {0x105B3, 0x105B9}, {0x105BB, 0x105BC},
    {0x10780, 0x10780}, {0x10783, 0x10785}, {0x10787, 0x107B0}, {0x107B2, 0x107BA},
    {0x10C80, 0x10CB2}, {0x10CC0, 0x10CF2}, {0x118A0, 0x118DF}, {0x16E40, 0x16E7F},
    {0x1D400, 0x1D454}, {0x1D456, 0x1D49C}, {0x1D49E, 0x1D49F}, {0x1D4A2, 0x1D4A2},
    {0x1D4A5, 0x1D4A6}, {0x1D4A9, 0x1D4AC}, {0x1D4AE, 0x1D4B9}, {0x1D4BB, 0x1D4BB},
    {0x1D4BD, 0x1D4C3}, {0x1D4C5, 0x1D505}, {0x1D507, 0x1D50A}, {0x1D50D, 0x1D514},
    {0x1D516, 0x1D51C}, {0x1D51E, 0x1D539}, {0x1D53B, 0x1D53E}, {0x1D540, 0x1D544},
    {0x1D546, 0x1D546}, {0x1D54A, 0x1D550}, {0x1D552, 0x1D6A5}, {0x1D6A8, 0x1D6C0},
    {0x1D6C2, 0x1D6DA}, {0x1D6DC, 0x1D6FA}, {0x1D6FC, 0x1D714}, {0x1D716, 0x1D734},
    {0x1D736, 0x1D74E}, {0x1D750, 0x1D76E}, {0x1D770, 0x1D788}, {0x1D78A, 0x1D7A8},
    {0x1D7AA, 0x1D7C2}, {0x1D7C4, 0x1D7CB}, {0x1DF00, 0x1DF09}, {0x1DF0B, 0x1DF1E},
    {0x1E900, 0x1E943}, {0x1F130, 0x1F149}, {0x1F150, 0x1F169}, {0x1F170, 0x1F189},
};

constexpr char32_t kSpaceChars[] = {
    0x9, 0xA, 0xB, 0xC, 0xD, 0x1C, 0x1D, 0x1E, 0x1F, 0x20, 0x85, 0xA0, 0x1680, 0x2000, 0x2001,
    0x2002, 0x2003, 0x2004, 0x2005, 0x2006, 0x2007, 0x2008, 0x2009, 0x200A, 0x2028, 0x2029, 0x202F,
    0x205F, 0x3000,
};

constexpr CharRun kLowerRuns[] = {
    {0x41, 0x5A, 1, 32}, {0xC0, 0xD6, 1, 32}, {0xD8, 0xDE, 1, 32}, {0x100, 0x12E, 2, 1},
    {0x132, 0x136, 2, 1}, {0x139, 0x147, 2, 1}, {0x14A, 0x176, 2, 1}, {0x178, 0x178, 1, -121},
    {0x179, 0x17D, 2, 1}, {0x181, 0x181, 1, 210}, {0x182, 0x184, 2, 1}, {0x186, 0x186, 1, 206},
    {0x187, 0x187, 1, 1}, {0x189, 0x18A, 1, 205}, {0x18B, 0x18B, 1, 1}, {0x18E, 0x18E, 1, 79},
    {0x18F, 0x18F, 1, 202}, {0x190, 0x190, 1, 203}, {0x191, 0x191, 1, 1}, {0x193, 0x193, 1, 205},
    {0x194, 0x194, 1, 207}, {0x196, 0x196, 1, 211}, {0x197, 0x197, 1, 209}, {0x198, 0x198, 1, 1},
    {0x19C, 0x19C, 1, 211}, {0x19D, 0x19D, 1, 213}, {0x19F, 0x19F, 1, 214}, {0x1A0, 0x1A4, 2, 1},
    {0x1A6, 0x1A6, 1, 218}, {0x1A7, 0x1A7, 1, 1}, {0x1A9, 0x1A9, 1, 218}, {0x1AC, 0x1AC, 1, 1},
    {0x1AE, 0x1AE, 1, 218}, {0x1AF, 0x1AF, 1, 1}, {0x1B1, 0x1B2, 1, 217}, {0x1B3, 0x1B5, 2, 1},
    {0x1B7, 0x1B7, 1, 219}, {0x1B8, 0x1B8, 1, 1}, {0x1BC, 0x1BC, 1, 1}, {0x1C4, 0x1C4, 1, 2},
    {0x1C5, 0x1C5, 1, 1}, {0x1C7, 0x1C7, 1, 2}, {0x1C8, 0x1C8, 1, 1}, {0x1CA, 0x1CA, 1, 2},
    {0x1CB, 0x1DB, 2, 1}, {0x1DE, 0x1EE, 2, 1}, {0x1F1, 0x1F1, 1, 2}, {0x1F2, 0x1F4, 2, 1},
    {0x1F6, 0x1F6, 1, -97}, {0x1F7, 0x1F7, 1, -56}, {0x1F8, 0x21E, 2, 1}, {0x220, 0x220, 1, -130},
    {0x222, 0x232, 2, 1}, {0x23A, 0x23A, 1, 10795}, {0x23B, 0x23B, 1, 1}, {0x23D, 0x23D, 1, -163},
    {0x23E, 0x23E, 1, 10792}, {0x241, 0x241, 1, 1}, {0x243, 0x243, 1, -195}, {0x244, 0x244, 1, 69},
    {0x245, 0x245, 1, 71}, {0x246, 0x24E, 2, 1}, {0x370, 0x372, 2, 1}, {0x376, 0x376, 1, 1},
    {0x37F, 0x37F, 1, 116}, {0x386, 0x386, 1, 38}, {0x388, 0x38A, 1, 37}, {0x38C, 0x38C, 1, 64},
    {0x38E, 0x38F, 1, 63}, {0x391, 0x3A1, 1, 32}, {0x3A3, 0x3AB, 1, 32}, {0x3CF, 0x3CF, 1, 8},
    {0x3D8, 0x3EE, 2, 1}, {0x3F4, 0x3F4, 1, -60}, {0x3F7, 0x3F7, 1, 1}, {0x3F9, 0x3F9, 1, -7},
    {0x3FA, 0x3FA, 1, 1}, {0x3FD, 0x3FF, 1, -130}, {0x400, 0x40F, 1, 80}, {0x410, 0x42F, 1, 32},
    {0x460, 0x480, 2, 1}, {0x48A, 0x4BE, 2, 1}, {0x4C0, 0x4C0, 1, 15}, {0x4C1, 0x4CD, 2, 1},
    {0x4D0, 0x52E, 2, 1}, {0x531, 0x556, 1, 48}, {0x10A0, 0x10C5, 1, 7264},
    {0x10C7, 0x10C7, 1, 7264}, {0x10CD, 0x10CD, 1, 7264}, {0x13A0, 0x13EF, 1, 38864},
    {0x13F0, 0x13F5, 1, 8}, {0x1C90, 0x1CBA, 1, -3008}, {0x1CBD, 0x1CBF, 1, -3008},
    {0x1E00, 0x1E94, 2, 1}, {0x1E9E, 0x1E9E, 1, -7615}, {0x1EA0, 0x1EFE, 2, 1},
    {0x1F08, 0x1F0F, 1, -8}, {0x1F18, 0x1F1D, 1, -8}, {0x1F28, 0x1F2F, 1, -8},
    {0x1F38, 0x1F3F, 1, -8}, {0x1F48, 0x1F4D, 1, -8}, {0x1F59, 0x1F5F, 2, -8},
    {0x1F68, 0x1F6F, 1, -8}, {0x1F88, 0x1F8F, 1, -8}, {0x1F98, 0x1F9F, 1, -8},
    {0x1FA8, 0x1FAF, 1, -8}, {0x1FB8, 0x1FB9, 1, -8}, {0x1FBA, 0x1FBB, 1, -74},
    {0x1FBC, 0x1FBC, 1, -9}, {0x1FC8, 0x1FCB, 1, -86}, {0x1FCC, 0x1FCC, 1, -9},
    {0x1FD8, 0x1FD9, 1, -8}, {0x1FDA, 0x1FDB, 1, -100}, {0x1FE8, 0x1FE9, 1, -8},
    {0x1FEA, 0x1FEB, 1, -112}, {0x1FEC, 0x1FEC, 1, -7}, {0x1FF8, 0x1FF9, 1, -128},
    {0x1FFA, 0x1FFB, 1, -126}, {0x1FFC, 0x1FFC, 1, -9}, {0x2126, 0x2126, 1, -7517},
    {0x212A, 0x212A, 1, -8383}, {0x212B, 0x212B, 1, -8262}, {0x2132, 0x2132, 1, 28},
    {0x2160, 0x216F, 1, 16}, {0x2183, 0x2183, 1, 1}, {0x24B6, 0x24CF, 1, 26},
    {0x2C00, 0x2C2F, 1, 48}, {0x2C60, 0x2C60, 1, 1}, {0x2C62, 0x2C62, 1, -10743},
    {0x2C63, 0x2C63, 1, -3814}, {0x2C64, 0x2C64, 1, -10727}, {0x2C67, 0x2C6B, 2, 1},
    {0x2C6D, 0x2C6D, 1, -10780}, {0x2C6E, 0x2C6E, 1, -10749}, {0x2C6F, 0x2C6F, 1, -10783},
    {0x2C70, 0x2C70, 1, -10782}, {0x2C72, 0x2C72, 1, 1}, {0x2C75, 0x2C75, 1, 1},
    {0x2C7E, 0x2C7F, 1, -10815}, {0x2C80, 0x2CE2, 2, 1}, {0x2CEB, 0x2CED, 2, 1},
    {0x2CF2, 0x2CF2, 1, 1}, {0xA640, 0xA66C, 2, 1}, {0xA680, 0xA69A, 2, 1}, {0xA722, 0xA72E, 2, 1},
    {0xA732, 0xA76E, 2, 1}, {0xA779, 0xA77B, 2, 1}, {0xA77D, 0xA77D, 1, -35332},
    {0xA77E, 0xA786, 2, 1}, {0xA78B, 0xA78B, 1, 1}, {0xA78D, 0xA78D, 1, -42280},
    {0xA790, 0xA792, 2, 1}, {0xA796, 0xA7A8, 2, 1}, {0xA7AA, 0xA7AA, 1, -42308},
    {0xA7AB, 0xA7AB, 1, -42319}, {0xA7AC, 0xA7AC, 1, -42315}, {0xA7AD, 0xA7AD, 1, -42305},
    {0xA7AE, 0xA7AE, 1, -42308}, {0xA7B0, 0xA7B0, 1, -42258}, {0xA7B1, 0xA7B1, 1, -42282},
    {0xA7B2, 0xA7B2, 1, -42261}, {0xA7B3, 0xA7B3, 1, 928}, {0xA7B4, 0xA7C2, 2, 1},
    {0xA7C4, 0xA7C4, 1, -48}, {0xA7C5, 0xA7C5, 1, -42307}, {0xA7C6, 0xA7C6, 1, -35384},
    {0xA7C7, 0xA7C9, 2, 1}, {0xA7D0, 0xA7D0, 1, 1}, {0xA7D6, 0xA7D8, 2, 1}, {0xA7F5, 0xA7F5, 1, 1},
    {0xFF21, 0xFF3A, 1, 32}, {0x10400, 0x10427, 1, 40}, {0x104B0, 0x104D3, 1, 40},
    {0x10570, 0x1057A, 1, 39}, {0x1057C, 0x1058A, 1, 39}, {0x1058C, 0x10592, 1, 39},
    {0x10594, 0x10595, 1, 39}, {0x10C80, 0x10CB2, 1, 64}, {0x118A0, 0x118BF, 1, 32},
    {0x16E40, 0x16E5F, 1, 32}, {0x1E900, 0x1E921, 1, 34},
};

constexpr CharRun kWidthRuns[] = {
    {0x3000, 0x3000, 1, -12256}, {0xFF01, 0xFF5E, 1, -65248}, {0xFF5F, 0xFF60, 1, -54746},
    {0xFF61, 0xFF61, 1, -53087}, {0xFF62, 0xFF63, 1, -53078}, {0xFF64, 0xFF64, 1, -53091},
    {0xFF65, 0xFF65, 1, -52842}, {0xFF66, 0xFF66, 1, -52852}, {0xFF67, 0xFF67, 1, -52934},
    {0xFF68, 0xFF68, 1, -52933}, {0xFF69, 0xFF69, 1, -52932}, {0xFF6A, 0xFF6A, 1, -52931},
    {0xFF6B, 0xFF6B, 1, -52930}, {0xFF6C, 0xFF6C, 1, -52873}, {0xFF6D, 0xFF6D, 1, -52872},
    {0xFF6E, 0xFF6E, 1, -52871}, {0xFF6F, 0xFF6F, 1, -52908}, {0xFF70, 0xFF70, 1, -52852},
    {0xFF71, 0xFF71, 1, -52943}, {0xFF72, 0xFF72, 1, -52942}, {0xFF73, 0xFF73, 1, -52941},
    {0xFF74, 0xFF74, 1, -52940}, {0xFF75, 0xFF76, 1, -52939}, {0xFF77, 0xFF77, 1, -52938},
    {0xFF78, 0xFF78, 1, -52937}, {0xFF79, 0xFF79, 1, -52936}, {0xFF7A, 0xFF7A, 1, -52935},
    {0xFF7B, 0xFF7B, 1, -52934}, {0xFF7C, 0xFF7C, 1, -52933}, {0xFF7D, 0xFF7D, 1, -52932},
    {0xFF7E, 0xFF7E, 1, -52931}, {0xFF7F, 0xFF7F, 1, -52930}, {0xFF80, 0xFF80, 1, -52929},
    {0xFF81, 0xFF81, 1, -52928}, {0xFF82, 0xFF82, 1, -52926}, {0xFF83, 0xFF83, 1, -52925},
    {0xFF84, 0xFF84, 1, -52924}, {0xFF85, 0xFF8A, 1, -52923}, {0xFF8B, 0xFF8B, 1, -52921},
    {0xFF8C, 0xFF8C, 1, -52919}, {0xFF8D, 0xFF8D, 1, -52917}, {0xFF8E, 0xFF8E, 1, -52915},
    {0xFF8F, 0xFF93, 1, -52913}, {0xFF94, 0xFF94, 1, -52912}, {0xFF95, 0xFF95, 1, -52911},
    {0xFF96, 0xFF9B, 1, -52910}, {0xFF9C, 0xFF9C, 1, -52909}, {0xFF9D, 0xFF9D, 1, -52906},
    {0xFF9E, 0xFF9F, 1, -52997}, {0xFFA0, 0xFFA0, 1, -60992}, {0xFFA1, 0xFFA2, 1, -61089},
    {0xFFA3, 0xFFA3, 1, -60921}, {0xFFA4, 0xFFA4, 1, -61090}, {0xFFA5, 0xFFA6, 1, -60921},
    {0xFFA7, 0xFFA9, 1, -61092}, {0xFFAA, 0xFFAF, 1, -60922}, {0xFFB0, 0xFFB0, 1, -61078},
    {0xFFB1, 0xFFB3, 1, -61099}, {0xFFB4, 0xFFB4, 1, -61075}, {0xFFB5, 0xFFBE, 1, -61100},
    {0xFFC2, 0xFFC7, 1, -61025}, {0xFFCA, 0xFFCF, 1, -61027}, {0xFFD2, 0xFFD7, 1, -61029},
    {0xFFDA, 0xFFDC, 1, -61031}, {0xFFE0, 0xFFE1, 1, -65342}, {0xFFE2, 0xFFE2, 1, -65334},
    {0xFFE4, 0xFFE4, 1, -65342}, {0xFFE5, 0xFFE5, 1, -65344}, {0xFFE6, 0xFFE6, 1, -57149},
    {0xFFE8, 0xFFE8, 1, -56038}, {0xFFE9, 0xFFEC, 1, -56921}, {0xFFED, 0xFFED, 1, -55885},
    {0xFFEE, 0xFFEE, 1, -55843},
};

constexpr char16_t kCp1252C1[32] = {
    0x20AC, 0x0081, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021,
    0x02C6, 0x2030, 0x0160, 0x2039, 0x0152, 0x008D, 0x017D, 0x008F,
    0x0090, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022, 0x2013, 0x2014,
    0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0x009D, 0x017E, 0x0178,
};

constexpr NamedEntity kNamedEntities[] = {
    {"AElig", "\xc3\x86", true},
    {"AMP", "&", true},
    {"Aacute", "\xc3\x81", true},
    {"Acirc", "\xc3\x82", true},
    {"Agrave", "\xc3\x80", true},
    {"Aring", "\xc3\x85", true},
    {"Atilde", "\xc3\x83", true},
    {"Auml", "\xc3\x84", true},
    {"COPY", "\xc2\xa9", true},
    {"Ccedil", "\xc3\x87", true},
    {"Dagger", "\xe2\x80\xa1", false},
    {"ETH", "\xc3\x90", true},
    {"Eacute", "\xc3\x89", true},
    {"Ecirc", "\xc3\x8a", true},
    {"Egrave", "\xc3\x88", true},
    {"Euml", "\xc3\x8b", true},
    {"GT", ">", true},
    {"Iacute", "\xc3\x8d", true},
    {"Icirc", "\xc3\x8e", true},
    {"Igrave", "\xc3\x8c", true},
    {"Iuml", "\xc3\x8f", true},
    {"LT", "<", true},
    {"Ntilde", "\xc3\x91", true},
    {"OElig", "\xc5\x92", false},
    {"Oacute", "\xc3\x93", true},
    {"Ocirc", "\xc3\x94", true},
    {"Ograve", "\xc3\x92", true},
    {"Oslash", "\xc3\x98", true},
    {"Otilde", "\xc3\x95", true},
    {"Ouml", "\xc3\x96", true},
    {"Prime", "\xe2\x80\xb3", false},
    {"QUOT", "\x22", true},
    {"REG", "\xc2\xae", true},
    {"Scaron", "\xc5\xa0", false},
    {"THORN", "\xc3\x9e", true},
    {"Uacute", "\xc3\x9a", true},
    {"Ucirc", "\xc3\x9b", true},
    {"Ugrave", "\xc3\x99", true},
    {"Uuml", "\xc3\x9c", true},
    {"Yacute", "\xc3\x9d", true},
    {"Yuml", "\xc5\xb8", false},
    {"aacute", "\xc3\xa1", true},
    {"acirc", "\xc3\xa2", true},
    {"acute", "\xc2\xb4", true},
    {"aelig", "\xc3\xa6", true},
    {"agrave", "\xc3\xa0", true},
    {"amp", "&", true},
    {"apos", "'", false},
    {"aring", "\xc3\xa5", true},
    {"asymp", "\xe2\x89\x88", false},
    {"atilde", "\xc3\xa3", true},
    {"auml", "\xc3\xa4", true},
    {"bdquo", "\xe2\x80\x9e", false},
    {"brvbar", "\xc2\xa6", true},
    {"bull", "\xe2\x80\xa2", false},
    {"ccedil", "\xc3\xa7", true},
    {"cedil", "\xc2\xb8", true},
    {"cent", "\xc2\xa2", true},
    {"circ", "\xcb\x86", false},
    {"clubs", "\xe2\x99\xa3", false},
    {"copy", "\xc2\xa9", true},
    {"curren", "\xc2\xa4", true},
    {"dagger", "\xe2\x80\xa0", false},
    {"darr", "\xe2\x86\x93", false},
    {"deg", "\xc2\xb0", true},
    {"diams", "\xe2\x99\xa6", false},
    {"divide", "\xc3\xb7", true},
    {"eacute", "\xc3\xa9", true},
    {"ecirc", "\xc3\xaa", true},
    {"egrave", "\xc3\xa8", true},
    {"emsp", "\xe2\x80\x83", false},
    {"ensp", "\xe2\x80\x82", false},
    {"eth", "\xc3\xb0", true},
    {"euml", "\xc3\xab", true},
    {"euro", "\xe2\x82\xac", false},
    {"fnof", "\xc6\x92", false},
    {"frac12", "\xc2\xbd", true},
    {"frac14", "\xc2\xbc", true},
    {"frac34", "\xc2\xbe", true},
    {"ge", "\xe2\x89\xa5", false},
    {"gt", ">", true},
    {"hArr", "\xe2\x87\x94", false},
    {"harr", "\xe2\x86\x94", false},
    {"hearts", "\xe2\x99\xa5", false},
    {"hellip", "\xe2\x80\xa6", false},
    {"iacute", "\xc3\xad", true},
    {"icirc", "\xc3\xae", true},
    {"iexcl", "\xc2\xa1", true},
    {"igrave", "\xc3\xac", true},
    {"infin", "\xe2\x88\x9e", false},
    {"iquest", "\xc2\xbf", true},
    {"iuml", "\xc3\xaf", true},
    {"laquo", "\xc2\xab", true},
    {"larr", "\xe2\x86\x90", false},
    {"ldquo", "\xe2\x80\x9c", false},
    {"le", "\xe2\x89\xa4", false},
    {"loz", "\xe2\x97\x8a", false},
    {"lrm", "\xe2\x80\x8e", false},
    {"lsaquo", "\xe2\x80\xb9", false},
    {"lsquo", "\xe2\x80\x98", false},
    {"lt", "<", true},
    {"macr", "\xc2\xaf", true},
    {"mdash", "\xe2\x80\x94", false},
    {"micro", "\xc2\xb5", true},
    {"middot", "\xc2\xb7", true},
    {"minus", "\xe2\x88\x92", false},
    {"nbsp", "\xc2\xa0", true},
    {"ndash", "\xe2\x80\x93", false},
    {"ne", "\xe2\x89\xa0", false},
    {"not", "\xc2\xac", true},
    {"ntilde", "\xc3\xb1", true},
    {"oacute", "\xc3\xb3", true},
    {"ocirc", "\xc3\xb4", true},
    {"oelig", "\xc5\x93", false},
    {"ograve", "\xc3\xb2", true},
    {"ordf", "\xc2\xaa", true},
    {"ordm", "\xc2\xba", true},
    {"oslash", "\xc3\xb8", true},
    {"otilde", "\xc3\xb5", true},
    {"ouml", "\xc3\xb6", true},
    {"para", "\xc2\xb6", true},
    {"permil", "\xe2\x80\xb0", false},
    {"plusmn", "\xc2\xb1", true},
    {"pound", "\xc2\xa3", true},
    {"prime", "\xe2\x80\xb2", false},
    {"quot", "\x22", true},
    {"raquo", "\xc2\xbb", true},
    {"rarr", "\xe2\x86\x92", false},
    {"rdquo", "\xe2\x80\x9d", false},
    {"reg", "\xc2\xae", true},
    {"rlm", "\xe2\x80\x8f", false},
    {"rsaquo", "\xe2\x80\xba", false},
    {"rsquo", "\xe2\x80\x99", false},
    {"sbquo", "\xe2\x80\x9a", false},
    {"scaron", "\xc5\xa1", false},
    {"sect", "\xc2\xa7", true},
    {"shy", "\xc2\xad", true},
    {"spades", "\xe2\x99\xa0", false},
    {"star", "\xe2\x98\x86", false},
    {"sup1", "\xc2\xb9", true},
    {"sup2", "\xc2\xb2", true},
    {"sup3", "\xc2\xb3", true},
    {"szlig", "\xc3\x9f", true},
    {"thinsp", "\xe2\x80\x89", false},
    {"thorn", "\xc3\xbe", true},
    {"tilde", "\xcb\x9c", false},
    {"times", "\xc3\x97", true},
    {"trade", "\xe2\x84\xa2", false},
    {"uacute", "\xc3\xba", true},
    {"uarr", "\xe2\x86\x91", false},
    {"ucirc", "\xc3\xbb", true},
    {"ugrave", "\xc3\xb9", true},
    {"uml", "\xc2\xa8", true},
    {"uuml", "\xc3\xbc", true},
    {"yacute", "\xc3\xbd", true},
    {"yen", "\xc2\xa5", true},
    {"yuml", "\xc3\xbf", true},
    {"zwj", "\xe2\x80\x8d", false},
    {"zwnj", "\xe2\x80\x8c", false},
};

template <size_t N>
bool InRanges(const CodeRange (&table)[N], char32_t c) {
  const CodeRange* it = std::upper_bound(std::begin(table), std::end(table), c,
                                         [](char32_t v, const CodeRange& r) { return v < r.lo; });
  return it != std::begin(table) && c <= (it - 1)->hi;
}

template <size_t N>
char32_t ApplyRuns(const CharRun (&table)[N], char32_t c) {
  const CharRun* it = std::upper_bound(std::begin(table), std::end(table), c,
                                       [](char32_t v, const CharRun& r) { return v < r.first; });
  if (it == std::begin(table)) return c;
  const CharRun& r = *(it - 1);
  if (c > r.last || (c - r.first) % static_cast<char32_t>(r.stride) != 0) return c;
  return static_cast<char32_t>(static_cast<int64_t>(c) + r.delta);
}

bool IsLetter(char32_t c) {
  if (c < 0x80) return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
  return InRanges(kLetterRanges, c);
}
bool IsNumber(char32_t c) {
  if (c < 0x80) return c >= '0' && c <= '9';
  return InRanges(kNumberRanges, c);
}
bool IsSpace(char32_t c) {
  if (c < 0x80) return c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F);
  return std::binary_search(std::begin(kSpaceChars), std::end(kSpaceChars), c);
}
bool IsCased(char32_t c) { return InRanges(kCasedRanges, c); }

// Approximation of Unicode Case_Ignorable (Mn Me Cf Lm Sk + MidLetter/MidNumLet/Single_Quote)
// for the scripts where final sigma arises: ASCII/Latin-1 punctuation that Unicode marks
// case-ignorable, modifier letters, combining marks, zero-width and format characters.
bool IsCaseIgnorable(char32_t c) {
  switch (c) {
    case 0x27: case 0x2E: case 0x3A: case 0x5E: case 0x60: case 0xA8: case 0xAD: case 0xAF:
    case 0xB4: case 0xB7: case 0xB8: case 0x37A: case 0x387: case 0x559: case 0x55F:
    case 0x2018: case 0x2019: case 0x2024: case 0x2027: case 0xFEFF: case 0xFF07:
    case 0xFF0E: case 0xFF1A:
      return true;
    default:
      break;
  }
  return (c >= 0x2B0 && c <= 0x36F) || (c >= 0x374 && c <= 0x375) || (c >= 0x384 && c <= 0x385) ||
         (c >= 0x483 && c <= 0x489) || (c >= 0x1AB0 && c <= 0x1AFF) ||
         (c >= 0x1DC0 && c <= 0x1DFF) || (c >= 0x200B && c <= 0x200F) ||
         (c >= 0x202A && c <= 0x202E) || (c >= 0x2060 && c <= 0x206F) ||
         (c >= 0x3099 && c <= 0x309E) || (c >= 0xE0001 && c <= 0xE01EF) ||
         (c >= 0x20D0 && c <= 0x20F0) || (c >= 0xFE00 && c <= 0xFE0F) ||
         (c >= 0xFE20 && c <= 0xFE2F);
}

// ---------------------------------------------------------------------------------------------
// UTF-8.
// ---------------------------------------------------------------------------------------------
constexpr char32_t kReplacement = 0xFFFD;

// Decodes UTF-8; each maximal invalid subsequence becomes one U+FFFD (Unicode's recommended
// practice, which is what Python's bytes.decode("utf-8", errors="replace") does).
std::u32string DecodeUtf8(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const auto b0 = static_cast<unsigned char>(s[i]);
    if (b0 < 0x80) {
      out.push_back(b0);
      ++i;
      continue;
    }
    int need = 0;
    unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    char32_t cp = 0;
    if (b0 >= 0xC2 && b0 <= 0xDF) {
      need = 1;
      cp = b0 & 0x1F;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
      need = 2;
      cp = b0 & 0x0F;
      if (b0 == 0xE0) lo = 0xA0;
      if (b0 == 0xED) hi = 0x9F;  // no surrogates
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
      need = 3;
      cp = b0 & 0x07;
      if (b0 == 0xF0) lo = 0x90;
      if (b0 == 0xF4) hi = 0x8F;
    } else {
      out.push_back(kReplacement);
      ++i;
      continue;
    }
    size_t j = i + 1;
    bool ok = true;
    for (int k = 0; k < need; ++k, ++j) {
      if (j >= n) {
        ok = false;
        break;
      }
      const auto b = static_cast<unsigned char>(s[j]);
      const unsigned char blo = (k == 0) ? lo : 0x80, bhi = (k == 0) ? hi : 0xBF;
      if (b < blo || b > bhi) {
        ok = false;
        break;
      }
      cp = (cp << 6) | (b & 0x3F);
    }
    out.push_back(ok ? cp : kReplacement);
    i = j;  // past the valid sequence, or past its maximal valid prefix
  }
  return out;
}

void AppendUtf8(char32_t c, std::string* out) {
  if (c < 0x80) {
    out->push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (c >> 6)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (c >> 12)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (c >> 18)));
    out->push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

std::string EncodeUtf8(std::u32string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : s) AppendUtf8(c, &out);
  return out;
}

// ---------------------------------------------------------------------------------------------
// ftfy's character-level fixes (see tokenizer.h, step 2).
// ---------------------------------------------------------------------------------------------
// fix_latin_ligatures. Returns nullptr when `c` is not one of ftfy's ligatures.
const char32_t* Ligature(char32_t c) {
  switch (c) {
    case 0x132: return U"IJ";
    case 0x133: return U"ij";
    case 0x149: return U"\u02BCn";
    case 0x1C4: return U"D\u017D";
    case 0x1C5: return U"D\u017E";
    case 0x1C6: return U"d\u017E";
    case 0x1C7: return U"LJ";
    case 0x1C8: return U"Lj";
    case 0x1C9: return U"lj";
    case 0x1CA: return U"NJ";
    case 0x1CB: return U"Nj";
    case 0x1CC: return U"nj";
    case 0x1F1: return U"DZ";
    case 0x1F2: return U"Dz";
    case 0x1F3: return U"dz";
    case 0xFB00: return U"ff";
    case 0xFB01: return U"fi";
    case 0xFB02: return U"fl";
    case 0xFB03: return U"ffi";
    case 0xFB04: return U"ffl";
    case 0xFB05: return U"\u017Ft";
    case 0xFB06: return U"st";
    default: return nullptr;
  }
}

// fix_character_width then uncurl_quotes for one character.
void AppendWidthAndQuotes(char32_t c, std::u32string* out) {
  if (c == 0xFFE3) {  // FULLWIDTH MACRON: NFKC is space + combining macron
    out->push_back(U' ');
    out->push_back(0x304);
    return;
  }
  if (c == 0x3000 || (c >= 0xFF01 && c <= 0xFFEF)) c = ApplyRuns(kWidthRuns, c);
  if (c == 0x2BC || (c >= 0x2018 && c <= 0x201B)) c = U'\'';
  if (c >= 0x201C && c <= 0x201F) c = U'"';
  out->push_back(c);
}

// remove_control_chars' set.
bool IsFtfyControl(char32_t c) {
  return c <= 0x08 || c == 0x0B || (c >= 0x0E && c <= 0x1F) || c == 0x7F ||
         (c >= 0x206A && c <= 0x206F) || c == 0xFEFF || (c >= 0xFFF9 && c <= 0xFFFC);
}

bool IsAsciiDigit(char32_t c) { return c >= '0' && c <= '9'; }
bool IsAsciiAlpha(char32_t c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

std::u32string FtfyCharacterFixes(const std::u32string& in) {
  // fix_c1_controls, fix_latin_ligatures, fix_character_width, uncurl_quotes: per-character maps.
  std::u32string mapped;
  mapped.reserve(in.size());
  for (char32_t c : in) {
    if (c >= 0x80 && c <= 0x9F) c = kCp1252C1[c - 0x80];
    if (const char32_t* lig = Ligature(c)) {
      for (; *lig != 0; ++lig) AppendWidthAndQuotes(*lig, &mapped);
    } else {
      AppendWidthAndQuotes(c, &mapped);
    }
  }
  // remove_terminal_escapes (ESC '[' [0-9;]* [A-Za-z]; ftfy's \\d also takes non-ASCII digits,
  // ours only ASCII), then remove_control_chars.
  std::u32string out;
  out.reserve(mapped.size());
  const size_t n = mapped.size();
  for (size_t i = 0; i < n; ++i) {
    if (mapped[i] == 0x1B && i + 1 < n && mapped[i + 1] == U'[') {
      size_t j = i + 2;
      while (j < n && (IsAsciiDigit(mapped[j]) || mapped[j] == U';')) ++j;
      if (j < n && IsAsciiAlpha(mapped[j])) {
        i = j;
        continue;
      }
    }
    if (!IsFtfyControl(mapped[i])) out.push_back(mapped[i]);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// html.unescape (see tokenizer.h, step 3).
// ---------------------------------------------------------------------------------------------
// The entity named s[0, len) (ASCII only), or nullptr.
const NamedEntity* FindEntity(const char32_t* s, size_t len) {
  std::string name;
  for (size_t k = 0; k < len; ++k) {
    if (s[k] >= 0x80) return nullptr;
    name.push_back(static_cast<char>(s[k]));
  }
  const NamedEntity* it = std::lower_bound(
      std::begin(kNamedEntities), std::end(kNamedEntities), name,
      [](const NamedEntity& e, const std::string& v) {
        return std::strcmp(e.name, v.c_str()) < 0;
      });
  if (it == std::end(kNamedEntities) || name != it->name) return nullptr;
  return it;
}

// Python's html._replace_charref for a numeric reference with value `num` (saturated).
void AppendNumericCharref(uint64_t num, std::u32string* out) {
  if (num == 0x00) {
    out->push_back(kReplacement);
  } else if (num == 0x0D) {
    out->push_back(U'\r');
  } else if (num >= 0x80 && num <= 0x9F) {
    out->push_back(kCp1252C1[num - 0x80]);
  } else if ((num >= 0xD800 && num <= 0xDFFF) || num > 0x10FFFF) {
    out->push_back(kReplacement);
  } else if ((num >= 0x01 && num <= 0x08) || num == 0x0B || (num >= 0x0E && num <= 0x1F) ||
             num == 0x7F || (num >= 0xFDD0 && num <= 0xFDEF) || (num & 0xFFFE) == 0xFFFE) {
    // Python drops the other invalid code points.
  } else {
    out->push_back(static_cast<char32_t>(num));
  }
}

int HexValue(char32_t c) {
  if (c >= '0' && c <= '9') return static_cast<int>(c - '0');
  if (c >= 'a' && c <= 'f') return static_cast<int>(c - 'a' + 10);
  if (c >= 'A' && c <= 'F') return static_cast<int>(c - 'A' + 10);
  return -1;
}

// One html.unescape pass: re.sub of &(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?).
std::u32string HtmlUnescape(const std::u32string& s) {
  if (s.find(U'&') == std::u32string::npos) return s;
  std::u32string out;
  out.reserve(s.size());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    if (s[i] != U'&') {
      out.push_back(s[i++]);
      continue;
    }
    const size_t start = i + 1;
    if (start < n && s[start] == U'#') {
      size_t j = start + 1;
      int base = 10;
      if (j < n && IsAsciiDigit(s[j])) {
        base = 10;
      } else if (j + 1 < n && (s[j] == U'x' || s[j] == U'X') && HexValue(s[j + 1]) >= 0) {
        base = 16;
        ++j;
      } else {
        out.push_back(U'&');  // no alternative matches at this '&'
        ++i;
        continue;
      }
      uint64_t num = 0;
      while (j < n && (base == 10 ? IsAsciiDigit(s[j]) : HexValue(s[j]) >= 0)) {
        num = std::min<uint64_t>(num * base + static_cast<uint64_t>(HexValue(s[j])), 0x110000);
        ++j;
      }
      if (j < n && s[j] == U';') ++j;
      AppendNumericCharref(num, &out);
      i = j;
      continue;
    }
    // Named reference: up to 32 characters outside [\t\n\f <&#;], then an optional ';'.
    size_t j = start;
    while (j < n && j - start < 32) {
      const char32_t c = s[j];
      if (c == U'\t' || c == U'\n' || c == U'\f' || c == U' ' || c == U'<' || c == U'&' ||
          c == U'#' || c == U';') {
        break;
      }
      ++j;
    }
    if (j == start) {
      out.push_back(U'&');
      ++i;
      continue;
    }
    const size_t name_len = j - start;
    const bool semicolon = j < n && s[j] == U';';
    const size_t end = semicolon ? j + 1 : j;
    const NamedEntity* e = FindEntity(s.data() + start, name_len);
    if (e != nullptr && (semicolon || e->legacy)) {
      out += DecodeUtf8(e->value);
      i = end;
      continue;
    }
    // Longest prefix (at least 2 characters, excluding the last character of the match) that is
    // a name valid without ';': its value, then the rest of the match as written.
    const size_t match_len = end - start;
    bool replaced = false;
    for (size_t x = match_len - 1; x >= 2; --x) {
      const NamedEntity* p = FindEntity(s.data() + start, x);
      if (p != nullptr && p->legacy) {
        out += DecodeUtf8(p->value);
        out.append(s, start + x, end - (start + x));
        replaced = true;
        break;
      }
    }
    if (!replaced) {
      out.push_back(U'&');
      out.append(s, start, match_len);
    }
    i = end;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// whitespace_clean + lower.
// ---------------------------------------------------------------------------------------------
std::u32string CollapseWhitespace(const std::u32string& s) {
  std::u32string out;
  out.reserve(s.size());
  bool pending_space = false;
  for (char32_t c : s) {
    if (IsSpace(c)) {
      pending_space = !out.empty();
      continue;
    }
    if (pending_space) out.push_back(U' ');
    pending_space = false;
    out.push_back(c);
  }
  return out;
}

// Python str.lower().
std::u32string Lower(const std::u32string& s) {
  std::u32string out;
  out.reserve(s.size());
  const size_t n = s.size();
  for (size_t i = 0; i < n; ++i) {
    const char32_t c = s[i];
    if (c < 0x80) {
      out.push_back((c >= 'A' && c <= 'Z') ? c + 32 : c);
    } else if (c == 0x130) {
      out.push_back(U'i');
      out.push_back(0x307);
    } else if (c == 0x3A3) {
      // Final_Sigma: preceded by a cased letter and not followed by one (skipping case-ignorable
      // characters both ways), as CPython's handle_capital_sigma.
      size_t j = i;
      while (j > 0 && IsCaseIgnorable(s[j - 1])) --j;
      bool final_sigma = j > 0 && IsCased(s[j - 1]);
      if (final_sigma) {
        size_t k = i + 1;
        while (k < n && IsCaseIgnorable(s[k])) ++k;
        final_sigma = k == n || !IsCased(s[k]);
      }
      out.push_back(final_sigma ? 0x3C2 : 0x3C3);
    } else {
      out.push_back(ApplyRuns(kLowerRuns, c));
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// The CLIP split.
// ---------------------------------------------------------------------------------------------
constexpr std::u32string_view kStartText = U"<|startoftext|>";
constexpr std::u32string_view kEndText = U"<|endoftext|>";
constexpr char kStartTextUtf8[] = "<|startoftext|>";
constexpr char kEndTextUtf8[] = "<|endoftext|>";

// Length of the contraction ('s 't 're 've 'm 'll 'd, case-insensitively) at s[i], or 0.
size_t ContractionLength(const std::u32string& s, size_t i) {
  if (s[i] != U'\'' || i + 1 >= s.size()) return 0;
  const char32_t a = s[i + 1];
  // The text is lower-cased already; U+017F LATIN SMALL LETTER LONG S case-folds to 's'.
  if (a == U's' || a == 0x17F || a == U't' || a == U'm' || a == U'd') return 2;
  if (i + 2 < s.size()) {
    const char32_t b = s[i + 2];
    if ((a == U'r' && b == U'e') || (a == U'v' && b == U'e') || (a == U'l' && b == U'l')) return 3;
  }
  return 0;
}

// Steps 1-6 of tokenizer.h: the pre-tokens of `text`, as UTF-8.
std::vector<std::string> CleanAndSplit(const std::string& text) {
  std::u32string t = DecodeUtf8(text);
  t = FtfyCharacterFixes(t);
  t = HtmlUnescape(HtmlUnescape(t));
  t = Lower(CollapseWhitespace(t));

  std::vector<std::string> pieces;
  const size_t n = t.size();
  const std::u32string_view view(t);
  size_t i = 0;
  while (i < n) {
    const char32_t c = t[i];
    // U+0345 COMBINING GREEK YPOGEGRAMMENI case-folds to a letter (iota), so under IGNORECASE the
    // regex module matches it with neither [\p{L}] nor [^\s\p{L}\p{N}]: no alternative takes it
    // and it is dropped, like whitespace. (It is the only such code point.)
    if (IsSpace(c) || c == 0x345) {
      ++i;
      continue;
    }
    size_t len = 0;
    if (view.substr(i, kStartText.size()) == kStartText) {
      len = kStartText.size();
    } else if (view.substr(i, kEndText.size()) == kEndText) {
      len = kEndText.size();
    } else if ((len = ContractionLength(t, i)) != 0) {
    } else if (IsLetter(c)) {
      len = 1;
      while (i + len < n && IsLetter(t[i + len])) ++len;
    } else if (IsNumber(c)) {
      len = 1;
    } else {
      len = 1;
      while (i + len < n && !IsSpace(t[i + len]) && t[i + len] != 0x345 &&
             !IsLetter(t[i + len]) && !IsNumber(t[i + len])) {
        ++len;
      }
    }
    pieces.push_back(EncodeUtf8(view.substr(i, len)));
    i += len;
  }
  return pieces;
}

// ---------------------------------------------------------------------------------------------
// Byte-level symbols (CLIP's bytes_to_unicode) and file loading.
// ---------------------------------------------------------------------------------------------
// The printable bytes ! .. ~, ¡ .. ¬, ® .. ÿ stand for themselves; the other 68 bytes, in order,
// for U+0100, U+0101, ...
std::array<char32_t, 256> BytesToUnicode() {
  std::array<char32_t, 256> table{};
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    table[b] = printable ? static_cast<char32_t>(b) : next++;
  }
  return table;
}

const std::array<char32_t, 256>& ByteSymbols() {
  static const std::array<char32_t, 256> table = BytesToUnicode();
  return table;
}

// Inverse of ByteSymbols(): symbol code point (< 512) -> byte, or -1.
const std::array<int16_t, 512>& SymbolBytes() {
  static const std::array<int16_t, 512> table = [] {
    std::array<int16_t, 512> t;
    t.fill(-1);
    const auto& fwd = ByteSymbols();
    for (int b = 0; b < 256; ++b) t[fwd[b]] = static_cast<int16_t>(b);
    return t;
  }();
  return table;
}

std::string ReadFile(const std::string& path, const char* what) {
  struct stat st;
  TORCH_CHECK(::stat(path.c_str(), &st) == 0, "ClipTokenizer: ", what, " file '", path,
              "' does not exist");
  TORCH_CHECK(S_ISREG(st.st_mode), "ClipTokenizer: ", what, " file '", path,
              "' is not a regular file");
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in.is_open(), "ClipTokenizer: cannot open ", what, " file '", path, "'");
  std::ostringstream ss;
  ss << in.rdbuf();
  TORCH_CHECK(!in.bad(), "ClipTokenizer: cannot read ", what, " file '", path, "'");
  return ss.str();
}

uint64_t PairKey(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

}  // namespace

ClipTokenizer::~ClipTokenizer() = default;

std::shared_ptr<const ClipTokenizer> ClipTokenizer::Load(const std::string& dir) {
  std::string base = dir;
  if (!base.empty() && base.back() != '/') base.push_back('/');
  return FromFiles(base + "vocab.json", base + "merges.txt");
}

std::shared_ptr<const ClipTokenizer> ClipTokenizer::FromFiles(const std::string& vocab_json,
                                                              const std::string& merges_txt) {
  std::shared_ptr<ClipTokenizer> tok(new ClipTokenizer());

  // vocab.json: {token: id}, ids dense 0..N-1.
  const std::string vocab_text = ReadFile(vocab_json, "vocab");
  const nlohmann::json vocab =
      nlohmann::json::parse(vocab_text, /*cb=*/nullptr, /*allow_exceptions=*/false);
  TORCH_CHECK(!vocab.is_discarded(), "ClipTokenizer: vocab file '", vocab_json,
              "' is not valid JSON");
  TORCH_CHECK(vocab.is_object() && !vocab.empty(), "ClipTokenizer: vocab file '", vocab_json,
              "' must hold a non-empty JSON object {token: id}");
  const size_t n = vocab.size();
  TORCH_CHECK(n < static_cast<size_t>(INT32_MAX), "ClipTokenizer: vocab file '", vocab_json,
              "' has too many entries (", n, ")");
  tok->id_to_token_.assign(n, std::string());
  std::vector<bool> seen(n, false);
  tok->token_to_id_.reserve(n);
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    TORCH_CHECK(it.value().is_number_integer(), "ClipTokenizer: vocab file '", vocab_json,
                "': the id of token '", it.key(), "' is not an integer");
    const int64_t id = it.value().get<int64_t>();
    TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(n), "ClipTokenizer: vocab file '",
                vocab_json, "': token '", it.key(), "' has id ", id, ", outside [0, ", n,
                ") (ids must be dense)");
    TORCH_CHECK(!seen[id], "ClipTokenizer: vocab file '", vocab_json, "': id ", id,
                " is used twice (token '", it.key(), "' and '", tok->id_to_token_[id], "')");
    seen[id] = true;
    tok->id_to_token_[id] = it.key();
    tok->token_to_id_.emplace(it.key(), static_cast<int32_t>(id));
  }
  auto require = [&](const std::string& token) -> int32_t {
    auto found = tok->token_to_id_.find(token);
    TORCH_CHECK(found != tok->token_to_id_.end(), "ClipTokenizer: vocab file '", vocab_json,
                "' lacks the token '", token, "'");
    return found->second;
  };
  const auto& symbols = ByteSymbols();
  for (int b = 0; b < 256; ++b) {
    std::string sym;
    AppendUtf8(symbols[b], &sym);
    tok->byte_id_[b] = require(sym);
    tok->byte_end_id_[b] = require(sym + "</w>");
  }
  tok->bos_id_ = require(kStartTextUtf8);
  tok->eos_id_ = require(kEndTextUtf8);

  // merges.txt: optional "#version" header, then "left right" per line, in rank order.
  const std::string merges_text = ReadFile(merges_txt, "merges");
  std::istringstream lines(merges_text);
  std::string line;
  int64_t line_no = 0;
  int32_t rank = 0;
  while (std::getline(lines, line)) {
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    if (line_no == 1 && line[0] == '#') continue;  // "#version: 0.2"
    const size_t space = line.find(' ');
    TORCH_CHECK(space != std::string::npos && space > 0 && space + 1 < line.size() &&
                    line.find(' ', space + 1) == std::string::npos,
                "ClipTokenizer: merges file '", merges_txt, "' line ", line_no,
                ": expected 'left right', got '", line, "'");
    const std::string left = line.substr(0, space);
    const std::string right = line.substr(space + 1);
    auto id_of = [&](const std::string& token) -> int32_t {
      auto found = tok->token_to_id_.find(token);
      TORCH_CHECK(found != tok->token_to_id_.end(), "ClipTokenizer: merges file '", merges_txt,
                  "' line ", line_no, ": '", token, "' is not in vocab file '", vocab_json, "'");
      return found->second;
    };
    const int32_t l = id_of(left);
    const int32_t r = id_of(right);
    const int32_t merged = id_of(left + right);
    // As SimpleTokenizer's dict(zip(merges, range(...))): a repeated pair keeps its last rank.
    tok->merges_[PairKey(l, r)] = Merge{rank, merged};
    ++rank;
  }
  TORCH_CHECK(!lines.bad(), "ClipTokenizer: cannot read merges file '", merges_txt, "'");
  TORCH_CHECK(rank > 0, "ClipTokenizer: merges file '", merges_txt, "' holds no merges");
  tok->num_merges_ = rank;
  return tok;
}

std::vector<std::string> ClipTokenizer::PreTokenize(const std::string& text) {
  return CleanAndSplit(text);
}

std::vector<int32_t> ClipTokenizer::Bpe(const std::string& word) const {
  std::vector<int32_t> symbols;
  symbols.reserve(word.size());
  for (size_t i = 0; i < word.size(); ++i) {
    const auto b = static_cast<unsigned char>(word[i]);
    symbols.push_back(i + 1 == word.size() ? byte_end_id_[b] : byte_id_[b]);
  }
  std::vector<int32_t> next;
  next.reserve(symbols.size());
  while (symbols.size() > 1) {
    // The lowest-ranked adjacent pair.
    int32_t best_rank = INT32_MAX;
    int32_t left = -1, right = -1, merged = -1;
    for (size_t i = 0; i + 1 < symbols.size(); ++i) {
      auto it = merges_.find(PairKey(symbols[i], symbols[i + 1]));
      if (it != merges_.end() && it->second.rank < best_rank) {
        best_rank = it->second.rank;
        left = symbols[i];
        right = symbols[i + 1];
        merged = it->second.id;
      }
    }
    if (merged < 0) break;
    // Merge every occurrence, left to right.
    next.clear();
    for (size_t i = 0; i < symbols.size();) {
      if (i + 1 < symbols.size() && symbols[i] == left && symbols[i + 1] == right) {
        next.push_back(merged);
        i += 2;
      } else {
        next.push_back(symbols[i]);
        ++i;
      }
    }
    symbols.swap(next);
  }
  return symbols;
}

void ClipTokenizer::AppendWordIds(const std::string& word, std::vector<int64_t>* out) const {
  if (word == kStartTextUtf8) {
    out->push_back(bos_id_);
    return;
  }
  if (word == kEndTextUtf8) {
    out->push_back(eos_id_);
    return;
  }
  if (word.size() <= kMaxCachedWordBytes) {
    std::shared_lock<std::shared_mutex> lock(cache_mu_);
    auto it = cache_.find(word);
    if (it != cache_.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> ids = Bpe(word);
  out->insert(out->end(), ids.begin(), ids.end());
  if (word.size() > kMaxCachedWordBytes) return;
  std::unique_lock<std::shared_mutex> lock(cache_mu_);
  if (cache_.size() >= kMaxCacheEntries) cache_.clear();
  cache_.emplace(word, std::move(ids));
}

std::vector<int64_t> ClipTokenizer::Encode(const std::string& text) const {
  std::vector<int64_t> ids;
  for (const std::string& word : CleanAndSplit(text)) AppendWordIds(word, &ids);
  return ids;
}

ClipTokenizer::Padded ClipTokenizer::EncodePadded(const std::string& text, int max_length) const {
  TORCH_CHECK_VALUE(max_length >= 2, "ClipTokenizer::EncodePadded: max_length must be >= 2 (room "
                    "for the start and end tokens), got ", max_length);
  const size_t body = static_cast<size_t>(max_length) - 2;
  Padded result;
  result.ids.reserve(max_length);
  result.ids.push_back(bos_id_);
  for (const std::string& word : CleanAndSplit(text)) {
    AppendWordIds(word, &result.ids);
    if (result.ids.size() > body + 1) {  // more than `body` text tokens: the rest is cut anyway
      result.truncated = true;
      break;
    }
  }
  if (result.truncated) result.ids.resize(body + 1);
  result.ids.push_back(eos_id_);
  result.length = static_cast<int>(result.ids.size());
  result.ids.resize(max_length, pad_id());
  return result;
}

std::string ClipTokenizer::Decode(const std::vector<int64_t>& ids) const {
  std::string symbols;
  for (size_t i = 0; i < ids.size(); ++i) {
    TORCH_CHECK_INDEX(ids[i] >= 0 && ids[i] < vocab_size(), "ClipTokenizer::Decode: ids[", i,
                      "] = ", ids[i], " is outside the vocabulary [0, ", vocab_size(), ")");
    symbols += id_to_token_[ids[i]];
  }
  // Symbols back to bytes. Every vocabulary character is a byte symbol (special tokens are
  // printable ASCII, which stands for itself); anything else is kept as its UTF-8.
  const auto& to_byte = SymbolBytes();
  std::string bytes;
  bytes.reserve(symbols.size());
  for (char32_t c : DecodeUtf8(symbols)) {
    if (c < to_byte.size() && to_byte[c] >= 0) {
      bytes.push_back(static_cast<char>(to_byte[c]));
    } else {
      AppendUtf8(c, &bytes);
    }
  }
  // UTF-8 decode with replacement, "</w>" -> " ", strip.
  std::u32string text = DecodeUtf8(bytes);
  std::u32string spaced;
  spaced.reserve(text.size());
  constexpr std::u32string_view kWordEnd = U"</w>";
  for (size_t i = 0; i < text.size();) {
    if (std::u32string_view(text).substr(i, kWordEnd.size()) == kWordEnd) {
      spaced.push_back(U' ');
      i += kWordEnd.size();
    } else {
      spaced.push_back(text[i++]);
    }
  }
  size_t begin = 0, end = spaced.size();
  while (begin < end && IsSpace(spaced[begin])) ++begin;
  while (end > begin && IsSpace(spaced[end - 1])) --end;
  return EncodeUtf8(std::u32string_view(spaced).substr(begin, end - begin));
}

std::optional<int64_t> ClipTokenizer::SingleTokenId(const std::string& word) const {
  const std::vector<int64_t> ids = Encode(word);
  if (ids.size() != 1 || ids[0] == bos_id_ || ids[0] == eos_id_) return std::nullopt;
  return ids[0];
}

std::string ClipTokenizer::IdToToken(int64_t id) const {
  TORCH_CHECK_INDEX(id >= 0 && id < vocab_size(), "ClipTokenizer::IdToToken: id ", id,
                    " is outside the vocabulary [0, ", vocab_size(), ")");
  return id_to_token_[id];
}

}  // namespace perfusion

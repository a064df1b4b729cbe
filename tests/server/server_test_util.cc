#include "tests/server/server_test_util.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "server/concept_blob.h"
#include "server/log.h"

namespace perfusion::server::testing {
namespace {

// Server event logs would drown the test output; PERFUSION_TEST_LOG=1 turns them back on.
const bool kQuietLogs = [] {
  if (getenv("PERFUSION_TEST_LOG") == nullptr) SetLogEnabled(false);
  return true;
}();

void PutBe32(std::string& out, uint32_t v) {
  out.push_back(static_cast<char>(v >> 24));
  out.push_back(static_cast<char>(v >> 16));
  out.push_back(static_cast<char>(v >> 8));
  out.push_back(static_cast<char>(v));
}
void PutBe16(std::string& out, uint16_t v) {
  out.push_back(static_cast<char>(v >> 8));
  out.push_back(static_cast<char>(v));
}

void PngChunk(std::string& out, const char* type, const std::string& data) {
  PutBe32(out, static_cast<uint32_t>(data.size()));
  std::string td = std::string(type, 4) + data;
  out += td;
  PutBe32(out, static_cast<uint32_t>(
                   crc32(0L, reinterpret_cast<const Bytef*>(td.data()), static_cast<uInt>(td.size()))));
}

}  // namespace

int ConnectLocal(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

std::string ReadAll(int fd, std::chrono::milliseconds timeout) {
  timeval tv{static_cast<time_t>(timeout.count() / 1000),
             static_cast<suseconds_t>(timeout.count() % 1000 * 1000)};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  std::string out;
  char buf[8192];
  ssize_t n;
  while ((n = recv(fd, buf, sizeof buf, 0)) > 0) out.append(buf, static_cast<size_t>(n));
  return out;
}

std::string HttpGet(int port, const std::string& path, const std::string& method) {
  const int fd = ConnectLocal(port);
  if (fd < 0) return "";
  const std::string req = method + " " + path + " HTTP/1.1\r\nHost: localhost\r\n\r\n";
  send(fd, req.data(), req.size(), MSG_NOSIGNAL);
  std::string out = ReadAll(fd);
  close(fd);
  return out;
}

std::string MakePng(int width, int height) {
  std::string out("\x89PNG\r\n\x1a\n", 8);
  std::string ihdr;
  PutBe32(ihdr, static_cast<uint32_t>(width));
  PutBe32(ihdr, static_cast<uint32_t>(height));
  ihdr += std::string("\x08\x02\x00\x00\x00", 5);  // 8-bit RGB, deflate, no filter/interlace
  PngChunk(out, "IHDR", ihdr);
  std::string raw;
  for (int y = 0; y < height; ++y) {
    raw.push_back(0);  // filter: none
    for (int x = 0; x < width; ++x) {
      raw.push_back(static_cast<char>(x * 255 / std::max(1, width - 1)));
      raw.push_back(static_cast<char>(y * 255 / std::max(1, height - 1)));
      raw.push_back(static_cast<char>(128));
    }
  }
  uLongf n = compressBound(static_cast<uLong>(raw.size()));
  std::string z(n, '\0');
  compress(reinterpret_cast<Bytef*>(z.data()), &n, reinterpret_cast<const Bytef*>(raw.data()),
           static_cast<uLong>(raw.size()));
  z.resize(n);
  PngChunk(out, "IDAT", z);
  PngChunk(out, "IEND", "");
  return out;
}

std::string MakeJpeg(int width, int height) {
  std::string out("\xFF\xD8", 2);
  // APP0 JFIF
  out += std::string("\xFF\xE0", 2);
  PutBe16(out, 16);
  out += std::string("JFIF\0\x01\x01\x00\x00\x01\x00\x01\x00\x00", 14);
  // SOF0: precision 8, height, width, 3 components
  out += std::string("\xFF\xC0", 2);
  PutBe16(out, 17);
  out.push_back(8);
  PutBe16(out, static_cast<uint16_t>(height));
  PutBe16(out, static_cast<uint16_t>(width));
  out.push_back(3);
  for (int c = 1; c <= 3; ++c) {
    out.push_back(static_cast<char>(c));
    out.push_back(0x11);
    out.push_back(0);
  }
  // SOS
  out += std::string("\xFF\xDA", 2);
  PutBe16(out, 12);
  out.push_back(3);
  for (int c = 1; c <= 3; ++c) {
    out.push_back(static_cast<char>(c));
    out.push_back(0);
  }
  out += std::string("\x00\x3F\x00", 3);
  out += std::string(64, '\x55');  // filler "entropy-coded" bytes
  out += std::string("\xFF\xD9", 2);
  return out;
}

std::string MakeConceptBlob(const ConceptBlobSpec& spec) {
  static const nlohmann::json* vocab = [] {
    std::ifstream in(SharedDir() + "/data/clip/vocab.json");
    auto* j = new nlohmann::json(in ? nlohmann::json::parse(in, nullptr, false) : nlohmann::json::object());
    return j;
  }();
  const std::string key = spec.superclass + "</w>";
  const int64_t token = vocab->is_object() && vocab->contains(key) ? (*vocab)[key].get<int64_t>() : 0;
  constexpr int64_t kWidth = 4;
  const int64_t out_dim = std::max<int64_t>(1, (static_cast<int64_t>(spec.payload_bytes) - 3 * kWidth * 4) / 4);
  nlohmann::json tensors = nlohmann::json::object();
  uint64_t offset = 0;
  for (const auto& [name, n] : std::vector<std::pair<std::string, int64_t>>{
           {"i_star", kWidth}, {"i_sup", kWidth}, {"embedding", kWidth}, {"v_targets", out_dim}}) {
    tensors[name] = {{"dtype", "F32"}, {"shape", {n}}, {"data_offsets", {offset, offset + 4 * n}}};
    offset += 4 * n;
  }
  nlohmann::json h = {{"format", "perfusion-concept"},
                      {"format_version", 1},
                      {"name", spec.name},
                      {"superclass", spec.superclass},
                      {"superclass_token_id", token},
                      {"base_model_id", spec.base_model_id},
                      {"embedding_dim", kWidth},
                      {"encoder_dim", kWidth},
                      {"dtype", "F32"},
                      {"default_gate", {{"beta", 0.7}, {"temperature", 0.15}}},
                      {"layers", {{{"name", "test.attn2"}, {"out_dim", out_dim}}}},
                      {"info", {{"steps", "400"}}},
                      {"tensors", tensors}};
  if (spec.edit_header) spec.edit_header(h);
  std::string header = h.dump();
  while ((8 + header.size()) % 8 != 0) header.push_back(' ');
  std::string out = "PFCN";
  uint32_t len = static_cast<uint32_t>(header.size());
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((len >> (8 * i)) & 0xFF));
  out += header;
  uint32_t bits;
  std::memcpy(&bits, &spec.value, 4);
  for (uint64_t i = 0; i < offset / 4; ++i) {
    for (int b = 0; b < 4; ++b) out.push_back(static_cast<char>((bits >> (8 * b)) & 0xFF));
  }
  const uint32_t crc = Crc32c(out);
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((crc >> (8 * i)) & 0xFF));
  return out;
}

std::string MakeConceptBlob(const std::string& base_model_id, const std::string& name,
                            const std::string& superclass, size_t payload_bytes) {
  ConceptBlobSpec spec;
  spec.base_model_id = base_model_id;
  spec.name = name;
  spec.superclass = superclass;
  spec.payload_bytes = payload_bytes;
  return MakeConceptBlob(spec);
}

std::string MakeTempDir() {
  std::string tmpl = (std::filesystem::temp_directory_path() / "perfusion_test_XXXXXX").string();
  char* dir = mkdtemp(tmpl.data());
  return dir ? std::string(dir) : std::string();
}

std::string WriteFile(const std::string& dir, const std::string& name,
                      const std::string& contents) {
  std::string path = (std::filesystem::path(dir) / name).string();
  std::ofstream(path, std::ios::binary) << contents;
  return path;
}

std::string SharedDir() {
#ifdef PERFUSION_SHARED_DIR
  if (const char* env = getenv("PERFUSION_SHARED_DIR")) return env;
  return PERFUSION_SHARED_DIR;
#else
  return "../shared";
#endif
}

bool FileExists(const std::string& path) { return std::filesystem::exists(path); }

}  // namespace perfusion::server::testing

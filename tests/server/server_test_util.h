// Helpers for tests/server: real image files and concept blobs made on the fly, temp folders,
// the shared reference-data folder.
#ifndef PERFUSION_TESTS_SERVER_SERVER_TEST_UTIL_H_
#define PERFUSION_TESTS_SERVER_SERVER_TEST_UTIL_H_

#include <chrono>
#include <functional>
#include <string>

#include <nlohmann/json.hpp>

namespace perfusion::server::testing {

// A TCP connection to 127.0.0.1:port, or -1.
int ConnectLocal(int port);
// Everything the peer sends on `fd` until it closes, or until `timeout` passes between two reads.
std::string ReadAll(int fd, std::chrono::milliseconds timeout = std::chrono::seconds(10));
// One HTTP/1.1 request on its own connection; the whole response (headers and body), "" when
// nothing listens.
std::string HttpGet(int port, const std::string& path, const std::string& method = "GET");

// A valid 8-bit RGB PNG (zlib-compressed rows, correct CRCs) of a gradient.
std::string MakePng(int width, int height);
// A structurally valid baseline JPEG (SOI, APP0, SOF0, SOS, scan bytes, EOI). Its scan data is
// filler: it passes the server's structural check but is not a decodable picture.
std::string MakeJpeg(int width, int height);
// A concept blob in the engine's format that passes the server's checks: "PFCN", LE uint32
// header length, the JSON header the engine writes (one layer "test.attn2", widths of 4, every
// tensor F32 and filled with `value`), about `payload_bytes` of tensor data, and the LE uint32
// CRC-32C of all before it. superclass_token_id is the superclass's id in ../shared's CLIP
// vocabulary (0 without it). `edit_header` may change the header before it is written.
struct ConceptBlobSpec {
  std::string base_model_id = "tiny";
  std::string name = "teddy";
  std::string superclass = "toy";
  size_t payload_bytes = 2048;
  float value = 0.5f;
  std::function<void(nlohmann::json&)> edit_header;
};
std::string MakeConceptBlob(const ConceptBlobSpec& spec);
std::string MakeConceptBlob(const std::string& base_model_id, const std::string& name,
                            const std::string& superclass, size_t payload_bytes = 2048);
// A fresh empty folder (removed by nobody: under the system temp folder).
std::string MakeTempDir();
// Writes `contents` to dir/name and returns the path.
std::string WriteFile(const std::string& dir, const std::string& name,
                      const std::string& contents);
// ../shared (reference data), as configured by CMake.
std::string SharedDir();
bool FileExists(const std::string& path);

}  // namespace perfusion::server::testing

#endif  // PERFUSION_TESTS_SERVER_SERVER_TEST_UTIL_H_

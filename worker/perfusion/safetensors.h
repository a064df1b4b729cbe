// safetensors: reading and writing the safetensors file format.
//
// Ref: https://github.com/huggingface/safetensors (format): an 8-byte little-endian header length N,
// N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}},
// then the raw little-endian tensor bytes; offsets are relative to the end of the header.
//
// Reading memory-maps the file (MAP_PRIVATE, copy-on-write) and hands out zero-copy CPU tensors that
// keep the mapping alive; writing to such a tensor never changes the file. Every header field is
// bounds-checked: a truncated file, a header pointing past the end, overlapping or mis-sized data,
// an unknown dtype or malformed JSON raise c10::Error (TORCH_CHECK) naming the file and the tensor.
// Dtypes: F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL.
//
// Thread safety: a SafetensorsReader is immutable after Open(); concurrent get() calls are safe.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace perfusion {

struct SafetensorInfo {
  std::string dtype;           // as in the file: "F32", "F16", ...
  std::vector<int64_t> shape;  // PyTorch order
  uint64_t begin = 0;          // byte offsets into the data section
  uint64_t end = 0;
};

class SafetensorsReader {
 public:
  // Maps `path` and validates its header. Throws c10::Error on any malformed input.
  static std::shared_ptr<const SafetensorsReader> Open(const std::string& path);
  ~SafetensorsReader();
  SafetensorsReader(const SafetensorsReader&) = delete;
  SafetensorsReader& operator=(const SafetensorsReader&) = delete;

  const std::string& path() const { return path_; }
  // Tensor names in file order (sorted by data offset).
  const std::vector<std::string>& names() const { return names_; }
  bool contains(const std::string& name) const { return infos_.count(name) != 0; }
  // REQUIRES: contains(name); otherwise throws (c10::IndexError) naming the file and tensor.
  const SafetensorInfo& info(const std::string& name) const;
  // Zero-copy view of the tensor's bytes, in its stored dtype, on the CPU. The tensor keeps the
  // mapping alive. (Copied instead when the data is not aligned for its dtype.)
  at::Tensor get(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  uint64_t file_size() const { return size_; }
  // Bytes before the tensor data: the 8-byte header length and the JSON header.
  uint64_t data_start() const { return data_start_; }

 private:
  SafetensorsReader() = default;
  std::string path_;
  void* map_ = nullptr;
  uint64_t size_ = 0;
  uint64_t data_start_ = 0;
  std::vector<std::string> names_;
  std::map<std::string, SafetensorInfo> infos_;
  std::map<std::string, std::string> metadata_;
  std::weak_ptr<const SafetensorsReader> self_;
};

// Loads every tensor of a file (zero-copy views, see SafetensorsReader::get).
std::map<std::string, at::Tensor> LoadSafetensors(const std::string& path,
                                                  std::map<std::string, std::string>* metadata = nullptr);

// Serialises tensors (any device; copied to contiguous CPU) in the given order. Names must be unique
// and non-empty; "__metadata__" is reserved. Tensors are laid out largest element size first so each
// is naturally aligned.
std::string SerializeSafetensors(const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                                 const std::map<std::string, std::string>& metadata = {});
// Writes SerializeSafetensors(...) to `path` atomically (temporary file, then rename).
void SaveSafetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                     const std::map<std::string, std::string>& metadata = {});

// Writes `bytes` to `path` through a temporary file and rename(), so readers never see half a file.
void WriteFileAtomically(const std::string& path, const std::string& bytes);
// Reads a whole file; throws c10::Error naming the path if it cannot.
std::string ReadFileToString(const std::string& path);

}  // namespace perfusion

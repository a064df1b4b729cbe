#include "perfusion/safetensors.h"

#include <ATen/Functions.h>
#include <c10/util/Exception.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "perfusion/json_text.h"

namespace perfusion {
namespace {

constexpr uint64_t kMaxHeaderBytes = 100u << 20;  // the reference implementation's limit

struct DtypeEntry {
  const char* name;
  at::ScalarType type;
  int size;
};
constexpr DtypeEntry kDtypes[] = {
    {"F64", at::kDouble, 8}, {"F32", at::kFloat, 4}, {"F16", at::kHalf, 2}, {"BF16", at::kBFloat16, 2},
    {"I64", at::kLong, 8},   {"I32", at::kInt, 4},   {"I16", at::kShort, 2}, {"I8", at::kChar, 1},
    {"U8", at::kByte, 1},    {"BOOL", at::kBool, 1},
};

const DtypeEntry* FindDtype(const std::string& name) {
  for (const auto& d : kDtypes) {
    if (name == d.name) return &d;
  }
  return nullptr;
}
const DtypeEntry* FindDtype(at::ScalarType type) {
  for (const auto& d : kDtypes) {
    if (type == d.type) return &d;
  }
  return nullptr;
}

uint64_t ReadLe64(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

}  // namespace

SafetensorsReader::~SafetensorsReader() {
  if (map_ != nullptr && map_ != MAP_FAILED) munmap(map_, size_);
}

std::shared_ptr<const SafetensorsReader> SafetensorsReader::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  TORCH_CHECK(fd >= 0, "safetensors: cannot open ", path, ": ", std::strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    TORCH_CHECK(false, "safetensors: cannot stat ", path, ": ", std::strerror(errno));
  }
  std::shared_ptr<SafetensorsReader> r(new SafetensorsReader());
  r->path_ = path;
  r->size_ = static_cast<uint64_t>(st.st_size);
  if (r->size_ < 8) {
    ::close(fd);
    TORCH_CHECK(false, "safetensors: ", path, " is truncated (", r->size_, " bytes, no header length)");
  }
  r->map_ = mmap(nullptr, r->size_, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  ::close(fd);
  TORCH_CHECK(r->map_ != MAP_FAILED, "safetensors: cannot map ", path, ": ", std::strerror(errno));
  const auto* bytes = static_cast<const unsigned char*>(r->map_);
  const uint64_t header_len = ReadLe64(bytes);
  TORCH_CHECK(header_len <= kMaxHeaderBytes, "safetensors: ", path, ": header length ", header_len,
              " is over the limit of ", kMaxHeaderBytes, " bytes");
  TORCH_CHECK(8 + header_len <= r->size_, "safetensors: ", path, " is truncated: header of ", header_len,
              " bytes but the file has ", r->size_, " bytes");
  r->data_start_ = 8 + header_len;
  const uint64_t data_size = r->size_ - r->data_start_;

  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes + 8, bytes + 8 + header_len);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "safetensors: ", path, ": header is not valid JSON: ", e.what());
  }
  TORCH_CHECK(header.is_object(), "safetensors: ", path, ": header is not a JSON object");
  std::vector<std::pair<uint64_t, std::string>> order;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const auto& v = it.value();
    if (name == "__metadata__") {
      TORCH_CHECK(v.is_object(), "safetensors: ", path, ": __metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        TORCH_CHECK(m.value().is_string(), "safetensors: ", path, ": __metadata__.", m.key(),
                    " is not a string");
        r->metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    TORCH_CHECK(v.is_object() && v.contains("dtype") && v.contains("shape") && v.contains("data_offsets"),
                "safetensors: ", path, ": tensor '", name, "' lacks dtype, shape or data_offsets");
    TORCH_CHECK(v["dtype"].is_string(), "safetensors: ", path, ": tensor '", name, "': dtype is not a string");
    SafetensorInfo info;
    info.dtype = v["dtype"].get<std::string>();
    const DtypeEntry* dt = FindDtype(info.dtype);
    TORCH_CHECK(dt != nullptr, "safetensors: ", path, ": tensor '", name, "' has unsupported dtype ",
                info.dtype);
    TORCH_CHECK(v["shape"].is_array(), "safetensors: ", path, ": tensor '", name, "': shape is not a list");
    uint64_t numel = 1;
    for (const auto& d : v["shape"]) {
      TORCH_CHECK(d.is_number_unsigned() || (d.is_number_integer() && d.get<int64_t>() >= 0),
                  "safetensors: ", path, ": tensor '", name, "': bad dimension ", JsonForMessage(d));
      const uint64_t dim = d.get<uint64_t>();
      // Each dimension on its own too: after a 0, the product stays 0 whatever follows, and a
      // dimension of 2^63 would become negative as an int64.
      uint64_t next = 0;
      TORCH_CHECK(dim <= (uint64_t{1} << 62) && !__builtin_mul_overflow(numel, dim, &next) &&
                      next <= (uint64_t{1} << 62),
                  "safetensors: ", path, ": tensor '", name, "': shape overflows");
      numel = next;
      info.shape.push_back(static_cast<int64_t>(dim));
    }
    const auto& off = v["data_offsets"];
    TORCH_CHECK(off.is_array() && off.size() == 2 && off[0].is_number_unsigned() && off[1].is_number_unsigned(),
                "safetensors: ", path, ": tensor '", name, "': data_offsets is not [begin, end]");
    info.begin = off[0].get<uint64_t>();
    info.end = off[1].get<uint64_t>();
    TORCH_CHECK(info.begin <= info.end && info.end <= data_size, "safetensors: ", path, ": tensor '", name,
                "': data_offsets [", info.begin, ", ", info.end, "] point past the end of the data (",
                data_size, " bytes; file truncated?)");
    uint64_t bytes = 0;  // numel * element size, which can exceed 64 bits for an 8-byte dtype
    TORCH_CHECK(!__builtin_mul_overflow(numel, static_cast<uint64_t>(dt->size), &bytes), "safetensors: ", path,
                ": tensor '", name, "': shape overflows");
    TORCH_CHECK(info.end - info.begin == bytes, "safetensors: ", path,
                ": tensor '", name, "': ", info.end - info.begin, " bytes of data for ", numel,
                " elements of ", info.dtype);
    order.emplace_back(info.begin, name);
    r->infos_.emplace(name, std::move(info));
  }
  std::sort(order.begin(), order.end());
  uint64_t prev_end = 0;
  for (const auto& [begin, name] : order) {
    const auto& info = r->infos_.at(name);
    if (info.end > info.begin) {
      TORCH_CHECK(info.begin >= prev_end, "safetensors: ", path, ": tensor '", name,
                  "' overlaps the previous tensor's data");
      prev_end = info.end;
    }
    r->names_.push_back(name);
  }
  r->self_ = r;
  return r;
}

const SafetensorInfo& SafetensorsReader::info(const std::string& name) const {
  auto it = infos_.find(name);
  TORCH_CHECK_INDEX(it != infos_.end(), "safetensors: ", path_, " has no tensor '", name, "'");
  return it->second;
}

at::Tensor SafetensorsReader::get(const std::string& name) const {
  const SafetensorInfo& i = info(name);
  const DtypeEntry* dt = FindDtype(i.dtype);
  auto* p = static_cast<unsigned char*>(map_) + data_start_ + i.begin;
  const auto options = at::TensorOptions().dtype(dt->type).device(at::kCPU);
  if (i.end == i.begin) return at::empty(i.shape, options);
  if (reinterpret_cast<uintptr_t>(p) % dt->size != 0) {
    at::Tensor out = at::empty(i.shape, options);
    std::memcpy(out.data_ptr(), p, i.end - i.begin);
    return out;
  }
  auto keep = self_.lock();
  return at::from_blob(p, i.shape, [keep](void*) {}, options);
}

std::map<std::string, at::Tensor> LoadSafetensors(const std::string& path,
                                                  std::map<std::string, std::string>* metadata) {
  auto reader = SafetensorsReader::Open(path);
  std::map<std::string, at::Tensor> out;
  for (const auto& name : reader->names()) out.emplace(name, reader->get(name));
  if (metadata != nullptr) *metadata = reader->metadata();
  return out;
}

std::string SerializeSafetensors(const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                                 const std::map<std::string, std::string>& metadata) {
  struct Item {
    std::string name;
    at::Tensor t;
    const DtypeEntry* dt;
  };
  std::vector<Item> items;
  std::map<std::string, int> seen;
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK_VALUE(!name.empty() && name != "__metadata__", "safetensors: invalid tensor name '", name, "'");
    TORCH_CHECK_VALUE(seen.emplace(name, 1).second, "safetensors: duplicate tensor name '", name, "'");
    TORCH_CHECK_VALUE(t.defined(), "safetensors: tensor '", name, "' is undefined");
    const DtypeEntry* dt = FindDtype(t.scalar_type());
    TORCH_CHECK_VALUE(dt != nullptr, "safetensors: tensor '", name, "' has unsupported dtype ", t.scalar_type());
    items.push_back({name, t.detach().to(at::kCPU).contiguous(), dt});
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.dt->size > b.dt->size; });
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    header["__metadata__"] = m;
  }
  uint64_t offset = 0;
  for (const auto& it : items) {
    const uint64_t nbytes = static_cast<uint64_t>(it.t.numel()) * it.dt->size;
    header[it.name] = {{"dtype", it.dt->name}, {"shape", it.t.sizes().vec()}, {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string json = header.dump();
  while (json.size() % 8 != 0) json.push_back(' ');
  std::string out;
  out.reserve(8 + json.size() + offset);
  const uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  out += json;
  for (const auto& it : items) {
    out.append(static_cast<const char*>(it.t.data_ptr()), static_cast<size_t>(it.t.numel()) * it.dt->size);
  }
  return out;
}

void WriteFileAtomically(const std::string& path, const std::string& bytes) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    TORCH_CHECK(f.good(), "cannot write ", tmp, ": ", std::strerror(errno));
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    f.flush();
    TORCH_CHECK(f.good(), "write to ", tmp, " failed: ", std::strerror(errno));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    TORCH_CHECK(false, "cannot rename ", tmp, " to ", path, ": ", std::strerror(err));
  }
}

std::string ReadFileToString(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  TORCH_CHECK(f.good(), "cannot open ", path, ": ", std::strerror(errno));
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void SaveSafetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                     const std::map<std::string, std::string>& metadata) {
  WriteFileAtomically(path, SerializeSafetensors(tensors, metadata));
}

}  // namespace perfusion

#include "worker/blob_cache.h"

#include <openssl/sha.h>

#include <algorithm>

namespace perfusion::worker {

std::string Sha256Hex(absl::string_view data) {
  unsigned char md[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(data.data()), data.size(), md);
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out(2 * SHA256_DIGEST_LENGTH, '0');
  for (int i = 0; i < SHA256_DIGEST_LENGTH; ++i) {
    out[2 * i] = kHex[md[i] >> 4];
    out[2 * i + 1] = kHex[md[i] & 0xf];
  }
  return out;
}

BlobCache::BlobCache(int64_t capacity_bytes) : capacity_(std::max<int64_t>(0, capacity_bytes)) {}

std::shared_ptr<const std::string> BlobCache::Get(const std::string& digest) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(digest);
  if (it == entries_.end()) {
    ++misses_;
    return nullptr;
  }
  ++hits_;
  lru_.splice(lru_.begin(), lru_, it->second.lru_pos);
  return it->second.blob;
}

std::shared_ptr<const std::string> BlobCache::Put(const std::string& digest, std::string blob) {
  auto shared = std::make_shared<const std::string>(std::move(blob));
  const int64_t size = static_cast<int64_t>(shared->size());
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(digest);
  if (it != entries_.end()) {
    bytes_ -= static_cast<int64_t>(it->second.blob->size());
    lru_.erase(it->second.lru_pos);
    entries_.erase(it);
  }
  if (size > capacity_) return shared;
  lru_.push_front(digest);
  entries_[digest] = Entry{shared, lru_.begin()};
  bytes_ += size;
  EvictLocked();
  return shared;
}

void BlobCache::EvictLocked() {
  while (bytes_ > capacity_ && !lru_.empty()) {
    auto it = entries_.find(lru_.back());
    bytes_ -= static_cast<int64_t>(it->second.blob->size());
    entries_.erase(it);
    lru_.pop_back();
    ++evictions_;
  }
}

BlobCache::Stats BlobCache::stats() const {
  absl::MutexLock lock(&mu_);
  Stats s;
  s.entries = static_cast<int64_t>(entries_.size());
  s.bytes = bytes_;
  s.capacity = capacity_;
  s.hits = hits_;
  s.misses = misses_;
  s.evictions = evictions_;
  return s;
}

}  // namespace perfusion::worker

// BlobCache: the worker's cache of concept blobs, keyed by their SHA-256 digest (a digest's
// bytes never change, so an entry never goes stale), least-recently-used first out, bounded by
// the total size of the blobs it holds.
//
//   BlobCache cache(256 << 20);
//   if (auto blob = cache.Get(digest)) { ... }            // a hit (and now most recently used)
//   else blob = cache.Put(digest, FetchFromServer(...));  // a miss: fetched, kept
//
// A blob larger than the whole capacity is handed back by Put but not kept. Blobs are shared
// (std::shared_ptr<const std::string>): an evicted blob stays valid for whoever still holds it.
//
// Thread safety: every method may be called concurrently.
#ifndef PERFUSION_WORKER_BLOB_CACHE_H_
#define PERFUSION_WORKER_BLOB_CACHE_H_

#include <cstdint>
#include <list>
#include <memory>
#include <string>
#include <unordered_map>

#include "absl/base/thread_annotations.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace perfusion::worker {

// Lowercase hex SHA-256 of `data` (the digest the server stores for every concept).
std::string Sha256Hex(absl::string_view data);

class BlobCache {
 public:
  // REQUIRES: capacity_bytes >= 0 (0 keeps nothing; every Get is a miss).
  explicit BlobCache(int64_t capacity_bytes);
  BlobCache(const BlobCache&) = delete;
  BlobCache& operator=(const BlobCache&) = delete;

  // The blob for `digest` (now the most recently used), or nullptr. Counts a hit or a miss.
  std::shared_ptr<const std::string> Get(const std::string& digest);

  // Stores `blob` under `digest` as the most recently used entry (replacing an entry with the
  // same digest), then evicts least-recently-used entries until the total fits the capacity.
  // Returns the stored blob (or, when it is larger than the capacity, the blob unstored).
  std::shared_ptr<const std::string> Put(const std::string& digest, std::string blob);

  struct Stats {
    int64_t entries = 0;
    int64_t bytes = 0;     // sum of the held blobs' sizes, <= capacity
    int64_t capacity = 0;
    int64_t hits = 0;
    int64_t misses = 0;
    int64_t evictions = 0;
  };
  Stats stats() const;

 private:
  struct Entry {
    std::shared_ptr<const std::string> blob;
    std::list<std::string>::iterator lru_pos;
  };
  void EvictLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int64_t capacity_;
  mutable absl::Mutex mu_;
  std::list<std::string> lru_ ABSL_GUARDED_BY(mu_);  // front: most recently used
  std::unordered_map<std::string, Entry> entries_ ABSL_GUARDED_BY(mu_);
  int64_t bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t hits_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t misses_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t evictions_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace perfusion::worker

#endif  // PERFUSION_WORKER_BLOB_CACHE_H_

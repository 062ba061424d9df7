#include "cpu/buffer_pool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <sys/mman.h>

namespace physmdn::cpu {
namespace {

// Each block starts with a header holding its payload size and the pool generation that allocated it; the payload
// is 64-byte aligned.
constexpr size_t kHeader = 64;
constexpr int64_t kMaxLimitMb = int64_t(1) << 20;  // 1 TiB

int64_t limit_from_env() {
  const char* env = std::getenv("PHYSMDN_CPU_POOL_MB");
  if (!env || !*env) return int64_t(256) << 20;
  char* end = nullptr;
  const double mb = std::strtod(env, &end);
  PHYSMDN_CHECK(end && end != env && *end == '\0' && std::isfinite(mb) && mb >= 0 && mb <= static_cast<double>(kMaxLimitMb),
              "PHYSMDN_CPU_POOL_MB must be a finite number of MiB in [0, ", kMaxLimitMb, "] (0 disables the pool), got '",
              env, "'");
  return static_cast<int64_t>(mb * (1 << 20));
}

// The process's pool generation: a child of fork() starts a new one, so that blocks it inherited from the parent
// are freed without entering its accounting or its cache.
std::atomic<uint64_t> g_generation{1};

struct Pool {
  struct Entry {
    size_t n;
    void* block;
  };
  std::mutex mutex;
  std::list<Entry> lru;                                     // cached blocks, least recently freed first
  std::multimap<size_t, std::list<Entry>::iterator> by_size;  // payload size -> its entries in lru
  int64_t limit = limit_from_env(), cached_bytes = 0, live_bytes = 0, hits = 0, misses = 0;

  void evict_oldest_locked() {
    const auto oldest = lru.begin();
    auto [first, last] = by_size.equal_range(oldest->n);
    for (auto it = first; it != last; ++it)
      if (it->second == oldest) {
        by_size.erase(it);
        break;
      }
    cached_bytes -= static_cast<int64_t>(oldest->n);
    std::free(oldest->block);
    lru.erase(oldest);
  }
  void trim_locked(int64_t target) {
    while (cached_bytes > target && !lru.empty()) evict_oldest_locked();
  }
  // a cached block of exactly n bytes (the most recently freed), or null
  void* take_locked(size_t n) {
    auto range = by_size.equal_range(n);
    if (range.first == range.second) return nullptr;
    auto it = std::prev(range.second);
    void* block = it->second->block;
    lru.erase(it->second);
    by_size.erase(it);
    cached_bytes -= static_cast<int64_t>(n);
    return block;
  }
  // caches a freed block, evicting the least recently freed ones to make room; false when it cannot fit at all
  bool put_locked(size_t n, void* block) {
    if (static_cast<int64_t>(n) > limit) return false;
    while (cached_bytes + static_cast<int64_t>(n) > limit && !lru.empty()) evict_oldest_locked();
    by_size.emplace(n, lru.insert(lru.end(), Entry{n, block}));
    cached_bytes += static_cast<int64_t>(n);
    return true;
  }
};

// Leaked on purpose: tensors may be freed during interpreter shutdown, after static destructors ran.
Pool* g_pool = nullptr;
std::once_flag g_once;

// The child must not inherit a possibly locked mutex, nor account for or reuse the parent's blocks: it starts an
// empty pool of a new generation. The parent's cached blocks stay mapped copy-on-write and untouched in the child.
void reset_after_fork() {
  g_generation.fetch_add(1);
  g_pool = new Pool();
}

Pool& pool() {
  std::call_once(g_once, [] {
    g_pool = new Pool();
    pthread_atfork(nullptr, nullptr, &reset_after_fork);
  });
  return *g_pool;
}

void pool_delete(void* payload) {
  if (!payload) return;
  void* block = static_cast<char*>(payload) - kHeader;
  size_t n;
  uint64_t generation;
  std::memcpy(&n, block, sizeof(n));
  std::memcpy(&generation, static_cast<char*>(block) + sizeof(n), sizeof(generation));
  if (generation != g_generation.load()) {  // inherited across fork(): not this process's pool
    std::free(block);
    return;
  }
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  p.live_bytes -= static_cast<int64_t>(n);
  if (!p.put_locked(n, block)) std::free(block);
}

constexpr size_t kHuge = size_t(2) << 20;

// A block of n > 0 bytes: from the cache, or new.
void* pool_allocate(size_t n) {
  Pool& p = pool();
  void* block = nullptr;
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    block = p.take_locked(n);
    ++(block ? p.hits : p.misses);
  }
  if (!block) {
    // Large blocks: 2 MiB-aligned and backed by transparent huge pages where the kernel allows it (mode
    // "madvise" or "always"): fewer TLB misses on the streamed gradient outputs, 3-7 % per mixture_nll call at
    // B = 65536 on a VM (nested page walks).
    if (n >= kHuge) {
      if (posix_memalign(&block, kHuge, n + kHeader) == 0 && block)
        madvise(block, (n + kHeader + kHuge - 1) / kHuge * kHuge, MADV_HUGEPAGE);
      else
        block = nullptr;
    }
    if (!block && (posix_memalign(&block, kHeader, n + kHeader) != 0 || !block)) {
      {
        std::lock_guard<std::mutex> lock(p.mutex);
        p.trim_locked(0);  // give the cache back and retry once
      }
      PHYSMDN_CHECK(posix_memalign(&block, kHeader, n + kHeader) == 0 && block, "physmdn: out of CPU memory allocating ",
                  n, " bytes");
    }
    std::memcpy(block, &n, sizeof(n));
    const uint64_t generation = g_generation.load();
    std::memcpy(static_cast<char*>(block) + sizeof(n), &generation, sizeof(generation));
  }
  void* payload = static_cast<char*>(block) + kHeader;
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    p.live_bytes += static_cast<int64_t>(n);
  }
  return payload;
}

}  // namespace

Tensor pooled_empty(IntArrayRef sizes, ScalarType dtype) {
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t item = dtype == kDouble ? 8 : dtype == kFloat ? 4 : 2;
  const auto nbytes = static_cast<size_t>(numel) * item;
  if (nbytes < kPoolMinBytes || pool().limit == 0) return empty(sizes, dtype, Device(torch::headeronly::DeviceType::CPU));
  std::vector<int64_t> strides(sizes.size());
  int64_t stride = 1;
  for (size_t d = sizes.size(); d-- > 0;) {
    strides[d] = stride;
    stride *= std::max<int64_t>(sizes[d], 1);
  }
  void* payload = pool_allocate(nbytes);
  return torch::stable::from_blob(payload, sizes, IntArrayRef(strides), Device(torch::headeronly::DeviceType::CPU), dtype,
                                  &pool_delete);
}

PoolStats pool_stats() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  return {p.limit, p.cached_bytes, p.live_bytes, p.hits, p.misses};
}

int64_t set_pool_limit(int64_t bytes) {
  PHYSMDN_CHECK(bytes >= 0, "set_cpu_pool_limit: bytes must be >= 0, got ", bytes);
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  const int64_t previous = p.limit;
  p.limit = bytes;
  p.trim_locked(bytes);
  return previous;
}

void pool_release_cached() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  p.trim_locked(0);
}

}  // namespace physmdn::cpu

#include "cpu/buffer_pool.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <pthread.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <sys/mman.h>

namespace physmdn::cpu {
namespace {

// Each block starts with a header holding its payload size; the payload is 64-byte aligned.
constexpr size_t kHeader = 64;

int64_t limit_from_env() {
  const char* env = std::getenv("PHYSMDN_CPU_POOL_MB");
  if (!env || !*env) return int64_t(256) << 20;
  char* end = nullptr;
  const double mb = std::strtod(env, &end);
  TORCH_CHECK(end && *end == '\0' && mb >= 0, "PHYSMDN_CPU_POOL_MB must be a number of MiB >= 0, got '", env, "'");
  return static_cast<int64_t>(mb * (1 << 20));
}

struct Pool {
  std::mutex mutex;
  std::multimap<size_t, void*> cached;  // payload size -> block (header address)
  int64_t limit = limit_from_env(), cached_bytes = 0, live_bytes = 0, hits = 0, misses = 0;

  void trim_locked(int64_t target) {
    while (cached_bytes > target && !cached.empty()) {
      auto it = std::prev(cached.end());  // largest first
      cached_bytes -= static_cast<int64_t>(it->first);
      std::free(it->second);
      cached.erase(it);
    }
  }
};

// Leaked on purpose: tensors may be freed during interpreter shutdown, after static destructors ran.
Pool* g_pool = nullptr;
std::once_flag g_once;

void reset_after_fork() { g_pool = new Pool(); }  // the child must not inherit a possibly locked mutex

Pool& pool() {
  std::call_once(g_once, [] {
    g_pool = new Pool();
    pthread_atfork(nullptr, nullptr, &reset_after_fork);
  });
  return *g_pool;
}

void report(void* ptr, int64_t delta, const Pool& p) {
  if (c10::memoryProfilingEnabled())
    c10::reportMemoryUsageToProfiler(ptr, delta, static_cast<size_t>(p.live_bytes),
                                     static_cast<size_t>(p.live_bytes + p.cached_bytes), c10::Device(c10::kCPU));
}

void pool_delete(void* payload) {
  if (!payload) return;
  void* block = static_cast<char*>(payload) - kHeader;
  size_t n;
  std::memcpy(&n, block, sizeof(n));
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  p.live_bytes -= static_cast<int64_t>(n);
  report(payload, -static_cast<int64_t>(n), p);
  if (p.cached_bytes + static_cast<int64_t>(n) <= p.limit) {
    p.cached.emplace(n, block);
    p.cached_bytes += static_cast<int64_t>(n);
  } else {
    std::free(block);
  }
}

constexpr size_t kHuge = size_t(2) << 20;

struct PoolAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &pool_delete, c10::Device(c10::kCPU)};
    Pool& p = pool();
    void* block = nullptr;
    {
      std::lock_guard<std::mutex> lock(p.mutex);
      auto it = p.cached.find(n);
      if (it != p.cached.end()) {
        block = it->second;
        p.cached.erase(it);
        p.cached_bytes -= static_cast<int64_t>(n);
        ++p.hits;
      } else {
        ++p.misses;
      }
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
        TORCH_CHECK(posix_memalign(&block, kHeader, n + kHeader) == 0 && block, "physmdn: out of CPU memory allocating ",
                    n, " bytes");
      }
      std::memcpy(block, &n, sizeof(n));
    }
    void* payload = static_cast<char*>(block) + kHeader;
    {
      std::lock_guard<std::mutex> lock(p.mutex);
      p.live_bytes += static_cast<int64_t>(n);
      report(payload, static_cast<int64_t>(n), p);
    }
    return {payload, payload, &pool_delete, c10::Device(c10::kCPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &pool_delete; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

PoolAllocator g_allocator;

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  TORCH_INTERNAL_ASSERT(opts.device().is_cpu());
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const auto nbytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(opts.dtype()));
  if (nbytes < kPoolMinBytes || pool().limit == 0) return at::empty(sizes, opts);
  return at::detail::empty_generic(sizes, &g_allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(opts.dtype()), c10::nullopt);
}

PoolStats pool_stats() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  return {p.limit, p.cached_bytes, p.live_bytes, p.hits, p.misses};
}

int64_t set_pool_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "set_cpu_pool_limit: bytes must be >= 0, got ", bytes);
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

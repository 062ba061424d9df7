// A bounded cache of CPU buffers for the ops' large outputs (the gradients).
//
// Why: a training loop frees last step's gradients and allocates the same sizes again. glibc returns freed
// multi-megabyte blocks to the kernel (trim / munmap), so every step page-faults its outputs back in and the
// kernel zeroes them: measured at ~3 us per 4 KiB page, 4,300 faults and ~13 ms for the 19 MB of gradients at
// B=65536, K=8, D=4, several times the kernel itself. The pool keeps freed blocks (exact sizes) up to a limit
// and hands them back, evicting the least recently freed blocks when a new one needs room; tensors are ordinary
// resizable CPU tensors whose storage uses this allocator. fork(): the child starts an empty pool and frees the
// blocks it inherited without counting them.
// The stable ABI has no allocator interface: torch's profiler does not see these blocks. Limit: PHYSMDN_CPU_POOL_MB (default 256, at most 2^20; 0 disables), or physmdn._C.set_cpu_pool_limit(bytes).
#pragma once
#include "tensor.h"

#include <cstdint>

namespace physmdn::cpu {

// Blocks below this size come from torch's allocator (small blocks do not fault back in expensively).
constexpr size_t kPoolMinBytes = 256 * 1024;

// A contiguous CPU tensor of sizes and dtype, from the pool when large enough (a tensor over the pool's block whose
// deleter returns the block to the pool).
Tensor pooled_empty(IntArrayRef sizes, ScalarType dtype);

struct PoolStats {
  int64_t limit_bytes, cached_bytes, live_bytes, hits, misses;
};
PoolStats pool_stats();
// Sets the cache limit in bytes (0: cache nothing); returns the previous limit. Frees cached blocks over it.
int64_t set_pool_limit(int64_t bytes);
// Frees every cached block (live blocks are unaffected).
void pool_release_cached();

}  // namespace physmdn::cpu

// A CPU simulator of the CUDA execution model, enough to run csrc/cuda/device_kernels.cuh as host C++ without a GPU
// (tests/cuda/test_cuda_sim.py). Include it after the torch headers and before device_kernels.cuh.
//
// Every thread of a block is a fiber (ucontext) on the calling OS thread; the blocks of a grid run one after the
// other. A fiber runs until it reaches a barrier (__syncthreads, __syncwarp, either half of a shuffle) or returns;
// the scheduler then releases a barrier once every thread it names has arrived at it:
// - __shfl_xor_sync / __syncwarp: all 32 lanes of the warp, at the same kind of warp operation. A lane that has
//   returned, a partial warp, a mask other than 0xffffffff, or lanes at different warp operations are reported as
//   errors (undefined behaviour on a GPU) instead of being resolved one way or another.
// - __syncthreads: every thread of the block that has not returned.
// Nothing is left runnable and no barrier can be released: a deadlock, reported with every thread's state.
// Shared memory (`extern __shared__`) is one buffer (the includer defines it and registers it in shared_buffer())
// filled with 0xFF bytes (NaN for floating point) before every block, so reads of shared memory no thread wrote show
// up in the results.
// Errors are collected while the fibers run and raised by launch() as std::runtime_error once the grid is done.
//
// Not modelled: concurrency between blocks or within a warp (the order is deterministic), memory ordering, the
// device's math library (math::exp_ / log_ take their host branch: std::exp / std::log), timing.
#pragma once
#define PHYSMDN_CUDA_HOST_SIM 1

#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
// the running thread's coordinates (set by the scheduler before it resumes a fiber)
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }

namespace cuda_sim {

enum class Wait { kRunnable, kShuffle, kShuffleRead, kSyncWarp, kSyncThreads, kDone };

inline const char* wait_name(Wait w) {
  switch (w) {
    case Wait::kRunnable: return "runnable";
    case Wait::kShuffle: return "__shfl_xor_sync";
    case Wait::kShuffleRead: return "__shfl_xor_sync (read)";
    case Wait::kSyncWarp: return "__syncwarp";
    case Wait::kSyncThreads: return "__syncthreads";
    default: return "returned";
  }
}

struct Fiber {
  ucontext_t ctx;
  Wait wait = Wait::kRunnable;
};

struct Stats {
  int64_t blocks = 0, threads = 0, shuffles = 0, syncwarps = 0, syncthreads = 0;
  int64_t block_threads = 0, shared_bytes = 0;  // the launch's block size and dynamic shared memory
};

struct Sim {
  ucontext_t main;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<uint64_t> slots;  // one shuffle value per thread of the block
  std::function<void()> body;
  int cur = -1;
  std::vector<std::string> errors;
  Stats stats;

  // what, with the block and (from a running thread) the thread
  void error(const std::string& what, bool in_thread = true) {
    if (errors.size() < 20) {
      std::ostringstream os;
      os << what << " (block " << blockIdx.x << "," << blockIdx.y;
      if (in_thread) os << ", thread " << threadIdx.x;
      os << ")";
      errors.push_back(os.str());
    }
  }
};

inline Sim*& current() {
  static Sim* sim = nullptr;
  return sim;
}

constexpr size_t kStackBytes = 256 * 1024;

// The buffer that stands for a block's dynamic shared memory (registered by the includer).
struct SharedBuffer {
  unsigned char* data = nullptr;
  size_t bytes = 0;
};
inline SharedBuffer& shared_buffer() {
  static SharedBuffer b;
  return b;
}

// Suspends the running fiber at a barrier of kind w (the scheduler resumes it when the barrier is released).
inline void arrive(Wait w) {
  Sim& s = *current();
  Fiber& f = s.fibers[s.cur];
  f.wait = w;
  swapcontext(&f.ctx, &s.main);
}

inline void trampoline() {
  Sim& s = *current();
  try {
    s.body();
  } catch (const std::exception& e) {
    s.error(std::string("exception in a kernel thread: ") + e.what());
  } catch (...) {
    s.error("unknown exception in a kernel thread");
  }
  s.fibers[s.cur].wait = Wait::kDone;  // (uc_link returns to the scheduler)
}

// Each run of threads in the same state (the first 12 runs).
inline std::string describe_block(const Sim& s) {
  std::ostringstream os;
  int runs = 0;
  for (size_t t = 0; t < s.fibers.size(); ++t) {
    if (t > 0 && s.fibers[t].wait == s.fibers[t - 1].wait) continue;
    if (++runs > 12) {
      os << "\n  ...";
      break;
    }
    os << "\n  threads from " << t << ": " << wait_name(s.fibers[t].wait);
  }
  return os.str();
}

// Releases the barriers that every participant has reached; false when none could be released.
inline bool release(Sim& s) {
  const int n = static_cast<int>(s.fibers.size());
  bool released = false;
  for (int w0 = 0; w0 < n; w0 += 32) {
    const int w1 = std::min(n, w0 + 32);
    bool any_warp_op = false;
    for (int t = w0; t < w1; ++t) {
      const Wait w = s.fibers[t].wait;
      any_warp_op |= w == Wait::kShuffle || w == Wait::kShuffleRead || w == Wait::kSyncWarp;
    }
    if (!any_warp_op) continue;
    const Wait first = s.fibers[w0].wait;
    bool same = w1 - w0 == 32;
    for (int t = w0; t < w1 && same; ++t) same = s.fibers[t].wait == first;
    if (same) {
      for (int t = w0; t < w1; ++t) s.fibers[t].wait = Wait::kRunnable;
      released = true;
      continue;
    }
    // a warp operation cannot complete when a lane has returned, the warp is partial, or the lanes wait at
    // different operations (all but the last are undefined behaviour on a GPU; the last may be a lane still behind)
    bool runnable = false, ub = w1 - w0 != 32;
    for (int t = w0; t < w1; ++t) {
      runnable |= s.fibers[t].wait == Wait::kRunnable;
      ub |= s.fibers[t].wait == Wait::kDone;
    }
    if (ub) {
      std::ostringstream os;
      os << "warp operation with lanes that have returned or a partial warp (warp " << w0 / 32 << ")";
      s.error(os.str(), false);
      for (int t = w0; t < w1; ++t)  // let them go on, so that the run ends and reports
        if (s.fibers[t].wait != Wait::kDone) s.fibers[t].wait = Wait::kRunnable;
      released = true;
    } else if (!runnable) {
      bool mixed = false;
      for (int t = w0; t < w1; ++t) {
        const Wait w = s.fibers[t].wait;
        mixed |= (w == Wait::kShuffle || w == Wait::kShuffleRead || w == Wait::kSyncWarp) && w != first;
      }
      if (mixed) {
        std::ostringstream os;
        os << "lanes of warp " << w0 / 32 << " at different warp operations:" << describe_block(s);
        s.error(os.str(), false);
        for (int t = w0; t < w1; ++t) s.fibers[t].wait = Wait::kRunnable;
        released = true;
      }
    }
  }
  bool all_sync = true, any_sync = false;
  for (const auto& f : s.fibers) {
    all_sync &= f.wait == Wait::kSyncThreads || f.wait == Wait::kDone;
    any_sync |= f.wait == Wait::kSyncThreads;
  }
  if (any_sync && all_sync) {
    for (auto& f : s.fibers)
      if (f.wait == Wait::kSyncThreads) f.wait = Wait::kRunnable;
    released = true;
  }
  return released;
}

inline void run_block(Sim& s, unsigned int threads, unsigned char* shared, size_t shared_bytes) {
  s.fibers.assign(threads, Fiber{});
  s.slots.assign(threads, 0);
  while (s.stacks.size() < threads) s.stacks.emplace_back(new char[kStackBytes]);
  for (unsigned int t = 0; t < threads; ++t) {
    Fiber& f = s.fibers[t];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = s.stacks[t].get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &s.main;
    makecontext(&f.ctx, trampoline, 0);
  }
  if (shared) std::memset(shared, 0xFF, shared_bytes);
  for (;;) {
    bool ran = false, done = true;
    for (unsigned int t = 0; t < threads; ++t) {
      if (s.fibers[t].wait == Wait::kRunnable) {
        s.cur = static_cast<int>(t);
        threadIdx = dim3{t, 0, 0};
        swapcontext(&s.main, &s.fibers[t].ctx);
        ran = true;
      }
      done &= s.fibers[t].wait == Wait::kDone;
    }
    if (done) break;
    if (!release(s) && !ran) {
      s.error("deadlock: no thread can go on:" + describe_block(s), false);
      break;
    }
  }
  s.stats.blocks += 1;
  s.stats.threads += threads;
}

// Runs kernel(args...) over grid x block (x and y of the grid, x of the block), with shared_bytes of the shared
// buffer; throws std::runtime_error with the errors the run collected.
template <typename... Params, typename... Args>
Stats launch(dim3 grid, dim3 block, size_t shared_bytes, void (*kernel)(Params...), Args&&... args) {
  if (block.y != 1 || block.z != 1 || grid.z != 1) throw std::runtime_error("cuda_sim: 1-D blocks, 2-D grids only");
  if (block.x == 0 || block.x > 1024) throw std::runtime_error("cuda_sim: block size out of range");
  if (shared_bytes > shared_buffer().bytes) throw std::runtime_error("cuda_sim: more shared memory than simulated");
  unsigned char* const shared = shared_bytes ? shared_buffer().data : nullptr;
  Sim s;
  Sim* const outer = current();
  current() = &s;
  s.body = [&] { kernel(static_cast<Params>(args)...); };
  gridDim = grid;
  blockDim = block;
  for (unsigned int by = 0; by < grid.y; ++by)
    for (unsigned int bx = 0; bx < grid.x; ++bx) {
      blockIdx = dim3{bx, by, 0};
      run_block(s, block.x, shared, shared_bytes);
      if (!s.errors.empty()) break;
    }
  current() = outer;
  s.stats.block_threads = block.x;
  s.stats.shared_bytes = static_cast<int64_t>(shared_bytes);
  if (!s.errors.empty()) {
    std::string msg = "cuda_sim: " + std::to_string(s.errors.size()) + " error(s):";
    for (const auto& e : s.errors) msg += "\n" + e;
    throw std::runtime_error(msg);
  }
  return s.stats;
}

// kernel<<<grid, block, shared_bytes>>>(args...) as Launch(kernel, grid, block, shared_bytes)(args...); the statistics
// of the last launch in last_stats().
inline Stats& last_stats() {
  static Stats s;
  return s;
}
template <typename Kernel>
struct Launch {
  Kernel kernel;
  dim3 grid, block;
  size_t shared_bytes;
  template <typename... Args>
  void operator()(Args&&... args) const {
    last_stats() = launch(grid, block, shared_bytes, kernel, std::forward<Args>(args)...);
  }
};
template <typename Kernel>
Launch(Kernel, dim3, dim3, size_t) -> Launch<Kernel>;

}  // namespace cuda_sim

template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T v, int lane_mask, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t));
  cuda_sim::Sim& s = *cuda_sim::current();
  if (mask != 0xffffffffu || width != 32) s.error("__shfl_xor_sync: only full-warp shuffles are simulated");
  if (lane_mask < 0 || lane_mask >= 32) s.error("__shfl_xor_sync: lane mask out of range");
  const int t = s.cur, lane = t % 32;
  std::memcpy(&s.slots[t], &v, sizeof(T));
  ++s.stats.shuffles;
  cuda_sim::arrive(cuda_sim::Wait::kShuffle);
  T r;
  std::memcpy(&r, &s.slots[t - lane + ((lane ^ lane_mask) & 31)], sizeof(T));
  cuda_sim::arrive(cuda_sim::Wait::kShuffleRead);  // nobody writes the next shuffle's value before all have read
  return r;
}
inline void __syncwarp(unsigned int mask = 0xffffffffu) {
  cuda_sim::Sim& s = *cuda_sim::current();
  if (mask != 0xffffffffu) s.error("__syncwarp: only full-warp masks are simulated");
  ++s.stats.syncwarps;
  cuda_sim::arrive(cuda_sim::Wait::kSyncWarp);
}
inline void __syncthreads() {
  ++cuda_sim::current()->stats.syncthreads;
  cuda_sim::arrive(cuda_sim::Wait::kSyncThreads);
}

// The CUDA kernels (device code and the launch shapes they assume; backend.cuh launches them), in a header so that the
// same source also compiles as host C++ under tests/cuda/cuda_sim/host_sim.h: a CPU simulator of threads, warps,
// shuffles and barriers that runs these kernels without a GPU (tests/cuda/test_cuda_sim.py compares them with the
// reference there; the real GPU runs them in tests/cuda/test_cuda*.py). No tensors, no CUDA runtime here.
#pragma once
#if !defined(__CUDACC__) && !defined(PHYSMDN_CUDA_HOST_SIM)
#error "csrc/cuda/device_kernels.cuh is CUDA code: compile it with nvcc, or under tests/cuda/cuda_sim/host_sim.h"
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "mixture_math.h"
#include "physics_math.h"

namespace physmdn {
namespace {

constexpr int kThreads = 128;

unsigned int blocks_for(int64_t B) { return static_cast<unsigned int>((B + kThreads - 1) / kThreads); }

// ----- thread per sample (any strides; the fused physics loss; the mixture NLL where no other schedule applies) ----
// One kernel for the forward (kGrad = false: loss and saved state), the forward with gradients (grad_loss null:
// every sample's upstream gradient is g_default) and the backward (loss and saved null: not written; the forward is
// recomputed per sample, so the backward of a retained graph runs the same code as the forward with gradients and
// gives the same bits). kPhysics: the fused loss (mdn_loss_sample), else the mixture NLL. Gradients in acc_t; the
// parameters' gradients gp0 [B, K, n0] / gp1 [B, K, n1] and ge [B, K] where non-null (fused loss only).
template <typename scalar_t, typename acc_t, bool kPhysics, bool kGrad>
__global__ void sample_kernel(math::MixtureView<scalar_t> v, math::PhysicsView<scalar_t> p, int64_t B,
                              const scalar_t* grad_loss, int64_t grad_stride, acc_t g_default, scalar_t* loss,
                              acc_t* saved, acc_t* gl, acc_t* gm, acc_t* gs, acc_t* gt, acc_t* gp0, acc_t* gp1,
                              acc_t* ge, int64_t n0, int64_t n1) {
  constexpr int kSaved = kPhysics ? math::kSavedPerSampleLoss : math::kSavedPerSample;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  acc_t s[kSaved];
  acc_t nll;
  if constexpr (kPhysics)
    nll = math::mdn_loss_sample<acc_t>(v, p, b, s);
  else
    nll = math::mixture_nll_sample<acc_t>(v, b, s);
  if (loss) loss[b] = static_cast<scalar_t>(nll);
  if (saved)
    for (int i = 0; i < kSaved; ++i) saved[kSaved * b + i] = s[i];
  if constexpr (kGrad) {
    const int64_t K = v.K, D = v.D;
    const acc_t g = grad_loss ? static_cast<acc_t>(grad_loss[b * grad_stride]) : g_default;
    if constexpr (kPhysics)
      math::mdn_loss_sample_backward<acc_t>(v, p, b, g, s, gl + b * K, gm + b * K * D, gs + b * K * D, gt + b * D,
                                            gp0 ? gp0 + b * K * n0 : nullptr, gp1 ? gp1 + b * K * n1 : nullptr,
                                            ge ? ge + b * K : nullptr);
    else
      math::mixture_nll_sample_backward<acc_t>(v, b, g, s, gl + b * K, gm + b * K * D, gs + b * K * D, gt + b * D);
  }
}

// ----- tiled thread-per-sample schedule (per-sample rows contiguous, few components) -------------------
// A block of T threads owns T consecutive samples. Their [K, D] means / log_scales, [K] logits and [D] target rows
// are contiguous in global memory, at any batch stride (contiguous tensors; views split from one head's output; a
// row broadcast over the batch): the block loads them with coalesced (16-byte vector where aligned) loads into
// shared memory, rows padded to an odd length so that thread t reading row t hits distinct
// banks. Each thread then runs the per-sample math of mixture_math.h on its row in shared memory (the same
// functions as the CPU), writes the gradients over its input rows (the math reads each element before it
// writes the gradient at that place), and the block stores them with coalesced writes. One pass over the
// inputs gives the loss and, with kGrad, the gradients.
constexpr int kTileMaxThreads = 256;
constexpr int64_t kWarpMinComponentsTiled = 16;  // from 16 components on, the warp-per-sample kernels
constexpr int64_t kTileSharedBytes = 48 * 1024;  // the default dynamic shared-memory limit per block

// Shared memory per sample: the means and log-scales rows, the logits, the target and its gradient; with
// separate_grads (the fused loss with gradients, whose penalty gradients read the inputs after the likelihood part
// wrote its gradients) also the means', log-scales' and logits' gradient rows.
template <typename acc_t>
int64_t tile_bytes_per_sample(int64_t K, int64_t D, bool separate_grads = false) {
  const int64_t rows = 2 * (K * D + 1) + (K + 1);
  return static_cast<int64_t>(sizeof(acc_t)) * ((separate_grads ? 2 : 1) * rows + 2 * (D + 1));
}

// Threads per block for the tiled kernels (a multiple of 32), 0 when a sample does not fit.
template <typename acc_t>
int tile_threads(int64_t K, int64_t D, bool separate_grads = false) {
  const int64_t t =
      std::min<int64_t>(kTileMaxThreads, kTileSharedBytes / tile_bytes_per_sample<acc_t>(K, D, separate_grads));
  return t >= 32 ? static_cast<int>(t / 32 * 32) : 0;
}

// Whether count elements of T at p can move as 16-byte vectors (4 float, 8 bfloat16 / half, 2 double).
template <typename T>
__device__ __forceinline__ bool vec16_ok(const void* p, int64_t count) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && count % (16 / static_cast<int64_t>(sizeof(T))) == 0;
}

// Offset in the padded tile of flat element e of rows of n elements: row e / n, column e % n, without an integer
// division (a runtime divisor costs ~20 instructions): a float estimate of the row, off by at most one, corrected
// (e < 2^24, so e and e / n are exact enough in float).
__device__ __forceinline__ void tile_row_column(int e, int n, float inv_n, int& r, int& c) {
  r = __float2int_rz(__int2float_rn(e) * inv_n);
  c = e - r * n;
  if (c < 0) {
    --r;
    c += n;
  } else if (c >= n) {
    ++r;
    c -= n;
  }
}
__device__ __forceinline__ int tile_offset(int e, int n, float inv_n, int pad) {
  int r, c;
  tile_row_column(e, n, inv_n, r, c);
  return r * pad + c;
}

// The offsets of consecutive elements from e on (the N elements of a 16-byte vector): the row and column once, then
// a step per element (the next column, or the next row's first), without the division estimate each time.
struct TileCursor {
  int off, c;
  __device__ __forceinline__ TileCursor(int e, int n, float inv_n, int pad) {
    int r;
    tile_row_column(e, n, inv_n, r, c);
    off = r * pad + c;
  }
  __device__ __forceinline__ void next(int n, int pad) {
    ++off;
    if (++c == n) {
      c = 0;
      off += pad - n;
    }
  }
};

// Global loads in flight per thread in load_rows: each thread issues up to kLoadBatch independent loads before it
// writes their values to shared memory. A loop of load-then-write would keep one load per thread in flight (the write
// waits for it, and nvcc neither unrolls the loop nor hoists the next load), one memory latency per 16 bytes a
// thread moves: 19 for a 128-sample float32 tile with K = 8, D = 4; batched by 4, 6 (bench/cuda_static.py reads it
// in the SASS). 4 rather than 8: the batch's
// registers (a 16-byte value and an address per load) raise the float32 kernel with gradients from 48 to 56
// registers per thread with 4, to 96 with 8, which would halve the resident blocks of small tiles (256 threads,
// limited by registers, not shared memory). bench/cuda_static.py reports registers and loads per batch from the SASS.
constexpr int kLoadBatch = 4;
// The fused loss's tiled kernel: its occupancy is bounded by shared memory (64-thread blocks with gradients) and its
// registers by the penalty's math after the loads, so 8 loads per thread cost it no resident blocks.
constexpr int kLoadBatchLoss = 8;

// src: nrows rows of n contiguous elements, sb elements apart (sb == n: one contiguous block; a row-strided view such
// as a torch.split of one head's output; 0: one row broadcast over the batch) -> dst rows of stride pad (as acc_t).
// 16-byte loads where aligned: across rows when they are contiguous, within each row otherwise (n and sb whole
// vectors); element by element else. U loads per thread at a time (kLoadBatch). kStrided false: sb == n (the paths
// for other strides compiled out: they cost the mixture NLL kernel 40 more registers, see tiled_nll_kernel).
template <int U, bool kStrided, typename scalar_t, typename acc_t>
__device__ void load_rows(const scalar_t* __restrict__ src, int64_t sb, int nrows, int n, acc_t* dst, int pad) {
  constexpr int N = 16 / sizeof(scalar_t);
  const int count = nrows * n, T = blockDim.x;
  const float inv_n = 1.0f / static_cast<float>(n);
  if (sb == n && vec16_ok<scalar_t>(src, count)) {
    const uint4* src16 = reinterpret_cast<const uint4*>(src);
    const int nvec = count / N;
    for (int base = threadIdx.x; base < nvec; base += U * T) {
      uint4 q[U];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (base + u * T < nvec) q[u] = __ldg(src16 + base + u * T);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = base + u * T;
        if (i < nvec) {
          scalar_t vals[N];
          memcpy(vals, &q[u], sizeof(uint4));
          TileCursor at(N * i, n, inv_n, pad);
          for (int j = 0; j < N; ++j, at.next(n, pad)) dst[at.off] = static_cast<acc_t>(vals[j]);
        }
      }
    }
  } else if (kStrided && sb != n && n % N == 0 && sb % N == 0 && vec16_ok<scalar_t>(src, N) &&
             nrows * sb < (int64_t(1) << 31)) {
    const uint4* src16 = reinterpret_cast<const uint4*>(src);
    const int sb16 = static_cast<int>(sb / N);  // (32-bit offsets: the block's rows span < 2^31 elements)
    const int per_row = n / N, nvec = nrows * per_row;
    const float inv_per_row = 1.0f / static_cast<float>(per_row);
    for (int base = threadIdx.x; base < nvec; base += U * T) {
      uint4 q[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = base + u * T;
        if (i < nvec) {
          int r, v;
          tile_row_column(i, per_row, inv_per_row, r, v);
          q[u] = __ldg(src16 + r * sb16 + v);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = base + u * T;
        if (i < nvec) {
          int r, v;
          tile_row_column(i, per_row, inv_per_row, r, v);
          scalar_t vals[N];
          memcpy(vals, &q[u], sizeof(uint4));
          for (int j = 0; j < N; ++j) dst[r * pad + v * N + j] = static_cast<acc_t>(vals[j]);
        }
      }
    }
  } else {
    for (int base = threadIdx.x; base < count; base += U * T) {
      scalar_t vals[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int e = base + u * T;
        if (e < count) {
          if constexpr (kStrided) {
            int r, c;
            tile_row_column(e, n, inv_n, r, c);
            vals[u] = src[r * sb + c];
          } else {
            vals[u] = src[e];
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int e = base + u * T;
        if (e < count) dst[tile_offset(e, n, inv_n, pad)] = static_cast<acc_t>(vals[u]);
      }
    }
  }
}

// The inverse: rows of stride pad in shared memory -> nrows contiguous rows of n elements (out_t: the accumulation
// dtype, or the 16-bit input dtype, rounded to nearest even as torch's conversion does); 16-byte stores where aligned.
template <typename acc_t, typename out_t>
__device__ void store_rows(const acc_t* src, int pad, int nrows, int n, out_t* __restrict__ dst) {
  constexpr int N = 16 / sizeof(out_t);
  const int count = nrows * n;
  const float inv_n = 1.0f / static_cast<float>(n);
  if (vec16_ok<out_t>(dst, count)) {
    uint4* dst16 = reinterpret_cast<uint4*>(dst);
    for (int i = threadIdx.x; i < count / N; i += blockDim.x) {
      out_t vals[N];
      TileCursor at(N * i, n, inv_n, pad);
      for (int j = 0; j < N; ++j, at.next(n, pad)) vals[j] = static_cast<out_t>(src[at.off]);
      uint4 q;
      memcpy(&q, vals, sizeof(q));
      dst16[i] = q;
    }
  } else {
    for (int e = threadIdx.x; e < count; e += blockDim.x) dst[e] = static_cast<out_t>(src[tile_offset(e, n, inv_n, pad)]);
  }
}

// A block's tile in shared memory: T samples' rows of means and log-scales (K D + 1 apart: odd, no bank
// conflicts), logits (K + 1), target and target gradient (D + 1); `rest` is where further rows may follow.
template <typename acc_t>
struct Tile {
  acc_t *mu, *ls, *lg, *y, *gt, *rest;
  int pm, pl, py;
};

// The batch strides (elements) of the tiled kernels' inputs, whose per-sample rows are contiguous (tiled_inputs).
struct RowStrides {
  int64_t logits, means, log_scales, target;
};

// Lays the tile out in the block's dynamic shared memory and loads samples b0 .. b0 + nb - 1 into it (every thread
// of the block calls it; the rows are visible to all on return), U loads per thread at a time (load_rows).
template <typename scalar_t, typename acc_t, int U, bool kStrided>
__device__ Tile<acc_t> load_tile(const scalar_t* __restrict__ logits, const scalar_t* __restrict__ means,
                                 const scalar_t* __restrict__ log_scales, const scalar_t* __restrict__ target,
                                 const RowStrides& sb, int64_t b0, int nb, int K, int D) {
  extern __shared__ __align__(16) unsigned char tile_smem[];
  const int T = blockDim.x, KD = K * D;
  Tile<acc_t> tl;
  tl.pm = KD + 1, tl.pl = K + 1, tl.py = D + 1;
  tl.mu = reinterpret_cast<acc_t*>(tile_smem);
  tl.ls = tl.mu + T * tl.pm;
  tl.lg = tl.ls + T * tl.pm;
  tl.y = tl.lg + T * tl.pl;
  tl.gt = tl.y + T * tl.py;
  tl.rest = tl.gt + T * tl.py;
  load_rows<U, kStrided>(means + b0 * sb.means, sb.means, nb, KD, tl.mu, tl.pm);
  load_rows<U, kStrided>(log_scales + b0 * sb.log_scales, sb.log_scales, nb, KD, tl.ls, tl.pm);
  load_rows<U, kStrided>(logits + b0 * sb.logits, sb.logits, nb, K, tl.lg, tl.pl);
  load_rows<U, kStrided>(target + b0 * sb.target, sb.target, nb, D, tl.y, tl.py);
  __syncthreads();
  return tl;
}

// The tile's rows as the per-sample math's inputs (sample t of the view: the block's sample b0 + t).
template <typename acc_t>
__device__ math::MixtureView<acc_t> tile_view(const Tile<acc_t>& tl, int K, int D) {
  math::MixtureView<acc_t> v;
  v.logits = tl.lg, v.means = tl.mu, v.log_scales = tl.ls, v.target = tl.y;
  v.logits_sb = tl.pl, v.logits_sk = 1;
  v.means_sb = tl.pm, v.means_sk = D, v.means_sd = 1;
  v.scales_sb = tl.pm, v.scales_sk = D, v.scales_sd = 1;
  v.target_sb = tl.py, v.target_sd = 1;
  v.K = K, v.D = D;
  return v;
}

// loss / saved may be null (not written); with kGrad, grad_loss (null: every sample's upstream gradient is
// g_default) scales the gradients gl / gm / gs / gt, written as grad_t (the accumulation or the input dtype).
// kStrided: some input's batch stride is not its row size (sb; else they are contiguous tensors): a second
// instantiation, so that contiguous inputs keep the registers of the contiguous loads alone (40 against 80 for the
// float32 kernel with gradients: what decides the resident blocks of small tiles; the fused loss's forward, 84
// against 128).
template <typename scalar_t, typename acc_t, typename grad_t, bool kGrad, bool kStrided>
__global__ void tiled_nll_kernel(const scalar_t* __restrict__ logits, const scalar_t* __restrict__ means,
                                 const scalar_t* __restrict__ log_scales, const scalar_t* __restrict__ target,
                                 RowStrides sb, int64_t B, int K, int D, const scalar_t* __restrict__ grad_loss,
                                 int64_t grad_stride, acc_t g_default, scalar_t* __restrict__ loss,
                                 acc_t* __restrict__ saved,
                                 grad_t* __restrict__ gl, grad_t* __restrict__ gm, grad_t* __restrict__ gs,
                                 grad_t* __restrict__ gt) {
  const int T = blockDim.x, KD = K * D;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * T;
  const int nb = static_cast<int>(B - b0 < T ? B - b0 : T);
  const Tile<acc_t> tl = load_tile<scalar_t, acc_t, kLoadBatch, kStrided>(logits, means, log_scales, target, sb, b0,
                                                                          nb, K, D);
  const int pm = tl.pm, pl = tl.pl, py = tl.py;
  acc_t *s_mu = tl.mu, *s_ls = tl.ls, *s_lg = tl.lg, *s_gt = tl.gt;
  const int t = threadIdx.x;
  if (t < nb) {
    const auto v = tile_view(tl, K, D);
    acc_t s[math::kSavedPerSample];
    const acc_t nll = math::mixture_nll_sample<acc_t>(v, t, s);
    const int64_t b = b0 + t;
    if (loss) loss[b] = static_cast<scalar_t>(nll);
    if (saved)
      for (int i = 0; i < math::kSavedPerSample; ++i) saved[math::kSavedPerSample * b + i] = s[i];
    if constexpr (kGrad) {
      const acc_t g = grad_loss ? static_cast<acc_t>(grad_loss[b * grad_stride]) : g_default;
      // in place over this thread's rows: logits -> grad_logits, means -> grad_means, log_scales -> grad_log_scales
      math::mixture_nll_sample_backward<acc_t>(v, t, g, s, s_lg + t * pl, s_mu + t * pm, s_ls + t * pm,
                                               s_gt + t * py);
    }
  }
  if constexpr (kGrad) {
    __syncthreads();
    store_rows(s_mu, pm, nb, KD, gm + b0 * KD);
    store_rows(s_ls, pm, nb, KD, gs + b0 * KD);
    store_rows(s_lg, pl, nb, K, gl + b0 * K);
    store_rows(s_gt, py, nb, D, gt + b0 * D);
  }
}

// The fused loss (mixture NLL + physics penalty) on the tiled schedule: the same coalesced loads into shared memory
// and per-thread math on the rows there, with mdn_loss_sample / mdn_loss_sample_backward; the family parameters
// and the extra penalty are read from global memory (at sample b0 + t: their pointers are moved to the block's
// first sample, so that the math indexes them with the thread's row t). The gradient rows are separate (the
// penalty's gradients read the inputs after the likelihood part wrote its gradients) and stored with coalesced
// writes; the parameters' gradients (the backward only) and the extra's are written in place from each thread.
// Modes as sample_kernel: forward, forward with gradients (grad_loss null), backward (loss, saved null).
// grad_t: the gradients of logits, means, log-scales, target and extra (the accumulation or the input dtype); the
// parameters' gradients gp0 / gp1 in acc_t. kStrided as tiled_nll_kernel's.
template <typename scalar_t, typename acc_t, typename grad_t, bool kGrad, bool kStrided>
__global__ void tiled_loss_kernel(const scalar_t* __restrict__ logits, const scalar_t* __restrict__ means,
                                  const scalar_t* __restrict__ log_scales, const scalar_t* __restrict__ target,
                                  RowStrides sb, math::PhysicsView<scalar_t> p, int64_t B, int K, int D,
                                  const scalar_t* __restrict__ grad_loss, int64_t grad_stride, acc_t g_default,
                                  scalar_t* __restrict__ loss, acc_t* __restrict__ saved, grad_t* __restrict__ gl,
                                  grad_t* __restrict__ gm, grad_t* __restrict__ gs, grad_t* __restrict__ gt,
                                  acc_t* gp0, acc_t* gp1, grad_t* ge, int64_t n0, int64_t n1) {
  constexpr int kSaved = math::kSavedPerSampleLoss;
  const int T = blockDim.x, KD = K * D;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * T;
  const int nb = static_cast<int>(B - b0 < T ? B - b0 : T);
  const Tile<acc_t> tl =
      load_tile<scalar_t, acc_t, kLoadBatchLoss, kStrided>(logits, means, log_scales, target, sb, b0, nb, K, D);
  const int pm = tl.pm, pl = tl.pl, py = tl.py;
  acc_t* s_gt = tl.gt;
  acc_t* s_gm = tl.rest;  // the gradient rows (kGrad only)
  acc_t* s_gs = s_gm + T * pm;
  acc_t* s_gl = s_gs + T * pm;
  const int t = threadIdx.x;
  if (t < nb) {
    const auto v = tile_view(tl, K, D);
    math::PhysicsView<scalar_t> q = p;  // indexed from the block's first sample
    if (q.p0.data) q.p0.data += b0 * q.p0.s0;
    if (q.p1.data) q.p1.data += b0 * q.p1.s0;
    if (q.extra) q.extra += b0 * q.extra_sb;
    acc_t s[kSaved];
    const acc_t nll = math::mdn_loss_sample<acc_t>(v, q, t, s);
    const int64_t b = b0 + t;
    if (loss) loss[b] = static_cast<scalar_t>(nll);
    if (saved)
      for (int i = 0; i < kSaved; ++i) saved[kSaved * b + i] = s[i];
    if constexpr (kGrad) {
      const acc_t g = grad_loss ? static_cast<acc_t>(grad_loss[b * grad_stride]) : g_default;
      acc_t ge_row[kWarpMinComponentsTiled];  // (K < kWarpMinComponentsTiled on this schedule)
      math::mdn_loss_sample_backward<acc_t>(v, q, t, g, s, s_gl + t * pl, s_gm + t * pm, s_gs + t * pm, s_gt + t * py,
                                            gp0 ? gp0 + b * K * n0 : nullptr, gp1 ? gp1 + b * K * n1 : nullptr,
                                            ge ? ge_row : nullptr);
      if (ge)
        for (int k = 0; k < K; ++k) ge[b * K + k] = static_cast<grad_t>(ge_row[k]);
    }
  }
  if constexpr (kGrad) {
    __syncthreads();
    store_rows(s_gm, pm, nb, KD, gm + b0 * KD);
    store_rows(s_gs, pm, nb, KD, gs + b0 * KD);
    store_rows(s_gl, pl, nb, K, gl + b0 * K);
    store_rows(s_gt, py, nb, D, gt + b0 * D);
  }
}

#ifdef PHYSMDN_WITH_CUDA_LANES  // CMake option PHYSMDN_CUDA_LANES (off by default)
// ----- lane-per-element schedule (physmdn._C.set_cuda_lanes_schedule; contiguous inputs, D <= 32, K Dp <= 256
// with Dp = D rounded up to a power of two) -------------------------------------------------------------------------
// G lanes per sample, G = the power of two >= K Dp (at most 32; a multiple of Dp). Lane l of a group holds the
// sample's virtual elements e = l + j G (j < J, e < K Dp): component e / Dp, dimension d = l % Dp (the same for every
// j); lanes with d >= D (D not a power of two) or past the last component are padding: they load nothing, add 0 and
// write nothing. The loads go straight from global memory into registers, all issued before the arithmetic
// (consecutive lanes read consecutive elements, consecutive groups consecutive samples: coalesced, no shared memory,
// no tile staging); the sum of log N_k over d runs by shuffles within each aligned run of Dp lanes; the log-sum-exps
// over k and the target gradient's sum over k by shuffles across those runs (the lanes of one dimension class hold
// every component once). The math is the two-pass form of the CPU kernels (csrc/cpu/avx2/group.h, mixture_lse):
// shift by the max logit (0 when all are -inf), log pi = (logit - shift) - log sum exp(logit - shift), the joint
// term shifted by its max. Loss, saved state (shift, log_sum, lse) and, with kGrad, the gradients in one pass;
// grad_loss null: every sample's upstream gradient is g_default (the forward with gradients).
constexpr int kLanesThreads = 256;
constexpr int64_t kLanesMaxElements = 256;  // K Dp; J = K Dp / 32 up to 8 elements per lane

__host__ __device__ constexpr int pow2_at_least(int64_t n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}

// x combined over the lanes of a G-lane group whose index differs from this lane's in bits [from, G): the max
// (NaN-free inputs) or the sum
template <typename acc_t>
__device__ __forceinline__ acc_t group_max(acc_t x, int from, int G) {
  for (int o = from; o < G; o *= 2) {
    const acc_t other = __shfl_xor_sync(0xffffffffu, x, o);
    x = other > x ? other : x;
  }
  return x;
}
template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t x, int from, int G) {
  for (int o = from; o < G; o *= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename scalar_t, typename acc_t, typename grad_t, bool kGrad, int J>
__global__ void __launch_bounds__(kLanesThreads) lanes_nll_kernel(
    const scalar_t* __restrict__ logits, const scalar_t* __restrict__ means, const scalar_t* __restrict__ log_scales,
    const scalar_t* __restrict__ target, int64_t B, int K, int D, int log2_Dp, int log2_G,
    const scalar_t* __restrict__ grad_loss, int64_t grad_stride, acc_t g_default, scalar_t* __restrict__ loss,
    acc_t* __restrict__ saved, grad_t* __restrict__ gl, grad_t* __restrict__ gm, grad_t* __restrict__ gs,
    grad_t* __restrict__ gt) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int G = 1 << log2_G, Dp = 1 << log2_Dp;
  const int64_t b = thread >> log2_G;  // (G divides 32 and the block: a group never straddles warps)
  const int l = static_cast<int>(thread & (G - 1)), d = l & (Dp - 1), KD = K * D;
  const bool active = b < B;  // inactive lanes still take part in every shuffle
  // 1. every load first
  acc_t mu[J], ls[J], lg[J];
  bool valid[J];
  acc_t y = acc_t(0);
  if (active && d < D) y = static_cast<acc_t>(target[b * D + d]);
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int k = (l + j * G) >> log2_Dp;  // (the same k for the Dp lanes of a run)
    valid[j] = active && k < K && d < D;
    mu[j] = ls[j] = acc_t(0);
    lg[j] = ninf;
    if (valid[j]) {
      mu[j] = static_cast<acc_t>(means[b * KD + k * D + d]);
      ls[j] = static_cast<acc_t>(log_scales[b * KD + k * D + d]);
      lg[j] = static_cast<acc_t>(logits[b * K + k]);
    }
  }
  // 2. the logits' shift: their max (NaN skipped), 0 when every logit is -inf
  acc_t mx = ninf;
#pragma unroll
  for (int j = 0; j < J; ++j) mx = lg[j] > mx ? lg[j] : mx;
  mx = group_max(mx, Dp, G);
  const acc_t shift = mx == ninf ? acc_t(0) : mx;
  // 3. per element: 1 / s, z, and the component's sum over d of -z^2 / 2 - log s (shuffles within Dp lanes; the
  // lanes of padding dimensions d >= D add 0)
  const acc_t offset = static_cast<acc_t>(D) * static_cast<acc_t>(math::kHalfLog2Pi);
  acc_t inv[J], z[J], joint[J], pi[J];
  acc_t s1 = acc_t(0);
#pragma unroll
  for (int j = 0; j < J; ++j) {
    inv[j] = math::exp_(-ls[j]);
    z[j] = (y - mu[j]) * inv[j];
    acc_t t = valid[j] ? acc_t(-0.5) * z[j] * z[j] - ls[j] : acc_t(0);
    t = group_sum(t, 1, Dp);
    pi[j] = valid[j] ? math::exp_(lg[j] - shift) : acc_t(0);  // (exp(-inf) = 0 for a -inf logit; NaN stays)
    joint[j] = valid[j] ? (lg[j] - shift) + (t - offset) : ninf;
    s1 += pi[j];
  }
  s1 = group_sum(s1, Dp, G);
  acc_t mx2 = ninf;
#pragma unroll
  for (int j = 0; j < J; ++j) mx2 = joint[j] > mx2 ? joint[j] : mx2;
  mx2 = group_max(mx2, Dp, G);
  const acc_t shift2 = mx2 == ninf ? acc_t(0) : mx2;
  acc_t s2 = acc_t(0);
#pragma unroll
  for (int j = 0; j < J; ++j) {
    joint[j] = valid[j] ? math::exp_(joint[j] - shift2) : acc_t(0);  // (NaN joint terms poison the sum)
    s2 += joint[j];
  }
  s2 = group_sum(s2, Dp, G);
  const acc_t log_sum = math::log_(s1);
  const acc_t lse = (shift2 + math::log_(s2)) - log_sum;
  if (active && l == 0) {
    if (loss) loss[b] = static_cast<scalar_t>(-lse);
    if (saved) {
      saved[math::kSavedPerSample * b] = shift;
      saved[math::kSavedPerSample * b + 1] = log_sum;
      saved[math::kSavedPerSample * b + 2] = lse;
    }
  }
  if constexpr (kGrad) {
    const acc_t g = active ? (grad_loss ? static_cast<acc_t>(grad_loss[b * grad_stride]) : g_default) : acc_t(0);
    const acc_t inv_s1 = acc_t(1) / s1, inv_s2 = acc_t(1) / s2;
    acc_t gy = acc_t(0);
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int k = (l + j * G) >> log2_Dp;
      if (valid[j]) {
        const acc_t gamma = joint[j] * inv_s2;
        const acc_t c = -(g * gamma);
        // a component with no responsibility gets no gradient (avoids 0 * inf for far-away targets)
        const acc_t dmu = gamma == acc_t(0) ? acc_t(0) : c * z[j] * inv[j];
        const acc_t dls = gamma == acc_t(0) ? acc_t(0) : c * (z[j] * z[j] - acc_t(1));
        gm[b * KD + k * D + d] = static_cast<grad_t>(dmu);
        gs[b * KD + k * D + d] = static_cast<grad_t>(dls);
        gy -= dmu;
        if (d == 0) gl[b * K + k] = static_cast<grad_t>(g * (pi[j] * inv_s1 - gamma));
      }
    }
    gy = group_sum(gy, Dp, G);
    if (active && l < D) gt[b * D + l] = static_cast<grad_t>(gy);
  }
}
#endif  // PHYSMDN_WITH_CUDA_LANES

// ----- warp-per-sample schedule (many components) -----------------------------------------------------
// Lanes take components k = lane, lane + 32, ...; the log-sum-exps combine across the warp with shuffles;
// grad_target is reduced over components by lanes over d after a __syncwarp (no atomics).
constexpr int kWarpsPerBlock = 4;
constexpr int64_t kWarpMinComponents = 16;  // below this a thread per sample keeps more lanes busy

template <typename acc_t>
__device__ math::OnlineLSE<acc_t> warp_combine(math::OnlineLSE<acc_t> x) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const acc_t m2 = __shfl_xor_sync(0xffffffffu, x.max, offset);
    const acc_t s2 = __shfl_xor_sync(0xffffffffu, x.sum, offset);
    const acc_t m = x.max > m2 ? x.max : m2;
    // a side whose max is the combined max keeps its sum (also -inf/-inf and NaN sums); exp(-inf) = 0 else
    const acc_t a = x.max == m ? x.sum : x.sum * math::exp_(x.max - m);
    const acc_t b = m2 == m ? s2 : s2 * math::exp_(m2 - m);
    x.max = m;
    x.sum = a + b;
  }
  return x;
}

template <typename acc_t>
__device__ acc_t warp_sum(acc_t x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// One sample's forward by the 32 lanes of a warp (every lane calls it): the saved state s (max logit, log sum,
// log-likelihood, with kPhysics the expected penalty) in every lane (the butterfly combines give every lane the same
// bits); returns the loss.
template <typename scalar_t, typename acc_t, bool kPhysics>
__device__ acc_t warp_fwd_sample(const math::MixtureView<scalar_t>& v, const math::PhysicsView<scalar_t>& p, int64_t b,
                                 int lane, acc_t* s) {
  const scalar_t* lg = v.logits + b * v.logits_sb;
  math::OnlineLSE<acc_t> prior;
  for (int64_t k = lane; k < v.K; k += 32) prior.add(static_cast<acc_t>(lg[k * v.logits_sk]));
  prior = warp_combine(prior);
  const acc_t max_logit = prior.max, log_sum = math::log_(prior.sum);
  math::OnlineLSE<acc_t> joint;
  acc_t pbar = acc_t(0);
  const math::PenaltyGrads<acc_t> none{nullptr, nullptr, nullptr, nullptr};
  for (int64_t k = lane; k < v.K; k += 32) {
    const acc_t log_pi = (static_cast<acc_t>(lg[k * v.logits_sk]) - max_logit) - log_sum;
    joint.add(log_pi + math::component_log_density<acc_t>(v, b, k));
    if constexpr (kPhysics) {
      const acc_t pi = math::exp_(log_pi);
      if (pi > acc_t(0))
        pbar += pi * (static_cast<acc_t>(p.weight) * math::family_penalty<acc_t, false>(v, p, b, k, acc_t(0), none) +
                      math::extra_penalty<acc_t>(p, b, k));
    }
  }
  joint = warp_combine(joint);
  if constexpr (kPhysics) pbar = warp_sum(pbar);
  s[0] = max_logit;
  s[1] = log_sum;
  s[2] = joint.value();
  if constexpr (kPhysics) s[3] = pbar;
  return pbar - s[2];
}

// One sample's backward for the upstream gradient g by the 32 lanes of a warp (every lane calls it), from the saved
// state s.
template <typename scalar_t, typename acc_t, bool kPhysics>
__device__ void warp_bwd_sample(const math::MixtureView<scalar_t>& v, const math::PhysicsView<scalar_t>& p, int64_t b,
                                int lane, acc_t g, const acc_t* s, acc_t* gl, acc_t* gm, acc_t* gs, acc_t* gt,
                                acc_t* gp0, acc_t* gp1, acc_t* ge, int64_t n0, int64_t n1) {
  const int64_t K = v.K, D = v.D;
  const scalar_t* lg = v.logits + b * v.logits_sb;
  const scalar_t* y = v.target + b * v.target_sb;
  acc_t* gl_row = gl + b * K;
  acc_t* gm_rows = gm + b * K * D;
  acc_t* gs_rows = gs + b * K * D;
  // 1. likelihood part, one component per lane
  for (int64_t k = lane; k < K; k += 32) {
    const acc_t log_pi = (static_cast<acc_t>(lg[k * v.logits_sk]) - s[0]) - s[1];
    const acc_t gamma = math::exp_(log_pi + math::component_log_density<acc_t>(v, b, k) - s[2]);
    gl_row[k] = g * (math::exp_(log_pi) - gamma);
    const scalar_t* mu = v.means + b * v.means_sb + k * v.means_sk;
    const scalar_t* ls = v.log_scales + b * v.scales_sb + k * v.scales_sk;
    const acc_t c = -g * gamma;
    for (int64_t d = 0; d < D; ++d) {
      acc_t gmd = acc_t(0), gsd = acc_t(0);
      if (gamma != acc_t(0)) {
        const acc_t inv_s = math::exp_(-static_cast<acc_t>(ls[d * v.scales_sd]));
        const acc_t z = (static_cast<acc_t>(y[d * v.target_sd]) - static_cast<acc_t>(mu[d * v.means_sd])) * inv_s;
        gmd = c * z * inv_s;
        gsd = c * (z * z - acc_t(1));
      }
      gm_rows[k * D + d] = gmd;
      gs_rows[k * D + d] = gsd;
    }
  }
  __syncwarp();
  // 2. grad_target = -sum_k grad_means (likelihood part), one dimension per lane
  for (int64_t d = lane; d < D; d += 32) {
    acc_t acc = acc_t(0);
    for (int64_t k = 0; k < K; ++k) acc -= gm_rows[k * D + d];
    gt[b * D + d] = acc;
  }
  __syncwarp();
  // 3. penalty part, one component per lane (each lane only touches its own components' rows)
  if constexpr (kPhysics) {
    const acc_t w = static_cast<acc_t>(p.weight);
    for (int64_t k = lane; k < K; k += 32) {
      const acc_t pi = math::exp_((static_cast<acc_t>(lg[k * v.logits_sk]) - s[0]) - s[1]);
      acc_t* gp0_row = gp0 ? gp0 + (b * K + k) * n0 : nullptr;
      acc_t* gp1_row = gp1 ? gp1 + (b * K + k) * n1 : nullptr;
      if (pi > acc_t(0)) {
        const math::PenaltyGrads<acc_t> pg{gm_rows + k * D, gs_rows + k * D, gp0_row, gp1_row};
        const acc_t q = w * math::family_penalty<acc_t, true>(v, p, b, k, g * w * pi, pg) + math::extra_penalty<acc_t>(p, b, k);
        if (p.couple_weights) gl_row[k] += g * pi * (q - s[3]);
      } else {
        for (int64_t i = 0; gp0_row && i < n0; ++i) gp0_row[i] = acc_t(0);
        for (int64_t i = 0; gp1_row && i < n1; ++i) gp1_row[i] = acc_t(0);
      }
      if (ge) ge[b * K + k] = g * pi;
    }
  }
}

// Warp per sample (from kWarpMinComponents components on), the counterpart of sample_kernel (same arguments and
// modes): forward, forward with gradients, or backward recomputing the forward.
template <typename scalar_t, typename acc_t, bool kPhysics, bool kGrad>
__global__ void warp_kernel(math::MixtureView<scalar_t> v, math::PhysicsView<scalar_t> p, int64_t B,
                            const scalar_t* grad_loss, int64_t grad_stride, acc_t g_default, scalar_t* loss,
                            acc_t* saved, acc_t* gl, acc_t* gm, acc_t* gs, acc_t* gt, acc_t* gp0, acc_t* gp1,
                            acc_t* ge, int64_t n0, int64_t n1) {
  constexpr int kSaved = kPhysics ? math::kSavedPerSampleLoss : math::kSavedPerSample;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (b >= B) return;  // whole warps exit together
  const int lane = threadIdx.x % 32;
  acc_t s[math::kSavedPerSampleLoss];
  const acc_t nll = warp_fwd_sample<scalar_t, acc_t, kPhysics>(v, p, b, lane, s);
  if (lane == 0) {
    if (loss) loss[b] = static_cast<scalar_t>(nll);
    if (saved)
      for (int i = 0; i < kSaved; ++i) saved[kSaved * b + i] = s[i];
  }
  if constexpr (kGrad) {
    const acc_t g = grad_loss ? static_cast<acc_t>(grad_loss[b * grad_stride]) : g_default;
    warp_bwd_sample<scalar_t, acc_t, kPhysics>(v, p, b, lane, g, s, gl, gm, gs, gt, gp0, gp1, ge, n0, n1);
  }
}

unsigned int warp_blocks_for(int64_t B) {
  return static_cast<unsigned int>((B + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

// ----- the eager backward's in-place rescaling (_scale_by_, csrc/ops.cpp) ------------------------------
// tensors *= factor, the factor read on the device: 1 when the upstream value equals the scale the forward's
// gradients were made for (the unit gradient of loss.sum() or of the op's own mean, the usual case), and then every
// block returns before touching the tensors: the backward hands the forward's gradients over without a pass over
// them and without synchronizing. Otherwise one grid-stride pass per tensor. (targets is __grid_constant__: indexed by
// blockIdx.y, a by-value parameter would be copied to local memory, 128 bytes per thread; bench/cuda_static.py.)
constexpr int kMaxScaleTensors = 8;
struct ScaleTargets {
  void* data[kMaxScaleTensors];
  int64_t numel[kMaxScaleTensors];
};

template <typename scalar_t, typename acc_t>
__global__ void scale_by_kernel(const __grid_constant__ ScaleTargets targets, const acc_t* __restrict__ factor) {
  const acc_t f = *factor;
  if (f == acc_t(1)) return;
  scalar_t* const p = static_cast<scalar_t*>(targets.data[blockIdx.y]);
  const int64_t n = targets.numel[blockIdx.y];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    p[i] = static_cast<scalar_t>(static_cast<acc_t>(p[i]) * f);
}

// The factor of scale_by_kernel for tensors of scalar_t: upstream (one value, exactly as a double) converted to
// scalar_t and divided by scale, as torch computes upstream.to(dtype) / scale, rounded to scalar_t; exactly 1 where
// upstream equals scale rounded to upstream's dtype (scale_in_upstream_dtype). One thread.
template <typename scalar_t, typename acc_t>
__global__ void scale_factor_kernel(const double* __restrict__ upstream, double scale_in_upstream_dtype, double scale,
                                    acc_t* __restrict__ factor) {
  const double u = *upstream;
  if (u == scale_in_upstream_dtype) {
    *factor = acc_t(1);
    return;
  }
  const acc_t in_dtype = static_cast<acc_t>(static_cast<scalar_t>(u));
  *factor = static_cast<acc_t>(static_cast<scalar_t>(scale != 1.0 ? in_dtype / static_cast<acc_t>(scale) : in_dtype));
}

#ifdef PHYSMDN_WITH_CUDA_LANES
// Launch shape of lanes_nll_kernel for B samples of K components in D dimensions (lanes_inputs must hold): Dp = D
// rounded up to a power of two, G = the power of two >= K Dp (at most 32) lanes per sample, J elements per lane.
struct LanesLaunch {
  int log2_Dp, log2_G, J;
  int64_t blocks;  // of kLanesThreads threads
};
inline LanesLaunch lanes_launch(int64_t B, int64_t K, int64_t D) {
  LanesLaunch c{0, 0, 1, 0};
  while ((int64_t(1) << c.log2_Dp) < D) ++c.log2_Dp;
  const int G = std::min(32, pow2_at_least(K << c.log2_Dp));
  while ((1 << c.log2_G) < G) ++c.log2_G;
  const int64_t per_lane = ((K << c.log2_Dp) + G - 1) / G;
  c.J = per_lane <= 1 ? 1 : per_lane <= 2 ? 2 : per_lane <= 4 ? 4 : 8;
  c.blocks = (B * G + kLanesThreads - 1) / kLanesThreads;
  return c;
}

template <typename scalar_t, typename acc_t, typename grad_t>
using LanesKernel = void (*)(const scalar_t*, const scalar_t*, const scalar_t*, const scalar_t*, int64_t, int, int, int,
                             int, const scalar_t*, int64_t, acc_t, scalar_t*, acc_t*, grad_t*, grad_t*, grad_t*,
                             grad_t*);
// The instance of lanes_nll_kernel for J elements per lane (LanesLaunch::J: 1, 2, 4 or 8).
template <bool kGrad, typename scalar_t, typename acc_t, typename grad_t>
LanesKernel<scalar_t, acc_t, grad_t> lanes_kernel_for(int J) {
  switch (J) {
    case 1: return lanes_nll_kernel<scalar_t, acc_t, grad_t, kGrad, 1>;
    case 2: return lanes_nll_kernel<scalar_t, acc_t, grad_t, kGrad, 2>;
    case 4: return lanes_nll_kernel<scalar_t, acc_t, grad_t, kGrad, 4>;
    default: return lanes_nll_kernel<scalar_t, acc_t, grad_t, kGrad, 8>;
  }
}
#endif  // PHYSMDN_WITH_CUDA_LANES

}  // namespace
}  // namespace physmdn

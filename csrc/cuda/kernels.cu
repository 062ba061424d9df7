// CUDA drivers: thin kernels over the per-sample math of mixture_math.h / physics_math.h (the same code the
// CPU runs). Schedule chosen from K and K * D: for the mixture NLL with contiguous inputs and fewer than 16
// components, a tiled thread per sample (coalesced vector loads through shared memory, one pass for loss and
// gradients) while a sample fits in shared memory; a warp per sample from 16 components on; otherwise (strided
// inputs, the fused physics loss) a plain thread per sample reading its parameters in place.
// Accumulation in float32 (float64 for double inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "mixture_math.h"
#include "op_impl.h"
#include "physics_math.h"
#include "views.h"

namespace physmdn {
namespace {

constexpr int kThreads = 128;

unsigned int blocks_for(int64_t B) { return static_cast<unsigned int>((B + kThreads - 1) / kThreads); }

template <typename T>
T* data_or_null(at::Tensor& t) {
  return t.numel() ? t.data_ptr<T>() : nullptr;
}

template <typename scalar_t, typename acc_t>
__global__ void mixture_nll_fwd_kernel(math::MixtureView<scalar_t> v, int64_t B, scalar_t* loss, acc_t* saved) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  acc_t s[math::kSavedPerSample];
  loss[b] = static_cast<scalar_t>(math::mixture_nll_sample<acc_t>(v, b, s));
  for (int i = 0; i < math::kSavedPerSample; ++i) saved[math::kSavedPerSample * b + i] = s[i];
}

template <typename scalar_t, typename acc_t>
__global__ void mixture_nll_bwd_kernel(math::MixtureView<scalar_t> v, int64_t B, const scalar_t* grad_loss,
                                       int64_t grad_stride, const acc_t* saved, acc_t* gl, acc_t* gm, acc_t* gs,
                                       acc_t* gt) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int64_t K = v.K, D = v.D;
  math::mixture_nll_sample_backward<acc_t>(v, b, static_cast<acc_t>(grad_loss[b * grad_stride]),
                                           saved + math::kSavedPerSample * b, gl + b * K, gm + b * K * D,
                                           gs + b * K * D, gt + b * D);
}

template <typename scalar_t, typename acc_t>
__global__ void mdn_loss_fwd_kernel(math::MixtureView<scalar_t> v, math::PhysicsView<scalar_t> p, int64_t B,
                                    scalar_t* loss, acc_t* saved) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  acc_t s[math::kSavedPerSampleLoss];
  loss[b] = static_cast<scalar_t>(math::mdn_loss_sample<acc_t>(v, p, b, s));
  for (int i = 0; i < math::kSavedPerSampleLoss; ++i) saved[math::kSavedPerSampleLoss * b + i] = s[i];
}

template <typename scalar_t, typename acc_t>
__global__ void mdn_loss_bwd_kernel(math::MixtureView<scalar_t> v, math::PhysicsView<scalar_t> p, int64_t B,
                                    const scalar_t* grad_loss, int64_t grad_stride, const acc_t* saved, acc_t* gl,
                                    acc_t* gm, acc_t* gs, acc_t* gt, acc_t* gp0, acc_t* gp1, acc_t* ge, int64_t n0,
                                    int64_t n1) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int64_t K = v.K, D = v.D;
  math::mdn_loss_sample_backward<acc_t>(v, p, b, static_cast<acc_t>(grad_loss[b * grad_stride]),
                                        saved + math::kSavedPerSampleLoss * b, gl + b * K, gm + b * K * D,
                                        gs + b * K * D, gt + b * D, gp0 ? gp0 + b * K * n0 : nullptr,
                                        gp1 ? gp1 + b * K * n1 : nullptr, ge ? ge + b * K : nullptr);
}


// ----- tiled thread-per-sample schedule (contiguous inputs, few components) ----------------------------
// A block of T threads owns T consecutive samples. Their [T, K, D] means / log_scales, [T, K] logits and
// [T, D] targets are contiguous in global memory: the block loads them with coalesced (16-byte vector where
// aligned) loads into shared memory, rows padded to an odd length so that thread t reading row t hits distinct
// banks. Each thread then runs the per-sample math of mixture_math.h on its row in shared memory (the same
// functions as the CPU), writes the gradients over its input rows (the math reads each element before it
// writes the gradient at that place), and the block stores them with coalesced writes. One pass over the
// inputs gives the loss and, with kGrad, the gradients.
constexpr int kTileMaxThreads = 256;
constexpr int64_t kWarpMinComponentsTiled = 16;  // from 16 components on, the warp-per-sample kernels
constexpr int64_t kTileSharedBytes = 48 * 1024;  // the default dynamic shared-memory limit per block

template <typename acc_t>
int64_t tile_bytes_per_sample(int64_t K, int64_t D) {
  return static_cast<int64_t>(sizeof(acc_t)) * (2 * (K * D + 1) + (K + 1) + 2 * (D + 1));
}

// Threads per block for the tiled kernel (a multiple of 32), 0 when a sample does not fit.
template <typename acc_t>
int tile_threads(int64_t K, int64_t D) {
  const int64_t t = std::min<int64_t>(kTileMaxThreads, kTileSharedBytes / tile_bytes_per_sample<acc_t>(K, D));
  return t >= 32 ? static_cast<int>(t / 32 * 32) : 0;
}

template <typename scalar_t>
__device__ __forceinline__ bool vec4_ok(const void* p, int64_t count) {
  return std::is_same<scalar_t, float>::value && (reinterpret_cast<uintptr_t>(p) % 16 == 0) && count % 4 == 0;
}

// Offset in the padded tile of flat element e of rows of n elements: row e / n, column e % n, without an integer
// division (a runtime divisor costs ~20 instructions): a float estimate of the row, off by at most one, corrected
// (e < 2^24, so e and e / n are exact enough in float).
__device__ __forceinline__ int tile_offset(int e, int n, float inv_n, int pad) {
  int r = __float2int_rz(__int2float_rn(e) * inv_n);
  int c = e - r * n;
  if (c < 0) {
    --r;
    c += n;
  } else if (c >= n) {
    ++r;
    c -= n;
  }
  return r * pad + c;
}

// src: nrows contiguous rows of n elements -> dst rows of stride pad (as acc_t).
template <typename scalar_t, typename acc_t>
__device__ void load_rows(const scalar_t* __restrict__ src, int nrows, int n, acc_t* dst, int pad) {
  const int count = nrows * n;
  const float inv_n = 1.0f / static_cast<float>(n);
  if (vec4_ok<scalar_t>(src, count)) {
    const float4* src4 = reinterpret_cast<const float4*>(src);
    for (int i = threadIdx.x; i < count / 4; i += blockDim.x) {
      const float4 q = __ldg(src4 + i);
      const float vals[4] = {q.x, q.y, q.z, q.w};
      for (int j = 0; j < 4; ++j) dst[tile_offset(4 * i + j, n, inv_n, pad)] = static_cast<acc_t>(vals[j]);
    }
  } else {
    for (int e = threadIdx.x; e < count; e += blockDim.x)
      dst[tile_offset(e, n, inv_n, pad)] = static_cast<acc_t>(src[e]);
  }
}

// The inverse: rows of stride pad in shared memory -> nrows contiguous rows of n elements.
template <typename acc_t>
__device__ void store_rows(const acc_t* src, int pad, int nrows, int n, acc_t* __restrict__ dst) {
  const int count = nrows * n;
  const float inv_n = 1.0f / static_cast<float>(n);
  if (vec4_ok<acc_t>(dst, count)) {
    float4* dst4 = reinterpret_cast<float4*>(dst);
    for (int i = threadIdx.x; i < count / 4; i += blockDim.x) {
      float vals[4];
      for (int j = 0; j < 4; ++j) vals[j] = static_cast<float>(src[tile_offset(4 * i + j, n, inv_n, pad)]);
      dst4[i] = make_float4(vals[0], vals[1], vals[2], vals[3]);
    }
  } else {
    for (int e = threadIdx.x; e < count; e += blockDim.x) dst[e] = src[tile_offset(e, n, inv_n, pad)];
  }
}

// loss / saved may be null (not written); with kGrad, grad_loss (null: every sample's upstream gradient is
// g_default) scales the gradients gl / gm / gs / gt.
template <typename scalar_t, typename acc_t, bool kGrad>
__global__ void tiled_nll_kernel(const scalar_t* __restrict__ logits, const scalar_t* __restrict__ means,
                                 const scalar_t* __restrict__ log_scales, const scalar_t* __restrict__ target,
                                 int64_t B, int K, int D, const scalar_t* __restrict__ grad_loss, int64_t grad_stride,
                                 acc_t g_default, scalar_t* __restrict__ loss, acc_t* __restrict__ saved,
                                 acc_t* __restrict__ gl, acc_t* __restrict__ gm, acc_t* __restrict__ gs,
                                 acc_t* __restrict__ gt) {
  extern __shared__ __align__(16) unsigned char tile_smem[];
  const int T = blockDim.x, KD = K * D;
  const int pm = KD + 1, pl = K + 1, py = D + 1;
  acc_t* s_mu = reinterpret_cast<acc_t*>(tile_smem);
  acc_t* s_ls = s_mu + T * pm;
  acc_t* s_lg = s_ls + T * pm;
  acc_t* s_y = s_lg + T * pl;
  acc_t* s_gt = s_y + T * py;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * T;
  const int nb = static_cast<int>(B - b0 < T ? B - b0 : T);
  load_rows(means + b0 * KD, nb, KD, s_mu, pm);
  load_rows(log_scales + b0 * KD, nb, KD, s_ls, pm);
  load_rows(logits + b0 * K, nb, K, s_lg, pl);
  load_rows(target + b0 * D, nb, D, s_y, py);
  __syncthreads();
  const int t = threadIdx.x;
  if (t < nb) {
    math::MixtureView<acc_t> v;
    v.logits = s_lg, v.means = s_mu, v.log_scales = s_ls, v.target = s_y;
    v.logits_sb = pl, v.logits_sk = 1;
    v.means_sb = pm, v.means_sk = D, v.means_sd = 1;
    v.scales_sb = pm, v.scales_sk = D, v.scales_sd = 1;
    v.target_sb = py, v.target_sd = 1;
    v.K = K, v.D = D;
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

bool tiled_inputs(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
                  const at::Tensor& target) {
  return means.size(1) < kWarpMinComponentsTiled && logits.is_contiguous() && means.is_contiguous() &&
         log_scales.is_contiguous() && target.is_contiguous() && means.numel() < (int64_t(1) << 31);
}

// Launches the tiled kernel; false when a sample does not fit in shared memory (the caller falls back).
template <bool kGrad>
bool launch_tiled(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
                  const at::Tensor& target, const at::Tensor* grad_loss, double g_default, at::Tensor* loss,
                  at::Tensor* saved, at::Tensor* gl, at::Tensor* gm, at::Tensor* gs, at::Tensor* gt) {
  if (!tiled_inputs(logits, means, log_scales, target)) return false;
  const int64_t B = means.size(0), K = means.size(1), D = means.size(2);
  bool launched = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, means.scalar_type(), "physmdn_tiled_nll", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int threads = tile_threads<acc_t>(K, D);
    if (threads == 0) return;
    const auto blocks = static_cast<unsigned int>((B + threads - 1) / threads);
    const size_t smem = static_cast<size_t>(threads) * tile_bytes_per_sample<acc_t>(K, D);
    tiled_nll_kernel<scalar_t, acc_t, kGrad><<<blocks, threads, smem, c10::cuda::getCurrentCUDAStream()>>>(
        logits.const_data_ptr<scalar_t>(), means.const_data_ptr<scalar_t>(), log_scales.const_data_ptr<scalar_t>(),
        target.const_data_ptr<scalar_t>(), B, static_cast<int>(K), static_cast<int>(D),
        grad_loss ? grad_loss->const_data_ptr<scalar_t>() : nullptr, grad_loss ? grad_loss->stride(0) : 0,
        static_cast<acc_t>(g_default), loss ? loss->data_ptr<scalar_t>() : nullptr,
        saved ? saved->data_ptr<acc_t>() : nullptr, gl ? gl->data_ptr<acc_t>() : nullptr,
        gm ? gm->data_ptr<acc_t>() : nullptr, gs ? gs->data_ptr<acc_t>() : nullptr,
        gt ? gt->data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launched = true;
  });
  return launched;
}

// ----- lane-per-element schedule (physmdn._C.set_cuda_lanes_schedule; contiguous inputs, D <= 32, K Dp <= 256
// with Dp = D rounded up to a power of two) -------------------------------------------------------------------------
// G lanes per sample, G = the power of two >= K Dp (at most 32; a multiple of Dp). Lane l of a group holds the
// sample's virtual elements e = l + j G (j < J, e < K Dp): component e / Dp, dimension d = l % Dp (the same for every
// j); lanes with d >= D (D not a power of two) or past the last component are padding: they load nothing, add 0 and
// write nothing. The loads go straight from global memory into registers, all issued before the arithmetic
// (consecutive lanes read consecutive elements, consecutive groups consecutive samples: coalesced, no shared memory,
// no tile staging); the sum of log N_k over d runs by shuffles within each aligned run of Dp lanes; the log-sum-exps
// over k and the target gradient's sum over k by shuffles across those runs (the lanes of one dimension class hold
// every component once). The math is the two-pass form of the CPU kernels (csrc/cpu/soa_avx2.h, mixture_lse):
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

bool lanes_inputs(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
                  const at::Tensor& target) {
  const int64_t K = means.size(1), D = means.size(2);
  return cuda_lanes_schedule_enabled().load(std::memory_order_relaxed) && D <= 32 &&
         K * pow2_at_least(D) <= kLanesMaxElements && logits.is_contiguous() && means.is_contiguous() &&
         log_scales.is_contiguous() && target.is_contiguous() && means.numel() < (int64_t(1) << 31);
}

template <bool kGrad, typename scalar_t, typename acc_t, typename grad_t>
void launch_lanes_typed(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
                        const at::Tensor& target, const at::Tensor* grad_loss, double g_default, at::Tensor* loss,
                        at::Tensor* saved, at::Tensor* gl, at::Tensor* gm, at::Tensor* gs, at::Tensor* gt, int64_t B,
                        int64_t K, int64_t D, int log2_Dp, int log2_G) {
  const int G = 1 << log2_G;
  const int64_t per_lane = ((K << log2_Dp) + G - 1) / G;
  const auto blocks = static_cast<unsigned int>((B * G + kLanesThreads - 1) / kLanesThreads);
  const auto launch = [&](auto kernel) {
    kernel<<<blocks, kLanesThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        logits.const_data_ptr<scalar_t>(), means.const_data_ptr<scalar_t>(), log_scales.const_data_ptr<scalar_t>(),
        target.const_data_ptr<scalar_t>(), B, static_cast<int>(K), static_cast<int>(D), log2_Dp, log2_G,
        grad_loss ? grad_loss->const_data_ptr<scalar_t>() : nullptr, grad_loss ? grad_loss->stride(0) : 0,
        static_cast<acc_t>(g_default), loss ? loss->data_ptr<scalar_t>() : nullptr,
        saved ? saved->data_ptr<acc_t>() : nullptr, gl ? gl->data_ptr<grad_t>() : nullptr,
        gm ? gm->data_ptr<grad_t>() : nullptr, gs ? gs->data_ptr<grad_t>() : nullptr,
        gt ? gt->data_ptr<grad_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (per_lane <= 1) {
    launch(lanes_nll_kernel<scalar_t, acc_t, grad_t, kGrad, 1>);
  } else if (per_lane <= 2) {
    launch(lanes_nll_kernel<scalar_t, acc_t, grad_t, kGrad, 2>);
  } else if (per_lane <= 4) {
    launch(lanes_nll_kernel<scalar_t, acc_t, grad_t, kGrad, 4>);
  } else {
    launch(lanes_nll_kernel<scalar_t, acc_t, grad_t, kGrad, 8>);
  }
}

// Launches the lane-per-element kernel; false when it does not apply (the caller takes another schedule).
template <bool kGrad>
bool launch_lanes(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
                  const at::Tensor& target, const at::Tensor* grad_loss, double g_default, at::Tensor* loss,
                  at::Tensor* saved, at::Tensor* gl, at::Tensor* gm, at::Tensor* gs, at::Tensor* gt) {
  if (!lanes_inputs(logits, means, log_scales, target)) return false;
  const int64_t B = means.size(0), K = means.size(1), D = means.size(2);
  if (B == 0) return true;
  int log2_Dp = 0, log2_G = 0;  // Dp: D padded to a power of two
  while ((int64_t(1) << log2_Dp) < D) ++log2_Dp;
  const int G = std::min(32, pow2_at_least(K << log2_Dp));
  while ((1 << log2_G) < G) ++log2_G;
  // the gradients in the input dtype (mixture_grads_in_input_dtype: no float32 [B, K, D] copies for bfloat16 /
  // float16 inputs) or in the accumulation dtype
  const bool direct = gm != nullptr && gm->scalar_type() == means.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, means.scalar_type(), "physmdn_lanes_nll", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (direct || std::is_same<acc_t, scalar_t>::value) {
      launch_lanes_typed<kGrad, scalar_t, acc_t, scalar_t>(logits, means, log_scales, target, grad_loss, g_default,
                                                          loss, saved, gl, gm, gs, gt, B, K, D, log2_Dp, log2_G);
    } else {
      launch_lanes_typed<kGrad, scalar_t, acc_t, acc_t>(logits, means, log_scales, target, grad_loss, g_default, loss,
                                                       saved, gl, gm, gs, gt, B, K, D, log2_Dp, log2_G);
    }
  });
  return true;
}

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

template <typename scalar_t, typename acc_t, bool kPhysics>
__global__ void warp_fwd_kernel(math::MixtureView<scalar_t> v, math::PhysicsView<scalar_t> p, int64_t B,
                                scalar_t* loss, acc_t* saved, int saved_per_sample) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= B) return;  // whole warps exit together
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
  if (lane == 0) {
    acc_t* s = saved + saved_per_sample * b;
    s[0] = max_logit;
    s[1] = log_sum;
    s[2] = joint.value();
    if constexpr (kPhysics) s[3] = pbar;
    loss[b] = static_cast<scalar_t>(pbar - s[2]);
  }
}

template <typename scalar_t, typename acc_t, bool kPhysics>
__global__ void warp_bwd_kernel(math::MixtureView<scalar_t> v, math::PhysicsView<scalar_t> p, int64_t B,
                                const scalar_t* grad_loss, int64_t grad_stride, const acc_t* saved,
                                int saved_per_sample, acc_t* gl, acc_t* gm, acc_t* gs, acc_t* gt, acc_t* gp0,
                                acc_t* gp1, acc_t* ge, int64_t n0, int64_t n1) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= B) return;
  const int64_t K = v.K, D = v.D;
  const acc_t* s = saved + saved_per_sample * b;
  const acc_t g = static_cast<acc_t>(grad_loss[b * grad_stride]);
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
        gl_row[k] += g * pi * (q - s[3]);
      } else {
        for (int64_t i = 0; gp0_row && i < n0; ++i) gp0_row[i] = acc_t(0);
        for (int64_t i = 0; gp1_row && i < n1; ++i) gp1_row[i] = acc_t(0);
      }
      if (ge) ge[b * K + k] = g * pi;
    }
  }
}

unsigned int warp_blocks_for(int64_t B) {
  return static_cast<unsigned int>((B + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

// ----- the eager backward's in-place rescaling (_scale_by_, csrc/ops.cpp) ------------------------------
// tensors *= factor, the factor read on the device: 1 when the upstream value equals the scale the forward's
// gradients were made for (the unit gradient of loss.sum() or of the op's own mean, the usual case), and then every
// block returns before touching the tensors: the backward hands the forward's gradients over without a pass over
// them and without synchronizing. Otherwise one grid-stride pass per tensor.
constexpr int kMaxScaleTensors = 8;
struct ScaleTargets {
  void* data[kMaxScaleTensors];
  int64_t numel[kMaxScaleTensors];
};

template <typename scalar_t, typename acc_t>
__global__ void scale_by_kernel(ScaleTargets targets, const acc_t* __restrict__ factor) {
  const acc_t f = *factor;
  if (f == acc_t(1)) return;
  scalar_t* const p = static_cast<scalar_t*>(targets.data[blockIdx.y]);
  const int64_t n = targets.numel[blockIdx.y];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    p[i] = static_cast<scalar_t>(static_cast<acc_t>(p[i]) * f);
}

void cuda_scale_by_(at::TensorList tensors, const at::Tensor& upstream, double scale) {
  check_scale_by_args(tensors, upstream);
  if (upstream.device().is_cpu()) return scale_by_on_host(tensors, upstream, scale);  // a host value: no sync
  const c10::cuda::CUDAGuard guard(upstream.device());
  const auto u = upstream.reshape({});
  const auto is_scale = u.eq(scale);  // (scale rounded to u's dtype)
  // the factor in dtype, as torch computes upstream.to(dtype) / scale; exactly 1 where upstream is the scale
  const auto factor_in = [&](at::ScalarType dtype) {
    auto f = u.to(dtype);
    if (scale != 1.0) f = f / scale;
    return f.masked_fill(is_scale, 1);
  };
  // batches of up to kMaxScaleTensors dense tensors of one dtype, one launch each (blockIdx.y: the tensor); a
  // tensor that is not dense (its elements not one block of memory) is multiplied by torch (the same values)
  std::vector<at::Tensor> pending;
  for (const auto& t : tensors) {
    if (!t.defined() || t.numel() == 0) continue;
    if (t.is_non_overlapping_and_dense()) {
      pending.push_back(t);
    } else {
      const_cast<at::Tensor&>(t).mul_(factor_in(t.scalar_type()));
    }
  }
  int sms = 0;  // (ATen/cuda/CUDAContext.h would need the cuSPARSE headers)
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, upstream.device().index()));
  while (!pending.empty()) {
    const auto dtype = pending.front().scalar_type();
    ScaleTargets targets{};
    int count = 0;
    int64_t most = 0;
    std::vector<at::Tensor> rest;
    for (auto& t : pending) {
      if (t.scalar_type() == dtype && count < kMaxScaleTensors) {
        targets.data[count] = t.data_ptr();
        targets.numel[count] = t.numel();
        most = std::max(most, t.numel());
        ++count;
      } else {
        rest.push_back(t);
      }
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "physmdn_scale_by_", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      // (the factor rounded to dtype first, as torch's mul_ by it would use it; stream-ordered: freeing it after
      // the launch is safe)
      const auto f = factor_in(dtype).to(c10::CppTypeToScalarType<acc_t>::value);
      const int64_t blocks = std::min<int64_t>((most + 255) / 256, 8 * static_cast<int64_t>(sms));
      const dim3 grid(static_cast<unsigned int>(blocks), static_cast<unsigned int>(count));
      scale_by_kernel<scalar_t, acc_t><<<grid, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(targets,
                                                                                            f.const_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    pending = std::move(rest);
  }
}

struct CudaBackend {
  static void check_device(const at::Tensor& means) {
    TORCH_CHECK(means.is_cuda(), "means must be a CUDA tensor for the CUDA kernel, got ", means.device());
  }

  static void mixture_nll_forward(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
                                  const at::Tensor& target, at::Tensor& loss, at::Tensor& saved) {
    const c10::cuda::CUDAGuard guard(means.device());
    if (launch_lanes<false>(logits, means, log_scales, target, nullptr, 1.0, &loss, &saved, nullptr, nullptr, nullptr,
                            nullptr) ||
        launch_tiled<false>(logits, means, log_scales, target, nullptr, 1.0, &loss, &saved, nullptr, nullptr, nullptr,
                            nullptr))
      return;
    const int64_t B = means.size(0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, means.scalar_type(), "physmdn_mixture_nll_fwd", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto v = make_mixture_view<scalar_t>(logits, means, log_scales, target);
      if (v.K >= kWarpMinComponents) {
        warp_fwd_kernel<scalar_t, acc_t, false><<<warp_blocks_for(B), 32 * kWarpsPerBlock, 0,
                                                  c10::cuda::getCurrentCUDAStream()>>>(
            v, math::PhysicsView<scalar_t>{}, B, loss.data_ptr<scalar_t>(), saved.data_ptr<acc_t>(),
            math::kSavedPerSample);
      } else {
        mixture_nll_fwd_kernel<scalar_t, acc_t><<<blocks_for(B), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            v, B, loss.data_ptr<scalar_t>(), saved.data_ptr<acc_t>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& opts) { return at::empty(sizes, opts); }
  // the kernels write float32 gradients (converted on return for bfloat16 / float16 inputs)
  static constexpr bool kForwardGradInInputDtype = false;
  // the mixture NLL's lane-per-element kernel writes the input dtype directly (forward and backward op); the others
  // float32 (converted on return)
  static bool mixture_grads_in_input_dtype(bool, const at::Tensor& logits, const at::Tensor& means,
                                           const at::Tensor& log_scales, const at::Tensor& target) {
    return lanes_inputs(logits, means, log_scales, target);
  }

  // Single pass (loss and gradients) with the tiled kernel; otherwise false and op_impl runs forward, then
  // backward with grad_scale.
  static bool mixture_nll_forward_grad(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
                                       const at::Tensor& target, at::Tensor& loss, at::Tensor& saved, at::Tensor& gl,
                                       at::Tensor& gm, at::Tensor& gs, at::Tensor& gt, double grad_scale) {
    const c10::cuda::CUDAGuard guard(means.device());
    return launch_lanes<true>(logits, means, log_scales, target, nullptr, grad_scale, &loss, &saved, &gl, &gm, &gs,
                              &gt) ||
           launch_tiled<true>(logits, means, log_scales, target, nullptr, grad_scale, &loss, &saved, &gl, &gm, &gs,
                              &gt);
  }

  static void mixture_nll_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& means,
                                   const at::Tensor& log_scales, const at::Tensor& target, const at::Tensor& saved,
                                   at::Tensor& gl, at::Tensor& gm, at::Tensor& gs, at::Tensor& gt) {
    const c10::cuda::CUDAGuard guard(means.device());
    // the tiled kernel recomputes the forward per sample (the saved state is not needed)
    if (launch_lanes<true>(logits, means, log_scales, target, &grad_loss, 1.0, nullptr, nullptr, &gl, &gm, &gs, &gt) ||
        launch_tiled<true>(logits, means, log_scales, target, &grad_loss, 1.0, nullptr, nullptr, &gl, &gm, &gs, &gt))
      return;
    const int64_t B = means.size(0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, means.scalar_type(), "physmdn_mixture_nll_bwd", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto v = make_mixture_view<scalar_t>(logits, means, log_scales, target);
      if (v.K >= kWarpMinComponents) {
        warp_bwd_kernel<scalar_t, acc_t, false><<<warp_blocks_for(B), 32 * kWarpsPerBlock, 0,
                                                  c10::cuda::getCurrentCUDAStream()>>>(
            v, math::PhysicsView<scalar_t>{}, B, grad_loss.const_data_ptr<scalar_t>(), grad_loss.stride(0),
            saved.const_data_ptr<acc_t>(), math::kSavedPerSample, gl.data_ptr<acc_t>(), gm.data_ptr<acc_t>(),
            gs.data_ptr<acc_t>(), gt.data_ptr<acc_t>(), nullptr, nullptr, nullptr, 0, 0);
      } else {
        mixture_nll_bwd_kernel<scalar_t, acc_t><<<blocks_for(B), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            v, B, grad_loss.const_data_ptr<scalar_t>(), grad_loss.stride(0), saved.const_data_ptr<acc_t>(),
            gl.data_ptr<acc_t>(), gm.data_ptr<acc_t>(), gs.data_ptr<acc_t>(), gt.data_ptr<acc_t>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  // No single pass for the fused loss on the GPU: op_impl runs forward, then backward with grad_scale.
  static bool mdn_loss_forward_grad(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                    const PhysicsArgs&, int, int64_t, at::Tensor&, at::Tensor&, at::Tensor&,
                                    at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, double) {
    return false;
  }

  static void mdn_loss_forward(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
                               const at::Tensor& target, const at::Tensor& p0, const at::Tensor& p1,
                               const c10::optional<at::Tensor>& extra, const PhysicsArgs& args, int order,
                               int64_t rows, at::Tensor& loss, at::Tensor& saved) {
    const c10::cuda::CUDAGuard guard(means.device());
    const int64_t B = means.size(0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, means.scalar_type(), "physmdn_mdn_loss_fwd", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto v = make_mixture_view<scalar_t>(logits, means, log_scales, target);
      const auto p = make_physics_view<scalar_t>(p0, p1, extra, args, order, rows);
      if (v.K >= kWarpMinComponents) {
        warp_fwd_kernel<scalar_t, acc_t, true><<<warp_blocks_for(B), 32 * kWarpsPerBlock, 0,
                                                 c10::cuda::getCurrentCUDAStream()>>>(
            v, p, B, loss.data_ptr<scalar_t>(), saved.data_ptr<acc_t>(), math::kSavedPerSampleLoss);
      } else {
        mdn_loss_fwd_kernel<scalar_t, acc_t><<<blocks_for(B), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            v, p, B, loss.data_ptr<scalar_t>(), saved.data_ptr<acc_t>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void mdn_loss_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& means,
                                const at::Tensor& log_scales, const at::Tensor& target, const at::Tensor& p0,
                                const at::Tensor& p1, const c10::optional<at::Tensor>& extra, const PhysicsArgs& args,
                                int order, int64_t rows, const at::Tensor& saved, at::Tensor& gl, at::Tensor& gm,
                                at::Tensor& gs, at::Tensor& gt, at::Tensor& gp0, at::Tensor& gp1, at::Tensor& ge) {
    const c10::cuda::CUDAGuard guard(means.device());
    const int64_t B = means.size(0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, means.scalar_type(), "physmdn_mdn_loss_bwd", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto p = make_physics_view<scalar_t>(p0, p1, extra, args, order, rows);
      int64_t n0 = 0, n1 = 0;
      math::param_row_sizes(p, means.size(2), &n0, &n1);
      const auto v = make_mixture_view<scalar_t>(logits, means, log_scales, target);
      if (v.K >= kWarpMinComponents) {
        warp_bwd_kernel<scalar_t, acc_t, true><<<warp_blocks_for(B), 32 * kWarpsPerBlock, 0,
                                                 c10::cuda::getCurrentCUDAStream()>>>(
            v, p, B, grad_loss.const_data_ptr<scalar_t>(), grad_loss.stride(0), saved.const_data_ptr<acc_t>(),
            math::kSavedPerSampleLoss, gl.data_ptr<acc_t>(), gm.data_ptr<acc_t>(), gs.data_ptr<acc_t>(),
            gt.data_ptr<acc_t>(), data_or_null<acc_t>(gp0), data_or_null<acc_t>(gp1), data_or_null<acc_t>(ge), n0, n1);
      } else {
        mdn_loss_bwd_kernel<scalar_t, acc_t><<<blocks_for(B), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            v, p, B, grad_loss.const_data_ptr<scalar_t>(), grad_loss.stride(0), saved.const_data_ptr<acc_t>(),
            gl.data_ptr<acc_t>(), gm.data_ptr<acc_t>(), gs.data_ptr<acc_t>(), gt.data_ptr<acc_t>(),
            data_or_null<acc_t>(gp0), data_or_null<acc_t>(gp1), data_or_null<acc_t>(ge), n0, n1);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(physmdn, CUDA, m) {
  PHYSMDN_OP_IMPLS(m, CudaBackend);
  m.impl("_scale_by_", &cuda_scale_by_);
}

}  // namespace physmdn

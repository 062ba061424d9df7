// CUDA drivers: thin kernels over the per-sample math of mixture_math.h / physics_math.h (the same code the
// CPU runs). Schedule chosen from K: a thread per sample for few components (a sample's parameters are read
// by one thread, consecutive threads read consecutive samples); a warp per sample from 16 components on.
// Accumulation in float32 (float64 for double inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

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

struct CudaBackend {
  static void check_device(const at::Tensor& means) {
    TORCH_CHECK(means.is_cuda(), "means must be a CUDA tensor for the CUDA kernel, got ", means.device());
  }

  static void mixture_nll_forward(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
                                  const at::Tensor& target, at::Tensor& loss, at::Tensor& saved) {
    const c10::cuda::CUDAGuard guard(means.device());
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

  // No single-pass variant on the GPU yet: op_impl runs forward, then backward with a unit gradient.
  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& opts) { return at::empty(sizes, opts); }
  static bool mixture_nll_forward_grad(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&,
                                       double) {
    return false;
  }

  static void mixture_nll_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& means,
                                   const at::Tensor& log_scales, const at::Tensor& target, const at::Tensor& saved,
                                   at::Tensor& gl, at::Tensor& gm, at::Tensor& gs, at::Tensor& gt) {
    const c10::cuda::CUDAGuard guard(means.device());
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

TORCH_LIBRARY_IMPL(physmdn, CUDA, m) { PHYSMDN_OP_IMPLS(m, CudaBackend); }

}  // namespace physmdn

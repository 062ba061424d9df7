// CUDA drivers: thin kernels over the per-sample math of mixture_math.h / physics_math.h (the same code the
// CPU runs). One thread per sample: K * D is small for MDNs, so a sample's parameters are read by one thread
// and consecutive threads read consecutive samples. Accumulation in float32 (float64 for double inputs).
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
      mixture_nll_fwd_kernel<scalar_t, acc_t><<<blocks_for(B), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          make_mixture_view<scalar_t>(logits, means, log_scales, target), B, loss.data_ptr<scalar_t>(),
          saved.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  // No single-pass variant on the GPU yet: op_impl runs forward, then backward with a unit gradient.
  static bool mixture_nll_forward_grad(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&) {
    return false;
  }

  static void mixture_nll_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& means,
                                   const at::Tensor& log_scales, const at::Tensor& target, const at::Tensor& saved,
                                   at::Tensor& gl, at::Tensor& gm, at::Tensor& gs, at::Tensor& gt) {
    const c10::cuda::CUDAGuard guard(means.device());
    const int64_t B = means.size(0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, means.scalar_type(), "physmdn_mixture_nll_bwd", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      mixture_nll_bwd_kernel<scalar_t, acc_t><<<blocks_for(B), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          make_mixture_view<scalar_t>(logits, means, log_scales, target), B, grad_loss.const_data_ptr<scalar_t>(),
          grad_loss.stride(0), saved.const_data_ptr<acc_t>(), gl.data_ptr<acc_t>(), gm.data_ptr<acc_t>(),
          gs.data_ptr<acc_t>(), gt.data_ptr<acc_t>());
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
      mdn_loss_fwd_kernel<scalar_t, acc_t><<<blocks_for(B), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          make_mixture_view<scalar_t>(logits, means, log_scales, target),
          make_physics_view<scalar_t>(p0, p1, extra, args, order, rows), B, loss.data_ptr<scalar_t>(),
          saved.data_ptr<acc_t>());
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
      mdn_loss_bwd_kernel<scalar_t, acc_t><<<blocks_for(B), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          make_mixture_view<scalar_t>(logits, means, log_scales, target), p, B, grad_loss.const_data_ptr<scalar_t>(),
          grad_loss.stride(0), saved.const_data_ptr<acc_t>(), gl.data_ptr<acc_t>(), gm.data_ptr<acc_t>(),
          gs.data_ptr<acc_t>(), gt.data_ptr<acc_t>(), data_or_null<acc_t>(gp0), data_or_null<acc_t>(gp1),
          data_or_null<acc_t>(ge), n0, n1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(physmdn, CUDA, m) { PHYSMDN_OP_IMPLS(m, CudaBackend); }

}  // namespace physmdn

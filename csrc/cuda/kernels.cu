// CUDA drivers: thin kernels over the per-sample math of mixture_math.h (the same code the CPU runs).
// One thread per sample: K * D is small for MDNs, so a sample's parameters are read by one thread;
// consecutive threads read consecutive samples.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "checks.h"
#include "mixture_math.h"

namespace physmdn {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
math::MixtureView<scalar_t> make_view(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
                                      const at::Tensor& target) {
  math::MixtureView<scalar_t> v;
  v.logits = logits.const_data_ptr<scalar_t>();
  v.means = means.const_data_ptr<scalar_t>();
  v.log_scales = log_scales.const_data_ptr<scalar_t>();
  v.target = target.const_data_ptr<scalar_t>();
  v.logits_sb = logits.stride(0);
  v.logits_sk = logits.stride(1);
  v.means_sb = means.stride(0);
  v.means_sk = means.stride(1);
  v.means_sd = means.stride(2);
  v.scales_sb = log_scales.stride(0);
  v.scales_sk = log_scales.stride(1);
  v.scales_sd = log_scales.stride(2);
  v.target_sb = target.stride(0);
  v.target_sd = target.stride(1);
  v.K = means.size(1);
  v.D = means.size(2);
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void mixture_nll_fwd_kernel(math::MixtureView<scalar_t> v, int64_t B, scalar_t* loss, acc_t* lse) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  acc_t saved[math::kSavedPerSample];
  loss[b] = static_cast<scalar_t>(math::mixture_nll_sample<acc_t>(v, b, saved));
  for (int i = 0; i < math::kSavedPerSample; ++i) lse[math::kSavedPerSample * b + i] = saved[i];
}

template <typename scalar_t, typename acc_t>
__global__ void mixture_nll_bwd_kernel(math::MixtureView<scalar_t> v, int64_t B, const scalar_t* grad_loss,
                                       int64_t grad_stride, const acc_t* lse, acc_t* gl, acc_t* gm, acc_t* gs,
                                       acc_t* gt) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int64_t K = v.K, D = v.D;
  math::mixture_nll_sample_backward<acc_t>(v, b, static_cast<acc_t>(grad_loss[b * grad_stride]),
                                           lse + math::kSavedPerSample * b, gl + b * K, gm + b * K * D, gs + b * K * D, gt + b * D);
}

at::ScalarType acc_dtype(at::ScalarType t) { return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t; }

unsigned int blocks_for(int64_t B) { return static_cast<unsigned int>((B + kThreads - 1) / kThreads); }

std::tuple<at::Tensor, at::Tensor> mixture_nll_fwd_cuda(const at::Tensor& logits, const at::Tensor& means,
                                                        const at::Tensor& log_scales, const at::Tensor& target) {
  check_mixture_inputs(logits, means, log_scales, target);
  const c10::cuda::CUDAGuard guard(means.device());
  const auto B = means.size(0);
  auto loss = at::empty({B}, means.options());
  auto lse = at::empty({B, math::kSavedPerSample}, means.options().dtype(acc_dtype(means.scalar_type())));
  if (B == 0) return {loss, lse};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, means.scalar_type(), "physmdn_mixture_nll_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    mixture_nll_fwd_kernel<scalar_t, acc_t><<<blocks_for(B), kThreads, 0, stream>>>(
        make_view<scalar_t>(logits, means, log_scales, target), B, loss.data_ptr<scalar_t>(), lse.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixture_nll_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
    const at::Tensor& target, const at::Tensor& lse) {
  check_mixture_inputs(logits, means, log_scales, target);
  const c10::cuda::CUDAGuard guard(means.device());
  const auto B = means.size(0), K = means.size(1), D = means.size(2);
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == B && grad_loss.scalar_type() == means.scalar_type() &&
                  grad_loss.device() == means.device(),
              "grad_loss must be [B] = [", B, "] with the dtype and device of means, got ", grad_loss.sizes());
  const auto acc = acc_dtype(means.scalar_type());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == B && lse.size(1) == math::kSavedPerSample && lse.scalar_type() == acc && lse.is_contiguous(),
              "lse must be a contiguous [B, 3] ", acc, " tensor from mixture_nll_fwd, got ", lse.sizes());
  auto opts = means.options().dtype(acc);
  auto grad_logits = at::empty({B, K}, opts);
  auto grad_means = at::empty({B, K, D}, opts);
  auto grad_log_scales = at::empty({B, K, D}, opts);
  auto grad_target = at::empty({B, D}, opts);
  if (B > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, means.scalar_type(), "physmdn_mixture_nll_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      mixture_nll_bwd_kernel<scalar_t, acc_t><<<blocks_for(B), kThreads, 0, stream>>>(
          make_view<scalar_t>(logits, means, log_scales, target), B, grad_loss.const_data_ptr<scalar_t>(),
          grad_loss.stride(0), lse.const_data_ptr<acc_t>(), grad_logits.data_ptr<acc_t>(),
          grad_means.data_ptr<acc_t>(), grad_log_scales.data_ptr<acc_t>(), grad_target.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto dt = means.scalar_type();
  return {grad_logits.to(dt), grad_means.to(dt), grad_log_scales.to(dt), grad_target.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(physmdn, CUDA, m) {
  m.impl("mixture_nll_fwd", &mixture_nll_fwd_cuda);
  m.impl("mixture_nll_bwd", &mixture_nll_bwd_cuda);
}

}  // namespace physmdn

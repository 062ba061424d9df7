// CPU drivers: thin loops over the per-sample math of mixture_math.h, parallel over the batch.
#include "cpu/kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include "mixture_math.h"

#ifndef PHYSMDN_CPU_ISA
#error "PHYSMDN_CPU_ISA must name the instruction set this file is compiled for"
#endif

namespace physmdn::cpu::PHYSMDN_CPU_ISA {
namespace {
constexpr int64_t kSaved = math::kSavedPerSample;

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

// Samples per parallel task: enough work per task to amortize scheduling.
int64_t grain_size(int64_t K, int64_t D) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, K * (D + 1))); }

}  // namespace

void mixture_nll_forward(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
                         const at::Tensor& target, at::Tensor& loss, at::Tensor& lse) {
  const int64_t B = means.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, means.scalar_type(), "physmdn_mixture_nll_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto v = make_view<scalar_t>(logits, means, log_scales, target);
    scalar_t* loss_ptr = loss.data_ptr<scalar_t>();
    acc_t* lse_ptr = lse.data_ptr<acc_t>();
    at::parallel_for(0, B, grain_size(v.K, v.D), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        loss_ptr[b] = static_cast<scalar_t>(math::mixture_nll_sample<acc_t>(v, b, lse_ptr + kSaved * b));
      }
    });
  });
}

void mixture_nll_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& means,
                          const at::Tensor& log_scales, const at::Tensor& target, const at::Tensor& lse,
                          at::Tensor& grad_logits, at::Tensor& grad_means, at::Tensor& grad_log_scales,
                          at::Tensor& grad_target) {
  const int64_t B = means.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, means.scalar_type(), "physmdn_mixture_nll_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto v = make_view<scalar_t>(logits, means, log_scales, target);
    const scalar_t* g_ptr = grad_loss.const_data_ptr<scalar_t>();
    const int64_t g_stride = grad_loss.stride(0);
    const acc_t* lse_ptr = lse.const_data_ptr<acc_t>();
    acc_t* gl = grad_logits.data_ptr<acc_t>();
    acc_t* gm = grad_means.data_ptr<acc_t>();
    acc_t* gs = grad_log_scales.data_ptr<acc_t>();
    acc_t* gt = grad_target.data_ptr<acc_t>();
    const int64_t K = v.K, D = v.D;
    at::parallel_for(0, B, grain_size(K, D), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        math::mixture_nll_sample_backward<acc_t>(v, b, static_cast<acc_t>(g_ptr[b * g_stride]),
                                                 lse_ptr + kSaved * b, gl + b * K, gm + b * K * D, gs + b * K * D,
                                                 gt + b * D);
      }
    });
  });
}

}  // namespace physmdn::cpu::PHYSMDN_CPU_ISA

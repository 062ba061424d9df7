// CPU drivers: thin loops over the per-sample math of mixture_math.h / physics_math.h, parallel over the
// batch. Compiled once per instruction set (PHYSMDN_CPU_ISA names the namespace).
#include "cpu/kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "mixture_math.h"
#include "physics_math.h"
#include "views.h"

#ifndef PHYSMDN_CPU_ISA
#error "PHYSMDN_CPU_ISA must name the instruction set this file is compiled for"
#endif

namespace physmdn::cpu::PHYSMDN_CPU_ISA {
namespace {

// Samples per parallel task: enough work per task to amortize scheduling.
int64_t grain_size(int64_t K, int64_t D) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, K * (D + 1))); }

template <typename T>
T* data_or_null(at::Tensor& t) {
  return t.numel() ? t.data_ptr<T>() : nullptr;
}

}  // namespace

void mixture_nll_forward(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
                         const at::Tensor& target, at::Tensor& loss, at::Tensor& saved) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, means.scalar_type(), "physmdn_mixture_nll_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto v = make_mixture_view<scalar_t>(logits, means, log_scales, target);
    scalar_t* loss_ptr = loss.data_ptr<scalar_t>();
    acc_t* saved_ptr = saved.data_ptr<acc_t>();
    at::parallel_for(0, means.size(0), grain_size(v.K, v.D), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        loss_ptr[b] = static_cast<scalar_t>(math::mixture_nll_sample<acc_t>(v, b, saved_ptr + math::kSavedPerSample * b));
      }
    });
  });
}

void mixture_nll_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& means,
                          const at::Tensor& log_scales, const at::Tensor& target, const at::Tensor& saved,
                          at::Tensor& grad_logits, at::Tensor& grad_means, at::Tensor& grad_log_scales,
                          at::Tensor& grad_target) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, means.scalar_type(), "physmdn_mixture_nll_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto v = make_mixture_view<scalar_t>(logits, means, log_scales, target);
    const scalar_t* g_ptr = grad_loss.const_data_ptr<scalar_t>();
    const int64_t g_stride = grad_loss.stride(0);
    const acc_t* saved_ptr = saved.const_data_ptr<acc_t>();
    acc_t* gl = grad_logits.data_ptr<acc_t>();
    acc_t* gm = grad_means.data_ptr<acc_t>();
    acc_t* gs = grad_log_scales.data_ptr<acc_t>();
    acc_t* gt = grad_target.data_ptr<acc_t>();
    const int64_t K = v.K, D = v.D;
    at::parallel_for(0, means.size(0), grain_size(K, D), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        math::mixture_nll_sample_backward<acc_t>(v, b, static_cast<acc_t>(g_ptr[b * g_stride]),
                                                 saved_ptr + math::kSavedPerSample * b, gl + b * K, gm + b * K * D,
                                                 gs + b * K * D, gt + b * D);
      }
    });
  });
}

void mdn_loss_forward(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
                      const at::Tensor& target, const at::Tensor& p0, const at::Tensor& p1,
                      const c10::optional<at::Tensor>& extra, const PhysicsArgs& args, int order, int64_t rows,
                      at::Tensor& loss, at::Tensor& saved) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, means.scalar_type(), "physmdn_mdn_loss_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto v = make_mixture_view<scalar_t>(logits, means, log_scales, target);
    const auto p = make_physics_view<scalar_t>(p0, p1, extra, args, order, rows);
    scalar_t* loss_ptr = loss.data_ptr<scalar_t>();
    acc_t* saved_ptr = saved.data_ptr<acc_t>();
    at::parallel_for(0, means.size(0), grain_size(v.K, v.D), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        loss_ptr[b] =
            static_cast<scalar_t>(math::mdn_loss_sample<acc_t>(v, p, b, saved_ptr + math::kSavedPerSampleLoss * b));
      }
    });
  });
}

void mdn_loss_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& means,
                       const at::Tensor& log_scales, const at::Tensor& target, const at::Tensor& p0,
                       const at::Tensor& p1, const c10::optional<at::Tensor>& extra, const PhysicsArgs& args,
                       int order, int64_t rows, const at::Tensor& saved, at::Tensor& grad_logits,
                       at::Tensor& grad_means, at::Tensor& grad_log_scales, at::Tensor& grad_target,
                       at::Tensor& grad_p0, at::Tensor& grad_p1, at::Tensor& grad_extra) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, means.scalar_type(), "physmdn_mdn_loss_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto v = make_mixture_view<scalar_t>(logits, means, log_scales, target);
    const auto p = make_physics_view<scalar_t>(p0, p1, extra, args, order, rows);
    const scalar_t* g_ptr = grad_loss.const_data_ptr<scalar_t>();
    const int64_t g_stride = grad_loss.stride(0);
    const acc_t* saved_ptr = saved.const_data_ptr<acc_t>();
    acc_t *gl = grad_logits.data_ptr<acc_t>(), *gm = grad_means.data_ptr<acc_t>();
    acc_t *gs = grad_log_scales.data_ptr<acc_t>(), *gt = grad_target.data_ptr<acc_t>();
    acc_t *gp0 = data_or_null<acc_t>(grad_p0), *gp1 = data_or_null<acc_t>(grad_p1);
    acc_t* ge = data_or_null<acc_t>(grad_extra);
    const int64_t K = v.K, D = v.D;
    int64_t n0 = 0, n1 = 0;
    math::param_row_sizes(p, D, &n0, &n1);
    at::parallel_for(0, means.size(0), grain_size(K, D), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        math::mdn_loss_sample_backward<acc_t>(v, p, b, static_cast<acc_t>(g_ptr[b * g_stride]),
                                              saved_ptr + math::kSavedPerSampleLoss * b, gl + b * K, gm + b * K * D,
                                              gs + b * K * D, gt + b * D, gp0 ? gp0 + b * K * n0 : nullptr,
                                              gp1 ? gp1 + b * K * n1 : nullptr, ge ? ge + b * K : nullptr);
      }
    });
  });
}

}  // namespace physmdn::cpu::PHYSMDN_CPU_ISA

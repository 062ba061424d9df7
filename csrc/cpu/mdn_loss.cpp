// The fused loss's CPU drivers: each entry point takes the first path of paths.h that applies (lanes, blocked
// family, per-sample) and runs it over the batch; the per-sample path is a loop over physics_math.h's per-sample
// math. Compiled once per instruction set (PHYSMDN_CPU_ISA names the namespace).

#include "cpu/dispatch.h"
#include "cpu/kernels.h"
#include "cpu/mdn_loss_paths.h"
#include "cpu/paths.h"
#include "physics_math.h"
#include "views.h"

namespace physmdn::cpu::PHYSMDN_CPU_ISA {

void mdn_loss_forward(const Tensor& logits_in, const Tensor& means_in, const Tensor& log_scales_in,
                      const Tensor& target_in, const Tensor& p0, const Tensor& p1,
                      const OptionalTensor& extra, const PhysicsArgs& args, int order, int64_t rows,
                      Tensor& loss, Tensor& saved) {
  const DriverInputs in(logits_in, means_in, log_scales_in, target_in, lanes_family(args, order, rows));
  const Tensor &logits = in.logits, &means = in.means, &log_scales = in.log_scales, &target = in.target;
#ifdef PHYSMDN_LANES_PATH
  if (lanes_family_path_applies(means, args, order, rows))
    return mdn_loss_forward_lanes(logits, means, log_scales, target, p0, p1, extra, args, order, rows, loss, saved);
#endif
  if (blocked_family_path_applies(logits, means, log_scales, target, args, rows, /*param_grad=*/false))
    return mdn_loss_forward_blocked(logits, means, log_scales, target, p0, p1, extra, args, order, rows, loss, saved);
  PHYSMDN_DISPATCH_FLOATING(means.scalar_type(), "physmdn_mdn_loss_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto v = make_mixture_view<scalar_t>(logits, means, log_scales, target);
    const auto p = make_physics_view<scalar_t>(p0, p1, extra, args, order, rows);
    scalar_t* loss_ptr = loss.mutable_data_ptr<scalar_t>();
    acc_t* saved_ptr = saved.mutable_data_ptr<acc_t>();
    torch::stable::parallel_for(0, means.size(0), grain_size(v.K, v.D), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        loss_ptr[b] =
            static_cast<scalar_t>(math::mdn_loss_sample<acc_t>(v, p, b, saved_ptr + math::kSavedPerSampleLoss * b));
      }
    });
  });
}

// One pass for the loss and its gradients where the lanes path applies; false otherwise (op_impl.h then runs the
// forward and the backward).
bool mdn_loss_forward_grad(const Tensor& logits_in, const Tensor& means_in, const Tensor& log_scales_in,
                           const Tensor& target_in, const Tensor& p0, const Tensor& p1,
                           const OptionalTensor& extra, const PhysicsArgs& args, int order, int64_t rows,
                           Tensor& loss, Tensor& saved, Tensor& grad_logits, Tensor& grad_means,
                           Tensor& grad_log_scales, Tensor& grad_target, Tensor& grad_extra,
                           double grad_scale) {
#ifdef PHYSMDN_LANES_PATH
  const DriverInputs in(logits_in, means_in, log_scales_in, target_in, lanes_family(args, order, rows));
  if (!lanes_family_path_applies(in.means, args, order, rows)) return false;
  mdn_loss_forward_grad_lanes(in.logits, in.means, in.log_scales, in.target, p0, p1, extra, args, order, rows, loss,
                              saved, grad_logits, grad_means, grad_log_scales, grad_target, grad_extra, grad_scale);
  return true;
#else
  (void)logits_in, (void)means_in, (void)log_scales_in, (void)target_in, (void)p0, (void)p1, (void)extra, (void)args;
  (void)order, (void)rows, (void)loss, (void)saved, (void)grad_logits, (void)grad_means, (void)grad_log_scales;
  (void)grad_target, (void)grad_extra, (void)grad_scale;
  return false;
#endif
}

void mdn_loss_backward(const Tensor& grad_loss, const Tensor& logits_in, const Tensor& means_in,
                       const Tensor& log_scales_in, const Tensor& target_in, const Tensor& p0,
                       const Tensor& p1, const OptionalTensor& extra, const PhysicsArgs& args,
                       int order, int64_t rows, const Tensor& saved, Tensor& grad_logits,
                       Tensor& grad_means, Tensor& grad_log_scales, Tensor& grad_target,
                       Tensor& grad_p0, Tensor& grad_p1, Tensor& grad_extra) {
  const DriverInputs in(logits_in, means_in, log_scales_in, target_in, lanes_family(args, order, rows));
  const Tensor &logits = in.logits, &means = in.means, &log_scales = in.log_scales, &target = in.target;
#ifdef PHYSMDN_LANES_PATH
  // recomputes the forward per group (the saved state is not read)
  if (lanes_family_path_applies(means, args, order, rows))
    return mdn_loss_backward_lanes(grad_loss, logits, means, log_scales, target, p0, p1, extra, args, order, rows,
                                   grad_logits, grad_means, grad_log_scales, grad_target, grad_p0, grad_p1,
                                   grad_extra);
#endif
  if (blocked_family_path_applies(logits, means, log_scales, target, args, rows,
                                  /*param_grad=*/grad_p0.numel() > 0 || grad_p1.numel() > 0))
    return mdn_loss_backward_blocked(grad_loss, logits, means, log_scales, target, p0, p1, extra, args, order, rows,
                                     saved, grad_logits, grad_means, grad_log_scales, grad_target, grad_extra);
  PHYSMDN_DISPATCH_FLOATING(means.scalar_type(), "physmdn_mdn_loss_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto v = make_mixture_view<scalar_t>(logits, means, log_scales, target);
    const auto p = make_physics_view<scalar_t>(p0, p1, extra, args, order, rows);
    const scalar_t* g_ptr = grad_loss.const_data_ptr<scalar_t>();
    const int64_t g_stride = grad_loss.stride(0);
    const acc_t* saved_ptr = saved.const_data_ptr<acc_t>();
    acc_t *gl = grad_logits.mutable_data_ptr<acc_t>(), *gm = grad_means.mutable_data_ptr<acc_t>();
    acc_t *gs = grad_log_scales.mutable_data_ptr<acc_t>(), *gt = grad_target.mutable_data_ptr<acc_t>();
    acc_t *gp0 = data_or_null<acc_t>(grad_p0), *gp1 = data_or_null<acc_t>(grad_p1);
    acc_t* ge = data_or_null<acc_t>(grad_extra);
    const int64_t K = v.K, D = v.D;
    int64_t n0 = 0, n1 = 0;
    math::param_row_sizes(p, D, &n0, &n1);
    torch::stable::parallel_for(0, means.size(0), grain_size(K, D), [&](int64_t begin, int64_t end) {
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

// Device-independent op bodies: checks, output allocation, dtype handling. Each device supplies a Backend
// with the kernel launchers (cpu: csrc/ops.cpp, cuda: csrc/cuda/backend.cuh).
#pragma once

#include <atomic>
#include <tuple>

#include "views.h"

namespace physmdn {

using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensors4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Tensors6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Tensors7 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// What an output is allocated as: a dtype on a device (Backend::empty(sizes, spec)).
struct Spec {
  ScalarType dtype;
  Device device;
  Spec with(ScalarType d) const { return {d, device}; }
};
inline Spec spec_of(const Tensor& t) { return {t.scalar_type(), t.device()}; }

// Whether the CUDA mixture NLL takes its lane-per-element schedule where it applies (csrc/cuda/backend.cuh;
// physmdn._C.set_cuda_lanes_schedule; off by default, compiled only with PHYSMDN_CUDA_LANES). Defined in
// csrc/ops.cpp.
std::atomic<bool>& cuda_lanes_schedule_enabled();

inline void check_saved(const Tensor& saved, const Tensor& means, int64_t per_sample, const char* producer) {
  const auto acc = acc_dtype(means.scalar_type());
  PHYSMDN_CHECK(saved.dim() == 2 && saved.size(0) == means.size(0) && saved.size(1) == per_sample &&
                  saved.scalar_type() == acc && saved.is_contiguous() && saved.device() == means.device(),
              "saved must be the contiguous [B, ", per_sample, "] ", acc, " tensor from ", producer, ", got ",
              shape(saved), " ", saved.scalar_type());
}

inline void check_grad_loss(const Tensor& grad_loss, const Tensor& means) {
  PHYSMDN_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == means.size(0), "grad_loss must be [B] = [", means.size(0),
              "], got ", shape(grad_loss));
  PHYSMDN_CHECK(grad_loss.scalar_type() == means.scalar_type() && grad_loss.device() == means.device(),
              "grad_loss must have the dtype and device of means, got ", grad_loss.scalar_type(), " on ",
              grad_loss.device());
}

// Options of the gradients the fused loss's forward with compute_grad returns: the input dtype where the backend's
// kernel for these inputs writes reduced dtypes directly (Backend::loss_grads_in_input_dtype: no float32 [B, K, D]
// copy is made), else the accumulation dtype (converted on return).
template <typename Backend>
ScalarType loss_grad_dtype(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                                    const Tensor& target) {
  const bool direct = Backend::loss_grads_in_input_dtype(logits, means, log_scales, target);
  return direct ? means.scalar_type() : acc_dtype(means.scalar_type());
}

// The mixture NLL's gradient outputs: in the input dtype where the backend's kernel for these inputs writes it
// directly (Backend::mixture_grads_in_input_dtype: CPU forward with gradients, the CUDA lane-per-element kernel),
// else in the accumulation dtype (converted on return).
template <typename Backend>
ScalarType mixture_grad_dtype(bool backward, const Tensor& logits, const Tensor& means,
                                       const Tensor& log_scales, const Tensor& target) {
  const bool direct = Backend::mixture_grads_in_input_dtype(backward, logits, means, log_scales, target);
  return direct ? means.scalar_type() : acc_dtype(means.scalar_type());
}

// With compute_grad the forward also returns the gradients for an upstream gradient of grad_scale per sample
// (the backward then only rescales them by grad_loss / grad_scale, or not at all when they are equal: mean or
// sum reductions); without, the four gradient outputs are empty.
template <typename Backend>
Tensors6 mixture_nll_fwd_impl(
    const Tensor& logits, const Tensor& means, const Tensor& log_scales, const Tensor& target,
    bool compute_grad, double grad_scale) {
  check_mixture_inputs(logits, means, log_scales, target);
  Backend::check_device(means);
  const auto B = means.size(0), K = means.size(1), D = means.size(2);
  auto loss = Backend::empty({B}, spec_of(means));
  const auto acc_opts = spec_of(means).with(acc_dtype(means.scalar_type()));
  auto saved = Backend::empty({B, math::kSavedPerSample}, acc_opts);
  if (!compute_grad) {
    const auto none = [&] { return Backend::empty({0}, spec_of(means)); };  // distinct tensors: outputs must not alias
    if (B > 0) Backend::mixture_nll_forward(logits, means, log_scales, target, loss, saved);
    return {loss, saved, none(), none(), none(), none()};
  }
  const auto gopts = spec_of(means).with(mixture_grad_dtype<Backend>(false, logits, means, log_scales, target));
  auto gl = Backend::empty({B, K}, gopts), gm = Backend::empty({B, K, D}, gopts), gs = Backend::empty({B, K, D}, gopts),
       gt = Backend::empty({B, D}, gopts);
  if (B > 0 && !Backend::mixture_nll_forward_grad(logits, means, log_scales, target, loss, saved, gl, gm, gs, gt,
                                                  grad_scale)) {
    Backend::mixture_nll_forward(logits, means, log_scales, target, loss, saved);
    const auto g = make_full({B}, grad_scale, means.scalar_type(), means.device());
    if (gopts.dtype == acc_opts.dtype) {
      Backend::mixture_nll_backward(g, logits, means, log_scales, target, saved, gl, gm, gs, gt);
    } else {  // this backward writes the accumulation dtype only
      auto gl32 = Backend::empty({B, K}, acc_opts), gm32 = Backend::empty({B, K, D}, acc_opts);
      auto gs32 = Backend::empty({B, K, D}, acc_opts), gt32 = Backend::empty({B, D}, acc_opts);
      Backend::mixture_nll_backward(g, logits, means, log_scales, target, saved, gl32, gm32, gs32, gt32);
      copy_into(gl, gl32), copy_into(gm, gm32), copy_into(gs, gs32), copy_into(gt, gt32);
    }
  }
  const auto dt = means.scalar_type();
  return {loss, saved, to_dtype(gl, dt), to_dtype(gm, dt), to_dtype(gs, dt), to_dtype(gt, dt)};
}

template <typename Backend>
Tensors4 mixture_nll_bwd_impl(
    const Tensor& grad_loss, const Tensor& logits, const Tensor& means, const Tensor& log_scales,
    const Tensor& target, const Tensor& saved) {
  check_mixture_inputs(logits, means, log_scales, target);
  Backend::check_device(means);
  check_grad_loss(grad_loss, means);
  check_saved(saved, means, math::kSavedPerSample, "mixture_nll_fwd");
  const auto B = means.size(0), K = means.size(1), D = means.size(2);
  auto opts = spec_of(means).with(mixture_grad_dtype<Backend>(true, logits, means, log_scales, target));
  auto gl = Backend::empty({B, K}, opts), gm = Backend::empty({B, K, D}, opts), gs = Backend::empty({B, K, D}, opts),
       gt = Backend::empty({B, D}, opts);
  if (B > 0) Backend::mixture_nll_backward(grad_loss, logits, means, log_scales, target, saved, gl, gm, gs, gt);
  const auto dt = means.scalar_type();
  return {to_dtype(gl, dt), to_dtype(gm, dt), to_dtype(gs, dt), to_dtype(gt, dt)};
}

// As mixture_nll_fwd: with compute_grad the forward also returns the gradients with respect to logits, means,
// log_scales, target and extra (when given) for an upstream gradient of grad_scale per sample; the parameters'
// gradients (p0, p1) always come from mdn_loss_bwd.
template <typename Backend>
Tensors7 mdn_loss_fwd_impl(
    const Tensor& logits, const Tensor& means, const Tensor& log_scales, const Tensor& target,
    const Tensor& p0, const Tensor& p1, const OptionalTensor& extra, int64_t family, int64_t moment,
    bool couple_weights, double weight, double spacing, int64_t boundary, double noise_scale, bool compute_grad,
    double grad_scale) {
  check_mixture_inputs(logits, means, log_scales, target);
  Backend::check_device(means);
  const PhysicsArgs args{family, moment, couple_weights, weight, spacing, boundary, noise_scale};
  const auto [order, rows] = check_physics_args(means, p0, p1, extra, args);
  const auto B = means.size(0), K = means.size(1), D = means.size(2);
  auto loss = Backend::empty({B}, spec_of(means));
  const auto acc_opts = spec_of(means).with(acc_dtype(means.scalar_type()));
  auto saved = Backend::empty({B, math::kSavedPerSampleLoss}, acc_opts);
  if (!compute_grad) {
    const auto none = [&] { return Backend::empty({0}, spec_of(means)); };  // distinct: outputs must not alias
    if (B > 0)
      Backend::mdn_loss_forward(logits, means, log_scales, target, p0, p1, extra, args, order, rows, loss, saved);
    return {loss, saved, none(), none(), none(), none(), none()};
  }
  const auto gopts = spec_of(means).with(loss_grad_dtype<Backend>(logits, means, log_scales, target));
  auto gl = Backend::empty({B, K}, gopts), gm = Backend::empty({B, K, D}, gopts);
  auto gs = Backend::empty({B, K, D}, gopts), gt = Backend::empty({B, D}, gopts);
  auto ge = extra.has_value() ? Backend::empty({B, K}, gopts) : Backend::empty({0}, gopts);
  if (B > 0 && !Backend::mdn_loss_forward_grad(logits, means, log_scales, target, p0, p1, extra, args, order, rows,
                                               loss, saved, gl, gm, gs, gt, ge, grad_scale)) {
    Backend::mdn_loss_forward(logits, means, log_scales, target, p0, p1, extra, args, order, rows, loss, saved);
    const auto g = make_full({B}, grad_scale, means.scalar_type(), means.device());
    auto no_gp0 = Backend::empty({0}, acc_opts), no_gp1 = Backend::empty({0}, acc_opts);
    if (gopts.dtype == acc_opts.dtype) {
      Backend::mdn_loss_backward(g, logits, means, log_scales, target, p0, p1, extra, args, order, rows, saved, gl,
                                 gm, gs, gt, no_gp0, no_gp1, ge);
    } else {  // this backward writes the accumulation dtype only
      auto gl32 = Backend::empty({B, K}, acc_opts), gm32 = Backend::empty({B, K, D}, acc_opts);
      auto gs32 = Backend::empty({B, K, D}, acc_opts), gt32 = Backend::empty({B, D}, acc_opts);
      auto ge32 = extra.has_value() ? Backend::empty({B, K}, acc_opts) : Backend::empty({0}, acc_opts);
      Backend::mdn_loss_backward(g, logits, means, log_scales, target, p0, p1, extra, args, order, rows, saved, gl32,
                                 gm32, gs32, gt32, no_gp0, no_gp1, ge32);
      copy_into(gl, gl32), copy_into(gm, gm32), copy_into(gs, gs32), copy_into(gt, gt32), copy_into(ge, ge32);
    }
  }
  const auto dt = means.scalar_type();
  return {loss, saved, to_dtype(gl, dt), to_dtype(gm, dt), to_dtype(gs, dt), to_dtype(gt, dt), to_dtype(ge, dt)};
}

template <typename Backend>
Tensors7 mdn_loss_bwd_impl(
    const Tensor& grad_loss, const Tensor& logits, const Tensor& means, const Tensor& log_scales,
    const Tensor& target, const Tensor& p0, const Tensor& p1, const OptionalTensor& extra,
    int64_t family, int64_t moment, bool couple_weights, double weight, double spacing, int64_t boundary,
    double noise_scale, const Tensor& saved, bool p0_grad, bool p1_grad) {
  check_mixture_inputs(logits, means, log_scales, target);
  Backend::check_device(means);
  check_grad_loss(grad_loss, means);
  check_saved(saved, means, math::kSavedPerSampleLoss, "mdn_loss_fwd");
  const PhysicsArgs args{family, moment, couple_weights, weight, spacing, boundary, noise_scale};
  const auto [order, rows] = check_physics_args(means, p0, p1, extra, args);
  const auto B = means.size(0), K = means.size(1), D = means.size(2);
  auto opts = spec_of(means).with(acc_dtype(means.scalar_type()));
  auto gl = Backend::empty({B, K}, opts), gm = Backend::empty({B, K, D}, opts), gs = Backend::empty({B, K, D}, opts),
       gt = Backend::empty({B, D}, opts);
  const bool has_family = family != math::kFamilyNone;
  // Parameter gradients are full-size [B, K, ...]; autograd reduces them over the broadcast dimensions.
  auto gp0 = (p0_grad && has_family) ? Backend::empty(p0.sizes(), opts) : Backend::empty({0}, opts);
  auto gp1 = (p1_grad && has_family && family != math::kPolynomial) ? Backend::empty(p1.sizes(), opts) : Backend::empty({0}, opts);
  auto ge = extra.has_value() ? Backend::empty({B, K}, opts) : Backend::empty({0}, opts);
  if (B > 0)
    Backend::mdn_loss_backward(grad_loss, logits, means, log_scales, target, p0, p1, extra, args, order, rows, saved, gl,
                               gm, gs, gt, gp0, gp1, ge);
  const auto dt = means.scalar_type();
  return {to_dtype(gl, dt), to_dtype(gm, dt), to_dtype(gs, dt), to_dtype(gt, dt), to_dtype(gp0, dt), to_dtype(gp1, dt), to_dtype(ge, dt)};
}

// ----- physics penalty of correlated components (csrc/mvn_physics_math.h) ------------------------------------------
// P [B, K] (input dtype) of one built-in family under N(means_bk, F_bk F_bk^T + diag(diag_bk)); the family's
// parameters p0 / p1 as for mdn_loss_fwd ([B, K, ...] views, stride 0 where broadcast). Backend supplies
// correlated_penalty_forward / _backward over contiguous means, factor and diag.
inline PhysicsArgs penalty_args(int64_t family, int64_t moment, double spacing, int64_t boundary, double noise_scale) {
  PHYSMDN_CHECK(family != math::kFamilyNone, "family must be 0 (polynomial), 1 (linear) or 2 (stencil), got ", family);
  return PhysicsArgs{family, moment, false, 1.0, spacing, boundary, noise_scale};
}

inline OptionalTensor contiguous_or_none(const OptionalTensor& t) {
  return t.has_value() ? OptionalTensor(as_contiguous(*t)) : std::nullopt;
}

template <typename Backend>
Tensor correlated_penalty_impl(const Tensor& means, const Tensor& factor, const OptionalTensor& diag, const Tensor& p0,
                               const Tensor& p1, int64_t family, int64_t moment, double spacing, int64_t boundary,
                               double noise_scale) {
  check_correlated_penalty_inputs(means, factor, diag);
  Backend::check_device(means);
  const PhysicsArgs args = penalty_args(family, moment, spacing, boundary, noise_scale);
  const auto [order, rows] = check_physics_args(means, p0, p1, std::nullopt, args);
  auto out = Backend::empty({means.size(0), means.size(1)}, spec_of(means));
  if (means.size(0) > 0)
    Backend::correlated_penalty_forward(as_contiguous(means), as_contiguous(factor), contiguous_or_none(diag), p0, p1,
                                        args, order, rows, out);
  return out;
}

// The gradients of sum(grad * P) in means [B, K, D], factor [B, K, D, Q] and diag [B, K, D] ([0] without diag), in
// the input dtype; the parameters' gradients are not computed here (python/physmdn/physics_correlated.py takes its
// torch path when a parameter needs one).
template <typename Backend>
Tensors3 correlated_penalty_backward_impl(const Tensor& grad, const Tensor& means, const Tensor& factor,
                                          const OptionalTensor& diag, const Tensor& p0, const Tensor& p1,
                                          int64_t family, int64_t moment, double spacing, int64_t boundary,
                                          double noise_scale) {
  check_correlated_penalty_inputs(means, factor, diag);
  Backend::check_device(means);
  check_correlated_penalty_grad(grad, means);
  const PhysicsArgs args = penalty_args(family, moment, spacing, boundary, noise_scale);
  const auto [order, rows] = check_physics_args(means, p0, p1, std::nullopt, args);
  const auto B = means.size(0), K = means.size(1), D = means.size(2), Q = factor.size(3);
  const auto acc = spec_of(means).with(acc_dtype(means.scalar_type()));
  auto gm = Backend::empty({B, K, D}, acc), gF = Backend::empty({B, K, D, Q}, acc);
  auto gc = diag.has_value() ? Backend::empty({B, K, D}, acc) : Backend::empty({0}, acc);
  if (B > 0)
    Backend::correlated_penalty_backward(as_contiguous(to_dtype(grad, acc.dtype)), as_contiguous(means),
                                         as_contiguous(factor), contiguous_or_none(diag), p0, p1, args, order, rows,
                                         gm, gF, gc);
  const auto dt = means.scalar_type();
  return {to_dtype(gm, dt), to_dtype(gF, dt), to_dtype(gc, dt)};
}

#define PHYSMDN_OP_SCHEMAS(m)                                                                                          \
  m.def("mixture_nll_fwd(Tensor logits, Tensor means, Tensor log_scales, Tensor target, bool compute_grad=False, "     \
        "float grad_scale=1.0) -> (Tensor loss, Tensor saved, Tensor grad_logits, Tensor grad_means, Tensor grad_log_scales, "               \
        "Tensor grad_target)");                                                                                       \
  m.def("mixture_nll_bwd(Tensor grad_loss, Tensor logits, Tensor means, Tensor log_scales, Tensor target, "            \
        "Tensor saved) -> (Tensor grad_logits, Tensor grad_means, Tensor grad_log_scales, Tensor grad_target)");         \
  m.def("mdn_loss_fwd(Tensor logits, Tensor means, Tensor log_scales, Tensor target, Tensor p0, Tensor p1, "           \
        "Tensor? extra, int family, int moment, bool couple_weights, float weight, float spacing, int boundary, "       \
        "float noise_scale, "                                                                                          \
        "bool compute_grad=False, float grad_scale=1.0) -> (Tensor loss, Tensor saved, Tensor grad_logits, "           \
        "Tensor grad_means, Tensor grad_log_scales, Tensor grad_target, Tensor grad_extra)");                         \
  m.def("mdn_loss_bwd(Tensor grad_loss, Tensor logits, Tensor means, Tensor log_scales, Tensor target, Tensor p0, "    \
        "Tensor p1, Tensor? extra, int family, int moment, bool couple_weights, float weight, float spacing, "        \
        "int boundary, "                                                                                               \
        "float noise_scale, Tensor saved, bool p0_grad, bool p1_grad) -> (Tensor grad_logits, Tensor grad_means, "      \
        "Tensor grad_log_scales, Tensor grad_target, Tensor grad_p0, Tensor grad_p1, Tensor grad_extra)");             \
  m.def("correlated_penalty(Tensor means, Tensor factor, Tensor? diag, Tensor p0, Tensor p1, int family, "             \
        "int moment, float spacing, int boundary, float noise_scale) -> Tensor");                                     \
  m.def("correlated_penalty_backward(Tensor grad, Tensor means, Tensor factor, Tensor? diag, Tensor p0, Tensor p1, "   \
        "int family, int moment, float spacing, int boundary, float noise_scale) -> (Tensor grad_means, "              \
        "Tensor grad_factor, Tensor grad_diag)")

#define PHYSMDN_OP_IMPLS(m, Backend)                                \
  m.impl("mixture_nll_fwd", TORCH_BOX(&mixture_nll_fwd_impl<Backend>));        \
  m.impl("mixture_nll_bwd", TORCH_BOX(&mixture_nll_bwd_impl<Backend>));        \
  m.impl("mdn_loss_fwd", TORCH_BOX(&mdn_loss_fwd_impl<Backend>));              \
  m.impl("mdn_loss_bwd", TORCH_BOX(&mdn_loss_bwd_impl<Backend>));              \
  m.impl("correlated_penalty", TORCH_BOX(&correlated_penalty_impl<Backend>));  \
  m.impl("correlated_penalty_backward", TORCH_BOX(&correlated_penalty_backward_impl<Backend>))

}  // namespace physmdn

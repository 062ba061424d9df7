// The fused loss on the lanes path (paths.h: lanes_family_path_applies; AVX2 build only): the lane kernel of
// avx2/lanes.h with the family's physics policy (avx2/families.h: polynomial, linear, stencil).
// Compiled once per instruction set (PHYSMDN_CPU_ISA names the namespace); empty in the baseline build.
#include "cpu/mdn_loss_paths.h"

#ifdef PHYSMDN_LANES_PATH
#include "cpu/avx2/families.h"
#include "cpu/avx2/lanes.h"
#include "cpu/dispatch.h"
#include "physics_math.h"
#include "views.h"

namespace physmdn::cpu::PHYSMDN_CPU_ISA {
namespace {

// A float32 gradient output's data, or null (not requested: empty; other dtypes: not the lane kernel's)
float* float_data_or_null(Tensor& t) {
  return t.numel() > 0 && t.scalar_type() == kFloat ? t.mutable_data_ptr<float>() : nullptr;
}

// Calls fn.template operator()<scalar_t>(physics policy) with the call's family policy (families.h) for its
// float32 / bfloat16 / float16 inputs (gp0 / gp1: the family parameters' gradients, or null).
template <typename Fn>
void with_lanes_physics(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                        const Tensor& target, const Tensor& p0, const Tensor& p1,
                        const OptionalTensor& extra, const PhysicsArgs& args, int order, int64_t rows,
                        float* gp0, float* gp1, Fn&& fn) {
  const bool poly = args.family == math::kPolynomial, stencil = args.family == math::kStencil;
  dispatch_float_or_half(means.scalar_type(), [&]<typename scalar_t>() {
    const scalar_t* ex = extra.has_value() ? extra->const_data_ptr<scalar_t>() : nullptr;
    const int64_t ex_sb = extra.has_value() ? extra->stride(0) : 0, ex_sk = extra.has_value() ? extra->stride(1) : 0;
    const float w = static_cast<float>(args.weight), nv = static_cast<float>(args.noise_scale * args.noise_scale);
    if (poly) {
      soa::PolyPhysics<scalar_t> phys;
      phys.c = make_strided<scalar_t>(p0);
      phys.order = order, phys.moment = static_cast<int>(args.moment), phys.couple_weights = args.couple_weights, phys.weight = w, phys.noise_var = nv;
      phys.extra = ex, phys.extra_sb = ex_sb, phys.extra_sk = ex_sk;
      phys.gp0 = gp0, phys.K = means.size(1), phys.D = means.size(2), phys.per_dim = p0.stride(2) != 0;
      fn.template operator()<scalar_t>(phys);
    } else if (stencil) {
      soa::StencilPhysics<scalar_t> phys;
      phys.diffusion = make_strided<scalar_t>(p0), phys.reaction = make_strided<scalar_t>(p1);
      phys.order = order, phys.boundary = static_cast<int>(args.boundary), phys.D = means.size(2);
      phys.moment = static_cast<int>(args.moment), phys.couple_weights = args.couple_weights, phys.weight = w, phys.noise_var = nv;
      phys.inv_h2 = static_cast<float>(1.0 / (args.spacing * args.spacing));
      phys.extra = ex, phys.extra_sb = ex_sb, phys.extra_sk = ex_sk;
      phys.gp0 = gp0, phys.gp1 = gp1, phys.K = means.size(1);
      fn.template operator()<scalar_t>(phys);
    } else {
      soa::LinearPhysics<scalar_t> phys;
      phys.A = make_strided<scalar_t>(p0), phys.b = make_strided<scalar_t>(p1);
      phys.rows = rows, phys.D = means.size(2), phys.moment = static_cast<int>(args.moment), phys.couple_weights = args.couple_weights, phys.weight = w,
      phys.noise_var = nv;
      phys.extra = ex, phys.extra_sb = ex_sb, phys.extra_sk = ex_sk;
      phys.gp0 = gp0, phys.gp1 = gp1;
      phys.setup(means.size(1));
      fn.template operator()<scalar_t>(phys);
    }
  });
}

}  // namespace

void mdn_loss_forward_lanes(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                            const Tensor& target, const Tensor& p0, const Tensor& p1,
                            const OptionalTensor& extra, const PhysicsArgs& args, int order, int64_t rows,
                            Tensor& loss, Tensor& saved) {
  with_lanes_physics(logits, means, log_scales, target, p0, p1, extra, args, order, rows, nullptr, nullptr,
                     [&]<typename scalar_t>(const auto& phys) {
                       soa::run<false, scalar_t>(logits, means, log_scales, target, phys, nullptr, 1.0f,
                                                 loss.mutable_data_ptr<scalar_t>(), saved.mutable_data_ptr<float>(), nullptr, nullptr,
                                                 nullptr, nullptr, nullptr);
                     });
}

void mdn_loss_forward_grad_lanes(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                                 const Tensor& target, const Tensor& p0, const Tensor& p1,
                                 const OptionalTensor& extra, const PhysicsArgs& args, int order,
                                 int64_t rows, Tensor& loss, Tensor& saved, Tensor& grad_logits,
                                 Tensor& grad_means, Tensor& grad_log_scales, Tensor& grad_target,
                                 Tensor& grad_extra, double grad_scale) {
  // one pass for the loss and the gradients
  const bool float_grads = grad_means.scalar_type() == kFloat;
  with_lanes_physics(logits, means, log_scales, target, p0, p1, extra, args, order, rows, nullptr, nullptr,
                     [&]<typename scalar_t>(const auto& phys) {
                       const auto run = [&]<typename grad_t>() {
                         soa::run<true, scalar_t, grad_t>(
                             logits, means, log_scales, target, phys, nullptr, static_cast<float>(grad_scale),
                             loss.mutable_data_ptr<scalar_t>(), saved.mutable_data_ptr<float>(), grad_logits.mutable_data_ptr<grad_t>(),
                             grad_means.mutable_data_ptr<grad_t>(), grad_log_scales.mutable_data_ptr<grad_t>(),
                             grad_target.mutable_data_ptr<grad_t>(),
                             grad_extra.numel() ? grad_extra.mutable_data_ptr<grad_t>() : nullptr);
                       };
                       if (float_grads)
                         run.template operator()<float>();
                       else
                         run.template operator()<scalar_t>();  // the input dtype, no float32 copy
                     });
}

void mdn_loss_backward_lanes(const Tensor& grad_loss, const Tensor& logits, const Tensor& means,
                             const Tensor& log_scales, const Tensor& target, const Tensor& p0,
                             const Tensor& p1, const OptionalTensor& extra, const PhysicsArgs& args,
                             int order, int64_t rows, Tensor& grad_logits, Tensor& grad_means,
                             Tensor& grad_log_scales, Tensor& grad_target, Tensor& grad_p0,
                             Tensor& grad_p1, Tensor& grad_extra) {
  with_lanes_physics(logits, means, log_scales, target, p0, p1, extra, args, order, rows,
                     float_data_or_null(grad_p0), float_data_or_null(grad_p1),
                     [&]<typename scalar_t>(const auto& phys) {
                       soa::run<true, scalar_t>(logits, means, log_scales, target, phys, &grad_loss, 1.0f, nullptr,
                                                nullptr, grad_logits.mutable_data_ptr<float>(), grad_means.mutable_data_ptr<float>(),
                                                grad_log_scales.mutable_data_ptr<float>(), grad_target.mutable_data_ptr<float>(),
                                                grad_extra.numel() ? grad_extra.mutable_data_ptr<float>() : nullptr);
                     });
}

}  // namespace physmdn::cpu::PHYSMDN_CPU_ISA
#endif  // PHYSMDN_LANES_PATH

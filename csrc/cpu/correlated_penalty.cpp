// CPU driver of the physics penalty of correlated components (csrc/mvn_physics_math.h): one (sample, component) pair
// per iteration over torch's thread pool, contiguous means / factor / diag (csrc/op_impl.h makes them so), the family's
// parameters through their strides. Compiled once per instruction set like the other drivers.
#include <algorithm>
#include <cstdint>

#include "cpu/dispatch.h"
#include "cpu/kernels.h"
#include "mvn_physics_math.h"

namespace physmdn::cpu::PHYSMDN_CPU_ISA {

namespace {
// pairs per parallel task: about 16k multiply-adds of the O(D (Q + J^2)) work per pair
int64_t penalty_grain(int64_t D, int64_t Q, int order) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, D * (Q + (order + 1) * (order + 1) + 4)));
}
}  // namespace

void correlated_penalty_forward(const Tensor& means, const Tensor& factor, const OptionalTensor& diag,
                                const Tensor& p0, const Tensor& p1, const PhysicsArgs& args, int order, int64_t rows,
                                Tensor& out) {
  const int64_t B = means.size(0), K = means.size(1), D = means.size(2), Q = factor.size(3);
  PHYSMDN_DISPATCH_FLOATING(means.scalar_type(), "physmdn_correlated_penalty", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto p = make_physics_view<scalar_t>(p0, p1, std::nullopt, args, order, rows);
    const scalar_t *mu = means.const_data_ptr<scalar_t>(), *F = factor.const_data_ptr<scalar_t>();
    const scalar_t* c = diag.has_value() ? diag->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const math::CorrelatedGrads<acc_t> none{nullptr, nullptr, nullptr};
    torch::stable::parallel_for(0, B * K, penalty_grain(D, Q, order), [&](int64_t begin, int64_t end) {
      int64_t b = begin / K, k = begin - b * K;  // (one division per task: per pair it costs more than a small law)
      for (int64_t n = begin; n < end; ++n) {
        const math::CorrelatedComponent<scalar_t> x{mu + n * D, F + n * D * Q, c ? c + n * D : nullptr, D, Q};
        o[n] = static_cast<scalar_t>(math::correlated_penalty<acc_t, false>(x, p, b, k, acc_t(0), none));
        if (++k == K) k = 0, ++b;
      }
    });
  });
}

void correlated_penalty_backward(const Tensor& grad, const Tensor& means, const Tensor& factor,
                                 const OptionalTensor& diag, const Tensor& p0, const Tensor& p1,
                                 const PhysicsArgs& args, int order, int64_t rows, Tensor& grad_means,
                                 Tensor& grad_factor, Tensor& grad_diag) {
  const int64_t B = means.size(0), K = means.size(1), D = means.size(2), Q = factor.size(3);
  PHYSMDN_DISPATCH_FLOATING(means.scalar_type(), "physmdn_correlated_penalty_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto p = make_physics_view<scalar_t>(p0, p1, std::nullopt, args, order, rows);
    const scalar_t *mu = means.const_data_ptr<scalar_t>(), *F = factor.const_data_ptr<scalar_t>();
    const scalar_t* c = diag.has_value() ? diag->const_data_ptr<scalar_t>() : nullptr;
    const acc_t* g = grad.const_data_ptr<acc_t>();
    acc_t *gm = grad_means.mutable_data_ptr<acc_t>(), *gF = grad_factor.mutable_data_ptr<acc_t>();
    acc_t* gc = c ? grad_diag.mutable_data_ptr<acc_t>() : nullptr;
    torch::stable::parallel_for(0, B * K, penalty_grain(D, Q, order), [&](int64_t begin, int64_t end) {
      int64_t b = begin / K, k = begin - b * K;
      for (int64_t n = begin; n < end; ++n) {
        const math::CorrelatedComponent<scalar_t> x{mu + n * D, F + n * D * Q, c ? c + n * D : nullptr, D, Q};
        const math::CorrelatedGrads<acc_t> gr{gm + n * D, gF + n * D * Q, gc ? gc + n * D : nullptr};
        math::correlated_penalty<acc_t, true>(x, p, b, k, g[n], gr);
        if (++k == K) k = 0, ++b;
      }
    });
  });
}

}  // namespace physmdn::cpu::PHYSMDN_CPU_ISA

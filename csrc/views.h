// Host-side glue shared by the CPU and CUDA drivers: tensor -> strided views, and the checks of the fused
// loss's physics arguments.
#pragma once
#include "tensor.h"

#include "checks.h"
#include "physics_math.h"

namespace physmdn {

inline ScalarType acc_dtype(ScalarType t) {
  return (t == kHalf || t == kBFloat16) ? kFloat : t;
}

// value rounded to dtype (what a kernel computing in dtype used, or what a loss of that dtype holds)
inline double rounded(double value, ScalarType dtype) {
  switch (dtype) {
    case kFloat: return static_cast<double>(static_cast<float>(value));
    case kBFloat16: return static_cast<double>(static_cast<float>(BFloat16(static_cast<float>(value))));
    case kHalf: return static_cast<double>(static_cast<float>(Half(static_cast<float>(value))));
    default: return value;
  }
}

template <typename scalar_t>
math::MixtureView<scalar_t> make_mixture_view(const Tensor& logits, const Tensor& means,
                                              const Tensor& log_scales, const Tensor& target) {
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

// Scalar arguments of the fused loss, as the schema passes them.
struct PhysicsArgs {
  int64_t family;
  int64_t moment;       // math::Moment
  bool couple_weights;  // the penalty's gradient reaches the mixture weights
  double weight, spacing;
  int64_t boundary;
  double noise_scale;
};

inline void check_param(const Tensor& t, const char* name, const Tensor& means, std::initializer_list<int64_t> want,
                        const char* layout) {
  PHYSMDN_CHECK(t.dim() == static_cast<int64_t>(want.size()), name, " must be ", layout, ", got shape ", shape(t));
  int64_t i = 0;
  for (auto w : want) {
    PHYSMDN_CHECK(w < 0 || t.size(i) == w, name, " must be ", layout, " expanded to the batch, got shape ", shape(t));
    ++i;
  }
  PHYSMDN_CHECK(t.scalar_type() == means.scalar_type(), name, " must have the dtype of means (", means.scalar_type(),
              "), got ", t.scalar_type());
  PHYSMDN_CHECK(t.device() == means.device(), name, " must be on the device of means (", means.device(), "), got ",
              t.device());
}

// The polynomial order J of a coefficient axis of `count` = J + 1 entries, checked as 64-bit before the narrowing.
inline int checked_order(int64_t count, const char* name) {
  PHYSMDN_CHECK(count >= 1 && count <= math::kMaxOrder + 1, name, " must hold J+1 coefficients with 0 <= J <= ",
              math::kMaxOrder, ", got ", count, " coefficients");
  return static_cast<int>(count - 1);
}

// Validates p0 / p1 / extra for the family; returns (order J, rows M).
inline std::pair<int, int64_t> check_physics_args(const Tensor& means, const Tensor& p0, const Tensor& p1,
                                                  const OptionalTensor& extra, const PhysicsArgs& a) {
  const auto B = means.size(0), K = means.size(1), D = means.size(2);
  int order = 0;
  int64_t rows = 0;
  switch (a.family) {
    case math::kFamilyNone:
      break;
    case math::kPolynomial:
      check_param(p0, "coeffs", means, {B, K, D, -1}, "[B, K, D, J+1]");
      order = checked_order(p0.size(3), "coeffs");
      break;
    case math::kLinear:
      check_param(p0, "A", means, {B, K, -1, D}, "[B, K, M, D]");
      rows = p0.size(2);
      check_param(p1, "b", means, {B, K, rows}, "[B, K, M]");
      break;
    case math::kStencil:
      check_param(p0, "diffusion", means, {B, K}, "[B, K]");
      check_param(p1, "reaction", means, {B, K, -1}, "[B, K, J+1]");
      order = checked_order(p1.size(2), "reaction");
      PHYSMDN_CHECK(a.spacing > 0.0, "spacing must be > 0, got ", a.spacing);
      PHYSMDN_CHECK(a.boundary == math::kPeriodic || a.boundary == math::kNeumann,
                  "boundary must be 0 (periodic) or 1 (neumann), got ", a.boundary);
      break;
    default:
      PHYSMDN_CHECK(false, "family must be -1 (none), 0 (polynomial), 1 (linear) or 2 (stencil), got ", a.family);
  }
  PHYSMDN_CHECK(a.moment == math::kPoint || a.moment == math::kFirst || a.moment == math::kSecond,
              "moment must be 0 (point), 1 (first) or 2 (second), got ", a.moment);
  PHYSMDN_CHECK(a.noise_scale >= 0.0, "noise_scale must be >= 0, got ", a.noise_scale);
  if (extra.has_value()) check_param(*extra, "extra", means, {B, K}, "[B, K]");
  return {order, rows};
}

template <typename scalar_t>
math::Strided4<scalar_t> make_strided(const Tensor& t) {
  math::Strided4<scalar_t> s;
  if (!t.defined() || t.numel() == 0) return s;
  s.data = t.const_data_ptr<scalar_t>();
  int64_t* strides[4] = {&s.s0, &s.s1, &s.s2, &s.s3};
  for (int64_t i = 0; i < t.dim() && i < 4; ++i) *strides[i] = t.stride(i);
  return s;
}

template <typename scalar_t>
math::PhysicsView<scalar_t> make_physics_view(const Tensor& p0, const Tensor& p1,
                                              const OptionalTensor& extra, const PhysicsArgs& a, int order,
                                              int64_t rows) {
  math::PhysicsView<scalar_t> p;
  p.family = static_cast<int>(a.family);
  p.moment = static_cast<int>(a.moment);
  p.couple_weights = a.couple_weights;
  p.order = order;
  p.rows = rows;
  p.boundary = static_cast<int>(a.boundary);
  p.weight = a.weight;
  p.inv_h2 = 1.0 / (a.spacing * a.spacing);
  p.noise_var = a.noise_scale * a.noise_scale;
  if (a.family != math::kFamilyNone) {
    p.p0 = make_strided<scalar_t>(p0);
    p.p1 = make_strided<scalar_t>(p1);
  }
  if (extra.has_value()) {
    p.extra = extra->const_data_ptr<scalar_t>();
    p.extra_sb = extra->stride(0);
    p.extra_sk = extra->stride(1);
  }
  return p;
}

}  // namespace physmdn

// Per-sample math of the mixture negative log-likelihood, written once for the CPU driver
// (csrc/cpu/*.cpp) and the CUDA kernels (csrc/cuda/device_kernels.cuh).
//
//   loss_b = -log sum_k softmax(logits_b)_k N(target_b | means_bk, diag(exp(log_scales_bk))^2)
//          = -LSE_k(log pi_bk + log N_bk),  log pi_bk = logits_bk - LSE_j(logits_bj)
//   log N_bk = sum_d [-z^2/2 - log_scale_bkd] - D log(2 pi)/2,  z = (y_d - mu_bkd) exp(-log_scale_bkd)
//
// Gradients (gamma = responsibilities, pi = softmax(logits), g = upstream gradient):
//   dL/dlogit_k = g (pi_k - gamma_k)
//   dL/dmu_kd   = -g gamma_k z / s,   dL/dlog_s_kd = -g gamma_k (z^2 - 1),   dL/dy_d = -sum_k dL/dmu_kd
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define PHYSMDN_HD __host__ __device__ __forceinline__
#else
#define PHYSMDN_HD inline
#endif

namespace physmdn::math {

// Per-sample state the forward saves for backward (see mixture_nll_sample).
constexpr int kSavedPerSample = 3;
constexpr double kHalfLog2Pi = 0.91893853320467274178032973640562;

PHYSMDN_HD float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);  // full-precision expf: __expf loses accuracy for large |x|
#else
  return std::exp(x);
#endif
}
PHYSMDN_HD double exp_(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
PHYSMDN_HD float log_(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return std::log(x);
#endif
}
PHYSMDN_HD double log_(double x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}
PHYSMDN_HD float sqrt_(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}
PHYSMDN_HD double sqrt_(double x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// Online log-sum-exp accumulator: one pass, robust to -inf terms and +-1e4 logits; NaN propagates.
template <typename acc_t>
struct OnlineLSE {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  acc_t sum = acc_t(0);
  PHYSMDN_HD void add(acc_t a) {
    if (a > max) {
      // rescale what we had; exp(-inf) = 0 when max was still -inf
      sum = sum * exp_(max - a) + acc_t(1);
      max = a;
    } else if (a == -std::numeric_limits<acc_t>::infinity()) {
      // contributes exp(-inf) = 0
    } else {
      sum += exp_(a - max);  // NaN a lands here and poisons the sum
    }
  }
  PHYSMDN_HD acc_t value() const {
    // all terms -inf: -inf; all NaN: the NaN the sum carries
    if (max == -std::numeric_limits<acc_t>::infinity()) return sum != sum ? sum : max;
    return max + log_(sum);
  }
};

// Strided view of one batch of mixtures. Strides are in elements; stride 0 (expanded) is fine.
template <typename scalar_t>
struct MixtureView {
  const scalar_t* logits;
  const scalar_t* means;
  const scalar_t* log_scales;
  const scalar_t* target;
  int64_t logits_sb, logits_sk;
  int64_t means_sb, means_sk, means_sd;
  int64_t scales_sb, scales_sk, scales_sd;
  int64_t target_sb, target_sd;
  int64_t K, D;
};

// log N(y | mu_k, diag(s_k^2)) for sample b, component k.
template <typename acc_t, typename scalar_t>
PHYSMDN_HD acc_t component_log_density(const MixtureView<scalar_t>& v, int64_t b, int64_t k) {
  const scalar_t* mu = v.means + b * v.means_sb + k * v.means_sk;
  const scalar_t* ls = v.log_scales + b * v.scales_sb + k * v.scales_sk;
  const scalar_t* y = v.target + b * v.target_sb;
  acc_t acc = acc_t(0);
  for (int64_t d = 0; d < v.D; ++d) {
    const acc_t log_s = static_cast<acc_t>(ls[d * v.scales_sd]);
    const acc_t z = (static_cast<acc_t>(y[d * v.target_sd]) - static_cast<acc_t>(mu[d * v.means_sd])) * exp_(-log_s);
    acc += acc_t(-0.5) * z * z - log_s;
  }
  return acc - static_cast<acc_t>(v.D) * static_cast<acc_t>(kHalfLog2Pi);
}

// Log mixture weights are formed as (logit - max_logit) - log(sum_j exp(logit_j - max_logit)): with logits
// near +-1e4 both differences are exact in float32, whereas logit + log N or logit - LSE would round to the
// logits' ulp (~1e-3).
template <typename acc_t, typename scalar_t>
PHYSMDN_HD void logits_norm(const MixtureView<scalar_t>& v, int64_t b, acc_t* max_logit, acc_t* log_sum) {
  OnlineLSE<acc_t> prior;
  const scalar_t* lg = v.logits + b * v.logits_sb;
  for (int64_t k = 0; k < v.K; ++k) prior.add(static_cast<acc_t>(lg[k * v.logits_sk]));
  *max_logit = prior.max;
  *log_sum = log_(prior.sum);
}

// Forward for one sample: returns the loss and writes the saved state for backward:
// saved[0] = max logit, saved[1] = log sum exp(logit - max), saved[2] = LSE_k(log pi_k + log N_k) (= -loss).
template <typename acc_t, typename scalar_t>
PHYSMDN_HD acc_t mixture_nll_sample(const MixtureView<scalar_t>& v, int64_t b, acc_t* saved) {
  logits_norm<acc_t>(v, b, saved, saved + 1);
  OnlineLSE<acc_t> joint;
  const scalar_t* lg = v.logits + b * v.logits_sb;
  for (int64_t k = 0; k < v.K; ++k) {
    const acc_t log_pi = (static_cast<acc_t>(lg[k * v.logits_sk]) - saved[0]) - saved[1];
    joint.add(log_pi + component_log_density<acc_t>(v, b, k));
  }
  saved[2] = joint.value();
  return -saved[2];
}

// Backward for one sample. Gradients are written in acc_t (the op casts reduced dtypes afterwards) to
// contiguous grad_logits [K], grad_means / grad_log_scales [K, D], grad_target [D].
// `g` is the upstream gradient of this sample's loss.
template <typename acc_t, typename scalar_t>
PHYSMDN_HD void mixture_nll_sample_backward(const MixtureView<scalar_t>& v, int64_t b, acc_t g, const acc_t* saved,
                                            acc_t* grad_logits, acc_t* grad_means,
                                            acc_t* grad_log_scales, acc_t* grad_target) {
  const scalar_t* lg = v.logits + b * v.logits_sb;
  const scalar_t* y = v.target + b * v.target_sb;
  for (int64_t d = 0; d < v.D; ++d) grad_target[d] = acc_t(0);
  for (int64_t k = 0; k < v.K; ++k) {
    const acc_t log_pi = (static_cast<acc_t>(lg[k * v.logits_sk]) - saved[0]) - saved[1];
    const acc_t log_n = component_log_density<acc_t>(v, b, k);
    const acc_t gamma = exp_(log_pi + log_n - saved[2]);
    const acc_t pi = exp_(log_pi);
    grad_logits[k] = g * (pi - gamma);
    const acc_t c = -g * gamma;
    const scalar_t* mu = v.means + b * v.means_sb + k * v.means_sk;
    const scalar_t* ls = v.log_scales + b * v.scales_sb + k * v.scales_sk;
    acc_t* gm = grad_means + k * v.D;
    acc_t* gs = grad_log_scales + k * v.D;
    if (gamma == acc_t(0)) {
      // A component with no responsibility gets no gradient (avoids 0 * inf for far-away targets).
      for (int64_t d = 0; d < v.D; ++d) gm[d] = gs[d] = acc_t(0);
      continue;
    }
    for (int64_t d = 0; d < v.D; ++d) {
      const acc_t inv_s = exp_(-static_cast<acc_t>(ls[d * v.scales_sd]));
      const acc_t z = (static_cast<acc_t>(y[d * v.target_sd]) - static_cast<acc_t>(mu[d * v.means_sd])) * inv_s;
      gm[d] = c * z * inv_s;
      gs[d] = c * (z * z - acc_t(1));
      grad_target[d] -= gm[d];
    }
  }
}

}  // namespace physmdn::math

// Per-sample math of the mixture NLL with full-covariance components, from each component's Cholesky factor L
// (lower triangular, positive diagonal), written once for the CPU driver (csrc/cpu/mixture_nll_tril.cpp) and CUDA.
//
//   z_k = L_k^-1 (y - mu_k)                    (forward substitution)
//   log N_k = -|z_k|^2 / 2 - sum_i log L_kii - D log(2 pi) / 2
//   loss = -LSE_k(log softmax(logits)_k + log N_k),   r_k = responsibilities
//
// Gradients (g the upstream gradient, v_k = L_k^-T z_k = Sigma_k^-1 (y - mu_k), backward substitution):
//   dloss/dlogits_k = g (softmax_k - r_k),  dloss/dmu_k = -g r_k v_k,  dloss/dy = g sum_k r_k v_k,
//   dloss/dL_k = -g r_k tril(v_k z_k^T - diag(1 / L_kii))
// A non-positive diagonal entry gives NaN (log of it), for that sample only (python/physmdn/_mixture_correlated.py).
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#include "mixture_math.h"

namespace physmdn::math {

constexpr int kMaxTrilDim = 32;  // local arrays per sample (python/physmdn/_mixture_correlated.py MAX_TRIL_DIM)

template <typename acc_t>
PHYSMDN_HD acc_t log_positive(acc_t x) {
  return x > acc_t(0) ? log_(x) : std::numeric_limits<acc_t>::quiet_NaN();
}

// log-sum-exp of x[0..n) with the max as shift (0 when every term is -inf, so that the result is -inf, not NaN)
template <typename acc_t>
PHYSMDN_HD acc_t lse(const acc_t* x, int n) {
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  for (int i = 0; i < n; ++i) mx = x[i] > mx ? x[i] : mx;
  if (mx != mx) return mx;
  const acc_t shift = mx == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : mx;
  acc_t s = acc_t(0);
  for (int i = 0; i < n; ++i) s += exp_(x[i] - shift);
  return shift + log_(s);
}

// One sample, contiguous rows: logits [K], means [K, D], L [K, D, D], y [D]. Writes z [K, D] and the
// responsibilities r [K] (accumulation dtype); returns the loss. lw: scratch [K] (the log mixture weights).
template <typename scalar_t, typename acc_t>
PHYSMDN_HD acc_t tril_nll_sample(const scalar_t* logits, const scalar_t* means, const scalar_t* L, const scalar_t* y,
                                 int K, int D, acc_t* z, acc_t* r, acc_t* lw) {
  for (int k = 0; k < K; ++k) lw[k] = static_cast<acc_t>(logits[k]);
  const acc_t logit_lse = lse(lw, K);
  for (int k = 0; k < K; ++k) {
    const scalar_t* Lk = L + static_cast<int64_t>(k) * D * D;
    acc_t* zk = z + k * D;
    acc_t sumsq = acc_t(0), logdet = acc_t(0);
    for (int i = 0; i < D; ++i) {
      acc_t acc = static_cast<acc_t>(y[i]) - static_cast<acc_t>(means[k * D + i]);
      for (int j = 0; j < i; ++j) acc -= static_cast<acc_t>(Lk[i * D + j]) * zk[j];
      const acc_t diag = static_cast<acc_t>(Lk[i * D + i]);
      zk[i] = acc / diag;
      sumsq += zk[i] * zk[i];
      logdet += log_positive(diag);
    }
    r[k] = (lw[k] - logit_lse) - acc_t(0.5) * sumsq - logdet - static_cast<acc_t>(D * kHalfLog2Pi);
  }
  const acc_t log_p = lse(r, K);
  for (int k = 0; k < K; ++k) r[k] = exp_(r[k] - log_p);
  return -log_p;
}

// The gradients of one sample for upstream gradient g (outputs in the input dtype, contiguous rows): grad_logits [K],
// grad_means [K, D], grad_L [K, D, D] (zero above the diagonal), grad_y [D]. z, r as tril_nll_sample wrote them.
template <typename scalar_t, typename acc_t>
PHYSMDN_HD void tril_nll_backward_sample(acc_t g, const scalar_t* logits, const scalar_t* L, const acc_t* z,
                                         const acc_t* r, int K, int D, scalar_t* grad_logits, scalar_t* grad_means,
                                         scalar_t* grad_L, scalar_t* grad_y) {
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  for (int k = 0; k < K; ++k) {
    const acc_t l = static_cast<acc_t>(logits[k]);
    mx = l > mx ? l : mx;
  }
  const acc_t shift = mx == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : mx;
  acc_t total = acc_t(0);
  for (int k = 0; k < K; ++k) total += exp_(static_cast<acc_t>(logits[k]) - shift);
  acc_t gy[kMaxTrilDim], v[kMaxTrilDim];
  for (int d = 0; d < D; ++d) gy[d] = acc_t(0);
  for (int k = 0; k < K; ++k) {
    const acc_t gr = g * r[k];
    grad_logits[k] = static_cast<scalar_t>(g * (exp_(static_cast<acc_t>(logits[k]) - shift) / total) - gr);
    const scalar_t* Lk = L + static_cast<int64_t>(k) * D * D;
    const acc_t* zk = z + k * D;
    for (int i = D - 1; i >= 0; --i) {
      acc_t acc = zk[i];
      for (int j = i + 1; j < D; ++j) acc -= static_cast<acc_t>(Lk[j * D + i]) * v[j];
      v[i] = acc / static_cast<acc_t>(Lk[i * D + i]);
    }
    scalar_t* gLk = grad_L + static_cast<int64_t>(k) * D * D;
    for (int i = 0; i < D; ++i) {
      grad_means[k * D + i] = static_cast<scalar_t>(-gr * v[i]);
      gy[i] += gr * v[i];
      for (int j = 0; j < i; ++j) gLk[i * D + j] = static_cast<scalar_t>(-gr * v[i] * zk[j]);
      gLk[i * D + i] = static_cast<scalar_t>(-gr * (v[i] * zk[i] - acc_t(1) / static_cast<acc_t>(Lk[i * D + i])));
      for (int j = i + 1; j < D; ++j) gLk[i * D + j] = static_cast<scalar_t>(0);
    }
  }
  for (int d = 0; d < D; ++d) grad_y[d] = static_cast<scalar_t>(gy[d]);
}

}  // namespace physmdn::math

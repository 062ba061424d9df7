// Per-sample math of the mixture NLL with correlated components, written once for the CPU drivers
// (csrc/cpu/mixture_nll_tril.cpp, mixture_nll_lowrank.cpp) and CUDA. Full covariance, from each component's Cholesky
// factor L (lower triangular, positive diagonal):
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

// The softmax of logits [K] as exp(logits_k - shift) / total: the max as shift (0 when every logit is -inf).
template <typename scalar_t, typename acc_t>
PHYSMDN_HD void softmax_normalizer(const scalar_t* logits, int K, acc_t& shift, acc_t& total) {
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  for (int k = 0; k < K; ++k) {
    const acc_t l = static_cast<acc_t>(logits[k]);
    mx = l > mx ? l : mx;
  }
  shift = mx == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : mx;
  total = acc_t(0);
  for (int k = 0; k < K; ++k) total += exp_(static_cast<acc_t>(logits[k]) - shift);
}

// One sample, contiguous rows: logits [K], means [K, D], L [K, D, D], y [D]. Writes z [K, D] and the
// responsibilities r [K] (accumulation dtype); returns the loss. lw: scratch [K] (the log mixture weights); it may be
// r itself (lw[k] is read before r[k] is written; the CUDA kernels pass r, so that K needs no local array).
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
  acc_t shift, total;
  softmax_normalizer<scalar_t, acc_t>(logits, K, shift, total);
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


// ----- low rank plus diagonal: Sigma_k = W_k W_k^T + diag(d_k), W_k [D, R] ---------------------------------------
// Woodbury and the matrix determinant lemma, O(D R^2 + R^3) per component, local arrays bounded by R only (D is not):
//   C_k = I_R + W_k^T D_k^-1 W_k = L_C L_C^T,   t = W_k^T D_k^-1 delta,   s = L_C^-1 t,   u = L_C^-T s = C_k^-1 t
//   delta^T Sigma^-1 delta = delta^T D^-1 delta - |s|^2,   log det Sigma = log det C + sum_i log d_i
//   v_k = Sigma_k^-1 delta = D^-1 (delta - W_k u)
// Gradients (P_k = Sigma_k^-1 W_k = D^-1 W_k C_k^-1, diag Sigma_k^-1 = (1 - rowsum(P_k * W_k)) / d_k):
//   dloss/dW_k = -g r_k (v_k (W_k^T v_k)^T - P_k),   dloss/dd_k = -g r_k (v_k^2 - diag Sigma_k^-1) / 2,
//   logits, means and target as for tril (with v_k). A non-positive d_ki (or pivot of C_k) gives NaN for that sample.

constexpr int kMaxRank = 8;  // local arrays per component (python/physmdn/_mixture_correlated.py MAX_RANK)

// One sample, contiguous rows: logits [K], means [K, D], W [K, D, R], d [K, D], y [D]. Writes v = Sigma^-1 delta
// [K, D], the responsibilities r [K] and the Cholesky factors of the capacitance matrices chol [K, R, R] (zero above
// the diagonal), all in the accumulation dtype; returns the loss. lw: scratch [K] (the log mixture weights); it may be
// r itself, as in tril_nll_sample.
template <typename scalar_t, typename acc_t>
PHYSMDN_HD acc_t lowrank_nll_sample(const scalar_t* logits, const scalar_t* means, const scalar_t* W,
                                    const scalar_t* d, const scalar_t* y, int K, int D, int R, acc_t* v, acc_t* r,
                                    acc_t* chol, acc_t* lw) {
  for (int k = 0; k < K; ++k) lw[k] = static_cast<acc_t>(logits[k]);
  const acc_t logit_lse = lse(lw, K);
  for (int k = 0; k < K; ++k) {
    const scalar_t* Wk = W + static_cast<int64_t>(k) * D * R;
    const scalar_t* dk = d + static_cast<int64_t>(k) * D;
    const scalar_t* mk = means + static_cast<int64_t>(k) * D;
    acc_t* vk = v + static_cast<int64_t>(k) * D;
    acc_t* Lc = chol + k * R * R;
    acc_t C[kMaxRank * kMaxRank], t[kMaxRank], s[kMaxRank];
    for (int a = 0; a < R; ++a) {
      t[a] = acc_t(0);
      for (int b = 0; b <= a; ++b) C[a * R + b] = a == b ? acc_t(1) : acc_t(0);
    }
    acc_t mahalanobis = acc_t(0), logdet = acc_t(0);
    for (int i = 0; i < D; ++i) {
      const acc_t di = static_cast<acc_t>(dk[i]), inv = acc_t(1) / di;
      const acc_t delta = static_cast<acc_t>(y[i]) - static_cast<acc_t>(mk[i]);
      vk[i] = delta * inv;  // D^-1 delta; the W u part follows once u is known
      mahalanobis += delta * vk[i];
      logdet += log_positive(di);
      const scalar_t* Wi = Wk + static_cast<int64_t>(i) * R;
      for (int a = 0; a < R; ++a) {
        const acc_t scaled = static_cast<acc_t>(Wi[a]) * inv;
        t[a] += scaled * delta;
        for (int b = 0; b <= a; ++b) C[a * R + b] += scaled * static_cast<acc_t>(Wi[b]);
      }
    }
    // Cholesky of C (log det C = sum of the log pivots L_aa^2)
    for (int a = 0; a < R; ++a) {
      for (int b = 0; b <= a; ++b) {
        acc_t acc = C[a * R + b];
        for (int c = 0; c < b; ++c) acc -= Lc[a * R + c] * Lc[b * R + c];
        if (a == b) {
          logdet += log_positive(acc);
          Lc[a * R + a] = sqrt_(acc);
        } else {
          Lc[a * R + b] = acc / Lc[b * R + b];
        }
      }
      for (int b = a + 1; b < R; ++b) Lc[a * R + b] = acc_t(0);
    }
    for (int a = 0; a < R; ++a) {  // s = L_C^-1 t
      acc_t acc = t[a];
      for (int c = 0; c < a; ++c) acc -= Lc[a * R + c] * s[c];
      s[a] = acc / Lc[a * R + a];
      mahalanobis -= s[a] * s[a];
    }
    for (int a = R - 1; a >= 0; --a) {  // u = L_C^-T s (in t)
      acc_t acc = s[a];
      for (int c = a + 1; c < R; ++c) acc -= Lc[c * R + a] * t[c];
      t[a] = acc / Lc[a * R + a];
    }
    for (int i = 0; i < D; ++i) {
      const scalar_t* Wi = Wk + static_cast<int64_t>(i) * R;
      acc_t wu = acc_t(0);
      for (int a = 0; a < R; ++a) wu += static_cast<acc_t>(Wi[a]) * t[a];
      vk[i] -= wu / static_cast<acc_t>(dk[i]);
    }
    r[k] = (lw[k] - logit_lse) - acc_t(0.5) * (mahalanobis + logdet) - static_cast<acc_t>(D * kHalfLog2Pi);
  }
  const acc_t log_p = lse(r, K);
  for (int k = 0; k < K; ++k) r[k] = exp_(r[k] - log_p);
  return -log_p;
}

// The gradients of one sample for upstream gradient g (outputs in the input dtype, contiguous rows): grad_logits [K],
// grad_means [K, D], grad_W [K, D, R], grad_d [K, D], grad_y [D]. v, r, chol as lowrank_nll_sample wrote them.
template <typename scalar_t, typename acc_t>
PHYSMDN_HD void lowrank_nll_backward_sample(acc_t g, const scalar_t* logits, const scalar_t* W, const scalar_t* d,
                                            const acc_t* v, const acc_t* r, const acc_t* chol, int K, int D, int R,
                                            scalar_t* grad_logits, scalar_t* grad_means, scalar_t* grad_W,
                                            scalar_t* grad_d, scalar_t* grad_y) {
  acc_t shift, total;
  softmax_normalizer<scalar_t, acc_t>(logits, K, shift, total);
  for (int k = 0; k < K; ++k) {
    const acc_t gr = g * r[k];
    grad_logits[k] = static_cast<scalar_t>(g * (exp_(static_cast<acc_t>(logits[k]) - shift) / total) - gr);
    const scalar_t* Wk = W + static_cast<int64_t>(k) * D * R;
    const scalar_t* dk = d + static_cast<int64_t>(k) * D;
    const acc_t* vk = v + static_cast<int64_t>(k) * D;
    const acc_t* Lc = chol + k * R * R;
    // C^-1 = L_C^-T L_C^-1 from the lower-triangular inverse Li
    acc_t Li[kMaxRank * kMaxRank], Ci[kMaxRank * kMaxRank], wv[kMaxRank];
    for (int a = 0; a < R; ++a) {
      const acc_t inv = acc_t(1) / Lc[a * R + a];
      Li[a * R + a] = inv;
      for (int b = 0; b < a; ++b) {
        acc_t acc = acc_t(0);
        for (int c = b; c < a; ++c) acc += Lc[a * R + c] * Li[c * R + b];
        Li[a * R + b] = -acc * inv;
      }
    }
    for (int a = 0; a < R; ++a)
      for (int b = 0; b <= a; ++b) {
        acc_t acc = acc_t(0);
        for (int c = a; c < R; ++c) acc += Li[c * R + a] * Li[c * R + b];
        Ci[a * R + b] = acc;
        Ci[b * R + a] = acc;
      }
    for (int a = 0; a < R; ++a) wv[a] = acc_t(0);  // W^T v
    for (int i = 0; i < D; ++i)
      for (int a = 0; a < R; ++a) wv[a] += static_cast<acc_t>(Wk[static_cast<int64_t>(i) * R + a]) * vk[i];
    scalar_t* gWk = grad_W + static_cast<int64_t>(k) * D * R;
    for (int i = 0; i < D; ++i) {
      const scalar_t* Wi = Wk + static_cast<int64_t>(i) * R;
      const acc_t inv = acc_t(1) / static_cast<acc_t>(dk[i]), vi = vk[i];
      acc_t row_dot = acc_t(0);  // (W C^-1 W^T)_ii / d_i
      for (int a = 0; a < R; ++a) {
        acc_t acc = acc_t(0);
        for (int b = 0; b < R; ++b) acc += static_cast<acc_t>(Wi[b]) * Ci[b * R + a];
        const acc_t p = acc * inv;  // (Sigma^-1 W)_ia
        row_dot += p * static_cast<acc_t>(Wi[a]);
        gWk[static_cast<int64_t>(i) * R + a] = static_cast<scalar_t>(gr * (p - vi * wv[a]));
      }
      grad_d[static_cast<int64_t>(k) * D + i] =
          static_cast<scalar_t>(acc_t(-0.5) * gr * (vi * vi - (acc_t(1) - row_dot) * inv));
      grad_means[static_cast<int64_t>(k) * D + i] = static_cast<scalar_t>(-gr * vi);
    }
  }
  for (int i = 0; i < D; ++i) {
    acc_t acc = acc_t(0);
    for (int k = 0; k < K; ++k) acc += g * r[k] * v[static_cast<int64_t>(k) * D + i];
    grad_y[i] = static_cast<scalar_t>(acc);
  }
}

}  // namespace physmdn::math

// The blocked paths' building blocks (paths.h: blocked float, blocked double, blocked family). Contiguous inputs
// run in blocks of kBlockSamples samples: the per-element work of a block (exp(-log_scale), z, the Gaussian exponent)
// as one flat vector loop (at::vec: AVX2 + Sleef exp in the AVX2 build), the per-component reductions and the
// log-sum-exp over K scalar. bfloat16 / float16 are converted per block and accumulate in float32; float64 runs in
// float64. The math is mixture_math.h's; the tests run every path against the reference.
#pragma once
#include "cpu/vec.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "mixture_math.h"

#ifndef PHYSMDN_CPU_ISA
#error "PHYSMDN_CPU_ISA must name the instruction set this file is compiled for"
#endif

namespace physmdn::cpu::PHYSMDN_CPU_ISA {

template <typename scalar_t>
using block_acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
constexpr int64_t kBlockSamples = 64;  // samples per block (block buffers stay in L1/L2)

// Small D is a compile-time constant (kD > 0) so the loops over d unroll; kD = 0 reads D at run time.
#define PHYSMDN_DIM(D) (kD > 0 ? static_cast<int64_t>(kD) : (D))

// y broadcast over components: ybuf[i, k, d] = y[i, d] for the block's samples.
template <int kD, typename T>
void fill_target_block(const T* y, int64_t nb, int64_t K, int64_t D_, T* ybuf) {
  const int64_t D = PHYSMDN_DIM(D_);
  for (int64_t i = 0; i < nb; ++i)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t d = 0; d < D; ++d) ybuf[(i * K + k) * D + d] = y[i * D + d];
}

// q = -z^2/2 - log_scale, z = (y - mu) exp(-log_scale); with kGrad also zs = z / s and z2m1 = z^2 - 1.
template <bool kGrad, typename T>
void gaussian_terms(const T* mu, const T* ls, const T* yb, int64_t n, T* q, std::type_identity_t<T>* zs,
                    std::type_identity_t<T>* z2m1) {
  using V = Vec<T>;
  int64_t e = 0;
  const V half(T(-0.5)), one(T(1));
  for (; e + V::size() <= n; e += V::size()) {
    const V l = V::loadu(ls + e);
    const V inv = l.neg().exp();
    const V z = (V::loadu(yb + e) - V::loadu(mu + e)) * inv;
    const V zz = z * z;
    fmadd(half, zz, l.neg()).store(q + e);
    if constexpr (kGrad) {
      (z * inv).store(zs + e);
      (zz - one).store(z2m1 + e);
    }
  }
  for (; e < n; ++e) {
    const T inv = std::exp(-ls[e]);
    const T z = (yb[e] - mu[e]) * inv;
    q[e] = T(-0.5) * z * z - ls[e];
    if constexpr (kGrad) {
      zs[e] = z * inv;
      z2m1[e] = z * z - T(1);
    }
  }
}

// out = exp(in) / log(in), elementwise, vectorized.
template <typename T>
void vec_exp(const T* in, T* out, int64_t n) {
  using V = Vec<T>;
  int64_t e = 0;
  for (; e + V::size() <= n; e += V::size()) V::loadu(in + e).exp().store(out + e);
  for (; e < n; ++e) out[e] = std::exp(in[e]);
}
template <typename T>
void vec_log(const T* in, T* out, int64_t n) {
  using V = Vec<T>;
  int64_t e = 0;
  for (; e + V::size() <= n; e += V::size()) V::loadu(in + e).log().store(out + e);
  for (; e < n; ++e) out[e] = std::log(in[e]);
}

// Row-wise log-sum-exp of x [n, K] for a block of rows: shift[i] = max_k x[i, k] (0 when the row is all -inf,
// so that -inf rows give -inf and NaN rows NaN) and log_sum[i] = log sum_k exp(x[i, k] - shift[i]); the LSE is
// shift + log_sum (kept apart: with logits near 1e4 the sum would round log_sum to the shift's ulp).
// On return tmp [n, K] holds exp(x - shift) and sum [n] its row sums.
template <typename T>
void block_lse(const T* x, int64_t n, int64_t K, T* shift, T* sum, T* log_sum, T* tmp) {
  for (int64_t i = 0; i < n; ++i) {
    T mx = -std::numeric_limits<T>::infinity();
    for (int64_t k = 0; k < K; ++k) mx = x[i * K + k] > mx ? x[i * K + k] : mx;
    shift[i] = mx == -std::numeric_limits<T>::infinity() ? T(0) : mx;
    for (int64_t k = 0; k < K; ++k) tmp[i * K + k] = x[i * K + k] - shift[i];
  }
  vec_exp(tmp, tmp, n * K);
  for (int64_t i = 0; i < n; ++i) {
    T acc = T(0);
    for (int64_t k = 0; k < K; ++k) acc += tmp[i * K + k];
    sum[i] = acc;
  }
  vec_log(sum, log_sum, n);
}

// Per (sample, component): log N = sum_d q - D log(2 pi) / 2.
template <int kD, typename T>
void component_log_densities(const T* q, int64_t nk, int64_t D_, T* log_n) {
  const int64_t D = PHYSMDN_DIM(D_);
  const T offset = static_cast<T>(D) * static_cast<T>(math::kHalfLog2Pi);
  for (int64_t r = 0; r < nk; ++r) {
    T acc = T(0);
    for (int64_t d = 0; d < D; ++d) acc += q[r * D + d];
    log_n[r] = acc - offset;
  }
}

// The block's inputs in the accumulation type: float32 and float64 tensors are read in place, bfloat16 / float16
// ones are converted into block buffers first (float32 accumulation).
template <typename scalar_t>
struct BlockInput {
  using acc_t = block_acc_t<scalar_t>;
  std::vector<acc_t> mu_buf, ls_buf, lg_buf, y_buf;
  const acc_t *mu = nullptr, *ls = nullptr, *lg = nullptr, *y = nullptr;
  BlockInput(int64_t K, int64_t D) {
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      mu_buf.resize(kBlockSamples * K * D);
      ls_buf.resize(kBlockSamples * K * D);
      lg_buf.resize(kBlockSamples * K);
      y_buf.resize(kBlockSamples * D);
    }
  }
  static const acc_t* load(const scalar_t* src, int64_t n, std::vector<acc_t>& buf) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return src;
    } else {
      for (int64_t e = 0; e < n; ++e) buf[e] = static_cast<acc_t>(src[e]);
      return buf.data();
    }
  }
  void load_block(const scalar_t* mu_all, const scalar_t* ls_all, const scalar_t* lg_all, const scalar_t* y_all,
                  int64_t b0, int64_t nb, int64_t K, int64_t D) {
    mu = load(mu_all + b0 * K * D, nb * K * D, mu_buf);
    ls = load(ls_all + b0 * K * D, nb * K * D, ls_buf);
    lg = load(lg_all + b0 * K, nb * K, lg_buf);
    y = load(y_all + b0 * D, nb * D, y_buf);
  }
};

// Block buffers of the blocked paths, one set per parallel task.
template <typename T>
struct BlockBuffers {
  std::vector<T> ybuf, q, log_pi, joint, tmp, prior, shift, sum, lse;
  BlockBuffers(int64_t K, int64_t D)
      : ybuf(kBlockSamples * K * D), q(kBlockSamples * K * D), log_pi(kBlockSamples * K), joint(kBlockSamples * K),
        tmp(kBlockSamples * K), prior(kBlockSamples * K), shift(kBlockSamples), sum(kBlockSamples), lse(kBlockSamples) {}
};

// Scales the unscaled (g = 1) gradient rows of sample b: gamma / pi are the component responsibilities and
// weights, gm / gs hold z / s and z^2 - 1 on entry. Writes grad_logits, finishes grad_means / grad_log_scales
// and grad_target.
template <int kD, typename T>
inline void finish_sample_grads(int64_t K, int64_t D_, T g, const T* gamma, const T* pi, T* gl, T* gm, T* gs, T* gt) {
  const int64_t D = PHYSMDN_DIM(D_);
  for (int64_t d = 0; d < D; ++d) gt[d] = T(0);
  for (int64_t k = 0; k < K; ++k) {
    gl[k] = g * (pi[k] - gamma[k]);
    T* gm_row = gm + k * D;
    T* gs_row = gs + k * D;
    if (gamma[k] == T(0)) {  // no responsibility, no gradient (avoids 0 * inf)
      for (int64_t d = 0; d < D; ++d) gm_row[d] = gs_row[d] = T(0);
      continue;
    }
    const T c = -g * gamma[k];
    for (int64_t d = 0; d < D; ++d) {
      gm_row[d] *= c;
      gs_row[d] *= c;
      gt[d] -= gm_row[d];
    }
  }
}

}  // namespace physmdn::cpu::PHYSMDN_CPU_ISA

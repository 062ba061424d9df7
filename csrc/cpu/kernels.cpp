// CPU drivers: thin loops over the per-sample math of mixture_math.h / physics_math.h, parallel over the
// batch. Compiled once per instruction set (PHYSMDN_CPU_ISA names the namespace).
#include "cpu/kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <vector>

#include "mixture_math.h"
#include "physics_math.h"
#include "views.h"

#if defined(__AVX2__) && defined(__FMA__)
#define PHYSMDN_SOA_KERNELS 1
#include "cpu/soa_avx2.h"
#endif

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


// ----- fast path (float32, bfloat16, float16; float64) ----------------------------------------------------
// Contiguous float32 / bfloat16 / float16 inputs take a blocked path (half types converted per block, float32
// accumulation), float64 ones the same path in float64 (acc_t): the per-element work of a block of
// samples (exp(-log_scale), z, the Gaussian exponent) runs as one flat vector loop (at::vec: AVX2 + Sleef
// exp in the AVX2 build), the per-component reductions and the log-sum-exp over K stay scalar. The math is
// the same as mixture_math.h; the tests run both paths against the reference.
using Vec = at::vec::Vectorized<float>;
template <typename scalar_t>
using block_acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
constexpr int64_t kFastBlock = 64;      // samples per block (block buffers stay in L1/L2)
constexpr int64_t kFastMaxKD = 4096;    // larger rows use the generic path

bool fast_layout(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
                 const at::Tensor& target) {
  return logits.is_contiguous() && means.is_contiguous() && log_scales.is_contiguous() && target.is_contiguous() &&
         means.size(1) * means.size(2) <= kFastMaxKD;
}
// float32 / bfloat16 / float16: the lane-parallel kernel in the AVX2 build (any strides: rows contiguous per sample
// are read in place at their batch stride, other layouts gathered per group of 8 samples), the blocked path
// otherwise (contiguous inputs)
bool use_fast_path(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
                   const at::Tensor& target) {
  const auto dt = means.scalar_type();
  if (dt != at::kFloat && dt != at::kBFloat16 && dt != at::kHalf) return false;
#ifdef PHYSMDN_SOA_KERNELS
  (void)logits, (void)log_scales, (void)target;
  return means.size(1) * means.size(2) <= kFastMaxKD;
#else
  return fast_layout(logits, means, log_scales, target);
#endif
}
// float64: the blocked path in float64
bool use_double_path(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
                     const at::Tensor& target) {
  return means.scalar_type() == at::kDouble && fast_layout(logits, means, log_scales, target);
}

// Inputs as the kernels read them. The lane-parallel kernel (AVX2 build; lane_kernel: the caller's family runs on it)
// takes every layout in place (use_fast_path). For the blocked paths, views with strided rows are copied
// to contiguous tensors when that lets all four inputs take them: the copy reads and writes each such input once,
// the generic per-sample loop is ~4x slower than copy + fast path (B = 65536, K = 8, D = 4). Expanded inputs (a zero
// stride) are never copied (that would make a full [B, ...] tensor of a broadcast): the blocked paths leave them to
// the generic loop.
struct MixtureInputs {
  at::Tensor logits, means, log_scales, target;
  MixtureInputs(const at::Tensor& l, const at::Tensor& m, const at::Tensor& s, const at::Tensor& y,
                bool lane_kernel = true)
      : logits(l), means(m), log_scales(s), target(y) {
    if (fast_layout(l, m, s, y) || m.size(1) * m.size(2) > kFastMaxKD) return;
#ifdef PHYSMDN_SOA_KERNELS
    if (lane_kernel && use_fast_path(l, m, s, y)) return;
#else
    (void)lane_kernel;
#endif
    const auto expanded = [](const at::Tensor& t) {
      for (int64_t d = 0; d < t.dim(); ++d)
        if (t.size(d) > 1 && t.stride(d) == 0) return true;
      return false;
    };
    if (expanded(l) || expanded(m) || expanded(s) || expanded(y)) return;
    logits = l.contiguous(), means = m.contiguous(), log_scales = s.contiguous(), target = y.contiguous();
  }
};

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
  using V = at::vec::Vectorized<T>;
  int64_t e = 0;
  const V half(T(-0.5)), one(T(1));
  for (; e + V::size() <= n; e += V::size()) {
    const V l = V::loadu(ls + e);
    const V inv = l.neg().exp();
    const V z = (V::loadu(yb + e) - V::loadu(mu + e)) * inv;
    const V zz = z * z;
    at::vec::fmadd(half, zz, l.neg()).store(q + e);
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
  using V = at::vec::Vectorized<T>;
  int64_t e = 0;
  for (; e + V::size() <= n; e += V::size()) V::loadu(in + e).exp().store(out + e);
  for (; e < n; ++e) out[e] = std::exp(in[e]);
}
template <typename T>
void vec_log(const T* in, T* out, int64_t n) {
  using V = at::vec::Vectorized<T>;
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
      mu_buf.resize(kFastBlock * K * D);
      ls_buf.resize(kFastBlock * K * D);
      lg_buf.resize(kFastBlock * K);
      y_buf.resize(kFastBlock * D);
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

// Block buffers of the fast path, one set per parallel task.
template <typename T>
struct FastBlockT {
  std::vector<T> ybuf, q, log_pi, joint, tmp, prior, shift, sum, lse;
  FastBlockT(int64_t K, int64_t D)
      : ybuf(kFastBlock * K * D), q(kFastBlock * K * D), log_pi(kFastBlock * K), joint(kFastBlock * K),
        tmp(kFastBlock * K), prior(kFastBlock * K), shift(kFastBlock), sum(kFastBlock), lse(kFastBlock) {}
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

// Forward; with kGrad also the gradients (grad_* outputs) in the same pass, for an upstream gradient of grad_scale,
// or of grad_loss per sample when given (then it serves as the backward: a recompute with the same arithmetic as
// the forward's gradients). One exp per element and two per component, the exponentials of the log-sum-exps reused
// as pi and gamma. loss / saved: null tensors are not written.
template <bool kGrad, int kD, typename scalar_t, typename acc_t = block_acc_t<scalar_t>>
void mixture_nll_forward_fast(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
                              const at::Tensor& target, std::type_identity_t<acc_t> grad_scale, at::Tensor* loss,
                              at::Tensor* saved, std::type_identity_t<acc_t>* gl, std::type_identity_t<acc_t>* gm,
                              std::type_identity_t<acc_t>* gs, std::type_identity_t<acc_t>* gt,
                              const at::Tensor* grad_loss = nullptr) {
  const int64_t B = means.size(0), K = means.size(1), D = PHYSMDN_DIM(means.size(2)), KD = K * D;
  const scalar_t *lg_all = logits.const_data_ptr<scalar_t>(), *mu_all = means.const_data_ptr<scalar_t>();
  const scalar_t *ls_all = log_scales.const_data_ptr<scalar_t>(), *y_all = target.const_data_ptr<scalar_t>();
  scalar_t* out = loss ? loss->data_ptr<scalar_t>() : nullptr;
  acc_t* sv = saved ? saved->data_ptr<acc_t>() : nullptr;
  const scalar_t* g_ptr = grad_loss ? grad_loss->const_data_ptr<scalar_t>() : nullptr;
  const int64_t g_stride = grad_loss ? grad_loss->stride(0) : 0;
  at::parallel_for(0, (B + kFastBlock - 1) / kFastBlock, 1, [&](int64_t blk_begin, int64_t blk_end) {
    FastBlockT<acc_t> w(K, D);
    BlockInput<scalar_t> in(K, D);
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      const int64_t b0 = blk * kFastBlock, nb = std::min(kFastBlock, B - b0);
      in.load_block(mu_all, ls_all, lg_all, y_all, b0, nb, K, D);
      fill_target_block<kD>(in.y, nb, K, D, w.ybuf.data());
      gaussian_terms<kGrad>(in.mu, in.ls, w.ybuf.data(), nb * KD, w.q.data(), kGrad ? gm + b0 * KD : nullptr,
                            kGrad ? gs + b0 * KD : nullptr);
      component_log_densities<kD>(w.q.data(), nb * K, D, w.joint.data());
      // log pi = (logit - max) - log sum exp(logit - max)
      block_lse(in.lg, nb, K, w.shift.data(), w.sum.data(), w.lse.data(), w.prior.data());
      for (int64_t i = 0; i < nb; ++i) {
        const acc_t shift = w.shift[i], log_sum = w.lse[i];
        if (sv) sv[math::kSavedPerSample * (b0 + i)] = shift, sv[math::kSavedPerSample * (b0 + i) + 1] = log_sum;
        const acc_t inv_sum = acc_t(1) / w.sum[i];
        for (int64_t k = 0; k < K; ++k) {
          w.joint[i * K + k] += (in.lg[i * K + k] - shift) - log_sum;
          if (kGrad) w.prior[i * K + k] *= inv_sum;  // pi
        }
      }
      block_lse(w.joint.data(), nb, K, w.shift.data(), w.sum.data(), w.lse.data(), w.tmp.data());
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t b = b0 + i;
        const acc_t lse = w.shift[i] + w.lse[i];
        if (sv) sv[math::kSavedPerSample * b + 2] = lse;
        if (out) out[b] = static_cast<scalar_t>(-lse);
        if constexpr (kGrad) {
          const acc_t inv_sum = acc_t(1) / w.sum[i];
          for (int64_t k = 0; k < K; ++k) w.tmp[i * K + k] *= inv_sum;  // gamma
          const acc_t g = g_ptr ? static_cast<acc_t>(g_ptr[b * g_stride]) : grad_scale;
          finish_sample_grads<kD>(K, D, g, w.tmp.data() + i * K, w.prior.data() + i * K, gl + b * K, gm + b * KD,
                                  gs + b * KD, gt + b * D);
        }
      }
    }
  });
}

template <int kD, typename scalar_t, typename acc_t = block_acc_t<scalar_t>>
void mixture_nll_backward_fast(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& means,
                               const at::Tensor& log_scales, const at::Tensor& target, const at::Tensor& saved,
                               at::Tensor& grad_logits, at::Tensor& grad_means, at::Tensor& grad_log_scales,
                               at::Tensor& grad_target) {
  const int64_t B = means.size(0), K = means.size(1), D = PHYSMDN_DIM(means.size(2)), KD = K * D;
  const scalar_t *lg_all = logits.const_data_ptr<scalar_t>(), *mu_all = means.const_data_ptr<scalar_t>();
  const scalar_t *ls_all = log_scales.const_data_ptr<scalar_t>(), *y_all = target.const_data_ptr<scalar_t>();
  const scalar_t* g_ptr = grad_loss.const_data_ptr<scalar_t>();
  const int64_t g_stride = grad_loss.stride(0);
  const acc_t* sv = saved.const_data_ptr<acc_t>();
  acc_t *gl = grad_logits.data_ptr<acc_t>(), *gm = grad_means.data_ptr<acc_t>();
  acc_t *gs = grad_log_scales.data_ptr<acc_t>(), *gt = grad_target.data_ptr<acc_t>();
  at::parallel_for(0, (B + kFastBlock - 1) / kFastBlock, 1, [&](int64_t blk_begin, int64_t blk_end) {
    FastBlockT<acc_t> w(K, D);
    BlockInput<scalar_t> in(K, D);
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      const int64_t b0 = blk * kFastBlock, nb = std::min(kFastBlock, B - b0);
      in.load_block(mu_all, ls_all, lg_all, y_all, b0, nb, K, D);
      fill_target_block<kD>(in.y, nb, K, D, w.ybuf.data());
      // z / s and z^2 - 1 go straight into the gradient outputs, scaled per component below
      gaussian_terms<true>(in.mu, in.ls, w.ybuf.data(), nb * KD, w.q.data(), gm + b0 * KD, gs + b0 * KD);
      component_log_densities<kD>(w.q.data(), nb * K, D, w.joint.data());
      for (int64_t i = 0; i < nb; ++i) {
        const acc_t* s = sv + math::kSavedPerSample * (b0 + i);
        for (int64_t k = 0; k < K; ++k) {
          const acc_t log_pi = (in.lg[i * K + k] - s[0]) - s[1];
          w.log_pi[i * K + k] = log_pi;
          w.joint[i * K + k] += log_pi - s[2];
        }
      }
      vec_exp(w.joint.data(), w.joint.data(), nb * K);    // gamma
      vec_exp(w.log_pi.data(), w.log_pi.data(), nb * K);  // pi
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t b = b0 + i;
        finish_sample_grads<kD>(K, D, static_cast<acc_t>(g_ptr[b * g_stride]), w.joint.data() + i * K,
                                w.log_pi.data() + i * K, gl + b * K, gm + b * KD, gs + b * KD, gt + b * D);
      }
    }
  });
}

// Runs fn.template operator()<scalar_t>() for the fast path's dtypes.
template <typename Fn>
void dispatch_fast_dtype(at::ScalarType dt, Fn&& fn) {
  switch (dt) {
    case at::kFloat: return fn.template operator()<float>();
    case at::kBFloat16: return fn.template operator()<at::BFloat16>();
    case at::kHalf: return fn.template operator()<at::Half>();
    default: TORCH_CHECK(false, "physmdn fast path: unexpected dtype ", dt);
  }
}

// ----- fused loss, blocked path: polynomial and linear families -----------------------------------------
// Contiguous float32 / float64 inputs ([B|1, K|1, D|1, J+1] coefficients: one law per component, or per component and
// dimension) and no coefficient gradient: the Gaussian-moment expectation runs as flat vector loops over the
// block's elements. With q = c * c (autoconvolution, once per component, or per element when the coefficients vary
// over D), E[p^2] = sum_n q_n M_n,
// dE/dmu = sum_n q_n n M_{n-1}, dE/dvar = sum_n q_n n (n - 1) / 2 M_{n-2} (as physics_math.h).
// The linear family takes the same blocked path (LinearFamily below).
bool use_blocked_family_path(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
                             const at::Tensor& target, const PhysicsArgs& args, int64_t rows, bool param_grad) {
  const auto dt = means.scalar_type();
  const bool family = args.family == math::kPolynomial || (args.family == math::kLinear && rows > 0);
  return family && !param_grad && (dt == at::kFloat || dt == at::kDouble) && logits.is_contiguous() &&
         means.is_contiguous() && log_scales.is_contiguous() && target.is_contiguous() &&
         means.size(1) * means.size(2) <= kFastMaxKD;
}

// float32 or float64, the dtypes use_blocked_family_path admits
template <typename Fn>
void dispatch_blocked_dtype(at::ScalarType dt, Fn&& fn) {
  if (dt == at::kDouble) return fn.template operator()<double>();
  fn.template operator()<float>();
}

template <typename T>
struct PolyBlock {
  int nq;                        // 2J + 1 autoconvolution terms (second moment), J + 1 coefficients (first moment)
  bool square;                   // q = c * c (second moment), else q = c
  std::vector<T> q_row;          // [rows, nq]
  std::vector<T> q_elem;         // [nq, elements] (per-element copies for the vector loops)
  std::vector<T> pen, dmu, dls;  // per element: E[p^2] (or E[p]), dE/dmu, dE/dlog_scale
  PolyBlock(int64_t K, int64_t D, int order, bool square_)
      : nq(square_ ? 2 * order + 1 : order + 1), square(square_), q_row(kFastBlock * K * nq), q_elem(static_cast<size_t>(nq) * kFastBlock * K * D),
        pen(kFastBlock * K * D), dmu(kFastBlock * K * D), dls(kFastBlock * K * D) {}

  std::vector<T> q_batch;  // [K, D, nq]: q of coefficients shared over the batch (c.s0 == 0), computed once
  // q = c * c per element: once per row when the coefficients are shared over D (c.s2 == 0), else per dimension;
  // once for the whole batch when they are shared over it
  void coefficients(const math::Strided4<T>& c, int order, int64_t b0, int64_t nb, int64_t K, int64_t D) {
    const int64_t rows = nb * K, E = rows * D;
    const auto q_of = [&](int64_t b, int64_t k, int64_t d, T* q) {
      for (int n = 0; n < nq; ++n) q[n] = T(0);
      if (!square) {
        for (int i = 0; i <= order; ++i) q[i] = c(b, k, d, i);
        return;
      }
      for (int i = 0; i <= order; ++i)
        for (int j = 0; j <= order; ++j) q[i + j] += c(b, k, d, i) * c(b, k, d, j);
    };
    if (c.s0 == 0 && q_batch.empty()) {
      q_batch.resize(static_cast<size_t>(K * D * nq));
      for (int64_t k = 0; k < K; ++k)
        for (int64_t d = 0; d < D; ++d) q_of(0, k, d, q_batch.data() + (k * D + d) * nq);
    }
    for (int64_t r = 0; r < rows; ++r) {
      T* q = q_row.data() + r * nq;
      const int64_t b = b0 + r / K, k = r % K;
      for (int64_t d = 0; d < D; ++d) {
        const T* qd = q;
        if (c.s0 == 0)
          qd = q_batch.data() + (k * D + d) * nq;
        else if (d == 0 || c.s2 != 0)
          q_of(b, k, d, q);
        for (int n = 0; n < nq; ++n) q_elem[n * E + r * D + d] = qd[n];
      }
    }
  }
};

// Per element: variance under the penalty (exp(2 ls) minus the noise variance, floored at 0; 0 for the point value),
// the expectation E[sum_n q_n y^n] and, with kGrad, its derivatives in mu and log_scale.
template <bool kGrad, typename T>
void poly_terms(const T* mu, const T* ls, int64_t E, const T* q_elem, int nq, bool with_var, T noise_var, T* pen,
                std::type_identity_t<T>* dmu, std::type_identity_t<T>* dls) {
  using Vec = at::vec::Vectorized<T>;
  int64_t e = 0;
  const Vec zero(T(0)), two(T(2)), nvv(noise_var);
  for (; e + Vec::size() <= E; e += Vec::size()) {
    const Vec m = Vec::loadu(mu + e);
    Vec v = zero, dvdls = zero;
    if (with_var) {
      const Vec raw = (two * Vec::loadu(ls + e)).exp();
      v = at::vec::maximum(raw - nvv, zero);
      dvdls = Vec::blendv(zero, two * raw, raw > nvv);
    }
    Vec m_prev2(T(1)), m_prev = m;
    const Vec q1 = nq > 1 ? Vec::loadu(q_elem + E + e) : zero;  // J = 0: a constant, no q_1
    Vec P = Vec::loadu(q_elem + e) + q1 * m;
    Vec dm = q1, dv = zero;
    for (int n = 2; n < nq; ++n) {
      const Vec qn = Vec::loadu(q_elem + n * E + e);
      if constexpr (kGrad) {
        dm = at::vec::fmadd(qn * Vec(static_cast<T>(n)), m_prev, dm);
        dv = at::vec::fmadd(qn * Vec(static_cast<T>(n * (n - 1) / 2)), m_prev2, dv);
      }
      const Vec mn = at::vec::fmadd(m, m_prev, Vec(static_cast<T>(n - 1)) * v * m_prev2);
      P = at::vec::fmadd(qn, mn, P);
      m_prev2 = m_prev;
      m_prev = mn;
    }
    P.store(pen + e);
    if constexpr (kGrad) {
      dm.store(dmu + e);
      (dv * dvdls).store(dls + e);
    }
  }
  for (; e < E; ++e) {  // scalar tail, the same formulas
    const T m = mu[e];
    T v = T(0), dvdls = T(0);
    if (with_var) {
      const T raw = std::exp(T(2) * ls[e]);
      v = raw > noise_var ? raw - noise_var : T(0);
      dvdls = raw > noise_var ? T(2) * raw : T(0);
    }
    const T q1 = nq > 1 ? q_elem[E + e] : T(0);
    T m_prev2 = T(1), m_prev = m, P = q_elem[e] + q1 * m, dmv = q1, dvv = T(0);
    for (int n = 2; n < nq; ++n) {
      const T qn = q_elem[n * E + e];
      dmv += qn * static_cast<T>(n) * m_prev;
      dvv += qn * static_cast<T>(n * (n - 1) / 2) * m_prev2;
      const T mn = m * m_prev + static_cast<T>(n - 1) * v * m_prev2;
      P += qn * mn;
      m_prev2 = m_prev;
      m_prev = mn;
    }
    pen[e] = P;
    if constexpr (kGrad) {
      dmu[e] = dmv;
      dls[e] = dvv * dvdls;
    }
  }
}

template <typename T>
inline T row_sum(const T* x, int64_t D) {
  T acc = T(0);
  for (int64_t d = 0; d < D; ++d) acc += x[d];
  return acc;
}

// Sum over D of one component's E[p^2]: a NaN from finite means, log-scales and coefficients can only be
// inf - inf between overflowed moments (huge scales), so the value is +inf (as physics_math.h's family_penalty).
template <typename T>
inline T poly_component_penalty(const T* pen, const T* mu, const T* ls, int64_t D, const math::Strided4<T>& c,
                                int order, int64_t b, int64_t k) {
  const T total = row_sum(pen, D);
  if (total == total) return total;
  T z = T(0);
  for (int64_t d = 0; d < D; ++d) {
    z += (mu[d] - mu[d]) + (ls[d] - ls[d]);
    for (int i = 0; i <= order; ++i) z += c(b, k, d, i) - c(b, k, d, i);
  }
  return z == T(0) ? std::numeric_limits<T>::infinity() : total;
}

// The float32 / float64 inputs of the fused loss's blocked path (coeffs: the polynomial family's).
template <typename T>
struct BlockedInputs {
  const T *lg, *mu, *ls, *y;
  math::Strided4<T> coeffs;
  const T* extra;
  int64_t extra_sb, extra_sk;
  T weight, noise_var;
  bool couple_weights;
  BlockedInputs(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
                const at::Tensor& target, const at::Tensor& p0, const c10::optional<at::Tensor>& ex,
                const PhysicsArgs& args)
      : lg(logits.const_data_ptr<T>()), mu(means.const_data_ptr<T>()), ls(log_scales.const_data_ptr<T>()),
        y(target.const_data_ptr<T>()), coeffs(make_strided<T>(p0)),
        extra(ex.has_value() ? ex->const_data_ptr<T>() : nullptr), extra_sb(ex.has_value() ? ex->stride(0) : 0),
        extra_sk(ex.has_value() ? ex->stride(1) : 0), weight(static_cast<T>(args.weight)),
        noise_var(static_cast<T>(args.noise_scale * args.noise_scale)), couple_weights(args.couple_weights) {}
  T extra_at(int64_t b, int64_t k) const { return extra ? extra[b * extra_sb + k * extra_sk] : T(0); }
};

// The blocked fused path's families (one object per parallel task). prepare<kGrad>(b0, nb) computes a block's
// per-element terms; penalty(r, b, k) is the family penalty of row r = (sample b - b0, component k) before the weight
// (a NaN from finite inputs made +inf, as physics_math.h's family_penalty); after prepare<true>, dmu(r) / dls(r) are
// its derivatives' rows [D].
template <typename T>
struct PolyFamily {
  const BlockedInputs<T>& in;
  int order;
  int moment;
  int64_t K, D;
  PolyBlock<T> pb;
  PolyFamily(const BlockedInputs<T>& in_, const PhysicsArgs& args, int order_, int64_t K_, int64_t D_)
      : in(in_), order(order_), moment(static_cast<int>(args.moment)), K(K_), D(D_),
        pb(K_, D_, order_, /*square=*/moment != math::kFirst) {}
  template <bool kGrad>
  void prepare(int64_t b0, int64_t nb) {
    const int64_t E = nb * K * D;
    pb.coefficients(in.coeffs, order, b0, nb, K, D);
    poly_terms<kGrad>(in.mu + b0 * K * D, in.ls + b0 * K * D, E, pb.q_elem.data(), pb.nq, moment != math::kPoint,
                      in.noise_var, pb.pen.data(), kGrad ? pb.dmu.data() : nullptr, kGrad ? pb.dls.data() : nullptr);
    if (moment != math::kFirst) return;
    // first moment: E[p] -> E[p]^2, derivatives 2 E[p] dE[p]
    for (int64_t e = 0; e < E; ++e) {
      const T ep = pb.pen[e];
      pb.pen[e] = ep * ep;
      if constexpr (kGrad) pb.dmu[e] *= T(2) * ep, pb.dls[e] *= T(2) * ep;
    }
  }
  T penalty(int64_t r, int64_t b, int64_t k) {
    const int64_t row = (b * K + k) * D;
    return poly_component_penalty(pb.pen.data() + r * D, in.mu + row, in.ls + row, D, in.coeffs, order, b, k);
  }
  const T* dmu(int64_t r) const { return pb.dmu.data() + r * D; }
  const T* dls(int64_t r) const { return pb.dls.data() + r * D; }
};

// The linear family (physics_math.h's linear_penalty): with e = A mu - b, P = sum_m e_m^2 + sum_d v_d sum_m A_md^2,
// dP/dmu_d = 2 sum_m e_m A_md, dP/dlog_scale_d = sum_m A_md^2 dv_d/dlog_scale; the variances v = exp(2 log_scale)
// (less the noise variance, at least 0; 0 in the mean mode) as one vector exp per block, the rest per row.
template <typename T>
struct LinearFamily {
  const BlockedInputs<T>& in;
  math::Strided4<T> A, bias;  // [B, K, M, D], [B, K, M] (stride 0 where broadcast)
  int64_t rows, K, D;
  bool second, grads = false;  // second moment (the first moment of a linear residual is its point value)
  std::vector<T> var, dvar, gm, gs;  // per block element
  LinearFamily(const BlockedInputs<T>& in_, const at::Tensor& p0, const at::Tensor& p1, const PhysicsArgs& args,
               int64_t rows_, int64_t K_, int64_t D_)
      : in(in_), A(make_strided<T>(p0)), bias(make_strided<T>(p1)), rows(rows_), K(K_), D(D_),
        second(args.moment == math::kSecond),
        var(kFastBlock * K_ * D_), dvar(kFastBlock * K_ * D_), gm(kFastBlock * K_ * D_), gs(kFastBlock * K_ * D_) {}
  template <bool kGrad>
  void prepare(int64_t b0, int64_t nb) {
    grads = kGrad;
    const int64_t E = nb * K * D;
    const T* ls = in.ls + b0 * K * D;
    if (!second) {
      std::fill(var.begin(), var.begin() + E, T(0));
      std::fill(dvar.begin(), dvar.begin() + E, T(0));
      return;
    }
    for (int64_t e = 0; e < E; ++e) dvar[e] = T(2) * ls[e];
    vec_exp(dvar.data(), dvar.data(), E);
    for (int64_t e = 0; e < E; ++e) {
      const T raw = dvar[e];
      const bool above = raw > in.noise_var;
      var[e] = above ? raw - in.noise_var : T(0);
      dvar[e] = above ? T(2) * raw : T(0);
    }
  }
  T penalty(int64_t r, int64_t b, int64_t k) {
    const T* m = in.mu + (b * K + k) * D;
    const T* v = var.data() + r * D;
    T *g_mu = gm.data() + r * D, *g_ls = gs.data() + r * D;
    if (grads) std::fill(g_mu, g_mu + D, T(0)), std::fill(g_ls, g_ls + D, T(0));
    T total = T(0), z = T(0);  // z: 0 when every input is finite
    for (int64_t rr = 0; rr < rows; ++rr) {
      T e = -bias(b, k, rr);
      z += e - e;
      for (int64_t d = 0; d < D; ++d) e += A(b, k, rr, d) * m[d];
      total += e * e;
      for (int64_t d = 0; grads && d < D; ++d) g_mu[d] += T(2) * e * A(b, k, rr, d);
    }
    for (int64_t d = 0; second && d < D; ++d) {
      T col = T(0);
      for (int64_t rr = 0; rr < rows; ++rr) col += A(b, k, rr, d) * A(b, k, rr, d);
      total += v[d] * col;
      if (grads) g_ls[d] = col * dvar[r * D + d];
    }
    if (total == total) return total;
    const T* l = in.ls + (b * K + k) * D;
    for (int64_t d = 0; d < D; ++d) {
      z += (m[d] - m[d]) + (l[d] - l[d]);
      for (int64_t rr = 0; rr < rows; ++rr) z += A(b, k, rr, d) - A(b, k, rr, d);
    }
    return z == T(0) ? std::numeric_limits<T>::infinity() : total;
  }
  const T* dmu(int64_t r) const { return gm.data() + r * D; }
  const T* dls(int64_t r) const { return gs.data() + r * D; }
};

// Calls fn(make_family) with a factory of the call's family policy (one per parallel task).
template <typename T, typename Fn>
void with_blocked_family(const BlockedInputs<T>& in, const at::Tensor& p0, const at::Tensor& p1, const PhysicsArgs& args,
                         int order, int64_t rows, int64_t K, int64_t D, Fn&& fn) {
  if (args.family == math::kLinear)
    return fn([&] { return LinearFamily<T>(in, p0, p1, args, rows, K, D); });
  fn([&] { return PolyFamily<T>(in, args, order, K, D); });
}

template <typename T>
void mdn_loss_forward_blocked(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
                              const at::Tensor& target, const at::Tensor& p0, const at::Tensor& p1,
                              const c10::optional<at::Tensor>& extra, const PhysicsArgs& args, int order, int64_t rows,
                              at::Tensor& loss, at::Tensor& saved) {
  const int64_t B = means.size(0), K = means.size(1), D = means.size(2), KD = K * D;
  const BlockedInputs<T> in(logits, means, log_scales, target, p0, extra, args);
  const T *lg = in.lg, *mu = in.mu, *ls = in.ls, *y = in.y;
  const T w = in.weight;
  T *out = loss.data_ptr<T>(), *sv = saved.data_ptr<T>();
  with_blocked_family(in, p0, p1, args, order, rows, K, D, [&](auto&& make_family) {
    at::parallel_for(0, (B + kFastBlock - 1) / kFastBlock, 1, [&](int64_t blk_begin, int64_t blk_end) {
      FastBlockT<T> fb(K, D);
      auto fam = make_family();
      for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
        const int64_t b0 = blk * kFastBlock, nb = std::min(kFastBlock, B - b0), E = nb * KD;
        fill_target_block<0>(y + b0 * D, nb, K, D, fb.ybuf.data());
        gaussian_terms<false>(mu + b0 * KD, ls + b0 * KD, fb.ybuf.data(), E, fb.q.data(), nullptr, nullptr);
        component_log_densities<0>(fb.q.data(), nb * K, D, fb.joint.data());
        block_lse(lg + b0 * K, nb, K, fb.shift.data(), fb.sum.data(), fb.lse.data(), fb.prior.data());
        fam.template prepare<false>(b0, nb);
        for (int64_t i = 0; i < nb; ++i) {
          T* s = sv + math::kSavedPerSampleLoss * (b0 + i);
          s[0] = fb.shift[i];
          s[1] = fb.lse[i];
          const T inv_sum = T(1) / fb.sum[i];
          T pbar = T(0);
          for (int64_t k = 0; k < K; ++k) {
            const int64_t r = i * K + k;
            fb.joint[r] += (lg[(b0 + i) * K + k] - s[0]) - s[1];
            const T pi = fb.prior[r] * inv_sum;
            if (pi > T(0)) pbar += pi * (w * fam.penalty(r, b0 + i, k) + in.extra_at(b0 + i, k));
          }
          s[3] = pbar;
        }
        block_lse(fb.joint.data(), nb, K, fb.shift.data(), fb.sum.data(), fb.lse.data(), fb.tmp.data());
        for (int64_t i = 0; i < nb; ++i) {
          T* s = sv + math::kSavedPerSampleLoss * (b0 + i);
          s[2] = fb.shift[i] + fb.lse[i];
          out[b0 + i] = s[3] - s[2];
        }
      }
    });
  });
}

template <typename T>
void mdn_loss_backward_blocked(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& means,
                               const at::Tensor& log_scales, const at::Tensor& target, const at::Tensor& p0,
                               const at::Tensor& p1, const c10::optional<at::Tensor>& extra, const PhysicsArgs& args,
                               int order, int64_t rows, const at::Tensor& saved, at::Tensor& grad_logits,
                               at::Tensor& grad_means, at::Tensor& grad_log_scales, at::Tensor& grad_target,
                               at::Tensor& grad_extra) {
  const int64_t B = means.size(0), K = means.size(1), D = means.size(2), KD = K * D;
  const BlockedInputs<T> in(logits, means, log_scales, target, p0, extra, args);
  const T *lg = in.lg, *mu = in.mu, *ls = in.ls, *y = in.y;
  const T w = in.weight;
  const T* g_ptr = grad_loss.const_data_ptr<T>();
  const int64_t g_stride = grad_loss.stride(0);
  const T* sv = saved.const_data_ptr<T>();
  T *gl = grad_logits.data_ptr<T>(), *gm = grad_means.data_ptr<T>();
  T *gs = grad_log_scales.data_ptr<T>(), *gt = grad_target.data_ptr<T>();
  T* ge = grad_extra.numel() ? grad_extra.data_ptr<T>() : nullptr;
  with_blocked_family(in, p0, p1, args, order, rows, K, D, [&](auto&& make_family) {
    at::parallel_for(0, (B + kFastBlock - 1) / kFastBlock, 1, [&](int64_t blk_begin, int64_t blk_end) {
      FastBlockT<T> fb(K, D);
      auto fam = make_family();
      std::vector<T> pi_blk(kFastBlock * K), gamma_blk(kFastBlock * K);
      for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
        const int64_t b0 = blk * kFastBlock, nb = std::min(kFastBlock, B - b0), E = nb * KD;
        // likelihood part, as mixture_nll_backward_fast
        fill_target_block<0>(y + b0 * D, nb, K, D, fb.ybuf.data());
        gaussian_terms<true>(mu + b0 * KD, ls + b0 * KD, fb.ybuf.data(), E, fb.q.data(), gm + b0 * KD, gs + b0 * KD);
        component_log_densities<0>(fb.q.data(), nb * K, D, fb.joint.data());
        for (int64_t i = 0; i < nb; ++i) {
          const T* s = sv + math::kSavedPerSampleLoss * (b0 + i);
          for (int64_t k = 0; k < K; ++k) {
            const T log_pi = (lg[(b0 + i) * K + k] - s[0]) - s[1];
            fb.log_pi[i * K + k] = log_pi;
            fb.joint[i * K + k] += log_pi - s[2];
          }
        }
        vec_exp(fb.joint.data(), gamma_blk.data(), nb * K);
        vec_exp(fb.log_pi.data(), pi_blk.data(), nb * K);
        for (int64_t i = 0; i < nb; ++i) {
          const int64_t b = b0 + i;
          finish_sample_grads<0>(K, D, g_ptr[b * g_stride], gamma_blk.data() + i * K, pi_blk.data() + i * K, gl + b * K,
                                 gm + b * KD, gs + b * KD, gt + b * D);
        }
        // penalty part
        fam.template prepare<true>(b0, nb);
        for (int64_t i = 0; i < nb; ++i) {
          const int64_t b = b0 + i;
          const T g = g_ptr[b * g_stride];
          const T pbar = sv[math::kSavedPerSampleLoss * b + 3];
          for (int64_t k = 0; k < K; ++k) {
            const int64_t r = i * K + k;
            const T pi = pi_blk[r];
            if (ge) ge[b * K + k] = g * pi;
            if (!(pi > T(0))) continue;  // no mass: no penalty gradient (as the generic path)
            const T q = w * fam.penalty(r, b, k) + in.extra_at(b, k);
            if (in.couple_weights) gl[b * K + k] += g * pi * (q - pbar);
            const T scale = g * w * pi;
            T* gm_row = gm + (b * K + k) * D;
            T* gs_row = gs + (b * K + k) * D;
            const T *dmu = fam.dmu(r), *dls = fam.dls(r);
            for (int64_t d = 0; d < D; ++d) {
              gm_row[d] += scale * dmu[d];
              gs_row[d] += scale * dls[d];
            }
          }
        }
      }
    });
  });
}

// The fused loss's families the lane-parallel AVX2 kernel runs (also when their parameters need a gradient):
// polynomial, linear, stencil.
bool soa_family(const PhysicsArgs& args, int order, int64_t rows) {
  switch (args.family) {
    case math::kPolynomial:
    case math::kStencil: return order <= math::kMaxOrder;
    case math::kLinear: return rows > 0;
    default: return false;
  }
}

#ifdef PHYSMDN_SOA_KERNELS
// A float32 gradient output's data, or null (not requested: empty; other dtypes: not the lane kernel's)
float* float_data_or_null(at::Tensor& t) {
  return t.numel() > 0 && t.scalar_type() == at::kFloat ? t.data_ptr<float>() : nullptr;
}

// For those families and float32 / bfloat16 / float16 inputs (use_fast_path; gp0 / gp1: the family parameters'
// gradients, or null): calls fn.template operator()<scalar_t>(physics policy) and returns true, or returns false.
template <typename Fn>
bool with_soa_physics(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
                      const at::Tensor& target, const at::Tensor& p0, const at::Tensor& p1,
                      const c10::optional<at::Tensor>& extra, const PhysicsArgs& args, int order, int64_t rows,
                      float* gp0, float* gp1, Fn&& fn) {
  if (!soa_family(args, order, rows) || !use_fast_path(logits, means, log_scales, target)) return false;
  const bool poly = args.family == math::kPolynomial, stencil = args.family == math::kStencil;
  dispatch_fast_dtype(means.scalar_type(), [&]<typename scalar_t>() {
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
  return true;
}
#endif

// Calls fn.template operator()<kD>() with kD = D for the common small dimensions, 0 (run time) otherwise.
template <typename Fn>
void dispatch_dim(int64_t D, Fn&& fn) {
  switch (D) {
    case 1: return fn.template operator()<1>();
    case 2: return fn.template operator()<2>();
    case 3: return fn.template operator()<3>();
    case 4: return fn.template operator()<4>();
    case 8: return fn.template operator()<8>();
    default: return fn.template operator()<0>();
  }
}

}  // namespace

void vector_exp_log(const at::Tensor& x, int64_t variant, at::Tensor& exp_out, at::Tensor& log_out) {
  const float* in = x.const_data_ptr<float>();
  float *e = exp_out.data_ptr<float>(), *l = log_out.data_ptr<float>();
  const int64_t n = x.numel();
  int64_t i = 0;
#ifdef PHYSMDN_SOA_KERNELS
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(in + i);
    _mm256_storeu_ps(e + i, variant == 1 ? soa::exp_neg8(v) : variant == 2 ? soa::exp_nonpos8(v) : soa::exp8(v));
    _mm256_storeu_ps(l + i, soa::log8(v));
  }
#else
  for (; i + Vec::size() <= n; i += Vec::size()) {
    (variant == 1 ? Vec::loadu(in + i).neg() : Vec::loadu(in + i)).exp().store(e + i);
    Vec::loadu(in + i).log().store(l + i);
  }
#endif
  for (; i < n; ++i) e[i] = std::exp(variant == 1 ? -in[i] : in[i]), l[i] = std::log(in[i]);
}

void mixture_nll_forward(const at::Tensor& logits_in, const at::Tensor& means_in, const at::Tensor& log_scales_in,
                         const at::Tensor& target_in, at::Tensor& loss, at::Tensor& saved) {
  const MixtureInputs in(logits_in, means_in, log_scales_in, target_in);
  const at::Tensor &logits = in.logits, &means = in.means, &log_scales = in.log_scales, &target = in.target;
#ifdef PHYSMDN_SOA_KERNELS
  if (use_fast_path(logits, means, log_scales, target))
    return dispatch_fast_dtype(means.scalar_type(), [&]<typename scalar_t>() {
      soa::mixture_nll<false, scalar_t>(logits, means, log_scales, target, nullptr, 1.0f, loss.data_ptr<scalar_t>(),
                                        saved.data_ptr<float>(), nullptr, nullptr, nullptr, nullptr);
    });
#endif
  if (use_fast_path(logits, means, log_scales, target))
    return dispatch_fast_dtype(means.scalar_type(), [&]<typename scalar_t>() {
      dispatch_dim(means.size(2), [&]<int kD>() {
        mixture_nll_forward_fast<false, kD, scalar_t>(logits, means, log_scales, target, 1.0f, &loss, &saved, nullptr,
                                                      nullptr, nullptr, nullptr);
      });
    });
  if (use_double_path(logits, means, log_scales, target))
    return dispatch_dim(means.size(2), [&]<int kD>() {
      mixture_nll_forward_fast<false, kD, double>(logits, means, log_scales, target, 1.0, &loss, &saved, nullptr,
                                                  nullptr, nullptr, nullptr);
    });
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

// The gradient outputs of the forward-with-gradients entry points are float32 or, for bfloat16 / float16 inputs,
// the input dtype (op_impl.h). A path that only writes float32 runs on float32 temporaries, then converts.
template <typename Fn>
bool with_float_grads(std::initializer_list<at::Tensor*> grads, Fn&& fn) {
  if (std::all_of(grads.begin(), grads.end(), [](at::Tensor* g) { return g->scalar_type() == at::kFloat; }))
    return fn();
  std::vector<at::Tensor> keep;
  std::vector<at::Tensor*> outs;
  for (at::Tensor* g : grads) {
    keep.push_back(*g);
    outs.push_back(g);
    *g = at::empty(g->sizes(), g->options().dtype(at::kFloat));
  }
  const bool done = fn();
  for (size_t i = 0; i < outs.size(); ++i) {
    if (done) keep[i].copy_(*outs[i]);
    *outs[i] = keep[i];
  }
  return done;
}

bool mixture_nll_forward_grad(const at::Tensor& logits_in, const at::Tensor& means_in,
                              const at::Tensor& log_scales_in, const at::Tensor& target_in, at::Tensor& loss,
                              at::Tensor& saved, at::Tensor& grad_logits, at::Tensor& grad_means,
                              at::Tensor& grad_log_scales, at::Tensor& grad_target, double grad_scale) {
  const MixtureInputs in(logits_in, means_in, log_scales_in, target_in);
  const at::Tensor &logits = in.logits, &means = in.means, &log_scales = in.log_scales, &target = in.target;
  if (use_double_path(logits, means, log_scales, target)) {
    dispatch_dim(means.size(2), [&]<int kD>() {
      mixture_nll_forward_fast<true, kD, double>(logits, means, log_scales, target, grad_scale, &loss, &saved,
                                                 grad_logits.data_ptr<double>(), grad_means.data_ptr<double>(),
                                                 grad_log_scales.data_ptr<double>(), grad_target.data_ptr<double>());
    });
    return true;
  }
  if (!use_fast_path(logits, means, log_scales, target)) return false;
#ifdef PHYSMDN_SOA_KERNELS
  dispatch_fast_dtype(means.scalar_type(), [&]<typename scalar_t>() {
    const auto run = [&]<typename grad_t>() {
      soa::mixture_nll<true, scalar_t, grad_t>(logits, means, log_scales, target, nullptr,
                                               static_cast<float>(grad_scale), loss.data_ptr<scalar_t>(),
                                               saved.data_ptr<float>(), grad_logits.data_ptr<grad_t>(),
                                               grad_means.data_ptr<grad_t>(), grad_log_scales.data_ptr<grad_t>(),
                                               grad_target.data_ptr<grad_t>());
    };
    if (grad_means.scalar_type() == at::kFloat)
      run.template operator()<float>();
    else
      run.template operator()<scalar_t>();  // written in the input dtype, no float32 copy
  });
  return true;
#endif
  return with_float_grads({&grad_logits, &grad_means, &grad_log_scales, &grad_target}, [&] {
  dispatch_fast_dtype(means.scalar_type(), [&]<typename scalar_t>() {
    dispatch_dim(means.size(2), [&]<int kD>() {
      mixture_nll_forward_fast<true, kD, scalar_t>(logits, means, log_scales, target, static_cast<float>(grad_scale),
                                                   &loss, &saved, grad_logits.data_ptr<float>(), grad_means.data_ptr<float>(),
                                                   grad_log_scales.data_ptr<float>(), grad_target.data_ptr<float>());
    });
  });
  return true;
  });
}

void mixture_nll_backward(const at::Tensor& grad_loss, const at::Tensor& logits_in, const at::Tensor& means_in,
                          const at::Tensor& log_scales_in, const at::Tensor& target_in, const at::Tensor& saved,
                          at::Tensor& grad_logits, at::Tensor& grad_means, at::Tensor& grad_log_scales,
                          at::Tensor& grad_target) {
  const MixtureInputs in(logits_in, means_in, log_scales_in, target_in);
  const at::Tensor &logits = in.logits, &means = in.means, &log_scales = in.log_scales, &target = in.target;
#ifdef PHYSMDN_SOA_KERNELS
  // recomputes the forward (the saved state is not needed by the lane-parallel kernel)
  if (use_fast_path(logits, means, log_scales, target))
    return dispatch_fast_dtype(means.scalar_type(), [&]<typename scalar_t>() {
      soa::mixture_nll<true, scalar_t>(logits, means, log_scales, target, &grad_loss, 1.0f, nullptr, nullptr,
                                       grad_logits.data_ptr<float>(), grad_means.data_ptr<float>(),
                                       grad_log_scales.data_ptr<float>(), grad_target.data_ptr<float>());
    });
#endif
  if (use_fast_path(logits, means, log_scales, target))
    return dispatch_fast_dtype(means.scalar_type(), [&]<typename scalar_t>() {
      dispatch_dim(means.size(2), [&]<int kD>() {
        mixture_nll_backward_fast<kD, scalar_t>(grad_loss, logits, means, log_scales, target, saved, grad_logits,
                                                grad_means, grad_log_scales, grad_target);
      });
    });
  // float64: recomputes with the forward's arithmetic, so that a retained graph's second backward gives the
  // gradients the forward gave (bit for bit: gradcheck's reentrancy check)
  if (use_double_path(logits, means, log_scales, target))
    return dispatch_dim(means.size(2), [&]<int kD>() {
      mixture_nll_forward_fast<true, kD, double>(logits, means, log_scales, target, 1.0, nullptr, nullptr,
                                                 grad_logits.data_ptr<double>(), grad_means.data_ptr<double>(),
                                                 grad_log_scales.data_ptr<double>(), grad_target.data_ptr<double>(),
                                                 &grad_loss);
    });
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

void mdn_loss_forward(const at::Tensor& logits_in, const at::Tensor& means_in, const at::Tensor& log_scales_in,
                      const at::Tensor& target_in, const at::Tensor& p0, const at::Tensor& p1,
                      const c10::optional<at::Tensor>& extra, const PhysicsArgs& args, int order, int64_t rows,
                      at::Tensor& loss, at::Tensor& saved) {
  const MixtureInputs in(logits_in, means_in, log_scales_in, target_in, soa_family(args, order, rows));
  const at::Tensor &logits = in.logits, &means = in.means, &log_scales = in.log_scales, &target = in.target;
#ifdef PHYSMDN_SOA_KERNELS
  if (with_soa_physics(logits, means, log_scales, target, p0, p1, extra, args, order, rows, nullptr, nullptr,
                       [&]<typename scalar_t>(const auto& phys) {
                         soa::run<false, scalar_t>(logits, means, log_scales, target, phys, nullptr, 1.0f,
                                                   loss.data_ptr<scalar_t>(), saved.data_ptr<float>(), nullptr,
                                                   nullptr, nullptr, nullptr, nullptr);
                       }))
    return;
#endif
  if (use_blocked_family_path(logits, means, log_scales, target, args, rows, /*param_grad=*/false))
    return dispatch_blocked_dtype(means.scalar_type(), [&]<typename T>() {
      mdn_loss_forward_blocked<T>(logits, means, log_scales, target, p0, p1, extra, args, order, rows, loss, saved);
    });
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

bool mdn_loss_forward_grad(const at::Tensor& logits_in, const at::Tensor& means_in, const at::Tensor& log_scales_in,
                           const at::Tensor& target_in, const at::Tensor& p0, const at::Tensor& p1,
                           const c10::optional<at::Tensor>& extra, const PhysicsArgs& args, int order, int64_t rows,
                           at::Tensor& loss, at::Tensor& saved, at::Tensor& grad_logits, at::Tensor& grad_means,
                           at::Tensor& grad_log_scales, at::Tensor& grad_target, at::Tensor& grad_extra,
                           double grad_scale) {
  const MixtureInputs in(logits_in, means_in, log_scales_in, target_in, soa_family(args, order, rows));
  const at::Tensor &logits = in.logits, &means = in.means, &log_scales = in.log_scales, &target = in.target;
#ifdef PHYSMDN_SOA_KERNELS
  // one pass for the loss and the gradients (lane-parallel kernel); otherwise op_impl runs forward + backward
  const bool float_grads = grad_means.scalar_type() == at::kFloat;
  if (with_soa_physics(logits, means, log_scales, target, p0, p1, extra, args, order, rows, nullptr, nullptr,
                       [&]<typename scalar_t>(const auto& phys) {
                         const auto run = [&]<typename grad_t>() {
                           soa::run<true, scalar_t, grad_t>(
                               logits, means, log_scales, target, phys, nullptr, static_cast<float>(grad_scale),
                               loss.data_ptr<scalar_t>(), saved.data_ptr<float>(), grad_logits.data_ptr<grad_t>(),
                               grad_means.data_ptr<grad_t>(), grad_log_scales.data_ptr<grad_t>(),
                               grad_target.data_ptr<grad_t>(),
                               grad_extra.numel() ? grad_extra.data_ptr<grad_t>() : nullptr);
                         };
                         if (float_grads)
                           run.template operator()<float>();
                         else
                           run.template operator()<scalar_t>();  // the input dtype, no float32 copy
                       }))
    return true;
#endif
  (void)logits, (void)means, (void)log_scales, (void)target, (void)p0, (void)p1, (void)extra, (void)args, (void)order;
  (void)rows, (void)loss, (void)saved, (void)grad_logits, (void)grad_means, (void)grad_log_scales, (void)grad_target;
  (void)grad_extra, (void)grad_scale;
  return false;
}

void mdn_loss_backward(const at::Tensor& grad_loss, const at::Tensor& logits_in, const at::Tensor& means_in,
                       const at::Tensor& log_scales_in, const at::Tensor& target_in, const at::Tensor& p0,
                       const at::Tensor& p1, const c10::optional<at::Tensor>& extra, const PhysicsArgs& args,
                       int order, int64_t rows, const at::Tensor& saved, at::Tensor& grad_logits,
                       at::Tensor& grad_means, at::Tensor& grad_log_scales, at::Tensor& grad_target,
                       at::Tensor& grad_p0, at::Tensor& grad_p1, at::Tensor& grad_extra) {
  const MixtureInputs in(logits_in, means_in, log_scales_in, target_in, soa_family(args, order, rows));
  const at::Tensor &logits = in.logits, &means = in.means, &log_scales = in.log_scales, &target = in.target;
#ifdef PHYSMDN_SOA_KERNELS
  // recomputes the forward per group (the saved state is not needed by the lane-parallel kernel)
  if (with_soa_physics(logits, means, log_scales, target, p0, p1, extra, args, order, rows,
                       float_data_or_null(grad_p0), float_data_or_null(grad_p1),
                       [&]<typename scalar_t>(const auto& phys) {
                         soa::run<true, scalar_t>(logits, means, log_scales, target, phys, &grad_loss, 1.0f, nullptr,
                                                  nullptr, grad_logits.data_ptr<float>(), grad_means.data_ptr<float>(),
                                                  grad_log_scales.data_ptr<float>(), grad_target.data_ptr<float>(),
                                                  grad_extra.numel() ? grad_extra.data_ptr<float>() : nullptr);
                       }))
    return;
#endif
  if (use_blocked_family_path(logits, means, log_scales, target, args, rows,
                              /*param_grad=*/grad_p0.numel() > 0 || grad_p1.numel() > 0))
    return dispatch_blocked_dtype(means.scalar_type(), [&]<typename T>() {
      mdn_loss_backward_blocked<T>(grad_loss, logits, means, log_scales, target, p0, p1, extra, args, order, rows,
                                   saved, grad_logits, grad_means, grad_log_scales, grad_target, grad_extra);
    });
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

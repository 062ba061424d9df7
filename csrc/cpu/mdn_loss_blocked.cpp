// The fused loss's blocked family path (paths.h: blocked_family_path_applies): contiguous float32 / float64 inputs,
// the polynomial family ([B|1, K|1, D|1, J+1] coefficients: one law per component, or per component and
// dimension) or the linear one, and no gradient for the family's parameters. The Gaussian-moment expectation runs
// as flat vector loops over the block's elements. With q = c * c (autoconvolution, once per component, or per
// element when the coefficients vary over D), E[p^2] = sum_n q_n M_n, dE/dmu = sum_n q_n n M_{n-1},
// dE/dvar = sum_n q_n n (n - 1) / 2 M_{n-2} (as physics_math.h). The linear family: LinearFamily below.
// Compiled once per instruction set (PHYSMDN_CPU_ISA names the namespace).
#include "cpu/vec.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/blocked.h"
#include "cpu/dispatch.h"
#include "cpu/mdn_loss_paths.h"
#include "physics_math.h"
#include "views.h"

namespace physmdn::cpu::PHYSMDN_CPU_ISA {
namespace {

template <typename T>
struct PolyBlock {
  int nq;                        // 2J + 1 autoconvolution terms (second moment), J + 1 coefficients (first moment)
  bool square;                   // q = c * c (second moment), else q = c
  std::vector<T> q_row;          // [rows, nq]
  std::vector<T> q_elem;         // [nq, elements] (per-element copies for the vector loops)
  std::vector<T> pen, dmu, dls;  // per element: E[p^2] (or E[p]), dE/dmu, dE/dlog_scale
  PolyBlock(int64_t K, int64_t D, int order, bool square_)
      : nq(square_ ? 2 * order + 1 : order + 1), square(square_), q_row(kBlockSamples * K * nq), q_elem(static_cast<size_t>(nq) * kBlockSamples * K * D),
        pen(kBlockSamples * K * D), dmu(kBlockSamples * K * D), dls(kBlockSamples * K * D) {}

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
  using Vec = Vec<T>;
  int64_t e = 0;
  const Vec zero(T(0)), two(T(2)), nvv(noise_var);
  for (; e + Vec::size() <= E; e += Vec::size()) {
    const Vec m = Vec::loadu(mu + e);
    Vec v = zero, dvdls = zero;
    if (with_var) {
      const Vec raw = (two * Vec::loadu(ls + e)).exp();
      v = maximum(raw - nvv, zero);
      dvdls = where_greater(raw, nvv, two * raw, zero);
    }
    Vec m_prev2(T(1)), m_prev = m;
    const Vec q1 = nq > 1 ? Vec::loadu(q_elem + E + e) : zero;  // J = 0: a constant, no q_1
    Vec P = Vec::loadu(q_elem + e) + q1 * m;
    Vec dm = q1, dv = zero;
    for (int n = 2; n < nq; ++n) {
      const Vec qn = Vec::loadu(q_elem + n * E + e);
      if constexpr (kGrad) {
        dm = fmadd(qn * Vec(static_cast<T>(n)), m_prev, dm);
        dv = fmadd(qn * Vec(static_cast<T>(n * (n - 1) / 2)), m_prev2, dv);
      }
      const Vec mn = fmadd(m, m_prev, Vec(static_cast<T>(n - 1)) * v * m_prev2);
      P = fmadd(qn, mn, P);
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
  BlockedInputs(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                const Tensor& target, const Tensor& p0, const OptionalTensor& ex,
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
  LinearFamily(const BlockedInputs<T>& in_, const Tensor& p0, const Tensor& p1, const PhysicsArgs& args,
               int64_t rows_, int64_t K_, int64_t D_)
      : in(in_), A(make_strided<T>(p0)), bias(make_strided<T>(p1)), rows(rows_), K(K_), D(D_),
        second(args.moment == math::kSecond),
        var(kBlockSamples * K_ * D_), dvar(kBlockSamples * K_ * D_), gm(kBlockSamples * K_ * D_), gs(kBlockSamples * K_ * D_) {}
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
void with_blocked_family(const BlockedInputs<T>& in, const Tensor& p0, const Tensor& p1, const PhysicsArgs& args,
                         int order, int64_t rows, int64_t K, int64_t D, Fn&& fn) {
  if (args.family == math::kLinear)
    return fn([&] { return LinearFamily<T>(in, p0, p1, args, rows, K, D); });
  fn([&] { return PolyFamily<T>(in, args, order, K, D); });
}

template <typename T>
void forward_blocked(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                     const Tensor& target, const Tensor& p0, const Tensor& p1,
                     const OptionalTensor& extra, const PhysicsArgs& args, int order, int64_t rows,
                     Tensor& loss, Tensor& saved) {
  const int64_t B = means.size(0), K = means.size(1), D = means.size(2), KD = K * D;
  const BlockedInputs<T> in(logits, means, log_scales, target, p0, extra, args);
  const T *lg = in.lg, *mu = in.mu, *ls = in.ls, *y = in.y;
  const T w = in.weight;
  T *out = loss.mutable_data_ptr<T>(), *sv = saved.mutable_data_ptr<T>();
  with_blocked_family(in, p0, p1, args, order, rows, K, D, [&](auto&& make_family) {
    torch::stable::parallel_for(0, (B + kBlockSamples - 1) / kBlockSamples, 1, [&](int64_t blk_begin, int64_t blk_end) {
      BlockBuffers<T> fb(K, D);
      auto fam = make_family();
      for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
        const int64_t b0 = blk * kBlockSamples, nb = std::min(kBlockSamples, B - b0), E = nb * KD;
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
void backward_blocked(const Tensor& grad_loss, const Tensor& logits, const Tensor& means,
                      const Tensor& log_scales, const Tensor& target, const Tensor& p0,
                      const Tensor& p1, const OptionalTensor& extra, const PhysicsArgs& args,
                      int order, int64_t rows, const Tensor& saved, Tensor& grad_logits,
                      Tensor& grad_means, Tensor& grad_log_scales, Tensor& grad_target,
                      Tensor& grad_extra) {
  const int64_t B = means.size(0), K = means.size(1), D = means.size(2), KD = K * D;
  const BlockedInputs<T> in(logits, means, log_scales, target, p0, extra, args);
  const T *lg = in.lg, *mu = in.mu, *ls = in.ls, *y = in.y;
  const T w = in.weight;
  const T* g_ptr = grad_loss.const_data_ptr<T>();
  const int64_t g_stride = grad_loss.stride(0);
  const T* sv = saved.const_data_ptr<T>();
  T *gl = grad_logits.mutable_data_ptr<T>(), *gm = grad_means.mutable_data_ptr<T>();
  T *gs = grad_log_scales.mutable_data_ptr<T>(), *gt = grad_target.mutable_data_ptr<T>();
  T* ge = grad_extra.numel() ? grad_extra.mutable_data_ptr<T>() : nullptr;
  with_blocked_family(in, p0, p1, args, order, rows, K, D, [&](auto&& make_family) {
    torch::stable::parallel_for(0, (B + kBlockSamples - 1) / kBlockSamples, 1, [&](int64_t blk_begin, int64_t blk_end) {
      BlockBuffers<T> fb(K, D);
      auto fam = make_family();
      std::vector<T> pi_blk(kBlockSamples * K), gamma_blk(kBlockSamples * K);
      for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
        const int64_t b0 = blk * kBlockSamples, nb = std::min(kBlockSamples, B - b0), E = nb * KD;
        // likelihood part, as mixture_nll_backward_blocked
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

}  // namespace

void mdn_loss_forward_blocked(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                              const Tensor& target, const Tensor& p0, const Tensor& p1,
                              const OptionalTensor& extra, const PhysicsArgs& args, int order, int64_t rows,
                              Tensor& loss, Tensor& saved) {
  dispatch_float_or_double(means.scalar_type(), [&]<typename T>() {
    forward_blocked<T>(logits, means, log_scales, target, p0, p1, extra, args, order, rows, loss, saved);
  });
}

void mdn_loss_backward_blocked(const Tensor& grad_loss, const Tensor& logits, const Tensor& means,
                               const Tensor& log_scales, const Tensor& target, const Tensor& p0,
                               const Tensor& p1, const OptionalTensor& extra, const PhysicsArgs& args,
                               int order, int64_t rows, const Tensor& saved, Tensor& grad_logits,
                               Tensor& grad_means, Tensor& grad_log_scales, Tensor& grad_target,
                               Tensor& grad_extra) {
  dispatch_float_or_double(means.scalar_type(), [&]<typename T>() {
    backward_blocked<T>(grad_loss, logits, means, log_scales, target, p0, p1, extra, args, order, rows, saved,
                        grad_logits, grad_means, grad_log_scales, grad_target, grad_extra);
  });
}

}  // namespace physmdn::cpu::PHYSMDN_CPU_ISA

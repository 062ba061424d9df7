// Per-sample math of the fused MDN loss: mixture NLL + mixture-weighted physics penalty, written once for
// the CPU driver (csrc/cpu/*.cpp) and the CUDA kernels (csrc/cuda/device_kernels.cuh).
//
//   loss_b = NLL_b + sum_k pi_bk Q_bk,   Q_bk = weight * P_bk + extra_bk,   pi = softmax(logits)
//
// P_bk is the penalty of one built-in residual family under component k's Gaussian Y ~ N(mu, diag v), in one of
// three moments (docs/physics.md):
//   second  P = E||r(Y)||^2     one state per component plus noise
//   first   P = ||E r(Y)||^2    a component that spans a family of states (E r of a field; the variance terms drop)
//   point   P = ||r(mu)||^2     (v = 0)
// for the families
//   polynomial  r_d(y) = sum_j c_j y_d^j
//   linear      r(y) = A y - b                      (first = point: E r = r(mu))
//   stencil     r_i(u) = a (u_{i-1} - 2 u_i + u_{i+1}) / h^2 + sum_j c_j u_i^j
// v = exp(2 log_scale), minus the observation-noise variance when noise-aware (floored at 0). extra_bk is a penalty
// computed in torch (any other spec), already weighted. Coupled weights: the gradient of loss_b with respect to
// logit_k gains pi_k (Q_k - sum_j pi_j Q_j), which moves mass between components; detached weights leave it out
// (pi is a constant of the penalty).
#pragma once
#include "mixture_math.h"

namespace physmdn::math {

constexpr int kMaxOrder = 8;          // polynomial order J handled in the kernels (moments up to 2J)
constexpr int kSavedPerSampleLoss = 4;  // max logit, log sum, LSE_k(log pi + log N), sum_k pi_k Q_k

enum Family : int { kFamilyNone = -1, kPolynomial = 0, kLinear = 1, kStencil = 2 };
enum Boundary : int { kPeriodic = 0, kNeumann = 1 };
enum Moment : int { kPoint = 0, kFirst = 1, kSecond = 2 };

template <typename scalar_t>
struct Strided4 {
  const scalar_t* data = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  PHYSMDN_HD scalar_t operator()(int64_t i0, int64_t i1, int64_t i2 = 0, int64_t i3 = 0) const {
    return data[i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3];
  }
};

// The physics side of one fused call. p0/p1 are the family's parameters expanded to [B, K, ...]
// (stride 0 where broadcast): polynomial c = p0 [B,K,D,J+1]; linear A = p0 [B,K,M,D], b = p1 [B,K,M];
// stencil a = p0 [B,K], c = p1 [B,K,J+1].
template <typename scalar_t>
struct PhysicsView {
  int family = kFamilyNone;
  int moment = kSecond;
  bool couple_weights = false;  // the penalty's gradient reaches the mixture weights
  int order = 0;     // J (polynomial, stencil)
  int64_t rows = 0;  // M (linear)
  int boundary = kPeriodic;
  double weight = 1.0, inv_h2 = 1.0, noise_var = 0.0;
  Strided4<scalar_t> p0, p1;
  const scalar_t* extra = nullptr;  // [B, K] or null
  int64_t extra_sb = 0, extra_sk = 0;
};

// Gaussian raw moments M_n = E[y^n], n = 0..n_max, y ~ N(m, v): M_n = m M_{n-1} + (n - 1) v M_{n-2}.
template <typename acc_t>
PHYSMDN_HD void gaussian_moments(acc_t m, acc_t v, int n_max, acc_t* M) {
  M[0] = acc_t(1);
  if (n_max >= 1) M[1] = m;
  for (int n = 2; n <= n_max; ++n) M[n] = m * M[n - 1] + acc_t(n - 1) * v * M[n - 2];
}

// Variance of component k at dimension d under the penalty (0 for the point value), and d variance / d log_scale.
template <typename acc_t>
struct VarianceAt {
  acc_t v, dv_dls;
};
template <typename acc_t>
PHYSMDN_HD VarianceAt<acc_t> penalty_variance(acc_t log_scale, int moment, acc_t noise_var) {
  if (moment == kPoint) return {acc_t(0), acc_t(0)};
  const acc_t raw = exp_(acc_t(2) * log_scale);
  if (noise_var > acc_t(0)) {
    if (raw > noise_var) return {raw - noise_var, acc_t(2) * raw};
    return {acc_t(0), acc_t(0)};
  }
  return {raw, acc_t(2) * raw};
}

// Quadratic form helpers of a polynomial p(y) = sum_{j<=J} c_j y^j under moments M (length >= 2J + 1):
//   E[p] = sum_j c_j M_j,  E[p^2] = sum_{i,j} c_i c_j M_{i+j}, and their derivatives in m and v through
//   dM_n/dm = n M_{n-1}, dM_n/dv = n (n - 1) / 2 M_{n-2}.
template <typename acc_t>
struct PolyStats {
  acc_t ep, ep2, dep_dm, dep_dv, dep2_dm, dep2_dv;
};
// E[p] alone and its derivatives in m and v (the first moment needs moments up to J only).
template <typename acc_t, bool kGrad>
PHYSMDN_HD PolyStats<acc_t> poly_mean_stats(const acc_t* c, int J, const acc_t* M) {
  PolyStats<acc_t> s{acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  for (int j = 0; j <= J; ++j) {
    s.ep += c[j] * M[j];
    if (kGrad) {
      if (j >= 1) s.dep_dm += c[j] * acc_t(j) * M[j - 1];
      if (j >= 2) s.dep_dv += c[j] * acc_t(j * (j - 1) / 2) * M[j - 2];
    }
  }
  return s;
}

// E[p] and E[p^2] with their derivatives (moments up to 2J).
template <typename acc_t, bool kGrad>
PHYSMDN_HD PolyStats<acc_t> poly_stats(const acc_t* c, int J, const acc_t* M) {
  PolyStats<acc_t> s = poly_mean_stats<acc_t, kGrad>(c, J, M);
  for (int j = 0; j <= J; ++j) {
    for (int i = 0; i <= J; ++i) {
      const acc_t cc = c[i] * c[j];
      const int n = i + j;
      s.ep2 += cc * M[n];
      if (kGrad) {
        if (n >= 1) s.dep2_dm += cc * acc_t(n) * M[n - 1];
        if (n >= 2) s.dep2_dv += cc * acc_t(n * (n - 1) / 2) * M[n - 2];
      }
    }
  }
  return s;
}

// Pointers into one (b, k) row of the gradient outputs. gmu / gls accumulate; gp0 / gp1 are set.
template <typename acc_t>
struct PenaltyGrads {
  acc_t* gmu;
  acc_t* gls;
  acc_t* gp0;  // null when the parameter needs no gradient
  acc_t* gp1;
};

template <typename acc_t, typename scalar_t>
PHYSMDN_HD acc_t load_mu(const MixtureView<scalar_t>& v, int64_t b, int64_t k, int64_t d) {
  return static_cast<acc_t>(v.means[b * v.means_sb + k * v.means_sk + d * v.means_sd]);
}
template <typename acc_t, typename scalar_t>
PHYSMDN_HD acc_t load_ls(const MixtureView<scalar_t>& v, int64_t b, int64_t k, int64_t d) {
  return static_cast<acc_t>(v.log_scales[b * v.scales_sb + k * v.scales_sk + d * v.scales_sd]);
}

// ----- polynomial -------------------------------------------------------------------------------------
template <typename acc_t, bool kGrad, typename scalar_t, typename pscalar_t>
PHYSMDN_HD acc_t polynomial_penalty(const MixtureView<scalar_t>& v, const PhysicsView<pscalar_t>& p, int64_t b,
                                    int64_t k, acc_t scale, PenaltyGrads<acc_t> g) {
  const int J = p.order;
  const acc_t nv = static_cast<acc_t>(p.noise_var);
  acc_t c[kMaxOrder + 1], M[2 * kMaxOrder + 1];
  acc_t total = acc_t(0);
  const bool first = p.moment == kFirst;
  for (int64_t d = 0; d < v.D; ++d) {
    const acc_t m = load_mu<acc_t>(v, b, k, d);
    const auto var = penalty_variance<acc_t>(load_ls<acc_t>(v, b, k, d), p.moment, nv);
    for (int j = 0; j <= J; ++j) c[j] = static_cast<acc_t>(p.p0(b, k, d, j));
    if (first) {  // (E p)^2: d/dm = 2 E[p] dE[p]/dm, d/dc_j = 2 E[p] M_j
      gaussian_moments<acc_t>(m, var.v, J, M);
      const auto s = poly_mean_stats<acc_t, kGrad>(c, J, M);
      total += s.ep * s.ep;
      if (kGrad) {
        const acc_t two_ep = acc_t(2) * s.ep;
        g.gmu[d] += scale * two_ep * s.dep_dm;
        g.gls[d] += scale * two_ep * s.dep_dv * var.dv_dls;
        if (g.gp0)
          for (int j = 0; j <= J; ++j) g.gp0[d * (J + 1) + j] = scale * two_ep * M[j];
      }
      continue;
    }
    gaussian_moments<acc_t>(m, var.v, 2 * J, M);
    const auto s = poly_stats<acc_t, kGrad>(c, J, M);
    total += s.ep2;
    if (kGrad) {
      g.gmu[d] += scale * s.dep2_dm;
      g.gls[d] += scale * s.dep2_dv * var.dv_dls;
      if (g.gp0) {
        for (int j = 0; j <= J; ++j) {  // dE[p^2]/dc_j = 2 sum_i c_i M_{i+j}
          acc_t acc = acc_t(0);
          for (int i = 0; i <= J; ++i) acc += c[i] * M[i + j];
          g.gp0[d * (J + 1) + j] = scale * acc_t(2) * acc;
        }
      }
    }
  }
  return total;
}

// ----- linear -----------------------------------------------------------------------------------------
template <typename acc_t, bool kGrad, typename scalar_t, typename pscalar_t>
PHYSMDN_HD acc_t linear_penalty(const MixtureView<scalar_t>& v, const PhysicsView<pscalar_t>& p, int64_t b,
                                int64_t k, acc_t scale, PenaltyGrads<acc_t> g) {
  const int64_t Mrows = p.rows, D = v.D;
  const acc_t nv = static_cast<acc_t>(p.noise_var);
  const int moment = p.moment == kSecond ? kSecond : kPoint;  // E r = r(mu): the first moment is the point value
  acc_t total = acc_t(0);
  for (int64_t r = 0; r < Mrows; ++r) {
    acc_t e = -static_cast<acc_t>(p.p1(b, k, r));
    for (int64_t d = 0; d < D; ++d) e += static_cast<acc_t>(p.p0(b, k, r, d)) * load_mu<acc_t>(v, b, k, d);
    total += e * e;
    if (kGrad) {
      for (int64_t d = 0; d < D; ++d) {
        const acc_t a = static_cast<acc_t>(p.p0(b, k, r, d));
        g.gmu[d] += scale * acc_t(2) * e * a;
        if (g.gp0) {
          const acc_t var = penalty_variance<acc_t>(load_ls<acc_t>(v, b, k, d), moment, nv).v;
          g.gp0[r * D + d] = scale * acc_t(2) * (e * load_mu<acc_t>(v, b, k, d) + a * var);
        }
      }
      if (g.gp1) g.gp1[r] = -scale * acc_t(2) * e;
    }
  }
  if (moment == kSecond) {
    for (int64_t d = 0; d < D; ++d) {
      const auto var = penalty_variance<acc_t>(load_ls<acc_t>(v, b, k, d), kSecond, nv);
      acc_t col = acc_t(0);
      for (int64_t r = 0; r < Mrows; ++r) {
        const acc_t a = static_cast<acc_t>(p.p0(b, k, r, d));
        col += a * a;
      }
      total += var.v * col;
      if (kGrad) g.gls[d] += scale * col * var.dv_dls;
    }
  }
  return total;
}

// ----- 1-D stencil with polynomial reaction -----------------------------------------------------------
// Neighbours of grid point i with their stencil weights (i excluded; a neighbour that folds onto i adds to
// the diagonal instead). Periodic wraps; Neumann mirrors (u_{-1} = u_1, u_D = u_{D-2}).
struct StencilRow {
  int64_t j[2];
  double w[2];
  int n;
  double diag;
};
// j is i - 1 or i + 1 for a grid point 0 <= i < D (no 64-bit remainder: on a GPU that is a call, whose saved
// registers spill).
PHYSMDN_HD int64_t stencil_neighbour(int64_t j, int64_t D, int boundary) {
  if (boundary == kPeriodic) return j < 0 ? j + D : (j >= D ? j - D : j);
  if (j < 0) j = -j;
  if (j >= D) j = 2 * (D - 1) - j;
  return j < 0 ? 0 : (j >= D ? D - 1 : j);
}
PHYSMDN_HD StencilRow stencil_row(int64_t i, int64_t D, int boundary) {
  StencilRow row{{0, 0}, {0.0, 0.0}, 0, -2.0};
  const int64_t nb[2] = {stencil_neighbour(i - 1, D, boundary), stencil_neighbour(i + 1, D, boundary)};
  for (int t = 0; t < 2; ++t) {
    if (nb[t] == i) {
      row.diag += 1.0;
    } else if (row.n == 1 && row.j[0] == nb[t]) {
      row.w[0] += 1.0;
    } else {
      row.j[row.n] = nb[t];
      row.w[row.n] = 1.0;
      ++row.n;
    }
  }
  return row;
}

template <typename acc_t, bool kGrad, typename scalar_t, typename pscalar_t>
PHYSMDN_HD acc_t stencil_penalty(const MixtureView<scalar_t>& v, const PhysicsView<pscalar_t>& p, int64_t b,
                                 int64_t k, acc_t scale, PenaltyGrads<acc_t> g) {
  // Grid points are independent under a diagonal Gaussian: E[r_i] = a N_i + E[f'(u_i)] with N_i the neighbour sum
  // and f' = f + a diag_i u_i; the second moment adds a^2 Var(N_i) + Var(f'(u_i)), the first moment is E[r_i]^2.
  const int64_t D = v.D;
  const int J = p.order;
  const int Jp = J < 1 ? 1 : J;  // the stencil's own-point term is linear in u_i
  const bool second = p.moment == kSecond;
  const int n_moments = second ? 2 * Jp : Jp;
  const acc_t nv = static_cast<acc_t>(p.noise_var);
  const acc_t a = static_cast<acc_t>(p.p0(b, k)) * static_cast<acc_t>(p.inv_h2);
  acc_t c[kMaxOrder + 1], M[2 * kMaxOrder + 1];
  acc_t total = acc_t(0), grad_a = acc_t(0);
  if (kGrad && g.gp1)
    for (int j = 0; j <= J; ++j) g.gp1[j] = acc_t(0);
  for (int64_t i = 0; i < D; ++i) {
    const StencilRow row = stencil_row(i, D, p.boundary);
    for (int j = 0; j <= Jp; ++j) c[j] = j <= J ? static_cast<acc_t>(p.p1(b, k, j)) : acc_t(0);
    c[1] += a * static_cast<acc_t>(row.diag);
    acc_t nsum = acc_t(0), nvar = acc_t(0);
    for (int t = 0; t < row.n; ++t) {
      const acc_t w = static_cast<acc_t>(row.w[t]);
      nsum += w * load_mu<acc_t>(v, b, k, row.j[t]);
      if (second) nvar += w * w * penalty_variance<acc_t>(load_ls<acc_t>(v, b, k, row.j[t]), p.moment, nv).v;
    }
    const acc_t n_mean = a * nsum;
    const auto var = penalty_variance<acc_t>(load_ls<acc_t>(v, b, k, i), p.moment, nv);
    gaussian_moments<acc_t>(load_mu<acc_t>(v, b, k, i), var.v, n_moments, M);
    const auto s = second ? poly_stats<acc_t, kGrad>(c, Jp, M) : poly_mean_stats<acc_t, kGrad>(c, Jp, M);
    const acc_t er = n_mean + s.ep;
    total += er * er + (second ? a * a * nvar + (s.ep2 - s.ep * s.ep) : acc_t(0));
    if (kGrad) {
      for (int t = 0; t < row.n; ++t) {
        const acc_t w = static_cast<acc_t>(row.w[t]);
        g.gmu[row.j[t]] += scale * acc_t(2) * er * a * w;
        if (second) {
          const auto vj = penalty_variance<acc_t>(load_ls<acc_t>(v, b, k, row.j[t]), p.moment, nv);
          g.gls[row.j[t]] += scale * a * a * w * w * vj.dv_dls;
        }
      }
      if (second) {
        g.gmu[i] += scale * (acc_t(2) * n_mean * s.dep_dm + s.dep2_dm);
        g.gls[i] += scale * (acc_t(2) * n_mean * s.dep_dv + s.dep2_dv) * var.dv_dls;
      } else {
        g.gmu[i] += scale * acc_t(2) * er * s.dep_dm;
        g.gls[i] += scale * acc_t(2) * er * s.dep_dv * var.dv_dls;
      }
      // second: dP_i/dc'_j = 2 N M_j + 2 sum_l c'_l M_{j+l};  first: dP_i/dc'_j = 2 E[r_i] M_j
      acc_t dc1 = acc_t(0);
      for (int j = 0; j <= Jp; ++j) {
        acc_t dcj = acc_t(2) * er * M[j];
        if (second) {
          acc_t acc = acc_t(0);
          for (int l = 0; l <= Jp; ++l) acc += c[l] * M[j + l];
          dcj = acc_t(2) * (n_mean * M[j] + acc);
        }
        if (j == 1) dc1 = dcj;
        if (g.gp1 && j <= J) g.gp1[j] += scale * dcj;
      }
      grad_a += acc_t(2) * er * nsum + (second ? acc_t(2) * a * nvar : acc_t(0)) + static_cast<acc_t>(row.diag) * dc1;
    }
  }
  if (kGrad && g.gp0) g.gp0[0] = scale * grad_a * static_cast<acc_t>(p.inv_h2);
  return total;
}

// Whether the family parameters of component (b, k) are all finite (x - x == 0 only for finite x).
template <typename acc_t, typename pscalar_t>
PHYSMDN_HD bool params_finite(const PhysicsView<pscalar_t>& p, int64_t b, int64_t k, int64_t D) {
  acc_t z = acc_t(0);
  if (p.family == kPolynomial) {
    for (int64_t d = 0; d < D; ++d)
      for (int j = 0; j <= p.order; ++j) {
        const acc_t c = static_cast<acc_t>(p.p0(b, k, d, j));
        z += c - c;
      }
  } else if (p.family == kLinear) {
    for (int64_t r = 0; r < p.rows; ++r) {
      const acc_t bb = static_cast<acc_t>(p.p1(b, k, r));
      z += bb - bb;
      for (int64_t d = 0; d < D; ++d) {
        const acc_t a = static_cast<acc_t>(p.p0(b, k, r, d));
        z += a - a;
      }
    }
  } else if (p.family == kStencil) {
    const acc_t a = static_cast<acc_t>(p.p0(b, k));
    z += a - a;
    for (int j = 0; j <= p.order; ++j) {
      const acc_t c = static_cast<acc_t>(p.p1(b, k, j));
      z += c - c;
    }
  }
  return z == acc_t(0);
}

// Whether component k's means, log-scales and family parameters are all finite.
template <typename acc_t, typename scalar_t, typename pscalar_t>
PHYSMDN_HD bool component_finite(const MixtureView<scalar_t>& v, const PhysicsView<pscalar_t>& p, int64_t b, int64_t k) {
  acc_t z = acc_t(0);
  for (int64_t d = 0; d < v.D; ++d) {
    const acc_t m = load_mu<acc_t>(v, b, k, d), l = load_ls<acc_t>(v, b, k, d);
    z += (m - m) + (l - l);
  }
  return z == acc_t(0) && params_finite<acc_t>(p, b, k, v.D);
}

template <typename acc_t, bool kGrad, typename scalar_t, typename pscalar_t>
PHYSMDN_HD acc_t family_penalty(const MixtureView<scalar_t>& v, const PhysicsView<pscalar_t>& p, int64_t b, int64_t k,
                                acc_t scale, PenaltyGrads<acc_t> g) {
  acc_t r = acc_t(0);
  switch (p.family) {
    case kPolynomial: r = polynomial_penalty<acc_t, kGrad>(v, p, b, k, scale, g); break;
    case kLinear: r = linear_penalty<acc_t, kGrad>(v, p, b, k, scale, g); break;
    case kStencil: r = stencil_penalty<acc_t, kGrad>(v, p, b, k, scale, g); break;
    default: return acc_t(0);
  }
  // The penalty is an expectation of a square (>= 0). From finite inputs a NaN can only be inf - inf between
  // moments that overflowed (huge scales): the value is +inf, not NaN. NaN inputs keep their NaN.
  if (r != r && component_finite<acc_t>(v, p, b, k)) r = std::numeric_limits<acc_t>::infinity();
  return r;
}

// Sizes of one (b, k) row of the parameter gradients.
template <typename scalar_t>
PHYSMDN_HD void param_row_sizes(const PhysicsView<scalar_t>& p, int64_t D, int64_t* n0, int64_t* n1) {
  switch (p.family) {
    case kPolynomial: *n0 = D * (p.order + 1); *n1 = 0; break;
    case kLinear: *n0 = p.rows * D; *n1 = p.rows; break;
    case kStencil: *n0 = 1; *n1 = p.order + 1; break;
    default: *n0 = 0; *n1 = 0;
  }
}

template <typename acc_t, typename scalar_t>
PHYSMDN_HD acc_t extra_penalty(const PhysicsView<scalar_t>& p, int64_t b, int64_t k) {
  return p.extra ? static_cast<acc_t>(p.extra[b * p.extra_sb + k * p.extra_sk]) : acc_t(0);
}

// Forward for one sample: returns loss_b and writes saved[0..3] (see kSavedPerSampleLoss).
template <typename acc_t, typename scalar_t, typename pscalar_t>
PHYSMDN_HD acc_t mdn_loss_sample(const MixtureView<scalar_t>& v, const PhysicsView<pscalar_t>& p, int64_t b,
                                 acc_t* saved) {
  logits_norm<acc_t>(v, b, saved, saved + 1);
  OnlineLSE<acc_t> joint;
  acc_t pbar = acc_t(0);
  const acc_t w = static_cast<acc_t>(p.weight);
  const PenaltyGrads<acc_t> none{nullptr, nullptr, nullptr, nullptr};
  const scalar_t* lg = v.logits + b * v.logits_sb;
  for (int64_t k = 0; k < v.K; ++k) {
    const acc_t log_pi = (static_cast<acc_t>(lg[k * v.logits_sk]) - saved[0]) - saved[1];
    joint.add(log_pi + component_log_density<acc_t>(v, b, k));
    const acc_t pi = exp_(log_pi);
    if (pi > acc_t(0)) {  // a component without mass contributes nothing, even with an infinite penalty
      pbar += pi * (w * family_penalty<acc_t, false>(v, p, b, k, acc_t(0), none) + extra_penalty<acc_t>(p, b, k));
    }
  }
  saved[2] = joint.value();
  saved[3] = pbar;
  return pbar - saved[2];
}

// Backward for one sample. Rows: grad_logits [K], grad_means/grad_log_scales [K, D], grad_target [D],
// grad_p0 [K, n0] / grad_p1 [K, n1] (null when not needed), grad_extra [K] (null when no extra).
template <typename acc_t, typename scalar_t, typename pscalar_t>
PHYSMDN_HD void mdn_loss_sample_backward(const MixtureView<scalar_t>& v, const PhysicsView<pscalar_t>& p, int64_t b,
                                         acc_t g, const acc_t* saved, acc_t* grad_logits, acc_t* grad_means,
                                         acc_t* grad_log_scales, acc_t* grad_target, acc_t* grad_p0, acc_t* grad_p1,
                                         acc_t* grad_extra) {
  const scalar_t* lg = v.logits + b * v.logits_sb;
  const scalar_t* y = v.target + b * v.target_sb;
  const acc_t w = static_cast<acc_t>(p.weight);
  int64_t n0 = 0, n1 = 0;
  param_row_sizes(p, v.D, &n0, &n1);
  for (int64_t d = 0; d < v.D; ++d) grad_target[d] = acc_t(0);
  for (int64_t k = 0; k < v.K; ++k) {
    const acc_t log_pi = (static_cast<acc_t>(lg[k * v.logits_sk]) - saved[0]) - saved[1];
    const acc_t gamma = exp_(log_pi + component_log_density<acc_t>(v, b, k) - saved[2]);
    const acc_t pi = exp_(log_pi);
    acc_t* gm = grad_means + k * v.D;
    acc_t* gs = grad_log_scales + k * v.D;
    // likelihood part (as in mixture_nll_sample_backward)
    const acc_t c = -g * gamma;
    const scalar_t* mu = v.means + b * v.means_sb + k * v.means_sk;
    const scalar_t* ls = v.log_scales + b * v.scales_sb + k * v.scales_sk;
    for (int64_t d = 0; d < v.D; ++d) {
      if (gamma == acc_t(0)) {
        gm[d] = gs[d] = acc_t(0);
        continue;
      }
      const acc_t inv_s = exp_(-static_cast<acc_t>(ls[d * v.scales_sd]));
      const acc_t z = (static_cast<acc_t>(y[d * v.target_sd]) - static_cast<acc_t>(mu[d * v.means_sd])) * inv_s;
      gm[d] = c * z * inv_s;
      gs[d] = c * (z * z - acc_t(1));
      grad_target[d] -= gm[d];
    }
    // penalty part
    acc_t* gp0 = grad_p0 ? grad_p0 + k * n0 : nullptr;
    acc_t* gp1 = grad_p1 ? grad_p1 + k * n1 : nullptr;
    acc_t q = acc_t(0);
    if (pi > acc_t(0)) {
      const PenaltyGrads<acc_t> pg{gm, gs, gp0, gp1};
      q = w * family_penalty<acc_t, true>(v, p, b, k, g * w * pi, pg) + extra_penalty<acc_t>(p, b, k);
    } else {
      for (int64_t i = 0; gp0 && i < n0; ++i) gp0[i] = acc_t(0);
      for (int64_t i = 0; gp1 && i < n1; ++i) gp1[i] = acc_t(0);
    }
    grad_logits[k] = g * (pi - gamma) + (p.couple_weights && pi > acc_t(0) ? g * pi * (q - saved[3]) : acc_t(0));
    if (grad_extra) grad_extra[k] = g * pi;
  }
}

}  // namespace physmdn::math

// Physics penalties of one correlated Gaussian component, Y ~ N(mu, F F^T + diag(c)) (F [D, Q] row-major, c [D] or
// none: F = scale_tril for full covariance, F = cov_factor and c = cov_diag for low rank), with their gradients in
// mu, F and c. Written once for the CPU driver (csrc/cpu/correlated_penalty.cpp) and the CUDA kernel
// (csrc/cuda/correlated.cuh); python/physmdn/physics_correlated.py holds the float64 reference and the derivation.
//
// The three moments of csrc/physics_math.h (second E|r|^2, first |E r|^2, point |r(mu)|^2) of the built-in families,
// with var_i = |F_i|^2 + c_i and the noise-free marginal variance v*_i = max(var_i - s^2, 0) (s the observation
// noise; v*_i = var_i without noise; 0 for the point value):
//   polynomial  the marginal moments of y_i ~ N(mu_i, v*_i), coordinate by coordinate
//   linear      E|A y - b|^2 = |A mu - b|^2 + S,  S = |A F|_F^2 + sum_d |A_:d|^2 h_d,  h_d = c_d + v*_d - var_d
//               (S clamped at 0 under noise); first = point = |A mu - b|^2
//   stencil     r_i = a n_i + q_i(u_i), n_i = sum_t w_t u_{j_t} over the neighbours j_t != i, q_i the polynomial in u_i
//               (reaction plus the stencil's own-point term); by Stein's lemma for jointly Gaussian variables
//               E r_i^2 = (a E n_i + E q_i)^2 + V_i + Var q_i + 2 a (G_i . F_i) E q_i'
//               with G_i = sum_t w_t F_{j_t} and V_i = a^2 (|G_i|^2 + sum_t w_t^2 h_{j_t}) (clamped at 0 under noise)
// Only arrays of the polynomial order live per thread; every Q-vector (G_i, the rows of A F) is a loop over F's rows,
// so D and Q are unbounded.
#pragma once
#include "physics_math.h"

namespace physmdn::math {

// One component's inputs: mu [D], F [D, Q], c [D] or null.
template <typename scalar_t>
struct CorrelatedComponent {
  const scalar_t* mu;
  const scalar_t* F;
  const scalar_t* c;
  int64_t D, Q;
};

// One component's gradient rows, in the accumulation dtype: mu [D], F [D, Q], c [D] (null without c).
template <typename acc_t>
struct CorrelatedGrads {
  acc_t* gmu;
  acc_t* gF;
  acc_t* gc;
};

// var_i, the noise-free v*_i and d v*_i / d var_i (0 where the clamp holds; the clamp passes the gradient at
// var_i = s^2, as torch.clamp does).
template <typename acc_t>
struct FreeVariance {
  acc_t var, v, slope;
};
template <typename acc_t, typename scalar_t>
PHYSMDN_HD FreeVariance<acc_t> free_variance(const CorrelatedComponent<scalar_t>& x, int64_t i, acc_t noise_var) {
  const scalar_t* f = x.F + i * x.Q;
  acc_t var = acc_t(0);
  for (int64_t q = 0; q < x.Q; ++q) {
    const acc_t t = static_cast<acc_t>(f[q]);
    var += t * t;
  }
  if (x.c) var += static_cast<acc_t>(x.c[i]);
  if (noise_var > acc_t(0)) {
    if (var >= noise_var) return {var, var - noise_var, acc_t(1)};
    return {var, acc_t(0), acc_t(0)};
  }
  return {var, var, acc_t(1)};
}

// h_j = c_j + v*_j - var_j: the diagonal part of the noise-free covariance beyond F F^T.
template <typename acc_t, typename scalar_t>
PHYSMDN_HD acc_t spread_diagonal(const CorrelatedComponent<scalar_t>& x, int64_t j, acc_t noise_var) {
  acc_t h = x.c ? static_cast<acc_t>(x.c[j]) : acc_t(0);
  if (noise_var > acc_t(0)) {
    const auto f = free_variance<acc_t>(x, j, noise_var);
    h += f.v - f.var;
  }
  return h;
}

// Adds the gradient of the penalty through v*_j (dv = dP/dv*_j) and h_j (dh = dP/dh_j) to F_j's row and c_j:
// d var_j = dv slope_j + dh (slope_j - 1) [under noise], dc_j = d var_j + dh, dF_j = 2 F_j d var_j.
template <typename acc_t, typename scalar_t>
PHYSMDN_HD void add_variance_grad(const CorrelatedComponent<scalar_t>& x, int64_t j, acc_t dv, acc_t dh,
                                  acc_t noise_var, const CorrelatedGrads<acc_t>& g) {
  acc_t dvar = dv;
  if (noise_var > acc_t(0)) {
    const acc_t slope = free_variance<acc_t>(x, j, noise_var).slope;
    dvar = dv * slope + dh * (slope - acc_t(1));
  }
  if (g.gc) g.gc[j] += dvar + dh;
  const scalar_t* f = x.F + j * x.Q;
  acc_t* gf = g.gF + j * x.Q;
  for (int64_t q = 0; q < x.Q; ++q) gf[q] += acc_t(2) * static_cast<acc_t>(f[q]) * dvar;
}

// ----- polynomial ---------------------------------------------------------------------------------------------------
template <typename acc_t, bool kGrad, typename scalar_t, typename pscalar_t>
PHYSMDN_HD acc_t correlated_polynomial(const CorrelatedComponent<scalar_t>& x, const PhysicsView<pscalar_t>& p,
                                       int64_t b, int64_t k, acc_t g, const CorrelatedGrads<acc_t>& gr) {
  const int J = p.order;
  const acc_t nv = static_cast<acc_t>(p.noise_var);
  const bool second = p.moment == kSecond, spread = p.moment != kPoint;
  acc_t c[kMaxOrder + 1], M[2 * kMaxOrder + 1];
  acc_t total = acc_t(0);
  for (int64_t i = 0; i < x.D; ++i) {
    const acc_t m = static_cast<acc_t>(x.mu[i]);
    const acc_t v = spread ? free_variance<acc_t>(x, i, nv).v : acc_t(0);
    for (int j = 0; j <= J; ++j) c[j] = static_cast<acc_t>(p.p0(b, k, i, j));
    gaussian_moments<acc_t>(m, v, second ? 2 * J : J, M);
    if (second) {
      const auto s = poly_stats<acc_t, kGrad>(c, J, M);
      total += s.ep2;
      if (kGrad) {
        gr.gmu[i] += g * s.dep2_dm;
        add_variance_grad<acc_t>(x, i, g * s.dep2_dv, acc_t(0), nv, gr);
      }
    } else {
      const auto s = poly_mean_stats<acc_t, kGrad>(c, J, M);
      total += s.ep * s.ep;
      if (kGrad) {
        const acc_t two_ep = g * acc_t(2) * s.ep;
        gr.gmu[i] += two_ep * s.dep_dm;
        if (spread) add_variance_grad<acc_t>(x, i, two_ep * s.dep_dv, acc_t(0), nv, gr);
      }
    }
  }
  return total;
}

// ----- linear -------------------------------------------------------------------------------------------------------
// |A_:d|^2, the squared norm of column d of A.
template <typename acc_t, typename pscalar_t>
PHYSMDN_HD acc_t column_square(const PhysicsView<pscalar_t>& p, int64_t b, int64_t k, int64_t d) {
  acc_t col = acc_t(0);
  for (int64_t r = 0; r < p.rows; ++r) {
    const acc_t a = static_cast<acc_t>(p.p0(b, k, r, d));
    col += a * a;
  }
  return col;
}

template <typename acc_t, bool kGrad, typename scalar_t, typename pscalar_t>
PHYSMDN_HD acc_t correlated_linear(const CorrelatedComponent<scalar_t>& x, const PhysicsView<pscalar_t>& p, int64_t b,
                                   int64_t k, acc_t g, const CorrelatedGrads<acc_t>& gr) {
  const int64_t rows = p.rows, D = x.D, Q = x.Q;
  const acc_t nv = static_cast<acc_t>(p.noise_var);
  acc_t total = acc_t(0);
  for (int64_t r = 0; r < rows; ++r) {
    acc_t e = -static_cast<acc_t>(p.p1(b, k, r));
    for (int64_t d = 0; d < D; ++d) e += static_cast<acc_t>(p.p0(b, k, r, d)) * static_cast<acc_t>(x.mu[d]);
    total += e * e;
    if (kGrad)
      for (int64_t d = 0; d < D; ++d) gr.gmu[d] += g * acc_t(2) * e * static_cast<acc_t>(p.p0(b, k, r, d));
  }
  if (p.moment != kSecond) return total;
  const bool diagonal = x.c != nullptr || nv > acc_t(0);  // whether h is nonzero
  acc_t S = acc_t(0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t q = 0; q < Q; ++q) {
      acc_t u = acc_t(0);  // (A F)_rq
      for (int64_t d = 0; d < D; ++d) u += static_cast<acc_t>(p.p0(b, k, r, d)) * static_cast<acc_t>(x.F[d * Q + q]);
      S += u * u;
    }
  if (diagonal)
    for (int64_t d = 0; d < D; ++d) S += column_square<acc_t>(p, b, k, d) * spread_diagonal<acc_t>(x, d, nv);
  const bool clamped = nv > acc_t(0) && S < acc_t(0);
  if (clamped) S = acc_t(0);
  if (kGrad && !clamped) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t q = 0; q < Q; ++q) {
        acc_t u = acc_t(0);
        for (int64_t d = 0; d < D; ++d)
          u += static_cast<acc_t>(p.p0(b, k, r, d)) * static_cast<acc_t>(x.F[d * Q + q]);
        for (int64_t d = 0; d < D; ++d) gr.gF[d * Q + q] += g * acc_t(2) * static_cast<acc_t>(p.p0(b, k, r, d)) * u;
      }
    if (diagonal)
      for (int64_t d = 0; d < D; ++d)
        add_variance_grad<acc_t>(x, d, acc_t(0), g * column_square<acc_t>(p, b, k, d), nv, gr);
  }
  return total + S;
}

// ----- 1-D stencil with polynomial reaction --------------------------------------------------------------------------
template <typename acc_t, bool kGrad, typename scalar_t, typename pscalar_t>
PHYSMDN_HD acc_t correlated_stencil(const CorrelatedComponent<scalar_t>& x, const PhysicsView<pscalar_t>& p,
                                    int64_t b, int64_t k, acc_t g, const CorrelatedGrads<acc_t>& gr) {
  const int64_t D = x.D, Q = x.Q;
  const int J = p.order;
  const int Jp = J < 1 ? 1 : J;  // the stencil's own-point term is linear in u_i
  const bool second = p.moment == kSecond, spread = p.moment != kPoint;
  const bool diagonal = x.c != nullptr || p.noise_var > 0.0;  // whether h is nonzero
  const acc_t nv = static_cast<acc_t>(p.noise_var);
  const acc_t a = static_cast<acc_t>(p.p0(b, k)) * static_cast<acc_t>(p.inv_h2);
  acc_t c[kMaxOrder + 1], slope[kMaxOrder + 1], M[2 * kMaxOrder + 1];
  acc_t total = acc_t(0);
  for (int64_t i = 0; i < D; ++i) {
    // the row's neighbours and weights in registers (at most two neighbours)
    const StencilRow row = stencil_row(i, D, p.boundary);
    const int nn = row.n;
    const int64_t j0 = row.j[0], j1 = row.j[1];
    const acc_t w0 = static_cast<acc_t>(row.w[0]), w1 = static_cast<acc_t>(row.w[1]);
    for (int j = 0; j <= Jp; ++j) c[j] = j <= J ? static_cast<acc_t>(p.p1(b, k, j)) : acc_t(0);
    c[1] += a * static_cast<acc_t>(row.diag);
    acc_t nsum = acc_t(0);
    for (int t = 0; t < nn; ++t) nsum += (t ? w1 : w0) * static_cast<acc_t>(x.mu[(t ? j1 : j0)]);
    const acc_t v = spread ? free_variance<acc_t>(x, i, nv).v : acc_t(0);
    gaussian_moments<acc_t>(static_cast<acc_t>(x.mu[i]), v, second ? 2 * Jp : Jp, M);
    if (!second) {
      const auto s = poly_mean_stats<acc_t, kGrad>(c, Jp, M);
      const acc_t mean = a * nsum + s.ep;
      total += mean * mean;
      if (kGrad) {
        const acc_t dmean = g * acc_t(2) * mean;
        for (int t = 0; t < nn; ++t) gr.gmu[(t ? j1 : j0)] += dmean * a * (t ? w1 : w0);
        gr.gmu[i] += dmean * s.dep_dm;
        if (spread) add_variance_grad<acc_t>(x, i, dmean * s.dep_dv, acc_t(0), nv, gr);
      }
      continue;
    }
    const auto s = poly_stats<acc_t, kGrad>(c, Jp, M);
    for (int j = 0; j < Jp; ++j) slope[j] = acc_t(j + 1) * c[j + 1];  // q_i'
    const auto sl = poly_mean_stats<acc_t, kGrad>(slope, Jp - 1, M);
    acc_t gg = acc_t(0), gf = acc_t(0);  // |G_i|^2, G_i . F_i
    const scalar_t* fi = x.F + i * Q;
    for (int64_t q = 0; q < Q; ++q) {
      acc_t G = acc_t(0);
      for (int t = 0; t < nn; ++t) G += (t ? w1 : w0) * static_cast<acc_t>(x.F[(t ? j1 : j0) * Q + q]);
      gg += G * G;
      gf += G * static_cast<acc_t>(fi[q]);
    }
    acc_t hv = acc_t(0);
    if (diagonal)
      for (int t = 0; t < nn; ++t) {
        const acc_t w = (t ? w1 : w0);
        hv += w * w * spread_diagonal<acc_t>(x, (t ? j1 : j0), nv);
      }
    acc_t V = a * a * (gg + hv);
    const bool clamped = nv > acc_t(0) && V < acc_t(0);
    if (clamped) V = acc_t(0);
    const acc_t cross = a * gf;
    const acc_t mean = a * nsum + s.ep;
    total += mean * mean + V + (s.ep2 - s.ep * s.ep) + acc_t(2) * cross * sl.ep;
    if (kGrad) {
      const acc_t dmean = g * acc_t(2) * mean;
      for (int t = 0; t < nn; ++t) gr.gmu[(t ? j1 : j0)] += dmean * a * (t ? w1 : w0);
      const acc_t two_cross = g * acc_t(2) * cross;
      gr.gmu[i] += dmean * s.dep_dm + g * (s.dep2_dm - acc_t(2) * s.ep * s.dep_dm) + two_cross * sl.dep_dm;
      add_variance_grad<acc_t>(x, i, dmean * s.dep_dv + g * (s.dep2_dv - acc_t(2) * s.ep * s.dep_dv) + two_cross * sl.dep_dv,
                               acc_t(0), nv, gr);
      // through G_i . F_i (dP/dcross = 2 E q_i') and |G_i|^2 (dP/dV = 1 unless clamped); G_i's gradient goes to the
      // neighbours' rows of F
      const acc_t dcross_a = g * acc_t(2) * sl.ep * a, dgg = clamped ? acc_t(0) : g * acc_t(2) * a * a;
      acc_t* gfi = gr.gF + i * Q;
      for (int64_t q = 0; q < Q; ++q) {
        acc_t G = acc_t(0);
        for (int t = 0; t < nn; ++t) G += (t ? w1 : w0) * static_cast<acc_t>(x.F[(t ? j1 : j0) * Q + q]);
        const acc_t dG = dgg * G + dcross_a * static_cast<acc_t>(fi[q]);
        for (int t = 0; t < nn; ++t) gr.gF[(t ? j1 : j0) * Q + q] += (t ? w1 : w0) * dG;
        gfi[q] += dcross_a * G;
      }
      if (diagonal && !clamped)
        for (int t = 0; t < nn; ++t) {
          const acc_t w = (t ? w1 : w0);
          add_variance_grad<acc_t>(x, (t ? j1 : j0), acc_t(0), g * a * a * w * w, nv, gr);
        }
    }
  }
  return total;
}

// Whether a component's mean, factor, diagonal and family parameters are all finite (x - x == 0 only for finite x).
template <typename acc_t, typename scalar_t, typename pscalar_t>
PHYSMDN_HD bool correlated_finite(const CorrelatedComponent<scalar_t>& x, const PhysicsView<pscalar_t>& p, int64_t b,
                                  int64_t k) {
  acc_t z = acc_t(0);
  for (int64_t d = 0; d < x.D; ++d) {
    const acc_t m = static_cast<acc_t>(x.mu[d]);
    z += m - m;
    if (x.c) {
      const acc_t cd = static_cast<acc_t>(x.c[d]);
      z += cd - cd;
    }
    for (int64_t q = 0; q < x.Q; ++q) {
      const acc_t f = static_cast<acc_t>(x.F[d * x.Q + q]);
      z += f - f;
    }
  }
  return z == acc_t(0) && params_finite<acc_t>(p, b, k, x.D);
}

// The penalty P of component (b, k) for the family kFamily (forward: g unused, gr may hold nulls). With kGrad, writes
// g dP/d(mu, F, c) into gr's rows (set here, not accumulated across calls). The CUDA kernels take one family each
// (csrc/cuda/correlated.cuh: the three together need more registers than the stencil alone).
template <int kFamily, typename acc_t, bool kGrad, typename scalar_t, typename pscalar_t>
PHYSMDN_HD acc_t correlated_family_penalty(const CorrelatedComponent<scalar_t>& x, const PhysicsView<pscalar_t>& p,
                                           int64_t b, int64_t k, acc_t g, const CorrelatedGrads<acc_t>& gr) {
  if (kGrad) {
    for (int64_t d = 0; d < x.D; ++d) {
      gr.gmu[d] = acc_t(0);
      if (gr.gc) gr.gc[d] = acc_t(0);
    }
    for (int64_t i = 0; i < x.D * x.Q; ++i) gr.gF[i] = acc_t(0);
  }
  acc_t r;
  if constexpr (kFamily == kPolynomial) {
    r = correlated_polynomial<acc_t, kGrad>(x, p, b, k, g, gr);
  } else if constexpr (kFamily == kLinear) {
    r = correlated_linear<acc_t, kGrad>(x, p, b, k, g, gr);
  } else {
    static_assert(kFamily == kStencil, "correlated_family_penalty: a built-in family");
    r = correlated_stencil<acc_t, kGrad>(x, p, b, k, g, gr);
  }
  // An expectation of a square (>= 0): from finite inputs a NaN can only be inf - inf between moments that
  // overflowed, so the value is +inf (as in family_penalty). NaN inputs keep their NaN.
  if (!kGrad && r != r && correlated_finite<acc_t>(x, p, b, k)) r = std::numeric_limits<acc_t>::infinity();
  return r;
}

// correlated_family_penalty for the view's family (0 for none).
template <typename acc_t, bool kGrad, typename scalar_t, typename pscalar_t>
PHYSMDN_HD acc_t correlated_penalty(const CorrelatedComponent<scalar_t>& x, const PhysicsView<pscalar_t>& p,
                                    int64_t b, int64_t k, acc_t g, const CorrelatedGrads<acc_t>& gr) {
  switch (p.family) {
    case kPolynomial: return correlated_family_penalty<kPolynomial, acc_t, kGrad>(x, p, b, k, g, gr);
    case kLinear: return correlated_family_penalty<kLinear, acc_t, kGrad>(x, p, b, k, g, gr);
    case kStencil: return correlated_family_penalty<kStencil, acc_t, kGrad>(x, p, b, k, g, gr);
    default: return acc_t(0);
  }
}

}  // namespace physmdn::math

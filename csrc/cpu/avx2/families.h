// The fused loss's physics policies for the lane kernel (lanes.h, group8): what the polynomial, linear and stencil
// families add per component (the penalty Q_k and its gradients, in lanes). The math is physics_math.h's.
#pragma once
#if !defined(__AVX2__) || !defined(__FMA__)
#error "cpu/avx2/families.h needs AVX2 and FMA"
#endif

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/avx2/transpose.h"
#include "cpu/avx2/vec_math.h"
#include "physics_math.h"

namespace physmdn::cpu::soa {

// What the fused loss's family policies share: the scalar arguments, the extra [B, K] penalty, the gradient
// rows, per-lane gathers (padding lanes repeat the last valid sample) and the variance under the penalty.
template <typename coef_t>
struct PhysicsBase {
  static constexpr bool kActive = true;
  static constexpr int kSaved = math::kSavedPerSampleLoss;
  int moment = math::kSecond;  // math::Moment
  bool couple_weights = false;  // the penalty's gradient reaches the mixture weights
  float weight = 1.0f, noise_var = 0.0f;
  const coef_t* extra = nullptr;
  int64_t extra_sb = 0, extra_sk = 0;
  int64_t b0 = 0, nb = 0;
  std::vector<__m256> dmu, dls;  // [K * D] with kGrad: dQ/dmu, dQ/dlog_scale (before the weight)

  void begin_group(int64_t b0_, int64_t nb_) { b0 = b0_, nb = nb_; }
  // family parameter gradients (a family that has them hides these): scaled per component, stored per group
  void scale_param_grads(int64_t, __m256, __m256) {}
  void store_param_grads() {}
  // n lanes vectors times scale = g w pi_k where mass (pi_k > 0), 0 elsewhere (no mass, no gradient: not 0 * inf)
  static void scale_masked(__m256* p, int64_t n, __m256 scale, __m256 mass) {
    for (__m256* end = p + n; p != end; ++p) *p = _mm256_and_ps(mass, _mm256_mul_ps(scale, *p));
  }
  // the group's rows of a full-size [B, n] parameter gradient from n lanes vectors (stage: [8, >= n] floats)
  void store_lanes(const std::vector<__m256>& v, float* all, std::vector<float>& stage) const {
    const int64_t n = static_cast<int64_t>(v.size());
    if (nb == kLanes) return from_lanes(v.data(), n, all + b0 * n);
    from_lanes(v.data(), n, stage.data());
    std::copy(stage.data(), stage.data() + nb * n, all + b0 * n);
  }
  template <typename F>
  __m256 lanes(F&& at) const {
    // built in registers (8 scalar stores then one vector load would miss store forwarding, ~15 cycles a gather)
    const auto v = [&](int64_t i) { return static_cast<float>(at(b0 + std::min(i, nb - 1))); };
    return _mm256_setr_ps(v(0), v(1), v(2), v(3), v(4), v(5), v(6), v(7));
  }
  // a [B|1, K|1] (s0 == 0: shared over the batch) entry of component k in lanes
  template <typename F>
  __m256 per_component(bool shared, F&& at) const {
    return shared ? _mm256_set1_ps(static_cast<float>(at(int64_t(0)))) : lanes(at);
  }
  // variance v = max(exp(2 log_scale) - noise^2, 0) under the moments, 0 for the point value; dv / dlog_scale
  void variance(__m256 l, __m256& v, __m256& dv) const {
    if (moment == math::kPoint) {
      v = dv = _mm256_setzero_ps();
      return;
    }
    const __m256 raw = exp8(_mm256_add_ps(l, l)), nv = _mm256_set1_ps(noise_var);
    const __m256 above = _mm256_cmp_ps(raw, nv, _CMP_GT_OQ);
    v = _mm256_and_ps(above, _mm256_sub_ps(raw, nv));
    dv = _mm256_and_ps(above, _mm256_add_ps(raw, raw));
  }
  // Q_k = weight * total + extra_k (total: the family's expectation, overflow made +inf where inputs are finite)
  __m256 penalty(int64_t k, __m256 total, __m256 fin) const {
    __m256 qk = _mm256_mul_ps(_mm256_set1_ps(weight), overflow_to_inf(total, fin));
    if (extra) qk = _mm256_add_ps(qk, lanes([&](int64_t bb) { return extra[bb * extra_sb + k * extra_sk]; }));
    return qk;
  }
};

// The fused loss's polynomial family (coefficients per component, or per component and dimension): the penalty
// Q_k = weight * sum_d E[p_k(Y_d)^2] + extra_k, Y_d ~ N(mu_kd, v_kd), v = max(exp(2 log_scale) - noise^2, 0) in
// the moments and 0 for the point value (the second moment; the first moment (E p)^2 in first_moment_element) (physics_math.h's formulas: with q = c * c, E[p^2] = sum_n q_n M_n,
// M_n = mu M_{n-1} + (n - 1) v M_{n-2}, dE/dmu = sum_n q_n n M_{n-1}, dE/dv = sum_n q_n n (n - 1) / 2 M_{n-2}).
// Coefficients and extra are gathered per lane (broadcast when shared over the batch). With gp0 (a backward whose
// coefficients need a gradient) also d loss / d c_bkdj = g w pi_k dE[p(Y_d)^2]/dc_j, dE/dc_j = 2 sum_i c_i M_{i+j}
// (0 where pi_k = 0), into the full [B, K, D, J + 1] gradient that autograd reduces over the broadcast dimensions.
template <typename coef_t>
struct PolyPhysics : PhysicsBase<coef_t> {
  static constexpr bool kRowHook = false;
  math::Strided4<coef_t> c;
  int order = 0;
  __m256 q[2 * math::kMaxOrder + 1];  // per component (per element when per_dim): q = c * c
  __m256 cv[math::kMaxOrder + 1];     // per component (per element when per_dim): c
  __m256 acc, fin;
  float* gp0 = nullptr;               // [B, K, D, J + 1] or null
  int64_t K = 0, D = 0, cur_k = 0;
  bool per_dim = false;               // coefficients that vary over D (c.s2 != 0): loaded per element
  std::vector<__m256> dc;             // [K, D, J + 1] of the group in lanes: dE/dc, then its share of the gradient
  std::vector<float> dc_stage;        // [8, K D (J + 1)] for a partial group

  __m256 fin_c;  // the loaded coefficients' finiteness
  // which coefficients cv / q hold: (group or -2 when shared over the batch, component, dimension) after broadcasting
  int64_t loaded_b = -1, loaded_k = -1, loaded_d = -1;

  // c and q = c * c of component k, dimension d, in lanes (fin: and their finiteness). Coefficients broadcast over
  // the batch, the components or the dimensions (stride 0) are gathered and squared once, not per component of every
  // group (a context-dependent law [B, 1, 1, J + 1] shared by the components, or one law for all).
  void load_coefficients(int64_t k, int64_t d) {
    const int64_t lb = c.s0 == 0 ? -2 : this->b0, lk = c.s1 == 0 ? 0 : k, ld = c.s2 == 0 ? 0 : d;
    if (lb != loaded_b || lk != loaded_k || ld != loaded_d) {
      loaded_b = lb, loaded_k = lk, loaded_d = ld;
      bool transposed = false;
      if constexpr (std::is_same_v<coef_t, float>) {  // a full group's float32 rows of J + 1 contiguous coefficients
        if (c.s0 != 0 && c.s3 == 1 && this->nb == kLanes) {
          to_lanes(c.data + this->b0 * c.s0 + lk * c.s1 + ld * c.s2, order + 1, cv, c.s0);
          transposed = true;
        }
      }
      if (!transposed)
        for (int i = 0; i <= order; ++i)
          cv[i] = this->per_component(c.s0 == 0, [&](int64_t b) { return c(b, lk, ld, i); });
      for (int n = 0; n <= std::max(1, 2 * order); ++n) q[n] = _mm256_setzero_ps();  // q[1] is read for J = 0 too
      fin_c = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
      for (int i = 0; i <= order; ++i) {
        fin_c = _mm256_and_ps(fin_c, finite_mask(cv[i]));
        for (int j = 0; j <= order; ++j) q[i + j] = _mm256_fmadd_ps(cv[i], cv[j], q[i + j]);
      }
    }
    fin = _mm256_and_ps(fin, fin_c);
  }
  void begin_component(int64_t k) {
    cur_k = k;
    fin = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    if (!per_dim) load_coefficients(k, 0);
    acc = _mm256_setzero_ps();
  }
  template <bool kGrad>
  void element(int64_t e, __m256 m, __m256 l) {
    if (per_dim) load_coefficients(cur_k, e - cur_k * D);
    const __m256 zero = _mm256_setzero_ps();
    __m256 v, dvdls;
    this->variance(l, v, dvdls);
    fin = _mm256_and_ps(fin, _mm256_and_ps(finite_mask(m), finite_mask(l)));
    if (this->moment == math::kFirst) return first_moment_element<kGrad>(e, m, v, dvdls);
    __m256 m_prev2 = _mm256_set1_ps(1.0f), m_prev = m;
    __m256 pen = _mm256_fmadd_ps(q[1], m, q[0]);
    __m256 dm = q[1], dv = zero;
    __m256 M[2 * math::kMaxOrder + 1];  // the moments, kept for the coefficient gradient
    M[0] = m_prev2, M[1] = m;
    for (int n = 2; n <= 2 * order; ++n) {
      if constexpr (kGrad) {
        dm = _mm256_fmadd_ps(_mm256_mul_ps(q[n], _mm256_set1_ps(static_cast<float>(n))), m_prev, dm);
        dv = _mm256_fmadd_ps(_mm256_mul_ps(q[n], _mm256_set1_ps(static_cast<float>(n * (n - 1) / 2))), m_prev2, dv);
      }
      const __m256 mn =
          _mm256_fmadd_ps(m, m_prev, _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(static_cast<float>(n - 1)), v), m_prev2));
      pen = _mm256_fmadd_ps(q[n], mn, pen);
      M[n] = mn;
      m_prev2 = m_prev;
      m_prev = mn;
    }
    acc = _mm256_add_ps(acc, pen);
    if constexpr (kGrad) {
      this->dmu[e] = dm;
      this->dls[e] = _mm256_mul_ps(dv, dvdls);
      if (gp0) {
        __m256* out = dc.data() + e * (order + 1);
        for (int j = 0; j <= order; ++j) {
          __m256 s = zero;
          for (int i = 0; i <= order; ++i) s = _mm256_fmadd_ps(cv[i], M[i + j], s);
          out[j] = _mm256_add_ps(s, s);
        }
      }
    }
  }
  // The first moment (E p)^2, E p = sum_j c_j M_j (moments up to J): d/dmu = 2 E[p] sum_j c_j j M_{j-1},
  // d/dv = 2 E[p] sum_j c_j j (j - 1) / 2 M_{j-2}, d/dc_j = 2 E[p] M_j.
  template <bool kGrad>
  void first_moment_element(int64_t e, __m256 m, __m256 v, __m256 dvdls) {
    const __m256 zero = _mm256_setzero_ps();
    __m256 M[math::kMaxOrder + 1];
    M[0] = _mm256_set1_ps(1.0f), M[1] = m;
    for (int n = 2; n <= order; ++n)
      M[n] = _mm256_fmadd_ps(m, M[n - 1], _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(static_cast<float>(n - 1)), v), M[n - 2]));
    __m256 ep = cv[0], dm = zero, dv = zero;
    for (int j = 1; j <= order; ++j) {
      ep = _mm256_fmadd_ps(cv[j], M[j], ep);
      if constexpr (kGrad) {
        dm = _mm256_fmadd_ps(_mm256_mul_ps(cv[j], _mm256_set1_ps(static_cast<float>(j))), M[j - 1], dm);
        if (j >= 2) dv = _mm256_fmadd_ps(_mm256_mul_ps(cv[j], _mm256_set1_ps(static_cast<float>(j * (j - 1) / 2))), M[j - 2], dv);
      }
    }
    acc = _mm256_fmadd_ps(ep, ep, acc);
    if constexpr (kGrad) {
      const __m256 two_ep = _mm256_add_ps(ep, ep);
      this->dmu[e] = _mm256_mul_ps(two_ep, dm);
      this->dls[e] = _mm256_mul_ps(two_ep, _mm256_mul_ps(dv, dvdls));
      if (gp0) {
        __m256* out = dc.data() + e * (order + 1);
        for (int j = 0; j <= order; ++j) out[j] = _mm256_mul_ps(two_ep, M[j]);
      }
    }
  }
  __m256 end_component(int64_t k) { return this->penalty(k, acc, fin); }
  void begin_group(int64_t b0_, int64_t nb_) {
    PhysicsBase<coef_t>::begin_group(b0_, nb_);
    if (gp0 && dc.empty()) {
      dc.resize(static_cast<size_t>(K * D * (order + 1)));
      dc_stage.resize(kLanes * dc.size());
    }
  }
  void scale_param_grads(int64_t k, __m256 scale, __m256 mass) {
    if (gp0) this->scale_masked(dc.data() + k * D * (order + 1), D * (order + 1), scale, mass);
  }
  void store_param_grads() {
    if (gp0) this->store_lanes(dc, gp0, dc_stage);
  }
};

// The fused loss's linear family: per component k the penalty Q_k = weight * sum_m E[(A_k Y - b_k)_m^2] + extra_k
// = weight * sum_m (e_m^2 + sum_d A_md^2 v_d) + extra_k with e = A_k mu_k - b_k and v as for the polynomial
// (physics_math.h's linear_penalty); dQ/dmu_d = 2 sum_m e_m A_md, dQ/dv_d = sum_m A_md^2. With gp0 / gp1 (a
// backward whose A / b need a gradient) also d loss / dA_md = g w pi_k 2 (e_m mu_d + A_md v_d) and
// d loss / db_m = -g w pi_k 2 e_m (0 where pi_k = 0), full-size [B, K, M, D] / [B, K, M].
template <typename coef_t>
struct LinearPhysics : PhysicsBase<coef_t> {
  static constexpr bool kRowHook = false;
  float *gp0 = nullptr, *gp1 = nullptr;  // [B, K, M, D], [B, K, M] or null
  std::vector<__m256> mv;                // [2 D] the component's means and variances (for gp0)
  std::vector<__m256> da, db;            // [K, M, D], [K, M] of the group in lanes
  std::vector<float> stage;              // [8, K M D] for a partial group
  math::Strided4<coef_t> A, b;  // A [B, K, M, D], b [B, K, M] (stride 0 where broadcast)
  int64_t rows = 0, D = 0;
  // A contiguous per sample ([B, K, M, D] with real B): each group's rows are transposed into lanes once
  // (8x8 tiles) instead of gathered lane by lane
  bool a_rows = false;
  std::vector<__m256> a_lanes;  // [K * M * D]
  std::vector<float> a_stage;   // [8, K * M * D] (partial groups, reduced-precision coefficients)

  int64_t K = 0;
  void setup(int64_t K_) {
    K = K_;
    const int64_t n = K * rows * D;
    a_rows = A.s0 == n && A.s1 == rows * D && A.s2 == D && A.s3 == 1;
    if (a_rows) a_lanes.resize(n), a_stage.resize(kLanes * n);
  }
  void begin_group(int64_t b0_, int64_t nb_) {
    PhysicsBase<coef_t>::begin_group(b0_, nb_);
    if ((gp0 || gp1) && stage.empty()) {
      mv.resize(2 * D), da.resize(gp0 ? K * rows * D : 0), db.resize(gp1 ? K * rows : 0);
      stage.resize(kLanes * K * rows * D);
    }
    if (!a_rows) return;
    const int64_t n = static_cast<int64_t>(a_lanes.size());
    const coef_t* src = A.data + b0_ * A.s0;
    if constexpr (std::is_same_v<coef_t, float>) {
      if (nb_ == kLanes) return to_lanes(src, n, a_lanes.data());
    }
    to_float_rows(src, kLanes * n, nb_ * n, a_stage.data());
    to_lanes(a_stage.data(), n, a_lanes.data());
  }
  std::vector<__m256> e;        // [M] residual at the means, accumulated over d
  std::vector<__m256> a_k;      // [M, D] the component's A in lanes (gathered once, reused for dQ/dmu)
  __m256 acc;                   // sum_d v_d sum_m A_md^2
  __m256 fin;                   // lanes whose inputs are all finite

  __m256 a_at(int64_t k, int64_t r, int64_t d) const {
    if (a_rows) return a_lanes[(k * rows + r) * D + d];
    return this->per_component(A.s0 == 0, [&](int64_t bb) { return A(bb, k, r, d); });
  }
  int64_t cur_k = 0, cur_d = 0;  // the element hook runs over d = 0 .. D - 1 of component cur_k, in order

  void begin_component(int64_t k) {
    cur_k = k, cur_d = 0;
    e.resize(rows);
    a_k.resize(rows * D);
    fin = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    for (int64_t r = 0; r < rows; ++r) {
      e[r] = _mm256_xor_ps(this->per_component(b.s0 == 0, [&](int64_t bb) { return b(bb, k, r); }),
                           _mm256_set1_ps(-0.0f));
      fin = _mm256_and_ps(fin, finite_mask(e[r]));
    }
    acc = _mm256_setzero_ps();
  }
  template <bool kGrad>
  void element(int64_t idx, __m256 m, __m256 l) {
    const int64_t k = cur_k, d = cur_d++;  // idx = k D + d (no integer division per element)
    __m256 col = _mm256_setzero_ps();
    for (int64_t r = 0; r < rows; ++r) {
      const __m256 a = a_k[r * D + d] = a_at(k, r, d);
      e[r] = _mm256_fmadd_ps(a, m, e[r]);
      col = _mm256_fmadd_ps(a, a, col);
      fin = _mm256_and_ps(fin, finite_mask(a));
    }
    fin = _mm256_and_ps(fin, _mm256_and_ps(finite_mask(m), finite_mask(l)));
    __m256 v = _mm256_setzero_ps(), dvdls = v;
    if (this->moment == math::kSecond) this->variance(l, v, dvdls);  // E r = r(mu): first moment = point value
    acc = _mm256_fmadd_ps(v, col, acc);
    if (gp0) mv[2 * d] = m, mv[2 * d + 1] = v;
    if constexpr (kGrad) this->dls[idx] = _mm256_mul_ps(col, dvdls);
  }
  __m256 end_component(int64_t k) {
    __m256 total = acc;
    for (int64_t r = 0; r < rows; ++r) total = _mm256_fmadd_ps(e[r], e[r], total);
    if (!this->dmu.empty()) {  // kGrad: dQ/dmu_d = 2 sum_m e_m A_md
      for (int64_t d = 0; d < D; ++d) {
        __m256 g = _mm256_setzero_ps();
        for (int64_t r = 0; r < rows; ++r) g = _mm256_fmadd_ps(e[r], a_k[r * D + d], g);
        this->dmu[k * D + d] = _mm256_add_ps(g, g);
      }
      for (int64_t r = 0; gp0 && r < rows; ++r)  // dE/dA_rd = 2 (e_r mu_d + A_rd v_d)
        for (int64_t d = 0; d < D; ++d) {
          const __m256 t = _mm256_fmadd_ps(e[r], mv[2 * d], _mm256_mul_ps(a_k[r * D + d], mv[2 * d + 1]));
          da[(k * rows + r) * D + d] = _mm256_add_ps(t, t);
        }
      for (int64_t r = 0; gp1 && r < rows; ++r)  // dE/db_r = -2 e_r
        db[k * rows + r] = _mm256_mul_ps(_mm256_set1_ps(-2.0f), e[r]);
    }
    return this->penalty(k, total, fin);
  }
  void scale_param_grads(int64_t k, __m256 scale, __m256 mass) {
    if (gp0) this->scale_masked(da.data() + k * rows * D, rows * D, scale, mass);
    if (gp1) this->scale_masked(db.data() + k * rows, rows, scale, mass);
  }
  void store_param_grads() {
    if (gp0) this->store_lanes(da, gp0, stage);
    if (gp1) this->store_lanes(db, gp1, stage);
  }
};

// The fused loss's 1-D stencil family: per grid point i the residual r_i = a (L u)_i + f(u_i), a = diffusion / h^2,
// f the reaction polynomial c; Q_k = weight * sum_i E[r_i^2] + extra_k with E[r_i^2] = (a N_i + E f')^2
// + a^2 Var(N_i) + Var(f'), f' = f + a diag_i u_i, N_i the neighbour sum (physics_math.h's stencil_penalty; its
// derivatives scatter to the neighbours). Needs the whole row of a component at once: the row hook.
template <typename coef_t>
struct StencilPhysics : PhysicsBase<coef_t> {
  static constexpr bool kRowHook = true;
  math::Strided4<coef_t> diffusion, reaction;  // [B, K], [B, K, J + 1] (stride 0 where broadcast)
  int order = 0, boundary = math::kPeriodic;
  int64_t K = 0, D = 0;
  // With gp0 / gp1 (a backward whose diffusion / reaction need a gradient), as physics_math.h's stencil_penalty:
  // dP/dc_j = sum_i 2 (N_i M_j + sum_l c'_l M_{j+l}), dP/da = sum_i (2 er_i nsum_i + 2 a Var(N_i) + diag_i dP_i/dc'_1)
  // (then times 1 / h^2 for the diffusion), into full-size [B, K] / [B, K, J + 1] gradients.
  float *gp0 = nullptr, *gp1 = nullptr;
  std::vector<__m256> ga, gc;  // [K], [K, J + 1] of the group in lanes
  std::vector<float> stage;    // [8, K (J + 1)] for a partial group
  void begin_group(int64_t b0_, int64_t nb_) {
    PhysicsBase<coef_t>::begin_group(b0_, nb_);
    if ((gp0 || gp1) && stage.empty()) ga.resize(K), gc.resize(K * (order + 1)), stage.resize(kLanes * K * (order + 1));
  }
  void scale_param_grads(int64_t k, __m256 scale, __m256 mass) {
    if (gp0) this->scale_masked(ga.data() + k, 1, scale, mass);
    if (gp1) this->scale_masked(gc.data() + k * (order + 1), order + 1, scale, mass);
  }
  void store_param_grads() {
    if (gp0) this->store_lanes(ga, gp0, stage);
    if (gp1) this->store_lanes(gc, gp1, stage);
  }
  float inv_h2 = 1.0f;
  __m256 total, fin;
  std::vector<__m256> var, dvar;  // [D] per component

  void begin_component(int64_t) {}
  template <bool kGrad>
  void element(int64_t, __m256, __m256) {}

  template <bool kGrad>
  void component_rows(int64_t k, const __m256* mu, const __m256* ls) {
    const __m256 zero = _mm256_setzero_ps(), two = _mm256_set1_ps(2.0f);
    const int J = order, Jp = J < 1 ? 1 : J;
    // the second moment adds a^2 Var(N_i) + Var(f'(u_i)) to the first moment's E[r_i]^2
    const bool second = this->moment == math::kSecond;
    const __m256 a = _mm256_mul_ps(this->per_component(diffusion.s0 == 0, [&](int64_t bb) { return diffusion(bb, k); }),
                                   _mm256_set1_ps(inv_h2));
    __m256 c0[math::kMaxOrder + 1];
    for (int j = 0; j <= Jp; ++j)
      c0[j] = j > J ? zero : this->per_component(reaction.s0 == 0, [&](int64_t bb) { return reaction(bb, k, j); });
    var.resize(D), dvar.resize(D);
    fin = finite_mask(a);
    for (int j = 0; j <= Jp; ++j) fin = _mm256_and_ps(fin, finite_mask(c0[j]));
    for (int64_t d = 0; d < D; ++d) {
      fin = _mm256_and_ps(fin, _mm256_and_ps(finite_mask(mu[d]), finite_mask(ls[d])));
      this->variance(ls[d], var[d], dvar[d]);
    }
    auto& dmu = this->dmu;
    auto& dls = this->dls;
    const bool params = kGrad && (gp0 || gp1);
    if constexpr (kGrad)
      for (int64_t d = 0; d < D; ++d) dmu[k * D + d] = dls[k * D + d] = zero;
    __m256 grad_a = zero;
    if (params)
      for (int j = 0; j <= J; ++j) gc[k * (J + 1) + j] = zero;
    total = zero;
    for (int64_t i = 0; i < D; ++i) {
      const math::StencilRow row = math::stencil_row(i, D, boundary);
      __m256 c[math::kMaxOrder + 1];
      for (int j = 0; j <= Jp; ++j) c[j] = c0[j];
      c[1] = _mm256_fmadd_ps(a, _mm256_set1_ps(static_cast<float>(row.diag)), c[1]);
      __m256 nsum = zero, nvar = zero;
      for (int t = 0; t < row.n; ++t) {
        const __m256 w = _mm256_set1_ps(static_cast<float>(row.w[t]));
        nsum = _mm256_fmadd_ps(w, mu[row.j[t]], nsum);
        nvar = _mm256_fmadd_ps(_mm256_mul_ps(w, w), var[row.j[t]], nvar);
      }
      const __m256 n_mean = _mm256_mul_ps(a, nsum);
      // moments of u_i ~ N(mu_i, var_i) up to 2 Jp (second moment) or Jp
      __m256 M[2 * math::kMaxOrder + 1];
      M[0] = _mm256_set1_ps(1.0f);
      M[1] = mu[i];
      for (int n = 2; n <= (second ? 2 * Jp : Jp); ++n)
        M[n] = _mm256_fmadd_ps(mu[i], M[n - 1],
                               _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(static_cast<float>(n - 1)), var[i]), M[n - 2]));
      __m256 ep = zero, ep2 = zero, dep_dm = zero, dep_dv = zero, dep2_dm = zero, dep2_dv = zero;
      for (int j = 0; j <= Jp; ++j) {
        ep = _mm256_fmadd_ps(c[j], M[j], ep);
        if constexpr (kGrad) {
          if (j >= 1) dep_dm = _mm256_fmadd_ps(_mm256_mul_ps(c[j], _mm256_set1_ps(static_cast<float>(j))), M[j - 1], dep_dm);
          if (j >= 2)
            dep_dv = _mm256_fmadd_ps(_mm256_mul_ps(c[j], _mm256_set1_ps(static_cast<float>(j * (j - 1) / 2))),
                                     M[j - 2], dep_dv);
        }
        for (int l = 0; second && l <= Jp; ++l) {
          const __m256 cc = _mm256_mul_ps(c[l], c[j]);
          const int n = l + j;
          ep2 = _mm256_fmadd_ps(cc, M[n], ep2);
          if constexpr (kGrad) {
            if (n >= 1) dep2_dm = _mm256_fmadd_ps(_mm256_mul_ps(cc, _mm256_set1_ps(static_cast<float>(n))), M[n - 1], dep2_dm);
            if (n >= 2)
              dep2_dv = _mm256_fmadd_ps(_mm256_mul_ps(cc, _mm256_set1_ps(static_cast<float>(n * (n - 1) / 2))),
                                        M[n - 2], dep2_dv);
          }
        }
      }
      const __m256 er = _mm256_add_ps(n_mean, ep);
      if (second)
        total = _mm256_add_ps(total, _mm256_fmadd_ps(er, er, _mm256_fmadd_ps(_mm256_mul_ps(a, a), nvar,
                                                                               _mm256_fnmadd_ps(ep, ep, ep2))));
      else
        total = _mm256_fmadd_ps(er, er, total);
      if constexpr (kGrad) {
        for (int t = 0; t < row.n; ++t) {
          const __m256 w = _mm256_set1_ps(static_cast<float>(row.w[t]));
          const int64_t jt = k * D + row.j[t];
          dmu[jt] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_mul_ps(two, er), a), w, dmu[jt]);
          if (second)
            dls[jt] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_mul_ps(a, a), _mm256_mul_ps(w, w)), dvar[row.j[t]], dls[jt]);
        }
        // second: d/dmu_i = 2 N dE[f']/dmu + dE[f'^2]/dmu (likewise in v); first: 2 E[r_i] dE[f']/dmu
        const __m256 dm_i = second ? _mm256_fmadd_ps(_mm256_mul_ps(two, n_mean), dep_dm, dep2_dm)
                                   : _mm256_mul_ps(_mm256_mul_ps(two, er), dep_dm);
        const __m256 dv_i = second ? _mm256_fmadd_ps(_mm256_mul_ps(two, n_mean), dep_dv, dep2_dv)
                                   : _mm256_mul_ps(_mm256_mul_ps(two, er), dep_dv);
        dmu[k * D + i] = _mm256_add_ps(dmu[k * D + i], dm_i);
        dls[k * D + i] = _mm256_fmadd_ps(dv_i, dvar[i], dls[k * D + i]);
        if (params) {  // dP_i/dc'_j = 2 (N_i M_j + sum_l c'_l M_{j+l}) (second), 2 E[r_i] M_j (first)
          __m256 dc1 = zero;
          for (int j = 0; j <= Jp; ++j) {
            __m256 sum = _mm256_mul_ps(second ? n_mean : er, M[j]);
            for (int l = 0; second && l <= Jp; ++l) sum = _mm256_fmadd_ps(c[l], M[j + l], sum);
            const __m256 dcj = _mm256_add_ps(sum, sum);
            if (j == 1) dc1 = dcj;
            if (j <= J) gc[k * (J + 1) + j] = _mm256_add_ps(gc[k * (J + 1) + j], dcj);
          }
          const __m256 t = _mm256_fmadd_ps(er, nsum, second ? _mm256_mul_ps(a, nvar) : zero);
          grad_a = _mm256_add_ps(grad_a,
                                 _mm256_fmadd_ps(_mm256_set1_ps(static_cast<float>(row.diag)), dc1, _mm256_add_ps(t, t)));
        }
      }
    }
    if (params) ga[k] = _mm256_mul_ps(grad_a, _mm256_set1_ps(inv_h2));
  }
  __m256 end_component(int64_t k) { return this->penalty(k, total, fin); }
};

}  // namespace physmdn::cpu::soa

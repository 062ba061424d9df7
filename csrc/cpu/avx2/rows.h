// The row-wise path of the mixture NLL alone (cpu/paths.h, rows_path_applies: D in {1, 2, 4} with K D a multiple of
// 8, or D a multiple of 8): the element-wise work runs on each sample's [K, D] rows as they lie in memory, 8 / D components
// per vector (D <= 8) or D / 8 vectors per component (D >= 8; template argument 0: D read at run time), instead
// of on transposed lanes. Only what is per component goes through lanes: log N_k (summed over D within the vectors
// by horizontal adds, then the [8, K] rows transposed for the log-sum-exps, as in group8) and -g gamma_k (transposed
// back to rows and spread over each component's D lanes). The [B, K, D] inputs are read and the gradients written
// row by row, without the 8x8 transposes of both (measured: docs/performance.md).
#pragma once
#if !defined(__AVX2__) || !defined(__FMA__)
#error "cpu/avx2/rows.h needs AVX2 and FMA"
#endif

#include <immintrin.h>

#include <cstdint>

#include "cpu/avx2/group.h"
#include "cpu/avx2/transpose.h"
#include "cpu/avx2/vec_math.h"
#include "mixture_math.h"

namespace physmdn::cpu::soa {

template <int D>
inline __m256 spread_components(const float* row, int64_t j) {  // vector j's 8 / D values, each D times (D <= 4)
  if constexpr (D == 4) {
    const __m128 two = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(row + 2 * j)));
    const __m256 pair = _mm256_castps128_ps256(two);
    return _mm256_permutevar8x32_ps(pair, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
  } else if constexpr (D == 2) {
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(row + 4 * j)),
                                    _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
  } else {
    return _mm256_loadu_ps(row + 8 * j);
  }
}

template <bool kGrad, int D, typename grad_t>
void group8_rows(const GroupIn& in, __m256 g, Scratch& w, const GroupOut<grad_t>& out) {
  constexpr bool kWide = D == 8 || D == 0;  // D = 0: a multiple of 8 read at run time
  const int64_t K = w.K, Dn = D == 0 ? w.D : D, KD = K * Dn, nv = KD / 8;
  const int64_t vpc = D == 0 ? Dn / 8 : 1;  // vectors per component (D >= 8)
  const __m256 sign = _mm256_set1_ps(-0.0f), nhalf = _mm256_set1_ps(-0.5f), one = _mm256_set1_ps(1.0f);
  const __m256 zero = _mm256_setzero_ps();
  const __m256 offset = _mm256_set1_ps(static_cast<float>(Dn) * static_cast<float>(math::kHalfLog2Pi));
  // the horizontal adds leave the components of 8 in the order {0, 2, 4, 6 | 1, 3, 5, 7} (D = 4) or
  // {0, 1, 4, 5 | 2, 3, 6, 7} (D = 2): one permute back
  const __m256i order =
      D == 4 ? _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7) : _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
  float* const rk = w.rk.data();
  // (the inputs' pointers and strides, and the scratch rows, in locals: the stores through __m256* below may alias
  // anything, so members would be reloaded in every iteration)
  const float *const mu_all = in.mu, *const ls_all = in.ls, *const y_all = in.y;
  const int64_t mu_rs = in.mu_rs, ls_rs = in.ls_rs, y_rs = in.y_rs;
  __m256 *const zi_all = w.mu.data(), *const zs_all = w.ls.data();
  for (int64_t i = 0; i < kLanes; ++i) {
    const float *mu = mu_all + i * mu_rs, *ls = ls_all + i * ls_rs, *y = y_all + i * y_rs;
    __m256 *const zi = zi_all + i * nv, *const zs = zs_all + i * nv;  // z / s and z^2 per vector
    float* const row = rk + i * K;  // log N_k (rows in order: the 8-wide stores spill forward)
    if constexpr (kWide) {  // D / 8 vectors per component, summed; 8 components at a time (the last padded)
      for (int64_t k0 = 0; k0 < K; k0 += 8) {
        __m256 t[8];
        for (int64_t u = 0; u < 8; ++u) {
          const int64_t k = k0 + u;
          t[u] = zero;
          if (k >= K) continue;
          for (int64_t v = 0; v < vpc; ++v) {
            const int64_t j = k * vpc + v;
            const __m256 l = _mm256_loadu_ps(ls + 8 * j);
            const __m256 inv = exp_neg8(l);
            const __m256 diff = _mm256_sub_ps(_mm256_loadu_ps(y + 8 * v), _mm256_loadu_ps(mu + 8 * j));
            const __m256 z = _mm256_mul_ps(diff, inv);
            const __m256 zz = _mm256_mul_ps(z, z);
            t[u] = v == 0 ? _mm256_fmsub_ps(nhalf, zz, l) : _mm256_add_ps(t[u], _mm256_fmsub_ps(nhalf, zz, l));
            if constexpr (kGrad) {
              zi[j] = _mm256_mul_ps(z, inv);
              zs[j] = zz;
            }
          }
        }
        // one component per vector: [sums of the low halves | high halves] of 4, added
        const __m256 lo = _mm256_hadd_ps(_mm256_hadd_ps(t[0], t[1]), _mm256_hadd_ps(t[2], t[3]));
        const __m256 hi = _mm256_hadd_ps(_mm256_hadd_ps(t[4], t[5]), _mm256_hadd_ps(t[6], t[7]));
        const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
        _mm256_storeu_ps(row + k0, _mm256_sub_ps(sums, offset));
      }
    } else {
      // the target's D values repeated over the vector's 8 / D components
      __m256 yv;
      if constexpr (D == 4) {
        yv = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(y));
      } else if constexpr (D == 2) {
        yv = _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(y)));
      } else {
        yv = _mm256_broadcast_ss(y);
      }
      // vectors of 8 / D components; D of them hold 8 components (the last block padded with zero vectors: only
      // that block checks the vector count)
      const auto block = [&](int64_t j0, auto whole) {
        __m256 t[4];
        for (int64_t u = 0; u < D; ++u) {
          const int64_t j = j0 + u;
          if constexpr (!whole()) {
            if (j >= nv) {
              t[u] = zero;
              continue;
            }
          }
          const __m256 l = _mm256_loadu_ps(ls + 8 * j);
          const __m256 inv = exp_neg8(l);
          const __m256 z = _mm256_mul_ps(_mm256_sub_ps(yv, _mm256_loadu_ps(mu + 8 * j)), inv);
          const __m256 zz = _mm256_mul_ps(z, z);
          t[u] = _mm256_fmsub_ps(nhalf, zz, l);
          if constexpr (kGrad) {
            zi[j] = _mm256_mul_ps(z, inv);
            zs[j] = zz;
          }
        }
        __m256 s8;
        if constexpr (D == 4) {
          s8 = _mm256_permutevar8x32_ps(_mm256_hadd_ps(_mm256_hadd_ps(t[0], t[1]), _mm256_hadd_ps(t[2], t[3])), order);
        } else if constexpr (D == 2) {
          s8 = _mm256_permutevar8x32_ps(_mm256_hadd_ps(t[0], t[1]), order);
        } else {
          s8 = t[0];
        }
        _mm256_storeu_ps(row + j0 * 8 / D, _mm256_sub_ps(s8, offset));
      };
      int64_t j0 = 0;
      for (; j0 + D <= nv; j0 += D) block(j0, std::true_type{});
      if (j0 < nv) block(j0, std::false_type{});
    }
  }
  to_lanes(rk, K, w.joint.data());
  to_lanes(in.lg, K, w.lg.data(), in.lg_rs);
  const Lse st = mixture_lse(w);
  store_loss_saved<NoPhysics::kSaved>(out.loss, out.saved, _mm256_xor_ps(st.lse, sign), st, zero);
  if constexpr (kGrad) {
    const __m256 inv_sum2 = _mm256_div_ps(one, st.sum2);
    bool masked = false;
    for (int64_t k = 0; k < K; ++k) {
      const __m256 pi = _mm256_mul_ps(w.pi[k], st.inv_sum), gamma = _mm256_mul_ps(w.joint[k], inv_sum2);
      const __m256 none = _mm256_cmp_ps(gamma, zero, _CMP_EQ_OQ);
      masked |= !_mm256_testz_ps(none, none);
      w.gl[k] = _mm256_mul_ps(g, _mm256_sub_ps(pi, gamma));
      w.joint[k] = _mm256_xor_ps(_mm256_mul_ps(g, gamma), sign);  // c_k = -g gamma_k
      w.pi[k] = none;
    }
    from_lanes(w.joint.data(), K, rk);
    if (masked) from_lanes(w.pi.data(), K, w.rk_mask.data());
    const bool stream = out.stream && reinterpret_cast<uintptr_t>(out.gm) % (8 * sizeof(grad_t)) == 0 &&
                        reinterpret_cast<uintptr_t>(out.gs) % (8 * sizeof(grad_t)) == 0;
    // f(j, v, cv, none) over sample i's vectors j: cv = -g gamma_k of the vector's component(s) over their lanes,
    // none their gamma_k = 0 masks (with_masks), v the vector's place in its component (D >= 8; else 0)
    const float* const rk_mask = w.rk_mask.data();
    grad_t *const gm_all = out.gm, *const gs_all = out.gs, *const gt_all = out.gt;
    __m256* const gt = w.gt.data();
    const auto each_vector = [&](int64_t i, auto with_masks, auto&& f) {
      const float *const c = rk + i * K, *const none = rk_mask + i * K;
      if constexpr (kWide) {
        for (int64_t k = 0; k < K; ++k) {
          const __m256 cv = _mm256_broadcast_ss(c + k);
          const __m256 nk = with_masks() ? _mm256_broadcast_ss(none + k) : zero;
          for (int64_t v = 0, j = k * vpc; v < vpc; ++v, ++j) f(j, v, cv, nk);
        }
      } else {
        for (int64_t j = 0; j < nv; ++j)
          f(j, int64_t{0}, spread_components<D>(c, j), with_masks() ? spread_components<D>(none, j) : zero);
      }
    };
    // the 8 rows of d/dmu, then the 8 rows of d/dlog_scale: each output written in address order, every cache line
    // whole (streamed stores of the two outputs interleaved leave partial write-combining lines, see from_lanes)
    const auto rows = [&](auto streamed, auto with_masks) {
      for (int64_t i = 0; i < kLanes; ++i) {
        const __m256* const zi = zi_all + i * nv;
        grad_t *const gm = gm_all + i * KD, *const gy = gt_all + i * Dn;
        // d/dy = -sum_k d/dmu_k: D >= 16 per vector of the D / 8 (in w.gt), else in one vector (gt1)
        __m256 gt1 = zero;
        if constexpr (D == 0)
          for (int64_t v = 0; v < vpc; ++v) gt[v] = zero;
        each_vector(i, with_masks, [&](int64_t j, int64_t v, __m256 cv, __m256 none) {
          __m256 m = _mm256_mul_ps(zi[j], cv);
          if constexpr (with_masks()) m = _mm256_andnot_ps(none, m);  // no responsibility, no gradient
          if constexpr (D == 0) {
            gt[v] = _mm256_sub_ps(gt[v], m);
          } else {
            gt1 = _mm256_sub_ps(gt1, m);
          }
          store8(gm + 8 * j, m, streamed());
        });
        if constexpr (D == 0) {
          for (int64_t v = 0; v < vpc; ++v) store8(gy + 8 * v, gt[v], false);
        } else if constexpr (D == 8) {
          store8(gy, gt1, false);
        } else if constexpr (D == 4) {  // the vector's 8 / D components summed
          store4(gy, _mm_add_ps(_mm256_castps256_ps128(gt1), _mm256_extractf128_ps(gt1, 1)));
        } else {
          __m128 h = _mm_add_ps(_mm256_castps256_ps128(gt1), _mm256_extractf128_ps(gt1, 1));
          h = _mm_add_ps(h, _mm_movehl_ps(h, h));  // D = 2: [d0, d1, .., ..]
          if constexpr (D == 1) h = _mm_add_ss(h, _mm_movehdup_ps(h));
          alignas(16) float v[4];
          _mm_store_ps(v, h);
          for (int64_t d = 0; d < D; ++d) gy[d] = static_cast<grad_t>(v[d]);
        }
      }
      for (int64_t i = 0; i < kLanes; ++i) {
        const __m256* const zs = zs_all + i * nv;
        grad_t* const gs = gs_all + i * KD;
        each_vector(i, with_masks, [&](int64_t j, int64_t, __m256 cv, __m256 none) {
          __m256 x = _mm256_fmsub_ps(zs[j], cv, cv);
          if constexpr (with_masks()) x = _mm256_andnot_ps(none, x);
          store8(gs + 8 * j, x, streamed());
        });
      }
    };
    if (masked) {
      stream ? rows(std::true_type{}, std::true_type{}) : rows(std::false_type{}, std::true_type{});
    } else {
      stream ? rows(std::true_type{}, std::false_type{}) : rows(std::false_type{}, std::false_type{});
    }
    from_lanes(w.gl.data(), K, out.gl);
  }
}

}  // namespace physmdn::cpu::soa

// One group of 8 samples, as the lane kernel (lanes.h) and the row-wise path (rows.h) see it: how its input rows
// are read (in place, converted or gathered, prefetched), the per-thread scratch, its input and output pointers
// and its two log-sum-exps (mixture_lse).
#pragma once
#if !defined(__AVX2__) || !defined(__FMA__)
#error "cpu/avx2/group.h needs AVX2 and FMA"
#endif

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/avx2/transpose.h"
#include "cpu/avx2/vec_math.h"
#include "cpu/paths.h"
#include "mixture_math.h"

namespace physmdn::cpu::soa {

// An input's layout, [B, n1, n2] at strides s0, s1, s2 (n2 = 1 for the 2-D logits and target). rows: each sample's
// n1 n2 values are contiguous (read in place at the batch stride s0, which may be anything, 0 for a batch broadcast);
// otherwise (inputs broadcast over K or D, transposed or sliced views) they are gathered into the staging rows.
struct InLayout {
  int64_t s0, s1, s2, n1, n2;
  bool rows;
  explicit InLayout(const Tensor& t)
      : s0(t.stride(0)), s1(t.stride(1)), s2(t.dim() > 2 ? t.stride(2) : 0), n1(t.size(1)),
        n2(t.dim() > 2 ? t.size(2) : 1),
        rows((n2 == 1 || s2 == 1) && (n1 == 1 || s1 == n2)) {}
};

// A group's rows of one input as float32 rows at *rs apart: in place (float32 rows, a full group: group_rows, inline),
// else converted or gathered into buf [8, n1 n2] (gather_rows; padding rows zero: finite, discarded).
template <typename scalar_t>
const float* gather_rows(const scalar_t* all, const InLayout& in, int64_t b0, int64_t nb, float* buf, int64_t& rs) {
  const int64_t n = in.n1 * in.n2;
  rs = n;
  if (in.rows) {
    to_float_rows(all + b0 * in.s0, in.s0, n, nb, buf);
    return buf;
  }
  for (int64_t i = 0; i < nb; ++i) {
    const scalar_t* src = all + (b0 + i) * in.s0;
    float* dst = buf + i * n;
    for (int64_t a = 0; a < in.n1; ++a) {
      if (in.s2 == 0) {  // broadcast over the last dimension (isotropic components)
        std::fill(dst + a * in.n2, dst + (a + 1) * in.n2, static_cast<float>(src[a * in.s1]));
        continue;
      }
      for (int64_t c = 0; c < in.n2; ++c) dst[a * in.n2 + c] = static_cast<float>(src[a * in.s1 + c * in.s2]);
    }
  }
  std::fill(buf + nb * n, buf + kLanes * n, 0.0f);
  return buf;
}
template <typename scalar_t>
inline const float* group_rows(const scalar_t* all, const InLayout& in, int64_t b0, int64_t nb, float* buf,
                               int64_t& rs) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (in.rows && nb == kLanes) {  // in place (the common case: a few instructions per group)
      rs = in.s0;
      return all + b0 * in.s0;
    }
  }
  return gather_rows(all, in, b0, nb, buf, rs);
}

// Software prefetch (into L1) of a group's rows of one input read in place: the driver issues it one group ahead,
// for inputs of at least kPrefetchMinBytes. Measured on the 2-vCPU Zen 3 VM, K = 8, D = 4, the kernel alone against
// the same kernel without it, interleaved in one process, medians: forward with gradients 1.15-1.22x at B = 65536
// (1.18-1.22x with the inputs evicted first), 1.11-1.29x at B = 262144, 1.03-1.06x at B = 16384; the forward alone
// 1.26-1.29x at B = 65536; K = 32, D = 8 at B = 8192: 1.02x; but 0.95-0.98x at B = 2048-8192 (0.6-2.5 MB of inputs,
// in the caches), 1.01-1.03x at B = 16384 (5 MB), 1.11-1.14x at 32768: hence the threshold. The hardware
// prefetchers alone leave the transposes' row loads waiting on DRAM.
constexpr int64_t kPrefetchMinBytes = int64_t{4} << 20;
//
// The lines covering [begin, begin + bytes) into L1 (kWrite: prefetchw, in the exclusive state, for lines about to
// be written). (Asm statements: GCC 12 deleted the equivalent _mm_prefetch loops here, all of them, when they
// followed an early return.)
template <bool kWrite = false>
inline void prefetch_lines(const void* begin, int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(begin) & ~uintptr_t{63});
  const char* const end = reinterpret_cast<const char*>(begin) + bytes;
  for (; p < end; p += 64) {
    if constexpr (kWrite)
      asm volatile("prefetchw %0" : : "m"(*p));
    else
      asm volatile("prefetcht0 %0" : : "m"(*p));
  }
}
template <typename scalar_t>
inline void prefetch_rows(const scalar_t* all, const InLayout& in, int64_t b0, int64_t nb) {
  if (!in.rows || in.s0 == 0) return;  // gathered layouts; batch broadcasts (one row, in cache)
  const int64_t n = in.n1 * in.n2, row_bytes = n * static_cast<int64_t>(sizeof(scalar_t));
  if (in.s0 == n) return prefetch_lines(all + b0 * n, nb * row_bytes);  // contiguous rows: one block
  for (int64_t i = 0; i < nb; ++i) prefetch_lines(all + (b0 + i) * in.s0, row_bytes);
}

// Per-thread working set: the group's inputs in lanes (means / log_scales are overwritten with the unscaled
// gradient terms z / s and z^2 - 1) and 8-row staging buffers for tails and reduced-precision inputs.
struct Scratch {
  int64_t K, D;
  std::vector<__m256> mu, ls, y, lg, pi, joint, gl, gt, row_stage;  // row_stage: from_lanes' gradient rows
  std::vector<__m256> qk, ge;  // the fused loss: per-component penalty Q_k, d loss / d extra_k
  std::vector<float> in_mu, in_ls, in_lg, in_y, out_gl, out_gm, out_gs, out_gt, out_ge;
  // the row-wise path of the mixture NLL (group8_rows): per-sample [K] rows (+ 8 floats of padding, for the last
  // row's 8-wide stores) of log N_k, then of -g gamma_k, and of the gamma_k = 0 masks
  bool rows_path;
  std::vector<float> rk, rk_mask;
  Scratch(int64_t K_, int64_t D_)
      : K(K_), D(D_), mu(K_ * D_), ls(K_ * D_), y(D_), row_stage(K_ * D_), lg(K_), pi(K_), joint(K_), gl(K_), gt(D_),
        in_mu(kLanes * K_ * D_), in_ls(kLanes * K_ * D_), in_lg(kLanes * K_), in_y(kLanes * D_),
        out_gl(kLanes * K_), out_gm(kLanes * K_ * D_), out_gs(kLanes * K_ * D_), out_gt(kLanes * D_),
        out_ge(kLanes * K_), rows_path(rows_path_applies(K_, D_)), rk(kLanes * K_ + 8), rk_mask(kLanes * K_ + 8) {}
};

template <typename grad_t>
struct GroupOut {
  float* loss;   // [8]
  float* saved;  // [8, Phys::kSaved]
  grad_t *gl, *gm, *gs, *gt, *ge;  // [8, K], [8, K, D], [8, K, D], [8, D], [8, K] (with kGrad; ge: fused loss)
  bool stream = false;             // gm / gs with non-temporal stores
};

// The two log-sum-exps of a group, over w.lg (logits in lanes; replaced by logit - max) and w.joint (log N_k;
// replaced by exp(log pi_k + log N_k - max'), the unnormalized responsibilities); w.pi = exp(logit - max).
// log pi = (logit - max) - log sum exp(logit - max) and log p = LSE_k(log pi_k + log N_k): the second LSE runs over
// (logit - max) + log N, so that it does not wait for the first one's log (log p = LSE - log_sum); the sums over K
// in four partial sums (short add chains).
struct Lse {
  __m256 shift, log_sum, lse, inv_sum, sum2;
};
inline Lse mixture_lse(Scratch& w) {
  const int64_t K = w.K;
  // (the rows through local pointers: stores through __m256* may alias anything, the vectors' own pointers too)
  __m256 *const lg = w.lg.data(), *const joint = w.joint.data(), *const pi = w.pi.data();
  const __m256 zero = _mm256_setzero_ps(), ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  // (the loops over K four components at a time, the partial sums / maxima in registers; the tail adds into the
  // same partial sums k & 3, so the order of the additions does not depend on K's remainder)
  const int64_t K4 = K & ~int64_t(3);
  __m256 m[4] = {ninf, ninf, ninf, ninf};
  for (int64_t k = 0; k < K4; k += 4)
    for (int u = 0; u < 4; ++u) m[u] = _mm256_max_ps(lg[k + u], m[u]);  // NaN logits are skipped by the max
  for (int64_t k = K4; k < K; ++k) m[0] = _mm256_max_ps(lg[k], m[0]);
  const __m256 shift = lse_shift(_mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3])));
  m[0] = m[1] = m[2] = m[3] = ninf;
  const auto shift_joint = [&](int64_t k, int u) {
    lg[k] = _mm256_sub_ps(lg[k], shift);
    joint[k] = _mm256_add_ps(lg[k], joint[k]);
    m[u] = _mm256_max_ps(joint[k], m[u]);
  };
  for (int64_t k = 0; k < K4; k += 4)
    for (int u = 0; u < 4; ++u) shift_joint(k + u, u);
  for (int64_t k = K4; k < K; ++k) shift_joint(k, 0);
  const __m256 shift2 = lse_shift(_mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3])));
  __m256 s1[4] = {zero, zero, zero, zero}, s2[4] = {zero, zero, zero, zero};
  const auto exps = [&](int64_t k, __m256& a1, __m256& a2) {
    pi[k] = exp_nonpos8(lg[k]);  // (both arguments are shifted by their max: <= 0, or NaN)
    joint[k] = exp_nonpos8(_mm256_sub_ps(joint[k], shift2));
    a1 = _mm256_add_ps(a1, pi[k]);
    a2 = _mm256_add_ps(a2, joint[k]);
  };
  for (int64_t k = 0; k < K4; k += 4)
    for (int u = 0; u < 4; ++u) exps(k + u, s1[u], s2[u]);
  switch (K - K4) {  // (constant indices: the partial sums stay in registers)
    case 3: exps(K4 + 2, s1[2], s2[2]); [[fallthrough]];
    case 2: exps(K4 + 1, s1[1], s2[1]); [[fallthrough]];
    case 1: exps(K4, s1[0], s2[0]); break;
    default: break;
  }
  const __m256 sum = _mm256_add_ps(_mm256_add_ps(s1[0], s1[1]), _mm256_add_ps(s1[2], s1[3]));
  const __m256 sum2 = _mm256_add_ps(_mm256_add_ps(s2[0], s2[1]), _mm256_add_ps(s2[2], s2[3]));
  const __m256 log_sum = log8(sum);
  const __m256 lse = _mm256_sub_ps(_mm256_add_ps(shift2, log8(sum2)), log_sum);
  return {shift, log_sum, lse, _mm256_div_ps(_mm256_set1_ps(1.0f), sum), sum2};
}

// loss [8] and saved [8, kSaved] (shift, log_sum, lse[, pbar]) of a group
template <int kSaved>
inline void store_loss_saved(float* loss, float* saved, __m256 loss_v, const Lse& st, __m256 pbar) {
  _mm256_storeu_ps(loss, loss_v);
  alignas(32) float s[4][8];
  _mm256_store_ps(s[0], st.shift);
  _mm256_store_ps(s[1], st.log_sum);
  _mm256_store_ps(s[2], st.lse);
  _mm256_store_ps(s[3], pbar);
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < kSaved; ++j) saved[kSaved * i + j] = s[j][i];
}

// A group's 8 input rows per tensor: lg [K], mu / ls [K, D], y [D] per sample, row i of each at its pointer + i
// times its row stride (the batch stride in place; 0 for a batch broadcast; the row length for staging).
struct GroupIn {
  const float *lg, *mu, *ls, *y;
  int64_t lg_rs, mu_rs, ls_rs, y_rs;
};

// The mixture NLL alone: no physics hooks.
struct NoPhysics {
  static constexpr bool kActive = false;
  static constexpr bool kRowHook = false;
  static constexpr int kSaved = math::kSavedPerSample;
  void begin_group(int64_t, int64_t) {}
  void begin_component(int64_t) {}
  template <bool kGrad>
  void element(int64_t, __m256, __m256) {}
  __m256 end_component(int64_t) { return _mm256_setzero_ps(); }
};

}  // namespace physmdn::cpu::soa

// AVX2+FMA mixture NLL (forward, forward with gradients, backward) for float32 / bfloat16 / float16 inputs of any
// layout (rows contiguous per sample are read in place at any batch stride, other layouts gathered per group of 8
// samples), vectorized across samples: a group of 8 samples is transposed in registers (8x8 tiles) so that lane i
// holds sample i. Every per-element and per-component step then runs on full vectors with no
// horizontal reduction (the log-sum-exps over K are vertical max / exp / add), and the gradients are
// transposed back on the way out. Inputs are read once and the outputs written once per call.
//
// Included by kernels.cpp in its AVX2 build only. The math is mixture_math.h's: the same shift-by-max
// log-sum-exps (shift 0 for all -inf rows, NaN ignored by the max and propagated by the sums), gamma = 0 gives
// zero component gradients, gradients in float32.
#pragma once
#if !defined(__AVX2__) || !defined(__FMA__)
#error "soa_avx2.h needs AVX2 and FMA"
#endif

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "mixture_math.h"
#include "physics_math.h"

namespace physmdn::cpu::soa {

constexpr int64_t kLanes = 8;

// exp of 8 floats. Cody-Waite reduction x = n ln2 + r (|r| <= ln2 / 2) and a degree-6 minimax polynomial for e^r
// (fitted here; max error 1.25 ulp over the float32 range, tests/ops/test_vector_math.py), scaled by 2^n through the
// exponent bits. n comes from one FMA: x log2(e) + 1.5 2^23 + 127 rounds to the integer n + 127, which then sits in
// the low mantissa bits (shifted into the exponent field: no float -> int conversion, no underflow mask). x is
// clamped to [-88, 88.7] first: n = -127 (x < -87.68) gives the scale 0, so the result 0; results in
// (-87.68, -87.34) are denormal; n = 128 (x > 88.38) gives the scale +inf (the top 0.4% of the float range
// overflows early). NaN passes both clamps (min / max return their second operand for NaN) and propagates.
//
// exp8_impl<kNeg, kUpper>: kNeg computes e^-x with the negation folded into the clamp and the reduction (bit for bit
// exp8(-x), one instruction less); kUpper = false drops the upper clamp, for arguments known to be <= 0 or NaN (the
// shifted terms of a log-sum-exp).
template <bool kNeg, bool kUpper>
inline __m256 exp8_impl(__m256 x) {
  if constexpr (kNeg)
    x = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-88.7f), x));  // -x in [-88, 88.7]
  else if constexpr (kUpper)
    x = _mm256_max_ps(_mm256_set1_ps(-88.0f), _mm256_min_ps(_mm256_set1_ps(88.7f), x));
  else
    x = _mm256_max_ps(_mm256_set1_ps(-88.0f), x);
  const __m256 magic = _mm256_set1_ps(12582912.0f + 127.0f);  // 1.5 2^23 + 127
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(kNeg ? -1.44269504088896341f : 1.44269504088896341f), magic);
  const __m256 fn = _mm256_sub_ps(t, magic);  // n, exactly
  // r = (+-x) - n ln2_hi: -(n ln2_hi) - x for e^-x
  __m256 r = kNeg ? _mm256_fnmsub_ps(fn, _mm256_set1_ps(0.693359375f), x)
                  : _mm256_fnmadd_ps(fn, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fn, _mm256_set1_ps(-2.12194440e-4f), r);
  // e^r = 1 + r + r^2 (c2 + c3 r + r^2 (c4 + c5 r + c6 r^2)), Estrin's scheme (short dependency chains)
  const __m256 r2 = _mm256_mul_ps(r, r);
  const __m256 lo = _mm256_fmadd_ps(_mm256_set1_ps(1.666652113199234e-1f), r, _mm256_set1_ps(4.999999403953552e-1f));
  const __m256 mid = _mm256_fmadd_ps(_mm256_set1_ps(8.368710055947304e-3f), r, _mm256_set1_ps(4.166838899254799e-2f));
  const __m256 hi = _mm256_fmadd_ps(_mm256_set1_ps(1.381461275741458e-3f), r2, mid);
  __m256 p = _mm256_fmadd_ps(hi, r2, lo);
  p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n: the low 9 bits of t's pattern are n + 127 in [0, 255] (0: the scale 0; 255: +inf)
  const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23));
  return _mm256_mul_ps(p, scale);
}
inline __m256 exp8(__m256 x) { return exp8_impl<false, true>(x); }
inline __m256 exp_neg8(__m256 x) { return exp8_impl<true, true>(x); }      // e^-x
inline __m256 exp_nonpos8(__m256 x) { return exp8_impl<false, false>(x); }  // e^x for x <= 0 or NaN

// log of 8 floats: Cephes' logf (mantissa in [sqrt(1/2), sqrt(2)), degree-9 polynomial, about 1 ulp) for
// positive normal x; 0 -> -inf, +inf -> +inf, negative or NaN -> NaN. Denormal inputs (which the log-sum-exps,
// with sums of 0 or >= 1, never pass) go through Sleef.
inline __m256 log8(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i exp_field = _mm256_srli_epi32(bits, 23);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(exp_field, _mm256_set1_epi32(126)));
  __m256 m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)), _mm256_set1_epi32(0x3F000000)));
  // m in [0.5, 1): below sqrt(1/2) use 2m - 1 and e - 1, else m - 1
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  const __m256 one = _mm256_set1_ps(1.0f);
  e = _mm256_sub_ps(e, _mm256_and_ps(small, one));
  m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)), one);
  const __m256 z = _mm256_mul_ps(m, m);
  __m256 p = _mm256_set1_ps(7.0376836292e-2f);
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(-1.1514610310e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(1.1676998740e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(-1.2420140846e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(1.4249322787e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(-1.6668057665e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(2.0000714765e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(-2.4999993993e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(3.3333331174e-1f));
  p = _mm256_mul_ps(_mm256_mul_ps(p, m), z);
  p = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), p);
  p = _mm256_fmadd_ps(z, _mm256_set1_ps(-0.5f), p);
  __m256 r = _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(m, p));
  // special inputs: zero or denormal (exponent field 0), negative, inf or NaN (exponent field 255)
  const __m256i special = _mm256_or_si256(
      _mm256_or_si256(_mm256_cmpeq_epi32(exp_field, _mm256_setzero_si256()), _mm256_srai_epi32(bits, 31)),
      _mm256_cmpeq_epi32(exp_field, _mm256_set1_epi32(255)));
  if (_mm256_testz_si256(special, special)) return r;
  return _mm256_blendv_ps(r, __m256(at::vec::Vectorized<float>(x).log()), _mm256_castsi256_ps(special));
}

// In-register transpose of an 8x8 block of floats (its own inverse).
inline void transpose8(__m256 (&r)[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// 4x4 transposes within both 128-bit halves: r[j] = [row j | row j + 4] (4 columns each) becomes
// r[c] = [column c of rows 0-3 | column c of rows 4-7]. Its own inverse.
inline void transpose4x2(__m256 (&r)[4]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  r[0] = _mm256_shuffle_ps(t0, t2, 0x44);
  r[1] = _mm256_shuffle_ps(t0, t2, 0xEE);
  r[2] = _mm256_shuffle_ps(t1, t3, 0x44);
  r[3] = _mm256_shuffle_ps(t1, t3, 0xEE);
}

// 8 rows of n floats (row i at src + i rs; rs = n: row-major [8, n], 0: one row broadcast) -> n vectors, vector c
// holding column c of the 8 rows: 8-column tiles by 8x8 transposes, a 4-column tile by 4x4 ones, the last < 4
// columns element by element.
inline void to_lanes(const float* src, int64_t n, __m256* out, int64_t rs) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    __m256 r[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * rs + c);
    transpose8(r);
    for (int j = 0; j < 8; ++j) out[c + j] = r[j];
  }
  if (c + 4 <= n) {
    __m256 r[4];
    for (int j = 0; j < 4; ++j)
      r[j] = _mm256_set_m128(_mm_loadu_ps(src + (j + 4) * rs + c), _mm_loadu_ps(src + j * rs + c));
    transpose4x2(r);
    for (int j = 0; j < 4; ++j) out[c + j] = r[j];
    c += 4;
  }
  for (; c < n; ++c)
    out[c] = _mm256_setr_ps(src[c], src[rs + c], src[2 * rs + c], src[3 * rs + c], src[4 * rs + c], src[5 * rs + c],
                            src[6 * rs + c], src[7 * rs + c]);
}
inline void to_lanes(const float* src, int64_t n, __m256* out) { to_lanes(src, n, out, n); }

// Stores of 8 / 4 floats as float32, or converted to bfloat16 / float16 (round to nearest even, NaN kept).
inline void store8(float* p, __m256 v, bool stream) { stream ? _mm256_stream_ps(p, v) : _mm256_storeu_ps(p, v); }
inline __m128i to_16bit(__m256 v, const at::BFloat16*) { return at::vec::cvtfp32_bf16(v); }
inline __m128i to_16bit(__m256 v, const at::Half*) {
  return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
template <typename T>
inline void store8(T* p, __m256 v, bool stream) {
  const __m128i h = to_16bit(v, p);
  stream ? _mm_stream_si128(reinterpret_cast<__m128i*>(p), h) : _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
}
inline void store4(float* p, __m128 v) { _mm_storeu_ps(p, v); }
template <typename T>
inline void store4(T* p, __m128 v) {
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), to_16bit(_mm256_castps128_ps256(v), p));
}

// The inverse: n vectors -> [8, n] row-major at dst (float32, or converted to the 16-bit dst type). With
// may_stream, 8-column tiles whose rows stay aligned are written with non-temporal stores (write-once outputs larger
// than the caches: no read for ownership). With row_stage (n vectors of scratch) and n a multiple of 8, the tiles are
// transposed into rows first and the rows stored in address order: every cache line written whole, one after the
// other (not 8 partial lines per tile, which overflow the write-combining buffers of non-temporal stores).
template <typename T>
inline void from_lanes(const __m256* in, int64_t n, T* dst, bool may_stream = false,
                       __m256* row_stage = nullptr) {
  int64_t c = 0;
  const bool stream = may_stream && n % 8 == 0 && reinterpret_cast<uintptr_t>(dst) % (8 * sizeof(T)) == 0;
  if (row_stage && n % 8 == 0) {
    const int64_t tiles = n / 8;
    for (int64_t t = 0; t < tiles; ++t) {
      __m256 r[8];
      for (int j = 0; j < 8; ++j) r[j] = in[8 * t + j];
      transpose8(r);
      for (int i = 0; i < 8; ++i) row_stage[i * tiles + t] = r[i];  // row i's tile t
    }
    // (the stream test hoisted out of the store loop: streamed is std::true_type / std::false_type)
    const auto store_all = [&](auto streamed) {
      for (int64_t v = 0; v < n; v += 8)
        for (int u = 0; u < 8; ++u) store8(dst + 8 * (v + u), row_stage[v + u], streamed());
    };
    stream ? store_all(std::true_type{}) : store_all(std::false_type{});
    return;
  }
  for (; c + 8 <= n; c += 8) {
    __m256 r[8];
    for (int j = 0; j < 8; ++j) r[j] = in[c + j];
    transpose8(r);
    for (int i = 0; i < 8; ++i) store8(dst + i * n + c, r[i], stream);
  }
  if (c + 4 <= n) {
    __m256 r[4];
    for (int j = 0; j < 4; ++j) r[j] = in[c + j];
    transpose4x2(r);
    for (int j = 0; j < 4; ++j) {
      store4(dst + j * n + c, _mm256_castps256_ps128(r[j]));
      store4(dst + (j + 4) * n + c, _mm256_extractf128_ps(r[j], 1));
    }
    c += 4;
  }
  for (; c < n; ++c) {
    alignas(32) float col[8];
    _mm256_store_ps(col, in[c]);
    for (int i = 0; i < 8; ++i) dst[i * n + c] = static_cast<T>(col[i]);
  }
}

// Gradient rows from the float32 staging buffers to the output dtype (float32, or the input's bfloat16 / float16:
// rounded to nearest even, NaN kept).
template <typename T>
inline void store_rows(const float* src, int64_t n, T* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(dst + i, _mm256_loadu_ps(src + i), false);
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// Input rows to float32 staging: nvalid values converted, the rest of n zero (padding rows: finite, discarded).
template <typename scalar_t>
void to_float_rows(const scalar_t* src, int64_t n, int64_t nvalid, float* dst) {
  int64_t e = 0;
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {  // bfloat16: the upper half of a float32
    for (; e + 8 <= nvalid; e += 8) {
      const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + e)));
      _mm256_storeu_ps(dst + e, _mm256_castsi256_ps(_mm256_slli_epi32(h, 16)));
    }
  } else if constexpr (std::is_same_v<scalar_t, at::Half>) {  // F16C
    for (; e + 8 <= nvalid; e += 8)
      _mm256_storeu_ps(dst + e, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + e))));
  }
  for (; e < nvalid; ++e) dst[e] = static_cast<float>(src[e]);
  for (; e < n; ++e) dst[e] = 0.0f;  // padding rows: finite, discarded
}

// nrows rows of n values (row i at src + i rs) to float32 staging [8, n]: the rows converted, the rest zero.
template <typename scalar_t>
void to_float_rows(const scalar_t* src, int64_t rs, int64_t n, int64_t nrows, float* dst) {
  if (rs == n) return to_float_rows(src, kLanes * n, nrows * n, dst);
  for (int64_t i = 0; i < nrows; ++i) to_float_rows(src + i * rs, n, n, dst + i * n);
  std::fill(dst + nrows * n, dst + kLanes * n, 0.0f);
}

// An input's layout, [B, n1, n2] at strides s0, s1, s2 (n2 = 1 for the 2-D logits and target). rows: each sample's
// n1 n2 values are contiguous (read in place at the batch stride s0, which may be anything, 0 for a batch broadcast);
// otherwise (inputs broadcast over K or D, transposed or sliced views) they are gathered into the staging rows.
struct InLayout {
  int64_t s0, s1, s2, n1, n2;
  bool rows;
  explicit InLayout(const at::Tensor& t)
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
// (An earlier session found no steady gain from prefetching: its prefetches may have been dropped by the compiler,
// see below.)
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

// Shift of a log-sum-exp: the max, or 0 when every term is -inf (so that the LSE is -inf, not NaN).
inline __m256 lse_shift(__m256 mx) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  return _mm256_blendv_ps(mx, _mm256_setzero_ps(), _mm256_cmp_ps(mx, ninf, _CMP_EQ_OQ));
}

// All-ones lanes where x is finite (x - x is 0 only for finite x).
inline __m256 finite_mask(__m256 x) { return _mm256_cmp_ps(_mm256_sub_ps(x, x), _mm256_setzero_ps(), _CMP_EQ_OQ); }

// A penalty is an expectation of a square (>= 0): a NaN it takes from finite inputs (fin) can only be inf - inf
// between overflowed terms (huge scales), so its value is +inf. NaN inputs keep their NaN (physics_math.h).
inline __m256 overflow_to_inf(__m256 penalty, __m256 fin) {
  const __m256 nan = _mm256_cmp_ps(penalty, penalty, _CMP_UNORD_Q);
  return _mm256_blendv_ps(penalty, _mm256_set1_ps(std::numeric_limits<float>::infinity()), _mm256_and_ps(nan, fin));
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
  // D in {1, 2, 4} with K D a multiple of 8 (a vector of a row holds 8 / D whole components), or D a multiple of 8
  // (a component spans D / 8 whole vectors)
  static bool rows_path_applies(int64_t K, int64_t D) {
    return rows_path_enabled().load(std::memory_order_relaxed) &&
           ((D == 1 || D == 2 || D == 4) ? (K * D) % 8 == 0 : D % 8 == 0);
  }
};

template <typename grad_t>
struct GroupOut {
  float* loss;   // [8]
  float* saved;  // [8, Phys::kSaved]
  grad_t *gl, *gm, *gs, *gt, *ge;  // [8, K], [8, K, D], [8, K, D], [8, D], [8, K] (with kGrad; ge: fused loss)
  bool stream = false;             // gm / gs with non-temporal stores
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

// The row-wise path of the mixture NLL alone (Scratch::rows_path: D in {1, 2, 4} with K D a multiple of 8, or D a
// multiple of 8): the element-wise work runs on each sample's [K, D] rows as they lie in memory, 8 / D components
// per vector (D <= 8) or D / 8 vectors per component (D >= 8; template argument 0: D read at run time), instead
// of on transposed lanes. Only what is per component goes through lanes: log N_k (summed over D within the vectors
// by horizontal adds, then the [8, K] rows transposed for the log-sum-exps, as in group8) and -g gamma_k (transposed
// back to rows and spread over each component's D lanes). The [B, K, D] inputs are read and the gradients written
// row by row, without the 8x8 transposes of both (measured: see the README, "row-wise path").
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

// One group of 8 samples; g: upstream gradient per lane.
// With an active Phys, the loss is the fused one: NLL + sum_k pi_k Q_k (saved[3] = sum_k pi_k Q_k).
template <bool kGrad, typename Phys, typename grad_t>
void group8(const GroupIn& in, __m256 g, Scratch& w, Phys& phys, const GroupOut<grad_t>& out) {
  if constexpr (!Phys::kActive && !Phys::kRowHook) {
    if (w.rows_path) {
      if (w.D == 8) return group8_rows<kGrad, 8>(in, g, w, out);
      if (w.D % 8 == 0) return group8_rows<kGrad, 0>(in, g, w, out);  // D / 8 vectors per component
      if (w.D == 4) return group8_rows<kGrad, 4>(in, g, w, out);
      if (w.D == 2) return group8_rows<kGrad, 2>(in, g, w, out);
      return group8_rows<kGrad, 1>(in, g, w, out);
    }
  }
  const int64_t K = w.K, D = w.D, KD = K * D;
  to_lanes(in.mu, KD, w.mu.data(), in.mu_rs);
  to_lanes(in.ls, KD, w.ls.data(), in.ls_rs);
  to_lanes(in.y, D, w.y.data(), in.y_rs);
  to_lanes(in.lg, K, w.lg.data(), in.lg_rs);
  const __m256 sign = _mm256_set1_ps(-0.0f), nhalf = _mm256_set1_ps(-0.5f), one = _mm256_set1_ps(1.0f);
  const __m256 zero = _mm256_setzero_ps();
  const __m256 offset = _mm256_set1_ps(static_cast<float>(D) * static_cast<float>(math::kHalfLog2Pi));
  const __m256* const y = w.y.data();  // (as in mixture_lse: no reload after every store)
  // log N_k = sum_d (-z^2 / 2 - log_scale) - D log(2 pi) / 2 (and the physics terms, before the rows are reused)
  for (int64_t k = 0; k < K; ++k) {
    __m256 acc = zero;
    __m256 *mu = w.mu.data() + k * D, *ls = w.ls.data() + k * D;
    if constexpr (Phys::kActive) phys.begin_component(k);
    if constexpr (Phys::kRowHook) phys.template component_rows<kGrad>(k, mu, ls);
    // (the hot loops over a runtime D or K unrolled by 4: their control was ~10 % of the body's instructions)
#pragma GCC unroll 4
    for (int64_t d = 0; d < D; ++d) {
      const __m256 l = ls[d];
      if constexpr (Phys::kActive) phys.template element<kGrad>(k * D + d, mu[d], l);
      const __m256 inv = exp_neg8(l);
      const __m256 z = _mm256_mul_ps(_mm256_sub_ps(y[d], mu[d]), inv);
      const __m256 zz = _mm256_mul_ps(z, z);
      acc = _mm256_add_ps(acc, _mm256_fmsub_ps(nhalf, zz, l));  // one add per element on the chain
      if constexpr (kGrad) {
        mu[d] = _mm256_mul_ps(z, inv);
        ls[d] = zz;  // d/dlog_scale is (z^2 - 1) c_k: one fmsub below
      }
    }
    w.joint[k] = _mm256_sub_ps(acc, offset);
    if constexpr (Phys::kActive) w.qk[k] = phys.end_component(k);
  }
  const Lse st = mixture_lse(w);
  const __m256 lse = st.lse, inv_sum = st.inv_sum, sum2 = st.sum2;
  // mixture-weighted penalty: sum over components with mass (pi > 0: no 0 * inf)
  __m256 pbar = zero;
  if constexpr (Phys::kActive) {
    for (int64_t k = 0; k < K; ++k) {
      const __m256 pi = _mm256_mul_ps(w.pi[k], inv_sum);
      pbar = _mm256_add_ps(pbar, _mm256_and_ps(_mm256_cmp_ps(pi, zero, _CMP_GT_OQ), _mm256_mul_ps(pi, w.qk[k])));
    }
  }
  const __m256 loss = Phys::kActive ? _mm256_sub_ps(pbar, lse) : _mm256_xor_ps(lse, sign);
  store_loss_saved<Phys::kSaved>(out.loss, out.saved, loss, st, pbar);
  if constexpr (kGrad) {
    const __m256 inv_sum2 = _mm256_div_ps(one, sum2);
    // no responsibility, no gradient (gamma_k = 0 masks the component's terms: avoids 0 * inf for far-away
    // targets); groups where every lane's every gamma is positive skip the masks
    bool masked = false;
    for (int64_t k = 0; k < K; ++k) {
      w.joint[k] = _mm256_mul_ps(w.joint[k], inv_sum2);  // gamma_k
      const __m256 none = _mm256_cmp_ps(w.joint[k], zero, _CMP_EQ_OQ);
      masked |= !_mm256_testz_ps(none, none);
    }
    __m256* const gt = w.gt.data();
    for (int64_t d = 0; d < D; ++d) gt[d] = zero;
    for (int64_t k = 0; k < K; ++k) {
      const __m256 pi = _mm256_mul_ps(w.pi[k], inv_sum), gamma = w.joint[k];
      w.gl[k] = _mm256_mul_ps(g, _mm256_sub_ps(pi, gamma));
      const __m256 c = _mm256_xor_ps(_mm256_mul_ps(g, gamma), sign);
      __m256 *gm = w.mu.data() + k * D, *gs = w.ls.data() + k * D;
      if (masked) {
        const __m256 none = _mm256_cmp_ps(gamma, zero, _CMP_EQ_OQ);
        for (int64_t d = 0; d < D; ++d) {
          const __m256 m = _mm256_andnot_ps(none, _mm256_mul_ps(gm[d], c));
          gm[d] = m;
          gs[d] = _mm256_andnot_ps(none, _mm256_fmsub_ps(gs[d], c, c));
          gt[d] = _mm256_sub_ps(gt[d], m);
        }
      } else {
#pragma GCC unroll 4
        for (int64_t d = 0; d < D; ++d) {
          const __m256 m = _mm256_mul_ps(gm[d], c);
          gm[d] = m;
          gs[d] = _mm256_fmsub_ps(gs[d], c, c);
          gt[d] = _mm256_sub_ps(gt[d], m);
        }
      }
      if constexpr (Phys::kActive) {
        // penalty part (not through the target): d/dlogit_k = g pi_k (Q_k - pbar), d/dmu = g w pi_k dE/dmu, ...
        const __m256 mass = _mm256_cmp_ps(pi, zero, _CMP_GT_OQ);
        const __m256 gpi = _mm256_mul_ps(g, pi);
        w.ge[k] = gpi;
        if (phys.couple_weights)
          w.gl[k] = _mm256_add_ps(w.gl[k], _mm256_and_ps(mass, _mm256_mul_ps(gpi, _mm256_sub_ps(w.qk[k], pbar))));
        const __m256 scale = _mm256_and_ps(mass, _mm256_mul_ps(_mm256_set1_ps(phys.weight), gpi));
        for (int64_t d = 0; d < D; ++d) {
          gm[d] = _mm256_fmadd_ps(scale, phys.dmu[k * D + d], gm[d]);
          gs[d] = _mm256_fmadd_ps(scale, phys.dls[k * D + d], gs[d]);
        }
        phys.scale_param_grads(k, scale, mass);
      }
    }
    from_lanes(w.mu.data(), KD, out.gm, out.stream, w.row_stage.data());
    from_lanes(w.ls.data(), KD, out.gs, out.stream, w.row_stage.data());
    from_lanes(w.gl.data(), K, out.gl);
    from_lanes(w.gt.data(), D, out.gt);
    if constexpr (Phys::kActive) {
      if (out.ge) from_lanes(w.ge.data(), K, out.ge);
      phys.store_param_grads();
    }
  }
}

// The [B, K, D] gradients are written with non-temporal stores (no read for ownership, no eviction of the inputs
// still to be read) when the call's working set, inputs and gradients, is at least 32 MiB: then it cannot stay in a
// typical last-level cache anyway. Smaller ones are stored normally and stay in cache, where the backward's
// consumers read them next. Measured on a 2-core VM (Zen 3, 32 MiB L3), the kernel alone with K = 8, D = 4, inputs
// evicted from the cache before each call, the variants interleaved in one process, p20 / median / p80 ms:
// B = 65536 (38 MiB: 19 of inputs, 19 of gradients) streamed 4.44 / 5.10 / 8.22 against 5.31 / 6.85 / 8.72 stored;
// B = 262144 streamed 17.4 / 19.2 / 22.5 against 21.8 / 25.7 / 36.7. Streamed rows are written whole (from_lanes'
// row order): written tile by tile (8 rows x 32 bytes at a time) the same stores had a p80 of 12.1 and 51.2 ms, the
// partial lines overflowing the write-combining buffers. Through autograd (forward + backward at B = 65536, an
// eager reference run between calls), medians 5.98-6.66 ms before (tile order, regular stores: the gradients alone
// were under 32 MiB) against 5.18-5.37 ms. (A fixed size: the last-level cache a VM reports can be
// the host's, e.g. 256 MiB for a 32 MiB slice.)
constexpr int64_t kStreamMinBytes = int64_t{32} << 20;

// Driver over the batch. loss_all [B] and saved_all [B, Phys::kSaved] may be null (not written); the gradients
// (written with kGrad; ge_all only with physics, may be null) are for the upstream gradient grad_loss ([B], any
// stride), or g_default when it is null. They are float32 (grad_t = float) or the input's reduced dtype (grad_t =
// scalar_t: converted in registers on the way out, so that no float32 [B, K, D] buffer is ever made for them).
template <bool kGrad, typename scalar_t, typename grad_t = float, typename Phys>
void run(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales, const at::Tensor& target,
         const Phys& phys_proto, const at::Tensor* grad_loss, float g_default, scalar_t* loss_all, float* saved_all,
         std::type_identity_t<grad_t>* gl_all, std::type_identity_t<grad_t>* gm_all, std::type_identity_t<grad_t>* gs_all,
         std::type_identity_t<grad_t>* gt_all, std::type_identity_t<grad_t>* ge_all) {
  static_assert(std::is_same_v<grad_t, float> || std::is_same_v<grad_t, scalar_t>);
  const int64_t B = means.size(0), K = means.size(1), D = means.size(2), KD = K * D;
  constexpr int kSaved = Phys::kSaved;
  const scalar_t *lg_all = logits.const_data_ptr<scalar_t>(), *mu_all = means.const_data_ptr<scalar_t>();
  const scalar_t *ls_all = log_scales.const_data_ptr<scalar_t>(), *y_all = target.const_data_ptr<scalar_t>();
  const InLayout lg_in(logits), mu_in(means), ls_in(log_scales), y_in(target);
  const scalar_t* g_ptr = grad_loss ? grad_loss->const_data_ptr<scalar_t>() : nullptr;
  const int64_t g_stride = grad_loss ? grad_loss->stride(0) : 0;
  const int64_t groups = (B + kLanes - 1) / kLanes;
  const int64_t values = B * (2 * KD + K + D);  // input values (and as many gradient values)
  const int64_t working_set = values * static_cast<int64_t>(sizeof(scalar_t) + sizeof(grad_t));
  const bool stream = working_set >= kStreamMinBytes;
  // inputs of 4 MiB and more are prefetched (smaller ones stay in the caches: the prefetches only cost); gradients
  // stored normally (not streamed) from a 16 MiB working set on are prefetched for writing (their read for ownership
  // one group early: 1.03-1.09x at B = 32768 and 49152, K = 8, D = 4)
  const bool prefetch = values * static_cast<int64_t>(sizeof(scalar_t)) >= kPrefetchMinBytes;
  const bool prefetch_out = prefetch && !stream && working_set >= kStreamMinBytes / 2;
  // Dynamic schedule: threads take chunks of groups from a shared counter, so a thread that is preempted (shared
  // or virtual CPUs) does not leave the others waiting at the end; each chunk is a contiguous stretch of memory.
  // Chunks of about 8K floats of input, and at least 4 per thread (mid-size batches stay balanced).
  const int64_t threads = at::get_num_threads();
  const int64_t chunk = std::max<int64_t>(
      1, std::min<int64_t>(8192 / (KD + K + D), (groups + 4 * threads - 1) / (4 * threads)));
  const int64_t chunks = (groups + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(chunks, threads), 1, [&](int64_t, int64_t) {
    Scratch w(K, D);
    Phys phys = phys_proto;
    if constexpr (Phys::kActive) {
      if constexpr (kGrad) phys.dmu.resize(KD), phys.dls.resize(KD);
      w.qk.resize(K), w.ge.resize(K);
    }
    alignas(32) float loss8[8], saved8[8 * kSaved], g8[8];
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next.fetch_add(1, std::memory_order_relaxed))
    for (int64_t grp = c * chunk, grp_end = std::min(groups, grp + chunk); grp < grp_end; ++grp) {
      const int64_t b0 = grp * kLanes, nb = std::min(kLanes, B - b0);
      if (prefetch && grp + 1 < grp_end) {  // the next group's rows, one group ahead (prefetch_rows)
        const int64_t b1 = b0 + kLanes, nb1 = std::min(kLanes, B - b1);
        prefetch_rows(lg_all, lg_in, b1, nb1), prefetch_rows(mu_all, mu_in, b1, nb1);
        prefetch_rows(ls_all, ls_in, b1, nb1), prefetch_rows(y_all, y_in, b1, nb1);
        if constexpr (kGrad) {
          if (prefetch_out && nb1 == kLanes) {
            prefetch_lines<true>(gm_all + b1 * KD, kLanes * KD * static_cast<int64_t>(sizeof(grad_t)));
            prefetch_lines<true>(gs_all + b1 * KD, kLanes * KD * static_cast<int64_t>(sizeof(grad_t)));
            prefetch_lines<true>(gl_all + b1 * K, kLanes * K * static_cast<int64_t>(sizeof(grad_t)));
          }
        }
      }
      GroupIn in;
      in.lg = group_rows(lg_all, lg_in, b0, nb, w.in_lg.data(), in.lg_rs);
      in.mu = group_rows(mu_all, mu_in, b0, nb, w.in_mu.data(), in.mu_rs);
      in.ls = group_rows(ls_all, ls_in, b0, nb, w.in_ls.data(), in.ls_rs);
      in.y = group_rows(y_all, y_in, b0, nb, w.in_y.data(), in.y_rs);
      __m256 g;
      if (!g_ptr && nb == kLanes) {
        g = _mm256_set1_ps(g_default);
      } else {
        for (int64_t i = 0; i < kLanes; ++i)
          g8[i] = i >= nb ? 0.0f : g_ptr ? static_cast<float>(g_ptr[(b0 + i) * g_stride]) : g_default;
        g = _mm256_load_ps(g8);
      }
      // full groups write their outputs in place (gradients in grad_t; the loss too when float32); the last,
      // partial one goes through the float32 staging rows
      const bool direct_out = nb == kLanes;
      float* loss_out = loss8;
      if constexpr (std::is_same_v<scalar_t, float>)
        if (direct_out && loss_all) loss_out = loss_all + b0;
      phys.begin_group(b0, nb);
      if (direct_out) {
        GroupOut<grad_t> out{loss_out, saved_all ? saved_all + kSaved * b0 : saved8, nullptr, nullptr, nullptr,
                             nullptr, nullptr};
        if constexpr (kGrad) {
          out.gl = gl_all + b0 * K, out.gm = gm_all + b0 * KD, out.gs = gs_all + b0 * KD, out.gt = gt_all + b0 * D;
          out.ge = ge_all ? ge_all + b0 * K : nullptr;
          out.stream = stream;
        }
        group8<kGrad>(in, g, w, phys, out);
      } else {
        GroupOut<float> out{loss8, saved8, nullptr, nullptr, nullptr, nullptr, nullptr};
        if constexpr (kGrad) {
          out.gl = w.out_gl.data(), out.gm = w.out_gm.data(), out.gs = w.out_gs.data(), out.gt = w.out_gt.data();
          out.ge = ge_all ? w.out_ge.data() : nullptr;
        }
        group8<kGrad>(in, g, w, phys, out);
        if (saved_all) std::copy(saved8, saved8 + kSaved * nb, saved_all + kSaved * b0);
        if constexpr (kGrad) {
          store_rows(w.out_gl.data(), nb * K, gl_all + b0 * K);
          store_rows(w.out_gm.data(), nb * KD, gm_all + b0 * KD);
          store_rows(w.out_gs.data(), nb * KD, gs_all + b0 * KD);
          store_rows(w.out_gt.data(), nb * D, gt_all + b0 * D);
          if (ge_all) store_rows(w.out_ge.data(), nb * K, ge_all + b0 * K);
        }
      }
      if (loss_all && loss_out == loss8)
        for (int64_t i = 0; i < nb; ++i) loss_all[b0 + i] = static_cast<scalar_t>(loss8[i]);
    }
    _mm_sfence();  // order the non-temporal stores before the results are read
  });
}

template <bool kGrad, typename scalar_t, typename grad_t = float>
void mixture_nll(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
                 const at::Tensor& target, const at::Tensor* grad_loss, float g_default, scalar_t* loss_all,
                 float* saved_all, std::type_identity_t<grad_t>* gl_all, std::type_identity_t<grad_t>* gm_all,
                 std::type_identity_t<grad_t>* gs_all, std::type_identity_t<grad_t>* gt_all) {
  run<kGrad, scalar_t, grad_t>(logits, means, log_scales, target, NoPhysics{}, grad_loss, g_default, loss_all,
                               saved_all, gl_all, gm_all, gs_all, gt_all, nullptr);
}

}  // namespace physmdn::cpu::soa

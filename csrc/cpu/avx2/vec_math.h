// Vector math of the AVX2 kernels on 8 floats: exp and log (accurate to ~1 ulp, tests/ops/test_vector_math.py), the
// shift of a log-sum-exp and the finiteness masks.
#pragma once
#if !defined(__AVX2__) || !defined(__FMA__)
#error "cpu/avx2/vec_math.h needs AVX2 and FMA"
#endif

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace physmdn::cpu::soa {

// Samples per group: one per lane of a 256-bit vector of floats.
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
// with sums of 0 or >= 1, never pass) and the special values go through std::log lane by lane.
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
  alignas(32) float in[8], out[8];
  _mm256_store_ps(in, x);
  for (int i = 0; i < 8; ++i) out[i] = std::log(in[i]);
  return _mm256_blendv_ps(r, _mm256_load_ps(out), _mm256_castsi256_ps(special));
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

}  // namespace physmdn::cpu::soa

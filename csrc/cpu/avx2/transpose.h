// Moving values between rows in memory and vector lanes: 8x8 in-register transposes (to_lanes, from_lanes: lane i
// holds sample i), the stores that convert to bfloat16 / float16 on the way out, and row conversions to float32.
#pragma once
#if !defined(__AVX2__) || !defined(__FMA__)
#error "cpu/avx2/transpose.h needs AVX2 and FMA"
#endif

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/avx2/vec_math.h"
#include "tensor.h"

namespace physmdn::cpu::soa {

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
inline __m128i to_16bit(__m256 v, const BFloat16*) {
  // bits + 0x7fff + (the kept part's lowest bit), the upper half: round to nearest even; NaN -> 0xffff
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i ordered = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q));
  __m256i r = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(r, _mm256_set1_epi32(0x7fff)), bits), 16);
  r = _mm256_blendv_epi8(_mm256_set1_epi32(0xffff), r, ordered);
  r = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xd8);
  return _mm256_castsi256_si128(r);
}
inline __m128i to_16bit(__m256 v, const Half*) {
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
  if constexpr (std::is_same_v<scalar_t, BFloat16>) {  // bfloat16: the upper half of a float32
    for (; e + 8 <= nvalid; e += 8) {
      const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + e)));
      _mm256_storeu_ps(dst + e, _mm256_castsi256_ps(_mm256_slli_epi32(h, 16)));
    }
  } else if constexpr (std::is_same_v<scalar_t, Half>) {  // F16C
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

}  // namespace physmdn::cpu::soa

// CPU driver of the full-covariance mixture NLL: torch's thread pool over samples, contiguous inputs (csrc/ops.cpp
// makes them so), outputs allocated by ops.cpp. Compiled once per instruction set like the other drivers.
//
// Two paths, the same formulas (csrc/mvn_math.h):
// * float64: the shared per-sample math, tril_nll_sample / tril_nll_backward_sample, one component after the other;
// * float32 and the half types (float32 accumulation): the components path below, which runs kLanes components at
//   once. Each sample's factors are transposed into a [D][D][kLanes] scratch so that every step of the triangular
//   solves is one operation over kLanes contiguous values (one AVX2 vector of floats in the AVX2 build); the log
//   determinant and the log-sum-exps use the vector log / exp of cpu/vec.h. The gradient of the factors is written
//   row by row (an outer product per component). docs/performance.md has the measurements.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/kernels.h"
#include "cpu/vec.h"
#include "mvn_math.h"

#if defined(__AVX2__) && defined(__FMA__)
#include "cpu/avx2/transpose.h"
#endif

namespace physmdn::cpu::PHYSMDN_CPU_ISA {

namespace {

constexpr int kLanes = 8;  // components per step

// in place over kLanes values
template <typename T>
void log_lanes(T* x) {
  for (int o = 0; o < kLanes; o += Vec<T>::size()) Vec<T>::loadu(x + o).log().store(x + o);
}
template <typename T>
void exp_lanes(T* x) {
  for (int o = 0; o < kLanes; o += Vec<T>::size()) Vec<T>::loadu(x + o).exp().store(x + o);
}

// shift[k] = exp(x[k] - shift) for k < K (scratch padded to a multiple of kLanes); returns their sum. The shift is
// the max of x, 0 when every term is -inf, NaN when one is NaN (as math::lse).
template <typename T>
T shifted_exps(const T* x, int K, T* out, T* shift) {
  T mx = -std::numeric_limits<T>::infinity();
  for (int k = 0; k < K; ++k) mx = (x[k] > mx || x[k] != x[k]) ? x[k] : mx;
  *shift = mx == -std::numeric_limits<T>::infinity() ? T(0) : mx;
  const int padded = (K + kLanes - 1) / kLanes * kLanes;
  for (int k = 0; k < padded; ++k) out[k] = k < K ? x[k] - *shift : -std::numeric_limits<T>::infinity();
  for (int k = 0; k < padded; k += kLanes) exp_lanes(out + k);
  T total = T(0);
  for (int k = 0; k < K; ++k) total += out[k];
  return total;
}

// Per-thread scratch of the components path: the per-component terms of one sample, padded to whole steps.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> buf;
  acc_t *joint, *exps;
  explicit Scratch(int K) : buf(2 * ((K + kLanes - 1) / kLanes * kLanes)) {
    joint = buf.data();
    exps = joint + buf.size() / 2;
  }
};

// dst[c][l] = src[l * stride + c] for the kLanes rows l of src and its first cols columns: 8x8 in-register
// transposes of float32 in the AVX2 build.
template <typename scalar_t, typename acc_t>
void to_lanes(const scalar_t* src, int64_t stride, int cols, acc_t* dst) {
  int c = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float> && kLanes == 8) {
    for (; c + 8 <= cols; c += 8) {
      __m256 rows[8];
      for (int l = 0; l < 8; ++l) rows[l] = _mm256_loadu_ps(src + l * stride + c);
      soa::transpose8(rows);
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (c + j) * 8, rows[j]);
    }
  }
#endif
  for (; c < cols; ++c)
    for (int l = 0; l < kLanes; ++l) dst[c * kLanes + l] = static_cast<acc_t>(src[l * stride + c]);
}

// dst[l * stride + c] = src[c][l] for the first n lanes (the inverse of to_lanes)
template <typename acc_t>
void from_lanes(const acc_t* src, int cols, int n, acc_t* dst, int64_t stride) {
  int c = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<acc_t, float> && kLanes == 8) {
    if (n == 8)
      for (; c + 8 <= cols; c += 8) {
        __m256 rows[8];
        for (int j = 0; j < 8; ++j) rows[j] = _mm256_loadu_ps(src + (c + j) * 8);
        soa::transpose8(rows);
        for (int l = 0; l < 8; ++l) _mm256_storeu_ps(dst + l * stride + c, rows[l]);
      }
  }
#endif
  for (; c < cols; ++c)
    for (int l = 0; l < n; ++l) dst[l * stride + c] = src[c * kLanes + l];
}

// The factors of components k0 .. k0 + n into T [D][D][kLanes] (the lanes past n: identity; the upper triangles
// are copied where whole rows move at once, never read).
template <int kD, typename scalar_t, typename acc_t>
void gather_factors(const scalar_t* L, int k0, int n, int D_, acc_t* T) {
  const int D = kD ? kD : D_;
  if (n == kLanes) return to_lanes(L + static_cast<int64_t>(k0) * D * D, int64_t(D) * D, D * D, T);
  for (int l = 0; l < kLanes; ++l) {
    const scalar_t* Lk = L + static_cast<int64_t>(k0 + l) * D * D;
    for (int i = 0; i < D; ++i)
      for (int j = 0; j <= i; ++j)
        T[(i * D + j) * kLanes + l] = l < n ? static_cast<acc_t>(Lk[i * D + j]) : acc_t(i == j ? 1 : 0);
  }
}

// logdet[l] = sum_i log T[i][i][l] for the diagonals in T [D][D][kLanes] whose smallest and largest entries per lane
// are given: one vector log per 4 rows (products of 4 entries in [2^-30, 2^30] stay normal floats), one per row
// otherwise; NaN where an entry is not positive (log_positive).
template <int kD, typename acc_t>
void log_determinants(const acc_t* T, int D_, const acc_t* smallest, const acc_t* largest, acc_t* logdet) {
  const int D = kD ? kD : D_;
  constexpr acc_t kLow = acc_t(1.0 / (1 << 30)), kHigh = acc_t(1 << 30);
  bool grouped = true;
  for (int l = 0; l < kLanes; ++l) grouped &= smallest[l] >= kLow && largest[l] <= kHigh;
  const int group = grouped ? 4 : 1;
  alignas(64) acc_t product[kLanes];
  for (int l = 0; l < kLanes; ++l) logdet[l] = acc_t(0);
  for (int i0 = 0; i0 < D; i0 += group) {
    for (int l = 0; l < kLanes; ++l) product[l] = acc_t(1);
    for (int i = i0; i < std::min(D, i0 + group); ++i)
      for (int l = 0; l < kLanes; ++l) product[l] *= T[(i * D + i) * kLanes + l];
    log_lanes(product);
    for (int l = 0; l < kLanes; ++l) logdet[l] += product[l];
  }
  for (int l = 0; l < kLanes; ++l)
    logdet[l] = smallest[l] > acc_t(0) ? logdet[l] : std::numeric_limits<acc_t>::quiet_NaN();
}

template <int kD, typename scalar_t, typename acc_t>
acc_t tril_nll_components(const scalar_t* logits, const scalar_t* means, const scalar_t* L, const scalar_t* y, int K,
                          int D_, acc_t* __restrict z, acc_t* __restrict r, Scratch<acc_t>& s) {
  constexpr int kCap = kD ? kD : math::kMaxTrilDim;
  const int D = kD ? kD : D_;
  alignas(64) acc_t T[kCap * kCap * kLanes];
  alignas(64) acc_t Z[kCap * kLanes];  // z [D][kLanes] (first the residuals y - mu)
  for (int k0 = 0; k0 < K; k0 += kLanes) {
    const int n = std::min(kLanes, K - k0);
    gather_factors<kD>(L, k0, n, D, T);
    if (n == kLanes) {
      to_lanes(means + k0 * D, D, D, Z);
      for (int i = 0; i < D; ++i) {
        const acc_t yi = static_cast<acc_t>(y[i]);
        for (int l = 0; l < kLanes; ++l) Z[i * kLanes + l] = yi - Z[i * kLanes + l];
      }
    } else {
      for (int l = 0; l < kLanes; ++l)
        for (int i = 0; i < D; ++i)
          Z[i * kLanes + l] = l < n ? static_cast<acc_t>(y[i]) - static_cast<acc_t>(means[(k0 + l) * D + i]) : acc_t(0);
    }
    alignas(64) acc_t sumsq[kLanes] = {}, smallest[kLanes], largest[kLanes];
    for (int l = 0; l < kLanes; ++l) smallest[l] = largest[l] = acc_t(1);
    for (int i = 0; i < D; ++i) {
      const acc_t* Ti = T + i * D * kLanes;
      acc_t* Zi = Z + i * kLanes;
      for (int j = 0; j < i; ++j)
        for (int l = 0; l < kLanes; ++l) Zi[l] -= Ti[j * kLanes + l] * Z[j * kLanes + l];
      for (int l = 0; l < kLanes; ++l) {
        const acc_t diag = Ti[i * kLanes + l];
        Zi[l] /= diag;
        sumsq[l] += Zi[l] * Zi[l];
        smallest[l] = diag < smallest[l] ? diag : smallest[l];
        largest[l] = diag > largest[l] ? diag : largest[l];
      }
    }
    alignas(64) acc_t logdet[kLanes];
    log_determinants<kD>(T, D, smallest, largest, logdet);
    from_lanes(Z, D, n, z + k0 * D, D);
    for (int l = 0; l < n; ++l) {
      s.joint[k0 + l] = static_cast<acc_t>(logits[k0 + l]) - acc_t(0.5) * sumsq[l] - logdet[l] -
                        static_cast<acc_t>(D * math::kHalfLog2Pi);
    }
  }
  // log softmax(logits) + log N, its log-sum-exp, the responsibilities
  acc_t shift;
  for (int k = 0; k < K; ++k) s.exps[k] = static_cast<acc_t>(logits[k]);
  const acc_t logit_total = shifted_exps(s.exps, K, s.exps, &shift);
  const acc_t logit_lse = shift + math::log_(logit_total);
  for (int k = 0; k < K; ++k) s.joint[k] -= logit_lse;
  const acc_t total = shifted_exps(s.joint, K, s.exps, &shift);
  const acc_t log_p = shift != shift ? shift : shift + math::log_(total);
  for (int k = 0; k < K; ++k) r[k] = s.exps[k] / total;
  return -log_p;
}

template <int kD, typename scalar_t, typename acc_t>
void tril_nll_components_backward(acc_t g, const scalar_t* logits, const scalar_t* L, const acc_t* z, const acc_t* r,
                                  int K, int D_, scalar_t* __restrict grad_logits, scalar_t* __restrict grad_means,
                                  scalar_t* __restrict grad_L, scalar_t* __restrict grad_y, bool stream,
                                  Scratch<acc_t>& s) {
  constexpr int kCap = kD ? kD : math::kMaxTrilDim;
  const int D = kD ? kD : D_;
  acc_t shift;
  for (int k = 0; k < K; ++k) s.joint[k] = static_cast<acc_t>(logits[k]);
  const acc_t total = shifted_exps(s.joint, K, s.exps, &shift);
  alignas(64) acc_t T[kCap * kCap * kLanes];
  alignas(64) acc_t V[kCap * kLanes], inv_diag[kCap * kLanes];  // [D][kLanes]
  acc_t gy[kCap] = {};
  for (int k0 = 0; k0 < K; k0 += kLanes) {
    const int n = std::min(kLanes, K - k0);
    gather_factors<kD>(L, k0, n, D, T);
    if (n == kLanes) {
      to_lanes(z + k0 * D, D, D, V);
    } else {
      for (int l = 0; l < kLanes; ++l)
        for (int i = 0; i < D; ++i) V[i * kLanes + l] = l < n ? z[(k0 + l) * D + i] : acc_t(0);
    }
    for (int i = D - 1; i >= 0; --i) {  // v = L^-T z, in place
      acc_t* Vi = V + i * kLanes;
      for (int j = i + 1; j < D; ++j)
        for (int l = 0; l < kLanes; ++l) Vi[l] -= T[(j * D + i) * kLanes + l] * V[j * kLanes + l];
      for (int l = 0; l < kLanes; ++l) {
        Vi[l] /= T[(i * D + i) * kLanes + l];
        inv_diag[i * kLanes + l] = acc_t(1) / T[(i * D + i) * kLanes + l];
      }
    }
    for (int l = 0; l < n; ++l) {
      const int k = k0 + l;
      const acc_t gr = g * r[k];
      grad_logits[k] = static_cast<scalar_t>(g * (s.exps[k] / total) - gr);
      const acc_t* zk = z + k * D;
      scalar_t* gLk = grad_L + static_cast<int64_t>(k) * D * D;
      for (int i = 0; i < D; ++i) {
        const acc_t grv = gr * V[i * kLanes + l], diag_term = gr * inv_diag[i * kLanes + l];
        grad_means[k * D + i] = static_cast<scalar_t>(-grv);
        gy[i] += grv;
        // row i of -gr tril(v z^T - diag(1 / L_ii))
#if defined(__AVX2__) && defined(__FMA__)
        if constexpr (kD == 8 && std::is_same_v<scalar_t, float>) {
          if (stream) {  // (rows of 32 bytes, aligned: non-temporal stores skip reading the lines before writing)
            const __m256 column = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), row_index = _mm256_set1_ps(float(i));
            __m256 row = _mm256_and_ps(_mm256_mul_ps(_mm256_set1_ps(-grv), _mm256_loadu_ps(zk)),
                                       _mm256_cmp_ps(column, row_index, _CMP_LE_OQ));
            row = _mm256_add_ps(row, _mm256_and_ps(_mm256_set1_ps(diag_term),
                                                   _mm256_cmp_ps(column, row_index, _CMP_EQ_OQ)));
            _mm256_stream_ps(gLk + i * 8, row);
            continue;
          }
        }
#endif
        for (int j = 0; j < D; ++j)
          gLk[i * D + j] = static_cast<scalar_t>((j <= i ? -grv * zk[j] : acc_t(0)) + (j == i ? diag_term : acc_t(0)));
      }
    }
  }
  for (int i = 0; i < D; ++i) grad_y[i] = static_cast<scalar_t>(gy[i]);
}

// The next samples' factors toward the cache while this one computes: the solves between the loads of one sample
// leave the memory idle otherwise (docs/performance.md).
constexpr int64_t kPrefetchAhead = 2;
inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(static_cast<const char*>(p) + o);
}

int64_t tril_grain(int64_t K, int64_t D) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * D * D)); }

}  // namespace

void mixture_nll_tril_forward(const Tensor& logits, const Tensor& means, const Tensor& scale_tril,
                              const Tensor& target, Tensor& loss, Tensor& z, Tensor& responsibilities) {
  const int64_t B = means.size(0);
  const int K = static_cast<int>(means.size(1)), D = static_cast<int>(means.size(2));
  PHYSMDN_DISPATCH_FLOATING(means.scalar_type(), "physmdn_mixture_nll_tril", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t *l = logits.const_data_ptr<scalar_t>(), *m = means.const_data_ptr<scalar_t>();
    const scalar_t *L = scale_tril.const_data_ptr<scalar_t>(), *y = target.const_data_ptr<scalar_t>();
    scalar_t* out = loss.mutable_data_ptr<scalar_t>();
    acc_t *zo = z.mutable_data_ptr<acc_t>(), *ro = responsibilities.mutable_data_ptr<acc_t>();
    const int64_t KD = int64_t(K) * D, KDD = KD * D;
    if constexpr (std::is_same_v<scalar_t, double>) {
      torch::stable::parallel_for(0, B, tril_grain(K, D), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> lw(K);
        for (int64_t b = begin; b < end; ++b)
          out[b] = static_cast<scalar_t>(math::tril_nll_sample<scalar_t, acc_t>(
              l + b * K, m + b * KD, L + b * KDD, y + b * D, K, D, zo + b * KD, ro + b * K, lw.data()));
      });
    } else {
      dispatch_dim(D, [&]<int kD>() {
        torch::stable::parallel_for(0, B, tril_grain(K, D), [&](int64_t begin, int64_t end) {
          Scratch<acc_t> scratch(K);
          for (int64_t b = begin; b < end; ++b) {
            if (b + kPrefetchAhead < end) prefetch(L + (b + kPrefetchAhead) * KDD, KDD * sizeof(scalar_t));
            out[b] = static_cast<scalar_t>(tril_nll_components<kD, scalar_t, acc_t>(
                l + b * K, m + b * KD, L + b * KDD, y + b * D, K, D, zo + b * KD, ro + b * K, scratch));
          }
        });
      });
    }
  });
}

void mixture_nll_tril_backward(const Tensor& grad_loss, const Tensor& logits, const Tensor& scale_tril,
                               const Tensor& z, const Tensor& responsibilities, Tensor& grad_logits,
                               Tensor& grad_means, Tensor& grad_tril, Tensor& grad_target) {
  const int64_t B = z.size(0);
  const int K = static_cast<int>(z.size(1)), D = static_cast<int>(z.size(2));
  PHYSMDN_DISPATCH_FLOATING(scale_tril.scalar_type(), "physmdn_mixture_nll_tril_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t *l = logits.const_data_ptr<scalar_t>(), *L = scale_tril.const_data_ptr<scalar_t>();
    const acc_t *zi = z.const_data_ptr<acc_t>(), *ri = responsibilities.const_data_ptr<acc_t>();
    const acc_t* g = grad_loss.const_data_ptr<acc_t>();
    const int64_t g_stride = grad_loss.stride(0);
    scalar_t *gl = grad_logits.mutable_data_ptr<scalar_t>(), *gm = grad_means.mutable_data_ptr<scalar_t>();
    scalar_t *gL = grad_tril.mutable_data_ptr<scalar_t>(), *gy = grad_target.mutable_data_ptr<scalar_t>();
    const int64_t KD = int64_t(K) * D, KDD = KD * D;
    if constexpr (std::is_same_v<scalar_t, double>) {
      torch::stable::parallel_for(0, B, tril_grain(K, D), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b)
          math::tril_nll_backward_sample<scalar_t, acc_t>(g[b * g_stride], l + b * K, L + b * KDD, zi + b * KD,
                                                          ri + b * K, K, D, gl + b * K, gm + b * KD, gL + b * KDD,
                                                          gy + b * D);
      });
    } else {
      const bool stream = reinterpret_cast<uintptr_t>(gL) % 32 == 0;
      dispatch_dim(D, [&]<int kD>() {
        torch::stable::parallel_for(0, B, tril_grain(K, D), [&](int64_t begin, int64_t end) {
          Scratch<acc_t> scratch(K);
          for (int64_t b = begin; b < end; ++b) {
            if (b + kPrefetchAhead < end) prefetch(L + (b + kPrefetchAhead) * KDD, KDD * sizeof(scalar_t));
            tril_nll_components_backward<kD, scalar_t, acc_t>(g[b * g_stride], l + b * K, L + b * KDD, zi + b * KD,
                                                              ri + b * K, K, D, gl + b * K, gm + b * KD, gL + b * KDD,
                                                              gy + b * D, stream, scratch);
          }
#if defined(__AVX2__) && defined(__FMA__)
          if (stream) _mm_sfence();  // (the non-temporal stores visible before the task ends)
#endif
        });
      });
    }
  });
}

}  // namespace physmdn::cpu::PHYSMDN_CPU_ISA

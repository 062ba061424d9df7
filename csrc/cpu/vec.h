// A small fixed-width vector for the blocked paths (blocked.h, mdn_loss_blocked.cpp): 32 bytes of float or double,
// elementwise arithmetic the compiler vectorizes (AVX2 + FMA in the AVX2 build), exp and log of float through the
// AVX2 kernels' own routines (cpu/avx2/vec_math.h) in that build, std::exp / std::log otherwise.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include "cpu/avx2/vec_math.h"
#endif

namespace physmdn::cpu::PHYSMDN_CPU_ISA {  // (per build: the AVX2 one calls AVX2 routines)

template <typename T>
struct Vec {
  static constexpr int64_t kSize = 32 / sizeof(T);
  static constexpr int64_t size() { return kSize; }
  T v[kSize];

  Vec() = default;
  explicit Vec(T x) {
    for (int64_t i = 0; i < kSize; ++i) v[i] = x;
  }
  static Vec loadu(const T* p) {
    Vec r;
    for (int64_t i = 0; i < kSize; ++i) r.v[i] = p[i];
    return r;
  }
  void store(T* p) const {
    for (int64_t i = 0; i < kSize; ++i) p[i] = v[i];
  }
  template <typename F>
  Vec map(F f) const {
    Vec r;
    for (int64_t i = 0; i < kSize; ++i) r.v[i] = f(v[i]);
    return r;
  }
  Vec neg() const { return map([](T x) { return -x; }); }
  Vec exp() const {
#if defined(__AVX2__) && defined(__FMA__)
    if constexpr (sizeof(T) == 4) {
      Vec r;
      _mm256_storeu_ps(r.v, soa::exp8(_mm256_loadu_ps(v)));
      return r;
    }
#endif
    return map([](T x) { return std::exp(x); });
  }
  Vec log() const {
#if defined(__AVX2__) && defined(__FMA__)
    if constexpr (sizeof(T) == 4) {
      Vec r;
      _mm256_storeu_ps(r.v, soa::log8(_mm256_loadu_ps(v)));
      return r;
    }
#endif
    return map([](T x) { return std::log(x); });
  }
  friend Vec operator+(const Vec& a, const Vec& b) {
    Vec r;
    for (int64_t i = 0; i < kSize; ++i) r.v[i] = a.v[i] + b.v[i];
    return r;
  }
  friend Vec operator-(const Vec& a, const Vec& b) {
    Vec r;
    for (int64_t i = 0; i < kSize; ++i) r.v[i] = a.v[i] - b.v[i];
    return r;
  }
  friend Vec operator*(const Vec& a, const Vec& b) {
    Vec r;
    for (int64_t i = 0; i < kSize; ++i) r.v[i] = a.v[i] * b.v[i];
    return r;
  }
};

// a * b + c
template <typename T>
Vec<T> fmadd(const Vec<T>& a, const Vec<T>& b, const Vec<T>& c) {
  Vec<T> r;
  for (int64_t i = 0; i < Vec<T>::kSize; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
  return r;
}

// elementwise max, NaN propagating (as at::vec::maximum)
template <typename T>
Vec<T> maximum(const Vec<T>& a, const Vec<T>& b) {
  Vec<T> r;
  for (int64_t i = 0; i < Vec<T>::kSize; ++i) r.v[i] = (a.v[i] != a.v[i] || a.v[i] > b.v[i]) ? a.v[i] : b.v[i];
  return r;
}

// a > b ? x : y, elementwise (false where either is NaN)
template <typename T>
Vec<T> where_greater(const Vec<T>& a, const Vec<T>& b, const Vec<T>& x, const Vec<T>& y) {
  Vec<T> r;
  for (int64_t i = 0; i < Vec<T>::kSize; ++i) r.v[i] = a.v[i] > b.v[i] ? x.v[i] : y.v[i];
  return r;
}

}  // namespace physmdn::cpu::PHYSMDN_CPU_ISA

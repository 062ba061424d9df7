// Which CPU path runs a call: the one place that chooses. The drivers (mixture_nll.cpp, mdn_loss.cpp) try the paths
// in the order of this table and take the first that applies; the per-sample path always does.
//
// path            op, families                       dtypes                      layout
// --------------  ---------------------------------  --------------------------  -------------------------------
// lanes           mixture NLL; fused loss with        float32, bfloat16, float16  any (rows read in place, other
//                 polynomial, stencil (order <= 8),   (AVX2 build only)           layouts gathered per group)
//                 linear (lanes_family)
// rows            mixture NLL, inside the lanes       as lanes                    as lanes, and D in {1, 2, 4} with
//                 path (set_cpu_rows_path)                                        K D % 8 == 0, or D % 8 == 0
// blocked float   mixture NLL                         float32, bfloat16, float16  contiguous (views copied)
//                                                     (baseline build: AVX2 takes the lanes path first)
// blocked double  mixture NLL                         float64                     contiguous (views copied)
// blocked family  fused loss: polynomial, linear;     float32, float64            contiguous (views copied)
//                 no gradient for the parameters
// per-sample      both, every family                  every floating dtype        any
//
// Code: lanes in avx2/lanes.h (the fused loss's families: avx2/families.h, mdn_loss_lanes.cpp), rows in
// avx2/rows.h, blocked float / double and per-sample for the mixture NLL in mixture_nll.cpp, blocked family in
// mdn_loss_blocked.cpp, per-sample for the fused loss in mdn_loss.cpp.
// Each path's predicate is <path>_path_applies below (lanes_family_path_applies for the fused loss on lanes).
// Every path but the per-sample one needs K D <= kVectorMaxKD. Views are copied to contiguous tensors for the blocked
// paths when that lets all four inputs take them, never for expanded (zero-stride) inputs: DriverInputs.
//
// Included by files compiled once per instruction set (PHYSMDN_CPU_ISA names the namespace): the predicates that
// depend on the build live in that namespace.
#pragma once

#include <atomic>
#include <cstdint>

#include "cpu/kernels.h"
#include "physics_math.h"
#include "views.h"

#ifndef PHYSMDN_CPU_ISA
#error "PHYSMDN_CPU_ISA must name the instruction set this file is compiled for"
#endif

// The lanes path (csrc/cpu/avx2/) exists in the AVX2+FMA build only.
#if defined(__AVX2__) && defined(__FMA__)
#define PHYSMDN_LANES_PATH 1
#endif

namespace physmdn::cpu {

// Rows longer than this (K D values per sample) take the per-sample path.
constexpr int64_t kVectorMaxKD = 4096;

// The row-wise path inside the lanes path (mixture NLL only): D in {1, 2, 4} with K D a multiple of 8 (a vector of
// a row holds 8 / D whole components), or D a multiple of 8 (a component spans D / 8 whole vectors); on unless
// physmdn._C.set_cpu_rows_path(False).
inline bool rows_path_applies(int64_t K, int64_t D) {
  return rows_path_enabled().load(std::memory_order_relaxed) &&
         ((D == 1 || D == 2 || D == 4) ? (K * D) % 8 == 0 : D % 8 == 0);
}

// The fused loss's families the lanes path runs (also when their parameters need a gradient).
inline bool lanes_family(const PhysicsArgs& args, int order, int64_t rows) {
  switch (args.family) {
    case math::kPolynomial:
    case math::kStencil: return order <= math::kMaxOrder;
    case math::kLinear: return rows > 0;
    default: return false;
  }
}

}  // namespace physmdn::cpu

namespace physmdn::cpu::PHYSMDN_CPU_ISA {

#ifdef PHYSMDN_LANES_PATH
constexpr bool kHaveLanesPath = true;
#else
constexpr bool kHaveLanesPath = false;
#endif

inline bool float_or_half(ScalarType dt) { return dt == kFloat || dt == kBFloat16 || dt == kHalf; }

// What the blocked paths read: contiguous inputs of at most kVectorMaxKD values per sample.
inline bool blocked_layout(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                           const Tensor& target) {
  return logits.is_contiguous() && means.is_contiguous() && log_scales.is_contiguous() && target.is_contiguous() &&
         means.size(1) * means.size(2) <= kVectorMaxKD;
}

// lanes: float32 / bfloat16 / float16 in the AVX2 build, any strides.
inline bool lanes_path_applies(const Tensor& means) {
  return kHaveLanesPath && float_or_half(means.scalar_type()) && means.size(1) * means.size(2) <= kVectorMaxKD;
}

// lanes for the fused loss: the family is one the lanes path has a policy for.
inline bool lanes_family_path_applies(const Tensor& means, const PhysicsArgs& args, int order, int64_t rows) {
  return lanes_family(args, order, rows) && lanes_path_applies(means);
}

// blocked float: float32 / bfloat16 / float16, contiguous (reached in the baseline build; AVX2 takes lanes first).
inline bool blocked_float_path_applies(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                                       const Tensor& target) {
  return float_or_half(means.scalar_type()) && blocked_layout(logits, means, log_scales, target);
}

// blocked double: float64, contiguous.
inline bool blocked_double_path_applies(const Tensor& logits, const Tensor& means,
                                        const Tensor& log_scales, const Tensor& target) {
  return means.scalar_type() == kDouble && blocked_layout(logits, means, log_scales, target);
}

// blocked family: the fused loss's polynomial or linear family, float32 / float64, contiguous, and no gradient for
// the family's parameters.
inline bool blocked_family_path_applies(const Tensor& logits, const Tensor& means,
                                        const Tensor& log_scales, const Tensor& target,
                                        const PhysicsArgs& args, int64_t rows, bool param_grad) {
  const auto dt = means.scalar_type();
  const bool family = args.family == math::kPolynomial || (args.family == math::kLinear && rows > 0);
  return family && !param_grad && (dt == kFloat || dt == kDouble) &&
         blocked_layout(logits, means, log_scales, target);
}

// The inputs as the paths read them. The lanes path takes every layout in place (with_lanes: the caller's family
// runs on it). For the blocked paths, views with strided rows are copied to contiguous tensors when that lets all
// four inputs take them: the copy reads and writes each such input once, the per-sample loop is ~4x slower than
// copy + blocked path (B = 65536, K = 8, D = 4). Expanded inputs (a zero stride) are never copied (that would make a
// full [B, ...] tensor of a broadcast): the blocked paths leave them to the per-sample loop.
struct DriverInputs {
  Tensor logits, means, log_scales, target;
  DriverInputs(const Tensor& l, const Tensor& m, const Tensor& s, const Tensor& y,
               bool with_lanes = true)
      : logits(l), means(m), log_scales(s), target(y) {
    if (blocked_layout(l, m, s, y) || m.size(1) * m.size(2) > kVectorMaxKD) return;
    if (with_lanes && lanes_path_applies(m)) return;
    const auto expanded = [](const Tensor& t) {
      for (int64_t d = 0; d < t.dim(); ++d)
        if (t.size(d) > 1 && t.stride(d) == 0) return true;
      return false;
    };
    if (expanded(l) || expanded(m) || expanded(s) || expanded(y)) return;
    logits = as_contiguous(l), means = as_contiguous(m), log_scales = as_contiguous(s), target = as_contiguous(y);
  }
};

}  // namespace physmdn::cpu::PHYSMDN_CPU_ISA

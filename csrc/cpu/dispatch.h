// Helpers the CPU drivers share (compiled once per instruction set, PHYSMDN_CPU_ISA names the namespace): dtype
// and dimension dispatch, the parallel grain, float32 temporaries for paths that only write float32 gradients.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "tensor.h"

#ifndef PHYSMDN_CPU_ISA
#error "PHYSMDN_CPU_ISA must name the instruction set this file is compiled for"
#endif

namespace physmdn::cpu::PHYSMDN_CPU_ISA {

// Samples per parallel task of the per-sample path: enough work per task to amortize scheduling.
inline int64_t grain_size(int64_t K, int64_t D) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, K * (D + 1))); }

template <typename T>
T* data_or_null(Tensor& t) {
  return t.numel() ? t.mutable_data_ptr<T>() : nullptr;
}

// Runs fn.template operator()<scalar_t>() for float32, bfloat16 and float16 (the lanes and blocked float paths).
template <typename Fn>
void dispatch_float_or_half(ScalarType dt, Fn&& fn) {
  switch (dt) {
    case kFloat: return fn.template operator()<float>();
    case kBFloat16: return fn.template operator()<BFloat16>();
    case kHalf: return fn.template operator()<Half>();
    default: fail("physmdn: dispatch_float_or_half expected float32, bfloat16 or float16, got ", dt);
  }
}

// Runs fn.template operator()<T>() for float32 or float64 (the blocked family path).
template <typename Fn>
void dispatch_float_or_double(ScalarType dt, Fn&& fn) {
  if (dt == kDouble) return fn.template operator()<double>();
  fn.template operator()<float>();
}

// Calls fn.template operator()<kD>() with kD = D for the common small dimensions, 0 (run time) otherwise.
template <typename Fn>
void dispatch_dim(int64_t D, Fn&& fn) {
  switch (D) {
    case 1: return fn.template operator()<1>();
    case 2: return fn.template operator()<2>();
    case 3: return fn.template operator()<3>();
    case 4: return fn.template operator()<4>();
    case 8: return fn.template operator()<8>();
    default: return fn.template operator()<0>();
  }
}

// The gradient outputs of the forward-with-gradients entry points are float32 or, for bfloat16 / float16 inputs,
// the input dtype (op_impl.h). A path that only writes float32 runs on float32 temporaries, then converts.
template <typename Fn>
bool with_float_grads(std::initializer_list<Tensor*> grads, Fn&& fn) {
  if (std::all_of(grads.begin(), grads.end(), [](Tensor* g) { return g->scalar_type() == kFloat; }))
    return fn();
  std::vector<Tensor> keep;
  std::vector<Tensor*> outs;
  for (Tensor* g : grads) {
    keep.push_back(*g);
    outs.push_back(g);
    *g = empty(g->sizes(), kFloat, g->device());
  }
  const bool done = fn();
  for (size_t i = 0; i < outs.size(); ++i) {
    if (done) copy_into(keep[i], *outs[i]);
    *outs[i] = keep[i];
  }
  return done;
}

}  // namespace physmdn::cpu::PHYSMDN_CPU_ISA

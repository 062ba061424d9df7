// CPU kernel entry points, defined in mixture_nll.cpp and mdn_loss.cpp; those are compiled once per instruction set
// (baseline and AVX2+FMA) and ops.cpp picks one at run time. paths.h says which CPU path runs a call. Outputs are
// allocated by csrc/op_impl.h.
#pragma once
#include <ATen/core/Tensor.h>

#include <atomic>

#include "views.h"

#define PHYSMDN_DECLARE_CPU_KERNELS(isa)                                                                          \
  namespace physmdn::cpu::isa {                                                                                   \
  /* the vector exp / log the kernels use, on a contiguous float32 tensor (tests of their accuracy) */             \
  void vector_exp_log(const at::Tensor& x, int64_t variant, at::Tensor& exp_out, at::Tensor& log_out);           \
  void mixture_nll_forward(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,        \
                           const at::Tensor& target, at::Tensor& loss, at::Tensor& saved);                        \
  bool mixture_nll_forward_grad(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,    \
                                const at::Tensor& target, at::Tensor& loss, at::Tensor& saved,                   \
                                at::Tensor& grad_logits, at::Tensor& grad_means, at::Tensor& grad_log_scales,    \
                                at::Tensor& grad_target, double grad_scale);                                     \
  void mixture_nll_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& means,        \
                            const at::Tensor& log_scales, const at::Tensor& target, const at::Tensor& saved,       \
                            at::Tensor& grad_logits, at::Tensor& grad_means, at::Tensor& grad_log_scales,          \
                            at::Tensor& grad_target);                                                             \
  void mdn_loss_forward(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,           \
                        const at::Tensor& target, const at::Tensor& p0, const at::Tensor& p1,                     \
                        const c10::optional<at::Tensor>& extra, const PhysicsArgs& args, int order, int64_t rows, \
                        at::Tensor& loss, at::Tensor& saved);                                                     \
  bool mdn_loss_forward_grad(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,     \
                             const at::Tensor& target, const at::Tensor& p0, const at::Tensor& p1,                \
                             const c10::optional<at::Tensor>& extra, const PhysicsArgs& args, int order,          \
                             int64_t rows, at::Tensor& loss, at::Tensor& saved, at::Tensor& grad_logits,          \
                             at::Tensor& grad_means, at::Tensor& grad_log_scales, at::Tensor& grad_target,        \
                             at::Tensor& grad_extra, double grad_scale);                                          \
  void mdn_loss_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& means,           \
                         const at::Tensor& log_scales, const at::Tensor& target, const at::Tensor& p0,            \
                         const at::Tensor& p1, const c10::optional<at::Tensor>& extra, const PhysicsArgs& args,   \
                         int order, int64_t rows, const at::Tensor& saved, at::Tensor& grad_logits,               \
                         at::Tensor& grad_means, at::Tensor& grad_log_scales, at::Tensor& grad_target,            \
                         at::Tensor& grad_p0, at::Tensor& grad_p1, at::Tensor& grad_extra);                       \
  }

namespace physmdn::cpu {
// The AVX2 mixture NLL's row-wise path (avx2/rows.h; paths.h: rows_path_applies): on by default; off, its shapes
// take the lanes path like the others (tests compare the two; benchmarks time both).
std::atomic<bool>& rows_path_enabled();
}  // namespace physmdn::cpu

PHYSMDN_DECLARE_CPU_KERNELS(default_isa)
PHYSMDN_DECLARE_CPU_KERNELS(avx2)

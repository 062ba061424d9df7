// CPU kernel entry points, defined in mixture_nll.cpp, mdn_loss.cpp and the files named below; those are compiled
// once per instruction set (baseline and AVX2+FMA) and ops.cpp picks one at run time. paths.h says which CPU path runs
// a call. Outputs are allocated by csrc/op_impl.h.
#pragma once

#include <atomic>

#include "views.h"

#define PHYSMDN_DECLARE_CPU_KERNELS(isa)                                                                          \
  namespace physmdn::cpu::isa {                                                                                   \
  /* the vector exp / log the kernels use, on a contiguous float32 tensor (tests of their accuracy) */             \
  void vector_exp_log(const Tensor& x, int64_t variant, Tensor& exp_out, Tensor& log_out);           \
  /* the full-covariance mixture NLL (mixture_nll_tril.cpp): contiguous inputs, outputs from ops.cpp */            \
  void mixture_nll_tril_forward(const Tensor& logits, const Tensor& means, const Tensor& scale_tril,              \
                                const Tensor& target, Tensor& loss, Tensor& z, Tensor& responsibilities);         \
  void mixture_nll_tril_backward(const Tensor& grad_loss, const Tensor& logits, const Tensor& scale_tril,         \
                                 const Tensor& z, const Tensor& responsibilities, Tensor& grad_logits,            \
                                 Tensor& grad_means, Tensor& grad_tril, Tensor& grad_target);                     \
  /* the low-rank-plus-diagonal mixture NLL (mixture_nll_lowrank.cpp): contiguous inputs, outputs from ops.cpp */  \
  void mixture_nll_lowrank_forward(const Tensor& logits, const Tensor& means, const Tensor& cov_factor,           \
                                   const Tensor& cov_diag, const Tensor& target, Tensor& loss, Tensor& v,         \
                                   Tensor& responsibilities, Tensor& chol);                                       \
  void mixture_nll_lowrank_backward(const Tensor& grad_loss, const Tensor& logits, const Tensor& cov_factor,      \
                                    const Tensor& cov_diag, const Tensor& v, const Tensor& responsibilities,      \
                                    const Tensor& chol, Tensor& grad_logits, Tensor& grad_means,                  \
                                    Tensor& grad_factor, Tensor& grad_diag, Tensor& grad_target);                 \
  /* the physics penalty of correlated components (correlated_penalty.cpp): contiguous means, factor, diag */    \
  void correlated_penalty_forward(const Tensor& means, const Tensor& factor, const OptionalTensor& diag,          \
                                  const Tensor& p0, const Tensor& p1, const PhysicsArgs& args, int order,         \
                                  int64_t rows, Tensor& out);                                                     \
  void correlated_penalty_backward(const Tensor& grad, const Tensor& means, const Tensor& factor,                 \
                                   const OptionalTensor& diag, const Tensor& p0, const Tensor& p1,                \
                                   const PhysicsArgs& args, int order, int64_t rows, Tensor& grad_means,          \
                                   Tensor& grad_factor, Tensor& grad_diag);                                       \
  void mixture_nll_forward(const Tensor& logits, const Tensor& means, const Tensor& log_scales,        \
                           const Tensor& target, Tensor& loss, Tensor& saved);                        \
  bool mixture_nll_forward_grad(const Tensor& logits, const Tensor& means, const Tensor& log_scales,    \
                                const Tensor& target, Tensor& loss, Tensor& saved,                   \
                                Tensor& grad_logits, Tensor& grad_means, Tensor& grad_log_scales,    \
                                Tensor& grad_target, double grad_scale);                                     \
  void mixture_nll_backward(const Tensor& grad_loss, const Tensor& logits, const Tensor& means,        \
                            const Tensor& log_scales, const Tensor& target, const Tensor& saved,       \
                            Tensor& grad_logits, Tensor& grad_means, Tensor& grad_log_scales,          \
                            Tensor& grad_target);                                                             \
  void mdn_loss_forward(const Tensor& logits, const Tensor& means, const Tensor& log_scales,           \
                        const Tensor& target, const Tensor& p0, const Tensor& p1,                     \
                        const OptionalTensor& extra, const PhysicsArgs& args, int order, int64_t rows, \
                        Tensor& loss, Tensor& saved);                                                     \
  bool mdn_loss_forward_grad(const Tensor& logits, const Tensor& means, const Tensor& log_scales,     \
                             const Tensor& target, const Tensor& p0, const Tensor& p1,                \
                             const OptionalTensor& extra, const PhysicsArgs& args, int order,          \
                             int64_t rows, Tensor& loss, Tensor& saved, Tensor& grad_logits,          \
                             Tensor& grad_means, Tensor& grad_log_scales, Tensor& grad_target,        \
                             Tensor& grad_extra, double grad_scale);                                          \
  void mdn_loss_backward(const Tensor& grad_loss, const Tensor& logits, const Tensor& means,           \
                         const Tensor& log_scales, const Tensor& target, const Tensor& p0,            \
                         const Tensor& p1, const OptionalTensor& extra, const PhysicsArgs& args,   \
                         int order, int64_t rows, const Tensor& saved, Tensor& grad_logits,               \
                         Tensor& grad_means, Tensor& grad_log_scales, Tensor& grad_target,            \
                         Tensor& grad_p0, Tensor& grad_p1, Tensor& grad_extra);                       \
  }

namespace physmdn::cpu {
// The AVX2 mixture NLL's row-wise path (avx2/rows.h; paths.h: rows_path_applies): on by default; off, its shapes
// take the lanes path like the others (tests compare the two; benchmarks time both).
std::atomic<bool>& rows_path_enabled();
}  // namespace physmdn::cpu

PHYSMDN_DECLARE_CPU_KERNELS(default_isa)
PHYSMDN_DECLARE_CPU_KERNELS(avx2)

// CPU kernel entry points. kernels.cpp is compiled once per instruction set (baseline and AVX2+FMA);
// ops.cpp picks one at run time.
#pragma once
#include <ATen/core/Tensor.h>

#define PHYSMDN_DECLARE_CPU_KERNELS(isa)                                                                   \
  namespace physmdn::cpu::isa {                                                                            \
  void mixture_nll_forward(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales, \
                           const at::Tensor& target, at::Tensor& loss, at::Tensor& lse);                   \
  void mixture_nll_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& means, \
                            const at::Tensor& log_scales, const at::Tensor& target, const at::Tensor& lse,  \
                            at::Tensor& grad_logits, at::Tensor& grad_means, at::Tensor& grad_log_scales,   \
                            at::Tensor& grad_target);                                                      \
  }

PHYSMDN_DECLARE_CPU_KERNELS(default_isa)
PHYSMDN_DECLARE_CPU_KERNELS(avx2)

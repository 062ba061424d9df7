// Input validation shared by the CPU and CUDA entry points: every message names the argument,
// what was expected and what came.
#pragma once
#include <vector>

#include "tensor.h"

namespace physmdn {

inline void check_floating(const Tensor& t, const char* name) {
  PHYSMDN_CHECK(is_floating(t.scalar_type()), name,
              " must be a floating-point tensor (float64, float32, bfloat16 or float16), got ", t.scalar_type());
}

inline void check_mixture_inputs(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                                 const Tensor& target) {
  PHYSMDN_CHECK(means.dim() == 3, "means must be [B, K, D], got shape ", shape(means));
  const auto B = means.size(0), K = means.size(1), D = means.size(2);
  PHYSMDN_CHECK(K >= 1, "means must have K >= 1 components, got shape ", shape(means));
  PHYSMDN_CHECK(D >= 1, "means must have D >= 1 output dimensions, got shape ", shape(means));
  PHYSMDN_CHECK(logits.dim() == 2 && logits.size(0) == B && logits.size(1) == K, "logits must be [B, K] = [", B, ", ",
              K, "] to match means, got shape ", shape(logits));
  PHYSMDN_CHECK(log_scales.dim() == 3 && log_scales.size(0) == B && log_scales.size(1) == K && log_scales.size(2) == D, "log_scales must be [B, K, D] = ",
              shape(means), " to match means, got shape ", shape(log_scales));
  PHYSMDN_CHECK(target.dim() == 2 && target.size(0) == B && target.size(1) == D, "target must be [B, D] = [", B, ", ",
              D, "] to match means, got shape ", shape(target));
  check_floating(means, "means");
  const std::pair<const Tensor*, const char*> others[] = {{&logits, "logits"}, {&log_scales, "log_scales"}, {&target, "target"}};
  for (const auto& [t, name] : others) {
    check_floating(*t, name);
    PHYSMDN_CHECK(t->scalar_type() == means.scalar_type(), name, " must have the dtype of means (", means.scalar_type(),
                "), got ", t->scalar_type());
    PHYSMDN_CHECK(t->device() == means.device(), name, " must be on the device of means (", means.device(), "), got ",
                t->device());
  }
}

// _scale_by_(tensors, upstream, scale): one floating upstream value (on the tensors' device or the CPU), floating
// tensors
inline void check_scale_by_args(const std::vector<Tensor>& tensors, const Tensor& factor) {
  PHYSMDN_CHECK(factor.numel() == 1, "_scale_by_: upstream must have exactly one element, got shape ", shape(factor));
  PHYSMDN_CHECK(is_floating(factor.scalar_type()), "_scale_by_: upstream must be a floating-point tensor, got ",
              factor.scalar_type());
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (!tensors[i].defined()) continue;  // (skipped: undefined gradients from C++ callers)
    PHYSMDN_CHECK(is_floating(tensors[i].scalar_type()), "_scale_by_: tensors[", i,
                "] must be a floating-point tensor, got ", tensors[i].scalar_type());
    PHYSMDN_CHECK(tensors[i].device() == factor.device() || factor.device().is_cpu(), "_scale_by_: tensors[", i,
                "] is on ", tensors[i].device(), " but upstream is on ", factor.device());
  }
}

// _scale_by_ with a host upstream value (csrc/ops.cpp): decided on the host, multiplied by torch
void scale_by_on_host(const std::vector<Tensor>& tensors, const Tensor& upstream, double scale);

}  // namespace physmdn

// Input validation shared by the CPU and CUDA entry points: every message names the argument,
// what was expected and what came.
#pragma once
#include <initializer_list>
#include <utility>
#include <vector>

#include "mvn_math.h"
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

// The correlated mixture NLLs (csrc/mvn_math.h), any device (each backend checks its own): a floating tensor ref and
// the others with its dtype and device.
inline void check_like(const Tensor& ref, const char* ref_name,
                       std::initializer_list<std::pair<const Tensor*, const char*>> others) {
  check_floating(ref, ref_name);
  for (const auto& [t, name] : others) {
    PHYSMDN_CHECK(t->scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
                  ref.scalar_type(), "), got ", t->scalar_type());
    PHYSMDN_CHECK(t->device() == ref.device(), name, " must be on the device of ", ref_name, " (", ref.device(),
                  "), got ", t->device());
  }
}

// logits [B, K], means [B, K, D] (1 <= D <= kMaxTrilDim), scale_tril [B, K, D, D], target [B, D]
inline void check_tril_inputs(const Tensor& logits, const Tensor& means, const Tensor& scale_tril,
                              const Tensor& target) {
  PHYSMDN_CHECK(means.dim() == 3, "means must be [B, K, D], got shape ", shape(means));
  const auto B = means.size(0), K = means.size(1), D = means.size(2);
  PHYSMDN_CHECK(K >= 1 && D >= 1 && D <= math::kMaxTrilDim, "means must be [B, K, D] with K >= 1 and 1 <= D <= ",
                math::kMaxTrilDim, ", got shape ", shape(means));
  PHYSMDN_CHECK(logits.dim() == 2 && logits.size(0) == B && logits.size(1) == K, "logits must be [B, K] = [", B, ", ",
                K, "], got shape ", shape(logits));
  PHYSMDN_CHECK(scale_tril.dim() == 4 && scale_tril.size(0) == B && scale_tril.size(1) == K &&
                    scale_tril.size(2) == D && scale_tril.size(3) == D,
                "scale_tril must be [B, K, D, D] = [", B, ", ", K, ", ", D, ", ", D, "], got shape ", shape(scale_tril));
  PHYSMDN_CHECK(target.dim() == 2 && target.size(0) == B && target.size(1) == D, "target must be [B, D] = [", B, ", ",
                D, "], got shape ", shape(target));
  check_like(means, "means", {{&logits, "logits"}, {&scale_tril, "scale_tril"}, {&target, "target"}});
}

// mixture_nll_tril_backward: grad_loss [B], logits [B, K] and scale_tril [B, K, D, D] as the forward took them, z
// [B, K, D] and responsibilities [B, K] in the accumulation dtype of scale_tril (as the forward wrote them)
inline void check_tril_backward_inputs(const Tensor& grad_loss, const Tensor& logits, const Tensor& scale_tril,
                                       const Tensor& z, const Tensor& responsibilities) {
  PHYSMDN_CHECK(z.dim() == 3 && z.size(1) >= 1 && z.size(2) >= 1 && z.size(2) <= math::kMaxTrilDim &&
                    scale_tril.dim() == 4 && scale_tril.size(0) == z.size(0) && scale_tril.size(1) == z.size(1) &&
                    scale_tril.size(2) == z.size(2) && scale_tril.size(3) == z.size(2),
                "mixture_nll_tril_backward: z must be [B, K, D] (1 <= D <= ", math::kMaxTrilDim,
                ") and scale_tril [B, K, D, D], got shapes ", shape(z), " and ", shape(scale_tril));
  const auto B = z.size(0), K = z.size(1);
  PHYSMDN_CHECK(logits.dim() == 2 && logits.size(0) == B && logits.size(1) == K && responsibilities.dim() == 2 &&
                    responsibilities.size(0) == B && responsibilities.size(1) == K,
                "mixture_nll_tril_backward: logits and responsibilities must be [B, K] = [", B, ", ", K,
                "], got shapes ", shape(logits), " and ", shape(responsibilities));
  PHYSMDN_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == B, "mixture_nll_tril_backward: grad_loss must be [B] = [",
                B, "], got shape ", shape(grad_loss));
  check_like(scale_tril, "scale_tril", {{&logits, "logits"}});
  const auto acc = scale_tril.scalar_type() == kDouble ? kDouble : kFloat;  // (the accumulation dtype)
  const std::pair<const Tensor*, const char*> saved[] = {{&z, "z"}, {&responsibilities, "responsibilities"}};
  for (const auto& [t, name] : saved)
    PHYSMDN_CHECK(t->scalar_type() == acc && t->device() == scale_tril.device(), "mixture_nll_tril_backward: ", name,
                  " must be the forward's (", acc, " on ", scale_tril.device(), "), got ", t->scalar_type(), " on ",
                  t->device());
  check_floating(grad_loss, "grad_loss");
  PHYSMDN_CHECK(grad_loss.device() == scale_tril.device(), "mixture_nll_tril_backward: grad_loss must be on the device "
                "of scale_tril (", scale_tril.device(), "), got ", grad_loss.device());
}

// logits [B, K], means [B, K, D] (D >= 1), cov_factor [B, K, D, R] (1 <= R <= kMaxRank), cov_diag [B, K, D],
// target [B, D]
inline void check_lowrank_inputs(const Tensor& logits, const Tensor& means, const Tensor& cov_factor,
                                 const Tensor& cov_diag, const Tensor& target) {
  PHYSMDN_CHECK(means.dim() == 3, "means must be [B, K, D], got shape ", shape(means));
  const auto B = means.size(0), K = means.size(1), D = means.size(2);
  PHYSMDN_CHECK(K >= 1 && D >= 1, "means must be [B, K, D] with K >= 1 and D >= 1, got shape ", shape(means));
  PHYSMDN_CHECK(logits.dim() == 2 && logits.size(0) == B && logits.size(1) == K, "logits must be [B, K] = [", B, ", ",
                K, "], got shape ", shape(logits));
  PHYSMDN_CHECK(cov_factor.dim() == 4 && cov_factor.size(0) == B && cov_factor.size(1) == K &&
                    cov_factor.size(2) == D && cov_factor.size(3) >= 1 && cov_factor.size(3) <= math::kMaxRank,
                "cov_factor must be [B, K, D, R] = [", B, ", ", K, ", ", D, ", R] with 1 <= R <= ", math::kMaxRank,
                ", got shape ", shape(cov_factor));
  PHYSMDN_CHECK(cov_diag.dim() == 3 && cov_diag.size(0) == B && cov_diag.size(1) == K && cov_diag.size(2) == D,
                "cov_diag must be [B, K, D] = [", B, ", ", K, ", ", D, "], got shape ", shape(cov_diag));
  PHYSMDN_CHECK(target.dim() == 2 && target.size(0) == B && target.size(1) == D, "target must be [B, D] = [", B, ", ",
                D, "], got shape ", shape(target));
  check_like(means, "means",
             {{&logits, "logits"}, {&cov_factor, "cov_factor"}, {&cov_diag, "cov_diag"}, {&target, "target"}});
}

// correlated_penalty: means [B, K, D] (K, D >= 1), factor [B, K, D, Q] (Q >= 1), diag [B, K, D] or none
inline void check_correlated_penalty_inputs(const Tensor& means, const Tensor& factor, const OptionalTensor& diag) {
  PHYSMDN_CHECK(means.dim() == 3 && means.size(1) >= 1 && means.size(2) >= 1,
                "means must be [B, K, D] with K >= 1 and D >= 1, got shape ", shape(means));
  const auto B = means.size(0), K = means.size(1), D = means.size(2);
  PHYSMDN_CHECK(factor.dim() == 4 && factor.size(0) == B && factor.size(1) == K && factor.size(2) == D &&
                    factor.size(3) >= 1,
                "factor must be [B, K, D, Q] = [", B, ", ", K, ", ", D, ", Q] with Q >= 1, got shape ", shape(factor));
  if (diag.has_value()) {
    PHYSMDN_CHECK(diag->dim() == 3 && diag->size(0) == B && diag->size(1) == K && diag->size(2) == D,
                  "diag must be [B, K, D] = [", B, ", ", K, ", ", D, "], got shape ", shape(*diag));
    check_like(means, "means", {{&factor, "factor"}, {&*diag, "diag"}});
  } else {
    check_like(means, "means", {{&factor, "factor"}});
  }
}

// correlated_penalty_backward: grad [B, K] of any floating dtype on the device of means
inline void check_correlated_penalty_grad(const Tensor& grad, const Tensor& means) {
  PHYSMDN_CHECK(grad.dim() == 2 && grad.size(0) == means.size(0) && grad.size(1) == means.size(1),
                "grad must be [B, K] = [", means.size(0), ", ", means.size(1), "], got shape ", shape(grad));
  check_floating(grad, "grad");
  PHYSMDN_CHECK(grad.device() == means.device(), "grad must be on the device of means (", means.device(), "), got ",
                grad.device());
}

// mixture_nll_lowrank_backward: v [B, K, D], responsibilities [B, K], chol [B, K, R, R] in the accumulation dtype of
// cov_factor [B, K, D, R] (as the forward wrote them), cov_diag [B, K, D], logits [B, K], grad_loss [B]
inline void check_lowrank_backward_inputs(const Tensor& grad_loss, const Tensor& logits, const Tensor& cov_factor,
                                          const Tensor& cov_diag, const Tensor& v, const Tensor& responsibilities,
                                          const Tensor& chol) {
  PHYSMDN_CHECK(v.dim() == 3 && cov_factor.dim() == 4 && cov_factor.size(0) == v.size(0) &&
                    cov_factor.size(1) == v.size(1) && cov_factor.size(2) == v.size(2) && cov_factor.size(3) >= 1 &&
                    cov_factor.size(3) <= math::kMaxRank,
                "mixture_nll_lowrank_backward: v must be [B, K, D] and cov_factor [B, K, D, R] with 1 <= R <= ",
                math::kMaxRank, ", got shapes ", shape(v), " and ", shape(cov_factor));
  const auto B = v.size(0), K = v.size(1), D = v.size(2), R = cov_factor.size(3);
  PHYSMDN_CHECK(cov_diag.dim() == 3 && cov_diag.size(0) == B && cov_diag.size(1) == K && cov_diag.size(2) == D,
                "mixture_nll_lowrank_backward: cov_diag must be [B, K, D] = [", B, ", ", K, ", ", D, "], got shape ",
                shape(cov_diag));
  PHYSMDN_CHECK(logits.dim() == 2 && logits.size(0) == B && logits.size(1) == K &&
                    responsibilities.dim() == 2 && responsibilities.size(0) == B && responsibilities.size(1) == K,
                "mixture_nll_lowrank_backward: logits and responsibilities must be [B, K] = [", B, ", ", K,
                "], got shapes ", shape(logits), " and ", shape(responsibilities));
  PHYSMDN_CHECK(chol.dim() == 4 && chol.size(0) == B && chol.size(1) == K && chol.size(2) == R && chol.size(3) == R,
                "mixture_nll_lowrank_backward: chol must be [B, K, R, R] = [", B, ", ", K, ", ", R, ", ", R,
                "], got shape ", shape(chol));
  PHYSMDN_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == B, "mixture_nll_lowrank_backward: grad_loss must be [B] = [",
                B, "], got shape ", shape(grad_loss));
  check_like(cov_factor, "cov_factor", {{&logits, "logits"}, {&cov_diag, "cov_diag"}});
  const auto acc = cov_factor.scalar_type() == kDouble ? kDouble : kFloat;  // (the accumulation dtype)
  const std::pair<const Tensor*, const char*> saved[] = {{&v, "v"}, {&responsibilities, "responsibilities"},
                                                         {&chol, "chol"}};
  for (const auto& [t, name] : saved)
    PHYSMDN_CHECK(t->scalar_type() == acc && t->device() == cov_factor.device(), "mixture_nll_lowrank_backward: ",
                  name, " must be the forward's (", acc, " on ", cov_factor.device(), "), got ", t->scalar_type(),
                  " on ", t->device());
  check_floating(grad_loss, "grad_loss");
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

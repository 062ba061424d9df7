// The fused loss's vector paths, each in its own file; mdn_loss.cpp chooses among them (paths.h) and runs the
// per-sample path otherwise. Inputs as DriverInputs leaves them, outputs allocated by csrc/op_impl.h.
#pragma once
#include <ATen/core/Tensor.h>

#include "cpu/paths.h"
#include "views.h"

namespace physmdn::cpu::PHYSMDN_CPU_ISA {

// blocked family path (mdn_loss_blocked.cpp): blocked_family_path_applies
void mdn_loss_forward_blocked(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
                              const at::Tensor& target, const at::Tensor& p0, const at::Tensor& p1,
                              const c10::optional<at::Tensor>& extra, const PhysicsArgs& args, int order, int64_t rows,
                              at::Tensor& loss, at::Tensor& saved);
void mdn_loss_backward_blocked(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& means,
                               const at::Tensor& log_scales, const at::Tensor& target, const at::Tensor& p0,
                               const at::Tensor& p1, const c10::optional<at::Tensor>& extra, const PhysicsArgs& args,
                               int order, int64_t rows, const at::Tensor& saved, at::Tensor& grad_logits,
                               at::Tensor& grad_means, at::Tensor& grad_log_scales, at::Tensor& grad_target,
                               at::Tensor& grad_extra);

#ifdef PHYSMDN_LANES_PATH
// lanes path (mdn_loss_lanes.cpp, AVX2 build): lanes_family_path_applies. The backward recomputes the forward per
// group (the saved state is not read) and writes the family parameters' gradients where grad_p0 / grad_p1 are
// float32 and not empty.
void mdn_loss_forward_lanes(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
                            const at::Tensor& target, const at::Tensor& p0, const at::Tensor& p1,
                            const c10::optional<at::Tensor>& extra, const PhysicsArgs& args, int order, int64_t rows,
                            at::Tensor& loss, at::Tensor& saved);
void mdn_loss_forward_grad_lanes(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& log_scales,
                                 const at::Tensor& target, const at::Tensor& p0, const at::Tensor& p1,
                                 const c10::optional<at::Tensor>& extra, const PhysicsArgs& args, int order,
                                 int64_t rows, at::Tensor& loss, at::Tensor& saved, at::Tensor& grad_logits,
                                 at::Tensor& grad_means, at::Tensor& grad_log_scales, at::Tensor& grad_target,
                                 at::Tensor& grad_extra, double grad_scale);
void mdn_loss_backward_lanes(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& means,
                             const at::Tensor& log_scales, const at::Tensor& target, const at::Tensor& p0,
                             const at::Tensor& p1, const c10::optional<at::Tensor>& extra, const PhysicsArgs& args,
                             int order, int64_t rows, at::Tensor& grad_logits, at::Tensor& grad_means,
                             at::Tensor& grad_log_scales, at::Tensor& grad_target, at::Tensor& grad_p0,
                             at::Tensor& grad_p1, at::Tensor& grad_extra);
#endif

}  // namespace physmdn::cpu::PHYSMDN_CPU_ISA

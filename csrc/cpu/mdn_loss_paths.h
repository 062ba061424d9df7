// The fused loss's vector paths, each in its own file; mdn_loss.cpp chooses among them (paths.h) and runs the
// per-sample path otherwise. Inputs as DriverInputs leaves them, outputs allocated by csrc/op_impl.h.
#pragma once

#include "cpu/paths.h"
#include "views.h"

namespace physmdn::cpu::PHYSMDN_CPU_ISA {

// blocked family path (mdn_loss_blocked.cpp): blocked_family_path_applies
void mdn_loss_forward_blocked(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                              const Tensor& target, const Tensor& p0, const Tensor& p1,
                              const OptionalTensor& extra, const PhysicsArgs& args, int order, int64_t rows,
                              Tensor& loss, Tensor& saved);
void mdn_loss_backward_blocked(const Tensor& grad_loss, const Tensor& logits, const Tensor& means,
                               const Tensor& log_scales, const Tensor& target, const Tensor& p0,
                               const Tensor& p1, const OptionalTensor& extra, const PhysicsArgs& args,
                               int order, int64_t rows, const Tensor& saved, Tensor& grad_logits,
                               Tensor& grad_means, Tensor& grad_log_scales, Tensor& grad_target,
                               Tensor& grad_extra);

#ifdef PHYSMDN_LANES_PATH
// lanes path (mdn_loss_lanes.cpp, AVX2 build): lanes_family_path_applies. The backward recomputes the forward per
// group (the saved state is not read) and writes the family parameters' gradients where grad_p0 / grad_p1 are
// float32 and not empty.
void mdn_loss_forward_lanes(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                            const Tensor& target, const Tensor& p0, const Tensor& p1,
                            const OptionalTensor& extra, const PhysicsArgs& args, int order, int64_t rows,
                            Tensor& loss, Tensor& saved);
void mdn_loss_forward_grad_lanes(const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                                 const Tensor& target, const Tensor& p0, const Tensor& p1,
                                 const OptionalTensor& extra, const PhysicsArgs& args, int order,
                                 int64_t rows, Tensor& loss, Tensor& saved, Tensor& grad_logits,
                                 Tensor& grad_means, Tensor& grad_log_scales, Tensor& grad_target,
                                 Tensor& grad_extra, double grad_scale);
void mdn_loss_backward_lanes(const Tensor& grad_loss, const Tensor& logits, const Tensor& means,
                             const Tensor& log_scales, const Tensor& target, const Tensor& p0,
                             const Tensor& p1, const OptionalTensor& extra, const PhysicsArgs& args,
                             int order, int64_t rows, Tensor& grad_logits, Tensor& grad_means,
                             Tensor& grad_log_scales, Tensor& grad_target, Tensor& grad_p0,
                             Tensor& grad_p1, Tensor& grad_extra);
#endif

}  // namespace physmdn::cpu::PHYSMDN_CPU_ISA

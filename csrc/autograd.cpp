// Eager-mode autograd of mixture_nll_fwd and mdn_loss_fwd as C++ autograd nodes (torch::autograd::Function).
//
// Why: a Python autograd.Function costs 30-60 us more per forward + backward (docs/performance.md), mostly Python
// run with caches the kernel has just flushed. They do the same work: with compute_grad
// the forward computes the loss and the gradients for an upstream gradient of grad_scale per sample in one kernel
// pass; the first backward hands those gradients over (or returns copies scaled by grad_loss / grad_scale); a
// backward after they were handed over (retain_graph), or one without forward gradients, computes them through the
// op's _bwd from the saved inputs (see take_forward_grads).
//
// Only python/physmdn/_ops.py (call_op) calls _mixture_nll_autograd / _mdn_loss_autograd, in eager mode (no
// tracing, plain tensors, no functorch transform): the value check of the upstream gradient reads tensor data.
// torch.compile and functorch go through the _fwd ops and their autograd formulas registered in Python (the same
// gradients; tests/ops/test_eager_path.py compares both paths bit for bit).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "views.h"

namespace physmdn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// True when every element of the CPU upstream gradient grad_loss equals grad_scale (as loss.sum() or the op's own
// mean reduction send it): the forward's gradients are then the answer. Reads one value, and all B only when the
// gradient is not an expanded scalar. On CUDA values are not inspected (that would synchronize).
bool upstream_is_scale(const Tensor& grad_loss, double grad_scale) {
  if (!grad_loss.is_cpu() || grad_loss.numel() == 0) return false;
  const auto first = grad_loss.select(0, 0);
  const double value = first.item<double>();
  if (value != grad_scale && value != rounded(grad_scale, grad_loss.scalar_type())) return false;
  return grad_loss.stride(0) == 0 || at::equal(grad_loss, first.expand_as(grad_loss));
}

Tensor per_sample(const Tensor& g, const Tensor& t) {
  std::vector<int64_t> shape(t.dim(), 1);
  shape[0] = -1;
  return g.view(shape);
}

void check_first_order(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), "physmdn.", op,
              ": only first-order gradients are supported; this backward was called with create_graph=True (a "
              "higher-order gradient through it would be wrong)");
}

// reduction: 0 none ([B]), 1 mean, 2 sum (scalars), as loss.mean() / loss.sum() would compute them.
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

Tensor reduce(AutogradContext* ctx, const Tensor& loss, int64_t reduction, double grad_scale) {
  TORCH_CHECK(reduction >= kNone && reduction <= kSum, "reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
              reduction);
  const auto B = loss.size(0);
  ctx->saved_data["reduction"] = reduction;
  ctx->saved_data["batch"] = B;
  // whether the forward's gradients are those of a unit gradient of the reduced loss (grad_scale 1/B for the mean,
  // 1 for the sum, as python/physmdn passes them): the backward then hands them over without a look at the values
  ctx->saved_data["unit"] = (reduction == kMean && B > 0 && grad_scale == 1.0 / static_cast<double>(B)) ||
                            (reduction == kSum && grad_scale == 1.0);
  if (reduction == kSum) return loss.sum();
  if (reduction == kNone) return loss;
  // torch's CPU mean of float32 / float64 is this sum divided by B in the same dtype (the same bits, compared in
  // tests/ops/test_eager_path.py), without mean's and div_'s dispatch (~15 us); the half types keep mean (it sums them
  // in float32)
  const auto dt = loss.scalar_type();
  if (!loss.is_cpu() || (dt != at::kFloat && dt != at::kDouble)) return loss.mean();
  auto total = loss.sum();
  if (dt == at::kFloat) {
    float* v = total.data_ptr<float>();
    *v = *v / static_cast<float>(B);
  } else {
    double* v = total.data_ptr<double>();
    *v = *v / static_cast<double>(B);
  }
  return total;
}

// True for a batched upstream gradient (torch.autograd.grad(..., is_grads_batched=True), which
// torch.autograd.functional.jacobian(vectorize=True) uses: the legacy Batched key; or a functorch wrapper): its
// values cannot be read and the forward's unbatched gradients cannot be rescaled by it in place, so the backward
// recomputes through the op.
bool batched(const Tensor& t) {
  const auto ks = t.key_set();
  return ks.has(c10::DispatchKey::Batched) || ks.has(c10::DispatchKey::FuncTorchBatched) ||
         ks.has(c10::DispatchKey::FuncTorchGradWrapper);
}

// True when grad, the gradient of the reduced loss, is a CPU 1 and the forward's gradients were made for it.
bool unit_upstream(AutogradContext* ctx, const Tensor& grad) {
  return ctx->saved_data["reduction"].toInt() != kNone && ctx->saved_data["unit"].toBool() && grad.is_cpu() &&
         grad.numel() == 1 && grad.item<double>() == 1.0;
}

// The per-sample upstream gradient [B] for the reduced loss's gradient: what MeanBackward (grad / B, the same value
// in every element) or SumBackward would send, as an expanded scalar (so the check of its values reads one).
Tensor per_sample_upstream(AutogradContext* ctx, const Tensor& grad) {
  const auto reduction = ctx->saved_data["reduction"].toInt();
  if (reduction == kNone) return grad;
  const auto B = ctx->saved_data["batch"].toInt();
  return (reduction == kMean ? grad / B : grad).expand({B});
}

// The forward's gradients (computed for an upstream gradient of grad_scale per sample) kept aside, not saved: the
// first backward hands them over or returns scaled copies (take_forward_grads).
void keep_forward_grads(AutogradContext* ctx, bool compute_grad, double grad_scale, const Tensor& means,
                        std::vector<Tensor> grads) {
  ctx->set_materialize_grads(false);
  if (!compute_grad) return;
  ctx->saved_data["grads"] = std::move(grads);
  // the value the kernel used (it computes in the accumulation dtype), to compare the upstream gradient with
  ctx->saved_data["grad_scale"] = rounded(grad_scale, acc_dtype(means.scalar_type()));
}

// The forward's gradients for grad, the gradient of the node's output; an empty vector when the backward must
// recompute through the op's _bwd (a backward after the gradients were handed over; a batched upstream gradient).
// For the unit upstream gradient (loss.sum(), the op's own mean) they are handed over as they are and dropped: a
// retained graph's second backward recomputes them, bit for bit the same (tests/ops/test_eager_path.py). For another
// upstream gradient on the CPU the backward returns scaled copies and keeps them, so that every backward of a
// retained graph gives the same bits (gradcheck's reentrancy check). On CUDA one upstream value is compared with
// grad_scale inside the kernel and the gradients are scaled in place (no synchronization): a second backward then
// recomputes, equal to rounding.
std::vector<Tensor> take_forward_grads(AutogradContext* ctx, const Tensor& grad) {
  auto it = ctx->saved_data.find("grads");
  if (it == ctx->saved_data.end() || it->second.isNone()) return {};
  auto grads = it->second.toTensorVector();
  const auto hand_over = [&] {
    it->second = c10::IValue();
    return grads;
  };
  if (batched(grad)) {
    it->second = c10::IValue();
    return {};
  }
  if (unit_upstream(ctx, grad)) return hand_over();
  const auto grad_loss = per_sample_upstream(ctx, grad);
  const double grad_scale = ctx->saved_data["grad_scale"].toDouble();
  if (upstream_is_scale(grad_loss, grad_scale)) return hand_over();
  if (!grad.is_cpu() && grad_loss.numel() > 0 && (grad_loss.stride(0) == 0 || grad_loss.numel() == 1)) {
    // one upstream value on the device (a reduced loss, or loss.sum() / .mean() of the per-sample losses): compared
    // with grad_scale inside the kernel (_scale_by_), without synchronizing; when it is grad_scale (the unit
    // gradient of the reduction the forward's gradients were made for) nothing passes over the gradients
    static const auto scale_by = op_handle<void(at::TensorList, const Tensor&, double)>("physmdn::_scale_by_");
    hand_over();
    scale_by.call(grads, grad_loss.select(0, 0), grad_scale);
    return grads;
  }
  auto g = grad_loss.to(grads[0].scalar_type());
  if (grad_scale != 1.0) g = g / grad_scale;
  std::vector<Tensor> scaled;
  scaled.reserve(grads.size());
  for (const auto& t : grads) scaled.push_back(t.numel() ? t * per_sample(g, t) : t);
  if (!grad.is_cpu()) hand_over();  // (a per-sample device gradient: the copies are the answer, nothing to keep)
  return scaled;
}

using Tensor4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Tensor6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Tensor7 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

}  // namespace

// (outside the anonymous namespace: the node names are torch::autograd::CppNode<physmdn::MixtureNll> and
// ...<physmdn::MdnLoss>)
// Arguments as in mixture_nll_fwd's schema.
struct MixtureNll : public torch::autograd::Function<MixtureNll> {
  static Tensor forward(AutogradContext* ctx, const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                        const Tensor& target, bool compute_grad, double grad_scale, int64_t reduction) {
    static const auto fwd = op_handle<Tensor6(const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool, double)>(
        "physmdn::mixture_nll_fwd");
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // (Function::apply only turns grad mode off: without
    // this guard the call would still enter the Python autograd kernel registered for mixture_nll_fwd)
    auto [loss, saved, gl, gm, gs, gt] = fwd.call(logits, means, log_scales, target, compute_grad, grad_scale);
    ctx->save_for_backward({logits, means, log_scales, target, saved});
    keep_forward_grads(ctx, compute_grad, grad_scale, means, {gl, gm, gs, gt});
    return reduce(ctx, loss, reduction, grad_scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    check_first_order("mixture_nll");
    variable_list out(7);  // logits, means, log_scales, target; none for the three scalars
    if (!grad_outputs[0].defined()) return out;
    auto grads = take_forward_grads(ctx, grad_outputs[0]);
    if (grads.empty()) {
      const auto grad_loss = per_sample_upstream(ctx, grad_outputs[0]);
      static const auto bwd = op_handle<Tensor4(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                const Tensor&, const Tensor&)>("physmdn::mixture_nll_bwd");
      const auto s = ctx->get_saved_variables();
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      auto [gl, gm, gs, gt] = bwd.call(grad_loss, s[0], s[1], s[2], s[3], s[4]);
      grads = {gl, gm, gs, gt};
    }
    std::copy(grads.begin(), grads.end(), out.begin());
    return out;
  }
};

// Arguments as in mdn_loss_fwd's schema. Tensor inputs (autograd edges): logits 0, means 1, log_scales 2, target 3,
// p0 4, p1 5, extra 6.
struct MdnLoss : public torch::autograd::Function<MdnLoss> {
  static Tensor forward(AutogradContext* ctx, const Tensor& logits, const Tensor& means, const Tensor& log_scales,
                        const Tensor& target, const Tensor& p0, const Tensor& p1, const c10::optional<Tensor>& extra,
                        int64_t family, int64_t moment, bool couple_weights, double weight, double spacing,
                        int64_t boundary, double noise_scale, bool compute_grad, double grad_scale,
                        int64_t reduction) {
    static const auto fwd = op_handle<Tensor7(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                              const Tensor&, const c10::optional<Tensor>&, int64_t, int64_t, bool,
                                              double, double, int64_t, double, bool, double)>("physmdn::mdn_loss_fwd");
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // (as in MixtureNll::forward)
    auto [loss, saved, gl, gm, gs, gt, ge] = fwd.call(logits, means, log_scales, target, p0, p1, extra, family, moment,
                                                      couple_weights, weight, spacing, boundary, noise_scale, compute_grad, grad_scale);
    ctx->save_for_backward({logits, means, log_scales, target, p0, p1, extra.value_or(Tensor()), saved});
    ctx->saved_data["family"] = family;
    ctx->saved_data["moment"] = moment;
    ctx->saved_data["couple_weights"] = couple_weights;
    ctx->saved_data["weight"] = weight;
    ctx->saved_data["spacing"] = spacing;
    ctx->saved_data["boundary"] = boundary;
    ctx->saved_data["noise_scale"] = noise_scale;
    keep_forward_grads(ctx, compute_grad, grad_scale, means, {gl, gm, gs, gt, ge});
    return reduce(ctx, loss, reduction, grad_scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    check_first_order("mdn_loss");
    variable_list out(17);  // the seven tensors; none for the ten scalars
    if (!grad_outputs[0].defined()) return out;
    const auto s = ctx->get_saved_variables();
    const bool has_extra = s[6].defined();
    auto grads = take_forward_grads(ctx, grad_outputs[0]);
    if (!grads.empty()) {  // computed by the forward (only when p0 / p1 need no gradient)
      std::copy(grads.begin(), grads.begin() + 4, out.begin());
      if (has_extra && ctx->needs_input_grad(6)) out[6] = grads[4];
      return out;
    }
    static const auto bwd = op_handle<Tensor7(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                              const Tensor&, const Tensor&, const Tensor&,
                                              const c10::optional<Tensor>&, int64_t, int64_t, bool, double, double,
                                              int64_t, double, const Tensor&, bool, bool)>("physmdn::mdn_loss_bwd");
    const auto& d = ctx->saved_data;
    const bool p0_grad = ctx->needs_input_grad(4), p1_grad = ctx->needs_input_grad(5);
    const auto grad_loss = per_sample_upstream(ctx, grad_outputs[0]);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [gl, gm, gs, gt, gp0, gp1, ge] =
        bwd.call(grad_loss, s[0], s[1], s[2], s[3], s[4], s[5], has_extra ? c10::optional<Tensor>(s[6]) : c10::nullopt,
                 d.at("family").toInt(), d.at("moment").toInt(), d.at("couple_weights").toBool(), d.at("weight").toDouble(), d.at("spacing").toDouble(),
                 d.at("boundary").toInt(), d.at("noise_scale").toDouble(), s[7], p0_grad, p1_grad);
    out[0] = gl, out[1] = gm, out[2] = gs, out[3] = gt;
    if (p0_grad) out[4] = gp0;
    if (p1_grad) out[5] = gp1;
    if (has_extra && ctx->needs_input_grad(6)) out[6] = ge;
    return out;
  }
};

namespace {

Tensor mixture_nll_autograd(const Tensor& logits, const Tensor& means, const Tensor& log_scales, const Tensor& target,
                            bool compute_grad, double grad_scale, int64_t reduction) {
  return MixtureNll::apply(logits, means, log_scales, target, compute_grad, grad_scale, reduction);
}

Tensor mdn_loss_autograd(const Tensor& logits, const Tensor& means, const Tensor& log_scales, const Tensor& target,
                         const Tensor& p0, const Tensor& p1, const c10::optional<Tensor>& extra, int64_t family,
                         int64_t moment, bool couple_weights, double weight, double spacing, int64_t boundary,
                         double noise_scale, bool compute_grad, double grad_scale, int64_t reduction) {
  return MdnLoss::apply(logits, means, log_scales, target, p0, p1, extra, family, moment, couple_weights, weight, spacing, boundary,
                        noise_scale, compute_grad, grad_scale, reduction);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(physmdn, m) {
  // eager mode only (see the top of this file): the loss of mixture_nll_fwd / mdn_loss_fwd (same arguments), [B] or
  // reduced (reduction 0 none, 1 mean, 2 sum), with a C++ autograd node
  m.def("_mixture_nll_autograd(Tensor logits, Tensor means, Tensor log_scales, Tensor target, bool compute_grad, "
        "float grad_scale, int reduction) -> Tensor");
  m.def("_mdn_loss_autograd(Tensor logits, Tensor means, Tensor log_scales, Tensor target, Tensor p0, Tensor p1, "
        "Tensor? extra, int family, int moment, bool couple_weights, float weight, float spacing, int boundary, "
        "float noise_scale, bool compute_grad, float grad_scale, int reduction) -> Tensor");
}

TORCH_LIBRARY_IMPL(physmdn, Autograd, m) {
  m.impl("_mixture_nll_autograd", &mixture_nll_autograd);
  m.impl("_mdn_loss_autograd", &mdn_loss_autograd);
}

}  // namespace physmdn

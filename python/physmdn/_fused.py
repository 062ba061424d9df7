"""The fused MDN loss: ``torch.ops.physmdn.mdn_loss_fwd/bwd`` with fake kernels and autograd, and the
dispatch of physics specs to it.

The first built-in spec (:class:`~physmdn.physics.Polynomial`, :class:`~physmdn.physics.Linear`,
:class:`~physmdn.physics.Stencil1D` of order <= 8) runs inside the kernel; every other spec's penalty
``[B, K]`` is computed by its torch implementation and enters the same kernel as ``extra``, where it is
weighted by the mixture probabilities (gradients flow back to it through autograd).
"""

from __future__ import annotations

import torch

from ._func import FUNCTIONS, _FirstOrder, _fold, _placeholder, _unfold, _with_bwd
from ._ops import _PLAIN_TYPES, EAGER_AUTOGRAD, acc_dtype, call_op, check_first_order, forward_grads, keep_forward_grads

FAMILY_NONE, FAMILY_POLYNOMIAL, FAMILY_LINEAR, FAMILY_STENCIL = -1, 0, 1, 2
MOMENT_CODES = {"point": 0, "first": 1, "second": 2}  # csrc/physics_math.h's Moment
MAX_ORDER = 8
SAVED_PER_SAMPLE = 4


@torch.library.register_fake("physmdn::mdn_loss_fwd")
def _mdn_loss_fwd_fake(logits, means, log_scales, target, p0, p1, extra, family, moment, couple_weights, weight, spacing, boundary,
                       noise_scale, compute_grad=False, grad_scale=1.0):
    B = means.shape[0]
    if compute_grad:
        grads = (means.new_empty(logits.shape), means.new_empty(means.shape), means.new_empty(log_scales.shape),
                 means.new_empty(target.shape), means.new_empty(logits.shape if extra is not None else (0,)))
    else:
        grads = tuple(means.new_empty((0,)) for _ in range(5))
    return (means.new_empty((B,)), means.new_empty((B, SAVED_PER_SAMPLE), dtype=acc_dtype(means.dtype)), *grads)


@torch.library.register_fake("physmdn::mdn_loss_bwd")
def _mdn_loss_bwd_fake(grad_loss, logits, means, log_scales, target, p0, p1, extra, family, moment, couple_weights, weight, spacing,
                       boundary, noise_scale, saved, p0_grad, p1_grad):
    has_family = family != FAMILY_NONE
    gp0 = means.new_empty(p0.shape) if (p0_grad and has_family) else means.new_empty((0,))
    gp1 = means.new_empty(p1.shape) if (p1_grad and has_family and family != FAMILY_POLYNOMIAL) else means.new_empty((0,))
    ge = means.new_empty(logits.shape) if extra is not None else means.new_empty((0,))
    return (means.new_empty(logits.shape), means.new_empty(means.shape), means.new_empty(log_scales.shape),
            means.new_empty(target.shape), gp0, gp1, ge)


def _setup_context(ctx, inputs, output):
    _, saved, *grads = output
    ctx.mark_non_differentiable(saved, *grads)
    _prepare(ctx, inputs, saved, grads)


def _prepare(ctx, inputs, saved, grads):
    """What the backward needs, kept on ctx (the eager path's Function calls this directly)."""
    (logits, means, log_scales, target, p0, p1, extra, family, moment, couple_weights, weight, spacing, boundary, noise_scale,
     compute_grad, grad_scale) = inputs
    ctx.scalars = (family, moment, couple_weights, weight, spacing, boundary, noise_scale)
    ctx.has_extra = extra is not None
    ctx.set_materialize_grads(False)
    keep_forward_grads(ctx, compute_grad, grad_scale, means.dtype, grads,
                       (logits, means, log_scales, target, p0, p1, extra, saved))


def _backward(ctx, grad_loss, _grad_saved, *_grad_grads):
    check_first_order("mdn_loss", ctx, grad_loss)
    logits, means, log_scales, target, p0, p1, extra, saved, *saved_grads = ctx.saved_tensors
    family, moment, couple_weights, weight, spacing, boundary, noise_scale = ctx.scalars
    needs = ctx.needs_input_grad
    rest = (None,) * 9  # family ... grad_scale
    grads = forward_grads(ctx, grad_loss, saved, saved_grads)
    if grads is not None:  # computed by the forward (only when p0 / p1 need no gradient)
        gl, gm, gs, gt, ge = grads
        return (gl, gm, gs, gt, None, None, ge if (ctx.has_extra and needs[6]) else None, *rest)
    if grad_loss is None:
        grad_loss = torch.zeros_like(saved[:, 0], dtype=means.dtype)
    bwd = getattr(ctx, "bwd_op", torch.ops.physmdn.mdn_loss_bwd)  # (_func.py's under functorch transforms)
    gl, gm, gs, gt, gp0, gp1, ge = bwd(
        grad_loss, logits, means, log_scales, target, p0, p1, extra, family, moment, couple_weights, weight, spacing, boundary,
        noise_scale, saved, bool(needs[4]), bool(needs[5]))
    return (gl, gm, gs, gt, gp0 if needs[4] else None, gp1 if needs[5] else None,
            ge if (extra is not None and needs[6]) else None, *rest)


torch.library.register_autograd("physmdn::mdn_loss_fwd", _backward, setup_context=_setup_context)
EAGER_AUTOGRAD["mdn_loss"] = (_prepare, _backward, lambda ctx, grads: (
    *grads[:4], None, None, grads[4] if (ctx.has_extra and ctx.needs_input_grad[6]) else None, *(None,) * 9))


def _sum_to(grad: torch.Tensor, shape) -> torch.Tensor:
    """``grad.sum_to_size(shape)``, the batch dimension first: a ``[B, n]`` column sum (one pass over ``grad``), then
    the other broadcast dimensions on the small result. torch's reduction over dimensions 0 and 2 of a contiguous
    ``[B, K, D, J + 1]`` at once is ~10x slower (B = 65536, K = 8, D = 4, J = 3: 14 ms against 1.3 ms)."""
    shape = tuple(shape)
    lead = grad.dim() - len(shape)
    if lead:
        grad = grad.sum(tuple(range(lead)))
    if shape and shape[0] == 1 and grad.shape[0] != 1:
        grad = grad.reshape(grad.shape[0], -1).sum(0).reshape((1, *grad.shape[1:]))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(dims, keepdim=True) if dims else grad


class _Expand(torch.autograd.Function):
    """``t.expand(shape)`` with :func:`_sum_to` as its backward (the kernels' family parameter gradients are
    full-size ``[B, K, ...]``, reduced here to the parameter's shape)."""

    generate_vmap_rule = True  # (torch.func.vmap over a loss with learnable physics parameters)

    @staticmethod
    def forward(t, shape):
        return t.expand(shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.in_shape = inputs[0].shape

    @staticmethod
    def backward(ctx, grad):
        return _sum_to(grad, ctx.in_shape), None


def _expander(means):
    """``expand(t, shape)``: a spec parameter in the dtype and on the device of ``means``, expanded to ``[B, K, ...]``
    (differentiably: :class:`_Expand` when it needs a gradient)."""

    def expand(t, shape):
        t = t.to(device=means.device, dtype=means.dtype)
        return _Expand.apply(t, shape) if t.requires_grad else t.expand(*shape)

    return expand


def fused_mdn_loss(logits, means, log_scales, target, items, weight: float, reduction: str = "none",
                   fast: bool = False) -> torch.Tensor:
    """``NLL_b + weight * sum_k pi_bk sum_s w_s P^s_bk`` through one fused kernel: ``[B]`` (``reduction="none"``),
    or its mean / sum. ``items``: ``(spec, w, coupling)`` triples. The first spec whose ``fusable`` is true runs inside
    the kernel; the other specs' penalties ``[B, K]`` (plain torch) enter the kernel as ``extra`` when their coupling
    is the kernel's, else they are weighted by ``softmax(logits)`` (detached for ``"detached"``) outside it. When
    gradients will be needed and the kernel spec's parameters need none, the forward computes them for the
    reduction's upstream gradient (as :func:`physmdn.mixture_nll`). ``fast``: the inputs passed
    :func:`physmdn._ops.fast_mixture_inputs` (eager, plain tensors)."""
    B, K, D = means.shape
    for spec, _, _ in items:
        spec.validate(B, K, D)
    fused_index = next((i for i, (spec, _, _) in enumerate(items) if getattr(spec, "fusable", False)), None)
    kernel_coupling = items[0 if fused_index is None else fused_index][2]
    extra = outside = None
    for i, (spec, w, coupling) in enumerate(items):
        if i == fused_index:
            continue
        term = (weight * w) * spec.penalty(means, log_scales)
        if coupling == kernel_coupling:
            extra = term if extra is None else extra + term
        else:
            outside = term if outside is None else outside + term
    if extra is not None:
        extra = extra.to(means.dtype)
    if fused_index is None:
        family, p0, p1, moment, spacing, boundary, noise, kernel_weight = (
            FAMILY_NONE, means.new_empty((0,)), means.new_empty((0,)), MOMENT_CODES["second"], 1.0, 0, 0.0, 0.0)
    else:
        spec, w, _ = items[fused_index]
        family, p0, p1, moment, spacing, boundary, noise = spec.kernel_args(B, K, D, _expander(means))
        p1 = means.new_empty((0,)) if p1 is None else p1
        kernel_weight = weight * w
    differentiable = [logits, means, log_scales, target] + ([extra] if extra is not None else [])
    compute_grad = (torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)
                    and not (p0.requires_grad or p1.requires_grad))
    grad_scale = 1.0 / B if reduction == "mean" and B > 0 and not torch.compiler.is_compiling() else 1.0
    args = (logits, means, log_scales, target, p0, p1, extra, family, int(moment), kernel_coupling == "coupled",
            float(kernel_weight), float(spacing), int(boundary), float(noise), compute_grad, grad_scale)
    needs_autograd = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (*differentiable, p0, p1))
    plain = None  # (call_op tests it) unless the inputs are known plain and so are the parameters and extra
    if fast and type(p0) in _PLAIN_TYPES and type(p1) in _PLAIN_TYPES and (extra is None or type(extra) in _PLAIN_TYPES):
        plain = True
    loss = call_op("mdn_loss", args, needs_autograd, reduction, plain=plain)
    if outside is None:
        return loss
    # the specs of the other coupling: weighted outside the kernel (coupled: pi with its gradient)
    pi = torch.softmax(logits, dim=-1)
    outside = ((pi.detach() if kernel_coupling == "coupled" else pi) * outside).sum(-1)
    return loss + (outside.mean() if reduction == "mean" else outside.sum() if reduction == "sum" else outside)


def _kernel_args(spec, B, K, D, means):
    """``(family, p0, p1, moment, couple_weights, spacing, boundary, noise_scale)``: the positional scalar and
    parameter arguments of ``mdn_loss_fwd`` / ``_bwd`` for one fusable spec (its coupling, or detached)."""
    family, p0, p1, moment, spacing, boundary, noise = spec.kernel_args(B, K, D, _expander(means))
    p1 = means.new_empty((0,)) if p1 is None else p1
    return family, p0, p1, int(moment), spec.coupling == "coupled", float(spacing), int(boundary), float(noise)


# ----- torch.func ------------------------------------------------------------------------------------

@torch.library.register_vmap("physmdn::mdn_loss_fwd")
def _mdn_loss_fwd_vmap(info, in_dims, logits, means, log_scales, target, p0, p1, extra, family, moment, couple_weights, weight,
                       spacing, boundary, noise_scale, compute_grad=False, grad_scale=1.0):
    tensors = (logits, means, log_scales, target, p0, p1, extra)
    dims = in_dims[:7]
    per_sample = (True,) * 4 + (not _placeholder(p0, dims[4]), not _placeholder(p1, dims[5]), True)
    args = _fold(info, dims, tensors, per_sample)
    out = torch.ops.physmdn.mdn_loss_fwd(*args, family, moment, couple_weights, weight, spacing, boundary, noise_scale, compute_grad,
                                         grad_scale)
    g = bool(compute_grad)
    return _unfold(out, info.batch_size, (True, True, g, g, g, g, g and extra is not None))


@torch.library.register_vmap("physmdn::mdn_loss_bwd")
def _mdn_loss_bwd_vmap(info, in_dims, grad_loss, logits, means, log_scales, target, p0, p1, extra, family, moment,
                       couple_weights, weight, spacing, boundary, noise_scale, saved, p0_grad, p1_grad):
    p0_ps, p1_ps = not _placeholder(p0, in_dims[5]), not _placeholder(p1, in_dims[6])
    tensors = (grad_loss, logits, means, log_scales, target, p0, p1, extra)
    args = _fold(info, in_dims[:8], tensors, (True,) * 5 + (p0_ps, p1_ps, True))
    (saved,) = _fold(info, in_dims[15:16], (saved,), (True,))
    out = torch.ops.physmdn.mdn_loss_bwd(*args, family, moment, couple_weights, weight, spacing, boundary, noise_scale, saved,
                                         p0_grad, p1_grad)
    has_family = family != FAMILY_NONE
    gp0 = bool(p0_grad) and has_family
    gp1 = bool(p1_grad) and has_family and family != FAMILY_POLYNOMIAL
    return _unfold(out, info.batch_size, (True,) * 4 + (gp0, gp1, extra is not None))


class _MdnLossBwd(_FirstOrder):
    op = "mdn_loss"

    @staticmethod
    def forward(grad_loss, logits, means, log_scales, target, p0, p1, extra, family, moment, couple_weights, weight, spacing,
                boundary, noise_scale, saved, p0_grad, p1_grad):
        return torch.ops.physmdn.mdn_loss_bwd(grad_loss, logits, means, log_scales, target, p0, p1, extra, family,
                                              moment, couple_weights, weight, spacing, boundary, noise_scale, saved, p0_grad, p1_grad)


class MdnLossFunction(torch.autograd.Function):
    """``mdn_loss_fwd`` with the registered autograd's setup_context / backward, for functorch transforms."""

    generate_vmap_rule = True
    compute_grad_index = 14

    @staticmethod
    def forward(logits, means, log_scales, target, p0, p1, extra, family, moment, couple_weights, weight, spacing, boundary, noise_scale,
                compute_grad, grad_scale):
        return torch.ops.physmdn.mdn_loss_fwd(logits, means, log_scales, target, p0, p1, extra, family, moment, couple_weights, weight,
                                              spacing, boundary, noise_scale, compute_grad, grad_scale)

    setup_context = _with_bwd(_setup_context, _MdnLossBwd)
    backward = staticmethod(_backward)



FUNCTIONS["mdn_loss"] = MdnLossFunction

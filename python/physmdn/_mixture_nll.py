"""The mixture NLL op, ``torch.ops.physmdn.mixture_nll_fwd`` / ``_bwd``: its fake kernels, autograd, batching
rules and functorch Function, and :func:`mixture_nll`."""

from __future__ import annotations

import torch

from ._func import FUNCTIONS, _FirstOrder, _fold, _unfold, _with_bwd
from ._ops import (EAGER_AUTOGRAD, acc_dtype, call_op, check_first_order, check_mixture_inputs, forward_grads, keep_forward_grads,
                   prepared_inputs, unflatten_loss)

__all__ = ["mixture_nll"]

@torch.library.register_fake("physmdn::mixture_nll_fwd")
def _mixture_nll_fwd_fake(logits, means, log_scales, target, compute_grad=False, grad_scale=1.0):
    check_mixture_inputs(logits, means, log_scales, target)
    B = means.shape[0]
    if compute_grad:
        grads = (means.new_empty(logits.shape), means.new_empty(means.shape), means.new_empty(log_scales.shape),
                 means.new_empty(target.shape))
    else:
        grads = tuple(means.new_empty((0,)) for _ in range(4))
    return (means.new_empty((B,)), means.new_empty((B, 3), dtype=acc_dtype(means.dtype)), *grads)


@torch.library.register_fake("physmdn::mixture_nll_bwd")
def _mixture_nll_bwd_fake(grad_loss, logits, means, log_scales, target, saved):
    return (means.new_empty(logits.shape), means.new_empty(means.shape), means.new_empty(log_scales.shape),
            means.new_empty(target.shape))


# Tensor types the eager paths take as they are (a Parameter is a plain tensor to the kernels and to autograd; other
# subclasses, fake and functional tensors go through the dispatcher).
def _mixture_nll_prepare(ctx, inputs, saved, grads):
    """What the backward needs, kept on ctx (the eager path's Function calls this directly)."""
    logits, means, log_scales, target, compute_grad, grad_scale = inputs
    ctx.set_materialize_grads(False)  # no zero-filled [B, K, D] gradients for the auxiliary outputs
    keep_forward_grads(ctx, compute_grad, grad_scale, means.dtype, grads, (logits, means, log_scales, target, saved))


def _mixture_nll_setup_context(ctx, inputs, output):
    _, saved, *grads = output
    ctx.mark_non_differentiable(saved, *grads)
    _mixture_nll_prepare(ctx, inputs, saved, grads)


def _mixture_nll_backward(ctx, grad_loss, _grad_saved, *_grad_grads):
    check_first_order("mixture_nll", ctx, grad_loss)
    logits, means, log_scales, target, saved, *saved_grads = ctx.saved_tensors
    grads = forward_grads(ctx, grad_loss, saved, saved_grads)
    if grads is not None:
        return (*grads, None, None)
    if grad_loss is None:
        grad_loss = torch.zeros_like(saved[:, 0], dtype=means.dtype)
    bwd = getattr(ctx, "bwd_op", torch.ops.physmdn.mixture_nll_bwd)  # (_func.py's under functorch transforms)
    gl, gm, gs, gt = bwd(grad_loss, logits, means, log_scales, target, saved)
    return gl, gm, gs, gt, None, None


torch.library.register_autograd(
    "physmdn::mixture_nll_fwd", _mixture_nll_backward, setup_context=_mixture_nll_setup_context
)
EAGER_AUTOGRAD["mixture_nll"] = (_mixture_nll_prepare, _mixture_nll_backward, lambda ctx, grads: (*grads, None, None))


def mixture_nll(logits: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor, target: torch.Tensor,
                reduction: str = "none") -> torch.Tensor:
    """Negative log-likelihood of a diagonal Gaussian mixture, fused in one kernel.

    ``loss_b = -log sum_k softmax(logits_b)_k N(target_b | means_bk, diag(exp(log_scales_bk))^2)``

    Args:
        logits: ``[B, K]`` unnormalized component log-weights.
        means: ``[B, K, D]`` component means.
        log_scales: ``[B, K, D]`` log standard deviations.
        target: ``[B, D]`` observations. Any leading batch dimensions ``[*]`` in place of ``[B]`` broadcast as torch
            broadcasts (a ``[T, B, ...]`` sequence, a ``[1, K, D]`` shared log-scale); the kernel sees the flattened
            batch and the per-sample loss comes back as ``[*]``.
        reduction: ``"none"`` (``[B]``), ``"mean"`` or ``"sum"`` (scalars). With a reduction the kernel computes
            the gradients already scaled for it, so a backward from the scalar needs no pass over them; prefer
            ``reduction="mean"`` to ``mixture_nll(...).mean()`` in training loops.

    Returns:
        The loss in the input dtype. float16/bfloat16 inputs accumulate in float32; under
        ``torch.autocast`` the inputs are cast to float32 and the loss is float32.
        Views need no copy by the caller: on the CPU the AVX2 kernel reads inputs whose per-sample rows are
        contiguous (views split from one network output, a batch broadcast such as a shared log-scale
        parameter) in place at any batch stride and gathers other layouts per group of 8 samples; the
        blocked paths (float64, builds without AVX2) copy strided views to contiguous buffers, and expanded
        inputs are read in place by the generic loop. A NaN in one sample's inputs gives NaN for that
        sample only. ``B = 0`` gives an empty tensor (NaN for the
        mean, 0 for the sum, as torch).
    """
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    fast, batch_shape, (logits, means, log_scales, target) = prepared_inputs(logits, means, log_scales, target)
    # Gradients are computed in the forward pass when they will be needed (one pass over the inputs), for the
    # upstream gradient the reduction will send (1/B for the mean); the backward then rescales them only if the
    # actual upstream gradient differs.
    compute_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (logits, means, log_scales, target))
    B = means.shape[0]
    # (under torch.compile the scale stays 1: 1/B would specialize a dynamic batch size)
    grad_scale = 1.0 / B if reduction == "mean" and B > 0 and not torch.compiler.is_compiling() else 1.0
    loss = call_op("mixture_nll", (logits, means, log_scales, target, compute_grad, grad_scale),
                   needs_autograd=compute_grad, reduction=reduction, plain=True if fast else None)
    return unflatten_loss(loss, batch_shape, reduction)


# ----- torch.func ------------------------------------------------------------------------------------

@torch.library.register_vmap("physmdn::mixture_nll_fwd")
def _mixture_nll_fwd_vmap(info, in_dims, logits, means, log_scales, target, compute_grad=False, grad_scale=1.0):
    args = _fold(info, in_dims, (logits, means, log_scales, target), (True,) * 4)
    out = torch.ops.physmdn.mixture_nll_fwd(*args, compute_grad, grad_scale)
    return _unfold(out, info.batch_size, (True, True) + (bool(compute_grad),) * 4)


@torch.library.register_vmap("physmdn::mixture_nll_bwd")
def _mixture_nll_bwd_vmap(info, in_dims, grad_loss, logits, means, log_scales, target, saved):
    args = _fold(info, in_dims, (grad_loss, logits, means, log_scales, target, saved), (True,) * 6)
    return _unfold(torch.ops.physmdn.mixture_nll_bwd(*args), info.batch_size, (True,) * 4)


class _MixtureNllBwd(_FirstOrder):
    op = "mixture_nll"

    @staticmethod
    def forward(grad_loss, logits, means, log_scales, target, saved):
        return torch.ops.physmdn.mixture_nll_bwd(grad_loss, logits, means, log_scales, target, saved)


class MixtureNllFunction(torch.autograd.Function):
    """``mixture_nll_fwd`` with the registered autograd's setup_context / backward, for functorch transforms."""

    generate_vmap_rule = True
    compute_grad_index = 4  # (see apply)

    @staticmethod
    def forward(logits, means, log_scales, target, compute_grad, grad_scale):
        return torch.ops.physmdn.mixture_nll_fwd(logits, means, log_scales, target, compute_grad, grad_scale)

    setup_context = _with_bwd(_mixture_nll_setup_context, _MixtureNllBwd)
    backward = staticmethod(_mixture_nll_backward)



FUNCTIONS["mixture_nll"] = MixtureNllFunction

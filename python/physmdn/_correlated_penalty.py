"""The physics penalty of correlated Gaussian components as a custom op: ``torch.ops.physmdn.correlated_penalty``
(``P [B, K]`` of one built-in family under ``N(mu_bk, F_bk F_bk^T + diag(c_bk))``) and its backward op, with fake
kernels and the autograd formula.

Both ops are defined by the compiled extension and run the fused per-component math of csrc/mvn_physics_math.h:
csrc/cpu/correlated_penalty.cpp on CPU tensors, csrc/cuda/correlated.cuh on CUDA tensors (in a CUDA build). On other
devices they run :mod:`physmdn.physics_correlated`'s plain-torch formulas (the float64 reference), registered here.
The family's parameters (``p0``, ``p1``: as for the fused loss, :meth:`kernel_args` of the spec) get no gradient
from the op: :func:`penalty` takes the torch path when one of them needs a gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _fused
from ._ops import check_first_order

__all__ = ["penalty"]

_LIB = torch.library.Library("physmdn", "IMPL")
_MOMENT_NAMES = {code: name for name, code in _fused.MOMENT_CODES.items()}


def _spec(p0, p1, family, moment, spacing, boundary, noise_scale):
    """The spec the op's arguments describe (for the torch implementation)."""
    from .physics import Linear, Polynomial, Stencil1D

    moment = _MOMENT_NAMES[int(moment)]
    if family == _fused.FAMILY_POLYNOMIAL:
        return Polynomial(p0, moment=moment, noise_scale=noise_scale)
    if family == _fused.FAMILY_LINEAR:
        return Linear(p0, p1, moment=moment, noise_scale=noise_scale)
    if family == _fused.FAMILY_STENCIL:
        return Stencil1D(p0, p1, spacing=spacing, boundary="periodic" if boundary == 0 else "neumann", moment=moment,
                         noise_scale=noise_scale)
    raise ValueError(f"family must be 0 (polynomial), 1 (linear) or 2 (stencil), got {family}")


def _torch_penalty(means, factor, diag, p0, p1, family, moment, spacing, boundary, noise_scale):
    from .physics_correlated import reference_penalty

    work = torch.float64 if means.dtype == torch.float64 else torch.float32
    spec = _spec(p0.to(work), p1.to(work), family, moment, spacing, boundary, noise_scale)
    value = reference_penalty(spec, means.to(work), factor.to(work), None if diag is None else diag.to(work))
    return value.to(means.dtype)


def _torch_penalty_backward(grad, means, factor, diag, p0, p1, family, moment, spacing, boundary, noise_scale):
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(True) for t in (means, factor)]
        if diag is not None:
            inputs.append(diag.detach().requires_grad_(True))
        value = _torch_penalty(inputs[0], inputs[1], inputs[2] if diag is not None else None, p0, p1, family, moment,
                               spacing, boundary, noise_scale)
        grads = torch.autograd.grad(value, inputs, grad.to(value.dtype), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
    return grads[0], grads[1], grads[2] if diag is not None else means.new_empty((0,))


_LIB.impl("correlated_penalty", _torch_penalty, "CompositeExplicitAutograd")
_LIB.impl("correlated_penalty_backward", _torch_penalty_backward, "CompositeExplicitAutograd")


@torch.library.register_fake("physmdn::correlated_penalty")
def _(means, factor, diag, p0, p1, family, moment, spacing, boundary, noise_scale):
    return means.new_empty(means.shape[:2])


@torch.library.register_fake("physmdn::correlated_penalty_backward")
def _(grad, means, factor, diag, p0, p1, family, moment, spacing, boundary, noise_scale):
    return (means.new_empty(means.shape), factor.new_empty(factor.shape),
            means.new_empty(means.shape if diag is not None else (0,)))


def _setup_context(ctx, inputs, output):
    means, factor, diag, p0, p1, *scalars = inputs
    ctx.has_diag = diag is not None
    ctx.scalars = scalars
    ctx.save_for_backward(means, factor, diag, p0, p1)


def _backward(ctx, grad):
    if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
        raise NotImplementedError(
            "physmdn.correlated_penalty: the family's parameters get no gradient from the fused op; "
            "physmdn.physics_correlated takes its torch path when they need one")
    check_first_order("correlated_penalty", ctx, grad)
    means, factor, diag, p0, p1 = ctx.saved_tensors
    gm, gF, gd = torch.ops.physmdn.correlated_penalty_backward(grad, means, factor, diag, p0, p1, *ctx.scalars)
    return gm, gF, gd if ctx.has_diag else None, None, None, None, None, None, None, None


torch.library.register_autograd("physmdn::correlated_penalty", _backward, setup_context=_setup_context)


def penalty(spec, means: Tensor, factor: Tensor, diag: Tensor | None) -> Tensor | None:
    """``P [N, K]`` of ``spec`` (its moment) under ``N(means_k, F_k F_k^T + diag(c_k))`` through the fused op
    (``means [N, K, D]``, ``factor [N, K, D, Q]``, ``diag [N, K, D]`` or None), or None where the op does not apply:
    a spec other than the built-in families or beyond the kernels' polynomial order, parameters that need a gradient,
    mixture tensors of different dtypes, or inside torch.func transforms."""
    from .physics import Linear, Polynomial, Stencil1D

    if not isinstance(spec, (Polynomial, Linear, Stencil1D)) or not spec.fusable:
        return None
    if torch._C._are_functorch_transforms_active():  # (torch.func.grad / vmap: the torch formulas compose with them)
        return None
    if not means.dtype.is_floating_point or any(t is not None and t.dtype != means.dtype for t in (factor, diag)):
        return None
    N, K, D = means.shape
    family, p0, p1, moment, spacing, boundary, noise = spec.kernel_args(N, K, D, _fused._expander(means))
    p1 = means.new_empty((0,)) if p1 is None else p1
    if p0.requires_grad or p1.requires_grad:
        return None
    return torch.ops.physmdn.correlated_penalty(means, factor, diag, p0, p1, int(family), int(moment), float(spacing),
                                                int(boundary), float(noise))

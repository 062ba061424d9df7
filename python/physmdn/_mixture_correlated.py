"""Mixture NLL with correlated Gaussian components: ``torch.ops.physmdn.mixture_nll_tril`` (full covariance from
its Cholesky factor) and ``torch.ops.physmdn.mixture_nll_lowrank`` (``W W^T + diag(d)``), each with a backward op,
fake kernels and the autograd formula, and the public :func:`mixture_nll_tril` / :func:`mixture_nll_lowrank`.

Both ops and their backwards are defined by the compiled extension and run its fused kernels over the per-sample math
of csrc/mvn_math.h: csrc/cpu/mixture_nll_tril.cpp and csrc/cpu/mixture_nll_lowrank.cpp on CPU tensors,
csrc/cuda/correlated.cuh on CUDA tensors (in a CUDA build); on other devices they run the batched torch
(``torch.linalg``) implementations registered here (CompositeExplicitAutograd). Both compute in the accumulation dtype
(float32 for half types); the fake kernels and the autograd formulas are registered here for every device.

Per sample ``b`` and component ``k``, ``delta = y - mu_k``:

* tril: ``z_k = L_k^-1 delta``, ``log N_k = -|z_k|^2 / 2 - sum_i log L_kii - D log(2 pi) / 2``;
* lowrank: ``C_k = I_R + W_k^T D_k^-1 W_k = L_C L_C^T`` (Woodbury), ``s = L_C^-1 W_k^T D_k^-1 delta``,
  ``delta^T Sigma^-1 delta = delta^T D^-1 delta - |s|^2`` and ``log det Sigma = log det C + sum_i log d_i``
  (the matrix determinant lemma): ``O(D R^2 + R^3)`` per component.

``loss_b = -logsumexp_k(log_softmax(logits)_k + log N_k)``. The backward is analytic, with the responsibilities
``r_k`` and ``v_k = Sigma_k^-1 delta_k``: ``dloss/dlogits = softmax(logits) - r``, ``dloss/dmu_k = -r_k v_k``,
``dloss/dy = sum_k r_k v_k``, ``dloss/dL_k = -r_k tril(v_k z_k^T - diag(1 / L_kii))``,
``dloss/dW_k = -r_k (v_k v_k^T W_k - Sigma_k^-1 W_k)``, ``dloss/dd_k = -r_k (v_k^2 - diag Sigma_k^-1) / 2``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._ops import _check_like_means, _check_tensor, acc_dtype, autocast_inputs, mixture_event, unflatten_loss

__all__ = ["mixture_nll_tril", "mixture_nll_lowrank", "MAX_TRIL_DIM", "MAX_RANK"]

# The sizes the fused kernels will hold per thread (issue: D up to 32 for tril, R up to 8 for low rank); the torch
# implementation would take more, but the public functions keep one contract for every backend.
MAX_TRIL_DIM = 32
MAX_RANK = 8

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_LN2 = math.log(2.0)


# ----- tril -----------------------------------------------------------------------------------------------------

def _sum_log(values: Tensor) -> Tensor:
    """``sum_i log values_i`` over the last dimension, through ``log2`` (torch's CPU ``log`` is several times slower
    on some CPUs; docs/performance.md). A zero entry gives -inf and, with the division by it in the solve, NaN in
    that sample's loss; a negative one NaN."""
    return torch.log2(values).sum(-1) * _LN2


# the torch implementation for devices without a fused kernel (the extension registers the CPU and CUDA kernels)
_LIB = torch.library.Library("physmdn", "IMPL")


def _tril_fwd(logits: Tensor, means: Tensor, scale_tril: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss [B], z [B, K, D], responsibilities [B, K])``; ``z`` and the responsibilities in the accumulation
    dtype (saved for the backward)."""
    work = acc_dtype(means.dtype)
    L = scale_tril.to(work)
    delta = (target.to(work).unsqueeze(-2) - means.to(work)).unsqueeze(-1)  # [B, K, D, 1]
    z = torch.linalg.solve_triangular(L, delta, upper=False).squeeze(-1)
    D = means.shape[-1]
    log_normal = -0.5 * z.square().sum(-1) - _sum_log(L.diagonal(dim1=-2, dim2=-1)) - D * _HALF_LOG_2PI
    joint = torch.log_softmax(logits.to(work), dim=-1) + log_normal
    log_p = torch.logsumexp(joint, dim=-1)
    responsibilities = torch.exp(joint - log_p.unsqueeze(-1))
    return (-log_p).to(means.dtype), z, responsibilities


_LIB.impl("mixture_nll_tril", _tril_fwd, "CompositeExplicitAutograd")


@torch.library.register_fake("physmdn::mixture_nll_tril")
def _(logits, means, scale_tril, target):
    work = acc_dtype(means.dtype)
    B = means.shape[0]
    return means.new_empty((B,)), means.new_empty(means.shape, dtype=work), means.new_empty(logits.shape, dtype=work)


def _tril_bwd(grad_loss: Tensor, logits: Tensor, scale_tril: Tensor, z: Tensor,
              responsibilities: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(logits, means, scale_tril, target)`` for ``grad_loss [B]``, in the inputs' dtype."""
    dtype, work = scale_tril.dtype, z.dtype
    L = scale_tril.to(work)
    g = grad_loss.to(work).unsqueeze(-1)  # [B, 1]
    gr = g * responsibilities  # [B, K]
    v = torch.linalg.solve_triangular(L.mT, z.unsqueeze(-1), upper=True).squeeze(-1)  # Sigma^-1 delta = L^-T z
    grad_logits = g * torch.softmax(logits.to(work), dim=-1) - gr
    grad_means = -gr.unsqueeze(-1) * v
    grad_target = -grad_means.sum(-2)
    grad_tril = torch.tril(v.unsqueeze(-1) * z.unsqueeze(-2))
    grad_tril.diagonal(dim1=-2, dim2=-1).sub_(1.0 / L.diagonal(dim1=-2, dim2=-1))
    grad_tril = -gr[..., None, None] * grad_tril
    return grad_logits.to(dtype), grad_means.to(dtype), grad_tril.to(dtype), grad_target.to(dtype)


_LIB.impl("mixture_nll_tril_backward", _tril_bwd, "CompositeExplicitAutograd")


@torch.library.register_fake("physmdn::mixture_nll_tril_backward")
def _(grad_loss, logits, scale_tril, z, responsibilities):
    dtype = scale_tril.dtype
    return (logits.new_empty(logits.shape, dtype=dtype), z.new_empty(z.shape, dtype=dtype),
            scale_tril.new_empty(scale_tril.shape), z.new_empty((z.shape[0], z.shape[-1]), dtype=dtype))


def _tril_setup_context(ctx, inputs, output):
    logits, _, scale_tril, _ = inputs
    _, z, responsibilities = output
    ctx.mark_non_differentiable(z, responsibilities)
    ctx.save_for_backward(logits, scale_tril, z, responsibilities)


def _tril_backward(ctx, grad_loss, _grad_z, _grad_responsibilities):
    logits, scale_tril, z, responsibilities = ctx.saved_tensors
    return torch.ops.physmdn.mixture_nll_tril_backward(grad_loss, logits, scale_tril, z, responsibilities)


torch.library.register_autograd("physmdn::mixture_nll_tril", _tril_backward, setup_context=_tril_setup_context)


# ----- low rank -------------------------------------------------------------------------------------------------

def _woodbury(cov_factor: Tensor, cov_diag: Tensor) -> tuple[Tensor, Tensor]:
    """``(D^-1 W [.., D, R], cholesky(I + W^T D^-1 W) [.., R, R])`` (the capacitance matrix is SPD for ``d > 0``)."""
    scaled = cov_factor / cov_diag.unsqueeze(-1)
    R = cov_factor.shape[-1]
    capacitance = cov_factor.mT @ scaled + torch.eye(R, dtype=scaled.dtype, device=scaled.device)
    return scaled, torch.linalg.cholesky_ex(capacitance)[0]


def _lowrank_fwd(logits: Tensor, means: Tensor, cov_factor: Tensor, cov_diag: Tensor,
                 target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss [B], v = Sigma^-1 delta [B, K, D], responsibilities [B, K], cholesky(C) [B, K, R, R])``, the last
    three in the accumulation dtype (saved for the backward)."""
    work = acc_dtype(means.dtype)
    W, d = cov_factor.to(work), cov_diag.to(work)
    delta = target.to(work).unsqueeze(-2) - means.to(work)  # [B, K, D]
    scaled, chol = _woodbury(W, d)
    t = (scaled.mT @ delta.unsqueeze(-1))  # W^T D^-1 delta: [B, K, R, 1]
    s = torch.linalg.solve_triangular(chol, t, upper=False)
    c_inv_t = torch.linalg.solve_triangular(chol.mT, s, upper=True)  # C^-1 t
    v = delta / d - (scaled @ c_inv_t).squeeze(-1)
    mahalanobis = (delta.square() / d).sum(-1) - s.square().sum((-2, -1))
    log_det = 2.0 * _sum_log(chol.diagonal(dim1=-2, dim2=-1)) + _sum_log(d)
    D = means.shape[-1]
    joint = torch.log_softmax(logits.to(work), dim=-1) - 0.5 * (mahalanobis + log_det) - D * _HALF_LOG_2PI
    log_p = torch.logsumexp(joint, dim=-1)
    responsibilities = torch.exp(joint - log_p.unsqueeze(-1))
    return (-log_p).to(means.dtype), v, responsibilities, chol.contiguous()  # (LAPACK returns it column-major)


_LIB.impl("mixture_nll_lowrank", _lowrank_fwd, "CompositeExplicitAutograd")


@torch.library.register_fake("physmdn::mixture_nll_lowrank")
def _(logits, means, cov_factor, cov_diag, target):
    work = acc_dtype(means.dtype)
    B, K, D = means.shape
    R = cov_factor.shape[-1]
    return (means.new_empty((B,)), means.new_empty((B, K, D), dtype=work), means.new_empty((B, K), dtype=work),
            means.new_empty((B, K, R, R), dtype=work))


def _lowrank_bwd(grad_loss: Tensor, logits: Tensor, cov_factor: Tensor, cov_diag: Tensor, v: Tensor,
                 responsibilities: Tensor, chol: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(logits, means, cov_factor, cov_diag, target)`` for ``grad_loss [B]``, in the inputs' dtype."""
    dtype, work = cov_factor.dtype, v.dtype
    W, d = cov_factor.to(work), cov_diag.to(work)
    g = grad_loss.to(work).unsqueeze(-1)
    gr = g * responsibilities
    # Sigma^-1 W = D^-1 W C^-1 (Woodbury); diag Sigma^-1 = (1 - rowsum(W C^-1 * W) / d) / d. Few passes over the
    # [B, K, D, R] tensors (they are memory-bound): C^-1 is R x R, the outer product v (W^T v)^T one baddbmm.
    precision_factor = (W @ torch.cholesky_inverse(chol)).div_(d.unsqueeze(-1))  # [B, K, D, R]
    precision_diagonal = (1.0 - torch.linalg.vecdot(precision_factor, W)) / d
    grad_logits = g * torch.softmax(logits.to(work), dim=-1) - gr
    grad_means = -gr.unsqueeze(-1) * v
    grad_target = -grad_means.sum(-2)
    w_v = (v.unsqueeze(-2) @ W)  # (W^T v)^T: [B, K, 1, R]
    shape = precision_factor.shape
    grad_factor = torch.baddbmm(precision_factor.reshape(-1, *shape[-2:]), v.reshape(-1, shape[-2], 1),
                                w_v.reshape(-1, 1, shape[-1]), alpha=-1.0).view(shape).mul_(gr[..., None, None])
    grad_diag = -0.5 * gr.unsqueeze(-1) * (v.square() - precision_diagonal)
    return (grad_logits.to(dtype), grad_means.to(dtype), grad_factor.to(dtype), grad_diag.to(dtype),
            grad_target.to(dtype))


_LIB.impl("mixture_nll_lowrank_backward", _lowrank_bwd, "CompositeExplicitAutograd")


@torch.library.register_fake("physmdn::mixture_nll_lowrank_backward")
def _(grad_loss, logits, cov_factor, cov_diag, v, responsibilities, chol):
    dtype = cov_factor.dtype
    return (logits.new_empty(logits.shape, dtype=dtype), v.new_empty(v.shape, dtype=dtype),
            cov_factor.new_empty(cov_factor.shape), cov_diag.new_empty(cov_diag.shape),
            v.new_empty((v.shape[0], v.shape[-1]), dtype=dtype))


def _lowrank_setup_context(ctx, inputs, output):
    logits, _, cov_factor, cov_diag, _ = inputs
    _, v, responsibilities, chol = output
    ctx.mark_non_differentiable(v, responsibilities, chol)
    ctx.save_for_backward(logits, cov_factor, cov_diag, v, responsibilities, chol)


def _lowrank_backward(ctx, grad_loss, *_grad_saved):
    return torch.ops.physmdn.mixture_nll_lowrank_backward(grad_loss, *ctx.saved_tensors)


torch.library.register_autograd("physmdn::mixture_nll_lowrank", _lowrank_backward,
                                setup_context=_lowrank_setup_context)


# ----- the public functions -------------------------------------------------------------------------------------

def _check_reduction(reduction) -> None:
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def _flatten(logits: Tensor, means: Tensor, target: Tensor, covariance: list[tuple[Tensor, str, tuple, str]]):
    """Check ``logits [*, K]``, ``means [*, K, D]``, ``target [*, D]`` and the covariance parameters (each
    ``(tensor, name, event shape, layout)``), broadcast their batch shapes to one ``S`` and flatten it.
    Returns ``(S or None, logits, means, target, covariance tensors)``."""
    for t, name in ((logits, "logits"), (means, "means"), (target, "target"), *((c[0], c[1]) for c in covariance)):
        _check_tensor(t, name)
    K, D = mixture_event(logits, means)
    if target.dim() < 1 or target.shape[-1] != D:
        raise ValueError(f"target must be [*, D] with D = {D} (the outputs of means), got shape {tuple(target.shape)}")
    events = [(logits, (K,)), (means, (K, D)), (target, (D,))]
    for t, name, event, layout in covariance:
        if t.dim() < len(event) or tuple(t.shape[t.dim() - len(event):]) != event:
            raise ValueError(f"{name} must be {layout} ending in {event} (as means), got shape {tuple(t.shape)}")
        events.append((t, event))
    for t, name in ((logits, "logits"), (target, "target"), *((c[0], c[1]) for c in covariance)):
        _check_like_means(t, name, means)
    shapes = [t.shape[: t.dim() - len(event)] for t, event in events]
    if len(shapes[1]) == 1 and all(s == shapes[1] for s in shapes):
        return None, [t for t, _ in events]
    try:
        S = torch.broadcast_shapes(*shapes)
    except RuntimeError:
        names = ["logits", "means", "target"] + [c[1] for c in covariance]
        listed = ", ".join(f"{n} {tuple(s)}" for n, s in zip(names, shapes))
        raise ValueError(f"the batch dimensions of {listed} must broadcast to one batch shape") from None
    n = math.prod(S)
    return tuple(S), [t.expand(*S, *event).reshape(n, *event) for t, event in events]


def _positive(loss: Tensor, diagonal: Tensor, name: str, what: str) -> None:
    """Eager calls refuse a non-positive ``what`` of ``name`` (traced ones give NaN for that sample instead). Such an
    entry makes its sample's loss NaN, so the diagonal is searched only when a loss is not finite: one pass over
    ``loss [B]`` instead of over the parameters (docs/performance.md)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() or diagonal.numel() == 0:
        return
    if isinstance(diagonal, torch.Tensor) and type(diagonal) in (torch.Tensor, torch.nn.Parameter):
        # (one reduction: a NaN or inf loss makes the sum non-finite; an overflowing sum only costs the search)
        if bool(torch.isfinite(loss.detach().sum(dtype=acc_dtype(loss.dtype)))):
            return
        smallest = diagonal.detach().amin()
        if not bool(smallest > 0):
            raise ValueError(f"{name} must have a positive {what}, got a minimum of {float(smallest)}")


def _reduce(loss: Tensor, batch_shape, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return unflatten_loss(loss, batch_shape, reduction)


def mixture_nll_tril(logits: Tensor, means: Tensor, scale_tril: Tensor, target: Tensor, reduction: str = "none",
                     *, check_diagonal: bool = True) -> Tensor:
    """Negative log-likelihood of a Gaussian mixture with full covariances given by their Cholesky factors.

    ``loss_b = -log sum_k softmax(logits_b)_k N(target_b | means_bk, L_bk L_bk^T)``, ``L = scale_tril``, as
    ``MixtureSameFamily(Categorical(logits), MultivariateNormal(means, scale_tril=scale_tril))``.

    Args:
        logits: ``[*, K]`` unnormalized component log-weights.
        means: ``[*, K, D]`` component means, ``1 <= D <=`` :data:`MAX_TRIL_DIM` (32).
        scale_tril: ``[*, K, D, D]`` lower-triangular Cholesky factors with a positive diagonal (the strict upper
            triangle is not read, and its gradient is zero).
        target: ``[*, D]`` observations. The leading batch dimensions ``[*]`` broadcast as torch broadcasts.
        reduction: ``"none"`` (``[*]``), ``"mean"`` or ``"sum"``.
        check_diagonal: in eager mode a diagonal entry ``<= 0`` raises ``ValueError`` (such an entry makes its
            sample's loss NaN: one reduction over the loss, the diagonal searched only when a loss is not finite; a
            device synchronization on a GPU); False skips the check (for factors positive by construction, as
            :class:`physmdn.MDN` builds them). Traced calls (torch.compile) never check: there
            a non-positive diagonal entry gives NaN for that sample.

    Returns:
        The loss in the input dtype; float16/bfloat16 inputs are computed in float32. Under ``torch.autocast`` the
        inputs are cast to float32. Gradients reach all four inputs (first order only).
    """
    _check_reduction(reduction)
    logits, means, scale_tril, target = autocast_inputs(logits, means, scale_tril, target)
    D = means.shape[-1] if isinstance(means, torch.Tensor) and means.dim() >= 2 else 0
    if D > MAX_TRIL_DIM:
        raise ValueError(f"means must have D <= {MAX_TRIL_DIM} output dimensions for mixture_nll_tril, got D = {D} "
                         f"(shape {tuple(means.shape)}); use mixture_nll_lowrank for larger outputs")
    batch_shape, (logits, means, target, scale_tril) = _flatten(
        logits, means, target, [(scale_tril, "scale_tril", (means.shape[-2], D, D), "[*, K, D, D]")])
    loss = torch.ops.physmdn.mixture_nll_tril(logits, means, scale_tril, target)[0]
    if check_diagonal:
        _positive(loss, scale_tril.diagonal(dim1=-2, dim2=-1), "scale_tril", "diagonal")
    return _reduce(loss, batch_shape, reduction)


def mixture_nll_lowrank(logits: Tensor, means: Tensor, cov_factor: Tensor, cov_diag: Tensor, target: Tensor,
                        reduction: str = "none", *, check_diagonal: bool = True) -> Tensor:
    """Negative log-likelihood of a Gaussian mixture with low-rank-plus-diagonal covariances.

    ``loss_b = -log sum_k softmax(logits_b)_k N(target_b | means_bk, W_bk W_bk^T + diag(d_bk))``, ``W = cov_factor``,
    ``d = cov_diag``, as ``MixtureSameFamily(Categorical(logits), LowRankMultivariateNormal(means, cov_factor,
    cov_diag))``; through the Woodbury identity and the matrix determinant lemma, ``O(D R^2 + R^3)`` per component.

    Args:
        logits: ``[*, K]``. means: ``[*, K, D]``.
        cov_factor: ``[*, K, D, R]``, rank ``1 <= R <=`` :data:`MAX_RANK` (8).
        cov_diag: ``[*, K, D]`` positive diagonal variances.
        target: ``[*, D]``. The leading batch dimensions ``[*]`` broadcast.
        reduction: ``"none"`` (``[*]``), ``"mean"`` or ``"sum"``.
        check_diagonal: as in :func:`mixture_nll_tril`, for ``cov_diag``.

    Returns:
        The loss in the input dtype (float16/bfloat16 computed in float32). The Mahalanobis term is a difference
        (``delta^T D^-1 delta - |s|^2``), so a ``cov_diag`` many orders of magnitude below ``W W^T`` loses
        relative precision in float32.
    """
    _check_reduction(reduction)
    logits, means, cov_factor, cov_diag, target = autocast_inputs(logits, means, cov_factor, cov_diag, target)
    _check_tensor(means, "means")
    _check_tensor(cov_factor, "cov_factor")
    if means.dim() < 2:
        raise ValueError(f"means must be [*, K, D], got shape {tuple(means.shape)}")
    K, D = means.shape[-2:]
    if cov_factor.dim() < 3 or tuple(cov_factor.shape[-3:-1]) != (K, D):
        raise ValueError(f"cov_factor must be [*, K, D, R] with (K, D) = {(K, D)}, got shape {tuple(cov_factor.shape)}")
    R = cov_factor.shape[-1]
    if not 1 <= R <= MAX_RANK:
        raise ValueError(f"cov_factor must have a rank 1 <= R <= {MAX_RANK} (its last dimension), got R = {R}")
    batch_shape, (logits, means, target, cov_factor, cov_diag) = _flatten(
        logits, means, target, [(cov_factor, "cov_factor", (K, D, R), "[*, K, D, R]"),
                                (cov_diag, "cov_diag", (K, D), "[*, K, D]")])
    loss = torch.ops.physmdn.mixture_nll_lowrank(logits, means, cov_factor, cov_diag, target)[0]
    if check_diagonal:
        _positive(loss, cov_diag, "cov_diag", "value everywhere")
    return _reduce(loss, batch_shape, reduction)

"""Implicit reparameterization of draws from full-covariance Gaussian mixtures (the weights get gradients too).

One flat batch: ``logits [B, K]``, ``means [B, K, D]``, ``scale_tril [B, K, D, D]`` (Cholesky factors), points
``y [n, B, D]``. :class:`physmdn.GaussianMixtureTril` and :class:`physmdn.GaussianMixtureLowRank` (through the
Cholesky factor of ``W W^T + diag(d)``) reshape their batch to this.
"""

from __future__ import annotations

import torch

from .reference import HALF_LOG_2PI

__all__ = ["conditional_cdfs", "implicit_rsample"]


def conditional_cdfs(logits, means, scale_tril, y) -> torch.Tensor:
    """The Rosenblatt transform ``u_d = F_d(y_d | y_<d)``: ``[n, B, D]``, uniform on ``[0, 1]^D`` for ``y`` drawn
    from the mixture. With ``z_k = L_k^-1 (y - mu_k)``, component ``k``'s conditional of ``y_d`` given ``y_<d`` is
    ``N(y_d - L_kdd z_kd, L_kdd^2)``, so ``F_d = sum_k w_kd Phi(z_kd)`` with
    ``w_kd ∝ pi_k prod_{e<d} N(z_ke) / L_kee`` (the component's density of ``y_<d``). Differentiable in all
    arguments. Impossible components (``pi_k = 0``) are replaced by ``N(0, I)`` so that NaN parameters there cannot
    leak into the others."""
    log_pi = torch.log_softmax(logits, -1)
    impossible = torch.isneginf(log_pi)
    D = means.shape[-1]
    means = torch.where(impossible[..., None], torch.zeros_like(means), means)
    eye = torch.eye(D, dtype=scale_tril.dtype, device=scale_tril.device)
    scale_tril = torch.where(impossible[..., None, None], eye, scale_tril)
    z = torch.linalg.solve_triangular(scale_tril, (y.unsqueeze(-2) - means).unsqueeze(-1), upper=False).squeeze(-1)
    log_normal = -0.5 * z * z - torch.log(scale_tril.diagonal(dim1=-2, dim2=-1)) - HALF_LOG_2PI  # [n, B, K, D]
    prefix = torch.cat([torch.zeros_like(log_normal[..., :1]), torch.cumsum(log_normal, -1)[..., :-1]], -1)
    log_w = torch.log_softmax(log_pi.unsqueeze(-1) + prefix, dim=-2)
    return (torch.exp(log_w) * torch.special.ndtr(z)).sum(-2)


class _ImplicitSample(torch.autograd.Function):
    """Returns the given draws ``y [n, B, D]``; the backward pass applies the implicit reparameterization gradient
    (Figurnov, Mohamed and Mnih, 2018) of ``u = F(y)`` (:func:`conditional_cdfs`):
    ``dy/dtheta = -(dF/dy)^-1 dF/dtheta``. ``dF/dy`` is lower triangular (``F_d`` reads ``y_<=d``), its diagonal the
    conditional densities; its rows come from autograd (``D`` passes), ``(dF/dy)^T lambda = grad_y`` is one
    triangular solve, and ``-lambda^T dF/dtheta`` one more backward pass."""

    @staticmethod
    def forward(ctx, logits, means, scale_tril, y):
        ctx.save_for_backward(logits, means, scale_tril, y)
        return y.clone()

    @staticmethod
    def backward(ctx, grad_y):
        logits, means, scale_tril, y = ctx.saved_tensors
        work = torch.promote_types(y.dtype, torch.float32)
        wanted = [i for i in range(3) if ctx.needs_input_grad[i]]
        grads = [None] * 4
        if not wanted:
            return tuple(grads)
        with torch.enable_grad():
            leaves = [t.detach().to(work).requires_grad_(i in wanted)
                      for i, t in enumerate((logits, means, scale_tril))]
            point = y.detach().to(work).requires_grad_(True)
            u = conditional_cdfs(*leaves, point)
            D = u.shape[-1]
            rows = [torch.autograd.grad(u[..., d].sum(), point, retain_graph=True)[0] for d in range(D)]
            jacobian = torch.stack(rows, -2)  # [n, B, D (F_e), D (y_d)]
            # a far tail's tiny density gives a large finite lambda, which multiplies a dF/dtheta just as small
            jacobian.diagonal(dim1=-2, dim2=-1).clamp_min_(torch.finfo(work).tiny)
            lam = torch.linalg.solve_triangular(jacobian.mT, grad_y.to(work).unsqueeze(-1), upper=True).squeeze(-1)
            found = torch.autograd.grad(u, [leaves[i] for i in wanted], grad_outputs=-lam)
        for i, g in zip(wanted, found):
            grads[i] = g.to((logits, means, scale_tril)[i].dtype)
        return tuple(grads)


def implicit_rsample(logits, means, scale_tril, y) -> torch.Tensor:
    """The draws ``y [n, B, D]`` (from the mixture, without gradients) made differentiable with respect to
    ``logits``, ``means`` and ``scale_tril`` (see :class:`_ImplicitSample`)."""
    return _ImplicitSample.apply(logits, means, scale_tril, y)

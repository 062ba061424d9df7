"""Priors on the components beyond a residual law: linear stability of the dynamics at each component mean
(:class:`Stability` for polynomial dynamics, :class:`DynamicsStability` for any torch dynamics; the fields'
:class:`~physmdn.physics.FieldStability` stays beside the stencil it uses), monotonic outputs (:class:`Monotonic`) and bounds
(:class:`Bounds`). Each is a :class:`~physmdn.physics.PhysicsSpec` used like the residual families (re-exported by
:mod:`physmdn.physics`)."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ._physics_base import PhysicsSpec, _as_tensor, _check_broadcast, _check_coupling, _check_mode, _poly_eval

__all__ = ["Stability", "DynamicsStability", "Monotonic", "Bounds"]


class Stability(PhysicsSpec):
    """Linear-stability prior: the Jacobian ``f'(y) = sum_j derivative_coeffs[..., j] y^j`` of the dynamics must
    be negative at each component mean: ``P_bk = sum_d relu(f'(mu_bkd) + margin)^2``.

    Pitchfork ``f = r y - y^3``: ``derivative_coeffs = [r, 0, -3]`` (shape ``[B|1, K|1, D|1, J+1]``); this keeps
    components off the unstable branch ``y = 0`` for ``r > 0``, where the equilibrium residual alone is zero.
    """

    family = "stability"
    mode = "mean"

    def __init__(self, derivative_coeffs, margin: float = 0.0, coupling: str | None = None):
        coeffs = _as_tensor(derivative_coeffs, "derivative_coeffs")
        if coeffs.dim() == 1:
            coeffs = coeffs.reshape(1, 1, 1, -1)
        if coeffs.dim() != 4 or coeffs.shape[-1] < 1:
            raise ValueError(f"derivative_coeffs must be [B|1, K|1, D|1, J+1] (or [J+1]), got shape {tuple(coeffs.shape)}")
        self.coeffs, self.margin = coeffs, float(margin)
        self.coupling = _check_coupling(coupling)

    def validate(self, B, K, D):
        _check_broadcast(self.coeffs, "Stability derivative_coeffs", (B, K, D, self.coeffs.shape[-1]), "[B|1, K|1, D|1, J+1]")

    def penalty(self, means, log_scales):
        slope = _poly_eval(self.coeffs.to(means.dtype), means)
        return F.relu(slope + self.margin).square().sum(-1)


class DynamicsStability(PhysicsSpec):
    """Linear stability of any dynamics written in torch, ``dy/dt = f(y, context)``: at each component mean the
    Jacobian ``J = df/dy`` (autograd, one vector-Jacobian product per output) must have every eigenvalue's real
    part below ``-margin``: ``P_bk = relu(max_i Re lambda_i(J_bk) + margin)^2``. This keeps components off
    saddles and unstable branches, where a steady residual also vanishes.

    ``fn(y [B, K, D], context [B, 1, C] | None) -> [B, K, D]``; for ``D`` up to ``max_dim`` (the eigenvalues of a
    dense ``D x D`` Jacobian per component). Steady 1-D fields have :class:`FieldStability`.
    """

    family = "dynamics_stability"
    mode = "mean"

    def __init__(self, fn: Callable, context: torch.Tensor | None = None, margin: float = 0.0, max_dim: int = 32,
                 coupling: str | None = None):
        if not callable(fn):
            raise TypeError(f"fn must be callable as fn(y, context) -> dy/dt, got {type(fn).__name__}")
        self.fn, self.context, self.margin, self.max_dim = fn, context, float(margin), int(max_dim)
        self.coupling = _check_coupling(coupling)

    def validate(self, B, K, D):
        if D > self.max_dim:
            raise ValueError(f"DynamicsStability takes D <= max_dim = {self.max_dim} outputs (a dense Jacobian per "
                             f"component), got D = {D}; fields: FieldStability")
        if self.context is not None and self.context.shape[0] != B:
            raise ValueError(f"DynamicsStability context must have B = {B} rows, got shape {tuple(self.context.shape)}")

    def jacobian(self, means: torch.Tensor) -> torch.Tensor:
        """``[B, K, D, D]`` Jacobian of ``fn`` at ``means [B, K, D]`` (differentiable when ``means`` is)."""
        train = torch.is_grad_enabled() and means.requires_grad
        y = means if train else means.detach().requires_grad_(True)
        ctx = None if self.context is None else self.context.to(means.dtype)[:, None, :]
        with torch.enable_grad():
            f = self.fn(y, ctx)
            if f.shape != y.shape:
                raise ValueError(f"DynamicsStability fn must return dy/dt shaped like y {tuple(y.shape)}, got "
                                 f"{tuple(f.shape)}")
            rows = [torch.autograd.grad(f[..., i].sum(), y, create_graph=train, retain_graph=True)[0]
                    for i in range(y.shape[-1])]
        J = torch.stack(rows, dim=-2)
        return J if train else J.detach()

    def penalty(self, means, log_scales):
        J = self.jacobian(means)
        if J.shape[-1] == 1:
            top = J[..., 0, 0]
        else:
            top = torch.linalg.eigvals(J).real.amax(-1)
        return F.relu(top + self.margin).square()


class Monotonic(PhysicsSpec):
    """Monotonicity of each component's mean in one context variable:
    ``P_bk = relu(-s * d mu_bk[output] / d x_b[dim])^2`` with ``s = +1`` (increasing) or ``-1``.

    ``context`` is the ``[B, C]`` tensor the means were computed from; it must require grad before the model
    runs (``x.requires_grad_(True)``). Derivatives come from autograd (one backward per component, K is small)
    with ``create_graph=True`` so the penalty trains the network.
    """

    family = "monotonic"
    mode = "mean"

    def __init__(self, context: torch.Tensor, dim: int = 0, output: int = 0, increasing: bool = True,
                 coupling: str | None = None):
        self.coupling = _check_coupling(coupling)
        if not isinstance(context, torch.Tensor) or context.dim() != 2:
            raise ValueError(f"context must be a [B, C] tensor, got {getattr(context, 'shape', type(context))}")
        if not 0 <= dim < context.shape[1]:
            raise ValueError(f"dim must index a context column in [0, {context.shape[1]}), got {dim}")
        self.context, self.dim, self.output, self.sign = context, int(dim), int(output), 1.0 if increasing else -1.0

    def validate(self, B, K, D):
        if self.context.shape[0] != B:
            raise ValueError(f"Monotonic context must be [B, C] with B = {B}, got shape {tuple(self.context.shape)}")
        if not 0 <= self.output < D:
            raise ValueError(f"Monotonic output must be in [0, {D}), got {self.output}")
        if not self.context.requires_grad:
            raise ValueError("Monotonic context must require grad (call context.requires_grad_(True) before the model)")

    def penalty(self, means, log_scales):
        K = means.shape[1]
        slopes = []
        for k in range(K):
            (grad,) = torch.autograd.grad(means[:, k, self.output].sum(), self.context, create_graph=True,
                                          allow_unused=True)
            if grad is None:
                grad = torch.zeros_like(self.context)
            slopes.append(grad[:, self.dim])
        slope = torch.stack(slopes, dim=1)
        return F.relu(-self.sign * slope).square()


class Bounds(PhysicsSpec):
    """Bounds on outputs, ``lower <= y <= upper`` (either may be None), broadcastable to ``[B, K, D]``.

    ``mode="mean"``: ``relu(mu - upper)^2 + relu(lower - mu)^2``; ``mode="exact"``: the Gaussian expectation
    ``E[relu(y - upper)^2] = (m^2 + s^2) Phi(m/s) + m s phi(m/s)``, ``m = mu - upper`` (and likewise below).
    """

    family = "bounds"

    def __init__(self, lower=None, upper=None, mode: str = "mean", coupling: str | None = None):
        self.coupling = _check_coupling(coupling)
        if lower is None and upper is None:
            raise ValueError("Bounds needs lower, upper or both, got neither")
        self.lower = None if lower is None else _as_tensor(lower, "lower")
        self.upper = None if upper is None else _as_tensor(upper, "upper")
        self.mode = _check_mode(mode, ("exact", "mean"))

    @staticmethod
    def _excess(m: torch.Tensor, s: torch.Tensor, exact: bool) -> torch.Tensor:
        if not exact:
            return F.relu(m).square()
        t = m / s
        cdf = 0.5 * torch.special.erfc(-t / math.sqrt(2.0))
        pdf = torch.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)
        return (m * m + s * s) * cdf + m * s * pdf

    def penalty(self, means, log_scales):
        exact = self.mode == "exact"
        s = torch.exp(log_scales)
        value = torch.zeros_like(means)
        if self.upper is not None:
            value = value + self._excess(means - self.upper.to(means), s, exact)
        if self.lower is not None:
            value = value + self._excess(self.lower.to(means) - means, s, exact)
        return value.sum(-1)

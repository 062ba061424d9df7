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

    ``fn(y [B, K, D], context [B, 1, C] | None) -> [B, K, D]``. ``method``:

    * ``"dense"``: the eigenvalues of the dense ``D x D`` Jacobian per component (``D`` vector-Jacobian products),
      for ``D`` up to ``max_dim``; exact.
    * ``"krylov"``: matrix-free, for fields of any size: ``iters`` Arnoldi steps on ``J^T`` (which has ``J``'s
      eigenvalues; one vector-Jacobian product per step, no ``D x D`` matrix), the Ritz value of largest real part
      is the value, and the gradient is that of the Rayleigh quotient ``u^T J u`` at its Ritz vector ``u`` (a
      second-order vector-Jacobian product). Exact at ``iters >= D``. For a symmetric Jacobian (gradient dynamics,
      diffusion with a local reaction) the value is a lower bound of the top eigenvalue that tightens with
      ``iters``, and the gradient is exact at convergence; for a non-symmetric one the gradient is approximate. The start
      vector comes from a fixed seed, so the penalty is deterministic.
    * ``"auto"`` (default): ``"dense"`` for ``D <= max_dim``, else ``"krylov"``.

    Steady 1-D stencil fields also have :class:`FieldStability` (exact, from the stencil).
    """

    family = "dynamics_stability"
    mode = "mean"

    def __init__(self, fn: Callable, context: torch.Tensor | None = None, margin: float = 0.0, max_dim: int = 32,
                 coupling: str | None = None, method: str = "auto", iters: int = 64):
        if not callable(fn):
            raise TypeError(f"fn must be callable as fn(y, context) -> dy/dt, got {type(fn).__name__}")
        if method not in ("auto", "dense", "krylov"):
            raise ValueError(f"method must be 'auto', 'dense' or 'krylov', got {method!r}")
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"iters must be an int >= 1, got {iters!r}")
        self.fn, self.context, self.margin, self.max_dim = fn, context, float(margin), int(max_dim)
        self.method, self.iters = method, iters
        self.coupling = _check_coupling(coupling)

    def _method(self, D: int) -> str:
        return self.method if self.method != "auto" else ("dense" if D <= self.max_dim else "krylov")

    def validate(self, B, K, D):
        if self._method(D) == "dense" and D > self.max_dim:
            raise ValueError(f"DynamicsStability(method='dense') takes D <= max_dim = {self.max_dim} outputs (a dense "
                             f"Jacobian per component), got D = {D}; use method='krylov' (or 'auto') for fields")
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

    def _call(self, y: torch.Tensor) -> torch.Tensor:
        ctx = None if self.context is None else self.context.to(y.dtype)[:, None, :]
        f = self.fn(y, ctx)
        if f.shape != y.shape:
            raise ValueError(f"DynamicsStability fn must return dy/dt shaped like y {tuple(y.shape)}, got "
                             f"{tuple(f.shape)}")
        return f

    def top_eigenvalue(self, means: torch.Tensor) -> torch.Tensor:
        """``[B, K]``: the largest real part of the Jacobian's eigenvalues at ``means [B, K, D]`` (``method``)."""
        D = means.shape[-1]
        if self._method(D) == "dense":
            J = self.jacobian(means)
            return J[..., 0, 0] if D == 1 else torch.linalg.eigvals(J).real.amax(-1)
        return self._krylov_top(means)

    def _krylov_top(self, means: torch.Tensor) -> torch.Tensor:
        train = torch.is_grad_enabled() and means.requires_grad
        y = means.detach().requires_grad_(True)
        with torch.enable_grad():
            f = self._call(y)
        shape, D = means.shape[:-1], means.shape[-1]

        def jt(v):  # J^T v per component (J^T has J's eigenvalues), no graph kept
            return torch.autograd.grad(f, y, v.reshape(means.shape), retain_graph=True)[0].detach().reshape(-1, D)

        g = torch.Generator(device="cpu").manual_seed(0)

        def random_unit(n):
            r = torch.randn(n, D, generator=g, dtype=means.dtype).to(means.device)
            return r / r.norm(dim=-1, keepdim=True)

        N, m = math.prod(shape), min(self.iters, D)
        V = means.new_zeros(N, m + 1, D)
        H = means.new_zeros(N, m + 1, m)
        V[:, 0] = random_unit(N)
        for j in range(m):  # Arnoldi with one re-orthogonalization pass (modified Gram-Schmidt twice)
            w = jt(V[:, j])
            scale = w.norm(dim=-1).clamp_min(1.0)
            for _ in range(2):
                h = torch.einsum("nid,nd->ni", V[:, : j + 1], w)
                w = w - torch.einsum("ni,nid->nd", h, V[:, : j + 1])
                H[:, : j + 1, j] += h
            norm = w.norm(dim=-1)
            broke = norm <= 1e-10 * scale  # an invariant subspace: continue from a fresh orthogonal direction
            if broke.any():
                r = random_unit(N)
                for _ in range(2):
                    r = r - torch.einsum("ni,nid->nd", torch.einsum("nid,nd->ni", V[:, : j + 1], r), V[:, : j + 1])
                w = torch.where(broke[:, None], r, w)
                norm = torch.where(broke, w.norm(dim=-1), norm)
            H[:, j + 1, j] = torch.where(broke, torch.zeros_like(norm), norm)
            V[:, j + 1] = w / norm[:, None]
        values, vectors = torch.linalg.eig(H[:, :m, :m])
        top = values.real.argmax(-1)
        ritz = torch.gather(vectors, -1, top[:, None, None].expand(N, m, 1))[..., 0]  # [N, m] complex
        u = torch.einsum("nid,ni->nd", V[:, :m].to(ritz.dtype), ritz).real
        u = (u / u.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(u.dtype).tiny)).reshape(means.shape)
        ritz_value = torch.gather(values.real, -1, top[:, None])[:, 0].reshape(shape)
        if not train:
            return ritz_value
        # the gradient: that of the Rayleigh quotient u^T J u = u . (J^T u) at the (detached) Ritz vector, exact for a
        # symmetric (normal) Jacobian; the value is the Ritz value
        quotient = (torch.autograd.grad(self._call(means), means, u, create_graph=True)[0] * u).sum(-1)
        return ritz_value + (quotient - quotient.detach())

    def penalty(self, means, log_scales):
        return F.relu(self.top_eigenvalue(means) + self.margin).square()


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

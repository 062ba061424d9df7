"""Bistable reaction–diffusion (Schlögl / Nagumo) on a 1-D lattice: uniform states and fronts pinned by the lattice.

Layering: imports :mod:`physmdn.physics`, :mod:`physmdn._validation` and the problems' base and numerics.
"""

from __future__ import annotations

import math

import torch

from .. import _validation as check
from .. import physics
from .base import Defaults, Problem, merge_weights, register, resolve_physics_mode
from .numerics import (ImplicitDiffusion, rand, randn, semi_implicit_euler, stencil_residual, three_way_labels,
                       work_dtype)

__all__ = ["ReactionDiffusion"]


@register
class ReactionDiffusion(Problem):
    """Bistable reaction–diffusion (Schlögl-type) on a 1-D lattice with Neumann boundaries: long-time states.

    ``u_t = D u_xx + f(u)``,  ``f(u) = u (1 - u) (u - a) = -a u + (1 + a) u^2 - u^3``

    (Schlögl's ``-k (u - u1)(u - u2)(u - u3)`` with ``u1 = 0``, ``u2 = a``, ``u3 = 1``, ``k = 1``: ``0`` and ``1``
    stable, ``a`` unstable), on ``grid`` points of spacing ``spacing`` with mirror (Neumann) boundaries.
    Initial field ``u_i(0) = c + init_noise N(0, 1)``, ``c ~ U(0, 1)`` per sample. Semi-implicit Euler
    ``u <- (I - dt D L / h^2)^{-1} (u + dt f(u))``, run until the steady residual is below ``tol`` everywhere (or
    ``max_time``); the observation adds ``noise * N(0, 1)`` per point.

    Context ``(D, a)``: ``D`` log-uniform in ``D_range`` (lattice units), ``a`` uniform in ``a_range``. For strong
    coupling the field stays near-uniform and goes to ``1`` iff the initial level beats the threshold
    (weights near ``1 - a`` and ``a``); for weak coupling (``D / h^2`` below about 0.1) fronts are pinned by
    the lattice and patterned states of ``0``- and ``1``-domains survive. Branches: ``0 = low`` (all
    ``u < a``), ``1 = high`` (all ``u > a``), ``2 = fronts``.

    Physics: the steady residual ``r_i = D (u_{i-1} - 2 u_i + u_{i+1}) / h^2 + f(u_i)``
    (:class:`~physmdn.physics.Stencil1D`, Neumann, ``reaction = [0, -a, 1 + a, -1]``); residual columns ``r_i``.
    """

    name = "reaction_diffusion"
    context_names = ("D", "a")
    branch_names = ("low", "high", "fronts")
    is_field = True
    # the steady residual vanishes on the unstable state u = a too: a strong weight pulls components there
    defaults = Defaults(components=8, hidden=(128, 128), epochs=150, n_train=4096, batch_size=256, lr=2e-3,
                        physics_weight=0.01)

    def __init__(self, grid: int = 32, spacing: float = 1.0, D_range=(0.02, 1.0), a_range=(0.35, 0.65),
                 init_noise: float = 0.2, noise: float = 0.02, dt: float = 0.5, max_time: float = 2000.0,
                 tol: float = 1e-5, check_every: int = 50, physics_mode: str = "first",
                 physics_weights: dict | None = None):
        grid = check.count(grid, "grid", minimum=3)
        D_range = check.finite_range(D_range, "D_range")
        a_range = check.finite_range(a_range, "a_range")
        if D_range[0] <= 0:
            raise ValueError(f"D_range must be positive, got {D_range}")
        if not (0.0 < a_range[0] and a_range[1] < 1.0):
            raise ValueError(f"a_range must lie inside (0, 1) (a is the unstable middle root), got {a_range}")
        low, high = zip(D_range, a_range)
        super().__init__(low, high, (True, False), (math.sqrt(D_range[0] * D_range[1]), 0.5 * sum(a_range)))
        self.grid, self.spacing = grid, check.positive(spacing, "spacing")
        self.output_names = tuple(f"u{i}" for i in range(grid))
        self.residual_names = tuple(f"r{i}" for i in range(grid))
        self.init_noise = check.nonnegative(init_noise, "init_noise")
        self.noise = check.nonnegative(noise, "noise")
        self.dt = check.positive(dt, "dt")
        self.max_time = check.positive(max_time, "max_time")
        self.tol = check.positive(tol, "tol")
        self.check_every = check.count(check_every, "check_every")
        self.physics_mode = resolve_physics_mode(physics_mode)
        self.physics_weights = merge_weights({"steady": 1.0, "stability": 100.0}, physics_weights)
        self.config = dict(grid=grid, spacing=self.spacing, D_range=D_range, a_range=a_range,
                           init_noise=self.init_noise, noise=self.noise, dt=self.dt, max_time=self.max_time,
                           tol=self.tol, check_every=self.check_every, physics_mode=physics_mode,
                           physics_weights=self.physics_weights)

    @staticmethod
    def reaction(u: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``f(u) = u (1 - u) (u - a)``."""
        return u * (1.0 - u) * (u - a)

    def _simulate(self, context, generator):
        work = work_dtype(context.dtype)
        ctx = context.to(work)
        N, device = ctx.shape[0], ctx.device
        D, a = ctx[:, 0:1], ctx[:, 1:2]
        solver = ImplicitDiffusion(self.grid, "neumann", device, work)
        level = rand((N, 1), generator, device, work)
        u = level + self.init_noise * randn((N, self.grid), generator, device, work)
        factors = solver.factors(self.dt * D / self.spacing**2)
        active = torch.arange(N, device=device)
        steps = int(math.ceil(self.max_time / self.dt))
        done = 0
        while done < steps and active.numel():
            ua, fa, aa, Da = u[active], factors[active], a[active], D[active]
            ua = semi_implicit_euler(ua, solver, fa, lambda v: self.reaction(v, aa), self.dt,
                                     min(self.check_every, steps - done))
            done += self.check_every
            # values decaying to the root 0 would turn subnormal (slow on CPUs) in stalled samples; 0 is exact
            ua = torch.where(ua.abs() < 1e-20, torch.zeros_like(ua), ua)
            u[active] = ua
            res = stencil_residual(ua, Da, self.reaction(ua, aa), self.spacing, "neumann").abs().amax(-1)
            active = active[res > self.tol]
        labels = self._labels(u, a)
        if self.noise > 0:
            u = u + self.noise * randn(u.shape, generator, device, work)
        return u, labels

    @staticmethod
    def _labels(u: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return three_way_labels((u < a).all(-1), (u > a).all(-1))

    def classify(self, y, context):
        """``low`` where every point is below the threshold ``a``, ``high`` where every point is above, else
        ``fronts``."""
        y = self._check_outcome(y)
        return self._labels(y, context[..., 1:2])

    def physics(self, context, components=None):
        context = self.check_context(context)
        D, a = context[:, 0:1], context[:, 1]
        reaction = torch.stack([torch.zeros_like(a), -a, 1.0 + a, -torch.ones_like(a)], dim=-1).unsqueeze(1)
        spec = physics.Stencil1D(D, reaction, spacing=self.spacing, boundary="neumann", moment=self.physics_mode,
                           noise_scale=self.noise)
        # f'(u) = -3u^2 + 2(1 + a)u - a; the unstable uniform state u = a is excluded by the stability prior
        slope = torch.stack([-a, 2.0 * (1.0 + a), -3.0 * torch.ones_like(a)], dim=-1).unsqueeze(1)
        stability = physics.FieldStability(D, slope, spacing=self.spacing, boundary="neumann")
        return [(spec, self.physics_weights["steady"]), (stability, self.physics_weights["stability"])]

    def residual(self, y, context):
        u = self._check_outcome(y)
        D, a = context[..., 0:1], context[..., 1:2]
        return stencil_residual(u, D, self.reaction(u, a), self.spacing, "neumann")

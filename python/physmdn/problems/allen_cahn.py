"""The stochastic Allen–Cahn field ``u_t = eps u_xx + u - u^3 + sigma xi``: metastable states after a quench.

Layering: imports :mod:`physmdn.physics`, :mod:`physmdn._validation` and the problems' base and numerics.
"""

from __future__ import annotations

import math

import torch

from .. import _validation as check
from .. import physics
from .base import Defaults, Problem, merge_weights, register, resolve_physics_mode
from .numerics import ImplicitDiffusion, randn, semi_implicit_euler, stencil_residual, three_way_labels, work_dtype

__all__ = ["AllenCahn"]


@register
class AllenCahn(Problem):
    """Stochastic Allen–Cahn field on a periodic 1-D grid, metastable states after a quench.

    ``u_t = eps u_xx + u - u^3 + sigma xi`` on ``[0, length)`` with ``grid`` points, spacing
    ``h = length / grid``, ``u_xx`` the periodic second difference. Initial field ``u_i(0) = bias +
    init_amplitude N(0, 1)``. Semi-implicit Euler–Maruyama, step ``dt``:

    ``u^{n+1} = (I - dt eps L / h^2)^{-1} (u^n + dt (u^n - (u^n)^3) + sigma sqrt(dt) xi^n)``,
    ``xi^n_i ~ N(0, 1)`` (noise independent per grid point and step), implicit diffusion by the exact
    eigen-decomposition of ``L``. Noise acts for ``noise_time``, then the field relaxes noise-free for
    ``relax_time`` (a quench), so the output sits at (or very near) a steady state of
    ``eps u_xx + u - u^3 = 0``; the observation adds ``noise * N(0, 1)`` per point.

    Context ``(eps, sigma, bias)``: ``eps`` log-uniform in ``eps_range``, ``sigma``, ``bias`` uniform. Outcome
    ``y = u(T) [grid]``. Branches: ``0 = plus`` (all ``u > 0``, the state ``+1``), ``1 = minus`` (``-1``),
    ``2 = kinks`` (kink–antikink pairs, metastable for small ``eps``). The bias tilts the odds; large ``eps`` leaves
    no room for kinks (``eps (2 pi / length)^2 > 1``: only the uniform mode is unstable at ``u = 0``).

    Physics: the steady residual ``r_i = eps (u_{i-1} - 2 u_i + u_{i+1}) / h^2 + u_i - u_i^3``
    (:class:`~physmdn.physics.Stencil1D`, periodic, ``reaction = [0, 1, 0, -1]``); residual columns ``r_i``.
    """

    name = "allen_cahn"
    context_names = ("eps", "sigma", "bias")
    branch_names = ("plus", "minus", "kinks")
    is_field = True
    # docs/results.md §3: weight 0.01 raised the energy distance 4x (n = 1024); 0.001 ties plain MDN with a
    # 2.5x lower residual
    defaults = Defaults(components=8, hidden=(128, 128), epochs=150, n_train=4096, batch_size=256, lr=2e-3,
                        physics_weight=0.001)

    def __init__(self, grid: int = 32, length: float = 1.0, eps_range=(1e-3, 2e-2), sigma_range=(0.0, 1.0),
                 bias_range=(-0.2, 0.2), init_amplitude: float = 0.1, noise: float = 0.02, dt: float = 0.1,
                 noise_time: float = 10.0, relax_time: float = 20.0, physics_mode: str = "first",
                 physics_weights: dict | None = None):
        grid = check.count(grid, "grid", minimum=3)
        eps_range = check.finite_range(eps_range, "eps_range")
        sigma_range = check.finite_range(sigma_range, "sigma_range")
        bias_range = check.finite_range(bias_range, "bias_range")
        if eps_range[0] <= 0:
            raise ValueError(f"eps_range must be positive, got {eps_range}")
        if sigma_range[0] < 0:
            raise ValueError(f"sigma_range must be >= 0, got {sigma_range}")
        low, high = zip(eps_range, sigma_range, bias_range)
        reference = (math.sqrt(eps_range[0] * eps_range[1]), 0.5 * sum(sigma_range), 0.5 * sum(bias_range))
        super().__init__(low, high, (True, False, False), reference)
        self.grid, self.length = grid, check.positive(length, "length")
        self.spacing = self.length / grid
        self.output_names = tuple(f"u{i}" for i in range(grid))
        self.residual_names = tuple(f"r{i}" for i in range(grid))
        self.init_amplitude = check.nonnegative(init_amplitude, "init_amplitude")
        self.noise = check.nonnegative(noise, "noise")
        self.dt = check.positive(dt, "dt")
        self.noise_time = check.nonnegative(noise_time, "noise_time")
        self.relax_time = check.nonnegative(relax_time, "relax_time")
        self.physics_mode = resolve_physics_mode(physics_mode)
        self.physics_weights = merge_weights({"steady": 1.0, "stability": 100.0}, physics_weights)
        self.config = dict(grid=grid, length=self.length, eps_range=eps_range, sigma_range=sigma_range,
                           bias_range=bias_range, init_amplitude=self.init_amplitude, noise=self.noise, dt=self.dt,
                           noise_time=self.noise_time, relax_time=self.relax_time, physics_mode=physics_mode,
                           physics_weights=self.physics_weights)

    def _simulate(self, context, generator):
        work = work_dtype(context.dtype)
        ctx = context.to(work)
        N, device = ctx.shape[0], ctx.device
        eps, sigma, bias = ctx[:, 0:1], ctx[:, 1:2], ctx[:, 2:3]
        solver = ImplicitDiffusion(self.grid, "periodic", device, work)
        factors = solver.factors(self.dt * eps / self.spacing**2)
        u = bias + self.init_amplitude * randn((N, self.grid), generator, device, work)
        noise_amplitude = sigma * math.sqrt(self.dt)
        u = semi_implicit_euler(u, solver, factors, lambda v: v - v**3, self.dt, int(round(self.noise_time / self.dt)),
                                noise_amplitude, generator)
        u = semi_implicit_euler(u, solver, factors, lambda v: v - v**3, self.dt, int(round(self.relax_time / self.dt)))
        labels = self._labels(u)
        if self.noise > 0:
            u = u + self.noise * randn(u.shape, generator, device, work)
        return u, labels

    @staticmethod
    def _labels(u: torch.Tensor) -> torch.Tensor:
        return three_way_labels((u > 0).all(-1), (u < 0).all(-1))

    def classify(self, y, context):
        """``plus`` where every point is ``> 0``, ``minus`` where every point is ``< 0``, else ``kinks``."""
        return self._labels(self._check_outcome(y))

    def physics(self, context, components=None):
        eps = self.check_context(context)[:, 0:1]  # [B, 1]
        reaction = torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=context.dtype, device=context.device).reshape(1, 1, 4)
        spec = physics.Stencil1D(eps, reaction, spacing=self.spacing, boundary="periodic", moment=self.physics_mode,
                           noise_scale=self.noise)
        # the steady residual is zero on the unstable u = 0 too: the field stability prior excludes it
        slope = torch.tensor([1.0, 0.0, -3.0], dtype=context.dtype, device=context.device).reshape(1, 1, 3)
        stability = physics.FieldStability(eps, slope, spacing=self.spacing, boundary="periodic")
        return [(spec, self.physics_weights["steady"]), (stability, self.physics_weights["stability"])]

    def residual(self, y, context):
        u = self._check_outcome(y)
        eps = context[..., 0:1]
        return stencil_residual(u, eps, u - u**3, self.spacing, "periodic")

"""The pitchfork bifurcation ``dy/dt = r y - y^3 + h``: long-time states from random initial conditions.

Layering: imports :mod:`physmdn.physics`, :mod:`physmdn._validation` and the problems' base and numerics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _validation as check
from .. import physics
from .base import Defaults, Problem, merge_weights, register, resolve_physics_mode
from .numerics import cubic_equilibria, newton_polish, rand, randn, rk4_relax, work_dtype

__all__ = ["Pitchfork"]


@register
class Pitchfork(Problem):
    """Supercritical pitchfork bifurcation, long-time state from random initial conditions.

    ``dy/dt = f(y) = r y - y^3 + h``, ``y(0) ~ U(-init_range, init_range)``, observed
    ``y = y(infinity) + noise * N(0, 1)``. Context ``r in [-1, 1]``; ``h`` (imperfection) is a problem parameter.

    * ``h = 0``: ``y(inf) = 0`` for ``r <= 0``; ``+-sqrt(r)`` with weights ``1/2`` each for ``r > 0`` (closed form).
    * ``h != 0``: the ODE is integrated (vectorized RK4, ``ode_steps`` steps of adaptive size
      ``dt = min(ode_max_dt, 0.5 / |f'(y)|)``, which crosses slow stretches near a fold quickly and resolves the
      approach to an equilibrium, then a guarded Newton polish); where ``4 r^3 > 27 h^2`` the state goes to the
      upper stable equilibrium iff ``y(0)`` exceeds the middle (unstable) one, so the upper weight is
      ``clip((init_range - y_mid) / (2 init_range), 0, 1)``.

    Branches: ``0 = single`` (the only stable equilibrium), ``1 = upper``, ``2 = lower``.
    Physics (per component, mean ``mu``): equilibrium ``r mu - mu^3 + h = 0`` (:class:`~physmdn.physics.Polynomial`,
    ``coeffs = [h, r, 0, -1]``) and stability ``f'(mu) = r - 3 mu^2 < 0`` (:class:`~physmdn.physics.Stability`,
    ``coeffs = [r, 0, -3]``). Residual columns: ``equilibrium = r y - y^3 + h``,
    ``stability = relu(r - 3 y^2)``.
    """

    name = "pitchfork"
    context_names = ("r",)
    output_names = ("y",)
    branch_names = ("single", "upper", "lower")
    residual_names = ("equilibrium", "stability")
    defaults = Defaults(components=3, hidden=(64, 64), epochs=150, n_train=2048, batch_size=256, lr=3e-3)

    def __init__(self, imperfection: float = 0.0, noise: float = 0.05, r_range=(-1.0, 1.0), init_range: float = 2.0,
                 ode_steps: int = 400, ode_max_dt: float = 2.0, physics_mode: str = "second",
                 physics_weights: dict | None = None):
        lo, hi = check.finite_range(r_range, "r_range")
        super().__init__((lo,), (hi,), (False,), (0.5 * (lo + hi),))
        self.h = check.finite(imperfection, "imperfection")
        self.noise = check.nonnegative(noise, "noise")
        self.init_range = check.positive(init_range, "init_range")
        self.ode_steps = check.count(ode_steps, "ode_steps")
        self.ode_max_dt = check.positive(ode_max_dt, "ode_max_dt")
        self.physics_mode = resolve_physics_mode(physics_mode)
        self.physics_weights = merge_weights({"equilibrium": 1.0, "stability": 1.0}, physics_weights)
        self.config = dict(imperfection=self.h, noise=self.noise, r_range=(lo, hi), init_range=self.init_range,
                           ode_steps=self.ode_steps, ode_max_dt=self.ode_max_dt, physics_mode=physics_mode,
                           physics_weights=self.physics_weights)

    def equilibria(self, r: torch.Tensor):
        """``(lower, middle, upper)`` equilibria for ``r [...]`` (see :func:`cubic_equilibria`)."""
        return cubic_equilibria(r, self.h)

    def long_time_state(self, r: torch.Tensor, y0: torch.Tensor, method: str | None = None) -> torch.Tensor:
        """``y(t -> infinity)`` from ``y(0) = y0`` (both ``[N]``). ``method``: ``"closed"`` (only ``h = 0``),
        ``"ode"`` (RK4 integration) or ``"roots"`` (the stable equilibrium of ``y0``'s basin); default:
        closed form for ``h = 0``, else the ODE."""
        method = method or ("closed" if self.h == 0.0 else "ode")
        if method == "closed":
            if self.h != 0.0:
                raise ValueError(f"method 'closed' needs imperfection 0, got {self.h}")
            return torch.where(r > 0, torch.sign(y0) * torch.sqrt(r.clamp(min=0.0)), torch.zeros_like(y0))
        if method == "roots":
            lower, middle, upper = self.equilibria(r)
            return torch.where(y0 > middle, upper, lower)
        if method != "ode":
            raise ValueError(f"method must be 'closed', 'ode' or 'roots', got {method!r}")
        h = self.h

        def f(y):
            return r * y - y * y * y + h

        def slope(y):
            return r - 3.0 * y * y

        y = rk4_relax(f, slope, y0, self.ode_steps, self.ode_max_dt)
        return newton_polish(f, slope, y, steps=3)  # slow passages near a fold end short of the equilibrium

    def _labels(self, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        lower, middle, upper = self.equilibria(r)
        bistable = upper > lower
        side = torch.where(y > middle, torch.ones_like(y, dtype=torch.long), torch.full_like(y, 2, dtype=torch.long))
        return torch.where(bistable, side, torch.zeros_like(side))

    def _simulate(self, context, generator):
        r = context[:, 0].to(work_dtype(context.dtype))
        y0 = (2.0 * rand(r.shape, generator, r.device, r.dtype) - 1.0) * self.init_range
        y_inf = self.long_time_state(r, y0)
        labels = self._labels(y_inf, r)
        y = y_inf + self.noise * randn(r.shape, generator, r.device, r.dtype)
        return y.unsqueeze(-1), labels

    def true_weights(self, context):
        r = self.check_context(context)[:, 0]
        lower, middle, upper = self.equilibria(r.to(torch.float64))
        bistable = upper > lower
        w_upper = ((self.init_range - middle) / (2.0 * self.init_range)).clamp(0.0, 1.0)
        zero = torch.zeros_like(w_upper)
        weights = torch.stack([torch.where(bistable, zero, zero + 1.0),
                               torch.where(bistable, w_upper, zero),
                               torch.where(bistable, 1.0 - w_upper, zero)], dim=-1)
        return weights.to(context.dtype)

    def branch_means(self, context):
        r = self.check_context(context)[:, 0]
        lower, _, upper = self.equilibria(r)
        nan = torch.full_like(r, math.nan)
        bistable = upper > lower
        single = torch.where(bistable, nan, upper)
        branches = [single, torch.where(bistable, upper, nan), torch.where(bistable, lower, nan)]
        return torch.stack(branches, -1)[..., None]

    def classify(self, y, context):
        """Nearest stable equilibrium: ``single`` where there is one, else ``upper`` / ``lower`` by the side of
        the unstable middle equilibrium."""
        y = self._check_outcome(y)[..., 0]
        r = torch.broadcast_to(context[..., 0], y.shape)
        return self._labels(y.to(torch.float64), r.to(torch.float64))

    def physics(self, context, components=None):
        r = self.check_context(context)[:, 0]
        B = r.shape[0]
        zero = torch.zeros_like(r)
        coeffs = torch.stack([zero + self.h, r, zero, zero - 1.0], dim=-1).reshape(B, 1, 1, 4)
        slope = torch.stack([r, zero, zero - 3.0], dim=-1).reshape(B, 1, 1, 3)
        w = self.physics_weights
        return [(physics.Polynomial(coeffs, moment=self.physics_mode, noise_scale=self.noise), w["equilibrium"]),
                (physics.Stability(slope), w["stability"])]

    def residual(self, y, context):
        y = self._check_outcome(y)[..., 0]
        r = context[..., 0]
        return torch.stack([r * y - y**3 + self.h, F.relu(r - 3.0 * y * y)], dim=-1)

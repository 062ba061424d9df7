"""The stochastic Allen–Cahn field at stationarity: samples of the SPDE's invariant law, no deterministic relaxation.

Layering: imports :mod:`physmdn.physics`, :mod:`physmdn.stationary`, :mod:`physmdn._validation` and the problems'
base and numerics.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .. import _validation as check
from .. import physics
from ..stationary import StationaryLaw
from .base import Defaults, Problem, merge_weights, register
from .numerics import few_threads, rand, randn, second_difference, stencil_residual, three_way_labels, work_dtype

__all__ = ["StochasticAllenCahn", "mala"]

PENALTIES = ("stationary", "steady")


def mala(y: torch.Tensor, potential: Callable, drift: Callable, noise: torch.Tensor, dt: float, steps: int,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """``steps`` Metropolis-adjusted Langevin steps towards ``p(y) ∝ exp(-2 V(y) / s^2)``, the stationary law of
    ``dy = f(y) dt + s dW`` with ``f = -grad V``, for ``N`` independent chains ``y [N, D]``.

    Proposal (one Euler–Maruyama step) ``y' = y + dt f(y) + s sqrt(dt) xi``, ``xi ~ N(0, I)``, accepted with
    probability ``min(1, p(y') q(y | y') / (p(y) q(y' | y)))``, ``q(b | a) = N(b; a + dt f(a), s^2 dt I)``: the
    Metropolis step removes the ``O(dt)`` bias of plain Euler–Maruyama, so the chain's law converges to ``p``
    exactly. ``potential(y [N, D]) -> V [N]``, ``drift(y) -> f [N, D]``, ``noise`` ``s`` ``[N, 1]``. Returns
    ``y [N, D]``.
    """
    inverse_temperature = 2.0 / noise.square().squeeze(-1)  # [N]
    step_variance = noise.square() * dt  # [N, 1]
    with few_threads(y.numel(), y.device):
        log_p, f = -inverse_temperature * potential(y), drift(y)
        for _ in range(steps):
            forward_mean = y + dt * f
            proposal = forward_mean + step_variance.sqrt() * randn(y.shape, generator, y.device, y.dtype)
            log_p_new, f_new = -inverse_temperature * potential(proposal), drift(proposal)
            log_q_forward = -(proposal - forward_mean).square().sum(-1) / (2.0 * step_variance.squeeze(-1))
            log_q_backward = -(y - proposal - dt * f_new).square().sum(-1) / (2.0 * step_variance.squeeze(-1))
            log_accept = log_p_new - log_p + log_q_backward - log_q_forward
            accept = torch.log(rand(log_p.shape, generator, y.device, y.dtype)) < log_accept
            y = torch.where(accept[:, None], proposal, y)
            f = torch.where(accept[:, None], f_new, f)
            log_p = torch.where(accept, log_p_new, log_p)
    return y


@register
class StochasticAllenCahn(Problem):
    """Stationary law of the stochastic Allen–Cahn field on a periodic 1-D grid (truly stochastic outcomes).

    ``dy = f(y) dt + sigma dW``, ``f_i(y) = eps (y_{i-1} - 2 y_i + y_{i+1}) / h^2 + y_i - y_i^3`` on ``[0, length)``
    with ``grid`` points, ``h = length / grid`` (the discretization and boundary of
    :class:`~physmdn.problems.AllenCahn`), noise independent per grid point. ``f = -grad V`` with the discrete
    Ginzburg–Landau energy ``V(y) = sum_i [eps / (2 h^2) (y_{i+1} - y_i)^2 + y_i^4 / 4 - y_i^2 / 2]``
    (:meth:`potential`), so the stationary law is ``p(y | eps, sigma) ∝ exp(-2 V(y) / sigma^2)``.

    Outcomes are draws of that law itself (no quench, no observation noise): :func:`mala` chains from
    ``y_i(0) ~ N(0, 1)`` for ``burn_in / dt`` steps of size ``dt``, then a random global sign (``p`` is even in
    ``y``, so the flip is an exact move; it removes the slowest mode, the switching between the ``+1`` and
    ``-1`` wells). Context ``(eps, sigma)``: ``eps`` log-uniform in ``eps_range``, ``sigma`` uniform in
    ``sigma_range``; the default ranges keep the chains well mixed within the burn-in (coupling
    ``eps / h^2`` in ``[0.5, 1.9]``, well barrier ``2 V / sigma^2`` of at most 1.4 per point).

    Branches: ``0 = plus`` (every ``y_i > 0``), ``1 = minus``, ``2 = mixed`` (sign changes: kinks or
    fluctuations through zero).

    Physics: ``penalty="stationary"`` (the default) is the generator identity of the law,
    :class:`~physmdn.stationary.StationaryLaw` with ``A = eps L / h^2``, ``g(u) = u - u^3``, ``s = sigma`` and the
    ``"neighbours"`` test functions, a penalty on the whole mixture. ``penalty="steady"`` is the steady-state
    penalty of :class:`~physmdn.problems.AllenCahn` (the first moment of the residual ``f(y)`` per component and
    the field stability prior), which is wrong here: a stationary sample is not a steady state, only
    ``E f(y) = 0`` holds. :meth:`residual` is ``f(y)``, columns ``r_i``.
    """

    name = "stochastic_allen_cahn"
    context_names = ("eps", "sigma")
    branch_names = ("plus", "minus", "mixed")
    is_field = True
    # docs/results.md (stationary-law prior): weight 0.1 keeps the NLL gain at n = 32, 64 with the energy distance
    # tied; weight 1 and 10 make the energy distance worse at n = 32
    defaults = Defaults(components=6, hidden=(64, 64), epochs=150, n_train=1024, batch_size=128, lr=3e-3,
                        physics_weight=0.1)

    def __init__(self, grid: int = 8, length: float = 1.0, eps_range=(0.008, 0.03), sigma_range=(0.6, 1.0),
                 dt: float = 0.05, burn_in: float = 60.0, penalty: str = "stationary",
                 physics_weights: dict | None = None):
        grid = check.count(grid, "grid", minimum=3)
        eps_range = check.finite_range(eps_range, "eps_range")
        sigma_range = check.finite_range(sigma_range, "sigma_range")
        if eps_range[0] <= 0:
            raise ValueError(f"eps_range must be positive, got {eps_range}")
        if sigma_range[0] <= 0:
            raise ValueError(f"sigma_range must be positive (the law needs noise), got {sigma_range}")
        if penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
        low, high = zip(eps_range, sigma_range)
        reference = (math.sqrt(eps_range[0] * eps_range[1]), 0.5 * sum(sigma_range))
        super().__init__(low, high, (True, False), reference)
        self.grid, self.length = grid, check.positive(length, "length")
        self.spacing = self.length / grid
        self.output_names = tuple(f"u{i}" for i in range(grid))
        self.residual_names = tuple(f"r{i}" for i in range(grid))
        self.dt = check.positive(dt, "dt")
        self.burn_in = check.positive(burn_in, "burn_in")
        self.penalty = penalty
        self.physics_weights = merge_weights({"stationary": 1.0, "steady": 1.0, "stability": 100.0}, physics_weights)
        self.config = dict(grid=grid, length=self.length, eps_range=eps_range, sigma_range=sigma_range, dt=self.dt,
                           burn_in=self.burn_in, penalty=penalty, physics_weights=self.physics_weights)

    # ----- the law ------------------------------------------------------------------------------------

    def coupling(self, context: torch.Tensor) -> torch.Tensor:
        """The linear part of the drift, ``A = eps L / h^2`` per context: ``[B, D, D]``."""
        eps = self.check_context(context)[:, 0]
        L = second_difference(self.grid, "periodic", dtype=context.dtype, device=context.device)
        return eps[:, None, None] * L / self.spacing**2

    def potential(self, y: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The Ginzburg–Landau energy ``V(y)`` of outcomes ``y [..., D]`` under ``context [..., C]`` (broadcast):
        ``[...]``; ``f = -grad V``."""
        u = self._check_outcome(y)
        eps = context[..., 0:1]
        jump = u.roll(-1, -1) - u
        return (0.5 * eps / self.spacing**2 * jump.square() + 0.25 * u**4 - 0.5 * u.square()).sum(-1)

    def residual(self, y, context):
        """The drift ``f(y)`` (the steady residual): ``[..., D]``. Only its mean vanishes under the law."""
        u = self._check_outcome(y)
        return stencil_residual(u, context[..., 0:1], u - u**3, self.spacing, "periodic")

    def _simulate(self, context, generator):
        work = work_dtype(context.dtype)
        ctx = context.to(work)
        N, device = ctx.shape[0], ctx.device
        y = randn((N, self.grid), generator, device, work)
        y = mala(y, lambda u: self.potential(u, ctx), lambda u: self.residual(u, ctx), ctx[:, 1:2], self.dt,
                 int(math.ceil(self.burn_in / self.dt)), generator)
        sign = torch.where(rand((N, 1), generator, device, work) < 0.5, -1.0, 1.0).to(work)
        y = sign * y
        return y, self._labels(y)

    @staticmethod
    def _labels(u: torch.Tensor) -> torch.Tensor:
        return three_way_labels((u > 0).all(-1), (u < 0).all(-1))

    def classify(self, y, context):
        """``plus`` where every point is ``> 0``, ``minus`` where every point is ``< 0``, else ``mixed``."""
        return self._labels(self._check_outcome(y))

    # ----- physics ------------------------------------------------------------------------------------

    def stationary_law(self, context: torch.Tensor, pairs="neighbours") -> StationaryLaw:
        """The generator-identity penalty of the law at ``context [B, C]``."""
        context = self.check_context(context)
        reaction = torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=context.dtype, device=context.device)
        return StationaryLaw(self.coupling(context.detach()), reaction, context.detach()[:, 1], pairs=pairs)

    def physics(self, context, components=None):
        if self.penalty == "stationary":
            return [(self.stationary_law(context), self.physics_weights["stationary"])]
        eps = self.check_context(context)[:, 0:1]
        reaction = torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=context.dtype, device=context.device).reshape(1, 1, 4)
        steady = physics.Stencil1D(eps, reaction, spacing=self.spacing, boundary="periodic", moment="first")
        slope = torch.tensor([1.0, 0.0, -3.0], dtype=context.dtype, device=context.device).reshape(1, 1, 3)
        stability = physics.FieldStability(eps, slope, spacing=self.spacing, boundary="periodic")
        return [(steady, self.physics_weights["steady"]), (stability, self.physics_weights["stability"])]

"""The shock Hugoniot of an iron-like solid with three regimes (elastic, plastic, phase-transformed).

Layering: imports :mod:`physmdn.physics`, :mod:`physmdn._validation` and the problems' base and numerics.
"""

from __future__ import annotations

import torch

from .. import _validation as check
from .. import physics
from ..constraints import LinearConstraint
from .base import Defaults, Problem, merge_weights, register, resolve_physics_mode
from .numerics import rand, randn, work_dtype

__all__ = ["Hugoniot"]


_IRON_REGIMES = (
    # name, c0 [km/s], s [-]; iron-like, illustrative (not a fit to one data set)
    ("elastic", 5.95, 1.00),  # elastic precursor: near the longitudinal sound speed
    ("plastic", 4.63, 1.33),  # bcc alpha phase, bulk response
    ("transformed", 3.94, 1.58),  # hcp epsilon phase above the alpha -> epsilon transition (~13 GPa)
)


@register
class Hugoniot(Problem):
    """Shock Hugoniot of an iron-like solid with three regimes, selected at random with smooth odds.

    Context: particle velocity ``u_p`` [km/s]. Outcome ``(U_s [km/s], P [GPa])``. Regime ``k`` (``0 = elastic``,
    ``1 = plastic``, ``2 = transformed``) follows a linear ``U_s``–``u_p`` law and the Rankine–Hugoniot momentum
    jump condition:

    ``U_s = c0_k + s_k u_p + noise * N(0, 1)``,  ``P = rho0 U_s u_p (+ pressure_noise * N(0, 1))``

    with ``rho0`` in g/cm^3 (``rho0 U_s u_p`` is then in GPa). Defaults: ``rho0 = 7.87``; ``(c0, s) =
    (5.95, 1.00)``, ``(4.63, 1.33)``, ``(3.94, 1.58)``. Regime odds are an ordered logit in ``u_p``:

    ``P(k >= 1) = sigmoid((u_p - t1) / w)``, ``P(k >= 2) = sigmoid((u_p - t2) / w)``,
    ``thresholds = (t1, t2) = (0.35, 1.1)`` km/s, ``width = w = 0.15`` km/s,

    so neighbouring regimes overlap around each threshold and the outcome is multimodal there. Labels are the
    regimes. With ``pressure_noise = 0`` the data satisfy Rankine–Hugoniot exactly.

    Physics (MDN with ``K`` components, component ``k`` follows regime ``k mod 3``): the regime law
    ``U_s - (c0_k + s_k u_p) = 0`` (:class:`~physmdn.physics.Linear`, ``A = [1, 0]``), Rankine–Hugoniot
    ``P - rho0 u_p U_s = 0`` (:class:`~physmdn.physics.Linear`, ``A = [-rho0 u_p, 1]``, ``b = 0``, on the means:
    a diagonal Gaussian cannot lie on that line, so the distribution-level penalty would only shrink ``sigma``;
    weight ``1 / rho0^2`` so its penalty is in (km/s)^2 like the law's) and ``dU_s / du_p >= 0``
    (:class:`~physmdn.physics.Monotonic`; ``physics()`` marks the context ``requires_grad`` for it, so call it
    before the forward pass, as :func:`physmdn.training.fit` does; weight 0 drops it). Residual columns:
    ``rankine_hugoniot = P - rho0 u_p U_s`` [GPa], ``regime_law = min_k |U_s - c0_k - s_k u_p|`` [km/s].
    """

    name = "hugoniot"
    context_names = ("u_p",)
    output_names = ("U_s", "P")
    branch_names = tuple(name for name, _, _ in _IRON_REGIMES)
    residual_names = ("rankine_hugoniot", "regime_law")
    component_specific = True
    defaults = Defaults(components=3, hidden=(64, 64), epochs=150, n_train=2048, batch_size=256, lr=3e-3)

    def __init__(self, rho0: float = 7.87, regimes=_IRON_REGIMES, thresholds=(0.35, 1.1), width: float = 0.15,
                 up_range=(0.05, 2.0), noise: float = 0.05, pressure_noise: float = 0.0, physics_mode: str = "second",
                 physics_weights: dict | None = None):
        lo, hi = check.finite_range(up_range, "up_range")
        super().__init__((lo,), (hi,), (False,), (0.5 * (lo + hi),))
        self.rho0 = check.positive(rho0, "rho0")
        regimes = tuple((str(n), float(c0), float(s)) for n, c0, s in regimes)
        if len(regimes) != 3:
            raise ValueError(f"regimes must list 3 (name, c0, s) triples, got {len(regimes)}")
        self.regimes = regimes
        self.branch_names = tuple(n for n, _, _ in regimes)
        t1, t2 = check.finite_range(thresholds, "thresholds")
        self.thresholds = (t1, t2)
        self.width = check.positive(width, "width")
        self.noise = check.nonnegative(noise, "noise")
        self.pressure_noise = check.nonnegative(pressure_noise, "pressure_noise")
        self.physics_mode = resolve_physics_mode(physics_mode)
        self.physics_weights = merge_weights(
            {"regime_law": 1.0, "rankine_hugoniot": 1.0 / self.rho0**2, "monotonic": 1.0}, physics_weights)
        self.config = dict(rho0=self.rho0, regimes=regimes, thresholds=self.thresholds, width=self.width,
                           up_range=(lo, hi), noise=self.noise, pressure_noise=self.pressure_noise,
                           physics_mode=physics_mode, physics_weights=self.physics_weights)

    def _law(self, up: torch.Tensor) -> torch.Tensor:
        """``c0_k + s_k u_p``: ``[..., 3]``."""
        c0 = torch.tensor([c for _, c, _ in self.regimes], dtype=up.dtype, device=up.device)
        s = torch.tensor([s for _, _, s in self.regimes], dtype=up.dtype, device=up.device)
        return c0 + s * up.unsqueeze(-1)

    def _regime_probabilities(self, up: torch.Tensor) -> torch.Tensor:
        above1 = torch.sigmoid((up - self.thresholds[0]) / self.width)
        above2 = torch.sigmoid((up - self.thresholds[1]) / self.width)
        return torch.stack([1.0 - above1, above1 - above2, above2], dim=-1)

    def _simulate(self, context, generator):
        work = work_dtype(context.dtype)
        up = context[:, 0].to(work)
        probs = self._regime_probabilities(up)
        u = rand(up.shape, generator, up.device, work)
        labels = (u.unsqueeze(-1) > probs.cumsum(-1)[:, :2]).sum(-1).long()  # inverse CDF
        us = self._law(up).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        us = us + self.noise * randn(up.shape, generator, up.device, work)
        p = self.rho0 * us * up
        if self.pressure_noise > 0:
            p = p + self.pressure_noise * randn(up.shape, generator, up.device, work)
        return torch.stack([us, p], dim=-1), labels

    def true_weights(self, context):
        up = self.check_context(context)[:, 0]
        return self._regime_probabilities(up.to(torch.float64)).to(context.dtype)

    def branch_means(self, context):
        up = self.check_context(context)[:, 0]
        us = self._law(up)  # [B, 3]
        return torch.stack([us, self.rho0 * us * up.unsqueeze(-1)], dim=-1)

    def classify(self, y, context):
        """The regime whose ``U_s`` law is nearest."""
        us = self._check_outcome(y)[..., 0]
        up = torch.broadcast_to(context[..., 0], us.shape)
        return (us.unsqueeze(-1) - self._law(up)).abs().argmin(-1)

    def physics(self, context, components=None):
        context = self.check_context(context)
        up = context[:, 0]
        B, K = up.shape[0], components or len(self.regimes)
        regime = torch.arange(K, device=up.device) % len(self.regimes)
        law = self._law(up)[:, regime].unsqueeze(-1)  # [B, K, 1]
        A_law = torch.tensor([[1.0, 0.0]], dtype=up.dtype, device=up.device).reshape(1, 1, 1, 2)
        A_rh = torch.stack([-self.rho0 * up, torch.ones_like(up)], dim=-1).reshape(B, 1, 1, 2)
        w = self.physics_weights
        specs = [(physics.Linear(A_law, law, moment=self.physics_mode, noise_scale=self.noise), w["regime_law"]),
                 (physics.Linear(A_rh, torch.zeros(B, 1, 1, dtype=up.dtype, device=up.device), mode="mean"),
                  w["rankine_hugoniot"])]
        if w["monotonic"] > 0:
            if not context.requires_grad:
                context.requires_grad_(True)  # Monotonic differentiates the model's means by the context
            specs.append((physics.Monotonic(context, dim=0, output=0, increasing=True), w["monotonic"]))
        return specs

    def hard_law(self) -> LinearConstraint:
        """Rankine–Hugoniot ``P - rho0 u_p U_s = 0`` as a law built into the model (``ConstrainedMDN``, the
        ``mdn-law`` model of ``physmdn compare``): ``A(u_p) = [-rho0 u_p, 1]``, ``b = 0``; the components' spread
        off the law is ``pressure_noise``, or 1e-3 of the standardized outcomes when the data hold it exactly."""
        rho0 = self.rho0
        return LinearConstraint(lambda x: torch.stack([-rho0 * x[:, 0], torch.ones_like(x[:, 0])], -1).unsqueeze(1),
                                noise_scale=max(self.pressure_noise, 1e-3))

    def residual(self, y, context):
        y = self._check_outcome(y)
        us, p = y[..., 0], y[..., 1]
        up = context[..., 0]
        rh = p - self.rho0 * up * us
        law = (us.unsqueeze(-1) - self._law(torch.broadcast_to(up, us.shape))).abs().amin(-1)
        return torch.stack([rh, law], dim=-1)

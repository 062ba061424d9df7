"""Mixture-level physics: the generator identity of a stationary diffusion, in closed form under a Gaussian mixture.

For the diffusion ``dy = f(y) dt + s dW`` on ``R^D`` with generator ``A phi = grad phi . f + (s^2 / 2) lap phi``,
every stationary law ``p`` satisfies ``E_p[A phi(y)] = 0`` for every smooth ``phi``. With the low-degree test
functions

* ``phi = y_i``:       ``E[f_i(y)] = 0``,
* ``phi = y_i y_j``:   ``E[y_j f_i(y) + y_i f_j(y)] + s^2 delta_ij = 0``,

and a drift ``f_i(y) = (A y)_i + g(y_i)`` (a linear coupling ``A [D, D]`` and a polynomial reaction
``g(u) = sum_p a_p u^p`` applied per coordinate), each expectation is a polynomial moment of ``y``. Under a
Gaussian mixture ``sum_k pi_k N(mu_k, diag sigma_k^2)`` it is exact in closed form,
``E_mix[h] = sum_k pi_k E_k[h]``, with the diagonal components' cross moments factored:

* ``E_k[f_i] = (A mu_k)_i + E_k[g(y_i)]``;
* ``E_k[y_j f_i] = mu_kj E_k[f_i] + A_ij sigma_kj^2 + delta_ij (E_k[y_i g(y_i)] - mu_ki E_k[g(y_i)])``;

the one-dimensional moments ``E_k[y_i^n]`` (``n <= deg g + 1``) by :func:`physmdn.physics.gaussian_moments`.

Unlike the specs of :mod:`physmdn.physics` (a penalty ``P_bk`` per component, averaged with the weights), this
penalty is a function of the whole mixture: the identity holds for the law, not for each component (a symmetric
two-well law has ``E[f] = 0`` while neither well's component does), so its gradient reaches the mixture weights by
design. :func:`split_physics` separates such penalties from component specs; :func:`physmdn.fit` adds them to the
loss as ``physics_weight * w * mean_b penalty_b``.

Layering: imports :mod:`physmdn.physics` (the Gaussian moments) and :mod:`physmdn._validation`.
"""

from __future__ import annotations

import torch

from . import _validation as check
from .physics import PhysicsSpec, gaussian_moments

__all__ = ["MixturePenalty", "StationaryLaw", "split_physics", "PAIRS"]

PAIRS = ("diagonal", "neighbours", "all")


class MixturePenalty:
    """Base class of penalties on a whole mixture, bound to one batch: :meth:`mixture_penalty` ``-> [B]``."""

    def validate(self, B: int, K: int, D: int) -> None:
        """Raise a clear error when the penalty does not fit mixtures of shape ``[B, K, D]``."""

    def mixture_penalty(self, logits: torch.Tensor, means: torch.Tensor,
                        log_scales: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def _check_mixture(logits, means, log_scales) -> tuple[int, int, int]:
    for t, name in ((logits, "logits"), (means, "means"), (log_scales, "log_scales")):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if means.dim() != 3:
        raise ValueError(f"means must be [B, K, D], got shape {tuple(means.shape)}")
    B, K, D = means.shape
    if tuple(logits.shape) != (B, K):
        raise ValueError(f"logits must be [B, K] = {(B, K)} (as means), got shape {tuple(logits.shape)}")
    if tuple(log_scales.shape) != (B, K, D):
        raise ValueError(f"log_scales must be [B, K, D] = {(B, K, D)} (as means), got shape {tuple(log_scales.shape)}")
    return B, K, D


class StationaryLaw(MixturePenalty):
    """Generator-identity penalty of ``dy = (A y + g(y)) dt + s dW`` for a batch of mixtures ``[B, K, D]``.

    Args:
        coupling: the linear part ``A``: ``[D, D]`` or ``[B, D, D]`` (one per context).
        reaction: coefficients ``a_0 .. a_P`` of ``g(u) = sum_p a_p u^p``: ``[P + 1]`` or ``[B, P + 1]``.
        noise: the noise amplitude ``s > 0``: a number, ``[B]`` or ``[B, 1]``.
        pairs: the quadratic test functions ``y_i y_j``: ``"diagonal"`` (``i = j``), ``"neighbours"`` (``i = j``
            and the cyclic neighbours ``j = i + 1 mod D``, ``2 D`` functions; the default), ``"all"``
            (``i <= j``, ``D (D + 1) / 2``) or an integer tensor ``[P, 2]`` of pairs. The linear test functions
            ``y_i`` are always used (``D`` of them).
        normalize: divide every identity by ``s^2``, so the diffusion term of ``phi = y_i^2`` is ``1`` and the
            penalty is dimensionless (a violation relative to the noise).

    The identities of one context ``b``, in the order ``[E f_0 .. E f_{D-1}, pair identities]``, form
    ``terms [B, T]`` (:meth:`mixture_terms`); the penalty is ``P_b = mean_t terms_bt^2`` (:meth:`mixture_penalty`).
    """

    def __init__(self, coupling: torch.Tensor, reaction, noise, pairs="neighbours", normalize: bool = True):
        if not isinstance(coupling, torch.Tensor) or not coupling.is_floating_point():
            raise TypeError(f"coupling must be a floating-point tensor [D, D] or [B, D, D], got "
                            f"{getattr(coupling, 'dtype', type(coupling).__name__)}")
        if coupling.dim() not in (2, 3) or coupling.shape[-1] != coupling.shape[-2]:
            raise ValueError(f"coupling must be [D, D] or [B, D, D] (square), got shape {tuple(coupling.shape)}")
        self.coupling = coupling if coupling.dim() == 3 else coupling.unsqueeze(0)
        reaction = torch.as_tensor(reaction, dtype=coupling.dtype, device=coupling.device)
        if reaction.dim() not in (1, 2) or reaction.shape[-1] < 1:
            raise ValueError(f"reaction must be [P + 1] or [B, P + 1] polynomial coefficients, got shape "
                             f"{tuple(reaction.shape)}")
        self.reaction = reaction if reaction.dim() == 2 else reaction.unsqueeze(0)
        noise = torch.as_tensor(noise, dtype=coupling.dtype, device=coupling.device)
        if noise.dim() > 2 or (noise.dim() == 2 and noise.shape[1] != 1):
            raise ValueError(f"noise must be a number, [B] or [B, 1], got shape {tuple(noise.shape)}")
        if not bool(torch.isfinite(noise).all()) or not bool((noise > 0).all()):
            raise ValueError(f"noise must be finite and > 0, got values in [{float(noise.min())}, {float(noise.max())}]")
        self.noise = noise.reshape(-1)  # [1] or [B]
        if isinstance(pairs, str):
            if pairs not in PAIRS:
                raise ValueError(f"pairs must be one of {PAIRS} or an integer tensor [P, 2], got {pairs!r}")
        elif not isinstance(pairs, torch.Tensor) or pairs.is_floating_point() or pairs.dim() != 2 \
                or pairs.shape[1] != 2:
            raise ValueError(f"pairs must be one of {PAIRS} or an integer tensor [P, 2], got "
                             f"{pairs if not isinstance(pairs, torch.Tensor) else tuple(pairs.shape)!r}")
        self.pairs = pairs
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
        self.normalize = normalize

    def __repr__(self) -> str:
        pairs = self.pairs if isinstance(self.pairs, str) else f"tensor[{self.pairs.shape[0]}, 2]"
        return f"StationaryLaw(D={self.coupling.shape[-1]}, degree={self.reaction.shape[-1] - 1}, pairs={pairs!r})"

    # ----- shapes ---------------------------------------------------------------------------------------

    def validate(self, B: int, K: int, D: int) -> None:
        if self.coupling.shape[-1] != D:
            raise ValueError(f"coupling must be [D, D] with D = {D} (the mixture's outputs), got shape "
                             f"{tuple(self.coupling.shape[-2:])}")
        for t, name in ((self.coupling, "coupling"), (self.reaction, "reaction"), (self.noise, "noise")):
            if t.shape[0] not in (1, B):
                raise ValueError(f"{name} must hold 1 or B = {B} rows (one per context), got shape {tuple(t.shape)}")
        if isinstance(self.pairs, torch.Tensor) and self.pairs.numel() and \
                (int(self.pairs.min()) < 0 or int(self.pairs.max()) >= D):
            raise ValueError(f"pairs must index outputs in [0, {D}), got values in "
                             f"[{int(self.pairs.min())}, {int(self.pairs.max())}]")

    def pair_indices(self, D: int, device=None) -> torch.Tensor:
        """The quadratic test functions as index pairs ``(i, j)``: ``[P, 2]`` (int64)."""
        if isinstance(self.pairs, torch.Tensor):
            return self.pairs.to(device=device, dtype=torch.long)
        idx = torch.arange(D, device=device)
        if self.pairs == "diagonal":
            return torch.stack([idx, idx], -1)
        if self.pairs == "neighbours":
            # D = 1, 2: the cyclic neighbour repeats a pair already listed; keep each pair once
            pairs = torch.cat([torch.stack([idx, idx], -1), torch.stack([idx, (idx + 1) % D], -1)])
            pairs = torch.stack([pairs.amin(-1), pairs.amax(-1)], -1)
            return torch.unique(pairs, dim=0)
        i, j = torch.triu_indices(D, D, device=device)
        return torch.stack([i, j], -1)

    def _scale(self, B: int, dtype, device) -> torch.Tensor:
        """What every identity is divided by: ``s^2`` (normalized) or 1, ``[B, 1]``."""
        noise = self.noise.to(dtype=dtype, device=device).expand(B)
        return (noise.square() if self.normalize else torch.ones_like(noise)).unsqueeze(-1)

    # ----- closed form under the mixture ----------------------------------------------------------------

    def component_terms(self, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
        """``E_k[A phi_t]`` under each component ``N(mu_k, diag sigma_k^2)``, not normalized: ``[B, K, T]``."""
        B, K, D = means.shape
        A = self.coupling.to(means).expand(B, D, D)
        a = self.reaction.to(means).expand(B, -1)[:, None, None, :]  # [B, 1, 1, P + 1]
        degree = a.shape[-1] - 1
        var = torch.exp(2.0 * log_scales)
        moments = gaussian_moments(means, var, degree + 1)  # [B, K, D, degree + 2]
        g_mean = (a * moments[..., : degree + 1]).sum(-1)  # E[g(y_i)]
        yg_mean = (a * moments[..., 1:]).sum(-1)  # E[y_i g(y_i)]
        f_mean = torch.einsum("bij,bkj->bki", A, means) + g_mean  # E[f_i], [B, K, D]
        pairs = self.pair_indices(D, means.device)
        i, j = pairs[:, 0], pairs[:, 1]
        same = (i == j).to(means.dtype)  # [P]
        own = yg_mean - means * g_mean  # the delta_ij correction of E[y_j f_i]: [B, K, D]

        def cross(first, second):  # E[y_second f_first] over the pairs: [B, K, P]
            return (means[..., second] * f_mean[..., first] + A[:, first, second][:, None, :] * var[..., second]
                    + same * own[..., first])

        noise2 = self.noise.to(means).expand(B).square()[:, None, None]
        quadratic = cross(i, j) + cross(j, i) + noise2 * same
        return torch.cat([f_mean, quadratic], dim=-1)

    def mixture_terms(self, logits: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
        """``E_mix[A phi_t]`` (divided by ``s^2`` when normalized): ``[B, T]``, ``T = D + P``."""
        B, K, D = _check_mixture(logits, means, log_scales)
        self.validate(B, K, D)
        weights = torch.softmax(logits, dim=-1)
        terms = (weights.unsqueeze(-1) * self.component_terms(means, log_scales)).sum(1)
        return terms / self._scale(B, means.dtype, means.device)

    def mixture_penalty(self, logits: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
        """``P_b = mean_t E_mix[A phi_t]_b^2`` (normalized as the constructor says): ``[B]``."""
        return self.mixture_terms(logits, means, log_scales).square().mean(-1)

    # ----- Monte Carlo estimate from samples --------------------------------------------------------------

    def drift(self, y: torch.Tensor) -> torch.Tensor:
        """``f(y) = A y + g(y)`` for ``y [S, B, D]`` (``B`` matching the per-context parameters or any ``B``
        where they are shared): ``[S, B, D]``."""
        A = self.coupling.to(y)
        a = self.reaction.to(y)
        g = torch.zeros_like(y) + a[:, -1:]
        for p in range(a.shape[-1] - 2, -1, -1):  # Horner's rule
            g = g * y + a[:, p : p + 1]
        return torch.einsum("bij,sbj->sbi", A, y) + g

    def sample_terms(self, y: torch.Tensor) -> torch.Tensor:
        """The identities estimated by sample means over ``S`` draws ``y [S, B, D]``: ``[B, T]`` (normalized as
        the constructor says); the reference of the closed form and the law metric of sampled models."""
        if not isinstance(y, torch.Tensor) or y.dim() != 3 or not y.is_floating_point():
            raise ValueError(f"y must be a floating-point [S, B, D] tensor, got "
                             f"{getattr(y, 'dtype', type(y).__name__)} shape {tuple(getattr(y, 'shape', ()))}")
        S, B, D = y.shape
        self.validate(B, 1, D)
        f = self.drift(y)
        pairs = self.pair_indices(D, y.device)
        i, j = pairs[:, 0], pairs[:, 1]
        noise2 = self.noise.to(y).expand(B).square()[:, None]
        quadratic = (y[..., j] * f[..., i] + y[..., i] * f[..., j]).mean(0) + noise2 * (i == j).to(y.dtype)
        terms = torch.cat([f.mean(0), quadratic], dim=-1)
        return terms / self._scale(B, y.dtype, y.device)


def split_physics(physics) -> tuple[list, list]:
    """``(component_items, mixture_items)`` of a physics argument (None, a spec, a :class:`MixturePenalty`, or a
    list of those / ``(item, weight)`` pairs): the first for :func:`physmdn.physics.mdn_loss`, the second
    ``(penalty, weight)`` pairs, each added as ``weight * mean_b penalty.mixture_penalty(...)_b``."""
    if physics is None:
        return [], []
    items = [physics] if isinstance(physics, (PhysicsSpec, MixturePenalty)) else list(physics)
    component, mixture = [], []
    for item in items:
        penalty, weight = (item[0], item[1]) if isinstance(item, (tuple, list)) and len(item) == 2 else (item, 1.0)
        if isinstance(penalty, MixturePenalty):
            mixture.append((penalty, check.nonnegative(weight, "weight of a mixture penalty")))
        else:
            component.append(item)  # checked by mdn_loss
    return component, mixture

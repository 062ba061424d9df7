"""Modes of diagonal Gaussian mixtures: Gaussian mean-shift from every component mean, saddle rejection, merging,
and the probability mass that flows into each mode. Used by :meth:`physmdn.GaussianMixture.modes`."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .reference import HALF_LOG_2PI

__all__ = ["Modes", "DEFAULT_MIN_WEIGHT", "find_modes", "select_modes"]

# A network's softmax gate never drives an unused component to exactly zero weight: trained MDNs leave such
# components at weights of about 1e-4 to 1e-3, often far from the data, where each one is a separate local maximum.
# 0.01 is an order of magnitude above that and well below any branch worth reporting: a mode that holds under 1%
# of the mass receives fewer than one draw in a hundred samples, and in the density plots it is invisible.
DEFAULT_MIN_WEIGHT = 0.01


class Modes(NamedTuple):
    """Local maxima of a batch of mixture densities, padded to ``K`` per batch element.

    Row ``b`` holds ``counts[b]`` modes in its first entries, sorted by density, highest first; the rest is
    padding (``mask`` False, ``locations`` NaN, ``densities`` 0, ``log_densities`` -inf, ``weights`` 0).
    ``B`` stands for the mixture's batch shape (any number of dimensions).

    The fields: ``locations [B, K, D]``; ``densities [B, K]``, the mixture density ``p(mode)``;
    ``log_densities [B, K]``; ``mask [B, K]``, True where an entry is a mode; ``counts [B]``, modes per batch
    element (``1 <= counts[b] <= K``); ``weights [B, K]``, the mass of each mode: the summed weight ``pi_k`` of the
    components whose mean-shift iteration converged to it (its basin of attraction, read off at the component means).
    """

    locations: torch.Tensor
    densities: torch.Tensor
    log_densities: torch.Tensor
    mask: torch.Tensor
    counts: torch.Tensor
    weights: torch.Tensor

    def to_list(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Unpadded per-element modes (batch flattened): a list of pairs ``(locations [M_b, D], densities [M_b])``."""
        K, D = self.locations.shape[-2:]
        locations, densities = self.locations.reshape(-1, K, D), self.densities.reshape(-1, K)
        return [(locations[b, : int(n)], densities[b, : int(n)]) for b, n in enumerate(self.counts.flatten().tolist())]


@torch.no_grad()
def find_modes(logits: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor, *, max_iter: int = 500,
               tol: float = 1e-7, merge_tol: float = 1e-2, min_weight: float = DEFAULT_MIN_WEIGHT) -> Modes:
    """Modes of the mixtures ``logits [B, K]``, ``means / log_scales [B, K, D]`` (one flat batch dimension).

    See :meth:`physmdn.GaussianMixture.modes` for the algorithm. Outputs have the dtype of ``means`` (float32 for
    half precision).
    """
    if not (isinstance(min_weight, (int, float)) and 0.0 <= min_weight <= 1.0):
        raise ValueError(f"min_weight must be a number in [0, 1], got {min_weight!r}")
    work = torch.float32 if means.device.type == "mps" else torch.float64
    out_dtype = means.dtype if means.dtype in (torch.float32, torch.float64) else torch.float32
    means, log_scales = means.detach().to(work), log_scales.detach().to(work)
    log_w = torch.log_softmax(logits.detach().to(work), -1)
    B, K, D = means.shape
    precision = torch.exp(-2.0 * log_scales)  # [B, K, D]
    unit = torch.exp(log_scales).amin(dim=(1, 2))  # [B] smallest scale, the length unit
    x = means.clone()  # [B, M = K starts, D]

    def log_joint(points):  # [B, M, K]: log pi_k + log N(x_m | mu_k, sigma_k)
        z = (points.unsqueeze(2) - means.unsqueeze(1)) * torch.exp(-log_scales).unsqueeze(1)
        return log_w.unsqueeze(1) + (-0.5 * z * z - log_scales.unsqueeze(1)).sum(-1) - D * HALF_LOG_2PI

    for _ in range(max_iter):
        r = torch.softmax(log_joint(x), dim=-1).unsqueeze(-1)  # [B, M, K, 1]
        weight = r * precision.unsqueeze(1)  # [B, M, K, D]
        new = (weight * means.unsqueeze(1)).sum(2) / weight.sum(2)
        step = (new - x).abs().amax(dim=(1, 2)) / unit
        x = new
        if bool((step <= tol).all()):
            break

    joint = log_joint(x)
    log_density = torch.logsumexp(joint, dim=-1)  # [B, M]
    r = torch.softmax(joint, dim=-1)  # [B, M, K]
    g_k = (means.unsqueeze(1) - x.unsqueeze(2)) * precision.unsqueeze(1)  # grad of log N_k: [B, M, K, D]
    grad = (r.unsqueeze(-1) * g_k).sum(2)
    # Hessian of log p: sum_k r_k (g_k g_k^T - Lambda_k) - grad grad^T
    mean_precision = (r.unsqueeze(-1) * precision.unsqueeze(1)).sum(2)  # [B, M, D]
    hess = torch.einsum("bmk,bmki,bmkj->bmij", r, g_k, g_k) - torch.diag_embed(mean_precision)
    hess = hess - grad.unsqueeze(-1) * grad.unsqueeze(-2)
    top = torch.linalg.eigvalsh(0.5 * (hess + hess.transpose(-1, -2)))[..., -1]  # [B, M]
    curvature = precision.amax(dim=(1, 2)).unsqueeze(-1)  # [B, 1]
    is_max = top <= 1e-6 * curvature

    return select_modes(x, log_density, is_max, log_w, unit, merge_tol=merge_tol, min_weight=min_weight,
                        out_dtype=out_dtype)


def select_modes(x: torch.Tensor, log_density: torch.Tensor, is_max: torch.Tensor, log_w: torch.Tensor,
                 unit: torch.Tensor, *, merge_tol: float, min_weight: float, out_dtype: torch.dtype) -> Modes:
    """The end points ``x [B, M = K, D]`` of the mean-shift iterations started at each component mean (their
    ``log_density [B, M]``, ``is_max [B, M]`` False for saddles) merged, weighed and padded into :class:`Modes`;
    ``log_w [B, K]`` the log-weights, ``unit [B]`` the length unit of ``merge_tol``. Shared by the diagonal and
    the correlated mixtures."""
    B, K, D = x.shape
    # greedy merge, highest density first; owner[b, m]: the kept entry that start m's mass goes to (-1: none)
    ranked = torch.where(is_max, log_density, torch.full_like(log_density, -math.inf))
    order = torch.argsort(ranked, dim=-1, descending=True)
    x = x.gather(1, order.unsqueeze(-1).expand(B, K, D))
    log_density = log_density.gather(1, order)
    start_weight = log_w.exp().gather(1, order)  # pi of the component each sorted start came from
    keep = is_max.gather(1, order)
    owner = torch.where(keep, torch.arange(K, device=x.device).expand(B, K), torch.full_like(order, -1))
    scaled = x / unit.view(B, 1, 1)
    dist = torch.cdist(scaled, scaled)  # [B, M, M]
    for m in range(1, K):
        close = (dist[:, m, :m] < merge_tol) & keep[:, :m]
        merged = close.any(-1)
        owner[:, m] = torch.where(merged, close.to(torch.int8).argmax(-1), owner[:, m])
        keep[:, m] &= ~merged
    # a mixture always has a global maximum; keep the best start if all were rejected as saddles (it takes all mass)
    none = ~keep.any(-1)
    keep[:, 0] |= none
    owner = torch.where(none.unsqueeze(-1), torch.zeros_like(owner), owner)
    mass = torch.zeros_like(start_weight).scatter_add_(1, owner.clamp_min(0), start_weight * (owner >= 0))

    # drop light modes, but never all of them: the heaviest one stays
    heaviest = torch.where(keep, mass, torch.full_like(mass, -1.0)).argmax(-1, keepdim=True)
    keep = (keep & (mass >= min_weight)) | (torch.zeros_like(keep).scatter_(1, heaviest, True) & keep)

    order = torch.argsort(keep.to(torch.int8), dim=-1, descending=True, stable=True)
    x = x.gather(1, order.unsqueeze(-1).expand(B, K, D))
    log_density, mass, keep = log_density.gather(1, order), mass.gather(1, order), keep.gather(1, order)
    locations = torch.where(keep.unsqueeze(-1), x, torch.full_like(x, math.nan)).to(out_dtype)
    log_density = torch.where(keep, log_density, torch.full_like(log_density, -math.inf)).to(out_dtype)
    mass = torch.where(keep, mass, torch.zeros_like(mass)).to(out_dtype)
    return Modes(locations, torch.exp(log_density), log_density, keep, keep.sum(-1), mass)

"""The loss of one batch for either model family.

* MDN: ``NLL + physics_weight * physics penalty + regime_weight * regime term`` (:func:`mixture_loss`, which
  uses :func:`physmdn.physics.mdn_loss` when physics is given);
* CFM (and any model with ``loss()``): ``flow matching + physics_weight * endpoint residual`` (:meth:`CFM.loss`).

Each batch also reports its terms as ``[4]`` in the order of ``TERMS`` (total, data, physics, regime), detached.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import physics_correlated
from .._mixture_nll import mixture_nll
from ..correlated import CorrelatedGaussianMixture
from ..distributions import GaussianMixture
from ..models import MDN
from ..physics import mdn_loss
from ..stationary import split_physics

__all__ = ["mixture_loss"]

TERMS = ("loss", "data", "physics", "regime")


def mixture_loss(logits: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor, target: torch.Tensor,
                 physics=None, weight: float = 1.0) -> torch.Tensor:
    """Mean MDN training loss over the batch. Scalar.

    ``physics is None`` (or ``weight == 0``): ``mean_b mixture_nll_b`` (fused op). Otherwise
    :func:`physmdn.physics.mdn_loss` with ``reduction="mean"``:
    ``mean_b [NLL_b + weight * sum_k pi_bk sum_s w_s P^s_bk]``. ``physics`` is a spec or a list of specs /
    ``(spec, weight)`` pairs bound to this batch.
    """
    if physics is None or weight == 0.0:
        return mixture_nll(logits, means, log_scales, target, reduction="mean")
    return mdn_loss(logits, means, log_scales, target, physics=physics, weight=weight, reduction="mean")


def _is_spec_like(physics) -> bool:
    """A spec or list of specs (static physics) rather than a factory ``callable(context) -> specs``."""
    return physics is not None and (isinstance(physics, (list, tuple)) or not callable(physics))


class Objective(nn.Module):
    """Loss of one batch, as a module so DistributedDataParallel can wrap the whole computation."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, y, labels, *, physics, physics_weight: float, regime_weight: float, regime_mode: str,
                time_weighting: str, generator, autocast_dtype):
        model = self.model
        zero = torch.zeros((), device=y.device)
        if not isinstance(model, MDN) and hasattr(model, "loss"):  # flow models: CFM and alike
            total, data, penalty = model.loss(x, y, residual=physics, physics_weight=physics_weight,
                                              time_weighting=time_weighting, generator=generator,
                                              autocast_dtype=autocast_dtype, return_terms=True)
            return total, torch.stack([t.detach().float() for t in (total, data, penalty, zero)])
        # physics is bound to the batch before the forward pass (e.g. Monotonic needs x.requires_grad_ first)
        specs = None
        if physics is not None and physics_weight != 0.0:
            specs = physics if _is_spec_like(physics) else physics(x)
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            mixture = model(x)
        if isinstance(mixture, CorrelatedGaussianMixture):  # MDN(covariance="full" | "lowrank")
            return _correlated_terms(mixture, y.to(mixture.dtype), labels, specs, physics_weight, regime_weight, zero)
        rotated = hasattr(mixture, "target_coordinates")  # a ConstrainedMixture: the law is built in
        if not isinstance(mixture, GaussianMixture) and not rotated:
            raise TypeError(f"model(x) must return a GaussianMixture (or the model must define loss()), "
                            f"got {type(mixture).__name__}")
        y = y.to(mixture.dtype)
        if rotated:
            if labels is not None and regime_weight != 0.0:
                raise ValueError("regime labels are not supported with a ConstrainedMDN: pass regime_weight=0")
            return _constrained_terms(mixture, y, specs, physics_weight, zero)
        # penalties on the whole mixture (physmdn.stationary) are added beside the per-component specs
        component_specs, mixture_penalties = split_physics(specs)
        total = mixture_loss(mixture.logits, mixture.means, mixture.log_scales, y, component_specs or None,
                             physics_weight)
        for penalty, w in mixture_penalties:
            total = total + (physics_weight * w) * penalty.mixture_penalty(
                mixture.logits, mixture.means, mixture.log_scales).mean()
        if specs is not None:  # only bound when physics_weight != 0
            with torch.no_grad():
                nll = mixture_nll(mixture.logits, mixture.means, mixture.log_scales, y, reduction="mean")
            # derived, not recomputed (that would evaluate the physics twice): absolute error ~ 1e-7 |nll| / weight
            penalty = ((total.detach() - nll) / physics_weight).clamp_min(0.0)
        else:
            nll, penalty = total.detach(), zero
        regime = zero
        if labels is not None and regime_weight != 0.0:
            regime = mixture.regime_loss(labels, y, regime_mode)
            total = total + regime_weight * regime
        return total, torch.stack([t.detach().float() for t in (total, nll, penalty, regime)])


def _constrained_terms(mixture, y, specs, physics_weight, zero):
    """The loss and terms of a :class:`~physmdn.ConstrainedMixture`: the fused NLL in the rotated coordinates, and
    the penalties in the outcome coordinates, where each component is ``N(S Q mu_k + loc, F_k F_k^T)``
    (:meth:`~physmdn.ConstrainedMixture.component_factors`), through the closed forms of correlated components."""
    nll = mixture_nll(mixture.logits, mixture.means, mixture.log_scales, mixture.target_coordinates(y),
                      reduction="mean")
    if specs is None:
        return nll, torch.stack([t.detach().float() for t in (nll, nll, zero, zero)])
    penalty = physics_correlated.penalty_from_factors(mixture.logits, mixture.component_means,
                                                      mixture.component_factors(), None, specs).mean()
    total = nll + physics_weight * penalty
    return total, torch.stack([t.detach().float() for t in (total, nll, penalty, zero)])


def _correlated_terms(mixture, y, labels, specs, physics_weight, regime_weight, zero):
    """The loss and terms of a full- or low-rank-covariance mixture (no fused physics kernel: plain torch)."""
    if labels is not None and regime_weight != 0.0:
        raise ValueError("regime labels are not supported with correlated components: pass regime_weight=0")
    nll = mixture.nll(y).mean()
    penalty = zero if specs is None else physics_correlated.physics_penalty(mixture, specs).mean()
    total = nll + physics_weight * penalty if specs is not None else nll
    return total, torch.stack([t.detach().float() for t in (total, nll, penalty, zero)])



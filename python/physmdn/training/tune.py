"""Choosing the physics weight on held-out data: :func:`tune_physics_weight`.

The useful weight of a penalty spans orders of magnitude between problems (its units are the residual's squared).
A small grid, each point trained from one shared warm start (the model after ``warm_epochs`` without physics), is
scored on validation data by a score of the data alone (never by a loss that contains the penalty, which would favour
weight 0 or reward the penalty for its own value): the NLL, or the energy score of the model's samples
(:func:`physmdn.metrics.energy_score`), which ranks models like the energy distance to the true conditional law.
The two can disagree: a penalty that sharpens the components can lower the held-out NLL while moving mass between
branches, which the energy score sees. The best point's model is returned.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .fit import fit

__all__ = ["TuneResult", "tune_physics_weight"]


@dataclass
class TuneResult:
    """What :func:`tune_physics_weight` returns: the chosen ``weight``, the trained ``model`` for it, and
    ``scores`` ``{weight: validation score}`` for every grid point (the best validation NLL, or the energy score of
    the restored model)."""

    weight: float
    model: nn.Module
    scores: dict

    def __repr__(self) -> str:
        grid = ", ".join(f"{w:g}: {s:.4g}" for w, s in self.scores.items())
        return f"TuneResult(weight={self.weight:g}, scores={{{grid}}})"


def tune_physics_weight(model: nn.Module, train, val, physics, *, weights: Sequence[float] = (0.0, 0.01, 0.1, 1.0, 10.0),
                        epochs: int = 100, warm_epochs: int = 0, score: str = "nll", samples: int = 64,
                        **fit_kwargs) -> TuneResult:
    """Train ``model`` once per physics weight in ``weights`` (from a shared warm start) and keep the one with the
    best validation score.

    Args:
        model: an untrained MDN (left untouched; every grid point trains a copy).
        train, val: as for :func:`~physmdn.training.fit`; ``val`` is required (the choice is made on it).
        physics: the specs or factory passed to ``fit``.
        weights: the grid (each finite and >= 0).
        epochs: epochs per grid point; warm_epochs: epochs without physics first, shared by every point.
        score: ``"nll"`` (the best validation NLL during training) or ``"energy"`` (the energy score of ``samples``
            draws per validation context from the restored model; ``val`` must then be an ``(x, y)`` pair of
            tensors; the draws use a fixed seed, the same for every grid point).
        fit_kwargs: anything else ``fit`` takes (``lr``, ``batch_size``, ``seed``, ...), the same for every point;
            fit's default early stopping on ``val`` applies to each point (``patience=None`` turns it off).

    Returns:
        :class:`TuneResult`; ties go to the smaller weight.
    """
    if val is None:
        raise ValueError("val must be given: the weight is chosen on held-out data, never on the training loss")
    weights = [float(w) for w in weights]
    if not weights or not all(math.isfinite(w) and w >= 0.0 for w in weights):
        raise ValueError(f"weights must be a non-empty list of finite numbers >= 0, got {weights}")
    if score not in ("nll", "energy"):
        raise ValueError(f"score must be 'nll' or 'energy', got {score!r}")
    if score == "energy":
        if not (isinstance(val, (tuple, list)) and len(val) >= 2 and all(isinstance(t, torch.Tensor) for t in val[:2])):
            raise ValueError(f"score='energy' needs val as an (x, y) pair of tensors, got {type(val).__name__}")
        if not isinstance(samples, int) or samples < 2:
            raise ValueError(f"samples must be an int >= 2, got {samples!r}")
    for key in ("physics", "physics_weight", "monitor", "restore_best"):
        if key in fit_kwargs:
            raise ValueError(f"{key} is set by tune_physics_weight; do not pass it in fit_kwargs")
    fit_kwargs.setdefault("progress", False)
    start = copy.deepcopy(model)
    if warm_epochs > 0:
        fit(start, train, val, epochs=warm_epochs, physics=None, physics_weight=0.0, **fit_kwargs)
    scores, models = {}, {}
    for w in sorted(set(weights)):
        candidate = copy.deepcopy(start)
        result = fit(candidate, train, val, epochs=epochs, physics=physics if w > 0 else None, physics_weight=w,
                     monitor="val_data", restore_best=True, **fit_kwargs)
        scores[w] = float(result.best_metric) if score == "nll" else _energy_score(result.model, val, samples)
        models[w] = result.model
    best = min(scores, key=lambda w: (scores[w], w))
    return TuneResult(weight=best, model=models[best], scores=scores)


def _energy_score(model: nn.Module, val, samples: int) -> float:
    """The energy score of ``samples`` draws per validation context (a fixed seed) against the observations."""
    from ..metrics import energy_score

    x, y = val[0], val[1]
    param = next(model.parameters(), None)
    device = param.device if param is not None else x.device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            draws = model(x.to(device)).sample((samples,))
        return float(energy_score(draws.reshape(samples, x.shape[0], -1).cpu(), y.reshape(x.shape[0], -1).cpu()))
    finally:
        model.train(was_training)

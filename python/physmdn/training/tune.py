"""Choosing the physics weight on held-out data: :func:`tune_physics_weight`.

The useful weight of a penalty spans orders of magnitude between problems (its units are the residual's squared).
A small grid, each point trained from one shared warm start (the model after ``warm_epochs`` without physics), is
scored on validation data by the NLL alone (never by a loss that contains the penalty, which would favour weight 0
or reward the penalty for its own value); the best point's model is returned.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Sequence

from torch import nn

from .fit import fit

__all__ = ["TuneResult", "tune_physics_weight"]


@dataclass
class TuneResult:
    """What :func:`tune_physics_weight` returns: the chosen ``weight``, the trained ``model`` for it, and
    ``scores`` ``{weight: best validation NLL}`` for every grid point."""

    weight: float
    model: nn.Module
    scores: dict

    def __repr__(self) -> str:
        grid = ", ".join(f"{w:g}: {s:.4g}" for w, s in self.scores.items())
        return f"TuneResult(weight={self.weight:g}, scores={{{grid}}})"


def tune_physics_weight(model: nn.Module, train, val, physics, *, weights: Sequence[float] = (0.0, 0.01, 0.1, 1.0, 10.0),
                        epochs: int = 100, warm_epochs: int = 0, **fit_kwargs) -> TuneResult:
    """Train ``model`` once per physics weight in ``weights`` (from a shared warm start) and keep the one with the
    lowest validation NLL.

    Args:
        model: an untrained MDN (left untouched; every grid point trains a copy).
        train, val: as for :func:`~physmdn.training.fit`; ``val`` is required (the choice is made on it).
        physics: the specs or factory passed to ``fit``.
        weights: the grid (each finite and >= 0).
        epochs: epochs per grid point; warm_epochs: epochs without physics first, shared by every point.
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
        scores[w] = float(result.best_metric)
        models[w] = result.model
    best = min(scores, key=lambda w: (scores[w], w))
    return TuneResult(weight=best, model=models[best], scores=scores)

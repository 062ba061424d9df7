"""Schedules read once per epoch or step: the physics-weight warm-up and the learning-rate factors.

* :class:`LinearWarmup`: ``physics_weight`` per epoch, ``start -> final`` linearly after ``delay`` epochs.
* ``_CosineSchedule`` / ``_ConstantSchedule``: factors of the base learning rate per optimizer step, for
  ``torch.optim.lr_scheduler.LambdaLR`` (:func:`lr_factor` chooses one).

All are plain picklable objects (unlike lambdas), so they travel inside checkpoints and to other processes.
"""

from __future__ import annotations

import math

__all__ = ["LinearWarmup", "lr_factor"]


class LinearWarmup:
    """Physics-weight schedule ``w(epoch) = start + (final - start) * clamp((epoch - delay) / epochs, 0, 1)``.

    Epochs count from 0, so with the defaults epoch 0 trains on the data alone and the weight reaches
    ``final`` at epoch ``delay + epochs``. Picklable (unlike a lambda).
    """

    def __init__(self, final: float, epochs: int, delay: int = 0, start: float = 0.0):
        if not (isinstance(epochs, int) and epochs >= 1):
            raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
        self.final, self.epochs, self.delay, self.start = float(final), epochs, int(delay), float(start)

    def __call__(self, epoch: int) -> float:
        frac = min(max((epoch - self.delay) / self.epochs, 0.0), 1.0)
        return self.start + (self.final - self.start) * frac

    def __repr__(self) -> str:
        return f"LinearWarmup(final={self.final}, epochs={self.epochs}, delay={self.delay}, start={self.start})"


class _CosineSchedule:
    """LR factor: linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_factor`` at ``total`` steps."""

    def __init__(self, total: int, warmup: int, min_factor: float):
        self.total, self.warmup, self.min_factor = total, warmup, min_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(self.total - self.warmup, 1)
        progress = min((step - self.warmup) / span, 1.0)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _ConstantSchedule:
    """LR factor: linear warm-up over ``warmup`` steps, then 1."""

    def __init__(self, warmup: int):
        self.warmup = warmup

    def __call__(self, step: int) -> float:
        return (step + 1) / self.warmup if step < self.warmup else 1.0


def lr_factor(schedule: str, total_steps: int, warmup_steps: int, min_lr_factor: float):
    """The LR factor ``callable(step) -> float`` of ``schedule`` (``"cosine"`` or ``"none"``), or None when the
    learning rate stays constant (``"none"`` without warm-up)."""
    if schedule == "cosine":
        return _CosineSchedule(total_steps, warmup_steps, min_lr_factor)
    return _ConstantSchedule(warmup_steps) if warmup_steps else None

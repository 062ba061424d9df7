"""What every physics spec shares (:mod:`physmdn.physics` and :mod:`physmdn.physics_priors` build on it): the
:class:`PhysicsSpec` base class, the couplings, and the argument checks and polynomial evaluation of the specs."""

from __future__ import annotations

from typing import Sequence

import torch

COUPLINGS = ("detached", "coupled")


def _as_tensor(value, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        return value
    if isinstance(value, (int, float)):
        return torch.tensor(float(value), dtype=torch.get_default_dtype())
    if isinstance(value, (list, tuple)):
        return torch.tensor(value, dtype=torch.get_default_dtype())
    raise TypeError(f"{name} must be a tensor or a number, got {type(value).__name__}")


def _check_broadcast(t: torch.Tensor, name: str, target: Sequence[int], layout: str) -> None:
    if t.dim() != len(target):
        raise ValueError(f"{name} must be {layout} ({len(target)} dims), got shape {tuple(t.shape)}")
    for have, want in zip(t.shape, target):
        if have not in (1, want):
            raise ValueError(f"{name} must be broadcastable to {layout} = {tuple(target)}, got shape {tuple(t.shape)}")


def _poly_eval(coeffs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``sum_j coeffs[..., j] y^j`` by Horner's rule."""
    out = torch.zeros_like(y) + coeffs[..., -1]
    for j in range(coeffs.shape[-1] - 2, -1, -1):
        out = out * y + coeffs[..., j]
    return out


class PhysicsSpec:
    """Base class. A spec is bound to one batch; :meth:`penalty` returns ``P [B, K]`` in plain torch.

    ``coupling``: ``"detached"``, ``"coupled"`` or None (take :func:`mdn_loss`'s ``coupling``)."""

    mode: str = "mean"
    coupling: str | None = None

    def validate(self, B: int, K: int, D: int) -> None:
        """Raise a clear error when the spec does not fit mixtures of shape ``[B, K, D]``."""

    def penalty(self, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


def _check_mode(mode: str, allowed: Sequence[str]) -> str:
    if mode not in allowed:
        raise ValueError(f"mode must be one of {tuple(allowed)}, got {mode!r}")
    return mode


def _check_coupling(coupling, allow_none: bool = True):
    if coupling is None and allow_none:
        return None
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling must be one of {COUPLINGS}{' or None' if allow_none else ''}, got {coupling!r}")
    return coupling

"""Dispatch of :func:`physmdn.physics.mdn_loss` to the fused kernels (placeholder: reference path)."""

from __future__ import annotations

from ._ops import mixture_nll


def fused_mdn_loss(logits, means, log_scales, target, items, weight):
    from .physics import physics_penalty

    return mixture_nll(logits, means, log_scales, target) + weight * physics_penalty(logits, means, log_scales, items)

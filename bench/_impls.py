"""The implementations the op benchmarks compare, their inputs, and the bytes each op must move.

Two ops, each as ``impl(*inputs) -> loss [B]``:

* ``nll``: ``physmdn.mixture_nll`` vs the eager reference, ``torch.compile`` of it and ``torch.distributions``
  (``MixtureSameFamily``). Inputs ``logits [B, K], means [B, K, D], log_scales [B, K, D], target [B, D]``.
* ``physics``: ``physmdn.mdn_loss`` with an exact polynomial penalty of order ``J`` (one fused kernel) vs the eager
  composition ``reference NLL + weight * physics_penalty`` and ``torch.compile`` of it. One more input,
  component-specific coefficients ``coeffs [B, K, 1, J + 1]`` (not differentiated).

Only ``logits``, ``means`` and ``log_scales`` require gradients (an MDN's outputs; the target is data).
"""

from __future__ import annotations

import torch

import physmdn
from physmdn import physics as P
from physmdn import reference

PHYSICS_WEIGHT = 0.5
DIFFERENTIABLE = 3  # the first three inputs: logits, means, log_scales


def make_inputs(op: str, B: int, K: int, D: int, dtype=torch.float32, device="cpu", J: int = 3, seed: int = 0,
                dynamic_batch: bool = True) -> list[torch.Tensor]:
    """Inputs of ``op`` without gradients; ``requires_grad_copy`` gives the differentiable twin.

    Generated on ``device`` in float32 and cast (bfloat16 sees the rounded float32 numbers). With
    ``dynamic_batch`` every input's batch dimension is marked dynamic for ``torch.compile``, so the compiled
    implementations recompile per ``(K, D, dtype)`` but not per batch size.
    """
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    tensors = [randn(B, K), randn(B, K, D), 0.3 * randn(B, K, D) - 0.5, randn(B, D)]
    if op == "physics":
        tensors.append(0.3 * randn(B, K, 1, J + 1))
    elif op != "nll":
        raise ValueError(f"op must be 'nll' or 'physics', got {op!r}")
    tensors = [t.to(dtype) for t in tensors]
    if dynamic_batch:
        for t in tensors:
            torch._dynamo.maybe_mark_dynamic(t, 0)
    return tensors


def requires_grad_copy(inputs: list[torch.Tensor], dynamic_batch: bool = True) -> list[torch.Tensor]:
    """Same storage, fresh leaves; the first three require gradients."""
    out = []
    for i, t in enumerate(inputs):
        leaf = t.detach()
        if i < DIFFERENTIABLE:
            leaf.requires_grad_(True)
        if dynamic_batch:
            torch._dynamo.maybe_mark_dynamic(leaf, 0)
        out.append(leaf)
    return out


def op_bytes(inputs: list[torch.Tensor], pass_name: str) -> int:
    """Bytes any implementation must move for one call: inputs read + outputs written, counted explicitly.

    * ``fwd``: every input read once, the loss ``[B]`` written.
    * ``bwd``: the upstream gradient ``[B]`` and every input read (a backward needs them, or something as
      large saved from the forward), one gradient written per differentiable input.
    * ``fwd+bwd``: every input read once, the loss and the gradients written (what a fused single pass moves;
      the upstream gradient of ``loss.sum()`` is a scalar).
    """
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    read = sum(size(t) for t in inputs)
    loss = inputs[0].shape[0] * inputs[0].element_size()
    grads = sum(size(t) for t in inputs[:DIFFERENTIABLE])
    if pass_name == "fwd":
        return read + loss
    if pass_name == "bwd":
        return loss + read + grads
    if pass_name == "fwd+bwd":
        return read + loss + grads
    raise ValueError(f"pass must be 'fwd', 'bwd' or 'fwd+bwd', got {pass_name!r}")


# ----- implementations ---------------------------------------------------------------------------------

def physics_fused(logits, means, log_scales, target, coeffs):
    return P.mdn_loss(logits, means, log_scales, target, physics=P.Polynomial(coeffs), weight=PHYSICS_WEIGHT,
                      reduction="none")


def physics_eager(logits, means, log_scales, target, coeffs):
    penalty = P.physics_penalty(logits, means, log_scales, P.Polynomial(coeffs))
    return reference.mixture_nll(logits, means, log_scales, target) + PHYSICS_WEIGHT * penalty


def implementations(op: str, compile_dynamic: bool | None = None) -> dict:
    """``{name: fn}`` for ``op``; ``physmdn`` first. ``compile_dynamic`` is passed to ``torch.compile``
    (None: its default, batch dimensions marked dynamic by :func:`make_inputs`)."""
    if op == "nll":
        return {
            "physmdn": physmdn.mixture_nll,
            "eager": reference.mixture_nll,
            "torch.compile": torch.compile(reference.mixture_nll, dynamic=compile_dynamic),
            "torch.distributions": reference.mixture_nll_distributions,
        }
    if op == "physics":
        return {
            "physmdn": physics_fused,
            "eager": physics_eager,
            "torch.compile": torch.compile(physics_eager, dynamic=compile_dynamic),
        }
    raise ValueError(f"op must be 'nll' or 'physics', got {op!r}")


OP_LABELS = {"nll": "mixture_nll", "physics": "mdn_loss+poly"}

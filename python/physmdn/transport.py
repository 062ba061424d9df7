"""Minibatch couplings for flow matching: which source (noise) sample is paired with which target sample.

``ot_coupling`` solves the discrete optimal-transport problem between two equal-weight point clouds with the
squared Euclidean cost ``C_ij = ||x0_i - x1_j||^2 (+ context_weight ||c_i - c_j||^2)``:

* exactly (a permutation, Hungarian algorithm via ``scipy.optimize.linear_sum_assignment``) when the batch has at
  most ``exact_max`` samples and scipy is installed. This solver runs on the CPU: the ``[N, N]`` cost matrix is
  copied to the host (one device synchronization per batch), and the resulting index goes back to the device.
* approximately, by entropic OT (log-domain Sinkhorn, in torch on the inputs' device, no host round trip) for
  larger batches, or when scipy is missing. The target ``j`` then gets a source index drawn from column ``j`` of
  the plan (with replacement, as in minibatch OT-CFM).

Layering: imports torch (and scipy lazily) only.
"""

from __future__ import annotations

import math

import torch

__all__ = ["squared_cost", "exact_assignment", "sinkhorn_plan", "ot_coupling"]


def squared_cost(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``C_ij = ||source_i - target_j||^2``: ``[N, M]`` for ``source [N, D]``, ``target [M, D]``."""
    return torch.cdist(source.float(), target.float()).square()


def exact_assignment(cost: torch.Tensor) -> torch.Tensor:
    """Source index for every target under the optimal permutation of a square ``cost [N, N]``: ``[N]`` long.

    Uses ``scipy.optimize.linear_sum_assignment`` on the CPU (the cost is copied to the host).
    """
    from scipy.optimize import linear_sum_assignment

    if cost.dim() != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"cost must be a square [N, N] matrix, got shape {tuple(cost.shape)}")
    rows, cols = linear_sum_assignment(cost.detach().double().cpu().numpy())
    source_for_target = torch.empty(cost.shape[1], dtype=torch.long)
    source_for_target[torch.as_tensor(cols, dtype=torch.long)] = torch.as_tensor(rows, dtype=torch.long)
    return source_for_target.to(cost.device)


def _sinkhorn_potentials(cost: torch.Tensor, epsilon: float, iterations: int):
    if not epsilon > 0.0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    N, M = cost.shape
    eps = epsilon * cost.mean().clamp_min(1e-12)
    log_a, log_b = -math.log(N), -math.log(M)
    f = cost.new_zeros(N)
    g = cost.new_zeros(M)
    for _ in range(int(iterations)):
        f = eps * (log_a - torch.logsumexp((g.unsqueeze(0) - cost) / eps, dim=1))
        g = eps * (log_b - torch.logsumexp((f.unsqueeze(1) - cost) / eps, dim=0))
    return f, g, eps


def sinkhorn_plan(cost: torch.Tensor, epsilon: float = 0.05, iterations: int = 100) -> torch.Tensor:
    """Entropic OT plan between uniform marginals: ``P [N, M]`` with rows summing to ``1/N``, columns to ``1/M``.

    ``P = argmin <P, C> - eps H(P)`` with ``eps = epsilon * mean(C)`` (relative, so it is scale free), by
    ``iterations`` log-domain Sinkhorn updates ``f = eps (log a - LSE_j((g_j - C_ij) / eps))``,
    ``g = eps (log b - LSE_i((f_i - C_ij) / eps))``. Column marginals are exact after the last update.
    """
    cost = cost.detach().float()
    f, g, eps = _sinkhorn_potentials(cost, epsilon, iterations)
    return torch.exp((f.unsqueeze(1) + g.unsqueeze(0) - cost) / eps)


def _scipy_available() -> bool:
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        return False
    return True


def ot_coupling(source: torch.Tensor, target: torch.Tensor, *, source_context: torch.Tensor | None = None,
                target_context: torch.Tensor | None = None, context_weight: float = 0.0, method: str = "auto",
                exact_max: int = 256, epsilon: float = 0.05, iterations: int = 100,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Index ``idx [M]`` such that ``source[idx[j]]`` is paired with ``target[j]`` by minibatch OT.

    Args:
        source: ``[N, D]`` source samples (noise).
        target: ``[M, D]`` target samples (data).
        source_context, target_context: optional ``[N, C]`` / ``[M, C]`` conditioning; with ``context_weight > 0``
            the cost gains ``context_weight * ||c_i - c_j||^2``, which keeps pairs within similar contexts. Plain
            OT on the targets alone (``context_weight = 0``) biases conditional models: the noise paired with a
            context is then no longer ``N(0, I)`` given that context.
        method: ``"exact"`` (Hungarian, CPU, needs scipy and ``N == M``), ``"sinkhorn"`` (torch, on device) or
            ``"auto"`` (exact when ``N == M <= exact_max`` and scipy is importable, else Sinkhorn).
        epsilon, iterations: Sinkhorn regularization (relative to the mean cost) and iteration count.
        generator: drives the draws from the Sinkhorn plan.
    """
    if source.dim() != 2 or target.dim() != 2 or source.shape[1] != target.shape[1]:
        raise ValueError(f"source and target must be [N, D] and [M, D] with the same D, got shapes "
                         f"{tuple(source.shape)} and {tuple(target.shape)}")
    if method not in ("auto", "exact", "sinkhorn"):
        raise ValueError(f"method must be 'auto', 'exact' or 'sinkhorn', got {method!r}")
    with torch.no_grad():
        cost = squared_cost(source, target)
        if context_weight > 0.0:
            if source_context is None or target_context is None:
                raise ValueError("source_context and target_context must be given when context_weight > 0, got None")
            cost = cost + context_weight * squared_cost(source_context, target_context)
        square = source.shape[0] == target.shape[0]
        if method == "exact" or (method == "auto" and square and source.shape[0] <= exact_max and _scipy_available()):
            if not square:
                raise ValueError(f"method 'exact' needs as many sources as targets, got N = {source.shape[0]}, "
                                 f"M = {target.shape[0]}")
            return exact_assignment(cost)
        f, _, eps = _sinkhorn_potentials(cost, epsilon, iterations)
        # column j of the plan, normalized: P(i | j) = softmax_i((f_i - C_ij) / eps), computed in log space
        column = torch.softmax((f.unsqueeze(1) - cost) / eps, dim=0).transpose(0, 1)  # [M, N]
        return torch.multinomial(column, 1, generator=generator).squeeze(-1)

"""Plain-torch references of every physmdn op. Readable, float64-capable; the tests trust these.

Shapes: ``logits [B, K]``, ``means [B, K, D]``, ``log_scales [B, K, D]``, ``target [B, D]``; correlated components
take ``scale_tril [B, K, D, D]`` or ``cov_factor [B, K, D, R]`` and ``cov_diag [B, K, D]``.
"""

from __future__ import annotations

import math

import torch

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def component_log_density(means: torch.Tensor, log_scales: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``log N(target_b | means_bk, diag(exp(log_scales_bk))^2)`` for every component: ``[B, K]``."""
    z = (target.unsqueeze(1) - means) * torch.exp(-log_scales)
    return (-0.5 * z * z - log_scales).sum(-1) - means.shape[-1] * HALF_LOG_2PI


def mixture_nll(logits: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mixture negative log-likelihood ``[B]``:

    ``-log sum_k softmax(logits)_k N(target | means_k, diag(exp(log_scales_k))^2)``
    """
    joint = torch.log_softmax(logits, dim=-1) + component_log_density(means, log_scales, target)
    return -torch.logsumexp(joint, dim=-1)


def mixture_nll_distributions(logits, means, log_scales, target) -> torch.Tensor:
    """The same quantity through ``torch.distributions`` (an independent check of the reference)."""
    dist = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=logits),
        torch.distributions.Independent(torch.distributions.Normal(means, torch.exp(log_scales)), 1),
    )
    return -dist.log_prob(target)


def mixture_nll_tril(logits: torch.Tensor, means: torch.Tensor, scale_tril: torch.Tensor,
                     target: torch.Tensor) -> torch.Tensor:
    """Per-sample NLL ``[B]`` of a mixture of full-covariance Gaussians, ``Sigma_k = L_k L_k^T``, ``L = scale_tril
    [B, K, D, D]``, through ``MixtureSameFamily(Categorical, MultivariateNormal(scale_tril=...))``."""
    dist = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=logits),
        torch.distributions.MultivariateNormal(means, scale_tril=scale_tril, validate_args=False),
    )
    return -dist.log_prob(target)


def mixture_nll_lowrank(logits: torch.Tensor, means: torch.Tensor, cov_factor: torch.Tensor, cov_diag: torch.Tensor,
                        target: torch.Tensor) -> torch.Tensor:
    """Per-sample NLL ``[B]`` of a mixture of Gaussians with ``Sigma_k = W_k W_k^T + diag(d_k)``, ``W = cov_factor
    [B, K, D, R]``, ``d = cov_diag [B, K, D]``, through ``MixtureSameFamily(Categorical, LowRankMultivariateNormal)``."""
    dist = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=logits),
        torch.distributions.LowRankMultivariateNormal(means, cov_factor, cov_diag, validate_args=False),
    )
    return -dist.log_prob(target)


def mixture_nll_dense(logits: torch.Tensor, means: torch.Tensor, covariance: torch.Tensor,
                      target: torch.Tensor) -> torch.Tensor:
    """Per-sample NLL ``[B]`` from dense covariances ``[B, K, D, D]`` by ``slogdet`` and ``solve`` (no factor: an
    independent check of the two references above)."""
    delta = target.unsqueeze(1) - means
    mahalanobis = (delta * torch.linalg.solve(covariance, delta.unsqueeze(-1)).squeeze(-1)).sum(-1)
    log_normal = -0.5 * (mahalanobis + torch.linalg.slogdet(covariance)[1]) - means.shape[-1] * HALF_LOG_2PI
    return -torch.logsumexp(torch.log_softmax(logits, dim=-1) + log_normal, dim=-1)

"""The noise floor of a residual penalty: how large the penalty is on data that hold the law up to observation noise.

With observations ``y = y* + s eps``, ``eps ~ N(0, I)``, a residual ``r`` is not zero on the data even where the
noise-free state ``y*`` satisfies the law. Its noise-induced size at a state ``mu`` is

    ``N(mu) = E ||r(mu + s eps) - r(mu)||^2``,

which for the built-in families has a closed form:

* linear ``r(y) = A y - b``: ``N = s^2 ||A||_F^2`` (no dependence on ``mu``);
* per-coordinate polynomial ``r_d(y) = g(y_d)``: with the Taylor coefficients ``h_j = s^j g^(j)(mu_d) / j!``,
  ``r_d(mu + s eps) - r_d(mu) = sum_{j>=1} h_j eps^j`` and ``N = sum_d sum_{i,j>=1} h_i h_j E[eps^(i+j)]``
  (``E eps^m = (m-1)!!`` for even ``m``, 0 for odd); to first order ``s^2 g'(mu)^2``;
* 1-D stencil ``r_i(u) = a sum_j L_ij u_j + f(u_i)``: the neighbours' noise and the own point's are independent,
  ``N = sum_i [a^2 s^2 sum_{j != i} L_ij^2 + E (q_i(u_i + s eps) - q_i(u_i))^2]`` with the own-point polynomial
  ``q_i(v) = a L_ii v + f(v)``.

Dividing a penalty by its noise floor (``normalize="noise"`` on a spec, :mod:`physmdn.physics`) makes its weight
read in units of the data's own noise: at weight 1 a component mean one noise width off the law costs about as
much as one observation one noise width off the mean costs the likelihood. The floor is taken at the component
means and averaged over the batch with the mixture weights (:func:`mixture_noise_floor`), as one detached scalar
per batch, so that it rescales the penalty without changing which states it prefers.

Layering: plain torch only (the spec classes in :mod:`physmdn.physics` call these functions).
"""

from __future__ import annotations

import math

import torch

__all__ = ["prior_weight", "PRIOR_STRENGTH", "PRIOR_WEIGHT_CAP", "check_normalize", "normal_moments", "taylor_coefficients", "polynomial_noise_floor", "linear_noise_floor",
           "stencil_noise_floor", "mixture_noise_floor", "noise_normalized", "NORMALIZATIONS"]

#: the values of a built-in spec's ``normalize`` option
NORMALIZATIONS = (None, "noise")

#: ``lambda`` of :func:`prior_weight`: the noise-normalized penalties, summed over the training set, weigh as much as
#: about this many observations
PRIOR_STRENGTH = 2.5
#: the largest weight :func:`prior_weight` gives (small ``n``): above it the pitchfork's steady penalty puts mass on
#: the unstable branch
PRIOR_WEIGHT_CAP = 0.1


def prior_weight(n_train: int, strength: float = PRIOR_STRENGTH, cap: float = PRIOR_WEIGHT_CAP) -> float:
    """The default weight of noise-normalized penalties for ``n_train`` training samples:
    ``min(cap, strength / n_train)``.

    The loss is the mean NLL plus ``weight`` times the mean penalty. A prior of fixed strength ``strength`` (in
    units of one observation's noise-scaled misfit) against a likelihood that grows with the data gives
    ``weight = strength / n``: the penalty guides small data sets and fades as the data speak. A residual law that
    the data hold only up to noise, relaxation or model error (Allen–Cahn fields sampled before they are fully
    steady) biases the fit by a fixed amount at a fixed weight, which the data do not outgrow; the ``1 / n`` decay
    keeps that bias below the data's own resolution. ``strength`` and ``cap`` were chosen on the four shipped
    problems with paired seeds (docs/results.md): 0.1 is the largest weight that keeps the pitchfork off its
    unstable branch, and at n = 256 Allen–Cahn ties the plain MDN at 0.01 and loses from 0.025 on."""
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1:
        raise ValueError(f"n_train must be an int >= 1 (the number of training samples), got {n_train!r}")
    for name, value in (("strength", strength), ("cap", cap)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(min(cap, strength / n_train))


def check_normalize(normalize, noise_scale: float):
    """``normalize`` checked: one of :data:`NORMALIZATIONS`; ``"noise"`` needs ``noise_scale > 0``."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if normalize == "noise" and not noise_scale > 0.0:
        raise ValueError(f"normalize='noise' divides by the penalty's noise floor and needs noise_scale > 0, "
                         f"got noise_scale={noise_scale!r}")
    return normalize


def normal_moments(order: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """``E[eps^m]`` for ``eps ~ N(0, 1)``, ``m = 0..order``: ``[order + 1]`` (``(m-1)!!`` for even ``m``, else 0)."""
    values = [1.0]
    for m in range(1, order + 1):
        values.append(0.0 if m % 2 else values[m - 2] * (m - 1))
    return torch.tensor(values, dtype=dtype, device=device)


def taylor_coefficients(coeffs: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Coefficients of ``g(at + t) = sum_j T_j t^j`` for ``g(y) = sum_n coeffs[..., n] y^n``: ``[..., J+1]``.

    ``T_j = sum_{n >= j} binom(n, j) coeffs_n at^(n - j)`` (``coeffs`` and ``at[..., None]`` broadcast)."""
    J = coeffs.shape[-1] - 1
    at = at.unsqueeze(-1)
    terms = []
    for j in range(J + 1):
        total = torch.zeros_like(coeffs[..., 0:1] * at)
        for n in range(j, J + 1):
            total = total + math.comb(n, j) * coeffs[..., n:n + 1] * at ** (n - j)
        terms.append(total)
    return torch.cat(terms, dim=-1)


def _shifted_square(coeffs: torch.Tensor, at: torch.Tensor, noise_scale: float) -> torch.Tensor:
    """``E (g(at + s eps) - g(at))^2`` elementwise for the polynomial ``g`` with ``coeffs [..., J+1]``."""
    taylor = taylor_coefficients(coeffs, at)  # [..., J+1]
    J = taylor.shape[-1] - 1
    if J == 0:
        return torch.zeros_like(taylor[..., 0])
    powers = noise_scale ** torch.arange(J + 1, dtype=taylor.dtype, device=taylor.device)
    h = (taylor * powers)[..., 1:]  # the eps^j coefficients, j = 1..J
    moments = normal_moments(2 * J, taylor.dtype, taylor.device)
    idx = torch.arange(1, J + 1, device=taylor.device)
    hankel = moments[idx[:, None] + idx[None, :]]  # [J, J]
    return torch.einsum("...i,ij,...j->...", h, hankel, h)


def polynomial_noise_floor(coeffs: torch.Tensor, means: torch.Tensor, noise_scale: float) -> torch.Tensor:
    """``N_bk = sum_d E (g_bkd(mu_bkd + s eps) - g_bkd(mu_bkd))^2``: ``[B, K]``.

    ``coeffs``: ``[B|1, K|1, D|1, J+1]``; ``means``: ``[B, K, D]``; ``noise_scale``: ``s``."""
    return _shifted_square(coeffs.to(means.dtype), means, noise_scale).sum(-1)


def linear_noise_floor(A: torch.Tensor, noise_scale: float) -> torch.Tensor:
    """``N_bk = s^2 ||A_bk||_F^2`` for ``r(y) = A y - b``: ``[B|1, K|1]`` (``A``: ``[B|1, K|1, M, D]``)."""
    return noise_scale**2 * A.square().sum((-2, -1))


def stencil_noise_floor(diffusion: torch.Tensor, reaction: torch.Tensor, laplacian: torch.Tensor, spacing: float,
                        means: torch.Tensor, noise_scale: float) -> torch.Tensor:
    """Noise floor ``[B, K]`` of ``r_i(u) = a sum_j L_ij u_j + f(u_i)``, ``a = diffusion / spacing^2``.

    ``diffusion``: ``[B|1, K|1]``; ``reaction``: ``[B|1, K|1, J+1]`` (``f``'s coefficients); ``laplacian``:
    ``L [D, D]``; ``means``: ``[B, K, D]``."""
    dtype = means.dtype
    a = diffusion.to(dtype) / spacing**2  # [B|1, K|1]
    L = laplacian.to(dtype)
    diag = torch.diagonal(L)
    neighbours = (L - torch.diag(diag)).square().sum(-1)  # [D]: sum_{j != i} L_ij^2
    neighbour_term = (a.square()[..., None] * noise_scale**2 * neighbours).sum(-1)  # [B|1, K|1]
    J = reaction.shape[-1] - 1
    own = torch.zeros(*torch.broadcast_shapes(a.shape, reaction.shape[:-1]), max(J, 1) + 1, dtype=dtype,
                      device=means.device)
    own[..., : J + 1] += reaction.to(dtype)
    own = own[..., None, :].repeat_interleave(means.shape[-1], dim=-2)  # [.., .., D, J'+1]
    own[..., 1] = own[..., 1] + a[..., None] * diag
    return neighbour_term + _shifted_square(own, means, noise_scale).sum(-1)


def mixture_noise_floor(floor: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The batch's noise floor, a detached scalar: ``mean_b sum_k weights_bk floor_bk`` (``floor`` broadcast to
    ``weights``' ``[B, K]``), at least the smallest normal number of its dtype so that dividing by it is safe."""
    with torch.no_grad():
        value = (torch.broadcast_to(floor, weights.shape) * weights).sum(-1).mean()
        return value.clamp_min(torch.finfo(value.dtype).tiny)


def noise_normalized(items, logits: torch.Tensor, means: torch.Tensor) -> list:
    """``items`` (``(spec, weight, ...)`` tuples) with the weight of every ``normalize="noise"`` spec divided by the
    batch's noise floor (:func:`mixture_noise_floor` of ``spec.noise_floor`` at the detached ``means [B, K, D]``,
    weighted by ``softmax(logits)``): one number per spec and batch, so the fused kernels take it as a plain
    weight. Specs without the option pass unchanged."""
    if not any(getattr(item[0], "normalize", None) == "noise" for item in items):
        return items
    B, K, D = means.shape
    out = []
    with torch.no_grad():
        pi, mu = torch.softmax(logits.detach(), dim=-1), means.detach()
        for spec, weight, *rest in items:
            if getattr(spec, "normalize", None) == "noise":
                spec.validate(B, K, D)
                weight = weight / float(mixture_noise_floor(spec.noise_floor(mu), pi))
            out.append((spec, weight, *rest))
    return out

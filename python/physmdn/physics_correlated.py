"""Physics penalties under correlated Gaussian components, and the MDN loss of a correlated mixture.

Every covariance is taken in the form ``Sigma_k = F_k F_k^T + diag(c_k)`` (``F = scale_tril, c = 0`` for
:class:`physmdn.GaussianMixtureTril`; ``F = cov_factor, c = cov_diag`` for :class:`physmdn.GaussianMixtureLowRank`),
so nothing ``D x D`` is formed beyond ``F``. The built-in families' three moments (see :mod:`physmdn.physics`)
have closed forms:

* :class:`~physmdn.physics.Polynomial` acts on each coordinate alone: its moments need only the marginals
  ``N(mu_i, Sigma_ii)``, ``Sigma_ii = |F_i|^2 + c_i``.
* :class:`~physmdn.physics.Linear`: ``E |A y - b|^2 = |A mu - b|^2 + tr(A Sigma A^T)``,
  ``tr(A Sigma A^T) = |A F|_F^2 + sum_d c_d |A_:d|^2``.
* :class:`~physmdn.physics.Stencil1D`: ``r_i = n_i + q(u_i)`` with the neighbour term ``n_i = a sum_{j != i} L_ij u_j``
  (linear) and the own-point polynomial ``q`` (reaction plus ``a L_ii u_i``). ``E r_i^2 = (E r_i)^2 + Var n_i +
  Var q(u_i) + 2 Cov(n_i, q(u_i))``, and by Stein's lemma for jointly Gaussian variables
  ``Cov(n_i, q(u_i)) = Cov(n_i, u_i) E[q'(u_i)]`` with ``Cov(n_i, u_i) = a (G F^T)_ii``, ``G = L_off F``, and
  ``Var n_i = a^2 (|G_i|^2 + sum_j L_off,ij^2 c_j)``.

Specs whose penalty reads only each coordinate's marginal (:class:`~physmdn.physics.Bounds`, and those that read the
means alone: ``Stability``, ``DynamicsStability``, ``FieldStability``, ``Monotonic``, ``Residual(mode="point")``) are
given the marginal log standard deviations and are exact as they are. The other ``Residual`` modes place their
points along the coordinate axes (a diagonal rule) and are refused.

``noise_scale = s > 0``: the expectation is taken under the noise-free covariance ``Sigma - s^2 I``. Isotropic
observation noise changes only the diagonal, so every formula above keeps its off-diagonal terms and reads the
marginal variances as ``max(Sigma_ii - s^2, 0)`` (the diagonal components' clamp); the variance of a sum
(``tr(A Sigma A^T)``, ``Var n_i``) is clamped at 0 likewise. With a diagonal factor this is exactly the diagonal
components' penalty. ``normalize="noise"`` divides the weight by the noise floor at the means, as for diagonal
components (:func:`physmdn.physics_scaling.noise_normalized`).

The built-in families' penalties run fused (``torch.ops.physmdn.correlated_penalty``: csrc/mvn_physics_math.h on CPU
and CUDA); the formulas above, in plain torch, are their float64 reference (:func:`reference_penalty`). The loss per
sample is ``NLL_b + weight * sum_k pi_bk sum_s w_s P^s_bk`` as in :func:`physmdn.mdn_loss` (the NLL through the
correlated ops, the mixture weighting in torch). Layering: imports the ops, ``physics`` and ``correlated``.
"""

from __future__ import annotations

import torch

from . import _correlated_penalty, physics_scaling
from .correlated import CorrelatedGaussianMixture
from .physics import (Bounds, DynamicsStability, FieldStability, Linear, Monotonic, PhysicsSpec, Polynomial, Residual,
                      Stability, Stencil1D, _check_coupling, _effective_coupling, _normalize_physics,
                      _poly_mean_expectation, _poly_square_expectation)

__all__ = ["expected_residual", "expected_square", "reference_penalty", "component_penalty", "physics_penalty",
           "penalty_from_factors", "mdn_loss"]

_MARGINAL_SPECS = (Bounds, Stability, DynamicsStability, FieldStability, Monotonic)


def _marginal_variance(factor: torch.Tensor, diag: torch.Tensor | None) -> torch.Tensor:
    """``Sigma_ii = |F_i|^2 + c_i``: ``[B, K, D]``."""
    var = factor.square().sum(-1)
    return var if diag is None else var + diag


def _stencil_parts(spec: Stencil1D, means: torch.Tensor):
    """``(a [.., .., 1], L_off [D, D], own [.., .., D, J'+1])`` of a stencil: ``own`` is the
    polynomial in ``u_i`` alone (reaction plus the stencil's own-point term ``a L_ii u_i``)."""
    D = means.shape[-1]
    L = spec.laplacian(D, means.dtype, means.device)
    a = spec.diffusion.to(means.dtype)[..., None] / spec.spacing**2
    c = spec.reaction.to(means.dtype)[..., None, :].expand(*torch.broadcast_shapes(
        a.shape[:-1], spec.reaction.shape[:-1]), D, spec.reaction.shape[-1])
    diag = torch.diagonal(L)
    J = c.shape[-1] - 1
    own = torch.zeros(*c.shape[:-1], max(J, 1) + 1, dtype=c.dtype, device=c.device)
    own[..., : J + 1] += c
    own = own + 0 * a[..., None]
    own[..., 1] = own[..., 1] + a * diag
    return a, L - torch.diag(diag), own


def _noise_free_variance(spec, factor: torch.Tensor, diag: torch.Tensor | None):
    """``(v*, v* - v)``: the noise-free marginal variances ``v*_i = max(Sigma_ii - s^2, 0)`` (``s = noise_scale``)
    and their change from ``v_i = Sigma_ii``, both ``[B, K, D]``. Observation noise ``s eps``, ``eps ~ N(0, I)``,
    adds ``s^2`` to the diagonal of ``Sigma`` alone, so the off-diagonal covariances are the noise-free ones; the
    clamp at 0 is the diagonal components' ``relu(sigma^2 - s^2)`` (:mod:`physmdn.physics`)."""
    var = _marginal_variance(factor, diag)
    noise = float(getattr(spec, "noise_scale", 0.0))
    if noise <= 0.0:
        return var, None
    free = torch.clamp(var - noise * noise, min=0.0)
    return free, free - var


def expected_residual(spec, means: torch.Tensor, factor: torch.Tensor, diag: torch.Tensor | None) -> torch.Tensor:
    """``E r(Y)`` for ``Y ~ N(mu_k, F_k F_k^T + diag(c_k))``: ``[B, K, M]`` (``M = D`` for Polynomial and
    Stencil1D, the rows of ``A`` for Linear). ``means [B, K, D]``, ``factor [B, K, D, Q]``, ``diag [B, K, D]``
    or None."""
    if isinstance(spec, Linear):
        return spec.residual(means)
    var, _ = _noise_free_variance(spec, factor, diag)
    if isinstance(spec, Polynomial):
        return _poly_mean_expectation(spec.coeffs.to(means.dtype), means, var)
    if isinstance(spec, Stencil1D):
        a, off, own = _stencil_parts(spec, means)
        return a * (means @ off.T) + _poly_mean_expectation(own, means, var)
    raise TypeError(f"spec must be a Polynomial, Linear or Stencil1D, got {type(spec).__name__}")


def expected_square(spec, means: torch.Tensor, factor: torch.Tensor, diag: torch.Tensor | None) -> torch.Tensor:
    """``E |r(Y)|^2`` for ``Y ~ N(mu_k, F_k F_k^T + diag(c_k))``: ``[B, K]`` (arguments as
    :func:`expected_residual`)."""
    var, shift = _noise_free_variance(spec, factor, diag)
    if isinstance(spec, Linear):
        A = spec.A.to(means.dtype)
        spread = (A @ factor).square().sum((-2, -1))  # tr(A Sigma A^T)
        if diag is not None:
            spread = spread + (A.square().sum(-2) * diag).sum(-1)
        if shift is not None:
            spread = torch.clamp(spread + (A.square().sum(-2) * shift).sum(-1), min=0.0)
        return spec.residual(means).square().sum(-1) + spread
    if isinstance(spec, Polynomial):
        return _poly_square_expectation(spec.coeffs.to(means.dtype), means, var).sum(-1)
    if isinstance(spec, Stencil1D):
        a, off, own = _stencil_parts(spec, means)
        neighbours = off @ factor  # G = L_off F: [B, K, D, Q]
        neighbour_var = a.square() * neighbours.square().sum(-1)
        if diag is not None:
            neighbour_var = neighbour_var + a.square() * (diag @ off.square().T)
        if shift is not None:
            neighbour_var = torch.clamp(neighbour_var + a.square() * (shift @ off.square().T), min=0.0)
        cross = a * (neighbours * factor).sum(-1)  # Cov(n_i, u_i) (L_off has a zero diagonal: no c_i term)
        slope = own[..., 1:] * torch.arange(1, own.shape[-1], dtype=own.dtype, device=own.device)  # q'
        own_mean = _poly_mean_expectation(own, means, var)
        own_var = _poly_square_expectation(own, means, var) - own_mean.square()
        mean = a * (means @ off.T) + own_mean
        stein = 2.0 * cross * _poly_mean_expectation(slope, means, var)
        return (mean.square() + neighbour_var + own_var + stein).sum(-1)
    raise TypeError(f"spec must be a Polynomial, Linear or Stencil1D, got {type(spec).__name__}")


def reference_penalty(spec, means: torch.Tensor, factor: torch.Tensor, diag: torch.Tensor | None) -> torch.Tensor:
    """``P_bk`` of a Polynomial, Linear or Stencil1D spec under correlated components in plain torch: ``[B, K]``
    (its ``moment``: ``"second"`` ``E |r|^2``, ``"first"`` ``|E r|^2``, ``"point"`` ``|r(mu)|^2``). The float64
    reference of the fused op (:func:`component_penalty`), and its implementation on devices without kernels."""
    if spec.moment == "point":
        return spec.penalty(means, torch.zeros_like(means))  # (the point value does not read the scales)
    if spec.moment == "first":
        return expected_residual(spec, means, factor, diag).square().sum(-1)
    return expected_square(spec, means, factor, diag)


def component_penalty(spec: PhysicsSpec, means: torch.Tensor, factor: torch.Tensor,
                      diag: torch.Tensor | None) -> torch.Tensor:
    """``P_bk`` of one spec under correlated components: ``[B, K]`` (its ``moment``: ``"second"`` ``E |r|^2``,
    ``"first"`` ``|E r|^2``, ``"point"`` ``|r(mu)|^2``). The built-in families run the fused op
    ``torch.ops.physmdn.correlated_penalty`` (forward and backward in one kernel each), except when a parameter of the
    spec needs a gradient or the polynomial order exceeds the kernels' (then :func:`reference_penalty`)."""
    if isinstance(spec, (Polynomial, Linear, Stencil1D)):
        fused = _correlated_penalty.penalty(spec, means, factor, diag)
        return reference_penalty(spec, means, factor, diag) if fused is None else fused
    if isinstance(spec, _MARGINAL_SPECS) or (isinstance(spec, Residual) and spec.mode == "point"):
        return spec.penalty(means, 0.5 * torch.log(_marginal_variance(factor, diag)))
    raise NotImplementedError(
        f"{type(spec).__name__}{'(mode=' + repr(spec.mode) + ')' if isinstance(spec, Residual) else ''} has no "
        f"expectation under correlated components; use Polynomial, Linear, Stencil1D, Bounds, the stability "
        f"and monotonicity specs, or Residual(mode='point')")


def _check_mixture(mixture) -> None:
    if not isinstance(mixture, CorrelatedGaussianMixture):
        raise TypeError(f"mixture must be a GaussianMixtureTril or GaussianMixtureLowRank, got "
                        f"{type(mixture).__name__} (diagonal mixtures: physmdn.mdn_loss)")


def physics_penalty(mixture: CorrelatedGaussianMixture, physics, coupling: str = "detached") -> torch.Tensor:
    """``sum_k pi_bk sum_s w_s P^s_bk`` for a correlated mixture with batch ``[B]``: ``[B]``. ``physics``: a spec
    or a list of specs / ``(spec, weight)`` pairs bound to the batch; ``coupling`` as in
    :func:`physmdn.mdn_loss` (a spec's own coupling first)."""
    _check_mixture(mixture)
    N, K, D = mixture.batch_size, mixture.num_components, mixture.event_dim
    factor, diag = mixture.factor()
    return penalty_from_factors(mixture.logits.reshape(N, K), mixture.means.reshape(N, K, D),
                                factor.reshape(N, K, D, factor.shape[-1]),
                                None if diag is None else diag.reshape(N, K, D), physics, coupling)


def penalty_from_factors(logits: torch.Tensor, means: torch.Tensor, factor: torch.Tensor, diag: torch.Tensor | None,
                         physics, coupling: str = "detached") -> torch.Tensor:
    """:func:`physics_penalty` of the mixture with ``logits [N, K]`` and components ``N(means_k, F_k F_k^T +
    diag(c_k))`` (``means [N, K, D]``, ``factor [N, K, D, Q]``, ``diag [N, K, D]`` or None): ``[N]``. Any
    Gaussian mixture whose components are affine images of diagonal Gaussians fits this form, e.g. a
    :class:`physmdn.ConstrainedMixture` in the outcome coordinates (``F_k = S Q diag(s_k)``)."""
    coupling = _check_coupling(coupling, allow_none=False)
    N, K, D = means.shape
    pi = torch.softmax(logits, dim=-1)
    total = means.new_zeros(N)
    # normalize="noise": the weight divided by the noise floor at the means, as for diagonal components
    for spec, w in physics_scaling.noise_normalized(_normalize_physics(physics), logits, means):
        spec.validate(N, K, D)
        weights = pi.detach() if _effective_coupling(spec, coupling) == "detached" else pi
        total = total + (weights * (w * component_penalty(spec, means, factor, diag))).sum(-1)
    return total


def mdn_loss(mixture: CorrelatedGaussianMixture, target: torch.Tensor, physics=None, weight: float = 1.0,
             reduction: str = "mean", coupling: str = "detached") -> torch.Tensor:
    """``loss_b = -log p(target_b) + weight * physics_penalty_b`` for a correlated mixture (batch ``[B]``,
    ``target [B, D]``), reduced by ``reduction`` (``"mean"``, ``"sum"`` or ``"none"``)."""
    _check_mixture(mixture)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    loss = mixture.nll(target).reshape(-1)
    if physics is not None and weight != 0.0:
        loss = loss + weight * physics_penalty(mixture, physics, coupling)
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss

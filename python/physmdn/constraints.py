"""Hard linear laws: a law ``A(x) y = b(x)`` that holds exactly (a jump condition, a conservation law, fractions
that sum to one) built into the model instead of penalized.

Per sample, an orthonormal basis ``Q = [Q_r, Q_n]`` of the outcome space splits it into the ``M`` directions the
law fixes (``Q_r``, the range of ``A^T``) and the ``D - M`` it leaves free (``Q_n``, the null space of ``A``), from
a Householder QR of ``A^T``: ``A^T = Q_r R``. In the rotated coordinates ``z = Q^T y`` the law reads
``z_r = R^{-T} b =: c``: every component puts ``z_r ~ N(c, s^2 I)`` with a fixed small observation-noise scale ``s``
and a diagonal Gaussian of its own on the free coordinates ``z_n``. The rotation is orthonormal, so
``log p(y) = log p_z(Q^T y)``: the fused mixture NLL runs unchanged on the rotated target.

:class:`ConstrainedMDN` wraps an :class:`~physmdn.models.MDN` over the free coordinates;
:class:`ConstrainedMixture` is its output distribution (samples, means and modes satisfy the law to ``s``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .distributions import GaussianMixture
from .models import MDN

__all__ = ["LinearConstraint", "ConstrainedMixture", "ConstrainedMDN"]


class LinearConstraint:
    """The law ``A(x) y = b(x)``, ``M`` independent rows on ``D`` outcomes (``M < D``).

    Args:
        A: ``[M, D]`` tensor (one law for every context) or ``callable(x [B, C]) -> [B, M, D]``.
        b: None (zero), ``[M]`` tensor or ``callable(x [B, C]) -> [B, M]``.
        noise_scale: the standard deviation ``s > 0`` every component keeps along the fixed directions (the
            observation noise of the law; the likelihood of data off the law by more than ``s`` is small), in the
            coordinates the basis is taken in (a :class:`ConstrainedMDN`'s standardized outcomes).

    The basis carries no gradient to ``A`` or ``b``: they are data of the problem, not learned.
    """

    def __init__(self, A, b=None, noise_scale: float = 1e-3):
        if not (callable(A) or isinstance(A, torch.Tensor)):
            raise TypeError(f"A must be a [M, D] tensor or callable(x) -> [B, M, D], got {type(A).__name__}")
        if isinstance(A, torch.Tensor) and (A.dim() != 2 or A.shape[0] >= A.shape[1] or A.shape[0] < 1):
            raise ValueError(f"A must be [M, D] with 1 <= M < D, got shape {tuple(A.shape)}")
        if b is not None and not (callable(b) or isinstance(b, torch.Tensor)):
            raise TypeError(f"b must be None, a [M] tensor or callable(x) -> [B, M], got {type(b).__name__}")
        noise_scale = float(noise_scale)
        if not (noise_scale > 0.0 and math.isfinite(noise_scale)):
            raise ValueError(f"noise_scale must be a finite number > 0, got {noise_scale}")
        self.A, self.b, self.noise_scale = A, b, noise_scale

    def matrices(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [B, M, D], b [B, M])`` at contexts ``x [B, C]``."""
        B = x.shape[0]
        A = self.A(x) if callable(self.A) else self.A.to(x.device, x.dtype).expand(B, *self.A.shape)
        if A.dim() != 3 or A.shape[0] != B or not 1 <= A.shape[1] < A.shape[2]:
            raise ValueError(f"A(x) must be [B, M, D] with B = {B} and 1 <= M < D, got shape {tuple(A.shape)}")
        M = A.shape[1]
        if self.b is None:
            b = A.new_zeros(B, M)
        else:
            b = self.b(x) if callable(self.b) else self.b.to(x.device, x.dtype).expand(B, *self.b.shape)
        if tuple(b.shape) != (B, M):
            raise ValueError(f"b(x) must be [B, M] = {(B, M)}, got shape {tuple(b.shape)}")
        return A, b

    def rows(self, x: torch.Tensor) -> int:
        return self.matrices(x[:1])[0].shape[1]

    @torch.no_grad()
    def basis(self, x: torch.Tensor, loc: torch.Tensor | None = None,
              scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q [B, D, D], c [B, M])``: ``Q``'s first ``M`` columns span the fixed directions, the others the free
        ones; the law is ``Q[:, :, :M]^T u = c`` in the coordinates ``u = (y - loc) / scale`` (``y`` itself without
        ``loc`` / ``scale``), where it reads ``(A diag(scale)) u = b - A loc``. Computed in float64, returned in
        ``x``'s dtype."""
        A, b = self.matrices(x)
        if scale is not None:
            b = b - A @ loc.to(A) if loc is not None else b
            A = A * scale.to(A)
        M = A.shape[1]
        Q, R = torch.linalg.qr(A.double().transpose(1, 2), mode="complete")  # A^T = Q R (Householder)
        R = R[:, :M, :M]
        diag = R.diagonal(dim1=-2, dim2=-1).abs()
        if bool((diag <= 1e-12 * diag.amax(-1, keepdim=True).clamp_min(1e-300)).any()) or not bool(diag.gt(0).all()):
            raise ValueError("A(x) must have full row rank M for every context (its rows independent)")
        c = torch.linalg.solve_triangular(R.transpose(1, 2), b.double().unsqueeze(-1), upper=False).squeeze(-1)
        return Q.to(x.dtype), c.to(x.dtype)

    def residual(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``A(x) y - b(x)``: ``[..., B, M]`` for ``y [..., B, D]``."""
        A, b = self.matrices(x)
        return torch.einsum("bmd,...bd->...bm", A.to(y.dtype), y) - b.to(y.dtype)


def _rotate(Q: torch.Tensor, v: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``Q v`` (or ``Q^T v``) per batch row for ``v [..., B, D]``, ``Q [B, D, D]``."""
    return torch.einsum("bji,...bj->...bi" if transpose else "bij,...bj->...bi", Q.to(v.dtype), v)


class ConstrainedMixture:
    """A diagonal Gaussian mixture ``base`` (batch ``[B]``, event ``[D]``) over ``z``, seen in the outcome space
    through the orthonormal ``Q [B, D, D]`` and a per-output affine standardization: ``y = loc + scale * (Q z)``.
    ``log p(y) = base.log_prob(Q^T (y - loc) / scale) - sum_d log scale_d``; samples, means, covariances and modes
    are mapped the same way.

    ``logits``, ``means``, ``log_scales`` are the base's (``z`` coordinates); :meth:`target_coordinates` maps an
    outcome to them, so that a training loss on ``(logits, means, log_scales, target_coordinates(y))`` is the
    mixture NLL of ``y`` up to the constant ``sum_d log scale_d``."""

    def __init__(self, base: GaussianMixture, Q: torch.Tensor, loc: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None):
        D = base.means.shape[-1]
        if Q.dim() != 3 or tuple(Q.shape) != (base.means.shape[0], D, D):
            raise ValueError(f"Q must be [B, D, D] matching the base mixture, got shape {tuple(Q.shape)}")
        dtype = base.means.dtype
        self.base, self.Q = base, Q
        self.loc = torch.zeros(D, dtype=dtype, device=Q.device) if loc is None else loc.to(dtype)
        self.scale = torch.ones(D, dtype=dtype, device=Q.device) if scale is None else scale.to(dtype)

    logits = property(lambda self: self.base.logits)
    means = property(lambda self: self.base.means)
    log_scales = property(lambda self: self.base.log_scales)
    weights = property(lambda self: self.base.weights)
    dtype = property(lambda self: self.base.means.dtype)

    def _to_outcome(self, z: torch.Tensor) -> torch.Tensor:
        return self.loc.to(z.dtype) + self.scale.to(z.dtype) * _rotate(self.Q, z, transpose=False)

    def target_coordinates(self, y: torch.Tensor) -> torch.Tensor:
        """``Q^T (y - loc) / scale``: outcomes ``[..., B, D]`` in the base's coordinates."""
        return _rotate(self.Q, (y - self.loc.to(y.dtype)) / self.scale.to(y.dtype), transpose=True)

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        return self.base.log_prob(self.target_coordinates(y)) - self.scale.log().sum().to(y.dtype)

    def nll(self, y: torch.Tensor) -> torch.Tensor:
        return -self.log_prob(y)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return self._to_outcome(self.base.sample(sample_shape))

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return self._to_outcome(self.base.rsample(sample_shape))

    @property
    def component_means(self) -> torch.Tensor:
        """``[B, K, D]`` component means in the outcome space."""
        return self.loc + self.scale * torch.einsum("bij,bkj->bki", self.Q.to(self.dtype), self.means)

    def component_factors(self) -> torch.Tensor:
        """``[B, K, D, D]`` factors ``F_k = S Q diag(s_k)`` of the components' covariances in the outcome space,
        ``Sigma_k = F_k F_k^T`` (with :attr:`component_means`: the form physics penalties take,
        :func:`physmdn.physics_correlated.penalty_from_factors`)."""
        M = self.scale.unsqueeze(-1) * self.Q.to(self.dtype)  # [B, D, D]
        return M.unsqueeze(1) * torch.exp(self.log_scales).unsqueeze(-2)

    @property
    def marginal_scales(self) -> torch.Tensor:
        """``[B, K, D]`` standard deviations of each component's marginal along each outcome:
        ``scale_d sqrt(sum_j Q_dj^2 s_kj^2)`` (the marginal means are :attr:`component_means`)."""
        Q2 = self.Q.to(self.dtype).square()  # [B, D, D]
        return self.scale * torch.einsum("bdj,bkj->bkd", Q2, torch.exp(2 * self.log_scales)).sqrt()

    @property
    def mean(self) -> torch.Tensor:
        return self._to_outcome(self.base.mean)

    @property
    def covariance(self) -> torch.Tensor:
        """``[B, D, D]``: ``S Q Cov_z Q^T S``, ``S = diag(scale)``."""
        M = self.scale.unsqueeze(-1) * self.Q.to(self.dtype)
        return M @ self.base.covariance @ M.transpose(1, 2)

    def modes(self, **kwargs):
        """The base's modes (:meth:`GaussianMixture.modes`) mapped to the outcome space: the same maxima and masses,
        densities divided by ``prod_d scale_d``."""
        modes = self.base.modes(**kwargs)
        Q = self.Q.to(modes.locations.dtype)
        log_det = self.scale.log().sum().to(modes.log_densities.dtype)
        return modes._replace(locations=self.loc + self.scale * torch.einsum("bij,bkj->bki", Q, modes.locations),
                              log_densities=modes.log_densities - log_det,
                              densities=modes.densities / log_det.exp())


class ConstrainedMDN(nn.Module):
    """A mixture density network whose every component satisfies ``A(x) y = b(x)`` (to ``noise_scale``).

    An :class:`~physmdn.models.MDN` (``mdn_kwargs``) gives ``K`` components over the ``D - M`` free coordinates;
    the ``M`` fixed ones are ``N(c(x), noise_scale^2)`` in every component. ``forward(x [B, C]) ->``
    :class:`ConstrainedMixture`. Physics penalties (``fit(..., physics=...)``) act in the outcome coordinates, where
    each component is a full-covariance Gaussian (:meth:`ConstrainedMixture.component_factors`): the specs
    :mod:`physmdn.physics_correlated` supports apply, with their closed forms.
    """

    def __init__(self, in_features: int, out_features: int, constraint: LinearConstraint, components: int,
                 rows: int, **mdn_kwargs):
        super().__init__()
        if not isinstance(constraint, LinearConstraint):
            raise TypeError(f"constraint must be a LinearConstraint, got {type(constraint).__name__}")
        if not 1 <= int(rows) < int(out_features):
            raise ValueError(f"rows must be the law's M with 1 <= M < out_features = {out_features}, got {rows}")
        self.constraint, self.rows = constraint, int(rows)
        self.in_features, self.out_features, self.components = int(in_features), int(out_features), int(components)
        self.free = MDN(in_features, out_features - self.rows, components, **mdn_kwargs)
        # the rotation is taken in standardized outcomes (y - y_loc) / y_scale, so that outputs of different units
        # (km/s and GPa) do not decide which coordinate is free
        self.register_buffer("y_loc", torch.zeros(self.out_features))
        self.register_buffer("y_scale", torch.ones(self.out_features))
        self.config = {"in_features": self.in_features, "out_features": self.out_features,
                       "components": self.components, "rows": self.rows, **mdn_kwargs}

    @property
    def normalization_set(self) -> torch.Tensor:
        """Whether :meth:`set_normalization` ran (``fit`` calls it once, with the training data)."""
        return self.free.normalization_set

    @torch.no_grad()
    def set_normalization(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> None:
        """Standardize with the data's contexts and free coordinates ``Q_n^T y``."""
        free = None
        if y is not None:
            y64 = y.detach().double()
            std = y64.std(0, unbiased=False)
            self.y_loc.copy_(y64.mean(0))
            self.y_scale.copy_(torch.where(std > 1e-12 * (1 + self.y_loc.abs()), std, torch.ones_like(std)))
        if x is not None and y is not None:
            Q, _ = self.constraint.basis(x.to(self.free.x_loc.dtype), self.y_loc, self.y_scale)
            u = (y.to(Q.dtype) - self.y_loc.to(Q.dtype)) / self.y_scale.to(Q.dtype)
            free = _rotate(Q, u, transpose=True)[:, self.rows:]
        self.free.set_normalization(x, free)

    def forward(self, x: torch.Tensor) -> ConstrainedMixture:
        mixture = self.free(x)
        x = x.to(mixture.means.dtype)
        Q, c = self.constraint.basis(x, self.y_loc, self.y_scale)
        B, K = mixture.logits.shape
        if c.shape[-1] != self.rows:
            raise ValueError(f"the constraint has M = {c.shape[-1]} rows at these contexts, the model {self.rows}")
        fixed_means = c.unsqueeze(1).expand(B, K, self.rows)
        fixed_scales = mixture.log_scales.new_full((B, K, self.rows), math.log(self.constraint.noise_scale))
        base = GaussianMixture(mixture.logits, torch.cat([fixed_means, mixture.means], -1),
                               torch.cat([fixed_scales, mixture.log_scales], -1), validate_args=False)
        return ConstrainedMixture(base, Q, self.y_loc, self.y_scale)

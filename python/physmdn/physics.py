"""Component-specific physics penalties for mixture density networks.

For sample ``b`` and component ``k`` a residual ``r_k(y; x_b)`` measures how far an outcome ``y``
violates the governing law. Each spec turns it into a penalty ``P_bk`` of shape ``[B, K]``. The built-in
families (:class:`Polynomial`, :class:`Linear`, :class:`Stencil1D`) offer three moments under component ``k``'s
Gaussian ``Y ~ N(mu_bk, diag sigma_bk^2)``, all in closed form:

* ``moment="second"``: ``P_bk = E ||r_k(Y)||^2``. Right when each component is one state plus noise (an
  equilibrium branch of a bifurcation, a shock regime).
* ``moment="first"``: ``P_bk = ||E r_k(Y)||^2``. Right when a component spans a family of states (kinks at many
  positions on a field): the law holds for each state, not for the component's spread, so only the mean residual
  is asked to vanish.
* ``moment="point"``: ``P_bk = ||r_k(mu_bk)||^2``.

The training loss per sample is ``NLL_b + lambda * sum_k pi_bk P_bk`` with ``pi = softmax(logits)``
(:func:`mdn_loss`). ``coupling`` says whether the penalty's gradient reaches the mixture weights: ``"detached"``
(the default) treats ``pi`` as a constant of the penalty, so the weights are learned from the likelihood alone;
``"coupled"`` adds ``pi_k (Q_k - sum_j pi_j Q_j)`` to the logit gradient and moves mass towards components with
small penalties. A steady-state law says nothing about which basin a trajectory ends in, so coupling biases the
branch weights (docs/physics.md).

Noise-aware penalties. With observations ``y = y* + eps``, ``eps ~ N(0, s_n^2)``, the law holds for the
noise-free ``y*``, whose spread under component ``k`` is ``max(sigma^2 - s_n^2, 0)``. With ``noise_scale=s_n``
the built-in families take their moments under that noise-free variance, which leaves a component whose spread is
the noise alone unpenalized. With ``normalize="noise"`` as well, the penalty is divided by its noise floor
``E ||r(mu + s_n eps) - r(mu)||^2`` at the component means (:mod:`physmdn.physics_scaling`), so that weight 1 means
"as strong as the data's own noise".

Every spec has a plain-torch :meth:`~PhysicsSpec.penalty` (the reference the kernels are tested against).
The built-in families also run fused with the mixture NLL in one kernel pass (``torch.ops.physmdn.mdn_loss_*``).
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F

from . import _fused, _ops
from . import _validation as check
from . import physics_scaling
from ._mixture_nll import mixture_nll
from ._physics_base import (COUPLINGS, PhysicsSpec, _as_tensor, _check_broadcast, _check_coupling, _check_mode,
                            _poly_eval)
from .physics_priors import Bounds, DynamicsStability, Monotonic, Stability

__all__ = [
    "MOMENTS", "COUPLINGS", "PhysicsSpec", "Polynomial", "Linear", "Stencil1D", "Residual", "Stability",
    "DynamicsStability", "FieldStability", "Monotonic",
    "Bounds",
    "mdn_loss", "physics_penalty", "gaussian_moments",
]

MOMENTS = ("second", "first", "point")
_MOMENT_ALIASES = {"exact": "second", "mean": "point"}  # the earlier ``mode`` names


def _component_variance(log_scales: torch.Tensor, noise_scale: float) -> torch.Tensor:
    var = torch.exp(2.0 * log_scales)
    if noise_scale > 0.0:
        var = torch.clamp(var - noise_scale * noise_scale, min=0.0)
    return var


def gaussian_moments(mean: torch.Tensor, var: torch.Tensor, order: int) -> torch.Tensor:
    """Raw moments ``E[y^n]``, ``n = 0..order``, of ``N(mean, var)``: ``[..., order + 1]``.

    Recurrence ``M_n = mean M_{n-1} + (n - 1) var M_{n-2}``.
    """
    moments = [torch.ones_like(mean)]
    if order >= 1:
        moments.append(mean)
    for n in range(2, order + 1):
        moments.append(mean * moments[n - 1] + (n - 1) * var * moments[n - 2])
    return torch.stack(moments, dim=-1)


def _poly_square_expectation(coeffs: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``E[(sum_j c_j y^j)^2]`` for ``y ~ N(mean, var)``, elementwise: ``sum_{i,j} c_i c_j M_{i+j}``."""
    J = coeffs.shape[-1] - 1
    moments = gaussian_moments(mean, var, 2 * J)  # [..., 2J+1]
    idx = torch.arange(J + 1, device=mean.device)
    hankel = moments[..., idx[:, None] + idx[None, :]]  # [..., J+1, J+1]
    return torch.einsum("...i,...ij,...j->...", coeffs, hankel, coeffs)


def _poly_mean_expectation(coeffs: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``E[sum_j c_j y^j]`` for ``y ~ N(mean, var)``."""
    moments = gaussian_moments(mean, var, coeffs.shape[-1] - 1)
    return (coeffs * moments).sum(-1)


def _check_moment(moment, mode=None) -> str:
    """The moment of a built-in family from ``moment`` or its older name ``mode`` ("exact" / "mean")."""
    if mode is not None:
        if moment is not None:
            raise ValueError(f"give moment or mode, not both (got moment={moment!r}, mode={mode!r})")
        moment = mode
    if moment is None:
        return "second"
    moment = _MOMENT_ALIASES.get(moment, moment)
    if moment not in MOMENTS:
        raise ValueError(f"moment must be one of {MOMENTS} (or 'exact' / 'mean'), got {moment!r}")
    return moment


class _BuiltinFamily(PhysicsSpec):
    """What the fused families share: the moment, the noise scale, the coupling and ``normalize`` (None, or
    ``"noise"``: divide the penalty by its noise floor at ``noise_scale``, :mod:`physmdn.physics_scaling`)."""

    moment: str = "second"

    def _set_options(self, moment, mode, noise_scale, coupling, normalize=None) -> None:
        self.moment = _check_moment(moment, mode)
        self.noise_scale = _check_noise(noise_scale)
        self.coupling = _check_coupling(coupling)
        self.normalize = physics_scaling.check_normalize(normalize, self.noise_scale)

    def noise_floor(self, means: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """``E ||r(mu + s eps) - r(mu)||^2`` at ``means [B, K, D]`` with ``s = noise_scale``: ``[B|1, K|1]``."""
        raise NotImplementedError

    @property
    def mode(self) -> str:
        """The moment under its older name: "exact" (second), "mean" (point) or "first"."""
        return {"second": "exact", "point": "mean"}.get(self.moment, self.moment)

    def _variance(self, log_scales: torch.Tensor) -> torch.Tensor | None:
        """The variance the moments are taken under (None for the point value)."""
        return None if self.moment == "point" else _component_variance(log_scales, self.noise_scale)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(moment={self.moment!r}, coupling={self.coupling!r})"

    # The fused kernel's view of the spec (python/physmdn/_fused.py): whether it runs inside the kernel, and its
    # arguments (family, p0, p1, moment, spacing, boundary, noise_scale), parameters expanded to [B, K, ...] by
    # ``expand(tensor, shape)``.
    fusable = True

    def kernel_args(self, B: int, K: int, D: int, expand) -> tuple:  # pragma: no cover
        raise NotImplementedError

    def _kernel_moment(self) -> int:
        return _fused.MOMENT_CODES[self.moment]


def _check_noise(noise_scale) -> float:
    return check.nonnegative(noise_scale, "noise_scale")


class Polynomial(_BuiltinFamily):
    """Per-dimension polynomial residual ``r_d(y) = sum_{j=0..J} coeffs[b, k, d, j] y_d^j``.

    ``coeffs``: ``[B|1, K|1, D|1, J+1]`` (a 1-D ``[J+1]`` is taken as ``[1, 1, 1, J+1]``); component-specific
    laws use a K axis. Pitchfork ``r y - y^3``: ``coeffs = [0, r, 0, -1]``.

    ``P_bk = sum_d E[r_d(Y)^2]`` (``moment="second"``, through Gaussian moments up to order ``2J``),
    ``sum_d (E r_d(Y))^2`` (``"first"``, moments up to ``J``) or ``sum_d r_d(mu_bkd)^2`` (``"point"``).
    ``mode="exact"`` / ``"mean"`` are accepted for ``"second"`` / ``"point"``.
    """

    family = "polynomial"

    def __init__(self, coeffs, moment: str | None = None, noise_scale: float = 0.0, coupling: str | None = None, *,
                 mode: str | None = None, normalize: str | None = None):
        coeffs = _as_tensor(coeffs, "coeffs")
        if coeffs.dim() == 1:
            coeffs = coeffs.reshape(1, 1, 1, -1)
        if coeffs.dim() != 4:
            raise ValueError(f"coeffs must be [B|1, K|1, D|1, J+1] (or [J+1]), got shape {tuple(coeffs.shape)}")
        if coeffs.shape[-1] < 1:
            raise ValueError(f"coeffs must hold J+1 >= 1 coefficients (order J >= 0), got shape {tuple(coeffs.shape)}")
        self.coeffs = coeffs
        self._set_options(moment, mode, noise_scale, coupling, normalize)

    def noise_floor(self, means):
        return physics_scaling.polynomial_noise_floor(self.coeffs, means, self.noise_scale)

    @property
    def order(self) -> int:
        return self.coeffs.shape[-1] - 1

    @property
    def fusable(self) -> bool:
        return self.order <= _fused.MAX_ORDER

    def kernel_args(self, B, K, D, expand):
        coeffs = expand(self.coeffs, (B, K, D, self.coeffs.shape[-1]))
        return _fused.FAMILY_POLYNOMIAL, coeffs, None, self._kernel_moment(), 1.0, 0, self.noise_scale

    def validate(self, B, K, D):
        _check_broadcast(self.coeffs, "Polynomial coeffs", (B, K, D, self.coeffs.shape[-1]), "[B|1, K|1, D|1, J+1]")

    def residual(self, y: torch.Tensor) -> torch.Tensor:
        """``r(y)`` for ``y [B, K, D]``: ``[B, K, D]``."""
        return _poly_eval(self.coeffs.to(y.dtype), y)

    def penalty(self, means, log_scales):
        coeffs = self.coeffs.to(means.dtype)
        var = self._variance(log_scales)
        if var is None:
            return _poly_eval(coeffs, means).square().sum(-1)
        if self.moment == "first":
            return _poly_mean_expectation(coeffs, means, var).square().sum(-1)
        return _poly_square_expectation(coeffs, means, var).sum(-1)


class Linear(_BuiltinFamily):
    """Linear residual ``r(y) = A y - b`` (conservation laws, Rankine–Hugoniot-type jump conditions,
    discretized linear operators). ``A``: ``[B|1, K|1, M, D]``, ``b``: ``[B|1, K|1, M]``.

    ``moment="second"``: ``P = ||A mu - b||^2 + sum_d sigma_d^2 ||A[:, d]||^2``; ``"first"`` and ``"point"``:
    ``||A mu - b||^2`` (the residual is linear, so ``E r(Y) = r(mu)``).
    """

    family = "linear"

    def __init__(self, A, b=None, moment: str | None = None, noise_scale: float = 0.0, coupling: str | None = None, *,
                 mode: str | None = None, normalize: str | None = None):
        A = _as_tensor(A, "A")
        if A.dim() == 2:
            A = A.reshape(1, 1, *A.shape)
        if A.dim() != 4:
            raise ValueError(f"A must be [B|1, K|1, M, D] (or [M, D]), got shape {tuple(A.shape)}")
        if b is None:
            b = torch.zeros(A.shape[:-1], dtype=A.dtype, device=A.device)
        b = _as_tensor(b, "b")
        if b.dim() == 1:
            b = b.reshape(1, 1, -1)
        if b.dim() != 3 or b.shape[-1] != A.shape[-2]:
            raise ValueError(f"b must be [B|1, K|1, M] with M = {A.shape[-2]} (rows of A), got shape {tuple(b.shape)}")
        self.A, self.b = A, b
        self._set_options(moment, mode, noise_scale, coupling, normalize)

    def noise_floor(self, means):
        return physics_scaling.linear_noise_floor(self.A.to(means.dtype), self.noise_scale)

    def validate(self, B, K, D):
        M = self.A.shape[-2]
        _check_broadcast(self.A, "Linear A", (B, K, M, D), "[B|1, K|1, M, D]")
        _check_broadcast(self.b, "Linear b", (B, K, M), "[B|1, K|1, M]")

    def residual(self, y):
        return torch.einsum("...md,...d->...m", self.A.to(y.dtype), y) - self.b.to(y.dtype)

    def kernel_args(self, B, K, D, expand):
        M = self.A.shape[-2]
        return (_fused.FAMILY_LINEAR, expand(self.A, (B, K, M, D)), expand(self.b, (B, K, M)), self._kernel_moment(),
                1.0, 0, self.noise_scale)

    def penalty(self, means, log_scales):
        A, b = self.A.to(means.dtype), self.b.to(means.dtype)
        value = (torch.einsum("...md,...d->...m", A, means) - b).square().sum(-1)
        if self.moment == "second":
            var = _component_variance(log_scales, self.noise_scale)
            value = value + (A.square().sum(-2) * var).sum(-1)
        return value


class Stencil1D(_BuiltinFamily):
    """Steady residual of a 1-D reaction–diffusion field on ``D`` grid points (Allen–Cahn, Schlögl, ...):

    ``r_i(u) = diffusion (u_{i-1} - 2 u_i + u_{i+1}) / spacing^2 + sum_j reaction[..., j] u_i^j``

    with ``boundary="periodic"`` or ``"neumann"`` (mirror ghost points, ``u_{-1} = u_1``).
    ``diffusion``: float or ``[B|1, K|1]``; ``reaction``: ``[B|1, K|1, J+1]`` (or ``[J+1]``).

    ``moment="second"`` uses the independence of grid points under a diagonal Gaussian:
    ``E[r_i^2] = (E r_i)^2 + Var r_i`` with the neighbours' variances and the variance of the polynomial
    in ``u_i`` from Gaussian moments; ``"first"`` is ``sum_i (E r_i)^2`` (right for components that span a family of
    fields, e.g. kinks at many positions); ``"point"`` evaluates ``||r(mu)||^2``.
    """

    family = "stencil"

    def __init__(self, diffusion, reaction, spacing: float = 1.0, boundary: str = "periodic",
                 moment: str | None = None, noise_scale: float = 0.0, coupling: str | None = None, *,
                 mode: str | None = None, normalize: str | None = None):
        diffusion = _as_tensor(diffusion, "diffusion")
        if diffusion.dim() == 0:
            diffusion = diffusion.reshape(1, 1)
        if diffusion.dim() != 2:
            raise ValueError(f"diffusion must be a number or [B|1, K|1], got shape {tuple(diffusion.shape)}")
        reaction = _as_tensor(reaction, "reaction")
        if reaction.dim() == 1:
            reaction = reaction.reshape(1, 1, -1)
        if reaction.dim() != 3 or reaction.shape[-1] < 1:
            raise ValueError(f"reaction must be [B|1, K|1, J+1] (or [J+1]) with J >= 0, got shape {tuple(reaction.shape)}")
        spacing = check.positive(spacing, "spacing")
        if boundary not in ("periodic", "neumann"):
            raise ValueError(f"boundary must be 'periodic' or 'neumann', got {boundary!r}")
        self.diffusion, self.reaction, self.spacing, self.boundary = diffusion, reaction, spacing, boundary
        self._set_options(moment, mode, noise_scale, coupling, normalize)

    def noise_floor(self, means):
        L = self.laplacian(means.shape[-1], means.dtype, means.device)
        return physics_scaling.stencil_noise_floor(self.diffusion, self.reaction, L, self.spacing, means,
                                                   self.noise_scale)

    def validate(self, B, K, D):
        _check_broadcast(self.diffusion, "Stencil1D diffusion", (B, K), "[B|1, K|1]")
        _check_broadcast(self.reaction, "Stencil1D reaction", (B, K, self.reaction.shape[-1]), "[B|1, K|1, J+1]")

    @property
    def fusable(self) -> bool:
        return self.reaction.shape[-1] - 1 <= _fused.MAX_ORDER

    def kernel_args(self, B, K, D, expand):
        return (_fused.FAMILY_STENCIL, expand(self.diffusion, (B, K)), expand(self.reaction, (B, K, self.reaction.shape[-1])),
                self._kernel_moment(), self.spacing, 0 if self.boundary == "periodic" else 1, self.noise_scale)

    def laplacian(self, D: int, dtype=torch.float64, device=None) -> torch.Tensor:
        """The ``[D, D]`` second-difference matrix (without ``1/spacing^2``) for this boundary."""
        L = torch.zeros(D, D, dtype=dtype, device=device)
        for i in range(D):
            L[i, i] -= 2.0
            for j in (i - 1, i + 1):
                if self.boundary == "periodic":
                    j %= D
                else:  # mirror: u_{-1} = u_1, u_D = u_{D-2}; D = 1 has no neighbours to differ from
                    j = -j if j < 0 else (2 * (D - 1) - j if j >= D else j)
                    j = min(max(j, 0), D - 1)
                L[i, j] += 1.0
        return L

    def residual(self, y):
        L = self.laplacian(y.shape[-1], y.dtype, y.device)
        a = self.diffusion.to(y.dtype)[..., None] / self.spacing**2
        return a * (y @ L.T) + _poly_eval(self.reaction.to(y.dtype)[..., None, :], y)

    def penalty(self, means, log_scales):
        D = means.shape[-1]
        L = self.laplacian(D, means.dtype, means.device)
        a = self.diffusion.to(means.dtype)[..., None] / self.spacing**2  # [B|1, K|1, 1]
        c = self.reaction.to(means.dtype)[..., None, :].expand(*torch.broadcast_shapes(
            a.shape[:-1], self.reaction.shape[:-1]), D, self.reaction.shape[-1])  # [.., .., D, J+1]
        var = self._variance(log_scales)
        if var is None:
            return (a * (means @ L.T) + _poly_eval(c, means)).square().sum(-1)
        diag = torch.diagonal(L)
        off = L - torch.diag(diag)
        # polynomial in u_i alone: reaction plus the stencil's own-point term a * L_ii * u_i
        J = c.shape[-1] - 1
        own = torch.zeros(*c.shape[:-1], max(J, 1) + 1, dtype=c.dtype, device=c.device)
        own[..., : J + 1] += c
        own = own + 0 * a[..., None]  # broadcast to a's batch shape
        own[..., 1] = own[..., 1] + a * diag
        neighbour_mean = a * (means @ off.T)
        neighbour_var = a.square() * (var @ off.square().T)
        own_mean = _poly_mean_expectation(own, means, var)
        if self.moment == "first":
            return (neighbour_mean + own_mean).square().sum(-1)
        own_var = _poly_square_expectation(own, means, var) - own_mean.square()
        return ((neighbour_mean + own_mean).square() + neighbour_var + own_var).sum(-1)


class FieldStability(PhysicsSpec):
    """Linear stability of a steady 1-D field (the field analogue of :class:`Stability`): the Jacobian of
    ``u_t = diffusion L u / spacing^2 + f(u)`` at each component mean,
    ``J = diffusion L / spacing^2 + diag(f'(mu))``, must have all eigenvalues below ``-margin``:
    ``P_bk = relu(lambda_max(J_bk) + margin)^2``.

    The steady residual of :class:`Stencil1D` also vanishes on unstable states (``u = 0`` for Allen–Cahn,
    ``u = a`` for a bistable reaction); this prior keeps components off them. ``reaction_derivative``:
    coefficients of ``f'`` (Allen–Cahn ``f = u - u^3``: ``[1, 0, -3]``), ``[B|1, K|1, J+1]`` or ``[J+1]``;
    ``diffusion``: float or ``[B|1, K|1]``. Neumann's mirrored Laplacian is symmetrized by a diagonal
    similarity (same eigenvalues), so a symmetric eigen-solver applies to both boundaries. Components whose
    Gershgorin bound already certifies stability skip the eigen-decomposition; for the others the largest
    eigenvalue enters as the Rayleigh quotient at its eigenvector (exact value and gradient ``v v^T``).
    """

    family = "field_stability"
    mode = "mean"

    def __init__(self, diffusion, reaction_derivative, spacing: float = 1.0, boundary: str = "periodic",
                 margin: float = 0.0, coupling: str | None = None):
        self.coupling = _check_coupling(coupling)
        self._stencil = Stencil1D(diffusion, reaction_derivative, spacing=spacing, boundary=boundary, mode="mean")
        self.diffusion, self.reaction_derivative = self._stencil.diffusion, self._stencil.reaction
        self.margin = float(margin)

    def validate(self, B, K, D):
        self._stencil.validate(B, K, D)

    def jacobian(self, means: torch.Tensor) -> torch.Tensor:
        """``[B, K, D, D]`` symmetric (similar) Jacobian at ``means [B, K, D]``."""
        D = means.shape[-1]
        L = self._stencil.laplacian(D, means.dtype, means.device)
        if self._stencil.boundary == "neumann" and D >= 3:
            s = torch.ones(D, dtype=means.dtype, device=means.device)
            s[0] = s[-1] = math.sqrt(0.5)
            L = s[:, None] * L / s[None, :]
        a = self.diffusion.to(means.dtype)[..., None, None] / self._stencil.spacing**2
        slope = _poly_eval(self.reaction_derivative.to(means.dtype)[..., None, :], means)
        return a * L + torch.diag_embed(slope)

    def penalty(self, means, log_scales):
        J = self.jacobian(means)
        with torch.no_grad():
            # Gershgorin: every eigenvalue <= max_i (J_ii + sum_{j != i} |J_ij|); below -margin the component is
            # certified stable and needs no eigen-decomposition (uniform states, most of training)
            diag = J.diagonal(dim1=-2, dim2=-1)
            bound = (diag + J.abs().sum(-1) - diag.abs()).amax(-1)
            need = bound + self.margin > 0
        penalty = means.new_zeros(means.shape[:2])
        if not bool(need.any()):
            return penalty + 0.0 * means.sum((-1,))  # keeps the graph connected
        Jn = J[need]
        with torch.no_grad():
            top_vector = torch.linalg.eigh(Jn)[1][..., -1]  # eigenvector of the largest eigenvalue
        # Rayleigh quotient at the top eigenvector: the largest eigenvalue, with its exact gradient v v^T
        top = (top_vector * (Jn @ top_vector.unsqueeze(-1)).squeeze(-1)).sum(-1)
        return penalty.index_put((need,), F.relu(top + self.margin).square())


def _gauss_hermite(order: int, D: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``[order^D, D]`` and weights ``[order^D]`` of the tensor-product Gauss–Hermite rule for
    ``E f(Z)``, ``Z ~ N(0, I_D)`` (physicists' nodes scaled by ``sqrt(2)``, weights by ``pi^(-1/2)``)."""
    import numpy as np

    x, w = np.polynomial.hermite.hermgauss(order)
    x = torch.as_tensor(x * math.sqrt(2.0), dtype=torch.float64)
    w = torch.as_tensor(w / math.sqrt(math.pi), dtype=torch.float64)
    grids = torch.meshgrid(*([x] * D), indexing="ij")
    wgrids = torch.meshgrid(*([w] * D), indexing="ij")
    nodes = torch.stack([g.reshape(-1) for g in grids], -1)
    weights = torch.stack([g.reshape(-1) for g in wgrids], -1).prod(-1)
    return nodes.to(dtype=dtype, device=device), weights.to(dtype=dtype, device=device)


class Residual(PhysicsSpec):
    """Any residual written in torch: ``fn(y, context) -> r``.

    ``y`` has shape ``[B, K, S, D]`` (``S`` evaluation points per component) and ``context`` is passed as
    ``[B, 1, 1, C]`` (broadcastable); ``fn`` returns ``[B, K, S, M]`` (or ``[B, K, S]`` for ``M = 1``).

    ``mode``: ``"point"`` (``S = 1``, ``y = mu``), ``"sigma"`` (``2D + 1`` unscented sigma points
    ``mu, mu +- sqrt(D + kappa) sigma_d e_d`` with ``kappa = max(3 - D, 0)``; exact for residuals of degree
    <= 1 and for the 4th moment in D = 1), ``"gauss_hermite"`` (the tensor-product Gauss–Hermite rule with
    ``order`` points per dimension, ``order^D`` points for ``D <= 3``: exact for ``E||r||^2`` of residuals that are
    polynomials of degree ``<= order - 1`` in each coordinate, cross terms included) or ``"mc"`` (``samples``
    reparameterized draws).

    ``noise_scale``: the expectation is taken under the noise-free spread ``sqrt(max(sigma^2 - noise_scale^2, 0))``
    (as the built-in families' ``noise_scale``). ``normalize="noise"``: divide by the noise floor
    (:meth:`noise_floor`), as the built-in families do.

    ``moment``: ``"second"`` (``sum_s w_s ||r(y_s)||^2``, the estimate of ``E||r||^2``) or ``"first"``
    (``||sum_s w_s r(y_s)||^2``, the estimate of ``||E r||^2``); with ``mode="point"`` both are ``||r(mu)||^2``.
    """

    family = "residual"

    def __init__(self, fn: Callable, context: torch.Tensor | None = None, mode: str = "sigma", samples: int = 16,
                 generator: torch.Generator | None = None, moment: str = "second", coupling: str | None = None,
                 noise_scale: float = 0.0, order: int = 5, normalize: str | None = None):
        if not callable(fn):
            raise TypeError(f"fn must be callable as fn(y, context) -> r, got {type(fn).__name__}")
        self.fn, self.context = fn, context
        self.mode = _check_mode(mode, ("point", "sigma", "gauss_hermite", "mc"))
        if not 1 <= int(order) <= 20:
            raise ValueError(f"order must be an integer in [1, 20] (Gauss–Hermite points per dimension), got {order}")
        self.order, self.noise_scale = int(order), _check_noise(noise_scale)
        if int(samples) < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        self.samples, self.generator = int(samples), generator
        if moment not in ("second", "first"):
            raise ValueError(f"moment must be 'second' or 'first', got {moment!r}")
        self.moment = moment
        self.coupling = _check_coupling(coupling)
        self.normalize = physics_scaling.check_normalize(normalize, self.noise_scale)

    def noise_floor(self, means):
        """``sum_s w_s ||r(mu + s_n z_s) - r(mu)||^2`` over this spec's rule (``mode``; ``"point"`` takes the sigma
        points) at spread ``s_n = noise_scale``: ``[B, K]``."""
        rule = copy.copy(self)
        rule.mode, rule.noise_scale = ("sigma" if self.mode == "point" else self.mode), 0.0
        points, weights = rule._points(means, means.new_full(means.shape, math.log(self.noise_scale)))
        ctx = None if self.context is None else self.context.to(means.dtype)[:, None, None, :]
        diff = (self.fn(points, ctx) - self.fn(means.unsqueeze(2), ctx)).reshape(*points.shape[:3], -1)
        return (diff.square().sum(-1) * weights).sum(-1)

    def validate(self, B, K, D):
        if self.context is not None and self.context.shape[0] != B:
            raise ValueError(f"Residual context must have B = {B} rows, got shape {tuple(self.context.shape)}")

    def _points(self, means, log_scales):
        """Evaluation points ``[B, K, S, D]`` and weights ``[S]``."""
        if self.mode == "point":
            return means.unsqueeze(2), means.new_ones(1)
        sigma = _component_variance(log_scales, self.noise_scale).sqrt() if self.noise_scale > 0 else log_scales.exp()
        D = means.shape[-1]
        if self.mode == "gauss_hermite":
            if D > 3:
                raise ValueError(f"mode='gauss_hermite' takes D <= 3 outputs ({self.order}^D points), got D = {D}; "
                                 f"use 'sigma' or 'mc'")
            nodes, weights = _gauss_hermite(self.order, D, means.dtype, means.device)  # [S, D], [S]
            return means.unsqueeze(2) + sigma.unsqueeze(2) * nodes, weights
        if self.mode == "sigma":
            kappa = max(3.0 - D, 0.0)
            spread = math.sqrt(D + kappa)
            eye = torch.eye(D, dtype=means.dtype, device=means.device)
            offsets = spread * sigma.unsqueeze(2) * eye  # [B, K, D, D]
            points = torch.cat([means.unsqueeze(2), means.unsqueeze(2) + offsets, means.unsqueeze(2) - offsets], dim=2)
            weights = means.new_full((2 * D + 1,), 0.5 / (D + kappa))
            weights[0] = kappa / (D + kappa)
            return points, weights
        eps = torch.randn((*means.shape[:2], self.samples, D), dtype=means.dtype, device=means.device,
                          generator=self.generator)
        return means.unsqueeze(2) + sigma.unsqueeze(2) * eps, means.new_full((self.samples,), 1.0 / self.samples)

    def penalty(self, means, log_scales):
        points, weights = self._points(means, log_scales)
        ctx = None if self.context is None else self.context.to(means.dtype)[:, None, None, :]
        r = self.fn(points, ctx)
        if r.dim() == 3:
            r = r.unsqueeze(-1)
        if r.shape[:3] != points.shape[:3]:
            raise ValueError(f"Residual fn must return [B, K, S, M] = {tuple(points.shape[:3])} + [M], got {tuple(r.shape)}")
        if self.moment == "first":
            return (r * weights[:, None]).sum(-2).square().sum(-1)
        return (r.square().sum(-1) * weights).sum(-1)


# ----- the loss -------------------------------------------------------------------------------------

def _normalize_physics(physics) -> list[tuple[PhysicsSpec, float]]:
    if physics is None:
        return []
    if isinstance(physics, PhysicsSpec):
        return [(physics, 1.0)]
    items = []
    for item in physics:
        if isinstance(item, PhysicsSpec):
            items.append((item, 1.0))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], PhysicsSpec):
            items.append((item[0], float(item[1])))
        else:
            raise TypeError(f"physics must be a PhysicsSpec or a list of PhysicsSpec / (PhysicsSpec, weight), got item {item!r}")
    return items


def _effective_coupling(spec: PhysicsSpec, coupling: str) -> str:
    return spec.coupling if spec.coupling is not None else coupling



def physics_penalty(logits, means, log_scales, physics, coupling: str = "detached") -> torch.Tensor:
    """Per-sample mixture-weighted penalty ``sum_k pi_bk sum_s w_s P^s_bk``: ``[B]`` (plain torch, the reference of
    the fused kernels). Specs whose coupling (or, when theirs is None, ``coupling``) is ``"detached"`` see
    ``pi`` as a constant: the same value, no gradient to the logits."""
    coupling = _check_coupling(coupling, allow_none=False)
    items = _normalize_physics(physics)
    B, K, D = means.shape
    items = physics_scaling.noise_normalized(items, logits, means)
    pi = torch.softmax(logits, dim=-1)
    total = means.new_zeros(B)
    for spec, w in items:
        spec.validate(B, K, D)
        weights = pi.detach() if _effective_coupling(spec, coupling) == "detached" else pi
        total = total + (weights * (w * spec.penalty(means, log_scales))).sum(-1)
    return total


def mdn_loss(logits, means, log_scales, target, physics=None, weight: float = 1.0, reduction: str = "mean",
             coupling: str = "detached"):
    """Mixture NLL plus mixture-weighted physics penalties:

    ``loss_b = NLL_b + weight * sum_k pi_bk sum_s w_s P^s_bk``,  ``pi = softmax(logits)``.

    Args:
        logits: ``[B, K]`` mixture logits.
        means: ``[B, K, D]`` component means.
        log_scales: ``[B, K, D]`` component log standard deviations.
        target: ``[B, D]`` observations. Leading batch dimensions ``[*]`` broadcast as in
            :func:`physmdn.mixture_nll`; the specs are then bound to the flattened batch ``[prod(*)]``.
        physics: None, a :class:`PhysicsSpec`, or a list of specs / ``(spec, weight)`` pairs, bound to this batch.
        weight: the global physics weight ``lambda``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[B]``).
        coupling: ``"detached"`` (``pi`` is a constant of the penalty: the mixture weights learn from the likelihood
            alone) or ``"coupled"`` (the penalty's gradient also moves mass between components); a spec's own
            ``coupling`` takes precedence. The measurements behind the default are in docs/physics.md.

    Returns:
        The loss, reduced as ``reduction`` says.
    """
    fast, batch_shape, (logits, means, log_scales, target) = _ops.prepared_inputs(logits, means, log_scales, target)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    coupling = _check_coupling(coupling, allow_none=False)
    items = _normalize_physics(physics)
    if not items or weight == 0.0:
        loss = mixture_nll(logits, means, log_scales, target, reduction=reduction)
    else:
        items = [(spec, w, _effective_coupling(spec, coupling)) for spec, w in items]
        items = physics_scaling.noise_normalized(items, logits, means)
        loss = _fused.fused_mdn_loss(logits, means, log_scales, target, items, float(weight), reduction=reduction,
                                     fast=fast)
    return _ops.unflatten_loss(loss, batch_shape, reduction)

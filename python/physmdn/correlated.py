"""Gaussian mixtures with correlated components, as ``torch.distributions.Distribution`` s.

For each batch element (batch shape ``B``, event ``[D]``, ``K`` components):
``p(y) = sum_k pi_k N(y | mu_k, Sigma_k)``, ``pi = softmax(logits)``, with

* :class:`GaussianMixtureTril`: ``Sigma_k = L_k L_k^T`` from a lower-triangular ``scale_tril [B, K, D, D]`` with a
  positive diagonal (``MultivariateNormal(scale_tril=...)`` components);
* :class:`GaussianMixtureLowRank`: ``Sigma_k = W_k W_k^T + diag(d_k)``, ``cov_factor [B, K, D, R]``,
  ``cov_diag [B, K, D] > 0`` (``LowRankMultivariateNormal`` components).

Densities go through the ops :func:`physmdn.mixture_nll_tril` / :func:`physmdn.mixture_nll_lowrank`; the rest is
plain torch. Both classes describe every covariance as ``Sigma_k = F_k F_k^T + diag(c_k)`` (:meth:`factor`:
``F = L, c = 0`` or ``F = W, c = d``), the form the physics expectations of :mod:`physmdn.physics_correlated`
take. Layering: imports the ops layer, the mode search and ``distributions`` (a shape check) only.
"""

from __future__ import annotations

import torch
from torch.distributions import constraints

from ._correlated_sampling import implicit_rsample
from ._mixture_correlated import MAX_RANK, MAX_TRIL_DIM, mixture_nll_lowrank, mixture_nll_tril
from ._mixture_modes import DEFAULT_MIN_WEIGHT, Modes, select_modes
from ._ops import _check_like_means, _check_tensor
from .distributions import _as_sample_shape
from .reference import HALF_LOG_2PI

__all__ = ["CorrelatedGaussianMixture", "GaussianMixtureTril", "GaussianMixtureLowRank"]


class CorrelatedGaussianMixture(torch.distributions.Distribution):
    """What the two correlated kinds share: shapes, weights, moments, responsibilities, sampling and modes.
    Subclasses hold ``logits [B, K]``, ``means [B, K, D]`` and their covariance parameters (:attr:`_PARAMS`)."""

    support = constraints.real_vector
    has_rsample = True
    _PARAMS: tuple[str, ...] = ()

    def _setup(self, logits, means, covariance: list[tuple[str, torch.Tensor, int]], validate_args) -> None:
        """Check ``logits``, ``means`` and the covariance parameters ``(name, tensor, event dims)``, broadcast them to
        one batch shape and call the Distribution constructor."""
        for t, name in ((logits, "logits"), (means, "means"), *((c[1], c[0]) for c in covariance)):
            _check_tensor(t, name)
        if means.dim() < 2 or means.shape[-2] < 1 or means.shape[-1] < 1:
            raise ValueError(f"means must be [B, K, D] with K, D >= 1 (B: any batch shape), got shape "
                             f"{tuple(means.shape)}")
        K, D = means.shape[-2:]
        if logits.dim() < 1 or logits.shape[-1] != K:
            raise ValueError(f"logits must be [B, K] with K = {K} (the components of means), got shape "
                             f"{tuple(logits.shape)}")
        shapes = [logits.shape[:-1], means.shape[:-2]]
        for name, t, event_dims in covariance:
            _check_like_means(t, name, means)
            shapes.append(t.shape[: t.dim() - event_dims])
        _check_like_means(logits, "logits", means)
        try:
            batch_shape = torch.broadcast_shapes(*shapes)
        except RuntimeError:
            raise ValueError(f"the batch shapes of logits, means and {', '.join(c[0] for c in covariance)} "
                             f"({', '.join(str(tuple(s)) for s in shapes)}) must broadcast") from None
        self.logits = logits.expand(*batch_shape, K)
        self.means = means.expand(*batch_shape, K, D)
        for name, t, event_dims in covariance:
            setattr(self, name, t.expand(*batch_shape, *t.shape[t.dim() - event_dims:]))
        super().__init__(batch_shape, torch.Size([D]), validate_args=validate_args)

    def _like(self, *params) -> "CorrelatedGaussianMixture":
        new = type(self)(*params, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _params(self) -> tuple[torch.Tensor, ...]:
        return (self.logits, self.means, *(getattr(self, n) for n in self._PARAMS))

    # ----- shapes -------------------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.batch_shape.numel()

    @property
    def num_components(self) -> int:
        return self.means.shape[-2]

    @property
    def event_dim(self) -> int:
        return self.means.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    @property
    def device(self) -> torch.device:
        return self.means.device

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(batch_shape={tuple(self.batch_shape)}, components={self.num_components}, "
                f"dim={self.event_dim}, dtype={self.dtype}, device={self.device})")

    def __getitem__(self, index) -> "CorrelatedGaussianMixture":
        """Select along the batch dimensions (an int on the first one keeps it, with size one)."""
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        if not isinstance(index, tuple):
            index = (index,)
        return self._like(*(t[index] for t in self._params()))

    def to(self, *args, **kwargs) -> "CorrelatedGaussianMixture":
        return self._like(*(t.to(*args, **kwargs) for t in self._params()))

    def detach(self) -> "CorrelatedGaussianMixture":
        return self._like(*(t.detach() for t in self._params()))

    # ----- moments ------------------------------------------------------------------------------------------

    @property
    def weights(self) -> torch.Tensor:
        """``pi = softmax(logits)``: ``[B, K]``."""
        return torch.softmax(self.logits, dim=-1)

    @property
    def log_weights(self) -> torch.Tensor:
        return torch.log_softmax(self.logits, dim=-1)

    def factor(self) -> tuple[torch.Tensor, torch.Tensor | None]:  # pragma: no cover
        """``(F [B, K, D, Q], c [B, K, D] or None)`` with ``Sigma_k = F_k F_k^T + diag(c_k)``."""
        raise NotImplementedError

    @property
    def component_covariance(self) -> torch.Tensor:
        """``Sigma_k``: ``[B, K, D, D]``."""
        F, c = self.factor()
        sigma = F @ F.mT
        return sigma if c is None else sigma + torch.diag_embed(c)

    @property
    def marginal_scales(self) -> torch.Tensor:
        """Each component's marginal standard deviations ``sqrt(Sigma_k,ii)``: ``[B, K, D]`` (the counterpart of
        :attr:`physmdn.GaussianMixture.scales`)."""
        F, c = self.factor()
        var = F.square().sum(-1)
        return (var if c is None else var + c).sqrt()

    @property
    def component_scale_tril(self) -> torch.Tensor:  # pragma: no cover
        """Cholesky factors of ``Sigma_k``: ``[B, K, D, D]``."""
        raise NotImplementedError

    @property
    def mean(self) -> torch.Tensor:
        """``m = sum_k pi_k mu_k``: ``[B, D]``."""
        return (self.weights.unsqueeze(-1) * self.means).sum(-2)

    @property
    def covariance(self) -> torch.Tensor:
        """Mixture covariance by the law of total variance, ``sum_k pi_k (Sigma_k + (mu_k - m)(mu_k - m)^T)``:
        ``[B, D, D]``."""
        w = self.weights
        centered = self.means - self.mean.unsqueeze(-2)
        between = torch.einsum("...k,...ki,...kj->...ij", w, centered, centered)
        return between + (w[..., None, None] * self.component_covariance).sum(-3)

    @property
    def variance(self) -> torch.Tensor:
        """Diagonal of :attr:`covariance`: ``[B, D]``."""
        F, c = self.factor()
        within = F.square().sum(-1) + (0.0 if c is None else c)
        centered = self.means - self.mean.unsqueeze(-2)
        return (self.weights.unsqueeze(-1) * (within + centered.square())).sum(-2)

    # ----- densities ----------------------------------------------------------------------------------------

    def _value(self, y: torch.Tensor, name: str = "y") -> torch.Tensor:
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
        D = self.event_dim
        try:
            if y.dim() < 1 or y.shape[-1] != D:
                raise RuntimeError
            torch.broadcast_shapes(y.shape[:-1], self.batch_shape)
        except RuntimeError:
            raise ValueError(f"{name} must be [B, D] = {tuple(self.batch_shape) + (D,)} or [*S, B, D], got shape "
                             f"{tuple(y.shape)}") from None
        if self._validate_args:
            self._validate_sample(y)
        return y.to(self.dtype)

    def nll(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """``-log p(y)`` through the op: ``[*S, B]`` for ``y [*S, B, D]``."""
        raise NotImplementedError

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """``log p(y)``: ``[*S, B]``."""
        return -self.nll(y)

    def component_log_density(self, y: torch.Tensor) -> torch.Tensor:
        """``log N(y | mu_k, Sigma_k)`` for every component: ``[*S, B, K]`` (plain torch, through
        :attr:`component_scale_tril`)."""
        y = self._value(y)
        L = self.component_scale_tril
        delta = (y.unsqueeze(-2) - self.means).unsqueeze(-1)
        z = torch.linalg.solve_triangular(L.expand(*delta.shape[:-2], *L.shape[-2:]), delta, upper=False).squeeze(-1)
        log_det = torch.log(L.diagonal(dim1=-2, dim2=-1)).sum(-1)
        return -0.5 * z.square().sum(-1) - log_det - self.event_dim * HALF_LOG_2PI

    def log_responsibilities(self, y: torch.Tensor) -> torch.Tensor:
        """``log r_k(y) = log pi_k + log N(y | mu_k, Sigma_k) - log p(y)``: ``[*S, B, K]``."""
        return torch.log_softmax(self.log_weights + self.component_log_density(y), dim=-1)

    def responsibilities(self, y: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_responsibilities(y))

    # ----- sampling -----------------------------------------------------------------------------------------

    def _component_noise(self, index: torch.Tensor, generator) -> torch.Tensor:  # pragma: no cover
        """``Sigma_k^(1/2) eps`` for the components ``index [N, n]`` of the flattened batch: ``[N, n, D]``."""
        raise NotImplementedError

    def _flat(self, t: torch.Tensor, event_dims: int) -> torch.Tensor:
        return t.reshape(-1, *t.shape[t.dim() - event_dims:])

    def _draw(self, sample_shape, generator) -> torch.Tensor:
        sample_shape = _as_sample_shape(sample_shape)
        n, N, K, D = sample_shape.numel(), self.batch_size, self.num_components, self.event_dim
        if n == 0 or N == 0:
            return self.means.new_empty(self._extended_shape(sample_shape))
        probs = torch.softmax(self._flat(self.logits, 1).detach().float(), dim=-1)
        index = torch.multinomial(probs, n, replacement=True, generator=generator)  # [N, n]
        chosen = self._flat(self.means, 2).gather(1, index.unsqueeze(-1).expand(N, n, D))
        y = chosen + self._component_noise(index, generator)
        return y.transpose(0, 1).reshape(self._extended_shape(sample_shape))

    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> torch.Tensor:
        """Draws ``sample_shape + B + [D]`` without gradients: a component ``k ~ Categorical(pi)``, then
        ``y = mu_k + Sigma_k^(1/2) eps`` (only the chosen component is gathered)."""
        with torch.no_grad():
            return self._draw(sample_shape, generator)

    def rsample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterized draws ``sample_shape + B + [D]``: gradients reach ``logits``, ``means`` and the covariance
        parameters.

        The draw is exact (as :meth:`sample`); the gradient is the implicit reparameterization gradient of the
        chain of conditional CDFs ``u_d = F_d(y_d | y_<d)`` (each a 1-D mixture of the components' Gaussian
        conditionals, weighted by their densities of ``y_<d``), ``dy/dtheta = -(dF/dy)^-1 dF/dtheta``: unbiased for
        ``grad E[f(y)]``, the weights included. The backward pass costs ``D + 1`` passes over ``[n, B, K, D]``.
        """
        sample_shape = _as_sample_shape(sample_shape)
        y = self.sample(sample_shape, generator)
        n, N, D = sample_shape.numel(), self.batch_size, self.event_dim
        if n == 0 or N == 0:
            return y
        flat = implicit_rsample(self._flat(self.logits, 1), self._flat(self.means, 2),
                                self._flat(self.component_scale_tril, 3), y.reshape(n, N, D))
        return flat.reshape(y.shape)

    # ----- modes --------------------------------------------------------------------------------------------

    def modes(self, max_iter: int = 500, tol: float = 1e-7, merge_tol: float = 1e-2,
              min_weight: float = DEFAULT_MIN_WEIGHT) -> Modes:
        """Local maxima of each mixture density, by the Gaussian mean-shift fixed point started at each ``mu_k``,

        ``x <- (sum_k r_k(x) Lambda_k)^-1 sum_k r_k(x) Lambda_k mu_k``,  ``Lambda_k = Sigma_k^-1``,

        whose fixed points are the stationary points of ``p``; saddles (a Hessian of ``log p`` that is not negative
        semidefinite) are dropped, close points merged and light modes dropped as in
        :meth:`physmdn.GaussianMixture.modes`. The length unit of ``tol`` and ``merge_tol`` is the smallest
        conditional scale (Cholesky diagonal) of the batch element. Runs in float64 without gradients.

        Returns :class:`physmdn.Modes` with the batch shape ``B``.
        """
        if not (isinstance(min_weight, (int, float)) and 0.0 <= min_weight <= 1.0):
            raise ValueError(f"min_weight must be a number in [0, 1], got {min_weight!r}")
        with torch.no_grad():
            found = _find_modes(self._flat(self.logits, 1).double(), self._flat(self.means, 2).double(),
                                self._flat(self.component_scale_tril, 3).double(), max_iter, tol, merge_tol, min_weight,
                                self.dtype if self.dtype in (torch.float32, torch.float64) else torch.float32)
        batch = tuple(self.batch_shape)
        return Modes(*(t.reshape(batch + tuple(t.shape[1:])) for t in found))

    @property
    def mode(self) -> torch.Tensor:
        """Location of the highest mode: ``[B, D]``, without gradients."""
        return self.modes(min_weight=0.0).locations[..., 0, :]


def _find_modes(log_w, means, scale_tril, max_iter, tol, merge_tol, min_weight, out_dtype) -> Modes:
    """Mean-shift with full precisions on one flat batch: ``log_w [B, K]`` (logits), ``means [B, K, D]``,
    ``scale_tril [B, K, D, D]``."""
    log_w = torch.log_softmax(log_w, -1)
    B, K, D = means.shape
    precision = torch.cholesky_inverse(scale_tril)  # [B, K, D, D]
    precision_means = (precision @ means.unsqueeze(-1)).squeeze(-1)  # [B, K, D]
    log_det = torch.log(scale_tril.diagonal(dim1=-2, dim2=-1)).sum(-1)  # [B, K]
    unit = scale_tril.diagonal(dim1=-2, dim2=-1).amin(dim=(1, 2))  # [B]

    def log_joint(points):  # [B, M, K]
        delta = (points.unsqueeze(2) - means.unsqueeze(1)).unsqueeze(-1)  # [B, M, K, D, 1]
        z = torch.linalg.solve_triangular(scale_tril.unsqueeze(1).expand(B, points.shape[1], K, D, D), delta,
                                          upper=False).squeeze(-1)
        return log_w.unsqueeze(1) - 0.5 * z.square().sum(-1) - log_det.unsqueeze(1) - D * HALF_LOG_2PI

    x = means.clone()
    for _ in range(max_iter):
        r = torch.softmax(log_joint(x), dim=-1)  # [B, M, K]
        A = torch.einsum("bmk,bkij->bmij", r, precision)
        b = torch.einsum("bmk,bki->bmi", r, precision_means)
        new = torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)
        step = (new - x).abs().amax(dim=(1, 2)) / unit
        x = new
        if bool((step <= tol).all()):
            break
    joint = log_joint(x)
    log_density = torch.logsumexp(joint, dim=-1)
    r = torch.softmax(joint, dim=-1)
    g_k = precision_means.unsqueeze(1) - torch.einsum("bkij,bmj->bmki", precision, x)  # Lambda_k (mu_k - x)
    grad = (r.unsqueeze(-1) * g_k).sum(2)
    hess = (torch.einsum("bmk,bmki,bmkj->bmij", r, g_k, g_k) - torch.einsum("bmk,bkij->bmij", r, precision)
            - grad.unsqueeze(-1) * grad.unsqueeze(-2))
    top = torch.linalg.eigvalsh(0.5 * (hess + hess.mT))[..., -1]
    curvature = precision.diagonal(dim1=-2, dim2=-1).amax(dim=(1, 2)).unsqueeze(-1)
    is_max = top <= 1e-6 * curvature
    return select_modes(x, log_density, is_max, log_w, unit, merge_tol=merge_tol, min_weight=min_weight,
                        out_dtype=out_dtype)


class GaussianMixtureTril(CorrelatedGaussianMixture):
    """A batch of ``K``-component full-covariance Gaussian mixtures over ``R^D``: batch shape ``B``, event ``[D]``.

    Args:
        logits: ``[B, K]``. means: ``[B, K, D]``, ``D <= 32``.
        scale_tril: ``[B, K, D, D]`` lower-triangular Cholesky factors ``L_k`` of ``Sigma_k = L_k L_k^T`` with a
            positive diagonal (the strict upper triangle is ignored).
        validate_args: as in ``torch.distributions``; when on, a non-positive diagonal raises here (once).

    The batch shapes of the parameters broadcast.
    """

    arg_constraints = {"logits": constraints.real_vector, "means": constraints.independent(constraints.real, 2),
                       "scale_tril": constraints.independent(constraints.real, 3)}
    _PARAMS = ("scale_tril",)

    def __init__(self, logits: torch.Tensor, means: torch.Tensor, scale_tril: torch.Tensor,
                 validate_args: bool | None = None):
        _check_tensor(scale_tril, "scale_tril")
        _check_tensor(means, "means")
        D = means.shape[-1] if means.dim() >= 2 else 0
        if D > MAX_TRIL_DIM:
            raise ValueError(f"means must have D <= {MAX_TRIL_DIM} outputs for full covariance, got D = {D}; use "
                             f"GaussianMixtureLowRank")
        if scale_tril.dim() < 3 or tuple(scale_tril.shape[-2:]) != (D, D) or (
                means.dim() >= 2 and scale_tril.shape[-3] != means.shape[-2]):
            raise ValueError(f"scale_tril must be [B, K, D, D] with (K, D) = {tuple(means.shape[-2:])} (as means), got "
                             f"shape {tuple(scale_tril.shape)}")
        if validate_args or (validate_args is None and torch.distributions.Distribution._validate_args):
            smallest = scale_tril.diagonal(dim1=-2, dim2=-1).detach().amin() if scale_tril.numel() else 1.0
            if not bool(smallest > 0):
                raise ValueError(f"scale_tril must have a positive diagonal, got a minimum of {float(smallest)}")
        self._setup(logits, means, [("scale_tril", scale_tril, 3)], validate_args)

    def factor(self):
        return torch.tril(self.scale_tril), None

    @property
    def component_scale_tril(self) -> torch.Tensor:
        return torch.tril(self.scale_tril)

    def nll(self, y: torch.Tensor) -> torch.Tensor:
        return mixture_nll_tril(self.logits, self.means, self.scale_tril, self._value(y), check_diagonal=False)

    def _component_noise(self, index, generator):
        N, n = index.shape
        D = self.event_dim
        L = self._flat(self.component_scale_tril, 3).gather(1, index[..., None, None].expand(N, n, D, D))
        eps = torch.randn((N, n, D, 1), dtype=self.dtype, device=self.device, generator=generator)
        return (L @ eps).squeeze(-1)

    def component(self, k: int) -> torch.distributions.MultivariateNormal:
        """Component ``k``: ``MultivariateNormal(mu_k, scale_tril=L_k)``."""
        K = self.num_components
        if not isinstance(k, int) or not -K <= k < K:
            raise IndexError(f"k must be an int component index in [0, {K}), got {k!r}")
        return torch.distributions.MultivariateNormal(self.means[..., k, :],
                                                      scale_tril=self.component_scale_tril[..., k, :, :])

    def to_torch(self) -> torch.distributions.MixtureSameFamily:
        """``MixtureSameFamily(Categorical(logits), MultivariateNormal(means, scale_tril=scale_tril))``."""
        return torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(logits=self.logits),
            torch.distributions.MultivariateNormal(self.means, scale_tril=self.component_scale_tril))

    @classmethod
    def from_torch(cls, mixture, validate_args: bool | None = None) -> "GaussianMixtureTril":
        """The inverse of :meth:`to_torch`, from any ``MixtureSameFamily(Categorical, MultivariateNormal)``."""
        gate, components = _unpack(mixture, torch.distributions.MultivariateNormal)
        return cls(gate.logits, components.loc, components.scale_tril, validate_args=validate_args)


class GaussianMixtureLowRank(CorrelatedGaussianMixture):
    """A batch of ``K``-component Gaussian mixtures with ``Sigma_k = W_k W_k^T + diag(d_k)``.

    Args:
        logits: ``[B, K]``. means: ``[B, K, D]``.
        cov_factor: ``[B, K, D, R]``, ``1 <= R <= 8``. cov_diag: ``[B, K, D]``, positive.
        validate_args: as in ``torch.distributions``; when on, a non-positive ``cov_diag`` raises here.
    """

    arg_constraints = {"logits": constraints.real_vector, "means": constraints.independent(constraints.real, 2),
                       "cov_factor": constraints.independent(constraints.real, 3),
                       "cov_diag": constraints.independent(constraints.real, 2)}
    _PARAMS = ("cov_factor", "cov_diag")

    def __init__(self, logits: torch.Tensor, means: torch.Tensor, cov_factor: torch.Tensor, cov_diag: torch.Tensor,
                 validate_args: bool | None = None):
        for t, name in ((means, "means"), (cov_factor, "cov_factor"), (cov_diag, "cov_diag")):
            _check_tensor(t, name)
        KD = tuple(means.shape[-2:])
        if cov_factor.dim() < 3 or tuple(cov_factor.shape[-3:-1]) != KD:
            raise ValueError(f"cov_factor must be [B, K, D, R] with (K, D) = {KD} (as means), got shape "
                             f"{tuple(cov_factor.shape)}")
        if not 1 <= cov_factor.shape[-1] <= MAX_RANK:
            raise ValueError(f"cov_factor must have a rank 1 <= R <= {MAX_RANK}, got R = {cov_factor.shape[-1]}")
        if cov_diag.dim() < 2 or tuple(cov_diag.shape[-2:]) != KD:
            raise ValueError(f"cov_diag must be [B, K, D] = {KD} (as means), got shape {tuple(cov_diag.shape)}")
        if validate_args or (validate_args is None and torch.distributions.Distribution._validate_args):
            smallest = cov_diag.detach().amin() if cov_diag.numel() else 1.0
            if not bool(smallest > 0):
                raise ValueError(f"cov_diag must be positive, got a minimum of {float(smallest)}")
        self._setup(logits, means, [("cov_factor", cov_factor, 3), ("cov_diag", cov_diag, 2)], validate_args)

    @property
    def rank(self) -> int:
        return self.cov_factor.shape[-1]

    def factor(self):
        return self.cov_factor, self.cov_diag

    @property
    def component_scale_tril(self) -> torch.Tensor:
        return torch.linalg.cholesky(self.component_covariance)

    def nll(self, y: torch.Tensor) -> torch.Tensor:
        return mixture_nll_lowrank(self.logits, self.means, self.cov_factor, self.cov_diag, self._value(y),
                                   check_diagonal=False)

    def _component_noise(self, index, generator):
        N, n = index.shape
        D, R = self.event_dim, self.rank
        W = self._flat(self.cov_factor, 3).gather(1, index[..., None, None].expand(N, n, D, R))
        d = self._flat(self.cov_diag, 2).gather(1, index[..., None].expand(N, n, D))
        kw = dict(dtype=self.dtype, device=self.device, generator=generator)
        eps_factor = torch.randn((N, n, R, 1), **kw)
        eps_diag = torch.randn((N, n, D), **kw)
        return (W @ eps_factor).squeeze(-1) + d.sqrt() * eps_diag

    def component(self, k: int) -> torch.distributions.LowRankMultivariateNormal:
        """Component ``k``: ``LowRankMultivariateNormal(mu_k, W_k, d_k)``."""
        K = self.num_components
        if not isinstance(k, int) or not -K <= k < K:
            raise IndexError(f"k must be an int component index in [0, {K}), got {k!r}")
        return torch.distributions.LowRankMultivariateNormal(self.means[..., k, :], self.cov_factor[..., k, :, :],
                                                             self.cov_diag[..., k, :])

    def to_torch(self) -> torch.distributions.MixtureSameFamily:
        """``MixtureSameFamily(Categorical(logits), LowRankMultivariateNormal(means, cov_factor, cov_diag))``."""
        return torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(logits=self.logits),
            torch.distributions.LowRankMultivariateNormal(self.means, self.cov_factor, self.cov_diag))

    @classmethod
    def from_torch(cls, mixture, validate_args: bool | None = None) -> "GaussianMixtureLowRank":
        """The inverse of :meth:`to_torch`."""
        gate, components = _unpack(mixture, torch.distributions.LowRankMultivariateNormal)
        return cls(gate.logits, components.loc, components.cov_factor, components.cov_diag,
                   validate_args=validate_args)


def _unpack(mixture, family: type):
    if not isinstance(mixture, torch.distributions.MixtureSameFamily):
        raise TypeError(f"mixture must be a torch.distributions.MixtureSameFamily, got {type(mixture).__name__}")
    gate, components = mixture.mixture_distribution, mixture.component_distribution
    if not isinstance(gate, torch.distributions.Categorical):
        raise TypeError(f"mixture.mixture_distribution must be a Categorical, got {type(gate).__name__}")
    if not isinstance(components, family):
        raise TypeError(f"mixture.component_distribution must be a {family.__name__}, got {type(components).__name__}")
    return gate, components

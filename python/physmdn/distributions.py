"""Diagonal Gaussian mixtures as a ``torch.distributions.Distribution``: the output of a mixture density network.

For each batch element (any batch shape ``B``, event shape ``[D]``, ``K`` components):

``p(y) = sum_k pi_k N(y | mu_k, diag(sigma_k^2))``,  ``pi = softmax(logits)``,  ``sigma = exp(log_scales)``.

Parameters: ``logits [B, K]``, ``means [B, K, D]``, ``log_scales [B, K, D]``, where ``B`` stands for the batch
shape. Densities go through the fused op :func:`physmdn.mixture_nll`; everything else is plain torch. Layering: this
module imports only the ops layer and its two helpers (sampling and CDFs, modes).
"""

from __future__ import annotations

import math
import operator

import torch
from torch.distributions import constraints

from ._mixture_modes import DEFAULT_MIN_WEIGHT, Modes, find_modes
from ._mixture_sampling import cdf_1d, draw, entropy_bounds, icdf_1d, implicit_rsample
from ._mixture_nll import mixture_nll
from ._ops import _check_like_means, _check_tensor
from .reference import HALF_LOG_2PI

__all__ = ["GaussianMixture", "Modes", "DEFAULT_MIN_WEIGHT"]


def _check_params(logits, means, log_scales) -> torch.Size:
    """Types, shapes, dtypes and devices of ``logits [*, K]``, ``means / log_scales [*, K, D]``; the batch shapes
    broadcast. Returns the batch shape."""
    for t, name in ((logits, "logits"), (means, "means"), (log_scales, "log_scales")):
        _check_tensor(t, name)
    if means.dim() < 2:
        raise ValueError(f"means must be [B, K, D] (B: any batch shape), got shape {tuple(means.shape)}")
    K, D = means.shape[-2:]
    if K < 1:
        raise ValueError(f"means must have K >= 1 components, got shape {tuple(means.shape)}")
    if D < 1:
        raise ValueError(f"means must have D >= 1 output dimensions, got shape {tuple(means.shape)}")
    if logits.dim() < 1 or logits.shape[-1] != K:
        raise ValueError(f"logits must be [B, K] = {tuple(means.shape[:-1])} to match means, "
                         f"got shape {tuple(logits.shape)}")
    if log_scales.dim() < 2 or tuple(log_scales.shape[-2:]) != (K, D):
        raise ValueError(f"log_scales must be [B, K, D] = {tuple(means.shape)} to match means, "
                         f"got shape {tuple(log_scales.shape)}")
    for t, name in ((logits, "logits"), (log_scales, "log_scales")):
        _check_like_means(t, name, means)
    batch_shape = means.shape[:-2]
    if logits.shape[:-1] == batch_shape and log_scales.shape[:-2] == batch_shape:  # the common case, fast
        return batch_shape
    try:
        return torch.broadcast_shapes(logits.shape[:-1], means.shape[:-2], log_scales.shape[:-2])
    except RuntimeError:
        raise ValueError(f"the batch shapes of logits {tuple(logits.shape[:-1])}, means {tuple(means.shape[:-2])} and "
                         f"log_scales {tuple(log_scales.shape[:-2])} must broadcast") from None


def _as_sample_shape(sample_shape) -> torch.Size:
    """torch's ``sample_shape`` (a tuple or ``torch.Size``); an int ``n`` means ``(n,)`` and must be >= 1."""
    if not isinstance(sample_shape, (tuple, list, torch.Size)):
        try:
            n = operator.index(sample_shape)
        except TypeError:
            raise TypeError(f"sample_shape must be a torch.Size, a tuple of ints or an int, "
                            f"got {sample_shape!r}") from None
        if n < 1 or isinstance(sample_shape, bool):
            raise ValueError(f"sample_shape given as an int n must be an integer >= 1, got {sample_shape!r}")
        return torch.Size([n])
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sample_shape):
        raise ValueError(f"sample_shape must hold integers >= 0, got {tuple(sample_shape)}")
    return torch.Size(sample_shape)


class GaussianMixture(torch.distributions.Distribution):
    """A batch of ``K``-component diagonal Gaussian mixtures over ``R^D``: batch shape ``B`` (any), event ``[D]``.

    Args:
        logits: ``[B, K]`` unnormalized log-weights.
        means: ``[B, K, D]`` component means ``mu``.
        log_scales: ``[B, K, D]`` component log standard deviations ``log sigma``.
        scales: instead of ``log_scales`` (keyword only): ``[B, K, D]`` standard deviations ``sigma > 0``.
        validate_args: as in ``torch.distributions``: ``None`` follows torch's default, True checks that the
            parameters (and the values given to :meth:`log_prob`, :meth:`cdf`) are real; a network's output
            skips it (:class:`physmdn.MDN` passes False: the check synchronizes with the GPU).

    The batch shapes of the three parameters broadcast. Values given to :meth:`log_prob`, :meth:`nll` and
    :meth:`responsibilities` are ``[*S, B, D]`` or any shape that broadcasts with ``B + [D]`` (e.g. ``[S, 1, D]``
    against a batch ``[B]``), and are cast to the mixture's dtype. Methods are differentiable unless stated.
    """

    arg_constraints = {"logits": constraints.real_vector,
                       "means": constraints.independent(constraints.real, 2),
                       "log_scales": constraints.independent(constraints.real, 2)}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, logits: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor | None = None, *,
                 scales: torch.Tensor | None = None, validate_args: bool | None = None):
        if (log_scales is None) == (scales is None):
            raise ValueError("give exactly one of log_scales and scales, got "
                             + ("both" if scales is not None else "neither"))
        if scales is not None:
            _check_tensor(scales, "scales")
            if validate_args or (validate_args is None and torch.distributions.Distribution._validate_args):
                if not bool((scales > 0).all()):
                    raise ValueError(f"scales must be > 0, got a minimum of {float(scales.min())}")
            log_scales = torch.log(scales)
        batch_shape = _check_params(logits, means, log_scales)
        K, D = means.shape[-2:]
        # broadcast only where needed, so that parameters of the full shape are kept as given
        self.logits = logits if logits.shape[:-1] == batch_shape else logits.expand(*batch_shape, K)
        self.means = means if means.shape[:-2] == batch_shape else means.expand(*batch_shape, K, D)
        self.log_scales = log_scales if log_scales.shape[:-2] == batch_shape else log_scales.expand(*batch_shape, K, D)
        super().__init__(batch_shape, torch.Size([D]), validate_args=validate_args)

    def _like(self, logits, means, log_scales) -> "GaussianMixture":
        """A mixture with new parameters (already checked) and this one's validation setting."""
        new = GaussianMixture(logits, means, log_scales, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def expand(self, batch_shape, _instance=None) -> "GaussianMixture":
        """The same mixtures broadcast to ``batch_shape`` (views, no copy)."""
        new = self._get_checked_instance(GaussianMixture, _instance)
        batch_shape = torch.Size(batch_shape)
        K, D = self.num_components, self.event_dim
        new.logits = self.logits.expand(*batch_shape, K)
        new.means = self.means.expand(*batch_shape, K, D)
        new.log_scales = self.log_scales.expand(*batch_shape, K, D)
        super(GaussianMixture, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    # ----- shapes -------------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        """Number of mixtures: the product of :attr:`batch_shape`."""
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

    def __len__(self) -> int:
        if not self.batch_shape:
            raise TypeError("len() of a GaussianMixture needs a batch dimension, got batch_shape ()")
        return self.batch_shape[0]

    def __repr__(self) -> str:
        return (f"GaussianMixture(batch_shape={tuple(self.batch_shape)}, components={self.num_components}, "
                f"dim={self.event_dim}, dtype={self.dtype}, device={self.device})")

    def __getitem__(self, index) -> "GaussianMixture":
        """Select along the batch dimensions (an int on the first one keeps it, with size one)."""
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        return self._like(self.logits[index], self.means[index], self.log_scales[index])

    def to(self, *args, **kwargs) -> "GaussianMixture":
        return self._like(self.logits.to(*args, **kwargs), self.means.to(*args, **kwargs),
                          self.log_scales.to(*args, **kwargs))

    def detach(self) -> "GaussianMixture":
        return self._like(self.logits.detach(), self.means.detach(), self.log_scales.detach())

    def _flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Parameters with the batch flattened: ``[N, K]``, ``[N, K, D]``, ``[N, K, D]`` (views when contiguous)."""
        if self.logits.dim() == 2:  # one batch dimension already
            return self.logits, self.means, self.log_scales
        K, D = self.num_components, self.event_dim
        return self.logits.reshape(-1, K), self.means.reshape(-1, K, D), self.log_scales.reshape(-1, K, D)

    # ----- parameters and moments ---------------------------------------------------------------------

    @property
    def weights(self) -> torch.Tensor:
        """Mixture weights ``pi = softmax(logits)``: ``[B, K]``."""
        return torch.softmax(self.logits, dim=-1)

    @property
    def log_weights(self) -> torch.Tensor:
        """``log pi``: ``[B, K]``."""
        return torch.log_softmax(self.logits, dim=-1)

    @property
    def scales(self) -> torch.Tensor:
        """Component standard deviations ``sigma = exp(log_scales)``: ``[B, K, D]``."""
        return torch.exp(self.log_scales)

    @property
    def mean(self) -> torch.Tensor:
        """Mixture mean ``m = sum_k pi_k mu_k``: ``[B, D]``."""
        return (self.weights.unsqueeze(-1) * self.means).sum(-2)

    @property
    def covariance(self) -> torch.Tensor:
        """Mixture covariance by the law of total variance: ``[B, D, D]``.

        ``Cov = sum_k pi_k diag(sigma_k^2) + sum_k pi_k (mu_k - m)(mu_k - m)^T``
        (within-component plus between-component spread).
        """
        w = self.weights
        centered = self.means - self.mean.unsqueeze(-2)  # [B, K, D]
        between = torch.einsum("...k,...ki,...kj->...ij", w, centered, centered)
        within = (w.unsqueeze(-1) * torch.exp(2.0 * self.log_scales)).sum(-2)  # [B, D]
        return between + torch.diag_embed(within)

    @property
    def variance(self) -> torch.Tensor:
        """Diagonal of :attr:`covariance`: ``sum_k pi_k (sigma_k^2 + (mu_k - m)^2)``, ``[B, D]``."""
        w = self.weights.unsqueeze(-1)
        centered = self.means - self.mean.unsqueeze(-2)
        return (w * (torch.exp(2.0 * self.log_scales) + centered * centered)).sum(-2)

    @property
    def mode(self) -> torch.Tensor:
        """Location of the highest mode (the global maximum of the density): ``[B, D]``, without gradients.

        All local maxima compete here, also those of light components (``modes(min_weight=0)``)."""
        return self.modes(min_weight=0.0).locations[..., 0, :]

    def component(self, k: int) -> torch.distributions.Independent:
        """Component ``k``, ``Independent(Normal(mu[..., k, :], sigma[..., k, :]), 1)``: batch ``B``, event ``[D]``."""
        K = self.num_components
        if not isinstance(k, int) or not -K <= k < K:
            raise IndexError(f"k must be an int component index in [0, {K}), got {k!r}")
        return torch.distributions.Independent(
            torch.distributions.Normal(self.means[..., k, :], self.scales[..., k, :]), 1)

    # ----- torch.distributions interchange ------------------------------------------------------------

    def to_torch(self) -> torch.distributions.MixtureSameFamily:
        """The equivalent ``MixtureSameFamily(Categorical(logits), Independent(Normal(means, scales), 1))``."""
        return torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(logits=self.logits),
            torch.distributions.Independent(torch.distributions.Normal(self.means, self.scales), 1),
        )

    @classmethod
    def from_torch(cls, mixture: torch.distributions.MixtureSameFamily,
                   validate_args: bool | None = None) -> "GaussianMixture":
        """The inverse of :meth:`to_torch`: a ``MixtureSameFamily`` of a ``Categorical`` and an
        ``Independent(Normal, 1)`` (batch ``[*B, K]``, event ``[D]``) becomes a ``GaussianMixture``."""
        if not isinstance(mixture, torch.distributions.MixtureSameFamily):
            raise TypeError(f"mixture must be a torch.distributions.MixtureSameFamily, got {type(mixture).__name__}")
        gate, components = mixture.mixture_distribution, mixture.component_distribution
        if not isinstance(gate, torch.distributions.Categorical):
            raise TypeError(f"mixture.mixture_distribution must be a Categorical, got {type(gate).__name__}")
        if not (isinstance(components, torch.distributions.Independent)
                and isinstance(components.base_dist, torch.distributions.Normal)
                and components.reinterpreted_batch_ndims == 1):
            raise TypeError("mixture.component_distribution must be Independent(Normal(loc, scale), 1) (diagonal "
                            f"Gaussians with event shape [D]), got {components!r}")
        normal = components.base_dist
        return cls(gate.logits, normal.loc, torch.log(normal.scale), validate_args=validate_args)

    # ----- densities ----------------------------------------------------------------------------------

    def _broadcast_value(self, y: torch.Tensor, name: str = "y") -> tuple[torch.Tensor, torch.Size]:
        """``y`` cast to the mixture's dtype, with the broadcast shape of ``y.shape[:-1]`` and the batch shape."""
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
        batch, D = tuple(self.batch_shape), self.event_dim
        try:
            if y.dim() < 1 or y.shape[-1] != D:
                raise RuntimeError
            shape = self.batch_shape if y.shape[:-1] == self.batch_shape else torch.broadcast_shapes(
                y.shape[:-1], self.batch_shape)
        except RuntimeError:
            raise ValueError(f"{name} must be [B, D] = {batch + (D,)} or [*S, B, D], got shape {tuple(y.shape)} "
                             f"(B: the batch shape {batch}, or a shape that broadcasts with it)") from None
        if self._validate_args:
            self._validate_sample(y)
        return y.to(self.dtype), shape

    def nll(self, y: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood ``-log p(y)`` through the fused :func:`physmdn.mixture_nll`: ``[*S, B]``."""
        y, shape = self._broadcast_value(y)
        K, D = self.num_components, self.event_dim
        if shape == self.batch_shape:  # one value per mixture: the parameters pass as views
            logits, means, log_scales = self._flat()
        else:
            logits = self.logits.expand(*shape, K).reshape(-1, K)
            means = self.means.expand(*shape, K, D).reshape(-1, K, D)
            log_scales = self.log_scales.expand(*shape, K, D).reshape(-1, K, D)
        if y.shape[:-1] != shape:
            y = y.expand(*shape, D)
        out = mixture_nll(logits, means, log_scales, y if y.dim() == 2 else y.reshape(-1, D))
        return out if out.shape == shape else out.reshape(shape)

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """``log p(y)``: ``[*S, B]`` for ``y [*S, B, D]`` (or any shape broadcasting with ``B + [D]``)."""
        return -self.nll(y)

    def log_responsibilities(self, y: torch.Tensor) -> torch.Tensor:
        """``log r_k(y) = log pi_k + log N(y | mu_k, sigma_k) - log p(y)``: ``[*S, B, K]``."""
        y, _ = self._broadcast_value(y)
        z = (y.unsqueeze(-2) - self.means) * torch.exp(-self.log_scales)  # [*S, B, K, D]
        log_normal = (-0.5 * z * z - self.log_scales).sum(-1) - self.event_dim * HALF_LOG_2PI
        return torch.log_softmax(self.log_weights + log_normal, dim=-1)

    def responsibilities(self, y: torch.Tensor) -> torch.Tensor:
        """Posterior component probabilities ``r_k(y) = pi_k N(y | mu_k, sigma_k) / p(y)``: ``[*S, B, K]``."""
        return torch.exp(self.log_responsibilities(y))

    def _one_dimensional(self, method: str) -> None:
        if self.event_dim != 1:
            raise NotImplementedError(f"{method} needs a one-dimensional event (D = 1), got event_shape "
                                      f"{tuple(self.event_shape)}; for D > 1 a mixture's joint CDF has no closed form")

    def cdf(self, value: torch.Tensor) -> torch.Tensor:
        """``F(y) = sum_k pi_k Phi((y - mu_k) / sigma_k)`` for ``D = 1``: ``value [*S, B, 1]`` -> ``[*S, B]``."""
        self._one_dimensional("cdf")
        value, shape = self._broadcast_value(value, "value")
        logits, means, log_scales = (t.expand(*shape, *t.shape[len(self.batch_shape):])
                                     for t in (self.logits, self.means, self.log_scales))
        return cdf_1d(logits, means, log_scales, value.expand(*shape, 1))

    def icdf(self, value: torch.Tensor) -> torch.Tensor:
        """The quantile ``F^-1(u)`` for ``D = 1``: ``value [*S, B]`` probabilities -> ``[*S, B, 1]``.

        Newton's method safeguarded by bisection inside the exact bracket of the component quantiles; differentiable
        through the implicit function theorem (``dy/du = 1 / p(y)``, ``dy/dtheta = -(dF/dtheta) / p(y)``).
        """
        self._one_dimensional("icdf")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"value must be a torch.Tensor, got {type(value).__name__}")
        try:
            shape = torch.broadcast_shapes(value.shape, self.batch_shape)
        except RuntimeError:
            raise ValueError(f"value must be probabilities [*S, B] with B = {tuple(self.batch_shape)} (or broadcasting "
                             f"with it), got shape {tuple(value.shape)}") from None
        if self._validate_args and not bool(((value >= 0) & (value <= 1)).all()):
            raise ValueError("value must be probabilities in [0, 1], got values outside")
        logits, means, log_scales = (t.expand(*shape, *t.shape[len(self.batch_shape):])
                                     for t in (self.logits, self.means, self.log_scales))
        return icdf_1d(logits, means, log_scales, value.to(self.dtype).expand(shape))

    # ----- sampling -----------------------------------------------------------------------------------

    def sample(self, sample_shape=torch.Size(), temperature: float = 1.0, scale_temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Draws ``sample_shape + B + [D]`` without gradients (use :meth:`rsample` for gradients).

        ``sample_shape`` is a tuple as in torch; an int ``n`` means ``(n,)``, giving ``[n, B, D]``. A component
        ``k ~ Categorical(softmax(logits / temperature))`` is drawn first (``temperature = 0``: the heaviest
        component), then ``y = mu_k + scale_temperature * sigma_k * eps``, ``eps ~ N(0, I)``. Only the chosen
        component is gathered and sampled (cost ``O(n B D)``, not ``O(n B K D)``).
        """
        sample_shape = _as_sample_shape(sample_shape)
        if not (temperature >= 0.0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        if not (scale_temperature >= 0.0 and math.isfinite(scale_temperature)):
            raise ValueError(f"scale_temperature must be a finite number >= 0, got {scale_temperature}")
        y = draw(*self._flat(), sample_shape.numel(), temperature=temperature, scale_temperature=scale_temperature,
                 generator=generator)
        return y.reshape(self._extended_shape(sample_shape))

    def rsample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterized draws ``sample_shape + B + [D]``: gradients reach ``means``, ``log_scales`` and ``logits``.

        The draw is exact (component, then Gaussian noise); the gradient is the implicit reparameterization gradient
        (Figurnov, Mohamed and Mnih, 2018) of the chain of conditional CDFs ``u_d = F_d(y_d | y_<d)``, which for
        diagonal components are 1-D mixtures with weights ``∝ pi_k prod_{e<d} N(y_e | mu_ke, sigma_ke)``:
        ``dy/dtheta = -(dF/dy)^-1 dF/dtheta``, for ``D = 1`` ``-(dF/dtheta) / p(y)``. Unbiased for
        ``grad E[f(y)]``; the backward pass costs ``O(n B K D + n B D^2)``.
        """
        sample_shape = _as_sample_shape(sample_shape)
        y = implicit_rsample(*self._flat(), sample_shape.numel(), generator)
        return y.reshape(self._extended_shape(sample_shape))

    # ----- entropy ------------------------------------------------------------------------------------

    def entropy_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Deterministic bounds ``(lower, upper)`` on the differential entropy, each ``[B]``:

        ``lower = -sum_k pi_k log sum_j pi_j N(mu_k | mu_j, S_k + S_j)`` (Huber et al. 2008) and
        ``upper = sum_k pi_k (H_k - log pi_k)``, ``H_k = sum_d (1/2 log(2 pi e) + log sigma_kd)``. The upper bound
        is exact for one component and approached when the components do not overlap.
        """
        logits, means, log_scales = self._flat()
        lower, upper = entropy_bounds(logits, means, log_scales)
        return lower.reshape(self.batch_shape), upper.reshape(self.batch_shape)

    def entropy(self, num_samples: int = 1024, generator: torch.Generator | None = None) -> torch.Tensor:
        """An estimate of the differential entropy ``H = -E[log p(y)]``: ``[B]``.

        A mixture's entropy has no closed form. This is the Monte Carlo mean of ``-log p(y)`` over ``num_samples``
        reparameterized draws (standard error ``std(log p) / sqrt(num_samples)``), clamped to
        :meth:`entropy_bounds`. Without a ``generator`` the draws use a fixed seed, so repeated calls agree.
        Differentiable (through :meth:`rsample`).
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if generator is None:
            generator = torch.Generator(self.device).manual_seed(0)
        y = self.rsample((num_samples,), generator=generator)
        estimate = -self.log_prob(y).mean(0)
        lower, upper = self.entropy_bounds()
        return torch.minimum(torch.maximum(estimate, lower), upper)

    # ----- regimes ------------------------------------------------------------------------------------

    def regime_loss(self, labels: torch.Tensor, target: torch.Tensor | None = None, mode: str = "logits") -> torch.Tensor:
        """Supervised term aligning component ``k`` with regime ``k``; ``labels [B]`` int, ``-1`` = unknown.

        ``mode="logits"``: cross-entropy ``-log pi_{label}``: supervises the gate only (it learns
        ``P(regime | x)``); it does not pull component ``label`` towards the labelled outcomes, so a component
        that sits on another branch stays there (the likelihood between branches is a barrier).
        ``mode="responsibilities"``: ``-log r_{label}(target)`` (needs ``target [B, D]``); added to the NLL
        it gives ``-log(pi_label N(target | mu_label, sigma_label))``, the complete-data likelihood, which moves
        component ``label`` onto the labelled outcomes (use this to tie components to regimes).

        Returns the mean over all batch elements with unknown labels counting 0 (so the term scales with the
        labelled fraction and averages exactly across data-parallel shards). Scalar.
        """
        K = self.num_components
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor [B], got {getattr(labels, 'dtype', type(labels).__name__)}")
        if labels.shape != self.batch_shape:
            raise ValueError(f"labels must be [B] = {tuple(self.batch_shape)}, got shape {tuple(labels.shape)}")
        labels = labels.to(self.device)
        if labels.numel() and (labels.min() < -1 or labels.max() >= K):
            raise ValueError(f"labels must be in [-1, {K - 1}] (-1 = unknown, else a component index), "
                             f"got values in [{int(labels.min())}, {int(labels.max())}]")
        known = labels >= 0
        safe = labels.clamp_min(0).unsqueeze(-1)
        if mode == "logits":
            log_p = self.log_weights
        elif mode == "responsibilities":
            if target is None:
                raise ValueError("target must be given for regime mode 'responsibilities', got None")
            log_p = self.log_responsibilities(target)
        else:
            raise ValueError(f"mode must be 'logits' or 'responsibilities', got {mode!r}")
        log_p = log_p.to(torch.promote_types(log_p.dtype, torch.float32))  # half precision sums in float32
        picked = -log_p.gather(-1, safe).squeeze(-1)
        return torch.where(known, picked, torch.zeros_like(picked)).sum() / max(self.batch_size, 1)

    # ----- modes --------------------------------------------------------------------------------------

    def modes(self, max_iter: int = 500, tol: float = 1e-7, merge_tol: float = 1e-2,
              min_weight: float = DEFAULT_MIN_WEIGHT) -> Modes:
        """Local maxima of each mixture density that carry at least ``min_weight`` of its mass.

        Fixed-point (Gaussian mean-shift) iteration, started at each ``mu_k``:

        ``x <- (sum_k r_k(x) Lambda_k)^-1 sum_k r_k(x) Lambda_k mu_k``,  ``Lambda_k = diag(sigma_k^-2)``,

        whose fixed points are exactly the stationary points of ``p`` (Carreira-Perpinan, 2000). It stops when
        every step is below ``tol`` (in units of the smallest component scale) or after ``max_iter`` steps. Points
        whose Hessian of ``log p`` is not negative (semi)definite are dropped (saddles), and points closer
        than ``merge_tol`` (Euclidean, in units of the smallest component scale of that batch element) are
        merged, keeping the higher density. The mass of a mode is the summed weight ``pi_k`` of the components
        whose iteration ends there; modes lighter than ``min_weight`` are dropped (the heaviest one always stays).
        The default ``min_weight = 0.01`` (:data:`DEFAULT_MIN_WEIGHT`) hides the bumps of the near-unused
        components a trained network leaves at weights of 1e-4 to 1e-3; ``min_weight=0`` reports every maximum.
        Runs in float64 (float32 on MPS), without gradients.

        Returns:
            :class:`Modes` (``locations [B, K, D]``, ``densities [B, K]``, ``log_densities [B, K]``,
            ``mask [B, K]``, ``counts [B]``, ``weights [B, K]``), highest density first, padded per batch element.
        """
        found = find_modes(*self._flat(), max_iter=max_iter, tol=tol, merge_tol=merge_tol, min_weight=min_weight)
        batch = tuple(self.batch_shape)
        return Modes(*(t.reshape(batch + tuple(t.shape[1:])) for t in found))

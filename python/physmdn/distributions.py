"""Batches of diagonal Gaussian mixtures: the output of a mixture density network.

For batch element ``b`` (batch shape ``[B]``, event shape ``[D]``, ``K`` components):

``p(y | b) = sum_k pi_bk N(y | mu_bk, diag(sigma_bk^2))``,  ``pi_b = softmax(logits_b)``,  ``sigma = exp(log_scales)``.

Parameters: ``logits [B, K]``, ``means [B, K, D]``, ``log_scales [B, K, D]``. Densities go through the fused op
:func:`physmdn.mixture_nll`; everything else is plain torch. Layering: this module imports only the ops layer.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._ops import check_mixture_params, mixture_nll
from .reference import HALF_LOG_2PI

__all__ = ["GaussianMixture", "Modes"]


class Modes(NamedTuple):
    """Local maxima of a batch of mixture densities, padded to ``K`` per batch element.

    Row ``b`` holds ``counts[b]`` modes in its first entries, sorted by density, highest first; the rest is
    padding (``mask`` False, ``locations`` NaN, ``densities`` 0, ``log_densities`` -inf).

    Fields:
        locations: ``[B, K, D]`` mode locations.
        densities: ``[B, K]`` mixture density ``p(mode)``.
        log_densities: ``[B, K]`` ``log p(mode)``.
        mask: ``[B, K]`` bool, True where an entry is a mode.
        counts: ``[B]`` number of modes per batch element (``1 <= counts[b] <= K``).
    """

    locations: torch.Tensor
    densities: torch.Tensor
    log_densities: torch.Tensor
    mask: torch.Tensor
    counts: torch.Tensor

    def to_list(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Unpadded per-element modes: a list of ``B`` pairs ``(locations [M_b, D], densities [M_b])``."""
        return [(self.locations[b, : int(n)], self.densities[b, : int(n)]) for b, n in enumerate(self.counts.tolist())]


class GaussianMixture:
    """A batch ``[B]`` of ``K``-component diagonal Gaussian mixtures over ``R^D``.

    Args:
        logits: ``[B, K]`` unnormalized log-weights.
        means: ``[B, K, D]`` component means ``mu``.
        log_scales: ``[B, K, D]`` component log standard deviations ``log sigma``.

    Observations passed to :meth:`log_prob`, :meth:`nll` and :meth:`responsibilities` are ``[B, D]`` or
    ``[*S, B, D]`` (sample dimensions in front, as :meth:`sample` returns them) and are cast to the mixture's
    dtype. All methods are differentiable unless stated otherwise.
    """

    def __init__(self, logits: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor):
        check_mixture_params(logits, means, log_scales)
        self.logits, self.means, self.log_scales = logits, means, log_scales

    # ----- shapes -------------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.means.shape[0]

    @property
    def num_components(self) -> int:
        return self.means.shape[1]

    @property
    def event_dim(self) -> int:
        return self.means.shape[2]

    @property
    def batch_shape(self) -> torch.Size:
        return torch.Size([self.batch_size])

    @property
    def event_shape(self) -> torch.Size:
        return torch.Size([self.event_dim])

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    @property
    def device(self) -> torch.device:
        return self.means.device

    def __len__(self) -> int:
        return self.batch_size

    def __repr__(self) -> str:
        return (f"GaussianMixture(batch={self.batch_size}, components={self.num_components}, "
                f"dim={self.event_dim}, dtype={self.dtype}, device={self.device})")

    def __getitem__(self, index) -> "GaussianMixture":
        """Select batch elements (an int keeps a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        return GaussianMixture(self.logits[index], self.means[index], self.log_scales[index])

    def to(self, *args, **kwargs) -> "GaussianMixture":
        return GaussianMixture(self.logits.to(*args, **kwargs), self.means.to(*args, **kwargs),
                               self.log_scales.to(*args, **kwargs))

    def detach(self) -> "GaussianMixture":
        return GaussianMixture(self.logits.detach(), self.means.detach(), self.log_scales.detach())

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
        return (self.weights.unsqueeze(-1) * self.means).sum(1)

    @property
    def covariance(self) -> torch.Tensor:
        """Mixture covariance by the law of total variance: ``[B, D, D]``.

        ``Cov = sum_k pi_k diag(sigma_k^2) + sum_k pi_k (mu_k - m)(mu_k - m)^T``
        (within-component plus between-component spread).
        """
        w = self.weights
        centered = self.means - self.mean.unsqueeze(1)  # [B, K, D]
        between = torch.einsum("bk,bki,bkj->bij", w, centered, centered)
        within = (w.unsqueeze(-1) * torch.exp(2.0 * self.log_scales)).sum(1)  # [B, D]
        return between + torch.diag_embed(within)

    @property
    def variance(self) -> torch.Tensor:
        """Diagonal of :attr:`covariance`: ``[B, D]``."""
        w = self.weights.unsqueeze(-1)
        centered = self.means - self.mean.unsqueeze(1)
        return (w * (torch.exp(2.0 * self.log_scales) + centered * centered)).sum(1)

    def component(self, k: int) -> torch.distributions.Independent:
        """Component ``k`` as ``Independent(Normal(mu[:, k], sigma[:, k]), 1)``: batch ``[B]``, event ``[D]``."""
        K = self.num_components
        if not isinstance(k, int) or not -K <= k < K:
            raise IndexError(f"k must be an int component index in [0, {K}), got {k!r}")
        return torch.distributions.Independent(torch.distributions.Normal(self.means[:, k], self.scales[:, k]), 1)

    def to_torch(self) -> torch.distributions.MixtureSameFamily:
        """The equivalent ``torch.distributions.MixtureSameFamily`` (batch ``[B]``, event ``[D]``)."""
        return torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(logits=self.logits),
            torch.distributions.Independent(torch.distributions.Normal(self.means, self.scales), 1),
        )

    # ----- densities ----------------------------------------------------------------------------------

    def _flatten_observations(self, y: torch.Tensor, name: str = "y") -> tuple[torch.Tensor, torch.Size]:
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
        B, D = self.batch_size, self.event_dim
        if y.dim() < 2 or tuple(y.shape[-2:]) != (B, D):
            raise ValueError(f"{name} must be [B, D] = {(B, D)} or [*S, B, D], got shape {tuple(y.shape)}")
        sample_shape = y.shape[:-2]
        return y.to(self.dtype).reshape(-1, B, D), sample_shape

    def nll(self, y: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood ``-log p(y)`` through the fused :func:`physmdn.mixture_nll`: ``[*S, B]``."""
        flat, sample_shape = self._flatten_observations(y)
        S, B, D = flat.shape
        if S == 1:
            out = mixture_nll(self.logits, self.means, self.log_scales, flat[0])
        else:
            K = self.num_components
            out = mixture_nll(self.logits.expand(S, B, K).reshape(S * B, K),
                              self.means.expand(S, B, K, D).reshape(S * B, K, D),
                              self.log_scales.expand(S, B, K, D).reshape(S * B, K, D),
                              flat.reshape(S * B, D))
        return out.reshape(*sample_shape, B)

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """``log p(y)``: ``[*S, B]`` for ``y [*S, B, D]``."""
        return -self.nll(y)

    def log_responsibilities(self, y: torch.Tensor) -> torch.Tensor:
        """``log r_k(y) = log pi_k + log N(y | mu_k, sigma_k) - log p(y)``: ``[*S, B, K]``."""
        flat, sample_shape = self._flatten_observations(y)
        z = (flat.unsqueeze(2) - self.means) * torch.exp(-self.log_scales)  # [S, B, K, D]
        log_normal = (-0.5 * z * z - self.log_scales).sum(-1) - self.event_dim * HALF_LOG_2PI
        joint = self.log_weights + log_normal
        return torch.log_softmax(joint, dim=-1).reshape(*sample_shape, self.batch_size, self.num_components)

    def responsibilities(self, y: torch.Tensor) -> torch.Tensor:
        """Posterior component probabilities ``r_k(y) = pi_k N(y | mu_k, sigma_k) / p(y)``: ``[*S, B, K]``."""
        return torch.exp(self.log_responsibilities(y))

    # ----- sampling -----------------------------------------------------------------------------------

    def sample(self, n: int = 1, temperature: float = 1.0, scale_temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` samples per batch element: ``[n, B, D]``.

        A component ``k ~ Categorical(softmax(logits / temperature))`` is drawn first (``temperature = 0``:
        the heaviest component), then ``y = mu_k + scale_temperature * sigma_k * eps``, ``eps ~ N(0, I)``.
        Only the chosen component is gathered and sampled (cost ``O(n B D)``, not ``O(n B K D)``).
        Gradients flow into ``means``/``log_scales`` (reparameterized given ``k``), not through the choice of ``k``.
        """
        if int(n) != n or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        n = int(n)
        if not (temperature >= 0.0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        if not (scale_temperature >= 0.0 and math.isfinite(scale_temperature)):
            raise ValueError(f"scale_temperature must be a finite number >= 0, got {scale_temperature}")
        B, K, D = self.means.shape
        logits = self.logits.detach().float()
        if temperature == 0.0:
            index = logits.argmax(-1, keepdim=True).expand(B, n)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            index = torch.multinomial(probs, n, replacement=True, generator=generator)  # [B, n]
        gather = index.unsqueeze(-1).expand(B, n, D)
        means = self.means.gather(1, gather)  # [B, n, D]
        log_scales = self.log_scales.gather(1, gather)
        eps = torch.randn(means.shape, dtype=means.dtype, device=means.device, generator=generator)
        return (means + scale_temperature * torch.exp(log_scales) * eps).transpose(0, 1)

    # ----- regimes ------------------------------------------------------------------------------------

    def regime_loss(self, labels: torch.Tensor, target: torch.Tensor | None = None, mode: str = "logits") -> torch.Tensor:
        """Supervised term aligning component ``k`` with regime ``k``; ``labels [B]`` int, ``-1`` = unknown.

        ``mode="logits"``: cross-entropy ``-log pi_{label}``: supervises the gate only (it learns
        ``P(regime | x)``); it does not pull component ``label`` towards the labelled outcomes, so a component
        that sits on another branch stays there (the likelihood between branches is a barrier).
        ``mode="responsibilities"``: ``-log r_{label}(target)`` (needs ``target [B, D]``); added to the NLL
        it gives ``-log(pi_label N(target | mu_label, sigma_label))``, the complete-data likelihood, which moves
        component ``label`` onto the labelled outcomes (use this to tie components to regimes).

        Returns the mean over all ``B`` samples with unknown labels counting 0 (so the term scales with the
        labelled fraction and averages exactly across data-parallel shards). Scalar.
        """
        K = self.num_components
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor [B], got {getattr(labels, 'dtype', type(labels).__name__)}")
        if tuple(labels.shape) != (self.batch_size,):
            raise ValueError(f"labels must be [B] = ({self.batch_size},), got shape {tuple(labels.shape)}")
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

    @torch.no_grad()
    def modes(self, max_iter: int = 500, tol: float = 1e-7, merge_tol: float = 1e-2) -> Modes:
        """Local maxima of each mixture density, found from every component mean.

        Fixed-point (Gaussian mean-shift) iteration, started at each ``mu_k``:

        ``x <- (sum_k r_k(x) Lambda_k)^-1 sum_k r_k(x) Lambda_k mu_k``,  ``Lambda_k = diag(sigma_k^-2)``,

        whose fixed points are exactly the stationary points of ``p`` (Carreira-Perpinan, 2000). It stops when
        every step is below ``tol`` (in units of the smallest component scale) or after ``max_iter`` steps. Points
        whose Hessian of ``log p`` is not negative (semi)definite are dropped (saddles), and points closer
        than ``merge_tol`` (Euclidean, in units of the smallest component scale of that batch element) are
        merged, keeping the higher density. Runs in float64 (float32 on MPS), without gradients.

        Returns:
            :class:`Modes` (``locations [B, K, D]``, ``densities [B, K]``, ``log_densities [B, K]``,
            ``mask [B, K]``, ``counts [B]``), highest density first, padded per batch element.
        """
        work = torch.float32 if self.device.type == "mps" else torch.float64
        means, log_scales = self.means.detach().to(work), self.log_scales.detach().to(work)
        log_w = torch.log_softmax(self.logits.detach().to(work), -1)
        B, K, D = means.shape
        precision = torch.exp(-2.0 * log_scales)  # [B, K, D]
        unit = torch.exp(log_scales).amin(dim=(1, 2))  # [B] smallest scale, the length unit
        x = means.clone()  # [B, M = K starts, D]

        def log_joint(points):  # [B, M, K]: log pi_k + log N(x_m | mu_k, sigma_k)
            z = (points.unsqueeze(2) - means.unsqueeze(1)) * torch.exp(-log_scales).unsqueeze(1)
            return log_w.unsqueeze(1) + (-0.5 * z * z - log_scales.unsqueeze(1)).sum(-1) - D * HALF_LOG_2PI

        for _ in range(max_iter):
            r = torch.softmax(log_joint(x), dim=-1).unsqueeze(-1)  # [B, M, K, 1]
            weight = r * precision.unsqueeze(1)  # [B, M, K, D]
            new = (weight * means.unsqueeze(1)).sum(2) / weight.sum(2)
            step = (new - x).abs().amax(dim=(1, 2)) / unit
            x = new
            if bool((step <= tol).all()):
                break

        joint = log_joint(x)
        log_density = torch.logsumexp(joint, dim=-1)  # [B, M]
        r = torch.softmax(joint, dim=-1)  # [B, M, K]
        g_k = (means.unsqueeze(1) - x.unsqueeze(2)) * precision.unsqueeze(1)  # grad of log N_k: [B, M, K, D]
        grad = (r.unsqueeze(-1) * g_k).sum(2)
        # Hessian of log p: sum_k r_k (g_k g_k^T - Lambda_k) - grad grad^T
        mean_precision = (r.unsqueeze(-1) * precision.unsqueeze(1)).sum(2)  # [B, M, D]
        hess = torch.einsum("bmk,bmki,bmkj->bmij", r, g_k, g_k) - torch.diag_embed(mean_precision)
        hess = hess - grad.unsqueeze(-1) * grad.unsqueeze(-2)
        top = torch.linalg.eigvalsh(0.5 * (hess + hess.transpose(-1, -2)))[..., -1]  # [B, M]
        curvature = precision.amax(dim=(1, 2)).unsqueeze(-1)  # [B, 1]
        is_max = top <= 1e-6 * curvature

        # greedy merge, highest density first
        ranked = torch.where(is_max, log_density, torch.full_like(log_density, -math.inf))
        order = torch.argsort(ranked, dim=-1, descending=True)
        x = x.gather(1, order.unsqueeze(-1).expand(B, K, D))
        log_density = log_density.gather(1, order)
        keep = is_max.gather(1, order)
        scaled = x / unit.view(B, 1, 1)
        dist = torch.cdist(scaled, scaled)  # [B, M, M]
        for m in range(1, K):
            close = (dist[:, m, :m] < merge_tol) & keep[:, :m]
            keep[:, m] &= ~close.any(-1)
        # a mixture always has a global maximum; keep the best start if all were rejected as saddles
        none = ~keep.any(-1)
        keep[:, 0] |= none

        order = torch.argsort(keep.to(torch.int8), dim=-1, descending=True, stable=True)
        x = x.gather(1, order.unsqueeze(-1).expand(B, K, D))
        log_density = log_density.gather(1, order)
        keep = keep.gather(1, order)
        out_dtype = self.dtype if self.dtype in (torch.float32, torch.float64) else torch.float32
        locations = torch.where(keep.unsqueeze(-1), x, torch.full_like(x, math.nan)).to(out_dtype)
        log_density = torch.where(keep, log_density, torch.full_like(log_density, -math.inf)).to(out_dtype)
        return Modes(locations, torch.exp(log_density), log_density, keep, keep.sum(-1))


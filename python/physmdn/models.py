"""Conditional density models: a mixture density network (:class:`MDN`) and a conditional flow-matching model (:class:`CFM`).

Both map a context ``x [B, in_features]`` to a distribution over outcomes ``y [out_features]`` and keep

* ``config``: a plain dict of constructor arguments; ``build_model(type(m).__name__, m.config)`` rebuilds the
  architecture (checkpoints store it, see :func:`physmdn.training.load`);
* standardization buffers ``x_loc, x_scale [in_features]`` and ``y_loc, y_scale [out_features]`` (identity until
  :meth:`set_normalization` is called, which ``physmdn.training.fit(normalize=True)`` does once). Inputs and
  outputs of the public methods are always in the data's own (physical) units; the networks see standardized ones.

Layering: imports ops, distributions, transport and the argument checks (_validation), never training.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import _validation as check
from ._mixture_correlated import MAX_RANK, MAX_TRIL_DIM
from .correlated import GaussianMixtureLowRank, GaussianMixtureTril
from .distributions import GaussianMixture
from .transport import ot_coupling

__all__ = ["MDN", "CFM", "build_model", "register_model", "MODELS", "mlp", "ACTIVATIONS", "COVARIANCES"]

COVARIANCES = ("diag", "full", "lowrank")
DEFAULT_MAX_CONDITION = 1e4  # MDN(covariance="full")'s bound on the condition number of a component's correlation

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "elu": nn.ELU,
    "softplus": nn.Softplus, "leaky_relu": nn.LeakyReLU, "mish": nn.Mish,
}


def _check_hidden(hidden) -> list[int]:
    if isinstance(hidden, int):
        hidden = (hidden,)
    if not isinstance(hidden, Sequence) or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden):
        raise ValueError(f"hidden must be a sequence of integers >= 1 (layer widths), got {hidden!r}")
    return [int(h) for h in hidden]


def _check_activation(activation) -> str:
    return check.one_of(activation, "activation", sorted(ACTIVATIONS))


def mlp(in_features: int, hidden: Sequence[int], out_features: int | None = None, activation: str = "silu",
        dropout: float = 0.0) -> nn.Sequential:
    """``Linear -> act (-> Dropout)`` per hidden width, then an optional final ``Linear(hidden[-1], out_features)``."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
        if dropout > 0.0:
            layers.append(nn.Dropout(dropout))
        width = h
    if out_features is not None:
        layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def _mean_centers(components: int, dim: int) -> torch.Tensor:
    """``[K, D]`` well-spread points in ``[-1, 1]^D``: bin midpoints for ``D = 1``, a centred scrambled Sobol set
    (fixed seed, independent of the global RNG) otherwise."""
    if dim == 1:
        return torch.linspace(-1.0 + 1.0 / components, 1.0 - 1.0 / components, components).unsqueeze(-1)
    points = torch.quasirandom.SobolEngine(dim, scramble=True, seed=0).draw(components).double() * 2.0 - 1.0
    points = points - points.mean(0, keepdim=True)
    return points.clamp(-1.0, 1.0).float()


class _ConditionalModel(nn.Module):
    """Shared pieces: standardization buffers, input checks, ``config``."""

    in_features: int
    out_features: int

    def _init_normalization(self, in_features: int, out_features: int) -> None:
        self.register_buffer("x_loc", torch.zeros(in_features))
        self.register_buffer("x_scale", torch.ones(in_features))
        self.register_buffer("y_loc", torch.zeros(out_features))
        self.register_buffer("y_scale", torch.ones(out_features))
        self.register_buffer("normalization_set", torch.tensor(False))

    @torch.no_grad()
    def set_normalization(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> None:
        """Standardize inputs/outputs with the column means and standard deviations of ``x [N, in_features]``
        and ``y [N, out_features]`` (constant columns get scale 1)."""
        for data, name, loc, scale, width in ((x, "x", self.x_loc, self.x_scale, self.in_features),
                                              (y, "y", self.y_loc, self.y_scale, self.out_features)):
            if data is None:
                continue
            if data.dim() != 2 or data.shape[1] != width or data.shape[0] < 1:
                raise ValueError(f"{name} must be [N >= 1, {width}] to set the normalization, got shape {tuple(data.shape)}")
            data = data.detach().double()
            mean, std = data.mean(0), data.std(0, unbiased=False)
            std = torch.where(std > 1e-12 * (1.0 + mean.abs()), std, torch.ones_like(std))
            loc.copy_(mean)
            scale.copy_(std)
        self.normalization_set.fill_(True)

    def _param_dtype(self) -> torch.dtype:
        return self.x_loc.dtype

    def _check_context(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"{name} must be [B, in_features] = [B, {self.in_features}], got shape {tuple(x.shape)}")
        return x.to(self._param_dtype())

    def _check_outcome(self, y: torch.Tensor, rows: int, name: str = "y") -> torch.Tensor:
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
        if y.dim() != 2 or tuple(y.shape) != (rows, self.out_features):
            raise ValueError(f"{name} must be [B, out_features] = {(rows, self.out_features)}, got shape {tuple(y.shape)}")
        return y.to(self._param_dtype())

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())


class _CpuSoftplus(torch.autograd.Function):
    """softplus(x) = max(x, 0) + log(1 + exp(-|x|)), written with log2 (torch's CPU log and log1p are 7-10x slower
    than its log2 on some CPUs: with them softplus takes ~13 % of an MDN training step at B = 4096; see
    docs/performance.md), and the exact derivative sigmoid(x) in the backward. float32: the log term is within 1.1e-7 of exact (absolute; below e^-17 it is 0
    where F.softplus keeps the tiny value), the sum within rounding; x > 20 gives x exactly, as F.softplus."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.relu(x) + math.log(2.0) * torch.log2(1.0 + torch.exp(-x.abs()))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """``F.softplus`` (beta 1); on the CPU below float64 through :class:`_CpuSoftplus`, except under torch.func
    transforms (an old-style autograd.Function, which functorch refuses; the setup_context style that it accepts
    costs ~65 us more per call through torch's argument binding)."""
    if x.device.type == "cpu" and x.dtype != torch.float64 and not torch._C._are_functorch_transforms_active():
        return _CpuSoftplus.apply(x)
    return F.softplus(x)


class MDN(_ConditionalModel):
    """Mixture density network: an MLP trunk and three linear heads give a :class:`GaussianMixture`.

    ``h = trunk((x - x_loc) / x_scale)``; ``logits = W_pi h + b_pi`` ``[B, K]``;
    ``mu = y_loc + y_scale * (W_mu h + b_mu)`` ``[B, K, D]``;
    ``log sigma = l + softplus(log(y_scale) + W_s h + b_s - l)`` ``[B, K, D]`` with ``l = log(min_scale)``: a
    smooth ``max`` that keeps every scale above ``min_scale`` (in the units of ``y``) and is the identity far above.

    Initialization keeps every component alive at step 0: ``W_pi`` small and ``b_pi = 0`` (near-uniform weights),
    ``b_mu`` spread over ``[-mean_spread, mean_spread]^D`` quasi-randomly (evenly for ``D = 1``) with small
    ``W_mu``, and ``b_s = log(init_scale)`` (default ``K^(-1/D)``, the spacing of the centres), all in
    standardized units of ``y``.

    Args:
        in_features: context width ``C``.
        out_features: outcome width ``D``.
        components: number of mixture components ``K >= 1``.
        hidden: trunk widths. activation: one of :data:`ACTIVATIONS`. dropout: after each trunk activation.
        min_scale: lower bound of every ``sigma``. init_scale, mean_spread: see above.
        covariance: the components' covariance: ``"diag"`` (:class:`GaussianMixture`), ``"full"``
            (:class:`GaussianMixtureTril`, ``D <= 32``) or ``"lowrank"`` (:class:`GaussianMixtureLowRank`).
        rank: the rank ``R`` (1 to 8) of the low-rank factor; only with ``covariance="lowrank"``.
        max_condition: the bound ``kappa >= 1`` (default ``1e4``) on the condition number of every component's
            correlation matrix; only with ``covariance="full"``.

    Correlated components (``y_scale`` as ``s``; heads in standardized units, mapped to ``y``'s units by the rows of
    ``diag(s)``, so that ``Sigma = diag(s) Sigma_std diag(s)``):

    * ``"full"``: ``Sigma = diag(sigma) C diag(sigma)``: the marginal standard deviations ``sigma`` from the scales
      head exactly as above (``sigma >= min_scale``), and the correlation matrix ``C = (1 - a) I + a W W^T`` with
      ``W`` lower triangular, ``W_ii = 1`` and ``W_ij`` (``i > j``) a head's output (``D (D - 1) / 2`` per
      component) before each row is scaled to unit length (so ``W W^T`` is a correlation matrix);
      ``scale_tril = diag(sigma) chol(C)`` ``[B, K, D, D]``. The eigenvalues of ``C`` lie in
      ``[1 - a, 1 + (D - 1) a]``, and ``a = (kappa - 1) / (kappa + D - 1)`` makes their ratio at most
      ``kappa = max_condition``; every correlation is at most ``a`` in magnitude (``kappa = 1e4``: 0.9998 for
      ``D = 2``, 0.9969 for ``D = 32``) and ``Sigma >= (1 - a) min_scale^2 I``. An unbounded Cholesky factor fitted
      to a few 32-point fields per component reaches condition numbers above ``1e17``; the whitened residuals
      ``L^-1 (y - mu)`` of fields far from a component grow with it past ``1e19``, whose squares overflow float32,
      and training turns NaN (docs/results.md, correlated components). With ``W = I`` (or ``kappa = 1``) the model
      is the diagonal one.
    * ``"lowrank"``: ``cov_factor = diag(s) V / sqrt(R)``, ``V [K, D, R]`` a head's output, and
      ``cov_diag = sigma^2 >= min_scale^2`` (``sigma`` as above), so ``Sigma >= min_scale^2 I``.

    The off-diagonal and factor heads start small (weights scaled by 0.1, zero bias): training starts near the
    diagonal model.

    ``forward(x [B, C])`` returns the mixture of the chosen kind with parameters in the model's dtype (float32 by
    default, also under bf16 autocast: the heads' outputs are cast back so the likelihood is evaluated in full
    precision).
    """

    def __init__(self, in_features: int, out_features: int, components: int, hidden: Sequence[int] = (64, 64),
                 activation: str = "silu", min_scale: float = 1e-4, init_scale: float | None = None,
                 mean_spread: float = 1.0, dropout: float = 0.0, covariance: str = "diag", rank: int | None = None,
                 max_condition: float | None = None):
        super().__init__()
        self.covariance = check.one_of(covariance, "covariance", COVARIANCES)
        if covariance == "lowrank":
            rank = 2 if rank is None else check.count(rank, "rank")
            if rank > MAX_RANK:
                raise ValueError(f"rank must be an integer in [1, {MAX_RANK}], got {rank}")
        elif rank is not None:
            raise ValueError(f"rank is for covariance='lowrank', got rank={rank!r} with covariance={covariance!r}")
        if covariance == "full":
            max_condition = DEFAULT_MAX_CONDITION if max_condition is None else check.finite(max_condition,
                                                                                             "max_condition")
            if not max_condition >= 1.0:
                raise ValueError(f"max_condition must be a finite number >= 1, got {max_condition!r}")
        elif max_condition is not None:
            raise ValueError(f"max_condition is for covariance='full', got max_condition={max_condition!r} with "
                             f"covariance={covariance!r}")
        if covariance == "full" and check.count(out_features, "out_features") > MAX_TRIL_DIM:
            raise ValueError(f"out_features must be <= {MAX_TRIL_DIM} for covariance='full', got {out_features}; "
                             f"use covariance='lowrank'")
        self.in_features = check.count(in_features, "in_features")
        self.out_features = check.count(out_features, "out_features")
        self.components = check.count(components, "components")
        hidden = _check_hidden(hidden)
        activation = _check_activation(activation)
        min_scale = check.positive(min_scale, "min_scale")
        if init_scale is None:
            init_scale = float(components) ** (-1.0 / out_features)
        init_scale = check.positive(init_scale, "init_scale")
        mean_spread = check.nonnegative(mean_spread, "mean_spread")
        dropout = check.nonnegative(dropout, "dropout")
        if dropout >= 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.config = dict(in_features=in_features, out_features=out_features, components=components, hidden=hidden,
                           activation=activation, min_scale=min_scale, init_scale=init_scale, mean_spread=mean_spread,
                           dropout=dropout)
        if covariance != "diag":  # (diagonal models keep the config they always had)
            self.config.update(covariance=covariance, rank=rank)
        if covariance == "full":
            self.config.update(max_condition=max_condition)
        self.rank = rank
        self.max_condition = max_condition
        self._init_normalization(in_features, out_features)
        K, D = components, out_features
        self.trunk = mlp(in_features, hidden, None, activation, dropout)
        width = hidden[-1] if hidden else in_features
        self.logits_head = nn.Linear(width, K)
        self.means_head = nn.Linear(width, K * D)
        self.scales_head = nn.Linear(width, K * D)
        self.log_min_scale = math.log(min_scale)
        with torch.no_grad():
            self.logits_head.weight.mul_(0.1)
            self.logits_head.bias.zero_()
            self.means_head.weight.mul_(0.1)
            self.means_head.bias.copy_((mean_spread * _mean_centers(K, D)).reshape(-1))
            self.scales_head.weight.mul_(0.1)
            self.scales_head.bias.fill_(math.log(init_scale))
        self.correlation_head = None
        if covariance == "full" and D > 1:
            self.correlation_head = nn.Linear(width, K * D * (D - 1) // 2)
            rows, cols = torch.tril_indices(D, D, -1)
            self.register_buffer("_tril_index", rows * D + cols, persistent=False)
            # the weight a of the correlation matrix in C = (1 - a) I + a W W^T that bounds cond(C) by max_condition
            self._shrink = (max_condition - 1.0) / (max_condition + D - 1.0)
        elif covariance == "lowrank":
            self.correlation_head = nn.Linear(width, K * D * rank)
        if self.correlation_head is not None:
            with torch.no_grad():
                self.correlation_head.weight.mul_(0.1)
                self.correlation_head.bias.zero_()

    def forward(self, x: torch.Tensor) -> GaussianMixture | GaussianMixtureTril | GaussianMixtureLowRank:
        x = self._check_context(x, "x")
        dtype = x.dtype
        B, K, D = x.shape[0], self.components, self.out_features
        h = self.trunk((x - self.x_loc) / self.x_scale)
        logits = self.logits_head(h).to(dtype)
        means = self.y_loc + self.y_scale * self.means_head(h).to(dtype).view(B, K, D)
        raw = torch.log(self.y_scale) + self.scales_head(h).to(dtype).view(B, K, D)
        log_scales = self.log_min_scale + softplus(raw - self.log_min_scale)
        if self.covariance == "diag":
            return GaussianMixture(logits, means, log_scales, validate_args=False)  # no GPU sync per forward
        if self.covariance == "lowrank":
            factor = self.correlation_head(h).to(dtype).view(B, K, D, self.rank)
            factor = (self.y_scale / math.sqrt(self.rank)).unsqueeze(-1) * factor
            return GaussianMixtureLowRank(logits, means, factor, torch.exp(2.0 * log_scales), validate_args=False)
        if self.correlation_head is None:  # D = 1
            return GaussianMixtureTril(logits, means, torch.exp(log_scales).unsqueeze(-1), validate_args=False)
        return GaussianMixtureTril(logits, means, self._scale_tril(h, log_scales), validate_args=False)

    def _scale_tril(self, h: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
        """``diag(sigma) chol(C)`` ``[B, K, D, D]`` with ``C = (1 - a) I + a W W^T`` (class docstring)."""
        B, K, D = log_scales.shape
        below = self.correlation_head(h).to(log_scales.dtype).view(B, K, -1)
        eye = torch.eye(D, dtype=below.dtype, device=below.device)
        rows = eye.expand(B, K, D, D).reshape(B, K, D * D)
        rows = rows.scatter(-1, self._tril_index.expand(B, K, -1), below).view(B, K, D, D)
        rows = rows / torch.linalg.vector_norm(rows, dim=-1, keepdim=True)  # unit rows: W W^T has a unit diagonal
        correlation = self._shrink * (rows @ rows.transpose(-1, -2)) + (1.0 - self._shrink) * eye
        factor = torch.linalg.cholesky_ex(correlation).L  # eigenvalues >= 1 - a: no check needed (and no sync)
        return torch.exp(log_scales).unsqueeze(-1) * factor


class CFM(_ConditionalModel):
    """Conditional flow matching: a velocity field ``v(x_t, t, context)`` transports ``N(0, I)`` to ``p(y | context)``.

    Probability path (in standardized ``y`` units): ``x_t = (1 - t) x0 + t x1 + sigma_min eps``, target velocity
    ``u = x1 - x0``; loss ``E_t ||v(x_t, t, c) - u||^2`` (mean over batch and dimensions). ``x0 ~ N(0, I)`` is paired
    with the data ``x1`` independently (``coupling="independent"``, I-CFM) or by minibatch optimal transport
    (``coupling="ot"``, see :func:`physmdn.transport.ot_coupling`: exact Hungarian on the CPU for batches up to
    ``ot_exact_max``, Sinkhorn on the model's device beyond). The OT cost is
    ``||x0_i - x1_j||^2 + ot_context_weight ||c_i - c_j||^2`` on standardized values, noise ``i`` carrying the
    context of batch row ``i``: without the context term (``ot_context_weight=0``) OT pairs noise by the outcome
    alone, so the noise paired with a context is no longer ``N(0, I)`` given it and the learned conditionals are
    biased (on the ``y = +-sqrt(x)`` toy: energy distance 0.28 instead of 0.008 at ``x = 0.2``). The default 100
    keeps pairs within nearby contexts; very large weights turn the coupling back into the independent one.

    Network: MLP on ``[x_t, t, sin(2 pi f t), cos(2 pi f t), (context - x_loc) / x_scale]`` with
    ``time_features // 2`` frequencies ``f`` geometric in ``[1, time_max_frequency]``.

    Physics guidance (:meth:`loss` with ``residual``): the one-step endpoint estimate
    ``x1_hat = x_t + (1 - t) v`` (exact for straight paths) is mapped to physical units and penalized by
    ``physics_weight * mean_b w(t_b) ||residual(x1_hat_b, context_b)||^2``.
    """

    def __init__(self, in_features: int, out_features: int, hidden: Sequence[int] = (128, 128, 128),
                 activation: str = "silu", time_features: int = 16, time_max_frequency: float = 8.0,
                 coupling: str = "independent", sigma_min: float = 0.0, ot_exact_max: int = 256,
                 ot_epsilon: float = 0.05, ot_iterations: int = 100, ot_context_weight: float = 100.0):
        super().__init__()
        self.in_features = check.count(in_features, "in_features")
        self.out_features = check.count(out_features, "out_features")
        hidden = _check_hidden(hidden)
        activation = _check_activation(activation)
        time_features = check.count(time_features, "time_features", minimum=0)
        if time_features % 2:
            raise ValueError(f"time_features must be even (sin and cos per frequency), got {time_features}")
        time_max_frequency = check.positive(time_max_frequency, "time_max_frequency")
        if coupling not in ("independent", "ot"):
            raise ValueError(f"coupling must be 'independent' or 'ot', got {coupling!r}")
        sigma_min = check.nonnegative(sigma_min, "sigma_min")
        ot_exact_max = check.count(ot_exact_max, "ot_exact_max", minimum=0)
        ot_epsilon = check.positive(ot_epsilon, "ot_epsilon")
        ot_iterations = check.count(ot_iterations, "ot_iterations")
        ot_context_weight = check.nonnegative(ot_context_weight, "ot_context_weight")
        self.config = dict(in_features=in_features, out_features=out_features, hidden=hidden, activation=activation,
                           time_features=time_features, time_max_frequency=time_max_frequency, coupling=coupling,
                           sigma_min=sigma_min, ot_exact_max=ot_exact_max, ot_epsilon=ot_epsilon,
                           ot_iterations=ot_iterations, ot_context_weight=ot_context_weight)
        self.coupling = coupling
        self._init_normalization(in_features, out_features)
        n_freq = time_features // 2
        freqs = torch.exp(torch.linspace(0.0, math.log(time_max_frequency), n_freq)) if n_freq else torch.zeros(0)
        self.register_buffer("time_frequencies", freqs)
        self.net = mlp(out_features + 1 + time_features + in_features, hidden, out_features, activation)
        with torch.no_grad():  # a small initial field: the flow starts close to the identity map
            self.net[-1].weight.mul_(0.1)
            self.net[-1].bias.zero_()

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """``[t, sin(2 pi f t), cos(2 pi f t)]``: ``[N, 1 + time_features]`` for ``t [N]``."""
        angle = 2.0 * math.pi * t.unsqueeze(-1) * self.time_frequencies
        return torch.cat([t.unsqueeze(-1), torch.sin(angle), torch.cos(angle)], dim=-1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor) -> torch.Tensor:
        """Velocity ``v [N, D]`` at state ``x_t [N, D]`` (standardized ``y`` units), time ``t`` (``[N]``, ``[N, 1]``
        or a number in ``[0, 1]``) and ``context [N, C]`` (physical units)."""
        context = self._check_context(context, "context")
        N, dtype = context.shape[0], context.dtype
        if not isinstance(x_t, torch.Tensor) or tuple(x_t.shape) != (N, self.out_features):
            raise ValueError(f"x_t must be [N, out_features] = {(N, self.out_features)} (N from context), "
                             f"got shape {tuple(getattr(x_t, 'shape', ()))}")
        t = torch.as_tensor(t, dtype=dtype, device=context.device)
        if t.dim() == 2 and t.shape[1] == 1:
            t = t.squeeze(1)
        if t.dim() == 0:
            t = t.expand(N)
        if tuple(t.shape) != (N,):
            raise ValueError(f"t must be a number, [N] or [N, 1] with N = {N}, got shape {tuple(t.shape)}")
        inputs = torch.cat([x_t.to(dtype), self.time_embedding(t.to(dtype)), (context - self.x_loc) / self.x_scale], dim=-1)
        return self.net(inputs).to(dtype)

    def standardize(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.y_loc) / self.y_scale

    def destandardize(self, z: torch.Tensor) -> torch.Tensor:
        return self.y_loc + self.y_scale * z

    def loss(self, context: torch.Tensor, target: torch.Tensor, *, residual: Callable | None = None,
             physics_weight: float = 1.0, time_weighting: str = "none", generator: torch.Generator | None = None,
             autocast_dtype: torch.dtype | None = None, return_terms: bool = False):
        """Flow-matching loss on a batch ``context [B, C]``, ``target [B, D]`` (physical units). Scalar.

        With ``residual(y [B, D], context [B, C]) -> r [B]`` or ``[B, M]`` (physical units) and
        ``physics_weight > 0`` it adds ``physics_weight * mean_b w(t_b) ||r(x1_hat_b)||^2`` with ``w(t) = 1``
        (``time_weighting="none"``) or ``t`` (``"linear"``, trusting the endpoint estimate more near the data).
        ``generator`` drives noise, times and couplings; ``autocast_dtype`` (e.g. ``torch.bfloat16``) wraps the
        velocity network only. ``return_terms=True`` returns ``(total, flow_matching, physics_penalty)``.
        """
        context = self._check_context(context, "context")
        B = context.shape[0]
        target = self._check_outcome(target, B, "target")
        if time_weighting not in ("none", "linear"):
            raise ValueError(f"time_weighting must be 'none' or 'linear', got {time_weighting!r}")
        x1 = self.standardize(target)
        kw = dict(dtype=x1.dtype, device=x1.device, generator=generator)
        x0 = torch.randn(x1.shape, **kw)
        if self.coupling == "ot" and B > 1:
            c = (context - self.x_loc) / self.x_scale
            index = ot_coupling(x0, x1, source_context=c, target_context=c, context_weight=self.config["ot_context_weight"],
                                exact_max=self.config["ot_exact_max"], epsilon=self.config["ot_epsilon"],
                                iterations=self.config["ot_iterations"], generator=generator)
            x0 = x0[index]
        t = torch.rand((B,), **kw)
        x_t = (1.0 - t).unsqueeze(-1) * x0 + t.unsqueeze(-1) * x1
        if self.config["sigma_min"] > 0.0:
            x_t = x_t + self.config["sigma_min"] * torch.randn(x1.shape, **kw)
        with torch.autocast(x1.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            v = self(x_t, t, context)
        flow_matching = (v - (x1 - x0)).square().mean()
        penalty = flow_matching.new_zeros(())
        if residual is not None and physics_weight != 0.0:
            x1_hat = self.destandardize(x_t + (1.0 - t).unsqueeze(-1) * v)
            r = residual(x1_hat, context)
            if not isinstance(r, torch.Tensor) or r.shape[:1] != (B,):
                raise ValueError(f"residual must return a tensor [B] or [B, M] with B = {B}, "
                                 f"got {tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__}")
            squared = r.reshape(B, -1).square().sum(-1)
            if time_weighting == "linear":
                squared = t * squared
            penalty = squared.mean()
        total = flow_matching + physics_weight * penalty
        return (total, flow_matching, penalty) if return_terms else total

    @torch.no_grad()
    def sample(self, context: torch.Tensor, n: int = 1, steps: int = 32, method: str = "euler",
               generator: torch.Generator | None = None, return_path: bool = False):
        """Draw ``n`` samples per context by integrating ``dx/dt = v(x, t, c)`` from ``t = 0`` (``x ~ N(0, I)``) to 1.

        Args:
            context: ``[B, C]``.
            n: samples per context. steps: fixed integration steps, ``h = 1 / steps``.
            method: ``"euler"`` (1 evaluation per step), ``"midpoint"`` (2) or ``"rk4"`` (4).
        Returns:
            ``[n, B, D]`` samples in physical units (sample dimension first, like
            :meth:`GaussianMixture.sample`); with ``return_path=True`` also the states ``[steps + 1, n, B, D]``.
        Runs without gradients; put the model in ``eval()`` mode yourself.
        """
        context = self._check_context(context, "context")
        n = check.count(n, "n")
        steps = check.count(steps, "steps")
        if method not in ("euler", "midpoint", "rk4"):
            raise ValueError(f"method must be 'euler', 'midpoint' or 'rk4', got {method!r}")
        B, D = context.shape[0], self.out_features
        ctx = context.repeat(n, 1)  # [n * B, C], sample-major
        x = torch.randn((n * B, D), dtype=context.dtype, device=context.device, generator=generator)
        h = 1.0 / steps
        path = [x] if return_path else None

        def v(state, time):
            return self(state, time, ctx)

        for i in range(steps):
            t = i * h
            if method == "euler":
                x = x + h * v(x, t)
            elif method == "midpoint":
                x = x + h * v(x + 0.5 * h * v(x, t), t + 0.5 * h)
            else:
                k1 = v(x, t)
                k2 = v(x + 0.5 * h * k1, t + 0.5 * h)
                k3 = v(x + 0.5 * h * k2, t + 0.5 * h)
                k4 = v(x + h * k3, t + h)
                x = x + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
            if return_path:
                path.append(x)
        out = self.destandardize(x).reshape(n, B, D)
        if return_path:
            return out, torch.stack([self.destandardize(p).reshape(n, B, D) for p in path])
        return out


MODELS: dict[str, type] = {"MDN": MDN, "CFM": CFM}


def register_model(cls: type) -> type:
    """Class decorator: make a model class (with a ``config`` dict of its constructor arguments) rebuildable
    from checkpoints by its class name."""
    MODELS[cls.__name__] = cls
    return cls


def build_model(name: str, config: dict) -> nn.Module:
    """Rebuild a model from its class name and ``config`` (the dict stored as ``model.config``)."""
    if name not in MODELS:
        raise ValueError(f"model class must be one of {sorted(MODELS)} (see register_model), got {name!r}")
    return MODELS[name](**config)

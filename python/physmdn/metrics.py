"""Metrics for conditional density models against a problem's ground truth.

Two-sample distances take sample sets ``x [..., n, D]`` and ``y [..., m, D]`` (leading batch dimensions, e.g. one
per context) and return ``[...]``:

* :func:`energy_distance` ``E(X, Y) = 2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (V-statistic; ``>= 0``, ``0`` iff equal);
* :func:`mmd` squared maximum mean discrepancy with the RBF kernel ``k(a, b) = exp(-|a - b|^2 / (2 h^2))``,
  ``h`` by the median heuristic unless given;
* :func:`sliced_wasserstein` ``SW_1 = E_theta W_1(theta . X, theta . Y)`` over random unit directions, with the exact
  1-D :func:`wasserstein_1d` ``W_1 = int |F_X(t) - F_Y(t)| dt``.

Conditional quantities take model samples ``[n, B, D]`` and ground-truth samples ``[m, B, D]`` (sample dimension
first, as :meth:`physmdn.distributions.GaussianMixture.sample`, :meth:`physmdn.models.CFM.sample` and
:meth:`physmdn.problems.Problem.sample_truth` return them) at ``B`` held-out contexts ``[B, C]``:
:func:`conditional` averages any two-sample distance over contexts; :func:`mode_weight_error`,
:func:`physics_residual`, :func:`calibration` and :func:`mixture_nll` complete the set, and :func:`evaluate` runs
them all for one model.

All metrics are plain torch (any device), computed in float64 on the CPU and float32 elsewhere; scipy serves as the
independent reference in the tests. Layering: imports the ops layer only (problems come in as objects).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ._mixture_nll import mixture_nll as _mixture_nll_op

__all__ = [
    "mixture_nll", "energy_distance", "energy_score", "mmd", "median_bandwidth", "wasserstein_1d", "sliced_wasserstein",
    "conditional", "branch_frequencies", "component_branch_weights", "mode_weight_error", "physics_residual",
    "Calibration", "calibration", "evaluate",
]

_CHUNK_ELEMENTS = 1 << 22  # pairwise blocks of at most ~4M distances (32 MiB in float64)


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.device.type == "cpu" else torch.float32


def _check_sets(x, y, name_x: str = "x", name_y: str = "y") -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Validate ``x [..., n, D]``, ``y [..., m, D]`` (same leading dims and D) and flatten to ``[B, n, D]``."""
    for t, name in ((x, name_x), (y, name_y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [..., n, D], got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name} must be [..., n, D] (at least 2 dims), got shape {tuple(t.shape)}")
        if t.shape[-2] < 1:
            raise ValueError(f"{name} must hold at least one sample, got shape {tuple(t.shape)}")
    if x.shape[:-2] != y.shape[:-2] or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"{name_x} [..., n, D] and {name_y} [..., m, D] must share the leading dims and D, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"{name_y} must be on the device of {name_x} ({x.device}), got {y.device}")
    batch = tuple(x.shape[:-2])
    work = _work_dtype(x)
    return (x.reshape(-1, *x.shape[-2:]).to(work), y.reshape(-1, *y.shape[-2:]).to(work), batch)


def _pairwise_mean(a: torch.Tensor, b: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``mean_{i, j} fn(|a_i - b_j|)`` per batch element for ``a [B, n, D]``, ``b [B, m, D]``: ``[B]``.

    Blocks of rows keep memory bounded; distances are computed directly (no Gram-matrix shortcut), so
    ``|a_i - a_i| = 0`` exactly."""
    B, n, _ = a.shape
    m = b.shape[1]
    rows = max(1, _CHUNK_ELEMENTS // max(1, B * m))
    total = a.new_zeros(B)
    for start in range(0, n, rows):
        dist = torch.cdist(a[:, start:start + rows], b, compute_mode="donot_use_mm_for_euclid_dist")
        total = total + fn(dist).sum(dim=(1, 2))
    return total / (n * m)


# ----- two-sample distances -------------------------------------------------------------------------

def energy_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Energy distance (Szekely–Rizzo) ``2 E|X - Y| - E|X - X'| - E|Y - Y'|``, V-statistic: ``[...]``.

    ``x [..., n, D]``, ``y [..., m, D]``; ``|.|`` the Euclidean norm. Non-negative; 0 for identical sets. In 1-D it
    equals ``2 int (F_X(t) - F_Y(t))^2 dt``, the square of ``scipy.stats.energy_distance``.
    """
    a, b, batch = _check_sets(x, y)
    identity = lambda d: d  # noqa: E731
    value = 2.0 * _pairwise_mean(a, b, identity) - _pairwise_mean(a, a, identity) - _pairwise_mean(b, b, identity)
    return value.clamp(min=0.0).reshape(batch).to(x.dtype)


def energy_score(samples: torch.Tensor, observations: torch.Tensor) -> torch.Tensor:
    """Energy score (Gneiting & Raftery 2007) of a sampled predictive distribution against one observation per
    context, ``E|X - y| - E|X - X'| / 2`` (V-statistic), averaged over contexts: a scalar, lower is better.

    ``samples [n, B, D]`` (``n`` draws at each of ``B`` contexts), ``observations [B, D]``. A strictly proper scoring
    rule: its expectation over ``y`` is smallest when the samples come from the true conditional law, and its excess
    over that minimum is half the energy distance between the two laws (:func:`energy_distance`), so it ranks models
    like the energy distance while needing only one observation per context (held-out data)."""
    if not isinstance(samples, torch.Tensor) or samples.dim() != 3:
        raise ValueError(f"samples must be a [n, B, D] tensor, got "
                         f"{tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__}")
    if not isinstance(observations, torch.Tensor) or observations.shape != samples.shape[1:]:
        raise ValueError(f"observations must be [B, D] = {list(samples.shape[1:])}, got "
                         f"{tuple(observations.shape) if isinstance(observations, torch.Tensor) else observations}")
    work = _work_dtype(samples)
    a = samples.transpose(0, 1).to(work)  # [B, n, D]
    identity = lambda d: d  # noqa: E731
    score = _pairwise_mean(a, observations.to(work).unsqueeze(1), identity) - 0.5 * _pairwise_mean(a, a, identity)
    return score.mean().to(samples.dtype)


def median_bandwidth(x: torch.Tensor, y: torch.Tensor, max_points: int = 1024) -> torch.Tensor:
    """Median heuristic: the median pairwise Euclidean distance of the pooled sample (off-diagonal pairs, the first
    ``max_points`` points of each set): ``[...]``. Floors at ``1e-12`` (identical points)."""
    a, b, batch = _check_sets(x, y)
    pooled = torch.cat([a[:, :max_points], b[:, :max_points]], dim=1)
    dist = torch.cdist(pooled, pooled, compute_mode="donot_use_mm_for_euclid_dist")
    N = pooled.shape[1]
    if N < 2:
        return torch.ones(batch, dtype=x.dtype, device=x.device)
    iu = torch.triu_indices(N, N, offset=1, device=pooled.device)
    med = dist[:, iu[0], iu[1]].median(dim=-1).values
    return med.clamp(min=1e-12).reshape(batch).to(x.dtype)


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidth: float | torch.Tensor | None = None,
        unbiased: bool = False) -> torch.Tensor:
    """Squared maximum mean discrepancy with the RBF kernel ``k(a, b) = exp(-|a - b|^2 / (2 h^2))``: ``[...]``.

    ``MMD^2 = E k(X, X') + E k(Y, Y') - 2 E k(X, Y)``; V-statistic (``>= 0``, 0 for identical sets) or, with
    ``unbiased=True``, the U-statistic (diagonal terms dropped; can be slightly negative). ``bandwidth`` ``h``:
    a number, a ``[...]`` tensor, or None for :func:`median_bandwidth`.
    """
    a, b, batch = _check_sets(x, y)
    B = a.shape[0]
    if bandwidth is None:
        h = median_bandwidth(a, b).to(a.dtype)
    else:
        h = torch.as_tensor(bandwidth, dtype=a.dtype, device=a.device)
        if not bool((h > 0).all()):
            raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
        h = h.expand(batch).reshape(B) if h.dim() else h.expand(B)
    scale = (-0.5 / h**2).view(B, 1, 1)
    kernel = lambda d: torch.exp(scale * d * d)  # noqa: E731
    kxx, kyy, kxy = _pairwise_mean(a, a, kernel), _pairwise_mean(b, b, kernel), _pairwise_mean(a, b, kernel)
    if unbiased:
        n, m = a.shape[1], b.shape[1]
        if n < 2 or m < 2:
            raise ValueError(f"unbiased MMD needs at least 2 samples per set, got n={n}, m={m}")
        kxx = (kxx * n * n - n) / (n * (n - 1))
        kyy = (kyy * m * m - m) / (m * (m - 1))
    value = kxx + kyy - 2.0 * kxy
    if not unbiased:
        value = value.clamp(min=0.0)
    return value.reshape(batch).to(x.dtype)


def wasserstein_1d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact 1-D Wasserstein-1 distance between empirical distributions ``a [..., n]`` and ``b [..., m]``:

    ``W_1 = int |F_a(t) - F_b(t)| dt`` (the formula of ``scipy.stats.wasserstein_distance``): ``[...]``.
    """
    for t, name in ((a, "a"), (b, "b")):
        if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[-1] < 1:
            raise ValueError(f"{name} must be a tensor [..., n] with n >= 1, got {getattr(t, 'shape', type(t))}")
    if a.shape[:-1] != b.shape[:-1]:
        raise ValueError(f"a [..., n] and b [..., m] must share the leading dims, got {tuple(a.shape)} and {tuple(b.shape)}")
    work = _work_dtype(a)
    a_sorted, b_sorted = a.to(work).sort(-1).values.contiguous(), b.to(work).sort(-1).values.contiguous()
    values = torch.cat([a_sorted, b_sorted], -1).sort(-1).values
    deltas = values.diff(dim=-1)
    at = values[..., :-1].contiguous()
    cdf_a = torch.searchsorted(a_sorted, at, right=True).to(work) / a.shape[-1]
    cdf_b = torch.searchsorted(b_sorted, at, right=True).to(work) / b.shape[-1]
    return ((cdf_a - cdf_b).abs() * deltas).sum(-1).to(a.dtype)


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n_projections: int = 128, seed: int = 0) -> torch.Tensor:
    """Sliced Wasserstein-1 distance ``mean_p W_1(theta_p . X, theta_p . Y)``: ``[...]``.

    ``x [..., n, D]``, ``y [..., m, D]``; ``theta_p`` are ``n_projections`` directions drawn uniformly on the
    sphere ``S^{D-1}`` from ``seed`` (the same for every batch element, so values are comparable). For ``D = 1``
    every direction is ``+-1`` and the result is the exact ``W_1``.
    """
    a, b, batch = _check_sets(x, y)
    if int(n_projections) < 1:
        raise ValueError(f"n_projections must be >= 1, got {n_projections}")
    D = a.shape[-1]
    g = torch.Generator().manual_seed(int(seed))
    theta = torch.randn(int(n_projections), D, generator=g, dtype=torch.float64)
    theta = (theta / theta.norm(dim=-1, keepdim=True)).to(device=a.device, dtype=a.dtype)
    pa = (a @ theta.T).transpose(1, 2)  # [B, P, n]
    pb = (b @ theta.T).transpose(1, 2)
    return wasserstein_1d(pa, pb).mean(-1).reshape(batch).to(x.dtype)


def conditional(metric: Callable, model_samples: torch.Tensor, truth_samples: torch.Tensor,
                reduction: str = "mean", **kwargs) -> torch.Tensor:
    """A two-sample ``metric`` per context, averaged: model samples ``[n, B, D]`` against ground truth
    ``[m, B, D]``. ``reduction="mean"`` gives a scalar tensor, ``"none"`` the ``[B]`` values."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    for t, name in ((model_samples, "model_samples"), (truth_samples, "truth_samples")):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be [n, B, D], got shape {tuple(getattr(t, 'shape', ()))}")
    if model_samples.shape[1:] != truth_samples.shape[1:]:
        raise ValueError(f"model_samples [n, B, D] and truth_samples [m, B, D] must share B and D, "
                         f"got {tuple(model_samples.shape)} and {tuple(truth_samples.shape)}")
    values = metric(model_samples.transpose(0, 1), truth_samples.transpose(0, 1).to(model_samples.device), **kwargs)
    return values.mean() if reduction == "mean" else values


# ----- likelihood -----------------------------------------------------------------------------------

def mixture_nll(mixture, y: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of observations under a batch of Gaussian mixtures. Scalar tensor.

    ``mixture``: an object with ``.nll(y)`` (e.g. :class:`physmdn.distributions.GaussianMixture`), or one with
    ``logits [B, K]``, ``means [B, K, D]``, ``log_scales [B, K, D]`` attributes, or a tuple of those three.
    ``y``: ``[B, D]`` or ``[S, B, D]`` (``S`` observations per context, e.g. from ``sample_truth``).
    ``-mean log sum_k softmax(logits)_k N(y | means_k, diag(exp(log_scales_k))^2)``.
    """
    if hasattr(mixture, "nll"):
        return mixture.nll(y).mean()
    if isinstance(mixture, (tuple, list)) and len(mixture) == 3:
        logits, means, log_scales = mixture
    elif all(hasattr(mixture, name) for name in ("logits", "means", "log_scales")):
        logits, means, log_scales = mixture.logits, mixture.means, mixture.log_scales
    else:
        raise TypeError("mixture must have .nll(y), or logits/means/log_scales attributes, or be a "
                        f"(logits, means, log_scales) tuple, got {type(mixture).__name__}")
    if not isinstance(y, torch.Tensor) or y.dim() not in (2, 3):
        raise ValueError(f"y must be [B, D] or [S, B, D], got shape {tuple(getattr(y, 'shape', ()))}")
    if y.dim() == 2:
        return _mixture_nll_op(logits, means, log_scales, y.to(means.dtype)).mean()
    S, B, D = y.shape
    K = means.shape[1]
    return _mixture_nll_op(logits.expand(S, B, K).reshape(S * B, K), means.expand(S, B, K, D).reshape(S * B, K, D),
                           log_scales.expand(S, B, K, D).reshape(S * B, K, D),
                           y.reshape(S * B, D).to(means.dtype)).mean()


# ----- branches -------------------------------------------------------------------------------------

def _check_samples(samples, context, problem, name: str = "samples") -> tuple[torch.Tensor, torch.Tensor]:
    context = problem.check_context(context)
    if not isinstance(samples, torch.Tensor) or samples.dim() != 3:
        raise ValueError(f"{name} must be [n, B, D], got shape {tuple(getattr(samples, 'shape', ()))}")
    if samples.shape[1] != context.shape[0] or samples.shape[2] != problem.output_dim:
        raise ValueError(f"{name} must be [n, B, D] = [n, {context.shape[0]}, {problem.output_dim}] for "
                         f"{context.shape[0]} contexts of problem {problem.name!r}, got shape {tuple(samples.shape)}")
    return samples, context.to(samples.device)


def branch_frequencies(samples: torch.Tensor, context: torch.Tensor, problem) -> torch.Tensor:
    """Fraction of samples ``[n, B, D]`` in each branch of ``problem`` (its :meth:`classify`): ``[B, M]``."""
    samples, context = _check_samples(samples, context, problem)
    labels = problem.classify(samples, context)  # [n, B]
    M = problem.n_branches
    return torch.nn.functional.one_hot(labels.long(), M).to(torch.float64).mean(0)


def component_branch_weights(mixture, context: torch.Tensor, problem) -> torch.Tensor:
    """Branch weights of an MDN read off its components: component ``k``'s weight ``pi_k`` goes to the branch of its
    mean ``mu_k`` (``problem.classify``): ``w_m = sum_{k: branch(mu_k) = m} pi_k``, ``[B, M]``."""
    weights = torch.softmax(mixture.logits.detach().to(torch.float64), -1)  # [B, K]
    means = mixture.means.detach().transpose(0, 1)  # [K, B, D]
    labels = problem.classify(means, problem.check_context(context).to(means.device)).T  # [B, K]
    out = torch.zeros(weights.shape[0], problem.n_branches, dtype=torch.float64, device=weights.device)
    return out.scatter_add_(1, labels.long(), weights)


def mode_weight_error(predicted: torch.Tensor, context: torch.Tensor, problem, reference: torch.Tensor | None = None,
                      reduction: str = "mean") -> torch.Tensor:
    """Total-variation error of branch weights, ``0.5 sum_m |p_m - q_m|`` per context, averaged over contexts.

    ``predicted``: model samples ``[n, B, D]`` (classified by ``problem.classify``) or branch weights ``[B, M]``
    (e.g. :func:`component_branch_weights`). ``reference``: true branch weights ``[B, M]``, ground-truth samples
    ``[m, B, D]``, or None for ``problem.true_weights(context)``. In ``[0, 1]``; 0 when the weights agree.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    context = problem.check_context(context)
    B, M = context.shape[0], problem.n_branches

    def as_weights(value, name):
        if isinstance(value, torch.Tensor) and value.dim() == 3:
            return branch_frequencies(value, context, problem)
        if isinstance(value, torch.Tensor) and tuple(value.shape) == (B, M):
            return value.to(torch.float64)
        raise ValueError(f"{name} must be samples [n, B, D] or branch weights [B, M] = [{B}, {M}], "
                         f"got {tuple(getattr(value, 'shape', ())) if isinstance(value, torch.Tensor) else type(value).__name__}")

    if reference is None:
        reference = problem.true_weights(context)
        if reference is None:
            raise ValueError(f"reference must be given (truth samples [m, B, D] or weights [B, M]): problem "
                             f"{problem.name!r} has no closed-form true_weights")
    p = as_weights(predicted, "predicted")
    q = as_weights(reference, "reference").to(p.device)
    tv = 0.5 * (p - q).abs().sum(-1)
    return tv.mean() if reduction == "mean" else tv


def physics_residual(samples: torch.Tensor, context: torch.Tensor, problem, reduction: str = "mean") -> torch.Tensor:
    """Mean absolute physical residual of samples ``[n, B, D]`` (``problem.residual``): ``[M]`` per residual
    column (``reduction="mean"``), or ``[n, B, M]`` (``"none"``)."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    samples, context = _check_samples(samples, context, problem)
    r = problem.residual(samples.to(_work_dtype(samples)), context.to(_work_dtype(samples))).abs()
    return r.mean(dim=(0, 1)) if reduction == "mean" else r


# ----- calibration ----------------------------------------------------------------------------------

class Calibration(NamedTuple):
    """Coverage of central predictive intervals.

    Fields: ``levels [L]`` nominal levels; ``coverage [L, D]`` fraction of observations inside the central
    ``level`` interval of the model, per output dimension; ``error`` mean ``|coverage - level|`` over levels and
    dimensions (float).
    """

    levels: torch.Tensor
    coverage: torch.Tensor
    error: float

    def table(self, names=None) -> str:
        """A markdown table of coverage per level and output dimension (at most 8 dimensions shown)."""
        D = self.coverage.shape[1]
        shown = list(range(min(D, 8)))
        names = list(names) if names is not None else [f"y{d}" for d in range(D)]
        head = "| level | " + " | ".join(names[d] for d in shown) + (" | ... |" if D > 8 else " |")
        rule = "|" + "---|" * (len(shown) + 1 + (D > 8))
        rows = [f"| {float(level):.2f} | " + " | ".join(f"{float(self.coverage[i, d]):.3f}" for d in shown)
                + (" | ... |" if D > 8 else " |") for i, level in enumerate(self.levels)]
        return "\n".join([head, rule, *rows])


def calibration(samples: torch.Tensor, observations: torch.Tensor,
                levels=(0.5, 0.8, 0.9, 0.95)) -> Calibration:
    """Coverage of the model's central intervals: for each context ``b``, output dimension ``d`` and level ``l``
    the interval between the ``(1 - l) / 2`` and ``(1 + l) / 2`` quantiles of ``samples[:, b, d]`` (model samples
    ``[n, B, D]``), and the fraction of ``observations [m, B, D]`` (ground truth) inside it, pooled over contexts.
    A calibrated model has ``coverage ~= level``."""
    for t, name in ((samples, "samples"), (observations, "observations")):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be [n, B, D], got shape {tuple(getattr(t, 'shape', ()))}")
    if samples.shape[1:] != observations.shape[1:]:
        raise ValueError(f"samples [n, B, D] and observations [m, B, D] must share B and D, got "
                         f"{tuple(samples.shape)} and {tuple(observations.shape)}")
    levels_t = torch.as_tensor(levels, dtype=torch.float64).flatten()
    if levels_t.numel() < 1 or not bool(((levels_t > 0) & (levels_t < 1)).all()):
        raise ValueError(f"levels must be numbers in (0, 1), got {levels}")
    work = _work_dtype(samples)
    s = samples.to(work)
    q = torch.cat([(1.0 - levels_t) / 2.0, (1.0 + levels_t) / 2.0]).to(device=s.device, dtype=work)
    bounds = torch.quantile(s, q, dim=0)  # [2L, B, D]
    L = levels_t.numel()
    lower, upper = bounds[:L].unsqueeze(1), bounds[L:].unsqueeze(1)  # [L, 1, B, D]
    obs = observations.to(device=s.device, dtype=work).unsqueeze(0)  # [1, m, B, D]
    inside = ((obs >= lower) & (obs <= upper)).to(torch.float64)
    coverage = inside.mean(dim=(1, 2)).cpu()  # [L, D]
    error = float((coverage - levels_t[:, None]).abs().mean())
    return Calibration(levels_t, coverage, error)


# ----- all of it ------------------------------------------------------------------------------------

def evaluate(problem, sample_fn: Callable[[torch.Tensor, int], torch.Tensor], contexts: torch.Tensor, *,
             n_model: int = 500, n_truth: int = 500, mixture_fn: Callable | None = None, seed: int = 0,
             truth_samples: torch.Tensor | None = None, n_projections: int = 64) -> dict:
    """Every metric for one model at held-out ``contexts [B, C]``.

    ``sample_fn(contexts, n) -> [n, B, D]`` draws model samples; ``mixture_fn(contexts)`` (optional) returns a
    mixture for :func:`mixture_nll` of the ground-truth samples. Ground truth: ``problem.sample_truth(contexts,
    n_truth, seed=seed)`` unless ``truth_samples [m, B, D]`` is given.

    Returns a flat dict of floats: ``energy``, ``mmd``, ``sliced_w1``, ``mode_weight_error`` (against
    ``true_weights`` where the problem has them, else the truth samples' branch frequencies),
    ``residual_model`` / ``residual_truth`` (mean absolute physical residual over all columns, and per named
    column for non-field problems), ``calibration_error``, ``nll`` (with ``mixture_fn``), plus
    ``calibration`` (levels and coverage lists) and ``branch_weights_model`` / ``branch_weights_truth``
    (branch weights averaged over contexts).
    """
    contexts = problem.check_context(contexts)
    if truth_samples is None:
        truth_samples = problem.sample_truth(contexts, n_truth, seed=seed)
    model_samples = sample_fn(contexts, n_model)
    _check_samples(model_samples, contexts, problem, "sample_fn(contexts, n)")
    _check_samples(truth_samples, contexts, problem, "truth_samples")
    model_samples = model_samples.detach()
    truth_samples = truth_samples.to(model_samples.device)
    out: dict = {}
    out["energy"] = float(conditional(energy_distance, model_samples, truth_samples))
    out["mmd"] = float(conditional(mmd, model_samples, truth_samples))
    out["sliced_w1"] = float(conditional(sliced_wasserstein, model_samples, truth_samples, n_projections=n_projections))
    reference = problem.true_weights(contexts)
    reference = truth_samples if reference is None else reference
    out["mode_weight_error"] = float(mode_weight_error(model_samples, contexts, problem, reference))
    out["branch_weights_model"] = branch_frequencies(model_samples, contexts, problem).mean(0).tolist()
    out["branch_weights_truth"] = (branch_frequencies(reference, contexts, problem) if reference.dim() == 3
                                   else reference.to(torch.float64)).mean(0).tolist()
    for label, samples in (("model", model_samples), ("truth", truth_samples)):
        per_column = physics_residual(samples, contexts, problem)
        out[f"residual_{label}"] = float(per_column.mean())
        if not problem.is_field:
            for name, value in zip(problem.residual_names, per_column.tolist()):
                out[f"residual_{label}_{name}"] = value
    cal = calibration(model_samples, truth_samples)
    out["calibration_error"] = cal.error
    out["calibration"] = {"levels": cal.levels.tolist(), "coverage_mean": cal.coverage.mean(1).tolist()}
    if mixture_fn is not None:
        with torch.no_grad():
            out["nll"] = float(mixture_nll(mixture_fn(contexts), truth_samples))
    return out

"""Plots of experiment results, drawn with matplotlib (optional: without it every plot is skipped with a warning
and its function returns False).

* :func:`plot_density`: conditional density of a model against the ground truth over the first context dimension;
* :func:`plot_fields`: sampled fields per branch, for problems whose output is a discretized field;
* :func:`plot_history`: training and validation losses per epoch;
* :func:`plot_compare`: metrics against training-set size, one line per model;
* :func:`plot_bifurcation`: samples of each model over the first context dimension on top of the true branches,
  one panel per model (the demo's picture);
* :func:`plot_metric_bars`: one panel per metric, a bar per model and training-set size, error bars over seeds.

Each writes one PNG to ``path`` and returns True when it did.
"""

from __future__ import annotations

import math
import warnings

import torch

from . import metrics as M

__all__ = ["METRIC_TITLES", "plot_density", "plot_fields", "plot_history", "plot_compare", "plot_bifurcation",
           "plot_metric_bars"]

# panel titles for the metric columns of experiment rows; every one of these is lower-is-better
METRIC_TITLES = {
    "energy": "energy distance to truth",
    "mmd": "MMD to truth",
    "sliced_w1": "sliced Wasserstein-1 to truth",
    "mode_weight_error": "mode-weight error",
    "residual_model": "physics residual of samples",
    "calibration_error": "calibration error",
    "nll": "negative log-likelihood",
}


def _metric_title(metric: str) -> str:
    return f"{METRIC_TITLES.get(metric, metric)}\n(lower is better)"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install matplotlib): plots are skipped", stacklevel=2)
        return None
    return plt


def plot_density(problem, model, kind: str, sample, path: str, *, grid: int = 60, n: int = 300, device=None) -> bool:
    """Conditional density over the first context dimension (others at ``reference_context``), one row per output
    dimension: ground-truth histogram | model (MDN: exact marginal density; CFM: histogram of samples), with the
    true branches (lines) and the MDN's modes (dots; those with at least 5% of the highest mode's density) marked."""
    plt = _pyplot()
    if plt is None:
        return False
    ctx = problem.context_grid(grid, 0, device=device)
    truth = problem.sample_truth(ctx, n, seed=1).cpu()  # [n, G, D]
    with torch.no_grad():
        model_samples = sample(ctx, n).cpu()
        mixture = model(ctx) if kind != "cfm" else None
        modes = mixture.modes() if mixture is not None else None
    branches = problem.branch_means(ctx)
    weights = problem.true_weights(ctx)
    if branches is not None and weights is not None:  # draw a branch only where it carries weight
        branches = branches.masked_fill((weights < 0.01).unsqueeze(-1), math.nan)
    c = ctx[:, 0].cpu()
    D = problem.output_dim
    fig, axes = plt.subplots(D, 2, figsize=(10, 3.4 * D), squeeze=False, sharex=True)
    for d in range(D):
        lo = float(torch.quantile(truth[..., d].flatten(), 0.001))
        hi = float(torch.quantile(truth[..., d].flatten(), 0.999))
        pad = 0.1 * (hi - lo + 1e-9)
        edges = torch.linspace(lo - pad, hi + pad, 81)
        centers = 0.5 * (edges[1:] + edges[:-1])

        def histogram(values):
            return torch.stack([torch.histogram(values[:, g].float(), bins=edges.float(), density=True).hist
                                for g in range(values.shape[1])], 1)  # [bins, G]

        panels = [("ground truth", histogram(truth[..., d]))]
        if mixture is not None:  # exact marginal density of output d
            # a ConstrainedMixture (components' means along y_d: component_means) or a full / low-rank covariance
            # mixture has marginal_scales, a diagonal one scales
            m_d = (mixture.component_means if hasattr(mixture, "component_means") else mixture.means)[..., d].cpu()
            s_d = getattr(mixture, "marginal_scales", None)
            s_d = (mixture.scales if s_d is None else s_d)[..., d].cpu()
            w = mixture.weights.cpu()
            z = (centers.view(-1, 1, 1) - m_d) / s_d
            dens = (w * torch.exp(-0.5 * z * z) / (s_d * math.sqrt(2 * math.pi))).sum(-1)
            panels.append((f"{kind} (density)", dens))
        else:
            panels.append((f"{kind} (samples)", histogram(model_samples[..., d])))
        for col, (title, image) in enumerate(panels):
            ax = axes[d, col]
            ax.pcolormesh(c.numpy(), centers.numpy(), image.numpy(), shading="nearest", cmap="viridis",
                          vmax=float(torch.quantile(image.flatten(), 0.99)) + 1e-12)
            if branches is not None:
                for m in range(branches.shape[1]):
                    ax.plot(c.numpy(), branches[:, m, d].cpu().numpy(), "w--", lw=0.8,
                            label="true branches" if m == 0 else None)
            if col == 1 and modes is not None:
                loc = modes.locations[..., d].cpu()
                density = modes.densities.cpu()
                # negligible bumps (far-off components with tiny weight) are modes too; mark the visible ones
                keep = modes.mask.cpu() & (density >= 0.05 * density.amax(-1, keepdim=True))
                cc = c.view(-1, 1).expand_as(loc)
                ax.plot(cc[keep].numpy(), loc[keep].numpy(), "r.", ms=3, label="MDN modes")
            ax.set_ylim(float(edges[0]), float(edges[-1]))
            ax.set_title(f"{title}: {problem.output_names[d]}")
            ax.set_ylabel(problem.output_names[d])
            if d == D - 1:
                ax.set_xlabel(problem.context_names[0])
            if d == 0:
                ax.legend(loc="upper left", fontsize=7)
    fig.suptitle(f"{problem.name}: p({', '.join(problem.output_names)} | {problem.context_names[0]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_fields(problem, sample, contexts, truth, path: str, *, per_branch: int = 6) -> bool:
    """Sampled fields per branch at the held-out context whose ground truth is most evenly split between
    branches: ground truth (top row) and model (bottom row), one column per branch."""
    plt = _pyplot()
    if plt is None:
        return False
    freq = M.branch_frequencies(truth, contexts, problem)  # [B, M]
    entropy = -(freq * torch.log(freq.clamp(min=1e-12))).sum(-1)
    b = int(entropy.argmax())
    ctx = contexts[b:b + 1]
    with torch.no_grad():
        model_fields = sample(ctx, truth.shape[0])[:, 0].cpu()
    truth_fields = truth[:, b].cpu()
    grid = torch.arange(problem.output_dim)
    M_ = problem.n_branches
    fig, axes = plt.subplots(2, M_, figsize=(3.6 * M_, 6), squeeze=False, sharey=True)
    for row, (title, fields) in enumerate((("ground truth", truth_fields), ("model", model_fields))):
        labels = problem.classify(fields.unsqueeze(1), ctx.cpu()).flatten()
        for m in range(M_):
            ax = axes[row, m]
            chosen = fields[labels == m][:per_branch]
            for f in chosen:
                ax.plot(grid.numpy(), f.numpy(), lw=1)
            share = float((labels == m).double().mean())
            ax.set_title(f"{title}: {problem.branch_names[m]} ({share:.0%})", fontsize=9)
            ax.set_xlabel("grid point")
    values = ", ".join(f"{name}={float(v):.3g}" for name, v in zip(problem.context_names, ctx[0].cpu()))
    fig.suptitle(f"{problem.name} at {values}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_history(history: list[dict], path: str) -> bool:
    """``train_data``, ``val_data`` and ``train_physics`` of each history row (``FitResult.history``) against
    the epoch."""
    plt = _pyplot()
    if plt is None or not history:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [row["epoch"] for row in history]
    for key in ("train_data", "val_data", "train_physics"):
        values = [row.get(key) for row in history]
        if any(v is not None and math.isfinite(v) for v in values):
            ax.plot(epochs, [math.nan if v is None else v for v in values], label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_compare(rows: list[dict], path: str, metrics=("energy", "mode_weight_error", "residual_model", "nll")) -> bool:
    """Metric against training-set size, one line per model (mean over seeds, error bars: min to max)."""
    plt = _pyplot()
    if plt is None or not rows:
        return False
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    models = list(dict.fromkeys(r["model"] for r in rows))
    sizes = sorted({r["n_train"] for r in rows})
    for ax, metric in zip(axes[0], metrics):
        for model in models:
            xs, mean, low, high = [], [], [], []
            for n in sizes:
                values = [r[metric] for r in rows if r["model"] == model and r["n_train"] == n
                          and r.get(metric) is not None and math.isfinite(r[metric])]
                if values:
                    xs.append(n)
                    mean.append(sum(values) / len(values))
                    low.append(mean[-1] - min(values))
                    high.append(max(values) - mean[-1])
            if xs:
                ax.errorbar(xs, mean, yerr=[low, high], marker="o", capsize=3, label=model)
        ax.set_xscale("log")
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("training samples")
        ax.set_title(_metric_title(metric), fontsize=10)
    axes[0, 0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _branch_lines(ax, x, branches, weights, color="k"):
    """True branches ``branches [G, M]`` against ``x [G]`` as lines whose width grows with the branch weight
    ``weights [G, M]`` (width ``0.4 + 3 w``); a branch is drawn only where its weight is at least 1%."""
    from matplotlib.collections import LineCollection

    for m in range(branches.shape[1]):
        points = torch.stack([x, branches[:, m]], -1)  # [G, 2]
        segments = torch.stack([points[:-1], points[1:]], 1)  # [G - 1, 2, 2]
        w = 0.5 * (weights[:-1, m] + weights[1:, m])
        keep = torch.isfinite(segments).all(-1).all(-1) & (w >= 0.01)
        if keep.any():
            ax.add_collection(LineCollection(segments[keep].numpy(), linewidths=(0.4 + 3.0 * w[keep]).numpy(),
                                             colors=color, zorder=3))


def plot_bifurcation(problem, samplers: dict, path: str, *, grid: int = 81, n: int = 60, titles: dict | None = None,
                     seed: int = 1, device=None) -> bool:
    """Bifurcation diagram: the first context dimension on x (others at ``reference_context``), the first output
    on y. Panels: ground truth, then one per entry of ``samplers`` (``name -> sample(context [G, C], n) -> [n, G,
    D]``), each with ``n`` samples at ``grid`` contexts as a faint scatter over the true branches
    (``problem.branch_means``), whose line width grows with the true branch weight (``problem.true_weights``;
    the weight is also printed at the right end of each branch). All panels share both axes; ``titles`` adds a
    line to a panel's title (e.g. a metric). The contexts live on ``device`` (the samplers' device)."""
    plt = _pyplot()
    if plt is None:
        return False
    ctx = problem.context_grid(grid, 0, device=device)
    x = ctx[:, 0].cpu().double()
    clouds = {"truth": problem.sample_truth(ctx, n, seed=seed)[..., 0].cpu().double()}  # [n, G]
    for name, sample in samplers.items():
        with torch.no_grad():
            clouds[name] = sample(ctx, n)[..., 0].cpu().double()
    branches, weights = problem.branch_means(ctx), problem.true_weights(ctx)
    if branches is not None and weights is not None:
        branches, weights = branches[..., 0].cpu().double(), weights.cpu().double()  # [G, M] each
    truth = clouds["truth"]
    lo, hi = float(torch.quantile(truth, 0.001)), float(torch.quantile(truth, 0.999))
    pad = 0.25 * (hi - lo + 1e-9)
    fig, axes = plt.subplots(1, len(clouds), figsize=(3.4 * len(clouds), 3.6), squeeze=False, sharex=True,
                             sharey=True)
    for ax, (name, ys) in zip(axes[0], clouds.items()):
        xs = x.view(1, -1).expand_as(ys)
        ax.scatter(xs.flatten().numpy(), ys.flatten().numpy(), s=3, alpha=0.15, color="tab:blue", linewidths=0,
                   rasterized=True, zorder=2)
        if branches is not None and weights is not None:
            _branch_lines(ax, x, branches, weights)
        title = name if titles is None or name not in titles else f"{name}\n{titles[name]}"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(problem.context_names[0])
        ax.set_xlim(float(x[0]), float(x[-1]))
        ax.set_ylim(lo - pad, hi + pad)
    axes[0, 0].set_ylabel(problem.output_names[0])
    if branches is not None and weights is not None:  # the weights at both ends of each branch, in the truth panel
        for m in range(branches.shape[1]):
            for end, align in ((0, "left"), (-1, "right")):
                y_end, w_end = float(branches[end, m]), float(weights[end, m])
                if math.isfinite(y_end) and w_end >= 0.01:
                    axes[0, 0].annotate(f"w = {w_end:.2f}", (float(x[end]), y_end), ha=align, fontsize=8,
                                        xytext=(4 if end == 0 else -4, 7 if y_end >= 0 else -13),
                                        textcoords="offset points")
    fig.suptitle(f"{problem.name}: samples of p({problem.output_names[0]} | {problem.context_names[0]}) at "
                 f"{grid} contexts; black: true branches, width ~ weight", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_metric_bars(rows: list[dict], path: str, metrics=("energy", "mode_weight_error", "residual_model"),
                     labels: dict | None = None) -> bool:
    """One panel per metric: a bar per model within a group per training-set size, height the mean over seeds,
    error bar the standard error ``std / sqrt(seeds)`` (sample std; none for one seed), dots the single seeds.
    ``residual_model`` panels also draw the ground truth's own residual (``residual_truth``, dashed), the level
    noise alone gives. ``labels`` renames models in the legend."""
    plt = _pyplot()
    if plt is None or not rows:
        return False
    labels = labels or {}
    models = list(dict.fromkeys(r["model"] for r in rows))
    sizes = sorted({r["n_train"] for r in rows})
    seeds = len({r["seed"] for r in rows})
    width = 0.8 / len(models)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, model in enumerate(models):
            for j, n in enumerate(sizes):
                values = [r[metric] for r in rows if r["model"] == model and r["n_train"] == n
                          and r.get(metric) is not None and math.isfinite(r[metric])]
                if not values:
                    continue
                mean = sum(values) / len(values)
                sem = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
                       if len(values) > 1 else 0.0)
                x = j + (i - (len(models) - 1) / 2) * width
                ax.bar(x, mean, width * 0.9, yerr=sem, capsize=3, color=f"C{i}",
                       label=labels.get(model, model) if j == 0 else None)
                ax.plot([x] * len(values), values, "k.", ms=3)
        if metric == "residual_model":
            truth = [r["residual_truth"] for r in rows if r.get("residual_truth") is not None]
            if truth:
                ax.axhline(sum(truth) / len(truth), color="k", ls="--", lw=1, label="ground truth (noise only)")
                ax.legend(handles=ax.get_lines()[-1:], fontsize=8)
        ax.set_xticks(range(len(sizes)))
        ax.set_xticklabels([f"n = {n}" for n in sizes])
        ax.set_xlabel("training samples")
        ax.set_title(_metric_title(metric), fontsize=10)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"mean over {seeds} seed{'s' if seeds != 1 else ''}; error bars: standard error; dots: single seeds",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True

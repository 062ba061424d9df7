"""The ``physmdn`` command line: train, evaluate and compare models on the benchmark problems.

::

    physmdn run <problem> --model mdn|mdn-physics|cfm [--n-train N] [--epochs E] [--device D] [--out DIR] [--seed S]
    physmdn compare <problem> [--n-train 64,256,2048] [--seeds 3] [--models mdn,mdn-physics,cfm] [--out DIR]
    physmdn demo [--out DIR]
    physmdn problems

Common options: ``--components K --hidden 64,64 --batch-size --lr --physics-weight --cfm-steps --threads --quiet``.

``run`` trains one model on ``problem.sample(n_train)`` (validation: a quarter as many, another seed), evaluates it
at held-out contexts against ``problem.sample_truth`` (:func:`physmdn.metrics.evaluate`) and writes
``metrics.json``, ``history.csv`` and PNG plots (``density.png``: conditional density against the ground truth
over the context range with the true branches and the MDN's modes marked, or ``fields.png``: sampled fields per
branch; ``history.png``). ``compare`` runs every model for every training-set size and seed and writes
``results.csv`` (one row per run), ``summary.md`` / ``summary.csv`` (mean and spread over seeds) and
``compare.png``. ``demo`` is a pitchfork comparison sized for a laptop (under two minutes on two CPU cores).

Models: ``mdn`` (NLL only), ``mdn-physics`` (NLL plus the problem's physics specs, weight warmed up linearly over
the first quarter of the epochs; regime labels supervise the components where the physics is component-specific),
``cfm`` (conditional flow matching). Layering: the top layer; imports everything below it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from typing import Sequence

import torch

from . import metrics as M
from . import problems as P

__all__ = ["main", "MODELS", "run_experiment", "compare"]

MODELS = ("mdn", "mdn-physics", "cfm")
SUMMARY_METRICS = ("nll", "energy", "mmd", "sliced_w1", "mode_weight_error", "residual_model", "calibration_error",
                   "train_s", "sample_10k_s")


class CLIError(Exception):
    """A usage error the command line reports as ``physmdn: error: ...`` with exit status 2."""


# ----- argument types -------------------------------------------------------------------------------

def _problem_name(text: str) -> str:
    key = text.strip().lower().replace("-", "_")
    if key not in P.names():
        raise argparse.ArgumentTypeError(f"unknown problem {text!r}; valid names: {', '.join(P.names())}")
    return key


def _number_type(cast, accept, expected: str):
    """An argparse type: ``cast(text)`` that must satisfy ``accept``, else an error naming what was expected."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _number_type(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _number_type(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number_type(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
_nonneg_float = _number_type(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")


def _int_list(text: str) -> list[int]:
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive integers, got {text!r}")
    return [_positive_int(p.strip()) for p in parts]


def _hidden(text: str) -> tuple[int, ...]:
    return tuple(_int_list(text))


def _model_list(text: str) -> list[str]:
    models = [m.strip().lower() for m in text.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if not models or bad:
        raise argparse.ArgumentTypeError(f"models must be a comma-separated subset of {', '.join(MODELS)}, got {text!r}")
    return models


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu or cuda:0, got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} requested but CUDA is not available")
    return device


# ----- one experiment -------------------------------------------------------------------------------

def _build_model(problem, kind: str, components: int | None, hidden: tuple[int, ...] | None):
    from .models import CFM, MDN

    if kind == "cfm":
        return CFM(problem.context_dim, problem.output_dim, hidden=hidden or (128, 128, 128))
    return MDN(problem.context_dim, problem.output_dim, components or problem.defaults.components,
               hidden=hidden or problem.defaults.hidden)


def _sampler(model, kind: str, cfm_steps: int):
    """``sample(context [B, C], n) -> [n, B, D]`` for either model family, without gradients."""
    model.eval()

    @torch.no_grad()
    def sample(context, n):
        if kind == "cfm":
            return model.sample(context, n, steps=cfm_steps)
        return model(context).sample(n)

    return sample


def _time_sampling(sample, problem, device, total: int = 10_000, contexts: int = 100) -> float:
    ctx = problem.sample_contexts(contexts, seed=12345, device=device)
    sample(ctx[:2], 2)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    sample(ctx, total // contexts)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run_experiment(problem, kind: str, *, n_train: int, epochs: int, seed: int = 0, device=None,
                   components: int | None = None, hidden: tuple[int, ...] | None = None, batch_size: int | None = None,
                   lr: float | None = None, physics_weight: float | None = None, n_test_contexts: int = 32,
                   n_samples: int = 400, cfm_steps: int = 32, progress: bool = False, history_path: str | None = None,
                   truth: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Train model ``kind`` on ``problem`` and evaluate it. Returns ``{"metrics", "timing", "config", "model",
    "history", "contexts", "truth"}`` (the last two: held-out contexts ``[B, C]`` and truth samples ``[m, B, D]``,
    reusable across models through ``truth=(contexts, samples)``)."""
    from .training import LinearWarmup, fit

    if kind not in MODELS:
        raise CLIError(f"model must be one of {', '.join(MODELS)}, got {kind!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    d = problem.defaults
    batch_size = batch_size or d.batch_size
    lr = lr or d.lr
    physics_weight = d.physics_weight if physics_weight is None else physics_weight
    torch.manual_seed(seed)
    train = problem.sample(n_train, seed=10_000 + seed, device=device)
    val = problem.sample(max(n_train // 4, 16), seed=20_000 + seed, device=device)
    if truth is None:
        contexts = problem.sample_contexts(n_test_contexts, seed=30_000, device=device)
        truth_samples = problem.sample_truth(contexts, n_samples, seed=40_000)
    else:
        contexts, truth_samples = truth
    model = _build_model(problem, kind, components, hidden)
    use_physics = kind == "mdn-physics"
    train_data = (train.x, train.y, train.labels) if use_physics and problem.component_specific else (train.x, train.y)
    # keep the last batch: with tiny data sets drop_last would leave nothing to train on
    start = time.perf_counter()
    result = fit(model, train_data, (val.x, val.y), epochs=epochs, batch_size=min(batch_size, n_train), lr=lr,
                 seed=seed, device=device, progress=progress, history_path=history_path,
                 physics=problem.physics if use_physics else None,
                 physics_weight=LinearWarmup(physics_weight, max(1, epochs // 4)) if use_physics else 0.0)
    train_s = time.perf_counter() - start
    model = result.model
    sample = _sampler(model, kind, cfm_steps)
    mixture_fn = None if kind == "cfm" else (lambda c: model(c))
    with torch.no_grad():
        metrics = M.evaluate(problem, sample, contexts, n_model=truth_samples.shape[0], truth_samples=truth_samples,
                             mixture_fn=mixture_fn, seed=seed)
    metrics.setdefault("nll", math.nan)
    timing = {"train_s": train_s, "sample_10k_s": _time_sampling(sample, problem, device),
              "epochs_completed": result.epochs_completed}
    config = {"problem": problem.name, "problem_config": problem.config, "model": kind, "n_train": n_train,
              "epochs": epochs, "seed": seed, "device": str(device), "components": getattr(model, "components", None),
              "hidden": list(model.config["hidden"]), "batch_size": batch_size, "lr": lr,
              "physics_weight": physics_weight if use_physics else 0.0, "n_test_contexts": contexts.shape[0],
              "n_samples": truth_samples.shape[0], "regime_labels": bool(use_physics and problem.component_specific)}
    return {"metrics": metrics, "timing": timing, "config": config, "model": model, "history": result.history,
            "contexts": contexts, "truth": truth_samples, "sampler": sample}


def _environment() -> dict:
    import physmdn

    env = {"physmdn": physmdn.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name()
    return env


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write_json(path: str, payload: dict) -> None:
    with open(path, "w") as fh:
        json.dump(_json_safe(payload), fh, indent=2)


# ----- plots ----------------------------------------------------------------------------------------

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
            m_d = mixture.means[..., d].cpu()  # [G, K]
            s_d = mixture.scales[..., d].cpu()
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
        ax.set_title(metric)
    axes[0, 0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----- commands -------------------------------------------------------------------------------------

def _out_dir(path: str) -> str:
    """Create ``path`` if needed and prove it writable by creating and removing a file, before any work starts
    (permission bits alone miss read-only mounts, ACLs and root)."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".physmdn-write-probe-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise CLIError(f"--out must be a writable directory, got {path!r} "
                       f"({exc.strerror or type(exc).__name__})") from None
    return path


def cmd_run(args) -> int:
    problem = P.get(args.problem)
    out = _out_dir(args.out or os.path.join("runs", f"{problem.name}-{args.model}-n{args.n_train}-s{args.seed}"))
    epochs = args.epochs or problem.defaults.epochs
    n_train = args.n_train or problem.defaults.n_train
    if not args.quiet:
        print(f"physmdn run: {problem.name}, model {args.model}, {n_train} samples, {epochs} epochs on {args.device}")
    result = run_experiment(problem, args.model, n_train=n_train, epochs=epochs, seed=args.seed, device=args.device,
                            components=args.components, hidden=args.hidden, batch_size=args.batch_size, lr=args.lr,
                            physics_weight=args.physics_weight, n_test_contexts=args.n_test_contexts,
                            n_samples=args.n_samples, cfm_steps=args.cfm_steps, progress=not args.quiet,
                            history_path=os.path.join(out, "history.csv"))
    payload = {"metrics": result["metrics"], "timing": result["timing"], "config": result["config"],
               "environment": _environment()}
    _write_json(os.path.join(out, "metrics.json"), payload)
    plots = []
    if not args.no_plots:
        if problem.is_field:
            if plot_fields(problem, result["sampler"], result["contexts"], result["truth"], os.path.join(out, "fields.png")):
                plots.append("fields.png")
        elif plot_density(problem, result["model"], args.model, result["sampler"], os.path.join(out, "density.png"),
                          device=args.device):
            plots.append("density.png")
        if plot_history(result["history"], os.path.join(out, "history.png")):
            plots.append("history.png")
    if not args.quiet:
        m, t = result["metrics"], result["timing"]
        print(_format_metrics(m, t))
        print(f"wrote {', '.join(['metrics.json', 'history.csv', *plots])} to {out}")
    return 0


def _format_metrics(m: dict, t: dict) -> str:
    keys = [k for k in SUMMARY_METRICS if k in m] + [k for k in ("train_s", "sample_10k_s") if k in t]
    values = {**m, **t}
    return "\n".join(f"  {k:18s} {_fmt(values[k])}" for k in dict.fromkeys(keys))


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def compare(problem, *, models: Sequence[str], sizes: Sequence[int], seeds: int, epochs: int, out: str,
            device=None, progress: bool = True, n_test_contexts: int = 32, n_samples: int = 400, **kwargs) -> list[dict]:
    """Every model x training size x seed on ``problem``; writes ``results.csv``, ``summary.md``, ``summary.csv``
    and ``compare.png`` to ``out``. The held-out contexts and ground truth are shared by all runs."""
    contexts = problem.sample_contexts(n_test_contexts, seed=30_000, device=device)
    truth = (contexts, problem.sample_truth(contexts, n_samples, seed=40_000))
    runs = [(n, seed, model) for n in sizes for seed in range(seeds) for model in models]
    _warm_up(problem, models, device)
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(runs), desc=f"compare {problem.name}", unit="run")
    for n, seed, model in runs:
        if bar is not None:
            bar.set_postfix_str(f"{model} n={n} seed={seed}")
        result = run_experiment(problem, model, n_train=n, epochs=epochs, seed=seed, device=device, truth=truth,
                                **kwargs)
        row = {"problem": problem.name, "model": model, "n_train": n, "seed": seed}
        row.update({k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))})
        row.update({k: v for k, v in result["timing"].items()})
        rows.append(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    _write_rows(os.path.join(out, "results.csv"), rows)
    summary = summarize(rows)
    _write_rows(os.path.join(out, "summary.csv"), summary)
    with open(os.path.join(out, "summary.md"), "w") as fh:
        fh.write(markdown_table(summary, problem.name, epochs, seeds))
    plot_compare(rows, os.path.join(out, "compare.png"))
    _write_json(os.path.join(out, "environment.json"), _environment())
    return rows


def _warm_up(problem, models, device) -> None:
    """One tiny fit per model family, so one-time costs (lazy initialization, allocator growth) do not land in the
    first run's train_s."""
    from .training import fit

    data = problem.sample(16, seed=0, device=device)
    for kind in dict.fromkeys("cfm" if m == "cfm" else "mdn" for m in models):
        model = _build_model(problem, kind, None, (8,))
        fit(model, (data.x, data.y), epochs=1, batch_size=16, device=device, progress=False)


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds of :data:`SUMMARY_METRICS`, per (model, n_train)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["n_train"]), []).append(row)
    summary = []
    for (model, n), group in sorted(groups.items(), key=lambda kv: (kv[0][1], MODELS.index(kv[0][0]))):
        entry = {"model": model, "n_train": n, "seeds": len(group)}
        for key in SUMMARY_METRICS:
            values = [r[key] for r in group if r.get(key) is not None and math.isfinite(r[key])]
            if values:
                mean = sum(values) / len(values)
                std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
                entry[key], entry[f"{key}_std"] = mean, std
            else:
                entry[key], entry[f"{key}_std"] = math.nan, math.nan
        summary.append(entry)
    return summary


def markdown_table(summary: list[dict], problem: str, epochs: int, seeds: int) -> str:
    head = ["model", "n_train", *SUMMARY_METRICS]
    lines = [f"# {problem}: {epochs} epochs, {seeds} seed(s); mean ± std over seeds", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in summary:
        cells = [entry["model"], str(entry["n_train"])]
        for key in SUMMARY_METRICS:
            mean, std = entry[key], entry[f"{key}_std"]
            cells.append("n/a" if not math.isfinite(mean) else
                         (f"{mean:.4g}" if entry["seeds"] < 2 else f"{mean:.4g} ± {std:.2g}"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "nll: mean negative log-likelihood of held-out ground truth (MDN only); energy, mmd, sliced_w1: "
              "distances between model and ground-truth samples per held-out context; mode_weight_error: total "
              "variation between branch weights; residual_model: mean |physics residual| of model samples; "
              "calibration_error: mean |coverage - level| of central intervals; train_s: training wall time; "
              "sample_10k_s: time to draw 10,000 samples.", ""]
    return "\n".join(lines)


def _write_rows(path: str, rows: list[dict]) -> None:
    from .training import write_rows_csv

    write_rows_csv(path, rows)


def _print_summary(out: str) -> None:
    with open(os.path.join(out, "summary.md")) as fh:
        print(fh.read())
    print(f"wrote results.csv, summary.md, summary.csv, compare.png to {out}")


def _common_kwargs(args) -> dict:
    return dict(components=args.components, hidden=args.hidden, batch_size=args.batch_size, lr=args.lr,
                physics_weight=args.physics_weight, cfm_steps=args.cfm_steps)


def cmd_compare(args) -> int:
    problem = P.get(args.problem)
    out = _out_dir(args.out or os.path.join("runs", f"compare-{problem.name}"))
    epochs = args.epochs or problem.defaults.epochs
    compare(problem, models=args.models, sizes=args.n_train, seeds=args.seeds, epochs=epochs, out=out,
            device=args.device, progress=not args.quiet, n_test_contexts=args.n_test_contexts,
            n_samples=args.n_samples, **_common_kwargs(args))
    if not args.quiet:
        _print_summary(out)
    return 0


def cmd_demo(args) -> int:
    problem = P.get("pitchfork")
    out = _out_dir(args.out or os.path.join("runs", "demo"))
    if not args.quiet:
        print("physmdn demo: pitchfork dy/dt = r y - y^3, long-time state +-sqrt(r) (r > 0) or 0 (r < 0); "
              "MDN, physics-informed MDN and flow matching at two training-set sizes")
    compare(problem, models=MODELS, sizes=args.n_train, seeds=args.seeds, epochs=args.epochs, out=out,
            device=args.device, progress=not args.quiet, n_test_contexts=24, n_samples=300,
            **_common_kwargs(args))
    if not args.quiet:
        _print_summary(out)
    return 0


def cmd_problems(args) -> int:
    for name in P.names():
        problem = P.get(name)
        outputs = f"{problem.output_dim} output{'s' if problem.output_dim != 1 else ''}"
        print(f"{name:20s} context ({', '.join(problem.context_names)}) -> {outputs}; "
              f"branches: {', '.join(problem.branch_names)}")
    return 0


# ----- parser ---------------------------------------------------------------------------------------

def _add_training_options(p: argparse.ArgumentParser, *, epochs_default=None) -> None:
    p.add_argument("--epochs", type=_positive_int, default=epochs_default,
                   help="training epochs (default: the problem's)")
    p.add_argument("--device", type=_device, default=torch.device("cpu"), help="torch device (default: cpu)")
    p.add_argument("--out", default=None, help="output directory (default: runs/...)")
    p.add_argument("--components", type=_positive_int, default=None, help="MDN components (default: the problem's)")
    p.add_argument("--hidden", type=_hidden, default=None, help="hidden widths, e.g. 64,64 (default: per model)")
    p.add_argument("--batch-size", type=_positive_int, default=None)
    p.add_argument("--lr", type=_positive_float, default=None)
    p.add_argument("--physics-weight", type=_nonneg_float, default=None,
                   help="final physics weight of mdn-physics (default: the problem's)")
    p.add_argument("--cfm-steps", type=_positive_int, default=32, help="ODE steps when sampling the CFM")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch intra-op CPU threads (default: torch's; 1 is often fastest for these small models)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summaries")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="physmdn", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="{run,compare,demo,problems}")
    sub.required = True

    run = sub.add_parser("run", help="train and evaluate one model on a problem")
    run.add_argument("problem", type=_problem_name, help=f"one of {', '.join(P.names())}")
    run.add_argument("--model", type=str.lower, choices=MODELS, required=True)
    run.add_argument("--n-train", type=_positive_int, default=None, help="training samples (default: the problem's)")
    run.add_argument("--seed", type=_nonneg_int, default=0)
    run.add_argument("--n-test-contexts", type=_positive_int, default=32, help="held-out contexts for the metrics")
    run.add_argument("--n-samples", type=_positive_int, default=400, help="samples per held-out context")
    run.add_argument("--no-plots", action="store_true")
    _add_training_options(run)
    run.set_defaults(func=cmd_run)

    cmp_ = sub.add_parser("compare", help="all models x training sizes x seeds on a problem")
    cmp_.add_argument("problem", type=_problem_name, help=f"one of {', '.join(P.names())}")
    cmp_.add_argument("--n-train", type=_int_list, default=[64, 256, 2048], help="comma-separated sizes")
    cmp_.add_argument("--seeds", type=_positive_int, default=3, help="seeds per configuration")
    cmp_.add_argument("--models", type=_model_list, default=list(MODELS), help="comma-separated subset of models")
    cmp_.add_argument("--n-test-contexts", type=_positive_int, default=32)
    cmp_.add_argument("--n-samples", type=_positive_int, default=400)
    _add_training_options(cmp_)
    cmp_.set_defaults(func=cmd_compare)

    demo = sub.add_parser("demo", help="pitchfork comparison of all models (under 2 minutes on 2 CPU cores)")
    demo.add_argument("--n-train", type=_int_list, default=[256, 2048])
    demo.add_argument("--seeds", type=_positive_int, default=1)
    _add_training_options(demo, epochs_default=60)
    demo.set_defaults(func=cmd_demo)

    lst = sub.add_parser("problems", help="list the benchmark problems")
    lst.set_defaults(func=cmd_problems)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``physmdn`` (and ``python -m physmdn``). Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    threads = getattr(args, "threads", None)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return args.func(args)
    except CLIError as exc:
        parser.error(str(exc))
    finally:
        torch.set_num_threads(previous)
    return 2  # pragma: no cover - parser.error exits


if __name__ == "__main__":
    sys.exit(main())

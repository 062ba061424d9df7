"""Experiments on the benchmark problems: train a model, evaluate it against the ground truth, compare models over
training-set sizes and seeds, and write the results.

* :func:`run_experiment`: one model (``mdn``, ``mdn-physics`` or ``cfm``) on one problem; :func:`write_run`
  writes its ``metrics.json`` and plots;
* :func:`compare`: every model x training size x seed, with ``results.csv``, ``summary.md`` / ``summary.csv``
  (:func:`summarize`, :func:`markdown_table`) and ``compare.png``;
* :func:`demo`: the pitchfork comparison sized for a laptop (under two minutes on two CPU cores), with the
  bifurcation diagram of every model (``bifurcation.png``) and metric bars over seeds (``metrics.png``).

Models: ``mdn`` (NLL only), ``mdn-physics`` (NLL plus the problem's physics specs, weight warmed up linearly over
the first quarter of the epochs; regime labels supervise the components where the physics is component-specific),
``cfm`` (conditional flow matching). The command line (:mod:`physmdn.cli`) is a thin layer over this module.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from typing import Sequence

import torch

from . import __version__
from . import metrics as M
from . import problems as P
from .constraints import ConstrainedMDN
from .models import CFM, MDN
from .plotting import plot_bifurcation, plot_compare, plot_density, plot_fields, plot_history, plot_metric_bars
from .training import LinearWarmup, fit, write_rows_csv

__all__ = ["MODELS", "MODEL_LABELS", "models_for", "SUMMARY_METRICS", "run_experiment", "write_run", "compare", "demo", "summarize",
           "markdown_table"]

MODELS = ("mdn", "mdn-physics", "mdn-law", "cfm")
MODEL_LABELS = {"mdn": "MDN", "mdn-physics": "MDN+physics", "mdn-law": "MDN+hard law", "cfm": "CFM (flow matching)"}


def models_for(problem) -> list[str]:
    """The models that apply to ``problem``: ``mdn-law`` (a ``ConstrainedMDN``) only where the problem has a law that
    holds exactly and is linear in the outcome (``problem.hard_law()``)."""
    return [m for m in MODELS if m != "mdn-law" or hasattr(problem, "hard_law")]
SUMMARY_METRICS = ("nll", "energy", "mmd", "sliced_w1", "mode_weight_error", "residual_model", "calibration_error",
                   "train_s", "sample_10k_s")


# ----- one experiment -------------------------------------------------------------------------------

def _build_model(problem, kind: str, components: int | None, hidden: tuple[int, ...] | None):
    """A fresh model for ``kind``: an MDN of the problem's default size, or a CFM with three hidden layers of
    128; ``components`` and ``hidden`` override the defaults."""
    if kind == "cfm":
        return CFM(problem.context_dim, problem.output_dim, hidden=hidden or (128, 128, 128))
    if kind == "mdn-law":
        law = problem.hard_law()
        rows = law.rows(problem.sample_contexts(1, seed=0))
        return ConstrainedMDN(problem.context_dim, problem.output_dim, law, components or problem.defaults.components,
                              rows=rows, hidden=hidden or problem.defaults.hidden)
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
    """Seconds to draw ``total`` samples spread over ``contexts`` held-out contexts, after one warm-up call."""
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
    if kind not in models_for(problem):
        raise ValueError(f"kind must be one of {', '.join(models_for(problem))} for {problem.name}, got {kind!r}")
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
    env = {"physmdn": __version__, "torch": torch.__version__, "python": platform.python_version(),
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

def write_run(out: str, problem, kind: str, result: dict, *, plots: bool = True, device=None) -> list[str]:
    """Write one :func:`run_experiment` result to the folder ``out``: ``metrics.json`` (metrics, timing, config,
    environment) and, with ``plots``, ``fields.png`` (field problems) or ``density.png``, and ``history.png``.
    Returns the names of the plots written (none without matplotlib)."""
    payload = {"metrics": result["metrics"], "timing": result["timing"], "config": result["config"],
               "environment": _environment()}
    _write_json(os.path.join(out, "metrics.json"), payload)
    written = []
    if plots:
        if problem.is_field:
            if plot_fields(problem, result["sampler"], result["contexts"], result["truth"],
                           os.path.join(out, "fields.png")):
                written.append("fields.png")
        elif plot_density(problem, result["model"], kind, result["sampler"], os.path.join(out, "density.png"),
                          device=device):
            written.append("density.png")
        if plot_history(result["history"], os.path.join(out, "history.png")):
            written.append("history.png")
    return written


# ----- comparisons ----------------------------------------------------------------------------------

def compare(problem, *, models: Sequence[str] | None = None, sizes: Sequence[int], seeds: int, epochs: int, out: str,
            device=None, progress: bool = True, n_test_contexts: int = 32, n_samples: int = 400, on_result=None,
            **kwargs) -> list[dict]:
    """Every model x training size x seed on ``problem``; writes ``results.csv``, ``summary.md``, ``summary.csv``
    and ``compare.png`` to ``out``. The held-out contexts and ground truth are shared by all runs.
    ``on_result(row, result)``, if given, sees each run's row and :func:`run_experiment` result (its trained model
    and sampler) before the result is dropped."""
    models = list(models) if models is not None else models_for(problem)
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
        if on_result is not None:
            on_result(row, result)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    write_rows_csv(os.path.join(out, "results.csv"), rows)
    summary = summarize(rows)
    write_rows_csv(os.path.join(out, "summary.csv"), summary)
    with open(os.path.join(out, "summary.md"), "w") as fh:
        fh.write(markdown_table(summary, problem.name, epochs, seeds))
    plot_compare(rows, os.path.join(out, "compare.png"))
    _write_json(os.path.join(out, "environment.json"), _environment())
    return rows


def _warm_up(problem, models, device) -> None:
    """One tiny fit per model family, so one-time costs (lazy initialization, allocator growth) do not land in the
    first run's train_s."""
    data = problem.sample(16, seed=0, device=device)
    for kind in dict.fromkeys(m if m in ("cfm", "mdn-law") else "mdn" for m in models):
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
    """``summary.md``: one row per (model, n_train) of :func:`summarize`, ``mean ± std`` over seeds, and a legend
    of the metrics."""
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


def demo(*, sizes: Sequence[int], seeds: int, epochs: int, out: str, device=None, progress: bool = True,
         n_test_contexts: int = 24, n_samples: int = 300, **kwargs) -> list[dict]:
    """The demo: :func:`compare` of every model on the pitchfork ``dy/dt = r y - y^3`` (long-time state
    ``+-sqrt(r)`` for ``r > 0``, 0 for ``r < 0``), evaluated at ``n_test_contexts`` held-out contexts with
    ``n_samples`` samples each. Besides :func:`compare`'s files it writes ``bifurcation.png`` (samples of the
    seed-0 model trained on the largest size, per model, over the true branches; :func:`plot_bifurcation`) and
    ``metrics.png`` (energy distance, mode-weight error and physics residual per model and size, mean and standard
    error over seeds; :func:`plot_metric_bars`)."""
    problem = P.get("pitchfork")
    largest = max(sizes)
    shown: dict[str, tuple] = {}  # label -> (sampler, energy) of the runs the diagram shows

    def keep(row, result):
        if row["n_train"] == largest and row["seed"] == 0:
            shown[MODEL_LABELS[row["model"]]] = (result["sampler"], row["energy"])

    rows = compare(problem, models=models_for(problem), sizes=sizes, seeds=seeds, epochs=epochs, out=out, device=device,
                   progress=progress, n_test_contexts=n_test_contexts, n_samples=n_samples, on_result=keep, **kwargs)
    titles = {label: f"n = {largest}, seed 0: energy {energy:.3g}" for label, (_, energy) in shown.items()}
    plot_bifurcation(problem, {label: sampler for label, (sampler, _) in shown.items()},
                     os.path.join(out, "bifurcation.png"), titles=titles, device=device)
    plot_metric_bars(rows, os.path.join(out, "metrics.png"), labels=MODEL_LABELS)
    return rows

"""Experiments on the benchmark problems: train a model, evaluate it against the ground truth, compare models over
training-set sizes and seeds, and write the results.

* :func:`run_experiment`: one model (``mdn``, ``mdn-physics`` or ``cfm``) on one problem; :func:`write_run`
  writes its ``metrics.json`` and plots;
* :func:`compare`: every model x training size x paired seed, with ``results.csv``, ``summary.md`` /
  ``summary.csv`` (:func:`summarize`, :func:`markdown_table`), ``paired.csv`` (:func:`paired_differences`: each
  model minus each reference model on the same data, with a 95 % t-interval over seeds) and ``compare.png``;
* :func:`demo`: the pitchfork comparison sized for a laptop (under two minutes on two CPU cores), with the
  bifurcation diagram of every model (``bifurcation.png``) and metric bars over seeds (``metrics.png``).

Models: ``mdn`` (NLL only), ``mdn-physics`` (NLL plus the problem's physics specs, weight warmed up linearly over
the first tenth of the epochs; where the problem has a law that holds exactly and is linear in the outcome, such as
Rankine–Hugoniot, that law is built into the model, a ``ConstrainedMDN``, and the specs act beside it),
``mdn-law`` (the law built in, without the specs), ``cfm`` (conditional
flow matching) and ``torchcfm`` (the peer CFM of the ``torchcfm`` package, :class:`physmdn.peers.TorchCFM`, when it
is installed).

Every model gets the same information: the same training data without regime labels, the same validation draws
(early stopping on the validation NLL or flow-matching loss, the best epoch restored) and the same maximum number
of epochs. A component-specific law (a spec whose parameters have a component axis: "component k follows regime
k") tells the model which regime each component is, which the other models do not know; it and the regime labels
are an ablation (``oracle=True``), off by default. The residual specs are divided by their noise floor
(``normalize="noise"``, :mod:`physmdn.physics_scaling`) so that ``physics_weight`` reads in units of the data's
noise, and its default falls with the training set's size, ``min(0.1, 2.5 / n)``
(:func:`~physmdn.physics_scaling.prior_weight`); specs that cannot be normalized (no noise scale: stability,
monotonicity, exact laws, which the ground truth satisfies) keep the problem's own weights. The command line (:mod:`physmdn.cli`) is a thin layer over this module.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import time
import warnings
from typing import Sequence

import torch

from . import __version__
from . import metrics as M
from . import physics as Ph
from . import problems as P
from .constraints import ConstrainedMDN
from .models import CFM, COVARIANCES, MDN
from .peers import TorchCFM, torchcfm_status
from .physics_scaling import prior_weight
from .plotting import plot_bifurcation, plot_compare, plot_density, plot_fields, plot_history, plot_metric_bars
from .training import LinearWarmup, fit, write_rows_csv

__all__ = ["MODELS", "MODEL_LABELS", "models_for", "COVARIANCE_MODELS", "covariance_name", "model_base",
           "SUMMARY_METRICS", "PAIRED_METRICS", "NORMALIZED_WEIGHT", "experiment_physics", "run_experiment",
           "write_run", "compare", "demo", "summarize", "paired_differences", "markdown_table", "paired_table",
           "t_quantile"]

MODELS = ("mdn", "mdn-physics", "mdn-law", "cfm", "torchcfm")
MODEL_LABELS = {"mdn": "MDN", "mdn-physics": "MDN+physics", "mdn-law": "MDN+hard law", "cfm": "CFM (flow matching)",
                "torchcfm": "torchcfm (peer CFM)"}
FLOWS = ("cfm", "torchcfm")
#: the models that take ``covariance="full" | "lowrank"`` (their rows are named by :func:`covariance_name`)
COVARIANCE_MODELS = ("mdn", "mdn-physics")
#: the physics weight at which the specs without a noise scale keep the problem's shipped weights
#: (:func:`experiment_physics`); ``mdn-physics``'s default weight is :func:`~physmdn.physics_scaling.prior_weight`
NORMALIZED_WEIGHT = 0.1


def models_for(problem, peer: bool = True) -> list[str]:
    """The models that apply to ``problem``: ``mdn-law`` (a ``ConstrainedMDN``) only where the problem has a law that
    holds exactly and is linear in the outcome (``problem.hard_law()``); ``torchcfm`` when ``peer`` and the package
    imports."""
    return [m for m in MODELS if (m != "mdn-law" or hasattr(problem, "hard_law"))
            and (m != "torchcfm" or (peer and torchcfm_status()[0]))]


def covariance_name(kind: str, covariance: str = "diag", rank: int | None = None) -> str:
    """The model's name in the results: ``kind`` with diagonal components, else ``kind-full`` or ``kind-lowrank<R>``
    (``mdn-physics-full``, ``mdn-lowrank4``), so that runs of both covariances can share one results table and be
    paired (:func:`paired_differences` pairs each with its diagonal ``kind``)."""
    if covariance == "diag":
        return kind
    return f"{kind}-full" if covariance == "full" else f"{kind}-lowrank{rank}"


def model_base(name: str) -> str:
    """The model kind of a results name (:func:`covariance_name` undone): ``mdn-physics-full`` -> ``mdn-physics``."""
    for kind in COVARIANCE_MODELS:
        rest = name[len(kind) + 1:] if name.startswith(kind + "-") else ""
        if rest == "full" or (rest.startswith("lowrank") and rest[7:].isdigit()):
            return kind
    return name


def _check_covariance(kind: str, covariance: str, rank: int | None) -> None:
    """``covariance`` and ``rank`` checked against each other and ``kind``; messages name the argument."""
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {', '.join(COVARIANCES)}, got {covariance!r}")
    if (rank is not None) != (covariance == "lowrank"):
        raise ValueError(f"rank goes with covariance='lowrank' (and is required there), got covariance={covariance!r}, "
                         f"rank={rank!r}")
    if covariance != "diag" and kind not in COVARIANCE_MODELS:
        raise ValueError(f"covariance={covariance!r} applies to the models {', '.join(COVARIANCE_MODELS)}, got "
                         f"model {kind!r} (only covariance='diag' there)")


def _component_specific(spec) -> bool:
    """Whether a built-in spec's law differs between components (parameters with a component axis K > 1)."""
    params = [getattr(spec, name, None) for name in ("coeffs", "A", "b", "diffusion", "reaction")]
    return any(isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[1] > 1 for t in params)


def experiment_physics(problem, *, oracle: bool = False, normalize: str | None = "noise",
                       components: int | None = None, weight: float = NORMALIZED_WEIGHT):
    """The ``physics(x_batch) -> [(spec, weight), ...]`` factory of ``mdn-physics``.

    ``oracle=False`` drops component-specific laws (:func:`_component_specific`: they assign a regime to each
    component). ``normalize="noise"``: residual specs with a noise scale get ``normalize="noise"``; the others'
    weights are multiplied by ``problem.defaults.physics_weight / weight`` (their shipped scale, divided by the
    global ``weight`` that training multiplies every spec by), so that the global weight acts on the normalized
    specs alone. ``normalize=None``: the problem's specs as shipped."""
    if normalize not in (None, "noise"):
        raise ValueError(f"normalize must be None or 'noise', got {normalize!r}")
    builtin = (Ph.Polynomial, Ph.Linear, Ph.Stencil1D)
    others = problem.defaults.physics_weight / weight if weight > 0 else 0.0

    def physics(x):
        items = []
        for spec, spec_weight in problem.physics(x, components):
            if spec_weight == 0.0 or (not oracle and _component_specific(spec)):
                continue
            if normalize == "noise":
                if isinstance(spec, builtin) and spec.noise_scale > 0.0:
                    spec = copy.copy(spec)
                    spec.normalize = "noise"
                else:
                    spec_weight = spec_weight * others
            items.append((spec, spec_weight))
        return items

    return physics
SUMMARY_METRICS = ("nll", "energy", "mmd", "sliced_w1", "mode_weight_error", "residual_model", "calibration_error",
                   "train_s", "sample_10k_s")


# ----- one experiment -------------------------------------------------------------------------------

def builds_law_in(problem, kind: str, oracle: bool = False) -> bool:
    """Whether model ``kind`` is a ``ConstrainedMDN`` on ``problem``: ``mdn-law`` always, and ``mdn-physics`` where
    the problem has a law that holds exactly and is linear in the outcome (``problem.hard_law()``), except in the
    ``oracle`` ablation (whose regime laws are penalties on the outcome's own coordinates)."""
    return kind == "mdn-law" or (kind == "mdn-physics" and not oracle and hasattr(problem, "hard_law"))


def _build_model(problem, kind: str, components: int | None, hidden: tuple[int, ...] | None, oracle: bool = False,
                 covariance: str = "diag", rank: int | None = None):
    """A fresh model for ``kind``: an MDN of the problem's default size (components' covariance ``covariance``,
    rank ``rank``; a ``ConstrainedMDN`` where :func:`builds_law_in` and the covariance is diagonal), or a CFM with
    three hidden layers of 128; ``components`` and ``hidden`` override the defaults."""
    if kind == "cfm":
        return CFM(problem.context_dim, problem.output_dim, hidden=hidden or (128, 128, 128))
    if kind == "torchcfm":
        return TorchCFM(problem.context_dim, problem.output_dim, width=(hidden or (128,))[0])
    if builds_law_in(problem, kind, oracle) and covariance == "diag":
        law = problem.hard_law()
        rows = law.rows(problem.sample_contexts(1, seed=0))
        return ConstrainedMDN(problem.context_dim, problem.output_dim, law, components or problem.defaults.components,
                              rows=rows, hidden=hidden or problem.defaults.hidden)
    return MDN(problem.context_dim, problem.output_dim, components or problem.defaults.components,
               hidden=hidden or problem.defaults.hidden, covariance=covariance, rank=rank)


def _sampler(model, kind: str, cfm_steps: int):
    """``sample(context [B, C], n) -> [n, B, D]`` for either model family, without gradients."""
    model.eval()

    @torch.no_grad()
    def sample(context, n):
        if kind in FLOWS:
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
                   truth: tuple[torch.Tensor, torch.Tensor] | None = None, oracle: bool = False,
                   normalize: str | None = "noise", patience: int | str | None = "auto", warmup: float = 0.1,
                   covariance: str = "diag", rank: int | None = None) -> dict:
    """Train model ``kind`` on ``problem`` and evaluate it. Returns ``{"metrics", "timing", "config", "model",
    "history", "contexts", "truth"}`` (the last two: held-out contexts ``[B, C]`` and truth samples ``[m, B, D]``,
    reusable across models through ``truth=(contexts, samples)``).

    Every model trains on ``n_train`` draws (seed ``10000 + seed``) for at most ``epochs`` epochs with early
    stopping on ``max(n_train // 4, 16)`` validation draws (seed ``20000 + seed``; ``patience`` as
    :func:`~physmdn.training.fit`), the best validation epoch restored. ``oracle``: give ``mdn-physics`` the regime
    labels and the component-specific laws (an ablation; off by default). ``normalize`` and ``physics_weight``: see
    :func:`experiment_physics`; ``physics_weight`` defaults to :func:`~physmdn.physics_scaling.prior_weight` of
    ``n_train`` (``min(0.1, 2.5 / n_train)``) with ``normalize="noise"``, else to the problem's
    ``defaults.physics_weight``; it rises linearly over the first ``warmup`` of the epochs (a
    tenth: with early stopping a run may end long before the maximum). ``covariance`` (``"diag"``, ``"full"``,
    ``"lowrank"`` with ``rank``): the components of ``mdn`` and ``mdn-physics`` (:class:`~physmdn.MDN`)."""
    if kind not in models_for(problem):
        raise ValueError(f"kind must be one of {', '.join(models_for(problem))} for {problem.name}, got {kind!r}")
    _check_covariance(kind, covariance, rank)
    device = torch.device(device) if device is not None else torch.device("cpu")
    d = problem.defaults
    batch_size = batch_size or d.batch_size
    lr = lr or d.lr
    if physics_weight is None:
        physics_weight = prior_weight(n_train) if normalize == "noise" else d.physics_weight
    torch.manual_seed(seed)
    train = problem.sample(n_train, seed=10_000 + seed, device=device)
    val = problem.sample(max(n_train // 4, 16), seed=20_000 + seed, device=device)
    if truth is None:
        contexts = problem.sample_contexts(n_test_contexts, seed=30_000, device=device)
        truth_samples = problem.sample_truth(contexts, n_samples, seed=40_000)
    else:
        contexts, truth_samples = truth
    model = _build_model(problem, kind, components, hidden, oracle, covariance, rank)
    use_physics = kind == "mdn-physics"
    labelled = use_physics and oracle and problem.component_specific
    train_data = (train.x, train.y, train.labels) if labelled else (train.x, train.y)
    physics = experiment_physics(problem, oracle=oracle, normalize=normalize, components=components,
                                 weight=physics_weight) if use_physics else None
    # keep the last batch: with tiny data sets drop_last would leave nothing to train on
    start = time.perf_counter()
    result = fit(model, train_data, (val.x, val.y), epochs=epochs, batch_size=min(batch_size, n_train), lr=lr,
                 seed=seed, device=device, progress=progress, history_path=history_path, physics=physics,
                 physics_weight=LinearWarmup(physics_weight, max(1, int(epochs * warmup))) if use_physics else 0.0,
                 patience=patience)
    train_s = time.perf_counter() - start
    model = result.model
    sample = _sampler(model, kind, cfm_steps)
    mixture_fn = None if kind in FLOWS else (lambda c: model(c))
    with torch.no_grad():
        metrics = M.evaluate(problem, sample, contexts, n_model=truth_samples.shape[0], truth_samples=truth_samples,
                             mixture_fn=mixture_fn, seed=seed)
    metrics.setdefault("nll", math.nan)
    timing = {"train_s": train_s, "sample_10k_s": _time_sampling(sample, problem, device),
              "epochs_completed": result.epochs_completed, "best_epoch": result.best_epoch}
    config = {"problem": problem.name, "problem_config": problem.config, "model": kind, "n_train": n_train,
              "epochs": epochs, "seed": seed, "device": str(device), "components": getattr(model, "components", None),
              "hidden": list(model.config.get("hidden", [model.config.get("width")])), "batch_size": batch_size,
              "lr": lr,
              "physics_weight": physics_weight if use_physics else 0.0, "n_test_contexts": contexts.shape[0],
              "n_samples": truth_samples.shape[0], "regime_labels": bool(labelled),
              "oracle": bool(oracle and use_physics),
              "normalize": normalize if use_physics else None, "patience": patience}
    if covariance != "diag":
        config.update(covariance=covariance, rank=rank)
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
            covariances: Sequence[str] = ("diag",), rank: int | None = None, **kwargs) -> list[dict]:
    """Every model x training size x seed on ``problem``; writes ``results.csv``, ``summary.md``, ``summary.csv``,
    ``paired.csv`` and ``compare.png`` to ``out``. Seeds are paired: for a given size and seed every model trains on
    the same data and validation draws, and all runs share the held-out contexts and ground truth.
    ``kwargs`` go to :func:`run_experiment` (``oracle``, ``normalize``, ``physics_weight``, ...).
    ``torchcfm`` among ``models`` without the package installed is skipped with a warning (and a line in
    ``summary.md``). ``on_result(row, result)``, if given, sees each run's row and :func:`run_experiment` result (its
    trained model and sampler) before the result is dropped. ``covariances``: each of ``mdn`` and ``mdn-physics``
    runs once per covariance (``"diag"``, ``"full"``, ``"lowrank"`` with ``rank``), named by
    :func:`covariance_name` (``mdn-physics-full``); the other models run once."""
    models = list(models) if models is not None else models_for(problem)
    covariances = list(dict.fromkeys(covariances))
    for covariance in covariances:
        _check_covariance("mdn", covariance, rank if covariance == "lowrank" else None)
    if covariances != ["diag"] and not any(m in COVARIANCE_MODELS for m in models):
        raise ValueError(f"covariances={covariances!r} apply to the models {', '.join(COVARIANCE_MODELS)}, none of "
                         f"which is among models={models!r}")
    notes = []
    if "torchcfm" in models and not torchcfm_status()[0]:
        notes.append(f"torchcfm column skipped: {torchcfm_status()[1]}")
        warnings.warn(notes[-1], stacklevel=2)
        models.remove("torchcfm")
    contexts = problem.sample_contexts(n_test_contexts, seed=30_000, device=device)
    truth = (contexts, problem.sample_truth(contexts, n_samples, seed=40_000))
    variants = [(model, cov) for model in models for cov in (covariances if model in COVARIANCE_MODELS else ["diag"])]
    runs = [(n, seed, model, cov) for n in sizes for seed in range(seeds) for model, cov in variants]
    _warm_up(problem, models, device, covariances, rank)
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(runs), desc=f"compare {problem.name}", unit="run")
    for n, seed, model, cov in runs:
        cov_rank = rank if cov == "lowrank" else None
        name = covariance_name(model, cov, cov_rank)
        if bar is not None:
            bar.set_postfix_str(f"{name} n={n} seed={seed}")
        row = {"problem": problem.name, "model": name, "n_train": n, "seed": seed}
        if model in COVARIANCE_MODELS:
            row.update(covariance=cov, rank=cov_rank)
        try:
            result = run_experiment(problem, model, n_train=n, epochs=epochs, seed=seed, device=device, truth=truth,
                                    covariance=cov, rank=cov_rank, **kwargs)
        except FloatingPointError as exc:  # a diverged training run is a result too: kept as a row without metrics
            row["error"] = str(exc)
            rows.append(row)
            notes.append(f"{name}, n_train {n}, seed {seed} diverged: {exc}")
            warnings.warn(notes[-1], stacklevel=2)
            if bar is not None:
                bar.update(1)
            continue
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
    paired = paired_differences(rows)
    write_rows_csv(os.path.join(out, "paired.csv"), paired)
    with open(os.path.join(out, "summary.md"), "w") as fh:
        fh.write(markdown_table(summary, problem.name, epochs, seeds))
        fh.write(paired_table(paired))
        for name in dict.fromkeys(r["model"] for r in rows):
            if model_base(name) != name:
                fh.write(paired_table(paired, name))
        fh.writelines(f"\n{note}\n" for note in notes)
    plot_compare(rows, os.path.join(out, "compare.png"))
    _write_json(os.path.join(out, "environment.json"), _environment())
    return rows


def _warm_up(problem, models, device, covariances=("diag",), rank=None) -> None:
    """One tiny fit per model family (and MDN covariance), so one-time costs (lazy initialization, allocator
    growth) do not land in the first run's train_s."""
    data = problem.sample(16, seed=0, device=device)
    kinds = dict.fromkeys((m, "diag") if m in ("cfm", "torchcfm", "mdn-law") else ("mdn", c)
                          for m in models for c in covariances)
    for kind, cov in kinds:
        model = _build_model(problem, kind, None, (8,), covariance=cov, rank=rank if cov == "lowrank" else None)
        fit(model, (data.x, data.y), epochs=1, batch_size=16, device=device, progress=False)


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds of :data:`SUMMARY_METRICS`, per (model, n_train); ``seeds`` counts
    the runs with metrics, ``failed`` those that diverged (rows with an ``error``)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["n_train"]), []).append(row)
    summary = []
    for (model, n), group in sorted(groups.items(), key=lambda kv: (kv[0][1], MODELS.index(model_base(kv[0][0])),
                                                                      kv[0][0])):
        failed = sum(1 for r in group if r.get("error"))
        entry = {"model": model, "n_train": n, "seeds": len(group) - failed, "failed": failed}
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


PAIRED_METRICS = ("energy", "mode_weight_error", "residual_model", "nll")
REFERENCES = ("mdn", "cfm", "torchcfm")


def t_quantile(level: float, dof: int) -> float:
    """Two-sided Student-t quantile ``t_{(1 + level) / 2, dof}`` (``dof >= 1``), by bisection on the regularized
    incomplete beta function: ``P(|T| > t) = I_{dof / (dof + t^2)}(dof / 2, 1 / 2)``."""
    if not 0.0 < level < 1.0 or dof < 1:
        raise ValueError(f"level must be in (0, 1) and dof >= 1, got level={level!r}, dof={dof!r}")
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _betainc(dof / 2.0, 0.5, dof / (dof + mid * mid)) > 1.0 - level:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)`` by its continued fraction (modified Lentz)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
    return math.exp(log_front) * f / a


def paired_differences(rows: list[dict], metrics: Sequence[str] = PAIRED_METRICS,
                       references: Sequence[str] = REFERENCES, level: float = 0.95) -> list[dict]:
    """Paired differences ``model - reference`` over the seeds both ran (same data), per training size and metric;
    besides ``references``, each full- or low-rank-covariance model (``mdn-physics-full``) is paired with its
    diagonal model (``mdn-physics``).

    One row per (n_train, model, reference, metric) with ``seeds``, ``mean`` (of the model), ``reference_mean``,
    ``difference`` (mean of the per-seed differences), ``half_width`` (``t_{0.975, seeds-1} * std / sqrt(seeds)``;
    NaN for one seed), ``low``, ``high`` and ``ratio`` (``mean / reference_mean``)."""
    values = {(r["model"], r["n_train"], r["seed"]): r for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    pairs_of_models = [(model, reference) for reference in references if reference in models
                       for model in models if model != reference]
    pairs_of_models += [(model, model_base(model)) for model in models if model_base(model) in models
                        and model_base(model) != model and (model, model_base(model)) not in pairs_of_models]
    out = []
    for n in sorted({r["n_train"] for r in rows}):
        for model, reference in pairs_of_models:
            for metric in metrics:
                pairs = [(values[(model, n, s)].get(metric), values[(reference, n, s)].get(metric))
                         for (m, size, s) in values if m == model and size == n and (reference, n, s) in values]
                pairs = [(a, b) for a, b in pairs if a is not None and b is not None
                         and math.isfinite(a) and math.isfinite(b)]
                if not pairs:
                    continue
                diffs = [a - b for a, b in pairs]
                k = len(diffs)
                mean_diff = sum(diffs) / k
                half = math.nan
                if k > 1:
                    std = math.sqrt(sum((x - mean_diff) ** 2 for x in diffs) / (k - 1))
                    half = t_quantile(level, k - 1) * std / math.sqrt(k)
                mean_a, mean_b = sum(a for a, _ in pairs) / k, sum(b for _, b in pairs) / k
                out.append({"n_train": n, "model": model, "reference": reference, "metric": metric, "seeds": k,
                            "mean": mean_a, "reference_mean": mean_b, "difference": mean_diff,
                            "half_width": half, "low": mean_diff - half, "high": mean_diff + half,
                            "ratio": mean_a / mean_b if mean_b != 0 else math.nan})
    return out


def paired_table(paired: list[dict], model: str = "mdn-physics") -> str:
    """Markdown of :func:`paired_differences` for ``model``: per training size and reference, the paired
    difference ``± half-width`` of each metric (bold where the 95 % interval excludes 0) and the residual ratio."""
    rows = [p for p in paired if p["model"] == model]
    if not rows:
        return ""
    metrics = list(dict.fromkeys(p["metric"] for p in rows))
    lines = ["", f"## {model} minus each reference model, paired over seeds (95 % t-interval)", "",
             "| n_train | reference | seeds | " + " | ".join(f"Δ {m}" for m in metrics) + " | residual ratio |",
             "|" + "---|" * (len(metrics) + 4)]
    keys = list(dict.fromkeys((p["n_train"], p["reference"]) for p in rows))
    for n, reference in keys:
        cells = {p["metric"]: p for p in rows if p["n_train"] == n and p["reference"] == reference}
        seeds = max(p["seeds"] for p in cells.values())
        text = []
        for m in metrics:
            p = cells.get(m)
            if p is None:
                text.append("n/a")
                continue
            value = f"{p['difference']:+.3g} ± {p['half_width']:.2g}" if math.isfinite(p["half_width"]) \
                else f"{p['difference']:+.3g}"
            text.append(f"**{value}**" if math.isfinite(p["half_width"]) and (p["low"] > 0 or p["high"] < 0) else value)
        ratio = cells.get("residual_model", {}).get("ratio", math.nan)
        lines.append(f"| {n} | {reference} | {seeds} | " + " | ".join(text) + f" | {ratio:.3g} |")
    return "\n".join(lines) + "\n"


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
    """The demo: :func:`compare` of the MDN, MDN+physics and CFM on the pitchfork ``dy/dt = r y - y^3``
    (long-time state ``+-sqrt(r)`` for ``r > 0``, 0 for ``r < 0``), evaluated at ``n_test_contexts`` held-out contexts with
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

    rows = compare(problem, models=models_for(problem, peer=False), sizes=sizes, seeds=seeds, epochs=epochs, out=out,
                   device=device, progress=progress, n_test_contexts=n_test_contexts, n_samples=n_samples, on_result=keep, **kwargs)
    titles = {label: f"n = {largest}, seed 0: energy {energy:.3g}" for label, (_, energy) in shown.items()}
    plot_bifurcation(problem, {label: sampler for label, (sampler, _) in shown.items()},
                     os.path.join(out, "bifurcation.png"), titles=titles, device=device)
    plot_metric_bars(rows, os.path.join(out, "metrics.png"), labels=MODEL_LABELS)
    return rows

"""The ``physmdn`` command line: train, evaluate and compare models on the benchmark problems, and fit and sample
models on a user's data files.

::

    physmdn run <problem> --model mdn|mdn-physics|cfm [--n-train N] [--epochs E] [--device D] [--out DIR] [--seed S]
                [--covariance diag|full|lowrank [--rank R]]
    physmdn compare <problem> [--n-train 64,256,2048] [--seeds 5] [--models mdn,mdn-physics,cfm] [--out DIR]
                    [--oracle] [--physics-normalize noise|none] [--patience auto|N] [--covariance diag,full [--rank R]]
    physmdn demo [--n-train 256,2048] [--seeds 3] [--epochs 60] [--threads 1] [--out DIR]
    physmdn problems
    physmdn fit DATA.csv --x COLS --y COLS [--components K --physics module:name --out DIR]
    physmdn sample CHECKPOINT --x V1,V2 [--n N --out samples.csv]
    physmdn info

Common options: ``--components K --hidden 64,64 --batch-size --lr --physics-weight --cfm-steps --threads --quiet``.

``run`` trains one model on ``problem.sample(n_train)`` (validation: a quarter as many, another seed), evaluates it
at held-out contexts against ``problem.sample_truth`` (:func:`physmdn.metrics.evaluate`) and writes
``metrics.json``, ``history.csv`` and PNG plots (``density.png``: conditional density against the ground truth
over the context range with the true branches and the MDN's modes marked, or ``fields.png``: sampled fields per
branch; ``history.png``). ``compare`` runs every model for every training-set size and seed and writes
``results.csv`` (one row per run), ``summary.md`` / ``summary.csv`` (mean and spread over seeds), ``paired.csv``
(each model minus each reference model, paired over seeds, with a 95 % t-interval) and ``compare.png``. ``demo`` is a pitchfork comparison sized for a laptop (under two minutes on two CPU cores) that
also writes ``bifurcation.png`` (each model's samples over the true branches) and ``metrics.png`` (metric bars with
error bars over seeds); it runs on one CPU thread unless ``--threads`` says otherwise.

Models: ``mdn`` (NLL only), ``mdn-physics`` (NLL plus the problem's physics specs, noise-normalized, weight warmed up
linearly over the first tenth of the epochs), ``mdn-law`` (the law built in, where there is one), ``cfm``
(conditional flow matching) and ``torchcfm`` (the torchcfm package's CFM, when installed). Every model gets the same
data without regime labels and early stopping on the same validation draws; ``--oracle`` (an ablation) gives
``mdn-physics`` the regime labels and the component-specific laws (:mod:`physmdn.experiments`). ``--covariance``
gives ``mdn`` and ``mdn-physics`` full (``full``) or low-rank-plus-diagonal (``lowrank --rank R``) components;
``compare`` takes a list (``diag,full``), runs those two models once per covariance under the names ``mdn-full``,
``mdn-physics-lowrank4``, ... and pairs each with its diagonal model in ``paired.csv``.

``fit`` and ``sample`` (the user's own CSV, npz or pt files) live in :mod:`physmdn.cli_data`. This module parses
the arguments and prints; the experiments themselves live in :mod:`physmdn.experiments` and the plots in
:mod:`physmdn.plotting`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Sequence

import torch

from . import problems as P
from ._cli_args import CLIError, device as _device, hidden as _hidden, int_list as _int_list, out_dir
from ._cli_args import nonneg_float as _nonneg_float, nonneg_int as _nonneg_int
from ._cli_args import positive_float as _positive_float, positive_int as _positive_int
from .cli_data import add_data_commands
from .experiments import COVARIANCE_MODELS, MODELS, SUMMARY_METRICS, compare, covariance_name, demo, run_experiment
from .experiments import write_run
from ._mixture_correlated import MAX_RANK
from .models import COVARIANCES

__all__ = ["main"]


# ----- argument types -------------------------------------------------------------------------------

def _problem_name(text: str) -> str:
    key = text.strip().lower().replace("-", "_")
    if key not in P.names():
        raise argparse.ArgumentTypeError(f"unknown problem {text!r}; valid names: {', '.join(P.names())}")
    return key


def _patience(text: str):
    if text in ("auto", "off"):
        return None if text == "off" else text
    return _positive_int(text)


def _covariance_list(text: str) -> list[str]:
    values = [c.strip().lower() for c in text.split(",") if c.strip()]
    bad = [c for c in values if c not in COVARIANCES]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(COVARIANCES)}, got {text!r}")
    return list(dict.fromkeys(values))


def _check_covariance(covariances: list[str], rank, models: list[str] | None) -> None:
    """``--covariance`` against ``--rank`` and the models it applies to (``models`` None: the defaults)."""
    if (rank is not None) != ("lowrank" in covariances):
        raise CLIError(f"--rank goes with --covariance lowrank (and is required there), got --covariance "
                       f"{','.join(covariances)}{'' if rank is None else f' --rank {rank}'}")
    if rank is not None and rank > MAX_RANK:
        raise CLIError(f"--rank must be an integer in [1, {MAX_RANK}], got {rank}")
    if covariances != ["diag"] and models is not None and not any(m in COVARIANCE_MODELS for m in models):
        raise CLIError(f"--covariance {','.join(covariances)} applies to the models {', '.join(COVARIANCE_MODELS)}, "
                       f"got {'--model' if len(models) == 1 else '--models'} {','.join(models)}")


def _model_list(text: str) -> list[str]:
    models = [m.strip().lower() for m in text.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if not models or bad:
        raise argparse.ArgumentTypeError(f"models must be a comma-separated subset of {', '.join(MODELS)}, got {text!r}")
    return models


# ----- commands -------------------------------------------------------------------------------------

def _out_dir(path: str) -> str:
    return out_dir(path, "--out")


def cmd_run(args) -> int:
    problem = P.get(args.problem)
    if len(args.covariance) != 1:
        raise CLIError(f"--covariance takes one of {', '.join(COVARIANCES)} for run, got {','.join(args.covariance)}")
    _check_covariance(args.covariance, args.rank, [args.model])
    covariance = args.covariance[0]
    name = covariance_name(args.model, covariance, args.rank)
    out = _out_dir(args.out or os.path.join("runs", f"{problem.name}-{name}-n{args.n_train}-s{args.seed}"))
    epochs = args.epochs or problem.defaults.epochs
    n_train = args.n_train or problem.defaults.n_train
    if not args.quiet:
        print(f"physmdn run: {problem.name}, model {name}, {n_train} samples, {epochs} epochs on {args.device}")
    result = run_experiment(problem, args.model, n_train=n_train, epochs=epochs, seed=args.seed, device=args.device,
                            components=args.components, hidden=args.hidden, batch_size=args.batch_size, lr=args.lr,
                            physics_weight=args.physics_weight, n_test_contexts=args.n_test_contexts,
                            n_samples=args.n_samples, cfm_steps=args.cfm_steps, progress=not args.quiet,
                            history_path=os.path.join(out, "history.csv"), covariance=covariance, rank=args.rank)
    plots = write_run(out, problem, args.model, result, plots=not args.no_plots, device=args.device)
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


def _print_summary(out: str, plots=("compare.png",)) -> None:
    with open(os.path.join(out, "summary.md")) as fh:
        print(fh.read())
    print(f"wrote results.csv, summary.md, summary.csv, {', '.join(plots)} to {out}")


def _common_kwargs(args) -> dict:
    return dict(components=args.components, hidden=args.hidden, batch_size=args.batch_size, lr=args.lr,
                physics_weight=args.physics_weight, cfm_steps=args.cfm_steps)


def cmd_compare(args) -> int:
    problem = P.get(args.problem)
    _check_covariance(args.covariance, args.rank, args.models)
    out = _out_dir(args.out or os.path.join("runs", f"compare-{problem.name}"))
    epochs = args.epochs or problem.defaults.epochs
    compare(problem, models=args.models, sizes=args.n_train, seeds=args.seeds, epochs=epochs, out=out,
            device=args.device, progress=not args.quiet, n_test_contexts=args.n_test_contexts,
            n_samples=args.n_samples, oracle=args.oracle,
            normalize=None if args.physics_normalize == "none" else args.physics_normalize,
            patience=args.patience, covariances=args.covariance, rank=args.rank, **_common_kwargs(args))
    if not args.quiet:
        _print_summary(out)
    return 0


def cmd_demo(args) -> int:
    out = _out_dir(args.out or os.path.join("runs", "demo"))
    if not args.quiet:
        print("physmdn demo: pitchfork dy/dt = r y - y^3, long-time state +-sqrt(r) (r > 0) or 0 (r < 0); "
              f"MDN, physics-informed MDN and flow matching at {len(args.n_train)} training-set size(s), "
              f"{args.seeds} seed(s)")
    demo(sizes=args.n_train, seeds=args.seeds, epochs=args.epochs, out=out, device=args.device,
         progress=not args.quiet, **_common_kwargs(args))
    if not args.quiet:
        _print_summary(out, plots=("compare.png", "bifurcation.png", "metrics.png"))
    return 0


def cmd_problems(args) -> int:
    for name in P.names():
        problem = P.get(name)
        outputs = f"{problem.output_dim} output{'s' if problem.output_dim != 1 else ''}"
        print(f"{name:20s} context ({', '.join(problem.context_names)}) -> {outputs}; "
              f"branches: {', '.join(problem.branch_names)}")
    return 0


# ----- parser ---------------------------------------------------------------------------------------

def _add_training_options(p: argparse.ArgumentParser, *, epochs_default=None, threads_default=None) -> None:
    p.add_argument("--epochs", type=_positive_int, default=epochs_default,
                   help="training epochs (default: the problem's)")
    p.add_argument("--device", type=_device, default=torch.device("cpu"), help="torch device (default: cpu)")
    p.add_argument("--out", default=None, help="output directory (default: runs/...)")
    p.add_argument("--components", type=_positive_int, default=None, help="MDN components (default: the problem's)")
    p.add_argument("--hidden", type=_hidden, default=None, help="hidden widths, e.g. 64,64 (default: per model)")
    p.add_argument("--batch-size", type=_positive_int, default=None)
    p.add_argument("--lr", type=_positive_float, default=None)
    p.add_argument("--physics-weight", type=_nonneg_float, default=None,
                   help="final physics weight of mdn-physics (default: min(0.1, 2.5 / n_train) with noise-normalized "
                        "penalties, physmdn.physics_scaling.prior_weight; else the problem's)")
    p.add_argument("--cfm-steps", type=_positive_int, default=32, help="ODE steps when sampling the CFM")
    threads_shown = "torch's" if threads_default is None else threads_default
    p.add_argument("--threads", type=_positive_int, default=threads_default,
                   help=f"torch intra-op CPU threads (default: {threads_shown}; 1 is often fastest for these small "
                        "models)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summaries")


def _add_covariance_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--covariance", type=_covariance_list, default=["diag"],
                   help=f"{what}: diag (default), full (a Cholesky factor per component) or lowrank (W W^T + "
                        "diagonal, with --rank)")
    p.add_argument("--rank", type=_positive_int, default=None, help="rank R of the low-rank covariance factor (1-8)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="physmdn", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"physmdn {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{run,compare,demo,problems,fit,sample,info}")
    sub.required = True

    run = sub.add_parser("run", help="train and evaluate one model on a problem")
    run.add_argument("problem", type=_problem_name, help=f"one of {', '.join(P.names())}")
    run.add_argument("--model", type=str.lower, choices=MODELS, required=True)
    run.add_argument("--n-train", type=_positive_int, default=None, help="training samples (default: the problem's)")
    run.add_argument("--seed", type=_nonneg_int, default=0)
    run.add_argument("--n-test-contexts", type=_positive_int, default=32, help="held-out contexts for the metrics")
    run.add_argument("--n-samples", type=_positive_int, default=400, help="samples per held-out context")
    run.add_argument("--no-plots", action="store_true")
    _add_covariance_options(run, "the components' covariance of mdn and mdn-physics")
    _add_training_options(run)
    run.set_defaults(func=cmd_run)

    cmp_ = sub.add_parser("compare", help="all models x training sizes x seeds on a problem")
    cmp_.add_argument("problem", type=_problem_name, help=f"one of {', '.join(P.names())}")
    cmp_.add_argument("--n-train", type=_int_list, default=[64, 256, 2048], help="comma-separated sizes")
    cmp_.add_argument("--seeds", type=_positive_int, default=5, help="paired seeds per configuration")
    cmp_.add_argument("--models", type=_model_list, default=None,
                      help="comma-separated subset of models (default: every model that applies to the problem; "
                           "mdn-law where the problem has a hard linear law)")
    cmp_.add_argument("--n-test-contexts", type=_positive_int, default=32)
    cmp_.add_argument("--n-samples", type=_positive_int, default=400)
    cmp_.add_argument("--oracle", action="store_true",
                      help="ablation: give mdn-physics the regime labels and the component-specific laws that the "
                           "other models do not get")
    cmp_.add_argument("--physics-normalize", choices=("noise", "none"), default="noise",
                      help="divide the residual penalties by their noise floor (default) or use the problem's raw "
                           "weights")
    cmp_.add_argument("--patience", type=_patience, default="auto",
                      help="early-stopping patience in epochs on the validation split, 'auto' (fit's default) or "
                           "'off'")
    _add_covariance_options(cmp_, "comma-separated covariances of the components of mdn and mdn-physics, each run "
                                  "and named apart (mdn-full, mdn-physics-lowrank4) and paired with diag")
    _add_training_options(cmp_)
    cmp_.set_defaults(func=cmd_compare)

    demo = sub.add_parser("demo", help="pitchfork comparison of all models (under 2 minutes on 2 CPU cores)")
    demo.add_argument("--n-train", type=_int_list, default=[256, 2048])
    demo.add_argument("--seeds", type=_positive_int, default=3, help="seeds per configuration (error bars)")
    # one thread: these small models gain nothing from a second one, and two threads competing with other load on
    # two cores made the demo several times slower
    _add_training_options(demo, epochs_default=60, threads_default=1)
    demo.set_defaults(func=cmd_demo)

    lst = sub.add_parser("problems", help="list the benchmark problems")
    lst.set_defaults(func=cmd_problems)

    add_data_commands(sub)  # fit, sample

    info = sub.add_parser("info", help="build facts: torch built against and running, CUDA and CPU kernels")
    info.set_defaults(func=cmd_info)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def cmd_info(args) -> int:
    import physmdn

    for key, value in physmdn.build_info().items():
        print(f"{key:16s} {value}")
    return 0


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


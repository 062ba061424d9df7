"""The command line on a user's data: ``physmdn fit`` trains an MDN on columns of a file, ``physmdn sample`` draws
from a trained one.

::

    physmdn fit DATA --x COLS --y COLS [--components K] [--covariance diag|full|lowrank [--rank R]] [--hidden 64,64]
                [--physics SPEC [--physics-weight W] [--physics-warmup E]] [--epochs E] [--batch-size B] [--lr LR]
                [--val-fraction F] [--patience P] [--drop-nan] [--seed S] [--device D] [--out DIR] [--no-plots]
    physmdn sample CHECKPOINT (--x V1,V2,... [--x ...] | --x-file FILE [--x-cols COLS]) [--n N] [--out FILE.csv]
                [--seed S]

``DATA`` is a ``.csv``, ``.tsv``, ``.npz``, ``.pt`` or ``.pth`` file; ``--x`` / ``--y`` select the context and
outcome columns by name, 0-based index or ``start:stop`` range (``--x r,T --y 2:5``), or for npz / pt by array
name with optional columns (``--x "x[0,2]" --y y``); :mod:`physmdn.datafiles` has the full grammar.

``fit`` holds out ``--val-fraction`` of the rows (seeded) for validation and early stopping, trains
``MDN(C, D, K)`` with :func:`physmdn.fit` and writes into ``--out`` (default ``runs/fit-<file stem>``):

* ``model.pt``: the checkpoint of the best validation epoch (``physmdn.load("model.pt")`` rebuilds the model), with
  the column names, so that ``sample`` writes them back;
* ``history.csv``: one row per epoch (:attr:`physmdn.FitResult.history`);
* ``summary.json``: the data file, rows used and dropped, the columns, the normalization (``x_loc``, ``x_scale``,
  ``y_loc``, ``y_scale``), the model's configuration, the physics and the best epoch with its validation NLL;
* ``history.png`` and ``samples.png`` (for one context column: data and one model sample per data row over it; for
  more: histograms of each outcome column, data against samples at the data's contexts), with matplotlib.

``--physics SPEC`` adds a physics penalty. ``SPEC`` is ``module:name`` (an importable module) or
``path/to/file.py:name``, where ``name`` is

* a :class:`physmdn.physics.PhysicsSpec` (e.g. ``Linear(A, b)``) or a list of specs / ``(spec, weight)`` pairs,
  used for every batch; or
* a function ``f(x [B, C]) -> spec | list | None`` called with each batch of contexts (physical units) before
  the forward pass, for laws that depend on the context.

Its total weight is ``--physics-weight`` (default 1), reached linearly over ``--physics-warmup`` epochs if given.
The spec is tried on a few rows before training, so a spec that does not fit the data's columns exits at once.

``sample`` writes a CSV with one row per draw: ``context`` (the 0-based index of the context row), the context
columns and the outcome columns under their names from training (``x0, ...`` / ``y0, ...`` for checkpoints that
``fit`` wrote outside the command line). Contexts come from ``--x`` (one comma-separated row per ``--x``) or from
``--x-file`` (its columns selected by ``--x-cols``, default the names used in training).

Every problem with the input (a missing, unreadable or unknown file, a column the file lacks, a non-numeric
column, NaN or infinite values without ``--drop-nan``, too few rows, a wrong number of context values) exits
with status 2 and a message naming it.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch

from . import __version__
from .datafiles import Columns, DataFileError, read_columns
from . import physics_correlated
from .distributions import GaussianMixture
from .models import CFM, COVARIANCES, MDN
from .physics import PhysicsSpec, mdn_loss
from .plotting import _pyplot, plot_history
from .training import CheckpointError, LinearWarmup, fit, load, load_checkpoint, seed_everything
from .training.checkpoint import cpu_state, model_spec, save_model_checkpoint
from ._cli_args import CLIError, device, hidden, nonneg_float, nonneg_int, out_dir, positive_float, positive_int

__all__ = ["add_data_commands", "cmd_fit", "cmd_sample", "load_physics", "COVARIANCES", "MIN_ROWS"]

MIN_ROWS = 10  # fewer rows leave nothing to validate on and make the normalization meaningless
_PLOT_ROWS = 5000  # rows drawn in samples.png (a random subset of larger data)


# ----- physics ---------------------------------------------------------------------------------------

def _import_target(target: str, option: str):
    """The module ``target`` names: a ``.py`` file path or an importable dotted name."""
    if target.endswith(".py") or "/" in target or os.sep in target:
        if not os.path.isfile(target):
            raise CLIError(f"{option} names the file {target!r}, which does not exist")
        name = "physmdn_physics_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(target))[0])
        spec = importlib.util.spec_from_file_location(name, target)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # as an import would: its functions and classes can then be pickled
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # the user's file: any error in it is reported, not raised
            sys.modules.pop(name, None)
            raise CLIError(f"{option}: running {target!r} failed: {type(exc).__name__}: {exc}") from None
        return module
    try:
        return importlib.import_module(target)
    except Exception as exc:
        raise CLIError(f"{option}: importing module {target!r} failed: {type(exc).__name__}: {exc} (the module must "
                       "be importable, or name a file as path/to/file.py:name)") from None


def _is_spec_item(item) -> bool:
    """A spec or a ``(spec, weight)`` pair, as ``physics=[...]`` takes them."""
    pair = isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], PhysicsSpec)
    return isinstance(item, PhysicsSpec) or pair


def load_physics(text: str, option: str = "--physics"):
    """The physics a ``module:name`` / ``file.py:name`` spec names: a :class:`PhysicsSpec`, a list of specs /
    ``(spec, weight)`` pairs, or a per-batch function ``f(x) -> spec | list | None``. Raises :class:`CLIError`."""
    target, sep, attribute = text.rpartition(":")
    if not sep or not target or not attribute:
        raise CLIError(f"{option} must be module:name or path/to/file.py:name, got {text!r}")
    obj = _import_target(target, option)
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"{option}: {target!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if isinstance(obj, PhysicsSpec):
        return obj
    if isinstance(obj, (list, tuple)) and obj and all(_is_spec_item(item) for item in obj):
        return list(obj)
    if callable(obj) and not isinstance(obj, type):
        return obj
    raise CLIError(f"{option} must name a PhysicsSpec, a list of specs or (spec, weight) pairs, or a function "
                   f"f(x) -> spec, got {type(obj).__name__} ({text!r})")


def _check_physics(model: MDN, physics, x: torch.Tensor, y: torch.Tensor, text: str) -> None:
    """Evaluate the penalty on the first rows, so that a spec that does not fit the data stops before training."""
    rows_x, rows_y = x[:4], y[:4]
    try:
        with torch.no_grad():
            value = physics(rows_x) if callable(physics) else physics
            mixture = model(rows_x)
            if isinstance(mixture, GaussianMixture):
                loss = mdn_loss(mixture.logits, mixture.means, mixture.log_scales, rows_y, physics=value, weight=1.0)
            else:  # full or low-rank covariance
                loss = physics_correlated.mdn_loss(mixture, rows_y, physics=value, weight=1.0).mean()
    except Exception as exc:
        raise CLIError(f"--physics {text!r} must fit the data ({model.in_features} context column(s), "
                       f"{model.out_features} outcome column(s), {model.components} components), but evaluating it "
                       f"failed: {type(exc).__name__}: {exc}") from None
    if not bool(torch.isfinite(loss)):
        raise CLIError(f"--physics {text!r} must give a finite penalty, got {float(loss)} on the first rows")


# ----- fit -------------------------------------------------------------------------------------------

def _read(path: str, x: str, y: str | None, drop_nan: bool, min_rows: int, x_option: str = "--x") -> Columns:
    try:
        return read_columns(path, x, y, drop_nan=drop_nan, min_rows=min_rows, x_option=x_option)
    except DataFileError as exc:
        raise CLIError(str(exc)) from None


def _split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded disjoint index sets ``(train, val)``; ``val`` has ``round(fraction n)`` rows, at least 1 if
    ``fraction > 0``."""
    n_val = max(1, round(fraction * n)) if fraction > 0 else 0
    if n - n_val < 2:
        raise CLIError(f"--val-fraction {fraction} leaves {n - n_val} training row(s) of {n}; lower it")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_val:], order[:n_val]


def _covariance(text: str) -> str:
    kind = text.strip().lower()
    if kind in COVARIANCES:
        return kind
    raise CLIError(f"--covariance must be one of {', '.join(COVARIANCES)}, got {text!r}")


def cmd_fit(args) -> int:
    covariance = _covariance(args.covariance)
    if (args.rank is not None) != (covariance == "lowrank"):
        raise CLIError(f"--rank goes with --covariance lowrank (and is required there), got --covariance {covariance}"
                       f"{'' if args.rank is None else f' --rank {args.rank}'}")
    if args.physics is None and (args.physics_weight is not None or args.physics_warmup is not None):
        raise CLIError("--physics-weight and --physics-warmup need --physics")
    physics = load_physics(args.physics) if args.physics is not None else None
    data = _read(args.data, args.x, args.y, args.drop_nan, MIN_ROWS)
    stem = os.path.splitext(os.path.basename(args.data))[0]
    out = out_dir(args.out or os.path.join("runs", f"fit-{stem}"))
    x, y = data.x.float(), data.y.float()
    train_rows, val_rows = _split(x.shape[0], args.val_fraction, args.seed)
    seed_everything(args.seed)
    try:
        model = MDN(x.shape[1], y.shape[1], args.components, hidden=args.hidden, covariance=covariance, rank=args.rank)
    except ValueError as exc:  # (rank or output size out of the covariance's range)
        raise CLIError(str(exc)) from None
    if physics is not None:
        _check_physics(model, physics, x, y, args.physics)
    weight = 1.0 if args.physics_weight is None else args.physics_weight
    schedule = LinearWarmup(weight, epochs=args.physics_warmup) if args.physics_warmup else weight
    if not args.quiet:
        dropped = f", {data.rows_dropped} dropped for NaN/inf" if data.rows_dropped else ""
        print(f"physmdn fit: {x.shape[0]} rows of {args.data}{dropped}: x ({', '.join(data.x_names)}) -> "
              f"y ({', '.join(data.y_names)}); {args.components} components ({covariance}); "
              f"{len(train_rows)} train / {len(val_rows)} validation rows; {args.epochs} epochs on {args.device}")
    val = (x[val_rows], y[val_rows]) if len(val_rows) else None
    started = time.perf_counter()
    try:
        result = fit(model, (x[train_rows], y[train_rows]), val, epochs=args.epochs,
                     batch_size=min(args.batch_size, len(train_rows)), lr=args.lr, seed=args.seed, physics=physics,
                     physics_weight=schedule if physics is not None else 0.0, patience=args.patience,
                     device=args.device, progress=not args.quiet, history_path=os.path.join(out, "history.csv"))
    except FloatingPointError as exc:
        raise CLIError(f"training diverged: {exc}") from None
    seconds = time.perf_counter() - started
    model = result.model.cpu().eval()

    columns = {"x": data.x_names, "y": data.y_names, "x_spec": args.x, "y_spec": args.y}
    save_model_checkpoint(os.path.join(out, "model.pt"), model_spec(model), cpu_state(model), columns=columns,
                          epoch=result.best_epoch, metric=result.best_metric, monitor=result.monitor)
    last = result.history[-1] if result.history else {}
    summary = {
        "data": {"file": os.path.abspath(args.data), "rows": data.rows_read, "rows_dropped": data.rows_dropped,
                 "rows_train": len(train_rows), "rows_val": len(val_rows)},
        "columns": columns,
        "normalization": {name: getattr(model, name).tolist() for name in ("x_loc", "x_scale", "y_loc", "y_scale")},
        "model": {"class": type(model).__name__, "config": model.config, "covariance": covariance},
        "physics": None if physics is None else {"spec": args.physics, "weight": weight,
                                                 "warmup_epochs": args.physics_warmup},
        "training": {"epochs": args.epochs, "epochs_completed": result.epochs_completed, "stopped": result.stopped,
                     "batch_size": min(args.batch_size, len(train_rows)), "lr": args.lr, "seed": args.seed,
                     "best_epoch": result.best_epoch, "monitor": result.monitor,
                     "best_metric": _finite_or_none(result.best_metric),
                     "last_train_nll": _finite_or_none(last.get("train_data")),
                     "last_val_nll": _finite_or_none(last.get("val_data")), "seconds": seconds},
        "versions": {"physmdn": __version__, "torch": str(torch.__version__)},
    }
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    written = ["model.pt", "history.csv", "summary.json"]
    if not args.no_plots:
        if plot_history(result.history, os.path.join(out, "history.png")):
            written.append("history.png")
        if _plot_samples(model, x, y, data, out, args.seed):
            written.append("samples.png")
    if not args.quiet:
        best = "n/a" if result.best_metric is None else f"{result.best_metric:.4g}"
        print(f"  best epoch {result.best_epoch}: {result.monitor} {best} (NLL per row); {seconds:.1f} s")
        print(f"wrote {', '.join(written)} to {out}")
    return 0


def _finite_or_none(value):
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


@torch.no_grad()
def _plot_samples(model: MDN, x: torch.Tensor, y: torch.Tensor, data: Columns, out: str, seed: int) -> bool:
    """``samples.png``: one model draw per data row at that row's context, against the data (see the module
    docstring). At most 6 outcome panels."""
    plt = _pyplot()
    if plt is None:
        return False
    generator = torch.Generator().manual_seed(seed)
    if x.shape[0] > _PLOT_ROWS:
        rows = torch.randperm(x.shape[0], generator=generator)[:_PLOT_ROWS]
        x, y = x[rows], y[rows]
    drawn = model(x).sample((1,), generator=generator)[0]
    panels = min(y.shape[1], 6)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), squeeze=False)
    for d in range(panels):
        ax = axes[0, d]
        if x.shape[1] == 1:
            ax.scatter(x[:, 0], y[:, d], s=5, c="0.55", label="data")
            ax.scatter(x[:, 0], drawn[:, d], s=5, c="tab:blue", alpha=0.6, label="model samples")
            ax.set_xlabel(data.x_names[0])
            ax.set_ylabel(data.y_names[d])
        else:
            both = torch.cat([y[:, d], drawn[:, d]]).numpy()
            bins = np.histogram_bin_edges(both, bins=40)
            ax.hist(y[:, d].numpy(), bins=bins, density=True, histtype="step", color="0.35", label="data")
            ax.hist(drawn[:, d].numpy(), bins=bins, density=True, histtype="step", color="tab:blue",
                    label="model samples")
            ax.set_xlabel(data.y_names[d])
            ax.set_ylabel("density")
        ax.legend(fontsize=8)
    fig.suptitle("data and model samples at the data's contexts", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "samples.png"), dpi=110)
    plt.close(fig)
    return True


# ----- sample ----------------------------------------------------------------------------------------

def _contexts_from_values(rows: list[str], names: list[str]) -> torch.Tensor:
    values = []
    for text in rows:
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != len(names):
            raise CLIError(f"--x must give {len(names)} comma-separated value(s) (context columns "
                           f"{', '.join(names)}), got {len(parts)} in {text!r}")
        try:
            row = [float(p) for p in parts]
        except ValueError:
            raise CLIError(f"--x must be numbers, got {text!r}") from None
        if not all(math.isfinite(v) for v in row):
            raise CLIError(f"--x must be finite numbers, got {text!r}")
        values.append(row)
    return torch.tensor(values, dtype=torch.float64)


def cmd_sample(args) -> int:
    if (args.x is None) == (args.x_file is None):
        raise CLIError("give the contexts with either --x (values) or --x-file (a data file), not "
                       + ("both" if args.x is not None else "neither"))
    if args.x_cols is not None and args.x_file is None:
        raise CLIError("--x-cols selects columns of --x-file; give --x-file too")
    if not args.out.lower().endswith(".csv"):
        raise CLIError(f"--out must be a .csv file, got {args.out!r}")
    try:
        checkpoint = load_checkpoint(args.checkpoint)
        model = load(args.checkpoint)
    except FileNotFoundError:
        raise CLIError(f"checkpoint {args.checkpoint!r} does not exist") from None
    except (CheckpointError, ValueError, TypeError) as exc:
        raise CLIError(f"checkpoint {args.checkpoint!r} cannot be used: {exc}") from None
    columns = checkpoint.get("columns") or {}
    x_names = list(columns.get("x") or [f"x{i}" for i in range(model.in_features)])
    y_names = list(columns.get("y") or [f"y{j}" for j in range(model.out_features)])
    if args.x is not None:
        context = _contexts_from_values(args.x, x_names)
    else:
        spec = args.x_cols or columns.get("x_spec") or ",".join(x_names)
        data = _read(args.x_file, spec, None, args.drop_nan, 1, x_option="--x-cols")
        if data.x.shape[1] != model.in_features:
            raise CLIError(f"--x-cols must select {model.in_features} column(s) of {args.x_file!r} (the model's "
                           f"context columns {', '.join(x_names)}), got {data.x.shape[1]}: {', '.join(data.x_names)}")
        context = data.x
    torch.manual_seed(args.seed)
    model = model.to(args.device)
    inputs = context.to(device=args.device, dtype=model.x_loc.dtype)
    with torch.no_grad():
        if isinstance(model, CFM):
            draws = model.sample(inputs, args.n)
        else:
            draws = model(inputs).sample((args.n,))
    draws = draws.double().cpu()  # [n, B, D]
    folder = os.path.dirname(os.path.abspath(args.out))
    try:
        os.makedirs(folder, exist_ok=True)
        with open(args.out, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["context", *x_names, *y_names])
            for b in range(context.shape[0]):
                xs = [format(v, ".9g") for v in context[b].tolist()]
                for s in range(args.n):
                    writer.writerow([b, *xs, *(format(v, ".9g") for v in draws[s, b].tolist())])
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise CLIError(f"--out must be a writable file, got {args.out!r} ({reason})") from None
    if not args.quiet:
        print(f"wrote {args.n} sample(s) for each of {context.shape[0]} context(s) "
              f"({context.shape[0] * args.n} rows: context, {', '.join(x_names + y_names)}) to {args.out}")
    return 0


# ----- parsers ---------------------------------------------------------------------------------------

def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


_FIT_DESCRIPTION = f"""\
Train an MDN on columns of a data file and write model.pt, history.csv, summary.json and plots into --out.

Columns (--x, --y): comma-separated header names, 0-based indices or start:stop ranges, e.g. --x r,T --y 2:5
(a CSV without a header row has columns named 0, 1, ...). npz / pt files: array names, optionally with columns,
e.g. --x "inputs[0,2]" --y outputs; a .pt file holds a dict of tensors or an (x, y) tuple (arrays x and y).

--physics module:name or path/to/file.py:name names a physmdn.physics spec, a list of specs or (spec, weight)
pairs, or a function f(x_batch) -> spec called for each batch of contexts.

Bad files, unknown or non-numeric columns, NaN / inf values (unless --drop-nan) and fewer than {MIN_ROWS} rows exit with
status 2."""

_SAMPLE_DESCRIPTION = """\
Draw --n samples per context from a trained model and write them as CSV: context (row index), the context
columns and the outcome columns, under the names used in training.

Contexts: --x 0.5,300 (one row per --x, values in the order of the training's context columns; a leading minus
needs --x=-0.5,300) or --x-file FILE (columns selected by --x-cols, default the training's)."""


def add_data_commands(sub) -> None:
    """Register ``fit`` and ``sample`` on the CLI's subparsers."""
    p = sub.add_parser("fit", help="train an MDN on columns of a CSV / npz / pt file", description=_FIT_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a .csv, .tsv, .npz, .pt or .pth file")
    p.add_argument("--x", required=True, metavar="COLS", help="context columns (see above)")
    p.add_argument("--y", required=True, metavar="COLS", help="outcome columns (see above)")
    p.add_argument("--components", type=positive_int, default=3, help="mixture components K (default: 3)")
    p.add_argument("--covariance", default="diag",
                   help="component covariance: diag, full (a Cholesky factor per component, D <= 32) or lowrank "
                        "(W W^T + diagonal, with --rank R from 1 to 8)")
    p.add_argument("--rank", type=positive_int, default=None, help="rank R of the low-rank covariance factor")
    p.add_argument("--hidden", type=hidden, default=(64, 64), help="hidden widths (default: 64,64)")
    p.add_argument("--physics", default=None, metavar="SPEC", help="module:name or file.py:name of a physics spec, a list of them, "
                                                  "or a function f(x) -> spec")
    p.add_argument("--physics-weight", type=nonneg_float, default=None, help="physics weight (default: 1)")
    p.add_argument("--physics-warmup", type=positive_int, default=None,
                   help="reach the physics weight linearly over this many epochs")
    p.add_argument("--epochs", type=positive_int, default=100, help="training epochs (default: 100)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="batch size (default: 256)")
    p.add_argument("--lr", type=positive_float, default=3e-3, help="learning rate (default: 0.003)")
    p.add_argument("--val-fraction", type=_fraction, default=0.2,
                   help="rows held out for validation and the best-epoch choice (default: 0.2; 0: none)")
    p.add_argument("--patience", type=positive_int, default=None, help="early stopping after this many epochs "
                                                                      "without improvement (default: off)")
    p.add_argument("--drop-nan", action="store_true", help="drop rows with NaN / inf in a selected column")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--device", type=device, default=torch.device("cpu"), help="torch device (default: cpu)")
    p.add_argument("--out", default=None, help="output directory (default: runs/fit-<file stem>)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=cmd_fit)

    s = sub.add_parser("sample", help="draw samples from a trained model at given contexts",
                       description=_SAMPLE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("checkpoint", help="a checkpoint (model.pt from physmdn fit, or best.pt / last.pt)")
    s.add_argument("--x", action="append", default=None, metavar="VALUES",
                   help="one context as comma-separated values, in the model's context columns; repeat for more "
                        "(a leading minus needs the = form: --x=-0.5,1)")
    s.add_argument("--x-file", default=None, metavar="FILE", help="contexts from a data file (.csv, .tsv, .npz, .pt)")
    s.add_argument("--x-cols", default=None, metavar="COLS", help="the --x-file columns (default: the training columns)")
    s.add_argument("--drop-nan", action="store_true", help="skip --x-file rows with NaN / inf")
    s.add_argument("--n", type=positive_int, default=100, help="samples per context (default: 100)")
    s.add_argument("--out", default="samples.csv", help="output CSV (default: samples.csv)")
    s.add_argument("--seed", type=nonneg_int, default=0)
    s.add_argument("--device", type=device, default=torch.device("cpu"), help="torch device (default: cpu)")
    s.add_argument("--threads", type=positive_int, default=None, help="torch intra-op CPU threads")
    s.add_argument("--quiet", action="store_true", help="no summary line")
    s.set_defaults(func=cmd_sample)

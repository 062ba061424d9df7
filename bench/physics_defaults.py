"""Which penalty moment and weight coupling to default to: paired seeds on every shipped problem.

For each problem, training size and seed, every variant trains on the same data with the same optimizer budget
(``--steps`` Adam steps: one batch per epoch at these sizes, the best validation NLL restored) and is scored on the
same held-out contexts and truth samples:

* ``mdn``                 no physics
* ``second-coupled``      E||r||^2, the penalty's gradient reaching the mixture weights
* ``second-detached``     E||r||^2, pi a constant of the penalty
* ``first-detached``      ||E r||^2, pi a constant of the penalty
* ``first-coupled``       ||E r||^2, coupled
* ``hard-law``            the problem's hard linear law built into the model (``ConstrainedMDN``), no penalty

Prints, per problem and size, the mean of each metric and the paired difference against ``mdn`` with a 95 %
t-interval over seeds; writes every run to ``bench/out/physics_defaults.csv``.

    python bench/physics_defaults.py --problems pitchfork,hugoniot --sizes 64,256 --seeds 5 --steps 600
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import statistics
import subprocess
import time

import torch

import physmdn
from physmdn import cli
from physmdn import problems as P

VARIANTS = {
    "mdn": None,
    "second-coupled": ("second", "coupled"),
    "second-detached": ("second", None),
    "first-detached": ("first", None),
    "first-coupled": ("first", "coupled"),
    "hard-law": "law",  # ConstrainedMDN (problems with a hard linear law): the law built in, no penalty
}
METRICS = ("energy", "mode_weight_error", "residual_model", "nll")
# two-sided 95 % Student t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def variant_problem(name: str, variant: str):
    spec = VARIANTS[variant]
    if spec is None or spec == "law":
        return P.get(name)
    moment, coupling = spec
    problem = P.get(name, physics_mode=moment)
    if coupling is not None:
        physics = problem.physics

        def coupled(context, components=None):
            items = physics(context, components)
            for item in items:
                (item[0] if isinstance(item, tuple) else item).coupling = coupling
            return items

        problem.physics = coupled
    return problem


def interval(values):
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, math.nan
    return mean, T95.get(n - 1, 1.96) * statistics.stdev(values) / math.sqrt(n)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default=",".join(P.names()))
    ap.add_argument("--sizes", default="64,256")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=600, help="Adam steps (epochs of one batch) for every model")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--n-test-contexts", type=int, default=16)
    ap.add_argument("--n-samples", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "physics_defaults.csv"))
    ap.add_argument("--report", nargs="+", metavar="CSV", help="print the tables of earlier runs' CSV files, no training")
    args = ap.parse_args()
    if args.report:
        rows = []
        for path in args.report:
            with open(path) as f:
                for r in csv.DictReader(f):
                    rows.append({**r, "n_train": int(r["n_train"]), "seed": int(r["seed"]),
                                 **{m: float(r[m]) for m in METRICS}})
        for name in dict.fromkeys(r["problem"] for r in rows):
            for n in sorted({r["n_train"] for r in rows if r["problem"] == name}):
                seen = [v for v in VARIANTS if any(r["variant"] == v and r["problem"] == name for r in rows)]
                report(rows, name, n, seen)
        return
    torch.set_num_threads(args.threads)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    variants = args.variants.split(",")
    rows = []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# physics defaults: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"physmdn {physmdn.__version__} ({commit}), {args.steps} steps, {args.seeds} seeds")
    for name in args.problems.split(","):
        for n in (int(s) for s in args.sizes.split(",")):
            for seed in range(args.seeds):
                truth = None
                for variant in variants:
                    problem = variant_problem(name, variant)
                    start = time.perf_counter()
                    kind = {"mdn": "mdn", "hard-law": "mdn-law"}.get(variant, "mdn-physics")
                    out = cli.run_experiment(problem, kind, n_train=n,
                                             epochs=args.steps, seed=seed, batch_size=n,
                                             n_test_contexts=args.n_test_contexts, n_samples=args.n_samples,
                                             truth=truth, normalize=None, oracle=True, warmup=0.25)  # as measured
                    truth = (out["contexts"], out["truth"])
                    row = {"problem": name, "n_train": n, "seed": seed, "variant": variant,
                           **{m: out["metrics"].get(m, math.nan) for m in METRICS},
                           "seconds": round(time.perf_counter() - start, 2)}
                    rows.append(row)
                    print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in row.items()), flush=True)
                    with open(args.out, "w", newline="") as f:
                        w = csv.DictWriter(f, fieldnames=list(rows[0]))
                        w.writeheader()
                        w.writerows(rows)
            report(rows, name, n, variants)


def report(rows, name, n, variants):
    print(f"\n### {name}, n = {n} (mean; paired difference to mdn with 95 % interval)\n")
    print("| variant | " + " | ".join(METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    base = {r["seed"]: r for r in rows if r["problem"] == name and r["n_train"] == n and r["variant"] == "mdn"}
    for variant in variants:
        mine = [r for r in rows if r["problem"] == name and r["n_train"] == n and r["variant"] == variant]
        if not mine:
            continue
        cells = []
        for m in METRICS:
            mean, _ = interval([r[m] for r in mine])
            if variant == "mdn" or not base:
                cells.append(f"{mean:.4g}")
                continue
            d, half = interval([r[m] - base[r["seed"]][m] for r in mine if r["seed"] in base])
            cells.append(f"{mean:.4g} ({d:+.3g} ± {half:.2g})")
        print(f"| {variant} ({len(mine)} seeds) | " + " | ".join(cells) + " |")
    print(flush=True)


if __name__ == "__main__":
    main()

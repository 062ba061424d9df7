"""Stationary-law prior on truly stochastic data: plain MDN, MDN + the steady-state residual penalty, MDN + the
generator-identity penalty (:class:`physmdn.stationary.StationaryLaw`), on ``stochastic_allen_cahn``.

Every variant is trained by :func:`physmdn.experiments.run_experiment` with the same data per seed (paired), the
same optimizer budget (epochs, batch size, learning rate, the physics weight warmed up over the first quarter of the
epochs, best-validation-NLL weights restored) and is evaluated on the same held-out contexts and truth draws:

* ``energy``: conditional energy distance to held-out truth (physmdn.metrics), ``nll`` of the truth draws;
* ``mode_weight_error``: total variation between the branch weights (all > 0, all < 0, mixed) of model and truth;
* ``identity``: the generator-identity violation of the learned mixture, ``mean_b mean_t (E_mix[A phi_t] / s^2)^2``
  over the ``"neighbours"`` test functions, in closed form (the truth's Monte Carlo value is printed beside it).

Prints per-size tables of paired differences against the plain MDN (mean and 95 % t-interval over seeds) and
writes the raw rows to ``bench/out/stationary_prior.csv`` (ignored by git).

    OMP_NUM_THREADS=1 PYTHONPATH=python python bench/stationary_prior.py --sizes 32,64,256 --seeds 8
    OMP_NUM_THREADS=1 PYTHONPATH=python python bench/stationary_prior.py --quick   # a smoke run, seconds
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import time

import torch

from physmdn import problems as P
from physmdn.experiments import run_experiment

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
VARIANTS = ("mdn", "steady", "stationary")
METRICS = ("energy", "nll", "mode_weight_error", "identity")

# two-sided 97.5 % quantiles of Student's t by degrees of freedom (scipy is not a dependency)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 29: 2.045}


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    quantile = T975.get(n - 1) or T975[max(k for k in T975 if k <= n - 1)]
    return mean, quantile * sd / math.sqrt(n)


def identity_violation(problem, model, contexts) -> float:
    """The closed-form generator-identity penalty of the model's mixture, averaged over ``contexts``."""
    law = problem.stationary_law(contexts.double())
    with torch.no_grad():
        mixture = model(contexts)
        return float(law.mixture_penalty(mixture.logits.double(), mixture.means.double(),
                                         mixture.log_scales.double()).mean())


def run_variant(variant, n, seed, args, truth) -> dict:
    problem = P.StochasticAllenCahn(penalty="steady" if variant == "steady" else "stationary")
    weight = {"mdn": 0.0, "steady": args.steady_weight, "stationary": args.stationary_weight}[variant]
    start = time.perf_counter()
    result = run_experiment(problem, "mdn" if variant == "mdn" else "mdn-physics", n_train=n, epochs=args.epochs,
                            seed=seed, truth=truth, physics_weight=weight, hidden=args.hidden,
                            components=args.components, normalize=None, warmup=0.25)  # the raw weights these results used
    metrics = result["metrics"]
    return {"variant": variant, "n_train": n, "seed": seed, "physics_weight": weight, "energy": metrics["energy"],
            "nll": metrics["nll"], "mode_weight_error": metrics["mode_weight_error"],
            "identity": identity_violation(problem, result["model"], truth[0]),
            "seconds": time.perf_counter() - start}


def report(rows, sizes, seeds) -> None:
    by_key = {(r["variant"], r["n_train"], r["seed"]): r for r in rows}
    for n in sizes:
        print(f"\n### n_train = {n} ({len(seeds)} paired seeds)\n")
        print("| variant | " + " | ".join(METRICS) + " | " + " | ".join(f"{m} - mdn (95 % CI)" for m in METRICS) + " |")
        print("|---" * (1 + 2 * len(METRICS)) + "|")
        for variant in VARIANTS:
            cells = []
            for m in METRICS:
                mean, half = t_interval([by_key[(variant, n, s)][m] for s in seeds])
                cells.append(f"{mean:.4g} ± {half:.2g}")
            for m in METRICS:
                if variant == "mdn":
                    cells.append("")
                    continue
                mean, half = t_interval([by_key[(variant, n, s)][m] - by_key[("mdn", n, s)][m] for s in seeds])
                cells.append(f"{mean:+.4g} ± {half:.2g}")
            print(f"| {variant} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="32,64,256")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--components", type=int, default=6)
    parser.add_argument("--hidden", default="64,64")
    parser.add_argument("--stationary-weight", type=float, default=1.0)
    parser.add_argument("--steady-weight", type=float, default=1.0)
    parser.add_argument("--test-contexts", type=int, default=16)
    parser.add_argument("--truth-samples", type=int, default=400)
    parser.add_argument("--csv", default=os.path.join(OUT, "stationary_prior.csv"))
    parser.add_argument("--quick", action="store_true", help="one size, two seeds, few epochs: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.seeds, args.epochs, args.test_contexts, args.truth_samples = "32", 2, 5, 4, 100
    sizes = [int(v) for v in args.sizes.split(",")]
    seeds = list(range(args.seeds))
    args.hidden = tuple(int(v) for v in args.hidden.split(","))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    problem = P.StochasticAllenCahn()
    contexts = problem.sample_contexts(args.test_contexts, seed=30_000)
    truth_samples = problem.sample_truth(contexts, args.truth_samples, seed=40_000)
    law = problem.stationary_law(contexts.double())
    truth_identity = float(law.sample_terms(truth_samples.double()).square().mean())
    print(f"stochastic_allen_cahn, grid {problem.grid}; {args.test_contexts} held-out contexts x "
          f"{args.truth_samples} truth draws; identity violation of the truth draws (Monte Carlo floor): "
          f"{truth_identity:.4g}")
    print(f"epochs {args.epochs}, K = {args.components}, hidden {args.hidden}, weights: steady "
          f"{args.steady_weight}, stationary {args.stationary_weight}; torch threads {torch.get_num_threads()}")

    rows = []
    start = time.perf_counter()
    for n in sizes:
        for seed in seeds:
            for variant in VARIANTS:
                rows.append(run_variant(variant, n, seed, args, (contexts, truth_samples)))
    report(rows, sizes, seeds)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    with open(args.csv, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()

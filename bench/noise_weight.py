"""Does one physics weight work on every problem once the penalties are divided by their noise floor?

For each problem, training size and paired seed, the plain MDN and ``mdn-physics`` at each weight of ``--weights``
(``normalize="noise"``, no regime labels or component-specific laws) train on the same data with early stopping on
the same validation draws (at most ``--epochs`` epochs) and are scored on the same held-out contexts and truth.
Prints, per problem and weight, the paired difference to the plain MDN of the energy distance and the mode-weight
error (95 % t-interval over seeds) and the ratio of the samples' mean residual; writes the runs to
``bench/out/noise_weight.csv``.

    OMP_NUM_THREADS=1 python bench/noise_weight.py --problems pitchfork,hugoniot,reaction_diffusion,allen_cahn \\
        --sizes 64 --seeds 3 --weights 0.1,1,10 --epochs 500
"""

from __future__ import annotations

import argparse
import csv
import os

import torch

from physmdn import experiments as E
from physmdn import problems as P


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default="pitchfork,hugoniot,reaction_diffusion,allen_cahn")
    ap.add_argument("--sizes", default="64")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--weights", default="0.1,1,10")
    ap.add_argument("--epochs", type=int, default=500)
    ap.add_argument("--n-test-contexts", type=int, default=32)
    ap.add_argument("--n-samples", type=int, default=400)
    ap.add_argument("--out", default=os.path.join("bench", "out", "noise_weight.csv"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    weights = [float(w) for w in args.weights.split(",")]
    rows = []
    for name in args.problems.split(","):
        problem = P.get(name)
        contexts = problem.sample_contexts(args.n_test_contexts, seed=30_000)
        truth = (contexts, problem.sample_truth(contexts, args.n_samples, seed=40_000))
        for n in (int(v) for v in args.sizes.split(",")):
            for seed in range(args.seeds):
                runs = [("mdn", "mdn", None)] + [(f"physics@{w:g}", "mdn-physics", w) for w in weights]
                for label, kind, weight in runs:
                    result = E.run_experiment(problem, kind, n_train=n, epochs=args.epochs, seed=seed, truth=truth,
                                              physics_weight=weight)
                    m = result["metrics"]
                    rows.append({"problem": name, "model": label, "n_train": n, "seed": seed, "energy": m["energy"],
                                 "mode_weight_error": m["mode_weight_error"], "residual_model": m["residual_model"],
                                 "nll": m["nll"], "epochs_completed": result["timing"]["epochs_completed"]})
                    print(f"{name} n={n} seed={seed} {label}: energy {m['energy']:.4g} residual "
                          f"{m['residual_model']:.4g} epochs {result['timing']['epochs_completed']}", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("\n| problem | n | weight | Δ energy vs MDN | Δ mode-weight error | residual ratio |\n|---|---|---|---|---|---|")
    for name in args.problems.split(","):
        mine = [r for r in rows if r["problem"] == name]
        paired = E.paired_differences(mine, metrics=("energy", "mode_weight_error", "residual_model"),
                                      references=("mdn",))
        for p in (p for p in paired if p["metric"] == "energy"):
            other = {q["metric"]: q for q in paired if q["model"] == p["model"] and q["n_train"] == p["n_train"]}
            mw, res = other["mode_weight_error"], other["residual_model"]
            print(f"| {name} | {p['n_train']} | {p['model'].split('@')[1]} | {p['difference']:+.3g} ± "
                  f"{p['half_width']:.2g} | {mw['difference']:+.3g} ± {mw['half_width']:.2g} | {res['ratio']:.3g} |")


if __name__ == "__main__":
    main()

"""Pitchfork ablation of the physics penalty (and a small, symmetric tuning of MDN+physics and CFM).

Variants (all trained by :func:`physmdn.cli.run_experiment`, same data, held-out contexts and truth per seed):

* ``mdn``            plain MDN (NLL only)
* ``exact-nonoise``  (a) exact E[r^2] over each component, *not* noise-aware (noise_scale = 0) + stability prior
* ``exact-noise``    (b) exact, noise-aware (noise_scale = observation noise; the default) + stability prior
* ``mean``           (c) point penalty at the component means (mode="mean") + stability prior
* ``exact-noise-nostab`` (d) exact, noise-aware, without the stability prior
* ``cfm``            conditional flow matching

Tuning (``--tune``): MDN+physics (b) with physics weight in ``--weights``; CFM with epochs x ODE steps in
``--cfm-epochs`` x ``--cfm-steps``. Best-of-grid is picked per n on test energy for *both* families (oracle
selection, applied symmetrically), and every grid point is printed.

Prints markdown tables (mean ± std over seeds) and writes raw rows to ``--csv``.

    python bench/ablation_physics.py --sizes 32,128,512 --seeds 3 --epochs 150 --threads 1 --ablate [--physics-weight 10]
    python bench/ablation_physics.py --sizes 32,128,512 --seeds 3 --epochs 150 --threads 1 --tune
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import time

import torch

from physmdn import cli
from physmdn import problems as P


class PitchforkNoiseScale(P.Pitchfork):
    """Pitchfork whose equilibrium spec uses ``physics_noise_scale`` instead of the observation noise."""

    def __init__(self, physics_noise_scale: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.physics_noise_scale = float(physics_noise_scale)

    def physics(self, context, components=None):
        specs = super().physics(context, components)
        (spec, w_eq), rest = specs[0], specs[1:]
        spec.noise_scale = self.physics_noise_scale
        return [(spec, w_eq), *rest]


def variant_problem(name: str):
    if name == "exact-nonoise":
        return PitchforkNoiseScale(physics_noise_scale=0.0)
    if name == "mean":
        return P.Pitchfork(physics_mode="mean")
    if name == "exact-noise-nostab":
        return P.Pitchfork(physics_weights={"stability": 0.0})
    return P.Pitchfork()


def mean_scale(model, contexts) -> float:
    """Mixture-weight-averaged component scale over the held-out contexts."""
    with torch.no_grad():
        mix = model(contexts)
        w = mix.weights  # [B, K]
        s = mix.scales[..., 0]  # [B, K]
        return float((w * s).sum(-1).mean())


def run(problem, kind, n, seed, epochs, truth, **kw) -> dict:
    # the raw weights and oracle inputs of the results in docs/results.md §2
    res = cli.run_experiment(problem, kind, n_train=n, epochs=epochs, seed=seed, truth=truth,
                             **{"normalize": None, "oracle": True, "warmup": 0.25, **kw})
    m = res["metrics"]
    row = {"n_train": n, "seed": seed, "energy": m["energy"], "mode_weight_error": m["mode_weight_error"],
           "residual_eq": m.get("residual_model_equilibrium", math.nan),
           "residual_stab": m.get("residual_model_stability", math.nan), "nll": m.get("nll", math.nan),
           "sample_10k_s": res["timing"]["sample_10k_s"], "train_s": res["timing"]["train_s"]}
    row["mean_scale"] = mean_scale(res["model"], truth[0]) if kind != "cfm" else math.nan
    return row


def table(rows, title, keys):
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["n_train"], r["variant"]), []).append(r)
    out = [f"### {title}", "", "| n_train | variant | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for (n, v), g in groups.items():
        cells = []
        for k in keys:
            vals = [r[k] for r in g if r[k] is not None and math.isfinite(r[k])]
            if not vals:
                cells.append("n/a")
                continue
            mu = sum(vals) / len(vals)
            sd = math.sqrt(sum((x - mu) ** 2 for x in vals) / max(len(vals) - 1, 1))
            cells.append(f"{mu:.4g} ± {sd:.2g}")
        out.append(f"| {n} | {v} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="32,128,512")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--ablate", action="store_true")
    ap.add_argument("--weights", default="0.1,1,10,100")
    ap.add_argument("--physics-weight", type=float, default=1.0, help="physics weight of the --ablate variants")
    ap.add_argument("--cfm-epochs", default="150,400")
    ap.add_argument("--cfm-steps", default="32,100")
    ap.add_argument("--csv", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "ablation_physics.csv"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    base = P.Pitchfork()
    contexts = base.sample_contexts(32, seed=30_000)
    truth = (contexts, base.sample_truth(contexts, 400, seed=40_000))
    print(f"# pitchfork ablation: noise={base.noise}, epochs={args.epochs}, seeds={args.seeds}, "
          f"threads={args.threads}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    keys = ["energy", "mode_weight_error", "residual_eq", "residual_stab", "mean_scale", "nll"]
    all_rows = []
    if args.ablate:
        rows = []
        for n in sizes:
            for seed in range(args.seeds):
                for v in ("mdn", "exact-nonoise", "exact-noise", "mean", "exact-noise-nostab", "cfm"):
                    kind = "mdn" if v == "mdn" else ("cfm" if v == "cfm" else "mdn-physics")
                    row = run(variant_problem(v), kind, n, seed, args.epochs, truth,
                              physics_weight=args.physics_weight)
                    row["variant"] = v
                    rows.append(row)
        print(table(rows, f"Ablation (physics weight {args.physics_weight:g}, {args.epochs} epochs, CFM 32 steps)", keys))
        all_rows += rows
    if args.tune:
        rows = []
        weights = [float(w) for w in args.weights.split(",")]
        for n in sizes:
            for seed in range(args.seeds):
                row = run(base, "mdn", n, seed, args.epochs, truth)
                row["variant"], row["family"] = "mdn", "mdn"
                rows.append(row)
                for w in weights:
                    row = run(base, "mdn-physics", n, seed, args.epochs, truth, physics_weight=w)
                    row["variant"], row["family"] = f"mdn-physics w={w:g}", "mdn-physics"
                    rows.append(row)
                for e in [int(x) for x in args.cfm_epochs.split(",")]:
                    for st in [int(x) for x in args.cfm_steps.split(",")]:
                        row = run(base, "cfm", n, seed, e, truth, cfm_steps=st)
                        row["variant"], row["family"] = f"cfm epochs={e} steps={st}", "cfm"
                        rows.append(row)
        print(table(rows, "Tuning grid (all points)", keys + ["train_s", "sample_10k_s"]))
        # best-of-grid per (n, family) on mean test energy
        best = []
        for n in sizes:
            for fam in ("mdn", "mdn-physics", "cfm"):
                cands: dict = {}
                for r in rows:
                    if r["n_train"] == n and r["family"] == fam:
                        cands.setdefault(r["variant"], []).append(r)
                v, g = min(cands.items(), key=lambda kv: sum(r["energy"] for r in kv[1]) / len(kv[1]))
                best += [{**r, "variant": f"best {fam}: {v}"} for r in g]
        print(table(best, "Tuned (best grid point per family and n, by mean test energy)", keys))
        all_rows += rows
    fields = []
    for r in all_rows:
        fields += [k for k in r if k not in fields]
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    with open(args.csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(all_rows)


if __name__ == "__main__":
    main()

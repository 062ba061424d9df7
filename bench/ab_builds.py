"""A/B of two physmdn builds (e.g. before and after a change to the extension): each build runs in its own child
process (two builds cannot share one: both register ``torch.ops.physmdn``), alternated over rounds so that a change
in background load hits both alike. Per batch size it times forward + backward of ``mixture_nll`` (``.sum()`` and
``reduction="mean"``) and of the fused ``mdn_loss`` with a polynomial law, and prints medians, the spread over
rounds and the ratio B / A.

    python bench/ab_builds.py --a /path/to/old/python --b /path/to/new/python [--B 65536,1024] [--rounds 3]

``--a`` / ``--b``: a folder holding the ``physmdn`` package to import (its ``python/`` source folder with the built
extension copied in, or a site-packages). Writes nothing unless ``--out`` names a CSV file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
import torch
import physmdn
from physmdn import physics as P

def median_ms(fn, repeat, warmup=20):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[len(times) // 2]

out = {}
K, D = 8, 4
for B in [int(b) for b in sys.argv[1].split(",")]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, K, generator=g).requires_grad_()
    means = torch.randn(B, K, D, generator=g).requires_grad_()
    log_scales = (0.3 * torch.randn(B, K, D, generator=g) - 0.5).requires_grad_()
    target = torch.randn(B, D, generator=g)
    diff = [logits, means, log_scales]
    law = P.Polynomial(torch.tensor([0.0, 1.0, 0.0, -1.0]), moment="second")
    repeat = 40 if B >= 16384 else 400
    out[B] = {
        "nll fwd+bwd sum": median_ms(lambda: torch.autograd.grad(physmdn.mixture_nll(logits, means, log_scales, target).sum(), diff), repeat),
        "nll fwd+bwd mean": median_ms(lambda: torch.autograd.grad(physmdn.mixture_nll(logits, means, log_scales, target, reduction="mean"), diff), repeat),
        "mdn_loss fwd+bwd": median_ms(lambda: torch.autograd.grad(physmdn.mdn_loss(logits, means, log_scales, target, physics=law, reduction="mean"), diff), repeat),
    }
print(json.dumps({"torch": torch.__version__, "build": physmdn.build_info().get("torch_minimum", "exact"), "times": out}))
"""


def run_child(path: str, sizes: str) -> dict:
    env = dict(os.environ, PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-c", CHILD, sizes], env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True, help="folder with the A build's physmdn package")
    p.add_argument("--b", required=True, help="folder with the B build's physmdn package")
    p.add_argument("--B", default="65536,1024", help="comma-separated batch sizes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, help="CSV file to write the table to")
    args = p.parse_args(argv)
    runs = {"A": [], "B": []}
    for _ in range(args.rounds):
        for name, path in (("A", args.a), ("B", args.b)):
            runs[name].append(run_child(path, args.B))
    rows = []
    for B in runs["A"][0]["times"]:
        for stage in runs["A"][0]["times"][B]:
            a = [r["times"][B][stage] for r in runs["A"]]
            b = [r["times"][B][stage] for r in runs["B"]]
            rows.append({"B": B, "stage": stage, "A_ms": statistics.median(a), "A_min": min(a), "A_max": max(a),
                         "B_ms": statistics.median(b), "B_min": min(b), "B_max": max(b),
                         "B_over_A": statistics.median(b) / statistics.median(a)})
    print(f"A: {args.a} (build {runs['A'][0]['build']}), B: {args.b} (build {runs['B'][0]['build']}), "
          f"torch {runs['A'][0]['torch']}, {args.rounds} rounds, medians of per-round medians (min-max), K=8 D=4")
    print(f"{'B':>7} {'stage':<18} {'A ms':>22} {'B ms':>22} {'B/A':>6}")
    for r in rows:
        print(f"{r['B']:>7} {r['stage']:<18} {r['A_ms']:8.3f} ({r['A_min']:.3f}-{r['A_max']:.3f}) "
              f"{r['B_ms']:8.3f} ({r['B_min']:.3f}-{r['B_max']:.3f}) {r['B_over_A']:6.3f}")
    if args.out:
        import csv

        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()

"""Paired (same seed, same data) energy-distance differences from ``physmdn compare`` results:
``mdn-physics - mdn`` and ``mdn-physics - cfm`` per training size, with the per-seed values.

    python bench/paired_energy.py runs/compare_pitchfork runs/compare_hugoniot ...
"""
import csv
import os
import sys

print("| run | n_train | physics - mdn (per seed) | physics < mdn in | physics - cfm (per seed) | physics < cfm in |")
print("|---|---|---|---|---|---|")
for d in sys.argv[1:]:
    rows = list(csv.DictReader(open(os.path.join(d, "results.csv"))))
    e = {(r["model"], int(r["n_train"]), int(r["seed"])): float(r["energy"]) for r in rows}
    for n in sorted({k[1] for k in e}):
        seeds = sorted({k[2] for k in e if k[1] == n})
        dm = [e[("mdn-physics", n, s)] - e[("mdn", n, s)] for s in seeds if ("mdn", n, s) in e]
        dc = [e[("mdn-physics", n, s)] - e[("cfm", n, s)] for s in seeds if ("cfm", n, s) in e]
        print(f"| {os.path.basename(d)} | {n} | {', '.join(f'{x:+.3g}' for x in dm)} | {sum(x < 0 for x in dm)}/{len(dm)} "
              f"| {', '.join(f'{x:+.3g}' for x in dc)} | {sum(x < 0 for x in dc)}/{len(dc)} |")

"""The README's results table from ``physmdn compare`` output folders: per problem and training size, the plain
MDN's energy distance and ``mdn-physics`` minus the plain MDN and minus the better CFM (``cfm`` or ``torchcfm``,
whichever has the lower mean energy at that size), paired over seeds with a 95 % t-interval, the ratio of the
samples' mean residual (physics / plain MDN), and the ratio of their excess residual over the ground truth's own
(``(physics - truth) / (MDN - truth)``, means over seeds: noisy data have a residual of their own, which a model of
them should match, not undercut).

    python bench/honest_report.py runs/honest-pitchfork runs/honest-hugoniot ...
"""

from __future__ import annotations

import csv
import math
import os
import sys

from physmdn import experiments as E


def _rows(folder: str) -> list[dict]:
    out = []
    with open(os.path.join(folder, "results.csv")) as fh:
        for row in csv.DictReader(fh):
            parsed = {}
            for key, value in row.items():
                try:
                    parsed[key] = int(value) if key in ("n_train", "seed") else float(value)
                except ValueError:  # text, or an empty cell (a metric of a run that diverged): None
                    parsed[key] = value if value != "" else None
            out.append(parsed)
    return out


def _cell(p: dict | None) -> str:
    if p is None:
        return "n/a"
    text = f"{p['difference']:+.3g} ± {p['half_width']:.2g}" if math.isfinite(p["half_width"]) else \
        f"{p['difference']:+.3g}"
    resolved = math.isfinite(p["half_width"]) and (p["low"] > 0 or p["high"] < 0)
    return f"**{text}**" if resolved else text


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _excess_ratio(rows: list[dict]) -> float:
    """``(physics - truth) / (MDN - truth)`` of the mean residuals over the rows' seeds."""
    truth = _mean([r["residual_truth"] for r in rows if r["model"] == "mdn"])
    model = {m: _mean([r["residual_model"] for r in rows if r["model"] == m]) for m in ("mdn", "mdn-physics")}
    return (model["mdn-physics"] - truth) / (model["mdn"] - truth)


def main(folders: list[str]) -> None:
    print("| problem | n | seeds | MDN energy | Δ energy vs MDN | Δ energy vs better CFM | Δ mode-weight error vs MDN "
          "| residual ratio vs MDN | excess residual ratio vs MDN |")
    print("|---|---|---|---|---|---|---|---|---|")
    for folder in folders:
        rows = _rows(folder)
        problem = rows[0]["problem"]
        paired = E.paired_differences(rows, metrics=("energy", "mode_weight_error", "residual_model"))
        index = {(p["n_train"], p["model"], p["reference"], p["metric"]): p for p in paired}
        for n in sorted({r["n_train"] for r in rows}):
            flows = [m for m in ("cfm", "torchcfm") if (n, "mdn-physics", m, "energy") in index]
            better = min(flows, key=lambda m: index[(n, "mdn-physics", m, "energy")]["reference_mean"], default=None)
            vs_mdn = index.get((n, "mdn-physics", "mdn", "energy"))
            if vs_mdn is None:
                continue
            vs_flow = index.get((n, "mdn-physics", better, "energy")) if better else None
            residual = index.get((n, "mdn-physics", "mdn", "residual_model"))
            excess = _excess_ratio([r for r in rows if r["n_train"] == n])
            print(f"| {problem} | {n} | {vs_mdn['seeds']} | {vs_mdn['reference_mean']:.3g} | {_cell(vs_mdn)} | "
                  f"{_cell(vs_flow)}{f' ({better})' if better else ''} | "
                  f"{_cell(index.get((n, 'mdn-physics', 'mdn', 'mode_weight_error')))} | "
                  f"{residual['ratio']:.2f} | {excess:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])

"""The table of docs/results.md's correlated-components section from ``physmdn compare --covariance diag,full,...``
output folders: per problem, training size and model (``mdn``, ``mdn-physics``), each full- or low-rank-covariance
variant minus the same model with diagonal components, paired over seeds with a 95 % t-interval, and the runs that
diverged. Folders of the same problem are read as one table, so that a variant run apart (``--covariance lowrank``
alone, with the same seeds) is paired with the diagonal rows of another folder.

    python bench/covariance_report.py runs/cov-allen_cahn runs/cov-reaction_diffusion runs/cov-hugoniot
"""

from __future__ import annotations

import os
import sys

from physmdn import experiments as E

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from honest_report import _cell, _rows  # noqa: E402

METRICS = ("energy", "residual_model", "nll", "mode_weight_error")


def main(folders: list[str]) -> None:
    print("| problem | n | model | seeds (failed) | diagonal energy | Δ energy | Δ residual | Δ NLL "
          "| Δ mode-weight error | residual ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    by_problem: dict[str, list[dict]] = {}  # folders of one problem (same seeds: same data) are paired together
    for folder in folders:
        for row in _rows(folder):
            by_problem.setdefault(row["problem"], []).append(row)
    for problem, rows in by_problem.items():
        paired = E.paired_differences(rows, metrics=METRICS, references=())
        index = {(p["n_train"], p["model"], p["metric"]): p for p in paired}
        variants = [m for m in dict.fromkeys(r["model"] for r in rows) if E.model_base(m) != m]
        for n in sorted({r["n_train"] for r in rows}):
            for model in variants:
                runs = [r for r in rows if r["model"] == model and r["n_train"] == n]
                if not runs:
                    continue
                failed = sum(1 for r in runs if isinstance(r.get("error"), str) and r["error"])
                cells = {m: index.get((n, model, m)) for m in METRICS}
                energy = cells["energy"]
                base = f"{energy['reference_mean']:.3g}" if energy else "n/a"
                ratio = cells["residual_model"]["ratio"] if cells["residual_model"] else float("nan")
                seeds = energy["seeds"] if energy else 0
                print(f"| {problem} | {n} | {model} | {seeds} ({failed}) | {base} | "
                      + " | ".join(_cell(cells[m]) for m in METRICS) + (f" | {ratio:.2f} |" if ratio == ratio else " | n/a |"))


if __name__ == "__main__":
    main(sys.argv[1:])

"""What :func:`~physmdn.training.fit` returns (:class:`FitResult`) and how its history is written to disk."""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field

from torch import nn

__all__ = ["FitResult", "write_rows_csv"]


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        model: the trained (unwrapped) model; holds the best validation epoch's weights when ``restore_best`` and
            there was validation data, else the last weights.
        history: one dict per finished epoch (``epoch``, ``step``, ``lr``, ``physics_weight``, ``train_loss``,
            ``train_data``, ``train_physics``, ``train_regime``, ``grad_norm`` (mean global gradient norm before
            clipping), ``val_*`` when validating,
            ``time_s``). ``*_data`` is the NLL (MDN) or flow-matching loss (CFM); ``*_physics`` the unweighted
            penalty (0 while the weight is 0; for an MDN derived as ``(loss - nll) / weight``, so float32
            rounding of the NLL is amplified by ``1 / weight``); ``*_loss`` the weighted total.
        best_state: CPU state dict of the best epoch by ``monitor`` (None if no epoch finished).
        best_epoch, best_metric, monitor: which epoch, its value, and the history key compared.
        stopped: ``"completed"``, ``"early_stopping"``, ``"max_steps"`` or ``"callback"``.
        global_step, epochs_completed: optimizer steps taken and epochs finished in total (resumes included).
        checkpoint_path: the last ``last.pt`` written, or None.
        extra: ``steps_per_epoch`` (None for an iterable without ``len``), ``world_size``, ``val_size`` (samples
            held out by ``val_split``), ``patience`` (the one used, None for none), ``restored_best``.
    """

    model: nn.Module
    history: list[dict]
    best_state: dict | None
    best_epoch: int | None
    best_metric: float | None
    monitor: str
    stopped: str
    global_step: int
    epochs_completed: int
    checkpoint_path: str | None = None
    extra: dict = field(default_factory=dict)

    def __repr__(self) -> str:  # the state dict and history stay out of it (they run to kilobytes)
        best = "none" if self.best_epoch is None else f"epoch {self.best_epoch} ({self.monitor} = {self.best_metric:.6g})"
        return (f"FitResult(model={type(self.model).__name__}, epochs_completed={self.epochs_completed}, "
                f"global_step={self.global_step}, stopped={self.stopped!r}, best={best}, "
                f"history=[{len(self.history)} epochs], checkpoint_path={self.checkpoint_path!r})")

    @property
    def stopped_early(self) -> bool:
        return self.stopped == "early_stopping"

    def save_history(self, path: str) -> None:
        """Write the history as CSV (``.csv``) or JSON (``.json``)."""
        write_history(self.history, path)


def write_rows_csv(path: str, rows: list[dict]) -> None:
    """Rows of dicts to CSV; the header is the union of their keys in first-seen order."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def write_history(history: list[dict], path: str) -> None:
    """Replace ``path`` (``.csv`` or ``.json``; non-finite numbers become JSON null) with ``history`` in one
    ``os.replace``, so a reader never sees a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    if path.endswith(".json"):
        clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
                 for row in history]
        with open(tmp, "w") as fh:
            json.dump(clean, fh, indent=1)
    elif path.endswith(".csv"):
        write_rows_csv(tmp, history)
    else:
        raise ValueError(f"history_path must end in .csv or .json, got {path!r}")
    os.replace(tmp, path)


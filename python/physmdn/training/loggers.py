"""Loggers of :func:`~physmdn.training.fit`: callbacks that write each epoch's metrics, on the main process only.

* :class:`CSVLogger`: ``<log_dir>/metrics.csv``, one row per epoch (the default when ``fit(log_dir=...)`` is given).
* :class:`TensorBoardLogger`: scalars for TensorBoard (needs the ``tensorboard`` package).

``fit(loggers=[...])`` takes logger objects or the names ``"csv"`` and ``"tensorboard"`` (which write under
``log_dir``); :func:`make_loggers` resolves them.
"""

from __future__ import annotations

import math
import numbers
import os

from .callbacks import FitState, check_callbacks
from .results import write_history

__all__ = ["CSVLogger", "TensorBoardLogger", "make_loggers"]


class CSVLogger:
    """Writes the history to ``<log_dir>/<filename>`` after every epoch: one row per epoch, a column per metric.

    The file is rewritten in one ``os.replace`` each epoch (never half-written); a resumed run rewrites it from the
    history restored from the checkpoint, so it holds exactly the rows of the run."""

    def __init__(self, log_dir: str, filename: str = "metrics.csv"):
        if not str(filename).endswith(".csv"):
            raise ValueError(f"filename must end in .csv, got {filename!r}")
        self.path = os.path.join(str(log_dir), filename)
        self.rows: list[dict] = []

    def on_fit_start(self, state: FitState) -> None:
        self.rows = [dict(row) for row in state.history]

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        self.rows.append(dict(metrics))
        write_history(self.rows, self.path)

    def __repr__(self) -> str:
        return f"CSVLogger({self.path!r})"


class TensorBoardLogger:
    """Scalars for TensorBoard under ``log_dir``: every numeric metric of every epoch, at the epoch's last
    optimizer step (``metrics["step"]``). Needs ``tensorboard`` (``pip install tensorboard``)."""

    def __init__(self, log_dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError("TensorBoardLogger needs the tensorboard package (pip install tensorboard); "
                              f"importing torch.utils.tensorboard failed: {exc}") from exc
        self._writer_class = SummaryWriter
        self.log_dir = str(log_dir)
        self.writer = None

    def on_fit_start(self, state: FitState) -> None:
        if self.writer is None:
            self.writer = self._writer_class(log_dir=self.log_dir)

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        step = int(metrics.get("step", epoch))
        for key, value in metrics.items():
            if key in ("epoch", "step") or not isinstance(value, numbers.Real) or not math.isfinite(value):
                continue
            self.writer.add_scalar(key, float(value), global_step=step)
        self.writer.flush()

    def on_fit_end(self, result) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __repr__(self) -> str:
        return f"TensorBoardLogger({self.log_dir!r})"


_BY_NAME = {"csv": CSVLogger, "tensorboard": TensorBoardLogger}


def make_loggers(loggers, log_dir: str | None) -> list:
    """The logger objects of ``fit(loggers=..., log_dir=...)``: None means ``[CSVLogger(log_dir)]`` when ``log_dir``
    is set, else none; names (``"csv"``, ``"tensorboard"``) become loggers writing under ``log_dir``."""
    if loggers is None:
        return [CSVLogger(log_dir)] if log_dir is not None else []
    if isinstance(loggers, str) or not isinstance(loggers, (list, tuple)):
        loggers = [loggers]
    out = []
    for item in loggers:
        if isinstance(item, str):
            if item not in _BY_NAME:
                raise ValueError(f"loggers names must be one of {sorted(_BY_NAME)}, got {item!r}")
            if log_dir is None:
                raise ValueError(f"loggers name {item!r} writes under log_dir: pass log_dir=..., got log_dir=None")
            out.append(_BY_NAME[item](log_dir))
        else:
            out.append(item)
    return check_callbacks(out, "loggers")

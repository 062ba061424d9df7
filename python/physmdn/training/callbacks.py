"""Callbacks of :func:`~physmdn.training.fit`: the :class:`Callback` protocol, the :class:`FitState` it is started
with, and how fit calls the hooks.

A callback is any object with some of the four hooks; subclassing :class:`Callback` gives no-op defaults for the
others. Loggers (:mod:`physmdn.training.loggers`) are callbacks that fit runs on the main process only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

__all__ = ["Callback", "FitState", "HOOKS", "check_callbacks"]

HOOKS = ("on_fit_start", "on_epoch_end", "on_checkpoint", "on_fit_end")


@dataclass
class FitState:
    """What :meth:`Callback.on_fit_start` receives: the run as it starts (or resumes).

    Attributes:
        model: the model being trained (unwrapped). optimizer, scheduler: the torch objects (scheduler may be None).
        device: where the model trains. epochs: epochs asked for. start_epoch, global_step: where the run starts
            (nonzero when resumed). steps_per_epoch: optimizer steps per epoch, None when the data's length is
            unknown (an iterable without ``__len__``).
        monitor: the history key that early stopping and ``best.pt`` compare. validating: whether there is
            validation data (given, or held out by ``val_split``). val_size: held-out samples (0 when ``val`` was
            given or there is none).
        world_size, rank: processes and this one's rank. history: the rows of the epochs finished so far (a resumed
            run's earlier epochs).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device
    epochs: int
    start_epoch: int
    global_step: int
    steps_per_epoch: int | None
    monitor: str
    validating: bool
    val_size: int
    world_size: int
    rank: int
    history: list[dict] = field(default_factory=list)


@runtime_checkable
class Callback(Protocol):
    """The hooks :func:`fit` calls; implement any of them (the defaults do nothing).

    * ``on_fit_start(state: FitState)``: once, before the first step (also of a resumed run).
    * ``on_epoch_end(epoch: int, metrics: dict) -> bool | None``: after every finished epoch, with that epoch's
      history row (``epoch``, ``step``, ``lr``, ``train_*``, ``val_*``, ...), after the checkpoints of the epoch are
      written. Return ``True`` to stop training (``FitResult.stopped == "callback"``). Under ``torchrun`` every
      process calls it with the same metrics, and training stops when any process asks.
    * ``on_checkpoint(path: str)``: after fit writes a checkpoint (``last.pt``, ``best.pt``), on the main process.
    * ``on_fit_end(result: FitResult)``: once, when training ends normally.
    """

    def on_fit_start(self, state: FitState) -> None:
        return None

    def on_epoch_end(self, epoch: int, metrics: dict) -> bool | None:
        return None

    def on_checkpoint(self, path: str) -> None:
        return None

    def on_fit_end(self, result) -> None:
        return None


def check_callbacks(callbacks, name: str = "callbacks") -> list:
    """``callbacks`` as a list, each with at least one hook (a ``TypeError`` naming the first that has none)."""
    if callbacks is None:
        return []
    if not isinstance(callbacks, Sequence) or isinstance(callbacks, str):
        callbacks = [callbacks]
    for i, cb in enumerate(callbacks):
        if not any(callable(getattr(cb, hook, None)) for hook in HOOKS):
            raise TypeError(f"{name}[{i}] must have at least one of the hooks {', '.join(HOOKS)}, got "
                            f"{type(cb).__name__}")
    return list(callbacks)


def call(callbacks: list, hook: str, *args) -> bool:
    """Call ``hook`` on every callback that has it; True when one returned True (a stop request)."""
    stop = False
    for cb in callbacks:
        method = getattr(cb, hook, None)
        if callable(method) and method(*args) is True:
            stop = True
    return stop

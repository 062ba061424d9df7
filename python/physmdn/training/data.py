"""The data :func:`~physmdn.training.fit` trains and validates on: in-memory tensors or arrays, or any iterable of
batches, and the validation split it holds out of in-memory training data.

* In memory: ``(x [N, C], y [N, D])``, ``(x, y, labels [N])`` (tensors or NumPy arrays) or a ``TensorDataset``.
  :class:`MemoryData` batches them by index every epoch (sharded across processes, see ``distributed``).
* Streamed: a ``DataLoader`` or any iterable of ``(x, y)`` / ``(x, y, labels)`` batches (tensors or arrays).
  :class:`StreamData` takes one pass per epoch; every batch gets the checks of in-memory data.
* :func:`split_validation`: the held-out part of in-memory training data (``val_split``), drawn from the seed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..models import MDN
from .distributed import DistContext, epoch_batches, mix_seed

__all__ = ["AUTO_VAL_FRACTION", "AUTO_VAL_MIN_SAMPLES", "NORMALIZATION_BATCHES", "as_arrays", "is_in_memory",
           "split_validation", "MemoryData", "StreamData"]

# val_split="auto": hold out 10 % of in-memory training data, but only when that gives at least 20 samples
# (N >= 200); a smaller validation set makes early stopping follow noise
AUTO_VAL_FRACTION = 0.1
AUTO_VAL_MIN_SAMPLES = 20
# normalization statistics of streamed data: from the first 64 batches of one pass (all of them if fewer)
NORMALIZATION_BATCHES = 64


def _is_array(value) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def is_in_memory(data) -> bool:
    """True for a ``TensorDataset`` or a tuple/list that starts with a tensor/array (meant as ``(x, y[, labels])``;
    :func:`as_arrays` checks the rest); anything else that fit accepts is an iterable of batches."""
    if isinstance(data, TensorDataset):
        return True
    return isinstance(data, (tuple, list)) and len(data) > 0 and _is_array(data[0])


def as_arrays(data, name: str, model: nn.Module):
    """``(x [N, C], y [N, D], labels [N] | None)`` from a tuple/list of tensors or NumPy arrays or a TensorDataset,
    checked: shapes (against ``model.in_features`` / ``out_features`` when the model has them), finite values,
    labels in ``[-1, K)``. 1-d ``x`` / ``y`` are read as one column when the model has one."""
    if isinstance(data, TensorDataset):
        tensors = tuple(data.tensors)
    elif isinstance(data, (tuple, list)):
        tensors = tuple(data)
    else:
        raise TypeError(f"{name} must be (x, y), (x, y, labels) or a TensorDataset, got {type(data).__name__}")
    if len(tensors) not in (2, 3) or not all(_is_array(t) for t in tensors):
        raise TypeError(f"{name} must hold 2 or 3 tensors or arrays (x, y[, labels]), got "
                        f"{[type(t).__name__ for t in tensors]}")
    tensors = tuple(torch.from_numpy(t) if isinstance(t, np.ndarray) else t for t in tensors)
    x, y = tensors[0], tensors[1]
    labels = tensors[2] if len(tensors) == 3 else None
    C, D = getattr(model, "in_features", None), getattr(model, "out_features", None)
    if x.dim() == 1 and C == 1:
        x = x.unsqueeze(-1)
    if y.dim() == 1 and D == 1:
        y = y.unsqueeze(-1)
    for t, part, width, attr in ((x, "x", C, "in_features"), (y, "y", D, "out_features")):
        if not t.is_floating_point() or t.dim() != 2 or (width is not None and t.shape[1] != width):
            want = f"[N, {attr}] = [N, {width}]" if width is not None else "[N, columns]"
            raise ValueError(f"{name} {part} must be a floating-point {want} tensor, got {t.dtype} shape "
                             f"{tuple(t.shape)}")
    N = x.shape[0]
    if y.shape[0] != N:
        raise ValueError(f"{name} y must have as many rows as x ({N}), got {y.shape[0]}")
    if N < 1:
        raise ValueError(f"{name} must hold at least 1 sample, got 0")
    for t, part in ((x, "x"), (y, "y")):
        bad = ~torch.isfinite(t).all(-1)
        if bool(bad.any()):
            rows = bad.nonzero().flatten()
            raise ValueError(f"{name} {part} must be finite, got NaN/inf in {rows.numel()} of {N} rows "
                             f"(first at row {int(rows[0])})")
    if labels is not None:
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.dim() != 1 or labels.shape[0] != N:
            raise ValueError(f"{name} labels must be an integer [N] = [{N}] tensor (-1 = unknown regime), got "
                             f"{labels.dtype} shape {tuple(labels.shape)}")
        if not isinstance(model, MDN):
            raise ValueError(f"{name} labels (regimes) need a mixture model (MDN), got {type(model).__name__}")
        K = model.components
        if labels.numel() and (int(labels.min()) < -1 or int(labels.max()) >= K):
            raise ValueError(f"{name} labels must be in [-1, {K - 1}] (-1 = unknown, else a component index < "
                             f"components = {K}), got values in [{int(labels.min())}, {int(labels.max())}]")
        labels = labels.long()
    return x, y, labels


def split_validation(arrays: tuple, val_split, seed: int) -> tuple[tuple, tuple | None]:
    """``(train, val)`` parts of in-memory ``arrays = (x, y, labels | None)``.

    ``val_split``: ``"auto"`` (``floor(AUTO_VAL_FRACTION * N)`` samples when that is at least
    ``AUTO_VAL_MIN_SAMPLES``, i.e. ``N >= 200``, else none), a fraction in ``(0, 1)`` (``max(1, round(f * N))`` samples), a count
    ``k >= 1`` of samples, or ``0`` / ``None`` (none: ``val`` is None). The held-out rows are a random subset drawn
    from ``seed`` alone (the same in every process and on resume); both parts keep the original row order.
    """
    x = arrays[0]
    N = x.shape[0]
    if val_split is None or val_split == 0:
        return arrays, None
    if val_split == "auto":
        n_val = math.floor(AUTO_VAL_FRACTION * N + 1e-9)
        if n_val < AUTO_VAL_MIN_SAMPLES:
            return arrays, None
    elif isinstance(val_split, float) and 0.0 < val_split < 1.0:
        n_val = max(1, round(val_split * N))
    elif isinstance(val_split, int) and not isinstance(val_split, bool) and val_split >= 1:
        n_val = val_split
    else:
        raise ValueError(f"val_split must be 'auto', a fraction in (0, 1), a sample count >= 1, 0 or None, "
                         f"got {val_split!r}")
    if n_val >= N:
        raise ValueError(f"val_split must leave at least 1 training sample, got {n_val} of N = {N} held out "
                         f"(val_split = {val_split!r})")
    generator = torch.Generator().manual_seed(mix_seed(seed, 0, 3))
    order = torch.randperm(N, generator=generator)
    val_rows, train_rows = order[:n_val].sort().values, order[n_val:].sort().values
    pick = lambda rows: tuple(t[rows.to(t.device)] if t is not None else None for t in arrays)  # noqa: E731
    return pick(train_rows), pick(val_rows)


class MemoryData:
    """In-memory ``(x, y, labels)`` batched by index: each epoch a reshuffle from ``(seed, epoch)``, sharded across
    processes (``local_batch`` rows per process and step)."""

    def __init__(self, arrays: tuple, *, local_batch: int, ctx: DistContext, seed: int, shuffle: bool,
                 drop_last: bool):
        self.x, self.y, self.labels = arrays
        self.local_batch, self.ctx, self.seed, self.shuffle, self.drop_last = local_batch, ctx, seed, shuffle, drop_last

    @property
    def n(self) -> int:
        return self.x.shape[0]

    def _index(self, epoch: int) -> list[torch.Tensor]:
        return epoch_batches(self.n, self.local_batch, self.ctx.world, self.ctx.rank, self.seed, epoch, self.shuffle,
                             self.drop_last)

    @property
    def batches_per_epoch(self) -> int:
        return len(self._index(0))

    def _rows(self, part: torch.Tensor):
        return (self.x[part], self.y[part], self.labels[part] if self.labels is not None else None)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple]:
        """This process's batches of ``epoch``, from batch ``start`` on."""
        for part in self._index(epoch)[start:]:
            yield self._rows(part)

    def eval_batches(self, chunk: int) -> Iterator[tuple]:
        """This process's share of every row (rows ``rank, rank + world, ...``) in chunks of ``chunk``."""
        for part in torch.arange(self.ctx.rank, self.n, self.ctx.world).split(chunk):
            yield self._rows(part)

    def normalization_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


class StreamData:
    """An iterable of ``(x, y)`` / ``(x, y, labels)`` batches: one pass per epoch, each batch checked like
    in-memory data (:func:`as_arrays`).

    A re-iterable (a ``DataLoader``, a list of batches, an object whose ``__iter__`` starts a fresh pass) serves any
    number of epochs; a one-shot iterator (a generator) serves one pass, and the batches read ahead for the
    normalization statistics are trained on first. A ``DataLoader`` whose sampler has ``set_epoch`` (such as a
    ``DistributedSampler``) gets it called before every epoch.
    """

    def __init__(self, source: Iterable, name: str, model: nn.Module):
        if not hasattr(source, "__iter__") or isinstance(source, (dict, str, bytes)):
            raise TypeError(f"{name} must be (x, y), (x, y, labels), a TensorDataset, a DataLoader or an iterable of "
                            f"(x, y[, labels]) batches, got {type(source).__name__}")
        self.source, self.name, self.model = source, name, model
        self.one_shot = isinstance(source, Iterator)
        try:
            self.length: int | None = len(source)
        except TypeError:  # no __len__ (a generator, an IterableDataset's loader may also raise)
            self.length = None
        self._head: list = []  # one-shot: batches read ahead, replayed first
        self._passes = 0

    @property
    def batches_per_epoch(self) -> int | None:
        return self.length

    def _check(self, batch, index: int):
        if not isinstance(batch, (tuple, list)):
            raise TypeError(f"{self.name} batches must be (x, y) or (x, y, labels) tuples of tensors or arrays, got "
                            f"{type(batch).__name__} at batch {index}")
        return as_arrays(tuple(batch), f"{self.name} batch {index}", self.model)

    def _pass(self, epoch: int):
        if self.one_shot:
            if self._passes:
                raise ValueError(f"{self.name} is a one-shot iterator (e.g. a generator) and was read once already: "
                                 "pass a re-iterable (a DataLoader, a list of batches) for more than one pass")
            self._passes += 1
            head, self._head = self._head, []
            return itertools.chain(head, self.source)
        for holder in (self.source, getattr(self.source, "batch_sampler", None)):
            sampler = getattr(holder, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
        self._passes += 1
        return iter(self.source)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple]:
        """The batches of one pass, from batch ``start`` on (the ones before are read and skipped)."""
        for index, batch in enumerate(self._pass(epoch)):
            if index >= start:
                yield self._check(batch, index)

    def eval_batches(self, chunk: int) -> Iterator[tuple]:
        """Every batch of one pass (``chunk`` does not apply: the iterable sets its batches)."""
        return self.batches(0)

    def normalization_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``, ``y`` of the first :data:`NORMALIZATION_BATCHES` batches of a pass, concatenated."""
        if self.one_shot:
            self._head = list(itertools.islice(self.source, NORMALIZATION_BATCHES))
            batches = self._head
        else:
            batches = list(itertools.islice(iter(self.source), NORMALIZATION_BATCHES))
        if not batches:
            raise ValueError(f"{self.name} must give at least one batch, got an empty {type(self.source).__name__}")
        checked = [self._check(b, i) for i, b in enumerate(batches)]
        return torch.cat([c[0] for c in checked]), torch.cat([c[1] for c in checked])


def steps_in(batches: int | None, accumulate: int) -> int | None:
    """Optimizer steps for ``batches`` micro-batches in groups of ``accumulate`` (a partial last group steps too)."""
    return None if batches is None else math.ceil(batches / accumulate)

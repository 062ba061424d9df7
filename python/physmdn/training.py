"""Training loop for :class:`~physmdn.models.MDN` and :class:`~physmdn.models.CFM`: :func:`fit`, checkpoints, :func:`load`.

One function trains both model families on in-memory tensors:

* MDN objective per batch: ``NLL + physics_weight * physics penalty + regime_weight * regime term``
  (:func:`mixture_loss`, which uses :func:`physmdn.physics.mdn_loss` when physics is given);
* CFM objective per batch: ``flow matching + physics_weight * endpoint residual`` (:meth:`CFM.loss`).

Data parallel without code changes: started under ``torchrun --nproc_per_node N script.py`` (env ``WORLD_SIZE > 1``),
:func:`fit` initializes the process group once per process (``nccl`` for CUDA, ``gloo`` on the CPU; kept for later
calls, destroyed at exit; a group the script made itself is used as is), wraps the model in
``DistributedDataParallel`` and shards every epoch with a ``DistributedSampler``. ``batch_size`` is the *global*
batch: each of the ``W`` processes takes ``batch_size / W`` samples, so ``W`` processes follow the same
trajectory as one process (up to floating-point summation order).

Layering: imports ops, checkpoint files (_checkpoint), distributions, physics (lazily) and models.
"""

from __future__ import annotations

import atexit
import copy
import csv
import datetime
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler, TensorDataset

from ._checkpoint import (CHECKPOINT_FORMAT, CheckpointError, check_finite_state, previous_path, read_checkpoint,
                          save_checkpoint)
from ._ops import mixture_nll
from .distributions import GaussianMixture
from .models import MDN, build_model

__all__ = ["fit", "FitResult", "load", "load_checkpoint", "mixture_loss", "LinearWarmup", "seed_everything",
           "is_main_process", "CHECKPOINT_FORMAT", "CheckpointError"]


# ----- losses ---------------------------------------------------------------------------------------

def mixture_loss(logits: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor, target: torch.Tensor,
                 physics=None, weight: float = 1.0) -> torch.Tensor:
    """Mean MDN training loss over the batch. Scalar.

    ``physics is None`` (or ``weight == 0``): ``mean_b mixture_nll_b`` (fused op). Otherwise
    :func:`physmdn.physics.mdn_loss` with ``reduction="mean"``:
    ``mean_b [NLL_b + weight * sum_k pi_bk sum_s w_s P^s_bk]``. ``physics`` is a spec or a list of specs /
    ``(spec, weight)`` pairs bound to this batch.
    """
    if physics is None or weight == 0.0:
        return mixture_nll(logits, means, log_scales, target, reduction="mean")
    try:
        from .physics import mdn_loss
    except ImportError as exc:  # pragma: no cover - physics ships with the package
        raise RuntimeError("physics was given but physmdn.physics is not available in this installation") from exc
    return mdn_loss(logits, means, log_scales, target, physics=physics, weight=weight, reduction="mean")


class LinearWarmup:
    """Physics-weight schedule ``w(epoch) = start + (final - start) * clamp((epoch - delay) / epochs, 0, 1)``.

    Epochs count from 0, so with the defaults epoch 0 trains on the data alone and the weight reaches
    ``final`` at epoch ``delay + epochs``. Picklable (unlike a lambda).
    """

    def __init__(self, final: float, epochs: int, delay: int = 0, start: float = 0.0):
        if not (isinstance(epochs, int) and epochs >= 1):
            raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
        self.final, self.epochs, self.delay, self.start = float(final), epochs, int(delay), float(start)

    def __call__(self, epoch: int) -> float:
        frac = min(max((epoch - self.delay) / self.epochs, 0.0), 1.0)
        return self.start + (self.final - self.start) * frac

    def __repr__(self) -> str:
        return f"LinearWarmup(final={self.final}, epochs={self.epochs}, delay={self.delay}, start={self.start})"


class _CosineSchedule:
    """LR factor: linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_factor`` at ``total`` steps."""

    def __init__(self, total: int, warmup: int, min_factor: float):
        self.total, self.warmup, self.min_factor = total, warmup, min_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(self.total - self.warmup, 1)
        progress = min((step - self.warmup) / span, 1.0)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _ConstantSchedule:
    def __init__(self, warmup: int):
        self.warmup = warmup

    def __call__(self, step: int) -> float:
        return (step + 1) / self.warmup if step < self.warmup else 1.0


def _is_spec_like(physics) -> bool:
    """A spec or list of specs (static physics) rather than a factory ``callable(context) -> specs``."""
    return physics is not None and (isinstance(physics, (list, tuple)) or not callable(physics))


class _Objective(nn.Module):
    """Loss of one batch, as a module so DistributedDataParallel can wrap the whole computation."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, y, labels, *, physics, physics_weight: float, regime_weight: float, regime_mode: str,
                time_weighting: str, generator, autocast_dtype):
        model = self.model
        zero = torch.zeros((), device=y.device)
        if not isinstance(model, MDN) and hasattr(model, "loss"):  # flow models: CFM and alike
            total, data, penalty = model.loss(x, y, residual=physics, physics_weight=physics_weight,
                                              time_weighting=time_weighting, generator=generator,
                                              autocast_dtype=autocast_dtype, return_terms=True)
            return total, torch.stack([t.detach().float() for t in (total, data, penalty, zero)])
        # physics is bound to the batch before the forward pass (e.g. Monotonic needs x.requires_grad_ first)
        specs = None
        if physics is not None and physics_weight != 0.0:
            specs = physics if _is_spec_like(physics) else physics(x)
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            mixture = model(x)
        if not isinstance(mixture, GaussianMixture):
            raise TypeError(f"model(x) must return a GaussianMixture (or the model must define loss()), "
                            f"got {type(mixture).__name__}")
        y = y.to(mixture.dtype)
        total = mixture_loss(mixture.logits, mixture.means, mixture.log_scales, y, specs, physics_weight)
        if specs is not None and physics_weight != 0.0:
            with torch.no_grad():
                nll = mixture_nll(mixture.logits, mixture.means, mixture.log_scales, y, reduction="mean")
            # derived, not recomputed (that would evaluate the physics twice): absolute error ~ 1e-7 |nll| / weight
            penalty = ((total.detach() - nll) / physics_weight).clamp_min(0.0)
        else:
            nll, penalty = total.detach(), zero
        regime = zero
        if labels is not None and regime_weight != 0.0:
            regime = mixture.regime_loss(labels, y, regime_mode)
            total = total + regime_weight * regime
        return total, torch.stack([t.detach().float() for t in (total, nll, penalty, regime)])


_TERMS = ("loss", "data", "physics", "regime")


# ----- data -----------------------------------------------------------------------------------------

def _as_arrays(data, name: str, model: nn.Module):
    """``(x [N, C], y [N, D], labels [N] | None)`` from a tuple/list of tensors or a TensorDataset, checked."""
    if isinstance(data, TensorDataset):
        tensors = tuple(data.tensors)
    elif isinstance(data, (tuple, list)):
        tensors = tuple(data)
    else:
        raise TypeError(f"{name} must be (x, y), (x, y, labels) or a TensorDataset, got {type(data).__name__}")
    if len(tensors) not in (2, 3) or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError(f"{name} must hold 2 or 3 tensors (x, y[, labels]), got "
                        f"{[type(t).__name__ for t in tensors]}")
    x, y = tensors[0], tensors[1]
    labels = tensors[2] if len(tensors) == 3 else None
    C, D = model.in_features, model.out_features
    if x.dim() == 1 and C == 1:
        x = x.unsqueeze(-1)
    if y.dim() == 1 and D == 1:
        y = y.unsqueeze(-1)
    if not x.is_floating_point() or x.dim() != 2 or x.shape[1] != C:
        raise ValueError(f"{name} x must be a floating-point [N, in_features] = [N, {C}] tensor, got "
                         f"{x.dtype} shape {tuple(x.shape)}")
    if not y.is_floating_point() or y.dim() != 2 or y.shape[1] != D:
        raise ValueError(f"{name} y must be a floating-point [N, out_features] = [N, {D}] tensor, got "
                         f"{y.dtype} shape {tuple(y.shape)}")
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


def _epoch_batches(n: int, local_batch: int, world: int, rank: int, seed: int, epoch: int, shuffle: bool,
                   drop_last: bool) -> list[torch.Tensor]:
    """This rank's index batches for one epoch, from a ``DistributedSampler`` (also for one process, so the
    order depends only on ``seed`` and ``epoch``): batch ``i`` of rank ``r`` holds global positions
    ``i * batch_size + r, ... (step world)``, so the ranks' batches together equal the single-process batch."""
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    index = torch.tensor(list(iter(sampler)), dtype=torch.long)
    batches = list(index.split(local_batch))
    if drop_last and batches and batches[-1].numel() < local_batch:
        batches.pop()
    return batches


# ----- distributed ----------------------------------------------------------------------------------

@dataclass
class _Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1


def is_main_process() -> bool:
    """True on rank 0 (or when not distributed): the process that writes files and shows progress."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _setup(device, model: nn.Module) -> tuple[_Dist, torch.device]:
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    initialized = dist.is_available() and dist.is_initialized()
    if env_world <= 1 and not initialized:
        if device is None:
            params = list(model.parameters())
            device = params[0].device if params else torch.device("cpu")
        return _Dist(), torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    want = torch.device(device) if device is not None else None
    use_cuda = torch.cuda.is_available() and (want is None or want.type == "cuda")
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = want or torch.device("cpu")
    if not initialized:
        # once per process: later fit() calls reuse the group (re-creating a destroyed default group under
        # torchrun reuses the rendezvous keys and hangs), and it is torn down when the interpreter exits
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        atexit.register(_destroy_process_group)
        _watch_uncaught_exceptions()
    return _Dist(dist.get_world_size(), dist.get_rank(), local_rank), device


_EXIT_STATE = {"uncaught": False}


def _watch_uncaught_exceptions() -> None:
    """Record an uncaught exception (sys.excepthook runs before the atexit handlers) so that a failing rank does not
    wait for its peers at exit."""
    previous = sys.excepthook

    def hook(*exc_info):
        _EXIT_STATE["uncaught"] = True
        previous(*exc_info)

    sys.excepthook = hook


def _destroy_process_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        return
    # gloo: all ranks reach the teardown together. A rank that closes its connections while a peer still uses
    # them can make the peer abort at exit ("terminate called without an active exception", ~1 torchrun run in 8).
    # Not after an uncaught exception (the peers may never arrive; torchrun stops them), and never for longer than
    # a minute.
    if dist.get_backend() == "gloo" and not _EXIT_STATE["uncaught"]:
        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        except Exception:  # a peer gone or late: tear down anyway
            pass
    dist.destroy_process_group()


def _all_reduce_sum(t: torch.Tensor, ctx: _Dist) -> torch.Tensor:
    if ctx.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ----- checkpoints ----------------------------------------------------------------------------------

def _mix_seed(seed: int, rank: int, stream: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + stream * 104_729) % (2**63 - 1)


def _rng_state(device: torch.device, generator: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "generator": generator.get_state()}


def _set_rng_state(state: dict, device: torch.device, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    generator.set_state(state["generator"].cpu())


def _physmdn_version() -> str | None:
    return getattr(sys.modules.get("physmdn"), "__version__", None)


def _cpu_state(module: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _model_record(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        raise TypeError(f"model must have a config dict (constructor arguments) to be checkpointed, "
                        f"got {type(config).__name__}")
    return {"format": CHECKPOINT_FORMAT, "model_class": type(model).__name__, "model_config": copy.deepcopy(config),
            "versions": {"physmdn": _physmdn_version(), "torch": str(torch.__version__)}}


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """The checkpoint dict written by :func:`fit` (``last.pt``, ``best.pt``, ...), loaded with ``weights_only=True``
    and verified against its content checksum.

    Keys: ``format``, ``checksum``, ``model_class``, ``model_config``, ``model_state``, ``versions``; training
    checkpoints also ``optimizer_state``, ``scheduler_state``, ``epoch``/``step_in_epoch`` (the next batch to run),
    ``global_step``, ``rng`` (one state per rank), ``history``, ``best``, ``bad_epochs``, ``accumulators``,
    ``fit_args``. Each write keeps the file it replaces as ``<name>.prev.pt``.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: (a ``ValueError``) naming the file and the cause: empty, truncated, not a checkpoint,
            corrupted (checksum mismatch), or an unknown format version.
    """
    ckpt = read_checkpoint(path, map_location)
    if "model_class" not in ckpt or "model_config" not in ckpt or "model_state" not in ckpt:
        raise CheckpointError(f"checkpoint {path!r} must hold model_class, model_config and model_state, got keys "
                              f"{sorted(ckpt)}")
    return ckpt


def load(path: str, map_location="cpu") -> nn.Module:
    """Rebuild the model stored in a checkpoint (class + ``config``) and load its weights; returns it in ``eval()``
    mode. ``last.pt`` holds the latest weights, ``best.pt`` those of the best monitored epoch."""
    ckpt = load_checkpoint(path, map_location)
    model = build_model(ckpt["model_class"], ckpt["model_config"])
    model.load_state_dict(ckpt["model_state"])
    return model.to(map_location if map_location is not None else "cpu").eval()


# ----- results --------------------------------------------------------------------------------------

@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        model: the trained (unwrapped) model; holds the best weights when ``restore_best`` and a best epoch exist.
        history: one dict per finished epoch (``epoch``, ``step``, ``lr``, ``physics_weight``, ``train_loss``,
            ``train_data``, ``train_physics``, ``train_regime``, ``grad_norm`` (mean global gradient norm before
            clipping), ``val_*`` when validating,
            ``time_s``). ``*_data`` is the NLL (MDN) or flow-matching loss (CFM); ``*_physics`` the unweighted
            penalty (0 while the weight is 0; for an MDN derived as ``(loss - nll) / weight``, so float32
            rounding of the NLL is amplified by ``1 / weight``); ``*_loss`` the weighted total.
        best_state: CPU state dict of the best epoch by ``monitor`` (None if no epoch finished).
        best_epoch, best_metric, monitor: which epoch, its value, and the history key compared.
        stopped: ``"completed"``, ``"early_stopping"`` or ``"max_steps"``.
        global_step, epochs_completed: optimizer steps taken and epochs finished in total (resumes included).
        checkpoint_path: the last ``last.pt`` written, or None.
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

    @property
    def stopped_early(self) -> bool:
        return self.stopped == "early_stopping"

    def save_history(self, path: str) -> None:
        """Write the history as CSV (``.csv``) or JSON (``.json``)."""
        _write_history(self.history, path)



def write_rows_csv(path: str, rows: list[dict]) -> None:
    """Rows of dicts to CSV; the header is the union of their keys in first-seen order."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _write_history(history: list[dict], path: str) -> None:
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


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy (if installed) and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass
    torch.manual_seed(seed)


# ----- fit ------------------------------------------------------------------------------------------

def _check_number(value, name: str, minimum: float | None = None, strict: bool = False, integer: bool = False,
                  allow_none: bool = False):
    if value is None and allow_none:
        return None
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        what = "an integer" if integer else "a finite number"
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum}"
        raise ValueError(f"{name} must be {what}{bound}{' or None' if allow_none else ''}, got {value!r}")
    return value


def _make_optimizer(optimizer, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if callable(optimizer) and not isinstance(optimizer, str):
        return optimizer(params)
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adamw', 'adam', 'sgd' or a callable(params) -> Optimizer, got {optimizer!r}")


def fit(model: nn.Module, train, val=None, *, epochs: int = 100, batch_size: int = 256, lr: float = 1e-3,
        weight_decay: float = 0.0, optimizer: str | Callable = "adamw", schedule: str = "cosine",
        warmup_steps: int = 0, min_lr_factor: float = 0.0, grad_clip: float | None = 1.0,
        patience: int | None = None, min_delta: float = 0.0, monitor: str | None = None, restore_best: bool = True,
        seed: int = 0, physics=None, physics_weight: float | Callable[[int], float] = 1.0,
        time_weighting: str = "none", regime_weight: float = 1.0, regime_mode: str = "responsibilities",
        normalize: bool = True, bf16: bool = False, compile: bool = False, device=None, progress: bool = True,
        history_path: str | None = None, checkpoint_dir: str | None = None,
        checkpoint_every_steps: int | None = None, resume: str | bool | None = None, max_steps: int | None = None,
        shuffle: bool = True, drop_last: bool = False, eval_batch_size: int | None = None) -> FitResult:
    """Train an :class:`~physmdn.models.MDN` or :class:`~physmdn.models.CFM` on in-memory tensors.

    Args:
        model: the model; moved to ``device`` and trained in place.
        train, val: ``(x [N, C], y [N, D])``, ``(x, y, labels [N])`` or a ``TensorDataset`` of those. ``labels``
            (MDN only) are regime indices in ``[-1, K)``, ``-1`` = unknown.
        epochs, batch_size (global, across processes), lr, weight_decay, optimizer (``"adamw"``, ``"adam"``,
            ``"sgd"`` or ``callable(params)``).
        schedule: ``"cosine"`` (per step, over ``epochs * steps_per_epoch`` to ``lr * min_lr_factor``) or ``"none"``;
            ``warmup_steps`` of linear warm-up in both cases. ``max_steps`` stops early without changing it.
        grad_clip: max global gradient norm (None or 0 turns clipping off).
        patience, min_delta, monitor: early stopping after ``patience`` epochs without an improvement larger than
            ``min_delta`` in ``monitor`` (a history key; default ``"val_data"`` with val, else ``"train_data"``).
        restore_best: load the best monitored weights into ``model`` at the end.
        seed: seeds the data order (all processes alike), torch's global RNG (with ``seed + rank`` mixed, for
            dropout) and the generator of the flow-matching noise.
        physics: MDN: a spec / list of ``(spec, weight)`` used for every batch, or ``callable(x_batch) -> spec |
            list | None`` called per batch *before* the forward pass. CFM: ``residual(y, context) -> r``.
        physics_weight: a number or ``callable(epoch) -> number`` (e.g. :class:`LinearWarmup`), read each epoch.
        time_weighting: CFM residual weighting ``"none"`` or ``"linear"`` (see :meth:`CFM.loss`).
        regime_weight, regime_mode: weight and kind of the supervised regime term
            (:meth:`GaussianMixture.regime_loss`) when labels are given. ``"responsibilities"`` (default, the
            complete-data likelihood) pulls component ``k`` onto the samples labelled ``k``; ``"logits"`` only
            teaches the gate ``P(regime | x)`` and cannot move a component that sits on another branch.
        normalize: set the model's standardization from the training data, once (skipped if already set).
        bf16: bf16 autocast around the networks (losses stay in float32). compile: ``model.compile()`` (in place).
        device: default: the model's device; under torchrun with CUDA, ``cuda:LOCAL_RANK``.
        progress: a tqdm bar on rank 0.
        history_path: ``.csv`` or ``.json`` file rewritten after every epoch (rank 0).
        checkpoint_dir: writes ``last.pt`` after every epoch (and every ``checkpoint_every_steps`` steps, and
            when stopping) and ``best.pt`` (model only) on every improvement.
        resume: a checkpoint path, or True for ``checkpoint_dir/last.pt`` if present: restores model, optimizer,
            scheduler, RNG states (per rank), epoch/step, history, best state and early-stopping counter, so the
            continued run takes exactly the steps the uninterrupted run would have.
        max_steps: stop after this many optimizer steps in total (a checkpoint is written when stopping).
        shuffle, drop_last: of the training batches. eval_batch_size: validation chunk per process.

    Returns:
        :class:`FitResult`.
    """
    # ----- arguments
    epochs = _check_number(epochs, "epochs", 1, integer=True)
    batch_size = _check_number(batch_size, "batch_size", 1, integer=True)
    lr = _check_number(lr, "lr", 0.0, strict=True)
    weight_decay = _check_number(weight_decay, "weight_decay", 0.0)
    warmup_steps = _check_number(warmup_steps, "warmup_steps", 0, integer=True)
    min_lr_factor = _check_number(min_lr_factor, "min_lr_factor", 0.0)
    grad_clip = _check_number(grad_clip, "grad_clip", 0.0, allow_none=True)
    patience = _check_number(patience, "patience", 1, integer=True, allow_none=True)
    min_delta = _check_number(min_delta, "min_delta", 0.0)
    seed = _check_number(seed, "seed", 0, integer=True)
    regime_weight = _check_number(regime_weight, "regime_weight", 0.0)
    checkpoint_every_steps = _check_number(checkpoint_every_steps, "checkpoint_every_steps", 1, integer=True,
                                           allow_none=True)
    max_steps = _check_number(max_steps, "max_steps", 0, integer=True, allow_none=True)
    eval_batch_size = _check_number(eval_batch_size, "eval_batch_size", 1, integer=True, allow_none=True)
    if schedule not in ("cosine", "none"):
        raise ValueError(f"schedule must be 'cosine' or 'none', got {schedule!r}")
    if regime_mode not in ("logits", "responsibilities"):
        raise ValueError(f"regime_mode must be 'logits' or 'responsibilities', got {regime_mode!r}")
    if time_weighting not in ("none", "linear"):
        raise ValueError(f"time_weighting must be 'none' or 'linear', got {time_weighting!r}")
    if history_path is not None and not str(history_path).endswith((".csv", ".json")):
        raise ValueError(f"history_path must end in .csv or .json, got {history_path!r}")
    if not isinstance(model, nn.Module) or not hasattr(model, "in_features") or not hasattr(model, "out_features"):
        raise TypeError(f"model must be an nn.Module with in_features/out_features (MDN, CFM), got {type(model).__name__}")
    is_flow = not isinstance(model, MDN) and hasattr(model, "loss")
    if physics is not None and is_flow and not callable(physics):
        raise TypeError(f"physics for {type(model).__name__} must be a residual callable(y, context) -> r, "
                        f"got {type(physics).__name__}")
    if not callable(physics_weight):
        _check_number(physics_weight, "physics_weight", 0.0)

    def weight_at(epoch: int) -> float:
        w = physics_weight(epoch) if callable(physics_weight) else physics_weight
        return float(_check_number(float(w), f"physics_weight({epoch})", 0.0))

    # ----- processes, device, data
    ctx, device = _setup(device, model)
    result = _fit(**locals())  # every argument, checked, plus ctx/device/weight_at/is_flow
    if ctx.active:
        dist.barrier()  # rank 0's files are complete when any process returns
    return result


def _fit(*, model, train, val, epochs, batch_size, lr, weight_decay, optimizer, schedule, warmup_steps, min_lr_factor,
         grad_clip, patience, min_delta, monitor, restore_best, seed, physics, physics_weight, time_weighting,
         regime_weight, regime_mode, normalize, bf16, compile, device, progress, history_path, checkpoint_dir,
         checkpoint_every_steps, resume, max_steps, shuffle, drop_last, eval_batch_size, ctx, weight_at, is_flow,
         **_unused) -> FitResult:
    if batch_size % ctx.world:
        raise ValueError(f"batch_size (global) must be divisible by the number of processes ({ctx.world}), "
                         f"got {batch_size}")
    local_batch = batch_size // ctx.world
    x_train, y_train, labels_train = _as_arrays(train, "train", model)
    val_data = _as_arrays(val, "val", model) if val is not None else None
    monitor = monitor or ("val_data" if val_data is not None else "train_data")
    if monitor.startswith("val_") and val_data is None:
        raise ValueError(f"monitor must name a train_* history key when val is None, got {monitor!r}")
    keys = {"lr", "grad_norm", *(f"train_{t}" for t in _TERMS), *(f"val_{t}" for t in _TERMS if val_data is not None)}
    if monitor not in keys:
        raise ValueError(f"monitor must be one of {sorted(keys)}, got {monitor!r}")
    main = ctx.rank == 0
    resume_path = None
    if resume is True:
        if checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir (to find last.pt), got checkpoint_dir=None")
        candidate = os.path.join(checkpoint_dir, "last.pt")
        resume_path = candidate if os.path.isfile(candidate) else None
    elif resume:
        resume_path = str(resume)

    model.to(device)
    if normalize and resume_path is None and not bool(getattr(model, "normalization_set", torch.tensor(True))):
        model.set_normalization(x_train, y_train)
    torch.manual_seed(_mix_seed(seed, ctx.rank, 0))
    if device.type == "cuda":
        torch.cuda.manual_seed(_mix_seed(seed, ctx.rank, 0))
    generator = torch.Generator(device=device)
    generator.manual_seed(_mix_seed(seed, ctx.rank, 1))

    steps_per_epoch = len(_epoch_batches(x_train.shape[0], local_batch, ctx.world, ctx.rank, seed, 0, shuffle, drop_last))
    if steps_per_epoch == 0:
        raise ValueError(f"train must give at least one batch per process, got N = {x_train.shape[0]} samples with "
                         f"batch_size = {batch_size}, drop_last = {drop_last}, {ctx.world} processes")
    total_steps = epochs * steps_per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _make_optimizer(optimizer, params, lr, weight_decay)
    factor = _CosineSchedule(total_steps, warmup_steps, min_lr_factor) if schedule == "cosine" else \
        (_ConstantSchedule(warmup_steps) if warmup_steps else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor) if factor is not None else None
    if compile:
        model.compile()
    objective = _Objective(model)
    if ctx.active:
        from torch.nn.parallel import DistributedDataParallel

        train_module = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        train_module = objective
    autocast_dtype = torch.bfloat16 if bf16 else None
    loss_kw = dict(physics=physics, regime_weight=regime_weight, regime_mode=regime_mode,
                   time_weighting=time_weighting, autocast_dtype=autocast_dtype)

    # ----- state
    state: dict[str, Any] = dict(epoch=0, step_in_epoch=0, global_step=0, history=[], best_metric=None,
                                 best_epoch=None, best_state=None, bad_epochs=0)
    acc = torch.zeros(len(_TERMS) + 2, device=device, dtype=torch.float64)  # terms, grad norm, count
    if resume_path is not None:
        try:
            ckpt = load_checkpoint(resume_path, map_location=device)
        except CheckpointError as exc:
            prev = previous_path(resume_path)
            if not os.path.isfile(prev):
                raise
            raise CheckpointError(f"{exc}; the checkpoint it replaced is {prev!r}: pass resume={prev!r} to "
                                  "continue from there") from exc
        if ckpt["model_class"] != type(model).__name__ or ckpt["model_config"] != model.config:
            raise ValueError(f"resume checkpoint must match the model: checkpoint has {ckpt['model_class']} "
                             f"{ckpt['model_config']}, model is {type(model).__name__} {model.config}")
        if "optimizer_state" not in ckpt:
            raise ValueError(f"resume must point at a training checkpoint (last.pt), got a model-only file {resume_path!r}")
        model.load_state_dict(ckpt["model_state"])
        opt.load_state_dict(ckpt["optimizer_state"])
        if scheduler is not None and ckpt.get("scheduler_state") is not None:
            scheduler.load_state_dict(ckpt["scheduler_state"])
        for key in ("epoch", "step_in_epoch", "global_step", "history", "best_metric", "best_epoch", "bad_epochs"):
            state[key] = ckpt[key]
        best_state = ckpt["best"]
        state["best_state"] = {k: v.cpu() for k, v in best_state.items()} if best_state is not None else None
        acc = ckpt["accumulators"].to(device=device, dtype=torch.float64)
        per_rank = ckpt["rng"]
        if len(per_rank) == ctx.world:
            _set_rng_state(per_rank[ctx.rank], device, generator)
        else:
            warnings.warn(f"resuming with {ctx.world} processes from a checkpoint written by {len(per_rank)}: "
                          "random streams and data shards differ, so the run will not reproduce exactly")
        if ckpt.get("fit_args", {}).get("steps_per_epoch") not in (None, steps_per_epoch):
            warnings.warn("resuming with a different number of steps per epoch than the checkpoint "
                          f"({ckpt['fit_args']['steps_per_epoch']} -> {steps_per_epoch})")

    fit_args = dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, world_size=ctx.world,
                    steps_per_epoch=steps_per_epoch, monitor=monitor, schedule=schedule)

    def save_training_checkpoint(path: str) -> None:
        rng = _rng_state(device, generator)
        if ctx.active:
            gathered: list = [None] * ctx.world
            dist.all_gather_object(gathered, rng)
            rng_all = gathered
        else:
            rng_all = [rng]
        check_finite_state(model.state_dict(), path, state["global_step"])  # on every rank, so all stop together
        if not main:
            return
        record = _model_record(model)
        record.update(model_state=_cpu_state(model), optimizer_state=opt.state_dict(),
                      scheduler_state=scheduler.state_dict() if scheduler is not None else None,
                      epoch=state["epoch"], step_in_epoch=state["step_in_epoch"], global_step=state["global_step"],
                      rng=rng_all, history=state["history"], best_metric=state["best_metric"],
                      best_epoch=state["best_epoch"], best=state["best_state"], bad_epochs=state["bad_epochs"],
                      accumulators=acc.detach().cpu(), fit_args=fit_args)
        save_checkpoint(record, path)

    last_path = os.path.join(checkpoint_dir, "last.pt") if checkpoint_dir else None
    best_path = os.path.join(checkpoint_dir, "best.pt") if checkpoint_dir else None
    written_last = None

    bar = None
    if progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=min(total_steps, max_steps) if max_steps is not None else total_steps,
                   initial=state["global_step"], desc=f"fit {type(model).__name__}", unit="step", dynamic_ncols=True)

    def evaluate(pw: float) -> dict:
        x_v, y_v, l_v = val_data
        index = torch.arange(ctx.rank, x_v.shape[0], ctx.world)
        sums = torch.zeros(len(_TERMS) + 1, device=device, dtype=torch.float64)
        val_generator = torch.Generator(device=device)
        val_generator.manual_seed(_mix_seed(seed, ctx.rank, 2))
        was_training = model.training
        model.eval()
        chunk = eval_batch_size or max(local_batch, 256)
        with torch.set_grad_enabled(physics is not None):
            for part in index.split(chunk):
                xb, yb = x_v[part].to(device), y_v[part].to(device)
                lb = l_v[part].to(device) if l_v is not None else None
                _, terms = objective(xb, yb, lb, physics_weight=pw, generator=val_generator, **loss_kw)
                sums[:-1] += terms.double() * part.numel()
                sums[-1] += part.numel()
        model.train(was_training)
        sums = _all_reduce_sum(sums, ctx)
        return {f"val_{name}": float(sums[i] / sums[-1]) for i, name in enumerate(_TERMS)}

    # ----- loop
    stopped = "completed"
    t_epoch = time.perf_counter()
    model.train()
    while state["epoch"] < epochs:
        epoch = state["epoch"]
        pw = weight_at(epoch)
        batches = _epoch_batches(x_train.shape[0], local_batch, ctx.world, ctx.rank, seed, epoch, shuffle, drop_last)
        if state["step_in_epoch"] == 0:
            acc.zero_()
        hit_max = False
        for i in range(state["step_in_epoch"], len(batches)):
            if max_steps is not None and state["global_step"] >= max_steps:
                hit_max = True
                break
            part = batches[i]
            xb, yb = x_train[part].to(device, non_blocking=True), y_train[part].to(device, non_blocking=True)
            lb = labels_train[part].to(device, non_blocking=True) if labels_train is not None else None
            opt.zero_grad(set_to_none=True)
            total, terms = train_module(xb, yb, lb, physics_weight=pw, generator=generator, **loss_kw)
            total.backward()
            if grad_clip:
                norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            opt.step()
            if scheduler is not None:
                scheduler.step()
            acc[: len(_TERMS)] += terms.double()
            acc[len(_TERMS)] += norm.detach().double()
            acc[-1] += 1
            state["global_step"] += 1
            state["step_in_epoch"] = i + 1
            if bar is not None:
                bar.update(1)
                if state["global_step"] % 10 == 0:
                    bar.set_postfix(epoch=epoch, loss=f"{float(acc[0] / acc[-1]):.4g}", refresh=False)
            if checkpoint_every_steps and last_path and state["global_step"] % checkpoint_every_steps == 0:
                save_training_checkpoint(last_path)
                written_last = last_path
        if max_steps is not None and state["global_step"] >= max_steps and state["step_in_epoch"] < len(batches):
            hit_max = True
        if hit_max:
            stopped = "max_steps"
            break

        # ----- end of epoch
        totals = _all_reduce_sum(acc.clone(), ctx)
        count = max(float(totals[-1]), 1.0)
        row = {"epoch": epoch, "step": state["global_step"], "lr": opt.param_groups[0]["lr"], "physics_weight": pw}
        row.update({f"train_{name}": float(totals[i]) / count for i, name in enumerate(_TERMS)})
        row["grad_norm"] = float(totals[len(_TERMS)]) / count
        if not math.isfinite(row["train_loss"]):
            raise FloatingPointError(f"training loss must stay finite, got {row['train_loss']} in epoch {epoch} "
                                     f"(step {state['global_step']}); lower lr, keep grad_clip on, or check data/physics")
        if val_data is not None:
            row.update(evaluate(pw))
        now = time.perf_counter()
        row["time_s"] = now - t_epoch
        t_epoch = now
        state["history"].append(row)
        value = row[monitor]
        best = state["best_metric"]
        if math.isfinite(value) and (best is None or value < best - min_delta):
            state["best_metric"], state["best_epoch"], state["bad_epochs"] = value, epoch, 0
            if best_path:
                check_finite_state(model.state_dict(), best_path, state["global_step"])
            state["best_state"] = _cpu_state(model)
            if best_path and main:
                record = _model_record(model)
                record.update(model_state=state["best_state"], epoch=epoch, metric=value, monitor=monitor)
                save_checkpoint(record, best_path)
        else:
            state["bad_epochs"] += 1
        state["epoch"], state["step_in_epoch"] = epoch + 1, 0
        if history_path and main:
            _write_history(state["history"], history_path)
        if last_path:
            save_training_checkpoint(last_path)
            written_last = last_path
        if bar is not None:
            post = {"epoch": epoch, "train": f"{row['train_loss']:.4g}"}
            if "val_loss" in row:
                post["val"] = f"{row['val_loss']:.4g}"
            bar.set_postfix(post)
        if patience is not None and state["bad_epochs"] >= patience:
            stopped = "early_stopping"
            break
        if max_steps is not None and state["global_step"] >= max_steps and state["epoch"] < epochs:
            stopped = "max_steps"
            break

    if stopped == "max_steps" and last_path:
        save_training_checkpoint(last_path)
        written_last = last_path
    if bar is not None:
        bar.close()
    if restore_best and state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    return FitResult(model=model, history=state["history"], best_state=state["best_state"],
                     best_epoch=state["best_epoch"], best_metric=state["best_metric"], monitor=monitor, stopped=stopped,
                     global_step=state["global_step"], epochs_completed=state["epoch"], checkpoint_path=written_last,
                     extra={"steps_per_epoch": steps_per_epoch, "world_size": ctx.world})

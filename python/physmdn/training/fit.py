"""The training loop: :func:`fit` trains an :class:`~physmdn.models.MDN`, a :class:`~physmdn.models.CFM` or another
module with their objective, on in-memory tensors or any iterable of batches, alone or data parallel under
``torchrun`` (see :mod:`physmdn.training`)."""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import _validation as check
from ..models import MDN
from ..physics_scaling import prior_weight
from .callbacks import FitState, call, check_callbacks
from .checkpoint import (ACCUMULATORS, cpu_state, model_spec, restore_training, save_model_checkpoint,
                         save_training_checkpoint)
from ._format import check_finite_state
from .data import MemoryData, StreamData, as_arrays, is_in_memory, split_validation, steps_in
from .distributed import all_reduce_sum, mix_seed, setup
from .loggers import make_loggers
from .objective import TERMS, Objective
from .results import FitResult, write_history
from .schedules import lr_factor

__all__ = ["fit", "seed_everything"]

def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_number(value, name: str, minimum: float | None = None, strict: bool = False, integer: bool = False,
                  allow_none: bool = False):
    """fit's numeric arguments through the package's shared checks (physmdn._validation); None where allowed."""
    if value is None and allow_none:
        return None
    if integer:
        return check.count(value, name, int(minimum if minimum is not None else 0))
    if minimum is None:
        return check.finite(value, name)
    if minimum != 0:  # (fit's real-valued bounds are all 0)
        raise ValueError(f"internal: unsupported bound {minimum} for {name}")
    return check.positive(value, name) if strict else check.nonnegative(value, name)


def _make_optimizer(optimizer, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if callable(optimizer):
        made = optimizer(params)
        if not isinstance(made, torch.optim.Optimizer):
            raise TypeError(f"optimizer(params) must return a torch.optim.Optimizer, got {type(made).__name__}")
        return made
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adamw', 'adam', 'sgd' or a callable(params) -> Optimizer, got {optimizer!r}")


def _resolve_scheduler(scheduler, schedule):
    """``scheduler`` with its alias ``schedule`` folded in: ``"cosine"`` (the default), ``"none"`` or a
    ``callable(optimizer) -> LRScheduler``."""
    if scheduler is not None and schedule is not None and scheduler != schedule:
        raise ValueError(f"schedule is an alias of scheduler: pass one of them, got scheduler={scheduler!r} and "
                         f"schedule={schedule!r}")
    chosen = scheduler if scheduler is not None else schedule if schedule is not None else "cosine"
    if isinstance(chosen, str):
        if chosen not in ("cosine", "none"):
            raise ValueError(f"scheduler must be 'cosine', 'none' or a callable(optimizer) -> LRScheduler, "
                             f"got {chosen!r}")
    elif not callable(chosen):
        raise TypeError(f"scheduler must be 'cosine', 'none' or a callable(optimizer) -> LRScheduler, got "
                        f"{type(chosen).__name__}")
    return chosen


def _sample_count(train) -> int:
    """The number of samples in ``train`` (in-memory data or a DataLoader over a sized dataset), for
    ``physics_weight="auto"``."""
    if isinstance(train, (tuple, list)) and train and hasattr(train[0], "shape"):
        return int(train[0].shape[0])
    dataset = getattr(train, "dataset", train)
    try:
        return int(len(dataset))
    except TypeError:
        raise ValueError(f"physics_weight='auto' needs the number of training samples, and train "
                         f"({type(train).__name__}) has no length: pass a number, e.g. "
                         f"physmdn.physics_scaling.prior_weight(n)") from None


def fit(model: nn.Module, train, val=None, *, epochs: int = 100, batch_size: int | None = None, lr: float = 1e-3,
        weight_decay: float = 0.0, optimizer: str | Callable = "adamw", scheduler: str | Callable | None = None,
        schedule: str | None = None, warmup_steps: int = 0, min_lr_factor: float = 0.0,
        grad_clip: float | None = 1.0, accumulate_steps: int = 1, val_split: str | float | int | None = "auto",
        patience: int | str | None = "auto", min_delta: float = 0.0, monitor: str | None = None,
        restore_best: bool = True, seed: int = 0, physics=None,
        physics_weight: float | str | Callable[[int], float] = 1.0,
        time_weighting: str = "none", regime_weight: float = 1.0, regime_mode: str = "responsibilities",
        normalize: bool = True, bf16: bool = False, compile: bool = False, device=None, progress: bool = True,
        callbacks=None, loggers=None, log_dir: str | None = None, history_path: str | None = None,
        checkpoint_dir: str | None = None, checkpoint_every_steps: int | None = None,
        resume: str | bool | None = None, max_steps: int | None = None, model_factory=None,
        model_config: dict | None = None, shuffle: bool = True, drop_last: bool = False,
        eval_batch_size: int | None = None) -> FitResult:
    """Train ``model`` (an :class:`~physmdn.models.MDN`, a :class:`~physmdn.models.CFM`, or any module whose
    ``forward(x)`` returns a :class:`~physmdn.GaussianMixture` or that has the CFM-style ``loss()``).

    Args:
        model: trained in place, on ``device``.
        train: in memory: ``(x [N, C], y [N, D])``, ``(x, y, labels [N])`` (tensors or NumPy arrays) or a
            ``TensorDataset``; ``labels`` (MDN only) are regime indices in ``[-1, K)``, ``-1`` = unknown. Or a
            ``DataLoader`` / any iterable of such batches: an epoch is one pass; a one-shot iterator (a generator)
            allows ``epochs=1`` only. ``batch_size``, ``shuffle``, ``drop_last`` and ``val_split`` apply to
            in-memory data only (the loader sets its batches); under ``torchrun`` each process iterates its own
            ``train`` (give the loader a ``DistributedSampler``; every process must yield as many batches).
        val: validation data of either kind (an iterable must be re-iterable), or None.
        val_split: with ``val=None`` and in-memory ``train``, the part of ``train`` held out for validation (drawn
            from ``seed``): ``"auto"`` (default) holds out 10 % when that is at least 20 samples (``N >= 200``),
            else nothing; a fraction in ``(0, 1)``; a count of samples; ``0`` or None: nothing. No split is made
            from a DataLoader/iterable (pass ``val``). ``FitResult.extra["val_size"]`` says how many were held out.
        epochs, batch_size (global, across processes; default 256), lr, weight_decay.
        optimizer: ``"adamw"``, ``"adam"``, ``"sgd"`` (momentum 0.9) or ``callable(params) -> Optimizer``.
        scheduler: ``"cosine"`` (default: per step, over ``epochs * steps_per_epoch`` to ``lr * min_lr_factor``),
            ``"none"``, or ``callable(optimizer) -> LRScheduler``, stepped once per optimizer step.
            ``warmup_steps`` of linear warm-up for the named ones. ``schedule``: the same, an alias. Cosine needs the
            number of steps: with an iterable without ``__len__`` pass ``max_steps`` (the horizon then).
        grad_clip: max global gradient norm (None or 0 turns clipping off).
        accumulate_steps: micro-batches per optimizer step; each micro-batch's loss is divided by it, so ``N``
            micro-batches of ``b`` samples make the step of one batch of ``N * b``. A partial group at the end of an
            epoch steps with the mean of the micro-batches it has. A "step" (``max_steps``, ``warmup_steps``,
            ``checkpoint_every_steps``, the schedule) is an optimizer step.
        patience, min_delta, monitor: early stopping after ``patience`` epochs without an improvement larger than
            ``min_delta`` in ``monitor`` (a history key; default ``"val_data"`` with validation data, else
            ``"train_data"``). ``patience="auto"`` (default): ``max(10, epochs // 5)`` with validation data, no
            early stopping without; None: never.
        restore_best: with validation data (``monitor`` a ``val_*`` key), load the best epoch's weights into
            ``model`` at the end. Without, the model keeps its last weights (a training loss is no ground for
            choosing weights).
        seed: seeds the data order and ``val_split`` (all processes alike), torch's global RNG (with ``seed +
            rank`` mixed, for dropout) and the generator of the flow-matching noise.
        physics: MDN: a spec / list of ``(spec, weight)`` used for every batch, or ``callable(x_batch) -> spec |
            list | None`` called per batch *before* the forward pass. CFM: ``residual(y, context) -> r``.
        physics_weight: a number or ``callable(epoch) -> number`` (e.g. :class:`LinearWarmup`), read each epoch;
            ``"auto"``: :func:`physmdn.physics_scaling.prior_weight` of the number of samples in ``train``
            (``min(0.1, 2.5 / N)``, the default for noise-normalized specs, ``normalize="noise"``; in-memory data
            or a DataLoader over a sized dataset).
        time_weighting: CFM residual weighting ``"none"`` or ``"linear"`` (see :meth:`CFM.loss`).
        regime_weight, regime_mode: weight and kind of the supervised regime term
            (:meth:`GaussianMixture.regime_loss`) when labels are given. ``"responsibilities"`` (default, the
            complete-data likelihood) pulls component ``k`` onto the samples labelled ``k``; ``"logits"`` only
            teaches the gate ``P(regime | x)`` and cannot move a component that sits on another branch.
        normalize: set the model's standardization once (skipped if already set, or when the model has none) from
            the training data: all of it in memory (without the held-out part), else the first 64 batches of a
            pass (a one-shot iterator's are then trained on first).
        bf16: bf16 autocast around the networks (losses stay in float32). compile: ``model.compile()`` (in place).
        device: default: the model's device; under torchrun with CUDA, ``cuda:LOCAL_RANK``.
        progress: a tqdm bar on rank 0.
        callbacks: :class:`~physmdn.training.Callback` objects (any object with some of ``on_fit_start``,
            ``on_epoch_end`` (True stops training), ``on_checkpoint``, ``on_fit_end``), called on every process.
        loggers: logger objects or names (``"csv"``, ``"tensorboard"``, written under ``log_dir``), run on rank 0;
            default: a :class:`~physmdn.training.CSVLogger` (``log_dir/metrics.csv``) when ``log_dir`` is set.
        history_path: ``.csv`` or ``.json`` file rewritten after every epoch (rank 0).
        checkpoint_dir: writes ``last.pt`` after every epoch (and every ``checkpoint_every_steps`` steps, and
            when stopping) and ``best.pt`` (model only) on every improvement.
        model_factory, model_config: how a checkpoint rebuilds a model that is not a registered class (see
            :func:`~physmdn.training.checkpoint.model_spec` and :func:`load`): an importable class or function (or
            ``"module:qualname"``) and its keyword arguments (default ``model.config``).
        resume: a checkpoint path, or True for ``checkpoint_dir/last.pt`` if present: restores model, optimizer,
            scheduler, RNG states (per rank), epoch/step, history, best state and early-stopping counter, so the
            continued run takes exactly the steps the uninterrupted run would have (with an iterable: when it
            yields the same batches again; the batches of the epoch already trained on are read and skipped).
        max_steps: stop after this many optimizer steps in total (a checkpoint is written when stopping).
        shuffle, drop_last: of in-memory training batches. eval_batch_size: in-memory validation chunk per process.

    Returns:
        :class:`FitResult`; ``stopped`` is ``"completed"``, ``"early_stopping"``, ``"max_steps"`` or
        ``"callback"``.
    """
    # ----- arguments
    epochs = _check_number(epochs, "epochs", 1, integer=True)
    batch_size = _check_number(batch_size, "batch_size", 1, integer=True, allow_none=True)
    lr = _check_number(lr, "lr", 0.0, strict=True)
    weight_decay = _check_number(weight_decay, "weight_decay", 0.0)
    warmup_steps = _check_number(warmup_steps, "warmup_steps", 0, integer=True)
    min_lr_factor = _check_number(min_lr_factor, "min_lr_factor", 0.0)
    grad_clip = _check_number(grad_clip, "grad_clip", 0.0, allow_none=True)
    accumulate_steps = _check_number(accumulate_steps, "accumulate_steps", 1, integer=True)
    if patience != "auto":
        patience = _check_number(patience, "patience", 1, integer=True, allow_none=True)
    min_delta = _check_number(min_delta, "min_delta", 0.0)
    seed = _check_number(seed, "seed", 0, integer=True)
    regime_weight = _check_number(regime_weight, "regime_weight", 0.0)
    checkpoint_every_steps = _check_number(checkpoint_every_steps, "checkpoint_every_steps", 1, integer=True,
                                           allow_none=True)
    max_steps = _check_number(max_steps, "max_steps", 0, integer=True, allow_none=True)
    eval_batch_size = _check_number(eval_batch_size, "eval_batch_size", 1, integer=True, allow_none=True)
    scheduler = _resolve_scheduler(scheduler, schedule)
    if regime_mode not in ("logits", "responsibilities"):
        raise ValueError(f"regime_mode must be 'logits' or 'responsibilities', got {regime_mode!r}")
    if time_weighting not in ("none", "linear"):
        raise ValueError(f"time_weighting must be 'none' or 'linear', got {time_weighting!r}")
    if history_path is not None and not str(history_path).endswith((".csv", ".json")):
        raise ValueError(f"history_path must end in .csv or .json, got {history_path!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (MDN, CFM or a module of their kind), got {type(model).__name__}")
    is_flow = not isinstance(model, MDN) and hasattr(model, "loss")
    if physics is not None and is_flow and not callable(physics):
        raise TypeError(f"physics for {type(model).__name__} must be a residual callable(y, context) -> r, "
                        f"got {type(physics).__name__}")
    if isinstance(physics_weight, str):
        if physics_weight != "auto":
            raise ValueError(f"physics_weight must be a number >= 0, a callable(epoch) or 'auto', got "
                             f"{physics_weight!r}")
        physics_weight = prior_weight(_sample_count(train))
    if not callable(physics_weight):
        _check_number(physics_weight, "physics_weight", 0.0)
    callbacks = check_callbacks(callbacks)
    loggers = make_loggers(loggers, log_dir)
    spec = model_spec(model, model_factory, model_config)

    def weight_at(epoch: int) -> float:
        w = physics_weight(epoch) if callable(physics_weight) else physics_weight
        return float(_check_number(float(w), f"physics_weight({epoch})", 0.0))

    # ----- processes, device, data
    ctx, device = setup(device, model)
    result = _fit(**locals())  # every argument, checked, plus ctx/device/weight_at/is_flow/spec
    if ctx.active:
        dist.barrier()  # rank 0's files are complete when any process returns
    return result


def _data(train, val, val_split, model, batch_size, ctx, seed, shuffle, drop_last, epochs):
    """``(train source, val source | None, local batch | None, held-out sample count)``."""
    explicit_split = val_split not in ("auto", None, 0)
    if is_in_memory(train):
        batch_size = 256 if batch_size is None else batch_size
        if batch_size % ctx.world:
            raise ValueError(f"batch_size (global) must be divisible by the number of processes ({ctx.world}), "
                             f"got {batch_size}")
        local_batch = batch_size // ctx.world
        arrays = as_arrays(train, "train", model)
        held = None
        if val is not None and explicit_split:
            raise ValueError(f"val_split must be 'auto', 0 or None when val is given (pass one of them), got "
                             f"{val_split!r}")
        if val is None:
            arrays, held = split_validation(arrays, val_split, seed)
        source = MemoryData(arrays, local_batch=local_batch, ctx=ctx, seed=seed, shuffle=shuffle,
                            drop_last=drop_last)
    else:
        if batch_size is not None:
            raise ValueError(f"batch_size must be None with a DataLoader or iterable train (its batches are "
                             f"used as they come), got {batch_size}")
        if explicit_split:
            raise ValueError(f"val_split needs in-memory train data (tensors or arrays); with a DataLoader or "
                             f"iterable pass val= explicitly, got val_split={val_split!r}")
        local_batch, held = None, None
        source = StreamData(train, "train", model)
        if source.one_shot and epochs > 1:
            raise ValueError(f"epochs must be 1 when train is a one-shot iterator ({type(train).__name__}: it can "
                             f"be read once); pass a re-iterable (a DataLoader, a list of batches), got epochs={epochs}")
    memory_kw = dict(local_batch=1, ctx=ctx, seed=seed, shuffle=False, drop_last=False)
    if val is not None and is_in_memory(val):
        val_source = MemoryData(as_arrays(val, "val", model), **memory_kw)
    elif val is not None:
        val_source = StreamData(val, "val", model)
        if val_source.one_shot:
            raise ValueError(f"val must be re-iterable (it is read every epoch), got a one-shot "
                             f"{type(val).__name__}: pass a DataLoader, a list of batches or tensors")
    else:
        val_source = MemoryData(held, **memory_kw) if held is not None else None
    return source, val_source, local_batch, held[0].shape[0] if held is not None else 0


def _fit(*, model, train, val, val_split, epochs, batch_size, lr, weight_decay, optimizer, scheduler, warmup_steps,
         min_lr_factor, grad_clip, accumulate_steps, patience, min_delta, monitor, restore_best, seed, physics,
         time_weighting, regime_weight, regime_mode, normalize, bf16, compile, device, progress, callbacks,
         loggers, history_path, checkpoint_dir, checkpoint_every_steps, resume, max_steps, shuffle, drop_last,
         eval_batch_size, ctx, weight_at, spec, **_unused) -> FitResult:
    source, val_source, local_batch, val_size = _data(train, val, val_split, model, batch_size, ctx, seed, shuffle,
                                                      drop_last, epochs)
    validating = val_source is not None
    monitor = monitor or ("val_data" if validating else "train_data")
    if monitor.startswith("val_") and not validating:
        raise ValueError(f"monitor must name a train_* history key without validation data (val is None and "
                         f"val_split holds out nothing), got {monitor!r}")
    keys = {"lr", "grad_norm", *(f"train_{t}" for t in TERMS), *(f"val_{t}" for t in TERMS if validating)}
    if monitor not in keys:
        raise ValueError(f"monitor must be one of {sorted(keys)}, got {monitor!r}")
    if patience == "auto":
        patience = max(10, epochs // 5) if validating else None
    restores = restore_best and monitor.startswith("val_")
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
        model.set_normalization(*source.normalization_data())
    torch.manual_seed(mix_seed(seed, ctx.rank, 0))
    if device.type == "cuda":
        torch.cuda.manual_seed(mix_seed(seed, ctx.rank, 0))
    generator = torch.Generator(device=device)
    generator.manual_seed(mix_seed(seed, ctx.rank, 1))

    batches_per_epoch = source.batches_per_epoch
    if batches_per_epoch == 0 and isinstance(source, MemoryData):
        raise ValueError(f"train must give at least one batch per process, got N = {source.n} samples with "
                         f"batch_size = {local_batch * ctx.world}, drop_last = {drop_last}, {ctx.world} processes")
    if batches_per_epoch == 0:
        raise ValueError(f"train must give at least one batch, got an empty {type(train).__name__}")
    steps_per_epoch = steps_in(batches_per_epoch, accumulate_steps)
    total_steps = epochs * steps_per_epoch if steps_per_epoch is not None else max_steps
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _make_optimizer(optimizer, params, lr, weight_decay)
    if callable(scheduler):
        sched = scheduler(opt)
        if not (callable(getattr(sched, "step", None)) and callable(getattr(sched, "state_dict", None))):
            raise TypeError(f"scheduler(optimizer) must return an LRScheduler (with step and state_dict), got "
                            f"{type(sched).__name__}")
    else:
        if scheduler == "cosine" and total_steps is None:
            raise ValueError("scheduler 'cosine' needs the number of steps: train has no len(), so pass max_steps "
                             "(the horizon), or scheduler='none' or a callable(optimizer) -> LRScheduler")
        factor = lr_factor(scheduler, total_steps, warmup_steps, min_lr_factor)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor) if factor is not None else None
    if compile:
        model.compile()
    objective = Objective(model)
    if ctx.active:
        from torch.nn.parallel import DistributedDataParallel

        train_module = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        train_module = objective
    autocast_dtype = torch.bfloat16 if bf16 else None
    loss_kw = dict(physics=physics, regime_weight=regime_weight, regime_mode=regime_mode,
                   time_weighting=time_weighting, autocast_dtype=autocast_dtype)

    # ----- state
    # step_in_epoch: the batches of the epoch in progress already trained on (a whole number of optimizer steps)
    state: dict[str, Any] = dict(epoch=0, step_in_epoch=0, global_step=0, history=[], best_metric=None,
                                 best_epoch=None, best_state=None, bad_epochs=0)
    acc = torch.zeros(len(ACCUMULATORS), device=device, dtype=torch.float64)
    n_terms, i_norm, i_batches, i_steps = len(TERMS), len(TERMS), len(TERMS) + 1, len(TERMS) + 2
    if resume_path is not None:
        acc = restore_training(resume_path, model=model, spec=spec, optimizer=opt, scheduler=sched, state=state,
                               device=device, generator=generator, ctx=ctx, steps_per_epoch=steps_per_epoch)

    fit_args = dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, world_size=ctx.world,
                    steps_per_epoch=steps_per_epoch, monitor=monitor,
                    schedule=scheduler if isinstance(scheduler, str) else "callable",
                    accumulate_steps=accumulate_steps, val_size=val_size)

    def notify_checkpoint(path: str) -> None:
        if main:
            call(callbacks, "on_checkpoint", path)
            call(loggers, "on_checkpoint", path)

    def save_last(path: str) -> None:
        save_training_checkpoint(path, model=model, spec=spec, optimizer=opt, scheduler=sched, state=state,
                                 accumulators=acc, device=device, generator=generator, ctx=ctx, fit_args=fit_args)
        notify_checkpoint(path)

    last_path = os.path.join(checkpoint_dir, "last.pt") if checkpoint_dir else None
    best_path = os.path.join(checkpoint_dir, "best.pt") if checkpoint_dir else None
    written_last = None

    bar = None
    if progress and main:
        from tqdm.auto import tqdm

        bar_total = min(total_steps, max_steps) if max_steps is not None and total_steps is not None else total_steps
        bar = tqdm(total=bar_total, initial=state["global_step"], desc=f"fit {type(model).__name__}", unit="step",
                   dynamic_ncols=True)

    def evaluate(pw: float) -> dict:
        sums = torch.zeros(len(TERMS) + 1, device=device, dtype=torch.float64)
        val_generator = torch.Generator(device=device)
        val_generator.manual_seed(mix_seed(seed, ctx.rank, 2))
        was_training = model.training
        model.eval()
        chunk = eval_batch_size or max(local_batch or 0, 256)
        with torch.set_grad_enabled(physics is not None):
            for xb, yb, lb in val_source.eval_batches(chunk):
                xb, yb = xb.to(device), yb.to(device)
                lb = lb.to(device) if lb is not None else None
                _, terms = objective(xb, yb, lb, physics_weight=pw, generator=val_generator, **loss_kw)
                sums[:-1] += terms.double() * xb.shape[0]
                sums[-1] += xb.shape[0]
        model.train(was_training)
        sums = all_reduce_sum(sums, ctx)
        if float(sums[-1]) == 0:
            raise ValueError("val must hold at least one sample, got an empty validation set")
        return {f"val_{name}": float(sums[i] / sums[-1]) for i, name in enumerate(TERMS)}

    def optimizer_step(micro: int, synced: bool) -> None:
        """One optimizer step from the gradients of ``micro`` micro-batches (each loss divided by
        ``accumulate_steps``)."""
        if ctx.active and not synced:  # a partial last group ran under no_sync: average across processes here
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(ctx.world)
        if micro < accumulate_steps:  # the mean over the micro-batches this group has
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(accumulate_steps / micro)
        if grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        opt.step()
        if sched is not None:
            sched.step()
        acc[i_norm] += norm.detach().double()
        acc[i_steps] += 1
        state["global_step"] += 1
        if bar is not None:
            bar.update(1)
            if state["global_step"] % 10 == 0:
                bar.set_postfix(epoch=state["epoch"], loss=f"{float(acc[0] / acc[i_batches]):.4g}", refresh=False)

    # ----- loop
    stopped = "completed"
    fit_state = FitState(model=model, optimizer=opt, scheduler=sched, device=device, epochs=epochs,
                         start_epoch=state["epoch"], global_step=state["global_step"], steps_per_epoch=steps_per_epoch,
                         monitor=monitor, validating=validating, val_size=val_size, world_size=ctx.world,
                         rank=ctx.rank, history=[dict(row) for row in state["history"]])
    call(callbacks, "on_fit_start", fit_state)
    if main:
        call(loggers, "on_fit_start", fit_state)
    t_epoch = time.perf_counter()
    model.train()
    while state["epoch"] < epochs:
        epoch = state["epoch"]
        pw = weight_at(epoch)
        if state["step_in_epoch"] == 0:
            acc.zero_()
        hit_max = False
        micro = 0
        for xb, yb, lb in source.batches(epoch, start=state["step_in_epoch"]):
            if micro == 0:
                if max_steps is not None and state["global_step"] >= max_steps:
                    hit_max = True
                    break
                opt.zero_grad(set_to_none=True)
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            lb = lb.to(device, non_blocking=True) if lb is not None else None
            micro += 1
            # DDP averages gradients at the backward of a group's last micro-batch only
            synced = micro == accumulate_steps or not ctx.active
            with contextlib.nullcontext() if synced else train_module.no_sync():
                total, terms = train_module(xb, yb, lb, physics_weight=pw, generator=generator, **loss_kw)
                (total / accumulate_steps).backward()
            acc[:n_terms] += terms.double()
            acc[i_batches] += 1
            if micro == accumulate_steps:
                state["step_in_epoch"] += micro
                micro = 0
                optimizer_step(accumulate_steps, synced=True)
                if checkpoint_every_steps and last_path and state["global_step"] % checkpoint_every_steps == 0:
                    save_last(last_path)
                    written_last = last_path
        if micro:  # a partial group at the end of the epoch
            state["step_in_epoch"] += micro
            optimizer_step(micro, synced=not ctx.active)
            if checkpoint_every_steps and last_path and state["global_step"] % checkpoint_every_steps == 0:
                save_last(last_path)
                written_last = last_path
        if hit_max:
            stopped = "max_steps"
            break

        # ----- end of epoch
        totals = all_reduce_sum(acc.clone(), ctx)
        if float(totals[i_batches]) == 0:
            raise ValueError(f"train must give at least one batch per epoch, got none in epoch {epoch}")
        count = float(totals[i_batches])
        row = {"epoch": epoch, "step": state["global_step"], "lr": opt.param_groups[0]["lr"], "physics_weight": pw}
        row.update({f"train_{name}": float(totals[i]) / count for i, name in enumerate(TERMS)})
        row["grad_norm"] = float(totals[i_norm]) / max(float(totals[i_steps]), 1.0)
        if not math.isfinite(row["train_loss"]):
            raise FloatingPointError(f"training loss must stay finite, got {row['train_loss']} in epoch {epoch} "
                                     f"(step {state['global_step']}); lower lr, keep grad_clip on, or check data/physics")
        if validating:
            row.update(evaluate(pw))
        now = time.perf_counter()
        row["time_s"] = now - t_epoch
        t_epoch = now
        state["history"].append(row)
        value = row[monitor]
        best = state["best_metric"]
        improved = math.isfinite(value) and (best is None or value < best - min_delta)
        if improved:
            state["best_metric"], state["best_epoch"], state["bad_epochs"] = value, epoch, 0
            if best_path:
                check_finite_state(model.state_dict(), best_path, state["global_step"])
            state["best_state"] = cpu_state(model)
        else:
            state["bad_epochs"] += 1
        state["epoch"], state["step_in_epoch"] = epoch + 1, 0
        if improved and best_path and main:
            save_model_checkpoint(best_path, spec, state["best_state"], epoch=epoch, metric=value, monitor=monitor)
            notify_checkpoint(best_path)
        if history_path and main:
            write_history(state["history"], history_path)
        if last_path:
            save_last(last_path)
            written_last = last_path
        if bar is not None:
            post = {"epoch": epoch, "train": f"{row['train_loss']:.4g}"}
            if "val_loss" in row:
                post["val"] = f"{row['val_loss']:.4g}"
            bar.set_postfix(post)
        if main:
            call(loggers, "on_epoch_end", epoch, dict(row))
        stop = call(callbacks, "on_epoch_end", epoch, dict(row))
        if ctx.active:  # every process stops when one callback asks
            stop = bool(all_reduce_sum(torch.tensor([float(stop)], device=device), ctx).item() > 0)
        if patience is not None and state["bad_epochs"] >= patience:
            stopped = "early_stopping"
            break
        if stop:
            stopped = "callback"
            break
        if max_steps is not None and state["global_step"] >= max_steps and state["epoch"] < epochs:
            stopped = "max_steps"
            break

    if stopped == "max_steps" and last_path:
        save_last(last_path)
        written_last = last_path
    if bar is not None:
        bar.close()
    if restores and state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    result = FitResult(model=model, history=state["history"], best_state=state["best_state"],
                       best_epoch=state["best_epoch"], best_metric=state["best_metric"], monitor=monitor,
                       stopped=stopped, global_step=state["global_step"], epochs_completed=state["epoch"],
                       checkpoint_path=written_last,
                       extra={"steps_per_epoch": steps_per_epoch, "world_size": ctx.world, "val_size": val_size,
                              "patience": patience, "restored_best": bool(restores and state["best_state"] is not None)})
    call(callbacks, "on_fit_end", result)
    if main:
        call(loggers, "on_fit_end", result)
    return result

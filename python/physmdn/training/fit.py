"""The training loop: :func:`fit` trains an :class:`~physmdn.models.MDN` or a :class:`~physmdn.models.CFM` on
in-memory tensors, alone or data parallel under ``torchrun`` (see :mod:`physmdn.training`)."""

from __future__ import annotations

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
from .checkpoint import cpu_state, restore_training, save_model_checkpoint, save_training_checkpoint
from ._format import check_finite_state
from .distributed import all_reduce_sum, epoch_batches, mix_seed, setup
from .objective import TERMS, Objective, as_arrays
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
    ctx, device = setup(device, model)
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
    x_train, y_train, labels_train = as_arrays(train, "train", model)
    val_data = as_arrays(val, "val", model) if val is not None else None
    monitor = monitor or ("val_data" if val_data is not None else "train_data")
    if monitor.startswith("val_") and val_data is None:
        raise ValueError(f"monitor must name a train_* history key when val is None, got {monitor!r}")
    keys = {"lr", "grad_norm", *(f"train_{t}" for t in TERMS), *(f"val_{t}" for t in TERMS if val_data is not None)}
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
    torch.manual_seed(mix_seed(seed, ctx.rank, 0))
    if device.type == "cuda":
        torch.cuda.manual_seed(mix_seed(seed, ctx.rank, 0))
    generator = torch.Generator(device=device)
    generator.manual_seed(mix_seed(seed, ctx.rank, 1))

    steps_per_epoch = len(epoch_batches(x_train.shape[0], local_batch, ctx.world, ctx.rank, seed, 0, shuffle, drop_last))
    if steps_per_epoch == 0:
        raise ValueError(f"train must give at least one batch per process, got N = {x_train.shape[0]} samples with "
                         f"batch_size = {batch_size}, drop_last = {drop_last}, {ctx.world} processes")
    total_steps = epochs * steps_per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _make_optimizer(optimizer, params, lr, weight_decay)
    factor = lr_factor(schedule, total_steps, warmup_steps, min_lr_factor)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor) if factor is not None else None
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
    state: dict[str, Any] = dict(epoch=0, step_in_epoch=0, global_step=0, history=[], best_metric=None,
                                 best_epoch=None, best_state=None, bad_epochs=0)
    acc = torch.zeros(len(TERMS) + 2, device=device, dtype=torch.float64)  # terms, grad norm, count
    if resume_path is not None:
        acc = restore_training(resume_path, model=model, optimizer=opt, scheduler=scheduler, state=state,
                               device=device, generator=generator, ctx=ctx, steps_per_epoch=steps_per_epoch)

    fit_args = dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, world_size=ctx.world,
                    steps_per_epoch=steps_per_epoch, monitor=monitor, schedule=schedule)

    def save_last(path: str) -> None:
        save_training_checkpoint(path, model=model, optimizer=opt, scheduler=scheduler, state=state,
                                 accumulators=acc, device=device, generator=generator, ctx=ctx, fit_args=fit_args)

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
        sums = torch.zeros(len(TERMS) + 1, device=device, dtype=torch.float64)
        val_generator = torch.Generator(device=device)
        val_generator.manual_seed(mix_seed(seed, ctx.rank, 2))
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
        sums = all_reduce_sum(sums, ctx)
        return {f"val_{name}": float(sums[i] / sums[-1]) for i, name in enumerate(TERMS)}

    # ----- loop
    stopped = "completed"
    t_epoch = time.perf_counter()
    model.train()
    while state["epoch"] < epochs:
        epoch = state["epoch"]
        pw = weight_at(epoch)
        batches = epoch_batches(x_train.shape[0], local_batch, ctx.world, ctx.rank, seed, epoch, shuffle, drop_last)
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
            acc[: len(TERMS)] += terms.double()
            acc[len(TERMS)] += norm.detach().double()
            acc[-1] += 1
            state["global_step"] += 1
            state["step_in_epoch"] = i + 1
            if bar is not None:
                bar.update(1)
                if state["global_step"] % 10 == 0:
                    bar.set_postfix(epoch=epoch, loss=f"{float(acc[0] / acc[-1]):.4g}", refresh=False)
            if checkpoint_every_steps and last_path and state["global_step"] % checkpoint_every_steps == 0:
                save_last(last_path)
                written_last = last_path
        if hit_max:
            stopped = "max_steps"
            break

        # ----- end of epoch
        totals = all_reduce_sum(acc.clone(), ctx)
        count = max(float(totals[-1]), 1.0)
        row = {"epoch": epoch, "step": state["global_step"], "lr": opt.param_groups[0]["lr"], "physics_weight": pw}
        row.update({f"train_{name}": float(totals[i]) / count for i, name in enumerate(TERMS)})
        row["grad_norm"] = float(totals[len(TERMS)]) / count
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
            state["best_state"] = cpu_state(model)
            if best_path and main:
                save_model_checkpoint(best_path, model, state["best_state"], epoch=epoch, metric=value,
                                      monitor=monitor)
        else:
            state["bad_epochs"] += 1
        state["epoch"], state["step_in_epoch"] = epoch + 1, 0
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
        if patience is not None and state["bad_epochs"] >= patience:
            stopped = "early_stopping"
            break
        if max_steps is not None and state["global_step"] >= max_steps and state["epoch"] < epochs:
            stopped = "max_steps"
            break

    if stopped == "max_steps" and last_path:
        save_last(last_path)
        written_last = last_path
    if bar is not None:
        bar.close()
    if restore_best and state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    return FitResult(model=model, history=state["history"], best_state=state["best_state"],
                     best_epoch=state["best_epoch"], best_metric=state["best_metric"], monitor=monitor, stopped=stopped,
                     global_step=state["global_step"], epochs_completed=state["epoch"], checkpoint_path=written_last,
                     extra={"steps_per_epoch": steps_per_epoch, "world_size": ctx.world})

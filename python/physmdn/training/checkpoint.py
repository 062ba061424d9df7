"""Checkpoints of training runs: what :func:`~physmdn.training.fit` writes and resumes from, and :func:`load`.

Two kinds of file, both in the checksummed format of ``_format`` (durable writes, checked reads, the replaced
file kept as ``<name>.prev.pt``):

* ``best.pt``: the model only (class, constructor ``config``, weights) at the best monitored epoch;
* ``last.pt``: everything a resumed run needs to take exactly the steps of the uninterrupted run: model,
  optimizer, scheduler, RNG states per rank, epoch and step, history, best state, early-stopping counter and the
  running sums of the epoch in progress.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

from ..models import build_model
from ._format import (CHECKPOINT_FORMAT, CheckpointError, check_finite_state, previous_path, read_checkpoint,
                      save_checkpoint)
from .distributed import DistContext

__all__ = ["load", "load_checkpoint", "CHECKPOINT_FORMAT", "CheckpointError"]

# the entries of fit's loop state that a training checkpoint stores and a resume restores as they are
_LOOP_KEYS = ("epoch", "step_in_epoch", "global_step", "history", "best_metric", "best_epoch", "bad_epochs")


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


def cpu_state(module: nn.Module) -> dict:
    """A copy of ``module``'s state dict on the CPU (kept while training continues)."""
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


def save_model_checkpoint(path: str, model: nn.Module, model_state: dict, **entries) -> None:
    """Write a model-only checkpoint (``best.pt``): class, config, versions, ``model_state`` and ``entries``."""
    record = _model_record(model)
    record.update(model_state=model_state, **entries)
    save_checkpoint(record, path)


def save_training_checkpoint(path: str, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                             state: dict, accumulators: torch.Tensor, device: torch.device,
                             generator: torch.Generator, ctx: DistContext, fit_args: dict) -> None:
    """Write ``last.pt`` from rank 0, with the RNG states of every rank. Called on every rank (it gathers the RNG
    states and refuses non-finite weights everywhere, so all ranks stop together)."""
    rng = _rng_state(device, generator)
    if ctx.active:
        gathered: list = [None] * ctx.world
        dist.all_gather_object(gathered, rng)
        rng_all = gathered
    else:
        rng_all = [rng]
    check_finite_state(model.state_dict(), path, state["global_step"])
    if ctx.rank != 0:
        return
    record = _model_record(model)
    record.update(model_state=cpu_state(model), optimizer_state=optimizer.state_dict(),
                  scheduler_state=scheduler.state_dict() if scheduler is not None else None,
                  epoch=state["epoch"], step_in_epoch=state["step_in_epoch"], global_step=state["global_step"],
                  rng=rng_all, history=state["history"], best_metric=state["best_metric"],
                  best_epoch=state["best_epoch"], best=state["best_state"], bad_epochs=state["bad_epochs"],
                  accumulators=accumulators.detach().cpu(), fit_args=fit_args)
    save_checkpoint(record, path)


def restore_training(path: str, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, state: dict,
                     device: torch.device, generator: torch.Generator, ctx: DistContext,
                     steps_per_epoch: int) -> torch.Tensor:
    """Load the training checkpoint at ``path`` into ``model``, ``optimizer``, ``scheduler``, the loop ``state``
    (updated in place) and this rank's RNG streams; returns the running sums of the epoch in progress
    (float64 on ``device``).

    Raises:
        CheckpointError: the file is unusable; the message names the previous copy when there is one.
        ValueError: the checkpoint holds another model (class or config) or no training state.
    """
    try:
        ckpt = load_checkpoint(path, map_location=device)
    except CheckpointError as exc:
        prev = previous_path(path)
        if not os.path.isfile(prev):
            raise
        raise CheckpointError(f"{exc}; the checkpoint it replaced is {prev!r}: pass resume={prev!r} to "
                              "continue from there") from exc
    if ckpt["model_class"] != type(model).__name__ or ckpt["model_config"] != model.config:
        raise ValueError(f"resume checkpoint must match the model: checkpoint has {ckpt['model_class']} "
                         f"{ckpt['model_config']}, model is {type(model).__name__} {model.config}")
    if "optimizer_state" not in ckpt:
        raise ValueError(f"resume must point at a training checkpoint (last.pt), got a model-only file {path!r}")
    model.load_state_dict(ckpt["model_state"])
    optimizer.load_state_dict(ckpt["optimizer_state"])
    if scheduler is not None and ckpt.get("scheduler_state") is not None:
        scheduler.load_state_dict(ckpt["scheduler_state"])
    for key in _LOOP_KEYS:
        state[key] = ckpt[key]
    best_state = ckpt["best"]
    state["best_state"] = {k: v.cpu() for k, v in best_state.items()} if best_state is not None else None
    per_rank = ckpt["rng"]
    if len(per_rank) == ctx.world:
        _set_rng_state(per_rank[ctx.rank], device, generator)
    else:
        warnings.warn(f"resuming with {ctx.world} processes from a checkpoint written by {len(per_rank)}: "
                      "random streams and data shards differ, so the run will not reproduce exactly")
    if ckpt.get("fit_args", {}).get("steps_per_epoch") not in (None, steps_per_epoch):
        warnings.warn("resuming with a different number of steps per epoch than the checkpoint "
                      f"({ckpt['fit_args']['steps_per_epoch']} -> {steps_per_epoch})")
    return ckpt["accumulators"].to(device=device, dtype=torch.float64)

"""Checkpoints of training runs: what :func:`~physmdn.training.fit` writes and resumes from, and :func:`load`.

Two kinds of file, both in the checksummed format of ``_format`` (durable writes, checked reads, the replaced
file kept as ``<name>.prev.pt``):

* ``best.pt``: the model only (class, constructor ``config``, how to rebuild it, weights) at the best monitored
  epoch;
* ``last.pt``: everything a resumed run needs to take exactly the steps of the uninterrupted run: model,
  optimizer, scheduler, RNG states per rank, epoch and step, history, best state, early-stopping counter and the
  running sums of the epoch in progress.
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

from ..models import MODELS, build_model
from ._format import (CHECKPOINT_FORMAT, CheckpointError, check_finite_state, previous_path, read_checkpoint,
                      save_checkpoint)
from .distributed import DistContext

__all__ = ["load", "load_checkpoint", "load_weights", "model_spec", "CHECKPOINT_FORMAT", "CheckpointError"]

# the entries of fit's loop state that a training checkpoint stores and a resume restores as they are
# the running sums of the epoch in progress: the loss terms, the gradient norm, micro-batches and optimizer steps
ACCUMULATORS = ("loss", "data", "physics", "regime", "grad_norm", "batches", "steps")
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


def _import_path(obj) -> str | None:
    """``"module:qualname"`` of a class or module-level function, or None when it cannot be imported by name (a
    lambda, a function defined inside another)."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        return None
    return f"{module}:{qualname}"


def _resolve(path: str):
    """The object named by ``"module:qualname"``."""
    module_name, _, qualname = path.partition(":")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def model_spec(model: nn.Module, model_factory=None, model_config: dict | None = None) -> dict:
    """How a checkpoint of ``model`` rebuilds it: ``{"model_class", "model_config", "model_factory"}``.

    * ``model_config``: the constructor arguments (default: ``model.config`` when it is a dict, else None);
    * ``model_factory``: ``"module:qualname"`` of what :func:`load` calls with them: the given ``model_factory``
      (a class or module-level function, or its import path), else the model's class when it is not a
      registered model (:func:`physmdn.models.register_model`) and has a config; None for registered classes
      (rebuilt by name) and for models without a config (their checkpoints hold weights to load into a module).
    """
    if model_config is None:
        model_config = getattr(model, "config", None)
    if model_config is not None and not isinstance(model_config, dict):
        raise TypeError(f"model_config must be a dict of constructor arguments, got {type(model_config).__name__}")
    name = type(model).__name__
    if isinstance(model_factory, str):
        module_name, sep, qualname = model_factory.partition(":")
        if not sep or not module_name or not qualname:
            raise ValueError(f"model_factory must be 'module:qualname' (an import path), got {model_factory!r}")
        factory = model_factory
    elif model_factory is not None:
        if not callable(model_factory):
            raise TypeError(f"model_factory must be a class, a module-level function or an import path "
                            f"'module:qualname', got {type(model_factory).__name__}")
        factory = _import_path(model_factory)
        if factory is None:
            raise ValueError(f"model_factory must be importable by name (a class or module-level function), got "
                             f"{getattr(model_factory, '__qualname__', model_factory)!r} (a lambda or local function "
                             "cannot be stored: pass its import path, or load(path, factory=...) later)")
    elif MODELS.get(name) is type(model) or model_config is None:
        factory = None
    else:
        factory = _import_path(type(model))
    return {"model_class": name, "model_config": copy.deepcopy(model_config), "model_factory": factory}


def _model_record(spec: dict) -> dict:
    return {"format": CHECKPOINT_FORMAT, **copy.deepcopy(spec),
            "versions": {"physmdn": _physmdn_version(), "torch": str(torch.__version__)}}


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """The checkpoint dict written by :func:`fit` (``last.pt``, ``best.pt``, ...), loaded with ``weights_only=True``
    and verified against its content checksum.

    Keys: ``format``, ``checksum``, ``model_class``, ``model_config`` (None for a model without one),
    ``model_factory`` (``"module:qualname"`` or None, see :func:`model_spec`), ``model_state``, ``versions``;
    training checkpoints also ``optimizer_state``, ``scheduler_state``, ``epoch``/``step_in_epoch`` (the next
    batch to run), ``global_step``, ``rng`` (one state per rank), ``history``, ``best``, ``bad_epochs``,
    ``accumulators``, ``fit_args``. Each write keeps the file it replaces as ``<name>.prev.pt``.

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


def _plain_state_dict(path: str) -> dict | None:
    """The ``torch.save(module.state_dict())`` in ``path`` (a mapping of names to tensors), or None."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return dict(obj)
    return None


def load_weights(model: nn.Module, state: dict, source: str) -> None:
    """``model.load_state_dict(state)`` with an error that names what does not fit: missing and unexpected keys
    (the first 8 of each) and tensors of other shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        show = lambda keys: f"{keys[:8]}{f' (+{len(keys) - 8} more)' if len(keys) > 8 else ''}"  # noqa: E731
        parts = [f"missing keys {show(missing)}" if missing else "", f"unexpected keys {show(unexpected)}" if unexpected
                 else "", f"other shapes {show(shapes)}" if shapes else ""]
        raise ValueError(f"the weights in {source!r} must match {type(model).__name__}'s state dict, got "
                         + "; ".join(p for p in parts if p))
    model.load_state_dict(state)


def load(path: str, model: nn.Module | None = None, *, factory=None, map_location="cpu") -> nn.Module:
    """A model with the weights of the file at ``path``, in ``eval()`` mode.

    ``path`` is a checkpoint written by :func:`fit` (``last.pt``: the latest weights; ``best.pt``: the best
    monitored epoch's) or, with ``model``, a plain ``torch.save(module.state_dict())`` file.

    * ``model`` given: the weights are loaded into it (it keeps its device) and it is returned.
    * ``factory`` given: ``factory(**model_config)`` builds the module from the checkpoint's stored config.
    * neither: a registered model class (MDN, CFM, :func:`~physmdn.models.register_model`) is rebuilt by name;
      another stored class (``model_factory``, see :func:`model_spec`) is imported and called with the config
      when it is an ``nn.Module`` subclass. A stored function is not called (a file must not choose code to
      run): pass it as ``factory``. The model is moved to ``map_location``.

    Raises:
        ValueError: the weights do not fit the module (names the missing and unexpected keys and other shapes),
            or the file does not say how to build the module and none was given.
        CheckpointError, FileNotFoundError: as :func:`load_checkpoint`.
    """
    if isinstance(model, (str, torch.device)):
        raise TypeError(f"model must be an nn.Module to load the weights into, got the {type(model).__name__} "
                        f"{str(model)!r}: pass a device as map_location=")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module to load the weights into, got {type(model).__name__}")
    if model is not None and factory is not None:
        raise ValueError("pass model (a module to load into) or factory (to build one), not both")
    try:
        ckpt = load_checkpoint(path, map_location)
    except CheckpointError:
        state = _plain_state_dict(path) if model is not None else None
        if state is None:
            raise
        load_weights(model, state, path)
        return model.eval()
    config = ckpt["model_config"]
    if model is None and factory is not None:
        model = factory(**(config or {}))
        if not isinstance(model, nn.Module):
            raise TypeError(f"factory must return an nn.Module, got {type(model).__name__}")
    if model is not None:
        load_weights(model, ckpt["model_state"], path)
        return model.eval()
    stored = ckpt.get("model_factory")
    if stored is None and ckpt["model_class"] in MODELS:
        model = build_model(ckpt["model_class"], config)
    elif stored is not None and config is not None:
        target = _resolve(stored)
        if not (isinstance(target, type) and issubclass(target, nn.Module)):
            raise ValueError(f"checkpoint {path!r} names the factory {stored!r}, which is not an nn.Module class; "
                             f"load calls only classes named in a file: pass factory= (it is called with the "
                             f"stored config) or model=")
        model = target(**config)
    else:
        raise ValueError(f"checkpoint {path!r} holds the weights of a {ckpt['model_class']} without a constructor "
                         "config: pass model= (a module to load them into) or factory=")
    load_weights(model, ckpt["model_state"], path)
    return model.to(map_location if map_location is not None else "cpu").eval()


def save_model_checkpoint(path: str, spec: dict, model_state: dict, **entries) -> None:
    """Write a model-only checkpoint (``best.pt``): the model's ``spec`` (:func:`model_spec`), versions,
    ``model_state`` and ``entries``."""
    record = _model_record(spec)
    record.update(model_state=model_state, **entries)
    save_checkpoint(record, path)


def save_training_checkpoint(path: str, *, model: nn.Module, spec: dict, optimizer: torch.optim.Optimizer, scheduler,
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
    record = _model_record(spec)
    record.update(model_state=cpu_state(model), optimizer_state=optimizer.state_dict(),
                  scheduler_state=scheduler.state_dict() if scheduler is not None else None,
                  epoch=state["epoch"], step_in_epoch=state["step_in_epoch"], global_step=state["global_step"],
                  rng=rng_all, history=state["history"], best_metric=state["best_metric"],
                  best_epoch=state["best_epoch"], best=state["best_state"], bad_epochs=state["bad_epochs"],
                  accumulators=accumulators.detach().cpu(), fit_args=fit_args)
    save_checkpoint(record, path)


def restore_training(path: str, *, model: nn.Module, spec: dict, optimizer: torch.optim.Optimizer, scheduler, state: dict,
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
    if ckpt["model_class"] != spec["model_class"] or ckpt["model_config"] != spec["model_config"]:
        raise ValueError(f"resume checkpoint must match the model: checkpoint has {ckpt['model_class']} "
                         f"{ckpt['model_config']}, model is {spec['model_class']} {spec['model_config']}")
    if "optimizer_state" not in ckpt:
        raise ValueError(f"resume must point at a training checkpoint (last.pt), got a model-only file {path!r}")
    load_weights(model, ckpt["model_state"], path)
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
    acc = ckpt["accumulators"].to(device=device, dtype=torch.float64)
    if acc.numel() == len(ACCUMULATORS) - 1:  # written before the optimizer-step count had its own entry
        acc = torch.cat([acc, acc[-1:]])
    return acc

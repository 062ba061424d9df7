"""Training for :class:`~physmdn.models.MDN` and :class:`~physmdn.models.CFM`: :func:`fit`, checkpoints, :func:`load`.

One function trains both model families, on in-memory tensors or arrays or on a DataLoader / any iterable of
batches, with validation data given or held out of the training data (``val_split``), early stopping on it, callbacks
and loggers:

* MDN objective per batch: ``NLL + physics_weight * physics penalty + regime_weight * regime term``
  (:func:`mixture_loss`, which uses :func:`physmdn.physics.mdn_loss` when physics is given);
* CFM objective per batch: ``flow matching + physics_weight * endpoint residual`` (:meth:`CFM.loss`).

Data parallel without code changes: started under ``torchrun --nproc_per_node N script.py`` (env ``WORLD_SIZE > 1``),
:func:`fit` initializes the process group once per process (``nccl`` for CUDA, ``gloo`` on the CPU; kept for later
calls, destroyed at exit; a group the script made itself is used as is), wraps the model in
``DistributedDataParallel`` and shards every epoch with a ``DistributedSampler``. ``batch_size`` is the *global*
batch: each of the ``W`` processes takes ``batch_size / W`` samples, so ``W`` processes follow the same
trajectory as one process (up to floating-point summation order).

Modules, each importing only those before it: ``_format`` (the checksummed file format), ``schedules``
(:class:`LinearWarmup`, learning-rate factors), ``distributed`` (process group, shards, per-rank seeds),
``objective`` (the loss of one batch), ``data`` (in-memory and streamed data, their checks, the validation split),
``results`` (:class:`FitResult`, history files), ``callbacks`` (:class:`Callback`, :class:`FitState`), ``loggers``
(:class:`CSVLogger`, :class:`TensorBoardLogger`), ``checkpoint`` (``last.pt`` / ``best.pt``, resume, :func:`load`),
``fit`` (the loop) and ``tune`` (the physics weight chosen on validation data, :func:`tune_physics_weight`).
"""

from __future__ import annotations

from ._format import CHECKPOINT_FORMAT, CheckpointError
from .callbacks import Callback, FitState
from .checkpoint import load, load_checkpoint, load_weights, model_spec
from .distributed import is_main_process
from .fit import fit, seed_everything
from .loggers import CSVLogger, TensorBoardLogger
from .objective import mixture_loss
from .results import FitResult, write_rows_csv
from .schedules import LinearWarmup
from .tune import TuneResult, tune_physics_weight

__all__ = ["fit", "FitResult", "load", "load_checkpoint", "load_weights", "model_spec", "Callback", "FitState",
           "CSVLogger", "TensorBoardLogger", "mixture_loss", "LinearWarmup", "seed_everything",
           "is_main_process", "CHECKPOINT_FORMAT", "CheckpointError", "TuneResult", "tune_physics_weight"]

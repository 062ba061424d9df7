"""Data parallel training under ``torchrun``: the process group, per-rank data shards and per-rank seeds.

Started under ``torchrun --nproc_per_node N script.py`` (env ``WORLD_SIZE > 1``), :func:`setup` initializes the
process group once per process (``nccl`` for CUDA, ``gloo`` on the CPU; kept for later calls, destroyed at exit;
a group the script made itself is used as is) and picks the device. :func:`epoch_batches` shards every epoch
with a ``DistributedSampler``, so ``W`` processes with ``batch_size / W`` samples each follow the same trajectory
as one process with ``batch_size`` (up to floating-point summation order).
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

__all__ = ["is_main_process"]


@dataclass
class DistContext:
    """This process's place in the group: ``world`` processes, this one's global ``rank`` and its
    ``local_rank`` on the node (``1, 0, 0`` when not distributed)."""

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


def check_device(device) -> torch.device:
    """``torch.device(device)``, or a clear error when this process cannot use it (no CUDA, an index beyond the
    GPUs present, a name torch does not know)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r} ({exc})") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(device)!r} was asked for, but this process sees no CUDA device "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {str(device)!r} was asked for, but this process sees {count} CUDA device(s)")
    return device


def setup(device, model: nn.Module) -> tuple[DistContext, torch.device]:
    """The process group (initialized here under torchrun, once per process) and the device to train on.

    Not distributed: ``device``, or the model's when None. Distributed with CUDA: ``cuda:LOCAL_RANK``;
    on the CPU: ``device`` or ``cpu``."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    initialized = dist.is_available() and dist.is_initialized()
    if env_world <= 1 and not initialized:
        if device is None:
            params = list(model.parameters())
            device = params[0].device if params else torch.device("cpu")
        return DistContext(), check_device(device)
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
    return DistContext(dist.get_world_size(), dist.get_rank(), local_rank), device


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


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """``t`` summed over all processes, in place (unchanged for one process)."""
    if ctx.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def mix_seed(seed: int, rank: int, stream: int) -> int:
    """A seed per ``(seed, rank, stream)``: each rank and each random stream (global RNG, noise generator,
    validation) draws independently and reproducibly."""
    return (seed * 1_000_003 + rank * 7_919 + stream * 104_729) % (2**63 - 1)


def epoch_batches(n: int, local_batch: int, world: int, rank: int, seed: int, epoch: int, shuffle: bool,
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


"""physmdn: physics-consistent mixture density networks with fused C++/CUDA PyTorch ops."""

from __future__ import annotations

import torch

from ._loader import load_extension

_C, _build_config = load_extension()

__version__ = "0.1.0"

from . import reference  # noqa: E402
from ._mixture_nll import mixture_nll  # noqa: E402
from ._mixture_correlated import mixture_nll_lowrank, mixture_nll_tril  # noqa: E402
from . import _correlated_penalty  # noqa: E402,F401  (the correlated penalty op's fake kernels and autograd)
from . import physics, physics_scaling  # noqa: E402
from .physics import mdn_loss  # noqa: E402
from . import stationary  # noqa: E402
from .stationary import StationaryLaw  # noqa: E402
from . import _func  # noqa: E402,F401  (the functorch path of the ops)
from . import distributions, transport, models, training  # noqa: E402
from .distributions import GaussianMixture, Modes  # noqa: E402
from . import correlated  # noqa: E402
from .correlated import GaussianMixtureLowRank, GaussianMixtureTril  # noqa: E402
from .models import MDN, CFM  # noqa: E402
from . import constraints  # noqa: E402
from .constraints import ConstrainedMDN, LinearConstraint  # noqa: E402
from .training import CheckpointError, FitResult, LinearWarmup, fit, load, tune_physics_weight  # noqa: E402
from . import problems, metrics  # noqa: E402


def build_info() -> dict:
    """Build facts: package version, the torch whose headers the extension was compiled with (``torch_version``),
    the oldest torch it loads under (``torch_minimum``: it uses the LibTorch stable ABI of that version) and the
    torch running (``torch_running``), CUDA kernels, CUDA version, arch list,
    whether the CUDA lane-per-element schedule is compiled (``cuda_lanes_schedule``; CMake option
    ``PHYSMDN_CUDA_LANES``), CPU kernel variants and the one in use, CPU threads."""
    info = dict(_C.build_info())
    info["torch_running"] = torch.__version__
    info["cpu_isa"] = _C.cpu_isa()
    info["cpu_threads"] = torch.get_num_threads()
    info["cuda_available"] = torch.cuda.is_available()
    info["cpu_pool"] = cpu_pool_stats()
    return info


def cpu_pool_stats() -> dict:
    """The CPU buffer pool behind the ops' large outputs (gradients): ``limit_bytes``, ``cached_bytes`` (freed
    blocks kept for reuse), ``live_bytes`` (blocks in tensors now), ``hits`` and ``misses``.

    A training loop frees last step's gradients and allocates the same sizes again; glibc hands such
    multi-megabyte blocks back to the kernel, so each step would page-fault (and zero) them in anew, which costs
    more than the kernels. The pool keeps up to ``limit_bytes`` of freed blocks of exact sizes (default 256 MiB,
    environment variable ``PHYSMDN_CPU_POOL_MB``). The torch profiler does not see pooled memory (the stable ABI has no
    allocator hook)."""
    return dict(_C.cpu_pool_stats())


def set_cpu_pool_limit(limit_bytes: int) -> int:
    """Set the CPU buffer pool's cache limit in bytes (0 turns caching off and frees what is cached); returns
    the previous limit."""
    if not isinstance(limit_bytes, int) or isinstance(limit_bytes, bool) or limit_bytes < 0:
        raise ValueError(f"limit_bytes must be an int >= 0, got {limit_bytes!r}")
    return int(_C.set_cpu_pool_limit(limit_bytes))


def cpu_pool_release() -> None:
    """Free the blocks the CPU buffer pool has cached (tensors in use are not affected)."""
    _C.cpu_pool_release_cached()


__all__ = [
    "mixture_nll", "mixture_nll_tril", "mixture_nll_lowrank", "mdn_loss", "reference", "physics", "physics_scaling", "stationary",
    "StationaryLaw", "build_info", "__version__",
    "cpu_pool_stats", "set_cpu_pool_limit", "cpu_pool_release",
    "GaussianMixture", "GaussianMixtureTril", "GaussianMixtureLowRank", "Modes", "correlated",
    "MDN", "CFM", "fit", "load", "CheckpointError", "FitResult", "LinearWarmup",
    "distributions", "transport", "models", "training", "problems", "metrics",
]

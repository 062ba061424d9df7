"""physmdn: physics-consistent mixture density networks with fused C++/CUDA PyTorch ops."""

from __future__ import annotations

import torch

from ._loader import load_extension

_C, _build_config = load_extension()

__version__ = "0.1.0"

from . import reference  # noqa: E402
from ._ops import mixture_nll  # noqa: E402
from . import physics  # noqa: E402
from .physics import mdn_loss  # noqa: E402
from . import distributions, transport, models, training  # noqa: E402
from .distributions import GaussianMixture, Modes  # noqa: E402
from .models import MDN, CFM  # noqa: E402
from .training import FitResult, LinearWarmup, fit, load  # noqa: E402
from . import problems, metrics  # noqa: E402


def build_info() -> dict:
    """Build facts: package version, torch built against / running, CUDA kernels, CUDA version, arch list,
    CPU kernel variants and the one in use, CPU threads."""
    info = dict(_C.build_info())
    info["torch_running"] = torch.__version__
    info["cpu_isa"] = _C.cpu_isa()
    info["cpu_threads"] = torch.get_num_threads()
    info["cuda_available"] = torch.cuda.is_available()
    return info


__all__ = [
    "mixture_nll", "mdn_loss", "reference", "physics", "build_info", "__version__",
    "GaussianMixture", "Modes", "MDN", "CFM", "fit", "load", "FitResult", "LinearWarmup",
    "distributions", "transport", "models", "training", "problems", "metrics",
]

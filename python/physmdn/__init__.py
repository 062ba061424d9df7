"""physmdn: physics-consistent mixture density networks with fused C++/CUDA PyTorch ops."""

from __future__ import annotations

import torch

from ._loader import load_extension

_C, _build_config = load_extension()

from . import reference  # noqa: E402
from ._ops import mixture_nll  # noqa: E402

__version__ = "0.1.0"


def build_info() -> dict:
    """Build facts: package version, torch built against / running, CUDA kernels, CUDA version, arch list,
    CPU kernel variants and the one in use, CPU threads."""
    info = dict(_C.build_info())
    info["torch_running"] = torch.__version__
    info["cpu_isa"] = _C.cpu_isa()
    info["cpu_threads"] = torch.get_num_threads()
    info["cuda_available"] = torch.cuda.is_available()
    return info


__all__ = ["mixture_nll", "reference", "build_info", "__version__"]

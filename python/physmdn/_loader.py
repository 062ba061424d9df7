"""Loads the compiled extension ``physmdn._C`` and checks the running torch is one it supports.

The extension is built on the LibTorch stable ABI for a minimum torch (``_build_config.TORCH_MINIMUM``): one build
loads under that torch and every newer one, whatever torch's headers it was compiled with."""

from __future__ import annotations

import torch


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string such as ``2.13.0+cpu``."""
    parts = version.split("+")[0].split(".")
    return int(parts[0]), int(parts[1])


def load_extension():
    try:
        from . import _build_config
    except ImportError as exc:  # pragma: no cover - only in a broken source checkout
        raise ImportError(
            "physmdn is not built: install a wheel (pip install physmdn-*.whl) or build it from the source tree "
            "with `pip install --no-build-isolation .`"
        ) from exc
    built, running = _build_config.TORCH_VERSION, torch.__version__
    minimum = getattr(_build_config, "TORCH_MINIMUM", built)
    if _release(running) < _release(minimum):
        raise ImportError(
            f"physmdn needs torch >= {minimum}, but torch {running} is installed; upgrade torch "
            f"(pip install 'torch>={minimum}')"
        )
    try:
        from . import _C
    except ImportError as exc:
        raise ImportError(
            f"physmdn's compiled extension failed to load ({exc}). It was built with torch {built}'s headers for "
            f"torch >= {minimum}; running torch is {running}."
        ) from exc
    return _C, _build_config

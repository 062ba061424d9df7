"""Loads the compiled extension ``physmdn._C`` and checks it matches the running torch."""

from __future__ import annotations

import torch


def _torch_base(version: str) -> str:
    return version.split("+")[0]


def load_extension():
    try:
        from . import _build_config
    except ImportError as exc:  # pragma: no cover - only in a broken source checkout
        raise ImportError(
            "physmdn is not built: install it with `pip install --no-build-isolation .` "
            "(or `-e .`) from the source tree"
        ) from exc
    built, running = _build_config.TORCH_VERSION, torch.__version__
    if _torch_base(built) != _torch_base(running):
        raise ImportError(
            f"physmdn was built against torch {built} but torch {running} is installed; "
            "rebuild physmdn against this torch: pip install --no-build-isolation --force-reinstall --no-deps ."
        )
    try:
        from . import _C
    except ImportError as exc:
        raise ImportError(
            f"physmdn's compiled extension failed to load ({exc}). It was built against torch {built}; "
            f"running torch is {running}. Rebuild: pip install --no-build-isolation --force-reinstall --no-deps ."
        ) from exc
    return _C, _build_config

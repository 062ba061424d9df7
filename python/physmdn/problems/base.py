"""The problem protocol (:class:`Problem`), its data types (:class:`Defaults`, :class:`Sample`), seeding and the
registry behind :func:`get` / :func:`names`.

Layering: imports :mod:`physmdn._validation` and the problems' numerics, nothing above them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .. import _validation as check
from .numerics import rand

__all__ = ["Problem", "Defaults", "Sample", "get", "names", "register", "make_generator", "resolve_physics_mode",
           "merge_weights"]


# ----- data types and seeding -----------------------------------------------------------------------

@dataclass(frozen=True)
class Defaults:
    """Training defaults of a problem's models (used by the command line)."""

    components: int = 3
    hidden: tuple[int, ...] = (64, 64)
    epochs: int = 200
    n_train: int = 2048
    batch_size: int = 256
    lr: float = 3e-3
    physics_weight: float = 1.0


class Sample(NamedTuple):
    """A data set: contexts ``x [n, C]``, outcomes ``y [n, D]`` and branch / regime indices ``labels [n]`` (int64)."""

    x: torch.Tensor
    y: torch.Tensor
    labels: torch.Tensor


def make_generator(seed: int | None = None, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> torch.Generator | None:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``; ``generator`` is passed through; both None: None
    (the global RNG)."""
    if generator is not None:
        if seed is not None:
            raise ValueError(f"pass seed or generator, not both (got seed={seed!r} and a generator)")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    g = torch.Generator(device=torch.device(device) if device is not None else torch.device("cpu"))
    g.manual_seed(seed)
    return g


def _resolve_device(device, generator: torch.Generator | None) -> torch.device:
    if device is None:
        return generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator must live on the sampling device {device}, got a generator on {generator.device}")
    return device


# ----- the protocol ---------------------------------------------------------------------------------

class Problem:
    """Base class of the benchmark problems (see the module docstring for the protocol).

    Subclasses set the class attributes and implement ``_simulate(context [N, C], generator) -> (y [N, D],
    labels [N])``, :meth:`classify`, :meth:`physics` and :meth:`residual`.
    """

    name: str = ""
    context_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    branch_names: tuple[str, ...] = ()
    residual_names: tuple[str, ...] = ()
    is_field: bool = False
    #: the physics is component-specific (component k follows branch k): train with the labels as regimes
    component_specific: bool = False
    defaults: Defaults = Defaults()

    def __init__(self, context_low, context_high, log_context, reference_context):
        self.context_low = tuple(float(v) for v in context_low)
        self.context_high = tuple(float(v) for v in context_high)
        self.log_context = tuple(bool(v) for v in log_context)
        self.reference_context = tuple(float(v) for v in reference_context)
        for lo, hi, log, name in zip(self.context_low, self.context_high, self.log_context, self.context_names):
            if not hi >= lo:
                raise ValueError(f"{name} range must have high >= low, got ({lo}, {hi})")
            if log and not lo > 0:
                raise ValueError(f"{name} range is sampled log-uniformly and must be positive, got ({lo}, {hi})")
        self.config: dict = {}

    # ----- shapes -------------------------------------------------------------------------------------

    @property
    def context_dim(self) -> int:
        return len(self.context_names)

    @property
    def output_dim(self) -> int:
        return len(self.output_names)

    @property
    def n_branches(self) -> int:
        return len(self.branch_names)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args})"

    def check_context(self, context: torch.Tensor, name: str = "context") -> torch.Tensor:
        """Validate ``context [B, C]`` (floating point)."""
        if not isinstance(context, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, {self.context_dim}], got {type(context).__name__}")
        if context.dim() != 2 or context.shape[1] != self.context_dim:
            raise ValueError(f"{name} must be [B, C] with C = {self.context_dim} ({', '.join(self.context_names)}) "
                             f"for problem {self.name!r}, got shape {tuple(context.shape)}")
        if not context.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {context.dtype}")
        return context

    def _check_outcome(self, y: torch.Tensor, name: str = "y") -> torch.Tensor:
        if not isinstance(y, torch.Tensor) or y.dim() < 1 or y.shape[-1] != self.output_dim:
            raise ValueError(f"{name} must be [..., D] with D = {self.output_dim} for problem {self.name!r}, "
                             f"got shape {tuple(getattr(y, 'shape', ()))}")
        return y

    # ----- sampling -----------------------------------------------------------------------------------

    def sample_contexts(self, n: int, *, seed: int | None = None, generator: torch.Generator | None = None,
                        device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``n`` contexts ``[n, C]``, uniform in the context box (log-uniform in the dimensions marked so)."""
        n = check.count(n, "n")
        g = make_generator(seed, generator, device)
        device = _resolve_device(device, g)
        u = rand((n, self.context_dim), g, device, torch.float64 if dtype == torch.float64 else torch.float32)
        return self._from_unit(u).to(dtype)

    def _from_unit(self, u: torch.Tensor) -> torch.Tensor:
        cols = []
        for j, (lo, hi, log) in enumerate(zip(self.context_low, self.context_high, self.log_context)):
            if log:
                cols.append(torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * u[:, j]))
            else:
                cols.append(lo + (hi - lo) * u[:, j])
        return torch.stack(cols, dim=1)

    def context_grid(self, n: int, dim: int = 0, *, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``n`` contexts ``[n, C]`` sweeping context ``dim`` over its range (log-spaced where sampled
        log-uniformly), the others held at :attr:`reference_context` (for plots)."""
        n = check.count(n, "n")
        if not 0 <= dim < self.context_dim:
            raise ValueError(f"dim must index a context column in [0, {self.context_dim}), got {dim}")
        u = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
        grid = torch.tensor(self.reference_context, dtype=torch.float64).repeat(n, 1)
        unit = torch.zeros(n, self.context_dim, dtype=torch.float64)
        unit[:, dim] = u
        grid[:, dim] = self._from_unit(unit)[:, dim]
        return grid.to(device=device, dtype=dtype)

    def sample(self, n: int, *, seed: int | None = None, generator: torch.Generator | None = None, device=None,
               dtype: torch.dtype = torch.float32) -> Sample:
        """A data set of ``n`` independent (context, outcome) pairs: :class:`Sample` ``(x [n, C], y [n, D],
        labels [n])``."""
        g = make_generator(seed, generator, device)
        device = _resolve_device(device, g)
        x = self.sample_contexts(n, generator=g, device=device, dtype=dtype)
        with torch.no_grad():
            y, labels = self._simulate(x, g)
        return Sample(x, y.to(dtype), labels)

    def sample_truth(self, context: torch.Tensor, n: int, *, seed: int | None = None,
                     generator: torch.Generator | None = None, return_labels: bool = False):
        """``n`` draws of the true ``p(y | context)`` for each of the ``B`` contexts: ``[n, B, D]`` (sample dimension
        first); with ``return_labels=True`` also the branch indices ``[n, B]``. Runs on ``context``'s device."""
        context = self.check_context(context)
        n = check.count(n, "n")
        g = make_generator(seed, generator, context.device)
        _resolve_device(context.device, g)
        B = context.shape[0]
        with torch.no_grad():
            y, labels = self._simulate(context.detach().repeat(n, 1), g)  # sample-major: row s * B + b
        y = y.to(context.dtype).reshape(n, B, self.output_dim)
        labels = labels.reshape(n, B)
        return (y, labels) if return_labels else y

    def true_weights(self, context: torch.Tensor) -> torch.Tensor | None:
        """Branch probabilities ``[B, M]`` (``M = n_branches``, order of :attr:`branch_names`), or None where no
        closed form is known."""
        return None

    def branch_means(self, context: torch.Tensor) -> torch.Tensor | None:
        """Noise-free outcome of every branch ``[B, M, D]`` (NaN where a branch does not exist at that context), or
        None where branches are families of states (fields). Used to mark the true modes in plots."""
        return None

    # ----- to implement -------------------------------------------------------------------------------

    def _simulate(self, context: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def classify(self, y: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """Branch index ``[...]`` (int64) of outcomes ``y [..., D]`` under ``context [..., C]`` (broadcast)."""
        raise NotImplementedError

    def physics(self, context: torch.Tensor, components: int | None = None) -> list:  # pragma: no cover
        """``[(spec, weight), ...]`` for an MDN evaluated on ``context [B, C]``."""
        raise NotImplementedError

    def residual(self, y: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """Physical residual ``[..., M]`` of outcomes ``y [..., D]`` under ``context [..., C]`` (broadcast);
        columns named by :attr:`residual_names` (fields: one per grid point)."""
        raise NotImplementedError


# ----- constructor helpers of the problems ----------------------------------------------------------

def resolve_physics_mode(mode) -> str:
    """The moment of a problem's residual penalty (physics.MOMENTS, or the older names 'exact' / 'mean')."""
    if mode not in ("second", "first", "point", "exact", "mean"):
        raise ValueError(f"physics_mode must be 'second', 'first' or 'point' (or 'exact' / 'mean'), got {mode!r}")
    return {"exact": "second", "mean": "point"}.get(mode, mode)


def merge_weights(defaults: dict, given: dict | None) -> dict:
    """``defaults`` (penalty name -> weight) updated by ``given``, whose keys must be among the defaults' and
    whose values must be finite numbers >= 0."""
    weights = dict(defaults)
    for key, value in (given or {}).items():
        if key not in weights:
            raise ValueError(f"physics_weights keys must be among {sorted(weights)}, got {key!r}")
        weights[key] = check.nonnegative(value, f"physics_weights[{key!r}]")
    return weights


# ----- registry -------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Problem]] = {}


def register(cls: type[Problem]) -> type[Problem]:
    """Class decorator: make a :class:`Problem` subclass available to :func:`get` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"problem class {cls.__name__} must set a name")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    """Registered problem names, sorted."""
    return sorted(_REGISTRY)


def get(name: str, **kwargs) -> Problem:
    """The problem ``name`` (``-`` and ``_`` are interchangeable, case-insensitive), built with ``kwargs``."""
    if not isinstance(name, str):
        raise TypeError(f"problem name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"unknown problem {name!r}; valid names: {', '.join(names())}")
    return _REGISTRY[key](**kwargs)

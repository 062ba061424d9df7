"""Scientific benchmark problems: seedable data generators, ground truth and physics specs per problem.

Every problem maps a context ``x [C]`` to a multimodal conditional distribution ``p(y | x)`` over ``y [D]``:

============================  ===========================  =======  ======  =========================================
name                          context                      ``C``    ``D``   modes (branches)
============================  ===========================  =======  ======  =========================================
``pitchfork``                 ``r``                        1        1       single equilibrium, upper, lower
``allen_cahn``                ``eps, sigma, bias``         3        32      all +1, all -1, kink states
``hugoniot``                  ``u_p`` (km/s)               1        2       elastic, plastic, phase-transformed
``reaction_diffusion``        ``D, a``                     2        32      uniform low, uniform high, pinned fronts
============================  ===========================  =======  ======  =========================================

Common protocol (:class:`Problem`), all tensors in the problem's physical units:

* ``sample(n, seed=..., device=...) -> Sample(x [n, C], y [n, D], labels [n])``: contexts drawn by
  :meth:`~Problem.sample_contexts`, one outcome per context, and the branch (regime) index of every outcome;
* ``sample_truth(context [B, C], n) -> [n, B, D]``: ``n`` draws of the true conditional distribution per context
  (sample dimension first, like :meth:`physmdn.distributions.GaussianMixture.sample`);
* ``true_weights(context) -> [B, M]`` branch probabilities where they are known in closed form, else ``None``;
* ``classify(y [..., D], context [..., C]) -> [...]`` the branch of an outcome (used by the mode-weight metric);
* ``physics(context [B, C]) -> [(spec, weight), ...]`` the :mod:`physmdn.physics` specs of the problem's MDN
  (``components=K`` for problems whose specs are component-specific);
* ``residual(y [..., D], context [..., C]) -> [..., M]`` the physical residual of outcomes, in plain torch.

Generators are vectorized torch code and run on any device; ``seed=s`` (or a ``torch.Generator``) makes a draw
reproducible on that device. :func:`get` looks problems up by name.

Layering: imports :mod:`physmdn.physics` (lazily, in ``physics()``), nothing above it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "Problem", "Defaults", "Sample", "Pitchfork", "AllenCahn", "Hugoniot", "ReactionDiffusion",
    "get", "names", "register", "make_generator", "second_difference", "cubic_equilibria",
]


# ----- shared pieces --------------------------------------------------------------------------------

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


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Simulations run in float64 when asked for it, otherwise float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rand(shape, g, device, dtype) -> torch.Tensor:
    return torch.rand(shape, generator=g, device=device, dtype=dtype)


def _randn(shape, g, device, dtype) -> torch.Tensor:
    return torch.randn(shape, generator=g, device=device, dtype=dtype)


@contextlib.contextmanager
def _few_threads(numel: int, device: torch.device, threshold: int = 1 << 18):
    """One intra-op CPU thread while stepping small fields: the simulations take thousands of tiny steps, and with
    several threads every small matmul pays a fork/join (and stalls when other processes share the cores; measured
    20x slower on two busy cores). The previous thread count is restored."""
    previous = torch.get_num_threads()
    if device.type != "cpu" or numel >= threshold or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def second_difference(n: int, boundary: str, dtype: torch.dtype = torch.float64,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """The ``[n, n]`` second-difference matrix ``L``: ``(L u)_i = u_{i-1} - 2 u_i + u_{i+1}``.

    ``boundary="periodic"`` wraps around; ``"neumann"`` uses mirror ghost points ``u_{-1} = u_1``,
    ``u_n = u_{n-2}`` (the convention of :class:`physmdn.physics.Stencil1D`).
    """
    if boundary not in ("periodic", "neumann"):
        raise ValueError(f"boundary must be 'periodic' or 'neumann', got {boundary!r}")
    if n < 3:
        raise ValueError(f"n must be >= 3 grid points, got {n}")
    L = torch.zeros(n, n, dtype=dtype, device=device)
    idx = torch.arange(n, device=device)
    L[idx, idx] = -2.0
    if boundary == "periodic":
        L[idx, (idx - 1) % n] += 1.0
        L[idx, (idx + 1) % n] += 1.0
    else:
        left = torch.where(idx == 0, idx + 1, idx - 1)
        right = torch.where(idx == n - 1, idx - 1, idx + 1)
        L[idx, left] += 1.0
        L[idx, right] += 1.0
    return L


class _ImplicitDiffusion:
    """Applies ``(I - c L)^{-1}`` row-wise with a per-row ``c >= 0``, through ``L = V diag(lam) V^{-1}``.

    ``L`` (:func:`second_difference`) is self-adjoint in the trapezoid inner product ``W = diag(1/2, 1, .., 1, 1/2)``
    (Neumann; ``W = I`` periodic), so ``W^{1/2} L W^{-1/2} = Q diag(lam) Q^T`` (``eigh``, float64) and
    ``V = W^{-1/2} Q``, ``V^{-1} = Q^T W^{1/2}``. A fixed point of the semi-implicit step
    ``u <- (I - dt a L / h^2)^{-1} (u + dt f(u))`` is then exactly a zero of ``a L u / h^2 + f(u)``.
    """

    def __init__(self, n: int, boundary: str, device, dtype):
        L = second_difference(n, boundary)
        w = torch.ones(n, dtype=torch.float64)
        if boundary == "neumann":
            w[0] = w[-1] = 0.5
        sym = w.sqrt()[:, None] * L / w.sqrt()[None, :]
        lam, Q = torch.linalg.eigh(0.5 * (sym + sym.T))
        self.lam = lam.clamp(max=0.0).to(device=device, dtype=dtype)  # [n], in [-4, 0]
        self.V = (Q / w.sqrt()[:, None]).to(device=device, dtype=dtype)  # columns: eigenvectors of L
        self.V_inv = (Q.T * w.sqrt()[None, :]).to(device=device, dtype=dtype)

    def factors(self, c: torch.Tensor) -> torch.Tensor:
        """``1 / (1 - c lam)`` for ``c [N, 1]``: ``[N, n]``."""
        return 1.0 / (1.0 - c * self.lam)

    def __call__(self, u: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        return ((u @ self.V_inv.T) * factors) @ self.V.T


def _stencil_residual(u: torch.Tensor, diffusion: torch.Tensor, reaction: torch.Tensor, spacing: float,
                      boundary: str) -> torch.Tensor:
    """``diffusion (L u)_i / spacing^2 + f(u_i)`` for ``u [..., n]``, ``diffusion [..., 1]``, ``f`` the values
    ``reaction [..., n]`` already evaluated: ``[..., n]``."""
    if boundary == "periodic":
        left, right = u.roll(1, -1), u.roll(-1, -1)
    else:
        left = torch.cat([u[..., 1:2], u[..., :-1]], -1)
        right = torch.cat([u[..., 1:], u[..., -2:-1]], -1)
    return diffusion * (left - 2.0 * u + right) / spacing**2 + reaction


def cubic_equilibria(r: torch.Tensor, h: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Equilibria of ``dy/dt = r y - y^3 + h``: ``(lower, middle, upper)``, each shaped like ``r``.

    Where the cubic has three real roots (``4 r^3 > 27 h^2``) ``lower < middle < upper`` (the middle one is
    unstable); where it has one, all three entries hold that root. Trigonometric / hyperbolic closed forms of
    ``y^3 - r y - h = 0``, polished by two Newton steps, computed in float64.
    """
    r64 = r.to(torch.float64)
    h64 = torch.as_tensor(h, dtype=torch.float64, device=r.device).expand_as(r64)
    three = 4.0 * r64**3 > 27.0 * h64**2
    rp = r64.clamp(min=1e-300)
    # three real roots: y_k = 2 sqrt(r/3) cos(theta/3 - 2 pi k / 3), theta = arccos(3 h / (2 r) sqrt(3 / r))
    arg = (1.5 * h64 / rp * torch.sqrt(3.0 / rp)).clamp(-1.0, 1.0)
    theta = torch.arccos(arg) / 3.0
    amp = 2.0 * torch.sqrt(rp / 3.0)
    upper3 = amp * torch.cos(theta)
    middle3 = amp * torch.cos(theta - 2.0 * math.pi / 3.0)
    lower3 = amp * torch.cos(theta - 4.0 * math.pi / 3.0)
    # one real root
    rn = (-r64).clamp(min=1e-300)  # r < 0: y = 2 sqrt(-r/3) sinh(asinh(3 h / (2 (-r)) sqrt(3 / (-r))) / 3)
    single_neg = 2.0 * torch.sqrt(rn / 3.0) * torch.sinh(torch.asinh(1.5 * h64 / rn * torch.sqrt(3.0 / rn)) / 3.0)
    # 0 < r, 4 r^3 < 27 h^2: y = 2 sign(h) sqrt(r/3) cosh(acosh(3 |h| / (2 r) sqrt(3 / r)) / 3)
    arg_pos = (1.5 * h64.abs() / rp * torch.sqrt(3.0 / rp)).clamp(min=1.0)
    single_pos = 2.0 * torch.sign(h64) * torch.sqrt(rp / 3.0) * torch.cosh(torch.acosh(arg_pos) / 3.0)
    single_zero = torch.sign(h64) * h64.abs().pow(1.0 / 3.0)
    single = torch.where(r64 < 0, single_neg, torch.where(r64 > 0, single_pos, single_zero))

    def polish(y):
        for _ in range(2):
            slope = r64 - 3.0 * y * y
            step = (r64 * y - y**3 + h64) / torch.where(slope.abs() > 1e-12, slope, torch.full_like(slope, 1e-12))
            y = torch.where(slope.abs() > 1e-6, y - step, y)
        return y

    lower = polish(torch.where(three, lower3, single))
    middle = polish(torch.where(three, middle3, single))
    upper = polish(torch.where(three, upper3, single))
    return lower.to(r.dtype), middle.to(r.dtype), upper.to(r.dtype)


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
        n = _check_count(n, "n")
        g = make_generator(seed, generator, device)
        device = _resolve_device(device, g)
        u = _rand((n, self.context_dim), g, device, torch.float64 if dtype == torch.float64 else torch.float32)
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
        n = _check_count(n, "n")
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
        n = _check_count(n, "n")
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


def _check_count(n, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {n!r}")
    return n


def _check_range(value, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from None
    if not hi >= lo:
        raise ValueError(f"{name} must have high >= low, got ({lo}, {hi})")
    return lo, hi


def _check_nonneg(value, name: str) -> float:
    value = float(value)
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def _check_pos(value, name: str) -> float:
    value = float(value)
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _check_physics_mode(mode) -> str:
    """The moment of a problem's residual penalty (physics.MOMENTS, or the older names 'exact' / 'mean')."""
    if mode not in ("second", "first", "point", "exact", "mean"):
        raise ValueError(f"physics_mode must be 'second', 'first' or 'point' (or 'exact' / 'mean'), got {mode!r}")
    return {"exact": "second", "mean": "point"}.get(mode, mode)


def _physics_module():
    try:
        from . import physics
    except ImportError as exc:  # pragma: no cover - physics ships with the package
        raise RuntimeError("problem physics needs physmdn.physics, which is not available in this installation") from exc
    return physics


def _merge_weights(defaults: dict, given: dict | None) -> dict:
    weights = dict(defaults)
    for key, value in (given or {}).items():
        if key not in weights:
            raise ValueError(f"physics_weights keys must be among {sorted(weights)}, got {key!r}")
        weights[key] = float(value)
    return weights


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


# ----- a. pitchfork ---------------------------------------------------------------------------------

@register
class Pitchfork(Problem):
    """Supercritical pitchfork bifurcation, long-time state from random initial conditions.

    ``dy/dt = f(y) = r y - y^3 + h``, ``y(0) ~ U(-init_range, init_range)``, observed
    ``y = y(infinity) + noise * N(0, 1)``. Context ``r in [-1, 1]``; ``h`` (imperfection) is a problem parameter.

    * ``h = 0``: ``y(inf) = 0`` for ``r <= 0``; ``+-sqrt(r)`` with weights ``1/2`` each for ``r > 0`` (closed form).
    * ``h != 0``: the ODE is integrated (vectorized RK4, ``ode_steps`` steps of adaptive size
      ``dt = min(ode_max_dt, 0.5 / |f'(y)|)``, which crosses slow stretches near a fold quickly and resolves the
      approach to an equilibrium, then a guarded Newton polish); where ``4 r^3 > 27 h^2`` the state goes to the upper stable equilibrium iff ``y(0)`` exceeds the
      middle (unstable) one, so the upper weight is ``clip((init_range - y_mid) / (2 init_range), 0, 1)``.

    Branches: ``0 = single`` (the only stable equilibrium), ``1 = upper``, ``2 = lower``.
    Physics (per component, mean ``mu``): equilibrium ``r mu - mu^3 + h = 0`` (:class:`~physmdn.physics.Polynomial`,
    ``coeffs = [h, r, 0, -1]``) and stability ``f'(mu) = r - 3 mu^2 < 0`` (:class:`~physmdn.physics.Stability`,
    ``coeffs = [r, 0, -3]``). Residual columns: ``equilibrium = r y - y^3 + h``,
    ``stability = relu(r - 3 y^2)``.
    """

    name = "pitchfork"
    context_names = ("r",)
    output_names = ("y",)
    branch_names = ("single", "upper", "lower")
    residual_names = ("equilibrium", "stability")
    defaults = Defaults(components=3, hidden=(64, 64), epochs=150, n_train=2048, batch_size=256, lr=3e-3)

    def __init__(self, imperfection: float = 0.0, noise: float = 0.05, r_range=(-1.0, 1.0), init_range: float = 2.0,
                 ode_steps: int = 400, ode_max_dt: float = 2.0, physics_mode: str = "second",
                 physics_weights: dict | None = None):
        lo, hi = _check_range(r_range, "r_range")
        super().__init__((lo,), (hi,), (False,), (0.5 * (lo + hi),))
        self.h = float(imperfection)
        if not math.isfinite(self.h):
            raise ValueError(f"imperfection must be finite, got {imperfection}")
        self.noise = _check_nonneg(noise, "noise")
        self.init_range = _check_pos(init_range, "init_range")
        self.ode_steps = _check_count(ode_steps, "ode_steps")
        self.ode_max_dt = _check_pos(ode_max_dt, "ode_max_dt")
        self.physics_mode = _check_physics_mode(physics_mode)
        self.physics_weights = _merge_weights({"equilibrium": 1.0, "stability": 1.0}, physics_weights)
        self.config = dict(imperfection=self.h, noise=self.noise, r_range=(lo, hi), init_range=self.init_range,
                           ode_steps=self.ode_steps, ode_max_dt=self.ode_max_dt, physics_mode=physics_mode,
                           physics_weights=self.physics_weights)

    def equilibria(self, r: torch.Tensor):
        """``(lower, middle, upper)`` equilibria for ``r [...]`` (see :func:`cubic_equilibria`)."""
        return cubic_equilibria(r, self.h)

    def long_time_state(self, r: torch.Tensor, y0: torch.Tensor, method: str | None = None) -> torch.Tensor:
        """``y(t -> infinity)`` from ``y(0) = y0`` (both ``[N]``). ``method``: ``"closed"`` (only ``h = 0``),
        ``"ode"`` (RK4 integration) or ``"roots"`` (the stable equilibrium of ``y0``'s basin); default:
        closed form for ``h = 0``, else the ODE."""
        method = method or ("closed" if self.h == 0.0 else "ode")
        if method == "closed":
            if self.h != 0.0:
                raise ValueError(f"method 'closed' needs imperfection 0, got {self.h}")
            return torch.where(r > 0, torch.sign(y0) * torch.sqrt(r.clamp(min=0.0)), torch.zeros_like(y0))
        if method == "roots":
            lower, middle, upper = self.equilibria(r)
            return torch.where(y0 > middle, upper, lower)
        if method != "ode":
            raise ValueError(f"method must be 'closed', 'ode' or 'roots', got {method!r}")
        h = self.h

        def f(y):
            return r * y - y * y * y + h

        y = y0.clone()
        for _ in range(self.ode_steps):
            dt = (0.5 / (r - 3.0 * y * y).abs().clamp(min=1e-12)).clamp(max=self.ode_max_dt)
            k1 = f(y)
            k2 = f(y + 0.5 * dt * k1)
            k3 = f(y + 0.5 * dt * k2)
            k4 = f(y + dt * k3)
            y = y + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        for _ in range(3):  # Newton polish, kept only where it reduces |f| (slow passages near a fold)
            slope = r - 3.0 * y * y
            candidate = y - f(y) / torch.where(slope.abs() > 1e-8, slope, torch.full_like(slope, -1e-8))
            y = torch.where(f(candidate).abs() < f(y).abs(), candidate, y)
        return y

    def _labels(self, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        lower, middle, upper = self.equilibria(r)
        bistable = upper > lower
        side = torch.where(y > middle, torch.ones_like(y, dtype=torch.long), torch.full_like(y, 2, dtype=torch.long))
        return torch.where(bistable, side, torch.zeros_like(side))

    def _simulate(self, context, generator):
        r = context[:, 0].to(_work_dtype(context.dtype))
        y0 = (2.0 * _rand(r.shape, generator, r.device, r.dtype) - 1.0) * self.init_range
        y_inf = self.long_time_state(r, y0)
        labels = self._labels(y_inf, r)
        y = y_inf + self.noise * _randn(r.shape, generator, r.device, r.dtype)
        return y.unsqueeze(-1), labels

    def true_weights(self, context):
        r = self.check_context(context)[:, 0]
        lower, middle, upper = self.equilibria(r.to(torch.float64))
        bistable = upper > lower
        w_upper = ((self.init_range - middle) / (2.0 * self.init_range)).clamp(0.0, 1.0)
        zero = torch.zeros_like(w_upper)
        weights = torch.stack([torch.where(bistable, zero, zero + 1.0),
                               torch.where(bistable, w_upper, zero),
                               torch.where(bistable, 1.0 - w_upper, zero)], dim=-1)
        return weights.to(context.dtype)

    def branch_means(self, context):
        r = self.check_context(context)[:, 0]
        lower, _, upper = self.equilibria(r)
        nan = torch.full_like(r, math.nan)
        bistable = upper > lower
        single = torch.where(bistable, nan, upper)
        return torch.stack([single, torch.where(bistable, upper, nan), torch.where(bistable, lower, nan)], -1)[..., None]

    def classify(self, y, context):
        """Nearest stable equilibrium: ``single`` where there is one, else ``upper`` / ``lower`` by the side of
        the unstable middle equilibrium."""
        y = self._check_outcome(y)[..., 0]
        r = torch.broadcast_to(context[..., 0], y.shape)
        return self._labels(y.to(torch.float64), r.to(torch.float64))

    def physics(self, context, components=None):
        P = _physics_module()
        r = self.check_context(context)[:, 0]
        B = r.shape[0]
        zero = torch.zeros_like(r)
        coeffs = torch.stack([zero + self.h, r, zero, zero - 1.0], dim=-1).reshape(B, 1, 1, 4)
        slope = torch.stack([r, zero, zero - 3.0], dim=-1).reshape(B, 1, 1, 3)
        w = self.physics_weights
        return [(P.Polynomial(coeffs, moment=self.physics_mode, noise_scale=self.noise), w["equilibrium"]),
                (P.Stability(slope), w["stability"])]

    def residual(self, y, context):
        y = self._check_outcome(y)[..., 0]
        r = context[..., 0]
        return torch.stack([r * y - y**3 + self.h, F.relu(r - 3.0 * y * y)], dim=-1)


# ----- b. stochastic Allen–Cahn ---------------------------------------------------------------------

@register
class AllenCahn(Problem):
    """Stochastic Allen–Cahn field on a periodic 1-D grid, metastable states after a quench.

    ``u_t = eps u_xx + u - u^3 + sigma xi`` on ``[0, length)`` with ``grid`` points, spacing
    ``h = length / grid``, ``u_xx`` the periodic second difference. Initial field ``u_i(0) = bias +
    init_amplitude N(0, 1)``. Semi-implicit Euler–Maruyama, step ``dt``:

    ``u^{n+1} = (I - dt eps L / h^2)^{-1} (u^n + dt (u^n - (u^n)^3) + sigma sqrt(dt) xi^n)``,
    ``xi^n_i ~ N(0, 1)`` (noise independent per grid point and step), implicit diffusion by the exact
    eigen-decomposition of ``L``. Noise acts for ``noise_time``, then the field relaxes noise-free for
    ``relax_time`` (a quench), so the output sits at (or very near) a steady state of
    ``eps u_xx + u - u^3 = 0``; the observation adds ``noise * N(0, 1)`` per point.

    Context ``(eps, sigma, bias)``: ``eps`` log-uniform in ``eps_range``, ``sigma``, ``bias`` uniform. Outcome
    ``y = u(T) [grid]``. Branches: ``0 = plus`` (all ``u > 0``, the state ``+1``), ``1 = minus`` (``-1``),
    ``2 = kinks`` (kink–antikink pairs, metastable for small ``eps``). The bias tilts the odds; large ``eps`` leaves
    no room for kinks (``eps (2 pi / length)^2 > 1``: only the uniform mode is unstable at ``u = 0``).

    Physics: the steady residual ``r_i = eps (u_{i-1} - 2 u_i + u_{i+1}) / h^2 + u_i - u_i^3``
    (:class:`~physmdn.physics.Stencil1D`, periodic, ``reaction = [0, 1, 0, -1]``); residual columns ``r_i``.
    """

    name = "allen_cahn"
    context_names = ("eps", "sigma", "bias")
    branch_names = ("plus", "minus", "kinks")
    is_field = True
    # docs/results.md §3: weight 0.01 raised the energy distance 4x (n = 1024); 0.001 ties plain MDN with a
    # 2.5x lower residual
    defaults = Defaults(components=8, hidden=(128, 128), epochs=150, n_train=4096, batch_size=256, lr=2e-3,
                        physics_weight=0.001)

    def __init__(self, grid: int = 32, length: float = 1.0, eps_range=(1e-3, 2e-2), sigma_range=(0.0, 1.0),
                 bias_range=(-0.2, 0.2), init_amplitude: float = 0.1, noise: float = 0.02, dt: float = 0.1,
                 noise_time: float = 10.0, relax_time: float = 20.0, physics_mode: str = "first",
                 physics_weights: dict | None = None):
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 3:
            raise ValueError(f"grid must be an integer >= 3, got {grid!r}")
        eps_range = _check_range(eps_range, "eps_range")
        sigma_range = _check_range(sigma_range, "sigma_range")
        bias_range = _check_range(bias_range, "bias_range")
        if eps_range[0] <= 0:
            raise ValueError(f"eps_range must be positive, got {eps_range}")
        if sigma_range[0] < 0:
            raise ValueError(f"sigma_range must be >= 0, got {sigma_range}")
        low, high = zip(eps_range, sigma_range, bias_range)
        reference = (math.sqrt(eps_range[0] * eps_range[1]), 0.5 * sum(sigma_range), 0.5 * sum(bias_range))
        super().__init__(low, high, (True, False, False), reference)
        self.grid, self.length = grid, _check_pos(length, "length")
        self.spacing = self.length / grid
        self.output_names = tuple(f"u{i}" for i in range(grid))
        self.residual_names = tuple(f"r{i}" for i in range(grid))
        self.init_amplitude = _check_nonneg(init_amplitude, "init_amplitude")
        self.noise = _check_nonneg(noise, "noise")
        self.dt = _check_pos(dt, "dt")
        self.noise_time = _check_nonneg(noise_time, "noise_time")
        self.relax_time = _check_nonneg(relax_time, "relax_time")
        self.physics_mode = _check_physics_mode(physics_mode)
        self.physics_weights = _merge_weights({"steady": 1.0, "stability": 100.0}, physics_weights)
        self.config = dict(grid=grid, length=self.length, eps_range=eps_range, sigma_range=sigma_range,
                           bias_range=bias_range, init_amplitude=self.init_amplitude, noise=self.noise, dt=self.dt,
                           noise_time=self.noise_time, relax_time=self.relax_time, physics_mode=physics_mode,
                           physics_weights=self.physics_weights)

    def _simulate(self, context, generator):
        work = _work_dtype(context.dtype)
        ctx = context.to(work)
        N, device = ctx.shape[0], ctx.device
        eps, sigma, bias = ctx[:, 0:1], ctx[:, 1:2], ctx[:, 2:3]
        solver = _ImplicitDiffusion(self.grid, "periodic", device, work)
        factors = solver.factors(self.dt * eps / self.spacing**2)
        u = bias + self.init_amplitude * _randn((N, self.grid), generator, device, work)
        noise_amp = sigma * math.sqrt(self.dt)
        with _few_threads(u.numel(), device):
            for _ in range(int(round(self.noise_time / self.dt))):
                rhs = u + self.dt * (u - u**3) + noise_amp * _randn((N, self.grid), generator, device, work)
                u = solver(rhs, factors)
            for _ in range(int(round(self.relax_time / self.dt))):
                u = solver(u + self.dt * (u - u**3), factors)
        labels = self._labels(u)
        if self.noise > 0:
            u = u + self.noise * _randn(u.shape, generator, device, work)
        return u, labels

    @staticmethod
    def _labels(u: torch.Tensor) -> torch.Tensor:
        plus, minus = (u > 0).all(-1), (u < 0).all(-1)
        return torch.where(plus, 0, torch.where(minus, 1, 2)).long()

    def classify(self, y, context):
        """``plus`` where every point is ``> 0``, ``minus`` where every point is ``< 0``, else ``kinks``."""
        return self._labels(self._check_outcome(y))

    def physics(self, context, components=None):
        P = _physics_module()
        eps = self.check_context(context)[:, 0:1]  # [B, 1]
        reaction = torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=context.dtype, device=context.device).reshape(1, 1, 4)
        spec = P.Stencil1D(eps, reaction, spacing=self.spacing, boundary="periodic", moment=self.physics_mode,
                           noise_scale=self.noise)
        # the steady residual is zero on the unstable u = 0 too: the field stability prior excludes it
        slope = torch.tensor([1.0, 0.0, -3.0], dtype=context.dtype, device=context.device).reshape(1, 1, 3)
        stability = P.FieldStability(eps, slope, spacing=self.spacing, boundary="periodic")
        return [(spec, self.physics_weights["steady"]), (stability, self.physics_weights["stability"])]

    def residual(self, y, context):
        u = self._check_outcome(y)
        eps = context[..., 0:1]
        return _stencil_residual(u, eps, u - u**3, self.spacing, "periodic")


# ----- c. shock Hugoniot with regime switching ------------------------------------------------------

_IRON_REGIMES = (
    # name, c0 [km/s], s [-]; iron-like, illustrative (not a fit to one data set)
    ("elastic", 5.95, 1.00),  # elastic precursor: near the longitudinal sound speed
    ("plastic", 4.63, 1.33),  # bcc alpha phase, bulk response
    ("transformed", 3.94, 1.58),  # hcp epsilon phase above the alpha -> epsilon transition (~13 GPa)
)


@register
class Hugoniot(Problem):
    """Shock Hugoniot of an iron-like solid with three regimes, selected at random with smooth odds.

    Context: particle velocity ``u_p`` [km/s]. Outcome ``(U_s [km/s], P [GPa])``. Regime ``k`` (``0 = elastic``,
    ``1 = plastic``, ``2 = transformed``) follows a linear ``U_s``–``u_p`` law and the Rankine–Hugoniot momentum
    jump condition:

    ``U_s = c0_k + s_k u_p + noise * N(0, 1)``,  ``P = rho0 U_s u_p (+ pressure_noise * N(0, 1))``

    with ``rho0`` in g/cm^3 (``rho0 U_s u_p`` is then in GPa). Defaults: ``rho0 = 7.87``; ``(c0, s) =
    (5.95, 1.00)``, ``(4.63, 1.33)``, ``(3.94, 1.58)``. Regime odds are an ordered logit in ``u_p``:

    ``P(k >= 1) = sigmoid((u_p - t1) / w)``, ``P(k >= 2) = sigmoid((u_p - t2) / w)``,
    ``thresholds = (t1, t2) = (0.35, 1.1)`` km/s, ``width = w = 0.15`` km/s,

    so neighbouring regimes overlap around each threshold and the outcome is multimodal there. Labels are the
    regimes. With ``pressure_noise = 0`` the data satisfy Rankine–Hugoniot exactly.

    Physics (MDN with ``K`` components, component ``k`` follows regime ``k mod 3``): the regime law
    ``U_s - (c0_k + s_k u_p) = 0`` (:class:`~physmdn.physics.Linear`, ``A = [1, 0]``), Rankine–Hugoniot
    ``P - rho0 u_p U_s = 0`` (:class:`~physmdn.physics.Linear`, ``A = [-rho0 u_p, 1]``, ``b = 0``, on the means:
    a diagonal Gaussian cannot lie on that line, so the distribution-level penalty would only shrink ``sigma``;
    weight ``1 / rho0^2`` so its penalty is in (km/s)^2 like the law's) and ``dU_s / du_p >= 0``
    (:class:`~physmdn.physics.Monotonic`; ``physics()`` marks the context ``requires_grad`` for it, so call it
    before the forward pass, as :func:`physmdn.training.fit` does; weight 0 drops it). Residual columns:
    ``rankine_hugoniot = P - rho0 u_p U_s`` [GPa], ``regime_law = min_k |U_s - c0_k - s_k u_p|`` [km/s].
    """

    name = "hugoniot"
    context_names = ("u_p",)
    output_names = ("U_s", "P")
    branch_names = tuple(name for name, _, _ in _IRON_REGIMES)
    residual_names = ("rankine_hugoniot", "regime_law")
    component_specific = True
    defaults = Defaults(components=3, hidden=(64, 64), epochs=150, n_train=2048, batch_size=256, lr=3e-3)

    def __init__(self, rho0: float = 7.87, regimes=_IRON_REGIMES, thresholds=(0.35, 1.1), width: float = 0.15,
                 up_range=(0.05, 2.0), noise: float = 0.05, pressure_noise: float = 0.0, physics_mode: str = "second",
                 physics_weights: dict | None = None):
        lo, hi = _check_range(up_range, "up_range")
        super().__init__((lo,), (hi,), (False,), (0.5 * (lo + hi),))
        self.rho0 = _check_pos(rho0, "rho0")
        regimes = tuple((str(n), float(c0), float(s)) for n, c0, s in regimes)
        if len(regimes) != 3:
            raise ValueError(f"regimes must list 3 (name, c0, s) triples, got {len(regimes)}")
        self.regimes = regimes
        self.branch_names = tuple(n for n, _, _ in regimes)
        t1, t2 = _check_range(thresholds, "thresholds")
        self.thresholds = (t1, t2)
        self.width = _check_pos(width, "width")
        self.noise = _check_nonneg(noise, "noise")
        self.pressure_noise = _check_nonneg(pressure_noise, "pressure_noise")
        self.physics_mode = _check_physics_mode(physics_mode)
        self.physics_weights = _merge_weights(
            {"regime_law": 1.0, "rankine_hugoniot": 1.0 / self.rho0**2, "monotonic": 1.0}, physics_weights)
        self.config = dict(rho0=self.rho0, regimes=regimes, thresholds=self.thresholds, width=self.width,
                           up_range=(lo, hi), noise=self.noise, pressure_noise=self.pressure_noise,
                           physics_mode=physics_mode, physics_weights=self.physics_weights)

    def _law(self, up: torch.Tensor) -> torch.Tensor:
        """``c0_k + s_k u_p``: ``[..., 3]``."""
        c0 = torch.tensor([c for _, c, _ in self.regimes], dtype=up.dtype, device=up.device)
        s = torch.tensor([s for _, _, s in self.regimes], dtype=up.dtype, device=up.device)
        return c0 + s * up.unsqueeze(-1)

    def _regime_probabilities(self, up: torch.Tensor) -> torch.Tensor:
        above1 = torch.sigmoid((up - self.thresholds[0]) / self.width)
        above2 = torch.sigmoid((up - self.thresholds[1]) / self.width)
        return torch.stack([1.0 - above1, above1 - above2, above2], dim=-1)

    def _simulate(self, context, generator):
        work = _work_dtype(context.dtype)
        up = context[:, 0].to(work)
        probs = self._regime_probabilities(up)
        u = _rand(up.shape, generator, up.device, work)
        labels = (u.unsqueeze(-1) > probs.cumsum(-1)[:, :2]).sum(-1).long()  # inverse CDF
        us = self._law(up).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        us = us + self.noise * _randn(up.shape, generator, up.device, work)
        p = self.rho0 * us * up
        if self.pressure_noise > 0:
            p = p + self.pressure_noise * _randn(up.shape, generator, up.device, work)
        return torch.stack([us, p], dim=-1), labels

    def true_weights(self, context):
        up = self.check_context(context)[:, 0]
        return self._regime_probabilities(up.to(torch.float64)).to(context.dtype)

    def branch_means(self, context):
        up = self.check_context(context)[:, 0]
        us = self._law(up)  # [B, 3]
        return torch.stack([us, self.rho0 * us * up.unsqueeze(-1)], dim=-1)

    def classify(self, y, context):
        """The regime whose ``U_s`` law is nearest."""
        us = self._check_outcome(y)[..., 0]
        up = torch.broadcast_to(context[..., 0], us.shape)
        return (us.unsqueeze(-1) - self._law(up)).abs().argmin(-1)

    def physics(self, context, components=None):
        P = _physics_module()
        context = self.check_context(context)
        up = context[:, 0]
        B, K = up.shape[0], components or len(self.regimes)
        regime = torch.arange(K, device=up.device) % len(self.regimes)
        law = self._law(up)[:, regime].unsqueeze(-1)  # [B, K, 1]
        A_law = torch.tensor([[1.0, 0.0]], dtype=up.dtype, device=up.device).reshape(1, 1, 1, 2)
        A_rh = torch.stack([-self.rho0 * up, torch.ones_like(up)], dim=-1).reshape(B, 1, 1, 2)
        w = self.physics_weights
        specs = [(P.Linear(A_law, law, moment=self.physics_mode, noise_scale=self.noise), w["regime_law"]),
                 (P.Linear(A_rh, torch.zeros(B, 1, 1, dtype=up.dtype, device=up.device), mode="mean"),
                  w["rankine_hugoniot"])]
        if w["monotonic"] > 0:
            if not context.requires_grad:
                context.requires_grad_(True)  # Monotonic differentiates the model's means by the context
            specs.append((P.Monotonic(context, dim=0, output=0, increasing=True), w["monotonic"]))
        return specs

    def residual(self, y, context):
        y = self._check_outcome(y)
        us, p = y[..., 0], y[..., 1]
        up = context[..., 0]
        rh = p - self.rho0 * up * us
        law = (us.unsqueeze(-1) - self._law(torch.broadcast_to(up, us.shape))).abs().amin(-1)
        return torch.stack([rh, law], dim=-1)


# ----- d. bistable reaction–diffusion (Schlögl / Nagumo) --------------------------------------------

@register
class ReactionDiffusion(Problem):
    """Bistable reaction–diffusion (Schlögl-type) on a 1-D lattice with Neumann boundaries: long-time states.

    ``u_t = D u_xx + f(u)``,  ``f(u) = u (1 - u) (u - a) = -a u + (1 + a) u^2 - u^3``

    (Schlögl's ``-k (u - u1)(u - u2)(u - u3)`` with ``u1 = 0``, ``u2 = a``, ``u3 = 1``, ``k = 1``: ``0`` and ``1``
    stable, ``a`` unstable), on ``grid`` points of spacing ``spacing`` with mirror (Neumann) boundaries.
    Initial field ``u_i(0) = c + init_noise N(0, 1)``, ``c ~ U(0, 1)`` per sample. Semi-implicit Euler
    ``u <- (I - dt D L / h^2)^{-1} (u + dt f(u))``, run until the steady residual is below ``tol`` everywhere (or
    ``max_time``); the observation adds ``noise * N(0, 1)`` per point.

    Context ``(D, a)``: ``D`` log-uniform in ``D_range`` (lattice units), ``a`` uniform in ``a_range``. For strong
    coupling the field stays near-uniform and goes to ``1`` iff the initial level beats the threshold
    (weights near ``1 - a`` and ``a``); for weak coupling (``D / h^2`` below about 0.1) fronts are pinned by
    the lattice and patterned states of ``0``- and ``1``-domains survive. Branches: ``0 = low`` (all
    ``u < a``), ``1 = high`` (all ``u > a``), ``2 = fronts``.

    Physics: the steady residual ``r_i = D (u_{i-1} - 2 u_i + u_{i+1}) / h^2 + f(u_i)``
    (:class:`~physmdn.physics.Stencil1D`, Neumann, ``reaction = [0, -a, 1 + a, -1]``); residual columns ``r_i``.
    """

    name = "reaction_diffusion"
    context_names = ("D", "a")
    branch_names = ("low", "high", "fronts")
    is_field = True
    # the steady residual vanishes on the unstable state u = a too: a strong weight pulls components there
    defaults = Defaults(components=8, hidden=(128, 128), epochs=150, n_train=4096, batch_size=256, lr=2e-3,
                        physics_weight=0.01)

    def __init__(self, grid: int = 32, spacing: float = 1.0, D_range=(0.02, 1.0), a_range=(0.35, 0.65),
                 init_noise: float = 0.2, noise: float = 0.02, dt: float = 0.5, max_time: float = 2000.0,
                 tol: float = 1e-5, check_every: int = 50, physics_mode: str = "first",
                 physics_weights: dict | None = None):
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 3:
            raise ValueError(f"grid must be an integer >= 3, got {grid!r}")
        D_range = _check_range(D_range, "D_range")
        a_range = _check_range(a_range, "a_range")
        if D_range[0] <= 0:
            raise ValueError(f"D_range must be positive, got {D_range}")
        if not (0.0 < a_range[0] and a_range[1] < 1.0):
            raise ValueError(f"a_range must lie inside (0, 1) (a is the unstable middle root), got {a_range}")
        low, high = zip(D_range, a_range)
        super().__init__(low, high, (True, False), (math.sqrt(D_range[0] * D_range[1]), 0.5 * sum(a_range)))
        self.grid, self.spacing = grid, _check_pos(spacing, "spacing")
        self.output_names = tuple(f"u{i}" for i in range(grid))
        self.residual_names = tuple(f"r{i}" for i in range(grid))
        self.init_noise = _check_nonneg(init_noise, "init_noise")
        self.noise = _check_nonneg(noise, "noise")
        self.dt = _check_pos(dt, "dt")
        self.max_time = _check_pos(max_time, "max_time")
        self.tol = _check_pos(tol, "tol")
        self.check_every = _check_count(check_every, "check_every")
        self.physics_mode = _check_physics_mode(physics_mode)
        self.physics_weights = _merge_weights({"steady": 1.0, "stability": 100.0}, physics_weights)
        self.config = dict(grid=grid, spacing=self.spacing, D_range=D_range, a_range=a_range,
                           init_noise=self.init_noise, noise=self.noise, dt=self.dt, max_time=self.max_time,
                           tol=self.tol, check_every=self.check_every, physics_mode=physics_mode,
                           physics_weights=self.physics_weights)

    @staticmethod
    def reaction(u: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``f(u) = u (1 - u) (u - a)``."""
        return u * (1.0 - u) * (u - a)

    def _simulate(self, context, generator):
        work = _work_dtype(context.dtype)
        ctx = context.to(work)
        N, device = ctx.shape[0], ctx.device
        D, a = ctx[:, 0:1], ctx[:, 1:2]
        solver = _ImplicitDiffusion(self.grid, "neumann", device, work)
        level = _rand((N, 1), generator, device, work)
        u = level + self.init_noise * _randn((N, self.grid), generator, device, work)
        factors = solver.factors(self.dt * D / self.spacing**2)
        active = torch.arange(N, device=device)
        steps = int(math.ceil(self.max_time / self.dt))
        done = 0
        while done < steps and active.numel():
            ua, fa, aa, Da = u[active], factors[active], a[active], D[active]
            with _few_threads(ua.numel(), device):
                for _ in range(min(self.check_every, steps - done)):
                    ua = solver(ua + self.dt * self.reaction(ua, aa), fa)
            done += self.check_every
            # values decaying to the root 0 would turn subnormal (slow on CPUs) in stalled samples; 0 is exact
            ua = torch.where(ua.abs() < 1e-20, torch.zeros_like(ua), ua)
            u[active] = ua
            res = _stencil_residual(ua, Da, self.reaction(ua, aa), self.spacing, "neumann").abs().amax(-1)
            active = active[res > self.tol]
        labels = self._labels(u, a)
        if self.noise > 0:
            u = u + self.noise * _randn(u.shape, generator, device, work)
        return u, labels

    @staticmethod
    def _labels(u: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        low, high = (u < a).all(-1), (u > a).all(-1)
        return torch.where(low, 0, torch.where(high, 1, 2)).long()

    def classify(self, y, context):
        """``low`` where every point is below the threshold ``a``, ``high`` where every point is above, else
        ``fronts``."""
        y = self._check_outcome(y)
        return self._labels(y, context[..., 1:2])

    def physics(self, context, components=None):
        P = _physics_module()
        context = self.check_context(context)
        D, a = context[:, 0:1], context[:, 1]
        reaction = torch.stack([torch.zeros_like(a), -a, 1.0 + a, -torch.ones_like(a)], dim=-1).unsqueeze(1)
        spec = P.Stencil1D(D, reaction, spacing=self.spacing, boundary="neumann", moment=self.physics_mode,
                           noise_scale=self.noise)
        # f'(u) = -3u^2 + 2(1 + a)u - a; the unstable uniform state u = a is excluded by the stability prior
        slope = torch.stack([-a, 2.0 * (1.0 + a), -3.0 * torch.ones_like(a)], dim=-1).unsqueeze(1)
        stability = P.FieldStability(D, slope, spacing=self.spacing, boundary="neumann")
        return [(spec, self.physics_weights["steady"]), (stability, self.physics_weights["stability"])]

    def residual(self, y, context):
        u = self._check_outcome(y)
        D, a = context[..., 0:1], context[..., 1:2]
        return _stencil_residual(u, D, self.reaction(u, a), self.spacing, "neumann")

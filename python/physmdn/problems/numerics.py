"""Numerics shared by the problems: random draws, the cubic's equilibria, ODE and SDE integrators, the implicit
diffusion solve, the lattice residual and branch labels.

Everything is vectorized torch code on the device of its inputs. Layering: imports torch only.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch

__all__ = [
    "work_dtype", "rand", "randn", "few_threads", "second_difference", "ImplicitDiffusion", "stencil_residual",
    "cubic_equilibria", "rk4_relax", "newton_polish", "semi_implicit_euler", "three_way_labels",
]


# ----- random draws ---------------------------------------------------------------------------------

def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Simulations run in float64 when asked for it, otherwise float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rand(shape, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """``U(0, 1)`` draws of ``shape`` from ``generator`` (None: the global RNG)."""
    return torch.rand(shape, generator=generator, device=device, dtype=dtype)


def randn(shape, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """``N(0, 1)`` draws of ``shape`` from ``generator`` (None: the global RNG)."""
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


@contextlib.contextmanager
def few_threads(numel: int, device: torch.device, threshold: int = 1 << 18):
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


# ----- lattice operators ----------------------------------------------------------------------------

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


class ImplicitDiffusion:
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
        """``(I - c L)^{-1} u`` for ``u [N, n]`` and ``factors = self.factors(c)`` ``[N, n]``: ``[N, n]``."""
        return ((u @ self.V_inv.T) * factors) @ self.V.T


def stencil_residual(u: torch.Tensor, diffusion: torch.Tensor, reaction: torch.Tensor, spacing: float,
                     boundary: str) -> torch.Tensor:
    """``diffusion (L u)_i / spacing^2 + f(u_i)`` for ``u [..., n]``, ``diffusion [..., 1]``, ``f`` the values
    ``reaction [..., n]`` already evaluated: ``[..., n]``."""
    if boundary == "periodic":
        left, right = u.roll(1, -1), u.roll(-1, -1)
    else:
        left = torch.cat([u[..., 1:2], u[..., :-1]], -1)
        right = torch.cat([u[..., 1:], u[..., -2:-1]], -1)
    return diffusion * (left - 2.0 * u + right) / spacing**2 + reaction


# ----- the cubic ------------------------------------------------------------------------------------

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


# ----- integrators ----------------------------------------------------------------------------------

Field = Callable[[torch.Tensor], torch.Tensor]


def rk4_relax(f: Field, slope: Field, y0: torch.Tensor, steps: int, max_dt: float) -> torch.Tensor:
    """``steps`` classical RK4 steps of the scalar ODE ``dy/dt = f(y)`` (elementwise in ``y0 [...]``), step size
    ``dt = min(max_dt, 0.5 / |f'(y)|)`` with ``slope = f'``: long steps across slow stretches near a fold, short
    ones in the final approach to an equilibrium. Returns ``y [...]``."""
    y = y0.clone()
    for _ in range(steps):
        dt = (0.5 / slope(y).abs().clamp(min=1e-12)).clamp(max=max_dt)
        k1 = f(y)
        k2 = f(y + 0.5 * dt * k1)
        k3 = f(y + 0.5 * dt * k2)
        k4 = f(y + dt * k3)
        y = y + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
    return y


def newton_polish(f: Field, slope: Field, y: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """``steps`` guarded Newton steps on ``f(y) = 0``: a step is kept only where it reduces ``|f|`` (a passage
    near a fold, where ``f'`` is tiny, would otherwise throw ``y`` far away). Returns ``y [...]``."""
    for _ in range(steps):
        s = slope(y)
        candidate = y - f(y) / torch.where(s.abs() > 1e-8, s, torch.full_like(s, -1e-8))
        y = torch.where(f(candidate).abs() < f(y).abs(), candidate, y)
    return y


def semi_implicit_euler(u: torch.Tensor, solver: ImplicitDiffusion, factors: torch.Tensor, drift: Field, dt: float,
                        steps: int, noise_amplitude: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """``steps`` semi-implicit (Euler–Maruyama) steps of ``u_t = c L u + drift(u) (+ noise)`` for ``u [N, n]``:

    ``u <- (I - dt c L)^{-1} (u + dt drift(u) + noise_amplitude xi)``,  ``xi ~ N(0, 1) [N, n]`` per step,

    with ``factors = solver.factors(dt c)`` ``[N, n]`` and ``noise_amplitude [N, 1]`` (``sigma sqrt(dt)``; None:
    deterministic). Small fields run on one CPU thread (:func:`few_threads`). Returns ``u [N, n]``."""
    with few_threads(u.numel(), u.device):
        for _ in range(steps):
            rhs = u + dt * drift(u)
            if noise_amplitude is not None:
                rhs = rhs + noise_amplitude * randn(u.shape, generator, u.device, u.dtype)
            u = solver(rhs, factors)
    return u


# ----- labels ---------------------------------------------------------------------------------------

def three_way_labels(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Branch labels (int64) from boolean masks ``[...]``: ``0`` where ``first``, else ``1`` where ``second``, else
    ``2`` (e.g. a field entirely above a threshold, entirely below it, or with fronts)."""
    return torch.where(first, 0, torch.where(second, 1, 2)).long()

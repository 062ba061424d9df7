"""Seeded fuzz corpus: :func:`physmdn.mixture_nll` and :func:`physmdn.mdn_loss` with each built-in physics family
against plain-torch float64 references, on random shapes, memory layouts, dtypes and value ranges.

Every case is drawn from its own seed (``crc32("<op>/<index>")``), so a failure names a case that reproduces
alone: ``pytest "tests/ops/test_fuzz.py::test_polynomial_fuzz[polynomial-17]"``. The quick tier runs :data:`QUICK`
cases per op; the ``slow`` tier :data:`SLOW` more (deselected by default; ``pytest -m slow`` runs it, as CI does).

What a case draws:

* shapes ``B`` in 0..70 (odd sizes, 0 and 1 included), ``K`` and ``D`` in 1..9;
* a layout per input: contiguous, every 2nd/3rd batch row, the dimensions reversed in memory (transpose),
  one row expanded over the batch (stride 0), padded rows, a strided last dimension, or logits / means /
  log-scales split from one network output;
* dtype float64, float32 or bfloat16 (the reference sees the same rounded inputs, in float64);
* values: ``normal``, ``large_logits`` (logits spread up to 1e4), ``tiny_scales`` (log-scales in [-20, -8]),
  ``large_scales`` (up to +20 for the NLL; for the physics families capped at ``20 / order`` so that the
  penalty's ``sigma^(2 order)`` stays below e^40; beyond, see ``test_log_scales_of_plus_minus_20``);
* the reduction (``none`` with a random upstream gradient per sample, ``mean``, ``sum``); for the physics ops the
  mode (``exact``, ``mean``), noise scale, parameter broadcasting and the penalty weight.

Errors are norm-wise: ``max|a - e| / max(max|e|, floor)`` per tensor. For the gradients the floor is the upstream
gradient's size (their rounding error scales with it, not with a gradient that cancels to ~0), for the logits'
gradient times ``1 + weight * max P``. Gradients are compared with respect to the tensors the op receives (views).
"""

from __future__ import annotations

import math
import random
import zlib

import pytest
import torch

import physmdn
from physmdn import physics as phys

QUICK, SLOW = 60, 500
OPS = ("mixture_nll", "polynomial", "linear", "stencil_periodic", "stencil_neumann")
DTYPES = (torch.float64, torch.float32, torch.bfloat16)
# (loss, gradients): float64 agrees to rounding; float32 and bfloat16 accumulate in float32, bfloat16 rounds the
# output and gradients to 8 bits (relative 2^-8 = 4e-3). Over both tiers the worst float32 error is about a tenth
# of these, the worst bfloat16 error about half.
TOL = {torch.float64: (1e-12, 1e-11), torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 2e-2)}
REGIMES = ("normal", "large_logits", "tiny_scales", "large_scales")
LAYOUTS = ("contiguous", "rows_step", "transposed", "expanded", "padded", "inner_strided")
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)

# (op, index) -> reason: cases the kernels get wrong, kept as strict expected failures until fixed.
KNOWN_FAILURES: dict[tuple[str, int], str] = {}


def _cases(op: str):
    params = []
    for index in range(QUICK + SLOW):
        marks = [pytest.mark.slow] if index >= QUICK else []
        if (op, index) in KNOWN_FAILURES:
            marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[(op, index)]))
        params.append(pytest.param(index, marks=marks, id=f"{op}-{index}"))
    return params


# ----- references (plain torch, float64) ------------------------------------------------------------

def reference_nll(logits, means, log_scales, target):
    """``-logsumexp_k(log_softmax(logits)_k + sum_d log N(target_d | means_kd, exp(log_scales_kd)^2))``: ``[B]``."""
    z = (target[:, None, :] - means) * torch.exp(-log_scales)
    log_density = (-0.5 * z * z - log_scales).sum(-1) - means.shape[-1] * HALF_LOG_2PI
    return -torch.logsumexp(torch.log_softmax(logits, dim=-1) + log_density, dim=-1)


def reference_mdn_loss(logits, means, log_scales, target, spec, weight):
    """``NLL_b + weight * sum_k softmax(logits)_bk P_bk`` with ``P`` from the spec's own float64 ``penalty``; the
    weights are a constant of the penalty (detached) unless the spec's coupling is ``"coupled"``."""
    pi = torch.softmax(logits, dim=-1)
    penalty = ((pi if spec.coupling == "coupled" else pi.detach()) * spec.penalty(means, log_scales)).sum(-1)
    return reference_nll(logits, means, log_scales, target) + weight * penalty


def reduce(values, reduction):
    return values if reduction == "none" else (values.mean() if reduction == "mean" else values.sum())


# ----- case generation ------------------------------------------------------------------------------

def _layout(rng: random.Random, shape, layout: str):
    """``(storage shape, view(leaf) -> tensor of shape)`` for one input laid out as ``layout``."""
    B, rest = shape[0], tuple(shape[1:])
    if layout == "rows_step":
        step = rng.choice((2, 3))
        return (B * step, *rest), lambda t: t[::step]
    if layout == "transposed":
        dims = tuple(reversed(range(len(shape))))
        return tuple(reversed(shape)), lambda t: t.permute(dims)
    if layout == "expanded":
        return (1, *rest), lambda t: t.expand(B, *rest)
    if layout == "padded":
        pad = rng.choice((1, 3))
        return (*shape[:-1], shape[-1] + pad), lambda t: t[..., pad:]
    if layout == "inner_strided":
        return (*shape[:-1], 2 * shape[-1]), lambda t: t[..., ::2]
    return tuple(shape), lambda t: t


def _values(gen: torch.Generator, shape, kind: str, regime: str, physics: bool, order: int) -> torch.Tensor:
    """float64 values of one input for a regime; large log-scales are capped for the physics ops so that
    ``var^order = exp(2 order log_scale)`` stays below exp(40)."""
    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)

    normal = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "logits":
        if regime == "large_logits":
            return normal * 10 ** uniform(1.0, 4.0)
        return 2.0 * normal
    if kind == "log_scales":
        if regime == "tiny_scales":
            return uniform(-20.0, -8.0)
        if regime == "large_scales":
            return uniform(2.0, 20.0 / max(order, 1) if physics else 20.0)
        return uniform(-2.5, 1.0)
    return normal * (2.0 if physics else 1.5)  # means, target


def _spec(rng: random.Random, gen: torch.Generator, op: str, B: int, K: int, D: int, dtype):
    """A random built-in spec bound to ``[B, K, D]``; its tensors hold values exactly representable in ``dtype``
    (the kernels cast them to the inputs' dtype)."""
    def param(*shape, scale=1.0):
        return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype).double()

    def b_or_1(n):
        return rng.choice((1, n))

    mode = rng.choice(("exact", "first", "mean"))
    coupling = rng.choice((None, "detached", "coupled"))
    noise = rng.choice((0.0, 0.0, 0.0, rng.uniform(0.0, 0.5)))
    if op == "polynomial":
        order = rng.randint(0, 3)
        coeffs = param(b_or_1(B), b_or_1(K), b_or_1(D), order + 1, scale=0.7)
        return phys.Polynomial(coeffs, mode=mode, noise_scale=noise, coupling=coupling), order
    if op == "linear":
        M = rng.randint(1, 4)
        A = param(b_or_1(B), b_or_1(K), M, D)
        b = param(b_or_1(B), b_or_1(K), M)
        return phys.Linear(A, b, mode=mode, noise_scale=noise, coupling=coupling), 1
    order = rng.randint(0, 3)
    diffusion = rng.choice((abs(rng.gauss(0.0, 1.0)), param(b_or_1(B), b_or_1(K)).abs()))
    reaction = param(b_or_1(B), b_or_1(K), order + 1, scale=0.7)
    # bfloat16: powers of two keep diffusion / spacing^2 exact
    spacing = rng.choice((0.5, 1.0, 2.0)) if dtype == torch.bfloat16 else rng.uniform(0.3, 2.0)
    boundary = "periodic" if op == "stencil_periodic" else "neumann"
    return phys.Stencil1D(diffusion, reaction, spacing=spacing, boundary=boundary, mode=mode,
                          noise_scale=noise, coupling=coupling), max(order, 1)


class Case:
    """One drawn case: leaves (storage tensors) per input in ``dtype``, the views the op sees, and the spec."""

    def __init__(self, op: str, index: int):
        rng = random.Random(zlib.crc32(f"{op}/{index}".encode()))
        gen = torch.Generator().manual_seed(rng.getrandbits(62))
        self.op = op
        B = rng.choice((0, 1, 2, 3, 7, 8, 9, rng.randint(1, 70), rng.randint(1, 70), rng.randint(1, 70)))
        K, D = rng.randint(1, 9), rng.randint(1, 9)
        self.dtype = rng.choice(DTYPES)
        self.regime = rng.choice(REGIMES)
        self.reduction = rng.choice(("none", "none", "mean", "sum"))
        self.weight = rng.uniform(0.1, 3.0)
        physics = op != "mixture_nll"
        self.spec, order = _spec(rng, gen, op, B, K, D, self.dtype) if physics else (None, 0)
        shapes = {"logits": (B, K), "means": (B, K, D), "log_scales": (B, K, D), "target": (B, D)}
        self.layouts, self.leaves, self.views = {}, {}, {}
        split = rng.random() < 0.2  # logits, means, log_scales from one [B, K + 2KD] network output
        for name, shape in shapes.items():
            if split and name != "target":
                continue
            layout = rng.choice(LAYOUTS)
            storage, view = _layout(rng, shape, layout)
            values = _values(gen, storage, name, self.regime, physics, order)
            self.layouts[name] = layout
            self.leaves[name] = values.to(self.dtype)
            self.views[name] = view
        if split:
            head = torch.cat([_values(gen, (B, K), "logits", self.regime, physics, order),
                              _values(gen, (B, K * D), "means", self.regime, physics, order),
                              _values(gen, (B, K * D), "log_scales", self.regime, physics, order)], dim=-1)
            self.leaves["head"] = head.to(self.dtype)
            self.layouts["head"] = "split"
        self.shape = (B, K, D)
        self.upstream = torch.randn(B if self.reduction == "none" else (), generator=gen, dtype=torch.float64)
        self.upstream = self.upstream.to(self.dtype).double()

    @classmethod
    def fixed(cls, op: str, logits, means, log_scales, target, dtype, spec=None, reduction="none", weight=1.0):
        """A hand-made case on contiguous inputs (float64 values, rounded to ``dtype``)."""
        case = cls.__new__(cls)
        case.op, case.dtype, case.regime, case.reduction, case.weight, case.spec = op, dtype, "fixed", reduction, \
            weight, spec
        case.shape = tuple(means.shape)
        values = {"logits": logits, "means": means, "log_scales": log_scales, "target": target}
        case.leaves = {k: v.to(dtype) for k, v in values.items()}
        case.layouts = {k: "contiguous" for k in values}
        case.views = {k: (lambda t: t) for k in values}
        B = case.shape[0]
        upstream = torch.linspace(-1.5, 2.0, B, dtype=torch.float64) if reduction == "none" else torch.tensor(0.75)
        case.upstream = upstream.to(dtype).double()
        return case

    def inputs(self, leaves):
        """``(logits, means, log_scales, target)`` as views of ``leaves``."""
        B, K, D = self.shape
        if "head" in leaves:
            lg, mu, ls = torch.split(leaves["head"], [K, K * D, K * D], dim=-1)
            parts = (lg, mu.reshape(B, K, D), ls.reshape(B, K, D))
        else:
            parts = tuple(self.views[n](leaves[n]) for n in ("logits", "means", "log_scales"))
        return (*parts, self.views["target"](leaves["target"]))

    def __repr__(self) -> str:
        B, K, D = self.shape
        spec = "" if self.spec is None else f", spec={self.spec!r}, weight={self.weight:.3g}"
        return (f"{self.op} B={B} K={K} D={D} {self.dtype} regime={self.regime} reduction={self.reduction} "
                f"layouts={self.layouts}{spec}")


def normwise(actual, expected, floor: float) -> float:
    """``max|a - e| / max(max|e|, floor)`` over the finite entries; NaN/inf must sit at the same places."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, (tuple(a.shape), tuple(e.shape))
    assert torch.equal(torch.isnan(a), torch.isnan(e)), "NaN at other places than the reference"
    assert torch.equal(torch.isposinf(a), torch.isposinf(e)) and torch.equal(torch.isneginf(a), torch.isneginf(e)), \
        "inf at other places than the reference"
    finite = torch.isfinite(e)
    if not bool(finite.any()):
        return 0.0
    scale = max(float(e[finite].abs().max()), floor)
    return float((a[finite] - e[finite]).abs().max()) / scale


def run_op(case: Case, inputs):
    if case.spec is None:
        return physmdn.mixture_nll(*inputs, reduction=case.reduction)
    return physmdn.mdn_loss(*inputs, physics=case.spec, weight=case.weight, reduction=case.reduction)


def run_reference(case: Case, inputs):
    if case.spec is None:
        values = reference_nll(*inputs)
    else:
        values = reference_mdn_loss(*inputs, case.spec, case.weight)
    return reduce(values, case.reduction)


NAMES = ("logits", "means", "log_scales", "target")


def check_case(case: Case):
    """Loss and input gradients against the reference. The gradients are taken with respect to the views the op
    receives: summing an expanded input's gradient over the batch is autograd's work, and in bfloat16 it rounds
    at every step."""
    loss_tol, grad_tol = TOL[case.dtype]
    leaves = {k: v.clone().requires_grad_(True) for k, v in case.leaves.items()}
    ref_leaves = {k: v.detach().double().requires_grad_(True) for k, v in case.leaves.items()}
    inputs, ref_inputs = case.inputs(leaves), case.inputs(ref_leaves)
    out = run_op(case, inputs)
    ref = run_reference(case, ref_inputs)
    assert out.dtype == case.dtype and out.shape == ref.shape, (out.dtype, tuple(out.shape), case)
    assert bool(torch.isfinite(ref).all()) or case.shape[0] == 0, f"reference not finite: {case}"
    err = normwise(out, ref, 1e-30)
    assert err <= loss_tol, f"loss error {err:.3g} > {loss_tol:g}: {case}"
    upstream = case.upstream
    grads = torch.autograd.grad((out.double() * upstream).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), ref_inputs)
    floor = float(upstream.abs().max()) if upstream.numel() else 1.0
    if case.reduction == "mean" and case.shape[0]:
        floor /= case.shape[0]
    # d/dlogits_k = pi_k (dNLL_k + weight (P_k - sum_j pi_j P_j)) cancels where one component dominates; its
    # rounding error, in any float32 evaluation, scales with weight * max P
    penalty_scale = 0.0
    if case.spec is not None and case.shape[0]:
        penalty_scale = case.weight * float(case.spec.penalty(ref_inputs[1].detach(), ref_inputs[2].detach()).abs().max())
    for name, g, rg in zip(NAMES, grads, ref_grads):
        assert g.dtype == case.dtype, (name, g.dtype)
        err = normwise(g, rg, floor * (1.0 + penalty_scale) if name == "logits" else floor)
        assert err <= grad_tol, f"d/d{name} error {err:.3g} > {grad_tol:g}: {case}"


# ----- the corpus -----------------------------------------------------------------------------------

@pytest.mark.parametrize("index", _cases("mixture_nll"))
def test_mixture_nll_fuzz(index):
    check_case(Case("mixture_nll", index))


@pytest.mark.parametrize("index", _cases("polynomial"))
def test_polynomial_fuzz(index):
    check_case(Case("polynomial", index))


@pytest.mark.parametrize("index", _cases("linear"))
def test_linear_fuzz(index):
    check_case(Case("linear", index))


@pytest.mark.parametrize("index", _cases("stencil_periodic"))
def test_stencil_periodic_fuzz(index):
    check_case(Case("stencil_periodic", index))


@pytest.mark.parametrize("index", _cases("stencil_neumann"))
def test_stencil_neumann_fuzz(index):
    check_case(Case("stencil_neumann", index))


def test_corpus_covers_the_space():
    """The quick tier alone reaches every dtype, regime, layout and reduction, and the shape edges."""
    cases = [Case(op, i) for op in OPS for i in range(QUICK)]
    assert {c.dtype for c in cases} == set(DTYPES)
    assert {c.regime for c in cases} == set(REGIMES)
    assert {c.reduction for c in cases} == {"none", "mean", "sum"}
    assert {lay for c in cases for lay in c.layouts.values()} == {*LAYOUTS, "split"}
    assert {0, 1} <= {c.shape[0] for c in cases} and any(c.shape[0] % 2 and c.shape[0] > 8 for c in cases)
    assert {1, 9} <= {c.shape[1] for c in cases} and {1, 9} <= {c.shape[2] for c in cases}
    assert {c.spec.mode for c in cases if c.spec is not None} == {"exact", "first", "mean"}
    assert {c.spec.coupling for c in cases if c.spec is not None} == {None, "detached", "coupled"}
    for op in OPS:
        views = [v for c in cases if c.op == op for v in c.inputs(c.leaves)]
        assert any(not v.is_contiguous() for v in views) and any(0 in v.stride() for v in views if v.numel() > 1)


# ----- extreme values -------------------------------------------------------------------------------

def random_inputs(B, K, D, seed=0, log_scale=None):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K, generator=g, dtype=torch.float64)
    means = torch.randn(B, K, D, generator=g, dtype=torch.float64)
    log_scales = (torch.full((B, K, D), float(log_scale), dtype=torch.float64) if log_scale is not None
                  else -1.0 + 0.5 * torch.randn(B, K, D, generator=g, dtype=torch.float64))
    target = torch.randn(B, D, generator=g, dtype=torch.float64)
    return logits, means, log_scales, target


def spec_for(op: str, D: int, mode: str = "exact"):
    """A fixed spec of ``op``'s family for ``D`` outputs (order 3 for the polynomial and stencil families)."""
    if op == "polynomial":
        return phys.Polynomial([0.0, 1.0, 0.0, -1.0], mode=mode)
    if op == "linear":  # [M = 2, D]
        A = torch.arange(1.0, D + 1, dtype=torch.float64) * torch.tensor([[1.0], [-0.5]], dtype=torch.float64)
        return phys.Linear(A, [0.25, -1.0], mode=mode)
    if op.startswith("stencil"):
        return phys.Stencil1D(0.5, [0.0, 1.0, 0.0, -1.0], boundary=op.split("_")[1], mode=mode)
    return None


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_empty_batch(op, dtype, reduction):
    """B = 0: an empty ``[0]`` loss (``none``), 0 (``sum``) or NaN (``mean``), as torch's reductions; gradients of
    the inputs' shapes."""
    case = Case.fixed(op, *random_inputs(0, 3, 4), dtype, spec=spec_for(op, 4), reduction=reduction)
    leaves = {k: v.clone().requires_grad_(True) for k, v in case.leaves.items()}
    inputs = case.inputs(leaves)
    out = run_op(case, inputs)
    assert out.dtype == dtype and out.shape == ((0,) if reduction == "none" else ())
    if reduction == "sum":
        assert float(out.detach()) == 0.0
    elif reduction == "mean":
        assert math.isnan(float(out.detach()))
    grads = torch.autograd.grad(out.sum(), inputs)
    assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in inputs]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("B,K,D", [(1, 1, 1), (5, 1, 1), (7, 1, 4), (6, 5, 1)])
def test_single_component_or_dimension(op, dtype, B, K, D):
    """K = 1 (the mixture is one Gaussian: d/dlogits = 0) and D = 1 (a stencil without neighbours)."""
    for mode in ("exact", "mean"):
        check_case(Case.fixed(op, *random_inputs(B, K, D, seed=B + K + D), dtype, spec=spec_for(op, D, mode)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_logits_spread_over_plus_minus_1e4(op, dtype):
    """Logits from -1e4 to +1e4 (softmax weights down to exp(-2e4), which underflow): finite loss and gradients,
    equal to the reference, with the target on the most and on the least likely component."""
    B, K, D = 6, 5, 3
    logits, means, log_scales, target = random_inputs(B, K, D, seed=11)
    logits = torch.linspace(-1e4, 1e4, K, dtype=torch.float64).repeat(B, 1)
    logits[1::2] = logits[1::2].flip(-1)
    means = means + 60.0 * torch.arange(K, dtype=torch.float64)[:, None]  # components far apart (z > 100)
    target = means[:, 0] + 0.1  # on the least likely component in rows 0, 2, 4, the most likely in 1, 3, 5
    case = Case.fixed(op, logits, means, log_scales, target, dtype, spec=spec_for(op, D))
    check_case(case)
    out = run_op(case, case.inputs(case.leaves)).detach().double()
    assert bool(torch.isfinite(out).all())
    assert float(out[0::2].min()) > 1.9e4 and float(out[1::2].max()) < 1e3  # the unlikely rows cost ~2e4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log_scale", [-20.0, 20.0])
@pytest.mark.parametrize("op", OPS)
def test_log_scales_of_plus_minus_20(op, log_scale, dtype):
    """sigma = exp(-20) (z up to ~1e9, loss ~1e18) and exp(+20): finite losses and gradients equal to the reference.

    Documented overflow: the exact (``mode="exact"``) penalty of an order-J family grows like ``sigma^(2J)``; with
    J = 3 and sigma = e^20 it is ~4e53, finite in float64 and +inf in float32 / bfloat16 (above their largest
    value, 3.4e38), which is that number rounded to the dtype. The point-wise penalty (``mode="mean"``) stays
    finite."""
    B, K, D = 5, 3, 2
    values = random_inputs(B, K, D, seed=5, log_scale=log_scale)
    for mode in ("exact", "mean"):
        case = Case.fixed(op, *values, dtype, spec=spec_for(op, D, mode))
        ref = run_reference(case, case.inputs({k: v.double() for k, v in case.leaves.items()}))
        assert bool(torch.isfinite(ref).all())
        if float(ref.abs().max()) < torch.finfo(dtype).max / 2:
            check_case(case)
        else:  # only the order-3 exact families with sigma = e^20, and not in float64
            assert dtype != torch.float64 and mode == "exact" and log_scale > 0 and op in (
                "polynomial", "stencil_periodic", "stencil_neumann"), (op, mode, dtype)
            out = run_op(case, case.inputs(case.leaves))
            assert bool(torch.isposinf(out).all()), out

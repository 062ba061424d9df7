"""The fused physics penalty of correlated components (``torch.ops.physmdn.correlated_penalty``, csrc/mvn_physics_math.h)
against its float64 torch reference (:func:`physmdn.physics_correlated.reference_penalty`, itself checked against
10^6-sample Monte Carlo in test_physics_correlated.py): values and the gradients of means, factor and diag on odd
shapes, every family, moment, boundary and covariance kind, with and without observation noise; gradcheck, opcheck,
torch.compile, reduced dtypes, extremes and the argument checks."""

import pytest
import torch

import physmdn  # noqa: F401  (registers the ops)
from physmdn import physics, physics_correlated
from physmdn.physics_correlated import component_penalty, reference_penalty

OP = torch.ops.physmdn.correlated_penalty


def make_specs(K, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(3, D, generator=g, dtype=torch.float64)
    return {
        "poly": physics.Polynomial([0.3, 1.0, 0.0, -1.0]),
        "poly-K": physics.Polynomial(torch.randn(1, K, 1, 4, generator=g, dtype=torch.float64)),
        "poly-J0": physics.Polynomial([0.7]),
        "linear": physics.Linear(A, torch.tensor([0.5, -1.0, 0.2], dtype=torch.float64)),
        "stencil-periodic": physics.Stencil1D(0.7, [0.0, 1.0, 0.0, -1.0], spacing=0.8, boundary="periodic"),
        "stencil-neumann": physics.Stencil1D(torch.full((1, K), 0.9, dtype=torch.float64), [0.2, 1.0, -0.5, -1.0],
                                             boundary="neumann"),
        "stencil-J0": physics.Stencil1D(1.1, [0.4], boundary="periodic"),
    }


def components(kind, B=3, K=2, D=5, seed=0, dtype=torch.float64):
    """``(means, factor, diag)``: a lower-triangular factor (full), W and a diagonal (lowrank), or a general
    ``[D, 3]`` factor without a diagonal (the form of a constrained mixture's outcome coordinates)."""
    g = torch.Generator().manual_seed(seed)
    means = 0.8 * torch.randn(B, K, D, generator=g, dtype=torch.float64)
    if kind == "full":
        factor = 0.4 * torch.randn(B, K, D, D, generator=g, dtype=torch.float64).tril(-1)
        factor = factor + torch.diag_embed(0.2 + 0.3 * torch.rand(B, K, D, generator=g, dtype=torch.float64))
        diag = None
    elif kind == "lowrank":
        factor = 0.5 * torch.randn(B, K, D, 2, generator=g, dtype=torch.float64)
        diag = 0.02 + 0.1 * torch.rand(B, K, D, generator=g, dtype=torch.float64)
    else:
        factor = 0.4 * torch.randn(B, K, D, 3, generator=g, dtype=torch.float64)
        diag = None
    out = [means, factor, diag]
    return [None if t is None else t.to(dtype) for t in out]


def value_and_grads(fn, means, factor, diag, weights):
    inputs = [t.detach().clone().requires_grad_(True) for t in (means, factor) + ((diag,) if diag is not None else ())]
    value = fn(inputs[0], inputs[1], inputs[2] if diag is not None else None)
    if not value.requires_grad:  # (a constant residual: the torch formulas build no graph)
        return value.detach(), [torch.zeros_like(t) for t in inputs]
    grads = torch.autograd.grad((value * weights).sum(), inputs, allow_unused=True)  # (the point value: means only)
    return value.detach(), [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]


@pytest.mark.parametrize("noise", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["full", "lowrank", "general"])
@pytest.mark.parametrize("moment", ["second", "first", "point"])
@pytest.mark.parametrize("name", list(make_specs(2, 5)))
def test_fused_matches_the_reference(name, moment, kind, noise):
    spec = make_specs(2, 5)[name]
    spec.moment = moment
    spec.noise_scale = noise
    means, factor, diag = components(kind)
    weights = torch.rand(3, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    fused = value_and_grads(lambda m, f, d: component_penalty(spec, m, f, d), means, factor, diag, weights)
    ref = value_and_grads(lambda m, f, d: reference_penalty(spec, m, f, d), means, factor, diag, weights)
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-10, atol=1e-12)
    for got, want in zip(fused[1], ref[1]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_the_noise_clamp_is_exercised():
    """With noise 0.3 some marginal variances of the test components fall below s^2 and some above (both branches of
    the clamp run in test_fused_matches_the_reference)."""
    for kind in ("full", "lowrank", "general"):
        means, factor, diag = components(kind)
        var = factor.square().sum(-1) + (0 if diag is None else diag)
        assert (var < 0.09).any() and (var > 0.09).any(), kind


def test_the_built_in_families_run_the_op(monkeypatch):
    """component_penalty takes the fused op for built-in families: with the torch formulas disabled it still runs,
    and the graph holds the op's backward."""
    def refuse(*args, **kwargs):
        raise AssertionError("the torch path ran")

    monkeypatch.setattr(physics_correlated, "reference_penalty", refuse)
    means, factor, diag = components("lowrank")
    for spec in make_specs(2, 5).values():
        out = component_penalty(spec, means, factor.requires_grad_(True), diag)
        out.sum().backward()
        assert factor.grad is not None and torch.isfinite(factor.grad).all()
        factor.grad = None


def test_parameters_that_need_a_gradient_take_the_torch_path():
    means, factor, diag = components("lowrank")
    coeffs = torch.tensor([0.3, 1.0, 0.0, -1.0], dtype=torch.float64, requires_grad=True)
    spec = physics.Polynomial(coeffs)
    value = component_penalty(spec, means, factor, diag)
    (grad,) = torch.autograd.grad(value.sum(), coeffs)
    ref = reference_penalty(physics.Polynomial(coeffs.detach()), means, factor, diag)
    torch.testing.assert_close(value.detach(), ref)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("name", ["poly", "linear", "stencil-neumann"])
def test_reduced_dtypes_accumulate_in_float32(name, dtype, rtol):
    """Inputs rounded to dtype, compared with float64 on the same rounded numbers: only the accumulation and the
    output's rounding differ."""
    spec = make_specs(2, 5)[name]
    means, factor, diag = components("lowrank", dtype=dtype)
    weights = torch.ones(3, 2, dtype=torch.float64)
    got = value_and_grads(lambda m, f, d: component_penalty(spec, m, f, d), means, factor, diag, weights.to(dtype))
    want = value_and_grads(lambda m, f, d: reference_penalty(spec, m, f, d), means.double(), factor.double(),
                           diag.double(), weights)
    assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[1])
    scale = want[0].abs().max()
    assert ((got[0].double() - want[0]).abs() <= rtol * scale).all()
    for g, w in zip(got[1], want[1]):
        assert ((g.double() - w).abs() <= rtol * w.abs().max() + 1e-6).all()


def op_args(name, moment, kind, noise=0.0, B=2, K=2, D=4):
    spec = make_specs(K, D)[name]
    spec.moment, spec.noise_scale = moment, noise
    means, factor, diag = components(kind, B=B, K=K, D=D)
    family, p0, p1, mcode, spacing, boundary, ns = spec.kernel_args(B, K, D, lambda t, s: t.double().expand(*s))
    p1 = means.new_empty((0,)) if p1 is None else p1
    return means, factor, diag, p0, p1, family, int(mcode), float(spacing), int(boundary), float(ns)


CASES = [("poly", "second", "lowrank", 0.3), ("linear", "second", "full", 0.0), ("stencil-periodic", "second",
         "general", 0.0), ("stencil-neumann", "first", "lowrank", 0.3), ("stencil-neumann", "second", "lowrank", 0.0)]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}" for c in CASES])
def test_gradcheck(case):
    means, factor, diag, *rest = op_args(*case)
    tensors = [means.requires_grad_(True), factor.requires_grad_(True)]
    if diag is not None:
        tensors.append(diag.requires_grad_(True))

    def fn(*t):
        return OP(t[0], t[1], t[2] if diag is not None else None, *rest)

    assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("case", CASES[:3], ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES[:3]])
def test_opcheck(case):
    means, factor, diag, *rest = op_args(*case)
    args = (means.requires_grad_(True), factor.requires_grad_(True),
            None if diag is None else diag.requires_grad_(True), *rest)
    torch.library.opcheck(OP, args)
    grad = torch.rand(means.shape[:2], dtype=torch.float64)
    torch.library.opcheck(torch.ops.physmdn.correlated_penalty_backward,
                          (grad, *(t.detach() if isinstance(t, torch.Tensor) else t for t in args)))


def test_compiles_fullgraph():
    spec = make_specs(2, 5)["stencil-neumann"]
    means, factor, diag = components("lowrank", dtype=torch.float32)

    def loss(m, f, d):
        return component_penalty(spec, m, f, d).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    inputs = [t.clone().requires_grad_(True) for t in (means, factor, diag)]
    value = compiled(*inputs)
    grads = torch.autograd.grad(value, inputs)
    ref_inputs = [t.clone().requires_grad_(True) for t in (means, factor, diag)]
    ref_value = loss(*ref_inputs)
    ref_grads = torch.autograd.grad(ref_value, ref_inputs)
    torch.testing.assert_close(value, ref_value)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_edge_shapes():
    spec = make_specs(1, 1)["stencil-periodic"]
    for B, K, D in ((0, 2, 5), (3, 1, 1), (1, 1, 2)):
        spec_d = make_specs(K, D)["stencil-neumann"] if D > 1 else spec
        means, factor, diag = components("lowrank", B=B, K=K, D=D)
        fused = component_penalty(spec_d, means, factor, diag)
        assert fused.shape == (B, K)
        torch.testing.assert_close(fused, reference_penalty(spec_d, means, factor, diag))


def test_extremes_are_inf_not_nan_and_nan_stays_nan():
    spec = make_specs(2, 5)["poly"]
    means, factor, diag = components("lowrank")
    out = component_penalty(spec, means, factor * 1e80, diag)
    assert torch.isinf(out).all() and (out > 0).all()
    means[0, 0, 1] = float("nan")
    out = component_penalty(spec, means, factor, diag)
    assert torch.isnan(out[0, 0]) and torch.isfinite(out[1:]).all()


def test_arguments_are_checked_by_name():
    means, factor, diag, p0, p1, *rest = op_args("poly", "second", "lowrank")
    with pytest.raises(RuntimeError, match=r"factor must be \[B, K, D, Q\]"):
        OP(means, factor[:, :, :3], diag, p0, p1, *rest)
    with pytest.raises(RuntimeError, match=r"diag must be \[B, K, D\]"):
        OP(means, factor, diag[..., :2], p0, p1, *rest)
    with pytest.raises(RuntimeError, match="diag must have the dtype of means"):
        OP(means, factor, diag.float(), p0, p1, *rest)
    with pytest.raises(RuntimeError, match=r"coeffs must be \[B, K, D, J\+1\]"):
        OP(means, factor, diag, p0[:, :, :2], p1, *rest)
    with pytest.raises(RuntimeError, match="family must be 0"):
        OP(means, factor, diag, p0, p1, -1, *rest[1:])
    with pytest.raises(RuntimeError, match="moment must be"):
        OP(means, factor, diag, p0, p1, rest[0], 7, *rest[2:])


def test_torch_func_transforms_take_the_torch_formulas():
    spec = make_specs(2, 5)["stencil-neumann"]
    means, factor, diag = components("lowrank")
    got = torch.func.grad(lambda f: component_penalty(spec, means, f, diag).sum())(factor)
    f = factor.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(component_penalty(spec, means, f, diag).sum(), f)
    torch.testing.assert_close(got, want)
    batched = torch.vmap(lambda f: component_penalty(spec, means, f, diag).sum())(torch.stack([factor, 2 * factor]))
    torch.testing.assert_close(batched, torch.stack([component_penalty(spec, means, factor, diag).sum(),
                                                     component_penalty(spec, means, 2 * factor, diag).sum()]))


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}" for c in CASES])
def test_the_torch_implementation_for_other_devices_matches_the_kernels(case):
    """The ops' CompositeExplicitAutograd implementation (devices without kernels) against the CPU kernels."""
    from physmdn import _correlated_penalty

    args = op_args(*case)
    torch.testing.assert_close(_correlated_penalty._torch_penalty(*args), OP(*args), rtol=1e-10, atol=1e-12)
    grad = torch.rand(args[0].shape[:2], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = _correlated_penalty._torch_penalty_backward(grad, *args)
    want = torch.ops.physmdn.correlated_penalty_backward(grad, *args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)

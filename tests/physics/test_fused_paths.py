"""The fused physics loss on each CPU path (lane kernel, blocked paths, generic loop) and layout: polynomial,
linear and stencil families in every moment, coefficient gradients, forward gradients, overflow and NaN handling,
against the plain-torch float64 reference."""

import pytest
import torch

import physmdn
from physmdn import physics as P
from conftest import DEVICES, assert_compiled_matches_eager, cpu_isas, ops_on_3d, rel_err
from test_physics import KINDS, make_spec, mixture, reference_loss

@pytest.mark.parametrize("shape", [(131, 5, 3), (64, 8, 4), (1, 1, 1), (70, 3, 17)])
@pytest.mark.parametrize("mode,noise", [("exact", 0.0), ("exact", 0.6), ("first", 0.6), ("mean", 0.0)])
@pytest.mark.parametrize("coeff_layout", ["per_sample_component", "per_component", "shared", "per_dim",
                                          "per_sample_dim", "per_sample"])
def test_fused_polynomial_fast_path_float32(shape, mode, noise, coeff_layout, cpu_isa):
    """float32, coefficients shared over D or per dimension (the AVX2 kernel loads those per element), no coefficient
    gradient: the CPU's vectorized polynomial path."""
    B, K, D = shape
    g = torch.Generator().manual_seed(B + K + D)
    layout = {"per_sample_component": (B, K, 1, 4), "per_component": (1, K, 1, 6), "shared": (1, 1, 1, 3),
              "per_dim": (1, K, D, 4), "per_sample_dim": (B, 1, D, 3), "per_sample": (B, 1, 1, 4)}[coeff_layout]
    coeffs = 0.5 * torch.randn(*layout, generator=g, dtype=torch.float64)
    inputs = [t.float().requires_grad_(True) for t in mixture(B, K, D, seed=B * 7 + D)]
    items = [(P.Polynomial(coeffs.float(), mode=mode, noise_scale=noise), 0.8), (P.Bounds(-1.5, 1.5), 0.3)]
    loss = P.mdn_loss(*inputs, physics=items, weight=1.1, reduction="none")
    weights = torch.linspace(0.5, 1.5, B)
    grads = torch.autograd.grad((loss * weights).sum(), inputs[:3])
    ref_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    ref_items = [(P.Polynomial(coeffs, mode=mode, noise_scale=noise), 0.8), (P.Bounds(-1.5, 1.5), 0.3)]
    ref = reference_loss(*ref_inputs, ref_items, 1.1)
    ref_grads = torch.autograd.grad((ref * weights.double()).sum(), ref_inputs[:3])
    assert rel_err(loss, ref) <= 1e-5
    for name, gr, rg in zip(("logits", "means", "log_scales"), grads, ref_grads):
        assert rel_err(gr, rg) <= 1e-4, (name, rel_err(gr, rg))


@pytest.mark.parametrize("layout", [(19, 1, 1, 4), (19, 3, 1, 4), (1, 1, 1, 4)])
def test_fused_polynomial_non_finite_coefficient_stays_in_its_samples(layout, cpu_isa):
    """The AVX2 kernel gathers and squares coefficients once per group (or once for all) when they are broadcast
    over components or the batch: a NaN coefficient must still reach exactly the samples that use it, and the
    others must match the reference."""
    B, K, D = 19, 3, 2
    coeffs = 0.5 * torch.randn(*layout, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    bad = 9 if layout[0] == B else slice(None)
    coeffs[bad, 0, 0, 2] = float("nan")
    inputs = [t.float() for t in mixture(B, K, D, seed=11)]
    loss = P.mdn_loss(*inputs, physics=P.Polynomial(coeffs.float()), weight=0.5, reduction="none")
    ref = reference_loss(*[t.double() for t in inputs], [(P.Polynomial(coeffs), 1.0)], 0.5)
    nan = torch.zeros(B, dtype=torch.bool)
    nan[bad] = True
    assert torch.isnan(loss[nan]).all() and torch.isnan(ref[nan]).all()
    if (~nan).any():
        assert rel_err(loss[~nan].double(), ref[~nan]) <= 1e-5


@pytest.mark.parametrize("dtype,shape,order", [
    (dt, sh, o) for dt in (torch.bfloat16, torch.float16, torch.float32)
    for sh, o in (((2003, 8, 4), 3), ((77, 5, 3), 8), ((9, 1, 1), 1))
    if not (dt == torch.float16 and o == 8)])  # order 8: moments up to 16th, beyond float16's range (inf, correctly)
@pytest.mark.parametrize("coeff_layout", ["per_sample_component", "shared", "per_dim"])
def test_fused_polynomial_fast_path_dtypes_and_batches(shape, order, dtype, coeff_layout, cpu_isa):
    """The lane-parallel AVX2 path takes float32 / bfloat16 / float16 (float32 accumulation), batches spanning many
    chunks with a partial last group, orders up to kMaxOrder = 8, an extra [B, K] penalty from a second spec."""
    B, K, D = shape
    g = torch.Generator().manual_seed(B + order)
    layout = {"per_sample_component": (B, K, 1, order + 1), "shared": (1, 1, 1, order + 1),
              "per_dim": (1, K, D, order + 1)}[coeff_layout]
    coeffs = (0.6 / (order + 1)) * torch.randn(*layout, generator=g, dtype=torch.float64)
    inputs = [t.to(dtype).requires_grad_(True) for t in mixture(B, K, D, seed=B + 1)]
    items = [(P.Polynomial(coeffs.to(dtype), noise_scale=0.2), 0.8), (P.Bounds(-1.5, 1.5), 0.3)]
    loss = P.mdn_loss(*inputs, physics=items, weight=0.9, reduction="none")
    weights = torch.linspace(0.5, 1.5, B)
    grads = torch.autograd.grad((loss.float() * weights).sum(), inputs[:3])
    ref_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    ref_items = [(P.Polynomial(coeffs.to(dtype).double(), noise_scale=0.2), 0.8), (P.Bounds(-1.5, 1.5), 0.3)]
    ref = reference_loss(*ref_inputs, ref_items, 0.9)
    ref_grads = torch.autograd.grad((ref * weights.double()).sum(), ref_inputs[:3])
    tol = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 5e-2), torch.float16: (2e-3, 1e-2)}[dtype]
    assert loss.dtype == dtype
    assert rel_err(loss.double(), ref) <= tol[0], rel_err(loss.double(), ref)
    for name, gr, rg in zip(("logits", "means", "log_scales"), grads, ref_grads):
        assert gr.dtype == dtype
        assert rel_err(gr.double(), rg) <= tol[1], (name, rel_err(gr.double(), rg))


@pytest.mark.parametrize("B", [37, 2003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode,noise", [("exact", 0.0), ("exact", 0.4), ("first", 0.4), ("mean", 0.0)])
def test_fused_polynomial_coefficient_gradient(B, dtype, mode, noise, cpu_isa):
    """Learnable coefficients (an inverse problem: the pitchfork's r, and per-component corrections [1, K, 1, 4]):
    the AVX2 kernel's backward writes d loss / d c (shared over D), against the float64 reference."""
    K, D = 5, 3
    g = torch.Generator().manual_seed(B)
    inputs = [t.to(dtype).requires_grad_(True) for t in mixture(B, K, D, seed=B + 2)]
    r0, corr0 = torch.tensor(0.7, dtype=torch.float64), 0.2 * torch.randn(1, K, 1, 4, generator=g, dtype=torch.float64)

    def coeffs(r, corr):
        return torch.stack([torch.zeros_like(r), r, torch.zeros_like(r), -torch.ones_like(r)]) + corr

    r, corr = r0.to(dtype).requires_grad_(True), corr0.to(dtype).requires_grad_(True)
    spec = P.Polynomial(coeffs(r, corr), mode=mode, noise_scale=noise)
    weights = torch.linspace(0.5, 1.5, B)
    loss = P.mdn_loss(*inputs, physics=spec, weight=0.8, reduction="none")
    grads = torch.autograd.grad((loss.float() * weights).sum(), inputs[:3] + [r, corr])
    ref_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    rr, rc = r.detach().double().requires_grad_(True), corr.detach().double().requires_grad_(True)
    ref = reference_loss(*ref_inputs, [(P.Polynomial(coeffs(rr, rc), mode=mode, noise_scale=noise), 1.0)], 0.8)
    ref_grads = torch.autograd.grad((ref * weights.double()).sum(), ref_inputs[:3] + [rr, rc])
    tol = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 5e-2)}[dtype]
    assert rel_err(loss.double(), ref) <= tol[0]
    for name, gr, rg in zip(("logits", "means", "log_scales", "r", "corrections"), grads, ref_grads):
        assert gr.dtype == dtype
        assert rel_err(gr.double(), rg) <= tol[1], (name, rel_err(gr.double(), rg))


@pytest.mark.parametrize("kind", ["polynomial", "linear", "stencil"])
def test_fused_parameter_gradient_without_mass(kind):
    """A component without mass (pi = 0 exactly) whose penalty overflows (scales of e^50): it contributes nothing to
    the family parameters' gradients (0, not 0 * inf = NaN), on every CPU kernel; the kernels agree, and equal the
    call without that component."""
    B, K, D = 21, 3, 4
    logits, means, log_scales, target = [t.float() for t in mixture(B, K, D, seed=4)]
    logits[:, 1] = -1e4
    log_scales[:, 1] = 50.0
    g = torch.Generator().manual_seed(9)
    law = torch.tensor([0.0, 0.7, 0.0, -1.0])
    base = {"polynomial": [law], "linear": [torch.randn(1, 1, 2, D, generator=g), torch.randn(1, 1, 2, generator=g)],
            "stencil": [torch.full((1, 1), 0.4), law[None, None]]}[kind]

    def param_grads(keep=slice(None)):
        params = [t.clone().requires_grad_(True) for t in base]
        spec = {"polynomial": P.Polynomial, "linear": P.Linear, "stencil": P.Stencil1D}[kind](*params)
        loss = P.mdn_loss(logits[:, keep], means[:, keep], log_scales[:, keep], target, physics=spec, weight=0.5)
        return torch.autograd.grad(loss, params)

    results = []
    for isa in cpu_isas():
        prev = physmdn._C.set_cpu_isa(isa)
        try:
            results.append(param_grads())
        finally:
            physmdn._C.set_cpu_isa(prev)
    for grads in results:
        assert all(torch.isfinite(t).all() for t in grads)
        for a, b in zip(grads, results[0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(param_grads([0, 2]), results[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", [(1, 5, 3, 4), (37, 1, 3, 3), (37, 5, 3, 2)])
@pytest.mark.parametrize("mode,noise", [("exact", 0.0), ("exact", 0.4), ("first", 0.4), ("mean", 0.0)])
def test_fused_polynomial_float64_coefficients_per_dimension(layout, mode, noise, cpu_isa):
    """float64, coefficients that vary over D: the blocked vector path (q = c * c per element), tight against the
    reference, loss and gradients."""
    B, K, D = 37, 5, 3
    g = torch.Generator().manual_seed(sum(layout))
    coeffs = 0.5 * torch.randn(*layout, generator=g, dtype=torch.float64)
    inputs = [t.requires_grad_(True) for t in mixture(B, K, D, seed=12)]
    spec = P.Polynomial(coeffs, mode=mode, noise_scale=noise)
    weights = torch.linspace(0.5, 1.5, B, dtype=torch.float64)
    loss = P.mdn_loss(*inputs, physics=spec, weight=0.9, reduction="none")
    grads = torch.autograd.grad((loss * weights).sum(), inputs[:3])
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    ref = reference_loss(*ref_inputs, [(spec, 1.0)], 0.9)
    ref_grads = torch.autograd.grad((ref * weights).sum(), ref_inputs[:3])
    assert rel_err(loss, ref) <= 1e-12
    for name, gr, rg in zip(("logits", "means", "log_scales"), grads, ref_grads):
        assert rel_err(gr, rg) <= 1e-11, (name, rel_err(gr, rg))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_polynomial_order_zero(dtype, cpu_isa):
    """J = 0 (a constant 'law' c0): the penalty is c0^2 for every component, whatever the means and scales."""
    B, K, D = 131, 3, 2
    inputs = [t.to(dtype).requires_grad_(True) for t in mixture(B, K, D, seed=5)]
    c0 = torch.full((1, K, 1, 1), 0.7, dtype=dtype)
    loss = P.mdn_loss(*inputs, physics=P.Polynomial(c0), weight=2.0, reduction="none")
    nll = physmdn.mixture_nll(*[t.detach() for t in inputs])
    torch.testing.assert_close(loss.detach(), nll + 2.0 * D * 0.49, rtol=1e-5, atol=1e-5)
    g_mu = torch.autograd.grad(loss.sum(), inputs[1])[0]
    g_ref = torch.autograd.grad(physmdn.mixture_nll(*inputs).sum(), inputs[1])[0]
    torch.testing.assert_close(g_mu, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction,upstream", [("mean", 1.0), ("sum", 1.0), ("mean", 0.37), ("none", 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_loss_forward_gradients(kind, reduction, upstream, dtype, device, cpu_isa):
    """Spec parameters without gradient: the forward computes the gradients for the reduction's upstream gradient
    (one pass on the CPU's polynomial path, forward + backward kernels otherwise) and the backward hands them over
    or rescales them; with an extra [B, K] penalty from a second spec whose input needs a gradient."""
    B, K, D = 61, 3, 4
    inputs = [t.requires_grad_(True) for t in mixture(B, K, D, dtype, device, seed=11)]
    spec = make_spec(kind, B, K, D, dtype, device, noise=0.3, grad=False)
    items = [(spec, 0.7), (P.Bounds(-1.2, 1.2), 0.4)]
    out = P.mdn_loss(*inputs, physics=items, weight=1.3, reduction=reduction)
    weights = torch.linspace(0.5, 1.5, B, device=device, dtype=dtype) if reduction == "none" else upstream
    grads = torch.autograd.grad((out * weights).sum(), inputs)
    ref_inputs = [t.detach().double().cpu().requires_grad_(True) for t in inputs]
    ref_spec = make_spec(kind, B, K, D, torch.float64, "cpu", noise=0.3, grad=False)
    ref = reference_loss(*ref_inputs, [(ref_spec, 0.7), (P.Bounds(-1.2, 1.2), 0.4)], 1.3)
    ref = {"mean": ref.mean(), "sum": ref.sum(), "none": ref}[reduction]
    ref_w = weights.double().cpu() if reduction == "none" else upstream
    ref_grads = torch.autograd.grad((ref * ref_w).sum(), ref_inputs)
    tol = (1e-12, 1e-11) if dtype == torch.float64 else (1e-5, 1e-4)
    assert rel_err(out.detach().double().cpu(), ref.detach()) <= tol[0]
    for name, g, rg in zip(("logits", "means", "log_scales", "target"), grads, ref_grads):
        assert rel_err(g.double().cpu(), rg) <= tol[1], (name, rel_err(g.double().cpu(), rg))


def test_fused_loss_forward_gradients_retain_graph_and_skip():
    """A retained second backward recomputes (same numbers); the mean reduction's backward runs no op over the
    [B, K, D] gradients; opcheck of the compute_grad variant."""
    B, K, D = 64, 4, 3
    inputs = [t.float().requires_grad_(True) for t in mixture(B, K, D, seed=2)]
    coeffs = torch.tensor([0.0, 1.0, 0.0, -1.0])
    out = P.mdn_loss(*inputs, physics=P.Polynomial(coeffs), weight=0.5, reduction="mean")
    with ops_on_3d() as mode:
        first = torch.autograd.grad(out, inputs, retain_graph=True)
    assert not mode.seen, mode.seen
    second = torch.autograd.grad(out, inputs)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    from physmdn._fused import _kernel_args
    family, p0, p1, moment, couple, spacing, boundary, noise = _kernel_args(P.Polynomial(coeffs), B, K, D, inputs[1])
    plain = [t.detach() for t in inputs]
    for extra in (None, torch.rand(B, K)):
        torch.library.opcheck(torch.ops.physmdn.mdn_loss_fwd.default,
                              (*plain, p0, p1, extra, family, moment, couple, 0.5, spacing, boundary, noise, True, 0.25))


@pytest.mark.parametrize("device", DEVICES)
def test_fused_loss_reduction_under_torch_compile(device):
    coeffs = torch.tensor([0.0, 1.0, 0.0, -1.0], device=device)

    def step(logits, means, log_scales, target):
        return 2.0 * P.mdn_loss(logits, means, log_scales, target, physics=P.Polynomial(coeffs), weight=0.5,
                                reduction="mean")

    assert_compiled_matches_eager(step, [t.float().requires_grad_(True) for t in mixture(33, 4, 3, device=device)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode,noise", [("exact", 0.0), ("exact", 0.4), ("mean", 0.0)])
@pytest.mark.parametrize("layout", ["A_shared_b_per_sample", "A_per_sample_b_shared"])
@pytest.mark.parametrize("shape,M", [((1003, 5, 3), 2), ((9, 1, 1), 1), ((40, 3, 9), 4)])
def test_fused_linear_fast_path(shape, M, layout, mode, noise, dtype, cpu_isa):
    """The linear family on the CPU's lane-parallel path (float32 / bfloat16) and blocked path (float64; float32
    without AVX2), parameters without gradient: loss and gradients against the float64 reference, with an extra
    [B, K] penalty, over chunked batches with a partial group."""
    B, K, D = shape
    g = torch.Generator().manual_seed(B * M + D)
    a_shape, b_shape = ((1, K, M, D), (B, 1, M)) if layout == "A_shared_b_per_sample" else ((B, K, M, D), (1, K, M))
    A = 0.5 * torch.randn(*a_shape, generator=g, dtype=torch.float64)
    bias = torch.randn(*b_shape, generator=g, dtype=torch.float64)
    inputs = [t.to(dtype).requires_grad_(True) for t in mixture(B, K, D, seed=B + 3)]
    items = [(P.Linear(A.to(dtype), bias.to(dtype), mode=mode, noise_scale=noise), 0.6), (P.Bounds(-1.4, 1.4), 0.2)]
    out = P.mdn_loss(*inputs, physics=items, weight=1.2, reduction="none")
    weights = torch.linspace(0.5, 1.5, B)
    grads = torch.autograd.grad((out.float() * weights).sum(), inputs)
    ref_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    ref_items = [(P.Linear(A.to(dtype).double(), bias.to(dtype).double(), mode=mode, noise_scale=noise), 0.6),
                 (P.Bounds(-1.4, 1.4), 0.2)]
    ref = reference_loss(*ref_inputs, ref_items, 1.2)
    ref_grads = torch.autograd.grad((ref * weights.double()).sum(), ref_inputs)
    tol = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 5e-2), torch.float64: (1e-12, 1e-11)}[dtype]
    assert rel_err(out.double(), ref) <= tol[0], rel_err(out.double(), ref)
    for name, gr, rg in zip(("logits", "means", "log_scales", "target"), grads, ref_grads):
        assert rel_err(gr.double(), rg) <= tol[1], (name, rel_err(gr.double(), rg))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("boundary", ["periodic", "neumann"])
@pytest.mark.parametrize("mode,noise", [("exact", 0.0), ("exact", 0.3), ("first", 0.3), ("mean", 0.0)])
@pytest.mark.parametrize("shape,J", [((1003, 3, 16), 3), ((17, 2, 1), 0), ((9, 4, 2), 2), ((40, 1, 3), 1)])
def test_fused_stencil_fast_path(shape, J, boundary, mode, noise, dtype, cpu_isa):
    """The stencil family on the CPU's lane-parallel path (float32 / bfloat16; float64 and builds without AVX2: the
    generic loop), parameters without gradient, including fields of 1-3 points where neighbours fold onto the point
    itself, against the float64 reference."""
    B, K, D = shape
    g = torch.Generator().manual_seed(B + D + J)
    diffusion = torch.rand(B, 1, generator=g, dtype=torch.float64) + 0.2
    reaction = 0.5 * torch.randn(1, K, J + 1, generator=g, dtype=torch.float64)
    inputs = [t.to(dtype).requires_grad_(True) for t in mixture(B, K, D, seed=D + 7)]

    def spec(dt):
        return P.Stencil1D(diffusion.to(dtype).to(dt), reaction.to(dtype).to(dt), spacing=0.8, boundary=boundary,
                           mode=mode, noise_scale=noise)

    items = [(spec(dtype), 0.5), (P.Bounds(-1.4, 1.4), 0.2)]
    out = P.mdn_loss(*inputs, physics=items, weight=0.7, reduction="none")
    weights = torch.linspace(0.5, 1.5, B)
    grads = torch.autograd.grad((out.float() * weights).sum(), inputs)
    ref_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    ref = reference_loss(*ref_inputs, [(spec(torch.float64), 0.5), (P.Bounds(-1.4, 1.4), 0.2)], 0.7)
    ref_grads = torch.autograd.grad((ref * weights.double()).sum(), ref_inputs)
    tol = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 5e-2), torch.float64: (1e-12, 1e-11)}[dtype]
    assert rel_err(out.double(), ref) <= tol[0], rel_err(out.double(), ref)
    for name, gr, rg in zip(("logits", "means", "log_scales", "target"), grads, ref_grads):
        assert rel_err(gr.double(), rg) <= tol[1], (name, rel_err(gr.double(), rg))


@pytest.mark.parametrize("kind", ["polynomial", "linear", "stencil"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_penalty_overflow_is_inf_and_nan_stays_nan(kind, dtype, cpu_isa):
    """Scales of e^30 with a cubic law: the true penalty (~1e79) overflows float32. The loss is +inf there (not the
    NaN of inf - inf between overflowed moments); float64 represents it. A NaN input gives NaN for its sample only."""
    B, K, D = 19, 3, 4
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(B, K, generator=g, dtype=torch.float64)
    means = 1e3 * torch.randn(B, K, D, generator=g, dtype=torch.float64)
    log_scales = torch.full((B, K, D), 30.0, dtype=torch.float64)
    target = torch.randn(B, D, generator=g, dtype=torch.float64)
    means[7, 1, 2] = float("nan")
    law = torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=torch.float64)
    spec = {"polynomial": lambda: P.Polynomial(law.to(dtype)),
            "linear": lambda: P.Linear((1e20 * torch.ones(1, K, 2, D, dtype=torch.float64)).to(dtype),
                                       torch.zeros(1, K, 2, dtype=dtype)),
            "stencil": lambda: P.Stencil1D(0.5, law.to(dtype))}[kind]()
    out = P.mdn_loss(*[t.to(dtype) for t in (logits, means, log_scales, target)], physics=spec, weight=0.5,
                     reduction="none")
    assert torch.isnan(out[7]) and not torch.isnan(out[torch.arange(B) != 7]).any()
    others = out[torch.arange(B) != 7]
    if dtype == torch.float32:
        assert torch.isinf(others).all() and (others > 0).all()
    else:
        assert torch.isfinite(others).all() and (others > 1e30).all()

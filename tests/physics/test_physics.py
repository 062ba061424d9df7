"""Physics penalties: closed-form expectations, fused kernels against the plain-torch reference, autograd,
opcheck, torch.compile, and bad specs."""

import math

import pytest
import torch

import physmdn
from physmdn import physics as P
from physmdn.reference import mixture_nll as reference_nll
from conftest import DEVICES, rel_err


def mixture(B, K, D, dtype=torch.float64, device="cpu", seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    out = (torch.randn(B, K, generator=g, dtype=torch.float64), torch.randn(B, K, D, generator=g, dtype=torch.float64),
           scale * torch.randn(B, K, D, generator=g, dtype=torch.float64) - 0.5,
           torch.randn(B, D, generator=g, dtype=torch.float64))
    return [t.to(dtype=dtype, device=device) for t in out]


def make_spec(kind, B, K, D, dtype=torch.float64, device="cpu", mode="exact", noise=0.0, seed=1, grad=True):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, positive=False):
        t = torch.rand(*shape, generator=g, dtype=torch.float64) + 0.2 if positive else \
            torch.randn(*shape, generator=g, dtype=torch.float64)
        return t.to(dtype=dtype, device=device).requires_grad_(grad)

    if kind == "polynomial":  # component-specific coefficients, broadcast over D
        return P.Polynomial(rnd(B, K, 1, 4) * 0.5, mode=mode, noise_scale=noise)
    if kind == "polynomial_shared":
        return P.Polynomial(rnd(1, K, D, 2), mode=mode, noise_scale=noise)
    if kind == "linear":
        return P.Linear(rnd(1, K, 2, D), rnd(B, 1, 2), mode=mode, noise_scale=noise)
    if kind == "linear_per_sample":  # A contiguous per sample: the AVX2 kernel transposes its rows per group
        return P.Linear(rnd(B, K, 3, D) * 0.5, rnd(B, K, 3), mode=mode, noise_scale=noise)
    if kind == "stencil_periodic":
        return P.Stencil1D(rnd(B, 1, positive=True), rnd(1, K, 4) * 0.5, spacing=0.7, mode=mode, noise_scale=noise)
    if kind == "stencil_neumann":
        return P.Stencil1D(rnd(1, K, positive=True), rnd(B, K, 3) * 0.5, spacing=1.3, boundary="neumann", mode=mode,
                           noise_scale=noise)
    raise ValueError(kind)


KINDS = ["polynomial", "polynomial_shared", "linear", "linear_per_sample", "stencil_periodic", "stencil_neumann"]


def spec_params(spec):
    return [t for t in vars(spec).values() if isinstance(t, torch.Tensor) and t.requires_grad]


def reference_loss(logits, means, log_scales, target, items, weight, coupling="detached"):
    return reference_nll(logits, means, log_scales, target) + weight * P.physics_penalty(logits, means, log_scales, items,
                                                                                        coupling=coupling)


# ----- closed forms against Monte Carlo ----------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_exact_expectation_matches_monte_carlo(kind):
    B, K, D = 3, 2, 5
    _, means, log_scales, _ = mixture(B, K, D, seed=4)
    spec = make_spec(kind, B, K, D, grad=False)
    exact = spec.penalty(means, log_scales)
    n, chunks = 100_000, 10  # 10^6 samples in all
    g = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(chunks):
        y = means + log_scales.exp() * torch.randn(n, B, K, D, generator=g, dtype=torch.float64)
        samples.append(spec.residual(y).square().sum(-1))
    values = torch.cat(samples)
    mc, stderr = values.mean(0), values.std(0) / math.sqrt(values.shape[0])
    assert ((exact - mc).abs() <= 5 * stderr + 1e-12).all(), ((exact - mc) / stderr)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_first_moment_matches_monte_carlo(kind, noise):
    """moment="first": ||E r(Y)||^2 against the squared Monte-Carlo mean of the residual (10^6 draws of the noise-free
    variance max(sigma^2 - noise^2, 0)); the bound propagates the mean's standard error through the square."""
    B, K, D = 3, 2, 5
    _, means, log_scales, _ = mixture(B, K, D, seed=4)
    spec = make_spec(kind, B, K, D, grad=False, mode="first", noise=noise)
    exact = spec.penalty(means, log_scales)
    sd = (log_scales.exp().square() - noise**2).clamp_min(0.0).sqrt()
    n, chunks = 100_000, 10
    g = torch.Generator().manual_seed(0)
    total = total_sq = 0.0
    for _ in range(chunks):
        r = spec.residual(means + sd * torch.randn(n, B, K, D, generator=g, dtype=torch.float64))
        total, total_sq = total + r.sum(0), total_sq + r.square().sum(0)
    N = n * chunks
    mean_r = total / N
    se = ((total_sq / N - mean_r.square()).clamp_min(0.0) / N).sqrt()
    mc = mean_r.square().sum(-1)
    bound = 5 * (2 * mean_r.abs() * se).square().sum(-1).sqrt() + 5 * se.square().sum(-1) + 1e-12
    assert ((exact - mc).abs() <= bound).all(), ((exact - mc) / bound)
    assert (exact <= make_spec(kind, B, K, D, grad=False, mode="exact", noise=noise).penalty(means, log_scales) + 1e-12).all()


@pytest.mark.parametrize("kind", KINDS)
def test_point_value_is_the_residual_at_the_means(kind):
    B, K, D = 3, 2, 5
    _, means, log_scales, _ = mixture(B, K, D, seed=4)
    spec = make_spec(kind, B, K, D, grad=False, mode="point")
    torch.testing.assert_close(spec.penalty(means, log_scales), spec.residual(means).square().sum(-1))


def test_bounds_exact_matches_monte_carlo():
    _, means, log_scales, _ = mixture(2, 3, 4, seed=2)
    spec = P.Bounds(lower=-0.5, upper=0.7, mode="exact")
    y = means + log_scales.exp() * torch.randn(400_000, *means.shape, dtype=torch.float64)
    values = (torch.relu(y - 0.7).square() + torch.relu(-0.5 - y).square()).sum(-1)
    mc, stderr = values.mean(0), values.std(0) / math.sqrt(values.shape[0])
    assert ((spec.penalty(means, log_scales) - mc).abs() <= 5 * stderr + 1e-12).all()


def test_mean_mode_is_point_evaluation():
    B, K, D = 4, 3, 6
    _, means, log_scales, _ = mixture(B, K, D)
    for kind in KINDS:
        spec = make_spec(kind, B, K, D, mode="mean", grad=False)
        torch.testing.assert_close(spec.penalty(means, log_scales), spec.residual(means).square().sum(-1))


# ----- fused kernels against the reference --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_loss_row_strided_views_match_contiguous(dtype, cpu_isa):
    """The fused loss on logits / means / log-scales split from one network output (row-strided views) gives the
    loss and gradients of the same call on contiguous copies, bit for bit (read in place by the AVX2 kernel, copied
    for the blocked paths)."""
    B, K, D = 45, 3, 4
    g = torch.Generator().manual_seed(5)
    head = (0.5 * torch.randn(B, K + 2 * K * D, generator=g, dtype=torch.float64)).to(dtype)
    target = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    law = P.Polynomial(torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=dtype))

    def run(contiguous):
        h = head.clone().requires_grad_(True)
        lg, mu, ls = torch.split(h, [K, K * D, K * D], dim=-1)
        lg, mu, ls = lg, mu.view(B, K, D), ls.view(B, K, D)
        if contiguous:
            lg, mu, ls = lg.contiguous(), mu.contiguous(), ls.contiguous()
        loss = P.mdn_loss(lg, mu, ls, target, physics=law, weight=0.5, reduction="none")
        loss.sum().backward()
        return loss.detach(), h.grad

    (loss_v, grad_v), (loss_c, grad_c) = run(False), run(True)
    assert torch.equal(loss_v, loss_c) and torch.equal(grad_v, grad_c)


@pytest.mark.parametrize("kind", ["polynomial", "linear", "stencil_periodic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_batch_broadcast_inputs(kind, dtype, cpu_isa):
    """The fused loss with a log-scale parameter and a target broadcast over the batch (stride 0): the AVX2 kernel
    reads them in place, bit-identical to the call on contiguous copies; loss and gradients (reaching the
    parameters) match the float64 reference."""
    B, K, D = 37, 3, 4
    logits, means, log_scales, target = mixture(B, K, D, seed=6)
    spec = make_spec(kind, B, K, D, dtype=dtype, grad=False)
    ref_spec = make_spec(kind, B, K, D, grad=False)
    scale_param, target_param = log_scales[0], target[:1]

    def run(dt, contiguous, sp):
        leaves = [t.detach().to(dt).requires_grad_(True) for t in (logits, means, scale_param, target_param)]
        ls, y = leaves[2].expand(B, K, D), leaves[3].expand(B, D)
        if contiguous:
            ls, y = ls.contiguous(), y.contiguous()
        loss = (P.mdn_loss if dt != torch.float64 else reference_loss)(
            *leaves[:2], ls, y, **({"physics": sp, "weight": 0.7, "reduction": "none"} if dt != torch.float64
                                   else {"items": [(sp, 1.0)], "weight": 0.7}))
        grads = torch.autograd.grad((loss * torch.linspace(0.5, 1.5, B, dtype=dt)).sum(), leaves)
        return loss.detach(), grads

    loss_v, grads_v = run(dtype, False, spec)
    loss_c, grads_c = run(dtype, True, spec)
    if cpu_isa == "avx2":
        assert torch.equal(loss_v, loss_c)
        for a, b in zip(grads_v[:2], grads_c[:2]):
            assert torch.equal(a, b)
    loss_r, grads_r = run(torch.float64, True, ref_spec)
    tol = (1e-5, 1e-4) if dtype == torch.float32 else (2e-2, 8e-2)
    assert rel_err(loss_v.double(), loss_r) <= tol[0]
    for name, a, b in zip(("logits", "means", "log_scale parameter", "target parameter"), grads_v, grads_r):
        assert rel_err(a.double(), b) <= tol[1], (name, rel_err(a.double(), b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode,noise,coupling", [("exact", 0.0, "detached"), ("exact", 0.6, "coupled"),
                                                 ("first", 0.0, "detached"), ("first", 0.6, "coupled"),
                                                 ("mean", 0.0, "coupled")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_loss_matches_reference(kind, mode, noise, coupling, dtype, device, cpu_isa):
    B, K, D = 37, 3, 5
    inputs = [t.requires_grad_(True) for t in mixture(B, K, D, dtype, device, seed=3)]
    spec = make_spec(kind, B, K, D, dtype, device, mode=mode, noise=noise)
    items = [(spec, 0.7)]
    loss = P.mdn_loss(*inputs, physics=items, weight=1.3, reduction="none", coupling=coupling)
    wrt = inputs[:3] + spec_params(spec)
    grads = torch.autograd.grad((loss * torch.linspace(0.5, 1.5, B, device=device, dtype=dtype)).sum(), wrt)
    ref_inputs = [t.detach().double().cpu().requires_grad_(True) for t in inputs]
    ref_spec = make_spec(kind, B, K, D, torch.float64, "cpu", mode=mode, noise=noise)
    ref = reference_loss(*ref_inputs, [(ref_spec, 0.7)], 1.3, coupling=coupling)
    ref_grads = torch.autograd.grad((ref * torch.linspace(0.5, 1.5, B, dtype=torch.float64)).sum(),
                                    ref_inputs[:3] + spec_params(ref_spec))
    tol = (1e-12, 1e-11) if dtype == torch.float64 else (1e-5, 1e-4)
    assert rel_err(loss.cpu(), ref) <= tol[0]
    names = ["logits", "means", "log_scales"] + [f"param{i}" for i in range(len(grads) - 3)]
    for name, g, rg in zip(names, grads, ref_grads):
        assert g.shape == rg.shape
        assert rel_err(g.cpu(), rg) <= tol[1], (name, rel_err(g.cpu(), rg))


@pytest.mark.parametrize("device", DEVICES)
def test_several_specs_and_torch_specs_enter_the_kernel(device):
    """First built-in spec fused; the others (built-in or torch) go through the kernel's `extra` input."""
    B, K, D = 19, 4, 3
    inputs = [t.requires_grad_(True) for t in mixture(B, K, D, device=device, seed=8)]
    context = torch.rand(B, 1, dtype=torch.float64, device=device)

    def build(dev):
        ctx = context.to(dev)
        return [
            (make_spec("polynomial", B, K, D, device=dev), 0.5),
            (make_spec("linear", B, K, D, device=dev), 0.25),
            (P.Stability(torch.tensor([0.3, 0.0, -3.0], dtype=torch.float64, device=dev)), 2.0),
            (P.Bounds(lower=-1.0, upper=1.0, mode="exact"), 1.0),
            (P.Residual(lambda y, c: y[..., :1] * c - y[..., 1:2] ** 2, ctx, mode="sigma"), 0.1),
        ]

    items = build(device)
    loss = P.mdn_loss(*inputs, physics=items, weight=0.9, reduction="sum")
    grads = torch.autograd.grad(loss, inputs[:3])
    ref_inputs = [t.detach().cpu().requires_grad_(True) for t in inputs]
    ref = reference_loss(*ref_inputs, build("cpu"), 0.9).sum()
    ref_grads = torch.autograd.grad(ref, ref_inputs[:3])
    assert rel_err(loss.cpu(), ref) <= 1e-12
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g.cpu(), rg) <= 1e-11


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode,coupling", [("exact", "coupled"), ("first", "coupled"), ("first", "detached")])
def test_gradcheck_fused(kind, mode, coupling):
    """Detached coupling is a stop-gradient on pi: the loss's true gradient except for the logits, which then learn
    from the likelihood alone (its logit gradient is compared with the reference in test_fused_loss_matches_reference)."""
    B, K, D = 3, 2, 4
    logits, means, log_scales, target = mixture(B, K, D, seed=6)
    spec = make_spec(kind, B, K, D, noise=0.3, mode=mode)
    params = spec_params(spec)

    def fn(means, log_scales, target, *param_values):
        for name, value in zip([n for n, t in vars(spec).items() if isinstance(t, torch.Tensor) and t.requires_grad],
                               param_values):
            setattr(spec, name, value)
        return P.mdn_loss(logits, means, log_scales, target, physics=spec, weight=0.8, reduction="none",
                          coupling=coupling)

    logits.requires_grad_(coupling == "coupled")
    args = [t.requires_grad_(True) for t in (means, log_scales, target)] + params
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradcheck(fn, args, fast_mode=True)  # (its check of reentrant backwards too)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_fused(requires_grad, device):
    from physmdn._fused import _kernel_args

    B, K, D = 6, 3, 4
    for kind in ["polynomial", "linear", "stencil_periodic"]:
        inputs = [t.requires_grad_(requires_grad) for t in mixture(B, K, D, torch.float32, device)]
        spec = make_spec(kind, B, K, D, torch.float32, device, grad=requires_grad)
        family, p0, p1, moment, couple, spacing, boundary, noise = _kernel_args(spec, B, K, D, inputs[1])
        for extra in (None, torch.rand(B, K, device=device, requires_grad=requires_grad)):
            args = (*inputs, p0, p1, extra, family, moment, couple, 0.5, spacing, boundary, noise)
            torch.library.opcheck(torch.ops.physmdn.mdn_loss_fwd.default, args)
            loss, saved = torch.ops.physmdn.mdn_loss_fwd(*args)[:2]
            torch.library.opcheck(torch.ops.physmdn.mdn_loss_bwd.default,
                                  (torch.ones_like(loss), *[t.detach() for t in args[:6]], None if extra is None else extra.detach(), family, moment, couple, 0.5,
                                   spacing, boundary, noise, saved, True, True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("learn", [False, True])
def test_torch_compile_fullgraph_fused(device, learn):
    """fullgraph torch.compile of the fused loss, with the law's parameter r as data or learnable (its gradient
    through the kernel's full-size coefficient gradient and the batch-first reduction of its expand)."""
    torch._dynamo.reset()
    B, K, D = 16, 3, 2

    def step(logits, means, log_scales, target, r):
        coeffs = torch.stack([torch.zeros_like(r), r, torch.zeros_like(r), -torch.ones_like(r)], -1)[:, None, None, :]
        return P.mdn_loss(logits, means, log_scales, target, physics=P.Polynomial(coeffs), weight=0.5)

    inputs = [t.requires_grad_(True) for t in mixture(B, K, D, torch.float32, device)]
    r = (torch.rand(1, device=device) + 0.5).requires_grad_(learn)
    wrt = inputs[:3] + ([r] if learn else [])
    compiled = torch.compile(step, fullgraph=True)
    out = compiled(*inputs, r)
    grads = torch.autograd.grad(out, wrt)
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    ref_r = r.detach().clone().requires_grad_(learn)
    ref = step(*ref_inputs, ref_r)
    torch.testing.assert_close(out, ref)
    for g, rg in zip(grads, torch.autograd.grad(ref, ref_inputs[:3] + ([ref_r] if learn else []))):
        torch.testing.assert_close(g, rg)


@pytest.mark.parametrize("in_shape,out_shape", [((1, 3, 1, 4), (7, 3, 5, 4)), ((1, 1), (6, 2)), ((4,), (5, 3, 2, 4)),
                                                ((2, 1, 3), (2, 4, 3)), ((2, 3), (2, 3)), ((1, 1, 1), (1, 1, 1))])
def test_expand_backward_reduces_batch_first(in_shape, out_shape):
    """The family parameters' expand: its backward (batch dimension first) is sum_to_size."""
    from physmdn._fused import _Expand, _sum_to

    g = torch.randn(out_shape, dtype=torch.float64)
    torch.testing.assert_close(_sum_to(g, in_shape), g.sum_to_size(in_shape))
    t = torch.randn(in_shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: _Expand.apply(x, out_shape), (t,))


# ----- behaviour -----------------------------------------------------------------------------------------

def test_penalty_moves_mass_to_consistent_component():
    """Two components, one on the law y = 1 and one off it: the penalty's logit gradient favours the first."""
    logits = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    means = torch.tensor([[[1.0], [0.2]]], dtype=torch.float64)
    log_scales = torch.full((1, 2, 1), -2.0, dtype=torch.float64)
    target = torch.tensor([[0.6]], dtype=torch.float64)
    spec = P.Polynomial(torch.tensor([-1.0, 1.0], dtype=torch.float64))  # r = y - 1
    base = torch.autograd.grad(physmdn.mixture_nll(logits, means, log_scales, target).sum(), logits)[0]
    with_physics = torch.autograd.grad(P.mdn_loss(logits, means, log_scales, target, physics=spec, weight=5.0,
                                                  coupling="coupled"), logits)[0]
    # descent direction: -grad; the consistent component 0 must gain relative to component 1
    assert (-(with_physics[0, 0] - with_physics[0, 1])) > (-(base[0, 0] - base[0, 1])) + 1.0
    # detached (the default): the weights learn from the likelihood alone
    detached = torch.autograd.grad(P.mdn_loss(logits, means, log_scales, target, physics=spec, weight=5.0), logits)[0]
    torch.testing.assert_close(detached, base, rtol=1e-12, atol=1e-15)


def test_noise_aware_penalty_stops_shrinking_scales_below_noise():
    means = torch.zeros(1, 1, 1, dtype=torch.float64)
    spec_plain = P.Polynomial(torch.tensor([0.0, 1.0], dtype=torch.float64))  # r = y, E r^2 = mu^2 + sigma^2
    spec_noise = P.Polynomial(torch.tensor([0.0, 1.0], dtype=torch.float64), noise_scale=0.1)
    for sigma, expect_plain, expect_noise in [(0.05, 0.0025, 0.0), (0.2, 0.04, 0.03)]:
        ls = torch.full((1, 1, 1), math.log(sigma), dtype=torch.float64, requires_grad=True)
        assert spec_plain.penalty(means, ls).item() == pytest.approx(expect_plain)
        assert spec_noise.penalty(means, ls).item() == pytest.approx(expect_noise)
        logits, target = torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
        g_plain = torch.autograd.grad(P.mdn_loss(logits, means, ls, target, physics=spec_plain) -
                                      physmdn.mixture_nll(logits, means, ls, target).mean(), ls)[0]
        g_noise = torch.autograd.grad(P.mdn_loss(logits, means, ls, target, physics=spec_noise) -
                                      physmdn.mixture_nll(logits, means, ls, target).mean(), ls)[0]
        assert g_plain.item() > 0  # plain expectation always pushes the scale down
        assert (g_noise.item() == 0.0) == (sigma < 0.1)


def test_stability_penalizes_unstable_branch():
    r = torch.tensor([0.5], dtype=torch.float64)
    spec = P.Stability(torch.stack([r, torch.zeros_like(r), -3 * torch.ones_like(r)], -1)[:, None, None, :])
    means = torch.tensor([[[0.0], [math.sqrt(0.5)]]], dtype=torch.float64)  # unstable y = 0, stable +sqrt(r)
    pen = spec.penalty(means, torch.zeros_like(means))
    assert pen[0, 0].item() == pytest.approx(0.25) and pen[0, 1].item() == 0.0


def test_monotonic_penalty_uses_the_model_derivative():
    x = torch.linspace(0, 1, 8, dtype=torch.float64)[:, None].requires_grad_(True)
    means = torch.stack([2 * x, -3 * x], dim=1)  # [B, 2, 1]: component 0 increasing, 1 decreasing
    pen = P.Monotonic(x, dim=0, output=0, increasing=True).penalty(means, torch.zeros_like(means))
    assert torch.allclose(pen[:, 0], torch.zeros(8, dtype=torch.float64))
    assert torch.allclose(pen[:, 1], torch.full((8,), 9.0, dtype=torch.float64))


def test_residual_modes():
    B, K, D = 3, 2, 2
    _, means, log_scales, _ = mixture(B, K, D)
    A = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    linear = P.Linear(A, torch.tensor([0.5], dtype=torch.float64))
    fn = lambda y, c: y @ A.T - 0.5  # noqa: E731
    sigma = P.Residual(fn, mode="sigma").penalty(means, log_scales)
    torch.testing.assert_close(sigma, linear.penalty(means, log_scales))  # exact for linear residuals
    point = P.Residual(fn, mode="point").penalty(means, log_scales)
    torch.testing.assert_close(point, P.Linear(A, torch.tensor([0.5], dtype=torch.float64), mode="mean").penalty(means, log_scales))
    mc = P.Residual(fn, mode="mc", samples=200_000, generator=torch.Generator().manual_seed(0)).penalty(means, log_scales)
    assert rel_err(mc, sigma) < 2e-2
    # unscented points in D = 1 reproduce the 4th moment: E[y^4] for the residual y^2
    _, m1, s1, _ = mixture(B, K, 1)
    quad = P.Residual(lambda y, c: y ** 2, mode="sigma").penalty(m1, s1)
    torch.testing.assert_close(quad, P.Polynomial(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)).penalty(m1, s1))


# ----- bad specs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("build,match", [
    (lambda: P.Polynomial(torch.zeros(2, 3, 4)), "coeffs must be \\[B\\|1, K\\|1, D\\|1, J\\+1\\]"),
    (lambda: P.Polynomial(torch.zeros(1, 1, 1, 0)), "order J >= 0"),
    (lambda: P.Polynomial(torch.zeros(4), mode="median"), "moment must be one of"),
    (lambda: P.Polynomial(torch.zeros(4), moment="third"), "moment must be one of \\('second', 'first', 'point'\\)"),
    (lambda: P.Polynomial(torch.zeros(4), moment="first", mode="exact"), "give moment or mode, not both"),
    (lambda: P.Stencil1D(0.1, torch.zeros(3), coupling="loose"), "coupling must be one of"),
    (lambda: P.Stability(torch.zeros(3), coupling="yes"), "coupling must be one of"),
    (lambda: P.Polynomial(torch.zeros(4), noise_scale=-1.0), "noise_scale must be"),
    (lambda: P.Linear(torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 3)), "b must be \\[B\\|1, K\\|1, M\\] with M = 2"),
    (lambda: P.Stencil1D(0.1, torch.zeros(3), spacing=0.0), "spacing must be"),
    (lambda: P.Stencil1D(0.1, torch.zeros(3), boundary="dirichlet"), "boundary must be"),
    (lambda: P.Bounds(), "Bounds needs lower, upper or both"),
    (lambda: P.Residual("not callable"), "fn must be callable"),
    (lambda: P.Polynomial(torch.zeros(4, dtype=torch.long)), "coeffs must be a floating-point tensor"),
])
def test_bad_spec_construction(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


@pytest.mark.parametrize("spec,match", [
    (lambda: P.Polynomial(torch.zeros(1, 1, 3, 2)), "Polynomial coeffs must be broadcastable to \\[B\\|1, K\\|1, D\\|1, J\\+1\\] = \\(4, 2, 5, 2\\)"),
    (lambda: P.Polynomial(torch.zeros(1, 3, 1, 2)), "got shape \\(1, 3, 1, 2\\)"),
    (lambda: P.Linear(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2)), "Linear A must be broadcastable"),
    (lambda: P.Stencil1D(torch.zeros(3, 1), torch.zeros(3)), "Stencil1D diffusion must be broadcastable"),
    (lambda: P.Polynomial(torch.zeros(10)), None),  # order 9 > kernel maximum: falls back to the reference
])
def test_spec_shape_mismatch_fails_at_the_boundary(spec, match):
    inputs = mixture(4, 2, 5)
    if match is None:
        loss = P.mdn_loss(*inputs, physics=spec())
        torch.testing.assert_close(loss, reference_loss(*inputs, [(spec(), 1.0)], 1.0).mean())
        return
    with pytest.raises(ValueError, match=match):
        P.mdn_loss(*inputs, physics=spec())


def test_bad_physics_argument():
    inputs = mixture(4, 2, 5)
    with pytest.raises(TypeError, match="physics must be a PhysicsSpec"):
        P.mdn_loss(*inputs, physics=["nope"])
    with pytest.raises(ValueError, match="reduction must be"):
        P.mdn_loss(*inputs, physics=make_spec("linear", 4, 2, 5), reduction="max")


def test_cpp_boundary_checks_family_arguments():
    logits, means, log_scales, target = mixture(4, 2, 3)
    empty = means.new_empty(0)
    with pytest.raises(RuntimeError, match="coeffs must be \\[B, K, D, J\\+1\\]"):
        torch.ops.physmdn.mdn_loss_fwd(logits, means, log_scales, target, torch.zeros(4, 2, 3), empty, None, 0, 2, False,
                                       1.0, 1.0, 0, 0.0)
    with pytest.raises(RuntimeError, match="0 <= J <= 8"):
        torch.ops.physmdn.mdn_loss_fwd(logits, means, log_scales, target, torch.zeros(4, 2, 3, 12, dtype=torch.float64),
                                       empty, None, 0, 2, False, 1.0, 1.0, 0, 0.0)
    with pytest.raises(RuntimeError, match="family must be"):
        torch.ops.physmdn.mdn_loss_fwd(logits, means, log_scales, target, empty, empty, None, 7, 2, False, 1.0, 1.0, 0, 0.0)
    with pytest.raises(RuntimeError, match="extra must be \\[B, K\\]"):
        torch.ops.physmdn.mdn_loss_fwd(logits, means, log_scales, target, empty, empty, torch.zeros(3, 2, dtype=torch.float64),
                                       -1, 2, False, 1.0, 1.0, 0, 0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["polynomial", "linear", "stencil_neumann"])
def test_fused_loss_many_components(kind, device):
    """K >= 16 takes the warp-per-sample schedule on the GPU."""
    B, K, D = 9, 40, 3
    inputs = [t.requires_grad_(True) for t in mixture(B, K, D, torch.float64, device, seed=12)]
    spec = make_spec(kind, B, K, D, torch.float64, device, noise=0.2)
    extra_spec = P.Bounds(lower=-2.0, upper=2.0)
    loss = P.mdn_loss(*inputs, physics=[spec, extra_spec], weight=0.6, reduction="none")
    grads = torch.autograd.grad(loss.sum(), inputs[:3] + spec_params(spec))
    ref_inputs = [t.detach().cpu().requires_grad_(True) for t in inputs]
    ref_spec = make_spec(kind, B, K, D, torch.float64, "cpu", noise=0.2)
    ref = reference_loss(*ref_inputs, [(ref_spec, 1.0), (extra_spec, 1.0)], 0.6)
    ref_grads = torch.autograd.grad(ref.sum(), ref_inputs[:3] + spec_params(ref_spec))
    assert rel_err(loss.cpu(), ref) <= 1e-12
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g.cpu(), rg) <= 1e-11


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_mixed_dtypes_run_in_float32(device):
    """Under torch.autocast a network emits bf16 heads while targets stay float32: the loss runs in float32."""
    torch.manual_seed(0)
    B, K, D = 32, 3, 1
    net = torch.nn.Linear(1, K + 2 * K * D).to(device)
    x = torch.rand(B, 1, device=device)
    y = torch.randn(B, D, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = net(x)
        assert out.dtype == torch.bfloat16
        logits, means, log_scales = out[:, :K], out[:, K:K + K * D].reshape(B, K, D), out[:, K + K * D:].reshape(B, K, D)
        nll = physmdn.mixture_nll(logits, means, log_scales, y)
        coeffs = torch.tensor([0.0, 1.0, 0.0, -1.0], device=device)
        loss = P.mdn_loss(logits, means, log_scales, y, physics=P.Polynomial(coeffs), weight=0.1)
    assert nll.dtype == torch.float32 and loss.dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    ref = reference_nll(logits.float(), means.float(), log_scales.float(), y)
    torch.testing.assert_close(nll, ref)


@pytest.mark.parametrize("boundary", ["periodic", "neumann"])
def test_field_stability_separates_stable_and_unstable_states(boundary):
    D, eps, h = 16, 1e-3, 1.0 / 16
    spec = P.FieldStability(eps, torch.tensor([1.0, 0.0, -3.0], dtype=torch.float64), spacing=h, boundary=boundary)
    states = torch.stack([torch.ones(D), -torch.ones(D), torch.zeros(D)]).double()[None]  # [1, 3, D]
    pen = spec.penalty(states, torch.zeros_like(states))
    assert pen[0, 0] == 0 and pen[0, 1] == 0  # u = +-1: J = eps L - 2 I, eigenvalues <= -2
    assert pen[0, 2].item() == pytest.approx(1.0)  # u = 0: the uniform mode grows at rate 1
    # eigenvalues of the symmetrized Jacobian equal those of the true (non-symmetric for Neumann) one
    u = torch.randn(1, 1, D, dtype=torch.float64)
    true_J = eps / h**2 * P.Stencil1D(eps, [0.0], spacing=h, boundary=boundary).laplacian(D) + torch.diag(1 - 3 * u[0, 0] ** 2)
    expected = torch.linalg.eigvals(true_J).real.max()
    torch.testing.assert_close(torch.linalg.eigvalsh(spec.jacobian(u))[0, 0, -1], expected)
    # it trains: the gradient moves a state near u = 0 away from it
    mu = torch.full((1, 1, D), 0.1, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(spec.penalty(mu, torch.zeros_like(mu)).sum(), mu)
    assert (grad < 0).all()


@pytest.mark.parametrize("kernel_coupling", ["detached", "coupled"])
def test_specs_of_both_couplings_in_one_loss(kernel_coupling):
    """A fused spec of one coupling and torch specs of both: values and all gradients as the reference, which
    weights each spec by pi or pi.detach() as its own coupling (or mdn_loss's) says."""
    B, K, D = 11, 3, 2
    inputs = [t.requires_grad_(True) for t in mixture(B, K, D, seed=9)]
    other = "coupled" if kernel_coupling == "detached" else "detached"

    def build():
        return [(make_spec("polynomial", B, K, D, mode="first"), 0.5),
                (P.Stability(torch.tensor([0.3, 0.0, -3.0], dtype=torch.float64), coupling=other), 2.0),
                (P.Bounds(lower=-1.0, upper=1.0, mode="exact", coupling=kernel_coupling), 1.0)]

    items = build()
    loss = P.mdn_loss(*inputs, physics=items, weight=0.9, reduction="sum", coupling=kernel_coupling)
    grads = torch.autograd.grad(loss, inputs[:3] + spec_params(items[0][0]))
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    ref_items = build()
    ref = reference_loss(*ref_inputs, ref_items, 0.9, coupling=kernel_coupling).sum()
    ref_grads = torch.autograd.grad(ref, ref_inputs[:3] + spec_params(ref_items[0][0]))
    assert rel_err(loss, ref) <= 1e-12
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) <= 1e-11


def test_mdn_loss_rejects_an_unknown_coupling():
    with pytest.raises(ValueError, match="coupling must be one of \\('detached', 'coupled'\\), got 'soft'"):
        P.mdn_loss(*mixture(4, 2, 3), physics=make_spec("linear", 4, 2, 3), coupling="soft")


def test_cpp_checks_moment_and_64_bit_coefficient_counts():
    logits, means, log_scales, target = mixture(4, 2, 3)
    empty = means.new_empty(0)
    coeffs = torch.zeros(4, 2, 3, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="moment must be 0 \\(point\\), 1 \\(first\\) or 2 \\(second\\), got 5"):
        torch.ops.physmdn.mdn_loss_fwd(logits, means, log_scales, target, coeffs, empty, None, 0, 5, False, 1.0, 1.0,
                                       0, 0.0)
    # a [B, K, D, 2^32 + 3] view (stride 0 over the coefficients): its count must not be narrowed to int (order 2)
    huge = torch.zeros(1, dtype=torch.float64).expand(4, 2, 3, 2**32 + 3)
    with pytest.raises(RuntimeError, match="coeffs must hold J\\+1 coefficients with 0 <= J <= 8, got 4294967299"):
        torch.ops.physmdn.mdn_loss_fwd(logits, means, log_scales, target, huge, empty, None, 0, 2, False, 1.0, 1.0, 0,
                                       0.0)
    reaction = torch.zeros(1, dtype=torch.float64).expand(4, 2, 2**32 + 2)
    with pytest.raises(RuntimeError, match="reaction must hold J\\+1 coefficients .* got 4294967298"):
        torch.ops.physmdn.mdn_loss_fwd(logits, means, log_scales, target, torch.ones(4, 2, dtype=torch.float64),
                                       reaction, None, 2, 2, False, 1.0, 1.0, 0, 0.0)


@pytest.mark.parametrize("D,order", [(1, 3), (2, 4), (3, 3)])
def test_gauss_hermite_residual_is_exact_for_polynomials(D, order):
    """mode="gauss_hermite" with n points per dimension is exact for E||r||^2 of per-coordinate polynomials of
    degree <= n - 1 (cross terms between coordinates included): against the closed-form Polynomial spec, and a
    coupled residual r = y_0 y_1 against its closed form."""
    B, K = 3, 2
    _, means, log_scales, _ = mixture(B, K, D, seed=11)
    coeffs = torch.tensor([0.2, 1.0, -0.5, 0.3][:order], dtype=torch.float64)
    poly = P.Polynomial(coeffs, noise_scale=0.1)
    gh = P.Residual(lambda y, c: P._poly_eval(coeffs, y), mode="gauss_hermite", order=order, noise_scale=0.1)
    torch.testing.assert_close(gh.penalty(means, log_scales), poly.penalty(means, log_scales), rtol=1e-10, atol=1e-12)
    if D >= 2:  # E[(y0 y1)^2] = E[y0^2] E[y1^2] for independent coordinates
        cross = P.Residual(lambda y, c: y[..., 0] * y[..., 1], mode="gauss_hermite", order=3)
        s2 = log_scales.exp().square()
        expected = (means[..., 0].square() + s2[..., 0]) * (means[..., 1].square() + s2[..., 1])
        torch.testing.assert_close(cross.penalty(means, log_scales), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="gauss_hermite' takes D <= 3"):
        P.Residual(lambda y, c: y, mode="gauss_hermite").penalty(*mixture(2, 2, 4)[1:3])


def test_residual_noise_scale_matches_the_builtin_families():
    B, K, D = 4, 3, 2
    _, means, log_scales, _ = mixture(B, K, D, seed=12)
    A = torch.randn(1, 1, 3, D, dtype=torch.float64)
    linear = P.Linear(A, noise_scale=0.4)
    sigma = P.Residual(lambda y, c: torch.einsum("...md,...sd->...sm", A[0], y), mode="sigma", noise_scale=0.4)
    torch.testing.assert_close(sigma.penalty(means, log_scales), linear.penalty(means, log_scales))


def test_dynamics_stability_matches_the_polynomial_stability_prior():
    """Pitchfork f = r y - y^3 (D = 1): relu(f'(mu) + margin)^2, values and gradients as Stability([r, 0, -3])."""
    B, K = 6, 3
    r = torch.linspace(-1.0, 1.0, B, dtype=torch.float64)
    means = torch.randn(B, K, 1, dtype=torch.float64, requires_grad=True)
    log_scales = torch.zeros(B, K, 1, dtype=torch.float64)
    general = P.DynamicsStability(lambda y, c: c[..., :1] * y - y**3, context=r[:, None], margin=0.1)
    poly = P.Stability(torch.stack([r, torch.zeros_like(r), torch.full_like(r, -3.0)], -1).reshape(B, 1, 1, 3),
                       margin=0.1)
    got, want = general.penalty(means, log_scales), poly.penalty(means, log_scales)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), means)[0], torch.autograd.grad(want.sum(), means)[0])


def test_dynamics_stability_of_a_coupled_system():
    """f(y) = A y + (|y|^2) y in D = 2: at y = 0 the Jacobian is A, whose eigenvalues are known (a stable focus
    and a saddle); the penalty is relu(max Re lambda)^2, and gradcheck passes through the eigenvalues."""
    focus = torch.tensor([[-1.0, 2.0], [-2.0, -1.0]], dtype=torch.float64)  # -1 +- 2i
    saddle = torch.tensor([[0.5, 0.0], [0.0, -2.0]], dtype=torch.float64)  # 0.5, -2
    A = torch.stack([focus, saddle]).reshape(1, 2, 2, 2)

    def f(y, c):
        return torch.einsum("kij,bkj->bki", A[0], y) + y.square().sum(-1, keepdim=True) * y

    spec = P.DynamicsStability(f)
    zeros = torch.zeros(1, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(spec.penalty(zeros, zeros), torch.tensor([[0.0, 0.25]], dtype=torch.float64))
    means = (0.1 * torch.randn(1, 2, 2, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m: spec.penalty(m, torch.zeros_like(m)), (means,))
    with pytest.raises(ValueError, match="D <= max_dim = 1"):
        P.mdn_loss(*mixture(3, 2, 2), physics=P.DynamicsStability(f, max_dim=1, method="dense"))


def _allen_cahn_field(D):
    h = 1.0 / D

    def f(y, c):
        return c[..., :1] * (torch.roll(y, 1, -1) - 2 * y + torch.roll(y, -1, -1)) / h**2 + y - y**3

    eps = torch.tensor([1e-3, 5e-3, 2e-2], dtype=torch.float64)
    exact = P.FieldStability(eps[:, None], torch.tensor([1.0, 0.0, -3.0], dtype=torch.float64), spacing=h,
                             boundary="periodic", margin=0.5)
    return f, eps[:, None], exact


def test_dynamics_stability_krylov_is_exact_with_a_full_krylov_space():
    """method='krylov' with iters >= D spans the whole space: the top eigenvalue (values and gradients) of a field
    Jacobian equals FieldStability's, and of a non-symmetric one the dense method's."""
    D = 40
    f, eps, exact = _allen_cahn_field(D)
    torch.manual_seed(0)
    means = torch.tanh(2 * torch.randn(3, 2, D, dtype=torch.float64)).requires_grad_(True)
    krylov = P.DynamicsStability(f, context=eps, margin=0.5, method="krylov", iters=D)
    got, want = krylov.penalty(means, None), exact.penalty(means, None)
    assert float(want.detach().max()) > 0  # some components are unstable beyond the margin
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), means)[0], torch.autograd.grad(want.sum(), means)[0],
                               rtol=1e-7, atol=1e-7)
    A = torch.randn(2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def g(y, c):
        return torch.einsum("kij,bkj->bki", A, y) - 0.1 * y**3

    y = 0.3 * torch.randn(4, 2, 6, dtype=torch.float64)
    torch.testing.assert_close(P.DynamicsStability(g, method="krylov", iters=6).top_eigenvalue(y),
                               P.DynamicsStability(g, method="dense").top_eigenvalue(y), rtol=1e-8, atol=1e-8)


def test_dynamics_stability_krylov_on_a_large_field():
    """D = 160 > max_dim: 'auto' takes the Krylov method; with 64 steps the value is a lower bound of the exact top
    eigenvalue (a symmetric Jacobian) and close to it, and the penalty trains (finite gradients)."""
    D = 160
    f, eps, exact = _allen_cahn_field(D)
    torch.manual_seed(2)
    means = torch.tanh(3 * torch.sin(torch.linspace(0, 2 * math.pi, D, dtype=torch.float64))
                       + 0.3 * torch.randn(3, 2, D, dtype=torch.float64)).requires_grad_(True)
    spec = P.DynamicsStability(f, context=eps)
    spec.validate(3, 2, D)
    top = spec.top_eigenvalue(means)
    truth = torch.linalg.eigvalsh(exact.jacobian(means.detach()))[..., -1]
    assert bool((top <= truth + 1e-8).all())
    spread = truth - torch.linalg.eigvalsh(exact.jacobian(means.detach()))[..., 0]
    assert float(((truth - top) / spread).max()) < 0.02
    grad = torch.autograd.grad(spec.penalty(means, None).sum(), means)[0]
    assert bool(torch.isfinite(grad).all())
    with pytest.raises(ValueError, match="method='dense'.*D <= max_dim = 32"):
        P.DynamicsStability(f, context=eps, method="dense").validate(3, 2, D)
    with pytest.raises(ValueError, match="method must be 'auto', 'dense' or 'krylov'"):
        P.DynamicsStability(f, method="power")
    with pytest.raises(ValueError, match="iters must be an int >= 1"):
        P.DynamicsStability(f, iters=0)

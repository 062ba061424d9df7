"""The fused mixture NLL op against its float64 plain-torch reference."""

import itertools

import pytest
import torch

import physmdn
from physmdn import reference
from conftest import DEVICES, assert_compiled_matches_eager, ops_on_3d, rel_err

SHAPES = list(itertools.product([1, 3, 257], [1, 2, 5, 33], [1, 3, 17]))


def make_inputs(B, K, D, dtype=torch.float64, device="cpu", seed=0, scale_spread=0.5):
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(B, K, generator=g, dtype=torch.float64)
    means = torch.randn(B, K, D, generator=g, dtype=torch.float64)
    log_scales = scale_spread * torch.randn(B, K, D, generator=g, dtype=torch.float64)
    target = torch.randn(B, D, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (logits, means, log_scales, target)]


def loss_and_grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    loss = fn(*inputs)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device)
    grads = torch.autograd.grad((loss * weights).sum(), inputs) if loss.numel() else [torch.zeros_like(t) for t in inputs]
    return loss.detach(), grads


def check_against_reference(inputs, dtype, loss_tol, grad_tol, grad_floor=1e-30):
    """grad_floor: gradients are compared relative to max(max|expected|, grad_floor); a float32 gradient
    pi - gamma that cancels to 1e-17 in float64 carries float32 rounding of pi (~1e-7) and is judged against 1."""
    exact_inputs = [t.double().cpu() for t in inputs]  # reference sees the same (rounded) numbers
    ref_loss, ref_grads = loss_and_grads(reference.mixture_nll, exact_inputs)
    loss, grads = loss_and_grads(physmdn.mixture_nll, inputs)
    assert loss.dtype == dtype
    assert rel_err(loss.cpu(), ref_loss) <= loss_tol, (rel_err(loss.cpu(), ref_loss), loss_tol)
    for name, g, rg in zip(("logits", "means", "log_scales", "target"), grads, ref_grads):
        assert g.dtype == dtype and g.shape == rg.shape
        assert rel_err(g.cpu(), rg, grad_floor) <= grad_tol, (name, rel_err(g.cpu(), rg, grad_floor), grad_tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,K,D", SHAPES)
def test_float32_matches_float64_reference(B, K, D, device, cpu_isa):
    check_against_reference(make_inputs(B, K, D, torch.float32, device, seed=B * 100 + K * 10 + D), torch.float32,
                            loss_tol=1e-5, grad_tol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,K,D", [(1, 1, 1), (3, 5, 17), (257, 33, 3), (64, 8, 4)])
def test_float64_matches_reference_tightly(B, K, D, device, cpu_isa):
    check_against_reference(make_inputs(B, K, D, torch.float64, device, seed=7), torch.float64, 1e-12, 1e-11)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,K,D", [(3, 2, 3), (257, 5, 17), (33, 33, 1)])
def test_half_types_accumulate_in_float32(B, K, D, dtype, device, cpu_isa):
    check_against_reference(make_inputs(B, K, D, dtype, device, seed=3), dtype, loss_tol=5e-2, grad_tol=5e-2)


def test_reference_agrees_with_torch_distributions():
    inputs = make_inputs(257, 5, 3)
    torch.testing.assert_close(reference.mixture_nll(*inputs), reference.mixture_nll_distributions(*inputs))
    torch.testing.assert_close(physmdn.mixture_nll(*inputs), reference.mixture_nll_distributions(*inputs))


@pytest.mark.parametrize("B,K,D", [(4, 3, 2), (2, 1, 1), (3, 6, 5)])
def test_gradcheck_float64(B, K, D, cpu_isa):
    inputs = [t.requires_grad_(True) for t in make_inputs(B, K, D, seed=11)]
    assert torch.autograd.gradcheck(physmdn.mixture_nll, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad, device):
    for B, K, D in [(5, 3, 2), (1, 1, 1), (0, 2, 3)]:
        inputs = [t.requires_grad_(requires_grad) for t in make_inputs(B, K, D, torch.float32, device)]
        torch.library.opcheck(torch.ops.physmdn.mixture_nll_fwd.default, inputs)
    loss, lse = torch.ops.physmdn.mixture_nll_fwd(*make_inputs(5, 3, 2, torch.float32, device))[:2]
    torch.library.opcheck(torch.ops.physmdn.mixture_nll_bwd.default,
                          [torch.ones_like(loss), *make_inputs(5, 3, 2, torch.float32, device), lse])


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def step(logits, means, log_scales, target):
        return (physmdn.mixture_nll(logits * 2.0, means, log_scales, target) ** 2).mean()

    compiled = torch.compile(step, fullgraph=True)
    inputs = [t.requires_grad_(True) for t in make_inputs(33, 4, 3, torch.float32, device)]
    out = compiled(*inputs)
    grads = torch.autograd.grad(out, inputs)
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    ref = step(*ref_inputs)
    ref_grads = torch.autograd.grad(ref, ref_inputs)
    torch.testing.assert_close(out, ref)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_and_expanded_inputs(device, cpu_isa):
    B, K, D = 9, 4, 3
    logits, means, log_scales, target = make_inputs(B, K, D, torch.float64, device)
    means_t = means.transpose(1, 2).contiguous().transpose(1, 2)  # strides (K*D, 1, K) permuted
    shared_scales = log_scales[:1].expand(B, K, D)  # stride 0 over the batch
    target_nc = torch.randn(D, B, dtype=torch.float64, device=device).t()
    logits_nc = logits.t().contiguous().t()
    assert not means_t.is_contiguous() and shared_scales.stride(0) == 0 and not target_nc.is_contiguous()
    args = (logits_nc, means_t, shared_scales, target_nc)
    check_against_reference(list(args), torch.float64, 1e-12, 1e-11)
    # gradient with respect to an expanded leaf flows back to its source
    base = log_scales[:1].clone().requires_grad_(True)
    loss = physmdn.mixture_nll(logits, means, base.expand(B, K, D), target).sum()
    ref_base = base.detach().clone().requires_grad_(True)
    ref = reference.mixture_nll(logits, means, ref_base.expand(B, K, D), target).sum()
    torch.testing.assert_close(torch.autograd.grad(loss, base)[0], torch.autograd.grad(ref, ref_base)[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_split_head_and_broadcast_rows(device, dtype, cpu_isa):
    """Inputs as MDN heads make them: logits, means and log-scales views of one [B, W] output (rows contiguous at
    batch stride W, a multiple of 4: 16-byte aligned rows) and a [K, D] log-scale row broadcast over the batch (the
    tiled CUDA schedule reads both in place). Loss and the gradients reaching the head and the shared row against
    the reference."""
    B, K, D = 300, 8, 4
    W = K + 2 * K * D + 8
    g = torch.Generator().manual_seed(11)
    head = torch.randn(B, W, generator=g, dtype=torch.float64)
    shared = 0.3 * torch.randn(K, D, generator=g, dtype=torch.float64)
    target = torch.randn(B, D, generator=g, dtype=torch.float64)

    def run(fn, head, shared, target, use_shared):
        head, shared = head.detach().requires_grad_(True), shared.detach().requires_grad_(True)
        lg, mu, ls = head[:, :K], head[:, K:K + K * D].view(B, K, D), head[:, K + K * D:K + 2 * K * D].view(B, K, D)
        if use_shared:
            ls = shared.expand(B, K, D)
        loss = fn(lg, mu, ls, target).sum()
        return loss, torch.autograd.grad(loss, (head, shared) if use_shared else (head,))

    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for use_shared in (False, True):
        loss, grads = run(physmdn.mixture_nll, *(t.to(device=device, dtype=dtype) for t in (head, shared, target)),
                          use_shared)
        exact = [t.to(dtype).double() for t in (head, shared, target)]
        ref_loss, ref_grads = run(reference.mixture_nll, *exact, use_shared)
        torch.testing.assert_close(loss.double().cpu(), ref_loss, **tol)
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got.double().cpu(), want, **tol)


# ----- numerical robustness ---------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_extremes_float64(device, cpu_isa):
    """logits +-1e4, log_scales anywhere in [-30, 30], targets 1e6 away: finite and correct."""
    B, K, D = 64, 5, 3
    logits, means, log_scales, target = make_inputs(B, K, D, torch.float64, device, seed=5)
    logits = logits.sign() * 1e4
    log_scales = torch.empty_like(log_scales).uniform_(-30, 30)
    log_scales[0] = -30.0
    log_scales[1] = 30.0
    target = target + 1e6
    inputs = [logits, means, log_scales, target]
    loss, grads = loss_and_grads(physmdn.mixture_nll, inputs)
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    check_against_reference(inputs, torch.float64, 1e-12, 1e-10)


def extreme_inputs(case, inputs):
    """float32 extremes: logits +-1e4 (one 0.5 above), log-scales of -30 with targets 1e-14 from a mean, log-scales
    of +30, or targets 1e6 away."""
    logits, means, log_scales, target = inputs
    if case == "logits":
        logits = torch.where(logits > 0, 1e4, -1e4).to(logits)
        logits[:, 0] = 1e4 + 0.5
    elif case == "tiny_scales":
        log_scales = torch.full_like(log_scales, -30.0)
        target = means[:, 0] + 1e-14 * torch.randn_like(target)
    elif case == "huge_scales":
        log_scales = torch.full_like(log_scales, 30.0)
    else:
        target = target + 1e6
        log_scales = log_scales.clamp(-3, 3)
    return [logits, means, log_scales, target]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["logits", "tiny_scales", "huge_scales", "far_target"])
@pytest.mark.parametrize("K,D", [(5, 3), (8, 4), (8, 1), (3, 8)])  # all but (5, 3): the AVX2 row-wise path
def test_extremes_float32(case, K, D, device, cpu_isa):
    B = 64
    inputs = extreme_inputs(case, make_inputs(B, K, D, torch.float32, device, seed=9))
    loss, grads = loss_and_grads(physmdn.mixture_nll, inputs)
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    check_against_reference(inputs, torch.float32, 1e-5, 1e-4, grad_floor=1.0 if case == "huge_scales" else 1e-30)


@pytest.mark.parametrize("device", DEVICES)
def test_k1_d1_and_empty_batch(device):
    inputs = make_inputs(7, 1, 1, torch.float64, device)
    logits, means, log_scales, target = inputs
    expected = -torch.distributions.Normal(means[:, 0, 0], log_scales[:, 0, 0].exp()).log_prob(target[:, 0])
    torch.testing.assert_close(physmdn.mixture_nll(*inputs), expected)
    empty = [t.requires_grad_(True) for t in make_inputs(0, 3, 2, torch.float32, device)]
    out = physmdn.mixture_nll(*empty)
    assert out.shape == (0,)
    grads = torch.autograd.grad(out.sum(), empty)
    assert [g.shape for g in grads] == [t.shape for t in empty]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K,D", [(3, 2), (4, 2)])  # (4, 2): the AVX2 row-wise path
def test_nan_stays_in_its_sample(K, D, device, cpu_isa):
    logits, means, log_scales, target = make_inputs(6, K, D, torch.float32, device)
    means[2, 1, 0] = float("nan")
    inputs = [t.requires_grad_(True) for t in (logits, means, log_scales, target)]
    loss = physmdn.mixture_nll(*inputs)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[torch.arange(6, device=device) != 2]).all()
    grads = torch.autograd.grad(loss.sum(), inputs)
    for g in grads:
        assert torch.isfinite(torch.cat([g[:2].flatten(), g[3:].flatten()])).all()


# ----- bad input -------------------------------------------------------------------------------------

def _bad_cases():
    good = make_inputs(4, 3, 2, torch.float32)
    l, m, s, y = good
    return [
        ((l, m[0], s, y), "means must be \\[B, K, D\\]"),
        ((l[:, :2], m, s, y), "logits must be \\[B, K\\]"),
        ((l, m, s[:, :, :1], y), "log_scales must be \\[B, K, D\\]"),
        ((l, m, s, y[:3]), "target must be \\[B, D\\]"),
        ((l, m, s, y[:, :1]), "target must be \\[B, D\\]"),
        ((l.double(), m, s, y), "logits must have the dtype of means"),
        ((l, m, s, y.long()), "target must be a floating-point tensor"),
        ((l, m.long(), s, y), "means must be a floating-point tensor"),
        ((l, torch.zeros(4, 0, 2), s, y), "K >= 1 components"),
        ((l, m, s, "y"), "target must be a torch.Tensor"),
    ]


# the Python boundary takes leading batch dimensions ([*, K], [*, K, D], [*, D]) and names them so
_PYTHON_MESSAGES = {0: "means must be \\[\\*, K, D\\]", 1: "logits must be \\[\\*, K\\] with K = 3",
                    2: "log_scales must be \\[\\*, K, D\\] with \\(K, D\\) = \\(3, 2\\)",
                    3: "batch dimensions of logits \\(4,\\), means \\(4,\\), log_scales \\(4,\\) and target \\(3,\\) "
                       "must broadcast", 4: "target must be \\[\\*, D\\] with D = 2"}


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_python_boundary(case):
    args, message = _bad_cases()[case]
    if case == 0:  # means [K, D] without a batch dimension broadcasts (a shared mean); a 1-D one cannot
        args = (args[0], args[1][0], args[2], args[3])
    with pytest.raises((ValueError, TypeError), match=_PYTHON_MESSAGES.get(case, message)):
        physmdn.mixture_nll(*args)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_leading_batch_dimensions_match_the_flattened_call(reduction, dtype, cpu_isa):
    """[T, B, ...] inputs, a shared [K, D] mean and a [1, 1, K, D] log-scale broadcast as torch broadcasts: loss and
    gradients equal the flattened, expanded call; the per-sample loss comes back as [T, B]."""
    T, B, K, D = 3, 5, 4, 2
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(T, B, K, generator=g, dtype=dtype, requires_grad=True)
    means = torch.randn(K, D, generator=g, dtype=dtype, requires_grad=True)
    log_scales = (0.3 * torch.randn(1, 1, K, D, generator=g, dtype=dtype)).requires_grad_(True)
    target = torch.randn(T, B, D, generator=g, dtype=dtype)
    loss = physmdn.mixture_nll(logits, means, log_scales, target, reduction=reduction)
    assert loss.shape == ((T, B) if reduction == "none" else ())
    flat = physmdn.mixture_nll(logits.reshape(T * B, K), means.expand(T * B, K, D), log_scales[0].expand(T * B, K, D),
                               target.reshape(T * B, D), reduction=reduction)
    torch.testing.assert_close(loss.reshape(flat.shape), flat, rtol=0, atol=0)
    ref = reference.mixture_nll(*[t.double() for t in (logits.reshape(T * B, K), means.expand(T * B, K, D),
                                                       log_scales[0].expand(T * B, K, D), target.reshape(T * B, D))])
    ref = {"none": ref, "mean": ref.mean(), "sum": ref.sum()}[reduction]
    assert rel_err(loss.reshape(ref.shape), ref) <= (1e-12 if dtype == torch.float64 else 1e-5)
    weights = torch.rand(loss.shape, generator=g, dtype=dtype)
    grads = torch.autograd.grad((loss * weights).sum(), (logits, means, log_scales))
    wrt = [t.detach().clone().requires_grad_(True) for t in (logits, means, log_scales)]
    flat = physmdn.mixture_nll(wrt[0].reshape(T * B, K), wrt[1].expand(T * B, K, D), wrt[2][0].expand(T * B, K, D),
                               target.reshape(T * B, D), reduction=reduction)
    expected = torch.autograd.grad((flat * weights.reshape(flat.shape)).sum(), wrt)
    for a, b in zip(grads, expected):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)


def test_mdn_loss_takes_leading_batch_dimensions():
    from physmdn import physics as P

    T, B, K, D = 2, 3, 3, 2
    g = torch.Generator().manual_seed(4)
    inputs = [torch.randn(T, B, K, generator=g, dtype=torch.float64), torch.randn(T, B, K, D, generator=g,
              dtype=torch.float64), 0.3 * torch.randn(T, B, K, D, generator=g, dtype=torch.float64),
              torch.randn(T, B, D, generator=g, dtype=torch.float64)]
    spec = P.Polynomial(torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=torch.float64), moment="first")
    loss = P.mdn_loss(*inputs, physics=spec, weight=0.5, reduction="none")
    flat = P.mdn_loss(*[t.reshape(T * B, *t.shape[2:]) for t in inputs], physics=spec, weight=0.5, reduction="none")
    assert loss.shape == (T, B)
    torch.testing.assert_close(loss.reshape(-1), flat, rtol=0, atol=0)


@pytest.mark.parametrize("case", [c for c in range(len(_bad_cases())) if c != 9])
def test_bad_input_cpp_boundary(case):
    args, message = _bad_cases()[case]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.physmdn.mixture_nll_fwd(*args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_mismatch():
    l, m, s, y = make_inputs(4, 3, 2, torch.float32)
    with pytest.raises(ValueError, match="target must be on the device of means"):
        physmdn.mixture_nll(l, m, s, y.cuda())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_recompute_backward_path_matches(dtype, device, cpu_isa):
    """compute_grad=False: the backward recomputes through mixture_nll_bwd instead of scaling saved gradients."""
    inputs = [t.requires_grad_(True) for t in make_inputs(129, 5, 3, dtype, device, seed=21)]
    weights = torch.rand(129, dtype=dtype, device=device)
    loss = torch.ops.physmdn.mixture_nll_fwd(*inputs, False)[0]
    grads = torch.autograd.grad((loss * weights).sum(), inputs)
    loss2 = physmdn.mixture_nll(*inputs)
    grads2 = torch.autograd.grad((loss2 * weights).sum(), inputs)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(loss, loss2) <= tol
    for g, g2 in zip(grads, grads2):
        assert rel_err(g, g2) <= tol


def test_retain_graph_backward_twice():
    inputs = [t.requires_grad_(True) for t in make_inputs(17, 3, 2, torch.float32, seed=2)]
    loss = physmdn.mixture_nll(*inputs).sum()
    first = torch.autograd.grad(loss, inputs, retain_graph=True)
    second = torch.autograd.grad(loss, inputs)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_components_nan_gives_nan(dtype, device, cpu_isa):
    logits, means, log_scales, target = make_inputs(4, 3, 2, dtype, device)
    means[1] = float("nan")
    loss = physmdn.mixture_nll(logits, means, log_scales, target)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()


@pytest.mark.parametrize("D", [2, 4, 8, 5])
def test_float32_fast_path_specialized_dimensions(D, cpu_isa):
    """The CPU float32 path unrolls D in {1, 2, 3, 4, 8}; others read D at run time."""
    for B, K in [(1, 1), (67, 8), (130, 3)]:
        check_against_reference(make_inputs(B, K, D, torch.float32, "cpu", seed=B + K + D), torch.float32,
                                loss_tol=1e-5, grad_tol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("upstream", [1.0, 0.37])
@pytest.mark.parametrize("B", [1, 13, 64, 1000])
def test_reductions_match_reference(reduction, upstream, B, dtype, device, cpu_isa):
    """reduction='mean'/'sum': the forward computes the gradients for the reduction's upstream gradient; the
    backward hands them over unscaled when the upstream gradient is the expected one (upstream 1.0) and rescales
    them otherwise (0.37). Both must give the reference gradients."""
    inputs = make_inputs(B, 5, 3, dtype, device, seed=B)
    exact = [t.detach().double().cpu().requires_grad_(True) for t in inputs]
    ref = getattr(reference.mixture_nll(*exact), reduction)()
    ref_grads = torch.autograd.grad(ref * upstream, exact)
    params = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = physmdn.mixture_nll(*params, reduction=reduction)
    assert out.shape == () and out.dtype == dtype
    grads = torch.autograd.grad(out * upstream if upstream != 1.0 else out, params)
    tol = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]
    assert rel_err(out.double().cpu(), ref.detach()) <= tol
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == dtype
        assert rel_err(g.double().cpu(), rg) <= 10 * tol, rel_err(g.double().cpu(), rg)


def test_reduction_mean_backward_twice_and_accumulation():
    """The unscaled hand-over must not alias anything the graph keeps: a retained second backward and gradient
    accumulation into .grad give the same numbers as the reference."""
    inputs = [t.requires_grad_(True) for t in make_inputs(257, 4, 2, torch.float32, seed=3)]
    out = physmdn.mixture_nll(*inputs, reduction="mean")
    out.backward(retain_graph=True)
    first = [t.grad.clone() for t in inputs]
    out.backward()
    for t, f in zip(inputs, first):
        torch.testing.assert_close(t.grad, 2 * f)
    exact = [t.detach().double().requires_grad_(True) for t in inputs]
    ref_grads = torch.autograd.grad(reference.mixture_nll(*exact).mean(), exact)
    for f, rg in zip(first, ref_grads):
        assert rel_err(f.double(), rg) <= 1e-5


def test_reduction_bad_value_and_empty_batch():
    inputs = make_inputs(0, 2, 3, torch.float32)
    assert physmdn.mixture_nll(*inputs, reduction="sum").item() == 0.0
    assert physmdn.mixture_nll(*inputs, reduction="mean").isnan()
    with pytest.raises(ValueError, match="reduction must be 'none', 'mean' or 'sum', got 'avg'"):
        physmdn.mixture_nll(*inputs, reduction="avg")
    # with gradients: torch's values, empty gradients
    leaves = [t.requires_grad_(True) for t in inputs]
    total = physmdn.mixture_nll(*leaves, reduction="sum")
    assert total.item() == 0.0
    assert [g.shape for g in torch.autograd.grad(total, leaves)] == [t.shape for t in leaves]
    mean = physmdn.mixture_nll(*leaves, reduction="mean")
    assert mean.isnan() and [g.shape for g in torch.autograd.grad(mean, leaves)] == [t.shape for t in leaves]


@pytest.mark.parametrize("device", DEVICES)
def test_reduction_under_torch_compile(device):
    def step(logits, means, log_scales, target):
        return physmdn.mixture_nll(logits, means, log_scales, target, reduction="mean") * 3.0

    assert_compiled_matches_eager(step, [t.requires_grad_(True) for t in make_inputs(33, 4, 3, torch.float32, device)])


def test_torch_compile_dynamic_batch_compiles_once():
    """``torch.compile(dynamic=True)``: batch sizes from 7 to 1000 through one graph (no recompilation: the fake
    kernels' shapes stay symbolic and the mean's gradient scale is not specialized on B), values and gradients as
    eager, for the NLL and the fused loss."""
    from physmdn import physics as P

    torch._dynamo.reset()
    law = P.Polynomial(torch.tensor([0.0, 1.0, 0.0, -1.0]))

    def step(logits, means, log_scales, target):
        return (physmdn.mixture_nll(logits, means, log_scales, target, reduction="mean")
                + P.mdn_loss(logits, means, log_scales, target, physics=law, reduction="mean"))

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for B in (7, 33, 100, 1000):
            inputs = [t.requires_grad_(i < 3) for i, t in enumerate(make_inputs(B, 3, 2, torch.float32, seed=B))]
            out = compiled(*inputs)
            ref = step(*inputs)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            for a, b in zip(torch.autograd.grad(out, inputs[:3]), torch.autograd.grad(ref, inputs[:3])):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_opcheck_with_grad_scale():
    """compute_grad=True with a grad_scale: schema, fake kernel and AOT tracing. (Without requires_grad: in eager
    the gradient outputs belong to autograd, whose backward scales them in place, so opcheck's comparison of
    retained outputs after a backward does not apply; the public mixture_nll never returns them.)"""
    inputs = make_inputs(6, 3, 2, torch.float32)
    torch.library.opcheck(torch.ops.physmdn.mixture_nll_fwd.default, (*inputs, True, 0.25))
    grads = torch.ops.physmdn.mixture_nll_fwd(*inputs, True, 0.25)[2:]
    unit = torch.ops.physmdn.mixture_nll_fwd(*inputs, True, 1.0)[2:]
    for g, u in zip(grads, unit):
        torch.testing.assert_close(g, 0.25 * u)


@pytest.mark.parametrize("B,K,D", [(8, 8, 4), (9, 8, 4), (4999, 8, 4), (3001, 3, 5), (1500, 16, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_batches_spanning_many_chunks(B, K, D, dtype, cpu_isa):
    """Batches that span several parallel chunks and groups of 8 samples, with a partial last group (the
    lane-parallel AVX2 kernel pads it), against the reference; float64 spans several blocks of the blocked path."""
    tol = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 5e-2), torch.float64: (1e-12, 1e-11)}[dtype]
    check_against_reference(make_inputs(B, K, D, dtype, seed=B + K + D), dtype, *tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("K", [5, 8])  # K = 8 (K D = 32): the AVX2 row-wise path
def test_cpu_row_strided_views_take_the_fast_path(K, dtype, cpu_isa):
    """logits / means / log_scales split from one network output (rows strided, no zero stride) take the fast path
    (the AVX2 kernel reads them in place, the blocked paths on contiguous copies): results bit-identical to the
    contiguous call (the generic loop's arithmetic differs), and equal to the reference within tolerance; gradients
    reach the split parent."""
    B, D = 37, 4
    g = torch.Generator().manual_seed(3)
    head = torch.randn(B, K + 2 * K * D, generator=g, dtype=torch.float64).to(dtype)
    target = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    lg, mu, ls = torch.split(head, [K, K * D, K * D], dim=-1)
    views = (lg, mu.view(B, K, D), ls.view(B, K, D))
    assert not any(v.is_contiguous() for v in views)
    strided = torch.ops.physmdn.mixture_nll_fwd(*views, target, True, 1.0)
    dense = torch.ops.physmdn.mixture_nll_fwd(*(v.contiguous() for v in views), target, True, 1.0)
    for a, b in zip(strided, dense):
        assert torch.equal(a, b)
    tol = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 5e-2), torch.float64: (1e-12, 1e-11)}[dtype]
    check_against_reference([*views, target], dtype, *tol)
    parent = head.detach().clone().requires_grad_(True)
    plg, pmu, pls = torch.split(parent, [K, K * D, K * D], dim=-1)
    physmdn.mixture_nll(plg, pmu.view(B, K, D), pls.view(B, K, D), target).sum().backward()
    expected = torch.cat([t.reshape(B, -1) for t in dense[2:5]], dim=-1).to(dtype)
    torch.testing.assert_close(parent.grad, expected)


@pytest.mark.parametrize("B", [37, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("K", [5, 6])  # K = 6 (K D = 24): the AVX2 row-wise path
def test_cpu_batch_broadcast_inputs(B, K, dtype, cpu_isa):
    """A log-scale parameter and a target broadcast over the batch (stride 0), and logits / means split from one
    head (row-strided): the AVX2 kernel reads them in place, bit-identical to the call on contiguous copies (forward
    with gradients and the backward); every path matches the reference, and the gradients reach the parameters."""
    D = 4
    g = torch.Generator().manual_seed(11)
    head = torch.randn(B, K + K * D + 3, generator=g, dtype=torch.float64).to(dtype)
    lg, mu, _ = torch.split(head, [K, K * D, 3], dim=-1)
    mu = mu.view(B, K, D)
    scale_param = (0.5 * torch.randn(K, D, generator=g, dtype=torch.float64)).to(dtype)
    target_param = torch.randn(1, D, generator=g, dtype=torch.float64).to(dtype)
    views = (lg, mu, scale_param.expand(B, K, D), target_param.expand(B, D))
    assert views[2].stride(0) == 0 and views[3].stride(0) == 0 and not views[0].is_contiguous()
    dense = [v.contiguous() for v in views]
    tol = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 5e-2), torch.float16: (2e-3, 5e-3),
           torch.float64: (1e-12, 1e-11)}[dtype]
    check_against_reference(list(views), dtype, *tol)
    if cpu_isa == "avx2" and dtype != torch.float64:
        fwd = torch.ops.physmdn.mixture_nll_fwd
        for a, b in zip(fwd(*views, True, 0.5), fwd(*dense, True, 0.5)):
            assert torch.equal(a, b)
        loss, saved = fwd(*dense, False, 1.0)[:2]
        upstream = torch.linspace(0.5, 1.5, B, dtype=dtype)
        bwd = torch.ops.physmdn.mixture_nll_bwd
        for a, b in zip(bwd(upstream, *views, saved), bwd(upstream, *dense, saved)):
            assert torch.equal(a, b)
    # gradients reach the broadcast parameters (summed over the batch by autograd)
    params = [t.detach().double().requires_grad_(True) for t in (head, scale_param, target_param)]
    leaves = [t.detach().clone().requires_grad_(True) for t in (head, scale_param, target_param)]

    def loss_of(h, s, y, fn):
        lg_, mu_, _ = torch.split(h, [K, K * D, 3], dim=-1)
        return fn(lg_, mu_.view(B, K, D), s.expand(B, K, D), y.expand(B, D)).sum()

    loss_of(*leaves, physmdn.mixture_nll).backward()
    loss_of(*params, reference.mixture_nll).backward()
    for leaf, ref in zip(leaves, params):
        assert rel_err(leaf.grad, ref.grad) <= tol[1] * (4 if dtype in (torch.bfloat16, torch.float16) else 1)


@pytest.mark.parametrize("B", [37, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("K,D", [(5, 3), (8, 2)])  # (8, 2): the AVX2 row-wise path, its rows gathered
def test_cpu_any_layout(B, K, D, dtype, cpu_isa):
    """Layouts whose rows are not contiguous: isotropic components (one log-scale per component, [B, K, 1] expanded
    over D), means transposed from [B, D, K], logits a column slice, a target from a [D, B] tensor. The AVX2 kernel
    gathers them per group of 8 samples: bit-identical to the call on contiguous copies (forward with gradients,
    backward); every path matches the reference and the gradients reach the compact tensors."""
    g = torch.Generator().manual_seed(13)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    wide_logits, means_t, iso, target_t = rnd(B, 2 * K), rnd(B, D, K), rnd(B, K, 1, scale=0.5), rnd(D, B)

    def views(lg, mu_t, ls, y_t):
        return lg[:, ::2], mu_t.transpose(1, 2), ls.expand(B, K, D), y_t.t()

    v = views(wide_logits, means_t, iso, target_t)
    assert v[2].stride(2) == 0 and not any(t.is_contiguous() for t in v)
    dense = [t.contiguous() for t in v]
    tol = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 5e-2), torch.float64: (1e-12, 1e-11)}[dtype]
    check_against_reference(list(v), dtype, *tol)
    if cpu_isa == "avx2" and dtype != torch.float64:
        fwd, bwd = torch.ops.physmdn.mixture_nll_fwd, torch.ops.physmdn.mixture_nll_bwd
        for a, b in zip(fwd(*v, True, 0.5), fwd(*dense, True, 0.5)):
            assert torch.equal(a, b)
        saved = fwd(*dense, False, 1.0)[1]
        upstream = torch.linspace(0.5, 1.5, B, dtype=dtype)
        for a, b in zip(bwd(upstream, *v, saved), bwd(upstream, *dense, saved)):
            assert torch.equal(a, b)
    leaves = [t.detach().clone().requires_grad_(True) for t in (wide_logits, means_t, iso, target_t)]
    exact = [t.detach().double().requires_grad_(True) for t in (wide_logits, means_t, iso, target_t)]
    physmdn.mixture_nll(*views(*leaves)).sum().backward()
    reference.mixture_nll(*views(*exact)).sum().backward()
    for leaf, ref in zip(leaves, exact):
        assert rel_err(leaf.grad, ref.grad) <= tol[1] * (4 if dtype == torch.bfloat16 else 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_streamed_gradient_stores(dtype, cpu_isa):
    """From a working set (inputs and gradients) of 32 MiB on, the AVX2 kernel writes the [B, K, D] gradients with
    non-temporal stores, whole rows in address order (smaller ones with regular stores, to stay in cache): the large
    batch (streamed) matches the reference, and its rows are bit-identical to those of two halves below the threshold
    (regular stores)."""
    K, D = 8, 4
    per_sample = (2 * K * D + K + D) * 2 * dtype.itemsize  # inputs and gradients, same dtype
    B = (32 << 20) // per_sample + 1  # just above the threshold, a partial last group of 8
    assert B * per_sample >= 32 << 20 and (B // 2 + 8) * per_sample < 32 << 20 and B % 8
    inputs = make_inputs(B, K, D, dtype, seed=7)
    tol = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 5e-2)}[dtype]
    check_against_reference(inputs, dtype, *tol)
    whole = torch.ops.physmdn.mixture_nll_fwd(*inputs, True, 1.0)
    n1 = 8 * (B // 16)  # the halves start on a group of 8 samples
    halves = [torch.ops.physmdn.mixture_nll_fwd(*(t[lo:hi] for t in inputs), True, 1.0)
              for lo, hi in ((0, n1), (n1, B))]
    for i, name in enumerate(("loss", "saved", "logits", "means", "log_scales", "target")):
        assert torch.equal(whole[i], torch.cat([h[i] for h in halves])), name


@pytest.mark.parametrize("reduction,upstream,expect_pass", [
    ("mean", 1.0, False), ("sum", 1.0, False), ("none+sum", 1.0, False), ("mean", 0.5, True), ("none+mean", 1.0, True)])
def test_backward_skips_the_rescaling_pass_when_it_can(reduction, upstream, expect_pass):
    """The performance contract of the reductions: when the upstream gradient is the one the forward assumed, the
    backward runs no op over the [B, K, D] gradients; otherwise it rescales them (values are tested elsewhere)."""
    inputs = [t.requires_grad_(True) for t in make_inputs(100, 4, 3, torch.float32, seed=4)]
    if reduction == "none+sum":
        out = physmdn.mixture_nll(*inputs).sum()
    elif reduction == "none+mean":
        out = physmdn.mixture_nll(*inputs).mean()
    else:
        out = physmdn.mixture_nll(*inputs, reduction=reduction)
    with ops_on_3d() as mode:
        torch.autograd.grad(out * upstream if upstream != 1.0 else out, inputs)
    assert bool(mode.seen) == expect_pass, mode.seen


# ----- the AVX2 row-wise path ---------------------------------------------------------------------------
# For D in {1, 2, 4} with K D a multiple of 8, or D a multiple of 8, the AVX2 float kernel works on each sample's rows
# as they lie in memory (8 / D components per vector, or D / 8 vectors per component) instead of on transposed lanes; physmdn._C.set_cpu_rows_path(False) sends
# those shapes down the lane path too.

ROWS_SHAPES = [(1, 8, 1), (37, 16, 1), (13, 4, 2), (67, 12, 2), (9, 2, 4), (41, 6, 4), (64, 8, 4), (29, 10, 4),
               (5, 1, 8), (27, 3, 8), (40, 8, 8), (11, 9, 16), (17, 3, 24), (8, 8, 32), (3, 2, 64)]


@pytest.fixture
def lanes_path():
    """Inside the with-block the row-wise path is off (the lane path runs every shape)."""
    import contextlib

    @contextlib.contextmanager
    def off():
        prev = physmdn._C.set_cpu_rows_path(False)
        try:
            yield
        finally:
            physmdn._C.set_cpu_rows_path(prev)
    return off


def test_set_cpu_rows_path_returns_the_previous_setting():
    assert physmdn._C.set_cpu_rows_path(False) is True
    try:
        assert physmdn._C.set_cpu_rows_path(False) is False
    finally:
        assert physmdn._C.set_cpu_rows_path(True) is False


def test_cpu_rows_path_switch_changes_the_kernel(cpu_isa, lanes_path):
    """The comparisons below are not vacuous: with AVX2 the two paths sum in different orders, so some float32
    output differs in its last bits; the baseline build has no row-wise path and ignores the switch."""
    inputs = make_inputs(64, 8, 4, torch.float32, seed=1)
    rows = torch.ops.physmdn.mixture_nll_fwd(*inputs, True, 1.0)
    with lanes_path():
        lanes = torch.ops.physmdn.mixture_nll_fwd(*inputs, True, 1.0)
    identical = all(torch.equal(a, b) for a, b in zip(rows, lanes))
    assert identical == (cpu_isa == "default")


@pytest.mark.parametrize("B,K,D", ROWS_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_rows_path_matches_reference_and_lane_path(B, K, D, dtype, cpu_isa, lanes_path):
    """Forward with gradients and the backward op (recompute, a per-sample upstream) on the row-wise path: the
    reference within tolerance, and the lane path within a few float32 roundings (the sums over D and K run in
    another order)."""
    inputs = make_inputs(B, K, D, dtype, seed=B + 10 * K + D)
    tol = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 5e-2), torch.float16: (2e-3, 5e-3)}[dtype]
    check_against_reference(inputs, dtype, *tol)
    fwd, bwd = torch.ops.physmdn.mixture_nll_fwd, torch.ops.physmdn.mixture_nll_bwd
    upstream = torch.linspace(0.5, 1.5, B).to(dtype)

    def run():
        out = fwd(*inputs, True, 0.75)
        return [*out, *bwd(upstream, *inputs, out[1])]
    rows = run()
    with lanes_path():
        lanes = run()
    # (float32 roundings of the sums over D grow with D: the terms are summed in another order)
    close = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype] * max(1, D // 16)
    for a, b in zip(rows, lanes):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert rel_err(a, b) <= close, rel_err(a, b)


@pytest.mark.parametrize("D", [1, 2, 4, 8, 24])
def test_cpu_rows_path_masks_components_without_responsibility(D, cpu_isa, lanes_path):
    """A target far from some components (responsibility exactly 0 in float32) in some samples of a group: those
    components get zero gradients (no 0 * inf), the others match the lane path and the reference."""
    B, K = 19, 8
    logits, means, log_scales, target = make_inputs(B, K, D, torch.float32, seed=5)
    means[::3, :3] += 1e4  # components 0-2 of every third sample: far away
    log_scales[::3, :3] = -2.0
    inputs = [logits, means, log_scales, target]
    out = torch.ops.physmdn.mixture_nll_fwd(*inputs, True, 1.0)
    assert all(torch.isfinite(t).all() for t in out)
    assert (out[3][::3, :3] == 0).all() and (out[4][::3, :3] == 0).all()
    with lanes_path():
        lanes = torch.ops.physmdn.mixture_nll_fwd(*inputs, True, 1.0)
    for a, b in zip(out, lanes):
        assert rel_err(a, b) <= 2e-6
    check_against_reference(inputs, torch.float32, 1e-5, 1e-4)

"""The eager fast path of the ops (``physmdn._ops.call_op``): one ``autograd.Function`` per op and reduction
(``_ops._eager_function``) that calls the kernel below autograd and reduces inside, instead of the autograd formula
registered with torch.library through the dispatcher. It must build the same graph and give bit-identical losses
and gradients; tracing (torch.compile, tested with the ops) and functorch transforms keep the registered path."""

import pytest
import torch

import physmdn
from physmdn import _ops
from physmdn import physics as P
from conftest import DEVICES


def _inputs(B=37, K=3, D=5, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(B, K, generator=g, dtype=dtype), torch.randn(B, K, D, generator=g, dtype=dtype),
         0.3 * torch.randn(B, K, D, generator=g, dtype=dtype) - 0.5, torch.randn(B, D, generator=g, dtype=dtype)]
    return [x.to(device) for x in t]


def _run(fn, inputs, n_diff, params=()):
    """The loss and the gradients with respect to the first ``n_diff`` inputs and ``params`` (which ``fn`` uses)."""
    leaves = [t.detach().clone().requires_grad_(i < n_diff) for i, t in enumerate(inputs)]
    loss = fn(*leaves)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device)
    grads = torch.autograd.grad((loss * weights).sum() if loss.dim() else loss, [*leaves[:n_diff], *params])
    return loss, grads


def _op_node(loss) -> str:
    """Name of the op's autograd node under ``loss`` (below a reduction's Mean / Sum node)."""
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        name = node.name()
        if "_fwd" in name or "physmdn::" in name:
            return name
        stack.extend(n for n, _ in node.next_functions if n is not None)
    raise AssertionError("no op node in the graph")


def _registered_path(m):
    """What tracing / functorch get: the autograd registered in Python, through the dispatcher."""
    m.setattr(_ops, "_plain", lambda tensors: False)
    m.setattr(_ops, "fast_mixture_inputs", lambda *tensors: False)


def _same_on_both_paths(monkeypatch, grads):
    """``grads()`` (a list of tensors) on the fast path and on the registered one: bit for bit the same."""
    fast = grads()
    with monkeypatch.context() as m:
        _registered_path(m)
        slow = grads()
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _both_paths(monkeypatch, fn, inputs, n_diff, params=()):
    fast_loss, fast_grads = _run(fn, inputs, n_diff, params)
    with monkeypatch.context() as m:
        _registered_path(m)
        slow_loss, slow_grads = _run(fn, inputs, n_diff, params)
    fast, slow = _op_node(fast_loss), _op_node(slow_loss)
    assert fast.startswith(("physmdn_mixture_nll_fwd_", "physmdn_mdn_loss_fwd_")), fast
    assert fast != slow and "_fwd" in slow, slow
    torch.testing.assert_close(fast_loss, slow_loss, rtol=0, atol=0)
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_mixture_nll_fast_path_matches_registered_autograd(monkeypatch, reduction, dtype, device, cpu_isa):
    fn = lambda *t: physmdn.mixture_nll(*t, reduction=reduction)  # noqa: E731
    _both_paths(monkeypatch, fn, _inputs(dtype=dtype, device=device), n_diff=4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("coeff_grad", [False, True])  # True: no forward gradients, the backward kernel runs
def test_fused_loss_fast_path_matches_registered_autograd(monkeypatch, coeff_grad, device, cpu_isa):
    inputs = _inputs(device=device)
    B, K, D = inputs[1].shape
    g = torch.Generator().manual_seed(3)
    coeffs = (0.4 * torch.randn(B, K, 1, 4, generator=g, dtype=torch.float64)).to(device).requires_grad_(coeff_grad)
    second = (0.2 * torch.randn(1, K, D, 2, generator=g, dtype=torch.float64)).to(device)  # not fused: `extra`

    def fn(*t):
        return P.mdn_loss(*t, physics=[P.Polynomial(coeffs), (P.Polynomial(second), 0.5)], weight=0.7,
                          reduction="none")

    # (the coefficients' gradient is asked for as well: the eager Function, like torch's own, computes a parameter gradient
    # only when this backward needs it, and the kernel's other gradients then differ in the last bits)
    _both_paths(monkeypatch, fn, inputs, n_diff=3, params=(coeffs,) if coeff_grad else ())
    if coeff_grad:  # the coefficient gradient flows on the fast path too
        leaves = [t.detach().requires_grad_(True) for t in inputs[:3]] + [inputs[3]]
        (gc,) = torch.autograd.grad(fn(*leaves).sum(), coeffs)
        assert torch.isfinite(gc).all() and gc.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("param_grad", [(False, False), (True, False), (False, True), (True, True)])
def test_fused_linear_without_extra_matches_registered_autograd(monkeypatch, param_grad, device, cpu_isa):
    """Both family parameters (A -> p0, b -> p1), each with or without a gradient, and no ``extra`` (an absent
    optional input: the eager Function's input positions must still line up)."""
    inputs = _inputs(device=device)
    B, K, D = inputs[1].shape
    g = torch.Generator().manual_seed(5)
    A = (0.5 * torch.randn(1, K, 2, D, generator=g, dtype=torch.float64)).to(device).requires_grad_(param_grad[0])
    b = (0.3 * torch.randn(B, 1, 2, generator=g, dtype=torch.float64)).to(device).requires_grad_(param_grad[1])

    def fn(*t):
        return P.mdn_loss(*t, physics=P.Linear(A, b), weight=0.6, reduction="mean")

    params = tuple(p for p in (A, b) if p.requires_grad)
    _both_paths(monkeypatch, fn, inputs, n_diff=4, params=params)


def test_backward_twice_without_retain_graph_raises():
    inputs = [t.requires_grad_(True) for t in _inputs()]
    loss = physmdn.mixture_nll(*inputs, reduction="sum")
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_accumulated_grads_match_registered_autograd(monkeypatch, reduction):
    """``.backward()`` into ``.grad`` (AccumulateGrad takes the handed-over gradients), twice: the second step adds."""
    def grads():
        leaves = [t.detach().clone().requires_grad_(True) for t in _inputs(dtype=torch.float32)]
        for _ in range(2):
            loss = physmdn.mixture_nll(*leaves, reduction=reduction)
            (loss if loss.dim() == 0 else loss[: loss.numel() // 2].sum()).backward()
        return [t.grad for t in leaves]

    _same_on_both_paths(monkeypatch, grads)


def test_no_grad_call_skips_autograd():
    inputs = [t.requires_grad_(True) for t in _inputs()]
    with torch.no_grad():
        loss = physmdn.mixture_nll(*inputs)
    assert loss.grad_fn is None and not loss.requires_grad
    torch.testing.assert_close(loss, physmdn.mixture_nll(*[t.detach() for t in inputs]), rtol=0, atol=0)


def test_second_order_gradients_raise_clearly():
    inputs = [t.requires_grad_(True) for t in _inputs()]
    with pytest.raises(RuntimeError, match="mixture_nll: only first-order gradients.*create_graph=True"):
        torch.autograd.grad(physmdn.mixture_nll(*inputs).sum(), inputs[1], create_graph=True)
    coeffs = torch.randn(1, 3, 5, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="mdn_loss: only first-order gradients.*create_graph=True"):
        torch.autograd.grad(P.mdn_loss(*inputs, physics=P.Polynomial(coeffs)).sum(), inputs[1], create_graph=True)


def test_retain_graph_then_second_backward():
    inputs = [t.requires_grad_(True) for t in _inputs()]
    loss = physmdn.mixture_nll(*inputs, reduction="mean")
    first = torch.autograd.grad(loss, inputs[:3], retain_graph=True)
    second = torch.autograd.grad(loss, inputs[:3])  # recomputed by the backward kernel
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_fast_input_check_declines_what_the_full_checks_reject():
    """``fast_mixture_inputs`` lets mixture_nll skip its detailed checks: it must decline every input the full
    checks would reject or transform (those then get the full path and its error), and accept the plain cases."""
    logits, means, log_scales, target = _inputs(B=6, K=3, D=2, dtype=torch.float32)
    ok = (logits, means, log_scales, target)
    assert _ops.fast_mixture_inputs(*ok)
    assert _ops.fast_mixture_inputs(torch.nn.Parameter(logits), means, log_scales[:, :, :1].expand(6, 3, 2), target)
    assert _ops.fast_mixture_inputs(*(t[:0] for t in ok))  # B = 0
    bad = [
        (logits[:, :2], means, log_scales, target),  # K mismatch
        (logits, means, log_scales[:, :, :1], target),  # log_scales shape
        (logits, means, log_scales, target[:, :1]),  # D mismatch
        (logits, means[:5], log_scales, target),  # B mismatch
        (logits[:5], means[:5], log_scales[:5], target),  # target's B
        (logits, means.reshape(6, 6), log_scales, target),  # means not 3-D
        (logits[:, :0], means[:, :0], log_scales[:, :0], target),  # K = 0
        (logits, means[:, :, :0], log_scales[:, :, :0], target[:, :0]),  # D = 0
        (logits.double(), means, log_scales, target),  # dtype mismatch
        (logits, means, log_scales, target.double()),
        (logits.int(), means.int(), log_scales.int(), target.int()),  # not floating
        (logits, means, log_scales, target.numpy()),  # not a tensor
        (logits, means, log_scales, None),
    ]
    for i, args in enumerate(bad):
        assert not _ops.fast_mixture_inputs(*args), i
        if args[3] is not None and not isinstance(args[3], torch.Tensor):
            continue
        with pytest.raises((TypeError, ValueError)):  # the full path's detailed error
            physmdn.mixture_nll(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _ops.fast_mixture_inputs(*ok)
    if torch.cuda.is_available():
        assert not _ops.fast_mixture_inputs(logits.cuda(), means, log_scales, target)
    with torch.no_grad():
        assert _ops.fast_mixture_inputs(*ok)


def test_parameter_inputs_take_the_eager_function():
    logits, means, log_scales, target = _inputs()
    params = [torch.nn.Parameter(t) for t in (logits, means, log_scales)]
    loss = physmdn.mixture_nll(*params, target, reduction="mean")
    assert loss.grad_fn.name() == "physmdn_mixture_nll_fwd_meanBackward"
    loss.backward()
    ref = [t.detach().requires_grad_(True) for t in (logits, means, log_scales)]
    physmdn.reference.mixture_nll(*ref, target).mean().backward()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-10, atol=1e-12)


def test_eager_function_calls_the_kernels_below_autograd(monkeypatch):
    """The eager Functions call mixture_nll_fwd / mdn_loss_fwd (and the _bwd ops) below autograd: not through the
    Python autograd kernel registered for them (which redispatches, ~40 us a call)."""
    import torch._ops

    redispatched = []
    original = torch._ops.OpOverload.redispatch

    def spy(self, *args, **kwargs):
        redispatched.append(str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch._ops.OpOverload, "redispatch", spy)
    inputs = [t.requires_grad_(True) for t in _inputs()]
    loss = physmdn.mixture_nll(*inputs, reduction="mean")
    torch.autograd.grad(loss, inputs, retain_graph=True)
    torch.autograd.grad(loss, inputs)  # the second backward: mixture_nll_bwd
    coeffs = torch.randn(1, 3, 5, 3, dtype=torch.float64, requires_grad=True)  # no forward gradients: mdn_loss_bwd
    torch.autograd.grad(P.mdn_loss(*inputs, physics=P.Polynomial(coeffs)), [*inputs, coeffs])
    assert redispatched == []
    with monkeypatch.context() as m:  # the check can fail: the registered path does redispatch
        _registered_path(m)
        physmdn.mixture_nll(*inputs)
    assert redispatched == ["physmdn.mixture_nll_fwd.default"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 37, 1000, 65537])
def test_mean_inside_the_node_is_torchs_mean(B, dtype):
    """The eager Function reduces ``mean`` itself: bit for bit torch's ``mean`` of the per-sample losses, and its
    gradients those of the per-sample losses scaled by 1 / B."""
    inputs = [t.to(dtype).requires_grad_(i < 3) for i, t in enumerate(_inputs(B=B, K=2, D=3, seed=B))]
    loss = physmdn.mixture_nll(*inputs, reduction="mean")
    assert loss.grad_fn.name() == "physmdn_mixture_nll_fwd_meanBackward"
    per_sample = physmdn.mixture_nll(*inputs)
    torch.testing.assert_close(loss, per_sample.mean(), rtol=0, atol=0)
    total = physmdn.mixture_nll(*inputs, reduction="sum")
    torch.testing.assert_close(total, per_sample.sum(), rtol=0, atol=0)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for got, want in zip(torch.autograd.grad(loss, inputs[:3]), torch.autograd.grad(per_sample.sum() / B, inputs[:3])):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol / B)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_non_unit_upstream_of_a_reduction_matches_registered_autograd(monkeypatch, reduction, device, cpu_isa):
    """A scalar upstream gradient other than 1 (a loss weight): the node rescales the forward's gradients in place,
    bit for bit as the registered path does after torch's Mean / Sum backward."""
    def grads():
        leaves = [t.detach().clone().requires_grad_(True) for t in _inputs(dtype=torch.float32, device=device)]
        loss = physmdn.mixture_nll(*leaves, reduction=reduction)
        return torch.autograd.grad(loss, leaves, torch.tensor(2.5, device=device))

    _same_on_both_paths(monkeypatch, grads)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_and_anomaly_mode(use_reentrant):
    """The eager Function inside ``torch.utils.checkpoint`` (its forward recomputed in the backward) and under anomaly
    detection: the same gradients as a plain forward + backward."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2 + 2 * 2 * 3)
    x, y = torch.randn(17, 3, requires_grad=True), torch.randn(17, 3)

    def f(x):
        out = net(x)
        return physmdn.mixture_nll(out[:, :2], out[:, 2:8].reshape(17, 2, 3), out[:, 8:].reshape(17, 2, 3), y,
                                   reduction="mean")

    def grads(run):
        net.zero_grad()
        run().backward()
        return [p.grad.clone() for p in net.parameters()]

    plain = grads(lambda: f(x))
    for a, b in zip(grads(lambda: checkpoint(f, x, use_reentrant=use_reentrant)), plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.autograd.set_detect_anomaly(True):
        for a, b in zip(grads(lambda: f(x)), plain):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("op", ["mixture_nll", "mdn_loss"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_retained_graph_backwards_are_bit_identical(op, dtype, reduction):
    """A retained graph's backwards with a non-unit upstream gradient give the same bits every time (the forward's
    gradients are scaled into new buffers, not in place), and so does gradcheck's reentrancy check."""
    g = torch.Generator().manual_seed(5)
    B, K, D = 33, 4, 3
    inputs = [torch.randn(B, K, generator=g, dtype=dtype), torch.randn(B, K, D, generator=g, dtype=dtype),
              0.3 * torch.randn(B, K, D, generator=g, dtype=dtype), torch.randn(B, D, generator=g, dtype=dtype)]
    inputs = [t.requires_grad_(True) for t in inputs]
    if op == "mixture_nll":
        out = physmdn.mixture_nll(*inputs, reduction=reduction)
    else:
        spec = P.Polynomial(torch.tensor([0.1, 1.0, 0.0, -1.0], dtype=dtype), moment="first")
        out = P.mdn_loss(*inputs, physics=spec, weight=0.7, reduction=reduction, coupling="coupled")
    upstream = torch.linspace(0.3, 1.7, B, dtype=dtype) if reduction == "none" else torch.tensor(0.37, dtype=dtype)
    runs = [torch.autograd.grad(out, inputs, upstream, retain_graph=True) for _ in range(3)]
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert torch.equal(a, b)
    if dtype == torch.float64:
        fn = (lambda *t: physmdn.mixture_nll(*t, reduction=reduction)) if op == "mixture_nll" else (
            lambda *t: P.mdn_loss(*t, physics=spec, weight=0.7, reduction=reduction, coupling="coupled"))
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)

"""torch.func transforms over the ops (physmdn/_func.py): vmap folds the mapped dimension into the batch (one kernel
call, no per-example fallback), grad / vjp / jacrev go through autograd.Functions with setup_context (torch's
register_autograd Function lacks it and functorch refuses it). Every result is compared with the same computation
without the transform: per-example loops, torch.autograd.grad, or the plain-torch reference's Jacobian."""

import warnings

import pytest
import torch
from torch.func import functional_call, grad, jacrev, stack_module_state, vjp, vmap

import physmdn
from physmdn import physics as P
from physmdn import reference
from conftest import DEVICES


def _inputs(N, B=6, K=3, D=2, dtype=torch.float64, seed=0, device="cpu"):
    """Mixture inputs with a leading example dimension N (None: without it)."""
    g = torch.Generator().manual_seed(seed)
    lead = () if N is None else (N,)
    t = [torch.randn(*lead, B, K, generator=g, dtype=dtype), torch.randn(*lead, B, K, D, generator=g, dtype=dtype),
         0.3 * torch.randn(*lead, B, K, D, generator=g, dtype=dtype) - 0.5,
         torch.randn(*lead, B, D, generator=g, dtype=dtype)]
    return [x.to(device) for x in t]


def _no_fallback(fn):
    """``fn()`` with a check that no op ran through functorch's per-example fallback (no batching rule)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    fallback = [str(w.message) for w in caught if "batching rule" in str(w.message)]
    assert not fallback, fallback
    return out


def _close(a, b, dtype=torch.float64):
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_vmap_mixture_nll_is_the_per_example_loop(device, dtype, reduction):
    x = _inputs(4, dtype=dtype, device=device)
    f = lambda *a: physmdn.mixture_nll(*a, reduction=reduction)  # noqa: E731
    out = _no_fallback(lambda: vmap(f)(*x))
    loop = torch.stack([f(*(t[n] for t in x)) for n in range(4)])
    assert out.shape == loop.shape
    _close(out, loop, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_mixed_in_dims(device):
    """Mapped at other dimensions, and one input shared by all examples (expanded, not copied by the caller)."""
    logits, means, log_scales, target = _inputs(5, device=device)
    shared = target[0]
    f = vmap(physmdn.mixture_nll, in_dims=(1, 0, 3, None))
    out = _no_fallback(lambda: f(logits.movedim(0, 1), means, log_scales.movedim(0, 3), shared))
    loop = torch.stack([physmdn.mixture_nll(logits[n], means[n], log_scales[n], shared) for n in range(5)])
    _close(out, loop)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_grad_matches_autograd(device, reduction):
    x = _inputs(None, B=9, device=device)
    weights = torch.linspace(0.5, 1.5, 9, dtype=torch.float64, device=device)

    def f(*a):
        loss = physmdn.mixture_nll(*a, reduction=reduction)
        return (loss * weights).sum() if reduction == "none" else loss

    got = _no_fallback(lambda: grad(f, argnums=(0, 1, 2, 3))(*x))
    leaves = [t.clone().requires_grad_() for t in x]
    want = torch.autograd.grad(f(*leaves), leaves)
    for a, b in zip(got, want, strict=True):
        _close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_per_example_gradients_vmap_of_grad(device):
    """vmap(grad(...)): per-example gradients (e.g. for per-sample clipping) in one call."""
    x = _inputs(4, device=device)
    f = lambda *a: physmdn.mixture_nll(*a, reduction="mean")  # noqa: E731
    got = _no_fallback(lambda: vmap(grad(f, argnums=(0, 1, 2)))(*x))
    for n in range(4):
        leaves = [t[n].clone().requires_grad_() for t in x]
        want = torch.autograd.grad(f(*leaves), leaves[:3])
        for a, b in zip(got, want, strict=True):
            _close(a[n], b)


def test_jacrev_and_vjp_match_the_reference():
    logits, means, log_scales, target = _inputs(None, B=5)
    got = _no_fallback(lambda: jacrev(physmdn.mixture_nll, argnums=(1, 2))(logits, means, log_scales, target))
    want = torch.autograd.functional.jacobian(lambda m, s: reference.mixture_nll(logits, m, s, target),
                                              (means, log_scales))
    for a, b in zip(got, want, strict=True):
        assert a.shape == (5, 5, 3, 2)
        _close(a, b)
    loss, pullback = vjp(lambda lg: physmdn.mixture_nll(lg, means, log_scales, target), logits)
    cot = torch.linspace(-1.0, 2.0, 5, dtype=torch.float64)
    (g,) = pullback(cot)
    lg = logits.clone().requires_grad_()
    (want_g,) = torch.autograd.grad(reference.mixture_nll(lg, means, log_scales, target), lg, cot)
    _close(loss, reference.mixture_nll(logits, means, log_scales, target))
    _close(g, want_g)


def test_empty_batch_under_vmap_and_grad():
    x = _inputs(3, B=0)
    out = vmap(physmdn.mixture_nll)(*x)
    assert out.shape == (3, 0)
    g = grad(lambda *a: physmdn.mixture_nll(*a, reduction="sum"), argnums=1)(*(t[0] for t in x))
    assert g.shape == (0, 3, 2)


def _specs(B, K, D, dtype):
    g = torch.Generator().manual_seed(3)

    def rnd(*shape, positive=False):
        t = torch.randn(*shape, generator=g, dtype=dtype)
        return t.abs() + 0.2 if positive else t

    return {
        "polynomial": P.Polynomial(rnd(B, K, 1, 4) * 0.5),
        "linear": P.Linear(rnd(1, K, 2, D), rnd(B, 1, 2)),
        "stencil": P.Stencil1D(rnd(B, 1, positive=True), rnd(1, K, 4) * 0.5, spacing=0.7),
        "extra": [(P.Polynomial(rnd(1, 1, 1, 3)), 1.0), (P.Bounds(lower=-0.5, upper=0.7, mode="exact"), 2.0)],
    }


@pytest.mark.parametrize("family", ["polynomial", "linear", "stencil", "extra"])
def test_vmap_and_grad_of_the_fused_loss(family):
    """The fused physics loss (each kernel family, and a non-fusable spec through ``extra``) under vmap and grad,
    against the per-example loop and torch.autograd.grad; the spec's tensors are shared by the examples."""
    N, B, K, D = 3, 5, 3, 4
    x = _inputs(N, B=B, K=K, D=D)
    spec = _specs(B, K, D, torch.float64)[family]
    f = lambda *a: P.mdn_loss(*a, physics=spec, weight=0.7, reduction="mean")  # noqa: E731
    out = _no_fallback(lambda: vmap(f)(*x))
    _close(out, torch.stack([f(*(t[n] for t in x)) for n in range(N)]))
    got = _no_fallback(lambda: vmap(grad(f, argnums=(0, 1, 2)))(*x))
    for n in range(N):
        leaves = [t[n].clone().requires_grad_() for t in x]
        want = torch.autograd.grad(f(*leaves), leaves[:3])
        for a, b in zip(got, want, strict=True):
            _close(a[n], b)


_LAWS = {  # a family's learnable parameters per example (leading N) and the spec made from them
    "polynomial": (lambda N, K, D, g: [torch.tensor([0.1, 1.0, 0.0, -1.0], dtype=torch.float64)
                                       + 0.1 * torch.randn(N, 1, 1, 1, 4, dtype=torch.float64, generator=g)],
                   lambda c: P.Polynomial(c)),
    "linear": (lambda N, K, D, g: [torch.randn(N, 1, K, 2, D, dtype=torch.float64, generator=g),
                                   torch.randn(N, 1, K, 2, dtype=torch.float64, generator=g)],
               lambda A, b: P.Linear(A, b)),
    "stencil": (lambda N, K, D, g: [torch.rand(N, 1, 1, dtype=torch.float64, generator=g) + 0.2,
                                    0.5 * torch.randn(N, 1, K, 4, dtype=torch.float64, generator=g)],
                lambda diffusion, reaction: P.Stencil1D(diffusion, reaction, spacing=0.7)),
}


@pytest.mark.parametrize("family", sorted(_LAWS))
def test_grad_with_respect_to_the_law(family):
    """An inverse problem under torch.func: the gradient of the fused loss with respect to a law's learnable
    parameters (the kernel's parameter gradients, reduced by _Expand), per example under vmap."""
    N, B, K, D = 3, 7, 2, 4
    x = _inputs(N, B=B, K=K, D=D)
    make, spec = _LAWS[family]
    params = make(N, K, D, torch.Generator().manual_seed(1))
    n = len(params)

    def f(*a):
        return P.mdn_loss(*a[n:], physics=spec(*a[:n]), weight=0.5, reduction="sum")

    got = _no_fallback(lambda: vmap(grad(f, argnums=tuple(range(n))))(*params, *x))
    for i in range(N):
        leaves = [p[i].clone().requires_grad_() for p in params]
        want = torch.autograd.grad(f(*leaves, *(t[i] for t in x)), leaves)
        for a, b in zip(got, want, strict=True):
            assert a[i].shape == b.shape
            _close(a[i], b)


def test_vmap_over_laws_only():
    """Several candidate laws on the same data: only the coefficients are mapped (the mixture inputs are expanded
    into the folded batch). Losses and coefficient gradients as per law, without the transform."""
    B, K, D = 6, 3, 2
    logits, means, log_scales, target = _inputs(None, B=B, K=K, D=D)
    coeffs = torch.randn(4, 1, 1, 1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def f(c):
        return P.mdn_loss(logits, means, log_scales, target, physics=P.Polynomial(c), weight=0.5)

    _close(_no_fallback(lambda: vmap(f)(coeffs)), torch.stack([f(c) for c in coeffs]))
    got = _no_fallback(lambda: vmap(grad(f))(coeffs))
    for n in range(4):
        c = coeffs[n].clone().requires_grad_()
        _close(got[n], torch.autograd.grad(f(c), c)[0])


def test_ensemble_of_mdns_under_vmap():
    """Stacked parameters of several MDNs, one vmapped call: losses and parameter gradients equal each model's."""
    torch.manual_seed(0)
    models = [physmdn.MDN(2, 1, 3, hidden=(8,)) for _ in range(3)]
    params, buffers = stack_module_state(models)
    x, y = torch.randn(10, 2), torch.randn(10, 1)
    base = physmdn.MDN(2, 1, 3, hidden=(8,)).to("meta")

    def loss(p, b):
        mix = functional_call(base, (p, b), (x,))
        law = P.Polynomial(torch.tensor([0.0, 1.0, 0.0, -1.0]))
        return P.mdn_loss(mix.logits, mix.means, mix.log_scales, y, physics=law, weight=0.3)

    losses = _no_fallback(lambda: vmap(loss)(params, buffers))
    grads = _no_fallback(lambda: vmap(grad(loss))(params, buffers))
    for i, m in enumerate(models):
        mix = m(x)
        want = P.mdn_loss(mix.logits, mix.means, mix.log_scales, y,
                          physics=P.Polynomial(torch.tensor([0.0, 1.0, 0.0, -1.0])), weight=0.3)
        torch.testing.assert_close(losses[i], want, rtol=1e-5, atol=1e-6)
        want_g = torch.autograd.grad(want, list(m.parameters()))
        for (name, _), wg in zip(m.named_parameters(), want_g, strict=True):
            torch.testing.assert_close(grads[name][i], wg, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("how", ["jvp", "jacfwd", "forward_ad", "fused"])
def test_forward_mode_is_refused_not_wrong(how):
    """No forward-mode formula: a dual input raises a clear error instead of losing its tangent (the kernels run
    below autograd: the tangent came back None from forward_ad and zeros from torch.func.jvp)."""
    logits, means, log_scales, target = _inputs(None)
    f = lambda m: physmdn.mixture_nll(logits, m, log_scales, target)  # noqa: E731
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        if how == "jvp":
            torch.func.jvp(f, (means,), (torch.ones_like(means),))
        elif how == "jacfwd":
            torch.func.jacfwd(f)(means)
        elif how == "fused":
            law = P.Polynomial(torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=torch.float64))
            torch.func.jvp(lambda m: P.mdn_loss(logits, m, log_scales, target, physics=law), (means,),
                           (torch.ones_like(means),))
        else:
            import torch.autograd.forward_ad as fwAD

            with fwAD.dual_level():
                f(fwAD.make_dual(means, torch.ones_like(means)))
    # a dual level open around inputs without tangents is fine
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        torch.testing.assert_close(f(means), reference.mixture_nll(logits, means, log_scales, target))


@pytest.mark.parametrize("op", ["mixture_nll", "mdn_loss"])
@pytest.mark.parametrize("how", ["grad(grad)", "jacrev(jacrev)", "create_graph, registered path"])
def test_second_order_is_refused_not_zero(op, how, monkeypatch):
    """The ops' backward has no derivative: differentiating it raises (functorch runs every backward with
    create_graph, so a nested reverse level used to get silent zeros)."""
    from physmdn import _ops

    logits, means, log_scales, target = _inputs(None)
    law = P.Polynomial(torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=torch.float64))
    if op == "mixture_nll":
        f = lambda m: physmdn.mixture_nll(logits, m, log_scales, target, reduction="sum")  # noqa: E731
    else:
        f = lambda m: P.mdn_loss(logits, m, log_scales, target, physics=law, reduction="sum")  # noqa: E731
    m = means.clone().requires_grad_()
    _close(grad(f)(means), torch.autograd.grad(f(m), m)[0])  # (first order works)
    with pytest.raises(NotImplementedError, match="only first-order gradients"):
        if how == "grad(grad)":
            grad(lambda m: grad(f)(m).sum())(means)
        elif how == "jacrev(jacrev)":
            jacrev(jacrev(f))(means)
        else:  # the autograd registered in Python (tracing, tensor subclasses) in eager mode
            monkeypatch.setattr(_ops, "_plain", lambda tensors: False)
            monkeypatch.setattr(_ops, "fast_mixture_inputs", lambda *tensors: False)
            m = means.clone().requires_grad_()
            torch.autograd.grad(f(m), m, create_graph=True)


@pytest.mark.parametrize("path", ["eager node", "registered"])
@pytest.mark.parametrize("kind", ["mixture_nll", "mdn_loss"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_batched_upstream_gradients(path, kind, reduction, monkeypatch):
    """torch.autograd.grad(..., is_grads_batched=True) (a legacy-vmapped backward, which
    torch.autograd.functional.jacobian(vectorize=True) uses): the backward cannot read or rescale by a batched
    upstream gradient and recomputes through the op. It raised on aten::item before."""
    from physmdn import _ops

    if path == "registered":
        monkeypatch.setattr(_ops, "_plain", lambda tensors: False)
        monkeypatch.setattr(_ops, "fast_mixture_inputs", lambda *tensors: False)
    logits, means, log_scales, target = _inputs(None)
    law = P.Polynomial(torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=torch.float64))

    def f(m, ours=True):
        if kind == "mixture_nll":
            loss = (physmdn.mixture_nll(logits, m, log_scales, target, reduction=reduction) if ours
                    else reference.mixture_nll(logits, m, log_scales, target))
        else:
            loss = (P.mdn_loss(logits, m, log_scales, target, physics=law, weight=0.5, reduction=reduction) if ours
                    else reference.mixture_nll(logits, m, log_scales, target)
                    + 0.5 * P.physics_penalty(logits, m, log_scales, law))
        if ours:
            return loss
        return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss

    m = means.clone().requires_grad_()
    out = f(m)
    cot = torch.randn(3, *out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (got,) = torch.autograd.grad(out, m, grad_outputs=cot, is_grads_batched=True)
    (want,) = torch.autograd.grad(f(m, ours=False), m, grad_outputs=cot, is_grads_batched=True)
    assert got.shape == (3, *means.shape)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if reduction == "none":
        jac = torch.autograd.functional.jacobian(f, means, vectorize=True)
        torch.testing.assert_close(jac, torch.autograd.functional.jacobian(lambda x: f(x, ours=False), means),
                                   rtol=1e-10, atol=1e-10)


def test_compiled_transforms_fullgraph():
    """torch.compile(fullgraph=True) of vmap (the batching rules, the registered autograd) gives eager's values and
    gradients; of grad over the op it raises (a PyTorch limitation, see _func.py) instead of returning zeros."""
    torch._dynamo.reset()
    x = _inputs(2, B=6, dtype=torch.float32)
    leaves = [t.clone().requires_grad_(i < 3) for i, t in enumerate(x)]
    f = lambda *a: physmdn.mixture_nll(*a, reduction="mean")  # noqa: E731
    batched = torch.compile(vmap(f), fullgraph=True)(*leaves)
    want = vmap(f)(*leaves)
    _close(batched, want, torch.float32)
    for a, b in zip(torch.autograd.grad(batched.sum(), leaves[:3]), torch.autograd.grad(want.sum(), leaves[:3])):
        _close(a, b, torch.float32)
    with pytest.raises(Exception, match="setup_context"):
        torch.compile(grad(f, argnums=1), fullgraph=True)(*(t[0] for t in x))

"""``torch.ops.physmdn._scale_by_(tensors, upstream, scale)``: the eager backward's in-place rescaling of the
forward's gradients (made for an upstream gradient of ``scale`` per sample) to those of one ``upstream`` value.
Reference: ``t * (upstream.to(t.dtype) / scale)`` in torch, bit for bit; ``t`` untouched when ``upstream`` equals
``scale``. On CUDA that comparison runs inside the kernel (no synchronization, no pass over ``t`` for the unit
gradient of ``loss.sum()`` / the op's mean), and the eager backward of the ops on CUDA goes through it."""

import pytest
import torch

import physmdn
from conftest import CUDA, DEVICES

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _tensors(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 3, 5), (7, 3), (0, 4), (7, 5), (11,)]
    return [torch.randn(s, generator=g, dtype=dt).to(device) for s, dt in zip(shapes, [*DTYPES, torch.float32])]


def _reference(tensors, upstream, scale):
    out = []
    for t in tensors:
        f = upstream.reshape(()).to(t.dtype)
        out.append(t * (f / scale if scale != 1.0 else f))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value, scale", [(2.5, 1.0), (0.125, 1 / 3), (-3.0, 0.5), (0.0, 1.0), (1e30, 1e-20)])
@pytest.mark.parametrize("udtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matches_torch_bit_for_bit(device, value, scale, udtype):
    tensors = _tensors(device)
    upstream = torch.tensor(value, dtype=udtype, device=device)
    want = _reference(tensors, upstream, scale)
    torch.ops.physmdn._scale_by_(tensors, upstream, scale)
    for got, w in zip(tensors, want, strict=True):
        torch.testing.assert_close(got, w, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale, udtype", [(1.0, torch.float32), (0.25, torch.float64), (1 / 3, torch.float32),
                                           (1 / 3, torch.bfloat16), (1 / 7, torch.float16)])
def test_upstream_equal_to_the_scale_leaves_the_tensors(device, scale, udtype):
    """The unit gradient of the reduction the forward's gradients were made for: nothing is multiplied (for a
    bfloat16 / float16 loss, its own rounding of the scale counts as the scale). Checked with values that a
    multiplication by the rounded factor would change."""
    tensors = _tensors(device)
    before = [t.clone() for t in tensors]
    scale32 = float(torch.tensor(scale, dtype=torch.float32))  # as the ops pass it (rounded to the kernel's dtype)
    upstream = torch.tensor(scale32, dtype=udtype, device=device)
    if udtype in (torch.bfloat16, torch.float16):
        assert float(upstream) != scale32  # the rounded case
        changed = _reference(before, upstream, scale32)
        assert any(not torch.equal(a, b) for a, b in zip(changed, before))
    torch.ops.physmdn._scale_by_(tensors, upstream, scale32)
    for got, b in zip(tensors, before, strict=True):
        assert torch.equal(got, b)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_upstream(device):
    for value in (float("nan"), float("inf")):
        tensors = _tensors(device)
        want = _reference(tensors, torch.tensor(value), 1.0)
        torch.ops.physmdn._scale_by_(tensors, torch.tensor(value, device=device), 1.0)
        for got, w in zip(tensors, want):
            torch.testing.assert_close(got, w.to(device), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_many_tensors_non_dense_and_one_element_shapes(device):
    """More tensors than one launch takes (8), a strided view (not one block of memory: multiplied by torch, the
    same values), an upstream of shape [1] or [1, 1]."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(9, 10, generator=g).to(device)
    gaps = base[:, 1::2].clone()
    tensors = [torch.randn(13, generator=g).to(device) for _ in range(11)] + [base[:, ::2]]
    for shape in [(1,), (1, 1)]:
        upstream = torch.full(shape, -0.75, device=device)
        want = _reference(tensors, upstream, 1.5)
        torch.ops.physmdn._scale_by_(tensors, upstream, 1.5)
        for got, w in zip(tensors, want, strict=True):
            torch.testing.assert_close(got, w, rtol=0, atol=0)
    assert torch.equal(base[:, 1::2], gaps)  # the view's gaps: untouched


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_name_what_is_wrong(device):
    t = [torch.randn(3, device=device)]
    with pytest.raises(RuntimeError, match=r"upstream must have exactly one element, got shape \[2\]"):
        torch.ops.physmdn._scale_by_(t, torch.ones(2, device=device), 1.0)
    with pytest.raises(RuntimeError, match="upstream must be a floating-point tensor, got Long"):
        torch.ops.physmdn._scale_by_(t, torch.ones((), dtype=torch.long, device=device), 1.0)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] must be a floating-point tensor, got Int"):
        torch.ops.physmdn._scale_by_([t[0], torch.ones(2, dtype=torch.int32, device=device)],
                                     torch.ones((), device=device), 1.0)


@pytest.mark.skipif(not CUDA, reason="needs a GPU and CUDA kernels")
def test_cuda_tensors_with_a_host_upstream_and_device_mismatch():
    tensors = _tensors("cuda")
    want = _reference(tensors, torch.tensor(3.0), 2.0)
    torch.ops.physmdn._scale_by_(tensors, torch.tensor(3.0), 2.0)  # a CPU upstream value: decided on the host
    for got, w in zip(tensors, want):
        torch.testing.assert_close(got, w, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"tensors\[0\] is on cpu but upstream is on cuda"):
        torch.ops.physmdn._scale_by_([torch.ones(3)], torch.ones((), device="cuda"), 1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for value in (1.0, 0.3):
        torch.library.opcheck(torch.ops.physmdn._scale_by_.default,
                              ([torch.randn(5, 3, device=device), torch.randn(4, device=device)],
                               torch.tensor(value, device=device), 1.0))


@pytest.mark.skipif(not CUDA, reason="needs a GPU and CUDA kernels")
@pytest.mark.parametrize("reduction, outer", [("mean", None), ("sum", None), ("none", "sum"), ("none", "mean")])
@pytest.mark.parametrize("weight", [1.0, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backward_through_the_device_rescaling(reduction, outer, weight, dtype):
    """The eager backward on CUDA (C++ node and the registered autograd of the _fwd op) hands the forward's
    gradients over through _scale_by_: the gradients of the plain-torch reference, for a unit and a non-unit
    upstream value."""
    from physmdn import reference

    g = torch.Generator().manual_seed(3)
    B, K, D = 1031, 5, 3
    raw = [torch.randn(B, K, generator=g), torch.randn(B, K, D, generator=g),
           0.3 * torch.randn(B, K, D, generator=g) - 0.5, torch.randn(B, D, generator=g)]
    reduce = outer or reduction

    def grads(per_sample, dt):
        leaves = [t.to("cuda", dt).requires_grad_(True) for t in raw]
        loss = per_sample(*leaves)
        return torch.autograd.grad(getattr(loss, reduce)() * weight if loss.dim() else loss * weight, leaves)

    node = grads(lambda *x: physmdn.mixture_nll(*x, reduction=reduction), dtype)  # the C++ node
    registered = grads(lambda *x: torch.ops.physmdn.mixture_nll_fwd(*x, True, 1.0)[0], dtype)  # Python autograd
    want = grads(reference.mixture_nll, torch.float64)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for a, b, w in zip(node, registered, want, strict=True):
        torch.testing.assert_close(a.double(), w, rtol=tol, atol=tol / B)
        torch.testing.assert_close(b.double(), w, rtol=tol, atol=tol / B)

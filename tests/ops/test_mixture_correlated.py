"""The correlated-component NLL ops (full covariance from a Cholesky factor, low rank plus diagonal) against their
float64 torch.distributions references: values, every gradient, dtypes, shapes, errors, opcheck and compile."""

import pytest
import torch

import physmdn
from physmdn import reference
from physmdn._mixture_correlated import MAX_RANK, MAX_TRIL_DIM
from conftest import CUDA, DEVICES, assert_compiled_matches_eager, rel_err


def tril_inputs(B, K, D, dtype=torch.float64, seed=0, diagonal_low=0.3):
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(B, K, generator=g, dtype=torch.float64)
    means = torch.randn(B, K, D, generator=g, dtype=torch.float64)
    tril = 0.5 * torch.randn(B, K, D, D, generator=g, dtype=torch.float64).tril(-1)
    tril = tril + torch.diag_embed(diagonal_low + torch.rand(B, K, D, generator=g, dtype=torch.float64))
    target = torch.randn(B, D, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (logits, means, tril, target)]


def lowrank_inputs(B, K, D, R, dtype=torch.float64, seed=0, diag_low=0.1):
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(B, K, generator=g, dtype=torch.float64)
    means = torch.randn(B, K, D, generator=g, dtype=torch.float64)
    factor = 0.7 * torch.randn(B, K, D, R, generator=g, dtype=torch.float64)
    diag = diag_low + torch.rand(B, K, D, generator=g, dtype=torch.float64)
    target = torch.randn(B, D, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (logits, means, factor, diag, target)]


def loss_and_grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    loss = fn(*inputs)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype)
    grads = torch.autograd.grad((loss * weights).sum(), inputs) if loss.numel() else [torch.zeros_like(t) for t in inputs]
    return loss.detach(), grads


def check(op, ref, inputs, dtype, loss_tol, grad_tol):
    ref_loss, ref_grads = loss_and_grads(ref, [t.double() for t in inputs])
    loss, grads = loss_and_grads(op, inputs)
    assert loss.dtype == dtype
    assert rel_err(loss, ref_loss) <= loss_tol, rel_err(loss, ref_loss)
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == dtype and g.shape == rg.shape
        assert rel_err(g, rg, 1e-3) <= grad_tol, (i, rel_err(g, rg, 1e-3))


TRIL_SHAPES = [(1, 1, 1), (7, 3, 4), (33, 8, 8), (5, 2, 32), (4, 1, 17)]
LOWRANK_SHAPES = [(1, 1, 1, 1), (7, 3, 4, 2), (33, 8, 32, 4), (5, 2, 9, 8), (4, 1, 3, 5)]


@pytest.mark.parametrize("B,K,D", TRIL_SHAPES)
def test_tril_float64_matches_multivariate_normal(B, K, D):
    check(physmdn.mixture_nll_tril, reference.mixture_nll_tril, tril_inputs(B, K, D, seed=B + K + D),
          torch.float64, 1e-12, 1e-10)


@pytest.mark.parametrize("B,K,D,R", LOWRANK_SHAPES)
def test_lowrank_float64_matches_lowrank_multivariate_normal(B, K, D, R):
    check(physmdn.mixture_nll_lowrank, reference.mixture_nll_lowrank, lowrank_inputs(B, K, D, R, seed=B + D + R),
          torch.float64, 1e-12, 1e-10)


def test_references_agree_with_dense_covariance():
    logits, means, tril, target = tril_inputs(6, 3, 5)
    dense = tril @ tril.mT
    torch.testing.assert_close(reference.mixture_nll_tril(logits, means, tril, target),
                               reference.mixture_nll_dense(logits, means, dense, target))
    logits, means, factor, diag, target = lowrank_inputs(6, 3, 5, 2)
    dense = factor @ factor.mT + torch.diag_embed(diag)
    torch.testing.assert_close(reference.mixture_nll_lowrank(logits, means, factor, diag, target),
                               reference.mixture_nll_dense(logits, means, dense, target))


@pytest.mark.parametrize("dtype,loss_tol,grad_tol", [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 2e-2, 5e-2)])
def test_low_precision_against_float64(dtype, loss_tol, grad_tol):
    check(physmdn.mixture_nll_tril, reference.mixture_nll_tril, tril_inputs(65, 4, 6, dtype, seed=1), dtype,
          loss_tol, grad_tol)
    check(physmdn.mixture_nll_lowrank, reference.mixture_nll_lowrank, lowrank_inputs(65, 4, 12, 3, dtype, seed=1),
          dtype, loss_tol, grad_tol)


def test_gradcheck():
    inputs = [t.requires_grad_(True) for t in tril_inputs(3, 2, 3, seed=4)]
    assert torch.autograd.gradcheck(physmdn.mixture_nll_tril, inputs)
    inputs = [t.requires_grad_(True) for t in lowrank_inputs(3, 2, 4, 2, seed=4)]
    assert torch.autograd.gradcheck(physmdn.mixture_nll_lowrank, inputs)


def test_upper_triangle_is_not_read():
    logits, means, tril, target = tril_inputs(4, 2, 3)
    noisy = tril + torch.randn_like(tril).triu(1)
    noisy.requires_grad_(True)
    loss = physmdn.mixture_nll_tril(logits, means, noisy, target)
    torch.testing.assert_close(loss, physmdn.mixture_nll_tril(logits, means, tril, target))
    (grad,) = torch.autograd.grad(loss.sum(), noisy)
    assert bool((grad.triu(1) == 0).all())


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_reductions_and_leading_batch_dimensions(reduction):
    logits, means, tril, target = tril_inputs(12, 3, 2)
    shaped = [logits.view(3, 4, 3), means.view(3, 4, 3, 2), tril.view(3, 4, 3, 2, 2), target.view(3, 4, 2)]
    flat = reference.mixture_nll_tril(logits, means, tril, target)
    expected = {"none": flat.view(3, 4), "mean": flat.mean(), "sum": flat.sum()}[reduction]
    torch.testing.assert_close(physmdn.mixture_nll_tril(*shaped, reduction=reduction), expected)
    # a factor shared over the batch broadcasts
    shared = tril[:1]
    torch.testing.assert_close(physmdn.mixture_nll_tril(logits, means, shared, target),
                               reference.mixture_nll_tril(logits, means, shared.expand_as(tril), target))
    logits, means, factor, diag, target = lowrank_inputs(12, 3, 4, 2)
    flat = reference.mixture_nll_lowrank(logits, means, factor, diag, target)
    expected = {"none": flat.view(2, 6), "mean": flat.mean(), "sum": flat.sum()}[reduction]
    got = physmdn.mixture_nll_lowrank(logits.view(2, 6, 3), means.view(2, 6, 3, 4), factor.view(2, 6, 3, 4, 2),
                                      diag.view(2, 6, 3, 4),
                                      target.view(2, 6, 4), reduction=reduction)
    torch.testing.assert_close(got, expected)


def test_empty_batch():
    for op, inputs in ((physmdn.mixture_nll_tril, tril_inputs(0, 2, 3)),
                       (physmdn.mixture_nll_lowrank, lowrank_inputs(0, 2, 3, 2))):
        inputs = [t.requires_grad_(True) for t in inputs]
        assert op(*inputs).shape == (0,)
        assert op(*inputs, reduction="sum").item() == 0.0
        grads = torch.autograd.grad(op(*inputs, reduction="sum"), inputs)
        assert all(g.shape == t.shape for g, t in zip(grads, inputs))


def test_near_singular_factors_stay_finite_and_accurate():
    """A Cholesky diagonal of 1e-4 and a low-rank covariance with cov_diag 1e-6 under a unit factor."""
    logits, means, tril, target = tril_inputs(16, 3, 6, seed=3, diagonal_low=1e-4)
    tril = tril.clone()
    tril.diagonal(dim1=-2, dim2=-1).copy_(1e-4)
    check(physmdn.mixture_nll_tril, reference.mixture_nll_tril, [logits, means, tril, target], torch.float64,
          1e-10, 1e-8)
    logits, means, factor, diag, target = lowrank_inputs(16, 3, 6, 2, seed=3)
    check(physmdn.mixture_nll_lowrank, reference.mixture_nll_lowrank, [logits, means, factor, diag * 0 + 1e-6, target],
          torch.float64, 1e-9, 1e-7)


def test_errors_name_the_argument():
    logits, means, tril, target = tril_inputs(4, 2, 3)
    with pytest.raises(ValueError, match=r"scale_tril must be \[\*, K, D, D\]"):
        physmdn.mixture_nll_tril(logits, means, tril[..., :2], target)
    with pytest.raises(ValueError, match="logits must be"):
        physmdn.mixture_nll_tril(logits[:, :1], means, tril, target)
    with pytest.raises(ValueError, match="target must be"):
        physmdn.mixture_nll_tril(logits, means, tril, target[:, :2])
    with pytest.raises(TypeError, match="scale_tril must have the dtype of means"):
        physmdn.mixture_nll_tril(logits, means, tril.float(), target)
    with pytest.raises(ValueError, match="reduction must be"):
        physmdn.mixture_nll_tril(logits, means, tril, target, reduction="avg")
    bad = tril.clone()
    bad[1, 0, 2, 2] = -0.5
    with pytest.raises(ValueError, match="scale_tril must have a positive diagonal, got a minimum of -0.5"):
        physmdn.mixture_nll_tril(logits, means, bad, target)
    # without the check (and under compile) the sample with the bad factor gives NaN, the others their values
    loss = physmdn.mixture_nll_tril(logits, means, bad, target, check_diagonal=False)
    assert torch.isnan(loss[1]) and bool(torch.isfinite(loss[[0, 2, 3]]).all())
    bad[1, 0, 2, 2] = 0.0
    loss = physmdn.mixture_nll_tril(logits, means, bad, target, check_diagonal=False)
    assert torch.isnan(loss[1]) and bool(torch.isfinite(loss[[0, 2, 3]]).all())
    D = MAX_TRIL_DIM + 1
    with pytest.raises(ValueError, match=f"D <= {MAX_TRIL_DIM}.*got D = {D}"):
        physmdn.mixture_nll_tril(logits, torch.zeros(4, 2, D, dtype=torch.float64),
                                 torch.eye(D, dtype=torch.float64).expand(4, 2, D, D), torch.zeros(4, D, dtype=torch.float64))

    logits, means, factor, diag, target = lowrank_inputs(4, 2, 5, 2)
    with pytest.raises(ValueError, match=f"rank 1 <= R <= {MAX_RANK}.*got R = {MAX_RANK + 1}"):
        physmdn.mixture_nll_lowrank(logits, means, torch.zeros(4, 2, 5, MAX_RANK + 1, dtype=torch.float64), diag,
                                    target)
    with pytest.raises(ValueError, match=r"cov_factor must be \[\*, K, D, R\]"):
        physmdn.mixture_nll_lowrank(logits, means, factor[:, :, :4], diag, target)
    with pytest.raises(ValueError, match=r"cov_diag must be \[\*, K, D\]"):
        physmdn.mixture_nll_lowrank(logits, means, factor, diag[..., :4], target)
    with pytest.raises(ValueError, match="cov_diag must have a positive value everywhere, got a minimum of 0.0"):
        physmdn.mixture_nll_lowrank(logits, means, factor, diag * 0, target)
    with pytest.raises(ValueError, match="must broadcast to one batch shape"):
        physmdn.mixture_nll_lowrank(logits, means, factor[:3], diag, target)


def test_opcheck():
    for B, K, D in [(5, 3, 2), (1, 1, 1), (0, 2, 3)]:
        inputs = [t.float().requires_grad_(True) for t in tril_inputs(B, K, D)]
        torch.library.opcheck(torch.ops.physmdn.mixture_nll_tril.default, inputs)
        inputs = [t.float().requires_grad_(True) for t in lowrank_inputs(B, K, D, 2)]
        torch.library.opcheck(torch.ops.physmdn.mixture_nll_lowrank.default, inputs)
    inputs = [t.float() for t in tril_inputs(5, 3, 2)]
    loss, z, r = torch.ops.physmdn.mixture_nll_tril(*inputs)
    torch.library.opcheck(torch.ops.physmdn.mixture_nll_tril_backward.default,
                          (torch.ones_like(loss), inputs[0], inputs[2], z, r))
    inputs = [t.float() for t in lowrank_inputs(5, 3, 4, 2)]
    loss, v, r, chol = torch.ops.physmdn.mixture_nll_lowrank(*inputs)
    torch.library.opcheck(torch.ops.physmdn.mixture_nll_lowrank_backward.default,
                          (torch.ones_like(loss), inputs[0], inputs[2], inputs[3], v, r, chol))


def test_torch_compile_fullgraph():
    def tril_step(logits, means, tril, target):
        return (physmdn.mixture_nll_tril(logits * 2.0, means, tril, target) ** 2).mean()

    assert_compiled_matches_eager(tril_step, [t.float().requires_grad_(True) for t in tril_inputs(9, 3, 4)])

    def lowrank_step(logits, means, factor, diag, target):
        return physmdn.mixture_nll_lowrank(logits, means, factor, diag.exp(), target, reduction="mean")

    assert_compiled_matches_eager(lowrank_step, [t.float().requires_grad_(True) for t in lowrank_inputs(9, 3, 6, 2)])


# ----- the fused kernels of the tril op (CPU: csrc/cpu/mixture_nll_tril.cpp, CUDA: csrc/cuda/correlated.cuh) against
# the torch implementation they replace on their device ----------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["mixture_nll_tril", "mixture_nll_lowrank"])
def test_correlated_ops_are_the_compiled_kernels(device, op):
    key = device.upper()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"physmdn::{op}", key)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"physmdn::{op}_backward", key)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5), (torch.bfloat16, 2e-5),
                                       (torch.float16, 2e-5)])
@pytest.mark.parametrize("B,K,D", [(1, 1, 1), (13, 3, 5), (67, 8, 8), (3, 2, 32), (9, 11, 8), (5, 17, 3),
                                   (6, 8, 16), (4, 9, 32), (1000, 1, 3)])
@pytest.mark.parametrize("diagonal_low", [0.3, None])
def test_tril_kernel_matches_torch_implementation(device, B, K, D, dtype, tol, diagonal_low):
    """Forward outputs (loss, z, responsibilities) and backward outputs of the compiled kernel against the torch
    implementation (``_tril_fwd`` / ``_tril_bwd``, what other devices run), on the same inputs, dtype and device.
    Whole and partial steps of 8 components (the CPU's components path); diagonal_low None: diagonal entries far from
    1 (1e-10 and 1e10 in float64 and float32, the range where the CPU's log determinant goes row by row)."""
    from physmdn import _mixture_correlated as mc

    if diagonal_low is None and dtype in (torch.bfloat16, torch.float16):
        pytest.skip("entries of 1e-10 / 1e10 are out of the half types' range")
    if dtype == torch.float16 and D > 8:
        pytest.skip("the losses at D > 8 overflow float16")
    inputs = tril_inputs(B, K, D, dtype=dtype, seed=3 * B + D, diagonal_low=diagonal_low or 0.3)
    if diagonal_low is None:
        diagonal = inputs[2].diagonal(dim1=-2, dim2=-1)
        diagonal[::2, :, -1] *= 1e-10  # (the last row: z grows there only, within the float32 range)
        diagonal[1::2, :, 0] *= 1e10
    inputs = [t.to(device) for t in inputs]
    got = torch.ops.physmdn.mixture_nll_tril(*inputs)
    want = mc._tril_fwd(*inputs)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and g.device == w.device
        # (on CUDA the float32 values differ from torch's by rounding, so a half-type loss may differ by one ulp)
        half_ulp = {torch.bfloat16: 8e-3, torch.float16: 1e-3}.get(g.dtype) if device == "cuda" else None
        assert rel_err(g.double(), w.double()) <= (half_ulp or tol)
    grad_loss = torch.linspace(0.5, 1.5, B, dtype=dtype, device=device)
    got_b = torch.ops.physmdn.mixture_nll_tril_backward(grad_loss, inputs[0], inputs[2], want[1], want[2])
    want_b = mc._tril_bwd(grad_loss, inputs[0], inputs[2], want[1], want[2])
    for g, w in zip(got_b, want_b):
        assert g.dtype == w.dtype and g.shape == w.shape and g.device == w.device
        # (bfloat16 outputs: both round the same float32 value, up to one ulp where the float32 values differ)
        half_ulp = 1e-3 if dtype == torch.float16 and device == "cuda" else None
        assert rel_err(g.double(), w.double(), 1e-3) <= (8e-3 if dtype == torch.bfloat16 else half_ulp or tol * 10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K,D", [(2, 3), (8, 8), (11, 5)])
def test_tril_kernel_non_positive_diagonal_is_nan_for_that_sample_only(device, K, D, dtype):
    logits, means, tril, target = tril_inputs(4, K, D, dtype=dtype)
    tril[1, 0, 2, 2] = 0.0
    tril[2, K - 1, 0, 0] = -0.5
    loss = torch.ops.physmdn.mixture_nll_tril(*[t.to(device) for t in (logits, means, tril, target)])[0].cpu()
    assert torch.isnan(loss[1]) and torch.isnan(loss[2])
    assert torch.isfinite(loss[[0, 3]]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_tril_kernel_strided_and_expanded_inputs(device):
    logits, means, tril, target = [t.to(device) for t in tril_inputs(9, 3, 4, dtype=torch.float32)]
    wide = torch.randn(9, 3, 8, device=device)[..., ::2].copy_(means)  # non-contiguous rows
    shared = tril[:1].expand(9, -1, -1, -1)  # one factor broadcast over the batch
    got = torch.ops.physmdn.mixture_nll_tril(logits, wide, shared, target)[0]
    want = torch.ops.physmdn.mixture_nll_tril(logits, means.contiguous(), shared.contiguous(), target)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a GPU and CUDA kernels")
@pytest.mark.parametrize("kind", ["tril", "lowrank"])
@pytest.mark.parametrize("dtype,loss_tol,grad_tol", [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 2e-2, 5e-2)])
def test_cuda_public_functions_against_float64(kind, dtype, loss_tol, grad_tol):
    """physmdn.mixture_nll_tril / mixture_nll_lowrank on the GPU (forward and autograd through the CUDA kernels)
    against the float64 torch.distributions reference on the CPU; a batch larger than the kernels' capped grid (the
    grid-stride loop)."""
    if kind == "tril":
        inputs, ref, fn = tril_inputs(300_001, 2, 3, seed=11), reference.mixture_nll_tril, physmdn.mixture_nll_tril
    else:
        inputs = lowrank_inputs(300_001, 2, 3, 2, seed=11)
        ref, fn = reference.mixture_nll_lowrank, physmdn.mixture_nll_lowrank
    ref_loss, ref_grads = loss_and_grads(ref, inputs)
    loss, grads = loss_and_grads(fn, [t.to(dtype).cuda() for t in inputs])
    assert loss.dtype == dtype and loss.is_cuda
    assert rel_err(loss.cpu(), ref_loss) <= loss_tol, rel_err(loss.cpu(), ref_loss)
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == dtype and g.is_cuda and g.shape == rg.shape
        assert rel_err(g.cpu(), rg, 1e-3) <= grad_tol, (i, rel_err(g.cpu(), rg, 1e-3))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a GPU and CUDA kernels")
def test_tril_cuda_torch_compile_fullgraph():
    def tril_step(logits, means, tril, target):
        return (physmdn.mixture_nll_tril(logits * 2.0, means, tril, target) ** 2).mean()

    assert_compiled_matches_eager(tril_step, [t.float().cuda().requires_grad_(True) for t in tril_inputs(9, 3, 4)])


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a GPU and CUDA kernels")
def test_tril_cuda_device_mismatch_names_the_argument():
    logits, means, tril, target = tril_inputs(4, 2, 3)
    with pytest.raises(RuntimeError, match="target must be on the device of means"):
        torch.ops.physmdn.mixture_nll_tril(logits.cuda(), means.cuda(), tril.cuda(), target)


# ----- the fused kernels of the low-rank op (CPU: csrc/cpu/mixture_nll_lowrank.cpp, CUDA: csrc/cuda/correlated.cuh)
# against the torch implementation they replace on their device -------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 5e-5), (torch.bfloat16, 5e-5)])
@pytest.mark.parametrize("B,K,D,R", [(1, 1, 1, 1), (13, 3, 5, 2), (67, 8, 32, 4), (3, 2, 32, 8), (5, 4, 41, 3)])
def test_lowrank_kernel_matches_torch_implementation(device, B, K, D, R, dtype, tol):
    """Forward outputs (loss, v, responsibilities, chol) and backward outputs of the compiled kernel against the torch
    implementation (``_lowrank_fwd`` / ``_lowrank_bwd``), on the same inputs, dtype and device; D is not bounded."""
    from physmdn import _mixture_correlated as mc

    inputs = [t.to(device) for t in lowrank_inputs(B, K, D, R, dtype=dtype, seed=3 * B + D + R)]
    got = torch.ops.physmdn.mixture_nll_lowrank(*inputs)
    want = mc._lowrank_fwd(*inputs)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        # (on CUDA the float32 values differ from torch's by rounding, so a bfloat16 loss may differ by one ulp)
        limit = 8e-3 if g.dtype == torch.bfloat16 and device == "cuda" else tol
        assert rel_err(g.double(), w.double(), 1e-3) <= limit, rel_err(g.double(), w.double(), 1e-3)
    grad_loss = torch.linspace(0.5, 1.5, B, dtype=dtype, device=device)
    saved = want[1:]
    got_b = torch.ops.physmdn.mixture_nll_lowrank_backward(grad_loss, inputs[0], inputs[2], inputs[3], *saved)
    want_b = mc._lowrank_bwd(grad_loss, inputs[0], inputs[2], inputs[3], *saved)
    for i, (g, w) in enumerate(zip(got_b, want_b)):
        assert g.dtype == w.dtype and g.shape == w.shape
        err = rel_err(g.double(), w.double(), 1e-3)
        assert err <= (8e-3 if dtype == torch.bfloat16 else tol * 10), (i, err)


@pytest.mark.parametrize("dtype,loss_tol,grad_tol", [(torch.float64, 1e-12, 1e-10), (torch.float32, 1e-5, 1e-4),
                                                     (torch.bfloat16, 2e-2, 5e-2)])
@pytest.mark.parametrize("B,K,D,R", [(1, 1, 1, 1), (9, 1, 32, 8), (17, 5, 3, 1), (6, 3, 40, 2)])
def test_lowrank_cpu_kernel_against_float64_reference(B, K, D, R, dtype, loss_tol, grad_tol):
    """The public function (the kernel and its backward on the CPU) in each dtype against the float64
    ``LowRankMultivariateNormal`` mixture: the loss and the gradient of every input."""
    check(physmdn.mixture_nll_lowrank, reference.mixture_nll_lowrank, lowrank_inputs(B, K, D, R, dtype, seed=B + D),
          dtype, loss_tol, grad_tol)


def test_lowrank_cpu_kernel_gradcheck_odd_shapes():
    for B, K, D, R in [(2, 1, 1, 1), (2, 3, 5, 3)]:
        inputs = [t.requires_grad_(True) for t in lowrank_inputs(B, K, D, R, seed=7)]
        assert torch.autograd.gradcheck(physmdn.mixture_nll_lowrank, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_lowrank_kernel_non_positive_diagonal_is_nan_for_that_sample_only(device):
    logits, means, factor, diag, target = lowrank_inputs(4, 2, 3, 2)
    diag[1, 0, 2] = 0.0
    diag[2, 1, 0] = -0.5
    loss = torch.ops.physmdn.mixture_nll_lowrank(*[t.to(device) for t in (logits, means, factor, diag, target)])[0]
    loss = loss.cpu()
    assert torch.isnan(loss[1]) and torch.isnan(loss[2])
    assert torch.isfinite(loss[[0, 3]]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_lowrank_kernel_strided_and_expanded_inputs(device):
    logits, means, factor, diag, target = [t.to(device) for t in lowrank_inputs(9, 3, 4, 2, dtype=torch.float32)]
    wide = torch.randn(9, 3, 8, device=device)[..., ::2].copy_(means)  # non-contiguous rows
    shared = factor[:1].expand(9, -1, -1, -1)  # one factor broadcast over the batch
    transposed = diag.mT.contiguous().mT  # column-major
    got = torch.ops.physmdn.mixture_nll_lowrank(logits, wide, shared, transposed, target)
    want = torch.ops.physmdn.mixture_nll_lowrank(logits, means.contiguous(), shared.contiguous(), diag, target)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    grad_loss = torch.ones(1, device=device).expand(9)  # (stride 0, as loss.sum() sends it)
    got_b = torch.ops.physmdn.mixture_nll_lowrank_backward(grad_loss, logits, shared, transposed, *want[1:])
    want_b = torch.ops.physmdn.mixture_nll_lowrank_backward(torch.ones(9, device=device), logits, shared.contiguous(),
                                                            diag, *want[1:])
    for g, w in zip(got_b, want_b):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_lowrank_op_errors_name_the_argument():
    logits, means, factor, diag, target = lowrank_inputs(4, 2, 5, 2)
    op = torch.ops.physmdn.mixture_nll_lowrank
    with pytest.raises(RuntimeError, match=r"cov_factor must be \[B, K, D, R\] = \[4, 2, 5, R\] with 1 <= R <= 8, "
                                           r"got shape \[4, 2, 5, 9\]"):
        op(logits, means, torch.zeros(4, 2, 5, 9, dtype=torch.float64), diag, target)
    with pytest.raises(RuntimeError, match=r"cov_diag must be \[B, K, D\] = \[4, 2, 5\], got shape \[4, 2, 4\]"):
        op(logits, means, factor, diag[..., :4], target)
    with pytest.raises(RuntimeError, match=r"cov_diag must have the dtype of means \(Double\), got Float"):
        op(logits, means, factor, diag.float(), target)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a GPU and CUDA kernels")
def test_lowrank_cuda_device_mismatch_names_the_argument():
    logits, means, factor, diag, target = lowrank_inputs(4, 2, 5, 2)
    with pytest.raises(RuntimeError, match="cov_diag must be on the device of means"):
        torch.ops.physmdn.mixture_nll_lowrank(logits.cuda(), means.cuda(), factor.cuda(), diag, target.cuda())

"""The CUDA mixture NLL's lane-per-element schedule (``physmdn._C.set_cuda_lanes_schedule(True)``; contiguous
inputs, D <= 32, K Dp <= 256 with Dp = D rounded up to a power of two; csrc/cuda/device_kernels.cuh, ``lanes_nll_kernel``). Off by default until
measured on a GPU (``bench/bench_cuda_schedules.py``, a step of ``bench/gpu_check.sh``): these tests run the
mixture NLL's correctness checks with it on, against the float64 reference, on shapes that take it and on shapes
that fall back to the other schedules. They need a GPU and a build with the schedule (CMake option
PHYSMDN_CUDA_LANES=ON; off by default, then ``set_cuda_lanes_schedule(True)`` raises); only the switch itself is
tested without them."""

import os
import subprocess
import sys

import pytest
import torch

import physmdn
import test_mixture_nll as T
from conftest import CUDA

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a GPU and CUDA kernels")
LANES_BUILT = physmdn.build_info()["cuda_lanes_schedule"]
LANES_MISSING = "this build lacks the CUDA lane-per-element schedule (CMake option PHYSMDN_CUDA_LANES=OFF, the default)"
lanes_built = pytest.mark.skipif(not LANES_BUILT, reason=LANES_MISSING)

# (B, K, D): every power-of-two D up to 32, K D from 1 to 256 (1 to 8 elements per lane, lanes idle where K D is
# not a power of two), D not a power of two (padding lanes), odd B (partial blocks); the last three fall back
# (K Dp > 256, D > 32)
LANES_SHAPES = [(1, 1, 1), (37, 1, 4), (33, 3, 4), (257, 5, 2), (64, 8, 4), (1031, 8, 1), (100, 16, 4), (50, 8, 8),
                (29, 3, 16), (17, 4, 32), (9, 15, 16), (7, 64, 4), (5, 8, 32), (13, 33, 1), (20, 5, 3), (33, 7, 5),
                (19, 3, 12), (7, 4, 17), (6, 2, 31), (11, 9, 32), (5, 9, 31), (3, 2, 64)]


@pytest.fixture
def lanes_on():
    if not LANES_BUILT:
        pytest.skip(LANES_MISSING)
    prev = physmdn._C.set_cuda_lanes_schedule(True)
    yield
    physmdn._C.set_cuda_lanes_schedule(prev)


@lanes_built
def test_set_cuda_lanes_schedule_returns_the_previous_setting():
    default = os.environ.get("PHYSMDN_CUDA_LANES") == "1"  # (off unless the environment turns it on)
    assert physmdn._C.cuda_lanes_schedule() is default
    assert physmdn._C.set_cuda_lanes_schedule(True) is default
    try:
        assert physmdn._C.set_cuda_lanes_schedule(True) is True and physmdn._C.cuda_lanes_schedule() is True
    finally:
        assert physmdn._C.set_cuda_lanes_schedule(default) is True


@pytest.mark.skipif(LANES_BUILT, reason="this build has the lane-per-element schedule")
def test_set_cuda_lanes_schedule_raises_in_a_build_without_it():
    assert physmdn._C.cuda_lanes_schedule() is False
    assert physmdn._C.set_cuda_lanes_schedule(False) is False
    with pytest.raises(RuntimeError, match="lacks the CUDA lane-per-element schedule.*PHYSMDN_CUDA_LANES=ON"):
        physmdn._C.set_cuda_lanes_schedule(True)
    assert physmdn._C.cuda_lanes_schedule() is False
    # the environment variable that turns the schedule on at import is ignored
    env = dict(os.environ, PHYSMDN_CUDA_LANES="1")
    code = "import physmdn; print(physmdn._C.cuda_lanes_schedule())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@cuda_only
@pytest.mark.parametrize("B,K,D", LANES_SHAPES)
def test_cuda_lanes_float32_matches_reference(B, K, D, lanes_on):
    T.check_against_reference(T.make_inputs(B, K, D, torch.float32, "cuda", seed=B + K + D), torch.float32,
                              loss_tol=1e-5, grad_tol=1e-4)


@cuda_only
@pytest.mark.parametrize("B,K,D", [(1, 1, 1), (64, 8, 4), (9, 15, 16), (7, 64, 4), (257, 5, 2), (40, 5, 3)])
def test_cuda_lanes_float64_matches_reference_tightly(B, K, D, lanes_on):
    T.check_against_reference(T.make_inputs(B, K, D, torch.float64, "cuda", seed=7), torch.float64, 1e-12, 1e-11)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,K,D", [(3, 2, 4), (257, 5, 16), (33, 33, 1), (64, 8, 4), (31, 6, 3)])
def test_cuda_lanes_half_types(B, K, D, dtype, lanes_on):
    T.check_against_reference(T.make_inputs(B, K, D, dtype, "cuda", seed=3), dtype, loss_tol=5e-2, grad_tol=5e-2)


@cuda_only
@pytest.mark.parametrize("case", ["logits", "tiny_scales", "huge_scales", "far_target"])
@pytest.mark.parametrize("K,D", [(5, 4), (8, 4), (8, 1), (3, 8), (16, 16), (5, 3), (4, 6)])
def test_cuda_lanes_extremes_float32(case, K, D, lanes_on):
    T.test_extremes_float32(case, K, D, "cuda", None)


@cuda_only
def test_cuda_lanes_extremes_float64_and_special_values(lanes_on):
    """As test_mixture_nll's float64 extremes (logits +-1e4, log_scales in [-30, 30], targets 1e6 away), with a
    shape the lane schedule takes; NaN inputs stay in their sample; K = 1, D = 1 and an empty batch."""
    B, K, D = 64, 5, 4
    logits, means, log_scales, target = T.make_inputs(B, K, D, torch.float64, "cuda", seed=5)
    logits = logits.sign() * 1e4
    log_scales = torch.empty_like(log_scales).uniform_(-30, 30)
    log_scales[0], log_scales[1] = -30.0, 30.0
    inputs = [logits, means, log_scales, target + 1e6]
    loss, grads = T.loss_and_grads(physmdn.mixture_nll, inputs)
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    T.check_against_reference(inputs, torch.float64, 1e-12, 1e-10)
    for K, D in [(3, 2), (4, 2), (8, 4)]:
        T.test_nan_stays_in_its_sample(K, D, "cuda", None)
    for dtype in (torch.float32, torch.float64):
        T.test_all_components_nan_gives_nan(dtype, "cuda", None)
    T.test_k1_d1_and_empty_batch("cuda")


@cuda_only
@pytest.mark.parametrize("logit", [float("-inf"), float("nan")])
def test_cuda_lanes_minus_inf_and_nan_logits_agree_with_the_default_schedule(logit, lanes_on):
    """A component with a -inf logit (weight 0) takes no part; a NaN logit makes its sample NaN: the same loss and
    gradients (NaN where NaN) as the tiled schedule."""
    inputs = T.make_inputs(40, 8, 4, torch.float32, "cuda", seed=11)
    inputs[0][3, 2] = logit
    inputs[0][5] = float("-inf") if logit != logit else logit  # (-inf case: one sample with every logit -inf)
    lanes = torch.ops.physmdn.mixture_nll_fwd(*inputs, True, 1.0)
    physmdn._C.set_cuda_lanes_schedule(False)
    tiled = torch.ops.physmdn.mixture_nll_fwd(*inputs, True, 1.0)
    for name, a, b in zip(("loss", "saved", "logits", "means", "log_scales", "target"), lanes, tiled):
        if name == "saved":
            continue  # (the shift differs where every logit is -inf: 0 here, -inf in the tiled kernel)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True, msg=name)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_lanes_backward_op_and_reductions(dtype, lanes_on):
    """mixture_nll_bwd with a per-sample upstream gradient (the recompute path: compute_grad=False), and the
    reductions with unit and non-unit upstream gradients, against the float64 reference."""
    tol = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]
    inputs = [t.requires_grad_(True) for t in T.make_inputs(130, 8, 4, dtype, "cuda", seed=5)]
    weights = torch.rand(130, device="cuda").to(dtype)
    loss = torch.ops.physmdn.mixture_nll_fwd(*inputs, False)[0]
    grads = torch.autograd.grad((loss * weights).sum(), inputs)
    exact = [t.detach().double().cpu().requires_grad_(True) for t in inputs]
    ref_grads = torch.autograd.grad((T.reference.mixture_nll(*exact) * weights.double().cpu()).sum(), exact)
    for g, rg in zip(grads, ref_grads):
        assert T.rel_err(g.double().cpu(), rg) <= 10 * tol
    for reduction in ("mean", "sum"):
        for upstream in (1.0, 0.37):
            for B in (1, 13, 1000):
                inputs = T.make_inputs(B, 8, 4, dtype, "cuda", seed=B)
                exact = [t.detach().double().cpu().requires_grad_(True) for t in inputs]
                ref = getattr(T.reference.mixture_nll(*exact), reduction)()
                ref_grads = torch.autograd.grad(ref * upstream, exact)
                params = [t.detach().clone().requires_grad_(True) for t in inputs]
                out = physmdn.mixture_nll(*params, reduction=reduction)
                grads = torch.autograd.grad(out * upstream if upstream != 1.0 else out, params)
                assert T.rel_err(out.double().cpu(), ref.detach()) <= tol
                for g, rg in zip(grads, ref_grads):
                    assert g.dtype == dtype and T.rel_err(g.double().cpu(), rg) <= 10 * tol


@cuda_only
def test_cuda_lanes_opcheck_and_compile(lanes_on):
    T.test_opcheck(False, "cuda")
    T.test_opcheck(True, "cuda")
    T.test_torch_compile_fullgraph("cuda")


@cuda_only
def test_cuda_lanes_switch_changes_the_kernel(lanes_on):
    """The comparisons above are not vacuous: the lane schedule sums over D and K in another order than the tiled
    kernel, so some float32 output differs in its last bits."""
    inputs = T.make_inputs(256, 8, 4, torch.float32, "cuda", seed=1)
    lanes = torch.ops.physmdn.mixture_nll_fwd(*inputs, True, 1.0)
    physmdn._C.set_cuda_lanes_schedule(False)
    tiled = torch.ops.physmdn.mixture_nll_fwd(*inputs, True, 1.0)
    assert not all(torch.equal(a, b) for a, b in zip(lanes, tiled))
    for a, b in zip(lanes, tiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@cuda_only
@pytest.mark.parametrize("B,K,D", [(100003, 8, 4), (65537, 3, 5), (40001, 16, 16)])
def test_cuda_lanes_large_batches_agree_with_the_default_schedule(B, K, D, lanes_on):
    """Many blocks (B G threads, partial last block): the same losses and gradients as the default schedule (float32,
    up to summation order), the backward op with per-sample upstream gradients included."""
    inputs = T.make_inputs(B, K, D, torch.float32, "cuda", seed=B)
    grad_loss = torch.rand(B, device="cuda")
    lanes = torch.ops.physmdn.mixture_nll_fwd(*inputs, True, 1.0)
    lanes_bwd = torch.ops.physmdn.mixture_nll_bwd(grad_loss, *inputs, lanes[1])
    physmdn._C.set_cuda_lanes_schedule(False)
    default = torch.ops.physmdn.mixture_nll_fwd(*inputs, True, 1.0)
    default_bwd = torch.ops.physmdn.mixture_nll_bwd(grad_loss, *inputs, default[1])
    for a, b in zip((*lanes[:1], *lanes[2:], *lanes_bwd), (*default[:1], *default[2:], *default_bwd)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@cuda_only
def test_cuda_lanes_falls_back_for_layouts_it_does_not_take(lanes_on):
    """Strided / expanded inputs (the lane kernel needs contiguous ones) and D > 32 take the other kernels."""
    T.test_noncontiguous_and_expanded_inputs("cuda", None)
    T.check_against_reference(T.make_inputs(9, 3, 40, torch.float32, "cuda", seed=2), torch.float32, 1e-5, 1e-4)

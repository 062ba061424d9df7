"""The CUDA kernels run on the CPU: csrc/cuda/device_kernels.cuh compiled as host C++ under a simulator of threads,
warps, shuffles and barriers (tests/cuda/cuda_sim/host_sim.h; the module tests/cuda/cuda_sim/sim_module.cpp is built
here with torch.utils.cpp_extension, ~1 min the first time, cached in build/cuda_sim).

This checks the kernels' own source without a GPU: indexing, the lane maps and shuffle trees, the two-pass
log-sum-exps, which outputs each thread writes (outputs start as NaN, so an element no thread wrote fails the
comparison), partial blocks and grid-stride loops. The simulator reports a shuffle or __syncwarp with lanes that
returned or lanes at different warp operations, and deadlocks, as errors. Not covered: the device's own exp / log
(the host branch of mixture_math.h runs), races and memory ordering between real concurrent threads, nvcc's code
generation, speed. The GPU itself runs these kernels in test_cuda_lanes.py, tests/ops/test_mixture_nll.py etc. when
there is one (bench/gpu_check.sh)."""

import os
import sys

import pytest
import torch

pytestmark = pytest.mark.sim

import physmdn
from physmdn import reference
from conftest import rel_err
from test_cuda_lanes import LANES_SHAPES
from test_mixture_nll import extreme_inputs

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


@pytest.fixture(scope="module")
def sim():
    from torch.utils import cpp_extension

    build = os.path.join(ROOT, "build", "cuda_sim")
    os.makedirs(build, exist_ok=True)
    # ninja comes with the virtual environment (scripts/setup.sh), which need not be on PATH
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return cpp_extension.load(
        name="physmdn_cuda_sim", sources=[os.path.join(HERE, "cuda_sim", "sim_module.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc"), os.path.join(HERE, "cuda_sim")],
        extra_cflags=["-O1", "-std=c++20"], build_directory=build, verbose=False)


def guarded(t, pad=64):
    """t (contiguous) inside a buffer with pad NaN on either side: a kernel reading past its input gets NaN, which
    the comparisons catch (the kernel-level functions of the module guard their outputs likewise)."""
    flat = t.contiguous().flatten()
    buf = torch.full((flat.numel() + 2 * pad,), float("nan"), dtype=t.dtype)
    buf[pad:pad + flat.numel()] = flat
    return buf[pad:pad + flat.numel()].view(t.shape)


def make_inputs(B, K, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(B, K, generator=g, dtype=torch.float64)
    means = torch.randn(B, K, D, generator=g, dtype=torch.float64)
    log_scales = 0.5 * torch.randn(B, K, D, generator=g, dtype=torch.float64)
    target = torch.randn(B, D, generator=g, dtype=torch.float64)
    return [guarded(t.to(dtype)) for t in (logits, means, log_scales, target)]


def expected(inputs, weights):
    """float64 reference loss and the gradients of sum(weights * loss) on the same (rounded) numbers."""
    x = [t.double().detach().requires_grad_(True) for t in inputs]
    loss = reference.mixture_nll(*x)
    grads = torch.autograd.grad((loss * weights.double()).sum(), x) if loss.numel() else [torch.zeros_like(t) for t in x]
    return loss.detach(), grads


def saved_of(inputs):
    """The saved state (max logit, log sum, log-likelihood) as the CPU op computes it in float64."""
    return torch.ops.physmdn.mixture_nll_fwd(*[t.double() for t in inputs], False, 1.0)[1]


def check(out, inputs, weights, loss_tol, grad_tol, grad_dtype=None, grad_floor=1e-30, with_loss=True, with_grad=True):
    loss, saved, gl, gm, gs, gt = out[:6]
    ref_loss, ref_grads = expected(inputs, weights)
    dtype = inputs[1].dtype
    if with_loss:
        assert loss.dtype == dtype
        assert rel_err(loss, ref_loss) <= loss_tol, ("loss", rel_err(loss, ref_loss))
        assert rel_err(saved, saved_of(inputs)) <= loss_tol, ("saved", rel_err(saved, saved_of(inputs)))
    else:
        assert loss is None and saved is None
    if not with_grad:
        assert gl is None and gm is None
        return
    for name, g, rg in zip(("logits", "means", "log_scales", "target"), (gl, gm, gs, gt), ref_grads):
        assert g.shape == rg.shape and (grad_dtype is None or g.dtype == grad_dtype), (name, g.dtype)
        err = rel_err(g, rg, grad_floor)
        assert err <= grad_tol, (name, err, grad_tol)


def lanes_shapes():
    return [s for s in LANES_SHAPES if s[2] <= 32 and s[1] * (1 << (s[2] - 1).bit_length()) <= 256]


# ----- the simulator itself -----------------------------------------------------------------------------

def test_simulator_runs_a_clean_shuffle_and_barriers(sim):
    out = torch.zeros(64)
    stats = sim.misbehave(3, out)
    assert out.tolist() == [float(t ^ 1) for t in range(64)]
    assert stats["shuffles"] == 64 and stats["threads"] == 64
    out = torch.zeros(64)
    sim.misbehave(4, out)  # __syncthreads after one warp returned: valid, the others go on
    assert out.tolist() == [1.0] * 32 + [2.0] * 32


@pytest.mark.parametrize("mode,message", [(0, "lanes that have returned"), (1, "different warp operations"),
                                          (2, "different warp operations")])
def test_simulator_reports_undefined_warp_operations(sim, mode, message):
    with pytest.raises(RuntimeError, match=message):
        sim.misbehave(mode, torch.zeros(64))


def test_simulated_outputs_are_guarded(sim):
    with pytest.raises(RuntimeError, match="wrote outside output 0"):
        sim.write_one_past()


# ----- lane-per-element mixture NLL (lanes_nll_kernel, off by default on the GPU) ------------------------

@pytest.mark.parametrize("B,K,D", lanes_shapes())
def test_lanes_float64_all_three_modes(sim, B, K, D):
    inputs = make_inputs(B, K, D, seed=B + K + D)
    ones = torch.ones(B, dtype=torch.float64)
    out = sim.lanes_nll(*inputs, grad=False)  # forward
    check(out, inputs, ones, 1e-13, 0, with_grad=False)
    out = sim.lanes_nll(*inputs, g_default=0.25)  # forward with gradients, one upstream value for every sample
    check(out, inputs, 0.25 * ones, 1e-13, 1e-12, grad_dtype=torch.float64)
    w = guarded(torch.linspace(-1.5, 2.0, 2 * B, dtype=torch.float64))[::2]  # backward, per-sample (strided) upstream
    out = sim.lanes_nll(*inputs, grad_loss=w, write_loss=False)
    check(out, inputs, w, 0, 1e-12, grad_dtype=torch.float64, with_loss=False)
    stats = out[6]
    assert stats["threads"] >= B * (1 << out[8]) and (stats["shuffles"] > 0) == (1 << out[8] > 1)


@pytest.mark.parametrize("B,K,D", lanes_shapes())
def test_lanes_float32(sim, B, K, D):
    inputs = make_inputs(B, K, D, torch.float32, seed=B * K + D)
    check(sim.lanes_nll(*inputs), inputs, torch.ones(B), 1e-5, 1e-4, grad_dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,K,D", [(3, 2, 4), (257, 5, 16), (33, 33, 1), (64, 8, 4), (31, 6, 3)])
@pytest.mark.parametrize("in_input_dtype", [True, False])
def test_lanes_half_types(sim, B, K, D, dtype, in_input_dtype):
    """float32 accumulation; gradients written in the input dtype (as the CUDA backend asks when the lanes kernel
    runs) or in float32."""
    inputs = make_inputs(B, K, D, dtype, seed=3)
    out = sim.lanes_nll(*inputs, grads_in_input_dtype=in_input_dtype)
    check(out, inputs, torch.ones(B), 1e-2, 2e-2, grad_dtype=dtype if in_input_dtype else torch.float32)


@pytest.mark.parametrize("K,D,J,G,Dp", [(1, 1, 1, 1, 1), (1, 4, 1, 4, 4), (8, 4, 1, 32, 4), (5, 3, 1, 32, 4),
                                        (9, 16, 8, 32, 16), (64, 4, 8, 32, 4), (3, 17, 4, 32, 32), (2, 31, 2, 32, 32),
                                        (33, 1, 2, 32, 1), (3, 5, 1, 32, 8)])
def test_lanes_launch_shape(sim, K, D, J, G, Dp):
    out = sim.lanes_nll(*make_inputs(2, K, D))
    assert (out[7], 1 << out[8], 1 << out[9]) == (J, G, Dp)


@pytest.mark.parametrize("case", ["logits", "tiny_scales", "huge_scales", "far_target"])
@pytest.mark.parametrize("K,D", [(5, 4), (8, 4), (8, 1), (3, 8), (16, 16), (5, 3), (4, 6)])
def test_lanes_extremes_float32(sim, case, K, D):
    """test_mixture_nll.test_extremes_float32's cases on the lanes kernel."""
    B = 64
    inputs = [guarded(t) for t in extreme_inputs(case, make_inputs(B, K, D, torch.float32, seed=9))]
    out = sim.lanes_nll(*inputs)
    assert all(torch.isfinite(t).all() for t in out[:6])
    check(out, inputs, torch.ones(B), 1e-5, 1e-4, grad_floor=1.0 if case == "huge_scales" else 1e-30)


def test_lanes_special_values_against_the_cpu_op(sim):
    """float64 logits +-1e4, log-scales in [-30, 30], targets 1e6 away; a NaN mean, a -inf logit, a sample whose
    logits are all -inf: every output as the CPU op computes it (NaN where it has NaN), K = 1 / D = 1, empty batch."""
    B, K, D = 64, 5, 4
    logits, means, log_scales, target = make_inputs(B, K, D, seed=5)
    logits = logits.sign() * 1e4
    log_scales = torch.empty_like(log_scales).uniform_(-30, 30)
    target = target + 1e6
    means[3, 1, 2] = float("nan")
    logits[4, 2] = -float("inf")
    logits[5] = -float("inf")
    inputs = [logits, means, log_scales, target]
    out = sim.lanes_nll(*inputs, g_default=1.0)
    cpu = torch.ops.physmdn.mixture_nll_fwd(*inputs, True, 1.0)
    for name, a, e in zip(("loss", "saved", "gl", "gm", "gs", "gt"), out[:6], cpu):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, equal_nan=True, msg=name)
    assert torch.isnan(out[0][3]) and torch.isfinite(out[0][torch.arange(B) != 3][:4]).all()
    for B, K, D in [(7, 1, 1), (0, 3, 2)]:
        inputs = make_inputs(B, K, D)
        check(sim.lanes_nll(*inputs), inputs, torch.ones(B), 1e-13, 1e-12)


# ----- tiled thread-per-sample mixture NLL (the default for contiguous inputs, K < 16) --------------------

# (255, 15, 2): a last block of 127 samples whose rows (3810 float32, 945 float64 logits) are not whole 16-byte
# vectors: load_rows' scalar path over several batches of kLoadBatch loads per thread; (70, 4, 9) in float64: the
# vector path over several batches
TILED_SHAPES = [(1, 1, 1), (3, 2, 17), (257, 5, 3), (129, 8, 4), (33, 15, 2), (300, 3, 1), (70, 4, 9), (255, 15, 2)]


@pytest.mark.parametrize("B,K,D", TILED_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tiled_all_three_modes(sim, B, K, D, dtype):
    inputs = make_inputs(B, K, D, dtype, seed=B + 2 * K + D)
    tol = (1e-13, 1e-12) if dtype == torch.float64 else (1e-5, 1e-4)
    ones = torch.ones(B, dtype=torch.float64)
    check(sim.tiled_nll(*inputs, grad=False), inputs, ones, tol[0], 0, with_grad=False)
    out = sim.tiled_nll(*inputs, g_default=2.0)
    check(out, inputs, 2.0 * ones, *tol)
    w = torch.linspace(-1.0, 1.0, B, dtype=dtype)
    check(sim.tiled_nll(*inputs, grad_loss=w, write_loss=False), inputs, w, 0, tol[1], with_loss=False)
    assert out[6]["syncthreads"] > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_input_dtype", [True, False])
def test_tiled_half_types(sim, dtype, in_input_dtype):
    """float32 accumulation; the gradients written in the input dtype (as the CUDA backend asks when the tiled kernel
    runs) or in float32."""
    inputs = make_inputs(100, 5, 4, dtype, seed=1)
    out = sim.tiled_nll(*inputs, grads_in_input_dtype=in_input_dtype)
    check(out, inputs, torch.ones(100), 1e-2, 2e-2, grad_dtype=dtype if in_input_dtype else torch.float32)
    if in_input_dtype:  # the rounding of the float32 gradients, as torch's conversion does it
        out32 = sim.tiled_nll(*inputs)
        for a, b in zip(out[2:6], out32[2:6]):
            assert torch.equal(a, b.to(dtype))


# ----- warp per sample (K >= 16) and thread per sample (the other layouts) --------------------------------

@pytest.mark.parametrize("warp,B,K,D", [(True, 5, 16, 3), (True, 3, 33, 2), (True, 9, 64, 1), (True, 6, 40, 5),
                                        (False, 7, 3, 2), (False, 130, 2, 5), (False, 1, 1, 1)])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_per_sample_kernels(sim, warp, B, K, D, layout):
    inputs = make_inputs(B, K, D, seed=K + D)
    if layout == "strided":  # transposed means, a column slice of the logits, an expanded log-scale
        inputs[0] = torch.cat([inputs[0], inputs[0]], 1)[:, ::2]
        inputs[1] = inputs[1].transpose(1, 2).contiguous().transpose(1, 2)
        inputs[2] = inputs[2][:1].expand(B, K, D)
    loss, saved, fwd_stats = sim.sample_nll_fwd(*inputs, warp)
    ref_loss, _ = expected(inputs, torch.ones(B))
    assert rel_err(loss, ref_loss) <= 1e-13 and rel_err(saved, saved_of(inputs)) <= 1e-13
    w = torch.linspace(0.5, -1.5, B, dtype=torch.float64)
    gl, gm, gs, gt, bwd_stats = sim.sample_nll_bwd(w, *inputs, warp)
    check((None, None, gl, gm, gs, gt), inputs, w, 0, 1e-12, with_loss=False)
    # the warp kernel: shuffles in the forward's log-sum-exps (the backward recomputes them), __syncwarp between the
    # backward's phases
    assert (fwd_stats["shuffles"] > 0) == warp and (bwd_stats["shuffles"] > 0) == warp
    assert (bwd_stats["syncwarps"] > 0) == warp


# ----- the eager backward's in-place rescaling (scale_by_kernel) ------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocks", [1, 3, 64])
def test_scale_by_kernel(sim, dtype, blocks):
    g = torch.Generator().manual_seed(blocks)
    tensors = [torch.randn(n, generator=g).to(dtype) for n in (1, 300, 2049, 17)]
    tensors[1][5] = float("nan")
    before = [t.clone() for t in tensors]
    sim.scale_by(tensors, torch.tensor(1.0), blocks)  # factor 1: every block returns, nothing is touched
    for t, b in zip(tensors, before):
        assert torch.equal(t.view(torch.uint8), b.view(torch.uint8))  # bit for bit (the NaN too)
    factor = torch.tensor(0.37).to(dtype)
    stats = sim.scale_by(tensors, factor, blocks)
    assert stats["blocks"] == blocks * len(tensors)
    for t, b in zip(tensors, before):
        want = b.mul(factor)  # torch's arithmetic: the same bits
        assert torch.equal(t.isnan(), want.isnan()) and torch.equal(t.nan_to_num(), want.nan_to_num())


# ----- the whole CUDA backend (csrc/cuda/backend.cuh: op_impl.h over CudaBackend, its schedules, launchers and
# conversions) against the CPU ops -------------------------------------------------------------------------

@pytest.fixture(params=[False, True], ids=["default", "lanes"])
def schedule(sim, request):
    prev = sim.set_lanes_schedule(request.param)
    yield request.param
    sim.set_lanes_schedule(prev)


def kernel_kind(stats):
    """Which schedule the last launch was, from its shape: lanes (256-thread blocks, shuffles), tiled
    (__syncthreads), warp (shuffles or __syncwarp in 128-thread blocks) or thread per sample."""
    if not stats["blocks"]:
        return None
    block = stats["threads"] // stats["blocks"]
    if stats["syncthreads"]:
        return "tiled"
    if block == 256:
        return "lanes"
    return "warp" if stats["shuffles"] or stats["syncwarps"] else "thread"


def run(sim, op, *args):
    """op(*args) and the kind of the last kernel it launched (None: no launch)."""
    sim.reset_last_launch()
    out = op(*args)
    return out, kernel_kind(sim.last_launch())


def assert_outputs_close(got, want, tol):
    for i, (a, e) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == e.dtype and a.shape == e.shape, (i, a.dtype, e.dtype, a.shape, e.shape)
        if e.numel():
            assert torch.equal(a.isnan(), e.isnan()), i
            assert rel_err(a.nan_to_num(), e.nan_to_num(), 1e-30) <= tol, (i, rel_err(a.nan_to_num(), e.nan_to_num()))


# (B, K, D, layout): contiguous K < 16 (tiled; lanes when on), K >= 16 (warp; lanes when on and K Dp <= 256),
# strided (thread / warp per sample), D > 32 and K Dp > 256 (no lanes)
BACKEND_CASES = [(37, 3, 4, "contiguous"), (300, 8, 4, "contiguous"), (5, 1, 1, "contiguous"),
                 (20, 16, 4, "contiguous"), (9, 40, 3, "contiguous"), (7, 3, 2, "strided"), (6, 20, 2, "strided"),
                 (4, 2, 33, "contiguous"), (3, 9, 31, "contiguous"), (0, 3, 2, "contiguous"),
                 (300, 8, 4, "split"), (37, 3, 5, "split"), (70, 4, 2, "split"), (300, 8, 4, "broadcast"),
                 (33, 5, 3, "broadcast")]


def expected_kind(B, K, D, layout, lanes, dtype):
    """The schedule csrc/cuda/backend.cuh picks."""
    if B == 0:
        return None
    contiguous = layout == "contiguous"
    if lanes and contiguous and D <= 32 and K * (1 << (D - 1).bit_length()) <= 256:
        return "lanes"
    tile_bytes = (8 if dtype == torch.float64 else 4) * (2 * (K * D + 1) + (K + 1) + 2 * (D + 1))  # per sample
    rows = layout in ("contiguous", "split", "broadcast")  # each sample's rows contiguous, any batch stride
    if rows and K < 16 and min(256, 48 * 1024 // tile_bytes) >= 32:
        return "tiled"
    return "warp" if K >= 16 else "thread"


def layout_inputs(B, K, D, dtype, layout, seed=0):
    """contiguous; strided (rows not contiguous: the per-sample kernels); split (logits, means and log-scales views
    of one [B, W] head output, the target a column slice: rows contiguous at a batch stride, 16-byte aligned within
    rows where K and the widths allow); broadcast (one [K, D] log-scale row expanded over the batch, stride 0)."""
    inputs = make_inputs(B, K, D, dtype, seed)
    if layout == "strided":
        inputs[0] = torch.cat([inputs[0], inputs[0]], 1)[:, ::2]
        inputs[1] = inputs[1].transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "split":
        KD = K * D
        width = -(-(K + 2 * KD) // 8) * 8 + 8  # (a multiple of 8 elements: 16-byte rows for every dtype)
        head = torch.zeros(B, width, dtype=dtype)
        head[:, :K], head[:, K:K + KD], head[:, K + KD:K + 2 * KD] = inputs[0], inputs[1].flatten(1), inputs[2].flatten(1)
        head = guarded(head)
        y = torch.zeros(B, D + 5, dtype=dtype)
        y[:, 2:2 + D] = inputs[3]
        y = guarded(y)
        inputs = [head[:, :K], head[:, K:K + KD].view(B, K, D), head[:, K + KD:K + 2 * KD].view(B, K, D),
                  y[:, 2:2 + D]]
    elif layout == "broadcast":
        inputs[2] = guarded(inputs[2][:1].clone()).expand(B, K, D)
    return inputs


TOLS = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("B,K,D,layout", BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_backend_mixture_nll_ops_match_the_cpu_ops(sim, schedule, B, K, D, layout, dtype):
    inputs = layout_inputs(B, K, D, dtype, layout, seed=B + K)
    tol = TOLS[dtype]
    kind = expected_kind(B, K, D, layout, schedule, dtype)
    fwd, bwd = torch.ops.physmdn.mixture_nll_fwd, torch.ops.physmdn.mixture_nll_bwd
    out, launched = run(sim, sim.mixture_nll_fwd, *inputs, False, 1.0)
    assert_outputs_close(out, fwd(*inputs, False, 1.0), tol)
    assert launched == kind
    # one pass where the schedule has one (lanes, tiled), else the forward, then the backward
    out, launched = run(sim, sim.mixture_nll_fwd, *inputs, True, 0.5)
    assert_outputs_close(out, fwd(*inputs, True, 0.5), tol)
    assert launched == kind
    w = torch.linspace(-1.0, 2.0, B, dtype=torch.float64).to(dtype)
    got, launched = run(sim, sim.mixture_nll_bwd, w, *inputs, out[1])
    assert_outputs_close(got, bwd(w, *inputs, fwd(*inputs, False, 1.0)[1]), tol)
    assert launched == kind


@pytest.mark.parametrize("kind", ["polynomial", "polynomial_shared", "linear", "linear_per_sample", "stencil_periodic",
                                  "stencil_neumann"])
# tiled (contiguous or split, K < 16; 300: several blocks), warp per sample (K >= 16), thread per sample (strided)
@pytest.mark.parametrize("B,K,D,layout", [(9, 3, 4, "contiguous"), (300, 2, 5, "contiguous"), (5, 17, 4, "contiguous"),
                                          (7, 3, 4, "strided"), (70, 8, 2, "split")])
@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("moment,couple", [(2, False), (1, True), (0, True)])
def test_backend_fused_loss_ops_match_the_cpu_ops(sim, kind, B, K, D, layout, with_extra, moment, couple):
    """mdn_loss_fwd / _bwd (the fused NLL + physics penalty) for every family, with and without the extra
    per-component penalty, parameter gradients included, on each schedule, in each moment (second, first, point)
    with the weights detached or coupled."""
    from physmdn._fused import _kernel_args
    from test_physics import make_spec

    inputs = layout_inputs(B, K, D, torch.float64, layout, seed=K)
    inputs[2] = 0.3 * inputs[2] - 0.5
    spec = make_spec(kind, B, K, D, noise=0.2)
    family, p0, p1, _, _, spacing, boundary, noise = _kernel_args(spec, B, K, D, inputs[1])
    p0, p1 = p0.detach(), p1.detach()
    extra = torch.rand(B, K, dtype=torch.float64) if with_extra else None
    args = (*inputs, p0, p1, extra, family, moment, couple, 0.7, spacing, boundary, noise)
    expected = "tiled" if layout in ("contiguous", "split") and K < 16 else "warp" if K >= 16 else "thread"
    for grad in (False, True):
        got, launched = run(sim, sim.mdn_loss_fwd, *args, grad, 0.25)
        assert_outputs_close(got, torch.ops.physmdn.mdn_loss_fwd(*args, grad, 0.25), 1e-11)
        assert launched == expected
    w = torch.linspace(-1.0, 2.0, B, dtype=torch.float64)
    saved = torch.ops.physmdn.mdn_loss_fwd(*args)[1]
    got, launched = run(sim, sim.mdn_loss_bwd, w, *args, saved, True, True)
    assert_outputs_close(got, torch.ops.physmdn.mdn_loss_bwd(w, *args, saved, True, True), 1e-11)
    assert launched == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [3, 17])
def test_backend_fused_loss_reduced_precision(sim, dtype, K):
    """float32 / bfloat16 / float16 inputs of the fused loss (float32 accumulation; parameters in the input dtype)
    on the tiled and warp schedules, against the CPU op."""
    from physmdn._fused import _kernel_args
    from test_physics import make_spec

    B, D = 70, 4
    inputs = make_inputs(B, K, D, dtype, seed=2)
    spec = make_spec("polynomial", B, K, D, dtype=dtype)
    family, p0, p1, moment, couple, spacing, boundary, noise = _kernel_args(spec, B, K, D, inputs[1])
    args = (*inputs, p0.detach(), p1.detach(), torch.rand(B, K).to(dtype), family, moment, couple, 0.7, spacing, boundary,
            noise)
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}[dtype]
    got, launched = run(sim, sim.mdn_loss_fwd, *args, True, 1.0 / B)
    assert_outputs_close(got, torch.ops.physmdn.mdn_loss_fwd(*args, True, 1.0 / B), tol)
    assert launched == ("tiled" if K < 16 else "warp")


@pytest.mark.parametrize("value, scale", [(2.5, 1.0), (0.125, 1 / 3), (-3.0, 0.5), (1e30, 1e-20), (0.25, 0.25)])
@pytest.mark.parametrize("udtype", [torch.float32, torch.float64, torch.bfloat16])
def test_backend_scale_by_matches_torch_bit_for_bit(sim, value, scale, udtype):
    """cuda_scale_by_ (the CUDA eager backward's rescaling): the factor made on the device, compared with the scale
    in the kernel; t * (upstream / scale) as torch computes it, untouched when upstream == scale; tensors of mixed
    dtypes (one launch per dtype), a non-dense one (multiplied by torch), empty ones."""
    from test_scale_by import _reference, _tensors

    tensors = _tensors("cpu") + [torch.randn(6, 4, dtype=torch.float64)[:, ::2]]
    before = [t.clone() for t in tensors]
    upstream = torch.tensor(value, dtype=udtype)
    want = before if float(upstream) == float(torch.tensor(scale, dtype=udtype)) else _reference(before, upstream, scale)
    sim.scale_by_(tensors, upstream, scale)
    for got, w in zip(tensors, want, strict=True):
        torch.testing.assert_close(got, w, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("B,K,D,layout", [(37, 3, 4, "contiguous"), (20, 16, 4, "contiguous"), (7, 3, 2, "strided"),
                                          (6, 20, 2, "strided"), (40, 8, 4, "split")])
def test_backend_backward_repeats_the_forward_gradients_bit_for_bit(sim, schedule, B, K, D, layout):
    """Every schedule's backward recomputes the forward in the kernel that made the forward's gradients: the
    backward of a retained graph (unit upstream gradient) gives the same bits (as gradcheck requires)."""
    inputs = layout_inputs(B, K, D, torch.float64, layout, seed=3)
    out = sim.mixture_nll_fwd(*inputs, True, 1.0)
    grads = sim.mixture_nll_bwd(torch.ones(B, dtype=torch.float64), *inputs, out[1])
    for a, b in zip(out[2:], grads, strict=True):
        assert torch.equal(a, b)
    from physmdn._fused import _kernel_args
    from test_physics import make_spec

    spec = make_spec("polynomial", B, K, D)
    family, p0, p1, moment, couple, spacing, boundary, noise = _kernel_args(spec, B, K, D, inputs[1])
    args = (*inputs, p0.detach(), p1.detach(), torch.rand(B, K, dtype=torch.float64), family, moment, couple, 0.7, spacing,
            boundary, noise)
    out = sim.mdn_loss_fwd(*args, True, 1.0)
    grads = sim.mdn_loss_bwd(torch.ones(B, dtype=torch.float64), *args, out[1], False, False)
    for a, b in zip(out[2:], (*grads[:4], grads[6]), strict=True):
        assert torch.equal(a, b)


# ----- full-covariance mixture NLL (csrc/cuda/correlated.cuh: a thread per sample, grid-stride) ------------------

def tril_inputs(B, K, D, dtype=torch.float64, seed=0):
    """Guarded inputs (test_mixture_correlated.tril_inputs): Cholesky factors with a diagonal in [0.3, 1.3] and
    noise above the diagonal (never read: its gradient must come out zero)."""
    from test_mixture_correlated import tril_inputs as unguarded

    logits, means, tril, target = unguarded(B, K, D, seed=seed)
    tril = tril + torch.randn(B, K, D, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).triu(1)
    return [guarded(t.to(dtype)) for t in (logits, means, tril, target)]


def tril_expected(inputs, grad_loss):
    """The float64 torch implementation's (loss, z, responsibilities) on the same (rounded) numbers, and the float64
    torch.distributions reference's gradients of sum(grad_loss * loss)."""
    from physmdn import _mixture_correlated as mc

    x = [t.double() for t in inputs]
    fwd = mc._tril_fwd(*x)
    leaves = [t.detach().clone().requires_grad_(True) for t in x]
    loss = reference.mixture_nll_tril(*leaves)
    grads = (torch.autograd.grad((loss * grad_loss.double()).sum(), leaves) if loss.numel()
             else [torch.zeros_like(t) for t in x])
    return fwd, grads


TRIL_TOL = {torch.float64: (1e-12, 1e-10), torch.float32: (2e-5, 2e-4), torch.bfloat16: (2e-5, 1e-2),
            torch.float16: (2e-5, 2e-3)}


# (129, 3, 4): a partial last block; K = 1, D = 1, D = 32, K = 300 (the scratch of K log-weights is the
# responsibilities' row); max_blocks caps the grid so that the grid-stride loop runs, its last pass partial
@pytest.mark.parametrize("B,K,D,max_blocks", [(1, 1, 1, 32), (129, 3, 4, 32), (300, 1, 5, 32), (200, 4, 1, 32),
                                              (5, 2, 32, 32), (3, 300, 2, 32), (700, 2, 3, 2), (257, 3, 2, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_tril_kernels_match_the_float64_reference(sim, B, K, D, max_blocks, dtype):
    """Forward (loss in the input dtype, z and responsibilities in the accumulation dtype) and backward (the four
    gradients in the input dtype, zero above the diagonal) into NaN-filled, guarded outputs; the forward against the
    float64 torch implementation on the same rounded inputs, the gradients against torch.distributions in float64."""
    if dtype == torch.float16 and D == 32:
        pytest.skip("these losses (~1e5 and more) exceed float16's range")
    loss_tol, grad_tol = TRIL_TOL[dtype]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    inputs = tril_inputs(B, K, D, dtype, seed=B + K + D)
    loss, z, r, stats = sim.tril_nll_fwd(*inputs, max_blocks)
    assert (loss.dtype, z.dtype, r.dtype) == (dtype, acc, acc)
    blocks = min(-(-B // sim.correlated_threads), max_blocks)
    assert (stats["blocks"], stats["block_threads"]) == (blocks, sim.correlated_threads)
    grad_loss = guarded(torch.linspace(-1.5, 2.0, 2 * B, dtype=dtype))[::2]  # per-sample, strided
    (ref_loss, ref_z, ref_r), ref_grads = tril_expected(inputs, grad_loss)
    # (half types: the loss is rounded to the input dtype, one rounding of the float32 value)
    rounding = {torch.bfloat16: 8e-3, torch.float16: 1e-3}.get(dtype, 0.0)
    assert rel_err(loss, ref_loss) <= loss_tol + rounding, rel_err(loss, ref_loss)
    assert rel_err(z, ref_z) <= 10 * loss_tol and rel_err(r, ref_r) <= 10 * loss_tol, (rel_err(z, ref_z),
                                                                                          rel_err(r, ref_r))
    grads = sim.tril_nll_bwd(grad_loss, inputs[0], inputs[2], z, r, max_blocks)
    assert grads[4]["blocks"] == blocks
    for name, g, rg in zip(("logits", "means", "scale_tril", "target"), grads[:4], ref_grads):
        assert g.dtype == dtype and g.shape == rg.shape, name
        assert rel_err(g, rg, 1e-3) <= grad_tol, (name, rel_err(g, rg, 1e-3))
    assert bool((grads[2].triu(1) == 0).all())


def test_tril_kernels_non_positive_diagonal_is_nan_for_that_sample_only(sim):
    B, K, D = 130, 2, 3
    logits, means, tril, target = tril_inputs(B, K, D, torch.float32, seed=2)
    tril[1, 0, 2, 2] = 0.0
    tril[129, 1, 0, 0] = -0.5
    loss, z, r, _ = sim.tril_nll_fwd(logits, means, tril, target, 1)
    bad = torch.zeros(B, dtype=torch.bool)
    bad[[1, 129]] = True
    assert bool(torch.isnan(loss[bad]).all()) and bool(torch.isfinite(loss[~bad]).all())
    grads = sim.tril_nll_bwd(torch.ones(B), logits, tril, z, r, 1)
    good = [t[~bad] for t in (logits, means, tril, target)]
    (ref_loss, _, _), ref_grads = tril_expected(good, torch.ones(B - 2))
    assert rel_err(loss[~bad], ref_loss) <= 2e-5
    for g, rg in zip(grads[:4], ref_grads):
        assert bool(torch.isnan(g[bad]).any()) and rel_err(g[~bad], rg, 1e-3) <= 2e-4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_tril_ops_as_registered_match_the_cpu_ops(sim, dtype):
    """The CUDA build's mixture_nll_tril / mixture_nll_tril_backward (the shared input checks, contiguous copies of
    strided and broadcast inputs, the outputs' allocation, the grid of kCorrelatedBlocksPerSM blocks per SM) against
    the CPU kernel of the same per-sample functions, on inputs the CPU op also takes."""
    B, K, D = 4200, 3, 4  # more samples than the capped grid's threads (2 simulated SMs): the grid-stride loop runs
    logits, means, tril, target = tril_inputs(B, K, D, dtype, seed=7)
    wide = torch.zeros(B, K, 2 * D, dtype=dtype)[..., ::2]
    wide.copy_(means)  # rows not contiguous
    shared = tril[:1].expand(B, K, D, D)  # one factor broadcast over the batch
    inputs = (logits, wide, shared, target)
    got = sim.mixture_nll_tril(*inputs)
    assert sim.last_launch()["blocks"] == sim.correlated_max_blocks
    want = torch.ops.physmdn.mixture_nll_tril(*inputs)
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert rel_err(g, w) <= (8e-3 if g.dtype == torch.bfloat16 else tol)
    grad_loss = torch.ones(1, dtype=dtype).expand(B)  # (loss.sum()'s upstream gradient: stride 0)
    got = sim.mixture_nll_tril_backward(grad_loss, logits, shared, want[1], want[2])
    want = torch.ops.physmdn.mixture_nll_tril_backward(grad_loss, logits, shared, want[1], want[2])
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == dtype and g.shape == w.shape
        assert rel_err(g, w, 1e-3) <= (8e-3 if dtype == torch.bfloat16 else 10 * tol)
    for B in (0, 1):  # an empty batch launches nothing
        inputs = tril_inputs(B, 2, 3, dtype)
        loss, z, r = sim.mixture_nll_tril(*inputs)
        assert loss.shape == (B,) and z.shape == (B, 2, 3) and r.shape == (B, 2)
        assert [g.shape for g in sim.mixture_nll_tril_backward(torch.ones(B, dtype=dtype), inputs[0], inputs[2], z,
                                                               r)] == [t.shape for t in inputs]


def test_tril_ops_check_their_inputs(sim):
    logits, means, tril, target = tril_inputs(4, 2, 3, torch.float32)
    with pytest.raises(RuntimeError, match="scale_tril must have the dtype of means"):
        sim.mixture_nll_tril(logits, means, tril.double(), target)
    with pytest.raises(RuntimeError, match=r"scale_tril must be \[B, K, D, D\] = \[4, 2, 3, 3\]"):
        sim.mixture_nll_tril(logits, means, tril[..., :2], target)
    with pytest.raises(RuntimeError, match="1 <= D <= 32"):
        sim.mixture_nll_tril(logits, torch.zeros(4, 2, 33), torch.zeros(4, 2, 33, 33), torch.zeros(4, 33))
    loss, z, r = sim.mixture_nll_tril(logits, means, tril, target)
    with pytest.raises(RuntimeError, match=r"z must be the forward's \(Float"):
        sim.mixture_nll_tril_backward(loss, logits, tril, z.double(), r)
    with pytest.raises(RuntimeError, match=r"grad_loss must be \[B\] = \[4\]"):
        sim.mixture_nll_tril_backward(loss[:3], logits, tril, z, r)


# ----- low rank plus diagonal (csrc/cuda/correlated.cuh: a thread per sample, grid-stride) ------------------------

def lowrank_inputs(B, K, D, R, dtype=torch.float64, seed=0):
    from test_mixture_correlated import lowrank_inputs as unguarded

    return [guarded(t.to(dtype)) for t in unguarded(B, K, D, R, seed=seed)]


def lowrank_expected(inputs, grad_loss):
    """The float64 torch implementation's (loss, v, responsibilities, chol) on the same (rounded) numbers, and the
    float64 torch.distributions reference's gradients of sum(grad_loss * loss)."""
    from physmdn import _mixture_correlated as mc

    x = [t.double() for t in inputs]
    fwd = mc._lowrank_fwd(*x)
    leaves = [t.detach().clone().requires_grad_(True) for t in x]
    loss = reference.mixture_nll_lowrank(*leaves)
    grads = (torch.autograd.grad((loss * grad_loss.double()).sum(), leaves) if loss.numel()
             else [torch.zeros_like(t) for t in x])
    return fwd, grads


LOWRANK_TOL = {torch.float64: (1e-12, 1e-10), torch.float32: (5e-5, 5e-4), torch.bfloat16: (5e-5, 1e-2),
               torch.float16: (5e-5, 3e-3)}


# R = 1 and R = 8 (kMaxRank, the local arrays' bound), D = 1 and D = 40 (D is not bounded), K = 1, K = 150
@pytest.mark.parametrize("B,K,D,R,max_blocks", [(1, 1, 1, 1, 32), (129, 3, 4, 2, 32), (300, 1, 5, 8, 32),
                                                (200, 4, 1, 1, 32), (5, 2, 40, 3, 32), (3, 150, 2, 2, 32),
                                                (700, 2, 3, 2, 2), (257, 3, 2, 4, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_lowrank_kernels_match_the_float64_reference(sim, B, K, D, R, max_blocks, dtype):
    """As test_tril_kernels_match_the_float64_reference, for mixture_nll_lowrank: forward (loss; v,
    responsibilities and the capacitance factors in the accumulation dtype) and backward (five gradients in the input
    dtype) into NaN-filled, guarded outputs."""
    loss_tol, grad_tol = LOWRANK_TOL[dtype]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    inputs = lowrank_inputs(B, K, D, R, dtype, seed=B + K + D + R)
    loss, v, r, chol, stats = sim.lowrank_nll_fwd(*inputs, max_blocks)
    assert (loss.dtype, v.dtype, r.dtype, chol.dtype) == (dtype, acc, acc, acc)
    blocks = min(-(-B // sim.correlated_threads), max_blocks)
    assert (stats["blocks"], stats["block_threads"]) == (blocks, sim.correlated_threads)
    grad_loss = guarded(torch.linspace(-1.5, 2.0, 2 * B, dtype=dtype))[::2]  # per-sample, strided
    (ref_loss, ref_v, ref_r, ref_chol), ref_grads = lowrank_expected(inputs, grad_loss)
    rounding = {torch.bfloat16: 8e-3, torch.float16: 1e-3}.get(dtype, 0.0)
    assert rel_err(loss, ref_loss) <= loss_tol + rounding, rel_err(loss, ref_loss)
    for name, got, want in (("v", v, ref_v), ("responsibilities", r, ref_r), ("chol", chol, ref_chol)):
        assert rel_err(got, want, 1e-3) <= 10 * loss_tol, (name, rel_err(got, want, 1e-3))
    grads = sim.lowrank_nll_bwd(grad_loss, inputs[0], inputs[2], inputs[3], v, r, chol, max_blocks)
    assert grads[5]["blocks"] == blocks
    for name, g, rg in zip(("logits", "means", "cov_factor", "cov_diag", "target"), grads[:5], ref_grads):
        assert g.dtype == dtype and g.shape == rg.shape, name
        assert rel_err(g, rg, 1e-3) <= grad_tol, (name, rel_err(g, rg, 1e-3))


def test_lowrank_kernels_non_positive_diagonal_is_nan_for_that_sample_only(sim):
    B, K, D, R = 130, 2, 3, 2
    logits, means, factor, diag, target = lowrank_inputs(B, K, D, R, torch.float32, seed=2)
    diag[1, 0, 2] = 0.0
    diag[129, 1, 0] = -0.5
    loss, v, r, chol, _ = sim.lowrank_nll_fwd(logits, means, factor, diag, target, 1)
    bad = torch.zeros(B, dtype=torch.bool)
    bad[[1, 129]] = True
    assert bool(torch.isnan(loss[bad]).all()) and bool(torch.isfinite(loss[~bad]).all())
    grads = sim.lowrank_nll_bwd(torch.ones(B), logits, factor, diag, v, r, chol, 1)
    good = [t[~bad] for t in (logits, means, factor, diag, target)]
    (ref_loss, *_), ref_grads = lowrank_expected(good, torch.ones(B - 2))
    assert rel_err(loss[~bad], ref_loss) <= 5e-5
    for g, rg in zip(grads[:5], ref_grads):
        assert bool(torch.isnan(g[bad]).any()) and rel_err(g[~bad], rg, 1e-3) <= 5e-4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_lowrank_ops_as_registered_match_the_cpu_ops(sim, dtype):
    """The CUDA build's mixture_nll_lowrank / mixture_nll_lowrank_backward (checks, contiguous copies, allocation,
    the capped grid) against the CPU kernel of the same per-sample functions."""
    B, K, D, R = 4200, 2, 5, 3
    logits, means, factor, diag, target = lowrank_inputs(B, K, D, R, dtype, seed=7)
    wide = torch.zeros(B, K, 2 * D, dtype=dtype)[..., ::2]
    wide.copy_(means)  # rows not contiguous
    shared = factor[:1].expand(B, K, D, R)  # one factor broadcast over the batch
    transposed = diag.mT.contiguous().mT  # column-major
    inputs = (logits, wide, shared, transposed, target)
    got = sim.mixture_nll_lowrank(*inputs)
    assert sim.last_launch()["blocks"] == sim.correlated_max_blocks
    want = torch.ops.physmdn.mixture_nll_lowrank(*inputs)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert rel_err(g, w, 1e-3) <= (8e-3 if g.dtype == torch.bfloat16 else tol)
    grad_loss = torch.ones(1, dtype=dtype).expand(B)  # (loss.sum()'s upstream gradient: stride 0)
    got = sim.mixture_nll_lowrank_backward(grad_loss, logits, shared, transposed, *want[1:])
    want = torch.ops.physmdn.mixture_nll_lowrank_backward(grad_loss, logits, shared, transposed, *want[1:])
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == dtype and g.shape == w.shape
        assert rel_err(g, w, 1e-3) <= (8e-3 if dtype == torch.bfloat16 else 10 * tol)
    for B in (0, 1):  # an empty batch launches nothing
        inputs = lowrank_inputs(B, 2, 3, 2, dtype)
        loss, v, r, chol = sim.mixture_nll_lowrank(*inputs)
        assert loss.shape == (B,) and v.shape == (B, 2, 3) and r.shape == (B, 2) and chol.shape == (B, 2, 2, 2)
        grads = sim.mixture_nll_lowrank_backward(torch.ones(B, dtype=dtype), inputs[0], inputs[2], inputs[3], v, r,
                                                 chol)
        assert [g.shape for g in grads] == [t.shape for t in inputs]


def test_lowrank_ops_check_their_inputs(sim):
    logits, means, factor, diag, target = lowrank_inputs(4, 2, 5, 2, torch.float32)
    with pytest.raises(RuntimeError, match="cov_diag must have the dtype of means"):
        sim.mixture_nll_lowrank(logits, means, factor, diag.double(), target)
    with pytest.raises(RuntimeError, match=r"cov_factor must be \[B, K, D, R\] = \[4, 2, 5, R\] with 1 <= R <= 8"):
        sim.mixture_nll_lowrank(logits, means, torch.zeros(4, 2, 5, 9), diag, target)
    loss, v, r, chol = sim.mixture_nll_lowrank(logits, means, factor, diag, target)
    with pytest.raises(RuntimeError, match="chol must be the forward's"):
        sim.mixture_nll_lowrank_backward(loss, logits, factor, diag, v, r, chol.double())


# ----- the physics penalty of correlated components (correlated_penalty_kernel / _backward_kernel) ----------------

PENALTY_TOL = {torch.float64: 1e-11, torch.float32: 1e-4, torch.bfloat16: 1e-4}


# every family and moment once; (129, 3): a partial last block of pairs (387 pairs); max_blocks 1 and 2: the
# grid-stride loop, its last pass partial; noise: the clamps of the noise-free covariance
@pytest.mark.parametrize("name,moment,kind,noise,B,max_blocks", [
    ("poly", "second", "lowrank", 0.3, 129, 32), ("poly-K", "first", "full", 0.0, 7, 1),
    ("linear", "second", "lowrank", 0.3, 50, 2), ("linear", "point", "general", 0.0, 3, 32),
    ("stencil-periodic", "second", "general", 0.0, 129, 1), ("stencil-neumann", "second", "lowrank", 0.3, 44, 2),
    ("stencil-neumann", "first", "full", 0.3, 5, 32), ("stencil-J0", "point", "lowrank", 0.0, 2, 32)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_correlated_penalty_kernels_match_the_cpu_op(sim, name, moment, kind, noise, B, max_blocks, dtype):
    """Forward (P in the input dtype) and backward (the gradients of means, factor and diag in the accumulation
    dtype) into NaN-filled, guarded outputs, against the CPU op in float64 on the same rounded inputs (the CPU op
    equals the float64 torch reference: tests/physics/test_correlated_penalty_op.py)."""
    from test_correlated_penalty_op import op_args

    K = 3
    means, factor, diag, p0, p1, *rest = op_args(name, moment, kind, noise, B=B, K=K, D=5)
    rounded = [None if t is None else t.to(dtype) for t in (means, factor, diag, p0, p1)]
    exact = [None if t is None else t.double() for t in rounded]
    P, stats = sim.correlated_penalty_fwd(*rounded, *rest, max_blocks)
    assert P.dtype == dtype
    blocks = min(-(-(B * K) // sim.correlated_threads), max_blocks)
    assert (stats["blocks"], stats["block_threads"]) == (blocks, sim.correlated_threads)
    want = torch.ops.physmdn.correlated_penalty(*exact, *rest)
    rounding = {torch.bfloat16: 8e-3}.get(dtype, 0.0)
    assert rel_err(P, want) <= PENALTY_TOL[dtype] + rounding, rel_err(P, want)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    grad = torch.linspace(-1.5, 2.0, B * K, dtype=torch.float64).reshape(B, K)
    *grads, stats = sim.correlated_penalty_bwd(grad.to(acc), *rounded, *rest, max_blocks)
    assert stats["blocks"] == blocks
    wants = torch.ops.physmdn.correlated_penalty_backward(grad, *exact, *rest)
    for label, g, w in zip(("means", "factor", "diag"), grads, wants):
        if diag is None and label == "diag":
            assert g.numel() == 0
            continue
        assert g.dtype == acc and g.shape == w.shape, label
        assert rel_err(g, w, 1e-3) <= 10 * PENALTY_TOL[dtype], (label, rel_err(g, w, 1e-3))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_correlated_penalty_ops_as_registered_match_the_cpu_ops(sim, dtype):
    """The CUDA build's correlated_penalty / _backward (op_impl.h over CudaBackend: the shared checks, contiguous
    copies, the dtype conversions) against the CPU ops, also for an empty batch; the checks name the argument."""
    from test_correlated_penalty_op import op_args

    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for B in (0, 1, 37):
        means, factor, diag, p0, p1, *rest = op_args("stencil-neumann", "second", "lowrank", 0.2, B=B, K=2, D=6)
        args = [t.to(dtype) for t in (means, factor, diag, p0, p1)]
        got, want = sim.correlated_penalty(*args, *rest), torch.ops.physmdn.correlated_penalty(*args, *rest)
        assert got.shape == (B, 2) and rel_err(got, want) <= tol
        grad = torch.ones(B, 2, dtype=dtype)
        for g, w in zip(sim.correlated_penalty_backward(grad, *args, *rest),
                        torch.ops.physmdn.correlated_penalty_backward(grad, *args, *rest)):
            assert g.dtype == dtype and g.shape == w.shape and rel_err(g, w, 1e-3) <= 10 * tol
    with pytest.raises(RuntimeError, match="factor must have the dtype of means"):
        sim.correlated_penalty(args[0], args[1].half(), *args[2:], *rest)


# ----- bench/cuda_static.py's launch shapes (its occupancy model) are the backend's --------------------------------

def _cuda_static():
    import cuda_static  # bench/ is on pytest's pythonpath (pyproject.toml)

    return cuda_static


@pytest.mark.parametrize("B,K,D,layout", [(300, 8, 4, "contiguous"), (40, 1, 1, "contiguous"), (40, 15, 2, "contiguous"),
                                          (9, 3, 17, "contiguous"), (20, 16, 4, "contiguous"), (7, 3, 2, "strided")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_static_launch_shapes_are_the_backends(sim, schedule, B, K, D, layout, dtype):
    """bench/cuda_static.py computes the occupancy of the backend's launches from a copy of their block sizes and
    shared memory (csrc/cuda/device_kernels.cuh's tile sizes): the same numbers as the launches the backend makes,
    for the mixture NLL's schedules and the fused loss's tiled kernel with gradients (separate gradient rows)."""
    from physmdn._fused import _kernel_args
    from test_physics import make_spec

    cs = _cuda_static()
    acc = 8 if dtype == torch.float64 else 4
    inputs = layout_inputs(B, K, D, dtype, layout, seed=K)
    kind = expected_kind(B, K, D, layout, schedule, dtype)
    _, launched = run(sim, sim.mixture_nll_fwd, *inputs, True, 1.0)
    assert launched == kind
    st = sim.last_launch()
    threads = {"tiled": cs.tile_threads(acc, K, D), "lanes": cs.LANES_THREADS, "warp": cs.WARP_THREADS,
               "thread": cs.SAMPLE_THREADS}[kind]
    smem = threads * cs.tile_bytes_per_sample(acc, K, D) if kind == "tiled" else 0
    assert (st["block_threads"], st["shared_bytes"]) == (threads, smem)
    if kind not in ("tiled", "lanes"):
        return
    spec = make_spec("polynomial", B, K, D, dtype=dtype)
    family, p0, p1, moment, couple, spacing, boundary, noise = _kernel_args(spec, B, K, D, inputs[1])
    args = (*inputs, p0.detach(), p1.detach(), None, family, moment, couple, 0.7, spacing, boundary, noise)
    _, launched = run(sim, sim.mdn_loss_fwd, *args, True, 1.0)
    threads = cs.tile_threads(acc, K, D, True) if K < 16 else 0
    assert launched == ("tiled" if threads else "warp" if K >= 16 else "thread")
    if threads:
        st = sim.last_launch()
        assert (st["block_threads"], st["shared_bytes"]) == (threads, threads * cs.tile_bytes_per_sample(acc, K, D, True))

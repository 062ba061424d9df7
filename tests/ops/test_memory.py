"""Memory of the CPU kernels' forward-with-gradients pass: it allocates its outputs and nothing else, so no
[B, K, D] intermediate beyond the gradient outputs exists, in float32 and in the reduced dtypes (whose gradients
are written in the input dtype straight from the kernel, not converted from a float32 copy)."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import physmdn
from physmdn._fused import FAMILY_POLYNOMIAL

B, K, D, J = 1001, 8, 4, 3  # B: a partial last group of 8 samples


@pytest.fixture
def avx2():
    """The lane-parallel kernel (the baseline build converts gradients through float32 temporaries)."""
    if "avx2" not in physmdn.build_info()["cpu_kernels"]:
        pytest.skip("this build has no AVX2 kernels")
    try:
        prev = physmdn._C.set_cpu_isa("avx2")
    except RuntimeError:
        pytest.skip("this CPU has no AVX2+FMA")
    yield
    physmdn._C.set_cpu_isa(prev)


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g).to(dtype) for s in ((B, K), (B, K, D), (B, K, D), (B, D))]


def _allocated_bytes(fn):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0), out


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mixture_nll_forward_with_gradients_allocates_only_its_outputs(dtype, avx2):
    logits, means, log_scales, target = _inputs(dtype)
    allocated, outs = _allocated_bytes(
        lambda: torch.ops.physmdn.mixture_nll_fwd(logits, means, log_scales, target, True, 1.0))
    assert all(t.dtype == dtype for t in outs[2:])  # the gradients, in the input dtype
    # exactly the outputs; a float32 [B, K, D] copy would add B K D 4 bytes
    assert allocated == _nbytes(outs), (allocated, _nbytes(outs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_forward_with_gradients_allocates_only_its_outputs(dtype, avx2):
    logits, means, log_scales, target = _inputs(dtype)
    coeffs = (0.3 * torch.randn(B, K, 1, J + 1)).to(dtype).expand(B, K, D, J + 1)
    empty = means.new_empty((0,))
    extra = torch.rand(B, K).to(dtype)
    allocated, outs = _allocated_bytes(
        lambda: torch.ops.physmdn.mdn_loss_fwd(logits, means, log_scales, target, coeffs, empty, extra,
                                               FAMILY_POLYNOMIAL, 2, False, 0.5, 1.0, 0, 0.1, True, 1.0))
    assert all(t.dtype == dtype for t in outs[2:])
    assert allocated == _nbytes(outs), (allocated, _nbytes(outs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_dtype_gradients_match_float32_kernel(dtype, avx2):
    """The gradients written in the input dtype are the float32 kernel's, rounded once."""
    inputs = _inputs(dtype)
    outs = torch.ops.physmdn.mixture_nll_fwd(*inputs, True, 0.5)
    ref = torch.ops.physmdn.mixture_nll_bwd(torch.full((B,), 0.5, dtype=dtype), *inputs,
                                            torch.ops.physmdn.mixture_nll_fwd(*inputs, False, 1.0)[1])
    for got, want in zip(outs[2:], ref):
        torch.testing.assert_close(got, want, rtol=0, atol=0)

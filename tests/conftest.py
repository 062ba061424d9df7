import pytest
import torch

import physmdn

CUDA = torch.cuda.is_available() and physmdn.build_info()["cuda_kernels"]

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a GPU and CUDA kernels")])]


def cpu_isas():
    isas = ["default"]
    if "avx2" in physmdn.build_info()["cpu_kernels"]:
        try:
            prev = physmdn._C.set_cpu_isa("avx2")
            physmdn._C.set_cpu_isa(prev)
            isas.append("avx2")
        except RuntimeError:
            pass
    return isas


@pytest.fixture(params=cpu_isas())
def cpu_isa(request):
    """Run a test once per compiled CPU kernel variant."""
    prev = physmdn._C.set_cpu_isa(request.param)
    yield request.param
    physmdn._C.set_cpu_isa(prev)


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-30) -> float:
    """Norm-wise relative error max|a - e| / max(max|e|, floor)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp_min(floor) if expected.numel() else torch.tensor(1.0)
    return ((actual - expected).abs().max() / scale).item() if expected.numel() else 0.0


@pytest.fixture
def one_thread():
    """Small networks on a shared 2-core machine: one thread avoids oversubscription stalls (and matches
    torchrun's workers, OMP_NUM_THREADS=1, so summation orders agree)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def assert_compiled_matches_eager(step, inputs):
    """``torch.compile(step, fullgraph=True)`` gives eager's output and input gradients."""
    torch._dynamo.reset()
    out = torch.compile(step, fullgraph=True)(*inputs)
    grads = torch.autograd.grad(out, inputs)
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    ref = step(*ref_inputs)
    torch.testing.assert_close(out, ref)
    for g, rg in zip(grads, torch.autograd.grad(ref, ref_inputs)):
        torch.testing.assert_close(g, rg)


def ops_on_3d():
    """A dispatch mode recording (in ``.seen``) the ops that take a 3-D tensor ([B, K, D] gradients) while active."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpsOn3D(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(isinstance(a, torch.Tensor) and a.dim() == 3 for a in args):
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    return OpsOn3D()

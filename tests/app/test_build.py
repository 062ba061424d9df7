"""Build facts and the torch-version guard."""

import subprocess
import sys

import torch

import physmdn


def test_build_info_fields():
    info = physmdn.build_info()
    assert info["version"] == physmdn.__version__
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["cuda_kernels"], bool)
    assert info["cpu_isa"] in ("default", "avx2")
    assert info["cpu_threads"] >= 1
    if info["cuda_kernels"]:
        assert info["cuda_version"] and info["cuda_arch_list"]
    assert hasattr(torch.ops.physmdn, "mixture_nll_fwd")


def test_python_m_physmdn_info():
    out = subprocess.run([sys.executable, "-m", "physmdn", "info"], capture_output=True, text=True, check=True).stdout
    for key in ("version", "torch_version", "cuda_kernels", "cuda_version", "cuda_arch_list", "cpu_threads"):
        assert key in out


def test_import_under_other_torch_fails_clearly():
    code = "import torch; torch.__version__ = '1.0.0'; import physmdn"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "built against torch" in proc.stderr and "rebuild" in proc.stderr.lower()


def test_cpu_isa_selection_errors():
    import pytest

    with pytest.raises(RuntimeError, match="isa must be 'default' or 'avx2'"):
        physmdn._C.set_cpu_isa("sse9")


def test_ci_compiles_the_cuda_kernels():
    """On CI (a CUDA build of torch and nvcc, no GPU) the CUDA kernels must have been compiled."""
    import os
    import shutil

    import pytest

    if not (os.environ.get("CI") and torch.version.cuda and (shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc"))):
        pytest.skip("not a CI machine with nvcc and a CUDA torch")
    assert physmdn.build_info()["cuda_kernels"], "CI must build the CUDA kernels (PHYSMDN_CUDA=ON)"

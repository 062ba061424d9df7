"""Build facts and the torch-version guard."""

import subprocess
import sys

import torch

import physmdn


def test_build_info_fields():
    info = physmdn.build_info()
    assert info["version"] == physmdn.__version__
    assert info["torch_running"] == torch.__version__
    release = [tuple(int(p) for p in v.split("+")[0].split(".")[:2]) for v in (info["torch_minimum"], torch.__version__)]
    assert release[0] <= release[1], "the running torch must be one the build supports"
    assert isinstance(info["cuda_kernels"], bool)
    assert info["cpu_isa"] in ("default", "avx2")
    assert info["cpu_threads"] >= 1
    if info["cuda_kernels"]:
        assert info["cuda_version"] and info["cuda_arch_list"]
    assert hasattr(torch.ops.physmdn, "mixture_nll_fwd")


def test_python_m_physmdn_info():
    out = subprocess.run([sys.executable, "-m", "physmdn", "info"], capture_output=True, text=True, check=True).stdout
    for key in ("version", "torch_version", "torch_minimum", "torch_running", "cuda_kernels", "cuda_version", "cuda_arch_list", "cpu_threads"):
        assert key in out


def test_import_under_older_torch_fails_clearly():
    code = "import torch; torch.__version__ = '2.9.1'; import physmdn"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "physmdn needs torch >= 2.11" in proc.stderr and "2.9.1 is installed" in proc.stderr


def test_import_under_newer_torch_is_accepted():
    """The stable ABI build has no upper bound: a newer torch than the headers it was built with loads it."""
    code = "import torch; torch.__version__ = '2.99.0'; import physmdn; print(physmdn.build_info()['torch_running'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "2.99.0"


def test_extension_calls_only_the_stable_abi():
    """The extension's undefined symbols from torch are the stable C shim's (aoti_torch_*, torch_*): no C++ symbol of
    libtorch / c10, and no libtorch_cuda or libc10 among the needed libraries (so one build loads under any torch
    >= torch_minimum, CPU-only builds included)."""
    import re
    import shutil

    import pytest

    if not (shutil.which("nm") and shutil.which("readelf")):
        pytest.skip("needs binutils (nm, readelf)")
    so = physmdn._C.__file__
    needed = subprocess.run(["readelf", "-d", so], capture_output=True, text=True, check=True).stdout
    libs = re.findall(r"Shared library: \[([^\]]+)\]", needed)
    assert "libtorch_cpu.so" in libs
    assert not any(lib.startswith(("libtorch_cuda", "libc10", "libtorch_python", "libcudart")) for lib in libs), libs
    undefined = subprocess.run(["nm", "-D", "-u", "-C", so], capture_output=True, text=True, check=True).stdout
    torch_cxx = [line for line in undefined.splitlines() if re.search(r"\b(at|c10|torch)::", line)]
    assert not torch_cxx, torch_cxx[:5]


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

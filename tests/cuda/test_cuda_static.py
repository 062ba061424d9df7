"""What the CUDA kernels compile to for Hopper (sm_90), read without a GPU by bench/cuda_static.py: the SASS and
ptxas' resource usage of csrc/cuda/kernels.cu. Checks the properties the kernels are designed for (16-byte global
loads and stores on the tiled schedule, several loads in flight per thread, no atomics, no register spills on the
default schedules, the occupancy of the default launches), and the analysis itself on hand-written SASS.

The build-level tests need nvcc, a CUDA build of torch (its c10/cuda headers) and nvdisasm (the
``nvidia-cuda-nvdisasm`` wheel, installed by scripts/setup.sh with the CUDA build); they skip without them. The
compile (about 2.5 minutes on 2 cores) is cached under build/cuda_static/.
"""

from __future__ import annotations

import os

import pytest
import torch

import cuda_static as cs  # bench/cuda_static.py (bench/ is on pytest's pythonpath: pyproject.toml)

pytestmark = pytest.mark.static

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----- the analysis on hand-written SASS ------------------------------------------------------------------------------

def sass(*body: str, name: str = "_Zk") -> str:
    lines = [f"\t.text.{name}:"]
    for i, b in enumerate(body):
        lines.append(b if b.startswith(".L_x") else f"        /*{16 * i:04x}*/                   {b} ;")
    return "\n".join(lines) + "\n"


def test_load_batch_of_a_load_then_use_loop_is_one():
    text = sass(".L_x_1:", "LDG.E.128.CONSTANT R4, desc[UR4][R2.64]", "IMAD R8, R9, R10, RZ", "STS [R3], R4",
                "STS [R8], R5", "@!P0 BRA `(.L_x_1)", "EXIT")
    m = cs.analyze_sass(cs.sass_functions(text)["_Zk"])
    assert m["load_batch"] == 1 and m["batch_bytes"] == 16 and m["ldg"] == {128: 1} and m["atomics"] == 0


def test_load_batch_counts_loads_issued_before_the_first_use():
    text = sass("@!P1 LDG.E.128.CONSTANT R32, desc[UR6][R56.64]", "@!P0 LDG.E.128.CONSTANT R28, desc[UR6][R50.64]",
                "IADD3 R50, R50, 0x10, RZ",  # (an address register, not a loaded value)
                "@!P2 LDG.E.128.CONSTANT R20, desc[UR6][R52.64]", "LDG.E R19, desc[UR6][R18.64]",
                "FADD R40, R41, R22",  # R22: the third load's value (R20..R23)
                "LDG.E R3, desc[UR6][R2.64]", "FADD R1, R3, R3", "EXIT")
    m = cs.analyze_sass(cs.sass_functions(text)["_Zk"])
    assert m["load_batch"] == 4 and m["batch_bytes"] == 3 * 16 + 4 and m["ldg"] == {128: 3, 32: 2}


def test_a_load_whose_address_is_a_loaded_value_ends_the_batch():
    text = sass("LDG.E.64 R4, desc[UR6][R2.64]", "LDG.E R6, desc[UR6][R4.64]", "LDG.E R7, desc[UR6][R8.64]", "EXIT")
    assert cs.analyze_sass(cs.sass_functions(text)["_Zk"])["load_batch"] == 2


def test_stores_and_atomics_are_counted():
    text = sass("LDG.E R3, desc[UR6][R2.64]", "STG.E.128 desc[UR6][R8.64], R12", "STG.E [R10.64], R3",
                "RED.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR6][R4.64], R5", "ATOMS.ADD R1, [R2], R3", "STL [R1], R9",
                "REDUX.SUM UR4, R5", "EXIT")
    m = cs.analyze_sass(cs.sass_functions(text)["_Zk"])
    assert m["stg"] == {128: 1, 32: 1} and m["atomics"] == 2 and m["local"] == 1
    assert m["load_batch"] == 1  # the plain STG reads R3, the load's value


def test_parse_ptxas():
    log = ("ptxas info    : Compiling entry function '_Zfoo' for 'sm_90'\n"
           "ptxas info    : Function properties for _Zfoo\n"
           "    200 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads\n"
           "ptxas info    : Used 96 registers, used 1 barriers, 200 bytes cumulative stack size\n"
           "ptxas info    : Compiling entry function '_Zbar' for 'sm_90'\n"
           "ptxas info    : Function properties for _Zbar\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 28 registers, used 0 barriers, 512 bytes smem\n")
    got = cs.parse_ptxas(log)
    assert got["_Zfoo"] == dict(regs=96, stack=200, spill_stores=4, spill_loads=8, barriers=1, static_smem=0)
    assert got["_Zbar"]["regs"] == 28 and got["_Zbar"]["static_smem"] == 512


@pytest.mark.parametrize("threads,regs,smem,blocks,limit", [
    (128, 56, 128 * 340, 5, "shared memory"),  # float32 tile, K = 8, D = 4: 43.5 KB + 1 KB reserved per block
    (128, 96, 0, 5, "registers"),              # 96 * 32 = 3072 registers per warp: 21 warps, 5 blocks of 4
    (256, 28, 0, 8, "warps"),                  # 64 warps / 8
    (32, 16, 0, 32, "blocks"),                 # 64 warps would fit, 32 blocks per SM
    (64, 163, 64 * 640, 5, "shared memory"),   # 168 * 32 registers per warp: 12 warps = 6 blocks; 41 KB: 5
])
def test_occupancy(threads, regs, smem, blocks, limit):
    occ = cs.occupancy(threads, regs, smem)
    assert (occ["blocks"], occ["limit"]) == (blocks, limit)
    assert occ["occupancy"] == pytest.approx(blocks * -(-threads // 32) / 64)


def test_tile_sizes_mirror_the_header():
    """(the simulator test test_cuda_static_launch_shapes_are_the_backends checks them against the launches)"""
    assert cs.tile_bytes_per_sample(4, 8, 4) == 340 and cs.tile_threads(4, 8, 4) == 128
    assert cs.tile_bytes_per_sample(4, 8, 4, True) == 640 and cs.tile_threads(4, 8, 4, True) == 64
    assert cs.tile_threads(8, 15, 40) == 0  # a sample does not fit
    text = open(os.path.join(ROOT, "csrc", "cuda", "device_kernels.cuh")).read()
    for const in ("kTileMaxThreads = %d" % cs.TILE_MAX_THREADS, "kTileSharedBytes = 48 * 1024",
                  "kLanesThreads = %d" % cs.LANES_THREADS, "kWarpsPerBlock = %d" % (cs.WARP_THREADS // 32),
                  "kThreads = %d" % cs.SAMPLE_THREADS):
        assert const in text, const
    text = open(os.path.join(ROOT, "csrc", "cuda", "correlated.cuh")).read()
    assert "kCorrelatedThreads = %d" % cs.CORRELATED_THREADS in text


# ----- the real build ---------------------------------------------------------------------------------------------

def _missing() -> str:
    if cs.find_nvcc() is None:
        return "nvcc not found"
    if not torch.version.cuda:
        return "torch is not a CUDA build (no c10/cuda headers to compile kernels.cu against)"
    if cs.find_tool("nvdisasm") is None:
        return "nvdisasm not found (pip install nvidia-cuda-nvdisasm)"
    return ""


needs_build = pytest.mark.skipif(bool(_missing()), reason=_missing() or "-")


@pytest.fixture(scope="module")
def kernels():
    return cs.analyze("90", verbose=False)


@pytest.fixture(scope="module")
def cases(kernels):
    return {r["case"]: r for r in cs.case_rows(kernels)}


@needs_build
def test_every_kernel_is_read(kernels):
    names = list(kernels)
    assert len(names) >= 100, len(names)
    for family in ("tiled_nll_kernel", "tiled_loss_kernel", "lanes_nll_kernel", "warp_kernel", "sample_kernel",
                   "scale_by_kernel", "tril_nll_kernel", "tril_nll_backward_kernel", "lowrank_nll_kernel",
                   "lowrank_nll_backward_kernel", "correlated_penalty_kernel", "correlated_penalty_backward_kernel"):
        got = [n for n in names if n.startswith(family + "<")]
        assert got, family
        for n in got:  # both the resources and the SASS
            assert "regs" in kernels[n] and "load_batch" in kernels[n], n


@needs_build
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_correlated_kernels_are_in_the_build_without_spills(cases, dtype):
    """The correlated-component ops' thread-per-sample kernels and their physics penalty's (csrc/cuda/correlated.cuh):
    no register spills (their per-sample arrays, bounded by D <= 32, R <= 8 or the polynomial order, may live in local
    memory: stack, not spills)."""
    for op in ("mixture_nll_tril", "mixture_nll_lowrank", "correlated_penalty polynomial", "correlated_penalty linear",
               "correlated_penalty stencil"):
        for kind in ("fwd", "bwd"):
            r = cases[f"{op} {dtype} {kind} (thread)"]
            assert "error" not in r and r["spill"] == 0 and r["atomics"] == 0, r


@needs_build
def test_no_atomics_in_any_kernel(kernels):
    """Reductions go through shuffles and shared memory; the gradients' rows are each written by one thread."""
    assert {n: k["atomics"] for n, k in kernels.items() if k["atomics"]} == {}


@needs_build
def test_default_cases_are_in_the_build_without_spills(cases):
    for case, r in cases.items():
        assert "error" not in r, (case, r)
        assert r["spill"] == 0, (case, r)


@needs_build
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiled_schedule_moves_16_byte_vectors_several_in_flight(cases, dtype):
    """The tiled kernels load and store the [B, K, D] rows as 16-byte vectors (load_rows / store_rows), each thread
    with kLoadBatch (4; the fused loss's kLoadBatchLoss, 8) loads in flight; the lane kernel issues its loads before
    its arithmetic."""
    for grad in ("fwd", "fwd+grads"):
        r = cases[f"mixture_nll {dtype} K=8 D=4 {grad} (tiled)"]
        assert r["ldg"].startswith("128x"), r
        assert r["load_batch"] >= 4, r
        assert r["local"] == 0 and r["stack"] == 0, r
    r = cases[f"mixture_nll {dtype} K=8 D=4 fwd+grads (tiled)"]
    assert r["stg"].startswith("128x"), r
    r = cases[f"mdn_loss {dtype} K=8 D=4 fwd+grads (tiled)"]  # (kLoadBatchLoss = 8)
    assert r["batch_bytes"] >= 8 * 16 and r["kb_in_flight"] >= cs.need_kb()[1], r
    # (the lane kernel's target load sits behind its own branch, which the count stops at: 3 + 1 in flight)
    assert cases[f"mixture_nll {dtype} K=8 D=4 fwd+grads (lanes, opt-in)"]["load_batch"] >= 3


@needs_build
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_split_heads_take_16_byte_loads_in_their_own_instantiation(cases, dtype):
    """Row-strided inputs (views of one head's output) load 16-byte vectors within rows, several in flight, in a
    kStrided instantiation of the tiled kernels; the contiguous one keeps its registers (a small tile of 256-thread
    blocks keeps half the SM's warps resident)."""
    for op in ("mixture_nll", "mdn_loss"):
        r = cases[f"{op} {dtype} K=8 D=4 fwd+grads, split head (tiled, strided)"]
        assert r["ldg"].startswith("128x") and r["load_batch"] >= 4, r
    small = cases["mixture_nll float32 K=2 D=1 fwd+grads (tiled)"]
    assert small["threads"] == 256 and small["occupancy"] >= 0.5, small


@needs_build
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiled_mixture_nll_occupancy_and_bytes_in_flight(cases, dtype):
    """The mixture NLL's default launch at K = 8, D = 4 keeps at least a quarter of the SM's warps resident (5 blocks
    of 4 warps, limited by the tile's shared memory, not registers) and, by Little's law, enough bytes in flight to
    keep an H200's HBM busy (the model's upper latency)."""
    r = cases[f"mixture_nll {dtype} K=8 D=4 fwd+grads (tiled)"]
    assert r["occupancy"] >= 0.25 and r["limit"] == "shared memory", r
    assert r["kb_in_flight"] >= cs.need_kb()[1], (r, cs.need_kb())

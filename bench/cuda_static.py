"""What the CUDA kernels compile to for Hopper, without a GPU: registers, local memory, spills, the global loads and
stores in the SASS (their width, how many each thread has in flight), atomics, and the theoretical occupancy and
bytes in flight per SM of the launches the CUDA backend makes.

    python bench/cuda_static.py [--arch 90] [--no-save] [--all] [--save-baseline]

Compiles csrc/cuda/kernels.cu (the real build's source and flags, for one architecture) with ``nvcc -cubin -Xptxas
-v``, reads ptxas' resource usage, disassembles the cubin with ``nvdisasm`` (the ``nvidia-cuda-nvdisasm`` wheel; on
PATH or in ``$CUDA_HOME/bin`` also works) and reads the SASS. The compile (about 2.5 minutes on 2 cores) is cached
under build/cuda_static/, keyed by the sources and flags. Prints a table of the kernels the backend launches by
default (``--all``: every kernel) and appends it to bench/out/cuda-static.md / .csv (ignored by git);
``--save-baseline`` overwrites the curated bench/baselines/cuda-static.md / .csv with this run instead.

What the columns mean:
- ``regs``, ``stack`` (bytes of local memory per thread: arrays the compiler could not keep in registers),
  ``spill`` (bytes stored / loaded by register spilling): ptxas ``-v``.
- ``ldg`` / ``stg``: global loads / stores in the SASS by width in bits (``128x3`` = three 16-byte instructions);
  ``atomics``: ATOM / RED instructions (global or shared); ``local``: LDL / STL instructions.
- ``load_batch``: the most global loads a thread issues before it uses the value of any of them (or branches): the
  loads it has in flight at once, its memory-level parallelism. A loop of load-then-use has 1: one memory latency
  per load. ``batch_bytes``: the most bytes such a batch of loads moves.
- ``threads``, ``smem_kb``: the launch the backend makes for the case (tile sizes of csrc/cuda/device_kernels.cuh,
  mirrored here and checked against the CPU simulator's launches in tests/cuda/test_cuda_sim.py).
- ``occupancy``: resident warps per SM / 64, limited by registers (per warp, in units of 256), shared memory
  (228 KiB per SM, 1 KiB reserved per block), 64 warps and 32 blocks per SM (sm_90).
- ``kb_in_flight``: resident threads x batch_bytes, per SM: an upper bound on the bytes a kernel's load phase keeps
  in flight (bytes requested: coalescing is not modelled; the thread-per-sample kernels' 4-byte loads each touch
  their own 32-byte sector). By Little's law an SM needs about bandwidth x latency / SMs of
  them to keep HBM busy: 4.8 TB/s x ~0.6-0.8 us / 132 = ~22-29 KB on an H200 (``need_kb`` below: a model with a
  stated latency, not a measurement).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "build", "cuda_static")
RESULTS = os.path.join(ROOT, "bench", "out")
BASELINES = os.path.join(ROOT, "bench", "baselines")

# sm_90 (Hopper) limits
SM90 = dict(regs_per_sm=65536, reg_unit=256, max_regs=255, max_warps=64, max_blocks=32, smem_per_sm=233472,
            smem_reserved=1024, smem_unit=128)
H200 = dict(bandwidth_tb_s=4.8, sms=132, latency_us=(0.6, 0.8))


def need_kb(gpu: dict = H200) -> tuple[float, float]:
    """Bytes in flight per SM (KB) that Little's law asks for at the GPU's bandwidth, for its latency range."""
    lo, hi = gpu["latency_us"]
    per = gpu["bandwidth_tb_s"] * 1e12 / gpu["sms"] / 1e3 * 1e-6
    return per * lo, per * hi


# ----- tools ---------------------------------------------------------------------------------------------------------

def find_tool(name: str) -> str | None:
    """``name`` on PATH, in $CUDA_HOME/bin or the standard CUDA install, or in an nvidia-* wheel (nvidia/cu*/bin)."""
    cands = [shutil.which(name)]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cands.append(os.path.join(home, "bin", name))
    try:
        import nvidia  # namespace package of the nvidia-* wheels

        for base in nvidia.__path__:
            cands += sorted(glob.glob(os.path.join(base, "*", "bin", name)))
    except ImportError:
        pass
    for c in cands:
        # nvcc on PATH may be a wrapper script (shared/BUILD.md): prefer a real toolkit's when there is one
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def compile_flags(arch: str) -> list[str]:
    """The real build's nvcc flags (CMakeLists.txt) for one architecture, with torch's and Python's headers."""
    import pybind11
    import torch

    torch_inc = os.path.join(os.path.dirname(torch.__file__), "include")  # (not cpp_extension: shared/BUILD.md, 7)
    incs = ["-I", os.path.join(ROOT, "csrc")]
    for d in [sysconfig.get_paths()["include"], pybind11.get_include(), torch_inc,
              os.path.join(torch_inc, "torch", "csrc", "api", "include")]:
        incs += ["-isystem", d]
    # with the opt-in lane-per-element schedule compiled in (PHYSMDN_CUDA_LANES=ON, as bench/gpu_check.sh builds), so
    # that every kernel the backend can launch is read
    return ["-DPHYSMDN_WITH_CUDA=1", "-DPHYSMDN_WITH_CUDA_LANES=1", "-DTORCH_TARGET_VERSION=0x020b000000000000", "-gencode", f"arch=compute_{arch},code=sm_{arch}", "--expt-relaxed-constexpr",
            "--expt-extended-lambda", "-O3", "-DNDEBUG", "-std=c++20", "-Xcompiler=-fPIC", *incs]


def sources_digest(nvcc: str, flags: list[str]) -> str:
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)):
        if path.endswith((".h", ".cuh", ".cu")):
            h.update(path.encode())
            with open(path, "rb") as f:
                h.update(f.read())
    h.update(" ".join(flags).encode())
    h.update(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.encode())
    return h.hexdigest()[:16]


def build(arch: str = "90", verbose: bool = True) -> tuple[str, str]:
    """(cubin path, ptxas log) for csrc/cuda/kernels.cu, compiled or from the cache."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("cuda_static: nvcc not found (CUDA_HOME, /usr/local/cuda, PATH)")
    flags = compile_flags(arch)
    out = os.path.join(CACHE, f"sm{arch}-{sources_digest(nvcc, flags)}")
    cubin, log = os.path.join(out, "kernels.cubin"), os.path.join(out, "ptxas.log")
    if not (os.path.exists(cubin) and os.path.exists(log)):
        os.makedirs(out, exist_ok=True)
        cmd = [nvcc, *flags, "-cubin", "-Xptxas", "-v", os.path.join(ROOT, "csrc", "cuda", "kernels.cu"),
               "-o", cubin + ".tmp"]
        if verbose:
            print(f"cuda_static: compiling csrc/cuda/kernels.cu for sm_{arch} (a few minutes) ...", file=sys.stderr)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"cuda_static: nvcc failed ({r.returncode}):\n{r.stderr[-4000:]}")
        with open(log, "w") as f:
            f.write(r.stderr + r.stdout)
        os.replace(cubin + ".tmp", cubin)
    with open(log) as f:
        return cubin, f.read()


def disassemble(cubin: str) -> str:
    nvdisasm = find_tool("nvdisasm")
    if nvdisasm is None:
        raise RuntimeError("cuda_static: nvdisasm not found (pip install nvidia-cuda-nvdisasm, or a full CUDA toolkit)")
    sass = cubin + ".sass"
    if not os.path.exists(sass):
        r = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"cuda_static: nvdisasm failed ({r.returncode}): {r.stderr[-2000:]}")
        with open(sass + ".tmp", "w") as f:
            f.write(r.stdout)
        os.replace(sass + ".tmp", sass)
    with open(sass) as f:
        return f.read()


# ----- parsing -------------------------------------------------------------------------------------------------------

_PTXAS = re.compile(
    r"Compiling entry function '(?P<name>\S+)' for 'sm_\d+'\s*\n"
    r"ptxas info\s*: Function properties for \S+\s*\n"
    r"\s*(?P<stack>\d+) bytes stack frame, (?P<sst>\d+) bytes spill stores, (?P<sld>\d+) bytes spill loads\s*\n"
    r"ptxas info\s*: Used (?P<regs>\d+) registers(?:, used (?P<bar>\d+) barriers)?(?:, (?P<smem>\d+) bytes smem)?")


def parse_ptxas(log: str) -> dict[str, dict]:
    """mangled kernel name -> registers, stack frame, spill bytes, barriers, static shared memory (ptxas -v)."""
    out = {}
    for m in _PTXAS.finditer(log):
        out[m["name"]] = dict(regs=int(m["regs"]), stack=int(m["stack"]), spill_stores=int(m["sst"]),
                              spill_loads=int(m["sld"]), barriers=int(m["bar"] or 0), static_smem=int(m["smem"] or 0))
    return out


def demangle(names: list[str]) -> dict[str, str]:
    """mangled -> short readable name (``tiled_nll_kernel<float, float, float, true, false>``); mangled where c++filt is
    missing."""
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return {n: n for n in names}
    lines = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    out = {}
    for n, d in zip(names, lines):
        d = re.sub(r"^void ", "", d)
        d = re.sub(r"physmdn::(\(anonymous namespace\)::)?", "", d).replace("c10::", "")
        out[n] = d.split("(")[0].strip() or n
    return out


_SECTION = re.compile(r"^\s*\.text\.(\S+):\s*$")
_INSTR = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?P<body>[^;]*);")
_LABEL = re.compile(r"^\s*\.L_x_\d+:")
_REG = re.compile(r"(?<![A-Z])R(\d+)(\.64)?\b")


def sass_functions(sass: str) -> dict[str, list[str]]:
    """mangled kernel name -> its instructions (``[@P0 ]OPCODE operands``) and labels (``:label``), in order."""
    funcs, cur = {}, None
    for line in sass.splitlines():
        m = _SECTION.match(line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        if cur is None:
            continue
        if _LABEL.match(line):
            cur.append(":label")
            continue
        m = _INSTR.match(line)
        if m:
            cur.append(m["body"].strip())
    return funcs


def _regs(text: str) -> set[int]:
    out = set()
    for m in _REG.finditer(text):
        r = int(m.group(1))
        out.add(r)
        if m.group(2):
            out.add(r + 1)
    return out


def _width(opcode: str) -> int:
    for w, tag in ((128, ".128"), (64, ".64"), (16, ".U16"), (16, ".S16"), (8, ".U8"), (8, ".S8")):
        if tag in opcode:
            return w
    return 32


def analyze_sass(instrs: list[str]) -> dict:
    """Global loads / stores by width, atomics, local-memory instructions, and load_batch (see the module doc)."""
    ldg, stg = {}, {}
    atomics = local = 0
    best = run = best_bytes = run_bytes = 0
    pending: set[int] = set()

    def close():
        nonlocal best, run, pending, best_bytes, run_bytes
        best, best_bytes = max(best, run), max(best_bytes, run_bytes)
        run, run_bytes, pending = 0, 0, set()

    for ins in instrs:
        if ins == ":label":
            close()
            continue
        body = re.sub(r"^@!?U?P\w+\s+", "", ins)
        parts = body.split(None, 1)
        op, operands = parts[0], (parts[1] if len(parts) > 1 else "")
        base = op.split(".")[0]
        if base in ("ATOM", "ATOMG", "ATOMS", "RED", "REDG", "REDUX"):
            atomics += 1 if base != "REDUX" else 0  # REDUX: a warp-wide register reduction, not a memory atomic
        if base in ("LDL", "STL"):
            local += 1
        if base in ("BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "CALL", "BAR", "BSYNC", "WARPSYNC"):
            close()
            continue
        if base == "LDG":
            w = _width(op)
            ldg[w] = ldg.get(w, 0) + 1
            dst, _, src = operands.partition(",")
            if _regs(src) & pending:  # the address needs an earlier load's value
                close()
            first = _regs(dst)
            r0 = min(first) if first else None
            if r0 is not None:
                pending |= set(range(r0, r0 + max(1, w // 32)))
            run += 1
            run_bytes += w // 8
            continue
        if base == "STG":
            w = _width(op)
            stg[w] = stg.get(w, 0) + 1
        if pending:
            # stores read every operand; other instructions write their first one
            srcs = operands if base.startswith(("ST", "RED", "ATOM")) else operands.partition(",")[2]
            if _regs(srcs) & pending:
                close()
    close()
    return dict(ldg=ldg, stg=stg, atomics=atomics, local=local, load_batch=best, batch_bytes=best_bytes)


def widths(d: dict) -> str:
    return " ".join(f"{w}x{n}" for w, n in sorted(d.items(), reverse=True)) or "-"


# ----- launches and occupancy ----------------------------------------------------------------------------------------
# Mirrors csrc/cuda/device_kernels.cuh (kTileMaxThreads, kTileSharedBytes, tile_bytes_per_sample, tile_threads,
# kLanesThreads, kWarpsPerBlock, kThreads); tests/cuda/test_cuda_sim.py checks these against the simulator's launches.
TILE_MAX_THREADS, TILE_SHARED_BYTES, LANES_THREADS, WARP_THREADS, SAMPLE_THREADS = 256, 48 * 1024, 256, 128, 128
CORRELATED_THREADS = 128  # csrc/cuda/correlated.cuh kCorrelatedThreads


def tile_bytes_per_sample(acc_bytes: int, K: int, D: int, separate_grads: bool = False) -> int:
    rows = 2 * (K * D + 1) + (K + 1)
    return acc_bytes * ((2 if separate_grads else 1) * rows + 2 * (D + 1))


def tile_threads(acc_bytes: int, K: int, D: int, separate_grads: bool = False) -> int:
    t = min(TILE_MAX_THREADS, TILE_SHARED_BYTES // tile_bytes_per_sample(acc_bytes, K, D, separate_grads))
    return t // 32 * 32 if t >= 32 else 0


def occupancy(threads: int, regs: int, smem: int, limits: dict = SM90) -> dict:
    """Resident blocks / warps per SM and the limiting resource (the CUDA occupancy calculator's rules)."""
    warps = -(-threads // 32)
    regs_warp = -(-max(regs, 1) * 32 // limits["reg_unit"]) * limits["reg_unit"]
    by = {
        "warps": limits["max_warps"] // warps,
        "blocks": limits["max_blocks"],
        "registers": (limits["regs_per_sm"] // regs_warp) // warps,
    }
    if smem:
        per = -(-(smem + limits["smem_reserved"]) // limits["smem_unit"]) * limits["smem_unit"]
        by["shared memory"] = limits["smem_per_sm"] // per
    blocks = min(by.values())
    return dict(blocks=blocks, warps=blocks * warps, occupancy=blocks * warps / limits["max_warps"],
                limit=min(by, key=by.get))


# The default launches for the benchmark shape (and the other schedules): (case, kernel name, threads, smem bytes).
def default_cases(K: int = 8, D: int = 4, K_warp: int = 32) -> list[tuple[str, str, int, int]]:
    cases = []
    for dt, nbytes in (("float32", 4), ("bfloat16", 4)):  # (bytes of the accumulation dtype: float32 for both)
        s = "float" if dt == "float32" else "BFloat16"
        t = tile_threads(nbytes, K, D)
        for grad in (False, True):
            g = s if grad else "float"  # (the forward alone: the accumulation dtype, no gradients written)
            cases.append((f"mixture_nll {dt} K={K} D={D} {'fwd+grads' if grad else 'fwd'} (tiled)",
                          f"tiled_nll_kernel<{s}, float, {g}, {'true' if grad else 'false'}, false>",
                          t, t * tile_bytes_per_sample(nbytes, K, D)))
        cases.append((f"mixture_nll {dt} K={K} D={D} fwd+grads, split head (tiled, strided)",
                       f"tiled_nll_kernel<{s}, float, {s}, true, true>", t, t * tile_bytes_per_sample(nbytes, K, D)))
        t = tile_threads(nbytes, K, D, True)
        for strided in ("false", "true"):
            cases.append((f"mdn_loss {dt} K={K} D={D} fwd+grads{', split head' if strided == 'true' else ''} "
                          f"(tiled{', strided' if strided == 'true' else ''})",
                          f"tiled_loss_kernel<{s}, float, {s}, true, {strided}>", t,
                          t * tile_bytes_per_sample(nbytes, K, D, True)))
        J = 1 << (-(-K * (1 << (D - 1).bit_length()) // 32) - 1).bit_length()  # elements per lane, a power of 2
        cases.append((f"mixture_nll {dt} K={K} D={D} fwd+grads (lanes, opt-in)",
                      f"lanes_nll_kernel<{s}, float, {s}, true, {J}>", LANES_THREADS, 0))
        cases.append((f"mixture_nll {dt} K={K_warp} D={D} fwd+grads (warp)", f"warp_kernel<{s}, float, false, true>",
                      WARP_THREADS, 0))
        cases.append((f"mixture_nll {dt} strided fwd+grads (thread)", f"sample_kernel<{s}, float, false, true>",
                      SAMPLE_THREADS, 0))
        cases.append((f"_scale_by_ {dt}", f"scale_by_kernel<{s}, float>", 256, 0))
        # the correlated-component ops (csrc/cuda/correlated.cuh): a thread per sample, shapes chosen at run time
        for op in ("tril", "lowrank"):
            cases.append((f"mixture_nll_{op} {dt} fwd (thread)", f"{op}_nll_kernel<{s}, float>", CORRELATED_THREADS, 0))
            cases.append((f"mixture_nll_{op} {dt} bwd (thread)", f"{op}_nll_backward_kernel<{s}, float>",
                          CORRELATED_THREADS, 0))
        # their physics penalty: a thread per (sample, component) pair, a kernel per family (0 polynomial, 1 linear,
        # 2 stencil)
        for family, law in ((0, "polynomial"), (1, "linear"), (2, "stencil")):
            cases.append((f"correlated_penalty {law} {dt} fwd (thread)",
                          f"correlated_penalty_kernel<{family}, {s}, float>", CORRELATED_THREADS, 0))
            cases.append((f"correlated_penalty {law} {dt} bwd (thread)",
                          f"correlated_penalty_backward_kernel<{family}, {s}, float>", CORRELATED_THREADS, 0))
    t = tile_threads(4, 2, 1)  # a small tile: 256-thread blocks, whose residency registers decide
    cases.append(("mixture_nll float32 K=2 D=1 fwd+grads (tiled)", "tiled_nll_kernel<float, float, float, true, false>",
                  t, t * tile_bytes_per_sample(4, 2, 1)))
    return cases


def analyze(arch: str = "90", verbose: bool = True) -> dict[str, dict]:
    """readable kernel name -> ptxas resources and SASS metrics, for every kernel of csrc/cuda/kernels.cu."""
    cubin, log = build(arch, verbose)
    res = parse_ptxas(log)
    funcs = sass_functions(disassemble(cubin))
    names = demangle(sorted(set(res) | set(funcs)))
    out = {}
    for mangled, short in names.items():
        entry = dict(res.get(mangled, {}))
        if mangled in funcs:
            entry.update(analyze_sass(funcs[mangled]))
        entry["mangled"] = mangled
        out[short] = entry
    return out


def case_rows(kernels: dict[str, dict], cases=None) -> list[dict]:
    rows = []
    for case, name, threads, smem in cases or default_cases():
        k = kernels.get(name)
        if k is None:
            rows.append(dict(case=case, kernel=name, error="not in the build"))
            continue
        occ = occupancy(threads, k["regs"], smem)
        rows.append(dict(
            case=case, kernel=name, regs=k["regs"], stack=k["stack"], spill=k["spill_stores"] + k["spill_loads"],
            ldg=widths(k["ldg"]), stg=widths(k["stg"]), atomics=k["atomics"], local=k["local"],
            load_batch=k["load_batch"], threads=threads, smem_kb=round(smem / 1024, 1),
            occupancy=round(occ["occupancy"], 3), limit=occ["limit"],
            batch_bytes=k["batch_bytes"], kb_in_flight=round(occ["warps"] * 32 * k["batch_bytes"] / 1024, 1)))
    return rows


COLUMNS = ["case", "kernel", "regs", "stack", "spill", "ldg", "stg", "atomics", "local", "load_batch", "batch_bytes",
           "threads", "smem_kb", "occupancy", "limit", "kb_in_flight"]
ALL_COLUMNS = ["kernel", "regs", "stack", "spill", "ldg", "stg", "atomics", "local", "load_batch", "batch_bytes"]


def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="90", help="compute capability without the dot (default 90: Hopper)")
    p.add_argument("--all", action="store_true", help="also list every kernel of the build")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--save-baseline", action="store_true",
                   help="overwrite bench/baselines/cuda-static.md / .csv with this run (instead of appending to bench/out/)")
    args = p.parse_args(argv)
    kernels = analyze(args.arch)
    rows = case_rows(kernels)
    nvcc = find_nvcc()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import git_revision

    lo, hi = need_kb()
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "git": git_revision(), "nvcc": version, "nvdisasm": find_tool("nvdisasm"), "arch": f"sm_{args.arch}",
            "kernels": len(kernels),
            "with_spills": sum(1 for k in kernels.values() if k.get("spill_stores", 0) + k.get("spill_loads", 0)),
            "with_atomics": sum(1 for k in kernels.values() if k.get("atomics", 0)),
            "need_kb": f"{lo:.0f}-{hi:.0f} KB in flight per SM for an H200's 4.8 TB/s at 0.6-0.8 us (Little's law)"}
    text = (f"## bench/cuda_static.py ({info['date']})\n\n" + "\n".join(f"- {k}: {v}" for k, v in info.items())
            + "\n\n" + table(rows, COLUMNS) + "\n")
    if args.all:
        text += "\n" + table([dict(kernel=n, **{**k, "spill": k.get("spill_stores", 0) + k.get("spill_loads", 0),
                                                "ldg": widths(k.get("ldg", {})), "stg": widths(k.get("stg", {}))})
                              for n, k in sorted(kernels.items())], ALL_COLUMNS) + "\n"
    print(text)
    if not args.no_save:
        # The baseline is one keyed run, overwritten; bench/out/ keeps a log of local runs.
        out_dir, mode = (BASELINES, "w") if args.save_baseline else (RESULTS, "a")
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "cuda-static.md"), mode) as f:
            f.write(text + "\n")
        path = os.path.join(out_dir, "cuda-static.csv")
        new = mode == "w" or not os.path.exists(path)
        with open(path, mode, newline="") as f:
            w = csv.DictWriter(f, fieldnames=["date", "git", "arch", *COLUMNS, "error"], extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerows({"date": info["date"], "git": info["git"], "arch": info["arch"], **r} for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The CUDA mixture NLL's lane-per-element schedule against the default schedules, interleaved in one process.

    python bench/bench_cuda_schedules.py [--repeat 20] [--quick] [--no-save]
    python bench/bench_cuda_schedules.py --device cpu --quick --no-save    # plumbing only (the switch is CUDA's)

``physmdn._C.set_cuda_lanes_schedule(True)`` sends contiguous inputs with D <= 32 and K Dp <= 256 (Dp: D rounded up
to a power of two) to the lane-per-element kernel (G lanes per sample, loads straight into registers, shuffles for the sums over D
and K; csrc/cuda/backend.cuh); off, they take the tiled thread-per-sample kernel (K < 16) or the warp-per-sample
one. Each round calls both settings, alternating, so their ratio is not skewed by drift. Timed, per shape and dtype:
``fwd`` (the op without gradients), ``fwd+grads`` (the op with gradients: the kernel the eager forward + backward
runs) and ``train`` (``physmdn.mixture_nll(..., reduction="mean")`` + ``torch.autograd.grad``, end to end).
``GB/s`` counts the bytes the pass must move at least (inputs read once; with gradients, the gradients written
once) over the lane schedule's median; ``%copy`` against ``dst.copy_(src)`` measured in the same run. Before
timing, each shape checks that the two schedules agree (``max_rel_diff``, loss and gradients); a disagreement
beyond 1e-4 (float32) is reported as ``MISMATCH`` and the script exits non-zero.
"""

from __future__ import annotations

import sys

import torch

import physmdn

from _common import (RESULTS_DIR, base_parser, copy_bandwidth, format_table, machine_info, timeit_interleaved,
                     with_cuda_lanes, write_results)

COLUMNS = ["shape", "dtype", "pass", "default_ms", "lanes_ms", "default_p20_p80", "lanes_p20_p80", "lanes_speedup",
           "lanes_GB/s", "lanes_%copy", "max_rel_diff"]
SHAPES = [(4194304, 8, 4), (1048576, 8, 4), (1048576, 8, 1), (1048576, 8, 8), (1048576, 4, 16), (1048576, 16, 4),
          (1048576, 3, 4), (1048576, 8, 3), (65536, 8, 4)]
QUICK = [(4194304, 8, 4), (1048576, 8, 4), (1048576, 16, 4), (1048576, 8, 3)]


def _inputs(B, K, D, dtype, device):
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(B, K, generator=g), torch.randn(B, K, D, generator=g),
         0.3 * torch.randn(B, K, D, generator=g) - 0.3, torch.randn(B, D, generator=g)]
    return [t.to(device=device, dtype=dtype) for t in x]


def _max_rel_diff(a, b) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        if x.numel() == 0:
            continue
        x, y = x.double(), y.double()
        scale = y.abs().max().clamp_min(1e-30)
        worst = max(worst, ((x - y).abs().max() / scale).item())
    return worst


def main(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--quick", action="store_true", help="three shapes, float32 only")
    p.add_argument("--results-dir", default=RESULTS_DIR)
    args = p.parse_args(argv)
    dev = args.device
    if dev == "cpu":  # the dry run: tiny sizes, both settings take the same CPU kernel
        shapes, dtypes = [(4096, 8, 4)], [torch.float32]
    else:
        shapes = QUICK if args.quick else SHAPES
        dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    copy = copy_bandwidth(dev, 256 * 2**20 if dev != "cpu" else 16 * 2**20)
    print(f"copy bandwidth {copy['gb_s']:.1f} GB/s", flush=True)
    fwd = torch.ops.physmdn.mixture_nll_fwd
    rows, mismatch = [], False
    for (B, K, D) in shapes:
        for dtype in dtypes:
            if dtype != torch.float32 and (B, K, D) != shapes[0]:
                continue
            x = _inputs(B, K, D, dtype, dev)
            leaves = [t.detach().requires_grad_(True) for t in x]

            def train():
                loss = physmdn.mixture_nll(*leaves, reduction="mean")
                return (loss, *torch.autograd.grad(loss, leaves))

            # agreement first (loss, saved and gradients of the op; the end-to-end gradients)
            diff = max(_max_rel_diff(with_cuda_lanes(True, fwd)(*x, True, 1.0), with_cuda_lanes(False, fwd)(*x, True, 1.0)),
                       _max_rel_diff(with_cuda_lanes(True, train)(), with_cuda_lanes(False, train)()))
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            if diff > tol:
                mismatch = True
            elem = x[0].element_size()
            inputs_bytes = (B * K + 2 * B * K * D + B * D) * elem
            grads_bytes = (B * K + 2 * B * K * D + B * D) * elem  # (returned in the input dtype)
            passes = {"fwd": (lambda: fwd(*x, False, 1.0), inputs_bytes + B * elem),
                      "fwd+grads": (lambda: fwd(*x, True, 1.0), inputs_bytes + grads_bytes),
                      "train": (train, inputs_bytes + grads_bytes)}
            for name, (fn, nbytes) in passes.items():
                stats = timeit_interleaved({"default": with_cuda_lanes(False, fn), "lanes": with_cuda_lanes(True, fn)}, dev,
                                           repeat=args.repeat)
                d, l = stats["default"], stats["lanes"]
                if "error" in d or "error" in l:
                    print(f"{name}: error {d.get('error', '')} {l.get('error', '')}", flush=True)
                    mismatch = True
                    continue
                gbs = nbytes / (l["median_ms"] * 1e-3) / 1e9
                rows.append({
                    "shape": f"B={B} K={K} D={D}", "dtype": str(dtype).replace("torch.", ""), "pass": name,
                    "default_ms": d["median_ms"], "lanes_ms": l["median_ms"],
                    "default_p20_p80": f"{d['p20_ms']:.3g}/{d['p80_ms']:.3g}",
                    "lanes_p20_p80": f"{l['p20_ms']:.3g}/{l['p80_ms']:.3g}",
                    "lanes_speedup": d["median_ms"] / l["median_ms"], "lanes_GB/s": gbs,
                    "lanes_%copy": 100 * gbs / copy["gb_s"],
                    "max_rel_diff": f"{diff:.2e}" + (" MISMATCH" if diff > tol else "")})
                print(format_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
            del x, leaves
            if dev != "cpu":
                torch.cuda.empty_cache()
    notes = (f"copy bandwidth {copy['gb_s']:.1f} GB/s; lanes_speedup = default_ms / lanes_ms (> 1: the lane "
             "schedule is faster); GB/s: the bytes the pass must move at least over lanes_ms")
    if args.no_save:
        print(format_table(rows, COLUMNS))
        print(notes)
    else:
        write_results("CUDA mixture NLL: lane-per-element schedule vs default", dev, machine_info(dev), rows,
                      COLUMNS, notes, args.results_dir)
    if mismatch:
        print("the two schedules disagree (MISMATCH) or one failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

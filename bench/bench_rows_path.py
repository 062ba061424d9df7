"""The AVX2 mixture NLL's row-wise path against its lane path, interleaved in one process (CPU).

    python bench/bench_rows_path.py [--repeat 30] [--no-save]

For D in {1, 2, 4} with K D a multiple of 8, or D a multiple of 8, the float kernel works on each sample's [K, D] rows
as they lie in memory (8 / D components per vector, or D / 8 vectors per component);
``physmdn._C.set_cpu_rows_path(False)`` sends those shapes down the lane path (8
samples transposed into lanes, every input and gradient through 8x8 transposes). Each round calls both, alternating
the setting, so background load hits both alike. Timed: the op alone, ``mixture_nll_fwd`` with gradients (the
kernel the eager forward + backward runs) and without (the forward alone), float32 and bfloat16, over shapes.
``rows_speedup`` = lane time / row time (> 1: the row-wise path is faster).
"""

from __future__ import annotations

import torch

import physmdn

from _common import base_parser, format_table, machine_info, timeit_interleaved, write_results

COLUMNS = ["shape", "dtype", "pass", "threads", "lanes_ms", "rows_ms", "lanes_p20_p80", "rows_p20_p80", "rows_speedup"]
SHAPES = [(65536, 8, 4), (65536, 8, 1), (65536, 16, 2), (32768, 8, 8), (16384, 8, 16), (8192, 8, 32), (16384, 32, 4),
          (4096, 8, 4)]


def main(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.device != "cpu":
        raise SystemExit("bench_rows_path.py: a CPU benchmark (--device cpu)")
    if "avx2" not in physmdn.build_info()["cpu_kernels"] or physmdn._C.cpu_isa() != "avx2":
        raise SystemExit("bench_rows_path.py: needs the AVX2 kernels (this build or CPU has none)")
    if args.threads:
        torch.set_num_threads(args.threads)
    fwd = torch.ops.physmdn.mixture_nll_fwd
    rows = []
    for (B, K, D) in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            if dtype == torch.bfloat16 and (B, K, D) != (65536, 8, 4):
                continue
            g = torch.Generator().manual_seed(0)
            x = [torch.randn(B, K, generator=g), torch.randn(B, K, D, generator=g),
                 0.3 * torch.randn(B, K, D, generator=g), torch.randn(B, D, generator=g)]
            x = [t.to(dtype) for t in x]
            for grad in (True, False):
                def call(on):
                    def run():
                        physmdn._C.set_cpu_rows_path(on)
                        try:
                            return fwd(*x, grad)
                        finally:
                            physmdn._C.set_cpu_rows_path(True)
                    return run
                stats = timeit_interleaved({"lanes": call(False), "rows": call(True)}, "cpu", repeat=args.repeat)
                lanes, rws = stats["lanes"], stats["rows"]
                rows.append({
                    "shape": f"B={B} K={K} D={D}", "dtype": str(dtype).replace("torch.", ""),
                    "pass": "fwd with grads" if grad else "fwd", "threads": torch.get_num_threads(),
                    "lanes_ms": lanes["median_ms"], "rows_ms": rws["median_ms"],
                    "lanes_p20_p80": f"{lanes['p20_ms']:.3g}/{lanes['p80_ms']:.3g}",
                    "rows_p20_p80": f"{rws['p20_ms']:.3g}/{rws['p80_ms']:.3g}",
                    "rows_speedup": lanes["median_ms"] / rws["median_ms"]})
                print(format_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    notes = ("the op alone (torch.ops.physmdn.mixture_nll_fwd), the two paths interleaved call by call; "
             "rows_speedup = lanes_ms / rows_ms")
    if args.no_save:
        print(format_table(rows, COLUMNS)); print(notes)
    else:
        write_results("AVX2 mixture NLL: row-wise path vs lane path", "cpu", machine_info("cpu"), rows, COLUMNS,
                      notes)


if __name__ == "__main__":
    main()

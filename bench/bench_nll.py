"""Benchmark physmdn.mixture_nll against the eager reference, torch.compile of it and torch.distributions.

    python bench/bench_nll.py [--device cpu|cuda] [--B 65536 --K 8 --D 4] [--sweep 1024,16384,262144]

Prints one table (median, p20/p80, peak memory, physmdn speedup) with machine and versions, and appends
it to bench/results/<machine>.md / .csv.
"""

from __future__ import annotations

import torch

import physmdn
from physmdn import reference

from _common import COLUMNS, base_parser, compare_impls, machine_info, write_results


def make_inputs_factory(B, K, D, device, dtype=torch.float32):
    def make(requires_grad):
        g = torch.Generator().manual_seed(0)
        tensors = [torch.randn(B, K, generator=g), torch.randn(B, K, D, generator=g),
                   0.3 * torch.randn(B, K, D, generator=g), torch.randn(B, D, generator=g)]
        tensors = [t.to(device=device, dtype=dtype) for t in tensors]
        for t in tensors[:3]:
            t.requires_grad_(requires_grad)
        return tensors
    return make


def main(argv=None):
    args = base_parser(__doc__).parse_args(argv)
    impls = {
        "physmdn": physmdn.mixture_nll,
        "eager": reference.mixture_nll,
        "torch.compile": torch.compile(reference.mixture_nll, dynamic=False),
        "torch.distributions": reference.mixture_nll_distributions,
    }
    shapes = [(args.B, args.K, args.D)] + [(int(b), args.K, args.D) for b in args.sweep.split(",") if b]
    rows = []
    for B, K, D in shapes:
        rows += compare_impls(impls, make_inputs_factory(B, K, D, args.device), args.device, f"B={B} K={K} D={D}",
                              repeat=args.repeat, memory=not args.no_memory)
    info = machine_info(args.device)
    main_rows = [r for r in rows if r["shape"] == f"B={args.B} K={args.K} D={args.D}" and r["pass"] == "fwd+bwd"]
    summary = ", ".join(f"{r['impl']} {r['physmdn_speedup']:.2f}x" for r in main_rows if r["impl"] != "physmdn")
    notes = f"physmdn forward+backward speedup at B={args.B}, K={args.K}, D={args.D}: {summary}"
    if args.no_save:
        from _common import format_table
        print(format_table(rows, COLUMNS)); print(notes)
    else:
        write_results("mixture_nll", args.device, info, rows, COLUMNS, notes)
    return rows


if __name__ == "__main__":
    main()

"""Benchmark physmdn.mixture_nll against the eager reference, torch.compile of it and torch.distributions.

    python bench/bench_nll.py [--device cpu|cuda] [--B 65536 --K 8 --D 4] [--sweep 1024,16384,262144]

Prints one table (median, p20/p80, peak memory, physmdn speedup) with machine and versions, and appends
it to bench/results/<machine>.md / .csv.
"""

from __future__ import annotations

# _common first: it sets the profiler's log level before torch loads
from _common import COLUMNS, base_parser, compare_impls, format_table, machine_info, write_results
from _impls import implementations, make_inputs, requires_grad_copy


def make_inputs_factory(B, K, D, device, dtype=None):
    def make(requires_grad):
        kw = {} if dtype is None else {"dtype": dtype}
        inputs = make_inputs("nll", B, K, D, device=device, dynamic_batch=False, **kw)
        return requires_grad_copy(inputs, dynamic_batch=False) if requires_grad else inputs
    return make


def main(argv=None):
    args = base_parser(__doc__).parse_args(argv)
    impls = implementations("nll", compile_dynamic=False)
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
        print(format_table(rows, COLUMNS)); print(notes)
    else:
        write_results("mixture_nll", args.device, info, rows, COLUMNS, notes)
    return rows


if __name__ == "__main__":
    main()

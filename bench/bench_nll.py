"""Benchmark physmdn.mixture_nll against the eager reference, torch.compile of it and torch.distributions.

    python bench/bench_nll.py [--device cpu|cuda] [--B 65536 --K 8 --D 4] [--sweep 1024,16384,262144]
                              [--layout contiguous|split|broadcast|isotropic]

--layout: how the inputs are laid out, the same for every implementation. ``contiguous``: four tensors.
``split``: logits, means and log-scales are views split from one ``[B, K + 2 K D]`` head output (row-strided),
differentiated through the head. ``broadcast``: a homoscedastic MDN, one ``[K, D]`` log-scale parameter expanded
over the batch (stride 0) and differentiated as the parameter. ``isotropic``: one log-scale per component,
``[B, K, 1]`` expanded over D (the classic MDN of spherical Gaussians).

Prints one table (median, p20/p80, peak memory, physmdn speedup) with machine and versions, and appends
it to bench/out/<machine>.md / .csv (ignored by git).
"""

from __future__ import annotations

# _common first: it sets the profiler's log level before torch loads
from _common import COLUMNS, base_parser, compare_impls, format_table, machine_info, write_results
from _impls import implementations, make_inputs, requires_grad_copy

import torch

LAYOUTS = ("contiguous", "split", "broadcast", "isotropic")


def make_inputs_factory(B, K, D, device, dtype=None, layout="contiguous"):
    def make(requires_grad):
        kw = {} if dtype is None else {"dtype": dtype}
        inputs = make_inputs("nll", B, K, D, device=device, dynamic_batch=False, **kw)
        if layout == "split":  # [head, target]
            inputs = [torch.cat([inputs[0], inputs[1].reshape(B, -1), inputs[2].reshape(B, -1)], dim=1), inputs[3]]
        elif layout == "broadcast":  # [logits, means, log-scale parameter [K, D], target]
            inputs[2] = inputs[2][0].clone()
        elif layout == "isotropic":  # [logits, means, log-scales [B, K, 1], target]
            inputs[2] = inputs[2][..., :1].clone()
        if not requires_grad:
            return inputs
        leaves = [t.detach().requires_grad_(i < len(inputs) - 1) for i, t in enumerate(inputs)]
        return leaves if layout != "contiguous" else requires_grad_copy(inputs, dynamic_batch=False)
    return make


def with_layout(fn, K, D, layout):
    """``fn(logits, means, log_scales, target)`` on the layout's inputs."""
    if layout == "split":
        def split(head, target):
            lg, mu, ls = torch.split(head, [K, K * D, K * D], dim=1)
            return fn(lg, mu.view(-1, K, D), ls.view(-1, K, D), target)
        return split
    if layout in ("broadcast", "isotropic"):
        return lambda lg, mu, scale, target: fn(lg, mu, scale.expand(mu.shape), target)
    return fn


def main(argv=None):
    parser = base_parser(__doc__)
    parser.add_argument("--layout", choices=LAYOUTS, default="contiguous")
    args = parser.parse_args(argv)
    impls = {name: with_layout(fn, args.K, args.D, args.layout)
             for name, fn in implementations("nll", compile_dynamic=False).items()}
    shapes = [(args.B, args.K, args.D)] + [(int(b), args.K, args.D) for b in args.sweep.split(",") if b]
    rows = []
    for B, K, D in shapes:
        shape = f"B={B} K={K} D={D}" + ("" if args.layout == "contiguous" else f" {args.layout}")
        rows += compare_impls(impls, make_inputs_factory(B, K, D, args.device, layout=args.layout), args.device,
                              shape, repeat=args.repeat, memory=not args.no_memory)
    info = machine_info(args.device)
    main_rows = [r for r in rows if r["shape"].startswith(f"B={args.B} K={args.K} D={args.D}") and r["pass"] == "fwd+bwd"]
    summary = ", ".join(f"{r['impl']} {r['physmdn_speedup']:.2f}x" for r in main_rows if r["impl"] != "physmdn")
    notes = f"physmdn forward+backward speedup at B={args.B}, K={args.K}, D={args.D} ({args.layout} inputs): {summary}"
    if args.no_save:
        print(format_table(rows, COLUMNS)); print(notes)
    else:
        write_results("mixture_nll", args.device, info, rows, COLUMNS, notes)
    return rows


if __name__ == "__main__":
    main()

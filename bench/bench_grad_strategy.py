"""Forward-computes-gradients vs recomputing backward, for physmdn.mixture_nll (which of the two is faster).

    python bench/bench_grad_strategy.py [--B 65536 --K 8 --D 4] [--device cpu|cuda]

* ``forward-grad``: the forward (``compute_grad=True``) also writes the gradients for a unit upstream gradient
  in the same pass; the backward scales them in place (what ``physmdn.mixture_nll`` does).
* ``recompute``: the forward saves three numbers per sample; the backward (``mixture_nll_bwd``) recomputes the
  per-component densities in one fused pass.
"""

from __future__ import annotations

import torch

import physmdn  # noqa: F401  (loads the ops)

from _common import base_parser, format_table, machine_info, peak_memory_bytes, timeit, write_results

COLUMNS = ["shape", "impl", "pass", "median_ms", "p20_ms", "p80_ms", "peak_mb", "physmdn_speedup"]


def main(argv=None):
    args = base_parser(__doc__).parse_args(argv)
    B, K, D, device = args.B, args.K, args.D, args.device
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(B, K, generator=g), torch.randn(B, K, D, generator=g),
              0.3 * torch.randn(B, K, D, generator=g), torch.randn(B, D, generator=g)]
    inputs = [t.to(device).requires_grad_(i < 3) for i, t in enumerate(inputs)]

    def run(compute_grad):
        def call():
            loss = torch.ops.physmdn.mixture_nll_fwd(*inputs, compute_grad)[0]
            return torch.autograd.grad(loss.mean(), inputs[:3])
        return call

    rows = []
    results = {}
    for name, flag in (("forward-grad", True), ("recompute", False)):
        stats = timeit(run(flag), device, repeat=args.repeat)
        stats["peak_mb"] = peak_memory_bytes(run(flag), device) / 2**20
        results[name] = stats
    for name, stats in results.items():
        rows.append({"shape": f"B={B} K={K} D={D}", "impl": name, "pass": "fwd+bwd", **stats,
                     "physmdn_speedup": stats["median_ms"] / results["forward-grad"]["median_ms"]})
    notes = ("forward-grad is the strategy physmdn.mixture_nll uses; physmdn_speedup of the recompute row = its "
             "time / forward-grad's time")
    if args.no_save:
        print(format_table(rows, COLUMNS)); print(notes)
    else:
        write_results("mixture_nll gradient strategy", device, machine_info(device), rows, COLUMNS, notes)


if __name__ == "__main__":
    main()

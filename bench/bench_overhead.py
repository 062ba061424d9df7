"""Where an eager forward + backward of ``physmdn.mixture_nll`` spends its time around the kernel. One process, the
stages interleaved in rounds (a change in background load hits all alike), per batch size:

- ``kernel``: ``torch.ops.physmdn.mixture_nll_fwd`` with gradients, below autograd (the kernel and its outputs);
- ``forward``: ``physmdn.mixture_nll`` on inputs that require grad (input test, the C++ autograd node);
- ``forward+sum``: the same and ``.sum()`` (the other benchmarks' protocol);
- ``fwd+bwd``: ``torch.autograd.grad`` of that sum (the benchmarks' forward + backward);
- ``fwd+bwd mean``: ``reduction="mean"`` (reduced inside the node) and ``torch.autograd.grad``;
- ``engine floor``: ``torch.autograd.grad`` through a one-node graph (``x.view(-1)`` of a ``[B, K]`` leaf): what
  torch's autograd costs any op, here with warm caches.

``over_kernel_ms`` is a stage's median less the kernel's. The kernel flushes the caches at large batches, so the
Python and autograd code after it runs cold: compare ``engine floor`` with the overhead of the other stages.

    python bench/bench_overhead.py [--B 65536 --sweep 256,4096] [--K 8 --D 4] [--repeat 200] [--no-save]
"""

from __future__ import annotations

from _common import base_parser, format_table, machine_info, timeit_interleaved, write_results

import torch

import physmdn

COLUMNS = ["shape", "stage", "median_ms", "p20_ms", "p80_ms", "over_kernel_ms", "n"]


def stages(B: int, K: int, D: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    logits, means = torch.randn(B, K, generator=g), torch.randn(B, K, D, generator=g)
    log_scales, target = 0.3 * torch.randn(B, K, D, generator=g) - 0.5, torch.randn(B, D, generator=g)
    logits, means, log_scales, target = (t.to(device) for t in (logits, means, log_scales, target))
    diff = [t.requires_grad_(True) for t in (logits, means, log_scales)]
    args = (logits, means, log_scales, target)
    op = torch.ops.physmdn.mixture_nll_fwd.default
    leaf = torch.randn(B, K, device=device, requires_grad=True)
    flat_grad = torch.ones(B * K, device=device)

    def kernel():
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args, True, 1.0)

    return {
        "kernel": kernel,
        "forward": lambda: physmdn.mixture_nll(*args),
        "forward+sum": lambda: physmdn.mixture_nll(*args).sum(),
        "fwd+bwd": lambda: torch.autograd.grad(physmdn.mixture_nll(*args).sum(), diff),
        "fwd+bwd mean": lambda: torch.autograd.grad(physmdn.mixture_nll(*args, reduction="mean"), diff),
        "engine floor": lambda: torch.autograd.grad(leaf.view(-1), [leaf], flat_grad),
    }


def main(argv=None):
    p = base_parser(__doc__)
    p.set_defaults(repeat=200)
    args = p.parse_args(argv)
    rows = []
    for B in [args.B] + [int(b) for b in args.sweep.split(",") if b]:
        calls = stages(B, args.K, args.D, args.device)
        stats = timeit_interleaved(calls, args.device, warmup=5, repeat=args.repeat, max_time=3.0)
        kernel_ms = stats["kernel"].get("median_ms", float("nan"))
        for name in calls:
            s = stats[name]
            over = s.get("median_ms", float("nan")) - kernel_ms if name not in ("kernel", "engine floor") else float("nan")
            rows.append({"shape": f"B={B} K={args.K} D={args.D}", "stage": name, **s, "over_kernel_ms": over})
    notes = ("over_kernel_ms: the stage's median less the kernel's. engine floor: a one-node autograd.grad with warm "
             "caches (what torch's autograd costs any op).")
    if args.no_save:
        print(format_table(rows, COLUMNS) + "\n\n" + notes)
    else:
        write_results("eager overhead around mixture_nll", args.device, machine_info(args.device), rows, COLUMNS,
                      notes)
    return rows


if __name__ == "__main__":
    main()

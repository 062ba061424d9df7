"""torch.func over ``physmdn.mixture_nll`` (python/physmdn/_func.py): N examples of a batch of B, each with its own
mixture, the mean NLL per example. One process, the implementations interleaved in rounds:

- ``vmap fwd``: ``torch.func.vmap`` of the forward (the batching rule folds N into the batch: one kernel call);
- ``loop fwd``: the same N forwards one by one;
- ``vmap(grad)``: per-example gradients with respect to logits, means and log-scales in one call;
- ``loop autograd.grad``: the same N gradients one by one through the eager path (C++ autograd node);
- ``vmap(grad) ref``: ``vmap(grad)`` of the plain-torch reference (what a user without the ops would run).

    python bench/bench_func.py [--N 16 --B 4096 --K 8 --D 4] [--repeat 20] [--no-save]
"""

from __future__ import annotations

import warnings

from _common import base_parser, format_table, machine_info, timeit_interleaved, write_results

import torch
from torch.func import grad, vmap

import physmdn
from physmdn import reference

COLUMNS = ["shape", "impl", "median_ms", "p20_ms", "p80_ms", "n", "vs_loop"]


def calls(N: int, B: int, K: int, D: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(N, B, K, generator=g), torch.randn(N, B, K, D, generator=g),
         0.3 * torch.randn(N, B, K, D, generator=g) - 0.5, torch.randn(N, B, D, generator=g)]
    x = [t.to(device) for t in x]

    def f(*a):
        return physmdn.mixture_nll(*a, reduction="mean")

    def f_ref(*a):
        return reference.mixture_nll(*a).mean()

    def loop_fwd():
        return torch.stack([f(*(t[n] for t in x)) for n in range(N)])

    def loop_grad():
        out = []
        for n in range(N):
            leaves = [t[n].detach().requires_grad_(i < 3) for i, t in enumerate(x)]
            out.append(torch.autograd.grad(f(*leaves), leaves[:3]))
        return out

    return {
        "vmap fwd": lambda: vmap(f)(*x),
        "loop fwd": loop_fwd,
        "vmap(grad)": lambda: vmap(grad(f, argnums=(0, 1, 2)))(*x),
        "loop autograd.grad": loop_grad,
        "vmap(grad) ref": lambda: vmap(grad(f_ref, argnums=(0, 1, 2)))(*x),
    }


def main(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--N", type=int, default=16, help="examples mapped over")
    p.set_defaults(B=4096)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")  # (none expected from physmdn: tests/ops/test_func.py checks for fallbacks)
    stats = timeit_interleaved(calls(args.N, args.B, args.K, args.D, args.device), args.device, warmup=2,
                               repeat=args.repeat, max_time=3.0)
    shape = f"N={args.N} B={args.B} K={args.K} D={args.D}"
    loop = {"vmap fwd": "loop fwd", "vmap(grad)": "loop autograd.grad", "vmap(grad) ref": "loop autograd.grad"}
    rows = []
    for name, s in stats.items():
        base = stats.get(loop.get(name, ""), {}).get("median_ms", float("nan"))
        rows.append({"shape": shape, "impl": name, **s, "vs_loop": base / s.get("median_ms", float("nan"))})
    notes = "vs_loop: the matching loop's median over this one's (> 1: faster than the loop)."
    if args.no_save:
        print(format_table(rows, COLUMNS) + "\n\n" + notes)
    else:
        write_results("torch.func over mixture_nll", args.device, machine_info(args.device), rows, COLUMNS, notes)
    return rows


if __name__ == "__main__":
    main()

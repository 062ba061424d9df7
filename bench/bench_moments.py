"""The fused loss in each penalty moment and weight coupling against the second moment with coupled weights, per
family, in the same run (interleaved rounds, so that background load hits every variant alike); with eager
torch and torch.compile of the float64-capable reference in the same moment as the yardstick.

    python bench/bench_moments.py [--device cpu|cuda] [--B 65536 --K 8 --D 4 --J 3] [--families polynomial,linear,stencil]

Forward + backward (``loss.sum()`` then ``autograd.grad`` with respect to logits, means and log-scales).
``ratio``: median time over the second-moment coupled kernel's (below 1: faster).
"""

from __future__ import annotations

# _common first: it sets the profiler's log level before torch loads
from _common import base_parser, format_table, machine_info, timeit_interleaved, write_results

import torch

from physmdn import physics as P
from physmdn.reference import mixture_nll as reference_nll

VARIANTS = [("second", "coupled"), ("second", "detached"), ("first", "coupled"), ("first", "detached"),
            ("point", "coupled"), ("point", "detached")]


def make_spec(family, coeff, D, moment):
    if family == "polynomial":
        return P.Polynomial(coeff, moment=moment, noise_scale=0.1)
    if family == "linear":
        return P.Linear(coeff[..., :2, :D].expand(-1, -1, 2, D).contiguous(), coeff[..., 0, :2], moment=moment,
                        noise_scale=0.1)
    return P.Stencil1D(0.1, coeff[:, :, 0, :], spacing=0.5, moment=moment, noise_scale=0.1)


def main(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--J", type=int, default=3)
    p.add_argument("--families", default="polynomial,linear,stencil")
    p.add_argument("--no-reference", action="store_true", help="skip eager / torch.compile")
    args = p.parse_args(argv)
    B, K, D, J, device = args.B, args.K, args.D, args.J, args.device
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(B, K, generator=g), torch.randn(B, K, D, generator=g),
            0.3 * torch.randn(B, K, D, generator=g) - 1.0, torch.randn(B, D, generator=g)]
    coeff = (0.3 * torch.randn(B, K, 1, max(J + 1, 2), generator=g)).to(device)
    inputs = [t.to(device).requires_grad_(i < 3) for i, t in enumerate(base)]
    rows = []
    for family in args.families.split(","):
        calls = {}
        for moment, coupling in VARIANTS:
            spec = make_spec(family, coeff, D, moment)

            def fused(spec=spec, coupling=coupling):
                loss = P.mdn_loss(*inputs, physics=spec, weight=0.5, reduction="sum", coupling=coupling)
                return torch.autograd.grad(loss, inputs[:3])

            calls[f"physmdn {moment}-{coupling}"] = fused
            if args.no_reference or coupling != "detached":
                continue

            def eager(spec=spec):
                loss = (reference_nll(*inputs) + 0.5 * P.physics_penalty(*inputs[:3], spec, coupling="detached")).sum()
                return torch.autograd.grad(loss, inputs[:3])

            calls[f"eager {moment}-detached"] = eager
            calls[f"torch.compile {moment}-detached"] = torch.compile(eager, dynamic=False)
        stats = timeit_interleaved(calls, device, warmup=3, repeat=args.repeat)
        ref = stats["physmdn second-coupled"].get("median_ms")
        for name, st in stats.items():
            if "error" in st:
                rows.append({"shape": f"B={B} K={K} D={D} J={J} {family}", "impl": name, "median_ms": st["error"]})
                continue
            rows.append({"shape": f"B={B} K={K} D={D} J={J} {family}", "impl": name,
                         "median_ms": round(st["median_ms"], 3), "p20_ms": round(st["p20_ms"], 3),
                         "p80_ms": round(st["p80_ms"], 3), "ratio": round(st["median_ms"] / ref, 3)})
    columns = ["shape", "impl", "median_ms", "p20_ms", "p80_ms", "ratio"]
    notes = "fwd+bwd; ratio: median over the physmdn second-coupled kernel's in the same run"
    if args.no_save:
        print(format_table(rows, columns)); print(notes)
    else:
        write_results("mdn_loss_moments", device, machine_info(device), rows, columns, notes)
    return rows


if __name__ == "__main__":
    main()

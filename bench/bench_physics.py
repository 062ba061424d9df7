"""Benchmark the fused MDN loss (mixture NLL + pi-weighted exact polynomial penalty) against the eager
composition (reference NLL + plain-torch penalty) and torch.compile of it.

    python bench/bench_physics.py [--device cpu|cuda] [--B 65536 --K 8 --D 4 --J 3] [--family polynomial|linear|stencil]
                                  [--coeff-grad] [--coeff-layout per_sample_component|per_sample|shared]

--coeff-grad: the family's coefficients are one learnable ``[1, K, 1, J + 1]`` tensor (an inverse problem: laws
identified from data), differentiated in the forward + backward pass; otherwise they are data laid out by
--coeff-layout: component-specific ``[B, K, 1, J + 1]`` (the default), per sample and shared by the components
``[B, 1, 1, J + 1]`` (a context-dependent law, as the pitchfork's: ``--D 1 --coeff-layout per_sample``) or one law
for all ``[1, 1, 1, J + 1]``.
"""

from __future__ import annotations

# _common first: it sets the profiler's log level before torch loads
from _common import COLUMNS, base_parser, compare_impls, format_table, machine_info, write_results

import torch

from physmdn import physics as P
from physmdn.reference import mixture_nll as reference_nll


# (batch, component) extent of the data coefficients [., ., 1, J + 1]
LAYOUTS = {"per_sample_component": lambda B, K: (B, K), "per_sample": lambda B, K: (B, 1),
           "shared": lambda B, K: (1, 1)}


def make_spec(family, coeff, B, K, D, J):
    if family == "polynomial":
        return P.Polynomial(coeff)
    if family == "linear":
        return P.Linear(coeff[..., :2, :D].expand(-1, -1, 2, D).contiguous(), coeff[..., 0, :2])
    return P.Stencil1D(0.1, coeff[:, :, 0, :], spacing=0.5)


def main(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--J", type=int, default=3)
    p.add_argument("--family", default="polynomial", choices=["polynomial", "linear", "stencil"])
    p.add_argument("--coeff-grad", action="store_true", help="learnable [1, K, 1, J + 1] coefficients")
    p.add_argument("--coeff-layout", default="per_sample_component", choices=list(LAYOUTS),
                   help="batch and component extent of the (data) coefficients")
    args = p.parse_args(argv)
    if args.coeff_layout != "per_sample_component" and (args.coeff_grad or args.family != "polynomial"):
        p.error("--coeff-layout applies to the polynomial family's data coefficients (without --coeff-grad)")
    B, K, D, J, device = args.B, args.K, args.D, args.J, args.device

    def coeff_extent(B):
        return (1, K) if args.coeff_grad else LAYOUTS[args.coeff_layout](B, K)

    def make_inputs_factory(B):
        def make(requires_grad):
            g = torch.Generator().manual_seed(0)
            ts = [torch.randn(B, K, generator=g), torch.randn(B, K, D, generator=g),
                  0.3 * torch.randn(B, K, D, generator=g) - 1.0, torch.randn(B, D, generator=g),
                  0.3 * torch.randn(*coeff_extent(B), 1, max(J + 1, 2), generator=g)]
            ts = [t.to(device) for t in ts]
            for t in ts[:3] + (ts[4:] if args.coeff_grad else []):
                t.requires_grad_(requires_grad)
            return ts
        return make

    def fused(logits, means, log_scales, target, coeff):
        return P.mdn_loss(logits, means, log_scales, target, physics=make_spec(args.family, coeff, B, K, D, J),
                          weight=0.5, reduction="none")

    def eager(logits, means, log_scales, target, coeff):
        spec = make_spec(args.family, coeff, B, K, D, J)
        return reference_nll(logits, means, log_scales, target) + 0.5 * P.physics_penalty(logits, means, log_scales, spec)

    impls = {"physmdn": fused, "eager": eager, "torch.compile": torch.compile(eager, dynamic=False)}
    shapes = [B] + [int(b) for b in args.sweep.split(",") if b]
    rows = []
    for b in shapes:
        B = b
        shape = f"B={b} K={K} D={D} J={J} {args.family}" + (" coeff-grad" if args.coeff_grad else "") + (
            "" if args.coeff_layout == "per_sample_component" else f" coeffs {list(coeff_extent(b))}")
        rows += compare_impls(impls, make_inputs_factory(b), device, shape,
                              repeat=args.repeat, memory=not args.no_memory)
    main_rows = [r for r in rows if r["shape"].startswith(f"B={shapes[0]} ") and r["pass"] == "fwd+bwd"]
    notes = "fused physics loss forward+backward speedup: " + ", ".join(
        f"{r['impl']} {r['physmdn_speedup']:.2f}x" for r in main_rows if r["impl"] != "physmdn")
    if args.no_save:
        print(format_table(rows, COLUMNS)); print(notes)
    else:
        name = f"mdn_loss_{args.family}" + ("_coeff_grad" if args.coeff_grad else "") + (
            "" if args.coeff_layout == "per_sample_component" else f"_{args.coeff_layout}")
        write_results(name, device, machine_info(device), rows, COLUMNS, notes)
    return rows


if __name__ == "__main__":
    main()

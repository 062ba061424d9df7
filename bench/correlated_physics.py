"""Benchmark the fused physics penalty of correlated components against its torch formulas (eager and torch.compile).

    python bench/correlated_physics.py [--device cpu|cuda] [--B 65536 --K 8] [--cases stencil-tril,...]
                                       [--repeat 10] [--no-compile] [--results-dir DIR]

Per case, forward and forward + backward (``P.sum()``, then ``autograd.grad`` with respect to the means, the factor
and the diagonal) of ``P [B, K]``, one spec's penalty under ``N(mu_bk, F_bk F_bk^T + diag(c_bk))``:

* ``physmdn``: :func:`physmdn.physics_correlated.component_penalty` (the custom op
  ``torch.ops.physmdn.correlated_penalty``: fused CPU and CUDA kernels, an analytic backward op);
* ``eager torch``: :func:`physmdn.physics_correlated.reference_penalty` (the same closed forms in plain torch,
  differentiated by autograd);
* ``torch.compile``: that function under ``torch.compile(dynamic=False)``.

Cases (the problems' laws, noise-aware as ``physmdn compare`` runs them):

* ``stencil-tril``: Allen–Cahn's steady law (``Stencil1D``, second moment, noise 0.05) on a 32-point field under
  full covariance (``scale_tril [B, K, 32, 32]``);
* ``stencil-lowrank``: the same law under ``W W^T + diag`` (rank 4);
* ``polynomial-lowrank``: a cubic per coordinate (``Polynomial``, second moment), D = 32, rank 4;
* ``linear-tril``: a Rankine–Hugoniot-type law (``Linear``, one row, second moment), D = 3, full covariance.

Prints one table (median, p20/p80, peak memory, ``physmdn_speedup`` = the row's median over physmdn's, ``GB/s``,
``%copy``) with machine and versions and appends it to bench/out/<machine>.md / .csv (ignored by git). ``GB/s``
counts the bytes a pass moves at least (the means, factor and diagonal read once, ``P`` written; with the backward
also their gradients written once).
"""

from __future__ import annotations

# _common first: it sets the profiler's log level before torch loads
from _common import RESULTS_DIR, announced_copy_bandwidth, base_parser, compare_impls, report_with_copy

import torch

from physmdn import physics
from physmdn.physics_correlated import component_penalty, reference_penalty

CASES = {  # name: (spec factory, D, kind, rank)
    "stencil-tril": (lambda: physics.Stencil1D(0.01, [0.0, 1.0, 0.0, -1.0], spacing=1.0 / 31, boundary="neumann",
                                               moment="second", noise_scale=0.05), 32, "tril", 32),
    "stencil-lowrank": (lambda: physics.Stencil1D(0.01, [0.0, 1.0, 0.0, -1.0], spacing=1.0 / 31, boundary="neumann",
                                                  moment="second", noise_scale=0.05), 32, "lowrank", 4),
    "polynomial-lowrank": (lambda: physics.Polynomial([0.0, 1.0, 0.0, -1.0], moment="second", noise_scale=0.05), 32,
                           "lowrank", 4),
    "linear-tril": (lambda: physics.Linear(torch.tensor([[1.0, -0.5, -2.0]]), torch.tensor([0.1]), moment="second",
                                           noise_scale=0.05), 3, "tril", 3),
}


def pass_bytes(pass_name: str, B: int, K: int, D: int, Q: int, diag: bool, element_size: int = 4) -> int:
    elements = K * D + K * D * Q + (K * D if diag else 0)
    return B * (elements + K + (elements if pass_name != "fwd" else 0)) * element_size


def make_factory(kind, B, K, D, Q, device):
    def make(requires_grad):
        g = torch.Generator(device=device).manual_seed(0)
        kw = dict(generator=g, device=device)
        means = torch.randn(B, K, D, **kw)
        if kind == "tril":
            factor = 0.05 * torch.randn(B, K, D, D, **kw).tril(-1) + torch.diag_embed(0.05 + 0.1 * torch.rand(B, K, D, **kw))
            inputs = [means, factor, None]
        else:
            inputs = [means, 0.1 * torch.randn(B, K, D, Q, **kw), 0.01 + 0.01 * torch.rand(B, K, D, **kw)]
        return [t if t is None else t.requires_grad_(requires_grad) for t in inputs]

    return make


def main(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--results-dir", default=RESULTS_DIR)
    args = p.parse_args(argv)
    B, K, device = args.B, args.K, args.device
    copy_gb_s = announced_copy_bandwidth(device)
    rows = []
    for name in args.cases.split(","):
        factory, D, kind, Q = CASES[name]
        spec = factory()
        impls = {"physmdn": lambda m, f, d, spec=spec: component_penalty(spec, m, f, d),
                 "eager torch": lambda m, f, d, spec=spec: reference_penalty(spec, m, f, d)}
        if not args.no_compile:
            impls["torch.compile"] = torch.compile(impls["eager torch"], dynamic=False)
        shape = f"{name} B={B} K={K} D={D}" + (f" R={Q}" if kind == "lowrank" else "")
        case_rows = compare_impls(impls, make_factory(kind, B, K, D, Q, device), device, shape, repeat=args.repeat,
                                  memory=not args.no_memory)
        for r in case_rows:
            r["_bytes"] = pass_bytes(r["pass"], B, K, D, Q, kind == "lowrank")
        rows += case_rows
    report_with_copy("correlated_physics", device, rows, copy_gb_s, lambda r: r.pop("_bytes"), "", args)
    return rows


if __name__ == "__main__":
    main()

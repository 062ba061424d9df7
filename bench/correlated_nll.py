"""Benchmark the correlated-component NLL ops against torch.distributions (eager and torch.compile).

    python bench/correlated_nll.py [--device cpu|cuda] [--B 65536 --K 8] [--tril-D 8] [--lowrank-D 32 --R 4]
                                   [--kinds tril,lowrank] [--repeat 10] [--no-compile] [--results-dir DIR]

Per kind, forward and forward + backward (``loss.sum()``, then ``autograd.grad`` with respect to every input but
the target) of:

* ``physmdn``: :func:`physmdn.mixture_nll_tril` / :func:`physmdn.mixture_nll_lowrank` (custom ops with fused
  CPU and CUDA kernels and an analytic backward op);
* ``composite autograd``: the same torch math as the op's forward, differentiated by autograd (what the analytic
  backward saves);
* ``eager torch.distributions``: ``MixtureSameFamily(Categorical, MultivariateNormal(scale_tril=...))`` or
  ``LowRankMultivariateNormal``;
* ``torch.compile``: that expression under ``torch.compile(dynamic=False)``.

Prints one table (median, p20/p80, peak memory, ``physmdn_speedup`` = the row's median over physmdn's, ``GB/s``
and ``%copy``) with machine and versions, and appends it to bench/out/<machine>.md / .csv (ignored by git).
``GB/s`` counts the bytes a pass must move at least (:func:`pass_bytes`: the inputs read once and the loss written;
with the backward also the gradients written once) over the row's median; ``%copy`` is that as a percentage of
``dst.copy_(src)`` (read + write) measured in the same run. One ``key:`` line per kind and pass gives physmdn's
numbers (bench/gpu_check.sh puts them in its summary).
"""

from __future__ import annotations

# _common first: it sets the profiler's log level before torch loads
from _common import RESULTS_DIR, announced_copy_bandwidth, base_parser, compare_impls, report_with_copy

import math

import torch

import physmdn
from physmdn import reference


def composite_tril(logits, means, scale_tril, target):
    z = torch.linalg.solve_triangular(scale_tril, (target.unsqueeze(1) - means).unsqueeze(-1), upper=False)
    log_normal = (-0.5 * z.squeeze(-1).square().sum(-1) - torch.log(scale_tril.diagonal(dim1=-2, dim2=-1)).sum(-1)
                  - 0.5 * means.shape[-1] * math.log(2 * math.pi))
    return -torch.logsumexp(torch.log_softmax(logits, -1) + log_normal, -1)


def composite_lowrank(logits, means, cov_factor, cov_diag, target):
    delta = target.unsqueeze(1) - means
    scaled = cov_factor / cov_diag.unsqueeze(-1)
    capacitance = cov_factor.mT @ scaled + torch.eye(cov_factor.shape[-1], dtype=means.dtype, device=means.device)
    chol = torch.linalg.cholesky(capacitance)
    s = torch.linalg.solve_triangular(chol, scaled.mT @ delta.unsqueeze(-1), upper=False)
    mahalanobis = (delta.square() / cov_diag).sum(-1) - s.square().sum((-2, -1))
    log_det = 2 * torch.log(chol.diagonal(dim1=-2, dim2=-1)).sum(-1) + torch.log(cov_diag).sum(-1)
    log_normal = -0.5 * (mahalanobis + log_det) - 0.5 * means.shape[-1] * math.log(2 * math.pi)
    return -torch.logsumexp(torch.log_softmax(logits, -1) + log_normal, -1)


def pass_bytes(kind: str, pass_name: str, B: int, K: int, D: int, R: int, element_size: int = 4) -> int:
    """The bytes a pass moves at least: logits [B, K], means [B, K, D], the covariance parameters (scale_tril
    [B, K, D, D], or cov_factor [B, K, D, R] and cov_diag [B, K, D]) and target [B, D] read once, the loss [B] written;
    with the backward, the gradients of every input but the target written once."""
    covariance = K * D * D if kind == "tril" else K * D * R + K * D
    grads = K + K * D + covariance
    elements = grads + D + 1 + (grads if pass_name != "fwd" else 0)
    return B * elements * element_size


def make_factory(kind, B, K, D, R, device):
    def make(requires_grad):
        # drawn on the device (at B = 1M a CPU draw of the factors takes seconds per implementation and pass)
        g = torch.Generator(device=device).manual_seed(0)
        kw = dict(generator=g, device=device)
        logits = torch.randn(B, K, **kw)
        means = torch.randn(B, K, D, **kw)
        target = torch.randn(B, D, **kw)
        if kind == "tril":
            tril = 0.3 * torch.randn(B, K, D, D, **kw).tril(-1) + torch.diag_embed(0.5 + torch.rand(B, K, D, **kw))
            inputs = [logits, means, tril, target]
        else:
            inputs = [logits, means, 0.5 * torch.randn(B, K, D, R, **kw), 0.1 + torch.rand(B, K, D, **kw), target]
        return [t.requires_grad_(requires_grad and i < len(inputs) - 1) for i, t in enumerate(inputs)]

    return make


def main(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--tril-D", type=int, default=8)
    p.add_argument("--lowrank-D", type=int, default=32)
    p.add_argument("--R", type=int, default=4)
    p.add_argument("--kinds", default="tril,lowrank")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--results-dir", default=RESULTS_DIR)
    args = p.parse_args(argv)
    B, K, device = args.B, args.K, args.device
    copy_gb_s = announced_copy_bandwidth(device)
    rows = []
    for kind in args.kinds.split(","):
        if kind == "tril":
            D, R = args.tril_D, 0
            ours, composite, theirs = (physmdn.mixture_nll_tril, composite_tril,
                                       lambda *t: reference.mixture_nll_tril(*t))
            shape = f"tril B={B} K={K} D={D}"
        else:
            D, R = args.lowrank_D, args.R
            ours, composite, theirs = (physmdn.mixture_nll_lowrank, composite_lowrank,
                                       lambda *t: reference.mixture_nll_lowrank(*t))
            shape = f"lowrank B={B} K={K} D={D} R={R}"
        impls = {"physmdn": ours, "composite autograd": composite, "eager torch.distributions": theirs}
        if not args.no_compile:
            impls["torch.compile"] = torch.compile(theirs, dynamic=False)
        kind_rows = compare_impls(impls, make_factory(kind, B, K, D, R, device), device, shape, repeat=args.repeat,
                                  memory=not args.no_memory)
        for r in kind_rows:
            r["_bytes"] = pass_bytes(kind, r["pass"], B, K, D, R)
        rows += kind_rows
    report_with_copy("correlated_nll", device, rows, copy_gb_s, lambda r: r.pop("_bytes"),
                     "GB/s counts pass_bytes. mixture_nll_tril and mixture_nll_lowrank run fused kernels on the CPU and "
                     "on CUDA (other devices: torch compositions behind the custom ops).", args)
    return rows


if __name__ == "__main__":
    main()

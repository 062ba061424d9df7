"""One forward + backward of ``mixture_nll`` (float32, then bfloat16) and of the fused polynomial loss at a large
batch, after a warm-up, for a kernel profiler: the GPU check runs it under Nsight Compute (``ncu``) to report each
physmdn kernel's memory throughput (the mixture NLL also with the lane-per-element schedule) (% of peak DRAM bandwidth), achieved occupancy, registers and shared memory per
block, which is what the GPU targets (75 % of copy bandwidth) are about.

    ncu --profile-from-start off -k 'regex:nll|mdn|tiled|warp' --launch-count 12 --csv --page raw \\
        --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \\
        python bench/profile_case.py --device cuda
    python bench/profile_case.py --device cpu --B 4096      # the same calls on a CPU (plumbing only)

The warm-up runs with the profiler's range closed (``torch.cuda.profiler.start/stop`` around the measured calls;
``ncu --profile-from-start off`` honours it).
"""

from __future__ import annotations

import argparse

import torch

import physmdn
from physmdn import physics as P

from _common import with_cuda_lanes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--B", type=int, default=1 << 20)
    p.add_argument("--K", type=int, default=8)
    p.add_argument("--D", type=int, default=4)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    g = torch.Generator(device=args.device).manual_seed(0)

    def inputs(dtype):
        B, K, D = args.B, args.K, args.D
        t = [torch.randn(B, K, generator=g, device=args.device), torch.randn(B, K, D, generator=g, device=args.device),
             0.3 * torch.randn(B, K, D, generator=g, device=args.device) - 0.5,
             torch.randn(B, D, generator=g, device=args.device)]
        return [x.to(dtype).requires_grad_(i < 3) for i, x in enumerate(t)]

    def lanes(fn):
        return with_cuda_lanes(True, fn)

    def tril_inputs(D=8):  # mixture_nll_tril at the GPU check's benchmark shape (K from --K, D = 8)
        B, K = args.B, args.K
        t = [torch.randn(B, K, generator=g, device=args.device), torch.randn(B, K, D, generator=g, device=args.device),
             0.3 * torch.randn(B, K, D, D, generator=g, device=args.device).tril(-1)
             + torch.diag_embed(0.5 + torch.rand(B, K, D, generator=g, device=args.device)),
             torch.randn(B, D, generator=g, device=args.device)]
        return [x.requires_grad_(i < 3) for i, x in enumerate(t)]

    def lowrank_inputs(D=32, R=4):  # mixture_nll_lowrank at the GPU check's benchmark shape
        B, K = args.B, args.K
        t = [torch.randn(B, K, generator=g, device=args.device), torch.randn(B, K, D, generator=g, device=args.device),
             0.5 * torch.randn(B, K, D, R, generator=g, device=args.device),
             0.1 + torch.rand(B, K, D, generator=g, device=args.device),
             torch.randn(B, D, generator=g, device=args.device)]
        return [x.requires_grad_(i < 3) for i, x in enumerate(t)]

    coeffs = 0.3 * torch.randn(args.B, args.K, 1, 4, generator=g, device=args.device)
    cases = [
        ("mixture_nll fp32", inputs(torch.float32), lambda *t: physmdn.mixture_nll(*t, reduction="mean")),
        ("mixture_nll bf16", inputs(torch.bfloat16), lambda *t: physmdn.mixture_nll(*t, reduction="mean")),
        ("mdn_loss+poly fp32", inputs(torch.float32),
         lambda *t: P.mdn_loss(*t, physics=P.Polynomial(coeffs), weight=0.5, reduction="mean")),
        # the CUDA lane-per-element schedule (off by default until measured; lanes_nll_kernel)
        ("mixture_nll fp32, lanes schedule", inputs(torch.float32), lanes(lambda *t: physmdn.mixture_nll(*t, reduction="mean"))),
        ("mixture_nll bf16, lanes schedule", inputs(torch.bfloat16), lanes(lambda *t: physmdn.mixture_nll(*t, reduction="mean"))),
        # the correlated mixture NLLs' forward and backward kernels (csrc/cuda/correlated.cuh)
        ("mixture_nll_tril fp32 D=8", tril_inputs(), lambda *t: physmdn.mixture_nll_tril(*t, reduction="mean",
                                                                                          check_diagonal=False)),
        ("mixture_nll_lowrank fp32 D=32 R=4", lowrank_inputs(),
         lambda *t: physmdn.mixture_nll_lowrank(*t, reduction="mean", check_diagonal=False)),
    ]
    for _, x, fn in cases:  # warm-up (lazy init, allocator), outside the profiled range
        torch.autograd.grad(fn(*x), x[:3])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    for name, x, fn in cases:
        grads = torch.autograd.grad(fn(*x), x[:3])
        print(f"{name}: B={args.B} K={args.K} D={x[1].shape[-1]}, gradient norms "
              + ", ".join(f"{gr.float().norm().item():.3g}" for gr in grads))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

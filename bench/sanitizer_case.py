"""A tiny forward + backward of every physmdn kernel on one device, checked against the float64 reference on the CPU.

Meant to run under ``compute-sanitizer --tool memcheck`` (see bench/gpu_check.sh), so the sizes are small and odd
(block tails, K and D that are not powers of two, B = 1). Covers ``mixture_nll`` (gradients computed in the forward,
for a unit and a 1/B upstream gradient, and the recomputing backward kernel; also with the CUDA lane-per-element
schedule), the fused ``mdn_loss`` with the polynomial, linear and stencil families, ``mixture_nll_tril`` and
``mixture_nll_lowrank`` (forward and backward kernels; K up to 40, D up to 32, R up to 8) and ``correlated_penalty``
(each family, under the low-rank components), in float32, bfloat16 and
float64.

    python bench/sanitizer_case.py --device cuda      # exit 0: all matched; 1: a mismatch (printed)
"""

from __future__ import annotations

import argparse
import sys

import torch

import physmdn
from physmdn import physics as P
from physmdn import reference
from physmdn.physics_correlated import component_penalty, reference_penalty

TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2}


def make(B, K, D, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    tensors = [randn(B, K), randn(B, K, D), 0.3 * randn(B, K, D) - 0.3, randn(B, D)]
    return [t.to(dtype) for t in tensors], [t.to(device=device, dtype=dtype).requires_grad_(True) for t in tensors]


def make_tril(B, K, D, dtype, device, seed):
    """logits, means, scale_tril (diagonal in [0.5, 1.5], noise above it that the kernels must not read), target."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    noise = 0.3 * randn(B, K, D, D)
    tril = noise.tril(-1) + noise.triu(1) + torch.diag_embed(0.5 + torch.rand(B, K, D, generator=g, dtype=torch.float64))
    tensors = [randn(B, K), randn(B, K, D), tril, randn(B, D)]
    return [t.to(dtype) for t in tensors], [t.to(device=device, dtype=dtype).requires_grad_(True) for t in tensors]


def make_lowrank(B, K, D, R, dtype, device, seed):
    """logits, means, cov_factor, cov_diag (in [0.1, 1.1]), target."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    tensors = [randn(B, K), randn(B, K, D), 0.7 * randn(B, K, D, R),
               0.1 + torch.rand(B, K, D, generator=g, dtype=torch.float64), randn(B, D)]
    return [t.to(dtype) for t in tensors], [t.to(device=device, dtype=dtype).requires_grad_(True) for t in tensors]


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item() if b.numel() else 0.0


def check(name, fn, ref_fn, cpu_inputs, dev_inputs, dtype, failures, dev_extra=(), cpu_extra=()):
    """Loss and gradients of ``fn`` on the device vs ``ref_fn`` in float64 on the CPU (same rounded numbers).
    ``*_extra``: further, non-differentiated arguments (physics parameters)."""
    weights = torch.linspace(0.5, 1.5, dev_inputs[0].shape[0], dtype=torch.float64)
    loss = fn(*dev_inputs, *dev_extra)
    grads = torch.autograd.grad((loss * weights.to(loss)).sum(), dev_inputs)
    exact = [t.double().requires_grad_(True) for t in cpu_inputs]
    ref = ref_fn(*exact, *[e.double() for e in cpu_extra])
    ref_grads = torch.autograd.grad((ref * weights).sum(), exact)
    errors = [rel(loss, ref)] + [rel(g, r) for g, r in zip(grads, ref_grads)]
    worst = max(errors)
    status = "ok" if worst <= TOL[dtype] else "MISMATCH"
    print(f"{status:8s} {name:34s} {str(dtype):15s} B={dev_inputs[1].shape[0]:4d} K={dev_inputs[1].shape[1]:2d} "
          f"D={dev_inputs[1].shape[2]:2d} max rel err {worst:.2e}")
    if status != "ok":
        failures.append(name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = args.device
    print(f"physmdn {physmdn.__version__}, torch {torch.__version__}, device {device}, build {physmdn.build_info()}")
    failures: list[str] = []
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for B, K, D in ((1, 1, 1), (37, 5, 3), (300, 8, 4), (129, 33, 17)):
            cpu_in, dev_in = make(B, K, D, dtype, device, seed=B + K + D)
            check("mixture_nll", physmdn.mixture_nll, reference.mixture_nll, cpu_in, dev_in, dtype, failures)

            def recompute(logits, means, log_scales, target):  # compute_grad=False: the backward kernel recomputes
                return torch.ops.physmdn.mixture_nll_fwd(logits, means, log_scales, target, False)[0]
            check("mixture_nll (recomputing bwd)", recompute, reference.mixture_nll, cpu_in, dev_in, dtype, failures)

            def mean_scaled(logits, means, log_scales, target):  # gradients computed for grad_scale = 1/B, rescaled
                return torch.ops.physmdn.mixture_nll_fwd(logits, means, log_scales, target, True, 1.0 / B)[0] * B
            check("mixture_nll (grad_scale 1/B)", mean_scaled, lambda *t: B * reference.mixture_nll(*t), cpu_in, dev_in,
                  dtype, failures)

            g = torch.Generator().manual_seed(7)
            coeffs = 0.3 * torch.randn(B, K, 1, 4, generator=g, dtype=torch.float64)
            A = 0.5 * torch.randn(1, K, 2, D, generator=g, dtype=torch.float64)
            b = 0.5 * torch.randn(1, K, 2, generator=g, dtype=torch.float64)
            reaction = 0.3 * torch.randn(1, K, 4, generator=g, dtype=torch.float64)
            cases = {
                "mdn_loss polynomial J=3": (lambda c: P.Polynomial(c), (coeffs,)),
                "mdn_loss linear M=2": (lambda a, bb: P.Linear(a, bb), (A, b)),
                "mdn_loss stencil periodic": (lambda r: P.Stencil1D(0.1, r, spacing=0.5), (reaction,)),
            }
            for name, (spec, params) in cases.items():
                def fused(logits, means, log_scales, target, *ps, spec=spec):
                    return P.mdn_loss(logits, means, log_scales, target, physics=spec(*ps), weight=0.5,
                                      reduction="none")

                def eager(logits, means, log_scales, target, *ps, spec=spec):
                    penalty = P.physics_penalty(logits, means, log_scales, spec(*ps))
                    return reference.mixture_nll(logits, means, log_scales, target) + 0.5 * penalty
                dev_params = tuple(t.to(device=device, dtype=dtype) for t in params)
                cpu_params = tuple(t.to(dtype) for t in params)
                check(name, fused, eager, cpu_in, dev_in, dtype, failures, dev_extra=dev_params, cpu_extra=cpu_params)
        for B, K, D in ((1, 1, 1), (37, 5, 3), (300, 8, 8), (129, 40, 2), (5, 2, 32)):
            cpu_in, dev_in = make_tril(B, K, D, dtype, device, seed=B + K + D + 2)
            check("mixture_nll_tril", physmdn.mixture_nll_tril, reference.mixture_nll_tril, cpu_in, dev_in, dtype,
                  failures)
        for B, K, D, R in ((1, 1, 1, 1), (37, 5, 3, 2), (300, 8, 32, 4), (129, 40, 2, 8)):
            cpu_in, dev_in = make_lowrank(B, K, D, R, dtype, device, seed=B + K + D + R)
            check("mixture_nll_lowrank", physmdn.mixture_nll_lowrank, reference.mixture_nll_lowrank, cpu_in, dev_in,
                  dtype, failures)
            # the physics penalty of these components (correlated_penalty: a thread per sample and component), each
            # family, second moment under noise (the clamps), summed over the components
            laws = {"polynomial": P.Polynomial([0.2, 1.0, 0.0, -1.0], noise_scale=0.3),
                    "linear M=2": P.Linear(torch.ones(2, D) / D, torch.tensor([0.1, -0.2]), noise_scale=0.3),
                    "stencil neumann": P.Stencil1D(0.1, [0.0, 1.0, 0.0, -1.0], spacing=0.5, boundary="neumann",
                                                   noise_scale=0.3)}
            for law, spec in laws.items():
                def fused_penalty(means, factor, diag, spec=spec):
                    return component_penalty(spec, means, factor, diag).sum(-1)

                def torch_penalty(means, factor, diag, spec=spec):
                    return reference_penalty(spec, means, factor, diag).sum(-1)
                check(f"correlated_penalty {law}", fused_penalty, torch_penalty, cpu_in[1:4], dev_in[1:4], dtype,
                      failures)
        # the CUDA lane-per-element schedule (off by default): G lanes per sample with padding lanes (K D not a power
        # of two, D = 3, 17 padded to 4, 32), 1 to 8 elements per lane; forward with gradients and the recomputing
        # backward (a no-op switch on the CPU)
        # (a build without the schedule, CMake option PHYSMDN_CUDA_LANES, runs these shapes on the default schedule:
        # only CPU dry runs meet one, the GPU check installs a build with it)
        lanes = physmdn.build_info()["cuda_lanes_schedule"]
        prev = physmdn._C.set_cuda_lanes_schedule(True) if lanes else False
        try:
            for B, K, D in ((1, 1, 1), (37, 5, 3), (300, 8, 4), (65, 3, 17), (33, 16, 16)):
                cpu_in, dev_in = make(B, K, D, dtype, device, seed=B + K + D + 1)
                check("mixture_nll, lanes schedule", physmdn.mixture_nll, reference.mixture_nll, cpu_in, dev_in, dtype,
                      failures)

                def recompute(logits, means, log_scales, target):
                    return torch.ops.physmdn.mixture_nll_fwd(logits, means, log_scales, target, False)[0]
                check("mixture_nll, lanes schedule (bwd)", recompute, reference.mixture_nll, cpu_in, dev_in, dtype,
                      failures)
        finally:
            physmdn._C.set_cuda_lanes_schedule(prev)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    print(f"{'FAILED: ' + ', '.join(sorted(set(failures))) if failures else 'all kernels matched the reference'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

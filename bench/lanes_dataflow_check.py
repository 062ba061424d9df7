"""A numpy model of the CUDA lane-per-element kernel's data flow (``lanes_nll_kernel`` in csrc/cuda/device_kernels.cuh),
checked against ``torch.distributions`` in float64: the element-to-lane map (e = l + j G over K Dp virtual
elements, Dp = D rounded up to a power of two; component e >> log2 Dp, dimension l % Dp), the masks of padding lanes
(d >= D, past the last component), the sum over D by xor-shuffles within runs of Dp lanes, the max and sums over K by
xor-shuffles with offsets Dp .. G / 2, and the gradients each lane writes. It models the kernel's
structure, not its CUDA code. The kernel's own source runs on the CPU in tests/test_cuda_sim.py (a simulator of
threads, warps and shuffles), and on a GPU in tests/test_cuda_lanes.py.

    python bench/lanes_dataflow_check.py
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

HALF_LOG_2PI = 0.91893853320467274178


def pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def shuffle_reduce(x, first: int, G: int, op):
    """x over G lanes combined with the lanes whose index differs in bits [first, G) (xor-shuffles)."""
    o = first
    while o < G:
        x = op(x, x[np.arange(len(x)) ^ o])
        o *= 2
    return x


def maximum(a, b):
    return np.where(b > a, b, a)


def lanes_model(lg_row, mu_row, ls_row, y_row, g=1.0):
    """One sample through the kernel's steps, lanes as array entries; returns (loss, dlogits, dmeans, dlog_scales,
    dtarget)."""
    K, D = mu_row.shape
    Dp = pow2_at_least(D)
    G = min(32, pow2_at_least(K * Dp))
    J = {1: 1, 2: 2, 3: 4, 4: 4}.get(-(-(K * Dp) // G), 8)  # the kernel's template J
    lane = np.arange(G)
    d = lane & (Dp - 1)
    log2_dp = int(math.log2(Dp))
    valid = np.zeros((J, G), bool)
    mu, ls, lg = np.zeros((J, G)), np.zeros((J, G)), np.full((J, G), -np.inf)
    y = np.where(d < D, y_row[np.minimum(d, D - 1)], 0.0)
    comp = [(lane + j * G) >> log2_dp for j in range(J)]
    for j in range(J):  # 1. loads
        k = comp[j]
        valid[j] = (k < K) & (d < D)
        real = (k * D + d)[valid[j]]
        mu[j][valid[j]] = mu_row.reshape(-1)[real]
        ls[j][valid[j]] = ls_row.reshape(-1)[real]
        lg[j][valid[j]] = lg_row[k[valid[j]]]
    mx = np.full(G, -np.inf)  # 2. the logits' shift
    for j in range(J):
        mx = maximum(mx, lg[j])
    mx = shuffle_reduce(mx, Dp, G, maximum)
    shift = np.where(mx == -np.inf, 0.0, mx)
    inv = np.exp(-ls)  # 3. elements, sums over D and K
    z = (y - mu) * inv
    joint, pi, s1 = np.zeros((J, G)), np.zeros((J, G)), np.zeros(G)
    for j in range(J):
        t = shuffle_reduce(np.where(valid[j], -0.5 * z[j] * z[j] - ls[j], 0.0), 1, Dp, np.add)
        pi[j] = np.where(valid[j], np.exp(lg[j] - shift), 0.0)
        joint[j] = np.where(valid[j], (lg[j] - shift) + (t - D * HALF_LOG_2PI), -np.inf)
        s1 += pi[j]
    s1 = shuffle_reduce(s1, Dp, G, np.add)
    mx2 = np.full(G, -np.inf)
    for j in range(J):
        mx2 = maximum(mx2, joint[j])
    mx2 = shuffle_reduce(mx2, Dp, G, maximum)
    shift2 = np.where(mx2 == -np.inf, 0.0, mx2)
    s2 = np.zeros(G)
    for j in range(J):
        joint[j] = np.where(valid[j], np.exp(joint[j] - shift2), 0.0)
        s2 += joint[j]
    s2 = shuffle_reduce(s2, Dp, G, np.add)
    with np.errstate(divide="ignore", invalid="ignore"):  # (padding dimension classes hold no component: 0 sums)
        lse = (shift2 + np.log(s2)) - np.log(s1)
    assert np.allclose(lse[d < D], lse[0]), "every lane of a real dimension must hold the same log-sum-exp"
    gm, gs, gl, gy = np.full(K * D, np.nan), np.full(K * D, np.nan), np.full(K, np.nan), np.zeros(G)
    for j in range(J):  # 4. gradients, as each lane writes them (NaN left: an element no lane wrote)
        for i in np.nonzero(valid[j])[0]:
            k = comp[j][i]
            e = k * D + d[i]
            gamma = joint[j][i] / s2[i]
            c = -(g * gamma)
            dmu = 0.0 if gamma == 0 else c * z[j][i] * inv[j][i]
            gm[e], gs[e] = dmu, 0.0 if gamma == 0 else c * (z[j][i] ** 2 - 1)
            gy[i] -= dmu
            if d[i] == 0:
                gl[k] = g * (pi[j][i] / s1[i] - gamma)
    gy = shuffle_reduce(gy, Dp, G, np.add)
    return -lse[0], gl, gm.reshape(K, D), gs.reshape(K, D), gy[:D]


def main() -> int:
    rng = np.random.default_rng(0)
    checked = 0
    for K in [1, 2, 3, 5, 8, 9, 15, 16, 33, 64]:
        for D in [1, 2, 3, 4, 5, 7, 8, 12, 16, 17, 32]:
            if K * pow2_at_least(D) > 256:
                continue
            lg, mu = rng.normal(size=K), rng.normal(size=(K, D))
            ls, y = 0.3 * rng.normal(size=(K, D)) - 0.5, rng.normal(size=D)
            if K > 2:
                lg[1] = -np.inf  # a component of weight 0
            out = lanes_model(lg, mu, ls, y)
            t = [torch.tensor(a, requires_grad=True) for a in (lg, mu, ls, y)]
            mix = MixtureSameFamily(Categorical(logits=t[0]), Independent(Normal(t[1], t[2].exp()), 1))
            loss = -mix.log_prob(t[3])
            grads = torch.autograd.grad(loss, t)
            assert abs(loss.item() - out[0]) < 1e-9, (K, D, loss.item(), out[0])
            for name, a, b in zip(("logits", "means", "log_scales", "target"), grads, out[1:]):
                assert np.allclose(a.numpy(), b, atol=1e-9, equal_nan=True), (K, D, name, a, b)
            checked += 1
    print(f"lane data flow: {checked} (K, D) cases match torch.distributions (float64)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

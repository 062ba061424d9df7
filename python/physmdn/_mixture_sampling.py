"""Sampling, reparameterized sampling, CDFs and entropy bounds of diagonal Gaussian mixtures.

Every function takes one flat batch dimension: ``logits [B, K]``, ``means / log_scales [B, K, D]``, and draws or
points ``[n, B, D]`` (``n`` points per mixture). :class:`physmdn.GaussianMixture` reshapes its batch shape to this.
"""

from __future__ import annotations

import torch

from .reference import HALF_LOG_2PI

__all__ = ["draw", "implicit_rsample", "conditional_cdfs", "cdf_1d", "icdf_1d", "entropy_bounds"]


@torch.no_grad()
def draw(logits, means, log_scales, n: int, *, temperature: float = 1.0, scale_temperature: float = 1.0,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` draws per mixture: ``[n, B, D]``, without gradients.

    A component ``k ~ Categorical(softmax(logits / temperature))`` (``temperature = 0``: the heaviest one), then
    ``y = mu_k + scale_temperature * sigma_k * eps``, ``eps ~ N(0, I)``. Only the chosen component is gathered
    (cost ``O(n B D)``, not ``O(n B K D)``), so an impossible component (``logits = -inf``) may hold NaN.
    """
    B, K, D = means.shape
    if n == 0 or B == 0:
        return means.new_empty(n, B, D)
    logits = logits.detach().float()
    if temperature == 0.0:
        index = logits.argmax(-1, keepdim=True).expand(B, n)
    else:
        probs = torch.softmax(logits / temperature, dim=-1)
        index = torch.multinomial(probs, n, replacement=True, generator=generator)  # [B, n]
    gather = index.unsqueeze(-1).expand(B, n, D)
    chosen_means = means.gather(1, gather)  # [B, n, D]
    chosen_log_scales = log_scales.gather(1, gather)
    eps = torch.randn(chosen_means.shape, dtype=means.dtype, device=means.device, generator=generator)
    return (chosen_means + scale_temperature * torch.exp(chosen_log_scales) * eps).transpose(0, 1)


def _conditionals(logits, means, log_scales, y):
    """Per-dimension conditionals of the mixture at points ``y [n, B, D]``.

    ``p(y_d | y_<d) = sum_k w_kd N(y_d | mu_kd, sigma_kd)`` with ``w_kd ∝ pi_k prod_{e<d} N(y_e | mu_ke, sigma_ke)``
    (diagonal components factorize). Returns ``z [n, B, K, D]`` (standardized ``y``), ``log N_kd(y_d)`` and
    ``log w_kd``, all ``[n, B, K, D]``. Impossible components (``pi_k = 0``) are replaced by N(0, 1) so that NaN
    parameters there cannot leak into the others (their weight stays exactly 0).
    """
    log_pi = torch.log_softmax(logits, -1)
    impossible = torch.isneginf(log_pi).unsqueeze(-1)
    means = torch.where(impossible, torch.zeros_like(means), means)
    log_scales = torch.where(impossible, torch.zeros_like(log_scales), log_scales)
    z = (y.unsqueeze(-2) - means) * torch.exp(-log_scales)
    log_normal = -0.5 * z * z - log_scales - HALF_LOG_2PI
    prefix = torch.cat([torch.zeros_like(log_normal[..., :1]), torch.cumsum(log_normal, -1)[..., :-1]], -1)
    log_w = torch.log_softmax(log_pi.unsqueeze(-1) + prefix, dim=-2)
    return z, log_normal, log_w, log_scales


def conditional_cdfs(logits, means, log_scales, y) -> torch.Tensor:
    """The Rosenblatt transform ``u_d = F_d(y_d | y_<d) = sum_k w_kd Phi(z_kd)``: ``[n, B, D]``, uniform on
    ``[0, 1]^D`` when ``y`` is drawn from the mixture. Differentiable in all arguments."""
    z, _, log_w, _ = _conditionals(logits, means, log_scales, y)
    return (torch.exp(log_w) * torch.special.ndtr(z)).sum(-2)


class _ImplicitSample(torch.autograd.Function):
    """Draws ``y [n, B, D]`` exactly (component index and normal noise, no gradient); the backward pass applies the
    implicit reparameterization gradient (Figurnov, Mohamed and Mnih, 2018) of the conditional-CDF chain ``u = F(y)``:

    ``dy/dtheta = -(dF/dy)^-1 dF/dtheta``, with ``dF/dy`` lower triangular: diagonal ``p(y_d | y_<d)``, below it
    ``dF_e/dy_d = sum_k w_ke (Phi(z_ke) - F_e) a_kd`` (``a_kd = -z_kd / sigma_kd``, the score of ``N_kd``). The
    vector-Jacobian product solves ``(dF/dy)^T lambda = grad_y`` by back-substitution and returns
    ``-lambda^T dF/dtheta`` by autograd through :func:`conditional_cdfs`. For ``D = 1``: ``-(dF/dtheta) / p(y)``.
    """

    @staticmethod
    def forward(ctx, logits, means, log_scales, n, generator):
        y = draw(logits, means, log_scales, n, generator=generator)
        ctx.save_for_backward(logits, means, log_scales, y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        logits, means, log_scales, y = ctx.saved_tensors
        work = torch.promote_types(y.dtype, torch.float32)
        params = [t.detach().to(work) for t in (logits, means, log_scales)]
        y, grad_y = y.to(work), grad_y.to(work)
        with torch.no_grad():
            z, log_normal, log_w, safe_log_scales = _conditionals(*params, y)
            w = torch.exp(log_w)
            # conditional densities p(y_d | y_<d); floored so that a far tail gives a large finite lambda, which
            # multiplies a dF/dtheta that is just as small
            density = torch.exp(torch.logsumexp(log_w + log_normal, -2)).clamp_min(torch.finfo(work).tiny)
            D = y.shape[-1]
            lam = [None] * D
            if D > 1:
                phi = torch.special.ndtr(z)
                cdf = (w * phi).sum(-2, keepdim=True)  # [n, B, 1, D]
                score = -z * torch.exp(-safe_log_scales)  # d log N_kd / d y_d
                jac = torch.einsum("...ke,...kd->...ed", w * (phi - cdf), score)  # [n, B, D(e), D(d)], used for e > d
            for d in range(D - 1, -1, -1):
                acc = grad_y[..., d]
                for e in range(d + 1, D):
                    acc = acc - jac[..., e, d] * lam[e]
                lam[d] = acc / density[..., d]
            lam = torch.stack(lam, -1)
        wanted = [i for i in range(3) if ctx.needs_input_grad[i]]
        grads = [None] * 3
        if wanted:
            with torch.enable_grad():
                leaves = [p.requires_grad_(i in wanted) for i, p in enumerate(params)]
                u = conditional_cdfs(*leaves, y)
                found = torch.autograd.grad(u, [leaves[i] for i in wanted], grad_outputs=-lam)
            for i, g in zip(wanted, found):
                grads[i] = g.to((logits, means, log_scales)[i].dtype)
        return grads[0], grads[1], grads[2], None, None


def implicit_rsample(logits, means, log_scales, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` reparameterized draws per mixture ``[n, B, D]``; gradients reach ``logits``, ``means`` and
    ``log_scales`` (see :class:`_ImplicitSample`)."""
    return _ImplicitSample.apply(logits, means, log_scales, n, generator)


def cdf_1d(logits, means, log_scales, y) -> torch.Tensor:
    """``F(y) = sum_k pi_k Phi((y - mu_k) / sigma_k)`` for ``D = 1``: ``y [n, B, 1]`` -> ``[n, B]``."""
    return conditional_cdfs(logits, means, log_scales, y)[..., 0]


def icdf_1d(logits, means, log_scales, u, max_iter: int = 200) -> torch.Tensor:
    """The quantile ``y = F^-1(u)`` for ``D = 1``: ``u [n, B]`` -> ``[n, B, 1]``.

    The root is bracketed exactly by the component quantiles, ``min_k Q_k(u) <= y <= max_k Q_k(u)`` (``F`` is a
    convex combination of the component CDFs), then found by Newton steps that fall back to bisection when they
    leave the bracket. The result is differentiable through the implicit function theorem:
    ``dy/du = 1 / p(y)``, ``dy/dtheta = -(dF/dtheta) / p(y)``. ``u = 0`` and ``u = 1`` give -inf and inf.
    """
    work = torch.promote_types(means.dtype, torch.float32)
    with torch.no_grad():
        p_logits, p_means, p_log_scales = (t.detach().to(work) for t in (logits, means, log_scales))
        target = u.detach().to(work)
        possible = torch.log_softmax(p_logits, -1) > -torch.inf  # [B, K]
        quantiles = p_means[..., 0] + torch.exp(p_log_scales[..., 0]) * torch.special.ndtri(target.unsqueeze(-1))
        lo = torch.where(possible, quantiles, torch.full_like(quantiles, torch.inf)).amin(-1)  # [n, B]
        hi = torch.where(possible, quantiles, torch.full_like(quantiles, -torch.inf)).amax(-1)
        x = 0.5 * (lo + hi)
        finite = torch.isfinite(x)
        x = torch.where(finite, x, torch.zeros_like(x))
        for _ in range(max_iter):
            y = x.unsqueeze(-1)
            residual = cdf_1d(p_logits, p_means, p_log_scales, y) - target
            z, log_normal, log_w, _ = _conditionals(p_logits, p_means, p_log_scales, y)
            density = torch.exp(torch.logsumexp(log_w + log_normal, -2))[..., 0]
            lo = torch.where(residual < 0, x, lo)
            hi = torch.where(residual > 0, x, hi)
            newton = x - residual / density
            inside = (newton > lo) & (newton < hi)
            new = torch.where(inside, newton, 0.5 * (lo + hi))
            new = torch.where(finite, new, x)
            step = (new - x).abs()
            x = new
            if bool((step <= 4 * torch.finfo(work).eps * x.abs().clamp_min(1.0)).all()):
                break
        root = torch.where(finite, x, 0.5 * (lo + hi)).unsqueeze(-1)  # +-inf where u is 0 or 1
        y = root.clamp(-torch.finfo(work).max, torch.finfo(work).max)
        _, log_normal, log_w, _ = _conditionals(p_logits, p_means, p_log_scales, y)
        density = torch.exp(torch.logsumexp(log_w + log_normal, -2))[..., 0]
    # value: the root (the correction term is one more Newton step, ~0); gradient: the implicit one
    u_work = u.to(work)
    correction = (cdf_1d(logits.to(work), means.to(work), log_scales.to(work), y) - u_work) / density.clamp_min(
        torch.finfo(work).tiny)
    out = torch.where(finite, y[..., 0] - correction, root[..., 0])
    return out.unsqueeze(-1).to(means.dtype)


def entropy_bounds(logits, means, log_scales) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic bounds ``lower <= H(p) <= upper`` on the differential entropy, each ``[B]``:

    ``lower = -sum_k pi_k log sum_j pi_j N(mu_k | mu_j, S_k + S_j)`` (Huber et al. 2008; Kolchinsky and Tracey 2017)
    and ``upper = sum_k pi_k (H_k - log pi_k)`` with ``H_k = sum_d (1/2 log(2 pi e) + log sigma_kd)``.
    """
    log_pi = torch.log_softmax(logits, -1)
    pi = torch.exp(log_pi)
    component_entropy = (0.5 + HALF_LOG_2PI + log_scales).sum(-1)  # [B, K]
    upper = (pi * component_entropy).sum(-1) + torch.special.entr(pi).sum(-1)
    var = (torch.exp(2.0 * log_scales).unsqueeze(-2) + torch.exp(2.0 * log_scales).unsqueeze(-3))  # [B, K, K, D]
    diff = means.unsqueeze(-2) - means.unsqueeze(-3)
    log_overlap = (-0.5 * diff * diff / var - 0.5 * torch.log(var) - HALF_LOG_2PI).sum(-1)  # [B, K(k), K(j)]
    inner = torch.logsumexp(log_pi.unsqueeze(-2) + log_overlap, -1)  # [B, K]
    lower = -torch.where(pi > 0, pi * inner, torch.zeros_like(inner)).sum(-1)
    return lower, upper

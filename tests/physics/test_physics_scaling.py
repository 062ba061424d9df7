"""The noise floor of the residual penalties (``normalize="noise"``, physmdn.physics_scaling): closed forms against
float64 Monte Carlo, the normalized penalty of noisy on-law data has expectation 1, and the loss divides the weight
by the batch's mixture-weighted floor."""

import math

import pytest
import torch

import physmdn
from physmdn import physics as Ph
from physmdn import physics_scaling as S

DT = torch.float64


def _monte_carlo_floor(residual, means, noise, draws=200_000, seed=0):
    """``E ||r(mu + s eps) - r(mu)||^2`` by plain sampling: ``[B, K]``; ``residual(y [..., B, K, D]) -> [..., B, K, M]``."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn((draws, *means.shape), generator=g, dtype=DT)
    diff = residual(means + noise * eps) - residual(means)
    return diff.square().sum(-1).mean(0)


def _polynomial_residual(coeffs):
    return lambda y: sum(coeffs[..., j] * y**j for j in range(coeffs.shape[-1]))


def test_normal_moments_and_taylor_against_closed_forms():
    assert S.normal_moments(6).tolist() == [1.0, 0.0, 1.0, 0.0, 3.0, 0.0, 15.0]
    coeffs = torch.tensor([0.3, -1.2, 0.5, 2.0], dtype=DT)
    at, t = torch.tensor(0.7, dtype=DT), torch.tensor(0.37, dtype=DT)
    taylor = S.taylor_coefficients(coeffs, at)
    shifted = sum(taylor[j] * t**j for j in range(4))
    assert torch.allclose(shifted, _polynomial_residual(coeffs)(at + t))


def test_polynomial_floor_matches_monte_carlo():
    torch.manual_seed(1)
    B, K, D, noise = 3, 2, 2, 0.2
    coeffs = torch.randn(B, K, 1, 4, dtype=DT)
    means = torch.randn(B, K, D, dtype=DT)
    spec = Ph.Polynomial(coeffs, noise_scale=noise, normalize="noise")
    exact = spec.noise_floor(means)
    mc = _monte_carlo_floor(lambda y: spec.residual(y), means, noise)
    assert exact.shape == (B, K)
    assert torch.allclose(exact, mc, rtol=0.03)
    # to first order s^2 g'(mu)^2
    slope = sum(j * coeffs[..., j] * means ** (j - 1) for j in range(1, 4))
    assert torch.allclose(S.polynomial_noise_floor(coeffs, means, 1e-4), 1e-8 * slope.square().sum(-1), rtol=1e-3)


def test_linear_floor_is_noise_times_frobenius():
    A = torch.randn(2, 3, 4, 5, dtype=DT)
    spec = Ph.Linear(A, torch.zeros(2, 3, 4, dtype=DT), noise_scale=0.3, normalize="noise")
    means = torch.randn(2, 3, 5, dtype=DT)
    assert torch.allclose(spec.noise_floor(means), 0.09 * A.square().sum((-2, -1)))
    mc = _monte_carlo_floor(lambda y: spec.residual(y), means, 0.3, draws=50_000)
    assert torch.allclose(spec.noise_floor(means), mc, rtol=0.03)


@pytest.mark.parametrize("boundary", ["periodic", "neumann"])
def test_stencil_floor_matches_monte_carlo(boundary):
    torch.manual_seed(2)
    B, K, D, noise = 2, 3, 6, 0.1
    reaction = torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=DT)
    spec = Ph.Stencil1D(torch.full((B, 1), 0.05, dtype=DT), reaction, spacing=0.5, boundary=boundary,
                        noise_scale=noise, normalize="noise")
    means = torch.randn(B, K, D, dtype=DT)
    mc = _monte_carlo_floor(lambda y: spec.residual(y), means, noise, draws=100_000)
    assert torch.allclose(spec.noise_floor(means), mc, rtol=0.03)


def test_residual_floor_gauss_hermite_is_exact_for_polynomials():
    coeffs = torch.tensor([0.1, 1.0, 0.0, -1.0], dtype=DT)
    spec = Ph.Residual(lambda y, c: _polynomial_residual(coeffs)(y), mode="gauss_hermite", noise_scale=0.2,
                       normalize="noise")
    means = torch.randn(3, 2, 1, dtype=DT)
    assert torch.allclose(spec.noise_floor(means), S.polynomial_noise_floor(coeffs.reshape(1, 1, 1, 4), means, 0.2))


def _on_law_cases():
    """(spec, state on the law [1, 1, D], residual) per family."""
    r = 0.6
    pitchfork = Ph.Polynomial(torch.tensor([0.0, r, 0.0, -1.0], dtype=DT), noise_scale=0.05, normalize="noise")
    yield "polynomial", pitchfork, torch.full((1, 1, 1), math.sqrt(r), dtype=DT)
    A = torch.tensor([[-7.87 * 0.4, 1.0]], dtype=DT)
    state = torch.tensor([[[4.0, 7.87 * 0.4 * 4.0]]], dtype=DT)
    yield "linear", Ph.Linear(A, torch.zeros(1, dtype=DT), noise_scale=0.05, normalize="noise"), state
    stencil = Ph.Stencil1D(0.02, torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=DT), spacing=0.25, noise_scale=0.02,
                           normalize="noise")
    yield "stencil", stencil, torch.ones(1, 1, 16, dtype=DT)  # the uniform state u = 1 is steady


@pytest.mark.parametrize("family", ["polynomial", "linear", "stencil"])
def test_normalized_penalty_of_noisy_on_law_data_has_expectation_one(family):
    spec, state = next((s, y) for name, s, y in _on_law_cases() if name == family)
    assert spec.penalty(state, torch.full_like(state, -30.0)).abs().max() < 1e-12
    g = torch.Generator().manual_seed(3)
    draws = state + spec.noise_scale * torch.randn((100_000, *state.shape[1:]), generator=g, dtype=DT)
    # the penalty of each noisy observation as a point, divided by the floor at the noise-free state
    raw = spec.residual(draws).square().sum(-1).squeeze(-1)  # [draws]
    normalized = raw / spec.noise_floor(state).reshape(())
    assert normalized.mean().item() == pytest.approx(1.0, abs=0.02)


def test_loss_divides_the_weight_by_the_mixture_weighted_floor():
    torch.manual_seed(4)
    B, K, D = 5, 3, 1
    logits, means = torch.randn(B, K, dtype=DT), torch.randn(B, K, D, dtype=DT)
    log_scales = torch.randn(B, K, D, dtype=DT) - 1
    target = torch.randn(B, D, dtype=DT)
    coeffs = torch.randn(B, 1, 1, 4, dtype=DT)
    plain = Ph.Polynomial(coeffs, noise_scale=0.1)
    scaled = Ph.Polynomial(coeffs, noise_scale=0.1, normalize="noise")
    floor = S.polynomial_noise_floor(coeffs, means, 0.1)  # [B, K]
    expected_scale = (torch.softmax(logits, -1) * floor).sum(-1).mean()
    nll = physmdn.mdn_loss(logits, means, log_scales, target)
    raw = physmdn.mdn_loss(logits, means, log_scales, target, physics=[(plain, 2.0)], weight=0.5) - nll
    normalized = physmdn.mdn_loss(logits, means, log_scales, target, physics=[(scaled, 2.0)], weight=0.5) - nll
    assert torch.allclose(normalized, raw / expected_scale, rtol=1e-9)
    reference = Ph.physics_penalty(logits, means, log_scales, [(scaled, 2.0)]).mean() * 0.5
    assert torch.allclose(normalized, reference, rtol=1e-9)


def test_scale_is_detached_from_the_means():
    B, K, D = 4, 2, 1
    means = torch.randn(B, K, D, dtype=DT, requires_grad=True)
    logits, log_scales = torch.zeros(B, K, dtype=DT), torch.full((B, K, D), -2.0, dtype=DT)
    coeffs = torch.tensor([0.0, 0.5, 0.0, -1.0], dtype=DT)
    spec = Ph.Polynomial(coeffs, noise_scale=0.1, normalize="noise")
    (grad,) = torch.autograd.grad(Ph.physics_penalty(logits, means, log_scales, spec).sum(), means)
    scale = S.mixture_noise_floor(spec.noise_floor(means.detach()), torch.softmax(logits, -1))
    (plain_grad,) = torch.autograd.grad(
        Ph.physics_penalty(logits, means, log_scales, Ph.Polynomial(coeffs, noise_scale=0.1)).sum(), means)
    assert torch.allclose(grad, plain_grad / scale)


def test_bad_normalize_fails_at_the_boundary():
    with pytest.raises(ValueError, match="normalize must be one of"):
        Ph.Polynomial([0.0, 1.0], noise_scale=0.1, normalize="data")
    with pytest.raises(ValueError, match="needs noise_scale > 0"):
        Ph.Linear([[1.0, 0.0]], normalize="noise")
    with pytest.raises(ValueError, match="needs noise_scale > 0"):
        Ph.Residual(lambda y, c: y, normalize="noise")


def test_prior_weight_falls_as_one_over_n_below_its_cap():
    from physmdn.physics_scaling import PRIOR_STRENGTH, PRIOR_WEIGHT_CAP, prior_weight
    assert prior_weight(1) == PRIOR_WEIGHT_CAP == 0.1
    assert prior_weight(25) == pytest.approx(0.1)
    assert prior_weight(256) == pytest.approx(PRIOR_STRENGTH / 256)
    assert prior_weight(2048) == pytest.approx(2.5 / 2048)
    assert prior_weight(1000, strength=5.0, cap=1.0) == pytest.approx(0.005)
    for bad in (0, -3, 2.5, True, None):
        with pytest.raises(ValueError, match="n_train must be an int >= 1"):
            prior_weight(bad)
    with pytest.raises(ValueError, match="strength must be a finite number > 0"):
        prior_weight(10, strength=float("nan"))

"""Physics expectations under full-covariance and low-rank components against 10^6-sample Monte Carlo (float64),
gradcheck, and the correlated MDN loss."""

import copy
import math

import pytest
import torch

import physmdn
from physmdn import physics, physics_correlated
from physmdn.physics_correlated import component_penalty, expected_residual, expected_square

N_MC = 1_000_000


def components(kind, B=1, K=2, D=5, R=2, seed=0):
    """``(means, factor, diag)`` with strong correlations."""
    g = torch.Generator().manual_seed(seed)
    means = 0.8 * torch.randn(B, K, D, generator=g, dtype=torch.float64)
    if kind == "full":
        factor = 0.4 * torch.randn(B, K, D, D, generator=g, dtype=torch.float64).tril(-1)
        factor = factor + torch.diag_embed(0.2 + 0.3 * torch.rand(B, K, D, generator=g, dtype=torch.float64))
        return means, factor, None
    factor = 0.5 * torch.randn(B, K, D, R, generator=g, dtype=torch.float64)
    return means, factor, 0.02 + 0.1 * torch.rand(B, K, D, generator=g, dtype=torch.float64)


def draws(means, factor, diag, n=N_MC, seed=1):
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(n, *factor.shape[:-2], factor.shape[-1], 1, generator=g, dtype=torch.float64)
    y = means + (factor @ eps).squeeze(-1)
    if diag is not None:
        y = y + diag.sqrt() * torch.randn(y.shape, generator=g, dtype=torch.float64)
    return y  # [n, B, K, D]


def specs():
    K = 2
    yield physics.Polynomial([0.3, 1.0, 0.0, -1.0])
    yield physics.Polynomial(torch.randn(1, K, 1, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    A = torch.randn(3, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    yield physics.Linear(A, torch.tensor([0.5, -1.0, 0.2], dtype=torch.float64))
    yield physics.Stencil1D(0.7, [0.0, 1.0, 0.0, -1.0], spacing=0.8, boundary="periodic")
    yield physics.Stencil1D(torch.tensor([[0.5, 1.2]], dtype=torch.float64), [0.2, 1.0, -0.5, -1.0],
                            boundary="neumann")


SPECS = list(specs())


# ~2 s each: the Neumann stencil (Stein's lemma, both boundaries' rows) runs in the quick tier, the rest are slow
@pytest.mark.parametrize("kind", ["full", "lowrank"])
@pytest.mark.parametrize("index", [pytest.param(i, marks=[] if i == len(SPECS) - 1 else [pytest.mark.slow])
                                   for i in range(len(SPECS))])
def test_moments_match_monte_carlo(kind, index):
    spec = SPECS[index]
    means, factor, diag = components(kind, seed=index)
    y = draws(means, factor, diag)
    r = spec.residual(y)  # [n, B, K, M]
    # E r per coordinate and E |r|^2, each within 5 standard errors of the Monte Carlo mean
    mean, se = r.mean(0), r.std(0) / math.sqrt(N_MC)
    assert ((expected_residual(spec, means, factor, diag) - mean).abs() <= 5 * se + 1e-12).all()
    square = r.square().sum(-1)
    assert ((expected_square(spec, means, factor, diag) - square.mean(0)).abs()
            <= 5 * square.std(0) / math.sqrt(N_MC)).all()


@pytest.mark.parametrize("index", range(len(SPECS)))
def test_diagonal_factor_gives_the_diagonal_penalties(index):
    spec = SPECS[index]
    means, _, _ = components("full")
    log_scales = 0.3 * torch.randn(means.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for moment in ("second", "first", "point"):
        spec.moment = moment
        torch.testing.assert_close(component_penalty(spec, means, torch.diag_embed(log_scales.exp()), None),
                                   spec.penalty(means, log_scales))
    spec.moment = "second"


@pytest.mark.parametrize("kind", ["full", "lowrank"])
@pytest.mark.parametrize("index", range(len(SPECS)))
def test_noise_scale_takes_the_noise_free_covariance(kind, index):
    """``noise_scale = s``: the penalty of ``Sigma = Sigma* + s^2 I`` is the noise-free penalty of ``Sigma*``."""
    spec, noise = copy.copy(SPECS[index]), 0.15
    means, factor, diag = components(kind, seed=index)
    if kind == "full":
        eye = torch.eye(factor.shape[-1], dtype=factor.dtype)
        noisy_factor, noisy_diag = torch.linalg.cholesky(factor @ factor.transpose(-1, -2) + noise**2 * eye), None
    else:
        noisy_factor, noisy_diag = factor, diag + noise**2
    for moment in ("second", "first"):
        spec.moment, spec.noise_scale = moment, 0.0
        expected = component_penalty(spec, means, factor, diag)
        spec.noise_scale = noise
        torch.testing.assert_close(component_penalty(spec, means, noisy_factor, noisy_diag), expected)


@pytest.mark.parametrize("index", range(len(SPECS)))
def test_diagonal_factor_with_noise_gives_the_diagonal_penalties(index):
    """With a diagonal factor, ``noise_scale`` clamps each variance at 0 exactly as the diagonal components do."""
    spec = copy.copy(SPECS[index])
    spec.noise_scale = 0.3
    means, _, _ = components("full")
    log_scales = math.log(0.3) + 0.5 * torch.randn(means.shape, generator=torch.Generator().manual_seed(2),
                                                   dtype=torch.float64)  # scales on both sides of the noise
    torch.testing.assert_close(component_penalty(spec, means, torch.diag_embed(log_scales.exp()), None),
                               spec.penalty(means, log_scales))


@pytest.mark.parametrize("kind", ["full", "lowrank"])
def test_gradcheck(kind):
    means, factor, diag = components(kind, B=2, K=2, D=4, R=2)
    for spec in (SPECS[0], physics.Linear(torch.randn(2, 4, dtype=torch.float64)), SPECS[3], SPECS[4]):
        args = [t.requires_grad_(True) for t in (means, factor) + ((diag,) if diag is not None else ())]
        fn = (lambda m, f, d=None: component_penalty(spec, m, f, d))
        assert torch.autograd.gradcheck(fn, args)


def test_mdn_loss_of_a_correlated_mixture():
    means, factor, diag = components("lowrank", B=3, K=2, D=5)
    means.requires_grad_(True)
    logits = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    mixture = physmdn.GaussianMixtureLowRank(logits, means, factor, diag)
    target = torch.randn(3, 5, dtype=torch.float64)
    spec = SPECS[3]
    loss = physics_correlated.mdn_loss(mixture, target, spec, weight=0.5, reduction="none")
    pi = torch.softmax(logits, -1)
    expected = -mixture.to_torch().log_prob(target) + 0.5 * (pi * expected_square(spec, means, factor, diag)).sum(-1)
    torch.testing.assert_close(loss, expected)
    # detached: the penalty sends no gradient to the logits; coupled: it does
    detached = torch.autograd.grad(physics_correlated.physics_penalty(mixture, spec).sum(), logits, allow_unused=True)
    assert detached[0] is None
    (coupled,) = torch.autograd.grad(physics_correlated.physics_penalty(mixture, spec, "coupled").sum(), logits)
    assert bool(coupled.abs().sum() > 0)


def test_specs_without_a_correlated_expectation_are_refused():
    means, factor, diag = components("full")
    with pytest.raises(NotImplementedError, match="Residual\\(mode='sigma'\\) has no expectation"):
        component_penalty(physics.Residual(lambda y, c: y), means, factor, diag)
    # Bounds reads the marginals only: exact under any correlation
    bounds = physics.Bounds(upper=0.5, mode="exact")
    marginal = (factor.square().sum(-1)).sqrt().log()
    torch.testing.assert_close(component_penalty(bounds, means, factor, diag), bounds.penalty(means, marginal))
    with pytest.raises(TypeError, match="mixture must be a GaussianMixtureTril or GaussianMixtureLowRank"):
        physics_correlated.physics_penalty(physmdn.GaussianMixture(torch.zeros(1, 2), torch.zeros(1, 2, 3),
                                                                   torch.zeros(1, 2, 3)), bounds)

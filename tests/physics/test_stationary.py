"""The generator-identity penalty (physmdn.stationary): closed form against Monte Carlo of the same mixture, the
identity on samples of a true stationary law, gradients, input checks and the objective's hook."""

import math

import pytest
import torch

from physmdn import physics
from physmdn.models import MDN
from physmdn.stationary import StationaryLaw, split_physics
from physmdn.training.objective import Objective

from physmdn.problems.stochastic_allen_cahn import mala


def random_law(B, D, generator, pairs="all"):
    """A law with a general (non-symmetric) coupling, a cubic reaction and a noise per context, in float64."""
    coupling = 0.5 * torch.randn(B, D, D, generator=generator, dtype=torch.float64)
    reaction = torch.randn(B, 4, generator=generator, dtype=torch.float64) * torch.tensor([0.3, 1.0, 0.3, 0.5],
                                                                                           dtype=torch.float64)
    reaction[:, 3] = -reaction[:, 3].abs()
    noise = 0.5 + torch.rand(B, generator=generator, dtype=torch.float64)
    return StationaryLaw(coupling, reaction, noise, pairs=pairs)


def random_mixture(B, K, D, generator, requires_grad=False):
    logits = torch.randn(B, K, generator=generator, dtype=torch.float64)
    means = torch.randn(B, K, D, generator=generator, dtype=torch.float64)
    log_scales = -1.0 + 0.3 * torch.randn(B, K, D, generator=generator, dtype=torch.float64)
    return [t.requires_grad_(requires_grad) for t in (logits, means, log_scales)]


def sample_mixture(logits, means, log_scales, n, generator):
    """``n`` draws per context of the diagonal Gaussian mixture: ``[n, B, D]``."""
    B, K, D = means.shape
    k = torch.multinomial(torch.softmax(logits, -1), n, replacement=True, generator=generator).T  # [n, B]
    mu = means[torch.arange(B), k]  # [n, B, D]
    sigma = log_scales.exp()[torch.arange(B), k]
    return mu + sigma * torch.randn(n, B, D, generator=generator, dtype=torch.float64)


def per_sample_identities(coupling, reaction, noise, pairs, y):
    """Plain reference: ``A phi_t (y)`` per draw, not normalized: ``[S, B, T]``."""
    f = torch.einsum("bij,sbj->sbi", coupling, y)
    for p in range(reaction.shape[-1]):
        f = f + reaction[:, p] [:, None] * y**p
    i, j = pairs[:, 0], pairs[:, 1]
    quadratic = y[..., j] * f[..., i] + y[..., i] * f[..., j] + noise.square()[:, None] * (i == j).double()
    return torch.cat([f, quadratic], -1)


# ----- the closed form ------------------------------------------------------------------------------

@pytest.mark.parametrize("pairs, n", [("neighbours", 200_000), ("diagonal", 200_000),
                                      pytest.param("all", 1_000_000, marks=pytest.mark.slow)])
def test_closed_form_matches_monte_carlo_of_the_same_mixture(pairs, n):
    g = torch.Generator().manual_seed(0)
    B, K, D = 2, 3, 4
    law = random_law(B, D, g, pairs=pairs)
    logits, means, log_scales = random_mixture(B, K, D, g)
    closed = law.mixture_terms(logits, means, log_scales)  # [B, T], divided by s^2
    y = sample_mixture(logits, means, log_scales, n, g)
    values = per_sample_identities(law.coupling, law.reaction, law.noise, law.pair_indices(D), y)
    values = values / law.noise.square()[:, None]
    estimate, standard_error = values.mean(0), values.std(0) / math.sqrt(y.shape[0])
    assert closed.shape == (B, D + law.pair_indices(D).shape[0])
    assert ((closed - estimate).abs() <= 5.0 * standard_error + 1e-12).all()
    # the sample estimate of the module is the same plain mean
    assert torch.allclose(law.sample_terms(y), estimate, rtol=1e-10, atol=1e-10)


def test_penalty_is_the_mean_square_of_the_identities_and_unnormalized_keeps_units():
    g = torch.Generator().manual_seed(1)
    law = random_law(3, 5, g, pairs="neighbours")
    mixture = random_mixture(3, 2, 5, g)
    terms = law.mixture_terms(*mixture)
    assert torch.allclose(law.mixture_penalty(*mixture), terms.square().mean(-1))
    raw = StationaryLaw(law.coupling, law.reaction, law.noise, pairs="neighbours", normalize=False)
    assert torch.allclose(raw.mixture_terms(*mixture), terms * law.noise.square()[:, None])


def test_neighbour_pairs_are_the_diagonal_and_the_cyclic_neighbours():
    law = StationaryLaw(torch.zeros(5, 5, dtype=torch.float64), [0.0, 1.0, 0.0, -1.0], 1.0)
    pairs = {tuple(p) for p in law.pair_indices(5).tolist()}
    assert pairs == {(i, i) for i in range(5)} | {(i, i + 1) for i in range(4)} | {(0, 4)}
    assert law.pair_indices(2).tolist() == [[0, 0], [0, 1], [1, 1]]


def test_the_identity_acts_on_the_mixture_not_on_each_component():
    # a symmetric two-well mixture: E f = 0 for the mixture, while neither component's mean drift vanishes
    law = StationaryLaw(torch.zeros(1, 1, dtype=torch.float64), [0.0, 1.0, 0.0, -1.0], 0.5, pairs="diagonal")
    means = torch.tensor([[[1.3], [-1.3]]], dtype=torch.float64)
    log_scales = torch.full((1, 2, 1), math.log(0.3), dtype=torch.float64)
    per_component = law.component_terms(means, log_scales)[..., 0]
    assert per_component.abs().min() > 0.5
    balanced = law.mixture_terms(torch.zeros(1, 2, dtype=torch.float64), means, log_scales)
    assert balanced[0, 0].abs() < 1e-12
    tilted = law.mixture_terms(torch.tensor([[1.0, 0.0]], dtype=torch.float64), means, log_scales)
    assert tilted[0, 0].abs() > 0.1


# ----- the identity on the true law -----------------------------------------------------------------

def test_identity_holds_on_the_exact_one_dimensional_law():
    # D = 1, f = y - y^3: p(y) ∝ exp(-2 (y^4/4 - y^2/2) / s^2); MALA draws, identities within Monte Carlo error
    g = torch.Generator().manual_seed(2)
    s, n = 0.8, 40_000
    noise = torch.full((n, 1), s, dtype=torch.float64)
    y = mala(torch.randn(n, 1, generator=g, dtype=torch.float64), lambda u: (0.25 * u**4 - 0.5 * u**2).sum(-1),
             lambda u: u - u**3, noise, 0.1, 300, g)
    law = StationaryLaw(torch.zeros(1, 1, dtype=torch.float64), [0.0, 1.0, 0.0, -1.0], s, pairs="diagonal")
    values = per_sample_identities(law.coupling, law.reaction, law.noise, law.pair_indices(1), y[:, None, :]) / s**2
    estimate, standard_error = values.mean(0), values.std(0) / math.sqrt(n)
    assert (estimate.abs() <= 5.0 * standard_error).all()
    assert torch.allclose(law.sample_terms(y[:, None, :]), estimate)


# ----- gradients ------------------------------------------------------------------------------------

def test_gradcheck_of_the_penalty_in_logits_means_and_log_scales():
    g = torch.Generator().manual_seed(3)
    law = random_law(2, 3, g, pairs="all")
    inputs = tuple(random_mixture(2, 2, 3, g, requires_grad=True))
    assert torch.autograd.gradcheck(law.mixture_penalty, inputs)
    grad_logits = torch.autograd.grad(law.mixture_penalty(*inputs).sum(), inputs[0])[0]
    assert grad_logits.abs().max() > 1e-6  # the penalty moves the weights by design


# ----- input checks ---------------------------------------------------------------------------------

def test_bad_input_names_the_argument():
    A = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="coupling must be a floating-point tensor"):
        StationaryLaw(torch.zeros(3, 3, dtype=torch.long), [0.0, 1.0], 1.0)
    with pytest.raises(ValueError, match=r"coupling must be \[D, D\] or \[B, D, D\] \(square\), got shape \(3, 2\)"):
        StationaryLaw(torch.zeros(3, 2), [0.0, 1.0], 1.0)
    with pytest.raises(ValueError, match="reaction must be"):
        StationaryLaw(A, torch.zeros(2, 2, 2), 1.0)
    with pytest.raises(ValueError, match="noise must be finite and > 0"):
        StationaryLaw(A, [0.0, 1.0], 0.0)
    with pytest.raises(ValueError, match="noise must be a number, \\[B\\] or \\[B, 1\\]"):
        StationaryLaw(A, [0.0, 1.0], torch.ones(2, 2))
    with pytest.raises(ValueError, match="pairs must be one of"):
        StationaryLaw(A, [0.0, 1.0], 1.0, pairs="nearest")
    with pytest.raises(ValueError, match="pairs must be one of"):
        StationaryLaw(A, [0.0, 1.0], 1.0, pairs=torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="normalize must be a bool"):
        StationaryLaw(A, [0.0, 1.0], 1.0, normalize=1)
    law = StationaryLaw(A, [0.0, 1.0], 1.0)
    z = torch.zeros
    with pytest.raises(ValueError, match=r"coupling must be \[D, D\] with D = 4"):
        law.mixture_penalty(z(2, 2), z(2, 2, 4), z(2, 2, 4))
    with pytest.raises(ValueError, match=r"logits must be \[B, K\] = \(2, 2\)"):
        law.mixture_penalty(z(2, 3), z(2, 2, 3), z(2, 2, 3))
    with pytest.raises(ValueError, match=r"log_scales must be \[B, K, D\]"):
        law.mixture_penalty(z(2, 2), z(2, 2, 3), z(2, 2, 2))
    with pytest.raises(ValueError, match=r"pairs must index outputs in \[0, 3\)"):
        StationaryLaw(A, [0.0, 1.0], 1.0, pairs=torch.tensor([[0, 3]])).mixture_penalty(z(1, 1), z(1, 1, 3),
                                                                                        z(1, 1, 3))
    per_context = StationaryLaw(z(2, 3, 3), [0.0, 1.0], torch.ones(2))
    with pytest.raises(ValueError, match="coupling must hold 1 or B = 5 rows"):
        per_context.mixture_penalty(z(5, 2), z(5, 2, 3), z(5, 2, 3))
    with pytest.raises(ValueError, match=r"y must be a floating-point \[S, B, D\] tensor"):
        law.sample_terms(z(4, 3))
    with pytest.raises(ValueError, match="weight of a mixture penalty must be a finite number >= 0"):
        split_physics([(law, -1.0)])


# ----- the objective's hook -------------------------------------------------------------------------

def test_objective_adds_the_mixture_penalty_beside_component_specs():
    torch.manual_seed(0)
    B, D = 16, 3
    model = MDN(2, D, components=3, hidden=(8,)).double()
    x = torch.randn(B, 2, dtype=torch.float64)
    y = torch.randn(B, D, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    law = random_law(B, D, g, pairs="neighbours")
    spec = physics.Polynomial(torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=torch.float64).reshape(1, 1, 1, 4))
    objective = Objective(model)
    kw = dict(labels=None, regime_weight=0.0, regime_mode="responsibilities", time_weighting="none", generator=None,
              autocast_dtype=None)
    total, terms = objective(x, y, physics=[(spec, 0.5), (law, 2.0)], physics_weight=0.3, **kw)
    mixture = model(x)
    expected = (physics.mdn_loss(mixture.logits, mixture.means, mixture.log_scales, y, physics=[(spec, 0.5)],
                                 weight=0.3)
                + 0.3 * 2.0 * law.mixture_penalty(mixture.logits, mixture.means, mixture.log_scales).mean())
    assert torch.allclose(total, expected, rtol=1e-6)
    only_law, only_terms = objective(x, y, physics=law, physics_weight=0.3, **kw)
    nll = mixture.nll(y).mean()
    penalty = law.mixture_penalty(mixture.logits, mixture.means, mixture.log_scales).mean()
    assert torch.allclose(only_law, nll + 0.3 * penalty, rtol=1e-6)
    assert math.isclose(float(only_terms[2]), float(penalty.detach()), rel_tol=1e-4)  # the reported physics term
    only_law.backward()
    assert model.logits_head.weight.grad.abs().max() > 0

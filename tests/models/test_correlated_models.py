"""Correlated-component mixtures (GaussianMixtureTril / GaussianMixtureLowRank) against torch.distributions, and
MDN(covariance="full" | "lowrank")."""

import math

import pytest
import torch

import physmdn
from physmdn import GaussianMixtureLowRank, GaussianMixtureTril


def tril_mixture(B=4, K=3, D=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K, generator=g, dtype=dtype)
    means = 2.0 * torch.randn(B, K, D, generator=g, dtype=dtype)
    tril = 0.4 * torch.randn(B, K, D, D, generator=g, dtype=dtype).tril(-1)
    tril = tril + torch.diag_embed(0.3 + torch.rand(B, K, D, generator=g, dtype=dtype))
    return GaussianMixtureTril(logits, means, tril)


def lowrank_mixture(B=4, K=3, D=5, R=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K, generator=g, dtype=dtype)
    means = 2.0 * torch.randn(B, K, D, generator=g, dtype=dtype)
    factor = 0.6 * torch.randn(B, K, D, R, generator=g, dtype=dtype)
    diag = 0.05 + 0.3 * torch.rand(B, K, D, generator=g, dtype=dtype)
    return GaussianMixtureLowRank(logits, means, factor, diag)


MIXTURES = [tril_mixture, lowrank_mixture]


@pytest.mark.parametrize("make", MIXTURES)
def test_log_prob_and_moments_match_torch(make):
    mixture = make()
    reference = mixture.to_torch()
    y = torch.randn(6, *mixture.batch_shape, mixture.event_dim, dtype=torch.float64)
    torch.testing.assert_close(mixture.log_prob(y), reference.log_prob(y))
    torch.testing.assert_close(mixture.log_prob(y[0]), reference.log_prob(y[0]))
    torch.testing.assert_close(mixture.mean, reference.mean)
    torch.testing.assert_close(mixture.variance, reference.variance)
    torch.testing.assert_close(mixture.covariance.diagonal(dim1=-2, dim2=-1), reference.variance)
    # the law of total covariance against a plain sum over components
    w = mixture.weights
    dense = reference.component_distribution.covariance_matrix
    second = (w[..., None, None] * (dense + mixture.means.unsqueeze(-1) * mixture.means.unsqueeze(-2))).sum(-3)
    torch.testing.assert_close(mixture.covariance, second - mixture.mean.unsqueeze(-1) * mixture.mean.unsqueeze(-2))
    torch.testing.assert_close(mixture.component_covariance, dense)
    log_joint = mixture.log_weights + reference.component_distribution.log_prob(y.unsqueeze(-2))
    torch.testing.assert_close(mixture.log_responsibilities(y), torch.log_softmax(log_joint, -1))


@pytest.mark.parametrize("make", MIXTURES)
def test_round_trip_and_indexing(make):
    mixture = make()
    back = type(mixture).from_torch(mixture.to_torch())
    y = torch.randn(*mixture.batch_shape, mixture.event_dim, dtype=torch.float64)
    torch.testing.assert_close(back.log_prob(y), mixture.log_prob(y))
    part = mixture[1:3]
    assert part.batch_shape == (2,)
    torch.testing.assert_close(part.log_prob(y[1:3]), mixture.log_prob(y)[1:3])
    assert mixture.to(torch.float32).dtype == torch.float32
    assert mixture.component(1).batch_shape == mixture.batch_shape
    with pytest.raises(TypeError, match="component_distribution must be a"):
        type(mixture).from_torch(physmdn.GaussianMixture(mixture.logits, mixture.means,
                                                         torch.zeros_like(mixture.means)).to_torch())


@pytest.mark.parametrize("make", MIXTURES)
def test_gradients_of_log_prob_match_torch(make):
    mixture = make(B=3, K=2, D=3)
    params = [t.detach().clone().requires_grad_(True) for t in mixture._params()]
    y = torch.randn(3, 3, dtype=torch.float64)
    ours = torch.autograd.grad(type(mixture)(*params).log_prob(y).sum(), params)
    theirs = torch.autograd.grad(type(mixture)(*params).to_torch().log_prob(y).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("make", MIXTURES)
def test_sample_moments(make):
    mixture = make(B=2, K=3, D=3, seed=5)
    y = mixture.sample((200_000,), generator=torch.Generator().manual_seed(0))
    assert y.shape == (200_000, 2, 3)
    centered = y - y.mean(0)
    covariance = torch.einsum("nbi,nbj->bij", centered, centered) / y.shape[0]
    scale = mixture.covariance.diagonal(dim1=-2, dim2=-1).sqrt()
    # standard errors: sd / sqrt(n) for the mean, about sqrt(2) var / sqrt(n) (times the kurtosis) for the covariance
    assert ((y.mean(0) - mixture.mean).abs() / scale).max() < 5 / math.sqrt(200_000)
    assert ((covariance - mixture.covariance).abs() / (scale.unsqueeze(-1) * scale.unsqueeze(-2))).max() < 0.03


@pytest.mark.parametrize("make", MIXTURES)
def test_rsample_reaches_component_parameters_only(make):
    mixture = make(B=2, K=2, D=3)
    params = [t.detach().clone().requires_grad_(True) for t in mixture._params()]
    y = type(mixture)(*params).rsample((5,), generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(y.square().sum(), params, allow_unused=True)
    assert grads[0] is None
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads[1:])


def test_modes_of_well_separated_and_tilted_components():
    # two tilted, well separated components: modes at the means, the weights the component weights
    tril = torch.tensor([[1.0, 0.0], [0.9, 0.3]], dtype=torch.float64).expand(1, 2, 2, 2)
    means = torch.tensor([[[-4.0, -4.0], [4.0, 4.0]]], dtype=torch.float64)
    logits = torch.log(torch.tensor([[0.3, 0.7]], dtype=torch.float64))
    modes = GaussianMixtureTril(logits, means, tril).modes()
    assert int(modes.counts[0]) == 2
    torch.testing.assert_close(modes.locations[0], means[0].flip(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(modes.weights[0], torch.tensor([0.7, 0.3], dtype=torch.float64))
    # overlapping components merge into one maximum where the gradient of log p vanishes
    mixture = GaussianMixtureTril(logits, 0.1 * means, tril)
    modes = mixture.modes()
    assert int(modes.counts[0]) == 1
    x = modes.locations[0, :1].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(mixture.log_prob(x).sum(), x)
    assert grad.abs().max() < 1e-6


def test_modes_of_lowrank_match_those_of_the_same_tril_mixture():
    mixture = lowrank_mixture(B=3, K=3, D=4, seed=2)
    same = GaussianMixtureTril(mixture.logits, mixture.means, mixture.component_scale_tril)
    a, b = mixture.modes(), same.modes()
    torch.testing.assert_close(a.locations, b.locations, equal_nan=True)
    torch.testing.assert_close(a.weights, b.weights)


def test_constructor_errors():
    mixture = tril_mixture()
    with pytest.raises(ValueError, match="scale_tril must be"):
        GaussianMixtureTril(mixture.logits, mixture.means, mixture.scale_tril[..., :2])
    bad = mixture.scale_tril.clone()
    bad[0, 0, 1, 1] = 0.0
    with pytest.raises(ValueError, match="scale_tril must have a positive diagonal"):
        GaussianMixtureTril(mixture.logits, mixture.means, bad, validate_args=True)
    with pytest.raises(ValueError, match="logits must be"):
        GaussianMixtureTril(mixture.logits[:, :2], mixture.means, mixture.scale_tril)
    with pytest.raises(ValueError, match="must broadcast"):
        GaussianMixtureTril(mixture.logits[:3], mixture.means, mixture.scale_tril)
    low = lowrank_mixture()
    with pytest.raises(ValueError, match="cov_diag must be positive"):
        GaussianMixtureLowRank(low.logits, low.means, low.cov_factor, -low.cov_diag, validate_args=True)
    with pytest.raises(ValueError, match="rank 1 <= R <= 8"):
        GaussianMixtureLowRank(low.logits, low.means, torch.zeros(4, 3, 5, 9, dtype=torch.float64), low.cov_diag)
    with pytest.raises(ValueError, match="y must be"):
        low.log_prob(torch.zeros(4, 2, dtype=torch.float64))

"""Correlated-component mixtures (GaussianMixtureTril / GaussianMixtureLowRank) against torch.distributions, and
MDN(covariance="full" | "lowrank")."""

import math

import pytest
import torch

import physmdn
from physmdn import GaussianMixtureLowRank, GaussianMixtureTril
from conftest import rel_err


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
    torch.testing.assert_close(mixture.marginal_scales, dense.diagonal(dim1=-2, dim2=-1).sqrt())
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
def test_rsample_gradients_are_unbiased(make):
    """grad E[f(y)] from implicit-reparameterized draws against the exact gradient of the closed form
    ``E[f] = sum_k pi_k (|mu_k|^2 + tr Sigma_k + mu_k1 mu_k2 + Sigma_k12)`` for ``f(y) = |y|^2 + y_1 y_2``;
    the weights (logits) included, which a component-wise reparameterization would miss. Overlapping components:
    across a gap of low density the estimator's variance is large (as for the diagonal mixtures)."""
    mixture = make(B=2, K=3, D=3, seed=3)
    params = [t.detach().clone().requires_grad_(True) for t in mixture._params()]
    params[1] = (0.3 * params[1]).detach().requires_grad_(True)

    def f(y):
        return y.square().sum(-1) + y[..., 0] * y[..., 1]

    rebuilt = type(mixture)(*params)
    estimate = torch.autograd.grad(f(rebuilt.rsample((200_000,), generator=torch.Generator().manual_seed(0))).mean(0)
                                   .sum(), params)
    sigma = rebuilt.component_covariance
    exact_value = (rebuilt.weights * (f(rebuilt.means) + sigma.diagonal(dim1=-2, dim2=-1).sum(-1)
                                      + sigma[..., 0, 1])).sum()
    exact = torch.autograd.grad(exact_value, params)
    for name, a, b in zip(("logits", "means") + type(mixture)._PARAMS, estimate, exact):
        assert rel_err(a, b) < 0.05, (name, rel_err(a, b))
    assert bool(estimate[0].abs().sum() > 0)


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


# ----- MDN(covariance=...) -------------------------------------------------------------------------------------


@pytest.mark.parametrize("covariance,rank", [("full", None), ("lowrank", 3)])
def test_mdn_maps_standardized_covariance_to_physical_units(covariance, rank):
    """With a normalization set, the covariance of the physical mixture is diag(s) Sigma_std diag(s): the same
    network evaluated without normalization (identity) gives Sigma_std."""
    torch.manual_seed(0)
    model = physmdn.MDN(2, 3, 2, hidden=(8,), covariance=covariance, rank=rank, min_scale=1e-8).double()
    x = torch.randn(5, 2, dtype=torch.float64)
    standard = model(x)
    scale = torch.tensor([2.0, 0.5, 10.0], dtype=torch.float64)
    model.y_loc.copy_(torch.tensor([1.0, -3.0, 0.0]))
    model.y_scale.copy_(scale)
    physical = model(x)
    expected = scale[:, None] * standard.component_covariance * scale[None, :]
    torch.testing.assert_close(physical.component_covariance, expected)
    torch.testing.assert_close(physical.means, model.y_loc + scale * standard.means)


def test_mdn_covariance_floor_and_parameters():
    model = physmdn.MDN(1, 4, 3, covariance="full", min_scale=0.05)
    with torch.no_grad():
        model.scales_head.bias.fill_(-30.0)  # drive every raw scale far below the floor
    mixture = model(torch.randn(6, 1))
    assert isinstance(mixture, GaussianMixtureTril)
    marginal = mixture.component_covariance.diagonal(dim1=-2, dim2=-1).sqrt()
    assert bool((marginal >= 0.05 * (1 - 1e-6)).all())
    assert bool((mixture.scale_tril.triu(1) == 0).all())
    low = physmdn.MDN(1, 4, 3, covariance="lowrank", rank=2, min_scale=0.05)
    with torch.no_grad():
        low.scales_head.bias.fill_(-30.0)
    mixture = low(torch.randn(6, 1))
    assert isinstance(mixture, GaussianMixtureLowRank) and mixture.cov_factor.shape == (6, 3, 4, 2)
    assert bool((mixture.cov_diag >= 0.05**2 * (1 - 1e-6)).all())
    assert physmdn.models.build_model("MDN", low.config).rank == 2
    assert "covariance" not in physmdn.MDN(1, 2, 2).config  # diagonal models keep their config
    with pytest.raises(ValueError, match="covariance must be one of"):
        physmdn.MDN(1, 2, 2, covariance="dense")
    with pytest.raises(ValueError, match="rank must be an integer in \\[1, 8\\]"):
        physmdn.MDN(1, 2, 2, covariance="lowrank", rank=9)
    with pytest.raises(ValueError, match="rank is for covariance='lowrank'"):
        physmdn.MDN(1, 2, 2, covariance="full", rank=2)
    with pytest.raises(ValueError, match="out_features must be <= 32"):
        physmdn.MDN(1, 33, 2, covariance="full")
    assert model.config["max_condition"] == 1e4
    with pytest.raises(ValueError, match="max_condition must be a finite number >= 1, got 0.5"):
        physmdn.MDN(1, 2, 2, covariance="full", max_condition=0.5)
    with pytest.raises(ValueError, match="max_condition must be a finite number"):
        physmdn.MDN(1, 2, 2, covariance="full", max_condition=float("inf"))
    with pytest.raises(ValueError, match="max_condition is for covariance='full', got max_condition=100.0 with "
                                         "covariance='lowrank'"):
        physmdn.MDN(1, 2, 2, covariance="lowrank", max_condition=100.0)


def _correlation_condition(mixture) -> torch.Tensor:
    """The condition number of every component's correlation matrix ``[B, K]``, in float64."""
    cov = mixture.component_covariance.double()
    std = cov.diagonal(dim1=-2, dim2=-1).sqrt()
    eigenvalues = torch.linalg.eigvalsh(cov / std[..., :, None] / std[..., None, :])
    return eigenvalues[..., -1] / eigenvalues[..., 0]


@pytest.mark.parametrize("max_condition", [1.0, 10.0, 1e4])
def test_mdn_full_correlation_condition_is_bounded(max_condition):
    """However large the correlation head's output, C = (1 - a) I + a W W^T keeps cond(C) <= max_condition; the
    bound 1 is the diagonal model."""
    torch.manual_seed(0)
    model = physmdn.MDN(1, 8, 3, hidden=(8,), covariance="full", max_condition=max_condition)
    with torch.no_grad():
        model.correlation_head.bias.normal_(0.0, 1e3)
        mixture = model(torch.randn(5, 1))
    condition = _correlation_condition(mixture)
    assert bool(torch.isfinite(mixture.scale_tril).all())
    assert float(condition.max()) <= max_condition * (1 + 1e-3), condition
    if max_condition == 1.0:
        cov = mixture.component_covariance
        torch.testing.assert_close(cov, torch.diag_embed(cov.diagonal(dim1=-2, dim2=-1)))


def test_mdn_full_stays_well_conditioned_on_few_fields(one_thread):
    """A few noisy 16-point fronts (two branches, one shape parameter: the sample covariance of a component is nearly
    singular): the likelihood rewards ever sharper correlated directions. An unbounded Cholesky factor takes the
    correlation's condition number past 1e8 within 50 steps here (and on the 32-point fields of physmdn.problems the
    loss to NaN); bounded, it stays <= max_condition and every loss is finite."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 1, generator=g)
    sign = torch.where(torch.rand(32, 1, generator=g) < 0.5, -1.0, 1.0)
    y = sign * torch.tanh((torch.linspace(0, 1, 16) - 0.3 - 0.4 * x) / 0.1) + 0.02 * torch.randn(32, 16, generator=g)
    torch.manual_seed(0)
    model = physmdn.MDN(1, 16, 2, hidden=(32,), covariance="full")
    model.set_normalization(x, y)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(150):
        optimizer.zero_grad()
        loss = model(x).nll(y).mean()
        assert math.isfinite(loss.item()), step
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 49:
            with torch.no_grad():
                condition = float(_correlation_condition(model(x)).max())
            assert condition <= 1e4 * (1 + 1e-3), (step, condition)
    assert loss.item() < -15.0  # and it fits (about -24 nats after 150 steps)


def test_fit_learns_the_correlation_of_a_noisy_line(one_thread):
    """y on a noisy line y2 = 2 y1 + noise (y1 spread by x): a full-covariance component follows the line, a diagonal
    one cannot; the held-out NLL of the full model is clearly lower."""
    g = torch.Generator().manual_seed(0)

    def data(n):
        x = torch.rand(n, 1, generator=g)
        y1 = x[:, 0] + 0.5 * torch.randn(n, generator=g)
        y2 = 2.0 * y1 + 0.05 * torch.randn(n, generator=g)
        return x, torch.stack([y1, y2], -1)

    train, test = data(2048), data(1024)
    nll = {}
    for covariance in ("diag", "full", "lowrank"):
        torch.manual_seed(0)
        model = physmdn.MDN(1, 2, 1, hidden=(16,), covariance=covariance, rank=1 if covariance == "lowrank" else None)
        physmdn.fit(model, train, epochs=30, batch_size=256, lr=1e-2, progress=False)
        with torch.no_grad():
            nll[covariance] = float(model(test[0]).nll(test[1]).mean())
    # the exact NLL of the data is about 0.27 + (-2.3) ~ -2.0 nats; a diagonal Gaussian pays the full spread of y2
    assert nll["full"] < nll["diag"] - 1.0, nll
    assert nll["lowrank"] < nll["diag"] - 1.0, nll


def test_fit_with_physics_and_rebuild_from_config(one_thread):
    """physics= reaches the correlated penalty (its term is reported), and the model rebuilds from its config."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(256, 1, generator=g)
    y = torch.stack([x[:, 0], 1.0 - x[:, 0]], -1) + 0.05 * torch.randn(256, 2, generator=g)
    model = physmdn.MDN(1, 2, 2, hidden=(8,), covariance="full")
    law = physmdn.physics.Linear([[1.0, 1.0]], [1.0])  # y1 + y2 = 1
    result = physmdn.fit(model, (x, y), epochs=2, batch_size=128, physics=law, physics_weight=0.5, progress=False)
    assert result.history[-1]["train_physics"] > 0
    twin = physmdn.models.build_model("MDN", model.config)
    twin.load_state_dict(model.state_dict())
    torch.testing.assert_close(twin(x[:5]).scale_tril, model(x[:5]).scale_tril)


@pytest.mark.slow
@pytest.mark.parametrize("covariance,rank", [("full", None), ("lowrank", 2)])
def test_model_and_likelihood_compile_in_one_graph(covariance, rank):
    torch._dynamo.reset()
    model = physmdn.MDN(2, 3, 4, hidden=(8,), covariance=covariance, rank=rank)
    x, y = torch.randn(16, 2), torch.randn(16, 3)
    compiled = torch.compile(lambda x, y: model(x).nll(y).mean(), fullgraph=True)(x, y)
    torch.testing.assert_close(compiled, model(x).nll(y).mean())

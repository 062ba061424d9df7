"""GaussianMixture against torch.distributions, closed forms, Monte Carlo and brute-force grids."""

import itertools
import math

import pytest
import torch

from physmdn import reference
from physmdn.distributions import GaussianMixture


pytestmark = pytest.mark.usefixtures("one_thread")


def make_mixture(B=5, K=3, D=2, seed=0, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K, generator=g, dtype=dtype)
    means = 2.0 * torch.randn(B, K, D, generator=g, dtype=dtype)
    log_scales = 0.3 * torch.randn(B, K, D, generator=g, dtype=dtype) - 0.5
    params = [t.requires_grad_(requires_grad) for t in (logits, means, log_scales)]
    return GaussianMixture(*params), params


# ----- densities -----------------------------------------------------------------------------------

@pytest.mark.parametrize("B,K,D", [(1, 1, 1), (5, 3, 2), (7, 4, 3)])
def test_log_prob_matches_torch_distributions(B, K, D):
    gm, (logits, means, log_scales) = make_mixture(B, K, D)
    y = torch.randn(B, D, dtype=torch.float64)
    expected = gm.to_torch().log_prob(y)
    torch.testing.assert_close(gm.log_prob(y), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gm.nll(y), -expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gm.nll(y), reference.mixture_nll(logits, means, log_scales, y), rtol=1e-10, atol=1e-10)


def test_log_prob_with_sample_dimensions():
    gm, _ = make_mixture(4, 3, 2)
    y = torch.randn(6, 5, 4, 2, dtype=torch.float64)  # [*S = (6, 5), B, D]
    out = gm.log_prob(y)
    assert out.shape == (6, 5, 4)
    torch.testing.assert_close(out, gm.to_torch().log_prob(y), rtol=1e-10, atol=1e-10)


def test_log_prob_gradients_match_torch():
    gm, params = make_mixture(4, 3, 2, requires_grad=True)
    y = torch.randn(4, 2, dtype=torch.float64)
    grads = torch.autograd.grad(gm.log_prob(y).sum(), params)
    expected = torch.autograd.grad(gm.to_torch().log_prob(y).sum(), params)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


def test_responsibilities_are_bayes_posteriors():
    gm, (logits, means, log_scales) = make_mixture(5, 3, 2)
    y = torch.randn(2, 5, 2, dtype=torch.float64)
    r = gm.responsibilities(y)
    assert r.shape == (2, 5, 3)
    for s in range(2):
        joint = torch.log_softmax(logits, -1) + reference.component_log_density(means, log_scales, y[s])
        torch.testing.assert_close(r[s], torch.softmax(joint, -1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.sum(-1), torch.ones(2, 5, dtype=torch.float64))


def test_component_is_the_kth_gaussian():
    gm, (_, means, log_scales) = make_mixture(5, 3, 2)
    y = torch.randn(5, 2, dtype=torch.float64)
    comp = gm.component(1)
    assert comp.batch_shape == (5,) and comp.event_shape == (2,)
    expected = torch.distributions.Normal(means[:, 1], log_scales[:, 1].exp()).log_prob(y).sum(-1)
    torch.testing.assert_close(comp.log_prob(y), expected)
    with pytest.raises(IndexError, match=r"k must be .* \[0, 3\), got 3"):
        gm.component(3)


# ----- moments and sampling ------------------------------------------------------------------------

def test_mean_and_covariance_closed_form():
    gm, (logits, means, log_scales) = make_mixture(6, 4, 3)
    w = torch.softmax(logits, -1)
    mean = torch.einsum("bk,bkd->bd", w, means)
    second = torch.einsum("bk,bkij->bij", w, torch.diag_embed(torch.exp(2 * log_scales))
                          + means.unsqueeze(-1) * means.unsqueeze(-2))  # E[y y^T]
    torch.testing.assert_close(gm.mean, mean)
    torch.testing.assert_close(gm.covariance, second - mean.unsqueeze(-1) * mean.unsqueeze(-2))
    torch.testing.assert_close(gm.variance, torch.diagonal(gm.covariance, dim1=-2, dim2=-1))
    assert gm.covariance.shape == (6, 3, 3)


def test_samples_match_moments_and_weights():
    gm, (logits, means, log_scales) = make_mixture(3, 3, 2, seed=1)
    g = torch.Generator().manual_seed(0)
    n = 40_000
    s = gm.sample(n, generator=g)
    assert s.shape == (n, 3, 2) and s.dtype == torch.float64
    se = (gm.variance / n).sqrt()  # standard error of the sample mean
    assert ((s.mean(0) - gm.mean).abs() < 5 * se).all()
    for b in range(3):
        torch.testing.assert_close(torch.cov(s[:, b].T), gm.covariance[b], rtol=0.05, atol=0.05)
    # component frequencies, read off well-separated components (means 0, 10, 20, scale 0.1)
    separated = GaussianMixture(logits, 10.0 * torch.arange(3.0, dtype=torch.float64).view(1, 3, 1).expand(3, 3, 2),
                                torch.full((3, 3, 2), math.log(0.1), dtype=torch.float64))
    chosen = (separated.sample(n, generator=g)[..., 0] / 10.0).round().long()  # [n, B]
    freq = torch.stack([(chosen == k).double().mean(0) for k in range(3)], -1)
    assert (freq - gm.weights).abs().max() < 0.015  # ~6 standard errors at n = 40000


def test_sample_draws_only_the_chosen_component():
    logits = torch.tensor([[0.0, -math.inf, 0.0]])
    means = torch.tensor([[[-1.0], [math.nan], [1.0]]])  # an impossible component holds NaN
    log_scales = torch.tensor([[[-2.0], [math.nan], [-2.0]]])
    # NaN parameters fail torch's argument validation, so it is switched off for this mixture
    gm = GaussianMixture(logits, means, log_scales, validate_args=False)
    s = gm.sample(1000, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(s).all()
    assert 0.4 < (s > 0).float().mean() < 0.6


def test_sample_temperatures():
    gm, (logits, means, _) = make_mixture(4, 3, 2)
    g = torch.Generator().manual_seed(0)
    greedy = gm.sample(50, temperature=0.0, scale_temperature=0.0, generator=g)
    expected = means[torch.arange(4), logits.argmax(-1)]  # [B, D]
    assert torch.equal(greedy, expected.expand(50, 4, 2))
    at_means = gm.sample(200, scale_temperature=0.0, generator=g)  # every draw sits on some component mean
    distance = (at_means.unsqueeze(2) - means.unsqueeze(0)).abs().amax(-1).amin(-1)
    assert distance.max() < 1e-12
    # reproducible with a generator
    assert torch.equal(gm.sample(5, generator=torch.Generator().manual_seed(3)),
                       gm.sample(5, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0, got -1"):
        gm.sample(3, temperature=-1.0)
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        gm.sample(0)


# ----- modes ---------------------------------------------------------------------------------------

def grid_maxima_1d(gm: GaussianMixture, b: int, lo=-6.0, hi=6.0, n=24001):
    grid = torch.linspace(lo, hi, n, dtype=torch.float64)
    logp = gm[b].log_prob(grid.view(n, 1, 1)).squeeze(-1)
    inner = (logp[1:-1] > logp[:-2]) & (logp[1:-1] > logp[2:])
    return grid[1:-1][inner]


def test_modes_two_branches_and_merged_unimodal():
    logits = torch.zeros(3, 2, dtype=torch.float64)
    means = torch.tensor([[[-1.0], [1.0]],  # separated: 2 modes
                          [[-0.5], [0.5]],  # sigma 1: one mode at 0
                          [[0.0], [0.0]]],  # identical components: one mode
                         dtype=torch.float64)
    log_scales = torch.tensor([[[-2.0], [-2.0]], [[0.0], [0.0]], [[0.0], [0.0]]], dtype=torch.float64)
    gm = GaussianMixture(logits, means, log_scales)
    modes = gm.modes()
    assert modes.counts.tolist() == [2, 1, 1]
    assert modes.locations.shape == (3, 2, 1) and modes.mask.tolist() == [[True, True], [True, False], [True, False]]
    torch.testing.assert_close(modes.locations[0].squeeze(-1).sort().values, torch.tensor([-1.0, 1.0], dtype=torch.float64),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(modes.locations[1:, 0, 0], torch.zeros(2, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.isnan(modes.locations[1, 1]).all() and modes.densities[1, 1] == 0
    # densities are the mixture density at the modes
    torch.testing.assert_close(modes.log_densities[0], gm[0].log_prob(modes.locations[0].view(2, 1, 1)).squeeze(-1))
    unpadded = modes.to_list()
    assert [len(d) for _, d in unpadded] == [2, 1, 1]


def test_modes_match_grid_search_1d():
    g = torch.Generator().manual_seed(4)
    B, K = 12, 4
    gm = GaussianMixture(torch.randn(B, K, generator=g, dtype=torch.float64),
                         1.5 * torch.randn(B, K, 1, generator=g, dtype=torch.float64),
                         0.4 * torch.randn(B, K, 1, generator=g, dtype=torch.float64) - 0.7)
    modes = gm.modes()
    for b in range(B):
        expected = grid_maxima_1d(gm, b)
        found = modes.locations[b, : modes.counts[b], 0].sort().values
        assert found.numel() == expected.numel(), (b, found, expected)
        torch.testing.assert_close(found, expected, atol=2e-3, rtol=0)
        assert (modes.densities[b, 1: modes.counts[b]] <= modes.densities[b, : modes.counts[b] - 1]).all()


def test_modes_match_grid_search_2d():
    g = torch.Generator().manual_seed(7)
    B, K = 6, 3
    gm = GaussianMixture(torch.randn(B, K, generator=g, dtype=torch.float64),
                         1.2 * torch.randn(B, K, 2, generator=g, dtype=torch.float64),
                         0.3 * torch.randn(B, K, 2, generator=g, dtype=torch.float64) - 0.5)
    modes = gm.modes()
    n = 401
    axis = torch.linspace(-5, 5, n, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 1, 2)
    for b in range(B):
        logp = gm[b].log_prob(grid).view(n, n)
        pad = torch.nn.functional.pad(logp, (1, 1, 1, 1), value=-math.inf)
        neighbours = torch.stack([pad[1 + di: 1 + di + n, 1 + dj: 1 + dj + n]
                                  for di, dj in itertools.product((-1, 0, 1), repeat=2) if (di, dj) != (0, 0)])
        is_max = (logp.unsqueeze(0) > neighbours).all(0)
        expected = grid.view(n, n, 2)[is_max]
        found = modes.locations[b, : modes.counts[b]]
        assert found.shape[0] == expected.shape[0], (b, found, expected)
        distance = torch.cdist(found, expected)
        assert distance.amin(1).max() < 0.04 and distance.amin(0).max() < 0.04


# ----- regimes and validation ----------------------------------------------------------------------

def test_regime_loss_logits_and_responsibilities():
    gm, (logits, means, log_scales) = make_mixture(5, 3, 2)
    labels = torch.tensor([0, -1, 2, 1, -1])
    y = torch.randn(5, 2, dtype=torch.float64)
    ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-1, reduction="sum") / 5
    torch.testing.assert_close(gm.regime_loss(labels), ce)
    log_r = gm.responsibilities(y).log()
    known = labels >= 0
    expected = -log_r[known.nonzero().flatten(), labels[known]].sum() / 5
    torch.testing.assert_close(gm.regime_loss(labels, y, mode="responsibilities"), expected)
    assert gm.regime_loss(torch.full((5,), -1)) == 0
    with pytest.raises(ValueError, match=r"labels must be in \[-1, 2\].*got values in \[0, 3\]"):
        gm.regime_loss(torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match="target must be given"):
        gm.regime_loss(labels, mode="responsibilities")


def test_constructor_and_observation_errors_name_argument_expected_actual():
    with pytest.raises(ValueError, match=r"logits must be \[B, K\] = \(2, 3\) to match means, got shape \(2, 4\)"):
        GaussianMixture(torch.zeros(2, 4), torch.zeros(2, 3, 1), torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match=r"means must have K >= 1 components, got shape \(2, 0, 1\)"):
        GaussianMixture(torch.zeros(2, 0), torch.zeros(2, 0, 1), torch.zeros(2, 0, 1))
    with pytest.raises(ValueError, match=r"log_scales must be \[B, K, D\] = \(2, 3, 1\)"):
        GaussianMixture(torch.zeros(2, 3), torch.zeros(2, 3, 1), torch.zeros(2, 3, 2))
    with pytest.raises(TypeError, match="log_scales must have the dtype of means"):
        GaussianMixture(torch.zeros(2, 3), torch.zeros(2, 3, 1), torch.zeros(2, 3, 1, dtype=torch.float64))
    gm = GaussianMixture(torch.zeros(2, 3), torch.zeros(2, 3, 1), torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match=r"y must be \[B, D\] = \(2, 1\) or \[\*S, B, D\], got shape \(3, 1\)"):
        gm.log_prob(torch.zeros(3, 1))


def test_indexing_detach_and_float32():
    gm, _ = make_mixture(5, 3, 2, requires_grad=True)
    sub = gm[1:3]
    assert len(sub) == 2 and torch.equal(sub.means, gm.means[1:3])
    assert len(gm[-1]) == 1 and torch.equal(gm[-1].means, gm.means[-1:])
    assert not gm.detach().means.requires_grad
    single = gm.to(torch.float32)
    y = torch.randn(5, 2)
    torch.testing.assert_close(single.log_prob(y), gm.log_prob(y.double()).float(), rtol=1e-5, atol=1e-5)

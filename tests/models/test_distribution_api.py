"""GaussianMixture as a torch.distributions.Distribution: shapes, broadcasting, torch interchange, CDFs, entropy,
implicit-reparameterization gradients against closed forms, and modes filtered by mass.

References are float64: torch.distributions.MixtureSameFamily, closed-form moments, numerical integration and
brute-force grids."""

import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from physmdn.distributions import GaussianMixture


pytestmark = pytest.mark.usefixtures("one_thread")

BATCH_SHAPES = [(), (3,), (2, 3)]
SAMPLE_SHAPES = [(), (5,), (4, 2)]


def make(batch_shape=(3,), K=3, D=2, seed=0, spread=1.5, requires_grad=False, validate_args=None):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*batch_shape, K, generator=g, dtype=torch.float64)
    means = spread * torch.randn(*batch_shape, K, D, generator=g, dtype=torch.float64)
    log_scales = 0.3 * torch.randn(*batch_shape, K, D, generator=g, dtype=torch.float64) - 0.4
    params = [t.requires_grad_(requires_grad) for t in (logits, means, log_scales)]
    return GaussianMixture(*params, validate_args=validate_args), params


def univariate_torch(gm: GaussianMixture) -> MixtureSameFamily:
    """The D = 1 mixture with scalar events: torch's MixtureSameFamily has a cdf only for these."""
    return MixtureSameFamily(Categorical(logits=gm.logits), Normal(gm.means[..., 0], gm.scales[..., 0]))


# ----- shapes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_shape", BATCH_SHAPES)
@pytest.mark.parametrize("sample_shape", SAMPLE_SHAPES)
def test_sample_rsample_log_prob_shapes(batch_shape, sample_shape):
    gm, _ = make(batch_shape, K=3, D=2)
    assert isinstance(gm, torch.distributions.Distribution)
    assert gm.batch_shape == batch_shape and gm.event_shape == (2,)
    assert gm.has_rsample and gm.support is torch.distributions.constraints.real_vector
    expected = torch.Size(sample_shape) + batch_shape + (2,)
    g = torch.Generator().manual_seed(0)
    for y in (gm.sample(sample_shape, generator=g), gm.rsample(torch.Size(sample_shape), generator=g)):
        assert y.shape == expected and y.dtype == torch.float64
        assert gm.log_prob(y).shape == torch.Size(sample_shape) + batch_shape
        assert gm.log_responsibilities(y).shape == torch.Size(sample_shape) + batch_shape + (3,)
    for value in (gm.mean, gm.variance, gm.stddev, gm.mode):
        assert value.shape == batch_shape + (2,)
    assert gm.entropy(num_samples=16).shape == batch_shape
    modes = gm.modes()
    assert modes.locations.shape == batch_shape + (3, 2) and modes.counts.shape == batch_shape


@pytest.mark.parametrize("batch_shape", BATCH_SHAPES)
def test_sample_int_and_default_shapes(batch_shape):
    gm, _ = make(batch_shape, D=2)
    assert gm.sample().shape == batch_shape + (2,)
    assert gm.sample(7).shape == (7,) + batch_shape + (2,)  # an int n means sample_shape (n,)
    assert gm.rsample(7).shape == (7,) + batch_shape + (2,)
    assert gm.sample((0,)).shape == (0,) + batch_shape + (2,)
    with pytest.raises(TypeError, match="sample_shape must be a torch.Size, a tuple of ints or an int, got 2.5"):
        gm.sample(2.5)
    with pytest.raises(ValueError, match=r"sample_shape must hold integers >= 0, got \(-1,\)"):
        gm.sample((-1,))


@pytest.mark.parametrize("batch_shape", BATCH_SHAPES)
def test_samples_follow_the_mixture(batch_shape):
    """Sample means within 5 standard errors of the closed-form mean, per batch element and dimension."""
    gm, _ = make(batch_shape, seed=3)
    n = 20_000
    for y in (gm.sample((n,), generator=torch.Generator().manual_seed(1)),
              gm.rsample((n,), generator=torch.Generator().manual_seed(2))):
        assert ((y.mean(0) - gm.mean).abs() < 5 * (gm.variance / n).sqrt()).all()


# ----- log_prob, broadcasting, expand, torch interchange -------------------------------------------

@pytest.mark.parametrize("batch_shape", BATCH_SHAPES)
def test_log_prob_matches_torch(batch_shape):
    gm, _ = make(batch_shape, K=4, D=3, seed=1)
    reference = gm.to_torch()
    for value_shape in [batch_shape + (3,), (6,) + batch_shape + (3,), (2, 1) + batch_shape + (3,)]:
        y = torch.randn(value_shape, dtype=torch.float64)
        torch.testing.assert_close(gm.log_prob(y), reference.log_prob(y), rtol=1e-10, atol=1e-10)


def test_log_prob_broadcasts_values_against_the_batch():
    gm, _ = make((4,), K=3, D=2, seed=2)
    y = torch.randn(5, 1, 2, dtype=torch.float64)  # [S, 1, D]: each value against every mixture
    out = gm.log_prob(y)
    assert out.shape == (5, 4)
    torch.testing.assert_close(out, gm.to_torch().log_prob(y), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, gm.log_prob(y.expand(5, 4, 2)), rtol=0, atol=0)
    # a single event against a 2-d batch, and a batch of one against many values
    gm2, _ = make((2, 3), seed=3)
    v = torch.randn(2, dtype=torch.float64)
    torch.testing.assert_close(gm2.log_prob(v), gm2.to_torch().log_prob(v), rtol=1e-10, atol=1e-10)
    gm1, _ = make((1,), seed=4)
    w = torch.randn(7, 2, dtype=torch.float64)
    torch.testing.assert_close(gm1.log_prob(w), gm1.to_torch().log_prob(w), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gm1.responsibilities(w), gm1.to_torch().component_distribution.log_prob(
        w.unsqueeze(-2)).add(gm1.log_weights).softmax(-1), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r"y must be \[B, D\] = \(4, 2\) or \[\*S, B, D\], got shape \(3, 2\)"):
        gm.log_prob(torch.zeros(3, 2, dtype=torch.float64))


def test_parameters_broadcast_and_expand():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, generator=g, dtype=torch.float64)  # shared gate [K]
    means = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    log_scales = torch.full((1, 3, 2), -0.5, dtype=torch.float64)
    gm = GaussianMixture(logits, means, log_scales)
    assert gm.batch_shape == (4,)
    full = GaussianMixture(logits.expand(4, 3), means, log_scales.expand(4, 3, 2))
    y = torch.randn(4, 2, dtype=torch.float64)
    torch.testing.assert_close(gm.log_prob(y), full.log_prob(y), rtol=0, atol=0)

    big = gm.expand((5, 4))
    assert isinstance(big, GaussianMixture) and big.batch_shape == (5, 4) and big.event_shape == (2,)
    assert big.means.data_ptr() == gm.means.data_ptr()  # a view
    torch.testing.assert_close(big.log_prob(y), gm.log_prob(y).expand(5, 4), rtol=0, atol=0)
    torch.testing.assert_close(big.mean, gm.mean.expand(5, 4, 2))
    assert big.sample((2,)).shape == (2, 5, 4, 2)
    with pytest.raises(ValueError, match="batch shapes of logits .* must broadcast"):
        GaussianMixture(torch.zeros(2, 3), torch.zeros(4, 3, 1), torch.zeros(4, 3, 1))


@pytest.mark.parametrize("batch_shape", BATCH_SHAPES)
def test_moments_match_torch(batch_shape):
    gm, _ = make(batch_shape, K=4, D=3, seed=6)
    reference = gm.to_torch()
    torch.testing.assert_close(gm.mean, reference.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gm.variance, reference.variance, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gm.stddev, reference.variance.sqrt(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.diagonal(gm.covariance, dim1=-2, dim2=-1), gm.variance)


def test_from_torch_round_trip_and_errors():
    gm, _ = make((2, 3), K=4, D=2, seed=7)
    back = GaussianMixture.from_torch(gm.to_torch())
    assert back.batch_shape == (2, 3) and back.event_shape == (2,)
    torch.testing.assert_close(back.weights, gm.weights, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(back.means, gm.means, rtol=0, atol=0)
    torch.testing.assert_close(back.log_scales, gm.log_scales, rtol=1e-12, atol=1e-12)
    y = torch.randn(5, 2, 3, 2, dtype=torch.float64)
    torch.testing.assert_close(back.log_prob(y), gm.log_prob(y), rtol=1e-12, atol=1e-12)
    # a MixtureSameFamily built by hand, with its own scale parameter
    hand = MixtureSameFamily(Categorical(probs=torch.tensor([0.2, 0.8], dtype=torch.float64)),
                             Independent(Normal(torch.zeros(2, 1, dtype=torch.float64),
                                                torch.tensor([[0.5], [2.0]], dtype=torch.float64)), 1))
    converted = GaussianMixture.from_torch(hand)
    assert converted.batch_shape == () and converted.event_shape == (1,)
    v = torch.linspace(-3, 3, 7, dtype=torch.float64).unsqueeze(-1)
    torch.testing.assert_close(converted.log_prob(v), hand.log_prob(v), rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="mixture must be a torch.distributions.MixtureSameFamily, got Normal"):
        GaussianMixture.from_torch(Normal(0.0, 1.0))
    scalar_events = MixtureSameFamily(Categorical(logits=torch.zeros(2)), Normal(torch.zeros(2), torch.ones(2)))
    with pytest.raises(TypeError, match=r"component_distribution must be Independent\(Normal"):
        GaussianMixture.from_torch(scalar_events)


def test_scales_argument_and_validation():
    gm, (logits, means, log_scales) = make((3,), seed=8)
    by_scales = GaussianMixture(logits, means, scales=log_scales.exp())
    torch.testing.assert_close(by_scales.log_scales, log_scales)
    with pytest.raises(ValueError, match="give exactly one of log_scales and scales, got both"):
        GaussianMixture(logits, means, log_scales, scales=log_scales.exp())
    with pytest.raises(ValueError, match="scales must be > 0, got a minimum of -1"):
        GaussianMixture(logits, means, scales=-torch.ones_like(log_scales), validate_args=True)
    bad = means.clone()
    bad[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="Expected parameter means"):
        GaussianMixture(logits, bad, log_scales, validate_args=True)
    GaussianMixture(logits, bad, log_scales, validate_args=False)  # as torch: no check
    checked = GaussianMixture(logits, means, log_scales, validate_args=True)
    with pytest.raises(ValueError, match="within the support"):
        checked.log_prob(torch.full((3, 2), math.nan, dtype=torch.float64))
    assert checked.expand((2, 3))._validate_args and checked[1:]._validate_args


# ----- CDF and quantiles (D = 1) -------------------------------------------------------------------

@pytest.mark.parametrize("batch_shape", BATCH_SHAPES)
def test_cdf_matches_torch_and_integration(batch_shape):
    gm, _ = make(batch_shape, K=3, D=1, seed=9)
    x = torch.linspace(-4, 4, 9, dtype=torch.float64).view(9, *([1] * len(batch_shape)), 1)
    cdf = gm.cdf(x)
    assert cdf.shape == (9,) + batch_shape
    torch.testing.assert_close(cdf, univariate_torch(gm).cdf(x[..., 0]), rtol=1e-12, atol=1e-12)
    # trapezoid integration of the density from far below up to each x (error ~ h^2 = 1e-8 relative)
    t = torch.linspace(0, 1, 100_001, dtype=torch.float64).view(-1, *([1] * (x.dim())))
    grid = -30.0 + (x + 30.0) * t  # [n, 9, *B, 1]
    integral = torch.trapezoid(gm.log_prob(grid).exp(), grid[..., 0], dim=0)
    torch.testing.assert_close(cdf, integral, rtol=0, atol=1e-8)


@pytest.mark.parametrize("batch_shape", BATCH_SHAPES)
def test_icdf_inverts_cdf_and_has_implicit_gradients(batch_shape):
    gm, params = make(batch_shape, K=3, D=1, seed=10, requires_grad=True)
    x = gm.sample((50,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gm.icdf(gm.cdf(x)), x, rtol=1e-9, atol=1e-9)
    u = torch.rand(40, *batch_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    u.requires_grad_(True)
    y = gm.icdf(u)
    assert y.shape == (40,) + batch_shape + (1,)
    torch.testing.assert_close(gm.cdf(y), u, rtol=0, atol=1e-12)
    # dy/du = 1 / p(y); dy/dtheta = -(dF/dtheta) / p(y)
    grad_u = torch.autograd.grad(y.sum(), u, retain_graph=True)[0]
    torch.testing.assert_close(grad_u, (-gm.log_prob(y.detach())).exp(), rtol=1e-9, atol=0)
    grads = torch.autograd.grad(y.sum(), params)
    expected = torch.autograd.grad((-gm.cdf(y.detach()) / gm.log_prob(y.detach()).exp().detach()).sum(), params)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    ends = gm.icdf(torch.tensor([0.0, 1.0], dtype=torch.float64).view(2, *([1] * len(batch_shape))))
    assert (ends[0] == -math.inf).all() and (ends[1] == math.inf).all()


def test_cdf_and_icdf_need_one_dimension():
    gm, _ = make((3,), D=2)
    with pytest.raises(NotImplementedError,
                       match=r"cdf needs a one-dimensional event \(D = 1\), got event_shape \(2,\)"):
        gm.cdf(torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(NotImplementedError, match="icdf needs a one-dimensional event"):
        gm.icdf(torch.full((3,), 0.5, dtype=torch.float64))


# ----- entropy -------------------------------------------------------------------------------------

@pytest.mark.parametrize("D", [1, 2])
def test_entropy_within_bounds_and_close_to_monte_carlo(D):
    gm, _ = make((2, 3), K=3, D=D, seed=11)
    lower, upper = gm.entropy_bounds()
    estimate = gm.entropy()  # 1024 draws
    assert (lower <= estimate).all() and (estimate <= upper).all()
    torch.testing.assert_close(gm.entropy(), estimate, rtol=0, atol=0)  # fixed seed: repeatable
    n = 200_000
    neg_log_p = -gm.log_prob(gm.sample((n,), generator=torch.Generator().manual_seed(5)))
    reference, spread = neg_log_p.mean(0), neg_log_p.std(0)
    # both are Monte Carlo means: 5 standard errors of their difference
    assert ((estimate - reference).abs() <= 5 * spread * math.sqrt(1 / 1024 + 1 / n)).all()
    assert ((lower <= reference + 5 * spread / math.sqrt(n)) & (reference - 5 * spread / math.sqrt(n) <= upper)).all()


def test_entropy_bounds_closed_forms():
    # one component: the upper bound is the Gaussian entropy, the lower one -log N(mu | mu, 2 S)
    one = GaussianMixture(torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, 1, 2, dtype=torch.float64),
                          torch.tensor([[[0.3, -0.2]]], dtype=torch.float64))
    gaussian = one.component(0).entropy()
    lower, upper = one.entropy_bounds()
    torch.testing.assert_close(upper, gaussian)
    variances = torch.tensor([0.6, -0.4], dtype=torch.float64).exp()  # sigma^2 = exp(2 log sigma)
    torch.testing.assert_close(lower, 0.5 * torch.log(4 * math.pi * variances).sum().view(1))
    # -log p(y) of a D-dim Gaussian is H - D/2 + chi^2_D / 2: standard deviation sqrt(D / 2)
    assert (one.entropy() - gaussian).abs() <= 5 * math.sqrt(2 / 2) / math.sqrt(1024)
    # far-apart components: H -> sum_k pi_k H_k + H(pi), the upper bound
    pi = torch.tensor([0.3, 0.7], dtype=torch.float64)
    apart = GaussianMixture(pi.log().view(1, 2), torch.tensor([[[-50.0], [50.0]]], dtype=torch.float64),
                            torch.zeros(1, 2, 1, dtype=torch.float64))
    lower, upper = apart.entropy_bounds()
    mixing = -(pi * pi.log()).sum()
    torch.testing.assert_close(upper, (mixing + 0.5 * math.log(2 * math.pi * math.e)).view(1))
    torch.testing.assert_close(lower, (mixing + 0.5 * math.log(4 * math.pi)).view(1))
    estimate = apart.entropy()
    assert estimate <= upper and (estimate - upper).abs() <= 5 * math.sqrt(0.5) / math.sqrt(1024)


# ----- rsample gradients against closed forms ------------------------------------------------------

def closed_form_expectation(name, logits, means, log_scales):
    """E[f(y)] for polynomial f, exactly: E[y_d] = sum pi mu_d, E[y_d^2] = sum pi (mu_d^2 + s_d^2),
    E[y_1 y_2] = sum pi mu_1 mu_2 (independent coordinates within a component)."""
    pi = torch.softmax(logits, -1)
    if name == "y0":
        return (pi * means[..., 0]).sum(-1)
    if name == "y0^2":
        return (pi * (means[..., 0] ** 2 + torch.exp(2 * log_scales[..., 0]))).sum(-1)
    if name == "y1^2 + y0":
        return (pi * (means[..., 1] ** 2 + torch.exp(2 * log_scales[..., 1]) + means[..., 0])).sum(-1)
    if name == "y0 y1":
        return (pi * means[..., 0] * means[..., 1]).sum(-1)
    raise ValueError(name)


def polynomial(name, y):
    return {"y0": lambda: y[..., 0], "y0^2": lambda: y[..., 0] ** 2,
            "y1^2 + y0": lambda: y[..., 1] ** 2 + y[..., 0], "y0 y1": lambda: y[..., 0] * y[..., 1]}[name]()


@pytest.mark.parametrize("D,name", [(1, "y0"), (1, "y0^2"), (2, "y0"), (2, "y1^2 + y0"), (2, "y0 y1"), (3, "y0 y1")])
def test_rsample_gradients_match_closed_form(D, name):
    """Monte Carlo gradients of E[f(y)] against the exact gradient, for logits, means and log-scales.

    Each draw gets its own copy of the parameters, so the per-draw gradients g_i are available: their mean is the
    estimate, and std(g_i) / sqrt(N) its standard error. The estimator is unbiased, so by the central limit theorem
    the error exceeds 5 standard errors with probability ~6e-7 per entry (and the seed is fixed). The test has power:
    the exact gradients are many standard errors from 0, so an estimator that ignored the weights (pathwise given
    the component) or the scales would fail.
    """
    g = torch.Generator().manual_seed(100 + D)
    K, N = 3, 100_000
    logits = torch.tensor([0.3, -0.4, 0.1], dtype=torch.float64)
    means = torch.randn(K, D, generator=g, dtype=torch.float64)
    log_scales = 0.2 * torch.randn(K, D, generator=g, dtype=torch.float64) - 0.3
    params = [t.requires_grad_() for t in (logits, means, log_scales)]
    exact = torch.autograd.grad(closed_form_expectation(name, *params), params, allow_unused=True,
                                materialize_grads=True)
    per_draw = [t.detach().expand(N, *t.shape).clone().requires_grad_() for t in (logits, means, log_scales)]
    y = GaussianMixture(*per_draw).rsample(generator=torch.Generator().manual_seed(7))  # [N, D], one draw each
    grads = torch.autograd.grad(polynomial(name, y).sum(), per_draw)
    for label, e, g_i in zip(("logits", "means", "log_scales"), exact, grads):
        estimate, stderr = g_i.mean(0), g_i.std(0) / math.sqrt(N)
        assert ((estimate - e).abs() <= 5 * stderr + 1e-12).all(), (label, estimate, e, stderr)
    logit_grad, logit_se = exact[0], grads[0].std(0) / math.sqrt(N)
    assert logit_grad.abs().max() > 20 * logit_se.max()


def test_rsample_gradient_through_a_float32_mixture_and_impossible_components():
    logits = torch.tensor([[0.0, -math.inf, 0.0]], requires_grad=True)
    means = torch.tensor([[[-1.0], [math.nan], [1.0]]], requires_grad=True)
    log_scales = torch.tensor([[[-0.5], [math.nan], [-0.5]]], requires_grad=True)
    y = GaussianMixture(logits, means, log_scales, validate_args=False).rsample((2000,))
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    grads = torch.autograd.grad(y.square().mean(), (logits, means, log_scales))
    for grad in grads:
        assert torch.isfinite(grad).all()
    assert grads[1][0, 1].item() == 0 and grads[2][0, 1].item() == 0


def test_distribution_composes_with_torch():
    gm, _ = make((4,), D=2, seed=12)
    shifted = torch.distributions.TransformedDistribution(
        gm, [torch.distributions.AffineTransform(torch.ones(2, dtype=torch.float64), 2.0, event_dim=1)])
    y = shifted.rsample((3,))
    assert y.shape == (3, 4, 2)
    torch.testing.assert_close(shifted.log_prob(y), gm.log_prob((y - 1) / 2) - 2 * math.log(2.0))
    joint = torch.distributions.Independent(gm, 1)
    assert joint.batch_shape == () and joint.event_shape == (4, 2)
    torch.testing.assert_close(joint.log_prob(y), gm.log_prob(y).sum(-1))


# ----- modes ---------------------------------------------------------------------------------------

def test_modes_drop_light_components_and_merge_mass():
    # weights 0.6 / 0.3996 / 4e-4 at -3, 3, 10; a light far-off component is its own local maximum
    pi = torch.tensor([0.6, 0.3996, 4e-4], dtype=torch.float64)
    gm = GaussianMixture(pi.log().view(1, 3), torch.tensor([[[-3.0], [3.0], [10.0]]], dtype=torch.float64),
                         torch.full((1, 3, 1), math.log(0.5), dtype=torch.float64))
    default, every = gm.modes(), gm.modes(min_weight=0.0)
    assert default.counts.tolist() == [2] and every.counts.tolist() == [3]
    torch.testing.assert_close(default.locations[0, :2, 0], torch.tensor([-3.0, 3.0], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(every.weights[0], pi, rtol=1e-12, atol=0)
    torch.testing.assert_close(default.weights[0], torch.tensor([0.6, 0.3996, 0.0], dtype=torch.float64))
    assert torch.isnan(default.locations[0, 2]).all() and not default.mask[0, 2]
    assert gm.modes(min_weight=0.5).counts.tolist() == [1]
    # two overlapping components form one mode, which carries both weights
    merged = GaussianMixture(torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64).log(),
                             torch.tensor([[[0.0], [0.3], [8.0]]], dtype=torch.float64),
                             torch.zeros(1, 3, 1, dtype=torch.float64)).modes()
    assert merged.counts.tolist() == [2]
    torch.testing.assert_close(merged.weights[0].sort().values, torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="min_weight must be a number in \\[0, 1\\], got 2"):
        gm.modes(min_weight=2)


def test_mode_is_the_global_maximum():
    # a narrow light component holds the highest density: mode finds it, the default modes() drops it by mass
    pi = torch.tensor([0.995, 0.005], dtype=torch.float64)
    gm = GaussianMixture(pi.log().view(1, 2), torch.tensor([[[0.0], [3.0]]], dtype=torch.float64),
                         torch.tensor([[[0.0], [math.log(1e-3)]]], dtype=torch.float64))
    torch.testing.assert_close(gm.mode, torch.tensor([[3.0]], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(gm.modes().locations[0, 0], torch.tensor([0.0], dtype=torch.float64), atol=1e-6, rtol=0)
    # random mixtures: the grid argmax of the density
    rand, _ = make((2, 4), K=3, D=1, seed=13, spread=1.0)
    grid = torch.linspace(-8, 8, 160_001, dtype=torch.float64).view(-1, 1, 1, 1)
    best = grid[rand.log_prob(grid).argmax(0), 0, 0, 0]  # [2, 4]
    torch.testing.assert_close(rand.mode[..., 0], best, atol=2e-4, rtol=0)

"""MDN and CFM: initialization, shapes, errors, couplings, and learning known conditional mixtures."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from physmdn.distributions import GaussianMixture
from physmdn.models import CFM, MDN, build_model
from physmdn.training import fit
from physmdn.transport import exact_assignment, ot_coupling, sinkhorn_plan, squared_cost


pytestmark = pytest.mark.usefixtures("one_thread")


def bimodal_toy(n: int, seed: int, noise: float = 0.05):
    """Context ``x ~ U[0.1, 1]``, ``y = +-sqrt(x) + noise`` with equal weights."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 + 0.9 * torch.rand(n, 1, generator=g)
    sign = torch.where(torch.rand(n, 1, generator=g) < 0.5, -1.0, 1.0)
    return x, sign * x.sqrt() + noise * torch.randn(n, 1, generator=g)


def true_conditional(x: float, n: int, g: torch.Generator, noise: float = 0.05) -> torch.Tensor:
    sign = torch.where(torch.rand(n, 1, generator=g) < 0.5, -1.0, 1.0)
    return sign * math.sqrt(x) + noise * torch.randn(n, 1, generator=g)


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``2 E|A - B| - E|A - A'| - E|B - B'|`` (V-statistic), >= 0, 0 iff equal distributions."""
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


# ----- MDN -----------------------------------------------------------------------------------------

def test_mdn_forward_shapes_and_bounded_scales():
    torch.manual_seed(0)
    model = MDN(3, 2, 4, hidden=(16, 16), min_scale=1e-3)
    gm = model(torch.randn(7, 3))
    assert isinstance(gm, GaussianMixture)
    assert gm.logits.shape == (7, 4) and gm.means.shape == (7, 4, 2) and gm.log_scales.shape == (7, 4, 2)
    with torch.no_grad():  # drive the raw scale far below the bound: log sigma stays >= log(min_scale), smoothly
        model.scales_head.bias.fill_(-50.0)
    x = torch.randn(7, 3)
    log_scales = model(x).log_scales
    assert (log_scales >= math.log(1e-3)).all() and (log_scales < math.log(1e-3) + 1e-6).all()
    with torch.no_grad():
        model.scales_head.bias.fill_(math.log(0.5))
    log_scales = model(x).log_scales
    assert (log_scales - math.log(0.5)).abs().max() < 0.2  # identity far above the bound (up to small weights)
    log_scales.sum().backward()
    assert model.scales_head.bias.grad.abs().min() > 0


def test_mdn_initialization_has_no_dead_component():
    torch.manual_seed(0)
    K, D = 5, 2
    model = MDN(3, D, K, hidden=(32, 32))
    x = 3.0 * torch.randn(256, 3)
    with torch.no_grad():
        gm = model(x)
    assert (gm.weights - 1.0 / K).abs().max() < 0.05  # near-uniform weights
    centers = gm.means.mean(0)  # [K, D]
    gaps = torch.cdist(centers, centers) + 10 * torch.eye(K)
    assert gaps.min() > 0.3  # spread out, none coincide
    assert centers.abs().max() <= 1.2
    # every component owns part of the standardized target box
    y = torch.rand(4096, D, generator=torch.Generator().manual_seed(1)) * 2 - 1
    r = gm[0:1].responsibilities(y.unsqueeze(1))  # [4096, 1, K]
    assert (r.argmax(-1).flatten().bincount(minlength=K) > 100).all()


def test_mdn_config_rebuilds_the_model():
    torch.manual_seed(0)
    model = MDN(2, 3, 4, hidden=(8, 16), activation="tanh", min_scale=1e-3, dropout=0.1)
    clone = build_model("MDN", model.config)
    clone.load_state_dict(model.state_dict())
    model.eval(), clone.eval()
    x = torch.randn(5, 2)
    torch.testing.assert_close(clone(x).means, model(x).means)
    assert clone.config == model.config and clone.config["hidden"] == [8, 16]


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(in_features=1, out_features=1, components=0), "components must be an integer >= 1, got 0"),
    (dict(in_features=0, out_features=1, components=2), "in_features must be an integer >= 1, got 0"),
    (dict(in_features=1, out_features=-1, components=2), "out_features must be an integer >= 1, got -1"),
    (dict(in_features=1, out_features=1, components=2, hidden=(8, 0)), r"hidden must be a sequence of integers >= 1"),
    (dict(in_features=1, out_features=1, components=2, activation="swish"), r"activation must be one of .*got 'swish'"),
    (dict(in_features=1, out_features=1, components=2, min_scale=0.0), "min_scale must be a finite number > 0, got 0.0"),
])
def test_mdn_bad_configuration(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MDN(**kwargs)


def test_mdn_bad_input_names_shape():
    model = MDN(3, 1, 2, hidden=(4,))
    with pytest.raises(ValueError, match=r"x must be \[B, in_features\] = \[B, 3\], got shape \(5, 2\)"):
        model(torch.zeros(5, 2))
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        model([[0.0, 0.0, 0.0]])


def test_mdn_learns_bimodal_toy_weights_means_and_modes():
    torch.manual_seed(0)
    model = MDN(1, 1, 2, hidden=(32, 32))
    fit(model, bimodal_toy(2000, 0), bimodal_toy(500, 1), epochs=25, batch_size=128, lr=3e-3, progress=False)
    xs = torch.tensor([[0.2], [0.4], [0.6], [0.8], [1.0]])
    model.eval()
    with torch.no_grad():
        gm = model(xs)
    root = xs.sqrt().squeeze(-1)
    assert (gm.weights - 0.5).abs().max() < 0.1, gm.weights
    means = gm.means.squeeze(-1).sort(-1).values  # [B, 2]: lower and upper branch
    assert (means[:, 0] + root).abs().max() < 0.05 and (means[:, 1] - root).abs().max() < 0.05, means
    assert (gm.scales - 0.05).abs().max() < 0.02
    modes = gm.modes()
    assert modes.counts.tolist() == [2] * 5
    found = modes.locations.squeeze(-1).sort(-1).values
    torch.testing.assert_close(found, torch.stack([-root, root], -1), atol=0.05, rtol=0)


# ----- couplings -----------------------------------------------------------------------------------

def test_exact_assignment_is_the_optimal_permutation():
    g = torch.Generator().manual_seed(0)
    source, target = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    cost = squared_cost(source, target)
    index = exact_assignment(cost)
    best = min(itertools.permutations(range(6)), key=lambda p: sum(cost[p[j], j] for j in range(6)))
    assert sorted(index.tolist()) == list(range(6))
    assert index.tolist() == list(best)


def test_sinkhorn_plan_marginals_and_near_exact_coupling():
    g = torch.Generator().manual_seed(1)
    source, target = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    plan = sinkhorn_plan(squared_cost(source, target), epsilon=0.01, iterations=300)
    torch.testing.assert_close(plan.sum(0), torch.full((64,), 1 / 64), atol=1e-6, rtol=0)
    torch.testing.assert_close(plan.sum(1), torch.full((64,), 1 / 64), atol=1e-3, rtol=0)
    exact = ot_coupling(source, target, method="exact")
    approx = ot_coupling(source, target, method="sinkhorn", epsilon=0.01, iterations=300, generator=g)
    cost = lambda idx: (source[idx] - target).square().sum(-1).mean()  # noqa: E731
    independent = (source - target).square().sum(-1).mean()
    assert cost(exact) < 0.5 * independent
    assert cost(approx) < cost(exact) * 1.1 + 1e-6 and cost(approx) < 0.6 * independent
    # "auto" takes the exact solver up to exact_max and Sinkhorn (not a permutation in general) beyond
    assert torch.equal(ot_coupling(source, target, exact_max=64), exact)
    many = ot_coupling(source, target, exact_max=8, generator=g)
    assert many.shape == (64,)


def test_context_weight_keeps_pairs_within_contexts():
    g = torch.Generator().manual_seed(2)
    source, target = torch.randn(32, 1, generator=g), torch.randn(32, 1, generator=g)
    context = torch.arange(32.0).unsqueeze(-1)  # all different: a large weight forces the identity pairing
    index = ot_coupling(source, target, source_context=context, target_context=context, context_weight=1e4)
    assert index.tolist() == list(range(32))
    with pytest.raises(ValueError, match="source_context and target_context must be given"):
        ot_coupling(source, target, context_weight=1.0)


# ----- CFM -----------------------------------------------------------------------------------------

def test_cfm_shapes_samplers_and_errors():
    torch.manual_seed(0)
    model = CFM(2, 3, hidden=(16, 16), time_features=8)
    context = torch.randn(4, 2)
    v = model(torch.randn(4, 3), torch.rand(4), context)
    assert v.shape == (4, 3)
    assert torch.equal(model(torch.zeros(4, 3), 0.5, context), model(torch.zeros(4, 3), torch.full((4, 1), 0.5), context))
    for method in ("euler", "midpoint", "rk4"):
        out = model.sample(context, n=5, steps=4, method=method, generator=torch.Generator().manual_seed(0))
        assert out.shape == (5, 4, 3) and torch.isfinite(out).all()
    out, path = model.sample(context, n=2, steps=3, return_path=True, generator=torch.Generator().manual_seed(0))
    assert path.shape == (4, 2, 4, 3) and torch.equal(path[-1], out)
    assert model.loss(context, torch.randn(4, 3)).dim() == 0
    with pytest.raises(ValueError, match="method must be 'euler', 'midpoint' or 'rk4', got 'heun'"):
        model.sample(context, method="heun")
    with pytest.raises(ValueError, match=r"context must be \[B, in_features\] = \[B, 2\], got shape \(4, 3\)"):
        model.sample(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"target must be \[B, out_features\] = \(4, 3\), got shape \(4, 2\)"):
        model.loss(context, torch.randn(4, 2))
    with pytest.raises(ValueError, match="coupling must be 'independent' or 'ot', got 'sinkhorn'"):
        CFM(2, 3, coupling="sinkhorn")
    with pytest.raises(ValueError, match="time_features must be even"):
        CFM(2, 3, time_features=3)


def test_euler_integrates_a_known_field_exactly():
    """A CFM whose network is replaced by the constant field v = 1 moves every sample by exactly 1."""
    model = CFM(1, 2, hidden=(4,))
    with torch.no_grad():
        for p in model.net.parameters():
            p.zero_()
        model.net[-1].bias.fill_(1.0)
    out, path = model.sample(torch.zeros(3, 1), n=2, steps=8, method="rk4", return_path=True)
    torch.testing.assert_close(out - path[0], torch.ones(2, 3, 2))


def test_cfm_physics_penalty_is_the_endpoint_residual():
    torch.manual_seed(0)
    model = CFM(1, 1, hidden=(16,))
    model.set_normalization(torch.rand(50, 1), torch.randn(50, 1) * 2 + 1)
    x, y = bimodal_toy(32, 3)

    def residual(y_hat, context):  # y^2 = x on both branches
        return y_hat.square() - context

    total, fm, penalty = model.loss(x, y, residual=residual, physics_weight=0.5,
                                    generator=torch.Generator().manual_seed(9), return_terms=True)
    # the same draws by hand: x0, (no OT), t
    g = torch.Generator().manual_seed(9)
    x1 = model.standardize(y)
    x0 = torch.randn(x1.shape, generator=g)
    t = torch.rand((32,), generator=g)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * x1
    v = model(x_t, t, x)
    x1_hat = model.destandardize(x_t + (1 - t[:, None]) * v)
    torch.testing.assert_close(penalty, residual(x1_hat, x).square().mean())
    torch.testing.assert_close(fm, (v - (x1 - x0)).square().mean())
    torch.testing.assert_close(total, fm + 0.5 * penalty)
    penalty.backward()
    assert model.net[0].weight.grad.abs().sum() > 0  # the penalty trains the velocity field
    with pytest.raises(ValueError, match=r"residual must return a tensor \[B\] or \[B, M\] with B = 32, got \(\)"):
        model.loss(x, y, residual=lambda a, b: a.sum())


@pytest.mark.parametrize("coupling", ["independent", "ot"])
def test_cfm_samples_match_the_bimodal_conditional(coupling):
    """Energy distance to the true conditional 0.5 N(-sqrt x, 0.05^2) + 0.5 N(sqrt x, 0.05^2) below 0.03 at three
    contexts; a moment-matched unimodal Gaussian scores > 0.05 there, so the threshold separates them."""
    torch.manual_seed(0)
    model = CFM(1, 1, hidden=(64, 64, 64), coupling=coupling)
    fit(model, bimodal_toy(4000, 0), epochs=40, batch_size=256, lr=3e-3, progress=False)
    model.eval()
    g = torch.Generator().manual_seed(5)
    for xv, method, steps in ((0.2, "euler", 32), (0.5, "midpoint", 16), (0.9, "rk4", 8)):
        samples = model.sample(torch.tensor([[xv]]), n=1000, steps=steps, method=method, generator=g)[:, 0]
        truth = true_conditional(xv, 1000, g)
        unimodal = math.sqrt(xv + 0.05**2) * torch.randn(1000, 1, generator=g)
        assert energy_distance(unimodal, truth) > 0.05
        distance = energy_distance(samples, truth)
        assert distance < 0.03, (coupling, xv, method, distance)
        assert 0.4 < (samples > 0).float().mean() < 0.6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_softplus_matches_torch(dtype):
    from physmdn.models import softplus

    x = torch.cat([torch.linspace(-40, 40, 20001), torch.tensor([0.0, 20.0, 20.5, 1e30, -1e30])]).to(dtype)
    x.requires_grad_(True)
    y = softplus(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    exact = F.softplus(x.detach().double())
    atol = {torch.float32: 2e-6, torch.bfloat16: 0.2}[dtype]  # float32: rounding of values up to 40
    torch.testing.assert_close(y.double(), exact, rtol=0 if dtype == torch.float32 else 1e-2, atol=atol)
    torch.testing.assert_close(g.double(), torch.sigmoid(x.detach().double()), rtol=1e-2, atol=1e-7)
    assert g[x.detach() == 0].item() == 0.5  # the exact derivative at 0, not an autograd artefact of |x|
    specials = torch.tensor([math.inf, -math.inf, math.nan])
    out = softplus(specials)
    assert out[0] == math.inf and out[1] == 0 and torch.isnan(out[2])
    xs = torch.randn(6, 5, dtype=torch.float32).double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: softplus(t.float()).double(), (xs,), eps=1e-3, atol=1e-3)

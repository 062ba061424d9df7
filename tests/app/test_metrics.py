"""Metrics on cases with known values: closed forms, scipy references, identities."""

import math

import pytest
import torch
from scipy import stats

from physmdn import metrics as M
from physmdn import problems as P
from physmdn import reference
from physmdn.distributions import GaussianMixture


def gen(seed):
    return torch.Generator().manual_seed(seed)


def normal_abs_mean(mu, s):
    """E|Z| for Z ~ N(mu, s^2)."""
    return s * math.sqrt(2 / math.pi) * math.exp(-mu * mu / (2 * s * s)) + mu * (1 - 2 * stats.norm.cdf(-mu / s))


# ----- energy distance ------------------------------------------------------------------------------

def test_energy_distance_of_shifted_gaussians_matches_closed_form():
    g = gen(0)
    B, n, mu = 16, 1500, 1.0
    x = torch.randn(B, n, 1, generator=g, dtype=torch.float64)
    y = torch.randn(B, n, 1, generator=g, dtype=torch.float64) + mu
    value = M.energy_distance(x, y)
    assert value.shape == (B,)
    # 2 E|X - Y| - E|X - X'| - E|Y - Y'| with X - Y ~ N(-mu, 2), X - X' ~ N(0, 2)
    expected = 2 * normal_abs_mean(mu, math.sqrt(2)) - 2 * normal_abs_mean(0.0, math.sqrt(2))
    assert value.mean().item() == pytest.approx(expected, abs=0.03)


def test_energy_distance_is_the_square_of_scipys_and_zero_for_identical_sets():
    g = gen(1)
    x = torch.randn(300, 1, generator=g, dtype=torch.float64)
    y = 0.5 * torch.randn(170, 1, generator=g, dtype=torch.float64) + 0.3
    assert M.energy_distance(x, y).item() == pytest.approx(stats.energy_distance(x[:, 0], y[:, 0]) ** 2, rel=1e-10)
    z = torch.randn(4, 200, 5, generator=g)
    assert torch.all(M.energy_distance(z, z) == 0)
    assert M.energy_distance(z, z + 1).min() > 0.1


# ----- MMD ------------------------------------------------------------------------------------------

def test_mmd_of_shifted_gaussians_matches_closed_form():
    g = gen(2)
    B, n, mu, h = 16, 1000, 1.0, 1.0
    x = torch.randn(B, n, 1, generator=g, dtype=torch.float64)
    y = torch.randn(B, n, 1, generator=g, dtype=torch.float64) + mu
    # E k(X, X') = h / sqrt(h^2 + 2), E k(X, Y) = h / sqrt(h^2 + 2) exp(-mu^2 / (2 (h^2 + 2)))
    expected = 2 * h / math.sqrt(h * h + 2) * (1 - math.exp(-mu * mu / (2 * (h * h + 2))))
    unbiased = M.mmd(x, y, bandwidth=h, unbiased=True)
    assert unbiased.mean().item() == pytest.approx(expected, abs=0.015)  # ~3 standard errors
    # the V-statistic adds the diagonal: (1 - E_U k(X, X')) / n + (1 - E_U k(Y, Y')) / n
    biased = M.mmd(x, y, bandwidth=h)
    assert (biased - unbiased).mean().item() == pytest.approx(2 * (1 - h / math.sqrt(h * h + 2)) / n, rel=0.02)


def test_mmd_identical_sets_near_zero_and_grows_with_the_shift():
    g = gen(3)
    x = torch.randn(400, 3, generator=g, dtype=torch.float64)
    assert M.mmd(x, x).item() == 0.0
    same = M.mmd(x, torch.randn(400, 3, generator=g, dtype=torch.float64), unbiased=True).item()
    assert abs(same) < 0.01
    shifts = [M.mmd(x, x + d).item() for d in (0.25, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(shifts, shifts[1:]))


def test_median_bandwidth_is_the_median_pairwise_distance():
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[3.0]])
    assert M.median_bandwidth(x, y).item() == pytest.approx(2.0)  # distances 1, 3, 2


# ----- Wasserstein ----------------------------------------------------------------------------------

def test_w1_of_shifted_samples_is_the_shift_and_matches_scipy():
    g = gen(4)
    a = torch.randn(500, generator=g, dtype=torch.float64)
    assert M.wasserstein_1d(a, a + 0.7).item() == pytest.approx(0.7, abs=1e-12)
    b = 2.0 * torch.rand(333, generator=g, dtype=torch.float64) - 0.2
    assert M.wasserstein_1d(a, b).item() == pytest.approx(stats.wasserstein_distance(a, b), rel=1e-12)
    batch_a = torch.randn(3, 4, 50, generator=g, dtype=torch.float64)
    batch_b = torch.randn(3, 4, 70, generator=g, dtype=torch.float64)
    out = M.wasserstein_1d(batch_a, batch_b)
    assert out.shape == (3, 4)
    assert out[2, 1].item() == pytest.approx(stats.wasserstein_distance(batch_a[2, 1], batch_b[2, 1]), rel=1e-12)


def test_sliced_w1_is_exact_in_one_dimension_and_matches_the_sphere_average():
    g = gen(5)
    x = torch.randn(2, 400, 1, generator=g, dtype=torch.float64)
    assert torch.allclose(M.sliced_wasserstein(x, x - 1.5), torch.full((2,), 1.5, dtype=torch.float64), atol=1e-12)
    # a shift c in D dims: SW1 = |c| E|theta_1| = |c| Gamma(D/2) / (sqrt(pi) Gamma((D + 1) / 2))
    D = 3
    z = torch.randn(100, D, generator=g, dtype=torch.float64)  # a pure shift: each slice's W1 is |theta . c|
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    expected = c.norm().item() * math.gamma(D / 2) / (math.sqrt(math.pi) * math.gamma((D + 1) / 2))
    assert M.sliced_wasserstein(z, z + c, n_projections=4000).item() == pytest.approx(expected, rel=0.03)
    assert M.sliced_wasserstein(z, z).item() == 0.0


def test_conditional_averages_per_context_values():
    g = gen(6)
    model = torch.randn(200, 5, 2, generator=g)  # [n, B, D]
    truth = torch.randn(150, 5, 2, generator=g) + torch.arange(5.0).view(1, 5, 1)
    per = M.conditional(M.energy_distance, model, truth, reduction="none")
    assert per.shape == (5,)
    assert per[3].item() == pytest.approx(M.energy_distance(model[:, 3], truth[:, 3]).item(), rel=1e-6)
    assert M.conditional(M.energy_distance, model, truth).item() == pytest.approx(per.mean().item(), rel=1e-6)
    assert torch.all(per[1:] > per[:-1])  # farther contexts, larger distance
    with pytest.raises(ValueError, match=r"must share B and D"):
        M.conditional(M.energy_distance, model, truth[:, :4])


# ----- calibration ----------------------------------------------------------------------------------

def test_calibration_of_the_true_gaussian_is_nominal_and_a_narrow_model_undercovers():
    g = gen(7)
    truth = torch.randn(400, 30, 2, generator=g)
    cal = M.calibration(torch.randn(4000, 30, 2, generator=g), truth)
    assert cal.coverage.shape == (4, 2)
    assert torch.allclose(cal.coverage, cal.levels[:, None].expand(4, 2), atol=0.02)
    assert cal.error < 0.015
    s = 0.5
    narrow = M.calibration(s * torch.randn(4000, 30, 2, generator=g), truth)
    # interval +-s z_l covers 2 Phi(s z_l) - 1 of N(0, 1)
    expected = torch.tensor([2 * stats.norm.cdf(s * stats.norm.ppf((1 + l) / 2)) - 1 for l in (0.5, 0.8, 0.9, 0.95)],
                            dtype=torch.float64)
    assert torch.allclose(narrow.coverage, expected[:, None].expand(4, 2), atol=0.02)
    assert narrow.error > 0.2
    assert "| 0.95 |" in narrow.table()
    with pytest.raises(ValueError, match=r"levels must be numbers in \(0, 1\)"):
        M.calibration(truth, truth, levels=(0.5, 1.0))


# ----- mode weights ---------------------------------------------------------------------------------

def test_mode_weight_error_known_values_for_the_pitchfork():
    pf = P.get("pitchfork")
    ctx = torch.tensor([[-0.5], [0.25], [0.64], [1.0]], dtype=torch.float64)
    one_branch = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0, 1.0, 0]], dtype=torch.float64)
    per = M.mode_weight_error(one_branch, ctx, pf, reduction="none")
    assert torch.allclose(per, torch.tensor([0.0, 0.5, 0.5, 0.5], dtype=torch.float64))
    assert M.mode_weight_error(one_branch, ctx, pf).item() == pytest.approx(0.375)
    # samples of the truth itself: frequencies within sampling error of the true weights
    truth = pf.sample_truth(ctx, 4000, seed=0)
    assert M.mode_weight_error(truth, ctx, pf).item() < 0.03
    # a model that always lands on +sqrt(r)
    upper_only = ctx[:, 0].clamp(min=0).sqrt().view(1, 4, 1).expand(100, 4, 1)
    assert M.mode_weight_error(upper_only, ctx, pf).item() == pytest.approx(0.375)
    with pytest.raises(ValueError, match="has no closed-form true_weights"):
        M.mode_weight_error(truth[:, :, :0].new_zeros(10, 4, 32), ctx.new_zeros(4, 3), P.get("allen_cahn"))


def test_component_branch_weights_read_the_mixture():
    pf = P.get("pitchfork")
    r = torch.tensor([0.25, 0.81], dtype=torch.float64)
    means = torch.stack([r.sqrt(), -r.sqrt(), r.sqrt()], dim=1).unsqueeze(-1)  # [B, 3, 1]
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]], dtype=torch.float64))
    mix = GaussianMixture(logits, means, torch.full_like(means, -3.0))
    weights = M.component_branch_weights(mix, r.view(2, 1), pf)
    assert torch.allclose(weights, torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.9, 0.1]], dtype=torch.float64))


def test_branch_frequencies_of_hugoniot_truth_match_regime_odds():
    hg = P.get("hugoniot")
    ctx = torch.tensor([[0.35], [1.1]])
    freq = M.branch_frequencies(hg.sample_truth(ctx, 4000, seed=1), ctx, hg)
    assert torch.allclose(freq, hg.true_weights(ctx).double(), atol=0.04)


# ----- physics residual and likelihood ---------------------------------------------------------------

def test_physics_residual_zero_on_truth_and_equal_to_a_known_shift():
    hg = P.get("hugoniot", noise=0.0)
    ctx = hg.sample_contexts(20, seed=0, dtype=torch.float64)
    truth = hg.sample_truth(ctx, 50, seed=1)
    assert M.physics_residual(truth, ctx, hg).abs().max().item() < 1e-12
    delta = 0.1  # move U_s off its law, keep P: both residual columns are known
    moved = truth + torch.tensor([delta, 0.0], dtype=torch.float64)
    rh, law = M.physics_residual(moved, ctx, hg).tolist()
    assert law == pytest.approx(delta, rel=1e-9)
    assert rh == pytest.approx(hg.rho0 * delta * ctx[:, 0].mean().item(), rel=1e-9)
    assert M.physics_residual(truth, ctx, hg, reduction="none").shape == (50, 20, 2)


def test_mixture_nll_accepts_mixtures_tuples_and_sample_stacks():
    g = gen(8)
    B, K, D = 6, 3, 2
    logits, means = torch.randn(B, K, generator=g, dtype=torch.float64), torch.randn(B, K, D, generator=g, dtype=torch.float64)
    log_scales = 0.3 * torch.randn(B, K, D, generator=g, dtype=torch.float64)
    y = torch.randn(4, B, D, generator=g, dtype=torch.float64)
    expected = reference.mixture_nll(logits.expand(4, B, K).reshape(-1, K), means.expand(4, B, K, D).reshape(-1, K, D),
                                     log_scales.expand(4, B, K, D).reshape(-1, K, D), y.reshape(-1, D)).mean()
    assert M.mixture_nll((logits, means, log_scales), y).item() == pytest.approx(expected.item(), rel=1e-10)
    assert M.mixture_nll(GaussianMixture(logits, means, log_scales), y).item() == pytest.approx(expected.item(), rel=1e-10)
    single = reference.mixture_nll(logits, means, log_scales, y[0]).mean()
    assert M.mixture_nll((logits, means, log_scales), y[0]).item() == pytest.approx(single.item(), rel=1e-10)
    with pytest.raises(TypeError, match="mixture must have .nll"):
        M.mixture_nll(object(), y)


# ----- evaluate -------------------------------------------------------------------------------------

def truth_mixture(pf, ctx):
    """The exact conditional of the noisy h = 0 pitchfork as a 2-component mixture."""
    r = ctx[:, 0].double()
    root = r.clamp(min=0).sqrt()
    means = torch.stack([root, -root], dim=1).unsqueeze(-1)
    logits = torch.zeros(len(r), 2, dtype=torch.float64)
    return GaussianMixture(logits, means, torch.full_like(means, math.log(pf.noise)))


def test_evaluate_a_perfect_model_scores_near_zero_and_the_entropy():
    pf = P.get("pitchfork")
    ctx = torch.linspace(-1, 1, 21, dtype=torch.float64).view(-1, 1)[torch.arange(21) != 10]  # skip r = 0
    ctx = ctx[(ctx[:, 0].abs() > 0.15)]  # branches well apart from each other compared with the noise
    sample_fn = lambda c, n: pf.sample_truth(c, n, seed=123)  # noqa: E731
    out = M.evaluate(pf, sample_fn, ctx, n_model=600, n_truth=600, mixture_fn=lambda c: truth_mixture(pf, c))
    for key in ("energy", "mmd", "sliced_w1", "mode_weight_error", "calibration_error", "residual_model",
                "residual_truth", "residual_model_equilibrium", "residual_model_stability", "nll"):
        assert key in out and math.isfinite(out[key]), key
    # two finite samples of the same law: small, limited by branch-count noise (sqrt(.25 / 600) of the mass)
    assert out["energy"] < 0.01 and out["sliced_w1"] < 0.06 and out["mmd"] < 0.01
    assert out["mode_weight_error"] < 0.05 and out["calibration_error"] < 0.03
    assert out["residual_model"] == pytest.approx(out["residual_truth"], rel=0.15)
    # the NLL of the exact conditional is its entropy: Gaussian noise, plus log 2 where there are two branches
    gauss = 0.5 * math.log(2 * math.pi * math.e * pf.noise**2)
    bimodal = (ctx[:, 0] > 0).double().mean().item()
    assert out["nll"] == pytest.approx(gauss + bimodal * math.log(2), abs=0.05)
    # a model stuck on one branch is caught
    bad = M.evaluate(pf, lambda c, n: pf.sample_truth(c, n, seed=1).abs(), ctx, n_model=600, n_truth=600)
    assert bad["mode_weight_error"] > 0.2 and bad["energy"] > 10 * out["energy"]
    assert bad["sliced_w1"] > 5 * out["sliced_w1"] and bad["mmd"] > 10 * out["mmd"]


def test_evaluate_checks_the_sampler_output():
    hg = P.get("hugoniot")
    ctx = hg.sample_contexts(4, seed=0)
    with pytest.raises(ValueError, match=r"sample_fn\(contexts, n\) must be \[n, B, D\] = \[n, 4, 2\]"):
        M.evaluate(hg, lambda c, n: torch.zeros(n, 4, 3), ctx, n_model=10, n_truth=10)


def test_two_sample_inputs_are_checked():
    with pytest.raises(ValueError, match=r"x \[..., n, D\] and y \[..., m, D\] must share the leading dims and D"):
        M.energy_distance(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        M.mmd(torch.zeros(5, 2), torch.ones(5, 2), bandwidth=0.0)


def test_energy_score_is_proper_and_half_the_energy_distance():
    """E_y ES(P, y) - E_y ES(Q, y) = ED(P, Q) / 2 for y ~ Q, checked on 1-D and 2-D Gaussians with one observation
    per context (the samples differ per context, the law does not)."""
    from physmdn.metrics import energy_distance, energy_score
    g = torch.Generator().manual_seed(0)
    B, n = 4000, 200
    for D, shift in ((1, 0.7), (2, 0.5)):
        y = torch.randn(B, D, generator=g, dtype=torch.float64)
        true = torch.randn(n, B, D, generator=g, dtype=torch.float64)
        off = torch.randn(n, B, D, generator=g, dtype=torch.float64) + shift
        gap = float(energy_score(off, y) - energy_score(true, y))
        if D == 1:  # closed form: 2 E|N(shift, 2)| - 2 E|N(0, 2)|
            s2 = math.sqrt(2.0)
            folded = s2 * math.sqrt(2 / math.pi) * math.exp(-shift**2 / 4) + shift * math.erf(shift / 2)
            ed = 2 * folded - 2 * s2 * math.sqrt(2 / math.pi)
        else:
            ed = float(energy_distance(torch.randn(4000, D, generator=g, dtype=torch.float64),
                                       torch.randn(4000, D, generator=g, dtype=torch.float64) + shift))
        assert gap > 0
        assert gap == pytest.approx(ed / 2, rel=0.12)
    with pytest.raises(ValueError, match=r"observations must be \[B, D\]"):
        energy_score(true, y[:3])
    with pytest.raises(ValueError, match=r"samples must be a \[n, B, D\] tensor"):
        energy_score(true[0], y)

"""Benchmark problems: known states, exact physics of noise-free truth, seeding, registry and input checks."""

import math

import pytest
import torch

from physmdn import problems as P

physics = pytest.importorskip("physmdn.physics")

NAMES = ["allen_cahn", "hugoniot", "pitchfork", "reaction_diffusion"]
CUDA = torch.cuda.is_available()


def binomial_tol(p, n, sigmas=5.0):
    return sigmas * math.sqrt(max(p * (1 - p), 1e-4) / n) + 1e-9


# ----- registry -------------------------------------------------------------------------------------

def test_registry_lists_and_builds_every_problem():
    # stochastic_allen_cahn (truth not steady) has its own file: tests/app/test_stochastic_allen_cahn.py
    assert P.names() == sorted(NAMES + ["stochastic_allen_cahn"])
    for name in NAMES:
        problem = P.get(name)
        assert problem.name == name
        assert problem.context_dim == len(problem.context_names) >= 1
        assert problem.output_dim == len(problem.output_names) >= 1
        assert problem.n_branches == 3
        assert problem.defaults.components >= 1
    assert isinstance(P.get("Allen-Cahn"), P.AllenCahn)
    assert isinstance(P.get("reaction-diffusion", grid=16), P.ReactionDiffusion)


def test_unknown_problem_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown problem 'heat'; valid names: allen_cahn, hugoniot, pitchfork, reaction_diffusion"):
        P.get("heat")
    with pytest.raises(TypeError, match="problem name must be a string"):
        P.get(3)


def test_bad_arguments_name_argument_expected_and_actual():
    pf = P.get("pitchfork")
    with pytest.raises(ValueError, match=r"context must be \[B, C\] with C = 1 \(r\) for problem 'pitchfork', got shape \(4, 2\)"):
        pf.sample_truth(torch.zeros(4, 2), 3)
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        pf.sample(0)
    with pytest.raises(ValueError, match="pass seed or generator, not both"):
        pf.sample(4, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"noise must be a finite number >= 0, got -1.0"):
        P.get("pitchfork", noise=-1)
    with pytest.raises(ValueError, match=r"a_range must lie inside \(0, 1\)"):
        P.get("reaction_diffusion", a_range=(0.2, 1.2))
    with pytest.raises(ValueError, match="grid must be an integer >= 3, got 2"):
        P.get("allen_cahn", grid=2)
    with pytest.raises(ValueError, match="physics_weights keys must be among"):
        P.get("hugoniot", physics_weights={"energy": 1.0})
    with pytest.raises(TypeError, match="unexpected keyword"):
        P.get("pitchfork", grid=3)


# ----- seeding, shapes, devices ---------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_seeded_sampling_is_reproducible(name):
    problem = P.get(name)
    n = 48
    threads = torch.get_num_threads()
    a, b, c = problem.sample(n, seed=3), problem.sample(n, seed=3), problem.sample(n, seed=4)
    assert torch.get_num_threads() == threads  # the simulations restore the intra-op thread count
    assert a.x.shape == (n, problem.context_dim) and a.y.shape == (n, problem.output_dim) and a.labels.shape == (n,)
    assert a.labels.dtype == torch.int64 and a.y.dtype == torch.float32
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a.y, c.y)
    x = problem.sample_contexts(5, seed=0)
    t1, l1 = problem.sample_truth(x, 7, seed=9, return_labels=True)
    t2 = problem.sample_truth(x, 7, generator=torch.Generator().manual_seed(9))
    assert t1.shape == (7, 5, problem.output_dim) and l1.shape == (7, 5)
    assert torch.equal(t1, t2)
    # sample-major layout: column b holds the draws for context b
    assert torch.equal(problem.classify(t1, x), l1)


@pytest.mark.parametrize("name", NAMES)
def test_contexts_lie_in_the_box_and_grid_sweeps_one_dimension(name):
    problem = P.get(name)
    x = problem.sample_contexts(2000, seed=0, dtype=torch.float64)
    lo, hi = torch.tensor(problem.context_low, dtype=torch.float64), torch.tensor(problem.context_high, dtype=torch.float64)
    assert bool(((x >= lo) & (x <= hi)).all())
    # each dimension actually spreads over its range (log-uniform ones in log space)
    for j, log in enumerate(problem.log_context):
        col = torch.log(x[:, j]) if log else x[:, j]
        lo_j, hi_j = (math.log(lo[j]), math.log(hi[j])) if log else (lo[j].item(), hi[j].item())
        assert abs(col.mean().item() - 0.5 * (lo_j + hi_j)) < 0.05 * (hi_j - lo_j)
    grid = problem.context_grid(11, dim=problem.context_dim - 1, dtype=torch.float64)
    assert grid.shape == (11, problem.context_dim)
    assert torch.all(grid[1:, -1] > grid[:-1, -1])
    assert grid[0, -1].item() == pytest.approx(problem.context_low[-1]) and grid[-1, -1].item() == pytest.approx(problem.context_high[-1])
    for j in range(problem.context_dim - 1):
        assert torch.all(grid[:, j] == problem.reference_context[j])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name", NAMES)
def test_sampling_on_cuda(name):
    problem = P.get(name)
    s = problem.sample(64, seed=0, device="cuda")
    assert s.x.device.type == s.y.device.type == s.labels.device.type == "cuda"
    assert torch.isfinite(s.y).all()
    truth = problem.sample_truth(s.x[:4], 8, seed=1)
    assert truth.device.type == "cuda" and truth.shape == (8, 4, problem.output_dim)


# ----- a. pitchfork ---------------------------------------------------------------------------------

def test_pitchfork_branches_at_plus_minus_sqrt_r_and_zero_below():
    pf = P.get("pitchfork", noise=0.0)
    s = pf.sample(4000, seed=0, dtype=torch.float64)
    r, y = s.x[:, 0], s.y[:, 0]
    neg, pos = r < 0, r > 0
    assert torch.all(y[neg] == 0) and torch.all(s.labels[neg] == 0)
    assert torch.allclose(y[pos].abs(), r[pos].sqrt(), rtol=0, atol=1e-12)
    assert torch.equal(s.labels[pos], torch.where(y[pos] > 0, 1, 2))
    frac_upper = (y[pos] > 0).double().mean().item()
    assert abs(frac_upper - 0.5) < binomial_tol(0.5, int(pos.sum()))
    weights = pf.true_weights(torch.tensor([[-0.5], [0.3]], dtype=torch.float64))
    assert torch.equal(weights, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]], dtype=torch.float64))
    # observation noise is additive and Gaussian with the given std around the branch
    noisy = P.get("pitchfork", noise=0.05).sample_truth(torch.tensor([[-0.5]]), 4000, seed=1)
    assert abs(noisy.std().item() - 0.05) < 0.004 and abs(noisy.mean().item()) < 0.004


def test_cubic_equilibria_solve_the_cubic_and_order_the_roots():
    g = torch.Generator().manual_seed(0)
    r = 2 * torch.rand(5000, generator=g, dtype=torch.float64) - 1
    h = 0.3 * (2 * torch.rand(5000, generator=g, dtype=torch.float64) - 1)
    lower, middle, upper = P.cubic_equilibria(r, h)
    for y in (lower, middle, upper):
        assert (r * y - y**3 + h).abs().max().item() < 1e-10
    three = 4 * r**3 > 27 * h**2
    assert torch.all(lower[three] < middle[three]) and torch.all(middle[three] < upper[three])
    assert torch.equal(lower[~three], upper[~three])
    assert torch.all(r[three] - 3 * upper[three] ** 2 < 0) and torch.all(r[three] - 3 * middle[three] ** 2 > 0)
    lo0, mid0, up0 = P.cubic_equilibria(torch.tensor([0.25, -0.25, 0.0], dtype=torch.float64))
    assert torch.allclose(up0, torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(lo0, torch.tensor([-0.5, 0.0, 0.0], dtype=torch.float64), atol=1e-12)


def test_imperfect_pitchfork_ode_reaches_the_equilibrium_of_its_basin():
    h = 0.1
    pf = P.get("pitchfork", imperfection=h, noise=0.0)
    r_fold = 3.0 * (h / 2) ** (2.0 / 3.0)
    g = torch.Generator().manual_seed(1)
    r = 2 * torch.rand(4000, generator=g, dtype=torch.float64) - 1
    r = r[(r - r_fold).abs() > 0.01]  # passages close to the fold take arbitrarily long
    y0 = 4 * torch.rand(r.shape, generator=g, dtype=torch.float64) - 2
    by_ode = pf.long_time_state(r, y0)
    assert torch.allclose(by_ode, pf.long_time_state(r, y0, method="roots"), rtol=0, atol=1e-8)
    assert (r * by_ode - by_ode**3 + h).abs().max().item() < 1e-8
    with pytest.raises(ValueError, match="method 'closed' needs imperfection 0"):
        pf.long_time_state(r, y0, method="closed")
    # branch frequencies of the truth match the basin-size weights
    ctx = torch.tensor([[0.2], [0.6], [1.0]], dtype=torch.float64)
    weights = pf.true_weights(ctx)
    assert torch.allclose(weights.sum(-1), torch.ones(3, dtype=torch.float64))
    assert weights[0].tolist() == [1.0, 0.0, 0.0]  # below the fold: one stable state
    assert weights[1, 1] > 0.5 and weights[2, 1] > weights[2, 2] > 0  # h > 0 favours the upper branch
    _, labels = pf.sample_truth(ctx, 3000, seed=2, return_labels=True)
    freq = torch.stack([(labels == m).double().mean(0) for m in range(3)], -1)
    assert torch.all((freq - weights).abs() < binomial_tol(0.5, 3000))


# ----- b. Allen–Cahn --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def allen_cahn_data():
    ac = P.get("allen_cahn", noise=0.0)
    return ac, ac.sample(600, seed=0, dtype=torch.float64)


def test_allen_cahn_states_are_bounded_uniform_or_kinks(allen_cahn_data):
    ac, s = allen_cahn_data
    u = s.y
    assert u.abs().max().item() <= 1.0 + 1e-6
    counts = torch.bincount(s.labels, minlength=3)
    assert torch.all(counts >= 30), counts  # all three metastable families occur
    plus, minus, kinks = (s.labels == k for k in range(3))
    assert torch.all(u[plus] > 0) and torch.all(u[minus] < 0)
    assert (u[plus] - 1).abs().amax(-1).median().item() < 1e-6
    assert (u[minus] + 1).abs().amax(-1).median().item() < 1e-6
    sign_changes = ((u[kinks] > 0) != (u[kinks].roll(1, -1) > 0)).sum(-1)
    assert torch.all(sign_changes % 2 == 0) and torch.all(sign_changes >= 2)  # periodic: kink-antikink pairs
    assert (u[kinks].abs() > 0.9).double().mean(-1).median().item() > 0.6  # plateaus at +-1 between the kinks


def test_allen_cahn_bias_and_eps_shift_the_odds():
    ac = P.get("allen_cahn", noise=0.0)
    ctx = torch.tensor([[0.015, 0.2, 0.15], [0.015, 0.2, -0.15], [0.001, 0.2, 0.0]])
    _, labels = ac.sample_truth(ctx, 200, seed=0, return_labels=True)
    assert (labels[:, 0] == 0).double().mean() > 0.9  # positive bias: +1
    assert (labels[:, 1] == 1).double().mean() > 0.9  # negative bias: -1
    assert (labels[:, 2] == 2).double().mean() > 0.5  # small eps: kinks


def test_allen_cahn_truth_is_steady(allen_cahn_data):
    ac, s = allen_cahn_data
    worst = ac.residual(s.y, s.x).abs().amax(-1)
    assert worst.median().item() < 1e-6
    assert worst.quantile(0.8).item() < 1e-3  # a few kink pairs are still annihilating


# ----- c. Hugoniot ----------------------------------------------------------------------------------

def test_hugoniot_rankine_hugoniot_exact_and_linear_laws():
    hg = P.get("hugoniot", noise=0.0)
    s = hg.sample(3000, seed=0, dtype=torch.float64)
    up, us, p = s.x[:, 0], s.y[:, 0], s.y[:, 1]
    assert torch.allclose(p, hg.rho0 * us * up, rtol=1e-12, atol=0)
    c0 = torch.tensor([c for _, c, _ in hg.regimes], dtype=torch.float64)[s.labels]
    slope = torch.tensor([k for _, _, k in hg.regimes], dtype=torch.float64)[s.labels]
    assert torch.allclose(us, c0 + slope * up, rtol=0, atol=1e-12)
    assert torch.equal(hg.classify(s.y, s.x), s.labels)
    # realistic magnitudes: km/s and GPa
    assert 4.0 < us.min().item() and us.max().item() < 9.0 and 0 < p.min().item() and p.max().item() < 150.0
    # noisy U_s keeps P = rho0 U_s u_p exact
    noisy = P.get("hugoniot").sample(500, seed=1, dtype=torch.float64)
    assert torch.allclose(noisy.y[:, 1], 7.87 * noisy.y[:, 0] * noisy.x[:, 0], rtol=1e-12)


def test_hugoniot_regime_odds_overlap_and_match_labels():
    hg = P.get("hugoniot")
    ctx = torch.tensor([[0.1], [0.35], [0.7], [1.1], [1.9]], dtype=torch.float64)
    weights = hg.true_weights(ctx)
    assert torch.allclose(weights.sum(-1), torch.ones(5, dtype=torch.float64))
    assert weights[0].argmax() == 0 and weights[2].argmax() == 1 and weights[4].argmax() == 2
    assert weights[1, :2].min() > 0.4 and weights[3, 1:].min() > 0.4  # multimodal at the thresholds
    _, labels = hg.sample_truth(ctx, 3000, seed=0, return_labels=True)
    freq = torch.stack([(labels == m).double().mean(0) for m in range(3)], -1)
    assert torch.all((freq - weights).abs() < binomial_tol(0.5, 3000))


# ----- d. reaction–diffusion ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reaction_diffusion_data():
    rd = P.get("reaction_diffusion", noise=0.0)
    return rd, rd.sample(500, seed=0, dtype=torch.float64)


def test_reaction_diffusion_states_sit_at_the_stable_roots(reaction_diffusion_data):
    rd, s = reaction_diffusion_data
    u = s.y
    assert u.min().item() > -1e-3 and u.max().item() < 1 + 1e-3
    counts = torch.bincount(s.labels, minlength=3)
    assert torch.all(counts >= 25), counts
    low, high, fronts = (s.labels == k for k in range(3))
    assert (u[low]).abs().amax(-1).max().item() < 1e-3
    assert (u[high] - 1).abs().amax(-1).max().item() < 1e-3
    near_root = torch.minimum(u[fronts].abs(), (u[fronts] - 1).abs()) < 0.1
    assert near_root.double().mean().item() > 0.85  # domains of 0 and 1 with a few sites on each front
    assert torch.all(near_root.double().mean(-1) >= 0.5)
    # pinned patterns need weak coupling
    assert s.x[fronts, 0].median() < s.x[~fronts, 0].median()


def test_reaction_diffusion_truth_is_steady(reaction_diffusion_data):
    rd, s = reaction_diffusion_data
    worst = rd.residual(s.y, s.x).abs().amax(-1)
    assert worst.median().item() < 1e-5
    assert (worst > 1e-3).double().mean().item() < 0.02  # only fronts stalled at the depinning threshold


def test_reaction_diffusion_strong_coupling_is_a_threshold_vote():
    rd = P.get("reaction_diffusion", noise=0.0, D_range=(1.0, 1.0), a_range=(0.3, 0.7))
    ctx = torch.tensor([[1.0, 0.3], [1.0, 0.7]])
    _, labels = rd.sample_truth(ctx, 300, seed=0, return_labels=True)
    high = (labels == 1).double().mean(0)
    assert high[0] > 0.6 and high[1] < 0.4  # roughly P(level > a) = 1 - a
    assert (labels == 2).double().mean() < 0.05


# ----- physics specs against the truth --------------------------------------------------------------

@pytest.mark.parametrize("boundary", ["periodic", "neumann"])
def test_second_difference_matches_stencil_spec(boundary):
    mine = P.second_difference(7, boundary)
    theirs = physics.Stencil1D(1.0, [0.0], boundary=boundary).laplacian(7)
    assert torch.equal(mine, theirs)


@pytest.mark.parametrize("name", NAMES)
def test_specs_fit_the_mdn_shapes_and_vanish_on_noise_free_truth(name):
    problem = P.get(name, noise=0.0)
    K = problem.defaults.components
    s = problem.sample(40, seed=5, dtype=torch.float64)
    x = s.x.clone().requires_grad_(True)
    specs = problem.physics(x, components=K)
    assert specs and all(isinstance(spec, physics.PhysicsSpec) and weight > 0 for spec, weight in specs)
    B, D = s.y.shape
    # every component sitting exactly on the observed (noise-free) outcome, with a tiny spread
    means = s.y.unsqueeze(1).expand(B, K, D).clone()
    log_scales = torch.full((B, K, D), -30.0, dtype=torch.float64)
    total = torch.zeros(B, K, dtype=torch.float64)
    for spec, weight in specs:
        spec.validate(B, K, D)
        if isinstance(spec, physics.Monotonic):
            continue  # needs a model graph
        penalty = spec.penalty(means, log_scales)
        assert penalty.shape == (B, K) and torch.isfinite(penalty).all()
        if isinstance(spec, physics.FieldStability):
            # every steady outcome is stable; the prior only flags transients (kink pairs still annihilating)
            steady = problem.residual(s.y, s.x).abs().amax(-1) < 1e-6
            assert steady.float().mean() > 0.5
            assert (weight * penalty)[steady].max().item() < 1e-8
            continue
        total = total + weight * penalty
    if name == "hugoniot":
        # component k follows regime k: only the component of the sample's own regime is consistent
        own = total.gather(1, s.labels.unsqueeze(1)).squeeze(1)
        assert own.max().item() < 1e-12
        others = total.masked_fill(torch.nn.functional.one_hot(s.labels, K).bool(), float("inf"))
        assert others.min().item() > 1e-3
    else:
        # with sigma -> 0 the penalty is the squared residual summed over columns (unit weights), the same for all K
        squared = problem.residual(s.y, s.x).square().sum(-1, keepdim=True).expand(B, K)
        assert torch.allclose(total, squared, rtol=1e-6, atol=1e-12)
        assert squared.median().item() < 1e-10  # and the noise-free truth is (almost always) steady


@pytest.mark.parametrize("name", NAMES)
def test_residual_agrees_with_spec_residual(name):
    problem = P.get(name)
    s = problem.sample(16, seed=2, dtype=torch.float64)
    spec = problem.physics(s.x)[0][0]
    ours = problem.residual(s.y, s.x)
    if name == "hugoniot":
        law = spec.residual(s.y.unsqueeze(1).expand(16, 3, 2))[..., 0]  # [B, K]: U_s - law_k
        assert torch.allclose(ours[:, 1], law.abs().amin(-1))
        rh = problem.physics(s.x)[1][0].residual(s.y.unsqueeze(1))[:, 0, 0]
        assert torch.allclose(ours[:, 0], rh)
    else:
        theirs = spec.residual(s.y.unsqueeze(1))[:, 0]
        assert torch.allclose(ours[..., : theirs.shape[-1]], theirs, atol=1e-12)


def test_pitchfork_stability_residual_flags_the_unstable_branch():
    pf = P.get("pitchfork")
    r = torch.tensor([[0.5], [0.5]])
    res = pf.residual(torch.tensor([[0.0], [math.sqrt(0.5)]]), r)
    assert res[0].tolist() == [0.0, 0.5]  # y = 0 is an equilibrium but unstable for r > 0
    assert abs(res[1, 0].item()) < 1e-6 and res[1, 1].item() == 0.0


def test_branch_means_trace_the_true_branches():
    pf = P.get("pitchfork")
    means = pf.branch_means(torch.tensor([[-0.5], [0.49]], dtype=torch.float64))  # [B, M, D]
    assert means.shape == (2, 3, 1)
    assert means[0, 0, 0].item() == 0.0 and torch.isnan(means[0, 1:]).all()
    assert torch.isnan(means[1, 0]).all() and means[1, 1, 0].item() == pytest.approx(0.7) and means[1, 2, 0].item() == pytest.approx(-0.7)
    hg = P.get("hugoniot")
    up = torch.tensor([[1.0]], dtype=torch.float64)
    means = hg.branch_means(up)
    assert means.shape == (1, 3, 2)
    assert means[0, :, 0].tolist() == pytest.approx([5.95 + 1.00, 4.63 + 1.33, 3.94 + 1.58])
    assert torch.allclose(hg.residual(means, up.unsqueeze(1)), torch.zeros(1, 3, 2, dtype=torch.float64), atol=1e-12)
    assert P.get("allen_cahn").branch_means(torch.zeros(1, 3)) is None

"""The stochastic Allen–Cahn problem: its sampler against the exact stationary law (quadrature), the generator
identity on its truth, its physics and residual, seeding, input checks and a training smoke test."""

import math

import pytest
import torch

from physmdn import fit, problems as P
from physmdn.models import MDN
from physmdn.problems.numerics import second_difference
from physmdn.problems.stochastic_allen_cahn import mala
from physmdn.stationary import StationaryLaw
from physmdn import physics


def quadrature_moments(potential, s, functions, dim, half_width=3.0, points=121):
    """``E[h(y)]`` under ``p ∝ exp(-2 V(y) / s^2)`` on ``R^dim`` by the trapezoid rule on a cube (float64)."""
    axis = torch.linspace(-half_width, half_width, points, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(*([axis] * dim), indexing="ij"), -1).reshape(-1, dim)
    log_p = -2.0 * potential(grid) / s**2
    weights = torch.exp(log_p - log_p.max())
    return [float((weights * h(grid)).sum() / weights.sum()) for h in functions]


def within(samples, expected, sigmas=5.0):
    """The sample mean of ``samples [n]`` is within ``sigmas`` standard errors of ``expected``."""
    error = samples.std() / math.sqrt(samples.numel())
    return abs(float(samples.mean()) - expected) <= sigmas * float(error)


# ----- the sampler against the exact law ------------------------------------------------------------

def test_mala_matches_the_exact_one_dimensional_law():
    # D = 1: p(y) ∝ exp(-2 (y^4/4 - y^2/2) / s^2), moments by quadrature
    s, n = 0.7, 40_000
    potential = lambda u: (0.25 * u**4 - 0.5 * u**2).sum(-1)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    y = mala(torch.randn(n, 1, generator=g, dtype=torch.float64), potential, lambda u: u - u**3,
             torch.full((n, 1), s, dtype=torch.float64), 0.1, 300, g)[:, 0]
    second, fourth = quadrature_moments(potential, s, [lambda u: u[:, 0] ** 2, lambda u: u[:, 0] ** 4], 1,
                                        points=20_001)
    assert within(y**2, second) and within(y**4, fourth)
    # the chains are far from their N(0, 1) start: E y^2 = 1 there
    assert abs(second - 1.0) > 10 * float((y**2).std()) / math.sqrt(n)


@pytest.mark.parametrize("n", [3000, pytest.param(20_000, marks=pytest.mark.slow)])
def test_problem_truth_matches_the_exact_law_on_three_points(n):
    problem = P.StochasticAllenCahn(grid=3)
    context = torch.tensor([[0.02, 0.7]], dtype=torch.float64)
    y = problem.sample_truth(context, n, seed=1)[:, 0]  # [n, 3]
    potential = lambda u: problem.potential(u, context)  # noqa: E731
    functions = [lambda u: u[:, 0] ** 2, lambda u: u[:, 0] * u[:, 1], lambda u: u[:, 0] ** 4,
                 lambda u: (u.mean(-1) > 0).double()]
    exact = quadrature_moments(potential, 0.7, functions, 3)
    for h, value in zip(functions, exact):
        assert within(h(y).double(), value)


def test_drift_is_minus_the_gradient_of_the_energy_and_the_coupling_is_the_laplacian():
    problem = P.StochasticAllenCahn(grid=6)
    s = problem.sample(5, seed=2, dtype=torch.float64)
    y = s.y.clone().requires_grad_(True)
    grad = torch.autograd.grad(problem.potential(y, s.x).sum(), y)[0]
    assert torch.allclose(problem.residual(s.y, s.x), -grad, atol=1e-12)
    A = problem.coupling(s.x)
    L = second_difference(6, "periodic", dtype=torch.float64)
    assert torch.allclose(A, s.x[:, 0, None, None] * L * 36.0)
    assert torch.allclose(torch.einsum("bij,bj->bi", A, s.y) + s.y - s.y**3, problem.residual(s.y, s.x))


# ----- the generator identity on the truth ----------------------------------------------------------

@pytest.mark.parametrize("n", [1500, pytest.param(10_000, marks=pytest.mark.slow)])
def test_generator_identity_holds_on_the_truth_and_the_steady_residual_does_not(n):
    problem = P.get("stochastic_allen_cahn")
    contexts = torch.tensor([[0.01, 0.65], [0.025, 0.95]], dtype=torch.float64)
    y = problem.sample_truth(contexts, n, seed=3)  # [n, 2, 8]
    law = problem.stationary_law(contexts)
    f = law.drift(y)
    i, j = law.pair_indices(8).unbind(-1)
    per_sample = torch.cat([f, y[..., j] * f[..., i] + y[..., i] * f[..., j]
                            + law.noise.square()[:, None] * (i == j).double()], -1) / law.noise.square()[:, None]
    estimate, error = per_sample.mean(0), per_sample.std(0) / math.sqrt(n)
    assert torch.allclose(law.sample_terms(y), estimate)
    assert (estimate.abs() <= 5.0 * error).all()
    # a stationary sample is not a steady state: the residual f(y) is of order one per point
    assert problem.residual(y, contexts).square().mean() > 0.1


# ----- the problem protocol -------------------------------------------------------------------------

def test_physics_is_the_stationary_law_or_the_steady_specs():
    problem = P.get("stochastic-allen-cahn")
    x = problem.sample_contexts(4, seed=0, dtype=torch.float64)
    [(law, weight)] = problem.physics(x)
    assert isinstance(law, StationaryLaw) and weight == 1.0
    assert torch.allclose(law.coupling, problem.coupling(x)) and torch.allclose(law.noise, x[:, 1])
    steady = P.StochasticAllenCahn(penalty="steady", physics_weights={"steady": 0.5}).physics(x)
    assert [type(spec) for spec, _ in steady] == [physics.Stencil1D, physics.FieldStability]
    assert steady[0][1] == 0.5
    # the steady spec's residual is the problem's residual
    s = problem.sample(4, seed=1, dtype=torch.float64)
    spec = P.StochasticAllenCahn(penalty="steady").physics(s.x)[0][0]
    assert torch.allclose(spec.residual(s.y.unsqueeze(1))[:, 0], problem.residual(s.y, s.x), atol=1e-12)


def test_seeded_sampling_labels_and_symmetry():
    problem = P.get("stochastic_allen_cahn")
    a, b = problem.sample(64, seed=7), problem.sample(64, seed=7)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.labels, b.labels)
    assert a.y.shape == (64, 8) and a.x.shape == (64, 2)
    lo, hi = torch.tensor(problem.context_low), torch.tensor(problem.context_high)
    assert ((a.x >= lo) & (a.x <= hi)).all()
    assert torch.equal(problem.classify(a.y, a.x), a.labels)
    # the law is even: plus and minus equally often (the global sign flip makes it exact)
    y = problem.sample_truth(torch.tensor([[0.03, 0.6]]), 4000, seed=8)[:, 0]
    plus, minus = (y > 0).all(-1).double().mean(), (y < 0).all(-1).double().mean()
    assert abs(float(plus - minus)) < 5 * math.sqrt(0.5 / 4000) and float(plus) > 0.3


def test_bad_arguments_name_argument_expected_and_actual():
    with pytest.raises(ValueError, match="penalty must be one of"):
        P.StochasticAllenCahn(penalty="exact")
    with pytest.raises(ValueError, match="sigma_range must be positive"):
        P.StochasticAllenCahn(sigma_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="eps_range must be positive"):
        P.StochasticAllenCahn(eps_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="grid"):
        P.StochasticAllenCahn(grid=2)
    with pytest.raises(ValueError, match="physics_weights keys must be among"):
        P.StochasticAllenCahn(physics_weights={"equilibrium": 1.0})
    with pytest.raises(ValueError, match=r"context must be \[B, C\] with C = 2"):
        P.StochasticAllenCahn().physics(torch.zeros(3, 3))


# ----- training ---------------------------------------------------------------------------------------

def test_fit_trains_with_the_mixture_level_penalty():
    problem = P.get("stochastic_allen_cahn")
    train = problem.sample(128, seed=9)
    model = MDN(2, 8, components=3, hidden=(16,))
    result = fit(model, (train.x, train.y), epochs=2, batch_size=64, physics=problem.physics, physics_weight=1.0,
                 progress=False)
    physics_terms = [row["train_physics"] for row in result.history]
    assert all(math.isfinite(v) and v > 0 for v in physics_terms)


# ----- bench/stationary_prior.py ------------------------------------------------------------------------

def test_t_interval_of_the_experiment():
    import stationary_prior  # bench/ is on pytest's pythonpath (pyproject.toml)

    mean, half = stationary_prior.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and math.isclose(half, 4.303 * 1.0 / math.sqrt(3.0))


@pytest.mark.slow
def test_stationary_prior_smoke_run(tmp_path):
    import csv

    import stationary_prior

    out = tmp_path / "rows.csv"
    stationary_prior.main(["--quick", "--csv", str(out)])
    rows = list(csv.DictReader(open(out)))
    assert sorted({r["variant"] for r in rows}) == ["mdn", "stationary", "steady"] and len(rows) == 6
    assert all(math.isfinite(float(r[m])) for r in rows for m in ("energy", "nll", "mode_weight_error", "identity"))

"""Hard linear laws (python/physmdn/constraints.py): the basis, the rotated mixture against a float64
full-covariance reference, samples on the law, gradients, and training on data that satisfy a context-dependent law."""

import math

import pytest
import torch

import physmdn
from physmdn.constraints import ConstrainedMDN, ConstrainedMixture, LinearConstraint
from physmdn.distributions import GaussianMixture


def random_law(B, M, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, M, D, generator=g, dtype=torch.float64)
    b = torch.randn(B, M, generator=g, dtype=torch.float64)
    return A, b


@pytest.mark.parametrize("M,D", [(1, 2), (1, 3), (2, 5)])
def test_basis_splits_fixed_and_free_directions(M, D):
    B = 7
    A, b = random_law(B, M, D)
    x = torch.zeros(B, 1, dtype=torch.float64)
    law = LinearConstraint(lambda x: A, lambda x: b)
    Q, c = law.basis(x)
    eye = torch.eye(D, dtype=torch.float64).expand(B, D, D)
    torch.testing.assert_close(Q.transpose(1, 2) @ Q, eye)  # orthonormal
    torch.testing.assert_close(A @ Q[:, :, M:], torch.zeros(B, M, D - M, dtype=torch.float64))  # free: null space of A
    # every y with Q_r^T y = c satisfies A y = b, whatever its free coordinates
    z = torch.cat([c, torch.randn(B, D - M, dtype=torch.float64)], -1)
    y = (Q @ z.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(law.residual(y, x), torch.zeros(B, M, dtype=torch.float64))


def test_rank_deficient_law_is_a_clear_error():
    law = LinearConstraint(torch.tensor([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="full row rank"):
        law.basis(torch.zeros(3, 1, dtype=torch.float64))


@pytest.mark.parametrize("build,match", [
    (lambda: LinearConstraint(torch.zeros(3, 3)), "A must be \\[M, D\\] with 1 <= M < D"),
    (lambda: LinearConstraint(torch.ones(1, 2), noise_scale=0.0), "noise_scale must be a finite number > 0"),
    (lambda: LinearConstraint("A"), "A must be a \\[M, D\\] tensor or callable"),
])
def test_bad_constraint(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def reference_log_prob(mixture: ConstrainedMixture, y):
    """float64 MixtureSameFamily of full-covariance Gaussians N(Q mu_k, Q diag(s_k^2) Q^T)."""
    Q = mixture.Q.double()
    mu = torch.einsum("bij,bkj->bki", Q, mixture.means.double())
    cov = Q.unsqueeze(1) @ torch.diag_embed(torch.exp(2 * mixture.log_scales.double())) @ Q.transpose(1, 2).unsqueeze(1)
    torch_mix = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(logits=mixture.logits.double()),
                                                      torch.distributions.MultivariateNormal(mu, covariance_matrix=cov))
    return torch_mix.log_prob(y.double())


def constrained_mixture(B, K, M, D, seed=1, noise=0.05):
    A, b = random_law(B, M, D, seed)
    x = torch.zeros(B, 1, dtype=torch.float64)
    law = LinearConstraint(lambda x: A, lambda x: b, noise_scale=noise)
    Q, c = law.basis(x)
    g = torch.Generator().manual_seed(seed + 1)
    logits = torch.randn(B, K, generator=g, dtype=torch.float64)
    free_means = torch.randn(B, K, D - M, generator=g, dtype=torch.float64)
    free_scales = 0.3 * torch.randn(B, K, D - M, generator=g, dtype=torch.float64) - 0.5
    means = torch.cat([c.unsqueeze(1).expand(B, K, M), free_means], -1)
    log_scales = torch.cat([torch.full((B, K, M), math.log(noise), dtype=torch.float64), free_scales], -1)
    return ConstrainedMixture(GaussianMixture(logits, means, log_scales), Q), law, x, (logits, free_means, free_scales)


def test_log_prob_matches_full_covariance_reference():
    mixture, law, x, _ = constrained_mixture(9, 3, 1, 3)
    y = torch.randn(4, 9, 3, dtype=torch.float64)
    torch.testing.assert_close(mixture.log_prob(y), reference_log_prob(mixture, y), rtol=1e-10, atol=1e-10)


def test_samples_means_and_modes_satisfy_the_law():
    noise = 1e-3
    mixture, law, x, _ = constrained_mixture(6, 4, 2, 5, noise=noise)
    A, _ = law.matrices(x)
    row_norms = A.norm(dim=-1)  # [B, M]: the residual of one row has standard deviation noise * ||A_m||
    samples = mixture.sample((2000,))
    assert samples.shape == (2000, 6, 5)
    residual = law.residual(samples, x) / row_norms
    assert float(residual.std()) == pytest.approx(noise, rel=0.1)
    assert float(residual.abs().max()) < 6 * noise
    assert float((law.residual(mixture.mean, x) / row_norms).abs().max()) < 1e-12
    modes = mixture.modes(min_weight=0.0)
    located = torch.where(modes.mask.unsqueeze(-1), modes.locations, torch.zeros_like(modes.locations))
    assert float((law.residual(located.transpose(0, 1), x).transpose(0, 1) / row_norms.unsqueeze(1))
                 .masked_select(modes.mask.unsqueeze(-1)).abs().max()) < 1e-6
    torch.testing.assert_close(mixture.covariance @ A.transpose(1, 2) / noise**2,
                               A.transpose(1, 2), rtol=1e-6, atol=1e-6)  # A^T spans fixed directions of variance s^2


def test_gradients_match_the_reference():
    mixture, law, x, (logits, free_means, free_scales) = constrained_mixture(5, 3, 1, 3)
    Q = mixture.Q
    c = mixture.means[:, 0, :1]
    y = torch.randn(5, 3, dtype=torch.float64)

    def fused(logits, free_means, free_scales):
        B, K, _ = free_means.shape
        means = torch.cat([c.unsqueeze(1).expand(B, K, 1), free_means], -1)
        log_scales = torch.cat([torch.full((B, K, 1), math.log(0.05), dtype=torch.float64), free_scales], -1)
        return ConstrainedMixture(GaussianMixture(logits, means, log_scales), Q).log_prob(y)

    args = [t.clone().requires_grad_(True) for t in (logits, free_means, free_scales)]
    assert torch.autograd.gradcheck(fused, args)
    ref_args = [t.clone().requires_grad_(True) for t in (logits, free_means, free_scales)]
    B, K, _ = free_means.shape

    def reference(logits, free_means, free_scales):
        means = torch.cat([c.unsqueeze(1).expand(B, K, 1), free_means], -1)
        log_scales = torch.cat([torch.full((B, K, 1), math.log(0.05), dtype=torch.float64), free_scales], -1)
        return reference_log_prob(ConstrainedMixture(GaussianMixture(logits, means, log_scales), Q), y)

    got = torch.autograd.grad(fused(*args).sum(), args)
    want = torch.autograd.grad(reference(*ref_args).sum(), ref_args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.slow
def test_constrained_mdn_learns_a_context_dependent_law(one_thread):
    """Hugoniot-like data: y = (U_s, P) with P = rho0 u_p U_s exactly and U_s bimodal in u_p. The constrained model's
    samples keep the law to its noise scale; a plain MDN's do not."""
    torch.manual_seed(0)
    rho0, n = 7.87, 512
    up = 0.2 + 1.6 * torch.rand(n, 1)
    branch = torch.rand(n, 1) < 0.5
    us = torch.where(branch, 4.6 + 1.3 * up, 3.9 + 1.6 * up) + 0.05 * torch.randn(n, 1)
    y = torch.cat([us, rho0 * up * us], -1)
    law = LinearConstraint(lambda x: torch.stack([-rho0 * x[:, 0], torch.ones_like(x[:, 0])], -1).unsqueeze(1),
                           noise_scale=1e-4)  # (in the model's standardized outcomes: P's scale is ~25 GPa)
    model = ConstrainedMDN(1, 2, law, components=2, rows=1, hidden=(32, 32))
    physmdn.fit(model, (up, y), epochs=300, batch_size=128, lr=3e-3, progress=False)
    plain = physmdn.MDN(1, 2, components=2, hidden=(32, 32))
    physmdn.fit(plain, (up, y), epochs=300, batch_size=128, lr=3e-3, progress=False)
    x = torch.linspace(0.3, 1.7, 16).unsqueeze(-1)
    with torch.no_grad():
        constrained = model(x).sample((200,))
        free = plain(x).sample((200,))
    rh = lambda s: (s[..., 1] - rho0 * x[:, 0] * s[..., 0]).abs().mean()  # noqa: E731  [GPa]
    assert float(rh(constrained)) < 0.01
    assert float(rh(free)) > 10 * float(rh(constrained))
    # and the bimodal U_s is still there: at u_p = 1 a quarter of the samples or more near each branch
    with torch.no_grad():
        at_one = model(torch.ones(1, 1)).sample((2000,))[:, 0, 0]
    for center in (4.6 + 1.3, 3.9 + 1.6):
        assert float(((at_one - center).abs() < 0.15).float().mean()) > 0.25


def test_penalties_act_in_the_outcome_coordinates():
    """A ConstrainedMixture's penalty is that of the same mixture written with full-covariance components in y
    (GaussianMixtureTril of Cholesky(F F^T)), and a Monte Carlo estimate agrees with it."""
    from physmdn import physics_correlated as PC
    mixture, law, x, _ = constrained_mixture(5, 3, 1, 3)
    means, factors = mixture.component_means, mixture.component_factors()
    cov = factors @ factors.transpose(-1, -2)
    torch.testing.assert_close(cov.sum(1) * 0 + (mixture.weights[..., None, None] * (
        cov + means.unsqueeze(-1) * means.unsqueeze(-2))).sum(1) - mixture.mean.unsqueeze(-1) *
        mixture.mean.unsqueeze(-2), mixture.covariance, rtol=1e-10, atol=1e-10)
    tril = physmdn.GaussianMixtureTril(mixture.logits, means, torch.linalg.cholesky(cov))
    specs = [physmdn.physics.Polynomial(torch.tensor([0.3, -1.0, 0.0, 1.0], dtype=torch.float64)),
             (physmdn.physics.Linear(torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64),
                                     torch.tensor([0.2], dtype=torch.float64), moment="first"), 0.5)]
    got = PC.penalty_from_factors(mixture.logits, means, factors, None, specs)
    torch.testing.assert_close(got, PC.physics_penalty(tril, specs), rtol=1e-10, atol=1e-10)
    # Monte Carlo of the second moment of the polynomial, per component
    g = torch.Generator().manual_seed(3)
    eps = torch.randn(200_000, *means.shape, generator=g, dtype=torch.float64)
    y = means + torch.einsum("bkdj,sbkj->sbkd", factors, eps)
    r = 0.3 * torch.ones_like(y) - y + y**3
    mc = (mixture.weights * r.square().sum(-1).mean(0)).sum(-1)
    torch.testing.assert_close(PC.penalty_from_factors(mixture.logits, means, factors, None, specs[0]), mc,
                               rtol=0.02, atol=1e-3)


def test_constrained_mdn_trains_with_penalties():
    """fit with a penalty on a ConstrainedMDN: it runs, reports the penalty, and the penalty pulls the free
    coordinate (a Linear law on y_0 alone, never satisfied by the data) toward its target."""
    law = LinearConstraint(torch.tensor([[1.0, 1.0]]), noise_scale=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 1, generator=g)
    y0 = 1.0 + 0.5 * torch.randn(256, generator=g)
    y = torch.stack([y0, -y0], -1)
    spec = physmdn.physics.Linear(torch.tensor([[1.0, 0.0]]), torch.tensor([2.0]), moment="first")
    results = {}
    for w in (0.0, 10.0):
        torch.manual_seed(0)
        model = ConstrainedMDN(1, 2, law, components=2, rows=1, hidden=(16,))
        res = physmdn.fit(model, (x, y), epochs=60, batch_size=64, lr=1e-2, physics=spec if w else None,
                          physics_weight=w, progress=False, seed=0, patience=None, restore_best=False)
        with torch.no_grad():
            results[w] = float(model(x).mean[:, 0].mean())
        if w:
            assert res.history[0]["train_physics"] > 10 * res.history[-1]["train_physics"] > 0
    assert abs(results[0.0] - 1.0) < 0.2
    assert results[10.0] > results[0.0] + 0.3  # pulled toward y_0 = 2
    with torch.no_grad():  # and the law still holds
        s = model(x[:8]).sample((100,))
    assert float((s[..., 0] + s[..., 1]).abs().max()) < 0.05


def test_marginals_match_samples():
    mixture, law, x, _ = constrained_mixture(3, 2, 1, 3)
    samples = mixture.sample((200_000,))  # [S, B, D]
    # the mixture's marginal variance along each y_d from the component marginals
    w = mixture.weights
    m, s = mixture.component_means, mixture.marginal_scales
    mean = (w.unsqueeze(-1) * m).sum(1)
    var = (w.unsqueeze(-1) * (s.square() + m.square())).sum(1) - mean.square()
    torch.testing.assert_close(samples.mean(0), mean, rtol=0, atol=0.02)
    torch.testing.assert_close(samples.var(0), var, rtol=0.03, atol=1e-3)


def test_standardized_rotation_log_prob_and_moments():
    """y = loc + scale * (Q z): log_prob against the float64 full-covariance reference (with the Jacobian), mean and
    covariance against it too."""
    mixture, law, x, _ = constrained_mixture(5, 3, 1, 3)
    loc = torch.tensor([1.0, -2.0, 30.0], dtype=torch.float64)
    scale = torch.tensor([0.5, 2.0, 40.0], dtype=torch.float64)
    affine = ConstrainedMixture(mixture.base, mixture.Q, loc, scale)
    Q = mixture.Q
    mu = loc + scale * torch.einsum("bij,bkj->bki", Q, mixture.means)
    M = scale.unsqueeze(-1) * Q
    cov = M.unsqueeze(1) @ torch.diag_embed(torch.exp(2 * mixture.log_scales)) @ M.transpose(1, 2).unsqueeze(1)
    ref = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(logits=mixture.logits),
                                                torch.distributions.MultivariateNormal(mu, covariance_matrix=cov))
    y = ref.sample((4,))
    torch.testing.assert_close(affine.log_prob(y), ref.log_prob(y), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(affine.mean, ref.mean)
    w = torch.softmax(mixture.logits, -1)
    centered = mu - ref.mean.unsqueeze(1)
    expected_cov = (w[..., None, None] * (cov + centered.unsqueeze(-1) * centered.unsqueeze(-2))).sum(1)
    torch.testing.assert_close(affine.covariance, expected_cov, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(affine.component_means, mu)


def test_fit_standardizes_the_constrained_model():
    law = LinearConstraint(torch.tensor([[1.0, -1.0]]))
    model = ConstrainedMDN(1, 2, law, components=2, rows=1, hidden=(8,))
    x, y = torch.rand(64, 1), torch.cat([torch.full((64, 1), 10.0), torch.full((64, 1), 10.0)], -1)
    y = y + torch.randn(64, 1) * torch.tensor([[3.0, 3.0]])
    assert not bool(model.normalization_set)
    physmdn.fit(model, (x, y), epochs=1, batch_size=32, progress=False)
    assert bool(model.normalization_set)
    torch.testing.assert_close(model.y_loc, y.double().mean(0).float(), rtol=1e-5, atol=1e-5)

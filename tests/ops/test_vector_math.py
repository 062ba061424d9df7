"""Accuracy of the vector exp and log inside the CPU kernels (the AVX2 build's inline polynomials, the
baseline build's Sleef), against float64, over the whole float32 range and at the special values."""

import math

import pytest
import torch

import physmdn

F32_MIN_NORMAL = 2.0**-126


def ulp_error(actual: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|actual - exact| in units of the float32 spacing at exact (normal range)."""
    spacing = torch.ldexp(torch.ones_like(exact), torch.frexp(exact.abs())[1] - 24).double()
    return (actual.double() - exact).abs() / spacing


def test_exp_accuracy_and_specials(cpu_isa):
    x = torch.cat([torch.linspace(-87.3, 88.3, 400_003), torch.randn(100_000) * 5]).float()
    e, _ = torch.ops.physmdn._vector_exp_log(x)
    exact = torch.exp(x.double())
    assert ulp_error(e, exact).max() <= 2.0  # measured: 1.25 (AVX2 polynomial), 0.5 (Sleef)
    specials = torch.tensor([0.0, -0.0, 1.0, -1.0, 88.0, 89.0, 1e30, math.inf, -math.inf, math.nan, -1e30, -104.0,
                             -90.0, -87.5, 30.5, -30.5], dtype=torch.float32)
    e, _ = torch.ops.physmdn._vector_exp_log(specials)
    expect = torch.exp(specials.double())
    assert e[0] == 1 and e[1] == 1
    assert torch.isinf(e[5]) and torch.isinf(e[6]) and torch.isinf(e[7])  # overflow -> +inf
    assert e[8] == 0 and e[10] == 0 and e[11] == 0  # -inf and far below -> 0
    assert torch.isnan(e[9])
    # denormal results: 0 (AVX2 flushes below 2^-126) or the denormal itself, never more than the smallest normal
    assert 0 <= e[12] <= F32_MIN_NORMAL and 0 <= e[13] <= F32_MIN_NORMAL
    for i in (2, 3, 4, 14, 15):
        assert ulp_error(e[i:i + 1], expect[i:i + 1]).item() <= 3.0


def test_exp_variants_match_exp(cpu_isa):
    """The kernels' e^-x routine (the negation folded into the reduction) is bit for bit their exp of -x, and their
    exp for arguments <= 0 (no upper clamp) bit for bit their exp, over the whole range and at the special values."""
    specials = [0.0, -0.0, 1.0, -1.0, 88.0, -88.0, 88.5, -88.5, 88.7, -88.7, 89.0, -89.0, 87.5, -87.5, 1e30, -1e30,
                math.inf, -math.inf, math.nan, 104.0, -104.0, 1e-40, -1e-40]
    x = torch.cat([torch.linspace(-120.0, 120.0, 600_001), torch.randn(100_000) * 30,
                   torch.tensor(specials)]).float()
    exp_of = lambda t, variant=0: torch.ops.physmdn._vector_exp_log(t.contiguous(), variant)[0]  # noqa: E731

    def assert_same_bits(a, b):  # NaN where b is NaN (its sign aside: -x flips a NaN's), the same bits elsewhere
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a[~b.isnan()].view(torch.int32), b[~b.isnan()].view(torch.int32))

    assert_same_bits(exp_of(x, 1), exp_of(-x))
    nonpos = torch.cat([x[x <= 0], torch.tensor([math.nan, -0.0])])
    assert_same_bits(exp_of(nonpos, 2), exp_of(nonpos))
    with pytest.raises(RuntimeError, match="variant must be 0, 1 or 2, got 3"):
        torch.ops.physmdn._vector_exp_log(x, 3)


def test_log_accuracy_and_specials(cpu_isa):
    x = torch.cat([torch.logspace(-37.5, 38.5, 400_003), torch.rand(100_000) * 4 + 1e-3]).float()
    _, l = torch.ops.physmdn._vector_exp_log(x)
    exact = torch.log(x.double())
    err = (l.double() - exact).abs()
    # absolute error for results near 0 (log(x ~ 1)), relative (in ulps) elsewhere
    near_one = exact.abs() < 0.5
    assert err[near_one].max() <= 2e-7
    assert ulp_error(l[~near_one], exact[~near_one]).max() <= 2.0  # measured: 0.73 (AVX2), 0.5 (Sleef)
    specials = torch.tensor([0.0, -0.0, -1.0, math.inf, math.nan, 1.0, 1e-40, -math.inf], dtype=torch.float32)
    _, l = torch.ops.physmdn._vector_exp_log(specials)
    assert l[0] == -math.inf and l[1] == -math.inf
    assert torch.isnan(l[2]) and torch.isnan(l[4]) and torch.isnan(l[7])
    assert l[3] == math.inf and l[5] == 0
    assert l[6] == pytest.approx(math.log(1e-40), rel=1e-3)  # denormal input: handled (the Sleef fallback)


def test_rejects_other_dtypes():
    with pytest.raises(RuntimeError, match="x must be a float32 CPU tensor"):
        torch.ops.physmdn._vector_exp_log(torch.zeros(3, dtype=torch.float64))

"""``physmdn compare`` gives every model the same information: no regime labels or component-specific laws unless
``oracle``, the same training and validation draws, early stopping for every model, equal maximum epochs; the
paired differences and their t-intervals; the torchcfm peer column (skipped with a message when not installed)."""

import math
import statistics

import pytest
import torch

from physmdn import cli
from physmdn import experiments as E
from physmdn import physics as Ph
from physmdn import problems as P

TINY = dict(n_train=16, epochs=2, n_test_contexts=2, n_samples=16)


def _record_fit(monkeypatch):
    calls = []
    real_fit = E.fit

    def recording_fit(model, train, val=None, **kwargs):
        calls.append({"model": type(model).__name__, "train": train, "val": val, **kwargs})
        return real_fit(model, train, val, **kwargs)

    monkeypatch.setattr(E, "fit", recording_fit)
    return calls


def test_default_physics_drops_the_component_specific_law_and_normalizes():
    problem = P.get("hugoniot")
    x = problem.sample_contexts(5, seed=0)
    honest = E.experiment_physics(problem)(x)
    oracle = E.experiment_physics(problem, oracle=True)(x)
    shipped = problem.physics(problem.sample_contexts(5, seed=0))
    assert len(oracle) == len(shipped) and len(honest) == len(shipped) - 1
    assert not any(isinstance(s, Ph.Linear) and s.b.shape[1] > 1 for s, _ in honest)
    assert any(isinstance(s, Ph.Linear) and s.b.shape[1] > 1 for s, _ in oracle)
    # the regime law has a noise scale and is normalized; Rankine-Hugoniot (exact, no noise) keeps its raw weight
    law = next(s for s, _ in oracle if isinstance(s, Ph.Linear) and s.b.shape[1] > 1)
    assert law.normalize == "noise"
    rh_weight = next(w for s, w in honest if isinstance(s, Ph.Linear))
    assert rh_weight == pytest.approx(problem.physics_weights["rankine_hugoniot"] * problem.defaults.physics_weight
                                      / E.NORMALIZED_WEIGHT)


def test_raw_physics_is_the_problem_as_shipped():
    problem = P.get("allen_cahn", grid=16)
    x = problem.sample_contexts(3, seed=0)
    raw = E.experiment_physics(problem, normalize=None)(x)
    shipped = problem.physics(x)
    assert [w for _, w in raw] == [w for _, w in shipped]
    assert all(getattr(s, "normalize", None) is None for s, _ in raw)
    normalized = E.experiment_physics(problem)(x)
    steady = next(s for s, _ in normalized if isinstance(s, Ph.Stencil1D))
    assert steady.normalize == "noise"
    stability_weight = next(w for s, w in normalized if isinstance(s, Ph.FieldStability))
    assert stability_weight == pytest.approx(problem.physics_weights["stability"] * problem.defaults.physics_weight
                                             / E.NORMALIZED_WEIGHT)
    # training multiplies every spec by the global weight: the unnormalized ones are divided by it beforehand
    scaled = E.experiment_physics(problem, weight=0.25)(x)
    assert next(w for s, w in scaled if isinstance(s, Ph.FieldStability)) == pytest.approx(
        4 * E.NORMALIZED_WEIGHT * stability_weight)
    assert next(w for s, w in scaled if isinstance(s, Ph.Stencil1D)) == problem.physics_weights["steady"]
    with pytest.raises(ValueError, match="normalize must be None or 'noise'"):
        E.experiment_physics(problem, normalize="data")


@pytest.mark.parametrize("oracle", [False, True])
def test_every_model_gets_the_same_data_validation_and_epochs(monkeypatch, oracle):
    problem = P.get("hugoniot")
    calls = _record_fit(monkeypatch)
    contexts = problem.sample_contexts(2, seed=1)
    truth = (contexts, problem.sample_truth(contexts, 16, seed=2))
    configs = {}
    for kind in ("mdn", "mdn-physics", "cfm"):
        configs[kind] = E.run_experiment(problem, kind, seed=3, truth=truth, oracle=oracle, **TINY)["config"]
    # Hugoniot's Rankine-Hugoniot law is built into mdn-physics (a ConstrainedMDN), except in the oracle ablation
    assert [c["model"] for c in calls] == ["MDN", "MDN" if oracle else "ConstrainedMDN", "CFM"]
    for call in calls:
        for i in (0, 1):
            assert torch.equal(call["train"][i], calls[0]["train"][i])
        assert torch.equal(call["val"][0], calls[0]["val"][0]) and torch.equal(call["val"][1], calls[0]["val"][1])
        assert call["epochs"] == TINY["epochs"] and call["patience"] == "auto"
    labelled = [len(c["train"]) == 3 for c in calls]
    assert labelled == [False, oracle, False]
    assert configs["mdn-physics"]["regime_labels"] is oracle and configs["mdn"]["regime_labels"] is False


def test_early_stopping_stops_every_model(monkeypatch):
    problem = P.get("pitchfork")
    calls = _record_fit(monkeypatch)
    stopped = []
    for kind in ("mdn", "mdn-physics", "cfm"):
        result = E.run_experiment(problem, kind, n_train=32, epochs=400, n_test_contexts=2, n_samples=16,
                                  patience=2)
        stopped.append(result["timing"]["epochs_completed"])
    assert all(c["patience"] == 2 for c in calls)
    assert all(n < 400 for n in stopped), stopped  # a noisy validation loss stalls for 2 epochs long before 400


def test_paired_differences_against_a_hand_computation():
    rows = []
    mdn = [0.30, 0.25, 0.40, 0.35, 0.28]
    phys = [0.20, 0.24, 0.31, 0.36, 0.21]
    for seed, (a, b) in enumerate(zip(mdn, phys)):
        rows.append({"model": "mdn", "n_train": 32, "seed": seed, "energy": a})
        rows.append({"model": "mdn-physics", "n_train": 32, "seed": seed, "energy": b})
    rows.append({"model": "mdn-physics", "n_train": 32, "seed": 9, "energy": 5.0})  # no partner: ignored
    (row,) = [r for r in E.paired_differences(rows, metrics=("energy",)) if r["model"] == "mdn-physics"]
    diffs = [b - a for a, b in zip(mdn, phys)]
    half = 2.7764451051977934 * statistics.stdev(diffs) / math.sqrt(5)  # t_{0.975, 4}
    assert row["seeds"] == 5 and row["reference"] == "mdn"
    assert row["difference"] == pytest.approx(statistics.mean(diffs))
    assert row["half_width"] == pytest.approx(half, rel=1e-9)
    assert row["ratio"] == pytest.approx(statistics.mean(phys) / statistics.mean(mdn))
    table = E.paired_table(E.paired_differences(rows, metrics=("energy",)))
    assert "| 32 | mdn | 5 |" in table


def test_t_quantile_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for dof in (1, 2, 4, 9, 30, 100):
        assert E.t_quantile(0.95, dof) == pytest.approx(stats.t.ppf(0.975, dof), rel=1e-9)
    with pytest.raises(ValueError, match="dof >= 1"):
        E.t_quantile(0.95, 0)


def test_compare_writes_paired_csv_and_skips_a_missing_peer(monkeypatch, tmp_path):
    monkeypatch.setattr(E, "torchcfm_status", lambda: (False, "torchcfm is not importable (test)"))
    problem = P.get("pitchfork")
    with pytest.warns(UserWarning, match="torchcfm column skipped"):
        rows = E.compare(problem, models=["mdn", "mdn-physics", "torchcfm"], sizes=[16], seeds=2, epochs=2,
                         out=str(tmp_path), progress=False, n_test_contexts=2, n_samples=16)
    assert {r["model"] for r in rows} == {"mdn", "mdn-physics"}
    summary = (tmp_path / "summary.md").read_text()
    assert "torchcfm column skipped" in summary and "paired over seeds" in summary
    assert (tmp_path / "paired.csv").exists()
    assert "torchcfm" not in E.models_for(problem)


def test_torchcfm_peer_trains_and_samples():
    pytest.importorskip("torchcfm")
    problem = P.get("pitchfork")
    assert "torchcfm" in E.models_for(problem)
    result = E.run_experiment(problem, "torchcfm", **TINY)
    assert result["config"]["model"] == "torchcfm" and math.isfinite(result["metrics"]["energy"])
    draws = result["model"].sample(problem.sample_contexts(3, seed=0), 5, steps=4)
    assert draws.shape == (5, 3, 1)
    with pytest.raises(ValueError, match="without physics"):
        result["model"].loss(torch.zeros(2, 1), torch.zeros(2, 1), residual=lambda y, c: y, physics_weight=1.0)


def test_cli_compare_options():
    args = cli.build_parser().parse_args(["compare", "pitchfork"])
    assert args.seeds == 5 and args.oracle is False and args.physics_normalize == "noise" and args.patience == "auto"
    args = cli.build_parser().parse_args(["compare", "hugoniot", "--oracle", "--physics-normalize", "none",
                                          "--patience", "off"])
    assert args.oracle and args.physics_normalize == "none" and args.patience is None
    assert cli.build_parser().parse_args(["compare", "pitchfork", "--patience", "7"]).patience == 7
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["compare", "pitchfork", "--patience", "soon"])


def test_physics_weight_defaults_and_warmup(monkeypatch):
    problem = P.get("pitchfork")
    calls = _record_fit(monkeypatch)
    E.run_experiment(problem, "mdn-physics", n_train=16, epochs=20, n_test_contexts=2, n_samples=16)
    E.run_experiment(problem, "mdn-physics", n_train=16, epochs=20, n_test_contexts=2, n_samples=16,
                     normalize=None, warmup=0.25)
    E.run_experiment(problem, "mdn-physics", n_train=100, epochs=20, n_test_contexts=2, n_samples=16)
    normalized, raw, larger = (calls[i]["physics_weight"] for i in range(3))
    # the noise-normalized default is min(0.1, 2.5 / n): capped at n = 16, 0.025 at n = 100
    assert (normalized.final, normalized.epochs) == (0.1, 2)
    assert (raw.final, raw.epochs) == (problem.defaults.physics_weight, 5)
    assert larger.final == pytest.approx(0.025)

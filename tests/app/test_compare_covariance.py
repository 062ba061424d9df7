"""``physmdn run`` / ``compare`` with ``--covariance``: the flag reaches the MDN, the rows name the covariance and pair
it with the diagonal model, bad combinations exit 2 with a message, the physics penalties and the plots work with
full and low-rank components, and a diverged run is kept as a row."""

import csv
import json
import math

import pytest
import torch

import physmdn
from physmdn import cli
from physmdn import experiments as E
from physmdn import physics as Ph
from physmdn import physics_correlated
from physmdn import problems as P

TINY = dict(n_train=16, epochs=2, n_test_contexts=2, n_samples=16)
CLI_TINY = ["--epochs", "2", "--n-test-contexts", "3", "--n-samples", "16", "--threads", "1", "--quiet"]


def png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


@pytest.mark.parametrize("covariance, rank, family", [("full", None, physmdn.GaussianMixtureTril),
                                                      ("lowrank", 3, physmdn.GaussianMixtureLowRank),
                                                      ("diag", None, physmdn.GaussianMixture)])
def test_the_covariance_reaches_the_trained_model(covariance, rank, family):
    problem = P.get("hugoniot")
    result = E.run_experiment(problem, "mdn", covariance=covariance, rank=rank, **TINY)
    mixture = result["model"](result["contexts"])
    assert type(mixture) is family
    if rank is not None:
        assert mixture.rank == rank
    assert result["config"].get("covariance", "diag") == covariance
    assert math.isfinite(result["metrics"]["nll"]) and math.isfinite(result["metrics"]["energy"])


def test_physics_penalties_train_full_components_on_a_field():
    problem = P.get("allen_cahn", grid=8)
    result = E.run_experiment(problem, "mdn-physics", covariance="full", **TINY)
    assert isinstance(result["model"](result["contexts"]), physmdn.GaussianMixtureTril)
    penalties = [row["train_physics"] for row in result["history"]]
    # the noise-normalized steady-state stencil and the stability prior, warmed up from weight 0
    assert all(math.isfinite(p) for p in penalties) and penalties[-1] > 0


def test_noise_normalized_specs_under_diagonal_full_components_match_the_diagonal_loss():
    """A full-covariance mixture with a diagonal Cholesky factor is the diagonal mixture: with the experiments'
    specs (noise_scale > 0, normalize="noise") both penalties agree."""
    problem = P.get("reaction_diffusion", grid=8)
    x = problem.sample_contexts(4, seed=0)
    specs = E.experiment_physics(problem)(x)
    assert any(getattr(s, "normalize", None) == "noise" and s.noise_scale > 0 for s, _ in specs)
    g = torch.Generator().manual_seed(0)
    logits, means = torch.randn(4, 3, generator=g), torch.randn(4, 3, 8, generator=g)
    log_scales = -1.5 + 0.5 * torch.randn(4, 3, 8, generator=g)  # some scales below the noise, some above
    full = physmdn.GaussianMixtureTril(logits, means, torch.diag_embed(log_scales.exp()))
    torch.testing.assert_close(physics_correlated.physics_penalty(full, specs),
                               Ph.physics_penalty(logits, means, log_scales, specs), rtol=1e-4, atol=1e-5)


def test_compare_names_the_covariance_and_pairs_it_with_the_diagonal_model(tmp_path):
    out = tmp_path / "cmp"
    assert cli.main(["compare", "hugoniot", "--n-train", "16", "--seeds", "2", "--models", "mdn,mdn-physics",
                     "--covariance", "diag,full,lowrank", "--rank", "2", "--out", str(out), *CLI_TINY]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    names = ("mdn", "mdn-full", "mdn-lowrank2", "mdn-physics", "mdn-physics-full", "mdn-physics-lowrank2")
    assert {(r["model"], r["seed"]) for r in rows} == {(m, s) for m in names for s in ("0", "1")}
    assert {(r["model"], r["covariance"], r["rank"]) for r in rows} >= {
        ("mdn-full", "full", ""), ("mdn-lowrank2", "lowrank", "2"), ("mdn-physics", "diag", "")}
    paired = list(csv.DictReader((out / "paired.csv").open()))
    pairs = {(p["model"], p["reference"]) for p in paired}
    assert {("mdn-physics-full", "mdn-physics"), ("mdn-full", "mdn"), ("mdn-physics-lowrank2", "mdn-physics"),
            ("mdn-physics-full", "mdn")} <= pairs
    assert ("mdn-physics", "mdn-physics-full") not in pairs
    # the difference is full minus diagonal, per seed, on the same data
    energy = {(r["model"], r["seed"]): float(r["energy"]) for r in rows}
    cell = next(p for p in paired if (p["model"], p["reference"], p["metric"]) == ("mdn-physics-full",
                                                                                  "mdn-physics", "energy"))
    expected = sum(energy[("mdn-physics-full", s)] - energy[("mdn-physics", s)] for s in ("0", "1")) / 2
    assert float(cell["difference"]) == pytest.approx(expected, rel=1e-6)
    summary_md = (out / "summary.md").read_text()
    assert "## mdn-physics-full minus each reference model" in summary_md
    assert [r["model"] for r in csv.DictReader((out / "summary.csv").open())] == list(names)
    assert png(out / "compare.png")


def test_a_diverged_run_is_a_row_not_a_crash(tmp_path, monkeypatch):
    real = E.run_experiment

    def diverging(problem, kind, **kwargs):
        if kwargs.get("covariance") == "full" and kwargs["seed"] == 1:
            raise FloatingPointError("training loss must stay finite, got nan in epoch 3")
        return real(problem, kind, **kwargs)

    monkeypatch.setattr(E, "run_experiment", diverging)
    with pytest.warns(UserWarning, match="mdn-full, n_train 16, seed 1 diverged"):
        rows = E.compare(P.get("pitchfork"), models=["mdn"], covariances=("diag", "full"), sizes=[16], seeds=2,
                         epochs=2, out=str(tmp_path), progress=False, n_test_contexts=2, n_samples=16)
    failed = [r for r in rows if r.get("error")]
    assert [(r["model"], r["seed"]) for r in failed] == [("mdn-full", 1)] and "energy" not in failed[0]
    summary = {r["model"]: r for r in E.summarize(rows)}
    assert (summary["mdn-full"]["seeds"], summary["mdn-full"]["failed"]) == (1, 1)
    assert next(p for p in E.paired_differences(rows) if p["model"] == "mdn-full")["seeds"] == 1
    assert "mdn-full, n_train 16, seed 1 diverged" in (tmp_path / "summary.md").read_text()


def test_run_plots_the_density_of_full_components_and_the_fields_of_low_rank_ones(tmp_path):
    out = tmp_path / "hug"
    assert cli.main(["run", "hugoniot", "--model", "mdn-physics", "--covariance", "full", "--n-train", "32",
                     "--out", str(out), *CLI_TINY]) == 0
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert (config["model"], config["covariance"]) == ("mdn-physics", "full")
    assert png(out / "density.png") and png(out / "history.png")
    out = tmp_path / "ac"
    assert cli.main(["run", "allen-cahn", "--model", "mdn", "--covariance", "lowrank", "--rank", "2", "--n-train",
                     "32", "--hidden", "16", "--out", str(out), *CLI_TINY]) == 0
    assert png(out / "fields.png")


@pytest.mark.parametrize("argv, message", [
    (["run", "pitchfork", "--model", "mdn", "--covariance", "dense"],
     "--covariance: expected a comma-separated subset of diag, full, lowrank, got 'dense'"),
    (["run", "hugoniot", "--model", "mdn-law", "--covariance", "full"],
     "--covariance full applies to the models mdn, mdn-physics, got --model mdn-law"),
    (["run", "pitchfork", "--model", "cfm", "--covariance", "lowrank", "--rank", "2"],
     "--covariance lowrank applies to the models mdn, mdn-physics, got --model cfm"),
    (["compare", "pitchfork", "--models", "cfm,torchcfm", "--covariance", "full"],
     "--covariance full applies to the models mdn, mdn-physics, got --models cfm,torchcfm"),
    (["run", "pitchfork", "--model", "mdn", "--covariance", "diag,full"],
     "--covariance takes one of diag, full, lowrank for run, got diag,full"),
    (["run", "pitchfork", "--model", "mdn", "--covariance", "full", "--rank", "2"],
     "--rank goes with --covariance lowrank (and is required there), got --covariance full --rank 2"),
    (["compare", "pitchfork", "--covariance", "diag,lowrank"],
     "--rank goes with --covariance lowrank (and is required there), got --covariance diag,lowrank"),
    (["compare", "pitchfork", "--covariance", "lowrank", "--rank", "9"], "--rank must be an integer in [1, 8], got 9"),
])
def test_bad_covariance_arguments_exit_2_with_a_clear_message(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--out", str(tmp_path / "out"), "--epochs", "1"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_run_experiment_refuses_a_covariance_for_models_without_one():
    with pytest.raises(ValueError, match="covariance='full' applies to the models mdn, mdn-physics, got model 'cfm'"):
        E.run_experiment(P.get("pitchfork"), "cfm", covariance="full", **TINY)
    with pytest.raises(ValueError, match="covariance must be one of diag, full, lowrank, got 'dense'"):
        E.run_experiment(P.get("pitchfork"), "mdn", covariance="dense", **TINY)
    assert E.model_base("mdn-physics-lowrank4") == "mdn-physics" and E.model_base("mdn-law") == "mdn-law"
    assert E.covariance_name("mdn", "lowrank", 4) == "mdn-lowrank4"

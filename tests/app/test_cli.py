"""Command line smoke tests on tiny sizes: outputs written, tables complete, errors clear."""

import csv
import json
import math

import pytest
import torch

pytest.importorskip("physmdn.training")
from physmdn import cli  # noqa: E402
from physmdn import __main__ as entry  # noqa: E402

TINY = ["--epochs", "2", "--n-test-contexts", "4", "--n-samples", "32", "--threads", "1", "--quiet"]


def png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_run_writes_metrics_history_and_density_plot(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["run", "pitchfork", "--model", "mdn-physics", "--n-train", "64", "--out", str(out), *TINY]) == 0
    payload = json.loads((out / "metrics.json").read_text())
    metrics = payload["metrics"]
    for key in ("nll", "energy", "mmd", "sliced_w1", "mode_weight_error", "residual_model", "residual_truth",
                "calibration_error"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert payload["config"]["model"] == "mdn-physics" and payload["config"]["n_train"] == 64
    assert payload["config"]["physics_weight"] > 0
    assert payload["timing"]["train_s"] > 0 and payload["timing"]["sample_10k_s"] > 0
    assert payload["environment"]["torch"]
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert png(out / "density.png") and png(out / "history.png")


def test_run_field_problem_with_flow_matching_plots_fields(tmp_path):
    out = tmp_path / "ac"
    assert cli.main(["run", "allen-cahn", "--model", "cfm", "--n-train", "48", "--hidden", "16,16",
                     "--cfm-steps", "4", "--out", str(out), *TINY]) == 0
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["metrics"]["nll"] is None  # no likelihood for flow matching
    assert payload["config"]["problem"] == "allen_cahn" and payload["config"]["hidden"] == [16, 16]
    assert png(out / "fields.png")


def test_compare_writes_a_row_per_run_and_a_summary_table(tmp_path):
    out = tmp_path / "cmp"
    assert cli.main(["compare", "hugoniot", "--n-train", "32,64", "--seeds", "2", "--models", "mdn,mdn-physics",
                     "--epochs", "1", "--n-test-contexts", "3", "--n-samples", "16", "--threads", "1", "--out", str(out),
                     "--quiet"]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 * 2 * 2
    assert {(r["model"], r["n_train"], r["seed"]) for r in rows} == {
        (m, n, s) for m in ("mdn", "mdn-physics") for n in ("32", "64") for s in ("0", "1")}
    assert all(float(r["train_s"]) > 0 and float(r["sample_10k_s"]) > 0 for r in rows)
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert len(summary) == 4 and all(r["seeds"] == "2" for r in summary)
    table = (out / "summary.md").read_text()
    assert table.count("| mdn-physics |") == 2 and "± " in table and "mode_weight_error" in table
    assert png(out / "compare.png")


def test_demo_runs_all_models_on_the_pitchfork(tmp_path):
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    assert cli.main(["demo", "--n-train", "32", "--seeds", "1", "--epochs", "1", "--cfm-steps", "2", "--threads", "1",
                     "--out", str(out), "--quiet"]) == 0
    assert torch.get_num_threads() == threads  # restored after the command
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["model"] for r in rows] == ["mdn", "mdn-physics", "cfm"] and {r["problem"] for r in rows} == {"pitchfork"}


def test_demo_draws_the_bifurcation_diagram_and_metric_bars_over_seeds(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    assert cli.main(["demo", "--n-train", "32,48", "--seeds", "2", "--epochs", "1", "--cfm-steps", "2", "--out",
                     str(out), "--quiet"]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {(r["model"], r["n_train"], r["seed"]) for r in rows} == {
        (m, n, s) for m in ("mdn", "mdn-physics", "cfm") for n in ("32", "48") for s in ("0", "1")}
    assert png(out / "bifurcation.png") and png(out / "metrics.png") and png(out / "compare.png")


def test_demo_defaults_three_seeds_on_one_thread():
    args = cli.build_parser().parse_args(["demo"])
    assert args.seeds == 3 and args.threads == 1 and args.n_train == [256, 2048]
    assert cli.build_parser().parse_args(["demo", "--seeds", "5", "--threads", "2"]).seeds == 5


@pytest.mark.parametrize("argv, message", [
    (["run", "heat", "--model", "mdn"], "unknown problem 'heat'; valid names: allen_cahn, hugoniot, pitchfork"),
    (["run", "pitchfork", "--model", "gan"], "argument --model: invalid choice: 'gan'"),
    (["run", "pitchfork"], "the following arguments are required: --model"),
    (["run", "pitchfork", "--model", "mdn", "--n-train", "0"], "expected a positive integer, got '0'"),
    (["compare", "pitchfork", "--n-train", "64,x"], "expected a positive integer, got 'x'"),
    (["compare", "pitchfork", "--models", "mdn,foo"], "models must be a comma-separated subset of mdn, mdn-physics, mdn-law, cfm"),
    (["run", "pitchfork", "--model", "mdn", "--lr", "-1"], "expected a positive number, got '-1'"),
    (["launch"], "invalid choice: 'launch'"),
])
def test_bad_commands_exit_2_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_problems_listing_and_module_entry_point(capsys):
    assert entry.main(["problems"]) == 0
    listing = capsys.readouterr().out
    for name in ("pitchfork", "allen_cahn", "hugoniot", "reaction_diffusion"):
        assert name in listing


def test_version_and_info_commands(capsys):
    import physmdn
    from physmdn import cli as cli_module

    with pytest.raises(SystemExit) as exit_info:
        cli_module.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"physmdn {physmdn.__version__}"
    assert cli_module.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch_version" in out and "torch_running" in out and "cuda_kernels" in out


def test_hard_law_model_on_hugoniot():
    """mdn-law (a ConstrainedMDN on Rankine-Hugoniot) runs through run_experiment; its samples keep the law, and
    compare offers it only where the problem has a hard law."""
    from physmdn import experiments, problems

    hugoniot = problems.get("hugoniot")
    assert "mdn-law" in experiments.models_for(hugoniot)
    assert "mdn-law" not in experiments.models_for(problems.get("pitchfork"))
    result = experiments.run_experiment(hugoniot, "mdn-law", n_train=64, epochs=3, n_test_contexts=4, n_samples=50)
    assert result["metrics"]["residual_model_rankine_hugoniot"] < 0.05
    with pytest.raises(ValueError, match="kind must be one of .* for pitchfork"):
        experiments.run_experiment(problems.get("pitchfork"), "mdn-law", n_train=16, epochs=1)

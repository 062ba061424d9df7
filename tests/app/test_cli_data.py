"""``physmdn fit`` / ``physmdn sample`` on user data files, and :func:`physmdn.datafiles.read_columns`: outputs
checked against the data's closed form, every bad input exits 2 with a message naming the problem."""

import csv
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import physmdn
from physmdn import cli
from physmdn.datafiles import DataFileError, read_columns

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = ["--threads", "1", "--quiet"]


def write_csv(path, header, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def linear_data(n=300, seed=0):
    """y = 2 x + 1 + 0.1 eps, x ~ U(0, 1): p(y | x) = N(2 x + 1, 0.1^2)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, n)
    return x, 2.0 * x + 1.0 + 0.1 * rng.standard_normal(n)


def linear_csv(path, n=300):
    x, y = linear_data(n)
    return write_csv(path, ["x", "label", "y"], [[repr(float(a)), "run-a", repr(float(b))] for a, b in zip(x, y)])


def exits_2(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def read_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint fitted on the linear CSV (2 epochs: for the error cases, not the accuracy)."""
    folder = tmp_path_factory.mktemp("trained")
    data = linear_csv(folder / "data.csv", n=64)
    previous = torch.get_num_threads()
    assert cli.main(["fit", data, "--x", "x", "--y", "y", "--epochs", "2", "--out", str(folder / "out"), "--no-plots",
                     *QUIET]) == 0
    torch.set_num_threads(previous)
    return folder / "out" / "model.pt"


# ----- fit and sample --------------------------------------------------------------------------------

def test_fit_then_sample_on_a_csv_recovers_the_conditional(tmp_path):
    data = linear_csv(tmp_path / "data.csv")
    out = tmp_path / "out"
    assert cli.main(["fit", data, "--x", "x", "--y", "y", "--components", "2", "--epochs", "30", "--batch-size", "64",
                     "--lr", "0.01", "--out", str(out), *QUIET]) == 0
    model = physmdn.load(str(out / "model.pt"))
    assert isinstance(model, physmdn.MDN) and (model.in_features, model.out_features, model.components) == (1, 1, 2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["columns"]["x"] == ["x"] and summary["columns"]["y"] == ["y"]
    assert summary["data"]["rows"] == 300 and summary["data"]["rows_val"] == 60 and summary["data"]["rows_train"] == 240
    assert summary["model"]["covariance"] == "diag" and summary["physics"] is None
    for name in ("x_loc", "x_scale", "y_loc", "y_scale"):  # what sample maps back with: the model's own buffers
        assert summary["normalization"][name] == pytest.approx(getattr(model, name).tolist())
    x, y = linear_data()
    assert summary["normalization"]["x_loc"][0] == pytest.approx(x.mean(), abs=0.05)  # 240 of 300 rows
    assert summary["normalization"]["y_scale"][0] == pytest.approx(y.std(), rel=0.1)
    history = read_rows(out / "history.csv")
    assert [int(r["epoch"]) for r in history] == list(range(30))
    assert summary["training"]["best_epoch"] is not None
    best = min(float(r["val_data"]) for r in history)
    assert summary["training"]["best_metric"] == pytest.approx(best)
    if os.path.exists(out / "samples.png"):
        assert (out / "history.png").read_bytes()[:4] == b"\x89PNG" and (out / "samples.png").stat().st_size > 1000

    samples = tmp_path / "samples.csv"
    assert cli.main(["sample", str(out / "model.pt"), "--x", "0.5", "--x", "0.1", "--n", "2000", "--out", str(samples),
                     "--quiet"]) == 0
    rows = read_rows(samples)
    assert list(rows[0]) == ["context", "x", "y"] and len(rows) == 4000
    for context, x_value in ((0, 0.5), (1, 0.1)):
        drawn = np.array([float(r["y"]) for r in rows if int(r["context"]) == context])
        assert all(float(r["x"]) == x_value for r in rows if int(r["context"]) == context)
        assert drawn.mean() == pytest.approx(2.0 * x_value + 1.0, abs=0.05)  # the closed-form conditional
        assert 0.07 < drawn.std() < 0.14
    again = tmp_path / "again.csv"
    assert cli.main(["sample", str(out / "model.pt"), "--x", "0.5", "--x", "0.1", "--n", "2000", "--out", str(again),
                     "--quiet"]) == 0
    assert again.read_text() == samples.read_text()  # seeded


def test_sample_contexts_from_a_file_by_name_or_by_column(tmp_path, trained):
    contexts = write_csv(tmp_path / "new.csv", ["note", "x"], [["a", "0.25"], ["b", "0.75"], ["c", "0.5"]])
    out = tmp_path / "s.csv"
    assert cli.main(["sample", str(trained), "--x-file", contexts, "--n", "3", "--out", str(out), "--quiet"]) == 0
    rows = read_rows(out)
    assert len(rows) == 9 and [float(r["x"]) for r in rows] == [0.25] * 3 + [0.75] * 3 + [0.5] * 3
    assert [int(r["context"]) for r in rows] == [0] * 3 + [1] * 3 + [2] * 3
    headerless = write_csv(tmp_path / "plain.csv", None, [["9", "0.3"], ["9", "0.6"]])
    assert cli.main(["sample", str(trained), "--x-file", headerless, "--x-cols", "1", "--n", "2", "--out", str(out),
                     "--quiet"]) == 0
    assert [float(r["x"]) for r in read_rows(out)] == [0.3, 0.3, 0.6, 0.6]


def test_sample_from_a_checkpoint_written_by_fit_in_python(tmp_path):
    """Checkpoints without column names (physmdn.fit's best.pt) sample under x0.. / y0.. names."""
    torch.manual_seed(0)
    model = physmdn.MDN(2, 2, 2, hidden=(8,))
    physmdn.fit(model, (torch.randn(32, 2), torch.randn(32, 2)), epochs=1, checkpoint_dir=str(tmp_path),
                progress=False)
    out = tmp_path / "s.csv"
    assert cli.main(["sample", str(tmp_path / "best.pt"), "--x=-0.5,1", "--n", "4", "--out", str(out), "--quiet"]) == 0
    rows = read_rows(out)
    assert list(rows[0]) == ["context", "x0", "x1", "y0", "y1"] and len(rows) == 4
    assert {(r["x0"], r["x1"]) for r in rows} == {("-0.5", "1")}


def test_fit_npz_with_column_selection_and_pt_tuple_and_dict(tmp_path):
    rng = np.random.default_rng(1)
    n = 40
    inputs = np.stack([rng.normal(0.0, 1.0, n), rng.normal(10.0, 1.0, n), rng.normal(-5.0, 2.0, n)], axis=1)
    outputs = np.stack([inputs[:, 0] + 0.1 * rng.normal(size=n), rng.normal(3.0, 0.5, n)], axis=1)
    np.savez(tmp_path / "d.npz", inputs=inputs, outputs=outputs, tag=np.arange(n))
    out = tmp_path / "npz"
    assert cli.main(["fit", str(tmp_path / "d.npz"), "--x", "inputs[0,2]", "--y", "outputs", "--epochs", "1",
                     "--val-fraction", "0", "--out", str(out), "--no-plots", *QUIET]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["columns"]["x"] == ["inputs[0]", "inputs[2]"]
    assert summary["columns"]["y"] == ["outputs[0]", "outputs[1]"]
    # every row trains (--val-fraction 0), so the normalization is the selected columns' mean and spread
    assert summary["normalization"]["x_loc"] == pytest.approx(inputs[:, [0, 2]].mean(0), rel=1e-5)
    assert summary["normalization"]["x_scale"] == pytest.approx(inputs[:, [0, 2]].std(0), rel=1e-5)
    assert summary["normalization"]["y_loc"] == pytest.approx(outputs.mean(0), rel=1e-5)

    x, y = torch.from_numpy(inputs[:, 1:2]).float(), torch.from_numpy(outputs[:, 1]).float()
    torch.save((x, y), tmp_path / "pair.pt")
    torch.save({"context": x.double(), "outcome": y.unsqueeze(1)}, tmp_path / "named.pth")
    for path, (xs, ys) in (("pair.pt", ("x", "y")), ("named.pth", ("context", "outcome"))):
        folder = tmp_path / path.replace(".", "_")
        assert cli.main(["fit", str(tmp_path / path), "--x", xs, "--y", ys, "--epochs", "1", "--val-fraction", "0",
                         "--out", str(folder), "--no-plots", *QUIET]) == 0
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["normalization"]["x_loc"] == pytest.approx([inputs[:, 1].mean()], rel=1e-5)
        assert summary["normalization"]["y_loc"] == pytest.approx([outputs[:, 1].mean()], rel=1e-4)


def test_drop_nan_drops_the_rows_and_says_how_many(tmp_path):
    x, y = linear_data(40)
    rows = [[repr(float(a)), "l", repr(float(b))] for a, b in zip(x, y)]
    rows[3][2], rows[8][0] = "nan", ""
    data = write_csv(tmp_path / "holes.csv", ["x", "label", "y"], rows)
    out = tmp_path / "out"
    assert cli.main(["fit", data, "--x", "x", "--y", "y", "--epochs", "1", "--drop-nan", "--out", str(out),
                     "--no-plots", *QUIET]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["rows"] == 40 and summary["data"]["rows_dropped"] == 2
    assert summary["data"]["rows_train"] + summary["data"]["rows_val"] == 38


# ----- physics -----------------------------------------------------------------------------------------

HELPER = textwrap.dedent('''
    import torch
    from physmdn.physics import Linear

    SUM_TO_ONE = Linear(torch.tensor([[1.0, 1.0]]), torch.tensor([1.0]))  # y0 + y1 = 1
    THREE_OUTPUTS = Linear(torch.tensor([[1.0, 1.0, 1.0]]))
    CALLS = []
    NOT_A_SPEC = 3


    def per_batch(x):
        CALLS.append(x.shape[0])
        return [(SUM_TO_ONE, 2.0)]
''')


@pytest.fixture
def helper(tmp_path, monkeypatch):
    (tmp_path / "physmdn_test_laws.py").write_text(HELPER)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("physmdn_test_laws", None)
    rng = np.random.default_rng(2)
    x = rng.uniform(0.0, 1.0, 100)
    y0 = x + 0.05 * rng.standard_normal(100)
    data = write_csv(tmp_path / "law.csv", ["x", "y0", "y1"], [[a, b, 1.0 - b] for a, b in zip(x, y0)])
    yield data
    sys.modules.pop("physmdn_test_laws", None)


def test_physics_spec_from_a_module_with_weight_warmup(tmp_path, helper):
    out = tmp_path / "law"
    assert cli.main(["fit", helper, "--x", "x", "--y", "y0,y1", "--physics", "physmdn_test_laws:SUM_TO_ONE",
                     "--physics-weight", "0.5", "--physics-warmup", "2", "--epochs", "3", "--out", str(out),
                     "--no-plots", *QUIET]) == 0
    history = read_rows(out / "history.csv")
    assert [float(r["physics_weight"]) for r in history] == [0.0, 0.25, 0.5]  # LinearWarmup(0.5, epochs=2)
    assert all(float(r["train_physics"]) > 0.0 for r in history[1:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["physics"] == {"spec": "physmdn_test_laws:SUM_TO_ONE", "weight": 0.5, "warmup_epochs": 2}
    plain = tmp_path / "plain"
    assert cli.main(["fit", helper, "--x", "x", "--y", "y0,y1", "--epochs", "1", "--out", str(plain), "--no-plots",
                     *QUIET]) == 0
    assert float(read_rows(plain / "history.csv")[0]["train_physics"]) == 0.0


def test_physics_function_from_a_file_is_called_per_batch(tmp_path, helper):
    out = tmp_path / "fn"
    assert cli.main(["fit", helper, "--x", "x", "--y", "y0,y1", "--physics",
                     f"{tmp_path / 'physmdn_test_laws.py'}:per_batch", "--epochs", "2", "--batch-size", "32",
                     "--out", str(out), "--no-plots", *QUIET]) == 0
    module = [m for name, m in sys.modules.items() if name.startswith("physmdn_physics_physmdn_test_laws")]
    assert len(module) == 1
    # one call on 4 rows before training, then one per batch: 80 training rows in 32 + 32 + 16 and the 20
    # validation rows, two epochs
    assert module[0].CALLS == [4, 32, 32, 16, 20, 32, 32, 16, 20]
    assert all(float(r["train_physics"]) > 0.0 for r in read_rows(out / "history.csv"))


# ----- read_columns ------------------------------------------------------------------------------------

def test_read_columns_csv_grammar(tmp_path):
    rows = [[str(i + 10 * j) for j in range(5)] for i in range(3)]
    path = write_csv(tmp_path / "plain.csv", None, rows)
    cols = read_columns(path, "0,3:", "1:3")
    assert cols.x_names == ["0", "3", "4"] and cols.y_names == ["1", "2"]
    expected = torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)
    torch.testing.assert_close(cols.x, expected[:, [0, 3, 4]])
    torch.testing.assert_close(cols.y, expected[:, [1, 2]])
    named = write_csv(tmp_path / "named.csv", ["a", "2", "b"], [["1", "2", "3"], ["4", "5", "6"]])
    cols = read_columns(named, "2", "0")  # the header's "2" (a name) wins over index 2
    assert cols.x.tolist() == [[2.0], [5.0]] and cols.y_names == ["a"]
    tsv = tmp_path / "t.tsv"
    tsv.write_text("p\tq\n1.5\t-2\n\n3\t4e-3\n")
    cols = read_columns(str(tsv), "q", None)
    assert cols.x.tolist() == [[-2.0], [4e-3]] and cols.y.shape == (2, 0)


@pytest.mark.parametrize("setup, x, y, message", [
    (None, "x", "y", "does not exist"),
    ("folder.csv", "x", "y", "is not a file"),
    ("data.xlsx", "x", "y", "must end in one of .csv, .tsv, .npz, .pt, .pth, got .xlsx"),
    ("binary.csv", "x", "y", "must be UTF-8 text"),
    ("bad.npz", "x", "y", "is not a readable .npz archive"),
    ("bad.pt", "x", "y", "is not loadable with torch.load(weights_only=True)"),
    ("empty.csv", "x", "y", "has no rows (empty file)"),
    ("good.csv", "x", "z", "--y names column 'z', which data file"),
    ("good.csv", "label", "y", "column 'label' of data file"),
    ("good.csv", "7", "y", "--x: index 7 is out of range"),
    ("good.csv", "x", "x", "--x and --y must select different columns, got 'x' in both"),
    ("good.csv", "x,x", "y", "--x must select each column once"),
    ("good.csv", "0:0", "y", "range '0:0' must select columns within 0:3"),
    ("ragged.csv", "x", "y", "line 3 has 2 field(s), expected 3"),
    ("nan.csv", "x", "y", "column 'y' has 2 NaN or infinite value(s) (line 5, line 8)"),
    ("short.csv", "x", "y", "must have at least 10 rows, got 5"),
    ("arrays.npz", "x", "w", "--y names array 'w', which data file"),
    ("arrays.npz", "x[5]", "y", "index 5 is out of range: array 'x' has 2 column(s)"),
    ("arrays.npz", "x", "cube", "array 'cube' of data file"),
    ("arrays.npz", "x", "words", "must hold numbers, got <U"),
    ("arrays.npz", "x", "short", "different numbers of rows"),
    ("scalar.pt", "x", "y", "must hold a dict of tensors or an (x, y) tuple, got float"),
])
def test_bad_data_exits_2_naming_the_problem(tmp_path, capsys, setup, x, y, message):
    x_data, y_data = linear_data(20)
    good = [[repr(float(a)), "lab", repr(float(b))] for a, b in zip(x_data, y_data)]
    files = {
        "folder.csv": lambda p: p.mkdir(),
        "data.xlsx": lambda p: p.write_text("x,y\n1,2\n"),
        "binary.csv": lambda p: p.write_bytes(b"\xff\xfe\x00\x81" * 50),
        "bad.npz": lambda p: p.write_bytes(b"not a zip"),
        "bad.pt": lambda p: p.write_bytes(b"not a checkpoint"),
        "empty.csv": lambda p: p.write_text("\n\n"),
        "good.csv": lambda p: write_csv(p, ["x", "label", "y"], good),
        "ragged.csv": lambda p: write_csv(p, ["x", "label", "y"], [good[0], good[1][:2], *good[2:]]),
        "nan.csv": lambda p: write_csv(p, ["x", "label", "y"],
                                       [r if i not in (3, 6) else [r[0], r[1], "nan" if i == 3 else "inf"]
                                        for i, r in enumerate(good)]),
        "short.csv": lambda p: write_csv(p, ["x", "label", "y"], good[:5]),
        "arrays.npz": lambda p: np.savez(p, x=np.ones((20, 2)), y=np.ones(20), cube=np.ones((20, 2, 2)),
                                         words=np.array(["a"] * 20), short=np.ones(3)),
        "scalar.pt": lambda p: torch.save(1.5, p),
    }
    path = tmp_path / (setup or "missing.csv")
    if setup:
        files[setup](path)
    err = exits_2(["fit", str(path), "--x", x, "--y", y, "--out", str(tmp_path / "out"), *QUIET], capsys)
    assert message in err, err
    assert not (tmp_path / "out" / "model.pt").exists()


def test_read_columns_raises_data_file_error(tmp_path):
    with pytest.raises(DataFileError, match="does not exist"):
        read_columns(str(tmp_path / "nope.csv"), "x", "y")
    assert issubclass(DataFileError, ValueError)


# ----- options -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--covariance", "spherical"], "--covariance must be one of diag, full, lowrank, got 'spherical'"),
    (["--covariance", "lowrank"], "--rank goes with --covariance lowrank (and is required there)"),
    (["--covariance", "full", "--rank", "2"], "--rank goes with --covariance lowrank"),
    (["--covariance", "lowrank", "--rank", "9"], "rank"),
    (["--physics", "nocolon"], "--physics must be module:name or path/to/file.py:name, got 'nocolon'"),
    (["--physics", "physmdn_no_such_module_x:law"], "importing module 'physmdn_no_such_module_x' failed"),
    (["--physics", "missing/file.py:law"], "names the file 'missing/file.py', which does not exist"),
    (["--physics", "physmdn_test_laws:NOPE"], "'physmdn_test_laws' has no attribute 'NOPE'"),
    (["--physics", "physmdn_test_laws:NOT_A_SPEC"], "--physics must name a PhysicsSpec"),
    (["--physics", "physmdn.physics:Linear"], "--physics must name a PhysicsSpec"),  # a class, not an instance
    (["--physics", "physmdn_test_laws:THREE_OUTPUTS"], "must fit the data (1 context column(s), 2 outcome column(s)"),
    (["--physics-weight", "2"], "--physics-weight and --physics-warmup need --physics"),
    (["--val-fraction", "1"], "expected a number in [0, 1), got '1'"),
    (["--components", "0"], "expected a positive integer, got '0'"),
])
def test_bad_fit_options_exit_2(tmp_path, capsys, helper, extra, message):
    err = exits_2(["fit", helper, "--x", "x", "--y", "y0,y1", "--out", str(tmp_path / "out"), *extra, *QUIET], capsys)
    assert message in err, err


def test_covariance_diag_is_accepted(tmp_path):
    data = linear_csv(tmp_path / "d.csv", n=30)
    assert cli.main(["fit", data, "--x", "x", "--y", "y", "--covariance", "DIAG", "--epochs", "1", "--out",
                     str(tmp_path / "o"), "--no-plots", *QUIET]) == 0


@pytest.mark.parametrize("covariance", [["--covariance", "full"], ["--covariance", "lowrank", "--rank", "1"]])
def test_correlated_covariance_fits_and_samples_on_a_line(tmp_path, covariance):
    """Outcomes on a noisy line y1 = y0 (given x): a full or low-rank component follows it, so its samples keep the
    correlation (a diagonal one cannot); fit writes the model with that covariance and sample draws from it."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(400, generator=g)
    y0 = x + 0.5 * torch.randn(400, generator=g)
    y1 = y0 + 0.02 * torch.randn(400, generator=g)
    data = write_csv(tmp_path / "line.csv", ["x", "y0", "y1"], torch.stack([x, y0, y1], 1).tolist())
    out = tmp_path / "out"
    assert cli.main(["fit", data, "--x", "x", "--y", "y0,y1", "--components", "1", *covariance, "--epochs", "60",
                     "--batch-size", "100", "--lr", "0.01", "--out", str(out), "--no-plots", *QUIET]) == 0
    model = physmdn.load(str(out / "model.pt"))
    assert model.covariance == covariance[1]
    assert json.loads((out / "summary.json").read_text())["model"]["covariance"] == covariance[1]
    samples = tmp_path / "s.csv"
    assert cli.main(["sample", str(out / "model.pt"), "--x", "0.5", "--n", "2000", "--out", str(samples),
                     *QUIET]) == 0
    with open(samples) as f:
        rows = list(csv.DictReader(f))
    drawn = torch.tensor([[float(r["y0"]), float(r["y1"])] for r in rows])
    assert drawn.shape == (2000, 2)
    assert torch.corrcoef(drawn.T)[0, 1] > 0.9  # (a diagonal component's samples have correlation ~0)


@pytest.mark.parametrize("extra, message", [
    (["--x", "0.1,0.2"], "--x must give 1 comma-separated value(s) (context columns x), got 2 in '0.1,0.2'"),
    (["--x", "abc"], "--x must be numbers, got 'abc'"),
    (["--x", "nan"], "--x must be finite numbers, got 'nan'"),
    ([], "give the contexts with either --x (values) or --x-file (a data file), not neither"),
    (["--x", "1", "--x-file", "a.csv"], "not both"),
    (["--x", "1", "--out", "s.txt"], "--out must be a .csv file, got 's.txt'"),
    (["--x", "1", "--x-cols", "x"], "--x-cols selects columns of --x-file"),
    (["--x-file", "MISSING.csv"], "does not exist"),
    (["--x-file", "TWO.csv", "--x-cols", "a,b"], "--x-cols must select 1 column(s)"),
    (["--x-file", "TWO.csv"], "--x-cols names column 'x', which data file"),
])
def test_bad_sample_options_exit_2(tmp_path, capsys, trained, extra, message):
    paths = {"MISSING.csv": str(tmp_path / "missing.csv"),
             "TWO.csv": write_csv(tmp_path / "two.csv", ["a", "b"], [["1", "2"]])}
    extra = [paths.get(e, e) for e in extra]
    err = exits_2(["sample", str(trained), *extra, *QUIET], capsys)
    assert message in err, err


def test_sample_refuses_missing_and_damaged_checkpoints(tmp_path, capsys, trained):
    assert "checkpoint" in exits_2(["sample", str(tmp_path / "none.pt"), "--x", "1"], capsys)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(trained.read_bytes()[:200])
    err = exits_2(["sample", str(damaged), "--x", "1"], capsys)
    assert f"checkpoint {str(damaged)!r} cannot be used" in err, err


def test_exit_status_2_and_version_through_the_module_entry_point(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.path.dirname(os.path.dirname(physmdn.__file__)),
                                                                   os.environ.get("PYTHONPATH")) if p)}
    bad = subprocess.run([sys.executable, "-m", "physmdn", "fit", str(tmp_path / "none.csv"), "--x", "a", "--y", "b"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr, bad.stderr
    version = subprocess.run([sys.executable, "-m", "physmdn", "--version"], capture_output=True, text=True, env=env,
                             timeout=120)
    assert version.returncode == 0 and version.stdout.strip() == f"physmdn {physmdn.__version__}"

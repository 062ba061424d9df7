"""fit(): history, checkpoints and exact resumption, early stopping, schedules, physics, regimes, errors."""

import csv
import json
import math

import pytest
import torch

from physmdn import physics as phys
from physmdn import reference
from physmdn.models import CFM, MDN
from physmdn.training import LinearWarmup, fit, load, load_checkpoint, mixture_loss


pytestmark = pytest.mark.usefixtures("one_thread")


def bimodal_toy(n: int, seed: int, noise: float = 0.05, labels: bool = False, p_upper: float = 0.5):
    """Context ``x ~ U[0.1, 1]``, ``y = +-sqrt(x) + noise`` (upper branch with probability ``p_upper``); with labels,
    the branch (0: upper, 1: lower)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 + 0.9 * torch.rand(n, 1, generator=g)
    upper = torch.rand(n, 1, generator=g) < p_upper
    y = torch.where(upper, 1.0, -1.0) * x.sqrt() + noise * torch.randn(n, 1, generator=g)
    if labels:
        return x, y, torch.where(upper.squeeze(-1), 0, 1)
    return x, y


def small_mdn(seed=0, **kwargs):
    torch.manual_seed(seed)
    return MDN(1, 1, 2, hidden=(16, 16), **kwargs)


QUIET = dict(progress=False)


# ----- history, files, progress --------------------------------------------------------------------

def test_history_files_and_result(tmp_path):
    model = small_mdn()
    result = fit(model, bimodal_toy(200, 0), bimodal_toy(100, 1), epochs=3, batch_size=50, lr=1e-2,
                 history_path=str(tmp_path / "h.csv"), **QUIET)
    assert [row["epoch"] for row in result.history] == [0, 1, 2]
    assert result.global_step == 12 and result.epochs_completed == 3 and result.stopped == "completed"
    for key in ("train_loss", "train_data", "val_loss", "val_data", "lr", "grad_norm", "physics_weight"):
        assert all(math.isfinite(row[key]) for row in result.history), key
    assert result.history[-1]["train_data"] < result.history[0]["train_data"]
    assert result.best_metric == min(row["val_data"] for row in result.history)
    with open(tmp_path / "h.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and float(rows[2]["val_data"]) == pytest.approx(result.history[2]["val_data"])
    result.save_history(str(tmp_path / "h.json"))
    assert json.loads((tmp_path / "h.json").read_text())[1]["step"] == 8


def test_progress_bar_on_and_off(capsys):
    fit(small_mdn(), bimodal_toy(100, 0), epochs=2, batch_size=50, progress=True)
    assert "fit MDN" in capsys.readouterr().err
    fit(small_mdn(), bimodal_toy(100, 0), epochs=2, batch_size=50, progress=False)
    assert capsys.readouterr().err == ""


def test_seed_makes_runs_reproducible():
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(0)
        model = CFM(1, 1, hidden=(8,))
        fit(model, bimodal_toy(100, 0), epochs=2, batch_size=25, seed=seed, **QUIET)
        runs.append(torch.cat([p.flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


# ----- checkpoints ---------------------------------------------------------------------------------

def make_model(kind: str, seed: int):
    torch.manual_seed(seed)
    if kind == "mdn":
        return MDN(1, 1, 2, hidden=(16, 16), dropout=0.1)  # dropout: the global RNG matters
    return CFM(1, 1, hidden=(16, 16), coupling="ot")  # noise, times and OT draws: the fit generator matters


@pytest.mark.parametrize("kind", ["mdn", "cfm"])
def test_resume_reproduces_the_uninterrupted_run(kind, tmp_path):
    train, val = bimodal_toy(300, 0), bimodal_toy(100, 1)
    kw = dict(epochs=4, batch_size=64, lr=1e-2, seed=3, restore_best=False, **QUIET)  # 5 steps per epoch
    straight = make_model(kind, 0)
    r_straight = fit(straight, train, val, max_steps=13, checkpoint_dir=str(tmp_path / "a"), **kw)
    part = make_model(kind, 0)
    r_part = fit(part, train, val, max_steps=8, checkpoint_dir=str(tmp_path / "b"), **kw)  # stops mid-epoch 1
    assert r_part.stopped == "max_steps" and r_part.global_step == 8
    ckpt = load_checkpoint(str(tmp_path / "b" / "last.pt"))
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (1, 3, 8)
    resumed = make_model(kind, 123)  # different initial weights: everything must come from the checkpoint
    r_resumed = fit(resumed, train, val, max_steps=13, checkpoint_dir=str(tmp_path / "b"), resume=True, **kw)
    assert r_resumed.global_step == 13
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    assert strip(r_resumed.history) == strip(r_straight.history)
    # a resumed run that is *not* restored (fresh start) differs: the comparison above can fail
    fresh = make_model(kind, 123)
    fit(fresh, train, val, max_steps=5, **kw)
    assert not torch.equal(next(fresh.parameters()), next(straight.parameters()))


def test_load_rebuilds_last_and_best_models(tmp_path):
    model = small_mdn()
    result = fit(model, bimodal_toy(200, 0), bimodal_toy(100, 1), epochs=3, batch_size=50, lr=1e-2,
                 checkpoint_dir=str(tmp_path), restore_best=False, **QUIET)
    last = load(str(tmp_path / "last.pt"))
    assert isinstance(last, MDN) and last.config == model.config and not last.training
    x = torch.rand(10, 1)
    model.eval()
    torch.testing.assert_close(last(x).means, model(x).means, rtol=0, atol=0)
    best = load(str(tmp_path / "best.pt"))
    for key, value in result.best_state.items():
        assert torch.equal(best.state_dict()[key], value), key
    assert load_checkpoint(str(tmp_path / "best.pt"))["epoch"] == result.best_epoch
    with pytest.raises(FileNotFoundError, match="checkpoint path must be an existing file"):
        load(str(tmp_path / "missing.pt"))


def test_resume_rejects_a_different_model(tmp_path):
    fit(small_mdn(), bimodal_toy(100, 0), epochs=1, batch_size=50, checkpoint_dir=str(tmp_path), **QUIET)
    other = MDN(1, 1, 3, hidden=(16, 16))
    with pytest.raises(ValueError, match="resume checkpoint must match the model"):
        fit(other, bimodal_toy(100, 0), epochs=2, batch_size=50, checkpoint_dir=str(tmp_path), resume=True, **QUIET)


# ----- optimization controls -----------------------------------------------------------------------

def test_early_stopping_and_restore_best():
    model = small_mdn()
    result = fit(model, bimodal_toy(100, 0), bimodal_toy(50, 1), epochs=20, batch_size=50, patience=2,
                 min_delta=1e9, **QUIET)  # nothing counts as an improvement after epoch 0
    assert result.stopped == "early_stopping" and result.stopped_early
    assert result.epochs_completed == 3 and result.best_epoch == 0
    for key, value in result.best_state.items():  # the model holds the epoch-0 weights again
        assert torch.equal(model.state_dict()[key], value), key


def test_cosine_and_constant_schedules():
    cosine = fit(small_mdn(), bimodal_toy(100, 0), epochs=4, batch_size=50, lr=0.1, min_lr_factor=0.1, **QUIET)
    lrs = [row["lr"] for row in cosine.history]
    expected = [0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * s / 8)) for s in (2, 4, 6, 8)]
    assert lrs == pytest.approx(expected)
    constant = fit(small_mdn(), bimodal_toy(100, 0), epochs=2, batch_size=50, lr=0.1, schedule="none", **QUIET)
    assert [row["lr"] for row in constant.history] == [0.1, 0.1]


def test_gradient_clipping_bounds_the_step():
    model = small_mdn()
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    result = fit(model, bimodal_toy(100, 0), epochs=1, batch_size=100, lr=0.5, optimizer="sgd", grad_clip=1e-3,
                 max_steps=1, schedule="none", normalize=False, **QUIET)
    step = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    assert step.norm() == pytest.approx(0.5 * 1e-3, rel=1e-4)  # lr * clipped norm; the raw norm is far larger
    assert result.global_step == 1


def test_bf16_autocast_trains():
    model = small_mdn()
    result = fit(model, bimodal_toy(400, 0), bimodal_toy(100, 1), epochs=6, batch_size=100, lr=1e-2, bf16=True,
                 **QUIET)
    assert all(math.isfinite(row["val_data"]) for row in result.history)
    assert result.history[-1]["val_data"] < result.history[0]["val_data"]
    assert model(torch.rand(3, 1)).means.dtype == torch.float32


def test_compile_option_matches_eager():
    kw = dict(epochs=1, batch_size=50, lr=1e-2, **QUIET)
    eager, compiled = small_mdn(), small_mdn()
    fit(eager, bimodal_toy(100, 0), **kw)
    fit(compiled, bimodal_toy(100, 0), compile=True, **kw)
    assert compiled._compiled_call_impl is not None  # nn.Module.compile() took effect
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ----- physics -------------------------------------------------------------------------------------

def test_mixture_loss_switches_to_physics_mdn_loss():
    g = torch.Generator().manual_seed(0)
    B, K, D = 6, 2, 1
    logits, means, log_scales = torch.randn(B, K, generator=g), torch.randn(B, K, D, generator=g), \
        0.3 * torch.randn(B, K, D, generator=g)
    target = torch.randn(B, D, generator=g)
    nll = reference.mixture_nll(logits, means, log_scales, target).mean()
    torch.testing.assert_close(mixture_loss(logits, means, log_scales, target), nll)
    spec = phys.Polynomial(torch.tensor([0.5, 0.0, -1.0]), mode="mean")  # r = 0.5 - y^2
    penalty = (torch.softmax(logits, -1) * (0.5 - means.squeeze(-1) ** 2) ** 2).sum(-1).mean()
    torch.testing.assert_close(mixture_loss(logits, means, log_scales, target, spec, 2.0), nll + 2.0 * penalty)
    torch.testing.assert_close(mixture_loss(logits, means, log_scales, target, spec, 0.0), nll)


def test_physics_factory_per_batch_with_warmup():
    seen = []

    def physics(x):  # pitchfork-like law y^2 = x bound to the batch: coeffs [B, 1, 1, 3]
        seen.append(x.shape[0])
        coeffs = torch.stack([x[:, 0], torch.zeros_like(x[:, 0]), -torch.ones_like(x[:, 0])], -1)
        return [(phys.Polynomial(coeffs[:, None, None, :], mode="exact"), 1.0)]

    result = fit(small_mdn(), bimodal_toy(200, 0), bimodal_toy(50, 1), epochs=4, batch_size=50, lr=1e-2,
                 physics=physics, physics_weight=LinearWarmup(2.0, epochs=2), **QUIET)
    assert [row["physics_weight"] for row in result.history] == [0.0, 1.0, 2.0, 2.0]
    assert seen and set(seen) <= {50}  # called with each batch (not in epoch 0, where the weight is 0)
    first, *rest = result.history
    assert first["train_physics"] == 0.0
    for row in rest:
        assert row["train_physics"] > 0.0
        assert row["train_loss"] == pytest.approx(row["train_data"] + row["physics_weight"] * row["train_physics"],
                                                  rel=1e-5, abs=1e-6)
        assert row["val_loss"] == pytest.approx(row["val_data"] + row["physics_weight"] * row["val_physics"],
                                                rel=1e-5, abs=1e-6)


def test_static_physics_moves_the_means():
    """A strong static law r = y (means pulled to 0) must change what is learned."""
    data = bimodal_toy(300, 0)
    kw = dict(epochs=8, batch_size=100, lr=1e-2, **QUIET)
    free, pulled = small_mdn(), small_mdn()
    fit(free, data, **kw)
    fit(pulled, data, physics=phys.Polynomial([0.0, 1.0], mode="mean"), physics_weight=20.0, **kw)
    x = torch.rand(50, 1) * 0.9 + 0.1
    with torch.no_grad():
        spread_free = (free(x).means.abs() * free(x).weights.unsqueeze(-1)).sum(1).mean()
        spread_pulled = (pulled(x).means.abs() * pulled(x).weights.unsqueeze(-1)).sum(1).mean()
    assert spread_pulled < 0.5 * spread_free


def test_physics_factory_runs_before_the_forward_pass():
    """Monotonic needs x.requires_grad before the model runs; the factory gets the batch first."""
    def physics(x):
        return phys.Monotonic(x.requires_grad_(True), dim=0, output=0, increasing=True)

    result = fit(small_mdn(), bimodal_toy(100, 0), bimodal_toy(50, 1), epochs=2, batch_size=50, physics=physics,
                 **QUIET)
    assert all(math.isfinite(row["val_physics"]) for row in result.history)


def test_cfm_residual_physics_in_fit():
    torch.manual_seed(0)
    model = CFM(1, 1, hidden=(16, 16))
    result = fit(model, bimodal_toy(200, 0), bimodal_toy(50, 1), epochs=3, batch_size=50,
                 physics=lambda y, x: y.square() - x, physics_weight=0.5, time_weighting="linear", **QUIET)
    for row in result.history:
        assert row["train_physics"] > 0
        assert row["train_loss"] == pytest.approx(row["train_data"] + 0.5 * row["train_physics"], rel=1e-5)


# ----- regimes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("p_upper", [0.5, 0.8])
def test_regime_labels_align_components(p_upper):
    """Labels put the upper branch on component 0, against the initialization (component 0 starts below)."""
    x, y, labels = bimodal_toy(1000, 0, labels=True, p_upper=p_upper)
    labels[::2] = -1  # half unknown
    model = small_mdn()
    with torch.no_grad():
        assert model.means_head.bias[0] < model.means_head.bias[1]
    fit(model, (x, y, labels), epochs=12, batch_size=100, lr=1e-2, regime_mode="responsibilities", **QUIET)
    with torch.no_grad():
        gm = model(torch.tensor([[0.3], [0.6], [0.9]]))
    means = gm.means.squeeze(-1)
    assert (means[:, 0] > 0.3).all() and (means[:, 1] < -0.3).all(), means
    assert (gm.weights[:, 0] - p_upper).abs().max() < 0.1


def test_without_labels_the_components_follow_the_initialization():
    """The control for the test above: unlabelled training keeps component 0 on the lower branch."""
    model = small_mdn()
    fit(model, bimodal_toy(1000, 0), epochs=12, batch_size=100, lr=1e-2, **QUIET)
    with torch.no_grad():
        means = model(torch.tensor([[0.3], [0.6], [0.9]])).means.squeeze(-1)
    assert (means[:, 0] < -0.3).all() and (means[:, 1] > 0.3).all(), means


def test_regime_logits_supervise_the_gate():
    """Outcomes carry no regime information (one Gaussian for all x), the regime is x < 0.5: the likelihood is
    indifferent to the gate, the cross-entropy of the logits teaches it P(regime | x)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1000, 1, generator=g)
    y = 0.1 * torch.randn(1000, 1, generator=g)
    labels = (x.squeeze(-1) >= 0.5).long()
    labels[::3] = -1
    model = small_mdn()
    fit(model, (x, y, labels), epochs=10, batch_size=100, lr=1e-2, regime_mode="logits", **QUIET)
    with torch.no_grad():
        weights = model(torch.tensor([[0.1], [0.9]])).weights
    assert weights[0, 0] > 0.85 and weights[1, 1] > 0.85, weights


# ----- errors --------------------------------------------------------------------------------------

def test_bad_data_and_arguments_give_clear_errors():
    model = small_mdn()
    x, y = bimodal_toy(20, 0)
    y_nan = y.clone()
    y_nan[7] = math.nan
    with pytest.raises(ValueError, match=r"train y must be finite, got NaN/inf in 1 of 20 rows \(first at row 7\)"):
        fit(model, (x, y_nan), epochs=1, **QUIET)
    with pytest.raises(ValueError, match=r"val x must be a floating-point \[N, in_features\] = \[N, 1\] tensor, "
                                         r"got torch.float32 shape \(20, 2\)"):
        fit(model, (x, y), (torch.zeros(20, 2), y), epochs=1, **QUIET)
    with pytest.raises(ValueError, match=r"train y must have as many rows as x \(20\), got 19"):
        fit(model, (x, y[:19]), epochs=1, **QUIET)
    with pytest.raises(ValueError, match=r"train labels must be in \[-1, 1\] .*got values in \[-1, 2\]"):
        fit(model, (x, y, torch.tensor([-1, 2] * 10)), epochs=1, **QUIET)
    with pytest.raises(ValueError, match="train labels \\(regimes\\) need a mixture model \\(MDN\\), got CFM"):
        fit(CFM(1, 1, hidden=(4,)), (x, y, torch.zeros(20, dtype=torch.long)), epochs=1, **QUIET)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        fit(model, (x, y), epochs=1, batch_size=0, **QUIET)
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got -1"):
        fit(model, (x, y), epochs=1, lr=-1, **QUIET)
    with pytest.raises(ValueError, match="history_path must end in .csv or .json, got 'h.txt'"):
        fit(model, (x, y), epochs=1, history_path="h.txt", **QUIET)
    with pytest.raises(ValueError, match=r"monitor must name a train_\* history key without validation data \(val is None and "
                                         r"val_split holds out nothing\), got 'val_data'"):
        fit(model, (x, y), epochs=1, monitor="val_data", **QUIET)
    with pytest.raises(TypeError, match="train must be \\(x, y\\), \\(x, y, labels\\), a TensorDataset, a DataLoader or an "
                                        "iterable of \\(x, y\\[, labels\\]\\) batches, got dict"):
        fit(model, {"x": x}, epochs=1, **QUIET)


def test_nonfinite_loss_stops_with_a_clear_error():
    model = small_mdn()
    with torch.no_grad():
        model.means_head.bias.fill_(math.nan)
    # (nan or inf: the fused op currently gives inf when every component of a sample is NaN; the reference nan)
    with pytest.raises(FloatingPointError, match=r"training loss must stay finite, got (nan|inf) in epoch 0"):
        fit(model, bimodal_toy(50, 0), epochs=2, batch_size=50, **QUIET)


def test_tensor_dataset_input():
    x, y, labels = bimodal_toy(100, 0, labels=True)
    result = fit(small_mdn(), torch.utils.data.TensorDataset(x, y, labels), epochs=1, batch_size=50, **QUIET)
    assert result.history[0]["train_regime"] > 0



def test_fit_result_repr_is_concise_and_a_missing_device_is_a_clear_error():
    import physmdn

    model = physmdn.MDN(1, 1, 2)
    data = (torch.rand(16, 1), torch.rand(16, 1))
    result = physmdn.fit(model, data, epochs=2, batch_size=8, progress=False)
    text = repr(result)
    assert len(text) < 300 and "epochs_completed=2" in text and "best=epoch" in text, text
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda:0' was asked for, but this process sees no CUDA device"):
            physmdn.fit(model, data, epochs=1, device="cuda:0", progress=False)
    with pytest.raises(ValueError, match="device must be a torch device"):
        physmdn.fit(model, data, epochs=1, device="gpu7", progress=False)


def test_tune_physics_weight_picks_the_lowest_validation_nll(one_thread):
    import physmdn
    from physmdn import problems

    problem = problems.get("pitchfork")
    train, val = problem.sample(64, seed=1), problem.sample(64, seed=2)
    model = physmdn.MDN(1, 1, components=3, hidden=(16, 16))
    before = [p.detach().clone() for p in model.parameters()]
    result = physmdn.tune_physics_weight(model, (train.x, train.y), (val.x, val.y), problem.physics,
                                         weights=(1.0, 0.0, 10.0), epochs=6, warm_epochs=3, batch_size=32, lr=3e-3)
    assert sorted(result.scores) == [0.0, 1.0, 10.0]
    assert result.weight == min(result.scores, key=lambda w: (result.scores[w], w))
    with torch.no_grad():  # the returned model is the chosen point's best-validation model
        nll = float(result.model(val.x).nll(val.y).mean())
    assert nll == pytest.approx(result.scores[result.weight], rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the given model is untouched
    assert "TuneResult(weight=" in repr(result)
    with pytest.raises(ValueError, match="val must be given"):
        physmdn.tune_physics_weight(model, (train.x, train.y), None, problem.physics)
    with pytest.raises(ValueError, match="score must be 'nll' or 'energy'"):
        physmdn.tune_physics_weight(model, (train.x, train.y), (val.x, val.y), problem.physics, score="mse")
    with pytest.raises(ValueError, match="weights must be a non-empty list of finite numbers >= 0"):
        physmdn.tune_physics_weight(model, (train.x, train.y), (val.x, val.y), problem.physics, weights=(-1.0,))


def test_tune_physics_weight_by_energy_score(one_thread):
    """score="energy": each point's score is the energy score of its restored model's draws on the validation
    pairs, recomputable from the returned model with the same seed."""
    import physmdn
    from physmdn import problems
    from physmdn.metrics import energy_score

    problem = problems.get("pitchfork")
    train, val = problem.sample(64, seed=1), problem.sample(48, seed=2)
    model = physmdn.MDN(1, 1, components=3, hidden=(16, 16))
    result = physmdn.tune_physics_weight(model, (train.x, train.y), (val.x, val.y), problem.physics,
                                         weights=(0.0, 1.0), epochs=6, batch_size=32, lr=3e-3, score="energy",
                                         samples=32)
    assert result.weight == min(result.scores, key=lambda w: (result.scores[w], w))
    torch.manual_seed(0)
    with torch.no_grad():
        again = float(energy_score(result.model(val.x).sample((32,)), val.y))
    assert again == pytest.approx(result.scores[result.weight], rel=1e-6)
    with pytest.raises(ValueError, match="needs val as an"):
        physmdn.tune_physics_weight(model, (train.x, train.y), [(val.x, val.y)], problem.physics, score="energy")

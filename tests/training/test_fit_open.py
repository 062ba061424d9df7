"""The open fit(): DataLoaders and iterables, the validation split and early stopping by default, callbacks,
loggers, scheduler factories, gradient accumulation, checkpoints of any module and load() into a given module."""

import csv
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import physmdn
import physmdn.problems
from physmdn.models import CFM, MDN
from physmdn.training import (Callback, CheckpointError, CSVLogger, FitState, TensorBoardLogger, fit, load,
                              load_checkpoint)
from physmdn.training.data import AUTO_VAL_FRACTION, AUTO_VAL_MIN_SAMPLES, split_validation

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = dict(progress=False)


def toy(n: int, seed: int):
    """``x ~ U[0.1, 1]``, ``y = +-sqrt(x) + 0.05 noise``."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 + 0.9 * torch.rand(n, 1, generator=g)
    y = torch.where(torch.rand(n, 1, generator=g) < 0.5, 1.0, -1.0) * x.sqrt() + 0.05 * torch.randn(n, 1, generator=g)
    return x, y


def small_mdn(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return MDN(1, 1, 2, hidden=(8, 8)).to(dtype)


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def batches_of(x, y, size, numpy=False):
    out = [(x[i:i + size], y[i:i + size]) for i in range(0, x.shape[0], size)]
    return [(a.numpy(), b.numpy()) for a, b in out] if numpy else out


class Recorder(Callback):
    """Records every hook; asks to stop after epoch ``stop_after``."""

    def __init__(self, stop_after=None):
        self.stop_after, self.starts, self.epochs, self.checkpoints, self.ends = stop_after, [], [], [], []
        self.weights = []

    def on_fit_start(self, state):
        self.starts.append(state)

    def on_epoch_end(self, epoch, metrics):
        self.epochs.append((epoch, metrics))
        self.weights.append({k: v.clone() for k, v in self.starts[0].model.state_dict().items()})
        return self.stop_after is not None and epoch >= self.stop_after

    def on_checkpoint(self, path):
        self.checkpoints.append(path)

    def on_fit_end(self, result):
        self.ends.append(result)


# ----- DataLoaders and iterables -------------------------------------------------------------------

def test_fit_from_a_dataloader_with_a_callback_that_stops_early(tmp_path):
    x, y = toy(160, 0)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    recorder = Recorder(stop_after=2)
    result = fit(small_mdn(), loader, toy(64, 1), epochs=20, lr=1e-2, callbacks=[recorder],
                 checkpoint_dir=str(tmp_path), **QUIET)
    assert result.stopped == "callback" and result.epochs_completed == 3 and result.global_step == 15
    (state,) = recorder.starts
    assert isinstance(state, FitState) and state.model is result.model and state.steps_per_epoch == 5
    assert state.validating and state.monitor == "val_data" and state.epochs == 20 and state.start_epoch == 0
    assert [e for e, _ in recorder.epochs] == [0, 1, 2]
    assert [m for _, m in recorder.epochs] == result.history  # each epoch's row, as the history keeps it
    assert all(math.isfinite(m["val_data"]) for _, m in recorder.epochs)
    assert recorder.checkpoints.count(str(tmp_path / "last.pt")) == 3  # one per epoch
    assert str(tmp_path / "best.pt") in recorder.checkpoints
    assert recorder.ends == [result]
    # the callback stopped before the patience (auto: max(10, 20 // 5) = 10) could have
    assert result.extra["patience"] == 10


def test_a_dataloader_gives_the_run_of_the_same_batches_in_memory():
    """An in-memory run without shuffling and a DataLoader / a list of NumPy batches in the same order take the
    same steps: identical weights."""
    x, y = toy(100, 0)
    kw = dict(epochs=2, lr=1e-2, seed=3, **QUIET)
    memory = small_mdn()
    fit(memory, (x, y), batch_size=25, shuffle=False, **kw)
    loader = small_mdn()
    fit(loader, DataLoader(TensorDataset(x, y), batch_size=25), **kw)
    arrays = small_mdn()
    fit(arrays, batches_of(x, y, 25, numpy=True), **kw)
    assert torch.equal(flat(memory), flat(loader)) and torch.equal(flat(memory), flat(arrays))
    torch.testing.assert_close(loader.x_loc, x.double().mean(0).float(), rtol=0, atol=0)  # statistics of the whole pass


def test_numpy_arrays_in_memory_train_like_tensors():
    x, y = toy(100, 0)
    a, b = small_mdn(), small_mdn()
    fit(a, (x, y), epochs=2, batch_size=50, **QUIET)
    fit(b, (x.numpy(), y.numpy()), epochs=2, batch_size=50, **QUIET)
    assert torch.equal(flat(a), flat(b))


def test_a_generator_trains_one_epoch_and_refuses_more():
    x, y = toy(96, 0)
    model = small_mdn()
    result = fit(model, (b for b in batches_of(x, y, 16)), epochs=1, scheduler="none", **QUIET)
    assert result.global_step == 6  # the batches read for the normalization are trained on too
    torch.testing.assert_close(model.x_loc, x.double().mean(0).float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="epochs must be 1 when train is a one-shot iterator"):
        fit(small_mdn(), (b for b in batches_of(x, y, 16)), epochs=2, **QUIET)
    with pytest.raises(ValueError, match="scheduler 'cosine' needs the number of steps: train has no len"):
        fit(small_mdn(), (b for b in batches_of(x, y, 16)), epochs=1, **QUIET)
    with pytest.raises(ValueError, match="val must be re-iterable"):
        fit(small_mdn(), (x, y), (b for b in batches_of(x, y, 16)), epochs=1, **QUIET)


def test_iterable_errors_name_the_batch_and_the_argument():
    x, y = toy(64, 0)
    bad = batches_of(x, y, 16)
    bad[2] = (x[:16], torch.full((16, 1), math.nan))
    with pytest.raises(ValueError, match=r"train batch 2 y must be finite, got NaN/inf in 16 of 16 rows"):
        fit(small_mdn(), bad, epochs=1, **QUIET)
    with pytest.raises(TypeError, match="train batches must be \\(x, y\\) or \\(x, y, labels\\) tuples .*got dict "
                                        "at batch 0"):
        fit(small_mdn(), [{"x": x, "y": y}], epochs=1, **QUIET)
    with pytest.raises(TypeError, match="train must hold 2 or 3 tensors or arrays \\(x, y\\[, labels\\]\\), got "
                                        "\\['Tensor', 'Tensor', 'Tensor', 'Tensor'\\]"):
        fit(small_mdn(), [x, y, x, y], epochs=1, **QUIET)
    with pytest.raises(ValueError, match="batch_size must be None with a DataLoader or iterable train"):
        fit(small_mdn(), batches_of(x, y, 16), epochs=1, batch_size=16, **QUIET)
    with pytest.raises(ValueError, match="val_split needs in-memory train data"):
        fit(small_mdn(), batches_of(x, y, 16), epochs=1, val_split=0.2, **QUIET)
    with pytest.raises(ValueError, match="train must give at least one batch, got an empty list"):
        fit(small_mdn(), [], epochs=1, **QUIET)


def test_resume_from_a_dataloader_reproduces_the_run(tmp_path):
    x, y = toy(120, 0)
    loader = DataLoader(TensorDataset(x, y), batch_size=24)  # 5 steps per epoch, fixed order
    kw = dict(epochs=3, lr=1e-2, seed=2, **QUIET)
    straight = small_mdn()
    r_straight = fit(straight, loader, **kw)
    fit(small_mdn(), loader, max_steps=7, checkpoint_dir=str(tmp_path), log_dir=str(tmp_path), **kw)
    resumed = small_mdn(seed=9)
    r_resumed = fit(resumed, loader, checkpoint_dir=str(tmp_path), resume=True, log_dir=str(tmp_path), **kw)
    assert r_resumed.global_step == 15 and torch.equal(flat(resumed), flat(straight))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    assert strip(r_resumed.history) == strip(r_straight.history)
    with open(tmp_path / "metrics.csv") as fh:  # the logger holds each epoch once, across the two runs
        assert [int(row["epoch"]) for row in csv.DictReader(fh)] == [0, 1, 2]


# ----- validation split, early stopping and restore_best by default ---------------------------------

def test_auto_split_holds_out_a_tenth_and_validates_on_exactly_those_rows():
    x, y = toy(300, 0)
    model = small_mdn()
    result = fit(model, (x, y), epochs=4, batch_size=64, lr=1e-2, seed=5, **QUIET)
    n_val = math.floor(AUTO_VAL_FRACTION * 300)
    assert result.extra["val_size"] == n_val == 30 and result.monitor == "val_data"
    assert result.extra["patience"] == 10 and result.extra["restored_best"]
    (x_tr, y_tr, _), (x_val, y_val, _) = split_validation((x, y, None), "auto", seed=5)
    assert x_tr.shape[0] == 270 and not set(x_val.flatten().tolist()) & set(x_tr.flatten().tolist())
    torch.testing.assert_close(model.x_loc, x_tr.double().mean(0).float(), rtol=0, atol=0)  # normalized on the training part only
    model.eval()
    with torch.no_grad():  # the restored model is the best epoch's, scored on the held-out rows
        nll = float(model(x_val).nll(y_val).mean())
    assert nll == pytest.approx(result.best_metric, rel=1e-5)
    assert result.best_metric == min(row["val_data"] for row in result.history)


def test_val_split_values():
    x, y = toy(199, 0)
    small = fit(small_mdn(), (x, y), epochs=1, batch_size=100, **QUIET)  # 10 % would be under 20 samples
    assert 199 * AUTO_VAL_FRACTION < AUTO_VAL_MIN_SAMPLES
    assert small.extra["val_size"] == 0 and "val_data" not in small.history[0] and small.monitor == "train_data"
    assert small.extra["patience"] is None
    kw = dict(epochs=1, batch_size=100, **QUIET)
    assert fit(small_mdn(), (x, y), val_split=0.25, **kw).extra["val_size"] == 50
    assert fit(small_mdn(), (x, y), val_split=7, **kw).extra["val_size"] == 7
    big = toy(400, 0)
    assert fit(small_mdn(), big, val_split=0, **kw).extra["val_size"] == 0
    assert fit(small_mdn(), big, val_split=None, **kw).extra["val_size"] == 0
    assert fit(small_mdn(), big, toy(50, 1), **kw).extra["val_size"] == 0  # val given: nothing held out
    for bad in (1.5, -1, "half", True):
        with pytest.raises(ValueError, match="val_split must be 'auto', a fraction in \\(0, 1\\)"):
            fit(small_mdn(), (x, y), val_split=bad, **kw)
    with pytest.raises(ValueError, match="val_split must leave at least 1 training sample, got 199 of N = 199"):
        fit(small_mdn(), (x, y), val_split=199, **kw)
    with pytest.raises(ValueError, match="val_split must be 'auto', 0 or None when val is given"):
        fit(small_mdn(), (x, y), toy(20, 1), val_split=0.1, **kw)
    # the split follows the seed, and is the same on every call with it
    a, _ = split_validation((x, None, None), 0.5, seed=1)
    b, _ = split_validation((x, None, None), 0.5, seed=1)
    c, _ = split_validation((x, None, None), 0.5, seed=2)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


def test_early_stopping_by_default_with_a_split():
    """The default patience stops a run whose validation NLL no longer improves (min_delta makes that certain)."""
    result = fit(small_mdn(), toy(300, 0), epochs=50, batch_size=100, min_delta=1e9, **QUIET)
    assert result.stopped == "early_stopping" and result.extra["patience"] == 10
    assert result.epochs_completed == 11 and result.best_epoch == 0
    off = fit(small_mdn(), toy(300, 0), epochs=12, batch_size=100, min_delta=1e9, patience=None, **QUIET)
    assert off.stopped == "completed" and off.epochs_completed == 12


def test_restore_best_needs_validation_data_and_keeps_the_last_weights_without():
    """Without validation data the model ends with its last weights, never the best by training loss."""
    for val_split, restored in ((0, False), ("auto", True)):
        model = small_mdn()
        recorder = Recorder()
        result = fit(model, toy(300, 0), epochs=4, batch_size=100, min_delta=1e9, val_split=val_split,
                     callbacks=recorder, **QUIET)
        assert result.best_epoch == 0 and result.extra["restored_best"] is restored
        target = result.best_state if restored else recorder.weights[-1]
        other = recorder.weights[-1] if restored else result.best_state
        assert all(torch.equal(model.state_dict()[k], v) for k, v in target.items())
        assert not all(torch.equal(model.state_dict()[k], v) for k, v in other.items())


# ----- callbacks and loggers -------------------------------------------------------------------------

def test_callbacks_are_duck_typed_and_checked():
    stops = []

    class OnlyEpochEnd:
        def on_epoch_end(self, epoch, metrics):
            stops.append(epoch)
            return epoch == 1

    result = fit(small_mdn(), toy(100, 0), epochs=5, batch_size=50, callbacks=OnlyEpochEnd(), **QUIET)
    assert result.stopped == "callback" and stops == [0, 1] and result.epochs_completed == 2
    with pytest.raises(TypeError, match="callbacks\\[1\\] must have at least one of the hooks on_fit_start"):
        fit(small_mdn(), toy(100, 0), epochs=1, callbacks=[OnlyEpochEnd(), object()], **QUIET)


def test_csv_logger_by_default_with_log_dir(tmp_path):
    result = fit(small_mdn(), toy(100, 0), toy(40, 1), epochs=3, batch_size=50, log_dir=str(tmp_path), **QUIET)
    with open(tmp_path / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3
    for row, expected in zip(rows, result.history):
        assert int(row["epoch"]) == expected["epoch"] and int(row["step"]) == expected["step"]
        assert float(row["val_data"]) == pytest.approx(expected["val_data"], rel=1e-12)
    logger = CSVLogger(str(tmp_path / "other"), filename="run.csv")
    fit(small_mdn(), toy(100, 0), epochs=2, batch_size=50, loggers=[logger], **QUIET)
    assert len(logger.rows) == 2 and (tmp_path / "other" / "run.csv").is_file()
    with pytest.raises(ValueError, match="loggers name 'csv' writes under log_dir: pass log_dir"):
        fit(small_mdn(), toy(100, 0), epochs=1, loggers=["csv"], **QUIET)
    with pytest.raises(ValueError, match="loggers names must be one of \\['csv', 'tensorboard'\\], got 'wandb'"):
        fit(small_mdn(), toy(100, 0), epochs=1, loggers=["wandb"], log_dir=str(tmp_path), **QUIET)


def _tensorboard_importable() -> bool:
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _tensorboard_importable(), reason="tensorboard is not installed")
def test_tensorboard_logger_writes_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = fit(small_mdn(), toy(100, 0), toy(40, 1), epochs=3, batch_size=50, log_dir=str(tmp_path),
                 loggers=["tensorboard"], **QUIET)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    scalars = events.Scalars("val_data")
    assert [s.step for s in scalars] == [row["step"] for row in result.history]
    assert [s.value for s in scalars] == pytest.approx([row["val_data"] for row in result.history], rel=1e-6)


@pytest.mark.skipif(_tensorboard_importable(), reason="tensorboard is installed")
def test_tensorboard_logger_without_tensorboard_says_what_to_install(tmp_path):
    with pytest.raises(ImportError, match="TensorBoardLogger needs the tensorboard package \\(pip install tensorboard\\)"):
        TensorBoardLogger(str(tmp_path))


# ----- optimizer, scheduler, accumulation -----------------------------------------------------------

def test_scheduler_factory_is_stepped_per_optimizer_step():
    result = fit(small_mdn(), toy(100, 0), epochs=2, batch_size=25, lr=0.1,
                 scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5), **QUIET)
    assert [row["lr"] for row in result.history] == pytest.approx([0.1 * 0.5**2, 0.1 * 0.5**4])  # 4 steps/epoch
    alias = fit(small_mdn(), toy(100, 0), epochs=1, batch_size=50, lr=0.1, schedule="none", **QUIET)
    assert alias.history[0]["lr"] == 0.1
    with pytest.raises(ValueError, match="schedule is an alias of scheduler: pass one of them"):
        fit(small_mdn(), toy(100, 0), epochs=1, scheduler="cosine", schedule="none", **QUIET)
    with pytest.raises(ValueError, match="scheduler must be 'cosine', 'none' or a callable"):
        fit(small_mdn(), toy(100, 0), epochs=1, scheduler="step", **QUIET)
    with pytest.raises(TypeError, match="scheduler\\(optimizer\\) must return an LRScheduler"):
        fit(small_mdn(), toy(100, 0), epochs=1, scheduler=lambda opt: 3, **QUIET)
    with pytest.raises(TypeError, match="optimizer\\(params\\) must return a torch.optim.Optimizer, got list"):
        fit(small_mdn(), toy(100, 0), epochs=1, optimizer=lambda params: list(params), **QUIET)


@pytest.mark.parametrize("n", [32, 40])  # 40: a partial group (4 + 1 micro-batches) at the end of each epoch
def test_accumulation_matches_one_large_batch(n):
    """N micro-batches of b samples make the step of one batch of N * b (float64, no dropout); a partial group
    the step of its own micro-batches."""
    x, y = (t.double() for t in toy(n, 0))
    kw = dict(epochs=2, lr=0.05, optimizer="sgd", scheduler="none", seed=1, **QUIET)
    accumulated = small_mdn(dtype=torch.float64)
    r_acc = fit(accumulated, (x, y), batch_size=8, accumulate_steps=4, shuffle=False, **kw)
    large = small_mdn(dtype=torch.float64)
    r_large = fit(large, batches_of(x, y, 32), **kw)  # batches [32] or [32, 8]
    assert r_acc.global_step == r_large.global_step == (2 if n == 32 else 4)
    torch.testing.assert_close(flat(accumulated), flat(large), rtol=1e-12, atol=1e-12)
    # and not what 4 separate steps of 8 would give
    separate = small_mdn(dtype=torch.float64)
    fit(separate, (x, y), batch_size=8, shuffle=False, **kw)
    assert (flat(separate) - flat(large)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="accumulate_steps must be an integer >= 1, got 0"):
        fit(small_mdn(), (x, y), epochs=1, accumulate_steps=0, **QUIET)


# ----- checkpoints of any module, load into a module -------------------------------------------------

class Net(nn.Module):
    """A module fit can train (forward gives a GaussianMixture) that is not a registered model and has no config."""

    def __init__(self, width: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.body = MDN(1, 1, 2, hidden=(width,))

    def forward(self, x):
        return self.body(x)


def make_net(width: int = 8) -> Net:
    return Net(width)


def test_checkpoints_of_any_module_round_trip(tmp_path):
    x, y = toy(100, 0)
    kw = dict(epochs=2, batch_size=50, restore_best=False, **QUIET)
    net = Net(8)
    fit(net, (x, y), checkpoint_dir=str(tmp_path / "cls"), model_config={"width": 8}, **kw)
    ckpt = load_checkpoint(str(tmp_path / "cls" / "last.pt"))
    assert ckpt["model_factory"].endswith(":Net") and ckpt["model_config"] == {"width": 8}
    rebuilt = load(str(tmp_path / "cls" / "last.pt"))  # the stored class, called with the stored config
    assert type(rebuilt) is Net and not rebuilt.training
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), net.state_dict().values()))

    fit(Net(8), (x, y), checkpoint_dir=str(tmp_path / "fn"), model_factory=make_net, model_config={"width": 8}, **kw)
    path = str(tmp_path / "fn" / "last.pt")
    with pytest.raises(ValueError, match="names the factory .*:make_net', which is not an nn.Module class; load "
                                         "calls only classes named in a file: pass factory="):
        load(path)
    assert type(load(path, factory=make_net)) is Net

    bare = Net(8)
    fit(bare, (x, y), checkpoint_dir=str(tmp_path / "bare"), **kw)
    with pytest.raises(ValueError, match="holds the weights of a Net without a constructor config: pass model="):
        load(str(tmp_path / "bare" / "last.pt"))
    into = Net(8)
    assert load(str(tmp_path / "bare" / "last.pt"), model=into) is into
    assert torch.equal(flat(into), flat(bare))
    with pytest.raises(ValueError, match="model_factory must be importable by name .*a lambda"):
        fit(Net(8), (x, y), model_factory=lambda width: Net(width), **kw)
    with pytest.raises(ValueError, match="model_factory must be 'module:qualname'"):
        fit(Net(8), (x, y), model_factory="nocolon", **kw)


def test_load_reads_plain_state_dicts_and_names_mismatched_keys(tmp_path):
    source = MDN(1, 1, 2, hidden=(8,))
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    target = MDN(1, 1, 2, hidden=(8,))
    assert physmdn.load(str(tmp_path / "plain.pt"), model=target) is target and not target.training
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))
    with pytest.raises(CheckpointError, match="is not a physmdn checkpoint"):
        load(str(tmp_path / "plain.pt"))  # a plain state dict does not say what to build
    with pytest.raises(ValueError, match=r"other shapes \['trunk.0.weight: \(8, 1\) in the file, \(16, 1\) in the "
                                         r"model'"):
        load(str(tmp_path / "plain.pt"), model=MDN(1, 1, 2, hidden=(16,)))
    with pytest.raises(ValueError, match=r"must match Net's state dict, got missing keys \['body\..*unexpected keys "
                                         r"\['x_loc'"):
        load(str(tmp_path / "plain.pt"), model=Net(8))
    # a physmdn checkpoint loads into a given module too
    fit(source, toy(50, 0), epochs=1, batch_size=50, checkpoint_dir=str(tmp_path / "c"), **QUIET)
    into = MDN(1, 1, 2, hidden=(8,))
    load(str(tmp_path / "c" / "last.pt"), model=into)
    assert torch.equal(flat(into), flat(source))


def test_cfm_gets_the_default_split_and_early_stopping_too():
    torch.manual_seed(0)
    result = fit(CFM(1, 1, hidden=(8,)), toy(300, 0), epochs=2, batch_size=100, **QUIET)
    assert result.extra["val_size"] == 30 and result.monitor == "val_data" and "val_data" in result.history[0]


def test_load_says_how_to_pass_a_device():
    with pytest.raises(TypeError, match="model must be an nn.Module to load the weights into, got the str 'cpu': pass "
                                        "a device as map_location="):
        load("any.pt", "cpu")


def test_physics_weight_auto_is_the_prior_weight_of_the_training_set_size():
    from physmdn.physics_scaling import prior_weight
    problem = physmdn.problems.get("pitchfork")
    data = problem.sample(300, seed=0)
    for train, n in (((data.x, data.y), 300), ((data.x[:40].numpy(), data.y[:40].numpy()), 40),
                     (torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x, data.y), batch_size=64), 300)):
        model = physmdn.MDN(1, 1, components=2, hidden=(8,))
        result = physmdn.fit(model, train, epochs=2, physics=problem.physics, physics_weight="auto", progress=False)
        assert [row["physics_weight"] for row in result.history] == pytest.approx([prior_weight(n)] * 2)
    with pytest.raises(ValueError, match="physics_weight must be a number >= 0, a callable"):
        physmdn.fit(physmdn.MDN(1, 1, components=2), (data.x, data.y), epochs=1, physics_weight="max",
                    progress=False)
    with pytest.raises(ValueError, match="needs the number of training samples"):
        physmdn.fit(physmdn.MDN(1, 1, components=2), iter([(data.x, data.y)]), epochs=1, physics_weight="auto",
                    progress=False)

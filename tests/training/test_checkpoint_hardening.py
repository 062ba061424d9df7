"""Checkpoint files under faults: damaged files fail with the file and the cause, writes are durable and never store
non-finite weights, interrupted writes are cleaned up; the command line refuses an unwritable output directory."""

import math
import os
import struct
import subprocess
import sys
import zipfile

import pytest
import torch

import physmdn
from physmdn.training import _format as C
from physmdn import cli
from physmdn.models import MDN
from physmdn.training import CheckpointError, fit, load, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = dict(progress=False)


def toy(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = 0.1 + 0.9 * torch.rand(n, 1, generator=g)
    y = torch.where(torch.rand(n, 1, generator=g) < 0.5, 1.0, -1.0) * x.sqrt() + 0.05 * torch.randn(n, 1, generator=g)
    return x, y


def small_mdn(seed=0):
    torch.manual_seed(seed)
    return MDN(1, 1, 2, hidden=(8,))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint folder after 2 epochs of 2 steps: ``last.pt`` (step 4), ``last.prev.pt`` (step 2), ``best.pt``."""
    folder = tmp_path_factory.mktemp("ckpt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(small_mdn(), toy(100, 0), epochs=2, batch_size=50, checkpoint_dir=str(folder), restore_best=False, **QUIET)
    finally:
        torch.set_num_threads(threads)
    return folder


def copy_of(trained, tmp_path, name="last.pt"):
    path = tmp_path / name
    path.write_bytes((trained / name).read_bytes())
    return path


def tensor_members(path):
    """``(name, data offset, size)`` of every stored tensor's bytes in a torch.save zip archive."""
    raw = path.read_bytes()
    out = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if "/data/" not in info.filename or info.file_size < 4:
                continue
            assert info.compress_type == zipfile.ZIP_STORED
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
            out.append((info.filename, info.header_offset + 30 + name_len + extra_len, info.file_size))
    return out


# ----- a good round trip ----------------------------------------------------------------------------

def test_checkpoints_carry_a_checksum_and_keep_the_previous_one(trained):
    last, prev = load_checkpoint(str(trained / "last.pt")), load_checkpoint(str(trained / "last.prev.pt"))
    assert last["format"] == C.CHECKPOINT_FORMAT and last["checksum"].startswith("sha256:")
    assert last["checksum"] == C.content_checksum(last)
    assert (last["global_step"], prev["global_step"]) == (4, 2)  # the file the last write replaced
    assert load_checkpoint(str(trained / "best.pt"))["checksum"].startswith("sha256:")
    assert not [p.name for p in trained.iterdir() if ".tmp" in p.name]


def test_checksum_sees_every_entry():
    record = {"a": torch.arange(6.0).reshape(2, 3), "b": [1, 2.5, None, "x"], "c": {"d": torch.zeros(0)}}
    base = C.content_checksum(record)
    assert base == C.content_checksum(dict(reversed(list(record.items()))))  # key order does not matter
    changed = [dict(record, a=record["a"].clone().index_put_((torch.tensor(1), torch.tensor(2)), torch.tensor(-5.0))),
               dict(record, a=record["a"].reshape(3, 2)), dict(record, a=record["a"].double()),
               dict(record, b=[1, 2.5000000000000004, None, "x"]), dict(record, c={"d": torch.zeros(1)}),
               dict(record, e=0)]
    assert len({base, *(C.content_checksum(r) for r in changed)}) == len(changed) + 1


# ----- damaged files --------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0.05, 0.5, 0.95])
def test_truncated_file_names_file_and_cause(trained, tmp_path, keep):
    path = copy_of(trained, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated") as exc:
        load(str(path))
    assert str(path) in str(exc.value)


def test_empty_file(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)") as exc:
        load(str(path))
    assert str(path) in str(exc.value)


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("epoch,loss\n0,1.5\n")
    with pytest.raises(CheckpointError, match="is not a checkpoint: expected a torch.save zip archive") as exc:
        load_checkpoint(str(path))
    assert str(path) in str(exc.value) and isinstance(exc.value, ValueError)
    assert physmdn.CheckpointError is CheckpointError


def test_zip_that_is_not_a_torch_file(tmp_path):
    path = tmp_path / "other.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="cannot be read: torch.load"):
        load_checkpoint(str(path))


def test_flipped_tensor_bytes_are_detected(trained, tmp_path):
    path = copy_of(trained, tmp_path)
    data = bytearray(path.read_bytes())
    members = tensor_members(path)
    assert len(members) >= 4
    for _, start, size in members:  # 4 bytes in the middle of every stored tensor
        mid = start + size // 2 - 2
        data[mid: mid + 4] = bytes(b ^ 0xFF for b in data[mid: mid + 4])
    path.write_bytes(bytes(data))
    torch.load(path, weights_only=True)  # torch itself reads it without complaint: the checksum must catch it
    with pytest.raises(CheckpointError, match="is corrupted: its content checksum is sha256:") as exc:
        load(str(path))
    assert str(path) in str(exc.value)


def test_one_flipped_tensor_byte_is_detected(trained, tmp_path):
    path = copy_of(trained, tmp_path, "best.pt")
    data = bytearray(path.read_bytes())
    _, start, size = tensor_members(path)[-1]
    data[start + size - 1] ^= 0x01  # the lowest bit of one stored byte
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load(str(path))


def test_flipped_bytes_in_the_pickle_are_detected(trained, tmp_path):
    path = copy_of(trained, tmp_path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start: start + 4] = b"\xff\xff\xff\xff"  # the pickle's opening opcodes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupted: archive member '.*data\.pkl' fails its CRC check") as exc:
        load(str(path))
    assert str(path) in str(exc.value)


def test_format_versions(trained, tmp_path):
    good = load_checkpoint(str(trained / "last.pt"))
    newer = tmp_path / "newer.pt"
    torch.save(dict(good, format="physmdn.checkpoint/99"), newer)
    with pytest.raises(CheckpointError, match="unknown format version: expected one of .* got 'physmdn.checkpoint/99'"):
        load(str(newer))
    foreign = tmp_path / "foreign.pt"
    torch.save({"format": "someone.else/1"}, foreign)
    with pytest.raises(CheckpointError, match="foreign format"):
        load(str(foreign))
    bare = tmp_path / "bare.pt"
    torch.save({"weight": torch.ones(2)}, bare)
    with pytest.raises(CheckpointError, match="not a physmdn checkpoint: .* got a dict without a format entry"):
        load(str(bare))
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), tensor)
    with pytest.raises(CheckpointError, match="got a Tensor"):
        load(str(tensor))
    # version 1 (no checksum) is still read
    legacy = tmp_path / "legacy.pt"
    torch.save({k: v for k, v in dict(good, format="physmdn.checkpoint/1").items() if k != "checksum"}, legacy)
    model = load(str(legacy))
    for key, value in good["model_state"].items():
        assert torch.equal(model.state_dict()[key], value), key
    # a version-2 file whose checksum entry is gone is corrupted, not legacy
    stripped = tmp_path / "stripped.pt"
    torch.save({k: v for k, v in good.items() if k != "checksum"}, stripped)
    with pytest.raises(CheckpointError, match="corrupted: .* stored one None"):
        load(str(stripped))


_UNPICKLED = []


def _record_unpickling(tag):
    _UNPICKLED.append(tag)
    return tag


class _Gadget:
    def __reduce__(self):
        return (_record_unpickling, ("ran",))


def test_arbitrary_objects_are_never_unpickled(trained, tmp_path):
    good = load_checkpoint(str(trained / "last.pt"))
    path = tmp_path / "gadget.pt"
    torch.save(dict(good, extra=_Gadget()), path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load(str(path))
    assert _UNPICKLED == []


def test_resume_from_a_damaged_last_points_at_the_previous(trained, tmp_path):
    copy_of(trained, tmp_path, "last.prev.pt")
    path = copy_of(trained, tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"truncated.*pass resume='.*last\.prev\.pt' to continue"):
        fit(small_mdn(), toy(100, 0), epochs=3, batch_size=50, checkpoint_dir=str(tmp_path), resume=True, **QUIET)


# ----- non-finite weights ---------------------------------------------------------------------------

class PoisonedSGD(torch.optim.SGD):
    """SGD whose ``poison_at``-th step turns every weight NaN: a run that diverges mid-epoch."""

    def __init__(self, params, poison_at: int, **kwargs):
        super().__init__(params, **kwargs)
        self.poison_at, self.steps = poison_at, 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        self.steps += 1
        if self.steps == self.poison_at:
            for group in self.param_groups:
                for p in group["params"]:
                    p.fill_(math.nan)
        return loss


def test_nan_mid_epoch_never_reaches_last_and_resume_continues_from_the_last_good(tmp_path):
    train = toy(200, 0)  # 4 steps per epoch
    kw = dict(epochs=3, batch_size=50, seed=1, restore_best=False, checkpoint_every_steps=1, **QUIET)
    sgd = dict(lr=0.05, momentum=0.9)
    straight = small_mdn()
    r_straight = fit(straight, train, optimizer=lambda p: torch.optim.SGD(p, **sgd), checkpoint_dir=str(tmp_path / "a"),
                     **kw)
    folder = tmp_path / "b"
    with pytest.raises(FloatingPointError, match=r"must be finite to be checkpointed.* at step 6; .*last\.pt' was not "
                                                 r"overwritten"):
        fit(small_mdn(), train, optimizer=lambda p: PoisonedSGD(p, 6, **sgd), checkpoint_dir=str(folder), **kw)
    last, prev = load_checkpoint(str(folder / "last.pt")), load_checkpoint(str(folder / "last.prev.pt"))
    assert (last["global_step"], last["epoch"], last["step_in_epoch"]) == (5, 1, 1)
    assert prev["global_step"] == 4
    assert all(bool(torch.isfinite(v).all()) for v in last["model_state"].values())
    resumed = small_mdn(seed=7)
    r_resumed = fit(resumed, train, optimizer=lambda p: torch.optim.SGD(p, **sgd), checkpoint_dir=str(folder),
                    resume=True, **kw)
    assert r_resumed.global_step == r_straight.global_step == 12
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    assert strip(r_resumed.history) == strip(r_straight.history)


def test_nan_at_the_end_of_an_epoch_writes_neither_best_nor_last(tmp_path):
    with pytest.raises(FloatingPointError, match=r"best\.pt' was not overwritten"):
        fit(small_mdn(), toy(200, 0), epochs=2, batch_size=50, optimizer=lambda p: PoisonedSGD(p, 4, lr=0.01),
            checkpoint_dir=str(tmp_path), val_split=0, **QUIET)  # no validation: best.pt follows the training loss
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ----- durable writes, interrupted writes -----------------------------------------------------------

def test_fsync_before_rename_and_directory_fsync(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(str(dst))))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = str(tmp_path / "last.pt")
    C.save_checkpoint({"w": torch.ones(3)}, path)
    C.save_checkpoint({"w": torch.zeros(3)}, path)
    if not os.path.isdir("/proc/self/fd"):  # pragma: no cover - other platforms: order only
        events = [(kind, "file" if i % 2 == 0 else "dir") if kind == "fsync" else (kind, what)
                  for i, (kind, what) in enumerate(events)]
    second = events[len(events) // 2:]
    assert events[: len(events) // 2] == [("fsync", "file"), ("replace", "last.pt"), ("fsync", "dir")]
    assert second == [("fsync", "file"), ("replace", "last.prev.pt"), ("replace", "last.pt"), ("fsync", "dir")]
    assert torch.equal(C.read_checkpoint(path)["w"], torch.zeros(3))
    assert torch.equal(C.read_checkpoint(C.previous_path(path))["w"], torch.ones(3))


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    C.save_checkpoint({"w": torch.ones(3)}, path)

    def broken_save(obj, fh, *args, **kwargs):
        fh.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        C.save_checkpoint({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]
    assert torch.equal(C.read_checkpoint(path)["w"], torch.ones(3))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("on", ["save", "load"])
def test_orphaned_temp_files_are_removed(tmp_path, on):
    path = tmp_path / "last.pt"
    C.save_checkpoint({"w": torch.ones(3)}, str(path))
    finished = path.stat().st_mtime
    orphans = [tmp_path / f"last.pt.tmp{dead_pid()}",      # a killed writer
               tmp_path / f"last.prev.pt.tmp{dead_pid()}",  # killed while keeping the previous file
               tmp_path / f"last.pt.tmp{os.getpid()}",     # this process's own failed write
               tmp_path / "last.pt.tmp1"]                  # pid alive (init) but older than last.pt: stale
    kept = [tmp_path / "last.pt.tmp1x",                    # not a temp name
            tmp_path / "best.pt.tmp999999999"]             # another checkpoint's temp
    for p in orphans + kept:
        p.write_bytes(b"PK\x03\x04 partial")
    os.utime(orphans[3], (finished - 60, finished - 60))
    live = tmp_path / f"last.pt.tmp{os.getppid()}"         # a live writer, newer than last.pt: in progress
    live.write_bytes(b"PK\x03\x04 partial")
    os.utime(live, (finished + 60, finished + 60))
    if on == "save":
        C.save_checkpoint({"w": torch.zeros(3)}, str(path))
    else:
        C.read_checkpoint(str(path))
    left = set(os.listdir(tmp_path))
    assert not left & {p.name for p in orphans}
    assert {p.name for p in kept} | {live.name} <= left


# ----- command line ---------------------------------------------------------------------------------

def _no_training(*args, **kwargs):
    raise AssertionError("training started although --out is not writable")


def test_cli_unwritable_out_exits_2_before_any_work(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", os.path.join(dir, "probe"))

    monkeypatch.setattr("tempfile.mkstemp", refuse)  # as a read-only mount would (root ignores chmod)
    monkeypatch.setattr(cli, "run_experiment", _no_training)
    monkeypatch.setattr(cli, "compare", _no_training)
    for argv in (["run", "pitchfork", "--model", "mdn"], ["compare", "pitchfork"], ["demo"]):
        with pytest.raises(SystemExit) as exc:
            cli.main([*argv, "--out", str(out), "--quiet"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"--out must be a writable directory, got {str(out)!r} (Permission denied)" in err, err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes regardless of permissions")
def test_cli_read_only_directory_exits_2(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    monkeypatch.setattr(cli, "run_experiment", _no_training)
    try:
        with pytest.raises(SystemExit) as exc:
            cli.main(["run", "pitchfork", "--model", "mdn", "--out", str(out), "--quiet"])
    finally:
        out.chmod(0o700)
    assert exc.value.code == 2
    assert "Permission denied" in capsys.readouterr().err


def test_cli_out_that_is_a_file_exits_2(tmp_path, monkeypatch, capsys):
    out = tmp_path / "file"
    out.write_text("x")
    monkeypatch.setattr(cli, "run_experiment", _no_training)
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "pitchfork", "--model", "mdn", "--out", str(out / "sub"), "--quiet"])
    assert exc.value.code == 2
    assert f"--out must be a writable directory, got {str(out / 'sub')!r}" in capsys.readouterr().err


def test_cli_writable_out_leaves_no_probe(tmp_path):
    assert cli._out_dir(str(tmp_path / "new")) == str(tmp_path / "new")
    assert os.listdir(tmp_path / "new") == []

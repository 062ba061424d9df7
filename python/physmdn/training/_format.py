"""Checkpoint files: durable writes and checked reads.

A checkpoint is a ``torch.save`` zip archive of a dict with ``format`` (:data:`CHECKPOINT_FORMAT`) and
``checksum``: ``"sha256:<hex>"`` over every other entry (:func:`content_checksum`). Writes go to
``<name>.tmp<pid>`` in the same directory, are flushed and fsynced, and replace the file with ``os.replace``;
the file they replace is kept as ``<stem>.prev<ext>`` (``last.pt`` -> ``last.prev.pt``). Reads use
``weights_only=True`` (tensors and plain data only, never arbitrary objects) and raise :class:`CheckpointError`
naming the file and the cause: empty, truncated, not a checkpoint, corrupted, or an unknown format version.

Layering: imports torch only; the rest of :mod:`physmdn.training` builds on it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import zipfile
from collections.abc import Mapping

import torch

__all__ = ["CheckpointError", "CHECKPOINT_FORMAT", "check_finite_state", "content_checksum", "previous_path", "save_checkpoint",
           "read_checkpoint", "remove_orphaned_temps"]

CHECKPOINT_FORMAT = "physmdn.checkpoint/2"
# version 1 had no checksum; such files are still read, unverified
_READABLE_FORMATS = ("physmdn.checkpoint/1", CHECKPOINT_FORMAT)
_FORMAT_PREFIX = "physmdn.checkpoint/"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes zip archives


class CheckpointError(ValueError):
    """A file that cannot be used as a physmdn checkpoint: the message names the file and the cause."""


# ----- checksum -------------------------------------------------------------------------------------

def _feed(h, obj) -> None:
    """Hash ``obj`` by type and content; the order of dict entries does not matter (sorted by key)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, Mapping):
        h.update(f"M{len(obj)}|".encode())
        for key in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):  # tuples and lists alike: a round trip may turn one into the other
        h.update(f"L{len(obj)}|".encode())
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, float):
        h.update(b"F" + struct.pack("<d", obj))
    elif obj is None or isinstance(obj, (bool, int, str, complex, torch.dtype, torch.device)):
        text = repr(obj).encode()
        h.update(f"{type(obj).__name__}{len(text)}|".encode() + text)
    elif isinstance(obj, bytes):
        h.update(f"B{len(obj)}|".encode() + obj)
    else:
        raise TypeError(f"checkpoint entries must be tensors, containers or plain values, got {type(obj).__name__}")


def content_checksum(record: Mapping) -> str:
    """``"sha256:<hex>"`` over every entry of ``record`` except ``checksum``: tensors by dtype, shape and bytes,
    numbers, strings and containers by type and value."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in record.items() if k != "checksum"})
    return "sha256:" + h.hexdigest()


# ----- writing --------------------------------------------------------------------------------------

def check_finite_state(state: Mapping[str, torch.Tensor], path: str, step: int) -> None:
    """Refuse to checkpoint non-finite weights (``FloatingPointError``): the file at ``path`` keeps the last
    finite ones, so a resume starts from them."""
    for name, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise FloatingPointError(
                f"model state {name!r} must be finite to be checkpointed, got {bad} NaN/inf of {value.numel()} "
                f"values at step {step}; {path!r} was not overwritten and keeps the last finite weights (resume "
                f"from it with a lower lr, or with grad_clip on)")


def previous_path(path: str) -> str:
    """Where the checkpoint a write replaces is kept: ``dir/last.pt`` -> ``dir/last.prev.pt``."""
    stem, ext = os.path.splitext(path)
    return f"{stem}.prev{ext or '.pt'}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else, or the platform cannot tell: keep its file
        return True
    return True


def remove_orphaned_temps(path: str) -> list[str]:
    """Remove the temp files of ``path`` and of its previous copy left by interrupted writes; returns their paths.

    A ``<name>.tmp<pid>`` is an orphan when process ``pid`` is gone, when it is this process's own (a write that
    raised), or when it is older than ``path`` itself (a write that finished later made it stale, whatever
    process now has that pid)."""
    folder, name = os.path.split(os.path.abspath(path))
    prev = os.path.basename(previous_path(path))
    pattern = re.compile(f"(?:{re.escape(name)}|{re.escape(prev)})" + r"\.tmp(\d+)$")
    try:
        entries = os.listdir(folder)
        finished = os.stat(path).st_mtime if os.path.exists(path) else None
    except OSError:
        return []
    removed = []
    for entry in entries:
        match = pattern.match(entry)
        if match is None:
            continue
        tmp = os.path.join(folder, entry)
        pid = int(match.group(1))
        try:
            stale = finished is not None and os.stat(tmp).st_mtime < finished
            if pid == os.getpid() or stale or not _pid_alive(pid):
                os.remove(tmp)
                removed.append(tmp)
        except OSError:  # gone meanwhile, or a read-only folder: nothing to clean
            pass
    return removed


def _fsync_dir(folder: str) -> None:
    """Make the renames in ``folder`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(record: dict, path: str, keep_previous: bool = True) -> None:
    """Write ``record`` (plus ``format`` and ``checksum``) to ``path`` durably and atomically.

    The temp file is flushed and fsynced before ``os.replace``, and the directory after it. With
    ``keep_previous`` the file being replaced stays as :func:`previous_path` (hard link, or a copy where links
    are not supported), so ``path`` exists at every moment."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_orphaned_temps(path)
    record = dict(record, format=CHECKPOINT_FORMAT)
    record["checksum"] = content_checksum(record)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            torch.save(record, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if keep_previous and os.path.isfile(path):
            prev = previous_path(path)
            prev_tmp = f"{prev}.tmp{os.getpid()}"
            if os.path.exists(prev_tmp):
                os.remove(prev_tmp)
            try:
                os.link(path, prev_tmp)
            except OSError:
                shutil.copyfile(path, prev_tmp)
            os.replace(prev_tmp, prev)
        os.replace(tmp, path)
    except BaseException:
        for leftover in (tmp, f"{previous_path(path)}.tmp{os.getpid()}"):
            if os.path.exists(leftover):
                os.remove(leftover)
        raise
    _fsync_dir(folder)


# ----- reading --------------------------------------------------------------------------------------

def _damage(path: str) -> str | None:
    """Why the zip archive at ``path`` is unreadable (truncated, or a member failing its CRC), or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile as exc:
        return f"truncated or damaged: the zip archive is incomplete ({exc})"
    except (OSError, EOFError, ValueError, zipfile.LargeZipFile) as exc:
        return f"truncated or damaged: {type(exc).__name__}: {exc}"
    if bad is not None:
        return f"corrupted: archive member {bad!r} fails its CRC check"
    return None


def read_checkpoint(path: str, map_location="cpu") -> dict:
    """Load and check a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        FileNotFoundError: ``path`` is not an existing file.
        CheckpointError: the file is empty, truncated, not a physmdn checkpoint, corrupted (checksum or CRC
            mismatch) or of an unknown format version.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint path must be an existing file, got {path!r}")
    remove_orphaned_temps(path)
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes): an interrupted write or not a checkpoint")
    with open(path, "rb") as fh:
        head = fh.read(len(_ZIP_MAGIC))
    if head != _ZIP_MAGIC:
        raise CheckpointError(f"{path!r} is not a checkpoint: expected a torch.save zip archive (starting with "
                              f"{_ZIP_MAGIC!r}), got a file of {size} bytes starting with {head!r}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        cause = _damage(path) or (f"torch.load(weights_only=True) refused it: {type(exc).__name__}: "
                                  f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
        raise CheckpointError(f"checkpoint {path!r} cannot be read: {cause}") from exc
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("format"), str):
        what = f"a dict without a format entry" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        raise CheckpointError(f"{path!r} is not a physmdn checkpoint: expected a dict with format "
                              f"{CHECKPOINT_FORMAT!r}, got {what}")
    fmt = ckpt["format"]
    if fmt not in _READABLE_FORMATS:
        kind = "an unknown format version" if fmt.startswith(_FORMAT_PREFIX) else "a foreign format"
        raise CheckpointError(f"checkpoint {path!r} has {kind}: expected one of {_READABLE_FORMATS}, got {fmt!r}")
    if fmt != CHECKPOINT_FORMAT:
        return ckpt
    stored = ckpt.get("checksum")
    actual = content_checksum(ckpt)
    if stored != actual:
        raise CheckpointError(f"checkpoint {path!r} is corrupted: its content checksum is {actual}, the stored one "
                              f"{stored!r}")
    return ckpt

"""Pieces shared by the command line's modules (:mod:`physmdn.cli`, :mod:`physmdn.cli_data`): the usage error,
argparse types that name what they expected, and the output-folder check.

Layering: imports torch and the argument checks (_validation) only.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from . import _validation as check

__all__ = ["CLIError", "positive_int", "nonneg_int", "positive_float", "nonneg_float", "int_list", "hidden",
           "device", "out_dir"]


class CLIError(Exception):
    """A usage error the command line reports as ``physmdn: error: ...`` with exit status 2."""


def _number_type(cast, check_value, expected: str):
    """An argparse type: ``cast(text)`` that must pass ``check_value(value, name)`` (physmdn._validation), else an
    error naming what was expected."""

    def parse(text: str):
        try:
            return check_value(cast(text), "value")
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None

    return parse


positive_int = _number_type(int, lambda v, n: check.count(v, n, 1), "a positive integer")
nonneg_int = _number_type(int, lambda v, n: check.count(v, n, 0), "an integer >= 0")
positive_float = _number_type(float, check.positive, "a positive number")
nonneg_float = _number_type(float, check.nonnegative, "a number >= 0")


def int_list(text: str) -> list[int]:
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive integers, got {text!r}")
    return [positive_int(p.strip()) for p in parts]


def hidden(text: str) -> tuple[int, ...]:
    return tuple(int_list(text))


def device(text: str) -> torch.device:
    try:
        value = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu or cuda:0, got {text!r}") from None
    if value.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} requested but CUDA is not available")
    return value


def out_dir(path: str, option: str = "--out") -> str:
    """Create ``path`` if needed and prove it writable by creating and removing a file, before any work starts
    (permission bits alone miss read-only mounts, ACLs and root)."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".physmdn-write-probe-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise CLIError(f"{option} must be a writable directory, got {path!r} "
                       f"({exc.strerror or type(exc).__name__})") from None
    return path

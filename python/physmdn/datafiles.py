"""Reading a user's data file into context and outcome tensors: what ``physmdn fit`` and ``physmdn sample`` read.

:func:`read_columns` takes a file and two column selections and returns ``x [N, C]`` and ``y [N, D]`` (float64)
with their column names. Formats, by file extension:

* ``.csv`` (comma separated) and ``.tsv`` (tab separated): a header row is detected when any field of the first
  row is not a number; without one the columns are named by their 0-based index (``"0"``, ``"1"``, ...). An
  empty field is a missing value (NaN). Columns that are not selected may hold anything (labels, dates).
* ``.npz``: the arrays of ``numpy.savez``; each array is 1-D (one column) or 2-D (one column per entry of its
  second dimension). Read with ``allow_pickle=False``.
* ``.pt`` / ``.pth``: ``torch.save`` of a dict of tensors (or arrays) of the same kinds, or of an ``(x, y)``
  tuple, whose arrays are then named ``x`` and ``y``. Read with ``weights_only=True``.

Column selections (``--x`` / ``--y`` on the command line) are comma-separated items:

* CSV: a column name from the header, a 0-based column index, or a half-open index range ``start:stop``
  (``1:4`` is columns 1, 2 and 3; ``2:`` runs to the last column). A name wins over an index when a header
  holds a name such as ``"3"``. Example: ``--x r,temperature --y 3:6``.
* npz / pt: an array name, or an array name with an index selection of its columns in brackets, in the same
  grammar of indices and ranges: ``--x x --y y``, ``--x "inputs[0,2]" --y "outputs[1:]"``. The columns of a 2-D
  array are named ``name[i]``, a 1-D array is named ``name``.

All selected columns must be numbers and have the same number of rows. Rows with a NaN or an infinite value in a
selected column are an error that names each such column with its count and first rows, unless
``drop_nan=True`` drops them. Every problem raises :class:`DataFileError` (a ``ValueError``) naming the file and
what was wrong.

Layering: imports numpy and torch only; used by the command line (:mod:`physmdn.cli_data`).
"""

from __future__ import annotations

import csv
import math
import os
import re
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["DataFileError", "Columns", "read_columns", "SUPPORTED_EXTENSIONS", "split_items"]

SUPPORTED_EXTENSIONS = (".csv", ".tsv", ".npz", ".pt", ".pth")
_SHOW_ROWS = 5  # rows named per non-finite column in an error message


class DataFileError(ValueError):
    """A data file that cannot be used: the message names the file and the problem."""


@dataclass
class Columns:
    """What :func:`read_columns` returns.

    Attributes:
        x: ``[N, C]`` float64 context columns. y: ``[N, D]`` float64 outcome columns (``[N, 0]`` when no outcome
            selection was given).
        x_names, y_names: the column names, in selection order.
        rows_read: rows in the file; rows_dropped: rows dropped for non-finite values (``drop_nan=True``).
    """

    x: torch.Tensor
    y: torch.Tensor
    x_names: list[str]
    y_names: list[str]
    rows_read: int
    rows_dropped: int = 0
    source: str = ""


def split_items(text: str) -> list[str]:
    """Comma-separated items of a column selection, keeping commas inside brackets (``a[0,2],b`` -> two items)."""
    items, depth, current = [], 0, ""
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    items.append(current.strip())
    return items


_RANGE = re.compile(r"^(-?\d*)\s*:\s*(-?\d*)$")


def _indices(item: str, width: int, what: str) -> list[int] | None:
    """The 0-based indices an index or ``start:stop`` range selects out of ``width``; None if ``item`` is neither;
    :class:`ValueError` when it is one but out of range."""
    if re.fullmatch(r"\d+", item):
        index = int(item)
        if index >= width:
            raise ValueError(f"index {index} is out of range: {what} has {width} column(s), 0 to {width - 1}")
        return [index]
    match = _RANGE.match(item)
    if match is None:
        return None
    start = int(match.group(1)) if match.group(1) else 0
    stop = int(match.group(2)) if match.group(2) else width
    if start < 0 or stop < 0:
        raise ValueError(f"range {item!r} must use indices >= 0")
    if not start < stop <= width:
        raise ValueError(f"range {item!r} must select columns within 0:{width} of {what} (start < stop)")
    return list(range(start, stop))


def _show_rows(rows: list[str], total: int) -> str:
    shown = ", ".join(rows[:_SHOW_ROWS])
    return shown + (f", ... ({total - _SHOW_ROWS} more)" if total > _SHOW_ROWS else "")


# ----- tables ---------------------------------------------------------------------------------------

class _CsvTable:
    """A delimited text file: a header (read or made of indices) and the rows as strings."""

    def __init__(self, path: str, delimiter: str):
        self.path = path
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                rows = [(number, row) for number, row in enumerate(csv.reader(fh, delimiter=delimiter), start=1)
                        if any(cell.strip() for cell in row)]
        except UnicodeDecodeError:
            raise DataFileError(f"data file {path!r} must be UTF-8 text for a {os.path.splitext(path)[1]} file, "
                                "got bytes that are not (a binary file?)") from None
        except csv.Error as exc:
            raise DataFileError(f"data file {path!r} is not readable as CSV: {exc}") from None
        if not rows:
            raise DataFileError(f"data file {path!r} has no rows (empty file)")
        first = rows[0][1]
        self.has_header = not all(_is_number(cell) for cell in first)
        if self.has_header:
            self.names = [cell.strip() for cell in first]
            rows = rows[1:]
        else:
            self.names = [str(i) for i in range(len(first))]
        width = len(self.names)
        for number, row in rows:
            if len(row) != width:
                raise DataFileError(f"data file {path!r}: line {number} has {len(row)} field(s), expected {width} "
                                    f"(the {'header' if self.has_header else 'first row'}'s)")
        self.lines = [number for number, _ in rows]
        self.rows = [row for _, row in rows]

    def row_label(self, index: int) -> str:
        return f"line {self.lines[index]}"

    def select(self, spec: str, option: str) -> tuple[np.ndarray, list[str]]:
        chosen: list[int] = []
        for item in split_items(spec):
            if not item:
                raise DataFileError(f"{option} must be comma-separated column names or indices, got {spec!r} "
                                    "(an empty item)")
            if item in self.names:
                chosen.append(self.names.index(item))
                continue
            try:
                found = _indices(item, len(self.names), f"data file {self.path!r}")
            except ValueError as exc:
                raise DataFileError(f"{option}: {exc}") from None
            if found is None:
                raise DataFileError(f"{option} names column {item!r}, which data file {self.path!r} does not have; "
                                    f"its columns: {', '.join(self.names)}")
            chosen += found
        values = np.empty((len(self.rows), len(chosen)), dtype=np.float64)
        for j, col in enumerate(chosen):
            for i, row in enumerate(self.rows):
                cell = row[col].strip()
                if not cell:
                    values[i, j] = math.nan  # a missing value: reported (or dropped) with the NaNs
                    continue
                try:
                    values[i, j] = float(cell)
                except ValueError:
                    raise DataFileError(f"column {self.names[col]!r} of data file {self.path!r} must hold numbers, "
                                        f"got {cell!r} at {self.row_label(i)}") from None
        return values, [self.names[c] for c in chosen]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class _ArrayTable:
    """Named 1-D or 2-D numeric arrays (npz, pt)."""

    def __init__(self, path: str, arrays: dict):
        self.path = path
        self.arrays = {}
        for name, value in arrays.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu()
                value = value.double().numpy() if value.is_floating_point() else value.numpy()  # bf16 has no numpy
            self.arrays[str(name)] = value
        self.names = list(self.arrays)

    def row_label(self, index: int) -> str:
        return f"row {index}"

    def select(self, spec: str, option: str) -> tuple[np.ndarray, list[str]]:
        blocks, names = [], []
        for item in split_items(spec):
            match = re.fullmatch(r"(.+?)(?:\[(.*)\])?", item)
            key, columns = (match.group(1).strip(), match.group(2)) if match else (item, None)
            if not key:
                raise DataFileError(f"{option} must be comma-separated array names (optionally with columns, "
                                    f"as in x[0,2]), got {spec!r}")
            if key not in self.arrays:
                raise DataFileError(f"{option} names array {key!r}, which data file {self.path!r} does not have; "
                                    f"its arrays: {', '.join(self.names) or '(none)'}")
            array = self.arrays[key]
            if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
                kind = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
                raise DataFileError(f"array {key!r} of data file {self.path!r} must hold numbers, got {kind}")
            if array.ndim not in (1, 2):
                raise DataFileError(f"array {key!r} of data file {self.path!r} must be 1-D [N] or 2-D [N, columns], "
                                    f"got shape {tuple(array.shape)}")
            matrix = array.reshape(-1, 1) if array.ndim == 1 else array
            labels = [key] if array.ndim == 1 else [f"{key}[{i}]" for i in range(matrix.shape[1])]
            if columns is not None:
                chosen: list[int] = []
                for part in split_items(columns):
                    try:
                        found = _indices(part, matrix.shape[1], f"array {key!r}")
                    except ValueError as exc:
                        raise DataFileError(f"{option}: {exc}") from None
                    if found is None:
                        raise DataFileError(f"{option}: columns of array {key!r} must be indices or start:stop "
                                            f"ranges, got {part!r}")
                    chosen += found
                matrix, labels = matrix[:, chosen], [labels[i] if array.ndim == 2 else key for i in chosen]
            blocks.append(matrix.astype(np.float64))
            names += labels
        rows = {block.shape[0] for block in blocks}
        if len(rows) > 1:
            raise DataFileError(f"{option} selects arrays of data file {self.path!r} with different numbers of rows: "
                                f"{sorted(rows)}")
        return np.concatenate(blocks, axis=1), names


def _open_table(path: str):
    if not isinstance(path, str) or not path:
        raise DataFileError(f"data file must be a path, got {path!r}")
    extension = os.path.splitext(path)[1].lower()
    if extension not in SUPPORTED_EXTENSIONS:
        raise DataFileError(f"data file {path!r} must end in one of {', '.join(SUPPORTED_EXTENSIONS)}, "
                            f"got {extension or 'no extension'}")
    if not os.path.exists(path):
        raise DataFileError(f"data file {path!r} does not exist")
    if not os.path.isfile(path):
        raise DataFileError(f"data file {path!r} is not a file")
    if not os.access(path, os.R_OK):
        raise DataFileError(f"data file {path!r} is not readable (permissions)")
    if extension in (".csv", ".tsv"):
        return _CsvTable(path, "," if extension == ".csv" else "\t")
    if extension == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise DataFileError(f"data file {path!r} is not a readable .npz archive: {exc}") from None
        return _ArrayTable(path, arrays)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds (pickle, zip, runtime) for a file it cannot load
        raise DataFileError(f"data file {path!r} is not loadable with torch.load(weights_only=True): "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if isinstance(content, (tuple, list)) and len(content) == 2:
        content = {"x": content[0], "y": content[1]}
    if not isinstance(content, dict):
        raise DataFileError(f"data file {path!r} must hold a dict of tensors or an (x, y) tuple, "
                            f"got {type(content).__name__}")
    return _ArrayTable(path, content)


def _select_once(table, spec: str, option: str) -> tuple[np.ndarray, list[str]]:
    values, names = table.select(spec, option)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataFileError(f"{option} must select each column once, got {', '.join(map(repr, repeated))} "
                            "twice or more")
    return values, names


def read_columns(path: str, x: str, y: str | None = None, *, drop_nan: bool = False, min_rows: int = 1,
                 x_option: str = "--x", y_option: str = "--y") -> Columns:
    """Read the columns selected by ``x`` and ``y`` (grammar in the module docstring) from the file at ``path``.

    Args:
        path: a ``.csv``, ``.tsv``, ``.npz``, ``.pt`` or ``.pth`` file.
        x, y: column selections; ``y=None`` reads contexts only (``Columns.y`` is ``[N, 0]``).
        drop_nan: drop rows with a NaN or infinite value in a selected column instead of raising.
        min_rows: the fewest rows accepted (after dropping).
        x_option, y_option: the names the messages use for ``x`` and ``y``.

    Returns:
        :class:`Columns` with ``x [N, C]`` and ``y [N, D]`` in float64.

    Raises:
        DataFileError: the file is missing, unreadable or of an unknown kind; a selection names a column the file
            lacks; a selected column is not numeric; selections overlap; non-finite values (without ``drop_nan``);
            fewer than ``min_rows`` rows.
    """
    table = _open_table(path)
    x_values, x_names = _select_once(table, x, x_option)
    if y is not None:
        y_values, y_names = _select_once(table, y, y_option)
        both = sorted(set(x_names) & set(y_names))
        if both:
            raise DataFileError(f"{x_option} and {y_option} must select different columns, got "
                                f"{', '.join(map(repr, both))} in both")
        if y_values.shape[0] != x_values.shape[0]:
            raise DataFileError(f"{x_option} and {y_option} select arrays of data file {path!r} with different "
                                f"numbers of rows: {x_values.shape[0]} and {y_values.shape[0]}")
    else:
        y_values, y_names = np.empty((x_values.shape[0], 0)), []
    values = np.concatenate([x_values, y_values], axis=1)
    names = x_names + y_names
    bad = ~np.isfinite(values)
    dropped = 0
    if bad.any():
        if not drop_nan:
            problems = []
            for j in np.flatnonzero(bad.any(axis=0)):
                rows = np.flatnonzero(bad[:, j])
                labels = [table.row_label(int(i)) for i in rows]
                problems.append(f"column {names[j]!r} has {len(rows)} NaN or infinite value(s) "
                                f"({_show_rows(labels, len(rows))})")
            raise DataFileError(f"data file {path!r}: {'; '.join(problems)}. Fix those rows, or drop them with "
                                "--drop-nan (drop_nan=True)")
        keep = ~bad.any(axis=1)
        dropped = int((~keep).sum())
        values = values[keep]
    if values.shape[0] < min_rows:
        after = f" after dropping {dropped} with NaN or infinite values" if dropped else ""
        raise DataFileError(f"data file {path!r} must have at least {min_rows} rows, got {values.shape[0]}{after}")
    data = torch.from_numpy(np.ascontiguousarray(values))
    C = len(x_names)
    return Columns(x=data[:, :C].contiguous(), y=data[:, C:].contiguous(), x_names=x_names, y_names=y_names,
                   rows_read=values.shape[0] + dropped, rows_dropped=dropped, source=path)

"""Reading the publishers' text files with errors that name the file and line, and writing raw logs.

Delimited files are parsed with pyarrow (fast path). When pyarrow refuses a file, the file is scanned again
line by line in Python so that the :class:`~recfm.errors.DataError` names the first bad line
(``ratings.dat:17: expected 4 fields (user_id, item_id, rating, timestamp), got 3``). Line numbers count
from 1 and include the header line.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recfm.errors import DataError

INT = "int"
STR = "str"
_ARROW = {INT: pa.int64(), STR: pa.string()}
_UNIT_SEPARATOR = "\x1f"  # stands in for multi-character delimiters such as MovieLens' "::"


def require(folder: Path, name: str) -> Path:
    """``folder / name``, or a DataError naming the missing file."""
    path = folder / name
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return path


def read_text(path: Path) -> str:
    """A whole text file (``.gz`` transparently), UTF-8 with a Latin-1 fallback (MovieLens files)."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def first_line(path: Path) -> str:
    """The first line of a text file without its line break (used to recognise a format by its header)."""
    with path.open("rb") as f:
        return f.readline().decode("utf-8", errors="replace").rstrip("\r\n")


def lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line_number, line)`` of a text file, 1-based, line breaks stripped, blank lines skipped."""
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if line.strip():
            yield number, line


def read_columns(
    path: Path,
    columns: dict[str, str],
    *,
    delimiter: str = ",",
    header: bool = True,
    extra_columns: bool = False,
) -> dict[str, np.ndarray]:
    """Read the leading columns of a delimited text file.

    Args:
        path: the file.
        columns: ``{name: INT | STR}`` of the file's leading columns, in file order (a header row, if any,
            is skipped, not checked: callers recognise formats by their header first).
        delimiter: one character, or a multi-character string such as ``"::"``.
        header: whether the first line is a header.
        extra_columns: allow (and ignore) columns after the declared ones.

    Returns:
        ``{name: array}``, int64 arrays for INT columns and object arrays of str for STR columns, one entry
        per non-blank data line.

    Raises:
        DataError: naming the file and the first malformed line.
    """
    data = path.read_bytes()
    sep = delimiter
    if len(delimiter) > 1:
        data = data.replace(delimiter.encode(), _UNIT_SEPARATOR.encode())
        sep = _UNIT_SEPARATOR
    names = list(columns)
    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(autogenerate_column_names=True, skip_rows=1 if header else 0),
            parse_options=pacsv.ParseOptions(delimiter=sep, quote_char=False),
            convert_options=pacsv.ConvertOptions(
                column_types={f"f{i}": _ARROW[t] for i, t in enumerate(columns.values())}, strings_can_be_null=False
            ),
        )
        if table.num_columns < len(names) or (table.num_columns > len(names) and not extra_columns):
            raise pa.ArrowInvalid(f"{table.num_columns} columns")
    except pa.ArrowInvalid as e:
        _find_bad_line(path, columns, delimiter, header, extra_columns)
        raise DataError(f"{path}: cannot be read as {_describe(columns, delimiter)}: {e}") from None
    out: dict[str, np.ndarray] = {}
    for i, (name, kind) in enumerate(columns.items()):
        col = table.column(i)
        if col.null_count:
            _find_bad_line(path, columns, delimiter, header, extra_columns)
            raise DataError(f"{path}: column {name!r} has {col.null_count} empty values")
        out[name] = col.to_numpy() if kind == INT else np.asarray(col.to_pylist(), dtype=object)
    return out


def _describe(columns: dict[str, str], delimiter: str) -> str:
    return f"{len(columns)} {delimiter!r}-separated fields ({', '.join(columns)})"


def _find_bad_line(path: Path, columns: dict[str, str], delimiter: str, header: bool, extra: bool) -> None:
    """Raise a DataError naming the first line that does not parse (returns if every line parses)."""
    n = len(columns)
    for number, line in lines(path):
        if header and number == 1:
            continue
        parts = line.split(delimiter)
        if len(parts) < n or (len(parts) > n and not extra):
            raise DataError(
                f"{path}:{number}: expected {_describe(columns, delimiter)}, got {len(parts)} fields: {line[:80]!r}"
            )
        for part, (name, kind) in zip(parts, columns.items()):
            if kind == INT:
                try:
                    int(part)
                except ValueError:
                    raise DataError(f"{path}:{number}: column {name!r}: {part!r} is not an integer") from None


def parse_ints(text: str, path: Path, number: int, what: str) -> list[int]:
    """Whitespace-separated integers of one line, or a DataError naming the line."""
    try:
        return [int(tok) for tok in text.split()]
    except ValueError:
        bad = next(tok for tok in text.split() if not tok.lstrip("+-").isdigit())
        raise DataError(f"{path}:{number}: {what}: {bad!r} is not an integer") from None


def stable_order(*keys: np.ndarray) -> np.ndarray:
    """Permutation sorting rows by ``keys`` (first key most significant), ties kept in input order."""
    return np.lexsort(tuple(reversed(keys)))


def write_parquet(table: pa.Table | dict[str, np.ndarray | pa.Array], path: Path) -> str:
    """Write a table or columns (int arrays become int64, object arrays of str become string) to Parquet.

    Returns the file name (for the report).
    """
    pq.write_table(table if isinstance(table, pa.Table) else pa.table(table), path)
    return path.name


def check_unique_pairs(users: np.ndarray, items: np.ndarray, path: Path) -> None:
    """DataError naming both data rows (1-based, header not counted) when a (user, item) pair repeats."""
    key = users.astype(np.int64) * (int(items.max()) + 1) + items
    order = np.argsort(key, kind="stable")
    dup = np.flatnonzero(key[order][1:] == key[order][:-1])
    if dup.size:
        a, b = order[dup[0]], order[dup[0] + 1]
        raise DataError(
            f"{path}: data row {b + 1}: user {users[b]} rated item {items[b]} again (first at data row {a + 1})"
        )

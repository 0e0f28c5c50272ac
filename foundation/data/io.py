"""Reading raw logs: a Parquet or CSV file, or a folder of them, streamed in record batches.

A *log* is one path: a file (``.parquet``/``.pq``, ``.csv``, ``.csv.gz``) or a folder whose files with those
suffixes are read in sorted order of their relative paths (hidden files and files starting with ``_`` are
ignored). Memory stays bounded: Parquet is read ``batch_rows`` rows at a time without pre-buffering whole
row groups; CSV ``block_bytes`` of text at a time (pyarrow's streaming CSV reader holds about 32 blocks in
memory, so blocks are kept small), gathered into batches of about ``batch_rows`` rows.

CSV columns are read as strings and converted by :mod:`recfm.foundation.data.build_convert` (so a bad value
is reported with its row instead of failing the whole block); an empty field is null. A CSV row with the
wrong number of fields is an error naming its line, or, with ``on_bad_row="skip"``, a counted skip.

Where a row is, in messages: ``line N`` for CSV (the physical line, header = line 1, assuming no quoted
newlines; after skipped malformed rows the count can run behind), ``row N`` for Parquet (0-based index in
the file).
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from recfm.errors import DataError

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".csv.gz": "csv"}


def _format_of(path: Path) -> str | None:
    name = path.name.lower()
    for suffix, fmt in sorted(FORMATS.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(suffix):
            return fmt
    return None


@dataclass(frozen=True)
class LogFile:
    """One file of a raw log: its path, format, column names and (Parquet only) row count."""

    path: Path
    format: str  # "parquet" | "csv"
    columns: tuple[str, ...]
    num_rows: int | None  # None for CSV (unknown until read)
    num_bytes: int  # bytes the file's data take in memory (Parquet metadata) or on disk (CSV)

    def has(self, column: str) -> bool:
        return column in self.columns

    def where(self, row: int) -> str:
        """Human location of the ``row``-th (0-based) data row of this file."""
        return f"line {row + 2}" if self.format == "csv" else f"row {row}"


def _csv_header(path: Path) -> tuple[str, ...]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), None)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read the CSV header: {e}") from e
    if not header:
        raise DataError(f"{path}: empty CSV file (no header line)")
    return tuple(h.strip() for h in header)


def describe(path: Path) -> LogFile:
    """Columns (and, for Parquet, rows and in-memory bytes) of one log file, read from its header/footer."""
    fmt = _format_of(path)
    if fmt is None:
        raise DataError(f"{path}: not a Parquet or CSV file (suffix must be one of {', '.join(FORMATS)})")
    if fmt == "csv":
        return LogFile(path, fmt, _csv_header(path), None, path.stat().st_size)
    try:
        meta = pq.ParquetFile(path).metadata
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read the Parquet footer: {e}") from e
    nbytes = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    return LogFile(path, fmt, tuple(schema.names), meta.num_rows, nbytes)


def open_log(path: str | Path, role: str) -> list[LogFile]:
    """The files of a log (``role`` names it in messages: "events" / "exposures"), described."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: {role} log not found")
    if p.is_file():
        return [describe(p)]
    files = sorted(
        f
        for f in p.rglob("*")
        if f.is_file() and _format_of(f) and not any(part.startswith((".", "_")) for part in f.relative_to(p).parts)
    )
    if not files:
        raise DataError(f"{p}: {role} folder holds no Parquet or CSV file")
    return [describe(f) for f in files]


def require_columns(file: LogFile, columns: list[str] | tuple[str, ...], role: str, why: str = "") -> None:
    """DataError naming the file and every missing column (``why`` says what needs them)."""
    missing = [c for c in columns if not file.has(c)]
    if missing:
        names = ", ".join(repr(c) for c in missing)
        need = f" (needed {why})" if why else ""
        raise DataError(
            f"{file.path}: {role} log is missing column{'s' if len(missing) > 1 else ''} {names}{need}; "
            f"it has: {', '.join(file.columns)}"
        )


@dataclass(frozen=True)
class RawBatch:
    """A record batch of one file with the index of its first row in that file."""

    file: LogFile
    file_index: int  # position of the file in its log
    row0: int
    batch: pa.RecordBatch

    def where(self, i: int) -> str:
        return self.file.where(self.row0 + i)


class MalformedRows:
    """CSV rows with a wrong number of fields: raise (naming the line) or count and skip them."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.count = 0
        self.first: pcsv.InvalidRow | None = None

    def __call__(self, row: pcsv.InvalidRow) -> str:
        self.count += 1
        if self.first is None:
            self.first = row
        return "skip" if self.skip else "error"


def _concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    return batches[0] if len(batches) == 1 else pa.concat_batches(batches)


def iter_batches(
    file: LogFile,
    file_index: int,
    columns: list[str],
    *,
    batch_rows: int,
    block_bytes: int,
    malformed: MalformedRows,
) -> Iterator[RawBatch]:
    """Stream ``columns`` (those the file has; others are left out) of one file in record batches."""
    present = [c for c in dict.fromkeys(columns) if file.has(c)]
    row0 = 0
    try:
        if file.format == "parquet":
            pf = pq.ParquetFile(file.path, pre_buffer=False, buffer_size=1 << 20)
            reader = pf.iter_batches(batch_size=batch_rows, columns=present, use_threads=False)
        else:
            reader = pcsv.open_csv(
                file.path,
                read_options=pcsv.ReadOptions(block_size=block_bytes, use_threads=False),
                parse_options=pcsv.ParseOptions(invalid_row_handler=malformed),
                convert_options=pcsv.ConvertOptions(
                    include_columns=present,
                    column_types={c: pa.string() for c in present},
                    strings_can_be_null=True,
                    null_values=[""],
                    quoted_strings_can_be_null=True,
                ),
            )
        pending: list[pa.RecordBatch] = []
        rows = 0
        for batch in reader:  # CSV blocks are small (see ``block_bytes``): gather them up to ``batch_rows``
            pending.append(batch)
            rows += batch.num_rows
            if rows >= batch_rows:
                yield RawBatch(file, file_index, row0, _concat(pending))
                row0, pending, rows = row0 + rows, [], 0
        if pending:
            yield RawBatch(file, file_index, row0, _concat(pending))
    except pa.ArrowInvalid as e:
        bad = malformed.first
        if file.format == "csv" and bad is not None and not malformed.skip:
            line = f"line {bad.number}" if bad.number is not None else "a row"
            raise DataError(
                f"{file.path}: {line}: malformed CSV row: expected {bad.expected_columns} fields, "
                f"got {bad.actual_columns}: {bad.text!r}"
            ) from e
        raise DataError(f"{file.path}: cannot read: {e}") from e
    except OSError as e:
        raise DataError(f"{file.path}: cannot read: {e}") from e

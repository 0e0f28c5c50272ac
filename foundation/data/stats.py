"""``recfm data stats``: rows, bytes and tokens of a built sample folder (or one Parquet file).

Token counts come from list lengths only: each list column is read row group by row group through one small
leaf (``h.list.element.ts``), so memory stays at one row group of timestamps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recfm.errors import DataError
from recfm.foundation.data import schema as S


def sample_files(path: str | Path) -> list[Path]:
    """The Parquet files of a build: ``part-*.parquet`` of a folder (any ``*.parquet`` if none), or the file."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise DataError(f"{p}: no such sample file or folder")
    files = sorted(p.glob("part-*.parquet")) or sorted(p.glob("*.parquet"))
    if not files:
        raise DataError(f"{p}: folder holds no Parquet file")
    return files


def _ts_leaf(pf: pq.ParquetFile, column: str, file: Path) -> str:
    """Parquet path of a list column's ``ts`` leaf (``h.list.element.ts`` as pyarrow writes it)."""
    for i in range(len(pf.schema)):
        path = pf.schema.column(i).path
        if path.startswith(column + ".") and path.endswith("." + S.TS):
            return path
    raise DataError(f"{file}: list column {column!r} has no {S.TS!r} field")


def _lengths(pf: pq.ParquetFile, group: int, column: str, file: Path) -> np.ndarray:
    leaf = pf.read_row_group(group, columns=[_ts_leaf(pf, column, file)]).column(0)
    return pc.list_value_length(leaf).fill_null(0).to_numpy()


def dataset_stats(path: str | Path) -> dict:
    """Rows, bytes (on disk, and Parquet-encoded before compression), tokens by type (H, R, T),
    exposures per scenario and tokens-per-row figures."""
    files = sample_files(path)
    schema = pq.read_schema(files[0])
    targets = [n for n in schema.names if n.startswith("t_")]
    for c in (S.USER, S.WINDOW, S.H, S.R):
        if c not in schema.names:
            raise DataError(f"{files[0]}: not a sample file: column {c!r} is missing")
    rows = row_groups = in_memory = 0
    tokens = {"H": 0, "R": 0, "T": 0}
    exposures = {t[2:]: 0 for t in targets}
    per_row_max = 0
    for f in files:
        pf = pq.ParquetFile(f)
        rows += pf.metadata.num_rows
        for g in range(pf.metadata.num_row_groups):
            row_groups += 1
            in_memory += pf.metadata.row_group(g).total_byte_size
            h, r = _lengths(pf, g, S.H, f), _lengths(pf, g, S.R, f)
            t = np.zeros_like(h)
            for name in targets:
                n = _lengths(pf, g, name, f)
                exposures[name[2:]] += int(n.sum())
                t = t + n
            tokens["H"] += int(h.sum())
            tokens["R"] += int(r.sum())
            tokens["T"] += int(t.sum())
            if len(h):
                per_row_max = max(per_row_max, int((h + r + t).max()))
    total = sum(tokens.values())
    return {
        "path": str(path),
        "files": len(files),
        "row_groups": row_groups,
        "rows": rows,
        "bytes": sum(f.stat().st_size for f in files),
        "bytes_uncompressed": in_memory,
        "tokens": tokens,
        "tokens_total": total,
        "tokens_per_row_mean": total / rows if rows else 0.0,
        "tokens_per_row_max": per_row_max,
        "exposures": exposures,
    }


def format_stats(stats: dict) -> str:
    tok = stats["tokens"]
    return "\n".join(
        [
            f"{stats['path']}: {stats['rows']:,} rows in {stats['files']} file(s), {stats['row_groups']} row group(s), "
            f"{stats['bytes'] / 2**20:,.2f} MiB on disk, {stats['bytes_uncompressed'] / 2**20:,.2f} MiB uncompressed",
            f"  tokens: {stats['tokens_total']:,} = H {tok['H']:,} + R {tok['R']:,} + T {tok['T']:,} "
            f"(per row: mean {stats['tokens_per_row_mean']:.1f}, max {stats['tokens_per_row_max']:,})",
            "  exposures: " + ", ".join(f"{s} {n:,}" for s, n in stats["exposures"].items()),
        ]
    )

"""``recfm data build``: raw logs -> samples, one row per user per window (brief section 2), streaming.

Semantics (the sample schema is :func:`recfm.foundation.data.schema.sample_schema`):

* ``window = floor(ts / window_seconds) * window_seconds``. One sample per (user, window) with at least one
  exposure (user layout), or one per exposure (per-exposure layout, ``layout="exposure"``).
* **H**: the user's events with ts < window, each sequence kind (its ``actions``) truncated to its
  ``max_length`` at its ``keep`` end, then all kinds merged in time order (ties: by kind, then input
  order). ``kind`` = index of the sequence. An action listed by several sequences belongs to the first.
  Events whose action matches no sequence are ignored and counted (``unmatched_actions``).
* **R**: the user's events with window <= ts < (latest exposure of the sample), time order, truncated to
  ``realtime.max_length`` at ``realtime.keep``. Events after every exposure of a window can influence no
  exposure of it, so they are left out. Per-exposure layout: ts < that exposure's ts.
* **t_<s>**: the user's exposures of scenario s in the window, in time order (ties: input order). Their
  ``exposure_id`` is the log's column when it has one (then it must be unique: a duplicate is an error), else
  the row number of the exposure in the exposure stream (files in sorted order, 0-based, counting every
  row read, skipped ones included).
* Values: see :mod:`recfm.foundation.data.build_convert` (integer strings are integers; other string ids
  are hashed with a stable SipHash to non-negative int64).
* Timestamps need not be sorted in the logs: rows are sorted while building. Rows of the output are sorted
  by (user, window) (user layout) or (user, ts, scenario) (per-exposure), the same for any ``memory_mb``.
* Bad input: a missing column is a :class:`~recfm.errors.DataError` naming file and column; unknown
  scenarios, null users/timestamps, values that do not convert, malformed CSV rows are errors naming the
  file and row (``on_bad_row="error"``) or dropped and counted in the report (``"skip"``).

Streaming: pass 0 scans ids and timestamps (:mod:`.build_spill`), pass 1 spills canonical rows into user-range
partitions under ``<out>/_build_tmp`` (sized from ``memory_mb``), pass 2 assembles one partition at a time
(:mod:`.build_assemble`) and writes ``<out>/part-*.parquet`` row group by row group, then
``<out>/_build_report.json``. Earlier ``part-*.parquet`` files in ``out`` are replaced.

Reading the output: the folder itself (``pyarrow.parquet.read_table(out)``, ``pyarrow.dataset.dataset(out)``:
pyarrow skips names starting with ``_`` or ``.``, hence ``_build_report.json``) or the ``part-*.parquet``
glob (``datasets.load_dataset("parquet", data_files=f"{out}/part-*.parquet")``); docs/data.md.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from recfm.errors import ConfigError
from recfm.foundation.data import schema as S
from recfm.foundation.data.build_assemble import LAYOUTS, PartitionSamples
from recfm.foundation.data.build_rows import (
    ActionMap,
    RowCheck,
    event_spill_schema,
    prepare_events,
    prepare_exposures,
    target_spill_schema,
)
from recfm.foundation.data.build_spill import IDS_SCHEMA, Spill, duplicate_ids, id_partition, partition_of, scan
from recfm.foundation.data.io import LogFile, MalformedRows, iter_batches, open_log
from recfm.scenarios.spec import FeatureSpec, FeatureType, WorldSpec

TMP_DIR = "_build_tmp"
REPORT = "_build_report.json"  # "_": folder readers (pyarrow.dataset) skip it
_OLD_REPORT = "build_report.json"  # its earlier name: removed from a reused out folder, which pyarrow must read
_EVENT_OVERHEAD = 96  # pass-2 bytes per event beyond its row: sort permutations, ranks, pair keys
_EXPOSURE_OVERHEAD = 64


@dataclass(frozen=True)
class Budget:
    """How ``memory_mb`` (``total`` bytes) is shared out between the build's buffers.

    The build's own Arrow buffers and numpy arrays stay within about half of the total; the other half is
    headroom for what process RSS counts on top: the allocators' caches of freed memory (Arrow's mimalloc
    pool, glibc) and readers' buffers. tests/test_build_memory.py measures the RSS growth.
    """

    total: int

    @property
    def partition(self) -> int:
        """One partition in pass 2: its canonical rows plus sort/rank temporaries (``_*_OVERHEAD``)."""
        return self.total // 8

    @property
    def chunk(self) -> int:
        """Sample rows assembled at once in pass 2 (estimated in-memory bytes)."""
        return self.total // 16

    @property
    def row_group(self) -> int:
        """Rows buffered before they are written as one Parquet row group."""
        return min(128 << 20, self.total // 16)

    @property
    def spill_buffer(self) -> int:
        """Canonical rows buffered in pass 1 before the largest partitions' buffers are written."""
        return self.total // 16

    @property
    def input_batch(self) -> int:
        """One raw record batch (rows x estimated row bytes)."""
        return self.total // 32

    @property
    def csv_block(self) -> int:
        """CSV text per read; pyarrow's streaming CSV reader holds about 32 of them (measured)."""
        return int(min(16 << 20, max(64 << 10, self.total // 512)))


@dataclass(frozen=True)
class BuildReport:
    """What a build wrote and what it dropped. ``bytes``: Parquet bytes on disk; ``arrow_bytes``: the same
    rows decoded in memory (Arrow buffers), what a loader holds."""

    out: str
    layout: str
    rows: int
    bytes: int
    arrow_bytes: int
    files: int
    tokens_h: int
    tokens_r: int
    tokens_t: int
    exposures: dict[str, int]
    events_read: int
    exposures_read: int
    unmatched_actions: int
    events_without_samples: int
    skipped: dict[str, int] = field(default_factory=dict)
    partitions: int = 1
    memory_mb: int = 0
    spill_bytes: int = 0
    seconds: float = 0.0
    with_oracle: bool = False

    @property
    def tokens(self) -> int:
        return self.tokens_h + self.tokens_r + self.tokens_t

    def format(self) -> str:
        lines = [
            f"built {self.rows:,} {self.layout}-layout rows into {self.out} "
            f"({self.files} file(s), {self.bytes / 2**20:,.1f} MiB on disk, {self.arrow_bytes / 2**20:,.1f} MiB in memory, "
            f"{self.seconds:.1f} s)",
            f"  tokens: {self.tokens:,} = H {self.tokens_h:,} + R {self.tokens_r:,} + T {self.tokens_t:,}"
            + (f"  ({self.tokens / self.rows:.1f} per row)" if self.rows else ""),
            "  exposures: " + ", ".join(f"{s} {n:,}" for s, n in self.exposures.items()),
            f"  read: {self.events_read:,} events, {self.exposures_read:,} exposures; "
            f"{self.unmatched_actions:,} events of no sequence ignored, "
            f"{self.events_without_samples:,} events of users without exposures",
            f"  streaming: {self.partitions} partition(s), memory budget {self.memory_mb} MB, "
            f"spilled {self.spill_bytes / 2**20:,.1f} MiB",
        ]
        if self.skipped:
            lines.append(f"  skipped rows ({sum(self.skipped.values()):,}):")
            lines += [f"    {n:,}  {reason}" for reason, n in sorted(self.skipped.items())]
        return "\n".join(lines)


def _width(f: FeatureSpec) -> int:
    if f.type is FeatureType.DENSE:
        return 8 + 4 * (f.length or 16)
    return 4 if f.type is FeatureType.NUMERIC else 8


def _row_bytes(world: WorldSpec) -> tuple[int, int]:
    """In-memory bytes of one canonical event row and of the widest canonical exposure row."""
    ev = 18 + sum(_width(f) for f in world.event_fields())
    ex = max((24 + sum(_width(f) for f in s.features) + 12 * len(s.labels) for s in world.scenarios), default=24)
    return ev, ex


def _resolve_world(world: WorldSpec | str | Path | None) -> WorldSpec:
    if isinstance(world, WorldSpec):
        return world
    from recfm.scenarios import loader  # the YAML edge; imported only when a path (or None) is given

    return loader.load_world(world)


def _chunks(sizes: np.ndarray, limit: float) -> list[tuple[int, int]]:
    """Consecutive [lo, hi) ranges of rows whose ``sizes`` add up to about ``limit`` (at least one row each)."""
    if len(sizes) == 0:
        return []
    cum = np.cumsum(sizes)
    cuts = np.searchsorted(cum, np.arange(limit, cum[-1], limit), side="right")
    bounds = np.unique(np.concatenate([[0], cuts, [len(sizes)]]))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


class _PartWriter:
    """``part-00000.parquet``, ... row group by row group; a new file past ``file_bytes`` (in memory terms)."""

    def __init__(self, out: Path, schema: pa.Schema, row_group_bytes: int, file_bytes: int):
        self.out, self.schema = out, schema
        self.row_group_bytes, self.file_bytes = row_group_bytes, file_bytes
        self.pending: list[pa.Table] = []
        self.pending_bytes = 0
        self.writer: pq.ParquetWriter | None = None
        self.in_file = 0
        self.paths: list[Path] = []
        self.arrow_bytes = 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_bytes += table.nbytes
        self.arrow_bytes += table.nbytes
        if self.pending_bytes >= self.row_group_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        table = pa.concat_tables(self.pending)
        self.pending, self.pending_bytes = [], 0
        if self.writer is None:
            self.paths.append(self.out / f"part-{len(self.paths):05d}.parquet")
            self.writer = pq.ParquetWriter(self.paths[-1], self.schema, compression="zstd")
            self.in_file = 0
        self.writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self.in_file += table.nbytes
        if self.in_file >= self.file_bytes:
            self.writer.close()
            self.writer = None

    def close(self) -> list[Path]:
        self._flush()
        if self.writer is not None:
            self.writer.close()
        if not self.paths:  # no sample at all: one empty file keeps the folder readable
            self.paths.append(self.out / "part-00000.parquet")
            pq.write_table(self.schema.empty_table(), self.paths[-1])
        return self.paths


def _check_args(layout: str, memory_mb: int, on_bad_row: str) -> None:
    problems = []
    if layout not in LAYOUTS:
        problems.append(f"layout: must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not isinstance(memory_mb, int) or memory_mb < 8:
        problems.append(f"memory_mb: must be an integer >= 8, got {memory_mb!r}")
    if on_bad_row not in ("error", "skip"):
        problems.append(f"on_bad_row: must be 'error' or 'skip', got {on_bad_row!r}")
    if problems:
        raise ConfigError(problems)


def _with_oracle(world: WorldSpec, files: list[LogFile]) -> bool:
    names = {S.oracle_column(label.name) for s in world.scenarios for label in s.labels}
    return any(f.has(c) for f in files for c in names)


def _exposure_columns(world: WorldSpec) -> list[str]:
    cols = [S.USER, S.TIMESTAMP, S.SCENARIO, S.EXPOSURE_ID]
    for s in world.scenarios:
        cols += [f.raw_column for f in s.features] + [label.raw_column for label in s.labels]
        cols += [S.oracle_column(label.name) for label in s.labels]
    return list(dict.fromkeys(cols))


def _prepare_out(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("part-*.parquet"), out / REPORT, out / _OLD_REPORT]:
        old.unlink(missing_ok=True)
    tmp = out / TMP_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def build_samples(
    world: WorldSpec | str | Path | None,
    events: str | Path,
    exposures: str | Path,
    out: str | Path,
    layout: str = "user",
    memory_mb: int = 1024,
    on_bad_row: str = "error",
    *,
    progress: bool = True,
    partitions: int | None = None,
) -> BuildReport:
    """Build samples from raw logs into ``out`` (see the module docstring); returns the report it also
    writes to ``<out>/_build_report.json``.

    ``partitions`` forces the number of user-range partitions (default: derived from the input size and
    ``memory_mb``); the samples do not depend on it, only how the work is split."""
    _check_args(layout, memory_mb, on_bad_row)
    start_time = time.perf_counter()
    world = _resolve_world(world)
    skip = on_bad_row == "skip"
    ev_files, ex_files = open_log(events, "events"), open_log(exposures, "exposures")
    with_oracle = _with_oracle(world, ex_files)
    budget = Budget(memory_mb << 20)
    ev_w, ex_w = _row_bytes(world)
    batch_rows = int(min(1 << 20, max(1024, budget.input_batch // max(ev_w, ex_w, 64))))
    block_bytes = budget.csv_block
    read = dict(batch_rows=batch_rows, block_bytes=block_bytes)

    with tqdm(desc="build: scan", unit=" rows", disable=not progress) as bar:
        scanned = scan(world, ev_files, ex_files, skip=skip, progress=bar, **read)
    need = scanned.event_rows * (ev_w + _EVENT_OVERHEAD) + scanned.exposure_rows * (ex_w + _EXPOSURE_OVERHEAD)
    parts = partitions or int(min(4096, max(1, math.ceil(need / budget.partition))))
    bounds = scanned.users.bounds(parts)
    parts = len(bounds) + 1

    out = Path(out)
    tmp = _prepare_out(out)
    C = len(world.scenarios)
    schemas = {"events": event_spill_schema(world), "ids": IDS_SCHEMA}
    schemas.update({f"t{c}": target_spill_schema(world, c, with_oracle) for c in range(C)})
    spill = Spill(tmp, schemas, parts, budget.spill_buffer)
    skipped: Counter = Counter()
    unmatched = 0
    try:
        actions = ActionMap.of(world)
        with tqdm(total=scanned.event_rows + scanned.exposure_rows, desc="build: spill", unit=" rows", disable=not progress) as bar:
            for i, f in enumerate(ev_files):
                malformed = MalformedRows(skip)
                cols = [S.USER, S.TIMESTAMP, S.ACTION] + [g.raw_column for g in world.event_fields()]
                for raw in iter_batches(f, i, cols, malformed=malformed, **read):
                    table, n_unmatched = prepare_events(raw, world, actions, RowCheck(raw, "events", skip, skipped))
                    unmatched += n_unmatched
                    spill.add("events", partition_of(table.column(S.USER).to_numpy(), bounds), table)
                    bar.update(raw.batch.num_rows)
                skipped["events: malformed CSV row"] += malformed.count
            id0 = 0
            for i, f in enumerate(ex_files):
                malformed = MalformedRows(skip)
                for raw in iter_batches(f, i, _exposure_columns(world), malformed=malformed, **read):
                    rows = prepare_exposures(raw, world, with_oracle, id0, RowCheck(raw, "exposures", skip, skipped))
                    id0 += raw.batch.num_rows
                    for c, table in rows.tables.items():
                        spill.add(f"t{c}", partition_of(table.column(S.USER).to_numpy(), bounds), table)
                    if rows.ids is not None:
                        ids = pa.table([rows.ids, np.full(len(rows.ids), i, np.int32), rows.rows], schema=IDS_SCHEMA)
                        spill.add("ids", id_partition(rows.ids, parts), ids)
                    bar.update(raw.batch.num_rows)
                skipped["exposures: malformed CSV row"] += malformed.count
        spill.close()
        duplicate_ids(spill, ex_files)

        schema = S.sample_schema(world, with_oracle)
        writer = _PartWriter(out, schema, budget.row_group, max(256 << 20, budget.total))
        tokens = np.zeros(3, dtype=np.int64)
        per_scenario = np.zeros(C, dtype=np.int64)
        rows_out = unused = 0
        for p in tqdm(range(parts), desc="build: samples", unit=" part", disable=not progress):
            samples = PartitionSamples(
                world, spill.read("events", p), [spill.read(f"t{c}", p) for c in range(C)], layout, with_oracle
            )
            spill.remove(p)
            for lo, hi in _chunks(samples.token_bytes(), budget.chunk):
                writer.add(samples.table(lo, hi))
            h, r, t = samples.plan.lengths()
            tokens += [h.sum(), r.sum(), t.sum()]
            per_scenario += (samples.plan.t_end - samples.plan.t_start).sum(0)
            rows_out += samples.num_rows
            unused += samples.unused_events
            del samples
            pa.default_memory_pool().release_unused()  # the pool would otherwise keep each partition's peak
        paths = writer.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    report = BuildReport(
        out=str(out),
        layout=layout,
        rows=rows_out,
        bytes=sum(p.stat().st_size for p in paths),
        arrow_bytes=writer.arrow_bytes,
        files=len(paths),
        tokens_h=int(tokens[0]),
        tokens_r=int(tokens[1]),
        tokens_t=int(tokens[2]),
        exposures={s.name: int(n) for s, n in zip(world.scenarios, per_scenario)},
        events_read=scanned.event_rows,
        exposures_read=scanned.exposure_rows,
        unmatched_actions=unmatched,
        events_without_samples=unused,
        skipped={k: v for k, v in sorted(skipped.items()) if v},
        partitions=parts,
        memory_mb=memory_mb,
        spill_bytes=spill.bytes_written,
        seconds=round(time.perf_counter() - start_time, 3),
        with_oracle=with_oracle,
    )
    (out / REPORT).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report

"""Passes 0 and 1 of the streaming build: scan the logs, then spill canonical rows into user-range partitions.

Pass 0 (:func:`scan`) reads only ``user_id``, ``timestamp`` (and ``scenario``) of both logs. It checks every
file's columns, fails early on null users/timestamps, malformed CSV rows and unknown scenarios (naming each unknown value
with its count in the file and its first row), counts rows, and keeps an evenly strided sample of user ids
(at most ``SAMPLE_CAP``). Its quantiles give the partition boundaries: partition ``p`` holds the users
``bounds[p-1] <= user < bounds[p]``, so concatenating partitions in order keeps rows sorted by user, and
every partition holds about the same number of rows (a single heavy user cannot be split).

Pass 1 (:class:`Spill`) writes each partition's canonical rows as Arrow IPC stream files (LZ4) under the
temporary folder: ``p00012/events-000034.arrow``, ``p00012/t1-000035.arrow`` ... Rows wait in memory until
``buffer_bytes`` are buffered; then the largest buffers are written out. Files of one stream are read back
in write order, so rows of a partition keep the order of the input (ties in time are broken by it).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from recfm.errors import DataError
from recfm.foundation.data import schema as S
from recfm.foundation.data.build_convert import to_id, to_timestamp
from recfm.foundation.data.build_rows import RowCheck, scenario_index
from recfm.foundation.data.io import LogFile, MalformedRows, iter_batches, require_columns
from recfm.scenarios.spec import WorldSpec

SAMPLE_CAP = 1 << 18


@dataclass
class UserSample:
    """Every ``stride``-th row's user id over the stream of both logs (stride doubles to stay under the cap)."""

    stride: int = 1
    seen: int = 0
    values: list[np.ndarray] = field(default_factory=list)
    size: int = 0

    def add(self, users: np.ndarray) -> None:
        first = (-self.seen) % self.stride
        self.values.append(users[first :: self.stride].copy())
        self.size += len(self.values[-1])
        self.seen += len(users)
        while self.size > SAMPLE_CAP:
            merged = np.concatenate(self.values)
            self.values, self.stride = [merged[::2]], self.stride * 2
            self.size = len(self.values[0])

    def bounds(self, parts: int) -> np.ndarray:
        """Up to ``parts - 1`` increasing user ids splitting the sample into equal-count ranges."""
        if parts <= 1 or self.size == 0:
            return np.empty(0, dtype=np.int64)
        users = np.sort(np.concatenate(self.values))
        cut = users[(np.arange(1, parts) * len(users)) // parts]
        return np.unique(cut)


@dataclass
class ScanResult:
    event_rows: int = 0
    exposure_rows: int = 0
    users: UserSample = field(default_factory=UserSample)


def scan(
    world: WorldSpec,
    events: list[LogFile],
    exposures: list[LogFile],
    *,
    skip: bool,
    batch_rows: int,
    block_bytes: int,
    progress,
) -> ScanResult:
    """Pass 0 over both logs (see the module docstring)."""
    result = ScanResult()
    for f in events:
        require_columns(f, [S.USER, S.TIMESTAMP, S.ACTION], "events")
    for f in exposures:
        require_columns(f, [S.USER, S.TIMESTAMP, S.SCENARIO], "exposures")
    if len({f.has(S.EXPOSURE_ID) for f in exposures}) > 1:
        with_ids = [str(f.path) for f in exposures if f.has(S.EXPOSURE_ID)][:3]
        raise DataError(
            f"exposure files disagree on column {S.EXPOSURE_ID!r}: it must be in all files or in none "
            f"(present in: {', '.join(with_ids)} ...)"
        )
    for role, files in (("events", events), ("exposures", exposures)):
        for i, f in enumerate(files):
            cols = [S.USER, S.TIMESTAMP] + ([S.SCENARIO] if role == "exposures" else [])
            unknown: Counter = Counter()
            first_unknown: dict[str, str] = {}
            for raw in iter_batches(f, i, cols, batch_rows=batch_rows, block_bytes=block_bytes, malformed=MalformedRows(skip)):
                check = RowCheck(raw, role, skip, Counter())
                user = check.required(S.USER, to_id, raw.batch.column(S.USER))
                check.required(S.TIMESTAMP, to_timestamp, raw.batch.column(S.TIMESTAMP))
                if role == "exposures":
                    col = raw.batch.column(S.SCENARIO)
                    bad = np.flatnonzero(scenario_index(world, col) < 0)
                    for j in bad:
                        name = str(col[int(j)].as_py())
                        unknown[name] += 1
                        first_unknown.setdefault(name, raw.where(int(j)))
                    result.exposure_rows += raw.batch.num_rows
                else:
                    result.event_rows += raw.batch.num_rows
                result.users.add(user[~check.drop])
                progress.update(raw.batch.num_rows)
            if unknown and not skip:
                listed = "; ".join(f"{v!r}: {n} rows, first at {first_unknown[v]}" for v, n in unknown.most_common(10))
                raise DataError(
                    f"{f.path}: column {S.SCENARIO!r}: unknown scenario value(s) {listed} "
                    f"(known: {', '.join(world.scenario_names)}; pass on_bad_row='skip' to drop them)"
                )
    return result


def partition_of(users: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """``[n]`` partition index of each user id."""
    return np.searchsorted(bounds, users, side="right")


class Spill:
    """Buffered writer of canonical rows into per-partition Arrow IPC files (see the module docstring)."""

    def __init__(self, folder: Path, schemas: dict[str, pa.Schema], parts: int, buffer_bytes: int):
        self.folder, self.schemas, self.parts, self.buffer_bytes = folder, schemas, parts, buffer_bytes
        self.pending: dict[tuple[str, int], list[pa.Table]] = {}
        self.pending_bytes: Counter = Counter()
        self.files: dict[tuple[str, int], list[Path]] = {}
        self.seq = 0
        self.bytes_written = 0
        self.options = pa.ipc.IpcWriteOptions(compression="lz4" if pa.Codec.is_available("lz4") else None)

    def add(self, stream: str, part: np.ndarray, table: pa.Table) -> None:
        """Append ``table``'s rows, row ``i`` to partition ``part[i]``."""
        if table.num_rows == 0:
            return
        order = np.argsort(part, kind="stable")
        counts = np.bincount(part, minlength=self.parts)
        start = 0
        for p in np.flatnonzero(counts):
            # a take per partition, not slices of one sorted copy: a slice would keep the whole batch alive
            piece = table.take(pa.array(order[start : start + int(counts[p])]))
            start += int(counts[p])
            self.pending.setdefault((stream, int(p)), []).append(piece)
            self.pending_bytes[(stream, int(p))] += piece.nbytes
        if sum(self.pending_bytes.values()) > self.buffer_bytes:
            self._flush(self.buffer_bytes // 2)

    def _flush(self, keep_bytes: int) -> None:
        total = sum(self.pending_bytes.values())
        for key, nbytes in self.pending_bytes.most_common():
            if total <= keep_bytes:
                break
            self._write(key)
            total -= nbytes
        pa.default_memory_pool().release_unused()  # return freed buffers instead of caching them

    def _write(self, key: tuple[str, int]) -> None:
        tables = self.pending.pop(key, [])
        self.pending_bytes.pop(key, None)
        if not tables:
            return
        stream, part = key
        path = self.folder / f"p{part:05d}" / f"{stream}-{self.seq:06d}.arrow"
        self.seq += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.concat_tables(tables).combine_chunks()
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, self.schemas[stream], options=self.options) as w:
            w.write_table(table)
        self.bytes_written += path.stat().st_size
        self.files.setdefault(key, []).append(path)

    def close(self) -> None:
        self._flush(0)

    def read(self, stream: str, part: int) -> pa.Table:
        """All rows of one stream of one partition, in input order (an empty table when there are none)."""
        tables = []
        for path in self.files.get((stream, part), []):
            with pa.OSFile(str(path), "rb") as source:
                tables.append(pa.ipc.open_stream(source).read_all())
        if not tables:
            return self.schemas[stream].empty_table()
        return pa.concat_tables(tables).combine_chunks()

    def remove(self, part: int, stream: str | None = None) -> None:
        """Delete a partition's files (of one stream, or all) once used (keeps the temporary folder small)."""
        for key in [k for k in self.files if k[1] == part and stream in (None, k[0])]:
            for path in self.files.pop(key):
                path.unlink(missing_ok=True)


def duplicate_ids(spill: Spill, files: list[LogFile]) -> None:
    """Raise when two kept exposures share an ``exposure_id`` (the ``ids`` stream, partitioned by id)."""
    for p in range(spill.parts):
        t = spill.read("ids", p)
        if t.num_rows == 0:
            continue
        ids = t.column("exposure_id").to_numpy()
        order = np.argsort(ids, kind="stable")
        dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
        if len(dup):
            a, b = order[dup[0]], order[dup[0] + 1]
            fa, fb = (files[int(t.column("file")[int(i)].as_py())] for i in (a, b))
            ra, rb = (int(t.column("row")[int(i)].as_py()) for i in (a, b))
            raise DataError(
                f"duplicated exposure_id {int(ids[a])}: {fa.path}: {fa.where(ra)} and {fb.path}: {fb.where(rb)} "
                f"({len(dup)} duplicate(s) in this id range)"
            )
        spill.remove(p, "ids")


IDS_SCHEMA = pa.schema([("exposure_id", pa.int64()), ("file", pa.int32()), ("row", pa.int64())])


def id_partition(ids: np.ndarray, parts: int) -> np.ndarray:
    """Partition of each exposure id for the duplicate check (a multiplicative hash, so runs of ids spread)."""
    mixed = ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((mixed >> np.uint64(33)) % np.uint64(parts)).astype(np.int64)

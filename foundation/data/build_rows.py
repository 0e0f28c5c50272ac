"""One raw batch -> canonical event / exposure rows, with every bad row raised or counted.

Canonical rows are what pass 1 spills and pass 2 assembles samples from:

    events      user_id:int64  ts:int64  kind:int16  <event fields, sample types>      (event_struct + user)
    t_<s>       user_id:int64  exposure_id:int64  ts:int64  <features of s>  <labels>  [p_<label>]

A *bad row* (null user or timestamp, a value that does not convert, an unknown scenario, a binary label not
0/1, a dense vector of the wrong length) raises :class:`~recfm.errors.DataError` naming the file, row and
column, or with ``on_bad_row="skip"`` is dropped and counted under its first reason. Events whose action
matches no sequence are not bad: they are dropped and counted apart (``unmatched_actions``). A column a row
needs but the file lacks is always an error.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recfm.errors import DataError
from recfm.foundation.data import schema as S
from recfm.foundation.data.build_convert import Unsupported, convert_feature, convert_label, to_float, to_id, to_timestamp
from recfm.foundation.data.io import RawBatch, require_columns
from recfm.scenarios.spec import WorldSpec


def event_spill_schema(world: WorldSpec) -> pa.Schema:
    return pa.schema([pa.field(S.USER, pa.int64(), nullable=False), *S.event_struct(world)])


def target_spill_schema(world: WorldSpec, scenario: int, with_oracle: bool) -> pa.Schema:
    struct = S.target_struct(world.scenarios[scenario], with_oracle)
    return pa.schema([pa.field(S.USER, pa.int64(), nullable=False), *struct])


class RowCheck:
    """Bad rows of one raw batch: raise on the first (``skip=False``) or drop and count them."""

    def __init__(self, raw: RawBatch, role: str, skip: bool, counts: Counter):
        self.raw, self.role, self.skip, self.counts = raw, role, skip, counts
        self.drop = np.zeros(raw.batch.num_rows, dtype=bool)

    def flag(self, column: str, bad, reason: str, values: pa.Array, rows: np.ndarray | None = None) -> None:
        """``bad``: ``[len(values)]`` mask; ``rows`` maps its positions to batch rows (identity if None)."""
        if bad is None or not bad.any():
            return
        where = np.flatnonzero(bad)
        batch_rows = where if rows is None else rows[where]
        if not self.skip:
            i = int(np.argmin(batch_rows))
            value = values[int(where[i])].as_py() if len(values) else None
            raise DataError(
                f"{self.raw.file.path}: {self.raw.where(int(batch_rows[i]))}: column {column!r}: {reason}"
                + ("" if value is None else f" (value {value!r})")
            )
        new = ~self.drop[batch_rows]
        self.counts[f"{self.role}: {column}: {reason}"] += int(new.sum())
        self.drop[batch_rows] = True

    def convert(self, column: str, fn, arr: pa.Array, *args, rows: np.ndarray | None = None) -> pa.Array:
        try:
            values, bad, reason = fn(arr, *args)
        except Unsupported as e:
            raise DataError(f"{self.raw.file.path}: column {column!r}: {e}") from e
        self.flag(column, bad, reason, arr, rows)
        return values

    def required(self, column: str, fn, arr: pa.Array) -> np.ndarray:
        """Convert a column every row needs (user, timestamp); nulls are bad rows. Returns numpy int64."""
        values = self.convert(column, fn, arr)
        self.flag(column, np.asarray(values.is_null().to_numpy(zero_copy_only=False)) & ~self.drop, "null", arr)
        return np.asarray(values.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)


def _column(raw: RawBatch, name: str, role: str, why: str) -> pa.Array:
    require_columns(raw.file, [name], role, why)
    return raw.batch.column(name)


@dataclass(frozen=True)
class ActionMap:
    """Action string -> sequence kind (first sequence listing it wins)."""

    actions: pa.Array
    kinds: np.ndarray

    @staticmethod
    def of(world: WorldSpec) -> "ActionMap":
        seen: dict[str, int] = {}
        for k, seq in enumerate(world.sequences):
            for a in seq.actions:
                seen.setdefault(a, k)
        return ActionMap(pa.array(list(seen), pa.string()), np.array(list(seen.values()) + [-1], dtype=np.int16))

    def kind(self, action: pa.Array) -> np.ndarray:
        """``[n]`` int16 kind, -1 for actions of no sequence (and null actions)."""
        idx = pc.index_in(action.cast(pa.string()), value_set=self.actions)
        return self.kinds[np.asarray(idx.fill_null(-1).to_numpy(zero_copy_only=False))]


def prepare_events(raw: RawBatch, world: WorldSpec, actions: ActionMap, check: RowCheck) -> tuple[pa.Table, int]:
    """Canonical event rows of one raw batch and the number of rows whose action matched no sequence."""
    b = raw.batch
    user = check.required(S.USER, to_id, b.column(S.USER))
    ts = check.required(S.TIMESTAMP, to_timestamp, b.column(S.TIMESTAMP))
    kind = actions.kind(_decode_action(b.column(S.ACTION)))
    matched = kind >= 0
    cols = [pa.array(user), pa.array(ts), pa.array(kind)]
    for f in world.event_fields():
        declared = np.array([k for k, s in enumerate(world.sequences) if any(g.name == f.name for g in s.fields)])
        own = np.isin(kind, declared) & matched
        if not raw.file.has(f.raw_column):
            if own.any():
                seq = world.sequences[int(kind[own][0])].name
                _column(raw, f.raw_column, "events", f"by field {f.name!r} of sequence {seq!r}")
            cols.append(pa.nulls(len(kind), S.arrow_type(f)))
            continue
        rows = np.flatnonzero(own)
        arr = b.column(f.raw_column).take(pa.array(rows, pa.int64()))
        values = check.convert(f.raw_column, convert_feature, arr, f, rows=rows)
        cols.append(_scatter(values, rows, len(kind)))
    keep = matched & ~check.drop
    table = pa.Table.from_arrays(cols, schema=event_spill_schema(world)).filter(pa.array(keep))
    return table, int((~matched & ~check.drop).sum())


def _decode_action(arr: pa.Array) -> pa.Array:
    return arr.dictionary_decode() if pa.types.is_dictionary(arr.type) else arr


def _scatter(values: pa.Array, rows: np.ndarray, n: int) -> pa.Array:
    """``values`` placed at ``rows`` of a length-``n`` array, null elsewhere."""
    if len(rows) == n:
        return values
    idx = np.full(n, -1, dtype=np.int64)
    idx[rows] = np.arange(len(rows))
    return values.take(pa.array(idx, mask=idx < 0))


def scenario_index(world: WorldSpec, arr: pa.Array) -> np.ndarray:
    """``[n]`` int64 index of each row's scenario in the world, -1 when unknown or null."""
    arr = arr.dictionary_decode() if pa.types.is_dictionary(arr.type) else arr
    idx = pc.index_in(arr.cast(pa.string()), value_set=pa.array(world.scenario_names, pa.string()))
    return np.asarray(idx.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)


@dataclass
class ExposureRows:
    """Canonical exposure rows of one raw batch: one table per scenario index, and (when the log has ids)
    ``[m]`` ids with their ``[m]`` row numbers in the file, for the duplicate check."""

    tables: dict[int, pa.Table]
    ids: np.ndarray | None
    rows: np.ndarray | None


def prepare_exposures(
    raw: RawBatch, world: WorldSpec, with_oracle: bool, id0: int, check: RowCheck
) -> ExposureRows:
    """``id0``: exposure id of this batch's first row when the log has no ``exposure_id`` column."""
    b = raw.batch
    n = b.num_rows
    user = check.required(S.USER, to_id, b.column(S.USER))
    ts = check.required(S.TIMESTAMP, to_timestamp, b.column(S.TIMESTAMP))
    scen = scenario_index(world, b.column(S.SCENARIO))
    check.flag(S.SCENARIO, scen < 0, "unknown scenario", b.column(S.SCENARIO))
    given = raw.file.has(S.EXPOSURE_ID)
    eid = check.required(S.EXPOSURE_ID, to_id, b.column(S.EXPOSURE_ID)) if given else id0 + np.arange(n)
    converted: dict[int, tuple[np.ndarray, list[pa.Array]]] = {}
    for s_idx, spec in enumerate(world.scenarios):
        rows = np.flatnonzero(scen == s_idx)
        if len(rows) == 0:
            continue
        take = pa.array(rows, pa.int64())
        why = f"by scenario {spec.name!r}"
        cols = []
        for f in spec.features:
            arr = _column(raw, f.raw_column, "exposures", f"{why}, feature {f.name!r}").take(take)
            cols.append(check.convert(f.raw_column, convert_feature, arr, f, rows=rows))
        for label in spec.labels:
            arr = _column(raw, label.raw_column, "exposures", f"{why}, label {label.name!r}").take(take)
            cols.append(check.convert(label.raw_column, convert_label, arr, label, rows=rows))
        if with_oracle:
            for label in spec.labels:
                name = S.oracle_column(label.name)
                arr = _column(raw, name, "exposures", f"{why} (oracle of label {label.name!r})").take(take)
                cols.append(check.convert(name, to_float, arr, pa.float64(), rows=rows))
        converted[s_idx] = (rows, cols)
    tables = {}
    for s_idx, (rows, cols) in converted.items():
        keep = ~check.drop[rows]
        base = [pa.array(user[rows]), pa.array(eid[rows]), pa.array(ts[rows])]
        t = pa.Table.from_arrays(base + cols, schema=target_spill_schema(world, s_idx, with_oracle))
        tables[s_idx] = t.filter(pa.array(keep)) if not keep.all() else t
    kept = ~check.drop
    return ExposureRows(tables, eid[kept] if given else None, (raw.row0 + np.flatnonzero(kept)) if given else None)

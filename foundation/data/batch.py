"""The typed jagged batch every model in recfm consumes.

A batch concatenates the tokens of B samples into one flat sequence of N tokens, without padding::

    sample:     |------- 0 -------|---- 1 ----|-------- 2 --------|
    tokens:      H H H H R R T T T  H H R T T  H H H H H R R R T T
    offsets:     0                 9          14                 25      [B+1] int64
    token_type:  0 0 0 0 1 1 2 2 2  0 0 1 2 2  0 0 0 0 0 1 1 1 2 2       [N] int8  (TokenType)
    timestamps:  ...                                                     [N] int64 (unix seconds)
    group:       k k k k K K K+1+s ...                                   [N] int64 (Group LayerNorm group)

Within a sample: H tokens in time order, then R in time order, then T grouped by scenario in registry order,
time order within a scenario. ``group`` is the token's Group-LayerNorm group: ``kind`` (0..K-1) for an H
token of sequence kind ``kind``, ``K`` for every R token, ``K + 1 + s`` for a T token of scenario ``s``
(K = number of sequence kinds, s = index in the batch's ``scenarios``).

Features live in *token groups*, one per sequence kind (H and R tokens of that kind) and one per scenario
(its T tokens). A group knows which rows of the flat sequence it fills (``token_index``) and holds its
features already encoded: categorical ids mapped to table rows (hashing, identity range check and vocabulary
files applied while collating), numerics transformed. Sparse ids are a torchrec ``KeyedJaggedTensor`` with
one value per token and key (the table a key reads is the feature's ``table``)::

    KeyedJaggedTensor  keys = [item_id, category]   n = 3 tokens in the group
    values   = [i0 i1 i2 | c0 c1 c2]                 [n * n_keys]
    lengths  = [1  1  1  | 1  1  1 ]                 [n * n_keys]

The model writes token embeddings ``x[group.token_index] = MLP_group(features)`` into ``x: [N, d_model]``.

Building a batch (:func:`collate`, :class:`Collator`) from sample rows (``recfm.foundation.data.schema``):

* ``scenarios`` is the model's scenario registry; ``t_<s>`` columns of other scenarios are ignored (their
  exposures are dropped), a listed scenario without a column counts as having no exposures.
* H and R events and T exposures are ordered by ``ts`` within each sample (stable: the file order breaks
  ties); an event's ``kind`` picks its sequence kind, whose declared fields alone are read.
* Token groups exist only for sequence kinds and scenarios with at least one token in the batch, and list
  their tokens in flat-sequence order (``token_index`` is increasing).
* Rows are kept or dropped by :class:`Drop`: ``NONE`` keeps every row (a sample may then have 0 tokens),
  ``EMPTY`` drops rows without tokens, ``NO_TARGETS`` (the loader's default for training and evaluation)
  drops rows without exposures of the listed scenarios.
* Labels become float32 (a null label, or a binary label other than 0/1, is a :class:`DataError`); oracle
  probabilities ``p_<label>`` are read when the exposure struct has them. Feature encoding is
  :mod:`recfm.foundation.data.encode`; bad values raise :class:`DataError` naming the scenario or sequence,
  the feature, the value and the sample row.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from recfm.errors import ConfigError, DataError
from recfm.foundation.data import schema as S
from recfm.foundation.data.encode import EncodedGroup, GroupEncoder
from recfm.scenarios.spec import LabelType, TokenType, WorldSpec

try:  # torchrec is required for training; the data layer can be inspected without it
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
except ImportError:  # pragma: no cover - exercised only on installs without torchrec
    KeyedJaggedTensor = None  # type: ignore[assignment,misc]


@dataclass
class TokenGroup:
    """The tokens of one sequence kind (H and R) or one scenario (T) in a batch.

    Attributes:
        name: sequence kind or scenario name.
        token_index: ``[n]`` int64, rows of the batch's flat token sequence these tokens occupy.
        sparse: ``KeyedJaggedTensor`` of embedded features (categoricals and bucketised numerics), one value
            per token and key, values already table rows; ``None`` when the group has none. Built with host-side
            ``stride``/``length_per_key``/``offset_per_key``, so reading it needs no device synchronisation.
        numeric: ``[n, n_numeric]`` float32, transformed numeric features (``numeric_names`` order).
        dense: ``[n, sum of dense lengths]`` float32 dense-vector features concatenated (``dense_names``).
    """

    name: str
    token_index: torch.Tensor
    sparse: "KeyedJaggedTensor | None"
    numeric: torch.Tensor
    dense: torch.Tensor
    numeric_names: tuple[str, ...] = ()
    dense_names: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return int(self.token_index.numel())


@dataclass
class TargetGroup(TokenGroup):
    """The T tokens (exposures) of one scenario, with what is needed to score and evaluate them.

    Attributes (beyond :class:`TokenGroup`):
        sample_index: ``[n]`` int64, which sample (0..B-1) each exposure belongs to.
        user_id: ``[n]`` int64, for per-user GAUC.
        exposure_id: ``[n]`` int64, stable id of the exposure in the raw log.
        labels: label name -> ``[n]`` float32.
        oracle: label name -> ``[n]`` float64 ground-truth probability (synthetic worlds only).
    """

    sample_index: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    user_id: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    exposure_id: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    oracle: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Batch:
    """B samples of jagged tokens (see the module docstring for the layout).

    Attributes:
        offsets: ``[B+1]`` int64 token offsets of each sample.
        token_type: ``[N]`` int8 :class:`~recfm.scenarios.spec.TokenType` of each token.
        timestamps: ``[N]`` int64 unix seconds of each token.
        group: ``[N]`` int64 Group-LayerNorm group of each token.
        user_id: ``[B]`` int64.
        events: sequence kind name -> its H and R tokens.
        targets: scenario name -> its T tokens (only scenarios with exposures in the batch).
        scenarios: scenario names in registry order (defines ``s`` in ``group``).
        sequences: sequence kind names in world order (defines ``kind`` in ``group``).
        max_len: longest sample, in tokens (a host int: never read back from the device).
        num_targets: total T tokens (host int).
    """

    offsets: torch.Tensor
    token_type: torch.Tensor
    timestamps: torch.Tensor
    group: torch.Tensor
    user_id: torch.Tensor
    events: dict[str, TokenGroup]
    targets: dict[str, TargetGroup]
    scenarios: tuple[str, ...]
    sequences: tuple[str, ...]
    max_len: int
    num_targets: int

    @property
    def num_samples(self) -> int:
        return int(self.offsets.numel()) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.token_type.numel())

    def to(self, device: torch.device | str, non_blocking: bool = False, merged: bool | None = None) -> "Batch":
        """A copy on ``device`` (tensors and KJTs moved; host ints kept).

        ``merged`` (default: when host tensors go to a CUDA device) packs every tensor into one page-locked
        host buffer and makes ONE transfer; the copy's tensors are views of one device buffer
        (:func:`recfm.foundation.data.device.merged_copy`). ``non_blocking=True`` then makes the transfer
        asynchronous on the current stream. ``merged=False``: one ``.to()`` per tensor.
        """
        if merged is None:
            merged = torch.device(device).type == "cuda" and self.offsets.device.type == "cpu"
        if merged:
            from recfm.foundation.data.device import merged_copy  # device.py imports this module

            return merged_copy(self, device, non_blocking=non_blocking)
        return self._map(
            lambda t: t.to(device, non_blocking=non_blocking),
            lambda kjt: kjt.to(torch.device(device), non_blocking=non_blocking),
        )

    def pin_memory(self) -> "Batch":
        """A copy with every tensor in page-locked host memory (needs CUDA), for ``to(..., non_blocking=True)``."""
        return self._map(lambda t: t.pin_memory(), lambda kjt: kjt.pin_memory())

    def _map(self, on_tensor: Callable, on_kjt: Callable) -> "Batch":
        def move(obj):
            if isinstance(obj, torch.Tensor):
                return on_tensor(obj)
            if KeyedJaggedTensor is not None and isinstance(obj, KeyedJaggedTensor):
                return on_kjt(obj)
            if isinstance(obj, dict):
                return {k: move(v) for k, v in obj.items()}
            if isinstance(obj, TokenGroup):
                return replace(obj, **{f.name: move(getattr(obj, f.name)) for f in fields(obj)})
            return obj

        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)})


class Drop(str, enum.Enum):
    """Which sample rows :func:`collate` (and the loader) drop."""

    NONE = "none"  # keep every row, even one without tokens
    EMPTY = "empty"  # drop rows without any token
    NO_TARGETS = "no_targets"  # drop rows without exposures of the listed scenarios


@dataclass(frozen=True)
class RowCounts:
    """Tokens per sample row: ``h``, ``r`` ``[B]`` and ``t`` ``[S, B]`` (listed scenarios, in order), int64."""

    h: np.ndarray
    r: np.ndarray
    t: np.ndarray

    @property
    def targets(self) -> np.ndarray:
        return self.t.sum(axis=0)

    @property
    def tokens(self) -> np.ndarray:
        return self.h + self.r + self.targets

    def keep(self, drop: Drop) -> np.ndarray:
        """``[B]`` bool: rows that ``drop`` keeps."""
        if drop is Drop.NO_TARGETS:
            return self.targets > 0
        if drop is Drop.EMPTY:
            return self.tokens > 0
        return np.ones(self.h.shape, dtype=bool)

    def take(self, rows: np.ndarray) -> "RowCounts":
        return RowCounts(self.h[rows], self.r[rows], self.t[:, rows])


def list_lengths(column: pa.Array | pa.ChunkedArray | None, num_rows: int) -> np.ndarray:
    """``[num_rows]`` int64 lengths of a list column (null list = 0; a missing column = all 0)."""
    if column is None:
        return np.zeros(num_rows, dtype=np.int64)
    return pc.fill_null(pc.list_value_length(column), 0).to_numpy().astype(np.int64)


def row_counts(table: pa.Table, scenarios: Sequence[str]) -> RowCounts:
    """Token counts of every row of a sample table (only the list lengths are read)."""

    def col(name):
        return table.column(name) if name in table.column_names else None

    n = table.num_rows
    t = [list_lengths(col(S.target_column(s)), n) for s in scenarios]
    return RowCounts(
        list_lengths(col(S.H), n),
        list_lengths(col(S.R), n),
        np.stack(t) if t else np.zeros((0, n), dtype=np.int64),
    )


def _tensor(x: np.ndarray) -> torch.Tensor:
    x = np.ascontiguousarray(x)
    return torch.from_numpy(x if x.flags.writeable else x.copy())


def _numpy(arr: pa.Array, what: str) -> np.ndarray:
    if arr.null_count:
        raise DataError(f"{what} has {arr.null_count} null value(s)")
    return arr.to_numpy(zero_copy_only=False)


def _field(values: pa.StructArray, name: str, what: str) -> pa.Array:
    if values.type.get_field_index(name) < 0:
        raise DataError(f"{what}: the sample column has no field {name!r}")
    return values.field(name)


@dataclass
class _Flat:
    """The elements of one list column ordered by (sample, ts): ``values`` ``[n]`` structs, ``sample`` ``[n]``
    (row in the batch), ``j`` ``[n]`` (rank within its sample), ``ts`` ``[n]``."""

    values: pa.StructArray
    sample: np.ndarray
    j: np.ndarray
    ts: np.ndarray

    def field(self, name: str, what: str) -> pa.Array:
        return _field(self.values, name, what)


def _flatten(column: pa.Array | None, counts: np.ndarray, what: str) -> _Flat | None:
    if column is None or counts.sum() == 0:
        return None
    values = column.flatten()
    if values.null_count:
        raise DataError(f"{what}: {values.null_count} null element(s) in the list column")
    b = counts.size
    sample = np.repeat(np.arange(b, dtype=np.int64), counts)
    starts = np.cumsum(counts) - counts
    j = np.arange(sample.size, dtype=np.int64) - np.repeat(starts, counts)
    ts = _numpy(_field(values, S.TS, what), f"{what}.ts").astype(np.int64)
    if ((np.diff(ts) < 0) & (sample[1:] == sample[:-1])).any():
        perm = np.lexsort((ts, sample))  # stable: equal timestamps keep their order
        values, ts = values.take(pa.array(perm)), ts[perm]
    return _Flat(values, sample, j, ts)


class Collator:
    """Turns sample rows into a :class:`Batch`; holds the feature encoders (vocabulary files read once).

    Args:
        world: the world the samples were built for.
        scenarios: the model's scenario names in registry order (default: all of ``world``'s).
        drop: which rows to drop (:class:`Drop`).
        with_labels: read labels (False for scoring data whose labels are null).
    """

    def __init__(
        self,
        world: WorldSpec,
        scenarios: Sequence[str] | None = None,
        drop: Drop = Drop.NONE,
        with_labels: bool = True,
    ):
        self.world = world
        self.scenarios = tuple(world.scenario_names if scenarios is None else scenarios)
        unknown = [s for s in self.scenarios if s not in world.scenario_names]
        dups = {s for s in self.scenarios if self.scenarios.count(s) > 1}
        if unknown or dups:
            known = ", ".join(world.scenario_names) or "none"
            raise ConfigError(
                [f"{world.source_file}: scenarios: unknown scenario {s!r} (known: {known})" for s in unknown]
                + [f"{world.source_file}: scenarios: {s!r} is listed twice" for s in sorted(dups)]
            )
        self.drop = Drop(drop)
        self.with_labels = with_labels
        self.sequences = tuple(seq.name for seq in world.sequences)
        self._events = [GroupEncoder(q.fields, f"sequence {q.name!r}", world.source_file) for q in world.sequences]
        self._targets = [
            GroupEncoder(world.scenario(s).features, f"scenario {s!r}", world.scenario(s).source_file)
            for s in self.scenarios
        ]

    def __call__(self, data: pa.Table | pa.RecordBatch, source: str = "") -> Batch:
        """Collate every (kept) row of ``data``; ``source`` (e.g. a file name) prefixes error messages."""
        table = data if isinstance(data, pa.Table) else pa.Table.from_batches([data])
        try:
            return self._collate(table)
        except DataError as e:
            if source:
                raise DataError(f"{source}: {e}") from e
            raise

    def _collate(self, table: pa.Table) -> Batch:
        counts = row_counts(table, self.scenarios)
        rows = np.arange(table.num_rows, dtype=np.int64)
        keep = counts.keep(self.drop)
        if not keep.all():
            rows = rows[keep]
            table, counts = table.take(pa.array(rows)), counts.take(rows)
        cols = {name: table.column(name).combine_chunks() for name in table.column_names}
        if S.USER not in cols:
            raise DataError(f"the sample table has no {S.USER!r} column")
        user = _numpy(cols[S.USER], S.USER).astype(np.int64)
        lengths = counts.tokens
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        n = int(offsets[-1])
        token_type = np.empty(n, dtype=np.int8)
        timestamps = np.empty(n, dtype=np.int64)
        group = np.empty(n, dtype=np.int64)
        k = len(self.sequences)

        events = self._collate_events(cols, counts, offsets, rows, token_type, timestamps, group)
        targets: dict[str, TargetGroup] = {}
        base = offsets[:-1] + counts.h + counts.r
        for s_index, (name, encoder) in enumerate(zip(self.scenarios, self._targets)):
            what = f"scenario {name!r} (column {S.target_column(name)!r})"
            flat = _flatten(cols.get(S.target_column(name)), counts.t[s_index], what)
            if flat is not None:
                pos = base[flat.sample] + flat.j
                token_type[pos], timestamps[pos], group[pos] = TokenType.T, flat.ts, k + 1 + s_index
                targets[name] = self._target_group(name, encoder, flat, pos, rows, user, what)
            base = base + counts.t[s_index]

        return Batch(
            offsets=_tensor(offsets),
            token_type=_tensor(token_type),
            timestamps=_tensor(timestamps),
            group=_tensor(group),
            user_id=_tensor(user),
            events=events,
            targets=targets,
            scenarios=self.scenarios,
            sequences=self.sequences,
            max_len=int(lengths.max()) if lengths.size else 0,
            num_targets=int(counts.targets.sum()),
        )

    def _collate_events(self, cols, counts, offsets, rows, token_type, timestamps, group) -> dict[str, TokenGroup]:
        k = len(self.sequences)
        parts = []
        for tt, name, n_col, base in (
            (TokenType.H, S.H, counts.h, offsets[:-1]),
            (TokenType.R, S.R, counts.r, offsets[:-1] + counts.h),
        ):
            flat = _flatten(cols.get(name), n_col, f"column {name!r}")
            if flat is None:
                continue
            kind = _numpy(flat.field(S.KIND, f"column {name!r}"), f"column {name!r}.kind").astype(np.int64)
            if ((kind < 0) | (kind >= k)).any():
                i = int(np.argmax((kind < 0) | (kind >= k)))
                raise DataError(
                    f"column {name!r}: event kind {int(kind[i])} at sample row {int(rows[flat.sample[i]])} is not "
                    f"a sequence index (world has {k}: {', '.join(self.sequences)})"
                )
            pos = base[flat.sample] + flat.j
            token_type[pos], timestamps[pos] = tt, flat.ts
            group[pos] = kind if tt is TokenType.H else k
            parts.append((flat, pos, kind))
        if not parts:
            return {}
        values = pa.concat_arrays([p[0].values for p in parts])
        pos = np.concatenate([p[1] for p in parts])
        kind = np.concatenate([p[2] for p in parts])
        sample = np.concatenate([p[0].sample for p in parts])
        events: dict[str, TokenGroup] = {}
        for kind_index, (name, encoder) in enumerate(zip(self.sequences, self._events)):
            idx = np.nonzero(kind == kind_index)[0]
            if idx.size == 0:
                continue
            idx = idx[np.argsort(pos[idx], kind="stable")]
            take = pa.array(idx)
            what = f"sequence {name!r}"

            def column(field_name, take=take, what=what):
                return _field(values, field_name, what).take(take)

            enc = encoder.encode(column, idx.size, rows[sample[idx]])
            events[name] = _token_group(TokenGroup, name, pos[idx], enc)
        return events

    def _target_group(self, name, encoder, flat, pos, rows, user, what) -> "TargetGroup":
        sample_rows = rows[flat.sample]
        enc = encoder.encode(lambda f: flat.field(f, what), pos.size, sample_rows)
        labels, oracle = {}, {}
        spec = self.world.scenario(name)
        for label in spec.labels if self.with_labels else ():
            arr = flat.field(label.name, what)
            if arr.null_count:
                i = int(np.argmax(~arr.is_valid().to_numpy(zero_copy_only=False)))
                raise DataError(f"{what} label {label.name!r}: null at sample row {int(sample_rows[i])}")
            y = arr.to_numpy(zero_copy_only=False).astype(np.float32)
            bad = ~np.isfinite(y) if label.type is LabelType.REGRESSION else (y != 0) & (y != 1)
            if bad.any():
                i = int(np.argmax(bad))
                raise DataError(
                    f"{what} label {label.name!r}: value {y[i]} at sample row {int(sample_rows[i])} is not "
                    f"{'finite' if label.type is LabelType.REGRESSION else '0 or 1'}"
                )
            labels[label.name] = _tensor(y)
        for label in spec.labels:
            oname = S.oracle_column(label.name)
            if flat.values.type.get_field_index(oname) >= 0:
                p = flat.values.field(oname).to_numpy(zero_copy_only=False).astype(np.float64)
                oracle[label.name] = _tensor(p)
        group = _token_group(TargetGroup, name, pos, enc)
        group.sample_index = _tensor(flat.sample)
        group.user_id = _tensor(user[flat.sample])
        group.exposure_id = _tensor(_numpy(flat.field(S.EXPOSURE_ID, what), f"{what}.exposure_id").astype(np.int64))
        group.labels, group.oracle = labels, oracle
        return group


def _token_group(cls, name: str, pos: np.ndarray, enc: EncodedGroup):
    n = int(pos.size)
    sparse = None
    if enc.sparse_keys:
        if KeyedJaggedTensor is None:  # pragma: no cover
            raise ImportError("torchrec is needed to collate categorical features")
        nk = len(enc.sparse_keys)
        sparse = KeyedJaggedTensor(
            keys=list(enc.sparse_keys),
            values=_tensor(enc.sparse.reshape(-1)),
            lengths=torch.ones(n * nk, dtype=torch.int32),
            stride=n,
            length_per_key=[n] * nk,
            offset_per_key=[i * n for i in range(nk + 1)],
        )
    return cls(
        name=name,
        token_index=_tensor(pos),
        sparse=sparse,
        numeric=_tensor(enc.numeric),
        dense=_tensor(enc.dense),
        numeric_names=enc.numeric_names,
        dense_names=enc.dense_names,
    )


def collate(
    data: pa.Table | pa.RecordBatch,
    world: WorldSpec,
    scenarios: Sequence[str] | None = None,
    drop: Drop = Drop.NONE,
    with_labels: bool = True,
) -> Batch:
    """One :class:`Batch` of the rows of ``data`` (see the module docstring); loops should reuse a :class:`Collator`."""
    return Collator(world, scenarios, drop, with_labels)(data)

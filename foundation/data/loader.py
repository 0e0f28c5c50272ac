"""Reading sample Parquet files into :class:`~recfm.foundation.data.batch.Batch`\\ es: shuffling, time-range
filtering, fixed-size or token-budget batching, resumable iteration, distributed shards, background prefetch.

How an epoch is planned (a pure function of ``seed``, the epoch number and the options, so every rank and
every resumed run computes the same plan)::

    files -> row groups (units; split into row slices when a shard needs more units)
          -> unit order: row groups permuted, slices of one row group kept together   (shuffle)
          -> units dealt to ranks, each to the rank with the fewest tokens so far      (sharded)
          -> per rank: rows of ``shuffle_window`` consecutive units permuted together  (shuffle)
          -> rows filtered (``windows``, ``drop``) and packed into batches
          -> every rank keeps the first min-over-ranks batches, so ranks step together

Packing: ``batch_size`` alone gives batches of that many samples (the last may be short unless
``drop_last``). ``max_tokens`` gives the dynamic batch size of MTGR: consecutive samples are packed greedily
while the batch's total tokens stay ``<= max_tokens`` (a sample longer than the budget gets a batch of its
own); ``batch_size`` then caps the samples per batch. ``batch.num_samples`` says how many samples a batch
holds, for loss weighting. ``bucket_by_length`` sorts the rows of each shuffle window by length before
packing (fewer wasted attention FLOPs) and then permutes that window's batches.

Only the lengths of the list columns (their ``ts`` leaves) and ``window`` are read when the dataset is
opened; a row group is read in full when a batch first needs it, and released after the last batch of the
plan that uses it.

Resuming: ``state_dict()`` is ``{epoch, cursor, seed, config}``; ``cursor`` counts the batches handed to the
caller in this epoch (not those prefetched). A dataset given that state by ``load_state_dict`` yields exactly
the remaining batches of the interrupted run. Breaking out of a ``for`` loop also keeps the position: the next
iteration continues the same epoch.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recfm.errors import ConfigError, DataError
from recfm.foundation.data import schema as S
from recfm.foundation.data.batch import Batch, Collator, Drop, row_counts
from recfm.scenarios.spec import WorldSpec


def pack_by_tokens(tokens: np.ndarray, max_tokens: int, max_samples: int | None = None) -> list[tuple[int, int]]:
    """Greedy ``[start, stop)`` ranges over ``tokens`` ``[n]`` with sums ``<= max_tokens`` (a longer single
    sample gets its own range) and at most ``max_samples`` samples each."""
    cum = np.concatenate([[0], np.cumsum(tokens, dtype=np.int64)])
    n, out, i = len(tokens), [], 0
    while i < n:
        j = max(int(np.searchsorted(cum, cum[i] + max_tokens, side="right")) - 1, i + 1)
        if max_samples:
            j = min(j, i + max_samples)
        out.append((i, j))
        i = j
    return out


def find_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Parquet files named by ``paths`` (files, or folders searched recursively for ``*.parquet``), sorted."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files: list[Path] = []
    for p in map(Path, items):
        if p.is_dir():
            files += sorted(p.rglob("*.parquet"))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such sample file or folder")
    if not files:
        raise DataError(f"no Parquet sample files in {', '.join(map(str, items))}")
    return files


@dataclass(frozen=True)
class _RowGroup:
    file: int
    index: int
    first_row: int  # global id of its first row
    num_rows: int


def _leaf_columns(pf: pq.ParquetFile, names: Sequence[str]) -> list[str]:
    """The Parquet leaf path of each list column's ``ts`` field (e.g. ``h.list.element.ts``), when present."""
    paths = [pf.schema.column(i).path for i in range(len(pf.schema))]
    present = set(pf.schema_arrow.names)
    out = []
    for name in (n for n in names if n in present):
        leaf = [p for p in paths if p.startswith(name + ".") and p.split(".")[-1] == S.TS and p.count(".") == 3]
        out.append(leaf[0] if leaf else name)  # unusual nesting: read the whole column
    return out


class SampleDataset:
    """Batches of samples read from Parquet files (see the module docstring).

    Args:
        paths: Parquet files or folders of them.
        world: the world the samples were built for.
        scenarios: the model's scenario names in registry order (default: all of ``world``'s).
        batch_size: samples per batch; with ``max_tokens``, the most samples per batch.
        max_tokens: token budget per batch (token-budget batching).
        shuffle: permute row groups and rows (seeded; a new permutation every epoch).
        seed: base seed of every epoch's permutation.
        windows: ``(lo, hi)``: keep rows with ``lo <= window < hi`` (either bound may be None).
        drop: rows to drop (:class:`~recfm.foundation.data.batch.Drop`; default rows without targets).
        shuffle_window: row groups whose rows are permuted together.
        bucket_by_length: sort each shuffle window by length before packing.
        drop_last: drop a short last batch (fixed-size batching only).
        prefetch: batches collated ahead in a background thread (0: no thread).
        pin_memory: pin batches for fast host-to-device copies (default: when CUDA is available).
        with_labels: read labels (False for scoring data without labels).
    """

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        world: WorldSpec,
        scenarios: Sequence[str] | None = None,
        *,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        windows: tuple[int | None, int | None] | None = None,
        drop: Drop = Drop.NO_TARGETS,
        shuffle_window: int = 8,
        bucket_by_length: bool = False,
        drop_last: bool = False,
        prefetch: int = 2,
        pin_memory: bool | None = None,
        with_labels: bool = True,
    ):
        problems = []
        if batch_size is None and max_tokens is None:
            problems.append("data: give batch_size, max_tokens or both")
        if batch_size is not None and batch_size < 1:
            problems.append(f"data.batch_size: must be >= 1, got {batch_size}")
        if max_tokens is not None and max_tokens < 1:
            problems.append(f"data.max_tokens: must be >= 1, got {max_tokens}")
        if shuffle_window < 1:
            problems.append(f"data.shuffle_window: must be >= 1, got {shuffle_window}")
        if problems:
            raise ConfigError(problems)
        self.collator = Collator(world, scenarios, Drop.NONE, with_labels)
        self.scenarios = self.collator.scenarios
        self.files = find_files(paths)
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.shuffle, self.seed, self.windows = shuffle, int(seed), tuple(windows) if windows else (None, None)
        self.drop, self.shuffle_window, self.bucket_by_length = Drop(drop), shuffle_window, bucket_by_length
        self.drop_last, self.prefetch = drop_last, prefetch
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.rank, self.world_size = 0, 1
        self.epoch, self._cursor = 0, 0
        self._plan_cache: tuple[int, list[np.ndarray]] | None = None
        self._index()

    # ---- the index: row groups and per-row token counts ---------------------------------------------
    def _index(self) -> None:
        groups, tokens, keep, window = [], [], [], []
        lists = [S.H, S.R, *(S.target_column(s) for s in self.scenarios)]
        first = 0
        for f, path in enumerate(self.files):
            try:
                pf = pq.ParquetFile(path)
            except (OSError, pa.ArrowInvalid) as e:
                raise DataError(f"{path}: not a readable Parquet file: {e}") from e
            if S.WINDOW not in pf.schema_arrow.names:
                raise DataError(f"{path}: no {S.WINDOW!r} column (is this a sample file?)")
            leaves = _leaf_columns(pf, lists)
            for g in range(pf.num_row_groups):
                part = pf.read_row_group(g, columns=[S.WINDOW, *leaves])
                counts = row_counts(part, self.scenarios)
                keep.append(counts.keep(self.drop))
                tokens.append(counts.tokens)
                window.append(part.column(S.WINDOW).to_numpy().astype(np.int64))
                groups.append(_RowGroup(f, g, first, part.num_rows))
                first += part.num_rows
        self._groups = groups
        self._tokens = np.concatenate(tokens) if tokens else np.zeros(0, np.int64)
        self._row_group = np.repeat(np.arange(len(groups)), [g.num_rows for g in groups])
        self._first_row = np.array([g.first_row for g in groups], dtype=np.int64)
        window = np.concatenate(window) if window else np.zeros(0, np.int64)
        lo, hi = self.windows
        self._eligible = np.concatenate(keep) if keep else np.zeros(0, bool)
        if lo is not None:
            self._eligible &= window >= lo
        if hi is not None:
            self._eligible &= window < hi

    @property
    def num_samples(self) -> int:
        """Samples that pass the ``windows`` and ``drop`` filters (over all shards)."""
        return int(self._eligible.sum())

    @property
    def num_tokens(self) -> int:
        return int(self._tokens[self._eligible].sum())

    # ---- planning -------------------------------------------------------------------------------------
    def _units(self) -> list[tuple[int, int, int]]:
        """``(row group, first global row, stop)`` units; row groups are split so shards get >= 16 units each."""
        total = sum(g.num_rows for g in self._groups)
        limit = max(1, -(-total // (16 * self.world_size))) if self.world_size > 1 else None
        units = []
        for i, g in enumerate(self._groups):
            step = g.num_rows if limit is None else limit
            for start in range(0, max(g.num_rows, 1), max(step, 1)):
                units.append((i, g.first_row + start, g.first_row + min(start + step, g.num_rows)))
        return units

    def _rank_plans(self, epoch: int) -> list[list[np.ndarray]]:
        rng = np.random.default_rng([self.seed, epoch])
        units = self._units()
        by_group: dict[int, list[tuple[int, int, int]]] = {}
        for u in units:
            by_group.setdefault(u[0], []).append(u)
        order = rng.permutation(len(self._groups)) if self.shuffle else range(len(self._groups))
        seq = []
        for g in order:
            parts = by_group.get(int(g), [])
            seq += [parts[i] for i in rng.permutation(len(parts))] if self.shuffle else parts
        streams: list[list[tuple[int, int, int]]] = [[] for _ in range(self.world_size)]
        load = np.zeros(self.world_size, dtype=np.int64)
        for u in seq:
            r = int(np.argmin(load))
            streams[r].append(u)
            load[r] += int(self._tokens[u[1] : u[2]][self._eligible[u[1] : u[2]]].sum())
        plans = [self._pack_stream(s, rng) for s in streams]
        if self.world_size > 1:
            n = min(len(p) for p in plans)
            plans = [p[:n] for p in plans]
        return plans

    def _pack_stream(self, units: list[tuple[int, int, int]], rng: np.random.Generator) -> list[np.ndarray]:
        windows = []
        for w in range(0, len(units), self.shuffle_window):
            rows = np.concatenate([np.arange(a, b) for _, a, b in units[w : w + self.shuffle_window]] or [[]])
            rows = rows.astype(np.int64)[self._eligible[rows.astype(np.int64)]]
            if self.shuffle:
                rows = rows[rng.permutation(rows.size)]
            windows.append(rows)
        if not self.bucket_by_length:
            windows = [np.concatenate(windows)] if windows else []
        batches: list[np.ndarray] = []
        for rows in windows:
            if self.bucket_by_length:
                rows = rows[np.argsort(self._tokens[rows], kind="stable")]
            part = [rows[a:b] for a, b in self._ranges(self._tokens[rows])]
            if self.bucket_by_length and self.shuffle:
                part = [part[i] for i in rng.permutation(len(part))]
            batches += part
        if self.drop_last and self.max_tokens is None and batches and batches[-1].size < self.batch_size:
            batches.pop()
        return batches

    def _ranges(self, tokens: np.ndarray) -> list[tuple[int, int]]:
        if self.max_tokens is not None:
            return pack_by_tokens(tokens, self.max_tokens, self.batch_size)
        n, b = tokens.size, self.batch_size
        return [(i, min(i + b, n)) for i in range(0, n, b)]

    def plan(self, epoch: int | None = None) -> list[np.ndarray]:
        """This rank's batches of an epoch, each ``[b]`` global row ids (file order of all row groups)."""
        epoch = self.epoch if epoch is None else epoch
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            self._plan_cache = (epoch, self._rank_plans(epoch)[self.rank])
        return self._plan_cache[1]

    def __len__(self) -> int:
        return len(self.plan())

    # ---- sharding and state ---------------------------------------------------------------------------
    def sharded(self, rank: int, world_size: int) -> "SampleDataset":
        """The share of rank ``rank`` of ``world_size``: disjoint samples, the same number of batches per rank."""
        if not 0 <= rank < world_size:
            raise ConfigError([f"data: rank {rank} is not in [0, {world_size})"])
        out = copy.copy(self)
        out.rank, out.world_size, out._cursor, out._plan_cache = rank, world_size, 0, None
        return out

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._cursor = int(epoch), 0

    def _config(self) -> dict:
        return {
            "files": [f"{p.name}:{sum(g.num_rows for g in self._groups if g.file == i)}" for i, p in enumerate(self.files)],
            "scenarios": list(self.scenarios),
            "batch_size": self.batch_size,
            "max_tokens": self.max_tokens,
            "shuffle": self.shuffle,
            "windows": list(self.windows),
            "drop": self.drop.value,
            "shuffle_window": self.shuffle_window,
            "bucket_by_length": self.bucket_by_length,
            "drop_last": self.drop_last,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def state_dict(self) -> dict:
        """The data position: ``{epoch, cursor, seed, config}`` (plain Python, checkpointable)."""
        return {"epoch": self.epoch, "cursor": self._cursor, "seed": self.seed, "config": self._config()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` was saved; the dataset must have the same files and batching options."""
        mine = self._config()
        diff = [k for k in mine if state.get("config", {}).get(k) != mine[k]]
        if diff:
            raise DataError(
                "loader state was saved for different data or batching: "
                + "; ".join(f"{k}: saved {state.get('config', {}).get(k)!r}, now {mine[k]!r}" for k in diff)
            )
        self.seed, self.epoch, self._cursor = int(state["seed"]), int(state["epoch"]), int(state["cursor"])
        self._plan_cache = None

    # ---- iteration ------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        epoch, plan, start = self.epoch, self.plan(), self._cursor
        produce = lambda: self._produce(plan, start)  # noqa: E731
        for batch in _threaded(produce, self.prefetch) if self.prefetch > 0 else produce():
            self._cursor += 1
            yield batch
        self.epoch, self._cursor = epoch + 1, 0

    def _produce(self, plan: list[np.ndarray], start: int) -> Iterator[Batch]:
        row_group = self._row_group
        last_use: dict[int, int] = {}
        for i in range(start, len(plan)):
            for g in np.unique(row_group[plan[i]]):
                last_use[int(g)] = i
        files: dict[int, pq.ParquetFile] = {}
        cache: dict[int, pa.Table] = {}
        for i in range(start, len(plan)):
            rows = plan[i]
            groups = row_group[rows]
            used = list(dict.fromkeys(groups.tolist()))
            tables = [self._read(g, files, cache) for g in used]
            base = np.zeros(len(self._groups), dtype=np.int64)  # where each used row group starts in the concat
            base[used] = np.cumsum([0] + [t.num_rows for t in tables[:-1]])
            local = base[groups] + rows - self._first_row[groups]
            table = pa.concat_tables(tables, promote_options="permissive").take(pa.array(local, type=pa.int64()))
            source = ", ".join(f"{self.files[self._groups[g].file]} row group {self._groups[g].index}" for g in used)
            batch = self.collator(table, source=f"batch {i} of epoch {self.epoch} from {source}")
            for g in used:
                if last_use[g] == i:
                    cache.pop(g, None)
            yield batch.pin_memory() if self.pin_memory else batch

    def _read(self, g: int, files: dict[int, pq.ParquetFile], cache: dict[int, pa.Table]) -> pa.Table:
        if g not in cache:
            group = self._groups[g]
            pf = files.get(group.file) or files.setdefault(group.file, pq.ParquetFile(self.files[group.file]))
            names = set(pf.schema_arrow.names)
            cols = [S.USER, S.WINDOW, S.H, S.R] + [S.target_column(s) for s in self.scenarios]
            cache[g] = pf.read_row_group(group.index, columns=[c for c in cols if c in names])
        return cache[g]


def _threaded(produce: Callable[[], Iterator[Batch]], depth: int) -> Iterator[Batch]:
    """Run ``produce`` in a background thread, ``depth`` items ahead; errors re-raised in the caller."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for batch in produce():
                if not put(("batch", batch)):
                    return
            put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(("error", e))

    thread = threading.Thread(target=work, name="recfm-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        thread.join()

"""Pass 2 of the streaming build: the samples of one partition, assembled without per-event Python loops.

Inputs are a partition's canonical rows (:mod:`recfm.foundation.data.build_rows`), in input order. Events
are sorted by (user, ts, kind) — the *time order*, ties stable by kind, then by input order — and, for the
per-kind truncation, by (user, kind, ts) — the *kind order*. Every token list of a sample is then a range
(or, for H, one range per kind) of a sorted array, found with ``searchsorted``::

    H, kind k   kind order, user's kind-k events with ts < window, truncated to max_length[k] at its kept end;
                the kinds' ranges are merged back into time order (sorting their time-order row numbers)
    R           time order, user's events with window <= ts < bound, truncated to realtime.max_length;
                bound = the sample's latest exposure ts (user layout; events after every exposure of the
                window can influence no exposure and are left out) or the exposure's own ts (per-exposure)
    t_<s>       scenario s's exposures sorted by (user, ts, input order): the user's exposures of s in the
                window (user layout), or the one exposure of the row (per-exposure layout)

List columns are then built by ``take`` on struct arrays and ``ListArray.from_arrays`` with the ranges'
offsets. Rows come out sorted by (user, window) (user layout) or (user, ts, scenario, input order)
(per-exposure layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from recfm.foundation.data import schema as S
from recfm.scenarios.spec import Keep, WorldSpec

LAYOUTS = ("user", "exposure")


def ranges_to_indices(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(start[i], end[i])`` over i: ``[sum(end - start)]`` int64."""
    lens = (end - start).astype(np.int64)
    total = int(lens.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    first = np.cumsum(lens) - lens
    return np.arange(total, dtype=np.int64) - np.repeat(first - start, lens)


def segment_searchsorted(seg: np.ndarray, val: np.ndarray, q_seg: np.ndarray, q_val: np.ndarray, side: str = "left") -> np.ndarray:
    """Where queries (q_seg, q_val) go in data sorted by (seg, val), like ``np.searchsorted`` on pairs.

    ``seg`` are non-negative ints; values are dense-ranked together with the queries first, so the pair
    key ``seg * (n + m + 1) + rank`` cannot overflow for any int64 values. ``[n]`` data, ``[m]`` queries.
    """
    n = len(val)
    _, rank = np.unique(np.concatenate([val, q_val]), return_inverse=True)
    span = np.int64(len(rank) + 1)
    key = seg.astype(np.int64) * span + rank[:n]
    q_key = q_seg.astype(np.int64) * span + rank[n:]
    return np.searchsorted(key, q_key, side=side)


def truncate(lo: np.ndarray, hi: np.ndarray, max_length: int, keep: Keep) -> tuple[np.ndarray, np.ndarray]:
    """Ranges [lo, hi) cut to at most ``max_length``, keeping their first or last elements."""
    if keep is Keep.LAST:
        return np.maximum(lo, hi - max_length), hi
    return lo, np.minimum(hi, lo + max_length)


def _struct(table: pa.Table, struct: pa.StructType) -> pa.StructArray:
    """Columns 1.. of a canonical table (column 0 is user_id) as one struct array."""
    cols = [c.combine_chunks() for c in table.columns[1:]]
    return pa.StructArray.from_arrays(cols, fields=list(struct))


def _lists(offsets: np.ndarray, values: pa.Array, list_type: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, type=list_type)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


@dataclass
class Plan:
    """Token ranges of each of the partition's S samples (K sequence kinds, C scenarios)."""

    user: np.ndarray  # [S] int64
    window: np.ndarray  # [S] int64
    h_start: np.ndarray  # [S, K] kind-order positions
    h_end: np.ndarray
    r_start: np.ndarray  # [S] time-order positions
    r_end: np.ndarray
    t_start: np.ndarray  # [S, C] positions in each scenario's sorted table
    t_end: np.ndarray

    def lengths(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``[S]`` H, R and T token counts."""
        return (self.h_end - self.h_start).sum(1), self.r_end - self.r_start, (self.t_end - self.t_start).sum(1)


class PartitionSamples:
    """The samples of one partition (see the module docstring); ``table(lo, hi)`` builds rows lo..hi-1."""

    def __init__(self, world: WorldSpec, events: pa.Table, targets: list[pa.Table], layout: str, with_oracle: bool):
        self.world, self.layout = world, layout
        self.schema = S.sample_schema(world, with_oracle)
        ev_user, ev_ts, ev_kind = (events.column(c).to_numpy() for c in (S.USER, S.TS, S.KIND))
        time_order = np.lexsort((ev_kind, ev_ts, ev_user))
        events = events.take(pa.array(time_order))
        self.ev_user, self.ev_ts, self.ev_kind = ev_user[time_order], ev_ts[time_order], ev_kind[time_order]
        self.kind_order = np.lexsort((self.ev_kind, self.ev_user))  # kind-order position -> time-order row
        self.ev_struct = _struct(events, S.event_struct(world))
        self.ev_bytes = events.nbytes / max(events.num_rows, 1)
        del events
        self.targets, self.t_structs, self.t_user, self.t_ts = [], [], [], []
        for c, t in enumerate(targets):
            user, ts = t.column(S.USER).to_numpy(), t.column(S.TS).to_numpy()
            order = np.lexsort((ts, user))
            t = t.take(pa.array(order))
            self.t_user.append(user[order])
            self.t_ts.append(ts[order])
            self.t_structs.append(_struct(t, S.target_struct(world.scenarios[c], with_oracle)))
            self.targets.append(t.nbytes / max(t.num_rows, 1))
        self.plan = self._plan()

    @property
    def num_rows(self) -> int:
        return len(self.plan.user)

    def _plan(self) -> Plan:
        w = self.world
        ws, K, C = w.window_seconds, len(w.sequences), len(w.scenarios)
        users = np.unique(np.concatenate([self.ev_user, *self.t_user]))
        t_rank = [np.searchsorted(users, u) for u in self.t_user]
        t_win = [ts // ws * ws for ts in self.t_ts]
        if self.layout == "user":
            u = np.concatenate(t_rank)
            win = np.concatenate(t_win)
            ts = np.concatenate(self.t_ts)
            order = np.lexsort((win, u))
            u, win, ts = u[order], win[order], ts[order]
            first = np.flatnonzero(np.r_[True, (u[1:] != u[:-1]) | (win[1:] != win[:-1])]) if len(u) else np.empty(0, np.int64)
            s_rank, s_win = u[first], win[first]
            bound = np.maximum.reduceat(ts, first) if len(first) else np.empty(0, np.int64)
            t_start = np.zeros((len(first), C), dtype=np.int64)
            t_end = np.zeros_like(t_start)
            for c in range(C):
                if len(t_rank[c]):
                    t_start[:, c] = segment_searchsorted(t_rank[c], t_win[c], s_rank, s_win, "left")
                    t_end[:, c] = segment_searchsorted(t_rank[c], t_win[c], s_rank, s_win, "right")
        else:
            u = np.concatenate(t_rank)
            ts = np.concatenate(self.t_ts)
            scen = np.concatenate([np.full(len(r), c, dtype=np.int64) for c, r in enumerate(t_rank)])
            pos = np.concatenate([np.arange(len(r), dtype=np.int64) for r in t_rank])
            order = np.lexsort((pos, scen, ts, u))
            s_rank, bound, scen, pos = u[order], ts[order], scen[order], pos[order]
            s_win = bound // ws * ws
            hit = scen[:, None] == np.arange(C)[None, :]
            t_start = np.where(hit, pos[:, None], 0)
            t_end = t_start + hit
        n = len(s_rank)
        ev_rank = np.searchsorted(users, self.ev_user)
        # H: per kind, the user's kind-k events before the window, in kind order.
        h_start = np.zeros((n, K), dtype=np.int64)
        h_end = np.zeros((n, K), dtype=np.int64)
        r_start = np.zeros(n, dtype=np.int64)
        r_end = np.zeros(n, dtype=np.int64)
        if len(ev_rank) and n:
            seg = ev_rank[self.kind_order] * K + self.ev_kind[self.kind_order]
            q_seg = (s_rank[:, None] * K + np.arange(K)[None, :]).ravel()
            lo = np.searchsorted(seg, q_seg, side="left").reshape(n, K)
            hi = segment_searchsorted(seg, self.ev_ts[self.kind_order], q_seg, np.repeat(s_win, K)).reshape(n, K)
            for k, seq in enumerate(w.sequences):
                h_start[:, k], h_end[:, k] = truncate(lo[:, k], hi[:, k], seq.max_length, seq.keep)
            both = segment_searchsorted(ev_rank, self.ev_ts, np.r_[s_rank, s_rank], np.r_[s_win, bound])
            r_start, r_end = truncate(both[:n], both[n:], w.realtime.max_length, w.realtime.keep)
        self.unused_events = int((~np.isin(ev_rank, s_rank)).sum()) if len(ev_rank) else 0
        return Plan(users[s_rank], s_win, h_start, h_end, r_start, r_end, t_start, t_end)

    def token_bytes(self) -> np.ndarray:
        """``[S]`` estimated in-memory bytes of each sample (for chunking)."""
        p = self.plan
        t_bytes = ((p.t_end - p.t_start) * np.array(self.targets or [0.0])[None, : p.t_end.shape[1]]).sum(1)
        h, r, _ = p.lengths()
        return (h + r) * self.ev_bytes + t_bytes + 32

    def table(self, lo: int, hi: int) -> pa.Table:
        """Sample rows ``lo .. hi-1`` as a table of :func:`~recfm.foundation.data.schema.sample_schema`."""
        p = self.plan
        n_ev = len(self.ev_ts)
        ev_list = self.schema.field(S.H).type
        # H: gather each kind's range, then order tokens by (sample, time-order row).
        keys = []
        for k in range(p.h_start.shape[1]):
            starts, ends = p.h_start[lo:hi, k], p.h_end[lo:hi, k]
            rows = self.kind_order[ranges_to_indices(starts, ends)]
            sample = np.repeat(np.arange(hi - lo, dtype=np.int64), ends - starts)
            keys.append(sample * max(n_ev, 1) + rows)
        h_rows = np.sort(np.concatenate(keys)) % max(n_ev, 1)
        h_len = (p.h_end[lo:hi] - p.h_start[lo:hi]).sum(1)
        cols = [pa.array(p.user[lo:hi], pa.int64()), pa.array(p.window[lo:hi], pa.int64())]
        cols.append(_lists(_offsets(h_len), self.ev_struct.take(pa.array(h_rows, pa.int64())), ev_list))
        r_rows = ranges_to_indices(p.r_start[lo:hi], p.r_end[lo:hi])
        r_len = p.r_end[lo:hi] - p.r_start[lo:hi]
        cols.append(_lists(_offsets(r_len), self.ev_struct.take(pa.array(r_rows, pa.int64())), ev_list))
        for c, scenario in enumerate(self.world.scenarios):
            starts, ends = p.t_start[lo:hi, c], p.t_end[lo:hi, c]
            values = self.t_structs[c].take(pa.array(ranges_to_indices(starts, ends), pa.int64()))
            cols.append(_lists(_offsets(ends - starts), values, self.schema.field(S.target_column(scenario.name)).type))
        return pa.Table.from_arrays(cols, schema=self.schema)

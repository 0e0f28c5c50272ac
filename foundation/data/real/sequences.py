"""Per-user item sequences (ML-1M, Amazon Beauty) and their conversion to recfm events.

A :class:`SequenceLog` holds every user's items in chronological order, jagged::

    users      [U]      int64, ascending, unique
    offsets    [U+1]    int64, user u's items are items[offsets[u]:offsets[u+1]]
    items      [n]      int64, item ids >= 1 (0 is reserved: the next-item recipes pad with it)
    timestamps [n]      int64, unix seconds, non-decreasing within a user
    ratings    [n]      int64 or None

Rules applied to every source (the next-item recipes rely on them; see ``docs`` of each converter):

* a user listed twice is a DataError naming both lines (never merged silently);
* an item id < 1 is a DataError naming the line;
* a user with no items is skipped and counted (``empty_sequences_skipped``);
* sequences shorter than 3 (too short for leave-last-out train/valid/test) are kept and counted
  (``sequences_shorter_than_3``); the recipes decide what to do with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recfm.errors import DataError
from recfm.foundation.data.real import textio

SHORT = 3  # leave-last-out needs a train, a validation and a test item


@dataclass(frozen=True)
class SequenceLog:
    users: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    ratings: np.ndarray | None = None
    empty_skipped: int = 0

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def read_sequence_file(path: Path, *, user_sep: str, header: bool) -> SequenceLog:
    """Read ``user<user_sep>item item item ...`` lines (oldest item first).

    Timestamps are synthetic: an item's 0-based position in its user's sequence, i.e. monotone times one
    second apart, all inside the first day (window) of 1970.
    """
    users: list[int] = []
    lines_of: dict[int, int] = {}
    seqs: list[list[int]] = []
    empty = 0
    for number, line in textio.lines(path):
        if header and number == 1:
            continue
        if user_sep == " ":
            head, rest = (line.split(None, 1) + [""])[:2]
        else:
            head, sep, rest = line.partition(user_sep)
            if not sep:
                raise DataError(f"{path}:{number}: expected 'user_id{user_sep}item ids', got {line[:80]!r}")
        try:
            user = int(head.strip())
        except ValueError:
            raise DataError(f"{path}:{number}: user id {head.strip()!r} is not an integer") from None
        if user in lines_of:
            raise DataError(f"{path}:{number}: user {user} appears again (first at line {lines_of[user]})")
        lines_of[user] = number
        seq = textio.parse_ints(rest, path, number, f"items of user {user}")
        if not seq:
            empty += 1
            continue
        if min(seq) < 1:
            raise DataError(f"{path}:{number}: user {user}: item id {min(seq)} out of range (ids start at 1)")
        users.append(user)
        seqs.append(seq)
    if not users:
        raise DataError(f"{path}: no sequences")
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    items = np.fromiter((i for s in seqs for i in s), dtype=np.int64, count=int(lengths.sum()))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    positions = np.arange(items.size, dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    log = SequenceLog(np.asarray(users, dtype=np.int64), offsets, items, positions, None, empty)
    return _sorted_by_user(log)


def _sorted_by_user(log: SequenceLog) -> SequenceLog:
    if np.all(np.diff(log.users) > 0):
        return log
    order = np.argsort(log.users, kind="stable")
    lengths = log.lengths[order]
    starts = log.offsets[:-1][order]
    take = np.repeat(starts, lengths) + (np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ratings = None if log.ratings is None else log.ratings[take]
    return SequenceLog(log.users[order], offsets, log.items[take], log.timestamps[take], ratings, log.empty_skipped)


def from_rows(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, ratings: np.ndarray | None,
              path: Path, first_line: int) -> SequenceLog:
    """Group rating rows into sequences: by user, then timestamp, ties in file order.

    ``first_line`` is the line number of row 0 (for the out-of-range error).
    """
    bad = np.flatnonzero(items < 1)
    if bad.size:
        raise DataError(f"{path}:{first_line + bad[0]}: item id {items[bad[0]]} out of range (ids start at 1)")
    if users.size == 0:
        raise DataError(f"{path}: no data rows")
    order = textio.stable_order(users, timestamps)
    users, items, timestamps = users[order], items[order], timestamps[order]
    starts = np.flatnonzero(np.concatenate([[True], users[1:] != users[:-1]]))
    offsets = np.concatenate([starts, [users.size]]).astype(np.int64)
    return SequenceLog(users[starts], offsets, items, timestamps, None if ratings is None else ratings[order])


def to_events(log: SequenceLog, action: str) -> dict[str, np.ndarray]:
    """Columns of ``events.parquet``: user_id, timestamp, action, item_id (+ rating when known)."""
    cols = {
        "user_id": np.repeat(log.users, log.lengths),
        "timestamp": log.timestamps,
        "action": np.full(log.items.size, action, dtype=object),
        "item_id": log.items,
    }
    if log.ratings is not None:
        cols["rating"] = log.ratings
    return cols


def counts(log: SequenceLog) -> dict[str, int]:
    lengths = log.lengths
    return {
        "users": int(log.users.size),
        "items": int(np.unique(log.items).size),
        "interactions": int(log.items.size),
        "max_item_id": int(log.items.max()),
        "min_length": int(lengths.min()),
        "max_length": int(lengths.max()),
        f"sequences_shorter_than_{SHORT}": int((lengths < SHORT).sum()),
        "empty_sequences_skipped": int(log.empty_skipped),
    }

"""Douban book + music: two scenarios (``book``, ``music``) with shared user ids, binary ``like`` label.

Source layouts, recognised by the files present (first match wins):

``book_ratings.csv`` + ``music_ratings.csv`` (the shared copy, GA-DTCDR preprocessing)
    header ``user_id,item_id,rating``; ratings 1..5; no timestamps.
``douban_book/ratings.dat`` + ``douban_music/ratings.dat`` (the GA-DTCDR ``Data`` folder layout)
    tab-separated ``user item rating`` without header; further columns are ignored.

Choices (all seeded with ``SEED``; the same input gives byte-identical output):

* **Label.** ``like = rating >= 4``. Every rated item is an exposure (rated 1..3: ``like = 0``, an explicit
  dislike) and, for every liked exposure, ``NEGATIVES_PER_LIKE = 1`` item the user never rated in that
  domain is drawn uniformly from the domain's items (those present in its file) as a ``like = 0``
  exposure at the same time (column ``sampled = 1``). So AUC measures both "liked vs disliked" and "liked
  vs never rated".
* **Split.** No timestamps exist, so each user's ratings in each domain are shuffled and the last
  ``floor(0.2 * n)`` become the test part (users with fewer than 5 ratings in a domain have no test part
  there). Column ``split`` says ``train``/``test``.
* **Pseudo-time.** Train ratings (both domains, interleaved in a shuffled order) get times ``TRAIN_DAY +
  k`` seconds, k = 0, 1, ...; test ratings get ``TEST_DAY + k``. With the one-day windows of
  ``configs/real/douban``, the day of ``TEST_DAY`` holds exactly the test exposures: windowing does the
  split. Sampled negatives share their positive's time and split.
* **Events** (H/R tokens) are the *train* ratings only, action ``book_rate`` / ``music_rate``, with
  ``item_id`` and ``rating``: test ratings never enter any history. A train exposure is at the same time
  as its own rating event, and exposures see only events strictly earlier, so no label leaks.
* Item ids keep each domain's own numbering (both start at 1 and overlap); the configs embed them through
  two tables, ``book_item`` and ``music_item``, both reading the column ``item_id``.

Output: ``events.parquet`` (user_id, timestamp, action, item_id, rating) and ``exposures.parquet``
(exposure_id, user_id, timestamp, scenario, item_id, like, split, sampled). A repeated (user, item) pair in
one domain, a rating outside 1..5 or a negative id is a DataError naming the file and row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recfm.errors import DataError
from recfm.foundation.data.real import textio
from recfm.foundation.data.real.report import ConvertReport

DOMAINS = ("book", "music")
SEED = 0
TEST_FRACTION = 0.2
NEGATIVES_PER_LIKE = 1
LIKE_THRESHOLD = 4
TRAIN_DAY = 1577836800  # 2020-01-01 00:00:00 UTC
TEST_DAY = TRAIN_DAY + 86400
COLUMNS = {"user_id": textio.INT, "item_id": textio.INT, "rating": textio.INT}
HEADER = "user_id,item_id,rating"


def read(src: Path) -> tuple[dict[str, dict[str, np.ndarray]], str]:
    """``{domain: {user_id, item_id, rating}}`` and the layout found."""
    copy = {d: src / f"{d}_ratings.csv" for d in DOMAINS}
    original = {d: src / f"douban_{d}" / "ratings.dat" for d in DOMAINS}
    if any(p.is_file() for p in copy.values()):
        out = {}
        for d, path in copy.items():
            textio.require(path.parent, path.name)
            if textio.first_line(path).strip() != HEADER:
                raise DataError(f"{path}:1: expected header {HEADER!r}, got {textio.first_line(path)[:80]!r}")
            out[d] = _checked(textio.read_columns(path, COLUMNS), path)
        return out, "book_ratings.csv + music_ratings.csv (shared copy)"
    if any(p.is_file() for p in original.values()):
        out = {}
        for d, path in original.items():
            textio.require(path.parent, path.name)
            cols = textio.read_columns(path, COLUMNS, delimiter="\t", header=False, extra_columns=True)
            out[d] = _checked(cols, path)
        return out, "douban_book/ratings.dat + douban_music/ratings.dat (GA-DTCDR layout)"
    raise DataError(f"{src}: neither book_ratings.csv/music_ratings.csv nor douban_book/ratings.dat found")


def _checked(cols: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    if cols["user_id"].size == 0:
        raise DataError(f"{path}: no data rows")
    for name, lo, hi in (("user_id", 0, None), ("item_id", 0, None), ("rating", 1, 5)):
        v = cols[name]
        bad = np.flatnonzero((v < lo) | (v > hi if hi is not None else False))
        if bad.size:
            raise DataError(f"{path}: data row {bad[0] + 1}: {name} {v[bad[0]]} out of range")
    textio.check_unique_pairs(cols["user_id"], cols["item_id"], path)
    return cols


def _rank_within_user(users: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row: its 0-based rank among its user's rows by ``keys``, and its user's row count."""
    order = textio.stable_order(users, keys)
    u = users[order]
    starts = np.flatnonzero(np.concatenate([[True], u[1:] != u[:-1]]))
    sizes = np.diff(np.concatenate([starts, [u.size]]))
    rank = np.empty(u.size, dtype=np.int64)
    rank[order] = np.arange(u.size) - np.repeat(starts, sizes)
    size = np.empty(u.size, dtype=np.int64)
    size[order] = np.repeat(sizes, sizes)
    return rank, size


def _sample_unrated(rng, users: np.ndarray, items: np.ndarray, universe: np.ndarray, n_for: np.ndarray):
    """One item from ``universe`` per entry of ``n_for`` (user ids) that the user never rated."""
    width = int(max(universe.max(), items.max())) + 1
    rated = np.sort(users * width + items)
    draw = universe[rng.integers(0, universe.size, n_for.size)]
    for _ in range(1000):
        key = n_for * width + draw
        pos = np.minimum(np.searchsorted(rated, key), rated.size - 1)
        clash = np.flatnonzero(rated[pos] == key)
        if clash.size == 0:
            return draw
        draw[clash] = universe[rng.integers(0, universe.size, clash.size)]
    raise DataError("douban: could not sample unrated items (a user rated almost every item)")


def convert_douban(src: Path, out: Path) -> ConvertReport:
    domains, layout = read(src)
    rng = np.random.default_rng(SEED)
    parts = []  # per domain: users, items, ratings, is_test, shuffle key
    counts: dict[str, int] = {}
    for d in DOMAINS:
        c = domains[d]
        rank, size = _rank_within_user(c["user_id"], rng.random(c["user_id"].size))
        is_test = rank >= size - np.floor(TEST_FRACTION * size).astype(np.int64)
        parts.append((d, c["user_id"], c["item_id"], c["rating"], is_test))
        counts.update({
            f"{d}_ratings": int(c["user_id"].size), f"{d}_users": int(np.unique(c["user_id"]).size),
            f"{d}_items": int(np.unique(c["item_id"]).size), f"{d}_max_item_id": int(c["item_id"].max()),
            f"{d}_test_ratings": int(is_test.sum()),
        })
    counts["shared_users"] = int(np.intersect1d(domains["book"]["user_id"], domains["music"]["user_id"]).size)

    # pseudo-times: per user, train (resp. test) ratings of both domains in one shuffled order
    users = np.concatenate([p[1] for p in parts])
    is_test = np.concatenate([p[4] for p in parts])
    rank, _ = _rank_within_user(users * 2 + is_test, rng.random(users.size))
    if rank.max() >= 86400:
        raise DataError(f"{src}: a user has {rank.max() + 1} ratings, more than one pseudo-day of seconds")
    times = np.where(is_test, TEST_DAY, TRAIN_DAY) + rank

    ev, ex = [], []
    start = 0
    for d, u, i, r, test in parts:
        t = times[start:start + u.size]
        start += u.size
        train = ~test
        ev.append((u[train], t[train], np.full(int(train.sum()), f"{d}_rate", dtype=object), i[train], r[train]))
        like = (r >= LIKE_THRESHOLD).astype(np.int8)
        pos = np.repeat(np.flatnonzero(like), NEGATIVES_PER_LIKE)
        neg_items = _sample_unrated(rng, u, i, np.unique(i), u[pos])
        n = u.size + pos.size
        ex.append((
            np.concatenate([u, u[pos]]), np.concatenate([t, t[pos]]), np.full(n, d, dtype=object),
            np.concatenate([i, neg_items]), np.concatenate([like, np.zeros(pos.size, np.int8)]),
            np.where(np.concatenate([test, test[pos]]), "test", "train").astype(object),
            np.concatenate([np.zeros(u.size, np.int8), np.ones(pos.size, np.int8)]),
        ))
        counts[f"{d}_exposures"] = n
        counts[f"{d}_likes"] = int(like.sum())
        counts[f"{d}_sampled_negatives"] = int(pos.size)

    e = [np.concatenate(col) for col in zip(*ev)]
    order = textio.stable_order(e[0], e[1])
    events = dict(zip(("user_id", "timestamp", "action", "item_id", "rating"), (c[order] for c in e)))
    x = [np.concatenate(col) for col in zip(*ex)]
    order = textio.stable_order(x[0], x[1])
    exposures = {"exposure_id": np.arange(order.size, dtype=np.int64)}
    exposures.update(zip(("user_id", "timestamp", "scenario", "item_id", "like", "split", "sampled"),
                         (c[order] for c in x)))
    counts["events"] = int(events["user_id"].size)
    counts["exposures"] = int(order.size)
    files = (textio.write_parquet(events, out / "events.parquet"),
             textio.write_parquet(exposures, out / "exposures.parquet"))
    notes = (
        f"like = rating >= {LIKE_THRESHOLD}; {NEGATIVES_PER_LIKE} sampled unrated item per like (seed {SEED})",
        f"no timestamps: seeded {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%} split per user and domain; "
        f"train at {TRAIN_DAY}+k s, test at {TEST_DAY}+k s (one day later)",
        "events are train ratings only (actions book_rate, music_rate)",
    )
    return ConvertReport("douban", layout, files, counts, notes)

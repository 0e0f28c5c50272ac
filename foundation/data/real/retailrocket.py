"""Retailrocket: multi-behaviour events (view -> cart -> buy) with real timestamps; views as exposures.

Source layouts, recognised by the header of ``events.csv``:

``user_id,item_id,behavior,timestamp`` (the shared copy)
    behaviours ``view``/``cart``/``buy``, unix seconds; ``test_purchases.csv`` (``user_id,item_id``: one
    held-out purchase per user, absent from ``events.csv``) is optional.
``timestamp,visitorid,event,itemid,transactionid`` (Retailrocket's original on Kaggle)
    unix *milliseconds* (floored to seconds), events ``view``/``addtocart``/``transaction`` renamed to
    ``view``/``cart``/``buy``; ``visitorid``/``itemid`` kept as ids; ``transactionid`` ignored.

Output:

* ``events.parquet``: ``user_id, timestamp, action in {view, cart, buy}, item_id``, sorted by user, then
  time, ties in file order. The world config makes one sequence kind per behaviour.
* ``exposures.parquet``: **every view is one exposure** of scenario ``shop`` (a T token) with features
  ``item_id`` and labels ``cart`` / ``buy`` = 1 when the same user carts / buys the same item at a time
  ``t`` with ``t_view <= t <= t_view + HORIZON`` (one day; covers about 95% of the buys that follow a view
  in the shared copy). Every view of an item before its cart is positive. Carts and buys with no view
  before them (about 40% of carts in the copy) give no exposure. The exposure sees only events strictly
  before its own time, so neither its own view nor the cart/buy it predicts is visible to it.
* ``test_purchases.parquet`` (when ``test_purchases.csv`` exists): ``user_id, item_id, timestamp`` with a
  **synthetic timestamp = the user's last event + 1 s**, so it sorts after all of that user's events; it
  is for leave-one-out purchase prediction and is not part of ``events``.

Item ids of the copy are 0..30,112 (identity vocabulary 30,113 in ``configs/real/retailrocket``); the
original's ids are larger (``max_item_id`` in the report) and need a larger vocabulary. An unknown behaviour
name is a DataError naming the file and data row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recfm.errors import DataError
from recfm.foundation.data.real import textio
from recfm.foundation.data.real.report import ConvertReport

SCENARIO = "shop"
HORIZON = 86400  # seconds after a view during which a cart/buy of the same item labels it
ACTIONS = ("view", "cart", "buy")
COPY_HEADER = "user_id,item_id,behavior,timestamp"
COPY_COLUMNS = {"user_id": textio.INT, "item_id": textio.INT, "behavior": textio.STR, "timestamp": textio.INT}
ORIGINAL_HEADER = "timestamp,visitorid,event,itemid,transactionid"
ORIGINAL_COLUMNS = {"timestamp": textio.INT, "user_id": textio.INT, "behavior": textio.STR, "item_id": textio.INT,
                    "transactionid": textio.STR}
ORIGINAL_ACTIONS = {"view": "view", "addtocart": "cart", "transaction": "buy"}
TEST_COLUMNS = {"user_id": textio.INT, "item_id": textio.INT}


def read_events(src: Path) -> tuple[dict[str, np.ndarray], str]:
    path = textio.require(src, "events.csv")
    header = textio.first_line(path).strip()
    if header == COPY_HEADER:
        cols = textio.read_columns(path, COPY_COLUMNS)
        names, layout = {a: a for a in ACTIONS}, "events.csv user_id,item_id,behavior,timestamp (shared copy)"
    elif header == ORIGINAL_HEADER:
        cols = textio.read_columns(path, ORIGINAL_COLUMNS)
        cols["timestamp"] = cols["timestamp"] // 1000
        names, layout = ORIGINAL_ACTIONS, "events.csv timestamp,visitorid,event,... (Retailrocket original, ms)"
    else:
        raise DataError(f"{path}:1: expected header {COPY_HEADER!r} or {ORIGINAL_HEADER!r}, got {header[:80]!r}")
    if cols["user_id"].size == 0:
        raise DataError(f"{path}: no data rows")
    kinds, codes = np.unique(cols["behavior"], return_inverse=True)
    unknown = [k for k in kinds if k not in names]
    if unknown:
        row = int(np.flatnonzero(cols["behavior"] == unknown[0])[0])
        raise DataError(f"{path}: data row {row + 1}: unknown behaviour {unknown[0]!r} (known: {', '.join(names)})")
    cols["action"] = np.asarray([names[k] for k in kinds], dtype=object)[codes]
    return cols, layout


def followed_within(user, item, t, is_src, is_dst, horizon: int) -> np.ndarray:
    """For rows with ``is_src``: whether a row with ``is_dst`` has the same (user, item) and a time in
    ``[t, t + horizon]``. Returns ``[is_src.sum()]`` bool, in row order."""
    _, pair = np.unique(user * (int(item.max()) + 1) + item, return_inverse=True)
    rel = t - t.min()
    if rel.max() + horizon >= 2**32 or pair.max() >= 2**31:
        raise DataError("retailrocket: time span or number of (user, item) pairs too large for labelling")
    comp = pair.astype(np.int64) * 2**32 + rel
    dst = np.sort(comp[is_dst])
    src = comp[is_src]
    idx = np.searchsorted(dst, src, side="left")
    hit = np.zeros(src.size, dtype=bool)
    ok = idx < dst.size
    hit[ok] = dst[idx[ok]] <= src[ok] + horizon
    return hit


def convert_retailrocket(src: Path, out: Path) -> ConvertReport:
    cols, layout = read_events(src)
    order = textio.stable_order(cols["user_id"], cols["timestamp"])
    user, item, t, action = (cols[k][order] for k in ("user_id", "item_id", "timestamp", "action"))
    files = [textio.write_parquet({"user_id": user, "timestamp": t, "action": action, "item_id": item},
                                  out / "events.parquet")]
    counts: dict[str, int] = {f"{a}_events": int((action == a).sum()) for a in ACTIONS}
    counts.update(users=int(np.unique(user).size), items=int(np.unique(item).size), max_item_id=int(item.max()))

    view = action == "view"
    labels = {a: followed_within(user, item, t, view, action == a, HORIZON).astype(np.int8) for a in ("cart", "buy")}
    n = int(view.sum())
    exposures = {"exposure_id": np.arange(n, dtype=np.int64), "user_id": user[view], "timestamp": t[view],
                 "scenario": np.full(n, SCENARIO, dtype=object), "item_id": item[view], **labels}
    files.append(textio.write_parquet(exposures, out / "exposures.parquet"))
    counts.update(exposures=n, cart_labels=int(labels["cart"].sum()), buy_labels=int(labels["buy"].sum()))

    test_path = src / "test_purchases.csv"
    if test_path.is_file():
        test = textio.read_columns(test_path, TEST_COLUMNS)
        users, last = np.unique(user, return_index=True)  # rows are sorted by user, then time
        last = np.append(last[1:], user.size) - 1
        pos = np.searchsorted(users, test["user_id"])
        missing = np.flatnonzero((pos >= users.size) | (users[np.minimum(pos, users.size - 1)] != test["user_id"]))
        if missing.size:
            raise DataError(f"{test_path}: data row {missing[0] + 1}: user {test['user_id'][missing[0]]} has no events")
        stamps = t[last[pos]] + 1
        files.append(textio.write_parquet({**test, "timestamp": stamps}, out / "test_purchases.parquet"))
        counts["test_purchases"] = int(test["user_id"].size)
        counts["items_with_test_purchases"] = int(np.union1d(item, test["item_id"]).size)
    notes = (
        f"exposures = views (scenario {SCENARIO!r}); cart/buy = same user and item within {HORIZON} s after the view",
        "test_purchases timestamps are synthetic: the user's last event + 1 s",
    )
    return ConvertReport("retailrocket", layout, tuple(files), counts, notes[: 1 + test_path.is_file()])

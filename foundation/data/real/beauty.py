"""Amazon Beauty as next-item sequences.

Source layouts, recognised by the files present in the source folder (first match wins):

``sequences.txt`` or ``Beauty.txt`` (S3Rec preprocessing, 5-core; the shared copy)
    one line per user: ``user item item ...``, ids from 1, oldest item first, no timestamps. Each event gets
    a **synthetic timestamp = its 0-based position** in the user's sequence (monotone, one second apart).
    ``item_attributes.json`` (or ``Beauty_item2attributes.json``), ``{item id: [attribute ids]}``, is
    written as the side table ``items.parquet`` (``item_id``, ``attribute_ids: list<int64>``). The shipped
    config does not use it: the spec has no multi-valued feature type yet.
``reviews_Beauty_5.json[.gz]`` or ``Beauty_5.json[.gz]`` (McAuley's 5-core review files, JSON lines)
    fields ``reviewerID``, ``asin``, ``unixReviewTime``. Events keep the review times (day resolution; ties
    in file order). Ids are renumbered from 1: users in order of first appearance in the file, items in
    order of first appearance along the users' chronological sequences (users in id order).
    ``user_map.parquet`` / ``item_map.parquet`` map the new ids back (``id``, ``original``). No further
    filtering is applied, so counts can differ slightly from the S3Rec copy.

Output: ``events.parquet`` with ``user_id, timestamp, action="review", item_id``, sorted by user then
time. Bad input is handled as in :mod:`.sequences` (DataError naming the line; empty sequences skipped and
counted). The next-item config (``configs/real/amazon-beauty``) uses an identity item vocabulary of
12,102 rows (ids 1..12,101; row 0 unused) and keeps the last 50 items.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from recfm.errors import DataError
from recfm.foundation.data.real import sequences, textio
from recfm.foundation.data.real.report import ConvertReport

ACTION = "review"
SEQUENCE_FILES = ("sequences.txt", "Beauty.txt")
ATTRIBUTE_FILES = ("item_attributes.json", "Beauty_item2attributes.json")
REVIEW_FILES = ("reviews_Beauty_5.json", "reviews_Beauty_5.json.gz", "Beauty_5.json", "Beauty_5.json.gz")
REVIEW_KEYS = ("reviewerID", "asin", "unixReviewTime")


def _first(src: Path, names: tuple[str, ...]) -> Path | None:
    return next((src / n for n in names if (src / n).is_file()), None)


def read_attributes(path: Path) -> pa.Table:
    """``items.parquet`` rows from ``{item id: [attribute ids]}``, sorted by item id."""
    try:
        raw = json.loads(textio.read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected an object {{item id: [attribute ids]}}")
    rows = []
    for key, attrs in raw.items():
        if not key.isdigit() or not isinstance(attrs, list) or not all(isinstance(a, int) for a in attrs):
            raise DataError(f"{path}: item {key!r}: expected an integer id mapped to a list of integers")
        rows.append((int(key), attrs))
    rows.sort()
    return pa.table({
        "item_id": pa.array([r[0] for r in rows], pa.int64()),
        "attribute_ids": pa.array([r[1] for r in rows], pa.list_(pa.int64())),
    })


def read_reviews(path: Path) -> tuple[sequences.SequenceLog, dict[str, np.ndarray]]:
    """Sequences from McAuley's JSON-lines reviews, renumbered; also the id maps."""
    user_ids: dict[str, int] = {}
    users, asins, times = [], [], []
    for number, line in textio.lines(path):
        try:
            rec = json.loads(line)
            row = [rec[k] for k in REVIEW_KEYS]
            t = int(row[2])
        except (json.JSONDecodeError, TypeError, ValueError):
            raise DataError(f"{path}:{number}: not a JSON review object: {line[:80]!r}") from None
        except KeyError as e:
            raise DataError(f"{path}:{number}: missing key {e.args[0]!r} (need {', '.join(REVIEW_KEYS)})") from None
        users.append(user_ids.setdefault(str(row[0]), len(user_ids) + 1))
        asins.append(str(row[1]))
        times.append(t)
    if not users:
        raise DataError(f"{path}: no reviews")
    u, t = np.asarray(users, dtype=np.int64), np.asarray(times, dtype=np.int64)
    order = textio.stable_order(u, t)
    item_ids: dict[str, int] = {}
    ordered = [item_ids.setdefault(asins[i], len(item_ids) + 1) for i in order]
    items = np.empty(len(asins), dtype=np.int64)
    items[order] = ordered
    log = sequences.from_rows(u, items, t, None, path, 1)
    maps = {
        "user_map.parquet": np.asarray(list(user_ids), dtype=object),
        "item_map.parquet": np.asarray(list(item_ids), dtype=object),
    }
    return log, maps


def convert_beauty(src: Path, out: Path) -> ConvertReport:
    files: list[str] = []
    counts: dict[str, int] = {}
    seq_path = _first(src, SEQUENCE_FILES)
    review_path = _first(src, REVIEW_FILES)
    if seq_path is not None:
        log = sequences.read_sequence_file(seq_path, user_sep=" ", header=False)
        layout = f"{seq_path.name} (S3Rec preprocessing)"
        attr_path = _first(src, ATTRIBUTE_FILES)
        if attr_path is not None:
            items = read_attributes(attr_path)
            files.append(textio.write_parquet(items, out / "items.parquet"))
            counts["items_with_attributes"] = items.num_rows
        note = "timestamps are synthetic (position in the user's sequence, 1 s apart)"
    elif review_path is not None:
        log, maps = read_reviews(review_path)
        layout = f"{review_path.name} (McAuley reviews, JSON lines)"
        for name, originals in maps.items():
            ids = np.arange(1, originals.size + 1, dtype=np.int64)
            files.append(textio.write_parquet({"id": ids, "original": originals}, out / name))
        note = "timestamps are the review times (unix seconds, day resolution); ties in file order"
    else:
        wanted = ", ".join(SEQUENCE_FILES + REVIEW_FILES)
        raise DataError(f"{src}: none of {wanted} found (file not found)")
    files.insert(0, textio.write_parquet(sequences.to_events(log, ACTION), out / "events.parquet"))
    return ConvertReport("amazon-beauty", layout, tuple(files), {**sequences.counts(log), **counts}, (note,))

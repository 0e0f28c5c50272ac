"""MovieLens-100K with real timestamps, user profiles and item features; binary ``like`` label.

Source layouts, recognised by the files present (first match wins):

``ratings.tsv`` + ``users.tsv`` + ``items.tsv`` (the shared copy, tab-separated with headers)
    ``user_id item_id rating timestamp``; ``user_id age gender occupation zip_code``;
    ``item_id movie_title release_year class`` (``class``: space-separated genre names).
``u.data`` + ``u.user`` + ``u.item`` (GroupLens' original)
    ``u.data`` tab-separated without header; ``u.user`` ``id|age|gender|occupation|zip``; ``u.item``
    ``id|title|release date|video release date|IMDb URL|19 genre flags`` (Latin-1).

Choices:

* Every rating is both an **event** (``action = "rate"``, with ``item_id``, ``rating``, ``genre``) and an
  **exposure** of scenario ``movies`` at its real timestamp with label ``like = rating >= 4`` (the
  ``rating`` column is kept for a regression variant). Exposures see only events strictly before their own
  time, so a rating never sees itself nor the other ratings of the same second. Train/test is a time
  split done by windowing (one-day windows in ``configs/real/ml-100k``).
* User profile: ``age`` (years, raw; the config bucketises it at 18/25/35/45/50/56), ``gender`` (M=0,
  F=1), ``occupation`` (index in :data:`OCCUPATIONS`, GroupLens' ``u.occupation`` order).
* Item features: ``genre`` = the first of the movie's genres in GroupLens' flag order (:data:`GENRES`;
  the other genres are dropped: the spec has no multi-valued feature yet), ``year_bucket`` = 0 when the
  release year is unknown, else ``1 + #boundaries <= year`` over :data:`YEAR_BOUNDARIES` (1..8). A
  release year that is not a number falls back to a trailing ``(YYYY)`` in the title.

A rating of an unknown user or item, an unknown gender/occupation/genre, or a malformed line is a
DataError naming the file and line (or data row).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from recfm.errors import DataError
from recfm.foundation.data.real import textio
from recfm.foundation.data.real.report import ConvertReport

SCENARIO = "movies"
ACTION = "rate"
LIKE_THRESHOLD = 4
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
OCCUPATIONS = ("administrator", "artist", "doctor", "educator", "engineer", "entertainment", "executive",
               "healthcare", "homemaker", "lawyer", "librarian", "marketing", "none", "other", "programmer",
               "retired", "salesman", "scientist", "student", "technician", "writer")
GENDERS = {"M": 0, "F": 1}
YEAR_BOUNDARIES = (1960, 1970, 1980, 1990, 1995, 1996, 1997)
RATING_COLUMNS = {"user_id": textio.INT, "item_id": textio.INT, "rating": textio.INT, "timestamp": textio.INT}
_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")


def _int(text: str, path: Path, number: int, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataError(f"{path}:{number}: {what} {text!r} is not an integer") from None


def _fields(path: Path, sep: str, n: int, header: bool):
    for number, line in textio.lines(path):
        if header and number == 1:
            continue
        parts = line.split(sep)
        if len(parts) != n:
            raise DataError(f"{path}:{number}: expected {n} {sep!r}-separated fields, got {len(parts)}")
        yield number, parts


def _year(text: str, title: str) -> int:
    text = text.strip()
    if text[-4:].isdigit():
        return int(text[-4:])
    m = _YEAR_IN_TITLE.search(title)
    return int(m.group(1)) if m else 0


def year_bucket(year: int) -> int:
    return 0 if year <= 0 else 1 + int(np.searchsorted(YEAR_BOUNDARIES, year, side="right"))


def read_users(path: Path, sep: str, header: bool) -> dict[int, tuple[int, int, int]]:
    """``{user_id: (age, gender, occupation)}``."""
    users: dict[int, tuple[int, int, int]] = {}
    for number, (uid, age, gender, occupation, _zip) in _fields(path, sep, 5, header):
        user = _int(uid, path, number, "user id")
        if user in users:
            raise DataError(f"{path}:{number}: user {user} listed twice")
        if gender not in GENDERS:
            raise DataError(f"{path}:{number}: gender {gender!r} not in {sorted(GENDERS)}")
        if occupation not in OCCUPATIONS:
            raise DataError(f"{path}:{number}: unknown occupation {occupation!r}")
        users[user] = (_int(age, path, number, "age"), GENDERS[gender], OCCUPATIONS.index(occupation))
    return users


def read_items(path: Path, original: bool) -> dict[int, tuple[int, int]]:
    """``{item_id: (genre, year_bucket)}``."""
    items: dict[int, tuple[int, int]] = {}
    rows = _fields(path, "|", 5 + len(GENRES), False) if original else _fields(path, "\t", 4, True)
    for number, parts in rows:
        item = _int(parts[0], path, number, "item id")
        if item in items:
            raise DataError(f"{path}:{number}: item {item} listed twice")
        if original:
            flags = [i for i, f in enumerate(parts[5:]) if f.strip() == "1"]
            genre, year = (flags[0] if flags else 0), _year(parts[2], parts[1])
        else:
            names = parts[3].split()
            bad = [g for g in names if g not in GENRES]
            if bad:
                raise DataError(f"{path}:{number}: unknown genre {bad[0]!r} (known: {', '.join(GENRES)})")
            genre, year = (min(GENRES.index(g) for g in names) if names else 0), _year(parts[2], parts[1])
        items[item] = (genre, year_bucket(year))
    return items


def read(src: Path):
    if (src / "ratings.tsv").is_file():
        ratings = textio.read_columns(textio.require(src, "ratings.tsv"), RATING_COLUMNS, delimiter="\t")
        users = read_users(textio.require(src, "users.tsv"), "\t", True)
        items = read_items(textio.require(src, "items.tsv"), original=False)
        return ratings, users, items, src / "ratings.tsv", "ratings.tsv + users.tsv + items.tsv (shared copy)"
    if (src / "u.data").is_file():
        ratings = textio.read_columns(src / "u.data", RATING_COLUMNS, delimiter="\t", header=False)
        users = read_users(textio.require(src, "u.user"), "|", False)
        items = read_items(textio.require(src, "u.item"), original=True)
        return ratings, users, items, src / "u.data", "u.data + u.user + u.item (GroupLens original)"
    raise DataError(f"{src}: neither ratings.tsv nor u.data found (file not found)")


def _lookup(table: dict[int, tuple], ids: np.ndarray, path: Path, what: str) -> np.ndarray:
    """``[len(ids), width]`` int64 rows of ``table``; DataError naming the first unknown id's data row."""
    keys = np.fromiter(table, dtype=np.int64, count=len(table))
    rows = np.asarray(list(table.values()), dtype=np.int64)
    order = np.argsort(keys)
    keys, rows = keys[order], rows[order]
    pos = np.minimum(np.searchsorted(keys, ids), keys.size - 1)
    bad = np.flatnonzero(keys[pos] != ids)
    if bad.size:
        raise DataError(f"{path}: data row {bad[0] + 1}: unknown {what} {ids[bad[0]]}")
    return rows[pos]


def convert_ml100k(src: Path, out: Path) -> ConvertReport:
    ratings, users, items, rpath, layout = read(src)
    if ratings["user_id"].size == 0:
        raise DataError(f"{rpath}: no data rows")
    bad = np.flatnonzero((ratings["rating"] < 1) | (ratings["rating"] > 5))
    if bad.size:
        raise DataError(f"{rpath}: data row {bad[0] + 1}: rating {ratings['rating'][bad[0]]} outside 1..5")
    order = textio.stable_order(ratings["user_id"], ratings["timestamp"])
    r = {k: v[order] for k, v in ratings.items()}
    prof = _lookup(users, r["user_id"], rpath, "user")
    feat = _lookup(items, r["item_id"], rpath, "item")
    n = r["user_id"].size
    events = {"user_id": r["user_id"], "timestamp": r["timestamp"], "action": np.full(n, ACTION, dtype=object),
              "item_id": r["item_id"], "rating": r["rating"], "genre": feat[:, 0]}
    like = (r["rating"] >= LIKE_THRESHOLD).astype(np.int8)
    exposures = {"exposure_id": np.arange(n, dtype=np.int64), "user_id": r["user_id"], "timestamp": r["timestamp"],
                 "scenario": np.full(n, SCENARIO, dtype=object), "item_id": r["item_id"], "genre": feat[:, 0],
                 "year_bucket": feat[:, 1], "age": prof[:, 0], "gender": prof[:, 1], "occupation": prof[:, 2],
                 "like": like, "rating": r["rating"]}
    files = (textio.write_parquet(events, out / "events.parquet"),
             textio.write_parquet(exposures, out / "exposures.parquet"))
    counts = {"users": int(np.unique(r["user_id"]).size), "items": int(np.unique(r["item_id"]).size),
              "ratings": n, "users_listed": len(users), "items_listed": len(items),
              "max_item_id": int(r["item_id"].max()), "exposures": n, "likes": int(like.sum()),
              "items_unknown_year": sum(1 for _, b in items.values() if b == 0)}
    notes = (f"every rating is an event and an exposure ({SCENARIO!r}); like = rating >= {LIKE_THRESHOLD}",
             "genre = first genre in GroupLens order; year_bucket 0 = unknown release year")
    return ConvertReport("ml-100k", layout, files, counts, notes)

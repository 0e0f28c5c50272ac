"""MovieLens-1M as next-item sequences.

Source layouts, recognised by the files present in the source folder (first match wins):

``sequences.csv`` (the shared copy)
    header ``user_id,item_ids``, then one line per user, movie ids space-separated, oldest first. There are
    no timestamps and no ratings: each event gets a **synthetic timestamp = its 0-based position** in the
    user's sequence (monotone, one second apart, all in the first day of 1970). Time-based windowing is
    therefore meaningless for this layout; the next-item recipes split by position (leave-last-out).
``ratings.dat`` (GroupLens' original)
    ``UserID::MovieID::Rating::Timestamp``, no header. Events keep the real timestamps and the rating; a
    user's sequence is ordered by timestamp, ties in file order.

Output (``out/``): ``events.parquet`` with ``user_id, timestamp, action="rate", item_id`` (+ ``rating`` for
``ratings.dat``), sorted by user then time. Every rating counts as an interaction (no rating threshold), as
in the HSTU and SASRec ML-1M recipes. Movie ids are GroupLens' own (1..3952), so the configs in
``configs/real/ml-1m`` use an identity item vocabulary of 3953 rows (row 0 unused: padding).

Movie side file (``movies.dat``, both layouts): ``MovieID::Title::Genres``, genres ``|``-separated, the
release year in parentheses at the end of the title. :func:`read_movies` turns it into attribute tokens
(``genre:<name>``, ``year:<yyyy>``) for the next-item recipes' ``embedding.item_attributes``.

Bad input (see :mod:`.sequences`): a user listed twice, an item id < 1 or a malformed line is a DataError
naming the line; an empty sequence is skipped and counted; short sequences are kept and counted.
"""

from __future__ import annotations

import re
from pathlib import Path

from recfm.errors import DataError
from recfm.foundation.data.real import sequences, textio
from recfm.foundation.data.real.report import ConvertReport

ACTION = "rate"
SEQUENCES_HEADER = "user_id,item_ids"
RATINGS_COLUMNS = {"user_id": textio.INT, "item_id": textio.INT, "rating": textio.INT, "timestamp": textio.INT}


def read(src: Path) -> tuple[sequences.SequenceLog, str]:
    """The user sequences of a source folder and the name of the layout found."""
    if (src / "sequences.csv").is_file():
        path = src / "sequences.csv"
        if textio.first_line(path).strip() != SEQUENCES_HEADER:
            raise DataError(f"{path}:1: expected header {SEQUENCES_HEADER!r}, got {textio.first_line(path)[:80]!r}")
        return sequences.read_sequence_file(path, user_sep=",", header=True), "sequences.csv (shared copy)"
    if (src / "ratings.dat").is_file():
        path = src / "ratings.dat"
        cols = textio.read_columns(path, RATINGS_COLUMNS, delimiter="::", header=False)
        log = sequences.from_rows(cols["user_id"], cols["item_id"], cols["timestamp"], cols["rating"], path, 1)
        return log, "ratings.dat (GroupLens original)"
    raise DataError(f"{src}: neither sequences.csv nor ratings.dat found (file not found)")


MOVIES_FILE = "movies.dat"
_YEAR = re.compile(r"\((\d{4})\)\s*$")


def read_movies(path: Path) -> dict[int, list[str]]:
    """``{movie id: attribute tokens}`` from ``movies.dat``: one ``genre:<name>`` per genre, then ``year:<yyyy>``
    when the title ends with a year in parentheses. A malformed line, a duplicated or non-positive id: a
    DataError naming the line."""
    out: dict[int, list[str]] = {}
    for number, line in textio.lines(path):
        parts = line.split("::")
        if len(parts) != 3 or not parts[0].isdigit() or int(parts[0]) < 1:
            raise DataError(f"{path}:{number}: expected 'MovieID::Title::Genres' with a positive id, got {line[:80]!r}")
        movie, title, genres = int(parts[0]), parts[1], parts[2]
        if movie in out:
            raise DataError(f"{path}:{number}: movie {movie} listed twice")
        tokens = [f"genre:{g}" for g in genres.split("|") if g]
        year = _YEAR.search(title)
        if year:
            tokens.append(f"year:{year.group(1)}")
        out[movie] = tokens
    return out


def convert_ml1m(src: Path, out: Path) -> ConvertReport:
    log, layout = read(src)
    files = (textio.write_parquet(sequences.to_events(log, ACTION), out / "events.parquet"),)
    synthetic = log.ratings is None
    notes = (
        "timestamps are synthetic (position in the user's sequence, 1 s apart)" if synthetic
        else "timestamps are GroupLens' (unix seconds); ties kept in file order",
        "item ids are MovieLens movie ids; identity vocabulary size max_item_id + 1",
    )
    return ConvertReport("ml-1m", layout, files, sequences.counts(log), notes)

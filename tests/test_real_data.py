"""Converters of the public datasets (foundation/data/real) and the configs in configs/real.

Fast tests parse tiny inline fixtures in the publishers' own layouts and check hand-computed outputs and
errors; tests marked ``data`` convert the shared copies in ../shared/data and check the counts of its README.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from recfm.errors import DataError, RecfmError
from recfm.foundation.data.real import douban, ml100k, retailrocket
from recfm.foundation.data.real.convert import CONVERTERS, convert

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CONFIGS = ROOT / "configs" / "real"


def _read(path: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in pq.read_table(path).to_pydict().items()}


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ dispatch


def test_unknown_dataset_lists_known_names(tmp_path):
    with pytest.raises(RecfmError) as e:
        convert("movielens", tmp_path, tmp_path / "out")
    for name in CONVERTERS:
        assert name in str(e.value)


def test_missing_source_folder_and_file_are_named(tmp_path):
    with pytest.raises(DataError, match="source folder not found"):
        convert("ml-1m", tmp_path / "nope", tmp_path / "out")
    _write(tmp_path / "src", "ratings.tsv", "user_id\titem_id\trating\ttimestamp\n1\t1\t5\t10\n")
    with pytest.raises(DataError, match=r"users\.tsv: file not found"):
        convert("ml-100k", tmp_path / "src", tmp_path / "out")
    with pytest.raises(DataError, match="sequences.csv nor ratings.dat"):
        convert("ml-1m", tmp_path / "src", tmp_path / "out")


# ------------------------------------------------------------------------------------------ ML-1M


def test_ml1m_original_ratings_dat_sorted_by_time_ties_in_file_order(tmp_path):
    _write(tmp_path, "ratings.dat", "2::10::3::500\n1::7::5::300\n1::3::4::100\n1::9::1::300\n2::11::2::400\n")
    report = convert("ml-1m", tmp_path, tmp_path / "out")
    ev = _read(tmp_path / "out" / "events.parquet")
    assert ev["user_id"].tolist() == [1, 1, 1, 2, 2]
    assert ev["item_id"].tolist() == [3, 7, 9, 11, 10]  # 7 and 9 tie at t=300: file order
    assert ev["timestamp"].tolist() == [100, 300, 300, 400, 500]
    assert ev["rating"].tolist() == [4, 5, 1, 2, 3]
    assert set(ev["action"]) == {"rate"}
    assert report.source_format.startswith("ratings.dat")
    saved = json.loads((tmp_path / "out" / "convert_report.json").read_text())
    assert saved["counts"]["interactions"] == 5 and saved["counts"]["users"] == 2


def test_ml1m_sequences_synthetic_times_and_skips(tmp_path):
    _write(tmp_path, "sequences.csv", "user_id,item_ids\n5,4 2 9\n3,\n1,7 7\n")
    report = convert("ml-1m", tmp_path, tmp_path / "out")
    ev = _read(tmp_path / "out" / "events.parquet")
    assert ev["user_id"].tolist() == [1, 1, 5, 5, 5]  # sorted by user, order within user kept
    assert ev["item_id"].tolist() == [7, 7, 4, 2, 9]
    assert ev["timestamp"].tolist() == [0, 1, 0, 1, 2]  # position in the sequence
    assert report.counts["empty_sequences_skipped"] == 1
    assert report.counts["sequences_shorter_than_3"] == 1
    assert "rating" not in ev


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("user_id,item_ids\n1,3 4\n2,5\n1,6\n", r"sequences\.csv:4: user 1 appears again \(first at line 2\)"),
        ("user_id,item_ids\n1,3 4\n2,5 0 6\n", r"sequences\.csv:3: user 2: item id 0 out of range"),
        ("user_id,item_ids\n1,3 4\n2,5 x 6\n", r"sequences\.csv:3: items of user 2: 'x' is not an integer"),
        ("user_id,item_ids\n1,3 4\n2 5 6\n", r"sequences\.csv:3: expected 'user_id,item ids'"),
        ("user,items\n1,3 4\n", r"sequences\.csv:1: expected header"),
    ],
)
def test_ml1m_sequences_bad_input_names_the_line(tmp_path, text, match):
    _write(tmp_path, "sequences.csv", text)
    with pytest.raises(DataError, match=match):
        convert("ml-1m", tmp_path, tmp_path / "out")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("1::2::3::4\n1::2::3\n", r"ratings\.dat:2: expected 4 '::'-separated fields"),
        ("1::2::3::4\n1::5::3::4\n2::7::4::soon\n", r"ratings\.dat:3: column 'timestamp': 'soon' is not an integer"),
        ("1::2::3::4\n1::0::3::4\n", r"ratings\.dat:2: item id 0 out of range"),
    ],
)
def test_ml1m_ratings_dat_malformed_line_is_named(tmp_path, text, match):
    _write(tmp_path, "ratings.dat", text)
    with pytest.raises(DataError, match=match):
        convert("ml-1m", tmp_path, tmp_path / "out")


# ------------------------------------------------------------------------------------------ Beauty


def test_beauty_sequences_and_attributes(tmp_path):
    _write(tmp_path, "sequences.txt", "2 3 1\n1 1 2 3\n")
    _write(tmp_path, "item_attributes.json", '{"3": [7], "1": [4, 5], "2": []}')
    convert("amazon-beauty", tmp_path, tmp_path / "out")
    ev = _read(tmp_path / "out" / "events.parquet")
    assert ev["user_id"].tolist() == [1, 1, 1, 2, 2]
    assert ev["item_id"].tolist() == [1, 2, 3, 3, 1]
    assert set(ev["action"]) == {"review"}
    items = pq.read_table(tmp_path / "out" / "items.parquet").to_pydict()
    assert items == {"item_id": [1, 2, 3], "attribute_ids": [[4, 5], [], [7]]}


def test_beauty_original_reviews_renumbered_in_time_order(tmp_path):
    rows = [("B", "x", 30), ("A", "y", 20), ("A", "x", 10), ("B", "z", 5), ("A", "z", 20)]
    _write(tmp_path, "reviews_Beauty_5.json", "".join(
        json.dumps({"reviewerID": u, "asin": a, "unixReviewTime": t, "overall": 5.0}) + "\n" for u, a, t in rows))
    convert("amazon-beauty", tmp_path, tmp_path / "out")
    ev = _read(tmp_path / "out" / "events.parquet")
    # users by first appearance: B=1, A=2. B's items in time order: z(5), x(30) -> z=1, x=2;
    # A's: x(10)=2, then y and z tie at 20: file order y, z -> y=3, z=1.
    assert ev["user_id"].tolist() == [1, 1, 2, 2, 2]
    assert ev["item_id"].tolist() == [1, 2, 2, 3, 1]
    assert ev["timestamp"].tolist() == [5, 30, 10, 20, 20]
    imap = pq.read_table(tmp_path / "out" / "item_map.parquet").to_pydict()
    assert imap == {"id": [1, 2, 3], "original": ["z", "x", "y"]}


def test_beauty_review_missing_key_names_line(tmp_path):
    _write(tmp_path, "reviews_Beauty_5.json", '{"reviewerID": "A", "asin": "x", "unixReviewTime": 1}\n'
                                              '{"reviewerID": "A", "asin": "y"}\n')
    with pytest.raises(DataError, match=r"reviews_Beauty_5\.json:2: missing key 'unixReviewTime'"):
        convert("amazon-beauty", tmp_path, tmp_path / "out")


# ------------------------------------------------------------------------------------------ Douban


def _douban_fixture(folder: Path, rng: np.random.Generator) -> dict[str, list[tuple[int, int, int]]]:
    """GA-DTCDR layout: tab-separated, no header, an extra column that must be ignored."""
    rows = {}
    for d, n_items in (("book", 40), ("music", 30)):
        rows[d] = [(u, i, int(rng.integers(1, 6))) for u in range(1, 9) for i in rng.choice(
            np.arange(1, n_items + 1), size=int(rng.integers(1, 12)), replace=False).tolist()]
        _write(folder, f"douban_{d}/ratings.dat", "".join(f"{u}\t{i}\t{r}\textra\n" for u, i, r in rows[d]))
    return rows


def test_douban_labels_split_times_and_negatives(tmp_path):
    rows = _douban_fixture(tmp_path, np.random.default_rng(3))
    report = convert("douban", tmp_path, tmp_path / "out")
    ev, ex = _read(tmp_path / "out" / "events.parquet"), _read(tmp_path / "out" / "exposures.parquet")
    assert report.source_format.endswith("(GA-DTCDR layout)")
    for d, rated in rows.items():
        rating = {(u, i): r for u, i, r in rated}
        mine = ex["scenario"] == d
        real = mine & (ex["sampled"] == 0)
        got = sorted(zip(ex["user_id"][real].tolist(), ex["item_id"][real].tolist(), ex["like"][real].tolist()))
        assert got == sorted((u, i, int(r >= 4)) for (u, i), r in rating.items())
        fake = mine & (ex["sampled"] == 1)
        assert fake.sum() == sum(r >= 4 for r in rating.values())  # one negative per like
        assert not any((u, i) in rating for u, i in zip(ex["user_id"][fake], ex["item_id"][fake]))
        assert (ex["like"][fake] == 0).all()
        for u in set(u for u, _, _ in rated):  # floor(20%) of each user's ratings in this domain are test
            n = sum(1 for v, _, _ in rated if v == u)
            assert (real & (ex["user_id"] == u) & (ex["split"] == "test")).sum() == int(np.floor(0.2 * n))
        # events: exactly the train ratings, with their ratings
        e = ev["action"] == f"{d}_rate"
        train = real & (ex["split"] == "train")
        assert sorted(zip(ev["user_id"][e], ev["item_id"][e], ev["rating"][e])) == sorted(
            (u, i, rating[(u, i)]) for u, i in zip(ex["user_id"][train], ex["item_id"][train]))
    test = ex["split"] == "test"
    day = 86400
    assert (ex["timestamp"][test] // day == douban.TEST_DAY // day).all()
    assert (ex["timestamp"][~test] // day == douban.TRAIN_DAY // day).all()
    assert (ev["timestamp"] // day == douban.TRAIN_DAY // day).all()
    # deterministic
    convert("douban", tmp_path, tmp_path / "again")
    assert _read(tmp_path / "again" / "exposures.parquet").keys() == ex.keys()
    for k, v in _read(tmp_path / "again" / "exposures.parquet").items():
        assert (v == ex[k]).all(), k


@pytest.mark.parametrize(
    ("book", "match"),
    [
        ("user_id,item_id,rating\n1,2,5\n1,3,4\n1,2,1\n", r"book_ratings\.csv: data row 3: user 1 rated item 2 again"),
        ("user_id,item_id,rating\n1,2,5\n1,3,9\n", r"book_ratings\.csv: data row 2: rating 9 out of range"),
        ("user_id,item_id,rating\n1,2,5\n1,3\n", r"book_ratings\.csv:3: expected 3"),
    ],
)
def test_douban_bad_rows_are_named(tmp_path, book, match):
    _write(tmp_path, "book_ratings.csv", book)
    _write(tmp_path, "music_ratings.csv", "user_id,item_id,rating\n1,2,5\n")
    with pytest.raises(DataError, match=match):
        convert("douban", tmp_path, tmp_path / "out")


def test_douban_missing_second_domain_is_named(tmp_path):
    _write(tmp_path, "book_ratings.csv", "user_id,item_id,rating\n1,2,5\n")
    with pytest.raises(DataError, match=r"music_ratings\.csv: file not found"):
        convert("douban", tmp_path, tmp_path / "out")


# ------------------------------------------------------------------------------------------ Retailrocket


def test_retailrocket_original_layout_ms_and_renamed_events(tmp_path):
    h = 86400
    _write(tmp_path, "events.csv", "timestamp,visitorid,event,itemid,transactionid\n" + "".join(
        f"{t * 1000 + 999},{u},{e},{i},{x}\n" for t, u, e, i, x in [
            (1000, 7, "view", 5, ""),
            (1100, 7, "addtocart", 5, ""),
            (1000 + h + 1, 7, "transaction", 5, "42"),  # one second past the horizon of the first view
            (2000, 7, "view", 5, ""),  # after the cart; the buy is within a day of it
            (500, 8, "view", 6, ""),
            (400, 8, "transaction", 6, "43"),  # before the view: no label
        ]))
    report = convert("retailrocket", tmp_path, tmp_path / "out")
    ev, ex = _read(tmp_path / "out" / "events.parquet"), _read(tmp_path / "out" / "exposures.parquet")
    assert ev["action"].tolist() == ["view", "cart", "view", "buy", "buy", "view"]
    assert ev["timestamp"].tolist() == [1000, 1100, 2000, 1000 + h + 1, 400, 500]  # ms floored to s
    assert ex["user_id"].tolist() == [7, 7, 8] and ex["timestamp"].tolist() == [1000, 2000, 500]
    assert ex["cart"].tolist() == [1, 0, 0]
    assert ex["buy"].tolist() == [0, 1, 0]
    assert set(ex["scenario"]) == {"shop"}
    assert report.counts["view_events"] == 3 and "test_purchases" not in report.counts


def test_retailrocket_labels_match_brute_force():
    rng = np.random.default_rng(0)
    n = 400
    user, item = rng.integers(0, 5, n), rng.integers(0, 4, n)
    t = rng.integers(0, 10, n) * 40000
    kind = rng.integers(0, 3, n)
    got = retailrocket.followed_within(user, item, t, kind == 0, kind == 1, 86400)
    want = [any(user[j] == user[i] and item[j] == item[i] and t[i] <= t[j] <= t[i] + 86400
                for j in np.flatnonzero(kind == 1)) for i in np.flatnonzero(kind == 0)]
    assert got.tolist() == want


def test_retailrocket_bad_header_and_behaviour(tmp_path):
    _write(tmp_path, "events.csv", "user,item,what,when\n1,2,view,3\n")
    with pytest.raises(DataError, match=r"events\.csv:1: expected header"):
        convert("retailrocket", tmp_path, tmp_path / "out")
    _write(tmp_path, "events.csv", "user_id,item_id,behavior,timestamp\n1,2,view,3\n1,2,like,4\n")
    with pytest.raises(DataError, match=r"events\.csv: data row 2: unknown behaviour 'like'"):
        convert("retailrocket", tmp_path, tmp_path / "out")


# ------------------------------------------------------------------------------------------ ML-100K


def test_ml100k_original_layout_features(tmp_path):
    flags = lambda *on: "|".join("1" if i in on else "0" for i in range(19))  # noqa: E731
    _write(tmp_path, "u.data", "1\t2\t5\t300\n2\t1\t3\t100\n1\t1\t4\t200\n")
    _write(tmp_path, "u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n")
    _write(tmp_path, "u.item",
           f"1|Toy Story (1995)|01-Jan-1995||http://x|{flags(3, 4, 5)}\n"
           f"2|Old Film (1931)|||http://y|{flags(8)}\n")
    convert("ml-100k", tmp_path, tmp_path / "out")
    ex = _read(tmp_path / "out" / "exposures.parquet")
    assert ex["user_id"].tolist() == [1, 1, 2] and ex["item_id"].tolist() == [1, 2, 1]
    assert ex["like"].tolist() == [1, 1, 0]
    assert ex["genre"].tolist() == [3, 8, 3]  # Animation; Drama
    assert ex["year_bucket"].tolist() == [6, 1, 6]  # 1995 -> 1 + 5 boundaries <= 1995; 1931 (from title) -> 1
    assert ex["age"].tolist() == [24, 24, 53] and ex["gender"].tolist() == [0, 0, 1]
    assert ex["occupation"].tolist() == [ml100k.OCCUPATIONS.index(o) for o in ("technician", "technician", "other")]
    ev = _read(tmp_path / "out" / "events.parquet")
    assert ev["timestamp"].tolist() == [200, 300, 100] and ev["rating"].tolist() == [4, 5, 3]


def test_ml100k_unknown_user_and_bad_gender(tmp_path):
    _write(tmp_path, "ratings.tsv", "user_id\titem_id\trating\ttimestamp\n1\t1\t5\t10\n9\t1\t4\t11\n")
    _write(tmp_path, "users.tsv", "user_id\tage\tgender\toccupation\tzip_code\n1\t20\tM\tother\t1\n")
    _write(tmp_path, "items.tsv", "item_id\tmovie_title\trelease_year\tclass\n1\tA\t1990\tDrama\n")
    with pytest.raises(DataError, match=r"ratings\.tsv: data row 2: unknown user 9"):
        convert("ml-100k", tmp_path, tmp_path / "out")
    _write(tmp_path, "users.tsv", "user_id\tage\tgender\toccupation\tzip_code\n1\t20\tX\tother\t1\n")
    with pytest.raises(DataError, match=r"users\.tsv:2: gender 'X'"):
        convert("ml-100k", tmp_path, tmp_path / "out")


# ------------------------------------------------------------------------------------------ configs


def _config_files() -> list[Path]:
    return sorted(CONFIGS.rglob("*.yaml"))


def test_every_real_config_loads():
    loader = pytest.importorskip("recfm.scenarios.loader", reason="scenarios/loader.py not written yet")
    files = _config_files()
    worlds = [f for f in files if f.name == "world.yaml"]
    assert {f.parent.name for f in worlds} == set(CONVERTERS)
    for f in worlds:  # a world loads every scenario file it lists; other YAML kinds: tests/test_configs.py
        assert loader.load_world(f).scenarios
    ml1m = loader.load_world(CONFIGS / "ml-1m" / "world.yaml")
    assert ml1m.sequences[0].max_length == 200 and ml1m.scenarios[0].tasks[0].type.value == "next_item"
    assert ml1m.scenarios[0].feature("item_id").vocab.size == 3953
    beauty = loader.load_world(CONFIGS / "amazon-beauty" / "world.yaml")
    assert beauty.sequences[0].max_length == 50 and beauty.scenarios[0].feature("item_id").vocab.size == 12102


# ------------------------------------------------------------------------------------------ shared data


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    if not DATA.is_dir():
        pytest.skip(f"public datasets not found at {DATA}")
    out = tmp_path_factory.mktemp("real")
    return {name: (convert(name, DATA / name, out / name), out / name) for name in CONVERTERS}


@pytest.mark.data
def test_shared_ml1m_counts(converted):
    report, out = converted["ml-1m"]
    ev = _read(out / "events.parquet")
    users, lengths = np.unique(ev["user_id"], return_counts=True)
    assert users.size == 6040 and ev["item_id"].size == 1_000_209
    assert lengths.min() == 20 and lengths.max() == 2314
    assert ev["item_id"][:3].tolist() == [3186, 1721, 1022]  # user 1's line, oldest first
    assert ev["timestamp"][: lengths[0]].tolist() == list(range(lengths[0]))
    assert report.counts["max_item_id"] < 3953


@pytest.mark.data
def test_shared_beauty_counts(converted):
    report, out = converted["amazon-beauty"]
    ev = _read(out / "events.parquet")
    assert np.unique(ev["user_id"]).size == 22_363 and np.unique(ev["item_id"]).size == 12_101
    assert ev["item_id"].size == 198_502 and ev["item_id"].min() == 1 and ev["item_id"].max() < 12102
    assert report.counts["items_with_attributes"] == 12_101


@pytest.mark.data
def test_shared_douban_counts(converted):
    _, out = converted["douban"]
    ex = _read(out / "exposures.parquet")
    real = ex["sampled"] == 0
    users = {}
    for d, n_ratings, n_users in (("book", 96_041, 2_110), ("music", 69_709, 1_672)):
        mine = real & (ex["scenario"] == d)
        assert mine.sum() == n_ratings
        users[d] = np.unique(ex["user_id"][mine])
        assert users[d].size == n_users
    assert np.intersect1d(users["book"], users["music"]).size == 1_566


@pytest.mark.data
def test_shared_retailrocket_counts(converted):
    report, out = converted["retailrocket"]
    ev = _read(out / "events.parquet")
    actions, n = np.unique(ev["action"], return_counts=True)
    assert dict(zip(actions.tolist(), n.tolist())) == {"view": 75_374, "cart": 12_456, "buy": 9_551}
    assert np.unique(ev["user_id"]).size == 2_174
    test = _read(out / "test_purchases.parquet")
    assert np.union1d(ev["item_id"], test["item_id"]).size == 30_113 and test["user_id"].size == 2_174
    assert max(ev["item_id"].max(), test["item_id"].max()) < 30113
    ex = _read(out / "exposures.parquet")
    assert ex["user_id"].size == 75_374 and (np.diff(ex["exposure_id"]) == 1).all()
    # test purchases sort after each user's last event
    last = {u: t for u, t in zip(ev["user_id"].tolist(), ev["timestamp"].tolist())}
    assert all(t == last[u] + 1 for u, t in zip(test["user_id"].tolist(), test["timestamp"].tolist()))
    assert 0 < report.counts["buy_labels"] < report.counts["exposures"]


@pytest.mark.data
def test_shared_ml100k_counts(converted):
    _, out = converted["ml-100k"]
    ex = _read(out / "exposures.parquet")
    assert np.unique(ex["user_id"]).size == 943 and np.unique(ex["item_id"]).size == 1_682
    assert ex["user_id"].size == 100_000
    assert (ex["like"] == (ex["rating"] >= 4)).all()
    first = np.flatnonzero(ex["item_id"] == 1)[0]  # Toy Story, 1995, Animation Children's Comedy
    assert ex["genre"][first] == 3 and ex["year_bucket"][first] == 6

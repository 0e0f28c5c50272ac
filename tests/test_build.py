"""`recfm data build`: exact samples on a hand-made log, properties against a plain-Python reference on a
random log, user vs per-exposure layouts, CSV = Parquet, bad input, stats and `datasets` loading."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from recfm.errors import ConfigError, DataError
from recfm.foundation.data import schema as S
from recfm.foundation.data.build import build_samples
from recfm.foundation.data.build_assemble import ranges_to_indices, segment_searchsorted
from recfm.foundation.data.build_convert import stable_hash
from recfm.foundation.data.stats import dataset_stats, format_stats, sample_files
from recfm.scenarios.spec import (
    FeatureSpec,
    FeatureType,
    Keep,
    LabelSpec,
    LabelType,
    RealtimeSpec,
    ScenarioSpec,
    SequenceSpec,
    Source,
    Vocab,
    VocabKind,
    WorldSpec,
)

WS = 100  # window_seconds of the tiny world


def tiny_world(realtime: int = 2) -> WorldSpec:
    item = FeatureSpec("item_id", FeatureType.CATEGORICAL, vocab=Vocab(VocabKind.HASHED, 1000))
    cat = FeatureSpec("category", FeatureType.CATEGORICAL, vocab=Vocab(VocabKind.HASHED, 50))
    price = FeatureSpec("price", FeatureType.NUMERIC)
    sequences = (
        SequenceSpec("click", ("click", "view"), (item, cat), max_length=3, keep=Keep.LAST),
        SequenceSpec("order", ("order",), (item, price), max_length=2, keep=Keep.FIRST),
    )
    feed = ScenarioSpec(
        "feed",
        (item, FeatureSpec("ctx", FeatureType.NUMERIC, source=Source.CONTEXT), FeatureSpec("emb", FeatureType.DENSE, length=2)),
        (LabelSpec("click"),),
    )
    coupon = ScenarioSpec(
        "coupon",
        (FeatureSpec("coupon_id", FeatureType.CATEGORICAL, vocab=Vocab(VocabKind.HASHED, 100)), FeatureSpec("discount", FeatureType.NUMERIC)),
        (LabelSpec("redeem"), LabelSpec("gmv", LabelType.REGRESSION)),
    )
    return WorldSpec("tiny", sequences, (feed, coupon), RealtimeSpec(max_length=realtime, keep=Keep.LAST), window_seconds=WS)


def _events(rows: list[tuple]) -> pa.Table:
    """rows: (user, ts, action, item_id, category, price)."""
    names = ["user_id", "timestamp", "action", "item_id", "category", "price"]
    types = [pa.int64(), pa.int64(), pa.string(), pa.int64(), pa.int64(), pa.float64()]
    return pa.table({n: pa.array([r[i] for r in rows], t) for i, (n, t) in enumerate(zip(names, types))})


def _exposures(rows: list[tuple]) -> pa.Table:
    """rows: (user, ts, scenario, item_id, ctx, emb, coupon_id, discount, click, redeem, gmv)."""
    names = ["user_id", "timestamp", "scenario", "item_id", "ctx", "emb", "coupon_id", "discount", "click", "redeem", "gmv"]
    types = [pa.int64(), pa.int64(), pa.string(), pa.int64(), pa.float64(), pa.list_(pa.float64()), pa.int64(),
             pa.float64(), pa.int64(), pa.int64(), pa.float64()]
    return pa.table({n: pa.array([r[i] for r in rows], t) for i, (n, t) in enumerate(zip(names, types))})


def _feed(user, ts, item, click):
    return (user, ts, "feed", item, 0.5, [1.0, 2.0], None, None, click, None, None)


def _coupon(user, ts, coupon, redeem):
    return (user, ts, "coupon", None, None, None, coupon, 0.25, None, redeem, 1.5)


HAND_EVENTS = [
    (1, 10, "click", 1, 7, None),
    (1, 20, "click", 2, 7, None),
    (1, 30, "view", 3, 7, None),
    (1, 40, "click", 4, 7, None),
    (1, 20, "order", 50, None, 1.0),  # same ts as click 2: click (kind 0) first
    (1, 50, "order", 51, None, 2.0),
    (1, 60, "order", 52, None, 3.0),
    (1, 100, "click", 5, 7, None),  # exactly at the window start: R, not H
    (1, 105, "like", 99, None, None),  # no sequence: ignored, counted
    (1, 110, "order", 53, None, 4.0),
    (1, 115, "click", 6, 7, None),
    (1, 130, "click", 7, 7, None),  # at the last exposure's ts: not in R (strictly before)
    (1, 150, "click", 8, 7, None),  # after every exposure of window 100
    (3, 5, "click", 9, 7, None),  # a user without exposures
]
HAND_EXPOSURES = [
    _feed(1, 120, 101, 1),
    _coupon(1, 130, 901, 0),
    _feed(1, 112, 102, 0),
    _feed(1, 200, 103, 1),  # exactly at a window boundary: window 200
    _coupon(2, 305, 902, 1),  # a user without events
]


def _write(tmp_path, events: pa.Table, exposures: pa.Table, fmt: str = "parquet"):
    ev, ex = tmp_path / f"events.{fmt}", tmp_path / f"exposures.{fmt}"
    if fmt == "parquet":
        pq.write_table(events, ev)
        pq.write_table(exposures, ex)
    else:
        pcsv.write_csv(events, ev)
        emb = [None if v is None else " ".join(repr(x) for x in v) for v in exposures.column("emb").to_pylist()]
        pcsv.write_csv(exposures.set_column(exposures.schema.get_field_index("emb"), "emb", pa.array(emb, pa.string())), ex)
    return ev, ex


def _rows(out) -> list[dict]:
    return pa.concat_tables([pq.read_table(f) for f in sample_files(out)]).to_pylist()


def _ev(ts, kind, item, cat=None, price=None):
    return {"ts": ts, "kind": kind, "item_id": item, "category": cat, "price": price}


def _ev_of(rows, user, window):
    return next(r for r in rows if r["user_id"] == user and r["window"] == window)


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hand")
    ev, ex = _write(tmp, _events(HAND_EVENTS[::-1]), _exposures(HAND_EXPOSURES))  # events out of time order
    user = build_samples(tiny_world(), ev, ex, tmp / "user", progress=False)
    per = build_samples(tiny_world(), ev, ex, tmp / "exposure", layout="exposure", progress=False)
    return tmp, user, per


def test_hand_made_user_layout_is_exact(hand):
    tmp, report, _ = hand
    rows = _rows(tmp / "user")
    assert [(r["user_id"], r["window"]) for r in rows] == [(1, 100), (1, 200), (2, 300)]
    s = _ev_of(rows, 1, 100)
    # click kind keeps its last 3 before the window (2, 3, 4), order keeps its first 2 (50, 51); merged by
    # time, the tie at ts 20 in kind order.
    assert s["h"] == [_ev(20, 0, 2, 7), _ev(20, 1, 50, price=1.0), _ev(30, 0, 3, 7), _ev(40, 0, 4, 7), _ev(50, 1, 51, price=2.0)]
    # R: [100, 130) = click 5, order 53, click 6 -> last 2 kept; ts 130 and 150 are not before any exposure.
    assert s["r"] == [_ev(110, 1, 53, price=4.0), _ev(115, 0, 6, 7)]
    assert [(t["ts"], t["item_id"], t["click"], t["exposure_id"]) for t in s["t_feed"]] == [(112, 102, 0, 2), (120, 101, 1, 0)]
    assert s["t_feed"][0]["emb"] == [1.0, 2.0] and s["t_feed"][0]["ctx"] == 0.5
    assert s["t_coupon"] == [{"exposure_id": 1, "ts": 130, "coupon_id": 901, "discount": 0.25, "redeem": 0, "gmv": 1.5}]
    s = _ev_of(rows, 1, 200)
    assert s["h"] == [_ev(20, 1, 50, price=1.0), _ev(50, 1, 51, price=2.0), _ev(115, 0, 6, 7), _ev(130, 0, 7, 7), _ev(150, 0, 8, 7)]
    assert s["r"] == [] and [t["exposure_id"] for t in s["t_feed"]] == [3] and s["t_coupon"] == []
    s = _ev_of(rows, 2, 300)
    assert s["h"] == [] and s["r"] == [] and s["t_feed"] == [] and [t["coupon_id"] for t in s["t_coupon"]] == [902]
    assert (report.rows, report.tokens_h, report.tokens_r, report.tokens_t) == (3, 10, 2, 5)
    assert report.unmatched_actions == 1 and report.events_without_samples == 1 and report.skipped == {}
    assert json.loads((tmp / "user" / "_build_report.json").read_text())["rows"] == 3


def test_hand_made_exposure_layout_is_exact(hand):
    tmp, _, report = hand
    rows = _rows(tmp / "exposure")
    key = [(r["user_id"], r["window"], (r["t_feed"] + r["t_coupon"])[0]["ts"]) for r in rows]
    assert key == [(1, 100, 112), (1, 100, 120), (1, 100, 130), (1, 200, 200), (2, 300, 305)]
    assert all(len(r["t_feed"]) + len(r["t_coupon"]) == 1 for r in rows)
    r_items = [[e["item_id"] for e in r["r"]] for r in rows]
    assert r_items == [[5, 53], [53, 6], [53, 6], [], []]  # R strictly before each exposure, last 2 kept
    user_rows = _rows(tmp / "user")
    assert rows[0]["h"] == rows[1]["h"] == rows[2]["h"] == user_rows[0]["h"]
    assert report.rows == 5 and report.tokens_t == 5


def test_string_ids_hash_stably_and_integer_strings_stay_integers(tmp_path):
    ev = _events([(1, 10, "click", 1, 7, None)]).cast(pa.schema([(n, pa.string()) if n in ("user_id", "item_id") else (n, t)
                                                              for n, t in zip(*[_events([]).schema.names, _events([]).schema.types])]))
    ev = ev.set_column(0, "user_id", pa.array(["u-1"])).set_column(3, "item_id", pa.array(["42"]))
    ex = _exposures([_feed(1, 150, 5, 1)]).set_column(0, "user_id", pa.array(["u-1"]))
    rows = _rows(build_samples(tiny_world(), *_write(tmp_path, ev, ex), tmp_path / "o", progress=False).out)
    uid = stable_hash(pa.array(["u-1"]))[0].as_py()
    assert rows[0]["user_id"] == uid >= 0 and rows[0]["h"][0]["item_id"] == 42
    assert uid == stable_hash(pa.array(["x", "u-1"]))[1].as_py()  # independent of the batch around it


# ---------------------------------------------------------------- random log vs a plain-Python reference


def random_log(seed: int, n_users: int = 25, n_events: int = 1500, n_exposures: int = 400):
    rng = np.random.default_rng(seed)
    actions = np.array(["click", "view", "order", "like"])
    ev = _events([
        (int(u), int(t), str(a), int(i), int(c) if a != "order" else None, float(p) / 4 if a == "order" else None)
        for u, t, a, i, c, p in zip(rng.integers(0, n_users, n_events), rng.integers(0, 600, n_events),
                                    actions[rng.integers(0, 4, n_events)], rng.integers(0, 50, n_events),
                                    rng.integers(0, 5, n_events), rng.integers(0, 40, n_events))
    ])
    ex_rows = []
    for j, (u, t, s) in enumerate(zip(rng.integers(0, n_users, n_exposures), rng.integers(0, 600, n_exposures), rng.integers(0, 2, n_exposures))):
        if s == 0:
            ex_rows.append((int(u), int(t), "feed", j % 37, j / 8, [j / 4, -j / 2], None, None, j % 2, None, None))
        else:
            ex_rows.append((int(u), int(t), "coupon", None, None, None, j % 11, j / 16, None, (j // 2) % 2, j / 2))
    return ev, _exposures(ex_rows)


def reference(world: WorldSpec, events: pa.Table, exposures: pa.Table, layout: str) -> list[dict]:
    """The semantics of the build module's docstring, one Python loop at a time."""
    kind_of = {a: k for k, s in enumerate(world.sequences) for a in s.actions}
    declared = [{f.name for f in s.fields} for s in world.sequences]
    fields = [f.name for f in world.event_fields()]
    evs = []
    for i, e in enumerate(events.to_pylist()):
        if e["action"] in kind_of:
            k = kind_of[e["action"]]
            tok = {"ts": e["timestamp"], "kind": k, **{f: (e[f] if f in declared[k] else None) for f in fields}}
            evs.append((e["user_id"], e["timestamp"], k, i, tok))
    evs.sort(key=lambda x: x[:4])
    names = world.scenario_names
    exps = []
    for i, x in enumerate(exposures.to_pylist()):
        spec = world.scenario(x["scenario"])
        tok = {"exposure_id": i, "ts": x["timestamp"], **{f.name: x[f.name] for f in spec.features}}
        tok.update({lab.name: x[lab.name] for lab in spec.labels})
        exps.append((x["user_id"], x["timestamp"], names.index(x["scenario"]), i, tok))

    def cut(items, n, keep):
        return items[-n:] if keep is Keep.LAST else items[:n]

    def sample(user, window, bound, targets):
        mine = [e for e in evs if e[0] == user]
        h = []
        for k, seq in enumerate(world.sequences):
            h += cut([e for e in mine if e[2] == k and e[1] < window], seq.max_length, seq.keep)
        h.sort(key=lambda e: e[1:4])
        r = cut([e for e in mine if window <= e[1] < bound], world.realtime.max_length, world.realtime.keep)
        row = {"user_id": user, "window": window, "h": [e[4] for e in h], "r": [e[4] for e in r]}
        for c, name in enumerate(names):
            row[f"t_{name}"] = [x[4] for x in sorted(targets, key=lambda x: (x[1], x[3])) if x[2] == c]
        return row

    if layout == "user":
        keys = sorted({(x[0], x[1] // WS * WS) for x in exps})
        out = []
        for user, window in keys:
            targets = [x for x in exps if x[0] == user and x[1] // WS * WS == window]
            out.append(sample(user, window, max(x[1] for x in targets), targets))
        return out
    return [sample(x[0], x[1] // WS * WS, x[1], [x]) for x in sorted(exps, key=lambda x: (x[0], x[1], x[2], x[3]))]


def _approx(rows):
    """float32 round trip of the floats the random log uses (multiples of 1/16 survive exactly)."""
    return json.loads(json.dumps(rows))


@pytest.fixture(scope="module")
def random_builds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("random")
    world = tiny_world(realtime=4)
    ev, ex = random_log(0)
    paths = _write(tmp, ev, ex)
    csv_paths = _write(tmp, ev, ex, "csv")
    outs = {}
    for layout in ("user", "exposure"):
        outs[layout] = build_samples(world, *paths, tmp / layout, layout=layout, progress=False)
        outs[layout + "-csv-5parts"] = build_samples(world, *csv_paths, tmp / f"{layout}-csv", layout=layout, progress=False, partitions=5)
    return world, ev, ex, tmp, outs


@pytest.mark.parametrize("layout", ["user", "exposure"])
def test_random_log_matches_reference(random_builds, layout):
    world, ev, ex, tmp, _ = random_builds
    assert _rows(tmp / layout) == _approx(reference(world, ev, ex, layout))


@pytest.mark.parametrize("layout", ["user", "exposure"])
def test_csv_and_partitioning_give_identical_output(random_builds, layout):
    _, _, _, tmp, outs = random_builds
    assert outs[layout + "-csv-5parts"].partitions == 5
    assert _rows(tmp / f"{layout}-csv") == _rows(tmp / layout)


def test_random_log_properties(random_builds):
    world, _, ex, tmp, outs = random_builds
    user, per = _rows(tmp / "user"), _rows(tmp / "exposure")
    for row in user + per:
        w = row["window"]
        targets = row["t_feed"] + row["t_coupon"]
        assert targets and all(w <= t["ts"] < w + WS for t in targets)
        assert all(e["ts"] < w for e in row["h"])
        assert all(w <= e["ts"] < max(t["ts"] for t in targets) for e in row["r"])
        assert [(e["ts"], e["kind"]) for e in row["h"]] == sorted((e["ts"], e["kind"]) for e in row["h"])
        assert [e["ts"] for e in row["r"]] == sorted(e["ts"] for e in row["r"])
        for name in world.scenario_names:
            assert [t["ts"] for t in row[f"t_{name}"]] == sorted(t["ts"] for t in row[f"t_{name}"])
        for k, seq in enumerate(world.sequences):
            assert sum(e["kind"] == k for e in row["h"]) <= seq.max_length
        assert len(row["r"]) <= world.realtime.max_length
    for row in per:  # one exposure per row, R strictly before it
        (t,) = row["t_feed"] + row["t_coupon"]
        assert all(e["ts"] < t["ts"] for e in row["r"])

    def exposures_of(rows):
        return Counter(json.dumps(t, sort_keys=True) for r in rows for n in world.scenario_names for t in r[f"t_{n}"])

    assert exposures_of(user) == exposures_of(per) and sum(exposures_of(user).values()) == ex.num_rows
    assert [(r["user_id"], r["window"]) for r in user] == sorted({(r["user_id"], r["window"]) for r in per})
    assert outs["user"].tokens_t == outs["exposure"].tokens_t == ex.num_rows
    assert outs["user"].rows < outs["exposure"].rows and outs["user"].tokens_h < outs["exposure"].tokens_h


def test_stats_and_datasets_read_the_output(random_builds, tmp_path):
    _, _, _, tmp, outs = random_builds
    for layout in ("user", "exposure"):
        st = dataset_stats(tmp / layout)
        rep = outs[layout]
        assert (st["rows"], st["bytes"]) == (rep.rows, rep.bytes)
        assert st["tokens"] == {"H": rep.tokens_h, "R": rep.tokens_r, "T": rep.tokens_t}
        assert st["exposures"] == rep.exposures
        assert f"{rep.rows:,} rows" in format_stats(st)
    datasets = pytest.importorskip("datasets")
    files = [str(f) for f in sample_files(tmp / "user")]
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    first = _rows(tmp / "user")[0]
    assert len(ds) == outs["user"].rows and ds[0]["user_id"] == first["user_id"] and ds[0]["h"] == first["h"]


def test_the_output_folder_reads_as_one_dataset(random_builds, tmp_path):
    """The report beside the part files does not break folder readers (docs/data.md, "Reading samples")."""
    import pyarrow.dataset as pads

    _, _, _, tmp, outs = random_builds
    out = tmp / "exposure-csv"
    assert (out / "_build_report.json").is_file() and not (out / "build_report.json").exists()
    expected = pa.concat_tables([pq.read_table(f) for f in sample_files(out)])
    assert pq.read_table(out).equals(expected)
    assert pads.dataset(out, format="parquet").to_table().equals(expected)
    assert pads.dataset(sorted(map(str, out.glob("part-*.parquet"))), format="parquet").to_table().equals(expected)
    datasets = pytest.importorskip("datasets")
    glob = datasets.load_dataset("parquet", data_files=f"{out}/part-*.parquet", split="train", cache_dir=str(tmp_path / "hf"))
    assert glob.num_rows == outs["exposure-csv-5parts"].rows == expected.num_rows
    assert glob.to_list() == expected.to_pylist()


def test_vectorised_helpers_match_brute_force():
    rng = np.random.default_rng(1)
    seg = np.sort(rng.integers(0, 6, 300))
    val = rng.integers(-(2**62), 2**62, 300)
    order = np.lexsort((val, seg))
    seg, val = seg[order], val[order]
    q_seg, q_val = rng.integers(0, 7, 200), np.r_[val[:100], rng.integers(-(2**62), 2**62, 100)]
    for side in ("left", "right"):
        got = segment_searchsorted(seg, val, q_seg, q_val, side)
        pairs = list(zip(seg.tolist(), val.tolist()))
        want = [sum((p < (s, v)) if side == "left" else (p <= (s, v)) for p in pairs) for s, v in zip(q_seg.tolist(), q_val.tolist())]
        assert got.tolist() == want
    assert ranges_to_indices(np.array([3, 0, 5]), np.array([5, 0, 8])).tolist() == [3, 4, 5, 6, 7]


# ---------------------------------------------------------------- bad input


def _csv(path, text):
    path.write_text(text)
    return path


EV_HEADER = "user_id,timestamp,action,item_id,category,price\n"
EX_HEADER = "user_id,timestamp,scenario,item_id,ctx,emb,coupon_id,discount,click,redeem,gmv\n"
EX_OK = "1,150,feed,3,0.5,1 2,,,1,,\n"


def _build_csv(tmp_path, events, exposures, **kw):
    ev = _csv(tmp_path / "ev.csv", EV_HEADER + events)
    ex = _csv(tmp_path / "ex.csv", EX_HEADER + exposures)
    return build_samples(tiny_world(), ev, ex, tmp_path / "out", progress=False, **kw)


def test_missing_column_names_file_and_column(tmp_path):
    ex = _csv(tmp_path / "ex.csv", "user_id,timestamp,scenario,item_id,emb,click\n1,150,feed,3,1 2,1\n")
    ev = _csv(tmp_path / "ev.csv", EV_HEADER + "1,10,click,1,2,\n")
    with pytest.raises(DataError, match=r"ex\.csv.*missing column 'ctx'.*scenario 'feed'"):
        build_samples(tiny_world(), ev, ex, tmp_path / "o", progress=False)
    bad_ev = _csv(tmp_path / "ev2.csv", "user_id,timestamp,item_id\n1,10,1\n")
    with pytest.raises(DataError, match=r"ev2\.csv.*missing column 'action'"):
        build_samples(tiny_world(), bad_ev, ex, tmp_path / "o", progress=False)


def test_unknown_scenario_is_named_with_count_or_skipped(tmp_path):
    rows = EX_OK + "1,160,games,,,,,,,,\n2,170,games,,,,,,,,\n"
    with pytest.raises(DataError, match=r"ex\.csv.*'scenario'.*'games': 2 rows, first at line 3"):
        _build_csv(tmp_path, "1,10,click,1,2,\n", rows)
    report = _build_csv(tmp_path, "1,10,click,1,2,\n", rows, on_bad_row="skip")
    assert report.skipped == {"exposures: scenario: unknown scenario": 2} and report.tokens_t == 1


@pytest.mark.parametrize(
    "events, exposures, pattern, reason",
    [
        (",10,click,1,2,\n", EX_OK, r"ev\.csv: line 2: column 'user_id': null", "events: user_id: null"),
        ("1,10,click,1,2,\n1,abc,click,1,2,\n", EX_OK, r"ev\.csv: line 3: column 'timestamp': not an integer unix timestamp \(value 'abc'\)",
         "events: timestamp: not an integer unix timestamp"),
        ("1,10,order,1,,cheap\n", EX_OK, r"ev\.csv: line 2: column 'price': not a number", "events: price: not a number"),
        ("1,10,click,1,2,\n1,11\n", EX_OK, r"ev\.csv: line 3: malformed CSV row: expected 6 fields, got 2", "events: malformed CSV row"),
        ("1,10,click,1,2,\n", EX_OK + "1,151,feed,3,0.5,1 2,,,2,,\n", r"ex\.csv: line 3: column 'click': binary label is not 0 or 1",
         "exposures: click: binary label is not 0 or 1"),
        ("1,10,click,1,2,\n", EX_OK + "1,151,feed,3,0.5,1 2 3,,,1,,\n", r"ex\.csv: line 3: column 'emb': vector length is not 2",
         "exposures: emb: vector length is not 2"),
    ],
)
def test_bad_rows_name_file_row_and_column_or_are_counted(tmp_path, events, exposures, pattern, reason):
    with pytest.raises(DataError, match=pattern):
        _build_csv(tmp_path, events, exposures)
    report = _build_csv(tmp_path, events, exposures, on_bad_row="skip")
    assert report.skipped == {reason: 1}
    assert report.rows == 1 and report.tokens_t == 1


def test_duplicated_exposure_id_is_an_error(tmp_path):
    ev = _csv(tmp_path / "ev.csv", EV_HEADER + "1,10,click,1,2,\n")
    ex = _csv(tmp_path / "ex.csv", "exposure_id," + EX_HEADER + "7," + EX_OK + "8," + EX_OK + "7," + EX_OK)
    with pytest.raises(DataError, match=r"duplicated exposure_id 7: .*ex\.csv: line 2 and .*ex\.csv: line 4"):
        build_samples(tiny_world(), ev, ex, tmp_path / "o", progress=False, on_bad_row="skip")


def test_bad_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="layout"):
        build_samples(tiny_world(), tmp_path, tmp_path, tmp_path / "o", layout="item")
    with pytest.raises(DataError, match="not found"):
        build_samples(tiny_world(), tmp_path / "nope", tmp_path, tmp_path / "o")


def test_folder_of_files_equals_one_file(tmp_path):
    ev, ex = random_log(3, n_events=300, n_exposures=80)
    one = build_samples(tiny_world(), *_write(tmp_path, ev, ex), tmp_path / "one", progress=False)
    (tmp_path / "evs").mkdir()
    (tmp_path / "exs").mkdir()
    for i in range(3):
        pq.write_table(ev.slice(i * 100, 100), tmp_path / "evs" / f"{i}.parquet")
        pq.write_table(ex.slice(i * 30, 30), tmp_path / "exs" / f"{i}.parquet")
    many = build_samples(tiny_world(), tmp_path / "evs", tmp_path / "exs", tmp_path / "many", progress=False)
    assert _rows(tmp_path / "many") == _rows(tmp_path / "one") and many.rows == one.rows
    assert S.target_column("feed") in pq.read_schema(sample_files(tmp_path / "one")[0]).names


def test_scenario_files_need_only_their_own_columns_and_arrow_timestamps_convert(tmp_path):
    ev = _events([(1, 10, "click", 1, 7, None)])
    ex = _exposures([_feed(1, 150, 5, 1), _coupon(1, 160, 9, 1)])
    (tmp_path / "exs").mkdir()
    feed = ex.slice(0, 1).select(["user_id", "timestamp", "scenario", "item_id", "ctx", "emb", "click"])
    coupon = ex.slice(1, 1).select(["user_id", "timestamp", "scenario", "coupon_id", "discount", "redeem", "gmv"])
    pq.write_table(feed.set_column(1, "timestamp", pa.array([150_000], pa.timestamp("ms"))), tmp_path / "exs" / "a_feed.parquet")
    pq.write_table(coupon, tmp_path / "exs" / "b_coupon.parquet")
    pq.write_table(ev, tmp_path / "ev.parquet")
    report = build_samples(tiny_world(), tmp_path / "ev.parquet", tmp_path / "exs", tmp_path / "o", progress=False)
    (row,) = _rows(tmp_path / "o")
    assert [t["ts"] for t in row["t_feed"]] == [150] and [t["exposure_id"] for t in row["t_coupon"]] == [1]
    assert report.exposures == {"feed": 1, "coupon": 1}

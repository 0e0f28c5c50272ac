"""Sample rows -> jagged Batch: exact layout, feature encoding, bad input named, and the Parquet loader
(token-budget packing, coverage, resume, shards)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recfm.errors import ConfigError, DataError
from recfm.foundation.data.batch import Batch, Drop, collate
from recfm.foundation.data.encode import FeatureEncoder, hash_rows, mix64, string_ids
from recfm.foundation.data.loader import SampleDataset, pack_by_tokens
from recfm.foundation.data.schema import sample_schema
from recfm.scenarios.spec import (
    FeatureSpec,
    FeatureType,
    LabelSpec,
    LabelType,
    NumericTransform,
    ScenarioSpec,
    SequenceSpec,
    Vocab,
    VocabKind,
    WorldSpec,
)

MASK64 = (1 << 64) - 1


def splitmix64_reference(x: int) -> int:
    """The splitmix64 finaliser in plain Python integers (the specification ``mix64`` must match)."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def hashed_row(x: int, size: int) -> int:
    return 1 + splitmix64_reference(x & MASK64) % (size - 1)


def cat(name, size, kind=VocabKind.HASHED, table=None, path=None):
    return FeatureSpec(name, FeatureType.CATEGORICAL, vocab=Vocab(kind, size, path), table=table, dim=4)


def num(name, transform=NumericTransform.NONE, **kw):
    return FeatureSpec(name, FeatureType.NUMERIC, transform=transform, **kw)


@pytest.fixture
def world(tmp_path) -> WorldSpec:
    return make_world(tmp_path)


def make_world(tmp_path) -> WorldSpec:
    """2 sequence kinds with different fields; 3 scenarios with hashed/identity/file vocabularies, standard,
    log and bucketised numerics and a dense vector."""
    (tmp_path / "shops.txt").write_text("42\n7\n\nabc\n")  # 42 -> row 1, 7 -> row 2, "abc" -> row 3
    item = cat("item_id", 1000, table="item")
    return WorldSpec(
        name="tiny",
        sequences=(
            SequenceSpec("clicks", ("click",), (item, cat("cat_id", 10, VocabKind.IDENTITY))),
            SequenceSpec("orders", ("order",), (item, num("price", NumericTransform.LOG))),
        ),
        scenarios=(
            ScenarioSpec(
                "feed",
                (item, cat("shop_id", 5, VocabKind.FILE, path="shops.txt"),
                 num("ctr", NumericTransform.STANDARD, mean=0.5, std=0.25),
                 FeatureSpec("emb", FeatureType.DENSE, length=3)),
                (LabelSpec("click"),),
                source_file=str(tmp_path / "feed.yaml"),
            ),
            ScenarioSpec(
                "coupon",
                (cat("coupon_id", 50, VocabKind.IDENTITY),
                 num("amount", NumericTransform.BUCKETIZE, boundaries=(10.0, 50.0, 100.0), dim=2)),
                (LabelSpec("redeem"), LabelSpec("value", LabelType.REGRESSION)),
            ),
            ScenarioSpec("group_buy", (cat("deal_id", 100), num("hour")), (LabelSpec("order"),)),
        ),
    )


def rows3() -> list[dict]:
    """Three users: a mixed one, one with a single group-buy exposure, one with unsorted events/exposures."""
    return [
        dict(user_id=10, window=0,
             h=[dict(ts=1, kind=0, item_id=7, cat_id=3), dict(ts=2, kind=1, item_id=8, price=9.0)],
             r=[dict(ts=1005, kind=0, item_id=9, cat_id=1)],
             t_feed=[dict(exposure_id=100, ts=1010, item_id=7, shop_id=42, ctr=0.75, emb=[1, 2, 3], click=1)],
             t_coupon=[dict(exposure_id=200, ts=1003, coupon_id=5, amount=60.0, redeem=0, value=1.5)],
             t_group_buy=[]),
        dict(user_id=11, window=86400, h=[], r=[], t_feed=[], t_coupon=[],
             t_group_buy=[dict(exposure_id=300, ts=88000, deal_id=4, hour=13.0, order=1)]),
        dict(user_id=12, window=86400,
             h=[dict(ts=5, kind=1, item_id=1, price=0.0), dict(ts=3, kind=0, item_id=2, cat_id=9)],
             r=[dict(ts=90001, kind=1, item_id=3, price=-2.0)],
             t_feed=[dict(exposure_id=101, ts=90010, item_id=2, shop_id=99, click=0),
                     dict(exposure_id=102, ts=90005, item_id=9, shop_id=7, ctr=0.25, emb=[0, 0, 1], click=1)],
             t_coupon=None, t_group_buy=None),
    ]


def table_of(world, rows, with_oracle=False):
    return pa.Table.from_pylist(rows, schema=sample_schema(world, with_oracle))


def ids(kjt, key):
    return kjt.to_dict()[key].values().tolist()


# ---- layout -----------------------------------------------------------------------------------------------
def test_exact_layout(world):
    b = collate(table_of(world, rows3()), world)
    assert b.num_samples == 3 and b.offsets.tolist() == [0, 5, 6, 11]
    assert b.token_type.tolist() == [0, 0, 1, 2, 2, 2, 0, 0, 1, 2, 2] and b.token_type.dtype == torch.int8
    # groups: H clicks 0, H orders 1, R 2 (K=2), T feed 3, coupon 4, group_buy 5
    assert b.group.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 3]
    assert b.timestamps.tolist() == [1, 2, 1005, 1010, 1003, 88000, 3, 5, 90001, 90005, 90010]
    assert b.user_id.tolist() == [10, 11, 12]
    assert (b.max_len, b.num_targets, b.num_tokens) == (5, 5, 11)
    assert b.num_tokens == int((b.offsets[1:] - b.offsets[:-1]).sum())  # no padding

    clicks, orders = b.events["clicks"], b.events["orders"]
    assert clicks.token_index.tolist() == [0, 2, 6]
    assert clicks.sparse.keys() == ["item_id", "cat_id"]
    assert clicks.sparse.lengths().tolist() == [1] * 6
    assert ids(clicks.sparse, "item_id") == [hashed_row(7, 1000), hashed_row(9, 1000), hashed_row(2, 1000)]
    assert ids(clicks.sparse, "cat_id") == [3, 1, 9]
    assert clicks.numeric.shape == (3, 0) and clicks.dense.shape == (3, 0)
    assert orders.token_index.tolist() == [1, 7, 8] and orders.numeric_names == ("price",)
    assert ids(orders.sparse, "item_id") == [hashed_row(i, 1000) for i in (8, 1, 3)]
    assert torch.allclose(orders.numeric[:, 0], torch.tensor([math.log1p(9), 0.0, -math.log1p(2)]))

    feed = b.targets["feed"]
    assert feed.token_index.tolist() == [3, 9, 10] and feed.sample_index.tolist() == [0, 2, 2]
    assert feed.exposure_id.tolist() == [100, 102, 101] and feed.user_id.tolist() == [10, 12, 12]
    assert ids(feed.sparse, "shop_id") == [1, 2, 0]  # file vocab; 99 unknown -> 0
    assert feed.numeric.tolist() == [[1.0], [-1.0], [0.0]]  # standard; null -> 0
    assert feed.dense.tolist() == [[1, 2, 3], [0, 0, 1], [0, 0, 0]] and feed.dense_names == ("emb",)
    assert feed.labels["click"].tolist() == [1.0, 1.0, 0.0] and feed.labels["click"].dtype == torch.float32
    coupon = b.targets["coupon"]
    assert coupon.token_index.tolist() == [4] and ids(coupon.sparse, "amount") == [2]
    assert coupon.labels["value"].tolist() == [1.5] and coupon.oracle == {}
    gb = b.targets["group_buy"]
    assert gb.token_index.tolist() == [5] and gb.sample_index.tolist() == [1] and gb.numeric.tolist() == [[13.0]]

    # every token is in exactly one group
    rows = torch.cat([g.token_index for g in [*b.events.values(), *b.targets.values()]])
    assert sorted(rows.tolist()) == list(range(b.num_tokens))


def test_record_batch_sliced_and_oracle(world):
    rows = rows3()
    rows[0]["t_feed"][0]["p_click"] = 0.3
    t = table_of(world, rows, with_oracle=True)
    b = collate(t.slice(2).to_batches()[0], world)
    assert b.offsets.tolist() == [0, 5] and b.user_id.tolist() == [12]
    assert b.targets["feed"].exposure_id.tolist() == [102, 101]
    full = collate(t, world)
    oracle = full.targets["feed"].oracle["click"]
    assert oracle.dtype == torch.float64 and oracle[0].item() == 0.3 and torch.isnan(oracle[1:]).all()


# ---- encoders -----------------------------------------------------------------------------------------------
def test_hash_is_splitmix64_stable_and_bounded(world):
    assert int(mix64(np.array([0]))[0]) == 0xE220A8397B1DCDAF  # first output of splitmix64 seeded with 0
    x = np.array([0, 1, -1, 2**62, -(2**63), 123456789], dtype=np.int64)
    assert [int(v) for v in mix64(x)] == [splitmix64_reference(int(v) & MASK64) for v in x]
    big = np.random.default_rng(0).integers(-(2**63), 2**63 - 1, size=10_000, dtype=np.int64)
    rows = hash_rows(big, 97)
    assert rows.min() >= 1 and rows.max() <= 96 and np.array_equal(rows, hash_rows(big.copy(), 97))
    assert len(np.unique(rows)) == 96  # every non-null row is used
    # same id -> same row in a sequence group and in a scenario group
    b = collate(table_of(world, rows3()), world)
    assert ids(b.events["clicks"].sparse, "item_id")[0] == ids(b.targets["feed"].sparse, "item_id")[0]
    null = FeatureEncoder(cat("x", 10), "x").encode(pa.array([None, 5], pa.int64()))
    assert null.tolist() == [0, hashed_row(5, 10)]


def test_bucketize_boundaries():
    enc = FeatureEncoder(num("a", NumericTransform.BUCKETIZE, boundaries=(10.0, 50.0, 100.0)), "a")
    got = enc.encode(pa.array([-5.0, 10.0, 49.9, 50.0, 100.0, 1e9, None], pa.float32()))
    assert got.tolist() == [0, 1, 1, 2, 3, 3, 0]


def test_file_vocab(tmp_path):
    (tmp_path / "v.txt").write_text("5\nfoo\n-3\n")
    enc = FeatureEncoder(cat("s", 4, VocabKind.FILE, path="v.txt"), "s", str(tmp_path / "w.yaml"))
    foo = int(string_ids(["foo"])[0])
    from recfm.foundation.data.build_convert import stable_hash  # vocab strings hash as the builder's do

    assert foo == stable_hash(pa.array(["foo"])).to_pylist()[0]
    assert enc.encode(pa.array([-3, 5, foo, 8, None], pa.int64())).tolist() == [3, 1, 2, 0, 0]
    with pytest.raises(ConfigError, match="cannot hold 3 ids"):
        FeatureEncoder(cat("s", 3, VocabKind.FILE, path="v.txt"), "s", str(tmp_path / "w.yaml"))
    (tmp_path / "d.txt").write_text("1\n2\n1\n")
    with pytest.raises(ConfigError, match="more than once"):
        FeatureEncoder(cat("s", 9, VocabKind.FILE, path="d.txt"), "s", str(tmp_path / "w.yaml"))
    with pytest.raises(ConfigError, match="missing.txt"):
        FeatureEncoder(cat("s", 9, VocabKind.FILE, path="missing.txt"), "s", str(tmp_path / "w.yaml"))


# ---- bad input is named -------------------------------------------------------------------------------------
def test_identity_out_of_range_names_feature(world):
    rows = rows3()
    rows[0]["t_coupon"][0]["coupon_id"] = 77
    with pytest.raises(DataError, match=r"scenario 'coupon' feature 'coupon_id': id 77 at sample row 0.*\[0, 50\)"):
        collate(table_of(world, rows), world)
    rows = rows3()
    rows[2]["h"][1]["cat_id"] = -1
    with pytest.raises(DataError, match="sequence 'clicks' feature 'cat_id': id -1 at sample row 2"):
        collate(table_of(world, rows), world)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_numeric_names_feature(world, value):
    rows = rows3()
    rows[2]["t_feed"][1]["ctr"] = value
    with pytest.raises(DataError, match="scenario 'feed' feature 'ctr': non-finite value .* sample row 2"):
        collate(table_of(world, rows), world)
    rows = rows3()
    rows[0]["h"][1]["price"] = value
    with pytest.raises(DataError, match="sequence 'orders' feature 'price': non-finite"):
        collate(table_of(world, rows), world)


def test_other_bad_input(world):
    rows = rows3()
    rows[0]["t_feed"][0]["emb"] = [1.0, 2.0]
    with pytest.raises(DataError, match="feature 'emb': vector of length 2 .* expected 3"):
        collate(table_of(world, rows), world)
    rows = rows3()
    rows[0]["t_feed"][0]["click"] = None
    with pytest.raises(DataError, match="label 'click': null at sample row 0"):
        collate(table_of(world, rows), world)
    assert "click" not in collate(table_of(world, rows), world, with_labels=False).targets["feed"].labels
    rows = rows3()
    rows[0]["t_coupon"][0]["redeem"] = 2
    with pytest.raises(DataError, match="label 'redeem': value 2.0 .* not 0 or 1"):
        collate(table_of(world, rows), world)
    rows = rows3()
    rows[0]["r"][0]["kind"] = 5
    with pytest.raises(DataError, match="event kind 5 at sample row 0"):
        collate(table_of(world, rows), world)
    with pytest.raises(ConfigError, match="unknown scenario 'nope'"):
        collate(table_of(world, rows3()), world, scenarios=["feed", "nope"])


# ---- scenario selection and dropping ----------------------------------------------------------------------
def test_unlisted_scenarios_dropped_and_missing_column_empty(world):
    t = table_of(world, rows3())
    b = collate(t, world, scenarios=["coupon", "feed"])
    assert b.scenarios == ("coupon", "feed") and set(b.targets) == {"coupon", "feed"}
    assert b.offsets.tolist() == [0, 5, 5, 10]  # sample 1 had only group_buy: kept, empty (Drop.NONE)
    assert b.group.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 4, 4]  # coupon is s=0 -> 3, feed s=1 -> 4
    assert b.timestamps.tolist()[:5] == [1, 2, 1005, 1003, 1010]
    assert b.targets["coupon"].token_index.tolist() == [3] and b.targets["feed"].token_index.tolist() == [4, 8, 9]

    dropped = collate(t, world, scenarios=["coupon", "feed"], drop=Drop.NO_TARGETS)
    assert dropped.user_id.tolist() == [10, 12] and dropped.offsets.tolist() == [0, 5, 10]
    assert dropped.targets["feed"].sample_index.tolist() == [0, 1, 1]

    no_col = t.drop_columns(["t_group_buy"])
    b2 = collate(no_col, world, drop=Drop.EMPTY)
    assert b2.user_id.tolist() == [10, 12] and "group_buy" not in b2.targets
    assert b2.group.max().item() == 4


def test_to_and_pin_round_trip(world):
    b = collate(table_of(world, rows3()), world)
    c = b.to("cpu")
    assert isinstance(c, Batch) and c.max_len == b.max_len and c.num_targets == b.num_targets
    for name in ("offsets", "token_type", "timestamps", "group", "user_id"):
        assert torch.equal(getattr(c, name), getattr(b, name))
    assert torch.equal(c.targets["feed"].labels["click"], b.targets["feed"].labels["click"])
    assert ids(c.events["clicks"].sparse, "cat_id") == ids(b.events["clicks"].sparse, "cat_id")
    if torch.cuda.is_available():
        p = b.pin_memory()
        assert p.offsets.is_pinned() and p.events["clicks"].sparse.values().is_pinned()
        g = p.to("cuda", non_blocking=True).to("cpu")
        assert torch.equal(g.timestamps, b.timestamps)


# ---- loader -------------------------------------------------------------------------------------------------
def random_rows(world, n, seed, first_user=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ev = lambda k, t0: [dict(ts=t0 + j, kind=int(rng.integers(2)), item_id=int(rng.integers(100)), cat_id=1,
                                 price=1.0) for j in range(k)]
        nf, nc = int(rng.integers(0, 4)), int(rng.integers(0, 2))
        out.append(dict(
            user_id=first_user + i, window=int(rng.integers(0, 4)) * 86400,
            h=ev(int(rng.integers(0, 30)), 0), r=ev(int(rng.integers(0, 5)), 100),
            t_feed=[dict(exposure_id=j, ts=200 + j, item_id=j, shop_id=42, ctr=0.5, emb=[0, 0, 0], click=j % 2)
                    for j in range(nf)],
            t_coupon=[dict(exposure_id=j, ts=300, coupon_id=1, amount=1.0, redeem=0, value=0.0) for j in range(nc)],
            t_group_buy=[],
        ))
    return out


@pytest.fixture
def files(world, tmp_path):
    paths = []
    for f in range(2):
        path = tmp_path / "samples" / f"part-{f}.parquet"
        path.parent.mkdir(exist_ok=True)
        pq.write_table(table_of(world, random_rows(world, 70, f, first_user=1000 * f)), path, row_group_size=16)
        paths.append(path)
    return paths


def all_rows(files):
    return pa.concat_tables([pq.read_table(p) for p in files])


def test_pack_by_tokens():
    assert pack_by_tokens(np.array([3, 4, 2, 10, 1, 1]), 7) == [(0, 2), (2, 3), (3, 4), (4, 6)]
    assert pack_by_tokens(np.array([1, 1, 1, 1, 1]), 100, max_samples=2) == [(0, 2), (2, 4), (4, 5)]


def test_token_budget_batches(world, files):
    table = all_rows(files)
    ds = SampleDataset(files[0].parent, world, max_tokens=60, shuffle=True, seed=3, prefetch=0)
    lengths = {}
    for row in table.to_pylist():
        n_t = len(row["t_feed"] or []) + len(row["t_coupon"] or [])
        if n_t:  # Drop.NO_TARGETS by default
            lengths[row["user_id"]] = len(row["h"]) + len(row["r"]) + n_t
    seen = []
    for b in ds:
        users = b.user_id.tolist()
        assert b.num_samples == len(users) > 0
        assert b.num_tokens == sum(lengths[u] for u in users)
        assert b.num_tokens <= 60 or b.num_samples == 1
        seen += users
    assert sorted(seen) == sorted(lengths) and ds.num_samples == len(lengths)
    assert any(b.num_samples > 1 for b in ds)  # a second epoch works too


def test_fixed_size_windows_and_epochs(world, files):
    ds = SampleDataset(files, world, batch_size=8, windows=(86400, 3 * 86400), shuffle=True, drop=Drop.NONE, prefetch=0)
    windows = all_rows(files).column("window").to_numpy()
    expected = int(((windows >= 86400) & (windows < 3 * 86400)).sum())
    e0 = [b.user_id.tolist() for b in ds]
    assert all(len(u) == 8 for u in e0[:-1]) and sum(map(len, e0)) == expected == ds.num_samples
    e1 = [b.user_id.tolist() for b in ds]
    assert sorted(sum(e0, [])) == sorted(sum(e1, [])) and e0 != e1  # a new permutation each epoch
    again = SampleDataset(files, world, batch_size=8, windows=(86400, 3 * 86400), shuffle=True, drop=Drop.NONE)
    assert [b.user_id.tolist() for b in again] == e0  # same seed, same order (prefetch thread included)


def batch_key(b):
    return (b.user_id.tolist(), b.offsets.tolist(), b.timestamps.tolist(), b.group.tolist())


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_sees_the_same_remaining_batches(world, files, prefetch):
    make = lambda: SampleDataset(files, world, max_tokens=50, batch_size=6, shuffle=True, seed=7, prefetch=prefetch)
    ds = make()
    list(ds)  # finish epoch 0 so the resumed position is in epoch 1
    full = [batch_key(b) for b in make_epoch(make(), 1)]
    it = iter(ds)
    head = [batch_key(next(it)) for _ in range(3)]
    state = ds.state_dict()
    it.close()
    assert state["epoch"] == 1 and state["cursor"] == 3
    resumed = make()
    resumed.load_state_dict(state)
    assert head + [batch_key(b) for b in resumed] == full
    assert resumed.state_dict()["epoch"] == 2 and resumed.state_dict()["cursor"] == 0
    other = SampleDataset(files, world, max_tokens=40, shuffle=True, seed=7)
    with pytest.raises(DataError, match="max_tokens: saved 50, now 40"):
        other.load_state_dict(state)


def make_epoch(ds, epoch):
    ds.set_epoch(epoch)
    return list(ds)


def test_shards_are_disjoint_and_step_together(world, files):
    base = SampleDataset(files, world, max_tokens=60, shuffle=True, seed=1, prefetch=0)
    shards = [base.sharded(r, 3) for r in range(3)]
    users = [[u for b in s for u in b.user_id.tolist()] for s in shards]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) > 0
    flat = sum(users, [])
    assert len(flat) == len(set(flat))  # disjoint
    assert len(flat) >= 0.7 * base.num_samples  # truncation to equal batch counts loses little
    assert all(b.num_tokens <= 60 or b.num_samples == 1 for s in shards for b in s)


def test_adapters_consume_a_collated_batch(world):
    from recfm.foundation.model.adapters import TokenEmbedder

    b = collate(table_of(world, rows3()), world)
    x = TokenEmbedder(world, None, d_model=8, hidden=16)(b)
    assert x.shape == (b.num_tokens, 8) and bool((x.abs().sum(1) > 0).all())  # every token was tokenized


def test_loader_errors_name_the_file(world, tmp_path):
    rows = rows3()
    rows[2]["t_feed"][0]["ctr"] = float("nan")
    path = tmp_path / "bad.parquet"
    pq.write_table(table_of(world, rows), path)
    ds = SampleDataset(path, world, batch_size=2, prefetch=1)
    with pytest.raises(DataError, match=r"bad.parquet row group 0: scenario 'feed' feature 'ctr': non-finite"):
        list(ds)
    with pytest.raises(DataError, match="no such sample file"):
        SampleDataset(tmp_path / "nope", world, batch_size=2)
    with pytest.raises(ConfigError, match="batch_size, max_tokens"):
        SampleDataset(path, world)

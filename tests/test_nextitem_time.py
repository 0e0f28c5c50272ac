"""Real timestamps in the next-item recipe: times cut exactly like the inputs in every split and protocol,
carried by batches, ML-100K read end to end, the HSTU time bias fed from them (and only from them), the
ConfigError for a time bias without timestamps, and the shipped ML-100K configs on a slice of the data."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch

from recfm.cli import main
from recfm.configs import config_path
from recfm.errors import ConfigError, DataError, RecfmError
from recfm.foundation.model.backbone import BackboneConfig
from recfm.foundation.model.hstu import HSTUConfig
from recfm.recipes.nextitem import nextitem, resolve_config, train_seed
from recfm.recipes.nextitem_config import DataSection, Dataset, NextItemConfig, Protocol, TrainSection
from recfm.recipes.nextitem_config import load_nextitem_config
from recfm.recipes.nextitem_data import from_sequences, gather_batch, load_data, read_log
from recfm.recipes.nextitem_model import NextItemModel, check_timestamps

PROTOCOLS = [Protocol.STANDARD, Protocol.PUBLISHED]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def timed_log(users: int = 12, seed: int = 0):
    """Users 1..``users`` with 3..11 distinct items each (ids 1..40) at increasing Unix times; items 2 and 3
    of user 1 share one second (a tie)."""
    rng = np.random.default_rng(seed)
    seqs, times = [], []
    for u in range(1, users + 1):
        items = rng.choice(np.arange(1, 41), size=int(rng.integers(3, 12)), replace=False)
        items = np.sort(items) if u % 2 else items  # sorted or not: stamps must follow positions, not ids
        t = np.cumsum(rng.integers(1, 10**6, items.size)) + 10**9
        seqs.append(items.tolist())
        times.append(t.tolist())
    times[0][2] = times[0][1]
    return list(range(1, users + 1)), seqs, times


# ---------------------------------------------------------------------------------------- alignment


def test_times_follow_the_inputs_in_a_hand_computed_case():
    # one user, items 5 6 7 8 9 at times 10 20 20 40 50; max_len 2
    seq, t = [5, 6, 7, 8, 9], [10, 20, 20, 40, 50]
    std = from_sequences([1], [seq], times=[t], max_len=2)  # rows = ids - 1
    assert std.train.inputs.tolist() == [4, 5] and std.train.times.tolist() == [10, 20]  # items 5 6 -> 6 7
    assert std.train.targets.tolist() == [5, 6]
    assert std.valid.inputs.tolist() == [5, 6] and std.valid.times.tolist() == [20, 20]  # items 6 7 -> 8
    assert std.test.inputs.tolist() == [6, 7] and std.test.times.tolist() == [20, 40]  # items 7 8 -> 9 (not 50)
    pub = from_sequences([1], [seq], times=[t], max_len=2, protocol="published")
    assert pub.train.inputs.tolist() == [5, 6] and pub.train.times.tolist() == [20, 20]  # items 6 7 -> 7 8
    assert pub.train.targets.tolist() == [6, 7]
    assert pub.test.inputs.tolist() == [6, 7] and pub.test.times.tolist() == [20, 40] and pub.valid is None
    assert std.summary()["timestamps"] is True


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("max_len", [2, 4, 50])
def test_every_split_carries_the_times_of_its_own_input_items(protocol, max_len):
    users, seqs, times = timed_log()
    data = from_sequences(users, seqs, times=times, max_len=max_len, num_items=40, protocol=protocol)
    time_of = {(u, i): t for u, s, ts in zip(users, seqs, times) for i, t in zip(s, ts)}
    splits = [("train", data.train), ("test", data.test)] + ([("valid", data.valid)] if data.valid else [])
    for name, split in splits:
        assert split.times.dtype == torch.int64 and split.times.shape == split.inputs.shape, name
        held_out = 2 if protocol == "standard" else 1
        trained = [u for u, s in zip(users, seqs) if name != "train" or len(s) - held_out >= 2]
        for k, (a, b) in enumerate(zip(split.offsets_host[:-1], split.offsets_host[1:])):
            u = trained[k]
            expected = [time_of[u, int(i) + 1] for i in split.inputs[a:b]]  # items are distinct per user
            assert split.times[a:b].tolist() == expected, (name, u)
        # batches in any order carry the same pairing, and moving a split keeps it
        order = np.random.default_rng(1).permutation(split.num_users)[: max(1, split.num_users // 2)]
        batch = gather_batch(split.to("cpu"), order)
        assert batch.times.tolist() == split.times[batch.rows].tolist()
        assert batch.times.shape == batch.ids.shape


def test_without_timestamps_every_split_and_batch_has_none():
    users, seqs, _ = timed_log()
    for protocol in PROTOCOLS:
        data = from_sequences(users, seqs, max_len=5, protocol=protocol)
        assert data.train.times is None and data.test.times is None and not data.has_times
        assert data.valid is None or data.valid.times is None
        assert gather_batch(data.train, np.array([0, 2])).times is None
        assert data.summary()["timestamps"] is False


def test_bad_timestamps_are_data_errors_naming_the_user():
    with pytest.raises(DataError, match="user 8: 2 timestamps for 3 items"):
        from_sequences([8], [[1, 2, 3]], times=[[1, 2]], max_len=5)
    with pytest.raises(DataError, match=r"user 8: timestamp 5 of item 2 is before .* \(9\)"):
        from_sequences([8], [[1, 2, 3]], times=[[1, 9, 5]], max_len=5)
    with pytest.raises(DataError, match="1 timestamp sequences for 2 users"):
        from_sequences([1, 2], [[1, 2, 3], [1, 2, 3]], times=[[1, 2, 3]], max_len=5)


# -------------------------------------------------------------------------------------------- ML-100K


@pytest.mark.data
def test_ml100k_is_read_in_time_order_with_its_timestamps(shared_data):
    section = DataSection(dataset=Dataset.ML_100K, root=str(shared_data), path="ml-100k", max_len=200,
                          num_items=1682)
    users, seqs, times, source = read_log(section)
    assert len(users) == 943 and sum(len(s) for s in seqs) == 100_000 and "ratings.tsv" in source
    # reference: the file's rows sorted by (user, timestamp), ties in file order
    with open(shared_data / "ml-100k" / "ratings.tsv", newline="") as f:
        rows = [(int(r["user_id"]), int(r["timestamp"]), n, int(r["item_id"]))
                for n, r in enumerate(csv.DictReader(f, delimiter="\t"))]
    rows.sort()
    assert users == sorted({r[0] for r in rows})
    assert np.concatenate(seqs).tolist() == [r[3] for r in rows]
    assert np.concatenate(times).tolist() == [r[1] for r in rows]
    assert all(t.dtype == np.int64 and (np.diff(t) >= 0).all() for t in times)
    assert any((np.diff(t) == 0).any() for t in times)  # ties exist, so the file-order rule matters

    data = load_data(section, Protocol.PUBLISHED)
    assert data.users == 943 and data.skipped_short == 0 and data.interactions == 100_000 and data.has_times
    for k in (0, 17, 942):  # the test input: the last 200 items before the held-out one, with their times
        a, b = data.test.offsets_host[k], data.test.offsets_host[k + 1]
        assert (data.test.inputs[a:b] + 1).tolist() == seqs[k][:-1][-200:].tolist()
        assert data.test.times[a:b].tolist() == times[k][:-1][-200:].tolist()
        assert int(data.test.targets[k]) + 1 == seqs[k][-1]


# ------------------------------------------------------------------------------------------ the model


def hstu_config(use_time_bias: bool, **train) -> NextItemConfig:
    layer = HSTUConfig(d_model=16, num_heads=2, num_kv_heads=2, d_qk=8, d_v=8, dropout=0.0, normaliser="keys",
                       use_time_bias=use_time_bias, num_time_buckets=64, time_bucket_base=1.35, max_rel_pos=8)
    settings = dict(batch_size=8, lr=1e-2, warmup_steps=0, max_epochs=1, progress=False, device="cpu")
    return NextItemConfig(name="timed", model="hstu", backbone=BackboneConfig(layer, num_blocks=2),
                          embedding=dataclasses.replace(NextItemConfig("x", "hstu").embedding, dropout=0.0),
                          train=TrainSection(**{**settings, **train}), seeds=(0,), source_file="timed.yaml")


@pytest.mark.parametrize("use_time_bias", [True, False])
def test_the_time_bias_sees_the_real_times_and_only_when_on(use_time_bias):
    users, seqs, times = timed_log()
    data = from_sequences(users, seqs, times=times, max_len=8, num_items=40)
    torch.manual_seed(0)
    model = NextItemModel(hstu_config(use_time_bias), 40).eval()
    with torch.no_grad():  # tables start at zero (no bias): give them values so times matter
        for p in model.encoder.parameters():
            p.add_(0.3 * torch.randn_like(p))
    seen = []
    model.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[3]))
    batch = gather_batch(data.test, np.arange(data.test.num_users))
    out = model.encode(batch)
    assert seen[0] is (batch.times if use_time_bias else None)  # the batch's times, not positions
    shifted = dataclasses.replace(batch, times=batch.times + 12_345)  # same gaps: same buckets, same output
    stretched = dataclasses.replace(batch, times=batch.times * 7)  # other gaps
    torch.testing.assert_close(model.encode(shifted), out)
    assert torch.equal(model.encode(stretched), out) != use_time_bias


def test_time_bias_without_timestamps_is_a_config_error_naming_the_file_and_key(tmp_path, capsys):
    users, seqs, _ = timed_log()
    untimed = from_sequences(users, seqs, max_len=8, num_items=40)
    with pytest.raises(ConfigError, match=r"timed.yaml: backbone.layer.use_time_bias: true needs real timestamps"):
        train_seed(hstu_config(True), untimed, 0, torch.device("cpu"), None)
    check_timestamps(hstu_config(False), untimed)  # off: fine
    model = NextItemModel(hstu_config(True), 40)
    with pytest.raises(RecfmError, match="JaggedBatch.times is None"):  # never positions in their place
        model.encode(gather_batch(untimed.test, np.array([0])))
    # the shipped ML-1M config on a sequences file (no timestamps), time bias switched on: CLI exit 2
    (tmp_path / "seqs.txt").write_text("".join(f"{u} " + " ".join(map(str, s)) + "\n" for u, s in zip(users, seqs)))
    path = config_path("real", "ml-1m", "nextitem_hstu.yaml")
    args = ["nextitem", str(path), "data.dataset=sequences", f"data.root={tmp_path}", "data.path=seqs.txt",
            "data.num_items=40", "backbone.layer.use_time_bias=true", "train.progress=false", "train.device=cpu"]
    assert main(args) == 2
    assert f"{path}: backbone.layer.use_time_bias: true needs real timestamps" in capsys.readouterr().err


def test_training_with_real_times_runs_and_differs_from_without():
    users, seqs, times = timed_log(users=24)
    data = from_sequences(users, seqs, times=times, max_len=8, num_items=40, protocol="published")
    cfg = hstu_config(True, protocol="published", max_epochs=2)
    off = hstu_config(False, protocol="published", max_epochs=2)
    runs = [train_seed(c, data, 0, torch.device("cpu"), None) for c in (cfg, off)]
    assert all(r["epochs"] == 2 and r["stopped_by"] == "max_epochs" for r in runs)
    assert runs[0]["history"][-1]["loss"] != runs[1]["history"][-1]["loss"]  # the time table learned something


# ------------------------------------------------------------------------------------ shipped configs


@pytest.mark.parametrize("model", ["hstu", "sasrec"])
def test_ml100k_configs_resolve_and_load(model):
    path = resolve_config(f"ml-100k/{model}")
    assert path == config_path("real", "ml-100k", f"nextitem_{model}.yaml")
    cfg = load_nextitem_config(path)
    assert cfg.data.dataset is Dataset.ML_100K and cfg.data.num_items == 1682 and cfg.data.max_len == 200
    assert cfg.train.exclude_history and cfg.train.lr == 1e-3 and tuple(cfg.train.betas) == (0.9, 0.98)
    if model == "hstu":
        layer = cfg.backbone.layer
        assert layer.use_time_bias and layer.use_pos_bias
        reach = layer.time_bucket_base ** (layer.num_time_buckets - 1)  # smallest gap of the last bucket
        assert 1e8 <= reach <= 1e9  # gaps up to years get their own buckets


@pytest.mark.data
@pytest.mark.parametrize("model", ["hstu", "sasrec"])
def test_ml100k_configs_run_one_epoch_on_a_few_users(model, shared_data, tmp_path):
    overrides = [f"data.root={shared_data}", "data.max_users=24", "data.max_len=12", "train.max_epochs=1",
                 "train.batch_size=8", "train.eval_batch_size=16", "train.progress=false", "train.device=cpu",
                 "train.protocol=published", "retrieval.negatives=full",
                 "sasrec.max_len=12" if model == "sasrec" else "backbone.layer.max_rel_pos=12"]
    nextitem(f"ml-100k/{model}", overrides, seeds=[0], out=tmp_path)
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["data"]["users"] == 24 and result["data"]["items"] == 1682 and result["data"]["timestamps"]
    run = result["per_seed"][0]
    assert run["epochs"] == 1 and run["steps"] == 3 and run["best_epoch"] is None
    assert all(0.0 <= v <= 1.0 for v in run["test"].values())


def test_ml1m_keeps_real_times_from_ratings_dat_and_drops_the_synthetic_ones(tmp_path):
    real, shared = tmp_path / "orig", tmp_path / "shared"
    real.mkdir(), shared.mkdir()
    (real / "ratings.dat").write_text("2::10::5::300\n1::7::3::50\n2::11::4::100\n1::8::4::50\n1::9::1::20\n")
    (shared / "sequences.csv").write_text("user_id,item_ids\n1,9 7 8\n2,11 10\n")
    users, seqs, times, _ = read_log(DataSection(dataset=Dataset.ML_1M, root=str(tmp_path), path="orig"))
    assert users == [1, 2] and [s.tolist() for s in seqs] == [[9, 7, 8], [11, 10]]  # tie 7, 8: file order
    assert [t.tolist() for t in times] == [[20, 50, 50], [100, 300]]
    users, seqs, times, _ = read_log(DataSection(dataset=Dataset.ML_1M, root=str(tmp_path), path="shared"))
    assert [s.tolist() for s in seqs] == [[9, 7, 8], [11, 10]] and times is None  # positions are not times

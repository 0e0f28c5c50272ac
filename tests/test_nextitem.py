"""Next-item recipe: split, bad input, metrics (pinned by hand, ties pessimistic), SASRec properties,
learning on a synthetic pattern, the CLI, and the four shipped configs on a slice of the public data."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from recfm.cli import main
from recfm.configs import config_path
from recfm.errors import ConfigError, DataError
from recfm.foundation.model.backbone import BackboneConfig
from recfm.foundation.model.hstu import HSTUConfig
from recfm.foundation.model.sasrec import SASRec, SASRecConfig
from recfm.heads.retrieval import RetrievalHead
from recfm.recipes.nextitem import nextitem, resolve_config, train_seed
from recfm.recipes.nextitem_config import DataSection, Dataset, NextItemConfig, TrainSection, load_nextitem_config
from recfm.recipes.nextitem_data import _split, from_sequences, gather_batch, load_data
from recfm.recipes.nextitem_model import METRICS, NextItemModel, evaluate, rank_metrics

CONFIGS = [("ml-1m", "hstu"), ("ml-1m", "sasrec"), ("amazon-beauty", "hstu"), ("amazon-beauty", "sasrec")]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def rows(t: torch.Tensor) -> list[int]:
    return t.tolist()


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("dataset,model", CONFIGS)
def test_shipped_configs_load(dataset, model):
    cfg = load_nextitem_config(resolve_config(f"{dataset}/{model}"))
    assert cfg.model == model and cfg.data.dataset.value == dataset
    assert cfg.data.max_len == (200 if dataset == "ml-1m" else 50)
    assert cfg.retrieval.temperature == 0.05 and not Path(cfg.data.root).is_absolute()


def test_unknown_keys_and_bad_values_are_named_with_the_file():
    path = config_path("real", "ml-1m", "nextitem_hstu.yaml")
    with pytest.raises(ConfigError) as e:
        load_nextitem_config(path, ["train.lrr=1", "backbone.layer.d_model=0", "model=gru", "data.max_len=0x"])
    text = str(e.value)
    assert f"{path}: train.lrr: unknown key (did you mean 'lr'?)" in text
    assert f"{path}: backbone.layer.d_model: must be an int >= 1" in text
    assert f"{path}: model: 'gru' is not one of" in text
    assert f"{path}: data.max_len: expected an integer" in text


# ------------------------------------------------------------------------------------------------ split


def test_leave_last_out_split_on_a_hand_made_log():
    data = from_sequences([7, 9, 4], [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10]], max_len=10)
    assert (data.users, data.skipped_short, data.num_items, data.interactions) == (2, 1, 10, 8)
    # rows are ids - 1; user 7: train prefix 1 2 3 -> inputs 1 2 predict 2 3; user 9 has no training pair
    assert rows(data.train.inputs) == [0, 1] and rows(data.train.targets) == [1, 2]
    assert data.train.offsets_host.tolist() == [0, 2]
    # valid: input = all but the last two, target = the one before last (user 9: a one-item input)
    assert rows(data.valid.inputs) == [0, 1, 2, 5] and data.valid.offsets_host.tolist() == [0, 3, 4]
    assert rows(data.valid.targets) == [3, 6]
    # test: input = all but the last, target = the last
    assert rows(data.test.inputs) == [0, 1, 2, 3, 5, 6] and data.test.offsets_host.tolist() == [0, 4, 6]
    assert rows(data.test.targets) == [4, 7]


def test_inputs_keep_the_most_recent_max_len_items():
    data = from_sequences([1], [[1, 2, 3, 4, 5, 6, 7]], max_len=2)
    assert rows(data.train.inputs) == [2, 3] and rows(data.train.targets) == [3, 4]  # prefix ..5 -> last 3 items
    assert rows(data.valid.inputs) == [3, 4] and rows(data.valid.targets) == [5]
    assert rows(data.test.inputs) == [4, 5] and rows(data.test.targets) == [6]


def test_gather_batch_collects_users_in_the_given_order():
    data = from_sequences([1, 2, 3], [[1, 2, 3, 4, 5], [6, 7, 8, 9], [3, 3, 3, 3, 3, 3]], max_len=10)
    batch = gather_batch(data.test, np.array([2, 0]))
    assert rows(batch.offsets) == [0, 5, 9] and batch.max_len == 5
    assert rows(batch.ids) == [2, 2, 2, 2, 2, 0, 1, 2, 3] and rows(batch.users) == [2, 0]


# ------------------------------------------------------------------------------------------- bad input


def test_short_sequences_are_skipped_and_counted():
    data = from_sequences([1, 2, 3, 4], [[1, 2, 3], [1], [1, 2], [4, 5, 6, 7]], max_len=5)
    assert data.users == 2 and data.skipped_short == 2 and data.summary()["skipped_short"] == 2
    with pytest.raises(DataError, match="no sequence has 3 or more items"):
        from_sequences([1], [[1, 2]], max_len=5)


def test_out_of_range_item_ids_are_named():
    with pytest.raises(DataError, match=r"user 8: item id 11 out of range 1..10"):
        from_sequences([3, 8], [[1, 2, 3], [4, 11, 5]], max_len=5, num_items=10)
    with pytest.raises(DataError, match=r"user 3: item id 0 out of range"):
        from_sequences([3], [[1, 0, 3]], max_len=5)


def test_a_duplicated_user_is_an_error_naming_the_user(tmp_path):
    with pytest.raises(DataError, match="user 5 has two sequences"):
        from_sequences([5, 6, 5], [[1, 2, 3], [1, 2, 3], [4, 5, 6]], max_len=5)
    file = tmp_path / "seq.txt"
    file.write_text("5 1 2 3\n6 1 2 3\n5 4 5 6\n")
    section = DataSection(dataset=Dataset.SEQUENCES, root=str(tmp_path), path="seq.txt", max_len=5)
    with pytest.raises(DataError, match="user 5 appears again"):
        load_data(section)


def test_missing_data_folder_says_which_keys_to_set(tmp_path):
    with pytest.raises(DataError, match="data.root"):
        load_data(DataSection(root=str(tmp_path), path="nowhere"))


# --------------------------------------------------------------------------------------------- metrics


class LastItemModel(nn.Module):
    """A stub whose output at a token is that token's item embedding: the query is the last input item."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.items = nn.Embedding.from_pretrained(table)
        self.head = RetrievalHead(table.shape[1], table.shape[0], table.shape[1], item_table=self.items)

    def encode(self, batch, positions):
        return self.items(batch.ids)


def test_full_corpus_ranks_and_metrics_match_a_hand_computation_with_ties():
    # 60 items on the unit circle at 0.05 rad steps (cosine falls with the index); item 59 duplicates item 5.
    angles = torch.arange(60, dtype=torch.float64) * 0.05
    table = torch.stack([angles.cos(), angles.sin()], 1).float()
    table[59] = table[5]
    # the query is the last input item (row 0 for every user); no item is excluded from the corpus
    split = _split([np.array([0]), np.array([3, 0]), np.array([0]), np.array([0])], np.array([12, 5, 0, 55]))
    metrics, ranks = evaluate(LastItemModel(table), split, batch_users=3, chunk=7, autocast=False)
    # user 1 (a one-item input): items 0..11 and 59 (= 5) score higher -> 14. user 2: 0..4 and the tie 59 count ahead
    # (pessimistic) -> 7. user 3: the history item itself is the target, nothing ahead -> 1 (history items are
    # not excluded). user 4: 0..54 and 59 -> 57.
    assert rows(ranks) == [14, 7, 1, 57]
    ndcg = [1 / math.log2(r + 1) for r in (14, 7, 1, 57)]
    expected = {"hr@10": 2 / 4, "ndcg@10": (ndcg[1] + ndcg[2]) / 4,
                "hr@50": 3 / 4, "ndcg@50": (ndcg[0] + ndcg[1] + ndcg[2]) / 4}
    assert metrics == pytest.approx(expected, abs=1e-12)
    assert rank_metrics(torch.tensor([1, 2, 11]), ks=(2,)) == pytest.approx({"hr@2": 2 / 3, "ndcg@2": (1 + 1 / math.log2(3)) / 3})


def test_history_exclusion_removes_the_input_items_but_never_the_target():
    angles = torch.arange(60, dtype=torch.float64) * 0.05
    table = torch.stack([angles.cos(), angles.sin()], 1).float()
    table[59] = table[5]
    split = _split([np.array([0]), np.array([3, 0]), np.array([0]), np.array([0])], np.array([12, 5, 0, 55]))
    metrics, ranks = evaluate(LastItemModel(table), split, batch_users=3, chunk=7, autocast=False, exclude_history=True)
    # as in the test above, minus the input items ahead of the target: user 1 loses item 0 (14 -> 13), user 2
    # loses items 3 and 0 (7 -> 5), user 3's target is its own input item and stays (1), user 4 loses 0 (57 -> 56)
    assert rows(ranks) == [13, 5, 1, 56]
    ndcg = [1 / math.log2(r + 1) for r in (13, 5, 1, 56)]
    assert metrics["hr@10"] == 2 / 4 and metrics["ndcg@10"] == pytest.approx((ndcg[1] + ndcg[2]) / 4, abs=1e-12)


def test_a_collapsed_model_gets_the_worst_rank():
    split = _split([np.array([0]), np.array([1])], np.array([2, 3]))
    _, ranks = evaluate(LastItemModel(torch.ones(30, 4)), split, batch_users=8, chunk=65536, autocast=False)
    assert rows(ranks) == [30, 30]


# ---------------------------------------------------------------------------------------------- SASRec


def test_sasrec_is_causal_and_independent_of_the_batch():
    torch.manual_seed(0)
    enc = SASRec(SASRecConfig(d_model=8, num_blocks=2, num_heads=2, dropout=0.0, max_len=6)).eval()
    x = torch.randn(9, 8)
    offsets = torch.tensor([0, 4, 5, 9])
    out = enc(x, offsets, max_len=6)
    for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()):  # one sample alone, no padding
        torch.testing.assert_close(out[a:b], enc(x[a:b], torch.tensor([0, b - a]), max_len=b - a))
    x2 = x.clone()
    x2[3] = torch.randn(8)  # the last token of sample 0 changes: earlier tokens and other samples do not
    out2 = enc(x2, offsets, max_len=4)
    torch.testing.assert_close(out2[:3], out[:3])
    torch.testing.assert_close(out2[4:], out[4:])
    assert not torch.allclose(out2[3], out[3])


# ------------------------------------------------------------------------------------ learning / stops


def pattern_data(num_items: int = 50, users: int = 120, seed: int = 0):
    """Item i is always followed by item i+1 (wrapping): the next item is a function of the last one."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(users):
        start, length = rng.integers(num_items), rng.integers(5, 10)
        seqs.append([(start + k) % num_items + 1 for k in range(length)])
    return from_sequences(list(range(users)), seqs, max_len=8, num_items=num_items)


def tiny_config(model: str, **train) -> NextItemConfig:
    layer = HSTUConfig(d_model=32, num_heads=2, num_kv_heads=2, d_qk=16, d_v=16, dropout=0.0, normaliser="keys",
                       use_time_bias=False, max_rel_pos=8)
    settings = dict(batch_size=32, lr=1e-2, warmup_steps=0, max_epochs=12, patience=100, progress=False, device="cpu")
    return NextItemConfig(
        name=f"pattern-{model}", model=model, backbone=BackboneConfig(layer, num_blocks=1),
        sasrec=SASRecConfig(d_model=32, num_blocks=1, num_heads=2, dropout=0.0, max_len=8),
        embedding=dataclasses.replace(NextItemConfig("x", "hstu").embedding, dropout=0.0),
        train=TrainSection(**{**settings, **train}), seeds=(0,),
    )


@pytest.mark.parametrize("model", ["hstu", "sasrec"])
def test_both_models_learn_a_deterministic_pattern(model):
    data = pattern_data()
    cfg = tiny_config(model, max_epochs=6)
    torch.manual_seed(0)
    untrained, _ = evaluate(NextItemModel(cfg, data.num_items), data.test, 64, 65536, autocast=False)
    run = train_seed(cfg, data, seed=0, device=torch.device("cpu"), out_dir=None)
    chance = 10 / data.num_items
    assert untrained["hr@10"] < 0.4
    assert run["test"]["hr@10"] > 0.8 and chance <= 0.2, run["history"][-1]
    assert run["valid"]["ndcg@10"] == max(h["valid"]["ndcg@10"] for h in run["history"])


def test_patience_and_time_budget_stop_training():
    data = pattern_data(users=40)
    run = train_seed(tiny_config("sasrec", lr=1e-12, patience=2, max_epochs=10), data, 0, torch.device("cpu"), None)
    assert (run["stopped_by"], run["epochs"], run["best_epoch"]) == ("patience", 3, 1)
    run = train_seed(tiny_config("sasrec", max_minutes=1e-9), data, 0, torch.device("cpu"), None)
    assert (run["stopped_by"], run["epochs"], run["steps"]) == ("max_minutes", 1, 1)


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_runs_a_sequences_file_and_writes_results(tmp_path, capsys):
    rng = np.random.default_rng(1)
    lines = [f"{u} " + " ".join(str(i) for i in rng.integers(1, 30, rng.integers(2, 9))) for u in range(1, 41)]
    (tmp_path / "seqs.txt").write_text("\n".join(lines) + "\n")
    short = sum(len(line.split()) - 1 < 3 for line in lines)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "name: toy\nmodel: sasrec\n"
        f"data: {{dataset: sequences, root: {json.dumps(str(tmp_path))}, path: seqs.txt, max_len: 6, num_items: 30}}\n"
        "sasrec: {d_model: 8, num_blocks: 1, num_heads: 1, max_len: 6}\n"
        "retrieval: {num_negatives: 8}\n"
        "train: {batch_size: 8, max_epochs: 2, progress: false, device: cpu}\n"
    )
    assert main(["nextitem", str(cfg), "train.max_epochs=1", "--seeds", "3,4", "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "toy (sasrec" in printed and "test seed 4" in printed
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["seeds"] == [3, 4] and result["config"]["train"]["max_epochs"] == 1
    assert result["data"]["skipped_short"] == short and result["data"]["users"] == 40 - short
    assert (tmp_path / "run" / "seed-3" / "checkpoints" / "latest").is_file()
    assert main(["nextitem", str(cfg), "train.nope=1"]) == 2
    assert "train.nope: unknown key" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- public data


@pytest.mark.data
@pytest.mark.parametrize("dataset,model", CONFIGS)
def test_shipped_configs_run_on_a_slice_of_the_public_data(dataset, model, shared_data, tmp_path):
    overrides = [f"data.root={shared_data}", "data.max_users=40", "data.max_len=12", "train.max_epochs=2",
                 "train.steps_per_epoch=2", "train.batch_size=8", "train.eval_batch_size=16", "train.progress=false",
                 "train.device=cpu", "sasrec.max_len=12" if model == "sasrec" else "backbone.layer.max_rel_pos=12"]
    nextitem(f"{dataset}/{model}", overrides, seeds=[0, 1], out=tmp_path)
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["data"]["users"] == 40 and result["data"]["skipped_short"] == 0
    assert result["data"]["items"] == (3952 if dataset == "ml-1m" else 12101)
    for run in result["per_seed"]:
        assert run["epochs"] == 2 and run["steps"] == 4 and 1 <= run["best_epoch"] <= 2
        for split in ("valid", "test"):
            m = run[split]
            assert all(0.0 <= m[k] <= 1.0 for k in METRICS)
            assert m["hr@10"] <= m["hr@50"] and m["ndcg@10"] <= m["ndcg@50"]
            assert m["ndcg@10"] <= m["hr@10"] and m["ndcg@50"] <= m["hr@50"]
        assert run["valid"] == max((h["valid"] for h in run["history"]), key=lambda v: v["ndcg@10"])
    for k in METRICS:
        values = [r["test"][k] for r in result["per_seed"]]
        assert result["aggregate"]["test"][k]["mean"] == pytest.approx(sum(values) / 2)
        assert result["aggregate"]["test"][k]["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))


def test_hstu_dense_attention_trains_exactly_like_the_reference():
    data = pattern_data(users=40)
    runs = []
    for impl in ("reference", "dense"):
        cfg = tiny_config("hstu", max_epochs=2)
        layer = dataclasses.replace(cfg.backbone.layer, impl=impl, d_qk=50, d_v=50)  # d not a power of 2
        cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, layer=layer))
        runs.append(train_seed(cfg, data, 0, torch.device("cpu"), None))
    assert [h["loss"] for h in runs[0]["history"]] == pytest.approx([h["loss"] for h in runs[1]["history"]], rel=1e-4)
    assert runs[0]["test"] == pytest.approx(runs[1]["test"], abs=1e-6)


def test_hstu_absolute_positions_are_added_to_the_scaled_input():
    cfg = tiny_config("hstu")
    cfg = dataclasses.replace(cfg, embedding=dataclasses.replace(cfg.embedding, positions=8))
    torch.manual_seed(0)
    model = NextItemModel(cfg, 50).eval()
    seen = []
    model.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    batch = gather_batch(pattern_data().train, np.array([0, 1]))
    model.encode(batch, None)
    pos = torch.cat([torch.arange(n) for n in np.diff(batch.offsets.numpy())])
    expected = model.items(batch.ids) * math.sqrt(32) + model.positions.weight[pos]
    torch.testing.assert_close(seen[0], expected)
    assert model.positions.weight.abs().max() <= 2 / math.sqrt(32)
    with pytest.raises(ConfigError, match="embedding.positions"):
        load_nextitem_config(config_path("real", "ml-1m", "nextitem_hstu.yaml"), ["embedding.positions=100"])

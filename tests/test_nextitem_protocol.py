"""``train.protocol``: the published split (the validation item trains, no validation split), a fixed number of
epochs with the final weights and no validation, the config error, and ``standard`` pinned to its numbers
from before the option existed."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

import recfm.recipes.nextitem as recipe
from recfm.configs import config_path
from recfm.errors import ConfigError
from recfm.foundation.model.sasrec import SASRecConfig
from recfm.recipes.nextitem import format_table, nextitem, train_seed
from recfm.recipes.nextitem_config import NextItemConfig, Protocol, TrainSection, load_nextitem_config
from recfm.recipes.nextitem_data import from_sequences
from recfm.recipes.nextitem_model import NextItemModel, evaluate

PUBLISHED = Protocol.PUBLISHED


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def rows(t: torch.Tensor) -> list[int]:
    return t.tolist()


def pattern_data(users: int = 40, protocol: Protocol = Protocol.STANDARD):
    """50 items, item i always followed by i+1 (wrapping); 5..9 items per user (as tests/test_nextitem.py)."""
    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(users):
        start, length = rng.integers(50), rng.integers(5, 10)
        seqs.append([(start + k) % 50 + 1 for k in range(length)])
    return from_sequences(list(range(users)), seqs, max_len=8, num_items=50, protocol=protocol)


def tiny_config(**train) -> NextItemConfig:
    """A one-block SASRec, d 32, no dropout, on the CPU."""
    settings = dict(batch_size=32, lr=1e-2, warmup_steps=0, max_epochs=12, patience=100, progress=False, device="cpu")
    return NextItemConfig(
        name="pattern-sasrec", model="sasrec",
        sasrec=SASRecConfig(d_model=32, num_blocks=1, num_heads=2, dropout=0.0, max_len=8),
        train=TrainSection(**{**settings, **train}), seeds=(0,),
    )


# ------------------------------------------------------------------------------------------------ split


def test_published_split_trains_on_the_validation_item_and_keeps_the_test_split():
    users, seqs = [7, 9, 4], [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10]]
    standard = from_sequences(users, seqs, max_len=10)
    data = from_sequences(users, seqs, max_len=10, protocol=PUBLISHED)
    # standard trains on 1 2 3 of user 7 only (user 9's prefix is one item); rows are ids - 1
    assert rows(standard.train.targets) == [1, 2] and standard.valid is not None
    # published: user 7's prefix 1 2 3 4 -> inputs 1 2 3 predict 2 3 4 (4, the validation item, is a target);
    # user 9's prefix 6 7 -> input 6 predicts 7. User 4 (two items) is skipped in both protocols.
    assert rows(data.train.inputs) == [0, 1, 2, 5] and rows(data.train.targets) == [1, 2, 3, 6]
    assert data.train.offsets_host.tolist() == [0, 3, 4]
    assert data.valid is None
    assert (data.users, data.skipped_short) == (standard.users, standard.skipped_short) == (2, 1)
    # test: the same users, inputs and targets as standard (the last item), never a training target
    assert rows(data.test.inputs) == rows(standard.test.inputs) == [0, 1, 2, 3, 5, 6]
    assert rows(data.test.targets) == rows(standard.test.targets) == [4, 7]
    assert data.test.offsets_host.tolist() == [0, 4, 6]


def test_published_train_inputs_keep_the_most_recent_max_len_items():
    data = from_sequences([1], [[1, 2, 3, 4, 5, 6, 7]], max_len=2, protocol="published")
    assert rows(data.train.inputs) == [3, 4] and rows(data.train.targets) == [4, 5]  # prefix ..6 -> last 3 items
    assert rows(data.test.inputs) == [4, 5] and rows(data.test.targets) == [6]


def test_train_targets_are_all_but_the_first_and_the_held_out_items_on_a_random_log():
    rng = np.random.default_rng(3)
    seqs = [rng.integers(1, 40, rng.integers(3, 15)).tolist() for _ in range(30)]
    max_len = 6
    for protocol, held_out in [(Protocol.STANDARD, 2), (PUBLISHED, 1)]:
        data = from_sequences(list(range(30)), seqs, max_len=max_len, num_items=40, protocol=protocol)
        off = data.train.offsets_host
        trained = [s for s in seqs if len(s) - held_out >= 2]  # users with at least one training pair
        assert len(off) - 1 == len(trained)
        for u, s in enumerate(trained):
            expected = [i - 1 for i in s[1:len(s) - held_out]][-max_len:]
            assert rows(data.train.targets[off[u]:off[u + 1]]) == expected


# ---------------------------------------------------------------------------------------------- training


def spy(monkeypatch, data):
    """Record every evaluation (which split, history exclusion, the weights) and the weights after each epoch."""
    evaluations, epochs = [], []
    real_evaluate, real_epoch = recipe.evaluate, recipe._train_epoch

    def fake_evaluate(model, split, *args):
        name = "test" if split is data.test else "valid" if split is data.valid else "?"
        evaluations.append((name, args[-1], copy.deepcopy(model.state_dict())))
        return real_evaluate(model, split, *args)

    def fake_epoch(model, *args):
        out = real_epoch(model, *args)
        epochs.append(copy.deepcopy(model.state_dict()))
        return out

    monkeypatch.setattr(recipe, "evaluate", fake_evaluate)
    monkeypatch.setattr(recipe, "_train_epoch", fake_epoch)
    return evaluations, epochs


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_published_ignores_patience_and_runs_exactly_max_epochs(monkeypatch):
    # lr 1e-12: the weights do not move, so validation never improves and patience 1 stops a standard run
    cfg = tiny_config(lr=1e-12, patience=1, max_epochs=4)
    standard = train_seed(cfg, pattern_data(), 0, torch.device("cpu"), None)
    assert (standard["stopped_by"], standard["epochs"]) == ("patience", 2)
    data = pattern_data(protocol=PUBLISHED)
    evaluations, epochs = spy(monkeypatch, data)
    run = train_seed(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, protocol=PUBLISHED)), data, 0,
                     torch.device("cpu"), None)
    assert (run["epochs"], run["stopped_by"], run["steps"], len(epochs)) == (4, "max_epochs", 8, 4)
    assert [h["epoch"] for h in run["history"]] == [1, 2, 3, 4]
    assert [name for name, _, _ in evaluations] == ["test"]


def test_published_tests_the_final_weights_once_without_validation(monkeypatch):
    data = pattern_data(protocol=PUBLISHED)
    evaluations, epochs = spy(monkeypatch, data)
    cfg = tiny_config(protocol=PUBLISHED, max_epochs=3, exclude_history=True)
    run = train_seed(cfg, data, 0, torch.device("cpu"), None)
    assert run["epochs"] == 3 and run["best_epoch"] is None and run["valid"] is None
    assert all(h["valid"] is None for h in run["history"])
    assert [(name, exclude) for name, exclude, _ in evaluations] == [("test", True)]  # once, history excluded
    assert not torch.equal(epochs[-2]["items.weight"], epochs[-1]["items.weight"])  # the weights did move
    assert_same_weights(evaluations[0][2], epochs[-1])
    # the reported test metrics are those of the final weights, ranked without the history
    model = NextItemModel(cfg, data.num_items)
    model.load_state_dict(epochs[-1])
    assert run["test"] == evaluate(model, data.test, 64, 65536, autocast=False, exclude_history=True)[0]


def test_published_is_still_cut_by_the_time_budget():
    data = pattern_data(protocol=PUBLISHED)
    run = train_seed(tiny_config(protocol=PUBLISHED, max_minutes=1e-9), data, 0, torch.device("cpu"), None)
    assert (run["stopped_by"], run["epochs"], run["steps"], run["best_epoch"]) == ("max_minutes", 1, 1, None)


def test_standard_training_is_pinned_to_its_numbers_before_the_option():
    # numbers of this run at the commit before train.protocol existed (same machine class: CPU, one thread)
    run = train_seed(tiny_config(lr=2e-3, max_epochs=3, patience=2, exclude_history=True), pattern_data(), 0,
                     torch.device("cpu"), None)
    assert [h["loss"] for h in run["history"]] == pytest.approx([9.21672534942627, 5.147262096405029,
                                                                3.1378188133239746], rel=1e-5)
    assert [h["valid"]["ndcg@10"] for h in run["history"]] == pytest.approx(
        [0.29213250839755506, 0.5157401626597553, 0.6181363329231154], rel=1e-5)
    assert (run["best_epoch"], run["stopped_by"], run["steps"]) == (3, "max_epochs", 6)
    assert run["test"] == pytest.approx({"hr@10": 0.875, "ndcg@10": 0.7316794853240736, "hr@50": 1.0,
                                         "ndcg@50": 0.7629188358820528}, rel=1e-5)
    assert TrainSection().protocol is Protocol.STANDARD


# ------------------------------------------------------------------------------------- config, results


def test_protocol_is_validated_and_parsed_from_the_config():
    path = config_path("real", "ml-1m", "nextitem_sasrec.yaml")
    with pytest.raises(ConfigError) as e:
        load_nextitem_config(path, ["train.protocol=leave-one-out"])
    assert f"{path}: train.protocol: 'leave-one-out' is not one of: standard, published" in str(e.value)
    assert load_nextitem_config(path).train.protocol is Protocol.STANDARD
    assert load_nextitem_config(path, ["train.protocol=published"]).train.protocol is PUBLISHED


@pytest.mark.parametrize("protocol", ["standard", "published"])
def test_results_and_table_record_the_protocol(tmp_path, protocol):
    (tmp_path / "seqs.txt").write_text("".join(f"{u} " + " ".join(str((u + k) % 20 + 1) for k in range(6)) + "\n"
                                               for u in range(1, 13)))
    cfg = load_nextitem_config(_write_config(tmp_path), [f"train.protocol={protocol}"])
    result = nextitem(cfg, out=tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["protocol"] == saved["config"]["train"]["protocol"] == protocol
    table = format_table(result)
    assert f"protocol {protocol}" in table.splitlines()[0]
    (run,) = saved["per_seed"]
    assert run["epochs"] == 2 and set(run) == {"seed", "best_epoch", "epochs", "steps", "stopped_by",
                                               "train_seconds", "valid", "test", "history"}
    if protocol == "published":
        assert saved["aggregate"]["valid"] is None and run["best_epoch"] is None and run["valid"] is None
        assert "valid mean" not in table and "final weights after 2 epochs" in table
        ckpt = torch.load(tmp_path / "run" / "seed-0" / "checkpoints" / f"step-{run['steps']:08d}.pt",
                          weights_only=False)
        assert ckpt["epoch"] == 2 and ckpt["valid"] is None
    else:
        assert saved["aggregate"]["valid"] is not None and 1 <= run["best_epoch"] <= 2
        assert "valid mean" in table and "best epoch" in table


def _write_config(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "name: toy\nmodel: sasrec\n"
        f"data: {{dataset: sequences, root: {json.dumps(str(tmp_path))}, path: seqs.txt, max_len: 6, num_items: 20}}\n"
        "sasrec: {d_model: 8, num_blocks: 1, num_heads: 1, max_len: 6}\n"
        "retrieval: {num_negatives: 8}\n"
        "train: {batch_size: 4, max_epochs: 2, patience: 1, progress: false, device: cpu}\nseeds: [0]\n"
    )
    return cfg

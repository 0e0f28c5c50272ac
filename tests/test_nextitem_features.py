"""Next-item training options: every training window (``data.train_windows=all``), the cosine schedule
(``train.schedule``) and item side features (``embedding.item_attributes``), each against hand-computed values."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from recfm.errors import ConfigError, DataError
from recfm.foundation.data.real import ml1m
from recfm.foundation.model.sasrec import SASRecConfig
from recfm.recipes.nextitem import lr_factor, train_seed
from recfm.recipes.nextitem_config import (DataSection, Dataset, EmbeddingSection, NextItemConfig, Protocol,
                                           Schedule, TrainSection, Windows)
from recfm.recipes.nextitem_data import from_sequences
from recfm.recipes.nextitem_features import ItemTable, from_mapping, load_item_attributes
from recfm.recipes.nextitem_model import NextItemModel

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def samples(split) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) of each sample of a training split, as item rows."""
    o = split.offsets_host
    return [(split.inputs[a:b].tolist(), split.targets[a:b].tolist()) for a, b in zip(o[:-1], o[1:])]


# ------------------------------------------------------------------------------------------------ windows


@pytest.mark.parametrize("protocol", list(Protocol))
def test_all_windows_train_every_target_once_with_its_own_context(protocol):
    seq = list(range(1, 12))  # ids 1..11 -> rows 0..10
    data = from_sequences([5, 6], [seq, [1, 2, 3]], max_len=3, num_items=20, protocol=protocol,
                          windows=Windows.ALL)
    if protocol is Protocol.STANDARD:  # prefix rows 0..8 (valid row 9, test row 10)
        expected = [([0, 1], [1, 2]), ([2, 3, 4], [3, 4, 5]), ([5, 6, 7], [6, 7, 8])]
    else:  # prefix rows 0..9: row 9 (the validation item of `standard`) is a target
        expected = [([0, 1, 2], [1, 2, 3]), ([3, 4, 5], [4, 5, 6]), ([6, 7, 8], [7, 8, 9])]
    got = samples(data.train)
    if protocol is Protocol.PUBLISHED:  # user 6's [1, 2, 3]: 1 -> 2 trains
        assert got.pop() == ([0], [1])
    assert got == expected
    assert data.train_users == 1 + (protocol is Protocol.PUBLISHED)  # [1,2,3]: a target only when published
    last = from_sequences([5, 6], [seq, [1, 2, 3]], max_len=3, num_items=20, protocol=protocol)
    assert samples(last.train)[0] == expected[-1]  # `last` keeps only the most recent window
    for split in ("test", "valid"):  # evaluation splits do not change
        a, b = getattr(data, split), getattr(last, split)
        assert (a is None) == (b is None)
        if a is not None:
            assert a.inputs.tolist() == b.inputs.tolist() and a.targets.tolist() == b.targets.tolist()


def test_all_windows_cut_times_like_items_and_cover_a_long_log():
    """Times name each token (user * 1000 + position): every sample is a run of consecutive positions of one
    user, its targets are the items after them, and every training target appears exactly once."""
    rng = np.random.default_rng(0)
    lengths = (3, 4, 17, 40, 41, 42)
    seqs = [rng.integers(1, 30, size=n).tolist() for n in lengths]
    times = [[u * 1000 + p for p in range(n)] for u, n in enumerate(lengths)]
    data = from_sequences(list(range(6)), seqs, times=times, max_len=8, num_items=30, windows="all")
    seen = []
    o = data.train.offsets_host
    for a, b in zip(o[:-1], o[1:]):
        stamps = data.train.times[a:b].tolist()
        user, first = divmod(stamps[0], 1000)
        positions = list(range(first, first + (b - a)))
        assert 1 <= b - a <= 8 and stamps == [user * 1000 + p for p in positions]
        assert data.train.inputs[a:b].tolist() == [seqs[user][p] - 1 for p in positions]
        assert data.train.targets[a:b].tolist() == [seqs[user][p + 1] - 1 for p in positions]
        seen += [(user, p + 1) for p in positions]
    assert sorted(seen) == [(u, p) for u, n in enumerate(lengths) for p in range(1, n - 2)]


# ------------------------------------------------------------------------------------------------ schedule


def test_lr_factor_warms_up_then_stays_or_follows_half_a_cosine():
    const = lr_factor(Schedule.CONSTANT, warmup_steps=3, total_steps=100)
    assert [const(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cos = lr_factor(Schedule.COSINE, warmup_steps=0, total_steps=100)
    assert cos(0) == 1.0 and cos(50) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0)
    assert cos(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert cos(150) == pytest.approx(0.0)  # past the end: stays at 0
    warm = lr_factor(Schedule.COSINE, warmup_steps=9, total_steps=100)
    assert warm(4) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 0.04)))


# ------------------------------------------------------------------------------------------------ attributes


def test_item_table_adds_the_mean_of_the_attribute_rows():
    attrs = from_mapping({1: ["genre:a", "year:1990"], 3: ["genre:b", "genre:a", "genre:a"]}, num_items=4)
    assert attrs.names == ("genre:a", "genre:b", "year:1990")
    assert attrs.offsets.tolist() == [0, 2, 2, 4, 4] and attrs.tokens.tolist() == [0, 2, 0, 1]
    table = ItemTable(4, 3, attrs)
    ids, a = table.ids.weight.detach(), table.attributes.weight.detach()
    expected = ids.clone()
    expected[0] += (a[0] + a[2]) / 2
    expected[2] += (a[0] + a[1]) / 2  # a duplicated token counts once
    torch.testing.assert_close(table.weight.detach(), expected)  # items 2 and 4: their id rows alone
    torch.testing.assert_close(table(torch.tensor([2, 0])).detach(), expected[[2, 0]])


def test_attributes_reject_an_item_out_of_range():
    with pytest.raises(DataError, match="side.json: item 9 out of range 1..4"):
        from_mapping({1: ["x"], 9: ["y"]}, num_items=4, source="side.json")


def test_read_movies_tokens_and_bad_lines(tmp_path):
    path = tmp_path / "movies.dat"
    path.write_bytes("1::Toy Story (1995)::Animation|Comedy\n7::Sabrina::Drama\n".encode("latin-1"))
    assert ml1m.read_movies(path) == {1: ["genre:Animation", "genre:Comedy", "year:1995"], 7: ["genre:Drama"]}
    path.write_text("1::Toy Story (1995)::Comedy\n1::Again (1996)::Drama\n")
    with pytest.raises(DataError, match=r"movies.dat:2: movie 1 listed twice"):
        ml1m.read_movies(path)
    path.write_text("1::Toy Story (1995)\n")
    with pytest.raises(DataError, match=r"movies.dat:1: expected 'MovieID::Title::Genres'"):
        ml1m.read_movies(path)


def sasrec_config(**embedding) -> NextItemConfig:
    return NextItemConfig(
        name="attrs", model="sasrec", sasrec=SASRecConfig(d_model=16, num_blocks=1, num_heads=2, dropout=0.0, max_len=8),
        embedding=EmbeddingSection(**embedding), retrieval=dataclasses.replace(NextItemConfig("x", "hstu").retrieval,
                                                                                negatives="full"),
        train=TrainSection(batch_size=16, lr=1e-2, warmup_steps=0, max_epochs=2, progress=False, device="cpu",
                           schedule=Schedule.COSINE),
        seeds=(0,), source_file="attrs.yaml")


def test_attributes_reach_the_shared_head_and_train(monkeypatch):
    """One genre groups items 1-10, another 11-20: the attribute rows get gradients through the input table
    and the shared output table, and a few cosine epochs run end to end."""
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 21, size=int(rng.integers(4, 9))).tolist() for _ in range(24)]
    data = from_sequences(list(range(24)), seqs, max_len=8, num_items=20, windows="all")
    attrs = from_mapping({i: ["genre:low" if i <= 10 else "genre:high"] for i in range(1, 21)}, num_items=20)
    cfg = sasrec_config(item_attributes=True)
    with pytest.raises(ConfigError, match="attrs.yaml: embedding.item_attributes is on but no attributes"):
        NextItemModel(cfg, 20)
    calls = []
    weight = ItemTable.weight
    monkeypatch.setattr(ItemTable, "weight", property(lambda self: calls.append(1) or weight.fget(self)))
    model = NextItemModel(cfg, 20, attrs)
    assert not calls  # nothing reads the table before the model moves to its device
    assert model.head.items is model.items and model.items.tokens.device.type == "cpu"
    monkeypatch.undo()
    run = train_seed(cfg, data, 0, torch.device("cpu"), None, attrs)
    assert run["steps"] == 2 * math.ceil(data.train.num_users / 16)
    assert np.isfinite(run["history"][-1]["loss"])
    model = NextItemModel(cfg, 20, attrs)  # fresh weights, one manual step: both attribute rows move
    loss = model.head.loss(model.items(data.train.inputs[:8]), data.train.targets[:8])
    loss.backward()
    assert (model.items.attributes.weight.grad.abs().sum(1) > 0).all()


@pytest.mark.data
def test_ml1m_movies_give_genres_and_years():
    folder = DATA / "ml-1m"
    if not (folder / "movies.dat").is_file():
        pytest.skip(f"{folder}/movies.dat not present")
    attrs = load_item_attributes(DataSection(dataset=Dataset.ML_1M, root=str(DATA), path="ml-1m"), 3952)
    genres = [n for n in attrs.names if n.startswith("genre:")]
    years = [n for n in attrs.names if n.startswith("year:")]
    assert len(genres) == 18 and len(years) == 81 and (years[0], years[-1]) == ("year:1919", "year:2000")
    assert attrs.covered() == 3883  # movies.dat lists 3883 of the 3952 ids


def test_a_dataset_without_a_side_file_is_a_config_error(tmp_path):
    section = DataSection(dataset=Dataset.SEQUENCES, root=str(tmp_path), path="seqs.txt")
    with pytest.raises(ConfigError, match="embedding.item_attributes: dataset sequences has no item side file"):
        load_item_attributes(section, 10)


def test_tuned_ml1m_config_loads_with_its_options():
    from recfm.recipes.nextitem import resolve_config
    from recfm.recipes.nextitem_config import load_nextitem_config
    cfg = load_nextitem_config(resolve_config("ml-1m/hstu_tuned"))
    assert (cfg.data.train_windows, cfg.train.schedule, cfg.train.protocol) == (Windows.ALL, Schedule.COSINE,
                                                                                 Protocol.PUBLISHED)
    assert cfg.backbone.layer.d_model == 128 and cfg.retrieval.negatives.value == "full"


@pytest.mark.data
def test_tuned_ml1m_config_runs_on_a_slice_of_the_public_data(tmp_path):
    from recfm.recipes.nextitem import nextitem
    if not (DATA / "ml-1m").is_dir():
        pytest.skip(f"{DATA}/ml-1m not present")
    overrides = [f"data.root={DATA}", "data.max_users=30", "data.max_len=12", "train.max_epochs=2",
                 "train.steps_per_epoch=2", "train.batch_size=8", "train.eval_batch_size=16", "train.progress=false",
                 "train.device=cpu", "backbone.layer.max_rel_pos=12", "backbone.num_blocks=2"]
    result = nextitem("ml-1m/hstu_tuned", overrides, seeds=[0], out=tmp_path)
    data = result["data"]
    assert data["users"] == 30 and data["train_samples"] > data["train_users"] == 30  # long users: many windows
    run = result["per_seed"][0]
    assert run["best_epoch"] is None and run["epochs"] == 2 and run["steps"] == 4
    assert 0.0 <= run["test"]["ndcg@10"] <= run["test"]["hr@10"] <= run["test"]["hr@50"] <= 1.0

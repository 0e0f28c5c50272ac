"""Token adapters: every group's rows are its tokenizer's output, shared tables are one Parameter, bad input
is named."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recfm.errors import ConfigError, DataError, RecfmError
from recfm.foundation.data.batch import Batch, TargetGroup, TokenGroup
from recfm.foundation.model.adapters import GroupLayout, TokenEmbedder, kjt_key
from recfm.scenarios.spec import (
    FeatureSpec,
    FeatureType,
    NumericTransform,
    ScenarioSpec,
    SequenceSpec,
    Source,
    Vocab,
    VocabKind,
    WorldSpec,
)


def cat(name, size, dim, table=None, source=Source.ITEM):
    return FeatureSpec(name, FeatureType.CATEGORICAL, source, vocab=Vocab(VocabKind.IDENTITY, size), table=table, dim=dim)


ITEM = cat("item_id", 50, 6, table="item")
WORLD = WorldSpec(
    name="tiny",
    sequences=(
        SequenceSpec("clicks", ("click",), (ITEM, cat("action", 3, 2), FeatureSpec("ts", FeatureType.TIMESTAMP))),
        SequenceSpec("orders", ("order",), (ITEM, FeatureSpec("price", FeatureType.NUMERIC, transform=NumericTransform.LOG))),
    ),
    scenarios=(
        ScenarioSpec(
            "feed",
            (
                ITEM,
                cat("city", 10, 3, source=Source.USER),
                FeatureSpec("rating", FeatureType.NUMERIC),
                FeatureSpec("dist", FeatureType.NUMERIC, transform=NumericTransform.BUCKETIZE, boundaries=(1.0, 2.0), dim=3),
            ),
        ),
        ScenarioSpec(
            "coupon",
            (
                cat("coupon_item", 50, 6, table="item"),
                FeatureSpec("photo", FeatureType.DENSE, length=4),
                FeatureSpec("a", FeatureType.NUMERIC),
                FeatureSpec("b", FeatureType.NUMERIC),
            ),
        ),
    ),
)


def group(layout: GroupLayout, rows: torch.Tensor, gen: torch.Generator, target: bool) -> TokenGroup:
    """A group filling ``rows`` with random ids / numerics / dense values, as the batch builder would."""
    n = rows.numel()
    keys = [f.name for f in layout.embedded]
    values = torch.cat([torch.randint(0, f.num_embeddings, (n,), generator=gen) for f in layout.embedded]) if keys else None
    sparse = KeyedJaggedTensor(keys=keys, values=values, lengths=torch.ones(n * len(keys), dtype=torch.long)) if keys else None
    kwargs = dict(
        name=layout.name,
        token_index=rows,
        sparse=sparse,
        numeric=torch.randn(n, len(layout.numeric), generator=gen),
        dense=torch.randn(n, layout.dense_width, generator=gen),
        numeric_names=layout.numeric,
        dense_names=tuple(f.name for f in layout.dense),
    )
    return TargetGroup(**kwargs) if target else TokenGroup(**kwargs)


def make_batch(emb: TokenEmbedder, sizes: dict[str, int], seed: int = 0) -> Batch:
    """One sample whose N tokens are split at random among the groups in ``sizes``."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes.values())
    perm = torch.randperm(n, generator=gen)
    events, targets, start = {}, {}, 0
    for name, k in sizes.items():
        rows = perm[start : start + k]
        start += k
        is_target = name not in emb.sequence_names
        g = group(emb.layouts[name], rows, gen, is_target) if name in emb.layouts else group(GroupLayout(name, (), (), ()), rows, gen, True)
        (targets if is_target else events)[name] = g
    return Batch(
        offsets=torch.tensor([0, n]),
        token_type=torch.zeros(n, dtype=torch.int8),
        timestamps=torch.arange(n),
        group=torch.zeros(n, dtype=torch.long),
        user_id=torch.tensor([7]),
        events=events,
        targets=targets,
        scenarios=tuple(targets),
        sequences=tuple(events),
        max_len=n,
        num_targets=sum(g.size for g in targets.values()),
    )


def reference_tokens(emb: TokenEmbedder, g: TokenGroup, mlp: torch.nn.Module) -> torch.Tensor:
    """The tokenizer by hand: table rows by indexing weights, then numeric, then dense, then the MLP."""
    layout = emb.layouts[g.name]
    parts = []
    for f in layout.embedded:
        ids = g.sparse.to_dict()[f.name].values()
        parts.append(emb.table(f.table_name).weight[ids])
    return mlp(torch.cat([*parts, g.numeric, g.dense], dim=1))


SIZES = {"clicks": 7, "orders": 4, "feed": 3, "coupon": 5}


def test_layout_sorts_features_and_skips_timestamps():
    clicks = GroupLayout.of("clicks", WORLD.sequences[0].fields)
    assert [f.name for f in clicks.embedded] == ["item_id", "action"] and clicks.in_dim == 6 + 2
    feed = GroupLayout.of("feed", WORLD.scenarios[0].features)
    assert [f.name for f in feed.embedded] == ["item_id", "city", "dist"] and feed.numeric == ("rating",)
    assert feed.in_dim == 6 + 3 + 3 + 1
    assert GroupLayout.of("coupon", WORLD.scenarios[1].features).in_dim == 6 + 2 + 4
    assert kjt_key("feed", "item_id") == "feed.item_id"


def test_every_group_row_is_its_tokenizer_output():
    torch.manual_seed(0)
    emb = TokenEmbedder(WORLD, None, d_model=8, hidden=16)
    batch = make_batch(emb, SIZES)
    x = emb(batch)
    assert x.shape == (sum(SIZES.values()), 8)
    for g in batch.events.values():
        torch.testing.assert_close(x[g.token_index], reference_tokens(emb, g, emb.sequence_mlps[g.name]))
    for g in batch.targets.values():
        torch.testing.assert_close(x[g.token_index], reference_tokens(emb, g, emb.scenario_mlps[g.name]))
    assert (x.abs().sum(1) > 0).all()  # every row written


def test_shared_table_is_one_parameter_and_learns_from_two_scenarios():
    emb = TokenEmbedder(WORLD, None, d_model=8)
    item = emb.table("item").weight
    assert sum(p is item for p in emb.parameters()) == 1
    assert [t.features for t in emb.tables if t.name == "item"] == [
        ("clicks.item_id", "orders.item_id", "feed.item_id", "coupon.coupon_item")
    ]
    batch = make_batch(emb, {"feed": 3, "coupon": 3}, seed=1)
    x = emb(batch)
    for name, key in (("feed", "item_id"), ("coupon", "coupon_item")):
        item.grad = None
        x_s = x[batch.targets[name].token_index]
        x_s.sum().backward(retain_graph=True)
        ids = batch.targets[name].sparse.to_dict()[key].values()
        touched = item.grad.abs().sum(1).nonzero().flatten()
        assert set(touched.tolist()) == set(ids.tolist()), name


def test_scenario_without_adapter_is_named_before_forward():
    emb = TokenEmbedder(WORLD, WORLD.scenarios[:1], d_model=8)
    batch = make_batch(emb, {"clicks": 2, "feed": 2, "hotel": 2})
    with pytest.raises(RecfmError, match="'hotel'.*no adapter.*feed"):
        emb(batch)


def test_missing_scenario_in_batch_is_fine():
    emb = TokenEmbedder(WORLD, None, d_model=8)
    x = emb(make_batch(emb, {"clicks": 3, "feed": 2}))
    assert x.shape == (5, 8)


def test_add_scenario_keeps_parameters_and_shares_tables():
    emb = TokenEmbedder(WORLD, WORLD.scenarios[:1], d_model=8)
    before = {name: p for name, p in emb.named_parameters()}
    hotel = ScenarioSpec("hotel", (ITEM, cat("star", 6, 3), FeatureSpec("price", FeatureType.NUMERIC)))
    emb.add_scenario(hotel)
    after = dict(emb.named_parameters())
    for name, p in before.items():
        assert after[name] is p, name  # same objects: optimizer state stays valid
    new = set(after) - set(before)
    assert new == {
        "scenario_mlps.hotel.weight",
        "scenario_mlps.hotel.bias",
        "collections.dim3.embeddings.star.weight",
    }
    assert emb.scenario_names == ("feed", "hotel")
    batch = make_batch(emb, {"clicks": 2, "hotel": 3})
    torch.testing.assert_close(
        emb(batch)[batch.targets["hotel"].token_index], reference_tokens(emb, batch.targets["hotel"], emb.scenario_mlps["hotel"])
    )
    with pytest.raises(ConfigError, match="already has a group called 'hotel'"):
        emb.add_scenario(hotel)


def test_shared_table_with_other_dim_is_a_config_error():
    bad = ScenarioSpec("bad", (cat("item_id", 50, 5, table="item"),), source_file="bad.yaml")
    emb = TokenEmbedder(WORLD, WORLD.scenarios[:1], d_model=8)
    with pytest.raises(ConfigError, match="bad.yaml.*table 'item' has dim 6"):
        emb.add_scenario(bad)
    assert emb.scenario_names == ("feed",)  # nothing half-added


def test_batch_disagreeing_with_spec_is_a_data_error():
    emb = TokenEmbedder(WORLD, None, d_model=8)
    batch = make_batch(emb, {"feed": 3})
    g = batch.targets["feed"]
    batch.targets["feed"] = replace(g, numeric=torch.zeros(3, 2), numeric_names=())
    with pytest.raises(DataError, match="'feed': numeric is \\(3, 2\\), expected \\[3, 1\\]"):
        emb(batch)
    batch.targets["feed"] = replace(g, numeric_names=("other",))
    with pytest.raises(DataError, match="numeric columns \\['other'\\]"):
        emb(batch)


def test_forward_calls_no_fbgemm_op():
    """The hot path must run where fbgemm's CUDA ops are absent (torch 2.11 CUDA machines)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.name())
            return func(*args, **(kwargs or {}))

    emb = TokenEmbedder(WORLD, None, d_model=8, hidden=4)
    batch = make_batch(emb, SIZES)
    with Ops() as ops:
        emb(batch).sum().backward()
    assert "aten::embedding" in ops.names
    assert not [n for n in ops.names if n.startswith("fbgemm")]

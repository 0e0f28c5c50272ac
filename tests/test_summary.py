"""`recfm model summary`: parameter counts equal constructed modules, FLOPs equal a hand count, presets load."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from recfm.errors import ConfigError
from recfm.foundation.model.adapters import TokenEmbedder
from recfm.foundation.model.backbone import Backbone
from recfm.foundation.model.config import PRESETS, load_model_config
from recfm.foundation.model.mask import sample_mask
from recfm.foundation.model.summary import format_summary, layer_cost, mixed_mask_pairs, summarize
from recfm.heads.mmoe import MMoEHead
from recfm.heads.retrieval import RetrievalHead
from recfm.scenarios.registry import load_world
from recfm.scenarios.spec import ScenarioSpec, TaskSpec, TaskType, TokenType


def world_with_next_item():
    """The embedded world plus a scenario with a next-item task (a retrieval projection 32 -> 16)."""
    world = load_world(None)
    feed = world.scenario("home_feed")
    nxt = ScenarioSpec("next_feed", feed.features, tasks=(TaskSpec("next", TaskType.NEXT_ITEM, "item_id"),))
    return replace(world, scenarios=world.scenarios + (nxt,))


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_every_preset_loads_with_its_published_shape():
    shapes = {name: load_model_config(name) for name in PRESETS}
    got = {
        n: (c.backbone.num_blocks, c.backbone.target_layers_per_block, c.d_model, c.backbone.layer.num_heads, c.backbone.layer.num_kv_heads)
        for n, c in shapes.items()
    }
    assert got["small"] == (3, 0, 512, 2, 2)
    assert got["medium"] == (5, 0, 768, 3, 3)
    assert got["large"] == (15, 0, 768, 3, 3)
    assert got["mtfm"] == (4, 3, 768, 3, 1)
    assert shapes["mtfm"].backbone.num_layers == 16


def test_bad_model_yaml_reports_every_problem(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad\n"
        "backbone:\n  num_blocks: 2\n  layer: {d_model: 64, num_heads: 3, num_kv_heads: 2}\n"
        "head: {num_experts: 0, tower: 8}\n"
        "retrieval: {negatives: random}\n"
        "extra: 1\n"
    )
    with pytest.raises(ConfigError) as e:
        load_model_config(path)
    f = str(path)
    assert e.value.problems == [
        f"{f}: extra: unknown key (known keys: name, backbone, adapter, head, retrieval)",
        f"{f}: backbone.layer.num_kv_heads: must divide num_heads=3, got 2",
        f"{f}: head.tower: unknown key (did you mean 'tower_dim'?)",
        f"{f}: retrieval.negatives: 'random' is not one of: uniform, uniform_shared, in_batch, full",
    ]


def test_parameter_counts_equal_constructed_modules():
    world = world_with_next_item()
    cfg = load_model_config("tiny")
    s = summarize(cfg, world=world)
    backbone = Backbone(cfg.backbone_for(world))
    assert s.layer.num_groups == 2 + 1 + 5  # 2 sequence kinds, R, 5 scenarios
    assert s.params_backbone == numel(backbone)
    emb = TokenEmbedder(world, None, cfg.d_model, hidden=cfg.adapter.hidden)
    tables = sum(emb.table(t.name).weight.numel() for t in emb.tables)
    assert s.params_sparse == tables
    assert s.params_adapters == numel(emb) - tables
    head = MMoEHead(world.scenarios, cfg.d_model, cfg.head.num_experts, cfg.head.expert_dim, cfg.head.tower_dim)
    retrieval = RetrievalHead(cfg.d_model, 65536, 16, item_table=emb.table("item"))
    assert s.params_heads == numel(head) + numel(retrieval.proj)
    assert s.params_dense == numel(backbone) + numel(emb) - tables + numel(head) + numel(retrieval.proj)
    unshared = summarize(replace(cfg, retrieval=replace(cfg.retrieval, share_item_table=False)), world=world)
    assert unshared.params_sparse == tables + 65536 * 16


def test_mixed_mask_pairs_equal_the_mask():
    for h, r, t in [(3, 2, 2), (5, 0, 1), (0, 4, 3), (4, 3, 0)]:
        types = torch.tensor([TokenType.H] * h + [TokenType.R] * r + [TokenType.T] * t)
        times = torch.tensor([0] * h + list(range(10, 10 + r)) + [100] * t)  # every T after every R
        mask = sample_mask("mixed", h + r + t, types, times)
        target_rows = mask[h + r :]
        assert mixed_mask_pairs(h, r, t) == (int(mask.sum()), int(target_rows.sum()))


def test_tiny_flops_equal_a_hand_count():
    # tiny: d 32, 2 query heads, 1 KV head, d_qk = d_v = 16; 2 blocks of 1 full + 1 target layer.
    # Sample: H 3, R 2, T 2, N 7.
    # Allowed pairs: H: 3*3 = 9; R: (3+1) + (3+2) = 9; T: 2 * (3 + 2 + 1) = 12  -> 30 (target layer: 12).
    # Full layer:   K,V 2*7*32*(1*32) = 14336   U,Q 2*7*32*(2*32) = 28672   out 2*7*(2*16)*32 = 14336
    #               attention 2 * 30 pairs * 2 heads * (16 + 16) = 3840                 -> 61184
    # Target layer: K,V 14336   U,Q 2*2*32*64 = 8192   out 2*2*32*32 = 4096   attention 2*12*2*32 = 1536 -> 28160
    s = summarize("tiny", history=3, realtime=2, targets=2)
    assert (s.full_layer.projections, s.full_layer.attention) == (57344, 3840)
    assert (s.target_layer.projections, s.target_layer.attention) == (26624, 1536)
    assert (s.full_layers, s.target_layers) == (2, 2)
    assert s.flops_backbone == 2 * 61184 + 2 * 28160
    assert s.params_adapters is None and s.flops_adapters is None
    assert "needs a world" in format_summary(s)


def test_projection_flops_match_torch_flop_counter():
    """torch counts the reference attention's dense [L_q, L] score blocks; our projections must match it."""
    cfg = load_model_config("tiny")
    h, r, t = 3, 2, 2
    n = h + r + t
    backbone = Backbone(cfg.backbone)
    types = torch.tensor([TokenType.H] * h + [TokenType.R] * r + [TokenType.T] * t, dtype=torch.int8)
    x = torch.randn(n, cfg.d_model)
    with FlopCounterMode(display=False) as counter:
        backbone(x, torch.tensor([0, n]), types, torch.arange(n), torch.zeros(n, dtype=torch.long), n)
    c = cfg.backbone.layer
    dense_full = layer_cost(c, n, n, n * n)  # every (query, key) pair of the sample is computed, then masked
    dense_target = layer_cost(c, n, t, t * n)
    assert counter.get_total_flops() == 2 * dense_full.total + 2 * dense_target.total


def test_mtgr_table_is_reproduced_as_multiply_adds_of_a_causal_1000_token_sample():
    """MTGR Table 2 (5.47 / 18.59 / 55.76 GFLOPs) = multiply-accumulates (half our FLOPs) of N = 1000 tokens
    with N (N + 1) / 2 attended pairs; our default counts 2 FLOPs per MAC, 1150 tokens and the mixed mask."""
    n = 1000
    causal = n * (n + 1) // 2
    for name, reported in (("small", 5.47), ("medium", 18.59), ("large", 55.76)):
        cfg = load_model_config(name)
        macs = cfg.backbone.num_layers * layer_cost(cfg.backbone.layer, n, n, causal).total / 2
        assert macs / 1e9 == pytest.approx(reported, abs=0.011), name

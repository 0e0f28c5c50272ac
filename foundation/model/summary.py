"""Parameter counts and analytic forward FLOPs per sample of a model config (``recfm model summary``).

Everything is counted from the layer shapes (no model is built); ``tests/test_summary.py`` checks the
parameter counts against ``sum(p.numel())`` of constructed modules and the FLOPs against a hand count.

FLOPs are matmul FLOPs (2 per multiply-add) of one forward pass over one sample of ``H`` history, ``R``
real-time and ``T`` target tokens (``N = H + R + T``), per HSTU layer (:mod:`recfm.foundation.model.hstu`)::

    full layer    K, V: 2 N d h_kv (d_v + d_qk)    U, Q: 2 N d h (d_v + d_qk)    out: 2 N h d_v d
                  attention: 2 P h (d_qk + d_v)     P = allowed (query, key) pairs of the mixed mask
    target layer  K, V over all N tokens; U, Q, out and attention for the T queries only

Allowed pairs of the mixed mask (:mod:`recfm.foundation.model.mask`): an H query sees the H tokens
(``H^2``); the i-th R query sees H and R_1..R_i, itself included (``R H + R (R + 1) / 2``); a T query sees H,
the R tokens strictly before it and itself. We assume every exposure comes after every real-time event
(``T (H + R + 1)``): an upper bound, exact when the window's events all precede its exposures. A target layer
has only the T rows' pairs.

Not counted (each O(N d), under 1% here): Group LayerNorm, SiLU, the relative-bias adds, the ``A V``
normaliser, residual adds, embedding lookups. Adapters (tokenizer MLPs) and MMoE heads are counted when a
world is given: H and R tokens are spread evenly over the sequence kinds and T tokens over the scenarios
(means of the per-group costs). The retrieval head (next-item tasks) is counted in parameters only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from recfm.foundation.model.adapters import GroupLayout, table_specs
from recfm.foundation.model.backbone import BackboneConfig
from recfm.foundation.model.config import ModelConfig, load_model_config
from recfm.foundation.model.hstu import HSTUConfig
from recfm.heads.mmoe import SCORED
from recfm.scenarios.registry import load_world
from recfm.scenarios.spec import FeatureType, TaskType, WorldSpec


@dataclass(frozen=True)
class LayerCost:
    """Forward FLOPs of one layer for one sample."""

    projections: float
    attention: float

    @property
    def total(self) -> float:
        return self.projections + self.attention


@dataclass(frozen=True)
class Summary:
    """Parameters and FLOPs per sample; ``None`` where a world is needed and none was given."""

    name: str
    source: str
    world: str | None
    history: int
    realtime: int
    targets: int
    layer: HSTUConfig
    full_layers: int
    target_layers: int
    params_backbone: int
    params_adapters: int | None
    params_heads: int | None
    params_sparse: int | None
    full_layer: LayerCost
    target_layer: LayerCost
    flops_adapters: float | None
    flops_heads: float | None

    @property
    def tokens(self) -> int:
        return self.history + self.realtime + self.targets

    @property
    def params_dense(self) -> int:
        return self.params_backbone + (self.params_adapters or 0) + (self.params_heads or 0)

    @property
    def flops_backbone(self) -> float:
        return self.full_layers * self.full_layer.total + self.target_layers * self.target_layer.total

    @property
    def flops_total(self) -> float:
        return self.flops_backbone + (self.flops_adapters or 0.0) + (self.flops_heads or 0.0)


# ------------------------------------------------------------------------------------------ parameters


def linear_params(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def layer_params(c: HSTUConfig) -> int:
    """Parameters of one :class:`~recfm.foundation.model.hstu.HSTULayer`."""
    qk_v = c.d_qk + c.d_v
    bias_rows = c.num_heads if c.bias_per_head else 1
    bias_cols = (2 * c.max_rel_pos + 1 if c.use_pos_bias else 0) + (c.num_time_buckets if c.use_time_bias else 0)
    return (
        2 * c.num_groups * c.d_model  # Group LayerNorm on the input
        + linear_params(c.d_model, c.num_heads * qk_v)  # U, Q
        + linear_params(c.d_model, c.num_kv_heads * qk_v)  # V, K
        + bias_rows * bias_cols  # relative position / time bias tables
        + 2 * c.num_groups * c.num_heads * c.d_v  # Group LayerNorm on the attention output
        + linear_params(c.num_heads * c.d_v, c.d_model)  # output projection
    )


def backbone_params(b: BackboneConfig) -> int:
    return b.num_layers * layer_params(b.layer) + (2 * b.layer.num_groups * b.layer.d_model if b.final_norm else 0)


def mlp_params(in_dim: int, hidden: int, out_dim: int) -> int:
    """A tokenizer MLP (:func:`recfm.foundation.model.adapters.tokenizer_mlp`)."""
    return linear_params(in_dim, out_dim) if hidden <= 0 else linear_params(in_dim, hidden) + linear_params(hidden, out_dim)


def adapter_params(cfg: ModelConfig, world: WorldSpec) -> int:
    """Dense parameters of a :class:`~recfm.foundation.model.adapters.TokenEmbedder` (tables excluded)."""
    return sum(mlp_params(layout.in_dim, cfg.adapter.hidden, cfg.d_model) for layout in _layouts(world))


def head_params(cfg: ModelConfig, world: WorldSpec) -> int:
    """MMoE (shared experts + per-task gates and towers) and one retrieval projection per next-item task."""
    h, d = cfg.head, cfg.d_model
    tasks = [t for s in world.scenarios for t in s.tasks if t.type in SCORED]
    tower = linear_params(d, h.num_experts) + linear_params(h.expert_dim, h.tower_dim) + linear_params(h.tower_dim, 1)
    mmoe = h.num_experts * linear_params(d, h.expert_dim) + len(tasks) * tower
    return mmoe + sum(d * dim for dim in _retrieval_dims(world) if dim != d)


def sparse_params(cfg: ModelConfig, world: WorldSpec) -> int:
    """Embedding rows x dims of every table, plus separate next-item output tables if not shared."""
    tables = sum(t.num_embeddings * t.dim for t in table_specs(world, _layouts(world)))
    if cfg.retrieval.share_item_table:
        return tables
    return tables + sum(s.feature(t.label).num_embeddings * s.feature(t.label).dim for s, t in _next_item_tasks(world))


# --------------------------------------------------------------------------------------------- FLOPs


def mixed_mask_pairs(h: int, r: int, t: int) -> tuple[int, int]:
    """Allowed (query, key) pairs of one sample: ``(all queries, T queries only)`` (module docstring)."""
    target = t * (h + r + 1)
    return h * h + r * h + r * (r + 1) // 2 + target, target


def layer_cost(c: HSTUConfig, n: int, n_queries: int, pairs: int) -> LayerCost:
    """FLOPs of one HSTU layer: K/V for ``n`` tokens, U/Q/output for ``n_queries``, ``pairs`` attended pairs."""
    qk_v = c.d_qk + c.d_v
    proj = 2 * n * c.d_model * c.num_kv_heads * qk_v + 2 * n_queries * c.d_model * c.num_heads * qk_v
    proj += 2 * n_queries * c.num_heads * c.d_v * c.d_model
    return LayerCost(float(proj), float(2 * pairs * c.num_heads * qk_v))


def _mlp_flops(in_dim: int, hidden: int, out_dim: int) -> int:
    return 2 * (in_dim * out_dim if hidden <= 0 else in_dim * hidden + hidden * out_dim)


def adapter_flops(cfg: ModelConfig, world: WorldSpec, events: int, targets: int) -> float:
    """Tokenizer FLOPs: events spread evenly over sequence kinds, targets over scenarios."""
    hidden, d = cfg.adapter.hidden, cfg.d_model
    seq = [_mlp_flops(GroupLayout.of(s.name, s.fields).in_dim, hidden, d) for s in world.sequences]
    scn = [_mlp_flops(GroupLayout.of(s.name, s.features).in_dim, hidden, d) for s in world.scenarios]
    return events * _mean(seq) + targets * _mean(scn)


def head_flops(cfg: ModelConfig, world: WorldSpec, targets: int) -> float:
    """MMoE FLOPs per T token (experts, gates, expert mixing, towers), averaged over scenarios."""
    h, d = cfg.head, cfg.d_model
    experts = 2 * h.num_experts * d * h.expert_dim
    per_task = 2 * d * h.num_experts + 2 * h.num_experts * h.expert_dim + 2 * h.expert_dim * h.tower_dim + 2 * h.tower_dim
    per_scenario = [experts + per_task * sum(t.type in SCORED for t in s.tasks) for s in world.scenarios]
    return targets * _mean(per_scenario)


# ------------------------------------------------------------------------------------------- summary


def summarize(
    config: str | Path | ModelConfig,
    history: int = 1000,
    realtime: int = 100,
    targets: int = 50,
    world: WorldSpec | str | Path | None = None,
) -> Summary:
    """Parameters and analytic forward FLOPs per sample of ``config`` (a preset name, a YAML path or a
    :class:`ModelConfig`) for ``history`` H, ``realtime`` R and ``targets`` T tokens.

    ``world`` (a WorldSpec or a world YAML path) adds adapters, heads and embedding tables, and sets the
    Group LayerNorm group count; without it only the backbone is counted, with the config's ``num_groups``.
    """
    cfg = config if isinstance(config, ModelConfig) else load_model_config(config)
    if world is not None and not isinstance(world, WorldSpec):
        world = load_world(world)
    backbone = cfg.backbone_for(world) if world is not None else cfg.backbone
    c = backbone.layer
    n = history + realtime + targets
    all_pairs, target_pairs = mixed_mask_pairs(history, realtime, targets)
    hybrid = backbone.target_layers_per_block > 0
    return Summary(
        name=cfg.name,
        source=cfg.source_file,
        world=None if world is None else world.name,
        history=history,
        realtime=realtime,
        targets=targets,
        layer=c,
        full_layers=backbone.num_blocks,
        target_layers=backbone.num_blocks * backbone.target_layers_per_block,
        params_backbone=backbone_params(backbone),
        params_adapters=None if world is None else adapter_params(cfg, world),
        params_heads=None if world is None else head_params(cfg, world),
        params_sparse=None if world is None else sparse_params(cfg, world),
        full_layer=layer_cost(c, n, n, all_pairs),
        target_layer=layer_cost(c, n, targets, target_pairs) if hybrid else LayerCost(0.0, 0.0),
        flops_adapters=None if world is None else adapter_flops(cfg, world, history + realtime, targets),
        flops_heads=None if world is None else head_flops(cfg, world, targets),
    )


def format_summary(s: Summary) -> str:
    """A plain-text table of a :class:`Summary`."""
    c = s.layer
    g = lambda f: "-" if f is None else f"{f / 1e9:.3f}"  # noqa: E731
    p = lambda v: "- (needs a world)" if v is None else f"{v:,}"  # noqa: E731
    lines = [
        f"model {s.name}  ({s.source})" + (f"  world {s.world}" if s.world else "  (no world: backbone only)"),
        f"  {s.full_layers} full + {s.target_layers} target layers; d_model {c.d_model}, heads {c.num_heads} "
        f"(KV {c.num_kv_heads}), d_qk {c.d_qk}, d_v {c.d_v}, Group LayerNorm groups {c.num_groups}",
        f"  tokens per sample: H {s.history} + R {s.realtime} + T {s.targets} = {s.tokens} "
        "(T assumed after every R: an upper bound on T->R pairs)",
        "",
        f"  {'parameters':<28}{'count':>18}",
        f"  {'backbone (dense)':<28}{p(s.params_backbone):>18}",
        f"  {'adapters (dense)':<28}{p(s.params_adapters):>18}",
        f"  {'heads (dense)':<28}{p(s.params_heads):>18}",
        f"  {'embedding tables (sparse)':<28}{p(s.params_sparse):>18}",
        "",
        f"  {'forward GFLOPs / sample':<28}{'projections':>12}{'attention':>12}{'total':>12}",
        f"  {f'full layer x {s.full_layers}':<28}{g(s.full_layers * s.full_layer.projections):>12}"
        f"{g(s.full_layers * s.full_layer.attention):>12}{g(s.full_layers * s.full_layer.total):>12}",
        f"  {f'target layer x {s.target_layers}':<28}{g(s.target_layers * s.target_layer.projections):>12}"
        f"{g(s.target_layers * s.target_layer.attention):>12}{g(s.target_layers * s.target_layer.total):>12}",
        f"  {'backbone':<28}{'':>24}{g(s.flops_backbone):>12}",
        f"  {'adapters':<28}{'':>24}{g(s.flops_adapters):>12}",
        f"  {'heads (MMoE)':<28}{'':>24}{g(s.flops_heads):>12}",
        f"  {'total':<28}{'':>24}{g(s.flops_total):>12}",
        "  (matmuls only: norms, activations, bias adds and lookups are not counted)",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- helpers


def _layouts(world: WorldSpec) -> list[GroupLayout]:
    return [GroupLayout.of(s.name, s.fields) for s in world.sequences] + [GroupLayout.of(s.name, s.features) for s in world.scenarios]


def _next_item_tasks(world: WorldSpec):
    return [(s, t) for s in world.scenarios for t in s.tasks if t.type is TaskType.NEXT_ITEM]


def _retrieval_dims(world: WorldSpec) -> list[int]:
    out = []
    for s, t in _next_item_tasks(world):
        f = s.feature(t.label)
        out.append(int(f.dim or 0) if f.type is FeatureType.CATEGORICAL else 0)
    return out


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else 0.0

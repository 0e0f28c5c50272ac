"""The multi-scenario ranking model: scenario adapters -> shared HSTU backbone -> per-scenario MMoE heads.

::

    batch (recfm.foundation.data.batch.Batch)
      |  TokenEmbedder: one tokenizer per sequence kind (H, R) and per scenario (T)   x: [N, d_model]
      |  Backbone: hybrid target attention, dynamic mixed mask                      y: [N, d_model]
      |  y[T rows of scenario s]                                                    [n_s, d_model]
      v  MMoEHead: shared experts, per (scenario, task) gate and tower              logits[s][task]: [n_s]

The scenarios a model serves are its *registry*: their order fixes each scenario's Group-LayerNorm group
(``K + 1 + s``, see the batch docstring). A batch may hold any subset of them (:meth:`RecModel.groups`
maps its group numbers to the model's).
:meth:`RecModel.add_scenario` registers a new scenario on a trained model: a new T tokenizer, a new head
(gates and towers) and one new Group-LayerNorm row per norm, initialised to the mean of the existing
scenarios' rows; nothing already trained changes.

:meth:`RecModel.fingerprint` names what a checkpoint's weights depend on (the backbone's shape, the shared
sequences, each scenario's spec), so fine-tuning can refuse a checkpoint that does not fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from recfm.errors import ConfigError, RecfmError
from recfm.foundation.data.batch import Batch
from recfm.foundation.model.adapters import TokenEmbedder
from recfm.foundation.model.backbone import Backbone, BackboneConfig
from recfm.foundation.model.config import ModelConfig
from recfm.foundation.model.hstu import GroupLayerNorm
from recfm.foundation.model.mask import MaskMode
from recfm.foundation.model.rows import target_rows_of
from recfm.heads.mmoe import MMoEHead, TaskLoss
from recfm.scenarios.spec import ScenarioSpec, WorldSpec, as_dict, spec_hash


def select_scenarios(world: WorldSpec, names: Sequence[str] | None) -> WorldSpec:
    """``world`` keeping only ``names`` (in registry order); ``None`` or empty keeps every scenario."""
    if not names:
        return world
    unknown = [n for n in names if n not in world.scenario_names]
    if unknown:
        known = ", ".join(world.scenario_names) or "none"
        raise ConfigError([f"{world.source_file}: scenarios: unknown scenario {n!r} (known: {known})" for n in unknown])
    return replace(world, scenarios=tuple(s for s in world.scenarios if s.name in names))


def backbone_fingerprint(config: BackboneConfig) -> str:
    """Hash of the backbone's architecture: what its weights' meaning depends on. Leaves out what may
    change between runs of the same weights: the kernel ``impl``, ``dropout`` and ``num_groups`` (which grows
    when a scenario is registered)."""
    layer = replace(config.layer, impl="reference", dropout=0.0, num_groups=1)
    return spec_hash(as_dict(replace(config, layer=layer)))


class RecModel(nn.Module):
    """Adapters, backbone and heads for the scenarios of ``world`` (module docstring).

    Args:
        world: sequence kinds and the model's scenarios, in registry order (see :func:`select_scenarios`).
        config: the model config (a preset: ``load_model_config("small")``).

    Example::

        model = RecModel(select_scenarios(world, ["home_feed", "coupon"]), load_model_config("tiny"))
        logits = model(batch)                       # {"home_feed": {"ctr": [n], "ctcvr": [n]}, ...}
        loss = weighted_mean(model.losses(batch, logits))
    """

    def __init__(self, world: WorldSpec, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedder = TokenEmbedder(
            world, d_model=config.d_model, hidden=config.adapter.hidden, dropout=config.adapter.dropout,
            init_std=config.adapter.init_std,
        )
        self.backbone = Backbone(config.backbone_for(world))
        h = config.head
        self.head = MMoEHead(world.scenarios, config.d_model, h.num_experts, h.expert_dim, h.tower_dim, h.dropout)

    @property
    def world(self) -> WorldSpec:
        return self.embedder.world

    @property
    def scenario_names(self) -> tuple[str, ...]:
        return self.embedder.scenario_names

    def fingerprint(self) -> dict:
        """What the weights were shaped by: backbone config, shared sequences, each scenario's spec hash."""
        return {
            "backbone": backbone_fingerprint(self.backbone.config),
            "adapter": spec_hash(as_dict(self.config.adapter)),
            "sequences": self.world.sequence_fingerprint(),
            "scenarios": {s.name: spec_hash(s) for s in self.world.scenarios},
        }

    # ----------------------------------------------------------------------------------- registering
    def add_scenario(self, spec: ScenarioSpec) -> None:
        """Register a new scenario: its tokenizer, its head, one new Group-LayerNorm row per norm."""
        self.embedder.add_scenario(spec)  # raises (changing nothing) on a duplicate name or a table clash
        self.head.add_scenario(spec)
        first_scenario_group = len(self.world.sequences) + 1
        for module in self.backbone.modules():
            if isinstance(module, GroupLayerNorm):
                _append_group(module, first_scenario_group)
        layer = self.backbone.config.layer
        self.backbone.config = replace(
            self.backbone.config, layer=replace(layer, num_groups=layer.num_groups + 1)
        )

    # --------------------------------------------------------------------------------------- forward
    def check_batch(self, batch: Batch) -> None:
        """Raise :class:`RecfmError` naming what the model cannot read: a scenario without an adapter, or
        sequence kinds other than the model's."""
        if tuple(batch.sequences) != self.embedder.sequence_names:
            raise RecfmError(
                f"batch was collated for sequences {list(batch.sequences)}, but the model reads "
                f"{list(self.embedder.sequence_names)}"
            )
        unknown = [s for s in batch.scenarios if s not in self.scenario_names]
        if unknown:
            known = ", ".join(self.scenario_names) or "none"
            raise RecfmError(f"batch has scenario(s) {', '.join(map(repr, unknown))} with no adapter (model has: {known})")
        self.embedder.check_batch(batch)

    def groups(self, batch: Batch) -> torch.Tensor:
        """``[N]`` Group-LayerNorm groups in the model's numbering.

        A batch may be collated for any subset of the model's scenarios (fine-tuning reads one scenario):
        its T groups ``K + 1 + s`` count ``s`` in ``batch.scenarios``; they are mapped to the model's
        registry index with a small lookup (no host sync).
        """
        if tuple(batch.scenarios) == self.scenario_names[: len(batch.scenarios)]:
            return batch.group
        k = len(batch.sequences) + 1
        index = {name: i for i, name in enumerate(self.scenario_names)}
        table = list(range(k)) + [k + index[s] for s in batch.scenarios]
        return torch.tensor(table, dtype=batch.group.dtype).to(batch.group.device, non_blocking=True)[batch.group]

    def encode(self, batch: Batch, validate: bool = True) -> torch.Tensor:
        """Final token states ``[N, d_model]`` of the whole batch."""
        if validate:
            self.check_batch(batch)
        x = self.embedder(batch)
        target_index = None
        if batch.targets:
            target_index = torch.cat([g.token_index for g in batch.targets.values()])
        return self.backbone(
            x, batch.offsets, batch.token_type, batch.timestamps, self.groups(batch), batch.max_len,
            mask_mode=MaskMode.MIXED, target_index=target_index,
        )

    def forward(self, batch: Batch) -> dict[str, dict[str, torch.Tensor]]:
        """Scenario -> task -> ``[n_s]`` logits (binary) or predictions (regression) of the batch's exposures."""
        return self.head(target_rows_of(self.encode(batch), batch.targets))

    def losses(self, batch: Batch, logits: dict[str, dict[str, torch.Tensor]]) -> list[TaskLoss]:
        """One :class:`~recfm.heads.mmoe.TaskLoss` per (scenario, task) present in the batch."""
        return self.head.losses(logits, batch.targets)


def _append_group(norm: GroupLayerNorm, first_scenario_group: int) -> None:
    """Give ``norm`` one more group row: the mean of its scenario-group rows (rows from ``first_scenario_group``)."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            old = getattr(norm, name)
            rows = old[first_scenario_group:] if old.shape[0] > first_scenario_group else old
            grown = torch.cat([old, rows.mean(dim=0, keepdim=True)])
            setattr(norm, name, nn.Parameter(grown, requires_grad=old.requires_grad))

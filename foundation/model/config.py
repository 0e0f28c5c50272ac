"""The model's typed configuration and its YAML presets (``configs/presets/<name>.yaml``).

::

    ModelConfig
    ├── backbone:  BackboneConfig     num_blocks x (1 full + target_layers_per_block target layers)
    │   └── layer: HSTUConfig         d_model, heads, KV heads, d_qk, d_v, dropout, bias options, ...
    ├── adapter:   AdapterConfig      tokenizer MLPs (one per sequence kind, one per scenario)
    ├── head:      HeadConfig         per-scenario multi-task head (MMoE): experts, towers
    └── retrieval: RetrievalConfig    next-item head: temperature, negatives, item table sharing

``backbone.layer.num_groups`` (Group LayerNorm groups) is a property of the *world*, not of a preset:
:meth:`ModelConfig.backbone_for` fills it in (``K`` sequence kinds + 1 real-time group + ``S`` scenarios,
the layout of :mod:`recfm.foundation.data.batch`).

Presets after MTGR Table 2 (layers / d_model / heads): ``small`` 3/512/2, ``medium`` 5/768/3, ``large``
15/768/3; ``mtfm`` is MTFM's (3:1)x4 hybrid stack, d_model 768, 3 query heads and 1 KV head; ``tiny`` is
for tests and CPU smoke runs. Per-head widths are ``d_model / num_heads`` (256 in all MTGR/MTFM presets).
"""

from __future__ import annotations

import difflib
import enum
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from recfm.configs import config_path
from recfm.errors import ConfigError
from recfm.foundation.model.backbone import BackboneConfig
from recfm.scenarios import strict
from recfm.scenarios.spec import WorldSpec

PRESETS = ("tiny", "small", "medium", "large", "mtfm")


class HeadKind(str, enum.Enum):
    """The multi-task head over T tokens (looked up in ``recfm.heads.HEADS``)."""

    MMOE = "mmoe"


class Negatives(str, enum.Enum):
    """Where the next-item head's softmax negatives come from (:mod:`recfm.heads.retrieval`)."""

    UNIFORM = "uniform"  # num_negatives ids per row, uniform over the corpus (HSTU's recipe)
    UNIFORM_SHARED = "uniform_shared"  # one set of num_negatives uniform ids shared by every row of the batch
    IN_BATCH = "in_batch"  # the positives of the batch's rows
    FULL = "full"  # every item of the corpus: the full softmax cross-entropy (affordable for corpora of ~1e4-1e5)


def _positive(problems: list[str], section: str, **values) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            problems.append(f"{section}.{name}: must be an int >= 1, got {v!r}")


def _dropout(problems: list[str], section: str, p: float) -> None:
    if not 0.0 <= p < 1.0:
        problems.append(f"{section}.dropout: must be in [0, 1), got {p}")


@dataclass(frozen=True)
class AdapterConfig:
    """Tokenizer MLPs ``in_dim -> hidden -> d_model`` (``hidden = 0``: one Linear)."""

    hidden: int = 0
    dropout: float = 0.0
    init_std: float = 0.02  # normal init of embedding tables

    def __post_init__(self):
        problems: list[str] = []
        if not isinstance(self.hidden, int) or self.hidden < 0:
            problems.append(f"adapter.hidden: must be an int >= 0, got {self.hidden!r}")
        _dropout(problems, "adapter", self.dropout)
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True)
class HeadConfig:
    """Per-scenario heads: ``num_experts`` shared experts of width ``expert_dim``, towers of ``tower_dim``."""

    kind: HeadKind = HeadKind.MMOE
    num_experts: int = 4
    expert_dim: int = 128
    tower_dim: int = 64
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "kind", HeadKind(self.kind))
        problems: list[str] = []
        _positive(problems, "head", num_experts=self.num_experts, expert_dim=self.expert_dim, tower_dim=self.tower_dim)
        _dropout(problems, "head", self.dropout)
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True)
class RetrievalConfig:
    """Next-item head (used by scenarios with a ``next_item`` task)."""

    temperature: float = 0.05
    num_negatives: int = 128
    negatives: Negatives = Negatives.UNIFORM
    share_item_table: bool = True  # score against the input item table; False: a separate output table

    def __post_init__(self):
        object.__setattr__(self, "negatives", Negatives(self.negatives))
        problems: list[str] = []
        if not self.temperature > 0:
            problems.append(f"retrieval.temperature: must be > 0, got {self.temperature}")
        _positive(problems, "retrieval", num_negatives=self.num_negatives)
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True)
class ModelConfig:
    """Everything that shapes a model, apart from the world it is built for (module docstring)."""

    name: str
    backbone: BackboneConfig
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    source_file: str = "<memory>"

    @property
    def d_model(self) -> int:
        return self.backbone.layer.d_model

    def backbone_for(self, world: WorldSpec) -> BackboneConfig:
        """The backbone config with one Group LayerNorm group per H kind, one for R, one per scenario."""
        groups = len(world.sequences) + 1 + len(world.scenarios)
        return replace(self.backbone, layer=replace(self.backbone.layer, num_groups=groups))


_SECTIONS = {"backbone": BackboneConfig, "adapter": AdapterConfig, "head": HeadConfig, "retrieval": RetrievalConfig}
_RENAMED = (("hstu.", "backbone.layer."),)  # HSTUConfig names its own keys hstu.*; in a preset they sit here


def resolve(config: str | Path) -> Path:
    """A preset name (``medium``) or a YAML path -> the YAML path."""
    text = str(config)
    if text in PRESETS and not Path(text).exists():
        return config_path("presets", f"{text}.yaml")
    return Path(config)


def load_model_config(config: str | Path) -> ModelConfig:
    """Strictly load a model YAML (a preset name or a path); every problem is reported in one ConfigError."""
    path = resolve(config)
    file = str(path)
    data, problems = strict.load_yaml(path)
    if data is None:
        raise ConfigError(problems)
    return parse_model_config(data, file, problems)


def parse_model_config(data, file: str, problems: list[str] | None = None) -> ModelConfig:
    """A :class:`ModelConfig` from its plain form (a YAML mapping, or ``as_dict`` of one, as checkpoints
    store it); ``file`` names where the data came from in error messages."""
    problems = [] if problems is None else problems
    if not isinstance(data, dict):
        raise ConfigError([*problems, f"{file}: expected a mapping, got {strict.show(data)}"])
    data = {k: v for k, v in data.items() if k != "source_file"}
    if isinstance(data.get("backbone"), dict) and isinstance(data["backbone"].get("layer"), dict):
        layer = {k: v for k, v in data["backbone"]["layer"].items() if k != "num_groups"}  # set by the world
        data["backbone"] = {**data["backbone"], "layer": layer}
    known = [f.name for f in fields(ModelConfig) if f.name != "source_file"]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
            strict.problem(problems, file, str(key), f"unknown key ({hint})")
    given = {key: _section(cls, data[key], file, key, problems) for key, cls in _SECTIONS.items() if key in data}
    if "backbone" not in data:
        strict.problem(problems, file, "backbone", "missing required key")
        given["backbone"] = None
    rest = {k: v for k, v in data.items() if k in known and k not in _SECTIONS}
    config = strict.parse(ModelConfig, rest, file=file, path="", problems=problems, given={**given, "source_file": file})
    if problems:
        raise ConfigError(problems)
    return config


def _section(cls: type, raw, file: str, key: str, problems: list[str]):
    """One top-level section; checks raised by the section's own ``__post_init__`` become problems too."""
    try:
        return strict.parse(cls, raw, file=file, path=key, problems=problems)
    except ConfigError as e:
        for p in e.problems:
            for old, new in _RENAMED:
                p = new + p[len(old):] if p.startswith(old) else p
            problems.append(f"{file}: {p}")
        return None

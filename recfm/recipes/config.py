"""Run configs: what a ``pretrain`` / ``finetune`` / ``evaluate`` run reads.

A run YAML (``configs/run/default.yaml`` is the main job)::

    name: default
    out: runs/default                # checkpoints, TensorBoard scalars, metrics JSON
    data:
      world: null                    # world YAML; null = the embedded world
      scenarios: [home_feed, group_buy, coupon]   # trained scenarios, in registry order ([] = all)
      samples: null                  # built sample folder; null = synthesize and build into <out>/data
      synth: {size: default, seed: 0}
      eval_windows: 2                # the last windows are held out for evaluation
    model: small                     # a preset name (configs/presets) or a preset YAML path
    train: {steps: 800, batch_size: 64, lr: 2.0e-3, ...}

Command-line overrides are ``key.path=value`` pairs (values parsed as YAML), applied before validation, so
a typo in an override is reported like a typo in the file.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from recfm.errors import ConfigError
from recfm.scenarios import strict
from recfm.scenarios.spec import as_dict, resolve_path


class Schedule(str, enum.Enum):
    COSINE = "cosine"
    LINEAR = "linear"
    CONSTANT = "constant"


class Layout(str, enum.Enum):
    USER = "user"  # one sample per user and window (the default)
    EXPOSURE = "exposure"  # one sample per exposure (the classic layout, for comparison)


@dataclass(frozen=True)
class SynthConfig:
    size: str = "default"
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    world: str | None = None
    scenarios: tuple[str, ...] = ()
    samples: str | None = None
    events: str | None = None  # raw logs to build from (instead of synthesizing)
    exposures: str | None = None
    synth: SynthConfig = field(default_factory=SynthConfig)
    layout: Layout = Layout.USER
    eval_windows: int = 2
    train_fraction: float = 1.0  # share of training samples kept (by a hash of the user id)
    memory_mb: int = 1024


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 800
    batch_size: int = 64  # samples per batch (ignored when max_tokens is set)
    max_tokens: int | None = None  # token-budget batching: ~equal tokens per batch
    lr: float = 2e-3  # dense AdamW
    sparse_lr: float = 0.05  # row-wise Adagrad on embedding tables
    sparse_eps: float = 1e-10  # row-wise Adagrad's epsilon
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 50
    schedule: Schedule = Schedule.COSINE
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    eval_every: int = 0  # 0 = only at the end
    ckpt_every: int = 200
    eval_batches: int | None = None  # cap on evaluation batches (None = all)
    bf16: bool = True  # autocast to bf16 on CUDA (ignored on CPU)
    device: str = "auto"
    prefetch: bool = True
    threads: int | None = None  # CPU intra-op threads; None = cores - 1 (one core left for batch collation)
    shard_embeddings: bool = False  # torchrun: shard tables with torchrec (docs/distributed.md)


@dataclass(frozen=True)
class FinetuneConfig:
    scenario: str | None = None  # the scenario to fine-tune (may be new: listed in data.world)
    scenario_file: str | None = None  # a NEW scenario's YAML, registered on top of the checkpoint's world
    freeze_backbone: bool = True
    backbone_lr_scale: float = 0.1  # used when freeze_backbone is false
    freeze_embeddings: bool = False  # shared tables stay trainable unless set


@dataclass(frozen=True)
class RunConfig:
    name: str = "default"
    out: str = "runs/default"
    model: str = "small"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    source_file: str = "<memory>"

    def to_dict(self) -> dict:
        return as_dict(self)

    def resolve(self, path: str | None) -> str | None:
        """A path written in this config, relative to the config file (``None`` stays ``None``)."""
        if path is None or self.source_file == "<memory>":
            return path
        return str(resolve_path(self.source_file, path))


def apply_overrides(data: dict, overrides: list[str], problems: list[str]) -> dict:
    """Set ``a.b.c=value`` pairs into the nested dict ``data`` (values parsed as YAML)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"<command line>: {item}: overrides look like key.path=value")
            continue
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"<command line>: {key}: {part} is not a section")
                break
            node = child
        else:
            try:
                node[leaf] = yaml.safe_load(value)
            except yaml.YAMLError as e:
                problems.append(f"<command line>: {key}: value {value!r} is not YAML ({e})")
    return data


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run YAML (None = the shipped main job) with overrides; every problem in one ConfigError."""
    from recfm.configs import config_path

    path = Path(path) if path is not None else config_path("run", "default.yaml")
    data, problems = strict.load_yaml(path)
    if not isinstance(data, dict):
        data = {}
    apply_overrides(data, list(overrides or ()), problems)
    cfg = strict.parse(RunConfig, data, file=str(path), path="", problems=problems)
    if cfg is not None:
        problems += _check(cfg, str(path))
    if problems or cfg is None:
        raise ConfigError(problems)
    return replace(cfg, source_file=str(path))


def _check(cfg: RunConfig, file: str) -> list[str]:
    p = []
    t, d = cfg.train, cfg.data
    for key, value in [("train.steps", t.steps), ("train.batch_size", t.batch_size), ("data.memory_mb", d.memory_mb)]:
        if value <= 0:
            p.append(f"{file}: {key}: must be > 0 (got {value})")
    if t.threads is not None and t.threads < 1:
        p.append(f"{file}: train.threads: must be >= 1 (got {t.threads})")
    if t.max_tokens is not None and t.max_tokens <= 0:
        p.append(f"{file}: train.max_tokens: must be > 0 (got {t.max_tokens})")
    if t.lr <= 0:
        p.append(f"{file}: train.lr: must be > 0 (got {t.lr})")
    if d.eval_windows < 1:
        p.append(f"{file}: data.eval_windows: must be >= 1 (got {d.eval_windows})")
    if not 0 < d.train_fraction <= 1:
        p.append(f"{file}: data.train_fraction: must be in (0, 1] (got {d.train_fraction})")
    if (d.events is None) != (d.exposures is None):
        p.append(f"{file}: data.events: events and exposures are given together")
    return p

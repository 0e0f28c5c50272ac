"""The next-item recipe's config: one YAML per (dataset, model), loaded strictly, with ``key=value`` overrides.

::

    name: ml-1m-hstu
    model: hstu                       # hstu | sasrec
    data:
      dataset: ml-1m                  # ml-1m | ml-100k | amazon-beauty | sequences (a `user item item ...` text file)
      root: ../shared/data            # relative to the current working directory (or absolute)
      path: ml-1m                     # folder (or file, for `sequences`) under root, or absolute
      max_len: 200                    # the most recent items kept per input sequence
      num_items: 3952                 # ids are 1..num_items (null: the largest id in the data)
      max_users: null                 # keep the first N users (smoke runs)
      train_windows: last             # last | all: training samples per user (nextitem_data)
    embedding: {dropout: 0.2, item_attributes: false}
    backbone: {num_blocks: 2, layer: {d_model: 50, ...}}      # model: hstu  (a BackboneConfig)
    sasrec:   {d_model: 50, num_blocks: 2, ...}               # model: sasrec (a SASRecConfig)
    retrieval: {temperature: 0.05, num_negatives: 128, negatives: uniform}
    train: {protocol: standard, batch_size: 128, lr: 1.0e-3, schedule: constant, max_epochs: 100, patience: 10, ...}
    seeds: [0, 1, 2]
    out: runs/nextitem/ml-1m-hstu

Overrides are ``a.b.c=value`` (value parsed as YAML), applied before validation, so a typo in an override is
reported like a typo in the file: ``<file>: train.lr_x: unknown key``.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from recfm.errors import ConfigError
from recfm.foundation.model.backbone import BackboneConfig
from recfm.foundation.model.config import RetrievalConfig
from recfm.foundation.model.sasrec import SASRecConfig
from recfm.recipes.config import apply_overrides
from recfm.scenarios import strict


class Dataset(str, enum.Enum):
    ML_1M = "ml-1m"
    ML_100K = "ml-100k"  # GroupLens' ratings with real Unix timestamps (the HSTU time bias can use them)
    AMAZON_BEAUTY = "amazon-beauty"
    SEQUENCES = "sequences"  # a text file, one user per line: `user item item ...`, oldest first


class Protocol(str, enum.Enum):
    """How a user's sequence is split and how training ends (:mod:`.nextitem_data`, :mod:`.nextitem`)."""

    STANDARD = "standard"  # leave-one-out: last item test, one before valid; early stopping on valid NDCG@10
    PUBLISHED = "published"  # the HSTU repository's: train on all but the last item, max_epochs, final weights


class Windows(str, enum.Enum):
    """Which part of a user's training prefix becomes training samples (:mod:`.nextitem_data`)."""

    LAST = "last"  # one sample: the most recent max_len + 1 items (the published recipes)
    ALL = "all"  # the whole prefix, cut from the end into windows of max_len + 1 items: every target once


class Schedule(str, enum.Enum):
    """Learning rate after the linear warmup (:mod:`.nextitem`)."""

    CONSTANT = "constant"
    COSINE = "cosine"  # half a cosine from lr to 0 at the end of max_epochs


@dataclass(frozen=True)
class DataSection:
    dataset: Dataset = Dataset.ML_1M
    root: str = "../shared/data"
    path: str = "ml-1m"
    max_len: int = 200
    num_items: int | None = None
    max_users: int | None = None
    train_windows: Windows = Windows.LAST


@dataclass(frozen=True)
class EmbeddingSection:
    dropout: float = 0.2  # on the input item embeddings (HSTU; SASRec uses sasrec.dropout)
    positions: int = 0  # HSTU: rows of a learned absolute position table added to the input (0: none; the
    #                     HSTU repository adds one, std 1/sqrt(d), on top of its relative bias); >= data.max_len
    item_attributes: bool = False  # add the mean of each item's side-file attributes (nextitem_features)


@dataclass(frozen=True)
class TrainSection:
    protocol: Protocol = Protocol.STANDARD  # published: no validation split, no early stopping (patience ignored)
    batch_size: int = 128  # users per step
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.98)
    warmup_steps: int = 100  # linear warmup, then `schedule`
    schedule: Schedule = Schedule.CONSTANT
    grad_clip: float = 1.0  # max global grad norm (0: off)
    max_epochs: int = 100
    steps_per_epoch: int | None = None  # cap (smoke runs); null = one pass over the training users
    patience: int = 10  # epochs without a better validation NDCG@10 before stopping (protocol: standard)
    max_minutes: float | None = None  # wall-clock budget per seed for training (evaluation of test excluded)
    eval_batch_size: int = 512  # users per evaluation step
    eval_chunk: int = 65536  # items scored at a time in full-corpus ranking
    exclude_history: bool = False  # rank without the user's input items (the published HSTU/S3Rec protocol)
    bf16: bool = True  # autocast on CUDA (ignored on CPU)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    checkpoint: bool = True  # write the best weights with recfm.recipes.checkpoint (when `out` is set)
    progress: bool = True  # tqdm bars


@dataclass(frozen=True)
class NextItemConfig:
    name: str
    model: Literal["hstu", "sasrec"]
    data: DataSection = field(default_factory=DataSection)
    embedding: EmbeddingSection = field(default_factory=EmbeddingSection)
    backbone: BackboneConfig | None = None
    sasrec: SASRecConfig | None = None
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    train: TrainSection = field(default_factory=TrainSection)
    seeds: tuple[int, ...] = (0, 1, 2)
    out: str | None = None
    source_file: str = "<memory>"

    @property
    def d_model(self) -> int:
        return self.backbone.layer.d_model if self.model == "hstu" else self.sasrec.d_model

    def to_dict(self) -> dict:
        def plain(v):
            if dataclasses.is_dataclass(v):
                return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
            if isinstance(v, enum.Enum):
                return v.value
            if isinstance(v, (tuple, list)):
                return [plain(x) for x in v]
            return v

        return plain(self)


_SECTIONS = {"data": DataSection, "embedding": EmbeddingSection, "backbone": BackboneConfig, "sasrec": SASRecConfig,
             "retrieval": RetrievalConfig, "train": TrainSection}


def load_nextitem_config(path: str | Path, overrides=()) -> NextItemConfig:
    """Strictly load a next-item YAML with overrides; every problem (file and key named) in one ConfigError."""
    file = str(path)
    data, problems = strict.load_yaml(path)
    if data is None:
        raise ConfigError(problems)
    if not isinstance(data, dict):
        raise ConfigError([f"{file}: expected a mapping, got {strict.show(data)}"])
    apply_overrides(data, [str(o) for o in overrides], problems)
    given = {"source_file": file}
    for key, cls in _SECTIONS.items():
        if key in data:
            given[key] = _section(cls, data[key], file, key, problems)
    rest = {k: v for k, v in data.items() if k not in _SECTIONS}
    cfg = strict.parse(NextItemConfig, rest, file=file, path="", problems=problems, given=given)
    if cfg is not None and not problems:
        problems += _check(cfg, file)
    if problems or cfg is None:
        raise ConfigError(problems)
    return cfg


def _section(cls: type, raw, file: str, key: str, problems: list[str]):
    """One section; checks raised by a dataclass's own ``__post_init__`` become problems naming the file."""
    try:
        return strict.parse(cls, raw, file=file, path=key, problems=problems)
    except ConfigError as e:
        for p in e.problems:  # messages start with the dataclass's own prefix: hstu.*, sasrec.*, backbone.*
            if p.startswith("hstu."):
                p = "backbone.layer." + p[len("hstu."):]
            elif not p.startswith(f"{key}."):
                p = f"{key}: {p}"
            problems.append(f"{file}: {p}")
        return None


def _check(cfg: NextItemConfig, file: str) -> list[str]:
    p: list[str] = []
    if cfg.model == "hstu" and cfg.backbone is None:
        p.append(f"{file}: backbone: missing (model: hstu needs a backbone section)")
    if cfg.model == "sasrec" and cfg.sasrec is None:
        p.append(f"{file}: sasrec: missing (model: sasrec needs a sasrec section)")
    if cfg.model == "sasrec" and cfg.sasrec is not None and cfg.sasrec.max_len < cfg.data.max_len:
        p.append(f"{file}: sasrec.max_len: must be >= data.max_len={cfg.data.max_len}, got {cfg.sasrec.max_len}")
    if cfg.model == "hstu" and cfg.backbone is not None and cfg.backbone.target_layers_per_block:
        p.append(f"{file}: backbone.target_layers_per_block: must be 0 for next-item (all layers full)")
    d, t = cfg.data, cfg.train
    for key, v in [("data.max_len", d.max_len), ("train.batch_size", t.batch_size), ("train.max_epochs", t.max_epochs),
                   ("train.eval_batch_size", t.eval_batch_size), ("train.eval_chunk", t.eval_chunk),
                   ("train.patience", t.patience)]:
        if v < 1:
            p.append(f"{file}: {key}: must be >= 1, got {v}")
    for key, v in [("data.num_items", d.num_items), ("data.max_users", d.max_users),
                   ("train.steps_per_epoch", t.steps_per_epoch)]:
        if v is not None and v < 1:
            p.append(f"{file}: {key}: must be >= 1 or null, got {v}")
    if t.lr <= 0:
        p.append(f"{file}: train.lr: must be > 0, got {t.lr}")
    if t.max_minutes is not None and t.max_minutes <= 0:
        p.append(f"{file}: train.max_minutes: must be > 0 or null, got {t.max_minutes}")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        p.append(f"{file}: train.betas: must be two numbers in [0, 1), got {list(t.betas)}")
    if t.warmup_steps < 0 or t.grad_clip < 0 or t.weight_decay < 0:
        p.append(f"{file}: train: warmup_steps, grad_clip and weight_decay must be >= 0")
    if cfg.embedding.positions and cfg.embedding.positions < cfg.data.max_len:
        p.append(f"{file}: embedding.positions: must be 0 or >= data.max_len={cfg.data.max_len}, got {cfg.embedding.positions}")
    if not 0.0 <= cfg.embedding.dropout < 1.0:
        p.append(f"{file}: embedding.dropout: must be in [0, 1), got {cfg.embedding.dropout}")
    if not cfg.seeds:
        p.append(f"{file}: seeds: must list at least one seed")
    return p

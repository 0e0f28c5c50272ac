"""Typed scenario and world specifications.

These frozen dataclasses are what the rest of recfm sees; YAML only exists at the edge
(:mod:`recfm.scenarios.loader` turns files into these objects and reports every mistake at once).

Vocabulary of a world::

    WorldSpec                       one file: what every scenario shares
    ├── sequences: SequenceSpec*    H/R event kinds (clicks, orders, ...): fields, max length, kept end
    ├── realtime:  RealtimeSpec     the R window: max length, kept end
    ├── window_seconds              length of one sample window (e.g. a day)
    └── scenarios: ScenarioSpec*    one file each: a business line
        ├── features: FeatureSpec*  exposure (T token) features with their source and embedding table
        ├── labels:   LabelSpec*
        └── tasks:    TaskSpec*     binary / regression / next-item, each on a label, with a loss weight

Raw-log column convention: a feature (or sequence field) reads the column named ``column`` (defaults to
its ``name``). Exposure logs carry ``user_id``, ``timestamp``, ``scenario`` and, per scenario, its feature
and label columns; event logs carry ``user_id``, ``timestamp``, ``action`` and the sequence fields.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path


class FeatureType(str, enum.Enum):
    CATEGORICAL = "categorical"  # an id, embedded through a table
    NUMERIC = "numeric"  # a scalar, normalised or bucketised
    TIMESTAMP = "timestamp"  # unix seconds; enters as time features / time bias
    DENSE = "dense"  # a fixed-length float vector (e.g. a pretrained embedding)


class Source(str, enum.Enum):
    USER = "user"
    ITEM = "item"
    CONTEXT = "context"
    CROSS = "cross"


class VocabKind(str, enum.Enum):
    HASHED = "hashed"  # any int/str id, hashed into ``size`` buckets
    FILE = "file"  # ids listed one per line in ``path``; unknown ids map to index 0 (OOV)
    IDENTITY = "identity"  # the id is already an index in [0, size); out of range is an error


class NumericTransform(str, enum.Enum):
    NONE = "none"
    LOG = "log"  # sign(x) * log1p(|x|)
    STANDARD = "standard"  # (x - mean) / std with mean/std given in the spec
    BUCKETIZE = "bucketize"  # index into ``boundaries``; embedded through a table of len+1 rows


class LabelType(str, enum.Enum):
    BINARY = "binary"
    REGRESSION = "regression"


class TaskType(str, enum.Enum):
    BINARY = "binary"  # BCE on a binary label
    REGRESSION = "regression"  # MSE on a regression label
    NEXT_ITEM = "next_item"  # sampled softmax over an item table; label names the item feature


class Keep(str, enum.Enum):
    """Which end of an over-long sequence is kept."""

    FIRST = "first"
    LAST = "last"


class TokenType(enum.IntEnum):
    """Token types of a sample, in the order they appear in it (brief section 2)."""

    H = 0  # history: events before the window
    R = 1  # real-time: events inside the window
    T = 2  # target: one per exposure in the window


@dataclass(frozen=True)
class Vocab:
    kind: VocabKind
    size: int
    path: str | None = None  # VocabKind.FILE only; resolved relative to the YAML file


@dataclass(frozen=True)
class FeatureSpec:
    """One feature of an exposure, or one field of a behaviour event.

    Categorical features (and bucketised numerics) are embedded through ``table``; every feature that
    names the same table shares its rows, so their ``dim`` (and vocabulary size) must agree.
    """

    name: str
    type: FeatureType
    source: Source = Source.ITEM
    column: str | None = None  # raw-log column; defaults to ``name``
    vocab: Vocab | None = None  # categorical only
    table: str | None = None  # embedding table name; defaults to ``name``
    dim: int | None = None  # embedding dim (categorical / bucketised numeric)
    transform: NumericTransform = NumericTransform.NONE  # numeric only
    mean: float = 0.0  # numeric STANDARD
    std: float = 1.0  # numeric STANDARD
    boundaries: tuple[float, ...] = ()  # numeric BUCKETIZE
    length: int | None = None  # dense vector length

    @property
    def raw_column(self) -> str:
        return self.column or self.name

    @property
    def table_name(self) -> str:
        return self.table or self.name

    @property
    def is_embedded(self) -> bool:
        """True when the feature goes through an embedding table."""
        return self.type is FeatureType.CATEGORICAL or (
            self.type is FeatureType.NUMERIC and self.transform is NumericTransform.BUCKETIZE
        )

    @property
    def num_embeddings(self) -> int:
        if self.type is FeatureType.CATEGORICAL:
            assert self.vocab is not None
            return self.vocab.size
        return len(self.boundaries) + 1


@dataclass(frozen=True)
class LabelSpec:
    name: str
    type: LabelType = LabelType.BINARY
    column: str | None = None

    @property
    def raw_column(self) -> str:
        return self.column or self.name


@dataclass(frozen=True)
class TaskSpec:
    name: str
    type: TaskType
    label: str  # a LabelSpec name (binary/regression) or an item feature name (next_item)
    weight: float = 1.0


@dataclass(frozen=True)
class ScenarioSpec:
    """A business line: its exposure features, labels and tasks."""

    name: str
    features: tuple[FeatureSpec, ...]
    labels: tuple[LabelSpec, ...] = ()
    tasks: tuple[TaskSpec, ...] = ()
    description: str = ""
    source_file: str = "<memory>"  # where it was loaded from (for error messages)

    def feature(self, name: str) -> FeatureSpec:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"{self.source_file}: scenario {self.name!r} has no feature {name!r}")

    def fingerprint(self) -> str:
        """A stable hash of the spec (not of the file it came from): saved beside checkpoints."""
        return spec_hash(self)


@dataclass(frozen=True)
class SequenceSpec:
    """One kind of behaviour sequence (H tokens; the same kinds make the R tokens).

    Events whose ``action`` is in ``actions`` belong to this sequence. Each kind has its own
    tokenizer MLP over the embeddings of its ``fields``.
    """

    name: str
    actions: tuple[str, ...]
    fields: tuple[FeatureSpec, ...]
    max_length: int = 256
    keep: Keep = Keep.LAST


@dataclass(frozen=True)
class RealtimeSpec:
    max_length: int = 64
    keep: Keep = Keep.LAST


@dataclass(frozen=True)
class WorldSpec:
    """Everything the scenarios share, and the scenarios themselves, in registry order."""

    name: str
    sequences: tuple[SequenceSpec, ...]
    scenarios: tuple[ScenarioSpec, ...]
    realtime: RealtimeSpec = field(default_factory=RealtimeSpec)
    window_seconds: int = 86400
    source_file: str = "<memory>"

    @property
    def scenario_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.scenarios)

    def scenario(self, name: str) -> ScenarioSpec:
        for s in self.scenarios:
            if s.name == name:
                return s
        known = ", ".join(self.scenario_names) or "none"
        raise KeyError(f"{self.source_file}: unknown scenario {name!r} (known: {known})")

    def event_fields(self) -> tuple[FeatureSpec, ...]:
        """The union of all sequences' fields, first occurrence wins (same name = same column)."""
        seen: dict[str, FeatureSpec] = {}
        for seq in self.sequences:
            for f in seq.fields:
                seen.setdefault(f.name, f)
        return tuple(seen.values())

    def sequence_fingerprint(self) -> str:
        """Hash of what the backbone's H/R tokenizers depend on."""
        return spec_hash((self.sequences, self.realtime, self.window_seconds))


def _vocab_identity(vocab: Vocab) -> dict:
    """A file vocabulary is identified by its contents, not by the (working-directory relative) path."""
    plain = {"kind": vocab.kind.value, "size": vocab.size}
    if vocab.path is not None:
        p = Path(vocab.path)
        plain["file"] = hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else p.name
    return plain


def _plain(obj, for_hash: bool = False):
    if for_hash and isinstance(obj, Vocab):
        return _vocab_identity(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {k: _plain(v, for_hash) for k, v in obj.items() if k != "source_file"}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, for_hash) for v in obj]
    if hasattr(obj, "__dataclass_fields__"):
        return {f: _plain(getattr(obj, f), for_hash) for f in obj.__dataclass_fields__ if f != "source_file"}
    return obj


def spec_hash(obj) -> str:
    """sha256 (first 16 hex digits) of a spec's canonical JSON form; ignores where it was loaded from."""
    text = json.dumps(_plain(obj, for_hash=True), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def as_dict(obj) -> dict:
    """Plain-Python form of a spec (enums as strings), e.g. for ``recfm scenarios show``."""
    return _plain(obj)


def resolve_path(base_file: str, path: str) -> Path:
    """A path from a YAML file, relative to that file's folder unless absolute."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(base_file).parent / p

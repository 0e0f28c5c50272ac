"""Parameters of the synthetic world generator (``configs/world/synth.yaml``), as frozen dataclasses.

The scenario YAMLs describe what data looks like; this file's dataclasses describe how the ground truth
behind it is drawn (traffic, base rates, signal strengths, sizes). :func:`load_synth_config` parses the
YAML strictly and :func:`check_against_world` checks it against a world, collecting every problem.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from recfm.errors import ConfigError
from recfm.foundation.data.schema import arrow_type
from recfm.scenarios import strict
from recfm.scenarios.spec import FeatureSpec, FeatureType, LabelType, Source, VocabKind, WorldSpec

DEFAULT_CARDINALITY = 1000  # distinct values drawn for a categorical feature without `cardinality`


class Dist(str, enum.Enum):
    """A numeric feature's value distribution; ``params`` are given per kind."""

    LOGNORMAL = "lognormal"  # params [mu, sigma] of log(x)
    NORMAL = "normal"  # params [mean, std]
    UNIFORM = "uniform"  # params [low, high]


class TimeOf(str, enum.Enum):
    """A context categorical derived from the exposure's timestamp (UTC)."""

    HOUR_OF_DAY = "hour_of_day"  # 0..23
    DAY_OF_WEEK = "day_of_week"  # 0 = Monday .. 6


class CrossKind(str, enum.Enum):
    HISTORY_COUNT = "history_count"  # the user's events with `actions` on the item's key before the day


class CrossKey(str, enum.Enum):
    CATEGORY = "category"
    ITEM = "item"


@dataclass(frozen=True)
class FeatureGen:
    """How one raw column is drawn (every field optional; defaults come from the feature's spec)."""

    dist: Dist | None = None
    params: tuple[float, ...] = ()
    time: TimeOf | None = None
    cardinality: int | None = None
    zipf: float = 1.0  # categorical values: p(rank r) ~ 1 / (r + 1) ** zipf
    effect_std: float | None = None  # std of the random effect on each label's logit (None: global)
    slope: float | None = None  # numeric: fixed slope on the standardised value instead of a random one
    cross: CrossKind | None = None
    key: CrossKey = CrossKey.CATEGORY
    actions: tuple[str, ...] = ()


@dataclass(frozen=True)
class LabelGen:
    """One label's stage of the truth (see synth.yaml's header for the formula)."""

    bias: float
    affinity: float = 1.0
    features: float = 1.0
    recency: float = 0.0
    delay: tuple[int, ...] = (1, 5)  # [low, high] seconds from exposure to the label's event


@dataclass(frozen=True)
class ScenarioGen:
    traffic: float  # exposures per participating user-day at activity 1
    labels: dict[str, LabelGen]
    participation: float = 1.0  # share of users active in the scenario
    items: float = 1.0  # item pool size relative to the size's ``items``
    conversion: float = 0.1  # share of organic clicks followed by a conversion (second label) event


@dataclass(frozen=True)
class LatentGen:
    categories: int = 24
    dim: int = 16
    favourites: int = 3
    strength: float = 1.5
    noise: float = 0.5
    item_noise: float = 0.5
    sharpness: float = 1.5
    targeting: float = 0.5
    category_zipf: float = 0.7
    item_zipf: float = 1.0


@dataclass(frozen=True)
class BehaviourGen:
    per_day: float = 2.0
    activity_sigma: float = 0.8
    session_size: float = 5.0
    session_gap: tuple[int, ...] = (8, 40)
    recency_seconds: int = 3600
    conversion_delay: tuple[int, ...] = (300, 3600)


@dataclass(frozen=True)
class Roles:
    item: str = "item_id"
    category: str = "category"
    scenario: str = "scenario_id"


@dataclass(frozen=True)
class SizeGen:
    users: int
    items: int
    history_days: int
    window_days: int
    block_users: int = 256  # users per random block: the unit of seeding (output never depends on chunks)
    chunk_blocks: int = 4  # blocks per written part file
    workers: int = 1  # processes writing part files (0: one per CPU core); the output is the same

    @property
    def chunk_users(self) -> int:
        return self.block_users * self.chunk_blocks


@dataclass(frozen=True)
class SynthConfig:
    start: int
    scenarios: dict[str, ScenarioGen]
    sizes: dict[str, SizeGen]
    hour_profile: tuple[float, ...]
    roles: Roles = Roles()
    latent: LatentGen = LatentGen()
    behaviour: BehaviourGen = BehaviourGen()
    effect_std: float = 0.25
    features: dict[str, FeatureGen] | None = None
    source_file: str = "<memory>"

    def feature(self, column: str) -> FeatureGen:
        return (self.features or {}).get(column, FeatureGen())

    def size(self, name: str) -> SizeGen:
        if name not in self.sizes:
            raise ConfigError([f"{self.source_file}: sizes: no size {name!r} (known: {', '.join(self.sizes)})"])
        return self.sizes[name]


def load_synth_config(path: str | Path | None = None) -> SynthConfig:
    """Parse a synth YAML strictly (None: the shipped ``configs/world/synth.yaml``)."""
    if path is None:
        from recfm.configs import config_path

        path = config_path("world", "synth.yaml")
    file = str(path)
    data, problems = strict.load_yaml(path)
    cfg = None
    if data is not None:
        cfg = strict.parse(SynthConfig, data, file=file, path="", problems=problems, given={"source_file": file})
    if cfg is not None:
        _check_self(cfg, problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def _check_self(cfg: SynthConfig, problems: list[str]) -> None:
    f = cfg.source_file

    def bad(path: str, msg: str) -> None:
        strict.problem(problems, f, path, msg)

    if len(cfg.hour_profile) != 24 or min(cfg.hour_profile) < 0 or sum(cfg.hour_profile) <= 0:
        bad("hour_profile", "must be 24 non-negative weights with a positive sum")
    for name, size in cfg.sizes.items():
        for key in ("users", "items", "window_days", "block_users", "chunk_blocks"):
            if getattr(size, key) <= 0:
                bad(f"sizes.{name}.{key}", "must be > 0")
        for key in ("history_days", "workers"):
            if getattr(size, key) < 0:
                bad(f"sizes.{name}.{key}", "must be >= 0")
    for name, sc in cfg.scenarios.items():
        if sc.traffic < 0 or not 0 <= sc.participation <= 1 or not 0 <= sc.conversion <= 1 or sc.items <= 0:
            bad(f"scenarios.{name}", "traffic >= 0, items > 0, participation and conversion in [0, 1]")
        for label, lg in sc.labels.items():
            _check_range(lg.delay, f"scenarios.{name}.labels.{label}.delay", bad)
    b = cfg.behaviour
    _check_range(b.session_gap, "behaviour.session_gap", bad)
    _check_range(b.conversion_delay, "behaviour.conversion_delay", bad)
    if b.session_size < 1:
        bad("behaviour.session_size", "must be >= 1")
    lat = cfg.latent
    if lat.categories <= 0 or lat.dim <= 0 or not 0 < lat.favourites <= lat.categories:
        bad("latent", "categories and dim must be > 0 and favourites in [1, categories]")
    for col, fg in (cfg.features or {}).items():
        need = {None: 0, Dist.LOGNORMAL: 2, Dist.NORMAL: 2, Dist.UNIFORM: 2}[fg.dist]
        if len(fg.params) != need:
            bad(f"features.{col}.params", f"needs {need} numbers for dist {fg.dist and fg.dist.value}")
        if fg.cardinality is not None and fg.cardinality <= 0:
            bad(f"features.{col}.cardinality", "must be > 0")


def _check_range(pair: tuple, path: str, bad) -> None:
    if len(pair) != 2 or pair[0] < 0 or pair[1] < pair[0]:
        bad(path, "must be [low, high] with 0 <= low <= high")


def world_columns(world: WorldSpec) -> dict[str, FeatureSpec]:
    """Every raw column of the world's exposures and events -> the first spec naming it."""
    cols: dict[str, FeatureSpec] = {}
    for sc in world.scenarios:
        for feat in sc.features:
            cols.setdefault(feat.raw_column, feat)
    for feat in world.event_fields():
        cols.setdefault(feat.raw_column, feat)
    return cols


def check_against_world(cfg: SynthConfig, world: WorldSpec) -> None:
    """Raise one ConfigError listing everything the generator cannot honour in ``world``."""
    problems: list[str] = []
    f = cfg.source_file

    def bad(path: str, msg: str) -> None:
        strict.problem(problems, f, path, msg)

    cols = world_columns(world)
    seen: dict[str, tuple[FeatureSpec, str]] = {}
    all_specs = [(feat, sc.source_file, sc.name) for sc in world.scenarios for feat in sc.features]
    all_specs += [(feat, world.source_file, "events") for feat in world.event_fields()]
    for feat, file, owner in all_specs:
        col = feat.raw_column
        where = f"{file}: {owner}.{feat.name}"
        if col in seen:
            other, other_where = seen[col]
            if arrow_type(other) != arrow_type(feat) or other.source is not feat.source:
                problems.append(f"{where}: column {col!r} has another type or source in {other_where}")
        else:
            seen[col] = (feat, where)
        gen = cfg.feature(col)
        if feat.vocab is not None and feat.vocab.kind is VocabKind.FILE and col not in _role_columns(cfg):
            problems.append(f"{where}: synth cannot draw values of a vocabulary file; use hashed or identity")
        if feat.source is Source.CROSS and (gen.cross is None or feat.type is FeatureType.DENSE):
            problems.append(f"{where}: cross feature needs `features.{col}.cross` in {f} (numeric or categorical)")
        if feat.source is not Source.CROSS and gen.cross is not None:
            bad(f"features.{col}.cross", f"{where} is not a cross feature")
        if gen.time is not None and (feat.type is not FeatureType.CATEGORICAL or feat.source is not Source.CONTEXT):
            bad(f"features.{col}.time", f"{where} must be a categorical context feature")
        if feat.type is FeatureType.TIMESTAMP and feat.source is not Source.CONTEXT:
            problems.append(f"{where}: synth draws timestamp features only as context (the exposure's time)")
    for col in cfg.features or {}:
        if col not in cols:
            bad(f"features.{col}", f"no scenario feature or sequence field reads column {col!r} in {world.source_file}")
    _check_roles(cfg, world, cols, bad)
    for sc in world.scenarios:
        gen = cfg.scenarios.get(sc.name)
        if gen is None:
            bad("scenarios", f"no entry for scenario {sc.name!r} of {world.source_file}")
            continue
        names = [label.name for label in sc.labels]
        if not names:
            problems.append(f"{sc.source_file}: labels: synth needs at least one binary label")
        if sorted(names) != sorted(gen.labels):
            bad(f"scenarios.{sc.name}.labels", f"must give exactly the labels of {sc.source_file}: {names}")
        for label in sc.labels:
            if label.type is not LabelType.BINARY:
                problems.append(f"{sc.source_file}: labels.{label.name}: synth draws binary labels only")
    if problems:
        raise ConfigError(problems)


def _role_columns(cfg: SynthConfig) -> set[str]:
    return {cfg.roles.item, cfg.roles.category, cfg.roles.scenario}


def _check_roles(cfg: SynthConfig, world: WorldSpec, cols: dict[str, FeatureSpec], bad) -> None:
    roles = cfg.roles
    for role, col in (("item", roles.item), ("category", roles.category)):
        feat = cols.get(col)
        if feat is not None and (feat.type is not FeatureType.CATEGORICAL or feat.source is not Source.ITEM):
            bad(f"roles.{role}", f"column {col!r} must be a categorical item feature")
    cat = cols.get(roles.category)
    if cat is not None and cat.vocab is not None and cat.vocab.kind is VocabKind.IDENTITY:
        if cat.vocab.size < cfg.latent.categories:
            bad("latent.categories", f"{cfg.latent.categories} categories do not fit {roles.category!r}'s vocab")
    scen = cols.get(roles.scenario)
    if scen is not None:
        ok = scen.type is FeatureType.CATEGORICAL and scen.source is Source.CONTEXT
        if ok and scen.vocab is not None and scen.vocab.kind is VocabKind.IDENTITY:
            ok = scen.vocab.size >= len(world.scenarios)
        if not ok:
            bad("roles.scenario", f"column {roles.scenario!r} must be a categorical context field with room "
                f"for {len(world.scenarios)} scenario indices")

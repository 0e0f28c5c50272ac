"""The world-level ground truth of a synthetic world: latent space, items, and how every column is drawn.

Built once per (world, synth config, size, seed) and shared by every user block. Nothing here is
per-scenario Python: each raw column gets a :class:`ColumnModel` from its :class:`FeatureSpec` (type,
source, vocab, transform) and its optional :class:`FeatureGen` override, and items of every scenario live
in one global table (row ``g`` is item id ``g + 1``)::

    category_vecs  [K, D]      one latent vector per category
    item_category  [n_items]   int64, items of each scenario contiguous, sorted by category
    item_latent    [n_items, D] category vector + noise
    item_attrs     column -> [n_items] (or [n_items, length] for dense) item-source attributes
    pools          per scenario (registry order): its slice of the item table and popularity CDF

Random streams are keyed by stable names (``zlib.crc32``), so adding a column leaves the others unchanged.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from recfm.foundation.data.synth_config import (
    DEFAULT_CARDINALITY,
    Dist,
    FeatureGen,
    SizeGen,
    SynthConfig,
    TimeOf,
    world_columns,
)
from recfm.scenarios.spec import FeatureSpec, FeatureType, NumericTransform, Source, VocabKind, WorldSpec

_TIME_SIZES = {TimeOf.HOUR_OF_DAY: 24, TimeOf.DAY_OF_WEEK: 7}


def stream(seed: int, *keys: int | str) -> np.random.Generator:
    """A random generator keyed by ``seed`` and stable names/indices."""
    ints = [k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys]
    return np.random.default_rng([seed, *ints])


@dataclass(frozen=True)
class ColumnModel:
    """How one raw column is drawn and what it adds to each label stage's logit.

    ``effects`` is ``[n_stages, table]`` for categoricals (indexed by value) and bucketised numerics
    (indexed by bucket), ``[n_stages]`` slopes on the standardised value for other numerics, and None for
    columns without a direct effect (cross, dense, timestamp, the scenario role).
    """

    spec: FeatureSpec
    gen: FeatureGen
    role: str | None  # "item" | "category" | "scenario" | None
    cum: np.ndarray | None = None  # categorical: CDF over values 0..card-1, [card]
    dist: Dist | None = None  # numeric
    params: tuple[float, float] = (0.0, 1.0)
    effects: np.ndarray | None = None
    projection: np.ndarray | None = None  # dense: [D, length]

    @property
    def name(self) -> str:
        return self.spec.raw_column

    def draw(self, rng: np.random.Generator, n: int, latent: np.ndarray | None = None) -> np.ndarray:
        """``n`` independent values (``latent`` [n, D] feeds dense user/item columns)."""
        spec = self.spec
        if spec.type is FeatureType.CATEGORICAL:
            return np.minimum(np.searchsorted(self.cum, rng.random(n), side="right"), len(self.cum) - 1)
        if spec.type is FeatureType.NUMERIC:
            a, b = self.params
            if self.dist is Dist.LOGNORMAL:
                x = rng.lognormal(a, b, n)
            elif self.dist is Dist.NORMAL:
                x = rng.normal(a, b, n)
            else:
                x = rng.uniform(a, b, n)
            return x.astype(np.float32)
        if spec.type is FeatureType.DENSE:
            noise = rng.standard_normal((n, self.projection.shape[1]))
            base = 0.0 if latent is None else latent @ self.projection
            return (base + 0.5 * noise).astype(np.float32)
        raise AssertionError(f"{spec.name}: timestamp columns are filled from the exposure time")

    def from_time(self, ts: np.ndarray) -> np.ndarray:
        """Time-derived context categorical of unix seconds ``ts`` [n] (UTC)."""
        if self.gen.time is TimeOf.HOUR_OF_DAY:
            return (ts // 3600) % 24
        return (ts // 86400 + 3) % 7  # 1970-01-01 was a Thursday; 0 = Monday

    def standardised(self, x: np.ndarray) -> np.ndarray:
        a, b = self.params
        if self.dist is Dist.LOGNORMAL:
            return (np.log(np.maximum(x, 1e-9)) - a) / b
        if self.dist is Dist.NORMAL:
            return (x - a) / b
        return (x - (a + b) / 2) / max((b - a) / np.sqrt(12.0), 1e-9)

    def effect(self, stage: int, x: np.ndarray) -> np.ndarray:
        """This column's logit contribution at label ``stage`` for values ``x`` [n] -> [n] float64."""
        if self.effects is None:
            return np.zeros(len(x))
        if self.spec.type is FeatureType.CATEGORICAL:
            return self.effects[stage][x]
        if self.spec.transform is NumericTransform.BUCKETIZE:
            return self.effects[stage][np.searchsorted(self.spec.boundaries, x, side="right")]
        return self.effects[stage] * self.standardised(x)


@dataclass(frozen=True)
class Pool:
    """One scenario's items: rows ``offset .. offset + size`` of the item table, sorted by category."""

    offset: int
    size: int
    cum: np.ndarray  # [size] float64: category + CDF of popularity within it (last of category c = c + 1)

    def pick(self, rng: np.random.Generator, category: np.ndarray) -> np.ndarray:
        """A popular-within-category item row for each ``category`` [n] -> global item rows [n]."""
        pos = np.searchsorted(self.cum, category + rng.random(len(category)), side="right")
        return self.offset + np.minimum(pos, self.size - 1)


@dataclass(frozen=True)
class Truth:
    world: WorldSpec
    cfg: SynthConfig
    size: SizeGen
    category_vecs: np.ndarray  # [K, D]
    category_cum: np.ndarray  # [K] CDF of category popularity
    columns: dict[str, ColumnModel]
    item_category: np.ndarray  # [n_items] int64
    item_latent: np.ndarray  # [n_items, D] float64
    item_attrs: dict[str, np.ndarray]
    pools: tuple[Pool, ...]
    actions: tuple[str, ...]  # every label name, sorted: event action codes index this

    @property
    def n_items(self) -> int:
        return len(self.item_category)


def build_truth(world: WorldSpec, cfg: SynthConfig, size: SizeGen, seed: int) -> Truth:
    """The world-level truth; deterministic in ``seed`` (and the configs)."""
    lat = cfg.latent
    K, D = lat.categories, lat.dim
    rng = stream(seed, "latent")
    category_vecs = rng.standard_normal((K, D)) / np.sqrt(D)
    pop = 1.0 / (rng.permutation(K) + 1.0) ** lat.category_zipf
    category_pop = pop / pop.sum()
    n_stages = max(len(sc.labels) for sc in world.scenarios)

    pools, cats = [], []
    offset = 0
    for sc in world.scenarios:
        n = max(K, int(round(size.items * cfg.scenarios[sc.name].items)))
        prng = stream(seed, "pool", sc.name)
        mix = category_pop * prng.gamma(2.0, 1.0, K)
        extra = prng.choice(K, n - K, p=mix / mix.sum())
        cat = np.sort(np.concatenate([np.arange(K), extra]))
        weight = 1.0 / (prng.permutation(n) + 1.0) ** lat.item_zipf
        cum = np.empty(n)
        for c in range(K):  # K small: CDF of popularity inside each category, shifted by the category
            sl = slice(*np.searchsorted(cat, [c, c + 1]))
            cw = np.cumsum(weight[sl])
            cum[sl] = c + cw / cw[-1]
            cum[sl.stop - 1] = c + 1.0
        pools.append(Pool(offset=offset, size=n, cum=cum))
        cats.append(cat)
        offset += n
    item_category = np.concatenate(cats).astype(np.int64)
    irng = stream(seed, "items")
    item_latent = category_vecs[item_category] + lat.item_noise * irng.standard_normal((offset, D)) / np.sqrt(D)

    columns = {col: _column_model(world, cfg, spec, seed, n_stages, offset) for col, spec in world_columns(world).items()}
    item_attrs = {}
    for col, model in columns.items():
        if model.spec.source is Source.ITEM and model.role is None:
            item_attrs[col] = model.draw(stream(seed, "item_attr", col), offset, latent=item_latent)
    actions = tuple(sorted({label.name for sc in world.scenarios for label in sc.labels}))
    return Truth(
        world=world, cfg=cfg, size=size, category_vecs=category_vecs, category_cum=np.cumsum(category_pop),
        columns=columns, item_category=item_category, item_latent=item_latent, item_attrs=item_attrs,
        pools=tuple(pools), actions=actions,
    )


def _column_model(world: WorldSpec, cfg: SynthConfig, spec: FeatureSpec, seed: int, n_stages: int, n_items: int) -> ColumnModel:
    col = spec.raw_column
    gen = cfg.feature(col)
    roles = cfg.roles
    role = {roles.item: "item", roles.category: "category", roles.scenario: "scenario"}.get(col)
    rng = stream(seed, "column", col)
    std = cfg.effect_std if gen.effect_std is None else gen.effect_std
    no_effect = spec.source is Source.CROSS or role == "scenario"
    if spec.type is FeatureType.CATEGORICAL:
        if role == "item":
            card, cum = n_items + 1, None
        elif role == "category":
            card, cum = cfg.latent.categories, None
        elif gen.time is not None:
            card, cum = _TIME_SIZES[gen.time], None
        else:
            size = spec.vocab.size if spec.vocab is not None else DEFAULT_CARDINALITY
            if spec.vocab is not None and spec.vocab.kind is VocabKind.IDENTITY:
                card = min(size, gen.cardinality or size)  # identity values must stay inside the vocab
            else:
                card = gen.cardinality or min(size, DEFAULT_CARDINALITY)
            p = 1.0 / (rng.permutation(card) + 1.0) ** gen.zipf
            cum = np.cumsum(p / p.sum())
        effects = None if no_effect else rng.normal(0.0, std, (n_stages, card))
        return ColumnModel(spec=spec, gen=gen, role=role, cum=cum, effects=effects)
    if spec.type is FeatureType.NUMERIC:
        dist, params = _numeric_dist(spec, gen)
        if no_effect:
            effects = None
        elif spec.transform is NumericTransform.BUCKETIZE:
            effects = rng.normal(0.0, std, (n_stages, len(spec.boundaries) + 1))
        elif gen.slope is not None:
            effects = np.full(n_stages, gen.slope)
        else:
            effects = rng.normal(0.0, std, n_stages)
        return ColumnModel(spec=spec, gen=gen, role=role, dist=dist, params=params, effects=effects)
    if spec.type is FeatureType.DENSE:
        proj = rng.standard_normal((cfg.latent.dim, spec.length))
        return ColumnModel(spec=spec, gen=gen, role=role, projection=proj)
    return ColumnModel(spec=spec, gen=gen, role=role)


def _numeric_dist(spec: FeatureSpec, gen: FeatureGen) -> tuple[Dist, tuple[float, float]]:
    """The override, or a default that fits the spec's transform."""
    if gen.dist is not None:
        return gen.dist, (float(gen.params[0]), float(gen.params[1]))
    if spec.transform is NumericTransform.LOG:
        return Dist.LOGNORMAL, (2.0, 1.0)
    if spec.transform is NumericTransform.STANDARD:
        return Dist.NORMAL, (spec.mean, spec.std)
    if spec.transform is NumericTransform.BUCKETIZE and spec.boundaries:
        b = np.asarray(spec.boundaries, dtype=float)
        if b[0] > 0:
            logs = np.log(b)
            return Dist.LOGNORMAL, (float(logs.mean()), float(max(0.5, (logs[-1] - logs[0]) / 3)))
        span = max(float(b[-1] - b[0]), 1.0)
        return Dist.UNIFORM, (float(b[0] - span / 4), float(b[-1] + span / 4))
    return Dist.UNIFORM, (0.0, 1.0)

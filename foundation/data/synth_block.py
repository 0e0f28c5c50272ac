"""One block of users of a synthetic world: their events, exposures, oracle probabilities and labels.

A block (``SizeGen.block_users`` consecutive users) is the unit of randomness: its generator is keyed by
``(seed, block index)``, so the world is the same however blocks are grouped into chunks or processes.
Order of generation inside a block:

1. users: latent interest vector ``[n, D]``, activity, scenario participation, user-source attributes;
2. organic events over history and window days (first-label action, e.g. ``click``, plus conversions);
3. exposures in sessions during the window days; category follows the user's interests or popularity;
4. exposure columns (user / item attributes, context draws, time-derived context);
5. the truth: per scenario and label stage, ``p`` from the scenario's parameters, labels drawn from it;
6. label events: every positive label emits an event of that action shortly after its exposure
   (the leak trap: a model that lets an exposure see later real-time events sees its own click);
7. cross features from all events before the exposure's window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from recfm.foundation.data import schema
from recfm.foundation.data.synth_truth import ColumnModel, Truth, stream
from recfm.scenarios.spec import FeatureType, LabelType, Source

DAY = 86400


@dataclass(frozen=True)
class _Users:
    latent: np.ndarray  # [n, D]
    interest_cum: np.ndarray  # [n, K] CDF of p(category | user)
    scenario_cum: np.ndarray  # [n, S] CDF of the user's organic activity over scenarios
    activity: np.ndarray  # [n]
    participation: np.ndarray  # [n, S] bool
    attrs: dict[str, np.ndarray]


@dataclass(frozen=True)
class _Rows:
    """Parallel arrays of events or exposures; ``user`` is the block-local user index."""

    user: np.ndarray
    ts: np.ndarray
    scenario: np.ndarray
    item: np.ndarray  # global item row
    action: np.ndarray | None = None  # events: index into Truth.actions

    def __len__(self) -> int:
        return len(self.ts)

    def select(self, mask: np.ndarray) -> "_Rows":
        act = None if self.action is None else self.action[mask]
        return _Rows(self.user[mask], self.ts[mask], self.scenario[mask], self.item[mask], act)

    @staticmethod
    def concat(parts: list["_Rows"]) -> "_Rows":
        return _Rows(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("user", "ts", "scenario", "item", "action")))


def generate_block(truth: Truth, seed: int, block: int) -> tuple[pa.Table, pa.Table]:
    """Events and exposures of users ``block * block_users ...`` as Arrow tables (see synth.py)."""
    size = truth.size
    first = block * size.block_users
    n = min(size.block_users, size.users - first)
    rng = stream(seed, "block", block)
    users = _draw_users(truth, rng, n)
    organic = _organic_events(truth, rng, users)
    ex = _draw_exposures(truth, rng, users)
    values = _exposure_values(truth, rng, users, ex)
    recent = _count(organic.user * truth.cfg.latent.categories + truth.item_category[organic.item], organic.ts,
                    ex.user * truth.cfg.latent.categories + truth.item_category[ex.item],
                    ex.ts - truth.cfg.behaviour.recency_seconds, ex.ts) > 0
    probs, labels = _labels(truth, rng, users, ex, values, recent)
    events = _Rows.concat([organic, _label_events(truth, rng, ex, labels)])
    for col, model in truth.columns.items():
        if model.spec.source is Source.CROSS and col in values:
            values[col] = _cross(truth, model, events, ex)
    return _events_table(truth, rng, users, events, first), _exposures_table(truth, ex, values, probs, labels, first, block)


# --------------------------------------------------------------------------------------------- users


def _draw_users(truth: Truth, rng: np.random.Generator, n: int) -> _Users:
    cfg, lat = truth.cfg, truth.cfg.latent
    K, D = truth.category_vecs.shape
    pop = np.diff(np.concatenate([[0.0], truth.category_cum]))
    fav = np.argsort(-(rng.gumbel(size=(n, K)) + np.log(pop)), axis=1)[:, : lat.favourites]
    w = rng.dirichlet(np.ones(lat.favourites), n)
    latent = lat.strength * np.einsum("nf,nfd->nd", w, truth.category_vecs[fav])
    latent += lat.noise * rng.standard_normal((n, D)) / np.sqrt(D)
    interest = np.exp(lat.sharpness * latent @ truth.category_vecs.T)
    activity = rng.lognormal(-cfg.behaviour.activity_sigma**2 / 2, cfg.behaviour.activity_sigma, n)
    gens = [cfg.scenarios[sc.name] for sc in truth.world.scenarios]
    participation = rng.random((n, len(gens))) < np.array([g.participation for g in gens])
    traffic = np.array([g.traffic for g in gens])
    weights = traffic * participation
    weights[weights.sum(1) == 0] = traffic
    attrs = {col: m.draw(rng, n, latent) for col, m in truth.columns.items() if m.spec.source is Source.USER}
    return _Users(latent, _cdf_rows(interest), _cdf_rows(weights), activity, participation, attrs)


def _cdf_rows(weights: np.ndarray) -> np.ndarray:
    cum = np.cumsum(weights, axis=1)
    cum /= cum[:, -1:]
    cum[:, -1] = 1.0
    return cum


def _pick_rows(cum: np.ndarray, row: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw a column for each ``row`` [m] from the row's CDF in ``cum`` [n, K] -> [m] int64."""
    n, k = cum.shape
    flat = (cum + np.arange(n)[:, None]).ravel()
    pos = np.searchsorted(flat, row + rng.random(len(row)), side="right")
    return np.clip(pos - row * k, 0, k - 1)


def _time_of_day(truth: Truth, rng: np.random.Generator, m: int) -> np.ndarray:
    profile = np.asarray(truth.cfg.hour_profile, dtype=float)
    hour = np.minimum(np.searchsorted(np.cumsum(profile / profile.sum()), rng.random(m), side="right"), 23)
    return hour * 3600 + rng.integers(0, 3600, m)


def _pick_items(truth: Truth, rng: np.random.Generator, scenario: np.ndarray, category: np.ndarray) -> np.ndarray:
    item = np.zeros(len(scenario), dtype=np.int64)
    for s, pool in enumerate(truth.pools):
        rows = np.flatnonzero(scenario == s)
        item[rows] = pool.pick(rng, category[rows])
    return item


# -------------------------------------------------------------------------------- events, exposures


def _action_codes(truth: Truth, stage: int) -> np.ndarray:
    """Per scenario: the action code of its label ``stage`` (-1 when it has none)."""
    return np.array([truth.actions.index(sc.labels[stage].name) if len(sc.labels) > stage else -1
                     for sc in truth.world.scenarios])


def _organic_events(truth: Truth, rng: np.random.Generator, users: _Users) -> _Rows:
    cfg, size, b = truth.cfg, truth.size, truth.cfg.behaviour
    days = size.history_days + size.window_days
    user = np.repeat(np.arange(len(users.activity)), rng.poisson(b.per_day * users.activity * days))
    m = len(user)
    ts = cfg.start + rng.integers(0, days, m) * DAY + _time_of_day(truth, rng, m)
    scen = _pick_rows(users.scenario_cum, user, rng)
    item = _pick_items(truth, rng, scen, _pick_rows(users.interest_cum, user, rng))
    clicks = _Rows(user, ts, scen, item, _action_codes(truth, 0)[scen])
    conv_code = _action_codes(truth, 1)
    conv_rate = np.array([cfg.scenarios[sc.name].conversion for sc in truth.world.scenarios]) * (conv_code >= 0)
    conv = clicks.select(rng.random(m) < conv_rate[scen])
    delay = rng.integers(b.conversion_delay[0], b.conversion_delay[1] + 1, len(conv))
    return _Rows.concat([clicks, _Rows(conv.user, conv.ts + delay, conv.scenario, conv.item, conv_code[conv.scenario])])


def _draw_exposures(truth: Truth, rng: np.random.Generator, users: _Users) -> _Rows:
    cfg, size, b = truth.cfg, truth.size, truth.cfg.behaviour
    n, S = users.participation.shape
    traffic = np.array([cfg.scenarios[sc.name].traffic for sc in truth.world.scenarios])
    lam = traffic * users.participation * users.activity[:, None] * size.window_days
    pair = np.repeat(np.arange(n * S), rng.poisson(lam).ravel())
    user, scen = pair // S, pair % S
    m = len(pair)
    new = rng.random(m) < 1.0 / b.session_size  # a new session starts here
    new[:1] = True
    new[1:] |= pair[1:] != pair[:-1]
    sid = np.cumsum(new) - 1
    n_sessions = int(new.sum())
    start = cfg.start + size.history_days * DAY
    session_ts = start + rng.integers(0, size.window_days, n_sessions) * DAY + _time_of_day(truth, rng, n_sessions)
    gap = rng.integers(b.session_gap[0], b.session_gap[1] + 1, m)
    gap[new] = 0
    cs = np.cumsum(gap)
    ts = session_ts[sid] + cs - cs[np.flatnonzero(new)][sid]
    by_interest = _pick_rows(users.interest_cum, user, rng)
    by_popularity = np.minimum(np.searchsorted(truth.category_cum, rng.random(m), side="right"), len(truth.category_cum) - 1)
    category = np.where(rng.random(m) < cfg.latent.targeting, by_interest, by_popularity)
    return _Rows(user, ts, scen, _pick_items(truth, rng, scen, category))


def _column_values(truth: Truth, model: ColumnModel, rng: np.random.Generator, users: _Users, rows: _Rows) -> np.ndarray:
    """A non-cross column for every row (events or exposures) [m] (or [m, length] dense)."""
    if model.role == "item":
        return rows.item + 1
    if model.role == "category":
        return truth.item_category[rows.item]
    if model.role == "scenario":
        return rows.scenario
    if model.spec.source is Source.USER:
        return users.attrs[model.name][rows.user]
    if model.spec.source is Source.ITEM:
        return truth.item_attrs[model.name][rows.item]
    if model.spec.type is FeatureType.TIMESTAMP:
        return rows.ts
    if model.gen.time is not None:
        return model.from_time(rows.ts)
    return model.draw(rng, len(rows))


def _exposure_values(truth: Truth, rng: np.random.Generator, users: _Users, ex: _Rows) -> dict[str, np.ndarray | None]:
    values: dict[str, np.ndarray | None] = {}
    for sc in truth.world.scenarios:
        for feat in sc.features:
            col = feat.raw_column
            if col not in values:
                model = truth.columns[col]
                values[col] = None if feat.source is Source.CROSS else _column_values(truth, model, rng, users, ex)
    return values


# ------------------------------------------------------------------------------------------ truth


def _labels(truth: Truth, rng, users: _Users, ex: _Rows, values: dict, recent: np.ndarray):
    """Oracle probabilities and labels: label name -> [m] float64 / int8 (rows of other scenarios: 0)."""
    world, cfg = truth.world, truth.cfg
    m = len(ex)
    n_stages = max(len(sc.labels) for sc in world.scenarios)
    affinity = np.einsum("nd,nd->n", users.latent[ex.user], truth.item_latent[ex.item])
    draws = rng.random((m, n_stages))
    probs = {a: np.zeros(m) for a in truth.actions}
    labels = {a: np.zeros(m, dtype=np.int8) for a in truth.actions}
    for s, sc in enumerate(world.scenarios):
        rows = np.flatnonzero(ex.scenario == s)
        p_prev, y_prev = np.ones(len(rows)), np.ones(len(rows), dtype=bool)
        for k, label in enumerate(sc.labels):
            lg = cfg.scenarios[sc.name].labels[label.name]
            logit = lg.bias + lg.affinity * affinity[rows] + lg.recency * recent[rows]
            for feat in sc.features:
                model = truth.columns[feat.raw_column]
                if model.effects is not None and lg.features:
                    logit = logit + lg.features * model.effect(k, values[feat.raw_column][rows])
            q = 1.0 / (1.0 + np.exp(-logit))
            p_prev, y_prev = p_prev * q, y_prev & (draws[rows, k] < q)  # P(y_k) = q_0 * ... * q_k = p_k
            probs[label.name][rows] = p_prev
            labels[label.name][rows] = y_prev
    return probs, labels


def _label_events(truth: Truth, rng: np.random.Generator, ex: _Rows, labels: dict) -> _Rows:
    """Every positive label emits its action a few seconds/minutes after the exposure."""
    world, cfg = truth.world, truth.cfg
    n_stages = max(len(sc.labels) for sc in world.scenarios)
    u = rng.random((len(ex), n_stages))
    parts = []
    for s, sc in enumerate(world.scenarios):
        in_s = ex.scenario == s
        for k, label in enumerate(sc.labels):
            lo, hi = cfg.scenarios[sc.name].labels[label.name].delay
            mask = in_s & (labels[label.name] == 1)
            hit = ex.select(mask)
            delay = lo + np.floor(u[mask, k] * (hi - lo + 1)).astype(np.int64)
            code = np.full(len(hit), truth.actions.index(label.name))
            parts.append(_Rows(hit.user, hit.ts + delay, hit.scenario, hit.item, code))
    return _Rows.concat(parts)


def _count(ev_group: np.ndarray, ev_ts: np.ndarray, q_group: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """For each query: number of events with ``ev_group == q_group`` and ``lo <= ev_ts < hi`` -> [q]."""
    if len(q_group) == 0:
        return np.zeros(0, dtype=np.int64)
    base = min(ev_ts.min(initial=lo.min()), lo.min())
    span = max(ev_ts.max(initial=hi.max()), hi.max()) - base + 1
    keys = np.sort(ev_group.astype(np.int64) * span + (ev_ts - base))
    q = q_group.astype(np.int64) * span
    return np.searchsorted(keys, q + (hi - base)) - np.searchsorted(keys, q + (lo - base))


def _cross(truth: Truth, model: ColumnModel, events: _Rows, ex: _Rows) -> np.ndarray:
    """``history_count``: the user's events with the given actions on the item's key, before the window."""
    gen = model.gen
    codes = [truth.actions.index(a) for a in gen.actions if a in truth.actions]
    ev = events.select(np.isin(events.action, codes))
    if gen.key.value == "item":
        n_keys, ev_key, ex_key = truth.n_items, ev.item, ex.item
    else:
        n_keys, ev_key, ex_key = truth.cfg.latent.categories, truth.item_category[ev.item], truth.item_category[ex.item]
    window = truth.world.window_seconds
    lo = np.full(len(ex), truth.cfg.start)  # no event is older than the world's start
    count = _count(ev.user * n_keys + ev_key, ev.ts, ex.user * n_keys + ex_key, lo, ex.ts // window * window)
    if model.spec.type is FeatureType.NUMERIC:
        return count.astype(np.float32)
    return np.minimum(count, model.spec.vocab.size - 1)


# ------------------------------------------------------------------------------------------ tables


def _events_table(truth: Truth, rng, users: _Users, ev: _Rows, first: int) -> pa.Table:
    order = np.lexsort((ev.item, ev.action, ev.ts, ev.user))
    ev = ev.select(order)
    cols = {
        schema.USER: pa.array(ev.user + first, pa.int64()),
        schema.TIMESTAMP: pa.array(ev.ts, pa.int64()),
        schema.ACTION: _strings(ev.action, truth.actions),
    }
    for feat in truth.world.event_fields():
        model = truth.columns[feat.raw_column]
        cols[feat.raw_column] = _arrow(_column_values(truth, model, rng, users, ev), schema.arrow_type(feat), None)
    return pa.table(cols)


def _exposures_table(truth: Truth, ex: _Rows, values: dict, probs: dict, labels: dict, first: int, block: int) -> pa.Table:
    world = truth.world
    order = np.lexsort((np.arange(len(ex)), ex.ts, ex.user))
    scen = ex.scenario[order]
    cols = {
        schema.EXPOSURE_ID: pa.array((block << 32) + np.arange(len(ex)), pa.int64()),
        schema.USER: pa.array(ex.user[order] + first, pa.int64()),
        schema.TIMESTAMP: pa.array(ex.ts[order], pa.int64()),
        schema.SCENARIO: _strings(scen, world.scenario_names),
    }
    owners: dict[str, list[int]] = {}
    specs = {}
    for s, sc in enumerate(world.scenarios):
        for feat in sc.features:
            owners.setdefault(feat.raw_column, []).append(s)
            specs.setdefault(feat.raw_column, feat)
    for col, feat in specs.items():
        cols[col] = _arrow(values[col][order], schema.arrow_type(feat), np.isin(scen, owners[col]))
    label_owners: dict[str, list[int]] = {}
    label_types: dict[str, LabelType] = {}
    for s, sc in enumerate(world.scenarios):
        for label in sc.labels:
            label_owners.setdefault(label.raw_column, []).append(s)
            label_types.setdefault(label.raw_column, label.name)
    for col, name in label_types.items():
        cols[col] = _arrow(labels[name][order], pa.int8(), np.isin(scen, label_owners[col]))
    for col, name in label_types.items():
        cols[schema.oracle_column(col)] = _arrow(probs[name][order], pa.float64(), np.isin(scen, label_owners[col]))
    return pa.table(cols)


def _strings(codes: np.ndarray, names: tuple[str, ...]) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(list(names), pa.string())).dictionary_decode()


def _arrow(values: np.ndarray, typ: pa.DataType, valid: np.ndarray | None) -> pa.Array:
    mask = None if valid is None else ~valid
    if pa.types.is_list(typ):
        offsets = pa.array(np.arange(len(values) + 1, dtype=np.int32) * values.shape[1])
        flat = pa.array(values.ravel().astype(np.float32))
        return pa.ListArray.from_arrays(offsets, flat, mask=None if mask is None else pa.array(mask))
    return pa.array(values, typ, mask=mask)

"""The synthetic world: reproducible from its seed, labels drawn from the written oracle, the leak trap,
schema matching the scenario specs, and a config checked against the world."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recfm.errors import ConfigError
from recfm.foundation.data import schema
from recfm.foundation.data.synth import synth_world
from recfm.foundation.data.synth_config import FeatureGen, check_against_world, load_synth_config
from recfm.foundation.metrics import auc, gauc
from recfm.scenarios.loader import load_world
from recfm.scenarios.spec import Source

SEED = 11


def read(out: Path, sub: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / sub).glob("part-*.parquet"))])


@pytest.fixture(scope="module")
def world():
    return load_world()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    report = synth_world(out, size="tiny", seed=SEED, progress=False)
    return out, report, read(out, "events"), read(out, "exposures")


# ------------------------------------------------------------------------------------ reproducibility


def test_same_seed_gives_byte_identical_files(tiny, tmp_path):
    out, _, events, exposures = tiny
    synth_world(tmp_path, size="tiny", seed=SEED, progress=False)
    names = sorted(p.relative_to(out) for p in out.glob("*/part-*.parquet"))
    assert names == sorted(p.relative_to(tmp_path) for p in tmp_path.glob("*/part-*.parquet"))
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_chunking_and_processes_do_not_change_the_data(tiny, tmp_path):
    _, _, events, exposures = tiny
    one = tmp_path / "one"
    synth_world(one, size="tiny", seed=SEED, chunk_blocks=1, progress=False)
    assert len(list((one / "exposures").glob("part-*.parquet"))) > 4  # really chunked differently
    assert read(one, "events").equals(events)
    assert read(one, "exposures").equals(exposures)
    two = tmp_path / "two"
    synth_world(two, size="tiny", seed=SEED, chunk_blocks=3, workers=2, progress=False)
    assert read(two, "events").equals(events)
    assert read(two, "exposures").equals(exposures)


def test_another_seed_gives_another_world(tiny, tmp_path):
    _, _, _, exposures = tiny
    synth_world(tmp_path, size="tiny", seed=SEED + 1, progress=False)
    other = read(tmp_path, "exposures")
    assert not other.equals(exposures)
    assert not np.array_equal(other.column("p_click").to_numpy()[:50], exposures.column("p_click").to_numpy()[:50])


def test_rerun_replaces_old_parts(tmp_path):
    synth_world(tmp_path, size="tiny", seed=0, chunk_blocks=1, progress=False)
    synth_world(tmp_path, size="tiny", seed=0, progress=False)
    assert len(list((tmp_path / "exposures").glob("part-*.parquet"))) == 3  # 300 users / (32 * 4) blocks


# ---------------------------------------------------------------------------------------- the oracle


def _label_draws(world, exposures: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """All (label, p) pairs of every scenario's labels."""
    scen = exposures.column("scenario").to_numpy(zero_copy_only=False)
    ys, ps = [], []
    for sc in world.scenarios:
        rows = np.flatnonzero(scen == sc.name)
        for label in sc.labels:
            ys.append(exposures.column(label.name).to_numpy(zero_copy_only=False)[rows].astype(float))
            ps.append(exposures.column(schema.oracle_column(label.name)).to_numpy(zero_copy_only=False)[rows])
    return np.concatenate(ys), np.concatenate(ps)


def _calibration_chi2(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Sum over p-deciles of ((positives - sum p)^2 / sum p(1-p)): ~chi-square(bins) if y ~ Bernoulli(p)."""
    edges = np.quantile(p, np.linspace(0, 1, bins + 1)[1:-1])
    which = np.searchsorted(edges, p)
    chi2 = 0.0
    for b in range(bins):
        m = which == b
        chi2 += (y[m].sum() - p[m].sum()) ** 2 / max((p[m] * (1 - p[m])).sum(), 1e-9)
    return chi2


def test_labels_are_drawn_from_the_written_probabilities(world, tiny):
    _, _, _, exposures = tiny
    y, p = _label_draws(world, exposures)
    assert len(y) > 3000
    # overall: positives within 4 binomial standard deviations of the expected count
    assert abs(y.sum() - p.sum()) < 4 * np.sqrt((p * (1 - p)).sum())
    # by decile of p: chi-square with 10 degrees of freedom; 35 is exceeded with probability ~1e-4
    assert _calibration_chi2(y, p) < 35
    # the check has power: the same p shuffled across exposures is rejected by far
    shuffled = np.random.default_rng(0).permutation(p)
    assert _calibration_chi2(y, shuffled) > 100


def test_conversion_only_after_click_and_p_is_unconditional(world, tiny):
    _, _, _, exposures = tiny
    df = exposures.to_pandas()
    for sc in world.scenarios:
        d = df[df.scenario == sc.name]
        first, *rest = [label.name for label in sc.labels]
        for name in rest:
            assert (d[name] <= d[first]).all()
            assert (d[f"p_{name}"] <= d[f"p_{first}"] + 1e-12).all()
            assert d[name].notna().all() and d[f"p_{name}"].between(0, 1).all()


def test_oracle_separates_and_report_agrees_with_metrics(world, tiny):
    out, report, _, exposures = tiny
    df = exposures.to_pandas()
    for sc in world.scenarios:
        d = df[df.scenario == sc.name]
        rep = report.scenario(sc.name)
        assert rep.exposures == len(d) and rep.users == d.user_id.nunique()
        for lab in rep.labels:
            y, p = d[lab.label].to_numpy(), d[f"p_{lab.label}"].to_numpy()
            assert lab.auc == pytest.approx(auc(y, p), abs=1e-3, nan_ok=True)  # report AUC is binned
            assert lab.gauc == pytest.approx(gauc(y, p, d.user_id.to_numpy()), abs=1e-9, nan_ok=True)
            assert lab.rate == pytest.approx(y.mean()) and lab.mean_p == pytest.approx(p.mean())
            if len(d) >= 150:  # features and interests carry signal: the oracle ranks well above chance
                assert lab.auc > 0.65, (sc.name, lab)
    saved = json.loads((out / "synth_report.json").read_text())
    assert saved["exposures"] == exposures.num_rows and saved["seed"] == SEED


def test_sparse_scenario_is_at_least_ten_times_sparser(world, tiny):
    cfg = load_synth_config()
    expected = {sc.name: cfg.scenarios[sc.name].traffic * cfg.scenarios[sc.name].participation for sc in world.scenarios}
    assert max(expected.values()) >= 10 * min(expected.values())
    _, report, _, _ = tiny
    counts = [s.exposures for s in report.scenarios]
    assert max(counts) >= 10 * min(counts)
    sparse = min(expected, key=expected.get)
    assert sparse in world.scenario_names[:3]  # among the three pretraining scenarios
    assert len(world.scenarios) == 4


# ------------------------------------------------------------------------------------------ events


def test_every_click_is_followed_by_its_click_event_within_seconds(world, tiny):
    _, _, events, exposures = tiny
    ev = events.to_pandas()
    ex = exposures.to_pandas()
    ex["scenario_id"] = ex.scenario.map({n: i for i, n in enumerate(world.scenario_names)})
    clicked = ex[ex.click == 1]
    clicks = ev[ev.action == "click"]
    merged = clicked.merge(clicks, on=["user_id", "item_id", "scenario_id"], suffixes=("", "_ev"))
    merged = merged[(merged.timestamp_ev > merged.timestamp) & (merged.timestamp_ev <= merged.timestamp + 5)]
    assert set(merged.exposure_id) == set(clicked.exposure_id) and len(clicked) > 100
    # orders/redeems likewise follow their exposure (minutes later)
    for name in ("order", "redeem"):
        conv = ex[ex[name] == 1]
        m = conv.merge(ev[ev.action == name], on=["user_id", "item_id"], suffixes=("", "_ev"))
        m = m[(m.timestamp_ev > m.timestamp) & (m.timestamp_ev <= m.timestamp + 7200)]
        assert set(m.exposure_id) == set(conv.exposure_id)


def test_history_before_window_and_exposures_inside(tiny):
    _, _, events, exposures = tiny
    cfg = load_synth_config()
    size = cfg.sizes["tiny"]
    window_start = cfg.start + size.history_days * 86400
    ts = exposures.column("timestamp").to_numpy()
    assert ts.min() >= window_start and ts.max() < window_start + size.window_days * 86400 + 3600
    ev_ts = events.column("timestamp").to_numpy()
    assert ev_ts.min() >= cfg.start and (ev_ts < window_start).mean() > 0.3  # real history exists


def test_cross_feature_counts_past_clicks_in_the_items_category(tiny):
    _, _, events, exposures = tiny
    ev = events.to_pandas()
    ex = exposures.to_pandas()
    rows = ex[ex.scenario == "home_feed"].head(300)
    clicks = ev[ev.action == "click"]
    for r in rows.itertuples():
        day = r.timestamp // 86400 * 86400
        want = ((clicks.user_id == r.user_id) & (clicks.category == r.category) & (clicks.timestamp < day)).sum()
        assert r.user_cat_clicks == want
    assert rows.user_cat_clicks.max() > 0


# ------------------------------------------------------------------------------------------ schema


def test_columns_match_the_scenario_specs(world, tiny):
    _, _, events, exposures = tiny
    owners: dict[str, set[str]] = {}
    types: dict[str, pa.DataType] = {}
    for sc in world.scenarios:
        for feat in sc.features:
            owners.setdefault(feat.raw_column, set()).add(sc.name)
            types[feat.raw_column] = schema.arrow_type(feat)
    labels = list(dict.fromkeys(label.name for sc in world.scenarios for label in sc.labels))
    head = [schema.EXPOSURE_ID, schema.USER, schema.TIMESTAMP, schema.SCENARIO]
    assert exposures.column_names == head + list(types) + labels + [f"p_{x}" for x in labels]
    scen = exposures.column("scenario").to_numpy(zero_copy_only=False)
    for col, typ in types.items():
        assert exposures.schema.field(col).type == typ, col
        valid = exposures.column(col).is_valid().to_numpy(zero_copy_only=False)
        assert np.array_equal(valid, np.isin(scen, sorted(owners[col]))), col
    ids = exposures.column(schema.EXPOSURE_ID).to_numpy()
    assert len(np.unique(ids)) == len(ids)
    fields = world.event_fields()
    assert events.column_names == [schema.USER, schema.TIMESTAMP, schema.ACTION] + [f.raw_column for f in fields]
    for f in fields:
        assert events.schema.field(f.raw_column).type == schema.arrow_type(f)
        assert events.column(f.raw_column).null_count == 0
    # identity vocabularies are respected everywhere
    for sc in world.scenarios:
        for feat in sc.features:
            if feat.vocab is not None and feat.vocab.kind.value == "identity" and feat.source is not Source.CROSS:
                values = exposures.column(feat.raw_column).drop_null().to_numpy()
                assert values.min() >= 0 and values.max() < feat.vocab.size, feat.name


# ------------------------------------------------------------------------------------------ config


def test_shipped_configs_load_and_fit_the_world(world):
    cfg = load_synth_config()
    check_against_world(cfg, world)
    assert set(cfg.sizes) == {"tiny", "small", "default", "large", "huge"}
    assert {"home_feed", "group_buy", "coupon", "hotel"} == set(world.scenario_names)


def test_config_mistakes_are_reported_together(world):
    cfg = load_synth_config()
    scenarios = dict(cfg.scenarios)
    del scenarios["coupon"]
    features = dict(cfg.features)
    features["no_such_column"] = FeatureGen()
    del features["user_cat_clicks"]
    bad = replace(cfg, scenarios=scenarios, features=features)
    with pytest.raises(ConfigError) as err:
        check_against_world(bad, world)
    text = str(err.value)
    assert "coupon" in text and "no_such_column" in text and "user_cat_clicks" in text
    assert len(err.value.problems) >= 3


def test_synth_yaml_is_strict(tmp_path):
    from recfm.configs import config_path

    text = config_path("world", "synth.yaml").read_text().replace("per_day:", "per_dya:")
    path = tmp_path / "synth.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="per_dya"):
        load_synth_config(path)


def test_cli_synth_writes_a_world(tmp_path, capsys):
    from recfm.cli import main

    assert main(["data", "synth", "--size", "tiny", "--seed", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "oracle AUC" in out and "coupon" in out
    assert (tmp_path / "synth_report.json").is_file()
    assert main(["data", "synth", "--size", "enormous", "--out", str(tmp_path)]) == 2

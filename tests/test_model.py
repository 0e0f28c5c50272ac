"""RecModel: a tiny model overfits a tiny batch; registering a scenario keeps every trained output."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("torchrec")

from recfm.foundation.data.batch import collate  # noqa: E402
from recfm.foundation.data.build import build_samples  # noqa: E402
from recfm.foundation.data.loader import find_files  # noqa: E402
from recfm.foundation.data.synth import synth_world  # noqa: E402
from recfm.foundation.model.config import load_model_config  # noqa: E402
from recfm.foundation.model.model import RecModel, select_scenarios  # noqa: E402
from recfm.heads.mmoe import weighted_mean  # noqa: E402
from recfm.scenarios.loader import load_world  # noqa: E402

SCENARIOS = ["home_feed", "group_buy", "coupon"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """The first 12 sample rows of a tiny synthetic world that have home_feed exposures."""
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("model")
    synth_world(root / "raw", size="tiny", seed=5, progress=False)
    build_samples(None, root / "raw" / "events", root / "raw" / "exposures", root / "samples", progress=False)
    table = pq.read_table(find_files(root / "samples")[0])
    keep = [i for i, v in enumerate(table.column("t_home_feed").to_pylist()) if v][:12]
    return table.take(keep)


def test_tiny_model_overfits_a_tiny_batch(rows):
    world = load_world(None)
    batch = collate(rows, world, SCENARIOS)
    torch.manual_seed(0)
    model = RecModel(select_scenarios(world, SCENARIOS), load_model_config("tiny"))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = weighted_mean(model.losses(batch, model(batch)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_registering_a_scenario_changes_no_trained_output(rows):
    world = load_world(None)
    torch.manual_seed(0)
    model = RecModel(select_scenarios(world, SCENARIOS), load_model_config("tiny")).eval()
    batch = collate(rows, world, SCENARIOS)
    with torch.no_grad():
        before = model(batch)
        model.add_scenario(world.scenario("hotel"))
        after = model(batch)  # a batch collated for a subset of the registry still reads the right groups
    assert model.scenario_names == (*SCENARIOS, "hotel")
    for scenario, by_task in before.items():
        for task, logits in by_task.items():
            torch.testing.assert_close(after[scenario][task], logits, rtol=0, atol=0)
    with torch.no_grad():
        both = model(collate(rows, world, [*SCENARIOS, "hotel"]))
    assert set(both) <= {*SCENARIOS, "hotel"}


def test_target_rows_of_is_per_scenario_indexing():
    """One gather for every scenario's exposure rows gives each scenario's ``y[token_index]``, and the same
    gradient (rows in any order, scenarios of different sizes, one without exposures)."""
    from recfm.foundation.model.rows import target_rows_of

    gen = torch.Generator().manual_seed(0)
    y0 = torch.randn(20, 4, generator=gen)
    rows = torch.randperm(20, generator=gen)
    targets = {name: SimpleNamespace(token_index=idx) for name, idx in
               (("a", rows[:5]), ("b", rows[5:6]), ("c", rows[6:6]), ("d", rows[6:13]))}
    weights = {name: torch.randn(t.token_index.numel(), 4, generator=gen) for name, t in targets.items()}
    grads = []
    for pick in (lambda y: target_rows_of(y, targets), lambda y: {n: y[t.token_index] for n, t in targets.items()}):
        y = y0.clone().requires_grad_()
        got = pick(y)
        assert list(got) == list(targets)
        sum((got[n] * weights[n]).sum() for n in got).backward()
        grads.append((got, y.grad))
    (fused, g_fused), (plain, g_plain) = grads
    for name in targets:
        assert torch.equal(fused[name], plain[name])
    torch.testing.assert_close(g_fused, g_plain)
    assert target_rows_of(y0, {}) == {}


def test_scatter_rows_places_each_groups_rows():
    """Every group's values land at its rows, zeros where no group has a row; each group's gradient is the incoming
    gradient at its rows (a gather each way, checked against a plain index_put)."""
    from recfm.foundation.model.rows import scatter_rows

    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(30, generator=gen)
    rows = [perm[:7], perm[7:8], perm[8:8], perm[8:26]]  # tokens perm[26:] belong to no group
    values0 = [torch.randn(r.numel(), 5, generator=gen) for r in rows]
    weight = torch.randn(30, 5, generator=gen)
    results = []
    for place in (lambda v: scatter_rows(30, rows, v),
                  lambda v: torch.zeros(30, 5).index_put((torch.cat(rows),), torch.cat(v))):
        values = [v.clone().requires_grad_() for v in values0]
        out = place(values)
        (out * weight).sum().backward()
        results.append((out, [v.grad for v in values]))
    (out, grads), (want, want_grads) = results
    assert torch.equal(out, want) and torch.all(out[perm[26:]] == 0)
    for g, w in zip(grads, want_grads):
        assert torch.equal(g, w)

"""RecModel: a tiny model overfits a tiny batch; registering a scenario keeps every trained output."""

from __future__ import annotations

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

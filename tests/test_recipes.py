"""Recipes end to end on a tiny synthetic world: pretrain, resume, fine-tune (new scenario), evaluate, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchrec")

from recfm.errors import ConfigError, DataError, RecfmError  # noqa: E402
from recfm.foundation.data.build import build_samples  # noqa: E402
from recfm.foundation.data.synth import synth_world  # noqa: E402
from recfm.recipes import evaluate, finetune, pretrain  # noqa: E402
from recfm.recipes.finetune import CheckpointMismatch  # noqa: E402
from recfm.recipes.train import Trainer, TrainingError  # noqa: E402

FAST = ["model=tiny", "train.batch_size=16", "train.warmup_steps=2", "train.log_every=2", "train.prefetch=false"]


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    """A tiny world (4 scenarios) built once into user-level samples."""
    root = tmp_path_factory.mktemp("world")
    synth_world(root / "raw", size="tiny", seed=3, progress=False)
    build_samples(None, root / "raw" / "events", root / "raw" / "exposures", root / "samples", progress=False)
    return root / "samples"


def run_args(samples: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.samples={samples}", f"out={out}", *FAST, *extra]


@pytest.fixture(scope="module")
def pretrained(samples, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre")
    pretrain(None, run_args(samples, out, "train.steps=6", "train.ckpt_every=3"), progress=False)
    return out


def test_pretrain_writes_results_and_checkpoint(pretrained):
    results = json.loads((pretrained / "results.json").read_text())
    assert results["steps"] == 6 and results["scenarios"] == ["home_feed", "group_buy", "coupon"]
    tasks = {f"{t['scenario']}.{t['task']}": t for t in results["eval"]["tasks"]}
    assert set(tasks) <= {f"{s}.{t}" for s in ("home_feed", "group_buy", "coupon") for t in ("ctr", "ctcvr")}
    assert "home_feed.ctr" in tasks and tasks["home_feed.ctr"]["count"] > 0
    assert 0.0 < tasks["home_feed.ctr"]["oracle_auc"] <= 1.0  # the synthetic oracle was carried through
    assert sorted(p.name for p in (pretrained / "checkpoints").glob("step-*.pt")) == ["step-00000003.pt", "step-00000006.pt"]
    assert len((pretrained / "train_log.jsonl").read_text().splitlines()) == 6


def test_steady_rates_leave_out_the_first_log_window(pretrained, samples, tmp_path):
    results = json.loads((pretrained / "results.json").read_text())  # 6 steps of 16 samples, a log every 2
    total = results["samples_per_s"] * results["train_seconds"]
    steady = results["steady_samples_per_s"] * results["steady_seconds"]
    assert total == pytest.approx(6 * 16) and steady == pytest.approx(4 * 16)  # steps 3-6
    assert 0 < results["steady_seconds"] < results["train_seconds"]
    single = pretrain(None, run_args(samples, tmp_path, "train.steps=2", "train.ckpt_every=0"), progress=False)
    assert single["steady_samples_per_s"] is None and single["steady_seconds"] == 0.0  # one window only


def test_resume_after_a_crash_equals_the_uninterrupted_run(samples, tmp_path, monkeypatch):
    args = ("train.steps=8", "train.ckpt_every=4")
    whole = pretrain(None, run_args(samples, tmp_path / "a", *args), progress=False)
    losses_whole = json.loads((tmp_path / "a" / "results.json").read_text())["final_loss"]

    original = Trainer.train_step

    def crash_at_step_6(self, batch):
        if self.step == 6:
            raise KeyboardInterrupt("simulated kill")
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        pretrain(None, run_args(samples, tmp_path / "b", *args), progress=False)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").glob("step-*.pt"))[-1] == "step-00000004.pt"
    monkeypatch.setattr(Trainer, "train_step", original)
    resumed = pretrain(None, run_args(samples, tmp_path / "b", *args), progress=False)
    assert resumed["resumed_from"] == 4
    state_a = torch.load(tmp_path / "a" / "checkpoints" / "step-00000008.pt", weights_only=False)
    state_b = torch.load(tmp_path / "b" / "checkpoints" / "step-00000008.pt", weights_only=False)
    assert state_a["history"] == state_b["history"]  # the whole loss curve, steps 0..7
    assert resumed["final_loss"] == losses_whole == whole["final_loss"]
    for name, value in state_a["model"].items():
        torch.testing.assert_close(state_b["model"][name], value, rtol=0, atol=0, msg=name)


def test_finetune_registers_the_fourth_scenario_on_a_frozen_backbone(samples, pretrained, tmp_path):
    ckpt = pretrained / "checkpoints" / "step-00000006.pt"
    before = torch.load(ckpt, weights_only=False)["model"]
    out = tmp_path / "ft"
    res = finetune(None, run_args(samples, out, "train.steps=4", "finetune.scenario=hotel"), from_ckpt=ckpt, progress=False)
    assert res["registered_new_scenario"] and res["scenario"] == "hotel"
    assert [t["scenario"] for t in res["eval"]["tasks"]] == ["hotel", "hotel"]
    after = torch.load(out / "checkpoints" / "step-00000004.pt", weights_only=False)["model"]
    for name, value in before.items():
        if name.startswith(("backbone.", "embedder.sequence_mlps.", "head.expert_", "embedder.scenario_mlps.home_feed")):
            if "norm" in name and value.dim() == 2:  # Group LayerNorm tables gained the hotel row
                torch.testing.assert_close(after[name][: value.shape[0]], value, rtol=0, atol=0, msg=name)
            else:
                torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)
    assert any(k.startswith("head.towers.hotel.") for k in after)
    changed = [k for k in after if k.startswith("head.towers.hotel.") and k in before]
    assert not changed  # the hotel head did not exist before


def test_evaluate_scores_a_checkpoint(samples, pretrained, tmp_path):
    res = evaluate(None, run_args(samples, tmp_path / "ev"), ckpt=pretrained / "checkpoints", progress=False)
    assert res["scenarios"] == ["home_feed", "group_buy", "coupon"]
    written = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert json.dumps(written["eval"], sort_keys=True) == json.dumps(res["eval"], sort_keys=True)  # NaN-safe
    assert "AUC" in res.format() and "leak trap" in res.format()


def test_finetune_refuses_a_checkpoint_of_another_backbone(samples, pretrained, tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(CheckpointMismatch, match="another backbone"):
        finetune(None, run_args(samples, out, "finetune.scenario=hotel", "model=small"),
                 from_ckpt=pretrained / "checkpoints", progress=False)
    assert not out.exists()  # nothing written before the check


def test_finetune_refuses_a_checkpoint_of_other_sequences(samples, pretrained, tmp_path):
    from recfm.configs import config_path

    world = config_path("world", "default.yaml").read_text().replace("max_length: 128", "max_length: 100")
    folder = tmp_path / "w"
    (folder / "scenarios").mkdir(parents=True)
    (folder / "default.yaml").write_text(world)
    for f in config_path("world", "scenarios").glob("*.yaml"):
        (folder / "scenarios" / f.name).write_text(f.read_text())
    with pytest.raises(CheckpointMismatch, match="shared sequences"):
        finetune(None, run_args(samples, tmp_path / "out", "finetune.scenario=hotel", f"data.world={folder / 'default.yaml'}"),
                 from_ckpt=pretrained / "checkpoints", progress=False)


def test_non_finite_loss_stops_naming_step_and_scenario(samples, tmp_path, monkeypatch):
    from recfm.foundation.model.model import RecModel

    original = RecModel.forward

    def poisoned(self, batch):
        logits = original(self, batch)
        if "group_buy" in logits:
            logits["group_buy"]["ctr"] = logits["group_buy"]["ctr"] * float("nan")
        return logits

    monkeypatch.setattr(RecModel, "forward", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 0 in scenario 'group_buy' \(task 'ctr'\)"):
        pretrain(None, run_args(samples, tmp_path / "nan", "train.steps=4", "train.ckpt_every=1"), progress=False)
    assert not list((tmp_path / "nan" / "checkpoints").glob("step-*.pt"))  # no checkpoint of NaN weights


@pytest.mark.parametrize(
    ("extra", "error", "match"),
    [
        (("data.samples=does/not/exist",), ConfigError, "data.samples"),
        (("data.scenarios=[home_feed, nope]",), ConfigError, "unknown scenario 'nope'"),
        (("train.stepz=3",), ConfigError, "train.stepz: unknown key"),
        (("train.steps=0",), ConfigError, "train.steps: must be > 0"),
    ],
)
def test_bad_run_configs_fail_before_training(samples, tmp_path, extra, error, match):
    out = tmp_path / "run"
    with pytest.raises(error, match=match):
        pretrain(None, [*run_args(samples, out), *extra], progress=False)  # later overrides win
    assert not (out / "checkpoints").exists()


def test_checkpoint_from_another_run_is_not_resumed(samples, pretrained, tmp_path):
    out = tmp_path / "other"
    out.mkdir()
    (out / "checkpoints").symlink_to(pretrained / "checkpoints", target_is_directory=True)
    with pytest.raises(TrainingError, match="different run"):
        pretrain(None, run_args(samples, out, "train.steps=7", "train.ckpt_every=3"), progress=False)


def test_missing_checkpoint_is_a_clear_error(samples, tmp_path):
    with pytest.raises(RecfmError, match="checkpoint"):
        evaluate(None, run_args(samples, tmp_path / "x"), ckpt=tmp_path / "nothing.pt", progress=False)


def test_training_on_data_without_targets_is_a_clear_error(samples, tmp_path):
    with pytest.raises((TrainingError, DataError)):
        pretrain(None, run_args(samples, tmp_path / "e", "train.steps=2", "data.scenarios=[hotel]",
                                "data.eval_windows=1", "data.train_fraction=0.000001"), progress=False)

"""Data-parallel training equals one process on the union of the ranks' batches (2 gloo processes, CPU).

The ranks read token-budget batches holding different numbers of exposures; the reference is one process,
same initial weights, stepping on the concatenation of both ranks' batch of each step. Checked for

* replicated tables (flat gradient all-reduce, AdamW + torchrec RowWiseAdagrad, gradient clipping on), and
* sharded tables (``train.shard_embeddings``: torchrec DMP, table shards updated by fbgemm's fused row-wise
  Adagrad inside backward), whose checkpoint gathers the shards into full tables; then a resume of the
  sharded run from its mid-run checkpoint ends on the same weights.
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchrec")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from recfm.errors import ConfigError  # noqa: E402
from recfm.foundation.data.build import build_samples  # noqa: E402
from recfm.foundation.data.loader import SampleDataset  # noqa: E402
from recfm.foundation.data.synth import synth_world  # noqa: E402
from recfm.foundation.model.config import load_model_config  # noqa: E402
from recfm.foundation.model.model import RecModel, select_scenarios  # noqa: E402
from recfm.recipes import distributed as D  # noqa: E402
from recfm.recipes.checkpoint import load  # noqa: E402
from recfm.recipes.config import TrainConfig  # noqa: E402
from recfm.recipes.train import Trainer  # noqa: E402
from recfm.scenarios.loader import load_world  # noqa: E402

SCENARIOS = ("home_feed", "group_buy", "coupon")
STEPS = 4
BASE = TrainConfig(steps=STEPS, batch_size=64, max_tokens=700, lr=3e-3, sparse_lr=0.1, warmup_steps=1,
                   grad_clip=1.0, log_every=1, ckpt_every=2, prefetch=False, device="cpu", bf16=False)
REPLICATED = BASE
# Fused table updates are not clipped. A larger Adagrad epsilon: a table row whose gradient is float noise
# (rms ~1e-8: an event no target attends to much) would otherwise take a full normalised first step in
# whatever direction the noise points, in both runs, and the runs would differ by that noise, amplified.
SHARDED = replace(BASE, grad_clip=0.0, shard_embeddings=True, sparse_eps=1e-3)


def _model() -> RecModel:
    torch.manual_seed(0)
    return RecModel(select_scenarios(load_world(None), SCENARIOS), load_model_config("tiny"))


def _dataset(samples: Path, cfg: TrainConfig) -> SampleDataset:
    return SampleDataset(samples, load_world(None), SCENARIOS, batch_size=cfg.batch_size, max_tokens=cfg.max_tokens,
                         shuffle=True, seed=cfg.seed, prefetch=0, pin_memory=False)


class UnionData:
    """One process's data: step ``i`` is the concatenation of every rank's batch ``i`` (same collator)."""

    def __init__(self, data: SampleDataset, world_size: int):
        plans = [data.sharded(r, world_size).plan(0) for r in range(world_size)]
        self.data, self.plan = data, [np.concatenate(b) for b in zip(*plans)]

    def __iter__(self):
        return self.data._produce(self.plan, 0)

    def state_dict(self) -> dict:
        return {}


def _worker(rank: int, world_size: int, port: int, samples: str, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        root_p = Path(root)
        for name, cfg in (("replicated", REPLICATED), ("sharded", SHARDED)):
            exposures = [sum(g.size for g in b.targets.values()) for b in _dataset(Path(samples), cfg).sharded(rank, world_size)]
            data = _dataset(Path(samples), cfg).sharded(rank, world_size)
            trainer = Trainer(_model(), data, cfg, root_p / name, device=torch.device("cpu"), progress=False)
            result = trainer.fit(resume=False)
            if name == "replicated":
                torch.save({"state": trainer.model.state_dict(), "exposures": exposures, "losses": result.losses},
                           root_p / f"{name}-rank{rank}.pt")
        # resume the sharded run from its step-2 checkpoint (shards and fused Adagrad state restored)
        ckpts = root_p / "sharded" / "checkpoints"
        if rank == 0:
            (ckpts / "step-00000004.pt").rename(root_p / "sharded-final.pt")
            (ckpts / "latest").unlink()
        dist.barrier()
        data = _dataset(Path(samples), SHARDED).sharded(rank, world_size)
        trainer = Trainer(_model(), data, SHARDED, root_p / "sharded", device=torch.device("cpu"), progress=False)
        result = trainer.fit(resume=True)
        assert result.resumed_from == 2
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    synth_world(root / "raw", size="tiny", seed=1, progress=False)
    build_samples(None, root / "raw" / "events", root / "raw" / "exposures", root / "samples", progress=False)
    return root / "samples"


@pytest.fixture(scope="module")
def runs(samples, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, _free_port(), str(samples), str(root)), nprocs=2, join=True)
    return root


def _reference(samples: Path, cfg: TrainConfig, out: Path) -> dict[str, torch.Tensor]:
    trainer = Trainer(_model(), UnionData(_dataset(samples, cfg), 2), cfg, out, device=torch.device("cpu"), progress=False)
    trainer.fit(resume=False)
    return trainer.model.state_dict()


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=2e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_ranks_see_different_numbers_of_exposures(runs):
    a = torch.load(runs / "replicated-rank0.pt")["exposures"]
    b = torch.load(runs / "replicated-rank1.pt")["exposures"]
    assert len(a) == len(b) >= STEPS and a[:STEPS] != b[:STEPS]


def test_replicated_tables_equal_one_process_on_the_union(runs, samples, tmp_path):
    want = _reference(samples, REPLICATED, tmp_path)
    r0, r1 = (torch.load(runs / f"replicated-rank{r}.pt") for r in (0, 1))
    _assert_same(r0["state"], want)
    for k in want:  # the ranks hold the same weights (bitwise: same summed gradients, same updates)
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert r0["losses"] == r1["losses"]  # both log the global loss
    moved = [k for k in want if not torch.equal(want[k], _model().state_dict()[k])]
    assert any("embeddings" in k for k in moved) and any("backbone" in k for k in moved)


def test_sharded_tables_equal_one_process_on_the_union(runs, samples, tmp_path):
    want = _reference(samples, SHARDED, tmp_path)
    _assert_same(torch.load(runs / "sharded-final.pt", weights_only=False)["model"], want)


def test_sharded_run_resumes_to_the_same_weights(runs):
    final = torch.load(runs / "sharded-final.pt", weights_only=False)["model"]
    _assert_same(load(runs / "sharded" / "checkpoints" / "step-00000004.pt")["model"], final)


def test_check_sharding_names_the_key_when_fbgemm_has_no_kernels(monkeypatch):
    monkeypatch.setattr(D, "is_distributed", lambda: True)
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: False)
    with pytest.raises(ConfigError, match=r"run.yaml: train.shard_embeddings: .*CUDA kernels"):
        D.check_sharding(torch.device("cuda"), "run.yaml")


def test_sum_gradients_without_a_process_group_changes_nothing():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    extras = torch.tensor([1.5])
    assert D.sum_gradients([p], extras) is extras and torch.equal(p.grad, torch.full((3,), 2.0))

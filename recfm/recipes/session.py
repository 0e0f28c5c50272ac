"""What every recipe sets up first: config, world, device, process group, data, model.

Under ``torchrun`` (``WORLD_SIZE > 1``) a process group is started (NCCL on GPUs, gloo on CPUs); rank 0
prepares the data (synthesis, build) while the others wait, every rank then reads its own shard. Dense
gradients are summed across ranks by the trainer (:mod:`recfm.recipes.train`); evaluation and
checkpoints are written by rank 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from recfm.errors import ConfigError
from recfm.foundation.data.loader import SampleDataset
from recfm.foundation.model.config import load_model_config
from recfm.foundation.model.model import RecModel, select_scenarios
from recfm.recipes.config import RunConfig, load_run_config
from recfm.recipes.data import Split, keep_fraction, prepare_samples, split_windows
from recfm.recipes.distributed import check_sharding
from recfm.recipes.train import resolve_device
from recfm.scenarios.loader import load_world
from recfm.scenarios.spec import WorldSpec, as_dict


@dataclass
class Session:
    cfg: RunConfig
    world: WorldSpec  # the full world the data was built for
    out: Path
    device: torch.device
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def start(config: str | Path | None, overrides=()) -> Session:
    """Load and check the run config and its world, join the process group, pick the device."""
    cfg = load_run_config(config, list(overrides))
    world = load_world(cfg.resolve(cfg.data.world))
    select_scenarios(world, cfg.data.scenarios)  # unknown scenario names fail here, before any work
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and cfg.train.device in ("auto", "cuda") else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # The prefetch thread collates batches on the host: leave it a core. On 2 cores one intra-op thread
        # ran the main job 13% faster than two when idle, and up to 25x faster when other processes share
        # the cores (threads spin-waiting on each other).
        torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 2) - 1))
    if cfg.train.shard_embeddings:
        check_sharding(device, cfg.source_file)  # before any data work; a no-op without torchrun
    out = Path(cfg.out)
    return Session(cfg=cfg, world=world, out=out, device=device, rank=rank, world_size=world_size)


def samples_split(s: Session, progress: bool = True) -> Split:
    """Prepare (rank 0) and split the run's samples into training and evaluation windows."""
    if s.is_main:
        prepare_samples(s.cfg, s.world, s.out, progress=progress)
    s.barrier()
    samples = prepare_samples(s.cfg, s.world, s.out, progress=False)  # now only resolves the folder
    return split_windows(samples, s.cfg.data.eval_windows)


def train_dataset(s: Session, split: Split, scenarios: tuple[str, ...]) -> SampleDataset:
    """This rank's training batches (shuffled, seeded) of ``scenarios``."""
    t, d = s.cfg.train, s.cfg.data
    files: tuple = split.files
    windows = split.train_windows
    if d.train_fraction < 1:
        folder = s.out / f"train_{d.train_fraction:g}"
        if s.is_main:
            keep_fraction(split.files, folder, d.train_fraction, t.seed, split.train_windows)
        s.barrier()
        files, windows = (folder,), None
    data = SampleDataset(
        files, s.world, scenarios, batch_size=t.batch_size, max_tokens=t.max_tokens, shuffle=True, seed=t.seed,
        windows=windows, prefetch=2 if t.prefetch else 0,
    )
    return data.sharded(s.rank, s.world_size) if s.world_size > 1 else data


def eval_dataset(s: Session, split: Split, scenarios: tuple[str, ...]) -> SampleDataset:
    t = s.cfg.train
    return SampleDataset(split.files, s.world, scenarios, batch_size=t.batch_size, max_tokens=t.max_tokens,
                         windows=split.eval_windows, prefetch=2 if t.prefetch else 0)


def build_model(s: Session, scenarios: tuple[str, ...]) -> RecModel:
    torch.manual_seed(s.cfg.train.seed)
    model_cfg = load_model_config(s.cfg.model)
    return RecModel(select_scenarios(s.world, scenarios), model_cfg).to(s.device)


def trained_scenarios(s: Session) -> tuple[str, ...]:
    names = s.cfg.data.scenarios or s.world.scenario_names
    if not names:
        raise ConfigError([f"{s.cfg.source_file}: data.scenarios: the world {s.world.source_file} has no scenarios"])
    return tuple(n for n in s.world.scenario_names if n in names)


def run_meta(s: Session, model: RecModel) -> dict:
    """What a checkpoint records about the run that wrote it."""
    return {
        "config": {k: v for k, v in s.cfg.to_dict().items() if k != "source_file"},
        "model_config": as_dict(model.config),
        "fingerprint": model.fingerprint(),
        "scenarios": list(model.scenario_names),
        "world_file": s.world.source_file,
    }

"""The training loop shared by ``pretrain`` and ``finetune``.

One step::

    batch (host, pinned) --to(device)--> model(batch) -> per-(scenario, task) loss sums and counts
    loss = sum_t weight_t * loss_sum_t / global_count_t          global_count: summed over ranks
    backward; all-reduce(SUM) of dense gradients across ranks; clip; AdamW (dense) + row-wise Adagrad
    (embedding tables, torchrec); warm-up + decay schedule on both

Dividing each task's loss sum by its *global* exposure count and summing gradients over ranks makes a
data-parallel step equal to one process on the union of the ranks' batches, whatever each rank's share
(token-budget batches hold different numbers of exposures).

Checkpoints (:class:`~recfm.recipes.checkpoint.Checkpointer`, atomic) hold the model, both optimisers and
schedules, the data position, every RNG state, the step, the loss history, the resolved config and the
model fingerprint (backbone, sequences, scenario specs). ``fit`` resumes from the latest checkpoint of its
folder when one exists, and the run continues exactly: the loss curve after a resume equals the
uninterrupted one (tested).

A non-finite loss stops the run with :class:`TrainingError` naming the step and the scenario/task; it is
detected on the device (no host sync per step on GPU) and checked before every checkpoint, so a
checkpoint never holds weights updated by a NaN.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from recfm.errors import RecfmError
from recfm.foundation.data.batch import Batch
from recfm.foundation.data.loader import SampleDataset
from recfm.foundation.model.model import RecModel
from recfm.heads.mmoe import TaskLoss
from recfm.recipes.checkpoint import Checkpointer, rng_state, set_rng_state
from recfm.recipes.config import Schedule, TrainConfig
from recfm.recipes.distributed import ShardedTables, broadcast_module, is_distributed, shard_tables, sum_gradients


class TrainingError(RecfmError):
    """Training cannot go on (non-finite loss, no data); the last checkpoint is intact."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> this process's CUDA device when there is one, else the CPU; ``cuda`` (no index) -> this
    process's CUDA device (``LOCAL_RANK`` under torchrun, else the global rank, modulo the device count);
    anything else as ``torch.device`` reads it (``cuda:1``, ``cpu``)."""
    if name not in ("auto", "cuda"):
        return torch.device(name)
    if torch.cuda.is_available():
        rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() if dist.is_initialized() else 0))
        return torch.device("cuda", rank % torch.cuda.device_count())
    if name == "cuda":
        raise RecfmError("train.device=cuda, but torch sees no CUDA device here (use auto or cpu)")
    return torch.device("cpu")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then ``schedule`` decay to 0 at ``steps`` (a multiplier of lr)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule is Schedule.CONSTANT:
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    if cfg.schedule is Schedule.LINEAR:
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def embedding_parameters(model: RecModel) -> list[nn.Parameter]:
    """The embedding tables (torchrec collections): the row-wise optimiser's parameters."""
    return list(model.embedder.collections.parameters())


def make_optimizers(model: RecModel, cfg: TrainConfig, dense_scale: Callable[[str], float] | None = None):
    """AdamW over dense parameters (per-parameter lr scale ``dense_scale(name)``), torchrec's row-wise
    Adagrad over embedding tables. Frozen parameters (``requires_grad=False``) are left out."""
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    sparse_ids = {id(p) for p in embedding_parameters(model)}
    groups: dict[float, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in sparse_ids:
            groups.setdefault(dense_scale(name) if dense_scale else 1.0, []).append(p)
    dense = torch.optim.AdamW(
        [{"params": ps, "lr": cfg.lr * scale, "base_lr": cfg.lr * scale} for scale, ps in groups.items()],
        lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
    )
    tables = [p for p in embedding_parameters(model) if p.requires_grad]
    sparse = RowWiseAdagrad(tables, lr=cfg.sparse_lr, eps=cfg.sparse_eps) if tables else None
    if sparse is not None:
        for g in sparse.param_groups:
            g["base_lr"] = cfg.sparse_lr
    return dense, sparse


def task_keys(model: RecModel) -> list[tuple[str, str]]:
    """Every (scenario, task) the model scores, in a fixed order (indexes the non-finite-loss flags)."""
    return [(s, t.name) for s in model.scenario_names for t in model.head.tasks(s)]


def global_counts(losses: list[TaskLoss], keys: list[tuple[str, str]], device: torch.device) -> dict[tuple[str, str], float]:
    """Exposures per (scenario, task) summed over ranks (this rank's own counts without a process group)."""
    local = {(l.scenario, l.task): l.count for l in losses}
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return {k: float(v) for k, v in local.items()}
    counts = torch.tensor([float(local.get(k, 0)) for k in keys], dtype=torch.float64)
    backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    counts = counts.to(backend_device)
    dist.all_reduce(counts)
    return dict(zip(keys, counts.cpu().tolist()))


def step_loss(losses: list[TaskLoss], counts: dict[tuple[str, str], float]) -> torch.Tensor:
    """``sum_t weight_t * loss_sum_t / count_t`` over tasks with exposures anywhere (module docstring)."""
    terms = [l.weight * l.loss_sum / counts[(l.scenario, l.task)] for l in losses if counts.get((l.scenario, l.task), 0) > 0]
    if not terms:
        return torch.zeros((), requires_grad=True)
    return torch.stack([t.float() for t in terms]).sum()


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` did: the loss of every step (all steps, resumed ones included)."""

    steps: int
    losses: list[float]
    task_losses: dict[str, list[float]]
    resumed_from: int | None
    seconds: float
    samples: int
    tokens: int
    checkpoint: str | None = None
    notes: list[str] = field(default_factory=list)
    # after the first log window (compilation, autotuning, first allocations) up to the last step, before the
    # final checkpoint; 0 when the run had a single log window
    steady_seconds: float = 0.0
    steady_samples: int = 0
    steady_tokens: int = 0


class Trainer:
    """Train ``model`` on ``data`` for ``cfg.steps`` steps, checkpointing into ``out/checkpoints``.

    Args:
        model: the model (already on ``device``; parameters to keep fixed have ``requires_grad=False``).
        data: training batches (already sharded for this rank when running distributed).
        cfg: the train section of the run config.
        out: run folder (``checkpoints/``, ``train_log.jsonl``, TensorBoard ``tb/``).
        meta: JSON-able run metadata stored in every checkpoint (resolved config, fingerprint, ...).
        dense_scale: per-parameter learning-rate multiplier by name (fine-tuning's lower backbone rate).
        progress: show a progress bar (rank 0 only).
    """

    def __init__(
        self,
        model: RecModel,
        data: SampleDataset,
        cfg: TrainConfig,
        out: str | Path,
        *,
        device: torch.device,
        meta: dict | None = None,
        dense_scale: Callable[[str], float] | None = None,
        progress: bool = True,
    ):
        self.model, self.data, self.cfg, self.device = model, data, cfg, device
        self.out = Path(out)
        self.meta = meta or {}
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.progress = progress and self.rank == 0
        broadcast_module(model, device)  # every rank starts from rank 0's weights
        self.sharded: ShardedTables | None = (
            shard_tables(model, cfg.sparse_lr, cfg.sparse_eps, device) if cfg.shard_embeddings and is_distributed() else None
        )
        self.dense, self.sparse = make_optimizers(model, cfg, dense_scale)
        if self.sharded is not None:
            self.sparse = self.sharded.optimizer  # fused row-wise Adagrad on this rank's table shards
        self.optimizers = [o for o in (self.dense, self.sparse) if o is not None]
        local = {id(p) for p in self.sharded.params} if self.sharded is not None else set()
        self.trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in local]
        self.keys = task_keys(model)
        self.task_specs = {(s, t.name): t for s in model.scenario_names for t in model.head.tasks(s)}
        self.checkpointer = Checkpointer(self.out / "checkpoints", keep=2)
        self.step = 0
        self.history: list[float] = []
        self.task_history: dict[str, list[float]] = {f"{s}.{t}": [] for s, t in self.keys}
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.bf16 else contextlib.nullcontext()
        )

    # ----------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The whole training state (with sharded tables: gathered to rank 0, a collective call)."""
        model, optimizers = self.model.state_dict(), [o.state_dict() for o in self.optimizers]
        if self.sharded is not None:
            model, optimizers = self.sharded.full_state(model), self.sharded.full_state(optimizers)
        return {
            "step": self.step,
            "spec": self.meta.get("fingerprint", {}),
            "model": model,
            "optimizers": optimizers,
            "data": self.data.state_dict(),
            "rng": rng_state(),
            "history": self.history,
            "task_history": self.task_history,
            "meta": self.meta,
            "spec": self.meta.get("fingerprint", {}),
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["optimizers"]) != len(self.optimizers):
            raise TrainingError("checkpoint has a different set of optimisers (trainable parameters changed?)")
        if self.sharded is not None:
            self.sharded.load(self.model, self.optimizers, state["model"], state["optimizers"])
        else:
            self.model.load_state_dict(state["model"])
            for o, s in zip(self.optimizers, state["optimizers"]):
                o.load_state_dict(s)
        data = state["data"]
        if self.data.world_size > 1:  # ranks step together: rank 0's position is every rank's
            data = {**data, "config": {**data.get("config", {}), "rank": self.data.rank}}
        self.data.load_state_dict(data)
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.task_history = {k: list(v) for k, v in state["task_history"].items()}

    def save(self) -> Path | None:
        """Rank 0 writes the checkpoint (every rank calls: sharded tables are gathered collectively)."""
        state = self.state_dict() if self.rank == 0 or self.sharded is not None else None
        if self.rank != 0:
            return None
        return self.checkpointer.save(state, self.step)

    # ------------------------------------------------------------------------------------ loop
    def _batches(self) -> Iterator[Batch]:
        while True:
            empty = True
            for batch in self.data:
                empty = False
                yield batch
            if empty:
                raise TrainingError("the training data has no batches (no samples with exposures of the trained scenarios)")

    def _set_lr(self) -> None:
        factor = lr_factor(self.step, self.cfg)
        for o in (self.dense, None if self.sharded is not None else self.sparse):
            for g in o.param_groups if o is not None else ():
                g["lr"] = g["base_lr"] * factor
        if self.sharded is not None:
            self.sharded.set_lr(self.cfg.sparse_lr * factor)

    def train_step(self, batch: Batch) -> tuple[torch.Tensor, list[TaskLoss]]:
        """One optimisation step on ``batch`` (already on the device); returns the loss and task losses."""
        self.model.train()
        self._set_lr()  # before forward: fbgemm's fused table update reads the lr captured at forward
        with self.autocast:
            logits = self.model(batch)
            losses = self.model.losses(batch, logits)
        counts = global_counts(losses, self.keys, self.device)
        loss = step_loss(losses, counts)
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        loss.backward()
        if is_distributed():
            loss, losses = self._sum_over_ranks(loss.detach(), losses, counts)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.grad_clip)
        for o in self.optimizers:
            o.step()
        return loss.detach(), losses

    def _sum_over_ranks(self, loss, losses, counts) -> tuple[torch.Tensor, list[TaskLoss]]:
        """Sum gradients over ranks (one flat all-reduce) with the loss and the task loss sums, so every
        rank logs and checks the global values (see :mod:`recfm.recipes.distributed`)."""
        local = {(l.scenario, l.task): l.loss_sum.detach().float() for l in losses}
        zero = loss.new_zeros((), dtype=torch.float32)
        summed = sum_gradients(self.trainable, torch.stack([loss.float(), *(local.get(k, zero) for k in self.keys)]))
        out = [
            TaskLoss(s, t, self.task_specs[(s, t)].type, summed[1 + i], int(counts[(s, t)]), self.task_specs[(s, t)].weight)
            for i, (s, t) in enumerate(self.keys) if counts.get((s, t), 0) > 0
        ]
        return summed[0], out

    def fit(self, resume: bool = True) -> TrainResult:
        """Train to ``cfg.steps`` (resuming from the latest checkpoint in ``out`` when ``resume``)."""
        resumed_from = None
        latest = self.checkpointer.latest() if resume else None
        if latest is not None:
            from recfm.recipes.checkpoint import load

            state = load(latest)
            check_resumable(state.get("meta", {}), self.meta, latest)
            self.load_state_dict(state)
            resumed_from = self.step
        else:
            torch.manual_seed(self.cfg.seed)
        writer = _tensorboard(self.out / "tb") if self.rank == 0 else None
        log = _open_log(self.out / "train_log.jsonl", self.step) if self.rank == 0 else None
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="train", unit="step", disable=not self.progress, dynamic_ncols=True)
        bad = torch.full((len(self.keys),), -1, dtype=torch.long, device=self.device)  # first non-finite step per task
        pending: list[tuple[int, torch.Tensor, dict[str, torch.Tensor]]] = []
        samples = tokens = 0
        t0 = time.perf_counter()
        window_t, window_samples, window_tokens = t0, 0, 0
        steady_t = None  # the end of the first log window
        steady_samples = steady_tokens = 0
        check_every = 1 if self.device.type == "cpu" else max(1, self.cfg.log_every)
        batches = self._batches()
        try:
            while self.step < self.cfg.steps:
                batch = next(batches).to(self.device, non_blocking=True)
                loss, losses = self.train_step(batch)
                by_task = {f"{l.scenario}.{l.task}": l.mean.detach() for l in losses if l.count > 0}
                finite = torch.stack([torch.isfinite(by_task.get(f"{s}.{t}", loss.new_zeros(()))) for s, t in self.keys])
                bad = torch.where((bad < 0) & ~finite, torch.full_like(bad, self.step), bad)
                pending.append((self.step, loss, by_task))
                self.step += 1
                samples += batch.num_samples
                tokens += batch.num_tokens
                if steady_t is not None:
                    steady_samples += batch.num_samples
                    steady_tokens += batch.num_tokens
                window_samples += batch.num_samples
                window_tokens += batch.num_tokens
                bar.update(1)
                at_ckpt = self.cfg.ckpt_every > 0 and self.step % self.cfg.ckpt_every == 0
                at_log = self.step % max(1, self.cfg.log_every) == 0 or self.step == self.cfg.steps
                if self.step % check_every == 0 or at_ckpt or at_log:
                    self._raise_if_not_finite(bad)
                if at_log or at_ckpt:
                    self._flush(pending, log, writer)
                    pending = []
                    now = time.perf_counter()
                    rate = window_samples / max(now - window_t, 1e-9)
                    bar.set_postfix(loss=f"{self.history[-1]:.4f}", samples_s=f"{rate:,.0f}",
                                    tokens_s=f"{window_tokens / max(now - window_t, 1e-9):,.0f}")
                    window_t, window_samples, window_tokens = now, 0, 0
                    if steady_t is None:
                        steady_t = now
                if at_ckpt:
                    self.save()
            self._raise_if_not_finite(bad)
            steady_seconds = time.perf_counter() - steady_t if steady_samples else 0.0
            self._flush(pending, log, writer)
            path = self.save()
        finally:
            bar.close()
            if log is not None:
                log.close()
            if writer is not None:
                writer.close()
        return TrainResult(
            steps=self.step, losses=list(self.history), task_losses=self.task_history, resumed_from=resumed_from,
            seconds=time.perf_counter() - t0, samples=samples, tokens=tokens, checkpoint=str(path) if path else None,
            steady_seconds=steady_seconds, steady_samples=steady_samples, steady_tokens=steady_tokens,
        )

    def _raise_if_not_finite(self, bad: torch.Tensor) -> None:
        flags = bad.tolist()
        hits = [(step, key) for step, key in zip(flags, self.keys) if step >= 0]
        if hits:
            step, (scenario, task) = min(hits)
            kept = self.checkpointer.latest()
            raise TrainingError(
                f"non-finite loss at step {step} in scenario {scenario!r} (task {task!r}); training stopped. "
                f"Last good checkpoint: {kept if kept else 'none'}"
            )

    def _flush(self, pending, log, writer) -> None:
        for step, loss, by_task in pending:
            value = float(loss)
            self.history.append(value)
            tasks = {k: float(v) for k, v in by_task.items()}
            for k in self.task_history:
                self.task_history[k].append(tasks.get(k, float("nan")))
            if log is not None:
                log.write(json.dumps({"step": step, "loss": value, "tasks": tasks}) + "\n")
            if writer is not None:
                writer.add_scalar("loss/total", value, step)
                for k, v in tasks.items():
                    writer.add_scalar(f"loss/{k}", v, step)
        if log is not None:
            log.flush()


def check_resumable(saved: dict, now: dict, path: Path) -> None:
    """Refuse to resume a checkpoint written by a different run (config or model fingerprint differ)."""
    diffs = [k for k in ("config", "fingerprint") if k in saved and k in now and saved[k] != now[k]]
    if diffs:
        raise TrainingError(
            f"{path}: the checkpoint in this run folder was written by a different run ({', '.join(diffs)} differ); "
            "use another `out` folder or delete the old checkpoints"
        )


def _open_log(path: Path, step: int):
    """The JSONL step log, opened for appending after dropping lines of steps >= ``step`` (written after the
    checkpoint a resumed run starts from)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < step]
        path.write_text("".join(line + "\n" for line in kept))
    return path.open("a")


def _tensorboard(folder: Path):
    """A TensorBoard writer when ``tensorboard`` is installed, else ``None`` (the JSONL log is always written)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


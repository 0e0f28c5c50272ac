"""Per-scenario evaluation: AUC, GAUC (per user) and log loss of every (scenario, task), beside the oracle.

``evaluate_model`` scores a dataset with a model and gathers, per (scenario, task), the predicted
probabilities, labels, user ids and -- for synthetic worlds -- the ground-truth probability written beside
each exposure. The oracle row of the table scores the same exposures with that ground truth: what a
perfect model of the generator would reach. A model *above* its oracle has leaked information (the leak
trap of the embedded world), so :class:`EvalResult` flags it.

``evaluate`` is the ``recfm evaluate CONFIG --ckpt CKPT`` recipe: the run config's evaluation windows,
the checkpoint's model, a table on stdout and ``<out>/eval.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from recfm.foundation import metrics
from recfm.foundation.data.loader import SampleDataset
from recfm.foundation.model.model import RecModel
from recfm.scenarios.spec import TaskType

LEAK_MARGIN = 0.005  # a model this far above the oracle's AUC or GAUC is reported as a leak


@dataclass
class TaskMetrics:
    """Metrics of one (scenario, task) over ``count`` exposures; ``oracle_*`` are NaN without an oracle."""

    scenario: str
    task: str
    count: int
    positives: int
    auc: float
    gauc: float
    logloss: float
    oracle_auc: float = float("nan")
    oracle_gauc: float = float("nan")
    oracle_logloss: float = float("nan")
    mse: float = float("nan")  # regression tasks

    @property
    def beats_oracle(self) -> bool:
        return (self.auc > self.oracle_auc + LEAK_MARGIN) or (self.gauc > self.oracle_gauc + LEAK_MARGIN)


@dataclass
class EvalResult:
    tasks: list[TaskMetrics]
    samples: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"samples": self.samples, "tasks": [asdict(t) for t in self.tasks], "notes": self.notes}

    def by_key(self) -> dict[str, TaskMetrics]:
        return {f"{t.scenario}.{t.task}": t for t in self.tasks}

    def leaks(self) -> list[str]:
        return [f"{t.scenario}.{t.task}" for t in self.tasks if t.beats_oracle]

    def format(self, title: str = "evaluation") -> str:
        rows = [f"{title}: {self.samples:,} samples",
                f"{'scenario':<12} {'task':<8} {'exposures':>10} {'pos':>7} {'AUC':>7} {'oracle':>7} "
                f"{'GAUC':>7} {'oracle':>7} {'logloss':>8} {'oracle':>8}"]
        for t in self.tasks:
            rows.append(
                f"{t.scenario:<12} {t.task:<8} {t.count:>10,} {t.positives:>7,} {t.auc:>7.4f} {t.oracle_auc:>7.4f} "
                f"{t.gauc:>7.4f} {t.oracle_gauc:>7.4f} {t.logloss:>8.4f} {t.oracle_logloss:>8.4f}"
            )
        leaks = self.leaks()
        rows.append("leak trap: " + (f"BEATS THE ORACLE in {', '.join(leaks)}" if leaks else "holds (no task above its oracle)"))
        return "\n".join(rows + self.notes)


@torch.no_grad()
def evaluate_model(
    model: RecModel, data: SampleDataset, device: torch.device, max_batches: int | None = None, bf16: bool = True
) -> EvalResult:
    """Score every batch of ``data`` and compute :class:`TaskMetrics` per (scenario, task)."""
    model.eval()
    gathered: dict[tuple[str, str], dict[str, list[np.ndarray]]] = {}
    samples = 0
    autocast = device.type == "cuda" and bf16
    for i, batch in enumerate(data):
        if max_batches is not None and i >= max_batches:
            break
        batch = batch.to(device, non_blocking=True)
        samples += batch.num_samples
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(batch)
        for scenario, by_task in logits.items():
            group = batch.targets[scenario]
            for task in model.head.tasks(scenario):
                out = by_task[task.name].float()
                pred = torch.sigmoid(out) if task.type is TaskType.BINARY else out
                g = gathered.setdefault((scenario, task.name), {"pred": [], "label": [], "user": [], "oracle": []})
                g["pred"].append(pred.cpu().numpy())
                g["label"].append(group.labels[task.label].cpu().numpy())
                g["user"].append(group.user_id.cpu().numpy())
                if task.label in group.oracle:
                    g["oracle"].append(group.oracle[task.label].cpu().numpy())
    tasks = []
    for scenario in model.scenario_names:
        for task in model.head.tasks(scenario):
            g = gathered.get((scenario, task.name))
            if g is None:
                continue
            tasks.append(_task_metrics(scenario, task.name, task.type, {k: np.concatenate(v) if v else None for k, v in g.items()}))
    return EvalResult(tasks=tasks, samples=samples)


def _task_metrics(scenario: str, task: str, kind: TaskType, g: dict) -> TaskMetrics:
    y, p, users, oracle = g["label"], g["pred"], g["user"], g["oracle"]
    if kind is not TaskType.BINARY:
        return TaskMetrics(scenario, task, len(y), 0, float("nan"), float("nan"), float("nan"),
                           mse=float(np.mean((p - y) ** 2)))
    m = TaskMetrics(scenario, task, len(y), int(y.sum()), metrics.auc(y, p), metrics.gauc(y, p, users), metrics.logloss(y, p))
    if oracle is not None and len(oracle) == len(y):
        m.oracle_auc, m.oracle_gauc = metrics.auc(y, oracle), metrics.gauc(y, oracle, users)
        m.oracle_logloss = metrics.logloss(y, oracle)
    return m


class RunResults(dict):
    """A recipe's results (JSON-able dict) with the human summary the CLI prints (``format()``)."""

    def __init__(self, payload: dict, text: str):
        super().__init__(payload)
        self.text = text

    def format(self) -> str:
        return self.text


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


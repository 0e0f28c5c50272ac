"""Per-scenario multi-gate mixture-of-experts heads over the final T tokens (brief section 4).

One module serves every scenario::

    x_s: [n_s, d_model]  (final T tokens of scenario s)
      experts (shared by ALL scenarios and tasks):   e_k = SiLU(x W_k + b_k)            k = 1..E, [n_s, expert_dim]
      gate   (one per (scenario, task)):             g = softmax(x G_{s,t} + c_{s,t})   [n_s, E]
      tower  (one per (scenario, task)):             logit = MLP_{s,t}(sum_k g_k e_k)   [n_s]

The experts are shared across scenarios so that small scenarios learn from the big ones through them (as
the backbone does); the gates and towers are per (scenario, task), so adding a scenario adds only its own
gates and towers (:meth:`MMoEHead.add_scenario`). Only ``binary`` and ``regression`` tasks have towers;
``next_item`` tasks belong to :mod:`recfm.heads.retrieval`.

Losses (:meth:`MMoEHead.losses`): BCE on the logit for binary tasks, MSE on the raw output for regression
tasks, each summed over the scenario's exposures and returned with its exposure count and the task's
``weight``; :func:`weighted_mean` is one way to combine them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from recfm.errors import ConfigError, DataError, RecfmError
from recfm.foundation.data.batch import TargetGroup
from recfm.scenarios.spec import ScenarioSpec, TaskSpec, TaskType

SCORED = (TaskType.BINARY, TaskType.REGRESSION)  # the task types an MMoE tower scores


@dataclass(frozen=True)
class TaskLoss:
    """The loss of one (scenario, task) over a batch.

    Attributes:
        loss_sum: scalar tensor, per-exposure losses summed over the scenario's exposures (unweighted).
        count: number of exposures summed (a host int).
        weight: the task's ``TaskSpec.weight``.
    """

    scenario: str
    task: str
    type: TaskType
    loss_sum: torch.Tensor
    count: int
    weight: float

    @property
    def mean(self) -> torch.Tensor:
        return self.loss_sum / max(self.count, 1)


def weighted_mean(losses: Sequence[TaskLoss]) -> torch.Tensor:
    """``sum over tasks of weight * (loss_sum / count)``; tasks with no exposures contribute 0."""
    terms = [l.weight * l.mean for l in losses if l.count > 0]
    return torch.stack(terms).sum() if terms else torch.zeros(())


class TaskTower(nn.Module):
    """The gate ``[d_model -> E]`` and tower ``[expert_dim -> tower_dim -> 1]`` of one (scenario, task)."""

    def __init__(self, d_model: int, num_experts: int, expert_dim: int, tower_dim: int, dropout: float):
        super().__init__()
        self.gate = nn.Linear(d_model, num_experts)
        self.tower = nn.Sequential(nn.Linear(expert_dim, tower_dim), nn.SiLU(), nn.Dropout(dropout), nn.Linear(tower_dim, 1))

    def forward(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """``x: [n, d_model]``, ``experts: [n, E, expert_dim]`` -> ``[n]`` logits."""
        # a broadcast product and a sum over E: as a matmul this is n batched [1, E] x [E, expert_dim] products, which
        # run as tiny batched GEMMs whose backward cost ~0.3 ms per training step on an H100 (medium preset)
        mixed = (torch.softmax(self.gate(x), dim=-1).unsqueeze(-1) * experts).sum(1)
        return self.tower(mixed).squeeze(-1)


class MMoEHead(nn.Module):
    """Per-scenario MMoE heads with shared experts (module docstring).

    Args:
        scenarios: the scenarios to score; each binary/regression task gets a gate and a tower.
        d_model: width of the backbone's output tokens.
        num_experts: ``E``, shared experts.
        expert_dim: output width of each expert.
        tower_dim: hidden width of each tower.
        dropout: dropout on expert outputs and inside towers.

    Example::

        head = MMoEHead(world.scenarios, d_model=64, num_experts=4, expert_dim=32, tower_dim=16)
        logits = head({"home_feed": y[batch.targets["home_feed"].token_index]})
        losses = head.losses(logits, batch.targets)          # [TaskLoss(home_feed, ctr), ...]
    """

    def __init__(
        self,
        scenarios: Sequence[ScenarioSpec],
        d_model: int,
        num_experts: int = 4,
        expert_dim: int = 128,
        tower_dim: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.d_model, self.num_experts, self.expert_dim, self.tower_dim = d_model, num_experts, expert_dim, tower_dim
        self.dropout = nn.Dropout(dropout)
        self.expert_weight = nn.Parameter(torch.empty(num_experts, d_model, expert_dim))  # [E, d_model, expert_dim]
        self.expert_bias = nn.Parameter(torch.zeros(num_experts, expert_dim))
        bound = 1.0 / math.sqrt(d_model)  # nn.Linear's default init, per expert
        nn.init.uniform_(self.expert_weight, -bound, bound)
        nn.init.uniform_(self.expert_bias, -bound, bound)
        self.towers = nn.ModuleDict()
        self.specs: dict[str, ScenarioSpec] = {}
        for spec in scenarios:
            self.add_scenario(spec)

    def add_scenario(self, spec: ScenarioSpec) -> None:
        """Add one gate and tower per binary/regression task of ``spec``; the experts stay shared."""
        if spec.name in self.specs:
            raise ConfigError([f"{spec.source_file}: name: the head already scores a scenario called {spec.name!r}"])
        self.specs[spec.name] = spec
        self.towers[spec.name] = nn.ModuleDict(
            {t.name: TaskTower(self.d_model, self.num_experts, self.expert_dim, self.tower_dim, self.dropout.p) for t in self.tasks(spec.name)}
        )

    def tasks(self, scenario: str) -> tuple[TaskSpec, ...]:
        """The scenario's tasks that have towers, in spec order."""
        return tuple(t for t in self.specs[scenario].tasks if t.type in SCORED)

    def experts(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [n, d_model]`` -> ``[n, E, expert_dim]``, every shared expert on every token."""
        return self.dropout(F.silu(torch.einsum("nd,edk->nek", x, self.expert_weight) + self.expert_bias))

    def gates(self, scenario: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Task name -> ``[n, E]`` gate weights (softmax over experts) for scenario ``scenario``."""
        return {name: torch.softmax(t.gate(x), dim=-1) for name, t in self.towers[scenario].items()}

    def forward(self, tokens: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Scenario -> ``[n_s, d_model]`` final T tokens  =>  scenario -> task -> ``[n_s]`` logits.

        Binary tasks: a logit (apply sigmoid for a probability). Regression tasks: the prediction itself.
        """
        unknown = [s for s in tokens if s not in self.towers]
        if unknown:
            raise RecfmError(f"no head for scenario(s) {', '.join(map(repr, unknown))} (heads: {', '.join(self.towers) or 'none'})")
        out: dict[str, dict[str, torch.Tensor]] = {}
        for scenario, x in tokens.items():
            e = self.experts(x)
            out[scenario] = {name: tower(x, e) for name, tower in self.towers[scenario].items()}
        return out

    def losses(self, logits: dict[str, dict[str, torch.Tensor]], targets: dict[str, TargetGroup]) -> list[TaskLoss]:
        """One :class:`TaskLoss` per (scenario, task) in ``logits``; labels from ``targets[s].labels``."""
        out = []
        for scenario, by_task in logits.items():
            group = targets[scenario]
            for task in self.tasks(scenario):
                if task.label not in group.labels:
                    have = ", ".join(group.labels) or "none"
                    raise DataError(f"scenario {scenario!r} task {task.name!r}: the batch has no label {task.label!r} (labels: {have})")
                y = group.labels[task.label].to(by_task[task.name].dtype)
                pred = by_task[task.name]
                if task.type is TaskType.BINARY:
                    loss = F.binary_cross_entropy_with_logits(pred, y, reduction="sum")
                else:
                    loss = F.mse_loss(pred, y, reduction="sum")
                out.append(TaskLoss(scenario, task.name, task.type, loss, int(pred.shape[0]), float(task.weight)))
        return out

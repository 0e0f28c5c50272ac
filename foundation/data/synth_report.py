"""What a synthetic world contains and how good its oracle is: streaming statistics and the report table.

Statistics are gathered per written chunk (:meth:`ChunkStats.of`) and merged, so memory stays bounded at
any size. AUC is computed from histograms of the oracle's logit (``BINS`` bins over ``[-LOGIT_RANGE,
LOGIT_RANGE]``, width ~6e-4: ties inside a bin get half credit, which moves AUC by far less than 1e-3);
GAUC is exact, because a user's exposures never span two chunks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from recfm.foundation.data import schema
from recfm.foundation.metrics import gauc_parts
from recfm.scenarios.spec import WorldSpec

BINS = 1 << 16
LOGIT_RANGE = 20.0


def _logit_bins(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-9, 1 - 1e-9)
    z = np.log(p) - np.log1p(-p)
    return np.clip(((z + LOGIT_RANGE) / (2 * LOGIT_RANGE) * BINS).astype(np.int64), 0, BINS - 1)


@dataclass
class LabelStats:
    """Running sums for one (scenario, label)."""

    n: int = 0
    positives: int = 0
    sum_p: float = 0.0
    sum_logloss: float = 0.0
    gauc_num: float = 0.0
    gauc_den: float = 0.0
    hist_pos: np.ndarray = field(default_factory=lambda: np.zeros(BINS, dtype=np.int64))
    hist_neg: np.ndarray = field(default_factory=lambda: np.zeros(BINS, dtype=np.int64))

    def add(self, y: np.ndarray, p: np.ndarray, users: np.ndarray) -> None:
        self.n += len(y)
        self.positives += int(y.sum())
        self.sum_p += float(p.sum())
        pc = np.clip(p, 1e-7, 1 - 1e-7)
        self.sum_logloss += float(-np.where(y == 1, np.log(pc), np.log1p(-pc)).sum())
        num, den, _ = gauc_parts(y, p, users)
        self.gauc_num += num
        self.gauc_den += den
        bins = _logit_bins(p)
        self.hist_pos += np.bincount(bins[y == 1], minlength=BINS)
        self.hist_neg += np.bincount(bins[y == 0], minlength=BINS)

    def merge(self, other: "LabelStats") -> None:
        for k in ("n", "positives", "sum_p", "sum_logloss", "gauc_num", "gauc_den"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.hist_pos += other.hist_pos
        self.hist_neg += other.hist_neg

    def auc(self) -> float:
        n_pos, n_neg = self.hist_pos.sum(), self.hist_neg.sum()
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        below = np.cumsum(self.hist_neg) - self.hist_neg
        return float((self.hist_pos * (below + 0.5 * self.hist_neg)).sum() / (n_pos * n_neg))


@dataclass
class ChunkStats:
    """Counts of one chunk (or, after :meth:`merge`, of a whole world)."""

    users: int = 0
    events: int = 0
    events_by_action: dict[str, int] = field(default_factory=dict)
    exposures: dict[str, int] = field(default_factory=dict)  # scenario -> exposures
    scenario_users: dict[str, int] = field(default_factory=dict)
    labels: dict[tuple[str, str], LabelStats] = field(default_factory=dict)

    @staticmethod
    def of(world: WorldSpec, users: int, events: pa.Table, exposures: pa.Table) -> "ChunkStats":
        st = ChunkStats(users=users, events=events.num_rows)
        actions, counts = np.unique(events.column(schema.ACTION).to_numpy(zero_copy_only=False), return_counts=True)
        st.events_by_action = {str(a): int(c) for a, c in zip(actions, counts)}
        scen = exposures.column(schema.SCENARIO).to_numpy(zero_copy_only=False)
        user = exposures.column(schema.USER).to_numpy()
        for sc in world.scenarios:
            rows = np.flatnonzero(scen == sc.name)
            st.exposures[sc.name] = len(rows)
            st.scenario_users[sc.name] = len(np.unique(user[rows]))
            for label in sc.labels:
                y = exposures.column(label.raw_column).take(rows).to_numpy(zero_copy_only=False)
                p = exposures.column(schema.oracle_column(label.raw_column)).take(rows).to_numpy(zero_copy_only=False)
                ls = LabelStats()
                ls.add(y.astype(np.int8), p.astype(np.float64), user[rows])
                st.labels[(sc.name, label.name)] = ls
        return st

    def merge(self, other: "ChunkStats") -> None:
        self.users += other.users
        self.events += other.events
        for mine, theirs in ((self.events_by_action, other.events_by_action), (self.exposures, other.exposures),
                             (self.scenario_users, other.scenario_users)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        for key, ls in other.labels.items():
            self.labels.setdefault(key, LabelStats()).merge(ls)


@dataclass(frozen=True)
class OracleLabel:
    label: str
    tasks: tuple[str, ...]  # the scenario's tasks on this label
    rate: float  # mean label
    mean_p: float  # mean oracle probability (should match ``rate``)
    auc: float  # oracle AUC
    gauc: float  # oracle GAUC (users with both classes, weighted by exposures)
    logloss: float  # oracle log loss


@dataclass(frozen=True)
class ScenarioReport:
    name: str
    exposures: int
    users: int
    labels: tuple[OracleLabel, ...]


@dataclass(frozen=True)
class SynthReport:
    world: str
    size: str
    seed: int
    out_dir: str
    seconds: float
    users: int
    events: int
    events_by_action: dict[str, int]
    scenarios: tuple[ScenarioReport, ...]

    @property
    def exposures(self) -> int:
        return sum(s.exposures for s in self.scenarios)

    def scenario(self, name: str) -> ScenarioReport:
        return next(s for s in self.scenarios if s.name == name)

    def format(self) -> str:
        actions = ", ".join(f"{a} {n:,}" for a, n in sorted(self.events_by_action.items()))
        lines = [
            f"synthetic world {self.world!r} (size {self.size}, seed {self.seed}) -> {self.out_dir} in {self.seconds:.1f} s",
            f"{self.users:,} users, {self.exposures:,} exposures, {self.events:,} events ({actions})",
            "",
            f"{'scenario':<12}{'exposures':>11}{'users':>8}  {'label':<8}{'task':<8}{'rate':>8}{'mean p':>8}"
            f"{'oracle AUC':>12}{'GAUC':>8}{'logloss':>9}",
        ]
        for sc in self.scenarios:
            for i, lab in enumerate(sc.labels):
                head = f"{sc.name:<12}{sc.exposures:>11,}{sc.users:>8,}" if i == 0 else " " * 31
                lines.append(
                    f"{head}  {lab.label:<8}{'/'.join(lab.tasks) or '-':<8}{lab.rate:>8.4f}{lab.mean_p:>8.4f}"
                    f"{lab.auc:>12.4f}{lab.gauc:>8.4f}{lab.logloss:>9.4f}"
                )
        sizes = [s.exposures for s in self.scenarios if s.exposures > 0]
        if sizes:
            lines.append(f"\ntraffic: largest / sparsest scenario = {max(sizes) / min(sizes):.1f}x")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["exposures"] = self.exposures
        return d

    def write_json(self, path: str | Path) -> None:
        text = json.dumps(self.to_dict(), indent=2, allow_nan=True)
        Path(path).write_text(text + "\n", encoding="utf-8")


def build_report(world: WorldSpec, stats: ChunkStats, *, size: str, seed: int, out_dir: str, seconds: float) -> SynthReport:
    scenarios = []
    for sc in world.scenarios:
        labels = []
        for label in sc.labels:
            ls = stats.labels.get((sc.name, label.name), LabelStats())
            n = max(ls.n, 1)
            tasks = tuple(t.name for t in sc.tasks if t.label == label.name)
            gauc = ls.gauc_num / ls.gauc_den if ls.gauc_den > 0 else float("nan")
            labels.append(OracleLabel(label.name, tasks, ls.positives / n, ls.sum_p / n, ls.auc(), gauc, ls.sum_logloss / n))
        scenarios.append(ScenarioReport(sc.name, stats.exposures.get(sc.name, 0), stats.scenario_users.get(sc.name, 0), tuple(labels)))
    return SynthReport(
        world=world.name, size=size, seed=seed, out_dir=out_dir, seconds=seconds, users=stats.users,
        events=stats.events, events_by_action=dict(stats.events_by_action), scenarios=tuple(scenarios),
    )

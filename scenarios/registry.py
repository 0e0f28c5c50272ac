"""The scenario registry: the scenarios of a world, in order, looked up by name; and the CLI's helpers.

A registry is built from an explicit list (a :class:`WorldSpec` or scenario files), never by globbing a
folder or by import side effects. Registering a new business line returns a *new* registry::

    reg = Registry.from_world(load_world("world.yaml"))
    reg = reg.with_scenario(load_scenario("coupons.yaml"))   # ConfigError if the name is taken
    reg.index("coupons")                                     # -> scenario id used in samples and heads
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import yaml

from recfm.errors import ConfigError, RecfmError
from recfm.scenarios import loader, strict
from recfm.scenarios.spec import ScenarioSpec, WorldSpec, as_dict


@dataclasses.dataclass(frozen=True)
class Registry:
    """The scenarios of ``world`` in registry order; a scenario's index is its id in samples and heads."""

    world: WorldSpec

    @classmethod
    def from_world(cls, world: WorldSpec) -> Registry:
        """A registry over an (already checked) world."""
        return cls(world)

    @classmethod
    def from_files(cls, paths: Sequence[str | Path], *, world: WorldSpec | None = None) -> Registry:
        """Scenario files in the given order, registered on ``world`` (default: a world without sequences).

        Every file is loaded and checked, and names and shared tables are checked across all of them,
        before one ConfigError is raised.
        """
        base = world or WorldSpec(name="scenarios", sequences=(), scenarios=())
        problems: list[str] = []
        specs = tuple(s for s in (loader.read_scenario(p, problems) for p in paths) if s is not None)
        everything = base.scenarios + specs
        loader.check_shared(base.sequences, everything, base.source_file, problems)
        if problems:
            raise ConfigError(problems)
        return cls(dataclasses.replace(base, scenarios=everything))

    @property
    def names(self) -> tuple[str, ...]:
        return self.world.scenario_names

    @property
    def scenarios(self) -> tuple[ScenarioSpec, ...]:
        return self.world.scenarios

    def __len__(self) -> int:
        return len(self.world.scenarios)

    def __iter__(self) -> Iterator[ScenarioSpec]:
        return iter(self.world.scenarios)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def get(self, name: str) -> ScenarioSpec:
        """The scenario called ``name``; RecfmError naming the known ones otherwise."""
        return self.world.scenarios[self.index(name)]

    def index(self, name: str) -> int:
        """Position of scenario ``name`` in registry order (its scenario id)."""
        if name not in self.names:
            known = ", ".join(self.names) or "none"
            raise RecfmError(f"{self.world.source_file}: unknown scenario {name!r} (known: {known})")
        return self.names.index(name)

    def with_scenario(self, spec: ScenarioSpec) -> Registry:
        """A new registry with ``spec`` appended; ConfigError if it breaks a rule or its name is taken."""
        problems: list[str] = []
        loader.check_scenario(spec, problems)
        loader.check_shared(self.world.sequences, self.world.scenarios + (spec,), self.world.source_file, problems)
        if problems:
            raise ConfigError(problems)
        return Registry(dataclasses.replace(self.world, scenarios=self.world.scenarios + (spec,)))


# ---------------------------------------------------------------------------------- embedding tables


class EmbeddingTable(NamedTuple):
    """One embedding table of a world: rows, width, and the features reading it (first-seen order)."""

    num_embeddings: int
    dim: int
    feature_names: tuple[str, ...]


def embedding_tables(world: WorldSpec) -> dict[str, EmbeddingTable]:
    """Every embedding table of a world by name: sequence fields first, then scenarios in order.

    Features naming the same ``table`` share it (e.g. the item id of every scenario and of the click
    sequence). Model code turns each entry into one torchrec ``EmbeddingConfig``. ConfigError if two
    users of one table disagree on rows or dim (a loaded world never does).
    """
    problems: list[str] = []
    loader.check_shared(world.sequences, world.scenarios, world.source_file, problems)
    if problems:
        raise ConfigError(problems)
    tables: dict[str, EmbeddingTable] = {}
    for use in loader.table_uses(world.sequences, world.scenarios, world.source_file):
        t = tables.setdefault(use.table, EmbeddingTable(use.rows, use.dim, ()))
        if use.feature.name not in t.feature_names:
            tables[use.table] = t._replace(feature_names=t.feature_names + (use.feature.name,))
    return tables


# --------------------------------------------------------------------------------------- CLI helpers


def load_world(path: str | Path | None) -> WorldSpec:
    """The world at ``path`` (None: the embedded world)."""
    return loader.load_world(path)


def format_list(world: WorldSpec) -> str:
    """A table of the world's scenarios: name, number of features, labels, tasks, fingerprint."""
    header = ("scenario", "features", "labels", "tasks", "fingerprint")
    rows = [
        (s.name, str(len(s.features)), ",".join(x.name for x in s.labels), ",".join(t.name for t in s.tasks), s.fingerprint())
        for s in world.scenarios
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join([f"world {world.name} ({world.source_file}): {_n(rows, 'scenario')}", *lines])


def format_show(world: WorldSpec, names: Sequence[str]) -> str:
    """The named scenarios as YAML documents (the resolved spec, defaults filled in)."""
    reg = Registry.from_world(world)
    docs = []
    for name in names:
        spec = reg.get(name)
        body = yaml.safe_dump(as_dict(spec), sort_keys=False, default_flow_style=None)
        docs.append(f"# {spec.source_file} (fingerprint {spec.fingerprint()})\n{body}")
    return "---\n".join(docs).rstrip("\n")


def validate_files(paths: Sequence[str | Path]) -> str:
    """Strictly load each file (a world or a scenario, told apart by its keys); "OK: ..." if all pass.

    Scenario files given on their own are also checked together, and against each world given (as if
    registered on it), for clashing names and shared tables. Raises one ConfigError for all files.
    """
    problems: list[str] = []
    worlds: list[WorldSpec] = []
    loose: list[ScenarioSpec] = []
    lines: list[str] = []
    for path in paths:
        file = str(path)
        data, yaml_problems = strict.load_yaml(path)
        problems.extend(yaml_problems)
        if data is None:
            continue
        kind = _kind_of(data)
        if kind is None:
            problems.append(f"{file}: not a world file (needs 'scenarios') nor a scenario file (needs 'features')")
            continue
        before = len(problems)
        if kind == "world":
            world = loader.read_world(path, problems)
            if world is not None and len(problems) == before:
                worlds.append(world)
                lines.append(f"  {file}: world {world.name!r}, {_n(world.sequences, 'sequence')}, "
                             f"{_n(world.scenarios, 'scenario')} ({', '.join(world.scenario_names)})")
        else:
            spec = loader.read_scenario(path, problems)
            if spec is not None and len(problems) == before:
                loose.append(spec)
                lines.append(f"  {file}: scenario {spec.name!r}, {_n(spec.features, 'feature')}, "
                             f"{_n(spec.tasks, 'task')}, fingerprint {spec.fingerprint()}")
    loader.check_shared((), tuple(loose), "", problems)
    for world in worlds:
        own = {os.path.normpath(s.source_file) for s in world.scenarios}
        extra = tuple(s for s in loose if os.path.normpath(s.source_file) not in own)
        if extra:
            loader.check_shared(world.sequences, world.scenarios + extra, world.source_file, problems)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))  # a clash may be seen from two worlds
    return "\n".join([f"OK: {_n(lines, 'file')} valid", *lines])


def _n(items, word: str) -> str:
    return f"{len(items)} {word}{'s' if len(items) != 1 else ''}"


def _kind_of(data) -> str | None:
    if not isinstance(data, dict):
        return None
    if "features" in data:
        return "scenario"
    if "scenarios" in data or "sequences" in data:
        return "world"
    return None

"""Load world and scenario YAML into specs, checking every rule and reporting all problems at once.

Reading a world is a checklist:

1. the world file parses into :class:`WorldSpec` (:mod:`recfm.scenarios.strict`: keys, types, enums);
2. the world's own rules hold (:func:`check_world`: names, window, sequences and their fields);
3. its ``scenarios:`` list names existing files, each once;
4. each scenario file parses and follows the scenario rules (:func:`check_scenario`);
5. what scenarios share is consistent (:func:`check_shared`): unique scenario names, and every embedding
   table (same ``table`` name anywhere: scenario features and sequence fields) has one size and one dim.

Problems from all files are collected, then raised as one :class:`recfm.errors.ConfigError`; each is
``file: key.path: message`` with ``file`` as given (scenario files: joined to the world file's folder).
Relative vocabulary paths are resolved against the YAML file that names them.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import NamedTuple

from recfm.errors import ConfigError
from recfm.scenarios import strict
from recfm.scenarios.spec import (
    FeatureSpec,
    FeatureType,
    LabelType,
    NumericTransform,
    ScenarioSpec,
    SequenceSpec,
    Source,
    TaskType,
    VocabKind,
    WorldSpec,
    resolve_path,
)
from recfm.scenarios.strict import problem

NAME = re.compile(r"^[a-z][a-z0-9_]*$")
EMBEDDED = "embedded features (categorical, bucketized numeric)"
_MISSING = object()


# ------------------------------------------------------------------------------------ public loaders


def load_scenario(path: str | Path) -> ScenarioSpec:
    """One scenario file on its own (its tables are checked against each other only)."""
    problems: list[str] = []
    spec = read_scenario(path, problems)
    if spec is not None:
        check_shared((), (spec,), "", problems)
    if problems:
        raise ConfigError(problems)
    assert spec is not None
    return spec


def load_world(path: str | Path | None = None) -> WorldSpec:
    """A world file and every scenario file it lists; None loads the embedded world."""
    if path is None:
        from recfm.configs import config_path

        path = config_path("world", "default.yaml")
    problems: list[str] = []
    world = read_world(path, problems)
    if problems:
        raise ConfigError(problems)
    assert world is not None
    return world


def read_scenario(path: str | Path, problems: list[str]) -> ScenarioSpec | None:
    """Parse and check one scenario file, appending problems; None when it could not be parsed.

    The spec is returned even when a semantic rule fails (so cross-file checks can still run on it).
    """
    file = str(path)
    data, yaml_problems = strict.load_yaml(path)
    problems.extend(yaml_problems)
    if data is None:
        return None
    spec = strict.parse(ScenarioSpec, data, file=file, path="", problems=problems, given={"source_file": file})
    if spec is None:
        return None
    spec = dataclasses.replace(spec, features=tuple(_resolve_vocab(f, file) for f in spec.features))
    check_scenario(spec, problems)
    return spec


def read_world(path: str | Path, problems: list[str]) -> WorldSpec | None:
    """Parse and check a world file and its scenario files, appending problems; None if unparsable."""
    file = str(path)
    data, yaml_problems = strict.load_yaml(path)
    problems.extend(yaml_problems)
    if data is None:
        return None
    if not isinstance(data, dict):
        problem(problems, file, "", f"expected a mapping, got {strict.show(data)}")
        return None
    data = dict(data)
    listed = data.pop("scenarios", _MISSING)  # file names here; the spec's field holds the loaded specs

    # 1-2. the world file itself
    world = strict.parse(WorldSpec, data, file=file, path="", problems=problems, given={"scenarios": (), "source_file": file})
    if world is not None:
        sequences = tuple(
            dataclasses.replace(s, fields=tuple(_resolve_vocab(f, file) for f in s.fields)) for s in world.sequences
        )
        world = dataclasses.replace(world, sequences=sequences)
        check_world(world, problems)

    # 3. the scenario list
    files = _scenario_files(listed, file, problems)

    # 4. each scenario file
    scenarios = tuple(s for s in (read_scenario(p, problems) for p in files) if s is not None)

    # 5. what they share
    check_shared(world.sequences if world else (), scenarios, file, problems)
    return dataclasses.replace(world, scenarios=scenarios) if world is not None else None


# ---------------------------------------------------------------------------------------- the rules


def check_world(world: WorldSpec, problems: list[str]) -> None:
    """World-level rules (not its scenarios): names, window, real-time and sequence settings."""
    file = world.source_file
    _check_name(world.name, file, "name", problems)
    if world.window_seconds <= 0:
        problem(problems, file, "window_seconds", f"must be > 0, got {world.window_seconds}")
    if world.realtime.max_length <= 0:
        problem(problems, file, "realtime.max_length", f"must be > 0, got {world.realtime.max_length}")
    _check_unique([s.name for s in world.sequences], "sequences", "sequence", file, problems)
    owner: dict[str, int] = {}  # action -> index of the sequence that claims it
    for i, seq in enumerate(world.sequences):
        _check_sequence(seq, file, f"sequences[{i}]", problems)
        for action in seq.actions:
            if owner.setdefault(action, i) != i:
                j = owner[action]
                problem(
                    problems, file, f"sequences[{i}].actions",
                    f"action {action!r} also belongs to sequences[{j}] ({world.sequences[j].name})",
                )


def _check_sequence(seq: SequenceSpec, file: str, path: str, problems: list[str]) -> None:
    _check_name(seq.name, file, f"{path}.name", problems)
    if not seq.actions:
        problem(problems, file, f"{path}.actions", "a sequence needs at least one action")
    if seq.max_length <= 0:
        problem(problems, file, f"{path}.max_length", f"must be > 0, got {seq.max_length}")
    if not seq.fields:
        problem(problems, file, f"{path}.fields", "a sequence needs at least one field")
    _check_unique([f.name for f in seq.fields], f"{path}.fields", "field", file, problems)
    for i, feat in enumerate(seq.fields):
        check_feature(feat, file, f"{path}.fields[{i}]", problems)


def check_scenario(spec: ScenarioSpec, problems: list[str]) -> None:
    """Rules of one scenario: names, features, labels, tasks (not its tables against other files)."""
    file = spec.source_file
    _check_name(spec.name, file, "name", problems)
    if not spec.features:
        problem(problems, file, "features", "a scenario needs at least one feature")
    _check_unique([f.name for f in spec.features], "features", "feature", file, problems)
    for i, feat in enumerate(spec.features):
        check_feature(feat, file, f"features[{i}]", problems)
    _check_unique([x.name for x in spec.labels], "labels", "label", file, problems)
    for i, label in enumerate(spec.labels):
        _check_name(label.name, file, f"labels[{i}].name", problems)
    if not spec.tasks:
        problem(problems, file, "tasks", "a scenario needs at least one task")
    _check_unique([t.name for t in spec.tasks], "tasks", "task", file, problems)
    labels = {x.name: x for x in spec.labels}
    features = {f.name: f for f in spec.features}
    for i, task in enumerate(spec.tasks):
        path = f"tasks[{i}]"
        _check_name(task.name, file, f"{path}.name", problems)
        if task.weight < 0:
            problem(problems, file, f"{path}.weight", f"must be >= 0, got {task.weight:g}")
        if task.type is TaskType.NEXT_ITEM:
            feat = features.get(task.label)
            if feat is None:
                problem(problems, file, f"{path}.label", f"no feature named {task.label!r} (a next_item task names a categorical item feature)")
            elif feat.type is not FeatureType.CATEGORICAL or feat.source is not Source.ITEM:
                problem(problems, file, f"{path}.label", f"a next_item task needs a categorical item feature, {feat.name!r} is a {feat.type.value} {feat.source.value} feature")
        elif task.label not in labels:
            known = ", ".join(labels) or "none"
            problem(problems, file, f"{path}.label", f"no label named {task.label!r} (labels: {known})")
        elif task.type is TaskType.BINARY and labels[task.label].type is LabelType.REGRESSION:
            problem(problems, file, f"{path}.type", f"a binary task needs a binary label, {task.label!r} is regression")


def check_feature(feat: FeatureSpec, file: str, path: str, problems: list[str]) -> None:
    """Rules of one feature (a scenario feature or a sequence field) at key ``path``."""
    _check_name(feat.name, file, f"{path}.name", problems)
    numeric = feat.type is FeatureType.NUMERIC
    # vocabulary: categorical only
    if feat.type is FeatureType.CATEGORICAL and feat.vocab is None:
        problem(problems, file, f"{path}.vocab", "required for categorical features")
    elif feat.type is not FeatureType.CATEGORICAL and feat.vocab is not None:
        problem(problems, file, f"{path}.vocab", "only categorical features have a vocab")
    elif feat.vocab is not None:
        vocab = feat.vocab
        if vocab.size <= 0:
            problem(problems, file, f"{path}.vocab.size", f"must be > 0, got {vocab.size}")
        if vocab.kind is VocabKind.FILE and vocab.path is None:
            problem(problems, file, f"{path}.vocab.path", "required when vocab.kind is file")
        elif vocab.kind is VocabKind.FILE and not Path(vocab.path).is_file():
            problem(problems, file, f"{path}.vocab.path", f"file not found: {vocab.path}")
        elif vocab.kind is not VocabKind.FILE and vocab.path is not None:
            problem(problems, file, f"{path}.vocab.path", "only file vocabularies have a path")
    # embedding table: embedded features only
    if feat.is_embedded and feat.dim is None:
        problem(problems, file, f"{path}.dim", f"required for {EMBEDDED}")
    elif feat.is_embedded and feat.dim <= 0:
        problem(problems, file, f"{path}.dim", f"must be > 0, got {feat.dim}")
    elif not feat.is_embedded and feat.dim is not None:
        problem(problems, file, f"{path}.dim", f"only {EMBEDDED} have a dim")
    if not feat.is_embedded and feat.table is not None:
        problem(problems, file, f"{path}.table", f"only {EMBEDDED} have a table")
    # numeric transforms
    if not numeric and feat.transform is not NumericTransform.NONE:
        problem(problems, file, f"{path}.transform", "only numeric features have a transform")
    if feat.std <= 0:
        problem(problems, file, f"{path}.std", f"must be > 0, got {feat.std:g}")
    bucketize = numeric and feat.transform is NumericTransform.BUCKETIZE
    if bucketize and not _strictly_increasing(feat.boundaries):
        problem(problems, file, f"{path}.boundaries", "bucketize needs a non-empty, strictly increasing list")
    elif not bucketize and feat.boundaries:
        problem(problems, file, f"{path}.boundaries", "only bucketize transforms have boundaries")
    # dense vectors
    if feat.type is FeatureType.DENSE and feat.length is None:
        problem(problems, file, f"{path}.length", "required for dense features")
    elif feat.type is FeatureType.DENSE and feat.length <= 0:
        problem(problems, file, f"{path}.length", f"must be > 0, got {feat.length}")
    elif feat.type is not FeatureType.DENSE and feat.length is not None:
        problem(problems, file, f"{path}.length", "only dense features have a length")


def check_shared(
    sequences: tuple[SequenceSpec, ...], scenarios: tuple[ScenarioSpec, ...], world_file: str, problems: list[str]
) -> None:
    """Across files: scenario names are unique, and each embedding table has one size and one dim."""
    first: dict[str, ScenarioSpec] = {}
    for spec in scenarios:
        other = first.setdefault(spec.name, spec)
        if other is not spec:
            problem(problems, spec.source_file, "name", f"scenario {spec.name!r} is also defined in {other.source_file}")
    defined: dict[str, TableUse] = {}
    for use in table_uses(sequences, scenarios, world_file):
        ref = defined.setdefault(use.table, use)
        where = f"{ref.file}: {ref.path}"
        if use.rows != ref.rows:
            key = "vocab.size" if use.feature.type is FeatureType.CATEGORICAL else "boundaries"
            problem(problems, use.file, f"{use.path}.{key}", f"table {use.table!r} has {ref.rows} rows ({where}), got {use.rows}")
        if use.dim != ref.dim:
            problem(problems, use.file, f"{use.path}.dim", f"table {use.table!r} has dim {ref.dim} ({where}), got {use.dim}")


class TableUse(NamedTuple):
    """One feature reading an embedding table, and where it was declared."""

    table: str
    rows: int
    dim: int
    feature: FeatureSpec
    file: str
    path: str


def table_uses(
    sequences: tuple[SequenceSpec, ...], scenarios: tuple[ScenarioSpec, ...], world_file: str
) -> list[TableUse]:
    """Every embedded feature with a complete table definition: sequence fields first, then scenarios."""
    located = [
        (f, world_file, f"sequences[{i}].fields[{j}]") for i, s in enumerate(sequences) for j, f in enumerate(s.fields)
    ] + [(f, s.source_file, f"features[{j}]") for s in scenarios for j, f in enumerate(s.features)]
    uses = []
    for feat, file, path in located:
        complete = feat.dim is not None and (feat.type is not FeatureType.CATEGORICAL or feat.vocab is not None)
        if feat.is_embedded and complete:
            uses.append(TableUse(feat.table_name, feat.num_embeddings, feat.dim, feat, file, path))
    return uses


# ------------------------------------------------------------------------------------------ helpers


def _scenario_files(listed, file: str, problems: list[str]) -> list[str]:
    """The world's ``scenarios:`` entries as paths next to the world file: each existing, each once."""
    if listed is _MISSING:
        problem(problems, file, "scenarios", "missing required key")
        return []
    entries = strict.parse_value(tuple[str, ...], listed, file=file, path="scenarios", problems=problems)
    if entries is None:
        return []
    if not entries:
        problem(problems, file, "scenarios", "a world needs at least one scenario file")
    seen: dict[str, int] = {}
    files = []
    for i, entry in enumerate(entries):
        path = os.path.normpath(resolve_path(file, entry))
        if path in seen:
            problem(problems, file, f"scenarios[{i}]", f"{entry!r} is listed twice (also scenarios[{seen[path]}])")
            continue
        seen[path] = i
        if not Path(path).is_file():
            problem(problems, file, f"scenarios[{i}]", f"file not found: {path}")
            continue
        files.append(path)
    return files


def _resolve_vocab(feat: FeatureSpec, file: str) -> FeatureSpec:
    """The feature with a relative vocabulary path made relative to the YAML file's folder."""
    if feat.vocab is None or feat.vocab.path is None:
        return feat
    path = os.path.normpath(resolve_path(file, feat.vocab.path))
    return dataclasses.replace(feat, vocab=dataclasses.replace(feat.vocab, path=path))


def _check_name(name: str, file: str, path: str, problems: list[str]) -> None:
    if not NAME.match(name):
        problem(problems, file, path, f"{name!r} is not a name (lowercase letter, then lowercase letters, digits or _)")


def _check_unique(names: list[str], list_path: str, what: str, file: str, problems: list[str]) -> None:
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        j = first.setdefault(name, i)
        if j != i:
            problem(problems, file, f"{list_path}[{i}].name", f"duplicate {what} name {name!r} (also {list_path}[{j}])")


def _strictly_increasing(values: tuple[float, ...]) -> bool:
    return len(values) > 0 and all(a < b for a, b in zip(values, values[1:]))

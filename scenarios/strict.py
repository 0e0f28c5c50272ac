"""Strict YAML -> frozen dataclass parsing that reports every problem at once.

Generic on purpose: scenario and world files use it, and so can any other config made of frozen
dataclasses. The supported field types are ``str``, ``int``, ``float``, ``bool``, enums, ``Literal[...]``,
``tuple[X, ...]``, ``dict[str, X]``, ``X | None`` and nested dataclasses. Fields with a default are
optional; fields without one are required.

Problems are strings ``file: path.to.key: message`` (list items as ``features[3].vocab.size``), appended
to a caller's list, so one pass over several files collects them all::

    problems: list[str] = []
    data, problems = load_yaml("home_feed.yaml")
    spec = parse(ScenarioSpec, data, file="home_feed.yaml", path="", problems=problems,
                 given={"source_file": "home_feed.yaml"})
    if problems:
        raise ConfigError(problems)

Rules: unknown keys are errors (with a "did you mean" suggestion); ``true`` is not an integer; an integer
is accepted where a float is expected (and converted); ``null`` is only accepted for ``X | None``. A
:class:`~recfm.errors.ConfigError` raised by a dataclass's own ``__post_init__`` checks does not escape:
its problems join the list, prefixed with the file and the dataclass's key path (see ``_post_init_problem``).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from recfm.errors import ConfigError

# ----------------------------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """A safe loader that records duplicate mapping keys (PyYAML silently keeps the last one)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable):
                if key in seen:
                    line = key_node.start_mark.line + 1
                    self.duplicates.append(f"line {line}: duplicate key {show(key)}")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> tuple[Any, list[str]]:
    """Read one YAML document. Returns ``(data, problems)``; ``data`` is None when it could not be read.

    Problems name the file as given: ``path: file not found``, ``path: line 3, column 7: <syntax error>``,
    ``path: line 5: duplicate key 'dim'``, ``path: file is empty``.
    """
    file = str(path)
    p = Path(path)
    if not p.is_file():
        return None, [f"{file}: file not found" if not p.exists() else f"{file}: not a file"]
    text = p.read_text(encoding="utf-8")
    loader = _StrictLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        return None, [f"{file}: {_syntax_message(e)}"]
    except yaml.YAMLError as e:
        return None, [f"{file}: {e}"]
    finally:
        loader.dispose()
    problems = [f"{file}: {d}" for d in loader.duplicates]
    if data is None:
        problems.append(f"{file}: file is empty")
    return (None if problems else data), problems


def _syntax_message(e: yaml.MarkedYAMLError) -> str:
    """``line L, column C: <problem> (<context> at line L')`` with 1-based positions."""
    def at(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    mark = e.problem_mark or e.context_mark
    text = f"{at(mark)}: {e.problem or e.context}" if mark is not None else str(e.problem or e.context)
    if e.context and e.problem:
        started = f" at {at(e.context_mark)}" if e.context_mark is not None else ""
        text += f" ({e.context}{started})"
    return text


# ------------------------------------------------------------------------------------------ parsing


def problem(problems: list[str], file: str, path: str, message: str) -> None:
    """Append ``file: path: message`` (or ``file: message`` for the document root)."""
    problems.append(f"{file}: {path}: {message}" if path else f"{file}: {message}")


def show(value: Any) -> str:
    """A value as the user wrote it in YAML, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return str(value)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(tp: Any) -> str:
    if tp is str:
        return "a string"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict:
        return "a mapping"
    if typing.get_origin(tp) in (tuple, list):
        return "a list"
    return getattr(tp, "__name__", str(tp))


def parse(cls: type, data: Any, *, file: str, path: str, problems: list[str], given: dict | None = None):
    """Build dataclass ``cls`` from YAML ``data``; returns None (with problems appended) on any mistake.

    ``given`` supplies field values that do not come from the file (e.g. ``source_file``); the file may
    not set them. ``path`` is the key path of ``data`` inside the file ("" for the root).
    """
    given = given or {}
    if not isinstance(data, dict):
        problem(problems, file, path, f"expected a mapping, got {show(data)}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in given}
    before = len(problems)
    values: dict[str, Any] = dict(given)
    for key, raw in data.items():
        key_path = _join(path, str(key))
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            known = "" if close else f" (known keys: {', '.join(fields)})"
            problem(problems, file, key_path, f"unknown key{hint}{known}")
            continue
        values[key] = parse_value(hints[key], raw, file=file, path=key_path, problems=problems)
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in data:
            problem(problems, file, _join(path, name), "missing required key")
    if len(problems) > before:
        return None
    try:
        return cls(**values)
    except ConfigError as e:  # the dataclass's own __post_init__ checks: folded in, with file and key path
        problems.extend(_post_init_problem(e_problem, cls, file, path) for e_problem in e.problems)
        return None


def _post_init_problem(message: str, cls: type, file: str, path: str) -> str:
    """``file: path.key: message`` for one problem raised by ``cls.__post_init__``.

    The dataclass names the key either relative to itself (``num_blocks: ...``) or behind its own label
    (``backbone.num_blocks: ...``, ``hstu.d_model: ...``); the label is replaced by ``path``, the key path
    where the dataclass sits in the file. A message that names no field of ``cls`` is kept whole.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    key, sep, rest = message.partition(": ")
    parts = key.split(".")
    if sep and " " not in key:
        if parts[0].split("[")[0] in names:
            return f"{file}: {_join(path, key)}: {rest}"
        if len(parts) > 1 and parts[1].split("[")[0] in names:
            return f"{file}: {_join(path, '.'.join(parts[1:]))}: {rest}"
    return f"{file}: {path}: {message}" if path else f"{file}: {message}"


def parse_value(tp: Any, value: Any, *, file: str, path: str, problems: list[str]):
    """Check and convert one YAML value against type ``tp``; returns None after appending a problem."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"strict.parse supports only `X | None` unions, not {tp}")
        return parse_value(rest[0], value, file=file, path=path, problems=problems)
    if origin is typing.Literal:
        if value in args and not isinstance(value, bool):
            return value
        allowed = ", ".join(show(a) for a in args)
        problem(problems, file, path, f"{show(value)} is not one of: {allowed}")
        return None
    if origin in (tuple, list):
        if not isinstance(value, list):
            problem(problems, file, path, f"expected a list, got {show(value)}")
            return None
        if origin is tuple and (len(args) != 2 or args[1] is not Ellipsis):
            raise TypeError(f"strict.parse supports only tuple[X, ...], not {tp}")
        item_tp = args[0] if args else Any
        before = len(problems)
        items = [parse_value(item_tp, v, file=file, path=f"{path}[{i}]", problems=problems) for i, v in enumerate(value)]
        return None if len(problems) > before else origin(items)
    if origin is dict:
        if not isinstance(value, dict):
            problem(problems, file, path, f"expected a mapping, got {show(value)}")
            return None
        before = len(problems)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                problem(problems, file, path, f"keys must be strings, got {show(k)}")
                continue
            out[k] = parse_value(args[1], v, file=file, path=_join(path, k), problems=problems)
        return None if len(problems) > before else out
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, file=file, path=path, problems=problems)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member.value and not isinstance(value, bool):
                return member
        allowed = ", ".join(str(m.value) for m in tp)
        problem(problems, file, path, f"{show(value)} is not one of: {allowed}")
        return None
    if tp is Any:
        return value
    if tp in (str, int, bool):
        if type(value) is tp:  # exact: `true` is not an integer, `1` is not a string
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    else:
        raise TypeError(f"strict.parse does not support field type {tp!r}")
    problem(problems, file, path, f"expected {_describe(tp)}, got {show(value)}")
    return None

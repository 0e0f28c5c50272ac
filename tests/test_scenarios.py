"""Strict loading of world/scenario YAML, the registry and `recfm scenarios ...`.

Bad fixtures live in tests/fixtures/configs/bad; each test asserts the exact problem strings, with file
paths relative to tests/fixtures/configs (the tests chdir there and load with relative paths).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Literal

import pytest
import yaml

from recfm import cli
from recfm.errors import ConfigError, RecfmError
from recfm.scenarios import loader, registry, strict
from recfm.scenarios.registry import EmbeddingTable, Registry
from recfm.scenarios.spec import FeatureType, Keep, Source, TaskType, VocabKind

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "configs"
NAME_RULE = "is not a name (lowercase letter, then lowercase letters, digits or _)"
EMBEDDED = "embedded features (categorical, bucketized numeric)"


@pytest.fixture(autouse=True)
def in_fixtures(monkeypatch):
    monkeypatch.chdir(FIXTURES)


# ------------------------------------------------------------------------------------- a good world


def test_good_world_loads():
    world = loader.load_world("good/world.yaml")
    assert world.name == "test_world" and world.source_file == "good/world.yaml"
    assert world.window_seconds == 86400 and world.realtime.max_length == 32
    assert [s.name for s in world.sequences] == ["clicks", "orders"]
    assert world.sequences[0].actions == ("click", "view") and world.sequences[1].keep is Keep.FIRST
    assert world.scenario_names == ("home_feed", "group_buy", "coupons")
    assert [s.source_file for s in world.scenarios] == [f"good/{n}.yaml" for n in world.scenario_names]

    home = world.scenario("home_feed")
    assert [f.name for f in home.features] == ["item_id", "price", "hour", "dist", "emb"]
    dist = home.feature("dist")
    assert dist.boundaries == (0.5, 1.0, 2.0, 5.0) and all(type(b) is float for b in dist.boundaries)
    assert dist.num_embeddings == 5 and dist.is_embedded
    assert home.feature("emb").type is FeatureType.DENSE and home.feature("emb").length == 16
    assert home.feature("hour").source is Source.CONTEXT and home.feature("price").source is Source.ITEM

    group = world.scenario("group_buy")
    city = group.feature("city")
    assert city.vocab.kind is VocabKind.FILE
    assert city.vocab.path == "good/vocab/cities.txt"  # resolved against the YAML file, not the cwd
    assert group.feature("deal_id").raw_column == "item_id"
    assert [t.type for t in group.tasks] == [TaskType.BINARY, TaskType.REGRESSION, TaskType.NEXT_ITEM]
    assert group.tasks[1].weight == 0.5 and group.tasks[0].weight == 1.0  # default filled in
    assert world.event_fields()[2].name == "amount"


def test_embedding_tables_share_by_name():
    world = loader.load_world("good/world.yaml")
    assert registry.embedding_tables(world) == {
        "item": EmbeddingTable(1009, 16, ("item_id", "deal_id")),  # sequences + all three scenarios
        "scenario_id": EmbeddingTable(8, 4, ("scenario",)),
        "hour": EmbeddingTable(24, 8, ("hour",)),
        "dist": EmbeddingTable(5, 4, ("dist",)),  # 4 boundaries -> 5 buckets
        "city": EmbeddingTable(8, 8, ("city",)),
    }


def test_world_loads_from_another_cwd(monkeypatch):
    monkeypatch.chdir(FIXTURES.parent)
    world = loader.load_world("configs/good/world.yaml")
    assert world.scenario("coupons").source_file == "configs/good/coupons.yaml"
    assert world.scenario("group_buy").feature("city").vocab.path == "configs/good/vocab/cities.txt"


def test_shipped_world_loads():
    from recfm.configs import config_path

    try:
        path = config_path("world", "default.yaml")
    except FileNotFoundError:
        pytest.skip("the embedded world configs/world/default.yaml is not written yet")
    world = loader.load_world(None)
    assert world.source_file == str(path) and len(world.scenarios) >= 1


# ------------------------------------------------------------------------------------ bad configs


def _b(name: str, *problems: str) -> list[str]:
    return [f"bad/{name}: {p}" for p in problems]


BAD = {
    "unknown_key.yaml": _b("unknown_key.yaml", "features[0].dimm: unknown key (did you mean 'dim'?)"),
    "bad_enum.yaml": _b("bad_enum.yaml", "features[0].type: 'categoric' is not one of: categorical, numeric, timestamp, dense"),
    "missing_key.yaml": _b("missing_key.yaml", "features[1].type: missing required key"),
    "wrong_types.yaml": _b(
        "wrong_types.yaml",
        "features[0].vocab.size: expected an integer, got '100'",
        "features[0].dim: expected an integer, got true",  # bool is not an int
        "features[1].boundaries: expected a list, got 1.5",
        "tasks[0].weight: expected a number, got true",  # YAML 1.1 `yes`
    ),
    "vocab_size.yaml": _b("vocab_size.yaml", "features[1].vocab.size: must be > 0, got 0"),
    "vocab_rules.yaml": _b(
        "vocab_rules.yaml",
        "features[0].vocab: required for categorical features",
        "features[1].vocab: only categorical features have a vocab",
        "features[2].vocab.path: file not found: bad/no_such_vocab.txt",
        "features[3].vocab.path: required when vocab.kind is file",
        "features[4].vocab.path: only file vocabularies have a path",
    ),
    "embedding_rules.yaml": _b(
        "embedding_rules.yaml",
        f"features[0].dim: required for {EMBEDDED}",
        "features[1].dim: must be > 0, got 0",
        f"features[2].dim: only {EMBEDDED} have a dim",
        f"features[2].table: only {EMBEDDED} have a table",
        "features[3].length: required for dense features",
        "features[4].length: must be > 0, got 0",
        "features[5].length: only dense features have a length",
    ),
    "numeric_rules.yaml": _b(
        "numeric_rules.yaml",
        "features[0].boundaries: bucketize needs a non-empty, strictly increasing list",
        "features[1].boundaries: bucketize needs a non-empty, strictly increasing list",
        "features[2].std: must be > 0, got 0",
        "features[3].boundaries: only bucketize transforms have boundaries",
        "features[4].transform: only numeric features have a transform",
    ),
    "task_rules.yaml": _b(
        "task_rules.yaml",
        "tasks[0].label: no label named 'clik' (labels: click, gmv)",
        "tasks[1].type: a binary task needs a binary label, 'gmv' is regression",
        "tasks[2].label: a next_item task needs a categorical item feature, 'hour' is a categorical context feature",
        "tasks[3].label: a next_item task needs a categorical item feature, 'price' is a numeric item feature",
        "tasks[4].label: no feature named 'shop_id' (a next_item task names a categorical item feature)",
        "tasks[5].weight: must be >= 0, got -0.5",
    ),
    "no_tasks.yaml": _b(
        "no_tasks.yaml", "features: a scenario needs at least one feature", "tasks: a scenario needs at least one task"
    ),
    "names.yaml": _b(
        "names.yaml",
        f"name: 'Home-Feed' {NAME_RULE}",
        "features[1].name: duplicate feature name 'item_id' (also features[0])",
        f"features[2].name: '2price' {NAME_RULE}",
        "labels[1].name: duplicate label name 'click' (also labels[0])",
        "tasks[1].name: duplicate task name 'ctr' (also tasks[0])",
    ),
    "syntax_error.yaml": _b(
        "syntax_error.yaml",
        "line 4, column 7: expected ',' or '}', but got ':' (while parsing a flow mapping at line 3, column 5)",
    ),
    "duplicate_key.yaml": _b("duplicate_key.yaml", "line 7: duplicate key 'dim'"),
    "empty.yaml": _b("empty.yaml", "file is empty"),
    "not_a_mapping.yaml": _b("not_a_mapping.yaml", "expected a mapping, got a list"),
    "no_such_file.yaml": _b("no_such_file.yaml", "file not found"),
    # several structural mistakes in one file, all reported in one pass
    "many_mistakes.yaml": _b(
        "many_mistakes.yaml",
        "descripton: unknown key (did you mean 'description'?)",
        "features[0].vocab.kind: 'hashd' is not one of: hashed, file, identity",
        "features[1].std: expected a number, got '1'",
        "features[2].type: missing required key",
        "tasks[0].source_file: unknown key (known keys: name, type, label, weight)",
    ),
}

WORLD = "bad/world_mistakes/world.yaml"
BAD_WORLDS = {
    "world_structure.yaml": _b(
        "world_structure.yaml",
        "windw_seconds: unknown key (did you mean 'window_seconds'?)",
        "realtime.keep: 'newest' is not one of: first, last",
        "sequences[0].actions: expected a list, got 'click'",
        "scenarios: missing required key",
    ),
    # the world's own mistakes, its scenario list's, each scenario file's and the cross-file ones at once
    "world_mistakes/world.yaml": [
        f"{WORLD}: window_seconds: must be > 0, got 0",
        f"{WORLD}: realtime.max_length: must be > 0, got 0",
        f"{WORLD}: sequences[0].max_length: must be > 0, got 0",
        f"{WORLD}: sequences[1].actions: action 'click' also belongs to sequences[0] (clicks)",
        f"{WORLD}: sequences[2].actions: a sequence needs at least one action",
        f"{WORLD}: sequences[2].fields: a sequence needs at least one field",
        f"{WORLD}: scenarios[1]: './home.yaml' is listed twice (also scenarios[0])",
        f"{WORLD}: scenarios[2]: file not found: bad/world_mistakes/missing.yaml",
        "bad/world_mistakes/small_table.yaml: tasks[0].label: no label named 'clicks' (labels: click)",
        "bad/world_mistakes/broken.yaml: features[0].colour: unknown key (did you mean 'column'?)",
        "bad/world_mistakes/home_copy.yaml: name: scenario 'home' is also defined in bad/world_mistakes/home.yaml",
        f"bad/world_mistakes/small_table.yaml: features[0].vocab.size: table 'item' has 1009 rows ({WORLD}: sequences[0].fields[0]), got 500",
        f"bad/world_mistakes/small_table.yaml: features[0].dim: table 'item' has dim 16 ({WORLD}: sequences[0].fields[0]), got 8",
        f"bad/world_mistakes/small_table.yaml: features[1].boundaries: table 'item' has 1009 rows ({WORLD}: sequences[0].fields[0]), got 3",
        f"bad/world_mistakes/small_table.yaml: features[1].dim: table 'item' has dim 16 ({WORLD}: sequences[0].fields[0]), got 4",
    ],
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_scenario_reports_exact_problems(name):
    with pytest.raises(ConfigError) as exc:
        loader.load_scenario(f"bad/{name}")
    assert exc.value.problems == BAD[name]


@pytest.mark.parametrize("name", sorted(BAD_WORLDS))
def test_bad_world_reports_exact_problems(name):
    with pytest.raises(ConfigError) as exc:
        loader.load_world(f"bad/{name}")
    assert exc.value.problems == BAD_WORLDS[name]
    assert str(exc.value).startswith(f"{len(BAD_WORLDS[name])} problem")


def test_every_bad_fixture_is_covered():
    on_disk = {str(p.relative_to(FIXTURES / "bad")) for p in (FIXTURES / "bad").glob("*.yaml")}
    worlds = {"world_mistakes/world.yaml", "world_structure.yaml"}
    assert on_disk | worlds == (set(BAD) - {"no_such_file.yaml"}) | set(BAD_WORLDS)


# --------------------------------------------------------------------------------- strict, generic


@dataclasses.dataclass(frozen=True)
class _Optim:
    lr: float
    betas: tuple[float, ...] = (0.9, 0.98)


@dataclasses.dataclass(frozen=True)
class _Run:
    name: str
    steps: int
    optim: _Optim
    precision: Literal["fp32", "bf16"] = "fp32"
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    resume: str | None = None


def test_strict_parses_other_dataclasses():
    problems: list[str] = []
    data = {"name": "r", "steps": 3, "optim": {"lr": 1}, "precision": "bf16", "tags": {"a": "b"}}
    run = strict.parse(_Run, data, file="run.yaml", path="", problems=problems)
    assert problems == []
    assert run == _Run("r", 3, _Optim(1.0), "bf16", {"a": "b"}, None)
    assert type(run.optim.lr) is float  # an int is accepted for a float, and converted


def test_strict_reports_every_problem_with_its_path():
    problems: list[str] = []
    data = {"name": 5, "steps": 2.0, "optim": {"lr": "x", "betas": [0.9, False], "beta": 1}, "precision": "fp16",
            "tags": {"a": 1}, "resume": None, "extra": 1}
    assert strict.parse(_Run, data, file="run.yaml", path="run", problems=problems) is None
    assert problems == [
        "run.yaml: run.name: expected a string, got 5",
        "run.yaml: run.steps: expected an integer, got 2.0",
        "run.yaml: run.optim.lr: expected a number, got 'x'",
        "run.yaml: run.optim.betas[1]: expected a number, got false",
        "run.yaml: run.optim.beta: unknown key (did you mean 'betas'?)",
        "run.yaml: run.precision: 'fp16' is not one of: 'fp32', 'bf16'",
        "run.yaml: run.tags.a: expected a string, got 1",
        "run.yaml: run.extra: unknown key (known keys: name, steps, optim, precision, tags, resume)",
    ]


def test_strict_given_fields_are_not_read_from_the_file():
    problems: list[str] = []
    run = strict.parse(_Run, {"name": "r", "steps": 1, "optim": {"lr": 0.1}}, file="f", path="", problems=problems,
                       given={"resume": "ckpt"})
    assert run.resume == "ckpt" and problems == []
    strict.parse(_Run, {"name": "r", "steps": 1, "optim": {"lr": 0.1}, "resume": "x"}, file="f", path="",
                 problems=problems, given={"resume": "ckpt"})
    assert problems == ["f: resume: unknown key (known keys: name, steps, optim, precision, tags)"]


@dataclasses.dataclass(frozen=True)
class _Layer:
    """Checks of its own in __post_init__, labelled the way recfm's configs label them."""

    width: int
    heads: int = 1

    def __post_init__(self):
        problems = []
        if self.width < 1:
            problems.append(f"layer.width: must be >= 1, got {self.width}")  # behind the class's own label
        if self.width % self.heads:
            problems.append(f"heads: must divide width={self.width}, got {self.heads}")  # relative to the class
        if self.heads > 8:
            problems.append("too many heads for one layer")  # names no field
        if problems:
            raise ConfigError(problems)


@dataclasses.dataclass(frozen=True)
class _Net:
    layer: _Layer
    layers: tuple[_Layer, ...] = ()
    depth: int = 1


def test_strict_folds_post_init_problems_into_the_list_with_file_and_key_path():
    problems: list[str] = []
    data = {"layer": {"width": -1, "heads": 3}, "layers": [{"width": 4}, {"width": 10, "heads": 16}], "depth": "x"}
    assert strict.parse(_Net, data, file="net.yaml", path="model", problems=problems) is None
    assert problems == [  # one list: the parser's own problems and every __post_init__'s, in file order
        "net.yaml: model.layer.width: must be >= 1, got -1",
        "net.yaml: model.layer.heads: must divide width=-1, got 3",
        "net.yaml: model.layers[1].heads: must divide width=10, got 16",
        "net.yaml: model.layers[1]: too many heads for one layer",
        "net.yaml: model.depth: expected an integer, got 'x'",
    ]
    problems = []
    assert strict.parse(_Layer, {"width": 0}, file="layer.yaml", path="", problems=problems) is None
    assert problems == ["layer.yaml: width: must be >= 1, got 0"]
    assert strict.parse(_Net, {"layer": {"width": 4, "heads": 2}}, file="f", path="", problems=[]) == _Net(_Layer(4, 2))


# ------------------------------------------------------------------------------------ fingerprints


HOME_FEED_REWRITTEN = """\
# The same spec as good/home_feed.yaml, written differently: block style, other key order,
# explicit defaults, integers for floats. Its fingerprint must not change.
description: restaurant home feed
name: home_feed
tasks:
  - {label: click, name: ctr, type: binary, weight: 1}
  - {name: ctcvr, type: binary, label: order}
labels:
  - name: click
  - {name: order, type: binary, column: null}
features:
  - name: item_id
    type: categorical
    source: item
    vocab: {size: 1009, kind: hashed}
    table: item
    dim: 16
    std: 1
  - {name: price, type: numeric, transform: log, source: item, dim: null, boundaries: []}
  - {name: hour, type: categorical, source: context, vocab: {kind: identity, size: 24}, dim: 8}
  - {name: dist, type: numeric, source: cross, transform: bucketize, boundaries: [0.5, 1.0, 2, 5.0], dim: 4}
  - {name: emb, type: dense, length: 16}
"""


def test_fingerprint_is_stable_and_ignores_how_and_where_it_is_written(tmp_path):
    original = loader.load_scenario("good/home_feed.yaml")
    again = loader.load_scenario("good/home_feed.yaml")
    (tmp_path / "elsewhere.yaml").write_text(HOME_FEED_REWRITTEN)
    rewritten = loader.load_scenario(tmp_path / "elsewhere.yaml")
    assert re.fullmatch(r"[0-9a-f]{16}", original.fingerprint())
    assert original.fingerprint() == again.fingerprint() == rewritten.fingerprint()
    assert rewritten.source_file != original.source_file


@pytest.mark.parametrize(
    "old, new",
    [
        ("weight: 1}", "weight: 2}"),  # a task weight
        ("dim: 8}", "dim: 16}"),  # an embedding dim
        ("[0.5, 1.0, 2, 5.0]", "[0.5, 1.0, 2, 6.0]"),  # a bucket boundary
        ("length: 16}", "length: 16, source: user}"),  # a source
    ],
)
def test_fingerprint_changes_with_the_spec(tmp_path, old, new):
    assert HOME_FEED_REWRITTEN.count(old) == 1
    (tmp_path / "a.yaml").write_text(HOME_FEED_REWRITTEN)
    (tmp_path / "b.yaml").write_text(HOME_FEED_REWRITTEN.replace(old, new))
    a, b = loader.load_scenario(tmp_path / "a.yaml"), loader.load_scenario(tmp_path / "b.yaml")
    assert a.fingerprint() != b.fingerprint()


# ---------------------------------------------------------------------------------------- registry


def test_registry_lookups_and_registration():
    world = loader.load_world("good/world.yaml")
    reg = Registry.from_world(world)
    assert reg.names == ("home_feed", "group_buy", "coupons") and len(reg) == 3
    assert reg.index("coupons") == 2 and reg.get("group_buy") is world.scenarios[1] and "home_feed" in reg
    with pytest.raises(RecfmError, match=r"good/world.yaml: unknown scenario 'nope' \(known: home_feed, group_buy, coupons\)"):
        reg.index("nope")

    extra = dataclasses.replace(loader.load_scenario("good/coupons.yaml"), name="coupons_v2")
    bigger = reg.with_scenario(extra)
    assert bigger.names == ("home_feed", "group_buy", "coupons", "coupons_v2") and bigger.index("coupons_v2") == 3
    assert reg.names == ("home_feed", "group_buy", "coupons")  # the old registry is unchanged
    assert bigger.world.sequences == world.sequences


def test_registration_refuses_a_taken_name_and_a_mismatched_table():
    reg = Registry.from_world(loader.load_world("good/world.yaml"))
    with pytest.raises(ConfigError) as exc:
        reg.with_scenario(loader.load_scenario("good/coupons.yaml"))
    assert exc.value.problems == ["good/coupons.yaml: name: scenario 'coupons' is also defined in good/coupons.yaml"]

    spec = loader.load_scenario("good/coupons.yaml")
    item = dataclasses.replace(spec.features[0], dim=32)
    wide = dataclasses.replace(spec, name="wide", features=(item, *spec.features[1:]))
    with pytest.raises(ConfigError) as exc:
        reg.with_scenario(wide)
    assert exc.value.problems == [
        "good/coupons.yaml: features[0].dim: table 'item' has dim 16 (good/world.yaml: sequences[0].fields[0]), got 32"
    ]


def test_registry_from_files_keeps_order_and_checks_across_files():
    reg = Registry.from_files(["good/coupons.yaml", "good/home_feed.yaml"])
    assert reg.names == ("coupons", "home_feed") and reg.world.sequences == ()
    with pytest.raises(ConfigError) as exc:
        Registry.from_files(["good/coupons.yaml", "good/coupons.yaml", "bad/vocab_size.yaml"])
    assert exc.value.problems == [
        "bad/vocab_size.yaml: features[1].vocab.size: must be > 0, got 0",
        "good/coupons.yaml: name: scenario 'coupons' is also defined in good/coupons.yaml",
    ]  # vocab_size.yaml's item_id has its own table (`item_id`), so no clash with coupons' `item`


# --------------------------------------------------------------------------------------------- CLI


def test_cli_validate_good_files(capsys):
    assert cli.main(["scenarios", "validate", "good/world.yaml", "good/home_feed.yaml"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: 2 files valid\n")
    assert "good/world.yaml: world 'test_world', 2 sequences, 3 scenarios (home_feed, group_buy, coupons)" in out


def test_cli_validate_reports_all_files_and_exits_2(capsys):
    paths = ["bad/vocab_size.yaml", "good/world.yaml", "bad/unknown_key.yaml", "good/vocab/cities.txt"]
    assert cli.main(["scenarios", "validate", *paths]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "recfm: error: 3 problems in configuration:",
        "  bad/vocab_size.yaml: features[1].vocab.size: must be > 0, got 0",
        "  bad/unknown_key.yaml: features[0].dimm: unknown key (did you mean 'dim'?)",
        "  good/vocab/cities.txt: not a world file (needs 'scenarios') nor a scenario file (needs 'features')",
    ]


def test_cli_validate_checks_a_new_scenario_against_the_world(tmp_path, capsys):
    text = (FIXTURES / "good" / "coupons.yaml").read_text()
    (tmp_path / "big_coupons.yaml").write_text(text.replace("name: coupons", "name: big_coupons").replace("dim: 16", "dim: 64"))
    new = str(tmp_path / "big_coupons.yaml")
    assert cli.main(["scenarios", "validate", new]) == 0  # fine on its own
    assert cli.main(["scenarios", "validate", "good/world.yaml", new]) == 2  # but not on this world
    assert capsys.readouterr().err.splitlines()[1:] == [
        f"  {new}: features[0].dim: table 'item' has dim 16 (good/world.yaml: sequences[0].fields[0]), got 64"
    ]


def test_cli_list_and_show(capsys):
    world = loader.load_world("good/world.yaml")
    assert cli.main(["scenarios", "list", "--world", "good/world.yaml"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "world test_world (good/world.yaml): 3 scenarios"
    assert lines[1].split() == ["scenario", "features", "labels", "tasks", "fingerprint"]
    assert lines[3].split() == ["group_buy", "4", "click,gmv", "ctr,gmv,next_deal", world.scenarios[1].fingerprint()]

    assert cli.main(["scenarios", "show", "--world", "good/world.yaml", "coupons"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# good/coupons.yaml (fingerprint {world.scenarios[2].fingerprint()})\n")
    shown = yaml.safe_load(out)
    assert shown["name"] == "coupons" and shown["tasks"] == [{"name": "redeem", "type": "binary", "label": "redeem", "weight": 1.0}]

    assert cli.main(["scenarios", "show", "--world", "good/world.yaml", "nope"]) == 2
    assert "unknown scenario 'nope'" in capsys.readouterr().err

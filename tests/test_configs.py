"""Every shipped YAML under configs/ loads with its strict loader (the tree is walked, so new files are covered).

Which loader reads a file is decided by where it sits (``CLAIMS``, first match wins); scenario files are
claimed by the world file that lists them. A YAML file that nothing claims fails ``test_every_config_is_claimed``
with its name: a new kind of config needs a line here, a stray scenario file needs a world that lists it.
Loaders of recipes that are not in the tree yet are skipped, not failed.
"""

from __future__ import annotations

import importlib
import importlib.util
from fnmatch import fnmatch
from pathlib import Path

import pytest

import recfm.configs
from recfm.scenarios import loader

CONFIGS = Path(recfm.configs.__file__).resolve().parent
FILES = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".yml"))

# (pattern relative to configs/, kind), first match wins; scenario files are claimed through their world.
CLAIMS = [
    ("presets/*.yaml", "model"),
    ("run/*.yaml", "run"),
    ("world/synth.yaml", "synth"),
    ("world/default.yaml", "world"),
    ("real/*/world.yaml", "world"),
    ("real/*/nextitem_*.yaml", "nextitem"),
]
WORLDS = [f for f in FILES if any(fnmatch(f, pat) and kind == "world" for pat, kind in CLAIMS)]


def _kind(name: str) -> str | None:
    return next((kind for pattern, kind in CLAIMS if fnmatch(name, pattern)), None)


def _module(name: str):
    """An optional recipe module; the test skips while it is not in the tree."""
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not in the tree yet")
    return importlib.import_module(name)


def _listed_scenarios() -> dict[str, str]:
    """Scenario file (relative to configs/) -> the world file that lists it."""
    listed = {}
    for w in WORLDS:
        for s in loader.load_world(CONFIGS / w).scenarios:
            listed[Path(s.source_file).resolve().relative_to(CONFIGS).as_posix()] = w
    return listed


def test_the_walk_finds_the_shipped_configs():
    assert {"world/default.yaml", "world/synth.yaml", "presets/tiny.yaml", "real/retailrocket/world.yaml"} <= set(FILES)
    assert len(WORLDS) >= 6


def test_every_config_is_claimed():
    listed = _listed_scenarios()
    unclaimed = [f for f in FILES if _kind(f) is None and f not in listed]
    assert not unclaimed, f"no loader claims these configs/ files (add them to CLAIMS in {__file__}): {unclaimed}"


@pytest.mark.parametrize("name", WORLDS)
def test_world_and_its_scenarios_load(name):
    world = loader.load_world(CONFIGS / name)
    assert world.source_file == str(CONFIGS / name)
    assert world.scenarios, f"{name} lists no scenario"
    for spec in world.scenarios:  # each scenario file also loads on its own
        assert loader.load_scenario(spec.source_file).name == spec.name


@pytest.mark.parametrize("name", [f for f in FILES if _kind(f) == "model"])
def test_model_preset_loads(name):
    from recfm.foundation.model.config import load_model_config

    cfg = load_model_config(CONFIGS / name)
    assert cfg.name == Path(name).stem, f"{name}: name: {cfg.name!r} differs from the file name"


@pytest.mark.parametrize("name", [f for f in FILES if _kind(f) == "synth"])
def test_synth_config_loads_and_fits_the_default_world(name):
    from recfm.foundation.data.synth_config import check_against_world, load_synth_config

    cfg = load_synth_config(CONFIGS / name)
    check_against_world(cfg, loader.load_world(None))
    assert "default" in cfg.sizes


@pytest.mark.parametrize("name", [f for f in FILES if _kind(f) == "run"])
def test_run_config_loads_with_its_model_and_world(name):
    config = _module("recfm.recipes.config")
    from recfm.foundation.model.config import PRESETS, load_model_config

    cfg = config.load_run_config(CONFIGS / name)
    load_model_config(cfg.model if cfg.model in PRESETS else cfg.resolve(cfg.model))
    world = loader.load_world(cfg.resolve(cfg.data.world))
    names = {s.name for s in world.scenarios}
    assert set(cfg.data.scenarios) <= names, f"{name}: data.scenarios: not in the world: {set(cfg.data.scenarios) - names}"


@pytest.mark.parametrize("name", [f for f in FILES if _kind(f) == "nextitem"])
def test_nextitem_config_loads(name):
    config = _module("recfm.recipes.nextitem_config")
    cfg = config.load_nextitem_config(CONFIGS / name)
    assert cfg.source_file == str(CONFIGS / name)

"""Where a run's samples come from, and how they split into training and evaluation windows.

``prepare_samples`` resolves the ``data`` section of a run config to a folder of built samples:

* ``data.samples`` given: that folder (built earlier with ``recfm data build``);
* ``data.events`` + ``data.exposures`` given: built into ``<out>/data`` (reused when already built from
  the same inputs);
* neither: the world is synthesized (``recfm data synth``, ``data.synth``) into ``<out>/synth`` and built
  into ``<out>/data``; both are reused on a re-run with the same world, size and seed.

Time split: sample windows are days (``world.window_seconds``); the last ``data.eval_windows`` windows are
held out for evaluation, the earlier ones train. ``data.train_fraction < 1`` keeps a fixed share of the
training users (by a hash of the user id), written as a filtered copy of the training rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recfm.errors import ConfigError, DataError
from recfm.foundation.data import schema as S
from recfm.foundation.data.loader import find_files
from recfm.recipes.config import RunConfig
from recfm.scenarios.spec import WorldSpec, spec_hash

STAMP = "_recfm_source.json"  # what a built folder was built from (reuse check)


@dataclass(frozen=True)
class Split:
    """Sample files and the window ranges ``[lo, hi)`` of training and evaluation rows."""

    files: tuple[Path, ...]
    train_windows: tuple[int | None, int]
    eval_windows: tuple[int, int | None]
    windows: tuple[int, ...]


def prepare_samples(cfg: RunConfig, world: WorldSpec, out: Path, progress: bool = True) -> Path:
    """The folder of built samples for this run (module docstring); builds what is missing."""
    from recfm.foundation.data.build import build_samples

    d = cfg.data
    if d.samples is not None:
        path = Path(cfg.resolve(d.samples))
        if not path.exists():
            raise ConfigError([f"{cfg.source_file}: data.samples: {path} does not exist"])
        return path
    if d.events is not None:
        events, exposures = Path(cfg.resolve(d.events)), Path(cfg.resolve(d.exposures))
        for key, p in (("data.events", events), ("data.exposures", exposures)):
            if not p.exists():
                raise ConfigError([f"{cfg.source_file}: {key}: {p} does not exist"])
        source = {"events": str(events), "exposures": str(exposures)}
    else:
        from recfm.foundation.data.synth import synth_world

        raw = out / "synth"
        source = {"synth": {"size": d.synth.size, "seed": d.synth.seed}, "world": spec_hash(world)}
        if not _stamped(raw, source):
            synth_world(raw, size=d.synth.size, seed=d.synth.seed, world=world, progress=progress)
            _stamp(raw, source)
        events, exposures = raw / "events", raw / "exposures"
    built = out / "data"
    source = {**source, "layout": d.layout.value, "world": spec_hash(world)}
    if not _stamped(built, source):
        build_samples(world, events, exposures, built, layout=d.layout.value, memory_mb=d.memory_mb, progress=progress)
        _stamp(built, source)
    return built


def split_windows(samples: Path, eval_windows: int) -> Split:
    """Read the ``window`` column of every sample file and hold out the last ``eval_windows`` windows."""
    files = tuple(find_files(samples))
    if not files:
        raise DataError(f"{samples}: no sample files (part-*.parquet)")
    seen: set[int] = set()
    for f in files:
        col = pq.read_table(f, columns=[S.WINDOW]).column(S.WINDOW)
        seen.update(pc.unique(col).to_pylist())
    windows = tuple(sorted(w for w in seen if w is not None))
    if len(windows) <= eval_windows:
        raise DataError(
            f"{samples}: {len(windows)} window(s) {list(windows)}, but eval_windows={eval_windows} must leave at "
            "least one for training"
        )
    first_eval = windows[-eval_windows]
    return Split(files=files, train_windows=(None, first_eval), eval_windows=(first_eval, None), windows=windows)


def keep_fraction(files: tuple[Path, ...], out: Path, fraction: float, seed: int, windows: tuple) -> Path:
    """Copy the rows of ``windows`` whose user hashes into the first ``fraction`` of users, into ``out``.

    The choice depends on (user id, seed) only, so the same users are kept by every run with that seed.
    """
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*.parquet"):
        old.unlink()
    lo, hi = windows
    kept = 0
    for i, f in enumerate(files):
        table = pq.read_table(f)
        users = table.column(S.USER).to_numpy()
        mask = _user_hash(users, seed) < fraction
        win = table.column(S.WINDOW).to_numpy()
        if lo is not None:
            mask &= win >= lo
        if hi is not None:
            mask &= win < hi
        part = table.filter(pa.array(mask))
        kept += part.num_rows
        pq.write_table(part, out / f"part-{i:05d}.parquet")
    if kept == 0:
        raise DataError(f"keeping {fraction:.0%} of users left no training rows (from {len(files)} file(s))")
    return out


def _user_hash(users: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per user id (splitmix64 of id ^ seed)."""
    x = users.astype(np.uint64) ^ np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _stamped(folder: Path, source: dict) -> bool:
    stamp = folder / STAMP
    return stamp.is_file() and json.loads(stamp.read_text()) == source


def _stamp(folder: Path, source: dict) -> None:
    (folder / STAMP).write_text(json.dumps(source, sort_keys=True))

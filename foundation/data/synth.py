"""``recfm data synth``: a multi-scenario world with a known truth, written as raw logs.

Output folder (raw-log schema of :mod:`recfm.foundation.data.schema`)::

    <out>/events/part-00000.parquet      user_id, timestamp, action, <sequence fields>
    <out>/exposures/part-00000.parquet   exposure_id, user_id, timestamp, scenario, <every scenario's
                                         feature columns, null where not that scenario's>, <labels>,
                                         p_<label> (the oracle: the probability the label was drawn from)
    <out>/synth_report.json              counts and oracle AUC / GAUC / log loss per scenario and label

What the truth is (configs/world/synth.yaml's header has the formula): users share one latent interest
vector across scenarios; it drives their history events and every scenario's labels; feature values add
random effects drawn from the seed. ``p_<label>`` is the unconditional probability of the label (for a
conversion label: p(click) * p(order | click)), so the oracle's AUC / GAUC bound what any model can reach.
The leak trap: each positive label emits an event (``click``, ``order``, ...) seconds after its exposure, so
a model that lets an exposure see later real-time events beats the oracle.

Users are generated in blocks seeded by ``(seed, block)`` and written in chunks of blocks, one part file
per chunk, optionally by several processes: the data is identical whatever the chunking or process count.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from recfm.foundation.data.synth_block import generate_block
from recfm.foundation.data.synth_config import SynthConfig, check_against_world, load_synth_config
from recfm.foundation.data.synth_report import ChunkStats, SynthReport, build_report
from recfm.foundation.data.synth_truth import Truth, build_truth
from recfm.scenarios.loader import load_world
from recfm.scenarios.spec import WorldSpec

EVENTS = "events"
EXPOSURES = "exposures"
REPORT = "synth_report.json"


def synth_world(
    out_dir: str | Path,
    size: str = "default",
    seed: int = 0,
    world: WorldSpec | str | Path | None = None,
    synth: SynthConfig | str | Path | None = None,
    *,
    chunk_blocks: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> SynthReport:
    """Generate a world's raw logs into ``out_dir`` and return (and write) its report.

    Args:
        out_dir: output folder; existing ``part-*.parquet`` files in its events/ and exposures/ are replaced.
        size: a key of the synth config's ``sizes`` (tiny, small, default, large, huge).
        seed: the world is a function of (world spec, synth config, size, seed) only.
        world: a WorldSpec, a world YAML path, or None for the embedded world.
        synth: a SynthConfig, a synth YAML path, or None for the shipped configs/world/synth.yaml.
        chunk_blocks: blocks of users per part file (default: the size's ``chunk_blocks``).
        workers: processes writing chunks in parallel (default: the size's ``workers``; 0: one per CPU
            core). The output is the same for any value.
        progress: show a tqdm progress bar (stderr).
    """
    t0 = time.perf_counter()
    world_spec = world if isinstance(world, WorldSpec) else load_world(world)
    cfg = synth if isinstance(synth, SynthConfig) else load_synth_config(synth)
    check_against_world(cfg, world_spec)
    size_gen = cfg.size(size)
    out = Path(out_dir)
    for sub in (EVENTS, EXPOSURES):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for old in (out / sub).glob("part-*.parquet"):
            old.unlink()
    per_chunk = chunk_blocks or size_gen.chunk_blocks
    n_blocks = -(-size_gen.users // size_gen.block_users)
    chunks = [range(b, min(b + per_chunk, n_blocks)) for b in range(0, n_blocks, per_chunk)]
    if workers is None:
        workers = size_gen.workers
    workers = min(workers or os.cpu_count() or 1, len(chunks))
    stats = ChunkStats()
    bar = _progress_bar(size_gen.users, progress)
    if workers <= 1:
        truth = build_truth(world_spec, cfg, size_gen, seed)
        results = (_write_chunk(truth, seed, i, c, out) for i, c in enumerate(chunks))
        _collect(results, stats, bar)
    else:
        spawn = mp.get_context("spawn")  # never fork a parent that may hold torch or tqdm threads
        with cf.ProcessPoolExecutor(workers, mp_context=spawn, initializer=_init_worker,
                                    initargs=(world_spec, cfg, size_gen, seed)) as pool:
            futures = [pool.submit(_worker_chunk, seed, i, c, out) for i, c in enumerate(chunks)]
            _collect((f.result() for f in cf.as_completed(futures)), stats, bar)  # bounded memory
    bar.close()
    report = build_report(world_spec, stats, size=size, seed=seed, out_dir=str(out), seconds=time.perf_counter() - t0)
    report.write_json(out / REPORT)
    return report


def _write_chunk(truth: Truth, seed: int, index: int, blocks: range, out: Path) -> ChunkStats:
    """Generate blocks ``blocks``, write them as part ``index`` and return their statistics."""
    tables = [generate_block(truth, seed, b) for b in blocks]
    events = pa.concat_tables([t[0] for t in tables])
    exposures = pa.concat_tables([t[1] for t in tables])
    name = f"part-{index:05d}.parquet"
    for sub, table in ((EVENTS, events), (EXPOSURES, exposures)):
        tmp = out / sub / f".{name}.tmp"
        pq.write_table(table, tmp)
        tmp.replace(out / sub / name)
    users = min(blocks.stop * truth.size.block_users, truth.size.users) - blocks.start * truth.size.block_users
    return ChunkStats.of(truth.world, users, events, exposures)


def _collect(results, stats: ChunkStats, bar) -> None:
    for chunk in results:
        stats.merge(chunk)
        bar.update(chunk.users)
        bar.set_postfix(exposures=f"{sum(stats.exposures.values()):,}", refresh=False)


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="user", desc="synth", disable=not enabled, dynamic_ncols=True)


# A worker process builds the (deterministic) truth once and keeps it for all its chunks.
_WORKER_TRUTH: list[Truth] = []


def _init_worker(world: WorldSpec, cfg: SynthConfig, size, seed: int) -> None:
    _WORKER_TRUTH[:] = [build_truth(world, cfg, size, seed)]


def _worker_chunk(seed: int, index: int, blocks: range, out: Path) -> ChunkStats:
    return _write_chunk(_WORKER_TRUTH[0], seed, index, blocks, out)

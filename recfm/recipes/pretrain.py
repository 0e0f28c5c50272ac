"""``recfm pretrain [CONFIG] [key=value ...]``: train adapters, backbone and heads on every listed scenario.

With no config this is the main job: the embedded world is synthesized (12k users, 4 scenarios), built
into user-level samples, and a model is trained on home_feed, group_buy and coupon; the last two days are
held out and the run ends with a per-scenario table of the model against the oracle. Everything lands in
``out`` (``runs/default``): ``synth/``, ``data/``, ``checkpoints/``, ``train_log.jsonl``, ``tb/``,
``results.json``. Running the same command again resumes from the last checkpoint (or, when training
had finished, only re-evaluates).
"""

from __future__ import annotations

import time
from pathlib import Path

from recfm.recipes import session
from recfm.recipes.distributed import all_ranks_sum
from recfm.recipes.evaluate import RunResults, evaluate_model, write_json
from recfm.recipes.train import Trainer


def pretrain(config: str | Path | None = None, overrides=(), progress: bool = True) -> dict:
    """Run the pretraining recipe; returns (and writes to ``<out>/results.json``) its results."""
    t0 = time.perf_counter()
    s = session.start(config, overrides)
    scenarios = session.trained_scenarios(s)
    split = session.samples_split(s, progress)
    data = session.train_dataset(s, split, scenarios)
    model = session.build_model(s, scenarios)
    meta = session.run_meta(s, model)
    trainer = Trainer(model, data, s.cfg.train, s.out, device=s.device, meta=meta, progress=progress)
    result = trainer.fit()
    samples, tokens, steady_samples, steady_tokens = all_ranks_sum(  # every rank's batches
        [result.samples, result.tokens, result.steady_samples, result.steady_tokens], s.device)
    eval_model = model
    if trainer.sharded is not None:  # tables live in shards: rank 0 evaluates a gathered copy (collective)
        full = trainer.sharded.full_state(model.state_dict())
        if s.is_main:
            eval_model = session.build_model(s, scenarios)
            eval_model.load_state_dict(full)
    results = {
        "recipe": "pretrain",
        "scenarios": list(scenarios),
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "train_seconds": result.seconds,
        "samples_per_s": samples / max(result.seconds, 1e-9),
        "tokens_per_s": tokens / max(result.seconds, 1e-9),
        # after the first log window (compilation and autotuning excluded); null with a single window
        "steady_samples_per_s": steady_samples / result.steady_seconds if result.steady_seconds else None,
        "steady_tokens_per_s": steady_tokens / result.steady_seconds if result.steady_seconds else None,
        "steady_seconds": result.steady_seconds,
        "final_loss": result.losses[-1] if result.losses else None,
        "checkpoint": result.checkpoint,
        "train_windows": [w for w in split.windows if w < split.eval_windows[0]],
        "eval_windows": [w for w in split.windows if w >= split.eval_windows[0]],
        "device": str(s.device),
        "world_size": s.world_size,
    }
    if s.is_main:
        ev = evaluate_model(eval_model, session.eval_dataset(s, split, scenarios), s.device, s.cfg.train.eval_batches, s.cfg.train.bf16)
        results["eval"] = ev.to_dict()
        results["leaks"] = ev.leaks()
        results["seconds"] = time.perf_counter() - t0
        write_json(s.out / "results.json", {**results, "config": meta["config"]})
        text = ev.format(f"pretrain {s.cfg.name}: held-out windows {results['eval_windows']}")
        text += f"\nresults: {s.out / 'results.json'}   checkpoint: {result.checkpoint}   total {results['seconds']:.0f} s"
    else:
        text = f"rank {s.rank}: trained {result.steps} steps"
    s.barrier()
    return RunResults(results, text)

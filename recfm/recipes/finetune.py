"""``recfm finetune CONFIG --from CKPT`` and ``recfm evaluate CONFIG --ckpt CKPT``.

Fine-tuning trains ONE scenario (``finetune.scenario``) on a pretrained checkpoint:

* the model is rebuilt from the checkpoint (its model config and scenario registry) and loaded;
* when the scenario is new -- listed in the run's world, or given as ``finetune.scenario_file`` -- it is
  registered on top (:meth:`~recfm.foundation.model.model.RecModel.add_scenario`): a new tokenizer, head
  and Group-LayerNorm row; nothing pretrained changes;
* trainable: the scenario's tokenizer, its gates and towers, and (unless ``finetune.freeze_embeddings``)
  the embedding tables; the backbone, the H/R tokenizers and the shared experts are frozen
  (``finetune.freeze_backbone``) or trained at ``backbone_lr_scale`` times the learning rate.

Before anything is trained or written, the checkpoint is checked against the run: the backbone shape,
the shared sequences (H/R fields, real-time window) and every scenario both know must have the same
fingerprint; otherwise :class:`CheckpointMismatch` says which part differs.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from recfm.errors import ConfigError, RecfmError
from recfm.foundation.model.config import load_model_config, parse_model_config
from recfm.foundation.model.model import RecModel, backbone_fingerprint, select_scenarios
from recfm.recipes import session
from recfm.recipes.checkpoint import load
from recfm.recipes.evaluate import RunResults, evaluate_model, write_json
from recfm.recipes.train import Trainer
from recfm.scenarios.loader import load_scenario
from recfm.scenarios.spec import WorldSpec, spec_hash


class CheckpointMismatch(RecfmError):
    """A checkpoint does not fit the run (another backbone, other shared sequences, another scenario spec)."""


def restore_model(state: dict, world: WorldSpec, path: str, model_config=None) -> RecModel:
    """The checkpoint's model, checked against ``world`` (and ``model_config``'s backbone, when given)."""
    meta = state.get("meta") or {}
    if "model_config" not in meta or "fingerprint" not in meta:
        raise CheckpointMismatch(f"{path}: not a recfm model checkpoint (no model config / fingerprint)")
    saved = meta["fingerprint"]
    problems = []
    if saved["sequences"] != world.sequence_fingerprint():
        problems.append(f"the shared sequences (H/R fields, real-time window) of {world.source_file} differ from the "
                        "checkpoint's")
    for name in meta["scenarios"]:
        if name not in world.scenario_names:
            problems.append(f"the checkpoint's scenario {name!r} is not in {world.source_file}")
        elif spec_hash(world.scenario(name)) != saved["scenarios"][name]:
            problems.append(f"scenario {name!r} of {world.scenario(name).source_file} differs from the one the "
                            "checkpoint was trained with")
    cfg = parse_model_config(meta["model_config"], f"{path}: model_config")
    if model_config is not None and backbone_fingerprint(model_config.backbone) != backbone_fingerprint(cfg.backbone):
        problems.append(f"the run's model {model_config.source_file} has another backbone than the checkpoint "
                        f"({_shape(model_config)} vs {_shape(cfg)})")
    if problems:
        raise CheckpointMismatch(f"{path}: checkpoint does not match the run: " + "; ".join(problems))
    model = RecModel(select_scenarios(world, meta["scenarios"]), cfg)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise CheckpointMismatch(f"{path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def _shape(cfg) -> str:
    b = cfg.backbone
    return (f"{b.num_blocks}x(1+{b.target_layers_per_block}) layers, d_model {b.layer.d_model}, "
            f"{b.layer.num_heads}/{b.layer.num_kv_heads} heads")


def _finetune_world(s: session.Session) -> tuple[WorldSpec, str]:
    f = s.cfg.finetune
    world = s.world
    if f.scenario_file is not None:
        spec = load_scenario(s.cfg.resolve(f.scenario_file))
        if spec.name in world.scenario_names:
            if spec_hash(spec) != spec_hash(world.scenario(spec.name)):
                raise ConfigError([f"{s.cfg.source_file}: finetune.scenario_file: {spec.name!r} is already in "
                                   f"{world.source_file} with another spec"])
        else:
            world = replace(world, scenarios=world.scenarios + (spec,))
        name = f.scenario or spec.name
    else:
        name = f.scenario
    if name is None:
        raise ConfigError([f"{s.cfg.source_file}: finetune.scenario: name the scenario to fine-tune "
                           "(or give finetune.scenario_file)"])
    select_scenarios(world, [name])  # names it in the error when unknown
    return world, name


def finetune(config=None, overrides=(), *, from_ckpt: str | Path | None = None, progress: bool = True) -> RunResults:
    """Fine-tune one scenario on a pretrained checkpoint (module docstring)."""
    t0 = time.perf_counter()
    if from_ckpt is None:
        raise RecfmError("finetune: give the pretrained checkpoint (--from CKPT)")
    s = session.start(config, overrides)
    if s.cfg.train.shard_embeddings and s.world_size > 1:
        raise ConfigError([f"{s.cfg.source_file}: train.shard_embeddings: fine-tuning does not shard tables yet "
                           "(its evaluation needs gathered tables); run it with replicated tables"])
    world, name = _finetune_world(s)
    s.world = world
    state = load(from_ckpt)  # before any data is built or anything written
    model = restore_model(state, world, str(from_ckpt), load_model_config(s.cfg.model))
    registered = name not in model.scenario_names
    if registered:
        model.add_scenario(world.scenario(name))
    model = model.to(s.device)
    f = s.cfg.finetune
    frozen = freeze_for_finetune(model, name, freeze_backbone=f.freeze_backbone, freeze_embeddings=f.freeze_embeddings)
    split = session.samples_split(s, progress)
    data = session.train_dataset(s, split, (name,))
    meta = {**session.run_meta(s, model), "finetune_from": str(from_ckpt), "scenario": name}
    scale = None if f.freeze_backbone else (lambda n: f.backbone_lr_scale if _is_shared(n) else 1.0)
    trainer = Trainer(model, data, s.cfg.train, s.out, device=s.device, meta=meta, dense_scale=scale, progress=progress)
    result = trainer.fit()
    results = {
        "recipe": "finetune", "scenario": name, "registered_new_scenario": registered, "from": str(from_ckpt),
        "frozen_parameters": frozen, "steps": result.steps, "train_seconds": result.seconds,
        "train_fraction": s.cfg.data.train_fraction, "checkpoint": result.checkpoint, "device": str(s.device),
    }
    text = f"rank {s.rank}: fine-tuned {name} for {result.steps} steps"
    if s.is_main:
        ev = evaluate_model(model, session.eval_dataset(s, split, (name,)), s.device, s.cfg.train.eval_batches, s.cfg.train.bf16)
        results.update(eval=ev.to_dict(), leaks=ev.leaks(), seconds=time.perf_counter() - t0)
        write_json(s.out / "results.json", {**results, "config": meta["config"]})
        text = ev.format(f"finetune {name} ({'new scenario' if registered else 'existing scenario'}) from {from_ckpt}")
        text += f"\nresults: {s.out / 'results.json'}   checkpoint: {result.checkpoint}"
    s.barrier()
    return RunResults(results, text)


def _is_shared(name: str) -> bool:
    return name.startswith(("backbone.", "embedder.sequence_mlps.", "head.expert_"))


def freeze_for_finetune(model: RecModel, scenario: str, *, freeze_backbone: bool, freeze_embeddings: bool) -> int:
    """Set ``requires_grad``: only ``scenario``'s tokenizer and head (and tables, backbone per the flags)
    train. Returns the number of frozen parameter elements."""
    own = (f"embedder.scenario_mlps.{scenario}.", f"head.towers.{scenario}.")
    frozen = 0
    for n, p in model.named_parameters():
        if n.startswith(own):
            train = True
        elif n.startswith("embedder.collections."):
            train = not freeze_embeddings
        elif _is_shared(n):
            train = not freeze_backbone
        else:  # other scenarios' tokenizers and towers
            train = False
        p.requires_grad_(train)
        frozen += 0 if train else p.numel()
    return frozen


def evaluate(config=None, overrides=(), *, ckpt: str | Path | None = None, progress: bool = True) -> RunResults:
    """Evaluate a checkpoint on the run's held-out windows: AUC / GAUC / logloss per scenario and task."""
    if ckpt is None:
        raise RecfmError("evaluate: give the checkpoint (--ckpt CKPT)")
    s = session.start(config, overrides)
    state = load(ckpt)
    world = s.world
    extra = [n for n in state.get("meta", {}).get("scenarios", []) if n not in world.scenario_names]
    if extra:
        raise CheckpointMismatch(f"{ckpt}: scenario(s) {extra} of the checkpoint are not in {world.source_file}")
    model = restore_model(state, world, str(ckpt)).to(s.device)
    names = tuple(n for n in (s.cfg.data.scenarios or model.scenario_names) if n in model.scenario_names)
    if not names:
        raise ConfigError([f"{s.cfg.source_file}: data.scenarios: none of {list(s.cfg.data.scenarios)} is scored by "
                           f"the checkpoint (it has {list(model.scenario_names)})"])
    split = session.samples_split(s, progress)
    ev = evaluate_model(model, session.eval_dataset(s, split, names), s.device, s.cfg.train.eval_batches, s.cfg.train.bf16)
    results = {"recipe": "evaluate", "checkpoint": str(ckpt), "scenarios": list(names), "eval": ev.to_dict(),
               "leaks": ev.leaks(), "device": str(s.device)}
    if s.is_main:
        write_json(s.out / "eval.json", results)
    text = ev.format(f"evaluate {ckpt}") + f"\nresults: {s.out / 'eval.json'}"
    return RunResults(results, text)


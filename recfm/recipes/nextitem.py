"""Next-item recipe: train HSTU or SASRec on one dataset for several seeds, report full-corpus HR/NDCG.

Per seed: AdamW with linear warmup then a constant rate (or a cosine decay to 0 at ``max_epochs``,
``train.schedule``), gradient clipping, bf16 autocast on CUDA; each
epoch is one pass over the training users in a seeded random order, in jagged batches of ``batch_size``
users (no padding for HSTU). How training ends depends on ``train.protocol`` (splits: :mod:`.nextitem_data`):

* ``standard`` (default): after every epoch the validation split is ranked over the full corpus; the
  weights with the best validation NDCG@10 are kept; training stops after ``patience`` epochs without
  improvement, after ``max_epochs``, or when ``max_minutes`` of training time are spent (``stopped_by`` says
  which). The test split is evaluated once, with the best weights.
* ``published`` (the HSTU repository's research protocol): the validation item is a training target and
  there is no validation split; training runs ``max_epochs`` epochs (``patience`` is ignored) unless
  ``max_minutes`` ends it first (``stopped_by``: ``max_epochs`` or ``max_minutes``); the test split is
  evaluated once, with the final weights. Nothing is selected.

Neither protocol selects anything on the test split.

The result (also written to ``<out>/results.json``)::

    {"name", "model", "protocol", "config", "device", "seeds", "data": {...counts, skipped_short...},
     "per_seed": [{"seed", "best_epoch", "epochs", "steps", "stopped_by", "train_seconds", "valid": {...},
                   "test": {...}, "history": [{"epoch", "loss", "valid": {...}, "seconds"}]}],
     "aggregate": {"test": {"hr@10": {"mean", "std"}, ...}, "valid": {...}}}

Under ``published``, ``best_epoch``, each ``valid`` and ``aggregate.valid`` are ``null`` (no selection and
no validation happened; the tested weights are those after ``epochs`` epochs). ``std`` is the sample
standard deviation over seeds (ddof 1; 0 for one seed). Tie rule: :mod:`.nextitem_model`.

Example::

    result = nextitem("configs/real/ml-1m/nextitem_hstu.yaml", ["backbone.layer.impl=triton"], seeds=[0, 1, 2])
    print(format_table(result))
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from recfm.configs import config_path
from recfm.recipes.checkpoint import Checkpointer, atomic_write_bytes
from recfm.recipes.nextitem_config import NextItemConfig, Protocol, Schedule, load_nextitem_config
from recfm.recipes.nextitem_data import NextItemData, Split, gather_batch, load_data
from recfm.recipes.nextitem_features import ItemAttributes, load_item_attributes
from recfm.recipes.nextitem_model import METRICS, NextItemModel, check_timestamps, evaluate, token_positions

SELECT = "ndcg@10"  # validation metric for model selection and early stopping


def resolve_config(config: str | Path) -> Path:
    """A YAML path, or a shipped short name ``<dataset>/<model>`` (e.g. ``ml-1m/hstu``)."""
    path = Path(config)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    dataset, _, model = str(config).partition("/")
    try:
        return config_path("real", dataset, f"nextitem_{model}.yaml")
    except FileNotFoundError:
        return path  # the loader reports "file not found" with the name as given


def nextitem(config: str | Path | NextItemConfig, overrides=(), seeds=None, out=None) -> dict:
    """Run the recipe of ``config`` (a YAML path, a short name or a loaded config) for ``seeds``.

    Args:
        config: the next-item YAML.
        overrides: ``key.path=value`` strings applied before validation.
        seeds: seeds to run (default: the config's ``seeds``).
        out: results folder (default: the config's ``out``; ``None`` in both: nothing written).

    Returns:
        the result dict of the module docstring.
    """
    cfg = config if isinstance(config, NextItemConfig) else load_nextitem_config(resolve_config(config), overrides)
    if seeds is not None:
        cfg = dataclasses.replace(cfg, seeds=tuple(int(s) for s in seeds))
    if out is not None:
        cfg = dataclasses.replace(cfg, out=str(out))
    device = pick_device(cfg.train.device)
    data = load_data(cfg.data, cfg.train.protocol).to(device)
    check_timestamps(cfg, data)  # before any seed: time bias on, no timestamps -> ConfigError
    attributes = None
    if cfg.embedding.item_attributes:
        attributes = load_item_attributes(cfg.data, data.num_items)  # the model moves them with itself
    out_dir = Path(cfg.out) if cfg.out else None
    per_seed = [train_seed(cfg, data, seed, device, out_dir, attributes) for seed in cfg.seeds]
    validated = cfg.train.protocol is Protocol.STANDARD
    result = {
        "name": cfg.name, "model": cfg.model, "protocol": cfg.train.protocol.value, "config": cfg.to_dict(),
        "device": describe_device(device, cfg), "seeds": list(cfg.seeds),
        "data": {**data.summary(), "item_attributes": attributes.summary() if attributes is not None else None},
        "per_seed": per_seed,
        "aggregate": {"test": aggregate([r["test"] for r in per_seed]),
                      "valid": aggregate([r["valid"] for r in per_seed]) if validated else None},
    }
    if out_dir is not None:
        text = json.dumps(result, indent=2).encode()
        atomic_write_bytes(out_dir / "results.json", lambda f: f.write(text))
        result["results_file"] = str(out_dir / "results.json")
    return result


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def describe_device(device: torch.device, cfg: NextItemConfig) -> dict:
    info = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    if cfg.model == "hstu":
        info["hstu_impl"] = cfg.backbone.layer.impl
    return info


def aggregate(runs: list[dict]) -> dict:
    """``{metric: {"mean", "std"}}`` over seeds (sample std, 0 for one seed)."""
    out = {}
    for m in METRICS:
        values = [r[m] for r in runs]
        out[m] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def train_seed(cfg: NextItemConfig, data: NextItemData, seed: int, device: torch.device, out_dir: Path | None,
               attributes: ItemAttributes | None = None) -> dict:
    """Train one seed and evaluate test once (module docstring): ``standard`` with validation-based early
    stopping and the best weights, ``published`` for ``max_epochs`` epochs with the final weights."""
    t = cfg.train
    validated = t.protocol is Protocol.STANDARD
    check_timestamps(cfg, data)
    torch.manual_seed(seed)
    order_rng = np.random.default_rng(seed)
    negatives_rng = torch.Generator(device=device).manual_seed(seed)
    model = NextItemModel(cfg, data.num_items, attributes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    users = data.train.num_users
    steps = math.ceil(users / t.batch_size)
    steps = min(steps, t.steps_per_epoch) if t.steps_per_epoch else steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(t.schedule, t.warmup_steps, t.max_epochs * steps))
    autocast = t.bf16 and device.type == "cuda"
    ckpt = Checkpointer(out_dir / f"seed-{seed}" / "checkpoints", keep=1) if out_dir and t.checkpoint else None

    budget = t.max_minutes * 60 if t.max_minutes else math.inf
    best_score, best_state, best_epoch, best_valid, stale = -1.0, None, 0 if validated else None, None, 0
    history, stopped_by, step_count = [], "max_epochs", 0
    start = time.perf_counter()
    bar = tqdm(range(1, t.max_epochs + 1), desc=f"{cfg.name} seed {seed}", disable=not t.progress, leave=False)
    for epoch in bar:
        perm = order_rng.permutation(users)
        loss_sum, done, out_of_time = _train_epoch(model, opt, sched, data.train, perm, steps, t.batch_size,
                                                   t.grad_clip, autocast, negatives_rng, start, budget)
        step_count += done
        if out_of_time:
            stopped_by = "max_minutes"
        valid = None
        if validated:
            valid, _ = evaluate(model, data.valid, t.eval_batch_size, t.eval_chunk, autocast, t.exclude_history)
        mean_loss = float(loss_sum) / max(1, done) if steps else float("nan")
        history.append({"epoch": epoch, "loss": mean_loss, "valid": valid,
                        "seconds": round(time.perf_counter() - start, 2)})
        bar.set_postfix(loss=f"{mean_loss:.3f}", **({"ndcg10": f"{valid[SELECT]:.4f}"} if validated else {}))
        if validated and valid[SELECT] > best_score:
            best_score, best_epoch, best_valid, stale = valid[SELECT], epoch, valid, 0
            best_state = copy.deepcopy(model.state_dict())
            if ckpt is not None:
                ckpt.save({"model": best_state, "spec": {}, "config": cfg.to_dict(), "epoch": epoch, "valid": valid},
                          step_count)
        elif validated:
            stale += 1
        if stopped_by == "max_minutes":
            break
        if validated and stale >= t.patience:
            stopped_by = "patience"
            break
    bar.close()
    train_seconds = time.perf_counter() - start
    if validated:
        model.load_state_dict(best_state)
    elif ckpt is not None:  # published: the final weights, the ones tested
        ckpt.save({"model": model.state_dict(), "spec": {}, "config": cfg.to_dict(), "epoch": len(history),
                   "valid": None}, step_count)
    test, _ = evaluate(model, data.test, t.eval_batch_size, t.eval_chunk, autocast, t.exclude_history)
    return {"seed": seed, "best_epoch": best_epoch, "epochs": len(history), "steps": step_count,
            "stopped_by": stopped_by, "train_seconds": round(train_seconds, 2), "valid": best_valid, "test": test,
            "history": history}


def lr_factor(schedule: Schedule, warmup_steps: int, total_steps: int):
    """The multiplier of ``lr`` after ``s`` optimizer steps: linear warmup over ``warmup_steps``, then 1
    (``constant``) or half a cosine reaching 0 at ``total_steps`` (``cosine``; the warmup counts)."""
    def factor(s: int) -> float:
        warm = min(1.0, (s + 1) / (warmup_steps + 1))
        if schedule is Schedule.CONSTANT:
            return warm
        progress = min(1.0, s / max(1, total_steps))
        return warm * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def _train_epoch(model: NextItemModel, opt, sched, train: Split, perm: np.ndarray, steps: int, batch_size: int,
                 grad_clip: float, autocast: bool, negatives_rng: torch.Generator, start: float,
                 budget: float) -> tuple[torch.Tensor, int, bool]:
    """``steps`` optimizer steps over the users ``perm`` in batches of ``batch_size``; stops early once
    ``budget`` seconds have passed since ``start``. Returns ``(sum of the step losses [] on the device, steps
    run, whether the budget ended it)``."""
    model.train()
    device = train.inputs.device
    loss_sum = torch.zeros((), device=device)
    for s in range(steps):
        batch = gather_batch(train, perm[s * batch_size:(s + 1) * batch_size])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            h = model.encode(batch, token_positions(batch))
        loss = model.head.loss(h.float(), train.targets[batch.rows], generator=negatives_rng) / h.shape[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        loss_sum += loss.detach()
        if time.perf_counter() - start > budget:
            return loss_sum, s + 1, True
    return loss_sum, steps, False


def format_table(result: dict) -> str:
    """A plain-text table: test (and validation) mean +- std per metric, then one line per seed."""
    lines = [f"{result['name']} ({result['model']}, {result['device'].get('name', result['device']['device'])}, "
             f"protocol {result['protocol']}, seeds {result['seeds']}; {result['data']['users']} users, "
             f"{result['data']['items']} items, {result['data']['skipped_short']} short sequences skipped)"]
    header = f"{'':<14}" + "".join(f"{m:>18}" for m in METRICS)
    lines.append(header)
    for split in ("test", "valid"):
        agg = result["aggregate"][split]
        if agg is None:  # published: no validation split
            continue
        lines.append(f"{split + ' mean+-std':<14}" + "".join(f"{agg[m]['mean']:>11.4f} +-{agg[m]['std']:.4f}"
                                                              for m in METRICS))
    for run in result["per_seed"]:
        weights = (f"final weights after {run['epochs']} epochs" if run["best_epoch"] is None
                   else f"best epoch {run['best_epoch']}/{run['epochs']}")
        lines.append(f"{'test seed ' + str(run['seed']):<14}" + "".join(f"{run['test'][m]:>18.4f}" for m in METRICS)
                     + f"   {weights}, stopped by {run['stopped_by']}, {run['train_seconds']:.0f} s")
    if "results_file" in result:
        lines.append(f"results: {result['results_file']}")
    return "\n".join(lines)

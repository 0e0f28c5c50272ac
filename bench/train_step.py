"""End-to-end training-step benchmark: token embeddings -> Backbone -> per-scenario MMoE -> weighted BCE ->
backward -> AdamW, bf16 autocast, on synthetic user-level batches with MTGR-like long-tailed lengths.

Compared side by side in one run (each row its own model, same batches):

* ``impl``: ``auto`` (Triton kernels on a GPU) vs the PyTorch reference and the padded ``dense``
  attention, all at a reduced batch (the reference loops over samples in Python);
* hybrid ``(3:1)x4`` (the ``mtfm`` preset) vs the same 16 layers all full;
* GQA: 1 KV head (``mtfm``) vs as many KV heads as query heads (3);
* input path: DevicePrefetcher (one merged pinned copy on a side stream, checks on the host, no host
  sync in the step) vs naive (``.to()`` per tensor, value checks on the device, ``nonzero`` for T rows);
* diagnostics: the main row without the relative-bias tables or with one of them (what the tables cost in
  the step), and one batch stepped eagerly against the same step captured as a CUDA graph and replayed (what
  the host's kernel launches cost).

Per row: median step time (CUDA events between steps, after warm-up), samples/s, tokens/s, model TFLOP/s
(backbone matmul FLOPs of the actual token mix from ``recfm.foundation.model.summary``, x3 for
forward + backward) and its share of a measured 8192^3 bf16 matmul. The table is printed last; JSON goes
to ``--out``.

GPU:   python bench/train_step.py                      (all rows: several minutes on one H100; --only picks rows)
CPU:   python bench/train_step.py --smoke              (tiny preset, tiny batches; checks the script runs)

Token embeddings are per-group Linear layers over random dense features (no torchrec needed); the
backbone FLOPs dominate (embeddings and heads are < 1% at these shapes and are not counted).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from recfm.foundation.data.batch import Batch, TargetGroup, TokenGroup
from recfm.foundation.data.device import DevicePrefetcher, check_batch, target_rows
from recfm.foundation.model.backbone import Backbone
from recfm.foundation.model.config import ModelConfig, load_model_config
from recfm.foundation.model.hstu import resolve_impl
from recfm.foundation.model.rows import scatter_rows, target_rows_of
from recfm.foundation.model.summary import summarize
from recfm.heads.mmoe import MMoEHead, weighted_mean
from recfm.kernels.group_layer_norm import IMPLS as GLN_IMPLS
from recfm.kernels.hstu_attention import IMPLS as ATTENTION_IMPLS
from recfm.scenarios.spec import FeatureSpec, FeatureType, LabelSpec, ScenarioSpec, TaskSpec, TaskType

ROOT = Path(__file__).resolve().parents[1]
SEQUENCES = ("clicks", "orders")
FEATURES = 32  # dense features per token


def scenarios(n: int) -> tuple[ScenarioSpec, ...]:
    """``n`` scenarios with a CTR and a CTCVR task each (weights 1 and 0.5)."""
    return tuple(
        ScenarioSpec(f"scn{i}", (FeatureSpec("f", FeatureType.DENSE, length=FEATURES),),
                     (LabelSpec("click"), LabelSpec("order")),
                     (TaskSpec("ctr", TaskType.BINARY, "click"), TaskSpec("ctcvr", TaskType.BINARY, "order", 0.5)))
        for i in range(n)
    )


# --------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Lengths:
    """Caps of H, R, T per sample; lengths are lognormal (median = cap * ``median``) clipped to [1, cap]."""

    history: int
    realtime: int
    targets: int
    median: float = 0.5
    sigma: float = 0.8

    def draw(self, rng: np.random.Generator, b: int) -> np.ndarray:
        """``[b, 3]`` int64 (H, R, T) lengths."""
        caps = np.array([self.history, self.realtime, self.targets])
        raw = np.exp(rng.normal(np.log(caps * self.median), self.sigma, size=(b, 3)))
        return np.clip(np.round(raw), 1, caps).astype(np.int64)


def synthetic_batch(rng: np.random.Generator, b: int, lengths: Lengths, specs: tuple[ScenarioSpec, ...]) -> Batch:
    """B user-level samples in the batch layout: H (2 kinds, time order), R, T grouped by scenario, every T
    after every R (so the summary's pair count is exact); random dense features and 0/1 labels."""
    k, s_count = len(SEQUENCES), len(specs)
    hrt = lengths.draw(rng, b)
    types, groups, stamps, kinds, samples, scen = [], [], [], [], [], []
    for i, (h, r, t) in enumerate(hrt):
        kind = rng.integers(0, k, size=h + r)
        scn = np.sort(rng.integers(0, s_count, size=t))
        types += [np.zeros(h, np.int8), np.ones(r, np.int8), np.full(t, 2, np.int8)]
        groups += [kind[:h], np.full(r, k), k + 1 + scn]
        stamps += [np.sort(rng.integers(0, 10**6, size=h)), 10**6 + np.arange(r), np.full(t, 2 * 10**6)]
        kinds += [kind, np.full(t, -1)]
        scen += [np.full(h + r, -1), scn]
        samples.append(np.full(h + r + t, i))
    cat = lambda xs, dt: np.concatenate(xs).astype(dt)  # noqa: E731
    token_type, group, timestamps = cat(types, np.int8), cat(groups, np.int64), cat(stamps, np.int64)
    kinds, scen, samples = cat(kinds, np.int64), cat(scen, np.int64), cat(samples, np.int64)
    n_tok = hrt.sum(1)
    offsets = np.concatenate([[0], np.cumsum(n_tok)]).astype(np.int64)
    t = torch.from_numpy

    def feats(n):
        return t(rng.standard_normal((n, FEATURES), dtype=np.float32))

    events = {}
    for kk, name in enumerate(SEQUENCES):
        rows = np.nonzero(kinds == kk)[0]
        events[name] = TokenGroup(name, t(rows), None, torch.zeros(rows.size, 0), feats(rows.size))
    targets = {}
    for si, spec in enumerate(specs):
        rows = np.nonzero(scen == si)[0]
        if rows.size == 0:
            continue
        click = rng.random(rows.size) < 0.1
        order = click & (rng.random(rows.size) < 0.2)
        targets[spec.name] = TargetGroup(
            spec.name, t(rows), None, torch.zeros(rows.size, 0), feats(rows.size),
            sample_index=t(samples[rows]), user_id=t(samples[rows]), exposure_id=t(rows.copy()),
            labels={"click": t(click.astype(np.float32)), "order": t(order.astype(np.float32))},
        )
    return Batch(offsets=t(offsets), token_type=t(token_type), timestamps=t(timestamps), group=t(group),
                 user_id=torch.arange(b), events=events, targets=targets, scenarios=tuple(s.name for s in specs),
                 sequences=SEQUENCES, max_len=int(n_tok.max()), num_targets=int(hrt[:, 2].sum()))


def batch_mix(batch: Batch) -> np.ndarray:
    """``[B, 3]`` (H, R, T) counts of a host batch."""
    tt = batch.token_type.numpy()
    sample = np.repeat(np.arange(batch.num_samples), np.diff(batch.offsets.numpy()))
    return np.stack([np.bincount(sample[tt == v], minlength=batch.num_samples) for v in (0, 1, 2)], 1)


def backbone_flops(cfg: ModelConfig, batch: Batch) -> float:
    """Forward backbone matmul FLOPs of the batch's actual token mix (sum over samples)."""
    return sum(summarize(cfg, int(h), int(r), int(t)).flops_backbone for h, r, t in batch_mix(batch))


# -------------------------------------------------------------------------------------------- model
class StepModel(nn.Module):
    """Per-group Linear token embeddings -> Backbone -> MMoE; ``forward`` returns the weighted BCE loss."""

    def __init__(self, cfg: ModelConfig, specs: tuple[ScenarioSpec, ...]):
        super().__init__()
        d = cfg.d_model
        self.embed = nn.ModuleDict({name: nn.Linear(FEATURES, d) for name in (*SEQUENCES, *(s.name for s in specs))})
        self.backbone = Backbone(cfg.backbone)
        h = cfg.head
        self.head = MMoEHead(specs, d, h.num_experts, h.expert_dim, h.tower_dim, h.dropout)

    def forward(self, batch: Batch, no_sync: bool) -> torch.Tensor:
        parts = {name: g for name, g in (*batch.events.items(), *batch.targets.items())}
        # assembled as the model's TokenEmbedder does: one scatter of all groups' rows
        x = scatter_rows(batch.num_tokens, [g.token_index for g in parts.values()],
                         [self.embed[name](g.dense) for name, g in parts.items()])
        y = self.backbone(x, batch.offsets, batch.token_type, batch.timestamps, batch.group, batch.max_len,
                          target_index=target_rows(batch) if no_sync else None, validate=not no_sync)
        logits = self.head(target_rows_of(y, batch.targets))
        return weighted_mean(self.head.losses(logits, batch.targets))


# -------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Run:
    """One row of the table."""

    name: str
    preset: str
    impl: str = "auto"
    batch_size: int = 32
    full_only: bool = False  # every layer a full layer (same depth)
    mha: bool = False  # as many KV heads as query heads (no GQA)
    prefetch: bool = True  # DevicePrefetcher + no-sync step; False: naive per-tensor copies and device checks
    tables: str = "both"  # relative-bias tables: both | pos | time | none (a diagnostic of what they cost)
    single: bool = False  # one batch stepped over and over (a diagnostic: the pair of rows below)
    graph: bool = False  # one batch's whole step captured once as a CUDA graph and replayed (no launch cost)


def model_config(run: Run, num_groups: int) -> ModelConfig:
    cfg = load_model_config(run.preset)
    b = cfg.backbone
    layer = replace(b.layer, num_groups=num_groups, impl=run.impl,
                    num_kv_heads=b.layer.num_heads if run.mha else b.layer.num_kv_heads,
                    use_pos_bias=b.layer.use_pos_bias and run.tables in ("both", "pos"),
                    use_time_bias=b.layer.use_time_bias and run.tables in ("both", "time"))
    if run.full_only:
        b = replace(b, num_blocks=b.num_layers, target_layers_per_block=0)
    return replace(cfg, backbone=replace(b, layer=layer))


def measure(run: Run, pool: list[Batch], specs, device: torch.device, steps: int, warmup: int, peak: float | None,
            autocast: bool, profile: bool = False) -> dict:
    """Warm up (at least one pass over the pool), then time ``steps`` steps; returns the row's numbers (with
    ``profile``: also a torch-profiler summary of the timed steps, which the profiler slows down)."""
    torch.manual_seed(0)
    cfg = model_config(run, len(SEQUENCES) + 1 + len(specs))
    model = StepModel(cfg, specs).to(device)
    cuda = device.type == "cuda"
    single = run.single or run.graph  # a graph replays one captured batch
    # the single-batch rows keep the optimizer's step count on the device, as a CUDA graph needs
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=cuda, capturable=cuda and single)
    if single:
        pool = pool[:1]
    warmup = max(warmup, len(pool))  # every batch shape once before timing: autotuning stays out of the timed steps
    batches = [pool[i % len(pool)] for i in range(warmup + steps)]
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def forward_backward(batch: Batch) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(batch, no_sync=run.prefetch)
        loss.backward()
        opt.step()
        return loss.detach()

    def step(batch: Batch) -> torch.Tensor:
        loss = forward_backward(batch)
        opt.zero_grad(set_to_none=True)
        return loss

    if run.graph:  # warm-up happens before the capture: then every step is a timed replay
        step = graphed_step(forward_backward, lambda: opt.zero_grad(set_to_none=True), pool[0], device, warmup)
        batches, warmup = batches[warmup:], 0
    if run.prefetch:
        source = iter(DevicePrefetcher(batches, device))
    else:
        source = (b.to(device, merged=False) for b in batches)
    marks, walls, losses = [], [], []
    prof = None
    for i, batch in enumerate(source):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize(device)
            wall0 = time.perf_counter()
            if profile:
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                          torch.profiler.ProfilerActivity.CUDA])
                prof.__enter__()
        if i >= warmup:
            marks.append(_mark(cuda))
        losses.append(step(batch))
    marks.append(_mark(cuda))
    if cuda:
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - wall0
    if prof is not None:
        prof.__exit__(None, None, None)
    times = [(_elapsed(a, b)) for a, b in zip(marks[:-1], marks[1:])]
    timed = batches[warmup:]
    tokens = statistics.fmean(b.num_tokens for b in timed)
    flops = statistics.fmean(backbone_flops(cfg, b) for b in timed) * 3  # forward + backward
    med = statistics.median(times)
    row = dict(
        name=run.name, run=asdict(run), step_ms=med * 1e3, step_ms_wall_mean=wall / steps * 1e3,
        samples_per_s=run.batch_size / med, tokens_per_s=tokens / med, tokens_per_batch=tokens,
        tflops=flops / med / 1e12, pct_peak=(100 * flops / med / peak) if peak else None,
        attention_impl=resolve_impl(run.impl, torch.zeros(1, device=device), ATTENTION_IMPLS),
        norm_impl=resolve_impl(run.impl, torch.zeros(1, device=device), GLN_IMPLS),
        layers=cfg.backbone.num_layers, target_layers=cfg.backbone.num_blocks * cfg.backbone.target_layers_per_block,
        kv_heads=cfg.backbone.layer.num_kv_heads, final_loss=float(losses[-1]),
        peak_mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
    )
    if prof is not None:
        row["profile"] = profile_summary(prof, steps)
    del model, opt
    if cuda:
        torch.cuda.empty_cache()
    return row


def graphed_step(forward_backward, zero_grad, batch: Batch, device: torch.device, warmup: int):
    """The whole training step on ``batch`` (forward, backward, optimizer) captured once as a CUDA graph; returns a
    ``step(batch)`` that replays it (its argument is ignored: the graph reads the captured batch's tensors). Warm-up
    (autotuning included) runs eagerly on a side stream first, as graph capture requires."""
    static = next(iter(DevicePrefetcher([batch], device)))
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            forward_backward(static)
            zero_grad()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # gradients are None here: the captured backward writes them, replays rewrite them
        loss = forward_backward(static)

    def step(_: Batch) -> torch.Tensor:
        graph.replay()
        return loss

    return step


def profile_summary(prof, steps: int, top: int = 40) -> dict:
    """Per step: GPU kernel time, kernel launches, and the ``top`` ops by self CUDA time and by self CPU time."""
    events = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.device_time for e in kernels) / 1e3 / steps
    by_cuda = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:top]
    by_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "gpu_kernel_ms_per_step": gpu_ms, "kernel_launches_per_step": len(kernels) / steps,
        "top_cuda": [(e.key[:90], round(e.self_device_time_total / 1e3 / steps, 3), e.count // steps) for e in by_cuda],
        "top_cpu": [(e.key[:90], round(e.self_cpu_time_total / 1e3 / steps, 3), e.count // steps) for e in by_cpu],
    }


def _mark(cuda: bool):
    if cuda:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e
    return time.perf_counter()


def _elapsed(a, b) -> float:
    return a.elapsed_time(b) / 1e3 if isinstance(a, torch.cuda.Event) else b - a


def matmul_peak(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """Measured bf16 matmul FLOP/s of an ``n^3`` product (median of ``iters``)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * n**3 / statistics.median(times)


def plan(args) -> list[Run]:
    """The rows: main shape, impl at a reduced batch, hybrid vs full, GQA, input path."""
    big, small = args.batch_size, args.ref_batch_size
    main = args.preset
    runs = [
        Run(f"{main} auto (prefetch, no sync)", main, "auto", big),
        Run(f"{main} naive input (per-tensor .to, device checks)", main, "auto", big, prefetch=False),
        Run(f"{main} without bias tables (diagnostic)", main, "auto", big, tables="none"),
        Run(f"{main} position table only (diagnostic)", main, "auto", big, tables="pos"),
        Run(f"{main} time table only (diagnostic)", main, "auto", big, tables="time"),
        Run(f"{main} one batch, eager (diagnostic)", main, "auto", big, single=True),
        Run(f"{main} one batch, CUDA graph (diagnostic)", main, "auto", big, single=True, graph=True),
        Run(f"{main} no tables, one batch, eager (diagnostic)", main, "auto", big, tables="none", single=True),
        Run(f"{main} no tables, one batch, CUDA graph (diagnostic)", main, "auto", big, tables="none", single=True,
            graph=True),
        Run(f"{main} auto @B={small}", main, "auto", small),
        Run(f"{main} reference @B={small}", main, "reference", small),
        Run(f"{main} dense attention @B={small}", main, "dense", small),
        Run("mtfm (3:1)x4 hybrid, 1 KV head", "mtfm", "auto", big),
        Run("mtfm depth, all full layers, 1 KV head", "mtfm", "auto", big, full_only=True),
        Run("mtfm (3:1)x4 hybrid, KV heads = query heads", "mtfm", "auto", big, mha=True),
    ]
    keep = [r for r in runs if r.impl == "auto" or r.impl in ATTENTION_IMPLS]
    if args.only:
        keep = [r for r in keep if any(word in r.name for word in args.only)]
    return keep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="medium", help="main preset (default medium)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per step for the main rows")
    p.add_argument("--ref-batch-size", type=int, default=4, help="samples per step for reference vs triton")
    p.add_argument("--history", type=int, default=1000, help="cap of H tokens per sample")
    p.add_argument("--realtime", type=int, default=100, help="cap of R tokens per sample")
    p.add_argument("--targets", type=int, default=50, help="cap of T tokens per sample")
    p.add_argument("--scenarios", type=int, default=3)
    p.add_argument("--steps", type=int, default=12, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--pool", type=int, default=6, help="distinct synthetic batches cycled through")
    p.add_argument("--only", nargs="*", help="keep rows whose name contains one of these words")
    p.add_argument("--profile", action="store_true", help="torch-profile the timed steps of every row")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run: tiny preset, short samples, 2 steps")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_step.json")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda:
        args.smoke = True
        args.preset, args.batch_size, args.ref_batch_size = "tiny", 3, 2
        args.history, args.realtime, args.targets, args.steps, args.warmup, args.pool = 24, 6, 4, 2, 1, 2
    device = torch.device("cuda" if cuda else "cpu")
    specs = scenarios(args.scenarios)
    lengths = Lengths(args.history, args.realtime, args.targets)
    runs = plan(args)
    if args.smoke:
        runs = [replace(r, preset="tiny") for r in runs if not r.graph]  # CUDA graphs need a GPU
    rng = np.random.default_rng(0)
    pools: dict[int, list[Batch]] = {}
    for size in sorted({r.batch_size for r in runs}):
        pools[size] = [synthetic_batch(rng, size, lengths, specs) for _ in range(args.pool)]
        for b in pools[size]:
            check_batch(b)
        if cuda:
            pools[size] = [b.pin_memory() for b in pools[size]]

    peak = matmul_peak(device) if cuda else None
    env = dict(device=torch.cuda.get_device_name(device) if cuda else "cpu", torch=torch.__version__,
               matmul_peak_tflops=peak / 1e12 if peak else None, smoke=args.smoke,
               lengths=asdict(lengths), scenarios=args.scenarios, steps=args.steps, warmup=args.warmup)
    mixes = {size: np.concatenate([batch_mix(b) for b in pool]) for size, pool in pools.items()}
    env["mean_tokens_per_sample"] = {str(s): dict(zip("HRT", m.mean(0).round(1).tolist())) for s, m in mixes.items()}
    print(f"device {env['device']}, torch {env['torch']}, bf16 matmul 8192^3: "
          f"{env['matmul_peak_tflops'] or float('nan'):.0f} TFLOP/s; mean tokens/sample {env['mean_tokens_per_sample']}",
          file=sys.stderr)

    rows = []
    for run in runs:
        try:
            row = measure(run, pools[run.batch_size], specs, device, args.steps, args.warmup, peak, autocast=cuda,
                          profile=args.profile)
        except Exception as e:  # noqa: BLE001 - one failing row (OOM, missing kernel) must not lose the others
            traceback.print_exc()
            row = dict(name=run.name, run=asdict(run), error=f"{type(e).__name__}: {e}")
            if cuda:
                torch.cuda.empty_cache()
        rows.append(row)
        print(f"done: {run.name}: " + (row.get("error") or f"{row['step_ms']:.1f} ms/step"), file=sys.stderr)
        if "profile" in row:
            prof = row["profile"]
            print(f"profile: {prof['gpu_kernel_ms_per_step']:.2f} ms of GPU kernels and "
                  f"{prof['kernel_launches_per_step']:.0f} launches per step", file=sys.stderr)
            for title in ("top_cuda", "top_cpu"):
                print(f"  {title} (name, ms per step, calls per step):", file=sys.stderr)
                for name, ms, calls in prof[title]:
                    print(f"    {ms:9.3f} {calls:6d}  {name}", file=sys.stderr)

    ratios = _ratios(rows)
    if cuda:
        from recfm.kernels.hstu_attention.triton_launch import tuned_configs

        env["attention_configs"] = tuned_configs()  # what the autotuner picked per kernel and shape class
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(env=env, rows=rows, ratios=ratios), indent=2))
    print(_table(rows, ratios, env))
    print(f"\nwrote {args.out}")
    return 0


def _ratios(rows: list[dict]) -> dict:
    by = {r["name"]: r for r in rows if "error" not in r}

    def ratio(a_word: str, b_word: str) -> float | None:
        a = next((r for n, r in by.items() if a_word in n), None)
        b = next((r for n, r in by.items() if b_word in n), None)
        return a["samples_per_s"] / b["samples_per_s"] if a and b else None

    return {
        "auto_over_reference_same_batch": ratio("auto @B=", "reference @B="),
        "auto_over_dense_same_batch": ratio("auto @B=", "dense attention @B="),
        "hybrid_over_full": ratio("hybrid, 1 KV", "all full layers"),
        "gqa1_over_mha": ratio("hybrid, 1 KV", "KV heads = query heads"),
        "prefetch_nosync_over_naive": ratio("(prefetch, no sync)", "naive input"),
        "without_tables_over_with": ratio("without bias tables", "(prefetch, no sync)"),
    }


def _table(rows: list[dict], ratios: dict, env: dict) -> str:
    head = f"{'run':<52}{'B':>4}{'attn':>10}{'ms/step':>9}{'samples/s':>11}{'tokens/s':>11}{'TFLOP/s':>9}{'%peak':>7}{'mem GB':>8}"
    lines = ["", f"train step on {env['device']} (bf16 matmul peak {env['matmul_peak_tflops'] or float('nan'):.0f} "
             f"TFLOP/s); lengths {env['lengths']}", head, "-" * len(head)]
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:<52}{r['run']['batch_size']:>4}  ERROR {' '.join(r['error'].split())[:90]}")
            continue
        lines.append(
            f"{r['name']:<52}{r['run']['batch_size']:>4}{r['attention_impl']:>10}{r['step_ms']:>9.1f}"
            f"{r['samples_per_s']:>11.1f}{r['tokens_per_s']:>11.3g}{r['tflops']:>9.1f}{f(r['pct_peak'], '.1f'):>7}"
            f"{f(r['peak_mem_gb'], '.1f'):>8}"
        )
    lines.append("")
    lines += [f"{k}: {f(v, '.2f')}x" for k, v in ratios.items()]
    lines.append("TFLOP/s = backbone matmul FLOPs of the actual token mix x 3 (fwd+bwd) / median step time")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Per-kernel CUDA time of the Triton HSTU attention (forward + backward), by torch.profiler (GPU only).

    python -m bench.attention_profile --out bench/results/attention_profile.json

Uses the shapes and bias-table variants of :mod:`bench.attention_sweep` (B=16, L=4096, bf16) with block
sizes pinned (``triton_launch.pinned``) so that rows differ only in what they name. Prints, per row, the
mean time per forward+backward of each CUDA kernel (ms, over ``--steps`` profiled passes after warm-up)
and the pinned kernels' relative error against the fp32 reference on a small jagged batch ("check"), and
writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LIGHT = dict(fwd=(128, 64, 8, 3), dq=(128, 64, 8, 3), dkdv=(64, 128, 8, 3))  # the sweep's best, no tables
HEAVY = dict(fwd=(128, 64, 8, 3), dq=(128, 64, 8, 2), dkdv=(32, 128, 8, 3), band=(32, 32, 4, 2))  # with tables
INLINE = dict(fwd=(128, 64, 8, 3), dq_inline=(32, 32, 4, 2), dkdv=(32, 128, 8, 3))  # one dQ pass for the tables
INLINE_64 = dict(INLINE, dq_inline=(64, 32, 8, 2))
D256_OLD = dict(fwd=(128, 64, 8, 2), dq=(64, 64, 8, 2), dkdv=(32, 64, 8, 2))  # d 256 first configs before 52ffb8d
D256 = dict(fwd=(128, 64, 8, 2), dq=(128, 32, 8, 3), dkdv=(64, 64, 8, 2))  # d 256 first configs since
# the medium training step's picks (3 x 256, max_len ~1150: one dQ pass), bench/train_step.py's JSON
STEP = dict(fwd=(128, 32, 8, 2), dq=(64, 64, 8, 2), dq_inline=(32, 32, 4, 2), dkdv=(32, 64, 8, 2))
STEP_PLAIN = dict(fwd=(128, 32, 8, 3), dq=(128, 32, 8, 3), dkdv=(32, 64, 8, 3))
STEP_SPLIT = dict(STEP, band=(32, 32, 4, 2))
# the step's tables with the dS buffer: dQ in the blocks of attention without tables, storing dS; dsgrad reads it
STEP_ONE_PASS = dict(STEP, fwd=(128, 32, 8, 3), dkdv=(64, 64, 8, 2))  # the autotuner's forward and dK/dV in the step
STEP_DS = dict(STEP_ONE_PASS, dq=(128, 32, 8, 2), dsgrad=(16, 32, 1, 2), diag=(32, 32, 1, 1))
STEP_DS_64x32 = dict(STEP_DS, dkdv=(64, 32, 4, 2))  # with dK/dV's pick when it reads dS
STEP_SC = STEP_DS_64x32  # the score cache's rows start from the last step's picks
STEP_SC_BEST = dict(STEP_SC, dq=(128, 32, 8, 3), dkdv=(64, 64, 8, 2))  # and its own picks (run 13)
STEP_SPLIT_DKDV = dict(STEP_SC_BEST, dk=(64, 128, 8, 2), dv=(64, 128, 8, 2))  # dK and dV as two launches
STEP_13 = dict(STEP_SC_BEST, dk=(64, 128, 8, 3), dv=(64, 128, 8, 3))  # run 13's picks
KINDS = ("fwd", "bias", "dq", "band", "dsgrad", "diag", "dkdv")
KERNEL_NAMES = {"band": "hstu_band_grad_kernel", "dsgrad": "hstu_ds_grad_kernel", "diag": "hstu_diag_grad_kernel"}  # others: hstu_{kind}_kernel
ROWS = [  # (label, sweep variant, pinned block sizes, table gradients split between dq and band[, options])
    # options: {"frozen": True} the tables take no gradient; {"ds_buffer": False} no dS buffer (one dQ pass);
    # {"dkdv_ds": False} with the buffer, dK/dV recomputes dS instead of reading it; {"diag": False} every pair's
    # position gradient in dsgrad; {"scores": False} the backward recomputes q k^T (no score cache);
    # {"dkdv_split": False} dK and dV in one launch
    ("no tables, light blocks", "mixed-nobias", LIGHT, True),
    ("position table", "mixed-pos", HEAVY, True),
    ("time table", "mixed-time", HEAVY, True),
    ("both tables", "mixed", HEAVY, True),
    ("both tables, one dQ pass", "mixed", INLINE, False),
    ("both tables, one dQ pass 64x32", "mixed", INLINE_64, False),
    ("target layer, no tables", "targets-nobias", LIGHT, True),
    ("target layer, both tables", "targets", HEAVY, True),
    ("2 x 256 causal, dq 64x64, dkdv 32x64", "causal-2x256", D256_OLD, True),
    ("2 x 256 causal, dq 128x32, dkdv 64x64", "causal-2x256", D256, True),
    # the medium step's attention (use with --length 1024): what each table and its gradient cost there
    ("step d256: no tables", "medium-nobias", STEP_PLAIN, True),
    ("step d256: position table", "medium-pos", STEP, False),
    ("step d256: time table", "medium-time", STEP, False),
    ("step d256: both tables", "medium", STEP, False),
    ("step d256: both tables, frozen", "medium", STEP, False, {"frozen": True}),
    ("step d256: both tables, split", "medium", STEP_SPLIT, True),
    ("step d256: both tables, dQ 64x32", "medium", dict(STEP, dq_inline=(64, 32, 8, 2)), False),
    # the one-pass dQ's small tiles with fewer warps or more stages (cross-warp reductions of the table gradients)
    ("step d256: both tables, dQ 32x32 2 warps", "medium", dict(STEP, dq_inline=(32, 32, 2, 2)), False),
    ("step d256: both tables, dQ 32x32 3 stages", "medium", dict(STEP, dq_inline=(32, 32, 4, 3)), False),
    ("step d256: both tables, dQ 32x32 2 warps 3 stages", "medium", dict(STEP, dq_inline=(32, 32, 2, 3)), False),
    ("step d256: both tables, dQ 16x32 2 warps", "medium", dict(STEP, dq_inline=(16, 32, 2, 2)), False),
    ("step d256: both tables, dQ 32x16 2 warps", "medium", dict(STEP, dq_inline=(32, 16, 2, 2)), False),
    # wider key tiles (half the loop iterations per query tile) and more warps per 32-row tile
    ("step d256: both tables, dQ 32x64", "medium", dict(STEP, dq_inline=(32, 64, 4, 2)), False),
    ("step d256: both tables, dQ 32x64 8 warps", "medium", dict(STEP, dq_inline=(32, 64, 8, 2)), False),
    ("step d256: both tables, dQ 32x32 8 warps", "medium", dict(STEP, dq_inline=(32, 32, 8, 2)), False),
    ("step d256: both tables, dQ 32x64 3 stages", "medium", dict(STEP, dq_inline=(32, 64, 4, 3)), False),
    # the forward with 3 stages once the bias cache's tile is pipelined (it takes a stage's shared memory)
    ("step d256: both tables, fwd 128x32 3 stages", "medium", dict(STEP, fwd=(128, 32, 8, 3)), False),
    # the table gradients from a stored dS (triton_impl.DS_BUFFER) against the one dQ pass, and their block sizes
    ("step d256: both tables, one dQ pass", "medium", STEP_ONE_PASS, False, {"ds_buffer": False}),
    ("step d256: both tables, dS buffer", "medium", STEP_DS, False),
    ("step d256: position table, dS buffer", "medium-pos", STEP_DS, False),
    ("step d256: time table, dS buffer", "medium-time", STEP_DS, False),
    ("step d256: both tables, dS buffer, dsgrad 64x32 4 warps", "medium", dict(STEP_DS, dsgrad=(64, 32, 4, 2)), False),
    ("step d256: both tables, dS buffer, dsgrad 32x32 4 warps", "medium", dict(STEP_DS, dsgrad=(32, 32, 4, 2)), False),
    ("step d256: both tables, dS buffer, dsgrad 64x32 2 warps", "medium", dict(STEP_DS, dsgrad=(64, 32, 2, 2)), False),
    ("step d256: both tables, dS buffer, dsgrad 32x64 4 warps", "medium", dict(STEP_DS, dsgrad=(32, 64, 4, 2)), False),
    ("step d256: both tables, dS buffer, dsgrad 32x32 1 warp", "medium", dict(STEP_DS, dsgrad=(32, 32, 1, 2)), False),
    ("step d256: both tables, dS buffer, dsgrad 16x32 1 warp", "medium", dict(STEP_DS, dsgrad=(16, 32, 1, 2)), False),
    ("step d256: both tables, dS buffer, dsgrad 16x32 2 warps", "medium", dict(STEP_DS, dsgrad=(16, 32, 2, 2)), False),
    ("step d256: both tables, dS buffer, dsgrad 32x16 1 warp", "medium", dict(STEP_DS, dsgrad=(32, 16, 1, 2)), False),
    ("step d256: both tables, dS buffer, dsgrad 16x16 1 warp", "medium", dict(STEP_DS, dsgrad=(16, 16, 1, 2)), False),
    ("step d256: both tables, dS buffer, dsgrad 16x64 1 warp", "medium", dict(STEP_DS, dsgrad=(16, 64, 1, 2)), False),
    ("step d256: both tables, dS buffer, dsgrad 16x32 1 warp 3 stages", "medium", dict(STEP_DS, dsgrad=(16, 32, 1, 3)),
     False),
    ("step d256: both tables, dS buffer, dq 64x32 3 stages", "medium", dict(STEP_DS, dq=(64, 32, 4, 3)), False),
    # dK/dV reading the stored dS (triton_impl.DKDV_READS_DS: dQ first, three products per tile) against recomputing
    # it, and its block sizes without the V tile
    ("step d256: both tables, dS buffer, dkdv recomputes dS", "medium", STEP_DS, False, {"dkdv_ds": False}),
    ("step d256: both tables, dkdv reads dS", "medium", STEP_DS, False),
    ("step d256: both tables, dkdv reads dS, 32x64", "medium", dict(STEP_DS, dkdv=(32, 64, 8, 2)), False),
    ("step d256: both tables, dkdv reads dS, 32x64 3 stages", "medium", dict(STEP_DS, dkdv=(32, 64, 8, 3)), False),
    ("step d256: both tables, dkdv reads dS, 64x32 4 warps", "medium", dict(STEP_DS, dkdv=(64, 32, 4, 2)), False),
    ("step d256: both tables, dkdv reads dS, 32x32 4 warps", "medium", dict(STEP_DS, dkdv=(32, 32, 4, 2)), False),
    ("step d256: both tables, dkdv reads dS, 128x64", "medium", dict(STEP_DS, dkdv=(128, 64, 8, 2)), False),
    # the position table's unclamped pairs of keys at their own positions along the dS buffer's diagonals
    # (triton_impl.DIAG_GRADS) against the table-gradient kernel adding every pair; the diag kernel's block sizes
    ("step d256: both tables, all pairs in dsgrad", "medium", STEP_DS_64x32, False, {"diag": False}),
    ("step d256: both tables, diag 32x32 1 warp", "medium", STEP_DS_64x32, False),
    ("step d256: both tables, diag 32x64 1 warp", "medium", dict(STEP_DS_64x32, diag=(32, 64, 1, 1)), False),
    ("step d256: both tables, diag 16x64 1 warp", "medium", dict(STEP_DS_64x32, diag=(16, 64, 1, 1)), False),
    ("step d256: both tables, diag 64x64 2 warps", "medium", dict(STEP_DS_64x32, diag=(64, 64, 2, 1)), False),
    ("step d256: both tables, diag 32x64 2 warps", "medium", dict(STEP_DS_64x32, diag=(32, 64, 2, 1)), False),
    ("step d256: both tables, diag 32x128 2 warps", "medium", dict(STEP_DS_64x32, diag=(32, 128, 2, 1)), False),
    ("step d256: both tables, dsgrad 32x32 1 warp, diag", "medium", dict(STEP_DS_64x32, dsgrad=(32, 32, 1, 2)), False),
    ("step d256: both tables, dsgrad 16x64 1 warp, diag", "medium", dict(STEP_DS_64x32, dsgrad=(16, 64, 1, 2)), False),
    ("step d256: both tables, dsgrad 16x16 1 warp, diag", "medium", dict(STEP_DS_64x32, dsgrad=(16, 16, 1, 2)), False),
    ("step d256: both tables, dsgrad 32x64 2 warps, diag", "medium", dict(STEP_DS_64x32, dsgrad=(32, 64, 2, 2)), False),
    # 8 warps on 64-row tiles: 8 rows per warp, so Q, dO and the fp32 accumulators fit the registers (bench/
    # kernel_report.py: dQ spills 20 bytes at 64 x 32 x 8 against 272 at 128 x 32 x 8, dK/dV 32 against 168)
    ("step d256: both tables, dq 64x32 8 warps", "medium", dict(STEP_DS_64x32, dq=(64, 32, 8, 2)), False),
    ("step d256: both tables, dq 64x32 8 warps 3 stages", "medium", dict(STEP_DS_64x32, dq=(64, 32, 8, 3)), False),
    ("step d256: both tables, dkdv 64x32 8 warps", "medium", dict(STEP_DS_64x32, dkdv=(64, 32, 8, 2)), False),
    ("step d256: both tables, dkdv 64x32 8 warps 3 stages", "medium", dict(STEP_DS_64x32, dkdv=(64, 32, 8, 3)), False),
    ("step d256: no tables, dq 64x32 8 warps", "medium-nobias", dict(STEP_PLAIN, dq=(64, 32, 8, 3)), True),
    ("step d256: no tables, fwd 64x32 8 warps", "medium-nobias", dict(STEP_PLAIN, fwd=(64, 32, 8, 3)), True),
    ("step d256: both tables, fwd 64x32 8 warps", "medium", dict(STEP_DS_64x32, fwd=(64, 32, 8, 3)), False),
    # the score cache (triton_impl.SCORE_CACHE): the backward reads the forward's scores instead of q k^T
    ("step d256: both tables, recomputed scores", "medium", STEP_SC, False, {"scores": False}),
    ("step d256: both tables, score cache", "medium", STEP_SC, False, {"dkdv_split": False}),
    ("step d256: score cache, dq 128x32 3 stages", "medium", dict(STEP_SC, dq=(128, 32, 8, 3)),
     False, {"dkdv_split": False}),
    ("step d256: score cache, its picks", "medium", STEP_SC_BEST, False, {"dkdv_split": False}),
    # dK and dV as two launches of the dK/dV kernel (triton_impl.DKDV_SPLIT), one accumulator each (dkdv: both)
    ("step d256: score cache, dk/dv 64x128", "medium", STEP_SPLIT_DKDV, False),
    ("step d256: score cache, dk/dv 32x128", "medium", dict(STEP_SPLIT_DKDV, dk=(32, 128, 8, 2), dv=(32, 128, 8, 2)),
     False),
    ("step d256: score cache, dk/dv 64x64", "medium", dict(STEP_SPLIT_DKDV, dk=(64, 64, 8, 2), dv=(64, 64, 8, 2)),
     False),
    ("step d256: score cache, dk/dv 64x64 4 warps", "medium",
     dict(STEP_SPLIT_DKDV, dk=(64, 64, 4, 2), dv=(64, 64, 4, 2)), False),
    ("step d256: score cache, dk/dv 64x128 3 stages", "medium",
     dict(STEP_SPLIT_DKDV, dk=(64, 128, 8, 3), dv=(64, 128, 8, 3)), False),
    ("step d256: score cache, dk/dv 128x64", "medium", dict(STEP_SPLIT_DKDV, dk=(128, 64, 8, 2), dv=(128, 64, 8, 2)),
     False),
    ("step d256: no tables, score cache", "medium-nobias", STEP_SC_BEST, False),
    ("step d256: score cache, dq 64x32 8 warps", "medium", dict(STEP_SC, dq=(64, 32, 8, 2)),
     False, {"dkdv_split": False}),
    ("step d256: score cache, dq 64x32 8 warps 3 stages", "medium", dict(STEP_SC, dq=(64, 32, 8, 3)),
     False, {"dkdv_split": False}),
    ("step d256: score cache, dq 128x16 3 stages", "medium", dict(STEP_SC, dq=(128, 16, 8, 3)),
     False, {"dkdv_split": False}),
    ("step d256: score cache, dq 64x64", "medium", dict(STEP_SC, dq=(64, 64, 8, 2)), False, {"dkdv_split": False}),
    ("step d256: score cache, dkdv 32x64", "medium", dict(STEP_SC, dkdv=(32, 64, 8, 2)), False, {"dkdv_split": False}),
    ("step d256: score cache, dkdv 32x64 3 stages", "medium", dict(STEP_SC, dkdv=(32, 64, 8, 3)),
     False, {"dkdv_split": False}),
    ("step d256: score cache, dkdv 64x64", "medium", dict(STEP_SC, dkdv=(64, 64, 8, 2)), False, {"dkdv_split": False}),
    ("step d256: score cache, dkdv 64x64 3 stages", "medium", dict(STEP_SC, dkdv=(64, 64, 8, 3)),
     False, {"dkdv_split": False}),
    ("step d256: score cache, dkdv 32x32", "medium", dict(STEP_SC, dkdv=(32, 32, 4, 2)), False, {"dkdv_split": False}),
    ("step d256: score cache, fwd 64x32 8 warps", "medium", dict(STEP_SC, fwd=(64, 32, 8, 3)),
     False, {"dkdv_split": False}),
    ("step d256: score cache, fwd 128x32 2 stages", "medium", dict(STEP_SC, fwd=(128, 32, 8, 2)),
     False, {"dkdv_split": False}),
    ("step d256: score cache, fwd 128x64", "medium", dict(STEP_SC, fwd=(128, 64, 8, 2)), False, {"dkdv_split": False}),
    ("step d256: score cache, fwd 64x64", "medium", dict(STEP_SC, fwd=(64, 64, 8, 2)), False, {"dkdv_split": False}),
    ("step d256: score cache, fwd 64x32 4 warps", "medium", dict(STEP_SC, fwd=(64, 32, 4, 3)),
     False, {"dkdv_split": False}),
    ("step d256: position table, diag", "medium-pos", STEP_DS_64x32, False),
    ("step d256: time table, diag", "medium-time", STEP_DS_64x32, False),
]


def known(pins: dict) -> dict:
    """The pins of the kernel kinds the installed launcher has (the bench also runs against older commits)."""
    from recfm.kernels.hstu_attention import triton_launch

    return {kind: cfg for kind, cfg in pins.items() if kind in triton_launch._KERNELS}


def profile_row(variant: str, pins: dict, steps: int, length: int, tokens: int, frozen: bool = False) -> dict:
    """Mean CUDA ms per forward+backward of each kernel (``dq_inline`` is reported as ``dq``); ``frozen``:
    the bias tables take no gradient (the backward adds them to the scores but computes no table gradient)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.attention import attention_fn
    from bench.attention_sweep import make
    from recfm.kernels.hstu_attention.triton_launch import pinned

    batch, _ = make(variant, length, tokens)
    if frozen:
        for name in ("pos_bias", "time_bias"):
            if name in batch["kw"]:
                batch["kw"][name] = batch["kw"][name].detach()
    fn = attention_fn("triton", batch)
    q, k, v = (batch[name].detach().clone().requires_grad_() for name in ("q", "k", "v"))
    with pinned(**known(pins)):
        grad = torch.randn_like(fn(q, k, v).detach())
        for _ in range(4):  # compile and warm up
            fn(q, k, v).backward(grad)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                fn(q, k, v).backward(grad)
            torch.cuda.synchronize()
    kernels = {e.key: e.device_time_total / steps / 1e3 for e in prof.key_averages() if e.device_time_total > 0}
    return dict(sorted(kernels.items(), key=lambda kv: -kv[1]))


def check_row(variant: str, pins: dict) -> float:
    """Relative error of the pinned kernels against the fp32 reference (``bench.attention.check_config``)."""
    import torch

    from bench.attention import check_config
    from bench.attention_sweep import VARIANTS
    from recfm.kernels.hstu_attention.triton_launch import pinned

    h, h_kv, d, mask, tables = VARIANTS[variant]
    if not tables and "-" not in mask:
        mask += "-nobias"  # the check's batch without tables, like the row's
    with pinned(**known(pins)):
        return check_config(h, h_kv, d, mask, "cuda", torch.bfloat16, smoke=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--rows", nargs="*",
                        help="keep rows whose label contains one of these words (`=label`: that label only)")
    default_out = Path(__file__).resolve().parent / "results" / "attention_profile.json"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench.attention_profile: no CUDA GPU here; nothing to profile")
        return 0
    rows = []
    print(f"{'row':32s} " + " ".join(f"{kind + ' ms':>8s}" for kind in KINDS) + f" {'all ms':>8s} {'check':>8s}")
    from recfm.kernels.hstu_attention import triton_launch

    from recfm.kernels.hstu_attention import triton_impl

    for label, variant, pins, split, *options in ROWS:
        if args.rows and not any(label == word[1:] if word.startswith("=") else word in label for word in args.rows):
            continue
        opts = options[0] if options else {}
        triton_launch.SPLIT_FROM_LEN = 0 if split else 1 << 30  # both the profile and the check follow the row
        if hasattr(triton_impl, "DS_BUFFER"):
            triton_impl.DS_BUFFER = opts.get("ds_buffer", True)
        if hasattr(triton_impl, "DKDV_READS_DS"):
            triton_impl.DKDV_READS_DS = opts.get("dkdv_ds", True)
        if hasattr(triton_impl, "DIAG_GRADS"):
            triton_impl.DIAG_GRADS = opts.get("diag", True)
        if hasattr(triton_impl, "SCORE_CACHE"):
            triton_impl.SCORE_CACHE = opts.get("scores", True)
        if hasattr(triton_impl, "DKDV_SPLIT"):
            triton_impl.DKDV_SPLIT = opts.get("dkdv_split", True)
        try:
            kernels = profile_row(variant, pins, args.steps, args.length, args.tokens, opts.get("frozen", False))
            check = check_row(variant, pins)
        except Exception as e:  # noqa: BLE001 - a block size over the hardware's limits must not lose the other rows
            rows.append(dict(row=label, variant=variant, pinned=pins, error=f"{type(e).__name__}: {e}"))
            print(f"{label:32s} ERROR {type(e).__name__}: {str(e)[:100]}", flush=True)
            continue
        rows.append(dict(row=label, variant=variant, pinned=pins, split=split, frozen=opts.get("frozen", False),
                         ds_buffer=opts.get("ds_buffer", True), dkdv_ds=opts.get("dkdv_ds", True),
                         diag=opts.get("diag", True), scores=opts.get("scores", True),
                         dkdv_split=opts.get("dkdv_split", True), kernels_ms=kernels, check=check))
        ms = [kernels.get(KERNEL_NAMES.get(kind, f"hstu_{kind}_kernel"), 0.0) for kind in KINDS]
        total = sum(kernels.values())
        print(f"{label:32s} " + " ".join(f"{t:8.3f}" for t in ms) + f" {total:8.3f} {check:8.1e}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                        length=args.length, tokens=args.tokens, rows=rows), indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

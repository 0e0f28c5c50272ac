"""Block-size sweep of the Triton HSTU attention kernels at the headline shapes (GPU only).

    python -m bench.attention_sweep --out bench/results/sweep        # H100: ~5 min with 15 compile workers

Each kernel (``fwd``, ``dq``, ``dkdv``, and ``band`` with bias tables) is timed with every candidate ``(BLOCK_M, BLOCK_N, num_warps,
num_stages)`` while the other two stay at their first candidate (``triton_launch.pinned``), at
B = 16, L = 4096, 4 heads x 128, bf16, for the variants below. Compilation dominates a sweep, so worker
processes first compile every candidate into Triton's on-disk cache (one launch each, in parallel), then
this process times them one after another. Last, the best candidate of each kernel is combined, checked
against the fp32 reference (``bench.attention.check_config``) and timed, with torch SDPA (flash,
causal softmax) at the same shape where the mask allows it. TFLOP/s as in ``bench.attention`` (allowed
pairs, forward ``4 d`` per pair per head, forward + backward 3.5x). Rows go to ``<out>/sweep.json`` as
they come (a run cut short keeps what it measured); the table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {  # name: (h, h_kv, d, mask, bias tables kept: "pos,time" | "pos" | "time" | "")
    "causal": (4, 4, 128, "causal", ""),
    "causal-1kv": (4, 1, 128, "causal", ""),
    "mixed": (4, 4, 128, "mixed", "pos,time"),
    "mixed-nobias": (4, 4, 128, "mixed", ""),
    "mixed-pos": (4, 4, 128, "mixed", "pos"),
    "mixed-time": (4, 4, 128, "mixed", "time"),
    "mixed-1kv": (4, 1, 128, "mixed", "pos,time"),
    "targets": (4, 4, 128, "targets", "pos,time"),
    "targets-nobias": (4, 4, 128, "targets", ""),
    "medium": (3, 3, 256, "mixed", "pos,time"),  # the medium preset's attention (3 heads x 256, bias tables)
    "medium-nobias": (3, 3, 256, "mixed", ""),
    "medium-pos": (3, 3, 256, "mixed", "pos"),
    "medium-time": (3, 3, 256, "mixed", "time"),
    "causal-2x256": (2, 2, 256, "causal", ""),  # the d 256 head size without tables
}
LIGHT = {  # no bias tables
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3),
            (128, 32, 8, 3), (64, 128, 4, 3), (128, 64, 8, 4)],
    "dq": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3), (128, 128, 8, 2),
           (64, 128, 8, 2)],
    "dkdv": [(32, 128, 8, 3), (64, 128, 8, 2), (64, 128, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 64, 8, 3),
             (128, 64, 8, 2), (32, 64, 4, 3)],
}
HEAVY = {  # position and/or time bias tables (mixed, targets); "band": the table gradients near the diagonal
    "fwd": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2)],
    "dq": [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 8, 2)],
    "dkdv": [(32, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 3)],
    "band": [(32, 32, 4, 2), (64, 32, 4, 2), (32, 32, 4, 3), (64, 64, 8, 2)],
}
LIGHT_256 = {  # d 256, no bias tables
    "fwd": [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 2)],
    "dq": [(128, 32, 8, 3), (64, 64, 8, 2), (64, 32, 4, 3)],
    "dkdv": [(64, 64, 8, 2), (32, 64, 8, 3), (32, 64, 8, 2), (16, 64, 8, 2)],
}
HEAVY_256 = {
    "fwd": [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 8, 2)],
    "dq": [(64, 64, 8, 2), (64, 32, 8, 2), (128, 32, 8, 3)],
    "dkdv": [(32, 64, 8, 2), (64, 64, 8, 2)],
    "band": [(32, 32, 4, 2), (32, 64, 4, 2)],
}


def candidates(variant: str) -> dict:
    _, _, d, mask, tables = VARIANTS[variant]
    if not tables:
        return LIGHT_256 if d > 128 else LIGHT
    return HEAVY_256 if d > 128 else HEAVY


def jobs(variants: list[str]) -> list[tuple[str, str, tuple]]:
    """``(variant, kind, config)`` for every candidate of every kernel."""
    return [(v, kind, cfg) for v in variants for kind, cfgs in candidates(v).items() for cfg in cfgs]


def pins(variant: str, kind: str, cfg: tuple) -> dict:
    base = {k: cfgs[0] for k, cfgs in candidates(variant).items()}
    return {**base, kind: cfg}


def make(variant: str, length: int, tokens: int):
    import torch

    from bench.attention import allowed_pairs, make_batch

    h, h_kv, d, mask, tables = VARIANTS[variant]
    batch = make_batch(length, tokens // length, h, h_kv, d, mask, "cuda", torch.bfloat16)
    for name in ("pos", "time"):
        if name not in tables.split(","):
            batch["kw"].pop(f"{name}_bias", None)
    return batch, 4.0 * d * allowed_pairs(batch, mask) * h


def run_job(batch: dict, kind: str, pin: dict, bench: bool) -> dict:
    """Compile (and with ``bench``, time) one pinned configuration: forward only for ``fwd``, else
    forward + backward."""
    import torch

    from bench.attention import attention_fn
    from recfm.kernels.hstu_attention.triton_launch import pinned

    fn = attention_fn("triton", batch)
    q, k, v = (batch[name].detach().clone().requires_grad_() for name in ("q", "k", "v"))
    tables = [t for name, t in batch["kw"].items() if name.endswith("_bias")]
    with pinned(**pin):
        grad = torch.randn_like(fn(q, k, v).detach())

        def forward():
            with torch.no_grad():
                fn(q, k, v)

        def forward_backward():
            fn(q, k, v).backward(grad)

        forward_backward() if kind != "fwd" else forward()
        if q.is_cuda:
            torch.cuda.synchronize()
        if not bench:
            return {}
        from triton.testing import do_bench

        if kind == "fwd":
            return {"ms": do_bench(forward, warmup=10, rep=60, return_mode="median")}
        return {"ms": do_bench(forward_backward, warmup=10, rep=60, grad_to_none=[q, k, v, *tables],
                               return_mode="median")}


def worker(args) -> int:
    """Compile this worker's share of the jobs (every ``workers``-th, from ``index``)."""
    mine = jobs(args.variants.split(","))[args.index::args.workers]
    made = {}
    for variant, kind, cfg in mine:
        if variant not in made:
            made[variant] = make(variant, args.length, args.tokens)[0]
        try:
            run_job(made[variant], kind, pins(variant, kind, cfg), bench=False)
        except Exception:  # reported by the timing pass
            pass
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--index", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "sweep")
    args = parser.parse_args(argv)
    if args.index >= 0:
        return worker(args)
    import torch

    if not torch.cuda.is_available():
        print("bench.attention_sweep: no CUDA GPU here; nothing to time")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / "sweep.json"
    start = time.perf_counter()
    base = [sys.executable, "-m", "bench.attention_sweep", "--variants", args.variants, "--length", str(args.length),
            "--tokens", str(args.tokens), "--workers", str(args.workers)]
    procs = [subprocess.Popen(base + ["--index", str(i)]) for i in range(args.workers)]
    for p in procs:
        p.wait()
    compile_s = time.perf_counter() - start
    print(f"compiled in {compile_s:.0f} s with {args.workers} workers", flush=True)

    from bench.attention import attention_fn, check_config, measure

    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "length": args.length, "tokens": args.tokens,
              "compile_s": round(compile_s, 1), "rows": [], "best": []}

    def save():
        out_file.write_text(json.dumps(report, indent=1))

    for variant in args.variants.split(","):
        batch, flops = make(variant, args.length, args.tokens)
        best = {}
        for kind, cfgs in candidates(variant).items():
            for cfg in cfgs:
                try:
                    res = run_job(batch, kind, pins(variant, kind, cfg), bench=True)
                    status = "ok"
                except Exception as err:
                    res, status = {}, f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
                row = {"variant": variant, "kind": kind, "config": cfg, "status": status, **res}
                if status == "ok":
                    row["tflops"] = (flops if kind == "fwd" else 3.5 * flops) / (res["ms"] * 1e-3) / 1e12
                    if kind not in best or res["ms"] < best[kind][1]:
                        best[kind] = (cfg, res["ms"])
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
                save()
        if len(best) < 3:
            continue
        pin = {kind: cfg for kind, (cfg, _) in best.items()}
        from recfm.kernels.hstu_attention.triton_launch import pinned

        h, h_kv, d, mask, tables = VARIANTS[variant]
        with pinned(**pin):  # the check's batch has both tables for mixed masks: ablations are not checked
            full_tables = tables == ("pos,time" if mask in ("mixed", "targets") else "")
            err = check_config(h, h_kv, d, mask, "cuda", torch.bfloat16, False) if full_tables else None
            res = measure(attention_fn("triton", batch), batch, False)
        row = {"variant": variant, "impl": "triton", "pins": pin, "check_rel_err": err, **res,
               "fwd_tflops": flops / (res["fwd_ms"] * 1e-3) / 1e12,
               "fb_tflops": 3.5 * flops / (res["fb_ms"] * 1e-3) / 1e12}
        report["best"].append(row)
        print(json.dumps(row), flush=True)
        if mask == "causal":
            res = measure(attention_fn("sdpa", batch), batch, False)
            row = {"variant": variant, "impl": "sdpa", **res, "fwd_tflops": flops / (res["fwd_ms"] * 1e-3) / 1e12,
                   "fb_tflops": 3.5 * flops / (res["fb_ms"] * 1e-3) / 1e12}
            report["best"].append(row)
            print(json.dumps(row), flush=True)
        save()
        del batch
        torch.cuda.empty_cache()
    print(f"\n{report['device']}, B={args.tokens // args.length}, L={args.length}, bf16; JSON: {out_file}")
    print(f"{'variant':<11} {'kernel':<5} {'config (BM, BN, warps, stages)':<32} {'ms':>8} {'TFLOP/s':>8}")
    for r in report["rows"]:
        value = f"{r['ms']:8.3f} {r['tflops']:8.1f}" if r["status"] == "ok" else r["status"]
        print(f"{r['variant']:<11} {r['kind']:<5} {str(tuple(r['config'])):<32} {value}")
    print(f"\n{'variant':<11} {'impl':<7} {'fwd ms':>8} {'fwd TF/s':>9} {'f+b ms':>8} {'f+b TF/s':>9} check")
    for r in report["best"]:
        print(f"{r['variant']:<11} {r['impl']:<7} {r['fwd_ms']:8.3f} {r['fwd_tflops']:9.1f} {r['fb_ms']:8.3f} "
              f"{r['fb_tflops']:9.1f} {r.get('check_rel_err', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

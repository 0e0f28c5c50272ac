"""HSTU attention benchmark: reference / dense / triton / torch SDPA side by side, in one run.

    python -m bench.attention                      # full matrix on a CUDA GPU (H100: bf16)
    python -m bench.attention --heads 4x128 --lengths 4096 --masks causal   # one headline row
    python -m bench.attention --untuned --impls triton,sdpa   # every shape, first-listed configs, no autotuning
    python -m bench.attention --smoke              # CPU: tiny shapes under the Triton interpreter

Shapes: every sample of a batch has ``L`` tokens (``--lengths``), batch ``B = --tokens // L`` (64k tokens),
heads x dim ``--heads`` (d_qk = d_v), kv heads ``h`` or 1 (``--kv``), masks ``full``, ``causal`` and
``mixed`` (a user-level layout: ~85% H, ~10% R, ~5% T per sample, each part in time order, with timestamps,
position and time bias) plus ``targets`` (the mixed mask with only the T rows as queries: a target layer);
``mixed-nobias`` and ``targets-nobias`` are the same masks without the bias tables.

FLOPs count only allowed (unmasked) query-key pairs: forward ``4 * d * pairs`` per head, backward 2.5x
the forward (forward + backward 3.5x). SDPA (softmax, flash backend) runs at the same shape with its own
causal or full mask (no mixed mask) as the speed reference. ``reference`` (a Python loop over samples)
only runs at ``L <= --ref-max-len``; ``dense`` reports ``oom`` where it does not fit. Before timing, each
kernel configuration is checked against the fp32 reference on a small jagged batch (forward and all
gradients, relative 2-norm error; ``FAIL`` above 2e-2). Times are medians of ``triton.testing.do_bench``;
peak memory is the extra allocation of one forward + backward. The table is printed last; JSON goes to
``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "attention.json"
CHECK_TOL = 2e-2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384", help="sample lengths L")
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per batch (B = tokens // L)")
    parser.add_argument("--heads", default="4x128,2x256", help="h x d pairs")
    parser.add_argument("--kv", default="h,1", help="kv heads: 'h' (MHA) and/or 1 (one kv head)")
    parser.add_argument("--masks", default="full,causal,mixed,targets")
    parser.add_argument("--impls", default="triton,sdpa,dense,reference",
                        help="in this order per shape (the big dense/reference allocations come last)")
    parser.add_argument("--ref-max-len", type=int, default=1024, help="longest L the reference runs at")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke run under TRITON_INTERPRET=1")
    parser.add_argument("--untuned", action="store_true",
                        help="no autotuning: every kernel runs the first config of its list (the sweep's best at "
                             "L=4096; triton_launch.untuned), which saves the tuning compiles of a large matrix")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------
# Inputs.


def make_batch(length: int, batch: int, h: int, h_kv: int, d: int, mask: str, device, dtype, seed: int = 0,
               lengths: list[int] | None = None) -> dict:
    """A jagged batch (``lengths`` or ``batch`` samples of ``length``) and the attention keyword arguments."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    lengths = lengths if lengths is not None else [length] * batch
    types, stamps = [], []
    for n in lengths:
        n_h = round(0.85 * n)
        n_r = min(n - n_h, round(0.10 * n))
        n_t = n - n_h - n_r
        types.append(torch.tensor([0] * n_h + [1] * n_r + [2] * n_t, dtype=torch.int8))
        hist = torch.sort(torch.randint(0, 10**6, (n_h,), generator=gen)).values
        real = torch.sort(torch.randint(10**6, 10**6 + 3600, (n_r,), generator=gen)).values
        # targets in time order, as the batch layout has them within a scenario (recfm.foundation.data.batch)
        targets = torch.sort(torch.randint(10**6, 10**6 + 3600, (n_t,), generator=gen)).values
        stamps.append(torch.cat([hist, real, targets]))
    num_tokens = sum(lengths)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    types, stamps = torch.cat(types), torch.cat(stamps)
    shape, _, no_tables = mask.partition("-")  # "mixed-nobias", "targets-nobias": the mask without tables
    query_index = torch.nonzero(types == 2).flatten() if shape == "targets" else None
    num_q = num_tokens if query_index is None else query_index.numel()
    scale = 1.0
    q = (torch.randn(num_q, h, d, generator=gen) * scale).to(device, dtype)
    k = (torch.randn(num_tokens, h_kv, d, generator=gen) * scale).to(device, dtype)
    v = torch.randn(num_tokens, h_kv, d, generator=gen).to(device, dtype)
    kw = dict(max_len=max(lengths), mask_mode="mixed" if shape == "targets" else shape,
              token_type=types.to(device), timestamps=stamps.to(device),
              query_index=None if query_index is None else query_index.to(device))
    if shape in ("mixed", "targets") and not no_tables:
        # learned tables, as in training: the backward computes their gradients too
        kw["pos_bias"] = (torch.randn(h, 513, generator=gen) * 0.1).to(device).requires_grad_()
        kw["time_bias"] = (torch.randn(h, 32, generator=gen) * 0.1).to(device).requires_grad_()
    return dict(q=q, k=k, v=v, offsets=offsets.to(device), kw=kw, lengths=lengths)


def allowed_pairs(batch: dict, mask: str) -> int:
    """Allowed query-key pairs of the batch (exact; per sample for the mixed mask)."""
    import torch

    from recfm.foundation.model.mask import sample_mask

    if mask == "full":
        return sum(n * n for n in batch["lengths"])
    if mask == "causal":
        return sum(n * (n + 1) // 2 for n in batch["lengths"])
    kw, total, start = batch["kw"], 0, 0
    qidx = kw["query_index"]
    for n in batch["lengths"]:
        types, stamps = kw["token_type"][start:start + n], kw["timestamps"][start:start + n]
        rows = None
        if qidx is not None:
            rows = qidx[(qidx >= start) & (qidx < start + n)] - start
        total += int(sample_mask("mixed", n, types, stamps, rows).sum())
        start += n
    return total


# ----------------------------------------------------------------------------------------------------------
# Runners.


def attention_fn(impl: str, batch: dict):
    """``fn(q, k, v) -> out`` for an implementation (SDPA: the padded equal-length batch)."""
    import torch
    import torch.nn.functional as F

    from recfm.kernels.hstu_attention import hstu_attention

    if impl != "sdpa":
        kw = {key: value for key, value in batch["kw"].items()}
        tables = {name: kw.pop(name) for name in ("pos_bias", "time_bias") if name in kw}
        return lambda q, k, v: hstu_attention(q, k, v, batch["offsets"], impl=impl, validate=False, **kw,
                                              **tables)
    b, n = len(batch["lengths"]), batch["lengths"][0]
    causal = batch["kw"]["mask_mode"] != "full"

    def sdpa(q, k, v):
        h, h_kv = q.shape[1], k.shape[1]
        qb = q.view(b, n, h, -1).transpose(1, 2)
        kb = k.view(b, n, h_kv, -1).transpose(1, 2)
        vb = v.view(b, n, h_kv, -1).transpose(1, 2)
        if h_kv != h:
            kb, vb = kb.repeat_interleave(h // h_kv, 1), vb.repeat_interleave(h // h_kv, 1)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=causal)
        return out.transpose(1, 2).reshape(q.shape[0], h, -1)

    return sdpa


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_config(h: int, h_kv: int, d: int, mask: str, device, dtype, smoke: bool) -> float:
    """Max relative error (output and grads of q, k, v, tables) of triton vs the fp32 reference."""
    import torch

    lengths = [40, 1, 0, 33, 17] if smoke else [200, 1, 0, 450, 129]
    batch = make_batch(0, 0, h, h_kv, d, mask, device, dtype, seed=1, lengths=lengths)
    grads = []
    for impl in ("reference", "triton"):
        leaves = [t.detach().clone().float() if impl == "reference" else t.detach().clone()
                  for t in (batch["q"], batch["k"], batch["v"])]
        tables = [batch["kw"][name].detach().clone() for name in ("pos_bias", "time_bias") if name in batch["kw"]]
        for t in leaves + tables:
            t.requires_grad_()
        kw = {key: value for key, value in batch["kw"].items() if key not in ("pos_bias", "time_bias")}
        if tables:
            kw.update(pos_bias=tables[0], time_bias=tables[1])
        from recfm.kernels.hstu_attention import hstu_attention

        out = hstu_attention(*leaves, batch["offsets"], impl=impl, **kw)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out)
        out.backward(grad)
        grads.append([out] + [t.grad for t in leaves + tables])
    return max(rel_err(a, b) for a, b in zip(grads[1], grads[0]))


def measure(fn, batch: dict, smoke: bool) -> dict:
    """Median forward and forward+backward ms, and the peak extra memory (GiB) of one forward+backward."""
    import torch

    q, k, v = (batch[name].detach().clone().requires_grad_() for name in ("q", "k", "v"))
    grad = torch.randn_like(fn(q, k, v).detach())

    def forward():
        with torch.no_grad():
            fn(q, k, v)

    def forward_backward():
        fn(q, k, v).backward(grad)

    if smoke:
        times = []
        for run in (forward, forward_backward):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
        return {"fwd_ms": times[0], "fb_ms": times[1], "peak_gib": None}
    from triton.testing import do_bench

    fwd_ms = do_bench(forward, warmup=10, rep=50, return_mode="median")
    tables = [t for name, t in batch["kw"].items() if name.endswith("_bias")]
    fb_ms = do_bench(forward_backward, warmup=10, rep=50, grad_to_none=[q, k, v, *tables], return_mode="median")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward_backward()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return {"fwd_ms": fwd_ms, "fb_ms": fb_ms, "peak_gib": peak}


def run_impl(impl: str, batch: dict, flops_fwd: float, smoke: bool) -> dict:
    import torch

    try:
        result = measure(attention_fn(impl, batch), batch, smoke)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"status": "oom"}
    except Exception as err:  # a benchmark reports a failing implementation instead of stopping
        return {"status": f"error: {type(err).__name__}: {str(err).splitlines()[0][:120]}"}
    result["status"] = "ok"
    result["fwd_tflops"] = flops_fwd / (result["fwd_ms"] * 1e-3) / 1e12
    result["fb_tflops"] = 3.5 * flops_fwd / (result["fb_ms"] * 1e-3) / 1e12
    return result


# ----------------------------------------------------------------------------------------------------------
# Main.


def table(rows: list[dict]) -> str:
    head = (f"{'L':>6} {'B':>4} {'hxd':>6} {'kv':>3} {'mask':>8} {'impl':>9} | {'fwd ms':>8} {'TF/s':>6} | "
            f"{'f+b ms':>8} {'TF/s':>6} | {'peak GiB':>8} | check")
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = f"{r['L']:>6} {r['B']:>4} {r['h']}x{r['d']:<4} {r['h_kv']:>3} {r['mask']:>8} {r['impl']:>9}"
        if r["status"] != "ok":
            lines.append(f"{shape} | {r['status']}")
            continue
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(f"{shape} | {r['fwd_ms']:8.3f} {r['fwd_tflops']:6.1f} | {r['fb_ms']:8.3f} {r['fb_tflops']:6.1f} | "
                     f"{peak:>8} | {r.get('check', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("bench.attention: no CUDA GPU here; nothing to time (use --smoke for a CPU interpreter run)")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench.attention: triton is not installed")
        return 0
    device = "cpu" if args.smoke else "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    lengths = [48] if args.smoke else [int(x) for x in args.lengths.split(",")]
    tokens = 96 if args.smoke else args.tokens
    heads = [(2, 16)] if args.smoke else [tuple(int(x) for x in hd.split("x")) for hd in args.heads.split(",")]
    impls = args.impls.split(",")
    masks = args.masks.split(",")
    from recfm.kernels.hstu_attention import triton_launch

    with triton_launch.untuned() if args.untuned else contextlib.nullcontext():
        rows = run_matrix(args, lengths, tokens, heads, impls, masks, device, dtype)
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
            "torch": torch.__version__, "triton": __import__("triton").__version__, "dtype": args.dtype,
            "flops": "fwd 4*d*pairs*h, fwd+bwd 3.5x", "untuned": args.untuned, "rows": rows,
            "tuned_configs": triton_launch.tuned_configs()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=1))
    print(f"\n{info['device']}, torch {info['torch']}, triton {info['triton']}, {args.dtype}; JSON: {args.out}\n")
    print(table(rows))
    return 0


def run_matrix(args, lengths, tokens, heads, impls, masks, device, dtype) -> list[dict]:
    """Time every (length, heads, kv, mask, impl) row; print each as JSON as it completes."""
    import torch

    rows, checks = [], {}
    for length in lengths:
        batch_size = max(1, tokens // length)
        for h, d in heads:
            for kv in args.kv.split(","):
                h_kv = h if kv == "h" else int(kv)
                for mask in masks:
                    key = (h, h_kv, d, mask)
                    if "triton" in impls and key not in checks:
                        try:
                            checks[key] = check_config(h, h_kv, d, mask, device, dtype, args.smoke)
                        except Exception as err:  # reported in the table, timing goes on
                            checks[key] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
                    batch = make_batch(length, batch_size, h, h_kv, d, mask, device, dtype)
                    pairs = allowed_pairs(batch, mask)
                    flops_fwd = 4.0 * d * pairs * h
                    for impl in impls:
                        if impl == "reference" and length > args.ref_max_len:
                            continue
                        if impl == "sdpa" and (mask not in ("full", "causal") or args.smoke):
                            continue
                        result = run_impl(impl, batch, flops_fwd, args.smoke)
                        row = dict(L=length, B=batch_size, h=h, d=d, h_kv=h_kv, mask=mask, impl=impl,
                                   pairs=pairs, fwd_flops=flops_fwd, **result)
                        if impl == "triton":
                            err = checks.get(key)
                            row["check"] = (err if isinstance(err, str) else
                                            f"{'ok' if err < CHECK_TOL else 'FAIL'} {err:.1e}")
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                    del batch
                    if device == "cuda":
                        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    sys.exit(main())

"""Group LayerNorm, Triton against the PyTorch reference, at a training step's shape (GPU only).

    python bench/group_layer_norm.py --out bench/results/group_layer_norm.json

Rows are token-major ``[N, d]`` bf16 tensors, weight and bias ``[G, d]`` fp32; group ids in runs of 20-600 rows
(``--layout runs``) or as a training batch lays them out, a sample's history interleaving its sequence kinds, then
its R and T tokens (``--layout interleaved``, the training step's case: :func:`make`). Two forms, as an HSTU
layer calls them: ``GLN_in(x)`` and the gated ``GLN_attn(O) * U`` with ``U`` a column slice of the projection's
output (read in place). Per row: forward and forward+backward time (median
of ``triton.testing.do_bench``) and the bytes the Triton kernels must move (inputs read once, outputs written
once) over that time, against the 3.35 TB/s of an H100's HBM3.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def make(n: int, d: int, groups: int, seed: int = 0, layout: str = "runs"):
    """``(x, gate_source, group, weight, bias)``. ``layout``: ``runs``, group ids in runs of 20-600 rows; or
    ``interleaved``, as the batch lays out samples of two sequence kinds: a history of 100-1000 rows whose kinds
    (groups 0 and 1) alternate at random, as two time-ordered sequences merged, then 10-100 real-time rows (group
    2) and 5-50 targets of the scenario groups 3.. in order."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    runs, total = [], 0
    while total < n:
        if layout == "interleaved":
            h, r, t = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in ((100, 1000), (10, 100), (5, 50)))
            targets = torch.randint(3, max(groups, 4), (t,), generator=gen).sort().values
            runs += [torch.randint(0, 2, (h,), generator=gen), torch.full((r,), 2), targets]
            total += h + r + t
        else:
            length = int(torch.randint(20, 600, (1,), generator=gen))
            runs.append(torch.full((length,), int(torch.randint(0, groups, (1,), generator=gen))))
            total += length
    group = torch.cat(runs)[:n].cuda()
    x = torch.randn(n, d, generator=gen).to("cuda", torch.bfloat16)
    proj = torch.randn(n, 4 * d, generator=gen).to("cuda", torch.bfloat16)  # U is a column slice of it
    weight = (1 + 0.1 * torch.randn(groups, d, generator=gen)).cuda()
    bias = (0.1 * torch.randn(groups, d, generator=gen)).cuda()
    return x, proj, group, weight, bias


def time_row(impl: str, gated: bool, tensors, backward: bool) -> float:
    """Median ms of one forward (and backward) call."""
    import torch
    from triton.testing import do_bench

    from recfm.kernels.group_layer_norm import group_layer_norm

    x, proj, group, weight, bias = tensors
    d = x.shape[1]
    xs = x.detach().requires_grad_(backward)
    gate = proj[:, d:2 * d].detach().requires_grad_(backward) if gated else None
    w = weight.detach().requires_grad_(backward)
    b = bias.detach().requires_grad_(backward)
    dy = torch.randn_like(x)

    def run():
        y = group_layer_norm(xs, group, w, b, impl=impl, validate=False, gate=gate, out_dtype=torch.bfloat16)
        if backward:
            y.backward(dy)

    return do_bench(run, warmup=10, rep=50, return_mode="median")


def moved_bytes(n: int, d: int, gated: bool, backward: bool) -> int:
    """Bytes the Triton kernels read and write at least once (bf16 tensors, float32 row statistics)."""
    tensors = 2 if not gated else 3  # forward: x (+ gate) in, y out
    stats = 8 * n  # mean and rstd written
    if backward:
        tensors += 3 if not gated else 5  # backward: x, dy (+ gate) in, dx (+ dgate) out
        stats += 8 * n
    return tensors * n * d * 2 + stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=81_000, help="tokens N (medium step at B 128: ~81k)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--groups", type=int, default=7)
    parser.add_argument("--layout", choices=("runs", "interleaved"), default="runs",
                        help="group ids in runs, or a training batch's interleaved history kinds")
    default_out = Path(__file__).resolve().parent / "results" / "group_layer_norm.json"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench/group_layer_norm.py: no CUDA GPU here; nothing to time")
        return 0
    tensors = make(args.rows, args.dim, args.groups, layout=args.layout)
    hbm = 3.35e12
    rows = []
    print(f"{'row':44s} {'ms':>8s} {'GB/s':>8s} {'% HBM':>6s}")

    def record(label: str, impl: str, gated: bool, backward: bool) -> None:
        ms = time_row(impl, gated, tensors, backward)
        rate = moved_bytes(args.rows, args.dim, gated, backward) / (ms * 1e-3)
        rows.append(dict(row=label, impl=impl, gated=gated, backward=backward, ms=ms, gb_per_s=rate / 1e9))
        print(f"{label:44s} {ms:8.3f} {rate / 1e9:8.0f} {100 * rate / hbm:6.1f}", flush=True)

    for gated in (False, True):
        form = "GLN(O) * U" if gated else "GLN(x)"
        for backward in (False, True):
            for impl in ("reference", "triton"):
                record(f"{form}, {'fwd+bwd' if backward else 'fwd'}, {impl}", impl, gated, backward)
    by = {(r["row"]): r["ms"] for r in rows}
    ratios = {f"{form}, {kind}: triton over reference": by[f"{form}, {kind}, reference"] / by[f"{form}, {kind}, triton"]
              for form in ("GLN(x)", "GLN(O) * U") for kind in ("fwd", "fwd+bwd")}
    for name, value in ratios.items():
        print(f"{name:60s} {value:6.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, n=args.rows,
                                        d=args.dim, groups=args.groups, layout=args.layout, hbm_bytes_per_s=hbm, rows=rows,
                                        ratios=ratios), indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

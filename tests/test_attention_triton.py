"""Fused Triton HSTU attention and the dense baseline against the reference (the specification).

Without CUDA the Triton kernels run under the interpreter (``TRITON_INTERPRET=1``, set here before the
kernel modules import Triton) on tiny shapes (16x16 tiles, lengths <= 40 so every case has empty,
length-1 and non-multiple-of-16 samples). With CUDA the same tests run compiled, plus the ``gpu`` tests
(bigger shapes, autotuned configs, no host sync).

Tolerances (relative error of the whole tensor in the 2-norm, forward output and the gradients of q, k,
v and both bias tables): fp32 1e-4 (tf32 off in the kernels), fp16 5e-3, bf16 2e-2 (measured: ~1e-6, 4e-4, 6e-3) -- the reference
gets the same rounded inputs and computes in fp32, so the error is the kernels' rounding of the SiLU
weights and dS to the input dtype before their matmuls.
"""

from __future__ import annotations

import functools
import math
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the import of the kernel modules
triton = pytest.importorskip("triton", reason="triton is not installed")

from recfm.errors import RecfmError  # noqa: E402
from recfm.foundation.model.bias import (bias_lookup, event_positions, position_buckets,  # noqa: E402
                                        time_bucket_boundaries, time_buckets)
from recfm.kernels.hstu_attention import hstu_attention  # noqa: E402
from recfm.kernels.hstu_attention.triton_common import tile_ident, tile_span, time_bucket  # noqa: E402
from recfm.kernels.hstu_attention import triton_impl, triton_launch  # noqa: E402
from recfm.kernels.hstu_attention.triton_launch import _interpreter_index_fix, interpreting  # noqa: E402
from recfm.foundation.model.mask import allowed, sample_mask  # noqa: E402
from recfm.kernels.hstu_attention import triton_meta  # noqa: E402
from recfm.kernels.hstu_attention.triton_meta import chunk_extremes, visibility_codes  # noqa: E402

tl = triton.language

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H, R, T = 0, 1, 2
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def make_batch(lengths, h, h_kv, *, d_qk=16, d_v=16, layout=True, seed=0, dtype=torch.float32):
    """Random q/k/v, offsets, token types and timestamps: per sample H, then R, then T (``layout``) or
    random types; timestamps with many ties and gaps spanning several log buckets."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    types, stamps = [], []
    for length in lengths:
        if layout:
            cuts = sorted(rng.randint(0, length) for _ in range(2))
            if length == 40:  # 21 H, 11 R, 8 T: 16-tiles straddle the H/R border, the last holds only T
                cuts = [21, 32]
            kinds = [H] * cuts[0] + [R] * (cuts[1] - cuts[0]) + [T] * (length - cuts[1])
        else:
            kinds = [rng.choice((H, R, T)) for _ in range(length)]
        types += kinds
        stamps += [rng.choice((0, 1, 2, 7, 100, 5000)) if k == H else 5000 + rng.choice((0, 0, 1, 3, 60)) for k in kinds]
    n = sum(lengths)
    offsets = torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int64)
    q = torch.randn(n, h, d_qk, generator=gen).to(dtype)
    k = torch.randn(n, h_kv, d_qk, generator=gen).to(dtype)
    v = torch.randn(n, h_kv, d_v, generator=gen).to(dtype)
    return [t.to(DEVICE) for t in (q, k, v, offsets, torch.tensor(types, dtype=torch.int8),
                                   torch.tensor(stamps, dtype=torch.int64))]


def forward_backward(impl, q, k, v, offsets, pos_bias, time_bias, grad_seed=1, **kw):
    """Output and gradients ``[out, dq, dk, dv, dpos, dtime]`` (None where a table is absent)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (q, k, v, pos_bias, time_bias)]
    out = hstu_attention(leaves[0], leaves[1], leaves[2], offsets, pos_bias=leaves[3], time_bias=leaves[4],
                         impl=impl, **kw)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out)
    out.backward(grad)
    return [out] + [None if t is None else t.grad for t in leaves]


def assert_close_rel(got, want, tol, names=("out", "dq", "dk", "dv", "dpos", "dtime")):
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def table(rows, cols, seed):
    return (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.5).to(DEVICE)


CASES = {
    # id: (mask, normaliser, h, h_kv, layout, pos rows/cols, time rows/cols, query rows)
    "full-mha-length": ("full", "length", 4, 4, True, (4, 9), (1, 8), None),
    "causal-kv1-keys": ("causal", "keys", 4, 1, True, (1, 65), None, None),
    "mixed-kv2-keys": ("mixed", "keys", 4, 2, True, (4, 9), (4, 12), None),
    "mixed-randomtypes-maxlen": ("mixed", "max_len", 2, 1, False, None, (2, 6), None),
    "mixed-targets-kv1": ("mixed", "length", 3, 1, True, (3, 7), (1, 32), "targets"),
    "causal-rows-none": ("causal", "none", 2, 2, True, None, None, "random"),
    # a table wider than every sample: no pair is clamped, so position-gradient tiles of consecutive event
    # positions take the diagonal-sum path of triton_common.pos_grad_add (tiles holding targets do not)
    "causal-widetable-keys": ("causal", "keys", 2, 2, True, (2, 129), None, None),
    # the same in the mixed mask: history rows see later history too (negative offsets), targets do not sit at
    # their own event positions
    "mixed-widetable-keys": ("mixed", "keys", 2, 2, True, (2, 129), (2, 32), None),
    "full-kv1-keys-rows": ("full", "keys", 2, 1, False, (1, 5), None, "random"),
}
LENGTHS = [0, 17, 1, 40, 5, 16]


@pytest.fixture(autouse=True)
def strict_kernel_flags(monkeypatch):
    # the interpreter ignores a keyword argument its kernel does not have, where a GPU launch raises: every flag
    # the launcher is given must be a parameter of that kind's kernel
    real = triton_impl.launch

    def checked(kind, grid_rows, num_samples, num_heads, args, meta):
        unknown = set(meta) - set(triton_launch._KERNELS[kind].arg_names)
        assert not unknown, (kind, sorted(unknown))
        real(kind, grid_rows, num_samples, num_heads, args, meta)

    monkeypatch.setattr(triton_impl, "launch", checked)


def query_rows(kind, types, seed):
    if kind is None:
        return None
    gen = torch.Generator().manual_seed(seed)
    if kind == "targets":
        rows = torch.nonzero(types.cpu() == T).flatten()
    else:  # random unsorted subset, one token twice (the reference allows repeated query rows)
        rows = torch.randperm(types.numel(), generator=gen)[: types.numel() // 2]
        rows = torch.cat([rows, rows[:1]])
    return rows[torch.randperm(rows.numel(), generator=gen)].to(DEVICE)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_triton_matches_reference_fp32(case):
    mode, norm, h, h_kv, layout, pos, time, rows_kind = CASES[case]
    q, k, v, offsets, types, stamps = make_batch(LENGTHS, h, h_kv, d_qk=16, d_v=24, layout=layout, seed=3)
    rows = query_rows(rows_kind, types, seed=4)
    if rows is not None:
        q = q[rows]
    kw = dict(max_len=40, token_type=types, timestamps=stamps, mask_mode=mode, normaliser=norm, query_index=rows,
              time_bucket_base=1.5, alpha=0.4)
    tabs = (None if pos is None else table(*pos, seed=5), None if time is None else table(*time, seed=6))
    want = forward_backward("reference", q, k, v, offsets, *tabs, **kw)
    got = forward_backward("triton", q, k, v, offsets, *tabs, **kw)
    assert_close_rel(got, want, TOL[torch.float32])


def test_triton_large_timestamps_and_gaps():
    # unix-time stamps, gaps from 0 s to ~30 years: the kernels' int32 ranks / relative seconds stay exact
    q, k, v, offsets, types, stamps = make_batch([40, 9, 0, 23], 2, 1, layout=False, seed=30)
    stamps = 1_700_000_000 + (stamps - 5000) * 190_001 + torch.arange(stamps.numel(), device=DEVICE) % 3
    kw = dict(max_len=40, token_type=types, timestamps=stamps, mask_mode="mixed", time_bucket_base=1.7)
    tabs = (None, table(2, 40, 31))
    assert_close_rel(forward_backward("triton", q, k, v, offsets, *tabs, **kw),
                     forward_backward("reference", q, k, v, offsets, *tabs, **kw), TOL[torch.float32])


def tile_path_batch():
    """Two samples whose 16-tiles (the interpreter's blocks) take every per-tile bias path of
    ``triton_common.add_bias`` / ``pos_grad_add`` / ``time_grad_add``. A 9-column position table clamps at 4:
    tiles past the clamp on both sides (H<->H is bidirectional under the mixed mask) and tiles across it.
    Stamps ``p`` (tile 0), ``1008 + p`` (tile 1: gaps 1009-1039 to tile 0 straddle the base-2 boundary 1023
    and hit it), ``131039 + p`` (tile 2: gaps 131056-131086 to tile 0, past the clamp, straddle and hit
    2^17 - 1; one bucket from tile 1) and ``10^7 + p`` (one bucket from all): tiles within one time bucket,
    across one boundary (with and without a flat position bias), and across several (the diagonal)."""
    gen = torch.Generator().manual_seed(41)
    base = torch.tensor([0, 1008, 131039, 10**7])
    stamps, types = [], []
    for length, kinds in ((64, [H] * 64), (58, [H] * 48 + [R] * 6 + [T] * 4)):
        pos = torch.arange(length)
        stamps.append(base[(pos // 16).clamp(max=3)] + pos)
        types.append(torch.tensor(kinds, dtype=torch.int8))
    n = 64 + 58
    q, k, v = (torch.randn(n, 2, 16, generator=gen) for _ in range(3))
    offsets = torch.tensor([0, 64, n])
    return [t.to(DEVICE) for t in (q, k, v, offsets, torch.cat(types), torch.cat(stamps))]


@pytest.mark.parametrize("mode", ["full", "causal", "mixed", "mixed, query rows"])
@pytest.mark.parametrize("base, grid", [(2.0, None), (1.5, None), (2.0, "one pass"), (1.5, "one pass"), (2.0, 16),
                                        (1.5, 16), (2.0, 32)])
def test_bias_tile_paths(mode, base, grid, monkeypatch):
    # a wrong scalar, select or clamp on any per-tile path changes the output or a table gradient. Grid None
    # (short batches, with the bias cache): the dQ kernel stores dS and the table-gradient kernel adds every
    # tile's table gradients from it; "one pass": no dS buffer, one dQ pass adds them itself. Otherwise the
    # split of long batches: the dQ kernel adds those of flat grid cells, the band kernel the others; a grid of
    # one tile sends every flat tile to the dQ kernel's registers, a grid of 2 x 2 tiles sends flat tiles of
    # mixed cells to the band kernel
    if grid == "one pass":
        monkeypatch.setattr(triton_impl, "DS_BUFFER", False)
    elif grid is not None:
        monkeypatch.setattr(triton_launch, "SPLIT_FROM_LEN", 0)
        monkeypatch.setattr(triton_launch, "INTERPRET_SUPER", grid)
    # "query rows": a target layer's query-only rows (here every H row of a few tiles and every R/T row, in
    # shuffled order): few query rows against all keys, the band kernel's walk over key cells
    q, k, v, offsets, types, stamps = tile_path_batch()
    rows = None
    if mode == "mixed, query rows":
        mode = "mixed"
        pos = torch.arange(types.numel(), device=DEVICE)
        keep = (types != H) | ((pos % 64) // 16 == 2) | (pos < 5)
        rows = pos[keep][torch.randperm(int(keep.sum()), generator=torch.Generator().manual_seed(44)).to(DEVICE)]
        q = q[rows]
    kw = dict(max_len=64, token_type=types, timestamps=stamps, mask_mode=mode, normaliser="keys",
              time_bucket_base=base, query_index=rows)
    tabs = (table(2, 9, 42), table(2, 32, 43))
    assert_close_rel(forward_backward("triton", q, k, v, offsets, *tabs, **kw),
                     forward_backward("reference", q, k, v, offsets, *tabs, **kw), TOL[torch.float32])


@pytest.mark.parametrize("lanes", [False, True], ids=["loads", "lanes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_time_table_by_lanes_or_loads(lanes, dtype, monkeypatch):
    # tiles across several time buckets read the time table per score: by warp shuffles (triton_common.lane_lookup,
    # a GPU and at most 32 entries) or by a load per score (the interpreter, larger tables); both match the
    # reference on every tile path, forward and backward
    assert not triton_impl.lanes_hold_time_table(33) and not triton_impl.lanes_hold_time_table(0)
    assert triton_impl.lanes_hold_time_table(32) == (not interpreting())
    if lanes and interpreting():
        pytest.skip("warp shuffles are PTX: the interpreter takes the load path")
    monkeypatch.setattr(triton_impl, "lanes_hold_time_table", lambda num_tb: lanes)
    monkeypatch.setattr(triton_impl, "LANE_KINDS", ("fwd", "dq", "dq_inline", "band", "dkdv"))  # the path every kernel has
    q, k, v, offsets, types, stamps = tile_path_batch()
    kw = dict(max_len=64, token_type=types, timestamps=stamps, mask_mode="mixed", normaliser="keys",
              time_bucket_base=2.0)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    tabs = (table(2, 9, 45).to(dtype), table(2, 32, 46).to(dtype))
    got = forward_backward("triton", q, k, v, offsets, *tabs, **kw)
    assert_close_rel(got, forward_backward("reference", q, k, v, offsets, *tabs, **kw), TOL[dtype])


@pytest.mark.parametrize("kinds", ["shipped", "every kernel"])
@pytest.mark.parametrize("mode", ["causal", "mixed"])
def test_toeplitz_position_tiles(mode, kinds, monkeypatch):
    # tiles whose rows and columns sit at their own event positions read the position bias from the
    # Toeplitz layout built per call (triton_meta.toeplitz_tables), in the kernels of TOEP_KINDS (or in every
    # kernel: the code path all of them carry): it matches the reference, the layout is really read
    # (corrupting it changes the result), and turning it off gives the per-score loads' result. dK/dV reads
    # them when the forward left no bias cache (off here; test_bias_cache covers the cache)
    monkeypatch.setattr(triton_impl, "BIAS_CACHE", False)
    if kinds == "every kernel":
        monkeypatch.setattr(triton_impl, "TOEP_KINDS", ("fwd", "dq", "dq_inline", "band", "dkdv"))
    q, k, v, offsets, types, stamps = tile_path_batch()
    kw = dict(max_len=64, token_type=types, timestamps=stamps, mask_mode=mode, normaliser="keys",
              time_bucket_base=2.0)
    tabs = (table(2, 9, 47), table(2, 32, 48))
    want = forward_backward("reference", q, k, v, offsets, *tabs, **kw)
    got = forward_backward("triton", q, k, v, offsets, *tabs, **kw)
    assert_close_rel(got, want, TOL[torch.float32])
    layout = triton_meta.toeplitz_tables(tabs[0].detach())
    assert layout.shape == (2, triton_meta.toeplitz_width(4))
    assert torch.equal(layout[:, :9], tabs[0].detach())
    real = triton_impl.toeplitz_tables
    monkeypatch.setattr(triton_impl, "toeplitz_tables", lambda t: _corrupt(real(t)))
    bad = forward_backward("triton", q, k, v, offsets, *tabs, **kw)
    for name in ["dK", *(["output", "dQ"] if kinds == "every kernel" else [])]:
        i = {"output": 0, "dQ": 1, "dK": 2}[name]
        assert (bad[i] - want[i]).norm() > 0.1 * want[i].norm(), name
    monkeypatch.setattr(triton_impl, "toeplitz_tables", real)
    monkeypatch.setattr(triton_impl, "TOEP_MAX_HALF", -1)  # every tile gathers per score
    assert_close_rel(forward_backward("triton", q, k, v, offsets, *tabs, **kw), got, 1e-5)


def test_tables_are_laid_out_once_per_call(monkeypatch):
    # every launch of one call (bias cache, forward, dQ, dK/dV, table gradients) reads the same cast tables and the
    # same Toeplitz layout: made once per call, not once per launch (no bias cache: every kernel reads the tables)
    monkeypatch.setattr(triton_impl, "BIAS_CACHE", False)
    monkeypatch.setattr(triton_impl, "TOEP_KINDS", ("fwd", "dq", "dq_inline", "band", "dkdv"))
    q, k, v, offsets, types, stamps = tile_path_batch()
    kw = dict(max_len=64, token_type=types, timestamps=stamps, mask_mode="mixed", normaliser="keys",
              time_bucket_base=2.0)
    tabs = (table(2, 9, 47), table(2, 32, 48))
    calls = []
    real = triton_impl.toeplitz_tables
    monkeypatch.setattr(triton_impl, "toeplitz_tables", lambda t: calls.append(t.shape) or real(t))
    got = forward_backward("triton", q, k, v, offsets, *tabs, **kw)
    assert calls == [(2, 9)]
    assert_close_rel(got, forward_backward("reference", q, k, v, offsets, *tabs, **kw), TOL[torch.float32])


def cache_case(mode, targets):
    """``tile_path_batch`` with its call options (all its rows as queries, or a target layer's query rows)."""
    q, k, v, offsets, types, stamps = tile_path_batch()
    kw = dict(max_len=64, token_type=types, timestamps=stamps, mask_mode=mode, normaliser="keys",
              time_bucket_base=2.0)
    if targets:
        kw["query_index"] = query_rows("targets" if mode == "mixed" else "spread", types, 3)
        q = q[: kw["query_index"].numel()]
    return q, k, v, offsets, kw


def record_caches(monkeypatch, fill=None):
    """The list every call appends its bias cache to (``None`` where it makes none), filled with ``fill`` first."""
    caches = []
    real_cache = triton_impl._Plan.cache_bias

    def spy(plan, *args):
        real_cache(plan, *args)
        if plan.bias_cache is not None and fill is not None:
            plan.bias_cache.fill_(fill)
        caches.append(plan.bias_cache)

    monkeypatch.setattr(triton_impl._Plan, "cache_bias", spy)
    return caches


@pytest.mark.parametrize("mode", ["causal", "mixed"])
@pytest.mark.parametrize("targets", [False, True])
def test_bias_cache(mode, targets, monkeypatch):
    # with a table and a backward to come, one kernel writes the bias of every pair a query may see and the
    # attention kernels read it instead of computing it: the result matches the reference and the computing
    # kernels; the backward really reads it (corrupting it between forward and backward changes dQ, dK and dV,
    # not the output); pairs the bias kernel does not write (NaN here) are never read; it is not written without
    # a backward, beyond BIAS_CACHE_MAX_BYTES or from BIAS_CACHE_MAX_LEN on
    q, k, v, offsets, kw = cache_case(mode, targets)
    tabs = (table(2, 9, 49), table(2, 32, 50))
    caches = record_caches(monkeypatch, fill=float("nan"))
    want = forward_backward("reference", q, k, v, offsets, *tabs, **kw)
    got = forward_backward("triton", q, k, v, offsets, *tabs, **kw)
    assert caches[-1] is not None and caches[-1].shape[:2] == (2, q.shape[0])
    assert_close_rel(got, want, TOL[torch.float32])
    monkeypatch.setattr(triton_impl, "BIAS_CACHE", False)
    assert_close_rel(forward_backward("triton", q, k, v, offsets, *tabs, **kw), got, 1e-5)
    assert caches[-1] is None
    monkeypatch.setattr(triton_impl, "BIAS_CACHE", True)
    monkeypatch.setattr(triton_impl, "BIAS_CACHE_MAX_BYTES", 0)
    assert_close_rel(forward_backward("triton", q, k, v, offsets, *tabs, **kw), got, 1e-5)
    assert caches[-1] is None
    monkeypatch.setattr(triton_impl, "BIAS_CACHE_MAX_BYTES", 2 << 30)
    monkeypatch.setattr(triton_impl, "BIAS_CACHE_MAX_LEN", 64)  # max_len 64 here
    assert_close_rel(forward_backward("triton", q, k, v, offsets, *tabs, **kw), got, 1e-5)
    assert caches[-1] is None
    monkeypatch.setattr(triton_impl, "BIAS_CACHE_MAX_LEN", 65)
    with torch.no_grad():
        hstu_attention(q, k, v, offsets, pos_bias=tabs[0], time_bias=tabs[1], impl="triton", **kw)
    assert caches[-1] is None
    real_launch = triton_impl.launch

    def corrupting(kind, *args):
        if kind == "dq":
            args[3][-5].add_(1.0)  # the cache (kernel argument BIAS), just before the backward's first kernel reads it
        real_launch(kind, *args)

    monkeypatch.setattr(triton_impl, "launch", corrupting)
    bad = forward_backward("triton", q, k, v, offsets, *tabs, **kw)
    assert torch.equal(bad[0], got[0])
    for i in (1, 2, 3):
        assert (bad[i] - got[i]).norm() > 0.01 * got[i].norm()


@pytest.mark.parametrize("mode", ["causal", "mixed"])
@pytest.mark.parametrize("targets", [False, True])
def test_table_gradients_from_stored_ds(mode, targets, monkeypatch):
    # with the bias cache, the dQ kernel runs first, stores dS (DS_OUT) and computes no table gradient; the dK/dV
    # kernel (DS_IN) and the table-gradient kernels read it back: the launches are dq (storing), dk (reading) and dv
    # (the dK/dV kernel's two halves with the score cache), dsgrad, diag (the position table along diagonals); the
    # result is the one-pass dQ's (and the reference's), and one dK/dV launch (DKDV_SPLIT off), dK/dV recomputing dS
    # or dsgrad adding every pair's position gradient (DIAG_GRADS off) give it too; the gradients really come from
    # the buffer (corrupting it before dsgrad changes both table gradients and nothing else, before diag the
    # position table's only, before dk dK and the tables' and nothing else); over DS_BUFFER_MAX_BYTES the one pass
    # runs instead
    q, k, v, offsets, kw = cache_case(mode, targets)
    tabs = (table(2, 9, 51), table(2, 32, 52))
    real_launch = triton_impl.launch
    launches = []

    def spy(kind, *args):
        launches.append((kind, args[-1].get("DS_OUT", False), args[-1].get("DS_IN", False)))
        real_launch(kind, *args)

    monkeypatch.setattr(triton_impl, "launch", spy)
    got = forward_backward("triton", q, k, v, offsets, *tabs, **kw)
    assert launches == [("fwd", False, False), ("dq", True, False), ("dk", False, True), ("dv", False, True),
                        ("dsgrad", False, False), ("diag", False, False), ("dsgrad", False, False)]
    assert_close_rel(got, forward_backward("reference", q, k, v, offsets, *tabs, **kw), TOL[torch.float32])
    monkeypatch.setattr(triton_impl, "DKDV_SPLIT", False)
    launches.clear()
    assert_close_rel(forward_backward("triton", q, k, v, offsets, *tabs, **kw), got, 1e-5)
    assert [kind for kind, *_ in launches] == ["fwd", "dq", "dkdv", "dsgrad", "diag", "dsgrad"]
    monkeypatch.setattr(triton_impl, "DKDV_SPLIT", True)
    monkeypatch.setattr(triton_impl, "DIAG_GRADS", False)
    launches.clear()
    assert_close_rel(forward_backward("triton", q, k, v, offsets, *tabs, **kw), got, 1e-5)
    assert [kind for kind, *_ in launches] == ["fwd", "dq", "dk", "dv", "dsgrad"]
    monkeypatch.setattr(triton_impl, "DIAG_GRADS", True)
    monkeypatch.setattr(triton_impl, "DKDV_READS_DS", False)
    launches.clear()
    assert_close_rel(forward_backward("triton", q, k, v, offsets, *tabs, **kw), got, 1e-5)
    assert launches == [("fwd", False, False), ("dkdv", False, False), ("dq", True, False), ("dsgrad", False, False),
                        ("diag", False, False), ("dsgrad", False, False)]
    monkeypatch.setattr(triton_impl, "DKDV_READS_DS", True)
    monkeypatch.setattr(triton_impl, "DS_BUFFER", False)
    launches.clear()
    one_pass = forward_backward("triton", q, k, v, offsets, *tabs, **kw)
    assert [kind for kind, *_ in launches] == ["fwd", "dkdv", "dq_inline"]
    assert_close_rel(got, one_pass, 1e-5)
    monkeypatch.setattr(triton_impl, "DS_BUFFER", True)
    monkeypatch.setattr(triton_impl, "DS_BUFFER_MAX_BYTES", 0)
    launches.clear()
    assert_close_rel(forward_backward("triton", q, k, v, offsets, *tabs, **kw), got, 1e-5)
    assert [kind for kind, *_ in launches] == ["fwd", "dkdv", "dq_inline"]
    monkeypatch.setattr(triton_impl, "DS_BUFFER_MAX_BYTES", 2 << 30)

    for reader, changed in (("dsgrad", (4, 5)), ("diag", (4,)), ("dk", (2, 4, 5))):
        def corrupting(kind, *args):
            if kind == reader:  # the dS buffer (kernel argument DSB), just before the reader
                (args[3][0] if kind == "diag" else args[3][-2] if kind == "dsgrad" else args[3][-1]).add_(1.0)
            real_launch(kind, *args)

        monkeypatch.setattr(triton_impl, "launch", corrupting)
        bad = forward_backward("triton", q, k, v, offsets, *tabs, **kw)
        for i in range(6):
            if i in changed:
                assert (bad[i] - got[i]).norm() > 0.1 * got[i].norm(), (reader, i)
            elif DEVICE == "cpu":
                assert torch.equal(bad[i], got[i]), (reader, i)
            else:  # a GPU's float atomics add in any order: the table gradients' last bits vary between runs
                assert (bad[i] - got[i]).norm() <= 1e-6 * got[i].norm(), (reader, i)


@pytest.mark.parametrize("mode, layout", [("causal", True), ("mixed", True), ("mixed", False), ("full", False)])
def test_position_gradient_along_diagonals(mode, layout, monkeypatch):
    # the position table's unclamped pairs of keys at their own event position are summed along the dS buffer's
    # diagonals (the diag kernel), every other pair by the table-gradient kernel: with the batch layout (identity
    # prefixes: every H and R key) and with random token types (prefixes cut short mid-sample, targets among the
    # keys), against the reference and against dsgrad adding every pair (DIAG_GRADS off); a table wider than the
    # samples and one that clamps most pairs
    q, k, v, offsets, types, stamps = make_batch(LENGTHS, 2, 1, d_qk=16, d_v=16, layout=layout, seed=61)
    positions = event_positions(offsets, types, stamps, types.numel())
    prefix = triton_meta.identity_prefix(offsets, positions.to(torch.int32), types.numel(), 40).cpu()
    for b, (start, end) in enumerate(zip(offsets.tolist(), offsets[1:].tolist())):
        local = positions[start:end].cpu() == torch.arange(end - start)
        want = int((~local).nonzero()[0]) if (~local).any() else end - start
        assert int(prefix[b]) == want
    kinds = []
    real = triton_impl.launch
    monkeypatch.setattr(triton_impl, "launch", lambda kind, *a: (kinds.append(kind), real(kind, *a)))
    kw = dict(max_len=40, token_type=types, timestamps=stamps, mask_mode=mode, normaliser="keys",
              time_bucket_base=2.0)
    for half in (3, 40):
        tabs = (table(2, 2 * half + 1, 62), table(2, 32, 63))
        kinds.clear()
        got = forward_backward("triton", q, k, v, offsets, *tabs, **kw)
        assert "diag" in kinds
        assert_close_rel(got, forward_backward("reference", q, k, v, offsets, *tabs, **kw), TOL[torch.float32])
        monkeypatch.setattr(triton_impl, "DIAG_GRADS", False)
        assert_close_rel(forward_backward("triton", q, k, v, offsets, *tabs, **kw), got, 1e-5)
        monkeypatch.setattr(triton_impl, "DIAG_GRADS", True)


@pytest.mark.parametrize("mode", ["causal", "mixed"])
@pytest.mark.parametrize("targets", [False, True])
def test_score_cache(mode, targets, monkeypatch):
    # with the bias cache, the forward writes each tile's scores (alpha q k^T + bias) over the bias it read, and the
    # dQ and dK/dV kernels read them instead of recomputing q k^T: after the forward the cache holds the reference's
    # scores at every allowed pair (a full layer: cache rows are token rows); the gradients match the reference and
    # the kernels that recompute them (SCORE_CACHE off)
    q, k, v, offsets, kw = cache_case(mode, targets)
    tabs = (table(2, 9, 53), table(2, 32, 54))
    caches = record_caches(monkeypatch)
    got = forward_backward("triton", q, k, v, offsets, *tabs, **kw)
    assert_close_rel(got, forward_backward("reference", q, k, v, offsets, *tabs, **kw), TOL[torch.float32])
    if not targets:
        types, stamps = kw["token_type"], kw["timestamps"]
        positions = event_positions(offsets, types, stamps, types.numel())
        for start, end in zip(offsets.tolist(), offsets[1:].tolist()):
            n = end - start
            p, t = positions[start:end], stamps[start:end]
            scores = torch.einsum("qhd,khd->hqk", q[start:end], k[start:end].repeat_interleave(2 // k.shape[1], 1))
            scores = scores / math.sqrt(q.shape[2])
            scores = scores + bias_lookup(tabs[0], position_buckets(p[:, None] - p[None, :], tabs[0].shape[1]))
            scores = scores + bias_lookup(tabs[1], time_buckets(t[:, None] - t[None, :], tabs[1].shape[1], 2.0))
            mask = sample_mask(mode, n, types[start:end], t, torch.arange(n, device=q.device)).expand_as(scores)
            cached = caches[-1][:, start:end, :n]
            torch.testing.assert_close(cached[mask], scores[mask], rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(triton_impl, "SCORE_CACHE", False)
    kinds = []
    real_launch = triton_impl.launch
    monkeypatch.setattr(triton_impl, "launch", lambda kind, *a: (kinds.append(kind), real_launch(kind, *a)))
    assert_close_rel(forward_backward("triton", q, k, v, offsets, *tabs, **kw), got, 1e-5)
    assert "dkdv" in kinds and "dk" not in kinds  # dK and dV in one launch without the scores


def test_config_lists_follow_the_kernel_variant():
    # each kernel variant autotunes over the list measured for it: dK/dV reading the stored dS its own ("ds", at d
    # 256 where one was measured), dQ storing dS with the cache's, the one-pass dQ the heavy list of the tables, dQ
    # and dK/dV reading the score cache theirs ("scores")
    tables = dict(HAS_POS=True, HAS_TIME=True, BIAS_IN=True)
    assert triton_launch.config_class("dkdv", 256, {**tables, "DS_IN": True}) == "ds"
    assert triton_launch.configs("dkdv", 256, "ds")[0].kwargs == {"BLOCK_M": 64, "BLOCK_N": 32}
    assert triton_launch.config_class("dkdv", 256, {**tables, "DS_IN": False}) is False
    assert triton_launch.config_class("dkdv", 128, {**tables, "DS_IN": True}) is False
    assert triton_launch.config_class("dq", 256, {**tables, "DS_OUT": True}) == "cache"
    assert triton_launch.config_class("dq_inline", 256, {**tables, "POS_GRAD": True}) is True
    assert triton_launch.config_class("fwd", 256, dict(HAS_POS=False, HAS_TIME=False)) is False
    # reading the score cache: dQ and dK/dV their own lists at d 256, the forward the cache's
    for kind in ("dq", "dkdv"):
        assert triton_launch.config_class(kind, 256, {**tables, "SCORES": True, "DS_OUT": True, "DS_IN": True}) == "scores"
    assert triton_launch.config_class("fwd", 256, {**tables, "SCORES": True}) == "cache"


def test_qkv_read_in_place_from_a_wider_projection():
    # Q, K and V as column slices of one projection output (as the HSTU layer passes them): the kernels read
    # them with their row stride, no copy, and give the contiguous inputs' result; the gradients are written
    # contiguously
    q0, k0, v0, offsets, types, stamps = tile_path_batch()
    n, h, d = k0.shape
    rand = functools.partial(torch.randn, device=DEVICE)
    wide_q = torch.cat([rand(n, 3), q0.flatten(1), rand(n, 5)], 1).requires_grad_()  # odd offsets and strides
    wide_kv = torch.cat([v0.flatten(1), k0.flatten(1), rand(n, 8)], 1).requires_grad_()
    q = wide_q[:, 3:3 + h * d].view(n, h, d)
    v, k = wide_kv[:, :h * d].view(n, h, d), wide_kv[:, h * d:2 * h * d].view(n, h, d)
    assert q.stride(0) == wide_q.shape[1]
    assert triton_impl._in_place(q, q.stride(0)) is q
    kw = dict(max_len=64, token_type=types, timestamps=stamps, mask_mode="mixed", normaliser="keys")
    tabs = (table(2, 9, 49), table(2, 32, 50))
    out = hstu_attention(q, k, v, offsets, pos_bias=tabs[0], time_bias=tabs[1], impl="triton", **kw)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    out.backward(grad)
    got = [out, wide_q.grad[:, 3:3 + h * d].view(n, h, d), wide_kv.grad[:, h * d:2 * h * d].view(n, h, d),
           wide_kv.grad[:, :h * d].view(n, h, d)]
    want = forward_backward("triton", q0, k0, v0, offsets, *tabs, **kw)  # contiguous inputs, grad_seed 1
    assert_close_rel(got, want[:4], 1e-6)
    assert_close_rel(got, forward_backward("reference", q0, k0, v0, offsets, *tabs, **kw)[:4], TOL[torch.float32])
    assert not triton_impl._packed_rows(torch.randn(4, 3, 8).transpose(1, 2))  # heads not packed: a copy


def _corrupt(layout: torch.Tensor) -> torch.Tensor:
    """The Toeplitz part of a position-table layout shifted by one: wrong wherever a kernel reads it."""
    layout = layout.clone()
    layout[:, 64:] += 1.0
    return layout


@pytest.mark.parametrize("grid", [None, 16])
def test_position_gradient_of_target_rows(grid, monkeypatch):
    # target-only query rows (a target layer) in time order share or step through event positions: the
    # position gradient's run-shift path (pos_grad_add) when they lie within a tile's shift range (sample 0:
    # positions 33..40 against consecutive H and R keys, nothing clamped; sample 2: 80 positions apart, the
    # wider window), the per-bucket passes when they spread wider than it (sample 1: 120 R events between its
    # targets; the range is 112 for 16-tiles)
    if grid is not None:
        monkeypatch.setattr(triton_launch, "SPLIT_FROM_LEN", 0)
        monkeypatch.setattr(triton_launch, "INTERPRET_SUPER", grid)
    gen = torch.Generator().manual_seed(45)
    types, stamps = [], []
    r0 = [1000 + 10 * i for i in range(8)]
    t0 = [1005, 1005, 1025, 1045, 1045, 1065, 1075, 1075]
    r1 = [5000 + 10 * i for i in range(120)]
    t1 = [4990, 5005, 5255, 5605, 5955, 6195, 6300]
    r2 = [7000 + 10 * i for i in range(100)]
    t2 = [7005, 7255, 7505, 7805]
    for n_h, real, targets in ((32, r0, t0), (10, r1, t1), (10, r2, t2)):
        types.append(torch.tensor([H] * n_h + [R] * len(real) + [T] * len(targets), dtype=torch.int8))
        stamps.append(torch.tensor(list(range(n_h)) + real + targets))
    types, stamps = torch.cat(types), torch.cat(stamps)
    offsets = torch.tensor([0, 48, 185, 299])
    rows = torch.nonzero(types == T).flatten()
    q = torch.randn(rows.numel(), 2, 16, generator=gen)
    k, v = (torch.randn(299, 2, 16, generator=gen) for _ in range(2))
    q, k, v, offsets, types, stamps, rows = (t.to(DEVICE) for t in (q, k, v, offsets, types, stamps, rows))
    kw = dict(max_len=137, token_type=types, timestamps=stamps, mask_mode="mixed", normaliser="keys",
              query_index=rows)
    tabs = (table(2, 301, 46), table(2, 32, 47))
    assert_close_rel(forward_backward("triton", q, k, v, offsets, *tabs, **kw),
                     forward_backward("reference", q, k, v, offsets, *tabs, **kw), TOL[torch.float32])


def test_stride_loops_cover_samples_longer_than_the_grid(monkeypatch):
    # the kernels' stride loops: with validate=False and a too-small max_len every tile is still computed. (The
    # bias cache, which is max_len wide, needs max_len >= every sample length, as the API states: off here.)
    monkeypatch.setattr(triton_impl, "BIAS_CACHE", False)
    q, k, v, offsets, types, stamps = make_batch([40, 3, 33], 2, 1, seed=38)
    kw = dict(token_type=types, timestamps=stamps, mask_mode="causal", pos_bias=table(2, 9, 39))
    want = forward_backward("reference", q, k, v, offsets, kw.pop("pos_bias"), None, max_len=40, **kw)
    got = forward_backward("triton", q, k, v, offsets, table(2, 9, 39), None, max_len=16, validate=False, **kw)
    assert_close_rel(got, want, TOL[torch.float32])


def test_frozen_bias_tables():
    q, k, v, offsets, types, stamps = make_batch([20, 7], 2, 1, seed=35)
    kw = dict(max_len=20, token_type=types, timestamps=stamps, pos_bias=table(2, 9, 36), time_bias=table(1, 8, 37))
    grads = []
    for impl in ("triton", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        hstu_attention(*leaves, offsets, impl=impl, **kw).square().sum().backward()
        grads.append([t.grad for t in leaves])
    assert_close_rel(grads[0], grads[1], TOL[torch.float32], names=("dq", "dk", "dv"))


@pytest.mark.parametrize("layout", [True, False], ids=["layout", "random-types"])
def test_visibility_codes_are_the_mixed_mask(layout):
    """Inside every sample, ``key[j] <= query[i] or j == i`` is exactly mask.allowed(mixed), for all pairs:
    ties of timestamps within and across types, H stamped after R, empty and length-1 samples."""
    for seed in range(4):
        _, _, _, offsets, types, stamps = make_batch([0, 17, 1, 40, 5, 16, 33], 1, 1, layout=layout, seed=seed)
        types, stamps, offsets = types.cpu(), stamps.cpu(), offsets.cpu()
        codes = visibility_codes(types.to(torch.int64), stamps)
        assert codes.dtype == torch.int32 and codes.shape == (types.numel(), 2)
        for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
            ty, ts, pos = types[a:b].long(), stamps[a:b], torch.arange(b - a)
            want = allowed("mixed", ty[:, None], ty[None, :], ts[:, None], ts[None, :], pos[:, None], pos[None, :])
            got = (codes[a:b, 1][None, :] <= codes[a:b, 0][:, None]) | (pos[:, None] == pos[None, :])
            assert torch.equal(got, want), (seed, a, b)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_segment_reduce_is_per_sample_min_max(dtype, monkeypatch):
    # per-sample least and greatest values through the padded tile and through scatter_reduce (the fallback for a
    # tile past PADDED_MAX_RATIO x N entries), against a loop over the samples: empty and length-1 samples, values
    # near the dtype's limits; the metadata built from it (mixed-mask stats, identity prefixes) is that of the loop
    lengths = [0, 17, 1, 40, 0, 5, 16]
    offsets = torch.tensor([0] + lengths).cumsum(0).to(DEVICE)
    n = int(offsets[-1])
    info = torch.iinfo(dtype)
    values = torch.randint(info.min // 2, info.max // 2, (n,), generator=torch.Generator().manual_seed(3),
                           dtype=torch.int64).to(dtype).to(DEVICE)
    values[3] = info.max
    samples, local = triton_meta.sample_rows(offsets, n)
    for ratio in (triton_meta.PADDED_MAX_RATIO, 0):
        monkeypatch.setattr(triton_meta, "PADDED_MAX_RATIO", ratio)
        for largest in (False, True):
            got = triton_meta.segment_reduce(values, offsets, samples, local, 40, largest, -7).cpu()
            want = [(values[a:b].max() if largest else values[a:b].min()).item() if b > a else -7
                    for a, b in zip(offsets.tolist(), offsets[1:].tolist())]
            assert got.dtype == dtype and got.tolist() == want, (ratio, largest)


def test_metadata_memo_follows_in_place_changes():
    q, k, v, offsets, types, stamps = make_batch([20, 7], 2, 1, seed=32)
    kw = dict(max_len=20, mask_mode="mixed", pos_bias=table(2, 9, 33), time_bias=table(1, 8, 34))
    for _ in range(2):  # the second call reuses the memoised metadata
        got = hstu_attention(q, k, v, offsets, token_type=types, timestamps=stamps, impl="triton", **kw)
        want = hstu_attention(q, k, v, offsets, token_type=types, timestamps=stamps, **kw)
        assert_close_rel([got], [want], TOL[torch.float32])
        types.copy_(types.flip(0))  # in place: must not reuse the old metadata
        stamps.mul_(3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_half_precision(dtype):
    q, k, v, offsets, types, stamps = make_batch([33, 0, 1, 20], 4, 2, layout=True, seed=7, dtype=dtype)
    kw = dict(max_len=33, token_type=types, timestamps=stamps, mask_mode="mixed", normaliser="keys")
    tabs = (table(4, 9, 8), table(1, 10, 9))
    want = forward_backward("reference", q, k, v, offsets, *tabs, **kw)
    got = forward_backward("triton", q, k, v, offsets, *tabs, **kw)
    assert got[0].dtype == dtype
    assert_close_rel(got, want, TOL[dtype])


def test_triton_empty_and_length_one_batches():
    q, k, v, offsets, types, stamps = make_batch([1, 0, 1, 1], 2, 1, seed=10)
    kw = dict(max_len=1, token_type=types, timestamps=stamps, normaliser="keys")
    assert_close_rel(forward_backward("triton", q, k, v, offsets, table(2, 5, 1), None, **kw),
                     forward_backward("reference", q, k, v, offsets, table(2, 5, 1), None, **kw), 1e-4)
    q, k, v, offsets, types, stamps = make_batch([0, 0, 0], 2, 1, seed=11)
    out, dq, dk, dv, dpos, _ = forward_backward("triton", q, k, v, offsets, table(1, 5, 1), None, max_len=0,
                                                token_type=types, timestamps=stamps)
    assert out.shape == (0, 2, 16) and dk.shape == (0, 1, 16)
    assert dpos.abs().sum().item() == 0
    q, k, v, offsets, types, stamps = make_batch([3, 4], 2, 1, seed=12)
    none = hstu_attention(q[:0], k, v, offsets, max_len=4, token_type=types, timestamps=stamps, impl="triton",
                          query_index=torch.zeros(0, dtype=torch.int64, device=DEVICE))
    assert none.shape == (0, 2, 16)


@triton.jit
def _buckets_kernel(DT, OUT, TBND, NUM_TB, inv_log2_base: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    dt = tl.load(DT + offs)
    tl.store(OUT + offs, time_bucket(dt, tl.zeros_like(dt), TBND, NUM_TB, inv_log2_base))


def test_time_bucket_in_kernel_matches_integer_bucketing():
    if interpreting():
        _interpreter_index_fix()
    for base, num_tb in ((2.0, 32), (1.5, 20), (10.0, 4), (1.01, 64), (3.7, 40), (2.0, 1)):
        bounds = time_bucket_boundaries(num_tb, base)
        edges = torch.cat([bounds - 1, bounds, bounds + 1]).clamp(0, 2**62)
        dt = torch.cat([torch.arange(0, 300), edges, torch.tensor([10**9, 10**12, 2**40, 2**62])])
        dt = torch.cat([dt, -dt])  # the sign is ignored
        dt = torch.cat([dt, dt.new_zeros((-dt.numel()) % 128)]).to(DEVICE)
        out = torch.empty(dt.shape, dtype=torch.int32, device=DEVICE)
        tbnd = bounds.to(DEVICE) if bounds.numel() else torch.zeros(1, dtype=torch.int64, device=DEVICE)
        _buckets_kernel[(dt.numel() // 128,)](dt, out, tbnd, num_tb, 1.0 / math.log2(base), BLOCK=128)
        assert out.long().tolist() == time_buckets(dt, num_tb, base).tolist(), base
        # the kernels' int32 form: gaps below 2^31 - 1, boundaries clamped to 2^31 - 1
        small = dt.abs().clamp(max=2**31 - 2).to(torch.int32)
        tbnd32 = tbnd.clamp(max=2**31 - 1).to(torch.int32)
        _buckets_kernel[(dt.numel() // 128,)](small, out, tbnd32, num_tb, 1.0 / math.log2(base), BLOCK=128)
        assert out.long().tolist() == time_buckets(small.long(), num_tb, base).tolist(), base


@triton.jit
def _span_kernel(EXT, CH, STARTS, OUT, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    i = tl.program_id(1)
    start = tl.load(STARTS + i)
    lo_p, hi_p, lo_s, hi_s = tile_span(EXT, tl.load(CH + b), tl.load(CH + b + 1), start, BLOCK, True, True)
    row = OUT + (b * tl.num_programs(1) + i) * 5
    tl.store(row, lo_p)
    tl.store(row + 1, hi_p)
    tl.store(row + 2, lo_s)
    tl.store(row + 3, hi_s)
    tl.store(row + 4, tile_ident(EXT, tl.load(CH + b), tl.load(CH + b + 1), start, BLOCK))


@pytest.mark.parametrize("block", [16, 32, 64])
def test_tile_span_reads_the_extremes_of_the_tiles_rows(block):
    # the kernels' tile spans (chunk extremes combined over BLOCK / 16 chunks, rows past the sample end
    # left out) equal min/max over the tile's rows, and the identity flag (every row at its own position:
    # the Toeplitz position bias) holds exactly when it does for every row of the tile
    if interpreting():
        _interpreter_index_fix()
    gen = torch.Generator().manual_seed(7)
    lengths = [70, 16, 1, 129, 33]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    n = sum(lengths)
    local = torch.cat([torch.arange(length, dtype=torch.int32) for length in lengths])
    pos = torch.where(torch.rand(n, generator=gen) < 0.02, torch.randint(0, 500, (n,), generator=gen,
                                                                         dtype=torch.int32), local)
    sec = torch.randint(0, 2**31 - 2, (n,), generator=gen, dtype=torch.int32)
    ext, chunks = chunk_extremes(offsets.to(DEVICE), pos.to(DEVICE), sec.to(DEVICE), n)
    starts = torch.arange(0, max(lengths), block, dtype=torch.int32)
    out = torch.zeros(len(lengths), starts.numel(), 5, dtype=torch.int32, device=DEVICE)
    _span_kernel[(len(lengths), starts.numel())](ext, chunks, starts.to(DEVICE), out, BLOCK=block)
    seen = set()
    for b, length in enumerate(lengths):
        for i, start in enumerate(starts.tolist()):
            if start >= length:
                continue
            rows = slice(offsets[b] + start, offsets[b] + min(start + block, length))
            ident = bool((pos[rows] == local[rows]).all())
            want = [pos[rows].min(), pos[rows].max(), sec[rows].min(), sec[rows].max(), ident]
            assert out[b, i].tolist() == [int(x) for x in want], (b, start)
            seen.add(ident)
    assert seen == {True, False}  # both kinds of tile occur
    no_ident, _ = chunk_extremes(offsets.to(DEVICE), local.to(DEVICE), sec.to(DEVICE), n, identity=False)
    assert not no_ident[:, 4].any()  # target-only query rows never take the Toeplitz path


def test_dense_matches_reference():
    for layout, mode, norm, rows_kind in ((True, "mixed", "keys", None), (False, "mixed", "length", "targets"),
                                          (True, "causal", "max_len", "random"), (True, "full", "none", None)):
        q, k, v, offsets, types, stamps = make_batch(LENGTHS, 6, 2, d_qk=5, d_v=3, layout=layout, seed=13,
                                                     dtype=torch.float64)
        rows = query_rows(rows_kind, types, seed=14)
        if rows is not None:
            rows = torch.unique(rows)[torch.randperm(torch.unique(rows).numel())]  # dense: distinct rows
            q = q[rows]
        kw = dict(max_len=40, token_type=types, timestamps=stamps, mask_mode=mode, normaliser=norm,
                  query_index=rows)
        tabs = (table(6, 9, 15).double(), table(1, 8, 16).double())
        assert_close_rel(forward_backward("dense", q, k, v, offsets, *tabs, **kw),
                         forward_backward("reference", q, k, v, offsets, *tabs, **kw), TOL[torch.float64])


def _args(**change):
    q, k, v, offsets, types, stamps = make_batch([3, 2], 4, 2, seed=17)
    args = dict(q=q, k=k, v=v, offsets=offsets, max_len=3, token_type=types, timestamps=stamps, impl="triton")
    args.update(change)
    return args


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(offsets=torch.tensor([0, 4, 3, 5], device=DEVICE)), "non-decreasing"),
    (lambda a: a.update(k=a["k"].half(), v=a["v"].half()), "dtype"),
    (lambda a: a.update(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()), "impl='triton'.*float64"),
    (lambda a: a.update(k=a["k"][:, :1].repeat(1, 3, 1), v=a["v"][:, :1].repeat(1, 3, 1)), "does not divide"),
    (lambda a: a.update(q=a["q"].new_zeros(5, 4, 300), k=a["k"].new_zeros(5, 2, 300)), "at most 256"),
    (lambda a: a.update(timestamps=a["timestamps"].to("meta")), "timestamps is on meta"),
])
def test_bad_inputs(change, message):
    args = _args()
    change(args)
    with pytest.raises(RecfmError, match=message):
        hstu_attention(**args)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU tensors without the interpreter")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RecfmError, match="need CUDA"):
        hstu_attention(**_args())


# ----------------------------------------------------------------------------------------------------------
# GPU only: realistic lengths, autotuned configs, and no host synchronisation.


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["causal", "mixed"])
@pytest.mark.parametrize("heads, d", [(4, 128), (3, 256)])
def test_gpu_bf16_long_samples(mode, heads, d, monkeypatch):
    # autotuned (max_len >= TUNE_FROM_LEN) from fresh tuners, so that this call runs every trial: the trials must
    # not change what the chosen config computes (the forward writes its scores over the bias cache it reads)
    monkeypatch.setattr(triton_launch, "_TUNERS", {})
    lengths = [700, 1, 0, 513, 64, 1000]
    q, k, v, offsets, types, stamps = make_batch(lengths, heads, 1, d_qk=d, d_v=d, seed=20, dtype=torch.bfloat16)
    kw = dict(max_len=1000, token_type=types, timestamps=stamps, mask_mode=mode, normaliser="length")
    tabs = (table(heads, 257, 21), table(1, 32, 22))
    assert_close_rel(forward_backward("triton", q, k, v, offsets, *tabs, **kw),
                     forward_backward("reference", q, k, v, offsets, *tabs, **kw), TOL[torch.bfloat16])


@pytest.mark.gpu
def test_gpu_no_host_sync():
    q, k, v, offsets, types, stamps = make_batch([600, 3, 900], 4, 2, d_qk=64, d_v=64, seed=23,
                                                 dtype=torch.bfloat16)
    rows = query_rows("targets", types, seed=24)
    kw = dict(max_len=900, token_type=types, timestamps=stamps, mask_mode="mixed", normaliser="keys")
    tabs = (table(4, 65, 25), table(4, 32, 26))
    for qi in (None, rows):
        q_in = q if qi is None else q[qi]
        forward_backward("triton", q_in, k, v, offsets, *tabs, query_index=qi, **kw)  # compile + autotune
        leaves = [t.detach().clone().requires_grad_() for t in (q_in, k, v, *tabs)]  # as in the warm-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = hstu_attention(*leaves[:3], offsets, impl="triton", validate=False, query_index=qi,
                                 pos_bias=leaves[3], time_bias=leaves[4], **kw)
            out.sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")

"""HSTU attention, its mask and bias, and Group LayerNorm, checked against independent brute-force versions."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from recfm.errors import RecfmError
from recfm.foundation.model.bias import event_positions, position_buckets, time_buckets
from recfm.foundation.model.mask import sample_mask
from recfm.kernels.group_layer_norm import group_layer_norm
from recfm.kernels.hstu_attention import hstu_attention

H, R, T = 0, 1, 2


# ----------------------------------------------------------------------------------------------------------
# Brute force: one Python predicate per pair, Python loops for positions and buckets.


def allowed_py(mode, type_i, type_j, t_i, t_j, pos_i, pos_j) -> bool:
    if mode == "full":
        return True
    if mode == "causal":
        return pos_j <= pos_i
    if type_j == H:
        return True
    if type_j == R:
        if type_i == R:
            return (t_j, pos_j) <= (t_i, pos_i)
        return type_i == T and t_j < t_i
    return pos_i == pos_j  # key is T: only itself


def event_positions_py(types, stamps):
    """Number of H/R events before each token: H by position; R by (time, position); T by time, strictly."""
    out = []
    for i, (ty, t) in enumerate(zip(types, stamps)):
        hs = [j for j, tj in enumerate(types) if tj == H]
        rs = [j for j, tj in enumerate(types) if tj == R]
        if ty == H:
            out.append(sum(j < i for j in hs))
        elif ty == R:
            out.append(len(hs) + sum((stamps[j], j) < (t, i) for j in rs))
        else:
            out.append(len(hs) + sum(stamps[j] < t for j in rs))
    return out


def time_bucket_py(dt, num_buckets, base):
    return min(int(math.floor(math.log1p(abs(dt)) / math.log(base) + 1e-9)), num_buckets - 1)


def dense_attention(q, k, v, offsets, types, stamps, mode, pos_bias, time_bias, base, alpha, normaliser, max_len):
    """The whole batch as one dense [N, N] problem with an explicit mask/bias matrix and repeated kv heads."""
    n, h = q.shape[0], q.shape[1]
    k = k.repeat_interleave(h // k.shape[1], dim=1)
    v = v.repeat_interleave(h // v.shape[1], dim=1)
    mask = torch.zeros(n, n, dtype=q.dtype)
    bias = torch.zeros(h, n, n, dtype=q.dtype)
    norm = torch.ones(n, 1, dtype=q.dtype)
    off = offsets.tolist()
    types = types.tolist() if types is not None else [H] * n
    stamps = stamps.tolist() if stamps is not None else [0] * n
    for b in range(len(off) - 1):
        s, e = off[b], off[b + 1]
        ev = event_positions_py(types[s:e], stamps[s:e])
        for i in range(s, e):
            for j in range(s, e):
                mask[i, j] = float(allowed_py(mode, types[i], types[j], stamps[i], stamps[j], i - s, j - s))
                if pos_bias is not None:
                    half = (pos_bias.shape[1] - 1) // 2
                    rel = max(-half, min(half, ev[i - s] - ev[j - s]))
                    bias[:, i, j] += pos_bias[:, rel + half].expand(h)
                if time_bias is not None:
                    bias[:, i, j] += time_bias[:, time_bucket_py(stamps[i] - stamps[j], time_bias.shape[1], base)].expand(h)
            norm[i] = {"length": e - s, "keys": max(mask[i].sum().item(), 1), "max_len": max_len, "none": 1}[normaliser]
    scores = torch.einsum("qhd,khd->hqk", q, k) * alpha + bias
    weights = F.silu(scores) * mask / norm
    return torch.einsum("hqk,khd->qhd", weights, v)


def jagged_inputs(lengths, h=4, h_kv=2, d_qk=5, d_v=3, seed=0, dtype=torch.float64, layout=True):
    """Random q/k/v and token metadata; `layout` = H then R then T per sample, else random types."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    n = sum(lengths)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    types, stamps = [], []
    for length in lengths:
        if layout:
            cuts = sorted(rng.randint(0, length) for _ in range(2))
            sample_types = [H] * cuts[0] + [R] * (cuts[1] - cuts[0]) + [T] * (length - cuts[1])
        else:
            sample_types = [rng.choice((H, R, T)) for _ in range(length)]
        types += sample_types
        stamps += [rng.randint(0, 6) if ty == H else rng.randint(5, 9) for ty in sample_types]  # many ties
    q = torch.randn(n, h, d_qk, generator=gen, dtype=dtype)
    k = torch.randn(n, h_kv, d_qk, generator=gen, dtype=dtype)
    v = torch.randn(n, h_kv, d_v, generator=gen, dtype=dtype)
    types = torch.tensor(types, dtype=torch.int8)
    stamps = torch.tensor(stamps, dtype=torch.int64)
    return q, k, v, offsets, types, stamps


# ----------------------------------------------------------------------------------------------------------
# Mask and bias.


@pytest.mark.parametrize("mode", ["mixed", "causal", "full"])
def test_mask_matches_bruteforce_predicate(mode):
    rng = random.Random(1)
    for trial in range(30):
        length = rng.randint(0, 12)
        types = [rng.choice((H, R, T)) for _ in range(length)]
        stamps = [rng.randint(0, 3) for _ in range(length)]  # many timestamp ties
        got = sample_mask(mode, length, torch.tensor(types, dtype=torch.int8), torch.tensor(stamps))
        want = [[allowed_py(mode, types[i], types[j], stamps[i], stamps[j], i, j) for j in range(length)]
                for i in range(length)]
        assert got.tolist() == want, (trial, types, stamps)


def test_mask_hand_example():
    #            H  H  R  R  R  T  T
    types = [0, 0, 1, 1, 1, 2, 2]
    stamps = [1, 2, 5, 5, 7, 5, 8]
    want = [
        [1, 1, 0, 0, 0, 0, 0],  # H sees H only (both, no causality inside H)
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],  # R@5 sees itself; not the later-positioned R@5
        [1, 1, 1, 1, 0, 0, 0],  # R@5 (second) sees the first R@5 (tie broken by position) and itself
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 0],  # T@5 sees no R@5 (strictly before only), sees itself
        [1, 1, 1, 1, 1, 0, 1],  # T@8 sees every R, not the other T
    ]
    got = sample_mask("mixed", 7, torch.tensor(types), torch.tensor(stamps))
    assert got.int().tolist() == want
    got_rows = sample_mask("mixed", 7, torch.tensor(types), torch.tensor(stamps), torch.tensor([6, 2]))
    assert got_rows.int().tolist() == [want[6], want[2]]


def test_buckets_and_event_positions():
    dt = torch.arange(-3000, 3000)
    for base, k in ((2.0, 32), (1.5, 20), (10.0, 4)):
        assert time_buckets(dt, k, base).tolist() == [time_bucket_py(x, k, base) for x in dt.tolist()]
    assert time_buckets(torch.tensor([0, 1, 2, 3, 6, 7, 10**12]), 8, 2.0).tolist() == [0, 1, 1, 2, 2, 3, 7]
    assert position_buckets(torch.tensor([-9, -2, 0, 2, 9]), 5).tolist() == [0, 0, 2, 4, 4]
    offsets = torch.tensor([0, 7, 7, 10])
    #                     H  H  R  R  R  T  T    H  R  T
    types = torch.tensor([H, H, R, R, R, T, T, H, R, T], dtype=torch.int8)
    stamps = torch.tensor([5, 1, 3, 3, 6, 3, 9, 0, 4, 4])
    assert event_positions(offsets, types, stamps, 10).tolist() == [0, 1, 2, 3, 4, 2, 5, 0, 1, 1]
    assert event_positions(offsets, None, None, 10).tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    rng = random.Random(12)
    lengths = [rng.randint(0, 9) for _ in range(20)]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    types = [rng.choice((H, R, T)) for _ in range(sum(lengths))]
    stamps = [rng.randint(0, 4) for _ in types]
    want = []
    for s, e in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        want += event_positions_py(types[s:e], stamps[s:e])
    got = event_positions(offsets, torch.tensor(types, dtype=torch.int8), torch.tensor(stamps), len(types))
    assert got.tolist() == want


# ----------------------------------------------------------------------------------------------------------
# Attention.


def test_hand_computed_value():
    # One sample: H (t=0), R (t=10), T (t=20); 1 head, d_qk = d_v = 1, alpha 1, no bias, n = 3.
    q = torch.tensor([[[1.0]], [[2.0]], [[0.5]]])
    k = torch.tensor([[[1.0]], [[-1.0]], [[3.0]]])
    v = torch.tensor([[[1.0]], [[10.0]], [[100.0]]])
    out = hstu_attention(q, k, v, torch.tensor([0, 3]), max_len=3, token_type=torch.tensor([0, 1, 2]),
                         timestamps=torch.tensor([0, 10, 20]), alpha=1.0)
    silu = lambda x: x / (1 + math.exp(-x))  # noqa: E731
    want = [silu(1) * 1 / 3,  # H sees H
            (silu(2) * 1 + silu(-2) * 10) / 3,  # R sees H and itself
            (silu(0.5) * 1 + silu(-0.5) * 10 + silu(1.5) * 100) / 3]  # T sees H, R, itself
    assert out.flatten().tolist() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("mode", ["mixed", "causal", "full"])
@pytest.mark.parametrize("normaliser", ["length", "keys", "max_len", "none"])
@pytest.mark.parametrize("layout", [True, False], ids=["layout", "random_types"])
def test_mha_matches_dense_explicit_mask(mode, normaliser, layout):
    lengths = [7, 0, 1, 12, 3]
    q, k, v, offsets, types, stamps = jagged_inputs(lengths, h=3, h_kv=3, seed=2, layout=layout)
    pos_bias = torch.randn(3, 7, dtype=torch.float64)
    time_bias = torch.randn(1, 6, dtype=torch.float64)
    out = hstu_attention(q, k, v, offsets, max_len=14, token_type=types, timestamps=stamps, mask_mode=mode,
                         pos_bias=pos_bias, time_bias=time_bias, time_bucket_base=1.7, alpha=0.3,
                         normaliser=normaliser)
    want = dense_attention(q, k, v, offsets, types, stamps, mode, pos_bias, time_bias, 1.7, 0.3, normaliser, 14)
    torch.testing.assert_close(out, want)


def test_gqa_equals_mha_with_repeated_kv_heads():
    q, k, v, offsets, types, stamps = jagged_inputs([9, 4, 1], h=6, h_kv=2, seed=3, dtype=torch.float32)
    pos_bias, time_bias = torch.randn(6, 9), torch.randn(6, 32)
    kw = dict(max_len=9, token_type=types, timestamps=stamps, pos_bias=pos_bias, time_bias=time_bias)
    gqa = hstu_attention(q, k, v, offsets, **kw)
    mha = hstu_attention(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), offsets, **kw)
    torch.testing.assert_close(gqa, mha)
    # query head g reads kv head g // 3: changing kv head 1 changes only query heads 3..5
    v2 = v.clone()
    v2[:, 1] += 1.0
    changed = (hstu_attention(q, k, v2, offsets, **kw) - gqa).abs().amax(dim=(0, 2)) > 0
    assert changed.tolist() == [False, False, False, True, True, True]


def test_query_index_gives_the_same_rows_as_all_queries():
    q, k, v, offsets, types, stamps = jagged_inputs([6, 0, 5, 1, 8], seed=4)
    kw = dict(max_len=8, token_type=types, timestamps=stamps, pos_bias=torch.randn(4, 5, dtype=torch.float64),
              time_bias=torch.randn(4, 8, dtype=torch.float64))
    full = hstu_attention(q, k, v, offsets, **kw)
    rows = torch.tensor([19, 3, 11, 0, 12, 7], dtype=torch.int64)  # unsorted, several samples
    part = hstu_attention(q[rows], k, v, offsets, query_index=rows, **kw)
    torch.testing.assert_close(part, full[rows])
    none = hstu_attention(q[:0], k, v, offsets, query_index=rows[:0], **kw)
    assert none.shape == (0, 4, 3)


def test_jagged_batch_equals_samples_one_by_one():
    lengths = [5, 0, 1, 9, 4]
    q, k, v, offsets, types, stamps = jagged_inputs(lengths, seed=5)
    tables = dict(pos_bias=torch.randn(1, 7, dtype=torch.float64), time_bias=torch.randn(4, 10, dtype=torch.float64))
    batch = hstu_attention(q, k, v, offsets, max_len=9, token_type=types, timestamps=stamps, **tables)
    for s, e in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        one = hstu_attention(q[s:e], k[s:e], v[s:e], torch.tensor([0, e - s]), max_len=e - s,
                             token_type=types[s:e], timestamps=stamps[s:e], **tables)
        torch.testing.assert_close(batch[s:e], one)


def test_empty_and_length_one_samples():
    q, k, v, offsets, types, stamps = jagged_inputs([0, 1, 0], seed=6)
    out = hstu_attention(q, k, v, offsets, max_len=1, token_type=types, timestamps=stamps)
    # one token that sees itself (H, R or T all do): silu(alpha q.k) v / 1
    alpha = 1 / math.sqrt(q.shape[2])
    want = F.silu((q[0] * k[0].repeat_interleave(2, 0)).sum(-1) * alpha)[:, None] * v[0].repeat_interleave(2, 0)
    torch.testing.assert_close(out[0], want)
    empty = hstu_attention(q[:0], k[:0], v[:0], torch.tensor([0, 0, 0]), max_len=0,
                           token_type=types[:0], timestamps=stamps[:0])
    assert empty.shape == (0, 4, 3)


def test_bfloat16_inputs_return_bfloat16_computed_in_float32():
    q, k, v, offsets, types, stamps = jagged_inputs([6, 3], seed=7, dtype=torch.float32)
    kw = dict(max_len=6, token_type=types, timestamps=stamps)
    out = hstu_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), offsets, **kw)
    assert out.dtype == torch.bfloat16
    want = hstu_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), offsets, **kw)
    torch.testing.assert_close(out.float(), want, atol=1e-2, rtol=1e-2)


def test_gradcheck_attention():
    q, k, v, offsets, types, stamps = jagged_inputs([4, 0, 1, 3], h=2, h_kv=1, d_qk=3, d_v=2, seed=8)
    pos_bias = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    time_bias = torch.randn(1, 6, dtype=torch.float64, requires_grad=True)
    inputs = [t.requires_grad_() for t in (q, k, v)] + [pos_bias, time_bias]
    rows = torch.tensor([7, 2, 3])

    def full(q, k, v, pb, tb):
        return hstu_attention(q, k, v, offsets, max_len=4, token_type=types, timestamps=stamps, pos_bias=pb,
                              time_bias=tb, normaliser="keys")

    def targets(q, k, v, pb, tb):
        return hstu_attention(q[rows], k, v, offsets, max_len=4, token_type=types, timestamps=stamps,
                              pos_bias=pb, time_bias=tb, query_index=rows)

    assert torch.autograd.gradcheck(full, inputs)
    assert torch.autograd.gradcheck(targets, inputs)


def _good_args():
    q, k, v, offsets, types, stamps = jagged_inputs([3, 2], seed=9, dtype=torch.float32)
    return dict(q=q, k=k, v=v, offsets=offsets, max_len=3, token_type=types, timestamps=stamps)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(offsets=torch.tensor([0, 3, 4])), "end at N=5"),
    (lambda a: a.update(offsets=torch.tensor([1, 3, 5])), "start at 0"),
    (lambda a: a.update(offsets=torch.tensor([0, 4, 3, 5])), "non-decreasing"),
    (lambda a: a.update(offsets=torch.tensor([0, 3, 5], dtype=torch.int32)), "int64"),
    (lambda a: a.update(max_len=2), "max_len=2"),
    (lambda a: a.update(k=a["k"][:, :1].repeat(1, 3, 1), v=a["v"][:, :1].repeat(1, 3, 1)), "does not divide"),
    (lambda a: a.update(k=a["k"].double()), "dtype"),
    (lambda a: a.update(v=a["v"][:4]), "agree on rows"),
    (lambda a: a.update(q=a["q"][:, :, :2]), "d_qk"),
    (lambda a: a.update(token_type=None), "needs token_type"),
    (lambda a: a.update(token_type=torch.tensor([0, 1, 2, 3, 0])), "token_type values"),
    (lambda a: a.update(timestamps=a["timestamps"].int()), "timestamps must be int64"),
    (lambda a: a.update(pos_bias=torch.zeros(4, 4)), "odd number"),
    (lambda a: a.update(pos_bias=torch.zeros(1, 5), timestamps=None, mask_mode="causal"), "needs timestamps"),
    (lambda a: a.update(time_bias=torch.zeros(3, 4)), "time_bias must be"),
    (lambda a: a.update(mask_mode="sideways"), "sideways"),
    (lambda a: a.update(normaliser="mean"), "mean"),
    (lambda a: a.update(impl="triton9"), "impl"),
    (lambda a: a.update(query_index=torch.tensor([0, 9]), q=a["q"][:2]), "query_index values"),
    (lambda a: a.update(query_index=torch.tensor([0, 1])), "query_index has 2 rows"),
    (lambda a: a.update(offsets=torch.tensor([0, 3, 5], device="meta")), "offsets is on meta"),
])
def test_bad_inputs_raise_before_compute(change, message):
    args = _good_args()
    change(args)
    with pytest.raises(RecfmError, match=message):
        hstu_attention(**args)


# ----------------------------------------------------------------------------------------------------------
# Group LayerNorm.


def test_group_layer_norm_matches_per_group_layer_norm():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(11, 6, generator=gen) * 3 + 1
    group = torch.tensor([0, 2, 2, 1, 0, 2, 1, 1, 0, 2, 2])
    weight, bias = torch.randn(3, 6, generator=gen), torch.randn(3, 6, generator=gen)
    out = group_layer_norm(x, group, weight, bias, eps=1e-5)
    for g in range(3):
        rows = group == g
        torch.testing.assert_close(out[rows], F.layer_norm(x[rows], (6,), weight[g], bias[g], eps=1e-5))
    assert group_layer_norm(x[:0], group[:0], weight, bias).shape == (0, 6)
    no_bias = group_layer_norm(x, group, weight, None)
    torch.testing.assert_close(no_bias, out - bias[group])


def test_group_layer_norm_gradcheck_and_errors():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    group = torch.tensor([1, 0, 1, 1, 0])
    assert torch.autograd.gradcheck(lambda x, w, b: group_layer_norm(x, group, w, b), (x, weight, bias))
    with pytest.raises(RecfmError, match="group ids must be in"):
        group_layer_norm(x, torch.tensor([0, 1, 2, 0, 0]), weight, bias)
    with pytest.raises(RecfmError, match="group must be int64"):
        group_layer_norm(x, group.int(), weight, bias)
    with pytest.raises(RecfmError, match="weight must be"):
        group_layer_norm(x, group, weight[:, :3], bias)

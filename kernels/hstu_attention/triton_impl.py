"""HSTU attention as fused Triton kernels (forward and backward) in a ``torch.autograd.Function``.

Imported only when ``impl="triton"`` is used (``recfm`` imports without Triton). Runs on CUDA tensors, or
on CPU tensors under ``TRITON_INTERPRET=1`` (tests). Same math and argument conventions as
:func:`recfm.kernels.hstu_attention.reference.hstu_attention_reference`; kernels in :mod:`.triton_fwd`
and :mod:`.triton_bwd`, tiles and ranges in :mod:`.triton_common`, block sizes in :mod:`.triton_launch`.

Work done outside the kernels, all on the device and without a host sync (grids come from ``max_len``,
``B = offsets.numel() - 1`` and the head counts):

* target-only queries: rows sorted by token (``torch.sort``, so grouped by sample and ordered by
  position), per-sample query offsets by ``torch.searchsorted``; outputs / dQ unsorted at the end;
* mixed mask: per-sample ``[B, 3]`` int32 stats (first non-H position, end of H, end of H/R events) and
  int32 time ranks (:func:`time_ranks`); time bias: int32 seconds since the sample's first timestamp
  (:func:`relative_seconds`: buckets exact while a sample spans < 68 years) and int32 boundaries;
* position bias: event positions (``bias.event_positions``, int32).

Saved for the backward: the inputs, and ``1/n`` per query row for the ``keys`` normaliser. Gradients of
``q``, ``k``, ``v`` in their dtype; the bias tables' in fp32 buffers cast to the tables' dtype.
"""

from __future__ import annotations

import math

import torch
import triton

from recfm.errors import RecfmError
from recfm.foundation.model.bias import event_positions, sample_ids, time_bucket_boundaries
from recfm.foundation.model.mask import MaskMode
from recfm.kernels.hstu_attention.reference import Normaliser
from recfm.kernels.hstu_attention.triton_launch import interpreting, launch

_MODES = {MaskMode.FULL: 0, MaskMode.CAUSAL: 1, MaskMode.MIXED: 2}
_NORMS = {Normaliser.LENGTH: 0, Normaliser.KEYS: 1, Normaliser.MAX_LEN: 2, Normaliser.NONE: 2}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def mixed_stats(offsets: torch.Tensor, token_type: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[B, 3]`` int32 per sample: first non-H position (``L`` if none), 1 + last H position (0 if none),
    1 + last H/R position (0 if none). No host sync."""
    lengths = offsets[1:] - offsets[:-1]
    samples = sample_ids(offsets, num_tokens)
    local = torch.arange(num_tokens, device=offsets.device) - offsets[samples]
    is_h = token_type == 0
    is_event = token_type != 2
    h_prefix = lengths.clone().scatter_reduce_(0, samples, torch.where(is_h, lengths[samples], local), "amin")
    zeros = torch.zeros_like(lengths)
    h_end = zeros.clone().scatter_reduce_(0, samples, torch.where(is_h, local + 1, 0), "amax")
    e_end = zeros.scatter_reduce_(0, samples, torch.where(is_event, local + 1, 0), "amax")
    return torch.stack([h_prefix, h_end, e_end], 1).to(torch.int32).contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    """``DOT_PREC`` of :func:`.triton_common.dot`: no tf32 for fp32; the interpreter's bf16 dot is broken."""
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if dtype == torch.bfloat16 and interpreting() else "tf32"


INT32_SPAN = 2**31 - 2  # relative seconds are clamped here; boundaries at 2**31 - 1


def time_ranks(timestamps: torch.Tensor) -> torch.Tensor:
    """``[N]`` int32 dense rank of each timestamp in the batch (equal stamps, equal ranks): the mask's
    ``<`` and ``==`` on ranks are exactly those on the int64 stamps. No host sync."""
    stamps, order = torch.sort(timestamps)
    changes = torch.cat([stamps.new_zeros(1), (stamps[1:] != stamps[:-1]).to(torch.int64)]).cumsum(0)
    return torch.empty_like(changes).scatter_(0, order, changes).to(torch.int32)


def relative_seconds(offsets: torch.Tensor, timestamps: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[N]`` int32 seconds since the sample's earliest timestamp, clamped to ``INT32_SPAN``: gaps (and so
    time buckets) are exact while a sample spans less than 2^31 - 2 s (68 years). No host sync."""
    samples = sample_ids(offsets, num_tokens)
    first = torch.full((offsets.numel() - 1,), torch.iinfo(torch.int64).max, dtype=torch.int64,
                       device=offsets.device).scatter_reduce_(0, samples, timestamps, "amin")
    return (timestamps - first[samples]).clamp(0, INT32_SPAN).to(torch.int32)


class _Plan:
    """Device-side metadata of one call (built once, reused by the backward)."""

    def __init__(self, q, k, v, offsets, max_len, token_type, timestamps, mode, pos_bias, time_bias, base, alpha,
                 norm, query_index):
        device = k.device
        num_tokens = k.shape[0]
        self.num_samples = offsets.numel() - 1
        self.max_len = max_len
        self.num_heads, self.group = q.shape[1], q.shape[1] // k.shape[1]
        self.d_qk, self.d_v = q.shape[2], v.shape[2]
        self.offsets = offsets.contiguous()
        dummy_i64 = torch.zeros(1, dtype=torch.int64, device=device)
        dummy_f = torch.zeros(1, dtype=torch.float32, device=device)
        if query_index is not None:
            self.qtok, self.order = torch.sort(query_index, stable=True)
            self.qoff = torch.searchsorted(self.qtok, self.offsets)
        else:
            self.qtok, self.order, self.qoff = dummy_i64, None, self.offsets
        self.token_type = token_type.contiguous() if token_type is not None and mode is MaskMode.MIXED else dummy_i64
        dummy_i32 = torch.zeros(1, dtype=torch.int32, device=device)
        self.ranks = time_ranks(timestamps) if mode is MaskMode.MIXED else dummy_i32
        self.seconds = relative_seconds(self.offsets, timestamps, num_tokens) if time_bias is not None else dummy_i32
        self.stats = (mixed_stats(self.offsets, token_type, num_tokens) if mode is MaskMode.MIXED
                      else torch.zeros(1, dtype=torch.int32, device=device))
        self.positions = (event_positions(self.offsets, token_type, timestamps, num_tokens).to(torch.int32)
                          if pos_bias is not None else torch.zeros(1, dtype=torch.int32, device=device))
        num_tb = time_bias.shape[1] if time_bias is not None else 1
        bounds = time_bucket_boundaries(num_tb, base, device) if time_bias is not None else dummy_i64
        self.bounds = (bounds.clamp(max=INT32_SPAN + 1) if bounds.numel() else dummy_i64).to(torch.int32)
        self.pos_shape = None if pos_bias is None else tuple(pos_bias.shape)
        self.time_shape = None if time_bias is None else tuple(time_bias.shape)
        self.dummy_f = dummy_f
        norm_const = 1.0 / max(max_len, 1) if norm is Normaliser.MAX_LEN else 1.0
        self.scalars = (alpha, norm_const, (pos_bias.shape[1] - 1) // 2 if pos_bias is not None else 0, num_tb,
                        1.0 / math.log2(base), 1 << max(max_len - 1, 0).bit_length())
        self.meta = dict(
            H=self.num_heads, GROUP=self.group, D_QK=self.d_qk, D_V=self.d_v, MASK_MODE=_MODES[mode],
            NORM=_NORMS[norm], HAS_QIDX=query_index is not None, HAS_POS=pos_bias is not None,
            HAS_TIME=time_bias is not None, DOT_PREC=_dot_precision(q.dtype), FAST=q.dtype != torch.float32 and not interpreting(),
            BLOCK_DQK=max(16, triton.next_power_of_2(self.d_qk)), BLOCK_DV=max(16, triton.next_power_of_2(self.d_v)),
        )
        self.keys_norm = norm is Normaliser.KEYS

    def table_strides(self, pos_bias, time_bias) -> tuple[int, int]:
        """Row stride of each table for query head g (0 when one row is shared by all heads)."""
        def stride(t):
            return 0 if t is None or t.shape[0] == 1 else t.shape[1]
        return stride(pos_bias), stride(time_bias)

    def tail(self, invn: torch.Tensor, pos_bias, time_bias) -> tuple:
        """Arguments shared by the three kernels after the tensors they differ in."""
        ptab = pos_bias.contiguous() if pos_bias is not None else self.dummy_f
        ttab = time_bias.contiguous() if time_bias is not None else self.dummy_f
        return (self.offsets, self.qoff, self.qtok, self.token_type, self.ranks, self.seconds, self.positions, ptab, ttab,
                self.bounds, self.stats, invn, *self.table_strides(pos_bias, time_bias), *self.scalars)


class _HSTUAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pos_bias, time_bias, plan: _Plan):
        q_sorted = (q[plan.order] if plan.order is not None else q).contiguous()
        k, v = k.contiguous(), v.contiguous()
        out = q.new_empty(q.shape[0], plan.num_heads, plan.d_v)
        invn = (torch.empty(q.shape[0], dtype=torch.float32, device=q.device) if plan.keys_norm else plan.dummy_f)
        if q.shape[0] and plan.num_samples:
            launch("fwd", plan.max_len, plan.num_samples, plan.num_heads,
                   (q_sorted, k, v, out, *plan.tail(invn, pos_bias, time_bias)), plan.meta)
        ctx.save_for_backward(q_sorted, k, v, pos_bias, time_bias, invn)
        ctx.plan = plan
        return _unsort(out, plan.order)

    @staticmethod
    def backward(ctx, grad_out):
        q_sorted, k, v, pos_bias, time_bias, invn = ctx.saved_tensors
        plan: _Plan = ctx.plan
        do = (grad_out[plan.order] if plan.order is not None else grad_out).contiguous()
        dq = torch.zeros_like(q_sorted)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        dpos = torch.zeros(plan.pos_shape, dtype=torch.float32, device=q_sorted.device) if plan.pos_shape else plan.dummy_f
        dtime = (torch.zeros(plan.time_shape, dtype=torch.float32, device=q_sorted.device) if plan.time_shape
                 else plan.dummy_f.clone())
        if q_sorted.shape[0] and plan.num_samples:
            tail = plan.tail(invn, pos_bias, time_bias)
            launch("dkdv", plan.max_len, plan.num_samples, plan.num_heads // plan.group,
                   (q_sorted, k, v, do, dk, dv, *tail), plan.meta)
            launch("dq", plan.max_len, plan.num_samples, plan.num_heads,
                   (q_sorted, k, v, do, dq, dpos, dtime, *tail), plan.meta)
        grad_pos = dpos.to(pos_bias.dtype) if pos_bias is not None and ctx.needs_input_grad[3] else None
        grad_time = dtime.to(time_bias.dtype) if time_bias is not None and ctx.needs_input_grad[4] else None
        return _unsort(dq, plan.order), dk, dv, grad_pos, grad_time, None


def _unsort(x: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``x`` (in sorted query order) back in the caller's order."""
    if order is None:
        return x
    return torch.empty_like(x).index_copy_(0, order, x)


def check_triton_inputs(q: torch.Tensor, d_v: int) -> None:
    """What the Triton path needs beyond the dispatcher's checks; raises :class:`RecfmError`."""
    if q.dtype not in _DTYPES:
        raise RecfmError(f"hstu_attention(impl='triton'): dtype {q.dtype} is not one of {list(_DTYPES)}")
    if q.device.type != "cuda" and not interpreting():
        raise RecfmError(f"hstu_attention(impl='triton'): tensors are on {q.device}; the Triton kernels need CUDA "
                         "tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    if max(q.shape[2], d_v) > MAX_HEAD_DIM:
        raise RecfmError(f"hstu_attention(impl='triton'): head dims d_qk={q.shape[2]}, d_v={d_v}; at most "
                         f"{MAX_HEAD_DIM} are supported")


def hstu_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    *,
    max_len: int,
    token_type: torch.Tensor | None,
    timestamps: torch.Tensor | None,
    mask_mode: MaskMode,
    pos_bias: torch.Tensor | None,
    time_bias: torch.Tensor | None,
    time_bucket_base: float,
    alpha: float,
    normaliser: Normaliser,
    query_index: torch.Tensor | None,
) -> torch.Tensor:
    """Fused HSTU attention (inputs already validated by the dispatcher).

    Args: as :func:`recfm.kernels.hstu_attention.hstu_attention`.

    Returns:
        ``[N_q, h, d_v]`` in ``q.dtype``; differentiable in ``q``, ``k``, ``v``, ``pos_bias``, ``time_bias``.
    """
    check_triton_inputs(q, v.shape[2])
    plan = _Plan(q, k, v, offsets, max_len, token_type, timestamps, MaskMode(mask_mode), pos_bias, time_bias,
                 float(time_bucket_base), float(alpha), Normaliser(normaliser), query_index)
    return _HSTUAttention.apply(q, k, v, pos_bias, time_bias, plan)

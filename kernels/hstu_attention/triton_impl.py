"""HSTU attention as fused Triton kernels (forward and backward) in a ``torch.autograd.Function``.

Imported only when ``impl="triton"`` is used (``recfm`` imports without Triton). Runs on CUDA tensors, or
on CPU tensors under ``TRITON_INTERPRET=1`` (tests). Same math and argument conventions as
:func:`recfm.kernels.hstu_attention.reference.hstu_attention_reference`; kernels in :mod:`.triton_fwd`
and :mod:`.triton_bwd`, tiles and ranges in :mod:`.triton_common`, block sizes in :mod:`.triton_launch`.

Work done outside the kernels -- target-only query sorting, mask visibility codes, relative seconds, mixed-mask
stats, event positions -- is in :mod:`.triton_meta`: on the device, without a host sync (grids come from
``max_len``, ``B = offsets.numel() - 1`` and the head counts), memoised across the layers of one batch.

Saved for the backward: the inputs, and ``1/n`` per query row for the ``keys`` normaliser. Gradients of
``q``, ``k``, ``v`` in their dtype; the bias tables' in fp32 buffers cast to the tables' dtype.
"""

from __future__ import annotations

import math

import torch
import triton

from recfm.errors import RecfmError
from recfm.foundation.model.mask import MaskMode
from recfm.kernels.hstu_attention.reference import Normaliser
from recfm.kernels.hstu_attention import triton_launch
from recfm.kernels.hstu_attention.triton_fwd import hstu_bias_kernel
from recfm.kernels.hstu_attention.triton_launch import interpreting, launch
from recfm.kernels.hstu_attention.triton_meta import TOEP_MAX_HALF, toeplitz_tables, toeplitz_width, token_metadata

_MODES = {MaskMode.FULL: 0, MaskMode.CAUSAL: 1, MaskMode.MIXED: 2}
_NORMS = {Normaliser.LENGTH: 0, Normaliser.KEYS: 1, Normaliser.MAX_LEN: 2, Normaliser.NONE: 2}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def _dot_precision(dtype: torch.dtype) -> str:
    """``DOT_PREC`` of :func:`.triton_common.dot`: no tf32 for fp32; the interpreter's bf16 dot is broken."""
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if dtype == torch.bfloat16 and interpreting() else "tf32"


# kernels that read Toeplitz position tiles (triton_common.toeplitz_tile); measured on an H100 (docs/benchmarks.md):
# the dK/dV kernel gains, the forward and dQ kernels lose (their tiles' layout conversion costs more than the gather)
TOEP_KINDS = ("dkdv",)
LANE_TABLE_MAX = 32  # time tables up to this size are read by warp shuffles (triton_common.lane_lookup)
# kernels that do so: not dK/dV, which measured faster with the load on an H100 (docs/benchmarks.md, session 8)
LANE_KINDS = ("fwd", "dq", "dq_inline", "band", "dsgrad")


# The bias cache: with a table and a backward to come, one kernel (triton_fwd.hstu_bias_kernel) writes the bias
# of every pair a query may see, once for all heads' buckets, and the forward, dQ and dK/dV kernels read it as one
# 2D load per tile instead of spans, buckets and table reads per score (docs/kernels.md). [h, N_q, BS] (BS:
# max_len rounded up to BIAS_CACHE_COLS) in the tables' dtype, kept until the backward. Made only below
# BIAS_CACHE_MAX_LEN, where it was measured to pay
# (H100: the medium step's attention 1.11x at max_len ~1,150; none at L 4096, where dQ splits its work with the
# band kernel) and up to BIAS_CACHE_MAX_BYTES per call; otherwise the kernels compute the bias themselves.
BIAS_CACHE = True
BIAS_CACHE_MAX_LEN = 2048
BIAS_CACHE_MAX_BYTES = 1 << 30
BIAS_CACHE_COLS = 128  # cache rows are a multiple of this many columns: of every BLOCK_N (triton_common.cached_bias)
# The table gradients from a stored dS: where the bias cache is made, the dQ kernel stores dS (the cache's [h, N_q,
# BS] layout and dtype: 16-bit inputs store dS rounded as the dQ product uses it) and computes no table gradient,
# so it keeps the large tiles of attention without tables, and triton_bwd.hstu_ds_grad_kernel reads dS back for
# them (no products, no Q/K/V/dO). Otherwise (no cache, or the buffer over DS_BUFFER_MAX_BYTES) one dQ pass with
# small tiles adds them itself (dq_inline).
DS_BUFFER = True
DS_BUFFER_MAX_BYTES = 1 << 30
# With the dS buffer, dQ runs first and the dK/dV kernel reads dS from it (DS_IN) instead of recomputing it: three
# products per tile instead of four (docs/kernels.md); False keeps dK/dV computing dS itself (a benchmark switch)
DKDV_READS_DS = True
# The score cache: where the bias cache is made, the forward kernel writes each tile's scores (alpha q k^T + bias,
# rounded to the cache's dtype) back over the bias it read, and the dQ and dK/dV kernels read them instead of
# recomputing q k^T: with the dS buffer the backward then runs four products per pair instead of six (dQ: dO V^T and
# dS K, no Q tile; dK/dV: P^T dO and dS^T Q, no K tile). False keeps the recomputation (a benchmark switch).
SCORE_CACHE = True
# With both the score cache and dK/dV reading the dS buffer, dK and dV are two launches of the dK/dV kernel ("dk":
# dS^T Q, "dv": P^T dO; triton_bwd PART): each program holds one fp32 accumulator instead of two, so a key tile can
# be twice as wide (at d 256 the pair of [BLOCK_N, 256] accumulators is what limits it): 0.55 against 0.92 ms per
# layer at the medium step's shape on an H100 (docs/benchmarks.md, run 13). False: one launch.
DKDV_SPLIT = True
# With the dS buffer and a position table taking its gradient, the pairs whose key sits at its own event position
# (every key but the targets in the batch layout) and whose offset lies inside the clamp are summed along the
# buffer's diagonals by triton_bwd.hstu_diag_grad_kernel (skewed loads, register sums, one flush per program);
# the table-gradient kernel keeps the time table and the clamped pairs (DIAG 1), and a second launch of it the other
# keys' unclamped pairs (DIAG 2: targets in the batch layout), so that the first compiles without the per-pair
# position paths (H100, medium step as a CUDA graph: 37.0 against 37.5 ms, docs/benchmarks.md run 16). Up to
# DIAG_MAX_SLOTS position buckets (the diag kernel holds next_power_of_2(2P) sums per program).
DIAG_GRADS = True
DIAG_MAX_SLOTS = 4096


def lanes_hold_time_table(num_tb: int) -> bool:
    """``TB_LANES`` of the kernels: near the diagonal, read the time table by warp shuffles (one register per
    lane, :func:`.triton_common.lane_lookup`) instead of a global load per score. Needs a GPU (PTX; the
    interpreter takes the load) and a table that fits a warp's 32 lanes; larger tables keep the load."""
    return 0 < num_tb <= LANE_TABLE_MAX and not interpreting()


class _Plan:
    """Device-side metadata of one call (built once, reused by the backward)."""

    def __init__(self, q, k, v, offsets, max_len, token_type, timestamps, mode, pos_bias, time_bias, base, alpha,
                 norm, query_index):
        num_tokens = k.shape[0]
        self.num_samples = offsets.numel() - 1
        self.max_len = max_len
        self.num_heads, self.group = q.shape[1], q.shape[1] // k.shape[1]
        self.d_qk, self.d_v = q.shape[2], v.shape[2]
        num_tb = time_bias.shape[1] if time_bias is not None else 0
        self.tokens = token_metadata(offsets, token_type, timestamps, query_index, mode, pos_bias is not None,
                                     num_tb, base, num_tokens, max_len)
        self.order = self.tokens.order
        self.pos_shape = None if pos_bias is None else tuple(pos_bias.shape)
        self.time_shape = None if time_bias is None else tuple(time_bias.shape)
        self.dummy_f = torch.zeros(1, dtype=torch.float32, device=k.device)
        norm_const = 1.0 / max(max_len, 1) if norm is Normaliser.MAX_LEN else 1.0
        half = (pos_bias.shape[1] - 1) // 2 if pos_bias is not None else 0
        self.scalars = (alpha, norm_const, half, max(num_tb, 1), 1.0 / math.log2(base),
                        1 << max(max_len - 1, 0).bit_length())
        self.meta = dict(
            H=self.num_heads, GROUP=self.group, D_QK=self.d_qk, D_V=self.d_v, MASK_MODE=_MODES[mode],
            NORM=_NORMS[norm], HAS_QIDX=query_index is not None, HAS_POS=pos_bias is not None,
            HAS_TIME=time_bias is not None, DOT_PREC=_dot_precision(q.dtype),
            FAST=q.dtype != torch.float32 and not interpreting(),
            TB_LANES=lanes_hold_time_table(num_tb),
            TOEP=False,  # per kernel: TOEP_KINDS
            QS=_row_stride(q) if query_index is None else q.shape[1] * q.shape[2],  # target rows are gathered
            KS=_row_stride(k), VS=_row_stride(v),
            BLOCK_DQK=max(16, triton.next_power_of_2(self.d_qk)),
            BLOCK_DV=max(16, triton.next_power_of_2(self.d_v)),
        )
        self.toep = pos_bias is not None and query_index is None and half <= TOEP_MAX_HALF
        self.bias_cache: torch.Tensor | None = None  # :meth:`cache_bias`; dropped at the end of the backward
        self.keys_norm = norm is Normaliser.KEYS
        # 16-bit inputs read the bias tables in their dtype: a 2-byte gather is a plain cached load, while a
        # 4-byte one is turned by Triton's software pipeliner into per-element asynchronous copies through
        # shared memory, which made every bias table cost ~5x the attention itself (H100, docs/kernels.md)
        self.table_dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32
        self._tables: dict = {}  # tables() of this call

    def cache_bias(self, q: torch.Tensor, num_q: int, backward: bool) -> None:
        """Allocate the bias cache (:data:`BIAS_CACHE`) when a table is on, a backward will read it and it fits
        :data:`BIAS_CACHE_MAX_BYTES` below :data:`BIAS_CACHE_MAX_LEN`: ``[h, N_q, BS]``, ``BS`` = ``max_len``
        rounded up to :data:`BIAS_CACHE_COLS` (a key tile starting inside a row ends inside it)."""
        tables = self.meta["HAS_POS"] or self.meta["HAS_TIME"]
        if not (BIAS_CACHE and backward and tables and self.max_len < BIAS_CACHE_MAX_LEN):
            return
        size = torch.empty((), dtype=self.table_dtype).element_size()
        row = -(-max(self.max_len, 1) // BIAS_CACHE_COLS) * BIAS_CACHE_COLS
        if self.num_heads * num_q * row * size <= BIAS_CACHE_MAX_BYTES:
            self.bias_cache = torch.empty(self.num_heads, num_q, row, dtype=self.table_dtype, device=q.device)

    def bias_args(self) -> tuple:
        """``(BIAS, BS, BHS)`` of every kernel: the cache, its row and head strides (placeholders without one)."""
        c = self.bias_cache
        if c is None:
            return self.dummy_f, 0, 0
        return c, c.stride(1), c.stride(0)

    def ds_buffer(self) -> torch.Tensor | None:
        """The dS buffer of the backward (:data:`DS_BUFFER`): shaped, strided and typed as the bias cache, or
        ``None`` without a cache or beyond :data:`DS_BUFFER_MAX_BYTES`."""
        c = self.bias_cache
        if not DS_BUFFER or c is None or c.numel() * c.element_size() > DS_BUFFER_MAX_BYTES:
            return None
        return torch.empty_like(c)

    def uses_toep(self, kind: str) -> bool:
        """Whether kernel ``kind`` reads Toeplitz position tiles (:data:`TOEP_KINDS`). The band kernel adds to
        the dQ kernel's gradient buffer, laid out like the table that kernel reads, so it follows ``dq``. No
        kernel reads the position table when there is a bias cache."""
        if self.bias_cache is not None:
            return False
        return self.toep and ("dq" if kind == "band" else kind) in TOEP_KINDS

    def kernel_meta(self, kind: str) -> dict:
        """The compile-time flags of kernel ``kind``: ``TOEP`` per :meth:`uses_toep`, ``TB_LANES`` only where
        :data:`LANE_KINDS` has it, ``BIAS_IN`` (read the bias cache), ``SCORES`` (the score cache: the forward
        writes its scores into the bias cache, the backward kernels read them, :data:`SCORE_CACHE`)."""
        cache = self.bias_cache is not None
        return {**self.meta, "TOEP": self.uses_toep(kind), "TB_LANES": self.meta["TB_LANES"] and kind in LANE_KINDS,
                "BIAS_IN": cache, "SCORES": cache and SCORE_CACHE}

    def write_bias(self, pos_bias, time_bias) -> None:
        """Fill the bias cache (:func:`.triton_fwd.hstu_bias_kernel`), before the forward kernel reads it."""
        c, t = self.bias_cache, self.tokens
        block = 16 if interpreting() else 64
        grid = (self.num_samples, triton.cdiv(self.max_len, block), triton.cdiv(self.max_len, block))
        ptab, ttab = self.tables(pos_bias, time_bias)
        pos_stride, time_stride = self.table_strides(pos_bias, time_bias, "fwd")
        _, _, half, num_tb, inv_log2_base, _ = self.scalars
        flags = {name: self.meta[name] for name in ("MASK_MODE", "HAS_QIDX", "HAS_POS", "HAS_TIME", "TB_LANES")}
        hstu_bias_kernel[grid](
            t.offsets, t.qoff, t.qtok, t.token_type, t.seconds, t.positions, ptab, ttab, t.bounds, t.stats, t.kext,
            t.kchunks, t.qext, t.qchunks, c, pos_stride, time_stride, half, num_tb, inv_log2_base, c.stride(1),
            c.stride(0), H=self.num_heads, **flags, BLOCK_M=block, BLOCK_N=block, num_warps=4)

    def pos_slots(self) -> int:
        """Register sums per program of the diag kernel: ``2P`` rounded up to a power of two (at least 64)."""
        return max(64, triton.next_power_of_2(self.pos_shape[1] - 1))

    def diag_grad(self, dsb: torch.Tensor, dpos: torch.Tensor, pos_bias: torch.Tensor) -> None:
        """Add the position gradient of the pairs :func:`.triton_bwd.hstu_diag_grad_kernel` owns (:data:`DIAG_GRADS`)
        from the dS buffer ``dsb`` to ``dpos`` (laid out like the table, as the dQ kernel reads it)."""
        t, half, len_key = self.tokens, self.scalars[2], self.scalars[5]
        ptab_stride = self.table_strides(pos_bias, None, "dq")[0]
        flags = {name: self.meta[name] for name in ("H", "MASK_MODE", "HAS_QIDX")}
        launch("diag", self.max_len, self.num_samples, self.num_heads,
               (dsb, dpos, t.offsets, t.qoff, t.qtok, t.vis, t.positions, t.idend, t.stats, len_key, dsb.stride(1),
                dsb.stride(0), ptab_stride, half),
               {**flags, "P_SLOTS": self.pos_slots()})

    def pos_width(self, kind: str) -> int:
        """Columns per head of the position table as kernel ``kind`` reads it (and of the gradient buffer the
        table-gradient kernels write): the table, then its Toeplitz layout (:func:`.triton_meta.toeplitz_tables`)
        where :meth:`uses_toep`."""
        return toeplitz_width((self.pos_shape[1] - 1) // 2) if self.uses_toep(kind) else self.pos_shape[1]

    def table_strides(self, pos_bias, time_bias, kind: str) -> tuple[int, int]:
        """Row stride of each table for query head g (0 when one row is shared by all heads)."""
        pos = 0 if pos_bias is None or pos_bias.shape[0] == 1 else self.pos_width(kind)
        time = 0 if time_bias is None or time_bias.shape[0] == 1 else time_bias.shape[1]
        return pos, time

    def tables(self, pos_bias, time_bias, toeplitz: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The position and time tables as the kernels read them: contiguous, in :attr:`table_dtype`
        (placeholders for absent ones); with ``toeplitz`` the position table in its Toeplitz layout
        (:func:`.triton_meta.toeplitz_tables`). Made once per call and kept for its every launch, forward and
        backward (the tables' version counters are checked: an in-place change makes them again)."""
        versions = tuple(None if t is None else (id(t), t._version) for t in (pos_bias, time_bias))
        if self._tables.get("versions") != versions:
            self._tables = {"versions": versions}
        if toeplitz not in self._tables:
            if toeplitz:
                ptab, ttab = self.tables(pos_bias, time_bias)
                self._tables[True] = (toeplitz_tables(ptab), ttab)
            else:
                self._tables[False] = (
                    pos_bias.to(self.table_dtype).contiguous() if pos_bias is not None else self.dummy_f,
                    time_bias.to(self.table_dtype).contiguous() if time_bias is not None else self.dummy_f)
        return self._tables[toeplitz]

    def tail(self, invn: torch.Tensor, pos_bias, time_bias, kind: str) -> tuple:
        """Arguments of kernel ``kind`` after the tensors the kernels differ in (the position table in that
        kernel's layout: the Toeplitz layout is built only for a kernel that reads it)."""
        ptab, ttab = self.tables(pos_bias, time_bias, toeplitz=pos_bias is not None and self.uses_toep(kind))
        t = self.tokens
        return (t.offsets, t.qoff, t.qtok, t.token_type, t.vis, t.seconds, t.positions, ptab, ttab, t.bounds,
                t.stats, invn, t.kext, t.kchunks, t.qext, t.qchunks, *self.table_strides(pos_bias, time_bias, kind),
                *self.scalars)


def _packed_rows(x: torch.Tensor) -> bool:
    """Whether the kernels can read ``x [rows, heads, d]`` in place: heads packed within a row, elements
    contiguous, rows any stride (e.g. Q, K and V as column slices of one projection's output)."""
    return x.stride(2) == 1 and (x.shape[1] == 1 or x.stride(1) == x.shape[2]) and x.stride(0) >= x.shape[1] * x.shape[2]


def _row_stride(x: torch.Tensor) -> int:
    """Row stride the kernels read ``x`` with: its own when :func:`_packed_rows`, else that of a contiguous copy
    (:func:`_in_place` makes it)."""
    return x.stride(0) if _packed_rows(x) and x.shape[0] > 1 else x.shape[1] * x.shape[2]


def _in_place(x: torch.Tensor, stride: int) -> torch.Tensor:
    """``x`` itself when its rows are ``stride`` apart with packed heads, else a contiguous copy."""
    return x if _packed_rows(x) and (x.shape[0] <= 1 or x.stride(0) == stride) else x.contiguous()


class _HSTUAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pos_bias, time_bias, plan: _Plan):
        # Q/K/V are read in place (views of the layer's projections: no copies), target rows gathered
        q_sorted = q[plan.order].contiguous() if plan.order is not None else _in_place(q, plan.meta["QS"])
        k, v = _in_place(k, plan.meta["KS"]), _in_place(v, plan.meta["VS"])
        out = q.new_empty(q.shape[0], plan.num_heads, plan.d_v)
        invn = (torch.empty(q.shape[0], dtype=torch.float32, device=q.device) if plan.keys_norm else plan.dummy_f)
        if q.shape[0] and plan.num_samples:
            if plan.bias_cache is not None:
                plan.write_bias(pos_bias, time_bias)
            launch("fwd", plan.max_len, plan.num_samples, plan.num_heads,
                   (q_sorted, k, v, out, *plan.tail(invn, pos_bias, time_bias, "fwd"), *plan.bias_args()),
                   plan.kernel_meta("fwd"))
        ctx.save_for_backward(q_sorted, k, v, pos_bias, time_bias, invn)
        ctx.plan = plan
        return _unsort(out, plan.order)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q_sorted, k, v, pos_bias, time_bias, invn = ctx.saved_tensors
        plan: _Plan = ctx.plan
        do = (grad_out[plan.order] if plan.order is not None else grad_out).contiguous()
        # every row is written by the kernels (as the forward's output), in the contiguous layout
        dq = q_sorted.new_empty(q_sorted.shape)
        dk, dv = k.new_empty(k.shape), v.new_empty(v.shape)
        grads = dict(POS_GRAD=pos_bias is not None and ctx.needs_input_grad[3],
                     TIME_GRAD=time_bias is not None and ctx.needs_input_grad[4],
                     TB_PAD=triton.next_power_of_2(plan.time_shape[1]) if plan.time_shape else 1)
        table_grads = grads["POS_GRAD"] or grads["TIME_GRAD"]
        split = table_grads and plan.max_len >= triton_launch.SPLIT_FROM_LEN
        dsb = plan.ds_buffer() if table_grads and not split else None
        kind = "dq_inline" if table_grads and not split and dsb is None else "dq"
        dpos = (torch.zeros(plan.pos_shape[0], plan.pos_width(kind), dtype=torch.float32, device=q_sorted.device)
                if plan.pos_shape else plan.dummy_f)  # laid out like the table the dQ kernel reads
        dtime = (torch.zeros(plan.time_shape, dtype=torch.float32, device=q_sorted.device) if plan.time_shape
                 else plan.dummy_f.clone())
        if q_sorted.shape[0] and plan.num_samples:
            dkdv_reads_ds = dsb is not None and DKDV_READS_DS

            def dkdv() -> None:
                meta = {**plan.kernel_meta("dkdv"), "DS_IN": dkdv_reads_ds}
                args = (q_sorted, k, v, do, dk, dv, *plan.tail(invn, pos_bias, time_bias, "dkdv"), *plan.bias_args(),
                        dsb if dkdv_reads_ds else plan.dummy_f)
                for kind in ("dk", "dv") if DKDV_SPLIT and dkdv_reads_ds and meta["SCORES"] else ("dkdv",):
                    launch(kind, plan.max_len, plan.num_samples, plan.num_heads // plan.group, args, meta)

            if not dkdv_reads_ds:
                dkdv()
            args = (q_sorted, k, v, do, dq, dpos, dtime, *plan.tail(invn, pos_bias, time_bias, kind),
                    *plan.bias_args(), plan.dummy_f if dsb is None else dsb, plan.tokens.idend)
            if dsb is not None:  # dQ stores dS; the table-gradient kernels (and dK/dV) read it back
                launch("dq", plan.max_len, plan.num_samples, plan.num_heads, args,
                       {**plan.kernel_meta("dq"), **grads, "POS_GRAD": False, "TIME_GRAD": False, "DS_OUT": True})
                if dkdv_reads_ds:
                    dkdv()
                diag = grads["POS_GRAD"] and DIAG_GRADS and plan.pos_slots() <= DIAG_MAX_SLOTS
                meta = {**plan.kernel_meta("dsgrad"), **grads}
                launch("dsgrad", plan.max_len, plan.num_samples, plan.num_heads, args, {**meta, "DIAG": int(diag)})
                if diag:  # the unclamped pairs: keys at their own position along diagonals, the others' in a 2nd pass
                    plan.diag_grad(dsb, dpos, pos_bias)
                    launch("dsgrad", plan.max_len, plan.num_samples, plan.num_heads, args,
                           {**meta, "TIME_GRAD": False, "DIAG": 2})
            else:
                launch(kind, plan.max_len, plan.num_samples, plan.num_heads, args, {**plan.kernel_meta(kind), **grads})
            if split:  # the table gradients of the cells dq leaves out
                launch("band", plan.max_len, plan.num_samples, plan.num_heads, args,
                       {**plan.kernel_meta("band"), **grads})
        plan.bias_cache = None  # read by this backward: freed with its temporaries
        grad_pos = (dpos[:, :plan.pos_shape[1]].to(pos_bias.dtype) if pos_bias is not None and ctx.needs_input_grad[3]
                    else None)
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
    inputs = [t for t in (q, k, v, pos_bias, time_bias) if t is not None]
    plan.cache_bias(q, q.shape[0], torch.is_grad_enabled() and any(t.requires_grad for t in inputs))
    return _HSTUAttention.apply(q, k, v, pos_bias, time_bias, plan)

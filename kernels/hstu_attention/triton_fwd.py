"""Forward Triton kernel of HSTU attention (one query tile per program, keys streamed in blocks).

Grid ``(cdiv(max_len, BLOCK_M), h, B)`` (:func:`.triton_common.grid_ids`; ``(B, h, tiles)`` past 65535 samples):
program ``(p, g, b)`` handles query head ``g`` of sample ``b``, query tiles ``n_prog - 1 - p, + n_prog, ...``
(the programs of one sample and head run together and share its keys and values in L2, the heaviest causal
tiles first; the stride loop also covers a sample with more query rows than ``max_len``). K/V rows are
read from the kv head ``g // GROUP`` in place (GQA without repeating K/V). Per key block::

    s = alpha * q @ k^T + pos_bias + time_bias      [BLOCK_M, BLOCK_N] fp32
    acc += (silu(s) * mask) @ v                     fp32 accumulator, operands in the input dtype

and ``out = acc / n`` at the end (no softmax: no running max). Key blocks come from
:func:`.triton_common.key_ranges`: blocks every query of the tile sees (the causal part below the
diagonal, the leading H tokens of a mixed sample) skip the mask; blocks no query sees are never loaded.
With the ``keys`` normaliser the allowed-key count of every query row is written to ``INVN`` (as 1/n)
for the backward.
"""

from __future__ import annotations

import triton
import triton.language as tl

from recfm.kernels.hstu_attention.triton_common import (
    add_bias,
    allowed_tile,
    dot,
    grid_ids,
    key_ranges,
    key_tile,
    lane_lookup,
    bias_spans,
    cached_bias,
    chunk_ranges,
    load_rows,
    pos_bucket,
    query_tile,
    sample_extent,
    silu_parts,
    spans_flat,
    store_rows,
    tanh_approx,
    tile_ident,
    time_bucket,
    tile_span,
    toeplitz_args,
)


@triton.jit
def _fwd_tile(acc, cnt, q, pos_q, vis_q, tt_q, ev_q, evq_lo, evq_hi, ttq_lo, ttq_hi, qid, start_m, K, V, VIS, TT, POS,
              PTAB, TTAB, TBND, KEXT, kc0, kc1, L, start_n, alpha, BIAS, rows, row_ok, BS,
              P_HALF, NUM_TB, inv_log2_base, KS: tl.constexpr, VS: tl.constexpr, D_QK: tl.constexpr, D_V: tl.constexpr,
              MASKED: tl.constexpr, MASK_MODE: tl.constexpr, COUNT: tl.constexpr, HAS_POS: tl.constexpr,
              HAS_TIME: tl.constexpr, DOT_PREC: tl.constexpr, FAST: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, TB_LANES: tl.constexpr, TOEP: tl.constexpr,
              BIAS_IN: tl.constexpr, SCORES: tl.constexpr):
    cols, col_ok, vis_k, tt_k, ev_k = key_tile(VIS, TT, POS, L, start_n, MASKED and MASK_MODE == 2,
                                               HAS_TIME and not BIAS_IN, HAS_POS and not BIAS_IN, BLOCK_N)
    k = load_rows(K, cols, col_ok, KS, D_QK, BLOCK_DQK)
    raw = dot(q, tl.trans(k), None, DOT_PREC)
    d_lo, d_hi, b_lo, b_hi = 0, 0, 0, 0
    if (HAS_POS or HAS_TIME) and not BIAS_IN:
        evk_lo, evk_hi, ttk_lo, ttk_hi = tile_span(KEXT, kc0, kc1, start_n, BLOCK_N, HAS_POS, HAS_TIME)
        d_lo, d_hi, b_lo, b_hi = bias_spans(evq_lo, evq_hi, ttq_lo, ttq_hi, evk_lo, evk_hi, ttk_lo, ttk_hi, TBND,
                                            NUM_TB, inv_log2_base, HAS_TIME)
    toep, x0 = False, 0
    if TOEP:
        toep, x0 = toeplitz_args(qid, tile_ident(KEXT, kc0, kc1, start_n, BLOCK_N), start_m, start_n, P_HALF, False)
    if BIAS_IN:  # the bias cache (hstu_bias_kernel): one 2D load, no spans, buckets or table reads
        s = raw * alpha + cached_bias(BIAS, BS, rows, row_ok, cols, col_ok)
        if SCORES:  # the backward reads the scores back instead of recomputing q k^T (same tile, same mask)
            tl.store(BIAS + rows[:, None] * BS + cols[None, :], s.to(BIAS.dtype.element_ty), mask=row_ok[:, None])
        if FAST:
            h = 0.5 * s
            a = h + h * tanh_approx(h)
        else:
            a, _ = silu_parts(s, False)
    elif FAST:  # silu(s) = h + h tanh(h) with h = s / 2: one multiply, one MUFU tanh, one FMA per score
        if HAS_POS or HAS_TIME:
            h = 0.5 * add_bias(raw * alpha, ev_q[:, None], ev_k[None, :], tt_q[:, None], tt_k[None, :], d_lo, d_hi,
                               b_lo, b_hi, PTAB, TTAB, TBND, P_HALF, NUM_TB, inv_log2_base, HAS_POS, HAS_TIME,
                               TB_LANES, toep, x0, False, TOEP)
        else:
            h = raw * (0.5 * alpha)
        a = h + h * tanh_approx(h)
    else:
        s = add_bias(raw * alpha, ev_q[:, None], ev_k[None, :], tt_q[:, None], tt_k[None, :], d_lo, d_hi, b_lo, b_hi,
                     PTAB, TTAB, TBND, P_HALF, NUM_TB, inv_log2_base, HAS_POS, HAS_TIME, TB_LANES, toep, x0, False,
                     TOEP)
        a, _ = silu_parts(s, False)
    if MASKED:
        ok = allowed_tile(MASK_MODE, vis_q[:, None], vis_k[None, :], pos_q[:, None], cols[None, :])
        a = tl.where(ok, a, 0.0)
        if COUNT:
            cnt += tl.sum(ok.to(tl.int32), axis=1)
    v = load_rows(V, cols, col_ok, VS, D_V, BLOCK_DV)
    acc = dot(a.to(v.dtype), v, acc, DOT_PREC)
    return acc, cnt


@triton.jit
def hstu_fwd_kernel(
    Q, K, V, O, OFF, QOFF, QTOK, TYPE, VIS, TT, POS, PTAB, TTAB, TBND, STATS, INVN, KEXT, KCH, QEXT, QCH,
    ptab_stride, ttab_stride, alpha, norm_const, P_HALF, NUM_TB, inv_log2_base: tl.constexpr, LEN_KEY, BIAS, BS, BHS,
    H: tl.constexpr, GROUP: tl.constexpr, D_QK: tl.constexpr, D_V: tl.constexpr, QS: tl.constexpr, KS: tl.constexpr,
    VS: tl.constexpr, MASK_MODE: tl.constexpr, NORM: tl.constexpr, HAS_QIDX: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_TIME: tl.constexpr, DOT_PREC: tl.constexpr, FAST: tl.constexpr, TB_LANES: tl.constexpr, TOEP: tl.constexpr,
    BIAS_IN: tl.constexpr, SCORES: tl.constexpr, TILES_FIRST: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Q ``[N_q, H, D_QK]`` (rows grouped by sample, QOFF ``[B+1]``), K ``[N, H/GROUP, D_QK]``,
    V ``[N, H/GROUP, D_V]``, O ``[N_q, H, D_V]``; heads packed within a row, Q/K/V rows ``QS``/``KS``/``VS``
    elements apart (views of a wider projection read in place), O contiguous. LEN_KEY only keys the autotuner.
    With ``BIAS_IN`` the bias is read from ``BIAS [H, N_q, BS]`` (head stride ``BHS``; row: query row, column:
    key position in the sample) as :func:`hstu_bias_kernel` wrote it; with ``SCORES`` too, each tile's scores
    ``alpha q k^T + bias`` are written back over the bias they were read from (the score cache of the backward,
    :data:`.triton_impl.SCORE_CACHE`)."""
    b, g, pid, n_prog = grid_ids(TILES_FIRST)
    COUNT: tl.constexpr = NORM == 1 and MASK_MODE == 2
    seq_start, L, q_start, q_len = sample_extent(OFF, QOFF, b, HAS_QIDX)
    kv_h = g // GROUP
    # base pointers of this sample / head: tile offsets below are int32
    Q += q_start * QS + g * D_QK
    O += q_start * (H * D_V) + g * D_V
    K += seq_start * KS + kv_h * D_QK
    V += seq_start * VS + kv_h * D_V
    QTOK += q_start
    INVN += q_start
    TYPE += seq_start
    VIS += 2 * seq_start
    TT += seq_start
    POS += seq_start
    PTAB += g * ptab_stride
    TTAB += g * ttab_stride
    if BIAS_IN:
        BIAS += g * BHS + q_start * BS
    kc0, kc1, qc0, qc1 = chunk_ranges(KCH, QCH, b, (HAS_POS or HAS_TIME) and not BIAS_IN)
    for m in range(n_prog - 1 - pid, tl.cdiv(q_len, BLOCK_M), n_prog):
        rows, row_ok, pos_q, type_q, vis_q, tt_q, ev_q = query_tile(
            QTOK, TYPE, VIS, TT, POS, seq_start, q_len, m * BLOCK_M, HAS_QIDX, MASK_MODE == 2, MASK_MODE == 2,
            HAS_TIME and not BIAS_IN, HAS_POS and not BIAS_IN, BLOCK_M)
        q = load_rows(Q, rows, row_ok, QS, D_QK, BLOCK_DQK)
        evq_lo, evq_hi, ttq_lo, ttq_hi = 0, 0, 0, 0
        if (HAS_POS or HAS_TIME) and not BIAS_IN:
            evq_lo, evq_hi, ttq_lo, ttq_hi = tile_span(QEXT, qc0, qc1, m * BLOCK_M, BLOCK_M, HAS_POS, HAS_TIME)
        qid = 0
        if TOEP:
            qid = tile_ident(QEXT, qc0, qc1, m * BLOCK_M, BLOCK_M)
        free_end, masked_end, extra_lo, extra_hi = key_ranges(MASK_MODE, L, pos_q, type_q, row_ok, STATS, b,
                                                              BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        cnt = tl.zeros([BLOCK_M], dtype=tl.int32)
        for start_n in range(0, free_end, BLOCK_N):
            acc, cnt = _fwd_tile(acc, cnt, q, pos_q, vis_q, tt_q, ev_q, evq_lo, evq_hi, ttq_lo, ttq_hi, qid, m * BLOCK_M, K, V, VIS, TT, POS, PTAB, TTAB, TBND, KEXT, kc0, kc1, L,
                                 start_n, alpha, BIAS, rows, row_ok, BS, P_HALF, NUM_TB, inv_log2_base, KS, VS, D_QK, D_V, False, MASK_MODE,
                                 COUNT, HAS_POS, HAS_TIME, DOT_PREC, FAST, BLOCK_N, BLOCK_DQK, BLOCK_DV, TB_LANES, TOEP, BIAS_IN, SCORES)
        for start_n in range(free_end, masked_end, BLOCK_N):
            acc, cnt = _fwd_tile(acc, cnt, q, pos_q, vis_q, tt_q, ev_q, evq_lo, evq_hi, ttq_lo, ttq_hi, qid, m * BLOCK_M, K, V, VIS, TT, POS, PTAB, TTAB, TBND, KEXT, kc0, kc1, L,
                                 start_n, alpha, BIAS, rows, row_ok, BS, P_HALF, NUM_TB, inv_log2_base, KS, VS, D_QK, D_V, True, MASK_MODE,
                                 COUNT, HAS_POS, HAS_TIME, DOT_PREC, FAST, BLOCK_N, BLOCK_DQK, BLOCK_DV, TB_LANES, TOEP, BIAS_IN, SCORES)
        if MASK_MODE == 2:
            for start_n in range(extra_lo, extra_hi, BLOCK_N):
                acc, cnt = _fwd_tile(acc, cnt, q, pos_q, vis_q, tt_q, ev_q, evq_lo, evq_hi, ttq_lo, ttq_hi, qid, m * BLOCK_M, K, V, VIS, TT, POS, PTAB, TTAB, TBND, KEXT, kc0, kc1,
                                     L, start_n, alpha, BIAS, rows, row_ok, BS, P_HALF, NUM_TB, inv_log2_base, KS, VS, D_QK, D_V, True,
                                     MASK_MODE, COUNT, HAS_POS, HAS_TIME, DOT_PREC, FAST, BLOCK_N, BLOCK_DQK,
                                     BLOCK_DV, TB_LANES, TOEP, BIAS_IN, SCORES)
        if NORM == 0:
            acc = acc * (1.0 / L.to(tl.float32))
        elif NORM == 1:
            if MASK_MODE == 0:
                n_keys = tl.zeros([BLOCK_M], dtype=tl.int32) + L
            elif MASK_MODE == 1:
                n_keys = pos_q + 1
            else:
                n_keys = cnt + free_end
            inv_n = 1.0 / tl.maximum(n_keys, 1).to(tl.float32)
            acc = acc * inv_n[:, None]
            tl.store(INVN + rows, inv_n, mask=row_ok & (g == 0))
        else:
            acc = acc * norm_const
        store_rows(O, rows, row_ok, acc, H * D_V, D_V, BLOCK_DV)


@triton.jit
def hstu_bias_kernel(
    OFF, QOFF, QTOK, TYPE, TT, POS, PTAB, TTAB, TBND, STATS, KEXT, KCH, QEXT, QCH, BIAS, ptab_stride, ttab_stride,
    P_HALF, NUM_TB, inv_log2_base: tl.constexpr, BS, BHS, H: tl.constexpr, MASK_MODE: tl.constexpr,
    HAS_QIDX: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, TB_LANES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The bias cache: ``BIAS[g, q_start + i, j] = pos_table[g, bucket] + time_table[g, bucket]`` for query row ``i``
    and key ``j`` of every sample and query head (fp32 sum, stored in the tables' dtype). Grid ``(B,
    cdiv(max_len, BLOCK_M), cdiv(max_len, BLOCK_N))``; a tile past the sample, or outside its rows' key ranges
    (:func:`.triton_common.key_ranges`, as the attention kernels visit them), is skipped. A tile whose spans are flat (past the
    position clamp, within one time bucket or across one boundary: most tiles away from the diagonal) takes
    :func:`.triton_common.add_bias`'s scalar or two-way select per head; the others compute each pair's buckets
    once for all heads, and read the time table by warp shuffles where ``TB_LANES``. The attention kernels
    then read the bias as one 2D load per tile."""
    b = tl.program_id(0)
    m = tl.program_id(1)
    n = tl.program_id(2)
    seq_start, L, q_start, q_len = sample_extent(OFF, QOFF, b, HAS_QIDX)
    rows, row_ok, pos_q, type_q, _, tt_q, ev_q = query_tile(QTOK + q_start, TYPE + seq_start, TT, TT + seq_start,
                                                            POS + seq_start, seq_start, q_len, m * BLOCK_M, HAS_QIDX,
                                                            MASK_MODE == 2, False, HAS_TIME, HAS_POS, BLOCK_M)
    k0 = n * BLOCK_N
    free_end, masked_end, extra_lo, extra_hi = key_ranges(MASK_MODE, L, pos_q, type_q, row_ok, STATS, b, BLOCK_N)
    visible = (m * BLOCK_M < q_len) & ((k0 < masked_end) | ((k0 >= extra_lo) & (k0 < extra_hi)))
    if (k0 < L) & visible:
        cols, col_ok, _, tt_k, ev_k = key_tile(TT, TT + seq_start, POS + seq_start, L, k0, False, HAS_TIME, HAS_POS,
                                               BLOCK_N)
        out = BIAS + q_start * BS + rows[:, None] * BS + cols[None, :]
        # masked by rows only, as triton_common.cached_bias reads it: a mask along the contiguous columns splits the
        # stores into 2-byte ones; columns past the sample end stay inside the row (BS >= max_len) and are not read
        store_ok = row_ok[:, None]
        kc0, kc1, qc0, qc1 = chunk_ranges(KCH, QCH, b, True)
        evq_lo, evq_hi, ttq_lo, ttq_hi = tile_span(QEXT, qc0, qc1, m * BLOCK_M, BLOCK_M, HAS_POS, HAS_TIME)
        evk_lo, evk_hi, ttk_lo, ttk_hi = tile_span(KEXT, kc0, kc1, k0, BLOCK_N, HAS_POS, HAS_TIME)
        d_lo, d_hi, b_lo, b_hi = bias_spans(evq_lo, evq_hi, ttq_lo, ttq_hi, evk_lo, evk_hi, ttk_lo, ttk_hi, TBND,
                                            NUM_TB, inv_log2_base, HAS_TIME)
        if spans_flat(d_lo, d_hi, b_lo, b_hi, P_HALF, HAS_POS, HAS_TIME):
            for g in tl.static_range(H):
                bias = add_bias(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), ev_q[:, None], ev_k[None, :],
                                tt_q[:, None], tt_k[None, :], d_lo, d_hi, b_lo, b_hi, PTAB + g * ptab_stride,
                                TTAB + g * ttab_stride, TBND, P_HALF, NUM_TB, inv_log2_base, HAS_POS, HAS_TIME, False,
                                False, 0, False, False)
                tl.store(out + g * BHS, bias.to(BIAS.dtype.element_ty), mask=store_ok)
        else:
            if HAS_POS:
                pb = pos_bucket(ev_q[:, None], ev_k[None, :], P_HALF)
            if HAS_TIME:
                tb = time_bucket(tt_q[:, None], tt_k[None, :], TBND, NUM_TB, inv_log2_base)
            for g in tl.static_range(H):
                bias = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                if HAS_POS:
                    bias += tl.load(PTAB + g * ptab_stride + pb).to(tl.float32)
                if HAS_TIME:
                    if TB_LANES:
                        bias += lane_lookup(TTAB + g * ttab_stride, tb, NUM_TB)
                    else:
                        bias += tl.load(TTAB + g * ttab_stride + tb).to(tl.float32)
                tl.store(out + g * BHS, bias.to(BIAS.dtype.element_ty), mask=store_ok)

"""Backward Triton kernels of HSTU attention: dK/dV (key-major) and dQ + bias-table gradients (query-major).

With ``s = alpha q.k + bias``, ``w = silu(s) * M / n``, ``O = w @ v``::

    dV_j = sum_i w_ij dO_i            dS_ij = (dO_i . v_j) * silu'(s_ij) * M_ij / n_i
    dK_j = alpha sum_i dS_ij q_i      dQ_i  = alpha sum_j dS_ij k_j      dTable[bucket_ij] += dS_ij

``silu'`` comes from the scores: recomputed, or with the bias cache read from it, where the forward wrote them
(the score cache, :data:`.triton_impl.SCORE_CACHE`); nothing else but ``1/n`` of the ``keys`` normaliser is saved.

* :func:`hstu_dkdv_kernel` -- grid ``(cdiv(max_len, BLOCK_N), h_kv, B)`` (:func:`.triton_common.grid_ids`):
  one key tile of one kv head, looping over the GROUP query heads that share it and over the query tiles of
  :func:`.triton_common.query_ranges`; dK/dV accumulate in fp32 registers and are written once (no atomics,
  no repeated K/V).
* :func:`hstu_dq_kernel` -- grid ``(cdiv(max_len, BLOCK_M), h, B)``: the forward's loop, accumulating dQ;
  the bias-table gradients are atomic adds into fp32 ``[rows, buckets]`` buffers (one atomic per tile when
  the whole tile falls in one bucket, as far from the diagonal or for large time gaps).
"""

from __future__ import annotations

import triton
import triton.language as tl

from recfm.kernels.hstu_attention.triton_common import (
    FAR,
    INT_MAX,
    add_bias,
    allowed_tile,
    band_grads_add,
    bias_spans,
    cached_bias,
    chunk_ranges,
    dot,
    flat_grads_add,
    flush_band_time,
    flush_clamped,
    flush_time,
    grid_ids,
    key_ranges,
    key_tile,
    load_rows,
    pos_grad_add,
    query_ranges,
    query_tile,
    sample_extent,
    silu_parts,
    spans_flat,
    store_rows,
    tile_ident,
    tile_span,
    toeplitz_args,
)


@triton.jit
def _dkdv_tile(dk, dv, k, v, cols, col_ok, vis_k, tt_k, ev_k, evk_lo, evk_hi, ttk_lo, ttk_hi, kid, k_start, Q, DO, INVN,
               QTOK, TYPE, VIS, TT, POS, PTAB, TTAB, TBND, QEXT, qc0, qc1, BIAS, BS, DSB,
               seq_start, q_len, L, start_m, alpha, norm_const, P_HALF, NUM_TB, inv_log2_base,
               H: tl.constexpr, QS: tl.constexpr, D_QK: tl.constexpr, D_V: tl.constexpr, MASKED: tl.constexpr,
               MASK_MODE: tl.constexpr, NORM: tl.constexpr, HAS_QIDX: tl.constexpr, HAS_POS: tl.constexpr,
               HAS_TIME: tl.constexpr, DOT_PREC: tl.constexpr, FAST: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, TB_LANES: tl.constexpr, TOEP: tl.constexpr,
               BIAS_IN: tl.constexpr, SCORES: tl.constexpr, DS_IN: tl.constexpr, PART: tl.constexpr):
    # PART 0: dK and dV; 1: dK only (dS^T Q from the dS buffer); 2: dV only (P^T dO from the score cache)
    rows, row_ok, pos_q, type_q, vis_q, tt_q, ev_q = query_tile(
        QTOK, TYPE, VIS, TT, POS, seq_start, q_len, start_m, HAS_QIDX, False, MASKED and MASK_MODE == 2,
        HAS_TIME and not BIAS_IN, HAS_POS and not BIAS_IN, BLOCK_M)
    if PART == 2:  # P^T dO only: the scores come from the cache
        q = tl.zeros([1], dtype=tl.float32)
    else:
        q = load_rows(Q, rows, row_ok, QS, D_QK, BLOCK_DQK)
    if PART == 1:  # dS^T Q only: dS comes from the buffer
        do = q
    else:
        do = load_rows(DO, rows, row_ok, H * D_V, D_V, BLOCK_DV)
    ok = row_ok[None, :] & col_ok[:, None]
    if MASKED:
        ok = ok & allowed_tile(MASK_MODE, vis_q[None, :], vis_k[:, None], pos_q[None, :], cols[:, None])
    if PART != 1:  # the scores and their SiLU: for P (dV) and, without DS_IN, for dS
        if BIAS_IN and SCORES:  # the forward's scores (the score cache), read transposed: no K Q^T product
            st = tl.trans(cached_bias(BIAS, BS, rows, row_ok, cols, col_ok))  # [BLOCK_N, BLOCK_M]
        else:
            st = dot(k, tl.trans(q), None, DOT_PREC) * alpha  # [BLOCK_N, BLOCK_M]
        if BIAS_IN:  # the forward's bias of every allowed pair (the bias cache), read transposed: no bucket work
            if not SCORES:
                st += tl.trans(cached_bias(BIAS, BS, rows, row_ok, cols, col_ok))
        else:
            d_lo, d_hi, b_lo, b_hi = 0, 0, 0, 0
            if HAS_POS or HAS_TIME:
                evq_lo, evq_hi, ttq_lo, ttq_hi = tile_span(QEXT, qc0, qc1, start_m, BLOCK_M, HAS_POS, HAS_TIME)
                d_lo, d_hi, b_lo, b_hi = bias_spans(evq_lo, evq_hi, ttq_lo, ttq_hi, evk_lo, evk_hi, ttk_lo, ttk_hi,
                                                    TBND, NUM_TB, inv_log2_base, HAS_TIME)
            toep, x0 = False, 0
            if TOEP:
                toep, x0 = toeplitz_args(tile_ident(QEXT, qc0, qc1, start_m, BLOCK_M), kid, start_m, k_start, P_HALF,
                                         True)
            st = add_bias(st, ev_q[None, :], ev_k[:, None], tt_q[None, :], tt_k[:, None], d_lo, d_hi, b_lo, b_hi,
                          PTAB, TTAB, TBND, P_HALF, NUM_TB, inv_log2_base, HAS_POS, HAS_TIME, TB_LANES, toep, x0, True,
                          TOEP)
        at, dat = silu_parts(st, FAST)
        if NORM == 0:
            at = at * (1.0 / L.to(tl.float32))
            dat = dat * (1.0 / L.to(tl.float32))
        elif NORM == 1:
            inv_n = tl.load(INVN + rows, mask=row_ok, other=0.0)
            at = at * inv_n[None, :]
            dat = dat * inv_n[None, :]
        else:
            at = at * norm_const
            dat = dat * norm_const
        if MASKED:
            at = tl.where(ok, at, 0.0)
            dat = tl.where(ok, dat, 0.0)
        dv = dot(at.to(do.dtype), do, dv, DOT_PREC)
    if PART != 2:
        if DS_IN:  # dS as the dQ kernel stored it: no dO.V product; pairs outside the mask may hold anything
            ds = tl.load(DSB + rows[:, None] * BS + cols[None, :], mask=row_ok[:, None], other=0.0)
            dst = tl.where(ok, tl.trans(ds), 0.0).to(q.dtype)
        else:
            dpt = dot(v, tl.trans(do), None, DOT_PREC)  # [BLOCK_N, BLOCK_M]
            dst = (dpt * dat).to(q.dtype)
        dk = dot(dst, q, dk, DOT_PREC)
    return dk, dv


@triton.jit
def hstu_dkdv_kernel(
    Q, K, V, DO, DK, DV, OFF, QOFF, QTOK, TYPE, VIS, TT, POS, PTAB, TTAB, TBND, STATS, INVN, KEXT, KCH, QEXT, QCH,
    ptab_stride, ttab_stride, alpha, norm_const, P_HALF, NUM_TB, inv_log2_base: tl.constexpr, LEN_KEY, BIAS, BS, BHS,
    DSB, H: tl.constexpr, GROUP: tl.constexpr, D_QK: tl.constexpr, D_V: tl.constexpr, QS: tl.constexpr, KS: tl.constexpr,
    VS: tl.constexpr, MASK_MODE: tl.constexpr, NORM: tl.constexpr, HAS_QIDX: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_TIME: tl.constexpr, DOT_PREC: tl.constexpr, FAST: tl.constexpr, TB_LANES: tl.constexpr, TOEP: tl.constexpr,
    BIAS_IN: tl.constexpr, SCORES: tl.constexpr, DS_IN: tl.constexpr, PART: tl.constexpr, TILES_FIRST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """DK ``[N, H/GROUP, D_QK]``, DV ``[N, H/GROUP, D_V]`` (input dtype); other tensors as the forward. With
    ``BIAS_IN`` the bias is read from the cache ``BIAS`` as :func:`.triton_fwd.hstu_bias_kernel` wrote it, not
    recomputed, and with ``SCORES`` too the cache holds the forward's scores (``alpha q k^T + bias``, written by
    :func:`.triton_fwd.hstu_fwd_kernel`), which drops the ``K Q^T`` product and the K tile; with ``DS_IN`` dS is read
    from ``DSB`` as :func:`hstu_dq_kernel` stored it (``DS_OUT``, launched first), which drops the ``dO V^T`` product
    and the V tile: two products per tile (``P^T dO``, ``dS^T Q``) with both, four with neither. With both, ``PART``
    1 computes and writes dK only (``dS^T Q``: no scores, no dO) and ``PART`` 2 dV only (``P^T dO``: no Q, no dS), each
    program holding one accumulator instead of two (:data:`.triton_impl.DKDV_SPLIT`); ``PART`` 0 does both."""
    b, kv_h, pid, n_prog = grid_ids(TILES_FIRST)
    H_KV: tl.constexpr = H // GROUP
    seq_start, L, q_start, q_len = sample_extent(OFF, QOFF, b, HAS_QIDX)
    K += seq_start * KS + kv_h * D_QK
    V += seq_start * VS + kv_h * D_V
    DK += seq_start * (H_KV * D_QK) + kv_h * D_QK
    DV += seq_start * (H_KV * D_V) + kv_h * D_V
    Q += q_start * QS
    DO += q_start * (H * D_V)
    QTOK += q_start
    INVN += q_start
    TYPE += seq_start
    VIS += 2 * seq_start
    TT += seq_start
    POS += seq_start
    if BIAS_IN:
        BIAS += q_start * BS
    if DS_IN:
        DSB += q_start * BS
    kc0, kc1, qc0, qc1 = chunk_ranges(KCH, QCH, b, (HAS_POS or HAS_TIME) and not BIAS_IN)
    for n in range(pid, tl.cdiv(L, BLOCK_N), n_prog):
        k_start = n * BLOCK_N
        cols, col_ok, vis_k, tt_k, ev_k = key_tile(VIS, TT, POS, L, k_start, MASK_MODE == 2, HAS_TIME and not BIAS_IN,
                                                   HAS_POS and not BIAS_IN, BLOCK_N)
        if BIAS_IN and SCORES:  # the scores come from the cache: the K tile is not read
            k = tl.zeros([1], dtype=tl.float32)
        else:
            k = load_rows(K, cols, col_ok, KS, D_QK, BLOCK_DQK)
        v = k  # placeholder: with DS_IN the V tile is not read
        if not DS_IN:
            v = load_rows(V, cols, col_ok, VS, D_V, BLOCK_DV)
        evk_lo, evk_hi, ttk_lo, ttk_hi = 0, 0, 0, 0
        if (HAS_POS or HAS_TIME) and not BIAS_IN:
            evk_lo, evk_hi, ttk_lo, ttk_hi = tile_span(KEXT, kc0, kc1, k_start, BLOCK_N, HAS_POS, HAS_TIME)
        kid = 0
        if TOEP:
            kid = tile_ident(KEXT, kc0, kc1, k_start, BLOCK_N)
        free_lo, free_hi, masked_lo, masked_hi = query_ranges(MASK_MODE, HAS_QIDX, k_start, q_len, STATS, b,
                                                              BLOCK_M, BLOCK_N)
        if PART == 2:
            dk = tl.zeros([1, 1], dtype=tl.float32)
        else:
            dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
        if PART == 1:
            dv = tl.zeros([1, 1], dtype=tl.float32)
        else:
            dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        for r in range(GROUP):
            g = kv_h * GROUP + r
            q_g = Q + g * D_QK
            do_g = DO + g * D_V
            ptab = PTAB + g * ptab_stride
            ttab = TTAB + g * ttab_stride
            bias = BIAS + g * BHS
            dsb = DSB + g * BHS
            for start_m in range(free_lo, free_hi, BLOCK_M):
                dk, dv = _dkdv_tile(dk, dv, k, v, cols, col_ok, vis_k, tt_k, ev_k, evk_lo, evk_hi, ttk_lo, ttk_hi, kid, k_start, q_g, do_g, INVN, QTOK, TYPE, VIS, TT, POS,
                                    ptab, ttab, TBND, QEXT, qc0, qc1, bias, BS, dsb, seq_start, q_len, L, start_m, alpha, norm_const, P_HALF,
                                    NUM_TB, inv_log2_base, H, QS, D_QK, D_V, False, MASK_MODE, NORM, HAS_QIDX, HAS_POS,
                                    HAS_TIME, DOT_PREC, FAST, BLOCK_M, BLOCK_DQK, BLOCK_DV, TB_LANES, TOEP, BIAS_IN, SCORES, DS_IN, PART)
            for start_m in range(masked_lo, masked_hi, BLOCK_M):
                dk, dv = _dkdv_tile(dk, dv, k, v, cols, col_ok, vis_k, tt_k, ev_k, evk_lo, evk_hi, ttk_lo, ttk_hi, kid, k_start, q_g, do_g, INVN, QTOK, TYPE, VIS, TT, POS,
                                    ptab, ttab, TBND, QEXT, qc0, qc1, bias, BS, dsb, seq_start, q_len, L, start_m, alpha, norm_const, P_HALF,
                                    NUM_TB, inv_log2_base, H, QS, D_QK, D_V, True, MASK_MODE, NORM, HAS_QIDX, HAS_POS,
                                    HAS_TIME, DOT_PREC, FAST, BLOCK_M, BLOCK_DQK, BLOCK_DV, TB_LANES, TOEP, BIAS_IN, SCORES, DS_IN, PART)
        if PART != 2:
            store_rows(DK, cols, col_ok, dk * alpha, H_KV * D_QK, D_QK, BLOCK_DQK)
        if PART != 1:
            store_rows(DV, cols, col_ok, dv, H_KV * D_V, D_V, BLOCK_DV)


@triton.jit
def _ds_tile(q, do, inv_n, row_ok, pos_q, vis_q, tt_q, ev_q, evq_lo, evq_hi, ttq_lo, ttq_hi, qid, start_m, K, V, VIS, TT,
             POS, PTAB, TTAB, TBND, KEXT, kc0, kc1, L, start_n, alpha, P_HALF, NUM_TB, inv_log2_base, BIAS, BS,
             KS: tl.constexpr, VS: tl.constexpr, D_QK: tl.constexpr, D_V: tl.constexpr, MASKED: tl.constexpr,
             MASK_MODE: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, DOT_PREC: tl.constexpr,
             FAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
             TB_LANES: tl.constexpr, TOEP: tl.constexpr, BIAS_IN: tl.constexpr, SCORES: tl.constexpr):
    """``dS`` of one key tile ``[BLOCK_M, BLOCK_N]`` fp32 (zero where the mask or the sample end excludes a
    pair), with the key tile and its bias spans. The scores are recomputed (``q k^T`` plus the bias, computed or
    from the bias cache), or with ``BIAS_IN`` and ``SCORES`` read from the score cache (``q`` unused)."""
    cols, col_ok, vis_k, tt_k, ev_k = key_tile(VIS, TT, POS, L, start_n, MASKED and MASK_MODE == 2, HAS_TIME,
                                               HAS_POS, BLOCK_N)
    k = load_rows(K, cols, col_ok, KS, D_QK, BLOCK_DQK)
    v = load_rows(V, cols, col_ok, VS, D_V, BLOCK_DV)
    rows = start_m + tl.arange(0, do.shape[0])
    if BIAS_IN and SCORES:  # the forward's scores (the score cache): no q k^T product, no Q tile
        s = cached_bias(BIAS, BS, rows, row_ok, cols, col_ok)
    else:
        s = dot(q, tl.trans(k), None, DOT_PREC) * alpha
    d_lo, d_hi, b_lo, b_hi = 0, 0, 0, 0
    if HAS_POS or HAS_TIME:
        evk_lo, evk_hi, ttk_lo, ttk_hi = tile_span(KEXT, kc0, kc1, start_n, BLOCK_N, HAS_POS, HAS_TIME)
        d_lo, d_hi, b_lo, b_hi = bias_spans(evq_lo, evq_hi, ttq_lo, ttq_hi, evk_lo, evk_hi, ttk_lo, ttk_hi, TBND,
                                            NUM_TB, inv_log2_base, HAS_TIME)
    toep, x0 = False, 0
    if TOEP:
        toep, x0 = toeplitz_args(qid, tile_ident(KEXT, kc0, kc1, start_n, BLOCK_N), start_m, start_n, P_HALF, False)
    if BIAS_IN:  # the bias cache: one 2D load (spans and buckets above serve only the table gradients)
        if not SCORES:
            s += cached_bias(BIAS, BS, rows, row_ok, cols, col_ok)
    else:
        s = add_bias(s, ev_q[:, None], ev_k[None, :], tt_q[:, None], tt_k[None, :], d_lo, d_hi, b_lo, b_hi, PTAB,
                     TTAB, TBND, P_HALF, NUM_TB, inv_log2_base, HAS_POS, HAS_TIME, TB_LANES, toep, x0, False, TOEP)
    _, da = silu_parts(s, FAST)
    dp = dot(do, tl.trans(v), None, DOT_PREC)
    ds = dp * da * inv_n
    if MASKED:
        ok = allowed_tile(MASK_MODE, vis_q[:, None], vis_k[None, :], pos_q[:, None], cols[None, :])
        ds = tl.where(ok, ds, 0.0)
    return ds, k, col_ok, tt_k, ev_k, d_lo, d_hi, b_lo, b_hi


@triton.jit
def _ds_stored(row_ok, pos_q, vis_q, evq_lo, evq_hi, ttq_lo, ttq_hi, start_m, VIS, TT, POS, TBND, KEXT, kc0, kc1, L,
               start_n, NUM_TB, inv_log2_base, DSB, BS, MASKED: tl.constexpr, MASK_MODE: tl.constexpr,
               HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``dS`` of one key tile as the dQ kernel stored it (``DS_OUT``), for the table-gradient kernel: read only
    where the pair is allowed (the dQ kernel's own tiles, of another BLOCK_N, cover every allowed pair, not the
    rest of a row), with the key tile and its bias spans as :func:`_ds_tile` returns them."""
    cols, col_ok, vis_k, tt_k, ev_k = key_tile(VIS, TT, POS, L, start_n, MASKED and MASK_MODE == 2, HAS_TIME,
                                               HAS_POS, BLOCK_N)
    evk_lo, evk_hi, ttk_lo, ttk_hi = tile_span(KEXT, kc0, kc1, start_n, BLOCK_N, HAS_POS, HAS_TIME)
    d_lo, d_hi, b_lo, b_hi = bias_spans(evq_lo, evq_hi, ttq_lo, ttq_hi, evk_lo, evk_hi, ttk_lo, ttk_hi, TBND, NUM_TB,
                                        inv_log2_base, HAS_TIME)
    ok = row_ok[:, None] & col_ok[None, :]
    if MASKED:
        ok = ok & allowed_tile(MASK_MODE, vis_q[:, None], vis_k[None, :], pos_q[:, None], cols[None, :])
    rows = start_m + tl.arange(0, BLOCK_M)
    ds = tl.load(DSB + rows[:, None] * BS + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    return ds, col_ok, tt_k, ev_k, d_lo, d_hi, b_lo, b_hi


@triton.jit
def _dq_step(dqa, pg_lo, pg_hi, tb, tg_lo, tg_hi, tgb, q, do, inv_n, row_ok, pos_q, vis_q, tt_q, ev_q, evq_lo, evq_hi, ttq_lo,
             ttq_hi, qid, start_m, sq_lo, sq_hi, sqt_lo, sqt_hi, K, V, VIS, TT, POS, PTAB, TTAB, TBND, KEXT, kc0, kc1, DPTAB,
             DTTAB, L, start_n, alpha, P_HALF, NUM_TB, inv_log2_base, BIAS, BS, DSB, KS: tl.constexpr, VS: tl.constexpr,
             D_QK: tl.constexpr,
             D_V: tl.constexpr, MASKED: tl.constexpr, MASK_MODE: tl.constexpr, HAS_POS: tl.constexpr,
             HAS_TIME: tl.constexpr, DOT_PREC: tl.constexpr, FAST: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, FEW_BUCKETS: tl.constexpr, POS_GRAD: tl.constexpr,
             TIME_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BAND: tl.constexpr, SUPER: tl.constexpr,
             INLINE: tl.constexpr, TB_LANES: tl.constexpr, TOEP: tl.constexpr, BIAS_IN: tl.constexpr, SCORES: tl.constexpr,
             DS_OUT: tl.constexpr, DS_IN: tl.constexpr, id_end, DIAG: tl.constexpr):
    """One key tile of :func:`_dq_program`: ``dQ += dS k`` and the table gradients of flat super-tiles
    (``BAND`` false), or only the table gradients of the other super-tiles (``BAND`` true)."""
    GRADS: tl.constexpr = POS_GRAD or TIME_GRAD
    flat = True
    if GRADS and not INLINE and not BAND:  # the SUPER x SUPER tile holding this one decides: dq adds its gradients
        sk_lo, sk_hi, skt_lo, skt_hi = tile_span(KEXT, kc0, kc1, (start_n // SUPER) * SUPER, SUPER, HAS_POS, HAS_TIME)
        sd_lo, sd_hi, sb_lo, sb_hi = bias_spans(sq_lo, sq_hi, sqt_lo, sqt_hi, sk_lo, sk_hi, skt_lo, skt_hi, TBND,
                                                NUM_TB, inv_log2_base, HAS_TIME)
        flat = spans_flat(sd_lo, sd_hi, sb_lo, sb_hi, P_HALF, HAS_POS, HAS_TIME)
    if BAND:  # a tile of a cell that is not flat (_dq_range skips the flat ones)
        ds, k, col_ok, tt_k, ev_k, d_lo, d_hi, b_lo, b_hi = _ds_tile(
            q, do, inv_n, row_ok, pos_q, vis_q, tt_q, ev_q, evq_lo, evq_hi, ttq_lo, ttq_hi, qid, start_m, K, V, VIS,
            TT, POS, PTAB, TTAB, TBND, KEXT, kc0, kc1, L, start_n, alpha, P_HALF, NUM_TB, inv_log2_base, BIAS, BS, KS, VS,
            D_QK, D_V, MASKED, MASK_MODE, HAS_POS, HAS_TIME, DOT_PREC, FAST, BLOCK_N, BLOCK_DQK, BLOCK_DV, TB_LANES, TOEP,
            BIAS_IN, SCORES)
        pg_lo, pg_hi, tgb = band_grads_add(ds, ev_q, ev_k, tt_q, tt_k, row_ok, col_ok, d_lo, d_hi, b_lo, b_hi,
                                           pg_lo, pg_hi, tgb, DPTAB, TBND, P_HALF, NUM_TB, inv_log2_base, FEW_BUCKETS,
                                           POS_GRAD, TIME_GRAD, False, BLOCK_M, BLOCK_N)
    else:
        if DS_IN:  # the table-gradient kernel: dS as the dQ kernel stored it, no products
            ds, col_ok, tt_k, ev_k, d_lo, d_hi, b_lo, b_hi = _ds_stored(
                row_ok, pos_q, vis_q, evq_lo, evq_hi, ttq_lo, ttq_hi, start_m, VIS, TT, POS, TBND, KEXT, kc0, kc1, L,
                start_n, NUM_TB, inv_log2_base, DSB, BS, MASKED, MASK_MODE, HAS_POS, HAS_TIME, BLOCK_M, BLOCK_N)
        else:
            ds, k, col_ok, tt_k, ev_k, d_lo, d_hi, b_lo, b_hi = _ds_tile(
                q, do, inv_n, row_ok, pos_q, vis_q, tt_q, ev_q, evq_lo, evq_hi, ttq_lo, ttq_hi, qid, start_m, K, V, VIS,
                TT, POS, PTAB, TTAB, TBND, KEXT, kc0, kc1, L, start_n, alpha, P_HALF, NUM_TB, inv_log2_base, BIAS, BS, KS,
                VS, D_QK, D_V, MASKED, MASK_MODE, HAS_POS, HAS_TIME, DOT_PREC, FAST, BLOCK_N, BLOCK_DQK, BLOCK_DV,
                TB_LANES, TOEP, BIAS_IN, SCORES)
            dqa = dot(ds.to(k.dtype), k, dqa, DOT_PREC)
            if DS_OUT:  # for the table-gradient kernel: the whole tile (zeros outside the mask), masked by rows only
                rows = start_m + tl.arange(0, BLOCK_M)
                cols = start_n + tl.arange(0, BLOCK_N)
                tl.store(DSB + rows[:, None] * BS + cols[None, :], ds.to(DSB.dtype.element_ty), mask=row_ok[:, None])
        if GRADS and INLINE:  # every tile here, by its own spans
            if DIAG == 2:  # the second pass (key tiles past the identity prefix, _dq_range): their unclamped pairs
                if (d_lo < P_HALF) & (d_hi > -P_HALF):
                    d = ev_q[:, None] - ev_k[None, :]
                    pos_grad_add(DPTAB, ev_q, ev_k, row_ok, col_ok & ((start_n + tl.arange(0, BLOCK_N)) >= id_end),
                                 tl.where((d > -P_HALF) & (d < P_HALF), ds, 0.0), d_lo, d_hi, P_HALF, FEW_BUCKETS,
                                 BLOCK_M, BLOCK_N)
            else:
                # with DIAG (1) this pass adds only the clamped pairs' position gradient: a tile inside the clamp
                # has none (the diag kernel and the second pass have its pairs)
                pos_free = False
                if DIAG == 1:
                    pos_free = (d_lo > -P_HALF) & (d_hi < P_HALF)
                if spans_flat(d_lo, d_hi, b_lo, b_hi, P_HALF, HAS_POS, HAS_TIME):
                    pg_lo, pg_hi, tb, tg_lo, tg_hi = flat_grads_add(
                        ds, tt_q[:, None], tt_k[None, :], d_lo, b_lo, b_hi, pg_lo, pg_hi, tb, tg_lo, tg_hi, DTTAB, TBND,
                        P_HALF, NUM_TB, POS_GRAD, TIME_GRAD)
                elif pos_free & (b_hi - b_lo <= 1):  # only the time table's flat path is left
                    pg_lo, pg_hi, tb, tg_lo, tg_hi = flat_grads_add(
                        ds, tt_q[:, None], tt_k[None, :], d_lo, b_lo, b_hi, pg_lo, pg_hi, tb, tg_lo, tg_hi, DTTAB, TBND,
                        P_HALF, NUM_TB, False, TIME_GRAD)
                else:
                    pg_lo, pg_hi, tgb = band_grads_add(ds, ev_q, ev_k, tt_q, tt_k, row_ok, col_ok, d_lo, d_hi, b_lo,
                                                       b_hi, pg_lo, pg_hi, tgb, DPTAB, TBND, P_HALF, NUM_TB,
                                                       inv_log2_base, FEW_BUCKETS, POS_GRAD, TIME_GRAD, DIAG == 1,
                                                       BLOCK_M, BLOCK_N)
        elif GRADS:
            if flat:
                pg_lo, pg_hi, tb, tg_lo, tg_hi = flat_grads_add(
                    ds, tt_q[:, None], tt_k[None, :], sd_lo, sb_lo, sb_hi, pg_lo, pg_hi, tb, tg_lo, tg_hi, DTTAB, TBND,
                    P_HALF, NUM_TB, POS_GRAD, TIME_GRAD)
    return dqa, pg_lo, pg_hi, tb, tg_lo, tg_hi, tgb


@triton.jit
def _dq_range(lo, hi, dqa, pg_lo, pg_hi, tb, tg_lo, tg_hi, tgb, q, do, inv_n, row_ok, pos_q, vis_q, tt_q, ev_q,
              evq_lo, evq_hi, ttq_lo, ttq_hi, qid, start_m, sq_lo, sq_hi, sqt_lo, sqt_hi, K, V, VIS, TT, POS, PTAB, TTAB, TBND,
              KEXT, kc0, kc1, DPTAB, DTTAB, L, alpha, P_HALF, NUM_TB, inv_log2_base, BIAS, BS, DSB, KS: tl.constexpr,
              VS: tl.constexpr,
              D_QK: tl.constexpr, D_V: tl.constexpr, MASKED: tl.constexpr, MASK_MODE: tl.constexpr,
              HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, DOT_PREC: tl.constexpr, FAST: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, FEW_BUCKETS: tl.constexpr,
              POS_GRAD: tl.constexpr, TIME_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BAND: tl.constexpr,
              SUPER: tl.constexpr, INLINE: tl.constexpr, TB_LANES: tl.constexpr, TOEP: tl.constexpr,
              BIAS_IN: tl.constexpr, SCORES: tl.constexpr, DS_OUT: tl.constexpr, DS_IN: tl.constexpr, id_end, DIAG: tl.constexpr):
    """:func:`_dq_step` over the key tiles of ``[lo, hi)`` (multiples of BLOCK_N). The band kernel walks the
    ``SUPER``-wide key cells instead, judges each cell's flatness once and skips the flat ones whole: per
    flat cell one span test instead of one per small tile (at L 4096 the mixed layer's band kernel went
    from 4.8 to 3.7 ms on an H100, docs/benchmarks.md)."""
    if BAND:
        for s0 in range((lo // SUPER) * SUPER, hi, SUPER):
            sk_lo, sk_hi, skt_lo, skt_hi = tile_span(KEXT, kc0, kc1, s0, SUPER, HAS_POS, HAS_TIME)
            sd_lo, sd_hi, sb_lo, sb_hi = bias_spans(sq_lo, sq_hi, sqt_lo, sqt_hi, sk_lo, sk_hi, skt_lo, skt_hi, TBND,
                                                    NUM_TB, inv_log2_base, HAS_TIME)
            if not spans_flat(sd_lo, sd_hi, sb_lo, sb_hi, P_HALF, HAS_POS, HAS_TIME):
                for start_n in range(tl.maximum(s0, lo), tl.minimum(s0 + SUPER, hi), BLOCK_N):
                    dqa, pg_lo, pg_hi, tb, tg_lo, tg_hi, tgb = _dq_step(
                        dqa, pg_lo, pg_hi, tb, tg_lo, tg_hi, tgb, q, do, inv_n, row_ok, pos_q, vis_q, tt_q, ev_q,
                        evq_lo, evq_hi, ttq_lo, ttq_hi, qid, start_m, sq_lo, sq_hi, sqt_lo, sqt_hi, K, V, VIS, TT, POS, PTAB,
                        TTAB, TBND, KEXT, kc0, kc1, DPTAB, DTTAB, L, start_n, alpha, P_HALF, NUM_TB, inv_log2_base,
                        BIAS, BS, DSB, KS, VS, D_QK, D_V, MASKED, MASK_MODE, HAS_POS, HAS_TIME, DOT_PREC, FAST, BLOCK_N, BLOCK_DQK,
                        BLOCK_DV, FEW_BUCKETS, POS_GRAD, TIME_GRAD, BLOCK_M, BAND, SUPER, INLINE, TB_LANES, TOEP, BIAS_IN, SCORES, DS_OUT, DS_IN, id_end, DIAG)
    else:
        if DIAG == 2:  # the second table-gradient pass visits only key tiles past the identity prefix
            lo = tl.maximum(lo, (id_end // BLOCK_N) * BLOCK_N)
        for start_n in range(lo, hi, BLOCK_N):
            dqa, pg_lo, pg_hi, tb, tg_lo, tg_hi, tgb = _dq_step(
                dqa, pg_lo, pg_hi, tb, tg_lo, tg_hi, tgb, q, do, inv_n, row_ok, pos_q, vis_q, tt_q, ev_q, evq_lo,
                evq_hi, ttq_lo, ttq_hi, qid, start_m, sq_lo, sq_hi, sqt_lo, sqt_hi, K, V, VIS, TT, POS, PTAB, TTAB, TBND, KEXT,
                kc0, kc1, DPTAB, DTTAB, L, start_n, alpha, P_HALF, NUM_TB, inv_log2_base, BIAS, BS, DSB, KS, VS, D_QK, D_V, MASKED,
                MASK_MODE, HAS_POS, HAS_TIME, DOT_PREC, FAST, BLOCK_N, BLOCK_DQK, BLOCK_DV, FEW_BUCKETS, POS_GRAD,
                TIME_GRAD, BLOCK_M, BAND, SUPER, INLINE, TB_LANES, TOEP, BIAS_IN, SCORES, DS_OUT, DS_IN, id_end, DIAG)
    return dqa, pg_lo, pg_hi, tb, tg_lo, tg_hi, tgb


@triton.jit
def _dq_program(
    Q, K, V, DO, DQ, DPTAB, DTTAB, OFF, QOFF, QTOK, TYPE, VIS, TT, POS, PTAB, TTAB, TBND, STATS, INVN, KEXT, KCH, QEXT,
    QCH, ptab_stride, ttab_stride, alpha, norm_const, P_HALF, NUM_TB, inv_log2_base: tl.constexpr, BIAS, BS, BHS, DSB,
    IDEND, H: tl.constexpr, GROUP: tl.constexpr, D_QK: tl.constexpr, D_V: tl.constexpr, QS: tl.constexpr, KS: tl.constexpr,
    VS: tl.constexpr, MASK_MODE: tl.constexpr, NORM: tl.constexpr, HAS_QIDX: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_TIME: tl.constexpr, DOT_PREC: tl.constexpr, FAST: tl.constexpr, FEW_BUCKETS: tl.constexpr,
    POS_GRAD: tl.constexpr, TIME_GRAD: tl.constexpr, BAND: tl.constexpr, SUPER: tl.constexpr, TB_PAD: tl.constexpr,
    INLINE: tl.constexpr, TB_LANES: tl.constexpr, TOEP: tl.constexpr, BIAS_IN: tl.constexpr, SCORES: tl.constexpr,
    DS_OUT: tl.constexpr, DS_IN: tl.constexpr, DIAG: tl.constexpr, TILES_FIRST: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """The query-major backward: the forward's loop over key tiles per query tile, see the two kernels."""
    b, g, pid, n_prog = grid_ids(TILES_FIRST)
    seq_start, L, q_start, q_len = sample_extent(OFF, QOFF, b, HAS_QIDX)
    kv_h = g // GROUP
    Q += q_start * QS + g * D_QK
    DQ += q_start * (H * D_QK) + g * D_QK
    DO += q_start * (H * D_V) + g * D_V
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
    DPTAB += g * ptab_stride
    DTTAB += g * ttab_stride
    if BIAS_IN:
        BIAS += g * BHS + q_start * BS
    if DS_OUT or DS_IN:  # the dS buffer, laid out as the bias cache
        DSB += g * BHS + q_start * BS
    kc0, kc1, qc0, qc1 = chunk_ranges(KCH, QCH, b, HAS_POS or HAS_TIME)
    id_end = 0
    if DIAG != 0:  # keys [0, id_end) sit at their own event positions (triton_meta.identity_prefix)
        id_end = tl.load(IDEND + b)
    pg_lo = tl.zeros([BLOCK_M], dtype=tl.float32)
    pg_hi = tl.zeros([BLOCK_M], dtype=tl.float32)
    tb = 0
    tg_lo = tl.zeros([BLOCK_M], dtype=tl.float32)
    tg_hi = tl.zeros([BLOCK_M], dtype=tl.float32)
    TBW: tl.constexpr = TB_PAD if BAND or INLINE else 1  # per-bucket row sums of non-flat tiles
    tgb = tl.zeros([BLOCK_M, TBW], dtype=tl.float32)
    for m in range(n_prog - 1 - pid, tl.cdiv(q_len, BLOCK_M), n_prog):
        rows, row_ok, pos_q, type_q, vis_q, tt_q, ev_q = query_tile(
            QTOK, TYPE, VIS, TT, POS, seq_start, q_len, m * BLOCK_M, HAS_QIDX, MASK_MODE == 2, MASK_MODE == 2, HAS_TIME,
            HAS_POS, BLOCK_M)
        if DS_IN:  # no products: placeholders
            q = tl.zeros([1], dtype=tl.float32)
            do = q
            inv_n = q
        else:
            if BIAS_IN and SCORES:  # the scores come from the cache: the Q tile is not read
                q = tl.zeros([1], dtype=tl.float32)
            else:
                q = load_rows(Q, rows, row_ok, QS, D_QK, BLOCK_DQK)
            do = load_rows(DO, rows, row_ok, H * D_V, D_V, BLOCK_DV)
            if NORM == 0:
                inv_n = tl.zeros([BLOCK_M, 1], dtype=tl.float32) + 1.0 / L.to(tl.float32)
            elif NORM == 1:
                inv_n = tl.load(INVN + rows, mask=row_ok, other=0.0)[:, None]
            else:
                inv_n = tl.zeros([BLOCK_M, 1], dtype=tl.float32) + norm_const
        evq_lo, evq_hi, ttq_lo, ttq_hi = 0, 0, 0, 0
        sq_lo, sq_hi, sqt_lo, sqt_hi = 0, 0, 0, 0
        if HAS_POS or HAS_TIME:
            evq_lo, evq_hi, ttq_lo, ttq_hi = tile_span(QEXT, qc0, qc1, m * BLOCK_M, BLOCK_M, HAS_POS, HAS_TIME)
        if (POS_GRAD or TIME_GRAD) and (BAND or not INLINE):
            sq_lo, sq_hi, sqt_lo, sqt_hi = tile_span(QEXT, qc0, qc1, (m * BLOCK_M // SUPER) * SUPER, SUPER, HAS_POS,
                                                     HAS_TIME)
        start_m = m * BLOCK_M
        qid = 0
        if TOEP:
            qid = tile_ident(QEXT, qc0, qc1, start_m, BLOCK_M)
        free_end, masked_end, extra_lo, extra_hi = key_ranges(MASK_MODE, L, pos_q, type_q, row_ok, STATS, b,
                                                              BLOCK_N)
        dqa = tl.zeros([1 if DS_IN else BLOCK_M, 1 if DS_IN else BLOCK_DQK], dtype=tl.float32)
        dqa, pg_lo, pg_hi, tb, tg_lo, tg_hi, tgb = _dq_range(
            0, free_end, dqa, pg_lo, pg_hi, tb, tg_lo, tg_hi, tgb, q, do, inv_n, row_ok, pos_q, vis_q, tt_q,
            ev_q, evq_lo, evq_hi, ttq_lo, ttq_hi, qid, start_m, sq_lo, sq_hi, sqt_lo, sqt_hi, K, V, VIS, TT, POS, PTAB, TTAB,
            TBND, KEXT, kc0, kc1, DPTAB, DTTAB, L, alpha, P_HALF, NUM_TB, inv_log2_base, BIAS, BS, DSB, KS, VS, D_QK, D_V, False,
            MASK_MODE, HAS_POS, HAS_TIME, DOT_PREC, FAST, BLOCK_N, BLOCK_DQK, BLOCK_DV, FEW_BUCKETS, POS_GRAD,
            TIME_GRAD, BLOCK_M, BAND, SUPER, INLINE, TB_LANES, TOEP, BIAS_IN, SCORES, DS_OUT, DS_IN, id_end, DIAG)
        dqa, pg_lo, pg_hi, tb, tg_lo, tg_hi, tgb = _dq_range(
            free_end, masked_end, dqa, pg_lo, pg_hi, tb, tg_lo, tg_hi, tgb, q, do, inv_n, row_ok, pos_q, vis_q,
            tt_q, ev_q, evq_lo, evq_hi, ttq_lo, ttq_hi, qid, start_m, sq_lo, sq_hi, sqt_lo, sqt_hi, K, V, VIS, TT, POS, PTAB,
            TTAB, TBND, KEXT, kc0, kc1, DPTAB, DTTAB, L, alpha, P_HALF, NUM_TB, inv_log2_base, BIAS, BS, DSB, KS, VS, D_QK, D_V, True,
            MASK_MODE, HAS_POS, HAS_TIME, DOT_PREC, FAST, BLOCK_N, BLOCK_DQK, BLOCK_DV, FEW_BUCKETS, POS_GRAD,
            TIME_GRAD, BLOCK_M, BAND, SUPER, INLINE, TB_LANES, TOEP, BIAS_IN, SCORES, DS_OUT, DS_IN, id_end, DIAG)
        if MASK_MODE == 2:
            dqa, pg_lo, pg_hi, tb, tg_lo, tg_hi, tgb = _dq_range(
                extra_lo, extra_hi, dqa, pg_lo, pg_hi, tb, tg_lo, tg_hi, tgb, q, do, inv_n, row_ok, pos_q, vis_q,
                tt_q, ev_q, evq_lo, evq_hi, ttq_lo, ttq_hi, qid, start_m, sq_lo, sq_hi, sqt_lo, sqt_hi, K, V, VIS, TT, POS, PTAB,
                TTAB, TBND, KEXT, kc0, kc1, DPTAB, DTTAB, L, alpha, P_HALF, NUM_TB, inv_log2_base, BIAS, BS, DSB, KS, VS, D_QK, D_V,
                True, MASK_MODE, HAS_POS, HAS_TIME, DOT_PREC, FAST, BLOCK_N, BLOCK_DQK, BLOCK_DV, FEW_BUCKETS, POS_GRAD,
                TIME_GRAD, BLOCK_M, BAND, SUPER, INLINE, TB_LANES, TOEP, BIAS_IN, SCORES, DS_OUT, DS_IN, id_end, DIAG)
        if not BAND and not DS_IN:
            store_rows(DQ, rows, row_ok, dqa * alpha, H * D_QK, D_QK, BLOCK_DQK)
    if POS_GRAD and DIAG != 2:
        flush_clamped(DPTAB, pg_lo, pg_hi, P_HALF)
    if TIME_GRAD:
        if BAND or INLINE:
            flush_band_time(DTTAB, tgb, NUM_TB)
        if not BAND:
            flush_time(DTTAB, tb, tg_lo, tg_hi, NUM_TB)


@triton.jit
def hstu_dq_kernel(
    Q, K, V, DO, DQ, DPTAB, DTTAB, OFF, QOFF, QTOK, TYPE, VIS, TT, POS, PTAB, TTAB, TBND, STATS, INVN, KEXT, KCH, QEXT,
    QCH, ptab_stride, ttab_stride, alpha, norm_const, P_HALF, NUM_TB, inv_log2_base: tl.constexpr, LEN_KEY, BIAS, BS,
    BHS, DSB, IDEND, H: tl.constexpr, GROUP: tl.constexpr, D_QK: tl.constexpr, D_V: tl.constexpr, QS: tl.constexpr, KS: tl.constexpr,
    VS: tl.constexpr, MASK_MODE: tl.constexpr, NORM: tl.constexpr, HAS_QIDX: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_TIME: tl.constexpr, DOT_PREC: tl.constexpr, FAST: tl.constexpr, FEW_BUCKETS: tl.constexpr,
    POS_GRAD: tl.constexpr, TIME_GRAD: tl.constexpr, SUPER: tl.constexpr, TB_PAD: tl.constexpr,
    INLINE: tl.constexpr, TB_LANES: tl.constexpr, TOEP: tl.constexpr, BIAS_IN: tl.constexpr, SCORES: tl.constexpr,
    DS_OUT: tl.constexpr, DIAG: tl.constexpr, TILES_FIRST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """DQ ``[N_q, H, D_QK]`` (input dtype), and the table gradients (only when POS_GRAD / TIME_GRAD) into
    DPTAB/DTTAB, fp32 buffers laid out like the tables, accumulated in registers and added once per program.
    Flat tiles (:func:`.triton_common.spans_flat`: almost all tiles away from the diagonal) add row sums; with
    ``INLINE`` every other tile adds its own (:func:`.triton_common.band_grads_add`: short samples, where most
    tiles are near the diagonal), else only the tiles of flat ``SUPER x SUPER`` cells are done here and
    :func:`hstu_band_grad_kernel` does the rest (long samples: dQ keeps large tiles). With ``DS_OUT`` (and no table
    gradient here) it stores each tile's dS into ``DSB`` for :func:`hstu_ds_grad_kernel` instead."""
    _dq_program(Q, K, V, DO, DQ, DPTAB, DTTAB, OFF, QOFF, QTOK, TYPE, VIS, TT, POS, PTAB, TTAB, TBND, STATS, INVN, KEXT,
                KCH, QEXT, QCH, ptab_stride, ttab_stride, alpha, norm_const, P_HALF, NUM_TB, inv_log2_base, BIAS, BS, BHS,
                DSB, IDEND, H, GROUP,
                D_QK, D_V, QS, KS, VS, MASK_MODE, NORM, HAS_QIDX, HAS_POS, HAS_TIME, DOT_PREC, FAST, FEW_BUCKETS, POS_GRAD,
                TIME_GRAD, False, SUPER, TB_PAD, INLINE, TB_LANES, TOEP, BIAS_IN, SCORES, DS_OUT, False, False, TILES_FIRST, BLOCK_M,
                BLOCK_N,
                BLOCK_DQK, BLOCK_DV)


@triton.jit
def hstu_band_grad_kernel(
    Q, K, V, DO, DQ, DPTAB, DTTAB, OFF, QOFF, QTOK, TYPE, VIS, TT, POS, PTAB, TTAB, TBND, STATS, INVN, KEXT, KCH, QEXT,
    QCH, ptab_stride, ttab_stride, alpha, norm_const, P_HALF, NUM_TB, inv_log2_base: tl.constexpr, LEN_KEY, BIAS, BS,
    BHS, DSB, IDEND, H: tl.constexpr, GROUP: tl.constexpr, D_QK: tl.constexpr, D_V: tl.constexpr, QS: tl.constexpr, KS: tl.constexpr,
    VS: tl.constexpr, MASK_MODE: tl.constexpr, NORM: tl.constexpr, HAS_QIDX: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_TIME: tl.constexpr, DOT_PREC: tl.constexpr, FAST: tl.constexpr, FEW_BUCKETS: tl.constexpr,
    POS_GRAD: tl.constexpr, TIME_GRAD: tl.constexpr, SUPER: tl.constexpr, TB_PAD: tl.constexpr,
    INLINE: tl.constexpr, TB_LANES: tl.constexpr, TOEP: tl.constexpr, BIAS_IN: tl.constexpr, SCORES: tl.constexpr,
    DS_OUT: tl.constexpr, DIAG: tl.constexpr, TILES_FIRST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """The table gradients of the ``SUPER x SUPER`` tiles that are not flat (near the diagonal, or across
    several time buckets), which :func:`hstu_dq_kernel` leaves out: ``dS`` recomputed in small tiles
    (:func:`.triton_common.band_grads_add`: diagonal sums for the position table, per-bucket row sums in
    registers for the time table). DQ is not written. Launched only when a table needs its gradient;
    BLOCK_M and BLOCK_N divide SUPER."""
    _dq_program(Q, K, V, DO, DQ, DPTAB, DTTAB, OFF, QOFF, QTOK, TYPE, VIS, TT, POS, PTAB, TTAB, TBND, STATS, INVN, KEXT,
                KCH, QEXT, QCH, ptab_stride, ttab_stride, alpha, norm_const, P_HALF, NUM_TB, inv_log2_base, BIAS, BS, BHS,
                DSB, IDEND, H, GROUP,
                D_QK, D_V, QS, KS, VS, MASK_MODE, NORM, HAS_QIDX, HAS_POS, HAS_TIME, DOT_PREC, FAST, FEW_BUCKETS, POS_GRAD,
                TIME_GRAD, True, SUPER, TB_PAD, False, TB_LANES, TOEP, BIAS_IN, SCORES, False, False, False, TILES_FIRST, BLOCK_M,
                BLOCK_N,
                BLOCK_DQK, BLOCK_DV)


@triton.jit
def hstu_ds_grad_kernel(
    Q, K, V, DO, DQ, DPTAB, DTTAB, OFF, QOFF, QTOK, TYPE, VIS, TT, POS, PTAB, TTAB, TBND, STATS, INVN, KEXT, KCH, QEXT,
    QCH, ptab_stride, ttab_stride, alpha, norm_const, P_HALF, NUM_TB, inv_log2_base: tl.constexpr, LEN_KEY, BIAS, BS,
    BHS, DSB, IDEND, H: tl.constexpr, GROUP: tl.constexpr, D_QK: tl.constexpr, D_V: tl.constexpr, QS: tl.constexpr,
    KS: tl.constexpr, VS: tl.constexpr, MASK_MODE: tl.constexpr, NORM: tl.constexpr, HAS_QIDX: tl.constexpr,
    HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, DOT_PREC: tl.constexpr, FAST: tl.constexpr,
    FEW_BUCKETS: tl.constexpr, POS_GRAD: tl.constexpr, TIME_GRAD: tl.constexpr, SUPER: tl.constexpr,
    TB_PAD: tl.constexpr, INLINE: tl.constexpr, TB_LANES: tl.constexpr, TOEP: tl.constexpr, BIAS_IN: tl.constexpr, SCORES: tl.constexpr,
    DS_OUT: tl.constexpr, DIAG: tl.constexpr, TILES_FIRST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """The table gradients from the ``dS`` that :func:`hstu_dq_kernel` stored (``DS_OUT``) in ``DSB`` ``[h, N_q,
    BS]`` (the bias cache's layout and dtype: 16-bit inputs store dS rounded as the dQ product reads it): the one-pass dQ's per-tile paths (flat tiles: row sums; others:
    :func:`.triton_common.band_grads_add`), with no products and no Q, K, V or dO read, so that the dQ kernel
    keeps the large tiles of attention without tables and this kernel's tiles hold only the gradient state. With
    ``DIAG`` 1 the position table's unclamped pairs are left to :func:`hstu_diag_grad_kernel` (keys at their own
    event position, ``[0, IDEND[b])``) and to a second launch with ``DIAG`` 2 (the other keys, e.g. targets: only key
    tiles past the prefix, position only): the first pass then adds the time table and the clamped pairs, and
    compiles without the per-pair position paths (128 registers instead of 254 for 16 x 32 tiles in one warp, so
    twice the programs fit an SM)."""
    _dq_program(Q, K, V, DO, DQ, DPTAB, DTTAB, OFF, QOFF, QTOK, TYPE, VIS, TT, POS, PTAB, TTAB, TBND, STATS, INVN, KEXT,
                KCH, QEXT, QCH, ptab_stride, ttab_stride, alpha, norm_const, P_HALF, NUM_TB, inv_log2_base, BIAS, BS, BHS,
                DSB, IDEND, H, GROUP, D_QK, D_V, QS, KS, VS, MASK_MODE, NORM, HAS_QIDX, HAS_POS, HAS_TIME, DOT_PREC, FAST,
                FEW_BUCKETS, POS_GRAD, TIME_GRAD, False, SUPER, TB_PAD, True, TB_LANES, TOEP, BIAS_IN, SCORES, False, True,
                DIAG, TILES_FIRST, BLOCK_M, BLOCK_N, BLOCK_DQK, BLOCK_DV)


@triton.jit
def hstu_diag_grad_kernel(
    DSB, DPTAB, OFF, QOFF, QTOK, VIS, POS, IDEND, STATS, LEN_KEY, BS, BHS, ptab_stride, P_HALF, H: tl.constexpr,
    MASK_MODE: tl.constexpr, HAS_QIDX: tl.constexpr, P_SLOTS: tl.constexpr, TILES_FIRST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The position-table gradient of the pairs whose key sits at its own event position (keys ``[0, id_end)``
    of a sample, :func:`.triton_meta.identity_prefix`) and whose offset ``delta = ev_q - j`` lies inside the
    clamp (``|delta| < P``), from the dS that :func:`hstu_dq_kernel` stored (``DSB``, the bias cache's ``[h, N_q,
    BS]`` layout). Their bucket is ``delta + P``: a diagonal of the dS buffer, shifted per row by the query's
    event position. So the tile of ``BLOCK_M`` query rows and ``BLOCK_N`` offsets ``delta = c BLOCK_N - P + k``
    is loaded *skewed*, row ``i`` from column ``ev_i - delta`` on (contiguous addresses per row, read once, only
    where the mask allows the pair; with the mixed mask a chunk reaching past the sample's leading H run, ``STATS``,
    gathers the keys' visibility codes, others need none), and one column sum gives ``BLOCK_N`` buckets'
    gradients: no gather of dS, no per-score bucket. Chunk ``c`` always holds buckets ``c BLOCK_N + k``, so a
    program adds its chunks' sums in registers (``[P_SLOTS / BLOCK_N, BLOCK_N]``, ``P_SLOTS >= 2P``) over its query
    tiles and flushes them with one vector atomic. Every other pair (clamped offsets, other keys: a target's own position) and the whole
    time table are :func:`hstu_ds_grad_kernel`'s (``DIAG`` 1 and 2). Grid: several query tiles per program
    (:func:`.triton_common.grid_ids`; the launcher sizes it)."""
    b, g, pid, n_prog = grid_ids(TILES_FIRST)
    seq_start, L, q_start, q_len = sample_extent(OFF, QOFF, b, HAS_QIDX)
    n_tiles = tl.cdiv(q_len, BLOCK_M)
    if pid < n_tiles:
        id_end = tl.load(IDEND + b)
        h_prefix = 0
        if MASK_MODE == 2:  # keys [0, h_prefix) are H tokens, which every query sees (triton_meta stats)
            h_prefix = tl.load(STATS + b * 3)
        QTOK += q_start
        VIS += 2 * seq_start
        POS += seq_start
        DSB += g * BHS + q_start * BS
        DPTAB += g * ptab_stride
        NC: tl.constexpr = P_SLOTS // BLOCK_N
        k = tl.arange(0, BLOCK_N)
        slot = tl.arange(0, NC)
        acc = tl.zeros([NC, BLOCK_N], dtype=tl.float32)
        for m in range(pid, n_tiles, n_prog):
            # token types and seconds are not read (NEED_TYPE, NEED_TT off): POS stands in for their pointers
            rows, row_ok, pos_q, _, vis_q, _, ev_q = query_tile(QTOK, POS, VIS, POS, POS, seq_start, q_len, m * BLOCK_M,
                                                                HAS_QIDX, False, MASK_MODE == 2, False, True, BLOCK_M)
            e_lo = tl.min(tl.where(row_ok, ev_q, FAR), axis=0)
            e_hi = tl.max(tl.where(row_ok, ev_q, -FAR), axis=0)
            # keys [0, id_end) give offsets [ev - id_end + 1, ev]; inside the clamp, cells 0 < c BLOCK_N + k < 2P
            c_lo = tl.maximum(e_lo - id_end + 1 + P_HALF, 0) // BLOCK_N
            c_hi = tl.minimum(e_hi + P_HALF, 2 * P_HALF - 1) // BLOCK_N
            for c in range(c_lo, c_hi + 1):
                delta = c * BLOCK_N - P_HALF + k
                col = ev_q[:, None] - delta[None, :]
                inside = (delta > -P_HALF) & (delta < P_HALF)
                ok = row_ok[:, None] & inside[None, :] & (col >= 0) & (col < id_end)
                if MASK_MODE == 1:
                    ok = ok & (col <= pos_q[:, None])
                elif MASK_MODE == 2:
                    if e_hi - c * BLOCK_N + P_HALF >= h_prefix:  # a key past the leading H run: its visibility code
                        vis_k = tl.load(VIS + 2 * col + 1, mask=ok & (col >= h_prefix), other=-1)
                        ok = ok & ((vis_k <= vis_q[:, None]) | (col == pos_q[:, None]))
                ds = tl.load(DSB + rows[:, None] * BS + col, mask=ok, other=0.0).to(tl.float32)
                acc += tl.where(slot[:, None] == c, tl.sum(ds, axis=0)[None, :], 0.0)
        cells = slot[:, None] * BLOCK_N + k[None, :]
        tl.atomic_add(DPTAB + cells, acc, mask=(cells > 0) & (cells < 2 * P_HALF), sem="relaxed")

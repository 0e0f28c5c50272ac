"""Triton building blocks shared by the HSTU attention kernels: mask predicate, bias buckets, tile ranges.

Everything here is ``@triton.jit`` and works on tiles: a *query* operand and a *key* operand that
broadcast against each other (``[BLOCK_M, 1]`` with ``[1, BLOCK_N]`` in the query-major kernels, the
transpose in the key-major dK/dV kernel). Constants shared with the launchers:

* ``MASK_MODE``: 0 full, 1 causal, 2 mixed (:class:`recfm.foundation.model.mask.MaskMode`).
* ``NORM``: 0 the sample length, 1 the number of allowed keys (saved by the forward), 2 a constant
  (``max_len`` or 1).
* Timestamps reach the kernels as two int32 arrays: ``VIS`` ``[N, 2]`` visibility codes, a query and a
  key code per token that turn the mixed mask into one comparison (:func:`.triton_meta.visibility_codes`),
  and ``TT`` seconds since the sample's first timestamp (the time bias).
* ``STATS``: ``[B, 3]`` int32 per sample, mixed mode only: ``h_prefix`` (tokens before the first non-H
  token), ``h_end`` (1 + position of the last H token, 0 if none), ``e_end`` (1 + position of the last
  H or R token). Every key a token may see lies below ``h_end`` (H queries) or ``e_end`` (R/T queries),
  except a target's own position; keys below ``h_prefix`` are seen by every query.

Key columns past the sample end load the key code ``INT_MAX``, which no query code reaches.
"""

from __future__ import annotations

import triton
import triton.language as tl

MODE_FULL = 0
MODE_CAUSAL = 1
MODE_MIXED = 2
NORM_LENGTH = 0
NORM_KEYS = 1
NORM_CONST = 2
TIME_CAP: tl.constexpr = tl.constexpr(2**62)  # bias.time_bucket_boundaries caps boundaries here
FAR: tl.constexpr = tl.constexpr(1 << 30)  # "no such position" in min/max reductions
INT_MAX: tl.constexpr = tl.constexpr(2**31 - 1)
CHUNK: tl.constexpr = tl.constexpr(16)  # triton_meta.CHUNK
EXT_COLS: tl.constexpr = tl.constexpr(5)  # triton_meta.EXT_COLS: pos lo, pos hi, second lo, second hi, identity
TOEP_W: tl.constexpr = tl.constexpr(128)  # triton_meta.TOEP_W: columns of the Toeplitz position tables


def _lane_asm(size: int, read: str) -> tl.constexpr:
    """PTX of :func:`lane_lookup`: ``$1`` the table, ``$2`` the index, ``$3`` the last entry (``n - 1``); entries
    of ``size`` bytes, ``read`` loads the lane's entry at ``[a]`` into ``v`` (fp32 bits)."""
    return tl.constexpr(
        "{ .reg .u32 l; .reg .u64 a; .reg .b16 h; .reg .f32 f; .reg .b32 v; mov.u32 l, %laneid; min.u32 l, l, $3; "
        f"mul.wide.u32 a, l, {size}; add.s64 a, a, $1; {read} shfl.sync.idx.b32 $0, v, $2, 31, -1; }}")


LANE_BF16: tl.constexpr = _lane_asm(2, "ld.global.nc.b16 h, [a]; cvt.u32.u16 v, h; shl.b32 v, v, 16;")
LANE_F16: tl.constexpr = _lane_asm(2, "ld.global.nc.b16 h, [a]; cvt.f32.f16 f, h; mov.b32 v, f;")
LANE_F32: tl.constexpr = _lane_asm(4, "ld.global.nc.b32 v, [a];")


@triton.jit
def dot(a, b, acc, DOT_PREC: tl.constexpr):
    """``acc + a @ b`` (fp32 ``acc``; ``None`` = zeros). ``DOT_PREC``: ``"ieee"`` (fp32 inputs, no tf32),
    ``"tf32"`` (the default for 16-bit inputs), or ``"upcast"``: both operands to fp32 first -- only under
    the interpreter, whose bf16 dot is wrong in Triton 3.6."""
    if DOT_PREC == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc=acc, input_precision=DOT_PREC)
    return out


@triton.jit
def allowed_tile(MASK_MODE: tl.constexpr, vis_q, vis_k, pos_q, pos_k):
    """The mask predicate of recfm.foundation.model.mask.allowed (causal or mixed), broadcast. Mixed: from
    the tokens' visibility codes (:func:`.triton_meta.visibility_codes`), two comparisons per pair."""
    if MASK_MODE == 1:
        ok = pos_k <= pos_q
    else:
        ok = (vis_k <= vis_q) | (pos_k == pos_q)
    return ok


@triton.jit
def pos_bucket(ev_q, ev_k, P_HALF):
    """Column of the position table: ``clamp(p_i - p_j, -P, P) + P`` (int32)."""
    return tl.minimum(tl.maximum(ev_q - ev_k, -P_HALF), P_HALF) + P_HALF


@triton.jit
def time_bucket(tt_q, tt_k, TBND, NUM_TB, inv_log2_base):
    """Column of the time table: the number of boundaries ``<= |t_i - t_j|`` (exact).

    Base 2 (``inv_log2_base == 1``, the default) with int32 times: the boundaries are ``2^k - 1``, so the
    bucket is ``floor(log2(1 + dt))``, read off the float exponent of ``1 + dt`` and corrected by one shift
    where the conversion rounded up to the next power of two: integer work only, no table reads.

    Other bases: a float estimate ``floor(log2(1 + dt) / log2(base))`` is off by at most one bucket near a
    boundary (float32 error << one bucket for ``base >= ~1.001``); one comparison against the integer
    boundary on each side makes it exact. ``TBND`` holds the ``NUM_TB - 1`` boundaries (the kernels pass
    int32 times and boundaries, see triton_impl.relative_seconds; int64 works too, with gaps of at least the
    boundaries' cap of 2^62 s in the last bucket).
    """
    dt = tl.abs(tt_q - tt_k)
    if dt.dtype == tl.int32 and inv_log2_base == 1.0:
        x = dt + 1  # >= 1; relative seconds are at most 2^31 - 2
        est = ((x.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        est = tl.where((x >> est) == 0, est - 1, est)
        est = tl.minimum(est, NUM_TB - 1)
    else:
        est = tl.floor(tl.log2(dt.to(tl.float32) + 1.0) * inv_log2_base).to(tl.int32)
        est = tl.minimum(tl.maximum(est, 0), NUM_TB - 1)
        can_up = est < NUM_TB - 1
        up = tl.load(TBND + est, mask=can_up, other=0)
        est = tl.where(can_up & (dt >= up), est + 1, est)
        can_down = est > 0
        down = tl.load(TBND + est - 1, mask=can_down, other=0)
        est = tl.where(can_down & (dt < down), est - 1, est)
        if dt.dtype == tl.int64:
            est = tl.where(dt >= TIME_CAP, NUM_TB - 1, est)  # boundaries past the cap are the cap itself
    return est


@triton.jit
def grid_ids(TILES_FIRST: tl.constexpr):
    """``(sample, head, tile program, tile programs)`` of this program. ``TILES_FIRST`` (the launcher's choice
    up to 65535 samples, the grid's z limit): grid ``(tiles, heads, samples)``, so programs that start together
    are the tiles of one sample and head, which read the same keys and values (they stay in L2: with samples
    first, every resident program read its own sample's from DRAM). Else ``(samples, heads, tiles)``."""
    if TILES_FIRST:
        b = tl.program_id(2)
        pid = tl.program_id(0)
        n_prog = tl.num_programs(0)
    else:
        b = tl.program_id(0)
        pid = tl.program_id(2)
        n_prog = tl.num_programs(2)
    return b, tl.program_id(1), pid, n_prog


@triton.jit
def sample_extent(OFF, QOFF, b, HAS_QIDX: tl.constexpr):
    """``(seq_start, L, q_start, q_len)`` of sample ``b``: its first token and length, its first query row and
    query count (the tokens themselves without target-only queries). Starts int64, lengths int32."""
    seq_start = tl.load(OFF + b)
    L = (tl.load(OFF + b + 1) - seq_start).to(tl.int32)
    if HAS_QIDX:
        q_start = tl.load(QOFF + b)
        q_len = (tl.load(QOFF + b + 1) - q_start).to(tl.int32)
    else:
        q_start = seq_start
        q_len = L
    return seq_start, L, q_start, q_len


@triton.jit
def chunk_ranges(KCH, QCH, b, NEED: tl.constexpr):
    """Sample ``b``'s chunk range among the key and the query chunk extremes (``[first, end)`` each; zeros
    when no bias table needs them)."""
    kc0, kc1, qc0, qc1 = 0, 0, 0, 0
    if NEED:
        kc0 = tl.load(KCH + b)
        kc1 = tl.load(KCH + b + 1)
        qc0 = tl.load(QCH + b)
        qc1 = tl.load(QCH + b + 1)
    return kc0, kc1, qc0, qc1


@triton.jit
def tile_span(EXT, c_first, c_end, start, BLOCK: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr):
    """``(pos_lo, pos_hi, sec_lo, sec_hi)`` over rows ``start + [0, BLOCK)`` of a sample from its chunk extremes
    (:func:`.triton_meta.chunk_extremes`; ``c_first``/``c_end`` its chunk range): scalar loads, no reduction.
    Rows past the sample end are not included. Unneeded values are 0."""
    c0 = c_first + start // CHUNK
    pos_lo = 0
    pos_hi = 0
    sec_lo = 0
    sec_hi = 0
    if HAS_POS:
        pos_lo = tl.load(EXT + c0 * EXT_COLS)
        pos_hi = tl.load(EXT + c0 * EXT_COLS + 1)
    if HAS_TIME:
        sec_lo = tl.load(EXT + c0 * EXT_COLS + 2)
        sec_hi = tl.load(EXT + c0 * EXT_COLS + 3)
    for c in tl.static_range(1, BLOCK // CHUNK):
        ok = c0 + c < c_end
        row = EXT + (c0 + c) * EXT_COLS
        if HAS_POS:
            pos_lo = tl.minimum(pos_lo, tl.load(row, mask=ok, other=INT_MAX))
            pos_hi = tl.maximum(pos_hi, tl.load(row + 1, mask=ok, other=-1))
        if HAS_TIME:
            sec_lo = tl.minimum(sec_lo, tl.load(row + 2, mask=ok, other=INT_MAX))
            sec_hi = tl.maximum(sec_hi, tl.load(row + 3, mask=ok, other=-1))
    return pos_lo, pos_hi, sec_lo, sec_hi


@triton.jit
def tile_ident(EXT, c_first, c_end, start, BLOCK: tl.constexpr):
    """1 when every row ``start + [0, BLOCK)`` of a sample (rows past its end aside) has its event position
    equal to its index in the sample (:func:`.triton_meta.chunk_extremes`, column 4), else 0: the tile's
    position buckets are a Toeplitz band (:func:`toeplitz_tile`)."""
    c0 = c_first + start // CHUNK
    ident = tl.load(EXT + c0 * EXT_COLS + 4)
    for c in tl.static_range(1, BLOCK // CHUNK):
        ident = tl.minimum(ident, tl.load(EXT + (c0 + c) * EXT_COLS + 4, mask=c0 + c < c_end, other=1))
    return ident


@triton.jit
def toeplitz_tile(PTAB, P_HALF, x0, KEY_ROWS: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """The position bias of a ``[R, C]`` tile whose query and key rows sit at their own indices in the sample
    (:func:`tile_ident`), as one 2D block load (fp32): ``bias = pos_table[clamp(i - j, -P, P) + P]`` is a
    Toeplitz band, so the launcher lays it out once per call as ``[X, TOEP_W]`` matrices after the table
    (:func:`.triton_meta.toeplitz_tables`) and the tile is ``R`` consecutive rows of one of them: contiguous
    vector loads instead of a gather, a clamp and an address per score.

    ``x0``: ``i0 - j0 + P + 2 * TOEP_W`` for a query-major tile (rows: queries from ``i0``, columns: keys from
    ``j0``), ``j0 - i0 + P + 2 * TOEP_W`` for a key-major one (``KEY_ROWS``, the dK/dV kernel); clamped here
    (tiles beyond the table rows lie entirely past the clamp, which the clamped rows reproduce)."""
    TP = tl.multiple_of((2 * P_HALF + 64) // 64 * 64, 64)
    X = 2 * P_HALF + 4 * TOEP_W
    base = PTAB + TP
    if KEY_ROWS:
        base += X * TOEP_W
    x = tl.minimum(tl.maximum(x0, 0), X - TOEP_W)
    offs = (x + tl.arange(0, R))[:, None] * TOEP_W + tl.arange(0, C)[None, :]
    return tl.load(base + offs).to(tl.float32)


@triton.jit
def toeplitz_args(qid, kid, start_q, start_k, P_HALF, KEY_ROWS: tl.constexpr):
    """``(toep, x0)`` of :func:`add_bias` for a tile of queries from ``start_q`` and keys from ``start_k`` (both
    sample-local) with identity flags ``qid``, ``kid`` (:func:`tile_ident`)."""
    if KEY_ROWS:
        x0 = start_k - start_q + P_HALF + 2 * TOEP_W
    else:
        x0 = start_q - start_k + P_HALF + 2 * TOEP_W
    return (qid & kid) != 0, x0


@triton.jit
def bias_spans(evq_lo, evq_hi, ttq_lo, ttq_hi, evk_lo, evk_hi, ttk_lo, ttk_hi, TBND, NUM_TB, inv_log2_base,
               HAS_TIME: tl.constexpr):
    """``(d_lo, d_hi, b_lo, b_hi)`` of a tile for :func:`add_bias`: the span of ``ev_q - ev_k`` and of the time
    buckets, from the query rows' and key columns' :func:`tile_span`. Buckets grow with ``|dt|``, so every
    pair of the tile lies between the buckets of the smallest and largest possible gap."""
    b_lo = 0
    b_hi = 0
    if HAS_TIME:
        t_lo = ttq_lo - ttk_hi
        t_hi = ttq_hi - ttk_lo
        a_lo = tl.where(t_lo > 0, t_lo, tl.where(t_hi < 0, -t_hi, 0))
        a_hi = tl.maximum(t_hi, -t_lo)
        b_lo = time_bucket(a_lo, 0, TBND, NUM_TB, inv_log2_base)
        b_hi = time_bucket(a_hi, 0, TBND, NUM_TB, inv_log2_base)
    return evq_lo - evk_hi, evq_hi - evk_lo, b_lo, b_hi


@triton.jit
def spans_flat(d_lo, d_hi, b_lo, b_hi, P_HALF, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr):
    """True when a tile's spans (:func:`bias_spans`) put every pair past the position clamp on one side and
    within one time bucket or across one boundary: the tile's bias is a scalar plus a two-way select."""
    if HAS_POS and HAS_TIME:
        flat = ((d_lo >= P_HALF) | (d_hi <= -P_HALF)) & (b_hi - b_lo <= 1)
    elif HAS_POS:
        flat = (d_lo >= P_HALF) | (d_hi <= -P_HALF)
    else:
        flat = b_hi - b_lo <= 1
    return flat


@triton.jit
def cached_bias(BIAS, BS, rows, row_ok, cols, col_ok):
    """Tile ``[rows, cols]`` of the bias cache (:func:`.triton_fwd.hstu_bias_kernel`) in float32, 0 outside
    ``row_ok x col_ok``. The load is masked by rows only: a mask that varies along the contiguous columns
    makes it a 2-byte load, which Triton's software pipeliner leaves synchronous (the tile then waited on
    global memory once per key block); rows are ``BS`` elements, a multiple of every ``BLOCK_N``, so the
    columns of a key tile past the sample's end are inside the row and are zeroed here."""
    b = tl.load(BIAS + rows[:, None] * BS + cols[None, :], mask=row_ok[:, None], other=0.0)
    return tl.where(col_ok[None, :], b.to(tl.float32), 0.0)


@triton.jit
def add_bias(s, ev_q, ev_k, tt_q, tt_k, d_lo, d_hi, b_lo, b_hi, PTAB, TTAB, TBND, P_HALF, NUM_TB, inv_log2_base,
             HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, TB_LANES: tl.constexpr, toep, x0, KEY_ROWS: tl.constexpr,
             TOEP: tl.constexpr):
    """``s + pos_table[bucket] + time_table[bucket]`` (table pointers already at the head's row).

    ``[d_lo, d_hi]`` spans ``ev_q - ev_k`` over the tile and ``[b_lo, b_hi]`` its time buckets
    (:func:`bias_spans`). Most tiles lie entirely past the position clamp and within one time bucket or
    across one boundary (all but those near the diagonal): they add a scalar (one bucket) or select
    between two scalars by one comparison, with no per-score table read. Other tiles compute both buckets
    per score and read the position table per score; the time table too, unless ``TB_LANES`` (a GPU and a
    time table of at most 32 entries): then :func:`lane_lookup` takes each entry from a warp lane's register
    by one shuffle, with no per-score memory access. With ``TOEP`` (the launcher built the Toeplitz position
    tables) a tile whose rows and columns all sit at their own event positions (``toep``, from
    :func:`tile_ident`: histories and real-time runs of the batch layout) loads its position bias as one block
    (:func:`toeplitz_tile`, row offset ``x0``; ``KEY_ROWS``: the tile is key-major).
    """
    if spans_flat(d_lo, d_hi, b_lo, b_hi, P_HALF, HAS_POS, HAS_TIME):
        base = 0.0
        if HAS_POS:
            base = tl.load(PTAB + tl.where(d_lo >= P_HALF, 2 * P_HALF, 0)).to(tl.float32)
        if HAS_TIME:
            low = tl.load(TTAB + b_lo).to(tl.float32)
            base += low
            if b_hi > b_lo:  # across one boundary: a select per score
                step = tl.load(TTAB + b_hi).to(tl.float32) - low
                bound = tl.load(TBND + b_lo)
                s += tl.where(tl.abs(tt_q - tt_k) >= bound, base + step, base)
            else:  # one bucket: a scalar
                s += base
        else:
            s += base
    else:
        if HAS_POS:
            if TOEP:
                if toep:
                    s += toeplitz_tile(PTAB, P_HALF, x0, KEY_ROWS, s.shape[0], s.shape[1])
                else:
                    s += tl.load(PTAB + pos_bucket(ev_q, ev_k, P_HALF)).to(tl.float32)
            else:
                s += tl.load(PTAB + pos_bucket(ev_q, ev_k, P_HALF)).to(tl.float32)
        if HAS_TIME:
            bucket = time_bucket(tt_q, tt_k, TBND, NUM_TB, inv_log2_base)
            if TB_LANES:
                s += lane_lookup(TTAB, bucket, NUM_TB)
            else:
                s += tl.load(TTAB + bucket).to(tl.float32)
    return s


@triton.jit
def lane_lookup(TAB, idx, n):
    """``TAB[idx]`` as fp32 for a table of ``n <= 32`` entries, broadcast like ``idx`` (int32 in ``[0, n)``),
    by warp shuffles: lane ``l`` of each warp reads ``TAB[min(l, n - 1)]`` into a register and every score
    takes lane ``idx``'s value with one ``shfl.sync.idx``. Lane id, table read and shuffle are one asm block
    per element, so no layout conversion can move a value to another lane between them; ptxas reads the
    table once per thread (the address is the same for every element of a thread). CUDA only (PTX), and
    every lane of a warp must reach it (a tile-uniform branch, as in :func:`add_bias`). ``TAB``: bf16,
    fp16 or fp32."""
    args = [TAB + tl.zeros_like(idx), idx, tl.zeros_like(idx) + (n - 1)]
    if TAB.dtype.element_ty == tl.bfloat16:
        out = tl.inline_asm_elementwise(LANE_BF16, "=f,l,r,r", args, dtype=tl.float32, is_pure=False, pack=1)
    elif TAB.dtype.element_ty == tl.float16:
        out = tl.inline_asm_elementwise(LANE_F16, "=f,l,r,r", args, dtype=tl.float32, is_pure=False, pack=1)
    else:
        out = tl.inline_asm_elementwise(LANE_F32, "=f,l,r,r", args, dtype=tl.float32, is_pure=False, pack=1)
    return out


@triton.jit
def clamped_rows_add(rs, d_lo, P_HALF, pg_lo, pg_hi):
    """Row sums ``rs`` of a tile past the position clamp into ``pg_hi`` (above: bucket ``2P``) or ``pg_lo``."""
    above = d_lo >= P_HALF
    return pg_lo + tl.where(above, 0.0, rs), pg_hi + tl.where(above, rs, 0.0)


@triton.jit
def upper_rows(ds, tt_q, tt_k, b_lo, b_hi, TBND):
    """Row sums of ``ds`` over the pairs in bucket ``b_hi`` of a tile spanning ``b_lo .. b_lo + 1`` (zeros when
    ``b_hi == b_lo``): the split of a flat tile's time gradient by the one boundary it may straddle."""
    bound = tl.load(TBND + b_lo, mask=b_hi > b_lo, other=INT_MAX)  # relative seconds stay below INT_MAX
    return tl.sum(tl.where(tl.abs(tt_q - tt_k) >= bound, ds, 0.0), axis=1)


@triton.jit
def flat_grads_add(ds, tt_q, tt_k, d_lo, b_lo, b_hi, pg_lo, pg_hi, tb, tg_lo, tg_hi, DTTAB, TBND, P_HALF, NUM_TB,
                   POS_GRAD: tl.constexpr, TIME_GRAD: tl.constexpr):
    """Table gradients of a tile whose spans are flat (:func:`spans_flat`), added to per-program registers.

    ``ds`` ``[BLOCK_M, BLOCK_N]`` fp32 is zero wherever the mask or the sample end excludes a pair. Its row
    sums go to ``pg_hi`` (every pair past the clamp above: position bucket ``2P``) or ``pg_lo`` (bucket 0),
    both ``[BLOCK_M]``. Time: ``tg_lo`` / ``tg_hi`` ``[BLOCK_M]`` hold the row sums of buckets ``tb`` and
    ``tb + 1``; a tile whose low bucket is not ``tb`` first adds them to DTTAB (two atomics) and moves ``tb``
    (rare: a query tile's keys cross few bucket boundaries, mostly in order). Row sums stay within a warp;
    :func:`flush_clamped` and :func:`flush_time` add what is left once per program."""
    rs = tl.sum(ds, axis=1)
    if POS_GRAD:
        pg_lo, pg_hi = clamped_rows_add(rs, d_lo, P_HALF, pg_lo, pg_hi)
    if TIME_GRAD:
        if b_lo != tb:
            flush_time(DTTAB, tb, tg_lo, tg_hi, NUM_TB)
            tg_lo = tl.zeros_like(tg_lo)
            tg_hi = tl.zeros_like(tg_hi)
            tb = b_lo
        if b_hi > b_lo:
            high = upper_rows(ds, tt_q, tt_k, b_lo, b_hi, TBND)
            tg_hi += high
            tg_lo += rs - high
        else:  # one bucket: no per-score comparison
            tg_lo += rs
    return pg_lo, pg_hi, tb, tg_lo, tg_hi


@triton.jit
def band_grads_add(ds, ev_q, ev_k, tt_q, tt_k, row_ok, col_ok, d_lo, d_hi, b_lo, b_hi, pg_lo, pg_hi, tgb, DPTAB, TBND,
                   P_HALF, NUM_TB, inv_log2_base, FEW_BUCKETS: tl.constexpr, POS_GRAD: tl.constexpr,
                   TIME_GRAD: tl.constexpr, CLAMPED_ONLY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Table gradients of a tile of the band kernel (``[d_lo, d_hi]``, ``[b_lo, b_hi]`` its spans; ``ds`` zero
    outside the mask). Position: a tile past the clamp adds its row sums to ``pg_lo`` / ``pg_hi`` as in
    :func:`flat_grads_add`, others take :func:`pos_grad_add` (diagonal sums); with ``CLAMPED_ONLY`` (the
    table-gradient kernel's first pass when the diag kernel runs: the unclamped pairs are that kernel's and the
    second pass's) only the clamped pairs, by two masked row sums in a tile across the clamp. Time: per-bucket row
    sums go to column ``c`` of ``tgb`` ``[BLOCK_M, TB_PAD]`` (one pass over the tile per bucket it holds,
    reductions within a warp, no atomics); :func:`flush_band_time` adds ``tgb`` once per program."""
    rs = tl.sum(ds, axis=1)
    if POS_GRAD:
        if (d_lo >= P_HALF) | (d_hi <= -P_HALF):
            pg_lo, pg_hi = clamped_rows_add(rs, d_lo, P_HALF, pg_lo, pg_hi)
        elif CLAMPED_ONLY:
            if (d_hi >= P_HALF) | (d_lo <= -P_HALF):
                d = ev_q[:, None] - ev_k[None, :]
                pg_hi += tl.sum(tl.where(d >= P_HALF, ds, 0.0), axis=1)
                pg_lo += tl.sum(tl.where(d <= -P_HALF, ds, 0.0), axis=1)
        else:
            pos_grad_add(DPTAB, ev_q, ev_k, row_ok, col_ok, ds, d_lo, d_hi, P_HALF, FEW_BUCKETS, BLOCK_M, BLOCK_N)
    if TIME_GRAD:
        col = tl.arange(0, tgb.shape[1])[None, :]
        if b_hi - b_lo <= 1:
            high = upper_rows(ds, tt_q[:, None], tt_k[None, :], b_lo, b_hi, TBND)
            tgb += tl.where(col == b_hi, high[:, None], 0.0) + tl.where(col == b_lo, (rs - high)[:, None], 0.0)
        else:
            bucket = time_bucket(tt_q[:, None], tt_k[None, :], TBND, NUM_TB, inv_log2_base)
            for c in range(b_lo, b_hi + 1):
                part = tl.sum(tl.where(bucket == c, ds, 0.0), axis=1)
                tgb += tl.where(col == c, part[:, None], 0.0)
    return pg_lo, pg_hi, tgb


@triton.jit
def flush_band_time(DTTAB, tgb, NUM_TB):
    """``DTTAB[c] += sum_i tgb[i, c]`` for the table's columns (one vector atomic)."""
    col = tl.arange(0, tgb.shape[1])
    tl.atomic_add(DTTAB + col, tl.sum(tgb, axis=0), mask=col < NUM_TB, sem="relaxed")


@triton.jit
def flush_time(DTTAB, tb, tg_lo, tg_hi, NUM_TB):
    """``DTTAB[tb] += sum(tg_lo)``, ``DTTAB[tb + 1] += sum(tg_hi)`` (the second only inside the table)."""
    tl.atomic_add(DTTAB + tb, tl.sum(tg_lo, axis=0), sem="relaxed")
    tl.atomic_add(DTTAB + tb + 1, tl.sum(tg_hi, axis=0), mask=tb + 1 < NUM_TB, sem="relaxed")


@triton.jit
def flush_clamped(DPTAB, pg_lo, pg_hi, P_HALF):
    """Add the clamped position gradients of :func:`flat_grads_add` / :func:`band_grads_add` (table pointer at
    the head's row): two scalar atomics."""
    tl.atomic_add(DPTAB, tl.sum(pg_lo, axis=0), sem="relaxed")
    tl.atomic_add(DPTAB + 2 * P_HALF, tl.sum(pg_hi, axis=0), sem="relaxed")


@triton.jit
def scatter_add_grad(DTAB, bucket, ds, valid, FEW_BUCKETS: tl.constexpr):
    """``DTAB[bucket] += ds`` over the ``valid`` entries of a tile: one atomic when they hold one bucket (far
    from the diagonal), one reduced atomic per bucket when they span fewer than ``FEW_BUCKETS`` (a pass over
    the tile each), else one atomic per element (unusual layouts or tiles). Contended per-element atomics into
    a few hundred table cells are far slower than the passes (the launcher sets ``FEW_BUCKETS`` = 128 on a
    GPU, 4 under the interpreter so that tests reach all three paths)."""
    lo = tl.min(tl.min(tl.where(valid, bucket, FAR), axis=1), axis=0)
    hi = tl.max(tl.max(tl.where(valid, bucket, -1), axis=1), axis=0)
    ds = tl.where(valid, ds, 0.0)
    if lo == hi:
        tl.atomic_add(DTAB + lo, tl.sum(tl.sum(ds, axis=1), axis=0), sem="relaxed")
    elif hi - lo < FEW_BUCKETS:
        for c in range(lo, hi + 1):
            part = tl.sum(tl.sum(tl.where(bucket == c, ds, 0.0), axis=1), axis=0)
            tl.atomic_add(DTAB + c, part, sem="relaxed")
    else:
        tl.atomic_add(DTAB + bucket, ds, mask=valid, sem="relaxed")


@triton.jit
def diagonal_sums_add(DTAB, ds, shift, spread, cell0, BLOCK_N: tl.constexpr, W: tl.constexpr):
    """``DTAB[cell0 + k] += sum_i ds[i, shift_i + BLOCK_N - 1 - k]`` for ``k < spread + BLOCK_N`` (``W`` at least
    that, a power of two): one gather lines each row's run up as columns, one column sum, one vector atomic."""
    k = tl.arange(0, W)
    j = shift[:, None] + (BLOCK_N - 1) - k[None, :]  # column of run position k in row i
    on = (j >= 0) & (j < BLOCK_N)
    lined = tl.gather(ds, tl.minimum(tl.maximum(j, 0), BLOCK_N - 1), axis=1)
    sums = tl.sum(tl.where(on, lined, 0.0), axis=0)
    tl.atomic_add(DTAB + cell0 + k, sums, mask=k < spread + BLOCK_N, sem="relaxed")


@triton.jit
def pos_grad_add(DTAB, ev_q, ev_k, row_ok, col_ok, ds, d_lo, d_hi, P_HALF, FEW_BUCKETS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Position-bias gradient of a ``[BLOCK_M, BLOCK_N]`` query-major tile: ``DTAB[pos_bucket_ij] += ds_ij``.

    Fast path: when the valid columns hold consecutive event positions (``ev_k_j = b + j``), the valid rows'
    positions lie within ``DIAG - BLOCK_N`` of their least ``e`` (``ev_q_i = e + s_i``, any order, repeats
    allowed; ``DIAG`` = 128 for tiles up to 32 x 32, else twice the larger side) and no pair of the tile is
    clamped, the bucket is ``e - b + P + s_i - j``: row ``i`` adds to a run of buckets shifted by ``s_i``.
    One ``tl.gather`` lines the runs up as columns (column ``k`` of row ``i`` holds ``ds[i, s_i + BLOCK_N - 1
    - k]``), one column sum reduces them, and one vector atomic adds the sums (distinct cells,
    :func:`diagonal_sums_add`); rows within ``NEAR - BLOCK_N`` positions (``NEAR`` the power of two from
    ``BLOCK_M + BLOCK_N``: consecutive rows) take a window of ``NEAR`` columns, half of ``DIAG`` for small
    tiles. This is the
    common case: histories, real-time runs and causal sequences (``s_i = i``: the tile's diagonal sums), and
    target rows in time order, which share or step through a few event positions. Other tiles (tiles across
    the clamp, target rows spread over many positions) take :func:`scatter_add_grad`; a tile entirely past
    the clamp (``[d_lo, d_hi]``, the span of ``ev_q - ev_k`` as in :func:`add_bias`) adds its sum to one
    cell."""
    valid = row_ok[:, None] & col_ok[None, :]
    if (d_lo >= P_HALF) | (d_hi <= -P_HALF):
        cell = tl.where(d_lo >= P_HALF, 2 * P_HALF, 0)
        tl.atomic_add(DTAB + cell, tl.sum(tl.sum(tl.where(valid, ds, 0.0), axis=1), axis=0), sem="relaxed")
    else:
        cols = tl.arange(0, BLOCK_N)
        e_lo = tl.min(tl.where(row_ok, ev_q, FAR), axis=0)
        e_hi = tl.max(tl.where(row_ok, ev_q, -FAR), axis=0)
        b = ev_k - cols
        b_lo = tl.min(tl.where(col_ok, b, FAR), axis=0)
        b_hi = tl.max(tl.where(col_ok, b, -FAR), axis=0)
        d = e_lo - b_lo
        # room for target rows spread over ~100 event positions in small tiles (band, one-pass dQ); rows within
        # BLOCK_M positions (histories, real-time runs: the common tiles) take the narrowest window, NEAR
        DIAG: tl.constexpr = 128 if BLOCK_M + BLOCK_N <= 64 else 2 * (BLOCK_M if BLOCK_M > BLOCK_N else BLOCK_N)
        NEAR: tl.constexpr = 64 if BLOCK_M + BLOCK_N <= 64 else 128 if BLOCK_M + BLOCK_N <= 128 else 256
        spread = e_hi - e_lo
        fast = (b_lo == b_hi) & (d - (BLOCK_N - 1) >= -P_HALF) & (d + spread <= P_HALF)
        wide = False
        if NEAR < DIAG:
            wide = fast & (spread > NEAR - BLOCK_N) & (spread <= DIAG - BLOCK_N)
        shift = tl.where(row_ok, ev_q - e_lo, 0)
        cell0 = d - (BLOCK_N - 1) + P_HALF
        if fast & (spread <= NEAR - BLOCK_N):
            diagonal_sums_add(DTAB, tl.where(valid, ds, 0.0), shift, spread, cell0, BLOCK_N, NEAR)
        elif wide:
            diagonal_sums_add(DTAB, tl.where(valid, ds, 0.0), shift, spread, cell0, BLOCK_N, DIAG)
        else:
            scatter_add_grad(DTAB, pos_bucket(ev_q[:, None], ev_k[None, :], P_HALF), ds, valid, FEW_BUCKETS)


@triton.jit
def tanh_approx(x):
    """``tanh`` by the hardware MUFU instruction (``tanh.approx.f32``; CUDA only)."""
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def silu_parts(s, FAST: tl.constexpr):
    """``(silu(s), silu'(s))`` in float32. ``FAST`` (16-bit inputs on a GPU): the sigmoid as
    ``0.5 + 0.5 tanh(s / 2)`` with the hardware tanh (one MUFU op instead of exp + reciprocal; relative
    error ~5e-4, below bf16/fp16 rounding)."""
    if FAST:
        sig = 0.5 + 0.5 * tanh_approx(0.5 * s)
    else:
        sig = tl.sigmoid(s)
    return s * sig, sig * (1.0 + s * (1.0 - sig))


@triton.jit
def key_ranges(MASK_MODE: tl.constexpr, L, pos_q, type_q, row_ok, STATS, b, BLOCK_N: tl.constexpr):
    """Key blocks a query tile must visit: ``[0, free_end)`` need no mask, ``[free_end, masked_end)`` and
    ``[extra_lo, extra_hi)`` (a target's own position past ``e_end``) are masked. All multiples of
    BLOCK_N; every allowed (query, key) pair lies in exactly one of them."""
    if MASK_MODE == 0:
        free_end = tl.cdiv(L, BLOCK_N) * BLOCK_N
        masked_end = free_end
        extra_lo = free_end
        extra_hi = free_end
    elif MASK_MODE == 1:
        q_min = tl.min(tl.where(row_ok, pos_q, FAR), axis=0)
        q_max = tl.max(tl.where(row_ok, pos_q, -1), axis=0)
        free_end = ((q_min + 1) // BLOCK_N) * BLOCK_N
        masked_end = tl.cdiv(q_max + 1, BLOCK_N) * BLOCK_N
        extra_lo = masked_end
        extra_hi = masked_end
    else:
        h_prefix = tl.load(STATS + b * 3)
        h_end = tl.load(STATS + b * 3 + 1)
        e_end = tl.load(STATS + b * 3 + 2)
        non_h = tl.max(tl.where(row_ok & (type_q != 0), 1, 0), axis=0)
        hi = tl.where(non_h > 0, e_end, h_end)
        free_end = (tl.minimum(h_prefix, hi) // BLOCK_N) * BLOCK_N
        masked_end = tl.cdiv(hi, BLOCK_N) * BLOCK_N
        is_t = row_ok & (type_q == 2)
        t_min = tl.min(tl.where(is_t, pos_q, FAR), axis=0)
        t_max = tl.max(tl.where(is_t, pos_q, -1), axis=0)
        extra_lo = tl.maximum(masked_end, (t_min // BLOCK_N) * BLOCK_N)
        extra_hi = tl.cdiv(t_max + 1, BLOCK_N) * BLOCK_N
    return free_end, masked_end, extra_lo, extra_hi


@triton.jit
def query_ranges(MASK_MODE: tl.constexpr, HAS_QIDX: tl.constexpr, k_start, q_len, STATS, b,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query rows (multiples of BLOCK_M, in the sample's sorted query rows) a key tile
    ``[k_start, k_start + BLOCK_N)`` must visit: ``[free_lo, free_hi)`` unmasked, ``[masked_lo, masked_hi)``
    masked. Conservative with target-only queries (their positions are not known per block)."""
    all_hi = tl.cdiv(q_len, BLOCK_M) * BLOCK_M
    k_end = k_start + BLOCK_N
    if MASK_MODE == 0:
        free_lo = 0
        masked_lo = all_hi
        masked_hi = all_hi
    elif MASK_MODE == 1:
        if HAS_QIDX:
            free_lo = all_hi
            masked_lo = 0
            masked_hi = all_hi
        else:
            masked_lo = (k_start // BLOCK_M) * BLOCK_M
            masked_hi = tl.minimum(tl.cdiv(k_end - 1, BLOCK_M) * BLOCK_M, all_hi)
            free_lo = masked_hi
    else:
        h_prefix = tl.load(STATS + b * 3)
        h_end = tl.load(STATS + b * 3 + 1)
        e_end = tl.load(STATS + b * 3 + 2)
        all_h = k_end <= h_prefix
        only_t = k_start >= e_end
        if HAS_QIDX:
            lo = 0
            diag_lo = 0
            diag_hi = all_hi
        else:
            lo = tl.where(k_start >= h_end, (h_prefix // BLOCK_M) * BLOCK_M, 0)
            diag_lo = (k_start // BLOCK_M) * BLOCK_M
            diag_hi = tl.minimum(tl.cdiv(k_end, BLOCK_M) * BLOCK_M, all_hi)
        free_lo = tl.where(all_h, 0, all_hi)
        masked_lo = tl.where(all_h, all_hi, tl.where(only_t, diag_lo, lo))
        masked_hi = tl.where(all_h, all_hi, tl.where(only_t, diag_hi, all_hi))
    return free_lo, all_hi, masked_lo, masked_hi


@triton.jit
def query_tile(QTOK, TYPE, VIS, TT, POS, seq_start, q_len, start_m, HAS_QIDX: tl.constexpr, NEED_TYPE: tl.constexpr,
               NEED_VIS: tl.constexpr, NEED_TT: tl.constexpr, NEED_EV: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows ``start_m + [0, BLOCK_M)`` of a sample's (sorted) queries: ``(rows, row_ok, pos_q, type_q, vis_q,
    tt_q, ev_q)`` -- positions inside the sample, token types (tile ranges), query visibility codes (mask),
    relative seconds (time bias) and event positions, all int32; fields not needed are ``pos_q``
    placeholders. ``QTOK`` points at the sample's first query row, ``TYPE``/``VIS``/``TT``/``POS`` at its
    first token (``VIS`` holds two codes per token: query, key)."""
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    if HAS_QIDX:
        pos_q = (tl.load(QTOK + rows, mask=row_ok, other=0) - seq_start).to(tl.int32)
    else:
        pos_q = rows
    type_q = pos_q
    vis_q = pos_q
    tt_q = pos_q
    ev_q = pos_q
    if NEED_TYPE:
        type_q = tl.load(TYPE + pos_q, mask=row_ok, other=0).to(tl.int32)
    if NEED_VIS:
        vis_q = tl.load(VIS + 2 * pos_q, mask=row_ok, other=-1)
    if NEED_TT:
        tt_q = tl.load(TT + pos_q, mask=row_ok, other=0)
    if NEED_EV:
        ev_q = tl.load(POS + pos_q, mask=row_ok, other=0)
    return rows, row_ok, pos_q, type_q, vis_q, tt_q, ev_q


@triton.jit
def key_tile(VIS, TT, POS, L, start_n, NEED_VIS: tl.constexpr, NEED_TT: tl.constexpr, NEED_EV: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """Columns ``start_n + [0, BLOCK_N)`` of a sample's keys: ``(cols, col_ok, vis_k, tt_k, ev_k)`` (key
    visibility code ``INT_MAX`` past the sample end: no query sees it; unneeded fields are ``cols``
    placeholders). Pointers at the sample's first token."""
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < L
    vis_k = cols
    tt_k = cols
    ev_k = cols
    if NEED_VIS:
        vis_k = tl.load(VIS + 2 * cols + 1, mask=col_ok, other=INT_MAX)
    if NEED_TT:
        tt_k = tl.load(TT + cols, mask=col_ok, other=0)
    if NEED_EV:
        ev_k = tl.load(POS + cols, mask=col_ok, other=0)
    return cols, col_ok, vis_k, tt_k, ev_k


@triton.jit
def load_rows(BASE, rows, row_ok, ROW_STRIDE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """``[len(rows), BLOCK_D]`` tile of rows ``BASE + rows * ROW_STRIDE`` (zeros past ``D`` and ``row_ok``)."""
    cols = tl.arange(0, BLOCK_D)
    ptrs = BASE + rows[:, None] * ROW_STRIDE + cols[None, :]
    if D == BLOCK_D:
        tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        tile = tl.load(ptrs, mask=row_ok[:, None] & (cols[None, :] < D), other=0.0)
    return tile


@triton.jit
def store_rows(BASE, rows, row_ok, tile, ROW_STRIDE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a ``[len(rows), BLOCK_D]`` fp32 tile into rows of ``BASE`` (its dtype), columns ``< D``."""
    cols = tl.arange(0, BLOCK_D)
    ptrs = BASE + rows[:, None] * ROW_STRIDE + cols[None, :]
    if D == BLOCK_D:
        tl.store(ptrs, tile.to(BASE.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(ptrs, tile.to(BASE.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < D))

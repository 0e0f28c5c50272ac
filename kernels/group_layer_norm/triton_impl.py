"""Group LayerNorm as Triton kernels (forward and backward), wrapped in an ``autograd.Function``.

Imported only when ``impl="triton"`` is used (``recfm`` imports without Triton). Same math as
:mod:`.reference`: statistics and affine in float32, output in ``x``'s dtype.

Forward, one program per tile of ``BLOCK_N`` rows (``BLOCK_D`` = next power of two >= d, masked)::

    x tile [BLOCK_N, BLOCK_D] -> mean, rstd [BLOCK_N] (saved, float32) -> y = xhat * weight[g] + bias[g]

Backward, ``P`` programs of ``TILES`` consecutive tiles each (``TILES`` a power of two, so few compiled
variants; tiles past the end are fully masked)::

    dx    = rstd * (w dy - mean(w dy) - xhat * mean(w dy xhat))           written per tile
    dW[g] += sum over the tile's rows of group g of dy * xhat             into partial[p, g, :] (float32)
    dB[g] += sum over the tile's rows of group g of dy

With a ``gate`` (HSTU's ``GLN(O) * U``) the forward multiplies by it before the store, and the backward
first forms ``dgate = dy * GLN(x)`` and ``dy <- dy * gate``: the normalised tensor is never written to
memory nor kept for the backward.

With ``add`` (a residual stream's pending branch, HSTU layers' ``defer_residual``) the forward loads ``x`` and
``add``, writes their sum ``s`` and normalises it; ``s`` is what the backward reads and what ``pass_through``
returns, and the backward's ``dx`` is the gradient of both ``x`` and ``add``: the separate sum over ``[N, d]``
(and one read of its result) is gone.

With ``pass_through`` the function also returns ``x`` itself (a layer's residual path): autograd then hands
that path's gradient to this backward, which adds it to ``dx`` in the same pass instead of a separate sum of
two full-size gradients.

Program ``p`` is the only writer of ``partial[p]`` (no atomics, deterministic); a tile visits the groups
between the least and the greatest of its rows (one for most tiles), so it costs one partial update per
group in that range. Up to 64 groups the buffer is not zero-filled as a whole: a first kernel
(:func:`_gln_mark`) reads the groups of each program's rows, marks the rows the program will update in the
bits of one int64 (``TOUCHED[p]``: one or two of the ``G`` for most programs) and zeroes those. A last kernel
sums the partials over programs into ``[splits, 2, G, d]``, reading only marked rows, and ``sum(0)`` over
the splits gives the ``[G, d]`` gradients. (A zero fill and ``partial.sum(0)`` of the whole buffer took
~0.5 ms per training step of the medium preset on an H100; tracking the rows inside the backward kernel
cost it 2-23 registers per thread and an occupancy step.)
The gated backward declares its tile offsets multiples of 4 (:func:`_bwd_vec4`): its tiles then share the
float32 partial rows' store layout. No host synchronisation anywhere (grid sizes come from host-side shapes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from recfm.kernels.interpreter import index_fix


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _rowsum(x):
    """Sum over axis 1 (``tl.reduce`` with a local combine function, so the module also runs under the
    interpreter when Triton itself was imported before ``TRITON_INTERPRET`` was set)."""
    return tl.reduce(x, 1, _add)


@triton.jit
def _gln_fwd(X, GROUP, W, B, GATE, Y, MEAN, RSTD, ADD, SUM, n_rows, d, eps, GATE_S,
             HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < d
    ok = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * d + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_ADD:  # the rows normalised are x + add, stored (rounded as the backward reads them back)
        s = (x + tl.load(ADD + rows64[:, None] * d + cols[None, :], mask=ok, other=0.0).to(tl.float32))
        s = s.to(SUM.dtype.element_ty)
        tl.store(SUM + rows64[:, None] * d + cols[None, :], s, mask=ok)
        x = s.to(tl.float32)
    mean = _rowsum(x) / d
    xc = tl.where(ok, x - mean[:, None], 0.0)
    var = _rowsum(xc * xc) / d
    rstd = 1.0 / tl.sqrt(var + eps)
    g = tl.load(GROUP + rows, mask=row_ok, other=0)
    w = tl.load(W + g[:, None] * d + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w
    if HAS_BIAS:
        y += tl.load(B + g[:, None] * d + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_GATE:
        y *= tl.load(GATE + rows64[:, None] * GATE_S + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + rows64[:, None] * d + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _gln_bwd(X, GROUP, W, B, GATE, DY, MEAN, RSTD, DX, DGATE, PART_W, PART_B, RES, n_rows, d, GATE_S,
             N_GROUPS: tl.constexpr, TILES: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr,
             HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, VEC4: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < d
    part = pid.to(tl.int64) * N_GROUPS * d
    for i in range(0, TILES):
        rows = (pid * TILES + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        ok = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        offs = rows64 * d + cols[None, :]
        if VEC4:  # (see _bwd_vec4)
            offs = tl.multiple_of(offs, [1, 4])
        # every load of the tile is issued before its first store: a load after a store waits for it (the gate's
        # after dgate's store cost the gated form ~40 us of ~350 per call at the medium step's shape on an H100)
        x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_GATE:
            goffs = rows64 * GATE_S + cols[None, :]
            if VEC4:
                goffs = tl.multiple_of(goffs, [1, 4])
            gate = tl.load(GATE + goffs, mask=ok, other=0.0)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        g = tl.load(GROUP + rows, mask=row_ok, other=-1)
        woffs = tl.maximum(g, 0)[:, None] * d + cols[None, :]  # the rows' groups' parameter rows
        w = tl.load(W + woffs, mask=ok, other=0.0).to(tl.float32)
        if HAS_GATE and HAS_BIAS:
            bias = tl.load(B + woffs, mask=ok, other=0.0).to(tl.float32)
        xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_GATE:  # y = GLN(x) * gate: dgate = dy * GLN(x), and GLN's upstream gradient is dy * gate
            normed = xhat * w
            if HAS_BIAS:
                normed += bias
            tl.store(DGATE + offs, (dy * normed).to(DGATE.dtype.element_ty), mask=ok)
            dy = dy * gate.to(tl.float32)
        wdy = w * dy
        c1 = _rowsum(xhat * wdy) / d
        c2 = _rowsum(wdy) / d
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_RES:  # x's other gradient (the residual path of pass_through), summed here instead of by autograd
            # (loaded here, not with the others: that cost the plain form ~30 us of ~250 per call, 112 registers
            # instead of 96 and one program per SM fewer)
            dx += tl.load(RES + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=ok)
        dw_rows = dy * xhat
        # the groups of the tile's valid rows lie in [g_lo, g_hi]: one pass per group in that range (most
        # tiles hold one group), instead of a presence test per group of the model
        g_lo = tl.min(tl.where(row_ok, g, N_GROUPS), 0)
        g_hi = tl.max(g, 0)
        for gg in range(g_lo, g_hi + 1):
            sel = g == gg
            pw = PART_W + part + gg * d + cols
            tl.store(pw, tl.load(pw, mask=col_ok, other=0.0)
                     + tl.reduce(tl.where(sel[:, None], dw_rows, 0.0), 0, _add), mask=col_ok)
            if HAS_BIAS:
                pb = PART_B + part + gg * d + cols
                tl.store(pb, tl.load(pb, mask=col_ok, other=0.0)
                         + tl.reduce(tl.where(sel[:, None], dy, 0.0), 0, _add), mask=col_ok)


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _gln_mark(GROUP, PART_W, PART_B, TOUCHED, n_rows, d, N_GROUPS: tl.constexpr, TILES: tl.constexpr,
              HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """Before the backward (up to 64 groups): the partial rows program ``pid`` of :func:`_gln_bwd` will update --
    for each of its tiles the groups from the least to the greatest of its rows -- as the bits of ``TOUCHED[pid]``,
    and those rows zeroed (the others are neither written nor read)."""
    pid = tl.program_id(0)
    rows = (pid * TILES + tl.arange(0, TILES)[:, None]) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    ok = rows < n_rows
    g = tl.load(GROUP + rows, mask=ok, other=-1)
    lo = tl.min(tl.where(ok, g, N_GROUPS), 1)  # per tile, as in the backward
    hi = tl.max(g, 1)
    span = hi - lo + 1  # <= 0 for a tile past the end
    one = tl.full([TILES], 1, tl.int64)
    run = tl.where(span >= 64, -1, (one << tl.minimum(tl.maximum(span, 0), 63)) - 1)
    bits = tl.where(span > 0, run << tl.minimum(tl.maximum(lo, 0), 63), 0)
    mask = tl.reduce(bits, 0, _bit_or)
    tl.store(TOUCHED + pid, mask)
    cols = tl.arange(0, BLOCK_D)
    zeros = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for g0 in range(0, N_GROUPS, BLOCK_G):
        gs = g0 + tl.arange(0, BLOCK_G)
        hit = (((mask >> gs) & 1) != 0) & (gs < N_GROUPS)
        offs = (pid.to(tl.int64) * N_GROUPS + gs)[:, None] * d + cols[None, :]
        m = hit[:, None] & (cols < d)[None, :]
        tl.store(PART_W + offs, zeros, mask=m)
        if HAS_BIAS:
            tl.store(PART_B + offs, zeros, mask=m)


@triton.jit
def _gln_partial_sum(PART_W, PART_B, TOUCHED, OUT, programs, per_split, d, N_GROUPS: tl.constexpr,
                     HAS_BIAS: tl.constexpr, TRACK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK: tl.constexpr):
    """Columns ``[pid0 * BLOCK, +BLOCK)`` of group ``pid1``, summed over programs ``[pid2 * per_split, +per_split)``
    of the backward's partials (with ``TRACK`` only those whose ``TOUCHED`` bit is set: the others never wrote
    the row), ``BLOCK_P`` programs' rows per load, into ``OUT[pid2, 0 (weight) / 1 (bias), group]``."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < d
    g = tl.program_id(1)
    p0 = tl.program_id(2) * per_split
    p_end = tl.minimum(p0 + per_split, programs)
    acc_w = tl.zeros([BLOCK_P, BLOCK], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_P, BLOCK], dtype=tl.float32)
    for start in range(p0, p_end, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        p_ok = p < p_end
        if TRACK:
            p_ok = p_ok & (((tl.load(TOUCHED + p, mask=p_ok, other=0) >> g) & 1) != 0)
        row = (p.to(tl.int64) * N_GROUPS + g)[:, None] * d + cols[None, :]
        m = p_ok[:, None] & ok[None, :]
        acc_w += tl.load(PART_W + row, mask=m, other=0.0)
        if HAS_BIAS:
            acc_b += tl.load(PART_B + row, mask=m, other=0.0)
    out = (tl.program_id(2).to(tl.int64) * 2 * N_GROUPS + g) * d + cols
    tl.store(OUT + out, tl.reduce(acc_w, 0, _add), mask=ok)
    tl.store(OUT + out + N_GROUPS * d, tl.reduce(acc_b, 0, _add), mask=ok)


def _blocks(d: int) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_D, num_warps)``: about 2048 elements per tile (H100, d 768, a training batch's group
    layout: with 8 backward programs per SM, forward + backward of the gated form 0.834 -> 0.689 ms and of the plain
    one 0.469 -> 0.463 against 4096 elements and 4 programs per SM; docs/benchmarks.md, run 11)."""
    block_d = triton.next_power_of_2(max(d, 1))
    block_n = max(1, min(16, 2048 // block_d))
    num_warps = 4 if block_d <= 1024 else 8
    return block_n, block_d, num_warps


# the backward's programs (each a run of tiles with its own gradient partials), per SM: in the medium training step
# as a CUDA graph (H100, 2026-11-24), 16 took 39.7 ms per step in four runs against 40.1 in four for 8 (4: 40.3,
# 32: 40.0); the isolated benchmark of run 11 had preferred 8 by less than its noise (docs/benchmarks.md, run 14)
BWD_PROGRAMS_PER_SM = 16


SUM_BLOCK_P = 8  # programs' partial rows per load of the partials' sum


def _sum_grid(programs: int, n_groups: int, d: int, x: torch.Tensor) -> tuple[int, int, int]:
    """``(BLOCK, splits, programs per split)`` of the partials' sum: about four programs per SM (the interpreter: two
    splits)."""
    block = min(256, triton.next_power_of_2(max(d, 1)))
    slots = triton.cdiv(d, block) * n_groups
    target = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 2 * slots
    splits = max(1, min(programs, target // slots))
    per_split = triton.cdiv(programs, splits)
    return block, triton.cdiv(programs, per_split), per_split


def _bwd_vec4(d: int, gate: torch.Tensor | None) -> bool:
    """Whether the backward declares its tile offsets multiples of 4 (true when ``d`` and the gate's row stride
    are): Triton then lays the tiles out 4 elements per thread (8-byte loads of 16-bit rows) instead of 8, the
    layout of the float32 partial rows' 16-byte stores, which otherwise cost an exchange through shared memory
    (two barriers) per group and tile. The gated form gains (276 against 306 us per call at the medium step's
    shape on an H100, 127 -> 80 registers); the plain one loses ~15 us of ~253 there, so it keeps 8."""
    return gate is not None and d % 4 == 0 and gate.stride(0) % 4 == 0


def _tiles_per_program(x: torch.Tensor, n_tiles: int) -> int:
    """A power of two such that about ``BWD_PROGRAMS_PER_SM x SMs`` programs cover ``n_tiles`` (CPU interpreter: 4
    programs)."""
    target = BWD_PROGRAMS_PER_SM * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    return min(triton.next_power_of_2(triton.cdiv(max(n_tiles, 1), target)), 256)


class _GroupLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, weight, bias, eps, gate, out_dtype, pass_through, add):
        n, d = x.shape
        x_in = x
        x, group, weight_c = x.contiguous(), group.contiguous(), weight.contiguous()
        add_c = add.contiguous() if add is not None else None
        # with add the rows normalised are their sum, written by the kernel: it takes x's place from here on
        total = torch.empty(n, d, dtype=torch.result_type(x, add), device=x.device) if add is not None else None
        bias_c = bias.contiguous() if bias is not None else None
        gate_c = _rows(gate) if gate is not None else None  # a column slice is read in place (row stride)
        y = torch.empty(n, d, dtype=out_dtype or (x if total is None else total).dtype, device=x.device)
        mean = torch.empty(n, dtype=torch.float32, device=x.device)
        rstd = torch.empty(n, dtype=torch.float32, device=x.device)
        block_n, block_d, warps = _blocks(d)
        if n:
            _gln_fwd[(triton.cdiv(n, block_n),)](
                x, group, weight_c, _or(bias_c, weight_c), _or(gate_c, x), y, mean, rstd, _or(add_c, x),
                _or(total, x), n, d, eps, _stride(gate_c), HAS_BIAS=bias_c is not None, HAS_GATE=gate_c is not None,
                HAS_ADD=add_c is not None, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps,
            )
        ctx.add_dtypes = (x_in.dtype, add.dtype) if add is not None else None  # x's and add's gradients: the sum's
        if total is not None:
            x = x_in = total
        ctx.save_for_backward(x, group, weight_c, bias_c, gate_c, mean, rstd)
        ctx.set_materialize_grads(False)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        if pass_through:  # x itself as a second output: its gradient comes back to this backward (module docstring)
            return y, x_in
        return y

    @staticmethod
    def backward(ctx, dy, dres=None):
        x, group, weight, bias, gate, mean, rstd = ctx.saved_tensors
        if dy is None:  # only the passed-through x was used
            return _inputs_grad(ctx, dres, (None,) * 7)
        n, d = x.shape
        n_groups = weight.shape[0]
        dy = dy.contiguous()
        dres = dres.contiguous() if dres is not None else None
        dx = torch.empty_like(x)
        dgate = torch.empty(n, d, dtype=gate.dtype, device=x.device) if gate is not None else None
        block_n, block_d, warps = _blocks(d)
        n_tiles = triton.cdiv(n, block_n)
        tiles = _tiles_per_program(x, n_tiles)
        programs = max(1, triton.cdiv(n_tiles, tiles))
        # up to 64 groups a first kernel marks each program's partial rows (bits of one int64) and zeroes only those,
        # and the sum reads only those; beyond, the partials are zero-filled and summed whole
        track = n_groups <= 64
        part_w = _scratch((programs, n_groups, d), not track, x.device)
        part_b = _scratch((programs, n_groups, d), not track, x.device) if bias is not None else part_w
        touched = torch.empty(programs, dtype=torch.int64, device=x.device)
        sum_block, splits, per_split = _sum_grid(programs, n_groups, d, x)
        sums = _scratch((splits, 2, n_groups, d), not n, x.device)  # every element written when there are rows
        if n:
            index_fix()  # the tile's group range bounds a loop
            if track:
                _gln_mark[(programs,)](
                    group, part_w, part_b, touched, n, d, N_GROUPS=n_groups, TILES=tiles, HAS_BIAS=bias is not None,
                    BLOCK_N=block_n, BLOCK_G=8, BLOCK_D=block_d, num_warps=4,
                )
            _gln_bwd[(programs,)](
                x, group, weight, _or(bias, weight), _or(gate, x), dy, mean, rstd, dx, _or(dgate, dx),
                part_w, part_b, _or(dres, dy), n, d, _stride(gate), N_GROUPS=n_groups, TILES=tiles,
                HAS_BIAS=bias is not None, HAS_GATE=gate is not None, HAS_RES=dres is not None, BLOCK_N=block_n,
                BLOCK_D=block_d, VEC4=_bwd_vec4(d, gate), num_warps=warps,
            )
            _gln_partial_sum[(triton.cdiv(d, sum_block), n_groups, splits)](
                part_w, part_b, touched, sums, programs, per_split, d, N_GROUPS=n_groups,
                HAS_BIAS=bias is not None, TRACK=track, BLOCK_P=SUM_BLOCK_P, BLOCK=sum_block, num_warps=4,
            )
        param_grads = sums.sum(0) if splits > 1 else sums[0]  # [2 (weight, bias), G, d]
        dw = param_grads[0].to(ctx.dtypes[0])
        db = param_grads[1].to(ctx.dtypes[1]) if bias is not None else None
        return _inputs_grad(ctx, dx, (None, dw, db, None, dgate, None, None))


def _inputs_grad(ctx, dx: torch.Tensor, others: tuple) -> tuple:
    """The backward's gradients: ``dx`` for ``x`` (and for ``add``, in their dtypes: the sum's gradient), ``others``
    for the inputs between them."""
    if ctx.add_dtypes is None:
        return dx, *others, None
    return dx.to(ctx.add_dtypes[0]), *others, dx.to(ctx.add_dtypes[1])


def _scratch(shape: tuple[int, ...], zeroed: bool, device: torch.device) -> torch.Tensor:
    """A float32 work buffer: zero-filled, or left uninitialised where every element read was written first."""
    return (torch.zeros if zeroed else torch.empty)(shape, dtype=torch.float32, device=device)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` [N, d] if its columns are contiguous (any row stride, e.g. a column slice), else a contiguous copy."""
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def _stride(t: torch.Tensor | None) -> int:
    """Row stride of an optional [N, d] input (0 when absent)."""
    return 0 if t is None else t.stride(0)


def _or(t: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """A pointer for an absent optional input (never read: its HAS_* flag is off)."""
    return placeholder if t is None else t


def group_layer_norm_triton(
    x: torch.Tensor,
    group: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    gate: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    pass_through: bool = False,
    add: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``x [N, d]``, ``group [N]`` int64, ``weight``/``bias [G, d]``, ``gate [N, d]`` or None -> ``[N, d]``
    in ``out_dtype`` (default ``x``'s): ``GLN(x)``, times ``gate`` when given (one kernel each way). The
    gate may be a column slice of a wider tensor: it is read in place. ``pass_through``: also return ``x``
    itself, whose gradient the backward kernel then adds to its own (``HAS_RES``). ``add``: normalise
    ``x + add`` instead, written by the forward kernel (``HAS_ADD``) and passed through in ``x``'s place.

    Inputs already validated by :func:`recfm.kernels.group_layer_norm.group_layer_norm`. Runs on CUDA,
    or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
    """
    return _GroupLayerNorm.apply(x, group, weight, bias, float(eps), gate, out_dtype, pass_through, add)

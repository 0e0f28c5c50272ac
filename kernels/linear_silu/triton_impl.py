"""The HSTU projection with a fused backward: cuBLAS matmuls, one Triton pass per part for the elementwise work.

Imported only when ``impl="triton"`` is used. Forward (no kernel of ours)::

    pre = x @ W^T + b          one addmm in the compute dtype (autocast's, else x's); saved
    y   = SiLU(pre)            on the flagged parts; the parts are column views of y

Backward, for each part ``i`` with incoming gradient ``dy_i`` (its own ``[N, size_i]`` tensor)::

    dpre[:, part i] = dy_i * SiLU'(pre[:, part i])      (dy_i where the part has no SiLU)
    db[part i]      = column sums of it                 (float32 partials, one row per program, then summed)

in one kernel that reads ``dy_i`` and ``pre`` once and writes ``dpre`` once; then ``dx = dpre @ W`` and
``dW = dpre^T @ x`` are one matmul each over all parts. ``SiLU'(p) = s (1 + p (1 - s))``, ``s = sigmoid(p)``,
in float32. A program keeps a ``[rows, columns]`` accumulator and sums its rows once at the end (a sum across
warps per loaded tile cost ~10% of the pass). One part without SiLU (an output projection, e.g. HSTU's
``W_out``) is read as it is: ``dy`` serves as ``dpre`` and the kernel only sums its columns, which is ~1.5x
faster than autograd's ``sum(0)`` over a bf16 gradient. No host synchronisation: grid sizes come from shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from recfm.kernels.interpreter import index_fix
from recfm.kernels.linear_silu import autocast_dtype


@triton.jit
def _silu_grad(DY, PRE, DPRE, PART, n_rows, rows_per_program, width, DY_S, PRE_S, DPRE_S, PART_S,
               SILU: tl.constexpr, STORE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Columns ``[pid0 * BLOCK_C, +BLOCK_C)`` of one part over rows ``[pid1 * rows_per_program, +rows_per_program)``:
    ``dpre = dy * SiLU'(pre)`` stored (unless ``STORE`` is off: ``dy`` itself serves as ``dpre``), its column sums
    stored as row ``pid1`` of ``PART``."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < width
    r_start = tl.program_id(1) * rows_per_program
    r_end = tl.minimum(r_start + rows_per_program, n_rows)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)  # summed over rows once, after the loop
    for r in range(r_start, r_end, BLOCK_R):
        rows = (r + tl.arange(0, BLOCK_R)).to(tl.int64)
        ok = (rows < r_end)[:, None] & col_ok[None, :]
        g = tl.load(DY + rows[:, None] * DY_S + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if SILU:
            p = tl.load(PRE + rows[:, None] * PRE_S + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            s = tl.sigmoid(p)
            g = g * (s * (1.0 + p * (1.0 - s)))
        if STORE:
            tl.store(DPRE + rows[:, None] * DPRE_S + cols[None, :], g.to(DPRE.dtype.element_ty), mask=ok)
        acc += g
    tl.store(PART + tl.program_id(1) * PART_S + cols, tl.sum(acc, axis=0), mask=col_ok)


BLOCK_R = 32
# the column sums alone (one part without SiLU: nothing stored): rows per load, warps, programs per SM. H100, a
# [79053, 768] bf16 gradient: 57 us (2.1 TB/s; 32 rows: 62 us, 128 rows in 8 warps: 59 us; torch's sum(0): 89 us)
SUM_BLOCK_R, SUM_WARPS, SUM_PROGRAMS_PER_SM = 64, 4, 4


def _grid(n: int, width: int, device: torch.device, block_r: int = BLOCK_R,
          per_sm: int = 4) -> tuple[int, int, int]:
    """``(BLOCK_C, row_programs, rows_per_program)``: about ``per_sm`` programs per SM over the widest part (the
    interpreter: a few programs)."""
    block_c = min(128, triton.next_power_of_2(max(width, 1)))
    target = per_sm * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    col_blocks = triton.cdiv(width, block_c)
    programs = max(1, min(triton.cdiv(max(n, 1), block_r), triton.cdiv(target, col_blocks)))
    per_program = triton.cdiv(triton.cdiv(max(n, 1), programs), block_r) * block_r
    return block_c, triton.cdiv(max(n, 1), per_program), per_program


class _LinearSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, silu, dtype, *params):
        count = len(params) // 2
        weights, biases = params[:count], params[count:]
        xc = x.to(dtype)
        # stacked and cast in one kernel each (a cast per weight, then a cat, is three)
        weight = _cat_to(weights, dtype)
        with torch.autocast(x.device.type, enabled=False):
            if biases[0] is None:
                pre = xc @ weight.t()
            else:
                bias = _cat_to(biases, dtype)
                pre = torch.addmm(bias, xc, weight.t())
            if all(silu):
                y = F.silu(pre)
            elif any(silu):
                y = torch.cat([F.silu(p) if act else p for p, act in zip(pre.split(list(sizes), 1), silu)], 1)
            else:
                y = pre
        ctx.save_for_backward(xc, weight, pre if any(silu) else None)  # the pre-activation serves SiLU' only
        ctx.sizes, ctx.silu = sizes, silu
        ctx.rows = [w.shape[0] for w in weights]
        ctx.dtypes = [w.dtype for w in weights], [None if b is None else b.dtype for b in biases]
        return tuple(y.split(list(sizes), 1))

    @staticmethod
    def backward(ctx, *grads):
        xc, weight, pre = ctx.saved_tensors
        n, width = xc.shape[0], sum(ctx.sizes)
        grads = [dy if dy.stride(1) == 1 else dy.contiguous() for dy in grads]
        # one part without SiLU (an output projection): its gradient is dpre as it is, the kernel only sums columns
        direct = len(grads) == 1 and not ctx.silu[0]
        dpre = grads[0] if direct else torch.empty(n, width, dtype=xc.dtype, device=xc.device)
        block_r, warps, per_sm = (SUM_BLOCK_R, SUM_WARPS, SUM_PROGRAMS_PER_SM) if direct else (BLOCK_R, 4, 4)
        block_c, programs, per_program = _grid(n, max(ctx.sizes), xc.device, block_r, per_sm)
        # every program writes its row of every part's columns; zeros only when there is no row to launch for
        part = (torch.empty if n else torch.zeros)(programs, width, dtype=torch.float32, device=xc.device)
        if n:
            index_fix()  # the row range bounds a loop
            col = 0
            for dy, size, act in zip(grads, ctx.sizes, ctx.silu):
                _silu_grad[(triton.cdiv(size, block_c), programs)](
                    dy, dy if pre is None else pre[:, col:], dpre[:, col:], part[:, col:], n, per_program, size,
                    dy.stride(0), 0 if pre is None else pre.stride(0), dpre.stride(0), part.stride(0),
                    SILU=act, STORE=not direct, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
                )
                col += size
        w_needs = ctx.needs_input_grad[4:4 + len(ctx.rows)]
        b_needs = ctx.needs_input_grad[4 + len(ctx.rows):]
        dx = dpre @ weight if ctx.needs_input_grad[0] else None
        dws = [None] * len(ctx.rows)
        if any(w_needs):
            dw = dpre.t() @ xc
            if len(set(ctx.dtypes[0])) == 1:  # one cast for all weights
                dw = dw.to(ctx.dtypes[0][0])
            dws = [d.to(t) if need else None for d, t, need in zip(dw.split(ctx.rows, 0), ctx.dtypes[0], w_needs)]
        dbs = [None] * len(ctx.rows)
        if any(b_needs):
            dbs = [d.to(t) if need else None for d, t, need in zip(part.sum(0).split(ctx.rows), ctx.dtypes[1], b_needs)]
        return (dx, None, None, None, *dws, *dbs)


def _cat_to(tensors, dtype: torch.dtype) -> torch.Tensor:
    """``torch.cat(tensors)`` in ``dtype``: one kernel that stacks and casts."""
    if len(tensors) == 1:
        return tensors[0].to(dtype)
    out = torch.empty(sum(t.shape[0] for t in tensors), *tensors[0].shape[1:], dtype=dtype, device=tensors[0].device)
    return torch.cat(tensors, out=out)


def linear_silu_triton(x, weights, biases, sizes, silu) -> tuple[torch.Tensor, ...]:
    """See :func:`recfm.kernels.linear_silu.linear_silu` (inputs already validated). CUDA tensors, or CPU
    tensors under ``TRITON_INTERPRET=1`` (tests)."""
    return _LinearSiLU.apply(x, tuple(sizes), tuple(silu), autocast_dtype(x) or x.dtype, *weights, *biases)

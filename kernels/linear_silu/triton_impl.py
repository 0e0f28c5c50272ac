"""The HSTU projection in Triton: the forward's matmul with the SiLU in its epilogue, a fused elementwise backward.

Imported only when ``impl="triton"`` is used. Forward, in the compute dtype (autocast's, else x's)::

    pre = x @ W^T + b          saved for the backward
    y   = SiLU(pre)            on the flagged parts; the parts are column views of y

as one persistent Triton matmul (:func:`_mm_silu`: TMA tiles of ``x`` and ``W``, a float32 accumulator per
``[128, 256]`` output tile, the bias added and both ``pre`` and ``y`` stored from its epilogue) on GPUs with
TMA (compute capability 9+) for 16-bit inputs, and under the interpreter; otherwise (and when a stride is
not TMA-aligned) cuBLAS's addmm and ``F.silu``. The separate SiLU pass read ``pre`` back and wrote ``y`` (about
a third of the matmul's time at the medium preset's shape, one H100: addmm + ``F.silu`` 876 us, the fused
kernel 762). ``y`` is ``SiLU`` of the rounded ``pre``, as ``F.silu(pre)`` is; on the GPU its sigmoid comes from
the hardware's tanh (``SiLU(p) = h + h tanh(h)``, ``h = p / 2``, ``tanh.approx.f32``: relative error ~2^-11,
below bf16's rounding), one special-function instruction per element instead of two.

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

from recfm.kernels.hstu_attention.triton_common import tanh_approx
from recfm.kernels.interpreter import index_fix, interpreting
from recfm.kernels.linear_silu import autocast_dtype

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: cuBLAS and F.silu
    TensorDescriptor = None


@triton.jit
def _mm_silu_store(acc, B, ACT, PRE, Y, row, col, n_cols, HAS_BIAS: tl.constexpr, ACT_MODE: tl.constexpr,
                   FAST: tl.constexpr, BLOCK: tl.constexpr):
    """One ``[BM, BLOCK]`` piece of an output tile (columns from ``col``): the bias added, ``pre`` stored, and
    ``y = SiLU(pre)`` (``ACT_MODE`` 1: every column; 2: the columns whose ``ACT`` flag is set, the others
    ``pre`` as it is) stored, SiLU taken of the rounded ``pre``."""
    cols = col + tl.arange(0, BLOCK)
    if HAS_BIAS:
        acc = acc + tl.load(B + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    pre = acc.to(PRE.dtype)
    PRE.store([row, col], pre)
    p = pre.to(tl.float32)
    h = 0.5 * p
    if FAST:
        y = h + h * tanh_approx(h)
    else:
        y = p * tl.sigmoid(p)
    if ACT_MODE == 2:
        act = tl.load(ACT + cols, mask=cols < n_cols, other=0)
        y = tl.where((act != 0)[None, :], y, p)
    Y.store([row, col], y.to(Y.dtype))


@triton.jit
def _mm_silu(X, W, PRE, Y, B, ACT, n_rows, n_cols, k, programs, HAS_BIAS: tl.constexpr, ACT_MODE: tl.constexpr,
             FAST: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             GROUP_M: tl.constexpr):
    """``pre = X W^T + B`` and ``y = SiLU(pre)`` (descriptors ``X`` [n_rows, k], ``W`` [n_cols, k], ``PRE`` and
    ``Y`` [n_rows, n_cols] in blocks of ``[BM, BN / 4]``): ``programs`` persistent programs take the
    ``[BM, BN]`` output tiles in turn, ``GROUP_M`` row tiles side by side (so a group's tiles share ``W``'s
    and ``X``'s blocks in L2); the epilogue stores each tile in four column quarters (fewer live registers).
    ``UPCAST``: the operands go to float32 before the dot (the interpreter's 16-bit dot is wrong)."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(n_rows, BM)
    tiles_n = tl.cdiv(n_cols, BN)
    per_group = GROUP_M * tiles_n
    for tile in tl.range(pid, tiles_m * tiles_n, programs, flatten=True):
        first_m = (tile // per_group) * GROUP_M
        rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
        row = (first_m + tile % rows_in_group) * BM
        col = ((tile % per_group) // rows_in_group) * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kk in range(0, k, BK):
            a = X.load([row, kk])
            b = W.load([col, kk])
            if UPCAST:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32).T, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b.T, acc)
        # four column quarters: [BM, BN] -> [BM, BN/2] x 2 -> [BM, BN/4] x 4
        h0, h1 = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
        q0, q1 = tl.split(tl.permute(tl.reshape(h0, (BM, 2, BN // 4)), (0, 2, 1)))
        _mm_silu_store(q0, B, ACT, PRE, Y, row, col, n_cols, HAS_BIAS, ACT_MODE, FAST, BN // 4)
        _mm_silu_store(q1, B, ACT, PRE, Y, row, col + BN // 4, n_cols, HAS_BIAS, ACT_MODE, FAST, BN // 4)
        q2, q3 = tl.split(tl.permute(tl.reshape(h1, (BM, 2, BN // 4)), (0, 2, 1)))
        _mm_silu_store(q2, B, ACT, PRE, Y, row, col + BN // 2, n_cols, HAS_BIAS, ACT_MODE, FAST, BN // 4)
        _mm_silu_store(q3, B, ACT, PRE, Y, row, col + 3 * BN // 4, n_cols, HAS_BIAS, ACT_MODE, FAST, BN // 4)


# the fused forward's tiles: H100, [81000, 768] x [768, 3072] bf16 with bias (the medium preset's projection): 762 us
# against 876 for cuBLAS's addmm and F.silu; 128 x 256 x 64 in 4 stages, 8 warps, the epilogue in column quarters
# (halves: 770, whole tiles in 3 stages: 913; 256 x 128: 784-840; exact sigmoid instead of tanh.approx: 843). With
# per-column flags (parts with and without SiLU) the epilogue's flag load and select cost ~100 us more there (835)
MM_BM, MM_BN, MM_BK, MM_STAGES, MM_WARPS, MM_GROUP_M = 128, 256, 64, 4, 8, 8


def _tma_ok(t: torch.Tensor) -> bool:
    """A 2-d tensor TMA can address: unit column stride, 16-byte aligned start and row stride."""
    return (t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0
            and (t.stride(0) * t.element_size()) % 16 == 0)


def _fused_forward(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the forward runs :func:`_mm_silu`: 16-bit CUDA tensors on a GPU with TMA, or the interpreter
    (any float dtype: tests), TMA-addressable operands and results (``pre`` and ``y``: rows of ``weight.shape[0]``
    elements), and rows to compute."""
    if TensorDescriptor is None or x.shape[0] == 0 or (weight.shape[0] * x.element_size()) % 16:
        return False
    if not (_tma_ok(x) and _tma_ok(weight)):
        return False
    if x.is_cuda:
        return x.dtype in (torch.bfloat16, torch.float16) and torch.cuda.get_device_capability(x.device)[0] >= 9
    return interpreting()


def _mm_silu_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, sizes, silu):
    """``(pre, y)`` by :func:`_mm_silu` (``_fused_forward`` holds)."""
    n, k = x.shape
    width = weight.shape[0]
    pre = torch.empty(n, width, dtype=x.dtype, device=x.device)
    y = torch.empty_like(pre)
    bn = min(MM_BN, max(64, triton.next_power_of_2(width)))
    bk = min(MM_BK, max(16, triton.next_power_of_2(k)))
    act = None
    if not all(silu):
        act = torch.cat([torch.full((size,), int(a), dtype=torch.int8, device=x.device)
                         for size, a in zip(sizes, silu)])
    tiles = triton.cdiv(n, MM_BM) * triton.cdiv(width, bn)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    programs = min(tiles, sms)
    _mm_silu[(programs,)](
        TensorDescriptor.from_tensor(x, [MM_BM, bk]), TensorDescriptor.from_tensor(weight, [bn, bk]),
        TensorDescriptor.from_tensor(pre, [MM_BM, bn // 4]), TensorDescriptor.from_tensor(y, [MM_BM, bn // 4]),
        pre if bias is None else bias, pre if act is None else act, n, width, k, programs,
        HAS_BIAS=bias is not None, ACT_MODE=1 if act is None else 2, FAST=x.is_cuda,
        UPCAST=not x.is_cuda and x.dtype != torch.float32, BM=MM_BM, BN=bn, BK=bk, GROUP_M=MM_GROUP_M,
        num_stages=MM_STAGES, num_warps=MM_WARPS,
    )
    return pre, y


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
        bias = None if biases[0] is None else _cat_to(biases, dtype)
        with torch.autocast(x.device.type, enabled=False):
            if any(silu) and _fused_forward(xc, weight):
                pre, y = _mm_silu_forward(xc, weight, bias, sizes, silu)
            else:
                pre = xc @ weight.t() if bias is None else torch.addmm(bias, xc, weight.t())
                y = _silu_parts(pre, sizes, silu)
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


def _silu_parts(pre: torch.Tensor, sizes, silu) -> torch.Tensor:
    """``pre`` with ``F.silu`` on the columns of the flagged parts (cuBLAS's path)."""
    if all(silu):
        return F.silu(pre)
    if not any(silu):
        return pre
    return torch.cat([F.silu(p) if act else p for p, act in zip(pre.split(list(sizes), 1), silu)], 1)


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

"""HSTU attention over jagged samples: public dispatch function, argument checks, implementations.

Layout (B samples concatenated, no padding)::

    q:        [N_q, h,    d_qk]   N_q = N, or len(query_index) for target-only queries
    k:        [N,   h_kv, d_qk]   h % h_kv == 0 (GQA: query head g reads kv head g // (h / h_kv))
    v:        [N,   h_kv, d_v]
    offsets:  [B+1] int64         sample b owns rows offsets[b] : offsets[b+1]
    out:      [N_q, h,    d_v]

The math is in :mod:`.reference` (the specification); the mask in :mod:`recfm.foundation.model.mask`; the
bias bucketing in :mod:`recfm.foundation.model.bias`. ``impl`` picks the implementation from ``IMPLS``:

* ``reference`` -- plain PyTorch, one sample at a time (:mod:`.reference`); any device; the specification.
* ``triton`` -- fused forward/backward kernels (:mod:`.triton_impl`, design notes in docs/kernels.md);
  CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``. Triton is imported on first use.
* ``dense`` -- the batch padded to ``[B, max_len]`` with a dense mask (:mod:`.dense`): the plain PyTorch
  baseline of the benchmark; ``O(B * max_len^2)`` memory.

With ``query_index``, ``dense`` assumes each token appears at most once among the query rows (at most
``max_len`` queries per sample); ``reference`` and ``triton`` also accept repeated rows.
"""

from __future__ import annotations

import math

import torch

from recfm.errors import RecfmError
from recfm.foundation.model.mask import MaskMode
from recfm.kernels.hstu_attention.reference import Normaliser, hstu_attention_reference



def _triton(*args, **kwargs) -> torch.Tensor:
    """Lazy entry of the fused Triton kernels (imports Triton on first call)."""
    try:
        from recfm.kernels.hstu_attention.triton_impl import hstu_attention_triton
    except ImportError as err:
        raise RecfmError(f"hstu_attention: impl='triton' needs the triton package ({err})") from err

    return hstu_attention_triton(*args, **kwargs)


def _dense(*args, **kwargs) -> torch.Tensor:
    """Lazy entry of the padded dense PyTorch baseline."""
    from recfm.kernels.hstu_attention.dense import hstu_attention_dense

    return hstu_attention_dense(*args, **kwargs)


IMPLS = {"reference": hstu_attention_reference, "triton": _triton, "dense": _dense}

__all__ = ["IMPLS", "MaskMode", "Normaliser", "hstu_attention", "validate_jagged"]


def hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    *,
    max_len: int,
    token_type: torch.Tensor | None = None,
    timestamps: torch.Tensor | None = None,
    mask_mode: MaskMode | str = MaskMode.MIXED,
    pos_bias: torch.Tensor | None = None,
    time_bias: torch.Tensor | None = None,
    time_bucket_base: float = 2.0,
    alpha: float | None = None,
    normaliser: Normaliser | str = Normaliser.LENGTH,
    query_index: torch.Tensor | None = None,
    impl: str = "reference",
    validate: bool = True,
) -> torch.Tensor:
    """HSTU (SiLU, no softmax) attention with GQA, the dynamic mask and relative position/time bias.

    Args:
        q: ``[N_q, h, d_qk]`` queries (float).
        k: ``[N, h_kv, d_qk]`` keys, same dtype as ``q``.
        v: ``[N, h_kv, d_v]`` values, same dtype as ``q``.
        offsets: ``[B+1]`` int64, ``0 = offsets[0] <= ... <= offsets[B] = N``.
        max_len: host int, the longest sample (``>=`` every sample length: ``validate`` checks it; the Triton
            path sizes its grid and its bias cache by it).
        token_type: ``[N]`` integer :class:`~recfm.scenarios.spec.TokenType`; needed by the ``mixed`` mask.
            When given it also sets the event positions of the position bias (a target's position is the
            number of events it sees; see recfm.foundation.model.bias).
        timestamps: ``[N]`` int64 seconds; needed by the ``mixed`` mask and by ``time_bias``.
        mask_mode: ``mixed`` | ``causal`` | ``full``.
        pos_bias: ``[h or 1, 2P + 1]`` relative-position bias table, or ``None``.
        time_bias: ``[h or 1, K]`` log-time-gap bias table, or ``None``.
        time_bucket_base: log base of the time buckets (``> 1``).
        alpha: score scale; ``None`` = ``1 / sqrt(d_qk)``.
        normaliser: ``length`` | ``keys`` | ``max_len`` | ``none`` (see :class:`Normaliser`).
        query_index: ``[N_q]`` int64 rows (of the ``N`` tokens) that are queries, in ``q``'s row order; the
            rows need not be sorted. ``None`` = every token is a query.
        impl: a key of ``IMPLS``.
        validate: also check the *values* of offsets, token types and query rows (costs host syncs on a
            GPU); shapes, dtypes and devices are always checked. Everything is checked before any compute.

    Returns:
        ``[N_q, h, d_v]`` in ``q``'s dtype.

    Raises:
        RecfmError: naming the argument at fault.
    """
    mode, norm = _check_args(q, k, v, offsets, max_len, token_type, timestamps, mask_mode, pos_bias, time_bias,
                             time_bucket_base, normaliser, query_index, impl)
    if validate:
        validate_jagged(offsets, k.shape[0], max_len, token_type=token_type, query_index=query_index)
    return IMPLS[impl](
        q, k, v, offsets, max_len=max_len, token_type=token_type, timestamps=timestamps, mask_mode=mode,
        pos_bias=pos_bias, time_bias=time_bias, time_bucket_base=float(time_bucket_base),
        alpha=1.0 / math.sqrt(q.shape[2]) if alpha is None else float(alpha), normaliser=norm,
        query_index=query_index,
    )


def validate_jagged(
    offsets: torch.Tensor,
    num_tokens: int,
    max_len: int,
    *,
    token_type: torch.Tensor | None = None,
    query_index: torch.Tensor | None = None,
    where: str = "hstu_attention",
) -> None:
    """Check the values of a jagged layout (one host sync each); raise :class:`RecfmError` on the first fault.

    Offsets must start at 0, never decrease, end at ``num_tokens``; no sample longer than ``max_len``;
    token types in ``{0, 1, 2}``; query rows in ``[0, num_tokens)``.
    """
    off = offsets.tolist()
    if off[0] != 0 or off[-1] != num_tokens:
        raise RecfmError(f"{where}: offsets must start at 0 and end at N={num_tokens}, got {off[0]} .. {off[-1]}")
    lengths = [b - a for a, b in zip(off[:-1], off[1:])]
    if any(n < 0 for n in lengths):
        bad = next(i for i, n in enumerate(lengths) if n < 0)
        raise RecfmError(f"{where}: offsets must be non-decreasing, offsets[{bad + 1}] < offsets[{bad}]")
    if lengths and max(lengths) > max_len:
        raise RecfmError(f"{where}: max_len={max_len} but sample {lengths.index(max(lengths))} has {max(lengths)} tokens")
    if token_type is not None and token_type.numel() and (int(token_type.min()) < 0 or int(token_type.max()) > 2):
        raise RecfmError(f"{where}: token_type values must be 0 (H), 1 (R) or 2 (T)")
    if query_index is not None and query_index.numel():
        if int(query_index.min()) < 0 or int(query_index.max()) >= num_tokens:
            raise RecfmError(f"{where}: query_index values must be rows in [0, {num_tokens})")


def _check_args(q, k, v, offsets, max_len, token_type, timestamps, mask_mode, pos_bias, time_bias,
                time_bucket_base, normaliser, query_index, impl) -> tuple[MaskMode, Normaliser]:
    """Shapes, dtypes, devices and options (no host sync); raises :class:`RecfmError`."""

    def fail(message: str) -> None:
        raise RecfmError(f"hstu_attention: {message}")

    if impl not in IMPLS:
        fail(f"impl={impl!r} is not one of {sorted(IMPLS)}")
    try:
        mode = MaskMode(mask_mode)
        norm = Normaliser(normaliser)
    except ValueError as err:
        raise RecfmError(f"hstu_attention: {err}; mask_mode: {[m.value for m in MaskMode]}, "
                         f"normaliser: {[n.value for n in Normaliser]}") from None
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            fail(f"{name} must be a 3-d tensor [rows, heads, dim], got {getattr(t, 'shape', type(t))}")
        if not t.dtype.is_floating_point or t.dtype != q.dtype:
            fail(f"{name} has dtype {t.dtype}; q, k, v must share one floating dtype (q is {q.dtype})")
    n, h, h_kv = k.shape[0], q.shape[1], k.shape[1]
    if v.shape[0] != n or v.shape[1] != h_kv:
        fail(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree on rows and heads")
    if q.shape[2] != k.shape[2]:
        fail(f"q and k must share d_qk, got {q.shape[2]} and {k.shape[2]}")
    if h_kv < 1 or h % h_kv != 0:
        fail(f"k/v have {h_kv} heads, which does not divide q's {h} heads (num_heads % num_kv_heads must be 0)")
    if not isinstance(max_len, int) or max_len < 0:
        fail(f"max_len must be a host int >= 0, got {max_len!r}")
    if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.numel() < 1:
        fail("offsets must be a 1-d tensor [B+1]")
    if offsets.dtype != torch.int64:
        fail(f"offsets must be int64, got {offsets.dtype}")
    if query_index is None and q.shape[0] != n:
        fail(f"q has {q.shape[0]} rows but k has {n}; without query_index every token is a query")
    if query_index is not None:
        if query_index.dim() != 1 or query_index.dtype != torch.int64:
            fail(f"query_index must be a 1-d int64 tensor, got {query_index.dtype} {tuple(query_index.shape)}")
        if query_index.shape[0] != q.shape[0]:
            fail(f"query_index has {query_index.shape[0]} rows but q has {q.shape[0]}")
    if mode is MaskMode.MIXED and (token_type is None or timestamps is None):
        fail("mask_mode='mixed' needs token_type and timestamps")
    if time_bias is not None and timestamps is None:
        fail("time_bias needs timestamps")
    if pos_bias is not None and token_type is not None and timestamps is None:
        fail("pos_bias with token_type needs timestamps (event positions order R/T tokens by time)")
    if token_type is not None and (token_type.shape != (n,) or token_type.dtype.is_floating_point
                                   or token_type.dtype == torch.bool):
        fail(f"token_type must be an integer tensor [N={n}], got {token_type.dtype} {tuple(token_type.shape)}")
    if timestamps is not None and (timestamps.shape != (n,) or timestamps.dtype != torch.int64):
        fail(f"timestamps must be int64 [N={n}], got {timestamps.dtype} {tuple(timestamps.shape)}")
    for name, table in (("pos_bias", pos_bias), ("time_bias", time_bias)):
        if table is None:
            continue
        if table.dim() != 2 or table.shape[0] not in (1, h) or table.shape[1] < 1:
            fail(f"{name} must be [{h} or 1, buckets], got {tuple(table.shape)}")
        if not table.dtype.is_floating_point:
            fail(f"{name} must be floating, got {table.dtype}")
    if pos_bias is not None and pos_bias.shape[1] % 2 != 1:
        fail(f"pos_bias must have an odd number (2P + 1) of buckets, got {pos_bias.shape[1]}")
    if not time_bucket_base > 1:
        fail(f"time_bucket_base must be > 1, got {time_bucket_base}")
    named = {"q": q, "k": k, "v": v, "offsets": offsets, "token_type": token_type, "timestamps": timestamps,
             "pos_bias": pos_bias, "time_bias": time_bias, "query_index": query_index}
    for name, t in named.items():
        if t is not None and t.device != q.device:
            fail(f"{name} is on {t.device} but q is on {q.device}")
    return mode, norm

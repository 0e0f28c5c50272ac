"""HSTU attention in plain PyTorch: the specification the fused kernels are tested against.

For query ``i`` and key ``j`` of the same sample ``b`` (``L_b`` tokens), query head ``g``::

    A_ij = SiLU(alpha * q_i[g] . k_j[g // r] + pos_table[g, pb(p_i - p_j)] + time_table[g, tb(t_i - t_j)])
           * M_ij / n_i                                                   r = h / h_kv  (GQA)
    O_i[g] = sum_j A_ij v_j[g // r]

``M`` is :func:`recfm.foundation.model.mask.allowed`, ``pb``/``tb``/``p`` are the bucketings and event
positions of :mod:`recfm.foundation.model.bias` (a one-row table is shared by all heads). No softmax.
``n_i`` is the :class:`Normaliser`.

How it runs: one sample at a time, with dense ``[h, L_q, L_b]`` blocks, in float32 (float64 when the
inputs are float64, for gradcheck), on whatever device the inputs are on. Peak memory of one block is
``O(h * max_b L_b^2)``; what autograd keeps is ``O(h * sum_b L_q,b * L_b)`` -- never
``O(B * max_len^2)``. With target-only queries (``query_index``) only those rows are computed, so a
target layer costs ``O(L_T,b * L_b)`` per sample. Python loops over samples: this is a reference, not a
training kernel.
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F

from recfm.foundation.model.bias import bias_lookup, event_positions, position_buckets, sample_ids, time_buckets
from recfm.foundation.model.mask import MaskMode, sample_mask


class Normaliser(str, enum.Enum):
    """What ``n_i`` divides query ``i``'s attention weights by.

    * ``length`` -- ``L_b``, the query's own sample length (brief section 4; MTFM). Note: it counts every
      token of the sample, so a token's output depends on *how many* later R/T tokens its sample has
      (not on their content).
    * ``keys`` -- the number of keys query ``i`` may attend (the row sum of ``M``): a masked mean. Depends
      on nothing the mask hides, so outputs are exactly invariant to adding or removing hidden tokens
      (e.g. scoring a different number of candidates at serving time).
    * ``max_len`` -- the batch's ``max_len`` (as in some public code): outputs depend on the batch.
    * ``none`` -- 1.
    """

    LENGTH = "length"
    KEYS = "keys"
    MAX_LEN = "max_len"
    NONE = "none"


def hstu_attention_reference(
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
    """Reference HSTU attention over jagged samples (inputs already validated by the dispatcher).

    Args: as :func:`recfm.kernels.hstu_attention.hstu_attention`.

    Returns:
        ``[N_q, h, d_v]`` in ``q.dtype`` (``N_q = N`` without ``query_index``).
    """
    num_tokens, num_heads = k.shape[0], q.shape[1]
    group_size = num_heads // k.shape[1]
    out_dtype = q.dtype
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    pos_bias = None if pos_bias is None else pos_bias.to(dtype)
    time_bias = None if time_bias is None else time_bias.to(dtype)
    positions = event_positions(offsets, token_type, timestamps, num_tokens) if pos_bias is not None else None

    # Sort the query rows by sample so that each sample's queries are one contiguous slice.
    if query_index is None:
        query_index = torch.arange(num_tokens, device=k.device)
    query_sample = sample_ids(offsets, num_tokens)[query_index]
    order = torch.argsort(query_sample, stable=True)
    query_counts = torch.bincount(query_sample, minlength=offsets.numel() - 1)
    q_bounds = [0, *torch.cumsum(query_counts, 0).tolist()]
    bounds = offsets.tolist()

    outputs = []
    for b in range(len(bounds) - 1):
        start, end, q_start, q_end = bounds[b], bounds[b + 1], q_bounds[b], q_bounds[b + 1]
        if q_end == q_start:
            continue
        rows = order[q_start:q_end]  # positions in q / query_index of this sample's queries
        query_pos = query_index[rows] - start  # [L_q] positions inside the sample

        def local(values: torch.Tensor | None) -> torch.Tensor | None:
            return None if values is None else values[start:end]

        mask = sample_mask(mask_mode, end - start, local(token_type), local(timestamps), query_pos)  # [L_q, L]
        k_b = k[start:end].repeat_interleave(group_size, dim=1)  # [L, h, d_qk]
        v_b = v[start:end].repeat_interleave(group_size, dim=1)  # [L, h, d_v]
        scores = torch.einsum("qhd,khd->hqk", q[rows], k_b) * alpha  # [h, L_q, L]
        if pos_bias is not None:
            p = local(positions)
            scores = scores + bias_lookup(pos_bias, position_buckets(p[query_pos][:, None] - p[None, :], pos_bias.shape[1]))
        if time_bias is not None:
            t = local(timestamps)
            gap = t[query_pos][:, None] - t[None, :]
            scores = scores + bias_lookup(time_bias, time_buckets(gap, time_bias.shape[1], time_bucket_base))
        weights = F.silu(scores) * mask.to(dtype)
        if normaliser is Normaliser.LENGTH:
            weights = weights / (end - start)
        elif normaliser is Normaliser.KEYS:
            weights = weights / mask.sum(dim=1, keepdim=True).clamp(min=1).to(dtype)
        elif normaliser is Normaliser.MAX_LEN:
            weights = weights / max(max_len, 1)
        outputs.append(torch.einsum("hqk,khd->qhd", weights, v_b))  # [L_q, h, d_v]

    if not outputs:
        return q.new_zeros(query_index.numel(), num_heads, v.shape[2], dtype=out_dtype)
    out_sorted = torch.cat(outputs)  # query rows in `order`
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return out_sorted[inverse].to(out_dtype)

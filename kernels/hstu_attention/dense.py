"""HSTU attention as padded dense PyTorch: the "dense masked attention" baseline of the benchmark.

The batch is padded to ``[B, max_len]`` (queries to ``[B, max_len]`` slots too: with ``query_index`` a
sample's query rows fill its first slots in token order), the mask is built densely as
``[B, max_len, max_len]`` from :func:`recfm.foundation.model.mask.allowed`, the biases as
``[B, h, max_len, max_len]``; then two batched matmuls. GQA groups the ``h / h_kv`` query heads of a kv
head into the matmul's row dimension (no repeated K/V). Matmuls in the input dtype, scores, SiLU, mask
and normaliser in float32 (float64 for float64 inputs). Memory ``O(B * h * max_len^2)``; no host sync.

Query rows must be distinct tokens (a sample has at most ``max_len`` query slots).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recfm.foundation.model.bias import bias_lookup, event_positions, position_buckets, sample_ids, time_buckets
from recfm.foundation.model.mask import MaskMode, allowed
from recfm.kernels.hstu_attention.reference import Normaliser


def _pad(values: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor], shape: tuple[int, int], fill=0):
    """Scatter ``values`` ``[n, ...]`` into a new ``[*shape, ...]`` tensor at ``rows = (sample, slot)``."""
    out = values.new_full((*shape, *values.shape[1:]), fill)
    out[rows] = values
    return out


def hstu_attention_dense(
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
    """Padded dense HSTU attention (inputs already validated by the dispatcher).

    Args: as :func:`recfm.kernels.hstu_attention.hstu_attention`.

    Returns:
        ``[N_q, h, d_v]`` in ``q.dtype``.
    """
    num_samples, num_tokens, width = offsets.numel() - 1, k.shape[0], max(max_len, 1)
    h, h_kv, d_v = q.shape[1], k.shape[1], v.shape[2]
    group = h // h_kv
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    samples = sample_ids(offsets, num_tokens)
    local = torch.arange(num_tokens, device=k.device) - offsets[samples]
    key_rows = (samples, local)
    shape = (num_samples, width)
    if query_index is None:
        order, q_rows, q_tok = None, key_rows, torch.arange(num_tokens, device=k.device)
    else:
        q_tok, order = torch.sort(query_index, stable=True)
        q_off = torch.searchsorted(q_tok, offsets)
        q_sample = samples[q_tok]
        q_rows = (q_sample, torch.arange(q_tok.numel(), device=k.device) - q_off[q_sample])
    q_sorted = q if order is None else q[order]

    key_ok = _pad(torch.ones(num_tokens, dtype=torch.bool, device=k.device), key_rows, shape, False)
    query_ok = _pad(torch.ones(q_tok.numel(), dtype=torch.bool, device=k.device), q_rows, shape, False)
    k_pos = _pad(local, key_rows, shape)
    q_pos = _pad(local[q_tok], q_rows, shape)

    def pair(values: torch.Tensor | None, fill=0):
        """``([B, Lq, 1], [B, 1, L])`` padded per-token values of queries and keys."""
        if values is None:
            return None, None
        return _pad(values[q_tok], q_rows, shape, fill)[:, :, None], _pad(values, key_rows, shape, fill)[:, None, :]

    type_q, type_k = pair(token_type)
    ts_q, ts_k = pair(timestamps)
    mask = allowed(mask_mode, type_q, type_k, ts_q, ts_k, q_pos[:, :, None], k_pos[:, None, :])
    mask = mask & key_ok[:, None, :] & query_ok[:, :, None]  # [B, Lq, L]

    # [B, h_kv, group * Lq, d] @ [B, h_kv, d, L]: the query heads of one kv head stacked along rows
    qd = _pad(q_sorted, q_rows, shape).view(num_samples, width, h_kv, group, -1).permute(0, 2, 3, 1, 4)
    kd = _pad(k, key_rows, shape).permute(0, 2, 3, 1)  # [B, h_kv, d, L]
    vd = _pad(v, key_rows, shape).permute(0, 2, 1, 3)  # [B, h_kv, L, d_v]
    scores = torch.matmul(qd.reshape(num_samples, h_kv, group * width, -1), kd).to(compute) * alpha
    scores = scores.view(num_samples, h, width, width)
    if pos_bias is not None:
        positions = event_positions(offsets, token_type, timestamps, num_tokens)
        p_q, p_k = pair(positions)
        buckets = position_buckets(p_q - p_k, pos_bias.shape[1])  # [B, Lq, L]
        scores = scores + bias_lookup(pos_bias.to(compute), buckets)
    if time_bias is not None:
        buckets = time_buckets(ts_q - ts_k, time_bias.shape[1], time_bucket_base)
        scores = scores + bias_lookup(time_bias.to(compute), buckets)
    weights = F.silu(scores) * mask[:, None].to(compute)
    if normaliser is Normaliser.LENGTH:
        lengths = (offsets[1:] - offsets[:-1]).clamp(min=1).to(compute)
        weights = weights / lengths[:, None, None, None]
    elif normaliser is Normaliser.KEYS:
        weights = weights / mask.sum(-1).clamp(min=1).to(compute)[:, None, :, None]
    elif normaliser is Normaliser.MAX_LEN:
        weights = weights / width
    weights = weights.to(q.dtype).view(num_samples, h_kv, group * width, width)
    out = torch.matmul(weights, vd).view(num_samples, h_kv, group, width, d_v)
    out = out.permute(0, 3, 1, 2, 4).reshape(num_samples, width, h, d_v)[q_rows]  # [N_q, h, d_v] sorted
    if order is None:
        return out
    return torch.empty_like(out).index_copy_(0, order, out)

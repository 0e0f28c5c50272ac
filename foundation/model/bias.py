"""Relative attention bias: learned tables indexed by relative position and by log-bucketed time gap.

The attention score of query ``i`` and key ``j`` gets ``pos_table[head, pos_bucket] + time_table[head,
time_bucket]`` added before the SiLU (brief section 4). The bucketing is part of the attention op's
specification (a fused kernel computes the buckets per tile), so it lives here as plain functions:

* **Position.** ``rel = p_i - p_j`` clipped to ``[-P, P]``, bucket ``rel + P``; a table of ``2P + 1``
  columns. ``p`` is the token's *event position* (:func:`event_positions`): the number of H/R events
  that come before it --

  * an H token: the H tokens before it by position;
  * an R token: all H tokens, plus the R tokens before it in (timestamp, position) order;
  * a T token: all H tokens, plus the R tokens strictly earlier in time -- exactly the events it may
    see, so a target sits in the slot of "the next event" after what it sees.

  With the batch layout (H, then R in time order, then T) an H/R token's ``p`` is its plain index. A
  target's ``p`` depends on nothing the mask hides from it: not on later R events, not on other targets
  or their order (permuting targets permutes outputs).
* **Time.** ``dt = |t_i - t_j|`` in seconds, bucket ``min(floor(log(1 + dt) / log(base)), K - 1)`` for
  a table of ``K`` columns. It is evaluated exactly in integers: ``bucket = #{k : dt >= b_k}`` with
  boundaries ``b_k = ceil(base ** (k + 1)) - 1`` (:func:`time_bucket_boundaries`), so a kernel and the
  reference agree on every boundary. With base 2 and 32 buckets: 0 s, 1-2 s, 3-6 s, ... up to ~68 years.

Tables are ``[1, buckets]`` (shared by all heads) or ``[num_heads, buckets]``; they start at zero so an
untrained bias is exactly no bias.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from recfm.errors import RecfmError
from recfm.scenarios.spec import TokenType


def position_buckets(rel: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Bucket of a relative event position ``rel = p_i - p_j`` (any shape, int64) for a table of
    ``num_buckets = 2P + 1`` columns: ``clamp(rel, -P, P) + P``."""
    half = (num_buckets - 1) // 2
    return rel.clamp(-half, half) + half


def time_bucket_boundaries(num_buckets: int, base: float, device: torch.device | str | None = None) -> torch.Tensor:
    """``[num_buckets - 1]`` int64: the smallest ``dt`` of buckets ``1 .. num_buckets - 1``."""
    cap = 2**62  # gaps beyond ~146 billion years all land in the last bucket anyway
    bounds = []
    for k in range(1, num_buckets):
        too_big = k * math.log(base) >= math.log(cap)
        bounds.append(cap if too_big else min(math.ceil(base**k) - 1, cap))
    return torch.tensor(bounds, dtype=torch.int64, device=device)


def time_buckets(dt: torch.Tensor, num_buckets: int, base: float) -> torch.Tensor:
    """Bucket of a time gap ``dt`` (any shape, int64 seconds; the sign is ignored):
    ``min(floor(log(1 + |dt|) / log(base)), num_buckets - 1)``, evaluated exactly."""
    bounds = time_bucket_boundaries(num_buckets, base, dt.device)
    return torch.bucketize(dt.abs(), bounds, right=True)


def bias_lookup(table: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    """``table[:, buckets]`` moved to the front: table ``[H, K]``, buckets ``[...]`` -> ``[..., H]`` permuted to
    ``[H, ...]`` (``H = 1`` broadcasts over heads); for a leading batch dim ``[B, ...]`` -> ``[B, H, ...]``.

    Written as an embedding lookup: its backward on a GPU sorts the bucket ids and reduces segments, where
    plain indexing scatters millions of pairs into a few hundred table cells with atomic adds (measured on an
    H100: 57 ms per call at 128 x 200 x 200 pairs, the whole step's time).
    """
    out = torch.nn.functional.embedding(buckets, table.t())  # [..., H]
    if buckets.dim() == 3:  # [B, Lq, L] -> [B, H, Lq, L]
        return out.permute(0, 3, 1, 2)
    return out.movedim(-1, 0)  # [Lq, L] -> [H, Lq, L]


def sample_ids(offsets: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[N]`` int64: the sample (0..B-1) of each token, from offsets ``[B+1]`` (no host sync)."""
    lengths = offsets[1:] - offsets[:-1]
    samples = torch.arange(lengths.numel(), device=offsets.device)
    return torch.repeat_interleave(samples, lengths, output_size=num_tokens)


def event_positions(
    offsets: torch.Tensor, token_type: torch.Tensor | None, timestamps: torch.Tensor | None, num_tokens: int
) -> torch.Tensor:
    """``[N]`` int64 event position of every token inside its sample (module docstring); no host sync.

    Args:
        offsets: ``[B+1]`` int64 sample offsets.
        token_type: ``[N]`` token types, or ``None`` to treat every token as an H event (plain positions).
        timestamps: ``[N]`` int64; needed when ``token_type`` is given.
        num_tokens: ``N``.
    """
    samples = sample_ids(offsets, num_tokens)
    if token_type is None:
        return torch.arange(num_tokens, device=offsets.device) - offsets[samples]
    is_h = token_type == int(TokenType.H)
    is_event = token_type != int(TokenType.T)
    # Event order inside a sample: H by position; then R and T by time, T first on a tie (a target sees
    # only strictly earlier R), then by position. One stable sort of a packed key (sample, not-H, time rank,
    # is-event): the time rank (tokens of the batch stamped strictly earlier) keeps ties and takes log2(N) bits.
    rank_bits = max(num_tokens, 1).bit_length()
    if (offsets.numel() - 1).bit_length() + rank_bits + 2 > 63:
        raise RecfmError(f"event_positions: {offsets.numel() - 1} samples of {num_tokens} tokens do not fit a 63-bit "
                         "sort key")
    rank = torch.searchsorted(torch.sort(timestamps).values, timestamps)
    key = (((samples << 1) | (~is_h).to(torch.int64)) << (rank_bits + 1)) \
        | (torch.where(is_h, 0, rank) << 1) | is_event.to(torch.int64)
    order = torch.argsort(key, stable=True)
    events = is_event[order].to(torch.int64)
    before = torch.cat([events.new_zeros(1), torch.cumsum(events, 0)])  # [N+1] events before sorted row r
    # sorting keeps each sample's rows in its own slice offsets[b]:offsets[b+1]
    positions_sorted = before[:-1] - before[offsets[:-1]][samples]
    return torch.empty_like(positions_sorted).index_copy_(0, order, positions_sorted)


class RelativeBias(nn.Module):
    """The learned bias tables of one attention layer.

    Attributes:
        pos_table: ``[H, 2 * max_rel_pos + 1]`` or ``None``; ``H`` is ``num_heads`` or 1 (shared).
        time_table: ``[H, num_time_buckets]`` or ``None``.
        time_bucket_base: log base of the time buckets.
    """

    def __init__(
        self,
        num_heads: int,
        *,
        use_pos: bool = True,
        max_rel_pos: int = 256,
        use_time: bool = True,
        num_time_buckets: int = 32,
        time_bucket_base: float = 2.0,
        per_head: bool = True,
    ):
        super().__init__()
        rows = num_heads if per_head else 1
        self.pos_table = nn.Parameter(torch.zeros(rows, 2 * max_rel_pos + 1)) if use_pos else None
        self.time_table = nn.Parameter(torch.zeros(rows, num_time_buckets)) if use_time else None
        self.time_bucket_base = float(time_bucket_base)

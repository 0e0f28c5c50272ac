"""Per-batch token metadata of the Triton HSTU attention, built on the device without a host sync.

A backbone calls the attention once per layer with the same ``offsets`` / ``token_type`` / ``timestamps``
/ ``query_index`` tensors, so the metadata is memoised for the most recent call (one entry, keyed by the
identity and version counter of those tensors and the options it depends on): the same result, computed
once per batch instead of once per layer. An in-place change of any of them, or new tensors, rebuilds it.

Contents (all int32 unless said, ``N`` tokens, ``B`` samples):

* ``qtok``, ``order``, ``qoff``: target-only queries sorted by token (int64 ``[N_q]``: grouped by sample,
  in position order), the sort permutation, and per-sample query offsets ``[B+1]`` (``searchsorted``);
* ``vis``: ``[N, 2]`` query and key visibility codes of every token (:func:`visibility_codes`: the mixed
  mask as one comparison);
* ``seconds``: seconds since the sample's earliest timestamp, clamped to ``2^31 - 2`` (time bias; exact
  while a sample spans less than ~68 years);
* ``stats``: ``[B, 3]`` first non-H position, 1 + last H position, 1 + last H/R position (mixed mask);
* ``positions``: event positions (``bias.event_positions``) for the position bias;
* ``bounds``: time-bucket boundaries (``bias.time_bucket_boundaries``) clamped to ``2^31 - 1``;
* ``kext``, ``kchunks`` / ``qext``, ``qchunks``: per chunk of ``CHUNK`` consecutive keys (queries) of a sample,
  the lowest and highest event position and relative second (``[chunks, 4]``: pos lo, pos hi, seconds lo,
  seconds hi), and each sample's first chunk ``[B+1]``: a kernel reads a tile's span of position and time
  gaps from a few scalars (:func:`.triton_common.tile_span`) instead of reducing across its warps.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from recfm.foundation.model.bias import event_positions, sample_ids, time_bucket_boundaries
from recfm.foundation.model.mask import MaskMode

INT32_SPAN = 2**31 - 2  # relative seconds are clamped here; boundaries at 2**31 - 1
CHUNK = 16  # rows per chunk of the tile-span extremes (every kernel block is a multiple of it)


def mixed_stats(offsets: torch.Tensor, token_type: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[B, 3]`` int32 per sample: first non-H position (``L`` if none), 1 + last H position (0 if none),
    1 + last H/R position (0 if none)."""
    lengths = offsets[1:] - offsets[:-1]
    samples = sample_ids(offsets, num_tokens)
    local = torch.arange(num_tokens, device=offsets.device) - offsets[samples]
    is_h = token_type == 0
    is_event = token_type != 2
    h_prefix = lengths.clone().scatter_reduce_(0, samples, torch.where(is_h, lengths[samples], local), "amin")
    zeros = torch.zeros_like(lengths)
    h_end = zeros.clone().scatter_reduce_(0, samples, torch.where(is_h, local + 1, 0), "amax")
    e_end = zeros.scatter_reduce_(0, samples, torch.where(is_event, local + 1, 0), "amax")
    return torch.stack([h_prefix, h_end, e_end], 1).to(torch.int32).contiguous()


def visibility_codes(token_type: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
    """``[N, 2]`` int32 codes per token, ``(query code, key code)``, such that inside a sample query ``i``
    may attend key ``j`` under the mixed mask (:mod:`recfm.foundation.model.mask`) exactly when
    ``key[j] <= query[i]`` or ``j == i``: one comparison per pair instead of types, times and positions.

    Let ``u`` be a token's place when the batch is sorted by ``(timestamp, index)``; inside a sample the
    index order is the position order, so ``u`` orders the sample's tokens by ``(t, pos)``.

    * H: query ``-1``, key ``-1``: every query sees H keys, an H query sees nothing else.
    * R: query ``u``, key ``u``: R keys at or before it in ``(t, pos)``.
    * T: query ``(tokens stamped strictly earlier) - 1``: R keys strictly earlier in time; key ``2^31 - 1``:
      no query sees a target, except the target itself through ``j == i``.
    """
    stamps, order = torch.sort(timestamps, stable=True)
    place = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    earlier = torch.searchsorted(stamps, timestamps)  # tokens of the batch stamped strictly earlier
    minus_one = torch.full_like(place, -1)
    query = torch.where(token_type == 0, minus_one, torch.where(token_type == 1, place, earlier - 1))
    key = torch.where(token_type == 0, minus_one, torch.where(token_type == 1, place, torch.iinfo(torch.int32).max))
    return torch.stack([query, key], 1).to(torch.int32).contiguous()


def relative_seconds(offsets: torch.Tensor, timestamps: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[N]`` int32 seconds since the sample's earliest timestamp, clamped to ``INT32_SPAN``."""
    samples = sample_ids(offsets, num_tokens)
    first = torch.full((offsets.numel() - 1,), torch.iinfo(torch.int64).max, dtype=torch.int64,
                       device=offsets.device).scatter_reduce_(0, samples, timestamps, "amin")
    return (timestamps - first[samples]).clamp(0, INT32_SPAN).to(torch.int32)


def chunk_extremes(offsets: torch.Tensor, positions: torch.Tensor, seconds: torch.Tensor,
                   num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per chunk of ``CHUNK`` rows of each sample (rows grouped by sample, ``offsets [B+1]``): ``[chunks, 4]``
    int32 (lowest, highest position; lowest, highest second) and the first chunk of each sample ``[B+1]``
    int32. Sized from host integers (``num_rows // CHUNK + B + 1`` rows, unused ones never read)."""
    num_samples = offsets.numel() - 1
    lengths = offsets[1:] - offsets[:-1]
    first = torch.zeros(num_samples + 1, dtype=torch.int64, device=offsets.device)
    torch.cumsum((lengths + CHUNK - 1) // CHUNK, 0, out=first[1:])
    samples = sample_ids(offsets, num_rows)
    local = torch.arange(num_rows, device=offsets.device) - offsets[samples]
    chunk = first[samples] + local // CHUNK
    size = num_rows // CHUNK + num_samples + 1
    cols = []
    for values in (positions, seconds):
        values = values.to(torch.int32)
        cols.append(values.new_full((size,), 2**31 - 1).scatter_reduce_(0, chunk, values, "amin"))
        cols.append(values.new_full((size,), -1).scatter_reduce_(0, chunk, values, "amax"))
    return torch.stack(cols, 1).contiguous(), first.to(torch.int32)


@dataclass(frozen=True)
class TokenMeta:
    """Device tensors the kernels read besides q/k/v (module docstring); 1-element dummies where unused."""

    offsets: torch.Tensor
    qtok: torch.Tensor
    order: torch.Tensor | None
    qoff: torch.Tensor
    token_type: torch.Tensor
    vis: torch.Tensor
    seconds: torch.Tensor
    stats: torch.Tensor
    positions: torch.Tensor
    bounds: torch.Tensor
    kext: torch.Tensor
    kchunks: torch.Tensor
    qext: torch.Tensor
    qchunks: torch.Tensor


def _build(offsets, token_type, timestamps, query_index, mode, with_pos, num_time_buckets, base, num_tokens):
    device = offsets.device
    i64 = torch.zeros(1, dtype=torch.int64, device=device)
    i32 = torch.zeros(1, dtype=torch.int32, device=device)
    offsets = offsets.contiguous()
    qtok, order, qoff = i64, None, offsets
    if query_index is not None:
        qtok, order = torch.sort(query_index, stable=True)
        qoff = torch.searchsorted(qtok, offsets)
    mixed = mode is MaskMode.MIXED
    bounds = i32
    if num_time_buckets > 1:  # built on the host; a pinned, non-blocking copy does not wait for the device
        host = time_bucket_boundaries(num_time_buckets, base).clamp(max=INT32_SPAN + 1).to(torch.int32)
        bounds = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
    seconds = relative_seconds(offsets, timestamps, num_tokens) if num_time_buckets else i32
    positions = event_positions(offsets, token_type, timestamps, num_tokens).to(torch.int32) if with_pos else i32
    kext = qext = kchunks = qchunks = i32
    if with_pos or num_time_buckets:
        pos_all = positions if with_pos else torch.zeros(num_tokens, dtype=torch.int32, device=device)
        sec_all = seconds if num_time_buckets else torch.zeros(num_tokens, dtype=torch.int32, device=device)
        kext, kchunks = qext, qchunks = chunk_extremes(offsets, pos_all, sec_all, num_tokens)
        if query_index is not None:
            qext, qchunks = chunk_extremes(qoff, pos_all[qtok], sec_all[qtok], qtok.numel())
    return TokenMeta(
        offsets=offsets, qtok=qtok, order=order, qoff=qoff,
        token_type=token_type.contiguous() if mixed else i64,
        vis=visibility_codes(token_type, timestamps) if mixed else i32,
        seconds=seconds,
        stats=mixed_stats(offsets, token_type, num_tokens) if mixed else i32,
        positions=positions,
        bounds=bounds, kext=kext, kchunks=kchunks, qext=qext, qchunks=qchunks,
    )


_LAST: list = []  # [(weak references, versions, options, TokenMeta)] of the most recent call


def token_metadata(offsets: torch.Tensor, token_type: torch.Tensor | None, timestamps: torch.Tensor | None,
                   query_index: torch.Tensor | None, mode: MaskMode, with_pos: bool, num_time_buckets: int,
                   base: float, num_tokens: int) -> TokenMeta:
    """The :class:`TokenMeta` of a call (``num_time_buckets = 0``: no time bias), memoised for the last
    call's tensors (module docstring)."""
    tensors = (offsets, token_type, timestamps, query_index)
    versions = tuple(None if t is None else t._version for t in tensors)
    options = (mode, with_pos, num_time_buckets, base, num_tokens)
    if _LAST:
        refs, old_versions, old_options, meta = _LAST[0]
        same = all((r is None and t is None) or (r is not None and r() is t) for r, t in zip(refs, tensors))
        if same and old_versions == versions and old_options == options:
            return meta
    meta = _build(offsets, token_type, timestamps, query_index, mode, with_pos, num_time_buckets, base, num_tokens)
    _LAST[:] = [(tuple(None if t is None else weakref.ref(t) for t in tensors), versions, options, meta)]
    return meta

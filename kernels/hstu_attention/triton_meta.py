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
* ``idend``: ``[B]`` per sample, the number of leading tokens that sit at their own event position (with a
  position table; :func:`identity_prefix`): the keys whose position gradient goes along diagonals;
* ``bounds``: time-bucket boundaries (``bias.time_bucket_boundaries``) clamped to ``2^31 - 1``;
* ``kext``, ``kchunks`` / ``qext``, ``qchunks``: per chunk of ``CHUNK`` consecutive keys (queries) of a sample,
  the lowest and highest event position and relative second (``[chunks, 5]``: pos lo, pos hi, seconds lo,
  seconds hi, and whether every row sits at its own index), and each sample's first chunk ``[B+1]``: a kernel
  reads a tile's span of position and time gaps from a few scalars (:func:`.triton_common.tile_span`) instead
  of reducing across its warps, and whether its position bias is a Toeplitz band (``tile_ident``).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch

from recfm.foundation.model.bias import event_positions, sample_ids, time_bucket_boundaries
from recfm.foundation.model.mask import MaskMode

INT32_SPAN = 2**31 - 2  # relative seconds are clamped here; boundaries at 2**31 - 1
CHUNK = 16  # rows per chunk of the tile-span extremes (every kernel block is a multiple of it)
EXT_COLS = 5  # chunk extremes: pos lo, pos hi, second lo, second hi, identity (triton_common.EXT_COLS)
TOEP_W = 128  # columns of the Toeplitz position tables: at least every kernel block (triton_common.TOEP_W)
TOEP_MAX_HALF = 2048  # position tables up to 2 * 2048 + 1 buckets get the Toeplitz layout (2 x 4608 x 128 per head)


def sample_rows(offsets: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(samples, local)``: each row's sample and its index in the sample (rows grouped by sample)."""
    samples = sample_ids(offsets, num_rows)
    return samples, torch.arange(num_rows, device=offsets.device) - offsets[samples]


PADDED_MAX_RATIO = 4  # per-sample reductions go through a padded [B, max_len] tile up to this many times N entries


def segment_reduce(values: torch.Tensor, offsets: torch.Tensor, samples: torch.Tensor, local: torch.Tensor,
                   max_len: int, largest: bool, empty: torch.Tensor | int) -> torch.Tensor:
    """``[B, ...]`` per sample the greatest (``largest``) or least of ``values`` ``[N, ...]`` over its rows (rows
    grouped by sample: ``samples``, ``local`` from :func:`sample_rows`; trailing columns reduced independently),
    ``empty`` for a sample without rows.

    One scatter into a padded ``[B, max_len]`` tile and one row reduction (``max_len`` bounds every sample's length,
    the API's contract): ``scatter_reduce`` would make each sample's rows contend for one cell with atomics. Where
    the tile would exceed :data:`PADDED_MAX_RATIO` times ``N`` entries (a few long samples among many short ones),
    ``scatter_reduce`` it is. Host integers only: no sync."""
    lengths = offsets[1:] - offsets[:-1]
    num_samples, width = lengths.numel(), max(max_len, 1)
    info = torch.iinfo(values.dtype)
    fill = info.min if largest else info.max
    cols = values.shape[1:]
    if num_samples * width <= PADDED_MAX_RATIO * max(values.shape[0], 1):
        dense = values.new_full((num_samples, width, *cols), fill)
        dense[samples, local.clamp(max=width - 1)] = values
        out = dense.amax(1) if largest else dense.amin(1)
    else:
        index = samples.view(-1, *[1] * len(cols)).expand_as(values)
        out = values.new_full((num_samples, *cols), fill).scatter_reduce_(0, index, values,
                                                                          "amax" if largest else "amin")
    nonempty = (lengths > 0).view(-1, *[1] * len(cols))
    # a Python scalar as it is: as_tensor would copy it to the device, a synchronising copy from pageable memory
    return torch.where(nonempty, out, empty if isinstance(empty, int) else empty.to(values.dtype))


def mixed_stats(offsets: torch.Tensor, token_type: torch.Tensor, num_tokens: int, max_len: int) -> torch.Tensor:
    """``[B, 3]`` int32 per sample: first non-H position (``L`` if none), 1 + last H position (0 if none),
    1 + last H/R position (0 if none)."""
    lengths = offsets[1:] - offsets[:-1]
    samples, local = sample_rows(offsets, num_tokens)
    is_h = token_type == 0
    is_event = token_type != 2
    # one reduction for all three: the least first non-H position as the greatest of its negation
    values = torch.stack([-torch.where(is_h, lengths[samples], local), torch.where(is_h, local + 1, 0),
                          torch.where(is_event, local + 1, 0)], 1)
    stats = segment_reduce(values, offsets, samples, local, max_len, True, 0)
    stats[:, 0].neg_()  # in place: a [-1, 1, 1] factor would be a copy from the host (a sync)
    return stats.to(torch.int32).contiguous()


def identity_prefix(offsets: torch.Tensor, positions: torch.Tensor, num_tokens: int, max_len: int) -> torch.Tensor:
    """``[B]`` int32 per sample: how many of its first tokens have their index in the sample as event position
    (all of them, ``L``, when every token does: a causal sequence; the H and R tokens of the batch layout)."""
    lengths = offsets[1:] - offsets[:-1]
    samples, local = sample_rows(offsets, num_tokens)
    first_off = torch.where(positions == local, lengths[samples], local)
    return segment_reduce(first_off, offsets, samples, local, max_len, False, 0).to(torch.int32).contiguous()


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


def relative_seconds(offsets: torch.Tensor, timestamps: torch.Tensor, num_tokens: int, max_len: int) -> torch.Tensor:
    """``[N]`` int32 seconds since the sample's earliest timestamp, clamped to ``INT32_SPAN``."""
    samples, local = sample_rows(offsets, num_tokens)
    first = segment_reduce(timestamps.to(torch.int64), offsets, samples, local, max_len, False, 0)
    return (timestamps - first[samples]).clamp(0, INT32_SPAN).to(torch.int32)


def chunk_extremes(offsets: torch.Tensor, positions: torch.Tensor, seconds: torch.Tensor,
                   num_rows: int, identity: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per chunk of ``CHUNK`` rows of each sample (rows grouped by sample, ``offsets [B+1]``): ``[chunks, 5]``
    int32 (lowest, highest position; lowest, highest second; 1 when every row's position equals its index in
    the sample, else 0 -- always 0 without ``identity``, e.g. for target-only query rows) and the first chunk
    of each sample ``[B+1]`` int32. Sized from host integers (``num_rows // CHUNK + B + 1`` rows; unused ones
    hold ``(2^31 - 1, -1, 2^31 - 1, -1, identity)`` and are never read).

    Each chunk gathers its ``CHUNK`` rows (``[chunks, CHUNK]``, rows past its sample's end masked) and reduces
    them along the row axis: dense work, where a ``scatter_reduce`` of every row into its chunk's cell contends
    ``CHUNK`` ways on each cell (five of those took ~0.25 ms per batch of 79k tokens on an H100)."""
    device = offsets.device
    num_samples = offsets.numel() - 1
    lengths = offsets[1:] - offsets[:-1]
    first = torch.zeros(num_samples + 1, dtype=torch.int64, device=device)
    torch.cumsum((lengths + CHUNK - 1) // CHUNK, 0, out=first[1:])
    size = num_rows // CHUNK + num_samples + 1
    big = 2**31 - 1
    if num_samples == 0 or num_rows == 0:
        ext = torch.empty(size, EXT_COLS, dtype=torch.int32, device=device)
        for col, value in enumerate((big, -1, big, -1, int(identity))):
            ext[:, col] = value
        return ext, first.to(torch.int32)
    chunk = torch.arange(size, device=device)
    sample = torch.searchsorted(first[1:], chunk, right=True).clamp_(max=num_samples - 1)
    start = (chunk - first[sample]) * CHUNK  # the chunk's first row, counted inside its sample
    local = start[:, None] + torch.arange(CHUNK, device=device)  # [chunks, CHUNK]
    valid = (local < lengths[sample][:, None]) & (chunk < first[-1])[:, None]
    rows = (offsets[sample][:, None] + local).clamp_(0, num_rows - 1)
    values = torch.stack([positions.to(torch.int32), seconds.to(torch.int32)], 1)[rows]  # [chunks, CHUNK, 2]
    lo = torch.where(valid[..., None], values, big).amin(1)
    hi = torch.where(valid[..., None], values, -1).amax(1)
    if identity:
        ident = torch.where(valid, values[..., 0] == local, True).all(1).to(torch.int32)
    else:
        ident = torch.zeros(size, dtype=torch.int32, device=device)
    ext = torch.stack([lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1], ident], 1).to(torch.int32)
    return ext.contiguous(), first.to(torch.int32)


def _padded_table(half: int) -> int:
    """Columns of the position table padded to a multiple of 64 (``triton_common.toeplitz_tile``'s ``TP``)."""
    return (2 * half + 64) // 64 * 64


def toeplitz_width(half: int) -> int:
    """Columns of the position table plus its Toeplitz layout (:func:`toeplitz_tables`) for ``P = half``."""
    return _padded_table(half) + 2 * (2 * half + 4 * TOEP_W) * TOEP_W


@functools.lru_cache(maxsize=8)
def _toeplitz_index(half: int, device: torch.device) -> torch.Tensor:
    rows = 2 * half + 4 * TOEP_W
    x = torch.arange(rows, device=device)[:, None]
    c = torch.arange(TOEP_W, device=device)[None, :]
    query_rows = (x - c - (half + 2 * TOEP_W)).clamp(-half, half) + half  # [x, c]: i - j = x - c - OFF
    key_rows = (c - x + (half + 2 * TOEP_W)).clamp(-half, half) + half  # [y, c]: i - j = c - y + OFF
    return torch.cat([query_rows.flatten(), key_rows.flatten()])


def toeplitz_tables(table: torch.Tensor) -> torch.Tensor:
    """``[rows, toeplitz_width(P)]``: each row of the position table ``[rows, 2P + 1]`` padded to a multiple of
    64 columns, then two ``[2P + 4 W, W]`` matrices (``W = TOEP_W``) read by
    :func:`.triton_common.toeplitz_tile`: ``M[x, c] = table[clamp(x - c - OFF) + P]`` for query-major tiles and
    ``MT[y, c] = table[clamp(c - y + OFF) + P]`` for key-major ones, ``OFF = P + 2 W``. A tile of queries from
    ``i0`` and keys from ``j0`` (both at their own event positions) is rows ``i0 - j0 + OFF ..`` of ``M``. One
    gather per call (per head: ~0.5 MB in bf16 at P = 256), the same for every tile of the call."""
    half = (table.shape[1] - 1) // 2
    pad = _padded_table(half) - table.shape[1]
    index = _toeplitz_index(half, table.device)
    return torch.cat([table, table.new_zeros(table.shape[0], pad), table[:, index]], 1).contiguous()


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
    idend: torch.Tensor
    bounds: torch.Tensor
    kext: torch.Tensor
    kchunks: torch.Tensor
    qext: torch.Tensor
    qchunks: torch.Tensor


def _build(offsets, token_type, timestamps, query_index, mode, with_pos, num_time_buckets, base, num_tokens, max_len):
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
    seconds = relative_seconds(offsets, timestamps, num_tokens, max_len) if num_time_buckets else i32
    positions = event_positions(offsets, token_type, timestamps, num_tokens).to(torch.int32) if with_pos else i32
    kext = qext = kchunks = qchunks = i32
    if with_pos or num_time_buckets:
        pos_all = positions if with_pos else torch.zeros(num_tokens, dtype=torch.int32, device=device)
        sec_all = seconds if num_time_buckets else torch.zeros(num_tokens, dtype=torch.int32, device=device)
        kext, kchunks = qext, qchunks = chunk_extremes(offsets, pos_all, sec_all, num_tokens)
        if query_index is not None:
            qext, qchunks = chunk_extremes(qoff, pos_all[qtok], sec_all[qtok], qtok.numel(), identity=False)
    return TokenMeta(
        offsets=offsets, qtok=qtok, order=order, qoff=qoff,
        token_type=token_type.contiguous() if mixed else i64,
        vis=visibility_codes(token_type, timestamps) if mixed else i32,
        seconds=seconds,
        stats=mixed_stats(offsets, token_type, num_tokens, max_len) if mixed else i32,
        positions=positions,
        idend=identity_prefix(offsets, positions, num_tokens, max_len) if with_pos else i32,
        bounds=bounds, kext=kext, kchunks=kchunks, qext=qext, qchunks=qchunks,
    )


_LAST: list = []  # [(weak references, versions, options, TokenMeta)] of the most recent call


def token_metadata(offsets: torch.Tensor, token_type: torch.Tensor | None, timestamps: torch.Tensor | None,
                   query_index: torch.Tensor | None, mode: MaskMode, with_pos: bool, num_time_buckets: int,
                   base: float, num_tokens: int, max_len: int) -> TokenMeta:
    """The :class:`TokenMeta` of a call (``num_time_buckets = 0``: no time bias; ``max_len`` bounds every sample's
    length), memoised for the last call's tensors (module docstring)."""
    tensors = (offsets, token_type, timestamps, query_index)
    versions = tuple(None if t is None else t._version for t in tensors)
    options = (mode, with_pos, num_time_buckets, base, num_tokens, max_len)
    if _LAST:
        refs, old_versions, old_options, meta = _LAST[0]
        same = all((r is None and t is None) or (r is not None and r() is t) for r, t in zip(refs, tensors))
        if same and old_versions == versions and old_options == options:
            return meta
    meta = _build(offsets, token_type, timestamps, query_index, mode, with_pos, num_time_buckets, base, num_tokens,
                  max_len)
    _LAST[:] = [(tuple(None if t is None else weakref.ref(t) for t in tensors), versions, options, meta)]
    return meta

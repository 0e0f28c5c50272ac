"""Next-item data: read user sequences, split leave-last-out, keep everything as (GPU) tensors, batch jagged.

Protocols (``train.protocol``; per user, items in time order, ties in file order -- the readers of
:mod:`recfm.foundation.data.real` guarantee it)::

    items        i_1 i_2 ... i_{n-2} | i_{n-1} | i_n
    standard
      train      inputs i_1..i_{n-3}, targets i_2..i_{n-2}   every position predicts its next item (causal)
      valid      input  i_1..i_{n-2}, target i_{n-1}
      test       input  i_1..i_{n-1}, target i_n
    published    (the HSTU repository's research code)
      train      inputs i_1..i_{n-2}, targets i_2..i_{n-1}   i_{n-1} is a training target
      valid      none (``NextItemData.valid is None``)
      test       input  i_1..i_{n-1}, target i_n               as in standard

The last item is never a training target. Every input keeps its most recent ``max_len`` items. Training
samples (``data.train_windows``): ``last`` (default, the published recipes) takes the last ``max_len + 1`` items
of the training prefix, ``max_len`` input/target pairs, so a longer prefix's earlier targets are never
trained on; ``all`` cuts the whole prefix from its end into windows of ``max_len + 1`` items that overlap by
one item (an earlier window's last target is the first input of the window after it), so every training
target is predicted exactly once per epoch, with the context of its own window::

    prefix i_1 .. i_m, max_len L:   [i_{m-L} .. i_m], [i_{m-2L} .. i_{m-L}], ...   (down to >= 2 items)

A split's "users" are then its samples (``Split.num_users``); the valid and test splits keep one per user. Item ids
``1..num_items`` become rows ``0..num_items-1`` (row = id - 1), so the full corpus is the whole item table
and no padding row exists.

Bad input:

* a sequence shorter than 3 items cannot give a train, a valid and a test item: skipped and counted
  (``NextItemData.skipped_short``), in both protocols, so both rank the same users on test;
* an item id outside ``1..num_items``: :class:`DataError` naming the user and the id;
* a user id that appears twice (two sequences for one user): :class:`DataError` naming the user. The two
  are never merged -- nothing says how they interleave in time. (The file readers already reject it,
  naming both lines; :func:`from_sequences` checks again for logs built in memory.)

Layout of a split (:class:`Split`): ``inputs [T]`` row ids of all users' input tokens concatenated, ``offsets
[U+1]`` (host numpy and device copy), ``targets [T]`` (train: the next item of each token) or ``[U]`` (valid /
test: the held-out item of each user), and ``times [T]`` int64 Unix seconds of each input token's own item
(cut exactly like ``inputs``; the test input's times are those of its input items, never the target's) or
``None`` when the dataset has no real timestamps.

Timestamps (:func:`read_log`): real only where the source has them -- ``ml-100k`` (always), ``ml-1m`` from
GroupLens' ``ratings.dat``, ``amazon-beauty`` from McAuley's reviews (day resolution). The shared ML-1M copy
(``sequences.csv``), the S3Rec Beauty sequences and ``sequences`` files have none: their readers' synthetic
times (positions) are dropped here, so nothing downstream mistakes them for time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recfm.errors import DataError
from recfm.foundation.data.real import beauty, ml1m, ml100k, sequences
from recfm.recipes.nextitem_config import DataSection, Dataset, Protocol, Windows

MIN_LENGTH = sequences.SHORT  # 3: a train, a valid and a test item


@dataclass(frozen=True)
class Split:
    """One split as device tensors (module docstring); ``offsets_host`` drives batching without syncs."""

    inputs: torch.Tensor  # [T] int64 item rows
    targets: torch.Tensor  # [T] (train) or [U] (valid/test) int64 item rows
    offsets: torch.Tensor  # [U+1] int64, on the device
    offsets_host: np.ndarray  # [U+1] int64
    times: torch.Tensor | None = None  # [T] int64 Unix seconds of the input tokens; None: no real timestamps

    @property
    def num_users(self) -> int:
        return self.offsets_host.size - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets_host)

    def to(self, device: torch.device | str) -> Split:
        times = None if self.times is None else self.times.to(device)
        return Split(self.inputs.to(device), self.targets.to(device), self.offsets.to(device), self.offsets_host, times)


@dataclass(frozen=True)
class NextItemData:
    """The splits of one dataset (``valid`` is ``None`` under the published protocol), plus counts for the report."""

    train: Split
    valid: Split | None
    test: Split
    num_items: int
    users: int
    skipped_short: int
    interactions: int
    source: str
    train_users: int  # users with at least one training sample (train.num_users counts samples)

    def to(self, device: torch.device | str) -> NextItemData:
        valid = None if self.valid is None else self.valid.to(device)
        return dataclasses.replace(self, train=self.train.to(device), valid=valid, test=self.test.to(device))

    def summary(self) -> dict:
        return {
            "source": self.source, "users": self.users, "items": self.num_items, "interactions": self.interactions,
            "skipped_short": self.skipped_short, "train_users": self.train_users,
            "train_samples": self.train.num_users,
            "train_tokens": int(self.train.offsets_host[-1]), "timestamps": self.has_times,
        }

    @property
    def has_times(self) -> bool:
        """Whether the splits carry real timestamps (``Split.times``)."""
        return self.test.times is not None


def resolve_source(section: DataSection) -> Path:
    """``path`` if absolute, else ``root / path`` (``root`` relative to the current working directory)."""
    path = Path(section.path)
    return path if path.is_absolute() else Path(section.root) / path


def read_log(section: DataSection) -> tuple[list[int], list[np.ndarray], list[np.ndarray] | None, str]:
    """User ids, their chronological item ids, their items' Unix timestamps (``None`` when the source has no
    real ones; module docstring), and a source label -- read by the converters' readers."""
    src = resolve_source(section)
    if not src.exists():
        raise DataError(f"{src}: not found (data.root={section.root!r}, data.path={section.path!r}); "
                        "set data.root=... or data.path=... to where the dataset lives")
    if section.dataset is Dataset.ML_1M:
        log, layout = ml1m.read(src)
        timed = layout.startswith("ratings.dat")  # sequences.csv: synthetic times (positions)
    elif section.dataset is Dataset.ML_100K:
        log, layout = _read_ml100k(src)
        timed = True
    elif section.dataset is Dataset.AMAZON_BEAUTY:
        log, layout, timed = _read_beauty(src)
    else:
        file = src if src.is_file() else src / "sequences.txt"
        log, layout = sequences.read_sequence_file(file, user_sep=" ", header=False), f"{file.name} (sequences)"
        timed = False
    bounds = list(zip(log.offsets[:-1], log.offsets[1:]))
    seqs = [log.items[a:b] for a, b in bounds]
    times = [log.timestamps[a:b] for a, b in bounds] if timed else None
    return log.users.tolist(), seqs, times, f"{src} [{layout}]"


def _read_ml100k(src: Path) -> tuple[sequences.SequenceLog, str]:
    """ML-100K ratings as sequences: by user, then timestamp, ties in file order (:func:`sequences.from_rows`)."""
    ratings, _users, _items, path, layout = ml100k.read(src)  # also checks users/items files are readable
    first_line = 2 if path.name == "ratings.tsv" else 1  # the shared copy has a header line
    log = sequences.from_rows(ratings["user_id"], ratings["item_id"], ratings["timestamp"], ratings["rating"],
                              path, first_line)
    return log, layout


def _read_beauty(src: Path) -> tuple[sequences.SequenceLog, str, bool]:
    for name in beauty.SEQUENCE_FILES:
        if (src / name).is_file():
            return sequences.read_sequence_file(src / name, user_sep=" ", header=False), f"{name} (S3Rec)", False
    for name in beauty.REVIEW_FILES:
        if (src / name).is_file():
            return beauty.read_reviews(src / name)[0], f"{name} (McAuley reviews)", True
    raise DataError(f"{src}: none of {', '.join(beauty.SEQUENCE_FILES + beauty.REVIEW_FILES)} found (file not found)")


def load_data(section: DataSection, protocol: Protocol = Protocol.STANDARD) -> NextItemData:
    """Read ``section``'s dataset and split it by ``protocol`` (module docstring)."""
    users, seqs, times, source = read_log(section)
    if section.max_users is not None:
        users, seqs = users[: section.max_users], seqs[: section.max_users]
        times = None if times is None else times[: section.max_users]
    return from_sequences(users, seqs, max_len=section.max_len, num_items=section.num_items, source=source,
                          protocol=protocol, times=times, windows=section.train_windows)


def from_sequences(users, seqs, *, max_len: int, num_items: int | None = None, source: str = "<memory>",
                   protocol: Protocol = Protocol.STANDARD, times=None, windows: Windows = Windows.LAST) -> NextItemData:
    """Split in-memory sequences (item ids ``>= 1``, oldest first) into train/valid/test (module docstring).

    Args:
        users: user ids, one per sequence (unique).
        seqs: item id sequences (lists or int arrays).
        max_len: most recent items kept per input.
        num_items: ids must be in ``1..num_items``; ``None`` = the largest id present.
        protocol: ``standard`` holds out the last two items (valid, test); ``published`` only the last
            (test), and returns ``valid=None``.
        times: ``None`` (no real timestamps: every ``Split.times`` is ``None``), or one int sequence per user,
            the Unix seconds of its items (same length, non-decreasing: items are in time order).
        windows: training samples per user (module docstring).
    """
    seen: set[int] = set()
    for u in users:
        if u in seen:
            raise DataError(f"{source}: user {u} has two sequences (a user id may appear once; not merged)")
        seen.add(u)
    arrays = [np.asarray(s, dtype=np.int64) for s in seqs]
    if num_items is None:
        num_items = max((int(a.max()) for a in arrays if a.size), default=0)
    for u, a in zip(users, arrays):
        if a.size and (a.min() < 1 or a.max() > num_items):
            bad = int(a[(a < 1) | (a > num_items)][0])
            raise DataError(f"{source}: user {u}: item id {bad} out of range 1..{num_items} (data.num_items)")
    stamps = None if times is None else _check_times(users, arrays, times, source)
    keep = [k for k, a in enumerate(arrays) if a.size >= MIN_LENGTH]
    if not keep:
        raise DataError(f"{source}: no sequence has {MIN_LENGTH} or more items")
    kept = [arrays[k] - 1 for k in keep]  # rows = ids - 1
    kept_times = None if stamps is None else [stamps[k] for k in keep]
    protocol = Protocol(protocol)
    held_out = 2 if protocol is Protocol.STANDARD else 1  # items at the end that are never training targets

    every = Windows(windows) is Windows.ALL

    def train_windows(a: np.ndarray) -> list[np.ndarray]:  # windows of max_len + 1 items, oldest first
        prefix = a[:-held_out]
        ends = range(prefix.size, 1, -max_len) if every else [prefix.size] if prefix.size >= 2 else []
        return [prefix[max(0, end - max_len - 1):end] for end in ends][::-1]

    def eval_input(a: np.ndarray, held: int) -> np.ndarray:  # the input before the `held` last items
        return a[:-held][-max_len:]

    windows_of = [train_windows(a) for a in kept]
    samples = [w for ws in windows_of for w in ws]
    train_out = [w[1:] for w in samples]
    train = _split([w[:-1] for w in samples], np.concatenate(train_out) if train_out else np.zeros(0, np.int64),
                   times=None if kept_times is None else [w[:-1] for t in kept_times for w in train_windows(t)])
    valid = None
    if protocol is Protocol.STANDARD:
        valid = _split([eval_input(a, 2) for a in kept], np.array([a[-2] for a in kept], dtype=np.int64),
                       times=None if kept_times is None else [eval_input(t, 2) for t in kept_times])
    test = _split([eval_input(a, 1) for a in kept], np.array([a[-1] for a in kept], dtype=np.int64),
                  times=None if kept_times is None else [eval_input(t, 1) for t in kept_times])
    return NextItemData(train, valid, test, int(num_items), len(kept), len(arrays) - len(kept),
                        int(sum(a.size for a in kept)), source, sum(1 for ws in windows_of if ws))


def _check_times(users, arrays: list[np.ndarray], times, source: str) -> list[np.ndarray]:
    """``times`` as int64 arrays, one per user, each as long as its items and non-decreasing; else DataError."""
    stamps = [np.asarray(t, dtype=np.int64) for t in times]
    if len(stamps) != len(arrays):
        raise DataError(f"{source}: {len(stamps)} timestamp sequences for {len(arrays)} users")
    for u, a, t in zip(users, arrays, stamps):
        if t.shape != a.shape:
            raise DataError(f"{source}: user {u}: {t.size} timestamps for {a.size} items")
        if t.size > 1 and (np.diff(t) < 0).any():
            at = int(np.flatnonzero(np.diff(t) < 0)[0]) + 1
            raise DataError(f"{source}: user {u}: timestamp {int(t[at])} of item {at} is before the one of item "
                            f"{at - 1} ({int(t[at - 1])}); items must be in time order")
    return stamps


def _split(inputs: list[np.ndarray], targets: np.ndarray, lengths=None,
           times: list[np.ndarray] | None = None) -> Split:
    lengths = np.array([x.size for x in inputs] if lengths is None else lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.concatenate(inputs) if inputs else np.zeros(0, np.int64)
    flat_times = None
    if times is not None:
        flat_times = torch.from_numpy(np.concatenate(times) if times else np.zeros(0, np.int64))
    return Split(torch.from_numpy(flat), torch.from_numpy(targets), torch.from_numpy(offsets.copy()), offsets,
                 flat_times)


@dataclass(frozen=True)
class JaggedBatch:
    """A batch of B users: ``ids [N]`` item rows, ``offsets [B+1]``, ``max_len`` host int, ``rows [N]`` the
    tokens' rows in the split (to pick train targets), ``users [B]`` the users' indices in the split,
    ``times [N]`` int64 Unix seconds of the tokens (``None`` when the split has no real timestamps)."""

    ids: torch.Tensor
    offsets: torch.Tensor
    max_len: int
    rows: torch.Tensor
    users: torch.Tensor
    times: torch.Tensor | None = None


def gather_batch(split: Split, users: np.ndarray) -> JaggedBatch:
    """The jagged tokens of ``users`` (host int array of user indices, any order); one small host->device copy."""
    device = split.inputs.device
    lengths = split.lengths[users]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    starts = torch.from_numpy(split.offsets_host[users] - offsets[:-1]).to(device, non_blocking=True)  # [B]
    lens = torch.from_numpy(lengths).to(device, non_blocking=True)
    rows = torch.arange(n, device=device) + torch.repeat_interleave(starts, lens, output_size=n)  # [N]
    times = None if split.times is None else split.times[rows]
    return JaggedBatch(split.inputs[rows], torch.from_numpy(offsets).to(device, non_blocking=True),
                       int(lengths.max()) if lengths.size else 0, rows, torch.from_numpy(users).to(device), times)

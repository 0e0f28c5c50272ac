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

The last item is never a training target. Every input keeps its most recent ``max_len`` items (train: the
last ``max_len + 1`` items of the training prefix give ``max_len`` input/target pairs). Item ids
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
test: the held-out item of each user).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recfm.errors import DataError
from recfm.foundation.data.real import beauty, ml1m, sequences
from recfm.recipes.nextitem_config import DataSection, Dataset, Protocol

MIN_LENGTH = sequences.SHORT  # 3: a train, a valid and a test item


@dataclass(frozen=True)
class Split:
    """One split as device tensors (module docstring); ``offsets_host`` drives batching without syncs."""

    inputs: torch.Tensor  # [T] int64 item rows
    targets: torch.Tensor  # [T] (train) or [U] (valid/test) int64 item rows
    offsets: torch.Tensor  # [U+1] int64, on the device
    offsets_host: np.ndarray  # [U+1] int64

    @property
    def num_users(self) -> int:
        return self.offsets_host.size - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets_host)

    def to(self, device: torch.device | str) -> Split:
        return Split(self.inputs.to(device), self.targets.to(device), self.offsets.to(device), self.offsets_host)


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

    def to(self, device: torch.device | str) -> NextItemData:
        valid = None if self.valid is None else self.valid.to(device)
        return NextItemData(self.train.to(device), valid, self.test.to(device), self.num_items,
                            self.users, self.skipped_short, self.interactions, self.source)

    def summary(self) -> dict:
        return {
            "source": self.source, "users": self.users, "items": self.num_items, "interactions": self.interactions,
            "skipped_short": self.skipped_short, "train_users": self.train.num_users,
            "train_tokens": int(self.train.offsets_host[-1]),
        }


def resolve_source(section: DataSection) -> Path:
    """``path`` if absolute, else ``root / path`` (``root`` relative to the current working directory)."""
    path = Path(section.path)
    return path if path.is_absolute() else Path(section.root) / path


def read_log(section: DataSection) -> tuple[list[int], list[np.ndarray], str]:
    """User ids and their chronological item ids, read by the converters' readers; and a source label."""
    src = resolve_source(section)
    if not src.exists():
        raise DataError(f"{src}: not found (data.root={section.root!r}, data.path={section.path!r}); "
                        "set data.root=... or data.path=... to where the dataset lives")
    if section.dataset is Dataset.ML_1M:
        log, layout = ml1m.read(src)
    elif section.dataset is Dataset.AMAZON_BEAUTY:
        log, layout = _read_beauty(src)
    else:
        file = src if src.is_file() else src / "sequences.txt"
        log, layout = sequences.read_sequence_file(file, user_sep=" ", header=False), f"{file.name} (sequences)"
    seqs = [log.items[a:b] for a, b in zip(log.offsets[:-1], log.offsets[1:])]
    return log.users.tolist(), seqs, f"{src} [{layout}]"


def _read_beauty(src: Path) -> tuple[sequences.SequenceLog, str]:
    for name in beauty.SEQUENCE_FILES:
        if (src / name).is_file():
            return sequences.read_sequence_file(src / name, user_sep=" ", header=False), f"{name} (S3Rec)"
    for name in beauty.REVIEW_FILES:
        if (src / name).is_file():
            return beauty.read_reviews(src / name)[0], f"{name} (McAuley reviews)"
    raise DataError(f"{src}: none of {', '.join(beauty.SEQUENCE_FILES + beauty.REVIEW_FILES)} found (file not found)")


def load_data(section: DataSection, protocol: Protocol = Protocol.STANDARD) -> NextItemData:
    """Read ``section``'s dataset and split it by ``protocol`` (module docstring)."""
    users, seqs, source = read_log(section)
    if section.max_users is not None:
        users, seqs = users[: section.max_users], seqs[: section.max_users]
    return from_sequences(users, seqs, max_len=section.max_len, num_items=section.num_items, source=source,
                          protocol=protocol)


def from_sequences(users, seqs, *, max_len: int, num_items: int | None = None, source: str = "<memory>",
                   protocol: Protocol = Protocol.STANDARD) -> NextItemData:
    """Split in-memory sequences (item ids ``>= 1``, oldest first) into train/valid/test (module docstring).

    Args:
        users: user ids, one per sequence (unique).
        seqs: item id sequences (lists or int arrays).
        max_len: most recent items kept per input.
        num_items: ids must be in ``1..num_items``; ``None`` = the largest id present.
        protocol: ``standard`` holds out the last two items (valid, test); ``published`` only the last
            (test), and returns ``valid=None``.
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
    kept = [a - 1 for a in arrays if a.size >= MIN_LENGTH]  # rows = ids - 1
    if not kept:
        raise DataError(f"{source}: no sequence has {MIN_LENGTH} or more items")
    protocol = Protocol(protocol)
    held_out = 2 if protocol is Protocol.STANDARD else 1  # items at the end that are never training targets
    train_in, train_out, train_len = [], [], []
    for a in kept:
        prefix = a[:-held_out][-(max_len + 1):]
        if prefix.size >= 2:
            train_in.append(prefix[:-1])
            train_out.append(prefix[1:])
            train_len.append(prefix.size - 1)
    train = _split(train_in, np.concatenate(train_out) if train_out else np.zeros(0, np.int64), train_len)
    valid = None
    if protocol is Protocol.STANDARD:
        valid = _split([a[:-2][-max_len:] for a in kept], np.array([a[-2] for a in kept], dtype=np.int64))
    test = _split([a[:-1][-max_len:] for a in kept], np.array([a[-1] for a in kept], dtype=np.int64))
    return NextItemData(train, valid, test, int(num_items), len(kept), len(arrays) - len(kept),
                        int(sum(a.size for a in kept)), source)


def _split(inputs: list[np.ndarray], targets: np.ndarray, lengths=None) -> Split:
    lengths = np.array([x.size for x in inputs] if lengths is None else lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.concatenate(inputs) if inputs else np.zeros(0, np.int64)
    return Split(torch.from_numpy(flat), torch.from_numpy(targets), torch.from_numpy(offsets.copy()), offsets)


@dataclass(frozen=True)
class JaggedBatch:
    """A batch of B users: ``ids [N]`` item rows, ``offsets [B+1]``, ``max_len`` host int, ``rows [N]`` the
    tokens' rows in the split (to pick train targets), ``users [B]`` the users' indices in the split."""

    ids: torch.Tensor
    offsets: torch.Tensor
    max_len: int
    rows: torch.Tensor
    users: torch.Tensor


def gather_batch(split: Split, users: np.ndarray) -> JaggedBatch:
    """The jagged tokens of ``users`` (host int array of user indices, any order); one small host->device copy."""
    device = split.inputs.device
    lengths = split.lengths[users]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    starts = torch.from_numpy(split.offsets_host[users] - offsets[:-1]).to(device, non_blocking=True)  # [B]
    lens = torch.from_numpy(lengths).to(device, non_blocking=True)
    rows = torch.arange(n, device=device) + torch.repeat_interleave(starts, lens, output_size=n)  # [N]
    return JaggedBatch(split.inputs[rows], torch.from_numpy(offsets).to(device, non_blocking=True),
                       int(lengths.max()) if lengths.size else 0, rows, torch.from_numpy(users).to(device))

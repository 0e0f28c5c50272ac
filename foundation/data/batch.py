"""The typed jagged batch every model in recfm consumes.

A batch concatenates the tokens of B samples into one flat sequence of N tokens, without padding::

    sample:     |------- 0 -------|---- 1 ----|-------- 2 --------|
    tokens:      H H H H R R T T T  H H R T T  H H H H H R R R T T
    offsets:     0                 9          14                 25      [B+1] int64
    token_type:  0 0 0 0 1 1 2 2 2  0 0 1 2 2  0 0 0 0 0 1 1 1 2 2       [N] int8  (TokenType)
    timestamps:  ...                                                     [N] int64 (unix seconds)
    group:       k k k k K K K+1+s ...                                   [N] int64 (Group LayerNorm group)

Within a sample: H tokens in time order, then R in time order, then T grouped by scenario in registry order,
time order within a scenario. ``group`` is the token's Group-LayerNorm group: ``kind`` (0..K-1) for an H
token of sequence kind ``kind``, ``K`` for every R token, ``K + 1 + s`` for a T token of scenario ``s``
(K = number of sequence kinds, s = index in the batch's ``scenarios``).

Features live in *token groups*, one per sequence kind (H and R tokens of that kind) and one per scenario
(its T tokens). A group knows which rows of the flat sequence it fills (``token_index``) and holds its
features already encoded: categorical ids mapped to table rows (hashing, identity range check and vocabulary
files applied while collating), numerics transformed. Sparse ids are a torchrec ``KeyedJaggedTensor`` with
one value per token and key (the table a key reads is the feature's ``table``)::

    KeyedJaggedTensor  keys = [item_id, category]   n = 3 tokens in the group
    values   = [i0 i1 i2 | c0 c1 c2]                 [n * n_keys]
    lengths  = [1  1  1  | 1  1  1 ]                 [n * n_keys]

The model writes token embeddings ``x[group.token_index] = MLP_group(features)`` into ``x: [N, d_model]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

try:  # torchrec is required for training; the data layer can be inspected without it
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
except ImportError:  # pragma: no cover - exercised only on installs without torchrec
    KeyedJaggedTensor = None  # type: ignore[assignment,misc]


@dataclass
class TokenGroup:
    """The tokens of one sequence kind (H and R) or one scenario (T) in a batch.

    Attributes:
        name: sequence kind or scenario name.
        token_index: ``[n]`` int64, rows of the batch's flat token sequence these tokens occupy.
        sparse: ``KeyedJaggedTensor`` of embedded features (categoricals and bucketised numerics), one value
            per token and key, values already table rows; ``None`` when the group has none.
        numeric: ``[n, n_numeric]`` float32, transformed numeric features (``numeric_names`` order).
        dense: ``[n, sum of dense lengths]`` float32 dense-vector features concatenated (``dense_names``).
    """

    name: str
    token_index: torch.Tensor
    sparse: "KeyedJaggedTensor | None"
    numeric: torch.Tensor
    dense: torch.Tensor
    numeric_names: tuple[str, ...] = ()
    dense_names: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return int(self.token_index.numel())


@dataclass
class TargetGroup(TokenGroup):
    """The T tokens (exposures) of one scenario, with what is needed to score and evaluate them.

    Attributes (beyond :class:`TokenGroup`):
        sample_index: ``[n]`` int64, which sample (0..B-1) each exposure belongs to.
        user_id: ``[n]`` int64, for per-user GAUC.
        exposure_id: ``[n]`` int64, stable id of the exposure in the raw log.
        labels: label name -> ``[n]`` float32.
        oracle: label name -> ``[n]`` float64 ground-truth probability (synthetic worlds only).
    """

    sample_index: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    user_id: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    exposure_id: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    oracle: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Batch:
    """B samples of jagged tokens (see the module docstring for the layout).

    Attributes:
        offsets: ``[B+1]`` int64 token offsets of each sample.
        token_type: ``[N]`` int8 :class:`~recfm.scenarios.spec.TokenType` of each token.
        timestamps: ``[N]`` int64 unix seconds of each token.
        group: ``[N]`` int64 Group-LayerNorm group of each token.
        user_id: ``[B]`` int64.
        events: sequence kind name -> its H and R tokens.
        targets: scenario name -> its T tokens (only scenarios with exposures in the batch).
        scenarios: scenario names in registry order (defines ``s`` in ``group``).
        sequences: sequence kind names in world order (defines ``kind`` in ``group``).
        max_len: longest sample, in tokens (a host int: never read back from the device).
        num_targets: total T tokens (host int).
    """

    offsets: torch.Tensor
    token_type: torch.Tensor
    timestamps: torch.Tensor
    group: torch.Tensor
    user_id: torch.Tensor
    events: dict[str, TokenGroup]
    targets: dict[str, TargetGroup]
    scenarios: tuple[str, ...]
    sequences: tuple[str, ...]
    max_len: int
    num_targets: int

    @property
    def num_samples(self) -> int:
        return int(self.offsets.numel()) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.token_type.numel())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy on ``device`` (tensors and KJTs moved; host ints kept)."""

        def move(obj):
            if isinstance(obj, torch.Tensor):
                return obj.to(device, non_blocking=non_blocking)
            if KeyedJaggedTensor is not None and isinstance(obj, KeyedJaggedTensor):
                return obj.to(torch.device(device), non_blocking=non_blocking)
            if isinstance(obj, dict):
                return {k: move(v) for k, v in obj.items()}
            if isinstance(obj, TokenGroup):
                return replace(obj, **{f.name: move(getattr(obj, f.name)) for f in fields(obj)})
            return obj

        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)})

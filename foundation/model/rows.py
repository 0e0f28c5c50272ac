"""Moving rows between a batch's token layout and its groups, as the model and the benchmarks do (no torchrec).

* :func:`scatter_rows`: each group's token embeddings placed at its rows of the ``[N, d]`` token tensor;
* :func:`target_rows_of`: each scenario's exposure rows of the encoded tokens.

Each is one indexing op for all groups: per group, the forward would copy or the backward would allocate and sum
a full ``[N, d]`` tensor once more.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from recfm.foundation.data.batch import TargetGroup


def scatter_rows(num_tokens: int, rows: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[num_tokens, d]`` zeros with ``values[i]`` placed at rows ``rows[i]``: one scatter for all groups, in
    place into the fresh zeros (an out-of-place ``index_copy`` would copy them once more)."""
    h = torch.cat(list(values))
    return h.new_zeros(num_tokens, h.shape[1]).index_copy_(0, torch.cat(list(rows)), h)


def target_rows_of(y: torch.Tensor, targets: Mapping[str, TargetGroup]) -> dict[str, torch.Tensor]:
    """Each scenario's exposure rows of the encoded tokens ``y``, in its ``token_index`` order: one gather for all
    scenarios, whose backward is one scatter into zeros (a gather per scenario costs a full-size zero tensor and a
    full-size gradient sum per scenario)."""
    if not targets:
        return {}
    rows = torch.cat([g.token_index for g in targets.values()])
    picked = y.index_select(0, rows).split([g.token_index.numel() for g in targets.values()])
    return dict(zip(targets, picked))

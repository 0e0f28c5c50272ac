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
    """``[num_tokens, d]``: ``values[i]`` placed at rows ``rows[i]`` (distinct rows over all groups), zeros where no
    group has a row.

    Written as a gather, not a scatter: the groups' values go into one buffer with a zero row appended, and each
    token reads its source row (the zero row where no group has it). Its backward gathers the groups' rows of the
    gradient (:class:`_PlaceRows`). A scatter of the values into zeros (``index_copy_``) and the zero fill cost ~2.7x
    the gather for 79k x 768 bf16 rows on an H100."""
    index = torch.cat(list(rows))
    h = torch.cat([*values, values[0].new_zeros(1, values[0].shape[1])])
    m = index.numel()
    source = torch.full((num_tokens,), m, dtype=torch.int64, device=h.device)
    source.scatter_(0, index, torch.arange(m, device=h.device))
    return _PlaceRows.apply(h, source, index)


class _PlaceRows(torch.autograd.Function):
    """``h[source]`` whose backward is ``grad[index]`` (``index`` the distinct destinations of ``h``'s rows but the
    last, a zero row without gradient): a gather each way, where autograd's gather backward is a scatter-add into
    zeros."""

    @staticmethod
    def forward(ctx, h, source, index):
        ctx.save_for_backward(index)
        return h.index_select(0, source)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        out = grad.new_empty(index.numel() + 1, grad.shape[1])
        torch.index_select(grad, 0, index, out=out[:-1])
        out[-1].zero_()
        return out, None, None


def target_rows_of(y: torch.Tensor, targets: Mapping[str, TargetGroup]) -> dict[str, torch.Tensor]:
    """Each scenario's exposure rows of the encoded tokens ``y``, in its ``token_index`` order: one gather for all
    scenarios, whose backward is one scatter into zeros (a gather per scenario costs a full-size zero tensor and a
    full-size gradient sum per scenario)."""
    if not targets:
        return {}
    rows = torch.cat([g.token_index for g in targets.values()])
    picked = y.index_select(0, rows).split([g.token_index.numel() for g in targets.values()])
    return dict(zip(targets, picked))

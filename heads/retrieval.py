"""Next-item retrieval head (brief section 5): sampled softmax training, full-corpus ranking for evaluation.

Scores are cosines: the query is the L2-normalised (projected) backbone output, items are L2-normalised rows
of an item table::

    q = normalize(P h)            h: [M, d_model] backbone outputs, P: Linear(d_model, D) or identity if D == d_model
    e_j = normalize(E[j])         E: [num_items, D] item table (the input table, shared; or a separate one)
    logit_ij = <q_i, e_j> / temperature

Training (:func:`sampled_softmax_loss`): for each query, the positive against sampled negatives: uniform over
the corpus (one set per row, or one set shared by the batch) or in-batch (the other rows' positives). A
negative that *is* the row's positive (an accidental hit) is masked out, so it is neither a positive nor a
negative. ``full``: against every other item of the corpus (:func:`full_softmax_loss`, the cross-entropy over
the corpus; for catalogues small enough to score whole at every step, e.g. MovieLens or Amazon Beauty).

Evaluation: :meth:`RetrievalHead.topk` and :func:`full_ranks` scan the FULL corpus in chunks of items
(``[M, chunk]`` scores at a time, never ``[M, num_items]``). Ranks are 1-based and *pessimistic*: an item
scoring within ``tol`` of the target counts as ranked before it, so a collapsed model (every score equal)
gets the worst rank, never a lucky one. Optionally each query's own list of ids (its history) is removed
from its candidates before ranking (``exclude_ids``). :func:`hr_ndcg_at_k` turns ranks into HR@K and NDCG@K (one relevant
item: NDCG = 1 / log2(rank + 1) when rank <= K, else 0), averaged over queries, or over users first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recfm.errors import ConfigError, RecfmError
from recfm.foundation.model.config import Negatives


def sampled_softmax_loss(
    query: torch.Tensor,
    positive: torch.Tensor,
    positive_ids: torch.Tensor,
    negatives: torch.Tensor,
    negative_ids: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Summed sampled-softmax cross-entropy of each row's positive against its negatives.

    Args:
        query: ``[M, D]`` (normalised) queries.
        positive: ``[M, D]`` (normalised) positive item embeddings.
        positive_ids: ``[M]`` positive item ids.
        negatives: ``[M, K, D]`` per-row negatives, or ``[K, D]`` negatives shared by all rows.
        negative_ids: ``[M, K]`` or ``[K]``, their ids; where a negative id equals the row's positive id the
            negative is masked out (accidental hit).
        temperature: logits are cosines divided by it.

    Returns:
        scalar: ``sum_i -log softmax([pos_i, neg_i1, ..., neg_iK] / temperature)[0]``.
    """
    pos_logit = (query * positive).sum(-1, keepdim=True)  # [M, 1]
    if negatives.dim() == 2:
        neg_logits = query @ negatives.T  # [M, K]
        hit = negative_ids[None, :] == positive_ids[:, None]
    else:
        neg_logits = torch.einsum("md,mkd->mk", query, negatives)
        hit = negative_ids == positive_ids[:, None]
    neg_logits = neg_logits.masked_fill(hit, float("-inf"))
    logits = torch.cat([pos_logit, neg_logits], dim=1) / temperature
    return -torch.log_softmax(logits, dim=1)[:, 0].sum()


def full_softmax_loss(query: torch.Tensor, items: torch.Tensor, positive_ids: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Summed cross-entropy of each row's positive over the whole corpus: ``query [M, D]``, ``items [N, D]``
    (both normalised), ``positive_ids [M]``. Equals :func:`sampled_softmax_loss` with every item as a negative
    (the row's own positive masked out as an accidental hit)."""
    return F.cross_entropy(query @ items.T / temperature, positive_ids, reduction="sum")


class RetrievalHead(nn.Module):
    """Next-item head: query projection, item table, sampled softmax, full-corpus top-k.

    Args:
        d_model: width of the backbone outputs.
        num_items: corpus size (ids ``0 .. num_items-1``).
        item_dim: ``D``, item embedding width (must match ``item_table`` when given).
        item_table: the input item table to share (e.g. ``TokenEmbedder.table("item")``); ``None``: a
            separate output table of ``num_items x item_dim``.
        temperature: softmax temperature on cosines.
        num_negatives: negatives per row (``uniform``) or per batch (``uniform_shared``); unused for ``in_batch``
            and ``full``.
        negatives: a :class:`Negatives`.

    Example::

        head = RetrievalHead(64, num_items=3706, item_dim=64, num_negatives=128)
        loss_sum = head.loss(h, next_ids)               # h: [M, 64] outputs, next_ids: [M]
        scores, ids = head.topk(h_last, k=10)           # [U, 10] over all 3706 items
    """

    def __init__(
        self,
        d_model: int,
        num_items: int,
        item_dim: int,
        item_table: nn.Embedding | None = None,
        temperature: float = 0.05,
        num_negatives: int = 128,
        negatives: Negatives | str = Negatives.UNIFORM,
    ):
        super().__init__()
        if item_table is not None and (item_table.num_embeddings, item_table.embedding_dim) != (num_items, item_dim):
            shape = (item_table.num_embeddings, item_table.embedding_dim)
            raise ConfigError([f"retrieval head: shared item table is {shape[0]} x {shape[1]}, expected {num_items} x {item_dim}"])
        if temperature <= 0:
            raise ConfigError([f"retrieval head: temperature must be > 0, got {temperature}"])
        self.num_items, self.temperature, self.num_negatives = num_items, temperature, num_negatives
        self.negatives = Negatives(negatives)
        self.items = item_table if item_table is not None else nn.Embedding(num_items, item_dim)
        if item_table is None:
            nn.init.normal_(self.items.weight, std=0.02)
        self.proj = nn.Identity() if item_dim == d_model else nn.Linear(d_model, item_dim, bias=False)

    def query(self, h: torch.Tensor) -> torch.Tensor:
        """``[M, d_model]`` backbone outputs -> ``[M, D]`` unit-norm queries."""
        return F.normalize(self.proj(h), dim=-1)

    def item_embeddings(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Unit-norm item embeddings ``[..., D]`` of ``ids`` (all ``[num_items, D]`` when ``None``)."""
        return F.normalize(self.items.weight if ids is None else self.items(ids), dim=-1)

    def loss(self, h: torch.Tensor, positive_ids: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Summed sampled-softmax loss of ``h: [M, d_model]`` predicting ``positive_ids: [M]`` (divide by M for a mean)."""
        q = self.query(h)
        if self.negatives is Negatives.FULL:
            return full_softmax_loss(q, self.item_embeddings(), positive_ids, self.temperature)
        pos = self.item_embeddings(positive_ids)
        if self.negatives is Negatives.IN_BATCH:
            neg_ids = positive_ids
        else:
            shape = (self.num_negatives,) if self.negatives is Negatives.UNIFORM_SHARED else (h.shape[0], self.num_negatives)
            neg_ids = torch.randint(0, self.num_items, shape, device=h.device, generator=generator)
        return sampled_softmax_loss(q, pos, positive_ids, self.item_embeddings(neg_ids), neg_ids, self.temperature)

    @torch.no_grad()
    def topk(self, h: torch.Tensor, k: int, chunk_size: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` best items of the full corpus for each query: cosines ``[M, k]`` and ids ``[M, k]``, best first."""
        return topk_chunked(self.query(h), self.item_embeddings(), k, chunk_size)

    @torch.no_grad()
    def ranks(self, h: torch.Tensor, target_ids: torch.Tensor, chunk_size: int = 65536,
              exclude_ids: torch.Tensor | None = None, exclude_offsets: torch.Tensor | None = None) -> torch.Tensor:
        """``[M]`` pessimistic 1-based ranks of ``target_ids`` among all items, optionally without each query's
        ``exclude_ids`` (jagged, ``exclude_offsets [M+1]``; see :func:`full_ranks`)."""
        return full_ranks(self.query(h), self.item_embeddings(), target_ids, chunk_size,
                          exclude_ids=exclude_ids, exclude_offsets=exclude_offsets)


def topk_chunked(query: torch.Tensor, items: torch.Tensor, k: int, chunk_size: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` of ``query [M, D] @ items [I, D].T`` scanning items in chunks: ``([M, k], [M, k])``."""
    k = min(k, items.shape[0])
    best = query.new_full((query.shape[0], 0), float("-inf"))
    best_ids = torch.empty(query.shape[0], 0, dtype=torch.long, device=query.device)
    for start in range(0, items.shape[0], chunk_size):
        scores = query @ items[start : start + chunk_size].T  # [M, chunk]
        s, i = scores.topk(min(k, scores.shape[1]), dim=1)
        merged, pick = torch.cat([best, s], dim=1).topk(min(k, best.shape[1] + s.shape[1]), dim=1)
        best_ids = torch.cat([best_ids, i + start], dim=1).gather(1, pick)
        best = merged
    return best, best_ids


def full_ranks(
    query: torch.Tensor,
    items: torch.Tensor,
    target_ids: torch.Tensor,
    chunk_size: int = 65536,
    tol: float = 1e-6,
    exclude_ids: torch.Tensor | None = None,
    exclude_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """1-based rank of each target among ALL items, ties counted pessimistically: ``[M]`` int64.

    ``rank_i = 1 + #{j != target_i, j not excluded for i : score_ij >= score_i,target - tol}`` with
    ``score = query @ items.T``.

    Args:
        exclude_ids: optional ``[E]`` item ids removed from query ``i``'s candidates, jagged by
            ``exclude_offsets [M+1]`` (e.g. the items of the user's input history, as in the published
            HSTU / SASRec full-ranking evaluations). Duplicates are fine. The target itself is never removed.
    """
    target_score = (query * items[target_ids]).sum(-1, keepdim=True)  # [M, 1]
    ahead = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    if exclude_ids is not None:
        if exclude_offsets is None or exclude_offsets.numel() != query.shape[0] + 1:
            raise RecfmError("full_ranks: exclude_offsets must be [M+1] when exclude_ids is given")
        lengths = exclude_offsets[1:] - exclude_offsets[:-1]
        exclude_rows = torch.repeat_interleave(torch.arange(query.shape[0], device=query.device), lengths,
                                               output_size=exclude_ids.numel())  # [E] query of each excluded id
    for start in range(0, items.shape[0], chunk_size):
        scores = query @ items[start : start + chunk_size].T  # [M, chunk]
        ids = torch.arange(start, start + scores.shape[1], device=query.device)
        counted = (scores >= target_score - tol) & (ids[None, :] != target_ids[:, None])
        if exclude_ids is not None:
            inside = (exclude_ids >= start) & (exclude_ids < start + scores.shape[1])
            removed = torch.zeros_like(counted)
            removed[exclude_rows[inside], exclude_ids[inside] - start] = True
            counted &= ~removed
        ahead += counted.sum(1)
    return ahead + 1


def hr_ndcg_at_k(ranks: torch.Tensor, k: int, user_index: torch.Tensor | None = None) -> tuple[float, float]:
    """HR@k and NDCG@k from 1-based ranks of one relevant item per query.

    Args:
        ranks: ``[M]`` ranks (1 = best).
        k: cut-off.
        user_index: optional ``[M]`` user of each query: metrics are then averaged within each user first and
            then over users, so a user with one held-out item weighs as much as one with many.

    Returns:
        ``(hr, ndcg)``: HR = mean of ``rank <= k``; NDCG = mean of ``1 / log2(rank + 1)`` if ``rank <= k`` else 0.
    """
    ranks = ranks.double()
    hit = (ranks <= k).double()
    gain = hit / torch.log2(ranks + 1)
    if user_index is None:
        return float(hit.mean()), float(gain.mean())
    users, inverse = torch.unique(user_index, return_inverse=True)
    count = hit.new_zeros(len(users)).index_add_(0, inverse, torch.ones_like(hit))

    def per_user_mean(values: torch.Tensor) -> float:
        return float((hit.new_zeros(len(users)).index_add_(0, inverse, values) / count).mean())

    return per_user_mean(hit), per_user_mean(gain)

"""full_ranks / RetrievalHead.ranks with per-query excluded ids (the published 'filter the history' rule)."""

from __future__ import annotations

import pytest
import torch

from recfm.errors import RecfmError
from recfm.heads.retrieval import RetrievalHead, full_ranks


def test_excluded_ids_do_not_count_ahead_and_the_target_is_never_excluded():
    s = 0.6, 0.8
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0], list(s)])  # item 2 duplicates item 0
    q = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]])
    target = torch.tensor([0, 4, 1, 3, 1])
    # scores for q0..q3 = [1, 0, 1, -1, .6]; q4 = [0, 1, 0, 0, .8]. Without exclusion the ranks are [2, 3, 4, 5, 1].
    # excluded: q0 {2}      -> the tie is gone: 1
    #           q1 {0, 0}   -> a duplicate counts once; item 2 still ahead: 2
    #           q2 {1, 4}   -> the target (1) stays; item 4 removed: 0 and 2 ahead -> 3
    #           q3 {}       -> 5
    #           q4 {0, 3}   -> nothing was ahead: 1
    ex_ids = torch.tensor([2, 0, 0, 1, 4, 0, 3])
    ex_off = torch.tensor([0, 1, 3, 5, 5, 7])
    for chunk in (1, 2, 3, 100):
        ranks = full_ranks(q, items, target, chunk_size=chunk, exclude_ids=ex_ids, exclude_offsets=ex_off)
        assert ranks.tolist() == [1, 2, 3, 5, 1]
    assert full_ranks(q, items, target).tolist() == [2, 3, 4, 5, 1]


def test_head_ranks_with_exclusion_match_brute_force():
    torch.manual_seed(0)
    head = RetrievalHead(8, num_items=57, item_dim=8)
    h = torch.randn(6, 8)
    target = torch.randint(0, 57, (6,))
    lengths = torch.tensor([0, 3, 10, 1, 5, 20])
    ex_ids = torch.randint(0, 57, (int(lengths.sum()),))
    ex_off = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    scores = head.query(h) @ head.item_embeddings().T  # [6, 57], random: no ties
    expected = []
    for i in range(6):
        removed = set(ex_ids[ex_off[i]:ex_off[i + 1]].tolist()) - {int(target[i])}
        keep = [j for j in range(57) if j not in removed]
        expected.append(1 + int((scores[i, keep] > scores[i, target[i]]).sum()))
    for chunk in (7, 64):
        assert head.ranks(h, target, chunk_size=chunk, exclude_ids=ex_ids, exclude_offsets=ex_off).tolist() == expected


def test_exclusion_needs_offsets_for_every_query():
    with pytest.raises(RecfmError, match="exclude_offsets"):
        full_ranks(torch.ones(2, 2), torch.ones(3, 2), torch.tensor([0, 1]), exclude_ids=torch.tensor([1]))

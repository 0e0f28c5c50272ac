"""MMoE heads and the next-item retrieval head, checked against hand computations and brute force."""

from __future__ import annotations

import math

import pytest
import torch

from recfm.errors import DataError, RecfmError
from recfm.foundation.data.batch import TargetGroup
from recfm.foundation.model.config import HeadKind
from recfm.heads import HEADS
from recfm.heads.mmoe import MMoEHead, weighted_mean
from recfm.heads.retrieval import RetrievalHead, full_ranks, hr_ndcg_at_k, sampled_softmax_loss, topk_chunked
from recfm.scenarios.spec import FeatureSpec, FeatureType, LabelSpec, LabelType, ScenarioSpec, TaskSpec, TaskType, Vocab, VocabKind

ITEM = FeatureSpec("item_id", FeatureType.CATEGORICAL, vocab=Vocab(VocabKind.IDENTITY, 20), dim=4)
FEED = ScenarioSpec(
    "feed",
    (ITEM,),
    labels=(LabelSpec("click"), LabelSpec("spend", LabelType.REGRESSION)),
    tasks=(
        TaskSpec("ctr", TaskType.BINARY, "click", weight=2.0),
        TaskSpec("gmv", TaskType.REGRESSION, "spend", weight=0.5),
        TaskSpec("next", TaskType.NEXT_ITEM, "item_id"),
    ),
)
COUPON = ScenarioSpec("coupon", (ITEM,), labels=(LabelSpec("redeem"),), tasks=(TaskSpec("cvr", TaskType.BINARY, "redeem"),))


def targets(name: str, labels: dict[str, list[float]]) -> TargetGroup:
    n = len(next(iter(labels.values())))
    return TargetGroup(
        name=name, token_index=torch.arange(n), sparse=None, numeric=torch.zeros(n, 0), dense=torch.zeros(n, 0),
        labels={k: torch.tensor(v) for k, v in labels.items()},
    )


def test_every_head_kind_has_a_class():
    assert set(HEADS) == set(HeadKind)


# ------------------------------------------------------------------------------------------------ MMoE


def test_mmoe_shapes_gates_and_shared_experts():
    torch.manual_seed(0)
    head = MMoEHead([FEED, COUPON], d_model=8, num_experts=3, expert_dim=5, tower_dim=4)
    x = {"feed": torch.randn(6, 8), "coupon": torch.randn(2, 8)}
    out = head(x)
    assert {s: {t: v.shape for t, v in d.items()} for s, d in out.items()} == {
        "feed": {"ctr": (6,), "gmv": (6,)},  # the next_item task has no tower
        "coupon": {"cvr": (2,)},
    }
    for scenario in x:
        for g in head.gates(scenario, x[scenario]).values():
            assert g.shape == (x[scenario].shape[0], 3) and (g > 0).all()
            torch.testing.assert_close(g.sum(-1), torch.ones(g.shape[0]))
    # one expert bank for all scenarios; gates and towers per (scenario, task)
    names = [n for n, _ in head.named_parameters()]
    assert sum(n.startswith("expert_") for n in names) == 2
    assert {n.split(".")[1] + "." + n.split(".")[2] for n in names if n.startswith("towers.")} == {"feed.ctr", "feed.gmv", "coupon.cvr"}
    experts = head.expert_weight
    head.add_scenario(ScenarioSpec("hotel", (ITEM,), labels=(LabelSpec("book"),), tasks=(TaskSpec("cvr", TaskType.BINARY, "book"),)))
    assert head.expert_weight is experts and set(head.towers) == {"feed", "coupon", "hotel"}
    with pytest.raises(RecfmError, match="no head for scenario\\(s\\) 'flights'"):
        head({"flights": torch.randn(1, 8)})


def set_tiny(head: MMoEHead) -> None:
    """d_model 2, 2 experts of width 1, tower width 1: expert k reads input coordinate k."""
    with torch.no_grad():
        head.expert_weight.copy_(torch.tensor([[[1.0], [0.0]], [[0.0], [1.0]]]))  # [E=2, d=2, 1]
        head.expert_bias.zero_()
        for scenario in head.towers.values():
            for t in scenario.values():
                t.gate.weight.zero_()
                t.gate.bias.copy_(torch.tensor([0.0, math.log(3.0)]))  # softmax -> [1/4, 3/4]
                t.tower[0].weight.fill_(2.0)
                t.tower[0].bias.zero_()
                t.tower[3].weight.fill_(1.0)
                t.tower[3].bias.fill_(-0.5)


def test_mmoe_logit_and_losses_equal_a_hand_computation():
    head = MMoEHead([FEED, COUPON], d_model=2, num_experts=2, expert_dim=1, tower_dim=1)
    set_tiny(head)
    silu = lambda v: v / (1 + math.exp(-v))  # noqa: E731

    def by_hand(a: float, b: float) -> float:
        mixed = 0.25 * silu(a) + 0.75 * silu(b)  # gate [1/4, 3/4] over experts SiLU(a), SiLU(b)
        return 1.0 * silu(2.0 * mixed) - 0.5  # tower: Linear(2x) -> SiLU -> Linear(x - 0.5)

    x = torch.tensor([[1.0, 0.0], [0.5, -2.0], [0.0, 3.0]])
    logits = head({"feed": x, "coupon": x[:1]})
    expected = [by_hand(*row) for row in x.tolist()]
    torch.testing.assert_close(logits["feed"]["ctr"], torch.tensor(expected))
    torch.testing.assert_close(logits["feed"]["gmv"], torch.tensor(expected))

    click, spend, redeem = [1.0, 0.0, 1.0], [2.0, 0.0, -1.0], [0.0]
    batch = {"feed": targets("feed", {"click": click, "spend": spend}), "coupon": targets("coupon", {"redeem": redeem})}
    losses = {(l.scenario, l.task): l for l in head.losses(logits, batch)}
    bce = lambda z, y: math.log(1 + math.exp(-z)) if y == 1 else math.log(1 + math.exp(z))  # noqa: E731
    ctr = sum(bce(z, y) for z, y in zip(expected, click))
    gmv = sum((z - y) ** 2 for z, y in zip(expected, spend))
    cvr = bce(expected[0], redeem[0])
    assert losses["feed", "ctr"].loss_sum.item() == pytest.approx(ctr, rel=1e-5)
    assert losses["feed", "gmv"].loss_sum.item() == pytest.approx(gmv, rel=1e-5)
    assert losses["coupon", "cvr"].loss_sum.item() == pytest.approx(cvr, rel=1e-5)
    assert [(l.count, l.weight) for l in losses.values()] == [(3, 2.0), (3, 0.5), (1, 1.0)]
    assert weighted_mean(list(losses.values())).item() == pytest.approx(2.0 * ctr / 3 + 0.5 * gmv / 3 + cvr, rel=1e-5)


def test_mmoe_missing_label_is_named():
    head = MMoEHead([COUPON], d_model=2, num_experts=2, expert_dim=1, tower_dim=1)
    logits = head({"coupon": torch.zeros(2, 2)})
    with pytest.raises(DataError, match="'coupon' task 'cvr'.*no label 'redeem'.*labels: click"):
        head.losses(logits, {"coupon": targets("coupon", {"click": [0.0, 1.0]})})


# ------------------------------------------------------------------------------------------- retrieval


def test_sampled_softmax_equals_explicit_formula_and_masks_accidental_hits():
    s = 1 / math.sqrt(2)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([[s, s], [0.0, 1.0]])
    pos_ids = torch.tensor([3, 5])
    neg = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [s, s]])  # shared negatives: ids 7, 8, 3
    neg_ids = torch.tensor([7, 8, 3])
    tau = 0.5
    got = sampled_softmax_loss(q, pos, pos_ids, neg, neg_ids, tau)
    # row 0: positive cos s; negatives 0 and -1; id 3 is its own positive -> dropped
    row0 = -s / tau + math.log(math.exp(s / tau) + math.exp(0 / tau) + math.exp(-1 / tau))
    # row 1: positive cos 1; negatives cos 1, 0, s (id 3 is not row 1's positive)
    row1 = -1 / tau + math.log(math.exp(1 / tau) + math.exp(1 / tau) + math.exp(0) + math.exp(s / tau))
    assert got.item() == pytest.approx(row0 + row1, rel=1e-6)
    # per-row negatives [M, K, D] give the same numbers when every row gets the same set
    per_row = sampled_softmax_loss(q, pos, pos_ids, neg.expand(2, 3, 2), neg_ids.expand(2, 3), tau)
    assert per_row.item() == pytest.approx(row0 + row1, rel=1e-6)


def test_head_loss_in_batch_and_uniform_match_the_explicit_computation():
    torch.manual_seed(0)
    h = torch.randn(5, 6)
    ids = torch.tensor([1, 4, 4, 0, 9])  # rows 1 and 2 share a positive: not each other's negative
    head = RetrievalHead(6, num_items=10, item_dim=3, negatives="in_batch", temperature=0.1)
    q = torch.nn.functional.normalize(head.proj(h), dim=-1)
    e = torch.nn.functional.normalize(head.items.weight, dim=-1)
    cos = q @ e[ids].T  # [5, 5]: column j = row j's positive
    expected = 0.0
    for i in range(5):
        others = [cos[i, j] / 0.1 for j in range(5) if ids[j] != ids[i]]
        expected += -(cos[i, i] / 0.1) + torch.logsumexp(torch.stack([cos[i, i] / 0.1, *others]), 0)
    assert head.loss(h, ids).item() == pytest.approx(float(expected.detach()), rel=1e-5)

    head.negatives = type(head.negatives)("uniform")
    head.num_negatives = 4
    got = head.loss(h, ids, generator=torch.Generator().manual_seed(3))
    neg_ids = torch.randint(0, 10, (5, 4), generator=torch.Generator().manual_seed(3))
    assert got.item() == pytest.approx(sampled_softmax_loss(q, e[ids], ids, e[neg_ids], neg_ids, 0.1).item(), rel=1e-6)


def test_full_softmax_is_sampled_softmax_over_the_whole_corpus():
    torch.manual_seed(1)
    h = torch.randn(6, 8)
    ids = torch.tensor([0, 3, 3, 9, 5, 1])
    head = RetrievalHead(8, num_items=10, item_dim=4, negatives="full", temperature=0.2)
    q = torch.nn.functional.normalize(head.proj(h), dim=-1)
    e = torch.nn.functional.normalize(head.items.weight, dim=-1)
    every = torch.arange(10)  # every item a negative; each row's own positive masked as an accidental hit
    want = sampled_softmax_loss(q, e[ids], ids, e, every, 0.2)
    got = head.loss(h, ids)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    got.backward()  # every item row gets a gradient, not only the positives'
    assert (head.items.weight.grad.abs().sum(1) > 0).all()


def test_shared_item_table_is_the_input_table():
    table = torch.nn.Embedding(10, 6)
    head = RetrievalHead(6, num_items=10, item_dim=6, item_table=table)
    assert head.items.weight is table.weight and isinstance(head.proj, torch.nn.Identity)
    head.loss(torch.randn(3, 6), torch.tensor([1, 2, 3])).backward()
    assert table.weight.grad is not None and table.weight.grad[[1, 2, 3]].abs().sum() > 0


def test_topk_over_the_corpus_equals_brute_force():
    torch.manual_seed(1)
    head = RetrievalHead(8, num_items=103, item_dim=4)
    h = torch.randn(7, 8)
    for chunk in (10, 64, 1000):
        scores, ids = head.topk(h, k=15, chunk_size=chunk)
        brute = head.query(h) @ head.item_embeddings().T
        ref_scores, ref_ids = brute.topk(15, dim=1)
        torch.testing.assert_close(scores, ref_scores)
        assert torch.equal(ids, ref_ids)
        ranks = head.ranks(h, ref_ids[:, 4], chunk_size=chunk)
        assert ranks.tolist() == [5] * 7  # the 5th best item has rank 5 (random scores: no ties)


def test_ranks_count_ties_pessimistically_and_metrics_are_pinned():
    s = 0.6, 0.8
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0], list(s)])  # item 2 duplicates item 0
    q = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]])
    target = torch.tensor([0, 4, 1, 3, 1])
    # scores for q0 = [1, 0, 1, -1, .6]: item 0 ties with item 2 -> rank 2; item 4 behind both -> 3;
    # item 1 (0) behind 0, 2, 4 -> 4; item 3 last -> 5. For q = (0, 1), item 1 is first -> 1.
    ranks = full_ranks(q, items, target, chunk_size=2)
    assert ranks.tolist() == [2, 3, 4, 5, 1]
    assert full_ranks(torch.zeros(1, 2), items, torch.tensor([2])).tolist() == [5]  # all tied: worst rank

    hr, ndcg = hr_ndcg_at_k(ranks, k=3)
    assert hr == pytest.approx(3 / 5)
    assert ndcg == pytest.approx((1 / math.log2(3) + 1 / math.log2(4) + 1) / 5)
    # per user: user 0 has four held-out items, user 1 (the last query) one; each user weighs the same
    hr_u, ndcg_u = hr_ndcg_at_k(ranks, k=3, user_index=torch.tensor([0, 0, 0, 0, 1]))
    assert hr_u == pytest.approx((2 / 4 + 1) / 2)
    assert ndcg_u == pytest.approx(((1 / math.log2(3) + 1 / math.log2(4)) / 4 + 1) / 2)
    assert hr_ndcg_at_k(torch.tensor([10, 11]), k=10) == pytest.approx((0.5, 0.5 / math.log2(11)))

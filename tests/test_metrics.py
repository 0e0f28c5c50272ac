"""AUC / GAUC / log loss against hand-computed values (with ties) and a brute-force pairwise reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recfm.foundation.metrics import auc, gauc, gauc_parts, logloss


def pairwise_auc(y, s) -> float:
    """Reference: fraction of (positive, negative) pairs ranked right, ties count one half."""
    pos = [b for a, b in zip(y, s) if a == 1]
    neg = [b for a, b in zip(y, s) if a == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_hand_example_with_a_tie():
    # positives 0.4, 0.8; negatives 0.1, 0.4: pairs 1 + 0.5 (tie) + 1 + 1 = 3.5 of 4
    assert auc([0, 1, 0, 1], [0.1, 0.4, 0.4, 0.8]) == pytest.approx(0.875)


def test_auc_extremes_and_all_tied():
    assert auc([0, 0, 1, 1], [1, 2, 3, 4]) == 1.0
    assert auc([1, 1, 0, 0], [1, 2, 3, 4]) == 0.0
    assert auc([1, 0, 1, 0, 0], [7, 7, 7, 7, 7]) == pytest.approx(0.5)


def test_auc_single_class_is_nan():
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auc([], []))


def test_auc_matches_pairwise_reference_on_heavy_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 60))
        y = rng.integers(0, 2, n)
        s = rng.integers(0, 5, n).astype(float)  # many ties
        if y.min() == y.max():
            continue
        assert auc(y, s) == pytest.approx(pairwise_auc(y, s), abs=1e-12)


def test_auc_depends_only_on_order():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = rng.normal(size=200)
    assert auc(y, s) == pytest.approx(auc(y, 1 / (1 + np.exp(-3 * s))))


def test_gauc_hand_example():
    # user 7: labels 1,0,0 scores .9,.5,.9 -> (1 + 0.5) / 2 = 0.75, weight 3
    # user 8: labels 0,1 scores .2,.1 -> 0, weight 2
    # user 9: only positives -> skipped (no AUC, no weight)
    labels = [1, 0, 0, 0, 1, 1, 1]
    scores = [0.9, 0.5, 0.9, 0.2, 0.1, 0.3, 0.4]
    groups = [7, 7, 7, 8, 8, 9, 9]
    assert gauc(labels, scores, groups) == pytest.approx((3 * 0.75 + 2 * 0.0) / 5)
    num, den, used = gauc_parts(labels, scores, groups)
    assert (num, den, used) == (pytest.approx(2.25), 5.0, 2)


def test_gauc_matches_per_group_reference_with_unsorted_groups():
    rng = np.random.default_rng(2)
    n = 500
    y = rng.integers(0, 2, n)
    s = rng.integers(0, 6, n).astype(float)
    g = rng.integers(0, 40, n) * 13 - 100  # arbitrary ids, shuffled order
    num = den = 0.0
    for u in np.unique(g):
        m = g == u
        if y[m].min() != y[m].max():
            num += m.sum() * pairwise_auc(y[m], s[m])
            den += m.sum()
    assert gauc(y, s, g) == pytest.approx(num / den, abs=1e-12)


def test_gauc_nan_when_no_group_has_both_classes():
    assert math.isnan(gauc([1, 0], [0.3, 0.2], [1, 2]))


def test_logloss_hand_example_and_clipping():
    assert logloss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert math.isfinite(logloss([1, 0], [0.0, 1.0]))
    assert logloss([1, 0], [0.0, 1.0], eps=1e-3) == pytest.approx(-math.log(1e-3))


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        auc([0, 1], [0.1])
    with pytest.raises(ValueError):
        gauc([0, 1], [0.1, 0.2], [1])

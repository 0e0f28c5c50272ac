"""Ranking and calibration metrics for binary tasks: AUC, GAUC (per-user AUC) and log loss, in numpy.

All functions take 1-D arrays of equal length ``[n]``: ``labels`` in {0, 1} (any numeric or bool dtype),
``scores`` any real numbers (probabilities or logits; only their order matters for AUC/GAUC), ``groups``
any integer ids (users). Scores must not contain NaN.
"""

from __future__ import annotations

import numpy as np


def _as_arrays(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).ravel().astype(bool)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    return y, s


def _tie_runs(first: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of a sorted array marked by ``first`` [n] bool -> (run id [n], run start [r], run length [r])."""
    run = np.cumsum(first) - 1
    start = np.flatnonzero(first)
    length = np.diff(np.append(start, len(first)))
    return run, start, length


def auc(labels, scores) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative).

    Ties between a positive and a negative count one half (Mann-Whitney U from average ranks). Returns
    NaN when ``labels`` holds only one class. Example: ``auc([0, 1, 0, 1], [0.1, 0.4, 0.4, 0.8]) == 0.875``.
    """
    y, s = _as_arrays(labels, scores)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    run, start, length = _tie_runs(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ranks = np.empty(len(s))
    ranks[order] = (start + (length + 1) / 2.0)[run]  # 1-based average rank of each tie run
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc_parts(labels, scores, groups) -> tuple[float, float, int]:
    """Pieces of :func:`gauc`: (sum of n_g * AUC_g, sum of n_g, number of groups used).

    Sums over groups (users) that have both a positive and a negative; useful to combine GAUC over chunks
    that never split a group: ``gauc = sum(parts[0]) / sum(parts[1])``.
    """
    y, s = _as_arrays(labels, scores)
    g = np.asarray(groups).ravel()
    if g.shape != y.shape:
        raise ValueError(f"groups {g.shape} and labels {y.shape} differ in length")
    if len(y) == 0:
        return 0.0, 0.0, 0
    order = np.lexsort((s, g))
    ys, ss, gs = y[order], s[order], g[order]
    gfirst = np.r_[True, gs[1:] != gs[:-1]]
    gid, gstart, gsize = _tie_runs(gfirst)
    run, rstart, rlength = _tie_runs(gfirst | np.r_[True, ss[1:] != ss[:-1]])
    run_group = gid[rstart]
    ranks = (rstart - gstart[run_group] + (rlength + 1) / 2.0)[run]  # 1-based average rank inside the group
    n_pos = np.bincount(gid, weights=ys.astype(np.float64))
    n_neg = gsize - n_pos
    pos_rank_sum = np.bincount(gid, weights=ranks * ys)
    used = (n_pos > 0) & (n_neg > 0)
    auc_g = (pos_rank_sum[used] - n_pos[used] * (n_pos[used] + 1) / 2.0) / (n_pos[used] * n_neg[used])
    return float((gsize[used] * auc_g).sum()), float(gsize[used].sum()), int(used.sum())


def gauc(labels, scores, groups) -> float:
    """Group AUC: per-group (per-user) AUC averaged with weights = the group's number of rows.

    Groups whose rows are all positive or all negative have no AUC and are skipped (neither their AUC nor
    their weight counts). Returns NaN when no group has both classes.
    """
    num, den, _ = gauc_parts(labels, scores, groups)
    return num / den if den > 0 else float("nan")


def logloss(labels, probs, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``probs`` (clipped to ``[eps, 1 - eps]``), natural log."""
    y, p = _as_arrays(labels, probs)
    if len(y) == 0:
        return float("nan")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))

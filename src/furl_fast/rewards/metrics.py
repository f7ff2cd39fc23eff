"""Goal-detection metrics for reward evaluation: numpy, with scipy's ranks for ROC-AUC. Precision,
recall and the best-F1 threshold are a few lines of numpy here: scipy has no F1, and scikit-learn would
be a large dependency for them.

labels: (N,) bool, the true success flag of each frame; scores: (N,) float, a reward's continuous
score (higher = more likely success). Undefined values (AUC or correlation with one class only, or a
constant score) are NaN; precision / recall with an empty denominator are 0 (no positive predicted, or
no positive present), the usual zero-division convention.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

__all__ = ["best_f1_threshold", "pearson", "precision_recall_f1", "roc_auc"]


def _labels_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(bool).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores must have the same length, got {y.size} and {s.size}.")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite (no NaN or inf).")
    return y, s


def precision_recall_f1(labels, predictions) -> tuple[float, float, float]:
    """labels, predictions: (N,) bool -> (precision, recall, F1)."""
    y = np.asarray(labels).astype(bool).reshape(-1)
    p = np.asarray(predictions).astype(bool).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"labels and predictions must have the same length, got {y.size}, {p.size}.")
    tp = int(np.sum(y & p))
    precision = tp / int(p.sum()) if p.any() else 0.0
    recall = tp / int(y.sum()) if y.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return float(precision), float(recall), float(f1)


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve = P(score of a random positive > that of a random negative), ties
    counting 1/2 (Mann-Whitney U with average ranks). NaN without both classes."""
    y, s = _labels_scores(labels, scores)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s, method="average")
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def pearson(labels, scores) -> float:
    """Pearson correlation of the scores with the 0/1 labels (point-biserial); NaN when either is
    constant."""
    y, s = _labels_scores(labels, scores)
    y = y.astype(np.float64)
    yc, sc = y - y.mean(), s - s.mean()
    denom = np.sqrt(np.sum(yc * yc) * np.sum(sc * sc))
    if y.size < 2 or denom == 0.0:
        return float("nan")
    return float(np.clip(np.sum(yc * sc) / denom, -1.0, 1.0))


def best_f1_threshold(labels, scores) -> tuple[float, float, float, float]:
    """The threshold t maximising F1 of the prediction `score >= t`, over every distinct score.

    Returns (t, precision, recall, F1); the smallest such t wins ties in F1 (it has the higher
    recall). With no positive label every F1 is 0: returns (max score, 0, 0, 0) by the same rule.
    """
    y, s = _labels_scores(labels, scores)
    if s.size == 0:
        raise ValueError("best_f1_threshold: no scores.")
    order = np.argsort(-s, kind="stable")
    s_desc, y_desc = s[order], y[order]
    # Predicting score >= t for t = a distinct score takes every item up to that score's last copy.
    last = np.flatnonzero(np.r_[s_desc[1:] != s_desc[:-1], True])
    tp = np.cumsum(y_desc)[last].astype(np.float64)
    predicted = (last + 1).astype(np.float64)
    n_pos = float(y.sum())
    precision = tp / predicted
    recall = tp / n_pos if n_pos > 0 else np.zeros_like(tp)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    best = f1.max()
    i = int(np.flatnonzero(f1 == best)[-1] if best > 0 else 0)  # last = smallest threshold
    return float(s_desc[last[i]]), float(precision[i]), float(recall[i]), float(f1[i])

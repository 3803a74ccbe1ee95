"""Multi-label metrics from scikit-learn: average precision (threshold-free ranking quality per class) and F1 at
per-class thresholds, with the thresholds that maximise each class's F1 on a split (validation).

Macro averages count every class equally over the classes that have a positive in the split (AP and recall
are undefined without one); micro averages pool every (image, class) decision, so frequent classes weigh more.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import average_precision_score, f1_score, precision_recall_curve, precision_score, recall_score

DEFAULT_THRESHOLD = 0.5


def present_classes(targets: np.ndarray) -> np.ndarray:
    """Indices of the classes with at least one positive in `targets` (N×C, 0/1)."""
    return np.flatnonzero(targets.sum(axis=0) > 0)


def class_average_precisions(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AP of each class (NaN for a class without a positive here)."""
    result = np.full(targets.shape[1], np.nan)
    for c in present_classes(targets):
        result[c] = average_precision_score(targets[:, c], scores[:, c])
    return result


def tune_thresholds(targets: np.ndarray, scores: np.ndarray, default: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Per class, the score threshold with the best F1 on these targets (halfway to the next lower score, so an
    unseen score near the boundary falls on the side the data supports); `default` for a class without a positive."""
    thresholds = np.full(targets.shape[1], float(default))
    for c in present_classes(targets):
        precision, recall, cuts = precision_recall_curve(targets[:, c], scores[:, c])
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        best = int(np.argmax(f1))
        thresholds[c] = (cuts[best] + cuts[best - 1]) / 2 if best > 0 else cuts[best]
    return thresholds


def decide(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """0/1 decisions: a class is predicted where its score reaches its threshold."""
    return (scores >= np.asarray(thresholds)[None, :]).astype(np.int64)


def multilabel_metrics(targets: np.ndarray, scores: np.ndarray, thresholds: np.ndarray) -> dict[str, float]:
    """map_macro, map_micro (threshold-free), f1_macro, f1_micro (at `thresholds`); without split prefix."""
    present = present_classes(targets)
    if not len(present):
        return {}
    predicted = decide(scores, thresholds)
    with warnings.catch_warnings():  # a class never predicted has no precision: scored 0, as intended
        warnings.simplefilter("ignore")
        return {"map_macro": float(np.nanmean(class_average_precisions(targets, scores))),
                "map_micro": float(average_precision_score(targets.ravel(), scores.ravel())),
                "f1_macro": float(f1_score(targets, predicted, average="macro", labels=present, zero_division=0)),
                "f1_micro": float(f1_score(targets, predicted, average="micro", zero_division=0))}


def per_class_rows(targets: np.ndarray, scores: np.ndarray, thresholds: np.ndarray, classes: list[str]) -> list[dict]:
    """One row per class: AP, threshold, precision, recall and F1 at it, positives in the split."""
    predicted = decide(scores, thresholds)
    ap = class_average_precisions(targets, scores)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c, name in enumerate(classes):
            truth, guess = targets[:, c], predicted[:, c]
            rows.append({"class": name, "ap": "" if np.isnan(ap[c]) else round(float(ap[c]), 6),
                         "threshold": round(float(thresholds[c]), 6),
                         "precision": round(float(precision_score(truth, guess, zero_division=0)), 6),
                         "recall": round(float(recall_score(truth, guess, zero_division=0)), 6),
                         "f1": round(float(f1_score(truth, guess, zero_division=0)), 6),
                         "positives": int(truth.sum()), "predicted": int(guess.sum())})
    return rows

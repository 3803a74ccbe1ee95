"""Segmentation metrics from scikit-learn: a confusion matrix per batch over the non-ignored pixels, summed,
and jaccard_score / accuracy_score on the summed matrix (its cells as weighted (true, predicted) pairs)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, jaccard_score


def segmentation_metrics(matrix: np.ndarray, classes: list[str]) -> dict[str, float]:
    """miou (mean over the classes present in labels or predictions), iou/<class>, pixel_accuracy, from a
    summed confusion matrix (rows: truth, columns: prediction)."""
    count = len(classes)
    truth, predicted = np.divmod(np.arange(count * count), count)
    weights = matrix.ravel().astype(np.float64)
    if weights.sum() == 0:
        return {}
    ious = jaccard_score(truth, predicted, labels=list(range(count)), average=None, sample_weight=weights,
                         zero_division=0)
    present = (matrix.sum(axis=0) + matrix.sum(axis=1)) > 0  # a class neither labelled nor predicted has no IoU
    metrics = {"miou": float(ious[present].mean()),
               "pixel_accuracy": float(accuracy_score(truth, predicted, sample_weight=weights))}
    metrics.update({f"iou/{name}": float(iou) for name, iou, seen in zip(classes, ious, present) if seen})
    return metrics


def batch_confusion(masks: torch.Tensor, predictions: torch.Tensor, count: int, ignore_index: int) -> np.ndarray:
    valid = masks != ignore_index
    return confusion_matrix(masks[valid].numpy().ravel(), predictions[valid].numpy().ravel(),
                            labels=list(range(count)))

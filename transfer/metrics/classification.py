"""Metrics and reports for classification, all computed by scikit-learn.

Metric names are `split/name` (`test/top1`); accuracies are fractions in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.metrics import (ConfusionMatrixDisplay, balanced_accuracy_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support, top_k_accuracy_score)

from transfer.files import save_figure, write_csv, write_dict_rows


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
                           split: str, top_k: int = 5) -> dict[str, float]:
    scores = logits.float().softmax(dim=1).numpy()
    truth = labels.numpy()
    predicted = scores.argmax(axis=1)
    every_label = np.arange(num_classes)
    present = np.union1d(truth, predicted)  # a class absent from truth and predictions says nothing
    metrics = {
        "top1": float((predicted == truth).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, labels=present, average="macro", zero_division=0)),
        "loss": float(torch.nn.functional.cross_entropy(logits.float(), labels).item()),
    }
    k = min(top_k, num_classes - 1)
    if k > 1:
        metrics[f"top{k}"] = float(top_k_accuracy_score(truth, scores, k=k, labels=every_label))
    return {f"{split}/{name}": value for name, value in metrics.items()}


def per_class_table(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> list[dict]:
    predicted = logits.argmax(dim=1).numpy()
    precision, recall, f1, support = precision_recall_fscore_support(
        labels.numpy(), predicted, labels=np.arange(len(classes)), zero_division=0)
    return [{"class": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, precision, recall, f1, support)]


def write_report(folder: Path, split: str, logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> None:
    """per-class CSV, confusion matrix CSV and PNG for one split."""
    rows = per_class_table(logits, labels, classes)
    write_dict_rows(folder / f"{split}_per_class.csv", rows)
    matrix = confusion_matrix(labels.numpy(), logits.argmax(dim=1).numpy(), labels=np.arange(len(classes)))
    write_csv(folder / f"{split}_confusion.csv", ["true\\predicted", *classes],
              [[name, *row] for name, row in zip(classes, matrix.tolist())])
    plot_confusion(matrix, classes, folder / f"{split}_confusion.png", title=f"{split} confusion matrix")


def top_losses(logits: torch.Tensor, labels: torch.Tensor, count: int) -> list[dict]:
    """The `count` misclassified samples with the highest loss (fastai's top losses), most confidently wrong
    first: positions in `logits`, with the true and predicted class, the predicted probability and the loss."""
    scores = logits.float().softmax(dim=1)
    losses = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    predicted = scores.argmax(dim=1)
    wrong = torch.nonzero(predicted != labels).flatten()
    chosen = wrong[torch.argsort(losses[wrong], descending=True)[:count]]
    return [{"position": int(i), "true": int(labels[i]), "predicted": int(predicted[i]),
             "confidence": float(scores[i, predicted[i]]), "loss": float(losses[i])} for i in chosen]


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    side = max(4.0, 0.45 * len(classes) + 2)
    figure = Figure(figsize=(side, side))
    axes = figure.subplots()
    ConfusionMatrixDisplay(matrix, display_labels=classes).plot(
        ax=axes, colorbar=False, xticks_rotation="vertical", include_values=len(classes) <= 30)
    axes.set_title(title)
    figure.tight_layout()
    save_figure(figure, path)

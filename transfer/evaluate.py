"""Metrics and reports for classification, all computed by scikit-learn.

Metric names are `split/name` (`test/top1`); accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import (balanced_accuracy_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support, top_k_accuracy_score)


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
    folder.mkdir(parents=True, exist_ok=True)
    rows = per_class_table(logits, labels, classes)
    _write_csv(folder / f"{split}_per_class.csv", rows)
    matrix = confusion_matrix(labels.numpy(), logits.argmax(dim=1).numpy(), labels=np.arange(len(classes)))
    with open(folder / f"{split}_confusion.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true\\predicted", *classes])
        writer.writerows([[name, *row] for name, row in zip(classes, matrix.tolist())])
    plot_confusion(matrix, classes, folder / f"{split}_confusion.png", title=f"{split} confusion matrix")


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    side = max(4.0, 0.45 * len(classes) + 2)
    figure, axes = plt.subplots(figsize=(side, side))
    ConfusionMatrixDisplay(matrix, display_labels=classes).plot(
        ax=axes, colorbar=False, xticks_rotation="vertical", include_values=len(classes) <= 30)
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch, train beside val."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (loss_axes, acc_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for key, axes in (("loss", loss_axes), ("top1", acc_axes)):
        for split in ("train", "val"):
            points = [(e, row[f"{split}/{key}"]) for e, row in zip(epochs, history) if f"{split}/{key}" in row]
            if points:
                axes.plot(*zip(*points), marker="o", label=split)
        axes.set_xlabel("epoch")
        axes.set_title(key)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_json(path: Path, payload: dict) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    temporary.replace(path)

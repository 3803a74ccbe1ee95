"""Classification's loss and sample mixing: mixup/cutmix, label smoothing, class weights.

- Mixup/CutMix: timm's `Mixup`, always given the dataset's class count and the configured label
  smoothing (its defaults are 1000 classes and 0.1). It needs an even batch: the training loader drops
  its last incomplete batch, and an odd batch that remains (a dataset smaller than one batch) is not mixed.
- Loss: cross-entropy with label smoothing, optionally class-weighted (scikit-learn's
  `compute_class_weight('balanced')`); with mixup the targets are soft and already smoothed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from transfer.config import require

CLASS_WEIGHTS = (None, "none", "balanced")
MIXUP_MODES = ("batch", "pair", "elem")


class Mixer:
    """(images, labels) → (images, targets): timm's Mixup when configured, else the labels unchanged."""

    def __init__(self, num_classes: int, label_smoothing: float, epochs: int, mixup_alpha: float = 0.0,
                 cutmix_alpha: float = 0.0, prob: float = 1.0, switch_prob: float = 0.5, mode: str = "batch",
                 off_epochs: int = 0) -> None:
        require(mode, MIXUP_MODES, "mixup.mode")
        self.enabled = (mixup_alpha > 0 or cutmix_alpha > 0) and prob > 0
        self.last_epoch = epochs - int(off_epochs or 0)  # epochs from here on train without mixing
        self.num_classes, self.smoothing = num_classes, label_smoothing
        self.mixup = None
        if self.enabled:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob,
                               mode=mode, label_smoothing=label_smoothing, num_classes=num_classes)

    def active(self, epoch: int) -> bool:
        return self.enabled and epoch < self.last_epoch

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """With mixing configured the targets are always soft and smoothed, mixed or not (odd batch, last
        `off_epochs`), so the loss treats every batch alike."""
        if not self.enabled:
            return images, labels
        if not self.active(epoch) or len(images) % 2:
            from timm.data.mixup import mixup_target

            return images, mixup_target(labels, self.num_classes, smoothing=self.smoothing)
        return self.mixup(images, labels)


def build_criterion(label_smoothing: float, class_weight: str | None, train_labels: list[int], num_classes: int,
                    mixing: bool) -> nn.Module:
    """Cross-entropy; with mixup the (soft) targets carry the smoothing, so the loss adds none."""
    require(class_weight, CLASS_WEIGHTS, "trainer.class_weight")
    weight = class_weights(train_labels, num_classes) if class_weight == "balanced" else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=0.0 if mixing else label_smoothing)


def class_weights(labels: list[int], num_classes: int) -> torch.Tensor:
    """scikit-learn's 'balanced' weights, n_samples / (n_classes * count); a class absent from training gets 1."""
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.asarray(labels)
    present = np.unique(labels)
    weights = np.ones(num_classes, dtype=np.float32)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return torch.tensor(weights, dtype=torch.float32)

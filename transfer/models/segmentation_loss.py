"""Segmentation losses: cross-entropy (torch) and smp's Dice and focal losses, alone or summed ("ce+dice").

Dice optimises the overlap each class's mask has with its prediction, so small classes weigh as much as
the background; cross-entropy keeps per-pixel gradients well behaved. Their sum is the usual compromise."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F

from transfer.config import require

LOSSES = ("ce", "dice", "focal")


def _ce(ignore_index: int, label_smoothing: float) -> Callable:
    return lambda logits, masks: F.cross_entropy(logits, masks, ignore_index=ignore_index,
                                                 label_smoothing=label_smoothing)


def _dice(ignore_index: int, label_smoothing: float) -> Callable:
    from segmentation_models_pytorch.losses import DiceLoss

    return DiceLoss("multiclass", ignore_index=ignore_index)


def _focal(ignore_index: int, label_smoothing: float) -> Callable:
    from segmentation_models_pytorch.losses import FocalLoss

    return FocalLoss("multiclass", ignore_index=ignore_index)


BUILDERS = {"ce": _ce, "dice": _dice, "focal": _focal}


def loss_terms(name: str) -> list[str]:
    """'ce+dice' → ['ce', 'dice'], each checked against the losses there are."""
    return [require(term.strip(), LOSSES, "task.loss") for term in str(name).split("+")]


def build_loss(name: str, ignore_index: int, label_smoothing: float = 0.0) -> Callable:
    """(logits N×C×H×W float, masks N×H×W long) → the summed terms of `name`; pixels equal to ignore_index count
    in none of them."""
    terms = [BUILDERS[term](ignore_index, label_smoothing) for term in loss_terms(name)]
    return lambda logits, masks: sum(term(logits, masks) for term in terms)

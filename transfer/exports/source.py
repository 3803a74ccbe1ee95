"""The fine-tuned model of one checkpoint as an export sees it, and what each format can take."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from transfer.checkpoint import CheckpointFacts, choose_weights, load_checkpoint
from transfer.errors import UserError
from transfer.models.backbone import model_from_checkpoint
from transfer.models.features import backbone_as_classifier

FORMATS = ("timm", "backbone", "onnx", "torchscript")
# tasks whose whole model is a timm classifier (multi-label: logits read through a sigmoid per class)
CLASSIFIER_TASKS = ("classification", "multilabel")
READING_KEY = "transfer_reading"  # a timm folder's config.json entry for Source.reading (timm keeps unknown keys)
SOFTMAX_READING = {"task": "classification", "activation": "softmax"}  # also what an export without one means
TOLERANCE = {"timm": 1e-5, "backbone": 1e-5, "onnx": 1e-4, "torchscript": 1e-4}


@dataclass
class Source(CheckpointFacts):
    """The fine-tuned model of one checkpoint, plus what its model card tells about it."""

    path: Path
    checkpoint: dict
    model: nn.Module
    weights: str  # "model" or "ema": which of the checkpoint's weights the model holds
    task: str = "classification"  # segmentation / detection: `model` is the headless classifier around the backbone
    untrained: tuple[str, ...] = ()  # its tensors the dense model's backbone did not cover (left out of exports)

    @property
    def name(self) -> str:
        return self.checkpoint["config"]["model"]["name"]

    @property
    def reading(self) -> dict:
        """How a classifier export's logits become predictions, stored with every format so that `transfer
        predict` on the export decides as it does on the checkpoint: softmax over classes, or (multi-label) a
        sigmoid per class against the thresholds tuned with these weights."""
        if self.task != "multilabel":
            return dict(SOFTMAX_READING)
        task = self.checkpoint["config"].get("task", {})
        thresholds = self.checkpoint.get("thresholds") or [float(task.get("threshold", 0.5))] * len(self.classes)
        return {"task": "multilabel", "activation": "sigmoid", "thresholds": [float(t) for t in thresholds],
                "label_separator": str(task.get("label_separator", " "))}


@dataclass
class Check:
    """How a written export compared with the fine-tuned model when loaded back."""

    difference: float | None  # max abs difference; None when there was nothing to compare with
    tolerance: float
    batch: tuple[int, ...]
    how: str  # the consumer call that loaded it back


def load_source(path: Path, weights: str = "auto") -> Source:
    checkpoint = load_checkpoint(path)
    missing = [key for key in ("config", "preprocess") if key not in checkpoint]
    if missing:
        raise UserError(f"{path} has no {' or '.join(missing)} inside: export needs a checkpoint written by "
                        "`transfer train`.")
    state, chosen = choose_weights(checkpoint, weights, path)
    if checkpoint.get("task", "classification") not in CLASSIFIER_TASKS:
        model, untrained = backbone_as_classifier(checkpoint["config"]["model"]["name"], state)
        return Source(path, checkpoint, model, chosen, checkpoint["task"], tuple(untrained))
    model = model_from_checkpoint({**checkpoint, "model": state})
    return Source(path, checkpoint, model, chosen, checkpoint.get("task", "classification"))


def check_dense_formats(source: Source, formats: tuple[str, ...]) -> None:
    """A segmentation or detection checkpoint exports its fine-tuned backbone: format=backbone, or timm (headless)
    when the backbone covers the whole classifier body."""
    if source.task in CLASSIFIER_TASKS:
        return
    other = [fmt for fmt in formats if fmt not in ("backbone", "timm")]
    if other:
        raise UserError(f"{source.path} is a {source.task} checkpoint: export its backbone with format=backbone "
                        f"(format={other[0]} exports classifiers).")
    if "timm" in formats and source.untrained:
        raise UserError(f"{source.path} is a {source.task} checkpoint whose backbone stops before "
                        f"{len(source.untrained)} tensors of {source.name}'s classifier body (e.g. "
                        f"{source.untrained[0]}), which were never trained: export format=backbone.")

"""Multi-label classification: any number of classes per image (none included), a timm classifier whose logits
go through a sigmoid per class, binary cross-entropy (or timm's asymmetric loss), scikit-learn's AP and F1.

Deciding needs a threshold per class. The one that maximises each class's F1 on the validation split is tuned at
every validation, travels with the weights in the checkpoint (`thresholds`), and is what the test split, `transfer
eval` and `transfer predict` use; nothing is ever tuned on the split being reported, except validation's own F1
(optimistic, like any figure of the split that chose something). Without a val split: `task.threshold` for all.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from transfer.config import require
from transfer.data.cache import CACHE_KINDS
from transfer.data.labelsets import build_label_splits, manifest_path, read_label_manifest, relabel_sets
from transfer.data.loaders import build_datasets, choose_split, same_root
from transfer.data.sources import DataSplits
from transfer.errors import UserError
from transfer.files import write_csv, write_dict_rows
from transfer.metrics.multilabel import (DEFAULT_THRESHOLD, decide, multilabel_metrics, per_class_rows,
                                         tune_thresholds)
from transfer.models.backbone import build_model
from transfer.models.inference import predict_logits
from transfer.tasks.base import Evaluation, Runtime, Task, TaskData, image_logits

LOSSES = ("bce", "asymmetric")
PREDICTIONS_FILE = "predictions.csv"


class MultiLabel(Task):
    name = "multilabel"
    unsupported = {
        "trainer.label_smoothing": ((), "it smooths one softmax label; multi-label targets are per-class 0/1 "
                                        "(trainer.label_smoothing=null)"),
        "trainer.top_k": ((), "top-k accuracy is a single-label metric (trainer.top_k=null)"),
        "trainer.class_weight": ((), "class weights of a softmax loss; multi-label has none "
                                     "(trainer.class_weight=null; task.loss=asymmetric down-weights easy negatives)"),
        "trainer.tta": ((), "test-time augmentation averages softmax probabilities (trainer.tta=none)"),
        "trainer.feature_cache": ((), "the feature cache serves classification's linear probe "
                                      "(trainer.feature_cache=auto)"),
        "data.sampler": (("random",), "the balanced sampler needs one class per image (data.sampler=random)"),
        "mixup.mixup_alpha": ((), "mixup here mixes one-hot labels (mixup=none)"),
        "mixup.cutmix_alpha": ((), "cutmix here mixes one-hot labels (mixup=none)"),
    }

    def __init__(self) -> None:
        self.classes: list[str] = []
        self.criterion: nn.Module | None = None
        self.thresholds: np.ndarray | None = None  # per class: saved with the weights, used by eval and predict
        self.tuning_set: Dataset | None = None  # the split whose scoring tunes the thresholds (training's val)
        self.default_threshold = DEFAULT_THRESHOLD
        self.label_separator = " "
        self.preprocess_used: dict | None = None

    # ---- data and model

    def index(self, cfg: DictConfig) -> DataSplits:
        """The records of each split, from the manifest at data.root and the task's manifest keys."""
        require(cfg.data.cache, CACHE_KINDS, "data.cache")
        require(cfg.data.on_bad_image, ("skip", "error"), "data.on_bad_image")
        self.label_separator = str(cfg.task.label_separator)
        return build_label_splits(cfg.data.root, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed,
                                  cfg.data.get("allow_outside_root", False), **manifest_options(cfg.task))

    def build_data(self, cfg: DictConfig, preprocess: dict) -> TaskData:
        splits = self.index(cfg)
        data = build_datasets(splits, cfg.data, preprocess, OmegaConf.to_container(cfg.augment.train, resolve=True),
                              cfg.seed)
        self.classes, self.preprocess_used = list(data.classes), preprocess
        self.default_threshold = float(cfg.task.threshold)
        self.thresholds = np.full(len(self.classes), self.default_threshold)
        self.tuning_set = data.datasets.get("val") if cfg.task.tune_thresholds else None
        return TaskData(data.classes, data.datasets, data.skipped, data.description)

    def build_model(self, cfg: DictConfig, classes: list[str], preprocess: dict) -> tuple[nn.Module, str]:
        return build_model(num_classes=len(classes), **cfg.model)

    def prepare(self, cfg: DictConfig, data: TaskData) -> None:
        self.criterion = build_loss(**{key: cfg.task[key] for key in ("loss", "gamma_neg", "gamma_pos", "clip")})

    # ---- training and evaluation

    def training_step(self, model: nn.Module, batch: dict, runtime: Runtime) -> tuple[torch.Tensor, dict]:
        targets = batch["label"].to(runtime.device, non_blocking=True).float()
        logits = model(runtime.normalize(batch["image"]))
        return self.criterion(logits.float(), targets), {}

    def metric_modes(self, classes: list[str]) -> dict[str, str]:
        return {"map_macro": "max", "map_micro": "max", "f1_macro": "max", "f1_micro": "max", "loss": "min"}

    def infer(self, model: nn.Module, loader, runtime: Runtime) -> tuple:
        """(logits, targets, dataset indices, skipped files, whether this split tunes the thresholds)."""
        logits, targets, indices, skipped = predict_logits(model, loader, runtime.normalize, runtime.amp_dtype)
        return logits, targets, indices, skipped, self.tuning_set is not None and loader.dataset is self.tuning_set

    def score(self, parts: list[tuple]) -> Evaluation:
        """Metrics of every share in dataset order; the tuning split first sets the thresholds it is scored at.
        loss is binary cross-entropy per (image, class) whatever task.loss trains with, so runs compare."""
        kept = [part for part in parts if len(part[0])]
        if not kept:
            raise UserError("no readable images to evaluate.")
        indices = torch.cat([part[2] for part in kept])
        order = torch.argsort(indices)
        logits = torch.cat([part[0] for part in kept])[order].float()
        targets = torch.cat([part[1] for part in kept])[order].float()
        scores, truth = logits.sigmoid().numpy(), targets.numpy()
        if any(part[4] for part in parts):
            self.thresholds = tune_thresholds(truth, scores, self.default_threshold)
        thresholds = self.current_thresholds()
        metrics = {"loss": float(F.binary_cross_entropy_with_logits(logits, targets)),
                   **multilabel_metrics(truth, scores, thresholds)}
        skipped = [item for part in parts for item in part[3]]
        return Evaluation(metrics, skipped, (scores, truth, indices[order], thresholds))

    def current_thresholds(self) -> np.ndarray:
        if self.thresholds is None:
            return np.full(len(self.classes), self.default_threshold)
        return np.asarray(self.thresholds, dtype=np.float64)

    def report(self, folder: Path, split: str, evaluation: Evaluation, dataset: Dataset | None = None) -> None:
        """SPLIT_per_class.csv (AP, threshold, precision, recall, F1 per class; report.html shows it) and, with the
        split's images, SPLIT_predictions.csv."""
        scores, truth, indices, thresholds = evaluation.outputs
        write_dict_rows(folder / f"{split}_per_class.csv", per_class_rows(truth, scores, thresholds, self.classes))
        if dataset is not None:
            predicted = decide(scores, thresholds)
            rows = ([dataset.records[int(i)].name, self.joined(t), self.joined(p), *(f"{s:.6f}" for s in row)]
                    for i, t, p, row in zip(indices.tolist(), truth, predicted, scores))
            write_csv(folder / f"{split}_predictions.csv", ["path", "true", "predicted", *self.classes], rows)

    def joined(self, flags: np.ndarray) -> str:
        """The classes flagged 1, joined as a manifest's labels column joins them."""
        return self.label_separator.join(name for name, flag in zip(self.classes, flags) if flag >= 0.5)

    def checkpoint_entries(self) -> dict:
        return {"thresholds": [float(value) for value in self.current_thresholds()]}

    def restore(self, checkpoint: dict) -> None:
        """The checkpoint's classes, preprocessing and thresholds (tuned with its weights)."""
        task = checkpoint["config"].get("task", {})
        self.classes, self.preprocess_used = list(checkpoint["classes"]), dict(checkpoint["preprocess"])
        self.default_threshold = float(task.get("threshold", DEFAULT_THRESHOLD))
        self.label_separator = str(task.get("label_separator", " "))
        saved = checkpoint.get("thresholds")
        self.thresholds = np.asarray(saved, dtype=np.float64) if saved is not None else None

    def restore_reading(self, classes: list[str], reading: dict) -> None:
        """An export's classes and decision rule (exports/source.py: Source.reading): predict on a timm folder or
        ONNX file writes the label sets the checkpoint's own predict writes."""
        self.classes, self.label_separator = list(classes), str(reading["label_separator"])
        self.thresholds = np.asarray(reading["thresholds"], dtype=np.float64)

    def load_best(self, checkpoint: dict) -> None:
        """The thresholds tuned with the best weights: test is scored at them (val is tuned again if rescored)."""
        self.thresholds = np.asarray(checkpoint["thresholds"], dtype=np.float64)

    def eval_dataset(self, cfg: DictConfig, preprocess: dict, split: str | None, trained_root: str | None,
                     classes: list[str]) -> tuple[str, Dataset, TaskData]:
        """The run's manifest split exactly as training split it, or another manifest taken as it is (its split
        column, or all of its rows: split=all); targets follow the checkpoint's class order by name."""
        if same_root(cfg.data.root, trained_root):
            splits = relabel_sets(self.index(cfg), classes)
        else:
            options = {**manifest_options(cfg.task), "classes": None}
            splits = relabel_sets(read_label_manifest(manifest_path(cfg.data.root), **options,
                                                      allow_outside_root=cfg.data.get("allow_outside_root", False)),
                                  classes)
        chosen = choose_split(split, splits)
        records = [r for rs in splits.splits.values() for r in rs] if chosen == "all" else splits.splits[chosen]
        if not records:
            raise UserError(f"split {chosen} of {splits.description} has no images. Choose another split=.")
        only = DataSplits(list(classes), {"eval": records}, splits.skipped, splits.description)
        built = build_datasets(only, cfg.data, preprocess, [], seed=0)
        self.classes, self.tuning_set = list(classes), None
        return chosen, built.datasets["eval"], TaskData(list(classes), built.datasets, built.skipped,
                                                        splits.description)

    def picture(self, sample: dict) -> tuple[np.ndarray, str]:
        return sample["image"].permute(1, 2, 0).numpy(), self.joined(np.asarray(sample["label"])) or "(none)"

    # ---- prediction

    @torch.no_grad()
    def predict(self, model: nn.Module, images: list[np.ndarray], runtime: Runtime) -> list[np.ndarray]:
        """Each image's per-class probabilities, through the evaluation transform (the pixels eval sees)."""
        return list(image_logits(model, images, self.preprocess_used, runtime).sigmoid().cpu().numpy())

    def labelled(self, scores: np.ndarray) -> dict:
        """One image's predicted label set (at the thresholds) and every class's probability, for the Python API."""
        chosen = decide(scores[None], self.current_thresholds())[0]
        return {"labels": [name for name, flag in zip(self.classes, chosen) if flag],
                "scores": {name: float(score) for name, score in zip(self.classes, scores)}}

    def write_predictions(self, chunks: Iterable[tuple[list[str], list[np.ndarray]]], out: Path) -> int:
        """OUT/predictions.csv: per image its name, the predicted label set (classes at or above their thresholds,
        joined by task.label_separator) and every class's probability. Returns the number of images."""
        thresholds = self.current_thresholds()
        rows = [[name, self.joined(decide(scores[None], thresholds)[0]), *(f"{s:.6f}" for s in scores)]
                for names, outputs in chunks for name, scores in zip(names, outputs)]
        if rows:
            write_csv(out / PREDICTIONS_FILE, ["image", "labels", *self.classes], rows)
        return len(rows)


def manifest_options(task: DictConfig) -> dict:
    """The task keys that read a manifest, as read_label_manifest's keyword arguments."""
    classes = task.get("classes")
    return {"label_separator": str(task.label_separator), "allow_empty": bool(task.allow_empty),
            "classes": [str(name) for name in classes] if classes is not None else None}


def build_loss(loss: str, gamma_neg: float, gamma_pos: float, clip: float | None) -> nn.Module:
    """bce: torch's BCE with logits; asymmetric: timm's ASL (gamma_neg, gamma_pos, clip), averaged per (image,
    class) like BCE so learning rates carry over."""
    if require(loss, LOSSES, "task.loss") == "bce":
        return nn.BCEWithLogitsLoss()
    from timm.loss import AsymmetricLossMultiLabel

    return AsymmetricLossMultiLabel(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, reduction="mean")

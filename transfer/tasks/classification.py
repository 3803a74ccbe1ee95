"""Image classification: one label per image, a timm classifier, cross-entropy, scikit-learn's metrics.

Its own techniques: mixup / cutmix and label smoothing (tasks/mixing.py), class-weighted loss, the
balanced sampler, test-time augmentation of evaluation (models/tta.py), and the linear-probe shortcut that
trains the head on cached features (tasks/probe.py).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from transfer.data.loaders import build_datasets, choose_split, eval_splits, index_data
from transfer.data.sources import DataSplits
from transfer.errors import UserError
from transfer.files import save_picture, write_csv, write_dict_rows
from transfer.metrics.classification import classification_metrics, top_losses, write_report
from transfer.models.backbone import build_model
from transfer.models.inference import predict_logits
from transfer.models.tta import with_tta
from transfer.tasks.base import Evaluation, Runtime, Task, TaskData, image_logits
from transfer.tasks.mixing import Mixer, build_criterion
from transfer.tasks.probe import train_on_features

THUMBNAIL_HEIGHT = 128  # a 28 px image enlarged (whole factors, nearest) to stay legible in report.html


class Classification(Task):
    name = "classification"

    def __init__(self) -> None:
        self.mixer: Mixer | None = None
        self.criterion: nn.Module | None = None
        self.top_k = 5
        self.classes: list[str] = []
        self.preprocess_used: dict | None = None
        self.top_losses = 0  # held-out images drawn in the report, most confidently wrong first (task.top_losses)

    # ---- data and model

    def build_data(self, cfg: DictConfig, preprocess: dict) -> TaskData:
        splits = index_data(cfg.data)
        data = build_datasets(splits, cfg.data, preprocess, OmegaConf.to_container(cfg.augment.train, resolve=True),
                              cfg.seed)
        self.classes = data.classes
        return TaskData(data.classes, data.datasets, data.skipped, data.description)

    def build_model(self, cfg: DictConfig, classes: list[str], preprocess: dict) -> tuple[nn.Module, str]:
        return build_model(num_classes=len(classes), **cfg.model)

    def prepare(self, cfg: DictConfig, data: TaskData) -> None:
        trainer = cfg.trainer
        self.top_k = int(trainer.get("top_k") or 5)
        self.top_losses = int(cfg.task.get("top_losses") or 0)
        self.mixer = Mixer(len(data.classes), trainer.label_smoothing, trainer.epochs, **dict(cfg.get("mixup") or {}))
        if self.mixer.enabled and cfg.data.batch_size % 2:
            raise UserError(f"mixup and cutmix mix pairs of images: data.batch_size={cfg.data.batch_size} must be "
                            "even.")
        labels = [record.label for record in data.datasets["train"].records]
        self.criterion = build_criterion(trainer.label_smoothing, trainer.get("class_weight"), labels,
                                         len(data.classes), self.mixer.enabled)
        self.plain_criterion = build_criterion(trainer.label_smoothing, trainer.get("class_weight"), labels,
                                               len(data.classes), mixing=False) if self.mixer.enabled else self.criterion

    @staticmethod
    def batch_size(batch: dict) -> int:
        return len(batch["label"])

    # ---- training

    def training_step(self, model: nn.Module, batch: dict, runtime: Runtime) -> tuple[torch.Tensor, dict]:
        labels = batch["label"].to(runtime.device, non_blocking=True)
        images = runtime.normalize(batch["image"])
        if runtime.mixing:
            images, targets = self.mixer(images, labels, runtime.epoch)  # mixup/cutmix: soft targets
            criterion = self.criterion
        else:
            targets, criterion = labels, self.plain_criterion
        logits = model(images)
        loss = criterion.to(logits.device)(logits, targets)
        return loss, {"top1": (logits.detach().argmax(dim=1) == labels).sum().item()}

    def shortcut(self, cfg, model, data, loaders, runtime, run_dir, log):
        model, loaders, normalize, seconds = train_on_features(cfg, model, data, loaders, runtime.normalize,
                                                               runtime.amp_dtype, runtime.device, run_dir, log)
        return model, loaders, Runtime(runtime.device, runtime.amp_dtype, normalize), seconds

    # ---- evaluation

    def metric_modes(self, classes: list[str]) -> dict[str, str]:
        modes = {"top1": "max", "balanced_accuracy": "max", "macro_f1": "max", "loss": "min"}
        k = min(self.top_k, len(classes) - 1)
        if k > 1:
            modes[f"top{k}"] = "max"
        return modes

    def infer(self, model: nn.Module, loader, runtime: Runtime) -> tuple:
        """(logits, labels, dataset indices, skipped files) of this process's share of the split."""
        return predict_logits(with_tta(model, runtime.tta), loader, runtime.normalize, runtime.amp_dtype)

    def score(self, parts: list[tuple]) -> Evaluation:
        """Every share's logits in dataset order, so any number of shards scores as one pass does."""
        kept = [part for part in parts if len(part[0])]
        if not kept:
            raise UserError("no readable images to evaluate.")
        indices = torch.cat([part[2] for part in kept])
        order = torch.argsort(indices)
        logits, labels = torch.cat([part[0] for part in kept])[order], torch.cat([part[1] for part in kept])[order]
        skipped = [item for part in parts for item in part[3]]
        with warnings.catch_warnings():  # a folder with a subset of the classes (transfer eval) is expected
            warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
            metrics = classification_metrics(logits, labels, logits.shape[1], "x", self.top_k)
        return Evaluation({key[2:]: value for key, value in metrics.items()}, skipped, (logits, labels, indices[order]))

    def report(self, folder: Path, split: str, evaluation: Evaluation, dataset: Dataset | None = None) -> None:
        """Per-class table and confusion matrix; with the split's images, its most confidently wrong ones."""
        logits, labels, indices = evaluation.outputs
        write_report(folder, split, logits, labels, self.classes)
        if dataset is not None:
            self.write_predictions_table(folder / f"{split}_predictions.csv", logits, labels, indices, dataset)
        if dataset is not None and self.top_losses:
            self.write_top_losses(folder, split, evaluation, dataset)

    def write_predictions_table(self, path: Path, logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                                dataset: Dataset) -> None:
        """One row per image: its file, true and predicted class, and the predicted class's probability (the
        figures `transfer predict` gives for the same file)."""
        probabilities = logits.float().softmax(dim=1)
        confidence, predicted = probabilities.max(dim=1)
        rows = ([dataset.records[int(i)].name, self.classes[int(t)], self.classes[int(p)], f"{c:.6f}"]
                for i, t, p, c in zip(indices, labels, predicted.tolist(), confidence.tolist()))
        write_csv(path, ["path", "true", "predicted", "probability"], rows)

    def write_top_losses(self, folder: Path, split: str, evaluation: Evaluation, dataset: Dataset) -> None:
        """SPLIT_top_losses.csv and one PNG each of the pixels the model saw (the evaluation transform's output)."""
        logits, labels, indices = evaluation.outputs
        pictures = folder / f"{split}_top_losses"
        for stale in pictures.glob("*.png"):  # an earlier evaluation into the same folder
            stale.unlink()
        rows = []
        for item in top_losses(logits, labels, self.top_losses):
            index = int(indices[item["position"]])
            sample = dataset[index]
            if not isinstance(sample, dict):  # unreadable since it was scored
                continue
            name = f"{len(rows) + 1:03d}.png"
            save_picture(sample["image"].permute(1, 2, 0).numpy(), pictures / name, THUMBNAIL_HEIGHT)
            rows.append({"picture": f"{pictures.name}/{name}", "source": dataset.records[index].name,
                         "true": self.classes[item["true"]], "predicted": self.classes[item["predicted"]],
                         "confidence": item["confidence"], "loss": item["loss"]})
        write_dict_rows(folder / f"{split}_top_losses.csv", rows)

    def eval_dataset(self, cfg: DictConfig, preprocess: dict, split: str | None, trained_root: str | None,
                     classes: list[str]) -> tuple[str, Dataset, TaskData]:
        """The training data split exactly as training split it, or a new data.root taken as it is (its split
        folders, or all of its images: split=all); labels follow the checkpoint's class order by name. Decoded
        through training's own dataset code (RAM cache included, since its shrinking changes pixels)."""
        splits = eval_splits(cfg.data, trained_root, classes)
        chosen = choose_split(split, splits)
        records = [r for rs in splits.splits.values() for r in rs] if chosen == "all" else splits.splits[chosen]
        if not records:
            raise UserError(f"split {chosen} of {splits.description} has no images. Choose another split=.")
        only = DataSplits(splits.classes, {"eval": records}, splits.skipped, splits.description)
        built = build_datasets(only, cfg.data, preprocess, [], seed=0)  # every split but train: the eval transform
        self.classes = list(classes)
        return chosen, built.datasets["eval"], TaskData(list(classes), built.datasets, built.skipped,
                                                        splits.description)

    def preview_dataset(self, cfg: DictConfig, preprocess: dict, count: int) -> tuple[Dataset, list]:
        """`count` training images chosen with the run's seed, decoded alone (not the whole folder) through
        training's own dataset code, the RAM cache's shrinking included."""
        splits = index_data(cfg.data)
        self.classes = splits.classes
        train = splits.splits["train"]
        chosen = np.random.default_rng(cfg.seed).permutation(len(train))[:count]
        subset = DataSplits(splits.classes, {"train": [train[i] for i in sorted(chosen)]}, [], splits.description)
        built = build_datasets(subset, cfg.data, preprocess, OmegaConf.to_container(cfg.augment.train, resolve=True),
                               cfg.seed)
        return built.datasets["train"], list(built.skipped)

    def picture(self, sample: dict) -> tuple[np.ndarray, str]:
        return sample["image"].permute(1, 2, 0).numpy(), self.classes[int(sample["label"])]

    def restore(self, checkpoint: dict) -> None:
        self.classes, self.preprocess_used = list(checkpoint["classes"]), dict(checkpoint["preprocess"])
        self.top_k = int(checkpoint["config"].get("trainer", {}).get("top_k") or 5)
        self.top_losses = int(checkpoint["config"].get("task", {}).get("top_losses") or 0)

    @torch.no_grad()
    def predict(self, model: nn.Module, images: list[np.ndarray], runtime: Runtime) -> list[np.ndarray]:
        """Class probabilities of each image, through the evaluation transform (the pixels eval sees)."""
        logits = image_logits(with_tta(model, runtime.tta), images, self.preprocess_used, runtime)
        return list(logits.softmax(dim=1).cpu().numpy())

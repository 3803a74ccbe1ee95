"""Semantic segmentation: image / mask folder pairs (data/masks.py), a segmentation_models_pytorch decoder
(task.decoder: fpn, unet, deeplabv3plus, linknet, upernet) on a timm backbone (models/segmenter.py),
cross-entropy, Dice or focal loss over labelled pixels (models/segmentation_loss.py), mIoU
(metrics/segmentation.py)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn
from torch.utils.data import default_collate

from transfer.config import require
from transfer.data.augment import IGNORE_INDEX, build_dense_transform
from transfer.data.cache_folder import DEFAULT_MAX_GB
from transfer.data.dataset import split_bad
from transfer.data.masks import CLASSES_FILE, PairDataset, index_pairs, load_all, mask_path
from transfer.errors import UserError
from transfer.files import atomic_path, save_picture, write_text
from transfer.metrics.segmentation import batch_confusion, segmentation_metrics
from transfer.models.features import build_backbone
from transfer.models.segmentation_loss import build_loss, loss_terms
from transfer.models.segmenter import DECODER_OPTIONS, DECODERS, SegmentationModel, decoder_levels
from transfer.tasks.base import Evaluation, Runtime, Task, TaskData, check_options

OVERLAY_HEIGHT = 256
# keys of the classification loop that have no meaning for a dense task (shared by detection)
DENSE_UNSUPPORTED = {
    "trainer.class_weight": ((), "class-weighted loss is for classification (trainer.class_weight=null)"),
    "trainer.tta": ((), "test-time augmentation is for classifiers (trainer.tta=none)"),
    "trainer.top_k": ((), "top-k accuracy is a classification metric (trainer.top_k=null)"),
    "trainer.feature_cache": ((), "the feature cache serves classification's linear probe "
                                        "(trainer.feature_cache=auto)"),
    "data.sampler": (("random",), "the balanced sampler needs one class per image (data.sampler=random)"),
    "data.cache": (("ram",), "dense tasks keep decoded images in memory or read them each epoch "
                             "(data.cache=ram or none)"),
    "data.cache_dir": ((), "it holds classification's disk cache and features (data.cache_dir=null)"),
    "data.cache_max_gb": ((DEFAULT_MAX_GB,), "it caps data.cache_dir, which dense tasks do not write to "
                                             f"(data.cache_max_gb={DEFAULT_MAX_GB})"),
    "model.drop_rate": ((), "it is a classifier head's dropout and dense heads have none (model.drop_rate=null; "
                            "model.drop_path_rate works)"),
    "mixup.mixup_alpha": ((), "mixup mixes image labels, not masks or boxes (mixup=none)"),
    "mixup.cutmix_alpha": ((), "cutmix mixes image labels, not masks or boxes (mixup=none)"),
}


class Segmentation(Task):
    name = "segmentation"
    unsupported = {**DENSE_UNSUPPORTED,
                   "data.allow_outside_root": ((), "segmentation reads folders, never files outside data.root "
                                                    "(data.allow_outside_root=false)")}

    def __init__(self) -> None:
        self.classes: list[str] = []
        self.ignore_index = IGNORE_INDEX
        self.label_smoothing = 0.0
        self.preprocess_used: dict | None = None
        self.criterion = build_loss("ce", IGNORE_INDEX)

    def check_config(self, cfg: DictConfig) -> None:
        """Also refuse the keys of other decoders and label smoothing without a cross-entropy term."""
        super().check_config(cfg)
        require(cfg.task.decoder, tuple(DECODERS), "task.decoder")
        check_options(cfg, "task.decoder", {f"task.{key}": readers for key, readers in DECODER_OPTIONS.items()})
        if "ce" not in loss_terms(cfg.task.loss) and cfg.trainer.get("label_smoothing"):
            raise UserError(f"task.loss={cfg.task.loss} cannot use trainer.label_smoothing="
                            f"{cfg.trainer.label_smoothing}: only cross-entropy smooths labels (add ce, e.g. "
                            "task.loss=ce+dice, or set trainer.label_smoothing=0).")

    # ---- data and model

    def build_data(self, cfg: DictConfig, preprocess: dict) -> TaskData:
        """Index the pairs, check them all up front (data.cache=ram), attach the pipelines."""
        self.ignore_index, self.preprocess_used = int(cfg.task.ignore_index), preprocess
        self.label_smoothing = float(cfg.trainer.get("label_smoothing") or 0.0)
        self.criterion = build_loss(cfg.task.get("loss") or "ce", self.ignore_index, self.label_smoothing)
        classes, splits = index_pairs(cfg.data.root, cfg.data.val_fraction, cfg.data.test_fraction,
                                      cfg.data.split_seed)
        self.classes = classes
        strict, skipped, cache = cfg.data.on_bad_image == "error", list(splits.skipped), None
        records = splits.splits
        if cfg.data.cache != "none":
            cache, bad = load_all([r for rs in records.values() for r in rs], len(classes), self.ignore_index, strict)
            skipped += bad
            bad_paths = {path for path, _ in bad}
            records = {name: [r for r in rs if r.source not in bad_paths and str(mask_path(r.source)) not in bad_paths]
                       for name, rs in records.items()}
        steps = OmegaConf.to_container(cfg.augment.train, resolve=True)
        datasets = {name: PairDataset(rs, build_dense_transform(steps if name == "train" else None, preprocess,
                                                                mask_fill=self.ignore_index),
                                      len(classes), self.ignore_index, cache,
                                      seed=cfg.seed if name == "train" else None, strict=strict)
                    for name, rs in records.items()}
        if not len(datasets["train"]):
            raise UserError(f"data.root={cfg.data.root}: no usable training pair (see the skipped list).")
        return TaskData(classes, datasets, skipped, splits.description)

    @staticmethod
    def collate(samples: list) -> dict:
        """'image': uint8 (normalised on the device, as classification); 'mask': long class indices."""
        good, bad = split_bad(samples)
        batch = default_collate(good) if good else {"image": torch.empty(0, 3, 1, 1, dtype=torch.uint8),
                                                    "mask": torch.empty(0, 1, 1), "index": torch.empty(0).long()}
        return {**batch, **bad}

    def build_model(self, cfg: DictConfig, classes: list[str], preprocess: dict) -> tuple[nn.Module, str]:
        """The backbone (dilated where the decoder wants it: DeepLab's output stride 16) and the decoder."""
        task = cfg.task
        decoder = require(task.get("decoder") or "fpn", tuple(DECODERS), "task.decoder")
        out_indices = task.get("out_indices") or decoder_levels(cfg.model.name, decoder)
        backbone, source = build_backbone(cfg.model.name, cfg.model.pretrained, str(cfg.model.weights),
                                          list(out_indices), cfg.model.get("drop_path_rate"),
                                          output_stride=DECODERS[decoder][3])
        options = {key: task.get(key) for key in DECODER_OPTIONS}
        return SegmentationModel(backbone, len(classes), int(task.decoder_channels), decoder, **options), source

    # ---- training and evaluation

    def training_step(self, model: nn.Module, batch: dict, runtime: Runtime) -> tuple[torch.Tensor, dict]:
        logits = model(runtime.normalize(batch["image"]))
        masks = batch["mask"].to(runtime.device, non_blocking=True)
        return self.criterion(logits.float(), masks), {}

    def metric_modes(self, classes: list[str]) -> dict[str, str]:
        return {"miou": "max", "pixel_accuracy": "max", "loss": "min", **{f"iou/{name}": "max" for name in classes}}

    @torch.no_grad()
    def infer(self, model: nn.Module, loader, runtime: Runtime) -> tuple:
        """(confusion matrix, summed loss, labelled pixels, skipped files) of this process's share; float32 (the
        summed confusion matrix needs no speed-up that costs precision). The loss is cross-entropy per labelled
        pixel whatever task.loss trains: a sum over pixels, so shares add up (a Dice loss over a split does not)."""
        model.eval()
        count = len(self.classes)
        matrix, loss_sum, pixels, skipped = np.zeros((count, count), np.int64), 0.0, 0, []
        for batch in loader:
            skipped += batch["skipped"]
            if not len(batch["index"]):
                continue
            logits = model(runtime.normalize(batch["image"])).float()
            masks = batch["mask"].to(runtime.device)
            loss_sum += float(F.cross_entropy(logits, masks, ignore_index=self.ignore_index, reduction="sum"))
            pixels += int((masks != self.ignore_index).sum())
            matrix += batch_confusion(masks.cpu(), logits.argmax(1).cpu(), count, self.ignore_index)
        return matrix, loss_sum, pixels, skipped

    def score(self, parts: list[tuple]) -> Evaluation:
        """Sums of the shares' matrices and losses: the same numbers as one pass."""
        matrix = sum(part[0] for part in parts)
        loss_sum, pixels = sum(part[1] for part in parts), sum(part[2] for part in parts)
        skipped = [item for part in parts for item in part[3]]
        return Evaluation({"loss": loss_sum / max(pixels, 1), **segmentation_metrics(matrix, self.classes)}, skipped)

    @torch.no_grad()
    def draw(self, model: nn.Module, dataset: PairDataset, folder: Path, runtime: Runtime, count: int) -> None:
        """image | ground truth | prediction, at the input size, for the first `count` usable samples."""
        model.eval()
        table, written = palette(len(self.classes)), 0
        for index in range(len(dataset)):
            if written >= count:
                break
            sample = dataset[index]
            if not isinstance(sample, dict):
                continue
            image = sample["image"].permute(1, 2, 0).numpy()
            predicted = model(runtime.normalize(sample["image"][None])).argmax(1)[0].cpu().numpy().astype(np.uint8)
            truth = sample["mask"].numpy().astype(np.uint8)
            panel = np.concatenate([image, overlay(image, truth, table), overlay(image, predicted, table)], axis=1)
            save_picture(panel, folder / f"{Path(dataset.records[index].source).stem}.png", OVERLAY_HEIGHT)
            written += 1

    def picture(self, sample: dict) -> tuple[np.ndarray, str]:
        image, mask = sample["image"].permute(1, 2, 0).numpy(), sample["mask"].numpy().astype(np.uint8)
        present = [self.classes[v] for v in np.unique(mask) if 0 < v < len(self.classes)]
        return overlay(image, mask, palette(len(self.classes))), ", ".join(present[:3])

    def checkpoint_entries(self) -> dict:
        return {"ignore_index": self.ignore_index}

    def restore(self, checkpoint: dict) -> None:
        self.classes = list(checkpoint["classes"])
        self.preprocess_used = dict(checkpoint["preprocess"])
        self.ignore_index = int(checkpoint.get("ignore_index", IGNORE_INDEX))

    # ---- prediction

    @torch.no_grad()
    def predict(self, model: nn.Module, images: list[np.ndarray], runtime: Runtime) -> list[np.ndarray]:
        """H×W uint8 class-index masks, each the size of its input image."""
        model.eval()
        transform = build_dense_transform(None, self.preprocess_used)
        masks = []
        for image in images:
            logits = model(runtime.normalize(transform(image=image)["image"][None]))
            logits = F.interpolate(logits.float(), size=image.shape[:2], mode="bilinear", align_corners=False)
            masks.append(logits.argmax(1)[0].to(torch.uint8).cpu().numpy())
        return masks

    def write_predictions(self, chunks: Iterable[tuple[list[str], list[np.ndarray]]], out: Path) -> int:
        """OUT/NAME.png per image (pixel = class index, as the training masks) and OUT/classes.txt, written chunk
        by chunk of (names, masks), each file atomically. Returns the number of images; none: no files."""
        count = 0
        for names, masks in chunks:
            if not count:
                write_text(out / CLASSES_FILE, "\n".join(self.classes) + "\n")
            for mask, name in zip(masks, names):
                with atomic_path(out / f"{name}.png") as temporary:
                    Image.fromarray(mask).save(temporary, format="PNG")
            count += len(names)
        return count


def palette(count: int) -> np.ndarray:
    """256×3 uint8 colours (matplotlib's tab20, background black); the ignore index draws white."""
    colours = (np.array([colormaps["tab20"](i % 20)[:3] for i in range(count)]) * 255).astype(np.uint8)
    colours[0] = 0
    table = np.full((256, 3), 255, np.uint8)
    table[:count] = colours
    return table


def overlay(image: np.ndarray, mask: np.ndarray, table: np.ndarray) -> np.ndarray:
    """The image with class colours blended over the labelled pixels."""
    colours = table[mask].astype(np.float32)
    labelled = (mask > 0)[..., None]
    return np.where(labelled, 0.45 * image + 0.55 * colours, image).astype(np.uint8)

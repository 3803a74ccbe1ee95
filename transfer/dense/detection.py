"""Object detection: torchvision's FCOS around a timm features_only backbone, scored by pycocotools.

Why FCOS: it is anchor-free (one location per feature cell, no anchor shapes to tune for the user's objects),
its head is two small conv towers, and it trains well from few images; on two CPU cores a RetinaNet head with
nine anchors per cell costs more per step for no gain at these object sizes. The head and feature pyramid are
slimmed (task.fpn_channels, task.head_convs) because torchvision's 256-channel, 4-conv default costs ~10x the
EfficientNet-Lite0 backbone at 128 px.

The detector normalises its input itself (GeneralizedRCNNTransform with the run's mean/std), and its resize is
pinned to the input size, so a 128 px scene is not blown up to torchvision's default 800 px.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.utils import draw_bounding_boxes

from transfer.config import require
from transfer.dense.augment import build_dense_transform
from transfer.dense.backbone import DenseModel, build_backbone, feature_channels, feature_strides
from transfer.dense.coco import BoxDataset, Categories, collate_boxes, read_splits

DETECTORS = ("fcos",)
PREDICTIONS = "boxes.json"


# ----------------------------------------------------------------------------------------------
# Model


class _Pyramid(nn.Module):
    """timm feature maps → FPN levels (+ P6, P7), as FCOS expects of its `backbone`.

    The timm model is held without registering it here: it is registered once, as `Detector.backbone`, so
    checkpoints, freezing, layer decay and export see one backbone under `backbone.*` (a deepcopy, as for EMA,
    copies the list along with the model and so points at the copy's backbone)."""

    def __init__(self, backbone: nn.Module, fpn: FeaturePyramidNetwork, out_channels: int) -> None:
        super().__init__()
        self.fpn, self.out_channels = fpn, out_channels
        self._body = [backbone]

    def forward(self, images: torch.Tensor) -> OrderedDict:
        features = self._body[0](images)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


class Detector(DenseModel):
    """`backbone` (the timm features_only model) + `head` (FCOS: its pyramid, towers and input transform), so
    the fine-tune strategies, layer decay and export treat it like every dense model.

    forward(images, targets) → FCOS's loss dict in train mode, [{"boxes", "scores", "labels"}] in eval mode;
    images are float in [0, 1] (FCOS's transform normalises them)."""

    def __init__(self, backbone: nn.Module, head: FCOS, model_name: str) -> None:
        super().__init__()
        self.backbone, self.head, self.model_name = backbone, head, model_name

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None):
        return self.head(list(images), targets)


def build_detector(backbone: nn.Module, model_name: str, num_classes: int, input_size: tuple[int, int],
                   mean: list[float], std: list[float], fpn_channels: int = 64, head_convs: int = 2,
                   center_sampling_radius: float = 1.5, score_thresh: float = 0.05, nms_thresh: float = 0.6,
                   detections_per_img: int = 100) -> Detector:
    """FCOS over the backbone's levels; `num_classes` objects (labels 1..K; FCOS keeps slot 0 unused).
    `input_size` = (short, long) side the pipeline already resized to, so FCOS's own resize leaves it be."""
    fpn = FeaturePyramidNetwork(feature_channels(backbone), fpn_channels,
                                extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels))
    strides = feature_strides(backbone)
    strides += [strides[-1] * 2, strides[-1] * 4]  # P6, P7
    # one location per cell; FCOS assigns an object to the level whose anchor size s has 4s <= reach < 8s
    anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
    head = FCOSHead(fpn_channels, 1, num_classes + 1, num_convs=head_convs)
    fcos = FCOS(_Pyramid(backbone, fpn, fpn_channels), num_classes + 1, min_size=input_size[0],
                max_size=input_size[1], image_mean=list(mean), image_std=list(std), anchor_generator=anchors, head=head,
                center_sampling_radius=center_sampling_radius, score_thresh=score_thresh, nms_thresh=nms_thresh,
                detections_per_img=detections_per_img)
    return Detector(backbone, fcos, model_name)


# ----------------------------------------------------------------------------------------------
# Metrics


def coco_metrics(truths: list[dict], predictions: list[dict], num_classes: int) -> dict[str, float]:
    """COCO mAP@[.5:.95] (stats[0]), mAP@.5 (stats[1]) and mAP@.75 (stats[2]) by pycocotools.

    `truths[i]` = {"boxes" xyxy, "labels"}, `predictions[i]` = {"boxes" xyxy, "scores", "labels"} for the
    same image i. Without any ground-truth box the metrics are undefined; they are reported as 0."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, dt = _coco_lists(truths, predictions)
    if not gt["annotations"] or not dt:
        return {"map": 0.0, "map50": 0.0, "map75": 0.0}
    gt["categories"] = [{"id": i} for i in range(1, num_classes + 1)]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress on every call
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        evaluation = COCOeval(coco_gt, coco_gt.loadRes(dt), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = [max(float(v), 0.0) for v in evaluation.stats[:3]]  # -1: no ground truth in the area range
    return {"map": stats[0], "map50": stats[1], "map75": stats[2]}


def _coco_lists(truths: list[dict], predictions: list[dict]) -> tuple[dict, list[dict]]:
    images, annotations, results = [], [], []
    for image_id, (truth, pred) in enumerate(zip(truths, predictions), start=1):
        images.append({"id": image_id})
        for box, label in zip(_xywh(truth["boxes"]), truth["labels"].tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
        for box, score, label in zip(_xywh(pred["boxes"]), pred["scores"].tolist(), pred["labels"].tolist()):
            results.append({"image_id": image_id, "category_id": int(label), "bbox": box, "score": float(score)})
    return {"images": images, "annotations": annotations}, results


def _xywh(boxes: torch.Tensor) -> list[list[float]]:
    boxes = boxes.detach().float().cpu().reshape(-1, 4)
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()


# ----------------------------------------------------------------------------------------------
# The task


class Detection:
    """The detection task for transfer.dense.train: data, model, loss, metrics, predictions, overlays."""

    name = "detection"
    monitor = "val/map50"
    # FCOS computes its box losses inside the forward pass; under bf16 autocast its weights turned NaN within
    # an epoch on the test folder, so detection trains in float32 whatever trainer.amp says (one log line)
    mixed_precision = False

    def __init__(self) -> None:
        self.categories: Categories | None = None
        self.preprocess: dict | None = None
        self.score_thresh_overlay = 0.5  # overlays show confident boxes only; mAP uses task.score_thresh
        self.skipped: list[tuple[str, str]] = []  # unreadable files met while evaluating; the loop drains it

    @property
    def classes(self) -> list[str]:
        return self.categories.names if self.categories else []

    def build_datasets(self, cfg: DictConfig, preprocess: dict
                       ) -> tuple[dict[str, BoxDataset], list[str], list[tuple[str, str]]]:
        data, task = cfg.data, cfg.task
        self.categories, splits, skipped = read_splits(data.root, data.val_fraction, data.test_fraction,
                                                       data.split_seed, data.get("allow_outside_root", False))
        self.preprocess = preprocess
        strict = data.on_bad_image == "error"
        steps = OmegaConf.to_container(cfg.augment.train)
        train = build_dense_transform(steps, preprocess, boxes=True, min_visibility=task.min_visibility)
        evaluate = build_dense_transform(None, preprocess, boxes=True)
        datasets = {name: BoxDataset(records, train if name == "train" else evaluate,
                                     seed=cfg.seed if name == "train" else None, strict=strict)
                    for name, records in splits.items()}
        return datasets, self.classes, skipped

    def checkpoint_entries(self) -> dict:
        """The COCO category ids, so predictions name the user's own ids."""
        return {"category_ids": list(self.categories.ids) if self.categories else []}

    def restore(self, checkpoint: dict) -> None:
        """What predict needs from a checkpoint: categories and preprocessing."""
        names = list(checkpoint["classes"])
        ids = list(checkpoint.get("category_ids") or range(1, len(names) + 1))
        self.categories, self.preprocess = Categories(ids, names), dict(checkpoint["preprocess"])

    @staticmethod
    def collate(samples: list) -> dict:
        return collate_boxes(samples)

    def build_model(self, cfg: DictConfig, num_classes: int) -> tuple[Detector, str]:
        task, model = cfg.task, cfg.model
        require(task.detector, DETECTORS, "task.detector")
        backbone, source = build_backbone(model.name, model.pretrained, model.weights,
                                          out_indices=list(task.out_indices), drop_path_rate=model.drop_path_rate)
        if self.preprocess is None:
            raise RuntimeError("build_datasets() or restore() sets the preprocessing the detector is built for")
        height, width = self.preprocess["input_size"][1:]
        return build_detector(backbone, model.name, num_classes, (min(height, width), max(height, width)),
                              self.preprocess["mean"], self.preprocess["std"],
                              fpn_channels=task.fpn_channels, head_convs=task.head_convs,
                              center_sampling_radius=task.center_sampling_radius, score_thresh=task.score_thresh,
                              nms_thresh=task.nms_thresh, detections_per_img=task.detections_per_img), source

    @staticmethod
    def loss(model: Detector, batch: dict) -> torch.Tensor:
        """FCOS's classification (focal) + box (GIoU) + centerness losses, summed."""
        device = next(model.parameters()).device
        targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
        losses = model(batch["image"].to(device, non_blocking=True), targets)
        return sum(losses.values())

    @torch.no_grad()
    def evaluate(self, model: Detector, loader) -> dict[str, float]:
        """COCO mAP in the network's input frame (a plain resize: the AP is unchanged by it)."""
        was_training = model.training
        model.eval()
        truths, predictions = [], []
        device = next(model.parameters()).device
        for batch in loader:
            self.skipped += batch["skipped"]
            if len(batch["image"]):
                predictions += [{k: v.cpu() for k, v in p.items()} for p in model(batch["image"].to(device))]
                truths += batch["targets"]
        model.train(was_training)
        return coco_metrics(truths, predictions, len(self.classes))

    @torch.no_grad()
    def predict(self, model: Detector, images: list[np.ndarray]) -> list[dict]:
        """Boxes in each original image's pixels: the image is resized to the input size, its boxes scaled back."""
        model.eval()
        transform = build_dense_transform(None, self.preprocess)
        device = next(model.parameters()).device
        outputs = []
        for image in images:
            tensor = transform(image=image)["image"].float().div(255).unsqueeze(0).to(device)
            pred = {k: v.cpu() for k, v in model(tensor)[0].items()}
            scale = torch.tensor([image.shape[1] / tensor.shape[3], image.shape[0] / tensor.shape[2]] * 2)
            pred["boxes"] = pred["boxes"] * scale
            pred["size"] = image.shape[:2]
            outputs.append(pred)
        return outputs

    def write_predictions(self, chunks: Iterable[tuple[list[str], list[dict]]], folder: Path) -> int:
        """FOLDER/boxes.json: COCO results (image_id, category_id, bbox [x, y, w, h], score) plus file_name and
        category name, with the images and categories they refer to; written once, atomically, after the
        last chunk of (names, outputs). Returns the number of images; none: no file."""
        predicted = [(name, out) for names, outputs in chunks for name, out in zip(names, outputs)]
        if not predicted:
            return 0
        categories = self.categories or Categories(list(range(1, 1 + _max_label([o for _, o in predicted]))), [])
        images, results = [], []
        for image_id, (name, out) in enumerate(predicted, start=1):
            height, width = out.get("size", (None, None))
            images.append({"id": image_id, "file_name": str(name), "width": width, "height": height})
            for box, score, label in zip(_xywh(out["boxes"]), out["scores"].tolist(), out["labels"].tolist()):
                entry = {"image_id": image_id, "file_name": str(name), "category_id": categories.ids[int(label) - 1],
                         "bbox": [round(v, 2) for v in box], "score": round(float(score), 4)}
                if categories.names:
                    entry["category"] = categories.names[int(label) - 1]
                results.append(entry)
        listing = [{"id": i, "name": n} for i, n in zip(categories.ids, categories.names)]
        path = Path(folder) / PREDICTIONS
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps({"images": images, "categories": listing, "annotations": results},
                                        indent=1) + "\n")
        temporary.replace(path)
        return len(predicted)

    @torch.no_grad()
    def write_overlays(self, model: Detector, dataset: BoxDataset, folder: Path, count: int) -> list[Path]:
        """For the first `count` images: confident predictions beside the ground truth, one PNG each."""
        model.eval()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        device = next(model.parameters()).device
        paths = []
        for index in range(min(count, len(dataset))):
            sample = dataset[index]
            if not isinstance(sample, dict):
                continue
            image = sample["image"]
            pred = model(image.float().div(255).unsqueeze(0).to(device))[0]
            keep = pred["scores"] >= self.score_thresh_overlay
            left = self._draw(image, pred["boxes"][keep].cpu(), pred["labels"][keep].cpu(), "red",
                              pred["scores"][keep].cpu())
            right = self._draw(image, sample["boxes"], sample["labels"], "lime")
            path = folder / f"{index:03d}_{Path(dataset.records[index].source).stem}.png"
            Image.fromarray(torch.cat([left, right], dim=2).permute(1, 2, 0).numpy()).save(path)
            paths.append(path)
        return paths

    def _draw(self, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, colour: str,
              scores: torch.Tensor | None = None) -> torch.Tensor:
        if not len(boxes):
            return image
        names = [self.classes[int(label) - 1] if self.classes else str(int(label)) for label in labels]
        if scores is not None:
            names = [f"{n} {s:.2f}" for n, s in zip(names, scores.tolist())]
        return draw_bounding_boxes(image, boxes, labels=names, colors=colour, width=1)


def _max_label(outputs: list[dict]) -> int:
    return max((int(o["labels"].max()) for o in outputs if len(o["labels"])), default=0)

"""Object detection: COCO boxes (data/coco.py), torchvision's FCOS, RetinaNet or Faster R-CNN around a timm
backbone (models/detector.py, task.detector), the detector's own losses, COCO mAP by pycocotools
(metrics/detection.py)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from transfer.config import require
from transfer.data.augment import build_dense_transform
from transfer.data.coco import BoxDataset, Categories, collate_boxes, decode_all, read_splits
from transfer.files import atomic_path, write_text
from transfer.metrics.detection import coco_metrics, xywh
from transfer.models.detector import DETECTOR_OPTIONS, DETECTORS, Detector, build_detector
from transfer.models.features import build_backbone
from transfer.tasks.base import Evaluation, Runtime, Task, TaskData, check_options
from transfer.tasks.segmentation import DENSE_UNSUPPORTED

PREDICTIONS = "boxes.json"
OVERLAY_SCORE = 0.5  # overlays show confident boxes only; mAP uses task.score_thresh


class Detection(Task):
    name = "detection"
    # the detectors compute their box losses inside the forward pass; under bf16 autocast FCOS's weights turned NaN
    # within an epoch on the test folder, so detection trains in float32 (trainer.amp=auto means float32 here)
    mixed_precision = False
    unsupported = {**DENSE_UNSUPPORTED,
                   "trainer.label_smoothing": ((), "the detectors' losses have no label smoothing "
                                                   "(trainer.label_smoothing=null)"),
                   "trainer.amp": (("off",), "FCOS turned NaN under autocast, so detection trains in float32 "
                                             "(trainer.amp=auto)")}

    def __init__(self) -> None:
        self.categories: Categories | None = None
        self.preprocess_used: dict | None = None

    def check_config(self, cfg: DictConfig) -> None:
        """Also refuse the keys only another detector reads (e.g. task.center_sampling_radius, FCOS's)."""
        super().check_config(cfg)
        require(cfg.task.detector, tuple(DETECTORS), "task.detector")
        check_options(cfg, "task.detector", {f"task.{key}": readers for key, readers in DETECTOR_OPTIONS.items()})

    @property
    def classes(self) -> list[str]:
        return self.categories.names if self.categories else []

    # ---- data and model

    def build_data(self, cfg: DictConfig, preprocess: dict) -> TaskData:
        data, task = cfg.data, cfg.task
        self.categories, splits, skipped = read_splits(data.root, data.val_fraction, data.test_fraction,
                                                       data.split_seed, data.get("allow_outside_root", False))
        self.preprocess_used = preprocess
        strict = data.on_bad_image == "error"
        cache = None
        if data.cache != "none":
            cache, bad = decode_all([r for records in splits.values() for r in records], strict)
            skipped += bad
            bad_paths = {path for path, _ in bad}
            splits = {name: [r for r in records if r.source not in bad_paths] for name, records in splits.items()}
        steps = OmegaConf.to_container(cfg.augment.train, resolve=True)
        train = build_dense_transform(steps, preprocess, boxes=True, min_visibility=task.min_visibility)
        evaluate = build_dense_transform(None, preprocess, boxes=True)
        datasets = {name: BoxDataset(records, train if name == "train" else evaluate,
                                     seed=cfg.seed if name == "train" else None, strict=strict, cache=cache)
                    for name, records in splits.items()}
        return TaskData(self.classes, datasets, skipped, f"COCO annotations under {data.root}")

    collate = staticmethod(collate_boxes)

    def build_model(self, cfg: DictConfig, classes: list[str], preprocess: dict) -> tuple[Detector, str]:
        task, model = cfg.task, cfg.model
        detector = require(task.get("detector") or "fcos", tuple(DETECTORS), "task.detector")
        backbone, source = build_backbone(model.name, model.pretrained, str(model.weights),
                                          out_indices=list(task.out_indices), drop_path_rate=model.drop_path_rate)
        height, width = preprocess["input_size"][1:]
        options = {key: task.get(key) for key, readers in DETECTOR_OPTIONS.items() if detector in readers}
        return build_detector(backbone, model.name, len(classes), (min(height, width), max(height, width)),
                              preprocess["mean"], preprocess["std"], detector=detector,
                              fpn_channels=task.fpn_channels, head_convs=task.head_convs,
                              score_thresh=task.score_thresh, nms_thresh=task.nms_thresh,
                              detections_per_img=task.detections_per_img, **options), source

    def compile(self, model: Detector, backend: str) -> None:
        """The backbone only: the detectors' target assignment and post-processing are Python over lists of boxes."""
        model.backbone.compile(backend=backend)

    # ---- training and evaluation

    def training_step(self, model: Detector, batch: dict, runtime: Runtime) -> tuple[torch.Tensor, dict]:
        """The detector's own losses, summed: FCOS's focal + GIoU + centerness, RetinaNet's focal + L1, Faster
        R-CNN's RPN objectness + box and classifier cross-entropy + box."""
        targets = [{"boxes": t["boxes"][~t["iscrowd"]].to(runtime.device),  # crowds: scored as ignore regions only
                    "labels": t["labels"][~t["iscrowd"]].to(runtime.device)} for t in batch["targets"]]
        losses = model(batch["image"].to(runtime.device, non_blocking=True), targets)
        return sum(losses.values()), {}

    def metric_modes(self, classes: list[str]) -> dict[str, str]:
        return {"map": "max", "map50": "max", "map75": "max"}

    @torch.no_grad()
    def infer(self, model: Detector, loader, runtime: Runtime) -> tuple:
        """(dataset indices, ground truths, predictions, skipped files) of this process's share, in the
        network's input frame (a plain resize: the AP is unchanged by it)."""
        model.eval()
        indices, truths, predictions, skipped = [], [], [], []
        for batch in loader:
            skipped += batch["skipped"]
            if len(batch["image"]):
                predictions += [{k: v.cpu() for k, v in p.items()} for p in model(batch["image"].to(runtime.device))]
                truths += batch["targets"]
                indices += [int(index) for index in batch["index"]]
        return indices, truths, predictions, skipped

    def score(self, parts: list[tuple]) -> Evaluation:
        """COCO mAP over every share's images in dataset order (the order breaks ties between equal scores)."""
        rows = sorted((row for part in parts for row in zip(*part[:3])), key=lambda row: row[0])
        truths, predictions = [row[1] for row in rows], [row[2] for row in rows]
        skipped = [item for part in parts for item in part[3]]
        return Evaluation(coco_metrics(truths, predictions, len(self.classes)), skipped)

    @torch.no_grad()
    def draw(self, model: Detector, dataset: BoxDataset, folder: Path, runtime: Runtime, count: int) -> None:
        """For the first `count` images: confident predictions beside the ground truth, one PNG each."""
        model.eval()
        for index in range(min(count, len(dataset))):
            sample = dataset[index]
            if not isinstance(sample, dict):
                continue
            image = sample["image"]
            pred = model(image.float().div(255).unsqueeze(0).to(runtime.device))[0]
            keep = pred["scores"] >= OVERLAY_SCORE
            left = self._draw(image, pred["boxes"][keep].cpu(), pred["labels"][keep].cpu(), "red",
                              pred["scores"][keep].cpu())
            right = self._draw(image, sample["boxes"], sample["labels"], "lime")
            picture = Image.fromarray(torch.cat([left, right], dim=2).permute(1, 2, 0).numpy())
            with atomic_path(folder / f"{index:03d}_{Path(dataset.records[index].source).stem}.png") as temporary:
                picture.save(temporary, format="PNG")

    def _draw(self, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, colour: str,
              scores: torch.Tensor | None = None) -> torch.Tensor:
        if not len(boxes):
            return image
        names = [self.classes[int(label) - 1] if self.classes else str(int(label)) for label in labels]
        if scores is not None:
            names = [f"{n} {s:.2f}" for n, s in zip(names, scores.tolist())]
        return draw_bounding_boxes(image, boxes, labels=names, colors=colour, width=1)

    def picture(self, sample: dict) -> tuple[np.ndarray, str]:
        drawn = self._draw(sample["image"], sample["boxes"], sample["labels"], "lime")
        return drawn.permute(1, 2, 0).numpy(), f"{len(sample['boxes'])} box(es)"

    def checkpoint_entries(self) -> dict:
        """The COCO category ids, so predictions name the user's own ids."""
        return {"category_ids": list(self.categories.ids) if self.categories else []}

    def restore(self, checkpoint: dict) -> None:
        names = list(checkpoint["classes"])
        ids = list(checkpoint.get("category_ids") or range(1, len(names) + 1))
        self.categories, self.preprocess_used = Categories(ids, names), dict(checkpoint["preprocess"])

    # ---- prediction

    @torch.no_grad()
    def predict(self, model: Detector, images: list[np.ndarray], runtime: Runtime) -> list[dict]:
        """Boxes in each original image's pixels: the image is resized to the input size, its boxes scaled back."""
        model.eval()
        transform = build_dense_transform(None, self.preprocess_used)
        outputs = []
        for image in images:
            tensor = transform(image=image)["image"].float().div(255).unsqueeze(0).to(runtime.device)
            pred = {k: v.cpu() for k, v in model(tensor)[0].items()}
            scale = torch.tensor([image.shape[1] / tensor.shape[3], image.shape[0] / tensor.shape[2]] * 2)
            pred["boxes"] = pred["boxes"] * scale
            pred["size"] = image.shape[:2]
            outputs.append(pred)
        return outputs

    def write_predictions(self, chunks: Iterable[tuple[list[str], list[dict]]], out: Path) -> int:
        """OUT/boxes.json: COCO results (image_id, category_id, bbox [x, y, w, h], score) plus file_name and
        category name, with the images and categories they refer to; written once, atomically, after the last
        chunk of (names, outputs). Returns the number of images; none: no file."""
        predicted = [(name, output) for names, outputs in chunks for name, output in zip(names, outputs)]
        if not predicted:
            return 0
        categories = self.categories
        images, results = [], []
        for image_id, (name, output) in enumerate(predicted, start=1):
            height, width = output.get("size", (None, None))
            images.append({"id": image_id, "file_name": str(name), "width": width, "height": height})
            for box, score, label in zip(xywh(output["boxes"]), output["scores"].tolist(), output["labels"].tolist()):
                results.append({"image_id": image_id, "file_name": str(name),
                                "category_id": categories.ids[int(label) - 1], "category": categories.names[int(label) - 1],
                                "bbox": [round(v, 2) for v in box], "score": round(float(score), 4)})
        listing = [{"id": i, "name": n} for i, n in zip(categories.ids, categories.names)]
        write_text(out / PREDICTIONS, json.dumps({"images": images, "categories": listing, "annotations": results},
                                                 indent=1) + "\n")
        return len(predicted)

"""COCO box metrics by pycocotools, the reference implementation detection users compare against."""

from __future__ import annotations

import contextlib
import io

import torch


def coco_metrics(truths: list[dict], predictions: list[dict], num_classes: int) -> dict[str, float]:
    """COCO mAP@[.5:.95] (stats[0]), mAP@.5 (stats[1]) and mAP@.75 (stats[2]) by pycocotools.

    `truths[i]` = {"boxes" xyxy, "labels", optional "iscrowd": ignore regions, as COCOeval reads them},
    `predictions[i]` = {"boxes" xyxy, "scores", "labels"} for the same image i. Without any ground-truth box
    the metrics are undefined; they are reported as 0."""
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
        crowd = truth.get("iscrowd", torch.zeros(len(truth["labels"]), dtype=torch.bool)).tolist()
        for box, label, is_crowd in zip(xywh(truth["boxes"]), truth["labels"].tolist(), crowd):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": box, "area": box[2] * box[3], "iscrowd": int(is_crowd)})
        for box, score, label in zip(xywh(pred["boxes"]), pred["scores"].tolist(), pred["labels"].tolist()):
            results.append({"image_id": image_id, "category_id": int(label), "bbox": box, "score": float(score)})
    return {"images": images, "annotations": annotations}, results


def xywh(boxes: torch.Tensor) -> list[list[float]]:
    boxes = boxes.detach().float().cpu().reshape(-1, 4)
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()

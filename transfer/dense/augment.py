"""albumentations pipelines for dense tasks: the image, its mask and its boxes move together.

Training takes the same presets as classification (conf/augment/*.yaml) and adds what dense targets need:
masks follow every geometric step (nearest-neighbour, albumentations' default for masks), areas a step
invents (rotation borders, padding, cutout) become the ignore index instead of background, and boxes go
through A.BboxParams (COCO [x, y, w, h], clipped to the image, dropped below `min_visibility`).
Evaluation resizes the whole image to the input size: a centre crop, as classification evaluates, would
cut off pixels and objects that the metrics and predictions must cover.
Both end in uint8 CHW image tensors; the loop normalises on the device, as classification does.
"""

from __future__ import annotations

import inspect

import albumentations as A
from albumentations.pytorch import ToTensorV2
from hydra.utils import get_class

from transfer.augment import INTERPOLATION, build_train_transform

IGNORE_INDEX = 255


def build_dense_transform(steps: list[dict] | None, preprocess: dict, boxes: bool = False,
                          min_visibility: float = 0.0, mask_fill: int = IGNORE_INDEX) -> A.Compose:
    """The training pipeline from a preset's `steps`, or the evaluation pipeline when `steps` is None.

    Call it as `transform(image=..., mask=...)` and, with `boxes`, `bboxes=[[x, y, w, h], ...], labels=[...]`
    (the labels come back as floats: albumentations' habit)."""
    if steps is None:
        height, width = preprocess["input_size"][1:]
        transforms = [A.Resize(height=height, width=width, interpolation=INTERPOLATION[preprocess["interpolation"]]),
                      ToTensorV2()]
    else:
        transforms = list(build_train_transform([_with_mask_fill(step, mask_fill) for step in steps],
                                                preprocess).transforms)
    bbox_params = A.BboxParams(format="coco", label_fields=["labels"], min_visibility=min_visibility, clip=True,
                               filter_invalid_bboxes=True) if boxes else None
    return A.Compose(transforms, bbox_params=bbox_params)


def _with_mask_fill(step: dict, mask_fill: int) -> dict:
    """The step with `fill_mask` set to the ignore index where the transform takes one and the preset is
    silent: pixels a transform makes up belong to no class."""
    step = dict(step)
    target = step.get("_target_")
    if target and "fill_mask" not in step:
        try:
            parameters = inspect.signature(get_class(target)).parameters
        except Exception:  # an unknown name: build_train_transform says so with the fix
            return step
        if "fill_mask" in parameters:
            step["fill_mask"] = mask_fill
    return step

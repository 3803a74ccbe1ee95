"""albumentations pipelines: the training one from an augment preset, the eval one from the model's
data config. Both end in uint8 CHW tensors; normalisation happens on the device, in the loop,
because moving uint8 is 4× cheaper than float and the GPU does the arithmetic for free.
"""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402
from hydra.utils import get_class  # noqa: E402

from transfer.errors import UserError  # noqa: E402

INTERPOLATION = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
                 "area": cv2.INTER_AREA, "lanczos": cv2.INTER_LANCZOS4, "random": cv2.INTER_LINEAR}


def build_train_transform(steps: list[dict], preprocess: dict) -> A.Compose:
    """Instantiate a preset's transforms; `size: null` (or height/width: null) means the input size."""
    transforms = [_instantiate(dict(step), preprocess) for step in steps]
    return A.Compose(transforms + [ToTensorV2()])


def build_eval_transform(preprocess: dict) -> A.Compose:
    """timm's eval recipe: resize the short side to input/crop_pct, then center-crop the input size."""
    height, width = preprocess["input_size"][1:]
    interpolation = INTERPOLATION[preprocess["interpolation"]]
    scale_hw = (int(height / preprocess["crop_pct"]), int(width / preprocess["crop_pct"]))
    return A.Compose([
        A.SmallestMaxSize(max_size_hw=scale_hw, interpolation=interpolation),
        A.CenterCrop(height=height, width=width),
        ToTensorV2(),
    ])


def _instantiate(step: dict[str, Any], preprocess: dict) -> A.BasicTransform:
    target = step.pop("_target_", None)
    if not target:
        raise UserError(f"augment step {step} has no _target_ (e.g. _target_: albumentations.HorizontalFlip).")
    try:
        cls = get_class(target)
    except Exception:
        raise UserError(f"augment step: unknown transform {target}. Use a class of albumentations, "
                        "e.g. albumentations.RandomResizedCrop.") from None
    _fill_sizes(cls, step, preprocess)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            transform = cls(**step)
        except (TypeError, ValueError) as error:
            raise UserError(f"augment step {target}: {_first_line(error)}") from None
    invalid = [str(w.message) for w in caught if "not valid for transform" in str(w.message)]
    if invalid:
        raise UserError(f"augment step {target}: {invalid[0]} (albumentations 2.x names: size=(h, w), fill=...).")
    return transform


def _fill_sizes(cls: type, step: dict, preprocess: dict) -> None:
    height, width = preprocess["input_size"][1:]
    params = inspect.signature(cls).parameters
    if "size" in params and step.get("size") is None:
        step["size"] = (height, width)
    for key, value in (("height", height), ("width", width)):
        if key in params and step.get(key) is None:
            step[key] = value
    if "interpolation" in params and "interpolation" not in step:
        step["interpolation"] = INTERPOLATION[preprocess["interpolation"]]


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:3])

"""albumentations pipelines: the training one from an augment preset, the eval one from the model's
data config; for segmentation and detection, the same presets with masks and boxes moving with the image. Both end in uint8 CHW tensors; normalisation happens on the device, in the loop,
because moving uint8 is 4× cheaper than float and the GPU does the arithmetic for free.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import warnings
from typing import Any

import cv2

from transfer.data.resize import EvalResize
from transfer.errors import UserError


def _import_albumentations():
    """albumentations asks PyPI for a newer version when it is first imported unless NO_ALBUMENTATIONS_UPDATE
    is set: set it for that import alone, so a caller's environment is left as it was."""
    before = os.environ.get("NO_ALBUMENTATIONS_UPDATE")
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    try:
        import albumentations
        import albumentations.pytorch
    finally:
        if before is None:
            del os.environ["NO_ALBUMENTATIONS_UPDATE"]
        else:
            os.environ["NO_ALBUMENTATIONS_UPDATE"] = before
    return albumentations, albumentations.pytorch.ToTensorV2


A, ToTensorV2 = _import_albumentations()

ALLOWED_MODULE = "albumentations."
INTERPOLATION = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
                 "area": cv2.INTER_AREA, "lanczos": cv2.INTER_LANCZOS4, "random": cv2.INTER_LINEAR}


def build_train_transform(steps: list[dict], preprocess: dict) -> A.Compose:
    """Instantiate a preset's transforms; `size: null` (or height/width: null) means the input size."""
    transforms = [_instantiate(dict(step), preprocess) for step in steps]
    return A.Compose(transforms + [ToTensorV2()])


def build_eval_transform(preprocess: dict) -> A.Compose:
    """timm's eval recipe through transfer's one resize (data/resize.py): scale the shorter side to
    input/crop_pct (antialiased), then centre-crop the input size: eval, predict, the caches and timm's own
    transform of an export see the same pixels."""
    height, width = preprocess["input_size"][1:]
    return A.Compose([CenterResize(height, width, preprocess["crop_pct"], preprocess["interpolation"]), ToTensorV2()])


class CenterResize(A.ImageOnlyTransform):
    """data/resize.py's EvalResize as an albumentations step, whose repr names its settings (the linear probe's
    feature cache is keyed by the transform's repr, so it must be the same in every process)."""

    def __init__(self, height: int, width: int, crop_pct: float, interpolation: str, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.height, self.width, self.crop_pct, self.interpolation = height, width, crop_pct, interpolation
        self.resize = EvalResize({"input_size": (3, height, width), "crop_pct": crop_pct,
                                  "interpolation": interpolation})

    def apply(self, img, **params):
        return self.resize(img)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "crop_pct", "interpolation")


def transform_class(target: str) -> type:
    """The albumentations transform a step's `_target_` names, and nothing else: a recipe, a saved config.yaml
    or an override is data, so it must not be able to import or call arbitrary code (`subprocess.Popen`)."""
    name = str(target)
    public = name.startswith(ALLOWED_MODULE) and not any(part.startswith("_") for part in name.split("."))
    module, _, attribute = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attribute, None) if public else None
    except ImportError:
        cls = None
    if isinstance(cls, type) and issubclass(cls, (A.BasicTransform, A.BaseCompose)):
        return cls
    if public and cls is None:  # a misspelling inside albumentations
        hint = difflib.get_close_matches(attribute, [n for n in dir(A) if n[:1].isupper()], n=1)
        did_you_mean = f" Did you mean {ALLOWED_MODULE}{hint[0]}?" if hint else ""
        raise UserError(f"augment step: unknown transform {name}.{did_you_mean} Use a class of albumentations, "
                        "e.g. albumentations.RandomResizedCrop.")
    raise UserError(f"augment step: _target_ {name} is not an albumentations transform. Only albumentations "
                    "classes can be named, e.g. _target_: albumentations.RandomResizedCrop.")


def _instantiate(step: dict[str, Any], preprocess: dict) -> A.BasicTransform:
    target = step.pop("_target_", None)
    if not target:
        raise UserError(f"augment step {step} has no _target_ (e.g. _target_: albumentations.HorizontalFlip).")
    cls = transform_class(target)
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
    """A preset's unset sizes and interpolation from the model's data config; shrinking antialiased."""
    height, width = preprocess["input_size"][1:]
    params = inspect.signature(cls).parameters
    if "size" in params and step.get("size") is None:
        step["size"] = (height, width)
    for key, value in (("height", height), ("width", width)):
        if key in params and step.get(key) is None:
            step[key] = value
    if "interpolation" in params and "interpolation" not in step:
        step["interpolation"] = INTERPOLATION[preprocess["interpolation"]]
    if "area_for_downscale" in params and "area_for_downscale" not in step:
        step["area_for_downscale"] = "image"  # shrinking antialiased (OpenCV's area filter); masks stay nearest


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:3])


# ---------------------------------------------------------------------------------------------
# segmentation and detection: masks follow every geometric step (nearest-neighbour, albumentations' default
# for masks), areas a step invents (rotation borders, padding, cutout) become the ignore index instead of
# background, and boxes go through A.BboxParams (COCO [x, y, w, h], clipped, dropped below `min_visibility`).
# Evaluation resizes the whole image to the input size: a centre crop would cut off pixels and objects that
# the metrics and predictions must cover.

IGNORE_INDEX = 255


def build_dense_transform(steps: list[dict] | None, preprocess: dict, boxes: bool = False,
                          min_visibility: float = 0.0, mask_fill: int = IGNORE_INDEX) -> A.Compose:
    """The training pipeline from a preset's `steps`, or the evaluation pipeline when `steps` is None.

    Call it as `transform(image=..., mask=...)` and, with `boxes`, `bboxes=[[x, y, w, h], ...], labels=[...],
    crowd=[...]` (the labels come back as floats: albumentations' habit)."""
    if steps is None:
        height, width = preprocess["input_size"][1:]
        transforms = [A.Resize(height=height, width=width, interpolation=INTERPOLATION[preprocess["interpolation"]],
                               area_for_downscale="image"), ToTensorV2()]
    else:
        transforms = list(build_train_transform([_with_mask_fill(step, mask_fill) for step in steps],
                                                preprocess).transforms)
    bbox_params = A.BboxParams(format="coco", label_fields=["labels", "crowd"], min_visibility=min_visibility,
                               clip=True, filter_invalid_bboxes=True) if boxes else None
    return A.Compose(transforms, bbox_params=bbox_params)


def _with_mask_fill(step: dict, mask_fill: int) -> dict:
    """The step with `fill_mask` set to the ignore index where the transform takes one and the preset is
    silent: pixels a transform makes up belong to no class."""
    step = dict(step)
    target = step.get("_target_")
    if target and "fill_mask" not in step:
        try:
            parameters = inspect.signature(transform_class(target)).parameters
        except UserError:  # build_train_transform refuses it with the fix
            return step
        if "fill_mask" in parameters:
            step["fill_mask"] = mask_fill
    return step

"""The one way transfer resizes an image's pixels: Pillow's resampling, with the geometry of torchvision's
`Resize(int)` and `CenterCrop`, which timm's own evaluation transform uses.

Pillow widens its filter by the scale when it shrinks (antialiasing), so a 1000 px photo reduced to 256 px
keeps its detail instead of aliasing, and the same file gives the same pixels in `transfer eval`, `transfer
predict`, the decoded-image caches, and a timm export run through `timm.data.create_transform` elsewhere.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

PIL_FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "area": Image.BOX,
               "lanczos": Image.LANCZOS, "random": Image.BILINEAR}


def resize(image: np.ndarray, height: int, width: int, interpolation: str = "bicubic") -> np.ndarray:
    """An H×W×C uint8 array at (height, width); the array itself when it already has that size."""
    if image.shape[:2] == (height, width):
        return image
    return np.array(Image.fromarray(image).resize((width, height), PIL_FILTERS[interpolation]))  # writable


def short_side_shape(height: int, width: int, side: int) -> tuple[int, int]:
    """The (height, width) whose shorter side is `side`, the longer one scaled and truncated as torchvision does."""
    if height <= width:
        return side, int(side * width / height)
    return int(side * height / width), side


def shrink_short_side(image: np.ndarray, side: int, interpolation: str = "bicubic") -> np.ndarray:
    """The image with its shorter side reduced to `side` (aspect kept); a smaller image stays as it is."""
    height, width = image.shape[:2]
    if min(height, width) <= side:
        return image
    return resize(image, *short_side_shape(height, width, side), interpolation)


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centred (height, width) window, offsets rounded as torchvision rounds them; zero-padded when smaller."""
    short_h, short_w = max(0, height - image.shape[0]), max(0, width - image.shape[1])
    if short_h or short_w:
        top, left = short_h // 2, short_w // 2
        image = np.pad(image, ((top, short_h - top), (left, short_w - left), (0, 0)))
    top = int(round((image.shape[0] - height) / 2.0))
    left = int(round((image.shape[1] - width) / 2.0))
    return np.ascontiguousarray(image[top:top + height, left:left + width])


def eval_scale(preprocess: dict) -> tuple[int, int]:
    """The (height, width) evaluation scales to before its centre crop (timm: floor(input / crop_pct))."""
    return tuple(int(side / preprocess["crop_pct"]) for side in preprocess["input_size"][1:])


def eval_shape(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """The image's size once scaled, aspect kept, to cover `scale`: the shorter side at a square scale (torchvision's
    rule), else the larger of the two ratios (timm's ResizeKeepRatio for non-square inputs)."""
    if scale[0] == scale[1]:
        return short_side_shape(height, width, scale[0])
    ratio = max(scale[0] / height, scale[1] / width)
    return round(height * ratio), round(width * ratio)


class EvalResize:
    """timm's evaluation geometry as an albumentations image function: scale to `eval_scale`, centre crop the
    input size. A plain class so DataLoader workers can pickle it. With shrink_only it is the cache's first
    half of the same step: the scaling alone, never enlarging, so evaluating a cached image changes no pixel."""

    def __init__(self, preprocess: dict, shrink_only: bool = False) -> None:
        self.scale = eval_scale(preprocess)
        self.height, self.width = preprocess["input_size"][1:]
        self.interpolation = preprocess["interpolation"]
        self.shrink_only = shrink_only

    def __call__(self, image: np.ndarray, **_) -> np.ndarray:
        shape = eval_shape(*image.shape[:2], self.scale)
        if self.shrink_only:
            return image if shape[0] >= image.shape[0] else resize(image, *shape, self.interpolation)
        return center_crop(resize(image, *shape, self.interpolation), self.height, self.width)


class CacheSizes:
    """What the decoded-image caches keep of each file. Evaluation images: evaluation's own scaling (never
    enlarging), so a cached image evaluates to exactly the pixels its file gives. Training images: the shorter
    side at `train_side`, large enough that the smallest random crop is not enlarged (training sees the detail
    it would see without a cache)."""

    def __init__(self, preprocess: dict, train_side: int, eval_sources: set[str]) -> None:
        self.eval = EvalResize(preprocess, shrink_only=True)
        self.train_side, self.eval_sources = train_side, eval_sources
        self.interpolation = preprocess["interpolation"]

    def shrink(self, source: str, image: np.ndarray) -> np.ndarray:
        if source in self.eval_sources:
            return self.eval(image)
        return shrink_short_side(image, self.train_side, self.interpolation)

    def decode_side(self, source: str) -> int | None:
        """The shorter side a JPEG may be reduced to while decoding (images.read_rgb's `min_side`): training
        images' kept side; None for evaluation images, whose pixels stay those of a full decode (timm's)."""
        return None if source in self.eval_sources else self.train_side

    def shape(self, source: str, height: int, width: int) -> tuple[int, int]:
        """The kept size, from the header's size alone (budgets are checked before anything is decoded)."""
        if source in self.eval_sources:
            shape = eval_shape(height, width, self.eval.scale)
            return shape if shape[0] < height else (height, width)
        return short_side_shape(height, width, self.train_side) if min(height, width) > self.train_side \
            else (height, width)

    def summary(self) -> str:
        """The kept sizes in words, for `transfer cache list`."""
        return f"training images at most {self.train_side} px on the shorter side, evaluation's at {self.eval.scale}"

    def describe(self, source: str) -> str:
        """What decides the pixels kept for `source` (part of the disk cache's key)."""
        if source in self.eval_sources:
            return f"eval {self.eval.scale} {self.interpolation}"
        return f"train {self.train_side} {self.interpolation}"


def train_side(preprocess: dict, augment_steps: list[dict]) -> int:
    """The shorter side a training image needs so that no random crop enlarges it: input / sqrt(smallest area
    share) for RandomResizedCrop-like steps (`scale`), else evaluation's scale."""
    side = max(eval_scale(preprocess))
    largest = max(preprocess["input_size"][1:])
    for step in augment_steps:
        scale = step.get("scale") if "Resized" in str(step.get("_target_", "")) else None
        if scale:
            side = max(side, math.ceil(largest / math.sqrt(max(min(scale), 1e-3))))
    return side

"""Masks and boxes must stay on their objects through every augmentation preset: a crop, flip, rotation or
cutout that moved the image but not its targets would train the model on wrong labels without any error."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from transfer.config import compose, group_options
from transfer.data.augment import IGNORE_INDEX, build_dense_transform

SIDE, INPUT = 64, 48
OBJECTS = {1: (8, 10, 20, 14), 2: (34, 30, 18, 24)}  # label → COCO box [x, y, w, h] of a filled rectangle
PREPROCESS = {"input_size": [3, INPUT, INPUT], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3,
              "crop_pct": 1.0}
TOLERANCE = 2.0  # px: masks are resampled nearest-neighbour, boxes exactly; a crop's upscaling then a rotation
                 # (strong) compound to 2 px, the others stay under 1 px


def _scene() -> tuple[np.ndarray, np.ndarray]:
    image = np.full((SIDE, SIDE, 3), 20, dtype=np.uint8)
    mask = np.zeros((SIDE, SIDE), dtype=np.uint8)
    for label, (x, y, w, h) in OBJECTS.items():
        image[y:y + h, x:x + w] = 230
        mask[y:y + h, x:x + w] = label
    return image, mask


def _tight(region: np.ndarray) -> tuple[float, float, float, float] | None:
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    if not len(rows):
        return None
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def _contains(outer, inner) -> bool:
    return (outer[0] - TOLERANCE <= inner[0] and outer[1] - TOLERANCE <= inner[1]
            and inner[2] <= outer[2] + TOLERANCE and inner[3] <= outer[3] + TOLERANCE)


@pytest.mark.parametrize("preset", group_options("augment"))
def test_masks_and_boxes_follow_the_image(preset: str) -> None:
    steps = OmegaConf.to_container(compose([f"augment={preset}"]).augment.train)
    transform = build_dense_transform(steps, PREPROCESS, boxes=True, min_visibility=0.0)
    image, mask = _scene()
    boxes = [list(box) for box in OBJECTS.values()]
    for seed in range(25):
        transform.set_random_seed(seed)
        out = transform(image=image, mask=mask, bboxes=boxes, labels=list(OBJECTS), crowd=[False] * len(OBJECTS))
        picture, target = out["image"].numpy(), np.asarray(out["mask"])
        assert picture.shape == (3, INPUT, INPUT) and target.shape == (INPUT, INPUT)
        # pixels: objects bright, background dark, wherever the mask labels them (edges resampled differently)
        brightness = picture.astype(np.float32).mean(axis=0)
        labelled = target != IGNORE_INDEX
        agree = ((brightness > 110) == (target > 0))[labelled]
        assert agree.mean() > 0.93, f"{preset} seed {seed}: image and mask disagree on {1 - agree.mean():.0%}"
        # boxes: each holds its object's mask pixels and lies within them (cutout holes are ignore pixels)
        kept = dict(zip((int(label) for label in out["labels"]), out["bboxes"]))
        for label in OBJECTS:
            visible = _tight(target == label)
            if label not in kept:
                assert visible is None or (target == label).sum() <= 4, f"{preset} seed {seed}: box {label} lost"
                continue
            x, y, w, h = kept[label]
            box = (x, y, x + w, y + h)
            assert visible is not None, f"{preset} seed {seed}: box {label} without any mask pixel"
            assert _contains(box, visible), f"{preset} seed {seed}: mask {label} {visible} outside box {box}"
            if min(visible[:2]) > 0 and max(visible[2:]) < INPUT:
                # away from the border (where a rotated box is clipped as a rectangle, larger than what is left
                # of the object) the box is tight: within the mask, counting cutout holes (ignore pixels)
                covered = _tight((target == label) | (target == IGNORE_INDEX))
                assert _contains(covered, box), f"{preset} seed {seed}: box {label} {box} beyond mask {visible}"


def test_eval_transform_resizes_without_cropping() -> None:
    """Evaluation must see every object: the whole image resized, boxes scaled by the same factor."""
    transform = build_dense_transform(None, PREPROCESS, boxes=True)
    image, mask = _scene()
    out = transform(image=image, mask=mask, bboxes=[list(b) for b in OBJECTS.values()], labels=list(OBJECTS),
                    crowd=[False] * len(OBJECTS))
    scale = INPUT / SIDE
    for (x, y, w, h), got in zip(OBJECTS.values(), out["bboxes"]):
        assert list(got) == pytest.approx([x * scale, y * scale, w * scale, h * scale], abs=1e-3)

"""The scenes benchmark must be reproducible byte for byte, and its boxes, masks and COCO file must agree,
or detection and segmentation numbers would be measured against wrong targets."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives at the repo root

from bench.fashion_mnist import FASHION_CLASSES, find_fashion_mnist  # noqa: E402
from bench.fashion_scenes import CANVAS, IGNORE, build_scenes  # noqa: E402

TRAIN, TEST = 12, 5


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        find_fashion_mnist()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return build_scenes(tmp_path_factory.mktemp("scenes") / "tiny", TRAIN, TEST)


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_classes(scenes: Path) -> None:
    assert (scenes / "classes.txt").read_text().splitlines() == ["background", *FASHION_CLASSES]
    for split, count in (("train", TRAIN), ("test", TEST)):
        assert len(list((scenes / split / "images").glob("*.png"))) == count
        assert len(list((scenes / split / "masks").glob("*.png"))) == count


def test_same_seed_same_bytes(scenes: Path, tmp_path: Path) -> None:
    again = build_scenes(tmp_path / "again", TRAIN, TEST)
    assert _digest(again) == _digest(scenes)
    other = build_scenes(tmp_path / "other", TRAIN, TEST, train_seed=7)
    assert _digest(other)["train/annotations.json"] != _digest(scenes)["train/annotations.json"]


def test_boxes_match_masks(scenes: Path) -> None:
    for split in ("train", "test"):
        coco = json.loads((scenes / split / "annotations.json").read_text())
        by_image: dict[int, list[dict]] = {}
        for ann in coco["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        for entry in coco["images"]:
            anns = by_image.get(entry["id"], [])
            assert 1 <= len(anns) <= 4 and entry["width"] == entry["height"] == CANVAS
            image = np.asarray(Image.open(scenes / split / "images" / entry["file_name"]))
            mask = np.asarray(Image.open(scenes / split / "masks" / entry["file_name"]))
            assert image.shape == (CANVAS, CANVAS, 3) and mask.dtype == np.uint8
            assert set(np.unique(mask)) <= {0, IGNORE, *range(1, len(FASHION_CLASSES) + 1)}
            for ann in anns:
                x, y, w, h = ann["bbox"]
                inside = mask[y:y + h, x:x + w] == ann["category_id"]
                # the box is tight: every edge row/column of it touches the garment's class
                assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
                assert 0 < ann["area"] <= inside.sum()
            labelled = {int(v) for v in np.unique(mask)} - {0, IGNORE}
            assert labelled == {a["category_id"] for a in anns}


def test_coco_file_loads_in_pycocotools(scenes: Path) -> None:
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(scenes / "train" / "annotations.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(FASHION_CLASSES)
    assert len(coco.getImgIds()) == TRAIN and len(coco.getAnnIds()) >= TRAIN


def test_multilabel_manifest_lists_the_garments_each_scene_shows(scenes: Path) -> None:
    """multilabel.csv (task=multilabel) says which garments each scene shows: the classes of its mask, the same
    as its annotated boxes; written from the annotations, the images untouched."""
    from bench.fashion_scenes import write_label_manifest
    from transfer.data.labelsets import read_label_manifest

    before = _digest(scenes)
    manifest = write_label_manifest(scenes)
    assert {k: v for k, v in _digest(scenes).items() if k != "multilabel.csv"} == \
        {k: v for k, v in before.items() if k != "multilabel.csv"}
    data = read_label_manifest(manifest)  # (a garment missing from 12 train scenes is fine here)
    assert set(data.classes) <= set(FASHION_CLASSES) and data.classes == sorted(data.classes)
    assert {name: len(records) for name, records in data.splits.items()} == {"train": TRAIN, "test": TEST}
    for split, records in data.splits.items():
        for record in records:
            mask = np.asarray(Image.open(Path(record.source.replace("/images/", "/masks/"))))
            shown = sorted(FASHION_CLASSES[v - 1] for v in set(np.unique(mask)) - {0, IGNORE})
            assert [data.classes[i] for i in np.flatnonzero(record.label)] == shown, record.source

"""Compose Fashion-MNIST garments into 128x128 scenes for the detection and segmentation benchmarks.

Dense tasks need images holding several objects with boxes and pixel masks. We make them from real
garments (Debian's ``dataset-fashion-mnist``, read as bench/fashion_mnist.py reads it) so no network
is needed and the pixels are not synthetic shapes. Train scenes use garments of the train file, test
scenes garments of the test file, so no garment appears in both.

Composition rule (one ``rng = np.random.default_rng(seed)`` per split, drawn in this order):
  * background: a base colour, a smooth low-frequency texture (8x8 noise upsampled) and fine pixel
    noise, so a threshold on brightness does not solve the task;
  * 1-4 garments per scene; each a random garment of the split, resized to 28..56 px, tinted with a
    random colour, placed where its silhouette overlaps the garments already there by at most
    ``MAX_OVERLAP`` of either one's pixels (a placement failing ``PLACE_TRIES`` times is dropped);
  * silhouette = resized garment pixels above ``THRESHOLD``; later garments occlude earlier ones; the
    mask and box of a garment are what stays visible; a garment left with fewer than ``MIN_VISIBLE``
    pixels gets no box and mask value 255 (ignore), so neither task is scored on it.

Layout written (the one both dense tasks read)::

    OUT/classes.txt                    background, then the ten garment names (line i = mask value i)
    OUT/{train,test}/images/NNNN.png   RGB scene
    OUT/{train,test}/masks/NNNN.png    uint8: class index + 1 per pixel, 0 = background, 255 = ignore
    OUT/{train,test}/annotations.json  COCO boxes (category id = mask value)
    OUT/manifest.json                  parameters and counts; written last, it marks a complete build
    OUT/multilabel.csv                 path,labels,split: the garments annotated in each scene (task=multilabel),
                                       derived from annotations.json (write_label_manifest), no image rebuilt

Usage::

    python -m bench.fashion_scenes --out bench/data/fashion_scenes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.fashion_mnist import FASHION_CLASSES, _load_split, _read_manifest, building, find_fashion_mnist, replace_dir

BUILDER = "bench.fashion_scenes"
FORMAT_VERSION = 1
CANVAS = 128
MIN_SIDE, MAX_SIDE = 28, 56
MAX_GARMENTS = 4
THRESHOLD = 24          # garment pixel (0-255, after resizing) above this belongs to the silhouette
MAX_OVERLAP = 0.25      # largest share of either silhouette that may be covered by the other
MIN_VISIBLE = 40        # pixels an occluded garment must keep to stay annotated
PLACE_TRIES = 20
IGNORE = 255           # mask value of a garment too hidden to annotate (the readers' ignore index)


# ----------------------------------------------------------------------------------------------
# One scene


def _background(rng: np.random.Generator) -> np.ndarray:
    """A dim coloured canvas with blotches and grain: plain enough to see, not trivially separable."""
    base = rng.uniform(10, 90, size=3)
    blotches = rng.normal(0, 18, size=(8, 8, 3)).astype(np.float32)
    smooth = np.stack([np.asarray(Image.fromarray(blotches[..., c]).resize((CANVAS, CANVAS), Image.BICUBIC))
                       for c in range(3)], axis=-1)
    grain = rng.normal(0, 6, size=(CANVAS, CANVAS, 3))
    return base + smooth + grain


def _garment(rng: np.random.Generator, images: np.ndarray) -> tuple[int, np.ndarray]:
    """Pick and resize one garment; returns its index in the split and its intensity in [0, 1]."""
    index = int(rng.integers(len(images)))
    side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    pixels = np.asarray(Image.fromarray(images[index]).resize((side, side), Image.BILINEAR))
    return index, pixels.astype(np.float32) / 255.0


def _place(rng: np.random.Generator, silhouette: np.ndarray, owner: np.ndarray) -> tuple[int, int] | None:
    """Find a top-left corner whose overlap with every visible garment stays under MAX_OVERLAP."""
    side = silhouette.shape[0]
    area = max(int(silhouette.sum()), 1)
    for _ in range(PLACE_TRIES):
        y, x = (int(v) for v in rng.integers(0, CANVAS - side + 1, size=2))
        under = owner[y:y + side, x:x + side][silhouette]
        ids, counts = np.unique(under[under >= 0], return_counts=True)
        visible = {int(i): int((owner == i).sum()) for i in ids}
        if all(c <= MAX_OVERLAP * area and c <= MAX_OVERLAP * visible[int(i)] for i, c in zip(ids, counts)):
            return y, x
    return None


def compose_scene(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Return (RGB uint8 image, uint8 mask of class + 1, visible garments as {label, bbox, area, source})."""
    canvas = _background(rng)
    owner = np.full((CANVAS, CANVAS), -1, dtype=np.int64)   # which garment each pixel shows
    placed: list[tuple[int, int]] = []                     # (class label, source index) per garment
    for _ in range(int(rng.integers(1, MAX_GARMENTS + 1))):
        index, intensity = _garment(rng, images)
        tint = rng.uniform(120, 255, size=3)
        silhouette = intensity * 255 > THRESHOLD
        corner = _place(rng, silhouette, owner)
        if corner is None or not silhouette.any():
            continue
        y, x = corner
        side = silhouette.shape[0]
        region = canvas[y:y + side, x:x + side]
        region[silhouette] = (intensity[..., None] * tint)[silhouette]
        owner[y:y + side, x:x + side][silhouette] = len(placed)
        placed.append((int(labels[index]), index))
    mask = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
    garments = []
    for i, (label, index) in enumerate(placed):
        visible = owner == i
        area = int(visible.sum())
        mask[visible] = label + 1 if area >= MIN_VISIBLE else IGNORE
        if area < MIN_VISIBLE:
            continue
        rows, cols = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
        bbox = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
        garments.append({"label": label, "bbox": bbox, "area": area, "source": index})
    return np.clip(canvas, 0, 255).round().astype(np.uint8), mask, garments


# ----------------------------------------------------------------------------------------------
# Writing


def _coco(names: list[str], scenes: list[list[dict]]) -> dict:
    """COCO detection file; category ids equal mask values so both tasks share one class list."""
    images, annotations = [], []
    for image_id, (name, garments) in enumerate(zip(names, scenes), start=1):
        images.append({"id": image_id, "file_name": name, "width": CANVAS, "height": CANVAS})
        for g in garments:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": g["label"] + 1,
                                "bbox": g["bbox"], "area": g["area"], "iscrowd": 0})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(FASHION_CLASSES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_split(dest: Path, images: np.ndarray, labels: np.ndarray, count: int, seed: int) -> int:
    """Write ``count`` scenes; returns the number of annotated garments."""
    rng = np.random.default_rng(seed)
    (dest / "images").mkdir(parents=True)
    (dest / "masks").mkdir()
    names, scenes = [], []
    for n in range(count):
        image, mask, garments = compose_scene(rng, images, labels)
        name = f"{n:04d}.png"
        Image.fromarray(image).save(dest / "images" / name)
        Image.fromarray(mask).save(dest / "masks" / name)
        names.append(name)
        scenes.append(garments)
    coco = _coco(names, scenes)
    (dest / "annotations.json").write_text(json.dumps(coco) + "\n")
    return len(coco["annotations"])


def _params(train: int, test: int, train_seed: int, test_seed: int) -> dict:
    return {"train": train, "test": test, "train_seed": train_seed, "test_seed": test_seed,
            "canvas": CANVAS, "classes": list(FASHION_CLASSES), "format_version": FORMAT_VERSION}


def _is_complete(out: Path, params: dict) -> bool:
    manifest = _read_manifest(out)
    if manifest is None or manifest.get("builder") != BUILDER or manifest.get("params") != params:
        return False
    return all(sum(1 for _ in (out / split / "masks").glob("*.png")) == params[split] for split in ("train", "test"))


def build_scenes(out: Path, train: int = 1000, test: int = 300, train_seed: int = 0, test_seed: int = 1) -> Path:
    """Build (or reuse) the scenes folder; same parameters give the same bytes."""
    out = Path(out)
    params = _params(train, test, train_seed, test_seed)
    if _is_complete(out, params):
        return out
    root = find_fashion_mnist()
    with building(out) as tmp:
        (tmp / "classes.txt").write_text("\n".join(("background", *FASHION_CLASSES)) + "\n")
        counts = {}
        for split, count, seed in (("train", train, train_seed), ("test", test, test_seed)):
            images, labels = _load_split(root, split)
            counts[split] = {"scenes": count, "garments": write_split(tmp / split, images, labels, count, seed)}
        manifest = {"builder": BUILDER, "params": params, "counts": counts}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(tmp, out, BUILDER)
    return out


def scene_labels(split_dir: Path) -> list[tuple[str, list[str]]]:
    """(image path relative to the scenes folder, sorted names of the garments annotated in it) per scene of a
    split, from its COCO file: a garment too hidden to get a box is not a label either."""
    coco = json.loads((split_dir / "annotations.json").read_text())
    names = {category["id"]: category["name"] for category in coco["categories"]}
    shown: dict[int, set[str]] = {image["id"]: set() for image in coco["images"]}
    for annotation in coco["annotations"]:
        shown[annotation["image_id"]].add(names[annotation["category_id"]])
    return [(f"{split_dir.name}/images/{image['file_name']}", sorted(shown[image["id"]])) for image in coco["images"]]


def write_label_manifest(out: Path) -> Path:
    """OUT/multilabel.csv for task=multilabel: which garments each train and test scene shows (labels joined by a
    space, none is possible in principle), from the scenes' annotations; written atomically, images untouched."""
    path = Path(out) / "multilabel.csv"
    lines = ["path,labels,split"] + [f"{image},{' '.join(labels)},{split}" for split in ("train", "test")
                                     for image, labels in scene_labels(Path(out) / split)]
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("\n".join(lines) + "\n")
    temporary.replace(path)
    return path


def build_scene_labels(manifest: Path) -> Path:
    """The scenes folder holding `manifest` (built when missing) and its multi-label manifest."""
    build_scenes(Path(manifest).parent)
    return write_label_manifest(Path(manifest).parent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to create, e.g. bench/data/fashion_scenes")
    parser.add_argument("--train", type=int, default=1000, help="train scenes")
    parser.add_argument("--test", type=int, default=300, help="test scenes")
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--test-seed", type=int, default=1)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = build_scenes(args.out, args.train, args.test, args.train_seed, args.test_seed)
        write_label_manifest(out)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    print(f"{out}  " + "  ".join(f"{s}={c['scenes']} scenes/{c['garments']} garments" for s, c in counts.items())
          + f"  {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""COCO box annotations → checked records per split, and the torch Dataset that augments image and boxes.

A user's COCO file is rarely clean: boxes stick out of the image, have zero width, images are listed whose
files were never copied. Training must not crash on these mid-epoch, and must not hide them either: each is
fixed (a box clipped to the image) or left out (a zero-area box, a missing file) and listed with its reason
in RUN/skipped_images.csv. What cannot be guessed — a category without a name, an annotation naming a
category that does not exist — stops the run at once with the file and the fix.

Layout: ROOT/{train,val,test}/annotations.json with images in ROOT/{split}/images/ (file_name is relative to
it, or to the JSON's folder), or one ROOT/annotations.json split here by data.val_fraction / test_fraction /
split_seed. Category ids may be any integers; labels are 1..K in id order (0 is the detector's background).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset

from transfer.data.cache import estimate_bytes, fits_in_memory, say
from transfer.data.cache_folder import size
from transfer.data.dataset import bad_sample, seed_augmentation, split_bad
from transfer.data.images import BadImageError, read_rgb
from transfer.data.sources import SPLIT_ALIASES, is_inside
from transfer.errors import UserError

ANNOTATIONS = "annotations.json"


@dataclass(frozen=True)
class BoxRecord:
    """One image and its boxes: COCO [x, y, w, h] in pixels, labels 1..K, and which boxes are crowds (groups
    of objects in one box: never a training target, an ignore region when scoring, as COCOeval treats them)."""

    source: str
    image_id: int
    boxes: np.ndarray   # float32 N x 4
    labels: np.ndarray  # int64 N
    crowd: np.ndarray   # bool N

    @property
    def name(self) -> str:
        return self.source


@dataclass
class Categories:
    """COCO category ids and names in label order (label = position + 1)."""

    ids: list[int]
    names: list[str]

    def label(self) -> dict[int, int]:
        return {category_id: index + 1 for index, category_id in enumerate(self.ids)}


# ----------------------------------------------------------------------------------------------
# Reading one COCO file


def _load_json(path: Path) -> dict:
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"{path}: not a readable COCO JSON file ({str(error).splitlines()[0][:200]}). "
                        "Fix the file or point data.root at another folder.") from None
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list) \
            or not isinstance(coco.get("categories"), list):
        raise UserError(f"{path}: a COCO file needs 'images' and 'categories' lists (and 'annotations'); "
                        "see the layout in the README's Detection section.")
    return coco


def read_categories(coco: dict, path: Path) -> Categories:
    """Categories sorted by id; a nameless or duplicate category is an error the user must fix."""
    seen: dict[int, str] = {}
    for entry in coco["categories"]:
        category_id = entry.get("id") if isinstance(entry, dict) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(category_id, int):
            raise UserError(f"{path}: category {entry!r} has no integer 'id'. Give every category an id.")
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"{path}: category id {category_id} has no name. Give every entry of 'categories' "
                            'a "name" (it labels predictions and metrics).')
        if category_id in seen:
            raise UserError(f"{path}: category id {category_id} appears twice ({seen[category_id]!r}, {name!r}). "
                            "Give each category its own id.")
        seen[category_id] = name.strip()
    if not seen:
        raise UserError(f"{path}: 'categories' is empty. List the object classes, e.g. "
                        '[{"id": 1, "name": "shirt"}].')
    ids = sorted(seen)
    return Categories(ids, [seen[i] for i in ids])


def read_coco(path: Path, categories: Categories | None = None, allow_outside_root: bool = False
              ) -> tuple[Categories, list[BoxRecord], list[tuple[str, str]]]:
    """(categories, one record per usable image, [(what, reason)] of everything fixed or left out).

    `categories` from the train file makes the other splits' files agree with it."""
    coco = _load_json(path)
    own = read_categories(coco, path)
    if categories is not None and own.names != categories.names:
        raise UserError(f"{path}: categories {own.names} differ from the training split's {categories.names}. "
                        "Use the same 'categories' list in every split's annotations.json.")
    categories = categories or own
    images, skipped = _read_images(coco, path, allow_outside_root)
    boxes = _read_annotations(coco, path, images, categories, skipped)
    records = [BoxRecord(source, image_id, *_stack(boxes.get(image_id, [])))
               for image_id, (source, _, _) in images.items()]
    return categories, records, skipped


def _images_folder(path: Path) -> Path:
    folder = path.parent / "images"
    return folder if folder.is_dir() else path.parent


def _read_images(coco: dict, path: Path, allow_outside_root: bool
                 ) -> tuple[dict[int, tuple[str, int, int]], list[tuple[str, str]]]:
    """image id → (file, width, height) for entries whose file exists; the others are listed as skipped."""
    folder, root = _images_folder(path), path.parent
    images, skipped = {}, []
    for entry in coco["images"]:
        image_id, file_name = (entry.get("id"), entry.get("file_name")) if isinstance(entry, dict) else (None, None)
        if not isinstance(image_id, int) or not isinstance(file_name, str) or not file_name:
            skipped.append((f"{path}: image entry {entry!r}"[:300], "image entry without id or file_name"))
            continue
        file = folder / file_name
        if not file.exists() and (root / file_name).exists():
            file = root / file_name
        if not allow_outside_root and not is_inside(file, root):
            raise UserError(f"{path} names a file outside its folder {root.resolve()}: {file_name}. If you trust "
                            "this file, allow it with data.allow_outside_root=true.")
        if not file.is_file():
            skipped.append((str(file), f"listed in {path.name} but missing"))
            continue
        width, height = entry.get("width"), entry.get("height")
        if not isinstance(width, int) or not isinstance(height, int) or width <= 0 or height <= 0:
            width, height = _image_size(file)
        images[image_id] = (str(file), width, height)
    return images, skipped


def _image_size(file: Path) -> tuple[int, int]:
    """From the header only; an unreadable file gets (0, 0) and is reported when it is decoded."""
    try:
        with Image.open(file) as image:
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return 0, 0


def _read_annotations(coco: dict, path: Path, images: dict, categories: Categories,
                      skipped: list[tuple[str, str]]) -> dict[int, list[tuple[list[float], int, bool]]]:
    """image id → [(clipped xywh box, label, is a crowd)]; fixes and skips are appended to `skipped`."""
    labels = categories.label()
    boxes: dict[int, list[tuple[list[float], int, bool]]] = {}
    for ann in coco.get("annotations") or []:
        category_id = ann.get("category_id")
        if category_id not in labels:
            raise UserError(f"{path}: annotation {ann.get('id')} has category_id {category_id}, which is not in "
                            f"'categories' (ids {categories.ids}). Add that category or correct the annotation.")
        image = images.get(ann.get("image_id"))
        if image is None:
            continue  # its image entry is missing or was skipped (and listed) above
        where = f"{image[0]}#annotation={ann.get('id')}"
        box, reason = clip_box(ann.get("bbox"), image[1], image[2])
        if reason:
            skipped.append((where, reason))
        if box is not None:
            boxes.setdefault(ann["image_id"], []).append((box, labels[category_id], bool(ann.get("iscrowd"))))
    return boxes


def clip_box(bbox, width: int, height: int) -> tuple[list[float] | None, str | None]:
    """(box clipped to the image or None when nothing is left, the reason when it was changed or dropped)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or \
            not all(isinstance(v, (int, float)) and np.isfinite(v) for v in bbox):
        return None, f"malformed bbox {bbox!r} (expected [x, y, width, height]); box skipped"
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return None, f"zero-area box {[x, y, w, h]}; box skipped"
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None, f"box outside the image {[x, y, w, h]} ({width}x{height}); box skipped"
    if (x0, y0, x1, y1) != (x, y, x + w, y + h):
        return [x0, y0, x1 - x0, y1 - y0], f"box outside the image {[x, y, w, h]} ({width}x{height}); clipped"
    return [x, y, w, h], None


def _stack(entries: list[tuple[list[float], int, bool]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes = np.array([box for box, _, _ in entries], dtype=np.float32).reshape(-1, 4)
    return (boxes, np.array([label for _, label, _ in entries], dtype=np.int64),
            np.array([crowd for _, _, crowd in entries], dtype=bool))


# ----------------------------------------------------------------------------------------------
# Splits


def read_splits(root: str | Path, val_fraction: float, test_fraction: float, split_seed: int,
                allow_outside_root: bool = False
                ) -> tuple[Categories, dict[str, list[BoxRecord]], list[tuple[str, str]]]:
    """Records of train / val / test from split folders, or carved from one pooled annotations.json."""
    if root is None:
        raise UserError(f"task=detection needs data.root=DIR: DIR/train/{ANNOTATIONS} (COCO boxes) with the images "
                        f"in DIR/train/images/, or one DIR/{ANNOTATIONS} + DIR/images/.")
    root = Path(root).expanduser()
    files = _split_files(root)
    categories, records, skipped = read_coco(files.pop("train", None) or files.pop("all"),
                                             allow_outside_root=allow_outside_root)
    splits = {"train": records}
    for split, path in files.items():
        _, splits[split], more = read_coco(path, categories, allow_outside_root)
        skipped += more
    pool = splits.pop("train")
    if "test" not in splits and test_fraction > 0:
        pool, splits["test"] = _random_split(pool, test_fraction, split_seed)
    if "val" not in splits and val_fraction > 0:
        share = val_fraction / (1 - test_fraction) if "test" not in files else val_fraction
        pool, splits["val"] = _random_split(pool, share, split_seed)
    if not pool:
        raise UserError(f"{root}: no training images left (every image entry was skipped or split off); "
                        "see skipped_images.csv in the run folder.")
    splits["train"] = pool
    return categories, {name: splits[name] for name in ("train", "val", "test") if name in splits}, skipped


def _split_files(root: Path) -> dict[str, Path]:
    """split → annotations.json: ROOT/{train,val,test}/annotations.json, or ROOT/annotations.json ('all')."""
    if root.is_file() and root.suffix == ".json":
        return {"all": root}
    found = {SPLIT_ALIASES[d.name.lower()]: d / ANNOTATIONS for d in sorted(root.iterdir())
             if d.is_dir() and d.name.lower() in SPLIT_ALIASES and (d / ANNOTATIONS).is_file()} \
        if root.is_dir() else {}
    if found and "train" not in found:
        raise UserError(f"{root} has {', '.join(sorted(found))}/{ANNOTATIONS} but no train/{ANNOTATIONS}.")
    if not found and (root / ANNOTATIONS).is_file():
        return {"all": root / ANNOTATIONS}
    if not found:
        raise UserError(f"data.root={root}: no COCO annotations found. Detection reads "
                        f"ROOT/train/{ANNOTATIONS} (+ val/, test/) with images in ROOT/train/images/, "
                        f"or one ROOT/{ANNOTATIONS} that is split by data.val_fraction / data.test_fraction.")
    return found


def _random_split(records: list[BoxRecord], fraction: float, seed: int) -> tuple[list[BoxRecord], list[BoxRecord]]:
    """Images hold several classes, so no stratification; a fixed seed keeps the partition reproducible."""
    if len(records) < 2:
        return records, []
    kept, held = train_test_split(records, test_size=fraction, random_state=seed)
    return list(kept), list(held)


# ----------------------------------------------------------------------------------------------
# Dataset


class BoxDataset(Dataset):
    """Decode, augment image and boxes together; boxes come out as xyxy tensors, labels 1..K.

    A file that fails to decode yields (None, path, reason, strict) like the classification dataset, so one
    bad file is skipped and listed, never the end of an epoch."""

    def __init__(self, records: list[BoxRecord], transform, seed: int | None = None, strict: bool = False,
                 cache: dict[str, np.ndarray] | None = None) -> None:
        self.records, self.transform, self.seed, self.strict = records, transform, seed, strict
        self.cache = cache if cache is not None else {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict | tuple:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        record = self.records[index]
        try:
            image = self.cache.get(record.source)
            image = read_rgb(record.source) if image is None else image
        except BadImageError as error:
            return bad_sample(error, self.strict)
        if self.seed is not None:
            seed_augmentation(self.transform, self.seed, epoch, index)
        out = self.transform(image=image, bboxes=record.boxes, labels=record.labels, crowd=record.crowd)
        return {"image": out["image"], "boxes": xywh_to_xyxy(out["bboxes"]),
                "labels": torch.as_tensor(np.asarray(out["labels"]), dtype=torch.int64).reshape(-1),
                "iscrowd": torch.as_tensor(np.asarray(out["crowd"]), dtype=torch.bool).reshape(-1),
                "index": index}


def decode_all(records: list[BoxRecord], strict: bool,
               budget_bytes: int | None = None) -> tuple[dict[str, np.ndarray] | None, list[tuple[str, str]]]:
    """data.cache=ram: every image decoded once, so epochs augment from memory; unreadable ones are known (and
    listed) before the first step. Images are kept at full size, within the memory budget of classification's
    RAM cache (half of what the process may use); when they would not fit, (None, []) after one line, and the
    images are read each epoch as with data.cache=none."""
    budget = fits_in_memory(estimate_bytes(records, None),
                            "reading images from disk each epoch instead (data.cache=none).", budget_bytes)
    if budget is None:
        return None, []
    cache, skipped = {}, []
    for record in records:
        try:
            cache[record.source] = read_rgb(record.source)
        except BadImageError as error:
            if strict:
                raise
            skipped.append((str(error.path), error.reason))
    held = sum(image.nbytes for image in cache.values())
    say(f"data.cache=ram: {len(cache)} images, {size(held)} in memory (budget {size(budget)})")
    return cache, skipped


def xywh_to_xyxy(boxes) -> torch.Tensor:
    boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
    return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)


def collate_boxes(items: list) -> dict:
    """Images stacked as float in [0, 1] (NOT normalised: the detector's transform normalises), targets as a
    list of {"boxes" xyxy, "labels"}; unreadable files become batch["skipped"] / batch["fatal"]."""
    good, bad = split_bad(items)
    images = torch.stack([item["image"] for item in good]).float().div_(255) if good else torch.empty(0)
    return {"image": images,
            "targets": [{"boxes": item["boxes"], "labels": item["labels"], "iscrowd": item["iscrowd"]}
                        for item in good],
            "index": torch.as_tensor([item["index"] for item in good], dtype=torch.long), **bad}

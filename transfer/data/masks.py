"""Segmentation data: image / mask folder pairs, checked, split and augmented together.

Layout: ROOT/classes.txt (line i names mask value i, line 0 is the background) and ROOT/images/NAME.* with
ROOT/masks/NAME.png, or ROOT/{train,val,test}/{images,masks}/. Masks are single-channel PNGs of class
indices; the ignore index (255) marks pixels no loss or metric counts. A pair that cannot be used (an
unreadable file, no mask, a mask of another size or with values classes.txt does not name) is skipped,
listed with its reason in RUN/skipped_images.csv and counted in the run's warning; it never stops an epoch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from transfer.data.augment import IGNORE_INDEX
from transfer.data.cache import estimate_bytes, fits_in_memory, say
from transfer.data.cache_folder import size
from transfer.data.dataset import bad_sample, seed_augmentation
from transfer.data.images import IMAGE_EXTENSIONS, BadImageError, read_rgb
from transfer.data.sources import SPLIT_ALIASES, DataSplits, Record, complete_splits, drop_shared_files
from transfer.errors import UserError

CLASSES_FILE = "classes.txt"


def read_classes(root: Path) -> list[str]:
    path = root / CLASSES_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: write one class name per line, line i naming mask value i "
                        "(line 0 the background).")
    names = path.read_text(encoding="utf-8-sig").rstrip("\n").split("\n")
    names = [name.strip() for name in names]
    empty = [number for number, name in enumerate(names, start=1) if not name]
    if empty or len(names) < 2:
        raise UserError(f"{path}: {'line ' + str(empty[0]) + ' is empty' if empty else 'fewer than two classes'}. "
                        "Give every mask value a name, the background on line 1.")
    if len(names) > IGNORE_INDEX:
        raise UserError(f"{path} names {len(names)} classes; masks are uint8 with {IGNORE_INDEX} as ignore: at most "
                        f"{IGNORE_INDEX} classes.")
    return names


def mask_path(image: str | Path) -> Path:
    """ROOT/.../images/a/b.jpg → ROOT/.../masks/a/b.png (the nearest images/ folder above the file)."""
    image = Path(image)
    parts = image.parts
    at = len(parts) - 1 - parts[::-1].index("images")
    return Path(*parts[:at], "masks", *parts[at + 1:]).with_suffix(".png")


def _pairs(folder: Path) -> tuple[list[Record], list[tuple[str, str]]]:
    """Records of folder/images/** that have a mask; the others as skipped."""
    images = folder / "images"
    if not images.is_dir() or not (folder / "masks").is_dir():
        raise UserError(f"{folder} needs images/ and masks/ folders (masks/NAME.png for images/NAME.*).")
    records, skipped = [], []
    for path in sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                       and not p.name.startswith(".")):
        if mask_path(path).is_file():
            records.append(Record(str(path), 0))
        else:
            skipped.append((str(path), f"no mask ({mask_path(path).relative_to(folder)})"))
    return records, skipped


def index_pairs(root: str | None, val_fraction: float, test_fraction: float,
                split_seed: int) -> tuple[list[str], DataSplits]:
    """(class names, image records per split; a record's mask is mask_path(record.source))."""
    if root is None:
        raise UserError("task=segmentation needs data.root=DIR with classes.txt and images/ + masks/ (or train/ "
                        "val/ test/ folders holding those).")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UserError(f"data.root={root} is not a folder. Segmentation reads classes.txt and images/ + masks/ "
                        "(or train/ val/ test/ folders holding those).")
    classes = read_classes(path)
    split_dirs = {SPLIT_ALIASES[d.name.lower()]: d for d in sorted(path.iterdir())
                  if d.is_dir() and d.name.lower() in SPLIT_ALIASES}
    if split_dirs and "train" not in split_dirs:
        raise UserError(f"{path} has {', '.join(sorted(split_dirs))} folders but no train/ folder.")
    folders = split_dirs or {"all": path}
    splits, skipped = {}, []
    for split, folder in folders.items():
        splits[split], bad = _pairs(folder)
        skipped += bad
    if not (splits.get("all") or splits.get("train")):
        raise UserError(f"{path}: no training image has a mask. Masks are masks/NAME.png beside images/NAME.*.")
    # the classification splitter, with every image in one pseudo-class (masks carry the classes)
    pooled = DataSplits(["image"], splits, skipped, description=f"segmentation folders {path}")
    return classes, drop_shared_files(complete_splits(pooled, val_fraction, test_fraction, split_seed))


def read_mask(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P", "I", "I;16", "1"):
                raise BadImageError(str(path), f"mask mode {image.mode}: save class indices as a single-channel "
                                               "(grayscale or palette) PNG")
            return np.array(image)
    except BadImageError:
        raise
    except (OSError, ValueError, SyntaxError) as error:
        raise BadImageError(str(path), f"unreadable mask ({str(error).splitlines()[0][:120]})") from None


def load_pair(image_path: str, num_classes: int, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    """(H×W×3 uint8 image, H×W uint8 mask), or BadImageError naming the file at fault and why."""
    image = read_rgb(image_path)
    path = mask_path(image_path)
    mask = read_mask(path)
    if mask.shape != image.shape[:2]:
        raise BadImageError(str(path), f"mask size {mask.shape[1]}x{mask.shape[0]} differs from the image's "
                                       f"{image.shape[1]}x{image.shape[0]}")
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != ignore_index)]
    if len(bad):
        shown = ", ".join(str(int(v)) for v in bad[:5])
        raise BadImageError(str(path), f"mask value out of range ({shown}; classes.txt names 0..{num_classes - 1}, "
                                       f"ignore {ignore_index})")
    return image, mask.astype(np.uint8)


class PairDataset(Dataset):
    """Image and mask of one record, transformed together. Like transfer.data.dataset.ImageDataset: a bad
    pair yields (None, path, reason, strict) for the collate function to drop and report, and training
    augmentation is seeded by (seed, epoch, index)."""

    def __init__(self, records: list[Record], transform, num_classes: int, ignore_index: int,
                 cache: dict | None = None, seed: int | None = None, strict: bool = False) -> None:
        self.records, self.transform, self.seed, self.strict = records, transform, seed, strict
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.cache = cache if cache is not None else {}

    def __len__(self) -> int:
        return len(self.records)

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        source = self.records[index].source
        return self.cache.get(source) or load_pair(source, self.num_classes, self.ignore_index)

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        try:
            image, mask = self.pair(index)
        except BadImageError as error:
            return bad_sample(error, self.strict)
        if self.seed is not None:
            seed_augmentation(self.transform, self.seed, epoch, index)
        out = self.transform(image=image, mask=mask)
        return {"image": out["image"], "mask": out["mask"].long(), "index": index}


def load_all(records: list[Record], num_classes: int, ignore_index: int, strict: bool,
             budget_bytes: int | None = None) -> tuple[dict | None, list[tuple[str, str]]]:
    """Every pair decoded and checked once (data.cache=ram): bad pairs are known before the first step. The
    pairs are kept at full size (the crop is random), so they must fit the memory budget that classification's
    RAM cache has (half of what the process may use); when they would not, (None, []) after one line, and the
    pairs are read each epoch as with data.cache=none."""
    needed = estimate_bytes(records, None, channels=4)  # RGB + a one-byte mask per pixel
    budget = fits_in_memory(needed, "reading image/mask pairs from disk each epoch instead (data.cache=none).",
                            budget_bytes)
    if budget is None:
        return None, []
    cache, skipped = {}, []
    for record in records:
        try:
            cache[record.source] = load_pair(record.source, num_classes, ignore_index)
        except BadImageError as error:
            if strict:
                raise
            skipped.append((str(error.path), error.reason))
    held = sum(image.nbytes + mask.nbytes for image, mask in cache.values())
    say(f"data.cache=ram: {len(cache)} image/mask pairs, {size(held)} in memory (budget {size(budget)})")
    return cache, skipped

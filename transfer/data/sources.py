"""Where the images and labels come from: split folders, one pooled folder, a CSV manifest, or the
embedded digits. Everything ends as a `DataSplits`: one class list and records per split.

Splitting happens here and only here, stratified by scikit-learn with a fixed seed, so the same
config always sees the same train/val/test partition.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from transfer.data.digits import digits_images
from transfer.data.images import IMAGE_EXTENSIONS
from transfer.errors import UserError

SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}


@dataclass(frozen=True)
class Record:
    """One labelled image: a file path, or a decoded H×W×3 uint8 array for in-memory datasets."""

    source: str | np.ndarray
    label: int

    @property
    def name(self) -> str:
        return self.source if isinstance(self.source, str) else "<memory>"


@dataclass
class DataSplits:
    classes: list[str]
    splits: dict[str, list[Record]]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) found while indexing
    description: str = ""

    def counts(self) -> dict[str, int]:
        return {name: len(records) for name, records in self.splits.items()}


def build_splits(root: str | None, val_fraction: float, test_fraction: float, split_seed: int,
                 allow_outside_root: bool = False) -> DataSplits:
    """Index the data the user pointed at and return the train/val/test records.

    A manifest may only name files below its own folder unless `allow_outside_root` (a manifest from
    elsewhere must not make transfer read arbitrary files). A file that ends up in two splits stays
    in the first of train, val, test and is listed as skipped in the others.
    """
    if root is None:
        classes, images = digits_images()
        records = [Record(image, label) for image, label in images]
        pooled = DataSplits(classes, {"all": records}, description="scikit-learn digits (embedded)")
    else:
        path = Path(root).expanduser()
        if not path.exists():
            raise UserError(f"data.root={root} does not exist. Point data.root at a folder of class "
                            "folders, a folder with train/ val/ test/ inside, or a CSV manifest.")
        pooled = read_manifest(path, allow_outside_root) if path.is_file() else read_folder(path)
    return drop_shared_files(complete_splits(pooled, val_fraction, test_fraction, split_seed))


def read_folder(root: Path) -> DataSplits:
    split_dirs = {SPLIT_ALIASES[d.name.lower()]: d for d in _subdirs(root) if d.name.lower() in SPLIT_ALIASES}
    if not split_dirs:
        classes, records = _class_folders(root, classes=None)
        return DataSplits(classes, {"all": records}, description=f"folder {root}")
    if "train" not in split_dirs:
        raise UserError(f"{root} has {', '.join(sorted(split_dirs))} folders but no train/ folder.")
    classes, train = _class_folders(split_dirs["train"], classes=None)
    splits = {"train": train}
    for split, folder in split_dirs.items():
        if split != "train":
            splits[split] = _class_folders(folder, classes=classes)[1]
    return DataSplits(classes, splits, description=f"split folders {root}")


def _subdirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _class_folders(folder: Path, classes: list[str] | None) -> tuple[list[str], list[Record]]:
    """Records from folder/<class>/*; with `classes` given, every class must be among them."""
    found = [d.name for d in _subdirs(folder)]
    if not found:
        raise UserError(f"{folder} has no class folders. Expected {folder}/<class name>/<images>.")
    defining = classes is None
    classes = found if defining else classes
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(f"{folder} has class folders that train/ lacks: {', '.join(unknown)}. "
                        "Add them to train/ or remove them.")
    records = []
    for name in found:
        images = _image_files(folder / name)
        if not images and defining:
            raise UserError(f"class folder {folder / name} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}). "
                            "Add images or remove the folder.")
        records += [Record(str(p), classes.index(name)) for p in images]
    return classes, records


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def read_manifest(csv_path: Path, allow_outside_root: bool = False) -> DataSplits:
    """A CSV with a header `path,label[,split]`; paths are relative to the CSV's folder, and must stay
    below it unless `allow_outside_root`."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:  # -sig: Excel writes a BOM
            rows = list(csv.DictReader(handle))
    except (UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"{csv_path} is not a readable UTF-8 CSV ({error}). Save it as CSV UTF-8 with a header "
                        "path,label[,split].") from None
    columns = {column for column in rows[0] if column is not None} if rows else set()
    if not {"path", "label"} <= columns:
        raise UserError(f"{csv_path} needs a header with columns path,label[,split]; found {sorted(columns) or 'none'}.")
    classes = sorted({row["label"] for row in rows if row["label"]})
    splits: dict[str, list[Record]] = {}
    skipped = []
    outside = []
    for number, row in enumerate(rows, start=2):
        if not row["path"]:
            skipped.append((f"{csv_path}:{number}", "empty path"))
            continue
        image = (csv_path.parent / row["path"]).resolve()
        if not row["label"]:
            skipped.append((f"{csv_path}:{number}", "empty label"))
            continue
        if not allow_outside_root and not is_inside(image, csv_path.parent):
            outside.append((number, row["path"]))
            continue
        split = SPLIT_ALIASES.get((row.get("split") or "all").strip().lower(), None) or "all"
        if not image.is_file():
            skipped.append((str(image), f"listed in {csv_path.name} line {number} but missing"))
            continue
        splits.setdefault(split, []).append(Record(str(image), classes.index(row["label"])))
    check_manifest(csv_path, splits, outside)
    return DataSplits(classes, splits, skipped, description=f"manifest {csv_path}")


def check_manifest(csv_path: Path, splits: dict[str, list[Record]], outside: list[tuple[int, str]]) -> None:
    """Refuse, for every manifest reader, paths that leave the manifest's folder and a mix of rows with and
    without a split (which split would the others join?)."""
    if outside:
        number, path = outside[0]
        raise UserError(f"{csv_path}: {len(outside)} path(s) lead outside the manifest's folder "
                        f"{csv_path.parent.resolve()}, e.g. line {number}: {path}. If you trust this manifest, "
                        "allow it with data.allow_outside_root=true.")
    if "all" in splits and len(splits) > 1:
        raise UserError(f"{csv_path}: some rows have a split and some do not; give every row a split or none.")


def is_inside(path: Path, root: Path) -> bool:
    """Whether `path` is `root` or below it once both are resolved (`..` and symlinks followed), for
    every reader of file lists (manifests, COCO annotations) that names files relative to a root."""
    return Path(path).resolve().is_relative_to(Path(root).resolve())


Carve = Callable[[list[Record], float, int], tuple[list[Record], list[Record]]]


def complete_splits(data: DataSplits, val_fraction: float, test_fraction: float, seed: int,
                    carve: Carve | None = None, check: Callable[[list[str], list[Record]], None] | None = None
                    ) -> DataSplits:
    """Carve the missing test and val splits out of what is there: stratified by class unless `carve` says
    otherwise (a multi-label row has no one class to stratify by); `check` refuses a training split that
    leaves a class out."""
    carve, check = carve or _stratified, check or _check_every_class_trains
    splits = dict(data.splits)
    pool = splits.pop("all", None) or splits.pop("train", [])
    if "test" not in splits and test_fraction > 0:
        pool, splits["test"] = carve(pool, test_fraction, seed)
    if "val" not in splits and val_fraction > 0:
        share = val_fraction / (1 - test_fraction) if "test" not in data.splits else val_fraction
        pool, splits["val"] = carve(pool, share, seed)
    splits["train"] = pool
    check(data.classes, pool)
    ordered = {name: splits[name] for name in ("train", "val", "test") if name in splits}
    return DataSplits(data.classes, ordered, data.skipped, data.description)


def drop_shared_files(data: DataSplits) -> DataSplits:
    """Keep a file that sits in two splits (listed twice, or linked from two folders) only in the first of
    train, val, test: in both it would leak training data into evaluation. The others are listed as skipped."""
    owners: dict[tuple[int, int], tuple[str, str]] = {}
    splits, skipped = {}, list(data.skipped)
    for split, records in data.splits.items():
        kept = []
        for record in records:
            key = _file_identity(record.source)
            owner = owners.setdefault(key, (split, record.name)) if key is not None else (split, "")
            if owner[0] != split:
                skipped.append((record.name, f"same file as {owner[1]} in {owner[0]}; left out of {split}"))
                continue
            kept.append(record)
        splits[split] = kept
    return DataSplits(data.classes, splits, skipped, data.description)


def _file_identity(source: str | np.ndarray) -> tuple[int, int] | None:
    """(device, inode): one key for a path, its symlinks and hard links; None for arrays and unreadable paths."""
    if not isinstance(source, str):
        return None
    try:
        info = os.stat(source)
    except (OSError, ValueError):
        return None  # reported with its reason when it is read
    return info.st_dev, info.st_ino


def _stratified(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    labels = [r.label for r in records]
    try:
        kept, held = train_test_split(records, test_size=fraction, random_state=seed, stratify=labels)
    except ValueError:
        warnings.warn("too few images per class for a stratified split; splitting at random instead")
        kept, held = train_test_split(records, test_size=fraction, random_state=seed)
    return list(kept), list(held)


def _check_every_class_trains(classes: list[str], train: list[Record]) -> None:
    present = {r.label for r in train}
    empty = [name for index, name in enumerate(classes) if index not in present]
    if empty:
        raise UserError(f"no training images for class(es): {', '.join(empty)}. Add images or remove the class.")

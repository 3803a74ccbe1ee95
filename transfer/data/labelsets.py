"""Multi-label data: a CSV manifest whose rows give an image and the set of classes it shows.

Two forms, read into the same targets (one 0/1 float per class):

    path,labels[,split]             labels joined by `label_separator`: `img/1.png,cat dog,train`; empty = none
    path,<class>,<class>...[,split] one 0/1 column per class:            `img/1.png,1,1,0,train`

As classification's manifests (data/sources.py): paths are relative to the CSV's folder and must stay below it
unless `allow_outside_root`; a split column (train/val/test) is optional and missing splits are carved out with
a seed. The split is random, not stratified: a row holds several classes, so there is no one label to stratify
by. Every class must show up in at least one training image. An image with no label is a negative for every
class, which multi-label data legitimately has; `allow_empty=False` refuses such rows instead.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from transfer.data.sources import (SPLIT_ALIASES, DataSplits, Record, check_manifest, complete_splits,
                                   drop_shared_files, is_inside)
from transfer.errors import UserError

LABELS_COLUMN = "labels"
RESERVED_COLUMNS = ("path", "split")
HEADER_HELP = "path,labels[,split] (labels joined by task.label_separator) or path,<class>,<class>...[,split] (0/1)"


def build_label_splits(root: str | None, val_fraction: float, test_fraction: float, split_seed: int,
                       allow_outside_root: bool = False, label_separator: str = " ", classes: list[str] | None = None,
                       allow_empty: bool = True) -> DataSplits:
    """The manifest at `root` read and split into train/val/test, each record's label a 0/1 float32 vector."""
    data = read_label_manifest(manifest_path(root), label_separator, classes, allow_empty, allow_outside_root)
    completed = complete_splits(data, val_fraction, test_fraction, split_seed, random_split, check_every_class_trains)
    return drop_shared_files(completed)


def manifest_path(root: str | None) -> Path:
    """data.root as a CSV file: multi-label data has no folder layout to read labels from."""
    if root is None:
        raise UserError(f"task=multilabel needs data.root=PATH to a CSV manifest with a header {HEADER_HELP}.")
    path = Path(root).expanduser()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UserError(f"data.root={root} {what}: task=multilabel reads a CSV manifest with a header {HEADER_HELP}.")
    return path


def read_rows(csv_path: Path) -> tuple[list[str], list[dict]]:
    """(the header's columns, the rows) of a UTF-8 CSV (a BOM from Excel is fine)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = [column.strip() for column in reader.fieldnames or []]
    except (UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"{csv_path} is not a readable UTF-8 CSV ({error}). Save it as CSV UTF-8 with a header "
                        f"{HEADER_HELP}.") from None
    if "path" not in columns:
        raise UserError(f"{csv_path} needs a header {HEADER_HELP}; found {columns or 'none'}.")
    return columns, [{(key or "").strip(): value for key, value in row.items()} for row in rows]


def read_label_manifest(csv_path: Path, label_separator: str = " ", classes: list[str] | None = None,
                        allow_empty: bool = True, allow_outside_root: bool = False) -> DataSplits:
    """Records per split (or "all"); the class list is `classes`, else the labels seen (sorted), else the class
    columns in the file's order."""
    columns, rows = read_rows(csv_path)
    if LABELS_COLUMN in columns:
        if not label_separator:
            raise UserError("task.label_separator is empty: say what joins the labels of a row, e.g. ' ' or ';'.")
        label_sets = [split_labels(row.get(LABELS_COLUMN), label_separator) for row in rows]
        classes = checked_classes(classes, label_sets, csv_path)
    else:
        classes, label_sets = read_class_columns(csv_path, columns, rows, classes)
    splits: dict[str, list[Record]] = {}
    skipped, outside = [], []
    for number, (row, labels) in enumerate(zip(rows, label_sets), start=2):
        if not labels and not allow_empty:
            raise UserError(f"{csv_path} line {number} ({row.get('path')}) has no labels. Give it at least one, or "
                            "allow images that show no class with task.allow_empty=true.")
        if not row.get("path"):
            skipped.append((f"{csv_path}:{number}", "empty path"))
            continue
        image = (csv_path.parent / row["path"]).resolve()
        if not allow_outside_root and not is_inside(image, csv_path.parent):
            outside.append((number, row["path"]))
            continue
        if not image.is_file():
            skipped.append((str(image), f"listed in {csv_path.name} line {number} but missing"))
            continue
        split = SPLIT_ALIASES.get((row.get("split") or "all").strip().lower()) or "all"
        splits.setdefault(split, []).append(Record(str(image), multi_hot(labels, classes)))
    check_manifest(csv_path, splits, outside)
    return DataSplits(classes, splits, skipped, description=f"multi-label manifest {csv_path}")


def split_labels(text: str | None, separator: str) -> list[str]:
    return [label.strip() for label in (text or "").split(separator) if label.strip()]


def checked_classes(classes: list[str] | None, label_sets: list[list[str]], csv_path: Path) -> list[str]:
    """`classes` when given (every label must be one of them), else the labels seen, sorted."""
    seen = sorted({label for labels in label_sets for label in labels})
    if classes is None:
        if not seen:
            raise UserError(f"{csv_path}: no row has a label. Fill the labels column.")
        return seen
    unknown = [label for label in seen if label not in classes]
    if unknown:
        raise UserError(f"{csv_path}: label(s) {', '.join(unknown)} not in task.classes ({', '.join(classes)}). "
                        "Fix the labels (or task.label_separator), or add them to task.classes.")
    return list(classes)


def read_class_columns(csv_path: Path, columns: list[str], rows: list[dict],
                       classes: list[str] | None) -> tuple[list[str], list[list[str]]]:
    """(classes, each row's labels) from one 0/1 column per class."""
    found = [column for column in columns if column and column not in RESERVED_COLUMNS]
    if not found:
        raise UserError(f"{csv_path} has no labels column and no class columns; its header needs {HEADER_HELP}.")
    if classes is not None:
        unknown = [column for column in found if column not in classes]
        missing = [name for name in classes if name not in found]
        if unknown or missing:
            raise UserError(f"{csv_path}: class column(s) {', '.join(unknown) or 'none'} not in task.classes, and "
                            f"task.classes {', '.join(missing) or 'none'} without a column. Columns other than "
                            f"{' and '.join(RESERVED_COLUMNS)} must be the classes ({', '.join(classes)}).")
    label_sets = []
    for number, row in enumerate(rows, start=2):
        for column in found:
            if (row.get(column) or "").strip() not in ("0", "1"):
                raise UserError(f"{csv_path} line {number}, column '{column}': {row.get(column)!r} is not 0 or 1. "
                                f"Every column other than {' and '.join(RESERVED_COLUMNS)} is a class holding 0/1 "
                                f"(or use one '{LABELS_COLUMN}' column).")
        label_sets.append([column for column in found if row[column].strip() == "1"])
    return (list(classes) if classes is not None else found), label_sets


def multi_hot(labels: list[str], classes: list[str]) -> np.ndarray:
    target = np.zeros(len(classes), np.float32)
    target[[classes.index(label) for label in labels]] = 1.0
    return target


def random_split(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    if len(records) < 2:
        raise UserError(f"{len(records)} image(s) cannot be split into train and a held-out part; add images or set "
                        "data.val_fraction=0 data.test_fraction=0.")
    kept, held = train_test_split(records, test_size=fraction, random_state=seed)
    return list(kept), list(held)


def check_every_class_trains(classes: list[str], train: list[Record]) -> None:
    if not train:
        raise UserError("the training split is empty.")
    positives = np.sum([record.label for record in train], axis=0)
    empty = [name for name, count in zip(classes, positives) if count == 0]
    if empty:
        raise UserError(f"no training image shows class(es): {', '.join(empty)}. Add images of them or remove them.")


def relabel_sets(data: DataSplits, classes: list[str]) -> DataSplits:
    """Targets in the checkpoint's class order (by name); data naming a class the checkpoint lacks is refused."""
    unknown = [name for name in data.classes if name not in classes]
    if unknown:
        raise UserError(f"{data.description} has classes the checkpoint does not know: {', '.join(unknown)}. It "
                        f"knows: {', '.join(classes)}.")
    order = [data.classes.index(name) if name in data.classes else None for name in classes]

    def mapped(label: np.ndarray) -> np.ndarray:
        return np.array([label[i] if i is not None else 0.0 for i in order], np.float32)

    splits = {name: [Record(r.source, mapped(r.label)) for r in records] for name, records in data.splits.items()}
    return DataSplits(list(classes), splits, data.skipped, data.description)

"""The recipes' choices are made on validation images carved from the training images (issue 12, point 7): the
manifest bench.choices trains on lists the training images alone, and the split it asks for holds no test
image, so no choice can be scored on the test split."""

from __future__ import annotations

from pathlib import Path

from conftest import write_class_folder
from transfer.data.sources import build_splits

from bench.choices import VALIDATION, development_manifest


def test_choices_train_and_score_without_indexing_the_test_split(tmp_path: Path):
    root = tmp_path / "fashion"
    write_class_folder(root / "train", per_class=10)
    write_class_folder(root / "test", per_class=4)
    manifest = development_manifest(root)
    listed = manifest.read_text().splitlines()[1:]
    assert len(listed) == 30 and all(line.startswith("train/") for line in listed)
    options = dict(item.split("=", 1) for item in VALIDATION)
    splits = build_splits(str(manifest), float(options["data.val_fraction"]), float(options["data.test_fraction"]),
                          int(options["data.split_seed"]))
    assert splits.counts() == {"train": 24, "val": 6}
    seen = {str(record.source) for records in splits.splits.values() for record in records}
    assert len(seen) == 30 and not any("/test/" in path for path in seen)

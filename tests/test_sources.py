"""transfer.data: where records come from (build_splits), how files become RGB uint8 samples, what
happens to bad files, and the RAM cache. Every image is generated here in tmp_path (or is
scikit-learn's digits), so counts, labels and pixels are known exactly.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from transfer.data.cache import fill_cache
from transfer.data.resize import CacheSizes
from transfer.data.dataset import ImageDataset
from transfer.data.images import BadImageError, read_rgb
from transfer.data.loaders import build_datasets, build_loader
from transfer.data.sources import Record, build_splits
from transfer.errors import UserError


def keep(side: int) -> CacheSizes:
    """Every file cached as training keeps it: the shorter side at `side`, never enlarged."""
    return CacheSizes({"input_size": (3, side, side), "interpolation": "bicubic", "crop_pct": 1.0}, side, set())

PREPROCESS = {"input_size": [3, 16, 16], "interpolation": "bilinear", "crop_pct": 0.875}


def png(path: Path, value: int = 0, size: tuple[int, int] = (6, 4)) -> Path:
    """A small RGB PNG (size is width, height), with parents created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


def class_tree(root: Path, counts: dict[str, int]) -> None:
    for name, count in counts.items():
        for i in range(count):
            png(root / name / f"{i:03d}.png", value=i)


def label_of(record: Record, classes: list[str]) -> str:
    return classes[record.label]


def per_class(records: list[Record], classes: list[str]) -> Counter:
    return Counter(label_of(r, classes) for r in records)


def paths(records: list[Record]) -> set[str]:
    return {r.source for r in records}


# (a) split folders -------------------------------------------------------------------------------

def test_split_folders_are_used_as_given(tmp_path):
    class_tree(tmp_path / "train", {"dog": 5, "cat": 4})
    class_tree(tmp_path / "val", {"cat": 2, "dog": 1})
    class_tree(tmp_path / "test", {"dog": 3, "cat": 3})

    data = build_splits(str(tmp_path), val_fraction=0.5, test_fraction=0.5, split_seed=0)

    assert data.classes == ["cat", "dog"]
    assert data.counts() == {"train": 9, "val": 3, "test": 6}
    assert per_class(data.splits["val"], data.classes) == {"cat": 2, "dog": 1}
    for name, records in data.splits.items():
        for record in records:  # the label is the folder the file sits in
            assert Path(record.source).parent == tmp_path / name / label_of(record, data.classes)


def test_split_folder_aliases(tmp_path):
    class_tree(tmp_path / "Training", {"a": 3, "b": 3})
    class_tree(tmp_path / "valid", {"a": 1, "b": 2})
    class_tree(tmp_path / "testing", {"a": 2, "b": 1})

    data = build_splits(str(tmp_path), 0.1, 0.2, 0)

    assert data.counts() == {"train": 6, "val": 3, "test": 3}
    assert all("valid" in r.source for r in data.splits["val"])


def test_missing_val_folder_is_carved_from_train_stratified(tmp_path):
    class_tree(tmp_path / "train", {"a": 8, "b": 12})
    class_tree(tmp_path / "test", {"a": 2, "b": 2})
    train_files = {str(p) for p in (tmp_path / "train").rglob("*.png")}

    data = build_splits(str(tmp_path), val_fraction=0.25, test_fraction=0.5, split_seed=0)

    assert data.counts()["test"] == 4  # the given test folder, untouched by test_fraction
    assert per_class(data.splits["val"], data.classes) == {"a": 2, "b": 3}
    assert paths(data.splits["train"]) | paths(data.splits["val"]) == train_files
    assert not paths(data.splits["train"]) & paths(data.splits["val"])


def test_class_folder_only_in_val_is_refused(tmp_path):
    class_tree(tmp_path / "train", {"a": 2})
    class_tree(tmp_path / "val", {"a": 1, "zebra": 1})
    with pytest.raises(UserError, match="zebra"):
        build_splits(str(tmp_path), 0.1, 0.2, 0)


# (b) one folder of class folders -----------------------------------------------------------------

COUNTS = {"a": 20, "b": 30, "c": 13}


@pytest.fixture
def pooled(tmp_path) -> Path:
    class_tree(tmp_path / "pool", COUNTS)
    return tmp_path / "pool"


def partition(data) -> dict[str, frozenset[str]]:
    return {name: frozenset(paths(records)) for name, records in data.splits.items()}


def test_pooled_folder_is_split_stratified_and_disjoint(pooled):
    data = build_splits(str(pooled), val_fraction=0.1, test_fraction=0.2, split_seed=0)

    assert list(data.splits) == ["train", "val", "test"]
    every_file = {str(p) for p in pooled.rglob("*.png")}
    parts = partition(data)
    assert parts["train"] | parts["val"] | parts["test"] == every_file
    assert sum(map(len, parts.values())) == len(every_file)  # no file in two splits
    for split, fraction in (("val", 0.1), ("test", 0.2)):
        counts = per_class(data.splits[split], data.classes)
        for name, total in COUNTS.items():
            assert abs(counts[name] - fraction * total) <= 1, (split, name, counts)
    for records in data.splits.values():
        assert set(per_class(records, data.classes)) == set(COUNTS)


def test_split_depends_on_seed_only(pooled):
    first = partition(build_splits(str(pooled), 0.1, 0.2, split_seed=0))
    again = partition(build_splits(str(pooled), 0.1, 0.2, split_seed=0))
    other = partition(build_splits(str(pooled), 0.1, 0.2, split_seed=1))
    assert first == again
    assert first["test"] != other["test"] and first["val"] != other["val"]


def test_class_order_is_sorted_folder_names_whatever_the_creation_order(tmp_path):
    names = ["zebra", "Apple", "10", "9", "apple", "b_c"]
    for order, root in ((names, tmp_path / "one"), (names[::-1], tmp_path / "two")):
        class_tree(root, dict.fromkeys(order, 2))
    one = build_splits(str(tmp_path / "one"), 0.0, 0.0, 0)
    two = build_splits(str(tmp_path / "two"), 0.0, 0.0, 0)
    assert one.classes == two.classes == sorted(names)
    for record in one.splits["train"]:
        assert Path(record.source).parent.name == label_of(record, one.classes)


# (c) CSV manifest --------------------------------------------------------------------------------

def write_csv(path: Path, rows: list[list[str]], encoding: str = "utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as handle:
        csv.writer(handle).writerows(rows)
    return path


@pytest.fixture
def manifest_dir(tmp_path) -> Path:
    folder = tmp_path / "data"
    for i in range(4):
        png(folder / "img" / f"cat{i}.png", value=10 * i)
        png(folder / "img" / f"dog{i}.png", value=10 * i + 5)
    return folder


def test_manifest_paths_are_relative_to_the_csv_not_the_cwd(manifest_dir, tmp_path, monkeypatch):
    rows = [["path", "label", "split"]]
    rows += [[f"img/{kind}{i}.png", kind, "train" if i < 2 else ("val" if i == 2 else "test")]
             for kind in ("dog", "cat") for i in range(4)]
    rows += [["img/ghost.png", "cat", "train"]]
    write_csv(manifest_dir / "list.csv", rows)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    data = build_splits("../data/list.csv", 0.1, 0.2, 0)

    assert data.classes == ["cat", "dog"]
    assert data.counts() == {"train": 4, "val": 2, "test": 2}
    for record in data.splits["train"]:
        assert Path(record.source).is_file()
        assert Path(record.source).name.startswith(label_of(record, data.classes))
    assert len(data.skipped) == 1
    skipped_path, reason = data.skipped[0]
    assert skipped_path.endswith("ghost.png") and "missing" in reason


def test_manifest_without_split_column_is_split_here(manifest_dir):
    rows = [["path", "label"]] + [[f"img/{k}{i}.png", k] for k in ("cat", "dog") for i in range(4)]
    data = build_splits(str(write_csv(manifest_dir / "list.csv", rows)), 0.25, 0.25, 0)
    assert data.counts() == {"train": 4, "val": 2, "test": 2}
    assert per_class(data.splits["test"], data.classes) == {"cat": 1, "dog": 1}


def test_manifest_saved_by_excel_with_a_byte_order_mark(manifest_dir):
    rows = [["path", "label"]] + [[f"img/{k}{i}.png", k] for k in ("cat", "dog") for i in range(4)]
    csv_path = write_csv(manifest_dir / "list.csv", rows, encoding="utf-8-sig")
    assert sum(build_splits(str(csv_path), 0.0, 0.0, 0).counts().values()) == 8


@pytest.mark.parametrize("header", [["file", "label"], ["path", "class"], []])
def test_manifest_with_wrong_columns_is_a_user_error(manifest_dir, header):
    csv_path = write_csv(manifest_dir / "list.csv", [header, ["img/cat0.png", "cat"]] if header else [])
    with pytest.raises(UserError, match="path,label"):
        build_splits(str(csv_path), 0.1, 0.2, 0)


# (d) embedded digits -----------------------------------------------------------------------------

def test_no_root_gives_the_embedded_digits():
    data = build_splits(None, 0.1, 0.2, 0)
    assert data.classes == [str(d) for d in range(10)]
    records = [r for split in data.splits.values() for r in split]
    assert len(records) == 1797
    assert {r.label for r in data.splits["test"]} == set(range(10))
    for record in records[:50]:
        assert record.source.dtype == np.uint8 and record.source.shape == (8, 8, 3)
    assert max(int(r.source.max()) for r in records[:50]) == 255  # 0..16 stretched to 0..255


# Any colour mode becomes RGB uint8 ---------------------------------------------------------------

def odd_modes(folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    palette = Image.new("P", (5, 4))
    palette.putpalette([0, 0, 0, 200, 30, 60] + [0] * 762)
    palette.paste(1, (0, 0, 3, 4))
    sixteen = Image.fromarray(np.full((4, 5), 40_000, dtype=np.uint16))
    made = {
        "l.png": Image.new("L", (5, 4), 77),
        "la.png": Image.new("LA", (5, 4), (77, 0)),
        "p.png": palette,
        "rgba.png": Image.new("RGBA", (5, 4), (10, 20, 30, 128)),
        "i16.png": sixteen,
        "cmyk.tif": Image.new("CMYK", (5, 4), (0, 255, 255, 0)),
    }
    for name, image in made.items():
        image.save(folder / name)
    return sorted(folder / name for name in made)


@pytest.mark.parametrize("use_cache", [False, True])
def test_every_colour_mode_becomes_rgb_uint8_like_read_rgb(tmp_path, use_cache):
    odd_modes(tmp_path / "root" / "only")
    data = build_splits(str(tmp_path / "root"), 0.0, 0.0, 0)
    records = data.splits["train"]
    assert len(records) == 6
    cache = fill_cache(records, keep(100))[0] if use_cache else None
    dataset = ImageDataset(records, transform=None, cache=cache)
    for index, record in enumerate(records):
        image = dataset[index]["image"]
        assert image.dtype == np.uint8 and image.shape == (4, 5, 3), record.source
        np.testing.assert_array_equal(image, read_rgb(record.source))


# Bad files ---------------------------------------------------------------------------------------

@pytest.fixture
def with_bad_files(tmp_path) -> tuple[list[Record], dict[str, str]]:
    """Three good PNGs and three bad files in one class folder; returns (records, bad name → reason word)."""
    folder = tmp_path / "bad" / "x"
    for i in range(3):
        png(folder / f"good{i}.png", value=50 * i, size=(32, 24))
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not a picture at all\n")
    whole = (folder / "good0.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    records = build_splits(str(tmp_path / "bad"), 0.0, 0.0, 0).splits["train"]
    return records, {"empty.png": "empty", "text.jpg": "not an image", "truncated.png": "truncated"}


def test_fill_cache_reports_and_leaves_out_bad_files(with_bad_files):
    records, bad = with_bad_files
    cache, skipped = fill_cache(records, keep(64))
    reasons = {Path(path).name: reason for path, reason in skipped}
    assert set(reasons) == set(bad)
    for name, word in bad.items():
        assert word in reasons[name]
    assert sorted(Path(p).name for p in cache) == ["good0.png", "good1.png", "good2.png"]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_file_in_a_batch_is_skipped_and_listed(with_bad_files, workers):
    records, bad = with_bad_files
    dataset = ImageDataset(records, transform=None)
    batches = list(build_loader(dataset, batch_size=len(records), train=False, num_workers=workers, seed=0))
    assert len(batches) == 1
    batch = batches[0]
    assert batch["image"].shape == (3, 24, 32, 3)
    good_names = {Path(records[i].source).name for i in batch["index"].tolist()}
    assert good_names == {"good0.png", "good1.png", "good2.png"}
    assert {Path(path).name for path, _ in batch["skipped"]} == set(bad)
    assert all(reason for _, reason in batch["skipped"])


def test_build_datasets_drops_bad_files_found_by_the_cache(with_bad_files):
    records, bad = with_bad_files
    splits = build_splits(str(Path(records[0].source).parents[1]), 0.0, 0.0, 0)
    cfg = SimpleNamespace(cache="ram", on_bad_image="skip")
    data = build_datasets(splits, cfg, PREPROCESS, [], seed=0)
    assert len(data.datasets["train"]) == 3
    assert {Path(path).name for path, _ in data.skipped} == set(bad)


@pytest.mark.parametrize("cache", ["ram", "none"])
def test_on_bad_image_error_raises(with_bad_files, cache):
    records, _ = with_bad_files
    splits = build_splits(str(Path(records[0].source).parents[1]), 0.0, 0.0, 0)
    cfg = SimpleNamespace(cache=cache, on_bad_image="error")
    with pytest.raises(UserError, match="empty|not an image|truncated"):
        data = build_datasets(splits, cfg, PREPROCESS, [], seed=0)  # ram: raises here
        for _ in build_loader(data.datasets["train"], 2, train=False, num_workers=0, seed=0):
            pass


def test_strict_dataset_raises_bad_image_error(with_bad_files):
    records, _ = with_bad_files
    dataset = ImageDataset(records, transform=None, strict=True)
    bad_index = next(i for i, r in enumerate(records) if r.source.endswith("empty.png"))
    with pytest.raises(BadImageError):
        dataset[bad_index]


# RAM cache ---------------------------------------------------------------------------------------

def test_cache_shrinks_large_images_and_keeps_small_ones(tmp_path):
    big = png(tmp_path / "big.png", size=(300, 200))
    tall = png(tmp_path / "tall.png", size=(120, 480))
    small = png(tmp_path / "small.png", value=9, size=(20, 30))
    records = [Record(str(p), 0) for p in (big, tall, small)]

    cache, skipped = fill_cache(records, keep(50))

    assert skipped == []
    assert cache[str(big)].shape == (50, 75, 3)
    assert cache[str(tall)].shape == (200, 50, 3)
    assert cache[str(small)].shape == (30, 20, 3)
    np.testing.assert_array_equal(cache[str(small)], read_rgb(small))


def test_cache_is_refused_over_budget(tmp_path):
    records = [Record(str(png(tmp_path / f"{i}.png", size=(64, 64))), 0) for i in range(3)]
    assert fill_cache(records, keep(64), budget_bytes=1000) == (None, [])
    cache, _ = fill_cache(records, keep(64), budget_bytes=3 * 64 * 64 * 3)
    assert cache is not None and len(cache) == 3

"""The Fashion-MNIST benchmark folder must be exactly reproducible and pixel-faithful to the IDX source,
or benchmark numbers from different machines would not be comparable."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` lives at the repo root

from bench.fashion_mnist import (  # noqa: E402
    FASHION_CLASSES, SPLIT_FILES, IDXFormatError, build_fashion_folder, find_fashion_mnist, read_idx,
)

TRAIN_K, TEST_K = 3, 2


@pytest.fixture(scope="module")
def source() -> Path:
    try:
        return find_fashion_mnist()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def tiny(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fashion_folder(tmp_path_factory.mktemp("fm") / "tiny", TRAIN_K, TEST_K)


def _file_set(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*.png")}


def test_layout_and_counts(tiny: Path) -> None:
    assert sorted(p.name for p in tiny.iterdir()) == ["manifest.json", "test", "train"]
    for split, k in (("train", TRAIN_K), ("test", TEST_K)):
        assert sorted(p.name for p in (tiny / split).iterdir()) == sorted(FASHION_CLASSES)
        for name in FASHION_CLASSES:
            assert len(list((tiny / split / name).glob("*.png"))) == k
    manifest = json.loads((tiny / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 10 * TRAIN_K, "test": 10 * TEST_K}
    assert not [p for p in tiny.parent.iterdir() if p.name.startswith(".")], "temporary folder left behind"


def test_pngs_match_idx_pixels_and_labels(tiny: Path, source: Path) -> None:
    for split, (images_name, labels_name) in SPLIT_FILES.items():
        images, labels = read_idx(source / images_name, source / labels_name)
        assert images.shape[1:] == (28, 28) and images.dtype == np.uint8
        for png in (tiny / split).rglob("*.png"):
            index = int(png.stem)
            assert FASHION_CLASSES[labels[index]] == png.parent.name
            with Image.open(png) as img:
                assert img.mode == "L"
                np.testing.assert_array_equal(np.asarray(img), images[index])


def test_same_seed_same_files_other_seed_other_files(tiny: Path, tmp_path: Path) -> None:
    again = build_fashion_folder(tmp_path / "again", TRAIN_K, TEST_K)
    assert _file_set(again) == _file_set(tiny)
    other = build_fashion_folder(tmp_path / "other", TRAIN_K, TEST_K, train_seed=5, test_seed=6)
    assert _file_set(other) != _file_set(tiny)
    for split in ("train", "test"):
        assert {p for p in _file_set(other) if p.startswith(split)} != {p for p in _file_set(tiny) if p.startswith(split)}


def test_smaller_build_is_subset_of_larger(tiny: Path, tmp_path: Path) -> None:
    larger = build_fashion_folder(tmp_path / "larger", TRAIN_K + 2, TEST_K + 1)
    assert _file_set(tiny) < _file_set(larger)


def test_complete_folder_is_reused_and_changed_params_rebuild(tiny: Path, source: Path, tmp_path: Path) -> None:
    out = build_fashion_folder(tmp_path / "b", 1, 1)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert build_fashion_folder(out, 1, 1) == out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    build_fashion_folder(out, 2, 1)
    assert json.loads((out / "manifest.json").read_text())["params"]["train_per_class"] == 2
    assert len(_file_set(out)) == 30


def test_incomplete_folder_is_rebuilt(source: Path, tmp_path: Path) -> None:
    out = build_fashion_folder(tmp_path / "c", 1, 1)
    next((out / "train").rglob("*.png")).unlink()
    build_fashion_folder(out, 1, 1)
    assert len(_file_set(out)) == 20


def test_refuses_to_overwrite_foreign_folder(source: Path, tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        build_fashion_folder(tmp_path / "mine", 1, 1)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep"


@pytest.mark.parametrize("payload", [b"hello, not idx at all", b""])
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_rejects_non_idx(tmp_path: Path, payload: bytes, compress: bool) -> None:
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(payload) if compress else payload)
    with pytest.raises(IDXFormatError, match="not an IDX file"):
        read_idx(bad, bad)


def test_read_idx_rejects_truncated_data(tmp_path: Path) -> None:
    header = bytes([0, 0, 0x08, 3]) + np.array([2, 28, 28], ">u4").tobytes()
    bad = tmp_path / "short-idx3-ubyte"
    bad.write_bytes(header + bytes(28 * 28))  # one image where two are declared
    with pytest.raises(IDXFormatError, match="declares shape"):
        read_idx(bad, bad)


def test_read_idx_roundtrip_uncompressed(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "img").write_bytes(bytes([0, 0, 8, 3]) + np.array(images.shape, ">u4").tobytes() + images.tobytes())
    (tmp_path / "lab").write_bytes(bytes([0, 0, 8, 1]) + np.array([2], ">u4").tobytes() + bytes([7, 9]))
    got_images, got_labels = read_idx(tmp_path / "img", tmp_path / "lab")
    np.testing.assert_array_equal(got_images, images)
    assert got_labels.tolist() == [7, 9]


def test_missing_dataset_names_the_apt_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSFER_FASHION_MNIST", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        find_fashion_mnist()

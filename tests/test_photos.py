"""Photos: training JPEGs decode reduced to the side they are needed at (libjpeg's reduce-on-decode), evaluation
images keep a full decode's pixels, and the cache decodes with several threads without changing what it holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transfer.data.cache import fill_cache
from transfer.data.images import read_rgb
from transfer.data.resize import CacheSizes, EvalResize, shrink_short_side
from transfer.data.sources import Record

PREPROCESS = {"input_size": (3, 64, 64), "interpolation": "bicubic", "crop_pct": 0.875}


def smooth_photo(path: Path, width: int, height: int, seed: int = 0, **save) -> Path:
    """A JPEG of smooth colour (upsampled noise), so a reduced decode and a full one look alike."""
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((width, height), Image.BICUBIC).save(path, quality=92, **save)
    return path


def test_a_large_jpeg_decodes_reduced_but_never_below_the_side_asked(tmp_path: Path) -> None:
    path = smooth_photo(tmp_path / "big.jpg", 1600, 1200)
    reduced = read_rgb(path, min_side=300)
    assert reduced.shape == (300, 400, 3)  # 1/4 scale: the smallest whose sides are still >= 300
    assert read_rgb(path, min_side=301).shape == (600, 800, 3)  # 1/4 would give 300 < 301: 1/2
    assert read_rgb(path, min_side=700).shape == (1200, 1600, 3)  # less than half: a full decode
    full = shrink_short_side(read_rgb(path), 300)
    assert np.abs(reduced.astype(int) - full.astype(int)).mean() < 3  # the same picture


def test_the_reduction_follows_the_exif_orientation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: stored 1600×1200, shown 1200×1600
    path = smooth_photo(tmp_path / "turned.jpg", 1600, 1200, exif=exif.tobytes())
    assert read_rgb(path).shape == (1600, 1200, 3)
    assert read_rgb(path, min_side=300).shape == (400, 300, 3)


def test_other_formats_decode_in_full(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (1600, 1200), (10, 20, 30)).save(path)
    assert read_rgb(path, min_side=300).shape == (1200, 1600, 3)


def test_the_cache_reduces_training_jpegs_and_keeps_evaluation_pixels_exact(tmp_path: Path) -> None:
    train = [str(smooth_photo(tmp_path / f"t{i}.jpg", 1600, 1200, seed=i)) for i in range(6)]
    test = [str(smooth_photo(tmp_path / f"e{i}.jpg", 1600, 1200, seed=10 + i)) for i in range(6)]
    sizes = CacheSizes(PREPROCESS, 100, set(test))
    cache, skipped = fill_cache([Record(path, 0) for path in train + test], sizes, budget_bytes=1 << 30)
    assert skipped == []
    for path in test:  # evaluation: a full decode shrunk by evaluation's own scaling, to the pixel
        assert np.array_equal(cache[path], EvalResize(PREPROCESS, shrink_only=True)(read_rgb(path)))
    for path in train:  # training: decoded at 1/8 (200×150), shrunk to the 100 px side the crops need
        assert cache[path].shape == (100, 133, 3)
        assert np.array_equal(cache[path], shrink_short_side(read_rgb(path, min_side=100), 100))


def test_parallel_decoding_keeps_the_record_order_and_reports_bad_files_in_it(tmp_path: Path) -> None:
    paths = [str(smooth_photo(tmp_path / f"{i:02d}.jpg", 64 + i, 48, seed=i)) for i in range(40)]
    for bad in (7, 23):
        Path(paths[bad]).write_bytes(b"\xff\xd8\xff" + b"\0" * 50)
    sizes = CacheSizes(PREPROCESS, 1000, set())
    cache, skipped = fill_cache([Record(path, 0) for path in paths + paths[:5]], sizes, budget_bytes=1 << 30)
    assert list(cache) == [path for i, path in enumerate(paths) if i not in (7, 23)]
    assert [path for path, _ in skipped] == [paths[7], paths[23]]
    assert all(np.array_equal(cache[path], read_rgb(path)) for path in cache)


def test_a_strict_cache_stops_at_the_first_bad_file(tmp_path: Path) -> None:
    from transfer.errors import UserError

    paths = [str(smooth_photo(tmp_path / f"{i}.jpg", 64, 48, seed=i)) for i in range(10)]
    Path(paths[3]).write_bytes(b"not an image")
    with pytest.raises(UserError, match="3.jpg"):
        fill_cache([Record(path, 0) for path in paths], CacheSizes(PREPROCESS, 1000, set()), 1 << 30, strict=True)

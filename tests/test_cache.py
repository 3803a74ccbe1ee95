"""Decoded-image caches (transfer.data.cache): the disk cache keeps exact pixels, is reused by a later run on
the same files and rebuilt when a file changes, and every cache says what it holds or why it was refused."""

from __future__ import annotations

import os
import pickle
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from transfer.data.augment import build_eval_transform
from transfer.data.cache import DiskCache, build_cache, shrink
from transfer.data.cache_folder import default_cache_dir
from transfer.data.dataset import ImageDataset
from transfer.data.images import read_rgb
from transfer.data.loaders import build_loader
from transfer.data.sources import Record

PREPROCESS = {"input_size": [3, 24, 24], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
              "crop_pct": 1.0}


def images(folder: Path, count: int = 6) -> list[Record]:
    """PNGs of different sizes and modes (RGB, grayscale, one large enough to be shrunk), and one broken file."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(count):
        height, width = (20 + 3 * index, 30 - index) if index < count - 1 else (90, 60)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert("L") if index % 2 else Image.fromarray(pixels)
        image.save(folder / f"{index}.png")
        records.append(Record(str(folder / f"{index}.png"), index % 3))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    return records + [Record(str(folder / "broken.png"), 0)]


def test_disk_cache_round_trips_the_pixels_exactly(tmp_path: Path, capsys) -> None:
    records = images(tmp_path / "images")
    cache, skipped = build_cache("disk", records, keep_side=40, cache_dir=tmp_path / "cache")
    assert isinstance(cache, DiskCache) and len(cache) == len(records) - 1
    assert [path for path, _ in skipped] == [records[-1].source]
    for record in records[:-1]:
        expected = shrink(read_rgb(record.source), 40)
        got = cache.get(record.source)
        assert got.dtype == np.uint8 and got.shape == expected.shape and np.array_equal(got, expected)
        assert got.flags.writeable  # a copy: a transform working in place cannot change the cache
    assert cache.get(records[0].source).shape[:2] == (20, 30)
    assert min(cache.get(records[-2].source).shape[:2]) == 40  # the large one shrunk to the kept side
    assert cache.get("not/cached.png") is None
    assert "data.cache=disk: 6 images" in capsys.readouterr().out


def test_disk_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path: Path, capsys) -> None:
    records = images(tmp_path / "images")
    first, _ = build_cache("disk", records, keep_side=40, cache_dir=tmp_path / "cache")
    assert "(reused)" not in capsys.readouterr().out
    again, skipped = build_cache("disk", records, keep_side=40, cache_dir=tmp_path / "cache")
    assert "(reused)" in capsys.readouterr().out
    assert again.data_path == first.data_path and len(skipped) == 1  # the broken file is remembered too
    changed = Path(records[0].source)
    Image.fromarray(np.full((20, 30, 3), 7, np.uint8)).save(changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    rebuilt, _ = build_cache("disk", records, keep_side=40, cache_dir=tmp_path / "cache")
    assert "(reused)" not in capsys.readouterr().out and rebuilt.data_path != first.data_path
    assert (rebuilt.get(str(changed)) == 7).all()
    other_side, _ = build_cache("disk", records, keep_side=24, cache_dir=tmp_path / "cache")
    assert other_side.data_path != rebuilt.data_path  # the kept side is part of the key
    assert not list((tmp_path / "cache" / "images").glob(".*.tmp"))  # written atomically: no leftovers


def test_disk_cache_falls_back_with_a_message_when_it_will_not_fit(tmp_path: Path, monkeypatch, capsys) -> None:
    records = images(tmp_path / "images")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**31, 2**31 - 2**20, 2**20))
    assert build_cache("disk", records, keep_side=40, cache_dir=tmp_path / "cache") == (None, [])
    out = capsys.readouterr().out
    assert "data.cache=disk needs" in out and "data.cache=none" in out and "data.cache_dir" in out


def test_ram_cache_reports_its_size_and_falls_back_over_budget(tmp_path: Path, capsys) -> None:
    records = images(tmp_path / "images")
    cache, _ = build_cache("ram", records, keep_side=40)
    assert len(cache) == len(records) - 1 and "data.cache=ram: 6 images" in capsys.readouterr().out
    assert build_cache("ram", records, keep_side=40, budget_bytes=100) == (None, [])
    assert "reading images from disk each epoch instead" in capsys.readouterr().out


def test_disk_cache_feeds_loader_workers_the_same_samples(tmp_path: Path) -> None:
    records = images(tmp_path / "images")[:-1]
    cache, _ = build_cache("disk", records, keep_side=100, cache_dir=tmp_path / "cache")  # nothing shrunk
    cache.get(records[0].source)  # mapped in this process; the pickled copy must map its own
    assert pickle.loads(pickle.dumps(cache))._map is None
    transform = build_eval_transform(PREPROCESS)

    def batches(dataset: ImageDataset, workers: int) -> torch.Tensor:
        loader = build_loader(dataset, batch_size=3, train=False, num_workers=workers, seed=0)
        return torch.cat([batch["image"] for batch in loader])

    plain = batches(ImageDataset(records, transform), workers=0)
    assert torch.equal(batches(ImageDataset(records, transform, cache=cache), workers=0), plain)
    assert torch.equal(batches(ImageDataset(records, transform, cache=cache), workers=1), plain)


def test_cache_dir_default_follows_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRANSFER_CACHE_DIR", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("TRANSFER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "transfer"


def test_train_with_the_disk_cache(tiny_image_folder: Path, run_cli, tmp_path: Path) -> None:
    code, out, err = run_cli(["train", f"data.root={tiny_image_folder}", "data.cache=disk",
                              f"data.cache_dir={tmp_path / 'cache'}", "model=timm", "model.name=test_efficientnet",
                              "model.pretrained=false", "preprocess.input_size=32", "data.batch_size=8",
                              "trainer.epochs=1", "trainer.progress=off", f"hydra.run.dir={tmp_path / 'run'}"])
    assert code == 0, err
    assert (tmp_path / "run" / "metrics.json").exists()
    assert "data.cache=disk: 36 images" in out and len(list((tmp_path / "cache" / "images").glob("*.u8"))) == 1


def test_evaluation_outputs_are_kept_after_the_first_pass(tmp_path: Path) -> None:
    records = images(tmp_path / "images")[:-1]
    transform = build_eval_transform(PREPROCESS)
    dataset = ImageDataset(records, transform, memoize=True)
    first = [dataset[index]["image"] for index in range(len(records))]
    assert len(dataset.memo) == len(records)
    Path(records[0].source).unlink()  # a second pass reads nothing
    assert all(torch.equal(dataset[index]["image"], image) for index, image in enumerate(first))
    assert ImageDataset(records, transform, memoize=True, seed=0).memo is None  # training: augmented anew

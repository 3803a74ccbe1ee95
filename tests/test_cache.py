"""Decoded-image caches (transfer.data.cache): the disk cache keeps exact pixels, is reused by a later run on
the same files and rebuilt when a file changes, and every cache says what it holds or why it was refused."""

from __future__ import annotations

import os
import pickle
import shutil
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transfer.data.augment import build_eval_transform
from transfer.data.cache import DiskCache, build_cache
from transfer.data.cache_folder import DEFAULT_MAX_GB, default_cache_dir, entries
from transfer.data.resize import CacheSizes, shrink_short_side
from transfer.data.dataset import ImageDataset
from transfer.data.images import read_rgb
from transfer.data.loaders import build_loader
from transfer.data.sources import Record
from transfer.files import _umask
from transfer.tasks.probe import Features, save_features


def keep(side: int) -> CacheSizes:
    """Every file cached as training keeps it: the shorter side at `side`, never enlarged."""
    return CacheSizes({"input_size": (3, side, side), "interpolation": "bicubic", "crop_pct": 1.0}, side, set())

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
    cache, skipped = build_cache("disk", records, keep(40), cache_dir=tmp_path / "cache")
    assert isinstance(cache, DiskCache) and len(cache) == len(records) - 1
    assert [path for path, _ in skipped] == [records[-1].source]
    for record in records[:-1]:
        expected = shrink_short_side(read_rgb(record.source), 40)
        got = cache.get(record.source)
        assert got.dtype == np.uint8 and got.shape == expected.shape and np.array_equal(got, expected)
        assert got.flags.writeable  # a copy: a transform working in place cannot change the cache
    assert cache.get(records[0].source).shape[:2] == (20, 30)
    assert min(cache.get(records[-2].source).shape[:2]) == 40  # the large one shrunk to the kept side
    assert cache.get("not/cached.png") is None
    assert "data.cache=disk: 6 images" in capsys.readouterr().out


def test_disk_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path: Path, capsys) -> None:
    records = images(tmp_path / "images")
    first, _ = build_cache("disk", records, keep(40), cache_dir=tmp_path / "cache")
    assert "(reused)" not in capsys.readouterr().out
    again, skipped = build_cache("disk", records, keep(40), cache_dir=tmp_path / "cache")
    assert "(reused)" in capsys.readouterr().out
    assert again.data_path == first.data_path and len(skipped) == 1  # the broken file is remembered too
    changed = Path(records[0].source)
    Image.fromarray(np.full((20, 30, 3), 7, np.uint8)).save(changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    rebuilt, _ = build_cache("disk", records, keep(40), cache_dir=tmp_path / "cache")
    assert "(reused)" not in capsys.readouterr().out and rebuilt.data_path != first.data_path
    assert (rebuilt.get(str(changed)) == 7).all()
    other_side, _ = build_cache("disk", records, keep(24), cache_dir=tmp_path / "cache")
    assert other_side.data_path != rebuilt.data_path  # the kept side is part of the key
    assert not list((tmp_path / "cache" / "images").glob(".*.tmp"))  # written atomically: no leftovers


def test_disk_cache_falls_back_with_a_message_when_it_will_not_fit(tmp_path: Path, monkeypatch, capsys) -> None:
    records = images(tmp_path / "images")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**31, 2**31 - 2**20, 2**20))
    assert build_cache("disk", records, keep(40), cache_dir=tmp_path / "cache") == (None, [])
    out = capsys.readouterr().out
    assert "data.cache=disk needs" in out and "data.cache=none" in out and "data.cache_dir" in out


def test_ram_cache_reports_its_size_and_falls_back_over_budget(tmp_path: Path, capsys) -> None:
    records = images(tmp_path / "images")
    cache, _ = build_cache("ram", records, keep(40))
    assert len(cache) == len(records) - 1 and "data.cache=ram: 6 images" in capsys.readouterr().out
    assert build_cache("ram", records, keep(40), budget_bytes=100) == (None, [])
    assert "reading images from disk each epoch instead" in capsys.readouterr().out


def test_disk_cache_feeds_loader_workers_the_same_samples(tmp_path: Path) -> None:
    records = images(tmp_path / "images")[:-1]
    cache, _ = build_cache("disk", records, keep(100), cache_dir=tmp_path / "cache")  # nothing shrunk
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


# ---------------------------------------------------------------------------------------------
# the cache folder: a size cap with least-recently-used eviction, `transfer cache list|clear`


def image_entry(folder: Path, seed: int, count: int = 4) -> list[Record]:
    """`count` distinct 40 px PNGs: a disk cache entry of count × 4.8 kB of pixels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return [Record(str(folder / f"{index}.png"), 0) for index in range(count)]


def age(entry_key: str, folder: Path, hours: float) -> None:
    """Last used `hours` ago (as a run that touched it then would have left it)."""
    then = time.time() - hours * 3600
    for path in folder.glob(f"{entry_key}.*"):
        os.utime(path, (then, then))


def disk_entry(records: list[Record], root: Path, max_bytes: int | None = None) -> str:
    """Build (or reuse) the disk cache of `records`, let go of it, and return its key."""
    cache, _ = build_cache("disk", records, keep(40), cache_dir=root, max_bytes=max_bytes)
    key = cache.data_path.stem
    del cache  # its lock goes with it: the entry is no longer in use
    return key


def feature_entry(root: Path, seed: int, rows: int = 50) -> str:
    features = Features(np.random.default_rng(seed).random((rows, 16), dtype=np.float32), np.zeros(rows, np.int64),
                        np.arange(rows), [], cached=False, seconds=0.0)
    key = f"{seed:032x}"
    save_features(root / "features", key, features, about={"description": f"test_efficientnet features of train "
                                                                          f"({rows} images) of /data/{seed}"})
    return key


def test_the_cap_evicts_the_least_recently_used_entry(tmp_path: Path, capsys) -> None:
    root, images_folder = tmp_path / "cache", tmp_path / "cache" / "images"
    photos = image_entry(tmp_path / "a", seed=1)
    first = disk_entry(photos, root)
    second = disk_entry(image_entry(tmp_path / "b", seed=2), root)
    age(first, images_folder, hours=3)
    age(second, images_folder, hours=2)
    assert disk_entry(photos, root) == first  # a later run reuses (touches) the first one
    assert "(reused)" in capsys.readouterr().out
    sizes = {entry.key: entry.size for entry in entries(root)}
    assert set(sizes) == {first, second} and all(19_200 < size < 40_000 for size in sizes.values())
    cap = sum(sizes.values()) + min(sizes.values()) // 2  # room for two entries, not three
    third = disk_entry(image_entry(tmp_path / "c", seed=3), root, max_bytes=cap)
    assert {entry.key for entry in entries(root)} == {first, third}  # the second was used least recently
    assert not list(images_folder.glob(f"{second}*"))
    out = capsys.readouterr().out
    assert "removed the 1 least recently used cache entry" in out and f"data.cache_max_gb={cap / 1e9:g}" in out
    mode = (images_folder / f"{third}.u8").stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask()  # the user's umask, not mkstemp's 0600


def test_an_entry_in_use_is_never_evicted(tmp_path: Path, capsys) -> None:
    root, images_folder = tmp_path / "cache", tmp_path / "cache" / "images"
    in_use, _ = build_cache("disk", image_entry(tmp_path / "a", seed=1), keep(40), cache_dir=root)
    age(in_use.data_path.stem, images_folder, hours=5)  # the oldest, but a run still reads it
    idle = disk_entry(image_entry(tmp_path / "b", seed=2), root)
    age(idle, images_folder, hours=4)
    (images_folder / ".0123.u8.abcd.tmp").write_bytes(b"\0" * 100_000)  # another process writing an entry
    newest = disk_entry(image_entry(tmp_path / "c", seed=3), root, max_bytes=25_000)  # room for one entry
    assert {entry.key for entry in entries(root)} == {in_use.data_path.stem, newest}
    assert (images_folder / ".0123.u8.abcd.tmp").exists()
    assert in_use.get(next(iter(in_use.entries))).shape == (40, 40, 3)  # still readable


def test_an_entry_over_the_cap_is_not_written(tmp_path: Path, capsys) -> None:
    records = image_entry(tmp_path / "a", seed=1)
    assert build_cache("disk", records, keep(40), cache_dir=tmp_path / "cache", max_bytes=1000) == (None, [])
    assert "more than data.cache_max_gb=1e-06" in capsys.readouterr().out
    assert not entries(tmp_path / "cache")


def test_transfer_cache_lists_and_clears(tmp_path: Path, run_cli) -> None:
    root = tmp_path / "cache"
    photos = image_entry(tmp_path / "photos", seed=1)
    image_key = disk_entry(photos, root)
    feature_keys = [feature_entry(root, seed) for seed in (1, 2)]
    for key, kind in [(image_key, "images")] + [(key, "features") for key in feature_keys]:
        age(key, root / kind, hours=30)
    code, out, err = run_cli(["cache", "list", f"data.cache_dir={root}"])
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("total ") and "data.cache_max_gb=20" in lines[-1]
    image_line = next(line for line in lines if line.startswith("images"))
    assert "kB" in image_line and image_key in image_line and f"4 images under {tmp_path / 'photos'}" in image_line
    assert sum(line.startswith("features") and "test_efficientnet features of train" in line for line in lines) == 2
    code, out, _ = run_cli(["cache", "list", "what=features", f"data.cache_dir={root}", "data.cache_max_gb=null"])
    assert code == 0 and out.count("\nfeatures") + out.startswith("features") == 2 and "no cap" in out
    assert run_cli(["cache", "list", "older_than_days=2", f"data.cache_dir={root}"])[1].startswith("total ")

    code, out, err = run_cli(["cache", "clear", "what=features", f"data.cache_dir={root}"])
    assert code == 0, err
    assert out.startswith("freed ") and "removed 2 features entries" in out
    assert [entry.kind for entry in entries(root)] == ["images"]
    held, _ = build_cache("disk", photos, keep(40), cache_dir=root)  # a run reads it
    assert held.data_path.stem == image_key
    code, out, _ = run_cli(["cache", "clear", f"data.cache_dir={root}"])
    assert "removed 0 images/features entries" in out and "kept 1 in use" in out and len(entries(root)) == 1
    del held
    age(image_key, root / "images", hours=1)
    code, out, _ = run_cli(["cache", "clear", f"data.cache_dir={root}"])
    assert "removed 1 images/features entry" in out and not entries(root) and not list((root / "images").iterdir())


@pytest.mark.parametrize("arguments, expected", [
    (["cache", "purge"], "unknown action 'purge'"),
    (["cache", "clear", "what=everything"], "what=everything is not valid"),
    (["cache", "list", "older_than_days=soon"], "older_than_days=soon must be a number"),
    (["cache", "list", "data.cache_max_gb=-3"], "data.cache_max_gb=-3 must be a number of gigabytes above 0"),
    (["cache", "list", "wat=images"], "unknown key 'wat'. Did you mean what=?"),
])
def test_transfer_cache_mistakes_are_one_line(arguments: list[str], expected: str, run_cli) -> None:
    code, out, err = run_cli(arguments)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_the_cap_default_is_the_one_dense_tasks_accept() -> None:
    from transfer.config import compose

    assert compose([]).data.cache_max_gb == DEFAULT_MAX_GB


def test_transfer_cache_starts_without_torch(tmp_path: Path) -> None:
    """A housekeeping command answers at once: no torch, numpy or OpenCV (fresh interpreter)."""
    import subprocess
    import sys

    script = ("import sys; from transfer.cli import main; "
              f"code = main(['cache', 'list', 'data.cache_dir={tmp_path}']); "
              "print(code, sorted({'torch', 'numpy', 'cv2'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.stdout.splitlines()[-1] == "0 []", result.stdout + result.stderr

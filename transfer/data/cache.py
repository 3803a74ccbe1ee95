"""Decoded-image caches (`data.cache`): decode every image once, so later epochs skip reading and decoding.

  none   read and decode the files every epoch
  ram    uint8 arrays in this process's memory, within half of the memory it may use (transfer.resources:
         the container's limit or the available memory, whichever is tighter)
  disk   uint8 arrays in one memory-mapped file under `data.cache_dir` (images/), reused by later runs
         over the same files: keyed by a hash of the paths, sizes, modification times and the kept side;
         the cache folder stays under `data.cache_max_gb` by evicting what was used least recently
         (transfer.data.cache_folder)

Images are shrunk (never enlarged) through transfer's one resize (data/resize.py): evaluation images by
evaluation's own scaling, so they evaluate to the same pixels as their files; training images to the side the
random crops need (CacheSizes).
When the cache would not fit (memory budget, free disk space, the size cap) training says so in one line and
reads the files as usual. Either cache reports its size in one line. Both are looked up by file path with
`.get`. The dense tasks keep their decoded pairs under the same memory budget (`fits_in_memory`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from transfer.data.cache_folder import cache_root, eviction_note, hold, size, use, write_about
from transfer.data.images import BadImageError, read_rgb
from transfer.data.resize import CacheSizes
from transfer.data.sources import Record
from transfer.distributed import is_main
from transfer.errors import UserError
from transfer.files import atomic_write, write_text
from transfer.resources import usable_memory

CACHE_KINDS = ("none", "ram", "disk")
DISK_FORMAT = 3  # 2: evaluation images kept at evaluation's scale (data/resize.py); 3: training JPEGs
                 # reduced while decoding (images.read_rgb min_side)
DISK_RESERVE_BYTES = 1 << 30  # a disk cache never leaves less free space than this


def say(message: str) -> None:
    """What the cache did, once per run (several processes each build their own)."""
    if is_main():
        print(message)


def memory_budget(budget_bytes: int | None = None) -> tuple[int, str]:
    """(bytes an in-memory cache may take, what they are half of): half of what this process may use."""
    if budget_bytes is not None:
        return budget_bytes, "as given"
    memory = usable_memory()
    return memory.bytes // 2, f"half of {memory.source}"


def fits_in_memory(needed: int, instead: str, budget_bytes: int | None = None) -> int | None:
    """The budget when `needed` bytes fit in it; None, after one line saying where the limit came from and
    what happens `instead`, when they do not."""
    budget, source = memory_budget(budget_bytes)
    if needed <= budget:
        return budget
    say(f"data.cache=ram needs ~{size(needed)} but the budget is {size(budget)} ({source}); {instead}")
    return None


def estimate_bytes(records: list, sizes: CacheSizes | None, channels: int = 3) -> int:
    """Upper bound of the cache size from image headers alone (nothing is decoded); `sizes` None: kept at full
    size. `channels` counts the bytes per pixel held (an RGB image and its mask: 4)."""
    total = 0
    for record in records:
        if isinstance(record.source, np.ndarray):
            continue
        try:
            with Image.open(record.source) as image:
                width, height = image.size
        except Exception:
            continue
        kept_height, kept_width = (height, width) if sizes is None else sizes.shape(record.source, height, width)
        total += kept_height * kept_width * channels
    return total


def build_cache(kind: str, records: list[Record], sizes: CacheSizes, strict: bool = False,
                cache_dir: str | os.PathLike | None = None, budget_bytes: int | None = None,
                max_bytes: int | None = None) -> tuple[dict | DiskCache | None, list[tuple[str, str]]]:
    """(cache or None, skipped files) for `data.cache=kind`; prints one line on what it holds or why not.
    `max_bytes`: the cache folder's cap (data.cache_max_gb), None for none."""
    if kind == "ram":
        return fill_cache(records, sizes, budget_bytes, strict)
    if kind == "disk":
        return DiskCache.open_or_build(records, sizes, cache_root(cache_dir) / "images", strict, max_bytes)
    return None, []


def fill_cache(records: list[Record], sizes: CacheSizes, budget_bytes: int | None = None,
               strict: bool = False) -> tuple[dict[str, np.ndarray] | None, list[tuple[str, str]]]:
    """`data.cache=ram`: (cache or None when it would not fit, skipped files). Keyed by file path."""
    budget = fits_in_memory(estimate_bytes(records, sizes), "reading images from disk each epoch instead "
                            "(data.cache=none; data.cache=disk keeps them in a memory-mapped file).", budget_bytes)
    if budget is None:
        return None, []
    cache, skipped = {}, []
    for source, image in _decoded(records, sizes, strict, skipped):
        cache[source] = image
    held = sum(image.nbytes for image in cache.values())
    say(f"data.cache=ram: {len(cache)} images, {size(held)} in memory (budget {size(budget)})")
    return cache, skipped


def _decoded(records: list[Record], sizes: CacheSizes, strict: bool, skipped: list):
    """(path, shrunk uint8 image) for each distinct readable file, in record order; unreadable ones go to
    `skipped`. Decoded by a few threads (Pillow releases the GIL while it decodes and resizes, so photos decode
    on every core; tiny PNGs gain little), with a progress bar on a terminal."""
    sources = list(dict.fromkeys(record.source for record in records if not isinstance(record.source, np.ndarray)))
    pool = ThreadPoolExecutor(max_workers=decode_threads())
    try:
        with tqdm(total=len(sources), desc="decoding images", unit="img", leave=False,
                  disable=None if is_main() else True) as bar:  # None: a bar on a terminal only
            for source, image in pool.map(lambda source: _decode_one(source, sizes), sources):
                bar.update()
                if isinstance(image, BadImageError):
                    if strict:
                        raise UserError(f"bad image {image.path}: {image.reason} (data.on_bad_image=error)") from None
                    skipped.append((str(image.path), image.reason))
                else:
                    yield source, image
    finally:
        pool.shutdown(cancel_futures=True)  # a strict error stops the decoding of the files still queued


def _decode_one(source: str, sizes: CacheSizes) -> tuple[str, np.ndarray | BadImageError]:
    """The file shrunk as the cache keeps it (a training JPEG reduced while decoding), or why it could not be."""
    try:
        return source, sizes.shrink(source, read_rgb(source, min_side=sizes.decode_side(source)))
    except BadImageError as error:
        return source, error


def decode_threads() -> int:
    """Threads that decode the cache: one per core this process may use, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8))


class DiskCache:
    """Decoded images in one flat uint8 file (`KEY.u8`, memory-mapped) with an index (`KEY.json`: per path
    its offset and shape, and the files that would not decode). Both are written under temporary names and
    renamed into place, the index last, so a cache that exists is complete. Pickles without its pixels:
    each loader worker maps the file itself."""

    def __init__(self, data_path: Path, index: dict) -> None:
        self.data_path = Path(data_path)
        self.entries: dict[str, tuple[int, int, int]] = {path: tuple(entry) for path, entry in index["entries"].items()}
        self.skipped: list[tuple[str, str]] = [tuple(item) for item in index.get("skipped", [])]
        self.nbytes = int(index["nbytes"])
        self._map: np.ndarray | None = None
        self.hold = None  # a shared lock on the data file while this run uses it (cache_folder.use)

    @staticmethod
    def key(records: list[Record], sizes: CacheSizes) -> str:
        """Hash of what decides the cached pixels: each file's path, size, modification time and kept size."""
        digest = hashlib.sha256(f"transfer-image-cache {DISK_FORMAT}\n".encode())
        for path in sorted({record.source for record in records if isinstance(record.source, str)}):
            try:
                info = os.stat(path)
                stamp = f"{info.st_size}\0{info.st_mtime_ns}"
            except OSError:
                stamp = "missing"
            digest.update(f"{path}\0{stamp}\0{sizes.describe(path)}\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()[:24]

    @classmethod
    def open_or_build(cls, records: list[Record], sizes: CacheSizes, folder: Path, strict: bool = False,
                      max_bytes: int | None = None) -> tuple[DiskCache | None, list[tuple[str, str]]]:
        key = cls.key(records, sizes)
        data_path, index_path = folder / f"{key}.u8", folder / f"{key}.json"
        cache = cls.load(data_path, index_path)
        if cache is not None:
            try:
                cache.hold = use(folder, key, data_path)
            except FileNotFoundError:  # `transfer cache clear` removed it just now: build it again
                cache = None
        if cache is not None:
            if strict and cache.skipped:
                path, reason = cache.skipped[0]
                raise UserError(f"bad image {path}: {reason} (data.on_bad_image=error)")
            say(f"data.cache=disk: {len(cache.entries)} images, {size(cache.nbytes)} in {data_path} (reused), "
                  f"memory-mapped")
            return cache, cache.skipped
        needed = estimate_bytes(records, sizes)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(folder).free
        except OSError as error:
            say(f"data.cache=disk: cannot use {folder} ({error.strerror or error}); reading images from disk "
                  "each epoch instead (data.cache=none). Set data.cache_dir to a writable folder.")
            return None, []
        if needed > free - DISK_RESERVE_BYTES:
            say(f"data.cache=disk needs ~{size(needed)} but {folder} has {size(free)} free (keeping "
                  f"{size(DISK_RESERVE_BYTES)}); reading images from disk each epoch instead (data.cache=none). "
                  "Point data.cache_dir at a larger disk.")
            return None, []
        if max_bytes is not None and needed > max_bytes:
            say(f"data.cache=disk needs ~{size(needed)}, more than data.cache_max_gb={max_bytes / 1e9:g}; reading "
                "images from disk each epoch instead (data.cache=none). Raise data.cache_max_gb (null: no cap).")
            return None, []
        try:
            cache = cls.build(records, sizes, data_path, index_path, strict)
            cache.hold = hold(data_path)
            write_about(folder, key, describe_images(records, sizes), kept=sizes.summary())
        except OSError as error:
            say(f"data.cache=disk: writing {data_path} failed ({error.strerror or error}); reading images from "
                  "disk each epoch instead (data.cache=none).")
            return None, []
        say(f"data.cache=disk: {len(cache.entries)} images, {size(cache.nbytes)} in {data_path}, memory-mapped")
        note = eviction_note(folder.parent, max_bytes, keep={folder / key})
        if note:
            say(note)
        return cache, cache.skipped

    @classmethod
    def load(cls, data_path: Path, index_path: Path) -> DiskCache | None:
        try:
            index = json.loads(index_path.read_text())
            if index.get("format") != DISK_FORMAT or data_path.stat().st_size != index["nbytes"]:
                return None
        except (OSError, ValueError, KeyError):
            return None
        return cls(data_path, index)

    @classmethod
    def build(cls, records: list[Record], sizes: CacheSizes, data_path: Path, index_path: Path,
              strict: bool = False) -> DiskCache:
        entries, skipped, offset = {}, [], 0
        with atomic_write(data_path, "wb") as stream:
            for source, image in _decoded(records, sizes, strict, skipped):
                image = np.ascontiguousarray(image, dtype=np.uint8)
                stream.write(image.tobytes())
                entries[source] = (offset, image.shape[0], image.shape[1])
                offset += image.nbytes
        index = {"format": DISK_FORMAT, "nbytes": offset, "entries": entries,
                 "skipped": skipped}
        write_text(index_path, json.dumps(index))
        return cls(data_path, json.loads(index_path.read_text()))

    def _pixels(self) -> np.ndarray:
        if self._map is None:
            self._map = np.memmap(self.data_path, dtype=np.uint8, mode="r") if self.nbytes else np.empty(0, np.uint8)
        return self._map

    def get(self, path: str, default=None) -> np.ndarray | None:
        """A writable copy of the cached image (transforms may work in place), or `default`."""
        entry = self.entries.get(path)
        if entry is None:
            return default
        offset, height, width = entry
        return np.array(self._pixels()[offset:offset + height * width * 3].reshape(height, width, 3))

    def __contains__(self, path: str) -> bool:
        return path in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_map": None, "hold": None}  # loader workers map the file themselves


def describe_images(records: list[Record], sizes: CacheSizes) -> str:
    """What an image cache was built from, for `transfer cache list`."""
    paths = [record.source for record in records if isinstance(record.source, str)]
    try:
        folder = os.path.commonpath(paths) if paths else "?"
    except ValueError:
        folder = "several folders"
    return f"{len(paths)} images under {folder}, {sizes.summary()}"

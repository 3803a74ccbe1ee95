"""Decoded-image caches (`data.cache`): decode every image once, so later epochs skip reading and decoding.

  none   read and decode the files every epoch
  ram    uint8 arrays in this process's memory, within half of the available memory
  disk   uint8 arrays in one memory-mapped file under `data.cache_dir` (images/), reused by later runs
         over the same files: keyed by a hash of the paths, sizes, modification times and the kept side

Images are shrunk (never enlarged) through transfer's one resize (data/resize.py): evaluation images by
evaluation's own scaling, so they evaluate to the same pixels as their files; training images to the side the
random crops need (CacheSizes).
When the cache would not fit (memory budget, free disk space) training says so in one line and reads the
files as usual. Either cache reports its size in one line. Both are looked up by file path with `.get`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from transfer.data.images import BadImageError, read_rgb
from transfer.data.resize import CacheSizes
from transfer.data.sources import Record
from transfer.distributed import is_main
from transfer.errors import UserError

CACHE_KINDS = ("none", "ram", "disk")
DISK_FORMAT = 2  # 2: evaluation images kept at evaluation's scale (data/resize.py)
DISK_RESERVE_BYTES = 1 << 30  # a disk cache never leaves less free space than this


def say(message: str) -> None:
    """What the cache did, once per run (several processes each build their own)."""
    if is_main():
        print(message)


def default_cache_dir() -> Path:
    """$TRANSFER_CACHE_DIR, else $XDG_CACHE_HOME/transfer, else ~/.cache/transfer."""
    if os.environ.get("TRANSFER_CACHE_DIR"):
        return Path(os.environ["TRANSFER_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "transfer"


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """`data.cache_dir`, or the default when it is null."""
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 1024**3


def estimate_bytes(records: list[Record], sizes: CacheSizes) -> int:
    """Upper bound of the cache size from image headers alone (nothing is decoded)."""
    total = 0
    for record in records:
        if isinstance(record.source, np.ndarray):
            continue
        try:
            with Image.open(record.source) as image:
                width, height = image.size
        except Exception:
            continue
        kept_height, kept_width = sizes.shape(record.source, height, width)
        total += kept_height * kept_width * 3
    return total


def build_cache(kind: str, records: list[Record], sizes: CacheSizes, strict: bool = False,
                cache_dir: str | os.PathLike | None = None,
                budget_bytes: int | None = None) -> tuple[dict | DiskCache | None, list[tuple[str, str]]]:
    """(cache or None, skipped files) for `data.cache=kind`; prints one line on what it holds or why not."""
    if kind == "ram":
        return fill_cache(records, sizes, budget_bytes, strict)
    if kind == "disk":
        return DiskCache.open_or_build(records, sizes, cache_root(cache_dir) / "images", strict)
    return None, []


def fill_cache(records: list[Record], sizes: CacheSizes, budget_bytes: int | None = None,
               strict: bool = False) -> tuple[dict[str, np.ndarray] | None, list[tuple[str, str]]]:
    """`data.cache=ram`: (cache or None when it would not fit, skipped files). Keyed by file path."""
    budget = budget_bytes if budget_bytes is not None else available_memory_bytes() // 2
    needed = estimate_bytes(records, sizes)
    if needed > budget:
        say(f"data.cache=ram needs ~{_size(needed)} but the budget is {_size(budget)} (half the available "
              "memory); reading images from disk each epoch instead (data.cache=none; data.cache=disk keeps them "
              "in a memory-mapped file).")
        return None, []
    cache, skipped = {}, []
    for source, image in _decoded(records, sizes, strict, skipped):
        cache[source] = image
    held = sum(image.nbytes for image in cache.values())
    say(f"data.cache=ram: {len(cache)} images, {_size(held)} in memory (budget {_size(budget)})")
    return cache, skipped


def _decoded(records: list[Record], sizes: CacheSizes, strict: bool, skipped: list):
    """(path, shrunk uint8 image) for each distinct readable file; unreadable ones go to `skipped`."""
    seen = set()
    for record in records:
        if isinstance(record.source, np.ndarray) or record.source in seen:
            continue
        seen.add(record.source)
        try:
            yield record.source, sizes.shrink(record.source, read_rgb(record.source))
        except BadImageError as error:
            if strict:
                raise UserError(f"bad image {error.path}: {error.reason} (data.on_bad_image=error)") from None
            skipped.append((str(error.path), error.reason))


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
    def open_or_build(cls, records: list[Record], sizes: CacheSizes, folder: Path,
                      strict: bool = False) -> tuple[DiskCache | None, list[tuple[str, str]]]:
        key = cls.key(records, sizes)
        data_path, index_path = folder / f"{key}.u8", folder / f"{key}.json"
        cache = cls.load(data_path, index_path)
        if cache is not None:
            if strict and cache.skipped:
                path, reason = cache.skipped[0]
                raise UserError(f"bad image {path}: {reason} (data.on_bad_image=error)")
            say(f"data.cache=disk: {len(cache.entries)} images, {_size(cache.nbytes)} in {data_path} (reused), "
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
            say(f"data.cache=disk needs ~{_size(needed)} but {folder} has {_size(free)} free (keeping "
                  f"{_size(DISK_RESERVE_BYTES)}); reading images from disk each epoch instead (data.cache=none). "
                  "Point data.cache_dir at a larger disk.")
            return None, []
        try:
            cache = cls.build(records, sizes, data_path, index_path, strict)
        except OSError as error:
            say(f"data.cache=disk: writing {data_path} failed ({error.strerror or error}); reading images from "
                  "disk each epoch instead (data.cache=none).")
            return None, []
        say(f"data.cache=disk: {len(cache.entries)} images, {_size(cache.nbytes)} in {data_path}, memory-mapped")
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
        handle, temporary = tempfile.mkstemp(prefix=f".{data_path.name}.", suffix=".tmp", dir=data_path.parent)
        try:
            with os.fdopen(handle, "wb") as stream:
                for source, image in _decoded(records, sizes, strict, skipped):
                    image = np.ascontiguousarray(image, dtype=np.uint8)
                    stream.write(image.tobytes())
                    entries[source] = (offset, image.shape[0], image.shape[1])
                    offset += image.nbytes
            os.replace(temporary, data_path)
            temporary = None
            index = {"format": DISK_FORMAT, "nbytes": offset, "entries": entries,
                     "skipped": skipped}
            _write_atomically(index_path, json.dumps(index).encode())
        finally:
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)
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
        return {**self.__dict__, "_map": None}


def _write_atomically(path: Path, payload: bytes) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"

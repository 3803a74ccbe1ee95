"""Build the Fashion-MNIST benchmark as a plain image folder.

The benchmark must exercise the same path a user's data takes, so instead of feeding arrays to the
trainer we write exactly the files a user would have: ``train/<class>/<index>.png`` and
``test/<class>/<index>.png``. The source is Debian's ``dataset-fashion-mnist`` (IDX files), so no
network is needed.

Selection rule (reproducible from this text alone): for a split and its seed, make one
``rng = np.random.default_rng(seed)``; for each label ``c`` in order 0..9, take the indices of that
label in the original split in ascending order, shuffle them with ``rng.permutation``, and keep the
first ``per_class``. Because the whole candidate list is permuted whatever ``per_class`` is, the rng
stream does not depend on ``per_class``: a smaller benchmark is a subset of a larger one with the
same seed.

Usage::

    python bench/fashion_mnist.py --out bench/data/fashion_mnist_100
    python -m bench.fashion_mnist --out bench/data/fashion_mnist_100 --train-per-class 100
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "TRANSFER_FASHION_MNIST"

# Label order of the original dataset; names are safe as folder names on every filesystem.
FASHION_CLASSES: tuple[str, ...] = (
    "t-shirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)

# split -> (images file, labels file), as shipped by Debian and by the upstream project.
SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

MANIFEST = "manifest.json"
BUILDER = "bench.fashion_mnist"
FORMAT_VERSION = 1

# IDX type byte -> big-endian numpy dtype (the IDX spec stores multi-byte values big-endian).
_IDX_DTYPES: dict[int, str] = {
    0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8",
}
_GZIP_MAGIC = b"\x1f\x8b"


class IDXFormatError(ValueError):
    """The file is not a well-formed IDX file (wrong magic, truncated, or wrong shape)."""


# ----------------------------------------------------------------------------------------------
# IDX parsing


def _read_bytes(path: Path) -> bytes:
    """Decompress by content, not by suffix, so a mislabelled file still gets a precise error."""
    raw = Path(path).read_bytes()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as err:
        raise IDXFormatError(f"{path}: corrupt gzip data ({err})") from err


def read_idx_array(path: Path) -> np.ndarray:
    """Parse one IDX file; the header is checked so that a wrong file fails here, not as odd pixels."""
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise IDXFormatError(
            f"{path}: not an IDX file (magic bytes {data[:4].hex() or 'empty'}; expected "
            f"00 00 <type in {sorted(_IDX_DTYPES)}> <ndim>)"
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise IDXFormatError(f"{path}: truncated IDX header ({ndim} dimensions declared)")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header_len != expected:
        raise IDXFormatError(
            f"{path}: header declares shape {shape} ({expected} bytes) but the file holds "
            f"{len(data) - header_len} bytes of data"
        )
    return np.frombuffer(data, dtype, offset=header_len).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(images_gz: Path, labels_gz: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a matching images/labels pair; mismatched files are rejected rather than zipped short."""
    images, labels = read_idx_array(images_gz), read_idx_array(labels_gz)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise IDXFormatError(f"{images_gz}: expected uint8 images N x H x W, got {images.dtype} {images.shape}")
    if labels.ndim != 1:
        raise IDXFormatError(f"{labels_gz}: expected a 1-d label vector, got shape {labels.shape}")
    if len(images) != len(labels):
        raise IDXFormatError(f"{images_gz} has {len(images)} images but {labels_gz} has {len(labels)} labels")
    return images, labels.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Locating the data


def find_fashion_mnist() -> Path:
    """Return the folder with the four IDX files; ``$TRANSFER_FASHION_MNIST`` wins over Debian's path."""
    override = os.environ.get(ENV_VAR)
    root = Path(override) if override else DEFAULT_ROOT
    names = [name for pair in SPLIT_FILES.values() for name in pair]
    missing = [name for name in names if not (root / name).is_file()]
    if missing:
        origin = f"${ENV_VAR}={override}" if override else "the Debian location"
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root} ({origin}); missing {', '.join(missing)}. "
            f"Install it with `apt-get install dataset-fashion-mnist`, or set {ENV_VAR} to a folder "
            f"holding {', '.join(names)}."
        )
    return root


@functools.lru_cache(maxsize=2)
def _load_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Cached because decompressing the train split costs ~0.4 s and tests build several folders."""
    images_name, labels_name = SPLIT_FILES[split]
    images, labels = read_idx(root / images_name, root / labels_name)
    images.flags.writeable = labels.flags.writeable = False  # shared by every caller of the cache
    return images, labels


# ----------------------------------------------------------------------------------------------
# Selection and writing


def select_per_class(labels: np.ndarray, per_class: int, seed: int) -> dict[int, np.ndarray]:
    """Apply the module's documented selection rule; sorted output keeps file order stable."""
    rng = np.random.default_rng(seed)
    chosen: dict[int, np.ndarray] = {}
    for label in range(len(FASHION_CLASSES)):
        candidates = np.flatnonzero(labels == label)
        if per_class > len(candidates):
            raise ValueError(f"asked for {per_class} images of class {FASHION_CLASSES[label]!r}, "
                             f"the split has only {len(candidates)}")
        chosen[label] = np.sort(rng.permutation(candidates)[:per_class])
    return chosen


def _write_split(dest: Path, images: np.ndarray, chosen: dict[int, np.ndarray]) -> int:
    """Name files by their index in the original split so any PNG can be traced back to the IDX."""
    width = len(str(len(images) - 1))
    count = 0
    for label, indices in chosen.items():
        class_dir = dest / FASHION_CLASSES[label]
        class_dir.mkdir(parents=True)
        for index in indices:
            Image.fromarray(images[index]).save(class_dir / f"{index:0{width}d}.png")
            count += 1
    return count


def _params(train_per_class: int, test_per_class: int, train_seed: int, test_seed: int) -> dict:
    return {
        "train_per_class": train_per_class, "test_per_class": test_per_class,
        "train_seed": train_seed, "test_seed": test_seed,
        "classes": list(FASHION_CLASSES), "format_version": FORMAT_VERSION,
    }


def _read_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(out: Path, params: dict) -> bool:
    """Trust the manifest only if its parameters match and the files it counts are really there."""
    manifest = _read_manifest(out)
    if manifest is None or manifest.get("params") != params:
        return False
    for split, per_class in (("train", params["train_per_class"]), ("test", params["test_per_class"])):
        for name in FASHION_CLASSES:
            class_dir = out / split / name
            if not class_dir.is_dir() or sum(1 for _ in class_dir.glob("*.png")) != per_class:
                return False
    return True


@contextmanager
def building(out: Path) -> Iterator[Path]:
    """A fresh temporary folder beside `out` to build in; removed afterwards whatever happened (nothing is
    left to remove once replace_dir has renamed it into place)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(tmp: Path, out: Path, builder: str = BUILDER) -> None:
    """Swap a finished build into place; an old build of the same builder is removed only after the swap,
    and a folder some other hand made is never removed."""
    if not out.exists():
        tmp.rename(out)
        return
    manifest = _read_manifest(out)
    if manifest is None or manifest.get("builder") != builder:
        raise FileExistsError(f"{out} exists and was not built by {builder}; refusing to overwrite it")
    trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    out.rename(trash / out.name)
    tmp.rename(out)
    shutil.rmtree(trash)


def build_fashion_folder(out: Path, train_per_class: int = 100, test_per_class: int = 200,
                         train_seed: int = 0, test_seed: int = 1) -> Path:
    """Build (or reuse) the benchmark folder; the manifest is written last, so it marks completeness."""
    out = Path(out)
    params = _params(train_per_class, test_per_class, train_seed, test_seed)
    if _is_complete(out, params):
        return out
    root = find_fashion_mnist()
    with building(out) as tmp:
        counts = {}
        for split, per_class, seed in (("train", train_per_class, train_seed), ("test", test_per_class, test_seed)):
            images, labels = _load_split(root, split)
            counts[split] = _write_split(tmp / split, images, select_per_class(labels, per_class, seed))
        manifest = {"builder": BUILDER, "params": params, "counts": counts, "source": str(root)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            replace_dir(tmp, out)
        except OSError:
            if not _is_complete(out, params):  # a concurrent build of the same folder may have won
                raise
    return out


# ----------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to create, e.g. bench/data/fashion_mnist_100")
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--test-seed", type=int, default=1)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    params = _params(args.train_per_class, args.test_per_class, args.train_seed, args.test_seed)
    reused = _is_complete(args.out, params)
    try:
        out = build_fashion_folder(args.out, args.train_per_class, args.test_per_class,
                                   args.train_seed, args.test_seed)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    counts = json.loads((out / MANIFEST).read_text())["counts"]
    print(f"{out}  train={counts['train']} test={counts['test']} classes={len(FASHION_CLASSES)}  "
          f"{time.perf_counter() - start:.1f}s{' (already built)' if reused else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

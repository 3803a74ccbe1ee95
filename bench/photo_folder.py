"""A folder of photo-sized JPEGs (train/ and test/, class folders) for loader benchmarks at 224 px.

    python -m bench.photo_folder --out /tmp/photos --per-class 256 --classes 10
    python -m bench.photo_folder --out /tmp/photos --bench                 # + end-to-end / compute-only at 224 px
    python -m bench.photo_folder --out /tmp/big --side 1600 --bench --cache none   # phone-sized, decoded every epoch

With --bench it then runs bench.throughput on the folder with the default model (tf_efficientnet_lite0) at
224 px: compute-only against end-to-end training and evaluation images/s in one process (the ratio is the
figure; epochs are cut to --steps batches so a CPU finishes), and the set-up time, which holds the cache's
decoding of every file (data.cache=ram, a thread per core).

Fashion-MNIST's 28 px PNGs decode in microseconds, which says nothing about feeding a GPU from
ImageNet-like files. These are 400×300 (some 300×400) JPEGs at quality 90, about ImageNet's median
size and file size class: smooth colour fields with shapes and noise, cheap to make, realistic to
decode. Deterministic for a seed; an existing complete folder is reused.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def photo(rng: np.random.Generator, label: int, portrait: bool, side: int = 400) -> Image.Image:
    """A `side` × 3/4 `side` picture (portrait: turned), its class in its colour."""
    width, height = (side * 3 // 4, side) if portrait else (side, side * 3 // 4)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    coarse[..., label % 3] = 200 + label  # the class shows in the colour
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(20, 120))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + size, y + size), fill=fill)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def build_photo_folder(out: Path, per_class: int = 256, classes: int = 10, test_per_class: int = 64,
                       seed: int = 0, side: int = 400) -> Path:
    """Make (or reuse) the folder; images are written by a process per core."""
    out = Path(out)
    marker = out / (f".complete-{per_class}-{classes}-{test_per_class}-{seed}" + (f"-{side}" if side != 400 else ""))
    if marker.exists():
        return out
    jobs = [(out / split / f"class_{label:02d}" / f"{index:05d}.jpg", (seed, number, label, index), side)
            for number, (split, count) in enumerate((("train", per_class), ("test", test_per_class)))
            for label in range(classes) for index in range(count)]
    for path, _, _ in jobs:
        path.parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_write, jobs, chunksize=64))
    marker.touch()
    return out


def _write(job: tuple[Path, tuple, int]) -> None:
    path, key, side = job
    photo(np.random.default_rng(key), key[2], portrait=key[-1] % 4 == 0, side=side).save(path, quality=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-class", type=int, default=256)
    parser.add_argument("--test-per-class", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--side", type=int, default=400, help="longer side of the photos in pixels")
    parser.add_argument("--bench", action="store_true", help="then measure end-to-end / compute-only at 224 px")
    parser.add_argument("--cache", default="ram", help="data.cache for --bench: none | ram | disk")
    parser.add_argument("--steps", type=int, default=8, help="--bench: batches per timed epoch")
    parser.add_argument("--rounds", type=int, default=3, help="--bench: interleaved rounds")
    args = parser.parse_args(argv)
    print(build_photo_folder(args.out, args.per_class, args.classes, args.test_per_class, side=args.side), flush=True)
    if not args.bench:
        return 0
    from bench.throughput import main as throughput

    return throughput(["--root", str(args.out), "--size", "224", "--cache", args.cache, "--max-steps",
                       str(args.steps), "--rounds", str(args.rounds)])  # batch sizes: the config's defaults


if __name__ == "__main__":
    sys.exit(main())

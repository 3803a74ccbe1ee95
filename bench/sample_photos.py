"""Photo-sized JPEGs (500-1000 px on the long side) cut from scikit-image's real sample photos, in train/ and
test/ class folders: one class per photo, each image a random crop, flip and exposure of it.

    python -m bench.sample_photos --out bench/data/sample_photos --per-class 12 --test-per-class 8

Real camera pixels at ImageNet-like sizes, offline: what a resize bug shows up on (fine texture aliases when it
is shrunk without antialiasing) and what tiny PNGs never exercise. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "rocket", "chelsea", "hubble_deep_field", "stereo_motorcycle")


def load_photo(name: str) -> np.ndarray:
    from skimage import data

    image = getattr(data, name)()
    return image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: (left, right, disparity)


def variant(photo: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A crop of 40-100% of the photo's area, maybe mirrored, brighter or darker, scaled to a long side of
    500-1000 px."""
    height, width = photo.shape[:2]
    share = np.sqrt(rng.uniform(0.4, 1.0))
    crop_h, crop_w = int(height * share), int(width * share)
    top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
    pixels = photo[top:top + crop_h, left:left + crop_w].astype(np.float32) * rng.uniform(0.8, 1.2)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    long_side = int(rng.integers(500, 1001))
    scale = long_side / max(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)


def build_sample_photos(out: Path, per_class: int = 12, test_per_class: int = 8, classes: int = len(PHOTOS),
                        seed: int = 0) -> Path:
    out = Path(out)
    marker = out / f".complete-{per_class}-{test_per_class}-{classes}-{seed}"
    if marker.exists():
        return out
    for label, name in enumerate(PHOTOS[:classes]):
        photo = load_photo(name)
        for split, count in (("train", per_class), ("test", test_per_class)):
            rng = np.random.default_rng([seed, label, split == "test"])
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                variant(photo, rng).save(folder / f"{index:03d}.jpg", quality=int(rng.integers(85, 96)))
    marker.touch()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/data/sample_photos"))
    parser.add_argument("--per-class", type=int, default=12)
    parser.add_argument("--test-per-class", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_sample_photos(args.out, args.per_class, args.test_per_class, seed=args.seed))


if __name__ == "__main__":
    main()

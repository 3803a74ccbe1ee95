"""`data.cache=ram`: decode every image once, keep uint8 arrays, skip file reads after epoch one.

Images are shrunk (never enlarged) to the largest side any transform needs, which bounds memory;
when even that would not fit in the budget the cache is refused with a message and training reads
files as usual.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image

from transfer.data.images import BadImageError, read_rgb
from transfer.data.sources import Record
from transfer.errors import UserError


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 1024**3


def estimate_bytes(records: list[Record], keep_side: int) -> int:
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
        scale = min(1.0, keep_side / max(1, min(width, height)))
        total += math.ceil(width * scale) * math.ceil(height * scale) * 3
    return total


def shrink(image: np.ndarray, keep_side: int) -> np.ndarray:
    height, width = image.shape[:2]
    short = min(height, width)
    if short <= keep_side:
        return image
    scale = keep_side / short
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def fill_cache(records: list[Record], keep_side: int, budget_bytes: int | None = None,
               strict: bool = False) -> tuple[dict[str, np.ndarray] | None, list[tuple[str, str]]]:
    """(cache or None when it would not fit, skipped files). Keyed by file path."""
    budget = budget_bytes if budget_bytes is not None else available_memory_bytes() // 2
    needed = estimate_bytes(records, keep_side)
    if needed > budget:
        print(f"data.cache=ram needs ~{needed / 1e9:.1f} GB but the budget is {budget / 1e9:.1f} GB; "
              "reading images from disk each epoch instead (data.cache=none).")
        return None, []
    cache, skipped = {}, []
    for record in records:
        if isinstance(record.source, np.ndarray) or record.source in cache:
            continue
        try:
            cache[record.source] = shrink(read_rgb(record.source), keep_side)
        except BadImageError as error:
            if strict:
                raise UserError(f"bad image {error.path}: {error.reason} (data.on_bad_image=error)") from None
            skipped.append((str(error.path), error.reason))
    return cache, skipped

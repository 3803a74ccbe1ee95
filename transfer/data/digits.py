"""The embedded default dataset: scikit-learn's 8×8 handwritten digits, rendered as images.

It ships inside scikit-learn, so `transfer train` with no arguments works offline on real data.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from transfer.data.images import to_rgb_uint8


def digits_images() -> tuple[list[str], list[tuple[np.ndarray, int]]]:
    """(class names, 1,797 (RGB uint8 array, label) pairs); pixel intensities 0–16 are stretched to 0–255."""
    bunch = load_digits()
    pixels = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    images = [(to_rgb_uint8(Image.fromarray(image, mode="L")), int(label))
               for image, label in zip(pixels, bunch.target)]
    return [str(name) for name in bunch.target_names], images

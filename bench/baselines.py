"""Reference points without deep learning on the same Fashion-MNIST benchmark split.

    python -m bench.baselines

Logistic regression on raw pixels (scikit-learn), trained on exactly the images of the benchmark
folder (100 per class) and scored on its test images: what any recipe must clearly beat.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bench.fashion_mnist import build_fashion_folder

FASHION = Path(__file__).resolve().parent / "data" / "fashion_mnist_100"


def load_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
    pixels, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / split / name).glob("*.png")):
            pixels.append(np.asarray(Image.open(path), dtype=np.float32).ravel() / 255.0)
            labels.append(label)
    return np.stack(pixels), np.array(labels)


def main() -> None:
    root = build_fashion_folder(FASHION)
    train_x, train_y = load_split(root, "train")
    test_x, test_y = load_split(root, "test")
    started = time.perf_counter()
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=2000))
    model.fit(train_x, train_y)
    seconds = time.perf_counter() - started
    print(f"logistic regression on pixels: top1={model.score(test_x, test_y):.4f} train={seconds:.1f}s "
          f"(train {len(train_y)}, test {len(test_y)})")


if __name__ == "__main__":
    main()

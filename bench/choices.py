"""The Fashion-MNIST recipes' choices, made on validation images carved from the training images only:

    python -m bench.choices                       # every candidate below, seed 0
    python -m bench.choices --only lr=1e-3 lr=4e-3

Each candidate is `recipe=fashion_mnist_lite0` plus overrides, trained on 800 of the 1,000 training images and
scored on the other 200 (`data.val_fraction=0.2`, stratified, `data.split_seed=0`). The runs read a manifest of
the training images alone (`development.csv` beside the folder), so the test split is not even indexed. The
recipes then train on all 1,000 images with the settings chosen here, and meet the test split once, in
`python -m bench.recipes`. Prints val top-1 per candidate, best first.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from bench.fashion_mnist import build_fashion_folder
from bench.recipes import FASHION, REPO, machine

# what each recipe setting was chosen against: name → overrides on fashion_mnist_lite0
CANDIDATES = {
    "fashion_mnist_lite0 (lr 2e-3, 80 px, 12 epochs)": [],
    "lr=1e-3": ["optim.lr=1e-3"],
    "lr=4e-3": ["optim.lr=4e-3"],
    "64 px": ["preprocess.input_size=64"],
    "augment=default": ["augment=default"],
    "fashion_mnist_lite0_best (20 epochs, mixup/cutmix, EMA)": ["recipe=fashion_mnist_lite0_best"],
    "fashion_mnist_lite0_best with flip TTA": ["recipe=fashion_mnist_lite0_best", "trainer.tta=flip"],
}


def development_manifest(root: Path) -> Path:
    """root/development.csv: the training images only (path,label), so a run cannot see the test split."""
    manifest = root / "development.csv"
    rows = [(path.relative_to(root).as_posix(), path.parent.name) for path in sorted((root / "train").rglob("*.png"))]
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return manifest


VALIDATION = ["data.val_fraction=0.2", "data.test_fraction=0", "data.split_seed=0"]


def score(overrides: list[str], manifest: Path, seed: int, out: Path, recipe: str = "fashion_mnist_lite0") -> dict:
    """val top-1 and wall of one `transfer train` on the development images."""
    run_dir = out / f"choice-seed{seed}-{time.time_ns()}"
    command = [sys.executable, "-m", "transfer", "train", f"recipe={recipe}", f"data.root={manifest}", *VALIDATION,
               f"seed={seed}", "trainer.progress=off", f"hydra.run.dir={run_dir}", *overrides]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert not any(key.startswith("test/") for key in metrics), "a choice run saw the test split"
    return {"val": metrics["val/top1"], "wall": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="candidate names to run (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    arguments = parser.parse_args()
    build_fashion_folder(FASHION)
    manifest = development_manifest(FASHION)
    chosen = {name: overrides for name, overrides in CANDIDATES.items()
              if not arguments.only or name in arguments.only}
    results = {}
    for name, overrides in chosen.items():
        results[name] = score(overrides, manifest, arguments.seed, arguments.out)
        print(f"{name}: val top-1 {results[name]['val'] * 100:.1f}% ({results[name]['wall']:.0f} s)", flush=True)
    print(f"\nval = 200 of the 1,000 training images (seed {arguments.seed}); {machine()}, {date.today().isoformat()}")
    print("| candidate | val top-1 |\n|---|---|")
    for name, result in sorted(results.items(), key=lambda item: -item[1]["val"]):
        print(f"| {name} | {result['val'] * 100:.1f}% |")


if __name__ == "__main__":
    main()

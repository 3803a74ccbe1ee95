"""Check the LR finder against a small sweep of real training runs on the Fashion-MNIST benchmark.

    python -m bench.lr_sweep                                   # fashion_mnist_lite0 at 64 px, 6 epochs
    python -m bench.lr_sweep --lrs 5e-4 1e-3 2e-3 4e-3 8e-3 -- preprocess.input_size=80

`transfer lr-find` runs once with the recipe and the overrides; then one `transfer train` per learning rate
with the same settings, all on the development images of bench/choices.py (the training images only, 200 of
them held out): the test split is never read. Prints each run's val top-1 and how far the finder's suggestion
lies from the best of the sweep (as a factor: the acceptance bar is 3x).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.fashion_mnist import build_fashion_folder
from bench.choices import VALIDATION, development_manifest, score
from bench.recipes import FASHION, REPO

DEFAULT_OVERRIDES = ["preprocess.input_size=64", "trainer.epochs=6"]


def finder_suggestion(recipe: str, manifest: Path, overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "transfer", "lr-find", f"recipe={recipe}", f"data.root={manifest}",
                        *VALIDATION, *overrides, f"out={out}"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        return json.loads((Path(out) / "lr_find.json").read_text())["suggestion"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="fashion_mnist_lite0")
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3, 4e-3, 8e-3])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "lr_sweep")
    arguments, extra = parser.parse_known_args()
    overrides = [item for item in extra if item != "--"] or DEFAULT_OVERRIDES
    build_fashion_folder(FASHION)
    manifest = development_manifest(FASHION)
    suggestion = finder_suggestion(arguments.recipe, manifest, overrides)
    results = {}
    for lr in arguments.lrs:
        results[lr] = score([*overrides, f"optim.lr={lr}"], manifest, 0, arguments.out, arguments.recipe)
        print(f"optim.lr={lr:.1e} val top1={results[lr]['val']:.4f} wall={results[lr]['wall']:.1f}s", flush=True)
    best = max(results, key=lambda lr: results[lr]["val"])
    factor = max(suggestion / best, best / suggestion)
    print(f"lr-find suggests {suggestion:.2e}; best of the sweep {best:.1e} "
          f"(val {results[best]['val']:.4f}); factor {factor:.2f} ({' '.join(overrides)})")


if __name__ == "__main__":
    main()

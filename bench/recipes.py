"""Run recipes through the CLI on their real benchmark data and print the README's results rows.

    python -m bench.recipes default fashion_mnist_lite0 fashion_mnist_lite0_linear_probe
    python -m bench.recipes fashion_mnist_lite0 --seeds 0 1 2 -- model.pretrained=false
    python -m bench.recipes fashion_mnist_lite0_best --seeds 0 1 2 --random-init   # + the same budget from random init
    python -m bench.recipes fashion_scenes_seg_lite0 fashion_scenes_det_lite0 --random-init
    python -m bench.recipes fashion_scenes_multilabel_lite0 --random-init

Each recipe runs on its benchmark folder (built here when missing) and reports its headline metric: test
top-1 for Fashion-MNIST, test mIoU for segmentation, test mAP@.5 for detection and test macro mAP for
which garments each scene shows (multi-label).

`default` is `transfer train` with no recipe (EfficientNet-Lite0 on the embedded digits). Each run
is a fresh `transfer train` process, so the figures include everything a user waits for; the
training wall is the loop's own `train_seconds` (epochs plus per-epoch validation), and `wall` is the
whole command, start-up, data indexing and final evaluation included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from bench.fashion_mnist import build_fashion_folder
from bench.fashion_scenes import build_scene_labels, build_scenes

REPO = Path(__file__).resolve().parent.parent
FASHION = REPO / "bench" / "data" / "fashion_mnist_100"
SCENES = REPO / "bench" / "data" / "fashion_scenes"
# recipe name prefix → (data folder, its builder, the metric reported, how the table names the data)
BENCHMARKS = {
    "fashion_mnist": (FASHION, build_fashion_folder, "test/top1", "Fashion-MNIST 100/class"),
    "fashion_scenes_seg": (SCENES, build_scenes, "test/miou", "Fashion scenes 1,000/300, mIoU"),
    "fashion_scenes_det": (SCENES, build_scenes, "test/map50", "Fashion scenes 1,000/300, mAP@.5"),
    "fashion_scenes_multilabel": (SCENES / "multilabel.csv", build_scene_labels, "test/map_macro",
                                  "Fashion scenes 1,000/300, garments shown, macro mAP"),
}
DIGITS = (None, None, "test/top1", "digits (embedded)")


def benchmark(recipe: str) -> tuple:
    return next((value for prefix, value in BENCHMARKS.items() if recipe.startswith(prefix)), DIGITS)


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "cpu")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores}-core {model}"


def run(recipe: str, seed: int, extra: list[str], out_root: Path) -> dict:
    run_dir = out_root / f"{recipe}-seed{seed}-{int(time.time())}"
    command = [sys.executable, "-m", "transfer", "train", f"seed={seed}", f"hydra.run.dir={run_dir}",
               "trainer.progress=off", *extra]
    root, _, metric, _ = benchmark(recipe)
    if recipe != "default":
        command.insert(4, f"recipe={recipe}")
    if root is not None:
        command.append(f"data.root={root}")
    started, load = time.perf_counter(), os.getloadavg()[0]
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"score": metrics[metric], "train_seconds": metrics["train_seconds"], "wall": wall,
            "load": (load + os.getloadavg()[0]) / 2}  # 1-minute load average at start and end: > cores = shared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--random-init", action="store_true",
                        help="also run each recipe with model.pretrained=false (same budget) for the same table")
    arguments, extra = parser.parse_known_args()
    # argparse hands overrides after `--` to the recipes list: an item with `=` is an override, not a recipe
    extra = [item for item in extra + arguments.recipes if "=" in item]
    arguments.recipes = [item for item in arguments.recipes if "=" not in item]
    for recipe in arguments.recipes:
        root, build, _, _ = benchmark(recipe)
        if build is not None:
            build(root)
    where, today = machine(), date.today().isoformat()
    variants = [extra, extra + ["model.pretrained=false"]] if arguments.random_init else [extra]
    for recipe in arguments.recipes:
        for overrides in variants:
            results = [run(recipe, seed, overrides, arguments.out) for seed in arguments.seeds]
            for seed, result in zip(arguments.seeds, results):
                print(f"{recipe} seed={seed} {' '.join(overrides)} score={result['score']:.4f} "
                      f"train={result['train_seconds']:.1f}s wall={result['wall']:.1f}s load={result['load']:.1f}",
                      flush=True)
            print(table_row(recipe, overrides, results, where, today), flush=True)


def table_row(recipe: str, extra: list[str], results: list[dict], where: str, today: str) -> str:
    tops = [r["score"] * 100 for r in results]
    spread = f" ± {statistics.stdev(tops):.1f}" if len(tops) > 1 else ""
    data = benchmark(recipe)[3]
    name = recipe + (f" {' '.join(extra)}" if extra else "")
    train = statistics.mean(r["train_seconds"] for r in results)
    return (f"| {name} | {data} | {statistics.mean(tops):.1f}%{spread} (n={len(tops)}) | {train:.0f} s | "
            f"{where} | {today} |")


if __name__ == "__main__":
    main()

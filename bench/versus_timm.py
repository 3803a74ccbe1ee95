"""transfer against timm's own train.py, same job, same folder, same machine, one run of this script:

    python -m bench.versus_timm                 # Fashion-MNIST-1k, Lite0 at 64 px, 10 epochs (../shared/bench)
    python -m bench.versus_timm --epochs 3      # a shorter check

timm's `train.py` (../shared/bench/timm_train.py, unchanged) runs with the flags of ../shared/bench/README.md:
ImageNet Lite0 weights (the weights package, converted to timm's layout), 64 px, batch 64, AdamW 1e-3, cosine,
and it evaluates the 2,000 test images after every epoch. transfer runs `recipe=fashion_mnist_lite0` at the same
size and epochs with the same 2,000 images as its val split, so both do the same work. Both are timed as whole
commands (interpreter start to exit). The compute-only floor is the same number of training steps and evaluation
forward passes on batches already in memory (bench/throughput.py's compute blocks): no tool can go below it on
this machine. Accuracy is each tool's best epoch on those 2,000 images (timm's "Best metric"), the same
measure for both; it is not a test figure. Run it with the cores otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from bench.fashion_mnist import build_fashion_folder
from bench.recipes import FASHION, REPO, machine

TIMM_TRAIN = REPO.parent / "shared" / "bench" / "timm_train.py"
VIEW = REPO / "bench" / "data" / "fashion_mnist_100_timm"  # train/ and validation/ (= test/), timm's split names
WEIGHTS = REPO / "bench" / "data" / "tf_efficientnet_lite0.safetensors"


def timm_folder() -> Path:
    VIEW.mkdir(parents=True, exist_ok=True)
    for name, target in (("train", "train"), ("validation", "test")):
        link = VIEW / name
        if not link.exists():
            link.symlink_to(FASHION / target, target_is_directory=True)
    return VIEW


def lite0_weights() -> Path:
    """The weights package's ImageNet Lite0 in timm's layout, as timm's --pretrained-path reads it."""
    if not WEIGHTS.exists():
        from safetensors.torch import save_file

        from transfer.models.converters import load_package_state_dict

        save_file({k: v.contiguous() for k, v in load_package_state_dict("tf_efficientnet_lite0").items()},
                  str(WEIGHTS))
    return WEIGHTS


def timed(command: list[str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "w") as handle:
        subprocess.run(command, check=True, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    return time.perf_counter() - started


def run_timm(folder: Path, epochs: int, out: Path) -> tuple[float, float]:
    """(wall seconds, best top-1 in [0, 1]) of timm's train.py."""
    command = [sys.executable, str(TIMM_TRAIN), str(folder), "--device", "cpu", "--train-split", "train",
               "--val-split", "validation", "--model", "tf_efficientnet_lite0", "--num-classes", "10",
               "--input-size", "3", "64", "64", "-b", "64", "--epochs", str(epochs), "--opt", "adamw", "--lr", "1e-3",
               "--weight-decay", "0.05", "--sched", "cosine", "--warmup-epochs", "1", "--smoothing", "0.1",
               "--channels-last", "-j", "2", "--no-prefetcher", "--mean", "0.5", "0.5", "0.5", "--std", "0.5",
               "0.5", "0.5", "--pretrained", "--pretrained-path", str(lite0_weights()), "--output", str(out)]
    log = out / "timm.log"
    wall = timed(command, log)
    best = re.findall(r"Best metric: ([0-9.]+)", log.read_text())
    return wall, float(best[-1]) / 100


def run_transfer(folder: Path, epochs: int, out: Path) -> tuple[float, float, float, float]:
    """(wall seconds, training-loop seconds, best val top-1, start-up seconds: command to first step)."""
    run_dir = out / "transfer"
    command = [sys.executable, "-m", "transfer", "train", "recipe=fashion_mnist_lite0", f"data.root={folder}",
               "data.test_fraction=0", "preprocess.input_size=64", f"trainer.epochs={epochs}", "trainer.progress=off",
               f"hydra.run.dir={run_dir}"]
    wall = timed(command, out / "transfer.log")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return wall, metrics["train_seconds"], metrics["val/top1"], metrics.get("startup_seconds", float("nan"))


def compute_floor(epochs: int) -> float:
    """Seconds of the same training steps and evaluation passes on batches already in memory."""
    from bench.throughput import measure, parse

    args, _ = parse(["--size", "64", "--batch", "64", "--augment", "flip_crop",  # eval batch: the config's, as transfer
                     "--rounds", "1"])
    result = measure(args, [])
    train, evaluation = result["train"], result["eval"]
    train_rate = train["compute_n"] / train["compute_s"]
    eval_rate = evaluation["compute_n"] / evaluation["compute_s"]
    return epochs * (1000 / train_rate + 2000 / eval_rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    arguments = parser.parse_args()
    if not TIMM_TRAIN.is_file():
        sys.exit(f"bench.versus_timm: {TIMM_TRAIN} is missing (the shared bench folder beside the repository)")
    build_fashion_folder(FASHION)
    folder = timm_folder()
    out = REPO / "bench" / "out" / f"versus-timm-{int(time.time())}"
    out.mkdir(parents=True)
    load = os.getloadavg()[0]
    timm_wall, timm_top1 = run_timm(folder, arguments.epochs, out)
    ours_wall, ours_loop, ours_top1, ours_startup = run_transfer(folder, arguments.epochs, out)
    floor = compute_floor(arguments.epochs)
    load = (load + os.getloadavg()[0]) / 2
    print(f"Fashion-MNIST-1k, Lite0 64 px, {arguments.epochs} epochs, 2,000 images evaluated after each; "
          f"{machine()}, {date.today().isoformat()}, load average {load:.1f}")
    print("| tool | whole command | best top-1 on the 2,000 images | wall / timm's |\n|---|---|---|---|")
    print(f"| timm `train.py` | {timm_wall:.0f} s | {timm_top1 * 100:.2f}% | 1.00 |")
    print(f"| `transfer train` | {ours_wall:.0f} s (start-up {ours_startup:.1f} s, training loop {ours_loop:.0f} s) | "
          f"{ours_top1 * 100:.2f}% | "
          f"**{ours_wall / timm_wall:.2f}** |")
    print(f"| compute-only floor (same steps and passes, data in memory) | {floor:.0f} s | - | "
          f"{floor / timm_wall:.2f} |")


if __name__ == "__main__":
    main()

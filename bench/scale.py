"""Scale: one training epoch on 1k, 10k and 60k Fashion-MNIST images (60k: its whole training set).

    python -m bench.scale                          # 1000,10000,60000 images, Lite0 at 64 px, data.cache=ram
    python -m bench.scale --sizes 1000,10000 --cache disk

Each size is one `transfer train` command (trainer.epochs=1, no validation split, 100 test images), the way a
user runs it, in its own process, so its peak memory is its own (os.wait4). Printed per size: seconds per
training image (the epoch's training loop / images), the start-up (command to the first training step, of which
building the data, model and loaders; the indexing alone is timed here in-process), the whole command, the
peak resident memory, and the image cache against its budget (the run's own line). What to look for: seconds
per image flat, start-up growing linearly with a small constant, memory within the cache budget. Run it with
the cores otherwise idle; the load average is printed beside the figures. The folders (PNGs, as a user's files)
are built under bench/data/ on first use: 60k PNGs take a minute or two.
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
from bench.recipes import REPO, machine

TEST_PER_CLASS = 10


def folder(images: int) -> Path:
    """bench/data/fashion_mnist_scale_N: N training images (N/10 per class), 100 test images."""
    return build_fashion_folder(REPO / "bench" / "data" / f"fashion_mnist_scale_{images}", images // 10,
                                TEST_PER_CLASS)


def indexing_seconds(root: Path) -> float:
    """Listing the folder into labelled records, as training does first (nothing decoded)."""
    from omegaconf import OmegaConf

    from transfer.data.loaders import index_data

    started = time.perf_counter()
    index_data(OmegaConf.create({"root": str(root), "cache": "ram", "on_bad_image": "skip", "val_fraction": 0,
                                 "test_fraction": 0, "split_seed": 0}))
    return time.perf_counter() - started


def run_one(root: Path, out: Path, args: argparse.Namespace) -> dict:
    """One `transfer train` of one epoch: its wall, peak memory, log and metrics."""
    command = [sys.executable, "-m", "transfer", "train", f"data.root={root}", "data.val_fraction=0",
               f"data.cache={args.cache}", f"preprocess.input_size={args.size}", "trainer.epochs=1",
               "trainer.progress=off", f"hydra.run.dir={out}", *args.overrides]
    log = out.parent / f"{out.name}.log"
    started = time.perf_counter()
    with open(log, "w") as handle:
        child = subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"bench.scale: {' '.join(command)} failed; see {log}")
    text = log.read_text()
    setup = re.search(r"data, model and loaders ([0-9.]+)s", text)
    cache = next((line.strip() for line in text.splitlines() if line.startswith("data.cache")), "no cache line")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall": wall, "peak_mb": usage.ru_maxrss / 1024, "train": metrics["train_seconds"],
            "startup": metrics.get("startup_seconds", float("nan")),
            "setup": float(setup[1]) if setup else float("nan"),
            "cache": cache}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,60000", help="training images, comma-separated (≤ 60000)")
    parser.add_argument("--size", type=int, default=64, help="input side in pixels")
    parser.add_argument("--cache", default="ram", help="data.cache: none | ram | disk")
    parser.add_argument("overrides", nargs="*", help="more `transfer train` overrides (e.g. model.name=...)")
    args = parser.parse_args(argv)
    out = REPO / "bench" / "out" / f"scale-{int(time.time())}"
    out.mkdir(parents=True)
    print(f"one epoch, Lite0 (recipe defaults) at {args.size} px, data.cache={args.cache}; {machine()}, "
          f"{date.today().isoformat()}", flush=True)
    print("| training images | s / image (training loop) | start-up (of which data, model, loaders; indexing) | "
          "whole command | peak memory | cache | load |\n|---|---|---|---|---|---|---|", flush=True)
    for images in (int(text) for text in args.sizes.split(",")):
        root = folder(images)
        before = os.getloadavg()[0]
        indexing = indexing_seconds(root)
        result = run_one(root, out / str(images), args)
        print(f"| {images:,} | {result['train'] / images * 1000:.2f} ms | {result['startup']:.1f} s "
              f"({result['setup']:.1f} s; "
              f"{indexing:.2f} s) | {result['wall']:.0f} s | {result['peak_mb']:,.0f} MB | {result['cache']} | "
              f"{before:.1f} -> {os.getloadavg()[0]:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

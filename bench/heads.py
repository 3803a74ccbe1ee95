"""Every detector and every segmentation decoder on the Fashion scenes, pretrained and from random init, at
one budget each, and the README's table of them (issue 17: pretrained must beat random init by >= 5 points
for every detector and decoder).

    python -m bench.heads --epochs 4                      # the whole dense table: 3 detectors + 5 decoders, x2
    python -m bench.heads --epochs 1 --inits pretrained   # one epoch each: what an epoch costs per head
    python -m bench.heads --epochs 1 --detectors retinanet --decoders --inits random   # one variant
    python -m bench.heads --epochs 4 -- data.batch_size=16    # extra overrides after -- go to every run

Each run is a fresh `transfer train recipe=fashion_scenes_{det,seg}_lite0 task.detector=D | task.decoder=D
trainer.epochs=E` process on the scenes (built when missing), on the recipe's own splits: validation carved
from train picks best.pt, the test split is read once, at the end. The budget (--epochs) is the same for
every head and both inits, and is printed with the table; the recipes' own budgets are 8 (detection) and
12 (segmentation) epochs. `train` is the loop's train_seconds (epochs plus per-epoch validation); `wall`,
printed per run, is the whole command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from bench.fashion_scenes import build_scenes
from bench.recipes import REPO, SCENES, machine

DETECTORS = ("fcos", "retinanet", "faster_rcnn")
DECODERS = ("fpn", "unet", "deeplabv3plus", "linknet", "upernet")
INITS = {"pretrained": [], "random": ["model.pretrained=false"]}


@dataclass
class Head:
    """One row's model: which recipe, which key chooses the head, which metrics the table shows."""

    recipe: str
    key: str
    name: str
    metrics: tuple[str, ...]


def heads(detectors: list[str], decoders: list[str]) -> list[Head]:
    return ([Head("fashion_scenes_det_lite0", "task.detector", d, ("test/map", "test/map50")) for d in detectors] +
            [Head("fashion_scenes_seg_lite0", "task.decoder", d, ("test/miou",)) for d in decoders])


def run(head: Head, init: str, epochs: int, seed: int, extra: list[str], out: Path) -> dict:
    """One `transfer train` process; its test metrics, train_seconds and whole-command wall."""
    run_dir = out / f"{head.name}-{init}-e{epochs}-seed{seed}-{int(time.time())}"
    command = [sys.executable, "-m", "transfer", "train", f"recipe={head.recipe}", f"{head.key}={head.name}",
               f"trainer.epochs={epochs}", f"seed={seed}", f"data.root={SCENES}", "trainer.progress=off",
               f"hydra.run.dir={run_dir}", *INITS[init], *extra]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {**{name: metrics[name] for name in head.metrics}, "train_seconds": metrics["train_seconds"],
            "wall": time.perf_counter() - started, "epochs": epochs}


def row(head: Head, init: str, result: dict, where: str, today: str) -> str:
    """| task | head | init | mAP | mAP@.5 | mIoU | train | machine | date |"""
    cells = [f"{result[name] * 100:.1f}%" if name in result else "" for name in ("test/map", "test/map50",
                                                                                   "test/miou")]
    task = "detection" if head.key == "task.detector" else "segmentation"
    return (f"| {task} | {head.name} | {init} | {' | '.join(cells)} | {result['train_seconds']:.0f} s "
            f"({result['train_seconds'] / result['epochs']:.0f} s/epoch) | {where} | {today} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, required=True, help="the budget: trainer.epochs of every run")
    parser.add_argument("--detectors", nargs="*", default=list(DETECTORS), choices=DETECTORS)
    parser.add_argument("--decoders", nargs="*", default=list(DECODERS), choices=DECODERS)
    parser.add_argument("--inits", nargs="+", default=list(INITS), choices=list(INITS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "heads")
    arguments, extra = parser.parse_known_args()
    extra = [item for item in extra if item != "--"]
    build_scenes(SCENES)
    where, today = machine(), date.today().isoformat()
    print(f"budget: {arguments.epochs} epoch(s) per run, seed {arguments.seed}, recipes' other settings"
          f"{' + ' + ' '.join(extra) if extra else ''}; {where}, load {os.getloadavg()[0]:.1f} at start", flush=True)
    lines = ["| task | head | init | mAP | mAP@.5 | mIoU | train | machine | date |", "|---" * 9 + "|"]
    for head in heads(arguments.detectors, arguments.decoders):
        for init in arguments.inits:
            result = run(head, init, arguments.epochs, arguments.seed, extra, arguments.out)
            print(f"{head.name} {init}: " + " ".join(f"{k}={v:.4f}" for k, v in result.items() if k.startswith("test/"))
                  + f" train={result['train_seconds']:.1f}s wall={result['wall']:.1f}s load={os.getloadavg()[0]:.1f}",
                  flush=True)
            lines.append(row(head, init, result, where, today))
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()

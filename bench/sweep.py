"""An Optuna search on Fashion-MNIST-1k against the best hand-made recipe, both on this machine in one run:

    python -m bench.sweep                    # 16 trials, 8 epochs each, median pruning; then the recipe

The sweep searches learning rate (log), layer decay, mixup and input size over `fashion_mnist_lite0` with
200 of the 1,000 training images held out for validation (`data.val_fraction=0.2`): every choice is made on
them, and only the best trial meets the test split, once. `fashion_mnist_lite0_best` (20 epochs, mixup/cutmix,
EMA, all 1,000 images) then trains from the same command. Printed: the sweep's wall and trial
counts, and one results row each. Run it with the cores otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from bench.fashion_mnist import build_fashion_folder
from bench.recipes import FASHION, REPO, machine, run

SPACE = ["optim.lr=tag(log, interval(3e-4, 1e-2))", "optim.layer_decay=interval(0.6, 1.0)",
         "mixup=choice(none, mixup)", "preprocess.input_size=choice(48, 64, 80)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / f"sweep-{int(time.time())}")
    parser.add_argument("--skip-recipe", action="store_true")
    arguments = parser.parse_args()
    build_fashion_folder(FASHION)
    command = [sys.executable, "-m", "transfer", "sweep", "recipe=fashion_mnist_lite0", f"data.root={FASHION}",
               "data.val_fraction=0.2", f"trainer.epochs={arguments.epochs}", "trainer.progress=off",
               f"hydra.sweep.dir={arguments.out}", f"trials={arguments.trials}", "warmup_epochs=2", *SPACE]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    best = json.loads((arguments.out / "best.json").read_text())
    with open(arguments.out / "trials.csv") as handle:
        states = [line.split(",")[1] for line in handle.read().splitlines()[1:]]
    where, today = machine(), date.today().isoformat()
    print(f"sweep: {len(states)} trials ({states.count('complete')} complete, {states.count('pruned')} pruned) in "
          f"{wall / 60:.1f} min; best trial {best['trial']}: val/top1 {best['value']:.4f}, {best['params']}",
          flush=True)
    rows = [f"| sweep best (trial {best['trial']}: "
            f"{', '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}' for k, v in best['params'].items())}, "
            f"{arguments.epochs} epochs, 800 train images) | Fashion-MNIST, 100 / 200 per class | "
            f"{best['test']['test/top1'] * 100:.1f}% | {wall:.0f} s for the whole sweep | {where} | {today} |"]
    if not arguments.skip_recipe:
        result = run("fashion_mnist_lite0_best", 0, [], REPO / "bench" / "out")
        rows.append(f"| fashion_mnist_lite0_best (20 epochs, 1,000 train images) | Fashion-MNIST, 100 / 200 per class | "
                    f"{result['score'] * 100:.1f}% | {result['train_seconds']:.0f} s ({result['wall']:.0f} s whole "
                    f"command) | {where} | {today} |")
    print("\n| recipe | data | test top-1 | wall | machine | date |\n|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

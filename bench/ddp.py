"""Two data-parallel processes against one, on the same recipe, data and seed, in one run of this script:

    python -m bench.ddp                          # fashion_mnist_lite0: 1 × batch 64 against 2 × batch 32
    python -m bench.ddp --recipe default --batch 64

The two runs see the same effective batch per update (one process × 2B against two processes × B) and the
same learning rate and schedule; they differ in how BatchNorm sees the batch (two halves, statistics
averaged after each epoch, against one whole batch), in the random streams of augmentation and dropout
(one per process) and in the threads (one process with every core against one core each). Each row gives
the final test top-1 (the test split evaluated once, at the end) and the walls; run it with the cores
otherwise idle.
"""

from __future__ import annotations

import argparse
from datetime import date

from bench.recipes import FASHION, benchmark, machine, run
from bench.fashion_mnist import build_fashion_folder
from bench.recipes import REPO


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="fashion_mnist_lite0")
    parser.add_argument("--batch", type=int, default=32, help="the per-process batch of the two-process run")
    parser.add_argument("--seed", type=int, default=0)
    arguments, extra = parser.parse_known_args()
    extra = [item for item in extra if item != "--"]
    if arguments.recipe.startswith("fashion_mnist"):
        build_fashion_folder(FASHION)
    batch = arguments.batch
    variants = {f"1 process × batch {2 * batch}": [f"data.batch_size={2 * batch}"],
                f"2 processes × batch {batch}": [f"data.batch_size={batch}", "trainer.processes=2"]}
    where, today, data = machine(), date.today().isoformat(), benchmark(arguments.recipe)[3]
    rows = []
    for name, overrides in variants.items():
        result = run(arguments.recipe, arguments.seed, [*extra, *overrides], REPO / "bench" / "out")
        rows.append(f"| {arguments.recipe} | {name} | {data} | {result['score'] * 100:.1f}% | "
                    f"{result['train_seconds']:.0f} s ({result['wall']:.0f} s whole command) | {where} | {today} |")
        print(rows[-1], flush=True)
    print("\n| recipe | processes × batch | data | test top-1 | training wall | machine | date |\n|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

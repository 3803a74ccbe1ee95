"""Every row of the README's Results section, one command: the validation choices, the recipes (and the
same budgets from random init), the baseline and the dense heads, in the order the README shows them.

    python -m bench.results              # all of it: several hours on a 2-core CPU
    python -m bench.results --dry-run    # the commands it runs, one per line
    python -m bench.results recipes heads  # some of the groups

Each group is one of the bench commands below, run as its own process so its figures are the ones that
command prints; run it with the cores otherwise idle when the walls matter (the accuracies do not depend on it).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from bench.recipes import REPO

FASHION = ["default", "fashion_mnist_lite0", "fashion_mnist_lite0_linear_probe", "fashion_mnist_lite0_best"]
SCENES = ["fashion_scenes_seg_lite0", "fashion_scenes_det_lite0", "fashion_scenes_multilabel_lite0"]
GROUPS: dict[str, list[list[str]]] = {
    "choices": [["bench.choices"]],
    "recipes": [["bench.recipes", *FASHION],
                ["bench.recipes", "fashion_mnist_lite0_best", "--", "model.pretrained=false"],
                ["bench.recipes", *SCENES, "--random-init"]],
    "baselines": [["bench.baselines"]],
    "heads": [["bench.heads", "--epochs", "2", "--decoders", "fpn", "unet", "deeplabv3plus"],
              ["bench.heads", "--epochs", "5", "--detectors", "--decoders", "unet", "--", "task.decoder_channels=256"],
              ["bench.heads", "--epochs", "5", "--detectors", "--decoders", "linknet", "upernet"]],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="*", help=f"some of {', '.join(GROUPS)} (default: all, in that order)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    arguments = parser.parse_args(argv)
    unknown = sorted(set(arguments.groups) - set(GROUPS))
    if unknown:
        parser.error(f"unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    for group in arguments.groups or GROUPS:
        for command in GROUPS[group]:
            line = [sys.executable, "-m", *command]
            print("$ python -m " + " ".join(command), flush=True)
            if not arguments.dry_run:
                subprocess.run(line, check=True, cwd=REPO)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

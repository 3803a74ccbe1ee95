"""Same pixels everywhere, on photo-sized JPEGs cut from real photos (bench/sample_photos.py, 500-1000 px):

    python -m bench.pixels                  # EfficientNet-Lite0 (ImageNet weights, offline), 224 px, 3 epochs

Fine-tunes the default model on the photos, then, with the commands a user runs: `transfer eval` of the test
split with data.cache=none, ram and disk; `transfer predict` on the same files; `transfer export format=timm`
loaded with `timm.create_model('local-dir:…')` and fed through timm's own `create_transform`. Prints the
metrics of each cache, how many files eval and predict label alike (and the largest probability difference),
and how many the timm export labels as `transfer predict` does. Figures, not timings: any load will do.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from bench.recipes import REPO, machine
from bench.sample_photos import build_sample_photos

PHOTOS = REPO / "bench" / "data" / "sample_photos"


def transfer(*arguments: str) -> None:
    subprocess.run([sys.executable, "-m", "transfer", *arguments], check=True, cwd=REPO, stdout=subprocess.DEVNULL)


def rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as handle:
        return {Path(row["path"]).parent.name + "/" + Path(row["path"]).stem: row for row in csv.DictReader(handle)}


def timm_agreement(export: Path, files: list[Path], predicted: dict[str, dict]) -> tuple[int, float]:
    """(files whose timm label equals transfer predict's, largest probability difference)."""
    import timm
    import torch
    from PIL import Image
    from timm.data import create_transform, resolve_model_data_config

    model = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    transform = create_transform(**resolve_model_data_config(model))
    classes = model.pretrained_cfg.get("label_names") or json.loads((export / "config.json").read_text())["label_names"]
    same, largest = 0, 0.0
    with torch.no_grad():
        for file in files:
            probabilities = model(transform(Image.open(file).convert("RGB"))[None]).softmax(-1)[0]
            row = predicted[file.parent.name + "/" + file.stem]
            best = int(probabilities.argmax())
            same += classes[best] == row["label_1"]
            largest = max(largest, abs(float(probabilities[best]) - float(row["prob_1"])))
    return same, largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=12)
    parser.add_argument("--test-per-class", type=int, default=8)
    arguments = parser.parse_args()
    photos = build_sample_photos(PHOTOS, arguments.per_class, arguments.test_per_class)
    work = Path(tempfile.mkdtemp(prefix="pixels-", dir=REPO / "bench" / "out"))
    run = work / "run"
    transfer("train", f"data.root={photos}", f"trainer.epochs={arguments.epochs}", "data.batch_size=16",
             "trainer.progress=off", f"hydra.run.dir={run}")
    metrics = {}
    for cache in ("none", "ram", "disk"):
        transfer("eval", f"checkpoint={run}", "split=test", f"data.cache={cache}", f"data.cache_dir={work / 'cache'}",
                 f"out={work / cache}")
        metrics[cache] = json.loads((work / cache / "metrics.json").read_text())
    transfer("predict", f"checkpoint={run}", f"input={photos / 'test'}", f"out={work / 'predict.csv'}", "top_k=1")
    transfer("export", f"checkpoint={run}", "format=timm", f"out={work / 'timm'}")
    evaluated, predicted = rows(work / "none" / "test_predictions.csv"), rows(work / "predict.csv")
    labelled_alike = sum(predicted[key]["label_1"] == row["predicted"] for key, row in evaluated.items())
    largest = max(abs(float(predicted[key]["prob_1"]) - float(row["probability"])) for key, row in evaluated.items())
    files = sorted((photos / "test").rglob("*.jpg"))
    timm_same, timm_largest = timm_agreement(work / "timm", files, predicted)
    print(f"photo-sized JPEGs: {len(files)} test files; {machine()}, {date.today().isoformat()}")
    print("| check | result |\n|---|---|")
    for cache in ("none", "ram", "disk"):
        shown = ", ".join(f"{key.split('/')[1]} {metrics[cache][key]:.4f}" for key in ("test/top1", "test/loss"))
        print(f"| `transfer eval` test split, data.cache={cache} | {shown} |")
    same = all(metrics[cache] == metrics["none"] for cache in ("ram", "disk"))
    print(f"| eval metrics equal across the three caches | {'yes' if same else 'NO'} |")
    print(f"| `transfer eval` and `transfer predict` give the same label | {labelled_alike}/{len(evaluated)} files, "
          f"largest probability difference {largest:.1e} |")
    print(f"| timm export + timm's `create_transform` gives `transfer predict`'s label | {timm_same}/{len(files)} "
          f"files ({100 * timm_same / len(files):.1f}%), largest probability difference {timm_largest:.1e} |")
    print(f"(run directory: {run})")


if __name__ == "__main__":
    main()

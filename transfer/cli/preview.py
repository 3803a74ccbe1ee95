"""`transfer augment-preview [train overrides ...] [out=augment_preview.png] [n=16]`: a grid of training
images through the run's own augmentation (classification data)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from transfer.cli.options import output_file, positive_int, split_options
from transfer.config import compose
from transfer.data.loaders import build_datasets, index_data
from transfer.data.sources import DataSplits
from transfer.errors import UserError
from transfer.files import save_figure
from transfer.tasks import build_task

PREVIEW_KEYS = ("out", "n")


def preview_command(arguments: list[str]) -> int:
    """`transfer augment-preview [train overrides ...] [out=augment_preview.png] [n=16]`."""
    options, overrides = split_options(arguments, PREVIEW_KEYS)
    n = positive_int(options, "n", 16, most=256)
    out = output_file(options.get("out") or "augment_preview.png", "augment_preview.png")
    cfg = compose(overrides)
    splits = index_data(cfg.data)
    preprocess = build_task("classification").preprocess(cfg)  # what `transfer train` would record
    steps = OmegaConf.to_container(cfg.augment.train, resolve=True)
    samples, skipped = augmented_samples(splits, cfg, preprocess, steps, n)
    height, width = preprocess["input_size"][1:]
    caption = f"{' → '.join(step_names(steps)) or 'no augmentation'} → {height}×{width} (seed {cfg.seed})"
    draw_grid([image for image, _ in samples], [splits.classes[label] for _, label in samples], out, caption)
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable image(s): {skipped[0][0]}: {skipped[0][1]}")
    print(f"wrote {len(samples)} augmented training images to {out}")
    return 0


def augmented_samples(splits: DataSplits, cfg: DictConfig, preprocess: dict, steps: list[dict],
                      n: int) -> tuple[list[tuple[np.ndarray, int]], list[tuple[str, str]]]:
    """n training images chosen with the run's seed, through training's own dataset code (so the
    RAM cache's shrinking, which changes what a random crop sees, is included)."""
    train = splits.splits["train"]
    chosen = np.random.default_rng(cfg.seed).permutation(len(train))[:n]
    subset = DataSplits(splits.classes, {"train": [train[i] for i in chosen]}, [], splits.description)
    built = build_datasets(subset, cfg.data, preprocess, steps, cfg.seed)
    dataset, samples, skipped = built.datasets["train"], [], list(built.skipped)
    for index in range(len(dataset)):
        item = dataset[index]
        if isinstance(item, dict):
            samples.append((item["image"].permute(1, 2, 0).numpy(), int(item["label"])))
        else:
            skipped.append((item[1], item[2]))
    if not samples:
        raise UserError(f"none of the {len(chosen)} chosen training images could be read.")
    return samples, skipped


def step_names(steps: list[dict]) -> list[str]:
    return [str(step.get("_target_", "?")).rsplit(".", 1)[-1] for step in steps]


def draw_grid(images: list[np.ndarray], titles: list[str], path: Path, caption: str) -> None:
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    figure = Figure(figsize=(2.0 * columns, 2.0 * rows + 0.5))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, title in zip(axes.flat, images, titles):
        axis.imshow(image)
        axis.set_title(title, fontsize=9)
    figure.suptitle(caption, fontsize=9)
    figure.tight_layout()
    try:
        save_figure(figure, path)
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror}. Choose another out=.") from None

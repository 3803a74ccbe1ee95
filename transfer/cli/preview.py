"""`transfer augment-preview [train overrides ...] [out=augment_preview.png] [n=16]`: a grid of training
images through the run's own augmentation (classification data)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from transfer.cli.options import output_file, positive_int, split_options
from transfer.config import compose
from transfer.errors import UserError
from transfer.files import save_figure
from transfer.tasks import build_task

PREVIEW_KEYS = ("out", "n")


def preview_command(arguments: list[str]) -> int:
    """`transfer augment-preview [train overrides ...] [out=augment_preview.png] [n=16]`: n training samples of
    any task, chosen with the run's seed, through training's own dataset code; masks and boxes drawn on them."""
    options, overrides = split_options(arguments, PREVIEW_KEYS)
    n = positive_int(options, "n", 16, most=256)
    out = output_file(options.get("out") or "augment_preview.png", "augment_preview.png")
    cfg = compose(overrides)
    task = build_task(cfg.task.name)
    task.check_config(cfg)
    preprocess = task.preprocess(cfg)  # what `transfer train` would record
    dataset, skipped = task.preview_dataset(cfg, preprocess, n)
    chosen = np.random.default_rng(cfg.seed).permutation(len(dataset))[:n]
    pictures = []
    for index in chosen:
        item = dataset[(0, int(index))]
        if isinstance(item, dict):
            pictures.append(task.picture(item))
        else:
            skipped.append((item[1], item[2]))
    if not pictures:
        raise UserError(f"none of the {len(chosen)} chosen training images could be read.")
    steps = OmegaConf.to_container(cfg.augment.train, resolve=True)
    height, width = preprocess["input_size"][1:]
    caption = f"{' → '.join(step_names(steps)) or 'no augmentation'} → {height}×{width} (seed {cfg.seed})"
    draw_grid([image for image, _ in pictures], [title for _, title in pictures], out, caption)
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable image(s): {skipped[0][0]}: {skipped[0][1]}")
    print(f"wrote {len(pictures)} augmented training images to {out}")
    return 0


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

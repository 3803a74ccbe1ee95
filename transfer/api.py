"""The Python API: the commands' powers as functions, for notebooks and other projects.

    run = transfer.train(["data.root=/my/images", "trainer.epochs=5"], run_dir="runs/mine")
    run.metrics["test/top1"]
    model = transfer.load(run.best)          # or a run directory
    model.predict(["a.jpg", numpy_image])    # classification: [{label: probability}] best first
    transfer.export(run.best, "timm", "exports/mine")
    transfer.report(run.run_dir)             # rebuild RUN/report.html
    transfer.runs("runs")                    # every run below a folder: task, model, overrides, metrics, status
    transfer.compare("runs/a", "runs/b")     # overrides, config keys and metrics (B - A) that differ

Configs are composed exactly as `transfer train` composes them (same groups, recipes, overrides), so a run
made here reruns with `transfer train --config RUN/config.yaml`. Mistakes raise `transfer.errors.UserError`
with the same one-line message the CLI prints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transfer.checkpoint import load_checkpoint
from transfer.cli.train import compose_run, train_shared
from transfer.data.images import read_rgb
from transfer.engine.inference import Loaded, load_for_inference
from transfer.engine.report import write_html_report
from transfer.engine.rundir import make_run_dir
from transfer.engine.runs import compare_runs, find_runs
from transfer.exports import FORMATS, export as export_format, load_source

__all__ = ["Model", "Run", "compare", "export", "load", "predict", "report", "runs", "train"]


@dataclass
class Run:
    """A finished run: its folder and final metrics."""

    run_dir: Path
    metrics: dict[str, float]

    @property
    def best(self) -> Path:
        return self.run_dir / "best.pt"

    @property
    def last(self) -> Path:
        return self.run_dir / "last.pt"


def train(overrides: list[str] | None = None, run_dir: str | Path | None = None,
          config_file: str | Path | None = None) -> Run:
    """Compose `overrides` as the CLI does (optionally on top of a saved run's config.yaml) and train into
    `run_dir` (default: runs/<timestamp>, made fresh)."""
    composed, record = compose_run(list(overrides or []), None if config_file is None else str(config_file))
    chosen = run_dir is not None
    folder = Path(run_dir) if chosen else Path("runs") / time.strftime("%Y-%m-%d_%H-%M-%S")
    # under torchrun, rank 0 makes the folder for all
    return Run(*train_shared(composed, lambda: make_run_dir(folder, chosen, composed.trainer.get("resume")), record))


class Model:
    """A fine-tuned checkpoint ready to run: `module` (a torch module in eval mode), its `classes`, the
    `preprocess` it was trained with, and `predict` on files or arrays through the run's own pixels."""

    def __init__(self, loaded: Loaded) -> None:
        self.loaded = loaded
        self.module, self.classes, self.preprocess = loaded.model, loaded.classes, loaded.preprocess
        self.task = loaded.task.name

    def predict(self, images: list, batch_size: int = 64) -> list:
        """Per image: classification {label: probability} sorted best first; multilabel {"labels": [names],
        "scores": {label: probability}}; segmentation an H×W class-index mask; detection {"boxes" xyxy in the
        image's pixels, "scores", "labels" (names)}."""
        arrays = [read_rgb(str(image)) if isinstance(image, (str, Path)) else np.asarray(image) for image in images]
        outputs = []
        for start in range(0, len(arrays), batch_size):
            outputs += self.loaded.task.predict(self.module, arrays[start:start + batch_size], self.loaded.runtime)
        if self.task == "classification":
            return [dict(sorted(zip(self.classes, map(float, row)), key=lambda item: -item[1])) for row in outputs]
        if self.task == "multilabel":  # the classes at or above their tuned thresholds, and every class's probability
            return [self.loaded.task.labelled(scores) for scores in outputs]
        if self.task == "detection":
            return [{"boxes": out["boxes"].numpy(), "scores": out["scores"].numpy(),
                     "labels": [self.classes[int(label) - 1] for label in out["labels"]]} for out in outputs]
        return outputs


def load(checkpoint: str | Path, device: str | torch.device = "auto") -> Model:
    """A run's checkpoint (or a run directory: its best.pt) as a ready `Model`."""
    path = Path(checkpoint).expanduser()
    return Model(load_for_inference(load_checkpoint(path / "best.pt" if path.is_dir() else path), device))


def predict(checkpoint: str | Path, images: list, device: str | torch.device = "auto") -> list:
    """`load(checkpoint).predict(images)` in one call."""
    return load(checkpoint, device).predict(images)


def export(checkpoint: str | Path, format: str, out: str | Path, weights: str = "auto",
           overwrite: bool = False) -> Path:
    """Write one export format (see `transfer.exports.FORMATS`) of a checkpoint to the folder `out`, checked by a
    round trip before it appears; returns the folder."""
    if format not in FORMATS:
        raise ValueError(f"format={format}: choose one of {', '.join(FORMATS)}")
    path = Path(checkpoint).expanduser()
    source = load_source(path / "best.pt" if path.is_dir() else path, weights)
    export_format(source, format, Path(out).absolute(), overwrite=overwrite)
    return Path(out)


def report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Rebuild a run's report.html (or write it to `out`) from its run directory alone; returns the page's path."""
    return write_html_report(Path(run_dir).expanduser(), out)


def runs(folder: str | Path = "runs") -> list[dict]:
    """Every run below `folder` (multirun and sweep folders included), as `transfer runs` lists them: run (its path
    below `folder`), status (done, running, stopped), task, model, recipe, overrides, monitor, best (the monitored
    metric's value), test (the same metric on the test split), epochs, time (seconds of training), date (its
    start), path, and metrics (its whole metrics.json; {} until it finishes)."""
    return find_runs(folder)


def compare(a: str | Path, b: str | Path) -> dict:
    """What differs between two run directories: {"overrides": {key: {"a", "b"}}, "config": {dotted key:
    {"a", "b"}}, "metrics": {name: {"a", "b", "difference": b - a}} (every number both metrics.json hold)};
    None marks a key a run does not have."""
    return compare_runs(a, b)

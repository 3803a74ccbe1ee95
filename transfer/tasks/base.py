"""The protocol between the engine and a task: everything the engine knows about classification, segmentation,
detection or a task still to come.

The engine owns what every task shares (device, precision, seeds, fine-tune plan, timm optimizer and
schedule, accumulation, clipping, EMA, compile, bad steps, early stopping, checkpoints, exact resume, the run
directory). A task brings what differs, through the methods of `Task`:

    preprocess(cfg)                         the model's data config with the user's overrides (from the name)
    build_data(cfg, preprocess)          -> TaskData: classes, a dataset per split, skipped files
    collate(samples)                     -> a batch dict with "index" (good samples) and "skipped"
    build_model(cfg, classes, preprocess) -> (model with .get_classifier(), description of its weights)
    prepare(cfg, data)                      losses that depend on the training data (class weights)
    training_step(model, batch, runtime) -> (loss, {name: sum over the batch}) for train/* metrics
    infer(model, loader, runtime)        -> one process's outputs on its share of a split (picklable)
    score(parts)                         -> Evaluation of all shares' outputs: metrics without split prefix,
                                            skipped files, outputs for reports (evaluate = score([infer]))
    metric_modes(classes)                -> {metric: "max" | "min"}: what trainer.monitor may name
    report(folder, split, evaluation, dataset)  files a split's evaluation leaves (per-class tables, mistakes)
    draw(model, dataset, folder, runtime, count)   pictures of predictions (overlays), if the task has any
    checkpoint_entries() / restore(ckpt)    what eval, predict and export need besides weights and classes
    load_best(ckpt)                         best.pt's entries, before the final evaluation of its weights
    eval_dataset(...)                    -> the split `transfer eval` scores
    preview_dataset(...) / picture(sample)   `transfer augment-preview`
    predict(model, images, runtime) / write_predictions(chunks, out)    `transfer predict` and the API
    compile(model, backend), shortcut(...)  trainer.compile; a cheaper path to the same updates (linear probe)

A fourth task is one module here implementing these, its name in `tasks/__init__.py`, and a config file
`conf/task/NAME.yaml` (whose `_global_` package also sets the shared keys its defaults differ in).
Config keys that do not apply to a task are listed in `Task.unsupported` and refused with one line.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from transfer.data.augment import build_eval_transform
from transfer.data.dataset import collate_skipping_bad
from transfer.errors import UserError
from transfer.models.backbone import check_model_name, resolve_preprocess
from transfer.models.inference import Normalizer, autocast

DIGITS_INPUT_SIZE = 48
NEUTRAL = (None, "none", "auto", False, 0, 0.0)


@dataclass
class TaskData:
    """The data a run trains and evaluates on, in the order the data flows."""

    classes: list[str]
    datasets: dict[str, Dataset]  # "train", and "val" / "test" when there are such splits; each has .records
    skipped: list[tuple[str, str]] = field(default_factory=list)
    description: str = ""


@dataclass
class Evaluation:
    """One split's evaluation: metrics without split prefix, files found unreadable, and what reports draw."""

    metrics: dict[str, float]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    outputs: object = None


@dataclass
class Runtime:
    """Where and how the model runs: the engine decides, tasks follow (the same in train, eval and predict)."""

    device: torch.device
    amp_dtype: torch.dtype | None
    normalize: Normalizer
    mixing: bool = True  # training_step may mix samples (mixup); the LR finder turns it off
    epoch: int = 0
    tta: str = "none"


def check_options(cfg: DictConfig, choice: str, options: dict[str, tuple[str, ...]]) -> None:
    """Refuse, in one line, the keys set (not null) that only other values of the key `choice` read: e.g.
    task.center_sampling_radius (FCOS's) under task.detector=retinanet would otherwise be silently ignored."""
    chosen = OmegaConf.select(cfg, choice)
    refused = [f"{key}={value} (only {'|'.join(readers)})" for key, readers in options.items()
               if chosen not in readers and (value := OmegaConf.select(cfg, key, default=None)) is not None]
    if refused:
        raise UserError(f"{choice}={chosen} does not use {'; '.join(refused)}: set it to null or pick that {choice}.")


class Task:
    """Defaults shared by the tasks; see the module docstring for the protocol."""

    name = ""
    mixed_precision = True  # whether the training step may run under autocast
    find_unused_parameters = False  # DDP: some trainable parameters may get no gradient in a step
    # dotted config key → (values that mean "not used", why the key does not apply to this task)
    unsupported: dict[str, tuple[tuple, str]] = {}

    collate = staticmethod(collate_skipping_bad)  # samples → batch; bad samples become batch["skipped"]

    def check_config(self, cfg: DictConfig) -> None:
        """Refuse, in one line, every key this task cannot honour (never silently ignore one)."""
        refused = [(key, value, why) for key, (neutral, why) in self.unsupported.items()
                   if (value := OmegaConf.select(cfg, key, default=None)) not in neutral + NEUTRAL]
        if refused:
            shown = "; ".join(f"{key}={value}: {why}" for key, value, why in refused)
            raise UserError(f"task={self.name} cannot use {shown}.")

    def preprocess(self, cfg: DictConfig) -> dict:
        """The architecture's pretrained data config (no weights needed) with the user's preprocess.* overrides."""
        overrides = OmegaConf.to_container(cfg.preprocess, resolve=True)
        if cfg.data.root is None and overrides.get("input_size") is None:  # the embedded 8×8 digits
            overrides["input_size"] = DIGITS_INPUT_SIZE
        check_model_name(cfg.model.name)
        return resolve_preprocess(cfg.model.name, **overrides)

    def build_data(self, cfg: DictConfig, preprocess: dict) -> TaskData:
        raise NotImplementedError

    def build_model(self, cfg: DictConfig, classes: list[str], preprocess: dict) -> tuple[nn.Module, str]:
        raise NotImplementedError

    def training_step(self, model: nn.Module, batch: dict, runtime: Runtime) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def infer(self, model: nn.Module, loader, runtime: Runtime) -> object:
        """The model's outputs on `loader`'s samples (one process's share of a split), picklable."""
        raise NotImplementedError

    def score(self, parts: list) -> Evaluation:
        """The metrics of every share's `infer` together: equal to those of one pass over the whole split."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader, runtime: Runtime) -> Evaluation:
        """The metrics of the samples `loader` holds, in this process alone."""
        return self.score([self.infer(model, loader, runtime)])

    def prepare(self, cfg: DictConfig, data: TaskData) -> None:
        """Set up what depends on the training data (nothing by default)."""

    @staticmethod
    def batch_size(batch: dict) -> int:
        return len(batch["index"])

    def metric_modes(self, classes: list[str]) -> dict[str, str]:
        raise NotImplementedError

    def report(self, folder: Path, split: str, evaluation: Evaluation, dataset: Dataset | None = None) -> None:
        """Files one split's evaluation leaves besides metrics.json (none by default); `dataset`, the split's
        images, for pictures of what the model got wrong."""

    def draw(self, model: nn.Module, dataset: Dataset, folder: Path, runtime: Runtime, count: int) -> None:
        """Pictures of the model's predictions on a few images (none by default)."""

    def checkpoint_entries(self) -> dict:
        return {}

    def restore(self, checkpoint: dict) -> None:
        """What predict and export need from a checkpoint besides weights, classes and preprocessing."""

    def load_best(self, checkpoint: dict) -> None:
        """The entries best.pt holds beside its weights, loaded with them before the final evaluation (a task whose
        entries change during training, such as multi-label's tuned thresholds; nothing by default)."""

    def eval_dataset(self, cfg: DictConfig, preprocess: dict, split: str | None, trained_root: str | None,
                     classes: list[str]) -> tuple[str, Dataset, TaskData]:
        """(split, its dataset, the data) for `transfer eval`: the run's data split as training split it (its
        saved data config with the user's data.* overrides); the held-out split asked for, else test, else val."""
        data = self.build_data(cfg, preprocess)
        if list(data.classes) != list(classes):
            raise UserError(f"data.root={cfg.data.root} names the classes {list(data.classes)}; the checkpoint was "
                            f"trained on {list(classes)}. Evaluate on data with the same classes.")
        held_out = [name for name in ("test", "val") if name in data.datasets]
        chosen = split or (held_out[0] if held_out else None)
        if chosen not in held_out:
            raise UserError(f"split={split or '(default)'}: this data has held-out splits: {', '.join(held_out) or 'none'}. "
                            "Choose one with split=test|val, or give data.root a test/ folder (or data.test_fraction > 0).")
        return chosen, data.datasets[chosen], data

    def preview_dataset(self, cfg: DictConfig, preprocess: dict, count: int) -> tuple[Dataset, list]:
        """The training dataset `transfer augment-preview` draws `count` samples from, and files already skipped."""
        data = self.build_data(cfg, preprocess)
        return data.datasets["train"], list(data.skipped)

    def picture(self, sample: dict) -> tuple[np.ndarray, str]:
        """A training sample as an H×W×3 uint8 picture (its targets drawn on it) and a title."""
        return sample["image"].permute(1, 2, 0).numpy(), ""

    def compile(self, model: nn.Module, backend: str) -> None:
        """trainer.compile: torch.compile the model in place (state_dict keys stay the model's own)."""
        model.compile(backend=backend)

    def shortcut(self, cfg: DictConfig, model: nn.Module, data: TaskData, loaders: dict, runtime: Runtime,
                 run_dir: Path, log) -> tuple[nn.Module, dict, Runtime, float]:
        """A cheaper way to run the same updates (classification's linear probe on cached features); none here."""
        return model, loaders, runtime, 0.0

    def predict(self, model: nn.Module, images: list[np.ndarray], runtime: Runtime) -> list:
        raise NotImplementedError

    def write_predictions(self, chunks: Iterable[tuple[list[str], list]], out: Path) -> int:
        raise NotImplementedError


@torch.no_grad()
def image_logits(model: nn.Module, images: list[np.ndarray], preprocess: dict, runtime: Runtime) -> torch.Tensor:
    """A whole-image model's float logits for decoded images, through the evaluation transform, so that
    `transfer predict` and the API see the pixels `transfer eval` sees."""
    model.eval()
    transform = build_eval_transform(preprocess)
    batch = torch.stack([transform(image=image)["image"] for image in images])
    with autocast(runtime.device, runtime.amp_dtype):
        return model(runtime.normalize(batch)).float()

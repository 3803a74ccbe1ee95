"""Everything a config builds before the first step, in data-flow order, for any task: shared by training,
the LR finder, evaluation and the benchmarks, so each measures exactly what `transfer train` runs."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from transfer.config import require
from transfer.data.loaders import build_loader
from transfer.errors import UserError
from transfer.models.backbone import to_channels_last
from transfer.models.finetune import STRATEGIES, Plan, apply_strategy
from transfer.models.inference import Normalizer, pick_amp, pick_device
from transfer.tasks import build_task
from transfer.tasks.base import Runtime, Task, TaskData


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Setup:
    task: Task
    runtime: Runtime
    data: TaskData
    model: nn.Module
    weights_source: str
    preprocess: dict
    plan: Plan
    loaders: dict[str, DataLoader]


def build_runtime(cfg: DictConfig, task: Task, preprocess: dict) -> Runtime:
    """Device, precision (trainer.amp=auto is float32 for a task that cannot take autocast) and normalisation."""
    device = pick_device(cfg.trainer.device)
    amp_dtype = pick_amp(cfg.trainer.amp, device) if task.mixed_precision else None
    normalize = Normalizer(preprocess["mean"], preprocess["std"], device, cfg.trainer.channels_last)
    return Runtime(device, amp_dtype, normalize)


def build_setup(cfg: DictConfig) -> Setup:
    """config → task (keys it refuses) → data (class list) → model → fine-tune plan → loaders."""
    task = build_task(cfg.task.name)
    task.check_config(cfg)
    require(cfg.finetune.strategy, STRATEGIES, "finetune.strategy")
    seed_everything(cfg.seed)
    preprocess = task.preprocess(cfg)
    runtime = build_runtime(cfg, task, preprocess)
    data = task.build_data(cfg, preprocess)
    seed_everything(cfg.seed)  # the new head's initial weights do not depend on how the data was read
    model, weights_source = task.build_model(cfg, data.classes, preprocess)
    task.prepare(cfg, data)
    plan = apply_strategy(model, cfg.finetune, cfg.trainer.epochs)  # which parameters train in which epoch
    model = to_channels_last(model, runtime.device, cfg.trainer.channels_last)
    loaders = {name: build_loader(dataset, cfg.data.batch_size if name == "train" else cfg.data.eval_batch_size,
                                  train=name == "train", num_workers=cfg.data.num_workers, seed=cfg.seed,
                                  pin_memory=runtime.device.type == "cuda", sampler=cfg.data.get("sampler", "random"),
                                  collate_fn=task.collate, shard=True)  # each process its share
               for name, dataset in data.datasets.items()}
    if len(loaders["train"]) == 0:
        raise UserError("the training split is empty.")
    return Setup(task, runtime, data, model, weights_source, preprocess, plan, loaders)

"""A checkpoint made runnable again for eval, predict and the Python API: its task restored, its model rebuilt
with the final weights, and the runtime its trainer had (device, precision, memory format), so the numbers
match the run's own evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from torch import nn

from transfer.checkpoint import CheckpointFacts, final_weights
from transfer.engine.setup import build_runtime
from transfer.tasks import build_task
from transfer.tasks.base import Runtime, Task


@dataclass
class Loaded(CheckpointFacts):
    task: Task
    model: nn.Module
    runtime: Runtime
    checkpoint: dict


def load_for_inference(checkpoint: dict, device: torch.device | str = "auto") -> Loaded:
    cfg = OmegaConf.create(checkpoint["config"])
    cfg.model.pretrained = False  # the weights come from the checkpoint
    cfg.trainer.device = str(device)
    task = build_task(checkpoint.get("task", "classification"))
    task.restore(checkpoint)
    preprocess = dict(checkpoint["preprocess"])
    runtime = build_runtime(cfg, task, preprocess)
    model, _ = task.build_model(cfg, list(checkpoint["classes"]), preprocess)
    model.load_state_dict(final_weights(checkpoint))  # the EMA weights when the run found them best
    model = model.to(runtime.device).eval()
    if cfg.trainer.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    return Loaded(task, model, runtime, checkpoint)

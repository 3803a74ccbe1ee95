"""Optimizer and learning-rate schedule for a fine-tune Plan: timm's factories, one schedule per phase.

- `build_optimizer`: timm's `create_optimizer_v2` over every parameter (see models/finetune.py), so
  `optim.layer_decay` gives each layer group its `lr_scale` and `optim.filter_bias_and_bn` keeps weight
  decay off biases and norm weights, both done by timm.
- `PhaseScheduler`: one timm scheduler (`create_scheduler_v2`) per phase of the plan, each with its own
  base learning rate and warmup. Only timm's schedulers apply the groups' `lr_scale` (layer decay); a torch
  scheduler would drop it. The loop steps it per batch; with gradient accumulation the schedule counts
  optimizer updates, so `data.batch_size=B trainer.accumulate_steps=K` follows the schedule of batch K*B.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from transfer.errors import UserError
from transfer.models.finetune import Plan


def build_optimizer(model: nn.Module, plan: Plan, optim: Mapping, lr: float | None = None) -> torch.optim.Optimizer:
    """timm's optimizer over all of the model's parameters; `lr` replaces optim.lr (e.g. `auto`'s pick)."""
    settings = dict(optim)
    if lr is not None:
        settings["lr"] = lr
    if not isinstance(settings.get("lr"), (int, float)):
        raise UserError(f"optim.lr={settings.get('lr')} is not a number: give one, e.g. optim.lr=1e-3, or "
                        "optim.lr=auto to run the LR finder first.")
    with plan.all_trainable(model):
        return create_optimizer_v2(model, **settings)


class PhaseScheduler:
    """timm schedules per plan phase, addressed by the loop's batch count (`step_update(num_updates=…)`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, plan: Plan, schedule: Mapping, lr: float,
                 batches_per_epoch: int, accumulate_steps: int = 1) -> None:
        self.optimizer, self.plan = optimizer, plan
        self.batches = max(int(batches_per_epoch), 1)
        self.accumulate = max(int(accumulate_steps), 1)
        self.updates_per_epoch = math.ceil(self.batches / self.accumulate)
        self.schedulers = []
        for phase in plan.phases:
            settings = dict(schedule)
            if phase.warmup_epochs is not None:
                settings["warmup_epochs"] = phase.warmup_epochs
            for group in optimizer.param_groups:  # the phase's base lr; timm multiplies in lr_scale itself
                group["initial_lr"] = phase.lr if phase.lr is not None else lr
            scheduler, _ = create_scheduler_v2(optimizer, num_epochs=phase.end - phase.start, step_on_epochs=False,
                                               updates_per_epoch=self.updates_per_epoch, **settings)
            self.schedulers.append(scheduler)
        self.step_update(0)

    def updates(self, batches: int) -> tuple[int, int]:
        """(epoch the next update belongs to, optimizer updates done) after `batches` batches."""
        epoch, batch = divmod(int(batches), self.batches)  # an epoch's last, partial update counts at its end
        return epoch, epoch * self.updates_per_epoch + batch // self.accumulate

    def step_update(self, num_updates: int, metric: float | None = None) -> None:
        epoch, updates = self.updates(num_updates)
        index = self.plan.phase(epoch)
        start = self.plan.phases[index].start
        self.schedulers[index].step_update(num_updates=updates - start * self.updates_per_epoch, metric=metric)

    def step(self, epoch: int, metric: float | None = None) -> None:
        """Schedules here move per update; the loop's end-of-epoch call has nothing to do."""

    def state_dict(self) -> dict:
        return {"phases": [(p.start, p.end, p.lr, p.warmup_epochs) for p in self.plan.phases],
                "updates_per_epoch": self.updates_per_epoch, "accumulate_steps": self.accumulate}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: the learning rate is a function of the update count."""

"""The training techniques every task gets from config, gathered for the loop.

One `Techniques` per run holds: timm's optimizer and the per-phase schedule (engine/optim.py; `optim.lr=auto`
through engine/lr_find.py), gradient accumulation, the GradScaler of fp16 training, the weight EMA
(engine/ema.py) and torch.compile. The loop asks it where it is (`at`), whether this batch ends an optimizer
update (`first`/`last`, `loss_scale`) and what to do after one (`after_update`); the epoch loop asks which
weights compete for best.pt and what goes into checkpoints. Everything here is a function of (config, epoch,
step) or is saved in the checkpoint, so resuming stays exact.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from transfer.distributed import broadcast, is_main
from transfer.engine.ema import Ema
from transfer.engine.lr_find import sweep_lr, sweep_settings, write_sweep
from transfer.engine.monitor import Monitor
from transfer.engine.optim import PhaseScheduler, build_optimizer
from transfer.engine.state import load_buffers
from transfer.errors import UserError
from transfer.models.finetune import Plan
from transfer.tasks.base import Runtime, Task


class Techniques:
    def __init__(self, cfg: DictConfig, model: nn.Module, plan: Plan, task: Task, train_loader, runtime: Runtime,
                 run_dir: Path | None = None, log=print) -> None:
        trainer = cfg.trainer
        self.model, self.plan, self.log = model, plan, log
        self.accumulate = int(trainer.get("accumulate_steps") or 1)
        if self.accumulate < 1:
            raise UserError(f"trainer.accumulate_steps={self.accumulate} must be at least 1.")
        ema = dict(cfg.get("ema") or {})
        self.ema = Ema(model, **{k: v for k, v in ema.items() if k != "enabled"}) if ema.get("enabled") else None
        self.lr = cfg.optim.lr
        if self.lr == "auto":
            self.lr = self.find_lr(cfg, task, train_loader, runtime, run_dir)
        self.optimizer = build_optimizer(model, plan, OmegaConf.to_container(cfg.optim), lr=self.lr)
        self.scheduler = PhaseScheduler(self.optimizer, plan, OmegaConf.to_container(cfg.schedule), self.lr,
                                        len(train_loader), self.accumulate)
        fp16 = runtime.amp_dtype == torch.float16 and runtime.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        backend = compile_backend(trainer.get("compile"))
        if backend:
            task.compile(model, backend)
            log(f"trainer.compile: torch.compile with backend {backend} (the first steps and evaluations compile)")
        self.best_is_ema = self.ema is not None
        self.epoch, self.step, self.steps = 0, 0, 1

    def find_lr(self, cfg: DictConfig, task: Task, train_loader, runtime: Runtime, run_dir: Path | None) -> float:
        optim = {**OmegaConf.to_container(cfg.optim), "lr": 1.0}
        sweep = sweep_lr(self.model, self.plan, optim, train_loader, task, runtime, **sweep_settings(cfg))
        if run_dir is not None and is_main():
            write_sweep(sweep, run_dir)
        self.log(f"optim.lr=auto: the LR finder picked {sweep.suggestion:.3g} ({sweep.method}, {len(sweep.lrs)} "
                 f"steps, {sweep.seconds:.1f}s; plot in lr_find.png)")
        return broadcast(sweep.suggestion)  # several processes: rank 0's sweep decides for all

    # ---- one step

    def at(self, epoch: int, step: int, steps: int) -> None:
        self.epoch, self.step, self.steps = epoch, step, max(steps, 1)

    @property
    def last(self) -> bool:
        """This batch ends an optimizer update (the optimizer steps after it)."""
        return (self.step + 1) % self.accumulate == 0 or self.step + 1 == self.steps

    def boundary(self, step: int) -> bool:
        """Whether a stop after batch `step` leaves no gradients half-accumulated."""
        return (step + 1) % self.accumulate == 0

    @property
    def loss_scale(self) -> float:
        """1 / batches in this update (the epoch's last update may have fewer)."""
        start = self.step - self.step % self.accumulate
        return 1.0 / min(self.accumulate, self.steps - start)

    def updates(self) -> int:
        """Optimizer updates done once this batch's update is made."""
        return self.epoch * math.ceil(self.steps / self.accumulate) + self.step // self.accumulate + 1

    def after_update(self, model: nn.Module) -> None:
        if self.ema is not None:
            self.ema.update(model, step=self.updates())

    # ---- the epoch loop

    def scored(self, row: dict, monitor: Monitor) -> dict:
        """The row as best.pt's choice sees it: with EMA, the better of the two weights' monitored metric.
        Without that metric (no val split, or not evaluated this epoch) the EMA weights are the final ones."""
        self.best_is_ema = self.ema is not None
        ema_key = monitor.name.replace("val/", "val_ema/", 1)
        if self.ema is None or monitor.name not in row or ema_key not in row:
            return row
        raw, ema = row[monitor.name], row[ema_key]
        self.best_is_ema = monitor.better(ema, raw)
        return {**row, monitor.name: ema} if self.best_is_ema else row

    def checkpoint_entries(self) -> dict:
        """What checkpoints carry besides the loop's state: the EMA weights and whether they are the ones to
        use (the key names export and eval read)."""
        if self.ema is None:
            return {}
        return {"model_ema": self.ema.state_dict(), "best_is_ema": self.best_is_ema}

    def resume(self, state: dict) -> None:
        """The EMA weights of the checkpoint resumed from (a checkpoint without them: the model's)."""
        if self.ema is None or not state.get("resumed_from"):
            return
        saved = state.get("model_ema")
        self.ema.load_state_dict(saved if saved is not None else self.model.state_dict())
        load_buffers(self.ema.module, state.get("ema_buffers"))  # this rank's own, mid-epoch with several processes
        self.best_is_ema = bool(state.get("best_is_ema", True))


def compile_backend(setting) -> str | None:
    """trainer.compile: false, true (torch's default backend, inductor) or a backend's name (eager, aot_eager …)."""
    if setting in (None, False):
        return None
    if setting is True:
        return "inductor"
    backends = torch.compiler.list_backends(exclude_tags=())
    if str(setting) not in backends:
        raise UserError(f"trainer.compile={setting}: give true, false or a torch.compile backend: "
                        f"{', '.join(backends)}.")
    return str(setting)

"""The fine-tuning techniques a run switches on from config, gathered for the loop in train.py.

One `Techniques` per run holds: the fine-tune plan (models/finetune.py), the optimizer and per-phase
schedule (optim.py, `optim.lr=auto` through lr_find.py), the loss with optional class weights, mixup /
cutmix, the weight EMA (regularize.py), gradient accumulation, torch.compile and early stopping. The loop
asks it four things: where it is (`at`), how to mix a batch (`mix`), whether this batch ends an optimizer
update (`first`/`last`, `loss_scale`) and what to do after one (`after_update`); the epoch loop asks for
the EMA's validation metrics, which weights compete for best.pt, what goes into checkpoints, and whether
to stop early. Everything here is a function of (config, epoch, step) or is saved in the checkpoint, so
resuming at an epoch boundary stays exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from transfer.errors import UserError
from transfer.models.finetune import Plan
from transfer.optim import PhaseScheduler, build_optimizer
from transfer.regularize import Ema, Mixer, build_criterion, should_stop_early


class Techniques:
    def __init__(self, cfg: DictConfig, model: nn.Module, plan: Plan, data, train_loader, normalize,
                 amp_dtype, device: torch.device, run_dir: Path | None = None, log=print) -> None:
        trainer = cfg.trainer
        self.model, self.plan, self.log = model, plan, log
        self.accumulate = int(trainer.get("accumulate_steps") or 1)
        if self.accumulate < 1:
            raise UserError(f"trainer.accumulate_steps={self.accumulate} must be at least 1.")
        num_classes = len(data.classes)
        mixup = dict(cfg.get("mixup") or {})
        self.mixer = Mixer(num_classes, trainer.label_smoothing, trainer.epochs, **mixup)
        if self.mixer.enabled and cfg.data.batch_size % 2:
            raise UserError(f"mixup and cutmix mix pairs of images: data.batch_size={cfg.data.batch_size} must be "
                            "even.")
        labels = [record.label for record in data.datasets["train"].records]
        self.criterion = build_criterion(trainer.label_smoothing, trainer.get("class_weight"), labels, num_classes,
                                         self.mixer.enabled).to(device)
        ema = dict(cfg.get("ema") or {})
        self.ema = Ema(model, **{k: v for k, v in ema.items() if k != "enabled"}) if ema.get("enabled") else None
        self.lr = cfg.optim.lr
        if self.lr == "auto":
            self.lr = self.find_lr(cfg, train_loader, normalize, amp_dtype, device, run_dir)
        self.optimizer = build_optimizer(model, plan, OmegaConf.to_container(cfg.optim), lr=self.lr)
        self.scheduler = PhaseScheduler(self.optimizer, plan, OmegaConf.to_container(cfg.schedule), self.lr,
                                        len(train_loader), self.accumulate)
        if trainer.get("compile"):
            model.compile()  # in place: state_dict keys stay the model's own
        self.patience, self.epochs = trainer.get("early_stop_patience"), trainer.epochs
        self.best_is_ema = self.ema is not None
        self.epoch, self.step, self.steps = 0, 0, 1

    # ---- the optimizer and its learning rate

    def find_lr(self, cfg, train_loader, normalize, amp_dtype, device, run_dir: Path | None) -> float:
        from transfer.lr_find import sweep_lr, sweep_settings, write_sweep

        optim = {**OmegaConf.to_container(cfg.optim), "lr": 1.0}
        sweep = sweep_lr(self.model, self.plan, optim, train_loader, normalize, self.plain_criterion(cfg, device),
                         device, amp_dtype, **sweep_settings(cfg))
        from transfer.distributed import is_main

        if run_dir is not None and is_main():
            write_sweep(sweep, run_dir)
        self.log(f"optim.lr=auto: the LR finder picked {sweep.suggestion:.3g} ({sweep.method}, {len(sweep.lrs)} "
                 f"steps, {sweep.seconds:.1f}s; plot in lr_find.png)")
        return sweep.suggestion

    def plain_criterion(self, cfg, device) -> nn.Module:
        """The loss on hard labels (the LR sweep does not mix)."""
        if not self.mixer.enabled:
            return self.criterion
        return nn.CrossEntropyLoss(weight=self.criterion.weight, label_smoothing=cfg.trainer.label_smoothing).to(device)

    # ---- one step

    def at(self, epoch: int, step: int, steps: int) -> None:
        self.epoch, self.step, self.steps = epoch, step, max(steps, 1)

    @property
    def first(self) -> bool:
        """This batch starts an optimizer update (gradients are zeroed before it)."""
        return self.step % self.accumulate == 0

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

    def mix(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mixer(images, labels, self.epoch)

    def updates(self) -> int:
        """Optimizer updates done once this batch's update is made."""
        return self.epoch * math.ceil(self.steps / self.accumulate) + self.step // self.accumulate + 1

    def after_update(self, model: nn.Module) -> None:
        if self.ema is not None:
            self.ema.update(model, step=self.updates())

    # ---- the epoch loop

    def evaluate_ema(self, loader, normalize, amp_dtype, num_classes: int, top_k: int) -> dict[str, float]:
        """The EMA weights' metrics on the validation split, as `val_ema/...`."""
        if self.ema is None:
            return {}
        from transfer.evaluate import classification_metrics
        from transfer.inference import predict_logits

        logits, labels, _, _ = predict_logits(self.ema.module, loader, normalize, amp_dtype)
        return classification_metrics(logits, labels, num_classes, "val_ema", top_k)

    def scored(self, row: dict, monitor: str) -> dict:
        """The row as best.pt's choice sees it: with EMA, the better of the two weights' monitored metric.
        Without that metric (no val split, or not evaluated this epoch) the EMA weights are the final ones."""
        self.best_is_ema = self.ema is not None
        ema_key = monitor.replace("val/", "val_ema/", 1)
        if self.ema is None or monitor not in row or ema_key not in row:
            return row
        lower_is_better = "loss" in monitor
        raw, ema = row[monitor], row[ema_key]
        self.best_is_ema = ema < raw if lower_is_better else ema > raw
        return {**row, monitor: ema} if self.best_is_ema else row

    def checkpoint_entries(self) -> dict:
        """What checkpoints carry besides the loop's state: the EMA weights and whether they are the ones to
        use (the key names export.py and eval read)."""
        if self.ema is None:
            return {}
        return {"model_ema": self.ema.state_dict(), "best_is_ema": self.best_is_ema}

    def resume(self, path: str | None) -> None:
        """The EMA weights of the checkpoint resumed from (a checkpoint without them: the model's)."""
        if self.ema is None or not path:
            return
        from transfer.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(path)
        state = checkpoint.get("model_ema")
        self.ema.load_state_dict(state if state is not None else checkpoint["model"])
        self.best_is_ema = bool(checkpoint.get("best_is_ema", True))

    def early_stop(self, state: dict, row: dict, monitor: str) -> bool:
        stop = state["epoch"] < self.epochs and should_stop_early(self.patience, state.get("best_epoch"),
                                                                  state["epoch"], monitor in row)
        if stop:
            self.log(f"early stop: {monitor} has not improved for {state['epoch'] - state['best_epoch']} epochs "
                     f"(trainer.early_stop_patience={self.patience}); best epoch {state['best_epoch']}")
        return stop


def final_weights(checkpoint: dict) -> dict:
    """The weights a run's evaluation uses: the EMA's when they were best, else the model's."""
    from transfer.export import choose_weights

    return choose_weights(checkpoint, "auto")[0]


# ---------------------------------------------------------------------------------------------
# a run's model and data without the loop (transfer lr-find)


@dataclass
class Setup:
    model: nn.Module
    plan: Plan
    train_loader: object
    normalize: object
    criterion: nn.Module
    device: torch.device
    amp_dtype: object


def prepare(cfg: DictConfig) -> Setup:
    """Model, plan, training loader and loss exactly as `transfer train` builds them for this config."""
    from transfer.regularize import build_criterion
    from transfer.train import build_pipeline

    built = build_pipeline(cfg)
    data, loader, device = built.data, built.loaders["train"], built.device
    labels = [record.label for record in data.datasets["train"].records]
    criterion = build_criterion(cfg.trainer.label_smoothing, cfg.trainer.get("class_weight"), labels,
                                len(data.classes), mixing=False).to(device)
    return Setup(built.model, built.plan, loader, built.normalize, criterion, device, built.amp_dtype)

"""One epoch of optimisation for any task: batches in the sampler's order, the task's training step under
autocast, accumulation, clipping, the GradScaler, EMA, the bad-step policy, and a stop between two steps
that leaves the position and the epoch's running sums for an exact resume."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm import tqdm

from transfer import distributed
from transfer.checkpoint import restore_rng_state
from transfer.data.dataset import raise_if_strict
from transfer.engine.interrupt import StopSignal
from transfer.engine.parallel import Replicated, average_batchnorm
from transfer.engine.rundir import SkippedFiles, progress_mode
from transfer.engine.state import NonFiniteError
from transfer.engine.techniques import Techniques
from transfer.errors import UserError
from transfer.models.finetune import set_train_mode
from transfer.models.inference import autocast
from transfer.tasks.base import Runtime, Task


class Loop:
    """What every step needs, held for the run."""

    def __init__(self, model: torch.nn.Module, task: Task, kit: Techniques, runtime: Runtime, cfg: DictConfig,
                 skipped: SkippedFiles, on_step: Callable[[dict[str, float], int], None] | None = None) -> None:
        self.model, self.task, self.kit, self.runtime, self.skipped = model, task, kit, runtime, skipped
        self.on_step = on_step  # (this process's batch loss and learning rate, batches so far): the trackers
        self.replicated = Replicated(model, runtime.device, find_unused=task.find_unused_parameters)
        self.trainee, self.stop, self.stopping = model, None, False
        self.optimizer, self.scheduler, self.scaler = kit.optimizer, kit.scheduler, kit.scaler
        self.grad_clip = cfg.trainer.grad_clip
        self.max_bad_steps = cfg.trainer.get("max_bad_steps") or 0
        self.progress = progress_mode(cfg.trainer.progress)
        self.epochs = cfg.trainer.epochs
        self.first_batch_at: float | None = None  # time.time() when this process's first training batch arrived

    def train_epoch(self, loader: DataLoader, epoch: int, state: dict, stop: StopSignal | None = None
                    ) -> dict[str, float] | None:
        """One epoch, from step state['step'] on when resuming mid-epoch. A NaN/Inf loss skips its update,
        counted in state['bad_steps'], up to trainer.max_bad_steps; then NonFiniteError. Returns None when
        `stop` was requested before the last step, leaving the position and running sums in `state`."""
        set_train_mode(self.model, self.kit.plan, epoch)
        self.trainee, self.stop, self.stopping = self.replicated.refresh(), stop, False
        steps, start = len(loader), state["step"]
        sums = state["partial"] or {"loss_sum": 0.0, "seen": 0, "bad_steps": 0, "stats": {}}
        stats = dict(sums.get("stats") or {})
        loss_sum, seen, bad = sums["loss_sum"], sums["seen"], sums["bad_steps"]
        if not distributed.is_main():  # a checkpoint's running sums are every rank's: rank 0 carries them on
            loss_sum, seen, stats = 0.0, 0, {name: 0.0 for name in stats}
        runtime = dataclasses.replace(self.runtime, epoch=epoch)
        batches = iter(epoch_batches(loader, epoch, start))
        if "rng" in state:  # after the loader drew its seed: the streams continue exactly where they stopped
            restore_rng_state(state.pop("rng"))
        bar = tqdm(batches, initial=start, total=steps, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False,
                   disable=self.progress != "bar", dynamic_ncols=True)
        for step, batch in enumerate(bar, start=start):
            if self.first_batch_at is None:  # the end of start-up: everything before the first step (fit.py logs it)
                self.first_batch_at = time.time()
            raise_if_strict(batch)
            self.skipped.add(batch["skipped"])
            count = self.task.batch_size(batch)
            if count:
                self.kit.at(epoch, step, steps)
                loss, batch_stats = self.step(batch, runtime)
                if self.on_step is not None:
                    self.on_step({"step/train_loss": loss, "step/lr": self.optimizer.param_groups[0]["lr"]},
                                 epoch * steps + step + 1)
                if batch_stats is None:
                    bad += 1
                    state["bad_steps"] += 1
                    if state["bad_steps"] > self.max_bad_steps:
                        raise NonFiniteError(f"the loss became {loss} in epoch {epoch + 1} at step {step + 1}/{steps} "
                                             f"(bad steps so far: {state['bad_steps']}, trainer.max_bad_steps="
                                             f"{self.max_bad_steps})")
                else:
                    loss_sum += loss * count
                    seen += count
                    for name, value in batch_stats.items():
                        stats[name] = stats.get(name, 0.0) + value
                self.scheduler.step_update(num_updates=epoch * steps + step + 1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
            if self.stop_requested() and step + 1 < steps and self.kit.boundary(step):
                state["step"] = step + 1
                loss_sum, seen, stats = summed(loss_sum, seen, stats)
                state["partial"] = {"loss_sum": loss_sum, "seen": seen, "bad_steps": bad, "stats": stats}
                return None
        loss_sum, seen, stats = summed(loss_sum, seen, stats)
        average_batchnorm(self.model, self.kit.ema.module if self.kit.ema is not None else None)
        row = {"lr": self.optimizer.param_groups[0]["lr"], "train/loss": loss_sum / max(seen, 1),
               **{f"train/{name}": value / max(seen, 1) for name, value in stats.items()}}
        if bad:
            row["train/bad_steps"] = bad
        return row

    def step(self, batch: dict, runtime: Runtime) -> tuple[float, dict | None]:
        """(loss, the task's statistics) after one update; (loss, None) and no update when the loss is NaN/Inf."""
        with self.replicated.accumulating(self.kit.last):
            return self.update(batch, runtime)

    def update(self, batch: dict, runtime: Runtime) -> tuple[float, dict | None]:
        with autocast(runtime.device, runtime.amp_dtype):
            try:
                loss, stats = self.task.training_step(self.trainee, batch, runtime)
            except ValueError as error:
                if "more than 1 value per channel" not in str(error):
                    raise
                raise UserError(f"a training batch of {self.task.batch_size(batch)} image(s) leaves a BatchNorm layer "
                                "one value per channel (tiny feature maps). Use data.batch_size=2 or more.") from None
        finite = bool(torch.isfinite(loss))
        if distributed.active():  # every rank skips a step any rank found NaN, and stops where any was asked to
            bad_somewhere, self.stopping = distributed.any_rank(not finite, self.stop is not None and
                                                                self.stop.requested)
            finite = not bad_somewhere
        if not finite:
            if self.kit.last:  # drop the gradients this update had gathered
                self.optimizer.zero_grad(set_to_none=True)
            return loss.item(), None
        scaled = loss * self.kit.loss_scale  # gradient accumulation: the mean over the update's batches
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        if self.kit.last:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.kit.after_update(self.model)
        return loss.item(), stats

    def stop_requested(self) -> bool:
        """A stop asked for here, or (several processes) on any rank as of this step."""
        if distributed.active():
            return self.stopping
        return self.stop is not None and self.stop.requested

    def stop_agreed(self, stop: StopSignal) -> bool:
        """Between epochs: a stop asked for on any rank by now (a collective: every rank asks at once)."""
        return distributed.any_rank(stop.requested)[0]


def summed(loss_sum: float, seen: int, stats: dict[str, float]) -> tuple[float, int, dict[str, float]]:
    """The running sums over every rank's shard (as they are in one process)."""
    names = sorted(stats)  # the same on every rank: the task reports every statistic from each good batch
    loss_sum, seen, *values = distributed.sum_over_ranks([loss_sum, seen, *(stats[name] for name in names)])
    return loss_sum, int(seen), dict(zip(names, values))


def epoch_batches(loader: DataLoader, epoch: int, start: int = 0) -> DataLoader:
    """The loader for this epoch; from step `start` on, the same remaining batches in the same order
    (the sampler is keyed by seed and epoch) without reading the images of the steps already done."""
    loader.sampler.set_epoch(epoch)
    if not start:
        return loader
    batches = list(loader.batch_sampler)[start:]
    return DataLoader(loader.dataset, batch_sampler=batches, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      worker_init_fn=loader.worker_init_fn)

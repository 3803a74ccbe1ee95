"""The learning-rate finder: `transfer lr-find [overrides] [out=DIR]`, and `optim.lr=auto` in training.

An exponential sweep (Smith 2015; fastai's `lr_find`): from `lr_find.start_lr` to `lr_find.end_lr` over
`lr_find.num_iter` updates of the configured optimizer (layer decay's `lr_scale` included), on the
parameters that optim.lr drives (the plan's last epoch: everything, or the head for a linear probe). The
loss is smoothed with an exponential moving average (`lr_find.smooth`, bias-corrected) and the sweep ends
early once it exceeds `lr_find.diverge` times its minimum. The suggestion (`lr_find.method`):
  steepest  where the smoothed loss falls fastest against log(lr), before its minimum (the default: on the
            Fashion-MNIST benchmark it picks 2.9e-3, where a sweep of real runs peaks at 1e-3-4e-3;
            `python -m bench.lr_sweep`)
  valley    fastai's default: the middle of the longest stretch where the smoothed loss keeps falling (with a
            long flat start it picks too low here)
  minimum   a tenth of the lr at the smoothed loss's minimum
The model's weights, BatchNorm statistics and every random stream are restored afterwards, so a run with
`optim.lr=auto` is the run with `optim.lr=<the pick>`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from transfer.checkpoint import restore_rng_state, rng_state
from transfer.config import require
from transfer.engine.optim import build_optimizer
from transfer.errors import UserError
from transfer.files import save_figure, write_json
from transfer.models.inference import autocast
from transfer.tasks.base import Runtime, Task

METHODS = ("steepest", "valley", "minimum")


@dataclass
class Sweep:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    suggestion: float = float("nan")
    method: str = "steepest"
    suggestions: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def suggest(lrs: list[float], smoothed: list[float], method: str = "steepest") -> float:
    require(method, METHODS, "lr_find.method")
    lrs_arr, losses = np.asarray(lrs, dtype=float), np.asarray(smoothed, dtype=float)
    if len(lrs_arr) < 3:
        raise UserError("the LR sweep stopped after fewer than 3 steps: raise lr_find.num_iter or lower "
                        "lr_find.start_lr.")
    if method == "minimum":
        return float(lrs_arr[int(np.argmin(losses))] / 10)
    if method == "steepest":  # on the way down to the minimum, not in the divergence after it
        end = int(np.argmin(losses)) + 1
        gradient = np.gradient(losses[:max(end, 2)], np.log(lrs_arr[:max(end, 2)]))
        return float(lrs_arr[int(np.argmin(gradient))])
    return float(lrs_arr[valley_index(losses)])


def valley_index(losses: np.ndarray) -> int:
    """fastai's valley: the longest decreasing subsequence of the loss, then the point half-way along it
    (a third plus a sixth of its length, as fastai rounds them)."""
    n = len(losses)
    lengths = [1] * n
    best_start, best_end = 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lengths[i] < lengths[j] + 1:
                lengths[i] = lengths[j] + 1
            if lengths[best_end] < lengths[i]:
                best_end = i
                best_start = best_end - lengths[best_end]
    sections = (best_end - best_start) / 3
    return min(n - 1, best_start + int(sections) + int(sections / 2))


def sweep_lr(model: nn.Module, plan, optim: Mapping, loader, task: Task, runtime: Runtime, start_lr: float = 1e-6,
             end_lr: float = 1.0, num_iter: int = 60, smooth: float = 0.9, diverge: float = 4.0,
             method: str = "steepest", grad_clip: float | None = None) -> Sweep:
    """Run the sweep on the task's own training step, unmixed; the model comes back exactly as it went in
    (weights, buffers, RNG streams)."""
    require(method, METHODS, "lr_find.method")
    if not 0 < start_lr < end_lr:
        raise UserError(f"lr_find.start_lr={start_lr} must be above 0 and below lr_find.end_lr={end_lr}.")
    num_iter = max(int(num_iter), 3)
    saved_weights, saved_rng = copy.deepcopy(model.state_dict()), rng_state()
    saved_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    started = time.perf_counter()
    result = Sweep(method=method)
    try:
        plan.enter(model, plan.epochs - 1)
        unmixed = dataclasses.replace(runtime, mixing=False)
        optimizer = build_optimizer(model, plan, optim, lr=start_lr)
        ratio = (end_lr / start_lr) ** (1 / (num_iter - 1))
        average, best = 0.0, math.inf
        for step, batch in enumerate(batches(loader, num_iter, task)):
            lr = start_lr * ratio ** step
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            with autocast(runtime.device, runtime.amp_dtype if task.mixed_precision else None):
                loss, _ = task.training_step(model, batch, unmixed)
            value = float(loss.item())
            if not math.isfinite(value):
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            average = smooth * average + (1 - smooth) * value
            smoothed = average / (1 - smooth ** (step + 1))
            result.lrs.append(lr)
            result.losses.append(value)
            result.smoothed.append(smoothed)
            best = min(best, smoothed)
            if step > 2 and smoothed > diverge * best:
                break
    finally:
        model.load_state_dict(saved_weights)
        model.zero_grad(set_to_none=True)
        for name, parameter in model.named_parameters():
            parameter.requires_grad = saved_grad[name]
        restore_rng_state(saved_rng)
    result.suggestions = {name: suggest(result.lrs, result.smoothed, name) for name in METHODS}
    result.suggestion = result.suggestions[method]
    result.seconds = time.perf_counter() - started
    return result


def batches(loader, count: int, task: Task):
    """`count` training batches, through as many epochs of the loader as that takes (epochs numbered from
    10**6, so the sweep's augmentations are its own)."""
    epoch, done = 10**6, 0
    while done < count:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            if task.batch_size(batch) == 0:
                continue
            yield batch
            done += 1
            if done == count:
                return
        epoch += 1


def write_sweep(sweep: Sweep, folder: Path) -> tuple[Path, Path]:
    """lr_find.json (every point, the suggestions) and lr_find.png (smoothed loss against lr, the pick)."""
    data_path, plot_path = folder / "lr_find.json", folder / "lr_find.png"
    write_json(data_path, asdict(sweep), sort_keys=False)
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    axes.plot(sweep.lrs, sweep.losses, alpha=0.3, label="loss")
    axes.plot(sweep.lrs, sweep.smoothed, label="smoothed loss")
    axes.axvline(sweep.suggestion, color="red", linestyle="--", label=f"{sweep.method}: {sweep.suggestion:.2e}")
    axes.set_xscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    low, high = min(sweep.smoothed), max(sweep.smoothed[: max(3, len(sweep.smoothed) // 2)] + [min(sweep.smoothed)])
    axes.set_ylim(low - 0.1 * abs(low), high + 0.5 * abs(high - low) + 1e-3)
    axes.legend()
    figure.tight_layout()
    save_figure(figure, plot_path)
    return data_path, plot_path


def sweep_settings(cfg) -> dict:
    settings = dict(cfg.get("lr_find") or {})
    settings.setdefault("grad_clip", cfg.trainer.get("grad_clip"))
    return settings

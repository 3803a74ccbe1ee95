"""The training loop, top to bottom: data → model → transforms → loaders → epochs → report.

Written for one process today and torchrun tomorrow: files are written only by the main process
(`is_main`), samplers are chosen in `build_loader`, metrics come from whole-split logits.
"""

from __future__ import annotations

import collections
import csv
from dataclasses import dataclass
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from transfer.checkpoint import (copy_checkpoint, load_checkpoint, newest_checkpoint, remove_temporaries,
                                 restore_rng_state, rng_state, save_checkpoint)
from transfer.config import require, to_dict
from transfer.data.dataset import raise_if_strict
from transfer.data.loaders import Data, build_datasets, build_loader, index_data
from transfer.distributed import is_main
from transfer.errors import UserError
from transfer.evaluate import classification_metrics, plot_curves, write_json, write_report
from transfer.interrupt import Interrupted, StopSignal
from transfer.inference import Normalizer, autocast, pick_amp, pick_device, predict_logits
from transfer.models.backbone import build_model, count_parameters, resolve_preprocess, to_channels_last
from transfer.models.finetune import STRATEGIES, apply_strategy, set_train_mode
from transfer.probe import train_on_features
from transfer.techniques import Techniques, final_weights
from transfer.tta import with_tta


DIGITS_INPUT_SIZE = 48


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Pipeline:
    """Everything a config builds before the first step, in data-flow order; shared by train, lr-find
    and the benchmarks so they measure exactly what `transfer train` runs."""

    device: torch.device
    amp_dtype: torch.dtype | None
    data: Data
    model: torch.nn.Module
    weights_source: str
    preprocess: dict
    plan: object
    normalize: Normalizer
    loaders: dict


def build_pipeline(cfg: DictConfig) -> Pipeline:
    """config → splits (class list) → model → preprocessing → datasets → strategy → loaders."""
    require(cfg.finetune.strategy, STRATEGIES, "finetune.strategy")
    seed_everything(cfg.seed)
    device = pick_device(cfg.trainer.device)
    amp_dtype = pick_amp(cfg.trainer.amp, device)
    splits = index_data(cfg.data)
    model, weights_source = build_model(num_classes=len(splits.classes), **cfg.model)
    preprocess = resolve_preprocess(model, **preprocess_overrides(cfg))
    data = build_datasets(splits, cfg.data, preprocess, OmegaConf.to_container(cfg.augment.train), cfg.seed)
    plan = apply_strategy(model, cfg.finetune, cfg.trainer.epochs)  # which parameters train in which epoch
    model = to_channels_last(model, device, cfg.trainer.channels_last)
    normalize = Normalizer(preprocess["mean"], preprocess["std"], device, cfg.trainer.channels_last)
    loaders = {name: build_loader(dataset, cfg.data.batch_size if name == "train" else cfg.data.eval_batch_size,
                                  train=name == "train", num_workers=cfg.data.num_workers, seed=cfg.seed,
                                  pin_memory=device.type == "cuda", sampler=cfg.data.get("sampler", "random"))
               for name, dataset in data.datasets.items()}
    if len(loaders["train"]) == 0:
        raise UserError("the training split is empty.")
    return Pipeline(device, amp_dtype, data, model, weights_source, preprocess, plan, normalize, loaders)


def train(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    """Fine-tune as configured, write the run directory, return the final metrics."""
    if cfg.get("task", {}).get("name", "classification") != "classification":  # segmentation, detection
        from transfer.dense.train import train_dense

        return train_dense(cfg, run_dir)
    built = build_pipeline(cfg)
    device, amp_dtype, data, model = built.device, built.amp_dtype, built.data, built.model
    weights_source, preprocess, plan = built.weights_source, built.preprocess, built.plan
    normalize, loaders = built.normalize, built.loaders
    # a linear probe on deterministic inputs runs the frozen backbone once (features cached on disk) and the loop
    # below trains the head on the features: the same model object, loaders in the same order (probe.py)
    model, loaders, normalize, feature_seconds = train_on_features(cfg, model, data, loaders, normalize, amp_dtype,
                                                                   device, run_dir, log)
    # timm's optimizer and schedules (one per fine-tune phase), the loss, mixup, EMA, accumulation: techniques.py
    kit = Techniques(cfg, model, plan, data, loaders["train"], normalize, amp_dtype, device, run_dir, log)
    optimizer, scheduler, criterion = kit.optimizer, kit.scheduler, kit.criterion
    meta = {"classes": data.classes, "preprocess": preprocess, "weights_source": weights_source,
            "config": to_dict(cfg)}
    meta.update(kit.checkpoint_entries())  # EMA weights for every checkpoint (model_ema, best_is_ema)
    # resume before anything is written: a refused resume leaves its run directory as it was
    state = {"epoch": 0, "step": 0, "partial": None, "bad_steps": 0, "history": [], "best": None,
             "best_epoch": None, "train_seconds": feature_seconds}
    if cfg.trainer.resume:
        state.update(resume(cfg.trainer.resume, model, optimizer, meta, run_dir) or {})
        kit.resume(state.get("resumed_from"))
        # timm schedules are functions of the update count: follow this run's length (trainer.epochs may have
        # grown), not the checkpoint's, and set the learning rate of the next update
        scheduler.step_update(num_updates=state["epoch"] * len(loaders["train"]) + state["step"])
    total, trainable = count_parameters(model)
    write_run_info(run_dir, data, meta, total, trainable)
    log(f"{cfg.model.name} ({weights_source}), {trainable:,}/{total:,} parameters trained, "
        f"{len(data.classes)} classes, splits {_counts(data)}, input {preprocess['input_size'][1:]}, "
        f"device {device}{', amp ' + str(amp_dtype).split('.')[-1] if amp_dtype else ''}")
    skipped = SkippedFiles(run_dir)
    skipped.add(data.skipped)
    if is_main():
        remove_temporaries(run_dir)  # left by a run killed while saving; we hold the run directory's lock

    loop = Loop(model, optimizer, scheduler, criterion, normalize, amp_dtype, cfg, device, skipped, kit)
    best_val = None  # (logits, labels) of the val split under the best weights of this process, if known
    try:
        with StopSignal() as stop:
            for epoch in range(state["epoch"], cfg.trainer.epochs):
                started = time.perf_counter()
                if not state["step"]:  # a mid-epoch resume continues the saved random streams instead
                    seed_everything(cfg.seed * 1_000 + epoch)  # dropout / drop-path: keyed by epoch, exact on resume
                earlier = (state["partial"] or {}).get("seconds", 0.0)
                result = loop.train_epoch(loaders["train"], epoch, run_dir, state, stop)
                if result is None:  # stopped between two steps: save the position, not an epoch
                    state["train_seconds"] += time.perf_counter() - started
                    state["partial"]["seconds"] = earlier + time.perf_counter() - started
                    meta.update(kit.checkpoint_entries())  # the EMA weights as of this step
                    save_progress(model, optimizer, scheduler, state, meta, run_dir, improved=False)
                    raise interrupted(stop, run_dir, epoch, state["step"], len(loaders["train"]), cfg.trainer.epochs)
                check_finite(model, epoch + 1)  # before validation, whose metrics cannot take NaN logits
                row, val_outputs = {"epoch": epoch + 1, **result}, None
                if "val" in loaders and ((epoch + 1) % cfg.trainer.eval_every == 0 or epoch + 1 == cfg.trainer.epochs):
                    logits, labels, _, bad = predict_logits(model, loaders["val"], normalize, amp_dtype)
                    skipped.add(bad)
                    val_outputs = (logits, labels)
                    row.update(classification_metrics(logits, labels, len(data.classes), "val", cfg.trainer.top_k))
                    row.update(kit.evaluate_ema(loaders["val"], normalize, amp_dtype, len(data.classes),
                                                cfg.trainer.top_k))  # val_ema/*: the EMA weights' metrics
                row["seconds"] = time.perf_counter() - started
                state["train_seconds"] += row["seconds"]
                row["seconds"] += earlier
                state["history"].append(row)
                improved = _improved(kit.scored(row, cfg.trainer.monitor), state, cfg.trainer.monitor)  # EMA competes
                if improved:  # the final report of val needs no second pass when these weights stay the best
                    best_val = val_outputs if kit.ema is None else None
                state["epoch"], state["step"], state["partial"] = epoch + 1, 0, None
                if is_main():
                    write_epoch(run_dir, state["history"])
                meta.update(kit.checkpoint_entries())
                save_progress(model, optimizer, scheduler, state, meta, run_dir, improved)
                log(_summary(row, cfg.trainer.epochs, improved))
                if stop.requested:
                    raise interrupted(stop, run_dir, epoch + 1, 0, len(loaders["train"]), cfg.trainer.epochs)
                if kit.early_stop(state, row, cfg.trainer.monitor):
                    break
        return finish(model, loaders, normalize, amp_dtype, data.classes, state, run_dir, cfg, skipped, best_val)
    except NonFiniteError as error:
        raise UserError(f"{error}. The last good checkpoint is {last_good(run_dir, state.get('resumed_from'))}. "
                        "Lower optim.lr, set trainer.grad_clip or check the data; or let up to N such steps be "
                        "skipped with trainer.max_bad_steps=N.") from None
    finally:
        skipped.report()


def preprocess_overrides(cfg: DictConfig) -> dict:
    """The user's preprocessing; the embedded 8×8 digits default to a small input, not the model's 224."""
    overrides = OmegaConf.to_container(cfg.preprocess)
    if cfg.data.root is None and overrides["input_size"] is None:
        overrides["input_size"] = DIGITS_INPUT_SIZE
    return overrides


class Loop:
    """One epoch of optimisation; holds what every step needs."""

    def __init__(self, model, optimizer, scheduler, criterion, normalize, amp_dtype, cfg, device, skipped=None,
                 kit=None):
        self.model, self.optimizer, self.scheduler, self.criterion = model, optimizer, scheduler, criterion
        self.normalize, self.amp_dtype, self.device = normalize, amp_dtype, device
        self.strategy = cfg.finetune.strategy
        self.kit = kit  # techniques.Techniques: plan, mixup, accumulation, EMA
        self.grad_clip = cfg.trainer.grad_clip
        self.max_bad_steps = cfg.trainer.get("max_bad_steps") or 0  # configs saved before the key existed
        self.skipped = skipped
        self.progress = progress_mode(cfg.trainer.progress)
        self.epochs = cfg.trainer.epochs
        use_scaler = amp_dtype == torch.float16 and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    def train_epoch(self, loader, epoch: int, run_dir: Path, state: dict | None = None,
                    stop: StopSignal | None = None) -> dict[str, float] | None:
        """One epoch, from step state['step'] on when resuming mid-epoch. A NaN/Inf loss skips its update,
        counted in state['bad_steps'], up to trainer.max_bad_steps; then NonFiniteError. Returns None when
        `stop` was requested before the last step, leaving the position and running sums in `state`."""
        state = state if state is not None else {"step": 0, "partial": None, "bad_steps": 0}
        skipped = self.skipped or SkippedFiles(run_dir)
        set_train_mode(self.model, self.kit.plan, epoch)
        steps, start = len(loader), state["step"]
        sums = state["partial"] or {"loss_sum": 0.0, "correct": 0, "seen": 0, "bad_steps": 0}
        loss_sum, correct, seen, bad = sums["loss_sum"], sums["correct"], sums["seen"], sums["bad_steps"]
        batches = iter(epoch_batches(loader, epoch, start))
        if "rng" in state:  # after the loader drew its seed: the streams continue exactly where they stopped
            restore_rng_state(state.pop("rng"))
        bar = tqdm(batches, initial=start, total=steps, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False,
                   disable=self.progress != "bar", dynamic_ncols=True)
        for step, batch in enumerate(bar, start=start):
            raise_if_strict(batch)
            skipped.add(batch["skipped"])
            if len(batch["label"]):
                labels = batch["label"].to(self.device, non_blocking=True)
                self.kit.at(epoch, step, steps)
                loss, logits = self.step(batch["image"], labels)
                if logits is None:
                    bad += 1
                    state["bad_steps"] += 1
                    if state["bad_steps"] > self.max_bad_steps:
                        raise NonFiniteError(f"the loss became {loss} in epoch {epoch + 1} at step {step + 1}/{steps} "
                                             f"(bad steps so far: {state['bad_steps']}, trainer.max_bad_steps="
                                             f"{self.max_bad_steps})")
                else:
                    loss_sum += loss * len(labels)
                    correct += (logits.argmax(dim=1) == labels).sum().item()
                    seen += len(labels)
                self.scheduler.step_update(num_updates=epoch * steps + step + 1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
            if stop is not None and stop.requested and step + 1 < steps and self.kit.boundary(step):
                state["step"] = step + 1
                state["partial"] = {"loss_sum": loss_sum, "correct": correct, "seen": seen, "bad_steps": bad}
                return None
        self.scheduler.step(epoch + 1)
        row = {"lr": self.optimizer.param_groups[0]["lr"], "train/loss": loss_sum / max(seen, 1),
               "train/top1": correct / max(seen, 1)}
        if bad:
            row["train/bad_steps"] = bad
        return row

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor | None]:
        """(loss, logits) after one update; (loss, None) and no update when the loss is NaN or Inf."""
        with autocast(self.device, self.amp_dtype):
            inputs, targets = self.kit.mix(self.normalize(images), labels)  # mixup/cutmix: soft targets
            logits = self.model(inputs)
            loss = self.criterion(logits, targets)
        if not torch.isfinite(loss):
            if self.kit.last:  # drop the gradients this update had gathered
                self.optimizer.zero_grad(set_to_none=True)
            return loss.item(), None
        scaled = loss * self.kit.loss_scale  # gradient accumulation: the mean over the update's batches
        if self.scaler is not None:
            self.scaler.scale(scaled).backward()
            if self.kit.last:
                self.scaler.unscale_(self.optimizer)
                self._clip()
                self.scaler.step(self.optimizer)
                self.scaler.update()
        else:
            scaled.backward()
            if self.kit.last:
                self._clip()
                self.optimizer.step()
        if self.kit.last:
            self.optimizer.zero_grad(set_to_none=True)
            self.kit.after_update(self.model)
        return loss.item(), logits.detach()

    def _clip(self) -> None:
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)


class NonFiniteError(ArithmeticError):
    """Training produced NaN or Inf; the message says where, train() adds the checkpoint to go back to."""


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


def interrupted(stop: StopSignal, run_dir: Path, epoch: int, step: int, steps: int, epochs: int) -> Interrupted:
    """The exception that ends a run stopped by a signal, with the command that continues it."""
    where = f"in epoch {epoch + 1}/{epochs} after step {step}/{steps}" if step else f"after epoch {epoch}/{epochs}"
    command = ["transfer", "train", "--config", str(run_dir / "config.yaml"), f"trainer.resume={run_dir / 'last.pt'}"]
    return Interrupted(f"interrupted {where}; last.pt written; resume with: {shlex.join(command)}", stop.exit_code)


def finish(model, loaders, normalize, amp_dtype, classes, state, run_dir: Path, cfg, skipped=None,
           best_val: tuple | None = None) -> dict[str, float]:
    """Evaluate the best checkpoint on every held-out split and write the reports. `best_val`: the val
    split's (logits, labels) already computed with the best weights, reused unless test-time augmentation
    asks for a different pass."""
    best_path = run_dir / "best.pt"
    if best_path.exists():
        model.load_state_dict(final_weights(load_checkpoint(best_path)))  # the EMA's when they were best
    metrics = {"train_seconds": state["train_seconds"], "best_epoch": state["best_epoch"] or state["epoch"]}
    for split in ("val", "test"):
        if split in loaders:
            tta = cfg.trainer.get("tta")
            if split == "val" and best_val is not None and tta in (None, "none"):
                logits, labels = best_val
            else:
                logits, labels, _, bad = predict_logits(with_tta(model, tta), loaders[split], normalize, amp_dtype)
                if skipped is not None:
                    skipped.add(bad)
            metrics.update(classification_metrics(logits, labels, len(classes), split, cfg.trainer.top_k))
            if is_main():
                write_report(run_dir / "reports", split, logits, labels, classes)
    if is_main():
        write_json(run_dir / "metrics.json", metrics)
        plot_curves(state["history"], run_dir / "curves.png")
    shown = {k: round(v, 4) for k, v in metrics.items()
             if k.endswith(("top1", "top5", "balanced_accuracy", "macro_f1"))}
    log(f"done in {state['train_seconds']:.1f}s of training; best epoch {metrics['best_epoch']}; {shown}; "
        f"run directory {run_dir}")
    return metrics


def _improved(row: dict, state: dict, monitor: str) -> bool:
    """Whether this epoch beats the best so far; without the metric, the newest epoch counts."""
    value = row.get(monitor)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        better = value is None
    else:
        lower_is_better = "loss" in monitor
        better = state["best"] is None or (value < state["best"] if lower_is_better else value > state["best"])
    if better:
        state["best"], state["best_epoch"] = value, row["epoch"]
    return better


def _checkpoint(model, optimizer, scheduler, state: dict, meta: dict) -> dict:
    """`epoch` counts finished epochs; `step` > 0 marks a checkpoint taken that many steps into the next
    one (on a signal), with the epoch's running sums in `partial`."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": state["epoch"], "step": state.get("step", 0), "partial": state.get("partial"),
            "bad_steps": state.get("bad_steps", 0), "history": state["history"], "best": state["best"],
            "best_epoch": state["best_epoch"], "train_seconds": state["train_seconds"], "rng": rng_state(), **meta}


def save_progress(model, optimizer, scheduler, state: dict, meta: dict, run_dir: Path, improved: bool) -> None:
    """last.pt, and best.pt when improved; weights holding NaN or Inf are never saved."""
    if not is_main():
        return
    check_finite(model, state["epoch"] + 1 if state.get("step") else state["epoch"])
    checkpoint = _checkpoint(model, optimizer, scheduler, state, meta)
    save_checkpoint(checkpoint, run_dir / "last.pt")
    if improved:
        copy_checkpoint(run_dir / "last.pt", run_dir / "best.pt", checkpoint)


def check_finite(model, epoch: int) -> None:
    if not all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()):
        raise NonFiniteError(f"the weights became NaN or Inf in epoch {epoch} and were not saved")


def last_good(run_dir: Path, resumed_from: str | None = None) -> str:
    """Where to go back to after a numerical fault, in words."""
    found = newest_checkpoint(run_dir)
    if found is None:
        return resumed_from or "none: no epoch finished yet"
    path, checkpoint = found
    step = checkpoint.get("step", 0)
    return f"{path} (after epoch {checkpoint['epoch']}{f', step {step}' if step else ''})"


def resume(path: str, model, optimizer, meta: dict, run_dir: Path | None = None) -> dict | None:
    """Load the checkpoint to continue from into model and optimizer; returns the loop state to continue.

    `path` is a checkpoint file, a run directory, or `auto` for run_dir: in a directory the furthest-
    trained last.pt/best.pt that loads is taken. `auto` with no checkpoint yet returns None (start afresh).
    """
    if path == "auto" or Path(path).expanduser().is_dir():
        folder = run_dir if path == "auto" else Path(path).expanduser()
        found = newest_checkpoint(folder)
        if found is None and path == "auto":
            log(f"trainer.resume=auto: no checkpoint in {folder} yet, starting from scratch")
            return None
        if found is None:
            raise UserError(f"trainer.resume={path}: no last.pt or best.pt that loads in that folder.")
        path, checkpoint = found
    else:
        checkpoint = load_checkpoint(path)
    trained_for, this_run = checkpoint.get("task", "classification"), meta.get("task", "classification")
    if trained_for != this_run:
        raise UserError(f"{path} is a {trained_for} checkpoint; this run is task={this_run}.")
    if checkpoint["classes"] != meta["classes"]:
        raise UserError(f"{path} was trained on classes {checkpoint['classes']}, this data has {meta['classes']}.")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    restore_rng_state(checkpoint["rng"])
    step = checkpoint.get("step", 0)
    log(f"resumed from {path} after epoch {checkpoint['epoch']}{f', step {step}' if step else ''}")
    state = {key: checkpoint[key] for key in ("epoch", "history", "best", "best_epoch", "train_seconds")}
    state.update(step=step, partial=checkpoint.get("partial"), bad_steps=checkpoint.get("bad_steps", 0),
                 resumed_from=str(path))
    if step:
        state["rng"] = checkpoint["rng"]  # restored again once the epoch's loader exists (Loop.train_epoch)
    return state


def write_run_info(run_dir: Path, data, meta: dict, total: int, trainable: int) -> None:
    if not is_main():
        return
    OmegaConf.save(OmegaConf.create(meta["config"]), run_dir / "config.yaml")
    (run_dir / "classes.json").write_text(json.dumps(data.classes, indent=1) + "\n")
    info = {"preprocess": meta["preprocess"], "weights_source": meta["weights_source"], "data": data.description,
            "splits": _counts(data), "parameters": total, "trainable_parameters": trainable}
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")


class SkippedFiles:
    """What a run could not use (unreadable images, manifest rows, COCO boxes): each listed once, with its
    reason, in RUN/skipped_images.csv as soon as it is found (indexing, cache, any epoch, any split), and
    counted in one warning line at the end."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "skipped_images.csv"
        self.reasons: dict[str, str] = {}
        if self.path.exists():  # a resumed run: what the earlier part found
            with open(self.path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
                self.reasons = {row["path"]: row["reason"] for row in csv.DictReader(handle)}

    def add(self, skipped: list[tuple[str, str]]) -> None:
        new = {path: reason for path, reason in skipped if path not in self.reasons}
        self.reasons.update(new)
        if new and is_main():
            append_skipped(self.path.parent, list(new.items()))

    def report(self) -> None:
        if self.reasons:
            kinds = collections.Counter(map(_reason_kind, self.reasons.values()))
            summary = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
            log(f"warning: skipped {len(self.reasons)} image(s) or annotation(s) ({summary}); list in {self.path}")


def _reason_kind(reason: str) -> str:
    """'truncated file', 'decompression bomb (…)' → the words before any detail, for the warning's summary."""
    if reason.startswith("same file as"):
        return "in two splits"
    if reason.startswith("listed in"):
        return "missing"
    return reason.split(" (")[0]


def append_skipped(run_dir: Path, skipped: list[tuple[str, str]]) -> None:
    path = run_dir / "skipped_images.csv"
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8", errors="surrogateescape") as handle:  # names as on disk
        writer = csv.writer(handle)
        if new:
            writer.writerow(["path", "reason"])
        writer.writerows(skipped)


def write_epoch(run_dir: Path, history: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in history for key in row))
    temporary = run_dir / "metrics.csv.tmp"
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    temporary.replace(run_dir / "metrics.csv")


def _counts(data) -> dict[str, int]:
    return {name: len(dataset) for name, dataset in data.datasets.items()}


def _summary(row: dict, epochs: int, improved: bool) -> str:
    parts = [f"epoch {row['epoch']:>3}/{epochs}", f"train loss {row['train/loss']:.4f}",
             f"train top1 {row['train/top1']:.4f}"]
    if "val/top1" in row:
        parts += [f"val loss {row['val/loss']:.4f}", f"val top1 {row['val/top1']:.4f}"]
    parts += [f"lr {row['lr']:.2e}", f"{row['seconds']:.1f}s"]
    return " | ".join(parts) + (" *" if improved else "")


def progress_mode(progress: str) -> str:
    require(progress, ("auto", "bar", "plain", "off"), "trainer.progress")
    if progress == "auto":
        return "bar" if sys.stderr.isatty() else "plain"
    return progress


def log(message: str) -> None:
    if is_main():
        print(message, flush=True)

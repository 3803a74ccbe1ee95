"""The training loop, top to bottom: data → model → transforms → loaders → epochs → report.

Written for one process today and torchrun tomorrow: files are written only by the main process
(`is_main`), samplers are chosen in `build_loader`, metrics come from whole-split logits.
"""

from __future__ import annotations

import csv
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from tqdm import tqdm

from transfer.checkpoint import load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from transfer.config import require, to_dict
from transfer.data.loaders import build_datasets, build_loader, index_data
from transfer.distributed import is_main
from transfer.errors import UserError
from transfer.evaluate import classification_metrics, plot_curves, write_json, write_report
from transfer.inference import Normalizer, autocast, pick_amp, pick_device, predict_logits
from transfer.models.backbone import build_model, count_parameters, resolve_preprocess, to_channels_last
from transfer.models.finetune import STRATEGIES, apply_strategy, set_train_mode


DIGITS_INPUT_SIZE = 64


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    """Fine-tune as configured, write the run directory, return the final metrics."""
    require(cfg.finetune.strategy, STRATEGIES, "finetune.strategy")
    seed_everything(cfg.seed)
    device = pick_device(cfg.trainer.device)
    amp_dtype = pick_amp(cfg.trainer.amp, device)
    splits = index_data(cfg.data)
    model, weights_source = build_model(num_classes=len(splits.classes), **cfg.model)
    preprocess = resolve_preprocess(model, **preprocess_overrides(cfg))
    data = build_datasets(splits, cfg.data, preprocess, OmegaConf.to_container(cfg.augment.train), cfg.seed)
    apply_strategy(model, cfg.finetune.strategy)
    model = to_channels_last(model, device, cfg.trainer.channels_last)
    normalize = Normalizer(preprocess["mean"], preprocess["std"], device, cfg.trainer.channels_last)
    loaders = {name: build_loader(dataset, cfg.data.batch_size if name == "train" else cfg.data.eval_batch_size,
                                  train=name == "train", num_workers=cfg.data.num_workers, seed=cfg.seed,
                                  pin_memory=device.type == "cuda")
               for name, dataset in data.datasets.items()}
    if len(loaders["train"]) == 0:
        raise UserError("the training split is empty.")
    optimizer = create_optimizer_v2(model, **cfg.optim)
    scheduler, _ = create_scheduler_v2(optimizer, num_epochs=cfg.trainer.epochs, step_on_epochs=False,
                                       updates_per_epoch=len(loaders["train"]), **cfg.schedule)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.trainer.label_smoothing)
    meta = {"classes": data.classes, "preprocess": preprocess, "weights_source": weights_source,
            "config": to_dict(cfg)}
    total, trainable = count_parameters(model)
    write_run_info(run_dir, data, meta, total, trainable)
    log(f"{cfg.model.name} ({weights_source}), {trainable:,}/{total:,} parameters trained, "
        f"{len(data.classes)} classes, splits {_counts(data)}, input {preprocess['input_size'][1:]}, "
        f"device {device}{', amp ' + str(amp_dtype).split('.')[-1] if amp_dtype else ''}")
    if data.skipped:
        log(f"warning: skipped {len(data.skipped)} unreadable image(s); list in {run_dir / 'skipped_images.csv'}")

    state = {"epoch": 0, "history": [], "best": None, "best_epoch": None, "train_seconds": 0.0}
    if cfg.trainer.resume:
        state = resume(cfg.trainer.resume, model, optimizer, scheduler, meta)
    loop = Loop(model, optimizer, scheduler, criterion, normalize, amp_dtype, cfg, device)
    for epoch in range(state["epoch"], cfg.trainer.epochs):
        started = time.perf_counter()
        seed_everything(cfg.seed * 1_000 + epoch)  # dropout / drop-path: keyed by epoch, exact on resume
        row = {"epoch": epoch + 1, **loop.train_epoch(loaders["train"], epoch, run_dir)}
        if "val" in loaders and ((epoch + 1) % cfg.trainer.eval_every == 0 or epoch + 1 == cfg.trainer.epochs):
            logits, labels, _, _ = predict_logits(model, loaders["val"], normalize, amp_dtype)
            row.update(classification_metrics(logits, labels, len(data.classes), "val", cfg.trainer.top_k))
        row["seconds"] = time.perf_counter() - started
        state["train_seconds"] += row["seconds"]
        state["history"].append(row)
        improved = _improved(row, state, cfg.trainer.monitor)
        state["epoch"] = epoch + 1
        if is_main():
            write_epoch(run_dir, state["history"])
            checkpoint = _checkpoint(model, optimizer, scheduler, state, meta)
            save_checkpoint(checkpoint, run_dir / "last.pt")
            if improved:
                save_checkpoint(checkpoint, run_dir / "best.pt")
        log(_summary(row, cfg.trainer.epochs, improved))
    return finish(model, loaders, normalize, amp_dtype, data.classes, state, run_dir, cfg)


def preprocess_overrides(cfg: DictConfig) -> dict:
    """The user's preprocessing; the embedded 8×8 digits default to a small input, not the model's 224."""
    overrides = OmegaConf.to_container(cfg.preprocess)
    if cfg.data.root is None and overrides["input_size"] is None:
        overrides["input_size"] = DIGITS_INPUT_SIZE
    return overrides


class Loop:
    """One epoch of optimisation; holds what every step needs."""

    def __init__(self, model, optimizer, scheduler, criterion, normalize, amp_dtype, cfg, device):
        self.model, self.optimizer, self.scheduler, self.criterion = model, optimizer, scheduler, criterion
        self.normalize, self.amp_dtype, self.device = normalize, amp_dtype, device
        self.strategy = cfg.finetune.strategy
        self.grad_clip = cfg.trainer.grad_clip
        self.progress = progress_mode(cfg.trainer.progress)
        self.epochs = cfg.trainer.epochs
        use_scaler = amp_dtype == torch.float16 and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    def train_epoch(self, loader, epoch: int, run_dir: Path) -> dict[str, float]:
        set_train_mode(self.model, self.strategy)
        loader.sampler.set_epoch(epoch)
        steps = len(loader)
        loss_sum, correct, seen, skipped = 0.0, 0, 0, []
        bar = tqdm(loader, total=steps, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False,
                   disable=self.progress != "bar", dynamic_ncols=True)
        for step, batch in enumerate(bar):
            skipped += batch["skipped"]
            if len(batch["label"]) == 0:
                continue
            labels = batch["label"].to(self.device, non_blocking=True)
            loss, logits = self.step(batch["image"], labels)
            loss_sum += loss * len(labels)
            correct += (logits.argmax(dim=1) == labels).sum().item()
            seen += len(labels)
            self.scheduler.step_update(num_updates=epoch * steps + step + 1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
        self.scheduler.step(epoch + 1)
        if skipped and is_main():
            append_skipped(run_dir, skipped)
        return {"lr": self.optimizer.param_groups[0]["lr"], "train/loss": loss_sum / max(seen, 1),
                "train/top1": correct / max(seen, 1)}

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
        with autocast(self.device, self.amp_dtype):
            logits = self.model(self.normalize(images))
            loss = self.criterion(logits, labels)
        if not torch.isfinite(loss):
            raise UserError(f"the loss became {loss.item()}: lower optim.lr, set trainer.grad_clip, or "
                            "check the data. The last good checkpoint is last.pt in the run directory.")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            self._clip()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self._clip()
            self.optimizer.step()
        return loss.item(), logits.detach()

    def _clip(self) -> None:
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)


def finish(model, loaders, normalize, amp_dtype, classes, state, run_dir: Path, cfg) -> dict[str, float]:
    """Evaluate the best checkpoint on every held-out split and write the reports."""
    best_path = run_dir / "best.pt"
    if best_path.exists():
        model.load_state_dict(load_checkpoint(best_path)["model"])
    metrics = {"train_seconds": state["train_seconds"], "best_epoch": state["best_epoch"] or state["epoch"]}
    for split in ("val", "test"):
        if split in loaders:
            logits, labels, _, _ = predict_logits(model, loaders[split], normalize, amp_dtype)
            metrics.update(classification_metrics(logits, labels, len(classes), split, cfg.trainer.top_k))
            if is_main():
                write_report(run_dir / "reports", split, logits, labels, classes)
    if is_main():
        write_json(run_dir / "metrics.json", metrics)
        plot_curves(state["history"], run_dir / "curves.png")
    shown = {k: round(v, 4) for k, v in metrics.items() if k.endswith(("top1", "top5", "macro_f1"))}
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
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": state["epoch"], "history": state["history"], "best": state["best"],
            "best_epoch": state["best_epoch"], "train_seconds": state["train_seconds"], "rng": rng_state(), **meta}


def resume(path: str, model, optimizer, scheduler, meta: dict) -> dict:
    checkpoint = load_checkpoint(path)
    if checkpoint["classes"] != meta["classes"]:
        raise UserError(f"{path} was trained on classes {checkpoint['classes']}, this data has {meta['classes']}.")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    restore_rng_state(checkpoint["rng"])
    log(f"resumed from {path} after epoch {checkpoint['epoch']}")
    return {key: checkpoint[key] for key in ("epoch", "history", "best", "best_epoch", "train_seconds")}


def write_run_info(run_dir: Path, data, meta: dict, total: int, trainable: int) -> None:
    if not is_main():
        return
    (run_dir / "classes.json").write_text(json.dumps(data.classes, indent=1) + "\n")
    info = {"preprocess": meta["preprocess"], "weights_source": meta["weights_source"], "data": data.description,
            "splits": _counts(data), "parameters": total, "trainable_parameters": trainable}
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
    if data.skipped:
        append_skipped(run_dir, data.skipped)


def append_skipped(run_dir: Path, skipped: list[tuple[str, str]]) -> None:
    path = run_dir / "skipped_images.csv"
    new = not path.exists()
    with open(path, "a", newline="") as handle:
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

"""The loop for dense tasks (segmentation, detection), top to bottom like transfer/train.py, reusing its
parts: timm's optimizer and per-update schedules (transfer.optim), the fine-tune plan and BatchNorm policy
(transfer.models.finetune), atomic checkpoints, metrics.csv, skipped-file reports and the stop signal.

A task object (dense/segmentation.py, dense/detection.py) brings what differs:
    name, monitor                          e.g. "segmentation", "val/miou" (the default of task.monitor)
    build_datasets(cfg, preprocess)     -> ({split: Dataset}, classes, skipped [(path, reason)])
    collate(samples)                    -> batch dict: "image" (as the model takes it), targets, "skipped"
    build_model(cfg, num_classes)       -> (DenseModel with .backbone / .head, weights source)
    loss(model, batch)                  -> scalar tensor (model in train mode)
    evaluate(model, loader)             -> {metric: value} without split prefix
    predict(model, images) / write_predictions(chunks of (names, outputs), folder) -> images written
    write_overlays(model, dataset, folder, count)
    checkpoint_entries() / restore(checkpoint), skipped (files found bad inside batches)

Resume continues after the last finished epoch: a stop signal mid-epoch keeps last.pt at the epoch before.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from transfer.checkpoint import load_checkpoint, remove_temporaries
from transfer.config import require, to_dict
from transfer.data.dataset import raise_if_strict
from transfer.data.loaders import build_loader
from transfer.dense import build_task
from transfer.distributed import is_main
from transfer.errors import UserError
from transfer.evaluate import write_json
from transfer.inference import autocast, pick_amp, pick_device
from transfer.interrupt import Interrupted, StopSignal
from transfer.models.backbone import count_parameters, resolve_preprocess, to_channels_last
from transfer.models.finetune import STRATEGIES, apply_strategy, set_train_mode
from transfer.optim import PhaseScheduler, build_optimizer
from transfer.train import (NonFiniteError, SkippedFiles, _improved, check_finite, log, preprocess_overrides,
                            resume, save_progress, seed_everything, write_epoch)


def train_dense(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    """Fine-tune a dense task as configured, write the run directory, return the final metrics."""
    require(cfg.finetune.strategy, STRATEGIES, "finetune.strategy")
    seed_everything(cfg.seed)
    task = build_task(cfg.task.name)
    device = pick_device(cfg.trainer.device)
    precision = MixedPrecision(pick_amp(cfg.trainer.amp, device), device)
    if precision.dtype is not None and not getattr(task, "mixed_precision", True):
        log(f"trainer.amp={cfg.trainer.amp}: {task.name} trains in float32 (its losses are not stable under autocast)")
        precision = MixedPrecision(None, device)
    refuse_classification_only(cfg)
    monitor = cfg.task.get("monitor") or task.monitor  # task.monitor: any val/ metric; names with loss are minimised
    preprocess = dense_preprocess(cfg)
    datasets, classes, skipped_at_start = task.build_datasets(cfg, preprocess)
    model, weights_source = task.build_model(cfg, len(classes))
    plan = apply_strategy(model, cfg.finetune, cfg.trainer.epochs)
    model = to_channels_last(model, device, cfg.trainer.channels_last)
    loaders = {name: dense_loader(dataset, task, cfg, train=name == "train") for name, dataset in datasets.items()}
    optimizer = build_optimizer(model, plan, OmegaConf.to_container(cfg.optim))
    scheduler = PhaseScheduler(optimizer, plan, OmegaConf.to_container(cfg.schedule), cfg.optim.lr,
                               len(loaders["train"]))
    meta = {"task": task.name, "classes": classes, "preprocess": preprocess, "weights_source": weights_source,
            "config": to_dict(cfg), **getattr(task, "checkpoint_entries", dict)()}
    state = {"epoch": 0, "step": 0, "partial": None, "bad_steps": 0, "history": [], "best": None,
             "best_epoch": None, "train_seconds": 0.0}
    if cfg.trainer.resume:
        state.update(resume(cfg.trainer.resume, model, optimizer, meta, run_dir) or {})  # dense: whole epochs
        scheduler.step_update(num_updates=state["epoch"] * len(loaders["train"]))
    total, trainable = count_parameters(model)
    write_run_info(run_dir, meta, datasets, total, trainable)
    log(f"{task.name}: {cfg.model.name} ({weights_source}), {trainable:,}/{total:,} parameters trained, "
        f"{len(classes)} classes, splits { {k: len(v) for k, v in datasets.items()} }, input "
        f"{preprocess['input_size'][1:]}, device {device}")
    skipped = SkippedFiles(run_dir)
    skipped.add(skipped_at_start)
    if is_main():
        remove_temporaries(run_dir)
    try:
        with StopSignal() as stop:
            for epoch in range(state["epoch"], cfg.trainer.epochs):
                started = time.perf_counter()
                seed_everything(cfg.seed * 1_000 + epoch)
                row = train_epoch(task, model, plan, optimizer, scheduler, loaders["train"], epoch, skipped, stop, cfg,
                                  precision)
                if row is None:  # stopped between two steps: the epoch is dropped, last.pt is the one before
                    raise interrupted(stop, run_dir, f"in epoch {epoch + 1}/{cfg.trainer.epochs}; last.pt holds "
                                                     f"epoch {state['epoch']}")
                check_finite(model, epoch + 1)
                row = {"epoch": epoch + 1, **row}
                if "val" in loaders and ((epoch + 1) % cfg.trainer.eval_every == 0 or epoch + 1 == cfg.trainer.epochs):
                    row.update(prefixed(task.evaluate(model, loaders["val"]), "val"))
                    skipped.add(drain(task))
                row["seconds"] = time.perf_counter() - started
                state["train_seconds"] += row["seconds"]
                state["history"].append(row)
                improved = _improved(row, state, monitored(row, monitor))
                state["epoch"] = epoch + 1
                if is_main():
                    write_epoch(run_dir, state["history"])
                save_progress(model, optimizer, scheduler, state, meta, run_dir, improved)
                log(summary(row, cfg.trainer.epochs, monitor, improved))
                if stop.requested:
                    raise interrupted(stop, run_dir, f"after epoch {epoch + 1}/{cfg.trainer.epochs}; last.pt written")
        return finish(task, model, loaders, datasets, state, run_dir, cfg, skipped, monitor)
    except NonFiniteError as error:
        raise UserError(f"{error}. Lower optim.lr, set trainer.grad_clip or check the data; last.pt holds the last "
                        f"good epoch ({state['epoch']}).") from None
    finally:
        skipped.report()


def refuse_classification_only(cfg: DictConfig) -> None:
    """Techniques of the classification loop that this one does not have: say so rather than ignore them."""
    mixup = cfg.get("mixup") or {}
    used = {"mixup=none": mixup.get("mixup_alpha", 0) or mixup.get("cutmix_alpha", 0),
            "trainer.accumulate_steps=1": cfg.trainer.get("accumulate_steps", 1) != 1,
            "ema.enabled=false": (cfg.get("ema") or {}).get("enabled", False),
            "optim.lr=<a number>": cfg.optim.lr == "auto",
            "data.sampler=random": cfg.data.get("sampler", "random") != "random"}
    fixes = [fix for fix, on in used.items() if on]
    if fixes:
        raise UserError(f"task={cfg.task.name} trains without mixup, accumulation, EMA, the LR finder and the "
                        f"balanced sampler: set {' '.join(fixes)}.")


def dense_preprocess(cfg: DictConfig) -> dict:
    """The model's data config with the user's overrides, read off a features model of the architecture
    (cheap: no weights) so the datasets can be built before the backbone's weights are loaded."""
    import timm

    from transfer.models.backbone import check_model_name

    check_model_name(cfg.model.name)
    probe = timm.create_model(cfg.model.name, pretrained=False, num_classes=0)
    return resolve_preprocess(probe, **preprocess_overrides(cfg))


def dense_loader(dataset, task, cfg: DictConfig, train: bool) -> DataLoader:
    """Classification's loader (sampler keyed by seed and epoch, workers, pinning, prefetch) with the task's
    collate function; data.sampler=balanced has no class per image here (refuse_classification_only)."""
    return build_loader(dataset, cfg.data.batch_size if train else cfg.data.eval_batch_size, train=train,
                        num_workers=cfg.data.num_workers, seed=cfg.seed,
                        pin_memory=pick_device(cfg.trainer.device).type == "cuda",
                        collate_fn=task.collate)


class MixedPrecision:
    """trainer.amp for the training step: the forward pass and loss under autocast (bf16, or fp16 with a
    GradScaler on CUDA), as the classification loop does. Evaluation stays in float32: box coordinates and
    scores would lose precision in bf16."""

    def __init__(self, dtype: torch.dtype | None, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self.scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 and device.type == "cuda" else None

    def loss(self, task, model, batch: dict) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            return task.loss(model, batch).float()

    def update(self, loss: torch.Tensor, model, optimizer, grad_clip: float | None) -> None:
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(optimizer)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()


def train_epoch(task, model, plan, optimizer, scheduler, loader: DataLoader, epoch: int, skipped: SkippedFiles,
                stop: StopSignal, cfg: DictConfig, precision: MixedPrecision | None = None) -> dict[str, float] | None:
    """One epoch of updates, the schedule stepped per update; None when a stop was requested mid-epoch."""
    precision = precision or MixedPrecision(None, next(model.parameters()).device)
    set_train_mode(model, plan, epoch)
    loader.sampler.set_epoch(epoch)
    steps, loss_sum, seen = len(loader), 0.0, 0
    for step, batch in enumerate(loader):
        raise_if_strict(batch)
        skipped.add(batch["skipped"])
        if len(batch["index"]):
            loss = precision.loss(task, model, batch)
            if not torch.isfinite(loss):
                raise UserError(f"the loss became {loss.item()} in epoch {epoch + 1} at step {step + 1}/{steps}. "
                                "Lower optim.lr or set trainer.grad_clip.")
            precision.update(loss, model, optimizer, cfg.trainer.grad_clip)
            loss_sum += loss.item() * len(batch["index"])
            seen += len(batch["index"])
        scheduler.step_update(num_updates=epoch * steps + step + 1)
        if stop.requested and step + 1 < steps:
            return None
    return {"lr": optimizer.param_groups[0]["lr"], "train/loss": loss_sum / max(seen, 1)}


def monitored(row: dict, monitor: str) -> str:
    """`monitor`, once it is known to be one of the epoch's metrics (a misspelling stops the run at the first
    validation, naming the choices); epochs without validation have no metric to compare."""
    evaluated = [key for key in row if key.startswith("val/")]
    if evaluated and monitor not in row:
        raise UserError(f"task.monitor={monitor} is not a metric of this task. Choose one of: "
                        f"{', '.join(evaluated)}.")
    return monitor


def prefixed(metrics: dict[str, float], split: str) -> dict[str, float]:
    return {f"{split}/{key}": value for key, value in metrics.items()}


def drain(task) -> list[tuple[str, str]]:
    """Files the task found bad inside evaluation batches since the last call."""
    found, task.skipped = list(getattr(task, "skipped", [])), []
    return found


def interrupted(stop: StopSignal, run_dir: Path, where: str) -> Interrupted:
    command = ["transfer", "train", "--config", str(run_dir / "config.yaml"), f"trainer.resume={run_dir / 'last.pt'}"]
    return Interrupted(f"interrupted {where}; resume with: {shlex.join(command)}", stop.exit_code)


def finish(task, model, loaders, datasets, state: dict, run_dir: Path, cfg: DictConfig,
           skipped: SkippedFiles, monitor: str) -> dict[str, float]:
    """Evaluate best.pt on every held-out split, draw the overlays, write metrics.json and the curves."""
    best = run_dir / "best.pt"
    if best.exists():
        model.load_state_dict(load_checkpoint(best)["model"])
    metrics = {"train_seconds": state["train_seconds"], "best_epoch": state["best_epoch"] or state["epoch"]}
    for split in ("val", "test"):
        if split in loaders:
            metrics.update(prefixed(task.evaluate(model, loaders[split]), split))
    skipped.add(drain(task))
    shown_split = "val" if "val" in datasets else "test" if "test" in datasets else "train"
    if is_main():
        count = int(cfg.task.get("overlays", 0) or 0)
        if count:
            task.write_overlays(model, datasets[shown_split], run_dir / "overlays", count)
        write_json(run_dir / "metrics.json", metrics)
        plot_dense_curves(state["history"], monitor, run_dir / "curves.png")
    headline = {k: round(v, 4) for k, v in metrics.items() if k.split("/")[-1] in ("miou", "pixel_accuracy", "map",
                                                                                    "map50")}
    log(f"done in {state['train_seconds']:.1f}s of training; best epoch {metrics['best_epoch']}; {headline}; "
        f"run directory {run_dir}")
    return metrics


def plot_dense_curves(history: list[dict], monitor: str, path: Path) -> None:
    """Train and val loss, and the monitored metric, per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for plot, keys in zip(axes, (("train/loss", "val/loss"), (monitor,))):
        for key in keys:
            points = [(row["epoch"], row[key]) for row in history if key in row]
            if points:
                plot.plot(*zip(*points), marker="o", label=key)
        plot.set_xlabel("epoch")
        plot.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def summary(row: dict, epochs: int, monitor: str, improved: bool) -> str:
    parts = [f"epoch {row['epoch']:>3}/{epochs}", f"train loss {row['train/loss']:.4f}"]
    if "val/loss" in row:
        parts.append(f"val loss {row['val/loss']:.4f}")
    if monitor in row:
        parts.append(f"{monitor} {row[monitor]:.4f}")
    parts += [f"lr {row['lr']:.2e}", f"{row['seconds']:.1f}s"]
    return " | ".join(parts) + (" *" if improved else "")


def write_run_info(run_dir: Path, meta: dict, datasets: dict, total: int, trainable: int) -> None:
    if not is_main():
        return
    OmegaConf.save(OmegaConf.create(meta["config"]), run_dir / "config.yaml")
    (run_dir / "classes.json").write_text(json.dumps(meta["classes"], indent=1) + "\n")
    info = {"task": meta["task"], "preprocess": meta["preprocess"], "weights_source": meta["weights_source"],
            "data": str(meta["config"]["data"]["root"]), "splits": {k: len(v) for k, v in datasets.items()},
            "parameters": total, "trainable_parameters": trainable}
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# checkpoints for predict and export


def is_dense(checkpoint: dict) -> bool:
    return checkpoint.get("task", "classification") != "classification"


def dense_from_checkpoint(checkpoint: dict):
    """(task restored from the checkpoint, its model with the fine-tuned weights, CPU, eval mode)."""
    cfg = OmegaConf.create(checkpoint["config"])
    cfg.model.pretrained = False  # the weights come from the checkpoint
    task = build_task(checkpoint["task"])
    task.restore(checkpoint)
    model, _ = task.build_model(cfg, len(checkpoint["classes"]))
    model.load_state_dict(checkpoint["model"])
    return task, model.eval()


def backbone_as_classifier(checkpoint: dict, state: dict) -> tuple[torch.nn.Module, list[str]]:
    """The dense model's fine-tuned backbone inside the headless timm classifier of its architecture, for
    `transfer export`; also the classifier's tensors the backbone does not cover (EfficientNet's conv_head:
    past the last feature level, never trained), which the export must leave out or refuse to ship."""
    import timm

    from transfer.dense.backbone import _key

    classifier = timm.create_model(checkpoint["config"]["model"]["name"], pretrained=False, num_classes=0)
    trained = {_key(k.removeprefix("backbone.")): v for k, v in state.items() if k.startswith("backbone.")}
    target = classifier.state_dict()
    filled = {k: trained[_key(k)] for k in target if _key(k) in trained and trained[_key(k)].shape == target[k].shape}
    classifier.load_state_dict(filled, strict=False)
    return classifier.eval(), [k for k in target if k not in filled]

"""A run's progress in checkpoints: what they hold, how they are written, and how a run continues from one.

`epoch` counts finished epochs; `step` > 0 marks a checkpoint taken that many steps into the next one (on a
signal), with that epoch's running sums in `partial`, so a resumed run repeats and skips nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from transfer.checkpoint import (copy_checkpoint, load_checkpoint, newest_checkpoint, restore_rng_state, rng_state,
                                 save_checkpoint)
from transfer.distributed import is_main, rank, world_size
from transfer.engine.rundir import log
from transfer.errors import UserError


class NonFiniteError(ArithmeticError):
    """Training produced NaN or Inf; the message says where, the engine adds the checkpoint to go back to."""


def fresh_state(seconds: float = 0.0) -> dict:
    return {"epoch": 0, "step": 0, "partial": None, "bad_steps": 0, "history": [], "best": None,
            "best_epoch": None, "train_seconds": seconds}


def checkpoint_of(model, optimizer, scheduler, scaler, state: dict, meta: dict) -> dict:
    entries = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
               "rng": rng_state(), **{key: state.get(key) for key in ("epoch", "step", "partial", "bad_steps",
                                                                      "history", "best", "best_epoch",
                                                                      "train_seconds")}}
    if scaler is not None:
        entries["scaler"] = scaler.state_dict()
    return {**entries, **meta}


def save_progress(model, optimizer, scheduler, scaler, state: dict, meta: dict, run_dir: Path,
                  improved: bool) -> None:
    """last.pt, and best.pt when improved; weights holding NaN or Inf are never saved."""
    if not is_main():
        return
    check_finite(model, state["epoch"] + 1 if state.get("step") else state["epoch"])
    checkpoint = checkpoint_of(model, optimizer, scheduler, scaler, state, meta)
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


def find_checkpoint(path: str, run_dir: Path) -> tuple[str, dict] | None:
    """`path` is a checkpoint file, a run directory, or `auto` for run_dir: in a directory the furthest-trained
    last.pt/best.pt that loads is taken. `auto` with no checkpoint yet returns None (start afresh)."""
    if path == "auto" or Path(path).expanduser().is_dir():
        folder = run_dir if path == "auto" else Path(path).expanduser()
        found = newest_checkpoint(folder)
        if found is None and path == "auto":
            log(f"trainer.resume=auto: no checkpoint in {folder} yet, starting from scratch")
            return None
        if found is None:
            raise UserError(f"trainer.resume={path}: no last.pt or best.pt that loads in that folder.")
        return str(found[0]), found[1]
    return path, load_checkpoint(path)


def rank_state(checkpoint: dict, step: int, path: str) -> dict:
    """This process's random streams (and, mid-epoch, BatchNorm statistics) in the checkpoint. Another number
    of processes shards the data differently: fine from an epoch's end (the epoch's order is keyed by seed and
    epoch; the effective batch changes), refused mid-epoch, whose remaining batches were another sharding's."""
    saved, now = int(checkpoint.get("world_size", 1)), world_size()
    if saved != now:
        if step:
            raise UserError(f"{path} was saved {step} steps into an epoch by a run of {saved} process(es); this run "
                            f"has {now}. Resume it with {saved} process(es) (trainer.processes={saved}), or resume "
                            "from the last epoch's end with best.pt or an epoch-end last.pt.")
        log(f"resuming a run of {saved} process(es) with {now}: the effective batch changes accordingly; the "
            "schedule follows this run's steps per epoch")
    ranks = checkpoint.get("ranks")
    return ranks[rank()] if ranks and saved == now else {"rng": checkpoint["rng"]}


def load_buffers(model, buffers: dict | None) -> None:
    """A rank's own BatchNorm statistics from a mid-epoch checkpoint of several processes."""
    if not buffers:
        return
    for name, tensor in model.named_buffers():
        if name in buffers:
            tensor.copy_(buffers[name])


def resume(path: str, model, optimizer, scaler, meta: dict, run_dir: Path) -> dict | None:
    """Load the checkpoint to continue from into model, optimizer and gradient scaler; returns the loop state
    to continue (None: nothing to continue, start afresh)."""
    found = find_checkpoint(path, run_dir)
    if found is None:
        return None
    path, checkpoint = found
    trained_for, this_run = checkpoint.get("task", "classification"), meta["task"]
    if trained_for != this_run:
        raise UserError(f"{path} is a {trained_for} checkpoint; this run is task={this_run}.")
    if checkpoint["classes"] != meta["classes"]:
        raise UserError(f"{path} was trained on classes {checkpoint['classes']}, this data has {meta['classes']}.")
    step = checkpoint.get("step", 0)
    own = rank_state(checkpoint, step, path)
    rng = own["rng"]
    model.load_state_dict(checkpoint["model"])
    load_buffers(model, own.get("buffers"))
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    restore_rng_state(rng)
    log(f"resumed from {path} after epoch {checkpoint['epoch']}{f', step {step}' if step else ''}")
    state = {key: checkpoint[key] for key in ("epoch", "history", "best", "best_epoch", "train_seconds")}
    state.update(step=step, partial=checkpoint.get("partial"), bad_steps=checkpoint.get("bad_steps", 0),
                 resumed_from=str(path), model_ema=checkpoint.get("model_ema"),
                 best_is_ema=checkpoint.get("best_is_ema"), ema_buffers=own.get("ema_buffers"))
    if step:
        state["rng"] = rng  # restored again once the epoch's loader exists (Loop.train_epoch)
    return state

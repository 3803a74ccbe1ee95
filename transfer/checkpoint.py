"""Checkpoints that describe themselves and never exist half-written.

A checkpoint holds everything needed to continue or reuse a run: weights, optimizer, scheduler,
epoch, RNG states, the resolved config, class names and the preprocessing used. It is written to a
temporary file in the same folder, fsynced, then renamed over the old one, so a crash or `kill -9`
at any moment leaves the previous checkpoint intact. Loading never unpickles code.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transfer.errors import UserError
from transfer.files import TEMPORARY_SUFFIX, atomic_write, fsync_folder
from transfer.files import remove_temporaries as remove_files

FORMAT_VERSION = 1
CHECKPOINT_NAMES = ("last.pt", "best.pt")
WEIGHT_CHOICES = ("auto", "model", "ema")


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write atomically and durably (transfer.files): a crash at any moment leaves the previous file intact.

    A failed write (full disk, quota, read-only folder) is a UserError; the previous file at `path`
    is left as it was and the temporary file is removed.
    """
    path = Path(path)
    try:
        with atomic_write(path, "wb", durable=True) as stream:
            torch.save({"format_version": FORMAT_VERSION, **state}, stream)
    except OSError as error:
        kept = f"The previous {path.name} is intact. " if path.exists() else ""
        raise UserError(f"cannot write checkpoint {path}: {error.strerror or error}. {kept}Free some disk space "
                        "or point hydra.run.dir at a writable folder, then resume.") from None


def copy_checkpoint(source: str | os.PathLike, path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Make `path` hold what `source` holds (just written from `state`): a hard link put in place by rename,
    so best.pt costs no second write of the same bytes; where links are refused, `state` is saved again.
    Safe because checkpoints are only ever replaced, never written in place."""
    path = Path(path)
    temporary = path.parent / f".{path.name}.link{TEMPORARY_SUFFIX}"
    try:
        temporary.unlink(missing_ok=True)
        os.link(source, temporary)
        os.replace(temporary, path)
        fsync_folder(path.parent)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink()
        save_checkpoint(state, path)


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete what an interrupted save_checkpoint left behind (`.<name>.*.tmp`); returns what went."""
    return remove_files(folder, f".*.pt.*{TEMPORARY_SUFFIX}")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load with weights_only=True; a file that is not a transfer checkpoint is a UserError.

    weights_only means tensors, numbers, strings and containers only: a pickle that would import
    or call anything (os.system, a class of the author's) is refused before any of it runs.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist. Runs keep theirs as <run dir>/best.pt and last.pt.")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(f"{path} was refused: it holds more than plain tensors, and unpickling it could run code "
                        f"({_refusal_reason(error)}). transfer loads with weights_only=True; if you trust the "
                        "file's author, re-save its weights as .safetensors.") from None
    except Exception as error:  # torch raises many types for a file that is not a checkpoint
        first_line = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise UserError(f"{path} is not a readable checkpoint ({first_line}).") from None
    if not isinstance(state, dict) or "model" not in state or "classes" not in state:
        raise UserError(f"{path} is not a transfer checkpoint (no model / classes inside).")
    return state


def _refusal_reason(error: Exception) -> str:
    """The line of torch's long message that names what the file wanted, e.g. `GLOBAL posix.system`."""
    message = str(error)
    found = re.search(r"(?:unsupported )?GLOBAL [\w.]+", message, re.IGNORECASE) or \
        re.search(r"Unsupported [^\n]+", message)
    return found.group(0) if found else "not a plain weights file"


def newest_checkpoint(folder: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """(path, state) of the furthest-trained checkpoint in a run folder that loads, or None.

    Only last.pt and best.pt are candidates (never a temporary file); progress is (epoch, step),
    with last.pt winning a tie. A file that does not load is passed over with a warning.
    """
    found = None
    for name in CHECKPOINT_NAMES:
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            state = load_checkpoint(path)
        except UserError as error:
            print(f"warning: passing over {path}: {error}", file=sys.stderr, flush=True)
            continue
        progress = (int(state.get("epoch", 0)), int(state.get("step", 0)))
        if found is None or progress > found[0]:
            found = (progress, path, state)
    return None if found is None else (found[1], found[2])


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, in a form that weights_only loading accepts."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), None))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def choose_weights(checkpoint: dict, choice: str, path: Path | str = "the checkpoint") -> tuple[dict, str]:
    """The EMA weights when the run found them best (or they are asked for), else the raw model's."""
    has_ema = checkpoint.get("model_ema") is not None
    if choice == "ema" and not has_ema:
        raise UserError(f"{path} holds no EMA weights (the run trained without EMA). Use weights=model or auto.")
    use_ema = choice == "ema" or (choice == "auto" and has_ema and bool(checkpoint.get("best_is_ema")))
    return (unwrapped(checkpoint["model_ema"]), "ema") if use_ema else (checkpoint["model"], "model")


def unwrapped(state: dict) -> dict:
    """timm's ModelEmaV3.state_dict() prefixes every key with 'module.'; the model's keys have none."""
    if state and all(key.startswith("module.") for key in state):
        return {key.removeprefix("module."): value for key, value in state.items()}
    return state


def final_weights(checkpoint: dict) -> dict:
    """The weights a run's evaluation uses: the EMA's when they were best, else the model's."""
    return choose_weights(checkpoint, "auto")[0]


class CheckpointFacts:
    """What a checkpoint says of the model it holds, for the objects built around one (`self.checkpoint`)."""

    checkpoint: dict

    @property
    def classes(self) -> list[str]:
        return list(self.checkpoint["classes"])

    @property
    def preprocess(self) -> dict:
        return dict(self.checkpoint["preprocess"])

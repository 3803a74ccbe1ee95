"""Checkpoints that describe themselves and never exist half-written.

A checkpoint holds everything needed to continue or reuse a run: weights, optimizer, scheduler,
epoch, RNG states, the resolved config, class names and the preprocessing used. It is written to a
temporary file in the same folder, fsynced, then renamed over the old one, so a crash or `kill -9`
at any moment leaves the previous checkpoint intact. Loading never unpickles code.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transfer.errors import UserError

FORMAT_VERSION = 1


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save({"format_version": FORMAT_VERSION, **state}, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load with weights_only=True; a file that is not a transfer checkpoint is a UserError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist. Runs keep theirs as <run dir>/best.pt and last.pt.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(f"{path} holds objects that need code to load, so it was refused "
                        f"(weights_only=True): {str(error).splitlines()[0][:200]}") from None
    except Exception as error:  # torch raises many types for a file that is not a checkpoint
        first_line = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise UserError(f"{path} is not a readable checkpoint ({first_line}).") from None
    if not isinstance(state, dict) or "model" not in state or "classes" not in state:
        raise UserError(f"{path} is not a transfer checkpoint (no model / classes inside).")
    return state


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

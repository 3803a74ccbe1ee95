"""What every experiment tracker does, and the checks they share.

A tracker copies what the run directory records into one tool's own store: the resolved config when the run
starts, metrics.csv's rows as they are written (step = epoch), rank 0's per-batch loss and learning rate
(`step/*`, step = batch), metrics.json at the end (`final/*`) and the files the run drew. The run directory
stays the record; a tracker is a view of it. Each tool's package is imported when the tracker is built, so a
missing one is a UserError before any training.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Callable, Protocol

from transfer.errors import UserError

FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"  # how a run ended (MLflow's names for them)


class Tracker(Protocol):
    name: str  # the key under `logger` in the config
    folders: list[Path]  # where it writes, once started (their files are not logged as the run's own)

    def start(self, config: dict, run_dir: Path, earlier: dict | None) -> dict:
        """Open the tool's run; `earlier` is what this method returned when the run directory's first part
        started (a resumed run continues that tool run where the tool allows it). Returns what to remember."""

    def log_step(self, metrics: dict[str, float], batch: int) -> None:
        """Per-batch values (`step/*`), called every training step: must stay cheap."""

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> None:
        """One row of metrics.csv (without its `epoch` column)."""

    def log_final(self, metrics: dict[str, float], epoch: int) -> None:
        """metrics.json, as `final/<key>`."""

    def log_files(self, paths: list[Path], run_dir: Path) -> None:
        """The run's pictures, reports and records, each the tool can show."""

    def finish(self, status: str) -> None:
        """Flush and close; `status` is FINISHED, FAILED or KILLED."""


def require_package(module: str, extra: str) -> Any:
    """`module`, imported; missing, a UserError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f'logger={extra} needs the {extra} package: pip install "transfer[{extra}]" '
                        f"(or drop {extra} from logger=).") from None


def check_options(options: dict, allowed: set[str] | Callable, tool: str) -> dict:
    """The tracker's config keys, refused with the valid ones unless `allowed` (a set, or the function they feed)
    takes them."""
    if callable(allowed):
        allowed = set(inspect.signature(allowed).parameters) - {"self"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise UserError(f"unknown key logger.{tool}.{unknown[0]}. Valid keys: "
                        f"{', '.join(f'logger.{tool}.{key}' for key in sorted(allowed))}.")
    return dict(options)


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1e-3}} → {'optim.lr': 1e-3}: nested sections become dotted keys, lists stay values."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def label(path: Path, run_dir: Path) -> str:
    """A file's name in a tool: its place in the run directory without the suffix (reports/val_confusion)."""
    return path.relative_to(run_dir).with_suffix("").as_posix()


@contextlib.contextmanager
def environment(**variables: str) -> Iterator[None]:
    """These environment variables for the block only; what was there before is put back."""
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

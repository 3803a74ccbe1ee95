"""The trackers a run's `logger` config names, driven as one: every call goes to each of them.

What each tracker must remember to continue its tool run after a resume (MLflow's run id, W&B's) is kept in
RUN/trackers.json. The set is a context manager around the training: it closes every tracker however the run
ends, with the outcome (FINISHED, KILLED on Ctrl-C or SIGTERM, FAILED), so what was logged is flushed.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from transfer.errors import UserError
from transfer.files import write_json
from transfer.trackers.base import FAILED, FINISHED, KILLED, Tracker
from transfer.trackers.mlflow import MLflow
from transfer.trackers.tensorboard import TensorBoard
from transfer.trackers.wandb import WandB

TOOLS = {tool.name: tool for tool in (TensorBoard, MLflow, WandB)}
MEMORY = "trackers.json"
FILES = {".png", ".html", ".csv", ".json", ".yaml"}  # what a run draws and records (each tool takes what it shows)


def build_trackers(logger: DictConfig | dict | None, active: bool = True) -> Trackers:
    """The trackers `logger` names, each tool's package imported and its keys checked (before any training); an
    empty set where `active` is false (ranks other than 0 check their packages too, and log nothing)."""
    chosen = OmegaConf.to_container(logger, resolve=True) if isinstance(logger, DictConfig) else dict(logger or {})
    unknown = sorted(set(chosen) - set(TOOLS))
    if unknown:
        raise UserError(f"unknown logger '{unknown[0]}'. Choose any of: {', '.join(TOOLS)} "
                        "(several at once: logger=[tensorboard,mlflow]).")
    trackers = [TOOLS[name](dict(options or {})) for name, options in chosen.items()]
    return Trackers(trackers if active else [])


class Trackers:
    def __init__(self, members: list[Tracker]) -> None:
        self.members, self.owned = members, []

    def __bool__(self) -> bool:
        return bool(self.members)

    @contextlib.contextmanager
    def started(self, config: dict, run_dir: Path, history: list[dict] = ()) -> Iterator[Trackers]:
        """Open every tracker (a resumed run's continue their tool runs) and close them as the block ends. A tracker
        that joins a resumed run first gets the epochs done before (`history`: metrics.csv's rows)."""
        status = FAILED
        try:
            if self.members:
                self.start(config, run_dir, history)
            yield self
            status = FINISHED
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM: the engine's Interrupted is one
            status = KILLED
            raise
        finally:
            self.finish(status)

    def start(self, config: dict, run_dir: Path, history: list[dict]) -> None:
        path = run_dir / MEMORY
        memory = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        for tracker in self.members:
            earlier = memory.get(tracker.name)
            memory[tracker.name] = tracker.start(config, run_dir, earlier)
            write_json(path, memory)  # at once: a tool run that was opened is found again on resume
            self.owned += [Path(folder).resolve() for folder in tracker.folders]
            for row in history if earlier is None else ():
                tracker.log_epoch(*epoch_row(row))

    def log_step(self, metrics: dict[str, float], batch: int) -> None:
        for tracker in self.members:
            tracker.log_step(metrics, batch)

    def log_epoch(self, row: dict[str, float]) -> None:
        """One row of metrics.csv, against its epoch."""
        for tracker in self.members:
            tracker.log_epoch(*epoch_row(row))

    def log_final(self, metrics: dict[str, float], epoch: int, run_dir: Path) -> None:
        """metrics.json, and the files the run drew and recorded (not the trackers' own)."""
        if not self.members:
            return
        files = [path for path in sorted(run_dir.rglob("*")) if path.suffix in FILES and path.name != MEMORY
                 and not path.name.startswith(".") and not self.owns(path)]
        for tracker in self.members:
            tracker.log_final(metrics, epoch)
            tracker.log_files(files, run_dir)

    def owns(self, path: Path) -> bool:
        """Whether `path` lies in a folder a tracker writes (W&B's copies of the pictures, say)."""
        return any(path.resolve().is_relative_to(folder) for folder in self.owned)

    def finish(self, status: str) -> None:
        """Close every tracker; one that fails to is reported, and neither hides the run's own outcome nor keeps
        the others open."""
        for tracker in self.members:
            try:
                tracker.finish(status)
            except Exception as error:  # noqa: BLE001 - the run's result or error matters more than a tracker's
                print(f"warning: the {tracker.name} tracker did not close cleanly: {error}", file=sys.stderr)


def epoch_row(row: dict) -> tuple[dict[str, float], int]:
    """A metrics.csv row as (its metrics, its epoch)."""
    return {key: value for key, value in row.items() if key != "epoch"}, int(row["epoch"])

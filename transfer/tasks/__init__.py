"""Tasks: what differs between classification, segmentation and detection (see tasks/base.py for the
protocol the engine calls). A new task is a module here, its name below and conf/task/NAME.yaml."""

from __future__ import annotations

from transfer.config import require
from transfer.tasks.base import Task
from transfer.tasks.classification import Classification
from transfer.tasks.detection import Detection
from transfer.tasks.multilabel import MultiLabel
from transfer.tasks.segmentation import Segmentation

TASKS: dict[str, type[Task]] = {"classification": Classification, "segmentation": Segmentation,
                                "detection": Detection, "multilabel": MultiLabel}


def build_task(name: str) -> Task:
    """A fresh task object for `task.name` (a run's or a checkpoint's)."""
    return TASKS[require(name, tuple(TASKS), "task.name")]()

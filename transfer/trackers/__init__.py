"""Experiment trackers (`logger=tensorboard|mlflow|wandb`, or several: `logger=[tensorboard,mlflow]`): each an
optional extra, offline, written by rank 0 into the run directory. The run directory stays the record; the
trackers show it in their tools.

base.py         what a tracker does (start, per-batch and per-epoch metrics, final metrics, files, finish)
tensorboard.py  event files in RUN/tensorboard
mlflow.py       a SQLite store, RUN/mlflow.db
wandb.py        W&B offline, RUN/wandb/offline-run-*
fanout.py       the set `logger` names, driven as one, and what a resumed run needs to continue them
"""

from transfer.trackers.fanout import Trackers, build_trackers

__all__ = ["Trackers", "build_trackers"]

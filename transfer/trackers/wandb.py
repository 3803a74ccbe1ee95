"""Weights & Biases, offline by default: RUN/wandb/offline-run-*/ (`wandb sync RUN/wandb/offline-run-*` uploads it).

`logger.wandb.*` are wandb.init arguments. Offline, W&B writes everything locally and asks no server; its
system-metrics sampler, metadata probes and error reports (which could reach the network) are switched off, the
last through WANDB_ERROR_REPORTING, set only while wandb.init starts its service and put back after. W&B keeps one
step counter, so metrics.csv's rows are plotted against an `epoch` key and the per-batch values against
`step/batch`. The run id is remembered in the run directory: a resumed run continues it (`resume="allow"`).
"""

from __future__ import annotations

import inspect
from pathlib import Path

from transfer.trackers.base import FINISHED, check_options, environment, label, require_package

SET_HERE = {"config", "id", "resume", "settings", "resume_from", "fork_from", "reinit"}


class WandB:
    name = "wandb"

    def __init__(self, options: dict) -> None:
        wandb = require_package("wandb", "wandb")
        allowed = set(inspect.signature(wandb.init).parameters) - SET_HERE
        self.options, self.run = check_options(options, allowed, self.name), None
        self.axes, self.last_epoch, self.folders = set(), 0, []

    def start(self, config: dict, run_dir: Path, earlier: dict | None) -> dict:
        import wandb

        options = {"mode": "offline", **{key: value for key, value in self.options.items() if value is not None}}
        options.setdefault("dir", str(run_dir))
        options.setdefault("name", run_dir.name)
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, x_disable_meta=True,
                                  disable_git=True, save_code=False, disable_job_creation=True,
                                  x_save_requirements=False)  # pip's list: a scan of site-packages, not the run's
        resumed = {"id": earlier["id"], "resume": "allow"} if earlier else {}
        with environment(WANDB_ERROR_REPORTING="false"):
            self.run = wandb.init(config=config, settings=settings, **resumed, **options)
        self.folders = [Path(self.run.settings.wandb_dir)]
        self.run.define_metric("epoch")
        self.run.define_metric("step/batch")
        return {"id": self.run.id}

    def log_step(self, metrics: dict[str, float], batch: int) -> None:
        self.log(metrics, "step/batch", batch)

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> None:
        self.log(metrics, "epoch", epoch)
        self.last_epoch = epoch

    def log_final(self, metrics: dict[str, float], epoch: int) -> None:
        self.run.summary.update({f"final/{key}": value for key, value in metrics.items()})

    def log_files(self, paths: list[Path], run_dir: Path) -> None:
        import wandb

        media = {f"images/{label(path, run_dir)}": wandb.Image(str(path)) for path in paths if path.suffix == ".png"}
        media.update({label(path, run_dir): wandb.Html(str(path)) for path in paths if path.suffix == ".html"})
        if media:
            self.log(media, "epoch", self.last_epoch)

    def finish(self, status: str) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if status == FINISHED else 1)

    def log(self, values: dict, axis: str, step: int) -> None:
        """`values` against `axis` (each key is tied to its axis the first time it is seen)."""
        for key in values.keys() - self.axes:
            self.run.define_metric(key, step_metric=axis)
            self.axes.add(key)
        self.run.log({**values, axis: step})

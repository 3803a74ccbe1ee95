"""MLflow: a SQLite tracking store, by default RUN/mlflow.db (`mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db`).

MLflow 3 refuses its old folder store unless MLFLOW_ALLOW_FILE_STORE=true, so a plain path is refused here with
the sqlite URI to use instead. Everything goes through an `MlflowClient`: no active run, nothing global changes in
the caller's process. `import mlflow` would start usage telemetry that asks a web server: it is imported here
with MLFLOW_DISABLE_TELEMETRY set for that moment only (a process that imported mlflow itself keeps its choice).
The run id is remembered in the run directory, so a resumed run continues the same MLflow run. The config
becomes params (dotted keys) plus config.yaml as an artifact. Per-batch values are kept and written in one batch
per epoch (a SQLite write per training step would slow training down).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from pathlib import Path

from transfer.errors import UserError
from transfer.trackers.base import check_options, environment, flatten, require_package

OPTIONS = {"tracking_uri", "experiment_name", "run_name", "artifact_location"}
ARTIFACTS = {".png", ".html", ".csv", ".json", ".yaml"}
BATCH = 1000  # MLflow's most metrics per log_batch; params and tags: 100
PARAM_LENGTH = 6000  # MLflow's longest param value (config.yaml, logged whole, has every value in full)


class MLflow:
    name = "mlflow"

    def __init__(self, options: dict) -> None:
        with environment(MLFLOW_DISABLE_TELEMETRY="true"):  # read once, as `import mlflow` sets up its client
            require_package("mlflow", "mlflow")
        self.options = check_options(options, OPTIONS, self.name)
        uri = self.options.get("tracking_uri")
        if uri and ("://" not in str(uri) or str(uri).startswith("file:")):
            raise UserError(f"logger.mlflow.tracking_uri={uri}: MLflow 3 refuses a folder as its store; give a "
                            "database, e.g. sqlite:////abs/path/mlflow.db (null: RUN/mlflow.db).")
        self.client, self.run_id, self.pending, self.folders = None, None, [], []

    def start(self, config: dict, run_dir: Path, earlier: dict | None) -> dict:
        from mlflow.exceptions import MlflowException

        try:
            with quiet("mlflow"):  # its INFO lines on creating a database's tables
                return self.open(config, run_dir, earlier)
        except MlflowException as error:
            raise UserError(f"logger.mlflow: {first_line(error)}") from None

    def open(self, config: dict, run_dir: Path, earlier: dict | None) -> dict:
        from mlflow.tracking import MlflowClient

        own = not self.options.get("tracking_uri")
        uri = f"sqlite:///{run_dir.resolve() / 'mlflow.db'}" if own else str(self.options["tracking_uri"])
        if own and self.options.get("artifact_location") is None:
            self.folders = [run_dir / "mlflow-artifacts"]  # the experiment's files, made by the first part of the run
        self.client = MlflowClient(tracking_uri=uri)
        if earlier and earlier.get("tracking_uri") == uri:
            self.run_id = earlier["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(self.experiment(run_dir, own),
                                                 run_name=self.options.get("run_name") or run_dir.name).info.run_id
        self.log_config(config)
        return {"tracking_uri": uri, "run_id": self.run_id}

    def experiment(self, run_dir: Path, own: bool) -> str:
        name = self.options.get("experiment_name") or "transfer"
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = self.options.get("artifact_location")
        if location is None and own:
            location = self.folders[0].resolve().as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def log_config(self, config: dict) -> None:
        """Params once (MLflow refuses to change one: a resumed run adds only keys it did not have) and
        config.yaml, rewritten."""
        from mlflow.entities import Param
        from omegaconf import OmegaConf

        known = self.client.get_run(self.run_id).data.params
        params = [Param(key, str(value)[:PARAM_LENGTH]) for key, value in flatten(config).items() if key not in known]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.client.log_text(self.run_id, OmegaConf.to_yaml(OmegaConf.create(config)), "config.yaml")

    def log_step(self, metrics: dict[str, float], batch: int) -> None:
        self.pending += self.entries(metrics, batch)
        if len(self.pending) >= BATCH:
            self.flush()

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> None:
        self.pending += self.entries(metrics, epoch)
        self.flush()

    def log_final(self, metrics: dict[str, float], epoch: int) -> None:
        self.log_epoch({f"final/{key}": value for key, value in metrics.items()}, epoch)

    def log_files(self, paths: list[Path], run_dir: Path) -> None:
        for path in paths:
            if path.suffix in ARTIFACTS:
                folder = path.parent.relative_to(run_dir).as_posix()
                self.client.log_artifact(self.run_id, str(path), None if folder == "." else folder)

    def finish(self, status: str) -> None:
        if self.run_id is None:
            return
        try:
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, status=status)

    def entries(self, metrics: dict[str, float], step: int) -> list:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        return [Metric(metric_key(key), float(value), now, step) for key, value in metrics.items()]

    def flush(self) -> None:
        while self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending[:BATCH])
            del self.pending[:BATCH]


def metric_key(name: str) -> str:
    """MLflow takes letters, digits, `_ - . /` and spaces in a metric's name everywhere (a segmentation class's
    `iou/<name>` may hold others)."""
    return re.sub(r"[^\w\-./ ]", "_", name)


@contextlib.contextmanager
def quiet(name: str):
    """The `name` logger at WARNING for the block; its level is put back after."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]

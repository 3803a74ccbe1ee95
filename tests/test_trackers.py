"""Experiment trackers (`logger=...`): what a run logs, read back with each tool's own reader, equals the run
directory's metrics.csv, metrics.json, config and pictures; a resumed run continues the same tool runs; a
missing package or a wrong key is one line before any training; with two processes only rank 0 logs."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest

from conftest import RunCli, final, rows, write_class_folder
from transfer.cli import main
from transfer.errors import UserError
from transfer.trackers import build_trackers
from transfer.trackers.base import flatten

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")

TINY = ["model=timm", "model.name=test_efficientnet", "model.pretrained=false", "preprocess.input_size=32",
        "data.num_workers=0", "data.batch_size=8", "trainer.progress=off"]  # 3 steps per epoch
EPOCHS = 2


def train(run_dir: Path, *overrides: str) -> Path:
    assert main(["train", *TINY, f"hydra.run.dir={run_dir}", *overrides]) == 0
    return run_dir


@pytest.fixture(scope="module")
def run(runs: Path, images: Path) -> Path:
    """One tiny run logged to all three trackers."""
    return train(runs / "all", f"data.root={images}", f"trainer.epochs={EPOCHS}", "logger=[tensorboard,mlflow,wandb]")


def csv_columns(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv as {column: [(epoch, value), ...]} (a column empty in a row is not logged for that epoch)."""
    columns: dict[str, list[tuple[int, float]]] = {}
    for row in rows(run_dir):
        for key, value in row.items():
            if key != "epoch" and value != "":
                columns.setdefault(key, []).append((int(row["epoch"]), float(value)))
    return columns


def png_labels(run_dir: Path) -> set[str]:
    return {p.relative_to(run_dir).with_suffix("").as_posix() for p in run_dir.rglob("*.png")
            if p.parts[len(run_dir.parts)] not in ("wandb", "mlflow-artifacts", "tensorboard")}


# ---- TensorBoard: its EventAccumulator


def tensorboard_scalars(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], object]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    scalars = {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]
               for tag in events.Tags()["tensors"] if not tag.startswith("config")}
    return scalars, events


def test_tensorboard_reads_back_metrics_csv_json_config_and_pictures(run: Path) -> None:
    from tensorboard.util import tensor_util

    scalars, events = tensorboard_scalars(run / "tensorboard")
    for column, values in csv_columns(run).items():
        assert scalars[column] == values, column  # float64 tensors: exactly the CSV's numbers
    assert {key: scalars[f"final/{key}"] for key in final(run)} == {key: [(EPOCHS, value)]
                                                                     for key, value in final(run).items()}
    assert [step for step, _ in scalars["step/train_loss"]] == list(range(1, 3 * EPOCHS + 1))
    assert scalars["step/lr"][3] == (4, float(rows(run)[0]["lr"]))  # an epoch's row: the next update's rate
    text = tensor_util.make_ndarray(events.Tensors("config/text_summary")[0].tensor_proto).item().decode()
    assert (run / "config.yaml").read_text() in text
    images = {tag.removeprefix("images/") for tag in events.Tags()["images"]}
    assert images == png_labels(run) and {"curves", "reports/val_confusion", "reports/test_confusion"} <= images


# ---- MLflow: its MlflowClient


def mlflow_run(run_dir: Path):
    from mlflow.tracking import MlflowClient

    remembered = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    assert remembered["tracking_uri"] == f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=remembered["tracking_uri"])
    return client, client.get_run(remembered["run_id"])


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def artifact_files(client, run_id: str, folder: str | None = None) -> set[str]:
    """Every file the run's artifact store holds, in subfolders too (reports/test_top_losses/001.png)."""
    found = set()
    for entry in client.list_artifacts(run_id, folder):
        found |= artifact_files(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return found


def test_mlflow_reads_back_metrics_csv_json_config_and_files(run: Path) -> None:
    from omegaconf import OmegaConf

    client, logged = mlflow_run(run)
    run_id = logged.info.run_id
    assert logged.info.status == "FINISHED" and logged.info.run_name == run.name
    for column, values in csv_columns(run).items():
        assert history(client, run_id, column) == values, column
    assert {key: history(client, run_id, f"final/{key}") for key in final(run)} == {
        key: [(EPOCHS, value)] for key, value in final(run).items()}
    assert len(history(client, run_id, "step/train_loss")) == 3 * EPOCHS
    config = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))
    assert logged.data.params == {key: str(value) for key, value in flatten(config).items()}
    files = artifact_files(client, run_id)
    assert {f"{name}.png" for name in png_labels(run)} | {"config.yaml", "metrics.csv", "metrics.json",
                                                         "report.html"} <= files
    assert len(client.search_runs([logged.info.experiment_id])) == 1


# ---- W&B: its offline run folder (records in LevelDB-log framing, each one of wandb's own protobuf Records)


def wandb_records(run_dir: Path, run_id: str) -> list:
    """Every record of the offline runs with this id, in order (wandb ships no Python reader of .wandb files any
    more; the framing is LevelDB's log format: 32 KiB blocks of chunks with a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        raw, position, chunk = path.read_bytes(), 7, b""  # the file opens with W&B's own 7-byte header
        while position + 7 <= len(raw):
            if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
                position += 32768 - position % 32768
                continue
            _, length, kind = struct.unpack("<IHB", raw[position:position + 7])
            if kind == 0:
                break
            chunk += raw[position + 7:position + 7 + length]
            position += 7 + length
            if kind in (1, 4):  # a full record, or the last chunk of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(chunk)
                records.append(record)
                chunk = b""
    return records


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def wandb_history(records: list) -> list[dict]:
    return [{item_key(item): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def test_wandb_offline_run_holds_metrics_csv_json_config_and_pictures(run: Path) -> None:
    run_id = json.loads((run / "trackers.json").read_text())["wandb"]["id"]
    records = wandb_records(run, run_id)
    logged = wandb_history(records)
    epochs = [entry for entry in logged if "epoch" in entry and "train/loss" in entry]
    for column, values in csv_columns(run).items():
        assert [(entry["epoch"], entry[column]) for entry in epochs if column in entry] == values, column
    assert len([entry for entry in logged if "step/batch" in entry]) == 3 * EPOCHS
    summary = {item_key(item): json.loads(item.value_json)
               for r in records if r.WhichOneof("record_type") == "summary" for item in r.summary.update}
    assert {key: summary[f"final/{key}"] for key in final(run)} == final(run)
    config = next(r.run.config for r in records if r.WhichOneof("record_type") == "run")
    logged_config = {item.key: json.loads(item.value_json) for item in config.update}
    assert {key: value for key, value in logged_config.items() if key != "_wandb"} == saved_config(run)
    assert wandb_pictures(logged) == png_labels(run)
    assert not any((run / "wandb").rglob("*.png.*"))  # nothing left half-written


def wandb_pictures(logged: list[dict]) -> set[str]:
    return {key.removeprefix("images/").removesuffix("/path") for entry in logged for key in entry
            if key.startswith("images/") and key.endswith("/path")}


def saved_config(run_dir: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))


# ---- resume, outcome, mistakes


def test_a_resumed_run_continues_the_same_mlflow_and_wandb_runs(runs: Path, images: Path) -> None:
    """...and a tracker added on resume (TensorBoard here) gets the epochs done before it joined."""
    first = train(runs / "resumed", f"data.root={images}", "trainer.epochs=1", "logger=[mlflow,wandb]")
    client, before = mlflow_run(first)
    wandb_id = json.loads((first / "trackers.json").read_text())["wandb"]["id"]
    train(first, f"data.root={images}", f"trainer.epochs={EPOCHS}", "logger=[mlflow,wandb,tensorboard]",
          f"trainer.resume={first / 'last.pt'}")
    scalars, _ = tensorboard_scalars(first / "tensorboard")
    assert all(scalars[column] == values for column, values in csv_columns(first).items())
    client, after = mlflow_run(first)
    assert after.info.run_id == before.info.run_id and after.info.status == "FINISHED"
    assert len(client.search_runs([after.info.experiment_id])) == 1
    assert history(client, after.info.run_id, "train/loss") == csv_columns(first)["train/loss"]
    assert after.data.params["trainer.resume"] == "None"  # the first part's: MLflow keeps a param's first value
    assert json.loads((first / "trackers.json").read_text())["wandb"]["id"] == wandb_id
    assert len(list((first / "wandb").glob(f"offline-run-*-{wandb_id}"))) == 2  # one folder per part, one run id
    logged = wandb_history(wandb_records(first, wandb_id))
    assert [entry["epoch"] for entry in logged if "train/loss" in entry] == [1, 2]
    assert wandb_pictures(logged) == png_labels(first)  # not the copies MLflow and W&B keep of the first part's
    assert {f.path for f in client.list_artifacts(after.info.run_id)} == {
        p.name for p in first.iterdir() if p.suffix in (".png", ".csv", ".json", ".yaml", ".html")
        and p.name != "trackers.json"
    } | {"reports"}


def test_an_interrupted_run_is_flushed_and_marked_killed(tmp_path: Path) -> None:
    trackers = build_trackers({"mlflow": {}, "tensorboard": {}})
    with pytest.raises(KeyboardInterrupt):
        with trackers.started({"seed": 0}, tmp_path):
            trackers.log_step({"step/train_loss": 0.5}, 1)  # kept in memory by MLflow's tracker until flushed
            raise KeyboardInterrupt
    client, logged = mlflow_run(tmp_path)
    assert logged.info.status == "KILLED" and history(client, logged.info.run_id, "step/train_loss") == [(1, 0.5)]
    assert tensorboard_scalars(tmp_path / "tensorboard")[0]["step/train_loss"] == [(1, 0.5)]


def test_an_html_report_and_nested_pictures_reach_each_tool_that_shows_them(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "report.html").write_text("<html><body><h1>run report</h1></body></html>")
    (tmp_path / "overlays").mkdir()
    Image.new("RGB", (8, 6), (200, 30, 30)).save(tmp_path / "overlays" / "0001.png")
    trackers = build_trackers({"tensorboard": {}, "mlflow": {}, "wandb": {}})
    with trackers.started({"seed": 0}, tmp_path):
        trackers.log_final({"test/top1": 0.5}, 1, tmp_path)
    client, logged = mlflow_run(tmp_path)
    assert {f.path for f in client.list_artifacts(logged.info.run_id)} >= {"report.html", "overlays"}
    assert client.list_artifacts(logged.info.run_id, "overlays")[0].path == "overlays/0001.png"
    _, events = tensorboard_scalars(tmp_path / "tensorboard")
    assert [(e.width, e.height) for e in events.Images("images/overlays/0001")] == [(8, 6)]
    run_id = json.loads((tmp_path / "trackers.json").read_text())["wandb"]["id"]
    entry = next(e for e in wandb_history(wandb_records(tmp_path, run_id)) if "report/_type" in e)
    assert entry["report/_type"] == "html-file" and "images/overlays/0001/path" in entry


@pytest.mark.parametrize("tool, modules", [("tensorboard", ["tensorboard", "torch.utils.tensorboard"]),
                                           ("mlflow", ["mlflow"]), ("wandb", ["wandb"])])
def test_a_missing_package_is_one_line_before_training(tool, modules, run_cli: RunCli, tiny_image_folder: Path,
                                                       tmp_path: Path, monkeypatch) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # `import` now fails as if it were not installed
    run_dir = tmp_path / "run"
    code, out, err = run_cli(["train", *TINY, f"data.root={tiny_image_folder}", f"hydra.run.dir={run_dir}",
                              f"logger=[{tool},tensorboard]" if tool != "tensorboard" else "logger=tensorboard"])
    assert code == 2 and f'pip install "transfer[{tool}]"' in err and len(err.strip().splitlines()) == 1, err
    assert "epoch" not in out and not run_dir.exists()


@pytest.mark.parametrize("logger, message", [
    ({"tensorboard": {"logdir": "x"}}, "unknown key logger.tensorboard.logdir. Valid keys: logger.tensorboard.comment"),
    ({"mlflow": {"tracking_uri": "mlruns"}}, "sqlite:////abs/path/mlflow.db"),
    ({"mlflow": {"tracking_uri": "file:///tmp/mlruns"}}, "refuses a folder"),
    ({"wandb": {"config": {}}}, "unknown key logger.wandb.config"),  # the run's config is set by transfer
    ({"neptune": {}}, "unknown logger 'neptune'. Choose any of: tensorboard, mlflow, wandb"),
])
def test_a_wrong_logger_setting_names_the_valid_ones(logger: dict, message: str) -> None:
    with pytest.raises(UserError) as raised:
        build_trackers(logger)
    assert message in str(raised.value)


def test_logger_group_composes_several_trackers_at_once(run_cli: RunCli) -> None:
    code, out, _ = run_cli(["train", "--cfg", "logger=[tensorboard,mlflow]", "logger.mlflow.run_name=mine"])
    assert code == 0 and "logger:\n  tensorboard:\n    log_dir: null\n  mlflow:\n" in out and "run_name: mine" in out
    code, out, _ = run_cli(["train", "--help"])
    assert "logger=[tensorboard,mlflow]" in out
    code, _, err = run_cli(["train", "logger=[tensorboard,mlfow]"])
    assert code == 2 and "unknown logger 'mlfow'. Did you mean logger=mlflow?" in err


def test_mlflow_is_imported_without_its_web_telemetry() -> None:
    """`import mlflow` starts usage telemetry (a thread that asks a web server) unless disabled: the tracker imports
    it disabled, and leaves the process environment as it was. A fresh process, outside pytest and CI (which
    MLflow already leaves alone)."""
    import subprocess

    script = ("import os; from transfer.trackers import build_trackers; build_trackers({'mlflow': {}}); "
              "from mlflow.telemetry import get_telemetry_client; from mlflow.telemetry.utils import "
              "is_telemetry_disabled; print(get_telemetry_client(), os.environ.get('MLFLOW_DISABLE_TELEMETRY'), "
              "is_telemetry_disabled())")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTEST_CURRENT_TEST", "CI")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.stdout.split() == ["None", "None", "False"], done.stderr  # off, put back, and it would have been on


@pytest.mark.ddp
def test_only_rank_0_logs_under_two_processes(tmp_path: Path) -> None:
    import subprocess

    run_dir, data = tmp_path / "run", write_class_folder(tmp_path / "images")
    done = subprocess.run([sys.executable, "-m", "transfer", "train", *TINY, f"data.root={data}", "trainer.epochs=1",
                           "trainer.processes=2", f"hydra.run.dir={run_dir}", "logger=[tensorboard,mlflow]"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert len(list((run_dir / "tensorboard").iterdir())) == 1  # one event file: one writer
    client, logged = mlflow_run(run_dir)
    assert len(client.search_runs([logged.info.experiment_id])) == 1
    scalars, _ = tensorboard_scalars(run_dir / "tensorboard")
    for column, values in csv_columns(run_dir).items():
        assert scalars[column] == values == history(client, logged.info.run_id, column), column

"""`transfer runs` and `transfer compare` over real run directories of every task, and the table that ends
`transfer train`. Five tiny one-epoch runs are made once for the module (timm's test models, 32-64 px):
two classifiers that differ in two overrides, a linear probe, a segmenter and a detector; a copy of the first
without metrics.json, in a multirun-like subfolder, stands for a stopped run."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_class_folder
from test_detection import write_coco_folder
from test_segmentation import write_scene_folder
from transfer.cli import main

TINY = ["model=timm", "model.name=test_efficientnet", "model.pretrained=false", "trainer.epochs=1",
        "trainer.progress=off"]
CLASSIFY = [*TINY, "preprocess.input_size=32", "data.batch_size=8"]
DENSE = [*TINY, "data.batch_size=4", "task.overlays=0"]
TASKS = {"cls-a": "classification", "cls-b": "classification", "probe": "classification",
         "seg": "segmentation", "det": "detection"}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """(the runs folder, each run's printed output)."""
    data = tmp_path_factory.mktemp("data")
    images = write_class_folder(data / "images")
    scenes = write_scene_folder(data / "scenes", 8)
    coco = write_coco_folder(data / "coco", train=12, test=4)
    folder = tmp_path_factory.mktemp("runs")
    jobs = {"cls-a": [*CLASSIFY, f"data.root={images}", "optim.lr=0.01"],
            "cls-b": [*CLASSIFY, f"data.root={images}", "optim.lr=0.003", "augment=none"],
            "probe": [*CLASSIFY, f"data.root={images}", "finetune=linear_probe", "augment=none", "optim.lr=0.05"],
            "seg": [*DENSE, "task=segmentation", f"data.root={scenes}", "preprocess.input_size=32",
                    "task.decoder_channels=64"],
            "det": [*DENSE, "task=detection", f"data.root={coco}", "preprocess.input_size=64",
                    "data.val_fraction=0.25"]}
    printed = {}
    for name, overrides in jobs.items():
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["train", *overrides, f"hydra.run.dir={folder / name}"]) == 0, out.getvalue()[-2000:]
        printed[name] = out.getvalue()
    stopped = folder / "multirun" / "0"  # a run in a sweep's subfolder that never finished
    shutil.copytree(folder / "cls-a", stopped)
    (stopped / "metrics.json").unlink()
    (folder / "multirun" / "summary.csv").write_text("job,status\n0,failed\n")
    return folder, printed


def final(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def listed(run_cli, folder: Path, *options: str) -> list[dict[str, str]]:
    code, out, err = run_cli(["runs", str(folder), "format=csv", *options])
    assert code == 0, err
    return list(csv.DictReader(io.StringIO(out)))


def test_runs_lists_every_run_with_its_task_model_and_metrics(made, run_cli) -> None:
    folder, _ = made
    rows = {row["run"]: row for row in listed(run_cli, folder)}
    assert set(rows) == {*TASKS, "multirun/0"}  # the sweep-like folder's own files are not a run
    monitors = {"classification": "val/top1", "segmentation": "val/miou", "detection": "val/map50"}
    for name, task in TASKS.items():
        row, metrics = rows[name], final(folder / name)
        assert (row["task"], row["model"], row["status"], row["epochs"]) == (task, "test_efficientnet", "done", "1")
        assert row["monitor"] == monitors[task]
        assert float(row["best"]) == metrics[row["monitor"]]
        assert float(row["test"]) == metrics["test/" + row["monitor"].split("/")[1]]
        assert float(row["time"]) == metrics["train_seconds"]
    stopped = rows["multirun/0"]
    assert stopped["status"] == "stopped" and stopped["test"] == ""
    assert float(stopped["best"]) == final(folder / "cls-a")["val/top1"]  # from metrics.csv: its one epoch
    assert "optim.lr=0.003 augment=none" in rows["cls-b"]["overrides"]

    code, table, _ = run_cli(["runs", str(folder)])
    assert code == 0 and all(len(line) <= 120 for line in table.splitlines())
    lines = {line.split()[0]: line for line in table.splitlines()[1:len(rows) + 1]}
    assert set(lines) == set(rows)
    assert " segmentation " in lines["seg"] and f"{final(folder / 'seg')['test/miou']:.4f}" in lines["seg"]
    assert "finetune=linear_probe" in lines["probe"] and " stopped " in lines["multirun/0"]
    assert "every run: " in table and "model.pretrained=false" in table.split("every run: ")[1]


def test_runs_sort_by_a_metric_and_by_date(made, run_cli) -> None:
    folder, _ = made
    by_best = listed(run_cli, folder, "sort=best", "desc=true")
    values = [float(row["best"]) for row in by_best]
    assert values == sorted(values, reverse=True)
    by_date = [row["run"] for row in listed(run_cli, folder, "sort=date")]
    made_order = [name for name in by_date if name in TASKS]
    assert made_order == list(TASKS)  # the order they were trained in
    newest_first = [row["date"] for row in listed(run_cli, folder, "sort=date", "desc=true")]
    assert newest_first == sorted(newest_first, reverse=True)
    code, _, err = run_cli(["runs", str(folder), "sort=accuracy"])
    assert code == 2 and "sort=accuracy" in err and "best, test, epochs, time, date" in err


def test_runs_shows_a_live_run_as_running(made, run_cli) -> None:
    fcntl = pytest.importorskip("fcntl")
    if not Path("/proc/locks").exists():
        pytest.skip("a live run is seen through /proc/locks (Linux)")
    folder, _ = made
    with open(folder / "multirun" / "0" / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a training process holds it
        assert {row["run"]: row["status"] for row in listed(run_cli, folder)}["multirun/0"] == "running"
    assert {row["run"]: row["status"] for row in listed(run_cli, folder)}["multirun/0"] == "stopped"


def test_compare_names_the_differing_overrides_and_the_metric_differences(made, run_cli) -> None:
    import transfer

    folder, _ = made
    a, b = folder / "cls-a", folder / "cls-b"
    code, out, err = run_cli(["compare", str(a), str(b)])
    assert code == 0, err
    overrides, config = out.split("\n\n")[1:3]
    assert "optim.lr" in overrides and "augment" in overrides and "data.root" not in overrides
    assert "optim.lr" in config and "augment.train" in config and "data.root" not in config
    difference = transfer.compare(a, b)
    assert difference["overrides"] == {"optim.lr": {"a": "0.01", "b": "0.003"}, "augment": {"a": None, "b": "none"}}
    assert difference["config"]["optim.lr"] == {"a": 0.01, "b": 0.003}
    metrics_a, metrics_b = final(a), final(b)
    assert set(difference["metrics"]) == set(metrics_a) & set(metrics_b)
    for key, values in difference["metrics"].items():
        assert values == {"a": metrics_a[key], "b": metrics_b[key], "difference": metrics_b[key] - metrics_a[key]}
    line = next(line for line in out.splitlines() if line.startswith("test/top1 "))
    assert line.split()[1:] == [f"{metrics_a['test/top1']:.4f}", f"{metrics_b['test/top1']:.4f}",
                                f"{metrics_b['test/top1'] - metrics_a['test/top1']:+.4f}"]
    code, out, _ = run_cli(["compare", str(a), str(folder / "multirun" / "0")])
    assert code == 0 and "overrides: the same" in out and "has not finished" in out


def test_runs_and_compare_refuse_what_is_not_there(made, run_cli, tmp_path: Path) -> None:
    folder, _ = made
    code, _, err = run_cli(["runs", str(tmp_path / "nowhere")])
    assert code == 2 and "no such folder" in err
    code, _, err = run_cli(["compare", str(folder / "cls-a"), str(folder / "multirun")])
    assert code == 2 and "is not a run directory" in err and len(err.strip().splitlines()) == 1
    code, out, _ = run_cli(["runs", str(tmp_path)])
    assert code == 0 and out.startswith("no runs in")
    broken = tmp_path / "runs" / "broken"  # runs/ of the working folder is the default
    shutil.copytree(folder / "cls-a", tmp_path / "runs" / "fine")
    shutil.copytree(folder / "cls-a", broken)
    (broken / "config.yaml").write_text("model: [\n")
    code, out, err = run_cli(["runs", "format=csv"])
    assert code == 0, err
    assert {row["run"]: row["status"] for row in csv.DictReader(io.StringIO(out))} == {
        "broken": "unreadable (ParserError)", "fine": "done"}


def test_the_python_api_lists_the_same_runs(made) -> None:
    import transfer

    folder, _ = made
    rows = {row["run"]: row for row in transfer.runs(folder)}
    assert rows["det"]["metrics"] == final(folder / "det") and rows["multirun/0"]["metrics"] == {}
    assert rows["seg"]["task"] == "segmentation" and rows["cls-b"]["overrides"][-2:] == ["optim.lr=0.003",
                                                                                        "augment=none"]


def test_listing_runs_does_not_load_torch(made) -> None:
    folder, _ = made
    script = (f"import sys; from transfer.cli import main; main(['runs', {str(folder)!r}]); "
              "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.split()[-1] == "False", result.stdout + result.stderr


def test_training_ends_with_a_table_of_the_final_metrics(made) -> None:
    folder, printed = made
    for name, task in TASKS.items():
        metrics = final(folder / name)
        lines = printed[name].strip().splitlines()
        assert lines[-1] == (f"done in {metrics['train_seconds']:.1f}s of training; best epoch "
                             f"{metrics['best_epoch']}; run directory {folder / name}")
        header = lines.index(next(line for line in lines if line.split() == ["metric", "val", "test"]))
        table = {line.split()[0]: line.split()[1:] for line in lines[header + 1:-1]}
        headline = {"classification": "top1", "segmentation": "miou", "detection": "map50"}[task]
        assert headline in table and "loss" not in table
        for metric, (val, test) in table.items():
            assert (val, test) == (f"{metrics[f'val/{metric}']:.4f}", f"{metrics[f'test/{metric}']:.4f}")

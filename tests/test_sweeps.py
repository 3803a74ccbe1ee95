"""`transfer train -m` (Hydra multirun with a summary) and `transfer sweep` (Optuna with pruning, SQLite storage
that survives a kill, plots and the best trial as a recipe), on tiny runs of real data."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from transfer.config import compose, config_dir, without_hydra

TINY = ["model=timm", "model.name=test_efficientnet", "model.pretrained=false", "data.batch_size=8",
        "preprocess.input_size=32", "trainer.progress=off"]


def table(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ---- multirun


def test_multirun_runs_the_cross_product_and_summarises_seeds(run_cli, images, tmp_path):
    sweep = tmp_path / "grid"
    code, out, err = run_cli(["train", "-m", *TINY, f"data.root={images}", "trainer.epochs=1", "seed=0,1",
                              "optim.lr=1e-3,1e-2", f"hydra.sweep.dir={sweep}"])
    assert code == 0, err
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    jobs = table(sweep / "summary.csv")
    assert [(row["seed"], row["optim.lr"], row["status"]) for row in jobs] == \
        [("0", "0.001", "done"), ("0", "0.01", "done"), ("1", "0.001", "done"), ("1", "0.01", "done")]
    for row in jobs:  # each job's own overrides recorded in its run, and its metrics in the summary
        recorded = OmegaConf.load(Path(row["run_dir"]) / "composition.yaml").overrides
        assert f"optim.lr={row['optim.lr']}" in recorded and f"seed={row['seed']}" in recorded
        metrics = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
        assert float(row["test/top1"]) == pytest.approx(metrics["test/top1"], abs=1e-4)
    by_config = table(sweep / "summary_by_config.csv")
    assert [row["optim.lr"] for row in by_config] == ["0.001", "0.01"] and all(r["runs"] == "2" for r in by_config)
    tops = [float(row["test/top1"]) for row in jobs if row["optim.lr"] == "0.01"]
    mean = sum(tops) / 2
    assert by_config[1]["test/top1"].startswith(f"{mean:.4f} ± ")
    assert "mean ± std over seeds" in out and "multirun summary" in out


def test_multirun_reruns_skip_finished_jobs(run_cli, images, tmp_path):
    sweep = tmp_path / "again"
    args = ["train", "-m", *TINY, f"data.root={images}", "trainer.epochs=1", "optim.lr=1e-3,1e-2",
            f"hydra.sweep.dir={sweep}"]
    assert run_cli(args)[0] == 0
    before = (sweep / "1" / "metrics.json").stat().st_mtime_ns
    code, out, _ = run_cli(args)
    assert code == 0 and out.count("finished before: reusing") == 2
    assert (sweep / "1" / "metrics.json").stat().st_mtime_ns == before


def test_multirun_composes_every_job_before_the_first_trains(run_cli, images, tmp_path):
    sweep = tmp_path / "typo"
    code, _, err = run_cli(["train", "-m", *TINY, f"data.root={images}", "augment=light,lihgt",
                            f"hydra.sweep.dir={sweep}"])
    assert code == 2 and "lihgt" in err and "Traceback" not in err
    assert not sweep.exists() or not any(sweep.iterdir())


def test_multirun_refuses_a_search_space(run_cli, tmp_path):
    code, _, err = run_cli(["train", "-m", "optim.lr=interval(1e-4,1e-2)", f"hydra.sweep.dir={tmp_path / 's'}"])
    assert code == 2 and "transfer sweep" in err


# ---- sweep


def sweep_args(images: Path, folder: Path, trials: int, epochs: int = 3) -> list[str]:
    return ["sweep", *TINY, f"data.root={images}", "data.val_fraction=0.3", f"trainer.epochs={epochs}",
            f"hydra.sweep.dir={folder}", f"trials={trials}", "startup_trials=2",
            "optim.lr=tag(log, interval(1e-4, 1e-1))", "finetune=choice(full, linear_probe)"]


def test_a_sweep_prunes_reports_and_writes_a_recipe_that_reproduces_the_best_trial(run_cli, images, tmp_path):
    folder = tmp_path / "search"
    code, out, err = run_cli(sweep_args(images, folder, trials=6))
    assert code == 0, err
    trials = table(folder / "trials.csv")
    assert len(trials) == 6 and {row["state"] for row in trials} <= {"complete", "pruned"}
    complete = [row for row in trials if row["state"] == "complete"]
    values = [float(row["val/top1"]) for row in complete]
    assert values == sorted(values, reverse=True) and trials[0]["state"] == "complete"
    assert (folder / "history.png").stat().st_size > 1000 and (folder / "importances.png").stat().st_size > 1000
    best = json.loads((folder / "best.json").read_text())
    assert best["value"] == pytest.approx(values[0], abs=1e-4)
    best_dir = Path(best["run_dir"])
    # trials never touch the test split; the best one is evaluated on it once, by transfer eval
    for row in complete:
        assert not [key for key in json.loads((Path(row["run_dir"]) / "metrics.json").read_text()) if "test/" in key]
    assert best["test"]["test/top1"] == json.loads((best_dir / "eval-test" / "metrics.json").read_text())["test/top1"]
    # the recipe overlay composes to the best trial's config
    name = f"sweep_best_{uuid.uuid4().hex[:8]}"
    recipe = config_dir() / "recipe" / f"{name}.yaml"
    recipe.write_text((folder / "best_recipe.yaml").read_text())
    try:
        composed = OmegaConf.to_container(without_hydra(compose([f"recipe={name}"])), resolve=True)
    finally:
        recipe.unlink()
    trained = OmegaConf.to_container(OmegaConf.load(best_dir / "config.yaml"), resolve=True)
    assert composed == trained


def test_sweep_refuses_what_it_cannot_search(run_cli, images, tmp_path):
    code, _, err = run_cli(["sweep", *TINY, f"data.root={images}", f"hydra.sweep.dir={tmp_path / 'a'}"])
    assert code == 2 and "search space" in err
    code, _, err = run_cli(["sweep", *TINY, f"data.root={images}", "objective=test/top1",
                            "optim.lr=interval(1e-4, 1e-2)", f"hydra.sweep.dir={tmp_path / 'b'}"])
    assert code == 2 and "validation" in err


def test_a_killed_sweep_continues_from_its_storage(images, tmp_path):
    """SIGKILL in the middle of a trial, then the same command: the trial is marked failed, the sweep goes on."""
    folder = tmp_path / "killed"
    command = [sys.executable, "-m", "transfer", *sweep_args(images, folder, trials=3, epochs=30), "pruner=none"]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    deadline = time.monotonic() + 300
    while not (folder / "trial_000" / "last.pt").exists():
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    again = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=900)
    assert again.returncode == 0, again.stderr
    assert "trial 0 was running when the sweep stopped: marked failed" in again.stdout
    states = [row["state"] for row in table(folder / "trials.csv")]
    assert sorted(states) == ["complete", "complete", "complete", "fail"]

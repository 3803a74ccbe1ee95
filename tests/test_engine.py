"""The one engine, every task: each trainer.*, data.*, model.* key takes effect or is refused in one line, for
classification, segmentation and detection alike (tiny models and data, one short run per cell).

Runs in one process on one machine with one thread count are bit-exact, so "the training loss moved" and
"the loss stayed the same" compare exactly against the task's baseline run of the same module."""

from __future__ import annotations

import csv
import io
import json
import shutil
import socket
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_png
from test_detection import write_coco_folder
from test_segmentation import write_scene_folder
from transfer.checkpoint import load_checkpoint
from transfer.cli import main

MODEL = ["model=timm", "model.name=test_efficientnet", "model.pretrained=false", "data.batch_size=4",
         "trainer.epochs=1", "trainer.progress=plain"]
TASKS = ("classification", "segmentation", "detection")


@dataclass
class Result:
    code: int
    out: str
    err: str
    run: Path
    args: list[str]

    def rows(self) -> list[dict[str, str]]:
        with open(self.run / "metrics.csv", newline="") as handle:
            return list(csv.DictReader(handle))

    def loss(self) -> float:
        return float(self.rows()[0]["train/loss"])

    def final(self) -> dict:
        return json.loads((self.run / "metrics.json").read_text())

    def splits(self) -> dict:
        return json.loads((self.run / "run_info.json").read_text())["splits"]


def cli(args: list[str], run: Path) -> Result:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["train", *args, f"hydra.run.dir={run}"])
    return Result(code, out.getvalue(), err.getvalue(), run, list(args))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[str], str]]:
    """Per task: the base arguments, and where a file that does not decode goes (data.on_bad_image's cell)."""
    root = tmp_path_factory.mktemp("engine")
    for index, count in enumerate((16, 10, 8)):  # imbalanced, so class weights change the loss
        for n in range(count):
            write_png(root / "images" / f"c{index}" / f"{n}.png", index, seed=100 * index + n)
    scenes, coco = write_scene_folder(root / "scenes", 24), write_coco_folder(root / "coco")
    return {
        "classification": ([f"data.root={root / 'images'}", "preprocess.input_size=32", *MODEL], "c0/broken.png"),
        "segmentation": (["task=segmentation", f"data.root={scenes}", "preprocess.input_size=32",
                          "task.decoder_channels=64", "task.overlays=0", *MODEL], "images/broken.png"),
        "detection": (["task=detection", f"data.root={coco}", "preprocess.input_size=64", "task.overlays=0", *MODEL],
                      "train/images/003.png"),
    }


@pytest.fixture(scope="module")
def baselines(folders, tmp_path_factory) -> dict[str, Result]:
    root = tmp_path_factory.mktemp("baselines")
    found = {task: cli(args, root / task) for task, (args, _) in folders.items()}
    for task, result in found.items():
        assert result.code == 0, (task, result.err)
    return found


def refused(result: Result, baseline: Result, key: str) -> bool:
    lines = result.err.strip().splitlines()
    return result.code == 2 and len(lines) == 1 and key in lines[0] and "Traceback" not in result.err


def loss_moved(result: Result, baseline: Result) -> bool:
    return result.code == 0 and result.loss() != baseline.loss()


def same_run(result: Result, baseline: Result) -> bool:
    """Settings that must not change a single number: the same losses and validation metrics."""
    same_rows = [{k: v for k, v in row.items() if k != "seconds"} for row in result.rows()] == \
        [{k: v for k, v in row.items() if k != "seconds"} for row in baseline.rows()]
    return result.code == 0 and same_rows


def printed(text: str):
    return lambda result, baseline: result.code == 0 and text in result.out + result.err


def first_conv_channels_last(result: Result) -> bool:
    weights = [w for k, w in load_checkpoint(result.run / "last.pt")["model"].items() if w.dim() == 4 and w.shape[-1] > 1]
    return weights[0].is_contiguous(memory_format=torch.channels_last)


def validated_every_second_epoch(result: Result, baseline: Result) -> bool:
    rows = result.rows()
    val = [key for key in rows[1] if key.startswith("val/")]
    return result.code == 0 and val and not any(rows[0][k] for k in val) and all(rows[1][k] for k in val)


def split_grew(split: str):
    return lambda result, baseline: result.code == 0 and result.splits()[split] > baseline.splits()[split]


def moved_against(dropped: str):
    """The loss moved against the same run without the override `dropped` (for cells that change the model)."""
    def check(result: Result, baseline: Result) -> bool:
        reference = cli([a for a in result.args if a != dropped], result.run.parent / "reference")
        return result.code == 0 and reference.code == 0 and result.loss() != reference.loss()
    return check


def same_metrics(result: Result, baseline: Result) -> bool:
    """Another batching of the same evaluation: equal to float rounding (sums in another order)."""
    ours, theirs = result.final(), baseline.final()
    return ours.keys() == theirs.keys() and all(ours[k] == pytest.approx(theirs[k], rel=1e-5, abs=1e-6)
                                                for k in ours if not k.endswith("_seconds"))


def every(*checks):
    return lambda result, baseline: all(check(result, baseline) for check in checks)


REFUSED = "refused"
# key override(s) → per task: a check that the setting took effect, or REFUSED (one line naming the key)
TABLE = {
    ("trainer.epochs=2",): dict.fromkeys(TASKS, lambda r, b: r.code == 0 and len(r.rows()) == 2),
    ("trainer.device=cpu",): dict.fromkeys(TASKS, printed("device cpu")),
    ("trainer.amp=bf16",): {"classification": printed("amp bfloat16"), "segmentation": printed("amp bfloat16"),
                            "detection": REFUSED},
    ("trainer.channels_last=false",): dict.fromkeys(TASKS, lambda r, b: r.code == 0 and not first_conv_channels_last(r)
                                                    and first_conv_channels_last(b)),
    ("trainer.grad_clip=1e-6",): dict.fromkeys(TASKS, loss_moved),
    ("trainer.label_smoothing=0.3",): {"classification": loss_moved, "segmentation": loss_moved,
                                       "detection": REFUSED},
    ("trainer.monitor=val/loss",): {"classification": printed("best.pt by val/loss (min)"),
                                    "segmentation": printed("best.pt by val/loss (min)"), "detection": REFUSED},
    ("trainer.monitor_mode=min",): dict.fromkeys(TASKS, printed("(min)")),
    ("trainer.eval_every=2", "trainer.epochs=3"): dict.fromkeys(TASKS, validated_every_second_epoch),
    ("trainer.max_bad_steps=1", "optim=sgd", "optim.lr=1e30", "schedule.warmup_epochs=0"):
        # the first NaN loss is skipped, not fatal: the run ends on the second, or on the weights it left NaN
        dict.fromkeys(TASKS, lambda r, b: r.code == 2 and ("bad steps so far: 2, trainer.max_bad_steps=1" in r.err
                                                           or "weights became NaN" in r.err)),
    ("trainer.progress=bar",): dict.fromkeys(TASKS, lambda r, b: r.code == 0 and "epoch 1/1" in r.err),
    ("trainer.top_k=1",): {"classification": lambda r, b: r.code == 0 and "test/top2" in b.final()
                           and "test/top2" not in r.final(), "segmentation": REFUSED, "detection": REFUSED},
    ("trainer.accumulate_steps=2",): dict.fromkeys(TASKS, loss_moved),
    ("trainer.compile=eager",): dict.fromkeys(TASKS, printed("torch.compile with backend eager")),
    # schedule=constant: cosine's warmup and floor (1e-6) would still move smp's FPN enough to change val/miou
    ("trainer.early_stop_patience=1", "trainer.epochs=4", "optim.lr=1e-12", "schedule=constant",
     "finetune.bn=freeze_stats"):
        dict.fromkeys(TASKS, lambda r, b: r.code == 0 and len(r.rows()) == 2 and "early stop" in r.out),
    ("trainer.class_weight=balanced",): {"classification": loss_moved, "segmentation": REFUSED, "detection": REFUSED},
    ("trainer.tta=flip",): {"classification": lambda r, b: r.code == 0 and r.final()["test/loss"] != b.final()["test/loss"],
                            "segmentation": REFUSED, "detection": REFUSED},
    ("trainer.feature_cache=off", "finetune=linear_probe", "augment=none"):
        {"classification": printed("linear probe on images every epoch: trainer.feature_cache=off"),
         "segmentation": REFUSED, "detection": REFUSED},
    # several processes: tests/test_distributed.py runs them; here the refusals that need no second process
    ("trainer.processes=0",): dict.fromkeys(TASKS, REFUSED),
    ("trainer.sync_batchnorm=true",): dict.fromkeys(TASKS, REFUSED),  # CUDA only
    ("data.val_fraction=0.3",): dict.fromkeys(TASKS, split_grew("val")),
    ("data.test_fraction=0.4",): {"classification": split_grew("test"), "segmentation": split_grew("test"),
                                  "detection": lambda r, b: r.code == 0 and r.splits() == b.splits()},  # test/ given
    ("data.split_seed=1",): dict.fromkeys(TASKS, loss_moved),
    ("data.batch_size=2",): dict.fromkeys(TASKS, loss_moved),
    ("data.eval_batch_size=2",): dict.fromkeys(TASKS, lambda r, b: r.code == 0 and same_metrics(r, b)),
    ("data.num_workers=1",): dict.fromkeys(TASKS, same_run),
    ("data.cache=none",): dict.fromkeys(TASKS, same_run),
    ("data.cache=disk",): {"classification": same_run, "segmentation": REFUSED, "detection": REFUSED},
    ("data.cache_dir=CACHE", "data.cache=disk"): {"classification": lambda r, b: same_run(r, b) and any(
        (r.run.parent / "cache").rglob("*")), "segmentation": REFUSED, "detection": REFUSED},
    # a cap below the cache's size: classification reads the files instead (same numbers); dense tasks write no cache
    ("data.cache_max_gb=0.000001", "data.cache=disk", "data.cache_dir=CACHE"): {
        "classification": every(printed("more than data.cache_max_gb=1e-06"), same_run),
        "segmentation": REFUSED, "detection": REFUSED},
    ("data.on_bad_image=error",): dict.fromkeys(TASKS, lambda r, b: r.code == 2 and "Traceback" not in r.err),
    ("data.allow_outside_root=true",): {"classification": lambda r, b: r.code == 0,  # effect: test_sources.py
                                        "segmentation": REFUSED,
                                        "detection": lambda r, b: r.code == 0},  # effect: test_detection.py
    ("data.sampler=balanced",): {"classification": loss_moved, "segmentation": REFUSED, "detection": REFUSED},
    ("model.name=test_resnet",): dict.fromkeys(TASKS, every(printed("test_resnet"), loss_moved)),
    ("model.pretrained=true", "model.weights=hub"): dict.fromkeys(TASKS, lambda r, b: r.code == 2 and "offline" in r.err
                                                                  or r.code == 2 and "pretrained weights" in r.err),
    ("model.drop_rate=0.5",): {"classification": loss_moved, "segmentation": REFUSED, "detection": REFUSED},
    # test_resnet: test_efficientnet's tiny blocks have no residual path for drop-path to drop
    ("model.drop_path_rate=0.3", "model.name=test_resnet"): dict.fromkeys(TASKS, moved_against("model.drop_path_rate=0.3")),
}


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("overrides", list(TABLE), ids=lambda o: o[0])
def test_every_key_takes_effect_or_is_refused(task, overrides, folders, baselines, tmp_path: Path,
                                              monkeypatch) -> None:
    args, broken = folders[task]
    expected = TABLE[overrides][task]
    if overrides == ("data.cache=disk",):
        monkeypatch.setenv("TRANSFER_CACHE_DIR", str(tmp_path / "cache"))
    overrides = tuple(item.replace("CACHE", str(tmp_path / "cache")) for item in overrides)
    if overrides[0].startswith("model.pretrained"):
        with socket.socket() as probe:  # a hub endpoint on this machine where nothing listens: offline, at once
            probe.bind(("127.0.0.1", 0))
            monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{probe.getsockname()[1]}")
    if overrides[0] == "data.on_bad_image=error":  # a copy of the data with one file that does not decode
        source = Path(args[[a.startswith("data.root=") for a in args].index(True)].split("=", 1)[1])
        shutil.copytree(source, tmp_path / "data")
        (tmp_path / "data" / broken).write_bytes(b"not an image")
        if task == "segmentation":  # its mask beside it, so the pair is read (and fails) rather than left out
            (tmp_path / "data" / broken.replace("images/", "masks/")).write_bytes(b"not an image")
        args = [a if not a.startswith("data.root=") else f"data.root={tmp_path / 'data'}" for a in args]
    result = cli([*args, *overrides], tmp_path / "run")
    if expected == REFUSED:
        assert refused(result, baselines[task], overrides[0].split("=")[0]), result.err
    else:
        assert expected(result, baselines[task]), (result.code, result.out[-2000:], result.err[-2000:])
    if overrides[0] == "data.on_bad_image=error":
        assert Path(broken).name in result.err


def test_the_table_names_every_trainer_data_and_model_key() -> None:
    """A key added to conf/ must be added to the table (or to the few tested elsewhere, listed here)."""
    from omegaconf import DictConfig

    from transfer.config import compose

    elsewhere = {"trainer.resume": "test_resume_mid_epoch_is_exact_for_every_task",
                 "data.root": "every cell",
                 "model.weights": "the model.pretrained=true cell"}
    covered = {override.split("=")[0] for overrides in TABLE for override in overrides}
    for section in ("trainer", "data", "model"):
        keys = {f"{section}.{key}" for key, value in compose([])[section].items() if not isinstance(value, DictConfig)}
        assert keys <= covered | set(elsewhere), sorted(keys - covered - set(elsewhere))


# ---------------------------------------------------------------------------------------------
# one engine: exact resume, the monitor


def count_steps(monkeypatch: pytest.MonkeyPatch, stop_at: int | None = None) -> list[int]:
    """Count the engine's training steps; send this process a real SIGINT after step `stop_at`."""
    import os
    import signal

    from transfer.engine.loop import Loop

    calls, real = [], Loop.step

    def step(self, batch, runtime):
        result = real(self, batch, runtime)
        calls.append(1)
        if len(calls) == stop_at:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(Loop, "step", step)
    return calls


@pytest.mark.parametrize("task", TASKS)
def test_resume_mid_epoch_is_exact_for_every_task(task, folders, tmp_path: Path, monkeypatch) -> None:
    args = [*folders[task][0], "trainer.epochs=2"]
    with monkeypatch.context() as patch:
        calls = count_steps(patch)
        straight = cli(args, tmp_path / "straight")
    assert straight.code == 0, straight.err
    per_epoch = len(calls) // 2
    assert per_epoch >= 2
    with monkeypatch.context() as patch:
        count_steps(patch, stop_at=per_epoch + 1)  # epoch 2, after its first step
        stopped = cli(args, tmp_path / "stopped")
    assert stopped.code == 130 and f"interrupted in epoch 2/2 after step 1/{per_epoch}" in stopped.err
    saved = load_checkpoint(tmp_path / "stopped" / "last.pt")
    assert (saved["epoch"], saved["step"]) == (1, 1)
    resumed = cli([*args, f"trainer.resume={tmp_path / 'stopped' / 'last.pt'}"], tmp_path / "stopped")
    assert resumed.code == 0 and "after epoch 1, step 1" in resumed.out, resumed.err
    ours, theirs = load_checkpoint(tmp_path / "stopped" / "last.pt"), load_checkpoint(tmp_path / "straight" / "last.pt")
    assert all(torch.equal(ours["model"][key], theirs["model"][key]) for key in theirs["model"])
    without_time = [{k: v for k, v in row.items() if k != "seconds"} for row in straight.rows()]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in resumed.rows()] == without_time


@pytest.mark.parametrize("task", TASKS)
def test_a_misspelled_monitor_is_refused_before_training_with_the_valid_names(task, folders, tmp_path) -> None:
    result = cli([*folders[task][0], "trainer.monitor=val/acc"], tmp_path / "run")
    assert refused(result, None, "trainer.monitor=val/acc") and "Choose one of: val/" in result.err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_only_validated_epochs_compete_for_best_and_early_stopping(folders, tmp_path) -> None:
    """eval_every=2: epochs 1 and 3 have no validation, so they can neither be best.pt nor reset the patience;
    the plateau (a learning rate too small to change a prediction) stops the run two validations in."""
    args = [*folders["classification"][0], "trainer.eval_every=2", "trainer.epochs=8", "optim.lr=1e-12",
            "finetune.bn=freeze_stats", "trainer.early_stop_patience=2"]
    result = cli(args, tmp_path / "run")
    assert result.code == 0, result.err
    assert [row["epoch"] for row in result.rows()] == ["1", "2", "3", "4"]
    assert result.final()["best_epoch"] == 2  # the first validated epoch; the unvalidated epoch 1 is never best
    assert load_checkpoint(tmp_path / "run" / "best.pt")["epoch"] == 2
    assert "early stop" in result.out


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_inductor_compiles_every_task(task, folders, tmp_path) -> None:
    """trainer.compile=true: torch's default backend generates code for the model (detection: its backbone);
    minutes on CPU, hence -m slow. The run learns what the uncompiled run learns, to float rounding."""
    result = cli([*folders[task][0], "trainer.compile=true"], tmp_path / "run")
    plain = cli(folders[task][0], tmp_path / "plain")
    assert result.code == 0 and "torch.compile with backend inductor" in result.out, result.err[-2000:]
    assert result.loss() == pytest.approx(plain.loss(), rel=1e-3)
    assert "_orig_mod" not in "".join(load_checkpoint(tmp_path / "run" / "best.pt")["model"])


@pytest.mark.parametrize("task", TASKS)
def test_augment_preview_draws_every_tasks_training_samples(task, folders, tmp_path) -> None:
    from PIL import Image

    args = [a for a in folders[task][0] if not a.startswith("trainer.")]
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["augment-preview", *args, "augment=flip_crop", "n=4", f"out={tmp_path / 'grid.png'}"])
    assert code == 0, err.getvalue()
    assert "wrote 4 augmented training images" in out.getvalue()
    with Image.open(tmp_path / "grid.png") as grid:
        pixels = np.asarray(grid.convert("RGB"))
    assert pixels.std() > 10  # not a blank page


@pytest.mark.parametrize("task", TASKS)
def test_lr_find_sweeps_every_tasks_own_loss(task, folders, tmp_path) -> None:
    args = [a for a in folders[task][0] if not a.startswith("trainer.")]
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["lr-find", *args, "lr_find.num_iter=8", f"out={tmp_path}"])
    assert code == 0, err.getvalue()
    sweep = json.loads((tmp_path / "lr_find.json").read_text())
    assert len(sweep["lrs"]) >= 3 and all(np.isfinite(sweep["losses"][:3]))
    assert sweep["lrs"][0] <= sweep["suggestion"] <= sweep["lrs"][-1] and "suggested optim.lr=" in out.getvalue()


def test_a_batch_batchnorm_cannot_normalise_is_one_line(folders, tmp_path: Path) -> None:
    """Batches of one image reach a 1×1 BatchNorm map at 32 px: torch's ValueError becomes the fix, in one line."""
    args, _ = folders["segmentation"]
    result = cli([*(a for a in args if a != "data.batch_size=4"), "data.batch_size=1"], tmp_path / "run")
    assert refused(result, result, "data.batch_size=2"), result.err
    assert not (tmp_path / "run").exists()

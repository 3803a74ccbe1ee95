"""Shared fixtures: a tiny generated image folder and an in-process `transfer` CLI runner."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI on import otherwise
import transfer  # noqa: E402,F401  sets OMP_WAIT_POLICY before any test module imports torch

CLASSES = ("circle", "square", "stripes")
RunCli = Callable[[list[str]], tuple[int, str, str]]


def write_png(path: Path, class_index: int, seed: int, side: int = 16) -> Path:
    """A small RGB image whose colour says its class, with noise so no two files are equal."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 40, (side, side, 3), dtype=np.uint8)
    pixels[..., class_index % 3] += 200
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_class_folder(root: Path, per_class: int = 12) -> Path:
    """root/<class>/<n>.png for the three CLASSES; the same pixels wherever it is written."""
    for index, name in enumerate(CLASSES):
        for n in range(per_class):
            write_png(root / name / f"{n}.png", index, seed=index * 100 + n)
    return root


def rows(run: Path) -> list[dict[str, str]]:
    """A run directory's metrics.csv, one dict per epoch."""
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def final(run: Path) -> dict:
    """A run directory's metrics.json."""
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder per test module for the runs it shares between its tests."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def images(runs: Path) -> Path:
    """`tiny_image_folder` once per module: 3 classes × 12 images, split by the run."""
    return write_class_folder(runs / "images")


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """data.cache=disk and linear-probe features go to a temporary folder, not the user's ~/.cache/transfer."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRANSFER_CACHE_DIR", str(tmp_path_factory.mktemp("transfer-cache")))
        yield


@pytest.fixture
def tiny_image_folder(tmp_path: Path) -> Path:
    """tmp_path/images/<class>/<n>.png: three classes, twelve images each (one pooled folder, no splits).

    Twelve is the fewest that leaves every class in the default stratified val and test splits.
    """
    return write_class_folder(tmp_path / "images")


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> RunCli:
    """Call `transfer.cli.main(args)` in-process from tmp_path (so default run folders land there).

    Returns (exit code, stdout, stderr) of that call only.
    """
    from transfer.cli import main

    monkeypatch.chdir(tmp_path)

    def run(args: list[str]) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def assert_eval_repeats(run_cli: RunCli, run: Path, out: Path, metric: str) -> None:
    """`transfer eval` of a run's best.pt gives the test metric the run itself wrote."""
    code, _, err = run_cli(["eval", f"checkpoint={run / 'best.pt'}", f"out={out}"])
    assert code == 0, err
    written = json.loads((run / "metrics.json").read_text())[metric]
    assert json.loads((out / "metrics.json").read_text())[metric] == pytest.approx(written, abs=1e-6)


def assert_backbone_exported(run_cli: RunCli, run: Path, out: Path) -> None:
    """`transfer export format=backbone` writes exactly the trained backbone's tensors."""
    import torch
    from safetensors.torch import load_file

    from transfer.checkpoint import load_checkpoint

    code, _, err = run_cli(["export", f"checkpoint={run / 'best.pt'}", "format=backbone", f"out={out}"])
    assert code == 0, err
    exported = load_file(str(out / "backbone.safetensors"))
    trained = {k.removeprefix("backbone."): v for k, v in load_checkpoint(run / "best.pt")["model"].items()
               if k.startswith("backbone.")}
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)

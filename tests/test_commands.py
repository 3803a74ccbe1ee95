"""`transfer eval`, `predict` and `augment-preview` against one tiny run trained through the CLI.

The run is trained once per module (a 100k-parameter timm test model, 32 px, one epoch), so every
test here exercises a real checkpoint, its saved config and its saved preprocessing.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from transfer.cli import main

SHAPES = ("circle", "square", "stripes")
PER_CLASS = 12
TINY_MODEL = ["model=timm", "model.name=test_efficientnet", "model.pretrained=false", "preprocess.input_size=32",
              "data.num_workers=0"]


def draw(shape: str, seed: int, side: int = 24) -> Image.Image:
    """A coloured shape on a noisy background; colour and position vary, the shape is the class."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 60, (side, side, 3), dtype=np.uint8))
    pen = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in rng.integers(120, 256, 3))
    x, y = (int(v) for v in rng.integers(2, 8, 2))
    if shape == "circle":
        pen.ellipse((x, y, x + 14, y + 14), fill=colour)
    elif shape == "square":
        pen.rectangle((x, y, x + 13, y + 13), fill=colour)
    else:
        for row in range(0, side, 6):
            pen.rectangle((0, row, side, row + 2), fill=colour)
    return image


def write_images(root: Path, shapes: tuple[str, ...], per_class: int, seed: int = 0) -> Path:
    for index, shape in enumerate(shapes):
        (root / shape).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            draw(shape, seed + index * 1000 + n).save(root / shape / f"{n:02d}.png")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One trained run: {'images', 'run', 'ckpt', 'empty'}."""
    base = tmp_path_factory.mktemp("commands")
    images = write_images(base / "images", SHAPES, PER_CLASS)
    run_dir = base / "run"
    code = main(["train", *TINY_MODEL, f"data.root={images}", "trainer.epochs=1", "trainer.progress=off",
                 f"hydra.run.dir={run_dir}"])
    assert code == 0
    (base / "empty" / "nested").mkdir(parents=True)
    (base / "empty" / "notes.txt").write_text("not an image")
    return {"images": images, "run": run_dir, "ckpt": run_dir / "best.pt", "empty": base / "empty"}


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_eval_reproduces_the_runs_own_test_metrics(run, run_cli):
    code, out, err = run_cli(["eval", f"checkpoint={run['ckpt']}"])
    assert code == 0, err
    metrics = json.loads((run["run"] / "eval-test" / "metrics.json").read_text())
    trained = json.loads((run["run"] / "metrics.json").read_text())
    assert 0.0 <= metrics["test/top1"] <= 1.0
    assert metrics["test/top1"] == pytest.approx(trained["test/top1"], abs=1e-6)
    assert metrics["test/loss"] == pytest.approx(trained["test/loss"], abs=1e-5)
    assert all("/" in key for key in metrics)
    for name in ("test_per_class.csv", "test_confusion.csv", "test_confusion.png"):
        assert (run["run"] / "eval-test" / name).stat().st_size > 0
    assert "eval test:" in out and "top1" in out


def test_eval_all_splits_counts_every_image(run, run_cli, tmp_path):
    code, _, err = run_cli(["eval", f"checkpoint={run['run']}", "split=all", f"out={tmp_path / 'all'}",
                            "batch_size=7"])
    assert code == 0, err
    metrics = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert metrics["all/images"] == len(SHAPES) * PER_CLASS


def test_eval_plain_folder_with_a_subset_of_classes(run, run_cli, tmp_path):
    folder = write_images(tmp_path / "new", ("stripes", "circle"), per_class=5, seed=50_000)
    (folder / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, out, err = run_cli(["eval", f"checkpoint={run['ckpt']}", f"data.root={folder}", f"out={tmp_path / 'ev'}"])
    assert code == 0, err
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["all/images"] == 10 and metrics["all/skipped"] == 1
    assert 0.0 <= metrics["all/top1"] <= 1.0
    per_class = {row["class"]: int(row["support"]) for row in read_rows(tmp_path / "ev" / "all_per_class.csv")}
    assert per_class == {"circle": 5, "square": 0, "stripes": 5}  # matched by name, not by folder order
    assert read_rows(tmp_path / "ev" / "skipped_images.csv")[0]["path"].endswith("broken.png")
    assert "skipped 1" in out


def test_eval_folder_with_an_unknown_class_fails_naming_it(run, run_cli, tmp_path):
    folder = write_images(tmp_path / "new", ("circle", "triangle"), per_class=2)
    code, _, err = run_cli(["eval", f"checkpoint={run['ckpt']}", f"data.root={folder}"])
    assert code == 2
    assert "triangle" in err and "circle, square, stripes" in err and "Traceback" not in err


def test_predict_writes_sorted_top_k_for_every_image(run, run_cli, tmp_path):
    code, out, err = run_cli(["predict", f"checkpoint={run['ckpt']}", f"input={run['images']}", "top_k=5"])
    assert code == 0, err
    rows = read_rows(tmp_path / "predictions.csv")  # default out: the current folder
    assert len(rows) == len(SHAPES) * PER_CLASS
    assert list(rows[0]) == ["path", "label_1", "prob_1", "label_2", "prob_2", "label_3", "prob_3"]
    assert [row["path"] for row in rows] == sorted(str(p) for p in run["images"].rglob("*.png"))
    for row in rows:
        probabilities = [float(row[f"prob_{i}"]) for i in (1, 2, 3)]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) <= 1 + 1e-5
        assert {row[f"label_{i}"] for i in (1, 2, 3)} == set(SHAPES)
    assert f"wrote {len(rows)} predictions to predictions.csv" in out
    assert len(out.splitlines()) <= 14  # a short table, not every row


def test_predict_skips_bad_images_and_lists_them(run, run_cli, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(run["images"] / "square", folder / "deep" / "square")
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "README.txt").write_text("ignored: not an image extension")
    out_csv = tmp_path / "out" / "p.csv"
    code, out, err = run_cli(["predict", f"checkpoint={run['ckpt']}", f"input={folder}", f"out={out_csv}",
                              "top_k=1", "batch_size=5"])
    assert code == 0, err
    rows = read_rows(out_csv)
    assert len(rows) == PER_CLASS and list(rows[0]) == ["path", "label_1", "prob_1"]
    skipped = read_rows(tmp_path / "out" / "p.skipped.csv")
    assert [(Path(r["path"]).name, r["reason"]) for r in skipped] == [("zero.jpg", "empty file")]
    assert "skipped 1 unreadable" in out


def test_augment_preview_writes_a_png_grid(run, run_cli, tmp_path):
    target = tmp_path / "grid.png"
    code, out, err = run_cli(["augment-preview", *TINY_MODEL, f"data.root={run['images']}", "augment=strong",
                              f"out={target}", "n=6"])
    assert code == 0, err
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(target) as image:
        assert image.format == "PNG" and image.width > 200 and image.height > 100
    assert str(target) in out


@pytest.mark.parametrize("arguments, message", [
    (["eval"], "give checkpoint=PATH"),
    (["eval", "checkpoint={base}/missing.pt"], "no such file"),
    (["eval", "checkpoint={empty}"], "without best.pt"),
    (["eval", "checkpoint={ckpt}", "bogus=1"], "unknown key 'bogus'. Valid keys for transfer eval: checkpoint="),
    (["eval", "checkpoint={ckpt}", "model.name=resnet50"], "unknown key 'model.name'"),
    (["eval", "checkpoint={ckpt}", "data.rooot={images}"], "Did you mean data.root?"),
    (["eval", "checkpoint={ckpt}", "split=holdout"], "Available splits: train, val, test, all"),
    (["eval", "checkpoint={ckpt}", "data.root={base}/nowhere"], "does not exist"),
    (["predict", "checkpoint={ckpt}"], "give input=PATH"),
    (["predict", "checkpoint={ckpt}", "input={empty}"], "holds no images"),
    (["predict", "checkpoint={ckpt}", "input={base}/nowhere"], "no such file or folder"),
    (["predict", "checkpoint={ckpt}", "input={images}", "topk=3"], "Did you mean top_k=?"),
    (["predict", "checkpoint={ckpt}", "input={images}", "top_k=zero"], "top_k=zero must be a whole number"),
    (["predict", "input={images}"], "give checkpoint=PATH"),
    (["augment-preview", "n=0"], "n=0 must be"),
    (["augment-preview", "data.bogus=1"], "data.bogus"),
])
def test_user_mistakes_exit_2_with_the_fix(run, run_cli, arguments, message):
    places = {"base": run["run"].parent, "ckpt": run["ckpt"], "images": run["images"], "empty": run["empty"]}
    code, _, err = run_cli([argument.format(**places) for argument in arguments])
    assert code == 2
    assert message in err
    assert "Traceback" not in err

"""One resize for every path (data/resize.py), proven on photo-sized JPEGs cut from real photos: evaluation's
pixels equal timm's own evaluation transform's; `transfer eval` and `transfer predict` agree file by file;
data.cache=none, ram and disk give the same evaluation; a timm export run through timm's transform agrees with
`transfer predict`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.sample_photos import build_sample_photos
from transfer.data.augment import build_eval_transform
from transfer.data.images import read_rgb
from transfer.data.resize import CacheSizes, EvalResize, train_side

MODEL = ["model=timm", "model.name=test_efficientnet", "model.pretrained=false", "preprocess.input_size=64"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return build_sample_photos(tmp_path_factory.mktemp("photos"), per_class=4, test_per_class=4, classes=4)


@pytest.fixture(scope="module")
def trained(photos: Path, tmp_path_factory) -> Path:
    from transfer.cli import main

    run_dir = tmp_path_factory.mktemp("pixels") / "run"
    assert main(["train", f"data.root={photos}", *MODEL, "trainer.epochs=1", "data.batch_size=8",
                 f"hydra.run.dir={run_dir}"]) == 0
    return run_dir


def test_photos_are_photo_sized(photos: Path) -> None:
    sizes = [Image.open(path).size for path in sorted(photos.rglob("*.jpg"))]
    assert len(sizes) == 32 and all(500 <= max(size) <= 1000 for size in sizes)


@pytest.mark.parametrize("preprocess", [
    {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.875},
    {"input_size": (3, 64, 64), "interpolation": "bilinear", "crop_pct": 0.95},
    {"input_size": (3, 96, 128), "interpolation": "bicubic", "crop_pct": 1.0},
])
def test_evaluation_pixels_equal_timms_own_evaluation_transform(photos: Path, preprocess: dict) -> None:
    from timm.data import create_transform

    preprocess = {**preprocess, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    ours = build_eval_transform(preprocess)
    theirs = create_transform(input_size=preprocess["input_size"], interpolation=preprocess["interpolation"],
                              crop_pct=preprocess["crop_pct"], is_training=False, use_prefetcher=True)
    for path in sorted(photos.rglob("*.jpg"))[::3]:
        expected = torch.as_tensor(np.asarray(theirs(Image.open(path).convert("RGB"))))
        assert torch.equal(ours(image=read_rgb(path))["image"], expected), path


def test_a_cached_evaluation_image_evaluates_to_its_files_pixels(photos: Path) -> None:
    preprocess = {"input_size": (3, 64, 64), "interpolation": "bicubic", "crop_pct": 0.875}
    path = str(next(photos.rglob("*.jpg")))
    sizes = CacheSizes(preprocess, train_side(preprocess, []), {path})
    image = read_rgb(path)
    kept = sizes.shrink(path, image)
    assert kept.shape[:2] == sizes.shape(path, *image.shape[:2]) and min(kept.shape[:2]) == 73
    assert np.array_equal(EvalResize(preprocess)(kept), EvalResize(preprocess)(image))


def test_training_images_keep_the_detail_their_random_crops_need() -> None:
    preprocess = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.875}
    crop = [{"_target_": "albumentations.RandomResizedCrop", "size": None, "scale": [0.25, 1.0]}]
    assert train_side(preprocess, crop) == 448  # a quarter of the area, 224 px wide: a 448 px side
    assert train_side(preprocess, [{"_target_": "albumentations.HorizontalFlip"}]) == 256  # evaluation's scale
    sizes = CacheSizes(preprocess, 448, set())
    assert sizes.shape("a.jpg", 600, 900) == (448, 672) and sizes.shape("b.jpg", 300, 400) == (300, 400)


def read_table(path: Path) -> dict[str, dict]:
    """A CSV's rows by their image's class folder and name."""
    with open(path, newline="") as handle:
        return {Path(row["path"]).parent.name + "/" + Path(row["path"]).stem: row for row in csv.DictReader(handle)}


def test_eval_and_predict_agree_file_by_file_whatever_the_cache(trained: Path, photos: Path, run_cli,
                                                                tmp_path: Path) -> None:
    results = {}
    for cache in ("none", "ram", "disk"):
        code, _, err = run_cli(["eval", f"checkpoint={trained}", "split=test", f"data.cache={cache}",
                                f"data.cache_dir={tmp_path / 'cache'}", f"out={tmp_path / cache}"])
        assert code == 0, err
        results[cache] = ((tmp_path / cache / "metrics.json").read_text(),
                          (tmp_path / cache / "test_predictions.csv").read_text())
    assert results["none"] == results["ram"] == results["disk"]

    code, _, err = run_cli(["predict", f"checkpoint={trained}", f"input={photos / 'test'}",
                            f"out={tmp_path / 'predictions.csv'}", "top_k=1"])
    assert code == 0, err
    evaluated = read_table(tmp_path / "none" / "test_predictions.csv")
    predicted = read_table(tmp_path / "predictions.csv")
    assert len(evaluated) == len(predicted) == 16
    for key, row in evaluated.items():
        assert predicted[key]["label_1"] == row["predicted"], key
        assert abs(float(predicted[key]["prob_1"]) - float(row["probability"])) < 1e-5, key  # other batch sizes


def test_timm_export_through_timms_transform_agrees_with_predict(trained: Path, photos: Path, run_cli,
                                                                 tmp_path: Path) -> None:
    import timm
    from timm.data import create_transform, resolve_model_data_config

    code, _, err = run_cli(["export", f"checkpoint={trained}", "format=timm", f"out={tmp_path / 'timm'}"])
    assert code == 0, err
    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    transform = create_transform(**resolve_model_data_config(model))
    files = sorted((photos / "test").rglob("*.jpg"))
    with torch.no_grad():
        theirs = torch.cat([model(transform(Image.open(f).convert("RGB"))[None]).softmax(-1) for f in files])
    import transfer

    classes = json.loads((trained / "classes.json").read_text())
    ours = torch.tensor([[row[name] for name in classes] for row in transfer.load(trained).predict(files)])
    agree = (ours.argmax(1) == theirs.argmax(1)).float().mean().item()
    assert agree >= 0.99 and (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("build", ["train", "dense_eval", "eval"])
def test_every_shrinking_resize_is_antialiased(build: str) -> None:
    """Stripes of a 3-pixel period shrunk 7.8× are flat grey (a third of the way up) when the resize filters
    (antialiasing); a resize that only samples them (OpenCV's cubic) makes moiré stripes."""
    from transfer.data.augment import build_dense_transform, build_train_transform

    preprocess = {"input_size": (3, 64, 64), "interpolation": "bicubic", "crop_pct": 1.0}
    stripes = np.where(np.arange(500) % 3 == 0, 255, 0).astype(np.uint8)
    image = np.ascontiguousarray(np.broadcast_to(stripes[None, :, None], (500, 500, 3)))
    steps = [{"_target_": "albumentations.Resize", "height": None, "width": None}]
    transform = {"train": lambda: build_train_transform(steps, preprocess),
                 "dense_eval": lambda: build_dense_transform(None, preprocess),
                 "eval": lambda: build_eval_transform(preprocess)}[build]()
    out = transform(image=image)["image"].float()
    assert out.shape == (3, 64, 64) and out.std() < 20 and abs(out.mean() - 85) < 8  # sampled: std 95

"""The linear-probe fast path (transfer.tasks.probe): features once, the head trained on them by the same loop.

It must give the slow path's results, leave a normal run directory whose checkpoints hold the whole model,
reuse its feature cache on a second run, and extract again when an image, the weights or the preprocessing
change. Runs use timm's 100k-parameter test model at 32 px on the generated three-colour folder.
"""

from __future__ import annotations

import copy
import csv
import json
import os
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf

from conftest import CLASSES, write_png
from transfer.data.augment import build_eval_transform, build_train_transform
from transfer.checkpoint import load_checkpoint
from transfer.cli import main
from transfer.config import compose
from transfer.data.dataset import ImageDataset
from transfer.data.sources import Record
from transfer.models.inference import Normalizer
from transfer.tasks.probe import blocker, feature_key, head_view, weights_hash

TINY = ["model=timm", "model.name=test_efficientnet", "model.pretrained=false", "preprocess.input_size=32",
        "data.num_workers=0", "data.batch_size=8", "trainer.progress=plain", "trainer.epochs=3",
        "finetune=linear_probe", "augment=none", "optim.lr=0.05"]
PREPROCESS = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
              "crop_pct": 1.0}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("probe")
    for index, name in enumerate(CLASSES):
        for n in range(12):
            write_png(root / "images" / name / f"{n}.png", index, seed=index * 100 + n)
    return root


@pytest.fixture(scope="module")
def runs(folder: Path) -> dict[str, tuple[Path, str]]:
    """The fast path twice (the second from the cache) and the slow path, same settings; (run dir, log)."""
    import contextlib
    import io

    done = {}
    for name, extra in (("fast", []), ("again", []), ("slow", ["trainer.feature_cache=off"])):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["train", *TINY, f"data.root={folder / 'images'}", f"data.cache_dir={folder / 'cache'}",
                         f"hydra.run.dir={folder / name}", *extra])
        assert code == 0
        done[name] = (folder / name, out.getvalue())
    return done


def rows(run: Path) -> list[dict[str, float]]:
    with open(run / "metrics.csv", newline="") as handle:
        return [{key: float(value) for key, value in row.items() if key != "seconds"} for row in csv.DictReader(handle)]


def final(run: Path) -> dict:
    return {key: value for key, value in json.loads((run / "metrics.json").read_text()).items()
            if not key.endswith("_seconds")}  # train_seconds, startup_seconds: timings


def test_fast_path_matches_the_slow_path(runs) -> None:
    fast, slow = runs["fast"][0], runs["slow"][0]
    assert "linear probe on cached features" in runs["fast"][1]
    assert "linear probe on images every epoch: trainer.feature_cache=off" in runs["slow"][1]
    assert final(fast)["test/top1"] > 0.5  # it learned something: the comparison below means something
    for ours, theirs in zip(rows(fast), rows(slow), strict=True):
        assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-5)
    assert final(fast) == pytest.approx(final(slow), rel=1e-4, abs=1e-5)


def test_fast_path_writes_a_normal_run_whose_checkpoint_is_the_whole_model(runs, folder: Path) -> None:
    fast, slow = runs["fast"][0], runs["slow"][0]
    for name in ("config.yaml", "metrics.csv", "metrics.json", "last.pt", "best.pt", "curves.png", "run_info.json"):
        assert (fast / name).exists(), name
    ours, theirs = load_checkpoint(fast / "best.pt")["model"], load_checkpoint(slow / "best.pt")["model"]
    assert ours.keys() == theirs.keys()  # backbone + head, loadable by eval / predict / export
    assert all(torch.allclose(ours[key].float(), theirs[key].float(), atol=1e-5) for key in ours)
    note = json.loads((fast / "features.json").read_text())
    assert note["splits"]["train"]["images"] == 24 and not note["splits"]["train"]["cached"]
    code = main(["eval", f"checkpoint={fast / 'best.pt'}", "split=test", f"out={folder / 'eval'}"])
    assert code == 0
    evaluated = json.loads(next((folder / "eval").rglob("metrics.json")).read_text())
    assert evaluated["test/top1"] == pytest.approx(final(fast)["test/top1"])


def test_second_run_reuses_the_features(runs) -> None:
    again, log = runs["again"]
    assert "train 24×256 (cached), val 4×256 (cached), test 8×256 (cached)" in log
    assert all(split["cached"] for split in json.loads((again / "features.json").read_text())["splits"].values())
    assert rows(again) == rows(runs["fast"][0]) and final(again) == final(runs["fast"][0])


def test_the_cache_folder_lists_each_split_with_what_it_came_from(runs, folder: Path) -> None:
    """One entry per split (KEY.npy + KEY.json + KEY.about.json), described for `transfer cache list`."""
    from transfer.data.cache_folder import entries

    found = entries(folder / "cache")
    assert sorted(entry.kind for entry in found) == ["features"] * 3
    assert all(len(entry.files) == 3 for entry in found)
    described = sorted(entry.describe() for entry in found)
    assert described[0] == f"test_efficientnet features of test (8 images) of {folder / 'images'}"
    assert {entry.about["split"] for entry in found} == {"train", "val", "test"}


def key_of(records: list[Record], preprocess: dict, model: torch.nn.Module, **cfg_overrides) -> str:
    cfg = OmegaConf.create({"model": {"name": "test_efficientnet"}, **cfg_overrides})
    dataset = ImageDataset(records, build_eval_transform(preprocess))
    normalize = Normalizer(preprocess["mean"], preprocess["std"], torch.device("cpu"), True)
    return feature_key(cfg, model, weights_hash(model), dataset, normalize, None, torch.device("cpu"))


def test_feature_key_follows_images_weights_and_preprocessing(tmp_path: Path) -> None:
    paths = [write_png(tmp_path / f"{n}.png", n % 3, seed=n) for n in range(4)]
    records = [Record(str(path), n % 3) for n, path in enumerate(paths)]
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3)
    key = key_of(records, PREPROCESS, model)
    assert key == key_of(records, PREPROCESS, model)
    assert key != key_of(records, {**PREPROCESS, "input_size": [3, 40, 40]}, model)  # preprocessing
    assert key != key_of(records, {**PREPROCESS, "mean": [0.4] * 3}, model)
    assert key != key_of(records[:3], PREPROCESS, model)  # which images
    trained_head = copy.deepcopy(model)
    torch.nn.init.ones_(trained_head.get_classifier().weight)
    assert key == key_of(records, PREPROCESS, trained_head)  # the head is not part of the features
    other_weights = copy.deepcopy(model)
    with torch.no_grad():
        next(other_weights.parameters()).add_(1)
    assert key != key_of(records, PREPROCESS, other_weights)
    write_png(paths[0], 0, seed=99)  # an image changed on disk
    os.utime(paths[0], ns=(paths[0].stat().st_atime_ns, paths[0].stat().st_mtime_ns + 10**9))
    assert key != key_of(records, PREPROCESS, model)


@pytest.mark.parametrize("overrides, reason", [
    (["augment=none"], None),
    (["augment=light"], "the training augmentation is random (RandomResizedCrop)"),
    (["augment=none", "trainer.feature_cache=off"], "trainer.feature_cache=off"),
    (["augment=none", "mixup=mixup"], "mixup/cutmix"),
    (["augment=none", "trainer.tta=flip"], "trainer.tta=flip"),
    (["augment=none", "finetune=full"], "finetune.strategy=full"),
])
def test_fast_path_only_when_the_inputs_are_deterministic(overrides: list[str], reason: str | None) -> None:
    cfg = compose(["finetune=linear_probe", *overrides])
    found = blocker(cfg, build_train_transform(OmegaConf.to_container(cfg.augment.train), PREPROCESS))
    assert found == reason if reason is None else reason in found


def test_head_view_is_the_same_model_with_a_classifier_forward() -> None:
    model = timm.create_model("test_efficientnet", num_classes=3).eval()
    view = head_view(model)
    assert view.state_dict().keys() == model.state_dict().keys()
    assert all(a is b for a, b in zip(view.parameters(), model.parameters()))
    images = torch.randn(2, 3, 32, 32)
    features = model.forward_head(model.forward_features(images), pre_logits=True)
    assert torch.allclose(view(features), model(images), atol=1e-5)
    twin = copy.deepcopy(view)  # as the EMA copies it: a copy that classifies with its own head
    torch.nn.init.zeros_(twin.get_classifier().weight)
    torch.nn.init.zeros_(twin.get_classifier().bias)
    assert torch.equal(twin(features), torch.zeros(2, 3)) and not torch.equal(view(features), torch.zeros(2, 3))

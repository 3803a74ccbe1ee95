"""Augmentation: pipelines from config (transfer.data.augment) and the reseeding contract of the loaders.

albumentations 2.0.8 replays one random stream in every DataLoader worker and every epoch
(DESIGN.md §4). transfer makes each sample's augmentation a function of (seed, epoch, index); the
tests below show the bug with a naive loader, then that the contract holds with ours.
"""

from __future__ import annotations

import os
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info

from transfer.data.augment import build_eval_transform, build_train_transform
from transfer.config import config_dir
from transfer.data.dataset import ImageDataset
from transfer.data.loaders import build_loader
from transfer.data.sources import Record
from transfer.errors import UserError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402

PREPROCESS = {"input_size": [3, 16, 16], "interpolation": "bilinear", "crop_pct": 0.875}
RANDOM_STEPS = [
    {"_target_": "albumentations.RandomResizedCrop", "size": None, "scale": [0.1, 1.0]},
    {"_target_": "albumentations.HorizontalFlip", "p": 0.5},
]


def noise(seed: int = 0, shape=(32, 32, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


class WorkerTagged(ImageDataset):
    """Also says which worker produced each sample (-1: the main process)."""

    def __getitem__(self, key):
        item = super().__getitem__(key)
        info = get_worker_info()
        item["worker"] = info.id if info else -1
        return item


def same_image_dataset(count: int = 8, seed: int = 0) -> WorkerTagged:
    return WorkerTagged([Record(noise(), 0)] * count, build_train_transform(RANDOM_STEPS, PREPROCESS), seed=seed)


def epoch_outputs(loader, epoch: int) -> dict[int, torch.Tensor]:
    """index → augmented image for one pass over the loader."""
    loader.sampler.set_epoch(epoch)
    return {int(i): image for batch in loader for i, image in zip(batch["index"], batch["image"])}


def all_distinct(images) -> bool:
    return all(not torch.equal(a, b) for a, b in combinations(list(images), 2))


# The bug the design works around -----------------------------------------------------------------

class NaiveDataset(Dataset):
    def __init__(self, transform, image, count):
        self.transform, self.image, self.count = transform, image, count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return self.transform(image=self.image)["image"]


def test_naive_albumentations_replays_the_same_stream_in_every_worker_and_epoch():
    transform = A.Compose([A.RandomCrop(16, 16), A.HorizontalFlip(p=0.5)])  # unseeded, as users write it
    loader = DataLoader(NaiveDataset(transform, noise(), 8), batch_size=4, num_workers=2, persistent_workers=False)

    first, second = ([batch.numpy() for batch in loader] for _ in range(2))

    worker0, worker1 = first  # batches go round-robin to the two workers
    assert all_distinct(torch.from_numpy(worker0))  # within a worker the stream does advance...
    np.testing.assert_array_equal(worker0, worker1)  # ...but both workers draw the same numbers
    np.testing.assert_array_equal(np.stack(first), np.stack(second))  # and every epoch starts over


# The contract: augmentation = f(seed, epoch, index) ----------------------------------------------

def test_augmentations_differ_across_workers():
    loader = build_loader(same_image_dataset(8), batch_size=4, train=True, num_workers=2, seed=0)
    batches = list(loader)

    assert [set(b["worker"].tolist()) for b in batches] == [{0}, {1}]
    images = [image for batch in batches for image in batch["image"]]
    assert len(images) == 8 and all_distinct(images)
    assert not torch.equal(batches[0]["image"], batches[1]["image"])


def test_augmentations_differ_across_epochs():
    loader = build_loader(same_image_dataset(8), batch_size=4, train=True, num_workers=2, seed=0)
    epoch0, epoch1 = epoch_outputs(loader, 0), epoch_outputs(loader, 1)
    assert sorted(epoch0) == sorted(epoch1) == list(range(8))
    for index in epoch0:
        assert not torch.equal(epoch0[index], epoch1[index]), index


def test_steps_of_one_pipeline_draw_independent_numbers():
    """Reseeding must not give every step its own copy of one stream: with p=0.5 each, a horizontal
    and a vertical flip would then always happen together."""
    image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    steps = [{"_target_": "albumentations.HorizontalFlip", "p": 0.5},
             {"_target_": "albumentations.VerticalFlip", "p": 0.5}]
    dataset = ImageDataset([Record(image, 0)] * 64, build_train_transform(steps, PREPROCESS), seed=0)
    flips = {"none": image, "h": image[:, ::-1], "v": image[::-1], "hv": image[::-1, ::-1]}
    seen = set()
    for index in range(len(dataset)):
        out = dataset[(0, index)]["image"].permute(1, 2, 0).numpy()
        seen.add(next(name for name, flipped in flips.items() if np.array_equal(out, flipped)))
    assert seen == set(flips)


def run(num_workers: int, seed: int, epochs: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    records = [Record(noise(i), i % 3) for i in range(12)]
    dataset = ImageDataset(records, build_train_transform(RANDOM_STEPS, PREPROCESS), seed=seed)
    loader = build_loader(dataset, batch_size=4, train=True, num_workers=num_workers, seed=seed)
    out = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        out += [(batch["index"], batch["image"]) for batch in loader]
    return out


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(ia, ib) and torch.equal(xa, xb) for (ia, xa), (ib, xb) in zip(a, b))


def test_same_seed_same_batches_whatever_the_worker_count():
    reference = run(num_workers=0, seed=3)
    assert same_batches(reference, run(num_workers=0, seed=3))
    assert same_batches(reference, run(num_workers=2, seed=3))
    assert not same_batches(reference, run(num_workers=0, seed=4))


# Building pipelines from config ------------------------------------------------------------------

LANDSCAPE = noise(1, (200, 300, 3))  # 300×200 (width × height)
GRAY_28 = np.repeat(noise(2, (28, 28, 1)), 3, axis=2)
WIDE = {**PREPROCESS, "input_size": [3, 40, 56]}


def shape_of(transform, image) -> tuple[int, ...]:
    return tuple(transform(image=image)["image"].shape)


def test_null_sizes_become_the_input_size():
    crop = build_train_transform([{"_target_": "albumentations.RandomResizedCrop", "size": None}], WIDE)
    center = build_train_transform([{"_target_": "albumentations.CenterCrop", "height": None, "width": None}], WIDE)
    given = build_train_transform([{"_target_": "albumentations.RandomResizedCrop", "size": [24, 20]}], WIDE)
    assert shape_of(crop, LANDSCAPE) == shape_of(crop, GRAY_28) == (3, 40, 56)
    assert shape_of(center, LANDSCAPE) == (3, 40, 56)
    assert shape_of(given, LANDSCAPE) == (3, 24, 20)


@pytest.mark.parametrize("step, words", [
    ({"_target_": "albumentations.Affine", "rotate": 10, "value": 0}, ["Affine", "value", "fill"]),
    ({"_target_": "albumentations.RandomResizedCrop", "height": 32, "width": 32}, ["height", "size=(h, w)"]),
    ({"_target_": "albumentations.RandomResizedCrop", "size": None, "scael": [0.5, 1]}, ["scael"]),
    ({"_target_": "albumentations.HorizontalFlipp"}, ["unknown transform", "HorizontalFlipp"]),
    ({"_target_": "albumentations.Rotate", "p": 2.0}, ["Rotate", "p"]),
    ({"p": 0.5}, ["_target_"]),
])
def test_bad_steps_are_user_errors_that_say_what_is_wrong(step, words):
    with pytest.raises(UserError) as raised:
        build_train_transform([step], PREPROCESS)
    for word in words:
        assert word in str(raised.value)


PRESETS = sorted((config_dir() / "augment").glob("*.yaml"))
@pytest.mark.parametrize("preset", [pytest.param(p, id=p.stem) for p in PRESETS])
def test_every_augment_preset_builds_and_gives_uint8_chw(preset):
    steps = OmegaConf.to_container(OmegaConf.load(preset).train)
    transform = build_train_transform(steps, WIDE)
    for image in (GRAY_28, LANDSCAPE):
        out = transform(image=image)["image"]
        assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 40, 56)


def test_the_presets_are_found():
    assert {"default", "none"} <= {p.stem for p in PRESETS}


# Eval pipeline: timm's resize + center crop ------------------------------------------------------

def timm_eval(image: np.ndarray, size: int, crop_pct: float) -> torch.Tensor:
    import timm.data

    transform = timm.data.create_transform(input_size=(3, size, size), crop_pct=crop_pct, interpolation="bilinear",
                                           is_training=False, mean=(0, 0, 0), std=(1, 1, 1))
    return (transform(Image.fromarray(image)) * 255).round().to(torch.uint8)


def ramp(height: int, width: int) -> np.ndarray:
    """Red grows left to right, green top to bottom: any shift or scale error changes the values."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), np.full_like(x, 99)], -1).astype(np.uint8)


def eval_preprocess(size: int, crop_pct: float) -> dict:
    return {"input_size": [3, size, size], "interpolation": "bilinear", "crop_pct": crop_pct}


@pytest.mark.parametrize("height, width", [(200, 300), (300, 200), (28, 28)])
def test_eval_transform_matches_timm_geometry(height, width):
    image = ramp(height, width)
    ours = build_eval_transform(eval_preprocess(64, 0.875))(image=image)["image"]
    assert ours.shape == (3, 64, 64) and ours.dtype == torch.uint8
    difference = (ours.int() - timm_eval(image, 64, 0.875).int()).abs()
    assert difference.max() <= 3  # resampling filters differ (cv2 vs PIL); geometry must not


def test_eval_scale_side_is_int_of_input_over_crop_pct():
    """48 / 0.95 = 50.5 → 50: an image whose short side is already 50 is only center-cropped, exactly."""
    image = noise(5, (50, 80, 3))
    ours = build_eval_transform(eval_preprocess(48, 0.95))(image=image)["image"]
    expected = torch.from_numpy(image[1:49, 16:64]).permute(2, 0, 1)
    assert torch.equal(ours, expected)
    assert torch.equal(timm_eval(image, 48, 0.95), expected)


def test_eval_transform_non_square_input():
    transform = build_eval_transform({**eval_preprocess(0, 0.875), "input_size": [3, 32, 64]})
    for image in (LANDSCAPE, GRAY_28, np.ascontiguousarray(LANDSCAPE.transpose(1, 0, 2))):
        assert shape_of(transform, image) == (3, 32, 64)



def test_a_config_cannot_run_code_through_an_augment_target(tiny_image_folder: Path, tmp_path: Path, run_cli) -> None:
    """A recipe, a saved config.yaml or an override is data: `_target_` may name albumentations transforms
    only, refused in one line before anything is imported or called."""
    marker = tmp_path / "PWNED"
    step = f"{{_target_:subprocess.Popen,args:[touch,{marker}]}}"
    code, _, err = run_cli(["train", f"data.root={tiny_image_folder}", f"augment.train=[{step}]",
                            f"hydra.run.dir={tmp_path / 'run'}"])
    assert code == 2 and "subprocess.Popen is not an albumentations transform" in err
    assert len(err.strip().splitlines()) == 1 and not marker.exists()

    from transfer.config import compose

    saved = compose([f"data.root={tiny_image_folder}"])
    saved.augment.train = [{"_target_": "os.system", "command": f"touch {marker}"}]
    OmegaConf.save(saved, tmp_path / "config.yaml")
    code, _, err = run_cli(["train", "--config", str(tmp_path / "config.yaml"), f"hydra.run.dir={tmp_path / 'run2'}"])
    assert code == 2 and "os.system is not an albumentations transform" in err and not marker.exists()

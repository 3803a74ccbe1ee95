"""From config to DataLoaders: records → cache → datasets → samplers → loaders.

Augmentation randomness is a pure function of (seed, epoch, sample index): the sampler hands the
epoch to every sample, and the dataset reseeds the albumentations pipeline from it. That sidesteps
albumentations 2.0.8 replaying the same random stream in every worker and every epoch, makes runs
identical whatever the worker count, and lets a resumed run continue exactly.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Sampler

from transfer.data.augment import build_eval_transform, build_train_transform
from transfer.config import require
from transfer.data.cache import CACHE_KINDS, build_cache, memory_budget
from transfer.data.cache_folder import DEFAULT_MAX_GB, cap_bytes
from transfer.data.resize import CacheSizes, train_side
from transfer.data.dataset import ImageDataset, collate_skipping_bad
from transfer.data.sources import SPLIT_ALIASES, DataSplits, Record, build_splits, read_folder, read_manifest
from transfer.distributed import rank, world_size
from transfer.errors import UserError


@dataclass
class Data:
    classes: list[str]
    datasets: dict[str, ImageDataset]
    skipped: list[tuple[str, str]]
    description: str


def index_data(data_cfg) -> DataSplits:
    """The class list and the records of each split (nothing decoded yet)."""
    require(data_cfg.cache, CACHE_KINDS, "data.cache")
    require(data_cfg.on_bad_image, ("skip", "error"), "data.on_bad_image")
    return build_splits(data_cfg.root, data_cfg.val_fraction, data_cfg.test_fraction, data_cfg.split_seed,
                        allow_outside_root=data_cfg.get("allow_outside_root", False))


def build_datasets(splits: DataSplits, data_cfg, preprocess: dict, augment_steps: list[dict], seed: int) -> Data:
    """Decode into the cache (if asked) and attach the train and eval pipelines."""
    strict = data_cfg.on_bad_image == "error"
    skipped = list(splits.skipped)
    cache = None
    cap = cap_bytes(getattr(data_cfg, "cache_max_gb", DEFAULT_MAX_GB))
    if data_cfg.cache != "none":
        sizes = CacheSizes(preprocess, train_side(preprocess, augment_steps), _eval_sources(splits))
        cache, bad = build_cache(data_cfg.cache, _all_records(splits), sizes, strict=strict,
                                 cache_dir=getattr(data_cfg, "cache_dir", None), max_bytes=cap)
        skipped += bad
        splits = _without(splits, {path for path, _ in bad})
    train_transform = build_train_transform(augment_steps, preprocess)
    eval_transform = build_eval_transform(preprocess)
    # with a cache, evaluation splits also keep their transformed images (deterministic) after the first pass
    memoize = cache is not None and _eval_bytes(splits, preprocess) <= memory_budget()[0] // 2
    # training files read without the cache may decode reduced to the side the random crops need (never eval's)
    side = train_side(preprocess, augment_steps)
    datasets = {name: ImageDataset(records, train_transform if name == "train" else eval_transform,
                                   cache=cache, strict=strict, seed=seed if name == "train" else None, memoize=memoize,
                                   decode_side=side if name == "train" else None)
                for name, records in splits.splits.items()}
    return Data(splits.classes, datasets, skipped, splits.description)


def _all_records(splits: DataSplits) -> list[Record]:
    return [record for records in splits.splits.values() for record in records]


def _eval_bytes(splits: DataSplits, preprocess: dict) -> int:
    """Memory the evaluation splits' transformed uint8 images take."""
    count = sum(len(records) for name, records in splits.splits.items() if name != "train")
    return count * math.prod(preprocess["input_size"])


def _eval_sources(splits: DataSplits) -> set[str]:
    """The files only evaluation reads: the cache keeps them at evaluation's scale."""
    return {record.source for name, records in splits.splits.items() if name != "train" for record in records
            if isinstance(record.source, str)}


def _without(splits: DataSplits, bad_paths: set[str]) -> DataSplits:
    if not bad_paths:
        return splits
    kept = {name: [r for r in records if r.name not in bad_paths] for name, records in splits.splits.items()}
    return DataSplits(splits.classes, kept, splits.skipped, splits.description)


def resolve_workers(num_workers: int | str) -> int:
    """auto: none on two cores or fewer (workers would steal the cores the model computes on)."""
    if num_workers != "auto":
        return int(num_workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores <= 2 else min(cores - 1, 8)


SAMPLERS = ("random", "balanced")


class EpochSampler(Sampler):
    """Yields (epoch, index) pairs: shuffled by (seed, epoch) for training, in order otherwise.

    With several processes each takes every `world`-th pair from its `rank`: training pads the epoch's order
    with its first indices to a multiple of `world`, so every process makes the same number of steps (as
    torch's DistributedSampler); evaluation is never padded, so the shards together are the split once."""

    def __init__(self, size: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1) -> None:
        self.size, self.shuffle, self.seed, self.epoch = size, shuffle, seed, 0
        self.rank, self.world = rank, world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, index) for index in self.share(self.order())])

    def share(self, order: list[int]) -> list[int]:
        if self.world == 1:
            return order
        if self.shuffle and order:
            order = (order * math.ceil(len(self) * self.world / len(order)))[:len(self) * self.world]
        return order[self.rank::self.world]

    def __len__(self) -> int:
        if self.world == 1:
            return self.size
        if self.shuffle:
            return math.ceil(self.size / self.world)
        return len(range(self.rank, self.size, self.world))


class BalancedEpochSampler(EpochSampler):
    """Yields (epoch, index) pairs drawn with replacement, each class equally likely (weights 1 / class
    count, as scikit-learn's 'balanced'), keyed by (seed, epoch); an epoch has as many samples as the data."""

    def __init__(self, labels: list[int], seed: int, rank: int = 0, world: int = 1) -> None:
        super().__init__(len(labels), shuffle=True, seed=seed, rank=rank, world=world)
        labels_tensor = torch.as_tensor(labels, dtype=torch.long)
        counts = torch.bincount(labels_tensor).double()
        self.weights = (1.0 / counts)[labels_tensor]

    def order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.multinomial(self.weights, self.size, replacement=True, generator=generator).tolist()


def build_loader(dataset: ImageDataset, batch_size: int, train: bool, num_workers: int, seed: int,
                 pin_memory: bool = False, sampler: str = "random", collate_fn=collate_skipping_bad,
                 shard: bool = False) -> DataLoader:
    """The one place that picks samplers and loader settings, for every task (segmentation and detection
    bring their own `collate_fn`); `sampler` (data.sampler) applies to training. `shard`: this process reads
    its share only (a multi-process run; transfer.distributed)."""
    require(sampler, SAMPLERS, "data.sampler")
    workers = resolve_workers(num_workers)
    place = {"rank": rank(), "world": world_size()} if shard else {}
    if train and sampler == "balanced":
        chosen = BalancedEpochSampler([record.label for record in dataset.records], seed=seed, **place)
    else:
        chosen = EpochSampler(len(dataset), shuffle=train, seed=seed, **place)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=chosen,
        num_workers=workers, collate_fn=collate_fn, pin_memory=pin_memory,
        drop_last=train and len(chosen) > batch_size, persistent_workers=workers > 0,
        worker_init_fn=_quiet_opencv if workers > 0 else None,
        prefetch_factor=4 if workers > 0 else None,
    )


def _quiet_opencv(_: int) -> None:
    """OpenCV's own thread pool inside every worker oversubscribes the cores."""
    import cv2

    cv2.setNumThreads(0)


# ---------------------------------------------------------------------------------------------
# the data of `transfer eval`

EVAL_SPLITS = ("train", "val", "test")


def eval_splits(data_cfg: DictConfig, trained_root: str | None, classes: list[str]) -> DataSplits:
    """The training data split exactly as training split it, or a new data.root taken as it is
    (its split folders, or all of its images); labels follow the checkpoint's class order by name."""
    require(data_cfg.cache, CACHE_KINDS, "data.cache")
    require(data_cfg.on_bad_image, ("skip", "error"), "data.on_bad_image")
    root = data_cfg.root
    if same_root(root, trained_root):
        if root is not None and not Path(root).expanduser().exists():
            raise UserError(f"the checkpoint was trained on data.root={root}, which does not exist here. "
                            "Point eval at the data with data.root=PATH.")
        return relabel(index_data(data_cfg), classes)
    return read_as_is(Path(root).expanduser(), classes)


def same_root(root: str | None, trained_root: str | None) -> bool:
    if root is None or trained_root is None:
        return root is None and trained_root is None
    return Path(root).expanduser().resolve() == Path(trained_root).expanduser().resolve()


def read_as_is(root: Path, classes: list[str]) -> DataSplits:
    """A folder or manifest other than the training data: never split, since all of it is unseen."""
    if not root.exists():
        raise UserError(f"data.root={root} does not exist. Point it at a folder of class folders, "
                        "a folder with train/ val/ test/ inside, or a CSV manifest.")
    if root.is_file():
        return relabel(read_manifest(root), classes)
    split_dirs = {SPLIT_ALIASES[d.name.lower()]: d for d in sorted(root.iterdir())
                  if d.is_dir() and d.name.lower() in SPLIT_ALIASES}
    if not split_dirs:
        return relabel(read_folder(root), classes)
    parts = {split: relabel(read_folder(folder), classes) for split, folder in split_dirs.items()}
    splits = {split: part.splits["all"] for split, part in parts.items()}
    return DataSplits(classes, splits, [], f"split folders {root}")


def relabel(data: DataSplits, classes: list[str]) -> DataSplits:
    """Map the data's labels onto the checkpoint's classes by name; a subset of them is fine."""
    unknown = [name for name in data.classes if name not in classes]
    if unknown:
        raise UserError(f"{data.description or 'the data'} has classes the checkpoint does not know: "
                        f"{', '.join(unknown)}. It knows: {', '.join(classes)}. Remove those class folders "
                        "(or labels), or evaluate a checkpoint trained on them.")
    index = [classes.index(name) for name in data.classes]
    splits = {name: [Record(r.source, index[r.label]) for r in records] for name, records in data.splits.items()}
    return DataSplits(list(classes), splits, data.skipped, data.description)


def choose_split(requested: str | None, data: DataSplits) -> str:
    """Default: test, else val, else every image (a new folder without split folders)."""
    available = [name for name in EVAL_SPLITS if name in data.splits] + ["all"]
    if not requested:
        return next(name for name in ("test", "val", "all") if name in available)
    split = SPLIT_ALIASES.get(requested.lower(), requested.lower())
    if split not in available:
        raise UserError(f"split={requested} is not available for {data.description or 'this data'}. "
                        f"Available splits: {', '.join(available)}.")
    return split

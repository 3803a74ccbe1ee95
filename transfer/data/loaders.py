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
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from transfer.augment import build_eval_transform, build_train_transform
from transfer.config import require
from transfer.data.cache import CACHE_KINDS, available_memory_bytes, build_cache
from transfer.data.dataset import ImageDataset, collate_skipping_bad
from transfer.data.sources import DataSplits, Record, build_splits


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
    if data_cfg.cache != "none":
        cache, bad = build_cache(data_cfg.cache, _all_records(splits), keep_side=_keep_side(preprocess), strict=strict,
                                 cache_dir=getattr(data_cfg, "cache_dir", None))
        skipped += bad
        splits = _without(splits, {path for path, _ in bad})
    train_transform = build_train_transform(augment_steps, preprocess)
    eval_transform = build_eval_transform(preprocess)
    # with a cache, evaluation splits also keep their transformed images (deterministic) after the first pass
    memoize = cache is not None and _eval_bytes(splits, preprocess) <= available_memory_bytes() // 4
    datasets = {name: ImageDataset(records, train_transform if name == "train" else eval_transform,
                                   cache=cache, strict=strict, seed=seed if name == "train" else None, memoize=memoize)
                for name, records in splits.splits.items()}
    return Data(splits.classes, datasets, skipped, splits.description)


def _all_records(splits: DataSplits) -> list[Record]:
    return [record for records in splits.splits.values() for record in records]


def _eval_bytes(splits: DataSplits, preprocess: dict) -> int:
    """Memory the evaluation splits' transformed uint8 images take."""
    count = sum(len(records) for name, records in splits.splits.items() if name != "train")
    return count * math.prod(preprocess["input_size"])


def _keep_side(preprocess: dict) -> int:
    """The shortest side any pipeline crops from; larger images are shrunk to it in the cache."""
    return int(min(preprocess["input_size"][1:]) / preprocess["crop_pct"]) + 1


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
    """Yields (epoch, index) pairs: shuffled by (seed, epoch) for training, in order otherwise."""

    def __init__(self, size: int, shuffle: bool, seed: int) -> None:
        self.size, self.shuffle, self.seed, self.epoch = size, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = range(self.size)
        return iter([(self.epoch, index) for index in order])

    def __len__(self) -> int:
        return self.size


class BalancedEpochSampler(EpochSampler):
    """Yields (epoch, index) pairs drawn with replacement, each class equally likely (weights 1 / class
    count, as scikit-learn's 'balanced'), keyed by (seed, epoch); an epoch has as many samples as the data."""

    def __init__(self, labels: list[int], seed: int) -> None:
        super().__init__(len(labels), shuffle=True, seed=seed)
        labels_tensor = torch.as_tensor(labels, dtype=torch.long)
        counts = torch.bincount(labels_tensor).double()
        self.weights = (1.0 / counts)[labels_tensor]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.multinomial(self.weights, self.size, replacement=True, generator=generator).tolist()
        return iter([(self.epoch, index) for index in order])


def build_loader(dataset: ImageDataset, batch_size: int, train: bool, num_workers: int, seed: int,
                 pin_memory: bool = False, sampler: str = "random", collate_fn=collate_skipping_bad) -> DataLoader:
    """The one place that picks samplers and loader settings, for every task (segmentation and detection
    bring their own `collate_fn`); `sampler` (data.sampler) applies to training."""
    require(sampler, SAMPLERS, "data.sampler")
    workers = resolve_workers(num_workers)
    if train and sampler == "balanced":
        chosen = BalancedEpochSampler([record.label for record in dataset.records], seed=seed)
    else:
        chosen = EpochSampler(len(dataset), shuffle=train, seed=seed)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=chosen,
        num_workers=workers, collate_fn=collate_fn, pin_memory=pin_memory,
        drop_last=train and len(dataset) > batch_size, persistent_workers=workers > 0,
        worker_init_fn=_quiet_opencv if workers > 0 else None,
        prefetch_factor=4 if workers > 0 else None,
    )


def _quiet_opencv(_: int) -> None:
    """OpenCV's own thread pool inside every worker oversubscribes the cores."""
    import cv2

    cv2.setNumThreads(0)

"""The torch Dataset over records: decode (or take from the cache), transform, label.

A file that fails to decode yields None instead of a sample; `collate_skipping_bad` drops it and
passes its path and reason up to the training loop, so one bad file never ends an epoch.
"""

from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from transfer.data.images import BadImageError, read_rgb
from transfer.data.sources import Record


class ImageDataset(Dataset):
    def __init__(self, records: list[Record], transform: Callable | None,
                 cache: dict[str, np.ndarray] | None = None, strict: bool = False, seed: int | None = None,
                 memoize: bool = False, decode_side: int | None = None) -> None:
        self.records = records
        self.decode_side = decode_side  # files read without a cache: a JPEG may decode reduced to this side
        self.seed = seed  # None: a deterministic pipeline (eval) that needs no reseeding
        self.transform = transform
        self.cache = cache if cache is not None else {}
        self.strict = strict
        # a deterministic pipeline's outputs, kept from its first pass (in each loader worker, its share)
        self.memo: dict[int, object] | None = {} if memoize and seed is None else None

    def __len__(self) -> int:
        return len(self.records)

    def image(self, index: int) -> np.ndarray:
        record = self.records[index]
        if isinstance(record.source, np.ndarray):
            return record.source
        cached = self.cache.get(record.source)
        return cached if cached is not None else read_rgb(record.source, min_side=self.decode_side)

    def __getitem__(self, key: int | tuple[int, int]) -> dict | tuple[None, str, str]:
        """`key` is an index, or (epoch, index) from EpochSampler to seed this sample's augmentation."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if self.memo is not None and index in self.memo:
            return {"image": self.memo[index], "label": self.records[index].label, "index": index}
        try:
            image = self.image(index)
        except BadImageError as error:
            return bad_sample(error, self.strict)
        if self.transform is not None:
            if self.seed is not None:
                seed_augmentation(self.transform, self.seed, epoch, index)
            image = self.transform(image=image)["image"]
        if self.memo is not None:
            self.memo[index] = image
        return {"image": image, "label": self.records[index].label, "index": index}


def seed_augmentation(transform, seed: int, epoch: int, index: int) -> None:
    """Give an albumentations pipeline the random streams of (seed, epoch, index): the same sample gets the
    same augmentation in any worker and on resume, another epoch another one. One stream for all steps
    (set_random_seed would give each step its own copy of the same numbers)."""
    key = hash((seed, epoch, index)) & 0x7FFFFFFF
    transform.set_random_state(np.random.default_rng(key), random.Random(key))


def bad_sample(error: BadImageError, strict: bool) -> tuple[None, str, str, bool]:
    """What a dataset returns for a file that failed to decode; the collate function drops and reports it.
    With `strict`, the main process raises at once; a loader worker cannot (torch re-raises a RuntimeError
    with a traceback), so raise_if_strict does when the batch arrives."""
    if strict and get_worker_info() is None:
        raise error
    return (None, str(error.path), error.reason, strict)


def split_bad(items: list) -> tuple[list[dict], dict[str, list[tuple[str, str]]]]:
    """(the good samples, {"skipped": [(path, reason)] of the bad ones, "fatal": those raised when strict})."""
    good = [item for item in items if isinstance(item, dict)]
    bad = [item for item in items if not isinstance(item, dict)]
    return good, {"skipped": [(item[1], item[2]) for item in bad],
                  "fatal": [(item[1], item[2]) for item in bad if item[3]]}


def collate_skipping_bad(items: list) -> dict:
    """Default collation of good samples; bad ones become `batch['skipped']` [(path, reason)]."""
    good, bad = split_bad(items)
    batch = default_collate(good) if good else {"image": torch.empty(0), "label": torch.empty(0, dtype=torch.long),
                                                 "index": torch.empty(0, dtype=torch.long)}
    return {**batch, **bad}


def raise_if_strict(batch: dict) -> None:
    """With data.on_bad_image=error, the first unreadable file of a batch ends the command."""
    if batch.get("fatal"):
        path, reason = batch["fatal"][0]
        raise BadImageError(path, reason)

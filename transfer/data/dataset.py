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
                 memoize: bool = False) -> None:
        self.records = records
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
        return cached if cached is not None else read_rgb(record.source)

    def __getitem__(self, key: int | tuple[int, int]) -> dict | tuple[None, str, str]:
        """`key` is an index, or (epoch, index) from EpochSampler to seed this sample's augmentation."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if self.memo is not None and index in self.memo:
            return {"image": self.memo[index], "label": self.records[index].label, "index": index}
        try:
            image = self.image(index)
        except BadImageError as error:
            if self.strict and get_worker_info() is None:
                raise
            # a worker cannot raise it (torch re-raises a RuntimeError with a traceback): the main
            # process does, in raise_if_strict, when the batch arrives
            return (None, str(error.path), error.reason, self.strict)
        if self.transform is not None:
            if self.seed is not None:  # one stream for all steps: set_random_seed gives each step its own copy
                key = hash((self.seed, epoch, index)) & 0x7FFFFFFF
                self.transform.set_random_state(np.random.default_rng(key), random.Random(key))
            image = self.transform(image=image)["image"]
        if self.memo is not None:
            self.memo[index] = image
        return {"image": image, "label": self.records[index].label, "index": index}


def collate_skipping_bad(items: list) -> dict:
    """Default collation of good samples; bad ones become `batch['skipped']` [(path, reason)]."""
    good = [item for item in items if isinstance(item, dict)]
    skipped = [(item[1], item[2]) for item in items if not isinstance(item, dict)]
    fatal = [(item[1], item[2]) for item in items if not isinstance(item, dict) and item[3]]
    batch = default_collate(good) if good else {"image": torch.empty(0), "label": torch.empty(0, dtype=torch.long),
                                                 "index": torch.empty(0, dtype=torch.long)}
    batch["skipped"] = skipped
    batch["fatal"] = fatal
    return batch


def raise_if_strict(batch: dict) -> None:
    """With data.on_bad_image=error, the first unreadable file of a batch ends the command."""
    if batch.get("fatal"):
        path, reason = batch["fatal"][0]
        raise BadImageError(path, reason)

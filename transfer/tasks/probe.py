"""The linear-probe fast path: run the frozen backbone over every image once, then train the head on features.

A linear probe whose training images are transformed deterministically (`augment=none`: resize only)
sees the same backbone output for an image in every epoch, so computing it every epoch is waste. When
`finetune.strategy=linear_probe`, `trainer.feature_cache=auto` and nothing random or image-level acts on
the inputs, `train()` swaps three things before building the optimizer:

  model      → a view of the same model (same parameters, names, state_dict) whose forward is the
               classifier alone: it takes pre-logit features (`forward_head(x, pre_logits=True)`);
  loaders    → loaders over those features, with the same samplers, batch sizes and batch order;
  normalize  → moving the features to the device.

Everything else — timm's optimizer and schedule, the loss, accumulation, clipping, EMA, validation, best.pt,
resume, the reports — is the unchanged training loop, so the fast path reaches the accuracy of the slow one
(the same updates on the same numbers, up to float rounding), and its checkpoints hold the whole model
(backbone + trained head): eval, predict and export work as after any run.

Features are cached under `data.cache_dir`/features, one file per split, keyed by the model name, a hash
of the frozen weights, the split's files (paths, sizes, modification times, labels), the transform and
preprocessing, the device kind and precision, and the torch/timm versions: a second run with other head
settings (lr, epochs, optimizer, label smoothing …) skips the backbone; a changed image, weight or
preprocessing setting extracts again. Files are written under temporary names and renamed into place, with
KEY.about.json (model, data folder, split) for `transfer cache list`; a run holds the features it loaded, and
after writing new ones the cache folder is brought back under `data.cache_max_gb` (data/cache_folder.py).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn
from torch.utils.data import Dataset

from transfer.data.cache_folder import DEFAULT_MAX_GB, cap_bytes, cache_root, eviction_note, use, write_about
from transfer.data.dataset import ImageDataset, raise_if_strict
from transfer.data.loaders import build_loader
from transfer.distributed import gather, is_main
from transfer.errors import UserError
from transfer.files import atomic_write, write_json
from transfer.models.inference import autocast, fold_batchnorm, same_outputs

FEATURE_CACHE_MODES = ("auto", "off")
FORMAT = 1
# albumentations steps that give one output per input (with p=1), whatever the random state
DETERMINISTIC_STEPS = {"Resize", "SmallestMaxSize", "LongestMaxSize", "CenterCrop", "PadIfNeeded", "ToGray",
                       "Normalize", "ToFloat", "FromFloat", "ToTensorV2"}


@dataclass
class Features:
    """One split's pre-logit features (N×D float32, possibly memory-mapped) and what they came from."""

    values: np.ndarray
    labels: np.ndarray
    indices: np.ndarray  # the image dataset's index of each row (unreadable images have no row)
    skipped: list[tuple[str, str]]
    cached: bool
    seconds: float
    hold: object = None  # a shared lock on the cached file while this run reads it (cache_folder.use)


class FeatureDataset(Dataset):
    """Rows of a Features, in the samples' dict format (`image` holds the feature vector)."""

    def __init__(self, features: Features, records: list) -> None:
        self.features = features
        self.records = [records[int(index)] for index in features.indices]  # samplers read labels from here

    def __len__(self) -> int:
        return len(self.features.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        _, index = key if isinstance(key, tuple) else (0, key)
        return {"image": torch.from_numpy(np.array(self.features.values[index])),
                "label": int(self.features.labels[index]), "index": int(self.features.indices[index])}


class OnDevice:
    """The loop's `normalize` for features: they only move to the device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(self.device, non_blocking=True).float()


def blocker(cfg, train_transform) -> str | None:
    """Why the head cannot train on cached features for this config (None: it can)."""
    mode = cfg.trainer.get("feature_cache", "auto")
    if mode not in FEATURE_CACHE_MODES:
        raise UserError(f"trainer.feature_cache={mode}: choose one of {', '.join(FEATURE_CACHE_MODES)}.")
    if cfg.finetune.strategy != "linear_probe":
        return f"finetune.strategy={cfg.finetune.strategy} trains the backbone"
    if mode == "off":
        return "trainer.feature_cache=off"
    random_steps = [type(step).__name__ for step in getattr(train_transform, "transforms", [None])
                    if not is_deterministic(step)]
    if random_steps:
        return f"the training augmentation is random ({', '.join(random_steps)}); augment=none makes it deterministic"
    mixup = cfg.get("mixup") or {}
    if mixup.get("mixup_alpha", 0) or mixup.get("cutmix_alpha", 0) or mixup.get("cutmix_minmax"):
        return "mixup/cutmix mix images, not features"
    if cfg.trainer.get("tta") not in (None, "none"):
        return f"trainer.tta={cfg.trainer.tta} augments test images"
    return None


def is_deterministic(step) -> bool:
    name = type(step).__name__
    if name not in DETERMINISTIC_STEPS or getattr(step, "p", 1.0) < 1.0:
        return False
    if name in ("SmallestMaxSize", "LongestMaxSize") and isinstance(getattr(step, "max_size", None), (list, tuple)):
        return False  # a random choice among sizes
    return getattr(step, "position", "center") == "center"


def head_view(model: nn.Module) -> nn.Module:
    """The model (same object graph: parameters, buffers, modules, state_dict keys) whose forward is its
    classifier: it maps pre-logit features to logits. Deep copies (EMA) copy it as a whole, forward included."""
    view = copy.copy(model)
    view.forward = types.MethodType(_classify, view)
    return view


def _classify(self, features: torch.Tensor) -> torch.Tensor:
    return self.get_classifier()(features)


def pre_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(images), pre_logits=True)


def train_on_features(cfg, model: nn.Module, data, loaders: dict, normalize, amp_dtype, device: torch.device,
                      run_dir: Path, log=print):
    """(model, loaders, normalize, seconds spent) for the training loop: the fast path's when it applies, else
    as given (and 0.0). Features of unreadable images are left out and those images added to `data.skipped`."""
    reason = blocker(cfg, data.datasets["train"].transform)
    if reason is not None:
        if cfg.finetune.strategy == "linear_probe":
            log(f"linear probe on images every epoch: {reason}")
        return model, loaders, normalize, 0.0
    started = time.perf_counter()
    folder = cache_root(cfg.data.get("cache_dir")) / "features"
    cap = cap_bytes(cfg.data.get("cache_max_gb", DEFAULT_MAX_GB))
    weights = weights_hash(model)
    features, keys = {}, set()
    for split, dataset in data.datasets.items():
        key = feature_key(cfg, model, weights, dataset, normalize, amp_dtype, device)
        keys.add(folder / key)
        found = load_features(folder, key)
        if not all(gather(found is not None)):  # several processes extract together unless all hold the cache
            found = extract(model, dataset, cfg.data.eval_batch_size, cfg.data.num_workers, normalize, amp_dtype)
            if found is None:
                log("linear probe on images every epoch: this model's classifier does not act on "
                    "forward_head(pre_logits=True) alone")
                return model, loaders, normalize, 0.0
            if is_main():
                about = {"description": f"{cfg.model.name} features of {split} ({len(found.labels)} images) "
                                        f"of {cfg.data.root or 'the embedded digits'}",
                         "model": cfg.model.name, "split": split}
                save_features(folder, key, found, cap, about, keep=keys)
        features[split] = found
        data.skipped.extend(item for item in found.skipped if item not in data.skipped)
    feature_loaders = {}
    for split, found in features.items():
        original = loaders[split]
        dataset = FeatureDataset(found, data.datasets[split].records)
        feature_loaders[split] = build_loader(dataset, original.batch_size, train=split == "train", num_workers=0,
                                              seed=cfg.seed, sampler=cfg.data.get("sampler", "random"), shard=True)
    seconds = time.perf_counter() - started
    summary = ", ".join(f"{split} {len(f.labels)}×{f.values.shape[1]} ({'cached' if f.cached else f'{f.seconds:.1f}s'})"
                        for split, f in features.items())
    log(f"linear probe on cached features ({folder}): {summary}; {seconds:.1f}s. The backbone stays frozen; "
        "trainer.feature_cache=off runs it on the images every epoch instead")
    write_note(run_dir, folder, features, seconds)
    return head_view(model), feature_loaders, OnDevice(normalize.device), seconds


@torch.no_grad()
def extract(model: nn.Module, dataset: ImageDataset, batch_size: int, num_workers, normalize,
            amp_dtype) -> Features | None:
    """Pre-logit features of every readable image, in dataset order, with the frozen model in eval mode;
    None when the model's logits are not its classifier applied to them (checked on the first batch). The
    backbone runs with its BatchNorms folded into its convolutions, as in predict_logits."""
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    runner = fold_batchnorm(model) or model  # checked below with the rest: the model's logits from its features
    loader = build_loader(dataset, batch_size, train=False, num_workers=num_workers, seed=0, shard=True)
    values, labels, indices, skipped, matches = [], [], [], [], None
    try:
        for batch in loader:
            raise_if_strict(batch)  # data.on_bad_image=error
            skipped += batch["skipped"]
            if not len(batch["label"]):
                continue
            images = normalize(batch["image"])
            with autocast(normalize.device, amp_dtype):
                found = pre_logits(runner, images)
                if matches is None:
                    matches = classifier_matches(model, images[:4], found[:4])
                    if not matches:
                        break
            values.append(found.float().cpu())
            labels.append(batch["label"])
            indices.append(batch["index"])
    finally:
        model.train(was_training)
    shares = gather((matches, values, labels, indices, skipped))  # every process's shard, in dataset order
    if any(share[0] is False for share in shares):
        return None
    values, labels, indices, skipped = ([item for share in shares for item in share[column]] for column in (1, 2, 3, 4))
    seconds = time.perf_counter() - started
    if not values:
        return Features(np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64), skipped,
                        cached=False, seconds=seconds)
    indices = torch.cat(indices)
    order = torch.argsort(indices)
    return Features(torch.cat(values)[order].numpy(), torch.cat(labels)[order].numpy(), indices[order].numpy(),
                    skipped, cached=False, seconds=seconds)


def classifier_matches(model: nn.Module, images: torch.Tensor, features: torch.Tensor) -> bool:
    try:
        return same_outputs(model.get_classifier()(features), model(images))
    except (RuntimeError, TypeError, ValueError):
        return False


def weights_hash(model: nn.Module) -> str:
    """Hash of the frozen part's weights and buffers (everything but the classifier, which will train)."""
    classifier = model.get_classifier()
    head = tuple(f"{name}." for name, module in model.named_modules() if module is classifier and name)
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if (head and name.startswith(head)) or not tensor.numel():
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def feature_key(cfg, model: nn.Module, weights: str, dataset: ImageDataset, normalize, amp_dtype,
                device: torch.device) -> str:
    """Hash of everything that decides one split's features."""
    description = {
        "format": FORMAT, "torch": torch.__version__, "timm": timm.__version__,
        "model": cfg.model.name, "weights": weights,
        "transform": repr(dataset.transform), "cache_shrinks": bool(dataset.cache),
        "mean": normalize.mean.flatten().tolist(), "scale": normalize.scale.flatten().tolist(),
        "memory_format": str(normalize.memory_format), "device": device.type, "amp": str(amp_dtype),
    }
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode())
    for record in dataset.records:
        digest.update(record_identity(record.source).encode("utf-8", "surrogateescape"))
        digest.update(f"\0{record.label}\n".encode())
    return digest.hexdigest()[:32]


def record_identity(source) -> str:
    """A file's path, size and modification time; an in-memory image's content hash."""
    if isinstance(source, np.ndarray):
        return "array:" + hashlib.sha256(np.ascontiguousarray(source).tobytes()).hexdigest()
    try:
        info = os.stat(source)
        return f"{source}\0{info.st_size}\0{info.st_mtime_ns}"
    except OSError:
        return f"{source}\0missing"


def load_features(folder: Path, key: str) -> Features | None:
    try:
        index = json.loads((folder / f"{key}.json").read_text())
        values = np.load(folder / f"{key}.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    if index.get("format") != FORMAT or len(values) != len(index["labels"]):
        return None
    try:
        held = use(folder, key, folder / f"{key}.npy")
    except FileNotFoundError:  # `transfer cache clear` removed it just now
        return None
    return Features(values, np.asarray(index["labels"], dtype=np.int64), np.asarray(index["indices"], dtype=np.int64),
                    [tuple(item) for item in index["skipped"]], cached=True, seconds=0.0, hold=held)


def save_features(folder: Path, key: str, features: Features, cap: int | None = None,
                  about: dict | None = None, keep: set[Path] = frozenset()) -> None:
    """The values, then the index that marks them complete; both renamed into place; then what they were built
    from, and older entries evicted down to `cap` bytes. A cache that cannot be written is only a slower next
    run; features larger than the cap are not written at all."""
    if cap is not None and features.values.nbytes > cap:
        print(f"linear probe: features of {features.values.nbytes / 1e9:.2f} GB exceed data.cache_max_gb="
              f"{cap / 1e9:g}; not cached (the next run extracts them again). Raise data.cache_max_gb (null: no cap).")
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(folder / f"{key}.npy", "wb") as stream:
            np.save(stream, features.values)
        index = {"format": FORMAT, "labels": features.labels.tolist(), "indices": features.indices.tolist(),
                 "skipped": features.skipped, "seconds": features.seconds}
        write_json(folder / f"{key}.json", index, sort_keys=False)
        about = dict(about or {})
        write_about(folder, key, about.pop("description", "linear-probe features"), **about)
    except OSError as error:
        print(f"warning: cannot cache features in {folder} ({error.strerror or error}); the next run extracts "
              "them again. Set data.cache_dir to a writable folder.")
        return
    note = eviction_note(folder.parent, cap, keep={*keep, folder / key})
    if note:
        print(note)


def write_note(run_dir: Path, folder: Path, features: dict[str, Features], seconds: float) -> None:
    if not is_main():
        return
    note = {"folder": str(folder), "seconds": seconds,
            "splits": {split: {"images": int(len(f.labels)), "dim": int(f.values.shape[1]) if f.values.ndim == 2 else 0,
                               "cached": f.cached, "extract_seconds": f.seconds} for split, f in features.items()}}
    write_json(run_dir / "features.json", note, sort_keys=False)

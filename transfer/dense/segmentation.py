"""Semantic segmentation: image / mask folder pairs, an FPN decoder on a timm backbone, mIoU.

Data: ROOT/classes.txt (line i names mask value i, line 0 is the background) and ROOT/images/NAME.* with
ROOT/masks/NAME.png, or ROOT/{train,val,test}/{images,masks}/. Masks are single-channel PNGs of class
indices; `task.ignore_index` (255) marks pixels no loss or metric counts. A pair that cannot be used (an
unreadable file, no mask, a mask of another size or with values classes.txt does not name) is skipped,
listed with its reason in RUN/skipped_images.csv and counted in the run's warning; it never stops an epoch.

Metrics come from scikit-learn: a confusion matrix per batch over the non-ignored pixels, summed, and
jaccard_score / accuracy_score on the summed matrix (its cells as weighted (true, predicted) pairs).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import accuracy_score, confusion_matrix, jaccard_score
from torch import nn
from torch.utils.data import Dataset, default_collate

from transfer.data.dataset import bad_sample, seed_augmentation, split_bad
from transfer.data.images import IMAGE_EXTENSIONS, BadImageError, read_rgb
from transfer.data.sources import SPLIT_ALIASES, DataSplits, Record, complete_splits, drop_shared_files
from transfer.dense.augment import IGNORE_INDEX, build_dense_transform
from transfer.dense.backbone import DenseModel, build_backbone
from transfer.errors import UserError

CLASSES_FILE = "classes.txt"
OVERLAY_HEIGHT = 256
MIN_STRIDE = 4  # the finest level decoded: stride 2 maps cost much and add little at these input sizes


# ---------------------------------------------------------------------------------------------
# data


def read_classes(root: Path) -> list[str]:
    path = root / CLASSES_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: write one class name per line, line i naming mask value i "
                        "(line 0 the background).")
    names = path.read_text(encoding="utf-8-sig").rstrip("\n").split("\n")
    names = [name.strip() for name in names]
    empty = [number for number, name in enumerate(names, start=1) if not name]
    if empty or len(names) < 2:
        raise UserError(f"{path}: {'line ' + str(empty[0]) + ' is empty' if empty else 'fewer than two classes'}. "
                        "Give every mask value a name, the background on line 1.")
    if len(names) > IGNORE_INDEX:
        raise UserError(f"{path} names {len(names)} classes; masks are uint8 with {IGNORE_INDEX} as ignore: at most "
                        f"{IGNORE_INDEX} classes.")
    return names


def mask_path(image: str | Path) -> Path:
    """ROOT/.../images/a/b.jpg → ROOT/.../masks/a/b.png (the nearest images/ folder above the file)."""
    image = Path(image)
    parts = image.parts
    at = len(parts) - 1 - parts[::-1].index("images")
    return Path(*parts[:at], "masks", *parts[at + 1:]).with_suffix(".png")


def _pairs(folder: Path) -> tuple[list[Record], list[tuple[str, str]]]:
    """Records of folder/images/** that have a mask; the others as skipped."""
    images = folder / "images"
    if not images.is_dir() or not (folder / "masks").is_dir():
        raise UserError(f"{folder} needs images/ and masks/ folders (masks/NAME.png for images/NAME.*).")
    records, skipped = [], []
    for path in sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                       and not p.name.startswith(".")):
        if mask_path(path).is_file():
            records.append(Record(str(path), 0))
        else:
            skipped.append((str(path), f"no mask ({mask_path(path).relative_to(folder)})"))
    return records, skipped


def index_pairs(root: str | None, val_fraction: float, test_fraction: float,
                split_seed: int) -> tuple[list[str], DataSplits]:
    """(class names, image records per split; a record's mask is mask_path(record.source))."""
    if root is None:
        raise UserError("task=segmentation needs data.root=DIR with classes.txt and images/ + masks/ (or train/ "
                        "val/ test/ folders holding those).")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UserError(f"data.root={root} is not a folder. Segmentation reads classes.txt and images/ + masks/ "
                        "(or train/ val/ test/ folders holding those).")
    classes = read_classes(path)
    split_dirs = {SPLIT_ALIASES[d.name.lower()]: d for d in sorted(path.iterdir())
                  if d.is_dir() and d.name.lower() in SPLIT_ALIASES}
    if split_dirs and "train" not in split_dirs:
        raise UserError(f"{path} has {', '.join(sorted(split_dirs))} folders but no train/ folder.")
    folders = split_dirs or {"all": path}
    splits, skipped = {}, []
    for split, folder in folders.items():
        splits[split], bad = _pairs(folder)
        skipped += bad
    if not (splits.get("all") or splits.get("train")):
        raise UserError(f"{path}: no training image has a mask. Masks are masks/NAME.png beside images/NAME.*.")
    # the classification splitter, with every image in one pseudo-class (masks carry the classes)
    pooled = DataSplits(["image"], splits, skipped, description=f"segmentation folders {path}")
    return classes, drop_shared_files(complete_splits(pooled, val_fraction, test_fraction, split_seed))


def read_mask(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P", "I", "I;16", "1"):
                raise BadImageError(str(path), f"mask mode {image.mode}: save class indices as a single-channel "
                                               "(grayscale or palette) PNG")
            return np.array(image)
    except BadImageError:
        raise
    except (OSError, ValueError, SyntaxError) as error:
        raise BadImageError(str(path), f"unreadable mask ({str(error).splitlines()[0][:120]})") from None


def load_pair(image_path: str, num_classes: int, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    """(H×W×3 uint8 image, H×W uint8 mask), or BadImageError naming the file at fault and why."""
    image = read_rgb(image_path)
    path = mask_path(image_path)
    mask = read_mask(path)
    if mask.shape != image.shape[:2]:
        raise BadImageError(str(path), f"mask size {mask.shape[1]}x{mask.shape[0]} differs from the image's "
                                       f"{image.shape[1]}x{image.shape[0]}")
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != ignore_index)]
    if len(bad):
        shown = ", ".join(str(int(v)) for v in bad[:5])
        raise BadImageError(str(path), f"mask value out of range ({shown}; classes.txt names 0..{num_classes - 1}, "
                                       f"ignore {ignore_index})")
    return image, mask.astype(np.uint8)


class PairDataset(Dataset):
    """Image and mask of one record, transformed together. Like transfer.data.dataset.ImageDataset: a bad
    pair yields (None, path, reason, strict) for the collate function to drop and report, and training
    augmentation is seeded by (seed, epoch, index)."""

    def __init__(self, records: list[Record], transform, num_classes: int, ignore_index: int,
                 cache: dict | None = None, seed: int | None = None, strict: bool = False) -> None:
        self.records, self.transform, self.seed, self.strict = records, transform, seed, strict
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.cache = cache if cache is not None else {}

    def __len__(self) -> int:
        return len(self.records)

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        source = self.records[index].source
        return self.cache.get(source) or load_pair(source, self.num_classes, self.ignore_index)

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        try:
            image, mask = self.pair(index)
        except BadImageError as error:
            return bad_sample(error, self.strict)
        if self.seed is not None:
            seed_augmentation(self.transform, self.seed, epoch, index)
        out = self.transform(image=image, mask=mask)
        return {"image": out["image"], "mask": out["mask"].long(), "index": index}


def load_all(records: list[Record], num_classes: int, ignore_index: int,
             strict: bool) -> tuple[dict, list[tuple[str, str]]]:
    """Every pair decoded and checked once (data.cache != none): bad pairs are known before the first step."""
    cache, skipped = {}, []
    for record in records:
        try:
            cache[record.source] = load_pair(record.source, num_classes, ignore_index)
        except BadImageError as error:
            if strict:
                raise
            skipped.append((str(error.path), error.reason))
    return cache, skipped


# ---------------------------------------------------------------------------------------------
# model


class FpnDecoder(nn.Module):
    """Lateral 1x1 convs to one width, a top-down sum (coarse maps upsampled onto finer ones), every level
    brought to the finest stride and summed, one 3x3 conv-BN-ReLU to fuse, a 1x1 conv to class logits."""

    def __init__(self, in_channels: list[int], num_classes: int, channels: int = 64) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.fuse = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                  nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        maps = [lateral(f) for lateral, f in zip(self.lateral, features)]
        for i in range(len(maps) - 2, -1, -1):  # top-down
            maps[i] = maps[i] + F.interpolate(maps[i + 1], size=maps[i].shape[-2:], mode="nearest")
        size = maps[0].shape[-2:]
        fused = sum(F.interpolate(m, size=size, mode="bilinear", align_corners=False) if m.shape[-2:] != size else m
                    for m in maps)
        return self.classifier(self.fuse(fused))


class SegmentationModel(DenseModel):
    """backbone → FPN decoder → logits at the input's size."""

    def __init__(self, backbone: nn.Module, num_classes: int, decoder_channels: int = 64) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = FpnDecoder(backbone.feature_info.channels(), num_classes, decoder_channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def levels_from_stride(name: str, min_stride: int = MIN_STRIDE) -> list[int]:
    """The backbone levels of stride >= min_stride (timm numbers levels from the stem)."""
    import timm

    info = timm.create_model(name, features_only=True, pretrained=False).feature_info
    return [int(i) for i, r in zip(info.out_indices, info.reduction()) if r >= min_stride]


# ---------------------------------------------------------------------------------------------
# metrics


def segmentation_metrics(matrix: np.ndarray, classes: list[str]) -> dict[str, float]:
    """miou (mean over the classes present in labels or predictions), iou/<class>, pixel_accuracy, from a
    summed confusion matrix (rows: truth, columns: prediction)."""
    count = len(classes)
    truth, predicted = np.divmod(np.arange(count * count), count)
    weights = matrix.ravel().astype(np.float64)
    if weights.sum() == 0:
        return {}
    ious = jaccard_score(truth, predicted, labels=list(range(count)), average=None, sample_weight=weights,
                         zero_division=0)
    present = (matrix.sum(axis=0) + matrix.sum(axis=1)) > 0  # a class neither labelled nor predicted has no IoU
    metrics = {"miou": float(ious[present].mean()),
               "pixel_accuracy": float(accuracy_score(truth, predicted, sample_weight=weights))}
    metrics.update({f"iou/{name}": float(iou) for name, iou, seen in zip(classes, ious, present) if seen})
    return metrics


def batch_confusion(masks: torch.Tensor, predictions: torch.Tensor, count: int, ignore_index: int) -> np.ndarray:
    valid = masks != ignore_index
    return confusion_matrix(masks[valid].numpy().ravel(), predictions[valid].numpy().ravel(),
                            labels=list(range(count)))


# ---------------------------------------------------------------------------------------------
# overlays and predictions


def palette(count: int) -> np.ndarray:
    """count×3 uint8 colours (matplotlib's tab20, background black); the ignore index draws white."""
    from matplotlib import colormaps

    colours = (np.array([colormaps["tab20"](i % 20)[:3] for i in range(count)]) * 255).astype(np.uint8)
    colours[0] = 0
    table = np.full((256, 3), 255, np.uint8)
    table[:count] = colours
    return table


def overlay(image: np.ndarray, mask: np.ndarray, table: np.ndarray) -> np.ndarray:
    """The image with class colours blended over the labelled pixels."""
    colours = table[mask].astype(np.float32)
    labelled = (mask > 0)[..., None]
    return np.where(labelled, 0.45 * image + 0.55 * colours, image).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# the task


class Segmentation:
    """The segmentation task for transfer.dense.train: see that module for the interface."""

    name = "segmentation"
    monitor = "val/miou"

    def __init__(self) -> None:
        self.classes: list[str] = []
        self.ignore_index = IGNORE_INDEX
        self.mean = self.std = None
        self.skipped: list[tuple[str, str]] = []  # found in batches (data.cache=none); the loop drains it

    def build_datasets(self, cfg, preprocess: dict) -> tuple[dict[str, Dataset], list[str], list[tuple[str, str]]]:
        """Index the pairs, check them all up front (data.cache != none), attach the pipelines."""
        from omegaconf import OmegaConf

        self.ignore_index = int(cfg.task.ignore_index)
        self.mean = torch.tensor(preprocess["mean"]).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(preprocess["std"]).view(1, 3, 1, 1) * 255
        self.preprocess = preprocess
        classes, splits = index_pairs(cfg.data.root, cfg.data.val_fraction, cfg.data.test_fraction,
                                      cfg.data.split_seed)
        self.classes = classes
        strict, skipped, cache = cfg.data.on_bad_image == "error", list(splits.skipped), None
        records = splits.splits
        if cfg.data.cache != "none":
            cache, bad = load_all([r for rs in records.values() for r in rs], len(classes), self.ignore_index, strict)
            skipped += bad
            bad_masks = {path for path, _ in bad}
            records = {name: [r for r in rs if r.source not in bad_masks and str(mask_path(r.source)) not in bad_masks]
                       for name, rs in records.items()}
        train_steps = OmegaConf.to_container(cfg.augment.train)
        datasets = {name: PairDataset(rs, build_dense_transform(train_steps if name == "train" else None, preprocess,
                                                                mask_fill=self.ignore_index),
                                      len(classes), self.ignore_index, cache,
                                      seed=cfg.seed if name == "train" else None, strict=strict)
                    for name, rs in records.items()}
        if not len(datasets["train"]):
            raise UserError(f"data.root={cfg.data.root}: no usable training pair (see the skipped list).")
        return datasets, classes, skipped

    def collate(self, samples: list) -> dict:
        """'image': float, normalised with the run's mean and std; 'mask': long class indices."""
        good, bad = split_bad(samples)
        batch = default_collate(good) if good else {"image": torch.empty(0, 3, 1, 1), "mask": torch.empty(0, 1, 1),
                                                    "index": torch.empty(0, dtype=torch.long)}
        batch["image"] = (batch["image"].float() - self.mean) / self.std if good else batch["image"]
        return {**batch, **bad}

    def build_model(self, cfg, num_classes: int) -> tuple[nn.Module, str]:
        out_indices = cfg.task.get("out_indices") or levels_from_stride(cfg.model.name)
        backbone, source = build_backbone(cfg.model.name, cfg.model.pretrained, str(cfg.model.weights),
                                          list(out_indices), cfg.model.get("drop_path_rate"))
        return SegmentationModel(backbone, num_classes, int(cfg.task.decoder_channels)), source

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        device = next(model.parameters()).device
        logits = model(batch["image"].to(device))
        return F.cross_entropy(logits, batch["mask"].to(device), ignore_index=self.ignore_index)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader) -> dict[str, float]:
        model.eval()
        device = next(model.parameters()).device
        count = len(self.classes)
        matrix, loss_sum, pixels = np.zeros((count, count), np.int64), 0.0, 0
        for batch in loader:
            self.skipped += batch["skipped"]
            if not len(batch["index"]):
                continue
            logits = model(batch["image"].to(device)).float()
            masks = batch["mask"].to(device)
            valid = int((masks != self.ignore_index).sum())
            loss_sum += float(F.cross_entropy(logits, masks, ignore_index=self.ignore_index, reduction="sum"))
            pixels += valid
            matrix += batch_confusion(masks.cpu(), logits.argmax(1).cpu(), count, self.ignore_index)
        return {"loss": loss_sum / max(pixels, 1), **segmentation_metrics(matrix, self.classes)}

    @torch.no_grad()
    def predict(self, model: nn.Module, images: list[np.ndarray]) -> list[np.ndarray]:
        """H×W uint8 class-index masks, each the size of its input image."""
        model.eval()
        device = next(model.parameters()).device
        transform = build_dense_transform(None, self.preprocess)
        masks = []
        for image in images:
            tensor = transform(image=image)["image"][None].float()
            logits = model(((tensor - self.mean) / self.std).to(device))
            logits = F.interpolate(logits.float(), size=image.shape[:2], mode="bilinear", align_corners=False)
            masks.append(logits.argmax(1)[0].to(torch.uint8).cpu().numpy())
        return masks

    def write_predictions(self, chunks: Iterable[tuple[list[str], list[np.ndarray]]], folder: Path) -> int:
        """folder/NAME.png per image (pixel = class index, as the training masks) and folder/classes.txt, written
        chunk by chunk of (names, masks), each file atomically. Returns the number of images; none: no files."""
        count = 0
        for names, masks in chunks:
            if not count:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / CLASSES_FILE).write_text("\n".join(self.classes) + "\n", encoding="utf-8")
            for mask, name in zip(masks, names):
                path = folder / f"{name}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                temporary = path.with_name(f".{path.name}.tmp")
                Image.fromarray(mask).save(temporary, format="PNG")
                temporary.replace(path)
            count += len(names)
        return count

    @torch.no_grad()
    def write_overlays(self, model: nn.Module, dataset: PairDataset, folder: Path, count: int) -> list[Path]:
        """image | ground truth | prediction, at the input size, for the first `count` usable samples."""
        model.eval()
        device = next(model.parameters()).device
        table, written = palette(len(self.classes)), []
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(len(dataset)):
            if len(written) >= count:
                break
            sample = dataset[index]
            if not isinstance(sample, dict):
                continue
            image = sample["image"].permute(1, 2, 0).numpy()
            normalised = (sample["image"][None].float() - self.mean) / self.std
            predicted = model(normalised.to(device)).argmax(1)[0].cpu().numpy().astype(np.uint8)
            truth = sample["mask"].numpy().astype(np.uint8)
            panel = np.concatenate([image, overlay(image, truth, table), overlay(image, predicted, table)], axis=1)
            path = folder / f"{Path(dataset.records[index].source).stem}.png"
            zoom = max(1, OVERLAY_HEIGHT // panel.shape[0])  # small inputs drawn large enough to see
            Image.fromarray(panel).resize((panel.shape[1] * zoom, panel.shape[0] * zoom), Image.NEAREST).save(path)
            written.append(path)
        return written

    def checkpoint_entries(self) -> dict:
        return {"ignore_index": self.ignore_index}

    def restore(self, checkpoint: dict) -> None:
        """What predict needs from a checkpoint: classes, preprocessing, ignore index."""
        self.classes = list(checkpoint["classes"])
        self.preprocess = dict(checkpoint["preprocess"])
        self.ignore_index = int(checkpoint.get("ignore_index", IGNORE_INDEX))
        self.mean = torch.tensor(self.preprocess["mean"]).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(self.preprocess["std"]).view(1, 3, 1, 1) * 255

"""The commands that use what training made: `eval`, `predict` and `augment-preview`.

Each takes the `key=value` strings after its command name and returns an exit code; a mistake is a
`UserError` that names the fix (cli.py prints it). A checkpoint is used with the classes, the
preprocessing and the data config saved inside it, never with values recomputed from the model, so
`eval` sees the same pixels and arithmetic as training's own final evaluation.

Bad images never stop a command: they are counted in one warning line and listed in a CSV
(`path,reason`) beside the output — `skipped_images.csv` for eval, `<out>.skipped.csv` for predict,
whose predictions file therefore holds only images that were read.
"""

from __future__ import annotations

import csv
import difflib
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from transfer.augment import build_eval_transform
from transfer.checkpoint import load_checkpoint
from transfer.config import compose, require
from transfer.data.cache import CACHE_KINDS
from transfer.data.dataset import ImageDataset
from transfer.data.images import IMAGE_EXTENSIONS
from transfer.data.loaders import build_datasets, build_loader, index_data
from transfer.data.sources import SPLIT_ALIASES, DataSplits, Record, read_folder, read_manifest
from transfer.errors import UserError
from transfer.evaluate import classification_metrics, write_json, write_report
from transfer.inference import Normalizer, autocast, pick_amp, pick_device, predict_logits
from transfer.models.backbone import build_model, model_from_checkpoint, resolve_preprocess, to_channels_last
from transfer.techniques import final_weights
from transfer.train import preprocess_overrides
from transfer.tta import with_tta

EVAL_KEYS = ("checkpoint", "split", "out", "batch_size", "device", "tta")
PREDICT_KEYS = ("checkpoint", "input", "out", "top_k", "batch_size", "device")
PREVIEW_KEYS = ("out", "n")
SPLITS = ("train", "val", "test")
TABLE_ROWS = 10


# ---------------------------------------------------------------------------------------------
# arguments


def split_options(arguments: list[str], keys: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """(this command's own options, everything else): the rest goes to the config, or is refused."""
    keys = set(keys)
    options, rest = {}, []
    for item in arguments:
        key, separator, value = item.partition("=")
        if separator and key in keys:
            options[key] = value
        else:
            rest.append(item)
    return options, rest


def reject_unknown(items: list[str], command: str, valid: list[str]) -> None:
    """One message for the first unknown or malformed argument, with the closest valid key."""
    if not items:
        return
    item = items[0]
    key, separator, _ = item.partition("=")
    names = [v.split("=")[0] for v in valid]
    hint = difflib.get_close_matches(key, names, n=1)
    did_you_mean = f" Did you mean {hint[0]}=?" if hint else ""
    problem = f"unknown key '{key}'" if separator and key else f"'{item}' is not key=value"
    raise UserError(f"{problem}.{did_you_mean} Valid keys for transfer {command}: {', '.join(valid)}.")


def positive_int(options: dict[str, str], key: str, default: int, most: int | None = None) -> int:
    text = options.get(key)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or (most is not None and value > most):
        limit = f" and at most {most}" if most is not None else ""
        raise UserError(f"{key}={text} must be a whole number of at least 1{limit}, e.g. {key}={default}.")
    return value


def checkpoint_argument(options: dict[str, str]) -> Path:
    """The existing file or folder named by `checkpoint=` (what it holds is for the loader to judge)."""
    value = options.get("checkpoint")
    if not value:
        raise UserError("give checkpoint=PATH, the .pt file of a finished run, e.g. checkpoint=runs/<run>/best.pt "
                        "(a run directory stands for its best.pt).")
    path = Path(value).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint={value}: no such file. Runs keep theirs as <run dir>/best.pt and last.pt.")
    return path


def run_checkpoint_file(path: Path) -> Path:
    """A run directory stands for its best.pt."""
    if not path.is_dir():
        return path
    if (path / "best.pt").is_file():
        return path / "best.pt"
    raise UserError(f"checkpoint={path} is a folder without best.pt. Give a checkpoint file, "
                    "e.g. checkpoint=runs/<run>/best.pt or .../last.pt.")


def device_argument(options: dict[str, str]) -> torch.device:
    try:
        return pick_device(options.get("device") or "auto")
    except UserError as error:  # pick_device words its advice for training's config key
        raise UserError(str(error).replace("trainer.device=", "device=")) from None


def load_run_checkpoint(path: Path) -> dict:
    """A transfer checkpoint that carries its config and preprocessing (what eval and predict reuse)."""
    checkpoint = load_checkpoint(path)
    missing = [key for key in ("config", "preprocess") if key not in checkpoint]
    if missing:
        raise UserError(f"{path} has no {' or '.join(missing)} inside: it was not written by `transfer train`.")
    return checkpoint


# ---------------------------------------------------------------------------------------------
# models


@dataclass(frozen=True)
class Predictor:
    """What predict needs from any model format: uint8 NCHW batch → CPU float logits, and the
    class names and preprocessing that go with those logits."""

    logits: Callable[[torch.Tensor], torch.Tensor]
    classes: list[str]
    preprocess: dict


def load_predictor(path: Path, device: torch.device) -> Predictor:
    """An exported timm folder or ONNX file, else a transfer checkpoint (or its run folder): the same
    command checks an export against the run it came from."""
    from transfer.exported import is_exported, load_exported_predictor

    if is_exported(path):
        return Predictor(*load_exported_predictor(path, device))
    return checkpoint_predictor(load_run_checkpoint(run_checkpoint_file(path)), device)


def checkpoint_predictor(checkpoint: dict, device: torch.device) -> Predictor:
    model, normalize, amp_dtype = runnable_model(checkpoint, device)

    @torch.no_grad()
    def logits(images: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp_dtype):
            return model(normalize(images)).float().cpu()

    return Predictor(logits, list(checkpoint["classes"]), dict(checkpoint["preprocess"]))


def runnable_model(checkpoint: dict, device: torch.device) -> tuple[torch.nn.Module, Normalizer, torch.dtype | None]:
    """Model, normaliser and autocast dtype set up as the run's trainer had them, so results match."""
    trainer = checkpoint["config"].get("trainer", {})
    channels_last = bool(trainer.get("channels_last", False))
    preprocess = checkpoint["preprocess"]
    weights = final_weights(checkpoint)  # the EMA weights when the run found them best, as training's evaluation
    model = to_channels_last(model_from_checkpoint({**checkpoint, "model": weights}), device, channels_last)
    normalize = Normalizer(preprocess["mean"], preprocess["std"], device, channels_last)
    return model, normalize, pick_amp(str(trainer.get("amp", "off")), device)


# ---------------------------------------------------------------------------------------------
# eval


def eval_command(arguments: list[str]) -> int:
    """`transfer eval checkpoint=PATH [split=] [out=] [batch_size=] [device=] [tta=] [data.KEY=VALUE ...]`.

    tta: none | flip | crops | flip_crops; by default the run's own trainer.tta."""
    options, rest = split_options(arguments, EVAL_KEYS)
    data_overrides = [item for item in rest if item.startswith("data.") and "=" in item]
    reject_unknown([item for item in rest if item not in data_overrides], "eval",
                   [f"{key}=" for key in EVAL_KEYS] + ["data.KEY= (the run's data config)"])
    path = run_checkpoint_file(checkpoint_argument(options))
    checkpoint = load_run_checkpoint(path)
    if checkpoint.get("task", "classification") != "classification":  # segmentation, detection: their metrics
        if options.get("tta"):
            raise UserError(f"tta= is for classifiers; {path} is a {checkpoint['task']} checkpoint. Drop tta=.")
        from transfer.dense.evaluate import eval_dense

        return eval_dense(path, checkpoint, options, data_overrides)
    saved = checkpoint["config"]["data"]
    data_cfg = data_config(saved, data_overrides)
    data = eval_data(data_cfg, saved.get("root"), list(checkpoint["classes"]))
    split = choose_split(options.get("split"), data)
    records = split_records(data, split)
    out = Path(options.get("out") or path.parent / f"eval-{split}").expanduser()
    device = device_argument(options)
    batch_size = positive_int(options, "batch_size", int(data_cfg.eval_batch_size))
    top_k = int(checkpoint["config"].get("trainer", {}).get("top_k", 5))
    tta = options.get("tta") or checkpoint["config"].get("trainer", {}).get("tta") or "none"
    metrics, skipped = evaluate_records(checkpoint, data, records, data_cfg, split, out, device, batch_size, top_k,
                                        tta)
    print_eval_summary(split, metrics, data, records, skipped, out)
    return 0


def data_config(saved: dict, overrides: list[str]) -> DictConfig:
    """The run's data config with `data.KEY=VALUE` overrides; only keys it already has."""
    for item in overrides:
        key = item.partition("=")[0].removeprefix("data.")
        if key not in saved:
            hint = difflib.get_close_matches(key, list(saved), n=1)
            did_you_mean = f" Did you mean data.{hint[0]}?" if hint else ""
            raise UserError(f"unknown key 'data.{key}'.{did_you_mean} Valid data keys: "
                            f"{', '.join('data.' + k for k in saved)}.")
    merged = OmegaConf.merge({"data": saved}, OmegaConf.from_dotlist(overrides))
    return merged.data


def eval_data(data_cfg: DictConfig, trained_root: str | None, classes: list[str]) -> DataSplits:
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
    available = [name for name in SPLITS if name in data.splits] + ["all"]
    if not requested:
        return next(name for name in ("test", "val", "all") if name in available)
    split = SPLIT_ALIASES.get(requested.lower(), requested.lower())
    if split not in available:
        raise UserError(f"split={requested} is not available for {data.description or 'this data'}. "
                        f"Available splits: {', '.join(available)}.")
    return split


def split_records(data: DataSplits, split: str) -> list[Record]:
    records = [r for records in data.splits.values() for r in records] if split == "all" else data.splits[split]
    if not records:
        raise UserError(f"split {split} of {data.description} has no images. Choose another split=.")
    return records


def evaluate_records(checkpoint: dict, data: DataSplits, records: list[Record], data_cfg: DictConfig,
                     split: str, out: Path, device: torch.device, batch_size: int,
                     top_k: int, tta: str = "none") -> tuple[dict[str, float], list[tuple[str, str]]]:
    """Metrics and reports for one split, decoded through training's own dataset code (RAM cache
    included, since its shrinking changes pixels)."""
    preprocess = checkpoint["preprocess"]
    # build_datasets gives every split but "train" the eval transform; "eval" is such a split.
    only = DataSplits(data.classes, {"eval": records}, data.skipped, data.description)
    built = build_datasets(only, data_cfg, preprocess, [], seed=0)
    loader = build_loader(built.datasets["eval"], batch_size, train=False, num_workers=data_cfg.num_workers,
                          seed=0, pin_memory=device.type == "cuda")
    model, normalize, amp_dtype = runnable_model(checkpoint, device)
    logits, labels, _, skipped = predict_logits(with_tta(model, tta), loader, normalize, amp_dtype)
    skipped = built.skipped + skipped
    with warnings.catch_warnings():  # a folder with a subset of the classes is expected here
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        metrics = classification_metrics(logits, labels, len(data.classes), split, top_k)
    metrics[f"{split}/images"] = len(labels)
    metrics[f"{split}/skipped"] = len(skipped)
    write_outputs(out, split, logits, labels, data.classes, metrics, skipped)
    return metrics, skipped


def write_outputs(out: Path, split: str, logits: torch.Tensor, labels: torch.Tensor, classes: list[str],
                  metrics: dict[str, float], skipped: list[tuple[str, str]]) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create out={out}: {error.strerror}. Choose a writable folder.") from None
    write_report(out, split, logits, labels, classes)
    write_json(out / "metrics.json", metrics)
    write_skipped(out / "skipped_images.csv", skipped)


def print_eval_summary(split: str, metrics: dict[str, float], data: DataSplits, records: list[Record],
                       skipped: list, out: Path) -> None:
    present = len({r.label for r in records})
    shown = "  ".join(f"{key.split('/', 1)[1]} {value:.4f}" for key, value in metrics.items()
                      if isinstance(value, float))
    print(f"eval {split}: {metrics[f'{split}/images']} images, {present} of {len(data.classes)} classes, "
          f"from {data.description}")
    print(f"  {shown}")
    if skipped:
        print(f"  warning: skipped {len(skipped)} unreadable image(s); list in {out / 'skipped_images.csv'}")
    print(f"reports and metrics.json in {out}")


# ---------------------------------------------------------------------------------------------
# predict


def predict_command(arguments: list[str]) -> int:
    """`transfer predict checkpoint=PATH input=FILE_OR_FOLDER [out=predictions.csv] [top_k=5] ...`.

    The CSV has one row per image that could be read: `path,label_1,prob_1,...,label_k,prob_k`,
    best first, k = min(top_k, number of classes). Unreadable files go to `<out>.skipped.csv`.
    A segmentation or detection checkpoint writes its task's outputs into the folder out= instead
    (transfer/dense/predict.py).
    """
    options, rest = split_options(arguments, PREDICT_KEYS)
    reject_unknown(rest, "predict", [f"{key}=" for key in PREDICT_KEYS])
    path = checkpoint_argument(options)
    files = image_files(options.get("input"))
    top_k = positive_int(options, "top_k", 5)
    batch_size = positive_int(options, "batch_size", 64)
    dense = dense_checkpoint(path)
    if dense is not None:  # segmentation: mask PNGs in the folder out=; detection: boxes JSON
        from transfer.dense.predict import predict_dense

        return predict_dense(dense, files, options["input"], options.get("out"), batch_size)
    out = output_file(options.get("out") or "predictions.csv", "predictions.csv")
    predictor = load_predictor(path, device_argument(options))
    probabilities, order, skipped = predict_files(predictor, files, batch_size)
    rows = prediction_rows(probabilities, [files[i] for i in order], predictor.classes, top_k)
    write_predictions(out, rows, skipped)
    print_predictions(rows, out, skipped)
    return 0


def dense_checkpoint(path: Path) -> dict | None:
    """The checkpoint when `path` holds a segmentation or detection run's, else None (exports, classifiers)."""
    from transfer.exported import is_exported

    if is_exported(path):
        return None
    checkpoint = load_run_checkpoint(run_checkpoint_file(path))
    return checkpoint if checkpoint.get("task", "classification") != "classification" else None


def image_files(value: str | None) -> list[str]:
    """Every image under a folder (recursive, sorted), or the one file named."""
    if not value:
        raise UserError("give input=PATH: an image file or a folder of images (searched recursively).")
    path = Path(value).expanduser()
    if path.is_file():
        return [str(path)]
    if not path.is_dir():
        raise UserError(f"input={value}: no such file or folder.")
    files = sorted(str(p) for p in path.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file())
    if not files:
        raise UserError(f"input={value} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}). "
                        "Point input= at an image or a folder of images.")
    return files


def output_file(value: str, default_name: str) -> Path:
    """out= as a file path; a folder (existing, or written with a trailing /) gets the default name."""
    path = Path(value).expanduser()
    return path / default_name if path.is_dir() or value.endswith(("/", os.sep)) else path


def predict_files(predictor: Predictor, files: list[str],
                  batch_size: int) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
    """(probabilities of the readable images, their indices into files, skipped files)."""
    records = [Record(name, -1) for name in files]  # -1: unlabelled
    dataset = ImageDataset(records, build_eval_transform(predictor.preprocess))
    loader = build_loader(dataset, batch_size, train=False, num_workers="auto", seed=0)
    probabilities, order, skipped = [], [], []
    for batch in loader:
        skipped += batch["skipped"]
        if len(batch["index"]):
            probabilities.append(predictor.logits(batch["image"]).double().softmax(dim=1))
            order += batch["index"].tolist()
    if not probabilities:
        reasons = "; ".join(f"{p}: {r}" for p, r in skipped[:3])
        raise UserError(f"none of the {len(files)} input file(s) could be read as an image ({reasons}).")
    return torch.cat(probabilities), order, skipped


def prediction_rows(probabilities: torch.Tensor, paths: list[str], classes: list[str], top_k: int) -> list[list]:
    k = min(top_k, len(classes))
    values, indices = probabilities.topk(k, dim=1)
    return [[path, *[item for c, p in zip(row_indices, row_values) for item in (classes[c], f"{p:.6f}")]]
            for path, row_indices, row_values in zip(paths, indices.tolist(), values.tolist())]


def write_predictions(out: Path, rows: list[list], skipped: list[tuple[str, str]]) -> None:
    k = (len(rows[0]) - 1) // 2
    header = ["path", *[f"{name}_{i}" for i in range(1, k + 1) for name in ("label", "prob")]]
    write_csv_atomic(out, header, rows)
    write_skipped(skipped_list(out), skipped)


def skipped_list(out: Path) -> Path:
    return out.with_name(out.stem + ".skipped.csv")


def print_predictions(rows: list[list], out: Path, skipped: list[tuple[str, str]]) -> None:
    """The first rows as an aligned table: path, then the best (up to three) labels."""
    shown = [[shorten(row[0], 48), *row[1:7]] for row in rows[:TABLE_ROWS]]
    pairs = (len(shown[0]) - 1) // 2
    header = ["path", *[f"{name}_{i}" for i in range(1, pairs + 1) for name in ("label", "prob")]]
    widths = [max(len(str(line[i])) for line in [header, *shown]) for i in range(len(header))]
    for line in [header, *shown]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip())
    if len(rows) > TABLE_ROWS:
        print(f"... {len(rows) - TABLE_ROWS} more")
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable image(s); list in {skipped_list(out)}")
    print(f"wrote {len(rows)} predictions to {out}")


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


# ---------------------------------------------------------------------------------------------
# augment-preview


def preview_command(arguments: list[str]) -> int:
    """`transfer augment-preview [train overrides ...] [out=augment_preview.png] [n=16]`."""
    options, overrides = split_options(arguments, PREVIEW_KEYS)
    n = positive_int(options, "n", 16, most=256)
    out = output_file(options.get("out") or "augment_preview.png", "augment_preview.png")
    cfg = compose(overrides)
    splits = index_data(cfg.data)
    preprocess = training_preprocess(cfg, len(splits.classes))
    steps = OmegaConf.to_container(cfg.augment.train, resolve=True)
    samples, skipped = augmented_samples(splits, cfg, preprocess, steps, n)
    height, width = preprocess["input_size"][1:]
    caption = f"{' → '.join(step_names(steps)) or 'no augmentation'} → {height}×{width} (seed {cfg.seed})"
    draw_grid([image for image, _ in samples], [splits.classes[label] for _, label in samples], out, caption)
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable image(s): {skipped[0][0]}: {skipped[0][1]}")
    print(f"wrote {len(samples)} augmented training images to {out}")
    return 0


def training_preprocess(cfg: DictConfig, num_classes: int) -> dict:
    """The preprocessing `transfer train` would record; weights do not change a model's data config."""
    settings = {**OmegaConf.to_container(cfg.model, resolve=True), "pretrained": False}
    model, _ = build_model(num_classes=num_classes, **settings)
    return resolve_preprocess(model, **preprocess_overrides(cfg))


def augmented_samples(splits: DataSplits, cfg: DictConfig, preprocess: dict, steps: list[dict],
                      n: int) -> tuple[list[tuple[np.ndarray, int]], list[tuple[str, str]]]:
    """n training images chosen with the run's seed, through training's own dataset code (so the
    RAM cache's shrinking, which changes what a random crop sees, is included)."""
    train = splits.splits["train"]
    chosen = np.random.default_rng(cfg.seed).permutation(len(train))[:n]
    subset = DataSplits(splits.classes, {"train": [train[i] for i in chosen]}, [], splits.description)
    built = build_datasets(subset, cfg.data, preprocess, steps, cfg.seed)
    dataset, samples, skipped = built.datasets["train"], [], list(built.skipped)
    for index in range(len(dataset)):
        item = dataset[index]
        if isinstance(item, dict):
            samples.append((item["image"].permute(1, 2, 0).numpy(), int(item["label"])))
        else:
            skipped.append((item[1], item[2]))
    if not samples:
        raise UserError(f"none of the {len(chosen)} chosen training images could be read.")
    return samples, skipped


def step_names(steps: list[dict]) -> list[str]:
    return [str(step.get("_target_", "?")).rsplit(".", 1)[-1] for step in steps]


def draw_grid(images: list[np.ndarray], titles: list[str], path: Path, caption: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.0 * rows + 0.5), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, title in zip(axes.flat, images, titles):
        axis.imshow(image)
        axis.set_title(title, fontsize=9)
    figure.suptitle(caption, fontsize=9)
    figure.tight_layout()
    try:
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format="png", dpi=100)
    finally:
        plt.close(figure)


# ---------------------------------------------------------------------------------------------
# files


class atomic_path:
    """A temporary path beside `path`, renamed over it on success: readers never see half a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> str:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, self.temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                                      dir=self.path.parent)
        except OSError as error:
            raise UserError(f"cannot write {self.path}: {error.strerror}. Choose another out=.") from None
        os.close(handle)
        return self.temporary

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            os.replace(self.temporary, self.path)
        else:
            Path(self.temporary).unlink(missing_ok=True)


def write_csv_atomic(path: Path, header: list[str], rows: Iterable[Iterable]) -> None:
    with atomic_path(path) as temporary, open(temporary, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_skipped(path: Path, skipped: list[tuple[str, str]]) -> None:
    """The skipped files, or no file at all (so an old list never outlives a clean rerun)."""
    if skipped:
        write_csv_atomic(path, ["path", "reason"], skipped)
    else:
        path.unlink(missing_ok=True)

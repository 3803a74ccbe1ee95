"""`transfer predict checkpoint=PATH input=FILE_OR_FOLDER [out=] [top_k=5] [batch_size=] [device=]`.

A classifier (a checkpoint, an exported timm folder or an ONNX file: the same command checks an export
against the run it came from) writes one CSV row per readable image: `path,label_1,prob_1,...`, best first,
k = min(top_k, number of classes); unreadable files go to `<out>.skipped.csv`. Any other task writes its own
outputs into the folder out= (segmentation: mask PNGs; detection: one boxes.json; multi-label, from a checkpoint
or an export: predictions.csv of label sets), chunk by chunk, with unreadable files in OUT/skipped_images.csv.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from transfer.cli.options import (checkpoint_argument, device_argument, image_files, load_run_checkpoint,
                                  output_file, positive_int, reject_unknown, run_checkpoint_file, split_options,
                                  write_skipped)
from transfer.data.augment import build_eval_transform
from transfer.data.dataset import ImageDataset
from transfer.data.images import BadImageError, read_rgb
from transfer.data.loaders import build_loader
from transfer.data.sources import Record
from transfer.engine.inference import Loaded, load_for_inference
from transfer.errors import UserError
from transfer.exports.exported import is_exported, load_exported_predictor
from transfer.exports.source import SOFTMAX_READING
from transfer.files import write_csv
from transfer.models.inference import autocast
from transfer.tasks.multilabel import MultiLabel

PREDICT_KEYS = ("checkpoint", "input", "out", "top_k", "batch_size", "device")
TABLE_ROWS = 10
DEFAULT_FOLDER = "predictions"




@dataclass(frozen=True)
class Predictor:
    """What predict needs from any model format: uint8 NCHW batch → CPU float logits, and the
    class names and preprocessing that go with those logits."""

    logits: Callable[[torch.Tensor], torch.Tensor]
    classes: list[str]
    preprocess: dict
    reading: dict = field(default_factory=lambda: dict(SOFTMAX_READING))  # how logits become predictions


def load_predictor(path: Path, device: torch.device) -> Predictor:
    """An exported timm folder or ONNX file, else a transfer checkpoint (or its run folder): the same
    command checks an export against the run it came from."""
    if is_exported(path):
        return Predictor(*load_exported_predictor(path, device))
    return checkpoint_predictor(load_for_inference(load_run_checkpoint(run_checkpoint_file(path)), device))


def checkpoint_predictor(loaded: Loaded) -> Predictor:
    model, runtime = loaded.model, loaded.runtime

    @torch.no_grad()
    def logits(images: torch.Tensor) -> torch.Tensor:
        with autocast(runtime.device, runtime.amp_dtype):
            return model(runtime.normalize(images)).float().cpu()

    return Predictor(logits, loaded.classes, loaded.preprocess)


def predict_command(arguments: list[str]) -> int:
    options, rest = split_options(arguments, PREDICT_KEYS)
    reject_unknown(rest, "predict", [f"{key}=" for key in PREDICT_KEYS])
    path = checkpoint_argument(options)
    files = image_files(options.get("input"))
    top_k = positive_int(options, "top_k", 5)
    batch_size = positive_int(options, "batch_size", 64)
    device = device_argument(options)
    checkpoint = None if is_exported(path) else load_run_checkpoint(run_checkpoint_file(path))
    if checkpoint is not None and checkpoint.get("task", "classification") != "classification":
        loaded = load_for_inference(checkpoint, device)
        return predict_into_folder(loaded, files, options["input"], options.get("out"), batch_size)
    predictor = load_predictor(path, device)
    if predictor.reading["task"] == "multilabel":  # an exported multi-label model
        return predict_label_sets(predictor, files, options["input"], options.get("out"), batch_size)
    out = output_file(options.get("out") or "predictions.csv", "predictions.csv")
    probabilities, order, skipped = predict_files(predictor, files, batch_size)
    rows = prediction_rows(probabilities, [files[i] for i in order], predictor.classes, top_k)
    write_predictions(out, rows, skipped)
    print_predictions(rows, out, skipped)
    return 0


def predict_into_folder(loaded: Loaded, files: list[str], input_root: str, out: str | None, batch_size: int) -> int:
    """The task's own outputs for every readable file, chunk by chunk of batch_size; named by their path below
    the input folder."""
    task, folder = loaded.task, Path(out or DEFAULT_FOLDER).expanduser()
    skipped: list[tuple[str, str]] = []

    def chunks():
        for start in range(0, len(files), batch_size):
            images, names = [], []
            for file in files[start:start + batch_size]:
                try:
                    images.append(read_rgb(file))
                except BadImageError as error:
                    skipped.append((file, error.reason))
                    continue
                names.append(output_name(file, input_root))
            if images:
                yield names, task.predict(loaded.model, images, loaded.runtime)

    done = task.write_predictions(chunks(), folder)
    if not done:
        raise UserError(f"none of the {len(files)} input file(s) could be read as an image "
                        f"({'; '.join(f'{p}: {r}' for p, r in skipped[:3])}).")
    report_folder(task.name, done, folder, skipped)
    return 0


def output_name(file: str, input_root: str) -> str:
    """An image's name in a task's outputs: its path below the input folder, without the suffix."""
    root = Path(input_root).expanduser()
    relative = Path(file).relative_to(root) if root.is_dir() else Path(Path(file).name)
    return str(relative.with_suffix(""))


def predict_label_sets(predictor: Predictor, files: list[str], input_root: str, out: str | None,
                       batch_size: int) -> int:
    """An exported multi-label model writes what its checkpoint's predict writes: OUT/predictions.csv with each
    image's label set at the exported thresholds and every class's probability."""
    task, folder = MultiLabel(), Path(out or DEFAULT_FOLDER).expanduser()
    task.restore_reading(predictor.classes, predictor.reading)
    probabilities, order, skipped = predict_files(predictor, files, batch_size)
    names = [output_name(files[i], input_root) for i in order]
    done = task.write_predictions([(names, list(probabilities.float().numpy()))], folder)
    report_folder(task.name, done, folder, skipped)
    return 0


def report_folder(task: str, done: int, folder: Path, skipped: list[tuple[str, str]]) -> None:
    if skipped:
        write_skipped(folder / "skipped_images.csv", skipped)
        print(f"warning: skipped {len(skipped)} unreadable image(s); list in {folder / 'skipped_images.csv'}")
    print(f"wrote {task} predictions for {done} image(s) to {folder}")


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
            probabilities.append(activate(predictor.logits(batch["image"]).double(), predictor.reading))
            order += batch["index"].tolist()
    if not probabilities:
        reasons = "; ".join(f"{p}: {r}" for p, r in skipped[:3])
        raise UserError(f"none of the {len(files)} input file(s) could be read as an image ({reasons}).")
    return torch.cat(probabilities), order, skipped


def activate(logits: torch.Tensor, reading: dict) -> torch.Tensor:
    """Probabilities the way the model was trained to give them: one softmax over classes, or a sigmoid each."""
    return logits.sigmoid() if reading["activation"] == "sigmoid" else logits.softmax(dim=1)


def prediction_rows(probabilities: torch.Tensor, paths: list[str], classes: list[str], top_k: int) -> list[list]:
    k = min(top_k, len(classes))
    values, indices = probabilities.topk(k, dim=1)
    return [[path, *[item for c, p in zip(row_indices, row_values) for item in (classes[c], f"{p:.6f}")]]
            for path, row_indices, row_values in zip(paths, indices.tolist(), values.tolist())]


def write_predictions(out: Path, rows: list[list], skipped: list[tuple[str, str]]) -> None:
    k = (len(rows[0]) - 1) // 2
    header = ["path", *[f"{name}_{i}" for i in range(1, k + 1) for name in ("label", "prob")]]
    write_csv(out, header, rows)
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

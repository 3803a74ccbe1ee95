"""What the commands share: their own `key=value` options, checkpoint and input arguments, output paths."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from transfer.cli.arguments import reject_unknown, split_options  # noqa: F401  (commands import them from here)
from transfer.data.images import IMAGE_EXTENSIONS
from transfer.errors import UserError
from transfer.files import write_csv

if TYPE_CHECKING:  # torch is imported where a command needs it: `transfer sweep --help` must not wait seconds for it
    import torch


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
    from transfer.models.inference import pick_device

    try:
        return pick_device(options.get("device") or "auto")
    except UserError as error:  # pick_device words its advice for training's config key
        raise UserError(str(error).replace("trainer.device=", "device=")) from None


def load_run_checkpoint(path: Path) -> dict:
    """A transfer checkpoint that carries its config and preprocessing (what eval and predict reuse)."""
    from transfer.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(path)
    missing = [key for key in ("config", "preprocess") if key not in checkpoint]
    if missing:
        raise UserError(f"{path} has no {' or '.join(missing)} inside: it was not written by `transfer train`.")
    return checkpoint


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


def write_skipped(path: Path, skipped: list[tuple[str, str]]) -> None:
    """The skipped files, or no file at all (so an old list never outlives a clean rerun)."""
    if skipped:
        write_csv(path, ["path", "reason"], skipped)
    else:
        path.unlink(missing_ok=True)

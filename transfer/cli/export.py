"""`transfer export checkpoint=RUN/best.pt format=timm|backbone|onnx|torchscript|all [out=DIR]
[weights=auto|model|ema] [overwrite=false]`: validate everything cheap first, so mistakes cost no model building."""

from __future__ import annotations

import difflib
import shlex
from pathlib import Path

from transfer.checkpoint import WEIGHT_CHOICES
from transfer.cli.options import reject_unknown, split_options
from transfer.errors import UserError
from transfer.exports import FORMATS, Check, check_dense_formats, export, load_source, prepare_output

KEYS = ("checkpoint", "format", "out", "weights", "overwrite")
USAGE = ("transfer export checkpoint=RUN/best.pt format=timm|backbone|onnx|torchscript|all [out=DIR] "
         "[weights=auto|model|ema] [overwrite=false]")


def export_command(arguments: list[str]) -> int:
    """`transfer export ...`: validate everything cheap first, so mistakes cost no model building."""
    options = parse_options(arguments)
    formats = chosen_formats(options.get("format"))
    path = checkpoint_path(options.get("checkpoint"))
    weights = options.get("weights") or "auto"
    if weights not in WEIGHT_CHOICES:
        raise UserError(f"weights={weights} is not valid. Choose one of: {', '.join(WEIGHT_CHOICES)}.")
    overwrite = flag(options.get("overwrite"), "overwrite")
    outs = output_folders(path, formats, options.get("out"))
    for out in outs.values():
        prepare_output(out, overwrite)
    source = load_source(path, weights)
    check_dense_formats(source, formats)
    command = shlex.join(["transfer", "export", *arguments])
    for fmt, out in outs.items():
        check = export(source, fmt, out, overwrite=overwrite, command=command)
        print(f"{fmt:<11} {out}  ({describe(check)})", flush=True)
    return 0


def parse_options(arguments: list[str]) -> dict[str, str]:
    options, rest = split_options(arguments, KEYS)
    reject_unknown(rest, "export", list(KEYS))
    return options


def chosen_formats(value: str | None) -> tuple[str, ...]:
    if not value:
        raise UserError(f"say which format: format={'|'.join(FORMATS)}|all. Usage: {USAGE}")
    if value == "all":
        return FORMATS
    names = tuple(dict.fromkeys(part.strip() for part in value.split(",")))
    unknown = [name for name in names if name not in FORMATS]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], FORMATS, n=1)
        did_you_mean = f" Did you mean format={hint[0]}?" if hint else ""
        raise UserError(f"unknown format '{unknown[0]}'.{did_you_mean} Choose from: {', '.join(FORMATS)}, all "
                        "(or a comma-separated list).")
    return names


def checkpoint_path(value: str | None) -> Path:
    """The checkpoint file; a run directory stands for its best.pt."""
    if not value:
        raise UserError(f"transfer export needs checkpoint=PATH, e.g. checkpoint=runs/<run>/best.pt. Usage: {USAGE}")
    path = Path(value).expanduser()
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise UserError(f"checkpoint={value}: no such checkpoint. Runs keep theirs as <run dir>/best.pt and last.pt.")
    return path


def flag(value: str | None, key: str) -> bool:
    if value is None or value.lower() in ("", "false", "no", "0"):
        return False
    if value.lower() in ("true", "yes", "1"):
        return True
    raise UserError(f"{key}={value}: use {key}=true or {key}=false.")


def output_folders(checkpoint: Path, formats: tuple[str, ...], out: str | None) -> dict[str, Path]:
    """One folder per format. Default: <run dir>/export/<format>; with several formats, out= is their parent."""
    base = Path(out).expanduser() if out else checkpoint.parent / "export"
    if out and len(formats) == 1:
        return {formats[0]: base.absolute()}
    return {fmt: (base / fmt).absolute() for fmt in formats}


def describe(check: Check) -> str:
    if check.difference is None:
        return f"written; {check.how}"
    return f"max abs difference {check.difference:.2e} <= {check.tolerance:g} on a batch of {check.batch[0]}"

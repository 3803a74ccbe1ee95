"""`transfer <command> [overrides]`: parse, dispatch, and turn user mistakes into one-line errors.

A `UserError` (or Ctrl-C) ends the process with a message and a non-zero exit, never a traceback;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from transfer.errors import UserError  # noqa: E402

USAGE = """usage: transfer <command> [key=value ...]

commands:
  train            fine-tune a model (transfer train --help lists config groups and recipes)
  eval             evaluate a checkpoint: transfer eval checkpoint=RUN/best.pt [split=test] [data.root=DIR] [tta=flip]
  predict          classify images: transfer predict checkpoint=RUN/best.pt input=FILE_OR_FOLDER [top_k=5]
  augment-preview  write a PNG grid of augmented training images: transfer augment-preview [overrides] [out=PNG]
  lr-find          sweep the learning rate, plot the loss, suggest optim.lr: transfer lr-find [overrides] [out=DIR]
  export           for other projects: transfer export checkpoint=RUN/best.pt format=timm|backbone|onnx|torchscript|all

Also runs as `python -m transfer`. Examples:
  transfer train                                   # EfficientNet-Lite0 on the embedded digits, offline
  transfer train data.root=/my/images model=timm model.name=convnext_tiny trainer.epochs=20
  transfer train recipe=fashion_mnist_lite0 data.root=bench/data/fashion_mnist_100 optim.lr=3e-4
  transfer train --config runs/2026-01-01_12-00-00/config.yaml      # rerun a saved run exactly
"""

COMMANDS = ("train", "eval", "predict", "augment-preview", "export", "lr-find")
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}  # OSErrors the user can fix


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, arguments = argv[0], argv[1:]
    try:
        return dispatch(command, arguments)
    except UserError as error:
        print(f"transfer {command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # transfer.interrupt.Interrupted carries its message and exit code
        print(f"transfer {command}: {stop or 'interrupted'}", file=sys.stderr)
        return getattr(stop, "code", 130)


def dispatch(command: str, arguments: list[str]) -> int:
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown command '{command}'.{hint} Commands: {', '.join(COMMANDS)}.")
    if "-h" in arguments or "--help" in arguments:
        print(command_help(command))
        return 0
    if command == "train":
        return train_command(arguments)
    if command == "export":
        from transfer.export import export_command

        return export_command(arguments)
    if command == "lr-find":
        from transfer.lr_find import lr_find_command

        return lr_find_command(arguments)
    from transfer import commands

    return {"eval": commands.eval_command, "predict": commands.predict_command,
            "augment-preview": commands.preview_command}[command](arguments)


def train_command(arguments: list[str]) -> int:
    from omegaconf import OmegaConf

    from transfer.config import compose, without_hydra

    config_file, overrides, show_only = _train_flags(arguments)
    cfg = compose(overrides, with_hydra=True, config_file=config_file)
    if show_only:
        print(OmegaConf.to_yaml(without_hydra(cfg), resolve=True))
        return 0
    from transfer.train import train  # torch, timm: seconds to import, so only after the config is valid

    run_dir = make_run_dir(cfg, overrides)
    lock = lock_run_dir(run_dir)
    if not cfg.trainer.resume and (run_dir / "config.yaml").exists():  # another run got there first
        if lock is not None:
            lock.close()
        raise UserError(f"{run_dir} already holds a run. Choose another hydra.run.dir.")
    fresh = all(path.name == ".lock" for path in run_dir.iterdir())
    cfg = without_hydra(cfg)
    try:
        try:
            train(cfg, run_dir)  # writes config.yaml once the data, model and any resume are checked
        except OSError as error:
            if error.errno not in DISK_ERRORS:
                raise
            verb = "access" if error.errno in (errno.EACCES, errno.EPERM) else "write"
            raise UserError(f"cannot {verb} {error.filename or run_dir}: {error.strerror}. Free some space, fix the "
                            "permissions or set hydra.run.dir to a writable folder; checkpoints already written are "
                            "intact.") from None
    except (UserError, KeyboardInterrupt):
        if fresh and not (run_dir / "last.pt").exists():  # no checkpoint yet: leave no run behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            lock.close()
    return 0


def _train_flags(arguments: list[str]) -> tuple[str | None, list[str], bool]:
    config_file, overrides, show_only = None, [], False
    items = iter(arguments)
    for item in items:
        if item == "--config":
            config_file = next(items, None)
            if config_file is None:
                raise UserError("--config needs a path to a run's config.yaml.")
        elif item.startswith("--config="):
            config_file = item.split("=", 1)[1]
        elif item in ("--cfg", "--show-config"):
            show_only = True
        elif item.startswith("-"):
            raise UserError(f"unknown option {item}. Options: --config PATH, --cfg, --help; the rest are key=value.")
        else:
            overrides.append(item)
    return config_file, overrides, show_only


def make_run_dir(cfg, overrides: list[str]) -> Path:
    """Create the run directory; never write into a folder that already holds another run.

    Resuming writes into the checkpoint's folder (`trainer.resume=RUN/last.pt` or `=RUN`), or into
    hydra.run.dir with `trainer.resume=auto`, which starts afresh when that folder has no checkpoint yet.
    """
    chosen = any(o.startswith("hydra.run.dir=") for o in overrides)
    resume = cfg.trainer.get("resume")
    if resume == "auto" and not chosen:
        raise UserError("trainer.resume=auto continues the run in hydra.run.dir: add hydra.run.dir=RUN_DIR, "
                        "or give the checkpoint itself, trainer.resume=RUN_DIR/last.pt.")
    if resume and not chosen:
        path = Path(resume).expanduser().resolve()
        if not path.exists():
            raise UserError(f"trainer.resume={resume}: no such file. Give RUN_DIR/last.pt, a run directory, or "
                            "auto (with hydra.run.dir=RUN_DIR).")
        return path if path.is_dir() else path.parent
    run_dir = Path(cfg.hydra.run.dir).expanduser()
    if chosen:
        if (run_dir / "config.yaml").exists() and not resume:
            raise UserError(f"{run_dir} already holds a run. Choose another hydra.run.dir, or continue it with "
                            f"trainer.resume={run_dir / 'last.pt'}.")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create the run directory {run_dir}: {error.strerror}.") from None
        return run_dir
    return _fresh_dir(run_dir)


def lock_run_dir(run_dir: Path):
    """Hold an exclusive lock on RUN/.lock while this process runs, so a second run (or a resume of a
    live run) is refused instead of writing into the same folder. The kernel releases the lock when the
    process ends in any way, kill -9 included, so a stale lock file never blocks. None where there is
    no fcntl (Windows): there only the exclusive mkdir of fresh run directories keeps runs apart."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        handle = open(run_dir / ".lock", "a+")
    except OSError as error:
        raise UserError(f"cannot write in the run directory {run_dir}: {error.strerror}. "
                        "Set hydra.run.dir=PATH to a writable folder.") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip()
        handle.close()
        raise UserError(f"{run_dir} is in use by another transfer run{f' (pid {owner})' if owner else ''}. "
                        "Wait for it to end, or choose another hydra.run.dir.") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _fresh_dir(base: Path) -> Path:
    """base, or base-1, base-2 …: mkdir without exist_ok makes concurrent runs pick different ones."""
    for attempt in range(1000):
        candidate = base if attempt == 0 else base.with_name(f"{base.name}-{attempt}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
        except OSError as error:
            raise UserError(f"cannot create the run directory {candidate}: {error.strerror}. "
                            "Set hydra.run.dir=PATH to a writable folder.") from None
    raise UserError(f"could not find a free run directory next to {base}.")


def command_help(command: str) -> str:
    if command != "train":
        return USAGE
    from transfer.config import group_options, groups

    lines = ["usage: transfer train [--config RUN/config.yaml] [--cfg] [group=option ...] [key=value ...]",
             "", "config groups (pick one with group=option; defaults marked *):"]
    defaults = _defaults()
    for group in groups():
        options = [f"{o}*" if defaults.get(group) == o else o for o in group_options(group)]
        lines.append(f"  {group:<10} {', '.join(options) or '(none yet)'}")
    lines += ["", "keys (override with key=value; --cfg prints the composed config):"]
    lines += _key_lines()
    lines += _option_key_lines(defaults)
    lines += ["", "examples:", "  transfer train recipe=fashion_mnist_lite0 data.root=bench/data/fashion_mnist_100",
              "  transfer train data.root=/my/images model=timm model.name=resnet50 trainer.epochs=20 optim.lr=3e-4",
              "  transfer train finetune=linear_probe hydra.run.dir=runs/probe",
              "  transfer train finetune=freeze_then_unfreeze mixup=mixup ema.enabled=true optim.layer_decay=0.8 "
              "trainer.tta=flip",
              "  transfer train optim.lr=auto          # run the LR finder first (transfer lr-find plots the sweep)",
              "  transfer train task=segmentation data.root=/my/scenes   # classes.txt + images/ + masks/",
              "  transfer train task=detection data.root=/my/coco        # annotations.json + images/ (COCO)"]
    return "\n".join(lines)


def _defaults() -> dict[str, str]:
    from omegaconf import OmegaConf

    from transfer.config import PRIMARY_CONFIG, config_dir

    raw = OmegaConf.load(config_dir() / f"{PRIMARY_CONFIG}.yaml")
    return {k: v for entry in raw.defaults if isinstance(entry, dict) or hasattr(entry, "items")
            for k, v in entry.items()}


def _key_lines() -> list[str]:
    from omegaconf import DictConfig, ListConfig

    from transfer.config import compose

    cfg = compose([])
    lines = []
    for section, node in cfg.items():
        if isinstance(node, DictConfig):
            values = [f"{k}={_short(v)}" for k, v in node.items() if not isinstance(v, (DictConfig, ListConfig))]
            if values:
                lines.append(f"  {section}: " + "  ".join(values))
        else:
            lines.append(f"  {section}={node}")
    return lines


def _option_key_lines(defaults: dict[str, str]) -> list[str]:
    """Keys that a group's other options bring (e.g. finetune=freeze_then_unfreeze: finetune.head_epochs)."""
    from omegaconf import DictConfig, OmegaConf

    from transfer.config import config_dir, group_options, groups

    lines = []
    for group in groups():
        default = defaults.get(group)
        known = set(OmegaConf.load(config_dir() / group / f"{default}.yaml")) if default else set()
        for option in group_options(group):
            if group == "recipe" or option == default:
                continue
            node = OmegaConf.load(config_dir() / group / f"{option}.yaml")
            extra = [f"{k}={_short(v)}" for k, v in node.items() if k not in known and not isinstance(v, DictConfig)
                     and k != "defaults"]
            if extra and default:
                lines.append(f"  {group}={option} adds: " + "  ".join(f"{group}.{item}" for item in extra))
    return lines


def _short(value) -> str:
    return "null" if value is None else str(value)


def timestamp() -> str:
    return time.strftime("%Y-%m-%d_%H-%M-%S")


if __name__ == "__main__":
    sys.exit(main())
